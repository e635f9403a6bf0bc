"""benchmarks/speed.py --smoke end to end (1-layer MiniLM, 48 texts): the records' fields, no timed assertions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
RUN_FIELDS = {"spec", "wall_s", "train_phase_s", "samples_per_s", "peak_memory_mb", "test_accuracy",
              "trained_samples", "mixed_precision"}


def test_smoke_writes_records_and_table(tmp_path):
    readme = tmp_path / "SPEED.md"
    readme.write_text("# Speed\n<!-- speed:table -->\nold\n<!-- /speed:table -->\nafter\n")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--smoke", "--cases", "head", "full",
                           "--out", str(tmp_path), "--readme", str(readme)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]

    head = json.loads((tmp_path / "head.json").read_text())
    assert head["smoke"] and head["case"] == "head"
    assert RUN_FIELDS <= set(head["a"]) and RUN_FIELDS <= set(head["b"])
    assert head["a"]["spec"]["cache"] is False and head["b"]["spec"]["cache"] is True
    assert head["a"]["cache_s"] < head["b"]["cache_s"]  # (a) passes straight through, (b) runs the backbone once
    assert head["a"]["trained_samples"] == head["b"]["trained_samples"] == 48  # 1 epoch of 48 texts on both sides
    assert head["ratio_samples_per_s"] > 0 and "accuracy_difference_points" in head
    assert {"environment", "git", "load_average"} <= set(head)

    full = json.loads((tmp_path / "full.json").read_text())
    assert full["a"]["spec"]["kind"] == "trainer" and full["b"]["spec"]["kind"] == "recipe"
    assert full["a"]["trained_samples"] == full["b"]["trained_samples"] == 48
    assert full["b"]["tokens"] > 0 and full["b"]["model_flops_per_s"] > 0
    assert full["bf16_ceiling"]["mean_flops_per_s"] > 0 and 0 < full["fraction_of_bf16_ceiling"]

    table = (tmp_path / "table.md").read_text()
    assert table.startswith("| case |") and "| head (48 train, 24 test, 1 ep) |" in table and "| full (48 train" in table
    assert readme.read_text() == f"# Speed\n<!-- speed:table -->\n{table}<!-- /speed:table -->\nafter\n"


def test_render_only_rewrites_every_readme_from_the_records(tmp_path):
    """--render-only runs nothing: it renders the records in --out (here, copies of the committed ones)."""
    for record in (ROOT / "benchmarks" / "results" / "speed").glob("*.json"):
        (tmp_path / record.name).write_text(record.read_text())
    readmes = [tmp_path / "SPEED.md", tmp_path / "README.md"]
    for readme in readmes:
        readme.write_text(f"# {readme.stem}\n<!-- speed:table -->\nold\n<!-- /speed:table -->\n")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--render-only",
                           "--out", str(tmp_path), "--readme", *map(str, readmes)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    table = (tmp_path / "table.md").read_text()
    lora = json.loads((tmp_path / "lora.json").read_text())
    assert f"**{lora['ratio_samples_per_s']:.2f}x**" in table and "| vision-full (" in table
    for readme in readmes:
        assert readme.read_text() == f"# {readme.stem}\n<!-- speed:table -->\n{table}<!-- /speed:table -->\n"
