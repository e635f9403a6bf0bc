"""Typed recipe configuration: dataclasses loaded from one YAML file plus dotted `key=value` overrides.

The schema and its loading only; the command lines that fill it are `peftlab.cli`'s.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

import yaml

from peftlab import strategies
from peftlab.errors import PeftlabError
from peftlab.typed import Override, coerce_value, read_yaml_file, resolve, show_value


@dataclass
class ModelConfig:
    name: str = "minilm"
    """A packaged backbone short name (`minilm`, `efficientnet-lite0`), a local folder, or a Hub id (`bert-base-uncased`)."""
    quantization: Optional[Literal["8bit", "4bit"]] = None
    """Load the frozen weights in 8-bit or 4-bit through bitsandbytes (the head stays in full precision)."""
    head_modules: Optional[list[str]] = None
    """Names of the task-head modules; found automatically for known architectures."""
    trust_remote_code: bool = False
    """Run model code from the Hub repository. Off unless you trust its author."""
    num_hidden_layers: Optional[int] = None
    """Keep only the first N layers of a text backbone (fast smoke runs)."""
    dropout: Optional[float] = None
    """Probability of every dropout layer of the backbone; unset keeps the model's own (0.1 for BERT-like models).
    0 also turns off EfficientNet's drop connect."""
    pooling: Literal["cls", "mean"] = "cls"
    """What the head of a text encoder sees: `cls` (the model's own first-token/pooler features) or `mean`
    (masked mean of the last hidden states; what sentence encoders such as MiniLM were trained for)."""
    batchnorm: Literal["auto", "train", "frozen"] = "auto"
    """Batch norms whose weights train (CNNs under full, partial, bitfit): `frozen` keeps every batch norm in eval
    mode, normalising with the pretrained statistics while its weights still train (steadier with small batches);
    `train` re-estimates their running statistics on the training batches; `auto` is `frozen` on models with batch
    norms (measured, validation accuracy of EfficientNet-Lite0 on Animal-MNIST: full fine-tuning 88% vs 67%,
    BitFit 88% vs 50%, benchmarks/results/vision_lite0_fixes). Frozen batch norms never move either way; an
    explicit `frozen` on a model without batch norms is an error."""


@dataclass
class DataConfig:
    name: str = "rotten_tomatoes"
    """A packaged dataset short name, a local CSV/JSONL/Parquet file or image folder, or a Hub dataset id."""
    text_column: str = "text"
    """Column holding the input text."""
    label_column: str = "label"
    """Column holding the class label."""
    max_length: Union[int, Literal["auto"]] = "auto"
    """Longest tokenized sequence (longer texts are truncated); batches are padded only to their own longest sequence.
    `auto`: the packaged dataset's measured length, else the shortest multiple of 8 that keeps 95% of the training
    texts whole, capped by the model's limit (peftlab.data_rules). The run records the truncated share per split."""
    image_size: int = 96
    """Side in pixels of the square images fed to the model."""
    augment: bool = True
    """Random resized crop, flip and small rotation on training images (never at evaluation)."""
    validation_fraction: float = 0.1
    """Share of the data held out for validation when the source ships no validation split."""
    test_fraction: float = 0.1
    """Share of the data held out for testing when the source ships no test split."""
    split_seed: int = 0
    """Seed of the train/validation/test split for sources that ship no split."""
    max_train_samples: Optional[int] = None
    """Cap on training examples (fast smoke runs)."""
    max_eval_samples: Optional[int] = None
    """Cap on evaluation examples (fast smoke runs)."""
    cv_folds: Optional[int] = None
    """k-fold cross-validation: train and validation (after the caps above) are pooled and cut into this many
    stratified folds (scikit-learn's StratifiedKFold, seeded by split_seed); the test split stays held out. Set
    with cv_fold; `peftlab cv` runs every fold."""
    cv_fold: Optional[int] = None
    """Which fold (0 to cv_folds - 1) is this run's validation split; the other folds train."""
    group_column: Optional[str] = None
    """Column of group ids (a speaker, a patient, a source document): with cv_folds, a group's examples stay in one
    fold (StratifiedGroupKFold), so no group is both trained and validated on."""


