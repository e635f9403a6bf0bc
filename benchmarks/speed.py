"""Speed: peftlab's recipes against the usual `transformers.Trainer` + `peft` loop, measured in one invocation.

    nice -n 5 python benchmarks/speed.py --readme benchmarks/SPEED.md benchmarks/README.md   # every case, ~15-20 min
    python benchmarks/speed.py --cases lora head                           # some cases
    python benchmarks/speed.py --render-only --readme benchmarks/SPEED.md  # re-render the committed records
    python benchmarks/speed.py --smoke                                     # about 45 s: 1-layer MiniLM, 48 texts

Every run is its own subprocess (`--run SPEC`), so peak memory is per run, and the two sides of a case run back to
back (alternating with --repeats > 1). Same data, epochs, batch size, strategy, learning rate and seed on both sides.
  lora          (a) Trainer + peft LoRA r=8 on query/value, fp32, every text padded to max_length
                (b) recipes/text_classification.py with its defaults (bf16 autocast where the CPU has it,
                    per-batch padding with length grouping)
  head          recipe, strategy=head: (a) train.cache_frozen_features=false, (b) true
  full          (a) Trainer fp32 full fine-tuning, (b) the recipe; plus (b)'s model FLOP/s against the bf16 ceiling
  vision-lora, vision-head, vision-full: the same on EfficientNet-Lite0 / Animal-MNIST (no augmentation, so that
                the cached head is comparable)
Both sides use MiniLM's mean pooling (peftlab.pooling.apply_mean_pooling on the Trainer side).

Figures per run: samples/s = epochs x training samples / training-phase seconds (for the recipe: feature caching +
train(), per-epoch validation and checkpoints included; for the Trainer: trainer.train(), the same things included);
wall_s = the whole run (loading, tokenising, training, test, saving); peak_memory_mb = the subprocess's max RSS.
Model FLOP/s (text) = (6 N + 12 L H T) x tokens / seconds of training steps (validation and checkpoints excluded),
N = encoder parameters without embeddings, L layers, H hidden size, T the batch's padded length (attention scores
and values; the PaLM paper's appendix B formula); tokens are padded tokens. Vision: FLOPs from
torch.utils.flop_counter (forward x 3) per image. The ceiling is the best of 5 timed loops of bf16 matmuls at
MiniLM's shapes, (batch x mean padded length) x 384 -> 1536, 1536 -> 384, 384 -> 384, run right after the case
under the same load and thread count (vision is held to the same matmul ceiling: convolutions have no higher one).
Records: benchmarks/results/speed/<case>.json; the table: benchmarks/results/speed/table.md.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "speed"
TABLE_MARKERS = ("<!-- speed:table -->", "<!-- /speed:table -->")
CASES = ("lora", "head", "full", "vision-lora", "vision-head", "vision-full")
TEXT_LR = {"lora": 1e-3, "head": 1e-2, "full": 5e-5}
VISION_LR = {"lora": 2e-3, "head": 1e-2, "full": 1e-3}


# ---------------------------------------------------------------------------------------------------------------------
# The cases: which two runs each compares.


def case_runs(case: str, args) -> list[dict]:
    """The (a) and (b) run specs of a case, in the order they run."""
    vision = case.startswith("vision-")
    strategy = case.removeprefix("vision-")
    epochs = {"lora": args.lora_epochs, "head": args.head_epochs, "full": args.full_epochs}[strategy]
    common = {"task": "image" if vision else "text", "strategy": strategy, "epochs": epochs,
              "lr": (VISION_LR if vision else TEXT_LR)[strategy], "threads": args.threads,
              "train_samples": args.vision_train_samples if vision else args.train_samples,
              "eval_samples": args.vision_eval_samples if vision else args.eval_samples,
              "batch_size": args.vision_batch_size if vision else args.batch_size,
              "max_length": args.max_length, "layers": args.layers, "image_size": args.image_size}
    if strategy == "head":  # cached against uncached, both through the recipe
        return [{**common, "side": "a", "kind": "recipe", "cache": False},
                {**common, "side": "b", "kind": "recipe", "cache": True}]
    return [{**common, "side": "a", "kind": "trainer"}, {**common, "side": "b", "kind": "recipe", "cache": True}]


def recipe_overrides(spec: dict, output_dir: Path) -> list[str]:
    """The recipe's key=value overrides for a spec: its defaults except the compared sizes and the strategy."""
    overrides = [f"strategy={spec['strategy']}", f"train.epochs={spec['epochs']}", f"train.lr={spec['lr']}",
                 f"train.batch_size={spec['batch_size']}", f"data.max_train_samples={spec['train_samples']}",
                 f"data.max_eval_samples={spec['eval_samples']}", "train.trackers=[jsonl]",
                 f"train.cache_frozen_features={str(spec['cache']).lower()}", f"output_dir={output_dir}", "overwrite=true"]
    if spec["task"] == "text":
        overrides += ["model.pooling=mean", f"data.max_length={spec['max_length']}"]
        if spec["layers"]:
            overrides.append(f"model.num_hidden_layers={spec['layers']}")
    else:
        overrides += [f"data.image_size={spec['image_size']}", "data.augment=false"]
    return overrides


