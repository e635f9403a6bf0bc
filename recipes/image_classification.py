"""Fine-tune an image classifier with any peftlab strategy.

Default (no arguments): LoRA on the packaged EfficientNet-Lite0 over the packaged Animal-MNIST silhouettes, offline.
    accelerate launch recipes/image_classification.py
    accelerate launch recipes/image_classification.py strategy=full        # or head, partial, bitfit, adapter
    accelerate launch recipes/image_classification.py \
        --config recipes/configs/efficientnet_lite0_lora_animal_mnist_cats_dogs.yaml
    python recipes/image_classification.py data.name=path/to/folder       # folder/<class>/<image>, or train/, test/
    python recipes/image_classification.py model.name=google/vit-base-patch16-224 data.image_size=224   # online
"""

from __future__ import annotations

from pathlib import Path

from accelerate.utils import set_seed

from peftlab import apply_strategy, count_parameters
from peftlab.backbones import check_image_size, load_base
from peftlab.caching import frozen_feature_cache
from peftlab.cli import run_cli
from peftlab.config import RecipeConfig
from peftlab.data import load_data, make_image_dataloader
from peftlab.data_rules import resolve_data_rules
from peftlab.data.transforms import build_image_transform, image_processor
from peftlab.learning_rates import rate_groups
from peftlab.metrics import compute_classification_metrics, scalar_metrics
from peftlab.phases import PhaseTimer
from peftlab.runs import check_before_loading, prepare_output_dir, save_run, score_test
from peftlab.training import build_accelerator, train

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "efficientnet_lite0_lora_animal_mnist.yaml"


def main(cfg: RecipeConfig) -> dict:
    check_before_loading(cfg)  # output folder, precision, trackers: fail in milliseconds, not after loading
    phases = PhaseTimer()  # where the time goes, written into metrics.json as phases_s

    # Data: train/validation/test with `image` (RGB PIL, any size) and `label`; images are decoded per batch.
    data = load_data(cfg.data, task="image")
    phases.lap("data")

    # Backbone with a new head, then the strategy decides what trains. Seeded first: the new head and LoRA's A
    # matrices draw their initial values from the global RNG (train() reseeds only later, for shuffling and dropout).
    set_seed(cfg.train.seed)
    backbone = load_base(cfg.model, task="image", label_names=data.label_names)
    check_image_size(backbone, cfg.data.image_size)
    rules = resolve_data_rules(cfg, data)  # `auto` class weights and selection metric follow the labels
    model = apply_strategy(backbone.model, cfg.strategy, head_modules=cfg.model.head_modules,
                           pooling=cfg.model.pooling, batchnorm=cfg.model.batchnorm,
                           **cfg.strategy_options.get(cfg.strategy, {}))
    counts = count_parameters(model)
    rate_groups(model, cfg.train)  # a rate option that cannot apply to this strategy's groups fails here

    # Inputs are valid: only now create (and lock) the output folder; the trackers start with training.
    accelerator = build_accelerator(cfg.train, cfg.output_dir, model=model)
    output_dir = prepare_output_dir(cfg, accelerator)
    accelerator.print(f"{cfg.strategy} on {cfg.model.name} at {cfg.data.image_size} px "
                      f"(native {backbone.image_size}): {counts}")
    accelerator.print("\n".join(rules.describe()))
    phases.lap("model")

    # Every image is resized to data.image_size and normalised with the backbone's own statistics;
    # only training images are augmented (random resized crop, flip, small rotation) when data.augment is on.
    def transform(train_split: bool):
        return build_image_transform(cfg.data.image_size, backbone.image_mean, backbone.image_std,
                                     train=train_split, augment=cfg.data.augment, seed=cfg.train.seed)

    train_loader = make_image_dataloader(data.splits["train"], transform(True), cfg.train.batch_size,
                                         shuffle=True, seed=cfg.train.seed)
    eval_loaders = {split: make_image_dataloader(data.splits[split], transform(False), cfg.train.eval_batch_size,
                                                 shuffle=False, seed=cfg.train.seed)
                    for split in ("validation", "test")}

    phases.lap("data")

    def compute_metrics(predictions, references):
        return scalar_metrics(compute_classification_metrics(predictions, references, data.label_names))

    # Strategy `head` without augmentation: the frozen backbone runs once, the head trains on cached features.
    loaders = {"train": train_loader, **eval_loaders}
    with frozen_feature_cache(model, loaders, accelerator, enabled=cfg.train.cache_frozen_features,
                              fixed_inputs=not cfg.data.augment, phases=phases) as loaders:
        result = train(model, accelerator=accelerator, train_cfg=cfg.train, train_loader=loaders["train"],
                       eval_loader=loaders["validation"], compute_metrics=compute_metrics,
                       output_dir=output_dir, resume_from=cfg.resume_from, class_weights=rules.loss_weights())
        # The model now holds the best validation weights: score them once on the test split (cached there too).
        test = score_test(model, loaders["test"], accelerator, phases)
    # Saved with an image processor that preprocesses as the evaluation transform does (for loading without peftlab).
    return save_run(cfg, "image", accelerator=accelerator, model=model, result=result, test=test,
                    label_names=data.label_names, counts=counts, preprocessor=image_processor(transform(False)),
                    output_dir=output_dir, phases=phases, data_rules=rules)


if __name__ == "__main__":
    run_cli(main, default_config=str(DEFAULT_CONFIG))
