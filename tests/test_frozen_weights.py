"""Frozen weights held in the autocast dtype while training (peftlab.frozen_weights): the same numbers as autocast's own
casts, fp32 again afterwards, and only where the module's forward is one autocast op on its own weight."""

from __future__ import annotations

import contextlib

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import peftlab.training as training
from peftlab.frozen_weights import autocast_dtype, frozen_weights_in
from tests.tiny_train import reset_accelerate, run, tiny_config, tiny_model


@pytest.fixture(autouse=True)
def fresh_accelerate():
    reset_accelerate()
    yield
    reset_accelerate()


def frozen_query(model) -> nn.Linear:
    return model.bert.encoder.layer[0].attention.self.query  # layer 0 is frozen in tiny_model


def bf16_run(tmp_path, monkeypatch, cast: bool):
    monkeypatch.setattr(training, "_cpu_has_bf16", lambda: True)
    if not cast:
        monkeypatch.setattr(training, "frozen_weights_in", lambda model, dtype: contextlib.nullcontext(0))
    model = tiny_model()
    seen = []  # the frozen weight's dtype at each training forward
    frozen_query(model).register_forward_pre_hook(lambda module, _: seen.append(module.weight.dtype)
                                                  if module.training else None)
    result, model, _ = run(tmp_path, tiny_config(mixed_precision="auto", epochs=2), model=model)
    return result, model, set(seen)


def test_bf16_training_casts_frozen_weights_once_and_computes_what_autocast_computes(tmp_path, monkeypatch):
    before = {n: p.detach().clone() for n, p in tiny_model().named_parameters()}
    cast, cast_model, cast_dtypes = bf16_run(tmp_path / "cast", monkeypatch, cast=True)
    reset_accelerate()
    plain, plain_model, plain_dtypes = bf16_run(tmp_path / "plain", monkeypatch, cast=False)
    assert cast_dtypes == {torch.bfloat16} and plain_dtypes == {torch.float32}
    # The same losses, evaluations and trained weights, to the bit: autocast would have rounded the same way.
    assert cast.history == plain.history
    for (name, a), b in zip(cast_model.named_parameters(), plain_model.parameters()):
        assert torch.equal(a, b), name
    # Frozen weights are fp32 again after training, and the values they had before it.
    for name, parameter in cast_model.named_parameters():
        assert parameter.dtype == torch.float32, name
        if not parameter.requires_grad:
            assert torch.equal(parameter, before[name]), name


def test_fp32_runs_cast_nothing(tmp_path):
    model = tiny_model()
    seen = []
    frozen_query(model).register_forward_pre_hook(lambda module, _: seen.append(module.weight.dtype))
    run(tmp_path, tiny_config(epochs=1), model=model)
    assert set(seen) == {torch.float32} and autocast_dtype("no") is None


def lora_model(**options):
    config = LoraConfig(r=2, target_modules=["query", "value"], modules_to_save=["classifier"], **options)
    return get_peft_model(tiny_model(freeze=False), config)


def dtypes_inside(model) -> dict[str, torch.dtype]:
    with frozen_weights_in(model, torch.bfloat16):
        return {name: parameter.dtype for name, parameter in model.named_parameters()}


def test_lora_base_layers_and_other_frozen_linears_are_cast_trained_ones_are_not():
    dtypes = dtypes_inside(lora_model())
    layer = "base_model.model.bert.encoder.layer.1."
    assert dtypes[layer + "attention.self.query.base_layer.weight"] == torch.bfloat16  # LoRA's base layer
    assert dtypes[layer + "attention.self.key.weight"] == torch.bfloat16  # a frozen linear elsewhere
    assert dtypes[layer + "attention.self.query.lora_A.default.weight"] == torch.float32  # trains
    assert dtypes["base_model.model.classifier.modules_to_save.default.weight"] == torch.float32  # trains
    assert dtypes["base_model.model.bert.embeddings.word_embeddings.weight"] == torch.float32  # not a linear
    assert dtypes[layer + "attention.output.LayerNorm.weight"] == torch.float32


def test_a_method_that_reads_its_base_weight_keeps_it_fp32():
    # DoRA computes the weight's norm from the base layer's weight itself, outside autocast's matmul.
    dtypes = dtypes_inside(lora_model(use_dora=True))
    layer = "base_model.model.bert.encoder.layer.1."
    assert dtypes[layer + "attention.self.query.base_layer.weight"] == torch.float32
    assert dtypes[layer + "attention.self.key.weight"] == torch.bfloat16


def test_a_weight_tied_to_an_embedding_keeps_fp32():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight  # a tied output layer, as language models have
    model.requires_grad_(False)
    assert dtypes_inside(model) == {"0.weight": torch.float32}


def test_leaving_the_block_restores_the_fp32_weights_also_on_an_error():
    model = lora_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match="stop"):
        with frozen_weights_in(model, torch.bfloat16) as cast:
            # 2 layers x 6 linears (q, k, v, attention output, intermediate, output) x (weight, bias), the pooler's 2
            # and the 2 of the original classifier that peft keeps beside the trained copy.
            assert cast == 2 * 6 * 2 + 2 + 2
            raise RuntimeError("stop")
    for name, parameter in model.named_parameters():
        assert parameter.dtype == torch.float32 and torch.equal(parameter, before[name]), name
