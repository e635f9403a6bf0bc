"""One frozen base, many tasks (Houlsby et al. 2019's setting): a head per task, and one LoRA adapter per task (mode
`separate`, peft named adapters) or one adapter shared by all (mode `shared`); each batch is routed by its task ids.

    model = build_multitask_model(cfg.model, "text", tasks, cfg.strategy, options, mode="separate")
    model(**batch)                      # batch["task_ids"]: each example's task index; logits padded to the widest

Text tasks on a text base or image tasks on an image base ("image": `pixel_values` instead of tokens); the routing is
the same for both, and peft routes a mixed batch through convolution LoRA layers as through linear ones.

How a batch finds its task:
- heads: every head module of the base (`find_head`) is replaced by a `TaskHeads` holding one copy per task, built
  as the backbone builds a head for that task's labels; each example goes through its task's copy, and the logits of a
  task with fewer classes are padded with the dtype's lowest value (probability 0, never the argmax, no loss).
- adapters (mode `separate`): a batch of one task activates that task's adapter (peft's `set_adapter`, with the
  parameters' `requires_grad` left as they were: every task's adapter stays what trains, the inactive ones simply get
  no gradient); a batch of several tasks (inference only) passes peft's `adapter_names=` so each example runs through
  its own task's adapter in one forward.
- loss: the mean of per-example cross-entropies, each weighted by its task's class weights (peftlab.data_rules), the
  convention of the single-task loss.
The routing is a forward pre-hook on the adapted model (as `pooling=mean` is), so the model keeps the parameter names,
strategy record, counts and groups of a single-task model, and the one training loop trains it unchanged.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.backbones import Backbone, load_base
from peftlab.data.tasks import TASK_IDS
from peftlab.errors import PeftlabError
from peftlab.heads import find_head, is_in_modules
from peftlab.strategies import apply_strategy

SHARED = "shared"
"""What a parameter count calls the adapter every task uses (mode `shared`)."""


@dataclass
class TaskSpec:
    """One task of a multi-task model."""

    name: str
    label_names: list[str]
    metric: str = "accuracy"
    """The validation metric this task adds to `tasks_mean`."""
    max_length: Optional[int] = None
    """Text tasks: the length its texts are truncated to (its resolved data.max_length)."""
    frozen: bool = False
    """Loaded from an earlier run (`multitask.extend`): its head, and its adapter in mode separate, do not train (in
    mode shared, the adapter it shares trains on)."""


class TaskRouting:
    """A multi-task model's tasks and the current batch's routing, attached as `model.peftlab_tasks`."""

    def __init__(self, tasks: Sequence[TaskSpec], mode: str, head_modules: Sequence[str]):
        self.tasks, self.mode, self.head_modules = list(tasks), mode, list(head_modules)
        self.width = max(len(task.label_names) for task in self.tasks)
        """Logit columns: the most classes of any task."""
        self.class_weights = torch.ones(len(self.tasks), self.width)
        """Loss weight of (task, class); 1 where a task has no class weights."""
        self.task_ids: Optional[torch.Tensor] = None
        self.labels: Optional[torch.Tensor] = None

    @property
    def names(self) -> list[str]:
        return [task.name for task in self.tasks]

    def index(self, name: str) -> int:
        """The position of task `name`; a one-line error naming the tasks for an unknown one."""
        if name not in self.names:
            raise PeftlabError(f"unknown task {name!r}; this run's tasks are {', '.join(self.names)}")
        return self.names.index(name)

    def set_class_weights(self, name: str, weights: Optional[Sequence[float]]) -> None:
        """Weight task `name`'s loss per class (None: unweighted)."""
        row = torch.ones(self.width)
        if weights is not None:
            row[:len(weights)] = torch.tensor(weights, dtype=torch.float32)
        self.class_weights[self.index(name)] = row


