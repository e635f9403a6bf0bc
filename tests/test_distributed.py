"""Real 2-process DDP on CPU (gloo) against one process with twice the batch: same losses, exact eval gathering."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from peftlab.errors import PeftlabError
from peftlab.tracking import read_log
from peftlab.training import check_launch_world_size
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


def test_a_process_set_up_alone_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(PeftlabError, match="launched as one of 2 .* set it up as one of 1"):
        check_launch_world_size(1)
    check_launch_world_size(2)
    monkeypatch.delenv("WORLD_SIZE")
    check_launch_world_size(1)  # plain python


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
    launcher = [sys.executable, str(recipe)] if processes == 1 else [*accelerate_launch(processes), str(recipe)]
    done = subprocess.run([*launcher, *recipe_args(task, output_dir, batch_size)], env=RECIPE_ENV, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


RECIPE_ENV = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def accelerate_launch(processes: int, *machine: str) -> list[str]:
    """`accelerate launch` of `processes` CPU processes in all (DDP over gloo); `machine`: the multi-machine flags."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--mixed_precision", "no", "--dynamo_backend", "no", *(machine or ("--num_machines", "1",
                                                                               "--main_process_port", str(free_port())))]


def recipe_args(task: str, output_dir: Path, batch_size: int) -> list[str]:
    return [*RECIPE_CASES[task], *COMMON, f"train.batch_size={batch_size}", f"output_dir={output_dir}"]


def assert_one_run_like(two: Path, one: Path) -> None:
    """Run folder `two` (2 processes x batch 8) trained as `one` (1 process x batch 16): the same steps and losses."""
    metrics_two = json.loads((two / "metrics.json").read_text())
    metrics_one = json.loads((one / "metrics.json").read_text())
    assert metrics_two["global_step"] == metrics_one["global_step"] == 4  # 64 samples / (2 x 8), not 64 / 8
    assert metrics_two["test"]["accuracy"] == metrics_one["test"]["accuracy"]
    assert metrics_two["test"]["confusion_matrix"] == metrics_one["test"]["confusion_matrix"]
    assert metrics_two["validation"]["loss"] == pytest.approx(metrics_one["validation"]["loss"], abs=1e-4)
    losses = [[r["train/loss"] for r in read_log(folder) if "train/loss" in r] for folder in (two, one)]
    assert losses[0] == pytest.approx(losses[1], abs=1e-4)
    assert sum("config" in r for r in read_log(two)) == 1  # one run's log


@pytest.mark.slow
@pytest.mark.parametrize("task", ["text", "image"])
def test_recipe_under_two_processes_is_one_run(tmp_path, task):
    two = launch_recipe(task, tmp_path / "two", processes=2, batch_size=8)
    launch_recipe(task, tmp_path / "one", processes=1, batch_size=16)
    printed = two.stdout + two.stderr
    assert printed.count("test accuracy") == 1 and printed.count(": trainable ") == 1  # one printed result
    assert_one_run_like(tmp_path / "two", tmp_path / "one")


def launch_machines(task: str, output_dir: str | Path, batch_size: int, env: dict, logs: Path,
                    cwds: list[Path] | None = None, machines: int = 2, timeout: float = 300,
                    grace: float = 30) -> list[subprocess.CompletedProcess]:
    """What each of `machines` machines runs in a multi-machine launch (one process each), all on this host:
    `accelerate launch --num_machines M --machine_rank r --main_process_ip 127.0.0.1 ...` with the same config;
    each CompletedProcess holds its machine's console (stdout and stderr, also in `logs`/machine<r>.log) as stdout.
    `cwds`: each machine's working folder (a relative output_dir then lies on each machine's own "disk").

    Once one machine fails the others get `grace` seconds to fail too, then every launcher still running is killed
    with its process group (a rank whose peer died would wait in a collective for gloo's 30-minute timeout); so is
    every launcher after `timeout` seconds, and the test fails."""
    recipe, port = ROOT / "recipes" / f"{task}_classification.py", str(free_port())
    launchers, consoles = [], []
    logs.mkdir(parents=True, exist_ok=True)
    start, timed_out = time.monotonic(), False
    try:
        for rank in range(machines):
            flags = ("--num_machines", str(machines), "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
                     "--main_process_port", port)
            consoles.append((logs / f"machine{rank}.log").open("w+"))
            launchers.append(subprocess.Popen(
                [*accelerate_launch(machines, *flags), str(recipe), *recipe_args(task, output_dir, batch_size)],
                env=env, cwd=cwds[rank] if cwds else None, stdout=consoles[-1], stderr=subprocess.STDOUT, text=True,
                start_new_session=True))
        deadline = start + timeout
        while any(p.poll() is None for p in launchers) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p in launchers):
                deadline = min(deadline, time.monotonic() + grace)
            time.sleep(0.5)
    finally:
        timed_out = time.monotonic() >= start + timeout and any(p.poll() is None for p in launchers)
        for p in launchers:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    for i, console in enumerate(consoles):
        console.seek(0)
        consoles[i] = console.read()
        console.close()
    if timed_out:
        pytest.fail(f"the {machines}-machine launch was still running after {timeout} s: {consoles[0][-3000:]}")
    return [subprocess.CompletedProcess(p.args, p.returncode, console, "") for p, console in zip(launchers, consoles)]


