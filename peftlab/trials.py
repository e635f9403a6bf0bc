"""The trials of a study that several workers share: its storage, who runs which trial, stale trials, the global
trial cap and whose weights are kept. `peftlab.tune` runs the trials; this module keeps the books.

Storage: an Optuna JournalStorage file (`<study>/study.journal` by default, or any path) or any Optuna RDB URL
(`postgresql://user:password@host/db`, `mysql://...`, `sqlite:///x.db`; a plain `postgresql://` uses psycopg2,
peftlab's `postgres` extra, when psycopg 3, SQLAlchemy 2.1's default driver for it, is not installed). A journal is an append-only log, so a
study survives `kill -9` of any worker and resumes with the same command; several processes on one machine (or on
machines that share the file system) work on one journal, and many machines on one database.

Stale trials: a worker killed mid-trial (`kill -9`, power loss) leaves its trial RUNNING forever. Each worker
records itself in the trial's user attribute `worker` ({host, pid, process start time, trial number}). Before each
new trial, every worker fails the RUNNING trials whose worker ran on its own host and is gone (no process with that
pid and start time); a RUNNING trial that no worker recorded 5 minutes after its start (killed between Optuna's
`ask` and the record) is failed too. On an RDB storage, workers also beat a heartbeat (every 60 s) and Optuna fails
trials whose heartbeat is 180 s old, so a dead machine's trials are failed by any other machine. A journal has no
heartbeats: a trial of a worker that died on another machine is failed when a worker starts on that machine again.

Counting: the cap (`--trials N`) counts trials RUNNING, COMPLETE, PRUNED or FAILED by their configuration (a
PeftlabError in the run, e.g. a loss that became nan). A stale trial, and one stopped by Ctrl-C or SIGTERM, is
failed and its parameters are queued as a new trial (Optuna's `RetryHeartbeatStaleTrialCallback`), at most
MAX_RETRIES times, so a configuration that kills its worker every time ends as one counted failure; a retried trial
does not count, its retry does. The cap holds however the workers race: a worker runs a trial only if fewer than N
counted trials have smaller numbers (the storage gives trial numbers out atomically); otherwise the trial is failed
at once as `surplus`, never counted, and the worker stops. So exactly N trials run, whatever the number of workers.
"""

from __future__ import annotations

import datetime
import shutil
import socket
import time
import warnings
from pathlib import Path
from typing import Sequence

import optuna
import psutil
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from peftlab.errors import PeftlabError

JOURNAL_FILE = "study.journal"
WORKER_ATTR = "worker"
SURPLUS_ATTR = "surplus"
MAX_RETRIES = 2
HEARTBEAT_INTERVAL_S, HEARTBEAT_GRACE_S = 60, 180
UNRECORDED_GRACE_S = 300
HOST = socket.gethostname()
with warnings.catch_warnings():  # "experimental" since Optuna 2.8; what its RDB storage retries stale trials with
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    _RETRY = RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES)


class SurplusTrial(Exception):
    """A trial asked for after the cap was reached by other workers' trials; failed at once and never counted."""


def open_storage(storage: str | None, study_dir: Path) -> tuple[optuna.storages.BaseStorage, str]:
    """The Optuna storage a study lives in, and how to name it in messages.

    Args:
        storage: None (a journal file in `study_dir`), a journal file path, or an Optuna RDB URL (`scheme://...`).
    """
    if storage is None or "://" not in storage:
        path = Path(storage) if storage else Path(study_dir) / JOURNAL_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        backend = optuna.storages.journal.JournalFileBackend(str(path))
        return optuna.storages.JournalStorage(backend), str(path)
    try:
        rdb = _open_rdb(with_installed_driver(storage))
    except ImportError as err:  # Optuna's, raised from the driver's ModuleNotFoundError
        driver = getattr(err.__cause__, "name", None) or "of its URL scheme"
        raise PeftlabError(f"--storage {_hide_password(storage)} needs the database driver {driver}, which is not "
                           "installed; for PostgreSQL: pip install psycopg2-binary (peftlab's postgres extra)") from err
    except Exception as err:  # noqa: BLE001 - SQLAlchemy's connection errors have many types; all mean the same here
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PeftlabError(f"cannot open the study storage {_hide_password(storage)}: {first}; check the URL and "
                           "that the database server is up") from err
    return rdb, _hide_password(storage)


def with_installed_driver(url: str) -> str:
    """`url` with the PostgreSQL driver that is installed: SQLAlchemy 2.1 reads a plain `postgresql://` as psycopg 3,
    while peftlab's `postgres` extra installs psycopg2."""
    import importlib.util

    if (url.startswith("postgresql://") and importlib.util.find_spec("psycopg") is None
            and importlib.util.find_spec("psycopg2") is not None):
        return "postgresql+psycopg2://" + url[len("postgresql://"):]
    return url


