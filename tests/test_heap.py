"""glibc heap settings: safe to call anywhere, and given to local Dask worker processes."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from agriseg import heap
from agriseg.predict import WORKER_MALLOC_ENV


def test_limit_arenas_and_trim_are_safe_with_threads() -> None:
    heap.limit_arenas()

    def churn() -> None:
        for _ in range(20):
            np.ones(2**20).sum()

    threads = [threading.Thread(target=churn) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    heap.trim()


def test_worker_processes_get_the_arena_limit() -> None:
    assert WORKER_MALLOC_ENV["MALLOC_ARENA_MAX"] == heap.ARENA_MAX


def test_the_environment_sets_the_arena_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_ARENA_MAX", "8")
    assert heap._arena_max() == 8
    for bad in ("", "0", "many"):
        monkeypatch.setenv("MALLOC_ARENA_MAX", bad)
        assert heap._arena_max() == 2
