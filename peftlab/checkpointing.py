"""Resumable checkpoints: trainable weights only, optimizer/scheduler/RNG state and progress, written atomically.

Layout of `<output_dir>/checkpoints/`:
    step-<N>/trainable.safetensors   trainable parameters (+ buffers of modules that train, e.g. batch-norm statistics),
                                     unwrapped names: tiny with a frozen base
    step-<N>/optimizer.pt            optimizer.state_dict()   (tensors and numbers only: loaded with weights_only=True)
    step-<N>/scheduler.pt            scheduler.state_dict()
    step-<N>/rng_state_<rank>.pt     python, numpy, torch and CUDA RNG states of each process
    step-<N>/progress.json           Progress: step, epoch, batches consumed, best metric/step, history, patience
    latest, best                     one line each: the folder name of the newest / best checkpoint
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from peftlab.errors import PeftlabError
from peftlab.saving import trainable_state_dict

CHECKPOINTS_DIR = "checkpoints"
WEIGHTS_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
PROGRESS_FILE = "progress.json"
LATEST = "latest"
BEST = "best"


@dataclass
class Progress:
    """Where a run is: everything besides tensors that a resumed run needs to continue exactly."""

    global_step: int = 0
    epoch: int = 0
    """The epoch to continue in (already advanced when a checkpoint is taken at an epoch's last batch)."""
    batches_in_epoch: int = 0
    """Training batches this process has consumed in `epoch`; a resumed run skips them."""
    best_metric: float | None = None
    best_step: int | None = None
    evals_since_best: int = 0
    history: list[dict] = field(default_factory=list)
    train_time_s: float = 0.0
    """Wall time of training so far (evaluation and earlier checkpoints included), over every resumed part."""
    step_time_s: float = 0.0
    """Time spent in training steps so far (evaluation and checkpointing excluded)."""
    evaluation_s: float = 0.0
    checkpointing_s: float = 0.0
    samples: int = 0
    """Training samples so far, over all processes."""
    tokens: int = 0
    """Real (non-padding) tokens of the training batches so far, over all processes (peftlab.throughput); like the
    padded tokens and attention pairs below, brought up to date at each checkpoint."""
    padded_tokens: int = 0
    attention_pairs: int = 0
    """Sum over training batches of batch size x padded length^2 (attention's FLOPs grow with it)."""
    batch_size: int | None = None
    """Per-process batch size, processes, accumulation and batches per epoch of the run that took the checkpoint:
    a resumed run must batch the data the same way, or `batches_in_epoch` would point at other samples."""
    num_processes: int | None = None
    grad_accum_steps: int | None = None
    batches_per_epoch: int | None = None


def plain_module(accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """The model without what `accelerator.prepare` wrapped around it: DDP and the `torch.compile` wrapper (whose
    state_dict names start with `_orig_mod.`; accelerate's unwrap_model keeps it unless told not to)."""
    return accelerator.unwrap_model(model, keep_torch_compile=False)


def checkpoint_root(output_dir: str | os.PathLike) -> Path:
    """The folder that holds a run's `step-<N>` checkpoints."""
    return Path(output_dir) / CHECKPOINTS_DIR


def step_dir(output_dir: str | os.PathLike, step: int) -> Path:
    """The folder of the checkpoint taken after optimizer step `step`."""
    return checkpoint_root(output_dir) / f"step-{step}"


def save_checkpoint(accelerator, model, optimizer, scheduler, progress: Progress, output_dir) -> Path:
    """Write `checkpoints/step-<N>` atomically on all processes, point `latest` (and `best`) at it, prune the rest."""
    final = step_dir(output_dir, progress.global_step)
    root, name = final.parent, final.name
    tmp = root / f".tmp-{name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a save that was killed part-way
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()

    # Every process writes its own RNG state; model and optimizer are identical across DDP ranks, so rank 0 writes them.
    error = None
    try:
        _save_torch(get_rng_state(), tmp / f"rng_state_{accelerator.process_index}.pt")
        if accelerator.is_main_process:
            weights = trainable_state_dict(plain_module(accelerator, model))
            save_file(weights, tmp / WEIGHTS_FILE, metadata={"format": "pt", "global_step": str(progress.global_step)})
            _fsync(tmp / WEIGHTS_FILE)
            _save_torch(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
            _save_torch(scheduler.state_dict(), tmp / SCHEDULER_FILE)
            _write_text(tmp / PROGRESS_FILE, json.dumps(asdict(progress), indent=1))
    except OSError as err:  # a full disk (ENOSPC), a quota, a vanished folder: the published checkpoints are untouched
        error = err
    if _any_process(accelerator, error is not None):
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(output_dir)
        if error is None:
            reason = "it failed on another process"
        elif error.errno == errno.ENOSPC:
            reason = "no space left on device"
        else:
            reason = error.strerror or str(error)
        kept = (f"the previous checkpoint {previous} is intact; free space, then resume with resume_from=latest"
                if previous else "no earlier checkpoint exists; free space and rerun")
        raise PeftlabError(f"could not write checkpoint {name} in {root} ({reason}); {kept}")

    if accelerator.is_main_process:
        _replace_dir(tmp, final)
        _write_pointer(root, LATEST, name)
        if progress.best_step == progress.global_step:
            _write_pointer(root, BEST, name)
        _prune(root, keep={name, _read_pointer(root, BEST)})
    accelerator.wait_for_everyone()
    return final


def _any_process(accelerator, flag: bool) -> bool:
    """Whether `flag` holds on any process (every process must take the same branch, or the next barrier hangs)."""
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), reduction="sum").item())


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint folder of a run, or None."""
    name = _read_pointer(checkpoint_root(output_dir), LATEST)
    return checkpoint_root(output_dir) / name if name else None


def resolve_checkpoint(resume_from: str | os.PathLike, output_dir: str | os.PathLike) -> Path:
    """Turn `resume_from` ("latest" or a checkpoint folder) into an existing checkpoint folder, or raise."""
    if str(resume_from) == LATEST:
        path = latest_checkpoint(output_dir)
        if path is None:
            raise PeftlabError(f"resume_from=latest but {checkpoint_root(output_dir)} holds no checkpoint; "
                               "drop resume_from to start fresh")
    else:
        path = Path(resume_from)
    if not (path / PROGRESS_FILE).is_file():
        raise PeftlabError(f"{path} is not a peftlab checkpoint (no {PROGRESS_FILE}); "
                           "give a checkpoints/step-<N> folder or latest")
    return path


def load_checkpoint(path: str | os.PathLike, accelerator, model, optimizer, scheduler) -> Progress:
    """Restore trainable weights, optimizer and scheduler from a checkpoint; return its Progress (RNG is separate).

    A missing, truncated or foreign file is one PeftlabError naming it and the way out.
    """
    path = Path(path)
    progress = read_progress(path)
    load_trainable_weights(plain_module(accelerator, model), path)
    saved = load_state(path / OPTIMIZER_FILE)
    try:  # the saved rates (train.lr, head_lr, ...) win, as the scheduler's state would anyway
        optimizer.load_state_dict(saved)
    except ValueError as err:  # torch compares the number and sizes of the parameter groups
        raise PeftlabError(f"checkpoint {path} holds other optimizer parameter groups than this run "
                           f"({str(err).rstrip('.')}); resume with the strategy, model and peftlab version it was "
                           "taken with, or start afresh without resume_from") from err
    scheduler.load_state_dict(load_state(path / SCHEDULER_FILE))
    return progress


def rewrite_progress(path: str | os.PathLike, progress: Progress) -> None:
    """Replace the Progress of a published checkpoint (atomically: the old file stays whole until the rename)."""
    tmp = Path(path) / f".{PROGRESS_FILE}.tmp"
    _write_text(tmp, json.dumps(asdict(progress), indent=1))
    os.replace(tmp, Path(path) / PROGRESS_FILE)


def read_progress(path: str | os.PathLike) -> Progress:
    """The Progress saved in a checkpoint folder."""
    file = Path(path) / PROGRESS_FILE
    try:
        return Progress(**json.loads(file.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError) as err:  # missing, not JSON, or not Progress's fields
        problem = "is missing" if isinstance(err, FileNotFoundError) else "is not a valid progress file"
        raise _broken(file, problem) from err


def load_state(file: str | os.PathLike) -> dict:
    """torch.load of a checkpoint file holding tensors and numbers only (weights_only: no code can run)."""
    file = Path(file)
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise _broken(file, "is missing") from err
    except pickle.UnpicklingError as err:
        # torch's own message suggests weights_only=False, i.e. running whatever code the file holds: never echo it.
        raise _broken(file, "holds objects other than tensors and numbers, so it was not unpickled "
                            "(it could run code)") from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise _broken(file, "is truncated or corrupt") from err


def _broken(file: Path, problem: str) -> PeftlabError:
    checkpoint = file.parent
    others = sorted({p.name for p in (latest_checkpoint(checkpoint.parent.parent), _best(checkpoint.parent)) if p}
                    - {checkpoint.name})
    way_out = (f"resume from another checkpoint (resume_from={checkpoint.parent / others[0]}) or start afresh with "
               "overwrite=true" if others else "start afresh with overwrite=true (or without resume_from)")
    return PeftlabError(f"checkpoint file {file} {problem}; {way_out}")


def _best(root: Path) -> Path | None:
    name = _read_pointer(root, BEST)
    return root / name if name else None


def load_trainable_weights(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Copy a checkpoint's tensors into the model; it must hold every trainable parameter and nothing unknown."""
    file = Path(path) / WEIGHTS_FILE
    if not file.is_file():
        raise _broken(file, "is missing")
    try:
        saved = load_file(file)
    except (SafetensorError, OSError) as err:
        raise _broken(file, "is truncated or corrupt") from err
    targets = dict(model.named_parameters()) | dict(model.named_buffers())
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(trainable - saved.keys()), sorted(saved.keys() - targets.keys())
    if missing or unexpected:
        raise PeftlabError(
            f"checkpoint {path} does not match the model's trainable parameters "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}); resume with the same model and strategy"
        )
    with torch.no_grad():
        for name, tensor in saved.items():
            targets[name].copy_(tensor)


