"""`peftlab export RUN --format onnx`: the graph computes the run's logits (every strategy), with dynamic batch and
sequence axes; the int8 graph and its report; refusals in one line; the export folder alone predicts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch

from peftlab import PeftlabError, apply_strategy, load
from peftlab import export as export_module
from peftlab.config import load_config, save_config
from peftlab.export import LOGITS_ATOL, graph_model, main as export_main, write_onnx
from peftlab.exported import EXPORT_FILE, INT8_FILE, ONNX_FILE, REPORT_FILE, load_onnx
from tests.test_predict import ROOT, run_main, train_runs
from tests.tiny_models import build, example_batch

DEFAULT_TEXT_CONFIG = ROOT / "recipes" / "configs" / "minilm_lora_rotten_tomatoes.yaml"

# (family, strategy, options, pooling): every strategy once, over text, ViT and plain-torch CNN backbones. A trace
# takes 5-50 s (torch.export), so only the default text run's kind and an unmerged CNN adapter are in the fast suite.
GRAPH_CASES = [
    ("bert", "lora", {"r": 4}, "mean"),  # the default text run's kind: LoRA + mean pooling
    ("cnn", "adapter", {"kind": "pfeiffer", "size": 4, "locations": ["2"]}, "cls"),
    *(pytest.param(*case, marks=pytest.mark.slow) for case in [
        ("bert", "full", {}, "cls"),
        ("vit", "head", {}, "cls"),
        ("cnn", "partial", {"top_k": 1}, "cls"),
        ("bert", "bitfit", {}, "mean"),
        ("cnn", "lora", {"r": 2}, "cls"),  # LoRA on 1x1 convolutions
        ("bert", "adapter", {"kind": "houlsby", "size": 4}, "mean"),
    ]),
]


def trained_like(family: str, strategy: str, options: dict, pooling: str):
    """A tiny adapted model whose trainable tensors are random, so LoRA's B and adapters' up projections are not
    the zeros they start at (folding a zero update would prove nothing)."""
    model = apply_strategy(build(family), strategy, pooling=pooling, **options)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return model.eval()


def model_inputs(family: str, batch: int, seed: int) -> dict[str, torch.Tensor]:
    inputs = {k: v for k, v in example_batch(family, batch=batch, seed=seed).items() if k != "labels"}
    if "input_ids" in inputs and seed % 2:  # another sequence length than the traced one
        inputs = {k: v[:, :5] for k, v in inputs.items()}
    return inputs


def case_id(case) -> str:
    family, strategy, _, pooling = case.values if hasattr(case, "values") else case
    return f"{family}-{strategy}-{pooling}"


@pytest.mark.parametrize("family,strategy,options,pooling", GRAPH_CASES, ids=[case_id(c) for c in GRAPH_CASES])
def test_graph_computes_the_adapted_models_logits(family, strategy, options, pooling, tmp_path):
    model = trained_like(family, strategy, options, pooling)
    checks = [model_inputs(family, batch, seed) for batch, seed in ((1, 1), (5, 2), (3, 3))]
    with torch.no_grad():
        expected = [model(**inputs).logits.numpy() for inputs in checks]
    plain, held = graph_model(model)
    assert held.startswith(strategy)
    write_onnx(plain, model_inputs(family, 2, 0), tmp_path / "model.onnx")
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    for inputs, reference in zip(checks, expected):
        names = [node.name for node in session.get_inputs()]
        logits = session.run(["logits"], {name: inputs[name].numpy() for name in names})[0]
        assert logits.shape == reference.shape  # batch 1, 5 and 3; text also at 5 tokens (traced at 9)
        np.testing.assert_allclose(logits, reference, atol=LOGITS_ATOL, rtol=0)


def test_lora_is_folded_and_adapters_are_not():
    lora, held = graph_model(trained_like("bert", "lora", {"r": 4}, "mean"))
    assert "folded" in held and "mean pooling" in held
    assert not any("lora_" in name for name, _ in lora.named_parameters())
    adapter, held = graph_model(trained_like("bert", "adapter", {"kind": "houlsby", "size": 4}, "cls"))
    assert "unmerged" in held and any("peftlab_adapter" in name for name, _ in adapter.named_parameters())


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """`peftlab export` in-process: exit code, stdout, stderr."""
    return run_main(export_main, argv)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """The one-step tiny text (MiniLM, 1 layer, LoRA + mean pooling) and image (tiny ViT, LoRA) run folders."""
    return train_runs(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def exported(runs) -> dict[str, Path]:
    """The runs, each exported with `peftlab export RUN --format onnx --quantize int8` (into RUN/onnx)."""
    for kind, run in runs.items():
        code, stdout, stderr = run_cli([str(run), "--format", "onnx", "--quantize", "int8"])
        assert code == 0, stderr
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["text", "image"])
def test_export_writes_a_checked_self_contained_folder(exported, kind):
    folder = exported[kind] / "onnx"
    report = json.loads((folder / REPORT_FILE).read_text())
    parity = report["parity"]
    assert parity["passed"] and parity["labels_identical"] and parity["max_abs_logit_diff"] <= LOGITS_ATOL
    assert report["test_examples"] > 0 and parity["accuracy"] == parity["reference_accuracy"]
    int8 = report["int8"]
    assert int8["size_bytes"] == (folder / INT8_FILE).stat().st_size
    assert int8["size_bytes"] < (folder / ONNX_FILE).stat().st_size
    assert int8["accuracy_change"] == pytest.approx(int8["accuracy"] - int8["fp32_accuracy"])
    info = json.loads((folder / EXPORT_FILE).read_text())
    assert info["task"] == kind and info["label_names"] == load(exported[kind]).label_names
    if kind == "text":
        assert (folder / "tokenizer.json").is_file() and info["run"]["base"] == "sentence-transformers/all-MiniLM-L6-v2"
    else:
        assert info["preprocessing"]["image_size"] == 16 and len(info["preprocessing"]["image_mean"]) == 3


def inputs_of(kind: str, run: Path) -> list:
    if kind == "text":
        return ["a gripping, beautifully shot film", "dull", "not bad at all, though far too long for its story",
                "yes", "an utter mess from start to finish, with nothing to recommend it"]
    return sorted(str(p) for p in (run.parent / "images").rglob("*.png"))[:5]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["text", "image"])
def test_export_folder_alone_predicts_as_the_run(exported, kind, tmp_path):
    run = load(exported[kind])
    inputs = inputs_of(kind, exported[kind])
    expected = {n: run.probabilities(inputs[:n]).numpy() for n in (1, 5)}
    # Only the export folder, somewhere else; the run folder renamed away while it is used.
    copy = tmp_path / "export"
    shutil.copytree(exported[kind] / "onnx", copy)
    hidden = exported[kind].with_name(exported[kind].name + ".hidden")
    exported[kind].rename(hidden)
    try:
        onnx_run = load_onnx(copy)
        assert onnx_run.task == kind and onnx_run.label_names == run.label_names
        for n, probabilities in expected.items():  # batch 1 and 5 (texts of different lengths)
            np.testing.assert_allclose(onnx_run.probabilities(inputs[:n]).numpy(), probabilities, atol=1e-5)
        onnx_predictions, predictions = onnx_run.predict(inputs, batch_size=2), run.predict(inputs)
        assert [p.keys() for p in onnx_predictions] == [p.keys() for p in predictions]  # the same interface
        assert [p["label"] for p in onnx_predictions] == [p["label"] for p in predictions]
        int8 = load_onnx(copy, int8=True).probabilities(inputs)
        assert int8.shape == (5, len(run.label_names))
        with pytest.raises(PeftlabError, match="is not a text" if kind == "text" else "is not an image file"):
            onnx_run.predict([3] if kind == "text" else ["no such file.png"])
    finally:
        hidden.rename(exported[kind])


def test_refusals_are_one_line_with_exit_2(tmp_path):
    # Refused before anything loads, so a run folder's config.yaml is all these cases need.
    eight_bit, other_run = tmp_path / "eight_bit", tmp_path / "other_run"
    for folder, quantization in ((eight_bit, "8bit"), (other_run, None)):
        folder.mkdir()
        save_config(load_config(str(DEFAULT_TEXT_CONFIG), [f"model.quantization={quantization or 'null'}"]),
                    folder / "config.yaml")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    cases = [([str(eight_bit), "--format", "onnx"], "cannot export an 8-bit run exactly"),
             ([str(tmp_path / "nothing"), "--format", "onnx"], "is not a finished peftlab run"),
             ([str(other_run), "--format", "onnx", "--output", str(foreign)], "is not empty and holds no")]
    for argv, message in cases:
        code, stdout, stderr = run_cli(argv)
        lines = stderr.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], stderr
    assert (foreign / "notes.txt").read_text() == "mine" and len(list(foreign.iterdir())) == 1
    with pytest.raises(PeftlabError, match="is not a peftlab ONNX export"):
        load_onnx(foreign)


@pytest.mark.slow
def test_failed_parity_exits_1_and_keeps_the_report(exported, tmp_path, monkeypatch):
    monkeypatch.setattr(export_module, "LOGITS_ATOL", -1.0)  # no graph can pass: the failure path must be real
    code, stdout, stderr = run_cli([str(exported["image"]), "--format", "onnx", "--output", str(tmp_path / "out")])
    assert code == 1 and "the ONNX graph differs from the run" in stderr
    assert json.loads((tmp_path / "out" / REPORT_FILE).read_text())["parity"]["passed"] is False


@pytest.mark.slow
@pytest.mark.parametrize("strategy,options", [("lora", {"r": 4}), ("adapter", {"kind": "pfeiffer", "size": 8})])
def test_efficientnet_lite_graph(strategy, options, tmp_path):
    """The packaged plain-torch EfficientNet-Lite0 architecture (random weights: nothing to download)."""
    from peftlab.backbones import build_efficientnet_lite

    torch.manual_seed(0)
    model = apply_strategy(build_efficientnet_lite("efficientnet-lite0", 4, pretrained=False).eval(), strategy,
                           **options)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)
    model.eval()
    images = {n: torch.randn(n, 3, 64, 64) for n in (1, 5)}
    with torch.no_grad():
        expected = {n: model(pixel_values=x).logits.numpy() for n, x in images.items()}
    plain, _ = graph_model(model)
    write_onnx(plain, {"pixel_values": torch.randn(2, 3, 64, 64)}, tmp_path / "model.onnx")
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    for n, x in images.items():
        np.testing.assert_allclose(session.run(["logits"], {"pixel_values": x.numpy()})[0], expected[n],
                                   atol=LOGITS_ATOL, rtol=0)


@pytest.mark.slow
def test_4bit_is_dequantized_exactly_and_8bit_refused(tmp_path):
    from peftlab.backbones import load_backbone

    backbone = load_backbone("minilm", task="text", num_labels=2, num_hidden_layers=1, quantization="4bit")
    model = apply_strategy(backbone.model, "lora", pooling="mean", r=4).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    batch = dict(backbone.tokenizer(["a fine film, all told", "bad"], padding=True, return_tensors="pt"))
    with torch.no_grad():
        expected = model(**batch).logits.numpy()
    plain, held = graph_model(model)
    assert "4-bit linear layers dequantized" in held and "unmerged" in held
    write_onnx(plain, batch, tmp_path / "model.onnx")
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {k: v.numpy() for k, v in batch.items()})[0]
    np.testing.assert_allclose(logits, expected, atol=LOGITS_ATOL, rtol=0)

    eight = load_backbone("minilm", task="text", num_labels=2, num_hidden_layers=1, quantization="8bit")
    with pytest.raises(PeftlabError, match="cannot export an 8-bit run exactly"):
        graph_model(apply_strategy(eight.model, "lora", r=4))
