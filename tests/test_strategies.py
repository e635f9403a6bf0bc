"""Every strategy x every tiny backbone family: what trains, a step changes exactly that, save/load, merge."""

from __future__ import annotations

import pytest
import torch

from peftlab import PeftlabError, apply_strategy, count_parameters, list_strategies
from peftlab.heads import is_in_modules
from peftlab.saving import TRAINABLE_FILE, load_trained, merge, save_trained
from tests.tiny_models import build, example_batch

FAMILIES = ["bert", "roberta", "distilbert", "vit", "cnn"]

# strategy label -> (name, options). CNNs have no attention, so they take Pfeiffer adapters after the 1x1 convs.
CASES = {
    "full": ("full", {}),
    "head": ("head", {}),
    "partial": ("partial", {"top_k": 1}),
    "bitfit": ("bitfit", {}),
    "lora": ("lora", {"r": 4}),
    "adapter-houlsby": ("adapter", {"kind": "houlsby", "size": 4}),
    "adapter-pfeiffer": ("adapter", {"kind": "pfeiffer", "size": 4}),
}
CNN_OPTIONS = {"adapter-pfeiffer": {"kind": "pfeiffer", "size": 4, "locations": ["2"]}}


def expected_trainable(label: str, family: str, name: str) -> bool:
    """Independent statement of what each strategy promises to train (names of the base model)."""
    head = ["fc"] if family == "cnn" else (["pre_classifier", "classifier"] if family == "distilbert" else ["classifier"])
    name = name.removeprefix("base_model.model.").replace(".modules_to_save.default", "")
    if ".original_module." in name:
        return False
    in_head = is_in_modules(name, head)
    blocks = {"bert": "bert.encoder.layer", "roberta": "roberta.encoder.layer",
              "distilbert": "distilbert.transformer.layer", "vit": "vit.layers", "cnn": "blocks"}[family]
    if label == "full":
        return True
    if label == "head":
        return in_head
    if label == "partial":
        above = {"bert": ["bert.pooler"], "vit": ["vit.layernorm"]}.get(family, [])
        return in_head or is_in_modules(name, [f"{blocks}.1" if family != "cnn" else f"{blocks}.2"] + above)
    if label == "bitfit":
        return in_head or name.endswith("bias")
    if label == "lora":
        return in_head or ".lora_" in name
    if label == "adapter-houlsby":
        is_norm = "LayerNorm" in name or "layer_norm" in name or "layernorm_" in name
        return in_head or ".peftlab_adapter." in name or (name.startswith(blocks) and is_norm)
    if label == "adapter-pfeiffer":
        return in_head or ".peftlab_adapter." in name
    raise AssertionError(label)


def cases():
    for family in FAMILIES:
        for label, (name, options) in CASES.items():
            if family == "cnn" and label == "adapter-houlsby":
                continue  # tested as an error below
            if family == "cnn":
                options = CNN_OPTIONS.get(label, options)
            yield pytest.param(family, label, name, options, id=f"{family}-{label}")


def adapt(family, name, options, seed=0):
    return apply_strategy(build(family, seed), name, **options)


def logits(model, batch):
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        return model(**inputs).logits


def train_steps(model, batch, steps=2):
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    for _ in range(steps):  # two steps: LoRA's A and an adapter's down projection get gradients only once B/up != 0
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    model.eval()


@pytest.mark.parametrize("family,label,name,options", list(cases()))
def test_trainable_set_and_step(family, label, name, options):
    model = adapt(family, name, options)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {n for n, _ in model.named_parameters() if expected_trainable(label, family, n)}
    assert trainable == expected
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_steps(model, example_batch(family))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed <= trainable, f"frozen parameters changed: {sorted(changed - trainable)[:5]}"
    # Some trainable tensors can have an exactly-zero gradient (an attention key bias); nearly all must move.
    assert len(changed) >= 0.8 * len(trainable)


@pytest.mark.parametrize("family,label,name,options", list(cases()))
def test_save_load_onto_fresh_base_reproduces_outputs(family, label, name, options, tmp_path):
    model = adapt(family, name, options)
    batch = example_batch(family)
    train_steps(model, batch)
    expected = logits(model, batch)
    save_trained(model, tmp_path)
    if name not in ("full", "lora"):
        # only what trained is written
        from safetensors.torch import load_file

        saved = set(load_file(tmp_path / TRAINABLE_FILE))
        assert {n for n, p in model.named_parameters() if p.requires_grad} <= saved
        assert all(n.split(".")[-1] in ("running_mean", "running_var", "num_batches_tracked") for n in saved - {
            n for n, p in model.named_parameters() if p.requires_grad})
    reloaded = load_trained(build(family), tmp_path).eval()
    torch.testing.assert_close(logits(reloaded, batch), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family,label,name,options",
                         [c for c in cases() if c.values[1] in ("lora", "adapter-houlsby", "adapter-pfeiffer")])
