"""The CPU thread rule (peftlab.threads): all physical cores of the process's share unless the user says (instant)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from peftlab.threads import choose_cpu_threads, local_processes, omp_set_by_accelerate, usable_cpus

ROOT = Path(__file__).parents[1]
MACHINE = dict(cpus=2, threads_per_core=1, local_processes=1)  # 2 logical CPUs in the affinity mask


def threads(configured=None, omp=None, from_launcher=False, **machine):
    return choose_cpu_threads(configured=configured, omp_num_threads=omp, omp_from_launcher=from_launcher,
                              **{**MACHINE, **machine}).threads


@pytest.mark.parametrize("kwargs, expected", [
    ({}, 2),                                                  # python recipe.py on 2 idle cores
    ({"local_processes": 2}, 1),                              # 2-process DDP shares them
    ({"cpus": 16, "local_processes": 3}, 5),                  # 16 cores / 3 processes, rounded down
    ({"cpus": 16, "threads_per_core": 2}, 8),                 # SMT: 16 logical CPUs are 8 cores
    ({"cpus": 1, "threads_per_core": 2, "local_processes": 4}, 1),  # never 0
    ({"omp": "3"}, 3),                                        # the user's OMP_NUM_THREADS wins
    ({"omp": "1", "local_processes": 2}, 1),
    ({"omp": "4,2"}, 4),                                      # a nested OpenMP list: its outer level
    ({"omp": "lots"}, 2),                                     # not a count: ignored
    ({"omp": "1", "from_launcher": True}, 2),                 # accelerate launch's own 1: all cores
    ({"configured": 1}, 1),                                   # train.cpu_threads wins over all
    ({"configured": 4, "omp": "3"}, 4),
    ({"configured": 3, "omp": "1", "from_launcher": True, "local_processes": 2}, 3),
])
def test_thread_rule(kwargs, expected):
    assert threads(**kwargs) == expected


@pytest.mark.parametrize("env, expected", [
    ({}, 1), ({"LOCAL_WORLD_SIZE": "2"}, 2), ({"OMPI_COMM_WORLD_LOCAL_SIZE": "4"}, 4), ({"LOCAL_WORLD_SIZE": ""}, 1),
])
def test_local_processes_come_from_the_launcher(env, expected):
    assert local_processes(env) == expected


LAUNCHED = {"ACCELERATE_DYNAMO_BACKEND": "NO", "OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize("env, launcher_env, launcher_argv, accelerates", [
    (LAUNCHED, {}, ["accelerate", "launch", "train.py"], True),            # accelerate's default 1
    (LAUNCHED, {"OMP_NUM_THREADS": "1"}, ["accelerate", "launch", "train.py"], False),  # passed on from the user
    (LAUNCHED, {}, ["accelerate", "launch", "--num_cpu_threads_per_process", "1", "train.py"], False),
    (LAUNCHED, {}, ["accelerate", "launch", "--num_cpu_threads_per_process=1", "train.py"], False),
    (LAUNCHED, None, None, False),                                          # launcher unreadable: keep the value
    ({"OMP_NUM_THREADS": "1"}, {}, ["bash"], False),                        # python train.py: the user's
    ({"ACCELERATE_DYNAMO_BACKEND": "NO"}, {}, ["accelerate", "launch"], False),  # nothing to override
])
def test_accelerate_default_is_told_from_the_users(env, launcher_env, launcher_argv, accelerates):
    assert omp_set_by_accelerate(env, launcher_env, launcher_argv) is accelerates


@pytest.mark.slow  # the real launcher, a recipe-free script: seconds each, but two launches
@pytest.mark.parametrize("launcher_omp", [None, "1"])
def test_under_accelerate_launch(tmp_path, launcher_omp):
    """The real launcher: its exported OMP_NUM_THREADS=1 gives way to all cores, the user's does not (~5 s each)."""
    import psutil

    probe = tmp_path / "probe.py"
    probe.write_text("import torch\nfrom peftlab.threads import set_cpu_threads\n"
                     "set_cpu_threads(None)\nprint('threads', torch.get_num_threads())\n")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env.update(PYTHONPATH=str(ROOT), **({"OMP_NUM_THREADS": launcher_omp} if launcher_omp else {}))
    out = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", str(probe)], env=env, cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    cores = max(1, usable_cpus() // max(1, psutil.cpu_count() // psutil.cpu_count(logical=False)))
    assert f"threads {cores if launcher_omp is None else 1}" in out
