"""LoRA (Hu et al. 2021) through peft, with target modules found for common architectures and peft's initialisations.

`init` (`strategy_options.lora.init`) picks how A and B start (peft's `init_lora_weights`):
- `default` (B = 0, A Kaiming-uniform), `gaussian` (A Gaussian scaled by the rank), `orthogonal` (A and B orthogonal,
  so the output changes at initialisation; even ranks only): nothing else changes.
- `pissa` / `pissa_niter_<N>` (Meng et al. 2024: B·A the top-r singular part of W, by full or N-iteration randomized
  SVD) and `olora` (Büyükakyüz 2024: from W's QR decomposition) move that part out of the frozen weight, W_res =
  W - s·B0·A0, so the model computes the same function at initialisation. A saved adapter must load onto the original
  base, so `save_trained` writes the equivalent LoRA of twice the rank, s·(B·A - B0·A0) = s·[B, -B0]·[A; A0] (peft's
  own conversion, which drops the trained head), and merging folds into W_res exactly as usual.
- `eva` (Paschalidou et al. 2024, Explained Variance Adaptation): A from the singular vectors of each target layer's
  inputs over the training data, ranks redistributed by explained variance (peft's rho = 2: at most 2r per layer,
  the total rank kept); the data pass runs before training (`StrategyRecord.before_training`), in eval mode, over the
  training set in order (token padding masked out). Counts printed before training are those before redistribution;
  equal where all target layers have one shape (query/value).
Refused with why: `REFUSED_INITS`.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader

from peftlab.errors import PeftlabError
from peftlab.heads import is_in_modules
from peftlab.strategies import Merge, SaveFormat, TrainingStart, register_strategy
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
    init: str = "default"
    """How A and B start: default, gaussian, orthogonal, pissa, pissa_niter_<N>, olora or eva (see the module
    docstring; pissa and olora move part of the frozen weights into the adapter, eva reads the training data)."""

    def validate(self):
        if self.r < 1:
            raise PeftlabError(f"strategy 'lora' option r={self.r} must be >= 1")
        if not 0 <= self.dropout < 1:
            raise PeftlabError(f"strategy 'lora' option dropout={self.dropout} must be in [0, 1)")
        check_init(self.init, self.use_dora, "strategy 'lora'")
        if self.init == "orthogonal" and self.r % 2:
            raise PeftlabError(f"strategy 'lora' option init=orthogonal needs an even r, got r={self.r}")


INITS = ("default", "gaussian", "orthogonal", "pissa", "olora", "eva")
"""The initialisations by name; `pissa_niter_<N>` (N subspace iterations) too."""
REFUSED_INITS = {
    "corda": "CorDA needs a covariance pass with its own preprocessing before the adapter exists, which peftlab's "
             "before-training hook comes too late for",
    "loftq": "LoftQ initialises against quantized weights of its own making; use model.quantization with init=default",
    "lora_ga": "LoRA-GA needs gradients estimated before the adapter exists (peft's preprocess_loraga)",
    "mica": "MiCA freezes B, which peftlab's LoRA groups (LoRA+) and counts do not expect yet",
}


def _mutates_base(init: str) -> bool:
    """Whether the initialisation moves part of the frozen weights into the adapter (W_res = W - s·B0·A0)."""
    return init == "olora" or init.startswith("pissa")


def check_init(init: str, use_dora: bool, where: str) -> None:
    """A one-line error for an initialisation peftlab cannot run, naming the choices or why."""
    if init in REFUSED_INITS:
        raise PeftlabError(f"{where}: LoRA init {init!r} is not supported: {REFUSED_INITS[init]}")
    if init not in INITS and not re.fullmatch(r"pissa_niter_\d+", init):
        raise PeftlabError(f"{where}: unknown LoRA init {init!r}; choose one of {', '.join(INITS)}, "
                           f"pissa_niter_<N>")
    if use_dora and _mutates_base(init):
        raise PeftlabError(f"{where}: LoRA init {init!r} with DoRA cannot be saved as an adapter of the original "
                           "base (DoRA's norm is not linear in the update); drop use_dora or use another init")


def peft_init(init: str) -> Any:
    """peft's `init_lora_weights` value for `LoraOptions.init`."""
    return True if init == "default" else init


def complete_lora_config(kwargs: dict[str, Any]) -> None:
    """EVA's settings for classification, where the config leaves them unset: the labels are one per example, not one
    per token, so they cannot mask tokens (peft's default `use_label_mask` would try)."""
    from peft import EvaConfig

    if kwargs.get("init_lora_weights") == "eva" and kwargs.get("eva_config") is None:
        kwargs["eva_config"] = EvaConfig(use_label_mask=False)