class TaskHeads(nn.Module):
    """In a head module's place: one copy per task, each example through its own task's copy (see module docstring).

    Args:
        pads: this is the head module that gives the logits: pad each task's to the routing's width.
    """

    def __init__(self, heads: dict[str, nn.Module], routing: TaskRouting, pads: bool):
        super().__init__()
        self.heads = nn.ModuleDict(heads)
        self.routing, self.pads = routing, pads

    def forward(self, hidden: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        task_ids, names = self.routing.task_ids, self.routing.names
        present = task_ids.unique().tolist()
        if len(present) == 1:  # the common case (every training batch): the task's head on the whole batch
            return self._pad(self.heads[names[present[0]]](hidden, *args, **kwargs))
        out = None
        for task in present:
            rows = (task_ids == task).nonzero().squeeze(1).to(hidden.device)
            part = self._pad(self.heads[names[task]](hidden[rows], *args, **kwargs))
            if out is None:
                out = part.new_empty((len(task_ids), *part.shape[1:]))
            out[rows] = part
        return out

    def _pad(self, output: torch.Tensor) -> torch.Tensor:
        missing = self.routing.width - output.shape[-1]
        if not self.pads or missing == 0:
            return output
        return F.pad(output, (0, missing), value=torch.finfo(output.dtype).min)


def task_loss(logits: torch.Tensor, labels: torch.Tensor, task_ids: torch.Tensor,
              class_weights: torch.Tensor) -> torch.Tensor:
    """Mean over examples of cross-entropy x the weight of (example's task, label); padded logits add nothing."""
    losses = F.cross_entropy(logits.float(), labels, reduction="none")
    weights = class_weights.to(logits.device)[task_ids.to(logits.device), labels]
    return (losses * weights).mean()


@dataclass
class EarlierRun:
    """A finished multi-task run whose tasks a new run keeps frozen and adds tasks to (`multitask.extend`)."""

    run_dir: Path
    tasks: list[TaskSpec]
    """Its tasks, in its task order (frozen)."""
    metrics: dict
    """Its metrics.json `tasks` section: what its tasks scored (mode separate: carried over, since their weights are
    unchanged; mode shared: their scores before the shared adapter trains on)."""
    evaluated: list = dataclasses.field(default_factory=list)
    """Mode shared: its tasks' config sections (`peftlab.config.TaskConfig`: data with its resolved max_length, and
    metric), whose validation and test splits this run evaluates again, since the shared adapter trains on; mode
    separate: none (the earlier tasks' outputs cannot change)."""


def read_earlier_run(cfg) -> Optional[EarlierRun]:
    """The run `cfg.multitask.extend` names (None without one), checked against `cfg`: a finished multi-task run of
    the same mode on the same base with the same strategy, none of whose tasks the new run names again; one-line
    errors otherwise."""
    from peftlab.config import load_config
    from peftlab.runs import CONFIG_FILE, METRICS_FILE, MODEL_SUBDIR, MULTITASK_FILE

    if not cfg.multitask.extend:
        return None
    run_dir = Path(cfg.multitask.extend)
    info_path = run_dir / MODEL_SUBDIR / MULTITASK_FILE
    if not info_path.is_file() or not (run_dir / CONFIG_FILE).is_file():
        raise PeftlabError(f"multitask.extend={run_dir} is not a finished multi-task run (no {MODEL_SUBDIR}/"
                           f"{MULTITASK_FILE}); point it to the output_dir of recipes/multitask_classification.py")
    info, earlier = json.loads(info_path.read_text()), load_config(str(run_dir / CONFIG_FILE))
    if info["mode"] != cfg.multitask.mode:
        raise PeftlabError(f"multitask.extend={run_dir} is a run of multitask.mode={info['mode']} and this one of "
                           f"{cfg.multitask.mode} (adapters per task and one shared adapter do not combine); set "
                           f"multitask.mode={info['mode']}")
    ours, theirs = dataclasses.asdict(cfg.model), dataclasses.asdict(earlier.model)
    if ours != theirs:
        differences = ", ".join(f"model.{key}={theirs[key]!r} there, {ours[key]!r} here" for key in ours
                                if ours[key] != theirs[key])
        raise PeftlabError(f"tasks on different bases: {run_dir} was trained on another base ({differences}); a run's "
                           f"tasks share one base, so set this run's model section as that run's")
    if info.get("task") == "image" and cfg.data.image_size != earlier.data.image_size:
        raise PeftlabError(f"{run_dir} took images at data.image_size={earlier.data.image_size} and this run at "
                           f"{cfg.data.image_size}; a run's image tasks share one size, so set "
                           f"data.image_size={earlier.data.image_size}")
    options = cfg.strategy_options.get(cfg.strategy, {})
    if (cfg.strategy, options) != (earlier.strategy, earlier.strategy_options.get(earlier.strategy, {})):
        raise PeftlabError(f"{run_dir} trained its adapters with strategy {earlier.strategy!r} "
                           f"{earlier.strategy_options.get(earlier.strategy, {})}, this run with {cfg.strategy!r} "
                           f"{options}; configure the new tasks' adapters as the earlier ones")
    names = [task["name"] for task in info["tasks"]]
    for task in cfg.multitask.tasks:
        if task.name in names:
            raise PeftlabError(f"task {task.name!r} is already in {run_dir} (tasks {', '.join(names)}); give the new "
                               f"task another name")
    metrics = json.loads((run_dir / METRICS_FILE).read_text()).get("tasks", {})
    tasks = [TaskSpec(task["name"], task["label_names"], task["metric"], task.get("max_length"), frozen=True)
             for task in info["tasks"]]
    evaluated = _task_configs(run_dir, earlier, names) if info["mode"] == "shared" else []
    return EarlierRun(run_dir, tasks, metrics, evaluated)


def _task_configs(run_dir: Path, run_cfg, names: list[str]) -> list:
    """The config sections of tasks `names`, as the run in `run_dir` (config `run_cfg`) or the runs it extends wrote
    them: an extended run's config.yaml lists only the tasks it added, and its `extend` names the run before."""
    from peftlab.config import load_config
    from peftlab.runs import CONFIG_FILE

    found = {task.name: task for task in run_cfg.multitask.tasks}
    while run_cfg.multitask.extend and not set(names) <= set(found):
        run_cfg = load_config(str(Path(run_cfg.multitask.extend) / CONFIG_FILE))
        found.update({task.name: task for task in run_cfg.multitask.tasks if task.name not in found})
    missing = [name for name in names if name not in found]
    if missing:
        raise PeftlabError(f"the config.yaml of {run_dir} and of the runs it extends give no data for task(s) "
                           f"{', '.join(missing)}, which this run evaluates again; restore the folders that trained "
                           f"them")
    return [found[name] for name in names]


def tasks_to_train(cfg, label_names: dict[str, list[str]], earlier: Optional[EarlierRun]) -> list[TaskSpec]:
    """The run's tasks in task order (an extended run's earlier tasks first, frozen).

    Args:
        label_names: each task with data in this run by name (those of `cfg.multitask.tasks` and the earlier tasks
            it evaluates again), its label names from its data.
        earlier: `read_earlier_run(cfg)`.
    """
    for task in earlier.tasks if earlier else []:
        if task.name in label_names and list(label_names[task.name]) != task.label_names:
            raise PeftlabError(f"task {task.name!r} of {earlier.run_dir} trained on labels {task.label_names}, and "
                               f"its data now gives {list(label_names[task.name])}; restore the data it trained on")
    new = [TaskSpec(task.name, list(label_names[task.name]), task.metric) for task in cfg.multitask.tasks]
    return (earlier.tasks if earlier else []) + new


def build_multitask_model(model_cfg, kind: str, tasks: Sequence[TaskSpec], strategy: str, options: dict, *,
                          mode: str, extend: Optional[EarlierRun] = None) -> tuple[nn.Module, Backbone]:
    """The base named by `model_cfg` with a head per task and the strategy applied once (mode `shared`) or one
    adapter per task (mode `separate`), routed by each batch's `task_ids`; returns (model, the first task's backbone,
    for its tokenizer or image settings).

    Each task's head is the one the backbone builds for its labels (`load_base` once per task, drawing the head's
    initial values from the global RNG in task order; the base weights are the same every time). Tasks marked
    `frozen` do not train; with `extend`, those of the earlier run get its saved heads and adapters (mode shared:
    its shared adapter, which trains on).
    """
    backbones = [load_base(model_cfg, task=kind, label_names=task.label_names) for task in tasks]
    base = backbones[0].model
    heads = find_head(base, model_cfg.head_modules)
    routing = TaskRouting(tasks, mode, heads)
    for position, head in enumerate(heads):
        copies = {task.name: backbone.model.get_submodule(head) for task, backbone in zip(tasks, backbones)}
        parent_name, _, child = head.rpartition(".")
        setattr(base.get_submodule(parent_name), child, TaskHeads(copies, routing, pads=position == len(heads) - 1))
    model = apply_strategy(base, strategy, head_modules=heads, pooling=model_cfg.pooling,
                           batchnorm=model_cfg.batchnorm, heads_apart=True, **options)
    if mode == "separate":
        _one_adapter_per_task(model, [task.name for task in tasks], heads)
    for task in tasks:
        if task.frozen:
            for param in task_parameters(model, routing, task.name):
                param.requires_grad_(False)
    model.peftlab_tasks = routing
    model.register_forward_pre_hook(_route_pre_hook, with_kwargs=True)
    model.register_forward_hook(_loss_hook, with_kwargs=True)
    if extend is not None:
        from peftlab.runs import MODEL_SUBDIR
        from peftlab.saving import load_multitask_weights

        load_multitask_weights(model, extend.run_dir / MODEL_SUBDIR, [task.name for task in extend.tasks])
    return model, backbones[0]


def _one_adapter_per_task(model: nn.Module, names: list[str], heads: Sequence[str]) -> None:
    """Replace the strategy's one peft adapter (`default`) by one per task, configured alike; all of them train."""
    _check_adapter_names(model, names, heads)
    config = model.peft_config["default"]
    layers = _adapter_layer_names(model)
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    for name in names:
        model.add_adapter(name, copy.deepcopy(config))
    activate_adapter(model, names[0])  # before deleting `default`, which peft would warn was active
    model.delete_adapter("default")
    per_task = {_rename_adapter(name, layers, task) for name in trainable for task in names}
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable or name in per_task)


