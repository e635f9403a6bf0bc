"""`python -m peftlab.predict` on damaged run folders and on inputs it cannot label: one `error:` line, exit code 2.

CASES is also rendered into docs/bad_inputs.md by `python -m tests.test_bad_inputs`.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from peftlab.config import load_config
from peftlab.predict import main as predict_main
from tests import bad_images

ROOT = Path(__file__).parents[1]
TEXT_FAST = ["model.num_hidden_layers=1", "data.max_train_samples=32", "data.max_eval_samples=16",
             "train.max_steps=1", "train.batch_size=16", "train.mixed_precision=no", "train.trackers=[jsonl]"]
IMAGE_FAST = ["data.image_size=16", "data.validation_fraction=0.25", "data.test_fraction=0.25",
              "data.max_train_samples=null", "data.max_eval_samples=null", "train.max_steps=1", "train.batch_size=4",
              "train.eval_batch_size=4", "train.mixed_precision=no", "train.trackers=[jsonl]"]


def run_recipe(name: str, overrides: list[str]) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{name}_for_predict", ROOT / "recipes" / f"{name}.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    recipe.main(load_config(str(recipe.DEFAULT_CONFIG), overrides))


def train_runs(folder: Path) -> dict[str, Path]:
    """A one-step LoRA text run (MiniLM, one layer) and image run (a tiny random ViT on 3 x 4 images) in `folder`."""
    from transformers import ViTConfig, ViTForImageClassification

    run_recipe("text_classification", [*TEXT_FAST, f"output_dir={folder / 'text_run'}"])
    vit = folder / "tiny_vit"
    ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=37, image_size=16, patch_size=4)).save_pretrained(vit)
    for label, name in enumerate(["cat", "dog", "owl"]):
        for i in range(4):
            path = folder / "images" / name / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (20, 20), (80 * label, 60 * i, 100)).save(path)
    run_recipe("image_classification", [*IMAGE_FAST, f"model.name={vit}", f"data.name={folder / 'images'}",
                                        f"output_dir={folder / 'image_run'}"])
    return {"text": folder / "text_run", "image": folder / "image_run"}


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def write_inputs(tmp: Path) -> None:
    """The input files the cases name: a binary --file, a truncated JPEG, a decompression bomb."""
    (tmp / "inputs.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    bad_images.write_truncated_jpeg(tmp / "truncated.jpg")
    bad_images.write_decompression_bomb(tmp / "bomb.png")
    (tmp / "reviews.csv").write_text("text,stars\ngreat,5\ndull,1\n", encoding="utf-8")


# (id, run, how the run folder is damaged (a file in it and what is done to that file) or None, arguments after
# the run folder, a fragment of the one-line message). `{tmp}` is the test's folder, `{run}` the run folder.
CASES = [
    ("truncated weights file", "text", ("model/adapter_model.safetensors", truncate), ["great"],
     "{run}/model/adapter_model.safetensors is damaged (Error while deserializing header"),
    ("missing weights file", "text", ("model/adapter_model.safetensors", Path.unlink), ["great"],
     "{run}/model holds no weights file (*.safetensors)"),
    ("broken task.json", "text", ("model/task.json", lambda p: p.write_text('{"task": ')), ["great"],
     "{run}/model/task.json is damaged (Expecting value"),
    ("broken strategy JSON", "text", ("model/peftlab_strategy.json", lambda p: p.write_text("{")), ["great"],
     "{run}/model/peftlab_strategy.json is damaged"),
    ("missing strategy file", "text", ("model/peftlab_strategy.json", Path.unlink), ["great"],
     "holds no peftlab_strategy.json"),
    ("broken config.yaml", "text", ("config.yaml", lambda p: p.write_text("model: [")), ["great"],
     "{run}/config.yaml is not valid YAML"),
    ("binary --file", "text", None, ["--file", "{tmp}/inputs.txt"], "is not UTF-8 text"),
    ("image path to a text run", "text", None, ["{tmp}/truncated.jpg"], "looks like an image file, but run"),
    ("text to an image run", "image", None, ["a cute cat"], "'a cute cat' is not an image file, and run"),
    ("truncated JPEG", "image", None, ["{tmp}/truncated.jpg"], "truncated.jpg' is not a readable image"),
    ("decompression bomb", "image", None, ["{tmp}/bomb.png"], "bomb.png' is too large to decode safely"),
    ("data file without the input column", "text", None, ["--file", "{tmp}/reviews.csv", "--column", "review"],
     "reviews.csv has no column 'review' (--column); its columns are text, stars"),
    ("missing --id-column", "text", None, ["--file", "{tmp}/reviews.csv", "--id-column", "key"],
     "has no column 'key' (--id-column)"),
    ("--output is a folder", "text", None, ["great", "--output", "{tmp}"], "is a folder; give a file path"),
    ("--batch-size 0", "text", None, ["great", "--batch-size", "0"], "--batch-size must be at least 1"),
]


def case_arguments(case: tuple, runs: dict[str, Path], tmp: Path) -> tuple[list[str], Path]:
    """The command-line arguments of a case, and its run folder (a damaged copy when the case damages one)."""
    case_id, kind, damage, arguments, _ = case
    run = runs[kind]
    if damage is not None:
        copy = tmp / case_id.replace(" ", "_")
        shutil.copytree(run, copy)
        file, action = damage
        action(copy / file)
        run = copy
    return [str(run), *(a.replace("{tmp}", str(tmp)) for a in arguments)], run


def run_main(main, argv: list[str]) -> tuple[int, str, str]:
    """Run a command's `main(argv)` in-process: exit code, stdout, stderr."""
    stderr, stdout = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
        try:
            main(argv)
            code = 0
        except SystemExit as exit_info:
            code = exit_info.code
    return code, stdout.getvalue(), stderr.getvalue()


