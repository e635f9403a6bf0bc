"""The GPU check's report: per run of the GPU grids, samples/s, peak GPU memory and the fraction of the GPU's bf16 peak.

    bash benchmarks/gpu_check.sh                   # runs grids/gpu_text.yaml and gpu_vision.yaml, then this
    python benchmarks/gpu_check.py gpu_check_out   # this report again, from gpu_check_out/records/<grid>/*.json

Writes OUT/gpu_check.json (the device, its bf16 peak, the rules below and one row per finished run) and
OUT/gpu_check.md (the same as a table). Per run:
- samples/s: the record's own `samples_per_s`, training samples per second of training steps (validation and
  checkpoints excluded; the Trainer baseline: epochs x samples over trainer.train() without its evaluations and saves).
- peak MB: the record's `peak_memory_mb`, torch.cuda.max_memory_allocated on a GPU (max RSS of the process on CPU).
- model TFLOP/s = samples/s x training FLOPs per sample, with training FLOPs = 3 x forward for full fine-tuning (the
  backward pass costs twice the forward) and 2 x forward for the other strategies (frozen weights: the backward pass
  computes activation gradients only; the adapters' own FLOPs are negligible). Forward FLOPs: torch.utils.flop_counter
  over one forward of the unquantized backbone on one example of the run's mean padded length: data.max_length for
  the Trainer (it pads every text to it), the recipe's own training batches for the recipe (per-batch padding with
  length grouping, first epoch's order), data.image_size for images.
- of bf16 peak = model FLOP/s / the GPU's dense bf16 peak (BF16_PEAK_TFLOPS); empty for other GPUs and on CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from peftlab.config import load_config  # noqa: E402
from peftlab.errors import PeftlabError  # noqa: E402
from peftlab.harness.programs import REPO_ROOT  # noqa: E402

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's data sheets, TFLOP/s, by a part of the name that
# torch.cuda.get_device_name reports ("NVIDIA H100 80GB HBM3" is the SXM part; "NVIDIA H100 PCIe" is not).
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "A100": 312.0}


def bf16_peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU by its torch.cuda.get_device_name, or None when it is not in the table."""
    name = device_name.upper()
    if "H100" in name and "HBM3" in name:  # the SXM H100s call themselves "H100 80GB HBM3"
        name += " H100 SXM"
    return next((peak for part, peak in BF16_PEAK_TFLOPS.items() if part in name), None)


def training_flops_per_sample(cfg, task: str, trainer_side: bool) -> tuple[float, float | int]:
    """Training FLOPs per example (see the module docstring) and the sequence length or image size counted."""
    from torch.utils.flop_counter import FlopCounterMode

    model, size, sample = _forward_inputs(cfg, task, trainer_side)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**sample)
    return (3 if cfg.strategy == "full" else 2) * counter.get_total_flops(), size


def _forward_inputs(cfg, task: str, trainer_side: bool):
    """The unquantized backbone on CPU, the size counted, and one example of that size."""
    data, backbone = _data_and_backbone(cfg.data, dataclasses.replace(cfg.model, quantization=None), task)
    model = backbone.model.eval()
    if task == "image":
        size = cfg.data.image_size
        return model, size, {"pixel_values": torch.zeros(1, 3, size, size)}
    size = cfg.data.max_length if trainer_side else _mean_padded_length(cfg, data, backbone.tokenizer)
    length = max(1, round(size))
    ids = torch.full((1, length), backbone.tokenizer.pad_token_id or 0, dtype=torch.long)
    return model, round(size, 1), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


_LOADED: dict[str, tuple] = {}  # runs of one grid share their data and backbone: load each once


def _data_and_backbone(data_cfg, model_cfg, task: str):
    from peftlab.backbones import load_base
    from peftlab.data import load_data

    key = repr((data_cfg, model_cfg, task))
    if key not in _LOADED:
        data = load_data(data_cfg, task=task)
        _LOADED[key] = data, load_base(model_cfg, task=task, label_names=data.label_names)
    return _LOADED[key]


def _mean_padded_length(cfg, data, tokenizer) -> float:
    """Tokens per example in the recipe's training batches: each padded to its longest text, as the recipe batches."""
    from peftlab.data import make_text_dataloader, tokenize_dataset

    tokenized = tokenize_dataset(data.splits, tokenizer, cfg.data.max_length)["train"]
    loader = make_text_dataloader(tokenized, tokenizer, cfg.train.batch_size, shuffle=True,
                                  group_by_length=cfg.train.group_by_length, seed=cfg.train.seed)
    padded = [batch["input_ids"].numel() for batch in loader]
    return sum(padded) / len(tokenized)