EARLY_PARTIAL_STATE = """import os
if "LOCAL_RANK" in os.environ:  # in the launched workers only, not in the launchers
    from accelerate import PartialState
    PartialState()  # without cpu=True on a machine without a GPU: a process without a process group
"""

# Records each file the rank-1 process opens (to read or to write), creates, renames or deletes under WATCH_DIR, from
# Python's audit events. Files that torch.save and safetensors write from C++/Rust are not seen: rank 1 saves one,
# its RNG state, and shows it by opening it to fsync.
FILES_OF_RANK_1 = """import os, sys
if os.environ.get("RANK") == "1":
    _watched, _log = os.environ["WATCH_DIR"], open(os.environ["FILES_LOG"], "a", buffering=1)
    _WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def _record(event, args):
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            event, paths = "write" if (args[2] or 0) & _WRITE else "read", args[:1]
        elif event in ("os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree"):
            paths = [a for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))]
        else:
            return
        for path in paths:
            path = os.path.abspath(os.fsdecode(path))
            if path.startswith(_watched):
                _log.write(event + " " + os.path.relpath(path, _watched) + "\\n")

    sys.addaudithook(_record)
"""


def with_sitecustomize(folder: Path, code: str, **variables: str) -> dict:
    """The recipe environment with `code` run at the start of every Python process (a sitecustomize module)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(code)
    return {**RECIPE_ENV, **variables, "PYTHONPATH": os.pathsep.join([str(folder), RECIPE_ENV.get("PYTHONPATH", "")])}


@pytest.mark.slow
def test_recipe_on_two_machines_is_one_run(tmp_path):
    """Two machines of one process each (here both on this host, sharing the run folder as machines share a network
    filesystem) train as one run of world size 2: the global batch is one process's with twice the batch, and rank 0
    alone writes the run folder."""
    files = tmp_path / "rank1_files.txt"
    env = with_sitecustomize(tmp_path / "site", FILES_OF_RANK_1, WATCH_DIR=str(tmp_path / "two"), FILES_LOG=str(files))
    machines = launch_machines("text", tmp_path / "two", batch_size=8, env=env, logs=tmp_path / "logs")
    for rank, machine in enumerate(machines):
        assert machine.returncode == 0, f"machine {rank}: {machine.stdout[-3000:]}"
        # accelerate prints on the first process of every machine: each console shows the one run's result.
        assert machine.stdout.count("test accuracy") == 1
    launch_recipe("text", tmp_path / "one", processes=1, batch_size=16)
    assert_one_run_like(tmp_path / "two", tmp_path / "one")
    assert json.loads((tmp_path / "two" / "metrics.json").read_text())["num_processes"] == 2
    # Rank 1 wrote nothing into the run folder but its own RNG state into the checkpoint rank 0 prepared (and it
    # did so at every checkpoint: the shared folders are rank 0's, published by rank 0).
    touched = files.read_text().splitlines()
    assert [line for line in touched if not line.startswith("read ")] == []
    assert "read checkpoints/.tmp-step-4/rng_state_1.pt" in touched
    assert (tmp_path / "two" / "checkpoints" / "step-4" / "rng_state_1.pt").exists()


@pytest.mark.slow
def test_process_set_up_alone_fails_instead_of_training_a_copy(tmp_path):
    """accelerate's process state made before the Accelerator without cpu=True (here at interpreter start) leaves
    each process of the launch without a process group: each fails in one line rather than training the run alone."""
    env = with_sitecustomize(tmp_path / "site", EARLY_PARTIAL_STATE)
    machines = launch_machines("text", tmp_path / "two", batch_size=8, env=env, logs=tmp_path / "logs")
    for machine in machines:
        assert machine.returncode != 0
        assert "launched as one of 2 (WORLD_SIZE) but accelerate set it up as one of 1" in machine.stdout
    assert not (tmp_path / "two" / "metrics.json").exists()


@pytest.mark.slow
def test_machines_that_do_not_share_the_run_folder_fail_in_one_line(tmp_path):
    """`output_dir=run` relative to each machine's own working folder: two disks, as on machines without a shared
    filesystem. Every process would write its RNG state into checkpoints only rank 0's disk has, and load the best
    weights from there: the run stops before training, on every machine, with one line."""
    cwds = [tmp_path / f"machine{rank}" for rank in range(2)]
    for cwd in cwds:
        cwd.mkdir()
    machines = launch_machines("text", "run", batch_size=8, env=RECIPE_ENV, logs=tmp_path / "logs", cwds=cwds)
    for machine in machines:
        assert machine.returncode != 0
        assert "error: output_dir run is another folder on process 1 than on the main process" in machine.stdout
        assert "train:" not in machine.stdout  # no training step was taken
    assert not (cwds[1] / "run").exists()  # nothing written on the second machine's disk
