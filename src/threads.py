"""CPU threads for a command: the cores other processes leave free, unless the user chose a number.

torch starts one intra-op thread per physical core. On a machine where other jobs already keep cores busy, that
oversubscribes it, and the MoE path, made of many small operations that each end in a barrier of all threads,
slows far more than the dense one (measured in BENCHMARKS.md, "Threads on a loaded machine"). So a command that was
not given ``--threads`` (and runs without ``OMP_NUM_THREADS``/``MKL_NUM_THREADS``) starts with as many threads as
there are cores other processes leave free right now (``/proc/stat`` over 0.3 s), at least one, at most torch's own
default.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

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


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs from /proc/stat, or None off Linux."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def busy_cores(window: float = 0.3) -> float:
    """Cores other processes keep busy right now: /proc/stat sampled over ``window`` seconds while this process
    sleeps (the load average lags by a minute: just after a pip install it still reports a busy machine); the
    1-minute load average where /proc/stat is missing."""
    first = _cpu_times()
    if first is None:
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    time.sleep(window)
    second = _cpu_times()
    busy, total = second[0] - first[0], second[1] - first[1]
    return (os.cpu_count() or 1) * busy / total if total > 0 else 0.0


def default_threads(argv: Sequence[str]) -> str | None:
    """Lower torch's thread count to the free cores unless the user chose one; returns a one-line note when it
    lowered it (None otherwise)."""
    if chose_threads(argv):
        return None
    cores = torch.get_num_threads()
    load = busy_cores()
    threads = free_cores(cores, load)
    if threads >= cores:
        return None
    torch.set_num_threads(threads)
    return f"threads: {threads} of {cores} ({load:.1f} cores busy with other processes; --threads N or OMP_NUM_THREADS to choose)"
