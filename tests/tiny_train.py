"""A tiny random BERT on a synthetic token task, for the training tests; also a script for subprocess runs.

    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --main_process_port 29555 \
        tests/tiny_train.py --output-dir /tmp/run --batch-size 4
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from transformers import BertConfig, BertForSequenceClassification

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from peftlab.config import TrainConfig  # noqa: E402
from peftlab.training import build_accelerator, forget_accelerator_state, train  # noqa: E402

VOCAB, SEQ_LEN = 100, 8
FROZEN = ("bert.embeddings.position_embeddings", "bert.embeddings.token_type_embeddings", "bert.encoder.layer.0.")


def tiny_model(seed: int = 0, dropout: float = 0.1, freeze: bool = True) -> BertForSequenceClassification:
    """hidden 32, 2 layers, 2 heads; `freeze` freezes layer 0 and position/type embeddings (a PEFT-like split)."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
        max_position_embeddings=SEQ_LEN, num_labels=2, hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    model = BertForSequenceClassification(config)
    if freeze:
        for name, p in model.named_parameters():
            p.requires_grad = not name.startswith(FROZEN)
    return model


class TokenTask(torch.utils.data.Dataset):
    """Class 0 draws most tokens from [2, 51), class 1 from [51, 100); 30% of tokens are uniform noise."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, 2, (n,), generator=g)
        low = 2 + 49 * self.labels[:, None]
        signal = low + torch.randint(0, 49, (n, SEQ_LEN), generator=g)
        noise = torch.randint(2, VOCAB, (n, SEQ_LEN), generator=g)
        self.input_ids = torch.where(torch.rand(n, SEQ_LEN, generator=g) < 0.7, signal, noise)
        self.input_ids[:, 0] = 1  # a CLS-like token

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        ids = self.input_ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": self.labels[i]}


def loaders(train_cfg: TrainConfig, train_set, eval_set):
    """Shuffled training loader and ordered evaluation loader."""
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=train_cfg.batch_size, shuffle=True)
    eval_loader = torch.utils.data.DataLoader(eval_set, batch_size=train_cfg.eval_batch_size)
    return train_loader, eval_loader


def accuracy(predictions: np.ndarray, references: np.ndarray) -> dict[str, float]:
    """The compute_metrics of these tests."""
    return {"accuracy": float((predictions == references).mean()), "n": float(len(references))}


def tiny_config(**overrides) -> TrainConfig:
    """Fast, exact defaults: fp32, jsonl only, no warmup."""
    defaults = dict(
        epochs=2, batch_size=8, eval_batch_size=8, lr=1e-2, warmup_ratio=0.0, mixed_precision="no",
        trackers=["jsonl"], log_every=1,
    )
    return TrainConfig(**{**defaults, **overrides})


def run(output_dir, train_cfg: TrainConfig, *, resume_from=None, n_train=64, n_eval=23, model=None, datasets=None,
        **model_kw):
    """Build accelerator, model (default tiny_model) and loaders (default TokenTask), train.

    Returns (TrainResult, model, accelerator)."""
    accelerator = build_accelerator(train_cfg, output_dir)
    model = model if model is not None else tiny_model(**model_kw)
    train_set, eval_set = datasets or (TokenTask(n_train, seed=1), TokenTask(n_eval, seed=2))
    train_loader, eval_loader = loaders(train_cfg, train_set, eval_set)
    # One thread: these matrices are tiny, and on a busy shared CPU OpenMP threads waiting on each other stall runs 10x.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = train(
            model, accelerator=accelerator, train_cfg=train_cfg, train_loader=train_loader, eval_loader=eval_loader,
            compute_metrics=accuracy, output_dir=output_dir, resume_from=resume_from,
        )
    finally:
        torch.set_num_threads(threads)
        accelerator.end_training()
    return result, model, accelerator


def reset_accelerate() -> None:
    """Forget accelerate's process-wide singletons so each in-process run starts clean."""
    forget_accelerator_state()


