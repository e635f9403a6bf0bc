"""k-fold cross-validation of a recipe: `peftlab cv RECIPE --folds K [--config PATH] [key=value ...]`.

    peftlab cv text --folds 5 strategy=head output_dir=outputs/cv_head        # also: python -m peftlab.cv ...
    peftlab cv image --folds 5 data.max_train_samples=2000 output_dir=outputs/cv_lite0
    peftlab cv text --folds 5 data.name=reviews.csv data.group_column=author output_dir=outputs/cv_reviews

RECIPE is `text`, `image`, a recipe name or a recipe script; the config and key=value overrides are the recipe's own
(`python recipes/text_classification.py --help` lists them). The recipe's train and validation splits are pooled and
cut into K stratified folds (`data.cv_folds`, see peftlab.data.splits); fold i validates while the others train, and
every fold's model is scored on the same held-out test split. Each fold is a normal run folder, OUTPUT/fold-<i>/ (its
model, metrics.json, predictions), so later steps can ensemble or average them. Also written into OUTPUT:
    folds.csv               the fold of each pool example: index, fold, label (and group with data.group_column); the
                            pool is the plain split's train rows then its validation rows
    oof_predictions.csv     out-of-fold predictions, one row per pool example: index, fold, label, prediction, p_<class>
                            (each from its fold's best checkpoint, saved by the run, never recomputed)
    cv_metrics.json         each fold's validation and test metrics, their mean and std over folds (sample std, n - 1),
                            the out-of-fold metrics and the fold-averaged confusion matrix
    confusion_matrix.png    the validation confusion matrix averaged over folds
    config.yaml             the configuration; a rerun into the same folder must match it

Resumable: rerun the same command. A finished fold is kept as it is (not retrained); a fold stopped after a checkpoint
continues from it, one stopped before its first checkpoint starts over. `overwrite=true` moves an earlier
cross-validation in OUTPUT aside.

Head-only (strategy=head with train.cache_frozen_features): the folds run in this one process inside
`peftlab.caching.shared_frozen_features()`, so the frozen backbone runs once over the pool and the test split, and each
fold then trains only its head on the shared features.

Classes with few examples (documented in peftlab.data.splits): fewer pooled examples than folds is a warning naming the
class (some folds validate without it; every fold still trains on it; remedy: at most that many folds, as
scikit-learn's StratifiedKFold also only warns); a class that some fold would train without (one example, or all of
them in one group) is an error naming it, as a plain split refuses a validation label that train lacks.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import pandas as pd

from peftlab import run_folder
from peftlab.caching import shared_frozen_features
from peftlab.checkpointing import latest_checkpoint
from peftlab.cli import run_cli
from peftlab.config import RecipeConfig, config_to_dict, load_config, save_config
from peftlab.data import load_data
from peftlab.data.splits import Folds
from peftlab.errors import PeftlabError, RunInterrupted
from peftlab.harness.programs import Program, load_recipe_module, recipe_program
from peftlab.metrics import compute_classification_metrics, plot_confusion_matrix, scalar_metrics
from peftlab.runs import CONFIG_FILE, METRICS_FILE, PREDICTIONS_FILES

CV_KIND = "cross-validation"
FOLDS_FILE = "folds.csv"
OOF_FILE = "oof_predictions.csv"
CV_METRICS_FILE = "cv_metrics.json"
CONFUSION_FILE = "confusion_matrix.png"
# What may differ between the command that started a cross-validation and the one that continues it.
_RERUN_KEYS = {"output_dir", "overwrite", "resume_from", "data.cv_fold"}


@dataclass
class FoldResult:
    """One fold's run."""

    fold: int
    run_dir: Path
    metrics: dict[str, Any]
    """The fold's metrics.json: `validation` (its best evaluation), `test`, cost."""
    skipped: bool
    """Finished by an earlier call and kept, not retrained."""
    wall_s: float = 0.0


