"""Run folders: a user's files are never deleted, a failed run's folder is reused, one run per folder at a time,
and a run stopped by a signal saves and says how to resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from peftlab import PeftlabError
from peftlab.run_folder import (
    FAILED,
    FINISHED,
    MARKER_FILE,
    check_output_dir,
    close_run_folder,
    open_run_folder,
    read_marker,
)
from tests.test_bad_inputs import error_line
from tests.test_checkpointing import Planted
from tests.test_text_recipe import RECIPE, run_main
from tests.tiny_train import reset_accelerate

ROOT = Path(__file__).parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
FAST_CLI = ["model.num_hidden_layers=1", "data.max_train_samples=96", "data.max_eval_samples=32",
            "train.mixed_precision=no", "train.trackers=[jsonl]", "train.batch_size=4", "train.log_every=1"]


def test_overwrite_never_empties_a_folder_peftlab_did_not_make(tmp_path, monkeypatch):
    notes = tmp_path / "notes.txt"
    notes.write_text("keep")
    monkeypatch.chdir(tmp_path)
    for output_dir in (".", str(tmp_path)):
        code, lines = error_line([f"output_dir={output_dir}", "overwrite=true"], tmp_path)
        assert code == 2 and "is not a peftlab run folder" in lines[0]
    assert notes.read_text() == "keep" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_overwrite_moves_a_finished_run_aside(tmp_path, capsys):
    _, run = run_main(tmp_path)
    first_metrics = (run / "metrics.json").read_text()
    run_main(tmp_path, "overwrite=true", "train.max_steps=3")
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert len(aside) == 1 and (aside[0] / "metrics.json").read_text() == first_metrics  # nothing deleted
    assert json.loads((run / "metrics.json").read_text())["global_step"] == 3
    assert read_marker(run)["status"] == FINISHED
    assert f"moved to {aside[0]}" in capsys.readouterr().err


def test_a_failed_run_folder_is_reused_without_overwrite(tmp_path, capsys):
    run = tmp_path / "run"
    open_run_folder(check_output_dir(run, resume_from=None, overwrite=False))
    (run / "log.jsonl").write_text('{"config": {}}\n')
    close_run_folder(run, FAILED, "data.max_length too long")
    # resume_from=latest has nothing to resume: the advice is to drop it, and dropping it works.
    with pytest.raises(PeftlabError, match="holds no checkpoint .*failed .*drop resume_from"):
        run_main(tmp_path, "resume_from=latest")
    metrics, _ = run_main(tmp_path)
    assert metrics["global_step"] == 6
    assert "reusing" in capsys.readouterr().err
    assert sum("config" in json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()) == 1


def test_a_killed_run_with_a_checkpoint_asks_to_resume(tmp_path):
    _, run = run_main(tmp_path, "train.checkpoint_every=2")
    marker = json.loads((run / MARKER_FILE).read_text())
    (run / MARKER_FILE).write_text(json.dumps({**marker, "status": "running"}))  # as if killed -9 after step 6
    with pytest.raises(PeftlabError, match="was killed \\(checkpoint step-6\\); pass resume_from=latest"):
        run_main(tmp_path)


def test_resuming_a_finished_run_keeps_its_recorded_time(tmp_path):
    _, run = run_main(tmp_path)
    before = json.loads((run / "metrics.json").read_text())
    run_main(tmp_path, "resume_from=latest")
    after = json.loads((run / "metrics.json").read_text())
    assert before["train_time_s"] > 0
    for key in ("train_time_s", "samples_per_s", "global_step", "test"):
        assert after[key] == before[key], key


def cli(*args: str) -> list[str]:
    return [sys.executable, str(RECIPE), *FAST_CLI, *args]


@pytest.mark.slow  # three recipe processes, side by side
def test_second_run_on_a_locked_folder_names_the_holder(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from peftlab.run_folder import check_output_dir, open_run_folder; "
        f"open_run_folder(check_output_dir({str(run)!r}, resume_from=None, overwrite=False)); "
        "print('locked', flush=True); time.sleep(600)")], stdout=subprocess.PIPE, text=True, env=ENV)
    attempts = []
    try:
        assert holder.stdout.readline().strip() == "locked"
        # The three attempts run side by side (each mostly imports; one after another they took 39 s).
        attempts += [subprocess.Popen(cli(f"output_dir={run}", *extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=ENV) for extra in ([], ["overwrite=true"], ["resume_from=latest"])]
        for attempt in attempts:
            _, stderr = attempt.communicate(timeout=120)
            assert attempt.returncode == 2, stderr[-2000:]
            assert stderr.strip().splitlines()[-1].startswith(f"error: output_dir {run} is in use by process "
                                                              f"{holder.pid} on ")
    finally:
        for process in [holder, *attempts]:
            process.kill()
            process.wait()
    assert sorted(p.name for p in run.iterdir()) == [".peftlab-lock", MARKER_FILE]


@pytest.mark.slow
def test_two_runs_started_together_never_share_a_folder(tmp_path):
    run = tmp_path / "run"
    runs = [subprocess.Popen(cli(f"output_dir={run}", "train.max_steps=12"), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=ENV) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in runs]
    assert sorted(code for code, _ in results) == [0, 2], [err[-1500:] for _, err in results]
    refused = next(err for code, err in results if code == 2).strip().splitlines()[-1]
    assert "is in use by process" in refused or "holds a finished run" in refused, refused
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert sum("config" in record for record in log) == 1  # one run's log, not two mixed
    assert json.loads((run / "metrics.json").read_text())["global_step"] == 12


@pytest.mark.slow
@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_saves_a_checkpoint_and_prints_the_resume_command(tmp_path, signum, code):
    run = tmp_path / "run"
    process = subprocess.Popen(cli(f"output_dir={run}", "train.max_steps=80"), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        deadline = time.monotonic() + 120
        while not (run / "log.jsonl").is_file() or "train/loss" not in (run / "log.jsonl").read_text():
            assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()[-2000:]
            time.sleep(0.05)
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == code, stderr[-2000:]
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    step = int(last.split(" at step ")[1].split(",")[0])
    assert last.startswith(f"interrupted: {signal.Signals(signum).name} at step {step}, checkpoint ")
    assert last.endswith(f"output_dir={run} train.max_steps=80 resume_from=latest")
    assert (run / "checkpoints" / f"step-{step}").is_dir() and 0 < step < 80
    assert read_marker(run)["status"] == "interrupted"

    resumed = subprocess.run(cli(f"output_dir={run}", "train.max_steps=80", "resume_from=latest"),
                             capture_output=True, text=True, env=ENV, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["global_step"] == 80 and read_marker(run)["status"] == FINISHED


# Resuming a damaged or mismatched run: (id, how the trained run is damaged, arguments, a fragment of the message).
RESUME_CASES = [
    ("resume with another batch size", None, ["resume_from=latest", "train.batch_size=8"], "was taken with other batches"),
    ("truncated checkpoint weights", "trainable.safetensors", ["resume_from=latest"], "is truncated or corrupt"),
    ("missing optimizer state", "optimizer.pt", ["resume_from=latest"], "optimizer.pt is missing"),
    ("broken progress file", "progress.json", ["resume_from=latest"], "is not a valid progress file"),
    ("checkpoint holding a pickled object", "scheduler.pt", ["resume_from=latest"], "holds objects other than tensors"),
    ("output folder in use by another run", "lock", [], "is in use by process 4242 on elsewhere"),
]


def train_tiny_run(folder: Path) -> Path:
    """A finished text run with checkpoints after steps 1 and 2 (the bad-inputs table's fast settings)."""
    # In-process, after other runs: on a CPU with AVX512-BF16 its `auto` precision (bf16) differs from theirs, which
    # accelerate refuses in one process.
    reset_accelerate()
    code, lines = error_line(["train.checkpoint_every=1", f"output_dir={folder}"], folder.parent)
    assert code == 0, lines
    return folder


def damage(run: Path, what: str | None):
    """Break the run's latest checkpoint (or hold its lock) as a case says; returns what must stay open."""
    import fcntl
    import torch

    latest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    if what == "lock":  # another process's lock: an open file description of our own conflicts just the same
        (run / ".peftlab-lock").write_text("process 4242 on elsewhere\n")
        fd = os.open(run / ".peftlab-lock", os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd
    if what == "trainable.safetensors":
        (latest / what).write_bytes((latest / what).read_bytes()[:100])
    elif what == "optimizer.pt":
        (latest / what).unlink()
    elif what == "progress.json":
        (latest / what).write_text("{broken")
    elif what == "scheduler.pt":
        torch.save({"planted": Planted()}, latest / what)
    return None


def resume_error(case, trained: Path, folder: Path) -> tuple[int, list[str], Path]:
    import shutil

    run = folder / "run"
    shutil.copytree(trained, run)
    held = damage(run, case[1])
    try:
        code, lines = error_line([*case[2], f"output_dir={run}"], folder)
    finally:
        if held is not None:
            os.close(held)
    return code, lines, run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_tiny_run(tmp_path_factory.mktemp("trained") / "run")


@pytest.mark.parametrize("case", RESUME_CASES, ids=[case[0] for case in RESUME_CASES])
def test_resuming_a_damaged_run_is_one_line(case, trained, tmp_path, capsys):
    before = sorted(p.name for p in (trained / "checkpoints").iterdir())
    code, lines, run = resume_error(case, trained, tmp_path)
    assert code == 2 and len(lines) == 1, lines
    assert case[3] in lines[0] and "weights_only=False" not in lines[0], lines[0]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before  # no checkpoint added or pruned
    assert "planted pickle ran" not in capsys.readouterr().out
