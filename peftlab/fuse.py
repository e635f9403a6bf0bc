"""Fuse fine-tuned runs into one run folder: an ensemble (average their predictions) or a model soup (average weights).

    peftlab fuse outputs/seed1 outputs/seed2 outputs/seed3 --method greedy-soup --output outputs/greedy_soup
    peftlab fuse outputs/minilm_lora outputs/vit_full --method ensemble --combine logits --output outputs/ensemble
    python -m peftlab.fuse ...                                     # the same

Methods (Wortsman et al. 2022, "Model soups", arXiv 2203.05482):
- ensemble: runs of one task over the same label names (any backbone or strategy). The folder holds copies of the
  members under members/ and model/fusion.json; `peftlab.load` / `peftlab predict` average the members'
  probabilities (default) or logits. Inference cost: one forward pass per member.
- uniform-soup: runs fine-tuned from the same base with the same strategy; one model with the average of what
  each run trained, at the base's inference cost (one forward pass):
    full, partial, BitFit, head: the trained tensors are averaged (exact: the soup's weights are the mean of the
      runs' weights, heads included);
    LoRA: the weight changes (alpha/r)·B·A are averaged exactly, as one peft adapter of concatenated rank (peft's
      `cat` combination): A = [A_1; ...; A_k], B = [s_1 B_1 / k, ..., s_k B_k / k], rank sum(r_i), scaling 1, so
      B·A = mean_i s_i B_i A_i (averaging A and B separately would not be the mean of their products); heads averaged;
      Or, with --lora-combination, through peft's `add_weighted_adapter` (heads averaged apart, since peft refuses
      adapters that each carry a head): svd (exact at the full, concatenated rank), or linear, TIES, DARE and
      magnitude pruning (approximate; --density sets the fraction kept);
    bottleneck adapters: their weights are averaged directly, an approximation (the adapter is non-linear, so the
      mean of the weights is not the mean of the weight changes of any folded model).
  Mean pooling is kept as the runs had it (the soup is saved in the strategy's own format, not merged).
- greedy-soup: ingredients sorted by validation accuracy, best first; each is added to the soup only if the soup's
  validation accuracy does not drop, so the soup is never worse on validation than its best ingredient. The
  accuracies are the ones scored here (the runs' metrics.json values up to the precision they were scored in), so
  the soup and its ingredients are compared on the same footing.

A RUN_DIR holding run folders rather than being one (a `peftlab cv` output with its fold-<i>/ runs) stands for
its runs. Folds validate on different parts of the data, so they make uniform soups and ensembles (the note in
metrics.json says their validation scores are not all held out; the test split is) but not greedy soups.

Every ingredient and the fusion are scored here, in fp32, on the validation and test splits of the first run's
recipe (`load_data(cfg.data)` with each run's own preprocessing); metrics.json holds all of them and
`inference_cost` (forward passes per prediction). Runs that cannot be fused are refused in one line before any work:
fewer than two, different label names, a greedy soup of runs validated on different splits, and for soups different
strategies, pooling, architectures or base weights (a hash of the base's tensors, not its name), or a quantized base
(its weights are not plain floats to average).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from peftlab import run_folder
from peftlab.config import RecipeConfig, save_config
from peftlab.console import quiet_third_party
from peftlab.errors import PeftlabError
from peftlab.loading import COMBINES, FUSION_FILE, LoadedRun, load, read_run_info
from peftlab.runs import CONFIG_FILE, METRICS_FILE, MODEL_SUBDIR, TASK_FILE
from peftlab.saving import STRATEGY_FILE, read_strategy
from peftlab.strategies import AppliedStrategy, Merge, SaveFormat

METHODS = ("ensemble", "uniform-soup", "greedy-soup")
# How a LoRA soup combines the runs' updates: `cat` is peftlab's own (exact, heads averaged); the others go through
# peft's `add_weighted_adapter`. Exact: cat, and the SVD variants at full rank (the sum of the ranks, as used here)
# before any pruning; approximate: linear (mixes A and B separately), TIES, DARE and magnitude pruning.
LORA_COMBINATIONS = ("cat", "svd", "linear", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd",
                     "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd")
EXACT_LORA_COMBINATIONS = ("cat", "svd")
ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"
MEMBERS_SUBDIR = "members"
MEMBER_FILES = (CONFIG_FILE, METRICS_FILE, "README.md")  # beside model/: what a member folder keeps of its run


@dataclass
class Ingredient:
    """A run folder to fuse, read without loading its weights."""

    run_dir: Path
    cfg: RecipeConfig
    task: str
    label_names: list[str]
    spec: AppliedStrategy

    @property
    def model_dir(self) -> Path:
        return self.run_dir / MODEL_SUBDIR


def expand_run_dirs(run_dirs: list[str | Path]) -> list[Path]:
    """The run folders named, a folder of run folders (a `peftlab cv` output's fold-<i>/) standing for its runs."""
    expanded = []
    for run_dir in map(Path, run_dirs):
        inside = [p for p in run_dir.iterdir() if (p / MODEL_SUBDIR / TASK_FILE).is_file()] \
            if run_dir.is_dir() and not (run_dir / MODEL_SUBDIR).is_dir() else []
        expanded += sorted(inside, key=natural_order) or [run_dir]
    return expanded


def natural_order(path: Path) -> list:
    """Sort key putting fold-2 before fold-10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def split_settings(ingredient: Ingredient) -> dict[str, Any]:
    """The data settings that decide the validation and test splits (not the preprocessing or the training subset)."""
    settings = dataclasses.asdict(ingredient.cfg.data)
    for preprocessing in ("max_length", "image_size", "augment", "max_train_samples"):
        settings.pop(preprocessing, None)
    return settings


def read_ingredients(run_dirs: list[str | Path]) -> list[Ingredient]:
    """The runs to fuse; one-line errors for fewer than two, a folder that is no finished run, or different labels."""
    run_dirs = expand_run_dirs(run_dirs)
    if len(run_dirs) < 2:
        raise PeftlabError(f"fusing needs at least two run folders, got {len(run_dirs)}")
    ingredients = []
    for run_dir in map(Path, run_dirs):
        cfg, task, label_names = read_run_info(run_dir)
        if (run_dir / MODEL_SUBDIR / FUSION_FILE).is_file():
            raise PeftlabError(f"{run_dir} is an ensemble; fuse its member runs (under {run_dir / MEMBERS_SUBDIR}) "
                               f"instead")
        ingredients.append(Ingredient(run_dir, cfg, task, label_names, read_strategy(run_dir / MODEL_SUBDIR)))
    first = ingredients[0]
    for other in ingredients[1:]:
        if (other.task, other.label_names) != (first.task, first.label_names):
            raise PeftlabError(f"{other.run_dir} labels {other.task} as {other.label_names} but {first.run_dir} as "
                               f"{first.label_names} ({first.task}); fuse only runs over the same label names")
    return ingredients


def check_soup(ingredients: list[Ingredient]) -> None:
    """One-line errors for runs whose weights cannot be averaged (see the module docstring); loads each distinct base
    once to hash its weights."""
    first = ingredients[0]
    for ingredient in ingredients:
        if ingredient.cfg.model.quantization:
            raise PeftlabError(f"{ingredient.run_dir} has a {ingredient.cfg.model.quantization}-quantized base, "
                               f"whose packed weights cannot be averaged; fuse it with --method ensemble")
        for what, mine, theirs in (("strategy", ingredient.spec.name, first.spec.name),
                                   ("pooling", ingredient.spec.pooling, first.spec.pooling)):
            if mine != theirs:
                raise PeftlabError(f"{ingredient.run_dir} was trained with {what} {mine!r} but {first.run_dir} with "
                                   f"{theirs!r}; a soup averages runs of one strategy and pooling: use --method "
                                   f"ensemble")
    fingerprints = {}
    for ingredient in ingredients:
        key = json.dumps([ingredient.cfg.model.name, ingredient.cfg.model.num_hidden_layers, ingredient.task,
                          ingredient.label_names, ingredient.spec.head_modules])
        fingerprints[key] = fingerprints.get(key) or base_fingerprint(ingredient)
        architecture, weights = fingerprints[key]
        first_architecture, first_weights = fingerprints[next(iter(fingerprints))]
        if architecture != first_architecture:
            raise PeftlabError(f"{ingredient.run_dir} ({ingredient.cfg.model.name}) and {first.run_dir} "
                               f"({first.cfg.model.name}) have different architectures, so their weights cannot "
                               f"be averaged; use --method ensemble")
        if weights != first_weights:
            raise PeftlabError(f"{ingredient.run_dir} and {first.run_dir} were fine-tuned from different base "
                               f"weights ({ingredient.cfg.model.name}: {weights[:12]}, {first.cfg.model.name}: "
                               f"{first_weights[:12]}); a soup needs one base: use --method ensemble")
    if first.spec.record.save_format is SaveFormat.PEFT_ADAPTER:
        for ingredient in ingredients:
            check_lora_config(ingredient.model_dir)
    shapes = [saved_shapes(ingredient.model_dir) for ingredient in ingredients]
    for ingredient, theirs in zip(ingredients[1:], shapes[1:]):
        if theirs.keys() != shapes[0].keys() or (first.spec.record.save_format is not SaveFormat.PEFT_ADAPTER
                                                 and theirs != shapes[0]):
            raise PeftlabError(f"{ingredient.run_dir} trained other tensors than {first.run_dir} (strategy options "
                               f"{ingredient.spec.options} vs {first.spec.options}); a soup averages runs that "
                               f"trained the same tensors: use --method ensemble")


def base_fingerprint(ingredient: Ingredient) -> tuple[str, str]:
    """(hash of the base's tensor names and shapes, hash of those plus their bytes), the new head left out: the
    base the run's config.yaml names, loaded as its recipe loaded it."""
    from peftlab.backbones import load_base
    from peftlab.heads import is_in_modules

    model = load_base(ingredient.cfg.model, task=ingredient.task, label_names=ingredient.label_names).model
    architecture, weights = hashlib.sha256(), hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if is_in_modules(name.rsplit(".", 1)[0], ingredient.spec.head_modules):
            continue  # the head is new and seeded per run: not part of the base
        architecture.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        weights.update(name.encode() + tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return architecture.hexdigest(), architecture.hexdigest() + weights.hexdigest()


def saved_shapes(model_dir: Path) -> dict[str, tuple]:
    """{file/tensor name: shape} of every safetensors file in a saved model folder."""
    shapes = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(path, framework="pt") as weights:
            shapes.update({f"{path.name}/{key}": tuple(weights.get_slice(key).get_shape()) for key in weights.keys()})
    return shapes


def check_lora_config(model_dir: Path) -> None:
    """Error for a peft adapter whose update is not the plain (alpha/r)·B·A a concatenated-rank soup averages."""
    config = json.loads((model_dir / ADAPTER_CONFIG).read_text())
    if config.get("peft_type") != "LORA" or config.get("use_dora") or config.get("rank_pattern") \
            or config.get("alpha_pattern"):
        kind = "LoRA adapter with DoRA or per-module ranks" if config.get("peft_type") == "LORA" else \
            f"{config.get('peft_type')} adapter"
        raise PeftlabError(f"{model_dir} holds a {kind}, whose update is not a plain (alpha/r)·B·A; fuse it with "
                           f"--method ensemble")


def lora_scaling(config: dict[str, Any]) -> float:
    """peft's LoRA scaling: alpha/r, or alpha/sqrt(r) with rsLoRA (Kalajdzievski 2023)."""
    return config["lora_alpha"] / (config["r"] ** 0.5 if config.get("use_rslora") else config["r"])


def write_soup(ingredients: list[Ingredient], weights: list[float], model_dir: Path, lora_combination: str = "cat",
               density: float = 0.5) -> AppliedStrategy:
    """Write the weighted average of the ingredients' trained weights as a saved model folder (the first
    ingredient's, with its tokenizer or image settings); returns the soup's strategy spec.

    Args:
        lora_combination, density: for LoRA runs, one of LORA_COMBINATIONS, and the fraction of each update that
            TIES/DARE/magnitude pruning keep.
    """
    first = ingredients[0]
    shutil.copytree(first.model_dir, model_dir, dirs_exist_ok=True)
    spec = first.spec
    if spec.record.save_format is SaveFormat.PEFT_ADAPTER and lora_combination != "cat":
        rank, alpha = write_peft_combination(ingredients, weights, model_dir, lora_combination, density)
        spec = AppliedStrategy(spec.name, {**spec.options, "r": rank, "alpha": alpha, "use_rslora": False},
                               spec.head_modules, spec.pooling)
    elif spec.record.save_format is SaveFormat.PEFT_ADAPTER:
        configs = [json.loads((i.model_dir / ADAPTER_CONFIG).read_text()) for i in ingredients]
        states = [load_file(i.model_dir / ADAPTER_WEIGHTS) for i in ingredients]
        soup = {}
        for key in states[0]:
            if ".lora_A." in key:  # ranks stacked: row block i of A pairs with column block i of B
                soup[key] = torch.cat([state[key] for state in states], dim=0)
            elif ".lora_B." in key:
                soup[key] = torch.cat([weight * lora_scaling(config) * state[key]
                                       for weight, config, state in zip(weights, configs, states)], dim=1)
            else:  # the heads (modules_to_save) and any trained bias
                soup[key] = average([state[key] for state in states], weights)
        rank = sum(config["r"] for config in configs)
        # Scaling 1 (alpha = r, no rsLoRA): each B block already carries its run's scaling and weight.
        (model_dir / ADAPTER_CONFIG).write_text(json.dumps({**configs[0], "r": rank, "lora_alpha": rank,
                                                            "use_rslora": False}, indent=2, sort_keys=True) + "\n")
        save_file(soup, model_dir / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        spec = AppliedStrategy(spec.name, {**spec.options, "r": rank, "alpha": rank, "use_rslora": False},
                               spec.head_modules, spec.pooling)
    else:  # whole models and trained tensors: every saved tensor, file by file
        for path in sorted(first.model_dir.glob("*.safetensors")):
            states = [load_file(i.model_dir / path.name) for i in ingredients]
            save_file({key: average([state[key] for state in states], weights) for key in states[0]},
                      model_dir / path.name, metadata={"format": "pt"})
    (model_dir / STRATEGY_FILE).write_text(json.dumps(spec.to_json(), indent=2) + "\n")
    return spec


def write_peft_combination(ingredients: list[Ingredient], weights: list[float], model_dir: Path,
                           combination: str, density: float) -> tuple[int, int]:
    """Combine the ingredients' LoRA updates with peft's `add_weighted_adapter` into `model_dir`'s adapter, the
    heads averaged apart (peft refuses adapters that each carry a head in `modules_to_save`, peft PR #1615);
    returns the new adapter's (r, lora_alpha)."""
    from peft import PeftModel

    from peftlab.backbones import load_base

    first = ingredients[0]
    states = [load_file(i.model_dir / ADAPTER_WEIGHTS) for i in ingredients]
    configs = [json.loads((i.model_dir / ADAPTER_CONFIG).read_text()) for i in ingredients]
    heads = {key: average([state[key] for state in states], weights) for key in states[0] if ".lora_" not in key}
    with tempfile.TemporaryDirectory(prefix="peftlab_lora_") as folder:
        names = [f"run{number}" for number in range(len(ingredients))]
        for name, state, config in zip(names, states, configs):  # each adapter without its head
            (Path(folder) / name).mkdir()
            save_file({k: v for k, v in state.items() if k not in heads}, Path(folder) / name / ADAPTER_WEIGHTS)
            # task_type None too: peft's sequence-classification wrapper would add the head back
            (Path(folder) / name / ADAPTER_CONFIG).write_text(json.dumps({**config, "modules_to_save": None,
                                                                          "task_type": None}))
        base = load_base(first.cfg.model, task=first.task, label_names=first.label_names).model
        model = PeftModel.from_pretrained(base, Path(folder) / names[0], adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(Path(folder) / name, adapter_name=name)
        torch.manual_seed(0)  # DARE drops entries at random: the same soup every time
        full_rank = sum(config["r"] for config in configs)  # SVD at the concatenated rank keeps the sum exact
        model.add_weighted_adapter(names, weights, "soup", combination_type=combination, svd_rank=full_rank,
                                   density=None if combination in ("svd", "linear") else density)
        model.save_pretrained(Path(folder) / "out", selected_adapters=["soup"])
        soup_dir = next(p.parent for p in (Path(folder) / "out").rglob(ADAPTER_CONFIG))
        soup_config = json.loads((soup_dir / ADAPTER_CONFIG).read_text())
        soup = load_file(soup_dir / ADAPTER_WEIGHTS)
    rank, alpha = soup_config["r"], soup_config["lora_alpha"]
    (model_dir / ADAPTER_CONFIG).write_text(json.dumps({**configs[0], "r": rank, "lora_alpha": alpha,
                                                        "use_rslora": soup_config.get("use_rslora", False)},
                                                       indent=2, sort_keys=True) + "\n")
    save_file({**soup, **heads}, model_dir / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    return rank, alpha


def average(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """The weighted mean of same-shaped tensors, computed in float64 and stored in their dtype; integer tensors
    (batch-norm step counters) are the first one's."""
    if not tensors[0].is_floating_point():
        return tensors[0]
    return sum(w * t.double() for w, t in zip(weights, tensors)).to(tensors[0].dtype).contiguous()


def write_ensemble(ingredients: list[Ingredient], weights: list[float], output_dir: Path, combine: str) -> None:
    """Copy each member's model and config under members/ and write model/ (task.json and FUSION_FILE)."""
    members = []
    for number, ingredient in enumerate(ingredients):
        member = Path(MEMBERS_SUBDIR) / f"{number}_{ingredient.run_dir.resolve().name}"
        shutil.copytree(ingredient.model_dir, output_dir / member / MODEL_SUBDIR)
        for name in MEMBER_FILES:
            if (ingredient.run_dir / name).is_file():
                shutil.copy2(ingredient.run_dir / name, output_dir / member / name)
        members.append(member.as_posix())
    model_dir = output_dir / MODEL_SUBDIR
    model_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy2(ingredients[0].model_dir / TASK_FILE, model_dir / TASK_FILE)
    (model_dir / FUSION_FILE).write_text(json.dumps({"method": "ensemble", "combine": combine, "members": members,
                                                     "weights": weights}, indent=2) + "\n")


class Scorer:
    """Validation and test metrics of loaded runs on the first ingredient's recipe splits."""

    def __init__(self, ingredient: Ingredient, batch_size: int):
        from peftlab.data import load_data

        self.splits = load_data(ingredient.cfg.data, task=ingredient.task).splits
        self.column = "text" if ingredient.task == "text" else "image"
        self.label_names, self.batch_size = ingredient.label_names, batch_size

    def score(self, run: LoadedRun, split: str) -> dict[str, Any]:
        """Accuracy, macro-F1, per-class report and confusion matrix of `run` on `split`."""
        from peftlab.metrics import compute_classification_metrics

        data = self.splits[split]
        probabilities = run.probabilities_in_batches(list(data[self.column]), self.batch_size)
        return compute_classification_metrics(probabilities.argmax(-1), data["label"], self.label_names)


def greedy_order(ingredients: list[Ingredient], accuracies: list[float]) -> list[int]:
    """Ingredient indices by validation accuracy, best first (ties: the order given)."""
    return sorted(range(len(ingredients)), key=lambda i: -accuracies[i])


def fuse(run_dirs: list[str | Path], method: str, output_dir: str | Path, *, combine: str = "probabilities",
         lora_combination: str = "cat", density: float = 0.5, overwrite: bool = False,
         batch_size: int = 64) -> dict[str, Any]:
    """Fuse the runs in `run_dirs` into a run folder at `output_dir` (see the module docstring); returns its
    metrics.json content.

    Args:
        combine: what an ensemble averages, probabilities or logits.
        lora_combination, density: how a LoRA soup combines the updates (LORA_COMBINATIONS) and what fraction
            TIES/DARE/magnitude pruning keep.
    """
    from peftlab.metrics import scalar_metrics

    if method not in METHODS:
        raise PeftlabError(f"unknown fusion method {method!r}; choose one of {', '.join(METHODS)}")
    if combine not in COMBINES:
        raise PeftlabError(f"unknown --combine {combine!r}; choose one of {', '.join(COMBINES)}")
    if combine != "probabilities" and method != "ensemble":
        raise PeftlabError(f"--combine applies to ensembles only; a {method} averages weights")
    if lora_combination not in LORA_COMBINATIONS:
        raise PeftlabError(f"unknown --lora-combination {lora_combination!r}; choose one of "
                           f"{', '.join(LORA_COMBINATIONS)}")
    if not 0 < density <= 1:
        raise PeftlabError(f"--density {density} must be in (0, 1]: the fraction of each update kept")
    ingredients = read_ingredients(run_dirs)
    if lora_combination != "cat" and (method == "ensemble" or ingredients[0].spec.record.save_format
                                      is not SaveFormat.PEFT_ADAPTER):
        raise PeftlabError(f"--lora-combination {lora_combination} applies to soups of LoRA runs only")
    state = run_folder.check_output_dir(output_dir, resume_from=None, overwrite=overwrite)
    other_splits = [str(i.run_dir) for i in ingredients if split_settings(i) != split_settings(ingredients[0])]
    note = None
    if other_splits:
        # Cross-validation folds validate on different parts of the pool: fold 0's validation split is training data
        # of the others, so only the test split is held out for every ingredient.
        if method == "greedy-soup":
            raise PeftlabError(f"{other_splits[0]} was validated on other data than {ingredients[0].run_dir} (its data "
                               f"settings differ, e.g. another cross-validation fold), so greedy-soup has no common "
                               f"validation split to choose by; use uniform-soup or ensemble")
        note = (f"validation scores use {ingredients[0].run_dir}'s validation split, which {len(other_splits)} "
                f"ingredient(s) validated or trained on differently (e.g. other cross-validation folds); the test "
                f"split is held out for all")
        print(f"note: {note}", file=sys.stderr)
    if method != "ensemble":
        check_soup(ingredients)

    scorer = Scorer(ingredients[0], batch_size)
    runs = [load(ingredient.run_dir) for ingredient in ingredients]
    scores = [{split: scorer.score(run, split) for split in ("validation", "test")} for run in runs]
    validation = [score["validation"]["accuracy"] for score in scores]
    chosen = list(range(len(ingredients)))
    if method == "greedy-soup":
        order = greedy_order(ingredients, validation)
        chosen, best = order[:1], validation[order[0]]
        for candidate in order[1:]:
            with tempfile.TemporaryDirectory(prefix="peftlab_soup_") as folder:
                trial = chosen + [candidate]
                soup_dir = Path(folder) / "soup"
                write_soup([ingredients[i] for i in trial], [1 / len(trial)] * len(trial), soup_dir / MODEL_SUBDIR,
                           lora_combination, density)
                save_config(ingredients[0].cfg, soup_dir / CONFIG_FILE)
                accuracy = scorer.score(load(soup_dir), "validation")["accuracy"]
            print(f"greedy soup: + {ingredients[candidate].run_dir} -> validation accuracy {accuracy:.4f} "
                  f"({'kept' if accuracy >= best else 'left out'}; soup so far {best:.4f})", file=sys.stderr)
            if accuracy >= best:
                chosen, best = trial, accuracy
    weights = [1 / len(chosen) if i in chosen else 0.0 for i in range(len(ingredients))]

    output_dir = run_folder.open_run_folder(state)
    try:
        cfg = ingredients[0].cfg
        if method == "ensemble":
            write_ensemble(ingredients, weights, output_dir, combine)
            spec = None
        else:
            spec = write_soup([ingredients[i] for i in chosen], [weights[i] for i in chosen],
                              output_dir / MODEL_SUBDIR, lora_combination, density)
            cfg = soup_config(cfg, ingredients[0].spec, spec)
        cfg = dataclasses.replace(cfg, output_dir=str(output_dir))
        save_config(cfg, output_dir / CONFIG_FILE)
        fused = load(output_dir)
        metrics = {split: scorer.score(fused, split) for split in ("validation", "test")}
        approximation = None if spec is None else (
            "bottleneck adapters are non-linear, their weights are averaged directly"
            if spec.record.merge is Merge.NOT_FOLDABLE else
            f"peft's {lora_combination} combination of the LoRA updates"
            if spec.record.save_format is SaveFormat.PEFT_ADAPTER
            and lora_combination not in EXACT_LORA_COMBINATIONS else None)
        metrics |= {
            "inference_cost": len(ingredients) if method == "ensemble" else 1,
            "fusion": {
                "method": method, "combine": combine if method == "ensemble" else None,
                "weight_average": None if method == "ensemble" else (
                    f"approximate: {approximation}" if approximation else "exact"),
                "lora_combination": lora_combination if spec is not None and spec.name == "lora" else None,
                "scored_on": f"{cfg.data.name} validation and test splits, fp32, by peftlab fuse",
                "note": note,
                "ingredients": [{"run": str(ingredient.run_dir), "strategy": ingredient.spec.name,
                                 "weight": weight, "validation": scalar_metrics(score["validation"]),
                                 "test": scalar_metrics(score["test"])}
                                for ingredient, weight, score in zip(ingredients, weights, scores)],
            },
        }
        if spec is not None:
            metrics["parameters"] = soup_parameters(cfg, ingredients[0], spec).as_record()
        (output_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
        (output_dir / "README.md").write_text(fusion_card(cfg, ingredients[0], metrics, spec, str(output_dir)))
    except BaseException as err:
        run_folder.close_run_folder(output_dir, run_folder.FAILED, reason=f"{type(err).__name__}: {err}")
        raise
    run_folder.close_run_folder(output_dir, run_folder.FINISHED)
    return metrics


def soup_config(cfg: RecipeConfig, first: AppliedStrategy, soup: AppliedStrategy) -> RecipeConfig:
    """The first ingredient's config with the options the soup changed (a LoRA soup's concatenated rank)."""
    changed = {key: value for key, value in soup.options.items() if first.options.get(key) != value}
    options = {**cfg.strategy_options, soup.name: {**cfg.strategy_options.get(soup.name, {}), **changed}}
    return dataclasses.replace(cfg, strategy_options=options)


def soup_parameters(cfg: RecipeConfig, ingredient: Ingredient, spec: AppliedStrategy):
    """Parameter counts of the soup's model as its strategy builds it (a LoRA soup has the concatenated rank)."""
    from peftlab import apply_strategy, count_parameters
    from peftlab.backbones import load_base

    base = load_base(cfg.model, task=ingredient.task, label_names=ingredient.label_names).model
    return count_parameters(apply_strategy(base, spec.name, head_modules=spec.head_modules, pooling=spec.pooling,
                                           **spec.options))


def fusion_card(cfg: RecipeConfig, ingredient: Ingredient, metrics: dict[str, Any], spec, folder: str) -> str:
    """The fused folder's model card: the run card of the soup's strategy, or the ensemble's, with the ingredients."""
    from peftlab.model_card import ensemble_card, model_card
    from peftlab.params import ParameterCount

    if spec is None:
        return ensemble_card(cfg, ingredient.task, metrics, ingredient.label_names, folder)
    counts = ParameterCount(**{k: metrics["parameters"][k]
                               for k in ("trainable", "total", "head", "trainable_without_head")})
    return model_card(cfg, ingredient.task, metrics, counts, ingredient.label_names, plain_torch=False,
                      folder=folder)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="peftlab fuse", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders to fuse (at least two)")
    parser.add_argument("--method", required=True, choices=METHODS)
    parser.add_argument("--output", required=True, help="the fused run folder to write")
    parser.add_argument("--combine", default="probabilities", choices=COMBINES,
                        help="what an ensemble averages (default: probabilities)")
    parser.add_argument("--lora-combination", default="cat", choices=LORA_COMBINATIONS, metavar="COMBINATION",
                        help="how a LoRA soup combines the updates: cat (default, exact), svd (exact at full "
                             "rank), or peft's approximate linear, ties, dare_linear, dare_ties, magnitude_prune "
                             "(and their _svd forms)")
    parser.add_argument("--density", type=float, default=0.5,
                        help="the fraction of each LoRA update that TIES/DARE/magnitude pruning keep (default: 0.5)")
    parser.add_argument("--overwrite", action="store_true", help="move a finished run in --output aside first")
    parser.add_argument("--batch-size", type=int, default=64, help="inputs per forward pass when scoring")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and third-party notices")
    args = parser.parse_args(argv)
    quiet_third_party(args.debug)  # also when run as `python -m peftlab.<command>`, not through `peftlab`
    try:
        metrics = fuse(args.run_dirs, args.method, args.output, combine=args.combine,
                       lora_combination=args.lora_combination, density=args.density, overwrite=args.overwrite,
                       batch_size=args.batch_size)
    except PeftlabError as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"{args.method} of {len(args.run_dirs)} runs -> {args.output}: validation accuracy "
          f"{metrics['validation']['accuracy']:.4f}, test accuracy {metrics['test']['accuracy']:.4f}, "
          f"inference cost {metrics['inference_cost']} forward pass(es)", file=sys.stderr)


if __name__ == "__main__":
    main()
