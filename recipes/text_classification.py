"""Fine-tune a text classifier with any peftlab strategy.

Default (no arguments): LoRA on the packaged all-MiniLM-L6-v2 over the packaged Rotten Tomatoes snippets, offline.
    accelerate launch recipes/text_classification.py
    accelerate launch recipes/text_classification.py --config recipes/configs/minilm_lora_rotten_tomatoes.yaml strategy=full
    python recipes/text_classification.py model.name=bert-base-uncased data.name=reviews.csv   # online / local data
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 recipes/text_classification.py   # 2-process DDP on CPU
"""

from __future__ import annotations

from pathlib import Path

from accelerate.utils import set_seed

from peftlab import apply_strategy, count_parameters
from peftlab.backbones import check_max_length, load_base, position_limit
from peftlab.caching import frozen_feature_cache
from peftlab.cli import run_cli
from peftlab.config import RecipeConfig
from peftlab.data import load_data, make_text_dataloader, tokenize_dataset
from peftlab.data_rules import resolve_data_rules
from peftlab.learning_rates import rate_groups
from peftlab.metrics import compute_classification_metrics, scalar_metrics
from peftlab.phases import PhaseTimer
from peftlab.runs import check_before_loading, prepare_output_dir, save_run, score_test
from peftlab.training import build_accelerator, train

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "minilm_lora_rotten_tomatoes.yaml"


def main(cfg: RecipeConfig) -> dict:
    check_before_loading(cfg)  # output folder, precision, trackers: fail in milliseconds, not after loading
    phases = PhaseTimer()  # where the time goes, written into metrics.json as phases_s

    # Data: train/validation/test with `text` and `label`, tokenized without padding (batches pad dynamically).
    data = load_data(cfg.data, task="text")
    phases.lap("data")

    # Backbone with a new head, then the strategy decides what trains. Seeded first: the new head (and LoRA's A
    # matrices) draw their initial values from the global RNG (train() reseeds only later, for shuffling and dropout).
    set_seed(cfg.train.seed)
    backbone = load_base(cfg.model, task="text", label_names=data.label_names)
    check_max_length(backbone, cfg.data.max_length)
    # `auto` settings follow the data: the text length, class weights and selection metric (peftlab.data_rules).
    rules = resolve_data_rules(cfg, data, tokenizer=backbone.tokenizer, length_limit=position_limit(backbone))
    model = apply_strategy(backbone.model, cfg.strategy, head_modules=cfg.model.head_modules,
                           pooling=cfg.model.pooling, batchnorm=cfg.model.batchnorm,
                           **cfg.strategy_options.get(cfg.strategy, {}))
    counts = count_parameters(model)
    rate_groups(model, cfg.train)  # a rate option that cannot apply to this strategy's groups fails here

    # Inputs are valid: only now create (and lock) the output folder; the trackers start with training.
    accelerator = build_accelerator(cfg.train, cfg.output_dir, model=model)
    output_dir = prepare_output_dir(cfg, accelerator)
    accelerator.print(f"{cfg.strategy} on {cfg.model.name}: {counts}")
    accelerator.print("\n".join(rules.describe()))
    phases.lap("model")

    with accelerator.main_process_first():
        tokenized = tokenize_dataset(data.splits, backbone.tokenizer, cfg.data.max_length)
    train_loader = make_text_dataloader(tokenized["train"], backbone.tokenizer, cfg.train.batch_size, shuffle=True,
                                        group_by_length=cfg.train.group_by_length, seed=cfg.train.seed)
    # Evaluation batches go longest first when grouped; evaluate() returns outputs in split order all the same.
    eval_loaders = {split: make_text_dataloader(tokenized[split], backbone.tokenizer, cfg.train.eval_batch_size,
                                                shuffle=False, group_by_length=cfg.train.group_by_length,
                                                seed=cfg.train.seed)
                    for split in ("validation", "test")}

    phases.lap("data")

    def compute_metrics(predictions, references):
        return scalar_metrics(compute_classification_metrics(predictions, references, data.label_names))

    # Strategy `head`: the frozen backbone runs once and the head trains on its cached features (peftlab.caching).
    loaders = {"train": train_loader, **eval_loaders}
    with frozen_feature_cache(model, loaders, accelerator, enabled=cfg.train.cache_frozen_features,
                              phases=phases) as loaders:
        result = train(model, accelerator=accelerator, train_cfg=cfg.train, train_loader=loaders["train"],
                       eval_loader=loaders["validation"], compute_metrics=compute_metrics,
                       output_dir=output_dir, resume_from=cfg.resume_from, class_weights=rules.loss_weights())
        # The model now holds the best validation weights: score them once on the test split (cached there too).
        test = score_test(model, loaders["test"], accelerator, phases)
    return save_run(cfg, "text", accelerator=accelerator, model=model, result=result, test=test,
                    label_names=data.label_names, counts=counts, preprocessor=backbone.tokenizer,
                    output_dir=output_dir, phases=phases, data_rules=rules)


if __name__ == "__main__":
    run_cli(main, default_config=str(DEFAULT_CONFIG))
