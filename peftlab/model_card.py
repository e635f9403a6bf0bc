"""The model card of a run folder (its README.md): what was trained on what, how well, and how to load it.

How to load it, in each way that reproduces the run's predictions exactly:
- with peftlab: `peftlab.load(folder)` (any strategy, any backbone);
- with transformers + peft alone, where that is possible: the exact lines, written for this run (its base's Hub id,
  head size, layer count, tokenizer settings or image preprocessing). A run trained with `pooling=mean` is not a
  transformers architecture: loading its weights the vanilla way gives a model that pools the first token instead
  (on the default run that is chance accuracy), so the card says so first and its lines add the pooling in five
  lines of torch. `tests/test_model_card.py` runs these lines and compares their logits with `peftlab.load`'s.
- bottleneck adapters (peftlab's own modules) and plain-torch backbones (EfficientNet-Lite) need peftlab: said plainly.
A run folder written by `peftlab fuse` (metrics.json has `fusion`) lists its ingredients and weights: a soup gets the
card of its strategy, an ensemble `ensemble_card` (only peftlab runs an ensemble).
"""

from __future__ import annotations

import inspect
import json
from typing import Any

from peftlab.backbones import portable_name
from peftlab.params import ParameterCount
from peftlab.strategies import Merge, SaveFormat, configured_record

MODEL_SUBDIR = "model"  # the run folder's weights subfolder, as peftlab.runs writes it
PEFTLAB_LINES = """```python
import peftlab

run = peftlab.load("{folder}")
run.predict([{example}])             # label, score and probabilities per input
```
Or from a shell: `peftlab predict {folder} {shell_example}` (add `--file data.csv --output predictions.csv` to label
a data set)."""


def model_card(cfg, task: str, metrics: dict[str, Any], counts: ParameterCount, label_names: list[str],
               plain_torch: bool, folder: str = ".") -> str:
    """The Markdown card for a finished run.

    Args:
        cfg: the run's RecipeConfig.
        metrics: metrics.json's content (validation, test with its confusion matrix, timings).
        plain_torch: whether the backbone is a plain torch model (no transformers architecture to load it with).
        folder: how the card's code refers to the run folder.
    """
    base = portable_name(cfg.model.name)
    options = cfg.strategy_options.get(cfg.strategy, {})
    record = configured_record(cfg.strategy, options)
    vanilla = vanilla_lines(cfg, task, record, label_names, base, plain_torch, folder)
    example = '"a gripping, beautifully shot film"' if task == "text" else '"cat.png"'
    library = "peft" if record.save_format is SaveFormat.PEFT_ADAPTER else "peftlab"
    sections = [
        f"---\nlibrary_name: {library}\nbase_model: {base}\npipeline_tag: {task}-classification\n"
        f"tags: [peftlab, {cfg.strategy}, {task}-classification]\n---",
        f"# {base} fine-tuned with peftlab ({cfg.strategy}) on {cfg.data.name}",
        "| | |\n|---|---|\n"
        f"| Base model | `{base}`{f' ({cfg.model.quantization} frozen weights)' if cfg.model.quantization else ''}"
        f"{f', first {cfg.model.num_hidden_layers} layers' if cfg.model.num_hidden_layers else ''} |\n"
        f"| Strategy | `{cfg.strategy}` {json.dumps(options) if options else ''} |\n"
        + (f"| Pooling | `{cfg.model.pooling}` |\n" if task == "text" else "")
        + f"| Data | `{cfg.data.name}` |\n"
        f"| Labels | {', '.join(f'`{name}`' for name in label_names)} |\n"
        f"| Parameters | {counts} |\n"
        + (fusion_row(metrics) if "fusion" in metrics else
           f"| Training | {metrics.get('global_step', 0)} steps, {metrics.get('train_time_s', 0):.0f} s, "
           f"{metrics.get('samples_per_s', 0):.1f} samples/s |"),
        "## Results\n\n" + results_table(metrics) + "\n\n" + confusion_table(metrics.get("test", {}), label_names)
        + ingredients_section(metrics),
        "## Load it\n\n### With peftlab\n\n" + PEFTLAB_LINES.format(folder=folder, example=example,
                                                                  shell_example=example.replace('"', "'")),
        "### With transformers and peft alone\n\n" + vanilla,
        f"Train it again: `python recipes/{task}_classification.py --config {folder}/config.yaml "
        f"output_dir=NEW_FOLDER`.",
    ]
    return "\n\n".join(sections) + "\n"


