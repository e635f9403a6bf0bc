"""Multi-task runs: one frozen base, a head per task, one LoRA adapter per task (or one shared adapter).

Config: the task list, its defaults and its one-line errors. Model: routing a batch to its task's adapter and head,
and a mixed batch in one forward equal to each task alone (tiny random BERT). Data: task batches and their
sampling. Recipe: two tasks train in one run with each head seeing only its task's batches, a third task added later
leaves the first two bit-for-bit unchanged (mode separate) or, added on a shared adapter, is measured for what the
first two forget, and save + load reproduces every task (packaged MiniLM cut to one layer).
"""

from __future__ import annotations

import pytest

from peftlab.config import load_config
from peftlab.errors import PeftlabError

TWO_TASKS = "multitask.tasks=[{name: sentiment, data: {name: a.csv}}, {name: topic, data: {name: b.csv}}]"


# ---------------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------------

def test_a_single_task_config_is_unchanged(tmp_path):
    from peftlab.config import config_to_dict, save_config

    cfg = load_config(None, [])
    assert cfg.multitask.tasks == [] and cfg.data.name == "rotten_tomatoes"
    # Its config.yaml is written as before multi-task runs existed (no `multitask` section), and loads back the same.
    assert "multitask" not in config_to_dict(cfg) and "multitask" in config_to_dict(load_config(None, [TWO_TASKS]))
    assert load_config(str(save_config(cfg, tmp_path / "config.yaml"))) == cfg


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
    (["multitask.tasks=[{name: news, data: {name: x.csv}}, {name: news, data: {name: y.csv}}]"],
     "multitask.tasks[1].name: duplicate task name 'news'"),
    (["multitask.tasks=[{name: news}]"], "multitask.tasks[0].data.name is missing"),
    (["multitask.tasks=[{name: ra, data: {name: x.csv}}]"], "nor part of peft's prefix lora_"),
    (["multitask.tasks=[{name: 'two words', data: {name: x.csv}}]"], "letters, digits, _ and -"),
    (["multitask.tasks=[{name: default, data: {name: x.csv}}]"], "not default"),
    (["multitask.tasks=[{name: news, data: {name: x.csv}, metric: f1}]"], "multitask.tasks[0].metric: expected one of"),
    (["multitask.tasks=[{name: news, data: {name: x.csv, cv_folds: 3, cv_fold: 0}}]"], "cross-validation"),
    (["multitask.tasks=[{name: news, data: {name: x.csv, nme: y}}]"],
     "unknown config key 'multitask.tasks[0].data.nme'"),
    (["multitask.tasks=3"], "multitask.tasks: expected a list of mappings"),
    ([TWO_TASKS, "multitask.temperature=0"], "multitask.temperature: must be > 0"),
    (["multitask.extend=runs/earlier"], "multitask.tasks is empty"),
    ([TWO_TASKS, "strategy=adapter"], "multitask.mode=separate trains one adapter per task"),
    ([TWO_TASKS, "strategy=full", "multitask.mode=shared"], "trains the whole base"),
    ([TWO_TASKS, "strategy_options.lora.init=eva"], "needs before_training"),
    ([TWO_TASKS, "strategy=prompt", "multitask.mode=shared"], "keeps the task head inside its peft adapter"),
])
def test_bad_task_lists_fail_in_one_line(overrides, fragment):
    with pytest.raises(PeftlabError) as info:
        load_config(None, overrides)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_shared_mode_takes_a_strategy_that_keeps_the_base_frozen():
    assert load_config(None, [TWO_TASKS, "strategy=adapter", "multitask.mode=shared"]).strategy == "adapter"


# ---------------------------------------------------------------------------------------------------------------------
# Fixtures: a tiny random BERT saved with MiniLM's tokenizer, and three small CSV tasks
# ---------------------------------------------------------------------------------------------------------------------

import contextlib  # noqa: E402
import csv  # noqa: E402
import importlib.util  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).parents[1]
TASK_WORDS = {  # task -> label -> words that give the label away
    "sentiment": {"negative": ["awful", "dull", "bad"], "positive": ["great", "superb", "fine"]},
    "topic": {"sport": ["goal", "match", "team"], "money": ["bank", "stock", "price"], "music": ["song", "band", "album"]},
    "spam": {"ham": ["meeting", "lunch", "report"], "spam": ["prize", "winner", "free"]},
}
FILLER = "the a of and to in it is on that this with for as".split()
FAST = ["train.max_steps=6", "train.batch_size=8", "train.eval_batch_size=16", "train.eval_every=3",
        "train.mixed_precision=no", "train.trackers=[jsonl]", "train.lr=1e-2", "train.warmup_ratio=0",
        "data.max_length=16", "data.validation_fraction=0.2", "data.test_fraction=0.2", "model.pooling=cls",
        "train.cpu_threads=1"]


