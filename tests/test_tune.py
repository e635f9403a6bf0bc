"""`peftlab tune`: search spaces checked before any work, the trial cap and stale trials of a shared study, pruning,
the study's outputs, and real workers in parallel on one journal file and on a PostgreSQL server the test starts."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from peftlab import trials, tune
from peftlab.config import load_config
from peftlab.harness import report
from peftlab.search_space import load_search_space
from tests.test_predict import TEXT_FAST

ROOT = Path(__file__).parents[1]
TEXT_CONFIG = ROOT / "recipes" / "configs" / "minilm_lora_rotten_tomatoes.yaml"
# One-layer MiniLM on 32 texts, 2 steps with an evaluation after each: a trial takes a few seconds.
FAST = [*TEXT_FAST, "train.max_steps=2", "train.eval_every=1", "train.cpu_threads=1"]
SPACE = """
strategy: [lora, head]
params:
  train.lr: {low: 1.0e-4, high: 1.0e-2, log: true}
strategies:
  lora:
    r: [2, 4]
"""


def write_space(folder: Path, text: str = SPACE) -> Path:
    path = folder / "space.yaml"
    path.write_text(text)
    return path


def run_main(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as stopped:
        tune.main(argv)
    return stopped.value.code


# ------------------------------------------------------------------------------------------------------------------
# Search spaces
# ------------------------------------------------------------------------------------------------------------------

SHIPPED = sorted((ROOT / "recipes" / "configs" / "search").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_spaces_load_and_name_their_command(path):
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith(f"# peftlab tune {path.stem} --space recipes/configs/search/{path.name} ")
    default = {"text": TEXT_CONFIG, "image": ROOT / "recipes/configs/efficientnet_lite0_lora_animal_mnist.yaml"}
    space = load_search_space(path, str(default[path.stem]))
    assert len(space.strategies) >= 3
    for strategy in space.strategies:  # every strategy samples its own learning rate
        assert "train.lr" in {p.key for p in space.params_for(strategy)}


def test_conditional_space_samples_each_strategy_its_own_keys(tmp_path):
    space = load_search_space(write_space(tmp_path), str(TEXT_CONFIG))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(12):
        trial = study.ask()
        overrides = space.suggest(trial)
        strategy = trial.params["strategy"]
        seen.add(strategy)
        # lora trials sample r under their own name; head trials never see it
        assert ("lora:r" in trial.params) == (strategy == "lora")
        cfg = load_config(str(TEXT_CONFIG), overrides)
        assert cfg.strategy == strategy and 1e-4 <= cfg.train.lr <= 1e-2
        if strategy == "lora":
            assert cfg.strategy_options["lora"]["r"] == trial.params["lora:r"]
        assert space.trial_overrides(trial.params) == overrides  # a finished trial's config is rebuilt exactly
        study.tell(trial, 0.5)
    assert seen == {"lora", "head"}


# (id, space, a fragment of the one-line error)
BAD_SPACES = [
    ("unknown key", "params: {train.lrr: {low: 1.0e-4, high: 1.0e-2}}",
     "params.train.lrr (low 0.0001): unknown config key 'train.lrr'; did you mean 'train.lr'?"),
    ("empty range", "params: {train.lr: {low: 1.0e-2, high: 1.0e-4}}", "params.train.lr: empty range: low 0.01 > high"),
    ("empty choices", "params: {train.batch_size: []}", "params.train.batch_size: empty list of choices"),
    ("option on the wrong strategy", "strategy: [lora, head]\nstrategies: {head: {r: [4, 8]}}",
     "strategies.head.r: strategy 'head' has no option 'r' (its options: none); r is an option of loha, lokr, "
     "lora, vera"),
    ("another strategy's option by its full key",
     "strategy: [lora, adapter]\nstrategies: {adapter: {strategy_options.lora.r: [4]}}",
     "strategy_options.lora.r is an option of strategy 'lora', not 'adapter'; move it under strategies.lora"),
    ("strategy option among the shared keys", "params: {strategy_options.lora.r: [4, 8]}",
     "a strategy option belongs under strategies.lora"),
    ("value outside the key's range", "params: {train.lr: {low: 0, high: 1.0e-2}}",
     "params.train.lr (low 0.0): train.lr: must be > 0"),
    ("strategy option out of range", "strategies: {lora: {r: {low: 0, high: 8}}}",
     "strategies.lora.r (low 0): strategy_options.lora: strategy 'lora' option r=0 must be >= 1"),
    ("float bound of an int key", "params: {train.epochs: {low: 1.5, high: 3}}",
     "params.train.epochs: low must be an integer"),
    ("unknown strategy", "strategy: [lora, lorra]", "unknown strategy 'lorra'; did you mean 'lora'?"),
    ("key the study sets", "params: {output_dir: [a, b]}", "output_dir cannot be searched"),
    ("range of a text key", "params: {train.optimizer: {low: 1, high: 2}}", "train.optimizer is not a number"),
    ("choice outside a key's values", "params: {train.optimizer: [adamw, adam]}",
     "train.optimizer: expected one of adamw, sgd, got 'adam'"),
    ("section of a strategy not searched", "strategy: lora\nstrategies: {adapter: {size: [8]}}",
     "strategies.adapter is given, but 'adapter' is not among the searched strategies"),
    ("keys wrong together", "params: {data.validation_fraction: [0.2, 0.6], data.test_fraction: [0.1, 0.45]}",
     "with every key at its high end: data.validation_fraction + data.test_fraction must be < 1"),
]


@pytest.mark.parametrize("space, fragment", [c[1:] for c in BAD_SPACES], ids=[c[0] for c in BAD_SPACES])
def test_bad_space_is_one_line_before_any_work(tmp_path, capsys, space, fragment):
    out = tmp_path / "study"
    code = run_main(["text", "--space", str(write_space(tmp_path, space)), "--trials", "2", "--output-dir", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith(f"error: {tmp_path / 'space.yaml'}: "), err
    assert fragment in err
    assert not out.exists()  # nothing written: no study folder, no journal


@pytest.mark.parametrize("extra, fragment", [
    (["output_dir=x"], "peftlab tune sets output_dir per trial; give the study folder with --output-dir"),
    (["--cv", "1"], "--cv must be >= 2 folds"),
    (["--trials", "0"], "--trials must be >= 1"),
])
def test_bad_command_is_one_line(tmp_path, capsys, extra, fragment):
    out = tmp_path / "study"
    code = run_main(["text", "--space", str(write_space(tmp_path)), "--trials", "2", "--output-dir", str(out), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and fragment in err, err
    assert not out.exists()


# ------------------------------------------------------------------------------------------------------------------
# The books of a shared study: cap, stale trials, kept weights (no training)
# ------------------------------------------------------------------------------------------------------------------

def journal_study(folder: Path, name: str = "s") -> optuna.Study:
    storage, _ = trials.open_storage(None, folder)
    return optuna.create_study(study_name=name, storage=storage, load_if_exists=True)


def test_cap_holds_when_workers_ask_at_once(tmp_path):
    # Two workers on one journal ask for trials before either checks the cap: numbers decide who runs.
    a, b = journal_study(tmp_path), journal_study(tmp_path)
    first, second, third = a.ask(), b.ask(), a.ask()
    assert [trials.admitted(a, t.number, cap=2) for t in (first, second, third)] == [True, True, False]
    third.set_user_attr(trials.SURPLUS_ATTR, True)
    a.tell(third, state=TrialState.FAIL)
    a.tell(first, 0.7)
    assert len(trials.counted(b.get_trials())) == 2  # the surplus trial never counts


def dead_worker(number: int) -> dict:
    """A worker record of a process that has exited."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    record = {"host": trials.HOST, "pid": gone.pid, "process_started": trials.psutil.Process(gone.pid).create_time(),
              "trial": number}
    gone.wait()
    return record