def ensemble_card(cfg, task: str, metrics: dict[str, Any], label_names: list[str], folder: str = ".") -> str:
    """The Markdown card of an ensemble written by `peftlab fuse`: its members, results, and how to load it."""
    example = '"a gripping, beautifully shot film"' if task == "text" else '"cat.png"'
    members = metrics["fusion"]["ingredients"]
    sections = [
        f"---\nlibrary_name: peftlab\npipeline_tag: {task}-classification\n"
        f"tags: [peftlab, ensemble, {task}-classification]\n---",
        f"# Ensemble of {len(members)} peftlab runs on {cfg.data.name}",
        "| | |\n|---|---|\n" + f"| Labels | {', '.join(f'`{name}`' for name in label_names)} |\n" + fusion_row(metrics),
        "## Results\n\n" + results_table(metrics) + "\n\n" + confusion_table(metrics.get("test", {}), label_names)
        + ingredients_section(metrics),
        "## Load it\n\n" + PEFTLAB_LINES.format(folder=folder, example=example,
                                                shell_example=example.replace('"', "'")),
        "Only peftlab runs the ensemble; each member folder under `members/` is a run folder of its own, with its "
        "card.",
    ]
    return "\n\n".join(sections) + "\n"


def multitask_card(cfg, kind: str, metrics: dict[str, Any], counts: ParameterCount, folder: str = ".") -> str:
    """The Markdown card of a multi-task run (recipes/multitask_classification.py): its tasks, each task's results
    and own parameters, how the earlier tasks' scores moved when it extends a shared adapter (metrics.json's
    `forgetting`), and how to load it (peftlab routes each task to its adapter and head)."""
    base = portable_name(cfg.model.name)
    multitask, tasks = metrics["multitask"], metrics["tasks"]
    example = '"a gripping, beautifully shot film"' if kind == "text" else '"cat.png"'
    new_data = "NEW.csv" if kind == "text" else "NEW_IMAGES/"  # a data file, or a folder of one folder per class
    first = next(iter(tasks))
    separate = multitask["mode"] == "separate"
    sampling = (f"temperature T={multitask['temperature']:g}" if multitask["sampling"] == "temperature"
                else "proportional")
    rows = ["| Task | Labels | Selected on | Validation | Test accuracy | Test macro-F1 | Own parameters "
            "(adapter + head) | Share of batches |", "|---|---|---|---|---|---|---|---|"]
    for name, task in tasks.items():
        validation = task["validation"].get(task["metric"], float("nan"))
        share = f"{task['batch_share']:.3f}" if task["batch_share"] is not None else \
            f"trained in `{task['trained_in']}`"
        labels = ", ".join(f"`{label}`" for label in task["test"].get("per_class", {})
                           if label not in ("accuracy", "macro avg", "weighted avg"))
        rows.append(f"| `{name}` | {labels} | {task['metric']} | {validation:.4f} | {task['test']['accuracy']:.4f} | "
                    f"{task['test']['macro_f1']:.4f} | {task['parameters']['adapter']:,} + "
                    f"{task['parameters']['head']:,} | {share} |")
    sections = [
        f"---\nlibrary_name: {'peft' if separate else 'peftlab'}\nbase_model: {base}\n"
        f"pipeline_tag: {kind}-classification\ntags: [peftlab, multi-task, {cfg.strategy}, {kind}-classification]\n---",
        f"# {base} with {len(tasks)} tasks ({cfg.strategy}, {multitask['mode']} mode), trained with peftlab",
        "| | |\n|---|---|\n"
        f"| Base model | `{base}`{f', first {cfg.model.num_hidden_layers} layers' if cfg.model.num_hidden_layers else ''}"
        " (frozen, shared by every task) |\n"
        f"| Strategy | `{cfg.strategy}` {json.dumps(cfg.strategy_options.get(cfg.strategy, {}))}, "
        + ("one adapter per task |\n" if separate else
           f"one adapter shared by all tasks ({multitask['shared_parameters']:,} parameters) |\n")
        + f"| Heads | one per task |\n| Sampling | one task per batch, {sampling} |\n"
        + (f"| Extends | `{multitask['extends']}` "
           f"({'its tasks unchanged' if separate else 'its heads frozen, the shared adapter trained on'}) |\n"
           if multitask["extends"] else "")
        + f"| Parameters | {counts} |\n"
        f"| Training | {metrics.get('global_step', 0)} steps, {metrics.get('train_time_s', 0):.0f} s; best "
        f"checkpoint on validation {cfg.train.metric_for_best} |",
        "## Results\n\n" + "\n".join(rows),
        forgetting_section(metrics),
        "## Load it\n\n```python\nimport peftlab\n\n"
        f'run = peftlab.load("{folder}")\n'
        f'run.predict([{example}], task="{first}")          # every input for one task\n'
        f'run.predict([{example}, {example}], tasks=["{first}", "{list(tasks)[-1]}"])   # each input its own task, '
        f"one forward pass\n```\n"
        f"Or from a shell: `peftlab predict {folder} --task {first} {example.replace(chr(34), chr(39))}`; serve every "
        f"task from one process with `peftlab serve {folder}`.",
        ("Each task's LoRA adapter is a peft adapter in `model/<task>/` (`PeftModel.from_pretrained` loads it); its "
         "head, sized for the task's labels, is `model/<task>/head.safetensors` (named as a single-task model names "
         "its head), which peft cannot attach itself: peftlab routes inputs to both." if separate else
         "The shared body is saved at `model/`'s root in its strategy's format and each task's head in "
         "`model/<task>/head.safetensors`; peftlab routes inputs to their task's head."),
        f"Add a task without touching these: `python recipes/multitask_classification.py "
        f"multitask.extend={folder} \"multitask.tasks=[{{name: NEW, data: {{name: {new_data}}}}}]\" "
        f"output_dir=NEW_FOLDER`" if separate else
        f"Add a task on this shared adapter, which trains on (so these tasks' scores move; that run's card and "
        f"metrics.json measure how): `python recipes/multitask_classification.py multitask.mode=shared "
        f"multitask.extend={folder} \"multitask.tasks=[{{name: NEW, data: {{name: {new_data}}}}}]\" "
        f"output_dir=NEW_FOLDER`",
    ]
    return "\n\n".join(section for section in sections if section) + "\n"


