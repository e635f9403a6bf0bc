"""The search space of `peftlab tune`: which recipe config keys a study varies and over what, from one YAML file.

    strategy: [lora, adapter, head]        # the strategies to choose among (one name: no choice)
    params:                                # sampled by every trial, whatever its strategy
      train.lr: {low: 1.0e-5, high: 1.0e-2, log: true}   # a range; int or float as the config key's type says
      train.batch_size: [16, 32]                          # a list: the choices
      train.epochs: 2                                     # one value: set for every trial, not searched
    strategies:                            # sampled only by the trials of that strategy
      lora:
        r: [4, 8, 16]                      # an option of this strategy (= strategy_options.lora.r)
        alpha: {low: 8, high: 32, step: 8}
        train.lr: {low: 1.0e-4, high: 3.0e-2, log: true}  # replaces the shared range in lora trials
      adapter:
        kind: [houlsby, pfeiffer]

Without `strategy`, every trial keeps the recipe config's strategy. A range is `{low, high}` plus `log: true`
(log-uniform) or `step: N`; both ends are included. Each strategy's own keys reach Optuna as `<strategy>:<key>`
(`lora:r`, `lora:train.lr`), so a key ranged differently per strategy is a different parameter to the sampler.

The whole space is checked before any trial starts (`load_search_space`), against the recipe config
(`peftlab.config.load_config`, which also runs the strategy registry's option checks): every key, and every end of
every range and every choice, is loaded into the config of each strategy it applies to, so an unknown key, a value
of the wrong type or out of the key's range, an empty range or a strategy option under the wrong strategy is one
line naming the file and the key. Options that depend on the model (`train.layer_decay` needs trained blocks) are
checked when a trial builds its model: such a trial fails, in one line, and the study goes on.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml

from peftlab import strategies
from peftlab.config import RecipeConfig, load_config
from peftlab.errors import PeftlabError
from peftlab.typed import parse_yaml, read_yaml_file

SECTIONS = ("strategy", "params", "strategies")
# Keys the space may not vary: the study sets them per trial, or they define the study itself.
NOT_SEARCHABLE = {
    "strategy": "choose strategies with the top-level `strategy: [...]` list",
    "strategy_options": "give each option under strategies.<name>",
    "output_dir": "every trial runs in <study>/trials/<number>",
    "overwrite": "trials always start in a new folder",
    "resume_from": "a killed trial is retried from its start",
    "train.cpu_threads": "peftlab tune sets it from --local-workers (or keeps the config's value)",
    "train.metric_for_best": "it is the objective; set it in the config or as an override",
}
RANGE_KEYS = {"low", "high", "log", "step"}


@dataclass(frozen=True)
class Param:
    """One searched (or fixed) config key."""

    key: str
    """The dotted config key the value overrides, e.g. `train.lr` or `strategy_options.lora.r`."""
    name: str
    """Optuna's name of the parameter: the key, or `<strategy>:<key>` for a strategy's own."""
    where: str
    """Where the space file sets it, for messages: `params.train.lr`, `strategies.lora.r`."""
    kind: Literal["fixed", "choice", "int", "float"]
    choices: tuple = ()
    """The choices (`choice`), or the one value (`fixed`)."""
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None

    def sample(self, trial) -> Any:
        """This parameter's value in an Optuna trial."""
        if self.kind == "fixed":
            return self.choices[0]
        if self.kind == "choice":
            return trial.suggest_categorical(self.name, list(self.choices))
        suggest = trial.suggest_int if self.kind == "int" else trial.suggest_float
        return suggest(self.name, self.low, self.high, log=self.log, **({"step": self.step} if self.step else {}))

    def probes(self) -> list[tuple[str, Any]]:
        """(what, value) pairs that span the parameter: the range's ends, or each choice."""
        if self.kind in ("int", "float"):
            return [("low", self.low), ("high", self.high)]
        return [("value" if self.kind == "fixed" else f"choice {i + 1}", c) for i, c in enumerate(self.choices)]


@dataclass(frozen=True)
class SearchSpace:
    """A checked search space: the strategies to choose among, the shared keys and each strategy's own."""

    path: Path
    strategies: tuple[str, ...]
    shared: tuple[Param, ...]
    own: dict[str, tuple[Param, ...]]
    """Per strategy, the keys only its trials sample (replacing a shared key of the same name)."""
    text: str
    """The file's text (the study remembers its hash, so a changed space cannot join an old study)."""

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    def params_for(self, strategy: str) -> list[Param]:
        """The keys a trial of `strategy` sets: the shared ones it does not replace, then its own."""
        own = self.own.get(strategy, ())
        replaced = {p.key for p in own}
        return [p for p in self.shared if p.key not in replaced] + list(own)

    def suggest(self, trial) -> list[str]:
        """Sample a trial's configuration: `key=value` overrides, `strategy=<name>` first."""
        strategy = (trial.suggest_categorical("strategy", list(self.strategies)) if len(self.strategies) > 1
                    else self.strategies[0])
        return self.overrides(strategy, {p.name: p.sample(trial) for p in self.params_for(strategy)})

    def overrides(self, strategy: str, values: dict[str, Any]) -> list[str]:
        """The `key=value` overrides of a configuration (values by Optuna name; fixed keys need none)."""
        return [f"strategy={strategy}"] + [
            override(p.key, p.choices[0] if p.kind == "fixed" else values[p.name]) for p in self.params_for(strategy)]

    def trial_overrides(self, params: dict[str, Any]) -> list[str]:
        """The overrides of a finished trial, from its Optuna `params`."""
        return self.overrides(params.get("strategy", self.strategies[0]), params)


