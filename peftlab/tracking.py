"""Experiment trackers for accelerate: a JSONL tracker of our own, plus accelerate's built-in ones by name."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from accelerate.tracking import GeneralTracker, on_main_process
from accelerate.utils import is_tensorboard_available, is_wandb_available

from peftlab.errors import PeftlabError

LOG_FILE = "log.jsonl"

# Tracker name -> check that its package is importable. `jsonl` needs nothing beyond the standard library.
_AVAILABLE = {
    "jsonl": lambda: True,
    "tensorboard": is_tensorboard_available,
    "wandb": is_wandb_available,
}


class JsonlTracker(GeneralTracker):
    """Appends one JSON object per `accelerator.log` call to `<output_dir>/log.jsonl`."""

    name = "jsonl"
    requires_logging_directory = False
    main_process_only = True

    def __init__(self, output_dir: str | os.PathLike):
        super().__init__()
        self.path = Path(output_dir) / LOG_FILE

    @property
    def tracker(self):
        return self.path

    @on_main_process
    def start(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)

    @on_main_process
    def store_init_configuration(self, values: dict):
        self._append({"config": values})

    @on_main_process
    def log(self, values: dict, step: int | None = None, **kwargs):
        self._append({"step": step, "time": round(time.time(), 3), **values})

    def _append(self, record: dict) -> None:
        # Open, append, close per record: a killed run keeps every line it logged, and a resumed run appends.
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=str) + "\n")


def build_trackers(names: list[str], output_dir: str | os.PathLike) -> list:
    """Turn tracker names from `train.trackers` into accelerate's `log_with` list; unknown or uninstalled ones raise."""
    log_with = []
    for name in names:
        if name not in _AVAILABLE:
            raise PeftlabError(f"unknown tracker {name!r} in train.trackers; choose from {sorted(_AVAILABLE)}")
        if not _AVAILABLE[name]():
            raise PeftlabError(f"tracker {name!r} is not installed; "
                               f"`pip install {name}` or remove it from train.trackers")
        log_with.append(JsonlTracker(output_dir) if name == "jsonl" else name)
    return log_with


def read_log(output_dir: str | os.PathLike) -> list[dict]:
    """Read back the records of `<output_dir>/log.jsonl` (empty if there is none)."""
    path = Path(output_dir) / LOG_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
