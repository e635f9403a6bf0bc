"""Every strategy on the real packaged backbones at full depth (MiniLM, EfficientNet-Lite0). Marked slow."""

from __future__ import annotations

import pytest
import torch

from peftlab import apply_strategy, count_parameters
from peftlab.backbones import load_backbone
from peftlab.saving import load_trained, save_trained

pytestmark = pytest.mark.slow

TEXT_CASES = [("full", {}), ("head", {}), ("partial", {"top_k": 2}), ("bitfit", {}), ("lora", {"r": 8}),
              ("adapter", {"kind": "houlsby", "size": 16}), ("adapter", {"kind": "pfeiffer", "size": 16})]
IMAGE_CASES = [("full", {}), ("head", {}), ("partial", {"top_k": 2}), ("bitfit", {}), ("lora", {"r": 8}),
               ("adapter", {"kind": "pfeiffer", "size": 16})]


def text_backbone():
    return load_backbone("minilm", task="text", num_labels=2, label_names=["rotten", "fresh"])


def image_backbone():
    torch.manual_seed(0)  # the new head's initialisation
    return load_backbone("efficientnet-lite0", task="image", num_labels=10)


def one_step(model, batch):
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(2):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    model.eval()


def check_strategy(build, batch, name, options, tmp_path):
    torch.manual_seed(0)
    backbone = build()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        base_logits = backbone.model.eval()(**inputs).logits
    model = apply_strategy(backbone.model, name, **options)
    count = count_parameters(model)
    assert 0 < count.trainable <= count.total
    if name in ("lora", "adapter"):
        # MiniLM: well under 1%; a 3.6M-parameter CNN's 1x1 convolutions are a larger share (about 5% at r=8).
        assert count.trainable_percent < 6
        with torch.no_grad():
            torch.testing.assert_close(model(**inputs).logits, base_logits, atol=1e-5, rtol=0)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    one_step(model, batch)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    with torch.no_grad():
        expected = model(**inputs).logits
    save_trained(model, tmp_path)
    torch.manual_seed(0)
    reloaded = load_trained(build().model, tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name,options", TEXT_CASES, ids=lambda x: str(x))
def test_minilm(name, options, tmp_path):
    tokenizer = text_backbone().tokenizer
    batch = dict(tokenizer(["a moving, funny film", "dull and far too long for its own good"], padding=True,
                           return_tensors="pt"), labels=torch.tensor([1, 0]))
    check_strategy(text_backbone, batch, name, options, tmp_path)


@pytest.mark.parametrize("name,options", IMAGE_CASES, ids=lambda x: str(x))
def test_efficientnet_lite0(name, options, tmp_path):
    generator = torch.Generator().manual_seed(0)
    batch = {"pixel_values": torch.randn(2, 3, 64, 64, generator=generator), "labels": torch.tensor([3, 7])}
    check_strategy(image_backbone, batch, name, options, tmp_path)