@dataclass
class TrainConfig:
    epochs: int = 3
    """Passes over the training set."""
    max_steps: Optional[int] = None
    """Stop after this many optimizer steps (overrides epochs)."""
    batch_size: int = 32
    """Per-process batch size; the global batch is batch_size x processes x grad_accum_steps."""
    eval_batch_size: int = 64
    """Per-process batch size at evaluation."""
    grad_accum_steps: int = 1
    """Batches whose gradients are summed before each optimizer step."""
    lr: float = 5e-4
    """Peak learning rate (after warmup)."""
    head_lr: Optional[float] = None
    """Peak learning rate of the task head; null uses train.lr. A new head often gets a multiple of the body's rate
    (fastai's CNN transfer uses 10x), but measured here it did not help: 10x moved full fine-tuning of
    EfficientNet-Lite0 from 88.3 to 89.0% validation accuracy with frozen batch norms (noise), sank it from 67 to 49%
    without them, and took LoRA r=8 from 89.8 (vision_lite0, seed 0) to 87.2% (results/vision_lite0_fixes)."""
    layer_decay: float = 1.0
    """Layer-wise learning-rate decay for strategies that train whole blocks (full, partial, bitfit): block i of N
    (0 = bottom) trains at lr x decay^(N-1-i), what lies below the blocks (embeddings, stem) at lr x decay^N, what
    lies above them at lr (the head at head_lr). ELECTRA and BEiT fine-tune so, except that they put the top block
    one or two steps below the head. 1 turns it off."""
    loraplus_ratio: float = 1.0
    """LoRA+ (Hayou et al. 2024): LoRA's B matrices train at lr x ratio, the A matrices at lr (the paper suggests
    about 16 for AdamW). Strategy lora only; 1 turns it off."""
    weight_decay: float = 0.01
    """Decoupled weight decay (AdamW) or L2 penalty (SGD)."""
    optimizer: Literal["adamw", "sgd"] = "adamw"
    """Optimizer over the trainable parameters."""
    momentum: float = 0.9
    """SGD momentum (ignored by AdamW)."""
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    """Learning-rate decay after warmup."""
    warmup_ratio: float = 0.06
    """Share of the optimizer steps spent warming the learning rate up from 0."""
    max_grad_norm: Optional[float] = 1.0
    """Clip the gradient norm to this value; null disables clipping."""
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """`auto`: bf16 where the CPU or GPU supports it, else fp32; on a CPU, fp32 for a model whose weights are mostly
    convolutions (EfficientNet, ResNet) and whose training runs backward through them (every strategy but `head`):
    bf16 slows their backward there. metrics.json says which."""
    compile: bool = False
    """Train the model through torch.compile (accelerate's TorchDynamoPlugin; inductor, or the backend `accelerate
    launch --dynamo_backend` names): the first steps, and the first of each new batch shape, pay for compiling.
    Saved weights, checkpoints and exports are the plain module's. false leaves it to `accelerate launch
    --dynamo_backend` (default no)."""
    cast_frozen_weights: bool = True
    """Under bf16 (fp16) autocast, hold the frozen linear and convolution weights in that dtype while training
    (peftlab.frozen_weights): the same numbers, without autocast casting every frozen weight again at every forward;
    they are fp32 again when training ends. false: autocast casts them at every forward, as before."""
    counter_dropout: bool = True
    """On a CPU, draw training's dropout masks (every dropout layer, peft's lora_dropout, attention-probability
    dropout) with peftlab's counter-based generator (peftlab.dropout): the same keep probability and scaling, another
    random stream, on every core; PyTorch's own draws them one element at a time on CPUs other than Intel's. Off for
    a compiled model (train.compile or `accelerate launch --dynamo_backend`: inductor draws its own) and on GPUs.
    false: PyTorch's dropout."""
    keep_freed_memory: bool = True
    """On a CPU under Linux (glibc), keep the memory a training step frees in the process for the next step instead of
    returning it to the kernel (peftlab.allocator): fewer page faults, a resident size that stays near its peak."""
    cpu_threads: Optional[int] = None
    """Intra-op CPU threads per process; null: all physical cores of the process's share of the machine (cores /
    local processes), or OMP_NUM_THREADS when you set it. On a machine shared with other busy jobs, 1 can be far
    faster (threads wait on descheduled peers)."""
    seed: int = 42
    """Random seed of the run (initialisation, shuffling, dropout)."""
    eval_every: int = 0
    """Evaluate every N optimizer steps; 0 evaluates at the end of each epoch."""
    metric_for_best: str = "auto"
    """Validation metric that picks the best checkpoint, e.g. accuracy or macro_f1. `auto`: macro_f1 when the
    training labels are imbalanced (the largest class has at least twice the smallest's examples), else accuracy.
    Multi-task runs: `auto` is tasks_mean (the mean of each task's own metric); a scalar metric is its mean over
    the tasks."""
    class_weights: Literal["auto", "none", "inverse", "sqrt_inverse"] = "auto"
    """Per-class weights of the training loss, scaled to a mean of 1 over training examples: `inverse` or
    `sqrt_inverse` class frequency. `auto`: sqrt_inverse when the training labels are imbalanced (as for
    metric_for_best), else none. Validation and test losses are never weighted."""
    early_stopping_patience: Optional[int] = None
    """Stop after this many evaluations without improvement of metric_for_best."""
    checkpoint_every: int = 0
    """Save a resumable checkpoint every N optimizer steps; 0 saves at each evaluation."""
    log_every: int = 10
    """Log training metrics every N optimizer steps."""
    trackers: list[str] = field(default_factory=lambda: ["tensorboard", "jsonl"])
    """Where metrics are logged (tracker names)."""
    group_by_length: bool = True
    """Batch texts of similar length together so dynamic padding wastes little: training batches from a seeded
    shuffle grouped by length, evaluation batches longest first (outputs and predictions files stay in split
    order)."""
    cache_frozen_features: bool = True
    """Strategy `head` only: run the frozen backbone once (eval mode, no grad, bf16 autocast where enabled) and train
    the head on its cached outputs instead of running the backbone every epoch (see peftlab.caching). The frozen
    backbone then applies no dropout or stochastic depth (the head's own dropout still does); images with
    data.augment=true are not cached (random crops change every epoch) and say so in one line. The saved model is
    the usual one."""


