"""The one training loop: optimizer, schedule, accumulation, evaluation, early stopping, checkpoints and resume."""

from __future__ import annotations

import contextlib
import contextvars
import copy
import math
import os
import re
import resource
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import (
    DataLoaderConfiguration,
    DynamoBackend,
    TorchDynamoPlugin,
    parse_flag_from_env,
    set_seed,
)
from tqdm.auto import tqdm
from transformers import get_scheduler

from peftlab.backbones.layout import trains_through_convolutions
from peftlab.checkpointing import (
    Progress,
    latest_checkpoint,
    load_checkpoint,
    load_rng_state,
    load_trainable_weights,
    plain_module,
    read_progress,
    resolve_checkpoint,
    rewrite_progress,
    save_checkpoint,
    set_rng_state,
    step_dir,
)
from peftlab.allocator import keep_freed_memory
from peftlab.data.ordering import loader_order, put_back
from peftlab.data.tasks import TASK_IDS
from peftlab.dropout import counter_dropout_in
from peftlab.errors import PeftlabError, RunInterrupted
from peftlab.frozen_weights import autocast_dtype, frozen_weights_in
from peftlab.learning_rates import describe, param_group_summary, rate_groups
from peftlab.strategies import TrainingStart, after_step_hook, before_training
from peftlab.threads import set_cpu_threads
from peftlab.throughput import TokenCounter, throughput_record
from peftlab.tracking import build_trackers


class EvalOutput(NamedTuple):
    """One pass over an evaluation loader: its metrics and, per example in the loader's order, what the model said."""

    metrics: dict[str, float]
    predictions: np.ndarray
    """Class ids (or regression values)."""
    references: np.ndarray
    probabilities: np.ndarray
    """Softmax of the logits, examples x classes (the raw output for a single-output head)."""
    task_ids: Optional[np.ndarray] = None
    """Multi-task runs: each example's task index (the batches' `task_ids`); None for a single task."""


@dataclass
class TrainResult:
    """What a training run returns; the model itself now holds the best evaluation's weights."""

    best_metrics: dict[str, float]
    """The validation metrics of the best evaluation (the weights the model holds after train)."""
    best_step: int | None
    history: list[dict]
    """One dict per evaluation: {"step": N, "loss": ..., <compute_metrics keys>}."""
    global_step: int
    train_time_s: float
    """Wall time of training, evaluation and checkpointing, summed over a resumed run's parts."""
    samples_per_s: float
    """Training samples over all processes per second of training steps (evaluation and checkpointing excluded)."""
    peak_memory_mb: float
    """CUDA max allocated memory, or the process's max resident set size on CPU."""
    stopped_early: bool
    best_checkpoint: str | None = None
    phases_s: dict[str, float] = field(default_factory=dict)
    """Seconds of train_steps, evaluation and checkpointing, over a resumed run's parts (they add up to
    train_time_s)."""
    param_groups: list[dict] = field(default_factory=list)
    """The optimizer's parameter groups by strategy group, bottom to top: {"name", "parameters", "lr" (peak)}."""
    best_evaluation: EvalOutput | None = None
    """The best evaluation's per-example outputs on the evaluation data (what the returned weights predict there):
    cross-validation's out-of-fold predictions, kept rather than recomputed."""
    throughput: dict = field(default_factory=dict)
    """Tokens the training steps processed (real and padded), per second of training steps, and model FLOPs where
    their rule holds (peftlab.throughput.throughput_record)."""
    num_processes: int = 1
    """Processes the run trained on, over all machines (its world size)."""
    mixed_precision: str = "no"
    """accelerate's precision the run trained in (`train.mixed_precision=auto` resolved): no, bf16 or fp16."""


@dataclass(frozen=True)
class Evaluation:
    """One validation evaluation during training, as evaluation listeners see it."""

    step: int
    """Optimizer steps done."""
    epoch: float
    """Epochs of training done: 1.0 at the end of the first epoch, 1.5 halfway through the second."""
    samples: int
    """Training samples seen, over all processes (a resumed run's earlier parts included)."""
    metrics: dict[str, float]
    """The evaluation's metrics (`loss` and the recipe's compute_metrics)."""
    last: bool = False
    """The run's final evaluation: training ends after it whatever the listeners say."""