def override(key: str, value: Any) -> str:
    """`key=value` with the value as YAML reads it back: JSON (1e-05, true, null, "yes"), a text bare where YAML
    reads it as that same text (pfeiffer)."""
    if isinstance(value, str):
        try:
            if parse_yaml(value) == value:
                return f"{key}={value}"
        except yaml.YAMLError:
            pass
    return f"{key}={json.dumps(value)}"


def load_search_space(path: str | Path, config_path: str | None, base_overrides: Sequence[str] = ()) -> SearchSpace:
    """Read and check a search-space file against the recipe config `config_path` plus `base_overrides`.

    Raises PeftlabError (one line naming the file and key) for anything a trial would reject; loads no model or data.
    """
    path = Path(path)
    text, raw = read_yaml_file(path, "search space")
    if not isinstance(raw, dict) or not raw:
        raise PeftlabError(f"search space {path} must be a mapping with keys {', '.join(SECTIONS)} "
                           "(see recipes/configs/search/text.yaml)")
    unknown = sorted(set(map(str, raw)) - set(SECTIONS))
    if unknown:
        raise PeftlabError(f"{path}: unknown section {unknown[0]!r} (sections: {', '.join(SECTIONS)}); a config key "
                           "to search goes under params:")
    base = load_config(config_path, base_overrides)  # the recipe config itself must load first
    chosen = _strategies(raw.get("strategy", base.strategy), path)
    shared = tuple(_param(key, spec, f"params.{key}", None, path) for key, spec in _mapping(raw, "params", path))
    own_sections = dict(_mapping(raw, "strategies", path))
    for name in own_sections:
        if name not in chosen:
            raise PeftlabError(f"{path}: strategies.{name} is given, but {name!r} is not among the searched "
                               f"strategies ({', '.join(chosen)}); add it to `strategy:` or remove the section")
    own = {}
    for name in chosen:
        entries = own_sections.get(name) or {}
        if not isinstance(entries, dict):
            raise PeftlabError(f"{path}: strategies.{name} must map keys to ranges, e.g. r: [4, 8, 16]")
        own[name] = tuple(_param(str(key), spec, f"strategies.{name}.{key}", name, path)
                          for key, spec in entries.items())
    space = SearchSpace(path, chosen, shared, own, text)
    _probe(space, config_path, list(base_overrides))
    return space


def _mapping(raw: dict, section: str, path: Path) -> list[tuple[str, Any]]:
    value = raw.get(section)
    if value is None:
        return []
    if not isinstance(value, dict):
        raise PeftlabError(f"{path}: {section} must be a mapping of keys to ranges, e.g. train.lr: "
                           "{low: 1.0e-5, high: 1.0e-2, log: true}")
    return [(str(k), v) for k, v in value.items()]


def _strategies(value: Any, path: Path) -> tuple[str, ...]:
    names = value if isinstance(value, list) else [value]
    if not names or not all(isinstance(n, str) for n in names):
        raise PeftlabError(f"{path}: strategy must be a strategy name or a non-empty list of them, got {value!r}")
    known = strategies.list_strategies()
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise PeftlabError(f"{path}: strategy: unknown strategy {name!r}{hint} (choose among: {', '.join(known)})")
    if len(set(names)) != len(names):
        raise PeftlabError(f"{path}: strategy lists a strategy twice: {names}")
    return tuple(names)


