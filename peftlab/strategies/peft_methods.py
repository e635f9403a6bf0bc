"""peft's methods beyond LoRA as strategies: any peft tuner by its name (`peft`), the common ones by their own names.

    strategy=peft strategy_options.peft.method=boft strategy_options.peft.config.boft_block_size=4
    strategy=prefix | prompt | ia3 | vera | loha | lokr | adalora        (typed options, defaults for classification)

`peft` takes the method from peft's own registry (`peft.PEFT_TYPE_TO_CONFIG_MAPPING`), so a tuner added to peft works
without code here; its options are the fields of that method's config class, checked by name (with a did-you-mean)
and, where the field's type allows, by type, then by peft's own checks. peftlab sets `task_type` (SEQ_CLS for text
models) and `modules_to_save` (the new head trains in full and is saved with the adapter); target modules default to
peft's choice for the architecture, else to LoRA's query/value projections (or a CNN's 1x1 convolutions).

What a method needs besides a wrapped model comes through its record (`tuner_record`):
- merge: peft's `merge_and_unload` folds the tuners (exact to float rounding); prompt-learning methods (prefix,
  prompt, P-tuning) and tuners peft cannot merge (LiLy) are refused in one line.
- AdaLoRA (Zhang et al. 2023): `update_and_allocate(step)` after every optimizer step, and its `total_step` (with
  `tinit`/`tfinal`) set from the training schedule before training; without them AdaLoRA is LoRA with extra steps.
- prefix tuning (Li & Liang 2021): peft 0.21 passes the prefix as `past_key_values`, which transformers 5 renamed
  `cache`; the base model is made to take both (`accept_past_key_values`), also when a saved run is loaded.
- LoRA's initialisations (EVA's pass over the data, PiSSA/OLoRA's conversion at saving) are `peftlab.strategies.lora`'s,
  also for `method=lora` here.

Prompt-learning methods prepend virtual tokens (prompt, P-tuning: to the input embeddings, so position 0 is a virtual
token and `pooling=mean` averages them in; prefix: as keys and values in every layer, so the hidden states keep their
length and position 0 is still [CLS]). They need token inputs (text models), and the frozen-feature cache never
applies (the backbone's output depends on what trains). Methods refused outright, with why: `REFUSED`.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import inspect
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from torch import nn

from peftlab.errors import PeftlabError
from peftlab.strategies import (Merge, SaveFormat, TrainingStart, applied_strategy, peft_base_name,
                                register_strategy)
from peftlab.strategies.groups import ParameterGroups, group_parameters
from peftlab.strategies.lora import (after_lora_init, check_init, check_targets, complete_lora_config,
                                     find_lora_targets, lora_init_record, lora_parameter_groups)
from peftlab.typed import coerce_value

# Methods that cannot work in peftlab's engine (classifiers trained by one loop on labelled examples), and why.
REFUSED = {
    "cpt": "CPT tunes causal language models on few-shot prompts (peft accepts task_type CAUSAL_LM only), and peftlab "
           "trains classifiers",
    "cartridge": "Cartridges distil a long context into a key-value prefix of a causal language model; there is no "
                 "context to distil in classification",
    "poly": "Polytropon routes every example by its task id, and peftlab's data has no task ids",
    "multitask_prompt_tuning": "multitask prompt tuning picks a prompt by each example's task id, and peftlab's data "
                               "has no task ids",
    "xlora": "X-LoRA gates LoRA adapters trained before; train those as runs and combine them with `peftlab fuse`",
    "shadow": "ShadowPEFT's shadow network rides a decoder-only language model's decoder loop, and its forward fails "
              "on the classifiers peftlab trains",
}

# Tuners peft 0.21 cannot fold into the base weights (its merge raises), and why.
NOT_MERGEABLE = {
    "lily": "peft 0.21 does not implement merging for LiLy",
}

PROMPT_LEARNING_CANNOT_MERGE = ("it prepends virtual tokens (or prefix keys and values) that no base weight can "
                                "absorb; save it with save_trained and load it with load_trained (or peftlab.load), "
                                "or export it to ONNX")

# Fields of peft's config classes that peftlab sets itself, or that describe a saved adapter rather than a method.
RESERVED = {"peft_type", "task_type", "modules_to_save", "base_model_name_or_path", "revision", "inference_mode",
            "auto_mapping", "peft_version"}
# AdaLoRA's schedule length comes from the training loop (`adalora_schedule`), not from the options.
SET_BY_PEFTLAB = {"adalora": {"total_step": "the training schedule's length"}}


# ---------------------------------------------------------------------------------------------------------------------
# peft's registry: the methods, their config classes and what those take.


def peft_methods() -> dict[str, Any]:
    """peft's methods by lower-case name (`lora`, `prefix_tuning`, ...) -> their `PeftType`."""
    from peft import PEFT_TYPE_TO_CONFIG_MAPPING

    return {peft_type.value.lower(): peft_type for peft_type in PEFT_TYPE_TO_CONFIG_MAPPING}


