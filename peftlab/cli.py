"""Command lines: the `peftlab` console script (`peftlab <command> ...`) and the recipes' `key=value` command line.

    peftlab predict RUN_DIR "a gripping film"      # each command is also `python -m peftlab.<command>`
    python recipes/text_classification.py [--config x.yaml] [--debug] [key=value ...]

Each command is a module of peftlab with `main(argv)`; add one to COMMANDS to make it a subcommand. The typed config
itself (schema, YAML and override loading) is `peftlab.config`'s; this module only turns arguments into it.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import importlib
import inspect
import json
import os
import shlex
import signal
import sys
import textwrap
import threading
import typing
from typing import Any, Callable, Optional

from peftlab.config import RecipeConfig, load_config
from peftlab.console import quiet_third_party
from peftlab.errors import PeftlabError
from peftlab.typed import describe_type

# `peftlab <command>`: the module whose main(argv) runs it, and one line for `peftlab --help`.
COMMANDS: dict[str, tuple[str, str]] = {
    "predict": ("peftlab.predict", "label texts, images or a file of them with a trained run"),
    "serve": ("peftlab.serve", "serve a run over HTTP (FastAPI): /predict, /metadata, /health and a page to try it"),
    "tune": ("peftlab.tune", "search a recipe's hyper-parameters with Optuna, on one machine or many"),
    "cv": ("peftlab.cv", "k-fold cross-validation of a recipe: a run per fold, out-of-fold predictions, mean ± std"),
    "fuse": ("peftlab.fuse", "ensemble or average (model soup) fine-tuned runs into one run folder"),
    "export": ("peftlab.export", "export a run to one ONNX graph (pooling, head inside), checked; optional int8"),
}


def main(argv: Optional[list[str]] = None) -> None:
    """`peftlab <command> [args...]`: run the command's `main(args)`; `peftlab --help` lists the commands."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        width = max(map(len, COMMANDS))
        print("usage: peftlab <command> [args...]   (`peftlab <command> --help` for its options)\n\ncommands:")
        for name, (_, summary) in COMMANDS.items():
            print(f"  {name:<{width}}  {summary}")
        sys.exit(0 if argv else 2)
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        close = difflib.get_close_matches(command, COMMANDS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        print(f"error: unknown command {command!r}{hint} (commands: {', '.join(COMMANDS)})", file=sys.stderr)
        sys.exit(2)
    quiet_third_party(debug="--debug" in rest)
    module = importlib.import_module(COMMANDS[command][0])
    sys.argv = [f"peftlab {command}", *rest]  # so the command's --help and messages name it as typed
    module.main(rest)


# --------------------------------------------------------------------------------------------------------------------
# Recipe command line: `python recipes/<task>.py [--config x.yaml] [--debug] [key=value ...]`
# --------------------------------------------------------------------------------------------------------------------

_FLAGS = "--config PATH, --debug, --help"


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass (the string literal under each field), read from its source with `ast`."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source file (e.g. defined in a REPL): no help text, not an error
        return {}
    body = ast.parse(source).body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def config_help(cls: type = RecipeConfig, prefix: str = "") -> str:
    """One entry per config key: `key: type = default`, then its docstring indented below."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            if prefix.endswith("]."):  # a section inside a list item (a task's data): documented at the top level
                lines.append(f"  {prefix}{f.name}.*: as {f.name}.*")
                if f.name in field_docs(cls):
                    lines.append(f"      {field_docs(cls)[f.name]}")
            else:
                lines.append(config_help(hint, f"{prefix}{f.name}."))
            continue
        item = typing.get_args(hint)[0] if typing.get_origin(hint) is list and typing.get_args(hint) else None
        if item is not None and dataclasses.is_dataclass(item):  # a list of sections: each item's keys below it
            lines.append(f"  {prefix}{f.name}: list of mappings = []")
            if f.name in field_docs(cls):
                lines.append(f"      {field_docs(cls)[f.name]}")
            lines.append(config_help(item, f"{prefix}{f.name}[i]."))
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        lines.append(f"  {prefix}{f.name}: {describe_type(hint)} = {json.dumps(default)}")
        if f.name in field_docs(cls):
            lines.append(f"      {field_docs(cls)[f.name]}")
    return "\n".join(lines)


def recipe_help(prog: str, default_config: Optional[str] = None) -> str:
    """The `--help` text of a recipe: usage, flags, then every config key with its type, default and docstring."""
    return "\n".join([
        f"usage: {prog} [--config PATH] [--debug] [--help] [key=value ...]",
        "",
        "options:",
        f"  --config PATH  recipe YAML; key=value overrides apply on top (default: {default_config or 'none'})",
        "  --debug        show full tracebacks instead of one-line errors",
        "  -h, --help     show this help and exit",
        "",
        "config keys (`key: type = default`); override any with key=value, e.g. train.lr=1e-3 strategy=full:",
        config_help(RecipeConfig),
    ])


def parse_recipe_args(
    argv: Optional[list[str]] = None, default_config: Optional[str] = None
) -> tuple[RecipeConfig, bool]:
    """Parse `[--config PATH] [--debug] [--help] [key=value ...]` into (config, debug); `--help` prints and exits 0.

    Args:
        argv: the arguments after the program name (default: `sys.argv[1:]`).
        default_config: the YAML loaded when no `--config` is given (None: the dataclass defaults).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if "-h" in argv or "--help" in argv:
        print(recipe_help(os.path.basename(sys.argv[0]) or "recipe", default_config))
        sys.exit(0)
    config_path, debug, overrides = default_config, False, []
    args = iter(argv)
    for arg in args:
        if arg == "--debug":
            debug = True
        elif arg == "--config" or arg.startswith("--config="):
            config_path = arg.partition("=")[2] if "=" in arg else next(args, None)
            if not config_path:
                raise PeftlabError("--config needs a path to a YAML file, e.g. --config recipes/configs/x.yaml")
        elif arg.startswith("-"):
            raise PeftlabError(f"unknown flag {arg!r}; the flags are {_FLAGS}, and overrides are key=value")
        else:
            overrides.append(arg)
    return load_config(config_path, overrides), debug


def run_cli(
    main: Callable[[RecipeConfig], Any], argv: Optional[list[str]] = None, default_config: Optional[str] = None
) -> Any:
    """Run a recipe's `main(cfg)` from the command line; a PeftlabError prints as `error: <message>` and exits 2.

    A run stopped by SIGTERM or Ctrl-C prints one line with the command that resumes it and exits 128 + the signal's
    number. Any other exception is a bug: its traceback shows and the exit code is 1, never 2. With `--debug` a
    PeftlabError is re-raised too, so its traceback shows.
    """
    from peftlab import run_folder
    from peftlab.errors import RunInterrupted

    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv  # known before parsing, so a bad config can show its traceback too
    quiet_third_party(debug)
    previous_sigterm = sigterm_raises_keyboard_interrupt()
    try:
        cfg, debug = parse_recipe_args(argv, default_config)
        return main(cfg)
    except PeftlabError as err:
        message = " ".join(str(err).split())
        run_folder.close_all_run_folders(run_folder.FAILED, message)
        if debug:
            raise
        print("error: " + message, file=sys.stderr)
        sys.exit(2)
    except RunInterrupted as stop:
        run_folder.close_all_run_folders(run_folder.INTERRUPTED, str(stop))
        _print_once(f"interrupted: {stop}; resume with: {_resume_command(argv)}")
        sys.exit(128 + (signal.SIGINT if stop.signal_name == "SIGINT" else signal.SIGTERM))
    except KeyboardInterrupt:
        closed = run_folder.close_all_run_folders(run_folder.INTERRUPTED, "interrupted before the first checkpoint")
        _print_once("interrupted before training saved anything" + (f" (the folder {closed[0]} is reused by the "
                    "same command)" if closed else "") + "; rerun the same command to start again")
        sys.exit(128 + signal.SIGINT)
    except BaseException as err:
        if not isinstance(err, SystemExit):
            run_folder.close_all_run_folders(run_folder.FAILED, f"internal error {type(err).__name__}")
        raise
    finally:
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)


def sigterm_raises_keyboard_interrupt():
    """Make SIGTERM raise KeyboardInterrupt, as Ctrl-C does; returns the previous handler to restore (None when this
    is not the main thread, which alone may set handlers)."""
    # Outside the training loop (which saves a checkpoint first, see peftlab.training.StopSignal) SIGTERM ends the run
    # like Ctrl-C, so the folder is marked and the user gets a line, not a silent kill.
    def handler(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        return None  # only the main thread may set handlers (a recipe run from a worker thread keeps the default)
    return signal.signal(signal.SIGTERM, handler)


def _resume_command(argv: list[str]) -> str:
    """The command line that continues this run: the same arguments plus resume_from=latest."""
    kept = [a for a in argv if not a.startswith(("resume_from=", "overwrite="))]
    launcher = "accelerate launch" if "LOCAL_RANK" in os.environ else "python"
    return " ".join(shlex.quote(a) for a in [*launcher.split(), sys.argv[0], *kept, "resume_from=latest"])


def _print_once(line: str) -> None:
    # One line per run, not one per process of a multi-process launch.
    if os.environ.get("RANK", "0") == "0":
        print(line, file=sys.stderr)


if __name__ == "__main__":
    main()
