"""The benchmark harness: shipped grids load, the smoke grid runs end to end (tables, plot), resume and failures."""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest

from peftlab.config import load_config
from peftlab.errors import PeftlabError

from peftlab.harness import programs, runner
from peftlab.harness.grid import load_grid
from peftlab.harness.provenance import splits_fingerprint
from peftlab.harness.report import (compare_reruns, load_records, pareto_front, render, results_table, summarize,
                                    update_readme)

ROOT = Path(__file__).parents[1]

GRIDS = sorted((ROOT / "benchmarks" / "grids").glob("*.yaml"))
SMOKE = ROOT / "benchmarks" / "grids" / "smoke.yaml"
BROKEN = "minilm-1layer__rotten_tomatoes__lora-broken__seed0"


@pytest.mark.parametrize("path", GRIDS, ids=lambda p: p.name)
def test_shipped_grid_loads_and_every_cell_config_is_valid(path):
    grid = load_grid(path)
    assert f"python benchmarks/run.py benchmarks/grids/{path.name}" in path.read_text().splitlines()[0]
    cells = grid.cells()
    trained = len(grid.strategies) - len(grid.fusions)  # a fusion row is one cell over all seeds
    every = dataclasses.replace(grid, exclude=[]).cells()
    assert len({c.id for c in every}) == len(every) == (
        len(grid.backbones) * len(grid.tasks) * (trained * len(grid.seeds) + len(grid.fusions)))
    assert len(cells) == len(every) - sum(any(fnmatch.fnmatch(c.id, p) for p in grid.exclude) for c in every)
    ids = [c.id for c in cells]
    for cell in cells:
        if cell.ingredients:  # fused after its ingredients ran
            assert all(ids.index(i) < ids.index(cell.id) for i in cell.ingredients) and cell.seed is None
            continue
        config = str(ROOT / grid.config) if grid.config else None
        if "broken" in cell.strategy:  # the smoke grid's deliberate failure must fail at config time
            with pytest.raises(PeftlabError):
                load_config(config, cell.overrides)
        else:
            assert load_config(config, cell.overrides).train.seed == cell.seed


