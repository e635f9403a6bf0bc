"""What text and image loading share: the `LabelledDataset` result, label encoding, the seeded split and Hub loading.

The split, in order: the source's own train/validation/test splits, missing ones carved out of train (seeded,
stratified), then the caps (max_train_samples, max_eval_samples). With k-fold cross-validation (`data.cv_folds`,
`data.cv_fold`) train and validation are then pooled (train rows first, in that order: pool index i is that row) and cut
into k stratified folds by scikit-learn (StratifiedKFold, or StratifiedGroupKFold with `data.group_column`, shuffled
with `data.split_seed`); fold i validates, the others train, and the test split is the one a plain run holds out.

A class with fewer pool examples than folds: scikit-learn's splitter warns and some folds then validate without it.
peftlab does the same, naming the class, since every fold still trains on it (remedy: at most that many folds). A class
that some fold would train without (one example in the pool, or all in one group) is an error naming it: no model of
that fold could predict it, as a plain split refuses a validation label that train lacks.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Optional
from pathlib import Path
from typing import Sequence

import datasets
import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from peftlab.errors import PeftlabError

SPLIT_NAMES = ("train", "validation", "test")
# Names other datasets use for the same three splits, mapped to ours.
SPLIT_ALIASES = {"train": "train", "training": "train", "validation": "validation", "valid": "validation",
                 "val": "validation", "dev": "validation", "test": "test", "testing": "test"}
# A name ending like a data file is a path (a missing one), never a Hub id, even though Hub ids may contain dots.
DATA_FILE_SUFFIXES = {".csv", ".tsv", ".txt", ".json", ".jsonl", ".parquet", ".zip", ".gz", ".bz2"}
# `owner/name` as the Hub spells repository ids.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class Folds:
    """A k-fold cross-validation of the pool (train then validation rows of the plain split, in that order)."""

    k: int
    fold: int
    """The fold the dataset's validation split is; the other folds are its train split."""
    fold_of: np.ndarray
    """The fold of each pool example, by pool index."""
    labels: np.ndarray
    """The class id of each pool example, by pool index."""
    groups: Optional[list[str]] = None
    """The group of each pool example (data.group_column), by pool index."""

    def validation_indices(self, fold: int) -> np.ndarray:
        """Pool indices of the examples fold `fold` validates on, ascending (the order of its validation split)."""
        return np.flatnonzero(self.fold_of == fold)


@dataclass
class LabelledDataset:
    """Train/validation/test splits with a `label` column of class ids, and the class names in id order."""

    splits: datasets.DatasetDict
    label_names: list[str]
    folds: Optional[Folds] = None
    """Set under k-fold cross-validation (data.cv_folds): how the pool was cut."""

    @property
    def num_labels(self) -> int:
        """Number of classes (the size of the classification head)."""
        return len(self.label_names)


def looks_like_path(name: str) -> bool:
    """True when `name` is meant as a local path rather than a Hub id (`owner/name`, which may contain dots)."""
    return (name.startswith((".", "~", "/")) or "\\" in name or name.count("/") > 1
            or Path(name).suffix.lower() in DATA_FILE_SUFFIXES)


def unknown_name_error(name: str, kind: str, packaged: Sequence[str]) -> PeftlabError:
    """The error for a name that is neither packaged, nor an existing path, nor a Hub id."""
    return PeftlabError(
        f"unknown {kind} dataset {name!r}: use a packaged name ({', '.join(packaged)}), "
        f"an existing local path, or a Hub id written 'owner/name'"
    )


def load_hub_splits(name: str) -> dict[str, datasets.Dataset]:
    """Load a Hub dataset and return its splits under our names (train/validation/test), unknown splits dropped."""
    if not _HUB_ID.match(name):
        raise PeftlabError(f"{name!r} is not a Hub dataset id; write it as 'owner/name' or pass an existing local path")
    try:
        loaded = datasets.load_dataset(name)
    except Exception as err:  # the Hub raises many types (network, auth, missing repo); users need one line
        raise PeftlabError(
            f"could not load Hub dataset {name!r} ({first_line(err)}); check the id and your network, "
            f"or set HF_HUB_OFFLINE=1 to use a copy already in the datasets cache"
        ) from err
    return rename_splits(dict(loaded), source=name)


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    message = str(err).strip()
    return message.splitlines()[0] if message else type(err).__name__


