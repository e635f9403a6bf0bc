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
        if cell.extends:  # extends a run that comes before it
            assert ids.index(cell.extends) < ids.index(cell.id) and cell.extends.endswith(f"__seed{cell.seed}")
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


@pytest.mark.slow  # about a minute: three recipe cells and a job cell in subprocesses
def test_smoke_grid_end_to_end_with_resume_and_a_failed_cell(tmp_path, monkeypatch):
    grid = load_grid(SMOKE)
    results, runs = tmp_path / "results", tmp_path / "runs"
    first = runner.run_grid(grid, results, runs, progress=False)
    assert len(first.launched) == 3 and first.failed == [BROKEN]

    records = {r["cell"]: r for r in load_records(results)}
    assert set(records) == {c.id for c in grid.cells()}
    failed = records[BROKEN]
    assert failed["status"] == "failed" and failed["returncode"] == 2 and "no option 'rank'" in failed["error"]
    for cell_id, record in records.items():
        if cell_id == BROKEN:
            continue
        assert record["status"] == "ok"
        assert 0 <= record["metrics"]["test"]["accuracy"] <= 1 and "macro_f1" in record["metrics"]["validation"]
        assert record["parameters"]["trainable"] > record["parameters"]["trainable_without_head"] >= 0
        assert record["model_size_bytes"] > 0 and record["samples_per_s"] > 0 and record["peak_memory_mb"] > 0
        assert record["data"]["rows"] == {"train": 48, "validation": 32, "test": 32}
        assert record["config"]["train"]["seed"] == 0 and record["config"]["model"]["num_hidden_layers"] == 1
        assert {"torch", "transformers", "peft", "accelerate", "peftlab"} <= set(record["environment"]["versions"])
        assert record["git"]["sha"] is None or len(record["git"]["sha"]) == 40
    # Both finished cells trained on the same examples.
    assert len({r["data"]["sha256"] for r in records.values() if r["status"] == "ok"}) == 1

    # Resume: every cell has a record (the failure included), so nothing launches and no record is rewritten.
    launches = []
    real_run = subprocess.run
    def counting_run(command, **kwargs):
        if "recipes/" in " ".join(map(str, command)):
            launches.append(command)
        return real_run(command, **kwargs)

    monkeypatch.setattr(runner.subprocess, "run", counting_run)
    mtimes = {p: p.stat().st_mtime_ns for p in results.glob("*.json")}
    second = runner.run_grid(grid, results, runs, progress=False)
    assert launches == [] and second.launched == [] and len(second.skipped) == 3 and second.kept_failures == [BROKEN]
    assert {p: p.stat().st_mtime_ns for p in results.glob("*.json")} == mtimes

    # A registered job is launched and recorded like a recipe: here a stand-in for an exported model's evaluation,
    # which leaves a recipe's outputs (copied from the finished head cell) in its run folder.
    head = next(c for c in grid.cells() if c.strategy == "head")
    job_script = tmp_path / "copy_run.py"
    job_script.write_text(
        "import shutil, sys\n"
        "out = next(a.split('=', 1)[1] for a in sys.argv[1:] if a.startswith('output_dir='))\n"
        f"shutil.copytree({str(runs / head.id)!r}, out, dirs_exist_ok=True)\n")
    monkeypatch.setitem(programs.JOBS, "copy_run", programs.Program("job", "copy_run", str(job_script), task="text"))
    job_grid = tmp_path / "job.yaml"
    job_grid.write_text(SMOKE.read_text().replace("lora-r4: [", "lora-r4: {job: copy_run, overrides: [").replace(
        "train.lr=1e-3]", "train.lr=1e-3]}"))
    job_results = tmp_path / "job_results"
    runner.run_grid(load_grid(job_grid), job_results, tmp_path / "job_runs", only=["*lora-r4*"], progress=False)
    [job_record] = load_records(job_results)
    recipe_record = records[head.id]
    assert job_record["status"] == "ok" and (job_record["kind"], recipe_record["kind"]) == ("job", "recipe")
    assert job_record["command"].startswith(f"python {job_script} model.pooling=mean")
    assert _shape(job_record) == _shape(recipe_record)  # the same keys all the way down
    assert job_record["metrics"] == recipe_record["metrics"] and job_record["data"] == recipe_record["data"]

    # Tables and plot from the records alone.
    summary, paths = render(results, tmp_path / "report")
    table = paths["table"].read_text()
    assert "| head | 0 | 770 |" in table and "| lora-r4 | 6.1k |" in table
    assert f"`{BROKEN}`: strategy_options.lora" in table and "python benchmarks/run.py" in table
    assert paths["plot"].read_bytes().startswith(b"\x89PNG")
    assert len(paths["summary_csv"].read_text().splitlines()) == 1 + 2
    assert len(paths["cells_csv"].read_text().splitlines()) == 1 + 3


