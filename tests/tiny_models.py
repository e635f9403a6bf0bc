"""Tiny random-config backbones built in memory (milliseconds), one per architecture family."""

from __future__ import annotations

import torch
from torch import nn
from transformers import (BertConfig, BertForSequenceClassification, DistilBertConfig,
                          DistilBertForSequenceClassification, RobertaConfig, RobertaForSequenceClassification,
                          ViTConfig, ViTForImageClassification)
from transformers.modeling_outputs import ImageClassifierOutput

NUM_LABELS = 3
VOCAB = 100


def tiny_bert():
    return BertForSequenceClassification(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=37, num_labels=NUM_LABELS))


def tiny_roberta():
    return RobertaForSequenceClassification(RobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                                          num_attention_heads=2, intermediate_size=37,
                                                          num_labels=NUM_LABELS, pad_token_id=1))


def tiny_distilbert():
    return DistilBertForSequenceClassification(DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2,
                                                                hidden_dim=37, num_labels=NUM_LABELS))


def tiny_vit():
    return ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                               intermediate_size=37, image_size=16, patch_size=4,
                                               num_labels=NUM_LABELS))


class TinyCNN(nn.Module):
    """A plain-torch MobileNet-style classifier: depthwise 3x3 then pointwise 1x1 blocks, head `fc`."""

    peftlab_head_modules = ["fc"]

    def __init__(self, channels: int = 8, depth: int = 3):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, groups=channels), nn.ReLU(),
                          nn.Conv2d(channels, channels, 1), nn.BatchNorm2d(channels))
            for _ in range(depth)
        )
        self.fc = nn.Linear(channels, NUM_LABELS)

    def forward(self, pixel_values, labels=None):
        h = self.stem(pixel_values)
        for block in self.blocks:
            h = h + block(h)
        logits = self.fc(h.mean(dim=(2, 3)))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)


def tiny_cnn():
    return TinyCNN()


BACKBONES = {"bert": tiny_bert, "roberta": tiny_roberta, "distilbert": tiny_distilbert, "vit": tiny_vit,
             "cnn": tiny_cnn}


def build(family: str, seed: int = 0) -> nn.Module:
    """The tiny model of `family`, with weights fixed by `seed` (the same base every call), in eval mode."""
    torch.manual_seed(seed)
    return BACKBONES[family]().eval()


def example_batch(family: str, batch: int = 4, seed: int = 0) -> dict:
    """A small labelled batch that fits `family`'s inputs (text with padding, or 16x16 images)."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, NUM_LABELS, (batch,), generator=generator)
    if family in ("vit", "cnn"):
        return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=generator), "labels": labels}
    input_ids = torch.randint(3, VOCAB, (batch, 9), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, 6:] = 0  # one padded row, so pooling must respect the mask
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