def rename_splits(found: dict[str, datasets.Dataset], *, source: str) -> dict[str, datasets.Dataset]:
    """Map split names such as `dev` or `valid` to ours; error when no train split is among them."""
    splits = {}
    for split_name, split in found.items():
        ours = SPLIT_ALIASES.get(split_name.lower())
        if ours is not None and ours not in splits:
            splits[ours] = split
    if "train" not in splits:
        raise PeftlabError(f"{source} has no train split (found: {', '.join(found) or 'none'}); "
                           f"name one split 'train'")
    return splits


def select_columns(splits: dict[str, datasets.Dataset], columns: dict[str, str], *, source: str,
                   group_column: str | None = None) -> dict[str, datasets.Dataset]:
    """Keep only the source columns in `columns` (source name -> our name), renamed; error naming what exists.

    Args:
        group_column: also keep this column as `group` in train and validation (the pooled splits of a
            cross-validation; a test split needs none).
    """
    if group_column is not None and group_column in columns:
        raise PeftlabError(f"data.group_column={group_column!r} is also the {columns[group_column]} column; "
                           f"name the column that holds the group ids")
    selected, wanted = {}, columns
    for split_name, split in splits.items():
        columns = wanted
        if group_column is not None and split_name != "test":
            if group_column not in split.column_names:
                raise PeftlabError(f"{source} ({split_name} split) has no group column {group_column!r}; its columns "
                                   f"are {', '.join(split.column_names)}: set data.group_column to one of them")
            columns = {**wanted, group_column: "group"}
        for column in columns:
            if column not in split.column_names:
                raise PeftlabError(
                    f"{source} ({split_name} split) has no column {column!r}; its columns are "
                    f"{', '.join(split.column_names)}: set the matching *_column option"
                )
        split = split.select_columns(list(columns))
        renames = {old: new for old, new in columns.items() if old != new}
        selected[split_name] = split.rename_columns(renames) if renames else split
    return selected


def drop_unlabelled_splits(splits: dict[str, datasets.Dataset]) -> dict[str, datasets.Dataset]:
    """Drop evaluation splits whose labels are all -1 (Hub benchmarks hide test labels that way); they get re-split."""
    kept = {}
    for split_name, split in splits.items():
        labels = split["label"]
        if split_name != "train" and len(labels) > 0 and all(label == -1 for label in labels):
            warnings.warn(f"the {split_name} split has no labels (all -1); making a new one from train instead")
            continue
        kept[split_name] = split
    return kept


def encode_labels(splits: dict[str, datasets.Dataset], label_names: Sequence[str] | None, *,
                  source: str) -> tuple[dict[str, datasets.Dataset], list[str]]:
    """Turn the `label` column into class ids (a ClassLabel feature) and return the class names in id order.

    The classes are, in this order of precedence: `label_names` (strings map by name, integers index it), a
    ClassLabel feature's names (its ids are kept), the sorted distinct strings of the train split, or the sorted
    distinct integers of the train split (labels 1-5 give 5 classes named "1".."5", not 6 with an empty "0").

    Args:
        splits: split name -> dataset with a `label` column of strings, ints or a ClassLabel; must hold `train`.
        label_names: names in id order to use instead.
    """
    values = {split_name: list(split["label"]) for split_name, split in splits.items()}
    check_labels_present(values, source=source)
    every_value = [value for split_values in values.values() for value in split_values]
    feature = splits["train"].features["label"]
    if all(isinstance(value, str) for value in every_value):
        names = list(label_names) if label_names is not None else sorted(set(values["train"]))
        unknown = sorted(set(every_value) - set(names))
        if unknown and label_names is not None:
            raise PeftlabError(f"{source} has labels {unknown[:5]} that are not in label_names {names}; "
                               f"add them to label_names")
        to_id = {name: index for index, name in enumerate(names)}
    else:
        check_label_ids(values, source=source)
        values = {split_name: [int(value) for value in split_values] for split_name, split_values in values.items()}
        every_value = [value for split_values in values.values() for value in split_values]
        if label_names is not None or isinstance(feature, datasets.ClassLabel):
            # Integers are class ids into the given names (a ClassLabel's ids must stay as they are).
            names = list(label_names) if label_names is not None else list(feature.names)
            too_big = sorted({value for value in every_value if value >= len(names)})
            if too_big:
                raise PeftlabError(f"{source} has label ids {too_big[:5]} but only {len(names)} label names "
                                   f"{names}; give one name per class id")
            to_id = {index: index for index in range(len(names))}
        else:
            present = sorted(set(values["train"]))
            names, to_id = [str(value) for value in present], {value: index for index, value in enumerate(present)}
    if len(set(names)) != len(names):
        raise PeftlabError(f"label_names {names} contain duplicates; give each class one distinct name")
    check_labels_in_train(values, source=source)
    if len(set(values["train"])) < 2:
        raise PeftlabError(f"{source} has fewer than 2 distinct labels ({sorted(set(map(str, every_value)))}); "
                           f"a classifier needs at least 2 classes")
    label_feature = datasets.ClassLabel(names=names)
    encoded = {split_name: split.remove_columns("label").add_column(
                   "label", [to_id[value] for value in values[split_name]], feature=label_feature)
               for split_name, split in splits.items()}
    return encoded, names


