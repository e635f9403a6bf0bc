"""The multi-task tables of a grid report (issue 19): per-task scores, parameters and serving memory, and forgetting.

A multi-task run's record (recipes/multitask_classification.py) holds each task's own scores and parameters under
`tasks`; the generic table (one column per task label, the mean over a run's tasks) cannot show them. Rows here:
- `<strategy>, one run per task`: the grid's single-task cells of that strategy, pooled (single-task training);
- `<strategy>, N tasks in one run`: a cell with several tasks (`, extends <label>` when it continued another run);
with one column per task name, mean ± std over seeds, and the serving memory that `benchmarks/serve_load.py --memory`
measured into the results folder (`serving_memory.json`): one process per run, summed over the runs a row needs.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

SERVING_MEMORY_FILE = "serving_memory.json"


def is_multitask(records: list[dict]) -> bool:
    """Whether these are records of multi-task runs (each holds its tasks' own scores)."""
    return any("tasks" in r for r in records)


def task_names(records: list[dict]) -> list[str]:
    """Every task of the records, in grid order of first appearance."""
    ordered = sorted(records, key=lambda r: (r["position"]["task"], r["position"]["strategy"]))
    return list(dict.fromkeys(name for r in ordered for name in r["tasks"]))


def row_label(strategy: str, records: list[dict]) -> str:
    first = records[0]
    if len(first["tasks"]) == 1:
        return f"{strategy}, one run per task"
    extends = f", extends {first['extends'].split('__')[2]}" if first.get("extends") else ""
    return f"{strategy}, {len(first['tasks'])} tasks in one run{extends}"


def group_rows(records: list[dict]) -> dict[str, list[dict]]:
    """{row label: its records}: single-task cells pooled per (backbone, strategy), each multi-task label its own."""
    rows: dict[tuple, list[dict]] = {}
    for record in sorted(records, key=lambda r: (r["position"]["backbone"], r["position"]["strategy"],
                                                 len(r["tasks"]) > 1, r["position"]["task"], r["seed"])):
        single = len(record["tasks"]) == 1
        key = (record["backbone"], record["strategy"], None if single else record["task"])
        rows.setdefault(key, []).append(record)
    backbones = {key[0] for key in rows}
    return {(f"{key[0]}: " if len(backbones) > 1 else "") + row_label(key[1], group): group
            for key, group in rows.items()}


def _mean_std(values: list[float], signed: bool = False) -> str:
    if not values:
        return ""
    mean = f"{statistics.fmean(values):+.1f}" if signed else f"{statistics.fmean(values):.1f}"
    return f"{mean} ± {statistics.stdev(values):.1f}" if len(values) > 1 else mean


def _human(n: float) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else f"{n:g}"


def _one_seed(records: list[dict]) -> list[dict]:
    """One record per task name: parameter counts do not change with the seed."""
    seed = min(r["seed"] for r in records)
    return [r for r in records if r["seed"] == seed]


def parameter_cells(records: list[dict], names: list[str]) -> tuple[str, str, str]:
    """(adapters, heads, total trained) of a row: adapters per task or shared once, each task's head, and the
    parameters its runs trained in all."""
    runs = _one_seed(records)
    own = {name: r["tasks"][name]["parameters"] for r in runs for name in r["tasks"]}
    shared = {r["multitask"]["shared_parameters"] for r in runs}
    adapters = sorted({own[name]["adapter"] for name in own if own[name]["adapter"]})
    if max(shared):
        adapter_cell = f"{_human(max(shared))} shared"
    else:
        adapter_cell = " / ".join(_human(a) for a in adapters) + (" each" if len(own) > 1 else "")
    heads = " / ".join(_human(own[name]["head"]) for name in names if name in own)
    total = sum(r["parameters"]["trainable"] for r in runs)
    return adapter_cell, heads, _human(total)


def serving_memory_cell(records: list[dict], memory: dict | None) -> str:
    """The resident memory of serving this row's tasks: the measured runs of `memory`'s seed, one process each."""
    if not memory:
        return ""
    measured = {row["cell"]: row for row in memory["rows"]}
    cells = [r["cell"] for r in records if r["seed"] == memory["seed"]]
    if not cells or any(cell not in measured for cell in cells):
        return ""
    total = sum(measured[cell]["rss_mb"] for cell in cells)
    processes = f"{len(cells)} processes" if len(cells) > 1 else "1 process"
    return f"{total:,.0f} ({processes})"


def read_serving_memory(results_dir: Path | None) -> dict | None:
    path = Path(results_dir) / SERVING_MEMORY_FILE if results_dir else None
    return json.loads(path.read_text()) if path and path.is_file() else None


def multitask_table(records: list[dict], split: str, metric: str, memory: dict | None = None) -> str:
    """The per-task Markdown table (see the module docstring)."""
    records = [r for r in records if r["status"] == "ok" and "tasks" in r]
    names = task_names(records)
    head = ["Setting", "Adapters", "Heads", "Trained in all", *names, "Mean", "Serving memory, MB"]
    lines = ["| " + " | ".join(head) + " |", "|---|---:|---:|---:|" + "---:|" * (len(names) + 2)]
    for label, group in group_rows(records).items():
        per_task = {name: [100 * r["tasks"][name][split][metric] for r in group if name in r["tasks"]]
                    for name in names}
        means = [statistics.fmean(values) for values in per_task.values() if values]
        mean = f"{statistics.fmean(means):.1f}" if len(means) == len(names) else ""
        lines.append("| " + " | ".join([label, *parameter_cells(group, names),
                                        *(_mean_std(per_task[name]) for name in names), mean,
                                        serving_memory_cell(group, memory)]) + " |")
    return "\n".join(lines)


def forgetting_table(records: list[dict], split: str, metric: str) -> str:
    """Each earlier task of the runs that trained a shared adapter on (`forgetting` in their records): its score
    before and after, and the change in points, mean ± std over seeds; empty when no record has one."""
    records = [r for r in records if r["status"] == "ok" and r.get("forgetting")]
    if not records:
        return ""
    lines = [f"| Run | Earlier task | {split} {metric} before | after | change (points) |", "|---|---|---:|---:|---:|"]
    for label, group in group_rows(records).items():
        for name in dict.fromkeys(name for r in group for name in r["forgetting"]):
            moves = [r["forgetting"][name][split].get(metric) for r in group if name in r["forgetting"]]
            moves = [m for m in moves if m is not None]
            if not moves:
                continue
            cells = [_mean_std([100 * m[key] for m in moves], signed=key == "change")
                     for key in ("before", "after", "change")]
            lines.append(f"| {label} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
