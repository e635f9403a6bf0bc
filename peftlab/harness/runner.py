"""Run a benchmark grid: one subprocess per cell, one JSON record per cell; cells with a record are skipped.

    python benchmarks/run.py benchmarks/grids/text_minilm.yaml                 # fill in the missing cells
    python benchmarks/run.py benchmarks/grids/text_minilm.yaml --list          # cells, commands and status
    python benchmarks/run.py benchmarks/grids/text_minilm.yaml --only '*lora-r8*seed0'
    nice -n 5 python benchmarks/run.py benchmarks/grids/text_minilm.yaml       # on a shared machine
(`python -m peftlab.harness.runner` is the same command.)

A record is `<results_dir>/<cell id>.json` with `status` "ok" or "failed". The run folder a cell writes (weights,
checkpoints, logs) goes to `<runs_dir>/<cell id>/`, outside git; only the records are committed: by default
benchmarks/results/<grid>/ and runs/benchmarks/<grid>/.
Then render tables and the plot: python benchmarks/report.py benchmarks/results/<grid>
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import yaml
from tqdm.auto import tqdm

from peftlab.errors import PeftlabError
from peftlab.harness.grid import Cell, Grid, load_grid
from peftlab.harness.programs import REPO_ROOT, Program
from peftlab.harness.provenance import data_fingerprint, environment, folder_size, git_state, source_fingerprint

RECORD_VERSION = 1


@dataclass
class GridRun:
    """What one invocation of the runner did, by cell id."""

    launched: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    """Cells that failed in this invocation (a subset of `launched`)."""
    kept_failures: list[str] = field(default_factory=list)
    """Skipped cells whose earlier record says "failed" (rerun them with retry_failed)."""


def default_results_dir(grid: Grid) -> Path:
    """Where the committed records go: benchmarks/results/<grid name>/."""
    return REPO_ROOT / "benchmarks" / "results" / grid.name


def default_runs_dir(grid: Grid) -> Path:
    """Where the heavy run folders go: runs/benchmarks/<grid name>/ (ignored by git)."""
    return REPO_ROOT / "runs" / "benchmarks" / grid.name


def read_record(path: Path) -> dict | None:
    """A cell's record, or None when there is none (a half-written file never exists: writes are atomic)."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def run_grid(grid: Grid, results_dir: Path | None = None, runs_dir: Path | None = None, *,
             only: list[str] | None = None, retry_failed: bool = False, timeout_s: float | None = None,
             progress: bool = True) -> GridRun:
    """Run every cell that has no record yet, in grid order; a failing cell is recorded and the rest go on.

    Args:
        only: shell patterns over cell ids (e.g. `*lora*seed0`); other cells are left alone.
        retry_failed: rerun cells whose record says "failed" (by default a failed cell counts as done).
        timeout_s: stop a cell after this many seconds and record it as failed.
    """
    results_dir = Path(results_dir or default_results_dir(grid))
    runs_dir = Path(runs_dir or default_runs_dir(grid))
    cells = [c for c in grid.cells() if not only or any(fnmatch.fnmatch(c.id, p) for p in only)]
    if only and not cells:
        # Said before anything runs: a pattern without wildcards is the usual slip, and "ran 0 cells" hid it.
        raise PeftlabError(f"--only {' '.join(only)} matches no cell of {grid.name}; patterns are shell globs over "
                           f"cell ids such as {grid.cells()[0].id!r}: use e.g. '*{only[0].strip('*')}*'")

    results_dir.mkdir(parents=True, exist_ok=True)
    runs_dir.mkdir(parents=True, exist_ok=True)

    summary, pending = GridRun(), []
    for cell in cells:
        record = read_record(results_dir / f"{cell.id}.json")
        if is_done(record, retry_failed):
            summary.skipped.append(cell.id)
            if record.get("status") != "ok":
                summary.kept_failures.append(cell.id)
        else:
            pending.append(cell)

    bar = tqdm(total=len(cells), initial=len(summary.skipped), unit="cell", desc=grid.name, disable=not progress,
               dynamic_ncols=True)
    for cell in pending:
        bar.set_postfix_str(cell.id)
        with claim(runs_dir / f"{cell.id}.lock") as claimed:
            # Another runner of this grid (a second terminal) has this cell, or finished it since we looked.
            if not claimed or is_done(read_record(results_dir / f"{cell.id}.json"), retry_failed):
                summary.skipped.append(cell.id)
                bar.update()
                continue
            record = run_cell(grid, cell, runs_dir, timeout_s=timeout_s)
            write_record(results_dir / f"{cell.id}.json", record)
        summary.launched.append(cell.id)
        if record["status"] == "ok":
            found = (f"test accuracy {record['metrics']['test']['accuracy']:.4f}" if "metrics" in record
                     else f"{record['measurement']['kind']} measured")
            line = f"ok      {cell.id}: {found} ({record['wall_time_s']:.0f} s)"
        else:
            summary.failed.append(cell.id)
            line = f"FAILED  {cell.id}: {record['error']}"
        if progress:
            bar.write(line)
        bar.update()
    bar.close()
    return summary


