"""Frozen linear and convolution weights held in the autocast dtype while a run trains under mixed precision.

Autocast casts every fp32 weight a matmul or convolution reads to bf16 (fp16) again at every forward: its cast cache
keeps only trainable leaves and lives for one autocast block. For LoRA and the other frozen-base strategies that is
every base weight, every step (5-6.5% of a MiniLM LoRA step in benchmarks/SPEED.md's profile). Casting the frozen
ones once gives the matmuls the very values autocast would (the same round-to-nearest), so training computes the
same numbers. The fp32 tensors are kept and put back when training ends, so the model a run leaves in memory, and
anything computed from it afterwards, is the one it had before: frozen weights are never rounded for good.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import nn

# Modules whose forward is one autocast op on their own weight (linear, conv): exact types, so quantized subclasses
# (bitsandbytes' Linear8bitLt / Linear4bit) and anything that reads its weight otherwise keep their own.
AUTOCAST_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(mixed_precision: str) -> Optional[torch.dtype]:
    """The dtype autocast computes matmuls in for accelerate's `mixed_precision` value; None for fp32 (`no`)."""
    return AUTOCAST_DTYPES.get(mixed_precision)


def _base_layers_read_elsewhere(model: nn.Module) -> set[int]:
    """ids of peft base layers whose weight the tuner layer also reads itself (DoRA's norm, OFT's rotation...):
    those stay fp32, as the method computes with them. A LoRA layer without a variant only calls its base layer."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer

    kept = set()
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            plain_lora = isinstance(module, LoraLayer) and not getattr(module, "lora_variant", {})
            if not plain_lora:
                kept.add(id(module.get_base_layer()))
    return kept


def _castable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Frozen fp32 weights and biases of linear and convolution modules, each used by no other kind of module (a
    weight tied to an embedding keeps fp32: the lookup would return rounded vectors)."""
    kept = _base_layers_read_elsewhere(model)
    owners: dict[int, list[bool]] = {}
    parameters: dict[int, nn.Parameter] = {}
    for module in model.modules():
        castable = type(module) in AUTOCAST_MODULES and id(module) not in kept
        for parameter in module.parameters(recurse=False):
            owners.setdefault(id(parameter), []).append(castable)
            parameters[id(parameter)] = parameter
    return [p for key, p in parameters.items()
            if all(owners[key]) and not p.requires_grad and p.dtype == torch.float32]


@contextlib.contextmanager
def frozen_weights_in(model: nn.Module, dtype: Optional[torch.dtype]) -> Iterator[int]:
    """Within the block, the model's frozen linear and convolution weights are `dtype` tensors (nothing changes for
    None); the fp32 ones come back on leaving it, also on an exception. Yields how many tensors were cast."""
    cast = _castable_parameters(model) if dtype is not None else []
    originals = [parameter.data for parameter in cast]
    for parameter in cast:
        # `.data`: the Parameter objects stay the same, so anything holding them (hooks, ties) sees the change.
        parameter.data = parameter.data.to(dtype)
    try:
        yield len(cast)
    finally:
        for parameter, original in zip(cast, originals):
            parameter.data = original
