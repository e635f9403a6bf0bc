"""benchmarks/gpu_check.sh without a GPU: its arguments and steps (--dry-run), its report, and (slow) a CPU run."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu_check import bf16_peak_tflops  # noqa: E402


def gpu_check(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.0),  # the SXM part
    ("NVIDIA H100 SXM5 80GB", 989.0),
    ("NVIDIA H200", 989.0),
    ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100 80GB PCIe", 312.0),
    ("NVIDIA H100 PCIe", None),  # another part, another peak: not in the table
    ("NVIDIA GeForce RTX 4090", None),
])
def test_bf16_peak_by_device_name(name, peak):
    assert bf16_peak_tflops(name) == peak


def test_dry_run_lists_every_step_and_runs_nothing(tmp_path):
    done = gpu_check("--dry-run", "--out", str(tmp_path / "out"), "--runs", str(tmp_path / "runs"))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    steps = [line for line in lines if line.startswith("== ")]
    assert steps[0] == "== packages: all there"  # this machine has them: scripts/setup.sh is not run
    assert steps[1].startswith("== torch: ") and steps[1].endswith(" kept")  # no GPU here: torch is left alone
    assert steps[2:] == ["== grid gpu_text", "== grid gpu_vision", "== report"]
    commands = [line for line in lines if line.startswith("+ ")]
    out = tmp_path / "out"
    assert any(f"benchmarks/grids/gpu_text.yaml --results {out}/records/gpu_text --runs {tmp_path}/runs/gpu_text "
               "--timeout 300" in c for c in commands)
    assert any(c.endswith(f"benchmarks/gpu_check.py {out}") for c in commands)
    assert commands[-1].startswith(f"+ tar -czf {out}/records.tar.gz")
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()


def test_cpu_mode_runs_the_smoke_grids_that_only_names():
    done = gpu_check("--dry-run", "--cpu", "--only", "*lora-4bit*")
    assert done.returncode == 0, done.stderr
    assert "benchmarks/grids/gpu_text_smoke.yaml" in done.stdout and "--only *lora-4bit*" in done.stdout
    # The vision grid has no 4-bit run, and the harness refuses a pattern that names no run: it is left out.
    assert "== grid gpu_vision_smoke: no run matches --only *lora-4bit*; skipped" in done.stdout
    assert "gpu_vision_smoke.yaml" not in done.stdout


def test_without_a_gpu_the_cuda_check_stops_in_one_line(tmp_path):
    done = gpu_check("--out", str(tmp_path / "out"))
    assert done.returncode == 2
    assert done.stderr.strip() == ("error: no CUDA GPU visible to torch (torch.cuda.is_available() is false); run "
                                   "with --cpu for the CPU smoke of these steps")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, message", [
    (["--bogus"], "error: unknown argument --bogus; usage: bash benchmarks/gpu_check.sh"),
    (["--timeout", "ten"], "error: --timeout takes whole seconds, got ten"),
])
def test_bad_arguments_are_one_line(args, message):
    done = gpu_check(*args)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and done.stderr.startswith(message)


@pytest.mark.slow  # two real runs on CPU (text LoRA on 4-bit frozen weights, vision full fine-tuning), then the report
def test_cpu_run_writes_the_records_and_the_report(tmp_path):
    out = tmp_path / "out"
    done = gpu_check("--cpu", "--out", str(out), "--runs", str(tmp_path / "runs"), "--only", "*lora-4bit*",
                     "--only", "*full-recipe*", timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["device"].startswith("cpu") and report["bf16_peak_tflops"] is None
    runs = {row["cell"]: row for row in report["runs"]}
    assert set(runs) == {"minilm__rotten_tomatoes__lora-4bit__seed42", "minilm__rotten_tomatoes__full-recipe__seed42",
                         "lite0__animal_mnist__full-recipe__seed42"}
    for row in runs.values():
        assert row["status"] == "ok" and row["samples_per_s"] > 0 and row["peak_memory_mb"] > 0
        assert row["fraction_of_bf16_peak"] is None  # a CPU has no entry in the GPU table
    assert runs["minilm__rotten_tomatoes__lora-4bit__seed42"]["quantization"] == "4bit"
    # Model FLOPs come from the engine's record, where its rule holds: full fine-tuning of the text model only.
    assert runs["minilm__rotten_tomatoes__full-recipe__seed42"]["model_tflops_per_s"] > 0
    assert runs["minilm__rotten_tomatoes__lora-4bit__seed42"]["model_tflops_per_s"] is None
    assert runs["minilm__rotten_tomatoes__lora-4bit__seed42"]["padded_tokens_per_s"] > 0
    assert runs["lite0__animal_mnist__full-recipe__seed42"]["padded_tokens_per_s"] is None  # images: no tokens
    assert "| minilm__rotten_tomatoes__lora-4bit__seed42 |" in (out / "gpu_check.md").read_text()
    with tarfile.open(out / "records.tar.gz") as archive:
        names = archive.getnames()
    assert "records/gpu_text_smoke/minilm__rotten_tomatoes__lora-4bit__seed42.json" in names
    assert "./gpu_vision_smoke/lite0__animal_mnist__full-recipe__seed42.log" in names
