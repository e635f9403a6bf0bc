"""Grid specs: shared recipe overrides, then the axes backbone x strategy x task x seed, expanded into cells.

A grid file (`benchmarks/grids/<name>.yaml`) holds:
    recipe: text_classification          # runs recipes/<recipe>.py
    config: recipes/configs/x.yaml       # optional `--config` for the recipe (else the recipe's default YAML)
    env: {HF_HUB_OFFLINE: "1"}           # optional environment of every cell (default: offline Hub)
    defaults: [data.max_length=64, ...]  # overrides every cell shares
    backbones: {minilm: [model.name=minilm]}
    strategies: {lora-r8: [strategy=lora, strategy_options.lora.r=8, train.lr=1e-3]}
    tasks: {rotten_tomatoes: [data.name=rotten_tomatoes]}
    seeds: [0, 1, 2]                     # each becomes train.seed=<seed>
A cell's overrides are defaults + backbone + strategy + task + seed, in that order, so a later one wins.
A grid may start from another: `base: text_minilm.yaml` (relative to the file) takes that grid's keys, replaces
those the file sets, and appends the file's `defaults` to the base's (the `env` mappings merge the same way).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from peftlab.errors import PeftlabError

REPO_ROOT = Path(__file__).resolve().parents[2]
AXES = ("backbones", "strategies", "tasks")
# Labels become parts of file names: keep them to letters, digits, `.`, `_` and `-`.
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=.+$")
# The runner sets these per cell; a grid setting them would be silently replaced.
RUNNER_KEYS = ("output_dir", "overwrite", "resume_from", "train.seed")
DEFAULT_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@dataclass(frozen=True)
class Cell:
    """One run of the grid: a recipe invocation with its overrides and where it sits on each axis."""

    id: str
    backbone: str
    strategy: str
    task: str
    seed: int
    overrides: tuple[str, ...]
    position: dict = field(hash=False, compare=False)
    """Index of the cell's label on each axis, so reports keep the grid's row and column order."""


@dataclass
class Grid:
    """A parsed grid file."""

    name: str
    path: Path
    recipe: str
    config: str | None
    env: dict[str, str]
    defaults: list[str]
    backbones: dict[str, list[str]]
    strategies: dict[str, list[str]]
    tasks: dict[str, list[str]]
    seeds: list[int]

    @property
    def recipe_path(self) -> Path:
        """The recipe script every cell runs."""
        return REPO_ROOT / "recipes" / f"{self.recipe}.py"

    def cells(self) -> list[Cell]:
        """Every cell, backbone-major then strategy, task and seed (the order the runner goes through them)."""
        cells = []
        for b, (backbone, backbone_overrides) in enumerate(self.backbones.items()):
            for s, (strategy, strategy_overrides) in enumerate(self.strategies.items()):
                for t, (task, task_overrides) in enumerate(self.tasks.items()):
                    for seed in self.seeds:
                        overrides = (*self.defaults, *backbone_overrides, *strategy_overrides, *task_overrides,
                                     f"train.seed={seed}")
                        cells.append(Cell(id=cell_id(backbone, task, strategy, seed), backbone=backbone,
                                          strategy=strategy, task=task, seed=seed, overrides=overrides,
                                          position={"backbone": b, "strategy": s, "task": t}))
        return cells


def cell_id(backbone: str, task: str, strategy: str, seed: int) -> str:
    """The cell's file-name stem, e.g. `minilm__rotten_tomatoes__lora-r8__seed0`."""
    return f"{backbone}__{task}__{strategy}__seed{seed}"


def load_grid(path: str | Path) -> Grid:
    """Read and check a grid file; every problem is a one-line PeftlabError naming the key."""
    path = Path(path)
    raw = _read_raw(path, seen=())
    for key in ("recipe", *AXES, "seeds"):
        if not raw.get(key):
            raise PeftlabError(f"{path}: {key} is missing or empty")

    grid = Grid(
        name=path.stem, path=path, recipe=str(raw["recipe"]), config=raw.get("config"),
        env={**DEFAULT_ENV, **{str(k): str(v) for k, v in (raw.get("env") or {}).items()}},
        defaults=_overrides(raw.get("defaults"), f"{path}: defaults"),
        **{axis: _axis(raw[axis], f"{path}: {axis}") for axis in AXES},
        seeds=_seeds(raw["seeds"], f"{path}: seeds"),
    )
    if not grid.recipe_path.is_file():
        found = sorted(p.stem for p in (REPO_ROOT / "recipes").glob("*.py") if p.stem != "__init__")
        raise PeftlabError(f"{path}: recipe {grid.recipe!r} has no recipes/{grid.recipe}.py (choose one of: "
                           f"{', '.join(found)})")
    if grid.config is not None and not (REPO_ROOT / grid.config).is_file():
        raise PeftlabError(f"{path}: config {grid.config} does not exist (paths are relative to the repository root)")
    return grid


def _read_raw(path: Path, seen: tuple[Path, ...]) -> dict:
    """The grid file's mapping, with its `base` grid (if any) underneath: the file's keys replace the base's,
    except `defaults`, which extend the base's (base first, so the file's own overrides win)."""
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as err:
        raise PeftlabError(f"cannot read grid file {path}: {err.strerror or err}") from err
    except yaml.YAMLError as err:
        raise PeftlabError(f"grid file {path} is not valid YAML: {str(err).splitlines()[0]}") from err
    if not isinstance(raw, dict):
        raise PeftlabError(f"grid file {path} must hold a mapping (recipe, defaults, backbones, ...)")
    known = {"base", "recipe", "config", "env", "defaults", *AXES, "seeds"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise PeftlabError(f"{path}: unknown key {unknown[0]!r} (valid keys: {', '.join(sorted(known))})")
    if "base" not in raw:
        return raw
    base_path = path.parent / str(raw.pop("base"))
    if base_path.resolve() in seen + (path.resolve(),):
        raise PeftlabError(f"{path}: base {base_path} leads back to itself")
    base = _read_raw(base_path, seen + (path.resolve(),))
    defaults = [*(base.get("defaults") or []), *(raw.get("defaults") or [])]
    return {**base, **raw, "defaults": defaults, "env": {**(base.get("env") or {}), **(raw.get("env") or {})}}


def _axis(value, where: str) -> dict[str, list[str]]:
    if not isinstance(value, dict):
        raise PeftlabError(f"{where} must map labels to lists of key=value overrides, e.g. lora-r8: [strategy=lora]")
    axis = {}
    for label, overrides in value.items():
        label = str(label)
        if not _LABEL.match(label) or "__" in label:
            raise PeftlabError(f"{where}: label {label!r} must use letters, digits, '.', '_' or '-' "
                               "(no '__', which separates the parts of a cell id)")
        axis[label] = _overrides(overrides, f"{where}.{label}")
    return axis


def _overrides(value, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise PeftlabError(f"{where} must be a list of key=value overrides, got {value!r}")
    for override in value:
        if not isinstance(override, str) or not _OVERRIDE.match(override):
            raise PeftlabError(f"{where}: {override!r} is not a key=value override (e.g. train.lr=1e-3)")
        key = override.partition("=")[0]
        if key in RUNNER_KEYS:
            raise PeftlabError(f"{where}: {key} is set by the runner for each cell; remove {override!r}")
    return list(value)


def _seeds(value, where: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in value):
        raise PeftlabError(f"{where} must be a list of integers, e.g. [0, 1, 2]")
    if len(set(value)) != len(value):
        raise PeftlabError(f"{where} lists a seed twice: {value}")
    return value
