"""Labelled train/validation/test splits for text and image classification, and their DataLoaders."""

from peftlab.data.image import load_image_dataset, make_image_dataloader
from peftlab.data.splits import LabelledDataset
from peftlab.data.text import load_text_dataset, make_text_dataloader, tokenize_dataset
from peftlab.data.transforms import ImageTransform, build_image_transform

__all__ = [
    "ImageTransform",
    "LabelledDataset",
    "build_image_transform",
    "load_image_dataset",
    "load_text_dataset",
    "make_image_dataloader",
    "make_text_dataloader",
    "tokenize_dataset",
]
