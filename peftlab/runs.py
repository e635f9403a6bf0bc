"""A run's outputs: check and open its folder (peftlab.run_folder), then write weights, metrics, config and model card.

Layout of `output_dir`:
    config.yaml        the resolved config (what `predict` rebuilds the model from)
    metrics.json       validation and test metrics, parameter counts, train time, throughput, peak memory
    log.jsonl          the training log (plus TensorBoard event files under the tracker folders)
    README.md          the model card (peftlab.model_card): results, and how to load it with or without peftlab
    validation_predictions.csv, test_predictions.csv
                       per example (in split order): index, label, prediction, one probability column per class
                       (`p_<class>`); validation from the best evaluation (cross-validation's out-of-fold predictions)
    model/             what trained, in the strategy's save format (peftlab.saving): a peft adapter for LoRA, the
                       whole model for full, else the trained tensors; a multi-task run's adds a folder per task
                       (its head, and its adapter in mode separate) and multitask.json
    checkpoints/       resumable checkpoints (latest and best)
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any, Optional

import torch

from peftlab import run_folder
from peftlab.backbones import TorchImageClassifier, portable_name
from peftlab.checkpointing import plain_module
from peftlab.config import RecipeConfig, save_config
from peftlab.data_rules import DataRules
from peftlab.errors import PeftlabError
from peftlab.model_card import model_card
from peftlab.params import ParameterCount
from peftlab.phases import PhaseTimer
from peftlab.run_folder import FolderState
from peftlab.saving import save_trained

MODEL_SUBDIR = "model"
METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.yaml"
TASK_FILE = "task.json"
MULTITASK_FILE = "multitask.json"
"""A multi-task run's model/ (in place of TASK_FILE): {"task": "text", "mode": "separate"|"shared", "tasks": [{"name",
"label_names", "metric", "max_length"}, ...]} in task order, the order of the task ids."""
PREDICTIONS_FILES = {"validation": "validation_predictions.csv", "test": "test_predictions.csv"}


def check_output_dir(cfg: RecipeConfig) -> FolderState:
    """What this run may do with `cfg.output_dir` (see peftlab.run_folder); raises PeftlabError, writes nothing."""
    return run_folder.check_output_dir(cfg.output_dir, resume_from=cfg.resume_from, overwrite=cfg.overwrite)


def check_before_loading(cfg: RecipeConfig, multitask: bool = False) -> None:
    """Everything about a run that can be rejected in milliseconds: output folder, precision, compiler, trackers,
    metric, and whether the recipe trains a task list (`multitask`: recipes/multitask_classification.py) or one task."""
    from peftlab.metrics import check_metric_for_best
    from peftlab.tracking import build_trackers
    from peftlab.training import check_compile, resolve_mixed_precision

    if bool(cfg.multitask.tasks) != multitask:
        raise PeftlabError("this recipe trains one task on `data`, and multitask.tasks lists several; run "
                           "recipes/multitask_classification.py" if not multitask else
                           "this recipe trains the tasks of multitask.tasks, and the list is empty; name the tasks "
                           "(multitask.tasks=[{name: ..., data: {name: ...}}, ...]) or run a single-task recipe")
    if os.environ.get("RANK", "0") == "0":  # other ranks: the main process decides in prepare_output_dir and tells them
        check_output_dir(cfg)
    resolve_mixed_precision(cfg.train.mixed_precision)
    check_compile(cfg.train.compile)
    build_trackers(cfg.train.trackers, cfg.output_dir)  # side-effect free: trackers start later
    check_metric_for_best(cfg.train.metric_for_best, multitask)


def prepare_output_dir(cfg: RecipeConfig, accelerator=None) -> Path:
    """Create, lock and mark `cfg.output_dir` on the main process; every process of the run gets its path or error.

    Call it after everything that can fail on bad input, so a rejected run writes nothing. Takes the run's own
    Accelerator: a bare `PartialState()` made here, before the Accelerator, would set up single-process state
    and turn a multi-process CPU launch into independent copies of the run. Without an Accelerator (a script that
    trains through another library, e.g. the Trainer baseline) the process is taken as the only one.

    Every process must see the main process's folder: each writes its RNG state into the checkpoints and loads the
    best weights back from them, so machines of a multi-machine run need `output_dir` on storage they share.
    """
    from accelerate.utils import broadcast_object_list, gather_object

    shared = [None, None]  # the main process's error, or its marker as it wrote it
    if accelerator is None or accelerator.is_main_process:
        try:
            run_folder.open_run_folder(check_output_dir(cfg))  # checked again: the folder may have changed since
            shared[1] = run_folder.read_marker(cfg.output_dir)
        except PeftlabError as err:
            shared[0] = str(err)
    if accelerator is not None and accelerator.num_processes > 1:
        broadcast_object_list(shared)  # the other ranks stop with the main process's message
    if shared[0] is not None:
        raise PeftlabError(shared[0])
    if accelerator is not None and accelerator.num_processes > 1:
        sees = run_folder.read_marker(cfg.output_dir) == shared[1]
        blind = [rank for rank, ok in enumerate(gather_object([sees])) if not ok]
        if blind:  # every process raises, or the main one would wait for the others in its first collective
            raise PeftlabError(
                f"output_dir {cfg.output_dir} is another folder on process {', '.join(map(str, blind))} than on "
                "the main process (each machine's own disk?): put output_dir on storage every machine shares, e.g. "
                "an NFS mount at the same path on each")
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return Path(cfg.output_dir)


def score_test(model, test_loader, accelerator, phases: PhaseTimer):
    """Score the best weights once on the test split; returns a `peftlab.training.EvalOutput`.

    Call it inside the recipe's `frozen_feature_cache` with the cached test loader, so that the frozen backbone's
    features of the test split are extracted with the rest (and shared across cross-validation folds).
    """
    from peftlab.training import evaluate

    with phases.measure("test"):
        return evaluate(model, accelerator.prepare(test_loader), accelerator, lambda *outputs: {})


def save_run(cfg: RecipeConfig, task: str, *, accelerator, model, result, test, label_names: list[str],
             counts: ParameterCount, preprocessor, output_dir: Path, phases: PhaseTimer,
             data_rules: Optional[DataRules] = None) -> dict[str, Any]:
    """Write the run's outputs (weights, metrics.json with the test scores, predictions, config, model card) and mark
    the folder finished; returns metrics.json's content.

    Args:
        test: `score_test`'s evaluation of the best weights.
        phases: the recipe's timer (data, model, feature cache, test); train()'s phases are added to it.
        data_rules: what the recipe resolved from the data (length, class weights, selection metric), and why.
    """
    from peftlab.metrics import compute_classification_metrics

    test_metrics = compute_classification_metrics(test.predictions, test.references, label_names)
    metrics = {"validation": result.best_metrics, "test": test_metrics, **training_record(result, phases)}
    if data_rules is not None:
        metrics["data_rules"] = data_rules.record()
    accelerator.print(f"test accuracy {test_metrics['accuracy']:.4f}, macro-F1 {test_metrics['macro_f1']:.4f} "
                      f"({result.train_time_s:.0f} s, {result.samples_per_s:.1f} samples/s)")
    if accelerator.is_main_process:
        write_run_outputs(output_dir, cfg, task, plain_module(accelerator, model), preprocessor, metrics, counts,
                          label_names)
        for split, outputs in (("validation", result.best_evaluation), ("test", test)):
            if outputs is not None:
                write_predictions(Path(output_dir) / PREDICTIONS_FILES[split], outputs, label_names)
        run_folder.close_run_folder(output_dir, run_folder.FINISHED)
    accelerator.end_training()
    return metrics


def training_record(result, phases: PhaseTimer) -> dict[str, Any]:
    """metrics.json's account of training (steps, time, throughput, memory, phases, rates), `train()`'s phases added
    to the recipe's timer."""
    for phase, seconds in result.phases_s.items():
        phases.add(phase, seconds)
    return {"best_step": result.best_step, "global_step": result.global_step, "stopped_early": result.stopped_early,
            "train_time_s": result.train_time_s, "samples_per_s": result.samples_per_s,
            "peak_memory_mb": result.peak_memory_mb, "phases_s": phases.as_dict(), "throughput": result.throughput,
            "param_groups": result.param_groups,
            "num_processes": result.num_processes,  # over all machines: the run's world size
            "mixed_precision": result.mixed_precision,  # what train.mixed_precision=auto chose for this model here
            "cpu_threads": torch.get_num_threads()}  # per process, as build_accelerator set it


