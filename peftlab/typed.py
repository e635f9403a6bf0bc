"""Typed values from YAML: parse text, check a value against a type hint, describe types as users read them.

The level below both `peftlab.config` (recipe keys) and `peftlab.strategies` (strategy options): each checks its
values with `coerce_value`, so neither needs to import the other's checks.
"""

from __future__ import annotations

import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from peftlab.errors import PeftlabError


class _YamlLoader(yaml.SafeLoader):
    """`yaml.safe_load` rules plus YAML 1.2 floats: PyYAML (YAML 1.1) reads `1e-3` as the *string* "1e-3"."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
        |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    """YAML text as plain data (mappings, lists, scalars), with YAML 1.2 floats."""
    return yaml.load(text, Loader=_YamlLoader)  # a SafeLoader subclass: no arbitrary objects


def read_yaml_file(path: str | Path, what: str) -> tuple[str, Any]:
    """A YAML file's text and its data; a one-line PeftlabError naming `what` (e.g. "config file") and the path
    when it cannot be read or is not YAML."""
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise PeftlabError(f"cannot read {what} {path}: {err.strerror or err}") from err
    try:
        return text, parse_yaml(text)
    except yaml.YAMLError as err:
        raise PeftlabError(f"{what} {path} is not valid YAML: {yaml_problem(err)}") from err


@dataclass(frozen=True)
class Override:
    """The text of one `key=value` override, parsed once its field's type is known (see `resolve`)."""

    key: str
    text: str

    def parse(self) -> Any:
        try:
            return parse_yaml(self.text)
        except yaml.YAMLError as err:
            problem = yaml_problem(err)
            raise PeftlabError(f"{self.key}: cannot parse {self.text!r} as a YAML value ({problem})") from err


def yaml_problem(err: yaml.YAMLError) -> str:
    """What is wrong with YAML text, and where, in one line."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


def resolve(value: Any, hint: Any) -> Any:
    """Parse an override's text; a `str` field keeps the typed text where YAML would turn it into a bool/number/date."""
    if not isinstance(value, Override):
        return value
    parsed = value.parse()
    # `data.name=yes` or `output_dir=2024` mean the text, not True or 2024; quotes and null still work as in YAML.
    if _accepts_str(hint) and not isinstance(parsed, (str, list, dict, type(None))):
        return value.text
    return parsed


def _plain(value: Any) -> Any:
    """Resolve every override inside `value` to plain YAML data (for untyped mappings such as strategy options)."""
    value = resolve(value, None)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def coerce_value(value: Any, hint: Any, key: str) -> Any:
    """Check `value` against type `hint` and return it in canonical form (int -> float), or raise naming `key`."""
    value = resolve(value, hint)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if _is_union(hint):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is not type(None):
                try:
                    return coerce_value(value, arg, key)
                except PeftlabError:
                    pass
    elif origin is Literal:
        # YAML 1.1 reads a bare `no`/`yes` as a bool; give it back its text where that text is a choice.
        if isinstance(value, bool) and {False: "no", True: "yes"}[value] in args:
            value = {False: "no", True: "yes"}[value]
        # `type(...) is` too: True == 1 must not pass for a Literal[1], nor 1 for a Literal[True].
        if any(value == choice and type(value) is type(choice) for choice in args):
            return value
    elif origin is list or hint is list:
        if isinstance(value, list):
            return [coerce_value(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else _plain(value)
    elif origin is dict or hint is dict:
        if isinstance(value, dict):
            key_hint, value_hint = args or (Any, Any)
            return {coerce_value(k, key_hint, key): coerce_value(v, value_hint, f"{key}.{k}") for k, v in value.items()}
    elif hint is Any:
        return _plain(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint in (bool, str):
        if isinstance(value, hint):
            return value
    else:
        raise TypeError(f"config field {key} has a type the loader does not support: {hint}")
    raise PeftlabError(f"{key}: expected {describe_type(hint)}, got {show_value(value)}")


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _accepts_str(hint: Any) -> bool:
    return hint is str or (_is_union(hint) and str in typing.get_args(hint))


def describe_type(hint: Any) -> str:
    """A type as users read it: `int or null`, `one of adamw, sgd`, `list of str`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if _is_union(hint):
        return " or ".join(describe_type(arg) for arg in args)
    if origin is Literal:
        return "one of " + ", ".join(str(choice) for choice in args)
    if origin is list:
        return f"list of {describe_type(args[0])}" if args else "list"
    if origin is dict:
        return f"mapping of {describe_type(args[0])} to {describe_type(args[1])}" if args else "mapping"
    names = {type(None): "null", bool: "bool (true/false)", dict: "mapping", Any: "any value"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def show_value(value: Any) -> str:
    """A value as an error message shows it: `null`, or its repr and type."""
    return "null" if value is None else f"{value!r} ({type(value).__name__})"
