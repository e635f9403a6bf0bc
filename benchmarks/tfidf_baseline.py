"""The cheap reference row of a text table: TF-IDF + a linear SVM (scikit-learn) on a recipe's own splits.

    python benchmarks/tfidf_baseline.py data.name=reviews.csv output_dir=runs/tfidf_reviews
    python benchmarks/tfidf_baseline.py --config recipes/configs/x.yaml data.name=benchmarks/data/r52 output_dir=runs/x

A harness job (`tfidf_svm` in peftlab.harness.programs): a grid row `tfidf-svm: {job: tfidf_svm}` runs it on the
same overrides as the fine-tuning rows, so the table shows whether fine-tuning beats it on that data. It takes the
text recipe's config and `key=value` overrides (same default config) and reads the splits through
`peftlab.data.load_data`, so caps, split seeds and cross-validation folds are exactly the recipe's. Of the config it
uses `data`, `train.seed` (LinearSVC's shuffling) and `train.metric_for_best`; model, strategy and the other train
keys do not apply.

What it fits, on the training split only: `TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2), min_df=2)` (the
usual strong text baseline; at C=1 on the whole Reuters-R52 training file it gives the reference figure, test accuracy
0.940, macro-F1 0.660), then `LinearSVC` (one-vs-rest) for each C in C_GRID; the C with the best validation
`train.metric_for_best` (accuracy for `loss`, which a margin classifier does not have; the smaller C on a tie) is
scored on the test split. Metrics are peftlab's own (`compute_classification_metrics`), as for fine-tuned runs.

It leaves what the record reads: config.yaml, metrics.json (validation and test metrics, train_time_s: vectorizing,
fitting and validating every C; the parameters: the SVM's coefficients and intercepts, all of them a classifier on
fixed features, so counted as the head, like a linear probe's), and model/ (the fitted arrays as safetensors and the
vocabulary as JSON, so the record's model size is the model's).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.svm import LinearSVC

from peftlab import PeftlabError, run_folder
from peftlab.cli import run_cli
from peftlab.config import RecipeConfig
from peftlab.data import load_data
from peftlab.data_rules import resolve_data_rules
from peftlab.metrics import compute_classification_metrics, scalar_metrics
from peftlab.params import ParameterCount
from peftlab.phases import PhaseTimer
from peftlab.runs import MODEL_SUBDIR, check_before_loading, prepare_output_dir, write_metrics
from peftlab.training import peak_memory_mb

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "recipes" / "configs" / "minilm_lora_rotten_tomatoes.yaml"
VECTORIZER = {"sublinear_tf": True, "ngram_range": (1, 2), "min_df": 2}
C_GRID = (0.1, 1.0, 10.0)
"""LinearSVC's inverse regularisation strengths tried on the validation split (scikit-learn's default is 1)."""


def main(cfg: RecipeConfig) -> dict:
    """Fit TF-IDF + LinearSVC on the train split, pick C on validation, score test; write the run like a recipe."""
    check_before_loading(cfg)  # the same output-folder and metric checks as the recipe, before any work
    phases = PhaseTimer()
    data = load_data(cfg.data, task="text")
    splits = {name: (list(split["text"]), np.asarray(split["label"])) for name, split in data.splits.items()}
    phases.lap("data")
    output_dir = prepare_output_dir(cfg)
    resolve_data_rules(cfg, data)  # train.metric_for_best=auto: macro-F1 on imbalanced labels, as the recipe picks
    metric = "accuracy" if cfg.train.metric_for_best == "loss" else cfg.train.metric_for_best

    start = time.perf_counter()
    with phases.measure("train_steps"):
        vectorizer = TfidfVectorizer(**VECTORIZER)
        try:
            train_features = vectorizer.fit_transform(splits["train"][0])
        except ValueError as err:  # scikit-learn's "empty vocabulary" / "no terms remain": the data, not the code
            raise PeftlabError(f"TF-IDF found no word (of 2+ letters) in at least {VECTORIZER['min_df']} training "
                               f"texts of {cfg.data.name} ({err}); the baseline needs more or longer texts") from err
    with phases.measure("evaluation"):
        validation_features = vectorizer.transform(splits["validation"][0])
    fits, validation = {}, {}
    for c in C_GRID:
        with phases.measure("train_steps"):
            fits[c] = LinearSVC(C=c, random_state=cfg.train.seed).fit(train_features, splits["train"][1])
        with phases.measure("evaluation"):
            validation[c] = scalar_metrics(compute_classification_metrics(
                fits[c].predict(validation_features), splits["validation"][1], data.label_names))
    best = max(C_GRID, key=lambda c: validation[c][metric])  # max() keeps the first, i.e. the smaller C, on a tie
    svm, train_time = fits[best], time.perf_counter() - start

    with phases.measure("test"):
        predictions = svm.predict(vectorizer.transform(splits["test"][0]))
        test = compute_classification_metrics(predictions, splits["test"][1], data.label_names)
    save_model(output_dir / MODEL_SUBDIR, vectorizer, svm, data.label_names)
    weights = svm.coef_.size + svm.intercept_.size
    counts = ParameterCount(trainable=weights, total=weights, head=weights, trainable_without_head=0)
    metrics = write_metrics(output_dir, cfg, {
        "validation": validation[best], "test": test, "best_step": None, "global_step": None, "stopped_early": False,
        "train_time_s": train_time,
        # As the recipes count epochs x examples: every C's fit passes over the training split once more.
        "samples_per_s": len(C_GRID) * len(splits["train"][0]) / phases.seconds["train_steps"],
        "peak_memory_mb": peak_memory_mb(torch.device("cpu")), "phases_s": phases.as_dict(),
        "cpu_threads": 1,  # liblinear and the vectorizer run on one thread
        "mixed_precision": "fp64",  # scikit-learn's float64, whatever train.mixed_precision says
        "model_selection": {"metric": metric, "C": best, "validation_by_C": {str(c): validation[c] for c in C_GRID},
                            "vectorizer": {**VECTORIZER, "features": len(vectorizer.vocabulary_)}},
    }, counts)
    run_folder.close_run_folder(output_dir, run_folder.FINISHED)
    print(f"tfidf + LinearSVC: C={best:g} by validation {metric} "
          f"({', '.join(f'C={c:g} {validation[c][metric]:.4f}' for c in C_GRID)}), "
          f"{len(vectorizer.vocabulary_):,} features, {weights:,} parameters")
    print(f"test accuracy {test['accuracy']:.4f}, macro-F1 {test['macro_f1']:.4f} ({train_time:.0f} s)")
    return metrics


def save_model(model_dir: Path, vectorizer: TfidfVectorizer, svm: LinearSVC, label_names: list[str]) -> None:
    """The fitted model as data, no pickle: idf, coefficients and intercepts (safetensors), vocabulary and labels."""
    model_dir.mkdir(parents=True, exist_ok=True)
    save_file({"idf": vectorizer.idf_, "coef": svm.coef_, "intercept": svm.intercept_},
              str(model_dir / "tfidf_svm.safetensors"))
    vocabulary = {term: int(column) for term, column in vectorizer.vocabulary_.items()}
    (model_dir / "tfidf_svm.json").write_text(json.dumps({
        "vectorizer": VECTORIZER, "classes": [label_names[int(c)] for c in svm.classes_],
        "vocabulary": vocabulary}) + "\n")


if __name__ == "__main__":
    run_cli(main, default_config=str(DEFAULT_CONFIG))
