"""The text recipe with a pause at each validation evaluation (TUNE_TEST_PAUSE seconds, default 0), so the trials
of tests/test_tune.py last long enough to overlap in time or to be killed mid-run. A recipe script, as
`peftlab tune tests/tune_recipe.py ...` takes any."""

from __future__ import annotations

import os
import time

from peftlab.harness.programs import load_recipe_module, recipe_program
from peftlab.training import evaluation_listener

_text = load_recipe_module(recipe_program("text"))
DEFAULT_CONFIG = _text.DEFAULT_CONFIG
TASK = "text"  # what `peftlab tune` resolves train.metric_for_best=auto with


def main(cfg):
    pause = float(os.environ.get("TUNE_TEST_PAUSE", "0"))
    with evaluation_listener(lambda evaluation: time.sleep(pause)):
        return _text.main(cfg)
