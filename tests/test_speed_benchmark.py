"""The speed grids: pairs run back to back, b/a tables from the records, the Trainer baseline as a harness job."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from peftlab.errors import PeftlabError
from peftlab.harness import pairs, runner
from peftlab.harness.grid import load_grid
from peftlab.harness.report import load_records, render_pairs

ROOT = Path(__file__).parents[1]
GRIDS = ROOT / "benchmarks" / "grids"


def test_pairs_run_side_a_then_b_per_seed_and_jobs_are_named_per_label():
    grid = load_grid(GRIDS / "speed_text.yaml")
    grid.seeds = [1, 2]  # two repeats: a, b, a, b for each pair
    order = [(c.pair, c.seed, c.side, c.program.kind, c.program.name) for c in grid.cells()]
    assert order[:4] == [("lora", 1, "a", "job", "trainer_text"), ("lora", 1, "b", "recipe", "text_classification"),
                         ("lora", 2, "a", "job", "trainer_text"), ("lora", 2, "b", "recipe", "text_classification")]
    assert [o[0] for o in order[4:12:4]] == ["head", "full"] and order[4][3:] == ("recipe", "text_classification")
    # The matmul ceiling is no side of a pair: one cell per seed, after the pairs.
    assert order[12:] == [(None, 1, None, "job", "matmul_ceiling"), (None, 2, None, "job", "matmul_ceiling")]
    command = runner.cell_command(grid, grid.cells()[0], "runs/x")
    assert command[:3] == ["benchmarks/trainer_baseline.py", "--task", "text"] and "train.mixed_precision=no" in command


@pytest.mark.parametrize("old, new, message", [
    ("  full: [full-trainer, full-recipe]\n", "", "every strategy must be a side of exactly one pair"),
    ("lora: [lora-trainer, lora-recipe]", "lora: [lora-trainer, nope]", "'nope' is not a strategy label"),
    ("{job: trainer_text,", "{job: trainer_nope,", "no job 'trainer_nope' is registered"),
    ("{job: trainer_text,", "{jobs: trainer_text,", "one of `job` or `recipe`"),
    ("full: [full-trainer, full-recipe]", "full: [full-trainer, matmul-ceiling]", "is no side of a pair"),
    ("pairs:\n  lora: [lora-trainer, lora-recipe]\n  head: [head-uncached, head-cached]\n"
     "  full: [full-trainer, full-recipe]\n", "", "runs a measurement job, which goes beside a grid's pairs"),
])
def test_bad_pairs_and_unknown_jobs_are_one_line_errors(tmp_path, old, new, message):
    (tmp_path / "bad.yaml").write_text((GRIDS / "speed_text.yaml").read_text().replace(old, new, 1))
    with pytest.raises(PeftlabError, match=message):
        load_grid(tmp_path / "bad.yaml")


def _cell(pair, side, seed, phase_s, accuracy=0.8, kind="recipe", wall=10.0):
    """A finished pairs-grid record with 100 training texts, 2 epochs and `phase_s` seconds of training phase."""
    return {"grid": "g", "grid_file": "g.yaml", "cell": f"m__t__{pair}-{side}__seed{seed}", "status": "ok",
            "backbone": "m", "strategy": f"{pair}-{side}", "task": "t", "seed": seed, "pair": pair, "side": side,
            "position": {"backbone": 0, "strategy": 0 if pair == "lora" else 2, "task": 0},
            "kind": kind, "program": "trainer_text" if kind == "job" else "text_classification",
            "config": {"strategy": pair, "train": {"epochs": 2, "cache_frozen_features": side == "b"},
                       "data": {"max_train_samples": 100, "max_eval_samples": 50}},
            "data": {"rows": {"train": 100}}, "wall_time_s": wall, "peak_memory_mb": 900.0,
            "phases_s": {"data": 5.0, "feature_cache": phase_s / 2, "train_steps": phase_s / 2, "test": 3.0},
            "metrics": {"test": {"accuracy": accuracy}}}


def test_pair_table_is_the_median_ratio_over_alternating_pairs():
    records = [_cell("lora", "a", 1, 10.0, kind="job"), _cell("lora", "b", 1, 5.0, 0.9),
               _cell("lora", "a", 2, 20.0, kind="job"), _cell("lora", "b", 2, 4.0, 0.9),
               _cell("head", "a", 1, 8.0), _cell("head", "b", 1, 2.0)]
    lora, head = pairs.pair_summaries(records)
    assert lora["pair_ratios"] == [2.0, 5.0] and lora["ratio_samples_per_s"] == 3.5
    assert lora["a"]["samples_per_s"] == 2 * 100 / 20.0  # the lower median of two: the slower run
    assert lora["accuracy_difference_points"] == pytest.approx(10.0)
    table = pairs.pairs_table([lora, head]).splitlines()
    assert table[2] == ("| lora (100 train, 50 test, 2 ep) | a: trainer (lower median of 2) | 10.0 | 20.0 | 10.0 | 900 "
                        "| 0.8000 |  |  |  |")
    assert table[3].startswith("|  | b: recipe (lower median of 2) | 40.0 |")
    assert "**3.50x** (median of 2.00, 5.00)" in table[3]
    assert table[4].startswith("| head (100 train") and "a: recipe uncached" in table[4] and "**4.00x**" in table[5]


def test_pair_table_names_the_thread_count_where_the_records_have_it():
    records = [{**_cell("head", "a", 1, 8.0), "cpu_threads": 1}, {**_cell("head", "b", 1, 2.0), "cpu_threads": 2}]
    table = pairs.pairs_table(pairs.pair_summaries(records)).splitlines()
    assert "a: recipe uncached, 1 thread |" in table[2] and "b: recipe cached, 2 threads |" in table[3]


def _provenance(record: dict) -> dict:
    """The fields the report's provenance line reads, as the runner writes them (a measurement has no precision)."""
    return {**record, "environment": {"versions": {"torch": "2.x"}, "device": "cpu: test"},
            "git": {"sha": "0123456789abcdef", "dirty": False}, "load_average": [1.0, 1.0, 1.0],
            **({} if "measurement" in record else {"mixed_precision": record.get("mixed_precision", "bf16")})}


