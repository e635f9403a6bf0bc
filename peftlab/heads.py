"""Find a model's task head and its repeated blocks explicitly, so strategies never guess."""

from __future__ import annotations

from typing import Optional, Sequence

from torch import nn

from peftlab.errors import PeftlabError

# Direct children of a task model that form the newly initialised task head, by the names
# transformers and common vision code use: BERT/ELECTRA/ViT/ConvNeXt/ResNet `classifier`
# (RoBERTa's `classifier` is its dense + out_proj head), DistilBERT `pre_classifier` + `classifier`,
# decoders `score`, timm `head`/`fc`, EfficientNet-PyTorch `_fc`.
KNOWN_HEAD_NAMES = ("pre_classifier", "classifier", "score", "head", "fc", "_fc")


def find_head(model: nn.Module, head_modules: Optional[Sequence[str]] = None) -> list[str]:
    """Names of the task-head modules: the override, a plain backbone's declared head, or known names.

    Args:
        head_modules: explicit module names (e.g. `["classifier"]`), checked to exist.
    """
    names = dict(model.named_modules())
    if head_modules is None:
        head_modules = getattr(model, "peftlab_head_modules", None)
    if head_modules is not None:
        missing = [h for h in head_modules if h not in names]
        if missing:
            raise PeftlabError(
                f"head module(s) {missing} not found in {type(model).__name__}; "
                f"top-level modules are {[n for n, _ in model.named_children()]}"
            )
        return list(head_modules)
    found = [name for name, _ in model.named_children() if name in KNOWN_HEAD_NAMES]
    if not found:
        raise PeftlabError(
            f"cannot find the task head of {type(model).__name__} (looked for {list(KNOWN_HEAD_NAMES)}); "
            f"set model.head_modules to its head, one of {[n for n, _ in model.named_children()]}"
        )
    return found


def is_in_modules(param_name: str, module_names: Sequence[str]) -> bool:
    """Whether a parameter name lies inside one of the named modules."""
    return any(param_name == m or param_name.startswith(m + ".") for m in module_names)


def find_blocks(model: nn.Module, head_modules: Sequence[str] = ()) -> tuple[str, nn.ModuleList]:
    """The model's stack of repeated blocks: the ModuleList holding the most parameters outside the head."""
    found = find_blocks_if_any(model, head_modules)
    if found is None:
        raise PeftlabError(
            f"cannot find a stack of repeated blocks (an nn.ModuleList) in {type(model).__name__}; "
            "strategies `partial` and `adapter` need one"
        )
    return found


def find_blocks_if_any(model: nn.Module, head_modules: Sequence[str] = ()) -> Optional[tuple[str, nn.ModuleList]]:
    """`find_blocks`, or None for a model without a stack of repeated blocks."""
    best: tuple[int, str, Optional[nn.ModuleList]] = (0, "", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and not is_in_modules(name, head_modules):
            size = sum(p.numel() for p in module.parameters())
            if size > best[0]:
                best = (size, name, module)
    return None if best[2] is None else (best[1], best[2])


def names_above_blocks(names: Sequence[str], blocks_name: str) -> set[str]:
    """Of parameter names in registration order, those after the block stack's (pooler, final norm, conv head):
    they sit above the blocks in the forward pass."""
    last = max(i for i, n in enumerate(names) if is_in_modules(n, [blocks_name]))
    return set(names[last + 1:])
