"""Timing shared by the benchmarks: interleaved repeats, medians, CUDA-synchronised when on a GPU."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def time_interleaved(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int, device: torch.device | None = None
) -> dict[str, float]:
    """Median seconds per function, the functions called round robin so that load drifts hit all alike."""
    cuda = device is not None and device.type == "cuda"

    def timed(fn: Callable[[], object]) -> float:
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(timed(fn))
    return {name: statistics.median(times) for name, times in samples.items()}
