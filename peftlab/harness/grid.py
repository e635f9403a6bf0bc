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
A label may also say what its cells run instead of the grid's recipe: `{job: trainer_text, overrides: [...]}` (a job
registered in peftlab.harness.programs) or `{recipe: image_classification, overrides: [...]}`.
A strategy label may fuse another label's cells (issue 16): `full-greedy-soup: {fuse: full, method: greedy-soup}`
is one cell per backbone and task, `<backbone>__<task>__full-greedy-soup__seeds0-1-2`, that runs the `fuse` job
(`peftlab fuse`, method ensemble, uniform-soup or greedy-soup) on the run folders of that label's cells over every
seed; it comes after them in the grid, and fails in one line naming the cell to re-run when a run folder is missing.
A strategy label may continue another label's runs (multi-task runs, issue 19): `then-news: {extends: shared,
overrides: [...]}` runs the grid's recipe once per seed with its overrides and `multitask.extend=<the run folder of the
`shared` cell of the same backbone, task and seed>`; it comes after them in the grid, and fails in one line naming the
cell to re-run when that folder is missing.
A grid may compare its strategies in pairs: `pairs: {lora: [lora-trainer, lora-recipe]}` runs, for each pair and
seed, side a then side b back to back (so both meet about the same load), and the report tabulates b against a.
Beside the pairs, a strategy label may run a job that measures the machine (`{job: matmul_ceiling}`, a job
registered with `measurement=True`): it is no side of a pair, and its cell runs after the pairs of each seed.
A grid may leave out cells of its cross product: `exclude: ['*__bbc__lora-shared__*']` (shell patterns over cell
ids, as `--only` takes them; each must match a cell), e.g. a multi-task mode that means nothing on a single task.
A grid may start from another: `base: text_minilm.yaml` (relative to the file) takes that grid's keys, replaces
those the file sets, and appends the file's `defaults` to the base's (the `env` mappings merge the same way).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from peftlab.errors import PeftlabError
from peftlab.harness import programs
from peftlab.harness.programs import RECIPE_TASKS, REPO_ROOT, Program

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
    seed: int | None
    """None for a fusion cell, which stands for all of its ingredients' seeds."""
    overrides: tuple[str, ...]
    position: dict = field(hash=False, compare=False)
    """Index of the cell's label on each axis, so reports keep the grid's row and column order."""
    program: Program | None = None
    """What the cell runs (the grid's recipe unless one of its labels names another recipe or a job)."""
    pair: str | None = None
    """The pair this cell is a side of, in a grid with `pairs`."""
    side: str | None = None
    """"a" or "b" within its pair."""
    ingredients: tuple[str, ...] = ()
    """The cell ids whose run folders a fusion cell fuses (empty for other cells)."""
    extends: str | None = None
    """The cell id whose run folder this cell's run extends (`multitask.extend`), for an `extends` label's cells."""


@dataclass(frozen=True)
class Fusion:
    """A strategy label that fuses another label's seeds: `{fuse: <label>, method: <fusion method>}`."""

    of: str
    method: str


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
    programs: dict[str, Program] = field(default_factory=dict)
    """`<axis>.<label>` -> the program that label's cells run instead of the grid's recipe."""
    pairs: dict[str, tuple[str, str]] = field(default_factory=dict)
    """Pair name -> (side a, side b) strategy labels."""
    fusions: dict[str, Fusion] = field(default_factory=dict)
    """Strategy label -> the label whose cells it fuses, and how."""
    extensions: dict[str, str] = field(default_factory=dict)
    """Strategy label -> the label whose run folders its cells extend (same backbone, task and seed)."""
    exclude: list[str] = field(default_factory=list)
    """Shell patterns over cell ids: the cross product's cells the grid does not run."""

    def program_of(self, backbone: str, strategy: str, task: str) -> Program:
        """What a cell with these labels runs: the last of its labels that names a program, else the grid's recipe."""
        named = [self.programs[key] for key in (f"backbones.{backbone}", f"strategies.{strategy}", f"tasks.{task}")
                 if key in self.programs]
        return named[-1] if named else programs.recipe(self.recipe, str(self.path))

    def cells(self) -> list[Cell]:
        """Every cell, in the order the runner goes through them: backbone-major then strategy, task and seed; in a
        grid with pairs, backbone and task, then pair, seed and side, so the two sides of a pair run back to back."""
        cells = []
        for b, (backbone, backbone_overrides) in enumerate(self.backbones.items()):
            for s, (strategy, strategy_overrides) in enumerate(self.strategies.items()):
                for t, (task, task_overrides) in enumerate(self.tasks.items()):
                    position = {"backbone": b, "strategy": s, "task": t}
                    if strategy in self.fusions:
                        cells.append(self.fusion_cell(backbone, strategy, task, position))
                        continue
                    for seed in self.seeds:
                        overrides = (*self.defaults, *backbone_overrides, *strategy_overrides, *task_overrides,
                                     f"train.seed={seed}")
                        pair, side = next(((name, "ab"[sides.index(strategy)]) for name, sides in self.pairs.items()
                                           if strategy in sides), (None, None))
                        extends = (cell_id(backbone, task, self.extensions[strategy], seed)
                                   if strategy in self.extensions else None)
                        cells.append(Cell(id=cell_id(backbone, task, strategy, seed), backbone=backbone,
                                          strategy=strategy, task=task, seed=seed, overrides=overrides,
                                          position=position,
                                          program=self.program_of(backbone, strategy, task), pair=pair, side=side,
                                          extends=extends))
        cells = [cell for cell in cells if not any(fnmatch.fnmatch(cell.id, pattern) for pattern in self.exclude)]
        if self.pairs:
            pair_order = [*self.pairs, None]  # a measurement (no pair) after the pairs
            cells.sort(key=lambda c: (c.position["backbone"], c.position["task"], pair_order.index(c.pair), c.seed,
                                      c.side or ""))
        return cells

    def fusion_cell(self, backbone: str, strategy: str, task: str, position: dict) -> Cell:
        """The one cell of a fusion label for this backbone and task: the `fuse` job over the seeds of its label."""
        fusion = self.fusions[strategy]
        seeds = "-".join(map(str, self.seeds))
        return Cell(id=f"{backbone}__{task}__{strategy}__seeds{seeds}", backbone=backbone, strategy=strategy,
                    task=task, seed=None, overrides=(f"method={fusion.method}",), position=position,
                    program=programs.fuse_job(RECIPE_TASKS.get(self.recipe)),
                    ingredients=tuple(cell_id(backbone, task, fusion.of, seed) for seed in self.seeds))


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

    axes, named = {}, {}
    fusions = _fusions(raw["strategies"], f"{path}: strategies")
    extensions = _extensions(raw["strategies"], f"{path}: strategies", fusions)
    for axis in AXES:
        labels = {k: v for k, v in raw[axis].items() if str(k) not in fusions} if axis == "strategies" else raw[axis]
        axes[axis], axis_programs = _axis(labels, f"{path}: {axis}")
        named.update({f"{axis}.{label}": program for label, program in axis_programs.items()})
    axes["strategies"] = {str(label): axes["strategies"].get(str(label), []) for label in raw["strategies"]}
    measurements = [label for label in axes["strategies"]
                    if getattr(named.get(f"strategies.{label}"), "measurement", False)]
    if measurements and not raw.get("pairs"):
        raise PeftlabError(f"{path}: strategies.{measurements[0]} runs a measurement job, which goes beside a grid's "
                           "pairs; add pairs or remove it")
    grid = Grid(
        name=path.stem, path=path, recipe=str(raw["recipe"]), config=raw.get("config"),
        env={**DEFAULT_ENV, **{str(k): str(v) for k, v in (raw.get("env") or {}).items()}},
        defaults=_overrides(raw.get("defaults"), f"{path}: defaults"), **axes,
        seeds=_seeds(raw["seeds"], f"{path}: seeds"), programs=named,
        pairs=_pairs(raw.get("pairs"), [label for label in axes["strategies"] if label not in measurements],
                     f"{path}: pairs", measurements), fusions=fusions, extensions=extensions,
    )
    grid.exclude = _exclude(raw.get("exclude"), grid, f"{path}: exclude")
    programs.recipe(grid.recipe, str(path))  # a missing recipe fails here, in one line
    if grid.config is not None and not (REPO_ROOT / grid.config).is_file():
        raise PeftlabError(f"{path}: config {grid.config} does not exist (paths are relative to the repository root)")
    return grid


def _exclude(raw, grid: Grid, where: str) -> list[str]:
    """The exclude patterns, each checked to match at least one cell (a pattern that matches none is a typo)."""
    if raw is None:
        return []
    if not isinstance(raw, list) or not all(isinstance(pattern, str) for pattern in raw):
        raise PeftlabError(f"{where} must be a list of shell patterns over cell ids, e.g. ['*__bbc__lora-shared__*']")
    ids = [cell.id for cell in grid.cells()]
    for pattern in raw:
        if not fnmatch.filter(ids, pattern):
            raise PeftlabError(f"{where}: {pattern!r} matches no cell; patterns are shell globs over cell ids such as "
                               f"{ids[0]!r}")
    return list(raw)


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
    known = {"base", "recipe", "config", "env", "defaults", *AXES, "seeds", "pairs", "exclude"}
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


def _axis(value, where: str) -> tuple[dict[str, list[str]], dict[str, Program]]:
    """{label: overrides} of one axis, and {label: program} for the labels that name a recipe or job of their own."""
    if not isinstance(value, dict):
        raise PeftlabError(f"{where} must map labels to lists of key=value overrides, e.g. lora-r8: [strategy=lora]")
    axis, named = {}, {}
    for label, entry in value.items():
        label = str(label)
        if not _LABEL.match(label) or "__" in label:
            raise PeftlabError(f"{where}: label {label!r} must use letters, digits, '.', '_' or '-' "
                               "(no '__', which separates the parts of a cell id)")
        if isinstance(entry, dict):
            entry = dict(entry)
            overrides = entry.pop("overrides", None)
            if entry.keys() == {"extends"}:  # the grid's recipe, continuing another label's runs (_extensions)
                axis[label] = _overrides(overrides, f"{where}.{label}")
                continue
            if len(entry) != 1 or next(iter(entry)) not in ("job", "recipe"):
                raise PeftlabError(f"{where}.{label}: a mapping holds `overrides` and one of `job` or `recipe`, "
                                   f"got keys {sorted(entry)}")
            (kind, name), = entry.items()
            named[label] = getattr(programs, kind)(str(name), f"{where}.{label}")
            entry = overrides
        axis[label] = _overrides(entry, f"{where}.{label}")
    return axis, named


def _fusions(value, where: str) -> dict[str, Fusion]:
    """{label: Fusion} of the strategy labels written `{fuse: <label>, method: <method>}`; the fused label must be an
    earlier strategy that trains (its cells run first), the method one `peftlab fuse` knows."""
    from peftlab.fuse import METHODS

    if not isinstance(value, dict):
        return {}  # _axis reports the shape
    fusions, earlier = {}, []
    for label, entry in value.items():
        label = str(label)
        if not (isinstance(entry, dict) and "fuse" in entry):
            earlier.append(label)
            continue
        if set(entry) != {"fuse", "method"}:
            raise PeftlabError(f"{where}.{label}: a fusion row holds `fuse: <strategy label>` and `method: "
                               f"<{'|'.join(METHODS)}>`, got keys {sorted(entry)}")
        of, method = str(entry["fuse"]), str(entry["method"])
        if of not in earlier:
            raise PeftlabError(f"{where}.{label}: fuse: {of!r} is not a strategy label above it (labels: "
                               f"{', '.join(earlier)})")
        if method not in METHODS:
            raise PeftlabError(f"{where}.{label}: method {method!r} is not a fusion method (choose one of: "
                               f"{', '.join(METHODS)})")
        if not _LABEL.match(label) or "__" in label:
            raise PeftlabError(f"{where}: label {label!r} must use letters, digits, '.', '_' or '-'")
        fusions[label] = Fusion(of, method)
    return fusions


