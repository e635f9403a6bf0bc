"""A run's output folder: peftlab marks the folders it makes, locks them while a run writes, and never deletes others.

The marker `<output_dir>/.peftlab-run.json` records who made the folder and how its run ended:
    {"status": "running" | "finished" | "failed" | "interrupted", "pid": ..., "host": ..., "started": ..., "reason": ...}
The lock `<output_dir>/.peftlab-lock` is held (flock) by the main process of the run writing the folder, and names it.

What a new run does with an existing `output_dir` (`check_output_dir` decides, without side effects):
- missing or empty: start there.
- not marked by peftlab and not empty (`.`, a home folder, a folder of other runs): refused; `overwrite=true` does
  not change that, since nothing proves the files are a run's.
- locked: another run is writing it; refused, naming the holder's process.
- marked, its run not finished (failed, killed, interrupted) and no checkpoint: reused as it is, after a line saying so.
- marked, with a checkpoint or a finished run: `resume_from=latest` continues it; `overwrite=true` moves its files
  aside into `<output_dir>.replaced-<time>` (never deleted: remove that folder yourself once you no longer need it).

A folder of runs (a cross-validation's, whose folds are run folders inside it) is marked and locked the same way, with
`"kind"` in its marker; `check_folder_of_runs` decides for it: the same command always continues it (what its runs
finished is kept), `overwrite=true` moves it aside, and a single run's folder is refused.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from peftlab.checkpointing import checkpoint_root, latest_checkpoint
from peftlab.errors import PeftlabError

MARKER_FILE = ".peftlab-run.json"
LOCK_FILE = ".peftlab-lock"
RUNNING, FINISHED, FAILED, INTERRUPTED = "running", "finished", "failed", "interrupted"

# The locks this process holds, by folder: kept open for the life of the run (closing the file releases the lock).
_HELD: dict[Path, "RunLock"] = {}


@dataclass
class RunLock:
    """An open, flock-ed lock file of one run folder."""

    path: Path
    fd: int

    def release(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


@dataclass(frozen=True)
class FolderState:
    """What `check_output_dir` found: whether the run may start, and what must be done to the folder first."""

    path: Path
    action: str
    """`create` (missing or empty), `reuse` (our own unfinished run without checkpoint: cleared first),
    `resume` (continue from a checkpoint), `replace` (overwrite=true: move the files aside first)."""
    note: Optional[str] = None


def read_marker(output_dir: str | os.PathLike) -> Optional[dict]:
    """The marker of a folder peftlab made, or None (an unreadable marker counts as an interrupted run's)."""
    path = Path(output_dir) / MARKER_FILE
    if not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"status": INTERRUPTED, "reason": f"unreadable {MARKER_FILE}"}
    return marker if isinstance(marker, dict) else {"status": INTERRUPTED}


def lock_holder(output_dir: str | os.PathLike) -> Optional[str]:
    """Who holds the folder's lock (`process 123 on host`), or None when no other process does."""
    path = Path(output_dir) / LOCK_FILE
    if not path.is_file() or Path(output_dir).resolve() in _HELD:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            return Path(path).read_text(encoding="utf-8").strip() or "another process"
        except OSError:
            return "another process"
    finally:
        os.close(fd)  # closing drops the shared lock taken just to test
    return None


