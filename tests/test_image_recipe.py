"""The image recipe end to end on a tiny random ViT and a tiny image folder written to tmp_path (seconds)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from peftlab import PeftlabError
from peftlab.backbones import load_backbone
from peftlab.config import load_config
from peftlab.data.image import load_image_dataset, make_image_dataloader
from peftlab.data.transforms import build_image_transform
from peftlab.metrics import compute_classification_metrics
from peftlab.saving import load_trained
from tests import bad_images

ROOT = Path(__file__).parents[1]
RECIPE = ROOT / "recipes" / "image_classification.py"
CLASSES = ["cat", "dog", "owl"]
# 8 images a class, split 4 / 2 / 2 (stratified): 12 training images, 3 batches of 4 an epoch, so 6 steps read
# every training image twice. High lr so 6 steps of a random ViT learn enough to predict more than one class.
FAST = ["data.image_size=16", "data.validation_fraction=0.25", "data.test_fraction=0.25", "data.max_train_samples=null",
        "data.max_eval_samples=null", "train.max_steps=6", "train.batch_size=4", "train.eval_batch_size=4",
        "train.lr=1e-2", "train.warmup_ratio=0", "train.mixed_precision=no", "train.trackers=[jsonl]"]


def load_recipe():
    spec = importlib.util.spec_from_file_location("image_recipe", RECIPE)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    return recipe


def save_image(path: Path, image: Image.Image) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def write_class_folders(root: Path, classes=CLASSES, per_class: int = 8) -> Path:
    """root/<class>/*.png: one colour a class plus noise; each class has a grayscale and an odd-sized image."""
    rng = np.random.default_rng(0)
    for label, name in enumerate(classes):
        colour = np.array([[220, 30, 30], [30, 220, 30], [30, 30, 220]][label % 3])
        for i in range(per_class):
            height, width = (21, 37) if i == 1 else (20, 20)  # one odd-sized, non-square image a class
            pixels = np.clip(colour + rng.normal(0, 25, (height, width, 3)), 0, 255).astype(np.uint8)
            image = Image.fromarray(pixels)
            if i == 0:
                image = image.convert("L")  # one grayscale image a class (read back as RGB)
            save_image(root / name / f"{i}.png", image)
    return root


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory) -> Path:
    """A tiny random ViT saved like a Hub checkpoint, with a 5-way head that the recipe must replace."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                       image_size=16, patch_size=4, num_labels=5)
    folder = tmp_path_factory.mktemp("tiny_vit")
    ViTForImageClassification(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    return write_class_folders(tmp_path_factory.mktemp("images"))


def run_main(tmp_path, vit_dir, image_folder, *overrides):
    recipe = load_recipe()
    cfg = load_config(str(recipe.DEFAULT_CONFIG), [*FAST, f"model.name={vit_dir}", f"data.name={image_folder}",
                                                   f"output_dir={tmp_path / 'run'}", *overrides])
    return recipe.main(cfg), cfg, tmp_path / "run"


def reloaded_test_metrics(cfg, run: Path) -> dict:
    """Load the saved model onto a freshly loaded base and score the recipe's test split with it."""
    data = load_image_dataset(cfg.data.name, validation_fraction=cfg.data.validation_fraction,
                              test_fraction=cfg.data.test_fraction, split_seed=cfg.data.split_seed)
    base = load_backbone(cfg.model.name, task="image", num_labels=data.num_labels, label_names=data.label_names)
    model = load_trained(base.model, run / "model").eval()
    transform = build_image_transform(cfg.data.image_size, base.image_mean, base.image_std, train=False)
    loader = make_image_dataloader(data.splits["test"], transform, 4, shuffle=False, seed=0)
    predictions, references = [], []
    with torch.no_grad():
        for batch in loader:
            predictions += model(pixel_values=batch["pixel_values"]).logits.argmax(-1).tolist()
            references += batch["labels"].tolist()
    return compute_classification_metrics(predictions, references, data.label_names)


def test_default_config_is_lora_on_packaged_lite0_and_animal_mnist():
    cfg = load_config(str(load_recipe().DEFAULT_CONFIG))
    assert (cfg.model.name, cfg.data.name, cfg.strategy) == ("efficientnet-lite0", "animal_mnist", "lora")
    assert cfg.data.image_size == 96 and cfg.data.augment
    assert cfg.strategy_options["adapter"]["kind"] == "pfeiffer"  # houlsby needs attention, which a CNN lacks


def test_lora_run_writes_outputs_that_reload_to_the_same_predictions(tmp_path, vit_dir, image_folder):
    metrics, cfg, run = run_main(tmp_path, vit_dir, image_folder)
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["test"]["accuracy"] == metrics["test"]["accuracy"]
    assert {"validation", "test", "best_step", "global_step", "train_time_s", "samples_per_s", "peak_memory_mb",
            "parameters"} <= set(saved)
    assert saved["global_step"] == 6 and saved["test"]["per_class"]["cat"]["support"] == 2
    # LoRA r=8 on query and value of 2 layers of hidden 32: 2 x 2 x (32x8 + 8x32); the 3-way head is 32x3 + 3.
    assert saved["parameters"]["trainable_without_head"] == 2 * 2 * (32 * 8 + 8 * 32)
    assert saved["parameters"]["head"] == 32 * 3 + 3
    model_files = {p.name for p in (run / "model").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "peftlab_strategy.json", "task.json"} <= model_files
    assert json.loads((run / "model" / "task.json").read_text()) == {"task": "image", "label_names": CLASSES}
    assert (run / "README.md").read_text().startswith("---") and (run / "config.yaml").is_file()
    assert (run / "log.jsonl").read_text().strip()

    # The trained model predicts more than one class (so matching predictions below means something) ...
    assert len({j for row in saved["test"]["confusion_matrix"] for j, count in enumerate(row) if count}) > 1
    # ... and plain load_trained on a fresh base reproduces the recipe's test predictions exactly.
    reloaded = reloaded_test_metrics(cfg, run)
    assert reloaded["confusion_matrix"] == saved["test"]["confusion_matrix"]
    assert reloaded["accuracy"] == saved["test"]["accuracy"]


@pytest.mark.parametrize("strategy", ["full", "head", "bitfit", "partial", "adapter"])
def test_other_strategies_run_and_reload(tmp_path, vit_dir, image_folder, strategy):
    metrics, cfg, run = run_main(tmp_path, vit_dir, image_folder, f"strategy={strategy}",
                                 "strategy_options.partial.top_k=1", "strategy_options.adapter={kind: houlsby}")
    assert 0 <= metrics["test"]["accuracy"] <= 1
    assert json.loads((run / "model" / "peftlab_strategy.json").read_text())["name"] == strategy
    assert reloaded_test_metrics(cfg, run)["confusion_matrix"] == metrics["test"]["confusion_matrix"]


def test_runs_are_reproducible_and_augmentation_switches(tmp_path, vit_dir, image_folder):
    augmented, _, _ = run_main(tmp_path / "a", vit_dir, image_folder, "data.augment=true")
    plain, _, _ = run_main(tmp_path / "b", vit_dir, image_folder, "data.augment=false")
    again, _, _ = run_main(tmp_path / "c", vit_dir, image_folder, "data.augment=true")
    # train.seed fixes everything (new head and LoRA initialisation included), whatever ran before in the process;
    assert again["validation"] == augmented["validation"] and again["test"] == augmented["test"]
    # with the same seed and data, only the train transform differs, so training differs.
    assert augmented["validation"]["loss"] != plain["validation"]["loss"]


def test_bad_image_folders_give_one_clear_error(tmp_path, vit_dir):
    empty_class = write_class_folders(tmp_path / "empty_class", classes=["cat", "dog"])
    (empty_class / "horse").mkdir()
    with pytest.raises(PeftlabError, match=r"class folder .*horse.* holds no images"):
        run_main(tmp_path / "run1", vit_dir, empty_class)

    # A test class that train lacks could never be learned: an error, not a silent extra head output.
    split_folders = tmp_path / "splits"
    write_class_folders(split_folders / "train", classes=["cat", "dog"])
    write_class_folders(split_folders / "test", classes=["cat", "dog", "bird"], per_class=2)
    with pytest.raises(PeftlabError, match=r"has label\(s\) \['bird'\] in its test split but not in the train split"):
        run_main(tmp_path / "run2", vit_dir, split_folders)
    assert not (tmp_path / "run2" / "run").exists()


def write_bad_folders(tmp: Path) -> Path:
    """Image folders for BAD_DATA_CASES, each with one fault, under `tmp`."""
    for folder, writer in [("truncated", bad_images.write_truncated_jpeg),
                           ("broken_pixels", bad_images.write_broken_pixels_png),
                           ("bomb", bad_images.write_decompression_bomb)]:
        write_class_folders(tmp / folder, per_class=2)
        writer(tmp / folder / "cat" / ("bad.jpg" if folder == "truncated" else "bad.png"))
    write_class_folders(tmp / "test_only" / "train", classes=["cat", "dog"], per_class=2)
    write_class_folders(tmp / "test_only" / "test", classes=["cat", "dog", "bird"], per_class=1)
    return tmp


# (id, folder under write_bad_folders' folder, a fragment of the one-line message); docs/bad_inputs.md shows them.
BAD_DATA_CASES = [
    ("truncated JPEG", "truncated", "bad.jpg' is not a readable image (image file is truncated"),
    ("PNG with broken pixel data", "broken_pixels", "bad.png' is not a readable image (broken data stream"),
    ("decompression bomb", "bomb", "bad.png' is too large to decode safely (Image size (100000000 pixels)"),
    ("class folder only in test", "test_only", "has label(s) ['bird'] in its test split but not in the train split"),
]


def bad_data_error(folder: str, tmp: Path) -> tuple[int, list[str]]:
    """The image recipe's CLI, run in-process on data.name=tmp/folder: exit code and `error:` lines."""
    from tests.test_bad_inputs import error_line

    return error_line([f"data.name={tmp}/{folder}"], tmp, of_recipe=load_recipe(), fast=["train.mixed_precision=no"])


@pytest.mark.parametrize("case_id, folder, fragment", BAD_DATA_CASES, ids=[case[0] for case in BAD_DATA_CASES])
def test_bad_image_data_is_one_line_before_anything_is_written(case_id, folder, fragment, tmp_path):
    code, err_lines = bad_data_error(folder, write_bad_folders(tmp_path))
    assert code == 2 and len(err_lines) == 1, err_lines
    assert fragment in err_lines[0], err_lines[0]
    assert not (tmp_path / "run").exists()


def test_image_size_the_backbone_cannot_take_is_one_clear_error(tmp_path, vit_dir, image_folder):
    with pytest.raises(PeftlabError, match=r"cannot take 24 px images .*set data.image_size=16"):
        run_main(tmp_path, vit_dir, image_folder, "data.image_size=24")
    assert not (tmp_path / "run").exists()  # rejected before the output folder is created


@pytest.mark.parametrize("overrides, message", [
    (["model.batchnorm=frozen"], "model.batchnorm=frozen, but the model has no batch norms"),
    (["strategy=lora", "train.layer_decay=0.8"], "train.layer_decay=0.8 decays the rate of trained blocks"),
])
def test_options_that_cannot_apply_to_the_model_write_nothing(tmp_path, vit_dir, image_folder, overrides, message):
    with pytest.raises(PeftlabError, match=message):
        run_main(tmp_path, vit_dir, image_folder, *overrides)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("overrides, message", [
    (["strategy=adapter", "strategy_options.adapter.kind=houlsby"], "houlsby adapters go after attention"),
    (["model.pooling=mean"], "pooling=mean needs a transformers task model"),
])
def test_cnn_strategy_errors_name_the_fix(tmp_path, image_folder, overrides, message):
    # The packaged EfficientNet-Lite0 has no attention for Houlsby adapters, and no encoder to mean-pool.
    recipe = load_recipe()
    cfg = load_config(str(recipe.DEFAULT_CONFIG), [f"data.name={image_folder}", f"output_dir={tmp_path}",
                                                   "train.mixed_precision=no", *overrides])
    with pytest.raises(PeftlabError, match=message):
        recipe.main(cfg)


def test_cli_reports_bad_data_in_one_line(tmp_path):
    (tmp_path / "images" / "cat").mkdir(parents=True)
    result = subprocess.run([sys.executable, str(RECIPE), f"data.name={tmp_path / 'images'}",
                             f"output_dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: class folder ")
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_default_config_trains_on_packaged_lite0(tmp_path):
    recipe = load_recipe()
    cfg = load_config(str(recipe.DEFAULT_CONFIG), [
        "data.image_size=32", "data.max_train_samples=64", "data.max_eval_samples=32", "train.max_steps=2",
        "train.batch_size=16", "train.mixed_precision=no", "train.trackers=[jsonl]", f"output_dir={tmp_path / 'run'}"])
    metrics = recipe.main(cfg)
    assert metrics["global_step"] == 2 and len(metrics["test"]["confusion_matrix"]) == 10