def _ceiling(seed: int, bf16: float, fp32: float) -> dict:
    """A finished matmul_ceiling cell: a measurement beside the pairs, with no metrics and no pair."""
    return {"grid": "g", "grid_file": "g.yaml", "cell": f"m__t__matmul-ceiling__seed{seed}", "status": "ok",
            "backbone": "m", "strategy": "matmul-ceiling", "task": "t", "seed": seed,
            "position": {"backbone": 0, "strategy": 3, "task": 0}, "kind": "job", "program": "matmul_ceiling",
            "measurement": {"kind": "matmul_ceiling", "threads": 1, "rows": 2048, "bf16": {"mean": bf16},
                            "fp32": {"mean": fp32}}}


def test_pair_table_shows_model_flops_against_the_bf16_ceiling_measured_beside_the_pairs(tmp_path):
    full_b = {**_cell("full", "b", 1, 5.0), "mixed_precision": "bf16",
              "throughput": {"train_tokens": 900, "model_flops_per_s": 6e10}}
    records = [_cell("lora", "a", 1, 10.0, kind="job"), _cell("lora", "b", 1, 5.0), _cell("full", "a", 1, 10.0),
               full_b, _ceiling(1, 1.2e11, 3e10)]
    assert pairs.is_pairs(records)
    lora, full = pairs.pair_summaries(records)
    assert "fraction_of_bf16_ceiling" not in lora and full["fraction_of_bf16_ceiling"] == pytest.approx(0.5)
    table = pairs.pairs_table([lora, full]).splitlines()
    assert table[3].endswith("| **2.00x** |  |  |")  # no model FLOPs recorded: the columns stay empty
    assert table[4].endswith("|  |  |  |") and table[5].endswith("| **2.00x** | 0.060 | 50% |")

    for record in records:
        (tmp_path / f"{record['cell']}.json").write_text(json.dumps(_provenance(record)))
    block, grid_name, _ = render_pairs(tmp_path)
    assert grid_name == "g" and "| **2.00x** | 0.060 | 50% |" in block
    assert ("Matmul ceiling (the `matmul_ceiling` job, one cell, 1 thread(s), the model's linear layers on 2,048 "
            "rows): bf16 120 GFLOP/s, fp32 30 GFLOP/s (bf16 4.0x fp32).") in block
    assert "5 finished and 0 failed cells" in block and "precision bf16 autocast;" in block  # no "None"


