"""What a benchmark record holds besides metrics: package versions, the git commit, a hash of the data, file sizes."""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import platform
import subprocess
from pathlib import Path

from peftlab.harness.programs import REPO_ROOT, Program

PACKAGES = ("peftlab", "torch", "transformers", "peft", "accelerate", "datasets", "scikit-learn")


@functools.cache
def environment() -> dict:
    """Python, platform, device and the versions of the packages a result depends on."""
    import torch

    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    if torch.cuda.is_available():
        device = f"cuda: {torch.cuda.get_device_name(0)}"
    else:
        device = f"cpu: {_cpu_model()}, {os.cpu_count()} cores"
    return {"python": platform.python_version(), "platform": platform.platform(), "device": device,
            "versions": versions}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


@functools.cache
def git_state() -> dict:
    """The commit the code ran from, and whether tracked files differed from it (`dirty`)."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    sha = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"sha": sha, "dirty": None if status is None else bool(status)}


def source_fingerprint(program: Program) -> str:
    """sha256 over the paths and bytes of the code a cell of `program` runs, as it is right now: the peftlab package,
    the program's script and the recipe configs (other recipes are left out, so editing them changes nothing here).

    With uncommitted changes the commit SHA alone does not say which code produced a number; this does.
    """
    patterns = ("peftlab/**/*.py", "peftlab/**/*.json", "recipes/configs/**/*.yaml")
    files = {p for pattern in patterns for p in REPO_ROOT.glob(pattern) if "__pycache__" not in p.parts}
    files.add(REPO_ROOT / program.script)  # a job's script may live outside the checkout (an absolute path)
    digest = hashlib.sha256()
    for path in sorted(files):
        shown = path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path
        digest.update(f"{shown.as_posix()}\0".encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def folder_size(path: Path) -> int:
    """Bytes of all files under `path` (0 when it does not exist)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


# A run's splits rebuilt from the resolved `data` section of its record (the same call the recipe makes). Keys that
# records written before a DataConfig field existed lack take that field's default.
def _load_splits(task: str | None, data: dict):
    if task not in ("text", "image"):
        return None
    import dataclasses

    from peftlab.config import DataConfig
    from peftlab.data import load_data

    known = {f.name for f in dataclasses.fields(DataConfig)}
    return load_data(DataConfig(**{k: v for k, v in data.items() if k in known}), task).splits


def data_fingerprint(task: str | None, data: dict) -> dict | None:
    """sha256 of the exact train/validation/test examples a run used, independent of their order.

    Each example hashes to sha256(label, text or image pixels); a split hashes its sorted example hashes, and the
    data hash covers the split names and hashes. Two runs with the same hash saw the same examples in each split.
    Args:
        task: "text" or "image" (picks the loader, as the program's `task` says; None: no hash).
        data: the run's resolved `data` config section (from its config.yaml).
    """
    key = json.dumps([task, data], sort_keys=True)
    return _fingerprint_cached(key)


@functools.lru_cache(maxsize=8)  # one grid task = one data config: hash it once per runner process
def _fingerprint_cached(key: str) -> dict | None:
    task, data = json.loads(key)
    splits = _load_splits(task, data)
    return None if splits is None else splits_fingerprint(splits)


def splits_fingerprint(splits) -> dict:
    """The data hash of {split name: dataset with `label` and `text` or `image`}, and each split's size."""
    total, rows = hashlib.sha256(), {}
    for name in sorted(splits):
        split = splits[name]
        content_column = "text" if "text" in split.column_names else "image"
        digests = sorted(_example_digest(content, label)
                         for content, label in zip(split[content_column], split["label"]))
        total.update(f"{name}:{hashlib.sha256(b''.join(digests)).hexdigest()}\n".encode())
        rows[name] = len(digests)
    return {"sha256": total.hexdigest(), "rows": rows,
            "rule": "per split: sha256 of the sorted sha256(label, text or image pixels) of its examples"}


def _example_digest(content, label) -> bytes:
    digest = hashlib.sha256(f"{label}\0".encode())
    if isinstance(content, str):
        digest.update(content.encode())
    else:  # a PIL image: its mode, size and pixels, not the file encoding
        digest.update(f"{content.mode}{content.size}".encode())
        digest.update(content.tobytes())
    return digest.digest()
