"""CPU defaults of a command: the threads the load average leaves free, large allocations kept for reuse."""

from __future__ import annotations

import sys

import pytest
import torch

from src import cpu_allocator, threads


@pytest.mark.parametrize(
    ("cores", "load", "expected"),
    [(2, 0.0, 2), (2, 0.4, 2), (2, 0.6, 1), (2, 1.9, 1), (2, 7.0, 1), (16, 3.2, 13), (16, 0.0, 16)],
)
def test_free_cores(cores, load, expected):
    assert threads.free_cores(cores, load) == expected


def test_a_flag_or_the_openmp_variables_mean_the_user_chose():
    assert threads.chose_threads(["fit", "--threads", "2"], env={})
    assert threads.chose_threads(["fit", "--threads=2"], env={})
    assert threads.chose_threads(["fit"], env={"OMP_NUM_THREADS": "1"})
    assert threads.chose_threads(["fit"], env={"MKL_NUM_THREADS": "3"})
    assert not threads.chose_threads(["fit", "--config", "x.yaml"], env={"OMP_NUM_THREADS": ""})


def test_default_lowers_torch_threads_only_under_load(monkeypatch):
    saved = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    try:
        torch.set_num_threads(4)
        monkeypatch.setattr(threads, "busy_cores", lambda: 2.7)
        note = threads.default_threads(["evaluate"])
        assert torch.get_num_threads() == 1 and note.startswith("threads: 1 of 4 (2.7 cores busy")
        torch.set_num_threads(4)
        monkeypatch.setattr(threads, "busy_cores", lambda: 0.2)
        assert threads.default_threads(["evaluate"]) is None and torch.get_num_threads() == 4
        monkeypatch.setattr(threads, "busy_cores", lambda: 3.5)
        assert threads.default_threads(["evaluate", "--threads", "4"]) is None and torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(saved)


def test_large_cpu_blocks_are_kept_unless_the_user_set_malloc():
    assert cpu_allocator.keep_large_allocations(env={"MALLOC_MMAP_THRESHOLD_": "65536"}) is False
    changed = cpu_allocator.keep_large_allocations(env={})
    assert changed is sys.platform.startswith("linux")  # glibc here; elsewhere a no-op


def test_busy_cores_sees_a_busy_loop_at_once():
    import multiprocessing

    idle = threads.busy_cores(0.3)
    if idle > (threads.os.cpu_count() or 1) - 1:
        pytest.skip(f"{idle:.1f} cores already busy: no free core for the busy loop to show on")
    burner = multiprocessing.Process(target=_burn, daemon=True)
    burner.start()
    try:
        busy = threads.busy_cores(0.5)
    finally:
        burner.terminate()
    assert 0.0 <= idle <= (threads.os.cpu_count() or 1)
    assert busy >= idle + 0.5  # one more core spinning shows within half a second, unlike the load average


def _burn() -> None:
    while True:
        pass