def forgetting_section(metrics: dict[str, Any]) -> str:
    """The card's table of each earlier task's scores before and after the shared adapter trained on the new tasks
    (empty for a run without metrics.json's `forgetting`)."""
    if "forgetting" not in metrics:
        return ""
    new = [name for name, task in metrics["tasks"].items() if task["batch_share"] is not None]
    rows = [f"## Forgetting\n\nThe earlier tasks of `{metrics['multitask']['extends']}`, scored there (before) and "
            f"here (after), once the shared adapter trained on {', '.join(f'`{name}`' for name in new)}:\n",
            "| Task | Split | Metric | Before | After | Change (points) |", "|---|---|---|---|---|---|"]
    for name, splits in metrics["forgetting"].items():
        for split, scores in splits.items():
            rows += [f"| `{name}` | {split} | {metric} | {score['before']:.4f} | {score['after']:.4f} | "
                     f"{100 * score['change']:+.1f} |" for metric, score in scores.items()]
    return "\n".join(rows)


def fusion_row(metrics: dict[str, Any]) -> str:
    """The card's table row saying how the runs were fused and what a prediction costs."""
    fusion = metrics["fusion"]
    used = sum(1 for ingredient in fusion["ingredients"] if ingredient["weight"] > 0)
    how = (f"average of {used} runs' {fusion['combine']}" if fusion["method"] == "ensemble"
           else f"{fusion['method']} of {used} of {len(fusion['ingredients'])} runs, weight average "
                f"{fusion['weight_average']}")
    return f"| Fusion | {how}; {metrics['inference_cost']} forward pass(es) per prediction |"