def report_rows(records: list[dict]) -> list[dict]:
    """One row per finished run: its figures (module docstring) and what they were measured on."""
    rows = []
    for record in records:
        if record.get("status") != "ok":
            rows.append({"grid": record["grid"], "cell": record["cell"], "status": record.get("status"),
                         "error": record.get("error")})
            continue
        device = record["environment"]["device"]
        run_dir = REPO_ROOT / record["run_dir"]
        cfg = load_config(str(run_dir / "config.yaml"))
        task = "image" if "image" in record["program"] else "text"  # image_classification, trainer_image
        if task == "text" and not isinstance(cfg.data.max_length, int):  # `auto`: the length the run resolved
            rules = json.loads((run_dir / "metrics.json").read_text()).get("data_rules") or {}
            if "max_length" not in rules:
                raise PeftlabError(f"{run_dir}: data.max_length=auto and metrics.json holds no resolved length; "
                                   "set data.max_length in the grid")
            cfg.data.max_length = rules["max_length"]
        trainer_side = record["kind"] == "job" and record["program"].startswith("trainer")
        flops, size = training_flops_per_sample(cfg, task, trainer_side)
        model_flops = record["samples_per_s"] * flops
        peak = bf16_peak_tflops(device.removeprefix("cuda: ")) if device.startswith("cuda") else None
        rows.append({
            "grid": record["grid"], "cell": record["cell"], "status": "ok", "pair": record.get("pair"),
            "side": record.get("side"), "program": record["program"], "strategy": cfg.strategy,
            "quantization": cfg.model.quantization, "mixed_precision": record.get("mixed_precision"),
            "device": device, "samples_per_s": record["samples_per_s"], "peak_memory_mb": record["peak_memory_mb"],
            "training_flops_per_sample": flops, "counted_at": size, "model_tflops_per_s": model_flops / 1e12,
            "fraction_of_bf16_peak": model_flops / (peak * 1e12) if peak else None,
            "test_accuracy": record["metrics"]["test"]["accuracy"], "wall_time_s": record["wall_time_s"]})
    return rows


def markdown(rows: list[dict], device: str, peak: float | None) -> str:
    """The rows as a Markdown table, with the device and its peak above it."""
    memory = "peak GPU MB" if device.startswith("cuda") else "peak MB (max RSS, CPU)"
    lines = [f"Device: {device}; dense bf16 peak: {f'{peak:g} TFLOP/s' if peak else 'not in the table'}.", "",
             f"| run | precision | samples/s | {memory} | model TFLOP/s | of bf16 peak | test acc |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        if row["status"] != "ok":
            lines.append(f"| {row['cell']} | {row['status']}: {row.get('error') or ''} | | | | | |")
            continue
        fraction = f"{row['fraction_of_bf16_peak']:.1%}" if row["fraction_of_bf16_peak"] is not None else ""
        precision = (row["mixed_precision"] or "?") + (f", {row['quantization']} frozen" if row["quantization"] else "")
        lines.append(f"| {row['cell']} | {precision} | {row['samples_per_s']:.1f} | {row['peak_memory_mb']:.0f} | "
                     f"{row['model_tflops_per_s']:.3f} | {fraction} | {row['test_accuracy']:.4f} |")
    return "\n".join(lines) + "\n"


def write_report(out: Path) -> dict:
    """Read OUT/records/<grid>/*.json, write OUT/gpu_check.json and OUT/gpu_check.md; returns the JSON's content."""
    records = [json.loads(path.read_text()) for path in sorted((out / "records").glob("*/*.json"))]
    if not records:
        raise PeftlabError(f"no records under {out / 'records'}; run bash benchmarks/gpu_check.sh --out {out} first")
    rows = report_rows(records)
    device = next((r["device"] for r in rows if r["status"] == "ok"), "none finished")
    peak = bf16_peak_tflops(device.removeprefix("cuda: ")) if device.startswith("cuda") else None
    summary = {"device": device, "bf16_peak_tflops": peak, "rules": __doc__.split("Per run:\n", 1)[1].strip(),
               "runs": rows}
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "gpu_check.md").write_text(markdown(rows, device, peak))
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the gpu_check.sh output folder (records under OUT/records/<grid>)")
    args = parser.parse_args(argv)
    try:
        summary = write_report(args.out)
    except PeftlabError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print((args.out / "gpu_check.md").read_text(), end="")
    return 0 if all(r["status"] == "ok" for r in summary["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
