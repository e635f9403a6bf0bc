"""The trainable-parameter columns of the LoRA paper (Table 2) and Houlsby et al. (Table 1), from configs alone."""

import importlib.util
import sys
from pathlib import Path

import pytest

from peftlab import apply_strategy, count_parameters
from peftlab.backbones import build_from_config

spec = importlib.util.spec_from_file_location(
    "parameter_counts", Path(__file__).parents[1] / "benchmarks" / "parameter_counts.py")
parameter_counts = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = parameter_counts  # dataclasses look their module up
spec.loader.exec_module(parameter_counts)


@pytest.mark.parametrize("row", parameter_counts.ROWS, ids=lambda r: f"{r.model}-{r.method}")
def test_matches_the_paper_within_its_rounding(row):
    ours, exact = parameter_counts.measure(row)
    unit = row.paper[-1]
    paper, mine = float(row.paper[:-1]), float(ours[:-1])
    # Papers print one decimal: equal after rounding, or (documented in the row's note) within 7%.
    assert mine == paper or (row.note and abs(mine - paper) / paper < 0.07), (row, ours)
    assert ours.endswith(unit)


def test_exact_lora_counts():
    base = apply_strategy(build_from_config("roberta-base"), "lora", r=8)
    assert count_parameters(base).trainable_without_head == 12 * 2 * (768 * 8 + 8 * 768) == 294_912
    large = apply_strategy(build_from_config("roberta-large"), "lora", r=8)
    assert count_parameters(large).trainable_without_head == 24 * 2 * (1024 * 8 + 8 * 1024)

