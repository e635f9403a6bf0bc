"""Counter-based dropout masks (peftlab.dropout): the keep probability, scaling and gradient of torch's dropout, masks
that are independent between elements and calls and repeat under a seed, and a training loop in which no dropout
mask comes from torch's own Bernoulli draws any more; glibc's allocator settings (peftlab.allocator)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode

from peftlab.dropout import (
    CounterDropoutMode,
    attention_with_counter_dropout,
    counter_dropout,
    counter_dropout_in,
    keep_mask,
)
from tests.tiny_train import reset_accelerate, run, tiny_config, tiny_model


@pytest.fixture(autouse=True)
def fresh_accelerate():
    reset_accelerate()
    yield
    reset_accelerate()


def within_sigmas(observed: float, expected: float, n: int, sigmas: float = 5.0) -> bool:
    return abs(observed - expected) <= sigmas * math.sqrt(expected * (1 - expected) / n)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_mask_keeps_one_minus_p(p):
    torch.manual_seed(0)
    n = 1_000_003  # odd: the last 16-bit draw is half a word
    assert within_sigmas(keep_mask(torch.Size([n]), p).float().mean().item(), 1 - p, n)


def test_keep_masks_are_independent_between_elements_and_calls():
    torch.manual_seed(0)
    n, p = 2_000_000, 0.5
    first, second = keep_mask(torch.Size([n]), p).float(), keep_mask(torch.Size([n]), p).float()
    assert not torch.equal(first, second)
    # Two draws from one 32-bit word (even/odd positions), neighbours, and two calls: no correlation beyond chance.
    for a, b in [(first[0::2], first[1::2]), (first[:-1], first[1:]), (first, second)]:
        assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 5 / math.sqrt(len(a))
    # Every pattern of 8 neighbours about equally often (chi-square, 255 degrees of freedom: mean 255, sd 22.6).
    codes = (first[: n // 8 * 8].view(-1, 8).long() << torch.arange(8)).sum(1)
    counts = torch.bincount(codes, minlength=256).float()
    expected = counts.sum() / 256
    assert ((counts - expected) ** 2 / expected).sum().item() < 255 + 6 * 22.6


def test_large_masks_are_drawn_in_chunks_with_keys_of_their_own(monkeypatch):
    import peftlab.dropout as dropout

    monkeypatch.setattr(dropout, "CHUNK_ELEMENTS", 1000)
    torch.manual_seed(0)
    mask = keep_mask(torch.Size([100, 100]), 0.5).flatten()
    assert within_sigmas(mask.float().mean().item(), 0.5, mask.numel())
    chunks = mask.view(10, 1000)
    assert len({tuple(chunk.tolist()) for chunk in chunks}) == 10  # no chunk repeats another


def test_masks_repeat_under_a_seed():
    torch.manual_seed(7)
    a = keep_mask(torch.Size([3, 50]), 0.3)
    torch.manual_seed(7)
    assert torch.equal(a, keep_mask(torch.Size([3, 50]), 0.3))


def test_counter_dropout_scales_the_kept_elements_and_their_gradient():
    x = torch.randn(64, 384, requires_grad=True)
    y = counter_dropout(x, 0.2)
    kept = y != 0
    assert torch.allclose(y[kept], x[kept] / 0.8)
    y.sum().backward()
    assert torch.allclose(x.grad, kept.float() / 0.8)


def test_the_mode_routes_dropout_layers_and_passes_evaluation_through():
    layer = torch.nn.Dropout(0.25)
    x = torch.randn(16, 32)
    torch.manual_seed(3)
    with CounterDropoutMode():
        routed = layer(x)
    torch.manual_seed(3)
    assert torch.equal(routed, counter_dropout(x, 0.25))
    torch.manual_seed(3)
    assert not torch.equal(layer(x), routed)  # torch's own mask, from the same seed
    layer.eval()
    with CounterDropoutMode():
        assert torch.equal(layer(x), x)


def attention_inputs():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 7, 16) for _ in range(3))
    mask = torch.ones(2, 1, 7, 7, dtype=torch.bool)
    mask[1, :, :, 5:] = False  # padded keys
    mask[0, :, 3, :] = False  # a query row with no key at all
    return q, k, v, mask


def test_attention_matches_scaled_dot_product_attention_without_dropout():
    q, k, v, mask = attention_inputs()
    additive = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    additive[0, :, 3, :] = 0  # an additive mask cannot express an empty row
    for attn_mask in (mask, additive, None):
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        assert torch.allclose(attention_with_counter_dropout(q, k, v, attn_mask=attn_mask, dropout_p=1e-9),
                              expected, atol=1e-6)


def test_the_mode_routes_attention_dropout_and_leaves_causal_attention_to_torch():
    q, k, v, mask = attention_inputs()
    torch.manual_seed(5)
    with CounterDropoutMode():
        routed = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.3)
    torch.manual_seed(5)
    assert torch.equal(routed, attention_with_counter_dropout(q, k, v, attn_mask=mask, dropout_p=0.3))
    torch.manual_seed(5)
    with CounterDropoutMode():
        causal = F.scaled_dot_product_attention(q, k, v, dropout_p=0.3, is_causal=True)
    torch.manual_seed(5)
    assert torch.equal(causal, F.scaled_dot_product_attention(q, k, v, dropout_p=0.3, is_causal=True))


class MaskOps(TorchDispatchMode):
    """Counts the aten ops that draw torch's own dropout masks."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        self.count += "bernoulli" in name or "dropout" in name
        return func(*args, **(kwargs or {}))


