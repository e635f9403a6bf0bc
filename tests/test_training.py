"""The training loop on a tiny BERT: learning, determinism, accumulation, early stopping, best model, resume, errors."""

from __future__ import annotations

import re

import numpy as np
import safetensors.torch
import pytest
import torch

from peftlab.checkpointing import latest_checkpoint, load_trainable_weights
from peftlab.errors import PeftlabError
from peftlab.strategies import apply_strategy
from peftlab.tracking import read_log
from peftlab.training import build_accelerator, build_optimizer, evaluate, resolve_mixed_precision
import peftlab.training as training
from tests import tiny_models
from tests.tiny_train import TokenTask, accuracy, loaders, reset_accelerate, run, tiny_config, tiny_model


@pytest.fixture(autouse=True)
def fresh_accelerate():
    reset_accelerate()
    yield
    reset_accelerate()


class Interrupt(Exception):
    """Stands for a crash part-way through training."""


def interrupt_at(model, forward_calls: int):
    """Raise Interrupt at the given training forward pass (evaluation forwards are not counted)."""
    calls = [0]

    def hook(module, _):
        if module.training:
            calls[0] += 1
            if calls[0] == forward_calls:
                raise Interrupt

    model.register_forward_pre_hook(hook)
    return model


def train_losses(output_dir) -> dict[int, float]:
    # A resumed run re-logs the steps after its checkpoint; the last record of each step is the one that counted.
    return {r["step"]: r["train/loss"] for r in read_log(output_dir) if "train/loss" in r}


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_loss_decreases_and_task_is_learned(tmp_path):
    result, _, _ = run(tmp_path, tiny_config(epochs=4))
    losses = list(train_losses(tmp_path).values())
    assert len(losses) == result.global_step == 32  # 64 samples / batch 8 = 8 steps x 4 epochs
    assert sum(losses[-8:]) / 8 < 0.7 * sum(losses[:8]) / 8
    # Chance is 0.5; 30% of the tokens are noise and the 23 validation examples leave seeds at 0.78-0.96.
    assert result.best_metrics["accuracy"] >= 0.75
    assert [h["step"] for h in result.history] == [8, 16, 24, 32]  # eval_every=0: once per epoch


def test_same_seed_gives_identical_runs(tmp_path):
    first, model_a, _ = run(tmp_path / "a", tiny_config())
    reset_accelerate()
    second, model_b, _ = run(tmp_path / "b", tiny_config())
    assert first.history == second.history
    assert train_losses(tmp_path / "a") == train_losses(tmp_path / "b")
    for (name, a), b in zip(trainable(model_a).items(), trainable(model_b).values()):
        assert torch.equal(a, b), name


def test_frozen_parameters_unchanged_and_trainable_ones_move(tmp_path):
    model = tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    run(tmp_path, tiny_config(epochs=1), model=model)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) != p.requires_grad, name


def test_grad_accumulation_matches_a_larger_batch(tmp_path):
    # 2 micro-batches of 4 then one step == one batch of 8 (dropout off: its masks differ with the batch shape).
    accumulated, _, _ = run(tmp_path / "acc", tiny_config(batch_size=4, grad_accum_steps=2), dropout=0.0)
    reset_accelerate()
    single, _, _ = run(tmp_path / "big", tiny_config(batch_size=8), dropout=0.0)
    assert accumulated.global_step == single.global_step == 16
    a, b = train_losses(tmp_path / "acc"), train_losses(tmp_path / "big")
    assert a.keys() == b.keys()
    assert max(abs(a[s] - b[s]) for s in a) < 1e-4
    assert accumulated.history[-1]["accuracy"] == single.history[-1]["accuracy"]


def test_early_stopping_after_patience_evaluations(tmp_path):
    # lr=0: the metric never improves after the first evaluation, so patience 2 stops at the third.
    result, _, _ = run(tmp_path, tiny_config(lr=0.0, eval_every=1, early_stopping_patience=2))
    assert result.stopped_early
    assert result.global_step == 3
    assert [h["step"] for h in result.history] == [1, 2, 3]
    assert result.best_step == 1