def is_done(record: dict | None, retry_failed: bool) -> bool:
    """Whether a cell with this record is skipped: any record counts, a failed one only without retry_failed."""
    return record is not None and (record.get("status") == "ok" or not retry_failed)


@contextlib.contextmanager
def claim(lock: Path):
    """Hold `lock` (a file naming this process) while a cell runs, so two runners of one grid never run the same
    cell; yields False when a live process holds it. A lock left by a killed runner is taken over."""
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            holder = int(lock.read_text() or 0)
            os.kill(holder, 0)  # raises when no such process: the lock is stale
            yield False
            return
        except (ValueError, ProcessLookupError, FileNotFoundError):
            lock.unlink(missing_ok=True)
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    try:
        yield True
    finally:
        lock.unlink(missing_ok=True)


def cell_command(grid: Grid, cell: Cell, run_dir: Path | str) -> list[str]:
    """The script arguments of a cell (a recipe or a job): the grid's overrides, then the run folder (replaced if a
    partial run is there). A fusion cell gets its method and its ingredients' run folders (beside its own) instead."""
    if cell.ingredients:
        runs = ",".join(str(Path(run_dir).parent / ingredient) for ingredient in cell.ingredients)
        return [*cell.program.command(), *cell.overrides, f"runs={runs}", f"output_dir={run_dir}", "overwrite=true"]
    config = ["--config", grid.config] if grid.config else []
    extend = [f"multitask.extend={Path(run_dir).parent / cell.extends}"] if cell.extends else []
    return [*cell.program.command(), *config, *cell.overrides, *extend, f"output_dir={run_dir}", "overwrite=true"]


def missing_ingredient(grid: Grid, cell: Cell, runs_dir: Path) -> str | None:
    """Why a fusion cell, or a cell that extends another's run, cannot run (a run folder it needs is not there:
    runs/ is not committed), with the command that re-runs it, or None."""
    for ingredient in (*cell.ingredients, *([cell.extends] if cell.extends else [])):
        if not (runs_dir / ingredient / "metrics.json").is_file():
            # Its committed record would make the runner skip it: re-run into another records folder.
            return (f"the run folder of {ingredient} is missing ({shown_path(runs_dir / ingredient)}); re-run it: "
                    f"python benchmarks/run.py {shown_path(grid.path)} --only {ingredient} --runs "
                    f"{shown_path(runs_dir)} --results <a scratch folder>")
    return None


