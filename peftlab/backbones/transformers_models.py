"""transformers backbones (text or image) through the Auto classes, optionally quantized by bitsandbytes."""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BitsAndBytesConfig,
)
from transformers.image_processing_utils import ImageProcessingMixin
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from peftlab.backbones.backbone import Backbone, Quantization, Task
from peftlab.backbones.packaged import PACKAGED_BACKBONES
from peftlab.errors import PeftlabError
from peftlab.heads import find_head


def load_transformers(path: str, name: str, *, task: Task, num_labels: int, label_names: Optional[Sequence[str]],
                       quantization: Quantization, skip_modules: Optional[Sequence[str]],
                       trust_remote_code: bool, num_hidden_layers: Optional[int]) -> Backbone:
    """Load config, model (optionally quantized) and tokenizer or image statistics of a transformers model."""
    config = _load_config(path, name, num_labels, label_names, trust_remote_code, num_hidden_layers)
    auto_class = AutoModelForSequenceClassification if task == "text" else AutoModelForImageClassification
    remote = auto_class.__name__ in (getattr(config, "auto_map", None) or {})
    if not remote and type(config) not in auto_class._model_mapping:
        other = "image" if task == "text" else "text"
        raise PeftlabError(f"'{name}' ({config.model_type}) has no {task}-classification model in transformers; "
                           f"check the name, or use task='{other}' if it is a {other} model")
    kwargs: dict[str, Any] = {}
    if quantization is not None:
        kwargs["quantization_config"] = _bnb_config(quantization, skip_modules, auto_class, config, trust_remote_code)
    # ignore_mismatched_sizes: a checkpoint that already has a head of another size gets a fresh one.
    model = auto_class.from_pretrained(path, config=config, ignore_mismatched_sizes=True,
                                       trust_remote_code=trust_remote_code, **kwargs)
    if quantization == "4bit":
        _disable_cpu_bf16_packing(model)
    if task == "text":
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        return Backbone(model=model, name=name, tokenizer=tokenizer)
    mean, std, size = _hf_image_statistics(path, config)
    return Backbone(model=model, name=name, image_mean=mean, image_std=std, image_size=size)


def transformers_task(path: str, name: str, trust_remote_code: bool) -> Task:
    """`image` for a transformers model with an image-classification class, else `text` (from its config alone)."""
    config = _load_config(path, name, 1, None, trust_remote_code, None)
    image = AutoModelForImageClassification
    remote = image.__name__ in (getattr(config, "auto_map", None) or {})
    return "image" if remote or type(config) in image._model_mapping else "text"


def _load_config(path: str, name: str, num_labels: int, label_names: Optional[Sequence[str]],
                 trust_remote_code: bool, num_hidden_layers: Optional[int]):
    """The model config with the new head size and labels; the first place a bad name or offline Hub shows."""
    overrides: dict[str, Any] = {"num_labels": num_labels}
    if label_names is not None:
        overrides["id2label"] = dict(enumerate(label_names))
        overrides["label2id"] = {label: i for i, label in enumerate(label_names)}
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, **overrides)
    except OSError as err:  # includes connection errors and "no such repo"
        if os.path.isdir(path):
            raise PeftlabError(f"could not load model '{name}': local folder {path} has no usable config.json "
                               f"({str(err).splitlines()[0]})") from err
        packaged = ", ".join(PACKAGED_BACKBONES)
        raise PeftlabError(f"could not load model '{name}': not a packaged name ({packaged}), not a local folder, "
                           "and the Hub is unreachable or has no such repo") from err
    except ValueError as err:  # e.g. remote code that needs trust_remote_code=True, an unknown model_type
        raise PeftlabError(f"could not load model '{name}': {str(err).splitlines()[0]}") from err
    if num_hidden_layers is not None:
        _truncate_layers(config, name, num_hidden_layers)
    return config


def _truncate_layers(config, name: str, num_hidden_layers: int) -> None:
    # Only fewer layers than the checkpoint has: more would silently add randomly initialised layers.
    available = getattr(config, "num_hidden_layers", None)
    if available is None:
        raise PeftlabError(f"'{name}' ({config.model_type}) has no num_hidden_layers setting; drop num_hidden_layers")
    if not 1 <= num_hidden_layers <= available:
        raise PeftlabError(f"num_hidden_layers must be between 1 and {available} for '{name}', got {num_hidden_layers}")
    config.num_hidden_layers = num_hidden_layers


def _bnb_config(quantization: str, skip_modules: Optional[Sequence[str]], auto_class, config,
                trust_remote_code: bool) -> BitsAndBytesConfig:
    """The bitsandbytes config; the task head stays in full precision unless skip_modules says otherwise."""
    try:
        import bitsandbytes  # noqa: F401  (only checks that it is installed)
    except ImportError as err:
        raise PeftlabError(f"quantization={quantization!r} needs bitsandbytes: pip install bitsandbytes") from err
    if skip_modules is None:
        # transformers' own default skips only "the last parameter minus .weight", which for a classifier
        # ending in a bias is "classifier.bias": the new head would be quantized from random init and crash.
        # A meta-device copy gives the module names without allocating weights.
        with torch.device("meta"):
            skeleton = auto_class.from_config(config, trust_remote_code=trust_remote_code)
        skip_modules = find_head(skeleton)
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(skip_modules))
    # llm_int8_skip_modules applies to 4-bit too (both quantizers read it). NF4 is QLoRA's data type
    # (Dettmers et al. 2023, Sec. 3). Compute in fp32: bitsandbytes follows fp32/bf16 inputs anyway when no
    # dtype is fixed, and a fixed bf16 would also cast the trainable biases to bf16 for good.
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                              llm_int8_skip_modules=list(skip_modules))


def _disable_cpu_bf16_packing(model: nn.Module) -> None:
    # On AVX512-BF16 CPUs, an eval forward repacks 4-bit weights into an inference-only layout in place;
    # the next training forward then fails ("a view of a leaf Variable ... in-place operation").
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def _hf_image_statistics(path: str, config) -> tuple[tuple[float, ...], tuple[float, ...], Optional[int]]:
    """Mean, std and native size from the preprocessor config (read as data: no processor class needed)."""
    try:
        processor, _ = ImageProcessingMixin.get_image_processor_dict(path)
    except OSError:  # no preprocessor_config.json: ImageNet statistics, size from the model config
        processor = {}
    mean = _three_floats(processor.get("image_mean") or IMAGENET_DEFAULT_MEAN)
    std = _three_floats(processor.get("image_std") or IMAGENET_DEFAULT_STD)
    size = processor.get("crop_size") if processor.get("do_center_crop") else processor.get("size")
    if isinstance(size, dict):
        size = size.get("height") or size.get("shortest_edge")
    return mean, std, size or getattr(config, "image_size", None)


def _three_floats(value) -> tuple[float, float, float]:
    # A few older processor configs store one number for all three channels.
    values = [value] * 3 if isinstance(value, (int, float)) else value
    return tuple(float(v) for v in values)
