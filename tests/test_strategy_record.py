"""Strategy records: what each built-in declares holds, and a strategy registered from outside peftlab needs no edit."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest
import torch
from safetensors.torch import load_file

from peftlab import PeftlabError, apply_strategy, list_strategies
from peftlab.config import load_config
from peftlab.heads import find_blocks
from peftlab.saving import STRATEGY_FILE, TRAINABLE_FILE, load_trained, merge, save_trained
from peftlab.strategies import (Merge, SaveFormat, get_strategy, parameter_groups, register_strategy, set_trainable,
                                unregister_strategy)
from peftlab.strategies.registry import peft_base_name
from tests.test_strategies import CASES, CNN_OPTIONS, FAMILIES, logits, train_steps
from tests.tiny_models import build, example_batch
from tests.tiny_train import TokenTask, reset_accelerate, run, tiny_config, tiny_model


def built_in_cases(families):
    for family in families:
        for label, (name, options) in CASES.items():
            if not (family == "cnn" and label == "adapter-houlsby"):  # houlsby needs attention
                yield pytest.param(family, name, CNN_OPTIONS.get(label, options) if family == "cnn" else options,
                                   id=f"{family}-{label}")


def test_every_built_in_declares_a_record():
    assert {n for n in list_strategies() if get_strategy(n).caches_frozen_features} == {"head"}
    peft_tuners = {"ia3", "vera", "loha", "lokr", "adalora"}
    assert {n for n in list_strategies() if get_strategy(n).merge is Merge.FOLD} == {"lora", "peft"} | peft_tuners
    assert {n for n in list_strategies() if get_strategy(n).merge is Merge.NOT_FOLDABLE} == {"adapter", "prefix",
                                                                                            "prompt"}
    assert {n for n in list_strategies() if get_strategy(n).save_format is SaveFormat.PEFT_ADAPTER} == {
        "lora", "peft", "prefix", "prompt"} | peft_tuners
    assert get_strategy("full").save_format is SaveFormat.WHOLE_MODEL
    assert {n for n in list_strategies() if get_strategy(n).after_optimizer_step} == {"adalora"}


@pytest.mark.parametrize("family,name,options", list(built_in_cases(["bert", "cnn"])))
def test_save_format_and_merge_follow_the_record(family, name, options, tmp_path):
    model = apply_strategy(build(family), name, **options)
    record = model.peftlab_strategy.record
    batch = example_batch(family)
    train_steps(model, batch)
    expected = logits(model, batch)
    save_trained(model, tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    if record.save_format is SaveFormat.PEFT_ADAPTER:
        assert {"adapter_config.json", "adapter_model.safetensors"} <= files and TRAINABLE_FILE not in files
    elif record.save_format is SaveFormat.WHOLE_MODEL and hasattr(model, "save_pretrained"):
        assert "model.safetensors" in files and TRAINABLE_FILE not in files
    else:  # trained tensors only (also `full` on a plain torch model, which has no save_pretrained)
        assert files == {STRATEGY_FILE, TRAINABLE_FILE}
    torch.testing.assert_close(logits(load_trained(build(family), tmp_path).eval(), batch), expected, atol=1e-6, rtol=0)

    if record.merge is Merge.NOT_FOLDABLE:
        with pytest.raises(PeftlabError, match=f"strategy '{name}' cannot merge: .*non-linearity") as error:
            merge(model)
        assert "\n" not in str(error.value)
        return
    merged = merge(model)
    assert (merged is model) == (record.merge is Merge.PLAIN)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    assert (logits(merged, batch) - expected).abs().max() < 1e-4


def _positions(model):
    return {id(p): i for i, (_, p) in enumerate(model.named_parameters())}


@pytest.mark.parametrize("family,name,options", list(built_in_cases(FAMILIES)))
def test_parameter_groups_partition_the_trainable_parameters_bottom_to_top(family, name, options):
    model = apply_strategy(build(family), name, **options)
    groups = parameter_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert groups and all(groups.values())
    grouped = [id(p) for params in groups.values() for p in params]
    assert len(grouped) == len(set(grouped))  # disjoint
    assert set(grouped) == {id(p) for p in model.parameters() if p.requires_grad}  # exactly what trains
    assert "head" in groups and all("classifier" in names[id(p)] or "fc" in names[id(p)] for p in groups["head"])

    blocks = [g for g in groups if g.startswith("blocks.")]
    assert blocks == sorted(blocks, key=lambda g: int(g.split(".")[1]))
    for group in blocks:
        assert all(f".{group.split('.')[1]}." in names[id(p)] for p in groups[group])
    # Outside the method's own groups, each group sits wholly above the one before it in the forward pass.
    method_groups = {"lora_A", "lora_B", "adapters"}
    position = _positions(model)
    spans = [(min(position[id(p)] for p in ps), max(position[id(p)] for p in ps))
             for g, ps in groups.items() if g not in method_groups]
    assert all(before[1] < after[0] for before, after in zip(spans, spans[1:]))

    if name == "full":  # every block trains, between what lies below the blocks and the head
        assert list(groups)[0] == "below_blocks" and list(groups)[-1] == "head"
        assert len(blocks) == len(find_blocks(model)[1])
    if name == "lora":
        assert list(groups)[:2] == ["lora_A", "lora_B"]
        assert all(".lora_A." in names[id(p)] for p in groups["lora_A"])
        assert all(".lora_B." in names[id(p)] for p in groups["lora_B"])
        assert len(groups["lora_A"]) == len(groups["lora_B"])
    if name == "adapter":
        assert all(".peftlab_adapter." in names[id(p)] for p in groups["adapters"])


def test_parameter_groups_need_an_adapted_model():
    with pytest.raises(PeftlabError, match="not adapted with peftlab.apply_strategy"):
        parameter_groups(build("bert"))


def test_not_foldable_needs_a_reason():
    with pytest.raises(ValueError, match="cannot_merge_because"):
        register_strategy("test-unexplained", NoOptions, merge=Merge.NOT_FOLDABLE)(ln_tuning)
    assert "test-unexplained" not in list_strategies()


def test_folders_saved_before_pooling_existed_still_load(tmp_path):
    model = apply_strategy(build("bert"), "bitfit")
    batch = example_batch("bert")
    train_steps(model, batch)
    save_trained(model, tmp_path)
    spec = json.loads((tmp_path / STRATEGY_FILE).read_text())
    assert spec == {"name": "bitfit", "options": {}, "head_modules": ["classifier"], "pooling": "cls"}
    del spec["pooling"]
    (tmp_path / STRATEGY_FILE).write_text(json.dumps(spec))
    torch.testing.assert_close(logits(load_trained(build("bert"), tmp_path), batch), logits(model, batch), atol=1e-6,
                               rtol=0)


# ---------------------------------------------------------------------------------------------------------------------
# Strategies registered here, outside the package: train, save, load and merge them with no edit to peftlab.


@dataclass
class NoOptions:
    pass


@dataclass
class Ia3Options:
    target_modules: Optional[list[str]] = None


def ln_tuning(model, options, head_modules):
    """LN tuning (Zhao et al. 2023): only the layer norms and the head train."""
    set_trainable(model, lambda name, p: "LayerNorm" in name or name.split(".")[0] in head_modules)
    return model


def ia3(model, options, head_modules):
    """(IA)^3 (Liu et al. 2022) through peft: learned vectors rescale the targets' outputs; the head trains fully."""
    from peft import IA3Config, get_peft_model

    config = IA3Config(target_modules=options.target_modules or ["query", "value"], feedforward_modules=[],
                       modules_to_save=head_modules)
    return get_peft_model(model, config)