def _shape(value):
    """The nested keys of a record (values left out): what a reader of the record can rely on."""
    if isinstance(value, dict):
        return {key: _shape(v) for key, v in value.items() if key not in ("versions",)}
    return type(value).__name__ if value is not None else None


def test_retry_failed_reruns_only_failed_cells_and_timeouts_are_failures(tmp_path, monkeypatch):
    grid = load_grid(SMOKE)
    results, runs = tmp_path / "results", tmp_path / "runs"
    results.mkdir()
    ok, failed = grid.cells()[0].id, grid.cells()[1].id
    runner.write_record(results / f"{ok}.json", {"cell": ok, "status": "ok"})
    runner.write_record(results / f"{failed}.json", {"cell": failed, "status": "failed"})

    real_run = subprocess.run

    def timed_out(command, **kwargs):
        if "recipes/" not in " ".join(map(str, command)):  # git, uname: let them run
            return real_run(command, **kwargs)
        raise subprocess.TimeoutExpired(command, 5)

    monkeypatch.setattr(runner.subprocess, "run", timed_out)
    done = runner.run_grid(grid, results, runs, retry_failed=True, timeout_s=5, progress=False)
    assert done.launched == [failed, BROKEN] and done.skipped == [ok]
    record = json.loads((results / f"{failed}.json").read_text())
    assert record["status"] == "failed" and record["error"] == "timed out after 5 s"


def test_error_line_prefers_the_recipe_error_then_the_last_line(tmp_path):
    log = tmp_path / "cell.log"
    log.write_text("loading\rtrain: 10%\nerror: train.lr: must be > 0, got -1.0\n")
    assert runner.error_line(log) == "train.lr: must be > 0, got -1.0"
    log.write_text("Traceback (most recent call last):\n  ...\nRuntimeError: out of memory\n\n")
    assert runner.error_line(log) == "RuntimeError: out of memory"


def test_data_fingerprint_ignores_order_and_sees_content():
    def splits(texts):
        return {"train": datasets.Dataset.from_dict({"text": texts, "label": [0, 0, 1]})}

    a = splits_fingerprint(splits(["a", "b", "c"]))
    assert a["rows"] == {"train": 3}
    assert splits_fingerprint(splits(["c", "b", "a"]))["sha256"] != a["sha256"]  # labels moved with the order
    assert splits_fingerprint({"train": splits(["a", "b", "c"])["train"].shuffle(seed=1)})["sha256"] == a["sha256"]
    assert splits_fingerprint(splits(["a", "b", "d"]))["sha256"] != a["sha256"]


def _record(strategy, seed, accuracy, trainable, position, task="t", status="ok"):
    return {"grid": "g", "grid_file": "benchmarks/grids/g.yaml", "cell": f"m__{task}__{strategy}__seed{seed}",
            "status": status, "backbone": "m", "strategy": strategy, "task": task, "seed": seed,
            "position": {"backbone": 0, "strategy": position, "task": 0 if task == "t" else 1},
            "metrics": {"test": {"accuracy": accuracy, "macro_f1": accuracy},
                        "validation": {"accuracy": accuracy, "macro_f1": accuracy}},
            "parameters": {"trainable": trainable, "trainable_without_head": trainable - 10, "total": 1000,
                           "trainable_percent": trainable / 10},
            "train_time_s": 1.0, "samples_per_s": 2.0, "peak_memory_mb": 3.0, "model_size_bytes": 4, "wall_time_s": 5,
            "environment": {"versions": {"torch": "x"}, "device": "cpu"}, "git": {"sha": "0" * 40, "dirty": False}}


def test_table_is_mean_and_std_over_seeds_in_grid_order_with_average():
    records = [_record("lora", 0, 0.80, 110, 1), _record("lora", 1, 0.82, 110, 1),
               _record("full", 0, 0.90, 1000, 0), _record("full", 1, 0.90, 1000, 0),
               _record("lora", 0, 0.70, 110, 1, task="u"), _record("lora", 1, 0.70, 110, 1, task="u")]
    table = results_table(summarize(records))
    lines = table.splitlines()
    assert lines[0] == "| Method | # Trainable params (w/o head) | with head | % of all | t | u | Avg. |"
    assert lines[2].startswith("| full | 990 | 1.0k | 100% | 90.0 ± 0.0 | — | —")
    assert lines[3] == "| lora | 100 | 110 | 11% | 81.0 ± 1.4 | 70.0 ± 0.0 | 75.5 |"