def check_output_dir(output_dir: str | os.PathLike, *, resume_from: Optional[str], overwrite: bool) -> FolderState:
    """Decide what a run may do with `output_dir` (see the module docstring); raises PeftlabError, writes nothing."""
    path = Path(output_dir)
    entries = _usable_folder(path)
    if resume_from is not None and resume_from != "latest" and not Path(resume_from).is_dir():
        raise PeftlabError(f"resume_from={resume_from} is not a folder; give a checkpoints/step-<N> folder or latest")
    if not entries:
        if resume_from == "latest":
            raise PeftlabError(f"resume_from={resume_from} but {path} holds no run to resume; "
                               "drop resume_from to start afresh")
        return FolderState(path, "create")
    marker = read_marker(path)
    has_checkpoint = latest_checkpoint(path) is not None
    if marker is None:
        if resume_from is not None and has_checkpoint:  # a run of a peftlab version that did not mark its folders
            return FolderState(path, "resume")
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        raise PeftlabError(f"output_dir {path} is not empty ({shown}) and is not a peftlab run folder, so it is "
                           "never overwritten; choose a new or empty output_dir")
    status = marker.get("status", INTERRUPTED)
    if resume_from is not None:
        if resume_from == "latest" and not has_checkpoint:
            raise PeftlabError(f"resume_from=latest but {checkpoint_root(path)} holds no checkpoint (its run "
                               f"{_ended(marker)}); drop resume_from to start afresh in the same folder")
        return FolderState(path, "resume")
    if overwrite:
        return FolderState(path, "replace")
    if status != FINISHED and not has_checkpoint:
        return FolderState(path, "reuse", note=f"reusing {path}: its previous run {_ended(marker)} before its "
                                               "first checkpoint")
    what = ("a finished run" if status == FINISHED
            else f"a run that {_ended(marker)} (checkpoint {latest_checkpoint(path).name})")
    raise PeftlabError(f"output_dir {path} holds {what}; pass resume_from=latest to continue it, overwrite=true "
                       "to move it aside into a new folder, or choose another output_dir")


def check_folder_of_runs(output_dir: str | os.PathLike, kind: str, *, overwrite: bool) -> FolderState:
    """What a `kind` of folder of runs (e.g. a cross-validation) may do with `output_dir`: `create`, `resume` (the
    same kind: continue, keeping its finished runs) or `replace` (overwrite=true); raises PeftlabError, writes
    nothing."""
    path = Path(output_dir)
    if not _usable_folder(path):
        return FolderState(path, "create")
    marker = read_marker(path)
    if marker is None:
        raise PeftlabError(f"output_dir {path} is not empty and is not a peftlab folder, so it is never overwritten; "
                           "choose a new or empty output_dir")
    if overwrite:
        return FolderState(path, "replace")
    if marker.get("kind") != kind:
        what = f"a {marker['kind']}" if marker.get("kind") else "a single run"
        raise PeftlabError(f"output_dir {path} holds {what}, not a {kind}; choose another output_dir, or "
                           "overwrite=true to move it aside")
    return FolderState(path, "resume")


def _usable_folder(path: Path) -> list[str]:
    """What every output folder must be (not a file, writable, not locked by another run); returns its entries."""
    if path.exists() and not path.is_dir():
        raise PeftlabError(f"output_dir {path} is a file; choose a folder path")
    _check_writable(path)
    entries = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    holder = lock_holder(path) if entries else None
    if holder:
        raise PeftlabError(f"output_dir {path} is in use by {holder}; wait for that run to end or choose another "
                           "output_dir")
    return entries


def _ended(marker: dict) -> str:
    status = marker.get("status", INTERRUPTED)
    if status == FAILED:
        return f"failed ({marker['reason']})" if marker.get("reason") else "failed"
    if status == RUNNING:
        return "was killed"  # nobody holds its lock, yet it never recorded an end
    return status


def _check_writable(path: Path) -> None:
    # The nearest existing folder must take new entries: /proc/x, a read-only mount or a file on the way are refused
    # now, before anything loads.
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise PeftlabError(f"output_dir {path} cannot be created: {existing} is a file; choose a folder path")
    if not os.access(existing, os.W_OK | os.X_OK) or _is_pseudo_filesystem(existing):
        raise PeftlabError(f"output_dir {path} cannot be created: {existing} is not writable; choose a folder you "
                           "can write to")


def _is_pseudo_filesystem(path: Path) -> bool:
    # Root may "write" anywhere by permission bits, but /proc and /sys take no new files.
    resolved = path.resolve()
    return any(resolved == Path(p) or Path(p) in resolved.parents for p in ("/proc", "/sys"))


