"""Tables of paired cells (a grid with `pairs`): side b against side a, as the median ratio over alternating pairs.

The speed grids (benchmarks/grids/speed_*.yaml) pair the `transformers.Trainer` baseline (a job) with a recipe, or
a recipe with itself under another setting; their seeds are the repeats. Per run:
    training phase s = feature cache + training steps + evaluation + checkpointing (the run's own `phases_s`)
    samples/s        = epochs x training examples / training phase s
    wall s           = the whole subprocess (imports, data, model, training, test, saving)
    peak MB          = the run's peak memory (max RSS on CPU)
Each side shows its median run (the lower median for an even count); b/a is the median over the (a, b) pairs of the
samples/s ratio: the sides alternate, so the runs of a pair met about the same load from other jobs.
Where a run recorded model FLOPs (peftlab.throughput: full fine-tuning of a transformer text model):
    model TFLOP/s    = model FLOPs of its training steps / seconds of training steps (evaluation excluded)
    of bf16 ceiling  = side b's model FLOP/s / the grid's bf16 matmul ceiling (the `matmul_ceiling` job's cells, run
                       in the same invocation after the pairs: the median over seeds of their mean bf16 FLOP/s)

Speed records made before the harness ran the speed cases (benchmarks/results/speed/<case>.json, one file per case,
written by the retired benchmarks/speed.py) hold the same summaries and render through the same table.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

# Where the retired speed.py's table goes in a README; a pairs grid's table uses the grid's report markers.
CASE_MARKERS = ("<!-- speed:table -->", "<!-- /speed:table -->")
TRAINING_PHASES = ("feature_cache", "train_steps", "evaluation", "checkpointing")


def is_pairs(records: list[dict]) -> bool:
    """Whether the records come from a grid with pairs (beside which only measurements stand)."""
    return all("pair" in r for r in records if "measurement" not in r)


def bf16_ceiling(records: list[dict]) -> dict | None:
    """The grid's matmul ceiling: the median over its finished `matmul_ceiling` cells of their mean bf16 and fp32
    FLOP/s, with their threads and rows, or None when it has none."""
    found = [r["measurement"] for r in records if r["status"] == "ok"
             and (r.get("measurement") or {}).get("kind") == "matmul_ceiling"]
    if not found:
        return None
    return {"bf16": statistics.median(m["bf16"]["mean"] for m in found),
            "fp32": statistics.median(m["fp32"]["mean"] for m in found),
            "threads": sorted({m["threads"] for m in found}), "rows": sorted({m["rows"] for m in found}),
            "cells": len(found)}


def ceiling_line(ceiling: dict) -> str:
    """One line under the pairs table saying what the bf16 ceiling was."""
    threads = ", ".join(map(str, ceiling["threads"]))
    rows = ", ".join(f"{rows:,}" for rows in ceiling["rows"])
    cells = f"median of {ceiling['cells']} cells" if ceiling["cells"] > 1 else "one cell"
    return (f"Matmul ceiling (the `matmul_ceiling` job, {cells}, {threads} thread(s), the model's linear layers on "
            f"{rows} rows): bf16 {ceiling['bf16'] / 1e9:.0f} GFLOP/s, fp32 {ceiling['fp32'] / 1e9:.0f} GFLOP/s "
            f"(bf16 {ceiling['bf16'] / ceiling['fp32']:.1f}x fp32).")


def load_case_records(results_dir: Path) -> list[dict]:
    """The per-case speed records in `results_dir` (files with a `case`), in the order they were tabulated."""
    records = [json.loads(p.read_text()) for p in Path(results_dir).glob("*.json")]
    cases = [r for r in records if isinstance(r, dict) and "case" in r and "cell" not in r]
    order = ("lora", "head", "full", "vision-lora", "vision-head", "vision-full")
    return sorted(cases, key=lambda r: (order.index(r["case"]) if r["case"] in order else len(order), r["case"]))


def pair_summaries(records: list[dict]) -> list[dict]:
    """One summary per pair (in grid order) from a pairs grid's cell records; failed cells are left out. With a
    matmul ceiling among the records, a pair whose side b recorded model FLOP/s gets `fraction_of_bf16_ceiling`."""
    finished = sorted((r for r in records if r["status"] == "ok" and "pair" in r),
                      key=lambda r: (r["position"]["backbone"], r["position"]["task"], r["position"]["strategy"]))
    runs: dict[str, dict[str, list[dict]]] = {}
    for record in sorted(finished, key=lambda r: r["seed"]):
        runs.setdefault(record["pair"], {"a": [], "b": []})[record["side"]].append(_run_figures(record))
    order = list(dict.fromkeys(r["pair"] for r in finished))
    summaries = [{**summarise(pair, runs[pair]), "load_average": [r["load_average"] for r in finished
                                                                   if r["pair"] == pair and "load_average" in r]}
                 for pair in order if runs[pair]["a"] and runs[pair]["b"]]
    ceiling = bf16_ceiling(records)
    for summary in summaries:
        if ceiling and summary["b"].get("model_flops_per_s"):
            summary["fraction_of_bf16_ceiling"] = summary["b"]["model_flops_per_s"] / ceiling["bf16"]
    return summaries


def _run_figures(record: dict) -> dict:
    """One run's figures, in the shape the table reads, from its cell record."""
    config = record["config"]
    phases = record.get("phases_s") or {}
    train_phase_s = sum(phases.get(p, 0.0) for p in TRAINING_PHASES)
    train_rows = ((record.get("data") or {}).get("rows") or {}).get("train") or config["data"]["max_train_samples"]
    spec = {"kind": "recipe" if record["kind"] == "recipe" else record["program"].split("_")[0],
            "strategy": config["strategy"], "epochs": config["train"]["epochs"], "train_samples": train_rows,
            "eval_samples": config["data"]["max_eval_samples"], "seed": record["seed"],
            "cpu_threads": record.get("cpu_threads")}  # per process; absent from records made before it was kept
    if record["kind"] == "recipe":
        spec["cache"] = config["train"]["cache_frozen_features"]
    return {"spec": spec, "cell": record["cell"], "wall_s": record["wall_time_s"], "train_phase_s": train_phase_s,
            "samples_per_s": config["train"]["epochs"] * train_rows / max(train_phase_s, 1e-9),
            "peak_memory_mb": record["peak_memory_mb"], "test_accuracy": record["metrics"]["test"]["accuracy"],
            "mixed_precision": record.get("mixed_precision"),
            "model_flops_per_s": (record.get("throughput") or {}).get("model_flops_per_s")}