EvaluationListener = Callable[[Evaluation], Optional[bool]]
_LISTENERS: contextvars.ContextVar[tuple[EvaluationListener, ...]] = contextvars.ContextVar(
    "peftlab_evaluation_listeners", default=())


@contextlib.contextmanager
def evaluation_listener(listener: EvaluationListener) -> Iterator[None]:
    """Call `listener(evaluation)` after each validation evaluation of every `train` inside the block (a recipe's
    `main` included, unchanged); when it returns True, training stops there as early stopping would: the best weights
    so far are kept and the run tests and saves as usual (`stopped_early` is true). What `peftlab.tune` prunes with.

    In a multi-process run every process calls its listeners with the same metrics; training stops when any asks.
    """
    token = _LISTENERS.set(_LISTENERS.get() + (listener,))
    try:
        yield
    finally:
        _LISTENERS.reset(token)


def _listeners_stop(accelerator, evaluation: Evaluation) -> bool:
    """Tell every listener about the evaluation; whether one of them (on any process) asks to stop."""
    listeners = _LISTENERS.get()
    if not listeners:
        return False
    stop = any([bool(listener(evaluation)) for listener in listeners])  # a list: every listener hears of it
    if accelerator.num_processes > 1:  # all processes must stop at the same step, or a barrier hangs
        flag = torch.tensor([float(stop)], device=accelerator.device)
        stop = bool(accelerator.reduce(flag, reduction="sum").item())
    return stop


