"""`peftlab fuse`: ensembles and model soups of run folders (peftlab/fuse.py).

Fast: the one-line refusals, on run folders made of config and JSON files only (the checks run before any weights
load; the base-weights hash loads two tiny random ViTs). Slow: four one-step MiniLM (1 layer) runs, two LoRA and
two full fine-tuning, fused every way, with the results checked against the members.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import peftlab
from peftlab.backbones import PACKAGED_BACKBONES, packaged_folder
from peftlab.config import load_config, save_config
from peftlab.fuse import main as fuse_main
from peftlab.predict import main as predict_main
from tests.test_model_card import MINILM_HUB_ID, run_card_lines
from tests.test_predict import ROOT, TEXT_FAST, run_recipe

TEXTS = ["a gripping, beautifully shot film", "dull and far too long", "fine", "the best thing this year"]


def fuse_cli(argv: list[str]) -> tuple[int, list[str]]:
    """Run `peftlab fuse` in-process: exit code and the `error:` lines on stderr."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            fuse_main([str(a) for a in argv])
            code = 0
        except SystemExit as exit_info:
            code = exit_info.code
    return code, [line for line in stderr.getvalue().splitlines() if line.startswith("error: ")]


def fake_run(folder: Path, model_name: str, *, strategy: str = "full", label_names=("cat", "dog"),
             overrides: tuple = ()) -> Path:
    """A run folder with only what the fusion checks read: config.yaml, task.json and peftlab_strategy.json."""
    cfg = load_config(str(ROOT / "recipes/configs/efficientnet_lite0_lora_animal_mnist.yaml"),
                      [f"model.name={model_name}", f"strategy={strategy}", *overrides])
    save_config(cfg, folder / "config.yaml")
    (folder / "model").mkdir(parents=True)
    (folder / "model/task.json").write_text(json.dumps({"task": "image", "label_names": list(label_names)}))
    (folder / "model/peftlab_strategy.json").write_text(json.dumps(
        {"name": strategy, "options": {}, "head_modules": ["classifier"], "pooling": "cls"}))
    return folder


@pytest.fixture(scope="module")
def vit_bases(tmp_path_factory) -> dict[str, Path]:
    """Two tiny random ViTs of one architecture with different weights, and one with another layer count."""
    from transformers import ViTConfig, ViTForImageClassification

    folder = tmp_path_factory.mktemp("bases")
    bases = {}
    for name, seed, layers in (("a", 0, 1), ("b", 1, 1), ("deeper", 0, 2)):
        torch.manual_seed(seed)
        ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                                            intermediate_size=37, image_size=16, patch_size=4)
                                  ).save_pretrained(folder / name)
        bases[name] = folder / name
    return bases


REFUSALS = [
    # (id, how the second run differs, fusion method, fragment of the one-line error)
    ("fewer than two runs", None, "uniform-soup", "fusing needs at least two run folders, got 1"),
    ("different label names", dict(label_names=("cat", "owl")), "ensemble", "fuse only runs over the same label names"),
    ("different strategies", dict(strategy="bitfit"), "uniform-soup", "trained with strategy 'bitfit' but"),
    ("quantized base", dict(overrides=("model.quantization=4bit",)), "greedy-soup",
     "has a 4bit-quantized base, whose packed weights cannot be averaged"),
    ("different architectures", dict(base="deeper"), "uniform-soup", "have different architectures"),
    ("different base weights", dict(base="b"), "uniform-soup", "were fine-tuned from different base weights"),
]


@pytest.mark.parametrize("case", REFUSALS, ids=[case[0] for case in REFUSALS])
def test_refusals_are_one_line_and_write_nothing(case, vit_bases, tmp_path):
    _, difference, method, message = case
    first = fake_run(tmp_path / "first", str(vit_bases["a"]))
    runs = [first]
    if difference is not None:
        difference = dict(difference)
        base = vit_bases[difference.pop("base", "a")]
        runs.append(fake_run(tmp_path / "second", str(base), **difference))
    code, errors = fuse_cli([*runs, "--method", method, "--output", tmp_path / "fused"])
    assert code == 2 and len(errors) == 1, errors
    assert message in errors[0], errors[0]
    assert not (tmp_path / "fused").exists()


