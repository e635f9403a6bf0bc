"""Learning rates per parameter group (head_lr, layer_decay, LoRA+) and the batch-norm policy, on tiny models."""

from __future__ import annotations

import re

import pytest
import torch

from peftlab import PeftlabError, apply_strategy
from peftlab.learning_rates import describe, param_group_summary
from peftlab.training import build_optimizer, build_scheduler
from tests.test_strategies import train_steps
from tests.tiny_models import build, example_batch
from tests.tiny_train import reset_accelerate, run, tiny_config, tiny_model

LR = 1e-3


@pytest.fixture(autouse=True)
def fresh_accelerate():
    reset_accelerate()
    yield
    reset_accelerate()


def rates(optimizer) -> dict[str, float]:
    """Strategy group -> its rate now (both weight-decay halves of a group share it)."""
    found: dict[str, set] = {}
    for group in optimizer.param_groups:
        found.setdefault(group["name"], set()).add(group["lr"])
    assert all(len(lrs) == 1 for lrs in found.values()), found
    return {name: lrs.pop() for name, lrs in found.items()}


def rate_by_parameter(model, optimizer) -> dict[str, float]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: group["lr"] for group in optimizer.param_groups for p in group["params"]}


def test_each_group_gets_its_rate_and_the_schedule_scales_all_alike():
    model = apply_strategy(build("bert"), "full")
    cfg = tiny_config(lr=LR, head_lr=1e-2, layer_decay=0.5, warmup_ratio=0.2, scheduler="linear")
    optimizer = build_optimizer(model, cfg)
    peak = rates(optimizer)
    # 2 blocks: block 1 (the top) at lr, block 0 at lr x 0.5, the embeddings below at lr x 0.5^2.
    assert peak == pytest.approx({"below_blocks": LR * 0.25, "blocks.0": LR * 0.5, "blocks.1": LR,
                                  "above_blocks": LR, "head": 1e-2})
    scheduler = build_scheduler(optimizer, cfg, 10)  # 2 warmup steps, then linear decay to 0 at step 10
    factors = []
    for _ in range(10):
        now = rates(optimizer)
        factor = now["blocks.1"] / peak["blocks.1"]
        assert now == pytest.approx({name: lr * factor for name, lr in peak.items()}, abs=1e-12)
        factors.append(factor)
        optimizer.step()
        scheduler.step()
    assert factors == pytest.approx([0, 0.5, 1, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8])
    # The summary reports the peak rates, not the scheduled ones.
    assert {row["name"]: row["lr"] for row in param_group_summary(optimizer)} == pytest.approx(peak)


def test_head_lr_reaches_the_head_only_also_under_lora():
    for name in ("full", "lora"):
        model = apply_strategy(build("bert"), name)
        optimizer = build_optimizer(model, tiny_config(lr=LR, head_lr=3e-2))
        by_parameter = rate_by_parameter(model, optimizer)
        head = {n for n, lr in by_parameter.items() if lr == 3e-2}
        assert head and all("classifier" in n for n in head), name
        assert all(lr == LR for n, lr in by_parameter.items() if n not in head), name


def test_loraplus_gives_b_its_own_group_at_ratio_times_a():
    model = apply_strategy(build("bert"), "lora", r=4)
    optimizer = build_optimizer(model, tiny_config(lr=LR, loraplus_ratio=16))
    assert rates(optimizer) == pytest.approx({"lora_A": LR, "lora_B": 16 * LR, "head": LR})
    for parameter, lr in rate_by_parameter(model, optimizer).items():
        if ".lora_B." in parameter:
            assert lr == pytest.approx(16 * LR), parameter
        else:
            assert lr == LR, parameter
    lines = describe(param_group_summary(optimizer))
    assert [line.split()[0] for line in lines] == ["lora_A", "lora_B", "head"]
    assert lines[1].endswith("lr 1.60e-02")


@pytest.mark.parametrize("family,name,options", [("bert", "full", {}), ("cnn", "full", {}), ("bert", "bitfit", {}),
                                                  ("bert", "partial", {"top_k": 1})])
def test_layer_decay_rates_strictly_decrease_downward(family, name, options):
    model = apply_strategy(build(family), name, **options)
    peak = rates(build_optimizer(model, tiny_config(lr=LR, layer_decay=0.8)))
    bottom_up = [lr for group, lr in peak.items() if group not in ("above_blocks", "head")]  # groups run bottom up
    assert len(bottom_up) >= 1 and all(low < high for low, high in zip(bottom_up, bottom_up[1:]))
    top_block = max(int(group.split(".")[1]) for group in peak if group.startswith("blocks."))
    assert peak[f"blocks.{top_block}"] == LR and peak["head"] == LR
    if name == "partial":  # only the top block trains, and it is the model's top block, at the full rate
        assert [group for group in peak if group.startswith("blocks.")] == ["blocks.1"]


