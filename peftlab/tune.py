"""Hyper-parameter search over any recipe, on Optuna: `peftlab tune RECIPE --space SPACE --trials N --output-dir DIR`.

    peftlab tune text --space recipes/configs/search/text.yaml --trials 20 --output-dir studies/text
    peftlab tune image --space recipes/configs/search/image.yaml --trials 8 --output-dir studies/vision \\
        data.max_train_samples=1000
    # more workers on this machine: the same command in another terminal, every one with --local-workers 2
    # many machines, one study: the same command on each, with --storage postgresql://user:password@host/db
(`python -m peftlab.tune` is the same command.)

RECIPE is `text`, `image`, a recipe name or a recipe script; the trials start from its config (`--config`, else the
recipe's default YAML) plus any `key=value` overrides, and sample the keys of the search space (peftlab.search_space;
documented defaults in recipes/configs/search/). Each trial is a run of the recipe, in this process, in
DIR/trials/<number>/ with a run's usual files (metrics.json, config.yaml, log.jsonl; `model/` only for the
--keep-best best trials), and a benchmark record in DIR/records/, so `python benchmarks/report.py DIR/records`
renders the study like a grid. The objective is the run's best validation `train.metric_for_best` (minimised when
its name holds `loss`); with --multi-objective, that and the trainable parameters (head included). Trials are
chosen on validation only; their test scores are recorded, never used. When a worker stops it writes DIR/best.yaml
(the best configuration, headed by the command that trains it), DIR/trials.md and trials.csv, and DIR/history.png.

Sampler: Optuna's TPE (multivariate, grouped so each strategy's own keys are modelled apart, constant liar so
parallel workers spread out); the first max(2, min(10, N // 3)) trials are random. Pruning: at each validation
evaluation a trial reports its metric at step = percent of an epoch trained (the end of epoch 1 is 100, whatever
the batch size). `median` (default) stops a trial whose best value so far is worse than the median of the other
trials at the same step, once 2 trials completed: it works from the third of a few trials. `hyperband` runs Optuna's
Hyperband (from one epoch, reduction factor 3), which needs more trials to fill its brackets. A stopped trial ends
like an early-stopped run (it tests and saves) and is recorded PRUNED; the final evaluation is reported but never
prunes (stopping there saves nothing, and a PRUNED trial cannot be the best). Multi-objective studies do not prune.

Small data (`--cv K`): each trial is a K-fold cross-validation (peftlab.cv) in DIR/trials/<number>/fold-<i>/, its
value the mean over the folds of the validation metric; it is pruned between folds (not after the last), on the
running mean at step = folds done - 1, and its record holds the folds' mean validation and test metrics.

Workers: a study lives in a journal file (DIR/study.journal: the workers of one machine, or of a shared file
system) or a database (--storage: many machines). --trials caps the whole study, however many workers join. A
worker killed mid-trial leaves its trial running: the next worker started on that machine fails it (its process is
gone) and runs its parameters again, uncounted; on a database, Optuna's heartbeats (every 60 s, stale after 180 s)
do the same from any machine (details: peftlab.trials). Each of W workers on a machine (--local-workers W) trains
with cores / W threads, unless the config sets train.cpu_threads.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import re
import shlex
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import optuna
from optuna.trial import TrialState

from peftlab import run_folder, trials
from peftlab.cli import sigterm_raises_keyboard_interrupt
from peftlab.config import RecipeConfig, load_config
from peftlab.cv import run_cv
from peftlab.data_rules import metric_for_best
from peftlab.console import quiet_third_party
from peftlab.errors import PeftlabError, RunInterrupted
from peftlab.harness.grid import cell_id
from peftlab.harness.programs import Program, load_recipe_module, recipe_program
from peftlab.harness.provenance import source_fingerprint
from peftlab.harness.runner import RECORD_VERSION, run_outcome, shown_path, write_record
from peftlab.search_space import SearchSpace, load_search_space
from peftlab.study_report import write_summary
from peftlab.threads import share_of_cores
from peftlab.training import Evaluation, evaluation_listener, forget_accelerator_state

STUDY_ATTR = "peftlab"
RUNNER_OVERRIDES = ("output_dir", "overwrite", "resume_from")
PRUNERS: dict[str, Callable[[], optuna.pruners.BasePruner]] = {
    "median": lambda: optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0),
    "hyperband": lambda: optuna.pruners.HyperbandPruner(min_resource=100, max_resource="auto", reduction_factor=3),
    "none": optuna.pruners.NopPruner,
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="peftlab tune", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n")[0], epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("recipe", help="text, image, a recipe name (text_classification) or a recipe script")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides every trial shares, e.g. data.max_train_samples=1000")
    parser.add_argument("--space", required=True, help="search-space YAML, e.g. recipes/configs/search/text.yaml")
    parser.add_argument("--trials", type=int, required=True, metavar="N",
                        help="trials of the whole study, over all workers (rerun with a larger N to extend it)")
    parser.add_argument("--output-dir", required=True, metavar="DIR", help="the study folder")
    parser.add_argument("--config", help="recipe YAML the trials start from (default: the recipe's own)")
    parser.add_argument("--storage", metavar="URL_OR_PATH",
                        help="an Optuna RDB URL (postgresql://user:password@host/db) or a journal file path "
                             "(default: DIR/study.journal)")
    parser.add_argument("--study-name", help="the study's name in the storage (default: DIR's folder name)")
    parser.add_argument("--pruner", choices=sorted(PRUNERS), default="median", help="default: median")
    parser.add_argument("--multi-objective", action="store_true",
                        help="search validation metric against trainable parameters (a Pareto front; no pruning)")
    parser.add_argument("--keep-best", type=int, default=3, metavar="N",
                        help="keep model/ of the N best complete trials, delete the others' (default: 3)")
    parser.add_argument("--local-workers", type=int, default=1, metavar="W",
                        help="workers of this study you run on this machine: each trains with cores / W threads "
                             "(default: 1)")
    parser.add_argument("--seed", type=int, help="sampler seed: a one-worker study samples the same trials again")
    parser.add_argument("--cv", type=int, metavar="K",
                        help="each trial a K-fold cross-validation (peftlab cv) of the train + validation pool; "
                             "its value the mean validation metric over the folds, pruned between folds")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    return parser.parse_intermixed_args(argv)


@dataclass
class Search:
    """One worker's view of the study: what each trial runs and where its outputs go."""

    program: Program
    recipe_main: Callable[[RecipeConfig], Any]
    config: Optional[str]
    overrides: list[str]
    space: SearchSpace
    study_dir: Path
    metric: str
    maximize: bool
    multi_objective: bool
    prune: bool
    cap: int
    keep_best: int
    thread_overrides: list[str]
    command: str
    cv: Optional[int] = None
    """`--cv K`: each trial is a K-fold cross-validation (peftlab.cv) and its value the mean over the folds."""
    current: Optional[int] = None
    """The number of the trial this worker runs now (None between trials)."""

    def objective(self, trial: optuna.Trial):
        """Run one trial of the recipe; its validation metric (and trainable parameters) is the value."""
        if not trials.admitted(trial.study, trial.number, self.cap):
            trial.set_user_attr(trials.SURPLUS_ATTR, True)
            message = f"trial {trial.number} is surplus: other workers' trials reached the cap of {self.cap} first"
            print(f"{message}; it is dropped, uncounted", flush=True)
            raise trials.SurplusTrial(message)
        trial.set_user_attr(trials.WORKER_ATTR, trials.worker_record(trial.number))
        self.current = trial.number
        sampled = self.space.suggest(trial)
        run_dir = trials.trial_dir(self.study_dir, trial.number)
        cfg = load_config(self.config, [*self.overrides, *sampled, *self.thread_overrides, f"output_dir={run_dir}"])
        print(f"\n=== trial {trial.number} (of {self.cap}): {' '.join(sampled)}", flush=True)
        pruning = None if not self.prune else (
            FoldPruning(trial, self.metric, self.cv) if self.cv else Pruning(trial, self.metric))
        source, start, error = source_fingerprint(self.program), time.perf_counter(), None
        forget_accelerator_state()  # each trial builds its Accelerator afresh, with its own precision
        try:
            if self.cv:  # pruned between folds, on the running mean (a fold itself runs to its end)
                run_cv(cfg, self.program, self.cv, run_dir, on_fold=pruning)
            else:
                with evaluation_listener(pruning) if pruning else contextlib.nullcontext():
                    self.recipe_main(cfg)
        except PeftlabError as err:
            error = " ".join(str(err).split())
            run_folder.close_all_run_folders(run_folder.FAILED, error)
            print(f"trial {trial.number} failed: {error}", file=sys.stderr, flush=True)
        except optuna.TrialPruned:  # raised by FoldPruning between folds
            pass
        self.current = None
        state = TrialState.FAIL if error else TrialState.PRUNED if pruning and pruning.pruned else TrialState.COMPLETE
        self.write_record(trial.number, cfg, sampled, run_dir, time.perf_counter() - start, error, source, state)
        if error:
            trial.set_user_attr("error", error)
            raise PeftlabError(error)
        metrics = json.loads((self.first_run(run_dir) / "metrics.json").read_text())
        if self.cv:
            metrics["validation"] = fold_means(run_dir)["validation"]
        value = metrics["validation"].get(self.metric)
        if value is None:
            raise PeftlabError(f"trial {trial.number} ended without a validation {self.metric} (no evaluation ran)")
        trainable = metrics["parameters"]["trainable"]
        trial.set_user_attr("trainable_parameters", trainable)
        trial.set_user_attr("train_time_s", round(metrics["train_time_s"], 2))
        if pruning and pruning.pruned:
            raise optuna.TrialPruned(pruning.message)
        return (value, trainable) if self.multi_objective else value

    def write_record(self, number: int, cfg: RecipeConfig, sampled: list[str], run_dir: Path, wall_time_s: float,
                     error: str | None, source: str, state: TrialState) -> None:
        """The trial's benchmark record in DIR/records/ (the grid runner's fields, so the report reads it)."""
        def label(name: str) -> str:
            return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(name).name) or "x"

        backbone, task = label(cfg.model.name), label(cfg.data.name)
        strategy = f"trial{number:04d}-{cfg.strategy}" + ("-pruned" if state == TrialState.PRUNED else "")
        config = ["--config", self.config] if self.config else []
        overrides = [*self.overrides, *sampled, *self.thread_overrides]
        record = {
            "record_version": RECORD_VERSION, "grid": self.study_dir.name, "grid_file": shown_path(self.space.path),
            "cell": cell_id(backbone, task, strategy, cfg.train.seed), "status": "ok", "backbone": backbone,
            "strategy": strategy, "task": task, "seed": cfg.train.seed,
            "position": {"backbone": 0, "strategy": number, "task": 0}, "kind": self.program.kind,
            "program": self.program.name, "overrides": overrides, "env": {},
            "command": shlex.join(["python", *self.program.command(), *config, *overrides,
                                   f"output_dir={shown_path(run_dir)}"]),
            "returncode": 1 if error else 0, "wall_time_s": round(wall_time_s, 2),
            "log": shown_path(run_dir / "log.jsonl"), "run_dir": shown_path(run_dir),
            "study": {"name": self.study_dir.name, "trial": number, "state": state.name, "command": self.command},
        }
        outcome = run_outcome(self.program, self.first_run(run_dir), error, source)
        if self.cv and outcome["status"] == "ok":
            # The folds' means stand for the trial (the parameters and cost are fold 0's: every fold is the same model).
            means = fold_means(run_dir)
            outcome["metrics"].update(validation=means["validation"], test=means["test"])
            outcome["cv"] = {"folds": self.cv, "finished": means["folds"]}
        record.update(outcome)
        records = self.study_dir / "records"
        records.mkdir(parents=True, exist_ok=True)
        write_record(records / f"{record['cell']}.json", record)

    def first_run(self, run_dir: Path) -> Path:
        """The trial's run folder; with --cv, its first fold's (parameters, cost and config are the same in each)."""
        return run_dir / "fold-0" if self.cv else run_dir

    def after_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """Optuna callback after each trial: keep the weights of the best trials only."""
        trials.keep_best_weights(study, self.study_dir, self.keep_best, self.maximize)