def ingredients_section(metrics: dict[str, Any]) -> str:
    """The fused runs with their weights and scores (empty for a run that is not a fusion)."""
    if "fusion" not in metrics:
        return ""
    rows = ["\n\n### Ingredients\n", f"Scored on {metrics['fusion']['scored_on']}.\n",
            "| Run | Strategy | Weight | Validation accuracy | Test accuracy |", "|---|---|---|---|---|"]
    rows += [f"| `{i['run']}` | `{i['strategy']}` | {i['weight']:.4g} | {i['validation']['accuracy']:.4f} | "
             f"{i['test']['accuracy']:.4f} |" for i in metrics["fusion"]["ingredients"]]
    return "\n".join(rows)


def results_table(metrics: dict[str, Any]) -> str:
    rows = ["| Split | Accuracy | Macro-F1 |", "|---|---|---|"]
    for split in ("validation", "test"):
        values = metrics.get(split) or {}
        if "accuracy" in values:
            rows.append(f"| {split} | {values['accuracy']:.4f} | {values.get('macro_f1', float('nan')):.4f} |")
    return "\n".join(rows)


def confusion_table(test: dict[str, Any], label_names: list[str]) -> str:
    matrix = test.get("confusion_matrix")
    if not matrix:
        return ""
    rows = ["Test confusion matrix (rows: true label, columns: predicted):", "",
            "| | " + " | ".join(label_names) + " |", "|---" * (len(label_names) + 1) + "|"]
    rows += [f"| **{name}** | " + " | ".join(str(v) for v in row) + " |" for name, row in zip(label_names, matrix)]
    return "\n".join(rows)