def test_evaluation_listeners_hear_every_evaluation_and_can_stop_training(tmp_path):
    heard, stopper = [], []
    with training.evaluation_listener(heard.append):
        with training.evaluation_listener(lambda ev: stopper.append(ev.step) or ev.step >= 12):
            result, _, _ = run(tmp_path, tiny_config(epochs=4, eval_every=6))
    # Every listener heard every evaluation, in order; 64 samples / batch 8 = 8 steps an epoch.
    assert [(e.step, e.epoch, e.samples) for e in heard] == [(6, 0.75, 48), (12, 1.5, 96)]
    assert stopper == [6, 12] and heard[0].metrics.keys() >= {"loss", "accuracy"}
    assert result.global_step == 12 and result.stopped_early  # stopped at the evaluation that asked, not at step 32
    # Outside the block nobody listens: the next run trains to its end.
    result, _, _ = run(tmp_path / "after", tiny_config(epochs=1))
    assert result.global_step == 8 and not result.stopped_early and heard[-1].step == 12


def test_model_holds_best_weights_at_the_end(tmp_path):
    result, model, accelerator = run(tmp_path, tiny_config(epochs=4, eval_every=4, lr=3e-2))
    assert result.best_step < result.global_step  # this seed's best is not the last evaluation
    weights = trainable(model)
    assert result.best_checkpoint == str(tmp_path / "checkpoints" / f"step-{result.best_step}")
    load_trainable_weights(model, result.best_checkpoint)
    assert all(torch.equal(weights[n], p) for n, p in trainable(model).items())
    _, eval_loader = loaders(tiny_config(), TokenTask(8, seed=1), TokenTask(23, seed=2))
    evaluation = evaluate(model, accelerator.prepare(eval_loader), accelerator, accuracy)
    assert evaluation.metrics == pytest.approx(result.best_metrics, abs=1e-6)
    assert len(evaluation.predictions) == len(evaluation.references) == 23
    # What train() kept of its best evaluation is what the returned weights predict (cross-validation's out-of-fold
    # predictions come from it), not the last evaluation's.
    kept = result.best_evaluation
    np.testing.assert_array_equal(kept.predictions, evaluation.predictions)
    np.testing.assert_array_equal(kept.references, evaluation.references)
    np.testing.assert_allclose(kept.probabilities, evaluation.probabilities, atol=1e-6)
    np.testing.assert_allclose(kept.probabilities.sum(axis=1), 1.0, atol=1e-6)
    assert (kept.probabilities.argmax(axis=1) == kept.predictions).all()


@pytest.mark.parametrize(
    "overrides, interrupt_forward",
    [
        ({"checkpoint_every": 3}, 11),  # resumes mid-epoch 2 from step 9, with dropout RNG restored
        ({"checkpoint_every": 4}, 10),  # resumes from step 8: the end of epoch 1
        ({"eval_every": 5}, 17),  # checkpoints at evaluations only
        ({"grad_accum_steps": 3, "checkpoint_every": 2}, 20),  # 8 batches / 3 = 3 steps per epoch
    ],
)
def test_interrupted_then_resumed_run_matches_uninterrupted(tmp_path, overrides, interrupt_forward):
    cfg = tiny_config(epochs=3, **overrides)
    reference, reference_model, _ = run(tmp_path / "ref", cfg)
    reset_accelerate()
    with pytest.raises(Interrupt):
        run(tmp_path / "run", cfg, model=interrupt_at(tiny_model(), interrupt_forward))
    reset_accelerate()
    resumed, resumed_model, _ = run(tmp_path / "run", cfg, resume_from="latest")
    assert resumed.history == reference.history
    assert resumed.global_step == reference.global_step
    assert train_losses(tmp_path / "run") == train_losses(tmp_path / "ref")
    for (name, a), b in zip(trainable(reference_model).items(), trainable(resumed_model).values()):
        assert torch.equal(a, b), name
    # The best evaluation's outputs, kept in memory or (best before the resume) recomputed from the best weights.
    np.testing.assert_array_equal(resumed.best_evaluation.predictions, reference.best_evaluation.predictions)
    np.testing.assert_allclose(resumed.best_evaluation.probabilities, reference.best_evaluation.probabilities,
                               atol=1e-6)


