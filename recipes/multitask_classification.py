"""Fine-tune several classification tasks on one frozen base: a head per task, one LoRA adapter per task
(multitask.mode=separate) or one adapter shared by all (shared), batches sampled across tasks.

Text tasks on a text backbone, or image tasks on an image backbone: the base decides (its tasks' data load as the
single-task recipe of that kind loads them). Image tasks share the run's data.image_size (a mixed batch is one tensor).
Default (no arguments): LoRA per task on the packaged all-MiniLM-L6-v2 over Rotten Tomatoes sentiment and Reuters-R8
topics (prepare R8 once with `python benchmarks/data/reuters_r52.py --subset r8 benchmarks/data/r8`).
    accelerate launch recipes/multitask_classification.py
    python recipes/multitask_classification.py --config recipes/configs/minilm_multitask.yaml \
        "multitask.tasks=[{name: reviews, data: {name: reviews.csv}}, {name: topics, data: {name: news.csv}}]"
    python recipes/multitask_classification.py multitask.mode=shared strategy=adapter       # hard parameter sharing
    python recipes/multitask_classification.py multitask.extend=outputs/minilm_multitask \
        "multitask.tasks=[{name: spam, data: {name: spam.csv}}]" output_dir=outputs/minilm_multitask_plus_spam
    python recipes/multitask_classification.py --config recipes/configs/efficientnet_lite0_multitask.yaml  # images

multitask.extend adds tasks to a finished run of the same mode, its heads loaded and frozen. Mode separate: its
adapters too, so its tasks neither train nor evaluate (their metrics are carried over). Mode shared: the shared
adapter trains on, on the new tasks only, so with a shared adapter every task is evaluated (its data from the earlier
run's config.yaml) and the best checkpoint is chosen on the mean over all of them; metrics.json's `forgetting` gives
each earlier task's accuracy and own metric before and after.
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate.utils import set_seed

from peftlab import count_parameters
from peftlab.backbones import backbone_task, check_image_size, check_max_length, position_limit
from peftlab.cli import run_cli
from peftlab.config import RecipeConfig
from peftlab.data import load_data, tokenize_dataset
from peftlab.data.tasks import make_task_image_dataloader, make_task_text_dataloader
from peftlab.data.transforms import build_image_transform, image_processor
from peftlab.errors import PeftlabError
from peftlab.learning_rates import rate_groups
from peftlab.metrics import TASKS_MEAN, multitask_scalar_metrics, per_task_metrics
from peftlab.multitask import (build_multitask_model, check_one_process, read_earlier_run, resolve_task_rules,
                               tasks_to_train)
from peftlab.phases import PhaseTimer
from peftlab.runs import check_before_loading, prepare_output_dir, save_multitask_run, score_test
from peftlab.training import build_accelerator, train

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "minilm_multitask.yaml"


def main(cfg: RecipeConfig) -> dict:
    check_before_loading(cfg, multitask=True)  # output folder, precision, trackers: fail in milliseconds
    phases = PhaseTimer()

    # Data: each task's train/validation/test splits, loaded as a single-task run loads its `data` (texts or images,
    # as the base takes); extending a run of mode shared, its tasks' too, as its config.yaml names them (they are
    # evaluated again).
    kind = backbone_task(cfg.model)
    earlier = read_earlier_run(cfg)  # multitask.extend, checked before any data loads
    task_cfgs = (earlier.evaluated if earlier else []) + cfg.multitask.tasks
    if kind == "image":
        check_one_image_size(cfg, task_cfgs)
    data = {task.name: load_data(task.data, task=kind) for task in task_cfgs}
    phases.lap("data")

    # One base, a head per task (and an adapter per task in mode separate); the tasks of an earlier run
    # (multitask.extend) come first, loaded and frozen. Seeded first: the heads and LoRA's A matrices draw from it.
    set_seed(cfg.train.seed)
    tasks = tasks_to_train(cfg, {name: split.label_names for name, split in data.items()}, earlier)
    model, backbone = build_multitask_model(cfg.model, kind, tasks, cfg.strategy,
                                            cfg.strategy_options.get(cfg.strategy, {}), mode=cfg.multitask.mode,
                                            extend=earlier)
    # `auto` length, class weights and metric per task, from its own data (peftlab.data_rules).
    rules = {}
    for task_cfg in cfg.multitask.tasks:
        if kind == "text":
            check_max_length(backbone, task_cfg.data.max_length)
            rules[task_cfg.name] = resolve_task_rules(cfg, task_cfg, data[task_cfg.name], model=model,
                                                      tokenizer=backbone.tokenizer,
                                                      length_limit=position_limit(backbone))
        else:
            rules[task_cfg.name] = resolve_task_rules(cfg, task_cfg, data[task_cfg.name], model=model)
    if kind == "image":  # a base that takes only its native size (ViT) fails now, in one line
        check_image_size(backbone, cfg.data.image_size, model=model, task_ids=torch.zeros(1, dtype=torch.long))
    if cfg.train.metric_for_best == "auto":
        cfg.train.metric_for_best = TASKS_MEAN  # the mean of each task's own metric picks the best checkpoint
    counts = count_parameters(model)
    rate_groups(model, cfg.train)

    accelerator = build_accelerator(cfg.train, cfg.output_dir, model=model)
    check_one_process(accelerator, model)  # one task per batch per process: DDP's gradients would not line up
    output_dir = prepare_output_dir(cfg, accelerator)
    accelerator.print(f"{cfg.strategy} on {cfg.model.name}, {len(tasks)} tasks ({cfg.multitask.mode}): {counts}")
    for task_cfg in cfg.multitask.tasks:
        accelerator.print("\n".join(f"{task_cfg.name}: {line}" for line in rules[task_cfg.name].describe()))
    phases.lap("model")

    # Each batch holds one task's examples and their `task_ids`; the sampler picks the task (peftlab.data.tasks).
    # An extended run's earlier tasks do not train; they are evaluated only in mode shared, the one whose shared
    # adapter trains on (in mode separate their outputs cannot change).
    trained, evaluated = [task for task in tasks if not task.frozen], [task for task in tasks if task.name in data]
    trained_ids, evaluated_ids = [tasks.index(task) for task in trained], [tasks.index(task) for task in evaluated]
    sampling = dict(sampling=cfg.multitask.sampling, temperature=cfg.multitask.temperature, seed=cfg.train.seed)
    if kind == "text":
        with accelerator.main_process_first():
            splits = {task.name: tokenize_dataset(data[task.name].splits, backbone.tokenizer, task.data.max_length)
                      for task in task_cfgs}
        train_loader = make_task_text_dataloader([splits[task.name]["train"] for task in trained], backbone.tokenizer,
                                                 cfg.train.batch_size, shuffle=True, **sampling,
                                                 group_by_length=cfg.train.group_by_length, task_ids=trained_ids)
        eval_loaders = {split: make_task_text_dataloader([splits[task.name][split] for task in evaluated],
                                                         backbone.tokenizer, cfg.train.eval_batch_size, shuffle=False,
                                                         group_by_length=cfg.train.group_by_length,
                                                         task_ids=evaluated_ids)
                        for split in ("validation", "test")}
        preprocessor = backbone.tokenizer
    else:
        # Every image resized to the run's data.image_size and normalised with the backbone's statistics; each
        # trained task's images augmented as its data.augment says (a transform per task, seeded apart), evaluation
        # deterministic and the same for every task.
        augments = {task.name: task.data.augment for task in cfg.multitask.tasks}
        train_transforms = [build_image_transform(cfg.data.image_size, backbone.image_mean, backbone.image_std,
                                                  train=True, augment=augments[task.name],
                                                  seed=cfg.train.seed + tasks.index(task)) for task in trained]
        eval_transform = build_image_transform(cfg.data.image_size, backbone.image_mean, backbone.image_std,
                                               train=False)
        splits = {name: data[name].splits for name in data}
        train_loader = make_task_image_dataloader([splits[task.name]["train"] for task in trained], train_transforms,
                                                  cfg.train.batch_size, shuffle=True, **sampling, task_ids=trained_ids)
        eval_loaders = {split: make_task_image_dataloader([splits[task.name][split] for task in evaluated],
                                                          [eval_transform] * len(evaluated),
                                                          cfg.train.eval_batch_size, shuffle=False,
                                                          task_ids=evaluated_ids)
                        for split in ("validation", "test")}
        preprocessor = image_processor(eval_transform)
    phases.lap("data")

    def compute_metrics(predictions, references, task_ids):
        return multitask_scalar_metrics(per_task_metrics(predictions, references, task_ids, tasks), tasks)

    result = train(model, accelerator=accelerator, train_cfg=cfg.train, train_loader=train_loader,
                   eval_loader=eval_loaders["validation"], compute_metrics=compute_metrics, output_dir=output_dir,
                   resume_from=cfg.resume_from)  # per-task class weights are in the model's own loss
    test = score_test(model, eval_loaders["test"], accelerator, phases)
    return save_multitask_run(cfg, kind, accelerator=accelerator, model=model, result=result, test=test,
                              tasks=tasks, rules=rules, counts=counts, preprocessor=preprocessor,
                              output_dir=output_dir, phases=phases, earlier=earlier,
                              train_examples={task.name: len(splits[task.name]["train"]) for task in trained})


def check_one_image_size(cfg: RecipeConfig, task_cfgs) -> None:
    """Image tasks share the run's data.image_size: a batch mixing tasks, as the server routes them, is one tensor."""
    for task in task_cfgs:
        if task.data.image_size != cfg.data.image_size:
            raise PeftlabError(f"task {task.name!r} sets data.image_size={task.data.image_size} and the run "
                               f"{cfg.data.image_size}; image tasks share one size (a batch of mixed tasks is one "
                               f"tensor): set data.image_size once, at the top level")


if __name__ == "__main__":
    run_cli(main, default_config=str(DEFAULT_CONFIG))
