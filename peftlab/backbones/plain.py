"""Plain torch image classifiers (the packaged EfficientNet-Lite), wrapped in `TorchImageClassifier` so they take
`pixel_values`/`labels` and return an `ImageClassifierOutput` like a transformers model."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model
from torch import nn
from transformers.modeling_outputs import ImageClassifierOutput

from peftlab.backbones.backbone import Backbone
from peftlab.backbones.layout import store_convolutions_channels_last
from peftlab.backbones.packaged import PACKAGED_BACKBONES, packaged_weights_file
from peftlab.errors import PeftlabError

# EfficientNet-Lite was trained on RGB pixels normalised as (x - 127) / 128 on 0-255 values,
# which on 0-1 pixels is mean 127/255 and std 128/255 per channel.
EFFICIENTNET_LITE_MEAN = (127 / 255,) * 3
EFFICIENTNET_LITE_STD = (128 / 255,) * 3


class TorchImageClassifier(nn.Module):
    """Wraps a plain torch classifier (pixels -> logits) so it takes `pixel_values`/`labels` like transformers."""

    CONFIG_FILE = "peftlab_model.json"
    WEIGHTS_FILE = "model.safetensors"

    def __init__(self, backbone: nn.Module, *, head_modules: Sequence[str], config: dict[str, Any]):
        """Args:
            head_modules: the task-head module names inside `backbone`, e.g. `["_fc"]`.
            config: JSON-able; `builder` names a PLAIN_BUILDERS entry and `builder_kwargs` its arguments.
        """
        super().__init__()
        self.backbone = backbone
        names = dict(backbone.named_modules())
        missing = [h for h in head_modules if h not in names]
        if missing:
            raise PeftlabError(f"head module(s) {missing} not found in {type(backbone).__name__}")
        self.peftlab_head_modules = [f"backbone.{h}" for h in head_modules]
        self.peftlab_config = config
        store_convolutions_channels_last(self)  # built or reloaded, the same layout (peftlab.backbones.layout)

    def forward(self, pixel_values: torch.Tensor, labels: Optional[torch.Tensor] = None) -> ImageClassifierOutput:
        """Logits for a batch of normalised images, plus the cross-entropy loss when labels are given."""
        logits = self.backbone(pixel_values)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write the weights (safetensors) and the JSON that rebuilds the architecture."""
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        save_model(self, str(folder / self.WEIGHTS_FILE), force_contiguous=True)  # channels-last convolutions
        (folder / self.CONFIG_FILE).write_text(json.dumps(self.peftlab_config, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, save_directory: str | os.PathLike) -> "TorchImageClassifier":
        """Rebuild the architecture from the JSON (no pretrained download) and load the saved weights."""
        folder = Path(save_directory)
        config = json.loads((folder / cls.CONFIG_FILE).read_text())
        builder = PLAIN_BUILDERS.get(config.get("builder"))
        if builder is None:
            raise PeftlabError(f"{folder / cls.CONFIG_FILE} names builder {config.get('builder')!r}; "
                               f"known builders: {', '.join(PLAIN_BUILDERS)}")
        model = builder(**config["builder_kwargs"], pretrained=False)
        model.peftlab_config = config  # keeps label names and image statistics exactly as saved
        load_model(model, str(folder / cls.WEIGHTS_FILE))
        return model


def build_efficientnet_lite(variant: str, num_labels: int, *, label_names: Optional[Sequence[str]] = None,
                            pretrained: bool = True) -> TorchImageClassifier:
    """EfficientNet-Lite with ImageNet weights, a new `num_labels` head and LoRA-targetable 1x1 convolutions."""
    packaged = PACKAGED_BACKBONES[variant]
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as err:
        raise PeftlabError(f"backbone '{variant}' needs its loader package: {packaged.pip_install}") from err
    # Built with the 1000-class ImageNet head so the weights load strictly; the head is replaced below.
    net = EfficientNet.from_name(variant)
    if pretrained:
        net.load_state_dict(torch.load(packaged_weights_file(variant, packaged), map_location="cpu",
                                       weights_only=True))
    net._fc = nn.Linear(net._fc.in_features, num_labels)
    # Convolutions with TensorFlow's "same" padding (Conv2dStaticSamePadding) pad the input with a separate ZeroPad2d,
    # a copy of every activation, and peft cannot wrap them. Where that padding is symmetric (every stride-1 layer;
    # none for 1x1 kernels) a plain nn.Conv2d padding inside the convolution computes exactly the same thing, and a
    # LoRA or full fine-tuning step runs 1.12x faster (benchmarks/SPEED.md). The stride-2 layers pad one pixel more on
    # the far side; they stay.
    for parent in list(net.modules()):
        for child_name, child in list(parent.named_children()):
            padding = _symmetric_padding(child)
            if padding is not None:
                setattr(parent, child_name, _plain_conv(child, padding))
    config = {
        "builder": "efficientnet-lite",
        "builder_kwargs": {"variant": variant, "num_labels": num_labels,
                           "label_names": list(label_names) if label_names is not None else None},
        "image_size": EfficientNet.get_image_size(variant),
        "image_mean": list(EFFICIENTNET_LITE_MEAN),
        "image_std": list(EFFICIENTNET_LITE_STD),
    }
    return TorchImageClassifier(net, head_modules=["_fc"], config=config)


def _symmetric_padding(module: nn.Module) -> Optional[tuple[int, int]]:
    """The (height, width) padding of a same-padding convolution whose ZeroPad2d pads both sides alike (or nothing),
    else None (another module, or padding that differs between sides)."""
    pad = getattr(module, "static_padding", None)
    if not isinstance(module, nn.Conv2d) or pad is None or tuple(module.padding) != (0, 0):
        return None
    if not isinstance(pad, nn.ZeroPad2d):
        return (0, 0)  # its Identity: no padding
    left, right, top, bottom = pad.padding
    return (top, left) if (left, top) == (right, bottom) else None


def _plain_conv(conv: nn.Conv2d, padding: tuple[int, int]) -> nn.Conv2d:
    plain = nn.Conv2d(conv.in_channels, conv.out_channels, kernel_size=conv.kernel_size, stride=tuple(conv.stride),
                      padding=padding, dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None)
    plain.weight = conv.weight
    plain.bias = conv.bias
    return plain


# How TorchImageClassifier.from_pretrained rebuilds each plain architecture; add an entry to support another.
PLAIN_BUILDERS: dict[str, Callable[..., TorchImageClassifier]] = {"efficientnet-lite": build_efficientnet_lite}


def load_saved_plain(path: str, num_labels: int) -> TorchImageClassifier:
    model = TorchImageClassifier.from_pretrained(path)
    saved = model.peftlab_config["builder_kwargs"]["num_labels"]
    if saved != num_labels:
        raise PeftlabError(f"the model saved in {path} has {saved} labels, not num_labels={num_labels}; "
                           "load the packaged backbone to start a new head")
    return model


def plain_backbone(model: TorchImageClassifier, name: str) -> Backbone:
    config = model.peftlab_config
    return Backbone(model=model, name=name, image_mean=tuple(config["image_mean"]),
                    image_std=tuple(config["image_std"]), image_size=config["image_size"])
