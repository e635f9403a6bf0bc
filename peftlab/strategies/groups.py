"""A strategy's trainable parameters by group, for per-group optimizer settings (layer-wise learning rates, LoRA+).

Groups are disjoint, cover exactly the trainable parameters, leave out empty groups, and run bottom to top:

    <method-specific groups>, below_blocks, blocks.0, ..., blocks.<N-1>, above_blocks, head

`below_blocks` holds what trains before the block stack (embeddings, a CNN stem), `above_blocks` what trains after it
(final norm, pooler, conv head); a model without a block stack has `body` instead of all three. Method-specific groups
(LoRA's `lora_A` and `lora_B`) take their parameters first, wherever those sit.
"""

from __future__ import annotations

from typing import Callable, Mapping

from torch import nn

from peftlab.heads import find_blocks_if_any, is_in_modules, names_above_blocks

ParameterGroups = dict[str, list[nn.Parameter]]


def group_parameters(model: nn.Module, special: Mapping[str, Callable[[str], bool]] = {}) -> ParameterGroups:
    """The trainable parameters of a model adapted by `apply_strategy`, grouped as the module docstring says.

    Args:
        special: method-specific groups, in order: group name -> predicate on the adapted model's parameter name.
    """
    applied = model.peftlab_strategy
    base_name, heads = applied.record.base_name, applied.head_modules
    names = [n for n, _ in model.named_parameters()]
    found = find_blocks_if_any(model, heads)
    blocks_name, blocks = found if found else ("", [])
    above = names_above_blocks(names, blocks_name) if found else set()
    order = [*special, "below_blocks", *(f"blocks.{i}" for i in range(len(blocks))), "above_blocks", "body", "head"]
    groups: ParameterGroups = {group: [] for group in order}

    def group_of(name: str) -> str:
        method_group = next((group for group, matches in special.items() if matches(name)), None)
        if method_group is not None:
            return method_group
        if is_in_modules(base_name(name) or name, heads):
            return "head"
        if not found:
            return "body"
        if is_in_modules(name, [blocks_name]):
            return "blocks." + name[len(blocks_name) + 1:].split(".", 1)[0]
        return "above_blocks" if name in above else "below_blocks"

    for name, param in model.named_parameters():
        if param.requires_grad:
            groups[group_of(name)].append(param)
    return {group: params for group, params in groups.items() if params}