def test_output_unchanged_at_initialisation(family, label, name, options):
    batch = example_batch(family)
    base_logits = logits(build(family), batch)
    torch.testing.assert_close(logits(adapt(family, name, options), batch), base_logits, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_merge_is_exact_and_idempotent(family):
    model = adapt(family, "lora", {"r": 4})
    batch = example_batch(family)
    train_steps(model, batch)
    expected = logits(model, batch)
    merged = merge(model)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    assert (logits(merged, batch) - expected).abs().max() < 1e-4
    torch.testing.assert_close(logits(merge(merged), batch), logits(merged, batch), atol=0, rtol=0)


@pytest.mark.parametrize("family", ["bert", "roberta", "vit"])
def test_merged_lora_loads_with_plain_from_pretrained(family, tmp_path):
    model = adapt(family, "lora", {"r": 4})
    batch = example_batch(family)
    train_steps(model, batch)
    expected = logits(model, batch)
    merge(model).save_pretrained(tmp_path)
    reloaded = type(build(family)).from_pretrained(tmp_path).eval()
    assert (logits(reloaded, batch) - expected).abs().max() < 1e-4


def test_saved_lora_loads_with_peft(tmp_path):
    from peft import PeftModel

    model = adapt("bert", "lora", {"r": 4})
    batch = example_batch("bert")
    train_steps(model, batch)
    save_trained(model, tmp_path)
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "adapter_model.safetensors").is_file()
    loaded = PeftModel.from_pretrained(build("bert"), tmp_path).eval()
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), atol=1e-6, rtol=0)


def test_mean_pooling_uses_the_mask():
    from peftlab.pooling import masked_mean

    hidden = torch.tensor([[[1.0], [3.0], [100.0]]])
    assert masked_mean(hidden, torch.tensor([[1, 1, 0]])).item() == 2.0
    model = adapt("bert", "head", {"pooling": "mean"})
    batch = example_batch("bert")
    padded_row = {k: v[:1] for k, v in batch.items() if k != "labels"}
    trimmed = {k: v[:, :6] for k, v in padded_row.items()}  # the same text without its padding
    torch.testing.assert_close(logits(model, padded_row), logits(model, trimmed), atol=1e-5, rtol=0)
    assert not torch.allclose(logits(model, padded_row), logits(build("bert"), padded_row))


def test_mean_pooling_survives_save_and_load(tmp_path):
    model = apply_strategy(build("bert"), "lora", pooling="mean", r=4)
    batch = example_batch("bert")
    train_steps(model, batch)
    save_trained(model, tmp_path)
    torch.testing.assert_close(logits(load_trained(build("bert"), tmp_path), batch), logits(model, batch), atol=1e-6,
                               rtol=0)
    with pytest.raises(PeftlabError, match="pooling=mean is a peftlab hook"):
        merge(model)


def test_adapter_layer_norms_follow_the_kind():
    def norms(model):
        return {n for n, p in model.named_parameters() if p.requires_grad and "LayerNorm" in n}

    assert norms(adapt("bert", "adapter", {"kind": "houlsby"}))
    assert not norms(adapt("bert", "adapter", {"kind": "pfeiffer"}))
    assert not norms(adapt("bert", "adapter", {"kind": "houlsby", "train_layer_norms": False}))


def test_parameter_count_rules():
    model = adapt("bert", "lora", {"r": 4, "target_modules": ["query", "value"]})
    count = count_parameters(model)
    hidden, layers = 32, 2
    lora = layers * 2 * (hidden * 4 + 4 * hidden)  # per target: A (r x in) + B (out x r)
    head = hidden * 3 + 3
    assert count.trainable_without_head == lora
    assert count.trainable == lora + head
    assert count.total == sum(p.numel() for p in build("bert").parameters()) + lora
    assert "without the" in str(count)


