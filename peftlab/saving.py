"""Save only what trained, load it onto a freshly loaded base, and merge where the strategy folds exactly.

How is the strategy's record's business (`peftlab.strategies.registry.SaveFormat` and `Merge`). Files in a saved folder:
- `peftlab_strategy.json`: strategy name, options, head modules and pooling, to rebuild the same model.
- PEFT_ADAPTER (lora and peft's other methods): peft's own `adapter_config.json` + `adapter_model.safetensors`
  (`peft.PeftModel.from_pretrained` loads it).
- WHOLE_MODEL (full): the whole model via `save_pretrained` (safetensors; plain `from_pretrained` loads it).
- TRAINED_TENSORS (the others): `peftlab_trainable.safetensors` with only the trained tensors (head, adapters, biases,
  blocks).
A multi-task model (`save_multitask`) adds a folder per task holding its head (and its adapter, one per task).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from peftlab.backbones.layout import store_convolutions_channels_last
from peftlab.errors import PeftlabError
from peftlab.heads import is_in_modules
from peftlab.pooling import apply_mean_pooling
from peftlab.strategies import AppliedStrategy, Merge, SaveFormat, applied_strategy, apply_strategy

STRATEGY_FILE = "peftlab_strategy.json"
TRAINABLE_FILE = "peftlab_trainable.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
HEAD_FILE = "head.safetensors"
"""A multi-task run's head of one task, in `model/<task>/`."""


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained tensors, plus the buffers (batch-norm statistics) of modules that train; contiguous, on CPU."""
    state = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    for module_name, module in model.named_modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            prefix = f"{module_name}." if module_name else ""
            state.update({prefix + n: b.detach() for n, b in module.named_buffers(recurse=False)})
    return {n: t.to("cpu").contiguous() for n, t in state.items()}


def save_trained(model: nn.Module, output_dir: str | Path, base_name: str | None = None,
                 task: str | None = None) -> Path:
    """Write what trained, in its strategy's save format (see module docstring), plus the strategy spec.

    Args:
        base_name: what a peft adapter names as its base (`base_model_name_or_path`): a Hub id or a path that loads
            on other machines; default: the path the base was loaded from on this one.
        task: `text` records peft's `task_type` SEQ_CLS, so peft loads the adapter as a sequence classifier (peft has
            no task type for image classification).
    """
    applied = applied_strategy(model)
    record = applied.record
    save_format = record.save_format
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if save_format is SaveFormat.PEFT_ADAPTER:
        if record.save_adapter is not None:
            record.save_adapter(model, output_dir)
        else:
            model.save_pretrained(output_dir)
        portable_adapter_config(output_dir / ADAPTER_CONFIG_FILE, base_name, task)
    elif save_format is SaveFormat.WHOLE_MODEL and hasattr(model, "save_pretrained"):
        model.save_pretrained(output_dir)
    else:
        save_file(trainable_state_dict(model), output_dir / TRAINABLE_FILE)
    (output_dir / STRATEGY_FILE).write_text(json.dumps(applied.to_json(), indent=2) + "\n")
    return output_dir


def portable_adapter_config(config_path: Path, base_name: str | None, task: str | None) -> None:
    """Rewrite a saved peft `adapter_config.json` with the base's portable name and, for text, task type SEQ_CLS."""
    # Written into the saved file only: peft's save looks the base up by this name (on the Hub, for a Hub id).
    adapter_config = json.loads(config_path.read_text())
    adapter_config["base_model_name_or_path"] = base_name or adapter_config["base_model_name_or_path"]
    adapter_config["task_type"] = "SEQ_CLS" if task == "text" else adapter_config["task_type"]
    config_path.write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")


