"""k-fold cross-validation: the folds (data.cv_folds through the one splitting home), `peftlab cv` end to end on a
one-layer MiniLM, resuming, out-of-fold predictions, head-only feature sharing, and bad inputs."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from peftlab.config import load_config
from peftlab.cv import main as cv_main
from peftlab.data import load_data
from peftlab.data.image import load_image_dataset
from peftlab.data.text import load_text_dataset
from peftlab.errors import PeftlabError
from peftlab.run_folder import FAILED, INTERRUPTED, read_marker, write_marker
from tests.test_predict import run_in_process
from tests.tiny_train import reset_accelerate

@pytest.fixture(autouse=True)
def fresh_accelerate():
    # The folds run in this process: the next test file's runs must not inherit their accelerate state (precision).
    yield
    reset_accelerate()


TINY = ["model.num_hidden_layers=1", "train.max_steps=1", "train.batch_size=8", "train.eval_batch_size=16",
        "train.mixed_precision=no", "train.trackers=[jsonl]", "train.cpu_threads=1"]


def write_reviews(folder: Path, counts: dict[str, int], *, groups: int | None = None,
                  name: str = "reviews.csv") -> Path:
    """A CSV of distinct texts, `counts[label]` of each label, and with `groups` a group column (ids cycling)."""
    rows = [(f"review {i} says {label}", label) for label, n in counts.items() for i in range(n)]
    table = pd.DataFrame(rows, columns=["text", "label"])
    if groups:
        table["author"] = [f"a{i % groups}" for i in range(len(table))]
    folder.mkdir(parents=True, exist_ok=True)
    table.to_csv(folder / name, index=False)
    return folder / name


def folds_of(path: Path, k: int, **options):
    """The dataset of every fold of a k-fold split of `path`, and the plain split."""
    plain = load_text_dataset(str(path), **options)
    return plain, [load_text_dataset(str(path), cv_folds=k, cv_fold=fold, **options) for fold in range(k)]


def test_folds_are_disjoint_cover_the_pool_and_leave_test_untouched(tmp_path):
    path = write_reviews(tmp_path, {"good": 40, "bad": 25, "meh": 15})
    plain, folds = folds_of(path, 4)
    pool = list(plain.splits["train"]["text"]) + list(plain.splits["validation"]["text"])
    validated = [set(fold.splits["validation"]["text"]) for fold in folds]
    assert sum(map(len, validated)) == len(pool) and set().union(*validated) == set(pool)  # disjoint, cover the pool
    for fold, data in enumerate(folds):
        train = list(data.splits["train"]["text"])
        assert set(train).isdisjoint(validated[fold]) and len(train) + len(validated[fold]) == len(pool)
        # the plain split's test, untouched
        assert list(data.splits["test"]["text"]) == list(plain.splits["test"]["text"])
        assert data.label_names == plain.label_names
        # One assignment whichever fold is asked for; a fold's validation rows are its pool indices, ascending.
        np.testing.assert_array_equal(data.folds.fold_of, folds[0].folds.fold_of)
        assert list(data.splits["validation"]["text"]) == [pool[i] for i in data.folds.validation_indices(fold)]


def test_folds_are_stratified(tmp_path):
    counts = {"good": 40, "bad": 25, "meh": 15}
    plain, folds = folds_of(write_reviews(tmp_path, counts), 4)
    labels = np.asarray(list(plain.splits["train"]["label"]) + list(plain.splits["validation"]["label"]))
    for data in folds:
        validation = np.asarray(list(data.splits["validation"]["label"]))
        for label in range(len(counts)):
            share = (labels == label).sum() / 4  # StratifiedKFold: each fold holds floor or ceil of a class's share
            assert np.floor(share) <= (validation == label).sum() <= np.ceil(share)


def test_group_folds_keep_each_group_in_one_fold(tmp_path):
    path = write_reviews(tmp_path, {"good": 30, "bad": 30}, groups=9)
    table = pd.read_csv(path).set_index("text")
    folds = [load_text_dataset(str(path), cv_folds=3, cv_fold=fold, group_column="author") for fold in range(3)]
    fold_of_group: dict[str, set[int]] = {}
    for fold, data in enumerate(folds):
        assert "group" not in data.splits["train"].column_names  # groups decide the folds; the model never sees them
        for text in data.splits["validation"]["text"]:
            fold_of_group.setdefault(table.loc[text, "author"], set()).add(fold)
    assert all(len(found) == 1 for found in fold_of_group.values()), fold_of_group
    assert len(fold_of_group) == 9


def test_a_class_with_fewer_examples_than_folds_is_a_warning_naming_it(tmp_path):
    path = write_reviews(tmp_path, {"good": 30, "bad": 30, "rare": 3})
    with pytest.warns(UserWarning, match=r"class\(es\) 'rare' \(\d\) of .* fewer pooled examples than "
                                         r"data.cv_folds=5.*use at most \d folds"):
        data = load_text_dataset(str(path), cv_folds=5, cv_fold=0, test_fraction=0.05, validation_fraction=0.05)
    rare = data.label_names.index("rare")
    for fold in range(5):  # every fold still trains on it
        assert rare in data.folds.labels[data.folds.fold_of != fold]


def test_a_class_some_fold_would_train_without_is_an_error_naming_it(tmp_path):
    folder = tmp_path / "shipped"
    write_reviews(folder, {"good": 12, "bad": 12, "lonely": 1}, name="train.csv")
    write_reviews(folder, {"good": 4, "bad": 4}, name="validation.csv")
    write_reviews(folder, {"good": 4, "bad": 4, "lonely": 1}, name="test.csv")
    with pytest.raises(PeftlabError, match=r"class 'lonely' of .* has 1 pooled example\(s\), only one, so fold \d "
                                           r"would train without it.*remove or merge the class"):
        load_text_dataset(str(folder), cv_folds=3, cv_fold=0)
    clustered = write_reviews(tmp_path, {"good": 20, "bad": 20}, groups=8)
    table = pd.read_csv(clustered)
    table.loc[table["label"] == "bad", "author"] = "solo"  # every `bad` review by one author
    table.to_csv(clustered, index=False)
    with pytest.raises(PeftlabError, match="class 'bad' .* all in one group, so fold"):
        load_text_dataset(str(clustered), cv_folds=3, cv_fold=0, group_column="author")


@pytest.mark.parametrize("overrides, message", [
    (["data.cv_folds=1", "data.cv_fold=0"], "data.cv_folds: must be >= 2, got 1"),
    (["data.cv_fold=1"], "data.cv_fold applies to k-fold cross-validation only"),
    (["data.group_column=author"], "data.group_column applies to k-fold cross-validation only"),
    (["data.cv_folds=3"], "data.cv_folds=3 needs data.cv_fold, the fold that validates, between 0 and 2"),
    (["data.cv_folds=3", "data.cv_fold=3"], "between 0 and 2, got 3"),
])
def test_fold_settings_are_checked_when_the_config_loads(overrides, message):
    with pytest.raises(PeftlabError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, overrides)


def test_the_image_loader_folds_through_the_same_home(tmp_path):
    for label, name in enumerate(["cat", "dog", "owl"]):
        for i in range(6):
            image_path = tmp_path / "images" / name / f"{i}.png"
            image_path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (80 * label, 40 * i, 100)).save(image_path)
    cfg = load_config(None, [f"data.name={tmp_path / 'images'}", "data.cv_folds=3", "data.cv_fold=2"])
    data = load_data(cfg.data, task="image")
    plain = load_image_dataset(str(tmp_path / "images"))
    assert data.folds.k == 3 and len(data.folds.fold_of) == len(plain.splits["train"]) + len(plain.splits["validation"])
    assert len(data.splits["validation"]) == len(data.folds.validation_indices(2))
    assert len(data.splits["test"]) == len(plain.splits["test"])
    with pytest.raises(PeftlabError, match="image folder or packaged set, which has no columns"):
        load_image_dataset(str(tmp_path / "images"), cv_folds=3, cv_fold=0, group_column="author")


# ---------------------------------------------------------------------------------------------------------------------
# `peftlab cv` itself


def run_cv_cli(arguments: list[str]) -> tuple[int, str, list[str]]:
    """`peftlab cv` in-process: exit code (0 when it returned), stdout, and stderr's `error:` lines."""
    code, errors, stdout = run_in_process(cv_main, arguments)
    return code, stdout, errors


