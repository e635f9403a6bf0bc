"""Every bad input a user can give the text recipe: one line on stderr, exit code 2, no traceback, nothing written.

The table in docs/bad_inputs.md lists the same cases with what the user sees: regenerate it with
`python tests/test_bad_inputs.py`; `test_table_matches_cases` keeps them in sync.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from peftlab.config import run_cli
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


def error_line(arguments: list[str], tmp: Path) -> tuple[int, list[str]]:
    """Run the recipe's CLI in-process on `arguments`; its exit code and its `error:` lines."""
    import contextlib
    import io

    argv = [a.replace("{tmp}", str(tmp)) for a in arguments]
    if not any(a.startswith("output_dir=") for a in argv):
        argv.append(f"output_dir={tmp}/run")
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            run_cli(recipe.main, [*FAST, *argv], default_config=str(recipe.DEFAULT_CONFIG))
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
    ("output folder holds a finished run", ["output_dir={tmp}/finished"], "holds a finished run"),
    ("overwrite a folder peftlab did not make", ["output_dir={tmp}/notes", "overwrite=true"],
     "is not a peftlab run folder"),
    ("output folder not writable", ["output_dir=/proc/peftlab-run"], "is not writable"),
    ("resume with nothing to resume", ["resume_from=latest", "output_dir={tmp}/fresh"], "holds no run to resume"),
    ("negative seed", ["train.seed=-1"], "train.seed: must be in [0, 2**32)"),
    ("unknown metric for best", ["train.metric_for_best=f1"], "did you mean 'macro_f1'"),
    ("max_length over the model's limit", ["data.max_length=100000"], "set data.max_length=512 or less"),
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
    table = (ROOT / "docs" / "bad_inputs.md").read_text()
    for case_id, _, _ in CASES:
        assert f"| {case_id} |" in table, f"docs/bad_inputs.md lacks a row for {case_id!r}"


def write_table(path: Path = ROOT / "docs" / "bad_inputs.md") -> None:
    """Regenerate docs/bad_inputs.md from CASES, with the messages users actually see."""
    import tempfile

    tmp = write_files(Path(tempfile.mkdtemp()))
    rows = ["# Bad inputs and what the user sees", "",
            "Each row is a case of `tests/test_bad_inputs.py`, run through `recipes/text_classification.py`. Every one",
            "exits with code 2, prints exactly one `error:` line (no traceback; add `--debug` to see it) and writes",
            "nothing. Paths under the test's temporary folder show as `<tmp>`. Regenerate: `python tests/test_bad_inputs.py`.",
            "", "| case | arguments | what the user sees |", "|---|---|---|"]
    for case_id, arguments, _ in CASES:
        _, lines = error_line(arguments, tmp)
        shown = " ".join(arguments).replace("{tmp}", "<tmp>")
        rows.append(f"| {case_id} | `{shown}` | {lines[0].replace(str(tmp), '<tmp>').replace('|', '/')} |")
    path.write_text("\n".join(rows) + "\n")


if __name__ == "__main__":
    import os

    os.environ["HF_HUB_OFFLINE"] = "1"
    write_table()
