"""Save only what trained, load it onto a freshly loaded base, and merge LoRA into the base weights.

Files in a saved folder:
- `peftlab_strategy.json`: strategy name, options and head modules, to rebuild the same model.
- LoRA: peft's own `adapter_config.json` + `adapter_model.safetensors` (`peft.PeftModel.from_pretrained` loads it).
- full: the whole model via `save_pretrained` (safetensors; plain `from_pretrained` loads it).
- other strategies: `peftlab_trainable.safetensors` with only the trained tensors (head, adapters, biases, blocks).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from peftlab.errors import PeftlabError
from peftlab.pooling import apply_mean_pooling
from peftlab.strategies import apply_strategy

STRATEGY_FILE = "peftlab_strategy.json"
TRAINABLE_FILE = "peftlab_trainable.safetensors"


def _is_peft(model: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained tensors, plus the buffers (batch-norm statistics) of modules that train; contiguous, on CPU."""
    state = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    for module_name, module in model.named_modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            prefix = f"{module_name}." if module_name else ""
            state.update({prefix + n: b.detach() for n, b in module.named_buffers(recurse=False)})
    return {n: t.to("cpu").contiguous() for n, t in state.items()}


def save_trained(model: nn.Module, output_dir: str | Path) -> Path:
    """Write what trained (see module docstring) plus the strategy spec into `output_dir`."""
    strategy = getattr(model, "peftlab_strategy", None)
    if strategy is None:
        raise PeftlabError("this model was not adapted with peftlab.apply_strategy, so there is no strategy to save")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if _is_peft(model):
        model.save_pretrained(output_dir)
    elif strategy["name"] == "full" and hasattr(model, "save_pretrained"):
        model.save_pretrained(output_dir)
    else:
        save_file(trainable_state_dict(model), output_dir / TRAINABLE_FILE)
    (output_dir / STRATEGY_FILE).write_text(json.dumps(strategy, indent=2) + "\n")
    return output_dir


def read_strategy(saved_dir: str | Path) -> dict:
    """The strategy spec of a saved folder."""
    path = Path(saved_dir) / STRATEGY_FILE
    if not path.is_file():
        raise PeftlabError(f"{saved_dir} holds no {STRATEGY_FILE}; point to a folder written by peftlab")
    return json.loads(path.read_text())


def load_trained(base_model: nn.Module, saved_dir: str | Path) -> nn.Module:
    """Rebuild the adapted model on a freshly loaded `base_model` and load the saved tensors into it."""
    saved_dir = Path(saved_dir)
    spec = read_strategy(saved_dir)
    if spec["name"] == "lora":
        from peft import PeftModel

        if spec.get("pooling") == "mean":
            apply_mean_pooling(base_model)
        model = PeftModel.from_pretrained(base_model, saved_dir)
        model.peftlab_strategy = spec
        return model
    if spec["name"] == "full" and not (saved_dir / TRAINABLE_FILE).is_file():
        # A whole model written by save_pretrained: its own loader knows its on-disk names (transformers 5
        # may rename weights on save), so reload through it rather than through load_state_dict.
        model = type(base_model).from_pretrained(saved_dir)
        return apply_strategy(model, "full", head_modules=spec["head_modules"], pooling=spec.get("pooling", "cls"))
    model = apply_strategy(base_model, spec["name"], head_modules=spec["head_modules"],
                           pooling=spec.get("pooling", "cls"), **spec["options"])
    weights = saved_dir / TRAINABLE_FILE
    state = load_file(weights)
    expected = set(trainable_state_dict(model))
    if set(state) != expected:
        missing, unexpected = sorted(expected - set(state))[:3], sorted(set(state) - expected)[:3]
        raise PeftlabError(f"{weights} does not fit this base model (missing {missing}, unexpected {unexpected}); "
                           "load it onto the same backbone it was trained from")
    model.load_state_dict(state, strict=False)
    return model


def merge(model: nn.Module) -> nn.Module:
    """Fold LoRA into the base weights and return a plain model that `save_pretrained`/`from_pretrained` handle.

    Freezing strategies (full, head with CLS pooling, partial, bitfit) already are plain models and come back as they are.
    """
    spec = getattr(model, "peftlab_strategy", None) or {}
    if spec.get("pooling") == "mean":
        raise PeftlabError("pooling=mean is a peftlab hook, not part of the transformers architecture, so a merged "
                           "model would pool differently; load it with load_trained instead")
    if _is_peft(model):
        merged = model.merge_and_unload()
        merged.__dict__.pop("peftlab_strategy", None)
        return merged
    if spec.get("name") == "adapter":
        raise PeftlabError("bottleneck adapters have a non-linearity and cannot be folded into the base weights; "
                           "save them with save_trained and load them with load_trained")
    return model