# (id, arguments after `peftlab cv text`, a fragment of the one-line message), on {tmp}/cv_reviews.csv (60 texts, 2
# labels, `write_cv_files`). Also rendered into docs/bad_inputs.md by `python -m tests.test_bad_inputs`.
CV_CASES = [
    ("one fold", ["--folds", "1"], "data.cv_folds: must be >= 2, got 1"),
    ("more folds than pooled examples", ["--folds", "500"],
     "data.cv_folds=500 but '{tmp}/cv_reviews.csv' pools only 54 train and validation examples; use at most 54"),
    ("unknown group column", ["--folds", "3", "data.group_column=author"],
     "has no group column 'author'; its columns are text, label"),
    ("group column is the label column", ["--folds", "3", "data.group_column=label"],
     "data.group_column='label' is also the label column"),
    ("folds not a number", ["--folds", "three"], "--folds needs a whole number of folds"),
    ("no number of folds", [], "give the number of folds: --folds K"),
    ("resume_from on a cross-validation", ["--folds", "3", "resume_from=/nowhere"],
     "a cross-validation continues by itself when rerun"),
]


def write_cv_files(tmp: Path) -> Path:
    write_reviews(tmp, {"good": 30, "bad": 30}, name="cv_reviews.csv")
    return tmp


def cv_error(arguments: list[str], tmp: Path) -> tuple[int, list[str]]:
    """`peftlab cv text` with a case's arguments on the tiny settings: exit code and `error:` lines."""
    code, _, errors = run_cv_cli(["text", *[a.replace("{tmp}", str(tmp)) for a in arguments], *TINY,
                                  f"data.name={tmp}/cv_reviews.csv", f"output_dir={tmp}/cv"])
    return code, errors


