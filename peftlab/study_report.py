"""What a `peftlab tune` study leaves when a worker stops: the best configuration as a ready YAML with the command
that trains it (best.yaml), a trials table (trials.md, trials.csv) and the optimisation history (history.png; the
Pareto front of a multi-objective study). All of it is rendered from the study's storage, so every worker rewrites
the same files and the last one to stop leaves the final ones; rerunning the study's command once its trials are
done only rewrites them.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from peftlab import trials
from peftlab.config import load_config, save_config
from peftlab.harness.runner import shown_path

BEST_CONFIG, TABLE, TABLE_CSV, HISTORY = "best.yaml", "trials.md", "trials.csv", "history.png"
COLUMNS = ["trial", "state", "value", "trainable_parameters", "strategy", "params", "train_time_s", "started",
           "finished", "worker", "note"]


def write_summary(study: optuna.Study, search) -> int:
    """Write best.yaml, the trials table and the history plot of `search` (a peftlab.tune.Search) into its study
    folder and print where they are; returns 0, or 1 when no trial completed."""
    folder = search.study_dir
    shown = [t for t in study.get_trials(deepcopy=False)
             if t.state != TrialState.WAITING and not t.user_attrs.get(trials.SURPLUS_ATTR)]
    front = {t.number for t in study.best_trials} if search.multi_objective else set()
    rows = [trial_row(t, shown, front, search.space.strategies[0]) for t in shown]
    _write_table(rows, folder / TABLE, folder / TABLE_CSV, search)
    complete = [t for t in shown if t.state == TrialState.COMPLETE]
    states = {state: sum(t.state == state for t in shown) for state in TrialState}
    print(f"study {study.study_name}: {len(trials.counted(shown))} of {search.cap} trials counted "
          f"({states[TrialState.COMPLETE]} complete, {states[TrialState.PRUNED]} pruned, "
          f"{states[TrialState.FAIL]} failed, {states[TrialState.RUNNING]} still running elsewhere)")
    if not complete:
        print(f"no trial completed; see {folder / TABLE}")
        return 1
    sign = 1 if search.maximize else -1
    best = max(complete if not front else [t for t in complete if t.number in front], key=lambda t: sign * t.values[0])
    launch = write_best_config(best, search, folder / BEST_CONFIG)
    plot_history(study, search, folder / HISTORY)
    print(f"best: trial {best.number}, validation {search.metric} {best.values[0]:.4f} "
          f"({' '.join(search.space.trial_overrides(best.params))})\n"
          f"best config: {folder / BEST_CONFIG}; train it: {launch}\n"
          f"trials: {folder / TABLE}; history: {folder / HISTORY}; records: python benchmarks/report.py "
          f"{folder / 'records'} --split validation")
    return 0


def trial_row(trial: FrozenTrial, all_trials: list[FrozenTrial], front: set[int], only_strategy: str) -> dict:
    """One row of the trials table (`only_strategy`: the strategy of a space that searches one, so no parameter
    names it)."""
    retry_of = trial.system_attrs.get("failed_trial")
    retried_as = [t.number for t in all_trials if (t.system_attrs.get("retry_history") or [None])[-1] == trial.number]
    notes = [f"retry of #{retry_of}"] if retry_of is not None else []
    if trial.state == TrialState.PRUNED and trial.intermediate_values:
        step = max(trial.intermediate_values)
        notes.append(f"pruned at {step / 100:.2f} epochs")
    if trial.state == TrialState.FAIL:
        notes.append(trial.user_attrs.get("error") or "stopped or its worker died")
        if retried_as:
            notes.append(f"retried as #{retried_as[0]}, not counted")
    if trial.number in front:
        notes.append("Pareto front")
    worker = trial.user_attrs.get(trials.WORKER_ATTR) or {}
    values = trial.values or []
    params = {k: v for k, v in trial.params.items() if k != "strategy"}
    return {
        "trial": trial.number, "state": trial.state.name, "value": f"{values[0]:.4f}" if values else "",
        "trainable_parameters": trial.user_attrs.get("trainable_parameters", ""),
        "strategy": trial.params.get("strategy", only_strategy),
        "params": ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()),
        "train_time_s": trial.user_attrs.get("train_time_s", ""),
        "started": trial.datetime_start.isoformat(timespec="seconds") if trial.datetime_start else "",
        "finished": trial.datetime_complete.isoformat(timespec="seconds") if trial.datetime_complete else "",
        "worker": f"{worker['host']}:{worker['pid']}" if worker.get("trial") == trial.number else "",
        "note": "; ".join(notes),
    }


def _write_table(rows: list[dict], markdown: Path, table_csv: Path, search) -> None:
    header = f"value = validation {search.metric}" + (" (first objective; second: trainable parameters)"
                                                      if search.multi_objective else "")
    lines = [f"Trials of `{search.command}` ({header}).", "", "| " + " | ".join(COLUMNS) + " |",
             "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(row[c]).replace("|", "/") for c in COLUMNS) + " |" for row in rows]
    tmp = _temporary(markdown)
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, markdown)
    tmp = _temporary(table_csv)
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, table_csv)


def write_best_config(best: FrozenTrial, search, path: Path) -> str:
    """The best trial's configuration as a ready recipe YAML (without the study's per-worker thread count), headed
    by the command that trains it; returns that command."""
    name = search.study_dir.resolve().name
    cfg = load_config(search.config, [*search.overrides, *search.space.trial_overrides(best.params),
                                      f"output_dir=outputs/{name}-best"])
    launch = f"accelerate launch {search.program.script} --config {shown_path(path)}"
    header = (f"# Best configuration of the study {name}: trial {best.number}, validation {search.metric} "
              f"{best.values[0]:.4f}\n# Train it: {launch}\n# Found by: {search.command}\n")
    tmp = _temporary(path)
    save_config(cfg, tmp, header=header)
    os.replace(tmp, path)
    return launch


def plot_history(study: optuna.Study, search, path: Path) -> None:
    """Optuna's optimisation history (best value so far by trial), or the Pareto front of a multi-objective study."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization.matplotlib import plot_optimization_history, plot_pareto_front

    target = f"validation {search.metric}"
    if search.multi_objective:
        ax = plot_pareto_front(study, target_names=[target, "trainable parameters"])
    else:
        ax = plot_optimization_history(study, target_name=target)
    tmp = _temporary(path)
    ax.figure.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    plt.close(ax.figure)
    os.replace(tmp, path)


def _temporary(path: Path) -> Path:
    """Where this process writes `path` before renaming it into place: workers that stop together each write their
    own file, and the last rename wins whole."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")
