"""The usual loop, for comparison: `transformers.Trainer` (+ `peft` LoRA), fp32, on a recipe's config.

    python benchmarks/trainer_baseline.py --task text strategy=lora train.mixed_precision=no output_dir=runs/x
    python benchmarks/trainer_baseline.py --task image --config recipes/configs/x.yaml train.mixed_precision=no

A harness job (`trainer_text` / `trainer_image` in peftlab.harness.programs): it takes the recipe's config and
`key=value` overrides and leaves what a recipe run leaves for the record (config.yaml, metrics.json with phases_s,
model/), so the speed grids (benchmarks/grids/speed_*.yaml) pair it with the recipe on one config. What differs from
the recipe is what the usual loop does: texts padded to `data.max_length`, fp32, the whole model in train mode,
convolution weights in the usual layout (NCHW), Trainer's own evaluation and checkpointing each epoch, the best
epoch's weights loaded at the end.
Strategies: lora (r, alpha and dropout from strategy_options.lora, on the modules peftlab's lora finds, head trained
in full) and full. Same data splits, backbone, mean pooling and image transforms as the recipe.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from accelerate.utils import set_seed
from transformers import Trainer, TrainerCallback, TrainingArguments

from peftlab import PeftlabError, count_parameters, run_folder
from peftlab.cli import run_cli
from peftlab.config import RecipeConfig
from peftlab.heads import find_head
from peftlab.metrics import compute_classification_metrics, scalar_metrics
from peftlab.phases import PhaseTimer
from peftlab.runs import prepare_output_dir, write_metrics
from peftlab.training import cuda_in_use, peak_memory_mb

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIGS = {"text": ROOT / "recipes" / "configs" / "minilm_lora_rotten_tomatoes.yaml",
                   "image": ROOT / "recipes" / "configs" / "efficientnet_lite0_lora_animal_mnist.yaml"}


def main(cfg: RecipeConfig, task: str) -> dict:
    """Train and test with `transformers.Trainer`, then write config.yaml, metrics.json and model/ like a recipe."""
    if cfg.strategy not in ("lora", "full"):
        raise PeftlabError(f"the Trainer baseline runs strategy lora or full, not {cfg.strategy!r}")
    if cfg.train.mixed_precision != "no":
        raise PeftlabError("the Trainer baseline trains in fp32; set train.mixed_precision=no (its config records it)")
    phases = PhaseTimer()
    set_seed(cfg.train.seed)
    train_set, eval_set, test_set, backbone, label_names = load_sets(cfg, task, phases)
    model = backbone.model
    if cfg.strategy == "lora":
        from peft import LoraConfig, get_peft_model

        from peftlab.strategies.lora import find_lora_targets

        heads = find_head(model)  # the modules peftlab's lora strategy targets; the new head trains in full
        options = cfg.strategy_options.get("lora", {})
        model = get_peft_model(model, LoraConfig(
            r=options.get("r", 8), lora_alpha=options.get("alpha", 16), lora_dropout=options.get("dropout", 0.0),
            target_modules=find_lora_targets(model, heads), modules_to_save=heads))
    counts = count_parameters(model, head_modules=find_head(backbone.model))
    output_dir = prepare_output_dir(cfg)
    phases.lap("model")

    def compute_metrics(prediction) -> dict:
        predicted = prediction.predictions.argmax(-1)
        return scalar_metrics(compute_classification_metrics(predicted, prediction.label_ids, label_names))

    arguments = TrainingArguments(
        output_dir=str(output_dir / "checkpoints"), num_train_epochs=cfg.train.epochs,
        max_steps=cfg.train.max_steps or -1, per_device_train_batch_size=cfg.train.batch_size,
        per_device_eval_batch_size=cfg.train.eval_batch_size, learning_rate=cfg.train.lr,
        warmup_steps=cfg.train.warmup_ratio, weight_decay=cfg.train.weight_decay, lr_scheduler_type=cfg.train.scheduler,
        max_grad_norm=cfg.train.max_grad_norm or 0.0, eval_strategy="epoch", save_strategy="epoch",
        load_best_model_at_end=True, metric_for_best_model=cfg.train.metric_for_best, save_total_limit=1,
        save_only_model=True, report_to="none", seed=cfg.train.seed, use_cpu=not cuda_in_use(), disable_tqdm=True,
        remove_unused_columns=False, label_names=["labels"], logging_steps=cfg.train.log_every or 10)
    timer = PhaseCallback()
    trainer = Trainer(model=model, args=arguments, train_dataset=train_set, eval_dataset=eval_set,
                      compute_metrics=compute_metrics, callbacks=[timer])
    start = time.perf_counter()
    state = trainer.train()
    train_time = time.perf_counter() - start
    steps_s = max(train_time - timer.evaluation_s - timer.checkpointing_s, 1e-9)
    for phase, seconds in {"train_steps": steps_s, "evaluation": timer.evaluation_s,
                           "checkpointing": timer.checkpointing_s}.items():
        phases.add(phase, seconds)

    with phases.measure("test"):
        prediction = trainer.predict(test_set)
        test = compute_classification_metrics(prediction.predictions.argmax(-1), prediction.label_ids, label_names)
    best = next((h for h in trainer.state.log_history
                 if h.get("step") == _step_of(trainer.state.best_model_checkpoint) and "eval_loss" in h), {})
    trainer.save_model(str(output_dir / "model"))
    metrics = {
        "validation": {k.removeprefix("eval_"): v for k, v in best.items() if k.startswith("eval_")
                       and not k.endswith(("_runtime", "_per_second"))},
        "test": test, "best_step": _step_of(trainer.state.best_model_checkpoint), "global_step": state.global_step,
        "stopped_early": False, "train_time_s": train_time,
        "samples_per_s": trainer.state.epoch * len(train_set) / steps_s,  # epoch: fractional under max_steps
        "peak_memory_mb": peak_memory_mb(arguments.device), "phases_s": phases.as_dict()}
    metrics = write_metrics(output_dir, cfg, metrics, counts)
    run_folder.close_run_folder(output_dir, run_folder.FINISHED)
    print(f"test accuracy {test['accuracy']:.4f} ({train_time:.0f} s in trainer.train())")
    return metrics


class PhaseCallback(TrainerCallback):
    """Seconds of Trainer's evaluations and checkpoint saves: it evaluates, then saves, right after each epoch ends."""

    def __init__(self):
        self.evaluation_s = self.checkpointing_s = 0.0
        self._mark = None

    def on_epoch_end(self, args, state, control, **kwargs):
        self._mark = time.perf_counter()

    def on_evaluate(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self.evaluation_s += now - (self._mark or now)
        self._mark = now

    def on_save(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self.checkpointing_s += now - (self._mark or now)
        self._mark = None


def load_sets(cfg: RecipeConfig, task: str, phases: PhaseTimer):
    """Train, validation and test sets as the recipe splits them (texts padded to max_length), the backbone, labels;
    the data and model phases timed as the recipe times them."""
    from peftlab.backbones import load_base, position_limit
    from peftlab.data import load_data
    from peftlab.data_rules import resolve_data_rules

    data = load_data(cfg.data, task)
    phases.lap("data")
    backbone = load_base(cfg.model, task=task, label_names=data.label_names)
    # The recipe's `auto` length and selection metric, resolved as it resolves them; the Trainer keeps its own loss.
    rules = resolve_data_rules(cfg, data, tokenizer=getattr(backbone, "tokenizer", None) if task == "text" else None,
                               length_limit=position_limit(backbone) if task == "text" else None)
    if rules.class_weights is not None:
        raise PeftlabError("the Trainer baseline trains the model's plain loss; set train.class_weights=none")
    phases.lap("model")
    if task == "text":
        from peftlab.pooling import apply_mean_pooling

        if cfg.model.pooling == "mean":
            apply_mean_pooling(backbone.model)
        tokenizer = backbone.tokenizer
        encoded = data.splits.map(lambda batch: tokenizer(batch["text"], truncation=True, padding="max_length",
                                                          max_length=cfg.data.max_length),
                                  batched=True, remove_columns=["text"]).rename_column("label", "labels")
        encoded.set_format("torch")
        sets = encoded["train"], encoded["validation"], encoded["test"]
    else:
        from peftlab.data.image import TransformedImages
        from peftlab.data.transforms import build_image_transform

        # The usual loop runs the model in the layout its library builds it in (NCHW), not channels-last as
        # peftlab stores convolutional backbones (peftlab.backbones.layout).
        for module in backbone.model.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.weight.data = module.weight.data.contiguous()
        transform = build_image_transform(cfg.data.image_size, backbone.image_mean, backbone.image_std, train=False)
        sets = tuple(TransformedImages(data.splits[s], transform) for s in ("train", "validation", "test"))
    phases.lap("data")
    return (*sets, backbone, data.label_names)


def _step_of(checkpoint: str | None) -> int | None:
    return int(checkpoint.rsplit("-", 1)[1]) if checkpoint else None


if __name__ == "__main__":
    argv = sys.argv[1:]
    task = argv[argv.index("--task") + 1] if "--task" in argv else "text"
    if task not in DEFAULT_CONFIGS:
        sys.exit(f"error: --task is text or image, not {task!r}")
    rest = [a for i, a in enumerate(argv) if a != "--task" and (i == 0 or argv[i - 1] != "--task")]
    run_cli(lambda cfg: main(cfg, task), rest, default_config=str(DEFAULT_CONFIGS[task]))