def test_matmul_ceiling_job_writes_a_record_beside_the_pairs(tmp_path):
    grid = load_grid(GRIDS / "speed_smoke.yaml")  # 16 texts x 32 tokens a batch: 512 rows of MiniLM's widths
    done = runner.run_grid(grid, tmp_path / "results", tmp_path / "runs", only=["*matmul-ceiling*"], progress=False)
    assert done.failed == [] and done.launched == ["minilm__rotten_tomatoes__matmul-ceiling__seed42"]
    record, = load_records(tmp_path / "results")
    assert record["status"] == "ok" and "metrics" not in record and "pair" not in record
    measured = record["measurement"]
    assert measured["kind"] == "matmul_ceiling" and measured["threads"] == record["cpu_threads"] == 1  # grid env
    assert measured["shapes"] == [[512, 384, 1536], [512, 1536, 384], [512, 384, 384]]
    for dtype in ("bf16", "fp32"):
        assert set(measured[dtype]) == {"512x384x1536", "512x1536x384", "512x384x384", "mean"}
        assert all(rate > 1e8 for rate in measured[dtype].values())
    assert pairs.bf16_ceiling([record])["bf16"] == measured["bf16"]["mean"]


def test_committed_speed_records_render_the_committed_table_into_every_readme(tmp_path):
    """The retired speed.py's case records (benchmarks/results/speed) render through the report, byte for byte."""
    committed = ROOT / "benchmarks" / "results" / "speed"
    shutil.copytree(committed, tmp_path / "speed")
    readmes = [tmp_path / "SPEED.md", tmp_path / "README.md"]
    for readme in readmes:
        readme.write_text(f"# {readme.stem}\n<!-- speed:table -->\nold\n<!-- /speed:table -->\n")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "report.py"), str(tmp_path / "speed"),
                           "--readme", *map(str, readmes)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    table = (tmp_path / "speed" / "table.md").read_text()
    assert table == (committed / "table.md").read_text()
    lora = json.loads((committed / "lora.json").read_text())
    assert f"**{lora['ratio_samples_per_s']:.2f}x** (median of 3.01, 3.85)" in table and "| vision-full (" in table
    for readme in readmes:
        assert readme.read_text() == f"# {readme.stem}\n<!-- speed:table -->\n{table}<!-- /speed:table -->\n"


@pytest.mark.slow
def test_speed_smoke_grid_end_to_end(tmp_path):
    """speed_smoke.yaml: the Trainer job and the recipe on 1-layer MiniLM, 48 texts; records, then the b/a table."""
    grid = load_grid(GRIDS / "speed_smoke.yaml")
    done = runner.run_grid(grid, tmp_path / "results", tmp_path / "runs", progress=False)
    assert done.failed == [] and len(done.launched) == 7  # 3 pairs and the matmul ceiling
    records = {r["cell"]: r for r in load_records(tmp_path / "results")}
    ceiling = records.pop("minilm__rotten_tomatoes__matmul-ceiling__seed42")
    assert ceiling["measurement"]["bf16"]["mean"] > 0
    shapes = {json.dumps(sorted(r)) for r in records.values()}
    assert len(shapes) == 1  # a job cell's record has a recipe cell's keys
    for record in records.values():
        phases = record["phases_s"]
        assert phases["train_steps"] > 0 and all(seconds >= 0 for seconds in phases.values())
        assert record["data"]["rows"] == {"train": 48, "validation": 24, "test": 24}
    trainer = records["minilm__rotten_tomatoes__lora-trainer__seed42"]
    assert trainer["kind"] == "job" and trainer["mixed_precision"] == "no" and trainer["parameters"]["trainable"] > 0
    assert "feature_cache" in records["minilm__rotten_tomatoes__head-cached__seed42"]["phases_s"]
    assert "feature_cache" not in records["minilm__rotten_tomatoes__head-uncached__seed42"]["phases_s"]

    readme = tmp_path / "SPEED.md"
    readme.write_text("# Speed\n<!-- report:speed_smoke -->\nold\n<!-- /report:speed_smoke -->\nafter\n")
    block, grid_name, table_path = render_pairs(tmp_path / "results")
    assert grid_name == "speed_smoke" and table_path.read_text() == block
    lines = block.splitlines()
    assert lines[0].startswith("| case |") and lines[2].startswith("| lora (48 train, 24 test, 1 ep) | a: trainer |")
    assert lines[4].startswith("| head (48 train") and "a: recipe uncached" in lines[4]
    assert "b: recipe cached" in lines[5]
    full = records["minilm__rotten_tomatoes__full-recipe__seed42"]["throughput"]
    assert full["train_padded_tokens"] >= full["train_tokens"] > 0 and full["model_flops_per_s"] > 0
    assert lines[7].split("|")[-3].strip() and lines[7].endswith("% |")  # model TFLOP/s, of bf16 ceiling
    assert "Matmul ceiling (the `matmul_ceiling` job, one cell, 1 thread(s)" in block
    assert "python benchmarks/run.py benchmarks/grids/speed_smoke.yaml --results" in block
