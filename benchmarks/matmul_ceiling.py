"""The machine's matmul ceiling at a model's shapes, bf16 and fp32: what a speed table's "% of bf16 ceiling" divides by.

    python benchmarks/matmul_ceiling.py model.name=minilm train.batch_size=32 data.max_length=64 output_dir=runs/ceiling

A harness job that measures the machine instead of training (`matmul_ceiling` in peftlab.harness.programs): a grid
with pairs lists it as a strategy label beside them, `matmul-ceiling: {job: matmul_ceiling}`; its cell runs after
the pairs of each seed, with the grid's environment and the same overrides as the training cells, and the pairs table
divides a run's model FLOP/s (peftlab.throughput) by its bf16 figure (peftlab.harness.pairs).

What it times: the matmuls of the model's linear layers on one batch at its longest padded length, M = train.batch_size
x data.max_length rows (32 x 64 = 2,048 in the speed grids): M x H -> 4H and M x 4H -> H (the feed-forward block),
M x H -> H (the attention projections), H the model's hidden size and 4H its intermediate size (384 and 1,536 for
MiniLM). In plain bf16 tensors, the kernel autocast hands a linear layer (autocast's own casts are the model's cost,
not the ceiling's), and in fp32. Per shape: the best of 5 timed loops of at least 0.2 s each, i.e. the ceiling under
whatever else runs on the machine (the record's load average says how much); per dtype: the mean over the shapes.
Threads: the recipes' rule (`train.cpu_threads`, else OMP_NUM_THREADS, else every core of its share;
peftlab.threads), so a grid's `env` pins the ceiling and the runs alike.

It leaves config.yaml and metrics.json: {"measurement": {"kind": "matmul_ceiling", "threads", "rows", "shapes",
"bf16": {"<M>x<K>x<N>": FLOP/s, ..., "mean": FLOP/s}, "fp32": {...}, "bf16_over_fp32"}, "cpu_threads",
"peak_memory_mb", "train_time_s" (the seconds the timing took)}.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from peftlab import run_folder
from peftlab.backbones import load_base
from peftlab.cli import run_cli
from peftlab.config import RecipeConfig, save_config
from peftlab.errors import PeftlabError
from peftlab.runs import CONFIG_FILE, METRICS_FILE, check_before_loading, prepare_output_dir
from peftlab.threads import set_cpu_threads
from peftlab.training import peak_memory_mb

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "recipes" / "configs" / "minilm_lora_rotten_tomatoes.yaml"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
LOOPS, MIN_LOOP_S = 5, 0.2


def model_shapes(hidden_size: int, intermediate_size: int, rows: int) -> list[tuple[int, int, int]]:
    """(M, K, N) of the model's linear layers on `rows` tokens: feed-forward in and out, attention projection."""
    return [(rows, hidden_size, intermediate_size), (rows, intermediate_size, hidden_size),
            (rows, hidden_size, hidden_size)]


def matmul_flops_per_s(m: int, k: int, n: int, dtype: torch.dtype, loops: int = LOOPS,
                       min_loop_s: float = MIN_LOOP_S) -> float:
    """The best rate of `loops` timed loops of (m x k) @ (k x n) matmuls, 2 m k n FLOPs each; each loop repeats the
    matmul until at least `min_loop_s` seconds have passed."""
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    start = time.perf_counter()
    a @ b  # warm-up, and the time of one matmul to size the loops
    repeats = max(1, round(min_loop_s / max(time.perf_counter() - start, 1e-6)))
    best = 0.0
    for _ in range(loops):
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = max(best, repeats * 2 * m * k * n / (time.perf_counter() - start))
    return best


def measure(shapes: list[tuple[int, int, int]], loops: int = LOOPS, min_loop_s: float = MIN_LOOP_S) -> dict:
    """{dtype: {"MxKxN": FLOP/s, ..., "mean": FLOP/s}} for bf16 and fp32, and their ratio."""
    rates = {}
    for name, dtype in DTYPES.items():
        by_shape = {"x".join(map(str, shape)): matmul_flops_per_s(*shape, dtype, loops, min_loop_s)
                    for shape in shapes}
        rates[name] = {**by_shape, "mean": sum(by_shape.values()) / len(by_shape)}
    return {**rates, "bf16_over_fp32": rates["bf16"]["mean"] / rates["fp32"]["mean"]}


def main(cfg: RecipeConfig) -> dict:
    """Time the model's matmuls in bf16 and fp32 on this machine; write config.yaml and metrics.json like a run."""
    check_before_loading(cfg)
    if not isinstance(cfg.data.max_length, int):
        raise PeftlabError(f"the matmul ceiling needs a fixed data.max_length (its rows are batch x length), got "
                           f"{cfg.data.max_length!r}; set data.max_length=64, say")
    threads = set_cpu_threads(cfg.train.cpu_threads)
    config = load_base(cfg.model, task="text", label_names=["a", "b"]).model.config
    rows = cfg.train.batch_size * cfg.data.max_length
    shapes = model_shapes(config.hidden_size, getattr(config, "intermediate_size", 4 * config.hidden_size), rows)
    output_dir = prepare_output_dir(cfg)
    start = time.perf_counter()
    rates = measure(shapes)
    seconds = time.perf_counter() - start
    metrics = {"measurement": {"kind": "matmul_ceiling", "threads": threads.threads, "rows": rows,
                               "shapes": [list(shape) for shape in shapes], **rates},
               "cpu_threads": threads.threads, "peak_memory_mb": peak_memory_mb(torch.device("cpu")),
               "train_time_s": seconds}
    save_config(cfg, output_dir / CONFIG_FILE)
    (output_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    run_folder.close_run_folder(output_dir, run_folder.FINISHED)
    print(f"matmul ceiling, {threads.threads} thread(s) ({threads.reason}), {rows} rows: bf16 "
          f"{rates['bf16']['mean'] / 1e9:.0f} GFLOP/s, fp32 {rates['fp32']['mean'] / 1e9:.0f} GFLOP/s "
          f"({rates['bf16_over_fp32']:.1f}x)")
    return metrics


if __name__ == "__main__":
    run_cli(main, default_config=str(DEFAULT_CONFIG))