def save_multitask(model: nn.Module, output_dir: str | Path, base_name: str | None = None,
                   task: str | None = None) -> Path:
    """Write a multi-task model (`peftlab.multitask`): each task's head as `<task>/head.safetensors` (named as a
    single-task model of the base names its head); with one adapter per task, peft's files of each in `<task>/`
    (peft's own layout for several adapters); with a shared body, that body at the folder's root in its strategy's
    format (a peft adapter, or the trained tensors without the heads); and the strategy spec. Arguments as for
    `save_trained` (`task` is recorded in multitask.json, not as peft's task type: the heads are not in the
    adapters)."""
    from peftlab.multitask import head_state

    routing, applied = model.peftlab_tasks, applied_strategy(model)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for name in routing.names:
        (output_dir / name).mkdir(exist_ok=True)
        save_file(head_state(model, name), output_dir / name / HEAD_FILE)
    if applied.record.save_format is SaveFormat.PEFT_ADAPTER:
        model.save_pretrained(output_dir)  # every adapter but one named `default` goes into a folder of its name
        for config_path in output_dir.glob(f"**/{ADAPTER_CONFIG_FILE}"):
            # No task type: peft would then expect the head inside the adapter (its SEQ_CLS modules_to_save).
            portable_adapter_config(config_path, base_name, task=None)
        for card in output_dir.glob("**/README.md"):  # peft's empty card templates
            card.unlink()
    else:
        base = applied.record.base_name
        state = {name: tensor for name, tensor in trainable_state_dict(model).items()
                 if not is_in_modules(base(name) or name, routing.head_modules)}
        save_file(state, output_dir / TRAINABLE_FILE)
    (output_dir / STRATEGY_FILE).write_text(json.dumps(applied.to_json(), indent=2) + "\n")
    return output_dir


def load_multitask_weights(model: nn.Module, saved_dir: str | Path, tasks: list[str]) -> None:
    """Load the heads (and adapters, or shared body) of `tasks` from a `save_multitask` folder into a multi-task model
    built the same way (`peftlab.multitask.build_multitask_model`)."""
    from peftlab.multitask import load_head_state

    saved_dir, routing = Path(saved_dir), model.peftlab_tasks
    for name in tasks:
        load_head_state(model, name, load_file(saved_dir / name / HEAD_FILE))
    if applied_strategy(model).record.save_format is SaveFormat.PEFT_ADAPTER:
        from peft import set_peft_model_state_dict

        folders = {name: saved_dir / name for name in tasks} if routing.mode == "separate" else \
            {"default": saved_dir}
        for adapter, folder in folders.items():
            result = set_peft_model_state_dict(model, load_file(folder / "adapter_model.safetensors"),
                                               adapter_name=adapter)
            if result.unexpected_keys:
                raise PeftlabError(f"the adapter in {folder} does not fit this base (unexpected "
                                   f"{result.unexpected_keys[:3]}); load it onto the backbone it was trained on")
        return
    weights = saved_dir / TRAINABLE_FILE
    state, expected = load_file(weights), set(trainable_state_dict(model))
    base = applied_strategy(model).record.base_name
    expected = {name for name in expected if not is_in_modules(base(name) or name, routing.head_modules)}
    if set(state) != expected:
        missing, unexpected = sorted(expected - set(state))[:3], sorted(set(state) - expected)[:3]
        raise PeftlabError(f"{weights} does not fit this base model (missing {missing}, unexpected {unexpected}); "
                           "load it onto the same backbone it was trained from")
    model.load_state_dict(state, strict=False)


def read_strategy(saved_dir: str | Path) -> AppliedStrategy:
    """The strategy spec of a saved folder."""
    path = Path(saved_dir) / STRATEGY_FILE
    if not path.is_file():
        raise PeftlabError(f"{saved_dir} holds no {STRATEGY_FILE}; point to a folder written by peftlab")
    return AppliedStrategy.from_json(json.loads(path.read_text()))