def forget_accelerator_state() -> None:
    """Forget accelerate's process-wide state, so the next run in this process (a search trial, a test) builds its
    Accelerator afresh, with its own precision."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def resolve_mixed_precision(choice: str, model: Optional[torch.nn.Module] = None) -> str:
    """Turn `train.mixed_precision` into accelerate's value: `auto` is bf16 where the hardware has it, else `no`; on a
    CPU also `no` for a convolutional `model` that trains through its convolutions
    (`peftlab.backbones.layout.trains_through_convolutions`): oneDNN's bf16 convolutions run forward fast but their
    backward slowly. On EfficientNet-Lite0 (channels-last) a full fine-tuning step took 920 ms in bf16 against 470 ms
    in fp32, LoRA 580 against 540, while a forward pass without gradients took 61 ms against 136 (benchmarks/SPEED.md):
    so the head strategy, whose backbone only runs forward, keeps bf16."""
    on_cuda = cuda_in_use()
    if choice == "fp16" and not on_cuda:
        raise PeftlabError("train.mixed_precision=fp16 needs a CUDA GPU; use bf16 or auto on CPU")
    if choice != "auto":
        return choice
    if on_cuda:
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    return "bf16" if _cpu_has_bf16() and not (model is not None and trains_through_convolutions(model)) else "no"


def cuda_in_use() -> bool:
    """Whether runs here train on a CUDA GPU: there is one and `ACCELERATE_USE_CPU` does not say otherwise."""
    return torch.cuda.is_available() and not parse_flag_from_env("ACCELERATE_USE_CPU")


def _cpu_has_bf16() -> bool:
    # Without AVX512-BF16 or AMX, CPU bf16 is emulated and slower than fp32.
    if "AMX" in torch.backends.cpu.get_cpu_capability():
        return True
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", cpuinfo) is not None


def build_accelerator(train_cfg, output_dir, model: Optional[torch.nn.Module] = None) -> Accelerator:
    """An Accelerator with the run's precision (`auto` decided for `model` where given, `resolve_mixed_precision`),
    accumulation, trackers and epoch-seeded shuffling; sets (and logs) the process's CPU thread count
    (peftlab.threads).

    A process may run several runs one after another (a search's trials, cross-validation folds, tests), each with
    its own precision and accumulation: accelerate keeps those in process-wide singletons that refuse a second value,
    so they are reset first. The PartialState (process group, device) is kept: it is the launch's, not the run's.
    """
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    accelerator = Accelerator(
        mixed_precision=resolve_mixed_precision(train_cfg.mixed_precision, model),
        gradient_accumulation_steps=train_cfg.grad_accum_steps,
        log_with=build_trackers(train_cfg.trackers, output_dir),
        project_dir=str(output_dir),
        # Shuffle order = f(seed + epoch), the same on every process and after a resume.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=train_cfg.seed),
        dynamo_plugin=compile_plugin(train_cfg.compile),
    )
    check_launch_world_size(accelerator.num_processes)
    # After the Accelerator: on multi-process CPU without OMP_NUM_THREADS it sets a thread count of its own.
    threads = set_cpu_threads(train_cfg.cpu_threads)
    accelerator.print(f"cpu threads: {threads.threads} per process ({threads.reason})")
    if train_cfg.keep_freed_memory and accelerator.device.type == "cpu":
        keep_freed_memory()
    return accelerator


def compile_plugin(compile_model: bool) -> TorchDynamoPlugin | None:
    """accelerate's torch.compile settings for `train.compile`: the backend `accelerate launch --dynamo_backend` names,
    else inductor; None (compile off) leaves the launch's settings to accelerate.

    prepare() then wraps the model in torch.compile; weights, checkpoints and exports are written from
    `peftlab.checkpointing.plain_module`, which takes the wrapper (and its `_orig_mod.` names) off."""
    if not compile_model:
        return None
    launched = os.environ.get("ACCELERATE_DYNAMO_BACKEND", "no")
    return TorchDynamoPlugin(backend="inductor" if launched.lower() == "no" else launched)


def check_compile(compile_model: bool) -> None:
    """Refuse, in one line, `train.compile=true` where inductor cannot build its kernels: a C++ compiler for CPU
    kernels, triton for CUDA ones (found in milliseconds here; at the first step it would fail after loading)."""
    plugin = compile_plugin(compile_model)
    if plugin is None or plugin.backend != DynamoBackend.INDUCTOR:
        return
    if cuda_in_use():
        from torch.utils._triton import has_triton

        if not has_triton():
            raise PeftlabError("train.compile=true builds its CUDA kernels with triton, which is not installed; "
                               "pip install triton or set train.compile=false")
        return
    from torch._inductor.cpp_builder import get_cpp_compiler
    from torch._inductor.exc import InvalidCxxCompiler

    try:
        get_cpp_compiler()
    except InvalidCxxCompiler:
        raise PeftlabError("train.compile=true builds its CPU kernels with a C++ compiler and found none (g++, or "
                           "the one $CXX names); install g++ or set train.compile=false") from None


# What torch elastic (accelerate launch, torchrun) and the MPI launchers accelerate reads call the run's process count.
WORLD_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def check_launch_world_size(num_processes: int) -> None:
    """Refuse a process that was launched as one of N but set up alone: it would train a copy of the run by itself.

    accelerate's process state is a singleton made once: a bare `PartialState()` (or any accelerate call that makes
    one) before the Accelerator, on a machine without a GPU and without `cpu=True`, sets it up without a process
    group, and every process of a `--multi_gpu` CPU launch, one machine or many, then runs the whole run alone.
    """
    name, launched = next(((name, int(os.environ[name])) for name in WORLD_SIZE_VARS
                           if os.environ.get(name, "").isdigit()), (None, 1))
    if launched > num_processes:
        raise PeftlabError(
            f"this process was launched as one of {launched} ({name}) but accelerate set it up as one of "
            f"{num_processes}: its process state was made before the Accelerator without cpu=True; create nothing "
            "from accelerate before build_accelerator (or pass cpu=True on a machine without a GPU)")


def build_optimizer(model: torch.nn.Module, train_cfg) -> torch.optim.Optimizer:
    """AdamW or SGD with one optimizer group per strategy parameter group and weight-decay rule, each named and at
    its own peak rate (`peftlab.learning_rates`); biases and norm weights (1-D) get no weight decay."""
    groups = []
    for group in rate_groups(model, train_cfg):
        for decayed in (True, False):
            params = [p for p in group.params if (p.ndim >= 2) == decayed]
            if params:
                groups.append({"params": params, "name": group.name, "lr": group.lr,
                               "weight_decay": train_cfg.weight_decay if decayed else 0.0})
    if train_cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=train_cfg.lr, momentum=train_cfg.momentum)
    # The fused kernel updates all tensors in one pass: full fine-tuning of MiniLM on CPU spent 136 ms per step in
    # the default per-tensor loop, 15 ms fused (the whole step: 716 -> 592 ms). It runs once per group, and 18 groups
    # (MiniLM's 9 strategy groups x decay rule) stepped as fast as 2 on the same tensors.
    params = [p for group in groups for p in group["params"]]
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, lr=train_cfg.lr, fused=fused)


def build_scheduler(optimizer, train_cfg, num_steps: int):
    """Warmup for `warmup_ratio` of `num_steps`, then linear/cosine decay or constant."""
    name = "constant_with_warmup" if train_cfg.scheduler == "constant" else train_cfg.scheduler
    warmup = round(train_cfg.warmup_ratio * num_steps)  # e.g. 0.06 x 500 steps = 30 warmup steps
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=num_steps)


def evaluate(model, loader, accelerator, compute_metrics) -> EvalOutput:
    """Mean loss plus compute_metrics over a prepared loader; outputs gathered across processes, no duplicates, in
    the order of the loader's dataset (also when its batches go longest first, peftlab.data.ordering).

    Batches with `task_ids` (multi-task runs) call `compute_metrics(predictions, references, task_ids)`.
    """
    was_training = model.training
    model.eval()
    predictions, references, losses, probabilities, tasks = [], [], [], [], []
    with torch.no_grad():
        for batch in loader:
            out = model(**batch)
            logits = out.logits.float()
            pred = logits.argmax(-1) if logits.shape[-1] > 1 else logits.squeeze(-1)  # class ids, or regression values
            probs = logits.softmax(-1) if logits.shape[-1] > 1 else logits
            labels = batch["labels"]
            outputs = (pred, labels, _per_sample_loss(out, labels), probs)
            # Multi-task runs only: each example's task, gathered alongside, for the per-task metrics.
            outputs += (batch[TASK_IDS],) if TASK_IDS in batch else ()
            # One process has no duplicates to drop, and accelerate's rule for them assumes that only the last batch
            # is short (it cuts it to len(dataset) % batch size): a multi-task loader ends each task with a short
            # batch, so tasks of 1,000 and 1,178 examples at batch 64 lost 38 of the last task's.
            if accelerator.num_processes > 1:
                outputs = accelerator.gather_for_metrics(outputs)
            pred, labels, loss, probs, *task_ids = outputs
            predictions.append(pred.cpu())
            references.append(labels.cpu())
            losses.append(loss.cpu())
            probabilities.append(probs.cpu())
            tasks += [task_ids[0].cpu()] if task_ids else []
    model.train(was_training)
    columns = (predictions, references, losses, probabilities) + ((tasks,) if tasks else ())
    outputs = [torch.cat(rows) for rows in columns]
    order = loader_order(loader)
    if order is not None:  # row j is example order[j]
        outputs = [put_back(rows, order) for rows in outputs]
    predictions, references, losses, probabilities, *task_ids = outputs
    predictions, references = predictions.numpy(), references.numpy()
    task_ids = task_ids[0].numpy() if task_ids else None
    scores = compute_metrics(predictions, references) if task_ids is None else \
        compute_metrics(predictions, references, task_ids)
    metrics = {"loss": losses.mean().item(), **scores}
    return EvalOutput(metrics, predictions, references, probabilities.numpy(), task_ids)


def training_loss(model, batch: dict, class_weights: Optional[torch.Tensor]) -> torch.Tensor:
    """The model's own loss, or cross-entropy of its logits weighted per class (the head's code stays unchanged),
    plus whatever the model adds to its own cross-entropy (AdaLoRA's orthogonality penalty)."""
    out = model(**batch)
    if class_weights is None:
        return out.loss
    logits, labels = out.logits.float(), batch["labels"]
    added = out.loss - F.cross_entropy(logits, labels)  # 0 for a plain classifier
    # The mean of the weighted per-example losses, not torch's default sum(w l) / sum(w): that normaliser depends
    # on which classes a batch holds, so 2 processes x 8 examples would train differently from 1 x 16. The weights
    # average 1 over the training set (peftlab.data_rules), so the loss keeps its scale.
    weighted = F.cross_entropy(logits, labels, weight=class_weights.to(logits.device), reduction="none")
    return weighted.mean() + added


def _per_sample_loss(out, labels: torch.Tensor) -> torch.Tensor:
    # Per-sample losses let gather_for_metrics drop the padding duplicates of the last batch exactly.
    if out.logits.ndim == 2 and out.logits.shape[-1] > 1 and not labels.is_floating_point():
        return torch.nn.functional.cross_entropy(out.logits.float(), labels, reduction="none")
    return out.loss.float().reshape(1).expand(len(labels))  # other heads: the batch mean stands for each sample


def train(
    model, *, accelerator, train_cfg, train_loader, eval_loader, compute_metrics, output_dir, resume_from=None,
    class_weights: Optional[torch.Tensor] = None,
) -> TrainResult:
    """Train the model's trainable parameters; afterwards it holds the weights of the best evaluation.

    Args:
        class_weights: per-class weights of the training loss (peftlab.data_rules); None: the model's own loss.
    """
    start = time.perf_counter()
    set_seed(train_cfg.seed)
    recipe_train_loader = train_loader
    train_loader, eval_loader = accelerator.prepare(train_loader, eval_loader)
    # One optimizer step per grad_accum_steps batches, the remainder making one more: 10 batches / 4 -> 3 steps.
    steps_per_epoch = math.ceil(len(train_loader) / train_cfg.grad_accum_steps)
    total_steps = train_cfg.max_steps or steps_per_epoch * train_cfg.epochs
    # The strategy's own preparation (AdaLoRA's schedule, EVA's pass over the data) may still reshape what trains, so
    # it runs before the optimizer takes the trainable parameters.
    before_training(model, TrainingStart(total_steps, recipe_train_loader))
    optimizer = build_optimizer(model, train_cfg)
    model, optimizer = accelerator.prepare(model, optimizer)
    # A prepared scheduler steps once per process per optimizer step (accelerate's convention), so count in those.
    scheduler = accelerator.prepare(build_scheduler(optimizer, train_cfg, total_steps * accelerator.num_processes))

    layout = {"batch_size": train_cfg.batch_size, "num_processes": accelerator.num_processes,
              "grad_accum_steps": train_cfg.grad_accum_steps, "batches_per_epoch": len(train_loader)}
    progress, rng_state = Progress(**layout), None
    if resume_from is not None:
        path = resolve_checkpoint(resume_from, output_dir)
        check_same_batching(read_progress(path), layout, path)
        progress = load_checkpoint(path, accelerator, model, optimizer, scheduler)
        rng_state = load_rng_state(path, accelerator.process_index)
    param_groups = param_group_summary(optimizer)  # after a resume: the checkpoint's rates, which are the ones used
    accelerator.print("learning rates by parameter group (peak):\n" + "\n".join(describe(param_groups)))
    previous = copy.copy(progress)  # the time and samples of the parts before a resume, added to this part's
    if not accelerator.trackers:
        accelerator.init_trackers("peftlab", config={f"train.{k}": _loggable(v) for k, v in asdict(train_cfg).items()})

    bar = tqdm(total=total_steps, initial=progress.global_step, desc="train",
               disable=not accelerator.is_local_main_process)
    stopped_early = _patience_exhausted(progress, train_cfg)  # a resumed run may have stopped early already
    stop = stopped_early or progress.global_step >= total_steps
    best_evaluation = None
    samples, evaluation_s, checkpointing_s, window, micro_losses = 0, 0.0, 0.0, [], []
    tokens = TokenCounter()  # this part's, on this process; added to `previous` at each checkpoint
    after_step = after_step_hook(plain_module(accelerator, model))  # the strategy's own, e.g. AdaLoRA rank allocation
    # SIGTERM/Ctrl-C: checkpoint at the next step, then stop. Frozen weights are cast to the autocast dtype once,
    # not at every forward, and are fp32 again after the loop (train.cast_frozen_weights, peftlab.frozen_weights).
    # On a CPU, dropout masks come from a counter-based generator (train.counter_dropout, peftlab.dropout), unless
    # the model is compiled (train.compile or `accelerate launch --dynamo_backend`): inductor draws its own.
    compiled = accelerator.state.dynamo_plugin.backend != DynamoBackend.NO
    with (StopSignal(accelerator) as stop_signal,
          frozen_weights_in(plain_module(accelerator, model),
                            autocast_dtype(accelerator.mixed_precision) if train_cfg.cast_frozen_weights else None),
          counter_dropout_in(train_cfg.counter_dropout and not compiled, accelerator.device)):
        model.train()
        while not stop:
            batches, epoch_batches = _epoch_batches(accelerator, train_loader, progress), 0
            if rng_state is not None and progress.batches_in_epoch == 0:
                set_rng_state(rng_state)  # resumed at an epoch boundary: before the iterator draws its seed
                rng_state = None
            for batch in batches:
                if rng_state is not None:
                    # Resumed mid-epoch: the interrupted run saved its RNG after this epoch's iterator drew its seed.
                    set_rng_state(rng_state)
                    rng_state = None
                progress.batches_in_epoch += 1
                epoch_batches += 1
                samples += len(batch["labels"]) * accelerator.num_processes
                tokens.add(batch)
                with accelerator.accumulate(model):
                    loss = training_loss(model, batch, class_weights)
                    accelerator.backward(loss)
                    micro_losses.append(loss.detach().float())
                    if accelerator.sync_gradients:
                        step_loss = _step_loss(accelerator, micro_losses, progress.global_step + 1, output_dir)
                        if train_cfg.max_grad_norm:
                            accelerator.clip_grad_norm_(model.parameters(), train_cfg.max_grad_norm)
                        optimizer.step()
                        after_step(progress.global_step)  # before zero_grad: a hook may read the gradients
                        scheduler.step()
                        optimizer.zero_grad()
                if not accelerator.sync_gradients:
                    continue
                progress.global_step += 1
                micro_losses, epoch_end = [], progress.batches_in_epoch == len(train_loader)
                if epoch_end:  # a checkpoint taken now resumes at the start of the next epoch
                    progress.epoch, progress.batches_in_epoch = progress.epoch + 1, 0
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.4f}")
                window.append(step_loss)
                if train_cfg.log_every and progress.global_step % train_cfg.log_every == 0:
                    # The schedule of train.lr itself: every group's rate is its peak rate x the same factor.
                    peak = param_groups[0]["lr"]
                    lr = scheduler.get_last_lr()[0] * train_cfg.lr / peak if peak else 0.0
                    accelerator.log({"train/loss": sum(window) / len(window), "train/lr": lr},
                                    step=progress.global_step)
                    window = []

                evaluation_start = time.perf_counter()
                progress.step_time_s = previous.step_time_s + evaluation_start - start - evaluation_s - checkpointing_s
                progress.samples = previous.samples + samples
                last = progress.global_step >= total_steps
                evaluated = improved = False
                if _should_evaluate(train_cfg, progress.global_step, epoch_end, last):
                    outputs = evaluate(model, eval_loader, accelerator, compute_metrics)
                    metrics = outputs.metrics
                    evaluated, improved = True, _record_evaluation(progress, metrics, train_cfg.metric_for_best)
                    best_evaluation = outputs if improved else best_evaluation
                    accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=progress.global_step)
                    epochs_done = progress.epoch + progress.batches_in_epoch / len(train_loader)
                    evaluation = Evaluation(progress.global_step, epochs_done, progress.samples, metrics, last)
                    stopped_early = (_patience_exhausted(progress, train_cfg)
                                     | _listeners_stop(accelerator, evaluation))  # `|`: the listeners always hear
                stop = last or stopped_early
                signalled = not stop and stop_signal.received()
                checkpointing_start = time.perf_counter()
                evaluation_s += checkpointing_start - evaluation_start
                # Recorded with each checkpoint, so a resumed run adds to them: train_steps + evaluation + checkpointing
                # add up to train_time_s.
                progress.evaluation_s = previous.evaluation_s + evaluation_s
                progress.checkpointing_s = previous.checkpointing_s + checkpointing_s
                progress.train_time_s = previous.train_time_s + checkpointing_start - start
                if _should_save(train_cfg, progress.global_step, evaluated, improved, stop) or signalled:
                    counted = tokens.totals(accelerator)  # every process saves here: a safe place to sum them
                    for key, value in zip(("tokens", "padded_tokens", "attention_pairs"), counted):
                        setattr(progress, key, getattr(previous, key) + value)
                    saved = save_checkpoint(accelerator, model, optimizer, scheduler, progress, output_dir)
                checkpointing_s += time.perf_counter() - checkpointing_start
                if stop:  # the final figures, this save included, go into its progress.json for a later resume
                    progress.checkpointing_s = previous.checkpointing_s + checkpointing_s
                    progress.train_time_s = previous.train_time_s + time.perf_counter() - start
                    if accelerator.is_main_process:
                        rewrite_progress(saved, progress)
                if signalled:
                    bar.close()
                    raise RunInterrupted(stop_signal.name, progress.global_step, str(latest_checkpoint(output_dir)))
                if stop:
                    break
            batches.end()  # an early break would leave the loader registered in accelerate's gradient state
            if not stop and epoch_batches == 0:  # a loop that consumes nothing would spin forever: never let it
                raise PeftlabError(f"epoch {progress.epoch} yielded no training batches ({len(train_loader)} per "
                                   f"epoch, {progress.batches_in_epoch} already consumed); start afresh without "
                                   "resume_from")
    bar.close()

    best = step_dir(output_dir, progress.best_step) if progress.best_step is not None else None
    if best is not None:
        load_trainable_weights(plain_module(accelerator, model), best)
        if best_evaluation is None:  # resumed after its best evaluation: what those weights predict was not kept
            best_evaluation = evaluate(model, eval_loader, accelerator, compute_metrics)
    best_metrics = next((h for h in progress.history if h["step"] == progress.best_step), {})
    return TrainResult(
        best_metrics={k: v for k, v in best_metrics.items() if k != "step"},
        best_step=progress.best_step,
        history=progress.history,
        global_step=progress.global_step,
        train_time_s=progress.train_time_s,
        samples_per_s=progress.samples / max(progress.step_time_s, 1e-9),
        peak_memory_mb=peak_memory_mb(accelerator.device),
        stopped_early=stopped_early,
        best_checkpoint=str(best) if best else None,
        phases_s={"train_steps": progress.step_time_s, "evaluation": progress.evaluation_s,
                  "checkpointing": progress.checkpointing_s},
        param_groups=param_groups,
        best_evaluation=best_evaluation,
        throughput=throughput_record(plain_module(accelerator, model), tokens=progress.tokens,
                                     padded_tokens=progress.padded_tokens, attention_pairs=progress.attention_pairs,
                                     step_time_s=progress.step_time_s),
        num_processes=accelerator.num_processes,
        mixed_precision=accelerator.mixed_precision,
    )


