"""LoRA (Hu et al. 2021) through peft, with target modules found for common architectures."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import nn

from peftlab.errors import PeftlabError
from peftlab.heads import is_in_modules
from peftlab.strategies import Merge, SaveFormat, register_strategy
from peftlab.strategies.groups import ParameterGroups, group_parameters
from peftlab.strategies.registry import peft_base_name

# Query/value projections per naming scheme, tried in order: BERT/RoBERTa/ELECTRA, DistilBERT,
# transformers-5 ViT and decoder models, fused-qkv models, GPT-2; then ConvNeXt's pointwise layers.
# The LoRA paper (Sec. 7.1) finds W_q and W_v the best pair for a fixed budget.
TARGET_CANDIDATES = (("query", "value"), ("q_lin", "v_lin"), ("q_proj", "v_proj"), ("qkv",), ("c_attn",),
                     ("pwconv1", "pwconv2"))


@dataclass
class LoraOptions:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.1
    target_modules: Optional[list[str]] = None
    """Module name suffixes to adapt; found automatically when unset (query/value, or a CNN's 1x1 convolutions)."""
    use_dora: bool = False
    use_rslora: bool = False

    def validate(self):
        if self.r < 1:
            raise PeftlabError(f"strategy 'lora' option r={self.r} must be >= 1")
        if not 0 <= self.dropout < 1:
            raise PeftlabError(f"strategy 'lora' option dropout={self.dropout} must be in [0, 1)")


def _suffix_matches(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def find_lora_targets(model: nn.Module, head_modules: list[str]) -> list[str]:
    """Default LoRA targets: the first query/value naming scheme present, else the 1x1 convolutions of a CNN."""
    body = [(n, m) for n, m in model.named_modules() if n and not is_in_modules(n, head_modules)]
    linear_names = [n for n, m in body if isinstance(m, nn.Linear)]
    for suffixes in TARGET_CANDIDATES:
        if all(any(_suffix_matches(n, s) for n in linear_names) for s in suffixes):
            return list(suffixes)
    pointwise = [n for n, m in body if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1]
    if pointwise:
        return pointwise
    raise PeftlabError(
        f"cannot find LoRA target modules in {type(model).__name__}; set strategy_options.lora.target_modules"
    )


def check_targets(model: nn.Module, targets: list[str]) -> None:
    """A target that matches no module is an error, not a silent no-op."""
    names = [n for n, _ in model.named_modules()]
    missing = [t for t in targets if not any(_suffix_matches(n, t) for n in names)]
    if missing:
        layers = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))})
        raise PeftlabError(
            f"LoRA target_modules {missing} match no module of {type(model).__name__}; "
            f"its linear/conv layers are named {layers[:16]}"
        )


def lora_parameter_groups(model: nn.Module) -> ParameterGroups:
    """`lora_A` and `lora_B` apart (LoRA+, Hayou et al. 2024, gives B a larger learning rate), then the usual groups."""
    return group_parameters(model, {"lora_A": lambda name: ".lora_A." in name,
                                    "lora_B": lambda name: ".lora_B." in name})


@register_strategy("lora", LoraOptions, save_format=SaveFormat.PEFT_ADAPTER, merge=Merge.FOLD, base_name=peft_base_name,
                   parameter_groups=lora_parameter_groups)
def lora(model: nn.Module, options: LoraOptions, head_modules: list[str]) -> nn.Module:
    """Low-rank updates W + (alpha/r)·B·A on the target modules (B zero-initialised); the head trains in full."""
    from peft import LoraConfig, get_peft_model

    targets = options.target_modules or find_lora_targets(model, head_modules)
    check_targets(model, targets)
    config = LoraConfig(
        r=options.r,
        lora_alpha=options.alpha,
        lora_dropout=options.dropout,
        target_modules=targets,
        modules_to_save=head_modules,  # the new head trains fully and is saved with the adapter
        use_dora=options.use_dora,
        use_rslora=options.use_rslora,
    )
    return get_peft_model(model, config)
