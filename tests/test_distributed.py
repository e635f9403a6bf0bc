"""Real 2-process DDP on CPU (gloo) against one process with twice the batch: same losses, exact eval gathering."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from peftlab.tracking import read_log
from tests.tiny_train import reset_accelerate, run, tiny_config

SCRIPT = Path(__file__).with_name("tiny_train.py")
N_EVAL = 23  # not a multiple of 2 processes x eval batch 8 = 16: the last batch is padded with duplicates


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_processes(output_dir: Path, *args: str) -> dict:
    """`accelerate launch` two CPU processes. (`--cpu --num_processes 2` would silently run one.)"""
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), str(SCRIPT), "--output-dir", str(output_dir), *args,
    ]
    # One thread per process: two processes on two cores.
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((output_dir / "result.json").read_text())


def test_two_processes_match_one_process_with_double_batch(tmp_path):
    # Dropout off: the two processes draw the same masks for different samples, one process draws fresh ones.
    common = ["--dropout", "0", "--eval-every", "4", "--n-eval", str(N_EVAL)]
    two = launch_two_processes(tmp_path / "ddp", "--batch-size", "4", *common)
    assert two["num_processes"] == 2

    reset_accelerate()
    one, _, _ = run(tmp_path / "single", tiny_config(batch_size=8, eval_every=4), n_eval=N_EVAL, dropout=0.0)

    assert two["global_step"] == one.global_step == 16  # 64 samples / (2 x 4) per step x 2 epochs
    losses_two = [r["train/loss"] for r in read_log(tmp_path / "ddp") if "train/loss" in r]
    losses_one = [r["train/loss"] for r in read_log(tmp_path / "single") if "train/loss" in r]
    assert losses_two == pytest.approx(losses_one, abs=1e-4)
    for ddp, single in zip(two["history"], one.history, strict=True):
        assert ddp["n"] == single["n"] == N_EVAL  # gather_for_metrics dropped the padding duplicates
        assert ddp["accuracy"] == single["accuracy"]
        assert ddp["loss"] == pytest.approx(single["loss"], abs=1e-4)