def test_non_finite_loss_names_the_step_and_keeps_the_last_checkpoint(tmp_path):
    model = tiny_model()
    calls = [0]

    def poison(module, _, output):
        calls[0] += module.training
        if calls[0] == 5:
            output.loss = output.loss * float("nan")
        return output

    model.register_forward_hook(poison)
    with pytest.raises(PeftlabError) as err:
        run(tmp_path, tiny_config(checkpoint_every=2), model=model)
    last_good = latest_checkpoint(tmp_path)
    assert last_good.name == "step-4"
    assert re.fullmatch(
        rf"loss became nan at step 5; lower train.lr or set train.max_grad_norm; last good checkpoint: {last_good}",
        str(err.value),
    )
    reset_accelerate()
    resumed, _, _ = run(tmp_path, tiny_config(checkpoint_every=2), resume_from="latest")
    assert resumed.global_step == 16


def test_max_steps_stops_mid_epoch_and_evaluates_there(tmp_path):
    result, _, _ = run(tmp_path, tiny_config(max_steps=5))
    assert result.global_step == 5
    assert [h["step"] for h in result.history] == [5]
    assert latest_checkpoint(tmp_path).name == "step-5"


def test_jsonl_log_has_config_losses_and_metrics(tmp_path):
    result, _, _ = run(tmp_path, tiny_config(log_every=4))
    records = read_log(tmp_path)
    assert records[0]["config"]["train.log_every"] == 4
    assert [r["step"] for r in records if "train/loss" in r] == [4, 8, 12, 16]
    assert all("train/lr" in r for r in records if "train/loss" in r)
    evals = [r for r in records if "eval/accuracy" in r]
    assert [r["eval/accuracy"] for r in evals] == [h["accuracy"] for h in result.history]
    assert result.samples_per_s > 0 and result.peak_memory_mb > 0 and result.train_time_s > 0


def test_bf16_autocast_trains(tmp_path, monkeypatch):
    monkeypatch.setattr(training, "_cpu_has_bf16", lambda: True)
    result, _, accelerator = run(tmp_path, tiny_config(mixed_precision="auto", epochs=4))
    assert accelerator.mixed_precision == "bf16"
    assert result.best_metrics["accuracy"] >= 0.75  # chance 0.5, as in test_loss_decreases_and_task_is_learned


