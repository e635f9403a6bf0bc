"""Multi-task runs: one frozen base, a head per task, one LoRA adapter per task (or one shared adapter).

Config: the task list, its defaults and its one-line errors. Model: routing a batch to its task's adapter and head,
and a mixed batch in one forward equal to each task alone (tiny random BERT). Data: task batches and their
sampling. Recipe: two tasks train in one run with each head seeing only its task's batches, a third task added later
leaves the first two bit-for-bit unchanged, and save + load reproduces every task (packaged MiniLM cut to one layer).
"""

from __future__ import annotations

import pytest

from peftlab.config import load_config
from peftlab.errors import PeftlabError

TWO_TASKS = "multitask.tasks=[{name: sentiment, data: {name: a.csv}}, {name: topic, data: {name: b.csv}}]"


# ---------------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------------

def test_a_single_task_config_is_unchanged():
    cfg = load_config(None, [])
    assert cfg.multitask.tasks == [] and cfg.data.name == "rotten_tomatoes"


def test_tasks_take_the_top_level_data_keys_they_leave_out():
    cfg = load_config(None, [TWO_TASKS.replace("b.csv}", "b.csv, max_train_samples: 5}"),
                             "data.max_train_samples=100", "data.max_length=32"])
    sentiment, topic = cfg.multitask.tasks
    assert (sentiment.data.name, sentiment.data.max_train_samples, sentiment.data.max_length) == ("a.csv", 100, 32)
    assert (topic.data.name, topic.data.max_train_samples, topic.data.max_length) == ("b.csv", 5, 32)
    assert cfg.multitask.mode == "separate" and cfg.multitask.sampling == "temperature"
    assert cfg.multitask.temperature == 2.0


def test_a_saved_multitask_config_loads_back_the_same(tmp_path):
    from peftlab.config import save_config

    cfg = load_config(None, [TWO_TASKS, "multitask.mode=shared", "multitask.sampling=proportional"])
    assert load_config(str(save_config(cfg, tmp_path / "config.yaml"))) == cfg


@pytest.mark.parametrize("overrides, fragment", [
    (["multitask.tasks=[{name: a, data: {name: x.csv}}, {name: a, data: {name: y.csv}}]"],
     "multitask.tasks[1].name: duplicate task name 'a'"),
    (["multitask.tasks=[{name: a}]"], "multitask.tasks[0].data.name is missing"),
    (["multitask.tasks=[{name: 'two words', data: {name: x.csv}}]"], "letters, digits, _ and -"),
    (["multitask.tasks=[{name: default, data: {name: x.csv}}]"], "not default"),
    (["multitask.tasks=[{name: a, data: {name: x.csv}, metric: f1}]"], "multitask.tasks[0].metric: expected one of"),
    (["multitask.tasks=[{name: a, data: {name: x.csv, cv_folds: 3, cv_fold: 0}}]"], "cross-validation"),
    (["multitask.tasks=[{name: a, data: {name: x.csv, nme: y}}]"], "unknown config key 'multitask.tasks[0].data.nme'"),
    (["multitask.tasks=3"], "multitask.tasks: expected a list of mappings"),
    ([TWO_TASKS, "multitask.temperature=0"], "multitask.temperature: must be > 0"),
    (["multitask.extend=runs/earlier"], "multitask.tasks is empty"),
    ([TWO_TASKS, "strategy=adapter"], "multitask.mode=separate trains one adapter per task"),
    ([TWO_TASKS, "strategy=full", "multitask.mode=shared"], "trains the whole base"),
    ([TWO_TASKS, "strategy_options.lora.init=eva"], "needs before_training"),
])
def test_bad_task_lists_fail_in_one_line(overrides, fragment):
    with pytest.raises(PeftlabError) as info:
        load_config(None, overrides)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_shared_mode_takes_a_strategy_that_keeps_the_base_frozen():
    assert load_config(None, [TWO_TASKS, "strategy=adapter", "multitask.mode=shared"]).strategy == "adapter"