@dataclass
class CvResult:
    """A finished cross-validation: its folds and cv_metrics.json's content."""

    output_dir: Path
    k: int
    folds: list[FoldResult]
    summary: dict[str, Any] = field(default_factory=dict)

    def mean(self, metric: str, split: str = "validation") -> float:
        """The metric's mean over the folds, e.g. `mean("accuracy")` (validation) or `mean("macro_f1", "test")`."""
        return self.summary[split][metric]["mean"]

    def std(self, metric: str, split: str = "validation") -> float:
        """The metric's sample standard deviation over the folds (n - 1)."""
        return self.summary[split][metric]["std"]


def run_cv(cfg: RecipeConfig, recipe: str | Program, k: Optional[int] = None,
           output_dir: Optional[str | os.PathLike] = None, *,
           on_fold: Optional[Callable[[FoldResult], None]] = None,
           log: Callable[[str], None] = print) -> CvResult:
    """Run `recipe` once per fold into OUTPUT/fold-<i>/ and write the cross-validation's outputs (module docstring).

    Args:
        cfg: the recipe's config; data.cv_folds/cv_fold and output_dir are set here.
        recipe: `text`, `image`, a recipe name or script, or a `peftlab.harness.programs.Program`.
        k: the number of folds (default: cfg.data.cv_folds).
        output_dir: the cross-validation's folder (default: cfg.output_dir).
        on_fold: called after each fold (a search can prune there by raising).
        log: where the progress lines go.
    Raises PeftlabError before any training for bad folds (k < 2, k above the pool, an unknown group column, a class
    some fold would train without), a folder that is not this cross-validation's, or a changed config.
    """
    program = recipe if isinstance(recipe, Program) else recipe_program(recipe)
    if program.task is None:
        raise PeftlabError(f"peftlab cv cannot tell whether recipe {program.script} is a text or image recipe; run a "
                           "copy of recipes/text_classification.py or recipes/image_classification.py")
    k = cfg.data.cv_folds if k is None else k
    if k is None:
        raise PeftlabError("give the number of folds: --folds K (K >= 2)")
    if k < 2:
        raise PeftlabError(f"data.cv_folds: must be >= 2, got {k}")
    if cfg.resume_from not in (None, "latest"):
        raise PeftlabError(f"resume_from={cfg.resume_from}: a cross-validation continues by itself when rerun (each "
                           "fold from its own checkpoint); drop resume_from")
    output_dir = Path(output_dir if output_dir is not None else cfg.output_dir)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, cv_folds=k, cv_fold=0),
                              output_dir=str(output_dir), resume_from=None)
    main_process = os.environ.get("RANK", "0") == "0"
    log = log if main_process else (lambda line: None)  # one progress line per fold, not one per process
    state = run_folder.check_folder_of_runs(output_dir, CV_KIND, overwrite=cfg.overwrite) if main_process else None
    if state is not None and state.action == "resume":
        check_same_config(output_dir / CONFIG_FILE, cfg)
    module = load_recipe_module(program)
    data = load_data(cfg.data, program.task)  # the pool and its folds: bad folds fail here, before any training
    folds = data.folds
    if main_process:
        run_folder.open_run_folder(state, kind=CV_KIND)
        save_config(dataclasses.replace(cfg, overwrite=False), output_dir / CONFIG_FILE)
        write_folds(output_dir / FOLDS_FILE, folds, data.label_names)
    log(f"{k}-fold cross-validation of {cfg.strategy} on {cfg.model.name}: {len(folds.fold_of):,} pooled examples "
        f"({cfg.data.name}), {len(data.splits['test']):,} held out for test, into {output_dir}")

    results, start = [], time.perf_counter()
    try:
        with shared_frozen_features() as shared:
            for fold in range(k):
                results.append(run_fold(module, cfg, folds, fold, output_dir / f"fold-{fold}", log))
                if on_fold is not None:
                    on_fold(results[-1])
        result = CvResult(output_dir, k, results)
        if main_process:
            result.summary = summarize(results, folds, data.label_names, output_dir,
                                       title=f"{cfg.strategy} on {cfg.model.name}, {cfg.data.name}")
            result.summary.update(wall_s=round(time.perf_counter() - start, 1), test_size=len(data.splits["test"]),
                                  frozen_features={"extracted": shared.extracted, "reused": shared.reused})
            (output_dir / CV_METRICS_FILE).write_text(json.dumps(result.summary, indent=2) + "\n")
            log(results_table(result.summary))
            log(f"wrote {output_dir}/: {CV_METRICS_FILE}, {OOF_FILE}, {FOLDS_FILE}, {CONFUSION_FILE}, "
                f"fold-0..{k - 1}/")
            run_folder.close_run_folder(output_dir, run_folder.FINISHED)
    except BaseException as err:  # a failed or stopped fold (or a search pruning here): the folders say so, unlocked
        interrupted = isinstance(err, (KeyboardInterrupt, RunInterrupted))
        reason = " ".join(str(err).split()) or type(err).__name__
        for folder in (output_dir / f"fold-{len(results)}", output_dir):
            run_folder.close_run_folder(folder, run_folder.INTERRUPTED if interrupted else run_folder.FAILED, reason)
        raise
    return result