def test_registry_accepts_a_new_strategy():
    from peftlab.strategies import register_strategy, set_trainable, unregister_strategy
    from dataclasses import dataclass

    @dataclass
    class Options:
        pattern: str = "attention"

    @register_strategy("test-only-attention", Options)
    def only_attention(model, options, head_modules):
        set_trainable(model, lambda n, p: options.pattern in n)
        return model

    try:
        assert "test-only-attention" in list_strategies()
        model = apply_strategy(build("bert"), "test-only-attention")
        assert all("attention" in n for n, p in model.named_parameters() if p.requires_grad)
    finally:
        unregister_strategy("test-only-attention")
    assert "test-only-attention" not in list_strategies()


@pytest.mark.parametrize("call,message", [
    (lambda: apply_strategy(build("bert"), "prefix-tuning"), "unknown strategy 'prefix-tuning'"),
    (lambda: apply_strategy(build("bert"), "lora", rank=8), "has no option 'rank'"),
    (lambda: apply_strategy(build("bert"), "lora", r="eight"), "option r: expected int, got 'eight'"),
    (lambda: apply_strategy(build("bert"), "lora", r=0), "r=0 must be >= 1"),
    (lambda: apply_strategy(build("bert"), "lora", target_modules=["qkv_nope"]), "match no module"),
    (lambda: apply_strategy(build("bert"), "adapter", kind="parallel"), "expected one of houlsby, pfeiffer"),
    (lambda: apply_strategy(build("bert"), "partial", top_k=5), "exceeds the model's 2 blocks"),
    (lambda: apply_strategy(build("cnn"), "adapter", kind="houlsby"), "use strategy_options.adapter.kind=pfeiffer"),
    (lambda: apply_strategy(build("bert"), "head", head_modules=["cls_head"]), "not found"),
    (lambda: merge(adapt("bert", "adapter", {})), "strategy 'adapter' cannot merge: bottleneck adapters"),
    (lambda: apply_strategy(build("bert"), "head", pooling="max"), "pooling='max' is not supported"),
])
def test_clear_errors(call, message):
    with pytest.raises(PeftlabError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        call()


def tiny_other(kind: str):
    """Tiny ELECTRA, ConvNeXt and ResNet classifiers: architectures whose LoRA targets are found by name or by shape."""
    from transformers import (ConvNextConfig, ConvNextForImageClassification, ElectraConfig,
                              ElectraForSequenceClassification, ResNetConfig, ResNetForImageClassification)

    torch.manual_seed(0)
    if kind == "electra":
        return ElectraForSequenceClassification(ElectraConfig(vocab_size=100, embedding_size=16, hidden_size=32,
                                                              num_hidden_layers=2, num_attention_heads=2,
                                                              intermediate_size=37, num_labels=3))
    if kind == "convnext":
        return ConvNextForImageClassification(ConvNextConfig(num_channels=3, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2,
                                                             num_labels=3))
    return ResNetForImageClassification(ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16],
                                                     depths=[1, 1], layer_type="bottleneck", num_labels=3))


@pytest.mark.parametrize("kind,expected", [("electra", ["query", "value"]), ("convnext", ["pwconv1", "pwconv2"]),
                                           ("resnet", None)])
def test_lora_targets_found_for_more_architectures(kind, expected):
    from peftlab.strategies.lora import find_lora_targets

    model = tiny_other(kind).eval()
    targets = find_lora_targets(model, ["classifier"])
    if expected is not None:
        assert targets == expected
    else:  # a CNN: its 1x1 convolutions, by full name
        modules = dict(model.named_modules())
        assert targets and all(modules[t].kernel_size == (1, 1) for t in targets)
    inputs = ({"input_ids": torch.randint(0, 100, (2, 5))} if kind == "electra"
              else {"pixel_values": torch.randn(2, 3, 32, 32)})
    with torch.no_grad():
        before = model(**inputs).logits
        adapted = apply_strategy(model, "lora", r=2)
        torch.testing.assert_close(adapted(**inputs).logits, before, atol=1e-6, rtol=0)
    assert any(".lora_A." in n for n, p in adapted.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("flag,marker", [("use_dora", "lora_magnitude_vector"), ("use_rslora", None)])
def test_dora_and_rslora_pass_through_to_peft(flag, marker):
    model = apply_strategy(build("bert"), "lora", r=4, alpha=8, **{flag: True})
    config = model.peft_config["default"]
    assert getattr(config, flag) is True
    if marker:
        assert any(marker in n for n, _ in model.named_parameters())
    else:  # rsLoRA scales by alpha / sqrt(r) instead of alpha / r (Kalajdzievski 2023)
        layer = model.base_model.model.bert.encoder.layer[0].attention.self.query
        assert layer.scaling["default"] == pytest.approx(8 / 4 ** 0.5)
