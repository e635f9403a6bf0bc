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


ROOT = Path(__file__).parents[1]
# Dropout off and no length grouping: then one process at batch 16 sees exactly the batches two processes at 8 share.
RECIPE_CASES = {
    "text": ["model.num_hidden_layers=1", "model.dropout=0", "strategy_options.lora.dropout=0",
             "train.group_by_length=false", "data.max_train_samples=64", "data.max_eval_samples=32"],
    # SGD: Adam divides each gradient by its own running scale, so float noise in a near-zero gradient of a
    # convolution (batch 8 vs 16 kernels) becomes a full-size update (measured: losses 7e-4 apart after 4 steps).
    "image": ["model.dropout=0", "train.optimizer=sgd", "train.lr=0.05", "data.image_size=32", "data.augment=false", "data.max_train_samples=64", "data.max_eval_samples=32"],
}
COMMON = ["train.epochs=1", "train.log_every=1", "train.mixed_precision=no", "train.trackers=[jsonl]", "train.eval_batch_size=16",
          "train.warmup_ratio=0"]


def launch_recipe(task: str, output_dir: Path, processes: int, batch_size: int) -> subprocess.CompletedProcess:
    """The README's multi-process CPU command (or plain python for one process) on a recipe."""
    recipe = ROOT / "recipes" / f"{task}_classification.py"
    launcher = [sys.executable, str(recipe)] if processes == 1 else [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), str(recipe)]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([*launcher, *RECIPE_CASES[task], *COMMON, f"train.batch_size={batch_size}",
                           f"output_dir={output_dir}"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
@pytest.mark.parametrize("task", ["text", "image"])
def test_recipe_under_two_processes_is_one_run(tmp_path, task):
    two = launch_recipe(task, tmp_path / "two", processes=2, batch_size=8)
    one = launch_recipe(task, tmp_path / "one", processes=1, batch_size=16)
    printed = two.stdout + two.stderr
    assert printed.count("test accuracy") == 1 and printed.count(": trainable ") == 1  # one printed result
    metrics_two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    metrics_one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert metrics_two["global_step"] == metrics_one["global_step"] == 4  # 64 samples / (2 x 8), not 64 / 8
    assert metrics_two["test"]["accuracy"] == metrics_one["test"]["accuracy"]
    assert metrics_two["test"]["confusion_matrix"] == metrics_one["test"]["confusion_matrix"]
    assert metrics_two["validation"]["loss"] == pytest.approx(metrics_one["validation"]["loss"], abs=1e-4)
    losses = [[r["train/loss"] for r in read_log(tmp_path / name) if "train/loss" in r] for name in ("two", "one")]
    assert losses[0] == pytest.approx(losses[1], abs=1e-4)
    assert sum("config" in r for r in read_log(tmp_path / "two")) == 1  # one run's log
