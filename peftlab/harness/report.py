"""Render a grid's records into a Markdown table (LoRA-paper style), CSVs and a plot of accuracy vs parameters.

    python benchmarks/report.py benchmarks/results/text_minilm
    python benchmarks/report.py benchmarks/results/text_minilm --readme benchmarks/README.md   # also refresh README
    python benchmarks/report.py benchmarks/results/glue_roberta_base --split validation       # dev-set protocol
    python benchmarks/report.py benchmarks/results/text_minilm --compare runs/rerun/records    # re-runs reproduce?
    python benchmarks/report.py benchmarks/results/speed_text --readme benchmarks/SPEED.md    # a grid with pairs
(`python -m peftlab.harness.report` is the same command.)

Writes table.md, summary.csv, cells.csv and <metric>_vs_params.png beside the records (or under --out), from the
JSON records alone; --readme replaces the README block between `<!-- report:<grid> -->` and `<!-- /report:<grid> -->`.
A grid with pairs (the speed grids) renders its b-against-a table instead (peftlab.harness.pairs); a folder of the
retired speed.py's per-case records renders that table between `<!-- speed:table -->` markers.
--compare takes a folder of re-run cells (`run.py <grid> --only <cell> --results <folder>`), prints each beside its
committed record and exits 1 unless every re-run lies within its row's spread over seeds; it writes nothing.

Table layout follows the LoRA paper (Hu et al. 2021, Table 2): one row per method with its trainable parameters,
one column per task, then the average; each entry is mean ± std over seeds, in percent. A grid with fusion rows
(`{fuse: <label>, method: ...}`, one fused model over that label's seeds) gets a single value in those rows, two more
columns (the best single seed: the test score of the seed with the best validation score, and the inference cost in
forward passes per prediction) and a second plot, <metric>_vs_inference_cost.png.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import shlex
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from peftlab.errors import PeftlabError
from peftlab.harness import pairs
from peftlab.harness.multitask_report import forgetting_table, is_multitask, multitask_table, read_serving_memory
from peftlab.harness.programs import REPO_ROOT

SPLITS = ("test", "validation")
METRICS = {"accuracy": "accuracy", "macro_f1": "macro-F1"}
PRECISION_NAMES = {"no": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast"}


def load_records(results_dir: Path) -> list[dict]:
    """Every cell record in `results_dir` (`*.json` with a `cell` and a `status`)."""
    records = []
    for path in sorted(Path(results_dir).glob("*.json")):
        record = json.loads(path.read_text())
        if isinstance(record, dict) and {"cell", "status"} <= set(record):
            records.append(record)
    if not records:
        raise PeftlabError(f"no cell records (*.json) in {results_dir}; run the grid first: "
                           "python benchmarks/run.py benchmarks/grids/<grid>.yaml")
    return records


@dataclass
class Stat:
    """Mean and sample standard deviation of one metric over seeds (std 0 for a single seed)."""

    values: list[float]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if self.n > 1 else 0.0


@dataclass
class Row:
    """One (backbone, strategy) row: its finished records per task, in grid order."""

    backbone: str
    strategy: str
    by_task: dict[str, list[dict]] = field(default_factory=dict)

    @property
    def records(self) -> list[dict]:
        return [r for records in self.by_task.values() for r in records]

    @property
    def fused(self) -> bool:
        """Whether this row fuses another row's seeds (one record per task, no seed of its own)."""
        return any(r.get("ingredients") for r in self.records)

    def best_seed(self, task: str, split: str, metric: str) -> float | None:
        """The `split` metric (percent) of the seed with the best validation metric: the single run one would pick
        without looking at the test set (ties: the lower seed)."""
        records = sorted(self.by_task.get(task, []), key=lambda r: (-r["metrics"]["validation"][metric], r["seed"]))
        return 100 * records[0]["metrics"][split][metric] if records else None

    def inference_cost(self) -> list[int]:
        """Distinct forward passes per prediction over this row's records (records made before it was kept: 1)."""
        return sorted({r.get("inference_cost", 1) for r in self.records})

    def stat(self, task: str, split: str, metric: str) -> Stat | None:
        """The metric (in percent) over this row's seeds on `task`, or None when no seed finished."""
        values = [100 * r["metrics"][split][metric] for r in self.by_task.get(task, [])]
        return Stat(values) if values else None

    def average(self, tasks: list[str], split: str, metric: str) -> float | None:
        """Mean over tasks of the per-task means (None unless every task has a result)."""
        stats = [self.stat(task, split, metric) for task in tasks]
        return None if any(s is None for s in stats) else statistics.fmean(s.mean for s in stats)

    def spread(self, tasks: list[str], split: str, metric: str) -> float:
        """Mean over tasks of the per-task std over seeds (the plot's error bar)."""
        stats = [s for s in (self.stat(task, split, metric) for task in tasks) if s is not None]
        return statistics.fmean(s.std for s in stats) if stats else 0.0

    def parameter(self, key: str) -> list[int | float]:
        """Distinct values of one parameter count over this row's records (more than one if heads differ)."""
        return sorted({r["parameters"][key] for r in self.records})

    def cost(self, key: str) -> float:
        """Mean of a cost field (train_time_s, samples_per_s, peak_memory_mb, model_size_bytes) over records; NaN
        where a record has none (a fusion trains nothing, so has no samples/s)."""
        values = [r[key] for r in self.records]
        return float("nan") if None in values else statistics.fmean(values)


