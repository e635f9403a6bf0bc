"""What the training steps processed: tokens (real and padded) and, for a transformer text model whose every block
weight trains, model FLOPs; recorded by `peftlab.training.train` in metrics.json as `throughput`.

Tokens are read from each training batch's attention mask (from `input_ids` when a batch has no mask): real tokens
are the mask's ones, padded tokens its size (batch x padded length). Batches without token inputs (images, cached
features) count none, and their runs record no tokens.

Model FLOPs follow the PaLM paper's rule (Chowdhery et al. 2022, Appendix B), per token
    6 N + 12 L H T
- N: the parameters of the transformer blocks, i.e. without embeddings and without the task head (Kaplan et al.
  2020, Sec. 2.1, count non-embedding parameters: an embedding is a lookup, not a matmul, and the head runs once
  per text, not per token). 2 N FLOPs per token forward (a multiply and an add per weight), 4 N backward (the
  gradients of the activations and of the weights).
- 12 L H T: attention's two matmuls without weights (scores Q K^T and their weighted sum of V, each T x H per
  token and layer at 2 FLOPs per multiply-add: 4 L H T forward, twice that backward); L layers, H hidden size,
  T the batch's padded length. Kaplan et al. count only the scores' term (2 n_layer n_ctx d_attn forward).
A batch of B texts padded to T tokens: 6 N B T + 12 L H B T^2. For MiniLM (N = 10,646,784 in 6 blocks of
H = 384), 32 texts padded to 32 tokens: 6 x 10.6M x 1,024 + 12 x 6 x 384 x 32 x 32^2 = 65.4 + 0.9 GFLOP.
The tokens are the padded ones, the work the matmuls did. The rule holds where every block weight trains (full
fine-tuning): a frozen weight needs no weight gradient (2 N fewer), so for LoRA, adapters or a frozen backbone it
would overstate the work, and no model FLOPs are recorded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn


class TokenCounter:
    """Real tokens, padded tokens and attention position pairs (sum of B x T^2) of the training batches this
    process ran. The real tokens stay a sum on the batch's device until `totals`, so a GPU step does not wait."""

    def __init__(self):
        self.real: torch.Tensor | int = 0
        self.padded = self.pairs = 0

    def add(self, batch: dict) -> None:
        """Count one training batch (a dict of model inputs)."""
        mask = batch.get("attention_mask")
        ids = batch.get("input_ids")
        if mask is None and ids is None:
            return
        shape = (mask if mask is not None else ids).shape
        rows, length = shape[0], shape[-1]
        self.padded += rows * length
        self.pairs += rows * length * length
        self.real = self.real + (mask.sum(dtype=torch.int64) if mask is not None else rows * length)

    def totals(self, accelerator) -> tuple[int, int, int]:
        """(real tokens, padded tokens, attention pairs) over all processes. A collective call when there are
        several: every process must make it at the same point."""
        counts = torch.stack([torch.as_tensor(value, dtype=torch.int64, device=accelerator.device)
                              for value in (self.real, self.padded, self.pairs)])
        if accelerator.num_processes > 1:
            counts = accelerator.reduce(counts, reduction="sum")
        real, padded, pairs = (int(value) for value in counts.tolist())
        return real, padded, pairs


@dataclass(frozen=True)
class ModelShape:
    """What the FLOP rule needs of a transformer: non-embedding parameters, layers and hidden size."""

    parameters: int
    """N: the parameters of the transformer blocks."""
    layers: int
    hidden_size: int
    trains_every_weight: bool
    """Whether every parameter of the blocks trains (full fine-tuning), so that the 6 N rule holds."""


def transformer_shape(model: nn.Module) -> Optional[ModelShape]:
    """The blocks of a transformers model (the ModuleList of `config.num_hidden_layers` blocks), or None for a model
    that has no such config (a plain torch classifier)."""
    config = next((getattr(module, "config", None) for module in model.modules()
                   if hasattr(getattr(module, "config", None), "num_hidden_layers")), None)
    if config is None:
        return None
    layers = config.num_hidden_layers
    stacks = [module for module in model.modules() if isinstance(module, nn.ModuleList) and len(module) == layers]
    if not stacks:
        return None
    blocks = max(stacks, key=lambda stack: sum(p.numel() for p in stack.parameters()))
    parameters = list(blocks.parameters())
    return ModelShape(parameters=sum(p.numel() for p in parameters), layers=layers, hidden_size=config.hidden_size,
                      trains_every_weight=all(p.requires_grad for p in parameters))


def training_flops(shape: ModelShape, padded_tokens: int, attention_pairs: int) -> float:
    """Model FLOPs of training steps over `padded_tokens` tokens (PaLM, Appendix B): 6 N per token plus 12 L H per
    attention position pair (sum over batches of B x T^2)."""
    return 6 * shape.parameters * padded_tokens + 12 * shape.layers * shape.hidden_size * attention_pairs


def throughput_record(model: nn.Module, *, tokens: int, padded_tokens: int, attention_pairs: int,
                      step_time_s: float) -> dict:
    """metrics.json's `throughput`: tokens the training steps processed and per second of steps (the seconds of
    `samples_per_s`: evaluation and checkpointing excluded), plus model FLOPs and their rate where the rule holds.

    Args:
        model: the trained model (unwrapped), for its shape and what trains.
    """
    seconds = max(step_time_s, 1e-9)
    if not padded_tokens:
        return {"train_tokens": None, "train_padded_tokens": None, "tokens_per_s": None, "padded_tokens_per_s": None}
    record = {"train_tokens": tokens, "train_padded_tokens": padded_tokens, "tokens_per_s": tokens / seconds,
              "padded_tokens_per_s": padded_tokens / seconds}
    shape = transformer_shape(model)
    if shape is not None and shape.trains_every_weight:
        flops = training_flops(shape, padded_tokens, attention_pairs)
        record.update(model_flops=flops, model_flops_per_s=flops / seconds,
                      model_flops_rule=f"6N + 12LHT per padded token (PaLM, App. B): N={shape.parameters:,} "
                                       f"block parameters, L={shape.layers}, H={shape.hidden_size}")
    return record
