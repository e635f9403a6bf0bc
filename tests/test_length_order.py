"""Evaluation in length order (peftlab.data.ordering): batches longest first, outputs back in the data's order, and
the same logits, predictions and metrics as evaluation in file order."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch
from accelerate.data_loader import prepare_data_loader
from torch.utils.data import DataLoader
from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

from peftlab import apply_strategy
from peftlab.config import TrainConfig
from peftlab.data import make_text_dataloader, tokenize_dataset
from peftlab.data.ordering import LengthSortedSampler, loader_order, longest_first, put_back
from peftlab.inputs import probabilities_in_batches
from peftlab.metrics import compute_classification_metrics, scalar_metrics
from peftlab.training import build_accelerator, evaluate, forget_accelerator_state

WORDS = ["good", "bad", "film", "plot", "actor", "scene", "long", "dull"]
LABELS = ["a", "b", "c"]


@pytest.fixture
def tokenizer() -> BertTokenizer:
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    return BertTokenizer(vocab={token: index for index, token in enumerate(vocab)})


@pytest.fixture(autouse=True)
def fresh_accelerate():
    forget_accelerator_state()
    yield
    forget_accelerator_state()


def split_of(tokenizer, n: int = 57, seed: int = 0) -> datasets.Dataset:
    """n texts of 1-40 words in random order (so batches in file order mix short and long), tokenized."""
    rng = np.random.default_rng(seed)
    texts = [" ".join(rng.choice(WORDS, size=int(length))) for length in rng.integers(1, 41, size=n)]
    split = datasets.Dataset.from_dict({"text": texts, "label": rng.integers(0, len(LABELS), size=n).tolist()})
    return tokenize_dataset(datasets.DatasetDict({"validation": split}), tokenizer, max_length=48)["validation"]


def tiny_bert(tokenizer, pooling: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
        num_labels=len(LABELS), max_position_embeddings=64))
    return apply_strategy(model, "full", pooling=pooling).eval()


def compute_metrics(predictions, references):
    return scalar_metrics(compute_classification_metrics(predictions, references, LABELS))


def evaluated(model, loader, tmp_path) -> tuple:
    """(EvalOutput, logits per example in split order) of one pass over `loader` through the training engine."""
    accelerator = build_accelerator(TrainConfig(mixed_precision="no", trackers=[], cpu_threads=1), tmp_path)
    logits = []
    hook = model.register_forward_hook(lambda module, args, output: logits.append(output.logits.detach()))
    try:
        output = evaluate(model, accelerator.prepare(loader), accelerator, compute_metrics)
    finally:
        hook.remove()
    order = loader_order(loader)
    rows = torch.cat(logits)
    return output, (put_back(rows, order) if order is not None else rows)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_length_sorted_evaluation_equals_evaluation_in_file_order(tokenizer, tmp_path, pooling):
    split = split_of(tokenizer)
    model = tiny_bert(tokenizer, pooling)
    in_order = make_text_dataloader(split, tokenizer, 8, shuffle=False, group_by_length=False, seed=0)
    by_length = make_text_dataloader(split, tokenizer, 8, shuffle=False, group_by_length=True, seed=0)
    assert loader_order(in_order) is None and isinstance(by_length.sampler, LengthSortedSampler)

    padded = {name: sum(batch["input_ids"].numel() for batch in loader)
              for name, loader in (("in order", in_order), ("by length", by_length))}
    assert padded["by length"] < 0.75 * padded["in order"]  # what sorting is for
    widths = [batch["input_ids"].shape[1] for batch in by_length]
    assert widths == sorted(widths, reverse=True)  # longest first

    plain, plain_logits = evaluated(model, in_order, tmp_path)
    forget_accelerator_state()
    sorted_, sorted_logits = evaluated(model, by_length, tmp_path)
    torch.testing.assert_close(sorted_logits, plain_logits, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(sorted_.predictions, plain.predictions)
    np.testing.assert_array_equal(sorted_.references, np.asarray(split["labels"]))  # the split's own order
    np.testing.assert_allclose(sorted_.probabilities, plain.probabilities, rtol=0, atol=1e-6)
    assert sorted_.metrics.keys() == plain.metrics.keys()
    assert sorted_.metrics["loss"] == pytest.approx(plain.metrics["loss"], rel=1e-6)
    assert {k: v for k, v in sorted_.metrics.items() if k != "loss"} == \
           {k: v for k, v in plain.metrics.items() if k != "loss"}


def test_sharded_length_order_gathers_back_to_the_sampler_order():
    """What evaluate relies on with several processes: accelerate deals whole batches out in turn, so the batches
    gathered step by step (the extra ones of an uneven last round dropped) come in the sampler's order."""
    lengths = [3, 9, 1, 7, 7, 2, 5, 8, 8, 4, 6]
    sampler = LengthSortedSampler(lengths)
    assert sampler.order == longest_first(lengths) == [1, 7, 8, 3, 4, 10, 6, 9, 0, 5, 2]
    shards = [prepare_data_loader(DataLoader(range(len(lengths)), batch_size=2, sampler=LengthSortedSampler(lengths)),
                                  num_processes=3, process_index=process, put_on_device=False, rng_types=None)
              for process in range(3)]
    assert all(loader_order(shard) == sampler.order for shard in shards)
    gathered = [int(i) for step in zip(*[list(shard) for shard in shards]) for batch in step for i in batch]
    assert gathered[:len(lengths)] == sampler.order


def test_put_back_places_each_row_at_its_position():
    rows = torch.tensor([[10.0], [20.0], [30.0]])
    assert put_back(rows, [2, 0, 1]).flatten().tolist() == [20.0, 30.0, 10.0]
    with pytest.raises(ValueError):
        put_back(rows, [0, 1])


def test_predict_batches_texts_longest_first_and_answers_in_input_order():
    texts = ["a", "a much longer text", "mid size", "bb", "the longest text of them all"]
    batches = []

    def probabilities(batch: list[str]) -> torch.Tensor:
        batches.append(batch)
        return torch.tensor([[float(len(text)), 0.0] for text in batch])

    rows = probabilities_in_batches(probabilities, texts, num_labels=2, batch_size=2)
    assert batches == [["the longest text of them all", "a much longer text"], ["mid size", "bb"], ["a"]]
    assert rows[:, 0].tolist() == [float(len(text)) for text in texts]
    images = [object(), object(), object()]  # not texts: as given
    probabilities_in_batches(lambda batch: torch.zeros(len(batch), 2), images, num_labels=2, batch_size=2)