def test_stale_trial_of_a_dead_worker_is_failed_retried_and_not_counted(tmp_path):
    study = journal_study(tmp_path)
    stale, alive, fresh = study.ask(), study.ask(), study.ask()
    stale.suggest_float("x", 0, 1)
    stale.set_user_attr(trials.WORKER_ATTR, dead_worker(stale.number))
    alive.set_user_attr(trials.WORKER_ATTR, trials.worker_record(alive.number))
    # `fresh` has no worker record yet, but it started seconds ago: its worker may be about to write one.
    messages = trials.fail_stale_trials(study)
    assert len(messages) == 1 and "is gone" in messages[0] and "queued to run again" in messages[0]
    by_number = {t.number: t for t in study.get_trials()}
    assert by_number[stale.number].state == TrialState.FAIL
    assert by_number[alive.number].state == by_number[fresh.number].state == TrialState.RUNNING
    retry = [t for t in by_number.values() if t.state == TrialState.WAITING]
    assert len(retry) == 1 and retry[0].params == by_number[stale.number].params
    assert retry[0].system_attrs["failed_trial"] == stale.number
    assert {t.number for t in trials.counted(study.get_trials())} == {alive.number, fresh.number}
    assert trials.fail_stale_trials(study) == []  # a second worker finds nothing left to fail
    # The retry, popped by the next ask, carries its original's record: it is not taken for stale.
    popped = study.ask()
    assert popped.number == retry[0].number and trials.stale_reason(study.get_trials()[popped.number],
                                                                     popped.datetime_start) is None