@dataclass
class Summary:
    grid: str
    grid_file: str
    tasks: list[str]
    rows: list[Row]
    failed: list[dict]
    records: list[dict]
    commands: list[str] = field(default_factory=list)
    """The runner and report commands that reproduce the tables (set by `render`)."""

    @property
    def seeds(self) -> list[int]:
        return sorted({r["seed"] for r in self.records} - {None})

    @property
    def has_fusions(self) -> bool:
        return any(row.fused for row in self.rows)


def summarize(records: list[dict]) -> Summary:
    """Group finished records into (backbone, strategy) rows and task columns, keeping the grid's order."""
    records = sorted(records, key=lambda r: (r["position"]["backbone"], r["position"]["strategy"],
                                             r["position"]["task"], -1 if r["seed"] is None else r["seed"]))
    finished = [r for r in records if r["status"] == "ok"]
    tasks = list(dict.fromkeys(r["task"] for r in sorted(records, key=lambda r: r["position"]["task"])))
    rows: dict[tuple[str, str], Row] = {}
    for record in finished:
        row = rows.setdefault((record["backbone"], record["strategy"]), Row(record["backbone"], record["strategy"]))
        row.by_task.setdefault(record["task"], []).append(record)
    grids = sorted({r["grid"] for r in records})
    if len(grids) > 1:
        raise PeftlabError(f"the records come from several grids ({', '.join(grids)}); render one grid's folder")
    return Summary(grid=grids[0], grid_file=records[0].get("grid_file", ""), tasks=tasks, rows=list(rows.values()),
                   failed=[r for r in records if r["status"] != "ok"], records=records)


def human_count(n: float) -> str:
    """22,713,216 -> 22.7M, 73,728 -> 73.7k, 770 -> 770."""
    if n >= 1e6:
        return f"{n / 1e6:.1f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}k"
    return f"{n:g}"


def _counts(values: list, fmt) -> str:
    return fmt(values[0]) if len(values) == 1 else f"{fmt(values[0])}–{fmt(values[-1])}"


def _percent(p: float) -> str:
    return f"{p:.3g}%" if p < 100 else "100%"