def test_weight_decay_rules_stay_in_every_group():
    model = apply_strategy(build("bert"), "full")
    optimizer = build_optimizer(model, tiny_config(weight_decay=0.1, layer_decay=0.5))
    for group in optimizer.param_groups:
        assert group["weight_decay"] == (0.1 if all(p.ndim >= 2 for p in group["params"]) else 0.0)
        assert all(p.ndim >= 2 for p in group["params"]) or all(p.ndim < 2 for p in group["params"])
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == sum(
        p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("strategy,options,setting,message", [
    ("full", {}, {"loraplus_ratio": 4}, r"train.loraplus_ratio=4 sets the rate of LoRA's B matrices, but strategy "
                                        r"'full' trains the groups below_blocks, blocks.0-1, above_blocks, head"),
    ("adapter", {}, {"loraplus_ratio": 2}, "use strategy=lora"),
    ("lora", {}, {"layer_decay": 0.9}, r"train.layer_decay=0.9 .* strategy 'lora' trains the groups lora_A, lora_B, "
                                       r"head; use a strategy that trains whole blocks"),
    ("head", {}, {"layer_decay": 0.9}, "strategy 'head' trains the groups head;"),
])
def test_rate_options_that_cannot_apply_are_one_line_errors(strategy, options, setting, message):
    model = apply_strategy(build("bert"), strategy, **options)
    with pytest.raises(PeftlabError, match=message) as error:
        build_optimizer(model, tiny_config(**setting))
    assert "\n" not in str(error.value)


def test_a_model_peftlab_did_not_adapt_trains_as_one_group(tmp_path):
    result, _, _ = run(tmp_path, tiny_config(max_steps=2))
    assert [row["name"] for row in result.param_groups] == ["trainable"]
    with pytest.raises(PeftlabError, match="head_lr=0.01 .* a model not adapted by apply_strategy trains the groups "
                                           "trainable; set train.head_lr=null"):
        build_optimizer(tiny_model(), tiny_config(head_lr=1e-2))


def test_training_reports_the_groups_and_logs_the_schedule_of_train_lr(tmp_path, capsys):
    from peftlab.tracking import read_log

    model = apply_strategy(tiny_model(freeze=False), "full")
    cfg = tiny_config(max_steps=4, lr=LR, head_lr=1e-2, layer_decay=0.5, warmup_ratio=0.5, scheduler="linear")
    result, model, _ = run(tmp_path, cfg, model=model)
    assert [(row["name"], row["lr"]) for row in result.param_groups] == pytest.approx(
        [("below_blocks", LR / 4), ("blocks.0", LR / 2), ("blocks.1", LR), ("above_blocks", LR), ("head", 1e-2)])
    assert sum(row["parameters"] for row in result.param_groups) == sum(p.numel() for p in model.parameters())
    printed = capsys.readouterr().out
    assert "learning rates by parameter group (peak):" in printed
    assert re.search(r"\n  blocks\.0-1 +[0-9,]+ parameters  lr 5\.00e-04\.\.1\.00e-03\n", printed)  # one line
    logged = [r["train/lr"] for r in read_log(tmp_path) if "train/lr" in r]
    assert logged == pytest.approx([LR / 2, LR, LR / 2, 0.0])  # train.lr's own schedule: 2 warmup steps, decay


def test_resuming_a_checkpoint_with_other_groups_is_one_line(tmp_path):
    run(tmp_path, tiny_config(max_steps=1, checkpoint_every=1), model=tiny_model(freeze=False))  # one group
    reset_accelerate()
    with pytest.raises(PeftlabError, match="holds other optimizer parameter groups than this run .*start afresh"):
        run(tmp_path, tiny_config(max_steps=2), model=apply_strategy(tiny_model(freeze=False), "full"),
            resume_from="latest")


def batch_norm_state(model) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in model.named_buffers() if "running_" in n}


@pytest.mark.parametrize("name", ["full", "bitfit"])
def test_frozen_batch_norms_keep_their_statistics_while_their_weights_train(name):
    batch = example_batch("cnn")
    moved = apply_strategy(build("cnn"), name, batchnorm="train")  # the trained batch norms re-estimate
    before = batch_norm_state(moved)
    train_steps(moved, batch, steps=1)
    assert all(not torch.equal(t, before[n]) for n, t in batch_norm_state(moved).items())

    model = apply_strategy(build("cnn"), name, batchnorm="frozen")
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(".3.bias")}  # the norms'
    assert len(weights) == 3 and all(p.requires_grad for n, p in model.named_parameters() if n in weights)
    train_steps(model, batch, steps=1)
    assert all(torch.equal(t, before[n]) for n, t in batch_norm_state(model).items())
    assert all(not torch.equal(p, weights[n]) for n, p in model.named_parameters() if n in weights)


def test_the_default_batch_norm_policy_freezes_statistics_where_there_are_batch_norms():
    batch = example_batch("cnn")
    model = apply_strategy(build("cnn"), "full")  # model.batchnorm=auto
    before = batch_norm_state(model)
    train_steps(model, batch, steps=1)
    assert all(torch.equal(t, before[n]) for n, t in batch_norm_state(model).items())
    apply_strategy(build("bert"), "full")  # no batch norms: auto is no error


def test_frozen_batch_norms_need_batch_norms():
    with pytest.raises(PeftlabError, match="model.batchnorm=frozen, but the model has no batch norms .*; leave "
                                           "model.batchnorm at auto"):
        apply_strategy(build("bert"), "full", batchnorm="frozen")
    with pytest.raises(PeftlabError,
                       match=r"batchnorm='fixed' is not supported; choose one of \['auto', 'train', 'frozen'\]"):
        apply_strategy(build("cnn"), "full", batchnorm="fixed")