@dataclass
class TaskConfig:
    name: str = ""
    """The task's name: what `peftlab predict --task` and `POST /predict` address, and its adapter's and head's folder
    in the saved run (letters, digits, `_` and `-`)."""
    data: DataConfig = field(default_factory=DataConfig)
    """The task's data. Keys it leaves out come from the run's top-level `data` section (caps, fractions, max_length),
    except `name`, which each task gives itself."""
    metric: Literal["auto", "accuracy", "macro_f1", "macro_precision", "macro_recall"] = "auto"
    """What this task adds to `tasks_mean`, the mean over tasks that picks the best checkpoint: `auto` is macro_f1 on
    imbalanced training labels, else accuracy (as train.metric_for_best=auto decides for one task)."""


@dataclass
class MultitaskConfig:
    tasks: list[TaskConfig] = field(default_factory=list)
    """Classification tasks trained on one frozen base in one run, each with its own head, e.g.
    `[{name: sentiment, data: {name: reviews.csv}}, {name: topic, data: {name: news.csv}}]`. Empty (the default):
    a single-task run on `data`. Run a task list with recipes/multitask_classification.py."""
    mode: Literal["separate", "shared"] = "separate"
    """`separate`: one LoRA adapter per task (peft named adapters; a mixed batch routes each example to its task's
    adapter), so a task added later leaves the others bit-for-bit unchanged. `shared`: one adapter of the run's
    strategy trained on every task's batches, with a head per task (hard parameter sharing)."""
    sampling: Literal["proportional", "temperature"] = "temperature"
    """Which task the next training batch comes from (each batch holds one task). `proportional`: every task's batches
    once per epoch, in shuffled order, so a task's share of the steps is its share of the examples. `temperature`:
    task t with probability n_t^(1/T) / sum n^(1/T) per batch (an epoch has as many batches as under proportional;
    a task's batches cycle through reshuffled passes)."""
    temperature: float = 2.0
    """T of temperature sampling. T=1 is proportional in expectation, large T uniform over tasks. 2 (T5's
    temperature-scaled mixing, Raffel et al. 2020, Sec. 3.5.2; Arivazhagan et al. 2019 use T=5 for 100+ languages)
    halves the gap on a log scale: a task with 4x the examples gets 2x the batches, so small tasks are not drowned
    out while large ones still get most of the steps."""
    extend: Optional[str] = None
    """A finished multi-task run of the same mode on the same base: its tasks come first, their heads loaded and
    frozen, while the tasks listed here train new heads; the new run folder holds every task. Mode separate: their
    adapters too stay bit-for-bit unchanged, the new tasks train new adapters. Mode shared: the shared adapter trains
    on, on the new tasks only, so the earlier tasks are evaluated again (their data as that run's config.yaml names
    it) and metrics.json's `forgetting` gives each one's scores before and after."""


