"""Metrics: the shipped evaluate modules load offline and match hand-computed scores."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import evaluate
import numpy as np
import pytest
import torch

from peftlab.metrics import compute_classification_metrics, load_metric, scalar_metrics, shipped_metrics

# Binary: predictions [0, 1, 1, 0] against references [0, 1, 0, 0] give for class 1
# TP = 1, FP = 1, FN = 0, so precision 1/2, recall 1/1, F1 = 2 * 1/2 * 1 / (1/2 + 1) = 2/3; 3 of 4 correct.
BINARY = dict(predictions=[0, 1, 1, 0], references=[0, 1, 0, 0])
# Three classes: class 0 has TP = 2, FP = 1 (example 4), FN = 0, so P = 2/3, R = 1, F1 = 0.8;
# classes 1 and 2 are never predicted right, so all their scores are 0. 2 of 6 correct.
MULTICLASS = dict(predictions=[0, 2, 1, 0, 0, 1], references=[0, 1, 2, 0, 1, 2])


def test_the_four_metrics_are_shipped():
    assert shipped_metrics() == ["accuracy", "f1", "precision", "recall"]


@pytest.mark.parametrize("name, binary, macro", [
    ("accuracy", 3 / 4, 2 / 6),
    ("f1", 2 / 3, 0.8 / 3),
    ("precision", 1 / 2, (2 / 3) / 3),
    ("recall", 1.0, 1 / 3),
])
def test_shipped_metric_matches_hand_computed(name, binary, macro):
    metric = load_metric(name, keep_in_memory=True)
    assert isinstance(metric, evaluate.EvaluationModule)
    assert metric.compute(**BINARY)[name] == pytest.approx(binary)
    extra = {} if name == "accuracy" else {"average": "macro"}
    assert metric.compute(**MULTICLASS, **extra)[name] == pytest.approx(macro)


def test_per_class_scores_are_a_json_list():
    scores = load_metric("f1", keep_in_memory=True).compute(**MULTICLASS, average=None)["f1"]
    assert scores == pytest.approx([0.8, 0.0, 0.0]) and isinstance(scores, list)


def test_classification_metrics_with_a_class_absent_from_the_eval_set():
    # Class "d" (id 3) is neither predicted nor present: it still has a row and a zero in the macro averages.
    results = compute_classification_metrics(
        np.array(MULTICLASS["predictions"]), torch.tensor(MULTICLASS["references"]), ["a", "b", "c", "d"]
    )
    assert results["accuracy"] == pytest.approx(2 / 6)
    assert results["macro_f1"] == pytest.approx(0.8 / 4)
    assert results["macro_precision"] == pytest.approx((2 / 3) / 4)
    assert results["macro_recall"] == pytest.approx(1 / 4)
    report = results["per_class"]
    assert report["a"]["precision"] == pytest.approx(2 / 3) and report["a"]["f1-score"] == pytest.approx(0.8)
    assert report["a"]["support"] == 2 and report["d"]["support"] == 0 and report["d"]["f1-score"] == 0
    # Rows are true classes, columns predicted ones.
    assert results["confusion_matrix"] == [[2, 0, 0, 0], [1, 0, 1, 0], [0, 2, 0, 0], [0, 0, 0, 0]]
    json.dumps(results)  # ready for the JSON result files
    assert set(scalar_metrics(results)) == {"accuracy", "macro_f1", "macro_precision", "macro_recall"}


def test_shipped_metrics_load_offline_and_unknown_names_say_so():
    script = textwrap.dedent("""
        from peftlab.errors import PeftlabError
        from peftlab.metrics import load_metric
        print(load_metric("precision").compute(predictions=[0, 1, 1, 0], references=[0, 1, 0, 0])["precision"])
        try:
            load_metric("no_such_metric")
        except PeftlabError as err:
            print(err)
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300,
                            cwd=Path(__file__).parents[1])
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "0.5"
    assert lines[1].startswith("metric 'no_such_metric' is not shipped with peftlab (shipped: accuracy, f1, precision")