def test_rerun_is_reproduced_only_within_its_rows_seed_spread():
    committed = summarize([_record("lora", 0, 0.80, 110, 1), _record("lora", 1, 0.82, 110, 1),
                           _record("full", 0, 0.90, 1000, 0), _record("full", 1, 0.90, 1000, 0)])
    table, ok = compare_reruns(committed, [_record("lora", 0, 0.81, 110, 1)])  # 1 point; lora's std is 1.41
    assert ok and table.splitlines()[2] == "| m__t__lora__seed0 | 80.00 | 81.00 | +1.00 | 1.41 | yes |"
    table, ok = compare_reruns(committed, [_record("lora", 0, 0.81, 110, 1), _record("full", 1, 0.905, 1000, 0)])
    assert not ok and table.splitlines()[2].endswith("| 0.00 | no |")  # full's seeds agree exactly: no band
    table, ok = compare_reruns(committed, [_record("lora", 5, 0.8, 110, 1), _record("lora", 1, 0, 110, 1, status="failed")])
    assert not ok and "no (no committed record)" in table and "no (re-run failed" in table


def test_pareto_front_keeps_points_no_cheaper_point_beats():
    points = [(10, 70.0), (100, 80.0), (50, 60.0), (1000, 79.0), (200, 81.0), (100, 75.0)]
    assert pareto_front(points) == [(10, 70.0), (100, 80.0), (200, 81.0)]


def test_readme_block_is_replaced_between_markers(tmp_path):
    readme = tmp_path / "README.md"
    # A marker quoted inside a line (a command's comment naming the block) is text, not the block's start.
    readme.write_text("run x  # into the <!-- report:g --> block\nintro\n<!-- report:g -->\nold\n<!-- /report:g -->\n"
                      "rest\n")
    update_readme(readme, "g", "new table\n")
    assert readme.read_text() == ("run x  # into the <!-- report:g --> block\nintro\n<!-- report:g -->\nnew table\n"
                                  "<!-- /report:g -->\nrest\n")
    with pytest.raises(PeftlabError, match="no '<!-- report:other -->'"):
        update_readme(readme, "other", "x")


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


def test_an_extends_row_continues_the_run_folder_of_its_label_with_the_same_seed(tmp_path):
    grid_path = tmp_path / "g.yaml"
    grid_path.write_text("recipe: multitask_classification\nbackbones: {m: []}\ntasks: {t: []}\nseeds: [0, 1]\n"
                         "strategies: {shared: [multitask.mode=shared], "
                         "then: {extends: shared, overrides: [multitask.mode=shared]}}\n")
    grid = load_grid(grid_path)
    cells = grid.cells()
    assert [(c.id, c.extends) for c in cells] == [
        ("m__t__shared__seed0", None), ("m__t__shared__seed1", None),
        ("m__t__then__seed0", "m__t__shared__seed0"), ("m__t__then__seed1", "m__t__shared__seed1")]
    command = runner.cell_command(grid, cells[3], tmp_path / "runs" / cells[3].id)
    assert f"multitask.extend={tmp_path / 'runs' / 'm__t__shared__seed1'}" in command
    assert command.index("multitask.mode=shared") < command.index(f"output_dir={tmp_path / 'runs' / cells[3].id}")
    missing = runner.missing_ingredient(grid, cells[3], tmp_path / "runs")
    assert "m__t__shared__seed1 is missing" in missing and "--only m__t__shared__seed1" in missing
    (tmp_path / "runs" / "m__t__shared__seed1").mkdir(parents=True)
    (tmp_path / "runs" / "m__t__shared__seed1" / "metrics.json").write_text("{}")
    assert runner.missing_ingredient(grid, cells[3], tmp_path / "runs") is None
    grid_path.write_text(grid_path.read_text().replace("extends: shared", "extends: later"))
    with pytest.raises(PeftlabError, match=r"then: extends: 'later' is not a strategy label above it"):
        load_grid(grid_path)


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


