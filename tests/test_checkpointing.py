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


def test_crash_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    cfg = tiny_config(epochs=2, checkpoint_every=3)
    reference, _, _ = run(tmp_path / "ref", cfg)
    reset_accelerate()

    real_save = checkpointing._save_torch

    def crash_in_second_save(obj, path):
        if path.parent.name == ".tmp-step-6" and path.name == "optimizer.pt":  # weights and RNG already written
            raise OSError("disk full (simulated)")
        real_save(obj, path)

    monkeypatch.setattr(checkpointing, "_save_torch", crash_in_second_save)
    with pytest.raises(OSError, match="simulated"):
        run(tmp_path / "run", cfg)
    monkeypatch.undo()

    root = tmp_path / "run" / "checkpoints"
    assert (root / ".tmp-step-6" / "trainable.safetensors").exists()  # the half-written save is left aside
    assert not (root / "step-6").exists()
    assert resolve_checkpoint("latest", tmp_path / "run") == root / "step-3"
    reset_accelerate()
    resumed, _, _ = run(tmp_path / "run", cfg, resume_from="latest")
    assert resumed.history == reference.history
    assert not (root / ".tmp-step-6").exists()  # cleaned by the next successful save


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
