"""How a backbone's convolution weights are laid out in memory, whether convolutions are most of its weights, and
whether training runs backward through them.

oneDNN's CPU convolutions run fastest channels-last (NHWC), and cuDNN's tensor-core convolutions prefer it too; with
the weights in that layout, the first convolution's output, and so every activation after it, follows, whatever
layout the pixels come in. Measured on EfficientNet-Lite0 (64 px, batch 64, fp32, one thread of the 2-core AMD EPYC
with AVX512-BF16; benchmarks/SPEED.md): a full fine-tuning step 1.8x, LoRA 1.4x, evaluation 1.5x. Convolutional
backbones are stored so wherever they are built or loaded (recipes, `peftlab.load`, `TorchImageClassifier`), so a run
and its reloads compute alike; saved weights are written contiguous, the same values.
"""

from __future__ import annotations

import torch
from torch import nn

from peftlab.heads import is_in_modules


def mostly_convolutions(model: nn.Module) -> bool:
    """Whether convolution weights outnumber linear ones: EfficientNet and ResNet yes; ViT, BERT and ConvNeXt (whose
    pointwise layers are linear) no."""
    counts = {"conv": 0, "linear": 0}
    for module in model.modules():
        kind = ("conv" if isinstance(module, nn.modules.conv._ConvNd)
                else "linear" if isinstance(module, nn.Linear) else None)
        if kind is not None and isinstance(getattr(module, "weight", None), torch.Tensor):
            counts[kind] += module.weight.numel()
    return counts["conv"] > counts["linear"]


def store_convolutions_channels_last(model: nn.Module) -> None:
    """Hold every 2-D convolution weight of a convolutional model (`mostly_convolutions`) channels-last; leave others
    (a ViT's one patch embedding) as they are."""
    if not mostly_convolutions(model):
        return
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and module.weight.is_floating_point():
            module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last)


def trains_through_convolutions(model: nn.Module) -> bool:
    """Whether a convolutional model (`mostly_convolutions`) runs backward through its convolutions when it trains:
    some trainable parameter lies outside its task head (LoRA, adapters, BitFit, partial or full fine-tuning). Not
    for the head strategy, whose backbone only runs forward. A model without a strategy record counts as training
    through them."""
    if not mostly_convolutions(model):
        return False
    applied = getattr(model, "peftlab_strategy", None)
    heads = applied.head_modules if applied is not None else []
    return any(p.requires_grad and not is_in_modules(name, heads) for name, p in model.named_parameters())