def config_class(method: str) -> type:
    """The peft config class of `method`, or a one-line error with a did-you-mean and the choices."""
    from peft import PEFT_TYPE_TO_CONFIG_MAPPING

    methods = peft_methods()
    key = method.lower()
    if key not in methods:
        close = difflib.get_close_matches(key, list(methods), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise PeftlabError(f"unknown peft method {method!r}{hint} (peft {_peft_version()} has: "
                           f"{', '.join(sorted(methods))})")
    if key in REFUSED:
        raise PeftlabError(f"peft method {key!r} cannot work here: {REFUSED[key]}")
    return PEFT_TYPE_TO_CONFIG_MAPPING[methods[key]]


def is_prompt_learning(method: str) -> bool:
    """Whether `method` prepends virtual tokens (prefix, prompt, P-tuning) rather than changing layers."""
    from peft import PromptLearningConfig

    return issubclass(config_class(method), PromptLearningConfig)


def option_names(method: str) -> list[str]:
    """The options `method` takes: its config class's fields, less those peftlab sets."""
    reserved = RESERVED | set(SET_BY_PEFTLAB.get(method.lower(), {}))
    return sorted(f.name for f in dataclasses.fields(config_class(method)) if f.init and f.name not in reserved)


def check_config(method: str, config: dict[str, Any], where: str) -> dict[str, Any]:
    """`config` for peft method `method` as plain data, every key a field of its config class and every value of a
    type that field takes (where peftlab can check it; peft checks the rest when the config is built).

    Args:
        where: how errors name the options, e.g. "strategy 'peft' method 'vera'".
    """
    cls = config_class(method)
    names = option_names(method)
    hints = _type_hints(cls)
    checked = {}
    for key, value in config.items():
        if key in SET_BY_PEFTLAB.get(method.lower(), {}):
            raise PeftlabError(f"{where}: {key} is set by peftlab from {SET_BY_PEFTLAB[method.lower()][key]}; "
                               f"remove it")
        if key in RESERVED:
            raise PeftlabError(f"{where}: {key} is set by peftlab (the task head trains as modules_to_save); "
                               f"remove it")
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise PeftlabError(f"{where} has no option {key!r}{hint} (its options: {', '.join(names)})")
        checked[key] = _check_value(value, hints.get(key, Any), f"{where} option {key}")
    return checked


def _type_hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # a hint peft writes with names this Python cannot resolve: fields go unchecked by type
        return {}


def _check_value(value: Any, hint: Any, key: str) -> Any:
    plain = coerce_value(value, Any, key)  # `key=value` overrides parsed as YAML
    if _mentions_literal(hint):
        return plain  # peft's Literal hints leave out patterns it accepts (`pissa_niter_4`): peft checks them
    try:
        return coerce_value(plain, hint, key)
    except TypeError:  # a type the config loader does not model (a nested config class, torch.dtype): peft checks
        return plain


def _mentions_literal(hint: Any) -> bool:
    return typing.get_origin(hint) is Literal or any(_mentions_literal(arg) for arg in typing.get_args(hint))


def _peft_version() -> str:
    import peft

    return peft.__version__


# ---------------------------------------------------------------------------------------------------------------------
# Wrapping a model.


def wrap_with_peft(model: nn.Module, method: str, config: dict[str, Any], head_modules: list[str],
                   strategy: str) -> nn.Module:
    """`get_peft_model` with method `method` and its `config` (checked by `check_config`): task type, head and
    target modules filled in as the module docstring says; one-line errors for what cannot work."""
    from peft import get_peft_model

    where = _where(strategy, method)
    method = method.lower()
    cls = config_class(method)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = dict(config)
    text, prompt = _is_text_model(model), is_prompt_learning(method)
    if "modules_to_save" not in fields:
        raise PeftlabError(f"{where} cannot train the new task head: peft's {cls.__name__} has no modules_to_save")
    kwargs["modules_to_save"] = list(head_modules)
    # No head given: the caller keeps the heads apart (multi-task), and SEQ_CLS would make peft copy the classifier
    # into the adapter anyway (its `modules_to_save` default). Prompt learning needs SEQ_CLS's forward, and refuses
    # heads apart (its record's `heads_apart`).
    if text and (head_modules or prompt):
        kwargs["task_type"] = "SEQ_CLS"
    if prompt:
        if not text:
            raise PeftlabError(f"{where} prepends virtual tokens to a text model's token embeddings, and "
                               f"{type(model).__name__} takes pixels; choose a method that adapts layers (lora, ia3, "
                               f"vera, ...)")
        _fill_prompt_sizes(model, cls, kwargs)
        if method == "prefix_tuning":
            accept_past_key_values(model)
    elif isinstance(kwargs.get("target_modules"), list):
        check_targets(model, kwargs["target_modules"])
    if method == "lora":
        complete_lora_config(kwargs)
    if method == "adalora":
        # A placeholder the config's own check accepts; `adalora_schedule` sets the real one before training.
        kwargs["total_step"] = kwargs.get("tinit", 0) + kwargs.get("tfinal", 0) + 1
    try:
        config = cls(**kwargs)
        if "target_modules" in fields and not config.target_modules:
            _fill_targets(model, method, head_modules, config)
        adapted = get_peft_model(model, config)
    except (ValueError, NotImplementedError) as err:  # peft's own checks of the options against the model
        raise PeftlabError(f"{where} cannot adapt {type(model).__name__}: {_first_line(err)}") from err
    if prompt:
        _refuse_inputs_past_positions(adapted, kwargs["num_virtual_tokens"], where)
    return adapted


def _where(strategy: str, method: str) -> str:
    return f"strategy {strategy!r}" + (f" method {method!r}" if strategy == "peft" else "")


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _is_text_model(model: nn.Module) -> bool:
    get_embeddings = getattr(model, "get_input_embeddings", None)
    return isinstance(get_embeddings() if callable(get_embeddings) else None, nn.Embedding)


def _fill_prompt_sizes(model: nn.Module, cls: type, kwargs: dict[str, Any]) -> None:
    """The model sizes a prompt-learning config needs, read as attributes of the model's config: peft reads them
    from its dict, which misses architectures that name them otherwise (DistilBERT's dim, n_layers, n_heads)."""
    model_config = model.config
    sizes = {"token_dim": "hidden_size", "num_layers": "num_hidden_layers",
             "num_attention_heads": "num_attention_heads"}
    for key, attribute in sizes.items():
        if kwargs.get(key) is None and getattr(model_config, attribute, None) is not None:
            kwargs[key] = getattr(model_config, attribute)
    # P-tuning's prompt encoder and prefix tuning's projection: as wide as the model, as peft's examples have them.
    if "encoder_hidden_size" in {f.name for f in dataclasses.fields(cls)} and kwargs.get("encoder_hidden_size") is None:
        kwargs["encoder_hidden_size"] = kwargs.get("token_dim")


def _fill_targets(model: nn.Module, method: str, head_modules: list[str], config) -> None:
    """Target modules where the options set none: peft's default for the architecture (e.g. (IA)3 on BERT: key,
    value and the feed-forward output), else LoRA's (query/value projections, or a CNN's 1x1 convolutions)."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    tuner = PEFT_TYPE_TO_TUNER_MAPPING[peft_methods()[method]]
    model_config = getattr(model, "config", None)
    if model_config is not None:
        # How peft itself fills them in, a static method of some tuners and a method reading only class attributes
        # (the default targets by model type) of the others; it raises where it knows no default.
        prepare = tuner._prepare_adapter_config
        bound = () if isinstance(inspect.getattr_static(tuner, "_prepare_adapter_config"), staticmethod) else (tuner,)
        try:
            if prepare(*bound, copy.deepcopy(config), model_config.to_dict()).target_modules:
                return
        except (ValueError, KeyError):
            pass
    config.target_modules = find_lora_targets(model, head_modules)
    if getattr(config, "feedforward_modules", False) is None:
        config.feedforward_modules = []  # the targets found are attention projections, none feed-forward


def _refuse_inputs_past_positions(model: nn.Module, virtual_tokens: int, where: str) -> None:
    """A one-line error, instead of an index error deep in the embeddings, for inputs that with the virtual tokens
    run past the model's position embeddings."""
    from peftlab.backbones import model_position_limit

    limit = model_position_limit(model.get_base_model())
    if not limit:
        return

    def check(module, args, kwargs):
        tokens = kwargs.get("input_ids", args[0] if args else None)
        if tokens is None:
            tokens = kwargs.get("inputs_embeds")
        if tokens is not None and tokens.shape[1] + virtual_tokens > limit:
            raise PeftlabError(f"{where}: {tokens.shape[1]} tokens + {virtual_tokens} virtual tokens exceed the "
                               f"model's {limit} positions; lower data.max_length (to {limit - virtual_tokens}) or "
                               f"num_virtual_tokens")

    model.register_forward_pre_hook(check, with_kwargs=True)


def accept_past_key_values(model: nn.Module) -> None:
    """Passes peft 0.21's `past_key_values` (prefix tuning's prefix) to transformers 5 as `cache`, which peft alone
    does not: without it peft's prefix tuning raises on every transformers-5 model.

    peft looks for a `past_key_values` argument in the task model's forward; transformers 5 takes the cached keys and
    values as `cache`. The task model's forward is wrapped (on this instance only) to take `past_key_values` and hand
    it on as `cache`. Encoders without a cache (DistilBERT, ViT) cannot take a prefix: refused in one line.
    """
    forward = model.forward
    if "past_key_values" in inspect.signature(forward).parameters:
        return
    encoder = getattr(model, "base_model", model)
    if "cache" not in inspect.signature(encoder.forward).parameters:
        raise PeftlabError(f"prefix tuning adds keys and values through the encoder's cache, and "
                           f"{type(encoder).__name__} takes none; use strategy=prompt (or peft method p_tuning)")

    def forward_with_prefix(*args, past_key_values=None, **kwargs):  # (not functools.wraps: peft reads this signature)
        if past_key_values is not None:
            kwargs["cache"] = past_key_values
        return forward(*args, **kwargs)

    model.forward = forward_with_prefix


# ---------------------------------------------------------------------------------------------------------------------
# What each method declares to the rest of peftlab.


def prompt_base_name(name: str) -> Optional[str]:
    """`StrategyRecord.base_name` of prompt-learning methods: peft keeps the task model as `base_model` itself (no
    `.model`), the head as `modules_to_save` beside its frozen original, and the prompt encoder outside the model."""
    if ".original_module." in name:
        return None
    return name.removeprefix("base_model.").replace(".modules_to_save.default.", ".")


def _is_head_copy(name: str) -> bool:
    return ".modules_to_save." in name


def method_parameter_groups(method: str):
    """`parameter_groups` of a peft method: everything the method added, in one group named after it, then the
    head; LoRA keeps its A and B groups (LoRA+)."""
    if method == "lora":
        return lora_parameter_groups

    def groups(model: nn.Module) -> ParameterGroups:
        return group_parameters(model, {method: lambda name: not _is_head_copy(name)})

    return groups


def tuner_record(method: str, options: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The record fields of peft method `method` (see the module docstring); `options`: its config as plain data,
    for what depends on them (LoRA's initialisation)."""
    method = method.lower()
    prompt = is_prompt_learning(method)
    fields: dict[str, Any] = dict(save_format=SaveFormat.PEFT_ADAPTER,
                                  base_name=prompt_base_name if prompt else peft_base_name,
                                  parameter_groups=method_parameter_groups(method), merge=Merge.FOLD)
    if prompt:
        fields["heads_apart"] = False
    if prompt or method in NOT_MERGEABLE:
        reason = PROMPT_LEARNING_CANNOT_MERGE if prompt else NOT_MERGEABLE[method]
        fields.update(merge=Merge.NOT_FOLDABLE, cannot_merge_because=f"peft method {method!r}: {reason}")
    if method == "prefix_tuning":
        fields["prepare_base"] = accept_past_key_values
    if method == "adalora":
        fields.update(after_optimizer_step=allocate_adalora_ranks, before_training=adalora_schedule,
                      save_adapter=save_adalora)
    if method == "lora":
        fields.update(per_task_adapters=True, **lora_init_record(_lora_init(options or {})))
    return fields


# AdaLoRA: ranks allocated by importance during training, on a schedule that must know the run's length.


def allocate_adalora_ranks(model: nn.Module, step: int) -> None:
    """AdaLoRA's `update_and_allocate(step)`: importance scores from this step's gradients, and the ranks pruned
    to the schedule's budget every `deltaT` steps (the training loop calls it after each optimizer step)."""
    model.base_model.update_and_allocate(step)


def adalora_schedule(model: nn.Module, start: TrainingStart, tinit: Optional[int] = None,
                     tfinal: Optional[int] = None) -> None:
    """Set AdaLoRA's `total_step` to the schedule's optimizer steps (and `tinit`, `tfinal` when given), checking that
    a budgeting phase is left between them."""
    config = model.peft_config[model.active_adapter]
    config.total_step = start.total_steps
    config.tinit = config.tinit if tinit is None else tinit
    config.tfinal = config.tfinal if tfinal is None else tfinal
    if config.tinit >= config.total_step - config.tfinal:
        raise PeftlabError(f"AdaLoRA needs steps between its warm-up ({config.tinit} steps) and its final phase "
                           f"({config.tfinal} steps) to allocate ranks in, and the run has {config.total_step} "
                           f"optimizer steps; shorten those phases or train longer")


def save_adalora(model: nn.Module, output_dir) -> None:
    """Save with the ranks the weights in the model have: peft saves each layer cut to its config's `rank_pattern`,
    the allocation of the last step, while the model may hold an earlier step's weights (the best evaluation's,
    restored after training), pruned less. The ranks kept are then those whose singular value is not zero (pruning
    zeroes them), so the saved adapter computes exactly what the model does."""
    config = model.peft_config[model.active_adapter]
    prefix = "base_model.model."
    config.rank_pattern = {name.removeprefix(prefix): (param != 0).view(-1).tolist()
                           for name, param in model.named_parameters() if ".lora_E." in name}
    model.save_pretrained(output_dir)


def adalora_schedule_from_fractions(model: nn.Module, start: TrainingStart) -> None:
    """`adalora_schedule` with the warm-up and final phases given as shares of the schedule (strategy `adalora`)."""
    options = applied_strategy(model).options
    # e.g. 600 steps, warmup 0.1, final 0.2: full ranks for 60 steps, pruned down until step 480, fixed for the last 120
    adalora_schedule(model, start, tinit=round(options["warmup_fraction"] * start.total_steps),
                     tfinal=round(options["final_fraction"] * start.total_steps))


# ---------------------------------------------------------------------------------------------------------------------
# `peft`: any method by name.


@dataclass
class PeftOptions:
    method: str = ""
    """A peft method by its name in `peft.PeftType`, any case: lora, ia3, vera, loha, lokr, adalora, boft, oft,
    fourierft, ln_tuning, prefix_tuning, prompt_tuning, p_tuning, ... (refused with why: cpt, cartridge, poly,
    multitask_prompt_tuning, xlora, shadow)."""
    config: dict[str, Any] = field(default_factory=dict)
    """Fields of that method's peft config class (e.g. VeraConfig's `r`), as YAML; peftlab sets task_type and
    modules_to_save (and AdaLoRA's total_step)."""

    def validate(self):
        where = _where("peft", self.method)
        if not self.method:
            raise PeftlabError(f"strategy 'peft' needs strategy_options.peft.method, a peft method: "
                               f"{', '.join(sorted(set(peft_methods()) - set(REFUSED)))}")
        config_class(self.method)
        self.method = self.method.lower()
        self.config = check_config(self.method, self.config, where)
        if self.method == "lora":
            check_init(_lora_init(self.config), self.config.get("use_dora", False), where)


# The fields without options are those of most methods (a tuner that folds); `by_options` gives each method's own.
@register_strategy("peft", PeftOptions, save_format=SaveFormat.PEFT_ADAPTER, merge=Merge.FOLD, base_name=peft_base_name,
                   by_options=lambda options: tuner_record(options["method"], options["config"]))
def peft_method(model: nn.Module, options: PeftOptions, head_modules: list[str]) -> nn.Module:
    """Any peft method (`options.method`) with its config fields (`options.config`); the head trains in full."""
    adapted = wrap_with_peft(model, options.method, options.config, head_modules, "peft")
    if options.method == "lora":
        after_lora_init(adapted, _lora_init(options.config))
    return adapted


def _lora_init(config: dict[str, Any]) -> str:
    """LoRA's initialisation as `LoraOptions.init` names it, from a LoraConfig's `init_lora_weights`."""
    init = config.get("init_lora_weights", True)
    return "default" if init is True else str(init)


# ---------------------------------------------------------------------------------------------------------------------
# First-class names: the common methods with typed options and defaults for classification.


def _register_method(name: str, method: str, options_cls: type, **record_fields: Any):
    """Register strategy `name` as peft method `method`, its options dataclass turned into the method's config by
    its `peft_config()`."""

    def fn(model: nn.Module, options, head_modules: list[str]) -> nn.Module:
        return wrap_with_peft(model, method, options.peft_config(), head_modules, name)

    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = f"peft's {method} (options: {options_cls.__name__}); the head trains in full."
    register_strategy(name, options_cls, **{**tuner_record(method), **record_fields})(fn)


def _positive(strategy: str, **values: Optional[float]) -> None:
    for key, value in values.items():
        if value is not None and value < 1:
            raise PeftlabError(f"strategy {strategy!r} option {key}={value} must be >= 1")


def _probability(strategy: str, **values: float) -> None:
    for key, value in values.items():
        if not 0 <= value < 1:
            raise PeftlabError(f"strategy {strategy!r} option {key}={value} must be in [0, 1)")


@dataclass
class PrefixOptions:
    num_virtual_tokens: int = 20
    """Prefix length: virtual keys and values prepended in every layer (Li & Liang 2021; P-tuning v2, Liu et al.
    2022, uses 4 to 64 on classification)."""
    projection: bool = False
    """Reparametrise the prefix through a two-layer MLP as wide as the model (Li & Liang 2021, Sec. 4.3); the saved
    adapter holds the MLP's output."""

    def validate(self):
        _positive("prefix", num_virtual_tokens=self.num_virtual_tokens)

    def peft_config(self) -> dict[str, Any]:
        return {"num_virtual_tokens": self.num_virtual_tokens, "prefix_projection": self.projection}


@dataclass
class PromptOptions:
    num_virtual_tokens: int = 20
    """Virtual tokens prepended to the input embeddings (Lester et al. 2021)."""
    init: Literal["sample_vocab", "random"] = "sample_vocab"
    """Start the prompt from embeddings of tokens sampled from the vocabulary (Lester et al. 2021, Sec. 3.2: better
    than random, especially for small models) or from random values."""

    def validate(self):
        _positive("prompt", num_virtual_tokens=self.num_virtual_tokens)

    def peft_config(self) -> dict[str, Any]:
        return {"num_virtual_tokens": self.num_virtual_tokens, "prompt_tuning_init": self.init.upper()}


@dataclass
class Ia3Options:
    target_modules: Optional[list[str]] = None
    """Layers whose outputs (or, for feed-forward ones, inputs) are rescaled; default: peft's (IA)3 layers for the
    architecture (BERT: key, value and the feed-forward output, as in Liu et al. 2022), else query/value."""
    feedforward_modules: Optional[list[str]] = None
    """Those of target_modules that are feed-forward layers (their input is rescaled); default: peft's, or none."""

    def peft_config(self) -> dict[str, Any]:
        return {key: value for key, value in dataclasses.asdict(self).items() if value is not None}


@dataclass
class VeraOptions:
    r: int = 256
    """Rank of the frozen random projections shared by all layers (Kopiczko et al. 2024); only the scaling vectors
    train, so the trained parameters grow with r by one value per layer."""
    target_modules: Optional[list[str]] = None
    """Layers to adapt; default: peft's for the architecture (MiniLM/BERT: query, value), else query/value. Layers
    of one shape share the projections."""
    dropout: float = 0.0
    d_initial: float = 0.1
    """Initial value of the vectors scaling the projection's rank dimension (the paper's d)."""

    def validate(self):
        _positive("vera", r=self.r)
        _probability("vera", dropout=self.dropout)

    def peft_config(self) -> dict[str, Any]:
        return _with_targets(self, {"r": self.r, "vera_dropout": self.dropout, "d_initial": self.d_initial})


@dataclass
class LohaOptions:
    r: int = 8
    """Rank of each of the two low-rank factors whose Hadamard product is the update (Hyeon-Woo et al. 2022)."""
    alpha: float = 8.0
    """The update is scaled by alpha / r."""
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    target_modules: Optional[list[str]] = None
    """Layers to adapt; default: peft's for the architecture (MiniLM/BERT: query, value), else query/value."""

    def validate(self):
        _positive("loha", r=self.r)
        _probability("loha", rank_dropout=self.rank_dropout, module_dropout=self.module_dropout)

    def peft_config(self) -> dict[str, Any]:
        return _with_targets(self, {"r": self.r, "alpha": self.alpha, "rank_dropout": self.rank_dropout,
                                    "module_dropout": self.module_dropout})


@dataclass
class LokrOptions:
    r: int = 8
    """Rank of the low-rank factor of the Kronecker product's larger matrix (LyCORIS' LoKr)."""
    alpha: float = 8.0
    """The update is scaled by alpha / r."""
    decompose_factor: int = -1
    """How the layer's dimensions split into the two Kronecker factors; -1 picks factors close to a square root."""
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    target_modules: Optional[list[str]] = None
    """Layers to adapt; default: peft's for the architecture (MiniLM/BERT: query, value), else query/value."""

    def validate(self):
        _positive("lokr", r=self.r)
        _probability("lokr", rank_dropout=self.rank_dropout, module_dropout=self.module_dropout)

    def peft_config(self) -> dict[str, Any]:
        return _with_targets(self, {"r": self.r, "alpha": self.alpha, "decompose_factor": self.decompose_factor,
                                    "rank_dropout": self.rank_dropout, "module_dropout": self.module_dropout})


@dataclass
class AdaLoraOptions:
    init_r: int = 12
    """Rank of every layer before pruning (Zhang et al. 2023 start at 1.5x the final average rank)."""
    target_r: int = 8
    """Average rank left per layer once pruned: the budget, as LoRA's r."""
    alpha: float = 16.0
    """The update is scaled by alpha / init_r, as LoRA's by alpha / r."""
    dropout: float = 0.1
    target_modules: Optional[list[str]] = None
    """Layers to adapt; default: peft's for the architecture (MiniLM/BERT: query, value), else query/value."""
    warmup_fraction: float = 0.1
    """Share of the optimizer steps trained at init_r before any pruning (the paper's t_i)."""
    final_fraction: float = 0.2
    """Share of the optimizer steps, at the end, trained with the ranks fixed (the paper's t_f)."""
    delta_t: int = 10
    """Optimizer steps between two rank allocations (the paper's Delta T)."""
    orth_reg_weight: float = 0.5
    """Weight of the penalty keeping the singular vectors orthogonal (the paper's gamma, added to the loss)."""

    def validate(self):
        _positive("adalora", init_r=self.init_r, target_r=self.target_r, delta_t=self.delta_t)
        _probability("adalora", dropout=self.dropout, warmup_fraction=self.warmup_fraction,
                     final_fraction=self.final_fraction)
        if self.target_r > self.init_r:
            raise PeftlabError(f"strategy 'adalora' option target_r={self.target_r} must be <= init_r={self.init_r} "
                               "(AdaLoRA prunes ranks, it does not add them)")
        if self.warmup_fraction + self.final_fraction >= 1:
            raise PeftlabError(f"strategy 'adalora' options warmup_fraction + final_fraction must be < 1 to leave "
                               f"steps to allocate ranks in, got {self.warmup_fraction} + {self.final_fraction}")

    def peft_config(self) -> dict[str, Any]:
        return _with_targets(self, {"init_r": self.init_r, "target_r": self.target_r, "lora_alpha": self.alpha,
                                    "lora_dropout": self.dropout, "deltaT": self.delta_t,
                                    "orth_reg_weight": self.orth_reg_weight})


def _with_targets(options, config: dict[str, Any]) -> dict[str, Any]:
    return {**config, "target_modules": options.target_modules} if options.target_modules else config


_register_method("prefix", "prefix_tuning", PrefixOptions)
_register_method("prompt", "prompt_tuning", PromptOptions)
_register_method("ia3", "ia3", Ia3Options)
_register_method("vera", "vera", VeraOptions)
_register_method("loha", "loha", LohaOptions)
_register_method("lokr", "lokr", LokrOptions)
_register_method("adalora", "adalora", AdaLoraOptions, before_training=adalora_schedule_from_fractions)