def get_rng_state() -> dict:
    """Python, numpy, torch and CUDA RNG states as plain tensors/numbers (loadable with weights_only=True)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss, "gauss": gauss},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    """Restore what get_rng_state returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_rng_state(path: str | os.PathLike, process_index: int) -> dict:
    """Read one process's RNG state from a checkpoint (rank 0's if the run had fewer processes)."""
    file = Path(path) / f"rng_state_{process_index}.pt"
    if not file.exists():
        file = Path(path) / "rng_state_0.pt"
    return load_state(file)


def _save_torch(obj, path: Path) -> None:
    torch.save(obj, path)
    _fsync(path)


def _write_text(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")
    _fsync(path)


def _fsync(path: Path) -> None:
    # Flush to disk before the rename publishes the folder, so even a power cut cannot publish a half-written file.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_dir(src: Path, dst: Path) -> None:
    # rename(2) is atomic but will not replace a non-empty folder, so an existing one is moved aside first.
    if dst.exists():
        trash = dst.with_name(f".trash-{dst.name}")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(dst, trash)
    os.replace(src, dst)
    _fsync(dst.parent)


def _write_pointer(root: Path, pointer: str, name: str) -> None:
    tmp = root / f".{pointer}.tmp"
    _write_text(tmp, name + "\n")
    os.replace(tmp, root / pointer)


def _read_pointer(root: Path, pointer: str) -> str | None:
    path = root / pointer
    return path.read_text(encoding="utf-8").strip() if path.is_file() else None


def _prune(root: Path, keep: set) -> None:
    # Keep the newest and the best checkpoint; drop older ones and the leftovers of interrupted saves.
    for path in root.iterdir():
        if path.is_dir() and path.name not in keep and path.name.startswith(("step-", ".tmp-", ".trash-")):
            shutil.rmtree(path, ignore_errors=True)