def open_run_folder(state: FolderState, kind: Optional[str] = None) -> Path:
    """Create (or clear, or move aside) the folder as `state` says, lock it and mark it running. Main process only.

    Args:
        kind: marks a folder of runs (see `check_folder_of_runs`); None for a run's own folder.

    Raises PeftlabError when the folder cannot be created or another process took its lock meanwhile.
    """
    path = state.path
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PeftlabError(f"cannot create output_dir {path}: {err.strerror or err}; choose a folder you can "
                           "write to") from err
    lock = _lock(path)
    try:
        # Decided before the lock was ours: a run that started meanwhile would have taken the lock first.
        if state.action == "replace":
            aside = _move_aside(path)
            print(f"overwrite=true: the previous run in {path} was moved to {aside} (delete it when no longer needed)",
                  file=sys.stderr)
        elif state.action == "reuse":
            _clear(path)
            print(state.note, file=sys.stderr)
        write_marker(path, RUNNING, kind=kind)
    except BaseException:
        lock.release()
        _HELD.pop(path.resolve(), None)
        raise
    return path


def _lock(path: Path) -> RunLock:
    key = path.resolve()
    if key in _HELD:  # an earlier run of this same process (in-process tests, notebooks) ended without releasing
        _HELD.pop(key).release()
    lock_path = path / LOCK_FILE
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        holder = lock_holder(path) or "another process"
        raise PeftlabError(f"output_dir {path} is in use by {holder}; wait for that run to end or choose another "
                           "output_dir") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode())
    _HELD[key] = RunLock(lock_path, fd)
    return _HELD[key]


def _move_aside(path: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = path.with_name(f"{path.name}.replaced-{stamp}")
    n = 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}.replaced-{stamp}-{n}")
    aside.mkdir()
    for entry in path.iterdir():
        if entry.name != LOCK_FILE:
            os.replace(entry, aside / entry.name)
    return aside


def _clear(path: Path) -> None:
    # Only for a folder peftlab marked whose run never reached a checkpoint: what is there is that run's output.
    for entry in path.iterdir():
        if entry.name == LOCK_FILE:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def write_marker(output_dir: str | os.PathLike, status: str, reason: Optional[str] = None,
                 kind: Optional[str] = None) -> None:
    """Record the run's status in its folder (atomically: a kill never leaves half a marker); a folder of runs keeps
    its `kind`."""
    path = Path(output_dir)
    previous = read_marker(path) or {}
    marker = {"status": status, "pid": os.getpid(), "host": socket.gethostname(),
              "started": previous.get("started") if status != RUNNING else time.strftime("%Y-%m-%dT%H:%M:%S"),
              "ended": time.strftime("%Y-%m-%dT%H:%M:%S") if status != RUNNING else None}
    if reason:
        marker["reason"] = reason
    if kind or previous.get("kind"):
        marker["kind"] = kind or previous["kind"]
    tmp = path / f"{MARKER_FILE}.tmp"
    tmp.write_text(json.dumps(marker) + "\n", encoding="utf-8")
    os.replace(tmp, path / MARKER_FILE)


def close_run_folder(output_dir: str | os.PathLike, status: str, reason: Optional[str] = None) -> None:
    """Mark the run's end and release its lock (no-op for a folder this process does not hold)."""
    key = Path(output_dir).resolve()
    lock = _HELD.pop(key, None)
    if lock is None:
        return
    try:
        write_marker(output_dir, status, reason)
    except OSError:
        pass  # the folder went away or the disk is full: the lock still goes
    lock.release()


def close_all_run_folders(status: str, reason: Optional[str] = None) -> list[Path]:
    """End every run folder this process holds (a recipe that raised); returns their paths."""
    paths = list(_HELD)
    for path in paths:
        close_run_folder(path, status, reason)
    return paths