def test_a_trial_is_retried_at_most_max_retries_times(tmp_path):
    study = journal_study(tmp_path)
    trial = study.ask()
    for attempt in range(trials.MAX_RETRIES + 1):
        trial.set_user_attr(trials.WORKER_ATTR, dead_worker(trial.number))
        (message,) = trials.fail_stale_trials(study)
        if attempt < trials.MAX_RETRIES:
            assert "queued" in message
            trial = study.ask()
            assert study.trials[trial.number].system_attrs["retry_history"][-1] == trial.number - 1
    assert "counts as a failed trial" in message
    counted = trials.counted(study.get_trials())
    assert [t.number for t in counted] == [trial.number]  # only the last attempt counts


def test_weights_are_kept_for_the_best_complete_trials_only(tmp_path):
    study = journal_study(tmp_path)
    for value in (0.6, 0.9, 0.8, None):
        trial = study.ask()
        folder = trials.trial_dir(tmp_path, trial.number)
        (folder / "model").mkdir(parents=True)
        (folder / "checkpoints" / "step-1").mkdir(parents=True)
        if value is None:
            study.tell(trial, state=TrialState.PRUNED)
        else:
            study.tell(trial, value)
    running = study.ask()
    (trials.trial_dir(tmp_path, running.number) / "checkpoints").mkdir(parents=True)
    kept = trials.keep_best_weights(study, tmp_path, keep=2, maximize=True)
    assert kept == [1, 2]
    assert [n for n in range(4) if (trials.trial_dir(tmp_path, n) / "model").is_dir()] == [1, 2]
    assert not any((trials.trial_dir(tmp_path, n) / "checkpoints").exists() for n in range(4))
    assert (trials.trial_dir(tmp_path, running.number) / "checkpoints").is_dir()  # a running trial is never touched


# ------------------------------------------------------------------------------------------------------------------
# A study in this process: pruning and outputs
# ------------------------------------------------------------------------------------------------------------------

class PruneTrialOne(optuna.pruners.BasePruner):
    """Prunes trial 1 at its first report: a deterministic stand-in for the median rule."""

    def prune(self, study, trial) -> bool:
        return trial.number == 1