def results_table(summary: Summary, split: str = "test", metric: str = "accuracy") -> str:
    """The LoRA-paper-style Markdown table: method, trainable parameters, one column per task (+ average)."""
    multi_backbone = len({row.backbone for row in summary.rows}) > 1
    multi_task = len(summary.tasks) > 1
    expected = len(summary.seeds)
    header = (["Backbone"] if multi_backbone else []) + [
        "Method", "# Trainable params (w/o head)", "with head", "% of all"] + summary.tasks + (
        ["Avg."] if multi_task else []) + (
        ["best single seed", "inference cost (forward passes)"] if summary.has_fusions else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * (2 if multi_backbone else 1)
                                                            + ["---:"] * (len(header) - (2 if multi_backbone else 1))) + "|"]
    for row in summary.rows:
        cells = [row.backbone] if multi_backbone else []
        cells += [row.strategy, _counts(row.parameter("trainable_without_head"), human_count),
                  _counts(row.parameter("trainable"), human_count),
                  _counts(row.parameter("trainable_percent"), _percent)]
        for task in summary.tasks:
            stat = row.stat(task, split, metric)
            if stat is None:
                cells.append("—")
                continue
            text = f"{stat.mean:.1f} ± {stat.std:.1f}" if stat.n > 1 else f"{stat.mean:.1f}"
            cells.append(text + (f" (n={stat.n})" if stat.n < (1 if row.fused else expected) else ""))
        if multi_task:
            average = row.average(summary.tasks, split, metric)
            cells.append("—" if average is None else f"{average:.1f}")
        if summary.has_fusions:
            best = [row.best_seed(task, split, metric) for task in summary.tasks]
            cells.append("—" if row.fused or None in best else f"{statistics.fmean(best):.1f}")
            cells.append(_counts(row.inference_cost(), str))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def precision_name(record: dict) -> str:
    """What `train.mixed_precision=auto` resolved to on the machine that ran the cell ("no" is fp32)."""
    return PRECISION_NAMES.get(record.get("mixed_precision"), str(record.get("mixed_precision")))


