"""What each strategy declares to the rest of peftlab (its `StrategyRecord`), and the registry of those records.

A strategy is a plain function `(model, options, head_modules) -> model` plus a record saying how its models save,
load and merge, whether frozen-feature caching applies, where the base model's parameters (and so the head) sit in
the adapted model, how its trainable parameters group, and what the training loop calls before training and after each
optimizer step. Where those depend on the options (the generic `peft` strategy's method, LoRA's initialisation), the
record's `by_options` says how, and `AppliedStrategy.record` is the record for the options applied. Saving, merging,
counting, caching and the model card read the record; no module outside a strategy's own file compares strategy names.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from torch import nn

from peftlab.errors import PeftlabError
from peftlab.strategies.groups import ParameterGroups, group_parameters


class SaveFormat(enum.Enum):
    """How `peftlab.saving.save_trained` writes an adapted model and `load_trained` reads it back."""

    PEFT_ADAPTER = "peft_adapter"
    """The model is a peft wrapper: peft's `adapter_config.json` + `adapter_model.safetensors`
    (`peft.PeftModel.from_pretrained` loads it)."""
    WHOLE_MODEL = "whole_model"
    """The whole model through its own `save_pretrained` (its `from_pretrained` loads it); a model without
    `save_pretrained` is saved as TRAINED_TENSORS."""
    TRAINED_TENSORS = "trained_tensors"
    """Only the trained tensors, in `peftlab_trainable.safetensors`, loaded onto a fresh base adapted the same way."""


class Merge(enum.Enum):
    """What `peftlab.saving.merge` does with an adapted model."""

    FOLD = "fold"
    """peft's `merge_and_unload` folds the update into the base weights exactly (LoRA: W' = W + (alpha/r)·B·A)."""
    PLAIN = "plain"
    """Nothing to fold: the model already is a plain model of the base architecture (only what trains changed)."""
    NOT_FOLDABLE = "not_foldable"
    """Refused with one line giving the record's `cannot_merge_because`."""


def same_name(name: str) -> Optional[str]:
    """`StrategyRecord.base_name` of strategies that leave the model's structure (and parameter names) as it was."""
    return name


# peft wraps the base model as `base_model.model`, and a saved head as `<head>.modules_to_save.default` beside its
# frozen original `<head>.original_module`.
_PEFT_PREFIX = "base_model.model."


def peft_base_name(name: str) -> Optional[str]:
    """`StrategyRecord.base_name` of strategies that wrap the model with peft (`get_peft_model`, `modules_to_save`)."""
    if ".original_module." in name:
        return None  # the frozen copy of a head that peft trains as `modules_to_save`: the head is counted once
    return name.removeprefix(_PEFT_PREFIX).replace(".modules_to_save.default.", ".")


@dataclass(frozen=True)
class TrainingStart:
    """What a strategy's `before_training` hook learns about the run that is about to train."""

    total_steps: int
    """Optimizer steps the schedule runs (AdaLoRA's `total_step`)."""
    train_loader: Any
    """The training DataLoader as the recipe built it (not prepared by accelerate). A hook that reads the data (EVA)
    builds its own pass from `train_loader.dataset` and `.collate_fn`: iterating this loader would draw from the
    random state that orders the training batches."""


