"""A training process killed with SIGKILL mid-epoch resumes from `latest` and ends with the uninterrupted metrics."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from peftlab.checkpointing import latest_checkpoint
from peftlab.tracking import read_log
from tests.tiny_train import SAVE_POINTS, reset_accelerate, run, tiny_config

SCRIPT = Path(__file__).with_name("tiny_train.py")
ARGS = ["--epochs", "3", "--checkpoint-every", "3"]  # 8 steps per epoch: checkpoints at 3, 6 (mid-epoch 1), 9, ...
# tiny_train's defaults match tiny_config's, so the in-process reference below is the same run.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same thread count in every run keeps float sums identical


def start(output_dir: Path, *args: str) -> subprocess.Popen:
    """Start tests/tiny_train.py; its output goes to <output_dir>.log (a full pipe would stall it)."""
    command = [sys.executable, str(SCRIPT), "--output-dir", str(output_dir), *ARGS, *args]
    with open(output_dir.with_suffix(".log"), "a") as log:
        return subprocess.Popen(command, env=ENV, stdout=log, stderr=subprocess.STDOUT)


def finish(process: subprocess.Popen, output_dir: Path) -> dict:
    process.wait(timeout=120)
    assert process.returncode == 0, output_dir.with_suffix(".log").read_text()[-3000:]
    return json.loads((output_dir / "result.json").read_text())


@pytest.mark.slow  # two subprocess runs; the seeded kills below cover it too
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path):
    run_dir = tmp_path / "killed"
    # 0.1 s per training forward: the 2nd checkpoint lands about 0.6 s into training, the run would take 2.4 s.
    process = start(run_dir, "--sleep-per-step", "0.1")
    try:
        deadline = time.monotonic() + 120
        while (latest_checkpoint(run_dir) or Path("step-0")).name != "step-6":
            assert process.poll() is None, run_dir.with_suffix(".log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no second checkpoint within 120 s"
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (run_dir / "result.json").exists()
    progress = json.loads((latest_checkpoint(run_dir) / "progress.json").read_text())
    assert progress["batches_in_epoch"] > 0  # killed mid-epoch: the resumed run must skip the consumed batches

    resumed_process = start(run_dir, "--resume-from", "latest")
    reset_accelerate()  # the uninterrupted reference runs in this process meanwhile, one thread like the others
    reference, _, _ = run(tmp_path / "reference", tiny_config(epochs=3, checkpoint_every=3))
    reset_accelerate()
    resumed = finish(resumed_process, run_dir)
    records = read_log(run_dir)
    restart = max(i for i, r in enumerate(records) if "config" in r)  # the resumed run logs its config first
    assert next(r["step"] for r in records[restart:] if "train/loss" in r) == progress["global_step"] + 1
    assert resumed["global_step"] == reference.global_step == 24
    for got, want in zip(resumed["history"], reference.history, strict=True):
        assert got == pytest.approx(want, abs=1e-6)
    assert resumed["best_metrics"] == pytest.approx(reference.best_metrics, abs=1e-6)


@pytest.mark.slow  # two subprocess runs; the injection points below cover it too
def test_sigkill_during_checkpoint_save_leaves_the_previous_one_loadable(tmp_path):
    run_dir = tmp_path / "killed"
    process = start(run_dir, "--stall-save-at", "6")
    stalled = run_dir / "checkpoints" / ".tmp-step-6" / "STALLED"
    try:
        deadline = time.monotonic() + 120
        while not stalled.exists():
            assert process.poll() is None, run_dir.with_suffix(".log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the save of step 6 never started"
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)  # mid-write: weights of step 6 on disk, optimizer state not
    finally:
        process.kill()
        process.wait()
    assert (run_dir / "checkpoints" / ".tmp-step-6" / "trainable.safetensors").exists()
    assert latest_checkpoint(run_dir).name == "step-3"
    progress = json.loads((latest_checkpoint(run_dir) / "progress.json").read_text())
    assert progress["global_step"] == 3

    resumed = finish(start(run_dir, "--resume-from", "latest"), run_dir)
    reset_accelerate()
    reference, _, _ = run(tmp_path / "reference", tiny_config(epochs=3, checkpoint_every=3))
    reset_accelerate()
    assert resumed["best_metrics"] == pytest.approx(reference.best_metrics, abs=1e-6)
    assert not (run_dir / "checkpoints" / ".tmp-step-6").exists()  # the half-written save was cleared


def killed_then_resumed(run_dir: Path, *kill: str) -> dict:
    """Run with a kill -9 injected at a deterministic point, check it died there, resume from `latest`."""
    process = start(run_dir, *kill)
    process.wait(timeout=120)
    assert process.returncode == -signal.SIGKILL, run_dir.with_suffix(".log").read_text()[-3000:]
    assert not (run_dir / "result.json").exists()
    return finish(start(run_dir, "--resume-from", "latest"), run_dir)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    reset_accelerate()
    reference, _, _ = run(tmp_path_factory.mktemp("reference"), tiny_config(epochs=3, checkpoint_every=3))
    reset_accelerate()
    return reference


# Seeded draws of the training forward at which the process is killed: 24 steps of 3 epochs, checkpoints every 3.
KILL_FORWARDS = sorted(random.Random(11).sample(range(4, 25), 3))


@pytest.mark.slow
@pytest.mark.parametrize("forward", KILL_FORWARDS)
def test_kill_at_a_seeded_step_then_resume_matches_uninterrupted(tmp_path, uninterrupted, forward):
    resumed = killed_then_resumed(tmp_path / "killed", "--kill-at-forward", str(forward))
    assert resumed["global_step"] == uninterrupted.global_step == 24
    for got, want in zip(resumed["history"], uninterrupted.history, strict=True):
        assert got == pytest.approx(want, abs=1e-6)
    assert resumed["best_metrics"] == pytest.approx(uninterrupted.best_metrics, abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("point", list(SAVE_POINTS))
def test_kill_inside_a_checkpoint_write_then_resume_matches_uninterrupted(tmp_path, uninterrupted, point):
    run_dir = tmp_path / "killed"
    resumed = killed_then_resumed(run_dir, "--kill-in-save", f"9:{point}")
    assert resumed["global_step"] == 24
    for got, want in zip(resumed["history"], uninterrupted.history, strict=True):
        assert got == pytest.approx(want, abs=1e-6)
    assert resumed["best_metrics"] == pytest.approx(uninterrupted.best_metrics, abs=1e-6)
    log = run_dir.with_suffix(".log").read_text()
    assert "Traceback" not in log