def test_mixed_precision_choices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(PeftlabError, match="fp16 needs a CUDA GPU"):
        resolve_mixed_precision("fp16")
    monkeypatch.setattr(training, "_cpu_has_bf16", lambda: False)
    assert resolve_mixed_precision("auto") == "no"
    monkeypatch.setattr(training, "_cpu_has_bf16", lambda: True)
    assert resolve_mixed_precision("auto") == "bf16"
    assert resolve_mixed_precision("no") == "no"
    # On a CPU, auto keeps a convolutional model fp32 when training runs backward through its convolutions (bf16
    # slows that backward there) ...
    assert resolve_mixed_precision("auto", tiny_models.build("cnn")) == "no"
    assert resolve_mixed_precision("auto", apply_strategy(tiny_models.build("cnn"), "lora")) == "no"
    assert resolve_mixed_precision("auto", apply_strategy(tiny_models.build("cnn"), "bitfit")) == "no"
    # ... not when only its head trains: the backbone runs forward only, which bf16 speeds up ...
    assert resolve_mixed_precision("auto", apply_strategy(tiny_models.build("cnn"), "head")) == "bf16"
    assert resolve_mixed_precision("auto", tiny_models.build("bert")) == "bf16"
    assert resolve_mixed_precision("auto", tiny_models.build("vit")) == "bf16"
    assert resolve_mixed_precision("bf16", tiny_models.build("cnn")) == "bf16"  # ... but a stated choice stands
    # ... while on CUDA, bf16 serves convolutions too (tensor cores).
    monkeypatch.setattr(training, "cuda_in_use", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve_mixed_precision("auto", tiny_models.build("cnn")) == "bf16"


def test_trackers_unknown_or_missing_are_user_errors(tmp_path):
    with pytest.raises(PeftlabError, match="unknown tracker 'mlflowx'"):
        build_accelerator(tiny_config(trackers=["mlflowx"]), tmp_path)
    pytest.importorskip("tensorboard")
    accelerator = build_accelerator(tiny_config(trackers=["tensorboard", "jsonl"]), tmp_path)
    assert [str(t) for t in accelerator.log_with][0] == "tensorboard"


def test_wandb_requested_but_not_installed(tmp_path, monkeypatch):
    monkeypatch.setitem(training.build_trackers.__globals__["_AVAILABLE"], "wandb", lambda: False)
    with pytest.raises(PeftlabError, match="tracker 'wandb' is not installed"):
        build_accelerator(tiny_config(trackers=["wandb"]), tmp_path)


def test_optimizer_skips_decay_on_biases_and_norms_and_frozen_params():
    model = tiny_model()
    adamw = build_optimizer(model, tiny_config(weight_decay=0.1))
    decayed, plain = adamw.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(names[id(p)].endswith(("bias", "LayerNorm.weight")) for p in plain["params"])
    assert all(p.requires_grad for group in adamw.param_groups for p in group["params"])
    sgd = build_optimizer(model, tiny_config(optimizer="sgd", momentum=0.8))
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.8


def test_compiled_training_follows_eager_and_saves_the_plain_module(tmp_path, monkeypatch):
    # aot_eager, as `accelerate launch --dynamo_backend aot_eager` names it: dynamo's graphs and AOTAutograd's joint
    # forward-backward, without inductor's code generation (minutes of C++ compiling on a small CPU; inductor itself
    # trains the text recipe in test_text_recipe.py's slow test).
    eager, _, _ = run(tmp_path / "eager", tiny_config(epochs=1), dropout=0.0)
    reset_accelerate()
    torch._dynamo.reset()
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "AOT_EAGER")
    compiled, model, _ = run(tmp_path / "compiled", tiny_config(epochs=1, compile=True), dropout=0.0)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it did run through dynamo
    assert list(train_losses(tmp_path / "compiled").values()) == pytest.approx(
        list(train_losses(tmp_path / "eager").values()), abs=1e-5)
    assert compiled.best_metrics == pytest.approx(eager.best_metrics, abs=1e-5)
    # The checkpoint holds the plain module's names, so a resume or `peftlab.load` of an eager build finds them.
    saved = safetensors.torch.load_file(latest_checkpoint(tmp_path / "compiled") / "trainable.safetensors")
    assert saved and not [name for name in saved if "_orig_mod" in name]
    assert set(saved) == {name for name, p in model.named_parameters() if p.requires_grad}


def test_compile_without_a_cpp_compiler_is_refused_in_one_line(monkeypatch):
    from torch._inductor import config as inductor_config

    monkeypatch.setattr(inductor_config.cpp, "cxx", ("no-such-c++",))  # what a machine without g++ finds
    with pytest.raises(PeftlabError, match=r"^train.compile=true builds its CPU kernels with a C\+\+ compiler and "
                                           r"found none .*; install g\+\+ or set train.compile=false$"):
        training.check_compile(True)
    training.check_compile(False)  # off: nothing to build
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "AOT_EAGER")
    training.check_compile(True)  # a backend without generated code needs no compiler
