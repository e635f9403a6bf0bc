"""Count parameters the way papers report them: trainable, total, and trainable without the task head."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

from torch import nn

from peftlab.heads import find_head, is_in_modules
from peftlab.strategies import AppliedStrategy
from peftlab.strategies.registry import peft_base_name, same_name


@dataclass(frozen=True)
class ParameterCount:
    trainable: int
    total: int
    head: int
    """Parameters of the task head (all trainable except under a frozen-head setup)."""
    trainable_without_head: int
    """The LoRA paper's rule (Hu et al. 2021, Table 2): the task classifier is not counted."""

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable / self.total

    def as_record(self) -> dict:
        """The counts as metrics.json stores them, with the rule they follow."""
        return {"trainable": self.trainable, "total": self.total, "head": self.head,
                "trainable_without_head": self.trainable_without_head,
                "trainable_percent": round(self.trainable_percent, 4),
                "rule": "trainable includes the task head; trainable_without_head is the LoRA paper's rule"}

    def __str__(self) -> str:
        return (
            f"trainable {self.trainable:,} of {self.total:,} ({self.trainable_percent:.3f}%, head included); "
            f"{self.trainable_without_head:,} without the {self.head:,}-parameter head"
        )


def parameter_numel(param: nn.Parameter) -> int:
    """Logical number of values in a parameter, also for bitsandbytes 4-bit weights (two values per byte)."""
    quant_state = getattr(param, "quant_state", None)
    if quant_state is not None and getattr(quant_state, "shape", None) is not None:
        return math.prod(quant_state.shape)
    return param.numel()


def count_parameters(model: nn.Module, head_modules: Optional[Sequence[str]] = None) -> ParameterCount:
    """Trainable and total parameters, and the trainable count without the task head.

    The total is the base model's size: a frozen duplicate the strategy keeps (peft's `original_module` copy of a
    head it trains) is not counted twice. Where the head sits is the strategy record's `base_name`.
    """
    applied = getattr(model, "peftlab_strategy", None)
    if isinstance(applied, AppliedStrategy):
        base_name = applied.record.base_name
    else:  # a model peftlab did not adapt: a peft model made by `get_peft_model` (e.g. the Trainer baseline), or plain
        base_name = peft_base_name if type(model).__module__.startswith("peft.") else same_name
    if head_modules is None:
        head_modules = applied.head_modules if isinstance(applied, AppliedStrategy) else find_head(model)
    trainable = total = head = trainable_head = 0
    for name, param in model.named_parameters():
        name = base_name(name)
        if name is None:
            continue
        n = parameter_numel(param)
        total += n
        in_head = is_in_modules(name, head_modules)
        head += n if in_head else 0
        if param.requires_grad:
            trainable += n
            trainable_head += n if in_head else 0
    return ParameterCount(trainable, total, head, trainable - trainable_head)
