"""Load a finished run for inference in one call: `peftlab.load(run_dir)`.

    import peftlab
    run = peftlab.load("outputs/minilm_lora_rotten_tomatoes")
    run.predict(["a gripping, beautifully shot film"])   # [{"input": ..., "label": "fresh", "score": 0.93}]
    run.probabilities(texts)                             # (N, num_labels) tensor; run.label_names names the columns
    run.model, run.backbone.tokenizer                    # the model in eval mode and its preprocessing

Every strategy and both tasks: the base named in the run's config.yaml is loaded as the recipe loaded it
(`peftlab.backbones.load_base`) and what trained goes on top (`peftlab.saving.load_trained`). A folder written by
`peftlab fuse --method ensemble` (its model/ holds FUSION_FILE naming member run folders) loads as an `EnsembleRun`:
the same interface, each member labelling the inputs with its own preprocessing and the predictions averaged.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from peftlab.backbones import load_base
from peftlab.config import load_config
from peftlab.data.splits import first_line
from peftlab.errors import PeftlabError
from peftlab.inputs import Preprocessing, label_predictions, labelled, probabilities_in_batches
from peftlab.runs import CONFIG_FILE, MODEL_SUBDIR, MULTITASK_FILE, TASK_FILE
from peftlab.saving import load_trained

FUSION_FILE = "fusion.json"
"""In an ensemble's model/: {"method": "ensemble", "combine": "probabilities"|"logits", "members": [run folders
relative to the ensemble's folder], "weights": [one per member, summing to 1]}."""
COMBINES = ("probabilities", "logits")


def load(run_dir: str | Path) -> "LoadedRun | MultiTaskRun":
    """The run in `run_dir` (a recipe's output_dir, or a `peftlab fuse` output) ready to label inputs; one-line
    PeftlabError for a folder that is not a finished run or is damaged. A multi-task run loads as a `MultiTaskRun`,
    whose methods take the task (`predict(texts, task="sentiment")`)."""
    if (Path(run_dir) / MODEL_SUBDIR / FUSION_FILE).is_file():
        return EnsembleRun(run_dir)
    if (Path(run_dir) / MODEL_SUBDIR / MULTITASK_FILE).is_file():
        return MultiTaskRun(run_dir)
    return LoadedRun(run_dir)


def refuse_multitask(run_dir: str | Path) -> None:
    """The one-line error of a command that takes single-task runs only, given a multi-task run."""
    if (Path(run_dir) / MODEL_SUBDIR / MULTITASK_FILE).is_file():
        raise PeftlabError(f"{run_dir} is a multi-task run; this command takes single-task runs (peftlab.load, "
                           f"predict and serve take multi-task runs)")


def read_run_info(run_dir: str | Path) -> tuple:
    """(config, task, label names) of a finished single-task run folder, read without loading any weights."""
    run_dir = Path(run_dir)
    model_dir = run_dir / MODEL_SUBDIR
    refuse_multitask(run_dir)
    if not (model_dir / TASK_FILE).is_file() or not (run_dir / CONFIG_FILE).is_file():
        raise PeftlabError(f"{run_dir} is not a finished peftlab run (no {CONFIG_FILE} or "
                           f"{MODEL_SUBDIR}/{TASK_FILE})")
    cfg = load_config(str(run_dir / CONFIG_FILE))
    info = read_json(model_dir / TASK_FILE)
    if not isinstance(info, dict) or info.get("task") not in ("text", "image") or not info.get("label_names"):
        raise damaged(model_dir / TASK_FILE, "no task and label_names")
    return cfg, info["task"], info["label_names"]