def run_fold(module, cfg: RecipeConfig, folds: Folds, fold: int, run_dir: Path,
             log: Callable[[str], None]) -> FoldResult:
    """Run the recipe for one fold, unless its folder holds a finished run (kept as it is)."""
    name = f"fold {fold} ({fold + 1}/{folds.k})"
    marker = run_folder.read_marker(run_dir)
    if marker is not None and marker.get("status") == run_folder.FINISHED:
        metrics = read_fold_metrics(run_dir)
        log(f"{name}: finished earlier, kept: {fold_scores(metrics)}")
        return FoldResult(fold, run_dir, metrics, skipped=True)
    resume = "latest" if latest_checkpoint(run_dir) is not None else None
    fold_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, cv_fold=fold), output_dir=str(run_dir),
                                   overwrite=False, resume_from=resume)
    validating = len(folds.validation_indices(fold))
    log(f"{name}: training on {len(folds.fold_of) - validating:,} examples, validating on {validating:,}"
        + (" (continuing from its last checkpoint)" if resume else ""))
    start = time.perf_counter()
    metrics = module.main(fold_cfg)
    wall_s = time.perf_counter() - start
    log(f"{name}: done in {wall_s:.0f} s: {fold_scores(metrics)}")
    return FoldResult(fold, run_dir, metrics, skipped=False, wall_s=wall_s)


def read_fold_metrics(run_dir: Path) -> dict[str, Any]:
    """A finished fold's metrics.json; a one-line error when it is missing or damaged."""
    path = run_dir / METRICS_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise PeftlabError(f"{run_dir} is marked finished but its {METRICS_FILE} cannot be read ({err}); move "
                           f"{run_dir} away and rerun to train that fold again") from err


def fold_scores(metrics: dict[str, Any]) -> str:
    """`validation accuracy 0.812, test accuracy 0.820` for a progress line."""
    parts = [f"{split} accuracy {metrics[split]['accuracy']:.4f}" for split in ("validation", "test")
             if "accuracy" in metrics.get(split, {})]
    return ", ".join(parts)


