"""Export a run to ONNX: one graph from inputs to logits (pooling and head inside), checked against PyTorch.

    peftlab export RUN --format onnx [--quantize int8] [--output DIR]      # default DIR: RUN/onnx
    python -m peftlab.export RUN --format onnx

The graph is traced with torch.onnx.export's dynamo exporter (torch.export), with a dynamic batch axis and, for
text, a dynamic sequence axis. (The legacy TorchScript exporter gives wrong logits on transformers 5 encoders, by
0.01 to 0.08 on a tiny BERT, so it is not used.) Beside the graph go the tokenizer files (text) or the image
preprocessing (size, mean, std; in export.json), and the label names: the folder alone is enough to predict
(`peftlab.exported.load_onnx`, which the server also uses; layout in `peftlab.exported`).

What the graph holds, per strategy (decided by the strategy's record, `peftlab.strategies.Merge`):

| strategy                    | in the graph                                                         | exact        |
|-----------------------------|----------------------------------------------------------------------|--------------|
| full, head, partial, bitfit | the trained model as it is (a model of the base architecture)        | yes          |
| lora                        | folded into the base weights, W + (alpha/r)·B·A (merge_and_unload)   | yes          |
| ia3, vera, loha, lokr,      | folded into the base weights by peft's merge_and_unload              | yes          |
| adalora, peft (tuners)      |                                                                      |              |
| adapter                     | unmerged: the bottleneck adapters are ops of the graph (their        | yes          |
|                             | non-linearity does not fold)                                         |              |
| prefix, prompt, peft        | unmerged: the virtual tokens (prefix keys and values) are computed   | yes          |
| (prompt learning, LiLy)     | in the graph                                                         |              |
| quantization=4bit (head,    | frozen NF4 weights dequantized to fp32 nn.Linear; LoRA stays         | yes (1)      |
| bitfit, lora, adapter)      | unmerged beside them (peft folds only into bitsandbytes weights)     |              |
| quantization=8bit (any)     | refused in one line                                                  | no (2)       |
| pooling=mean (any)          | the masked mean over tokens (peftlab.pooling's hook), traced inside  | yes          |

(1) bitsandbytes' 4-bit layer itself dequantizes its weights to the fp32 compute dtype before each matmul.
(2) LLM.int8 also quantizes the activations at run time, which an fp32 graph does not: MiniLM's logits move by ~1e-3.
(full and partial refuse quantized weights at training, so these rows cover every quantized run.)

Parity, checked by the command on the run's test split (reloaded with `peftlab.data.load_data` from its
config.yaml): onnxruntime's fp32 logits within 1e-4 of PyTorch's and the same label for every example, or the
command fails (exit 1, report kept). With `--quantize int8`, onnxruntime's dynamic quantization
(`quantize_dynamic`: int8 weights, activations quantized per batch at run time) writes model.int8.onnx; its accuracy
change and size against fp32 are reported, not required. It suits MatMul-heavy graphs (MiniLM: 3.2x PyTorch's
throughput, -0.24 points); on a CNN it hurts (EfficientNet-Lite0: ConvInteger has no fast kernel and per-tensor int8
depthwise weights cost 7.6 points; benchmarks/README.md). Everything goes to export_report.json in the folder.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from peftlab.config import load_config
from peftlab.console import quiet_onnx_export, quiet_third_party
from peftlab.errors import PeftlabError
from peftlab.exported import EXPORT_FILE, INT8_FILE, ONNX_FILE, REPORT_FILE, OnnxRun
from peftlab.runs import CONFIG_FILE, METRICS_FILE

LOGITS_ATOL = 1e-4
"""Largest |onnxruntime logit - PyTorch logit| the fp32 export may show on any test example."""
DEFAULT_SUBDIR = "onnx"
QUANTIZE_CHOICES = ("int8",)
CHECK_BATCH_SIZE = 64


class ParityError(Exception):
    """The exported graph computes something else than the run: the export is kept for inspection, the command
    fails."""


def check_exportable(quantization: Optional[str]) -> None:
    """Refuse, in one line, a run whose function no fp32 graph reproduces exactly (`model.quantization=8bit`)."""
    if quantization == "8bit":
        raise PeftlabError("cannot export an 8-bit run exactly: bitsandbytes' LLM.int8 layers also quantize the "
                           "activations at run time, which an fp32 graph does not (MiniLM logits move by ~1e-3); "
                           "train it with model.quantization=4bit (dequantized exactly) or without quantization")


def dequantize_4bit(model: nn.Module) -> int:
    """Replace every bitsandbytes 4-bit linear layer by an fp32 nn.Linear holding its dequantized weights; returns
    how many. Exact: `bnb.nn.Linear4bit` itself dequantizes its weights to the fp32 compute dtype before each matmul.
    """
    bnb = bitsandbytes()
    if bnb is None:
        return 0
    from peft.utils.integrations import dequantize_bnb_weight

    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, bnb.nn.Linear4bit):
                linear = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                linear.weight = nn.Parameter(dequantize_bnb_weight(child.weight).float(), requires_grad=False)
                if child.bias is not None:
                    linear.bias = nn.Parameter(child.bias.detach().float(), requires_grad=False)
                setattr(parent, name, linear)
                replaced += 1
    return replaced


def bitsandbytes():
    """The bitsandbytes module, or None where it is not installed (then no run was quantized here)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return None
    return bnb


