"""Labelled train/validation/test splits for text and image classification, and their DataLoaders."""

from __future__ import annotations

from peftlab.data.image import load_image_dataset, make_image_dataloader
from peftlab.data.splits import LabelledDataset
from peftlab.data.text import load_text_dataset, make_text_dataloader, tokenize_dataset
from peftlab.data.transforms import ImageTransform, build_image_transform

__all__ = [
    "load_data",
    "ImageTransform",
    "LabelledDataset",
    "build_image_transform",
    "load_image_dataset",
    "load_text_dataset",
    "make_image_dataloader",
    "make_text_dataloader",
    "tokenize_dataset",
]


def load_data(data_cfg, task: str) -> LabelledDataset:
    """The labelled splits a run's `data` section describes, for task `text` or `image`: the one call recipes,
    `peftlab.load` and the benchmarks share, so a setting added to `DataConfig` reaches all of them."""
    common = dict(label_column=data_cfg.label_column, validation_fraction=data_cfg.validation_fraction,
                  test_fraction=data_cfg.test_fraction, split_seed=data_cfg.split_seed,
                  max_train_samples=data_cfg.max_train_samples, max_eval_samples=data_cfg.max_eval_samples,
                  cv_folds=data_cfg.cv_folds, cv_fold=data_cfg.cv_fold, group_column=data_cfg.group_column)
    if task == "text":
        return load_text_dataset(data_cfg.name, text_column=data_cfg.text_column, **common)
    return load_image_dataset(data_cfg.name, **common)