def _check_adapter_names(model: nn.Module, names: list[str], heads: Sequence[str]) -> None:
    """Refuse, in one line, a task named like a part of the model's weight names (`value`, `dense`, `weight`): peft
    tells adapters apart by `.<name>.` in a weight's key, so saving one task's adapter would drop every key holding
    another task's name, e.g. its LoRA on `attention.self.value` when a task is called `value`."""
    base_name = model.peftlab_strategy.record.base_name
    keys = [key for key in model.state_dict() if not is_in_modules(base_name(key) or key, heads)]
    for name in names:
        clash = next((key for key in keys if name in key.split(".")), None)
        if clash is not None:
            raise PeftlabError(f"task name {name!r} is also part of the model's weight names ({clash}), which peft "
                               f"would confuse with the task's adapter when saving; rename the task, e.g. "
                               f"{name}_task")


def _adapter_layer_names(model: nn.Module) -> set[str]:
    """The attribute names under which peft's tuner layers keep one module or tensor per adapter (`lora_A`, ...)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {name for module in model.modules() if isinstance(module, BaseTunerLayer)
            for name in (*module.adapter_layer_names, *module.other_param_names)}


def _rename_adapter(param_name: str, layers: set[str], new: str) -> str:
    """A peft parameter name (`...lora_A.<adapter>.weight`) with its adapter component renamed to `new`."""
    parts = param_name.split(".")
    for index in range(len(parts) - 1):
        if parts[index] in layers:
            return ".".join(parts[:index + 1] + [new] + parts[index + 2:])
    return param_name


def adapter_of(param_name: str, layers: set[str], names: Sequence[str]) -> Optional[str]:
    """The task whose peft adapter a parameter belongs to (the component after a tuner layer's name), or None."""
    parts = param_name.split(".")
    return next((parts[index + 1] for index in range(len(parts) - 1)
                 if parts[index] in layers and parts[index + 1] in names), None)


def task_parameters(model: nn.Module, routing: TaskRouting, name: str) -> list[nn.Parameter]:
    """Task `name`'s own parameters: its head copies and, in mode `separate`, its adapter."""
    own, layers = [], _adapter_layer_names(model)
    for param_name, param in model.named_parameters():
        in_head = f".heads.{name}." in param_name
        in_adapter = routing.mode == "separate" and adapter_of(param_name, layers, [name]) == name
        if in_head or in_adapter:
            own.append(param)
    return own


def activate_adapter(model: nn.Module, name: str) -> None:
    """Make task `name`'s adapter the one peft runs, leaving every parameter's `requires_grad` as it was (peft's
    `set_adapter` would freeze the other adapters, which are still what trains)."""
    if model.active_adapter == name:
        return
    flags = [(param, param.requires_grad) for param in model.parameters()]
    model.set_adapter(name)
    for param, flag in flags:
        param.requires_grad_(flag)


def _route_pre_hook(model: nn.Module, args, kwargs):
    routing: TaskRouting = model.peftlab_tasks
    task_ids = kwargs.pop(TASK_IDS, None)
    if task_ids is None:
        raise PeftlabError(f"this multi-task model needs `{TASK_IDS}` with every batch (each example's task index "
                           f"among {', '.join(routing.names)}); peftlab.load(run).predict(texts, task=...) adds them")
    routing.task_ids = task_ids = torch.as_tensor(task_ids)
    routing.labels = kwargs.pop("labels", None)  # the loss is the tasks' own (_loss_hook)
    if routing.mode == "separate":
        present = task_ids.unique().tolist()
        if len(present) == 1:
            activate_adapter(model, routing.names[present[0]])
        elif model.training:
            raise ValueError("a multi-task training batch must hold one task (peft routes mixed batches at "
                             "inference only)")
        else:
            kwargs["adapter_names"] = [routing.names[task] for task in task_ids.tolist()]
    return args, kwargs


def _loss_hook(model: nn.Module, args, kwargs, output):
    routing: TaskRouting = model.peftlab_tasks
    labels, routing.labels = routing.labels, None
    if labels is not None:
        output["loss"] = task_loss(output.logits, labels, routing.task_ids, routing.class_weights)
    return output


def task_parameter_counts(model: nn.Module) -> dict[str, dict[str, int]]:
    """Per task, its own trained parameters: {"adapter": N (mode separate), "head": N}; plus {"shared": {"adapter":
    N}} for what every task uses (the shared adapter in mode shared, 0 in mode separate)."""
    routing: TaskRouting = model.peftlab_tasks
    counts = {name: {"adapter": 0, "head": 0} for name in routing.names}
    shared, layers = 0, _adapter_layer_names(model)
    for param_name, param in model.named_parameters():
        head_task = next((name for name in routing.names if f".heads.{name}." in param_name), None)
        adapter_task = adapter_of(param_name, layers, routing.names) if routing.mode == "separate" else None
        if head_task is not None:
            counts[head_task]["head"] += param.numel()
        elif adapter_task is not None:
            counts[adapter_task]["adapter"] += param.numel()
        elif param.requires_grad:
            shared += param.numel()
    return {**counts, SHARED: {"adapter": shared}}


def head_state(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Task `name`'s head as a single-task model of the base names it (`classifier.weight`), contiguous, on CPU."""
    routing: TaskRouting = model.peftlab_tasks
    base_name = model.peftlab_strategy.record.base_name
    state = {}
    for param_name, tensor in model.state_dict().items():
        plain = base_name(param_name)
        marker = f".heads.{name}."
        if plain is not None and marker in plain and is_in_modules(plain, routing.head_modules):
            state[plain.replace(marker, ".")] = tensor.detach().to("cpu").contiguous()
    return state


def load_head_state(model: nn.Module, name: str, state: dict[str, torch.Tensor]) -> None:
    """Copy a `head_state` into task `name`'s head copies (exact shapes required)."""
    current = head_state(model, name)
    if set(state) != set(current):
        raise PeftlabError(f"the saved head of task {name!r} does not fit this base (saved {sorted(state)[:3]}, "
                           f"expected {sorted(current)[:3]}); load it onto the backbone it was trained on")
    routing: TaskRouting = model.peftlab_tasks
    targets = {}
    for head in routing.head_modules:
        module = _unwrapped(model).get_submodule(head)
        for key, tensor in module.heads[name].state_dict(keep_vars=True).items():
            targets[f"{head}.{key}"] = tensor
    with torch.no_grad():
        for key, tensor in state.items():
            targets[key].copy_(tensor)


def _unwrapped(model: nn.Module) -> nn.Module:
    """The transformers (or plain torch) model inside a peft wrapper, where the head modules sit."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if get_base is not None else model


def check_one_process(accelerator, model: nn.Module) -> None:
    """Refuse in one line what a multi-task run cannot do yet: several processes (each would draw a batch of another
    task, so DDP would reduce gradients of adapters and heads that other processes never ran), and say that the
    frozen-feature cache does not apply (the heads differ per batch; the frozen backbone runs every step)."""
    if accelerator.num_processes > 1:
        raise PeftlabError(f"multi-task runs train in one process for now ({accelerator.num_processes} launched); "
                           f"launch with `python` or `accelerate launch --num_processes 1`")
    if model.peftlab_strategy.record.caches_frozen_features:
        accelerator.print("train.cache_frozen_features does not apply to multi-task runs: the frozen backbone runs at "
                          "every step")


def resolve_task_rules(cfg, task_cfg, data, *, model: nn.Module, tokenizer=None, length_limit=None):
    """`peftlab.data_rules.resolve_data_rules` for one task: its own `auto` length, class weights and metric, written
    into `task_cfg` (data.max_length, metric) as a single-task run writes them into its config, and the metric and
    class weights into the model's task (its loss)."""
    from types import SimpleNamespace

    from peftlab.data_rules import resolve_data_rules

    view = SimpleNamespace(data=task_cfg.data, train=dataclasses.replace(cfg.train, metric_for_best=task_cfg.metric))
    rules = resolve_data_rules(view, data, tokenizer=tokenizer, length_limit=length_limit)
    task_cfg.metric = view.train.metric_for_best
    routing: TaskRouting = model.peftlab_tasks
    task = routing.tasks[routing.index(task_cfg.name)]
    task.metric, task.max_length = task_cfg.metric, task_cfg.data.max_length if tokenizer is not None else None
    routing.set_class_weights(task_cfg.name, rules.class_weights)
    return rules
