"""CPU threads for a command: the cores other processes leave free, unless the user chose a number.

torch starts one intra-op thread per physical core. On a machine where other jobs already keep cores busy, that
oversubscribes it, and the MoE path, made of many small operations that each end in a barrier of all threads,
slows far more than the dense one (measured in BENCHMARKS.md, "Threads on a loaded machine"). So a command that was
not given ``--threads`` (and runs without ``OMP_NUM_THREADS``/``MKL_NUM_THREADS``) starts with as many threads as
there are cores the last minute's load average leaves free, at least one, at most torch's own default.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def free_cores(cores: int, load: float) -> int:
    """Cores not taken by a load average of ``load`` on ``cores`` cores: cores − round(load), at least 1."""
    return max(1, min(cores, cores - round(load)))


def chose_threads(argv: Sequence[str], env: dict[str, str] | None = None) -> bool:
    """Whether the user set the thread count: a ``--threads`` flag or one of the OpenMP/MKL variables."""
    env = os.environ if env is None else env
    flag = any(arg == "--threads" or arg.startswith("--threads=") for arg in argv)
    return flag or any(env.get(name) for name in THREAD_ENV)


def default_threads(argv: Sequence[str]) -> str | None:
    """Lower torch's thread count to the free cores unless the user chose one; returns a one-line note when it
    lowered it (None otherwise)."""
    if chose_threads(argv) or not hasattr(os, "getloadavg"):
        return None
    cores = torch.get_num_threads()
    load = os.getloadavg()[0]
    threads = free_cores(cores, load)
    if threads >= cores:
        return None
    torch.set_num_threads(threads)
    return (
        f"threads: {threads} of {cores} (load average {load:.1f} from other processes; --threads N or "
        "OMP_NUM_THREADS to choose)"
    )
