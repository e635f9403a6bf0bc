"""Run a benchmark grid: one subprocess per cell, one JSON record per cell; cells with a record are skipped.

    python benchmarks/run.py benchmarks/grids/text_minilm.yaml                 # fill in the missing cells
    python benchmarks/run.py benchmarks/grids/text_minilm.yaml --list          # cells, commands and status
    python benchmarks/run.py benchmarks/grids/text_minilm.yaml --only '*lora-r8*seed0'
    nice -n 5 python benchmarks/run.py benchmarks/grids/text_minilm.yaml       # on a shared machine

Records go to benchmarks/results/<grid>/ (committed), run folders to runs/benchmarks/<grid>/ (ignored by git).
Then render tables and the plot: python benchmarks/report.py benchmarks/results/<grid>
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from harness.grid import load_grid
from harness.runner import cell_command, default_results_dir, default_runs_dir, read_record, run_grid
from peftlab.errors import PeftlabError


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


def list_cells(grid, results_dir: Path, runs_dir: Path) -> None:
    for cell in grid.cells():
        record = read_record(results_dir / f"{cell.id}.json")
        status = record["status"] if record else "todo"
        print(f"{status:7} {cell.id}\n        python {' '.join(cell_command(grid, cell, runs_dir / cell.id))}")


def main(argv=None) -> int:
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