class Pruning:
    """The evaluation listener of a trial: reports each validation metric to Optuna and stops the run when the
    pruner says so (see the module docstring for the step)."""

    def __init__(self, trial: optuna.Trial, metric: str):
        self.trial, self.metric, self.pruned, self.message, self.steps = trial, metric, False, "", set()

    def __call__(self, evaluation: Evaluation) -> bool:
        step = round(100 * evaluation.epoch)
        if step in self.steps:  # two evaluations within 1% of an epoch: Optuna keeps the first
            return False
        self.steps.add(step)
        value = evaluation.metrics[self.metric]
        self.trial.report(value, step)
        # At the final evaluation stopping saves nothing: the trial completes with its value instead of being
        # recorded as pruned (and so left out of the best trial) at the point where it finished anyway.
        if not evaluation.last and self.trial.should_prune():
            self.pruned = True
            self.message = (f"pruned at optimizer step {evaluation.step} ({evaluation.epoch:.2f} epochs): "
                            f"validation {self.metric} {value:.4f}")
            print(f"trial {self.trial.number} {self.message}", flush=True)
        return self.pruned


class FoldPruning:
    """`--cv`: after each fold, reports the running mean of the folds' validation metric to Optuna (step = folds
    done - 1) and stops the cross-validation when the pruner says so."""

    def __init__(self, trial: optuna.Trial, metric: str, folds: int):
        self.trial, self.metric, self.folds, self.pruned, self.message, self.values = trial, metric, folds, False, "", []

    def __call__(self, fold) -> None:
        self.values.append(fold.metrics["validation"][self.metric])
        mean = sum(self.values) / len(self.values)
        self.trial.report(mean, len(self.values) - 1)
        if len(self.values) < self.folds and self.trial.should_prune():  # after the last fold it saves nothing
            self.pruned = True
            self.message = f"pruned after {len(self.values)} folds: mean validation {self.metric} {mean:.4f}"
            print(f"trial {self.trial.number} {self.message}", flush=True)
            raise optuna.TrialPruned(self.message)