def cost_table(summary: Summary) -> str:
    """What each method costs, averaged over its finished cells."""
    lines = ["| Method | train time (s) | samples/s | wall time (s) | peak memory (MB) | saved `model/` | precision |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for row in summary.rows:
        name = f"{row.backbone} {row.strategy}" if len({r.backbone for r in summary.rows}) > 1 else row.strategy
        precision = ", ".join(sorted({precision_name(r) for r in row.records}))
        samples_per_s = row.cost("samples_per_s")
        lines.append(f"| {name} | {row.cost('train_time_s'):.0f} | "
                     f"{'—' if math.isnan(samples_per_s) else f'{samples_per_s:.1f}'} | "
                     f"{row.cost('wall_time_s'):.0f} | "
                     f"{row.cost('peak_memory_mb'):.0f} | {row.cost('model_size_bytes') / 2**20:.2f} MB | {precision} |")
    return "\n".join(lines)


def provenance_line(summary: Summary) -> str:
    """Where the numbers come from: record count, commits, package versions, device and data hashes."""
    def distinct(getter) -> str:
        return ", ".join(sorted({str(getter(r)) for r in summary.records if getter(r) is not None}))

    finished = [r for r in summary.records if r["status"] == "ok"]
    env_versions = distinct(lambda r: ", ".join(f"{k} {v}" for k, v in r["environment"]["versions"].items()))
    commits = distinct(lambda r: (r["git"]["sha"] or "?")[:10] + (" (uncommitted changes)" if r["git"]["dirty"] else ""))
    sources = {r["git"].get("source_sha256") for r in summary.records} - {None}
    if sources:
        commits += f", {len(sources)} distinct source tree{'s' if len(sources) > 1 else ''} (git.source_sha256)"
    data = distinct(lambda r: f"{r['task']} {r['data']['sha256'][:12]}" if (r.get("data") or {}).get("sha256") else None)
    precisions = distinct(lambda r: None if "measurement" in r else precision_name(r))  # a measurement trains nothing
    return (f"{len(finished)} finished and {len(summary.failed)} failed cells; seeds {summary.seeds}; "
            f"commit {commits}; {env_versions}; {distinct(lambda r: r['environment']['device'])}"
            f"{f'; precision {precisions}' if precisions else ''}; data sha256 {data or 'n/a'}.")


def failures_list(summary: Summary) -> str:
    return "\n".join(f"- `{r['cell']}`: {r['error']}" for r in summary.failed)


def write_csvs(summary: Summary, out_dir: Path) -> tuple[Path, Path]:
    """`summary.csv` (one row per method and task, mean/std over seeds) and `cells.csv` (one row per record)."""
    summary_path, cells_path = out_dir / "summary.csv", out_dir / "cells.csv"
    with open(summary_path, "w", newline="") as f:
        writer = csv.writer(f)
        stat_columns = [f"{split}_{metric}_{what}" for split in SPLITS for metric in METRICS for what in ("mean", "std")]
        writer.writerow(["backbone", "strategy", "task", "seeds", *stat_columns, "trainable", "trainable_without_head",
                         "trainable_percent", "total", "train_time_s", "samples_per_s", "peak_memory_mb",
                         "model_size_bytes"])
        for row in summary.rows:
            for task, records in row.by_task.items():
                stats = [row.stat(task, split, metric) for split in SPLITS for metric in METRICS]
                params = records[0]["parameters"]
                writer.writerow([row.backbone, row.strategy, task, len(records),
                                 *[f"{v:.4f}" for s in stats for v in (s.mean, s.std)],
                                 params["trainable"], params["trainable_without_head"], params["trainable_percent"],
                                 params["total"],
                                 *[f"{statistics.fmean(r[k] for r in records):.2f}" if records[0][k] is not None
                                   else "" for k in ("train_time_s", "samples_per_s", "peak_memory_mb", "model_size_bytes")]])
    with open(cells_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["cell", "status", "backbone", "strategy", "task", "seed", "test_accuracy", "test_macro_f1",
                         "validation_accuracy", "validation_macro_f1", "trainable", "trainable_without_head",
                         "train_time_s", "samples_per_s", "peak_memory_mb", "model_size_bytes", "wall_time_s",
                         "data_sha256", "git_sha", "error"])
        for r in summary.records:
            ok = r["status"] == "ok"
            metrics = [r["metrics"][s][m] for s in SPLITS for m in METRICS] if ok else [""] * 4
            extra = ([r["parameters"]["trainable"], r["parameters"]["trainable_without_head"], r["train_time_s"],
                      r["samples_per_s"], r["peak_memory_mb"], r["model_size_bytes"]] if ok else [""] * 6)
            writer.writerow([r["cell"], r["status"], r["backbone"], r["strategy"], r["task"], r["seed"], *metrics,
                             *extra, r["wall_time_s"], (r.get("data") or {}).get("sha256", ""), r["git"]["sha"],
                             r.get("error", "")])
    return summary_path, cells_path


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (parameters, score) points that no other point beats with as few or fewer parameters, by parameters."""
    front, best = [], float("-inf")
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best:
            front.append((x, y))
            best = y
    return front


def plot(summary: Summary, path: Path, split: str = "test", metric: str = "accuracy") -> Path:
    """Task-averaged metric against trainable parameters (with head, log x), one marker per method, Pareto front."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = "osD^vP*Xph<>"
    multi_backbone = len({row.backbone for row in summary.rows}) > 1
    points = []
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, row in enumerate(summary.rows):
        y = row.average(summary.tasks, split, metric)
        if y is None:
            continue
        x = statistics.fmean(row.parameter("trainable"))
        label = f"{row.backbone} {row.strategy}" if multi_backbone else row.strategy
        ax.errorbar(x, y, yerr=row.spread(summary.tasks, split, metric), fmt=markers[i % len(markers)],
                    color=plt.cm.tab10(i % 10), markersize=8, capsize=3, label=label)
        points.append((x, y))
    front = pareto_front(points)
    if len(front) > 1:
        ax.step(*zip(*front), where="post", color="grey", linestyle="--", linewidth=1, zorder=0, label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters, head included (log scale)")
    seeds = f"mean ± std over {len(summary.seeds)} seeds" if len(summary.seeds) > 1 else "one seed"
    tasks = summary.tasks[0] if len(summary.tasks) == 1 else f"average of {len(summary.tasks)} tasks"
    ax.set_ylabel(f"{split} {METRICS[metric]} (%)")
    ax.set_title(f"{summary.grid}: {tasks}, {seeds}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_inference_cost(summary: Summary, path: Path, split: str = "test", metric: str = "accuracy") -> Path:
    """Metric against forward passes per prediction, per fused family: each of its runs, their mean ± std, the best
    run by validation, and each fusion of them (soups at 1 pass, ensembles at one per member). The single runs are
    the fused ones as the fusion scored them (fp32, in its metrics.json), so both sides are scored alike."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families: dict[tuple[str, str], list[Row]] = {}
    for row in summary.rows:
        if row.fused:
            family = row.records[0]["ingredients"][0].split("__")[2]  # the ingredients' strategy label
            families.setdefault((row.backbone, family), []).append(row)
    markers = {"ensemble": "^", "uniform-soup": "s", "greedy-soup": "D"}
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, ((backbone, family), fused_rows) in enumerate(families.items()):
        color, shift = plt.cm.tab10(i % 10), 0.06 * (i - (len(families) - 1) / 2)  # families side by side
        name = family if len({b for b, _ in families}) == 1 else f"{backbone} {family}"
        # Single-task view: the first task's ingredients (a fusion fuses the runs of one task).
        ingredients = fused_rows[0].records[0]["fusion"]["ingredients"]
        values = [100 * i[split][metric] for i in ingredients]
        ax.scatter([1 + shift - 0.02] * len(values), values, color=color, s=12, alpha=0.5)
        ax.errorbar(1 + shift, statistics.fmean(values), yerr=Stat(values).std, fmt="o", color=color, capsize=3,
                    label=f"{name}: single runs, mean ± std")
        best = max(ingredients, key=lambda i: i["validation"][metric])
        ax.scatter(1 + shift + 0.02, 100 * best[split][metric], marker="*", s=120, color=color,
                   label=f"{name}: best run by validation")
        for row in fused_rows:
            method = row.records[0]["fusion"]["method"]
            ax.scatter(statistics.fmean(row.inference_cost()) + shift, row.average(summary.tasks, split, metric),
                       marker=markers.get(method, "x"), s=60, color=color, edgecolors="black", label=f"{name}: {method}")
    costs = sorted({c for rows in families.values() for row in rows for c in row.inference_cost()} | {1})
    ax.set_xscale("log", base=2)
    ax.set_xticks(costs, [str(c) for c in costs])
    ax.set_xlim(min(costs) / 1.5, max(costs) * 1.5)
    ax.set_xlabel("inference cost: forward passes per prediction")
    ax.set_ylabel(f"{split} {METRICS[metric]} (%), scored in fp32 by the fusion")
    ax.set_title(f"{summary.grid}: single runs, soups and ensembles of {len(values)} seeds")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def render(results_dir: Path, out_dir: Path | None = None, *, split: str = "test", metric: str = "accuracy",
           command: str = "") -> tuple[Summary, dict[str, Path]]:
    """Write table.md, summary.csv, cells.csv and the plot for one grid's records into `out_dir` (default: there).

    Args:
        command: the report command line, printed under the tables so readers can reproduce them.
    Returns the summary and the paths written (keys table, summary_csv, cells_csv, plot).
    """
    if split not in SPLITS or metric not in METRICS:
        raise PeftlabError(f"split must be one of {SPLITS} and metric one of {tuple(METRICS)}")
    out_dir = Path(out_dir or results_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(load_records(results_dir))
    paths = dict(zip(("summary_csv", "cells_csv"), write_csvs(summary, out_dir)))
    paths["plot"] = plot(summary, out_dir / f"{metric}_vs_params.png", split, metric)
    if summary.has_fusions:
        paths["cost_plot"] = plot_inference_cost(summary, out_dir / f"{metric}_vs_inference_cost.png", split, metric)
    paths["table"] = out_dir / "table.md"
    summary.commands = [run_command(summary, results_dir), command or f"python benchmarks/report.py {results_dir}"]
    paths["table"].write_text(markdown_report(summary, split, metric, plot_link=paths["plot"].name,
                                              cost_plot_link=paths["cost_plot"].name if "cost_plot" in paths else None,
                                              serving_memory=read_serving_memory(results_dir)))
    return summary, paths


def run_command(summary: Summary, results_dir: Path) -> str:
    """The runner command that fills `results_dir` (with --results when that is not the grid's default folder), or
    the `peftlab tune` command of a study's trial records."""
    study = summary.records[0].get("study")
    if study:
        return study["command"]
    default = REPO_ROOT / "benchmarks" / "results" / summary.grid
    elsewhere = [] if Path(results_dir).resolve() == default.resolve() else ["--results", str(results_dir)]
    return shlex.join(["python", "benchmarks/run.py", summary.grid_file, *elsewhere])


def markdown_report(summary: Summary, split: str, metric: str, *, plot_link: str,
                    cost_plot_link: str | None = None, serving_memory: dict | None = None) -> str:
    """The results table (multi-task runs: the per-task tables of peftlab.harness.multitask_report), the cost table,
    failures, the plots and the commands that reproduce them.

    Args:
        serving_memory: a multi-task grid's `serving_memory.json` (benchmarks/serve_load.py --memory), if measured.
    """
    seeds = (f"mean ± std over seeds {', '.join(map(str, summary.seeds))}" if len(summary.seeds) > 1
             else f"seed {summary.seeds[0]}")
    parts = [
        f"**{summary.grid}** — {split} {METRICS[metric]} (%), {seeds}. Trainable parameters counted without the "
        "task head (the LoRA paper's rule), then with it, and as a share of all parameters.",
        "", results_table(summary, split, metric), "",
        *(multitask_section(summary, split, metric, serving_memory) if is_multitask(summary.records) else []),
        *(["Fusion rows (`peftlab fuse`) are one model made from the seeds of the row they name, scored once in fp32 "
           "(the other rows are the recipe's bf16-autocast evaluation where the CPU has it); their train time is the "
           "ingredients' training plus the fusion. Best single seed: the test score of the seed with the best "
           "validation score. Inference cost: forward passes per prediction (an ensemble runs each member).", ""]
          if summary.has_fusions else []),
        "Cost per cell, mean over seeds and tasks. Train time and samples/s are the recipe's own (training steps and "
        "evaluations; samples/s counts training steps only); wall time is the whole subprocess (imports, data, "
        "test). Peak memory is the process's max RSS on CPU, CUDA max allocated on GPU. `model/` is what a run "
        "saves: an adapter, the trained tensors, or the whole model for `full`. Precision is what the recipe's "
        "`train.mixed_precision=auto` chose on the machine that ran it: bf16 autocast where the CPU has AVX512-BF16 "
        "(or on a GPU), else fp32; from 2026-12-03, fp32 on a CPU for convolutional backbones that train through "
        "their convolutions (every strategy but head).",
        "", cost_table(summary), "",
    ]
    if summary.failed:
        parts += ["Failed cells (from their records):", "", failures_list(summary), ""]
    parts += [f"![{split} {METRICS[metric]} against trainable parameters]({plot_link})", "",
              *([f"![{split} {METRICS[metric]} against inference cost]({cost_plot_link})", ""] if cost_plot_link
                else []),
              f"Provenance: {provenance_line(summary)}", "", "Reproduce:", "", "```", *summary.commands, "```", ""]
    return "\n".join(parts)


def multitask_section(summary: Summary, split: str, metric: str, serving_memory: dict | None) -> list[str]:
    """The per-task table of a multi-task grid (above: each cell's mean over its tasks), its forgetting table if the
    grid extended a shared adapter, and what the columns count."""
    parts = [f"Per task: {split} {METRICS[metric]} (%) of each task, mean ± std over seeds. Adapters: LoRA "
             "parameters per task, or one adapter shared by the tasks; heads: each task's own; trained in all: what "
             "the row's runs trained together (one run per task: their sum). Serving memory: the resident memory "
             "(RSS) of `peftlab serve` processes holding the row's runs after one request per task "
             + (f"(seed {serving_memory['seed']}; {serving_memory['note']})" if serving_memory else "(not measured)")
             + ".", "", multitask_table(summary.records, split, metric, serving_memory), ""]
    forgetting = forgetting_table(summary.records, split, metric)
    if forgetting:
        parts += ["Forgetting: each earlier task's score before and after its shared adapter trained on the new "
                  "task alone (the earlier heads frozen; points, mean ± std over seeds).", "", forgetting, ""]
    return parts


def update_readme(readme: Path, grid: str, block: str) -> None:
    """Replace the text between `<!-- report:<grid> -->` and `<!-- /report:<grid> -->` in `readme` with `block`."""
    write_between_markers(readme, f"<!-- report:{grid} -->", f"<!-- /report:{grid} -->", block, what=f"the {grid} tables")


def write_between_markers(path: Path, start: str, end: str, block: str, *, what: str) -> None:
    """Replace the text between the markers `start` and `end` in `path` with `block` (`what` names it in errors).
    A marker is a line of its own: one quoted inside a line (a command's comment naming it) is text."""
    text = Path(path).read_text()
    pattern = re.compile("^" + re.escape(start) + r"$.*?^" + re.escape(end) + "$", re.S | re.M)
    if not pattern.search(text):
        raise PeftlabError(f"{path} has no '{start}' ... '{end}' markers; add them where {what} should go")
    Path(path).write_text(pattern.sub(lambda _: f"{start}\n{block.rstrip()}\n{end}", text))


def relative_link(target: Path, from_dir: Path) -> str:
    """A Markdown link path from `from_dir` to `target`."""
    return Path(os.path.relpath(Path(target).resolve(), Path(from_dir).resolve())).as_posix()


def compare_reruns(summary: Summary, reruns: list[dict], split: str = "test",
                   metric: str = "accuracy") -> tuple[str, bool]:
    """A Markdown table of re-run cells against their committed records, and whether every re-run is reproduced.

    A re-run reproduces its cell when the metric moved by no more than the spread of its row over seeds (the sample
    std of the committed seeds, in points): same seed, same code, same data should land inside that band.
    """
    committed = {r["cell"]: r for r in summary.records if r["status"] == "ok"}
    rows = {(row.backbone, row.strategy): row for row in summary.rows}
    lines = [f"| cell | committed {metric} | re-run | difference (points) | seed std (points) | reproduced |",
             "|---|---:|---:|---:|---:|---|"]
    reproduced = True
    for rerun in sorted(reruns, key=lambda r: r["cell"]):
        original = committed.get(rerun["cell"])
        if original is None or rerun["status"] != "ok":
            why = "no committed record" if original is None else f"re-run failed: {rerun.get('error', '')}"
            lines.append(f"| {rerun['cell']} |  |  |  |  | no ({why}) |")
            reproduced = False
            continue
        before, after = (100 * r["metrics"][split][metric] for r in (original, rerun))
        stat = rows[(original["backbone"], original["strategy"])].stat(original["task"], split, metric)
        within = abs(after - before) <= stat.std
        reproduced &= within
        lines.append(f"| {rerun['cell']} | {before:.2f} | {after:.2f} | {after - before:+.2f} | {stat.std:.2f} | "
                     f"{'yes' if within else 'no'} |")
    return "\n".join(lines), reproduced


def render_pairs(results_dir: Path, out_dir: Path | None = None, *, command: str = "") -> tuple[str, str, Path]:
    """table.md of a pairs grid's records (or of the retired speed.py's case records) in `out_dir` (default: there).

    Returns the README block, the grid name it belongs under (None for case records: their `speed:table` markers)
    and the table's path.
    """
    out_dir = Path(out_dir or results_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cases = pairs.load_case_records(results_dir)
    if cases:
        table = pairs.pairs_table(cases)
        (out_dir / "table.md").write_text(table + "\n")
        return table, None, out_dir / "table.md"
    summary = summarize(load_records(results_dir))
    summary.commands = [run_command(summary, results_dir), command or f"python benchmarks/report.py {results_dir}"]
    ceiling = pairs.bf16_ceiling(summary.records)
    block = "\n".join([pairs.pairs_table(pairs.pair_summaries(summary.records)), "",
                       *([pairs.ceiling_line(ceiling), ""] if ceiling else []),
                       *(["Failed cells (from their records):", "", failures_list(summary), ""]
                         if summary.failed else []),
                       f"Provenance: {provenance_line(summary)}", "", "Reproduce:", "", "```", *summary.commands,
                       "```", ""])
    (out_dir / "table.md").write_text(block)
    return block, summary.grid, out_dir / "table.md"


def _holds_pairs(results_dir: Path) -> bool:
    if pairs.load_case_records(results_dir):
        return True
    try:
        return pairs.is_pairs(load_records(results_dir))
    except PeftlabError:
        return False


def main(argv=None) -> int:
    """`benchmarks/report.py RESULTS`: write the tables, CSVs and plot of a records folder (exit 2 on bad input)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="a grid's records folder, e.g. benchmarks/results/smoke")
    parser.add_argument("--out", type=Path, help="where to write the table, CSVs and plot (default: the records folder)")
    parser.add_argument("--split", choices=SPLITS, default="test", help="which split's metrics to tabulate")
    parser.add_argument("--metric", choices=tuple(METRICS), default="accuracy")
    parser.add_argument("--readme", type=Path, nargs="+", action="extend", default=[],
                        help="also replace this grid's block in these READMEs")
    parser.add_argument("--compare", type=Path, metavar="RERUNS",
                        help="a folder of re-run cells: check each against its committed record, write nothing")
    args = parser.parse_args(argv)
    command = shlex.join(["python", "benchmarks/report.py", *(sys.argv[1:] if argv is None else argv)])
    try:
        if args.compare:
            table, reproduced = compare_reruns(summarize(load_records(args.results)), load_records(args.compare),
                                               args.split, args.metric)
            print(table)
            return 0 if reproduced else 1
        if _holds_pairs(args.results):
            block, grid, table_path = render_pairs(args.results, args.out, command=command)
            for readme in args.readme:
                if grid is None:
                    write_between_markers(readme, *pairs.CASE_MARKERS, block, what="the speed table")
                else:
                    update_readme(readme, grid, block)
            paths = {"table": table_path}
        else:
            summary, paths = render(args.results, args.out, split=args.split, metric=args.metric, command=command)
            for readme in args.readme:
                block = markdown_report(summary, args.split, args.metric,
                                        plot_link=relative_link(paths["plot"], readme.parent),
                                        cost_plot_link=relative_link(paths["cost_plot"], readme.parent)
                                        if "cost_plot" in paths else None,
                                        serving_memory=read_serving_memory(args.results))
                update_readme(readme, summary.grid, block)
    except PeftlabError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(paths["table"].read_text())
    print("wrote " + ", ".join(str(p) for p in [*paths.values(), *args.readme]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