def check_same_config(saved_path: Path, cfg: RecipeConfig) -> None:
    """Refuse to continue a cross-validation whose saved config differs from this one (its finished folds would then
    mix two configurations); names the first differing key."""
    if not saved_path.is_file():
        return  # stopped before it wrote its config: nothing trained yet
    saved, current = _flatten(config_to_dict(load_config(str(saved_path)))), _flatten(config_to_dict(cfg))
    changed = sorted(key for key in saved.keys() | current.keys()
                     if key not in _RERUN_KEYS and saved.get(key) != current.get(key))
    if changed:
        key = changed[0]
        raise PeftlabError(f"{saved_path.parent} holds a cross-validation with {key}={saved.get(key)!r}, not "
                           f"{current.get(key)!r}; rerun it with the same settings, choose another output_dir, or "
                           "pass overwrite=true to move it aside")


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "strategy_options":
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def write_folds(path: Path, folds: Folds, label_names: list[str]) -> None:
    """Save the fold of each pool example; a rerun whose folds differ from the saved ones is refused."""
    table = pd.DataFrame({"index": np.arange(len(folds.fold_of)), "fold": folds.fold_of,
                          "label": [label_names[label] for label in folds.labels]})
    if folds.groups is not None:
        table["group"] = folds.groups
    if path.is_file():
        saved = pd.read_csv(path)
        if len(saved) != len(table) or not np.array_equal(saved["fold"].to_numpy(), table["fold"].to_numpy()):
            raise PeftlabError(f"the folds of this run differ from the ones in {path} (the data or its split changed); "
                               "choose another output_dir, or pass overwrite=true to move the old one aside")
    table.to_csv(path, index=False)


def summarize(results: list[FoldResult], folds: Folds, label_names: list[str], output_dir: Path, *,
              title: str) -> dict[str, Any]:
    """Write the out-of-fold predictions and the fold-averaged confusion matrix; return cv_metrics.json's content."""
    frames, matrices = [], []
    for result in results:
        frame = read_fold_predictions(result, folds, label_names)
        frames.append(frame)
        ids = {name: index for index, name in enumerate(label_names)}
        fold_metrics = compute_classification_metrics(frame["prediction"].map(ids), frame["label"].map(ids),
                                                      label_names)
        matrices.append(np.asarray(fold_metrics["confusion_matrix"], dtype=float))
    oof = pd.concat(frames).sort_values("index")
    oof.to_csv(output_dir / OOF_FILE, index=False)
    ids = {name: index for index, name in enumerate(label_names)}
    out_of_fold = compute_classification_metrics(oof["prediction"].map(ids), oof["label"].map(ids), label_names)
    averaged = np.mean(matrices, axis=0)
    plot_confusion_matrix(averaged, label_names, output_dir / CONFUSION_FILE,
                          title=f"{len(results)}-fold cross-validation, validation folds averaged\n{title}")
    summary: dict[str, Any] = {"k": len(results), "pool_size": len(folds.fold_of),
                               "grouped": folds.groups is not None}
    for split in ("validation", "test"):
        per_fold = [scalar_metrics(result.metrics.get(split, {})) for result in results]
        names = [name for name in per_fold[0] if all(name in scores for scores in per_fold)]
        summary[split] = {name: mean_and_std([scores[name] for scores in per_fold]) for name in names}
    summary["out_of_fold"] = out_of_fold
    summary["fold_averaged_confusion_matrix"] = averaged.round(2).tolist()
    summary["folds"] = [{"fold": r.fold, "run_dir": r.run_dir.name, "skipped": r.skipped,
                         "validation_size": int((folds.fold_of == r.fold).sum()),
                         "validation": scalar_metrics(r.metrics.get("validation", {})),
                         "test": scalar_metrics(r.metrics.get("test", {})),
                         "train_time_s": r.metrics.get("train_time_s")} for r in results]
    return summary


def read_fold_predictions(result: FoldResult, folds: Folds, label_names: list[str]) -> pd.DataFrame:
    """A fold's validation predictions with pool indices; a one-line error when they do not fit the fold."""
    path = result.run_dir / PREDICTIONS_FILES["validation"]
    columns = {"label": str, "prediction": str}
    try:
        frame = pd.read_csv(path, dtype=columns, keep_default_na=False)
    except (OSError, ValueError) as err:
        raise PeftlabError(f"cannot read {path} ({err}); move {result.run_dir} away and rerun to train that fold "
                           "again") from err
    expected = folds.validation_indices(result.fold)
    labels = [label_names[label] for label in folds.labels[expected]]
    if len(frame) != len(expected) or frame["label"].tolist() != labels:
        raise PeftlabError(f"{path} does not hold fold {result.fold}'s {len(expected)} validation examples (the "
                           f"data changed since it ran?); move {result.run_dir} away and rerun to train that fold "
                           "again")
    frame["index"] = expected  # row j of a fold's validation split is its j-th pool index, ascending
    frame.insert(1, "fold", result.fold)
    return frame