def lora_init_record(init: str) -> dict[str, Any]:
    """The record fields an initialisation adds: EVA's data pass before training, PiSSA/OLoRA's saving."""
    if init == "eva":
        return {"before_training": eva_initialise}
    if _mutates_base(init):
        return {"save_adapter": save_for_original_base}
    return {}


INITIAL_ADAPTER = "peftlab_initial_adapter"
"""The model attribute holding a base-mutating initialisation's A0 and B0, by peft's state-dict names."""


def after_lora_init(model: nn.Module, init: str) -> None:
    """Keep A0 and B0 of an initialisation that moved part of W into the adapter, for `save_for_original_base`."""
    if _mutates_base(init):
        from peft.utils import get_peft_model_state_dict

        state = get_peft_model_state_dict(model)
        setattr(model, INITIAL_ADAPTER, {key: tensor.detach().clone() for key, tensor in state.items()
                                         if ".lora_A." in key or ".lora_B." in key})


def save_for_original_base(model: nn.Module, output_dir: Path) -> None:
    """Save a PiSSA/OLoRA model as the LoRA of twice the rank that gives its function on the original base:
    W_res + s·B·A = W + s·(B·A - B0·A0) = W + s·[B, -B0]·[A; A0], with the scale s kept (alpha doubles with r; under
    rsLoRA, s = alpha / sqrt(r), alpha grows by sqrt(2)). A model loaded from such a folder is a plain LoRA already."""
    initial = getattr(model, INITIAL_ADAPTER, None)
    if initial is None:
        model.save_pretrained(output_dir)
        return
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    state = get_peft_model_state_dict(model)
    for key, start in initial.items():
        if ".lora_A." in key:
            state[key] = torch.cat([state[key], start.to(state[key])], dim=0)  # [A; A0]: (2r, in)
        else:
            state[key] = torch.cat([state[key], -start.to(state[key])], dim=1)  # [B, -B0]: (out, 2r)
    config = copy.deepcopy(model.peft_config[model.active_adapter])
    config.init_lora_weights = True
    config.r *= 2
    config.lora_alpha *= 2 ** 0.5 if config.use_rslora else 2
    config.rank_pattern = {key: 2 * rank for key, rank in (config.rank_pattern or {}).items()}
    config.alpha_pattern = {key: 2 * alpha for key, alpha in (config.alpha_pattern or {}).items()}
    output_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(output_dir))
    save_file({key: tensor.contiguous() for key, tensor in state.items()}, output_dir / "adapter_model.safetensors",
              metadata={"format": "pt"})


def eva_initialise(model: nn.Module, start: TrainingStart) -> None:
    """EVA's data-driven initialisation (peft's `initialize_lora_eva_weights`), in eval mode (no dropout) over the
    training set in order: a pass of its own, so that the training batches' random order is not drawn from."""
    from peft import initialize_lora_eva_weights

    loader = start.train_loader

    def collate(examples):  # peft wants a dict, and transformers' collators give a BatchEncoding (a UserDict)
        return dict(loader.collate_fn(examples))

    in_order = DataLoader(loader.dataset, batch_size=loader.batch_size or 32, collate_fn=collate)
    was_training = model.training
    model.eval()
    try:
        # Every process reads the whole training set, so the processes need not exchange their layers' inputs.
        initialize_lora_eva_weights(model, in_order, show_progress_bar=False, gather_distributed_inputs=False)
    finally:
        model.train(was_training)


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
            f"target_modules {missing} match no module of {type(model).__name__}; "
            f"its linear/conv layers are named {layers[:16]}"
        )


def lora_parameter_groups(model: nn.Module) -> ParameterGroups:
    """`lora_A` and `lora_B` apart (LoRA+, Hayou et al. 2024, gives B a larger learning rate), then the usual groups."""
    return group_parameters(model, {"lora_A": lambda name: ".lora_A." in name,
                                    "lora_B": lambda name: ".lora_B." in name})


# (Runs saved before `init` existed started as `default`.)
@register_strategy("lora", LoraOptions, save_format=SaveFormat.PEFT_ADAPTER, merge=Merge.FOLD, base_name=peft_base_name,
                   parameter_groups=lora_parameter_groups, per_task_adapters=True,
                   by_options=lambda options: lora_init_record(options.get("init", "default")))
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
        **_init_fields(options.init),
    )
    adapted = get_peft_model(model, config)
    after_lora_init(adapted, options.init)
    return adapted


def _init_fields(init: str) -> dict[str, Any]:
    fields = {"init_lora_weights": peft_init(init)}
    complete_lora_config(fields)
    return fields