def save_multitask_run(cfg: RecipeConfig, kind: str, *, accelerator, model, result, test, tasks,
                       rules: dict[str, DataRules], counts: ParameterCount, preprocessor, output_dir: Path,
                       phases: PhaseTimer, train_examples: dict[str, int], earlier=None) -> dict[str, Any]:
    """`save_run` for a multi-task run (recipes/multitask_classification.py): metrics.json's `validation` and `test`
    hold the means over the tasks evaluated (`tasks_mean` and each scalar metric) and `<task>/<metric>`; `tasks` holds
    each task's metrics, own parameters, data rules and share of the training batches; weights per
    `peftlab.saving.save_multitask`; predictions per task evaluated and split (`<split>_predictions_<task>.csv`).
    Extending a run of mode shared, each earlier task's entry also holds `before` (its validation and test scalars in
    that run), and a top-level `forgetting` says per earlier task how its accuracy and own metric moved
    (peftlab.metrics.forgetting).

    Args:
        tasks: the model's `peftlab.multitask.TaskSpec`s, in task order.
        rules: each task's resolved data rules (tasks trained here).
        train_examples: training examples per task trained here.
        earlier: the `peftlab.multitask.EarlierRun` this run extends. Mode separate: its tasks' weights are unchanged,
            so their entries of its metrics.json are carried over; mode shared: they were evaluated again.
    """
    from peftlab.data.tasks import sampling_shares
    from peftlab.metrics import forgetting, multitask_scalar_metrics, per_task_metrics, scalar_metrics
    from peftlab.multitask import SHARED, task_parameter_counts

    per_task_test = per_task_metrics(test.predictions, test.references, test.task_ids, tasks)
    shares = dict(zip(train_examples, sampling_shares(list(train_examples.values()), cfg.multitask.sampling,
                                                      cfg.multitask.temperature)))
    own = task_parameter_counts(plain_module(accelerator, model))
    metrics = {"validation": result.best_metrics, "test": multitask_scalar_metrics(per_task_test, tasks),
               **training_record(result, phases)}
    metrics["tasks"], moved = {}, {}
    for task in tasks:
        scores = {"validation": {key.split("/", 1)[1]: value for key, value in result.best_metrics.items()
                                 if key.startswith(f"{task.name}/")}, "test": per_task_test.get(task.name)}
        if task.name in train_examples:
            record = {"metric": task.metric, "trained_in": str(output_dir), **scores,
                      "train_examples": train_examples[task.name], "batch_share": shares[task.name],
                      "data_rules": rules[task.name].record()}
        elif task.name in per_task_test:  # an earlier task under the shared adapter that trained on: scored again
            before = {split: scalar_metrics(earlier.metrics[task.name][split]) for split in ("validation", "test")}
            record = {**earlier.metrics[task.name], **scores, "before": before, "batch_share": None}
            moved[task.name] = forgetting(before, scores, task.metric)
        else:  # a task of the run this one extends: same weights, so the scores it recorded still hold
            record = {**earlier.metrics[task.name], "batch_share": None}
        metrics["tasks"][task.name] = {**record, "parameters": own[task.name]}
    if moved:
        metrics["forgetting"] = moved
    metrics["multitask"] = {"mode": cfg.multitask.mode, "sampling": cfg.multitask.sampling,
                            "temperature": cfg.multitask.temperature, "extends": cfg.multitask.extend,
                            "shared_parameters": own[SHARED]["adapter"]}
    accelerator.print("test " + ", ".join(f"{name} accuracy {results['accuracy']:.4f}"
                                          for name, results in per_task_test.items()) + f" ({result.train_time_s:.0f} s)")
    for name, splits in moved.items():
        accuracy = splits["test"]["accuracy"]
        accelerator.print(f"{name}: test accuracy {accuracy['before']:.3f} -> {accuracy['after']:.3f} "
                          f"({100 * accuracy['change']:+.1f} points) after training on {', '.join(train_examples)}")
    if accelerator.is_main_process:
        write_multitask_outputs(output_dir, cfg, kind, plain_module(accelerator, model), preprocessor, metrics,
                                counts, tasks)
        for split, outputs in (("validation", result.best_evaluation), ("test", test)):
            for index, task in enumerate(tasks if outputs is not None else []):
                rows = outputs.task_ids == index
                if not rows.any():  # a task of the run this one extends: its predictions are in that folder
                    continue
                own_outputs = outputs._replace(predictions=outputs.predictions[rows],
                                               references=outputs.references[rows],
                                               probabilities=outputs.probabilities[rows][:, :len(task.label_names)],
                                               task_ids=None)
                write_predictions(Path(output_dir) / f"{split}_predictions_{task.name}.csv", own_outputs,
                                  task.label_names)
        run_folder.close_run_folder(output_dir, run_folder.FINISHED)
    accelerator.end_training()
    return metrics