class LogitsGraph(nn.Module):
    """`model(**inputs).logits` with the inputs as positional tensors in `input_names` order: what the exporter
    traces, so the graph's inputs are the tokenizer's (or `pixel_values`) and its one output is `logits`."""

    def __init__(self, model: nn.Module, input_names: list[str]):
        super().__init__()
        self.model = model
        self.input_names = list(input_names)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.model(**dict(zip(self.input_names, inputs))).logits


def graph_model(model: nn.Module) -> tuple[nn.Module, str]:
    """An adapted model made plain for tracing (folded, dequantized: see the module's table), and a line saying what
    the graph holds. Changes `model` in place: take PyTorch's reference logits first."""
    from peftlab.saving import fold
    from peftlab.strategies import Merge, applied_strategy

    bnb = bitsandbytes()
    if bnb is not None and any(isinstance(module, bnb.nn.Linear8bitLt) for module in model.modules()):
        check_exportable("8bit")
    applied = applied_strategy(model)
    record = applied.record
    dequantized = dequantize_4bit(model)
    if record.merge is Merge.PLAIN:
        held = f"{record.name}: the trained model as it is"
    elif record.merge is Merge.FOLD and not dequantized:
        model = fold(model)
        held = f"{record.name}: folded into the base weights"
    else:  # NOT_FOLDABLE, or LoRA over dequantized 4-bit layers (peft folds only into bitsandbytes weights)
        held = f"{record.name}: unmerged, its modules are ops of the graph"
    if dequantized:
        held += f"; {dequantized} 4-bit linear layers dequantized to fp32"
    if applied.pooling == "mean":
        held += "; masked mean pooling inside"
    return model.eval(), held


def example_inputs(run) -> dict[str, torch.Tensor]:
    """Inputs to trace with: batch 2 and (text) a padded sequence, so neither axis is traced at size 1, which
    torch.export would fix as a constant."""
    if run.task == "text":
        return run.preprocess(["an example review to trace the graph with, long enough to pad the other",
                                  "a short one"])
    size = run.cfg.data.image_size
    return {"pixel_values": torch.zeros(2, 3, size, size)}


def write_onnx(model: nn.Module, inputs: dict[str, torch.Tensor], path: Path) -> None:
    """Trace `model` on `inputs` into one ONNX file (weights inside) with dynamic batch and sequence axes."""
    names = list(inputs)
    axes = [{0: "batch", 1: "sequence"} if tensor.dim() == 2 else {0: "batch"} for tensor in inputs.values()]
    with torch.no_grad():
        torch.onnx.export(LogitsGraph(model, names).eval(), tuple(inputs.values()), str(path), input_names=names,
                          output_names=["logits"], dynamic_shapes=(tuple(axes),), dynamo=True, external_data=False,
                          verbose=False)


def check_output_folder(output_dir: Path) -> None:
    """Refuse an --output that exists and is not an earlier export (peftlab never writes into others' folders)."""
    if output_dir.exists() and not output_dir.is_dir():
        raise PeftlabError(f"--output {output_dir} is a file; choose a folder path")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not (output_dir / EXPORT_FILE).is_file():
        raise PeftlabError(f"--output {output_dir} is not empty and holds no earlier export ({EXPORT_FILE}); choose a "
                           f"new or empty folder")