def _param(key: str, spec: Any, where: str, strategy: str | None, path: Path) -> Param:
    """One entry of the space: resolve its config key and read its range, choices or value."""
    key = _config_key(key, where, strategy, path)
    if key in NOT_SEARCHABLE:
        raise PeftlabError(f"{path}: {where}: {key} cannot be searched ({NOT_SEARCHABLE[key]})")
    name = f"{strategy}:{key.removeprefix(f'strategy_options.{strategy}.')}" if strategy else key
    if isinstance(spec, list):
        if not spec:
            raise PeftlabError(f"{path}: {where}: empty list of choices; give at least one value")
        if not all(v is None or isinstance(v, (bool, int, float, str)) for v in spec):
            raise PeftlabError(f"{path}: {where}: choices must be single values (numbers, text, true/false, null), "
                               f"got {spec!r}")
        return Param(key, name, where, "choice", tuple(spec))
    if not isinstance(spec, dict):
        return Param(key, name, where, "fixed", (spec,))
    extra = sorted(set(map(str, spec)) - RANGE_KEYS)
    if extra or not {"low", "high"} <= set(spec):
        raise PeftlabError(f"{path}: {where}: a range is {{low, high}} with optional log: true or step, got keys "
                           f"{sorted(map(str, spec))}; a list gives choices")
    low, high, log, step = spec["low"], spec["high"], spec.get("log", False), spec.get("step")
    kind = _number_kind(key, strategy, where, path)
    for end, value in (("low", low), ("high", high), ("step", step)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or (kind == "int" and not isinstance(value, int))):
            raise PeftlabError(f"{path}: {where}: {end} must be {'an integer' if kind == 'int' else 'a number'} "
                               f"({key} is {'an int' if kind == 'int' else 'a float'}), got {value!r}")
    if low > high:
        raise PeftlabError(f"{path}: {where}: empty range: low {low} > high {high}")
    if not isinstance(log, bool):
        raise PeftlabError(f"{path}: {where}: log must be true or false, got {log!r}")
    if log and low <= 0:
        raise PeftlabError(f"{path}: {where}: a log range needs low > 0, got {low}")
    if step is not None and (step <= 0 or log):
        raise PeftlabError(f"{path}: {where}: step must be > 0 and cannot go with log: true, got step {step}")
    if kind == "float":
        low, high = float(low), float(high)
    return Param(key, name, where, kind, low=low, high=high, log=log, step=step)


def _config_key(key: str, where: str, strategy: str | None, path: Path) -> str:
    """The dotted config key of a space entry: a strategy's bare option name becomes strategy_options.<name>.<key>;
    an option of another strategy, or any option outside strategies.<name>, is refused."""
    parts = key.split(".")
    if parts[0] == "strategy_options" and len(parts) != 3:
        return "strategy_options"  # a whole strategy's options: refused as not searchable
    if parts[0] == "strategy_options":
        owner, option = parts[1], parts[2]
        if strategy is None:
            raise PeftlabError(f"{path}: {where}: a strategy option belongs under strategies.{owner} (as {option}), "
                               "so that only that strategy's trials sample it")
        if owner != strategy:
            raise PeftlabError(f"{path}: {where}: {key} is an option of strategy {owner!r}, not {strategy!r}; move it "
                               f"under strategies.{owner}")
        key = option
    elif "." in key or strategy is None:
        return key
    options = {f.name for f in dataclasses.fields(strategies.get_strategy(strategy).options_cls)}
    if key not in options:
        owners = [name for name in strategies.list_strategies()
                  if key in {f.name for f in dataclasses.fields(strategies.get_strategy(name).options_cls)}]
        elsewhere = f"; {key} is an option of {', '.join(owners)}" if owners else ""
        raise PeftlabError(f"{path}: {where}: strategy {strategy!r} has no option {key!r} (its options: "
                           f"{', '.join(sorted(options)) or 'none'}){elsewhere}")
    return f"strategy_options.{strategy}.{key}"


def _number_kind(key: str, strategy: str | None, where: str, path: Path) -> str:
    """`int` or `float`: the type of the config key or strategy option a range is given for."""
    hint = _field_hint(key)
    if hint is None:  # not a known field: the probe's load_config names the unknown key
        return "float"
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        hint = args[0]  # Optional[int] -> int
    if hint is int or hint is float:
        return hint.__name__
    raise PeftlabError(f"{path}: {where}: {key} is not a number, so it has no range; give a list of choices")


def _field_hint(key: str) -> Any:
    """The type hint of a dotted config key or `strategy_options.<strategy>.<option>`, or None if there is none."""
    parts = key.split(".")
    if parts[0] == "strategy_options" and len(parts) == 3:
        return typing.get_type_hints(strategies.get_strategy(parts[1]).options_cls).get(parts[2])
    cls: Any = RecipeConfig
    for part in parts:
        if not dataclasses.is_dataclass(cls):
            return None
        cls = typing.get_type_hints(cls).get(part)
    return None if dataclasses.is_dataclass(cls) else cls


def _probe(space: SearchSpace, config_path: str | None, base: list[str]) -> None:
    """Load every value the space can give into the config of each strategy it applies to: each entry alone, then
    all at their low ends (first choices) and all at their high ends (last choices), for checks across keys."""
    def load(strategy: str, settings: list[tuple[Param, Any]], what: str) -> None:
        try:
            load_config(config_path, [*base, f"strategy={strategy}", *(override(p.key, v) for p, v in settings)])
        except PeftlabError as err:
            raise PeftlabError(f"{space.path}: {what}: {err}") from err

    for strategy in space.strategies:
        params = space.params_for(strategy)
        fixed = [(p, p.choices[0]) for p in params if p.kind == "fixed"]
        load(strategy, fixed, f"strategy {strategy}")
        for param in params:
            for what, value in param.probes():
                load(strategy, [*fixed, (param, value)], f"{param.where} ({what} {json.dumps(value)})")
        for end in (0, -1):
            together = [(p, p.probes()[end][1]) for p in params]
            load(strategy, together, f"strategy {strategy} with every key at its {('low', 'high')[end]} end")
