"""Bottleneck adapters: Houlsby (after attention and after FFN) and Pfeiffer (after FFN only)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from torch import nn

from peftlab.errors import PeftlabError
from peftlab.heads import find_blocks, is_in_modules
from peftlab.modules.bottleneck import ADAPTER_PREFIX, AdaptedLayer, BottleneckAdapter, output_features
from peftlab.strategies import Merge, register_strategy, set_trainable
from peftlab.strategies.groups import ParameterGroups, group_parameters

# Output projections of each block's sub-layers, by naming scheme (matched as name suffixes inside a block).
# BERT/RoBERTa/ELECTRA: attention.output.dense / output.dense; DistilBERT: attention.out_lin / ffn.lin2;
# transformers-5 ViT and decoders: attention.o_proj / mlp.fc2 / mlp.down_proj; ConvNeXt: pwconv2;
# EfficientNet MBConv blocks: _project_conv (an adapter on its output channels).
ATTENTION_OUTPUTS = ("attention.output.dense", "attention.out_lin", "attention.o_proj", "self_attn.o_proj",
                     "attn.out_proj", "attn.proj")
FFN_OUTPUTS = ("output.dense", "ffn.lin2", "mlp.fc2", "mlp.down_proj", "pwconv2", "_project_conv")


@dataclass
class AdapterOptions:
    kind: Literal["houlsby", "pfeiffer"] = "houlsby"
    size: Optional[int] = None
    """Bottleneck width; defaults to hidden size / reduction_factor."""
    reduction_factor: int = 16
    activation: Literal["relu", "gelu", "silu", "tanh"] = "relu"
    train_layer_norms: Optional[bool] = None
    """Train the blocks' layer norms; default True for Houlsby (as in the paper), False for Pfeiffer."""
    init_std: float = 1e-2
    locations: Optional[list[str]] = None
    """Module name suffixes (inside each block) to follow with an adapter, overriding the defaults."""

    def validate(self):
        if self.size is not None and self.size < 1:
            raise PeftlabError(f"strategy 'adapter' option size={self.size} must be >= 1")
        if self.reduction_factor < 1:
            raise PeftlabError(f"strategy 'adapter' option reduction_factor={self.reduction_factor} must be >= 1")


def _matching(block: nn.Module, suffixes: tuple[str, ...], exclude: set[str] = frozenset()) -> list[str]:
    return [n for n, _ in block.named_modules()
            if n and n not in exclude and any(n == s or n.endswith("." + s) for s in suffixes)]


def find_adapter_locations(block: nn.Module, options: AdapterOptions) -> list[str]:
    """Names (relative to a block) of the sub-layers an adapter follows."""
    if options.locations:
        return _matching(block, tuple(options.locations))
    attention = _matching(block, ATTENTION_OUTPUTS)
    ffn = _matching(block, FFN_OUTPUTS, exclude=set(attention))
    if options.kind == "pfeiffer":
        return ffn
    if not attention:
        raise PeftlabError(
            "houlsby adapters go after attention and after the FFN, and this backbone's blocks have no attention "
            "(a CNN?); use strategy_options.adapter.kind=pfeiffer (and .locations if needed)"
        )
    return attention + ffn


def is_adapter_parameter(name: str) -> bool:
    """Whether a parameter belongs to an injected bottleneck adapter."""
    return f".{ADAPTER_PREFIX}." in name


def adapter_parameter_groups(model: nn.Module) -> ParameterGroups:
    """The bottleneck adapters of all blocks in one group, then the usual groups (trained layer norms, head)."""
    return group_parameters(model, {"adapters": is_adapter_parameter})


@register_strategy("adapter", AdapterOptions, parameter_groups=adapter_parameter_groups, merge=Merge.NOT_FOLDABLE,
                   cannot_merge_because="bottleneck adapters have a non-linearity, so they cannot be folded into the "
                                        "base weights; save them with save_trained and load them with load_trained")
def adapter(model: nn.Module, options: AdapterOptions, head_modules: list[str]) -> nn.Module:
    """Insert a bottleneck adapter after chosen sub-layers of every block; adapters, head (and layer norms) train."""
    blocks_name, blocks = find_blocks(model, head_modules)
    for index, block in enumerate(blocks):
        locations = find_adapter_locations(block, options)
        if not locations:
            raise PeftlabError(
                f"no adapter location found in block {blocks_name}.{index} ({type(block).__name__}); "
                "set strategy_options.adapter.locations to the output layers to adapt"
            )
        for location in locations:
            parent_name, _, child_name = location.rpartition(".")
            parent = block.get_submodule(parent_name) if parent_name else block
            layer = getattr(parent, child_name)
            features, channel_dim = output_features(layer)
            bottleneck = options.size or max(1, features // options.reduction_factor)
            module = BottleneckAdapter(features, bottleneck, options.activation, options.init_std, channel_dim)
            setattr(parent, child_name, AdaptedLayer(layer, module.to(_device_of(layer))))
    train_norms = options.train_layer_norms if options.train_layer_norms is not None else options.kind == "houlsby"
    norms = [f"{blocks_name}.{n}" for n, m in blocks.named_modules() if isinstance(m, nn.LayerNorm)] if train_norms else []
    set_trainable(model, lambda name, p: is_adapter_parameter(name) or is_in_modules(name, head_modules + norms))
    return model


def _device_of(layer: nn.Module):
    param = next(layer.parameters(), None)
    return param.device if param is not None else "cpu"