def write_task_csv(path: Path, task: str, n: int = 40, seed: int = 0) -> Path:
    rng = random.Random(f"{task}-{seed}")
    labels = list(TASK_WORDS[task])
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for i in range(n):
            label = labels[i % len(labels)]
            words = rng.sample(FILLER, 5) + [rng.choice(TASK_WORDS[task][label])]
            rng.shuffle(words)
            writer.writerow([" ".join(words), label])
    return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    """A 2-layer hidden-32 random BERT with MiniLM's tokenizer (seconds to train), and a CSV per task."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from peftlab.backbones import PACKAGED_BACKBONES, packaged_folder

    folder = tmp_path_factory.mktemp("multitask_assets")
    tokenizer = AutoTokenizer.from_pretrained(packaged_folder("minilm", PACKAGED_BACKBONES["minilm"]))
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, intermediate_size=37,
                                             max_position_embeddings=64)).save_pretrained(folder / "tiny_bert")
    tokenizer.save_pretrained(folder / "tiny_bert")
    return {"base": folder / "tiny_bert", **{task: write_task_csv(folder / f"{task}.csv", task) for task in TASK_WORDS}}


def task_list(assets, *names: str) -> str:
    return "multitask.tasks=[" + ", ".join(f"{{name: {name}, data: {{name: {assets[name]}}}}}" for name in names) + "]"


def run_recipe(assets, output_dir: Path, *overrides: str) -> dict:
    spec = importlib.util.spec_from_file_location("multitask_recipe", ROOT / "recipes" / "multitask_classification.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    cfg = load_config(str(recipe.DEFAULT_CONFIG), [*FAST, f"model.name={assets['base']}", f"output_dir={output_dir}",
                                                    *overrides])
    return recipe.main(cfg)


# ---------------------------------------------------------------------------------------------------------------------
# Training in the one engine
# ---------------------------------------------------------------------------------------------------------------------

def test_two_tasks_train_in_one_run_and_each_head_sees_only_its_own_batches(assets, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from peftlab import multitask

    seen = {}  # head copy -> the task ids of every training batch it ran on
    real_build = multitask.build_multitask_model

    def build_and_watch(*args, **kwargs):
        model, backbone = real_build(*args, **kwargs)
        routing = model.peftlab_tasks

        def watch(name):
            def hook(module, inputs):
                if module.training:
                    seen.setdefault(name, set()).update(routing.task_ids.tolist())
            return hook

        for module in model.modules():
            if isinstance(module, multitask.TaskHeads):
                for name, head in module.heads.items():
                    head.register_forward_pre_hook(watch(name))
        return model, backbone

    monkeypatch.setattr(multitask, "build_multitask_model", build_and_watch)
    # Proportional: each task's 3 batches (24 training examples, batches of 8) once in the one 6-step epoch.
    metrics = run_recipe(assets, tmp_path / "run", task_list(assets, "sentiment", "topic"),
                         "multitask.sampling=proportional", "train.eval_every=0")
    assert seen == {"sentiment": {0}, "topic": {1}}  # every training batch held one task, and only its head ran
    for name in ("sentiment", "topic"):  # and each task's adapter trained (LoRA's B starts at zero)
        adapter = load_file(tmp_path / "run" / "model" / name / "adapter_model.safetensors")
        assert any(tensor.abs().sum() > 0 for key, tensor in adapter.items() if "lora_B" in key)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(saved["tasks"]) == {"sentiment", "topic"}
    for name in ("sentiment", "topic"):
        task = saved["tasks"][name]
        assert {"accuracy", "macro_f1"} <= set(task["validation"]) and "confusion_matrix" in task["test"]
        assert task["parameters"]["adapter"] == 2 * 2 * (32 * 8 + 8 * 32)  # two layers, query and value
        assert task["parameters"]["head"] == 32 * len(TASK_WORDS[name]) + len(TASK_WORDS[name])
        assert saved["validation"][f"{name}/accuracy"] == task["validation"]["accuracy"]
    assert saved["validation"]["tasks_mean"] == pytest.approx(
        (saved["tasks"]["sentiment"]["validation"]["accuracy"] + saved["tasks"]["topic"]["validation"]["accuracy"]) / 2)
    assert metrics["best_step"] == 6 and saved["multitask"]["mode"] == "separate"
    assert [task["batch_share"] for task in saved["tasks"].values()] == [0.5, 0.5]
    card = (tmp_path / "run" / "README.md").read_text()
    assert "| `sentiment` |" in card and "| `topic` |" in card
    # Its command to add a task pastes into a shell: the YAML list, which holds spaces, is one quoted argument.
    assert f'multitask.extend={tmp_path / "run"} "multitask.tasks=[{{name: NEW, data: {{name: NEW.csv}}}}]"' in card
    assert (tmp_path / "run" / "test_predictions_topic.csv").read_text().startswith("index,label,prediction,p_money")


# ---------------------------------------------------------------------------------------------------------------------
# Task batches
# ---------------------------------------------------------------------------------------------------------------------

def test_an_interrupted_run_resumes_to_the_same_weights_and_scores(assets, tmp_path, monkeypatch):
    """A multi-task run stopped after its step-4 checkpoint and resumed (`resume_from=latest`) trains on in the
    same task order and ends where the uninterrupted run ends: every task's adapter and head, and its test scores."""
    from safetensors.torch import load_file

    from peftlab import multitask

    overrides = [task_list(assets, "sentiment", "topic"), "train.max_steps=8", "train.checkpoint_every=4",
                 "train.eval_every=4"]
    reference = run_recipe(assets, tmp_path / "ref", *overrides)
    real_build, forwards = multitask.build_multitask_model, []

    def build_and_stop(*args, **kwargs):
        model, backbone = real_build(*args, **kwargs)

        def stop(module, inputs):
            forwards.append(module.training)
            if sum(forwards) == 6:  # the sixth training batch: after step 4's checkpoint and evaluation
                raise KeyboardInterrupt
        model.register_forward_pre_hook(stop)
        return model, backbone

    monkeypatch.setattr(multitask, "build_multitask_model", build_and_stop)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(assets, tmp_path / "run", *overrides)
    checkpoints = sorted(int(path.name.split("-")[1]) for path in (tmp_path / "run" / "checkpoints").glob("step-*"))
    assert checkpoints and 4 <= checkpoints[-1] < 8

    def build_and_count(*args, **kwargs):
        model, backbone = real_build(*args, **kwargs)
        model.register_forward_pre_hook(lambda module, inputs: resumed_steps.append(module.training))
        return model, backbone

    resumed_steps = []
    monkeypatch.setattr(multitask, "build_multitask_model", build_and_count)
    resumed = run_recipe(assets, tmp_path / "run", *overrides, "resume_from=latest")
    assert sum(resumed_steps) == 8 - checkpoints[-1]  # it went on from its last checkpoint, not from the start
    assert resumed["global_step"] == reference["global_step"] == 8
    assert resumed["test"] == pytest.approx(reference["test"], abs=1e-6)
    for name in ("sentiment", "topic"):
        for file in ("adapter_model.safetensors", "head.safetensors"):
            ours, theirs = (load_file(tmp_path / run / "model" / name / file) for run in ("run", "ref"))
            assert ours.keys() == theirs.keys()
            for key in ours:
                torch.testing.assert_close(ours[key], theirs[key], atol=1e-6, rtol=0)


def task_of(index: int, sizes) -> int:
    return next(task for task in range(len(sizes)) if index < sum(sizes[:task + 1]))


def test_proportional_sampling_runs_every_batch_of_every_task_once_per_epoch():
    from peftlab.data.tasks import TaskBatchSampler

    sizes = [30, 10, 5]
    sampler = TaskBatchSampler(sizes, 4, shuffle=True, sampling="proportional", seed=3)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 8 + 3 + 2
    assert sorted(i for batch in batches for i in batch) == list(range(45))  # each example once
    assert all(len({task_of(i, sizes) for i in batch}) == 1 for batch in batches)  # one task per batch
    sampler.set_epoch(0)
    assert list(sampler) == batches  # an epoch's order is a function of (seed, epoch)
    sampler.set_epoch(1)
    assert list(sampler) != batches


def test_temperature_sampling_follows_n_to_the_one_over_t():
    from peftlab.data.tasks import TaskBatchSampler, sampling_shares

    sizes = [8000, 2000]
    assert sampling_shares(sizes, "proportional", 2.0) == pytest.approx([0.8, 0.2])
    assert sampling_shares(sizes, "temperature", 2.0) == pytest.approx([2 / 3, 1 / 3])  # sqrt: 89.4 vs 44.7
    sampler = TaskBatchSampler(sizes, 10, shuffle=True, sampling="temperature", temperature=2.0, seed=0)
    counts = [0, 0]
    for epoch in range(5):
        sampler.set_epoch(epoch)
        for batch in sampler:
            tasks = {task_of(i, sizes) for i in batch}
            assert len(tasks) == 1
            counts[tasks.pop()] += 1
    assert counts[1] / sum(counts) == pytest.approx(1 / 3, abs=0.02)  # 5,000 draws: 1/3 ± 3 standard errors


def test_group_by_length_groups_each_tasks_batches_by_length():
    """train.group_by_length (on by default) applies to multi-task batches too: one task per batch, every example
    once per epoch, far less padding than plain shuffles, and the same order for the same (seed, epoch)."""
    import random as plain_random

    from peftlab.data.tasks import TaskBatchSampler

    rng = plain_random.Random(0)
    sizes = [400, 160]
    lengths = [[rng.randint(1, 128) for _ in range(n)] for n in sizes]
    flat = [length for task in lengths for length in task]

    def padded(batches):  # tokens after padding each batch to its longest
        return sum(len(batch) * max(flat[i] for i in batch) for batch in batches)

    grouped = TaskBatchSampler(sizes, 8, shuffle=True, sampling="proportional", seed=3, lengths=lengths)
    batches = list(grouped)
    assert sorted(i for batch in batches for i in batch) == list(range(sum(sizes)))
    assert all(len({task_of(i, sizes) for i in batch}) == 1 for batch in batches)
    shuffled = list(TaskBatchSampler(sizes, 8, shuffle=True, sampling="proportional", seed=3))
    assert padded(batches) < 0.8 * padded(shuffled)
    grouped.set_epoch(0)
    assert list(grouped) == batches


