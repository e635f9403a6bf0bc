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
