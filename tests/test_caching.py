"""Frozen-feature caching for the head strategy: same head as uncached training, frozen weights untouched, fallbacks."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from peftlab import apply_strategy
from peftlab.backbones import TorchImageClassifier, set_dropout
from peftlab.caching import frozen_feature_cache, shared_frozen_features
from peftlab.training import build_accelerator, train
from tests.tiny_models import NUM_LABELS, VOCAB, build
from tests.tiny_train import accuracy, reset_accelerate, tiny_config


@pytest.fixture(autouse=True)
def fresh_accelerate():
    reset_accelerate()
    yield
    reset_accelerate()


class TinyBody(nn.Module):
    """A plain classifier (pixels -> logits) with its head `fc` called by its own forward, like EfficientNet's `_fc`."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, NUM_LABELS)

    def forward(self, x):
        return self.fc(self.norm(self.conv(x)).relu().mean(dim=(2, 3)))


def tiny_plain():
    torch.manual_seed(0)
    return TorchImageClassifier(TinyBody(), head_modules=["fc"], config={}).eval()


def examples(family: str, n: int = 40, seed: int = 0) -> list[dict]:
    """Labelled examples: texts of lengths 3-11 (so batches pad), or 16x16 images."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, NUM_LABELS, (n,), generator=g)
    if family in ("vit", "plain"):
        return [{"pixel_values": torch.randn(3, 16, 16, generator=g) + label, "labels": label} for label in labels]
    lengths = torch.randint(3, 12, (n,), generator=g)
    return [{"input_ids": (torch.randint(3, VOCAB // 2, (int(k),), generator=g) + VOCAB // 2 * (label % 2)),
             "labels": label} for k, label in zip(lengths, labels)]


def collate(items: list[dict]) -> dict:
    if "pixel_values" in items[0]:
        return torch.utils.data.default_collate(items)
    ids = nn.utils.rnn.pad_sequence([x["input_ids"] for x in items], batch_first=True)
    mask = nn.utils.rnn.pad_sequence([torch.ones_like(x["input_ids"]) for x in items], batch_first=True)
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.stack([x["labels"] for x in items])}


def head_model(family: str, pooling: str = "cls", strategy: str = "head"):
    model = tiny_plain() if family == "plain" else build(family)
    set_dropout(model, 0.0)
    return apply_strategy(model, strategy, pooling=pooling)


def train_head(tmp_path, family: str, *, cache: bool, pooling: str = "cls", model=None, data=None, name="",
               **train_overrides):
    """Train a fresh head model (cached or not) on `data` (train and validation examples; default: 40 and 24 new
    ones); returns (result, model, printed lines)."""
    reset_accelerate()
    cfg = tiny_config(epochs=3, batch_size=8, lr=5e-2, **train_overrides)
    output_dir = tmp_path / f"{family}-{pooling}-{cache}{name}"
    accelerator = build_accelerator(cfg, output_dir)
    printed = []
    accelerator.print = lambda *args: printed.append(" ".join(map(str, args)))
    model = head_model(family, pooling) if model is None else model
    train_examples, validation_examples = data or (examples(family), examples(family, 24, seed=1))
    loaders = {"train": DataLoader(train_examples, batch_size=cfg.batch_size, shuffle=True, collate_fn=collate),
               "validation": DataLoader(validation_examples, batch_size=16, collate_fn=collate)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: on a busy shared CPU, waiting OpenMP threads slow these runs down 10x
    try:
        with frozen_feature_cache(model, loaders, accelerator, enabled=cache) as used:
            result = train(model, accelerator=accelerator, train_cfg=cfg, train_loader=used["train"],
                           eval_loader=used["validation"], compute_metrics=accuracy, output_dir=output_dir)
    finally:
        torch.set_num_threads(threads)
        accelerator.end_training()
    return result, model, printed


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("family,pooling", [("bert", "cls"), ("bert", "mean"), ("roberta", "cls"),
                                            ("distilbert", "mean"), ("vit", "cls"), ("plain", "cls")])
def test_cached_training_gives_the_uncached_head(tmp_path, family, pooling):
    before = state(head_model(family, pooling))
    plain_result, plain_model, _ = train_head(tmp_path, family, cache=False, pooling=pooling)
    cached_result, cached_model, printed = train_head(tmp_path, family, cache=True, pooling=pooling)
    assert any(line.startswith("cached the frozen features of 40 train, 24 validation") for line in printed)

    after_plain, after_cached = state(plain_model), state(cached_model)
    assert after_plain.keys() == after_cached.keys() == before.keys()  # the frozen part is back in place
    trained = {n for n, p in cached_model.named_parameters() if p.requires_grad}
    for name, value in after_cached.items():
        if name in trained:
            torch.testing.assert_close(value, after_plain[name], atol=2e-5, rtol=1e-4, msg=name)
            assert not torch.equal(value, before[name]), f"{name} did not train"
        else:
            assert torch.equal(value, before[name]), f"frozen {name} changed"
    assert cached_result.best_step == plain_result.best_step
    for cached_eval, plain_eval in zip(cached_result.history, plain_result.history):
        assert cached_eval["accuracy"] == plain_eval["accuracy"]
        assert cached_eval["loss"] == pytest.approx(plain_eval["loss"], abs=1e-5)


def test_after_the_block_the_model_runs_on_real_inputs(tmp_path):
    _, model, _ = train_head(tmp_path, "bert", cache=True, pooling="mean")
    assert type(model.bert).__name__ == "BertModel" and not model._forward_pre_hooks  # swap and hook undone
    batch = collate(examples("bert", 4))
    with torch.no_grad():
        assert model(**batch).logits.shape == (4, NUM_LABELS)


def test_bf16_cached_head_matches_uncached(tmp_path):
    plain_result, plain_model, _ = train_head(tmp_path, "bert", cache=False, mixed_precision="bf16")
    cached_result, cached_model, _ = train_head(tmp_path, "bert", cache=True, mixed_precision="bf16")
    torch.testing.assert_close(cached_model.classifier.weight, plain_model.classifier.weight, atol=1e-2, rtol=0)


def no_cache_reason(tmp_path, model, family="bert", **kwargs) -> tuple[list[str], bool]:
    accelerator = build_accelerator(tiny_config(), tmp_path / "run")
    printed = []
    accelerator.print = lambda *args: printed.append(" ".join(map(str, args)))
    loaders = {"train": DataLoader(examples(family), batch_size=8, collate_fn=collate)}
    with frozen_feature_cache(model, loaders, accelerator, **kwargs) as used:
        unchanged = used is loaders
    accelerator.end_training()
    return printed, unchanged


def test_random_augmentation_falls_back_with_a_line(tmp_path):
    printed, unchanged = no_cache_reason(tmp_path, head_model("vit"), "vit", fixed_inputs=False)
    assert unchanged and printed == ["frozen features not cached: the training inputs are randomly augmented "
                                     "(data.augment=true); the backbone runs every epoch"]


@pytest.mark.parametrize("strategy", ["lora", "partial", "full"])
def test_other_strategies_pass_through_silently(tmp_path, strategy):
    printed, unchanged = no_cache_reason(tmp_path, head_model("bert", strategy=strategy))
    assert unchanged and printed == []


def test_disabled_passes_through(tmp_path):
    printed, unchanged = no_cache_reason(tmp_path, head_model("bert"), enabled=False)
    assert unchanged and printed == []


def test_head_reading_uncached_positions_falls_back(tmp_path):
    from transformers import BertForSequenceClassification
    from transformers.modeling_outputs import SequenceClassifierOutput

    class LastTokenBert(BertForSequenceClassification):
        def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
            hidden = self.bert(input_ids, attention_mask=attention_mask).last_hidden_state
            return SequenceClassifierOutput(logits=self.classifier(hidden[:, -1]))  # the last position: not cached

    model = apply_strategy(LastTokenBert(build("bert").config).eval(), "head")
    printed, unchanged = no_cache_reason(tmp_path, model)
    assert unchanged and "reads more than the cached features" in printed[0]


def test_plain_model_without_a_body_module_falls_back(tmp_path):
    printed, unchanged = no_cache_reason(tmp_path, apply_strategy(build("cnn"), "head"), "plain")
    assert unchanged and "is not one module directly inside one body module" in printed[0]


def test_trainable_parameters_below_the_head_fall_back(tmp_path):
    model = head_model("bert")
    model.bert.pooler.dense.weight.requires_grad_(True)
    printed, unchanged = no_cache_reason(tmp_path, model)
    assert unchanged and "bert.pooler.dense.weight" in printed[0]


def frozen_examples_seen(model) -> list[int]:
    """A counter of the examples the model's frozen base runs on (it does not run on cached features)."""
    seen = [0]

    def count(module, args, kwargs):
        inputs = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
        seen[0] += len(inputs)

    model.base_model.register_forward_pre_hook(count, with_kwargs=True)
    return seen


