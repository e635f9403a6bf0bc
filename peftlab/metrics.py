"""Classification metrics: evaluate modules shipped inside peftlab (so they load offline) plus the per-class report."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Sequence

import evaluate
from sklearn.metrics import classification_report, confusion_matrix

from peftlab.errors import PeftlabError

METRIC_MODULES_DIR = Path(__file__).parent / "metric_modules"


def shipped_metrics() -> list[str]:
    """Names of the evaluate metric modules shipped in peftlab/metric_modules/."""
    return sorted(path.parent.name for path in METRIC_MODULES_DIR.glob("*/*.py") if path.stem == path.parent.name)


def load_metric(name: str, **kwargs: Any) -> evaluate.EvaluationModule:
    """Load a metric: peftlab's shipped module when there is one (no network), else `evaluate.load(name)` from the Hub.

    Args:
        name: a metric name (`accuracy`, `f1`, `precision`, `recall` are shipped) or a Hub id.
        kwargs: passed to `evaluate.load`, e.g. `keep_in_memory=True`.
    """
    script = METRIC_MODULES_DIR / name / f"{name}.py"
    if script.is_file():
        return evaluate.load(str(script), **kwargs)
    try:
        return evaluate.load(name, **kwargs)
    except (ConnectionError, FileNotFoundError, OSError) as err:
        # Offline, the Hub lookup fails with a long multi-line error; say what works instead.
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PeftlabError(
            f"metric {name!r} is not shipped with peftlab (shipped: {', '.join(shipped_metrics())}) "
            f"and could not be loaded from the Hub: {first_line}"
        ) from err


SCALAR_METRICS = ("loss", "accuracy", "macro_f1", "macro_precision", "macro_recall")
"""What each validation evaluation reports, and so what `train.metric_for_best` may name (`loss`: lower is better)."""


TASKS_MEAN = "tasks_mean"
"""Multi-task runs: the mean over tasks of each task's own metric (`multitask.tasks[i].metric`); what
`train.metric_for_best=auto` selects on there."""


def check_metric_for_best(name: str, multitask: bool = False) -> None:
    """Reject a `train.metric_for_best` that no evaluation reports, before training (not after the first epoch).

    Args:
        multitask: a multi-task run, whose evaluations also report `tasks_mean` (and the scalar metrics as means
            over the tasks).
    """
    choices = SCALAR_METRICS + ((TASKS_MEAN,) if multitask else ())
    if name != "auto" and name not in choices:  # auto: resolved from the data (peftlab.data_rules)
        close = difflib.get_close_matches(name, choices, n=1) or [m for m in choices if name in m]
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise PeftlabError(f"train.metric_for_best={name!r} is not a validation metric{hint} "
                           f"(choose auto or one of: {', '.join(choices)})")


def per_task_metrics(predictions, references, task_ids, tasks) -> dict[str, dict[str, Any]]:
    """`compute_classification_metrics` of each task that has examples here, on its own examples.

    Args:
        task_ids: each example's task index.
        tasks: the run's tasks in index order, each with `.name` and `.label_names`.
    """
    predictions, references, task_ids = (_to_int_list(values) for values in (predictions, references, task_ids))
    results = {}
    for index, task in enumerate(tasks):
        rows = [i for i, task_id in enumerate(task_ids) if task_id == index]
        if rows:
            results[task.name] = compute_classification_metrics([predictions[i] for i in rows],
                                                                [references[i] for i in rows], task.label_names)
    return results


def multitask_scalar_metrics(per_task: dict[str, dict[str, Any]], tasks) -> dict[str, float]:
    """What a multi-task evaluation logs: `<task>/<metric>` for every task in `per_task`, each scalar metric's mean
    over those tasks (every task counts once, whatever its size), and `tasks_mean`, the mean of each task's own
    metric (its `.metric`; `tasks` may hold more tasks than were evaluated)."""
    scalars = {name: scalar_metrics(results) for name, results in per_task.items()}
    flat = {f"{name}/{key}": value for name, values in scalars.items() for key, value in values.items()}
    for key in SCALAR_METRICS[1:]:  # loss: the evaluation's own, over all examples
        flat[key] = sum(values[key] for values in scalars.values()) / len(scalars)
    own = [scalars[task.name][task.metric] for task in tasks if task.name in scalars]
    flat[TASKS_MEAN] = sum(own) / len(own)
    return flat


def forgetting(before: dict[str, dict[str, float]], after: dict[str, dict[str, Any]],
               metric: str) -> dict[str, dict[str, dict[str, float]]]:
    """How a task's scores moved when the adapter it shares trained on other tasks: per split (validation, test),
    accuracy and the task's own `metric`, each {"before", "after", "change": after - before}.

    Args:
        before, after: per split, the task's metrics (as metrics.json's `tasks` section holds them).
    """
    return {split: {key: {"before": before[split][key], "after": after[split][key],
                          "change": after[split][key] - before[split][key]}
                    for key in dict.fromkeys(("accuracy", metric))}
            for split in ("validation", "test")}


def compute_classification_metrics(
    predictions: Sequence[int], references: Sequence[int], label_names: Sequence[str]
) -> dict[str, Any]:
    """Accuracy, macro F1/precision/recall, per-class report and confusion matrix for single-label classification.

    Args:
        predictions: predicted class ids (a list, numpy array or tensor).
        references: true class ids, same length.
        label_names: one name per class id 0..N-1; classes absent from a small eval set still get a row (scored 0).

    Returns:
        Flat scalar keys for logging (`accuracy`, `macro_f1`, `macro_precision`, `macro_recall`) and nested
        `per_class` (scikit-learn's classification_report as a dict) and `confusion_matrix`
        (rows: true class, columns: predicted class).
    """
    predictions, references = _to_int_list(predictions), _to_int_list(references)
    # Fixing the label set keeps the macro averages and matrix shape the same whichever classes this eval set holds.
    labels = list(range(len(label_names)))
    results = {"accuracy": _compute("accuracy", predictions, references)}
    for name in ("f1", "precision", "recall"):
        results[f"macro_{name}"] = _compute(
            name, predictions, references, labels=labels, average="macro", zero_division=0
        )
    report = classification_report(
        references, predictions, labels=labels, target_names=list(label_names), output_dict=True, zero_division=0
    )
    results["per_class"] = _to_builtin(report)
    results["confusion_matrix"] = confusion_matrix(references, predictions, labels=labels).tolist()
    return results


def scalar_metrics(results: dict[str, Any]) -> dict[str, float]:
    """Only the flat numeric entries of a metrics dict (what trackers log and `metric_for_best` picks from)."""
    # bool is an int subclass; a flag is not a metric.
    return {k: v for k, v in results.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _compute(name: str, predictions: list[int], references: list[int], **kwargs: Any) -> float:
    # keep_in_memory: no cache files or file locks, so every process can compute on the gathered predictions.
    metric = load_metric(name, keep_in_memory=True)
    return metric.compute(predictions=predictions, references=references, **kwargs)[name]


def _to_int_list(values: Any) -> list[int]:
    # Tensors (on any device) and numpy arrays both have tolist(); plain sequences are copied.
    values = values.tolist() if hasattr(values, "tolist") else list(values)
    return [int(value) for value in values]


def _to_builtin(value: Any) -> Any:
    # classification_report returns numpy scalars (np.int64 supports are not JSON-serializable).
    if isinstance(value, dict):
        return {key: _to_builtin(item) for key, item in value.items()}
    return value.item() if hasattr(value, "item") else value


def plot_confusion_matrix(matrix: Sequence[Sequence[float]], label_names: Sequence[str], path: str | Path, *,
                          title: str) -> Path:
    """Save a confusion matrix (rows: true class, columns: predicted class; counts, possibly averaged) as a PNG.

    Each cell shows its count; its colour is the share of its row, so small and large classes read alike.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    counts = np.asarray(matrix, dtype=float)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1e-12)
    n = len(label_names)
    side = min(3 + 0.5 * n, 16)
    fig, ax = plt.subplots(figsize=(side + 1, side))
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ax.set_xticks(range(n), labels=label_names, rotation=45 if n > 4 else 0, ha="right" if n > 4 else "center")
    ax.set_yticks(range(n), labels=label_names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    if n <= 30:  # past that the numbers no longer fit their cells
        for row in range(n):
            for column in range(n):
                ax.text(column, row, f"{counts[row, column]:.1f}".removesuffix(".0"), ha="center", va="center",
                        fontsize=8, color="white" if shares[row, column] > 0.5 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
