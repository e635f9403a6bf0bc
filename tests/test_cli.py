"""The `peftlab` console script: `peftlab <command>` runs the command module's main with the rest of the arguments."""

from __future__ import annotations

import pytest

from peftlab import cli


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in cli.COMMANDS)


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([])
    assert exit_.value.code == 2 and "usage: peftlab <command>" in capsys.readouterr().out


def test_unknown_command_is_one_line_with_a_guess(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["prdict", "run"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "did you mean 'predict'?" in err


def test_command_gets_the_remaining_arguments(monkeypatch):
    import peftlab.predict

    seen = []
    monkeypatch.setattr(peftlab.predict, "main", lambda argv: seen.append(argv))
    cli.main(["predict", "outputs/run", "a text", "--file", "x.txt"])
    assert seen == [["outputs/run", "a text", "--file", "x.txt"]]


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_every_command_module_has_main(command):
    import importlib

    assert callable(importlib.import_module(cli.COMMANDS[command][0]).main)


NOISE = ("LOAD REPORT", "FutureWarning", "kernels", "Loading weights", "Map:")


def run_tiny_recipe(tmp_path, *extra: str) -> str:
    import subprocess
    import sys
    from pathlib import Path

    from tests.test_predict import TEXT_FAST

    root = Path(__file__).parents[1]
    result = subprocess.run([sys.executable, str(root / "recipes" / "text_classification.py"), *TEXT_FAST,
                             f"output_dir={tmp_path / 'run'}", *extra],
                            capture_output=True, text=True, timeout=600, cwd=root)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout + result.stderr


def test_default_console_shows_only_what_matters(tmp_path):
    output = run_tiny_recipe(tmp_path)
    assert not [word for word in NOISE if word in output], output
    assert "lora on minilm: trainable" in output and "test accuracy" in output


@pytest.mark.slow
def test_debug_shows_the_third_party_notices(tmp_path):
    output = run_tiny_recipe(tmp_path, "--debug")
    assert "LOAD REPORT" in output and "classifier.weight" in output  # transformers' report of the new head