def run_cell(grid: Grid, cell: Cell, runs_dir: Path, *, timeout_s: float | None = None) -> dict:
    """Run one cell in a subprocess and return its record (status "ok" or "failed", never raising for the cell)."""
    run_dir = runs_dir / cell.id
    log_path = runs_dir / f"{cell.id}.log"  # beside the run folder: the recipe empties that folder when it starts
    command = [sys.executable, *cell_command(grid, cell, run_dir)]
    env = {**os.environ, **grid.env}
    source = source_fingerprint(cell.program)  # taken at launch: the code the subprocess imports
    missing = missing_ingredient(grid, cell, runs_dir)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            if missing:
                returncode, error = None, missing
                log.write(f"error: {error}\n")
            else:
                returncode = subprocess.run(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, timeout=timeout_s).returncode
                error = None if returncode == 0 else error_line(log_path)
        except subprocess.TimeoutExpired:
            returncode, error = None, f"timed out after {timeout_s:g} s"
    wall_time_s = time.perf_counter() - start

    record = {
        "record_version": RECORD_VERSION, "grid": grid.name, "grid_file": shown_path(grid.path), "cell": cell.id,
        "status": "ok", "backbone": cell.backbone, "strategy": cell.strategy, "task": cell.task, "seed": cell.seed,
        "position": cell.position, "kind": cell.program.kind, "program": cell.program.name,
        **({"pair": cell.pair, "side": cell.side} if cell.pair else {}),
        **({"ingredients": list(cell.ingredients)} if cell.ingredients else {}),
        **({"extends": cell.extends} if cell.extends else {}),
        "overrides": list(cell.overrides), "env": grid.env,
        "command": shlex.join(["python", *cell_command(grid, cell, shown_path(run_dir))]),
        "returncode": returncode, "wall_time_s": round(wall_time_s, 2), "log": shown_path(log_path),
        "run_dir": shown_path(run_dir),
    }
    return {**record, **run_outcome(cell.program, run_dir, error, source)}


def run_outcome(program: Program, run_dir: Path, error: str | None, source_sha256: str) -> dict:
    """The part of a record every launcher writes (the grid runner, `peftlab tune`): status, the run folder's
    outputs (metrics, parameters, cost, config, data hash) or the error, and where the numbers come from.

    Args:
        error: why the run failed, or None when it exited normally (then a missing metrics.json is the error).
        source_sha256: `source_fingerprint(program)`, taken when the run started.
    """
    outcome: dict = {"status": "ok"}
    metrics_path = Path(run_dir) / "metrics.json"
    if error is None and not metrics_path.is_file():
        error = f"the {program.kind} exited 0 but wrote no {shown_path(metrics_path)}"
    if error is not None:
        outcome.update(status="failed", error=error)
    elif program.measurement:
        outcome.update(_measurement_outputs(Path(run_dir)))
    else:
        outcome.update(_run_outputs(program.task, Path(run_dir)))
    # The load average says how much other work shared the machine with the run (timings depend on it).
    outcome.update(environment=environment(), git={**git_state(), "source_sha256": source_sha256},
                   load_average=[round(load, 2) for load in os.getloadavg()],
                   finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    return outcome


def _run_outputs(task: str | None, run_dir: Path) -> dict:
    """Metrics, parameter counts, cost and data hash of a finished run folder."""
    from peftlab.training import resolve_mixed_precision

    metrics = json.loads((run_dir / "metrics.json").read_text())
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    return {
        "metrics": {key: metrics[key] for key in ("test", "validation", "best_step", "global_step", "stopped_early")},
        "parameters": metrics["parameters"],
        "train_time_s": metrics["train_time_s"],
        "samples_per_s": metrics["samples_per_s"],
        "peak_memory_mb": metrics["peak_memory_mb"],
        "cpu_threads": metrics.get("cpu_threads"),  # per process; absent from runs made before it was recorded
        "phases_s": metrics.get("phases_s"),  # absent from runs made before the engine timed its phases
        "throughput": metrics.get("throughput"),  # tokens and model FLOPs of the training steps (peftlab.throughput)
        "data_rules": metrics.get("data_rules"),  # what `auto` chose from the data (length, weights, metric) and why
        # An ensemble's members sit beside its model/ (which holds only how to combine them).
        "model_size_bytes": folder_size(run_dir / "model") + folder_size(run_dir / "members"),
        # Forward passes per prediction: one for a trained model or a soup, one per member for an ensemble.
        "inference_cost": metrics.get("inference_cost", 1),
        **({"fusion": metrics["fusion"]} if "fusion" in metrics else {}),
        # A multi-task run: each task's own parameters and scores, and how its tasks shared the base.
        **({key: metrics[key] for key in ("tasks", "multitask", "forgetting") if key in metrics}),
        # `auto` precision depends on the machine: record what it resolved to here (bf16 where the CPU has it). A job
        # that computes in its own precision (scikit-learn's fp64) names it in its metrics.json.
        "mixed_precision": (metrics.get("mixed_precision")
                            or resolve_mixed_precision(config["train"]["mixed_precision"])),
        "config": config,
        "data": _data_or_error(task, config["data"]),
    }


def _measurement_outputs(run_dir: Path) -> dict:
    """What a measurement job (`Program.measurement`) found, with the config and cost it ran under."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {"measurement": metrics["measurement"], "train_time_s": metrics.get("train_time_s"),
            "cpu_threads": metrics.get("cpu_threads"), "peak_memory_mb": metrics.get("peak_memory_mb"),
            "config": yaml.safe_load((run_dir / "config.yaml").read_text())}


def _data_or_error(task: str | None, data: dict) -> dict | None:
    # The run itself succeeded: a data source that cannot be re-read here (a Hub outage) must not lose its record.
    try:
        return data_fingerprint(task, data)
    except Exception as err:  # noqa: BLE001 - any loader failure becomes a note in the record
        return {"sha256": None, "error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"}


def error_line(log_path: Path) -> str:
    """The line that says why a recipe failed: its `error: ...` line, else the log's last line (a traceback's end)."""
    lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    if errors:
        return errors[-1][len("error: "):]
    return lines[-1] if lines else "the recipe failed without output"


def write_record(path: Path, record: dict) -> None:
    """Write a record atomically: a runner killed mid-write leaves no half file that would count as done."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)