def summarise(case: str, runs: dict[str, list[dict]]) -> dict:
    """Each side's median run (the lower median for an even count) and the median ratio over the (a, b) pairs:
    the sides alternate, so the runs of a pair met about the same load from other jobs."""
    a, b = (sorted(runs[side], key=lambda r: r["samples_per_s"])[(len(runs[side]) - 1) // 2] for side in "ab")
    pairs = list(zip(runs["a"], runs["b"]))
    pair_ratios = [rb["samples_per_s"] / ra["samples_per_s"] for ra, rb in pairs]
    return {"case": case, "a": a, "b": b, "runs": runs, "pair_ratios": pair_ratios,
            "ratio_samples_per_s": statistics.median(pair_ratios),
            "ratio_wall": statistics.median(ra["wall_s"] / rb["wall_s"] for ra, rb in pairs),
            "accuracy_difference_points": 100 * (b["test_accuracy"] - a["test_accuracy"])}


def pairs_table(summaries: list[dict]) -> str:
    """A Markdown table of the pair summaries: the (a) and (b) figures of each pair and their ratios."""
    lines = ["| case | side | samples/s | training phase s | wall s | peak MB | test acc | b/a samples/s | "
             "model TFLOP/s | of bf16 ceiling |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for record in summaries:
        for side in "ab":
            run = record[side]
            cached = run["spec"]["strategy"] == "head" and run["spec"].get("cache")
            uncached = run["spec"]["strategy"] == "head" and not cached
            label = run["spec"]["kind"] + (" cached" if cached else " uncached" if uncached else "")
            threads = run["spec"].get("cpu_threads")
            label += f", {threads} thread{'s' if threads > 1 else ''}" if threads else ""
            count = len(record["runs"][side])
            if count > 1:
                label += f" ({'lower ' if count % 2 == 0 else ''}median of {count})"
            ratio = f"**{record['ratio_samples_per_s']:.2f}x**" if side == "b" else ""
            if side == "b" and len(record["pair_ratios"]) > 1:
                ratio += " (median of " + ", ".join(f"{r:.2f}" for r in record["pair_ratios"]) + ")"
            flops = f"{run['model_flops_per_s'] / 1e12:.3f}" if run.get("model_flops_per_s") else ""
            fraction = (f"{record['fraction_of_bf16_ceiling']:.0%}" if side == "b" and "fraction_of_bf16_ceiling"
                        in record else "")
            spec = run["spec"]
            case = f"{record['case']} ({spec['train_samples']} train, {spec['eval_samples']} test, {spec['epochs']} ep)"
            lines.append(f"| {case if side == 'a' else ''} | {side}: {label} | {run['samples_per_s']:.1f} | "
                         f"{run['train_phase_s']:.1f} | {run['wall_s']:.1f} | {run['peak_memory_mb']:.0f} | "
                         f"{run['test_accuracy']:.4f} | {ratio} | {flops} | {fraction} |")
    return "\n".join(lines)