def test_evaluation_batches_go_through_each_task_in_order():
    from peftlab.data.tasks import TaskBatchSampler

    assert list(TaskBatchSampler([3, 2], 2, shuffle=False)) == [[0, 1], [2], [3, 4]]
    # By length (train.group_by_length): each task's examples longest first, and the order evaluate puts back.
    by_length = TaskBatchSampler([3, 2], 2, shuffle=False, lengths=[[1, 5, 3], [2, 9]])
    assert list(by_length) == [[1, 2], [0], [4, 3]] and by_length.order == [1, 2, 0, 4, 3]
    assert TaskBatchSampler([3, 2], 2, shuffle=False).order is None


def test_evaluation_in_length_order_returns_outputs_in_split_order(assets):
    """evaluate() on a multi-task loader whose batches go longest first gives what the in-order loader gives."""
    from types import SimpleNamespace

    import numpy as np
    from accelerate import Accelerator

    from peftlab.data.tasks import make_task_text_dataloader
    from peftlab.metrics import multitask_scalar_metrics, per_task_metrics
    from peftlab.training import evaluate

    model, backbone = tiny_multitask(assets)
    tasks = [SimpleNamespace(name=name, label_names=list(TASK_WORDS[name]), metric="accuracy")
             for name in ("sentiment", "topic")]
    splits = [datasets_split(backbone.tokenizer, [text * (1 + i % 3) for i, text in enumerate(TEXTS)], labels)
              for labels in ([0, 1, 0, 1, 1, 0], [2, 1, 0, 2, 1, 0])]

    def compute(predictions, references, task_ids):
        return multitask_scalar_metrics(per_task_metrics(predictions, references, task_ids, tasks), tasks)

    accelerator = Accelerator(cpu=True)
    outputs = [evaluate(model, accelerator.prepare(make_task_text_dataloader(splits, backbone.tokenizer, 4,
                                                                               shuffle=False, group_by_length=grouped)),
                        accelerator, compute) for grouped in (False, True)]
    np.testing.assert_array_equal(outputs[0].task_ids, [0] * 6 + [1] * 6)
    np.testing.assert_array_equal(outputs[1].task_ids, outputs[0].task_ids)
    np.testing.assert_array_equal(outputs[1].references, outputs[0].references)
    np.testing.assert_allclose(outputs[1].probabilities, outputs[0].probabilities, atol=1e-5)
    assert outputs[1].metrics == pytest.approx(outputs[0].metrics, abs=1e-6)


@pytest.mark.parametrize("grouped", [False, True])
def test_evaluation_keeps_every_example_when_each_task_ends_in_a_short_batch(assets, grouped):
    """Tasks of 3 and 6 examples at batch 4 give batches 3 | 4, 2: accelerate's end-of-loader cut (9 % 4 = 1 row of
    the last batch) must not drop the second task's last example."""
    from types import SimpleNamespace

    import numpy as np
    from accelerate import Accelerator

    from peftlab.data.tasks import make_task_text_dataloader
    from peftlab.metrics import multitask_scalar_metrics, per_task_metrics
    from peftlab.training import evaluate

    model, backbone = tiny_multitask(assets)
    tasks = [SimpleNamespace(name=name, label_names=list(TASK_WORDS[name]), metric="accuracy")
             for name in ("sentiment", "topic")]
    splits = [datasets_split(backbone.tokenizer, TEXTS[:3], [0, 1, 0]),
              datasets_split(backbone.tokenizer, TEXTS, [2, 1, 0, 2, 1, 0])]

    def compute(predictions, references, task_ids):
        return multitask_scalar_metrics(per_task_metrics(predictions, references, task_ids, tasks), tasks)

    accelerator = Accelerator(cpu=True)
    loader = accelerator.prepare(make_task_text_dataloader(splits, backbone.tokenizer, 4, shuffle=False,
                                                           group_by_length=grouped))
    output = evaluate(model, loader, accelerator, compute)
    np.testing.assert_array_equal(output.task_ids, [0] * 3 + [1] * 6)
    np.testing.assert_array_equal(output.references, [0, 1, 0, 2, 1, 0, 2, 1, 0])


def datasets_split(tokenizer, texts: list[str], labels: list[int]):
    import datasets

    tokenized = tokenizer(texts, truncation=True, max_length=64)
    return datasets.Dataset.from_dict({**tokenized, "labels": labels})


# ---------------------------------------------------------------------------------------------------------------------
# Routing (model level)
# ---------------------------------------------------------------------------------------------------------------------

def tiny_multitask(assets, names=("sentiment", "topic"), mode="separate", strategy="lora", seed=1, options=None):
    from peftlab.config import ModelConfig
    from peftlab.multitask import TaskSpec, build_multitask_model

    torch.manual_seed(seed)
    tasks = [TaskSpec(name, list(TASK_WORDS.get(name, ["no", "yes"]))) for name in names]
    return build_multitask_model(ModelConfig(name=str(assets["base"]), pooling="mean"), "text", tasks, strategy,
                                 options or {}, mode=mode)


@pytest.mark.parametrize("strategy, options, mode", [
    ("peft", {"method": "lora"}, "separate"),  # peft's LoRA by name: one adapter per task, as strategy lora
    ("ia3", {}, "shared"),  # a peft tuner other than LoRA, shared
])
def test_peft_methods_keep_the_heads_out_of_their_adapters(assets, tmp_path, strategy, options, mode):
    """Without a head to save, peft's methods must not take the classifier into the adapter (SEQ_CLS would): the
    tasks' heads stay routed per task, and save + load into a fresh model reproduces every task."""
    from peftlab.saving import load_multitask_weights, save_multitask

    model, backbone = tiny_multitask(assets, mode=mode, strategy=strategy, options=options)
    assert not any("modules_to_save" in name for name, _ in model.named_parameters())
    with torch.no_grad():  # every trained tensor away from its initial value, so a mix-up shows
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.1)
    model.eval()
    batch = dict(backbone.tokenizer(TEXTS, return_tensors="pt", padding=True))
    expected = [model(**batch, task_ids=torch.full((len(TEXTS),), task)).logits for task in (0, 1)]
    save_multitask(model, tmp_path / "model")
    loaded, _ = tiny_multitask(assets, mode=mode, strategy=strategy, options=options, seed=5)
    load_multitask_weights(loaded, tmp_path / "model", ["sentiment", "topic"])
    loaded.eval()
    for task in (0, 1):
        torch.testing.assert_close(loaded(**batch, task_ids=torch.full((len(TEXTS),), task)).logits, expected[task])


def test_a_training_batch_must_hold_one_task_and_needs_task_ids(assets):
    model, backbone = tiny_multitask(assets)
    batch = dict(backbone.tokenizer(["great match", "dull song"], return_tensors="pt", padding=True))
    model.train()
    with pytest.raises(ValueError, match="must hold one task"):
        model(**batch, task_ids=torch.tensor([0, 1]))
    with pytest.raises(PeftlabError, match="needs `task_ids`"):
        model(**batch)