# ---------------------------------------------------------------------------------------------------------------------
# One run, inside its own subprocess.


class StepCounter:
    """Counts what the training forwards see (eval forwards excluded): samples, padded tokens and sum of T^2."""

    def __init__(self):
        self.samples = self.tokens = self.tokens_x_length = 0

    def attach(self, model) -> None:
        model.register_forward_pre_hook(self.count, with_kwargs=True)

    def count(self, module, args, kwargs) -> None:
        if not module.training:
            return
        ids = kwargs.get("input_ids")
        self.samples += len(kwargs["labels"]) if kwargs.get("labels") is not None else len(ids)
        if ids is not None:
            self.tokens += ids.numel()
            self.tokens_x_length += ids.numel() * ids.shape[1]


def run_recipe(spec: dict, output_dir: Path) -> dict:
    """recipes/<task>_classification.py main(cfg), with its training phase timed from outside."""
    from peftlab.config import load_config

    path = ROOT / "recipes" / f"{spec['task']}_classification.py"
    module_spec = importlib.util.spec_from_file_location(f"{spec['task']}_recipe", path)
    recipe = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(recipe)
    cfg = load_config(str(recipe.DEFAULT_CONFIG), recipe_overrides(spec, output_dir))
    phase, counter, models = {"cache_s": 0.0}, StepCounter(), []
    real_train = recipe.train

    def timed_train(model, **kwargs):
        counter.attach(model)
        models.append(model)
        start = time.perf_counter()
        try:
            return real_train(model, **kwargs)
        finally:
            phase["train_s"] = time.perf_counter() - start

    recipe.train = timed_train
    real_cache = getattr(recipe, "frozen_feature_cache", None)
    if real_cache is not None:
        @contextlib.contextmanager
        def timed_cache(*args, **kwargs):
            start = time.perf_counter()
            with real_cache(*args, **kwargs) as loaders:
                phase["cache_s"] = time.perf_counter() - start
                yield loaders

        recipe.frozen_feature_cache = timed_cache
    start = time.perf_counter()
    metrics = recipe.main(cfg)
    wall = time.perf_counter() - start
    from peftlab.training import resolve_mixed_precision

    return {"wall_s": wall, "train_phase_s": phase["cache_s"] + phase["train_s"], "cache_s": phase["cache_s"],
            "steps_s": counter.samples / metrics["samples_per_s"] if metrics["samples_per_s"] else None,
            "test_accuracy": metrics["test"]["accuracy"], "mixed_precision": resolve_mixed_precision("auto"),
            **_counted(counter, spec, models[0])}