def test_study_prunes_records_and_summarises(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(tune.PRUNERS, "median", PruneTrialOne)
    out = tmp_path / "study"
    code = run_main(["text", "--space", str(write_space(tmp_path)), "--trials", "3", "--output-dir", str(out),
                     "--keep-best", "1", "--seed", "0", *FAST])
    assert code == 0, capsys.readouterr().err
    study = optuna.load_study(study_name="study", storage=trials.open_storage(None, out)[0])
    states = [t.state for t in study.trials]
    assert states == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.COMPLETE]
    pruned = study.trials[1]
    assert list(pruned.intermediate_values) == [round(100 * 16 / 32)]  # step 1 of batch 16 over 32 texts: 0.5 epochs
    # The pruned run stopped at the evaluation that pruned it, then tested and saved like an early-stopped run.
    metrics = json.loads((out / "trials" / "0001" / "metrics.json").read_text())
    assert metrics["global_step"] == 1 and metrics["stopped_early"]
    assert json.loads((out / "trials" / "0000" / "metrics.json").read_text())["global_step"] == 2
    # One benchmark record per trial, which the grid report renders.
    records = sorted((out / "records").glob("*.json"))
    assert [json.loads(p.read_text())["study"]["state"] for p in records] == ["COMPLETE", "PRUNED", "COMPLETE"]
    summary, paths = report.render(out / "records", tmp_path / "report", split="validation")
    assert len(summary.rows) == 3 and "-pruned" in summary.rows[1].strategy
    # best.yaml is the best trial's configuration, loadable as it is; only its weights are kept.
    best = study.best_trial
    cfg = load_config(str(out / "best.yaml"))
    assert cfg.strategy == best.params["strategy"] and cfg.train.lr == pytest.approx(best.params["train.lr"])
    assert "# Train it: accelerate launch recipes/text_classification.py --config" in (out / "best.yaml").read_text()
    assert [p.parent.name for p in sorted((out / "trials").glob("*/model"))] == [f"{best.number:04d}"]
    assert not list((out / "trials").glob("*/checkpoints"))
    table = (out / "trials.md").read_text()
    assert "| 1 | PRUNED |" in table and "pruned at 0.50 epochs" in table
    assert (out / "history.png").stat().st_size > 0
    # The same command again: the study is done, so it only rewrites the summary.
    assert run_main(["text", "--space", str(write_space(tmp_path)), "--trials", "3", "--output-dir", str(out),
                     "--keep-best", "1", "--seed", "0", *FAST]) == 0
    assert len(optuna.load_study(study_name="study", storage=trials.open_storage(None, out)[0]).trials) == 3


class PruneAlways(optuna.pruners.BasePruner):
    def prune(self, study, trial) -> bool:
        return True


def test_a_trial_is_not_pruned_at_its_final_evaluation():
    """Stopping at the last evaluation saves nothing: the trial keeps its value and completes (the median rule once
    marked such trials pruned, which left them out of the best trial)."""
    from peftlab.training import Evaluation

    study = optuna.create_study(direction="maximize", pruner=PruneAlways())
    midway, final = study.ask(), study.ask()
    assert tune.Pruning(midway, "accuracy")(Evaluation(1, 0.5, 16, {"accuracy": 0.6})) is True
    listener = tune.Pruning(final, "accuracy")
    assert listener(Evaluation(2, 1.0, 32, {"accuracy": 0.7}, last=True)) is False and not listener.pruned
    assert study.trials[1].intermediate_values == {100: 0.7}
    # --cv: the same after the last fold.
    fold = type("Fold", (), {"metrics": {"validation": {"accuracy": 0.7}}})
    with pytest.raises(optuna.TrialPruned):
        tune.FoldPruning(study.ask(), "accuracy", folds=2)(fold)  # one fold of two
    last_fold = tune.FoldPruning(study.ask(), "accuracy", folds=1)
    last_fold(fold)
    assert not last_fold.pruned and study.trials[3].intermediate_values == {0: 0.7}