@pytest.mark.parametrize("name", ["value", "dense", "weight"])
def test_a_task_named_like_a_weight_of_the_model_is_refused_in_one_line(assets, name):
    """peft finds an adapter's keys by `.<name>.`: a task `value` would save the other tasks without their LoRA on
    `attention.self.value` (and load them silently wrong)."""
    with pytest.raises(PeftlabError, match=f"task name '{name}' is also part of the model's weight names") as info:
        tiny_multitask(assets, names=("sentiment", name))
    assert "\n" not in str(info.value)
    tiny_multitask(assets, names=("sentiment", name), mode="shared")  # one adapter, `default`: no clash


def test_several_processes_are_refused_in_one_line(assets):
    """One task per batch per process would make DDP average gradients of adapters other processes never ran."""
    from types import SimpleNamespace

    from peftlab.multitask import check_one_process

    model, _ = tiny_multitask(assets)
    printed = []
    with pytest.raises(PeftlabError, match=r"multi-task runs train in one process for now \(2 launched\); launch "
                                           r"with `python`") as info:
        check_one_process(SimpleNamespace(num_processes=2, print=printed.append), model)
    assert "\n" not in str(info.value)
    check_one_process(SimpleNamespace(num_processes=1, print=printed.append), model)
    assert printed == []  # LoRA does not cache frozen features: nothing to say


def test_the_loss_weights_each_example_by_its_task_and_class(assets):
    from peftlab.multitask import task_loss

    logits = torch.tensor([[2.0, 0.0, torch.finfo(torch.float32).min], [0.5, 1.0, -1.0]])
    labels, task_ids = torch.tensor([1, 2]), torch.tensor([0, 1])
    weights = torch.tensor([[1.0, 3.0, 1.0], [1.0, 1.0, 0.5]])
    plain = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    assert task_loss(logits, labels, task_ids, weights) == pytest.approx(((3 * plain[0] + 0.5 * plain[1]) / 2).item())


def test_each_recipe_refuses_the_other_kind_of_config(assets, tmp_path):
    from peftlab.runs import check_before_loading

    with pytest.raises(PeftlabError, match="run recipes/multitask_classification.py"):
        check_before_loading(load_config(None, [task_list(assets, "sentiment"), f"output_dir={tmp_path / 'a'}"]))
    with pytest.raises(PeftlabError, match="the list is empty"):
        check_before_loading(load_config(None, [f"output_dir={tmp_path / 'b'}"]), multitask=True)


# ---------------------------------------------------------------------------------------------------------------------
# Save, load, mixed batches, and a task added later
# ---------------------------------------------------------------------------------------------------------------------

TEXTS = ["a great match for the team", "the bank stock price fell", "awful dull song", "free prize winner",
         "this is fine", "that band album"]


@pytest.fixture(scope="module")
def runs(assets, tmp_path_factory) -> dict[str, Path]:
    """A two-task run (sentiment, topic; one adapter each) and a run that extends it with a third task (spam)."""
    folder = tmp_path_factory.mktemp("multitask_runs")
    run_recipe(assets, folder / "two", task_list(assets, "sentiment", "topic"))
    run_recipe(assets, folder / "three", task_list(assets, "spam"), f"multitask.extend={folder / 'two'}",
               "train.seed=7")
    return {"two": folder / "two", "three": folder / "three"}


def saved_probabilities(path: Path) -> torch.Tensor:
    with open(path) as handle:
        rows = list(csv.DictReader(handle))
    return torch.tensor([[float(value) for key, value in row.items() if key.startswith("p_")] for row in rows])


def test_save_then_load_reproduces_every_task(runs):
    import peftlab
    from peftlab.data import load_data

    run = peftlab.load(runs["two"])
    assert list(run.task_labels) == ["sentiment", "topic"]
    for task in run.cfg.multitask.tasks:  # the test split's probabilities, as the trained model wrote them
        texts = load_data(task.data, task="text").splits["test"]["text"]
        expected = saved_probabilities(runs["two"] / f"test_predictions_{task.name}.csv")
        torch.testing.assert_close(run.probabilities(texts, task=task.name), expected, atol=1e-5, rtol=0)


def test_a_mixed_batch_routes_each_input_to_its_task_in_one_forward(runs):
    import peftlab

    run = peftlab.load(runs["two"])
    tasks = ["sentiment", "topic", "topic", "sentiment", "topic", "sentiment"]
    forwards = []
    run.model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    mixed = run.logits(TEXTS, tasks=tasks)
    assert len(forwards) == 1
    for index, (text, task) in enumerate(zip(TEXTS, tasks)):
        alone = run.logits([text], task=task)
        width = len(run.task_labels[task])
        torch.testing.assert_close(mixed[index, :width], alone[0, :width], atol=1e-5, rtol=0)
    predictions = run.predict(TEXTS, tasks=tasks)
    assert [p["task"] for p in predictions] == tasks
    assert all(set(p["probabilities"]) == set(TASK_WORDS[p["task"]]) for p in predictions)


def test_an_unknown_or_missing_task_is_one_line(runs):
    import peftlab

    run = peftlab.load(runs["two"])
    with pytest.raises(PeftlabError, match="unknown task 'weather'; this run's tasks are sentiment, topic"):
        run.predict(TEXTS[:1], task="weather")
    with pytest.raises(PeftlabError, match="name the task of the inputs"):
        run.predict(TEXTS[:1])
    with pytest.raises(PeftlabError, match="got 1 tasks for 2 inputs"):
        run.predict(TEXTS[:2], tasks=["topic"])