def test_lora_combination_is_refused_for_other_strategies(vit_bases, tmp_path):
    runs = [fake_run(tmp_path / name, str(vit_bases["a"])) for name in ("first", "second")]
    code, errors = fuse_cli([*runs, "--method", "uniform-soup", "--lora-combination", "ties", "--output",
                             tmp_path / "fused"])
    assert code == 2 and len(errors) == 1 and "applies to soups of LoRA runs only" in errors[0], errors
    assert not (tmp_path / "fused").exists()


def test_folder_of_runs_stands_for_them_and_greedy_needs_one_validation_split(vit_bases, tmp_path):
    """A cross-validation output (fold-<i>/ run folders) expands to its folds in fold order; folds validate on
    different splits, so a greedy soup of them is refused."""
    from peftlab.fuse import expand_run_dirs

    for fold in (10, 2):
        fake_run(tmp_path / "cv" / f"fold-{fold}", str(vit_bases["a"]), overrides=(f"data.split_seed={fold}",))
    (tmp_path / "cv" / "logs").mkdir()
    assert expand_run_dirs([tmp_path / "cv"]) == [tmp_path / "cv/fold-2", tmp_path / "cv/fold-10"]
    code, errors = fuse_cli([tmp_path / "cv", "--method", "greedy-soup", "--output", tmp_path / "fused"])
    assert code == 2 and len(errors) == 1 and "greedy-soup has no common validation split" in errors[0], errors
    assert not (tmp_path / "fused").exists()


def test_same_base_under_two_names_is_accepted(vit_bases, tmp_path):
    """The base check compares weights, not names: a copy of the base folder is the same base."""
    from peftlab.fuse import check_soup, read_ingredients

    shutil.copytree(vit_bases["a"], tmp_path / "copy_of_a")
    runs = [fake_run(tmp_path / "first", str(vit_bases["a"])),
            fake_run(tmp_path / "second", str(tmp_path / "copy_of_a"))]
    for run in runs:  # the same trained tensors in each, so only the base check could refuse
        save_file({"classifier.weight": torch.zeros(2, 32)}, run / "model/model.safetensors")
    check_soup(read_ingredients(runs))