def _open_rdb(url: str, attempts: int = 5) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage, with heartbeats. Workers that start together on a new database race to create its tables
    (PostgreSQL: "duplicate key value violates unique constraint"); the losers try again once the tables exist."""
    for attempt in range(attempts):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat_interval
                return optuna.storages.RDBStorage(
                    url, heartbeat_interval=HEARTBEAT_INTERVAL_S, grace_period=HEARTBEAT_GRACE_S,
                    heartbeat_stale_trial_callback=_RETRY, engine_kwargs={"pool_pre_ping": True})
        except ImportError:
            raise
        except Exception:  # noqa: BLE001 - the open_storage caller turns the last one into one line
            if attempt == attempts - 1:
                raise
            time.sleep(1 + attempt)
    raise AssertionError("unreachable")


def _hide_password(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not at or ":" not in credentials:
        return url
    return f"{scheme}{sep}{credentials.split(':')[0]}:***@{host}"


def worker_record(trial_number: int) -> dict:
    """What a worker writes into its trial (user attribute `worker`), so others can tell when it is gone."""
    me = psutil.Process()
    return {"host": HOST, "pid": me.pid, "process_started": me.create_time(), "trial": trial_number}


def worker_alive(record: dict) -> bool:
    """Whether the worker process of `record` (on this host) still runs: same pid, same start time, not a zombie."""
    try:
        process = psutil.Process(record["pid"])
        return (abs(process.create_time() - record["process_started"]) < 1.0
                and process.status() != psutil.STATUS_ZOMBIE)
    except (psutil.NoSuchProcess, psutil.AccessDenied, KeyError, TypeError):
        return False


def stale_reason(trial: FrozenTrial, now: datetime.datetime) -> str | None:
    """Why a RUNNING trial is stale, or None while its worker may still run it (see the module docstring)."""
    record = trial.user_attrs.get(WORKER_ATTR)
    if not isinstance(record, dict) or record.get("trial") != trial.number:  # a retry copies its original's record
        started = trial.datetime_start or now
        if (now - started).total_seconds() < UNRECORDED_GRACE_S:
            return None
        return f"no worker recorded itself in it within {UNRECORDED_GRACE_S} s of its start"
    if record.get("host") != HOST or worker_alive(record):
        return None
    return f"its worker (process {record['pid']} on {record['host']}) is gone"


def fail_stale_trials(study: optuna.Study) -> list[str]:
    """Fail this host's stale RUNNING trials and queue their retries; one message per trial failed here."""
    messages = []
    now = datetime.datetime.now()  # Optuna keeps naive local times
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        reason = stale_reason(trial, now)
        if reason is not None:
            failed = fail_and_retry(study, trial.number)
            if failed is not None:
                messages.append(f"trial {trial.number} was left running ({reason}): failed, and {failed}")
    return messages


def fail_and_retry(study: optuna.Study, number: int) -> str | None:
    """Fail RUNNING trial `number` and queue a retry of its parameters; None when another worker got there first
    (or it finished). Returns what happened to its configuration, for the message."""
    try:
        failed = study.tell(number, state=TrialState.FAIL)
    except (UpdateFinishedTrialError, RuntimeError, ValueError):
        return None  # finished meanwhile, or failed by another worker: the storage lets only one tell win
    return queue_retry(study, failed)


def queue_retry(study: optuna.Study, failed: FrozenTrial) -> str:
    """Queue a new trial with the parameters of a trial that failed for no fault of its configuration (its worker
    died or was stopped), unless it was retried MAX_RETRIES times already; says which."""
    retries = len(failed.system_attrs.get("retry_history", []))
    if retries >= MAX_RETRIES:
        return f"it is not retried again (it failed {retries + 1} times): it counts as a failed trial"
    _RETRY(study, failed)
    return "its parameters are queued to run again (it does not count toward the cap)"


def retried(trials: Sequence[FrozenTrial]) -> set[int]:
    """Numbers of the trials that a later trial retries."""
    return {number for t in trials for number in t.system_attrs.get("retry_history", [])}


def counts(trial: FrozenTrial, retried_numbers: set[int]) -> bool:
    """Whether a trial counts toward the cap (see the module docstring)."""
    if trial.state == TrialState.WAITING or trial.user_attrs.get(SURPLUS_ATTR):
        return False
    return not (trial.state == TrialState.FAIL and trial.number in retried_numbers)


def counted(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """The trials that count toward the cap."""
    again = retried(trials)
    return [t for t in trials if counts(t, again)]


def admitted(study: optuna.Study, number: int, cap: int) -> bool:
    """Whether trial `number` may run: fewer than `cap` counted trials have smaller numbers."""
    earlier = [t for t in study.get_trials(deepcopy=False) if t.number < number]
    return len(counted(earlier)) < cap


def live_local_workers(study: optuna.Study) -> int:
    """Workers of this study running a trial on this host now (by the records in their RUNNING trials)."""
    pids = set()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        record = trial.user_attrs.get(WORKER_ATTR)
        if isinstance(record, dict) and record.get("host") == HOST and worker_alive(record):
            pids.add(record["pid"])
    return len(pids)


def trial_dir(study_dir: Path, number: int) -> Path:
    """The run folder of trial `number`."""
    return Path(study_dir) / "trials" / f"{number:04d}"


def keep_best_weights(study: optuna.Study, study_dir: Path, keep: int, maximize: bool) -> list[int]:
    """Delete `model/` of every finished trial but the `keep` best complete ones (by the first objective), and
    `checkpoints/` of every finished trial (resumable state a finished trial no longer needs). Only folders on this
    machine are touched; a RUNNING trial's never. Returns the numbers whose weights are kept.

    Safe with several workers: values never change, so a trial that fell out of the best N never comes back.
    """
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    complete.sort(key=lambda t: -t.values[0] if maximize else t.values[0])
    kept = {t.number for t in complete[:keep]}
    for trial in trials:
        if not trial.state.is_finished():
            continue
        folder = trial_dir(study_dir, trial.number)
        for run in [folder, *sorted(folder.glob("fold-*"))]:  # a cross-validated trial: one run folder per fold
            shutil.rmtree(run / "checkpoints", ignore_errors=True)
            if trial.number not in kept:
                shutil.rmtree(run / "model", ignore_errors=True)
    return sorted(kept)