def test_each_task_is_a_peft_adapter_plus_its_head(runs, assets):
    """Plain transformers + peft, with the task's head file, give the task's logits (peft's own format)."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import peftlab

    run = peftlab.load(runs["two"])
    model_dir = runs["two"] / "model"
    base = AutoModelForSequenceClassification.from_pretrained(assets["base"], num_labels=3, ignore_mismatched_sizes=True)
    base.load_state_dict(load_file(model_dir / "topic" / "head.safetensors"), strict=False)
    model = PeftModel.from_pretrained(base, model_dir / "topic").eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with torch.no_grad():
        logits = model(**tokenizer(TEXTS, padding=True, truncation=True, max_length=16, return_tensors="pt")).logits
    torch.testing.assert_close(logits, run.logits(TEXTS, task="topic"), atol=1e-5, rtol=0)


def test_a_task_added_later_leaves_the_earlier_tasks_bit_for_bit_unchanged(runs):
    import peftlab

    two, three = peftlab.load(runs["two"]), peftlab.load(runs["three"])
    assert list(three.task_labels) == ["sentiment", "topic", "spam"]
    for task in ("sentiment", "topic"):
        assert torch.equal(three.logits(TEXTS, task=task), two.logits(TEXTS, task=task))
        for file in ("head.safetensors", "adapter_model.safetensors"):
            assert (runs["three"] / "model" / task / file).read_bytes() == (runs["two"] / "model" / task / file).read_bytes()
    metrics = json.loads((runs["three"] / "metrics.json").read_text())
    earlier = json.loads((runs["two"] / "metrics.json").read_text())
    assert metrics["tasks"]["topic"]["test"] == earlier["tasks"]["topic"]["test"]
    assert metrics["tasks"]["spam"]["trained_in"] == str(runs["three"]) and metrics["tasks"]["topic"]["batch_share"] is None
    assert metrics["parameters"]["trainable"] == sum(metrics["tasks"]["spam"]["parameters"].values())  # only spam trained
    mixed = three.logits(TEXTS[:3], tasks=["spam", "topic", "sentiment"])
    torch.testing.assert_close(mixed[1, :3], two.logits(TEXTS[1:2], task="topic")[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("overrides, fragment", [
    (["model.num_hidden_layers=1"], "tasks on different bases"),
    (["model.pooling=mean"], "tasks on different bases"),
    (["strategy_options.lora.r=4"], "configure the new tasks' adapters as the earlier ones"),
    (["multitask.mode=shared"], "is a run of multitask.mode=separate and this one of shared"),
])
def test_extending_a_run_checks_base_strategy_and_mode(runs, assets, tmp_path, overrides, fragment):
    with pytest.raises(PeftlabError, match=fragment):
        run_recipe(assets, tmp_path / "run", task_list(assets, "spam"), f"multitask.extend={runs['two']}", *overrides)
    assert not (tmp_path / "run").exists()


def test_extending_with_a_task_the_run_has_is_refused(runs, assets, tmp_path):
    with pytest.raises(PeftlabError, match="task 'topic' is already in"):
        run_recipe(assets, tmp_path / "run", task_list(assets, "topic"), f"multitask.extend={runs['two']}")


def test_peftlab_predict_takes_the_task(runs, capsys):
    import peftlab
    from peftlab.predict import main as predict_main

    predict_main([str(runs["two"]), "--task", "topic", *TEXTS[:2]])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    expected = peftlab.load(runs["two"]).predict(TEXTS[:2], task="topic")
    assert [line["label"] for line in lines] == [p["label"] for p in expected]
    assert all(line["task"] == "topic" and set(line["probabilities"]) == set(TASK_WORDS["topic"]) for line in lines)
    for argv, fragment in [([], "is a multi-task run: pass --task, one of sentiment, topic"),
                           (["--task", "weather"], "unknown task 'weather' (--task)")]:
        with pytest.raises(SystemExit) as info:
            predict_main([str(runs["two"]), *argv, TEXTS[0]])
        assert info.value.code == 2 and fragment in capsys.readouterr().err


@pytest.mark.parametrize("strategy", ["lora", "adapter"])
def test_a_shared_adapter_with_a_head_per_task_saves_and_loads(assets, tmp_path, strategy):
    """Mode shared: one adapter (a peft LoRA, or peftlab's bottleneck adapters saved as trained tensors) for every
    task, a head per task; loading reproduces each task's test probabilities."""
    import peftlab
    from peftlab.data import load_data

    run_recipe(assets, tmp_path / "run", task_list(assets, "sentiment", "topic"), "multitask.mode=shared",
               f"strategy={strategy}", "strategy_options.adapter.size=4")
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    shared = saved["multitask"]["shared_parameters"]
    assert shared > 0 and all(task["parameters"]["adapter"] == 0 for task in saved["tasks"].values())
    assert saved["parameters"]["trainable"] == shared + sum(t["parameters"]["head"] for t in saved["tasks"].values())
    run = peftlab.load(tmp_path / "run")
    for task in run.cfg.multitask.tasks:
        texts = load_data(task.data, task="text").splits["test"]["text"]
        expected = saved_probabilities(tmp_path / "run" / f"test_predictions_{task.name}.csv")
        torch.testing.assert_close(run.probabilities(texts, task=task.name), expected, atol=1e-5, rtol=0)
    mixed = run.logits(TEXTS[:2], tasks=["topic", "sentiment"])
    torch.testing.assert_close(mixed[1, :2], run.logits(TEXTS[1:2], task="sentiment")[0, :2], atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def shared_runs(assets, tmp_path_factory) -> dict:
    """Mode shared: a two-task run (sentiment, topic), a run whose shared adapter trains on a third task (spam), and
    one extending that with a fourth (spam's data again); plus what the second printed. 40 steps at lr 3e-2: enough
    for training on spam to move an earlier task's accuracy on its few test texts (a few seconds; at 24 steps that
    was down to the draw of the dropout masks)."""
    folder = tmp_path_factory.mktemp("shared_runs")
    learns = ["multitask.mode=shared", "train.max_steps=40", "train.lr=3e-2", "train.eval_every=0"]
    run_recipe(assets, folder / "two", task_list(assets, "sentiment", "topic"), *learns)
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        run_recipe(assets, folder / "three", task_list(assets, "spam"), f"multitask.extend={folder / 'two'}", *learns,
                   "train.seed=7")
    run_recipe(assets, folder / "four", f"multitask.tasks=[{{name: spam_again, data: {{name: {assets['spam']}}}}}]",
               f"multitask.extend={folder / 'three'}", "multitask.mode=shared", "train.max_steps=2")
    return {"two": folder / "two", "three": folder / "three", "four": folder / "four", "printed": printed.getvalue()}


def test_extending_a_shared_adapter_trains_it_on_the_new_task_and_keeps_the_earlier_heads(shared_runs):
    from safetensors.torch import load_file

    two, three = shared_runs["two"] / "model", shared_runs["three"] / "model"
    for task in ("sentiment", "topic"):
        before, after = load_file(two / task / "head.safetensors"), load_file(three / task / "head.safetensors")
        assert before.keys() == after.keys() and all(torch.equal(before[key], after[key]) for key in before)
    before, after = load_file(two / "adapter_model.safetensors"), load_file(three / "adapter_model.safetensors")
    assert before.keys() == after.keys() and any(not torch.equal(before[key], after[key]) for key in before)
    metrics = json.loads((shared_runs["three"] / "metrics.json").read_text())
    assert [task["batch_share"] for task in metrics["tasks"].values()] == [None, None, 1.0]  # only spam's batches
    assert metrics["parameters"]["trainable"] == (metrics["multitask"]["shared_parameters"]
                                                  + metrics["tasks"]["spam"]["parameters"]["head"])


def test_extending_a_shared_adapter_evaluates_the_earlier_tasks_and_measures_what_they_forget(shared_runs):
    import peftlab
    from peftlab.data import load_data
    from peftlab.metrics import compute_classification_metrics

    earlier = json.loads((shared_runs["two"] / "metrics.json").read_text())
    metrics = json.loads((shared_runs["three"] / "metrics.json").read_text())
    run, before_run = peftlab.load(shared_runs["three"]), peftlab.load(shared_runs["two"])
    assert list(run.task_labels) == ["sentiment", "topic", "spam"]
    assert set(metrics["forgetting"]) == {"sentiment", "topic"}
    for name in ("sentiment", "topic"):  # why they are evaluated again: their outputs moved with the shared adapter
        assert not torch.equal(run.logits(TEXTS, task=name), before_run.logits(TEXTS, task=name))
    # and their scores with them, so the checks below tell before from after
    assert any(score["change"] != 0 for splits in metrics["forgetting"].values() for scores in splits.values()
               for score in scores.values())
    own = [metrics["tasks"][name]["validation"][metrics["tasks"][name]["metric"]] for name in run.task_labels]
    assert metrics["validation"]["tasks_mean"] == pytest.approx(sum(own) / 3)  # every task chose the checkpoint
    for task in load_config(str(shared_runs["two"] / "config.yaml")).multitask.tasks:
        test_split = load_data(task.data, task="text").splits["test"]
        predicted = [run.task_labels[task.name].index(p["label"]) for p in run.predict(test_split["text"],
                                                                                      task=task.name)]
        record = metrics["tasks"][task.name]
        assert record["test"] == compute_classification_metrics(predicted, test_split["label"],
                                                                run.task_labels[task.name])
        assert (shared_runs["three"] / f"test_predictions_{task.name}.csv").is_file()
        for split in ("validation", "test"):
            before, after = earlier["tasks"][task.name][split], record[split]
            assert record["before"][split]["accuracy"] == before["accuracy"]
            for metric in {"accuracy", task.metric}:
                assert metrics["forgetting"][task.name][split][metric] == pytest.approx(
                    {"before": before[metric], "after": after[metric], "change": after[metric] - before[metric]})
        test_accuracy = metrics["forgetting"][task.name]["test"]["accuracy"]
        assert (f"{task.name}: test accuracy {test_accuracy['before']:.3f} -> {test_accuracy['after']:.3f} "
                f"({100 * test_accuracy['change']:+.1f} points) after training on spam") in shared_runs["printed"]
    assert all(p["label"] in TASK_WORDS["spam"] for p in run.predict(TEXTS, task="spam"))
    card = (shared_runs["three"] / "README.md").read_text()
    assert "## Forgetting" in card and "| `topic` | test | accuracy |" in card
    assert f"multitask.mode=shared multitask.extend={shared_runs['three']} " in card  # how to add one more


def test_extending_an_extended_shared_run_evaluates_every_earlier_task(shared_runs):
    """The earliest tasks' data comes from the config.yaml of the run that trained them (a config names only the
    tasks it added), and their `before` is what the run extended scored."""
    three = json.loads((shared_runs["three"] / "metrics.json").read_text())
    four = json.loads((shared_runs["four"] / "metrics.json").read_text())
    assert set(four["forgetting"]) == {"sentiment", "topic", "spam"}
    for name in ("sentiment", "spam"):
        assert four["forgetting"][name]["test"]["accuracy"]["before"] == three["tasks"][name]["test"]["accuracy"]


@pytest.mark.parametrize("mode", ["separate", "shared"])
def test_extending_a_run_of_the_other_mode_is_one_line(runs, shared_runs, assets, tmp_path, mode):
    folder = shared_runs["two"] if mode == "shared" else runs["two"]
    other = "separate" if mode == "shared" else "shared"
    with pytest.raises(PeftlabError, match=f"is a run of multitask.mode={mode} and this one of {other}") as info:
        run_recipe(assets, tmp_path / "run", task_list(assets, "spam"), f"multitask.extend={folder}",
                   f"multitask.mode={other}")
    assert "\n" not in str(info.value) and not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Serving every task from one process (the real server on 127.0.0.1, over HTTP, and its page in a browser)
# ---------------------------------------------------------------------------------------------------------------------

from tests.browser import headless_browser, needs_chromium  # noqa: E402


@pytest.fixture(scope="module")
def multitask_server(runs):
    from peftlab.serve import server_process

    with server_process(runs["two"], "--no-access-log", "--threads", "1", "--batch-wait-ms", "50") as server:
        yield server


def assert_predictions(predictions: list[dict], expected: list[dict]) -> None:
    """The server's predictions equal peftlab.load's (labels exactly, probabilities to float32 rounding)."""
    assert [(p["task"], p["label"]) for p in predictions] == [(e["task"], e["label"]) for e in expected]
    for prediction, want in zip(predictions, expected):
        assert list(prediction["probabilities"]) == list(want["probabilities"])
        assert list(prediction["probabilities"].values()) == pytest.approx(list(want["probabilities"].values()),
                                                                          abs=1e-5)


def test_the_server_labels_each_request_for_its_task(runs, multitask_server):
    import httpx

    import peftlab

    run = peftlab.load(runs["two"])
    meta = httpx.get(multitask_server.url + "/metadata").json()
    assert meta["tasks"] == {"sentiment": sorted(TASK_WORDS["sentiment"]), "topic": sorted(TASK_WORDS["topic"])}
    answer = httpx.post(multitask_server.url + "/predict", json={"inputs": TEXTS[:3], "task": "topic"}, timeout=60)
    assert answer.status_code == 200, answer.text
    assert_predictions(answer.json()["predictions"], run.predict(TEXTS[:3], task="topic"))
    tasks = ["sentiment", "topic", "topic", "sentiment"]  # a mixed request: routed per input, in one forward
    answer = httpx.post(multitask_server.url + "/predict", json={"inputs": TEXTS[:4], "tasks": tasks}, timeout=60)
    alone = [run.predict([text], task=task)[0] for text, task in zip(TEXTS, tasks)]
    assert_predictions(answer.json()["predictions"], alone)


def test_concurrent_requests_for_different_tasks_batched_together_get_their_own_answers(runs, multitask_server):
    import asyncio

    import httpx

    import peftlab

    run = peftlab.load(runs["two"])
    requests = [("sentiment", TEXTS[:2]), ("topic", TEXTS[2:5]), ("sentiment", TEXTS[5:])]

    async def send_all():
        async with httpx.AsyncClient(base_url=multitask_server.url, timeout=60) as client:
            return await asyncio.gather(*[client.post("/predict", json={"inputs": texts, "task": task})
                                          for task, texts in requests])

    for (task, texts), answer in zip(requests, asyncio.run(send_all())):
        assert_predictions(answer.json()["predictions"], run.predict(texts, task=task))


@needs_chromium
def test_the_page_picks_a_task_and_shows_its_labels(runs, multitask_server):
    """The page in a headless browser: a picker of the run's tasks; predicting for the second one shows what
    POST /predict answers for that task."""
    import httpx
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as seen
    from selenium.webdriver.support.ui import Select, WebDriverWait

    texts = TEXTS[:3]
    with headless_browser() as browser:
        wait = WebDriverWait(browser, 60)
        browser.get(multitask_server.url + "/")
        picker = Select(wait.until(seen.visibility_of_element_located((By.ID, "task"))))
        assert [option.text for option in picker.options] == ["sentiment", "topic"]
        assert picker.first_selected_option.text == "sentiment"
        assert "labels texts for sentiment as negative, positive;" in browser.find_element(By.ID, "model").text
        picker.select_by_visible_text("topic")
        model_line = browser.find_element(By.ID, "model").text
        browser.find_element(By.ID, "texts").send_keys("\n".join(texts))
        browser.find_element(By.ID, "submit").click()
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".result")) == len(texts))
        shown = [{"task": result.find_element(By.CSS_SELECTOR, ".task").text,
                  "label": result.find_element(By.CSS_SELECTOR, ".top-label").text,
                  "bars": [(bar.get_attribute("data-label"), float(bar.find_element(By.CSS_SELECTOR, ".pct").text[:-1]))
                           for bar in result.find_elements(By.CSS_SELECTOR, ".bar")]}
                 for result in browser.find_elements(By.CSS_SELECTOR, ".result")]
    test_accuracy = json.loads((runs["two"] / "metrics.json").read_text())["test"]["topic/accuracy"]
    assert "labels texts for topic as money, music, sport; test accuracy " in model_line
    assert float(model_line.rsplit(" ", 1)[1][:-1]) == pytest.approx(100 * test_accuracy, abs=0.05)
    answer = httpx.post(multitask_server.url + "/predict", json={"inputs": texts, "task": "topic"}, timeout=60)
    for page, want in zip(shown, answer.json()["predictions"], strict=True):
        assert page["task"] == "task: topic" and page["label"] == want["label"]
        # The bars: the topic task's labels, most probable first, each its probability to the page's 0.1%.
        assert [name for name, _ in page["bars"]] == sorted(want["probabilities"], key=want["probabilities"].get,
                                                             reverse=True)
        for name, percent in page["bars"]:
            assert percent == pytest.approx(100 * want["probabilities"][name], abs=0.05 + 1e-9)