def run_trainer(spec: dict, output_dir: Path) -> dict:
    """The usual loop: transformers.Trainer (+ peft LoRA), fp32; texts padded to max_length."""
    import numpy as np
    from accelerate.utils import set_seed
    from transformers import Trainer, TrainingArguments

    from peftlab.heads import find_head

    start = time.perf_counter()
    set_seed(42)
    train_set, eval_set, test_set, backbone = _trainer_data(spec)
    model = backbone.model
    if spec["strategy"] == "lora":
        from peft import LoraConfig, get_peft_model
        from peftlab.strategies.lora import find_lora_targets

        heads = find_head(model)  # the same target modules as peftlab's lora strategy finds, the head trained in full
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1 if spec["task"] == "text" else 0.0,
                                                 target_modules=find_lora_targets(model, heads), modules_to_save=heads))
    counter = StepCounter()
    counter.attach(model)
    arguments = TrainingArguments(
        output_dir=str(output_dir), num_train_epochs=spec["epochs"], per_device_train_batch_size=spec["batch_size"],
        per_device_eval_batch_size=64, learning_rate=spec["lr"], warmup_steps=0.06, weight_decay=0.01,
        lr_scheduler_type="linear", max_grad_norm=1.0, eval_strategy="epoch", save_strategy="epoch",
        load_best_model_at_end=True, metric_for_best_model="accuracy", save_total_limit=1, save_only_model=True,
        report_to="none", seed=42, use_cpu=True, disable_tqdm=True, remove_unused_columns=False,
        label_names=["labels"], logging_steps=10)

    def accuracy(prediction) -> dict:
        return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}

    trainer = Trainer(model=model, args=arguments, train_dataset=train_set, eval_dataset=eval_set,
                      compute_metrics=accuracy)
    phase_start = time.perf_counter()
    trainer.train()
    train_phase = time.perf_counter() - phase_start
    test = trainer.predict(test_set).metrics
    trainer.save_model(str(output_dir / "model"))
    wall = time.perf_counter() - start
    return {"wall_s": wall, "train_phase_s": train_phase, "cache_s": 0.0, "steps_s": None,
            "test_accuracy": test["test_accuracy"], "mixed_precision": "no", **_counted(counter, spec, model)}


def _trainer_data(spec: dict):
    """The same splits, model and (for images) transforms as the recipe; texts padded to max_length."""
    from peftlab.backbones import load_backbone

    if spec["task"] == "text":
        from peftlab.data.text import load_text_dataset
        from peftlab.pooling import apply_mean_pooling

        data = load_text_dataset("rotten_tomatoes", max_train_samples=spec["train_samples"],
                                 max_eval_samples=spec["eval_samples"])
        backbone = load_backbone("minilm", task="text", num_labels=data.num_labels, label_names=data.label_names,
                                 num_hidden_layers=spec["layers"])
        apply_mean_pooling(backbone.model)
        tokenizer = backbone.tokenizer
        encoded = data.splits.map(lambda batch: tokenizer(batch["text"], truncation=True, padding="max_length",
                                                          max_length=spec["max_length"]),
                                  batched=True, remove_columns=["text"]).rename_column("label", "labels")
        encoded.set_format("torch")
        sets = encoded["train"], encoded["validation"], encoded["test"]
    else:
        from peftlab.data.image import TransformedImages, load_image_dataset
        from peftlab.data.transforms import build_image_transform

        data = load_image_dataset("animal_mnist", max_train_samples=spec["train_samples"],
                                  max_eval_samples=spec["eval_samples"])
        backbone = load_backbone("efficientnet-lite0", task="image", num_labels=data.num_labels,
                                 label_names=data.label_names)
        transform = build_image_transform(spec["image_size"], backbone.image_mean, backbone.image_std, train=False)
        sets = tuple(TransformedImages(data.splits[s], transform) for s in ("train", "validation", "test"))
    return (*sets, backbone)


def _counted(counter: StepCounter, spec: dict, model) -> dict:
    """Samples and tokens the training forwards saw, and the model FLOPs they stand for."""
    out = {"trained_samples": counter.samples}
    if spec["task"] == "text":
        config = _unwrap(model).config
        encoder = _unwrap(model).base_model.encoder
        n = sum(p.numel() for p in encoder.parameters())  # non-embedding: the encoder blocks (pooler/head ~0.1%)
        layers, hidden = config.num_hidden_layers, config.hidden_size
        out.update(tokens=counter.tokens, non_embedding_params=n,
                   model_flops=6 * n * counter.tokens + 12 * layers * hidden * counter.tokens_x_length)
    else:
        out["model_flops"] = counter.samples * _image_train_flops(_unwrap(model), spec["image_size"])
    return out