def export_info(run, input_names: list[str]) -> dict[str, Any]:
    """export.json: what `OnnxRun` needs (task, labels, inputs, preprocessing) and what the run was."""
    from peftlab.backbones import portable_name

    cfg = run.cfg
    if run.task == "text":
        preprocessing = {"max_length": cfg.data.max_length, "tokenizer": "the tokenizer files in this folder",
                         "padding": "to the longest text of a batch", "truncation": True}
    else:
        preprocessing = {"image_size": cfg.data.image_size, "image_mean": list(run.backbone.image_mean),
                         "image_std": list(run.backbone.image_std),
                         "steps": "RGB, bilinear resize to image_size x image_size, pixels / 255, (x - mean) / std "
                                  "per channel, CHW float32"}
    metrics_path = run.run_dir / METRICS_FILE
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    return {
        "format": "onnx", "task": run.task, "label_names": run.label_names, "inputs": input_names,
        "outputs": ["logits"], "preprocessing": preprocessing,
        "run": {"source": str(run.run_dir), "base": portable_name(cfg.model.name), "strategy": cfg.strategy,
                "strategy_options": cfg.strategy_options.get(cfg.strategy, {}), "pooling": cfg.model.pooling,
                "quantization": cfg.model.quantization, "data": cfg.data.name,
                "test_metrics": metrics.get("test")},
    }


def load_test_split(run) -> tuple[list, np.ndarray]:
    """The run's test inputs and label ids, reloaded as its recipe loaded them (config.yaml's `data` section)."""
    from peftlab.data import load_data

    data = load_data(run.cfg.data, run.task)
    if list(data.label_names) != list(run.label_names):
        raise PeftlabError(f"the data of run {run.run_dir} now has labels {list(data.label_names)}, but the run was "
                           f"trained on {run.label_names}; the data source changed, so its test split cannot check "
                           f"the export")
    test = data.splits["test"]
    return list(test["text" if run.task == "text" else "image"]), np.asarray(test["label"])