@pytest.mark.parametrize("case_id, arguments, message", CV_CASES, ids=[case[0] for case in CV_CASES])
def test_bad_cv_inputs_are_one_line_errors_before_any_work(tmp_path, case_id, arguments, message):
    code, errors = cv_error(arguments, write_cv_files(tmp_path))
    assert code == 2 and len(errors) == 1, errors
    assert message.replace("{tmp}", str(tmp_path)) in errors[0], errors[0]
    assert not (tmp_path / "cv").exists()


def test_a_cv_folder_refuses_a_single_run_and_a_changed_config(tmp_path):
    write_reviews(tmp_path, {"good": 30, "bad": 30})
    (tmp_path / "single").mkdir()
    write_marker(tmp_path / "single", FAILED)
    common = ["text", "--folds", "3", *TINY, f"data.name={tmp_path}/reviews.csv"]
    code, _, errors = run_cv_cli([*common, f"output_dir={tmp_path}/single"])
    assert code == 2 and "holds a single run, not a cross-validation" in errors[0]
    (tmp_path / "cv").mkdir()
    write_marker(tmp_path / "cv", INTERRUPTED, kind="cross-validation")
    (tmp_path / "cv" / "config.yaml").write_text((Path(__file__).parents[1] / "recipes" / "configs" /
                                                  "minilm_lora_rotten_tomatoes.yaml").read_text())
    code, _, errors = run_cv_cli([*common, f"output_dir={tmp_path}/cv"])
    assert code == 2 and f"{tmp_path}/cv holds a cross-validation with data.cv_folds=None, not 3" in errors[0]


@pytest.fixture(scope="module")
def finished_cv(tmp_path_factory) -> Path:
    """A 3-fold LoRA cross-validation of a one-layer MiniLM on 54 pooled texts, one optimizer step per fold."""
    tmp = tmp_path_factory.mktemp("cv")
    write_reviews(tmp, {"good": 36, "bad": 24, "meh": 12}, groups=12)
    arguments = ["text", "--folds", "3", *TINY, f"data.name={tmp}/reviews.csv", "data.group_column=author",
                 f"output_dir={tmp}/cv"]
    code, printed, errors = run_cv_cli(arguments)
    assert code == 0, errors
    (tmp / "arguments.json").write_text(json.dumps(arguments))
    (tmp / "printed.txt").write_text(printed)
    return tmp


def test_out_of_fold_predictions_have_one_row_per_pool_example(finished_cv):
    cv = finished_cv / "cv"
    folds, oof = pd.read_csv(cv / "folds.csv"), pd.read_csv(cv / "oof_predictions.csv")
    summary = json.loads((cv / "cv_metrics.json").read_text())
    assert len(oof) == len(folds) == summary["pool_size"] == 72 - summary["test_size"]
    assert oof["index"].tolist() == list(range(len(folds)))
    assert oof["fold"].tolist() == folds["fold"].tolist() and oof["label"].tolist() == folds["label"].tolist()
    probabilities = oof[["p_bad", "p_good", "p_meh"]].to_numpy()
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-4)
    assert (np.asarray(["bad", "good", "meh"])[probabilities.argmax(axis=1)] == oof["prediction"]).all()
    assert folds.groupby("group")["fold"].nunique().max() == 1  # the group column kept authors within one fold


