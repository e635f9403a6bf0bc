"""Loading never runs code from a file: safetensors for weights, weights_only torch.load, no pickled objects."""

from __future__ import annotations

import ast
import io
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest

from peftlab import apply_strategy
from peftlab.config import ModelConfig
from peftlab.data.image import ArraysOnlyUnpickler
from peftlab.saving import save_trained
from tests.tiny_models import build

PACKAGE = Path(__file__).parents[1] / "peftlab"


class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo this must never run",))


def test_data_pickles_load_arrays_but_refuse_code():
    arrays = ArraysOnlyUnpickler(io.BytesIO(pickle.dumps(np.arange(6, dtype=np.uint8).reshape(2, 3)))).load()
    assert arrays.shape == (2, 3)
    with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
        ArraysOnlyUnpickler(io.BytesIO(pickle.dumps(RunsCode()))).load()


def torch_load_calls(path: Path) -> list[ast.Call]:
    return [node for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
            and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"]


def test_every_torch_load_is_weights_only():
    calls = [(path.name, call) for path in PACKAGE.rglob("*.py") for call in torch_load_calls(path)]
    assert calls, "expected torch.load calls in checkpointing"
    for name, call in calls:
        weights_only = [k.value for k in call.keywords if k.arg == "weights_only"]
        assert weights_only and isinstance(weights_only[0], ast.Constant) and weights_only[0].value is True, name
    assert not [p for p in PACKAGE.rglob("*.py") if re.search(r"\bpickle\.load\(", p.read_text())]


def test_remote_code_is_off_by_default():
    assert ModelConfig().trust_remote_code is False


@pytest.mark.parametrize("strategy", ["full", "lora", "adapter", "head"])
def test_saved_weights_are_safetensors(strategy, tmp_path):
    save_trained(apply_strategy(build("bert"), strategy), tmp_path)
    weight_files = [p.name for p in tmp_path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".safetensors")]
    assert weight_files and all(name.endswith(".safetensors") for name in weight_files)