def load_trained(base_model: nn.Module, saved_dir: str | Path) -> nn.Module:
    """Rebuild the adapted model on a freshly loaded `base_model` and load the saved tensors into it."""
    saved_dir = Path(saved_dir)
    spec = read_strategy(saved_dir)
    save_format = spec.record.save_format
    if save_format is SaveFormat.PEFT_ADAPTER:
        from peft import PeftModel

        if spec.pooling == "mean":
            apply_mean_pooling(base_model)
        if spec.record.prepare_base is not None:
            spec.record.prepare_base(base_model)
        model = PeftModel.from_pretrained(base_model, saved_dir)
        model.peftlab_strategy = spec
        return model
    if save_format is SaveFormat.WHOLE_MODEL and not (saved_dir / TRAINABLE_FILE).is_file():
        # A whole model written by save_pretrained: its own loader knows its on-disk names (transformers 5
        # may rename weights on save), so reload through it rather than through load_state_dict.
        base_model = type(base_model).from_pretrained(saved_dir)
        store_convolutions_channels_last(base_model)  # the layout it trained in: the same predictions to the bit
        return apply_strategy(base_model, spec.name, head_modules=spec.head_modules, pooling=spec.pooling,
                              **spec.options)
    model = apply_strategy(base_model, spec.name, head_modules=spec.head_modules, pooling=spec.pooling, **spec.options)
    weights = saved_dir / TRAINABLE_FILE
    state = load_file(weights)
    expected = set(trainable_state_dict(model))
    if set(state) != expected:
        missing, unexpected = sorted(expected - set(state))[:3], sorted(set(state) - expected)[:3]
        raise PeftlabError(f"{weights} does not fit this base model (missing {missing}, unexpected {unexpected}); "
                           "load it onto the same backbone it was trained from")
    model.load_state_dict(state, strict=False)
    return model


def merge(model: nn.Module) -> nn.Module:
    """A plain model that `save_pretrained`/`from_pretrained` handle, as the strategy's record says (`Merge`).

    FOLD (lora, peft's tuners) folds the update into the base weights; PLAIN strategies (full, head, partial, bitfit)
    already are plain models and come back as they are, as does a model that is no longer adapted (merged before, or
    never adapted); NOT_FOLDABLE (adapter, prompt learning) is refused in one line.
    """
    applied = getattr(model, "peftlab_strategy", None)
    if applied is None:
        return model
    if applied.pooling == "mean":
        raise PeftlabError("pooling=mean is a peftlab hook, not part of the transformers architecture, so a merged "
                           "model would pool differently; load it with load_trained instead")
    record = applied.record
    if record.merge is Merge.NOT_FOLDABLE:
        raise PeftlabError(f"strategy {record.name!r} cannot merge: {record.cannot_merge_because}")
    return fold(model)


def fold(model: nn.Module) -> nn.Module:
    """The same function with every update that folds exactly (Merge.FOLD) folded into the base weights; the rest
    (PLAIN models, NOT_FOLDABLE adapters, hooks such as mean pooling) kept as it is.

    `merge` is this plus the refusals that make its result loadable by `from_pretrained`; an ONNX export
    (`peftlab.export`) needs only the function, so it folds and keeps the rest in the graph.
    """
    applied = getattr(model, "peftlab_strategy", None)
    if applied is None or applied.record.merge is not Merge.FOLD:
        return model
    unwrap_trained_heads(model)
    merged = model.merge_and_unload()
    merged.__dict__.pop("peftlab_strategy", None)
    return merged


def unwrap_trained_heads(model: nn.Module) -> None:
    """Put each head peft trains as `modules_to_save` in its wrapper's place, as peft's own unloading does. Done
    before `merge_and_unload`, whose generic version (every tuner but LoRA's) fails on a head of several modules
    (RoBERTa's dense + out_proj): peft 0.21 copies the wrapper's `.weight`, which such a head has not."""
    from peft.utils import ModulesToSaveWrapper

    for name, module in list(model.named_modules()):
        if isinstance(module, ModulesToSaveWrapper):
            parent_name, _, child_name = name.rpartition(".")
            head = module.unload_and_optionally_merge_module(merge=True, safe_merge=False, adapter_names=None)
            setattr(model.get_submodule(parent_name), child_name, head)