def stall_checkpoint_save(step: int) -> None:
    """Make the save of checkpoint `step` hang half-written (weights on disk, optimizer not yet), to be killed there."""
    from peftlab import checkpointing

    real_save = checkpointing._save_torch

    def stalling_save(obj, path):
        if path.parent.name == f".tmp-step-{step}" and path.name == "optimizer.pt":
            Path(path.parent, "STALLED").write_text("")
            time.sleep(600)
        real_save(obj, path)

    checkpointing._save_torch = stalling_save


def _in_save(path, step: int) -> bool:
    return Path(path).parent.name == f".tmp-step-{step}"


SAVE_POINTS = {
    # point -> (function in peftlab.checkpointing, is this call of it the one of the save of `step` to die before)
    "rng": ("_save_torch", lambda args, step: _in_save(args[1], step) and Path(args[1]).name.startswith("rng")),
    "weights": ("save_file", lambda args, step: _in_save(args[1], step)),
    "optimizer": ("_save_torch", lambda args, step: _in_save(args[1], step) and Path(args[1]).name == "optimizer.pt"),
    "progress": ("_write_text", lambda args, step: _in_save(args[0], step) and Path(args[0]).name == "progress.json"),
    # everything written and flushed, not yet renamed into place
    "publish": ("_replace_dir", lambda args, step: Path(args[1]).name == f"step-{step}"),
    # renamed into place, `latest` still names the previous checkpoint
    "pointer": ("_write_pointer", lambda args, step: args[1:] == ("latest", f"step-{step}")),
}


def kill_in_checkpoint_save(step: int, point: str) -> None:
    """SIGKILL this process inside the save of checkpoint `step`, right before the call named by `point`.

    A deterministic injection point: a kill from outside at a random time rarely lands inside a save."""
    from peftlab import checkpointing

    name, is_the_call = SAVE_POINTS[point]
    real = getattr(checkpointing, name)

    def killing(*args, **kwargs):
        if is_the_call(args, step):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)

    setattr(checkpointing, name, killing)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--eval-every", type=int, default=0)
    parser.add_argument("--checkpoint-every", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=64)
    parser.add_argument("--n-eval", type=int, default=23)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--resume-from", default=None)
    parser.add_argument("--sleep-per-step", type=float, default=0.0, help="slow training forwards down (kill tests)")
    parser.add_argument("--stall-save-at", type=int, default=None,
                        help="hang inside the checkpoint save of this step, after its weights are written (kill tests)")
    parser.add_argument("--kill-at-forward", type=int, default=None,
                        help="SIGKILL this process at its N-th training forward (fault injection)")
    parser.add_argument("--kill-in-save", default=None, metavar="STEP:POINT",
                        help=f"SIGKILL inside the save of checkpoint STEP before POINT, one of {list(SAVE_POINTS)}")
    args = parser.parse_args(argv)
    if args.stall_save_at is not None:
        stall_checkpoint_save(args.stall_save_at)
    if args.kill_in_save:
        step, point = args.kill_in_save.split(":")
        kill_in_checkpoint_save(int(step), point)

    train_cfg = tiny_config(
        batch_size=args.batch_size, epochs=args.epochs, max_steps=args.max_steps, eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every,
    )
    model = tiny_model(dropout=args.dropout)
    if args.sleep_per_step:
        model.register_forward_pre_hook(lambda module, _: time.sleep(args.sleep_per_step) if module.training else None)
    if args.kill_at_forward:
        forwards = iter(range(1, 10**9))

        def kill_at_forward(module, _):
            if module.training and next(forwards) == args.kill_at_forward:
                os.kill(os.getpid(), signal.SIGKILL)

        model.register_forward_pre_hook(kill_at_forward)
    result, model, accelerator = run(
        args.output_dir, train_cfg, resume_from=args.resume_from, n_train=args.n_train, n_eval=args.n_eval, model=model
    )
    if accelerator.is_main_process:
        # The best evaluation's per-example outputs are arrays: the summary keeps the JSON-ready fields.
        fields = {k: v for k, v in asdict(result).items() if k != "best_evaluation"}
        summary = {**fields, "num_processes": accelerator.num_processes}
        Path(args.output_dir, "result.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