@dataclass
class RecipeConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    multitask: MultitaskConfig = field(default_factory=MultitaskConfig)
    strategy: str = "lora"
    """One of peftlab.list_strategies(): full, head, partial, bitfit, lora, adapter; peft's methods prefix, prompt,
    ia3, vera, loha, lokr, adalora; or peft (any peft method, strategy_options.peft.method)."""
    strategy_options: dict[str, dict] = field(default_factory=dict)
    """Options per strategy name, e.g. {lora: {r: 8}}; only the selected strategy's options are used."""
    output_dir: str = "outputs/run"
    """Folder for the resolved config, logs, checkpoints and the final model."""
    overwrite: bool = False
    """Replace an existing output directory (otherwise a finished run there is refused)."""
    resume_from: Optional[str] = None
    """A checkpoint folder, or `latest` for the newest checkpoint in output_dir."""


# --------------------------------------------------------------------------------------------------------------------
# Loading: YAML file -> dotted overrides -> typed dataclasses, every value checked once, here.
# --------------------------------------------------------------------------------------------------------------------


# Range rules checked after the types; an unset Optional (None) always passes.
_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "positive": (lambda v: v > 0, "must be > 0"),
    "non_negative": (lambda v: v >= 0, "must be >= 0"),
    "fraction": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "seed": (lambda v: 0 <= v < 2**32, "must be in [0, 2**32) (numpy's seed range)"),
    "decay": (lambda v: 0 < v <= 1, "must be in (0, 1]"),
    "ratio": (lambda v: v >= 1, "must be >= 1"),
    "at_least_two": (lambda v: v >= 2, "must be >= 2"),
}
_RANGES: dict[type, dict[str, str]] = {
    ModelConfig: {"num_hidden_layers": "positive", "dropout": "fraction"},
    DataConfig: {
        "max_length": "positive", "image_size": "positive", "validation_fraction": "fraction",
        "test_fraction": "fraction", "max_train_samples": "positive", "max_eval_samples": "positive",
        "split_seed": "seed", "cv_folds": "at_least_two", "cv_fold": "non_negative",
    },
    TrainConfig: {
        "epochs": "positive", "max_steps": "positive", "batch_size": "positive", "eval_batch_size": "positive",
        "grad_accum_steps": "positive", "lr": "positive", "weight_decay": "non_negative", "momentum": "fraction",
        "warmup_ratio": "fraction", "max_grad_norm": "positive", "eval_every": "non_negative",
        "early_stopping_patience": "positive", "checkpoint_every": "non_negative", "log_every": "positive",
        "seed": "seed", "head_lr": "positive", "layer_decay": "decay", "loraplus_ratio": "ratio",
        "cpu_threads": "positive",
    },
    MultitaskConfig: {"temperature": "positive"},
}