def _unwrap(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _image_train_flops(model, image_size: int) -> float:
    """Forward FLOPs of one image from torch's FLOP counter, times 3 (backward ~ twice the forward)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as flops:
        model(pixel_values=torch.zeros(1, 3, image_size, image_size))
    model.train(was_training)
    return 3 * flops.get_total_flops()


def bf16_ceiling(spec: dict) -> dict:
    """bf16 matmul FLOP/s at the model's shapes: (batch x seq) x 384 -> 1536, 1536 -> 384 and 384 -> 384."""
    import torch

    rows = spec["batch_size"] * spec["seq"]
    shapes = [(rows, 384, 1536), (rows, 1536, 384), (rows, 384, 384)]
    result = {}
    for m, k, n in shapes:
        a, b = torch.randn(m, k, dtype=torch.bfloat16), torch.randn(k, n, dtype=torch.bfloat16)
        for _ in range(5):
            a @ b
        best = 0.0
        for _ in range(5):  # the best of 5 timed loops: the ceiling, not the average under other jobs
            start = time.perf_counter()
            for _ in range(20):
                a @ b
            best = max(best, 20 * 2 * m * k * n / (time.perf_counter() - start))
        result[f"{m}x{k}x{n}"] = best
    return {"flops_per_s": result, "mean_flops_per_s": sum(result.values()) / len(result)}


def run_one(spec: dict) -> dict:
    """Run one spec in this process and return its figures (the child side of --run)."""
    import torch

    torch.set_num_threads(spec["threads"])
    if spec["kind"] == "ceiling":
        return bf16_ceiling(spec)
    with tempfile.TemporaryDirectory(prefix="peftlab-speed-") as tmp:
        runner = run_recipe if spec["kind"] == "recipe" else run_trainer
        result = runner(spec, Path(tmp) / "run")
    samples = spec["epochs"] * spec["train_samples"]
    result["samples_per_s"] = samples / result["train_phase_s"]
    if spec["strategy"] == "full" and result.get("steps_s"):  # 6N (forward + both backward matmuls) fits full only
        result["model_flops_per_s"] = result["model_flops"] / result["steps_s"]
    result["peak_memory_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    return result


# ---------------------------------------------------------------------------------------------------------------------
# The parent: run the cases, write the records and the table.


def launch(spec: dict, timeout: float) -> dict:
    """Run one spec in a fresh interpreter; its result is the last stdout line (JSON)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--run", json.dumps(spec)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=timeout)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"run {spec} failed (exit {done.returncode}):\n{tail}")
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "process_s": time.perf_counter() - start}


def run_case(case: str, args) -> dict:
    """Run a case's two sides (alternating over repeats) and summarise them as one record."""
    runs = {"a": [], "b": []}
    for _ in range(args.repeats):
        for spec in case_runs(case, args):
            print(f"  {case} ({spec['side']}) {spec['kind']} ...", flush=True)
            runs[spec["side"]].append({"spec": spec, **launch(spec, args.timeout)})
    record = {**summarise(case, runs), "load_average": os.getloadavg()}
    b = record["b"]
    if case.endswith("full") and b.get("model_flops_per_s"):
        seq = round(b["tokens"] / b["trained_samples"]) if b.get("tokens") else 64
        ceiling = launch({"kind": "ceiling", "threads": args.threads, "batch_size": args.batch_size, "seq": seq},
                         args.timeout)
        record["bf16_ceiling"] = ceiling
        record["fraction_of_bf16_ceiling"] = b["model_flops_per_s"] / ceiling["mean_flops_per_s"]
    return record


def summarise(case: str, runs: dict[str, list[dict]]) -> dict:
    """Each side's median run (the lower median for an even count) and the median ratio over the (a, b) pairs:
    the sides alternate, so the runs of a pair met about the same load from other jobs."""
    a, b = (sorted(runs[side], key=lambda r: r["samples_per_s"])[(len(runs[side]) - 1) // 2] for side in "ab")
    pairs = list(zip(runs["a"], runs["b"]))
    pair_ratios = [rb["samples_per_s"] / ra["samples_per_s"] for ra, rb in pairs]
    return {"case": case, "a": a, "b": b, "runs": runs, "pair_ratios": pair_ratios,
            "ratio_samples_per_s": statistics.median(pair_ratios),
            "ratio_wall": statistics.median(ra["wall_s"] / rb["wall_s"] for ra, rb in pairs),
            "accuracy_difference_points": 100 * (b["test_accuracy"] - a["test_accuracy"])}


def render_table(records: list[dict]) -> str:
    """A Markdown table of the records: the (a) and (b) figures of each case and their ratios."""
    lines = ["| case | side | samples/s | training phase s | wall s | peak MB | test acc | b/a samples/s | "
             "model TFLOP/s | of bf16 ceiling |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for record in records:
        for side in "ab":
            run = record[side]
            cached = run["spec"]["strategy"] == "head" and run["spec"].get("cache")
            label = run["spec"]["kind"] + (" cached" if cached else " uncached" if run["spec"]["strategy"] == "head" else "")
            count = len(record["runs"][side])
            if count > 1:
                label += f" ({'lower ' if count % 2 == 0 else ''}median of {count})"
            ratio = f"**{record['ratio_samples_per_s']:.2f}x**" if side == "b" else ""
            if side == "b" and len(record["pair_ratios"]) > 1:
                ratio += " (median of " + ", ".join(f"{r:.2f}" for r in record["pair_ratios"]) + ")"
            flops = f"{run['model_flops_per_s'] / 1e12:.3f}" if run.get("model_flops_per_s") else ""
            fraction = (f"{record['fraction_of_bf16_ceiling']:.0%}" if side == "b" and "fraction_of_bf16_ceiling"
                        in record else "")
            spec = run["spec"]
            case = f"{record['case']} ({spec['train_samples']} train, {spec['eval_samples']} test, {spec['epochs']} ep)"
            lines.append(f"| {case if side == 'a' else ''} | {side}: {label} | {run['samples_per_s']:.1f} | "
                         f"{run['train_phase_s']:.1f} | {run['wall_s']:.1f} | {run['peak_memory_mb']:.0f} | "
                         f"{run['test_accuracy']:.4f} | {ratio} | {flops} | {fraction} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--smoke", action="store_true", help="seconds: 1-layer MiniLM, 48 texts, text cases only")
    parser.add_argument("--train-samples", type=int, default=1000)
    parser.add_argument("--eval-samples", type=int, default=500, help="validation and test size each (1275: all)")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--layers", type=int, default=None, help="keep the first N MiniLM layers (default: all 6)")
    parser.add_argument("--lora-epochs", type=int, default=3)
    parser.add_argument("--head-epochs", type=int, default=10)
    parser.add_argument("--full-epochs", type=int, default=1)
    parser.add_argument("--vision-train-samples", type=int, default=800)
    parser.add_argument("--vision-eval-samples", type=int, default=400)
    parser.add_argument("--vision-batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads of every run (default 1: on shared cores a second thread stalls)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per side, alternating a, b, a, b; median kept")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds per run")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--render-only", action="store_true", help="run nothing: render the records in --out")
    parser.add_argument("--readme", type=Path, nargs="+", default=[],
                        help="also write the table into these files between their speed markers")
    parser.add_argument("--run", help=argparse.SUPPRESS)  # internal: run one JSON spec and print its result
    args = parser.parse_args(argv)
    if args.smoke:
        args.cases = [c for c in args.cases if not c.startswith("vision-")]
        args.train_samples, args.eval_samples, args.layers, args.max_length = 48, 24, 1, 32
        args.lora_epochs = args.head_epochs = args.full_epochs = 1
        args.batch_size = 16
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.run:
        print(json.dumps(run_one(json.loads(args.run))))
        return 0
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from harness.provenance import environment, git_state
    from harness.report import write_between_markers

    args.out.mkdir(parents=True, exist_ok=True)
    for case in [] if args.render_only else args.cases:
        print(f"{case}:", flush=True)
        record = {**run_case(case, args), "smoke": args.smoke, "arguments": {k: str(v) for k, v in vars(args).items()},
                  "environment": environment(), "git": git_state()}
        (args.out / f"{case}.json").write_text(json.dumps(record, indent=1) + "\n")
    # The table holds every case recorded in the folder, so rerunning one case updates only its rows.
    records = [json.loads((args.out / f"{case}.json").read_text()) for case in CASES
               if (args.out / f"{case}.json").is_file()]
    table = render_table(records)
    (args.out / "table.md").write_text(table + "\n")
    print(table)
    for readme in args.readme:
        write_between_markers(readme, *TABLE_MARKERS, table, what="the speed table")
    return 0


if __name__ == "__main__":
    sys.exit(main())