@pytest.mark.parametrize("family,pooling", [("bert", "mean"), ("vit", "cls")])
def test_shared_features_serve_later_runs_over_the_same_examples(tmp_path, family, pooling):
    """What cross-validation's folds do: other subsets of the same examples extract nothing new (one example runs
    to check the replay) and train the head a run on its own would; other frozen weights share nothing."""
    pool = examples(family, 48)
    first, second = (pool[:32], pool[32:]), (pool[16:], pool[:16])
    alone, alone_model, _ = train_head(tmp_path, family, cache=True, pooling=pooling, data=second, name="alone")
    with shared_frozen_features() as shared:
        model = head_model(family, pooling)
        seen = frozen_examples_seen(model)
        train_head(tmp_path, family, cache=True, pooling=pooling, model=model, data=first, name="first")
        assert seen[0] == 48 and (shared.extracted, shared.reused) == (48, 0)
        model = head_model(family, pooling)
        seen = frozen_examples_seen(model)
        result, model, printed = train_head(tmp_path, family, cache=True, pooling=pooling, model=model, data=second,
                                            name="second")
        assert seen[0] == 1 and (shared.extracted, shared.reused) == (48, 48)
        assert any("(48 taken from an earlier run's)" in line for line in printed)
        torch.testing.assert_close(state(model), state(alone_model), atol=2e-5, rtol=1e-4)
        assert [h["accuracy"] for h in result.history] == [h["accuracy"] for h in alone.history]
        other = head_model(family, pooling)
        with torch.no_grad():
            next(p for n, p in other.base_model.named_parameters() if "embeddings" in n).add_(0.01)
        seen = frozen_examples_seen(other)
        train_head(tmp_path, family, cache=True, pooling=pooling, model=other, data=second, name="other")
        assert seen[0] == 48 and shared.reused == 48  # other frozen weights: nothing reused
    with shared_frozen_features() as fresh:  # the block's features went with it
        assert fresh.entries == {} and fresh is not shared