def data_row(index: int) -> str:
    """How errors cite the row at 0-based `index` of a split: counted from 1, a header line not counted."""
    return f"data row {index + 1} (counting from 1, header line not counted)"


def check_labels_present(values: dict[str, list], *, source: str) -> None:
    """Error naming the first row without a label (an empty CSV cell, a JSON null)."""
    for split_name, split_values in values.items():
        for index, value in enumerate(split_values):
            if value is None:
                raise PeftlabError(f"{source} ({split_name} split) {data_row(index)} has no label; "
                                   f"remove the row or fill in its label")


def check_labels_in_train(values: dict[str, list], *, source: str) -> None:
    """Error when a validation or test split has a label that train lacks: no model could learn that class.

    The one check for text and image sources alike (an image folder's test/<class>/ without train/<class>/).
    """
    train = set(values["train"])
    for split_name, split_values in values.items():
        missing = sorted(set(split_values) - train, key=str)
        if missing:
            raise PeftlabError(f"{source} has label(s) {missing[:5]} in its {split_name} split but not in the train "
                               f"split, so no model could learn them; add train examples of them or remove them "
                               f"from {split_name}")


def check_label_ids(values: dict[str, list], *, source: str) -> None:
    """Error unless every label is a non-negative whole number (bools and 1.0 count; 0.5, -1 and 'x' do not)."""
    for split_name, split_values in values.items():
        for index, value in enumerate(split_values):
            where = f"{source} ({split_name} split) {data_row(index)}"
            is_number = isinstance(value, (int, float, np.integer, np.floating))
            if not is_number or not float(value).is_integer():
                raise PeftlabError(f"{where} has label {value!r}; labels must be all strings or all whole numbers")
            if value < 0:
                # -1 is how Hub datasets mark a missing label, so a negative label is far more often that.
                raise PeftlabError(f"{where} has negative label {value!r} (the Hub's mark for 'no label'); "
                                   f"remove such rows, or write labels as strings to use them as classes")


def labelled_dataset(splits: dict[str, datasets.Dataset], label_names: Sequence[str] | None, *, source: str,
                     validation_fraction: float, test_fraction: float, split_seed: int,
                     max_train_samples: int | None, max_eval_samples: int | None,
                     cv_folds: int | None = None, cv_fold: int | None = None) -> LabelledDataset:
    """What every loader ends with: drop unlabelled splits, encode labels, carve missing splits, truncate, and with
    `cv_folds` cut the pool into folds (`fold_splits`). A `group` column (data.group_column) is used and dropped."""
    splits, names = encode_labels(drop_unlabelled_splits(splits), label_names, source=source)
    splits = complete_splits(
        splits, validation_fraction=validation_fraction, test_fraction=test_fraction, split_seed=split_seed,
        max_train_samples=max_train_samples, max_eval_samples=max_eval_samples, source=source,
    )
    folds = None
    if cv_folds is not None:
        splits, folds = fold_splits(splits, names, k=cv_folds, fold=cv_fold or 0, seed=split_seed, source=source)
    # The group ids only decide the folds; the model never sees them (a collator would choke on a string column).
    splits = datasets.DatasetDict({name: split.remove_columns([c for c in ("group",) if c in split.column_names])
                                   for name, split in splits.items()})
    return LabelledDataset(splits=splits, label_names=names, folds=folds)


