"""The text recipe end to end on the real packaged MiniLM cut to one layer (seconds)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from peftlab.config import load_config

ROOT = Path(__file__).parents[1]
RECIPE = ROOT / "recipes" / "text_classification.py"
FAST = ["model.num_hidden_layers=1", "data.max_train_samples=96", "data.max_eval_samples=48", "train.max_steps=6",
        "train.batch_size=16", "train.mixed_precision=no", "train.trackers=[jsonl]"]


def run_main(tmp_path, *overrides):
    import importlib.util

    spec = importlib.util.spec_from_file_location("text_recipe", RECIPE)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    cfg = load_config(str(recipe.DEFAULT_CONFIG), [*FAST, f"output_dir={tmp_path / 'run'}", *overrides])
    return recipe.main(cfg), tmp_path / "run"


def test_lora_run_writes_outputs_that_peft_loads(tmp_path):
    from peft import PeftModel

    from peftlab.backbones import load_backbone
    import peftlab

    metrics, run = run_main(tmp_path)
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["test"]["accuracy"] == metrics["test"]["accuracy"]
    assert {"validation", "test", "train_time_s", "samples_per_s", "peak_memory_mb", "parameters"} <= set(saved)
    assert saved["parameters"]["trainable_without_head"] == 1 * 2 * (384 * 8 + 8 * 384)  # one layer, q and v
    assert saved["param_groups"] == [{"name": "lora_A", "parameters": 2 * 8 * 384, "lr": 1e-3},
                                     {"name": "lora_B", "parameters": 2 * 384 * 8, "lr": 1e-3},
                                     {"name": "head", "parameters": 384 * 2 + 2, "lr": 1e-3}]  # the config's train.lr
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {p.name for p in (run / "model").iterdir()}
    assert (run / "README.md").read_text().startswith("---") and (run / "config.yaml").is_file()
    assert (run / "log.jsonl").read_text().strip()

    # Plain peft onto a freshly loaded base gives the predictor's (and so the recipe's) probabilities.
    predictor = peftlab.load(run)
    texts = ["a warm, funny and moving film", "tedious and far too long"]
    base = load_backbone("minilm", task="text", num_labels=2, label_names=["rotten", "fresh"], num_hidden_layers=1)
    from peftlab.pooling import apply_mean_pooling

    peft_model = PeftModel.from_pretrained(apply_mean_pooling(base.model), run / "model").eval()
    batch = base.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = peft_model(**batch).logits.softmax(-1)
    torch.testing.assert_close(predictor.probabilities(texts), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("strategy", ["full", "head", "adapter", "bitfit", "partial"])
def test_other_strategies_run(tmp_path, strategy):
    metrics, run = run_main(tmp_path, f"strategy={strategy}", "strategy_options.partial.top_k=1")
    assert 0 <= metrics["test"]["accuracy"] <= 1
    assert json.loads((run / "model" / "peftlab_strategy.json").read_text())["name"] == strategy


def test_rates_per_group_reach_metrics_json(tmp_path):
    metrics, run = run_main(tmp_path, "strategy=full", "train.lr=1e-4", "train.head_lr=1e-3", "train.layer_decay=0.5")
    groups = json.loads((run / "metrics.json").read_text())["param_groups"]
    assert groups == metrics["param_groups"]
    # One layer kept: the block trains at train.lr, the embeddings below it at lr x 0.5, the head at head_lr.
    assert [(g["name"], g["lr"]) for g in groups] == [("below_blocks", 5e-5), ("blocks.0", 1e-4),
                                                      ("above_blocks", 1e-4), ("head", 1e-3)]
    assert sum(g["parameters"] for g in groups) == json.loads((run / "metrics.json").read_text())["parameters"][
        "trainable"]


def test_a_rate_option_that_cannot_apply_fails_before_anything_is_written(tmp_path):
    from peftlab import PeftlabError

    with pytest.raises(PeftlabError, match="train.loraplus_ratio=4 sets the rate of LoRA's B matrices, but strategy "
                                           "'bitfit' trains the groups"):
        run_main(tmp_path, "strategy=bitfit", "train.loraplus_ratio=4")
    assert not (tmp_path / "run").exists()


def test_metrics_json_says_where_the_time_went(tmp_path):
    """phases_s is written by the engine: cached head (so the feature cache is a phase), every phase measured."""
    metrics, run = run_main(tmp_path, "strategy=head", "train.cache_frozen_features=true")
    phases = json.loads((run / "metrics.json").read_text())["phases_s"]
    assert list(phases) == ["data", "model", "feature_cache", "train_steps", "evaluation", "checkpointing", "test"]
    assert all(seconds >= 0 for seconds in phases.values()) and phases["train_steps"] > 0
    assert phases["feature_cache"] > 0 and phases["evaluation"] > 0 and phases["checkpointing"] > 0
    # train() splits its own time three ways, and samples/s is over the training steps alone.
    assert metrics["train_time_s"] == pytest.approx(
        phases["train_steps"] + phases["evaluation"] + phases["checkpointing"], abs=2e-3)
    # phases_s holds milliseconds: on cached features the steps take about 10 ms, so allow for that rounding.
    rounding = 0.0005 / phases["train_steps"]
    assert metrics["samples_per_s"] == pytest.approx(6 * 16 / phases["train_steps"], rel=max(1e-2, 1.5 * rounding))


def test_metrics_json_records_the_cpu_threads(tmp_path):
    """train.cpu_threads wins over OMP_NUM_THREADS and the all-cores default; 3 is neither here (2 cores)."""
    threads = torch.get_num_threads()
    try:
        metrics, run = run_main(tmp_path, "strategy=head", "train.cpu_threads=3")
    finally:
        torch.set_num_threads(threads)  # the recipe set this pytest process's count
    assert metrics["cpu_threads"] == json.loads((run / "metrics.json").read_text())["cpu_threads"] == 3


def test_existing_output_dir_is_refused(tmp_path):
    run_main(tmp_path)
    from peftlab import PeftlabError

    with pytest.raises(PeftlabError, match="holds a finished run; pass resume_from=latest"):
        run_main(tmp_path)


@pytest.mark.slow  # a recipe subprocess; tests/test_bad_inputs.py checks the same in-process
def test_cli_reports_bad_input_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, str(RECIPE), "strategy=lorra", f"output_dir={tmp_path}"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: strategy: unknown strategy 'lorra'")
    assert "Traceback" not in result.stderr


def test_predict_cli(tmp_path):
    _, run = run_main(tmp_path)
    result = subprocess.run([sys.executable, "-m", "peftlab.predict", str(run), "great", "awful"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["input"] for line in lines] == ["great", "awful"]
    assert all(line["label"] in ("rotten", "fresh") and 0.5 <= line["score"] <= 1 for line in lines)


@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_quantized_lora_run(tmp_path, bits):
    metrics, run = run_main(tmp_path, f"model.quantization={bits}", "model.dropout=0.0")
    assert 0 <= metrics["test"]["accuracy"] <= 1
    # Only the adapter and the head are saved: a few KB, not the quantized base.
    assert (run / "model" / "adapter_model.safetensors").stat().st_size < 200_000


def test_dropout_override_reaches_every_dropout_layer():
    from peftlab.backbones import load_backbone

    model = load_backbone("minilm", task="text", num_labels=2, num_hidden_layers=1, dropout=0.0).model
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(m.p == 0.0 for m in dropouts)


@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_quantized_parameter_count_matches_full_precision(bits):
    from peftlab import apply_strategy, count_parameters
    from peftlab.backbones import load_backbone

    def lora_count(quantization):
        model = load_backbone("minilm", task="text", num_labels=2, num_hidden_layers=1, quantization=quantization).model
        return count_parameters(apply_strategy(model, "lora", r=8))

    full, quantized = lora_count(None), lora_count(bits)
    # bitsandbytes packs two 4-bit values per byte; the count must still be of logical weights.
    assert quantized.total == full.total and quantized.trainable == full.trainable


@pytest.mark.slow  # inductor generates and compiles C++ for the forward, backward and evaluation graphs: minutes here
def test_compiled_run_trains_like_eager_and_loads(tmp_path):
    import peftlab
    from peftlab.tracking import read_log

    # Dropout off: inductor draws its own dropout masks. Every step's loss logged.
    exact = ["model.dropout=0", "strategy_options.lora.dropout=0", "train.log_every=1"]
    eager, eager_run = run_main(tmp_path / "eager", *exact)
    compiled, compiled_run = run_main(tmp_path / "compiled", *exact, "train.compile=true")
    losses = [[r["train/loss"] for r in read_log(run) if "train/loss" in r] for run in (compiled_run, eager_run)]
    assert len(losses[0]) == 6 and losses[0] == pytest.approx(losses[1], abs=1e-4)
    assert compiled["validation"]["loss"] == pytest.approx(eager["validation"]["loss"], abs=1e-4)
    texts = ["a warm, funny and moving film", "tedious and far too long"]
    torch.testing.assert_close(peftlab.load(compiled_run).probabilities(texts),
                               peftlab.load(eager_run).probabilities(texts), atol=1e-4, rtol=0)
