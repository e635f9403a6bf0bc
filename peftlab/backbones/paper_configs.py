"""Paper configurations for parameter-count checks (random weights, nothing downloaded); used by benchmarks and tests."""

from __future__ import annotations

import importlib.resources
import json

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification

from peftlab.errors import PeftlabError


def list_model_configs() -> list[str]:
    """Names accepted by build_from_config."""
    folder = importlib.resources.files("peftlab").joinpath("model_configs")
    return sorted(entry.name.removesuffix(".json") for entry in folder.iterdir() if entry.name.endswith(".json"))


def build_from_config(name: str, num_labels: int = 2, *, device: str | torch.device = "meta") -> nn.Module:
    """A sequence classifier built from a shipped paper config (`roberta-base`, ...) with untrained weights.

    Args:
        device: "meta" (default) allocates nothing: shapes only, enough to count parameters in milliseconds;
            "cpu" gives random weights that can run.
    """
    if name not in list_model_configs():
        raise PeftlabError(f"no shipped model config '{name}'; available: {', '.join(list_model_configs())}")
    values = json.loads(importlib.resources.files("peftlab").joinpath("model_configs", f"{name}.json").read_text())
    config = AutoConfig.for_model(values.pop("model_type"), **values, num_labels=num_labels)
    with torch.device(device):
        return AutoModelForSequenceClassification.from_config(config)