def predict_error(argv: list[str]) -> tuple[int, list[str], str]:
    """Run predict's CLI in-process: exit code, `error:` lines on stderr, stdout."""
    return run_in_process(predict_main, argv)


def run_in_process(main, argv: list[str]) -> tuple[int, list[str], str]:
    """Run a command's `main(argv)` in-process: exit code (0 when it returns), `error:` lines on stderr, stdout."""
    code, stdout, stderr = run_main(main, argv)
    return code, [line for line in stderr.splitlines() if line.startswith("error: ")], stdout


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    return train_runs(tmp_path_factory.mktemp("runs"))


@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_one_line_error(case, runs, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write_inputs(tmp_path)
    argv, run = case_arguments(case, runs, tmp_path)
    code, err_lines, stdout = predict_error(argv)
    assert code == 2 and stdout == ""
    assert len(err_lines) == 1, err_lines
    assert case[4].replace("{run}", str(run)) in err_lines[0], err_lines[0]


def test_good_inputs_still_label(runs, tmp_path):
    bad_images.write_16bit_png(tmp_path / "wide.png")
    Image.new("RGB", (30, 20), (0, 200, 0)).save(tmp_path / "green.jpg")
    (tmp_path / "reviews.txt").write_text("a fine film\n\nsee it.png twice\n", encoding="utf-8")
    for argv, inputs in [([str(runs["text"]), "--file", str(tmp_path / "reviews.txt")],
                          ["a fine film", "see it.png twice"]),
                         ([str(runs["image"]), str(tmp_path / "wide.png"), str(tmp_path / "green.jpg")],
                          [str(tmp_path / "wide.png"), str(tmp_path / "green.jpg")])]:
        code, err_lines, stdout = predict_error(argv)
        assert code == 0 and not err_lines
        assert [json.loads(line)["input"] for line in stdout.splitlines()] == inputs


def test_cli_prints_no_traceback(runs, tmp_path):
    write_inputs(tmp_path)
    result = subprocess.run([sys.executable, "-m", "peftlab.predict", str(runs["image"]), str(tmp_path / "bomb.png")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "LOAD REPORT" not in result.stderr  # `python -m peftlab.predict` is as quiet as `peftlab predict`
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: '{tmp_path / 'bomb.png'}' is too large")


def test_data_file_to_predictions_csv(runs, tmp_path):
    import csv

    import peftlab

    texts = [f"review number {i}, {'great' if i % 2 else 'dull'}" for i in range(70)]  # two batches of 64
    (tmp_path / "reviews.jsonl").write_text("".join(json.dumps({"id": f"r{i}", "text": t}) + "\n"
                                                    for i, t in enumerate(texts)), encoding="utf-8")
    output = tmp_path / "out" / "predictions.csv"
    code, err_lines, stdout = predict_error([str(runs["text"]), "--file", str(tmp_path / "reviews.jsonl"),
                                             "--id-column", "id", "--output", str(output)])
    assert code == 0 and not err_lines and stdout == ""
    rows = list(csv.DictReader(output.open(encoding="utf-8")))
    run = peftlab.load(runs["text"])
    probabilities = run.probabilities(texts)
    assert [row["id"] for row in rows] == [f"r{i}" for i in range(70)]
    assert list(rows[0]) == ["id", "label", "score", *(f"p_{name}" for name in run.label_names)]
    for row, expected in zip(rows, probabilities.tolist()):
        assert row["label"] == run.label_names[max(range(len(expected)), key=expected.__getitem__)]
        assert [float(row[f"p_{name}"]) for name in run.label_names] == pytest.approx(expected, abs=1e-5)


def test_failed_labelling_leaves_no_output_file(runs, tmp_path):
    (tmp_path / "mixed.csv").write_text("text\na fine film\nposter.png\n", encoding="utf-8")
    output = tmp_path / "predictions.csv"
    code, err_lines, _ = predict_error([str(runs["text"]), "--file", str(tmp_path / "mixed.csv"),
                                        "--output", str(output)])
    assert code == 2 and "looks like an image file" in err_lines[0]
    assert list(tmp_path.iterdir()) == [tmp_path / "mixed.csv"]  # no predictions.csv, no temporary file