@pytest.mark.parametrize("text, message", [
    ("recipe: text_classification\nbackbones: {m: []}\nstrategies: {a: []}\ntasks: {t: []}\nseeds: [0]\nsedes: [1]",
     "unknown key 'sedes'"),
    ("recipe: text_classification\nbackbones: {m: []}\nstrategies: {a__b: []}\ntasks: {t: []}\nseeds: [0]",
     "label 'a__b'"),
    ("recipe: text_classification\nbackbones: {m: [output_dir=x]}\nstrategies: {a: []}\ntasks: {t: []}\nseeds: [0]",
     "output_dir is set by the runner"),
    ("recipe: nope\nbackbones: {m: []}\nstrategies: {a: []}\ntasks: {t: []}\nseeds: [0]", "no recipes/nope.py"),
    ("recipe: text_classification\nbackbones: {m: [lr]}\nstrategies: {a: []}\ntasks: {t: []}\nseeds: [0]",
     "not a key=value override"),
])
def test_bad_grid_is_one_line_error(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(PeftlabError, match=message):
        load_grid(path)


def test_only_pattern_matching_no_cell_is_one_line_error_before_any_work(tmp_path):
    grid = tmp_path / "g.yaml"
    grid.write_text("recipe: text_classification\nbackbones: {m: []}\nstrategies: {lora: [], full: []}\n"
                    "tasks: {t: []}\nseeds: [0]")
    with pytest.raises(PeftlabError, match=r"--only full matches no cell of g; .*'m__t__lora__seed0'.*'\*full\*'"):
        runner.run_grid(load_grid(grid), tmp_path / "results", tmp_path / "runs", only=["full"], progress=False)
    assert not (tmp_path / "results").exists()


def test_exclude_leaves_out_the_cells_its_patterns_match_and_a_pattern_matching_none_is_an_error(tmp_path):
    axes = "recipe: text_classification\nbackbones: {m: []}\nstrategies: {one: [], two: []}\ntasks: {a: [], b: []}\n"
    grid = tmp_path / "g.yaml"
    grid.write_text(axes + "seeds: [0, 1]\nexclude: ['*__a__two__*']\n")
    assert [c.id for c in load_grid(grid).cells()] == [
        "m__a__one__seed0", "m__a__one__seed1", "m__b__one__seed0", "m__b__one__seed1", "m__b__two__seed0",
        "m__b__two__seed1"]
    grid.write_text(axes + "seeds: [0]\nexclude: ['*__c__two__*']\n")
    with pytest.raises(PeftlabError, match=r"exclude: '\*__c__two__\*' matches no cell; .*'m__a__one__seed0'"):
        load_grid(grid)
    grid.write_text(axes + "seeds: [0]\nexclude: '*two*'\n")
    with pytest.raises(PeftlabError, match="exclude must be a list of shell patterns"):
        load_grid(grid)


@pytest.mark.slow  # about a minute: three recipe cells and a job cell in subprocesses
def test_grid_base_is_extended_by_defaults_and_replaced_by_other_keys(tmp_path):
    (tmp_path / "base.yaml").write_text(
        "recipe: text_classification\nenv: {A: '1'}\ndefaults: [train.epochs=2]\nbackbones: {m: [model.name=minilm]}\n"
        "strategies: {full: [strategy=full]}\ntasks: {t: []}\nseeds: [0, 1]\n")
    (tmp_path / "child.yaml").write_text(
        "base: base.yaml\nenv: {B: '2'}\ndefaults: [train.epochs=3]\nstrategies: {head: [strategy=head]}\nseeds: [5]\n")
    grid = load_grid(tmp_path / "child.yaml")
    assert grid.name == "child" and list(grid.strategies) == ["head"] and grid.seeds == [5]
    assert grid.defaults == ["train.epochs=2", "train.epochs=3"] and {"A", "B"} <= set(grid.env)
    [cell] = grid.cells()
    assert cell.overrides == ("train.epochs=2", "train.epochs=3", "model.name=minilm", "strategy=head", "train.seed=5")
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(PeftlabError, match="leads back to itself"):
        load_grid(tmp_path / "loop.yaml")


def test_a_cell_claimed_by_a_live_runner_is_skipped_and_a_stale_claim_is_taken_over(tmp_path):
    lock = tmp_path / "cell.lock"
    with runner.claim(lock) as claimed:
        assert claimed and lock.read_text() == str(os.getpid())
        with runner.claim(lock) as again:  # this process is alive: a second runner must keep off
            assert not again
    assert not lock.exists()
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(finished.stdout.strip())  # a runner killed with SIGKILL left its lock behind
    with runner.claim(lock) as claimed:
        assert claimed


def test_report_compare_exits_1_when_a_rerun_is_not_reproduced(tmp_path):
    committed, reruns = tmp_path / "committed", tmp_path / "reruns"
    for folder, records in ((committed, [_record("lora", 0, 0.80, 110, 1), _record("lora", 1, 0.82, 110, 1)]),
                            (reruns, [_record("lora", 1, 0.85, 110, 1)])):
        folder.mkdir()
        for record in records:
            (folder / f"{record['cell']}.json").write_text(json.dumps(record))
    report = [sys.executable, str(ROOT / "benchmarks" / "report.py"), str(committed), "--compare", str(reruns)]
    done = subprocess.run(report, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 1 and "| m__t__lora__seed1 | 82.00 | 85.00 | +3.00 | 1.41 | no |" in done.stdout
    assert sorted(p.name for p in committed.iterdir()) == ["m__t__lora__seed0.json", "m__t__lora__seed1.json"]
    (reruns / "m__t__lora__seed1.json").write_text(json.dumps(_record("lora", 1, 0.82, 110, 1)))
    assert subprocess.run(report, capture_output=True, cwd=ROOT).returncode == 0


FUSION_GRID = """recipe: text_classification
defaults: [model.num_hidden_layers=1, data.max_train_samples=32, data.max_eval_samples=16]
backbones: {m: []}
strategies:
  lora: [train.lr=5e-2]
  lora-ensemble: {fuse: lora, method: ensemble}
tasks: {t: []}
seeds: [0, 1]
"""


def _fusion_grid(tmp_path: Path):
    (tmp_path / "g.yaml").write_text(FUSION_GRID)
    results = tmp_path / "results"
    results.mkdir()
    for seed, accuracy in ((0, 0.8), (1, 0.82)):  # the ingredients' records (their cells are skipped)
        runner.write_record(results / f"m__t__lora__seed{seed}.json", _record("lora", seed, accuracy, 110, 0))
    return load_grid(tmp_path / "g.yaml"), results


@pytest.mark.parametrize("row, message", [
    ("lora-ensemble: {fuse: head, method: ensemble}", "fuse: 'head' is not a strategy label above it"),
    ("lora-ensemble: {fuse: lora, method: average}", "method 'average' is not a fusion method"),
    ("lora-ensemble: {fuse: lora}", "a fusion row holds `fuse: <strategy label>` and `method:"),
])
def test_bad_fusion_row_is_one_line_error(tmp_path, row, message):
    (tmp_path / "bad.yaml").write_text(FUSION_GRID.replace("lora-ensemble: {fuse: lora, method: ensemble}", row))
    with pytest.raises(PeftlabError, match=message):
        load_grid(tmp_path / "bad.yaml")


def test_fusion_cell_with_a_missing_run_folder_fails_in_one_line_naming_the_cell_to_rerun(tmp_path):
    grid, results = _fusion_grid(tmp_path)
    done = runner.run_grid(grid, results, tmp_path / "runs", progress=False)
    assert done.launched == done.failed == ["m__t__lora-ensemble__seeds0-1"]
    error = runner.read_record(results / "m__t__lora-ensemble__seeds0-1.json")["error"]
    assert "\n" not in error and error.startswith("the run folder of m__t__lora__seed0 is missing")
    assert f"python benchmarks/run.py {tmp_path / 'g.yaml'} --only m__t__lora__seed0 --runs {tmp_path / 'runs'}" in error


def _fused_record(method, accuracy, cost, ingredients=("m__t__lora__seed0", "m__t__lora__seed1", "m__t__lora__seed2")):
    record = _record(f"lora-{method}", None, accuracy, 330 if method == "ensemble" else 110, 1)
    scores = [{"validation": {"accuracy": a}, "test": {"accuracy": a}} for a in (0.8, 0.82, 0.81)]
    return {**record, "cell": f"m__t__lora-{method}__seeds0-1-2", "ingredients": list(ingredients),
            "inference_cost": cost, "samples_per_s": None, "fusion": {"method": method, "ingredients": scores}}


def test_fusion_rows_are_one_value_beside_best_seed_by_validation_and_inference_cost(tmp_path):
    singles = [_record("lora", seed, accuracy, 110, 0) for seed, accuracy in ((0, 0.80), (1, 0.86), (2, 0.83))]
    singles[1]["metrics"]["validation"]["accuracy"] = 0.70  # the best test seed is not the best validation seed
    summary = summarize([*singles, _fused_record("ensemble", 0.875, 3), _fused_record("greedy-soup", 0.84, 1)])
    assert summary.seeds == [0, 1, 2] and summary.has_fusions
    lines = results_table(summary).splitlines()
    assert lines[0].endswith("| t | best single seed | inference cost (forward passes) |")
    assert lines[2] == "| lora | 100 | 110 | 11% | 83.0 ± 3.0 | 83.0 | 1 |"  # seed 2: best validation (0.83)
    assert lines[3] == "| lora-ensemble | 320 | 330 | 33% | 87.5 | — | 3 |"
    assert lines[4] == "| lora-greedy-soup | 100 | 110 | 11% | 84.0 | — | 1 |"
    _, paths = render_fake(tmp_path, [*singles, _fused_record("ensemble", 0.875, 3)])
    assert paths["cost_plot"].stat().st_size > 0 and "| — |" in (tmp_path / "table.md").read_text()


def render_fake(tmp_path: Path, records: list[dict]):
    for record in records:
        runner.write_record(tmp_path / f"{record['cell']}.json", record)
    return render(tmp_path)


@pytest.mark.slow  # two one-step MiniLM (1 layer) runs in-process, then the fusion job in a subprocess
def test_fusion_job_writes_a_record_the_report_renders_with_inference_cost(tmp_path):
    from tests.test_predict import TEXT_FAST, run_recipe

    grid, results = _fusion_grid(tmp_path)
    for seed in (0, 1):
        run_recipe("text_classification", [*TEXT_FAST, "train.lr=5e-2", "train.cpu_threads=1", f"train.seed={seed}",
                                           f"output_dir={tmp_path / 'runs' / f'm__t__lora__seed{seed}'}"])
    done = runner.run_grid(grid, results, tmp_path / "runs", progress=False)
    assert done.launched == ["m__t__lora-ensemble__seeds0-1"] and not done.failed, done
    record = runner.read_record(results / "m__t__lora-ensemble__seeds0-1.json")
    members = [json.loads((tmp_path / "runs" / f"m__t__lora__seed{s}" / "metrics.json").read_text()) for s in (0, 1)]
    assert record["inference_cost"] == 2 and record["seed"] is None and record["mixed_precision"] == "no"
    assert record["parameters"]["trainable"] == sum(m["parameters"]["trainable"] for m in members)
    assert [i["weight"] for i in record["fusion"]["ingredients"]] == [0.5, 0.5]
    assert record["train_time_s"] >= sum(m["train_time_s"] for m in members)
    summary, _ = render(results)
    fused = results_table(summary).splitlines()[3].split(" | ")
    assert fused[0] == "| lora-ensemble" and fused[-1] == "2 |"
    assert fused[4] == f"{100 * record['metrics']['test']['accuracy']:.1f}"
