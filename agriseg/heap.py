"""glibc heap settings for long runs of many large arrays (no-ops without glibc).

Tiles allocate and free arrays of a few to a few tens of MB on several threads. glibc gives
each thread that meets a locked arena a new one (up to 8 per core), and every arena keeps its
own free pages, so memory crept up through a long run and freed pages were faulted in again
elsewhere. Two arenas are enough for a handful of threads that allocate a few times per step.
Measured on 2 cores, 268 MP label-free run, tiles only: peak 0.65 -> 0.55 GB and 34.5 ->
28.5 s (see benchmarks/RESULTS.md).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os

log = logging.getLogger(__name__)


def _arena_max(default: int = 2) -> int:
    value = os.environ.get("MALLOC_ARENA_MAX", "")
    return int(value) if value.isdigit() and int(value) > 0 else default


ARENA_MAX = _arena_max()
"""Most malloc arenas of a process running tiles (glibc's ``M_ARENA_MAX``): 2, or what
``MALLOC_ARENA_MAX`` in the environment says. Measured on 2 cores only; a 16-core GPU host
with 8-16 tile threads may want more."""

_M_ARENA_MAX = -8  # mallopt parameter number, from glibc's malloc.h


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, Windows, musl)
        return None


def limit_arenas(count: int = ARENA_MAX) -> None:
    """Cap the arenas that threads created from now on may get (existing ones stay)."""
    libc = _libc()
    with contextlib.suppress(AttributeError):
        if libc is not None and not libc.mallopt(_M_ARENA_MAX, count):
            log.debug("mallopt(M_ARENA_MAX, %d) refused", count)


def trim() -> None:
    """Return the heap's free pages to the system (glibc keeps them otherwise)."""
    libc = _libc()
    with contextlib.suppress(AttributeError):
        if libc is not None:
            libc.malloc_trim(0)
