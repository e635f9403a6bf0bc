"""Every bad input a user can give the text recipe: one line on stderr, exit code 2, no traceback, nothing written.

The table in docs/bad_inputs.md lists the same cases with what the user sees: regenerate it with
`python -m tests.test_bad_inputs`; `test_table_matches_cases` keeps them in sync.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from peftlab.cli import run_cli
from peftlab.run_folder import FINISHED, write_marker

ROOT = Path(__file__).parents[1]
RECIPE = ROOT / "recipes" / "text_classification.py"
FAST = ["model.num_hidden_layers=1", "data.max_train_samples=32", "data.max_eval_samples=16", "train.max_steps=2"]

spec = importlib.util.spec_from_file_location("text_recipe_for_errors", RECIPE)
recipe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(recipe)


def write_files(tmp_path: Path) -> Path:
    (tmp_path / "reviews.csv").write_text("review,label\n" + "good,1\nbad,0\n" * 10)
    (tmp_path / "one_label.csv").write_text("text,label\n" + "good,pos\nfine,pos\n" * 10)
    (tmp_path / "empty.csv").write_text("text,label\n")
    (tmp_path / "fractional.csv").write_text("text,label\n" + "good,1\nbad,0.5\n" * 10)
    (tmp_path / "numeric_text.csv").write_text("text,label\n" + "".join(f"{i},{'pos' if i % 2 else 'neg'}\n"
                                                                        for i in range(7, 30)))
    (tmp_path / "test_only").mkdir()
    (tmp_path / "test_only" / "train.csv").write_text("text,label\n" + "good,pos\nbad,neg\n" * 10)
    (tmp_path / "test_only" / "test.csv").write_text("text,label\n" + "good,pos\nbad,neg\nso-so,meh\n")
    (tmp_path / "broken.yaml").write_text("train: {lr: [1e-3\n")
    (tmp_path / "finished").mkdir()
    (tmp_path / "finished" / "metrics.json").write_text("{}")
    write_marker(tmp_path / "finished", FINISHED)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "notes.txt").write_text("keep")
    return tmp_path


@pytest.fixture
def files(tmp_path):
    return write_files(tmp_path)


def error_line(arguments: list[str], tmp: Path, of_recipe=recipe, fast: list[str] = FAST) -> tuple[int, list[str]]:
    """Run a recipe's CLI (the text recipe's by default) in-process on `arguments`; its exit code and `error:` lines."""
    import contextlib
    import io

    argv = [a.replace("{tmp}", str(tmp)) for a in arguments]
    if not any(a.startswith("output_dir=") for a in argv):
        argv.append(f"output_dir={tmp}/run")
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            run_cli(of_recipe.main, [*fast, *argv], default_config=str(of_recipe.DEFAULT_CONFIG))
            code = 0
        except SystemExit as exit_info:
            code = exit_info.code
    return code, [line for line in stderr.getvalue().splitlines() if line.startswith("error: ")]


# (id, arguments, a fragment of the one-line message). `{tmp}` is the test's folder.
CASES = [
    ("unknown key", ["train.learning_rate=1e-3"], "train.learning_rate"),
    ("wrong type", ["train.epochs=three"], "train.epochs: expected int"),
    ("bad choice", ["train.optimizer=adam"], "train.optimizer: expected one of adamw, sgd"),
    ("non-positive lr", ["train.lr=-1"], "train.lr"),
    ("split fractions", ["data.validation_fraction=0.6", "data.test_fraction=0.5"], "must be < 1"),
    ("malformed override", ["train.lr"], "train.lr"),
    ("unknown flag", ["--lr", "0.1"], "unknown flag '--lr'"),
    ("missing config file", ["--config", "{tmp}/nope.yaml"], "nope.yaml"),
    ("broken config YAML", ["--config", "{tmp}/broken.yaml"], "broken.yaml"),
    ("unknown strategy", ["strategy=lorra"], "unknown strategy 'lorra'"),
    ("bad strategy option", ["strategy_options.lora.rank=8"], "has no option 'rank'"),
    ("LoRA targets match nothing", ["strategy_options.lora.target_modules=[qkv_nope]"], "match no module"),
    ("quantized full fine-tuning", ["strategy=full", "model.quantization=8bit"], "cannot train quantized weights"),
    ("fp16 on CPU", ["train.mixed_precision=fp16"], "fp16 needs a CUDA GPU"),
    ("tracker not installed", ["train.trackers=[wandb]"], "tracker 'wandb' is not installed"),
    ("missing model folder", ["model.name=./no/such/model"], "no/such/model"),
    ("image backbone for text", ["model.name=efficientnet-lite0"], "is a backbone for image tasks"),
    ("head module not found", ["model.head_modules=[cls_head]"], "cls_head"),
    ("too many layers", ["model.num_hidden_layers=99"], "num_hidden_layers"),
    ("missing data file", ["data.name={tmp}/missing.csv"], "missing.csv"),
    ("missing text column", ["data.name={tmp}/reviews.csv"], "review"),
    ("empty dataset", ["data.name={tmp}/empty.csv"], "empty"),
    ("a single label", ["data.name={tmp}/one_label.csv"], "fewer than 2 distinct labels"),
    ("fractional label id", ["data.name={tmp}/fractional.csv"], "0.5"),
    ("a text that is a number", ["data.name={tmp}/numeric_text.csv"],
     "data row 1 (counting from 1, header line not counted) has text 7"),
    ("label only in test", ["data.name={tmp}/test_only"], "['meh'] in its test split but not in the train split"),
    ("output folder holds a finished run", ["output_dir={tmp}/finished"], "holds a finished run"),
    ("overwrite a folder peftlab did not make", ["output_dir={tmp}/notes", "overwrite=true"],
     "is not a peftlab run folder"),
    ("output folder not writable", ["output_dir=/proc/peftlab-run"], "is not writable"),
    ("resume with nothing to resume", ["resume_from=latest", "output_dir={tmp}/fresh"], "holds no run to resume"),
    ("negative seed", ["train.seed=-1"], "train.seed: must be in [0, 2**32)"),
    ("unknown metric for best", ["train.metric_for_best=f1"], "did you mean 'macro_f1'"),
    ("max_length over the model's limit", ["data.max_length=100000"], "set data.max_length=512 or less"),
    ("LoRA+ without LoRA", ["strategy=full", "train.loraplus_ratio=4"], "sets the rate of LoRA's B matrices"),
    ("layer decay without trained blocks", ["train.layer_decay=0.8"], "strategy 'lora' trains the groups lora_A"),
    ("frozen batch norms on a transformer", ["model.batchnorm=frozen"], "the model has no batch norms"),
    ("a fold without cross-validation", ["data.cv_fold=1"], "data.cv_fold applies to k-fold cross-validation only"),
    ("a fold past the folds", ["data.cv_folds=3", "data.cv_fold=3"], "between 0 and 2, got 3"),
    ("more folds than the recipe pools", ["data.cv_folds=100", "data.cv_fold=0"],
     "pools only 48 train and validation examples; use at most 48 folds"),
]


@pytest.mark.parametrize("case_id,arguments,fragment", CASES, ids=[c[0] for c in CASES])
def test_one_line_error(case_id, arguments, fragment, files, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, err_lines = error_line(arguments, files)
    assert code == 2
    assert len(err_lines) == 1, err_lines
    assert fragment.replace("{tmp}", str(files)) in err_lines[0], err_lines[0]
    assert not (files / "run").exists(), "a rejected run must write nothing"
    assert (files / "notes" / "notes.txt").read_text() == "keep" and len(list((files / "notes").iterdir())) == 1


def test_cli_exit_code_and_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, str(RECIPE), "train.optimizer=adam", f"output_dir={tmp_path}/run"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: train.optimizer")
    debug = subprocess.run([sys.executable, str(RECIPE), "--debug", "train.optimizer=adam"],
                           capture_output=True, text=True, timeout=120)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_table_matches_cases():
    from tests.test_image_recipe import BAD_DATA_CASES
    from tests.test_predict import CASES as PREDICT_CASES
    from tests.test_run_folder import RESUME_CASES
    from tests.test_cv import CV_CASES

    table = (ROOT / "docs" / "bad_inputs.md").read_text()
    for case_id in [case[0] for case in [*CASES, *BAD_DATA_CASES, *PREDICT_CASES, *RESUME_CASES, *CV_CASES]]:
        assert f"| {case_id} |" in table, f"docs/bad_inputs.md lacks a row for {case_id!r}"


def write_table(path: Path = ROOT / "docs" / "bad_inputs.md") -> None:
    """Regenerate docs/bad_inputs.md from the case tables, with the messages users actually see.

    Tables: CASES here (text recipe), BAD_DATA_CASES of tests/test_image_recipe.py (image recipe), CASES of
    tests/test_predict.py (predict, on runs trained for the purpose in a few seconds), RESUME_CASES of
    tests/test_run_folder.py (resuming a damaged run) and CV_CASES of tests/test_cv.py (`peftlab cv`).
    """
    import tempfile

    from tests import test_cv, test_image_recipe, test_predict, test_run_folder

    tmp = write_files(Path(tempfile.mkdtemp()))
    test_image_recipe.write_bad_folders(tmp)
    test_predict.write_inputs(tmp)
    runs = test_predict.train_runs(tmp / "runs")

    def row(case_id: str, arguments: list[str], line: str) -> str:
        shown = " ".join(arguments).replace("{tmp}", "<tmp>")
        line = line.replace(str(tmp), "<tmp>").replace(str(Path.cwd()), "<cwd>").replace("|", "/")
        return f"| {case_id} | {f'`{shown}`' if shown else '(the same command)'} | {line} |"

    header = ["| case | arguments | what the user sees |", "|---|---|---|"]
    rows = ["# Bad inputs and what the user sees", "",
            "Each row is a case of the tests named above its table. Every one exits with code 2, prints exactly one",
            "`error:` line (no traceback; add `--debug` to a recipe to see it) and writes nothing. Paths under the",
            "test's temporary folder show as `<tmp>`, the working folder as `<cwd>`. Regenerate all tables:",
            "`python -m tests.test_bad_inputs`.", "",
            "## Text recipe", "", "`recipes/text_classification.py`, cases of `tests/test_bad_inputs.py`.", "",
            *header]
    rows += [row(case_id, arguments, error_line(arguments, tmp)[1][0]) for case_id, arguments, _ in CASES]
    rows += ["", "## Image recipe", "", "`recipes/image_classification.py`, BAD_DATA_CASES of "
             "`tests/test_image_recipe.py`.", "", *header]
    rows += [row(case_id, [f"data.name={{tmp}}/{folder}"], test_image_recipe.bad_data_error(folder, tmp)[1][0])
             for case_id, folder, _ in test_image_recipe.BAD_DATA_CASES]
    rows += ["", "## Predict", "", "`peftlab predict RUN_DIR ...`, cases of `tests/test_predict.py`; "
             "`<run>` is a LoRA run folder,", "damaged as the case says.", "", *header]
    for case in test_predict.CASES:
        argv, run = test_predict.case_arguments(case, runs, tmp)
        line = test_predict.predict_error(argv)[1][0].replace(str(run), "<run>")
        rows.append(row(case[0], ["<run>", *case[3]], line))
    rows += ["", "## Resuming a run", "", "`recipes/text_classification.py` on a finished run whose latest checkpoint "
             "is damaged as the case says,", "RESUME_CASES of `tests/test_run_folder.py`. The run's checkpoints are "
             "left as they were.", "", *header]
    trained = test_run_folder.train_tiny_run(tmp / "trained" / "run")
    for number, case in enumerate(test_run_folder.RESUME_CASES):
        _, lines, run = test_run_folder.resume_error(case, trained, tmp / f"resume-{number}")
        rows.append(row(case[0], [a.replace(str(tmp), "{tmp}") for a in case[2]], lines[0].replace(str(run), "<run>")))
    rows += ["", "## Cross-validation", "", "`peftlab cv text ...` on a CSV of 60 texts, CV_CASES of "
             "`tests/test_cv.py`.", "", *header]
    test_cv.write_cv_files(tmp)
    rows += [row(case_id, arguments, test_cv.cv_error(arguments, tmp)[1][0])
             for case_id, arguments, _ in test_cv.CV_CASES]
    rows += ["", "## Stops", "", "Not bad input, but what the user sees (tests in `tests/test_run_folder.py` and "
             "`tests/test_checkpointing.py`):", "",
             "- SIGTERM or Ctrl-C during training: `interrupted: SIGTERM at step 12, checkpoint <run>/checkpoints/"
             "step-12 saved; resume with: python recipes/text_classification.py ... resume_from=latest` (exit 143 or "
             "130).",
             "- A checkpoint save that fails: `error: could not write checkpoint step-6 in <run>/checkpoints (no space "
             "left on device); the previous checkpoint <run>/checkpoints/step-3 is intact; free space, then resume "
             "with resume_from=latest` (exit 2)."]
    path.write_text("\n".join(rows) + "\n")


if __name__ == "__main__":
    import os

    os.environ["HF_HUB_OFFLINE"] = "1"
    write_table()