def _extensions(value, where: str, fusions: dict[str, Fusion]) -> dict[str, str]:
    """{label: extended label} of the strategy labels written `{extends: <label>, overrides: [...]}`; the extended
    label must be an earlier strategy that trains (its cells run first)."""
    if not isinstance(value, dict):
        return {}  # _axis reports the shape
    extensions, earlier = {}, []
    for label, entry in value.items():
        label = str(label)
        if isinstance(entry, dict) and "extends" in entry:
            if not set(entry) <= {"extends", "overrides"}:
                raise PeftlabError(f"{where}.{label}: a row that extends another holds `extends: <strategy label>` "
                                   f"and `overrides`, got keys {sorted(entry)}")
            of = str(entry["extends"])
            if of not in earlier:
                raise PeftlabError(f"{where}.{label}: extends: {of!r} is not a strategy label above it that trains "
                                   f"(labels: {', '.join(earlier)})")
            extensions[label] = of
        elif label not in fusions:
            earlier.append(label)
    return extensions


def _pairs(value, strategies: list[str], where: str, measurements: list[str] = ()) -> dict[str, tuple[str, str]]:
    """{pair: (side a, side b)}; every strategy label but the `measurements` is a side of exactly one pair (labels,
    not overrides)."""
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, list) and len(v) == 2 for v in value.values()):
        raise PeftlabError(f"{where} must map pair names to [side a, side b] strategy labels, "
                           "e.g. lora: [trainer, recipe]")
    sides = [str(label) for labels in value.values() for label in labels]
    measured = sorted(set(sides) & set(measurements))
    if measured:
        raise PeftlabError(f"{where}: {measured[0]!r} runs a measurement job, which is no side of a pair (its cell "
                           "runs beside the pairs); remove it from the pair")
    unknown = sorted(set(sides) - set(strategies))
    if unknown:
        raise PeftlabError(f"{where}: {unknown[0]!r} is not a strategy label (labels: {', '.join(strategies)})")
    if sorted(sides) != sorted(strategies):
        raise PeftlabError(f"{where}: every strategy must be a side of exactly one pair (strategies: "
                           f"{', '.join(strategies)}; sides: {', '.join(sides)})")
    return {str(name): (str(a), str(b)) for name, (a, b) in value.items()}


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
