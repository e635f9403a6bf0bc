"""A recipe started the way the README starts it, `accelerate launch`, as a harness job.

    python benchmarks/accelerate_launch.py text_classification train.epochs=1 output_dir=runs/x
    python benchmarks/accelerate_launch.py --processes 2 text_classification output_dir=runs/x   # 2-process CPU DDP

One process: `accelerate launch recipes/<recipe>.py ...`; N processes: the README's CPU command,
`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N --main_process_port <free> ...`. The harness
runs every other cell as `python <script>`, which never meets the OMP_NUM_THREADS that accelerate exports (the
thread counts in benchmarks/grids/speed_threads.yaml depend on it). The recipe leaves its usual run folder.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port nothing listens on now, so the DDP rendezvous never meets another run's (tests use 29500+)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_command(recipe: str, processes: int, args: list[str]) -> tuple[list[str], dict[str, str]]:
    """The accelerate launch command line and environment of the recipe."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch"]
    env = dict(os.environ)
    if processes > 1:
        launcher += ["--multi_gpu", "--num_processes", str(processes), "--main_process_port", str(free_port())]
        env["ACCELERATE_USE_CPU"] = "1"
    return [*launcher, str(ROOT / "recipes" / f"{recipe}.py"), *args], env


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=1, help="local processes (more than 1: CPU DDP)")
    parser.add_argument("recipe", help="recipes/<recipe>.py, e.g. text_classification")
    known, rest = parser.parse_known_args(argv)
    command, env = launch_command(known.recipe, known.processes, rest)
    return subprocess.run(command, env=env, cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main())
