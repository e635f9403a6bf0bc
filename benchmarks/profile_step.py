"""Profile training steps of a recipe as it runs (torch.profiler): where a step's time goes, by operator.

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/profile_step.py                     # the speed case, LoRA
    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/profile_step.py strategy=full train.lr=5e-5
    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/profile_step.py --image              # the vision speed case

The recipe's own `main(cfg)` runs unchanged on the speed case (benchmarks/grids/speed_text.yaml: 2,000 Rotten
Tomatoes texts, max_length 64, batch 32, MiniLM with mean pooling, bf16 autocast where the CPU has it) for
WAIT + WARMUP + ACTIVE + 2 optimizer steps; a global forward pre-hook marks the start of each training forward (one
per step: no accumulation), so the profiler records steps WAIT + WARMUP + 1 to WAIT + WARMUP + ACTIVE whole, each from
its forward to the next step's forward: forward, backward, gradient clipping, optimizer and scheduler. `--image`
profiles the image recipe on the vision speed case instead (benchmarks/grids/speed_vision.yaml: EfficientNet-Lite0,
800 Animal-MNIST images at 64 px without augmentation, batch 64). Extra
`key=value` arguments override the recipe config. Prints the process's peak RSS, the wall time of every step, the
operators by self CPU time over the recorded steps, and those times grouped into kinds (matmuls, attention, norms,
casts, ...).
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile, schedule

from peftlab.config import load_config
from peftlab.harness.programs import load_recipe_module, recipe
from peftlab.training import peak_memory_mb

WAIT, WARMUP, ACTIVE = 2, 2, 4
SPEED_CASE = ["data.name=rotten_tomatoes", "data.max_train_samples=2000", "data.max_eval_samples=64",
              "data.max_length=64", "model.pooling=mean", "train.batch_size=32", "train.lr=1e-3",
              "train.trackers=[jsonl]", "train.cpu_threads=1", "output_dir=/tmp/peftlab_profile_step",
              "overwrite=true"]
VISION_CASE = ["data.name=animal_mnist", "data.image_size=64", "data.augment=false", "data.max_train_samples=800",
               "data.max_eval_samples=64", "train.batch_size=64", "train.lr=2e-3", "train.trackers=[jsonl]",
               "train.cpu_threads=1", "output_dir=/tmp/peftlab_profile_step", "overwrite=true"]
# Operator name fragments -> kind, first match wins (aten names as torch 2.x reports them).
KINDS = [("convolution", ("conv",)), ("batch norm", ("batch_norm",)),
         ("activation (relu6, silu)", ("hardtanh", "relu", "silu", "clamp")),
         ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm")),
         ("attention (softmax, masking)", ("softmax", "aten::masked_fill", "scaled_dot_product", "aten::where")),
         ("layer norm", ("layer_norm",)), ("gelu", ("gelu",)),
         ("dropout (masks, peftlab.dropout's hashing)", ("dropout", "bernoulli", "CounterDropout", "bitwise")),
         ("casts and copies", ("aten::to", "aten::_to_copy", "aten::copy_", "aten::clone", "aten::contiguous")),
         ("embedding", ("embedding",)), ("optimizer", ("adam", "optimizer", "_foreach")),
         ("gradient clipping (norms)", ("aten::norm", "linalg_vector_norm", "clip_grad")),
         ("elementwise and reductions",
          ("aten::add", "aten::mul", "aten::sum", "aten::mean", "aten::div", "aten::sub"))]


def kind_of(name: str) -> str:
    """The kind an operator belongs to (KINDS), else "other"."""
    return next((kind for kind, fragments in KINDS if any(fragment in name for fragment in fragments)), "other")


def main(argv: list[str]) -> None:
    image = argv[:1] == ["--image"]
    argv = argv[1:] if image else argv
    program = recipe("image_classification" if image else "text_classification", "profile_step")
    module = load_recipe_module(program)
    steps = WAIT + WARMUP + ACTIVE + 2
    case = VISION_CASE if image else SPEED_CASE
    cfg = load_config(str(module.DEFAULT_CONFIG), [*case, f"train.max_steps={steps}", *argv])
    starts: list[float] = []
    top: list[torch.nn.Module] = []

    with profile(activities=[ProfilerActivity.CPU], schedule=schedule(wait=WAIT, warmup=WARMUP, active=ACTIVE),
                 record_shapes=False) as profiler:
        def mark_step(module, args):
            # The outermost model is the first module whose forward starts in training: count only its calls.
            if module.training and hasattr(module, "peftlab_strategy") and (not top or module is top[0]):
                top[:1] = [module]
                if starts:
                    profiler.step()  # the step before this forward is complete
                starts.append(time.perf_counter())

        handle = torch.nn.modules.module.register_module_forward_pre_hook(mark_step)
        try:
            module.main(cfg)
        finally:
            handle.remove()

    print(f"peak RSS of the process: {peak_memory_mb(torch.device('cpu')):.0f} MB")
    step_s = [b - a for a, b in zip(starts, starts[1:])]
    print(f"{cfg.strategy}, {torch.get_num_threads()} thread(s), step wall times (s): "
          + ", ".join(f"{s:.3f}" for s in step_s))
    recorded = step_s[WAIT + WARMUP:WAIT + WARMUP + ACTIVE]
    print(f"recorded steps {WAIT + WARMUP + 1}-{WAIT + WARMUP + ACTIVE}: {sum(recorded) / len(recorded):.3f} s each "
          "(with the profiler's overhead)")
    events = profiler.key_averages()
    print(events.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=48))
    kinds = defaultdict(float)
    for event in events:
        kinds[kind_of(event.key)] += event.self_cpu_time_total / 1e3 / ACTIVE  # ms per step
    total = sum(kinds.values())
    print(f"self CPU time per step by kind ({total:.0f} ms per step in operators):")
    for kind, ms in sorted(kinds.items(), key=lambda item: -item[1]):
        print(f"  {kind:32s} {ms:8.1f} ms  {ms / total:5.1%}")


if __name__ == "__main__":
    main(sys.argv[1:])