def test_lora_soup_arithmetic_on_adapters_of_different_ranks(tmp_path):
    """write_soup on two hand-made peft adapters (r=2 alpha=4, and r=3 alpha=3 with rsLoRA): the concatenated-rank
    adapter's B·A (scaling 1) is the mean of the runs' scaled B·A, and the head is the mean of the heads."""
    from peftlab.fuse import Ingredient, write_soup
    from peftlab.strategies import AppliedStrategy

    generator = torch.Generator().manual_seed(0)
    key = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_{}.weight"
    head = "base_model.model.classifier.weight"
    ingredients, deltas, heads = [], [], []
    for number, (rank, alpha, rslora) in enumerate([(2, 4, False), (3, 3, True)]):
        model_dir = tmp_path / f"run{number}" / "model"
        model_dir.mkdir(parents=True)
        a, b = torch.randn(rank, 6, generator=generator), torch.randn(5, rank, generator=generator)
        heads.append(torch.randn(2, 5, generator=generator))
        save_file({key.format("A"): a, key.format("B"): b, head: heads[-1]}, model_dir / "adapter_model.safetensors")
        (model_dir / "adapter_config.json").write_text(json.dumps(
            {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "use_rslora": rslora}))
        deltas.append(alpha / (rank ** 0.5 if rslora else rank) * b @ a)
        spec = AppliedStrategy("lora", {"r": rank, "alpha": alpha, "use_rslora": rslora}, ["classifier"], "mean")
        ingredients.append(Ingredient(model_dir.parent, None, "text", ["no", "yes"], spec))
    spec = write_soup(ingredients, [0.5, 0.5], tmp_path / "soup")
    soup = load_file(tmp_path / "soup/adapter_model.safetensors")
    config = json.loads((tmp_path / "soup/adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (5, 5, False)
    assert (spec.options["r"], spec.pooling) == (5, "mean")
    torch.testing.assert_close(soup[key.format("B")] @ soup[key.format("A")], (deltas[0] + deltas[1]) / 2)
    assert not torch.allclose(soup[key.format("B")] @ soup[key.format("A")], deltas[0])
    torch.testing.assert_close(soup[head], (heads[0] + heads[1]) / 2)


# ------------------------------------------------------------------------------------------------------------------
# Slow: real one-step runs, fused
# ------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Two LoRA and two full fine-tuning runs that differ (seeds, a large learning rate), mean-pooled MiniLM."""
    folder = tmp_path_factory.mktemp("fuse_runs")
    found = {}
    for name, overrides in {"lora_a": ["train.seed=1"], "lora_b": ["train.seed=2"],
                            "full_a": ["strategy=full", "train.seed=1"],
                            "full_b": ["strategy=full", "train.seed=2"]}.items():
        found[name] = folder / name
        run_recipe("text_classification", [*TEXT_FAST, "train.lr=5e-2", "train.cpu_threads=1", *overrides,
                                           f"output_dir={found[name]}"])
    return found


def fused(runs: dict[str, Path], names: list[str], method: str, output: Path, *extra: str) -> Path:
    code, errors = fuse_cli([*(runs[name] for name in names), "--method", method, "--output", output, *extra])
    assert code == 0, errors
    return output


def lora_layers(model) -> dict[str, torch.nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


@pytest.mark.slow  # the runs fixture trains four runs (about 30 s on an idle 2-core CPU)
def test_uniform_lora_soup_is_base_plus_mean_delta(runs, tmp_path):
    soup = peftlab.load(fused(runs, ["lora_a", "lora_b"], "uniform-soup", tmp_path / "soup"))
    members = [peftlab.load(runs["lora_a"]), peftlab.load(runs["lora_b"])]
    layers, member_layers = lora_layers(soup.model), [lora_layers(m.model) for m in members]
    assert layers and layers.keys() == member_layers[0].keys()
    for name, layer in layers.items():
        mean_delta = sum(m[name].get_delta_weight("default") for m in member_layers) / 2  # (alpha/r)·B·A per run
        assert not torch.allclose(member_layers[0][name].get_delta_weight("default"), mean_delta)  # runs differ
        torch.testing.assert_close(layer.get_delta_weight("default"), mean_delta, atol=1e-5, rtol=0)
        torch.testing.assert_close(layer.base_layer.weight, member_layers[0][name].base_layer.weight, atol=0, rtol=0)
    heads = [dict(m.model.named_parameters()) for m in (soup, *members)]
    head_names = [n for n in heads[0] if ".modules_to_save." in n]
    assert head_names
    for name in head_names:
        torch.testing.assert_close(heads[0][name], (heads[1][name] + heads[2][name]) / 2, atol=1e-6, rtol=0)
    metrics = json.loads((tmp_path / "soup/metrics.json").read_text())
    assert metrics["inference_cost"] == 1 and metrics["fusion"]["weight_average"] == "exact"
    assert [i["weight"] for i in metrics["fusion"]["ingredients"]] == [0.5, 0.5]
    card = (tmp_path / "soup/README.md").read_text()
    assert "### Ingredients" in card and "| Fusion | uniform-soup of 2 of 2 runs" in card
    # The soup is a plain peft adapter (rank 16 = 8 + 8): the card's transformers + peft lines reproduce it
    vanilla = run_card_lines(card, {repr(MINILM_HUB_ID): repr(packaged_folder("minilm", PACKAGED_BACKBONES["minilm"])),
                                    'texts = ["a gripping, beautifully shot film"]': f"texts = {json.dumps(TEXTS)}"})
    torch.testing.assert_close(vanilla, soup.probabilities(TEXTS), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_peft_combinations_with_heads_averaged_apart(runs, tmp_path):
    """peft's add_weighted_adapter with heads that peft alone refuses: svd at full rank is exact, ties approximate."""
    members = [peftlab.load(runs["lora_a"]), peftlab.load(runs["lora_b"])]
    member_layers = [lora_layers(m.model) for m in members]
    svd = peftlab.load(fused(runs, ["lora_a", "lora_b"], "uniform-soup", tmp_path / "svd", "--lora-combination", "svd"))
    for name, layer in lora_layers(svd.model).items():
        mean_delta = sum(m[name].get_delta_weight("default") for m in member_layers) / 2
        torch.testing.assert_close(layer.get_delta_weight("default"), mean_delta, atol=1e-5, rtol=0)
    heads = [dict(m.model.named_parameters()) for m in (svd, *members)]
    for name in [n for n in heads[0] if ".modules_to_save." in n]:
        torch.testing.assert_close(heads[0][name], (heads[1][name] + heads[2][name]) / 2, atol=1e-6, rtol=0)
    assert json.loads((tmp_path / "svd/metrics.json").read_text())["fusion"]["weight_average"] == "exact"
    ties = fused(runs, ["lora_a", "lora_b"], "uniform-soup", tmp_path / "ties", "--lora-combination", "ties")
    fusion = json.loads((ties / "metrics.json").read_text())["fusion"]
    assert fusion["weight_average"].startswith("approximate") and fusion["lora_combination"] == "ties"
    torch.testing.assert_close(peftlab.load(ties).probabilities(TEXTS).sum(-1), torch.ones(len(TEXTS)))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lora_a", "full_a"])
def test_soup_of_two_identical_runs_equals_it(runs, name, tmp_path):
    soup = peftlab.load(fused(runs, [name, name], "uniform-soup", tmp_path / "soup"))
    torch.testing.assert_close(soup.probabilities(TEXTS), peftlab.load(runs[name]).probabilities(TEXTS),
                               atol=1e-5, rtol=0)


@pytest.mark.slow
def test_full_soup_averages_every_trained_tensor(runs, tmp_path):
    soup = load_file(fused(runs, ["full_a", "full_b"], "uniform-soup", tmp_path / "soup") / "model/model.safetensors")
    a, b = (load_file(runs[name] / "model/model.safetensors") for name in ("full_a", "full_b"))
    assert soup.keys() == a.keys() and any(not torch.equal(a[k], b[k]) for k in a)
    for key in soup:
        torch.testing.assert_close(soup[key], (a[key] + b[key]) / 2, atol=1e-6, rtol=0)
    # Mean pooling is kept, not refused: the soup scores like a loaded run of its own
    assert peftlab.load(tmp_path / "soup").model.peftlab_strategy.pooling == "mean"


@pytest.mark.slow
@pytest.mark.parametrize("combine", ["probabilities", "logits"])
def test_ensemble_averages_members_and_round_trips_through_predict(runs, combine, tmp_path):
    output = fused(runs, ["lora_a", "full_b"], "ensemble", tmp_path / "ensemble", "--combine", combine)
    ensemble = peftlab.load(output)
    members = [peftlab.load(runs["lora_a"]), peftlab.load(runs["full_b"])]
    if combine == "probabilities":
        expected = sum(m.probabilities(TEXTS) for m in members) / 2
    else:
        expected = (sum(m.logits(TEXTS) for m in members) / 2).softmax(-1)
    torch.testing.assert_close(ensemble.probabilities(TEXTS), expected, atol=1e-6, rtol=0)
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        predict_main([str(output), *TEXTS])
    rows = [json.loads(line) for line in stdout.getvalue().splitlines()]
    labels = [ensemble.label_names[i] for i in expected.argmax(-1)]
    assert [row["label"] for row in rows] == labels
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["inference_cost"] == 2 and metrics["fusion"]["combine"] == combine
    assert metrics["validation"]["accuracy"] >= 0 and "confusion_matrix" in metrics["test"]


@pytest.mark.slow
def test_greedy_soup_is_never_below_its_best_ingredient(runs, tmp_path):
    output = fused(runs, ["lora_b", "lora_a", "lora_a"], "greedy-soup", tmp_path / "greedy")
    metrics = json.loads((output / "metrics.json").read_text())
    ingredients = metrics["fusion"]["ingredients"]
    best = max(i["validation"]["accuracy"] for i in ingredients)
    assert metrics["validation"]["accuracy"] >= best
    weights = [i["weight"] for i in ingredients]
    assert sum(weights) == pytest.approx(1) and max(weights) > 0
    # The soup holds the best ingredient (validation accuracy; the first given on ties)
    first_best = next(n for n, i in enumerate(ingredients) if i["validation"]["accuracy"] == best)
    assert weights[first_best] > 0