def write_multitask_outputs(output_dir: Path, cfg: RecipeConfig, kind: str, model, preprocessor,
                            metrics: dict[str, Any], counts: ParameterCount, tasks) -> None:
    """Save every task's head and adapter (peftlab.saving.save_multitask), the tokenizer, MULTITASK_FILE, the config,
    metrics.json and the model card."""
    from peftlab.model_card import multitask_card
    from peftlab.saving import save_multitask

    model_dir = Path(output_dir) / MODEL_SUBDIR
    save_multitask(model, model_dir, base_name=portable_name(cfg.model.name), task=kind)
    if preprocessor is not None and hasattr(preprocessor, "save_pretrained"):
        preprocessor.save_pretrained(model_dir)
    (model_dir / MULTITASK_FILE).write_text(json.dumps({
        "task": kind, "mode": cfg.multitask.mode,
        "tasks": [{"name": task.name, "label_names": task.label_names, "metric": task.metric,
                   "max_length": task.max_length} for task in tasks],
    }, indent=1) + "\n")
    metrics = write_metrics(output_dir, cfg, metrics, counts)
    (Path(output_dir) / "README.md").write_text(multitask_card(cfg, kind, metrics, counts, folder=str(output_dir)))


def write_run_outputs(output_dir: Path, cfg: RecipeConfig, task: str, model, preprocessor, metrics: dict[str, Any],
                      counts: ParameterCount, label_names: list[str]) -> None:
    """Save what trained (with its tokenizer or image settings), the config, metrics.json and a model card."""
    model_dir = Path(output_dir) / MODEL_SUBDIR
    save_trained(model, model_dir, base_name=portable_name(cfg.model.name), task=task)
    (model_dir / "README.md").unlink(missing_ok=True)  # peft's empty card template: the run's card replaces it
    if preprocessor is not None and hasattr(preprocessor, "save_pretrained"):
        preprocessor.save_pretrained(model_dir)
    (model_dir / TASK_FILE).write_text(json.dumps({"task": task, "label_names": label_names}) + "\n")
    metrics = write_metrics(output_dir, cfg, metrics, counts)
    plain_torch = any(isinstance(module, TorchImageClassifier) for module in model.modules())
    (Path(output_dir) / "README.md").write_text(model_card(cfg, task, metrics, counts, label_names, plain_torch,
                                                            folder=str(output_dir)))


def write_metrics(output_dir: Path, cfg: RecipeConfig, metrics: dict[str, Any],
                  counts: ParameterCount) -> dict[str, Any]:
    """Write config.yaml and metrics.json (`metrics` plus the parameter counts), what a benchmark record reads from
    any run: a recipe's or a harness job's (benchmarks/trainer_baseline.py, tfidf_baseline.py); returns its content."""
    save_config(cfg, Path(output_dir) / CONFIG_FILE)
    metrics = {**metrics, "parameters": counts.as_record()}
    (Path(output_dir) / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def write_predictions(path: Path, outputs, label_names: list[str]) -> Path:
    """One CSV row per example of a `peftlab.training.EvalOutput`, in its order: index, label and prediction (class
    names), then one probability column per class, `p_<class name>` (as `peftlab predict --output` names them)."""
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["index", "label", "prediction", *(f"p_{name}" for name in label_names)])
        for index, (label, prediction, probabilities) in enumerate(zip(outputs.references, outputs.predictions,
                                                                      outputs.probabilities)):
            writer.writerow([index, label_names[int(label)], label_names[int(prediction)],
                             *(f"{p:.6g}" for p in probabilities)])
    return path