def mean_and_std(values: list[float]) -> dict[str, Any]:
    """{"mean", "std" (sample, n - 1), "folds"} of one metric over the folds."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "folds": values}


def results_table(summary: dict[str, Any]) -> str:
    """The printed table: one row per metric, mean ± std over folds for validation and test, then out-of-fold."""
    names = list(dict.fromkeys([*summary["validation"], *summary["test"]]))
    width = max(map(len, names)) + 2
    lines = [f"{'metric':<{width}}{'validation (mean ± std)':<26}test (mean ± std)"]
    for name in names:
        cells = [f"{summary[split][name]['mean']:.4f} ± {summary[split][name]['std']:.4f}"
                 if name in summary[split] else "-" for split in ("validation", "test")]
        lines.append(f"{name:<{width}}{cells[0]:<26}{cells[1]}")
    oof = summary["out_of_fold"]
    lines.append(f"out of fold ({summary['pool_size']:,} examples, each predicted by the fold that validated on it): "
                 f"accuracy {oof['accuracy']:.4f}, macro-F1 {oof['macro_f1']:.4f}")
    return "\n".join(lines)


USAGE = """usage: peftlab cv RECIPE --folds K [--config PATH] [--debug] [key=value ...]

k-fold cross-validation of a recipe; every fold is a run folder OUTPUT/fold-<i>/, plus folds.csv, oof_predictions.csv,
cv_metrics.json and confusion_matrix.png in OUTPUT (= output_dir). Rerun the same command to continue.

arguments:
  RECIPE         text, image, a recipe name (text_classification) or a recipe script
  --folds K      number of folds, at least 2 (or data.cv_folds=K)
  --config PATH  the recipe's YAML (default: the recipe's own default config)
  --debug        show full tracebacks instead of one-line errors
  key=value      the recipe's config overrides, e.g. strategy=head output_dir=outputs/cv_head
                 (python recipes/text_classification.py --help lists every key)"""


def main(argv: Optional[list[str]] = None) -> Optional[CvResult]:
    """`peftlab cv RECIPE --folds K [--config PATH] [--debug] [key=value ...]`; errors are one line, exit code 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help") or "--help" in argv or "-h" in argv:
        print(USAGE)
        sys.exit(0 if argv else 2)
    try:
        program = recipe_program(argv[0])
        default_config = load_recipe_module(program).__dict__.get("DEFAULT_CONFIG")
        rest = _folds_as_override(argv[1:])
    except PeftlabError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        sys.exit(2)
    # The recipe's own command line: its config, overrides, one-line errors and interruption handling.
    return run_cli(lambda cfg: run_cv(cfg, program), rest,
                   default_config=str(default_config) if default_config else None)


def _folds_as_override(args: list[str]) -> list[str]:
    """`--folds K` becomes the override data.cv_folds=K (checked with the rest of the config); data.cv_fold is set
    per fold, so it gets a valid placeholder beside it."""
    rest, folds = [], None
    items = iter(args)
    for arg in items:
        if arg == "--folds" or arg.startswith("--folds="):
            folds = arg.partition("=")[2] if "=" in arg else next(items, None)
            if folds is None or not folds.strip().lstrip("-").isdigit():
                raise PeftlabError(f"--folds needs a whole number of folds, e.g. --folds 5, got {folds!r}")
        else:
            rest.append(arg)
    if folds is not None:
        rest.append(f"data.cv_folds={int(folds)}")
    # Else the folds may come from the config file; run_cv says so when they come from nowhere.
    return [*rest, "data.cv_fold=0"] if any(arg.startswith("data.cv_folds=") for arg in rest) else rest


if __name__ == "__main__":
    main()