def vanilla_lines(cfg, task: str, record, label_names: list[str], base: str, plain_torch: bool,
                  folder: str) -> str:
    """The section on loading without peftlab: why it cannot, or the exact lines that reproduce the run."""
    if plain_torch:
        return (f"Not possible: `{cfg.model.name}` is a plain torch model, not a transformers architecture, so only "
                f"peftlab rebuilds it. For use elsewhere, `peftlab export {folder} --format onnx` writes one ONNX "
                f"graph with the preprocessing settings beside it.")
    if record.merge is Merge.NOT_FOLDABLE and record.save_format is not SaveFormat.PEFT_ADAPTER:
        return (f"Not possible: strategy `{cfg.strategy}` inserts peftlab's own modules ({record.cannot_merge_because}"
                f"), which transformers and peft do not have. Load it with peftlab, or export it to ONNX "
                f"(`peftlab export {folder} --format onnx`).")
    if record.prepare_base is not None:  # peftlab changes the base before peft loads the adapter, and says why
        why = inspect.getdoc(record.prepare_base).split("\n\n", 1)[0].replace("\n", " ")
        return (f"Not possible with these versions: peftlab's loader {why[0].lower()}{why[1:]} Load it with peftlab, "
                f"or export it to ONNX (`peftlab export {folder} --format onnx`).")
    auto = "AutoModelForSequenceClassification" if task == "text" else "AutoModelForImageClassification"
    id2label = "{" + ", ".join(f"{i}: {json.dumps(name)}" for i, name in enumerate(label_names)) + "}"
    layers = f", num_hidden_layers={cfg.model.num_hidden_layers}" if cfg.model.num_hidden_layers else ""
    # ignore_mismatched_sizes: a base that ships a head of another size (ImageNet's 1000 classes) gets a new one,
    # as in training; the trained head then replaces it.
    model_dir = f"{folder}/{MODEL_SUBDIR}"
    lines = ["import torch"] + ([] if task == "text" else ["from PIL import Image"])
    lines += [f"from transformers import {auto}" + (", AutoTokenizer" if task == "text" else ", ViTImageProcessorPil")]
    if record.save_format is SaveFormat.PEFT_ADAPTER:
        lines += ["from peft import PeftModel", "",
                  f"base = {auto}.from_pretrained({base!r}, num_labels={len(label_names)}, id2label={id2label}"
                  f"{layers}, ignore_mismatched_sizes=True)",
                  f"model = PeftModel.from_pretrained(base, {model_dir!r}).eval()"]
        body = "model.get_base_model().base_model"
    elif record.save_format is SaveFormat.WHOLE_MODEL:
        lines += ["", f"model = {auto}.from_pretrained({model_dir!r}).eval()"]
        body = "model.base_model"
    else:  # only the trained tensors: they go onto the same base, loaded the vanilla way
        lines += ["from safetensors.torch import load_file", "",
                  f"model = {auto}.from_pretrained({base!r}, num_labels={len(label_names)}, id2label={id2label}"
                  f"{layers}, ignore_mismatched_sizes=True)",
                  f"model.load_state_dict(load_file({model_dir + '/peftlab_trainable.safetensors'!r}), "
                  f"strict=False)",
                  "model.eval()"]
        body = "model.base_model"
    warning = ""
    if task == "text" and cfg.model.pooling == "mean":
        warning = ("**Loading the weights alone does not reproduce this model.** It was trained with `pooling=mean` "
                   "(the head reads the mean of the last hidden states, what sentence encoders are trained for); a "
                   "transformers model pools the first token, so without the hook below its predictions are wrong "
                   "(near chance). With it they are peftlab's exactly:\n\n")
        lines += ["", "def mean_pooling(module, args, kwargs, output):  # what peftlab's pooling=mean does",
                  "    mask = kwargs[\"attention_mask\"].unsqueeze(-1).to(output.last_hidden_state.dtype)",
                  "    pooled = (output.last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1.0)",
                  "    output.last_hidden_state = torch.cat([pooled[:, None], output.last_hidden_state[:, 1:]], dim=1)",
                  "    if getattr(output, \"pooler_output\", None) is not None:",
                  "        output.pooler_output = pooled",
                  "    return output", "",
                  f"{body}.register_forward_hook(mean_pooling, with_kwargs=True)"]
    lines += [""] + (text_inputs(cfg, model_dir) if task == "text" else image_inputs(model_dir))
    lines += ["with torch.no_grad():",
              "    probabilities = model(**batch).logits.softmax(-1)  # columns: " + ", ".join(label_names)]
    return warning + "```python\n" + "\n".join(lines) + "\n```"


def text_inputs(cfg, model_dir: str) -> list[str]:
    return [f"tokenizer = AutoTokenizer.from_pretrained({model_dir!r})",
            "texts = [\"a gripping, beautifully shot film\"]",
            f"batch = tokenizer(texts, truncation=True, max_length={cfg.data.max_length}, padding=True, "
            f"return_tensors=\"pt\")"]


def image_inputs(model_dir: str) -> list[str]:
    # The PIL backend is what peftlab's own transform matches exactly (torchvision's resize differs slightly).
    return [f"processor = ViTImageProcessorPil.from_pretrained({model_dir!r})  # bilinear resize, then normalise",
            "batch = processor(images=[Image.open(\"cat.png\").convert(\"RGB\")], return_tensors=\"pt\")"]
