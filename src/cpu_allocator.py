"""Keep large CPU allocations in the heap instead of mapping and unmapping them on every call (glibc malloc).

glibc serves every allocation above its mmap threshold (at most 32 MiB by default) with a fresh ``mmap`` and
returns it with ``munmap`` when freed, so a tensor of that size created on every call (an FFN hidden at batch 8,
the gathered rows of an MoE layer) is page-faulted in afresh each time: a 35 MB GEMM + GELU output takes 86 ms
instead of 59 ms on one core (``python -m benchmarks.sampling`` numbers in BENCHMARKS.md were measured with the
setting on). Raising the mmap and trim thresholds to 1 GiB keeps such blocks for reuse; the cost is a process that
returns freed memory to the system later. The same as ``MALLOC_MMAP_THRESHOLD_=1000000000
MALLOC_TRIM_THRESHOLD_=1000000000`` in the environment (what ``make run`` sets), applied by the CLI at start-up
when neither variable is set; a no-op off glibc.
"""

from __future__ import annotations

import ctypes
import os
import sys

ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
THRESHOLD = 1_000_000_000
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)


def keep_large_allocations(env: dict[str, str] | None = None) -> bool:
    """Raise glibc's mmap and trim thresholds unless the user set them; True when it changed them."""
    env = os.environ if env is None else env
    if not sys.platform.startswith("linux") or any(name in env for name in ENV):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, ...)
        return False
    if not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, THRESHOLD)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, THRESHOLD))