@pytest.mark.parametrize("body, fragment", [
    ({"inputs": ["x"]}, 'name the task of the inputs with "task", or one per input with "tasks"'),
    ({"inputs": ["x"], "task": "topic", "tasks": ["topic"]}, "(not both)"),
    ({"inputs": ["x"], "task": "weather"}, 'task is "weather", not a task of this server (sentiment, topic)'),
    ({"inputs": ["x", "y"], "tasks": ["topic"]}, "'tasks' must be a list with one task per input (2)"),
    ({"inputs": ["x"], "tasks": [3]}, "tasks[0] is 3, not a task of this server"),
    ({"inputs": ["x"], "task": "topic", "label": 1}, "unknown key 'label'"),
])
def test_a_request_with_a_bad_task_gets_one_json_error(multitask_server, body, fragment):
    import httpx

    answer = httpx.post(multitask_server.url + "/predict", json=body, timeout=60)
    assert answer.status_code == 400 and fragment in answer.json()["error"], answer.text
    assert "\n" not in answer.json()["error"]


def test_commands_for_single_task_runs_refuse_a_multitask_run_in_one_line(runs, tmp_path):
    from peftlab.export import export_run
    from peftlab.fuse import main as fuse_main

    with pytest.raises(PeftlabError, match="is a multi-task run; this command takes single-task runs"):
        export_run(runs["two"], tmp_path / "onnx")
    with pytest.raises(SystemExit) as info:
        fuse_main([str(runs["two"]), str(runs["three"]), "--method", "ensemble", "--output", str(tmp_path / "f")])
    assert info.value.code == 2