def fold_means(run_dir: Path) -> dict:
    """The mean over the finished folds of a cross-validated trial of each scalar validation and test metric."""
    folds = [json.loads(path.read_text()) for path in sorted(run_dir.glob("fold-*/metrics.json"))]
    means = {"folds": len(folds)}
    for split in ("validation", "test"):
        keys = [k for k, v in folds[0][split].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        means[split] = {k: sum(f[split][k] for f in folds) / len(folds) for k in keys}
    return means


def open_study(args: argparse.Namespace, search: Search, storage) -> optuna.Study:
    """Create the study, or join it: a study started with another recipe, config or space is refused."""
    direction = "maximize" if search.maximize else "minimize"
    sampler = optuna.samplers.TPESampler(
        seed=args.seed, n_startup_trials=max(2, min(10, search.cap // 3)), multivariate=True, group=True,
        constant_liar=True)
    name = args.study_name or search.study_dir.resolve().name
    try:
        study = optuna.create_study(
            study_name=name, storage=storage, load_if_exists=True, sampler=sampler,
            pruner=PRUNERS[args.pruner]() if search.prune else optuna.pruners.NopPruner(),
            directions=[direction, "minimize"] if search.multi_objective else [direction])
    except ValueError as err:  # e.g. the stored study has other directions
        raise PeftlabError(f"cannot join study {name!r}: {err}; use the same --multi-objective and "
                           "train.metric_for_best, or another --study-name") from err
    identity = {"recipe": search.program.script, "config": search.config, "overrides": search.overrides,
                "space_sha256": search.space.sha256, "metric": search.metric,
                "multi_objective": search.multi_objective}
    stored = study.user_attrs.get(STUDY_ATTR)
    if stored is None:
        study.set_user_attr(STUDY_ATTR, identity)
        if not study.get_trials(deepcopy=False) and any((search.study_dir / "trials").glob("*")):
            raise PeftlabError(f"{search.study_dir / 'trials'} holds trials of another study (its storage does not "
                               "know them); choose another --output-dir or move that folder away")
    else:
        changed = [key for key in identity if stored.get(key) != identity[key]]
        if changed:
            raise PeftlabError(f"study {name!r} was started with another {', '.join(changed)} (space sha256 "
                               f"{str(stored.get('space_sha256'))[:12]}); rerun it with the same recipe, config, "
                               "overrides and space, or choose another --output-dir or --study-name")
    return study


def run_worker(study: optuna.Study, search: Search) -> None:
    """Run trials until the study holds its cap of counted trials (see peftlab.trials)."""
    while True:
        for message in trials.fail_stale_trials(study):
            print(message, file=sys.stderr, flush=True)
        if len(trials.counted(study.get_trials(deepcopy=False))) >= search.cap:
            return
        study.optimize(search.objective, n_trials=1, catch=(PeftlabError, trials.SurplusTrial),
                       callbacks=[search.after_trial], gc_after_trial=True)


def tune(args: argparse.Namespace, argv: list[str]) -> int:
    """Check everything, then join the study and run trials; returns the exit code."""
    for number, what in ((args.trials, "--trials"), (args.local_workers, "--local-workers")):
        if number < 1:
            raise PeftlabError(f"{what} must be >= 1, got {number}")
    if args.keep_best < 0:
        raise PeftlabError(f"--keep-best must be >= 0, got {args.keep_best}")
    for item in args.overrides:
        if item.partition("=")[0].strip() in RUNNER_OVERRIDES:
            raise PeftlabError(f"{item}: peftlab tune sets {item.partition('=')[0].strip()} per trial; give the "
                               "study folder with --output-dir")
    program = recipe_program(args.recipe)
    if args.cv is not None and args.cv < 2:
        raise PeftlabError(f"--cv must be >= 2 folds, got {args.cv}")
    recipe = load_recipe_module(program)
    config = args.config or (str(recipe.DEFAULT_CONFIG) if getattr(recipe, "DEFAULT_CONFIG", None) else None)
    base = load_config(config, args.overrides)
    # `auto` follows the labels, as in each trial's run; a recipe script of your own names its task with TASK.
    metric = metric_for_best(base, program.task or getattr(recipe, "TASK", None))
    space = load_search_space(args.space, config, args.overrides)  # every key and range, before any work
    if args.multi_objective and args.pruner != "none":
        print("multi-objective study: pruning is off (Optuna's pruners judge a single objective)", file=sys.stderr)
    threads = share_of_cores(args.local_workers)
    search = Search(
        program=program, recipe_main=recipe.main, config=config, overrides=list(args.overrides), space=space,
        study_dir=Path(args.output_dir), metric=metric,
        maximize="loss" not in metric, multi_objective=args.multi_objective,
        prune=not args.multi_objective and args.pruner != "none", cap=args.trials, keep_best=args.keep_best,
        thread_overrides=[] if base.train.cpu_threads is not None else [f"train.cpu_threads={threads.threads}"],
        command=shlex.join(["peftlab", "tune", *argv]), cv=args.cv)
    storage, storage_name = trials.open_storage(args.storage, search.study_dir)
    study = open_study(args, search, storage)
    local = trials.live_local_workers(study) + 1
    if local > args.local_workers:
        print(f"warning: {local} workers of this study run on this machine but --local-workers is "
              f"{args.local_workers}; their threads oversubscribe the cores (restart them with --local-workers "
              f"{local})", file=sys.stderr)
    print(f"study {study.study_name} in {storage_name}: up to {args.trials} trials, objective validation "
          f"{search.metric}{' and trainable parameters' if search.multi_objective else ''}; "
          f"{threads.threads if search.thread_overrides else base.train.cpu_threads} cpu threads per trial", flush=True)
    previous_sigterm = sigterm_raises_keyboard_interrupt()  # outside training, SIGTERM stops the worker like Ctrl-C
    try:
        run_worker(study, search)
    except (KeyboardInterrupt, RunInterrupted) as stop:
        run_folder.close_all_run_folders(run_folder.INTERRUPTED, "the study worker was stopped")
        return report_interrupt(study, search.current, stop)
    finally:
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)
    return write_summary(study, search)


def report_interrupt(study: optuna.Study, number: int | None, stop: BaseException) -> int:
    """SIGTERM or Ctrl-C stopped the worker, and Optuna failed its trial: queue that trial again (it does not count),
    say so, and return the exit code."""
    stopped = [t for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)) if t.number == number]
    what = f"; trial {number} stopped: {trials.queue_retry(study, stopped[0])}" if stopped else ""
    print(f"interrupted{what}; rerun the same command to continue the study", file=sys.stderr)
    sigterm = isinstance(stop, RunInterrupted) and stop.signal_name == "SIGTERM"
    return 128 + (signal.SIGTERM if sigterm else signal.SIGINT)


class _OneLineTrialErrors(logging.Filter):
    """Optuna logs a failed trial with its traceback; a user error in a trial is one line, printed by the objective."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not isinstance(error, (PeftlabError, trials.SurplusTrial))


def main(argv: list[str] | None = None) -> None:
    """`peftlab tune`: exit 0 when the study has a complete trial, 1 when none completed, 2 on a bad input."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    quiet_third_party(args.debug)  # also run as `python -m peftlab.tune`, not through the console
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optimize_log = logging.getLogger("optuna.study._optimize")
    if not any(isinstance(f, _OneLineTrialErrors) for f in optimize_log.filters):
        optimize_log.addFilter(_OneLineTrialErrors())
    try:
        code = tune(args, argv)
    except PeftlabError as err:
        if args.debug:
            raise
        print("error: " + " ".join(str(err).split()), file=sys.stderr)
        sys.exit(2)
    sys.exit(code)


if __name__ == "__main__":
    main()
