"""The strategy registry: `apply_strategy(model, name, **options)` adapts any backbone with one call.

A strategy is a plain function `(model, options, head_modules) -> model` that freezes, wraps or injects.
It never trains, logs or saves. Register a new one with `@register_strategy("name", OptionsDataclass)`.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from torch import nn

from peftlab.config import coerce_value
from peftlab.errors import PeftlabError
from peftlab.heads import find_head
from peftlab.pooling import POOLINGS, apply_mean_pooling


@dataclass(frozen=True)
class Strategy:
    name: str
    fn: Callable[[nn.Module, Any, list[str]], nn.Module]
    options_cls: type


_REGISTRY: dict[str, Strategy] = {}


def register_strategy(name: str, options_cls: type):
    """Decorator adding a strategy function under `name`, with its options dataclass."""

    def decorator(fn):
        if name in _REGISTRY:
            raise ValueError(f"strategy {name!r} is already registered")
        _REGISTRY[name] = Strategy(name, fn, options_cls)
        return fn

    return decorator


def list_strategies() -> list[str]:
    """Names of all registered strategies."""
    return sorted(_REGISTRY)


def get_strategy(name: str) -> Strategy:
    """The registered strategy called `name`, or a one-line error listing the choices."""
    if name not in _REGISTRY:
        raise PeftlabError(f"unknown strategy {name!r}; choose one of {list_strategies()}")
    return _REGISTRY[name]


def validate_strategy_options(name: str, options: Optional[dict] = None) -> Any:
    """Build the options dataclass of strategy `name`, rejecting unknown keys and wrong types."""
    strategy = get_strategy(name)
    options = dict(options or {})
    fields = {f.name: f for f in dataclasses.fields(strategy.options_cls)}
    for key, value in options.items():
        if key not in fields:
            raise PeftlabError(f"strategy {name!r} has no option {key!r}; its options are {sorted(fields) or 'none'}")
        hint = typing.get_type_hints(strategy.options_cls)[key]
        options[key] = coerce_value(value, hint, f"strategy {name!r} option {key}")
    built = strategy.options_cls(**options)
    check = getattr(built, "validate", None)
    if check:
        check()
    return built


def apply_strategy(model: nn.Module, name: str, head_modules: Optional[Sequence[str]] = None, pooling: str = "cls",
                   **options) -> nn.Module:
    """Adapt `model` with strategy `name` so that exactly the right parameters train.

    Args:
        model: a transformers task model or a plain torch classifier (with `peftlab_head_modules`).
        name: one of `list_strategies()`.
        head_modules: the task head's module names, when they cannot be found automatically.
        pooling: what the head of a transformers encoder sees: `cls` (the model's own first-token/pooler
            features) or `mean` (masked mean of the last hidden states; see `peftlab.pooling`).
        **options: the strategy's options (e.g. `r=8` for `lora`).
    Returns the adapted model (the same object, or a peft wrapper for `lora`), tagged with `peftlab_strategy`.
    """
    built = validate_strategy_options(name, options)
    heads = find_head(model, head_modules)
    if pooling not in POOLINGS:
        raise PeftlabError(f"pooling={pooling!r} is not supported; choose one of {list(POOLINGS)}")
    if pooling == "mean":
        apply_mean_pooling(model)
    adapted = get_strategy(name).fn(model, built, heads)
    freeze_norm_statistics(adapted)
    # What save/load need to rebuild the same model on a fresh base.
    adapted.peftlab_strategy = {"name": name, "options": dataclasses.asdict(built), "head_modules": heads,
                                "pooling": pooling}
    return adapted


def set_trainable(model: nn.Module, predicate: Callable[[str, nn.Parameter], bool]) -> None:
    """Freeze every parameter, then unfreeze those for which `predicate(name, param)` holds."""
    for param_name, param in model.named_parameters():
        param.requires_grad_(bool(predicate(param_name, param)))


def freeze_norm_statistics(model: nn.Module) -> None:
    """Keep frozen batch norms in eval mode, so training a frozen backbone never moves its running statistics."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
            p.requires_grad for p in module.parameters()
        ):
            module.register_forward_pre_hook(_use_running_statistics)


def _use_running_statistics(module: nn.Module, args) -> None:
    module.training = False


def is_quantized(model: nn.Module) -> bool:
    """Whether the model's weights were loaded in 8-bit or 4-bit through bitsandbytes."""
    return bool(getattr(model, "is_quantized", False) or getattr(model, "is_loaded_in_8bit", False)
                or getattr(model, "is_loaded_in_4bit", False))


# Importing the modules registers the built-in strategies.
from peftlab.strategies import adapter, freezing, lora  # noqa: E402,F401
