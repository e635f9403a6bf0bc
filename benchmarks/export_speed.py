"""PyTorch eager against ONNX fp32 and ONNX int8 on this CPU: batch-1 latency (p50/p99), batch-64 throughput, accuracy.

    python benchmarks/export_speed.py RUN [RUN ...] --readme benchmarks/README.md
    python benchmarks/export_speed.py --render        # table.md (and --readme) from the records alone

For each run folder: `peftlab export RUN --format onnx --quantize int8` into RUN/onnx where that is missing, then the
three runtimes label the same pre-encoded test inputs in one process, interleaved call by call so that they share
whatever else loads the machine: model time only (tokenizing or decoding images is left out, and is the same for
all three). Accuracy is each runtime's on the whole test split, from the export's own parity report. One JSON record
per run goes to benchmarks/results/export/<run folder name>.json (environment, CPU flags, load average, git state,
the export report), and table.md is rendered from the records there.

Not a harness grid (peftlab.harness): a grid cell trains a run, and this measures inference of a run that exists.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "benchmarks" / "results" / "export"
RUNTIMES = ("pytorch", "onnx_fp32", "onnx_int8")
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")


def cpu_flags() -> dict[str, bool]:
    """Which of the instruction sets that int8 and bf16 kernels use this CPU has."""
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    return {flag: flag in flags for flag in CPU_FLAGS}


def measure(run_dir: Path, threads: int, latency_examples: int, throughput_batches: int) -> dict:
    """Export `run_dir` where needed, then time the three runtimes on its test inputs; the run's record."""
    import onnxruntime

    import peftlab
    from peftlab.console import quiet_onnx_export
    from peftlab.export import DEFAULT_SUBDIR, export_run, load_test_split
    from peftlab.exported import INT8_FILE, ONNX_FILE, REPORT_FILE, load_onnx
    from peftlab.harness.provenance import environment, git_state

    export_dir = run_dir / DEFAULT_SUBDIR
    if not (export_dir / INT8_FILE).is_file():
        with quiet_onnx_export():
            export_run(run_dir, export_dir, quantize="int8", log=lambda line: print(line, file=sys.stderr))
    report = json.loads((export_dir / REPORT_FILE).read_text())
    torch.set_num_threads(threads)
    run = peftlab.load(run_dir)
    models = {"pytorch": lambda batch: run.model(**batch).logits,
              "onnx_fp32": load_onnx(export_dir, threads=threads).run_graph,
              "onnx_int8": load_onnx(export_dir, int8=True, threads=threads).run_graph}
    inputs, _ = load_test_split(run)
    singles = [run.preprocess([x]) for x in inputs[:latency_examples]]
    batches = [run.preprocess(inputs[i:i + 64]) for i in range(0, 64 * throughput_batches, 64)
               if inputs[i:i + 64]]
    load_before = os.getloadavg()
    seconds = {name: [] for name in RUNTIMES}
    batch_seconds = {name: 0.0 for name in RUNTIMES}
    with torch.inference_mode():
        for name, model in models.items():  # warm-up: first calls allocate and pick kernels
            for batch in singles[:5] + batches[:1]:
                model(batch)
        for batch in singles:  # interleaved, so a burst of other work hits all three runtimes alike
            for name, model in models.items():
                start = time.perf_counter()
                model(batch)
                seconds[name].append(time.perf_counter() - start)
        for batch in batches:
            for name, model in models.items():
                start = time.perf_counter()
                model(batch)
                batch_seconds[name] += time.perf_counter() - start
    batched = sum(len(next(iter(batch.values()))) for batch in batches)
    accuracy = {"pytorch": report["parity"]["reference_accuracy"], "onnx_fp32": report["parity"]["accuracy"],
                "onnx_int8": report["int8"]["accuracy"]}
    sizes = {"pytorch": None, "onnx_fp32": (export_dir / ONNX_FILE).stat().st_size,
             "onnx_int8": (export_dir / INT8_FILE).stat().st_size}
    return {
        "run": run_dir.name, "run_dir": str(run_dir), "task": run.task, "base": run.cfg.model.name,
        "strategy": run.cfg.strategy, "pooling": run.cfg.model.pooling, "data": run.cfg.data.name,
        "test_examples": report["test_examples"], "threads": threads, "latency_examples": len(singles),
        "throughput_examples": batched,
        "runtimes": {name: {"p50_ms": 1000 * float(np.percentile(seconds[name], 50)),
                            "p99_ms": 1000 * float(np.percentile(seconds[name], 99)),
                            "examples_per_s": batched / batch_seconds[name],
                            "test_accuracy": accuracy[name], "size_bytes": sizes[name]} for name in RUNTIMES},
        "export_report": report,
        "environment": {**environment(), "onnxruntime": onnxruntime.__version__, "cpu_flags": cpu_flags()},
        "load_average": {"before": [round(x, 2) for x in load_before],
                         "after": [round(x, 2) for x in os.getloadavg()]},
        "git": git_state(), "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/export_speed.py " + str(run_dir),
    }