def test_serving_memory_serves_each_run_of_a_seed_and_reads_its_resident_memory(runs, tmp_path, capsys):
    """benchmarks/serve_load.py --memory: a real server per finished cell of the seed, one request per task (a task
    the run lacks would fail the request), its RSS from /proc; other seeds and failed cells are not served."""
    spec = importlib.util.spec_from_file_location("serve_load_for_tests",
                                                  Path(__file__).parents[1] / "benchmarks" / "serve_load.py")
    serve_load = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serve_load)
    tasks = json.loads((runs["two"] / "metrics.json").read_text())["tasks"]
    for seed, status in ((0, "ok"), (1, "ok"), (0, "failed")):
        cell = f"m__two__lora__seed{seed}" + ("x" if status == "failed" else "")
        (tmp_path / f"{cell}.json").write_text(json.dumps(
            {"cell": cell, "status": status, "seed": seed, "run_dir": str(runs["two"]), "tasks": tasks}))
    result = serve_load.main(["--memory", str(tmp_path), "--seed", "0", "--threads", "1"])
    assert result is None
    saved = json.loads((tmp_path / "serving_memory.json").read_text())
    [row] = saved["rows"]
    assert row["cell"] == "m__two__lora__seed0" and row["tasks"] == ["sentiment", "topic"]
    assert 100 < row["rss_mb"] <= row["peak_rss_mb"] < 8000 and saved["seed"] == 0
    assert "m__two__lora__seed0: 2 task(s), RSS" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------------
# Image tasks: the same engine on an image base (tiny random ViT, class folders of coloured and striped images)
# ---------------------------------------------------------------------------------------------------------------------

IMAGE_TASKS = {"colour": ["red", "green", "blue"], "stripes": ["across", "down"]}
IMAGE_FAST = ["data.image_size=16", "data.validation_fraction=0.25", "data.test_fraction=0.25",
              "data.max_train_samples=null", "data.max_eval_samples=null", "train.max_steps=6", "train.batch_size=4",
              "train.eval_batch_size=4", "train.eval_every=3", "train.lr=1e-2", "train.warmup_ratio=0",
              "train.mixed_precision=no", "train.trackers=[jsonl]", "train.cpu_threads=1"]


