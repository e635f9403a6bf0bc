"""What loading a backbone returns: the model with its task head, plus what its inputs need."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

from torch import nn

Task = Literal["text", "image"]
Quantization = Optional[Literal["8bit", "4bit"]]


@dataclass
class Backbone:
    """A loaded backbone with its task head, plus what its inputs need."""

    model: nn.Module
    name: str
    tokenizer: Any = None
    """The tokenizer of a text backbone; None for images."""
    image_mean: Optional[tuple[float, float, float]] = None
    """Per-channel mean of 0-1 RGB pixels (images only)."""
    image_std: Optional[tuple[float, float, float]] = None
    image_size: Optional[int] = None
    """Native input resolution in pixels (images only)."""
