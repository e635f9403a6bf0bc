"""How many intra-op CPU threads a run uses: every physical core of its share of the machine, unless the user says.

The rule, in order (`choose_cpu_threads`):
1. `train.cpu_threads`, when set;
2. `OMP_NUM_THREADS` as the user gave it (in the shell, or as `accelerate launch --num_cpu_threads_per_process N`,
   which accelerate passes on as `OMP_NUM_THREADS=N`);
3. otherwise the physical cores this process may run on (its CPU affinity and cgroup quota, over the hardware
   threads per core) divided by the processes of the run on this machine (`LOCAL_WORLD_SIZE`).

Why rule 2 needs care: `accelerate launch` (1.15, `commands/launch.py` `_validate_launch_command`) sets
`num_cpu_threads_per_process` to the launcher's own `OMP_NUM_THREADS`, or to 1 when it has none (its all-cores
default applies only with `--cpu`), and `utils/launch.py` always exports it to the script as `OMP_NUM_THREADS`. So
on a machine without a GPU the README's `accelerate launch recipes/text_classification.py` ran on one core, and the
script cannot tell that 1 from a user's 1 by its own environment: accelerate exports nothing that says where the
value came from. The launcher's process can: it is the script's parent (the single-process launcher starts it with
`subprocess.Popen`, the multi-process one through torch elastic, in the same process), and its environment as it was
started (`/proc/<pid>/environ`; accelerate patches only its `os.environ` copy) and its command line are the user's.
So `OMP_NUM_THREADS` counts as accelerate's own when the script runs under `accelerate launch` (it exports
`ACCELERATE_DYNAMO_BACKEND` to every script it starts) and the launcher was given neither `OMP_NUM_THREADS` nor
`--num_cpu_threads_per_process`. When the launcher cannot be read (another user's process), the value is kept: the
old one-thread behaviour, never a thread count the user did not ask for.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

LAUNCHER_FLAG = "--num_cpu_threads_per_process"
# Exported by both of accelerate's local launchers (simple and multi-process) to the scripts they start.
ACCELERATE_MARKER = "ACCELERATE_DYNAMO_BACKEND"


@dataclass(frozen=True)
class ThreadChoice:
    """A thread count and the rule that chose it, for the run's log."""

    threads: int
    reason: str


def choose_cpu_threads(*, configured: int | None, omp_num_threads: str | None, omp_from_launcher: bool,
                       cpus: int, threads_per_core: int, local_processes: int) -> ThreadChoice:
    """The run's intra-op thread count (the module docstring's rule, as a pure function).

    Args:
        configured: `train.cpu_threads` (None: unset).
        omp_num_threads: the process's `OMP_NUM_THREADS` (None: unset).
        omp_from_launcher: whether that value was set by `accelerate launch` itself, not by the user.
        cpus: logical CPUs this process may use (affinity, capped by a cgroup quota).
        threads_per_core: hardware threads per physical core (2 with SMT/hyper-threading).
        local_processes: processes of this run on this machine.
    """
    if configured is not None:
        return ThreadChoice(configured, "train.cpu_threads")
    user_threads = _leading_int(omp_num_threads) if not omp_from_launcher else None
    if user_threads is not None:
        return ThreadChoice(user_threads, "OMP_NUM_THREADS")
    cores = max(1, cpus // max(1, threads_per_core))
    processes = max(1, local_processes)
    share = f"{cores} physical cores / {processes} local processes" if processes > 1 else f"{cores} physical cores"
    return ThreadChoice(max(1, cores // processes), f"all cores: {share}")


def set_cpu_threads(configured: int | None) -> ThreadChoice:
    """Choose this process's thread count from its environment and apply it with `torch.set_num_threads`."""
    env = os.environ
    launcher = _parent_launch() if ACCELERATE_MARKER in env else (None, None)
    choice = choose_cpu_threads(
        configured=configured, omp_num_threads=env.get("OMP_NUM_THREADS"),
        omp_from_launcher=omp_set_by_accelerate(env, *launcher),
        cpus=usable_cpus(), threads_per_core=_threads_per_core(),
        local_processes=local_processes(env),
    )
    torch.set_num_threads(choice.threads)
    return choice


def share_of_cores(processes: int) -> ThreadChoice:
    """Threads per process when `processes` processes split this process's share of the machine (rule 3 above; e.g.
    the workers of a `peftlab tune` study on one machine)."""
    return choose_cpu_threads(configured=None, omp_num_threads=None, omp_from_launcher=False, cpus=usable_cpus(),
                              threads_per_core=_threads_per_core(), local_processes=processes)


# torch elastic (accelerate launch, torchrun), then the MPI launchers accelerate itself reads (commands/launch.py).
LOCAL_SIZE_VARS = ("LOCAL_WORLD_SIZE", "MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "MV2_COMM_WORLD_LOCAL_SIZE")


def local_processes(env) -> int:
    """Processes of this run on this machine, from the launcher's environment (1 when none says)."""
    return next((int(env[name]) for name in LOCAL_SIZE_VARS if env.get(name, "").isdigit()), 1)


def omp_set_by_accelerate(env, launcher_env: dict | None, launcher_argv: list[str] | None) -> bool:
    """Whether `env`'s OMP_NUM_THREADS is accelerate launch's own default rather than the user's.

    Args:
        env: this process's environment.
        launcher_env, launcher_argv: the parent process's environment at its start and its command line; None when
            they cannot be read (then the value counts as the user's).
    """
    if "OMP_NUM_THREADS" not in env or ACCELERATE_MARKER not in env:
        return False
    if launcher_env is None or launcher_argv is None:
        return False
    given_flag = any(arg == LAUNCHER_FLAG or arg.startswith(LAUNCHER_FLAG + "=") for arg in launcher_argv)
    return "OMP_NUM_THREADS" not in launcher_env and not given_flag


def usable_cpus() -> int:
    """Logical CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota (a container's
    `--cpus 2` on a 64-CPU host leaves all 64 in the mask, but only 2 CPUs' worth of time)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, -(-int(quota) // int(period))))  # 150000/100000 -> 2 CPUs
    except (OSError, ValueError):
        pass
    return cpus


def _threads_per_core() -> int:
    import psutil  # an accelerate dependency

    logical, physical = psutil.cpu_count(logical=True), psutil.cpu_count(logical=False)
    return max(1, logical // physical) if logical and physical else 1


def _parent_launch() -> tuple[dict | None, list[str] | None]:
    """The parent process's start-time environment and command line, or (None, None) when unreadable."""
    import psutil

    try:
        parent = psutil.Process().parent()
        return (parent.environ(), parent.cmdline()) if parent is not None else (None, None)
    except (psutil.Error, OSError):
        return None, None


def _leading_int(value: str | None) -> int | None:
    """OMP_NUM_THREADS as a count: `4`, or the outer level of a nested list such as `4,2`; None when not a count."""
    try:
        count = int((value or "").split(",")[0])
    except ValueError:
        return None
    return count if count > 0 else None