def task_image(task: str, label: int, rng):
    """A 20 x 20 image whose label shows: a colour, or stripes across or down (with noise)."""
    from PIL import Image

    if task == "colour":
        pixels = np.array([[220, 30, 30], [30, 220, 30], [30, 30, 220]][label]) + rng.normal(0, 25, (20, 20, 3))
    else:
        stripes = (np.arange(20) // 2 % 2 * 200)[:, None] * np.ones((1, 20))
        pixels = np.repeat((stripes if label == 0 else stripes.T)[:, :, None], 3, axis=2)
        pixels = pixels + rng.normal(0, 20, (20, 20, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def image_assets(tmp_path_factory) -> dict[str, Path]:
    """A tiny random ViT (16 px, 5-way head the recipe replaces) and a folder of class folders per task."""
    from transformers import ViTConfig, ViTForImageClassification

    folder = tmp_path_factory.mktemp("multitask_images")
    torch.manual_seed(0)
    ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=37, image_size=16, patch_size=4,
                                        num_labels=5)).save_pretrained(folder / "tiny_vit")
    rng = np.random.default_rng(0)
    for task, labels in IMAGE_TASKS.items():
        for label, name in enumerate(labels):
            (folder / task / name).mkdir(parents=True)
            for i in range(8):
                task_image(task, label, rng).save(folder / task / name / f"{i}.png")
    return {"base": folder / "tiny_vit", **{task: folder / task for task in IMAGE_TASKS}}


def run_image_recipe(image_assets, output_dir: Path, *overrides: str) -> dict:
    spec = importlib.util.spec_from_file_location("multitask_recipe", ROOT / "recipes" / "multitask_classification.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    tasks = ", ".join(f"{{name: {task}, data: {{name: {image_assets[task]}}}}}" for task in IMAGE_TASKS)
    cfg = load_config(str(ROOT / "recipes" / "configs" / "efficientnet_lite0_multitask.yaml"),
                      [*IMAGE_FAST, f"model.name={image_assets['base']}", f"output_dir={output_dir}",
                       f"multitask.tasks=[{tasks}]", *overrides])
    return recipe.main(cfg)


@pytest.fixture(scope="module")
def image_run(image_assets, tmp_path_factory) -> Path:
    """Two image tasks (colour: 3 classes, stripes: 2) on one tiny ViT, a LoRA adapter and a head each."""
    folder = tmp_path_factory.mktemp("multitask_image_run") / "run"
    metrics = run_image_recipe(image_assets, folder)
    assert metrics["global_step"] == 6 and set(metrics["tasks"]) == set(IMAGE_TASKS)
    return folder


def test_image_tasks_train_on_one_base_and_load_back_with_the_same_outputs(image_run, image_assets):
    import peftlab
    from peftlab.data import load_data

    run = peftlab.load(image_run)
    assert run.task == "image" and run.task_labels == {task: sorted(labels) for task, labels in IMAGE_TASKS.items()}
    assert json.loads((image_run / "model" / "multitask.json").read_text())["task"] == "image"
    for task in run.cfg.multitask.tasks:  # the test split's probabilities, as the trained model wrote them
        images = list(load_data(task.data, task="image").splits["test"]["image"])
        expected = saved_probabilities(image_run / f"test_predictions_{task.name}.csv")
        torch.testing.assert_close(run.probabilities(images, task=task.name), expected, atol=1e-5, rtol=0)


def test_a_mixed_batch_of_images_routes_each_to_its_task_in_one_forward(image_run, image_assets, tmp_path):
    import peftlab
    from peftlab.predict import main as predict_main

    run = peftlab.load(image_run)
    rng = np.random.default_rng(1)
    tasks = ["colour", "stripes", "stripes", "colour"]
    images = [task_image(task, index % 2, rng) for index, task in enumerate(tasks)]
    forwards = []
    run.model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    mixed = run.logits(images, tasks=tasks)
    assert len(forwards) == 1
    for index, (image, task) in enumerate(zip(images, tasks)):
        width = len(run.task_labels[task])
        torch.testing.assert_close(mixed[index, :width], run.logits([image], task=task)[0, :width], atol=1e-5, rtol=0)
    # `peftlab predict` takes image paths and the task, as for texts.
    images[1].save(tmp_path / "one.png")
    with contextlib.redirect_stdout(io.StringIO()) as out:
        predict_main([str(image_run), "--task", "stripes", str(tmp_path / "one.png")])
    [line] = [json.loads(line) for line in out.getvalue().splitlines()]
    assert line["task"] == "stripes" and line["label"] == run.predict([images[1]], task="stripes")[0]["label"]


def test_an_image_task_added_later_leaves_the_earlier_ones_unchanged(image_assets, image_run, tmp_path):
    import peftlab

    more = f"multitask.tasks=[{{name: more, data: {{name: {image_assets['colour']}}}}}]"
    metrics = run_image_recipe(image_assets, tmp_path / "three", more, f"multitask.extend={image_run}")
    assert list(metrics["tasks"]) == ["colour", "stripes", "more"]
    two, three = peftlab.load(image_run), peftlab.load(tmp_path / "three")
    rng = np.random.default_rng(4)
    images = [task_image("colour", 1, rng), task_image("stripes", 0, rng)]
    for task in IMAGE_TASKS:
        assert torch.equal(three.logits(images, task=task), two.logits(images, task=task))


def test_image_tasks_share_one_image_size(image_assets, image_run, tmp_path):
    tasks = ", ".join(f"{{name: {task}, data: {{name: {image_assets[task]}, image_size: 24}}}}" for task in IMAGE_TASKS)
    with pytest.raises(PeftlabError, match="sets data.image_size=24 and the run 16; image tasks share one size"):
        run_image_recipe(image_assets, tmp_path / "a", f"multitask.tasks=[{tasks}]")
    with pytest.raises(PeftlabError, match=r"took images at data.image_size=16 and this run at 24.*image_size=16"):
        run_image_recipe(image_assets, tmp_path / "b", "data.image_size=24", f"multitask.extend={image_run}",
                         f"multitask.tasks=[{{name: more, data: {{name: {image_assets['colour']}}}}}]")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.fixture(scope="module")
def image_server(image_run):
    from peftlab.serve import server_process

    with server_process(image_run, "--no-access-log", "--threads", "1") as server:
        yield server


def png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_the_server_labels_images_for_their_task_as_json_or_multipart(image_run, image_server):
    import base64

    import httpx

    import peftlab
    from PIL import Image

    run = peftlab.load(image_run)
    rng = np.random.default_rng(2)
    images = [png(task_image("colour", 0, rng)), png(task_image("stripes", 1, rng))]
    alone = [run.predict([Image.open(io.BytesIO(images[0]))], task="colour")[0],
             run.predict([Image.open(io.BytesIO(images[1]))], task="stripes")[0]]
    encoded = [base64.b64encode(data).decode() for data in images]
    answer = httpx.post(image_server.url + "/predict", json={"images": encoded, "tasks": ["colour", "stripes"]},
                        timeout=60)
    assert answer.status_code == 200, answer.text
    assert_predictions(answer.json()["predictions"], alone)
    files = [("images", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
    answer = httpx.post(image_server.url + "/predict", files=files, data={"tasks": ["colour", "stripes"]}, timeout=60)
    assert answer.status_code == 200, answer.text
    assert_predictions(answer.json()["predictions"], alone)
    answer = httpx.post(image_server.url + "/predict", files=files[:1], data={"task": "colour"}, timeout=60)
    assert_predictions(answer.json()["predictions"], alone[:1])
    for request, fragment in [(dict(files=files), 'name the task of the inputs with "task"'),
                              (dict(files=files, data={"task": "weather"}), 'task is "weather", not a task of this '
                                                                            'server (colour, stripes)'),
                              (dict(json={"images": encoded, "tasks": ["colour"]}), "one task per input (2)")]:
        answer = httpx.post(image_server.url + "/predict", timeout=60, **request)
        assert answer.status_code == 400 and fragment in answer.json()["error"], answer.text


@needs_chromium
def test_the_page_uploads_images_for_the_task_picked(image_run, image_server, tmp_path):
    import httpx
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as seen
    from selenium.webdriver.support.ui import Select, WebDriverWait

    (tmp_path / "down.png").write_bytes(png(task_image("stripes", 1, np.random.default_rng(3))))
    with headless_browser() as browser:
        wait = WebDriverWait(browser, 60)
        browser.get(image_server.url + "/")
        picker = Select(wait.until(seen.visibility_of_element_located((By.ID, "task"))))
        assert [option.text for option in picker.options] == ["colour", "stripes"]
        picker.select_by_visible_text("stripes")
        browser.find_element(By.ID, "files").send_keys(str(tmp_path / "down.png"))
        browser.find_element(By.ID, "submit").click()
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, ".result .top-label"))
        shown = (browser.find_element(By.CSS_SELECTOR, ".result .task").text,
                 browser.find_element(By.CSS_SELECTOR, ".result .top-label").text,
                 sorted(bar.get_attribute("data-label") for bar in browser.find_elements(By.CSS_SELECTOR, ".bar")))
    files = [("images", ("down.png", (tmp_path / "down.png").read_bytes(), "image/png"))]
    want = httpx.post(image_server.url + "/predict", files=files, data={"task": "stripes"},
                      timeout=60).json()["predictions"][0]
    assert shown == ("task: stripes", want["label"], ["across", "down"])


@pytest.mark.slow  # the packaged EfficientNet-Lite0 config, 2 steps on 32 px images (about a minute)
def test_the_packaged_image_config_routes_mixed_batches_through_convolution_lora(tmp_path):
    """The shipped image config (Animal-MNIST animals and MNIST digits on EfficientNet-Lite0, LoRA on 1x1
    convolutions) trains, and a loaded run gives a mixed batch the outputs of each task alone."""
    import peftlab
    from peftlab.data.image import load_animal_mnist, load_mnist5k

    spec = importlib.util.spec_from_file_location("multitask_recipe", ROOT / "recipes" / "multitask_classification.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    cfg = load_config(str(ROOT / "recipes" / "configs" / "efficientnet_lite0_multitask.yaml"), [
        "data.image_size=32", "data.max_train_samples=64", "data.max_eval_samples=32", "train.max_steps=2",
        "train.batch_size=16", "train.mixed_precision=no", "train.trackers=[jsonl]", f"output_dir={tmp_path / 'run'}"])
    metrics = recipe.main(cfg)
    assert metrics["global_step"] == 2 and set(metrics["tasks"]) == {"animals", "digits"}
    run = peftlab.load(tmp_path / "run")
    animals = list(load_animal_mnist().select(range(3))["image"])
    digits = list(load_mnist5k().select(range(3))["image"])
    mixed = run.probabilities(animals + digits, tasks=["animals"] * 3 + ["digits"] * 3)
    torch.testing.assert_close(mixed[:3], run.probabilities(animals, task="animals"), atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed[3:], run.probabilities(digits, task="digits"), atol=1e-5, rtol=0)