def check_same_batching(saved: Progress, layout: dict, path) -> None:
    """Refuse to resume with other batches than the checkpoint's: its position in the epoch counts batches."""
    changed = [f"{key}={getattr(saved, key)} -> {value}" for key, value in layout.items()
               if getattr(saved, key) is not None and getattr(saved, key) != value]
    if changed:
        hint = ("keep train.batch_size, train.grad_accum_steps, the number of processes and the training data "
                "as they were")
        raise PeftlabError(f"checkpoint {path} was taken with other batches ({', '.join(changed)}); {hint} to "
                           "resume it, or start afresh without resume_from")


class StopSignal:
    """Turns SIGTERM (schedulers pre-empting a job) and SIGINT (Ctrl-C) into a request the loop checks after each
    optimizer step: it then saves a checkpoint and stops with the resume command. A second Ctrl-C stops at once."""

    def __init__(self, accelerator):
        self.accelerator, self.signum, self.previous = accelerator, 0, {}
        if threading.current_thread() is threading.main_thread():  # handlers can only be set from the main thread
            for signum in (signal.SIGTERM, signal.SIGINT):
                self.previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "a signal on another process"

    def received(self) -> bool:
        """Whether any process got a signal (all must stop at the same step, or a barrier hangs)."""
        if self.accelerator.num_processes == 1:
            return bool(self.signum)
        flag = torch.tensor([float(self.signum)], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item())

    def __enter__(self) -> "StopSignal":
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():  # whatever ended the loop, the user's handlers come back
            signal.signal(signum, handler)
        self.previous = {}


