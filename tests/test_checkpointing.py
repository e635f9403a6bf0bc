"""Checkpoint I/O: only trainable tensors, weights_only loading, atomic saves, pointers, pruning, RNG round trip."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import peftlab.checkpointing as checkpointing
from peftlab.checkpointing import (
    get_rng_state,
    latest_checkpoint,
    load_trainable_weights,
    resolve_checkpoint,
    set_rng_state,
)
from peftlab.errors import PeftlabError
from peftlab.saving import trainable_state_dict
from tests.tiny_models import TinyCNN
from tests.tiny_train import reset_accelerate, run, tiny_config, tiny_model


@pytest.fixture(autouse=True)
def fresh_accelerate():
    reset_accelerate()
    yield
    reset_accelerate()


def test_checkpoint_folder_holds_only_trainable_tensors(tmp_path):
    result, model, _ = run(tmp_path, tiny_config(epochs=2, checkpoint_every=3))
    root = tmp_path / "checkpoints"
    # Kept: the newest (final step 16) and the best; older ones pruned.
    kept = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert kept == sorted({"step-16", f"step-{result.best_step}"})
    assert (root / "latest").read_text().strip() == "step-16"
    assert (root / "best").read_text().strip() == f"step-{result.best_step}"
    folder = root / "step-16"
    assert sorted(p.name for p in folder.iterdir()) == [
        "optimizer.pt", "progress.json", "rng_state_0.pt", "scheduler.pt", "trainable.safetensors"
    ]
    saved = load_file(folder / "trainable.safetensors")
    assert saved.keys() == trainable_state_dict(model).keys()
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and not frozen & saved.keys()
    progress = json.loads((folder / "progress.json").read_text())
    assert progress["global_step"] == 16 and progress["epoch"] == 2 and progress["batches_in_epoch"] == 0
    assert progress["history"] == result.history


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "rng_state_0.pt"])
def test_state_files_load_with_weights_only(tmp_path, name):
    run(tmp_path, tiny_config(max_steps=2))
    torch.load(latest_checkpoint(tmp_path) / name, weights_only=True)  # raises on any pickled object


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import errno

    cfg = tiny_config(epochs=2, checkpoint_every=3)
    reference, _, _ = run(tmp_path / "ref", cfg)
    reset_accelerate()

    real_save = checkpointing._save_torch

    def full_disk_in_second_save(obj, path):
        if path.parent.name == ".tmp-step-6" and path.name == "optimizer.pt":  # weights and RNG already written
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, path)

    monkeypatch.setattr(checkpointing, "_save_torch", full_disk_in_second_save)
    root = tmp_path / "run" / "checkpoints"
    with pytest.raises(PeftlabError, match=f"could not write checkpoint step-6 in {root} \\(no space left on device\\); "
                                           f"the previous checkpoint {root / 'step-3'} is intact; free space, then "
                                           "resume with resume_from=latest"):
        run(tmp_path / "run", cfg)
    monkeypatch.undo()

    assert not (root / ".tmp-step-6").exists() and not (root / "step-6").exists()  # the half-written save is gone
    assert resolve_checkpoint("latest", tmp_path / "run") == root / "step-3"
    reset_accelerate()
    resumed, _, _ = run(tmp_path / "run", cfg, resume_from="latest")  # space freed: continues from step 3
    assert resumed.history == reference.history


def test_resume_restores_trainable_batch_norm_statistics(tmp_path):
    # A CNN whose batch norms train: their running statistics are buffers and must travel with the checkpoint.
    g = torch.Generator().manual_seed(0)
    images = torch.randn(40, 3, 8, 8, generator=g)
    labels = (images[:, 0].mean(dim=(1, 2)) > 0).long()
    data = [{"pixel_values": x, "labels": y} for x, y in zip(images, labels)]
    datasets = (data[:32], data[32:])
    cfg = tiny_config(epochs=2, batch_size=4, checkpoint_every=3)

    def cnn():
        torch.manual_seed(0)
        return TinyCNN()

    reference, reference_model, _ = run(tmp_path / "ref", cfg, model=cnn(), datasets=datasets)
    reset_accelerate()
    interrupted = cnn()
    calls = [0]

    def stop_after_step_9(module, _):
        calls[0] += module.training
        if calls[0] == 10:
            raise KeyboardInterrupt

    interrupted.register_forward_pre_hook(stop_after_step_9)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "run", cfg, model=interrupted, datasets=datasets)
    saved = load_file(latest_checkpoint(tmp_path / "run") / "trainable.safetensors")
    assert "blocks.0.3.running_mean" in saved
    reset_accelerate()
    resumed, resumed_model, _ = run(tmp_path / "run", cfg, model=cnn(), datasets=datasets, resume_from="latest")
    assert resumed.history == reference.history
    assert torch.equal(resumed_model.blocks[0][3].running_var, reference_model.blocks[0][3].running_var)


def test_resolve_checkpoint_errors_are_one_line(tmp_path):
    with pytest.raises(PeftlabError, match="holds no checkpoint; drop resume_from"):
        resolve_checkpoint("latest", tmp_path)
    with pytest.raises(PeftlabError, match="is not a peftlab checkpoint"):
        resolve_checkpoint(tmp_path, tmp_path)


def test_loading_into_a_different_trainable_set_is_refused(tmp_path):
    run(tmp_path, tiny_config(max_steps=1))
    other = tiny_model(freeze=False)
    with pytest.raises(PeftlabError, match="does not match the model's trainable parameters"):
        load_trainable_weights(other, latest_checkpoint(tmp_path))


def test_rng_state_round_trip_through_a_weights_only_file(tmp_path):
    torch.save(get_rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(3))
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert expected[:2] == again[:2] and torch.equal(expected[2], again[2])


def _truncate(path):
    path.write_bytes(path.read_bytes()[:100])


class Planted:
    """Unpickling this would run code: a weights_only load must refuse it."""

    def __reduce__(self):
        return (print, ("planted pickle ran",))


@pytest.mark.parametrize("damage,file,problem", [
    (_truncate, "trainable.safetensors", "is truncated or corrupt"),
    (lambda p: p.unlink(), "optimizer.pt", "is missing"),
    (lambda p: p.write_text("{broken"), "progress.json", "is not a valid progress file"),
    (lambda p: torch.save({"state": Planted()}, p), "scheduler.pt", "holds objects other than tensors"),
])
def test_a_damaged_checkpoint_file_is_named_in_one_line(tmp_path, damage, file, problem, capsys):
    run(tmp_path, tiny_config(max_steps=6, checkpoint_every=3))  # keeps step-6 (latest) and the best
    latest = latest_checkpoint(tmp_path)
    damage(latest / file)
    reset_accelerate()
    with pytest.raises(PeftlabError) as error:
        run(tmp_path, tiny_config(max_steps=8, checkpoint_every=3), resume_from="latest")
    message = str(error.value)
    assert message.startswith(f"checkpoint file {latest / file} {problem}")
    assert "\n" not in message and "weights_only=False" not in message
    assert "resume from another checkpoint" in message or "overwrite=true" in message
    assert "planted pickle ran" not in capsys.readouterr().out


def test_changed_batching_is_refused_and_a_run_without_batches_never_spins(tmp_path):
    run(tmp_path, tiny_config(max_steps=3, checkpoint_every=3))  # 64 samples / batch 8: stopped 3 batches in
    reset_accelerate()
    with pytest.raises(PeftlabError, match=r"other batches \(batch_size=8 -> 32, batches_per_epoch=8 -> 2\)"):
        run(tmp_path, tiny_config(max_steps=8, batch_size=32), resume_from="latest")
    # A checkpoint without the batching record (older peftlab) pointing past the end of the epoch: an error, not a hang.
    progress_file = latest_checkpoint(tmp_path) / "progress.json"
    progress = json.loads(progress_file.read_text())
    for key in ("batch_size", "num_processes", "grad_accum_steps", "batches_per_epoch"):
        progress.pop(key)
    progress_file.write_text(json.dumps({**progress, "batches_in_epoch": 5}))
    reset_accelerate()
    with pytest.raises(PeftlabError, match="yielded no training batches"):
        run(tmp_path, tiny_config(max_steps=8, batch_size=32), resume_from="latest")
