"""The strategy registry: `apply_strategy(model, name, **options)` adapts any backbone with one call.

A strategy is a plain function `(model, options, head_modules) -> model` that freezes, wraps or injects.
It never trains, logs or saves. Register a new one with `@register_strategy("name", OptionsDataclass, ...)`, whose
keyword arguments fill its `StrategyRecord` (how it saves, loads and merges, caching, parameter groups, hooks before
training and after each step; see `peftlab.strategies.registry`). The rest of peftlab reads that record, never the
strategy's name.

Built in: full, head, partial, bitfit (`freezing`), lora with its initialisations (`lora`), adapter (`adapter`), and
peft's other methods (`peft_methods`): `peft` for any peft tuner by name, and prefix, prompt, ia3, vera, loha, lokr,
adalora by their own names.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Callable, Optional, Sequence

from torch import nn

from peftlab.errors import PeftlabError
from peftlab.heads import find_head, is_in_modules
from peftlab.pooling import POOLINGS, apply_mean_pooling
from peftlab.strategies.groups import ParameterGroups
from peftlab.strategies.registry import (
    AppliedStrategy,
    Merge,
    SaveFormat,
    StrategyRecord,
    TrainingStart,
    applied_strategy,
    get_strategy,
    list_strategies,
    peft_base_name,
    register_strategy,
    strategy_record,
    unregister_strategy,
)
from peftlab.typed import coerce_value

__all__ = ["AppliedStrategy", "Merge", "SaveFormat", "StrategyRecord", "TrainingStart", "after_step_hook",
           "applied_strategy", "apply_strategy", "before_training", "configured_record", "freeze_norm_statistics",
           "get_strategy", "is_quantized", "list_strategies", "parameter_groups", "peft_base_name",
           "register_strategy", "set_trainable", "strategy_record", "unregister_strategy",
           "validate_strategy_options"]


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


def configured_record(name: str, options: Optional[dict] = None) -> StrategyRecord:
    """The record of strategy `name` with `options` as a config gives them (validated first, defaults filled in)."""
    return strategy_record(name, dataclasses.asdict(validate_strategy_options(name, options)))


def apply_strategy(model: nn.Module, name: str, head_modules: Optional[Sequence[str]] = None, pooling: str = "cls",
                   batchnorm: str = "auto", heads_apart: bool = False, **options) -> nn.Module:
    """Adapt `model` with strategy `name` so that exactly the right parameters train.

    Args:
        model: a transformers task model or a plain torch classifier (with `peftlab_head_modules`).
        name: one of `list_strategies()`.
        head_modules: the task head's module names, when they cannot be found automatically.
        pooling: what the head of a transformers encoder sees: `cls` (the model's own first-token/pooler
            features) or `mean` (masked mean of the last hidden states; see `peftlab.pooling`).
        batchnorm: what batch norms whose weights train do with their running statistics in training: `train`
            re-estimates them, `frozen` keeps them, `auto` is `frozen` where the model has batch norms (see
            `freeze_norm_statistics`).
        heads_apart: the heads train, but the strategy function is not given them, so a peft strategy leaves them
            out of its adapter (no `modules_to_save`): multi-task heads, one per task, saved and routed by
            `peftlab.multitask` rather than copied into every task's adapter.
        **options: the strategy's options (e.g. `r=8` for `lora`).
    Returns the adapted model (the same object, or a peft wrapper for `lora`), tagged with `peftlab_strategy` (an
    `AppliedStrategy`).
    """
    built = validate_strategy_options(name, options)
    heads = find_head(model, head_modules)
    if pooling not in POOLINGS:
        raise PeftlabError(f"pooling={pooling!r} is not supported; choose one of {list(POOLINGS)}")
    if pooling == "mean":
        apply_mean_pooling(model)
    if batchnorm not in BATCHNORM_POLICIES:
        raise PeftlabError(f"batchnorm={batchnorm!r} is not supported; choose one of {list(BATCHNORM_POLICIES)}")
    record = strategy_record(name, dataclasses.asdict(built))
    if heads_apart and not record.heads_apart:
        raise PeftlabError(f"strategy {name!r} keeps the task head inside its adapter, so it cannot give each task "
                           f"its own head; use lora, ia3, adapter, bitfit or head")
    adapted = record.fn(model, built, [] if heads_apart else heads)
    if heads_apart:
        for param_name, param in adapted.named_parameters():
            if is_in_modules(record.base_name(param_name) or "", heads):
                param.requires_grad_(True)
    freeze_norm_statistics(adapted, batchnorm)
    # What save/load need to rebuild the same model on a fresh base, and the way to its record.
    adapted.peftlab_strategy = AppliedStrategy(name, dataclasses.asdict(built), heads, pooling)
    return adapted


def parameter_groups(model: nn.Module) -> ParameterGroups:
    """The trainable parameters of an adapted model by group, bottom to top (see `peftlab.strategies.groups`)."""
    return applied_strategy(model).record.parameter_groups(model)


def after_step_hook(model: nn.Module) -> Callable[[int], None]:
    """`hook(step)` for the training loop to call after each optimizer step: the model's strategy's
    `after_optimizer_step` bound to `model`, or a no-op (also for models peftlab did not adapt)."""
    applied = getattr(model, "peftlab_strategy", None)
    hook = applied.record.after_optimizer_step if isinstance(applied, AppliedStrategy) else None
    if hook is None:
        return lambda step: None
    return lambda step: hook(model, step)


def before_training(model: nn.Module, start: TrainingStart) -> None:
    """Run the model's strategy's `before_training` hook, if it has one (also a no-op for models peftlab did not
    adapt); the training loop calls it before the optimizer takes the trainable parameters."""
    applied = getattr(model, "peftlab_strategy", None)
    hook = applied.record.before_training if isinstance(applied, AppliedStrategy) else None
    if hook is not None:
        hook(model, start)


def set_trainable(model: nn.Module, predicate: Callable[[str, nn.Parameter], bool]) -> None:
    """Freeze every parameter, then unfreeze those for which `predicate(name, param)` holds."""
    for param_name, param in model.named_parameters():
        param.requires_grad_(bool(predicate(param_name, param)))


BATCHNORM_POLICIES = ("auto", "train", "frozen")


def freeze_norm_statistics(model: nn.Module, batchnorm: str = "auto") -> None:
    """Keep batch norms in eval mode during training, so their running statistics never move: the frozen ones
    always (training a frozen backbone must not change it), and with `batchnorm="frozen"` every one, also those
    whose weights train (they then normalise with the pretrained statistics, whatever the batch size). `auto` is
    `frozen`: on EfficientNet-Lite0 over Animal-MNIST it lifted full fine-tuning from 67 to 88% validation accuracy
    and BitFit from 50 to 88% (benchmarks/results/vision_lite0_fixes): re-estimated from small batches of images
    unlike ImageNet's, the statistics no longer match what the pretrained weights expect.

    Raises a one-line PeftlabError for an explicit `batchnorm="frozen"` on a model without batch norms (a silent
    no-op otherwise).
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if batchnorm == "frozen" and not norms:
        raise PeftlabError("model.batchnorm=frozen, but the model has no batch norms (batch norms are a CNN's); "
                           "leave model.batchnorm at auto")
    for module in norms:
        if batchnorm in ("frozen", "auto") or not any(p.requires_grad for p in module.parameters()):
            module.register_forward_pre_hook(_use_running_statistics)


def _use_running_statistics(module: nn.Module, args) -> None:
    module.training = False


def is_quantized(model: nn.Module) -> bool:
    """Whether the model's weights were loaded in 8-bit or 4-bit through bitsandbytes."""
    return bool(getattr(model, "is_quantized", False) or getattr(model, "is_loaded_in_8bit", False)
                or getattr(model, "is_loaded_in_4bit", False))


# Importing the modules registers the built-in strategies.
from peftlab.strategies import adapter, freezing, lora, peft_methods  # noqa: E402,F401
