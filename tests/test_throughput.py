"""peftlab.throughput: tokens of the training steps (real and padded), model FLOPs by the PaLM rule, and what the
training engine records of them."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from peftlab import apply_strategy
from peftlab.throughput import ModelShape, TokenCounter, throughput_record, training_flops, transformer_shape
from tests.tiny_models import build
from tests.tiny_train import SEQ_LEN, TokenTask, reset_accelerate, run, tiny_config, tiny_model

ONE_PROCESS = SimpleNamespace(num_processes=1, device=torch.device("cpu"))


@pytest.fixture(autouse=True)
def fresh_accelerate():
    reset_accelerate()
    yield
    reset_accelerate()


def test_token_counts_are_exact_on_a_hand_built_batch():
    counter = TokenCounter()
    counter.add({"input_ids": torch.zeros(3, 5, dtype=torch.long),
                 "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]),
                 "labels": torch.tensor([0, 1, 0])})
    assert counter.totals(ONE_PROCESS) == (9, 15, 3 * 5 * 5)  # real, padded, sum of B x T^2
    counter.add({"input_ids": torch.zeros(2, 4, dtype=torch.long)})  # no mask: every token is real
    counter.add({"pixel_values": torch.zeros(2, 3, 8, 8)})  # no tokens at all: nothing counted
    assert counter.totals(ONE_PROCESS) == (9 + 8, 15 + 8, 75 + 2 * 4 * 4)
    assert TokenCounter().totals(ONE_PROCESS) == (0, 0, 0)


def test_model_flops_follow_the_palm_rule_for_minilm_shapes():
    # The module docstring's arithmetic: 32 texts padded to 32 tokens on MiniLM.
    minilm = ModelShape(parameters=10_646_784, layers=6, hidden_size=384, trains_every_weight=True)
    flops = training_flops(minilm, padded_tokens=32 * 32, attention_pairs=32 * 32 * 32)
    assert flops == 6 * 10_646_784 * 1024 + 12 * 6 * 384 * 32 * 32**2
    assert flops / 1e9 == pytest.approx(65.4 + 0.9, abs=0.05)


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert"])
def test_shape_is_the_transformer_blocks_and_says_whether_every_weight_trains(family):
    model = build(family)
    blocks = {"bert": lambda m: m.bert.encoder.layer, "roberta": lambda m: m.roberta.encoder.layer,
              "distilbert": lambda m: m.distilbert.transformer.layer}[family](model)
    shape = transformer_shape(apply_strategy(model, "full"))
    assert shape == ModelShape(parameters=sum(p.numel() for p in blocks.parameters()), layers=2, hidden_size=32,
                               trains_every_weight=True)
    lora = transformer_shape(apply_strategy(build(family), "lora", r=2))
    assert lora.layers == 2 and not lora.trains_every_weight
    assert transformer_shape(build("cnn")) is None


def test_record_has_model_flops_only_where_the_rule_holds():
    full = apply_strategy(build("bert"), "full")
    record = throughput_record(full, tokens=90, padded_tokens=120, attention_pairs=1200, step_time_s=2.0)
    shape = transformer_shape(full)
    assert record["train_tokens"] == 90 and record["tokens_per_s"] == 45.0 and record["padded_tokens_per_s"] == 60
    assert record["model_flops"] == training_flops(shape, 120, 1200) and record["model_flops_per_s"] == \
        record["model_flops"] / 2.0
    assert f"N={shape.parameters:,}" in record["model_flops_rule"]
    lora = throughput_record(apply_strategy(build("bert"), "lora", r=2), tokens=90, padded_tokens=120,
                             attention_pairs=1200, step_time_s=2.0)
    assert "model_flops" not in lora and lora["train_padded_tokens"] == 120
    assert throughput_record(build("cnn"), tokens=0, padded_tokens=0, attention_pairs=0, step_time_s=1.0) == {
        "train_tokens": None, "train_padded_tokens": None, "tokens_per_s": None, "padded_tokens_per_s": None}


class PaddedTokenTask(TokenTask):
    """TokenTask whose example i has its last i % 4 positions padded (mask 0)."""

    def __getitem__(self, i):
        example = super().__getitem__(i)
        example["attention_mask"][SEQ_LEN - i % 4:] = 0
        return example


def test_train_records_the_tokens_of_its_steps_and_model_flops_when_every_weight_trains(tmp_path):
    n, epochs = 64, 2
    datasets = (PaddedTokenTask(n, seed=1), TokenTask(23, seed=2))
    result, model, _ = run(tmp_path / "full", tiny_config(epochs=epochs), datasets=datasets,
                           model=tiny_model(freeze=False))
    real = epochs * sum(SEQ_LEN - i % 4 for i in range(n))
    throughput = result.throughput
    assert (throughput["train_tokens"], throughput["train_padded_tokens"]) == (real, epochs * n * SEQ_LEN)
    assert throughput["tokens_per_s"] == pytest.approx(real / result.phases_s["train_steps"])
    shape = transformer_shape(model)
    assert throughput["model_flops"] == training_flops(shape, epochs * n * SEQ_LEN, epochs * n * SEQ_LEN**2)

    reset_accelerate()
    frozen, _, _ = run(tmp_path / "frozen", tiny_config(epochs=epochs), datasets=datasets)  # layer 0 frozen
    assert frozen.throughput["train_tokens"] == real and "model_flops" not in frozen.throughput


def test_token_counts_add_up_over_a_resumed_run(tmp_path):
    from tests.test_training import Interrupt, interrupt_at

    cfg = tiny_config(epochs=3, checkpoint_every=3)
    datasets = (PaddedTokenTask(64, seed=1), TokenTask(23, seed=2))
    reference, _, _ = run(tmp_path / "ref", cfg, datasets=datasets)
    reset_accelerate()
    with pytest.raises(Interrupt):  # after step 9's checkpoint, in the middle of step 10
        run(tmp_path / "run", cfg, datasets=datasets, model=interrupt_at(tiny_model(), 11))
    reset_accelerate()
    resumed, _, _ = run(tmp_path / "run", cfg, datasets=datasets, resume_from="latest")
    counted = ("train_tokens", "train_padded_tokens")
    assert [resumed.throughput[key] for key in counted] == [reference.throughput[key] for key in counted]