def _check_split_fractions(data: DataConfig, prefix: str) -> None:
    total = data.validation_fraction + data.test_fraction
    if total >= 1:
        raise PeftlabError(
            f"{prefix}validation_fraction + {prefix}test_fraction must be < 1 so some data is left to train on, "
            f"got {data.validation_fraction} + {data.test_fraction} = {total:g}"
        )


def _check_folds(data: DataConfig, prefix: str) -> None:
    if data.cv_folds is None:
        for name in ("cv_fold", "group_column"):
            if getattr(data, name) is not None:
                raise PeftlabError(f"{prefix}{name} applies to k-fold cross-validation only; set {prefix}cv_folds "
                                   f"too (or run `peftlab cv`, which sets both)")
    elif data.cv_fold is None or data.cv_fold >= data.cv_folds:
        raise PeftlabError(f"{prefix}cv_folds={data.cv_folds} needs {prefix}cv_fold, the fold that validates, "
                           f"between 0 and {data.cv_folds - 1}, got {data.cv_fold}")


def _check_data(data: DataConfig, prefix: str) -> None:
    _check_split_fractions(data, prefix)
    _check_folds(data, prefix)


TASK_NAME = re.compile(r"[A-Za-z0-9_-]+")
RESERVED_TASK_NAMES = ("default",)
"""peft's name for an adapter added without one."""


def _check_multitask(section: "MultitaskConfig", prefix: str) -> None:
    seen = set()
    for index, task in enumerate(section.tasks):
        key = f"{prefix}tasks[{index}]"
        # peft takes an adapter name inside its parameter prefix `lora_` (a, lo, ra) for the prefix when loading.
        if not TASK_NAME.fullmatch(task.name) or task.name in RESERVED_TASK_NAMES or task.name in "lora_":
            raise PeftlabError(f"{key}.name={task.name!r}: give each task a name of letters, digits, _ and - "
                               f"(not {', '.join(RESERVED_TASK_NAMES)}, nor part of peft's prefix lora_), e.g. "
                               f"name: sentiment")
        if task.name in seen:
            raise PeftlabError(f"{key}.name: duplicate task name {task.name!r}; every task needs its own name")
        seen.add(task.name)
        if task.data.cv_folds is not None:
            raise PeftlabError(f"{key}.data.cv_folds: cross-validation of a multi-task run is not supported; "
                               f"cross-validate each task as a single-task run")
    if section.extend is not None and not section.tasks:
        raise PeftlabError(f"{prefix}extend={section.extend!r} adds the tasks of {prefix}tasks to that run, and "
                           f"{prefix}tasks is empty; list the new tasks")


# Checks across fields of one section, run after its range rules.
_SECTION_CHECKS: dict[type, Callable[[Any, str], None]] = {DataConfig: _check_data,
                                                          MultitaskConfig: _check_multitask}


def load_config(path: Optional[str], overrides: typing.Sequence[str] = (), cls: type = RecipeConfig) -> Any:
    """Load a typed config: the YAML file at `path` (None: the defaults), then dotted `key=value` overrides.

    Args:
        path: a YAML file of nested keys, or None.
        overrides: e.g. `["train.lr=1e-3", "strategy_options.lora.r=16", "train.max_steps=null"]`; values are YAML.
        cls: the root config dataclass.
    Raises PeftlabError (one line naming the key) for unknown keys, wrong types, values out of range, an unknown
    strategy, and bad options of the selected strategy.
    """
    raw = _read_yaml(path) if path is not None else {}
    for override in overrides:
        _apply_override(raw, override)
    if cls is RecipeConfig:
        _inherit_task_data(raw)
    cfg = _build(cls, raw, prefix="")
    if hasattr(cfg, "strategy") and hasattr(cfg, "strategy_options"):
        _check_strategy(cfg.strategy, cfg.strategy_options)
    if isinstance(cfg, RecipeConfig) and cfg.multitask.tasks:
        _check_multitask_strategy(cfg)
    return cfg