def shown_path(path: Path) -> str:
    """A path relative to the repository when it is inside it (records stay the same on every checkout)."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("grid", help="a grid file, e.g. benchmarks/grids/smoke.yaml")
    parser.add_argument("--results", type=Path, help="records folder (default: benchmarks/results/<grid>)")
    parser.add_argument("--runs", type=Path, help="run folders (default: runs/benchmarks/<grid>)")
    parser.add_argument("--only", action="append", metavar="PATTERN",
                        help="run only cells whose id matches this shell pattern (repeatable)")
    parser.add_argument("--retry-failed", action="store_true", help="rerun cells recorded as failed")
    parser.add_argument("--timeout", type=float, metavar="SECONDS", help="record a cell as failed after this long")
    parser.add_argument("--list", action="store_true", help="print each cell's status and command, run nothing")
    return parser.parse_args(argv)


def list_cells(grid: Grid, results_dir: Path, runs_dir: Path) -> None:
    """Each cell's status (ok, failed or todo) and the command that runs it."""
    for cell in grid.cells():
        record = read_record(results_dir / f"{cell.id}.json")
        status = record["status"] if record else "todo"
        print(f"{status:7} {cell.id}\n        python {' '.join(cell_command(grid, cell, runs_dir / cell.id))}")


def main(argv=None) -> int:
    """`benchmarks/run.py GRID`: run the grid's missing cells; exit 1 when a cell failed, 2 on a bad grid."""
    args = parse_args(argv)
    try:
        grid = load_grid(args.grid)
    except PeftlabError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    results_dir = args.results or default_results_dir(grid)
    runs_dir = args.runs or default_runs_dir(grid)
    if args.list:
        list_cells(grid, results_dir, runs_dir)
        return 0
    # A plain `kill` of the runner should stop its cell too: SystemExit inside subprocess.run kills the child.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    done = run_grid(grid, results_dir, runs_dir, only=args.only, retry_failed=args.retry_failed,
                    timeout_s=args.timeout)
    print(f"{grid.name}: ran {len(done.launched)} cells ({len(done.failed)} failed), "
          f"skipped {len(done.skipped)} with a record in {results_dir}")
    if done.failed or done.kept_failures:
        print(f"failed cells: {', '.join(done.failed + done.kept_failures)}; each record holds its error line; "
              "fix the cause, then rerun them with --retry-failed")
    return 1 if done.failed else 0


if __name__ == "__main__":
    sys.exit(main())