def _multitask_record(strategy, task_label, seed, scores, position, *, shared=0, extends=None, forgetting=None):
    """A multi-task cell's record: `scores` {task: test accuracy}; adapter 100 per task (0 when shared), head 10."""
    record = _record(strategy, seed, sum(scores.values()) / len(scores), 0, position, task=task_label)
    record["position"]["task"] = ["a", "b", "ab"].index(task_label) if task_label in ("a", "b", "ab") else 3
    record["tasks"] = {name: {"test": {"accuracy": value}, "validation": {"accuracy": value},
                              "parameters": {"adapter": 0 if shared else 100, "head": 10}}
                       for name, value in scores.items()}
    record["multitask"] = {"mode": "shared" if shared else "separate", "shared_parameters": shared}
    record["parameters"]["trainable"] = shared + sum(10 + (0 if shared else 100) for _ in scores)
    record.update({"extends": extends} if extends else {}, **({"forgetting": forgetting} if forgetting else {}))
    return record


def test_multitask_table_pools_single_task_runs_and_sums_their_serving_memory():
    from peftlab.harness.multitask_report import forgetting_table, multitask_table

    records = [_multitask_record("sep", "a", seed, {"a": 0.80 + seed / 100}, 0) for seed in (0, 1)]
    records += [_multitask_record("sep", "b", seed, {"b": 0.60}, 0) for seed in (0, 1)]
    records += [_multitask_record("sep", "ab", seed, {"a": 0.78, "b": 0.62 + seed / 50}, 0) for seed in (0, 1)]
    records += [_multitask_record("shared", "ab", seed, {"a": 0.70, "b": 0.50}, 1, shared=100) for seed in (0, 1)]
    memory = {"seed": 0, "note": "n", "rows": [{"cell": "m__a__sep__seed0", "rss_mb": 500.0},
                                              {"cell": "m__b__sep__seed0", "rss_mb": 510.0},
                                              {"cell": "m__ab__sep__seed0", "rss_mb": 530.0}]}
    lines = multitask_table(records, "test", "accuracy", memory).splitlines()
    assert lines[0] == "| Setting | Adapters | Heads | Trained in all | a | b | Mean | Serving memory, MB |"
    assert lines[2] == "| sep, one run per task | 100 each | 10 / 10 | 220 | 80.5 ± 0.7 | 60.0 ± 0.0 | 70.2 | 1,010 (2 processes) |"
    assert lines[3] == "| sep, 2 tasks in one run | 100 each | 10 / 10 | 220 | 78.0 ± 0.0 | 63.0 ± 1.4 | 70.5 | 530 (1 process) |"
    assert lines[4] == "| shared, 2 tasks in one run | 100 shared | 10 / 10 | 120 | 70.0 ± 0.0 | 50.0 ± 0.0 | 60.0 |  |"
    assert len(lines) == 5 and forgetting_table(records, "test", "accuracy") == ""

    moved = {"a": {"test": {"accuracy": {"before": 0.80, "after": 0.75, "change": -0.05}}}}
    extended = [_multitask_record("then", "ab", seed, {"a": 0.75, "b": 0.6}, 2, shared=100,
                                  extends=f"m__ab__shared__seed{seed}", forgetting=moved) for seed in (0, 1)]
    assert multitask_table(extended, "test", "accuracy").splitlines()[2].startswith(
        "| then, 2 tasks in one run, extends shared | 100 shared |")
    assert forgetting_table(extended, "test", "accuracy").splitlines()[2] == (
        "| then, 2 tasks in one run, extends shared | a | 80.0 ± 0.0 | 75.0 ± 0.0 | -5.0 ± 0.0 |")


def test_the_readme_block_of_a_multitask_grid_carries_its_serving_memory(tmp_path, capsys):
    """report.py --readme writes the same multi-task table as table.md, serving memory included."""
    from peftlab.harness.report import main as report_main

    results = tmp_path / "g"
    results.mkdir()
    for seed in (0, 1):
        for label, scores in (("a", {"a": 0.8}), ("b", {"b": 0.6})):
            record = _multitask_record("sep", label, seed, scores, 0)
            (results / f"{record['cell']}.json").write_text(json.dumps(record))
    (results / "serving_memory.json").write_text(json.dumps({"seed": 0, "note": "n", "rows": [
        {"cell": "m__a__sep__seed0", "rss_mb": 500.0}, {"cell": "m__b__sep__seed0", "rss_mb": 510.0}]}))
    readme = tmp_path / "README.md"
    readme.write_text("<!-- report:g -->\n<!-- /report:g -->\n")
    assert report_main([str(results), "--readme", str(readme)]) == 0
    row = "| sep, one run per task | 100 each | 10 / 10 | 220 | 80.0 ± 0.0 | 60.0 ± 0.0 | 70.0 | 1,010 (2 processes) |"
    assert row in (results / "table.md").read_text() and row in readme.read_text()