def config_to_dict(cfg: Any) -> dict:
    """The config as nested plain dicts and lists (YAML- and JSON-ready). A single-task config leaves out the
    `multitask` section at its defaults, so its config.yaml is written as before multi-task runs existed."""
    data = dataclasses.asdict(cfg)
    if isinstance(cfg, RecipeConfig) and cfg.multitask == MultitaskConfig():
        del data["multitask"]
    return data


def save_config(cfg: Any, path: str | os.PathLike, header: Optional[str] = None) -> Path:
    """Write the resolved config as YAML (parent folders created), so `--config <path>` reruns exactly this run.

    Args:
        header: comment lines to put first (each starting with `#`); default: the `--config <path>` line.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = header.rstrip("\n") + "\n" if header else f"# Resolved peftlab config; rerun with: --config {path}\n"
    path.write_text(header + yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return path


def _read_yaml(path: str) -> dict:
    _, data = read_yaml_file(path, "config file")
    if data is None:  # an empty file means all defaults
        return {}
    if not isinstance(data, dict):
        raise PeftlabError(f"config file {path} must hold a mapping of keys to values, got a {type(data).__name__}")
    return data


def _apply_override(raw: dict, override: str) -> None:
    key, sep, text = override.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not sep or not all(parts) or not text.strip():
        raise PeftlabError(
            f"malformed override {override!r}: expected key=value, e.g. train.lr=1e-3 (use key=null for None)"
        )
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if isinstance(child, Override):  # `x={a: 1}` then `x.b=2`: parse the earlier text into its mapping
            child = child.parse()
        # The override wins over a non-mapping value of the same section (its own type check happens later).
        node[part] = child if isinstance(child, dict) else {}
        node = node[part]
    node[parts[-1]] = Override(key, text.strip())


def _inherit_task_data(raw: dict) -> None:
    """Give each task's `data` the top-level `data` keys it leaves out (a raw mapping, before types are checked);
    every task names its own data set."""
    section = resolve(raw.get("multitask"), None)
    tasks = resolve(section.get("tasks"), None) if isinstance(section, dict) else None
    if not isinstance(tasks, list):
        return  # no task list, or one of the wrong type that _build reports
    shared = resolve(raw.get("data"), None) or {}
    shared = {key: resolve(value, None) for key, value in shared.items()} if isinstance(shared, dict) else {}
    merged = []
    for index, task in enumerate(tasks):
        task = resolve(task, None)
        if isinstance(task, dict):
            own = resolve(task.get("data"), None) or {}
            if isinstance(own, dict):
                if "name" not in own:
                    raise PeftlabError(f"multitask.tasks[{index}].data.name is missing: each task names its own "
                                       f"data, e.g. {{name: {task.get('name') or 'sentiment'}, data: {{name: "
                                       f"reviews.csv}}}}")
                task = {**task, "data": {**shared, **own}}
        merged.append(task)
    raw["multitask"] = {**section, "tasks": merged}


def _build(cls: type, data: dict, prefix: str) -> Any:
    """Build dataclass `cls` from a raw mapping, checking every key and value; `prefix` is the dotted path so far."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    for name in data:
        if name not in names:
            raise _unknown_key(cls, prefix, str(name))
    kwargs = {}
    for name in names:
        key, hint = prefix + name, hints[name]
        if dataclasses.is_dataclass(hint):
            section = resolve(data.get(name), None)
            if section is None:  # missing, or a YAML header whose keys are all commented out
                section = {}
            if not isinstance(section, dict):
                raise PeftlabError(
                    f"{key}: expected a mapping of {key}.* keys, got {show_value(section)}; "
                    f"set one key with {key}.<name>=value"
                )
            kwargs[name] = _build(hint, section, key + ".")
        elif _is_section_list(hint) and name in data:
            items = resolve(data[name], hint)
            if not isinstance(items, list):
                raise PeftlabError(f"{key}: expected a list of mappings, got {show_value(items)}")
            kwargs[name] = []
            for index, item in enumerate(items):
                item = resolve(item, None)
                if not isinstance(item, dict):
                    raise PeftlabError(f"{key}[{index}]: expected a mapping of keys, got {show_value(item)}")
                kwargs[name].append(_build(typing.get_args(hint)[0], item, f"{key}[{index}]."))
        elif name in data:
            kwargs[name] = coerce_value(data[name], hint, key)
    obj = cls(**kwargs)
    _check_section(obj, prefix)
    return obj


