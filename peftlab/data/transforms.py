"""Image transforms in pure PIL/numpy/torch (torchvision fails on this torch build): resize, augment, normalise."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from peftlab.errors import PeftlabError

AUGMENTATIONS = ("crop", "flip", "rotate")
CROP_SCALE = (0.7, 1.0)
"""Share of the image area a random resized crop keeps."""
CROP_RATIO = (3 / 4, 4 / 3)
"""Aspect-ratio range of the crop, as in Inception (Szegedy et al. 2015) and torchvision's RandomResizedCrop."""
MAX_ROTATION_DEGREES = 10.0


@dataclass(eq=False)
class ImageTransform:
    """Callable PIL image (or uint8 HxW / HxWxC array) -> normalised float tensor 3 x image_size x image_size.

    Without augmentations it is deterministic. With them it draws from its own torch.Generator, seeded by `seed` in
    the main process and by the DataLoader's per-worker seed inside workers, so every worker augments differently
    and a seeded DataLoader reproduces the same augmentations.
    """

    image_size: int
    mean: tuple[float, float, float]
    """Per-channel mean on the [0, 1] pixel scale (ImageNet: 0.485, 0.456, 0.406)."""
    std: tuple[float, float, float]
    augmentations: tuple[str, ...] = ()
    """Any of `crop`, `flip`, `rotate`, applied in the order rotate, crop, flip."""
    seed: int = 0
    _generator: torch.Generator = field(init=False, repr=False)
    _worker_seed: int | None = field(init=False, repr=False, default=None)

    def __post_init__(self) -> None:
        self._generator = torch.Generator().manual_seed(self.seed)
        # Reshaped once so normalising a CHW tensor broadcasts per channel.
        self._mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, image: Image.Image | np.ndarray) -> torch.Tensor:
        image = to_rgb(image)
        if "rotate" in self.augmentations:
            angle = self._uniform(-MAX_ROTATION_DEGREES, MAX_ROTATION_DEGREES)
            image = image.rotate(angle, resample=Image.Resampling.BILINEAR)  # corners fill with black
        box = self._crop_box(*image.size) if "crop" in self.augmentations else None
        image = image.resize((self.image_size, self.image_size), Image.Resampling.BILINEAR, box=box)
        if "flip" in self.augmentations and self._uniform(0, 1) < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
        return (pixels.float() / 255.0 - self._mean) / self._std

    def _crop_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """A random box covering CROP_SCALE of the area with an aspect ratio in CROP_RATIO (clipped to the image)."""
        area = width * height * self._uniform(*CROP_SCALE)
        log_ratio = self._uniform(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
        crop_w = min(width, math.sqrt(area * math.exp(log_ratio)))
        crop_h = min(height, math.sqrt(area / math.exp(log_ratio)))
        left = self._uniform(0, width - crop_w)
        top = self._uniform(0, height - crop_h)
        return left, top, left + crop_w, top + crop_h

    def _uniform(self, low: float, high: float) -> float:
        return low + (high - low) * torch.rand((), generator=self._rng()).item()

    def _rng(self) -> torch.Generator:
        """The generator to draw from, reseeded once per DataLoader worker (each worker holds a copy of this object)."""
        worker = torch.utils.data.get_worker_info()
        if worker is not None and worker.seed != self._worker_seed:
            self._worker_seed = worker.seed
            self._generator.manual_seed((worker.seed + self.seed) % 2**63)
        return self._generator


def to_rgb(image: Image.Image | np.ndarray) -> Image.Image:
    """Return a 3-channel RGB PIL image from a PIL image of any mode (16-bit grayscale included, see `to_8bit`) or a
    uint8 HxW / HxWx1 / HxWx3 / HxWx4 or uint16 HxW array."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image.squeeze(-1) if image.ndim == 3 and image.shape[-1] == 1 else image)
    image = to_8bit(image)
    return image if image.mode == "RGB" else image.convert("RGB")


WIDE_GRAY_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I", "F"}
"""PIL modes of grayscale images with more than 8 bits a pixel (16-bit PNGs open as "I;16")."""
UINT16_MAX = 65535


def to_8bit(image: Image.Image) -> Image.Image:
    """An 8-bit grayscale ("L") image from a 16-bit, 32-bit integer or float one; images of other modes as they are.

    PIL's own convert("L") or convert("RGB") clips such pixels at 255, so a 16-bit PNG (0..65535) turns almost
    all white. Here 16-bit values scale by 255 / 65535 = 1 / 257 (65535 -> 255, order kept); integers outside
    0..65535 and floats scale from their own min..max instead.
    """
    if image.mode not in WIDE_GRAY_MODES:
        return image
    pixels = np.asarray(image, dtype=np.float64)
    low, high = (float(pixels.min()), float(pixels.max())) if pixels.size else (0.0, 0.0)
    if image.mode != "F" and 0 <= low and high <= UINT16_MAX:
        low, high = 0.0, float(UINT16_MAX)
    scaled = (pixels - low) * (255.0 / (high - low)) if high > low else np.zeros_like(pixels)
    return Image.fromarray(np.rint(scaled).astype(np.uint8))  # 2-D uint8 -> mode "L"


def build_image_transform(image_size: int, mean: Sequence[float], std: Sequence[float], *, train: bool,
                          augment: bool | Sequence[str] = True, seed: int = 0) -> ImageTransform:
    """Resize to image_size x image_size, to float CHW and normalise; a train transform also augments.

    Args:
        mean, std: per-channel values on the [0, 1] pixel scale (one value is repeated for all 3 channels).
        train: only a train transform augments; an eval transform is deterministic whatever `augment` says.
        augment: True for all of crop/flip/rotate, False for none, or a list naming some of them.
        seed: seeds the augmentation draws in the main process (workers reseed from the DataLoader).
    """
    if not isinstance(image_size, int) or image_size < 1:
        raise PeftlabError(f"image_size is {image_size!r}; use a positive whole number of pixels such as 96 or 224")
    mean, std = channel_values(mean, "mean"), channel_values(std, "std")
    if min(std) <= 0:
        raise PeftlabError(f"std is {std}; every channel's std must be positive")
    if isinstance(augment, bool):
        augmentations = AUGMENTATIONS if augment else ()
    else:
        unknown = sorted(set(augment) - set(AUGMENTATIONS))
        if unknown:
            raise PeftlabError(f"unknown augmentation(s) {unknown}; choose from {', '.join(AUGMENTATIONS)}")
        augmentations = tuple(name for name in AUGMENTATIONS if name in augment)
    return ImageTransform(image_size, mean, std, augmentations if train else (), seed)


def channel_values(values: float | Sequence[float], name: str) -> tuple[float, float, float]:
    """Three per-channel floats from one value or a sequence of 1 or 3."""
    values = [values] if np.ndim(values) == 0 else list(values)
    if len(values) == 1:
        values = values * 3
    if len(values) != 3:
        raise PeftlabError(f"{name} has {len(values)} values; give 3 (one per RGB channel) or 1 for all")
    return tuple(float(value) for value in values)


def image_processor(transform: ImageTransform):
    """A transformers image processor that computes what the evaluation `transform` does (bilinear resize to its size,
    scale to 0-1, normalise), saved beside a run's weights so vanilla transformers preprocesses images as peftlab
    does. The PIL backend: its resize is PIL's, the same as ours, so pixel values match exactly."""
    from transformers import ViTImageProcessorPil

    if transform.augmentations:
        raise ValueError("only the deterministic evaluation transform has an image-processor equivalent")
    return ViTImageProcessorPil(do_resize=True, size={"height": transform.image_size, "width": transform.image_size},
                                resample=Image.Resampling.BILINEAR, do_rescale=True, rescale_factor=1 / 255,
                                do_normalize=True, image_mean=list(transform.mean), image_std=list(transform.std))
