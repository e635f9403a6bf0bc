"""Bottleneck adapters (Houlsby et al. 2019, Pfeiffer et al. 2021): h + W_up·f(W_down·h), near-identity at init."""

from __future__ import annotations

import torch
from torch import nn

ADAPTER_PREFIX = "peftlab_adapter"
"""Every injected adapter module is named this, so what trains is derived from names, never guessed."""

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class BottleneckAdapter(nn.Module):
    """Down-project, non-linearity, up-project, plus the skip connection (Houlsby et al. 2019, Fig. 2).

    The up projection starts at zero, so the adapter is exactly the identity at initialisation and the
    adapted model starts where the base model was. `channel_dim=1` applies it to conv feature maps (B, C, H, W).
    """

    def __init__(self, features: int, bottleneck: int, activation: str = "relu", init_std: float = 1e-2,
                 channel_dim: int = -1):
        super().__init__()
        self.channel_dim = channel_dim
        self.down = nn.Linear(features, bottleneck)
        self.act = _ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck, features)
        nn.init.normal_(self.down.weight, std=init_std)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        h = hidden.movedim(self.channel_dim, -1) if self.channel_dim != -1 else hidden
        h = h.to(self.down.weight.dtype)
        delta = self.up(self.act(self.down(h)))
        if self.channel_dim != -1:
            delta = delta.movedim(-1, self.channel_dim)
        return hidden + delta.to(hidden.dtype)


class AdaptedLayer(nn.Module):
    """A frozen sub-layer followed by its adapter: `adapter(base_layer(x))`."""

    def __init__(self, base_layer: nn.Module, adapter: BottleneckAdapter):
        super().__init__()
        self.base_layer = base_layer
        setattr(self, ADAPTER_PREFIX, adapter)

    def forward(self, *args, **kwargs):
        return getattr(self, ADAPTER_PREFIX)(self.base_layer(*args, **kwargs))


def output_features(layer: nn.Module) -> tuple[int, int]:
    """(number of output features, channel dim) of a Linear-like or Conv2d-like layer."""
    if hasattr(layer, "out_features"):
        return layer.out_features, -1
    if hasattr(layer, "out_channels"):
        return layer.out_channels, 1
    raise TypeError(f"cannot attach an adapter after {type(layer).__name__}: it has no out_features/out_channels")
