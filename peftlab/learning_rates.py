"""Learning rates per parameter group: the head's own rate, layer-wise decay and LoRA+ (`train.head_lr`,
`train.layer_decay`, `train.loraplus_ratio`).

The groups are the strategy record's (`peftlab.strategies.parameter_groups`, bottom to top); each gets one peak rate
here, `peftlab.training.build_optimizer` turns them into optimizer groups, and the scheduler scales every group's own
rate, so warmup and decay keep the ratios between groups.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from peftlab.errors import PeftlabError
from peftlab.heads import find_blocks_if_any
from peftlab.strategies import AppliedStrategy, parameter_groups

# The group of a model `apply_strategy` did not adapt (a training loop used on its own): one rate for all.
UNGROUPED = "trainable"


@dataclass
class RateGroup:
    """One parameter group of the strategy with its peak learning rate."""

    name: str
    params: list[nn.Parameter]
    lr: float


def rate_groups(model: nn.Module, train_cfg) -> list[RateGroup]:
    """The trainable parameters by strategy group, bottom to top, each with its peak learning rate.

    Raises a one-line PeftlabError when nothing trains, or when a rate option cannot apply to the model's groups
    (LoRA+ without LoRA's B matrices, layer decay without trained blocks, a head rate without a trained head).
    """
    applied = getattr(model, "peftlab_strategy", None)
    if isinstance(applied, AppliedStrategy):
        groups, whose = parameter_groups(model), f"strategy {applied.name!r}"
    else:
        trainable = [p for p in model.parameters() if p.requires_grad]
        groups, whose = ({UNGROUPED: trainable} if trainable else {}), "a model not adapted by apply_strategy"
    if not groups:
        raise PeftlabError("the model has no trainable parameters; check the strategy and its options")
    _check_applicable(train_cfg, list(groups), whose)
    depth = _block_count(model, applied) if train_cfg.layer_decay != 1 else 0
    return [RateGroup(name, params, _rate(name, train_cfg, depth)) for name, params in groups.items()]


def _rate(group: str, train_cfg, depth: int) -> float:
    lr, decay = train_cfg.lr, train_cfg.layer_decay
    if group == "head":
        return train_cfg.head_lr if train_cfg.head_lr is not None else lr
    if group == "lora_B":
        return lr * train_cfg.loraplus_ratio  # LoRA+ (Hayou et al. 2024): lambda = eta_B / eta_A
    if group == "below_blocks":
        return lr * decay**depth  # one step below the bottom block
    block = re.fullmatch(r"blocks\.(\d+)", group)
    if block:
        return lr * decay ** (depth - 1 - int(block.group(1)))  # e.g. 12 blocks, decay 0.8: block 0 at lr x 0.8^11
    return lr


def _check_applicable(train_cfg, groups: list[str], whose: str) -> None:
    listed = f"{whose} trains the groups {', '.join(summarise_names(groups))}"
    if train_cfg.loraplus_ratio != 1 and "lora_B" not in groups:
        raise PeftlabError(f"train.loraplus_ratio={train_cfg.loraplus_ratio:g} sets the rate of LoRA's B matrices, "
                           f"but {listed}; use strategy=lora or leave train.loraplus_ratio at 1")
    if train_cfg.layer_decay != 1 and not any(g.startswith("blocks.") for g in groups):
        raise PeftlabError(f"train.layer_decay={train_cfg.layer_decay:g} decays the rate of trained blocks downward, "
                           f"but {listed}; use a strategy that trains whole blocks (full, partial, bitfit) or leave "
                           "train.layer_decay at 1")
    if train_cfg.head_lr is not None and "head" not in groups:
        raise PeftlabError(f"train.head_lr={train_cfg.head_lr:g} sets the rate of the task head, but {listed}; "
                           "set train.head_lr=null")


def _block_count(model: nn.Module, applied: AppliedStrategy) -> int:
    # All of the model's blocks, not only those that train: partial's top block is N-1 however many train.
    found = find_blocks_if_any(model, applied.head_modules)
    return len(found[1])


def describe(groups: list[dict]) -> list[str]:
    """One console line per group (`param_group_summary` rows); consecutive blocks collapse into one range line."""
    rows = _collapse_blocks(groups)
    name_width = max(len(row["name"]) for row in rows)
    count_width = max(len(f"{row['parameters']:,}") for row in rows)
    lines = []
    for row in rows:
        low, high = min(row["lrs"]), max(row["lrs"])
        rate = f"{low:.2e}" if low == high else f"{low:.2e}..{high:.2e}"
        lines.append(f"  {row['name']:<{name_width}}  {row['parameters']:>{count_width},} parameters  lr {rate}")
    return lines


def summarise_names(groups: list[str]) -> list[str]:
    """Group names with consecutive blocks collapsed: `blocks.0`..`blocks.11` -> `blocks.0-11`."""
    return [row["name"] for row in _collapse_blocks([{"name": g, "parameters": 0, "lr": 0.0} for g in groups])]


def _collapse_blocks(groups: list[dict]) -> list[dict]:
    """Rows {"name", "parameters", "lrs"}: one per group, consecutive `blocks.i` groups merged into `blocks.i-j`."""
    rows: list[dict] = []
    for group in groups:
        block = re.fullmatch(r"blocks\.(\d+)", group["name"])
        index = int(block.group(1)) if block else None
        last = rows[-1] if rows else None
        if index is not None and last is not None and last["last_block"] == index - 1:
            first = last["name"].split(".")[1].split("-")[0]
            last.update(name=f"blocks.{first}-{index}", last_block=index,
                        parameters=last["parameters"] + group["parameters"], lrs=last["lrs"] + [group["lr"]])
        else:
            rows.append({"name": group["name"], "parameters": group["parameters"], "lrs": [group["lr"]],
                         "last_block": index})
    return rows


def param_group_summary(optimizer) -> list[dict]:
    """`[{"name", "parameters", "lr"}, ...]` per strategy group, from the optimizer itself (its decay and no-decay
    halves summed); `lr` is the group's peak rate, also after a scheduler or a resumed checkpoint changed `lr`."""
    summary: dict[str, dict] = {}
    for group in optimizer.param_groups:
        row = summary.setdefault(group["name"], {"name": group["name"], "parameters": 0,
                                                 "lr": group.get("initial_lr", group["lr"])})
        row["parameters"] += sum(p.numel() for p in group["params"])
    return list(summary.values())
