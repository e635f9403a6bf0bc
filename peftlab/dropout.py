"""Dropout masks drawn by a counter-based generator while a run trains on a CPU.

PyTorch's CPU dropout (`bernoulli_` with a scalar probability) takes its vectorised, multi-threaded MKL path on
Intel CPUs only; on every other CPU (AMD, ARM) it draws the mask one element at a time, on one thread, under the
generator's lock: about 7 ns an element on the 2-core AMD EPYC of benchmarks/SPEED.md, where a MiniLM LoRA step
(batch 32) draws 32 masks. Here a mask is a hash of each element's index and a key drawn from torch's own generator
for each call (`lowbias32`, Wellons' 32-bit integer mixer, computed with whole-tensor integer ops in place): every
core, vectorised; on that CPU the LoRA case's training phase ran 1.22x faster (SPEED.md "Cuts"). Each element is kept
with probability 1 - p (to 2^-16) and scaled by 1 / (1 - p), as `torch.nn.functional.dropout` does, so the model
trains under the same regularisation; only the random stream differs. It stays reproducible: the keys come from
`torch.manual_seed`'s generator, so a seeded run repeats, and a checkpoint's RNG state resumes it.

`counter_dropout_in` turns it on for the training loop through a torch function mode, which sees the two places a
model asks for dropout masks: `torch.nn.functional.dropout` (every `nn.Dropout`, peft's `lora_dropout`, a head's
dropout) and `scaled_dot_product_attention` with `dropout_p > 0`, whose CPU kernel draws its mask the same way; that
call becomes the attention transformers' eager path computes (scores, softmax, dropout, weighted sum), with the
softmax in fp32. Calls that draw no mask (evaluation, p = 0) and every other kind (in-place, channel dropout, causal
or grouped-query attention, CUDA tensors) pass through unchanged.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

# lowbias32's multipliers, as signed int32 (torch has no uint32 shifts on CPU; int32 products wrap the same way).
_MULTIPLIER_1 = 0x7FEB352D
_MULTIPLIER_2 = 0x846CA68B - (1 << 32)
_INT32_LIMIT = 1 << 31


def _lowbias32_(values: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """Wellons' lowbias32 over int32 `values`, in place. torch's `>>` on int32 is arithmetic, so each shift is masked
    to the logical one (an arithmetic shift would make the xor lose a bit). In place because a fresh ~MB tensor per
    op costs more than the op: glibc gives each one new pages from the kernel."""
    for shift, multiplier in ((16, _MULTIPLIER_1), (15, _MULTIPLIER_2), (16, None)):
        torch.bitwise_right_shift(values, shift, out=scratch)
        scratch.bitwise_and_((1 << (32 - shift)) - 1)
        values.bitwise_xor_(scratch)
        if multiplier is not None:
            values.mul_(multiplier)
    return values


# Masks are drawn in chunks of at most this many elements, each with a key of its own, so the cached hashes below
# stay at 16 MB whatever the tensor (BERT-base's attention probabilities at batch 32 x 512 tokens: 100M elements).
CHUNK_ELEMENTS = 1 << 23


class _HashedIndices:
    """lowbias32 of 0, 1, 2, ... as far as the largest chunk drawn so far: a chunk's key is mixed into these, so the
    masks of two calls are two different permutations of hash values, never one shifted against the other."""

    def __init__(self) -> None:
        self.values = torch.empty(0, dtype=torch.int32)

    def first(self, count: int) -> torch.Tensor:
        if count > self.values.numel():
            values = torch.arange(count, dtype=torch.int32)
            self.values = _lowbias32_(values, torch.empty_like(values))
        return self.values[:count]


_HASHED_INDICES = _HashedIndices()


def keep_mask(shape: torch.Size, p: float) -> torch.Tensor:
    """A bool mask of `shape`, each element True with probability 1 - p (p rounded to a multiple of 2^-16),
    independently, from keys drawn from torch's default CPU generator (one per chunk of CHUNK_ELEMENTS)."""
    count = shape.numel()
    mask = torch.empty(count, dtype=torch.bool)
    # Each 32-bit word gives two uniform 16-bit draws (half the hashing of one a draw; lowbias32's last step mixes
    # the high half into the low). Read as signed: P(draw >= p * 2^16 - 2^15) = 1 - p.
    threshold = min(round(p * (1 << 16)), (1 << 16) - 1) - (1 << 15)
    for start in range(0, count, CHUNK_ELEMENTS):
        size = min(CHUNK_ELEMENTS, count - start)
        key = int(torch.randint(-_INT32_LIMIT, _INT32_LIMIT, (), dtype=torch.int64))
        words = torch.bitwise_xor(_HASHED_INDICES.first((size + 1) // 2), key)
        _lowbias32_(words, torch.empty_like(words))
        torch.ge(words.view(torch.int16)[:size], threshold, out=mask[start:start + size])
    return mask.view(shape)


class _CounterDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, inputs: torch.Tensor, p: float) -> torch.Tensor:
        keep = keep_mask(inputs.shape, p)
        ctx.scale = 1.0 / (1.0 - p)
        ctx.save_for_backward(keep)
        return torch.where(keep, inputs * ctx.scale, 0)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return torch.where(keep, grad_output * ctx.scale, 0), None


def counter_dropout(inputs: torch.Tensor, p: float) -> torch.Tensor:
    """Training-mode dropout of `inputs` with probability `p` (0 < p < 1), its mask from `keep_mask`."""
    return _CounterDropout.apply(inputs, p)


def attention_with_counter_dropout(query, key, value, attn_mask=None, dropout_p: float = 0.0, scale=None):
    """`scaled_dot_product_attention` (non-causal, no grouped-query heads) with its attention-probability dropout
    drawn by `counter_dropout`. Rows whose keys are all masked out give zeros, as torch's own softmax there does."""
    scale = query.size(-1) ** -0.5 if scale is None else scale
    scores = torch.matmul(query, key.transpose(-2, -1)) * scale
    keys_left = None
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
        keys_left = attn_mask.any(dim=-1, keepdim=True)
    elif attn_mask is not None:
        scores = scores + attn_mask
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if keys_left is not None and not bool(keys_left.all()):
        weights = weights.masked_fill(~keys_left, 0)
    return torch.matmul(counter_dropout(weights, dropout_p), value)


def _argument(args: tuple, kwargs: dict, position: int, name: str, default):
    return args[position] if len(args) > position else kwargs.get(name, default)


class CounterDropoutMode(TorchFunctionMode):
    """Routes the dropout of CPU tensors in training mode to `counter_dropout` (see the module's docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.dropout:
            inputs, p = args[0], _argument(args, kwargs, 1, "p", 0.5)
            training = _argument(args, kwargs, 2, "training", True)
            inplace = _argument(args, kwargs, 3, "inplace", False)
            if training and 0 < p < 1 and not inplace and _counter_drawable(inputs):
                return counter_dropout(inputs, p)
        elif func is F.scaled_dot_product_attention:
            query = args[0]
            dropout_p = _argument(args, kwargs, 4, "dropout_p", 0.0)
            is_causal = _argument(args, kwargs, 5, "is_causal", False)
            if (0 < dropout_p < 1 and not is_causal and not _argument(args, kwargs, 7, "enable_gqa", False)
                    and _counter_drawable(query)):
                return attention_with_counter_dropout(
                    *args[:3], attn_mask=_argument(args, kwargs, 3, "attn_mask", None), dropout_p=dropout_p,
                    scale=_argument(args, kwargs, 6, "scale", None))
        return func(*args, **kwargs)


def _counter_drawable(tensor) -> bool:
    return isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu" and tensor.is_floating_point()


@contextlib.contextmanager
def counter_dropout_in(enabled: bool, device: torch.device) -> Iterator[None]:
    """`CounterDropoutMode` for the block when `enabled` and the run computes on a CPU (`device`); nothing else."""
    if not enabled or torch.device(device).type != "cpu":
        yield
        return
    with CounterDropoutMode():
        yield