def test_the_summary_averages_the_fold_runs(finished_cv):
    cv = finished_cv / "cv"
    summary = json.loads((cv / "cv_metrics.json").read_text())
    runs = [json.loads((cv / f"fold-{fold}" / "metrics.json").read_text()) for fold in range(3)]
    for split in ("validation", "test"):
        scores = [run[split]["accuracy"] for run in runs]
        assert summary[split]["accuracy"]["mean"] == pytest.approx(np.mean(scores))
        assert summary[split]["accuracy"]["std"] == pytest.approx(np.std(scores, ddof=1))
    matrix = np.asarray(summary["fold_averaged_confusion_matrix"])
    assert matrix.shape == (3, 3) and matrix.sum() == pytest.approx(summary["pool_size"] / 3, abs=0.02)
    assert (cv / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    assert read_marker(cv)["status"] == "finished" and read_marker(cv / "fold-0")["status"] == "finished"
    printed = (finished_cv / "printed.txt").read_text()
    assert "fold 2 (3/3): done in" in printed and "accuracy " in printed and "± " in printed


def copy_of(finished_cv: Path, tmp_path: Path) -> tuple[Path, list[str]]:
    """A copy of the finished cross-validation, and the command line that continues it."""
    shutil.copytree(finished_cv / "cv", tmp_path / "cv")
    arguments = json.loads((finished_cv / "arguments.json").read_text())
    return tmp_path / "cv", [a.replace(str(finished_cv / "cv"), str(tmp_path / "cv")) for a in arguments]


def file_times(folder: Path) -> dict[Path, int]:
    return {path: path.stat().st_mtime_ns for path in folder.rglob("*") if path.is_file()}


def test_rerun_keeps_finished_folds_without_retraining_them(finished_cv, tmp_path):
    cv, arguments = copy_of(finished_cv, tmp_path)
    folds = {fold: file_times(cv / f"fold-{fold}") for fold in range(3)}
    (cv / "oof_predictions.csv").unlink()
    code, printed, errors = run_cv_cli(arguments)
    assert code == 0, errors
    assert all(f"fold {fold} ({fold + 1}/3): finished earlier, kept" in printed for fold in range(3))
    assert "training on" not in printed
    assert {fold: file_times(cv / f"fold-{fold}") for fold in range(3)} == folds  # not one file written again
    assert len(pd.read_csv(cv / "oof_predictions.csv")) == len(pd.read_csv(cv / "folds.csv"))


def test_rerun_continues_a_fold_from_its_checkpoint_and_restarts_one_without(finished_cv, tmp_path):
    cv, arguments = copy_of(finished_cv, tmp_path)
    kept = file_times(cv / "fold-0")
    write_marker(cv / "fold-1", INTERRUPTED)  # stopped after its checkpoint: continues from it
    write_marker(cv / "fold-2", FAILED)  # failed before any checkpoint: starts over
    shutil.rmtree(cv / "fold-2" / "checkpoints")
    code, printed, errors = run_cv_cli(arguments)
    assert code == 0, errors
    assert "fold 0 (1/3): finished earlier, kept" in printed and file_times(cv / "fold-0") == kept
    assert "fold 1 (2/3): training on" in printed and "(continuing from its last checkpoint)" in printed
    assert "fold 2 (3/3): training on" in printed and "fold 2 (3/3): done in" in printed
    assert all(read_marker(cv / f"fold-{fold}")["status"] == "finished" for fold in range(3))
    assert (json.loads((cv / "fold-1" / "metrics.json").read_text())["validation"]
            == json.loads((finished_cv / "cv" / "fold-1" / "metrics.json").read_text())["validation"])


def test_head_only_cv_runs_the_frozen_backbone_once(tmp_path):
    write_reviews(tmp_path, {"good": 30, "bad": 30})
    code, printed, errors = run_cv_cli(["text", "--folds", "3", *TINY, "strategy=head", "train.max_steps=2",
                                        f"data.name={tmp_path}/reviews.csv", f"output_dir={tmp_path}/cv"])
    assert code == 0, errors
    summary = json.loads((tmp_path / "cv" / "cv_metrics.json").read_text())
    pool_and_test = summary["pool_size"] + summary["test_size"]
    assert summary["frozen_features"] == {"extracted": pool_and_test, "reused": 2 * pool_and_test}
    assert printed.count("taken from an earlier run's") == 2


def test_a_search_that_stops_after_a_fold_leaves_the_folders_marked_and_unlocked(tmp_path):
    import fcntl

    from peftlab.cv import run_cv

    write_reviews(tmp_path, {"good": 20, "bad": 20})
    default = Path(__file__).parents[1] / "recipes" / "configs" / "minilm_lora_rotten_tomatoes.yaml"
    cfg = load_config(str(default), [*TINY, f"data.name={tmp_path}/reviews.csv"])

    class Pruned(Exception):
        pass

    def prune(fold_result):
        raise Pruned(f"pruned after fold {fold_result.fold}")

    with pytest.raises(Pruned):
        run_cv(cfg, "text", 2, tmp_path / "cv", on_fold=prune, log=lambda line: None)
    cv = tmp_path / "cv"
    assert read_marker(cv)["status"] == "failed" and read_marker(cv)["reason"] == "pruned after fold 0"
    assert read_marker(cv / "fold-0")["status"] == "finished" and not (cv / "fold-1").exists()
    fd = os.open(cv / ".peftlab-lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # would raise BlockingIOError while this process held it
    finally:
        os.close(fd)