def export_run(run_dir: str | Path, output_dir: Optional[str | Path] = None, *, quantize: Optional[str] = None,
               log=print) -> dict[str, Any]:
    """Export the run in `run_dir` to ONNX in `output_dir` (default `<run_dir>/onnx`), check parity on its test split,
    optionally add an int8 graph; returns the report (also written as export_report.json).

    Raises PeftlabError for a run that cannot be exported (one line), ParityError when the graph's logits differ.
    """
    from peftlab.loading import load, refuse_multitask

    run_dir = Path(run_dir)
    refuse_multitask(run_dir)
    if quantize not in (None, *QUANTIZE_CHOICES):
        raise PeftlabError(f"--quantize {quantize} is not supported; choose {' or '.join(QUANTIZE_CHOICES)}")
    if (run_dir / CONFIG_FILE).is_file():  # refuse before loading the model (seconds) when the config says so
        check_exportable(load_config(str(run_dir / CONFIG_FILE)).model.quantization)
    output_dir = Path(output_dir) if output_dir is not None else run_dir / DEFAULT_SUBDIR
    check_output_folder(output_dir)
    run = load(run_dir)
    inputs, labels = load_test_split(run)
    batches = [run.preprocess(inputs[i:i + CHECK_BATCH_SIZE]) for i in range(0, len(inputs), CHECK_BATCH_SIZE)]
    log(f"PyTorch logits on {len(inputs)} test examples of {run_dir}")
    with torch.no_grad():
        torch_logits = np.concatenate([run.model(**batch).logits.float().numpy() for batch in batches])

    model, held = graph_model(run.model)
    output_dir.mkdir(parents=True, exist_ok=True)
    for stale in (ONNX_FILE, INT8_FILE, REPORT_FILE):  # an earlier export's files must not outlive this one
        (output_dir / stale).unlink(missing_ok=True)
    example = example_inputs(run)
    log(f"tracing the graph ({held})")
    start = time.perf_counter()
    write_onnx(model, example, output_dir / ONNX_FILE)
    export_s = time.perf_counter() - start
    if run.task == "text":
        run.backbone.tokenizer.save_pretrained(output_dir)
    (output_dir / EXPORT_FILE).write_text(json.dumps(export_info(run, list(example)), indent=2) + "\n")

    fp32 = OnnxRun(output_dir)
    onnx_logits = np.concatenate([fp32.run_graph(batch) for batch in batches])
    parity = compare(torch_logits, onnx_logits, labels)
    report: dict[str, Any] = {
        "run": str(run_dir), "format": "onnx", "graph": held, "export_s": round(export_s, 1),
        "test_examples": len(inputs),
        "files": {ONNX_FILE: (output_dir / ONNX_FILE).stat().st_size},
        "parity": {**parity, "atol": LOGITS_ATOL,
                   "passed": parity["max_abs_logit_diff"] <= LOGITS_ATOL and parity["labels_identical"]},
        "versions": {package: importlib.metadata.version(package)
                     for package in ("torch", "transformers", "peft", "onnx", "onnxruntime")},
    }
    if quantize == "int8":
        report["int8"] = quantize_int8(output_dir, batches, onnx_logits, labels)
        report["files"][INT8_FILE] = report["int8"]["size_bytes"]
    (output_dir / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    if not report["parity"]["passed"]:
        raise ParityError(f"the ONNX graph differs from the run: max |logit difference| "
                          f"{parity['max_abs_logit_diff']:.2e} (allowed {LOGITS_ATOL:g}), "
                          f"{parity['label_mismatches']} of {len(inputs)} test labels differ; the export in "
                          f"{output_dir} is kept for inspection (see {REPORT_FILE})")
    return report


def compare(reference: np.ndarray, logits: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """How far `logits` are from the `reference` logits, and both accuracies on `labels`."""
    same = reference.argmax(-1) == logits.argmax(-1)
    return {"max_abs_logit_diff": float(np.abs(reference - logits).max()), "labels_identical": bool(same.all()),
            "label_mismatches": int((~same).sum()),
            "reference_accuracy": float((reference.argmax(-1) == labels).mean()),
            "accuracy": float((logits.argmax(-1) == labels).mean())}


def quantize_int8(output_dir: Path, batches: list[dict], fp32_logits: np.ndarray, labels: np.ndarray) -> dict:
    """Write model.int8.onnx with onnxruntime's dynamic quantization; its accuracy and size against fp32."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(output_dir / ONNX_FILE, output_dir / INT8_FILE, weight_type=QuantType.QInt8)
    int8_logits = np.concatenate([OnnxRun(output_dir, int8=True).run_graph(batch) for batch in batches])
    found = compare(fp32_logits, int8_logits, labels)
    size, fp32_size = (output_dir / INT8_FILE).stat().st_size, (output_dir / ONNX_FILE).stat().st_size
    return {"method": "onnxruntime.quantization.quantize_dynamic, QInt8 weights", "accuracy": found["accuracy"],
            "fp32_accuracy": found["reference_accuracy"],
            "accuracy_change": found["accuracy"] - found["reference_accuracy"],
            "labels_same_as_fp32": float(1 - found["label_mismatches"] / len(labels)),
            "max_abs_logit_diff_vs_fp32": found["max_abs_logit_diff"], "size_bytes": size,
            "size_vs_fp32": round(size / fp32_size, 4)}


def summary(report: dict[str, Any], output_dir: Path) -> list[str]:
    """The lines the command prints: where the export is, its parity and (int8) accuracy and size."""
    parity = report["parity"]
    lines = [f"{output_dir / ONNX_FILE}: {report['files'][ONNX_FILE] / 1e6:.1f} MB ({report['graph']})",
             f"parity on {report['test_examples']} test examples: max |logit difference| "
             f"{parity['max_abs_logit_diff']:.1e} (allowed {parity['atol']:g}), labels "
             f"{'identical' if parity['labels_identical'] else 'DIFFERENT'}, accuracy {parity['accuracy']:.4f} "
             f"(PyTorch {parity['reference_accuracy']:.4f})"]
    if "int8" in report:
        int8 = report["int8"]
        lines.append(f"{output_dir / INT8_FILE}: {int8['size_bytes'] / 1e6:.1f} MB ({int8['size_vs_fp32']:.2f}x fp32), "
                     f"accuracy {int8['accuracy']:.4f} ({int8['accuracy_change']:+.4f} vs fp32), "
                     f"{int8['labels_same_as_fp32']:.1%} of labels as fp32")
    lines.append(f"report: {output_dir / REPORT_FILE}")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="peftlab export", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", help="a finished run's output_dir")
    parser.add_argument("--format", choices=["onnx"], required=True, help="export format")
    parser.add_argument("--quantize", choices=QUANTIZE_CHOICES,
                        help="also write a dynamically quantized graph (model.int8.onnx) and report its accuracy")
    parser.add_argument("--output", help=f"export folder (default: RUN/{DEFAULT_SUBDIR})")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and third-party notices")
    args = parser.parse_args(argv)
    quiet_third_party(args.debug)  # also when run as `python -m peftlab.<command>`, not through `peftlab`
    output_dir = Path(args.output) if args.output else Path(args.run_dir) / DEFAULT_SUBDIR
    log = lambda line: print(line, file=sys.stderr)  # noqa: E731  (progress on stderr, the results on stdout)
    try:
        with quiet_onnx_export(args.debug):
            report = export_run(args.run_dir, output_dir, quantize=args.quantize, log=log)
    except (PeftlabError, ParityError) as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2 if isinstance(err, PeftlabError) else 1)
    print("\n".join(summary(report, output_dir)))


if __name__ == "__main__":
    main()