def _epoch_batches(accelerator, loader, progress: Progress):
    """This epoch's batches in their seeded order, without those a resumed run already consumed."""
    loader.set_epoch(progress.epoch)  # reaches the (seedable or length-grouped) sampler, also under the DDP shard
    if progress.batches_in_epoch:
        return accelerator.skip_first_batches(loader, progress.batches_in_epoch)
    return loader


def _step_loss(accelerator, micro_losses: list, step: int, output_dir) -> float:
    """Mean loss of this step over micro-batches and processes; raise on nan/inf before it reaches the weights."""
    loss = accelerator.reduce(torch.stack(micro_losses).mean(), reduction="mean").item()
    if not math.isfinite(loss):
        raise PeftlabError(
            f"loss became {loss} at step {step}; lower train.lr or set train.max_grad_norm; "
            f"last good checkpoint: {latest_checkpoint(output_dir) or 'none saved yet'}"
        )
    return loss


def _should_evaluate(train_cfg, step: int, epoch_end: bool, last: bool) -> bool:
    every = train_cfg.eval_every
    return last or (step % every == 0 if every else epoch_end)


def _should_save(train_cfg, step: int, evaluated: bool, improved: bool, stop: bool) -> bool:
    # A new best is always saved: it is where the model's final weights come from.
    every = train_cfg.checkpoint_every
    return stop or improved or (step % every == 0 if every else evaluated)