def fold_splits(splits: datasets.DatasetDict, label_names: Sequence[str], *, k: int, fold: int, seed: int,
                source: str) -> tuple[datasets.DatasetDict, Folds]:
    """Pool train and validation (in that order), cut the pool into k folds (`assign_folds`): fold `fold` becomes
    validation, the rest train; test is kept as it is."""
    parts = [splits["train"], splits["validation"]]
    grouped = "group" in parts[0].column_names
    if grouped:  # one type for both files' group ids, so they concatenate and `7` in one equals "7" in the other
        parts = [part.cast_column("group", datasets.Value("string")) for part in parts]
    pool = datasets.concatenate_datasets(parts)
    labels = np.asarray(list(pool["label"]))
    groups = list(pool["group"]) if grouped else None
    fold_of = assign_folds(labels, groups, label_names, k=k, seed=seed, source=source)
    if grouped and "group" in splits["test"].column_names:  # a test split carved from train (test_fraction)
        shared = set(groups) & {str(group) for group in splits["test"]["group"]}
        if shared:
            warnings.warn(f"{len(shared)} group(s) of data.group_column (e.g. {sorted(shared)[0]!r}) have examples "
                          f"in the test split as well as in the folds: test_fraction carves the test split without "
                          f"groups; ship a test file to keep groups out of it")
    folded = datasets.DatasetDict({"train": pool.select(np.flatnonzero(fold_of != fold)),
                                   "validation": pool.select(np.flatnonzero(fold_of == fold)),
                                   "test": splits["test"]})
    return folded, Folds(k=k, fold=fold, fold_of=fold_of, labels=labels, groups=groups)


def assign_folds(labels: np.ndarray, groups: Sequence[str | None] | None, label_names: Sequence[str], *, k: int,
                 seed: int, source: str) -> np.ndarray:
    """The fold (0..k-1) of each example: scikit-learn's StratifiedKFold, or StratifiedGroupKFold with groups,
    shuffled with `seed`. Errors before any work for k above the examples (or groups), a missing group id, or a class
    some fold would train without; warns naming a class with fewer examples than folds (see the module docstring)."""
    n = len(labels)
    if k > n:
        raise PeftlabError(f"data.cv_folds={k} but {source} pools only {n} train and validation examples; use at "
                           f"most {n} folds")
    counts = {label_names[label]: int(count) for label, count in zip(*np.unique(labels, return_counts=True))}
    if max(counts.values()) < k:
        raise PeftlabError(f"data.cv_folds={k} but every class of {source} has fewer pooled examples than that "
                           f"(at most {max(counts.values())}); use at most {max(counts.values())} folds")
    if groups is not None:
        missing = next((index for index, group in enumerate(groups) if group is None), None)
        if missing is not None:
            raise PeftlabError(f"pool example {missing} of {source} has no group id (data.group_column is empty "
                               f"there); fill in its group or remove the row")
        if k > len(set(groups)):
            raise PeftlabError(f"data.cv_folds={k} but {source} has only {len(set(groups))} distinct groups in "
                               f"data.group_column; use at most {len(set(groups))} folds")
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    else:
        splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    fold_of = np.empty(n, dtype=np.int64)
    with warnings.catch_warnings():  # scikit-learn's "least populated class" warning names no class: ours below does
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        for fold, (_, validation) in enumerate(splitter.split(np.zeros(n), labels, groups)):
            fold_of[validation] = fold
    for fold in range(k):
        untrained = sorted(set(counts) - {label_names[label] for label in np.unique(labels[fold_of != fold])})
        if untrained:
            name = untrained[0]
            where = "all in one group" if groups is not None and counts[name] > 1 else "only one"
            raise PeftlabError(f"class {name!r} of {source} has {counts[name]} pooled example(s), {where}, so fold "
                               f"{fold} would train without it and could never predict it; add examples of it, or "
                               f"remove or merge the class")
    few = {name: count for name, count in counts.items() if count < k}
    if few:
        shown = ", ".join(f"{name!r} ({count})" for name, count in sorted(few.items(), key=lambda item: item[1])[:5])
        warnings.warn(f"class(es) {shown} of {source} have fewer pooled examples than data.cv_folds={k}, so some "
                      f"folds validate without them (every fold still trains on them); use at most "
                      f"{min(few.values())} folds to have every class in every fold")
    return fold_of