STEPS_SEEN: list[int] = []

EXTERNAL = {
    "test-ia3": (ia3, Ia3Options, dict(save_format=SaveFormat.PEFT_ADAPTER, merge=Merge.FOLD, base_name=peft_base_name,
                                       after_optimizer_step=lambda model, step: STEPS_SEEN.append(step))),
    "test-ln-tuning": (ln_tuning, NoOptions, {}),
    "test-ln-tuning-unmergeable": (ln_tuning, NoOptions, dict(merge=Merge.NOT_FOLDABLE,
                                                              cannot_merge_because="declared so by this test")),
}


@pytest.fixture
def external(request):
    """Register one strategy from EXTERNAL for the test, and leave the registry as it was."""
    name = request.param
    fn, options_cls, record_fields = EXTERNAL[name]
    register_strategy(name, options_cls, **record_fields)(fn)
    reset_accelerate()
    STEPS_SEEN.clear()
    try:
        yield name
    finally:
        reset_accelerate()
        unregister_strategy(name)
    assert name not in list_strategies()


@pytest.mark.parametrize("external", list(EXTERNAL), indirect=True)
def test_strategy_registered_outside_trains_saves_loads_and_merges(external, tmp_path):
    name = external
    assert load_config(None, [f"strategy={name}"]).strategy == name  # the config accepts it too
    model = apply_strategy(tiny_model(freeze=False), name)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    # 32 examples / batch 8 = 4 batches, 2 per optimizer step: 2 steps per epoch, 4 in all.
    result, model, _ = run(tmp_path / "run", tiny_config(epochs=2, grad_accum_steps=2), model=model, n_train=32,
                           n_eval=16)
    assert result.global_step == 4
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)
    hook = model.peftlab_strategy.record.after_optimizer_step
    assert STEPS_SEEN == ([0, 1, 2, 3] if hook else [])  # once per optimizer step, not per batch

    model.eval()
    batch = {"input_ids": TokenTask(8, seed=3).input_ids}
    expected = logits(model, batch)
    save_trained(model, tmp_path / "saved")
    reloaded = load_trained(tiny_model(freeze=False), tmp_path / "saved").eval()
    torch.testing.assert_close(logits(reloaded, batch), expected, atol=1e-6, rtol=0)
    if get_strategy(name).save_format is SaveFormat.TRAINED_TENSORS:
        saved = set(load_file(tmp_path / "saved" / TRAINABLE_FILE))
        assert saved == {n for n, p in model.named_parameters() if p.requires_grad}

    if get_strategy(name).merge is Merge.NOT_FOLDABLE:
        with pytest.raises(PeftlabError, match=f"^strategy '{name}' cannot merge: declared so by this test$"):
            merge(model)
        return
    merged = merge(model)
    assert not any("ia3_" in n for n, _ in merged.named_parameters())
    assert (logits(merged, batch) - expected).abs().max() < 1e-4


def test_readme_registration_examples_run(tmp_path):
    """The README's "new strategy" snippets register working strategies (layernorm, peft's ia3 on query/value) as
    they are written."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    start, end = readme.index("A new strategy is one function plus one registration:"), readme.index("## Benchmarks")
    section = readme[start:end]
    snippets = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    registered = set(list_strategies())
    try:
        namespace = {}
        for snippet in snippets:
            exec(snippet, namespace)
        added = set(list_strategies()) - registered
        assert added == {"layernorm", "ia3_qv"}
        batch = example_batch("bert")
        for name in sorted(added):
            model = apply_strategy(build("bert"), name)
            train_steps(model, batch)
            save_trained(model, tmp_path / name)
            expected = logits(model, batch)
            torch.testing.assert_close(logits(load_trained(build("bert"), tmp_path / name), batch), expected,
                                       atol=1e-6, rtol=0)
            assert (logits(merge(model), batch) - expected).abs().max() < 1e-4
    finally:
        for name in set(list_strategies()) - registered:
            unregister_strategy(name)
