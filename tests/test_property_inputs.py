"""Property: whatever a user passes (any config key, any value; any CSV or JSONL file) the text recipe either trains
or stops with exit code 2 and one `error:` line. Never a traceback, never a hang, never a file outside the run folder.

Hypothesis draws the cases (bounded and derandomized: the same 25 every run). Each runs the real recipe in a
subprocess with its own HOME, cache and working folder, so any write outside the run folder shows up.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import typing
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peftlab.config import RecipeConfig

ROOT = Path(__file__).parents[1]
RECIPE = ROOT / "recipes" / "text_classification.py"
# Keys that set how long a run takes get small numbers (or junk), so no valid case runs for minutes.
SIZE_KEYS = {"train.epochs", "train.max_steps", "data.max_train_samples", "data.max_eval_samples",
             "model.num_hidden_layers", "train.batch_size", "train.eval_batch_size", "train.grad_accum_steps",
             "data.max_length", "train.eval_every", "train.checkpoint_every", "train.log_every",
             "train.early_stopping_patience"}
# Always last (a later override wins): a 1-layer model on at most 48 texts, 3 steps. The generated values of these
# keys still reach the config check first, so a bad one is still an error.
CAPS = ["model.num_hidden_layers=1", "data.max_train_samples=48", "data.max_eval_samples=16", "train.max_steps=3",
        "train.trackers=[jsonl]"]
PINNED = {"output_dir", "model.num_hidden_layers", "data.max_train_samples", "data.max_eval_samples",
          "train.max_steps"}


def config_keys(cls=RecipeConfig, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        keys += config_keys(hint, f"{prefix}{f.name}.") if dataclasses.is_dataclass(hint) else [prefix + f.name]
    return keys


KEYS = [k for k in config_keys() if k not in PINNED]
junk = st.one_of(
    st.integers(-(2**40), 2**40).map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["true", "false", "null", "yes", "[]", "{}", "[1, x]", "{a: 1}", "'quoted'", "1e-3", "-1",
                     "0", "nan", "minilm", "lora", "f1", "latest", "8bit", "bf16", "[tensorboard]", "[wandb]"]),
    st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1, max_size=12),
)
small = st.one_of(st.integers(-2, 6).map(str), junk)


@st.composite
def overrides(draw) -> list[str]:
    chosen = draw(st.lists(st.sampled_from(KEYS), max_size=3, unique=True))
    return [f"{key}={draw(small if key in SIZE_KEYS else junk)}" for key in chosen]


cell = st.one_of(st.text(max_size=30), st.integers(-3, 9), st.sampled_from(["pos", "neg", "", "01", "1.5", "NaN"]))


@st.composite
def data_file(draw) -> tuple[str, bytes]:
    """(file name, bytes): a CSV or JSONL of text/label rows, with odd shapes, encodings, label kinds and gaps."""
    n = draw(st.integers(0, 40))
    label_kind = draw(st.sampled_from(["strings", "ints", "sparse ints", "mixed"]))
    labels = {"strings": st.sampled_from(["pos", "neg", "meh"]), "ints": st.integers(0, 2),
              "sparse ints": st.sampled_from([1, 5, 9]), "mixed": cell}[label_kind]
    texts = st.one_of(st.sampled_from(["great film", "dull", "a, quoted \"one\"", "line\nbreak", "ünïcödé ✓"]),
                      st.text(max_size=40))
    columns = draw(st.sampled_from([("text", "label"), ("text", "label"), ("review", "label"), ("text",)]))
    rows = [{"text": draw(texts), "label": draw(labels)} for _ in range(n)]
    if draw(st.booleans()) and rows:  # an empty cell somewhere
        rows[draw(st.integers(0, len(rows) - 1))][draw(st.sampled_from(["text", "label"]))] = ""
    encoding = draw(st.sampled_from(["utf-8", "utf-8", "utf-8-sig", "latin-1", "utf-16"]))
    if draw(st.booleans()):
        lines = [json.dumps({c: r[k] for c, k in zip(columns, ("text", "label"))}, ensure_ascii=False) for r in rows]
        return "data.jsonl", "\n".join(lines).encode(encoding, errors="replace")
    import csv
    import io

    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(columns)
    writer.writerows([[r[k] for k in ("text", "label")][: len(columns)] for r in rows])
    return "data.csv", out.getvalue().encode(encoding, errors="replace")


def snapshot(folder: Path, exempt: set[str]) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.relative_to(folder).parts[0] not in exempt}


def run_case(sandbox: Path, args: list[str], data: tuple[str, bytes] | None) -> str:
    """Run one case; returns "trained" or "refused", or fails the test."""
    sandbox.mkdir(parents=True)
    home = sandbox / "home"  # HOME, HF caches and the datasets cache: the only place besides the run allowed to change
    extra = []
    if data is not None:
        (sandbox / data[0]).write_bytes(data[1])
        extra = [f"data.name={sandbox / data[0]}"]
    before = snapshot(sandbox, exempt={"home", "run"})
    env = {**os.environ, "HOME": str(home), "HF_HOME": str(home / "hf"), "HF_DATASETS_CACHE": str(home / "datasets"),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MPLCONFIGDIR": str(home / "mpl")}
    command = [sys.executable, str(RECIPE), *extra, *args, *CAPS, f"output_dir={sandbox / 'run'}"]
    try:
        done = subprocess.run(command, cwd=sandbox, env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail(f"hung (no exit within 300 s): {command[2:]}")
    shown = f"{command[2:]}\n{done.stderr[-2500:]}"
    assert "Traceback" not in done.stderr, shown
    assert snapshot(sandbox, exempt={"home", "run"}) == before, f"wrote outside the run folder: {shown}"
    if done.returncode == 0:
        assert json.loads((sandbox / "run" / "metrics.json").read_text())["global_step"] >= 1, shown
        return "trained"
    assert done.returncode == 2, shown
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and done.stderr.strip().splitlines()[-1] == errors[0], shown
    return "refused"


@pytest.mark.slow  # 25 recipe subprocesses, two at a time: about 2.5 minutes on 2 cores
def test_any_config_and_any_text_file_trains_or_fails_in_one_line(tmp_path):
    cases = []

    @settings(max_examples=25, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(args=st.one_of(st.just([]), overrides()), data=st.one_of(st.none(), data_file()))
    def case(args, data):
        cases.append((args, data))

    case()
    # Drawn first, then run two at a time: each case is a one-thread subprocess that mostly imports, so two share 2
    # cores at half the wall time. (Hypothesis then cannot shrink a failing case; the failure names its arguments.)
    with ThreadPoolExecutor(max_workers=2) as pool:
        outcomes = list(pool.map(lambda numbered: run_case(tmp_path / f"case-{numbered[0]}", *numbered[1]),
                                 enumerate(cases)))
    # The property is hollow if nothing trains: a share of the cases must get through to a finished run.
    assert outcomes.count("trained") >= 3, outcomes
    assert outcomes.count("refused") >= 3, outcomes