def complete_splits(splits: dict[str, datasets.Dataset], *, validation_fraction: float, test_fraction: float,
                    split_seed: int, max_train_samples: int | None, max_eval_samples: int | None,
                    source: str) -> datasets.DatasetDict:
    """Carve missing validation/test splits out of train (seeded, stratified), truncate, and check none is empty."""
    splits = dict(splits)
    missing = [name for name in ("validation", "test") if name not in splits]
    if missing:
        fractions = {"validation": validation_fraction, "test": test_fraction}
        check_fractions({name: fractions[name] for name in missing})
        parts = stratified_split(splits["train"], [fractions[name] for name in missing], seed=split_seed)
        splits["train"] = parts[0]
        splits.update(zip(missing, parts[1:]))
    limits = {"train": ("max_train_samples", max_train_samples), "validation": ("max_eval_samples", max_eval_samples),
              "test": ("max_eval_samples", max_eval_samples)}
    for name in SPLIT_NAMES:
        if len(splits[name]) == 0:
            raise PeftlabError(f"the {name} split of {source} is empty; add examples (splits carved from train "
                               f"also follow validation_fraction and test_fraction)")
        splits[name] = truncate(splits[name], *limits[name], seed=split_seed)
    return datasets.DatasetDict({name: splits[name] for name in SPLIT_NAMES})


def check_fractions(fractions: dict[str, float]) -> None:
    """Error unless each fraction is in (0, 1) and together they leave examples for training."""
    for name, fraction in fractions.items():
        if not 0 < fraction < 1:
            raise PeftlabError(f"{name}_fraction is {fraction}; it must be between 0 and 1 (exclusive) "
                               f"because the source has no {name} split")
    if sum(fractions.values()) >= 1:
        raise PeftlabError(f"validation_fraction + test_fraction is {sum(fractions.values())}; "
                           f"keep it below 1 so training examples remain")


def stratified_split(dataset: datasets.Dataset, fractions: Sequence[float], *, seed: int) -> list[datasets.Dataset]:
    """Split into [rest, part_1, ..., part_k], part_i holding round(n * fraction_i) examples (at least 1), stratified.

    Within each class the examples are shuffled and given the key (rank + 0.5) / class size, then all examples are
    ordered by that key: any prefix of the order holds each class in proportion (up to one example), so
    cutting the parts off the front stratifies them exactly without per-class rounding.
    """
    labels = np.asarray(dataset["label"])
    rng = np.random.default_rng(seed)
    keys = np.empty(len(labels))
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        keys[members] = (np.arange(len(members)) + 0.5) / len(members)
    # A random tiebreak keeps classes of equal size from always leading in the same order.
    order = np.lexsort((rng.random(len(labels)), keys))
    sizes = [max(1, round(len(labels) * fraction)) for fraction in fractions]
    bounds = np.cumsum([0, *sizes])
    parts = [np.sort(order[bounds[-1]:])]
    parts += [np.sort(order[start:end]) for start, end in zip(bounds[:-1], bounds[1:])]
    return [dataset.select(indices) for indices in parts]


def truncate(dataset: datasets.Dataset, option: str, limit: int | None, *, seed: int) -> datasets.Dataset:
    """Keep `limit` examples chosen by a seeded shuffle (all of them when limit is None or larger)."""
    if limit is not None and limit < 1:
        raise PeftlabError(f"{option} is {limit}; use a positive number or leave it unset for all examples")
    if limit is None or limit >= len(dataset):
        return dataset
    return dataset.shuffle(seed=seed).select(range(limit))