def table(records: list[dict]) -> str:
    """The Markdown table of all records, with the command, machine and load it ran under."""
    lines = ["| run | runtime | batch-1 p50 ms | batch-1 p99 ms | batch-64 examples/s | vs PyTorch | test accuracy "
             "| file MB |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for record in records:
        base = record["runtimes"]["pytorch"]["examples_per_s"]
        for i, name in enumerate(RUNTIMES):
            row = record["runtimes"][name]
            label = (f"{record['run']} ({record['task']}: {record['base']}, {record['strategy']}, "
                     f"{record['test_examples']} test)") if i == 0 else ""
            size = f"{row['size_bytes'] / 1e6:.1f}" if row["size_bytes"] else ""
            lines.append(f"| {label} | {name} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | "
                         f"{row['examples_per_s']:.1f} | {row['examples_per_s'] / base:.2f}x | "
                         f"{row['test_accuracy']:.4f} | {size} |")
    first = records[0]
    flags = ", ".join(f"{flag} {'yes' if present else 'no'}" for flag, present in
                      first["environment"]["cpu_flags"].items())
    loads = "; ".join(f"{r['run']} {r['load_average']['before'][0]:.1f}" for r in records)
    runs = " ".join(r["run_dir"] for r in records)
    return "\n".join([
        f"`python benchmarks/export_speed.py {runs}` ({first['environment']['device']}; {flags}; "
        f"{first['threads']} intra-op thread{'s' if first['threads'] > 1 else ''} for PyTorch and onnxruntime "
        f"{first['environment']['onnxruntime']}; fp32 "
        f"PyTorch {first['environment']['versions']['torch']}). Batch-1 latency over {first['latency_examples']} "
        f"test examples, throughput over {first['throughput_examples']} in batches of 64, model time only; "
        f"accuracy on the whole test split. 1-minute load average when each run started: {loads} (the machine "
        f"is shared: timings move with it, the three runtimes alike since their calls interleave).", "",
        *lines])


def render(readme: Path | None) -> str:
    """table.md (and the README block between `<!-- export:table -->` markers) from the records in RESULTS."""
    from peftlab.harness.report import write_between_markers

    records = [json.loads(path.read_text()) for path in sorted(RESULTS.glob("*.json"))]
    if not records:
        raise SystemExit(f"error: no records in {RESULTS}; measure a run first")
    text = table(records)
    (RESULTS / "table.md").write_text(text + "\n")
    if readme is not None:
        write_between_markers(readme, "<!-- export:table -->", "<!-- /export:table -->", text,
                              what="the export speed table")
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", type=Path, help="finished run folders")
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads of both runtimes (default 1: on shared cores a second thread stalls "
                             "each op while it waits for a descheduled peer)")
    parser.add_argument("--latency-examples", type=int, default=200)
    parser.add_argument("--throughput-batches", type=int, default=8, help="batches of 64")
    parser.add_argument("--readme", type=Path, help="also write the table into this README's export block")
    parser.add_argument("--render", action="store_true", help="only render table.md from the records")
    args = parser.parse_args(argv)
    if not args.render:
        if not args.runs:
            parser.error("give run folders, or --render")
        RESULTS.mkdir(parents=True, exist_ok=True)
        for run_dir in args.runs:
            record = measure(run_dir, args.threads, args.latency_examples, args.throughput_batches)
            (RESULTS / f"{run_dir.name}.json").write_text(json.dumps(record, indent=2) + "\n")
    print(render(args.readme))
    return 0


if __name__ == "__main__":
    sys.exit(main())