def _is_section_list(hint: Any) -> bool:
    """Whether a field is a list of config sections (`multitask.tasks`), each built and checked like a section."""
    args = typing.get_args(hint)
    return typing.get_origin(hint) is list and len(args) == 1 and dataclasses.is_dataclass(args[0])


def _check_section(obj: Any, prefix: str) -> None:
    for name, rule in _RANGES.get(type(obj), {}).items():
        value = getattr(obj, name)
        passes, requirement = _RULES[rule]
        if value is not None and not isinstance(value, str) and not passes(value):  # str: a choice such as `auto`
            raise PeftlabError(f"{prefix}{name}: {requirement}, got {value!r}")
    check = _SECTION_CHECKS.get(type(obj))
    if check:
        check(obj, prefix)


def _unknown_key(cls: type, prefix: str, name: str) -> PeftlabError:
    key = prefix + name
    candidates = _leaf_keys(cls, prefix)
    # A key in the wrong section (`lr=...` for `train.lr=...`) is the commonest slip; then typos.
    guesses = [c for c in candidates if c.rsplit(".", 1)[-1] == name] or difflib.get_close_matches(key, candidates, n=1)
    hint = f"; did you mean {guesses[0]!r}?" if guesses else ""
    section = f" under {prefix[:-1]}" if prefix else ""
    valid = ", ".join(f.name for f in dataclasses.fields(cls) if f.init)
    return PeftlabError(f"unknown config key {key!r}{hint} (valid keys{section}: {valid})")


def _leaf_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for name, hint in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(hint):
            keys += _leaf_keys(hint, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def _check_multitask_strategy(cfg: "RecipeConfig") -> None:
    """Refuse, in one line, a strategy that a multi-task run cannot train: its record says what it needs."""
    record = strategies.configured_record(cfg.strategy, cfg.strategy_options.get(cfg.strategy, {}))
    if cfg.multitask.mode == "separate" and not record.per_task_adapters:
        raise PeftlabError(f"multitask.mode=separate trains one adapter per task and routes mixed batches per "
                           f"example, which peft does for LoRA only, not strategy {cfg.strategy!r}; use strategy=lora "
                           f"or multitask.mode=shared")
    if not record.heads_apart:
        raise PeftlabError(f"strategy {cfg.strategy!r} keeps the task head inside its peft adapter, so a multi-task "
                           f"run cannot give each task its own head; use lora, ia3, adapter, bitfit or head")
    hooks = [name for name in ("before_training", "after_optimizer_step", "prepare_base", "save_adapter")
             if getattr(record, name) is not None]
    if hooks:
        raise PeftlabError(f"strategy {cfg.strategy!r} with these options needs {', '.join(hooks)} on one adapter, "
                           f"which a multi-task run does not call per task; use strategy=lora with init=default, "
                           f"gaussian or orthogonal")
    if record.save_format is strategies.SaveFormat.WHOLE_MODEL:
        raise PeftlabError(f"strategy {cfg.strategy!r} trains the whole base, and a multi-task run shares one frozen "
                           f"base; use lora, adapter, bitfit or head")


def _check_strategy(name: str, all_options: dict[str, dict]) -> None:
    """Reject an unknown strategy and bad options of the selected one through the strategy registry's own check."""
    known = strategies.list_strategies()
    for key, strategy in [("strategy", name)] + [(f"strategy_options.{s}", s) for s in all_options]:
        if strategy not in known:
            close = difflib.get_close_matches(strategy, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise PeftlabError(f"{key}: unknown strategy {strategy!r}{hint} (choose one of: {', '.join(known)})")
    # Only the selected strategy's options are used, so only they are checked.
    try:
        strategies.validate_strategy_options(name, all_options.get(name, {}))
    except PeftlabError as err:
        raise PeftlabError(f"strategy_options.{name}: {err}") from err