@dataclass(frozen=True)
class StrategyRecord:
    """One registered strategy: its function, its options, and what the rest of peftlab needs to know about it."""

    name: str
    fn: Callable[[nn.Module, Any, list[str]], nn.Module]
    """`(model, options, head_modules) -> adapted model`: freezes, wraps or injects; never trains, logs or saves."""
    options_cls: type
    """The options dataclass; its fields are checked like config keys, and a `validate()` method runs after."""
    save_format: SaveFormat = SaveFormat.TRAINED_TENSORS
    merge: Merge = Merge.PLAIN
    cannot_merge_because: str = ""
    """Why merging is refused (required with Merge.NOT_FOLDABLE), and what to do instead."""
    per_task_adapters: bool = False
    """A peft tuner that holds several named adapters and that peft routes per example in a mixed batch
    (`adapter_names=`; LoRA in peft 0.21): multi-task `separate` mode trains one such adapter per task."""
    heads_apart: bool = True
    """The strategy can leave the heads out of what it wraps (`apply_strategy(heads_apart=True)`: a multi-task run's
    head per task); False for peft's prompt learning, whose sequence-classification forward keeps the head inside the
    adapter."""
    caches_frozen_features: bool = False
    """Everything below the head is frozen, so `peftlab.caching` may run it once and train on its outputs."""
    base_name: Callable[[str], Optional[str]] = same_name
    """Where the base model's parameters, the head's included, sit in the adapted model: an adapted parameter's name
    as the base model names it, or None for a frozen duplicate that is not counted."""
    parameter_groups: Callable[[nn.Module], ParameterGroups] = group_parameters
    """`model -> {group: trainable parameters}`: disjoint groups covering exactly the trainable parameters, bottom to
    top (see `peftlab.strategies.groups`); method-specific groups (LoRA's A and B) come first."""
    after_optimizer_step: Optional[Callable[[nn.Module, int], None]] = None
    """Called by the training loop as `hook(model, step)` right after each optimizer step, before the gradients are
    zeroed; `step` counts from 0 (e.g. peft AdaLoRA's `model.base_model.update_and_allocate(step)`)."""
    before_training: Optional[Callable[[nn.Module, TrainingStart], None]] = None
    """Called by the training loop as `hook(model, start)` once the schedule's length is known and before the
    optimizer takes the trainable parameters, which the hook may still reshape (AdaLoRA's schedule, EVA's
    data-driven initialisation). A resumed run calls it again, before the checkpoint's weights are loaded."""
    prepare_base: Optional[Callable[[nn.Module], None]] = None
    """What the strategy changes on the base model itself besides wrapping it, redone by `load_trained` on a fresh
    base before peft loads the adapter. Its docstring's first line says why, for the model card (which cannot
    give loading lines for transformers and peft alone then)."""
    save_adapter: Optional[Callable[[nn.Module, Path], None]] = None
    """PEFT_ADAPTER only: writes peft's files into the folder in place of `model.save_pretrained(folder)` (LoRA
    initialisations that rewrite the base weights save the equivalent LoRA for the original base)."""
    by_options: Optional[Callable[[dict[str, Any]], dict[str, Any]]] = None
    """Fields of this record that depend on the options: `options -> {field: value}` (the options as plain data, as
    `AppliedStrategy.options` holds them). The generic `peft` strategy's merge, hooks and names follow its method."""

    def __post_init__(self):
        if (self.merge is Merge.NOT_FOLDABLE) != bool(self.cannot_merge_because):
            raise ValueError(f"strategy {self.name!r}: give cannot_merge_because exactly when merge=Merge.NOT_FOLDABLE")


_REGISTRY: dict[str, StrategyRecord] = {}


def register_strategy(name: str, options_cls: type, **record_fields: Any):
    """Decorator adding a strategy function under `name`, with its options dataclass and its record.

    Args:
        record_fields: `StrategyRecord` fields after `options_cls` (`save_format`, `merge`, `cannot_merge_because`,
            `per_task_adapters`, `heads_apart`, `caches_frozen_features`, `base_name`, `parameter_groups`, `after_optimizer_step`, `before_training`,
            `prepare_base`, `save_adapter`, `by_options`); the defaults fit a strategy that only chooses what trains.
    """

    def decorator(fn):
        if name in _REGISTRY:
            raise ValueError(f"strategy {name!r} is already registered")
        _REGISTRY[name] = StrategyRecord(name, fn, options_cls, **record_fields)
        return fn

    return decorator


def unregister_strategy(name: str) -> None:
    """Remove strategy `name` from the registry (tests and notebooks that register their own)."""
    del _REGISTRY[name]


def list_strategies() -> list[str]:
    """Names of all registered strategies."""
    return sorted(_REGISTRY)


def get_strategy(name: str) -> StrategyRecord:
    """The record of the strategy called `name`, or a one-line error listing the choices."""
    if name not in _REGISTRY:
        raise PeftlabError(f"unknown strategy {name!r}; choose one of {list_strategies()}")
    return _REGISTRY[name]


def strategy_record(name: str, options: dict[str, Any]) -> StrategyRecord:
    """The record of strategy `name` applied with `options` (plain data): its `by_options` fields filled in."""
    record = get_strategy(name)
    if record.by_options is None:
        return record
    return dataclasses.replace(record, **record.by_options(options))


@dataclass(frozen=True)
class AppliedStrategy:
    """What `apply_strategy` did to a model, attached as `model.peftlab_strategy`: enough to redo it on a fresh base.

    Saved as `peftlab_strategy.json` with these four keys (the format of folders written before this class existed).
    """

    name: str
    options: dict[str, Any]
    """The strategy's options as plain data (`dataclasses.asdict` of its options dataclass)."""
    head_modules: list[str]
    """The task head's module names in the base model."""
    pooling: str = "cls"

    @property
    def record(self) -> StrategyRecord:
        """The strategy's record for these options (see `StrategyRecord.by_options`)."""
        return strategy_record(self.name, self.options)

    def to_json(self) -> dict[str, Any]:
        """The `peftlab_strategy.json` content."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "AppliedStrategy":
        """Read `peftlab_strategy.json` content; folders saved before `pooling` existed pooled as `cls`."""
        return cls(data["name"], data.get("options", {}), list(data["head_modules"]), data.get("pooling", "cls"))


def applied_strategy(model: nn.Module) -> AppliedStrategy:
    """The strategy `apply_strategy` attached to `model`, or a one-line error when there is none."""
    applied = getattr(model, "peftlab_strategy", None)
    if not isinstance(applied, AppliedStrategy):
        raise PeftlabError(f"this {type(model).__name__} was not adapted with peftlab.apply_strategy, "
                           "so it has no strategy record")
    return applied
