"""The GPU check's report: per run of the GPU grids, samples/s, peak GPU memory and the fraction of the GPU's bf16 peak.

    bash benchmarks/gpu_check.sh                   # runs grids/gpu_text.yaml and gpu_vision.yaml, then this
    python benchmarks/gpu_check.py gpu_check_out   # this report again, from gpu_check_out/records/<grid>/*.json

Writes OUT/gpu_check.json (the device, its bf16 peak, the rules below and one row per run) and OUT/gpu_check.md (the
same as a table), from the harness records alone. Per run:
- samples/s: the record's `samples_per_s`, training samples per second of training steps (validation and checkpoints
  excluded; the Trainer baseline: epochs x samples over trainer.train() without its evaluations and saves).
- peak MB: the record's `peak_memory_mb`, torch.cuda.max_memory_allocated on a GPU (max RSS of the process on CPU).
- tokens/s and model TFLOP/s: the engine's own count of the training steps (metrics.json `throughput`,
  peftlab.throughput): padded tokens per second, and model FLOPs by the PaLM rule, recorded where that rule holds
  (full fine-tuning of a transformer text model; not for LoRA, frozen weights, images or the Trainer baseline).
- of bf16 peak = model FLOP/s / the GPU's dense bf16 peak from NVIDIA's data sheet (BF16_PEAK_TFLOPS); empty where
  no model FLOPs were recorded, for GPUs not in the table, and on CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from peftlab.errors import PeftlabError  # noqa: E402

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's data sheets, TFLOP/s, by a part of the name that
# torch.cuda.get_device_name reports ("NVIDIA H100 80GB HBM3" is the SXM part; "NVIDIA H100 PCIe" is not).
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "A100": 312.0}


def bf16_peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU by its torch.cuda.get_device_name, or None when it is not in the table."""
    name = device_name.upper()
    if "H100" in name and "HBM3" in name:  # the SXM H100s call themselves "H100 80GB HBM3"
        name += " H100 SXM"
    return next((peak for part, peak in BF16_PEAK_TFLOPS.items() if part in name), None)


def device_peak(device: str) -> float | None:
    """The bf16 peak of a record's device (`cuda: <name>` or `cpu: ...`)."""
    return bf16_peak_tflops(device.removeprefix("cuda: ")) if device.startswith("cuda") else None


def report_rows(records: list[dict]) -> list[dict]:
    """One row per run: its figures (module docstring) and what they were measured on; a failed run its error."""
    rows = []
    for record in records:
        if record.get("status") != "ok":
            rows.append({"grid": record["grid"], "cell": record["cell"], "status": record.get("status"),
                         "error": record.get("error")})
            continue
        config, device = record["config"], record["environment"]["device"]
        throughput = record.get("throughput") or {}
        flops, peak = throughput.get("model_flops_per_s"), device_peak(device)
        rows.append({
            "grid": record["grid"], "cell": record["cell"], "status": "ok", "pair": record.get("pair"),
            "side": record.get("side"), "program": record["program"], "strategy": config["strategy"],
            "quantization": config["model"]["quantization"], "mixed_precision": record.get("mixed_precision"),
            "device": device, "samples_per_s": record["samples_per_s"], "peak_memory_mb": record["peak_memory_mb"],
            "padded_tokens_per_s": throughput.get("padded_tokens_per_s"),
            "model_tflops_per_s": flops / 1e12 if flops else None,
            "fraction_of_bf16_peak": flops / (peak * 1e12) if flops and peak else None,
            "test_accuracy": record["metrics"]["test"]["accuracy"], "wall_time_s": record["wall_time_s"]})
    return rows


def markdown(rows: list[dict], device: str, peak: float | None) -> str:
    """The rows as a Markdown table, with the device and its peak above it."""
    memory = "peak GPU MB" if device.startswith("cuda") else "peak MB (max RSS, CPU)"
    lines = [f"Device: {device}; dense bf16 peak: {f'{peak:g} TFLOP/s' if peak else 'not in the table'}.", "",
             f"| run | precision | samples/s | tokens/s | {memory} | model TFLOP/s | of bf16 peak | test acc |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        if row["status"] != "ok":
            lines.append(f"| {row['cell']} | {row['status']}: {row.get('error') or ''} | | | | | | |")
            continue
        precision = (row["mixed_precision"] or "?") + (f", {row['quantization']} frozen" if row["quantization"] else "")
        tokens = f"{row['padded_tokens_per_s']:.0f}" if row["padded_tokens_per_s"] else ""
        flops = f"{row['model_tflops_per_s']:.3f}" if row["model_tflops_per_s"] else ""
        fraction = f"{row['fraction_of_bf16_peak']:.1%}" if row["fraction_of_bf16_peak"] is not None else ""
        lines.append(f"| {row['cell']} | {precision} | {row['samples_per_s']:.1f} | {tokens} | "
                     f"{row['peak_memory_mb']:.0f} | {flops} | {fraction} | {row['test_accuracy']:.4f} |")
    return "\n".join(lines) + "\n"


def write_report(out: Path) -> dict:
    """Read OUT/records/<grid>/*.json, write OUT/gpu_check.json and OUT/gpu_check.md; returns the JSON's content."""
    records = [json.loads(path.read_text()) for path in sorted((out / "records").glob("*/*.json"))]
    if not records:
        raise PeftlabError(f"no records under {out / 'records'}; run bash benchmarks/gpu_check.sh --out {out} first")
    rows = report_rows(records)
    device = next((r["device"] for r in rows if r["status"] == "ok"), "none finished")
    peak = device_peak(device)
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
