"""Load an ONNX export (`peftlab export RUN --format onnx`) for inference, with the interface of `peftlab.load`.

    from peftlab.exported import load_onnx
    run = load_onnx("outputs/minilm_lora_rotten_tomatoes/onnx")         # int8=True loads model.int8.onnx
    run.predict(["a gripping, beautifully shot film"])   # [{"input": ..., "label": "fresh", "score": 0.93, ...}]
    run.probabilities(texts)                             # (N, num_labels) tensor; run.label_names names the columns
    run.task, run.metadata                               # "text" | "image"; export.json: base, strategy, test metrics

The export folder alone is enough: the graph, the tokenizer files or the image preprocessing, and the label names are
in it. Neither the run folder nor peft, bitsandbytes or the base model's weights are read; onnxruntime runs the graph.

Folder layout (written by `peftlab.export`):
    model.onnx            inputs -> logits (pooling and head inside), dynamic batch (and sequence) axes, fp32
    model.int8.onnx       with --quantize int8: the same graph, weights quantized to int8 (dynamic quantization)
    export.json           task, label names, model inputs, preprocessing, and what the run was (base, strategy, metrics)
    export_report.json    the export's parity check (and int8 accuracy and size), as the command printed it
    tokenizer files       text exports: the run's tokenizer (`AutoTokenizer.from_pretrained(<folder>)` loads it)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from peftlab.errors import PeftlabError
from peftlab.inputs import Preprocessing, label_predictions

ONNX_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
EXPORT_FILE = "export.json"
REPORT_FILE = "export_report.json"


def load_onnx(export_dir: str | Path, *, int8: bool = False, threads: Optional[int] = None) -> "OnnxRun":
    """The export in `export_dir` ready to label inputs (see `OnnxRun`)."""
    return OnnxRun(export_dir, int8=int8, threads=threads)


class OnnxRun:
    """An exported run in onnxruntime: `.probabilities(inputs)`, `.predict(inputs)`, `.label_names`, `.task`, as a
    PyTorch run from `peftlab.load` has them, so a caller (the server) can take either."""

    def __init__(self, export_dir: str | Path, *, int8: bool = False, threads: Optional[int] = None):
        """Args:
            int8: run `model.int8.onnx` (exported with `--quantize int8`) instead of the fp32 `model.onnx`.
            threads: onnxruntime's intra-op threads (default: its own choice, one per core).
        """
        import onnxruntime

        export_dir = Path(export_dir)
        info_path = export_dir / EXPORT_FILE
        if not info_path.is_file():
            raise PeftlabError(f"{export_dir} is not a peftlab ONNX export (no {EXPORT_FILE}); make one with "
                               f"`peftlab export RUN --format onnx`")
        try:
            info = json.loads(info_path.read_text(encoding="utf-8"))
            self.task, self.label_names = info["task"], list(info["label_names"])
            preprocessing = info["preprocessing"]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
            raise PeftlabError(f"{info_path} is damaged ({type(err).__name__}: {err}); export the run again") from err
        model_path = export_dir / (INT8_FILE if int8 else ONNX_FILE)
        if not model_path.is_file():
            hint = " (export with --quantize int8)" if int8 else ""
            raise PeftlabError(f"{export_dir} holds no {model_path.name}{hint}; export the run again")
        self.export_dir, self.model_path, self.metadata = export_dir, model_path, info
        options = onnxruntime.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        try:
            self.session = onnxruntime.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime's own error types: a truncated or foreign file
            raise PeftlabError(f"onnxruntime cannot load {model_path} ({str(err).splitlines()[0]}); export the run "
                               f"again") from err
        self.input_names = [node.name for node in self.session.get_inputs()]
        if self.task == "text":
            from transformers import AutoTokenizer

            self.preprocessing = Preprocessing("text", export_dir, tokenizer=AutoTokenizer.from_pretrained(export_dir),
                                               max_length=preprocessing["max_length"])
        else:
            from peftlab.data.transforms import build_image_transform

            transform = build_image_transform(preprocessing["image_size"], tuple(preprocessing["image_mean"]),
                                              tuple(preprocessing["image_std"]), train=False)
            self.preprocessing = Preprocessing("image", export_dir, transform=transform)

    def preprocess(self, inputs: list) -> dict[str, torch.Tensor]:
        """The graph's input batch for texts (tokenized and padded as in training), or image paths / PIL images
        (resized and normalised as at evaluation)."""
        return self.preprocessing(inputs)

    def run_graph(self, batch: dict[str, Any]) -> np.ndarray:
        """The graph's (N, num_labels) float32 logits for an input batch (tensors or arrays by input name)."""
        feeds = {name: np.asarray(batch[name]) for name in self.input_names}
        return self.session.run(["logits"], feeds)[0]

    def logits(self, inputs: list) -> torch.Tensor:
        """Float logits (N, num_labels) for texts, or image paths / PIL images."""
        return torch.from_numpy(self.run_graph(self.preprocess(inputs))).float()

    def probabilities(self, inputs: list) -> torch.Tensor:
        """Class probabilities (N, num_labels) for texts, or image paths / PIL images; columns follow label_names."""
        return self.logits(inputs).softmax(dim=-1)

    def predict(self, inputs: list, batch_size: int = 64, progress: bool = False) -> list[dict]:
        """One {"input", "label", "score", "probabilities": {label name: probability}} dict per input, labelled in
        batches of `batch_size` (with a progress bar on stderr when `progress` and there is more than one batch)."""
        return label_predictions(self.probabilities, self.label_names, inputs, batch_size, progress)