class LoadedRun:
    """A trained run loaded for inference: the base backbone plus what trained, in eval mode, with its preprocessing
    and label names. Build it with `peftlab.load(run_dir)`."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = run_dir = Path(run_dir)
        model_dir = run_dir / MODEL_SUBDIR
        if (model_dir / TASK_FILE).is_file():  # damaged files are named before a broken config.yaml is
            check_saved_files(model_dir)
        self.cfg, self.task, self.label_names = read_run_info(run_dir)
        backbone = load_base(self.cfg.model, task=self.task, label_names=self.label_names)
        self.backbone = backbone
        try:
            self.model = load_trained(backbone.model, model_dir).eval()
        except PeftlabError:
            raise
        except (OSError, ValueError, SafetensorError) as err:  # a missing or unreadable weights file
            raise PeftlabError(f"cannot load the trained weights in {model_dir} ({first_line(err)}); the run folder "
                               f"is incomplete or damaged: restore it from a copy or train the run again") from err
        transform = None
        if self.task == "image":
            from peftlab.data.transforms import build_image_transform

            transform = build_image_transform(self.cfg.data.image_size, backbone.image_mean, backbone.image_std,
                                              train=False)
        self.preprocessing = Preprocessing(self.task, run_dir, tokenizer=backbone.tokenizer,
                                           max_length=self.cfg.data.max_length, transform=transform)

    def preprocess(self, inputs: list) -> dict[str, torch.Tensor]:
        """The model's input batch for texts (tokenized and padded as in training), or image paths / PIL images
        (resized and normalised as at evaluation)."""
        return self.preprocessing(inputs)

    @torch.no_grad()
    def logits(self, inputs: list) -> torch.Tensor:
        """Float logits (N, num_labels) for texts, or image paths / PIL images."""
        return self.model(**self.preprocess(inputs)).logits.float()

    def probabilities(self, inputs: list) -> torch.Tensor:
        """Class probabilities (N, num_labels) for texts, or image paths / PIL images; columns follow label_names."""
        return self.logits(inputs).softmax(dim=-1)

    def probabilities_in_batches(self, inputs: list, batch_size: int = 64, progress: bool = False) -> torch.Tensor:
        """`probabilities(inputs)` computed `batch_size` inputs at a time (a progress bar on stderr if `progress`)."""
        return probabilities_in_batches(self.probabilities, inputs, len(self.label_names), batch_size, progress)

    def predict(self, inputs: list, batch_size: int = 64, progress: bool = False) -> list[dict]:
        """One {"input", "label", "score", "probabilities": {label name: probability}} dict per input, labelled in
        batches of `batch_size` (with a progress bar on stderr when `progress` and there is more than one batch)."""
        return label_predictions(self.probabilities, self.label_names, inputs, batch_size, progress)


class EnsembleRun(LoadedRun):
    """An ensemble written by `peftlab fuse --method ensemble`: every member (a LoadedRun, in `.members`) labels the
    inputs with its own preprocessing, and the ensemble averages their probabilities (or their logits, as
    FUSION_FILE's `combine` says) with the member weights. `.model` holds the members' models (eval mode);
    `.backbone` is None, since the members may preprocess differently."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = run_dir = Path(run_dir)
        self.cfg, self.task, self.label_names = read_run_info(run_dir)
        path = run_dir / MODEL_SUBDIR / FUSION_FILE
        fusion = read_json(path)
        if (not isinstance(fusion, dict) or fusion.get("combine") not in COMBINES or not fusion.get("members")
                or len(fusion.get("weights", [])) != len(fusion["members"])):
            raise damaged(path, "no combine, members and one weight per member")
        self.combine, self.weights = fusion["combine"], [float(w) for w in fusion["weights"]]
        self.members = [LoadedRun(run_dir / member) for member in fusion["members"]]
        for member in self.members:
            if member.label_names != self.label_names:
                raise damaged(path, f"member {member.run_dir} has labels {member.label_names}, not "
                                    f"{self.label_names}")
        self.model = nn.ModuleList(member.model for member in self.members).eval()
        self.backbone = None

    def preprocess(self, inputs: list) -> dict[str, torch.Tensor]:
        raise PeftlabError(f"{self.run_dir} is an ensemble whose members preprocess inputs their own way; call "
                           f"its probabilities(inputs), or preprocess with one of its .members")

    def weighted_sum(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        return sum(weight * output for weight, output in zip(self.weights, outputs))

    @torch.no_grad()
    def logits(self, inputs: list) -> torch.Tensor:
        """The weighted mean of the members' logits (combine=logits), or the log of the mean probabilities, so that
        softmax(logits) is the ensemble's probabilities either way."""
        if self.combine == "logits":
            return self.weighted_sum([member.logits(inputs) for member in self.members])
        return self.probabilities(inputs).log()

    def probabilities(self, inputs: list) -> torch.Tensor:
        """The weighted mean of the members' probabilities (combine=probabilities), else softmax of the mean logits."""
        if self.combine == "logits":
            return self.logits(inputs).softmax(dim=-1)
        return self.weighted_sum([member.probabilities(inputs) for member in self.members])


class MultiTaskRun:
    """A multi-task run (recipes/multitask_classification.py) loaded for inference: the base once, every task's head
    (and adapter) on it, in eval mode. Each call names the task of its inputs, or one task per input: a mixed batch
    runs in one forward pass, each input through its own task's adapter and head. Build it with `peftlab.load`.

        run.predict(texts, task="sentiment")
        run.predict(texts, tasks=["sentiment", "topic", ...])     # one per text
    """

    def __init__(self, run_dir: str | Path):
        from peftlab.multitask import TaskSpec, build_multitask_model
        from peftlab.saving import load_multitask_weights

        self.run_dir = run_dir = Path(run_dir)
        model_dir = run_dir / MODEL_SUBDIR
        info = read_json(model_dir / MULTITASK_FILE)
        if not isinstance(info, dict) or info.get("task") not in ("text", "image") or not info.get("tasks"):
            raise damaged(model_dir / MULTITASK_FILE, "no task kind (text or image) and task list")
        self.task = info["task"]
        self.cfg = load_config(str(run_dir / CONFIG_FILE))
        self.tasks = [TaskSpec(task["name"], task["label_names"], task["metric"], task.get("max_length"), frozen=True)
                      for task in info["tasks"]]
        self.task_labels = {task.name: task.label_names for task in self.tasks}
        """Each task's label names, in its logit columns' order."""
        try:
            self.model, self.backbone = build_multitask_model(
                self.cfg.model, self.task, self.tasks, self.cfg.strategy,
                self.cfg.strategy_options.get(self.cfg.strategy, {}), mode=info["mode"])
            load_multitask_weights(self.model, model_dir, list(self.task_labels))
        except (OSError, ValueError, SafetensorError) as err:  # a missing or unreadable weights file
            raise PeftlabError(f"cannot load the trained weights in {model_dir} ({first_line(err)}); the run folder "
                               f"is incomplete or damaged: restore it from a copy or train the run again") from err
        self.model.eval()
        # Each task truncates to its own data.max_length, as it trained (the tasks' lengths may differ); image tasks
        # share the run's evaluation transform (one data.image_size).
        transform = None
        if self.task == "image":
            from peftlab.data.transforms import build_image_transform

            transform = build_image_transform(self.cfg.data.image_size, self.backbone.image_mean,
                                              self.backbone.image_std, train=False)
        self.preprocessing = {task.name: Preprocessing(self.task, run_dir, tokenizer=self.backbone.tokenizer,
                                                       max_length=task.max_length, transform=transform)
                              for task in self.tasks}

    def task_ids(self, inputs: list, task: str | None = None, tasks: list[str] | None = None) -> list[int]:
        """Each input's task index, from `task` (all inputs) or `tasks` (one per input); one-line errors."""
        routing = self.model.peftlab_tasks
        if (task is None) == (tasks is None):
            if task is None and len(self.tasks) == 1:
                return [0] * len(inputs)
            raise PeftlabError(f"name the task of the inputs: task=<one of {', '.join(routing.names)}> for all of "
                               f"them, or tasks=[...] with one per input")
        if tasks is not None and len(tasks) != len(inputs):
            raise PeftlabError(f"got {len(tasks)} tasks for {len(inputs)} inputs; give one task per input")
        return [routing.index(name) for name in (tasks if tasks is not None else [task] * len(inputs))]

    def preprocess(self, inputs: list, task_ids: list[int]) -> dict[str, torch.Tensor]:
        """The model's input batch: each text tokenized as its task trained (its max_length), padded together; or the
        image paths / PIL images resized and normalised as at evaluation."""
        tokenizer, names = self.backbone.tokenizer, self.model.peftlab_tasks.names
        if self.task == "image":
            return {**self.preprocessing[names[0]](inputs), "task_ids": torch.tensor(task_ids)}
        features = []
        for text, task_id in zip(inputs, task_ids):
            preprocessing = self.preprocessing[names[task_id]]
            preprocessing.check_text(text)
            features.append(tokenizer(text, truncation=True, max_length=preprocessing.max_length))
        batch = dict(tokenizer.pad(features, return_tensors="pt"))
        return {**batch, "task_ids": torch.tensor(task_ids)}

    @torch.no_grad()
    def logits(self, inputs: list, task: str | None = None, tasks: list[str] | None = None) -> torch.Tensor:
        """Float logits (N, most classes of any task); a task with fewer classes has the lowest float in the rest."""
        if not inputs:
            return torch.empty(0, self.model.peftlab_tasks.width)
        return self.model(**self.preprocess(inputs, self.task_ids(inputs, task, tasks))).logits.float()

    def probabilities(self, inputs: list, task: str | None = None, tasks: list[str] | None = None) -> torch.Tensor:
        """Class probabilities: (N, the task's classes) for one `task`; for `tasks`, (N, most classes of any task),
        each row 0 past its task's classes."""
        probabilities = self.logits(inputs, task, tasks).softmax(dim=-1)
        if task is not None:
            return probabilities[:, :len(self.task_labels[task])]
        return probabilities

    def predict(self, inputs: list, task: str | None = None, tasks: list[str] | None = None, batch_size: int = 64,
                progress: bool = False) -> list[dict]:
        """One {"input", "task", "label", "score", "probabilities": {label name: probability}} dict per input, for
        `task` (every input) or `tasks` (one per input, routed in one forward pass per batch of `batch_size`)."""
        names = [self.tasks[index].name for index in self.task_ids(inputs, task, tasks)]
        rows = probabilities_in_batches(lambda chunk: self._probabilities_of(chunk),
                                        list(zip(inputs, names)), self.model.peftlab_tasks.width, batch_size,
                                        progress, lengths=[len(text) for text in inputs] if self.task == "text"
                                        else None).tolist()
        return [labelled(item, row, self.task_labels[name], task=name) for item, name, row in zip(inputs, names, rows)]

    def _probabilities_of(self, pairs: list[tuple]) -> torch.Tensor:
        return self.probabilities([text for text, _ in pairs], tasks=[name for _, name in pairs])


def check_saved_files(model_dir: Path) -> None:
    """Error naming the first JSON file that does not parse or safetensors file that is cut short in `model_dir`,
    or saying that it holds no weights file at all (every strategy saves its weights as safetensors)."""
    if not any(model_dir.glob("*.safetensors")):
        raise PeftlabError(f"{model_dir} holds no weights file (*.safetensors); the run folder is incomplete: "
                           f"restore it from a copy or train the run again")
    for path in sorted(model_dir.glob("*.json")):
        read_json(path)
    for path in sorted(model_dir.glob("*.safetensors")):
        try:
            with safe_open(path, framework="pt") as weights:
                weights.keys()  # opening checks that the header parses and that the data covers what it lists
        except (OSError, SafetensorError) as err:
            raise damaged(path, first_line(err)) from err


def read_json(path: Path):
    """The parsed content of a run folder's JSON file, or the one-line error for a damaged one."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise damaged(path, first_line(err)) from err


def damaged(path: Path, reason: str) -> PeftlabError:
    """The error for a file of a run folder that cannot be read."""
    return PeftlabError(f"{path} is damaged ({reason}); restore the run folder from a copy or train the run again")
