"""A grid's fusion row: `peftlab fuse` on other cells' run folders, written as a record the report reads like a cell.

    python benchmarks/fuse_cell.py method=greedy-soup runs=runs/x/a__seed0,runs/x/a__seed1 output_dir=runs/x/soup

A harness job (`fuse` in peftlab.harness.programs): a grid row `full-greedy-soup: {fuse: full, method: greedy-soup}`
runs it once per backbone and task over the run folders of the `full` cells of every seed (peftlab.harness.grid).
The fusion is `peftlab.fuse.fuse`, scored in fp32 on the first run's validation and test splits; this adds what a
record reads beside the metrics:
- parameters: a soup's own count (a LoRA soup is one adapter of the summed rank), an ensemble's members' summed;
- train_time_s: the ingredients' training plus the fusion (scoring each ingredient, the greedy trials, the fused
  model), so the cost table shows what the fused model took to make; fusion_time_s is the fusion alone;
- samples_per_s: none (nothing trains); mixed_precision "no" (fp32 scoring); best/global step: none.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from peftlab.errors import PeftlabError
from peftlab.fuse import fuse
from peftlab.runs import METRICS_FILE
from peftlab.training import peak_memory_mb

KEYS = ("method", "runs", "output_dir", "overwrite")


def parse(argv: list[str]) -> dict[str, str]:
    """The job's `key=value` arguments (method, runs, output_dir; overwrite optional); one-line error otherwise."""
    args = dict(arg.partition("=")[::2] for arg in argv)
    unknown = sorted(set(args) - set(KEYS))
    if unknown or not {"method", "runs", "output_dir"} <= set(args):
        raise PeftlabError(f"usage: fuse_cell.py method=<method> runs=<run>,<run>,... output_dir=<folder> "
                           f"[overwrite=true] (got {' '.join(argv)})")
    return args


def summed_parameters(run_dirs: list[Path]) -> dict:
    """An ensemble's parameter counts: its members' summed (it stores and runs every one)."""
    counts = [json.loads((run_dir / METRICS_FILE).read_text())["parameters"] for run_dir in run_dirs]
    total = {key: sum(count[key] for count in counts) for key in ("trainable", "total", "head",
                                                                    "trainable_without_head")}
    return {**total, "trainable_percent": 100 * total["trainable"] / total["total"]}


def main(argv: list[str]) -> dict:
    """Fuse the runs and complete the fused folder's metrics.json for the harness record; returns it."""
    args = parse(argv)
    run_dirs = [Path(run) for run in args["runs"].split(",")]
    start = time.perf_counter()
    metrics = fuse(run_dirs, args["method"], args["output_dir"], overwrite=args.get("overwrite") == "true")
    fusion_time_s = time.perf_counter() - start
    trained = [json.loads((run_dir / METRICS_FILE).read_text())["train_time_s"] for run_dir in run_dirs]
    metrics |= {
        "best_step": None, "global_step": None, "stopped_early": None,
        "parameters": metrics.get("parameters") or summed_parameters(run_dirs),
        "train_time_s": round(sum(trained) + fusion_time_s, 2), "fusion_time_s": round(fusion_time_s, 2),
        "samples_per_s": None, "peak_memory_mb": peak_memory_mb(torch.device("cpu")), "mixed_precision": "no",
    }
    (Path(args["output_dir"]) / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except PeftlabError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
