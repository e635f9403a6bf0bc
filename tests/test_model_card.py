"""The run folder's model card: its "transformers and peft alone" lines reproduce peftlab's predictions exactly,
and the adapter it saves names a portable base and peft's task type.

Each case trains a one-step run (MiniLM cut to one layer, or a tiny random ViT), then runs the card's own code block
(base Hub id swapped for the packaged copy: no Hub here) and compares its probabilities with `peftlab.load`'s.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import peftlab
from peftlab.backbones import PACKAGED_BACKBONES, packaged_folder
from peftlab.config import load_config
from peftlab.model_card import model_card
from peftlab.params import ParameterCount
from tests.test_predict import TEXT_FAST, run_recipe

MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
TEXTS = ["a gripping, beautifully shot film", "dull", "the plot never comes together, but the cast is superb"]
TEXT_CASES = {
    "lora_mean": ["strategy=lora", "model.pooling=mean"],  # the default run's shape
    "lora_cls": ["strategy=lora", "model.pooling=cls"],
    "full_cls": ["strategy=full", "model.pooling=cls"],
    "bitfit_mean": ["strategy=bitfit", "model.pooling=mean"],  # trained tensors onto the vanilla base
    "prompt_mean": ["strategy=prompt", "strategy_options.prompt.num_virtual_tokens=4", "model.pooling=mean"],  # peft
}


def vanilla_block(card: str) -> str:
    section = card.split("### With transformers and peft alone", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def run_card_lines(card: str, replacements: dict[str, str]) -> torch.Tensor:
    code = vanilla_block(card)
    for old, new in replacements.items():
        code = code.replace(old, new)
    namespace: dict = {}
    exec(compile(code, "<model card>", "exec"), namespace)  # noqa: S102 (the card's own lines, as a user runs them)
    return namespace["probabilities"]


@pytest.fixture(scope="module")
def text_runs(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("card_runs")
    runs = {}
    for name, overrides in TEXT_CASES.items():
        runs[name] = folder / name
        run_recipe("text_classification", [*TEXT_FAST, *overrides, "train.lr=5e-2", f"output_dir={runs[name]}"])
    return runs


@pytest.mark.slow  # shares a fixture that trains five runs (about 50 s on an idle 2-core CPU)
@pytest.mark.parametrize("case", sorted(TEXT_CASES))
def test_card_lines_reproduce_peftlab_predictions(text_runs, case):
    run = text_runs[case]
    card = (run / "README.md").read_text()
    local_base = packaged_folder("minilm", PACKAGED_BACKBONES["minilm"])
    texts = json.dumps(TEXTS)
    vanilla = run_card_lines(card, {repr(MINILM_HUB_ID): repr(local_base),
                                    'texts = ["a gripping, beautifully shot film"]': f"texts = {texts}"})
    expected = peftlab.load(run).probabilities(TEXTS)
    torch.testing.assert_close(vanilla, expected, atol=1e-5, rtol=0)


@pytest.mark.slow  # shares a fixture that trains five runs (about 50 s on an idle 2-core CPU)
def test_mean_pooled_card_warns_and_its_hook_matters(text_runs):
    card = (text_runs["lora_mean"] / "README.md").read_text()
    assert "Loading the weights alone does not reproduce this model" in card
    local_base = packaged_folder("minilm", PACKAGED_BACKBONES["minilm"])
    replacements = {repr(MINILM_HUB_ID): repr(local_base),
                    'texts = ["a gripping, beautifully shot film"]': f"texts = {json.dumps(TEXTS)}"}
    without_hook = {**replacements, ".register_forward_hook(mean_pooling, with_kwargs=True)": ".training"}
    pooled_first_token = run_card_lines(card, without_hook)
    assert not torch.allclose(pooled_first_token, peftlab.load(text_runs["lora_mean"]).probabilities(TEXTS),
                              atol=1e-3)
    assert "Loading the weights alone" not in (text_runs["full_cls"] / "README.md").read_text()


@pytest.mark.slow  # shares a fixture that trains five runs (about 50 s on an idle 2-core CPU)
def test_merged_lora_loads_with_vanilla_transformers(text_runs, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from peftlab.saving import merge

    run = peftlab.load(text_runs["lora_cls"])
    merge(run.model).save_pretrained(tmp_path / "merged")
    vanilla = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    batch = run.preprocess(TEXTS)
    with torch.no_grad():
        torch.testing.assert_close(vanilla(**batch).logits, peftlab.load(text_runs["lora_cls"]).logits(TEXTS),
                                   atol=1e-5, rtol=0)


@pytest.mark.slow  # shares a fixture that trains five runs (about 50 s on an idle 2-core CPU)
def test_adapter_names_a_portable_base_and_peft_task_type(text_runs):
    model_dir = text_runs["lora_mean"] / "model"
    adapter_config = json.loads((model_dir / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == MINILM_HUB_ID
    assert adapter_config["task_type"] == "SEQ_CLS"
    assert not (model_dir / "README.md").exists()  # peft's empty template is gone; the run's card replaces it
    card = (text_runs["lora_mean"] / "README.md").read_text()
    assert f"base_model: {MINILM_HUB_ID}" in card
    assert "Test confusion matrix" in card and "| **rotten** |" in card  # rows named by label


def test_hub_id_of_a_packaged_backbone_loads_the_packaged_copy():
    from peftlab.backbones import load_backbone

    backbone = load_backbone(MINILM_HUB_ID, task="text", num_labels=2, num_hidden_layers=1)
    assert backbone.model.config.hidden_size == 384  # offline here: only the packaged copy can have loaded


@pytest.mark.slow  # trains a text and an image run (test_predict's train_runs)
def test_image_card_lines_reproduce_peftlab_predictions(tmp_path):
    from tests.test_predict import train_runs

    runs = train_runs(tmp_path)  # includes a LoRA run on a tiny random ViT saved in tmp_path/tiny_vit
    card = (runs["image"] / "README.md").read_text()
    image = tmp_path / "images" / "dog" / "1.png"
    vanilla = run_card_lines(card, {'Image.open("cat.png")': f"Image.open({str(image)!r})"})
    torch.testing.assert_close(vanilla, peftlab.load(runs["image"]).probabilities([str(image)]), atol=1e-5, rtol=0)
    assert (runs["image"] / "model" / "preprocessor_config.json").is_file()


@pytest.mark.parametrize("strategy, backbone, phrase", [
    ("adapter", "minilm", "inserts peftlab's own modules"),
    ("lora", "efficientnet-lite0", "is a plain torch model"),
    ("prefix", "minilm", "passes peft 0.21's `past_key_values` (prefix tuning's prefix) to transformers 5 as `cache`"),
])
def test_card_says_plainly_when_only_peftlab_loads_it(strategy, backbone, phrase):
    task = "image" if backbone.startswith("efficientnet") else "text"
    cfg = load_config(None, [f"strategy={strategy}", f"model.name={backbone}"])
    counts = ParameterCount(trainable=10, total=100, head=2, trainable_without_head=8)
    card = model_card(cfg, task, {"test": {"accuracy": 0.5, "macro_f1": 0.5, "confusion_matrix": [[1, 1], [1, 1]]}},
                      counts, ["a", "b"], plain_torch=backbone.startswith("efficientnet"), folder="run")
    vanilla = card.split("### With transformers and peft alone", 1)[1]
    assert vanilla.lstrip().startswith("Not possible") and phrase in vanilla and "```python" not in vanilla