def test_a_lora_model_draws_no_torch_mask_under_the_mode():
    model = get_peft_model(tiny_model(freeze=False), LoraConfig(r=2, target_modules=["query", "value"],
                                                                lora_dropout=0.1, task_type="SEQ_CLS")).train()
    batch = {"input_ids": torch.randint(2, 100, (4, 8)), "attention_mask": torch.ones(4, 8, dtype=torch.long)}
    with MaskOps() as plain:
        model(**batch).logits.sum().backward()
    assert plain.count > 0  # embeddings, attention, block outputs, LoRA and head dropout: torch's masks
    with counter_dropout_in(True, torch.device("cpu")), MaskOps() as counted:
        model(**batch).logits.sum().backward()
    assert counted.count == 0


def test_the_mode_is_on_only_for_cpu_runs_that_ask_for_it():
    active = torch._C._is_torch_function_mode_enabled
    for enabled, device, expected in [(True, "cpu", True), (False, "cpu", False), (True, "cuda", False)]:
        with counter_dropout_in(enabled, torch.device(device)):
            assert active() is expected


def test_training_runs_repeat_and_the_switch_chooses_the_masks(tmp_path):
    losses = {}
    for name, counter in [("a", True), ("b", True), ("torch", False)]:
        with MaskOps() as ops:
            result, _, _ = run(tmp_path / name, tiny_config(counter_dropout=counter))
        losses[name] = [evaluation["loss"] for evaluation in result.history]
        assert (ops.count == 0) is counter
    assert losses["a"] == losses["b"]
    assert losses["a"] != losses["torch"]


MMAPPED_BYTES = """
import ctypes, importlib.util, json, torch
spec = importlib.util.spec_from_file_location("allocator", {path!r})  # the module alone: no peftlab imports
allocator = importlib.util.module_from_spec(spec)
spec.loader.exec_module(allocator)

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
def mmapped_while_held():  # bytes of fresh mappings a 4 MB tensor takes (above glibc's default mmap threshold)
    mapped = libc.mallinfo2().hblkhd
    block = torch.empty(4 * 1024 * 1024, dtype=torch.uint8)
    return libc.mallinfo2().hblkhd - mapped
before = mmapped_while_held()
applied = allocator.keep_freed_memory()
print(json.dumps({{"before": before, "after": mmapped_while_held(), "applied": applied}}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_keep_freed_memory_serves_large_blocks_from_the_heap():
    import peftlab.allocator

    script = MMAPPED_BYTES.format(path=peftlab.allocator.__file__)
    out = json.loads(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                    check=True).stdout)
    assert out["applied"]
    assert out["before"] >= 4 * 1024 * 1024  # glibc's default: a fresh mapping from the kernel
    assert out["after"] < 4 * 1024 * 1024  # kept: from the heap


def test_a_compiled_model_keeps_its_own_dropout(tmp_path, monkeypatch):
    import peftlab.training as training

    asked = []
    monkeypatch.setattr(training, "counter_dropout_in",
                        lambda enabled, device: asked.append(enabled) or counter_dropout_in(enabled, device))
    run(tmp_path / "eager", tiny_config(max_steps=1))
    reset_accelerate()
    torch._dynamo.reset()
    # As `accelerate launch --dynamo_backend aot_eager` asks for it, with train.compile left false.
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "AOT_EAGER")
    run(tmp_path / "compiled", tiny_config(max_steps=1), dropout=0.0)
    assert asked == [True, False]