def test_cross_validated_study_scores_trials_by_their_fold_mean(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(tune.PRUNERS, "median", PruneTrialOne)
    out = tmp_path / "study"
    code = run_main(["text", "--space", str(write_space(tmp_path)), "--trials", "2", "--output-dir", str(out),
                     "--cv", "2", "--seed", "0", *FAST])
    assert code == 0, capsys.readouterr().err
    study = optuna.load_study(study_name="study", storage=trials.open_storage(None, out)[0])
    complete, pruned = study.trials
    assert (complete.state, pruned.state) == (TrialState.COMPLETE, TrialState.PRUNED)
    folds = [json.loads((out / "trials" / "0000" / f"fold-{i}" / "metrics.json").read_text()) for i in (0, 1)]
    # train.metric_for_best=auto: 32 Rotten Tomatoes texts can hold twice as many of one class (then macro-F1).
    metric = study.user_attrs[tune.STUDY_ATTR]["metric"]
    assert metric == folds[0]["data_rules"]["metric_for_best"] == folds[1]["data_rules"]["metric_for_best"]
    assert complete.value == pytest.approx(sum(f["validation"][metric] for f in folds) / 2)
    assert list(complete.intermediate_values) == [0, 1]  # reported after each fold
    assert list(pruned.intermediate_values) == [0] and not (out / "trials" / "0001" / "fold-1").exists()
    record = json.loads(sorted((out / "records").glob("*.json"))[0].read_text())
    assert record["cv"] == {"folds": 2, "finished": 2}
    assert record["metrics"]["test"]["accuracy"] == pytest.approx(sum(f["test"]["accuracy"] for f in folds) / 2)


def test_multi_objective_study_trades_the_metric_against_parameters(tmp_path, capsys):
    out = tmp_path / "study"
    code = run_main(["text", "--space", str(write_space(tmp_path)), "--trials", "2", "--output-dir", str(out),
                     "--multi-objective", "--seed", "1", *FAST])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "multi-objective study: pruning is off" in captured.err
    study = optuna.load_study(study_name="study", storage=trials.open_storage(None, out)[0])
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    metric = study.user_attrs[tune.STUDY_ATTR]["metric"]  # train.metric_for_best=auto, resolved from the labels
    for trial in study.trials:  # (validation metric, trainable parameters with the head), never pruned
        assert trial.state == TrialState.COMPLETE and not trial.intermediate_values
        metrics = json.loads((trials.trial_dir(out, trial.number) / "metrics.json").read_text())
        assert metrics["data_rules"]["metric_for_best"] == metric
        assert trial.values == [metrics["validation"][metric], metrics["parameters"]["trainable"]]
    front = {t.number for t in study.best_trials}
    assert (out / "trials.md").read_text().count("Pareto front") == len(front)
    assert load_config(str(out / "best.yaml")).strategy in ("lora", "head")


def test_a_changed_space_cannot_join_the_study(tmp_path, capsys):
    out = tmp_path / "study"
    storage, _ = trials.open_storage(None, out)
    study = optuna.create_study(study_name="study", storage=storage)
    study.set_user_attr(tune.STUDY_ATTR, {"space_sha256": "another"})
    code = run_main(["text", "--space", str(write_space(tmp_path)), "--trials", "2", "--output-dir", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "study 'study' was started with another" in err and "space_sha256" in err


# ------------------------------------------------------------------------------------------------------------------
# Real workers: processes on one journal file, a killed worker, a PostgreSQL server
# ------------------------------------------------------------------------------------------------------------------

def worker(space: Path, out: Path, trials_cap: int, *extra: str, pause: float = 1.0) -> subprocess.Popen:
    """A `python -m peftlab.tune` worker process on the test recipe (each evaluation paused `pause` s)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "TUNE_TEST_PAUSE": str(pause)}
    command = [sys.executable, "-m", "peftlab.tune", str(ROOT / "tests" / "tune_recipe.py"), "--space", str(space),
               "--trials", str(trials_cap), "--output-dir", str(out), "--local-workers", "2", *extra, *FAST]
    log = open(out.parent / f"worker-{time.monotonic_ns()}.log", "w")
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def finish(process: subprocess.Popen, timeout: float = 400) -> int:
    try:
        return process.wait(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()


def check_shared_study(study: optuna.Study, out: Path, cap: int) -> list[optuna.trial.FrozenTrial]:
    """Exactly `cap` trials ran, each once, by two workers at overlapping times; returns the complete ones."""
    complete = [t for t in study.get_trials() if t.state == TrialState.COMPLETE]
    assert len(complete) == cap and len(trials.counted(study.get_trials())) == cap
    # Any other trial is a surplus one, failed at once, with no run folder.
    for trial in study.get_trials():
        if trial.state != TrialState.COMPLETE:
            assert trial.user_attrs.get(trials.SURPLUS_ATTR) and not trials.trial_dir(out, trial.number).exists()
    # Each trial ran once: one run folder and one record per trial, each written by the worker the storage names.
    records = [json.loads(p.read_text()) for p in (out / "records").glob("*.json")]
    assert sorted(r["study"]["trial"] for r in records) == sorted(t.number for t in complete)
    for trial in complete:
        marker = json.loads((trials.trial_dir(out, trial.number) / ".peftlab-run.json").read_text())
        assert marker["status"] == "finished" and marker["pid"] == trial.user_attrs[trials.WORKER_ATTR]["pid"]
    # Both workers ran trials, and two of their trials overlapped in time.
    workers = {t.user_attrs[trials.WORKER_ATTR]["pid"] for t in complete}
    assert len(workers) == 2
    overlapping = [(a.number, b.number) for a in complete for b in complete
                   if a.user_attrs[trials.WORKER_ATTR]["pid"] != b.user_attrs[trials.WORKER_ATTR]["pid"]
                   and a.datetime_start < b.datetime_complete and b.datetime_start < a.datetime_complete]
    assert overlapping, [(t.number, t.datetime_start, t.datetime_complete) for t in complete]
    return complete


@pytest.mark.slow
def test_two_workers_share_one_journal_study(tmp_path):
    out, space = tmp_path / "study", write_space(tmp_path)
    workers = [worker(space, out, 4), worker(space, out, 4)]
    assert [finish(w) for w in workers] == [0, 0], [p.read_text()[-3000:] for p in tmp_path.glob("worker-*.log")]
    study = optuna.load_study(study_name="study", storage=trials.open_storage(None, out)[0])
    check_shared_study(study, out, cap=4)
    assert (out / "best.yaml").is_file() and (out / "trials.md").is_file()


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def worker_in_trial_0(tmp_path: Path) -> tuple[Path, Path, subprocess.Popen]:
    """A slow worker (3 s per evaluation) of a 2-trial study, once trial 0 has trained and evaluated (mid-trial)."""
    out, space = tmp_path / "study", write_space(tmp_path)
    process = worker(space, out, 2, pause=3.0)
    log = trials.trial_dir(out, 0) / "log.jsonl"
    wait_for(lambda: log.is_file() and "eval/accuracy" in log.read_text(), 300, "trial 0 to evaluate")
    return out, space, process


@pytest.mark.slow
def test_killed_worker_restarted_finishes_the_study(tmp_path):
    out, space, first = worker_in_trial_0(tmp_path)
    first.send_signal(signal.SIGKILL)
    first.wait()
    study = optuna.load_study(study_name="study", storage=trials.open_storage(None, out)[0])
    assert study.trials[0].state == TrialState.RUNNING  # a journal has no heartbeat: it stays running
    # The same command again: it fails the killed trial, runs its parameters again, and finishes the study.
    assert finish(worker(space, out, 2, pause=0.0)) == 0, [p.read_text()[-3000:] for p in tmp_path.glob("worker-*")]
    study = optuna.load_study(study_name="study", storage=trials.open_storage(None, out)[0])
    killed, retry, *rest = study.trials
    assert killed.state == TrialState.FAIL and retry.system_attrs["failed_trial"] == 0
    assert retry.state == TrialState.COMPLETE and retry.params == killed.params
    assert [t.state for t in rest] == [TrialState.COMPLETE]
    assert [t.number for t in trials.counted(study.trials)] == [1, 2]  # the killed trial does not count
    assert "retried as #1, not counted" in (out / "trials.md").read_text()


def _postgres_binaries() -> tuple[str, str] | None:
    for initdb in [shutil.which("initdb"), *sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)]:
        if initdb and Path(initdb).with_name("pg_ctl").is_file():
            return initdb, str(Path(initdb).with_name("pg_ctl"))
    return None


@contextlib.contextmanager
def postgres_server():
    """A PostgreSQL server of its own in a temporary folder, on a free port of 127.0.0.1; yields its URL."""
    binaries = _postgres_binaries()
    if binaries is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl): apt-get install postgresql")
    pytest.importorskip("psycopg2", reason="the PostgreSQL driver is missing: pip install psycopg2-binary")
    as_user: list[str] = []
    folder = Path(tempfile.mkdtemp(prefix="peftlab-pg-"))
    if os.geteuid() == 0:  # the server refuses to run as root: run it as the package's `postgres` user
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no postgres user to run the server as")
        os.chown(folder, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    initdb, pg_ctl = binaries
    data = folder / "data"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run([*as_user, initdb, "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync"],
                   check=True, capture_output=True)
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run([*as_user, pg_ctl, "-D", str(data), "-o", options, "-l", str(folder / "server.log"), "-w", "start"],
                   check=True, capture_output=True)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"  # the plain scheme: peftlab picks psycopg2
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_two_workers_share_one_postgresql_study(tmp_path):
    out, space = tmp_path / "study", write_space(tmp_path)
    with postgres_server() as url:
        workers = [worker(space, out, 3, "--storage", url), worker(space, out, 3, "--storage", url)]
        assert [finish(w) for w in workers] == [0, 0], [p.read_text()[-3000:] for p in tmp_path.glob("worker-*")]
        storage = trials.open_storage(url, out)[0]
        study = optuna.load_study(study_name="study", storage=storage)
        check_shared_study(study, out, cap=3)
        assert storage.get_heartbeat_interval() == trials.HEARTBEAT_INTERVAL_S  # RDB workers beat a heartbeat
        storage.remove_session()
        storage.engine.dispose()  # close the connections before the server stops
    assert not (out / "study.journal").exists()  # the study lived in the database only
    assert yaml.safe_load((out / "best.yaml").read_text())["strategy"] in ("lora", "head")


@pytest.mark.slow
def test_sigterm_stops_a_worker_and_its_trial_is_queued_again(tmp_path):
    out, _, process = worker_in_trial_0(tmp_path)
    process.send_signal(signal.SIGTERM)
    # Training saves a checkpoint at its next step and stops; the worker queues the trial again and exits 128 + 15.
    assert finish(process, timeout=120) == 128 + signal.SIGTERM
    study = optuna.load_study(study_name="study", storage=trials.open_storage(None, out)[0])
    stopped, queued = study.trials
    assert stopped.state == TrialState.FAIL and queued.state == TrialState.WAITING
    assert queued.params == stopped.params and queued.system_attrs["failed_trial"] == 0
    assert trials.counted(study.trials) == []  # neither counts: the next worker runs the queued one
    assert json.loads((out / "trials" / "0000" / ".peftlab-run.json").read_text())["status"] == "interrupted"
