"""Strategies that only choose what trains: full, head (linear probe), partial (top-k blocks), BitFit."""

from __future__ import annotations

from dataclasses import dataclass
from torch import nn

from peftlab.errors import PeftlabError
from peftlab.heads import find_blocks, is_in_modules, names_above_blocks
from peftlab.strategies import SaveFormat, is_quantized, register_strategy, set_trainable


@dataclass
class NoOptions:
    pass


@dataclass
class PartialOptions:
    top_k: int = 2
    """Train the top k blocks and everything above them (final norm, pooler, head)."""

    def validate(self):
        if self.top_k < 1:
            raise PeftlabError(f"strategy 'partial' option top_k={self.top_k} must be >= 1")


@register_strategy("full", NoOptions, save_format=SaveFormat.WHOLE_MODEL)
def full(model: nn.Module, options: NoOptions, head_modules: list[str]) -> nn.Module:
    """Full fine-tuning: every parameter trains."""
    if is_quantized(model):
        raise PeftlabError("strategy 'full' cannot train quantized weights; drop model.quantization or use lora/adapter")
    set_trainable(model, lambda name, p: True)
    return model


@register_strategy("head", NoOptions, caches_frozen_features=True)
def head(model: nn.Module, options: NoOptions, head_modules: list[str]) -> nn.Module:
    """Linear probe: the backbone is frozen, the task head trains (pick its features with apply_strategy's `pooling`)."""
    set_trainable(model, lambda name, p: is_in_modules(name, head_modules))
    return model


@register_strategy("partial", PartialOptions)
def partial(model: nn.Module, options: PartialOptions, head_modules: list[str]) -> nn.Module:
    """Keep the lower blocks frozen and retrain the top `top_k` blocks, everything above them and the head."""
    if is_quantized(model):
        raise PeftlabError("strategy 'partial' cannot train quantized blocks; drop model.quantization or use lora/adapter")
    blocks_name, blocks = find_blocks(model, head_modules)
    if options.top_k > len(blocks):
        raise PeftlabError(f"strategy 'partial' option top_k={options.top_k} exceeds the model's {len(blocks)} blocks")
    trained_blocks = [f"{blocks_name}.{i}" for i in range(len(blocks) - options.top_k, len(blocks))]
    above = names_above_blocks([name for name, _ in model.named_parameters()], blocks_name)
    set_trainable(model, lambda name, p: is_in_modules(name, trained_blocks + head_modules) or name in above)
    return model


@register_strategy("bitfit", NoOptions)
def bitfit(model: nn.Module, options: NoOptions, head_modules: list[str]) -> nn.Module:
    """BitFit (Ben Zaken et al. 2022): only the bias terms and the head train."""
    set_trainable(model, lambda name, p: name.endswith("bias") or is_in_modules(name, head_modules))
    return model
