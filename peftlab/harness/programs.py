"""What a cell launches: a recipe (`recipes/<name>.py`) or a registered job, both through the same launcher.

Every program is a script run as `python <script> [args] [--config C] key=value ... output_dir=<run> overwrite=true`
that leaves `metrics.json` and `config.yaml` in `<run>` in the recipe's shapes, so every cell gives the same record.
A job is what is not a recipe but is measured like one: the `transformers.Trainer` baseline, a fused or exported
model's evaluation. Register one with `register_job`; grids name it with `{job: <name>, overrides: [...]}`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from peftlab.errors import PeftlabError

# The checkout the harness runs in: recipes/, benchmarks/ and runs/ sit beside the package (an editable install).
REPO_ROOT = Path(__file__).resolve().parents[2]

# Which data loader re-reads a recipe's splits for the data hash (peftlab.harness.provenance).
RECIPE_TASKS = {"text_classification": "text", "image_classification": "image"}


@dataclass(frozen=True)
class Program:
    """A script a cell runs, and how its run folder's data section is re-read for the record's data hash."""

    kind: str
    """"recipe" or "job"."""
    name: str
    script: str
    """Relative to the repository root."""
    args: tuple[str, ...] = ()
    """Fixed arguments before the cell's own (e.g. `--task text`)."""
    task: str | None = None
    """"text" or "image": the loader that rebuilds its splits; None leaves the record's data hash out."""
    measurement: bool = False
    """A job that measures the machine instead of training (the matmul ceiling): its metrics.json holds
    `measurement` in place of results, and in a grid with pairs its cells stand beside the pairs, not in one."""

    def command(self) -> list[str]:
        """The script and its fixed arguments, relative to the repository root."""
        return [self.script, *self.args]


JOBS: dict[str, Program] = {}


def register_job(name: str, script: str, *, args: tuple[str, ...] = (), task: str | None = None,
                 measurement: bool = False) -> Program:
    """Make `{job: name}` in a grid run `script` (relative to the repository root, or absolute) with `args` before
    the cell's `--config` and overrides; `measurement`: see `Program.measurement`."""
    JOBS[name] = Program(kind="job", name=name, script=script, args=tuple(args), task=task, measurement=measurement)
    return JOBS[name]


# The usual loop the speed grids compare the recipes against (benchmarks/SPEED.md).
register_job("trainer_text", "benchmarks/trainer_baseline.py", args=("--task", "text"), task="text")
register_job("trainer_image", "benchmarks/trainer_baseline.py", args=("--task", "image"), task="image")
# The cheap reference row of a text table: TF-IDF + a linear SVM on the recipe's splits (benchmarks/README.md).
register_job("tfidf_svm", "benchmarks/tfidf_baseline.py", task="text")
# The README's launch commands, for thread counts that only `accelerate launch` meets (grids/speed_threads.yaml).
register_job("accelerate_text", "benchmarks/accelerate_launch.py", args=("text_classification",), task="text")
register_job("accelerate_text_ddp2", "benchmarks/accelerate_launch.py",
             args=("--processes", "2", "text_classification"), task="text")
# What a speed table's "% of bf16 ceiling" divides by: bf16 and fp32 matmul FLOP/s at the model's shapes, measured in
# the grid's own invocation (grids/speed_text.yaml).
register_job("matmul_ceiling", "benchmarks/matmul_ceiling.py", measurement=True)
# A grid's fusion rows (`{fuse: <label>, method: ...}`, peftlab.harness.grid): `peftlab fuse` on other cells' runs.
register_job("fuse", "benchmarks/fuse_cell.py")


def fuse_job(task: str | None) -> Program:
    """The `fuse` job for a grid whose recipe reads `task` data (so the record's data hash is the ingredients')."""
    return dataclasses.replace(JOBS["fuse"], task=task)


def recipe(name: str, where: str) -> Program:
    """The recipe `recipes/<name>.py`; a one-line error listing the recipes when there is none (`where`: the key)."""
    if not (REPO_ROOT / "recipes" / f"{name}.py").is_file():
        found = sorted(p.stem for p in (REPO_ROOT / "recipes").glob("*.py") if p.stem != "__init__")
        raise PeftlabError(f"{where}: recipe {name!r} has no recipes/{name}.py (choose one of: {', '.join(found)})")
    return Program(kind="recipe", name=name, script=f"recipes/{name}.py", task=RECIPE_TASKS.get(name))


def job(name: str, where: str) -> Program:
    """The registered job `name`; a one-line error listing the registered ones when there is none."""
    if name not in JOBS:
        raise PeftlabError(f"{where}: no job {name!r} is registered (registered: {', '.join(sorted(JOBS))}; "
                           "add one with peftlab.harness.programs.register_job)")
    return JOBS[name]


def recipe_program(choice: str) -> Program:
    """The recipe a command names: a task (`text`, `image`), a recipe name (`text_classification`) or a path to a
    recipe script (a `main(cfg)` and, optionally, a `DEFAULT_CONFIG`); a one-line error when there is none."""
    by_task = {task: name for name, task in RECIPE_TASKS.items()}
    if choice in by_task:
        return recipe(by_task[choice], "recipe")
    path = Path(choice)
    if path.suffix != ".py":
        return recipe(choice, "recipe")
    if not path.is_file():
        raise PeftlabError(f"recipe {choice} does not exist; give text, image, a recipe name or a recipe script")
    shown = path.resolve().relative_to(REPO_ROOT) if path.resolve().is_relative_to(REPO_ROOT) else path.resolve()
    return Program(kind="recipe", name=path.stem, script=str(shown), task=RECIPE_TASKS.get(path.stem))


def load_recipe_module(program: Program) -> ModuleType:
    """A recipe script as a module, for runs inside this process (`peftlab tune`): recipes are scripts, not a
    package, so the file is loaded by its path; its `main(cfg)` runs the recipe."""
    path = REPO_ROOT / program.script
    spec = importlib.util.spec_from_file_location(f"peftlab_recipe_{program.name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "main", None)):
        raise PeftlabError(f"recipe {program.script} has no main(cfg) function to run")
    return module