def _record_evaluation(progress: Progress, metrics: dict, metric_for_best: str) -> bool:
    """Append to the history and update best/patience; True when this evaluation is the new best."""
    if metric_for_best == "auto":
        # The recipes resolve `auto` from the training labels (peftlab.data_rules) before training; a loop called
        # without that sees no labels, so it keeps the metric that `auto` gives balanced data.
        metric_for_best = "accuracy"
    if metric_for_best not in metrics:
        raise PeftlabError(f"train.metric_for_best={metric_for_best!r} is not among the metrics {sorted(metrics)}")
    progress.history.append({"step": progress.global_step, **metrics})
    value, best = metrics[metric_for_best], progress.best_metric
    lower_is_better = "loss" in metric_for_best
    improved = best is None or (value < best if lower_is_better else value > best)
    if improved:
        progress.best_metric, progress.best_step, progress.evals_since_best = value, progress.global_step, 0
    else:
        progress.evals_since_best += 1
    return improved


def _patience_exhausted(progress: Progress, train_cfg) -> bool:
    patience = train_cfg.early_stopping_patience
    return patience is not None and progress.evals_since_best >= patience


def _loggable(value):
    # TensorBoard's hparams accept only numbers, strings and bools.
    return value if isinstance(value, (bool, int, float, str)) else str(value)


def peak_memory_mb(device: torch.device) -> float:
    """CUDA max allocated memory on `device`, or the process's max resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
