"""Worker processes for the chunked post-processing passes (zones, field summaries).

Per-chunk work (read, label, trace, rasterise, count) is mostly C code that holds the GIL
(``ndimage.label``, ``rasterize`` and ``shapes`` ran no faster on two threads than on one), so
extra cores need processes. The post steps run after the Dask cluster is closed, hence a small
pool of our own: :func:`ordered_map` hands chunks to the workers and computes the others in the
calling process, so the caller never idles while workers start or are busy, and yields results
in chunk order (merging in order keeps results identical to a serial run).

Workers are forked (Linux only; elsewhere everything runs in the calling process): they start
in milliseconds with every module already imported, where ``spawn`` and ``forkserver`` cost a
second of imports per pool and re-run the caller's main script in each worker (a script or
notebook without a ``__main__`` guard would break). Forking a process that runs other threads
can copy a lock in its held state; the post steps run after the Dask cluster is closed, and
the workers only read rasters and run numpy, scipy, rasterio and shapely on their own chunk
(no logging, no Dask). The pool is created on first use and kept for the rest of the process
(zones and summaries share it); set ``AGRISEG_POST_WORKERS=0`` to run everything in the
calling process.

A process that imported PyTorch (a learned model ran its tiles here) is the exception: it
carries ~0.3 GB of anonymous pages and ~0.2 GB of touched library pages, which every forked
worker maps and counts in its own RSS (the pages are shared, so physical memory does not
grow, but the process tree's summed RSS did, by the parent's whole size). There, when the
caller allowed it (:func:`allow_fork_server`; the CLI does), workers start from
multiprocessing's fork server instead: a fresh interpreter that imported only the
post-processing modules, forked in milliseconds per worker after its one start. Library
callers keep plain fork: the fork server re-imports the caller's main script in each worker,
which would re-run a script without a ``__main__`` guard.

A lock copied in its held state still happens: a worker hung twice in the test suite inside
PROJ's SQLite mutex, at its first ``rasterio.open``. GDAL gives each thread its own PROJ
context (and SQLite connection), and a forked worker's main thread inherits the forking
thread's, which another thread of the parent may have been using at that instant (a CRS
object made in one thread is freed in whichever thread drops it). So workers run the chunks
in a thread of their own, with a fresh context. And nothing waits on a worker unbounded: a
chunk that takes far longer on a worker than any chunk took in the calling process gets the
workers killed and is computed here, and stopping the pool kills workers that do not exit.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.connection import wait as wait_for
from typing import TypeVar, cast

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

_pool: ProcessPoolExecutor | None = None
_pool_workers = 0
_fork_server_allowed = False
#: What the fork server imports once, before forking workers: the modules whose chunk
#: functions the pools run (their imports pull numpy, scipy, rasterio and shapely).
FORK_SERVER_PRELOAD = ("agriseg._no_interrupt", "agriseg.vectorize", "agriseg.fields")

#: A worker's chunk is presumed stuck after this many seconds ...
STUCK_MIN_S = 300.0
#: ... or this many times the slowest chunk computed in the calling process, if longer.
STUCK_FACTOR = 20.0
#: Seconds idle workers get to exit when the pool stops, before they are killed.
STOP_GRACE_S = 10.0


def post_workers() -> int:
    """Worker processes besides the caller: ``AGRISEG_POST_WORKERS``, else usable cores - 1."""
    env = os.environ.get("AGRISEG_POST_WORKERS")
    if env is not None and env.strip().isdigit():
        return int(env)
    if sys.platform != "linux":
        return 0  # no safe fork: serial
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(0, cores - 1)


def allow_fork_server(allowed: bool = True) -> None:
    """Let pools started from a process that imported PyTorch use the fork server.

    Only for a caller whose main module is safe to import again in each worker (the CLI's
    entry points are; a script without a ``__main__`` guard is not).
    """
    global _fork_server_allowed
    _fork_server_allowed = allowed


def start_method() -> str:
    """How the next pool starts its workers: ``fork``, or ``forkserver`` (see module doc)."""
    if (_fork_server_allowed and "torch" in sys.modules
            and "forkserver" in multiprocessing.get_all_start_methods()):
        return "forkserver"
    return "fork"


#: File descriptors forked workers close first thing (see :func:`keep_from_workers`).
_KEPT_FROM_WORKERS: set[int] = set()
def keep_from_workers(fd: int, kept: bool = True) -> None:
    """Have forked workers close ``fd`` at once (``kept=False``: no longer).

    A forked worker shares its parent's open files, and with them a ``flock``: the output
    folder's run lock outlived a run killed during its field summaries, in a worker that
    waited forever, and every rerun was refused as "another agriseg run is writing there".
    """
    (_KEPT_FROM_WORKERS.add if kept else _KEPT_FROM_WORKERS.discard)(fd)


def _worker_start() -> None:
    """Worker start: leave Ctrl-C to the run, drop the parent's kept files, die with it.

    SIGINT reaches the whole process group; the run handles it (it stops this pool), and a
    worker's own KeyboardInterrupt only printed a second traceback. A worker whose run is
    killed outright gets no word: it waits on a task queue whose other end it holds itself
    (forked copies), so a thread waits on the sentinel multiprocessing gives it of the
    process that asked for it (the run, also through the fork server, which the workers kept
    alive: watching the parent pid saw the server and never fired) and ends the worker.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for fd in _KEPT_FROM_WORKERS:  # the copy of the set this fork took
        with contextlib.suppress(OSError):
            os.close(fd)
    parent = multiprocessing.parent_process()
    if parent is None:
        return
    sentinel = parent.sentinel

    def watch() -> None:
        wait_for([sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="agriseg-orphan-watch", daemon=True).start()


class _Pool(ProcessPoolExecutor):
    """A process pool whose workers are born with Ctrl-C blocked.

    The initializer's SIG_IGN comes too late for a Ctrl-C between a worker's fork (or the
    fork server's start, which imports ``site`` first) and its first line: the child then
    printed "Fatal Python error: init_import_site" or a traceback beside the run's own
    message. The signal is blocked in the spawning thread only while a worker starts; a
    child keeps the mask (through exec too), and the run gets the pending Ctrl-C at once.
    """

    def _spawn_process(self) -> None:  # CPython's hook for every worker start (3.9+)
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        # The fork server runs `python -c`, which puts the working folder first on sys.path
        # (Python 3.11 does not apply the parent's path there): run from the folder holding a
        # clone, its `agriseg/` shadowed the installed package and every worker died on its
        # imports. PYTHONSAFEPATH (3.11+) leaves the working folder out.
        safe = os.environ.get("PYTHONSAFEPATH")
        os.environ["PYTHONSAFEPATH"] = "1"
        try:
            super()._spawn_process()  # type: ignore[misc]
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
            if safe is None:
                os.environ.pop("PYTHONSAFEPATH", None)
            else:
                os.environ["PYTHONSAFEPATH"] = safe


def get_pool(workers: int) -> ProcessPoolExecutor | None:
    """The shared pool with ``workers`` processes (``None`` for 0), started on first use."""
    global _pool, _pool_workers
    if workers <= 0:
        return None
    if _pool is not None and _pool_workers == workers:
        return _pool
    shutdown_pool()
    method = start_method()
    ctx = multiprocessing.get_context(method)
    if method == "forkserver":
        # Takes effect when the server starts (the first such pool); it then serves the
        # process's later pools too.
        ctx.set_forkserver_preload(list(FORK_SERVER_PRELOAD))
    _pool = _Pool(max_workers=workers, mp_context=ctx, initializer=_worker_start)
    _pool_workers = workers
    return _pool


def worker_pids() -> list[int]:
    """Process ids of the shared pool's workers (empty when none is running), for monitoring."""
    if _pool is None:
        return []
    # ProcessPoolExecutor has no public list of its processes.
    procs = getattr(_pool, "_processes", None) or {}
    return [int(pid) for pid in procs]


def shutdown_pool(grace_s: float | None = None) -> None:
    """Stop the shared pool's processes (a later :func:`get_pool` starts new ones).

    Workers still alive ``grace_s`` seconds later (default :data:`STOP_GRACE_S`; idle ones
    exit at once) are killed: a worker stuck on a copied lock would never exit.
    """
    global _pool
    pool, _pool = _pool, None
    if pool is None:
        return
    procs = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    deadline = time.monotonic() + (STOP_GRACE_S if grace_s is None else grace_s)
    for proc in procs:
        # The sentinel, not join/is_alive: the pool's own manager thread reaps its workers,
        # and a process reaped by another thread can look alive to this one.
        if not wait_for([proc.sentinel], max(0.0, deadline - time.monotonic())):
            log.warning("a post-processing worker (pid %s) did not stop; killing it", proc.pid)
            proc.kill()
            wait_for([proc.sentinel], 5)


atexit.register(shutdown_pool)

# A worker's own thread for its chunks (see the module doc), made on its first chunk.
_chunk_thread: ThreadPoolExecutor | None = None
_chunk_thread_pid = 0


def _in_chunk_thread(fn: Callable[[T], R], item: T) -> R:
    """``fn(item)`` in this worker's chunk thread (not the main thread forked from the caller)."""
    global _chunk_thread, _chunk_thread_pid
    if _chunk_thread is None or _chunk_thread_pid != os.getpid():
        _chunk_thread = ThreadPoolExecutor(1, thread_name_prefix="agriseg-chunk")
        _chunk_thread_pid = os.getpid()
    return _chunk_thread.submit(fn, item).result()


def ordered_map(fn: Callable[[T], R], items: Iterable[T],
                workers: int | None = None) -> Iterator[R]:
    """``fn(item)`` for each item, in order, on the pool's workers and in this process.

    Each worker gets at most two chunks ahead (one running, one queued, so it never waits for
    the caller); the caller computes the next item itself whenever the workers are full, and
    always computes the last item itself unless a worker is idle: queued behind a running
    chunk it would finish a chunk later (with 4 chunks, the worker did 3 and the caller 1).
    At most ``4 * (workers + 1)`` results wait to be consumed, so memory stays bounded by a few
    chunks whatever the raster size. A chunk whose worker died is computed again here.

    Args:
        fn: a module-level function (it is pickled by reference for the workers).
        items: picklable arguments.
        workers: worker processes; default :func:`post_workers`.
    """
    n = post_workers() if workers is None else workers
    pool = get_pool(n)
    ahead = 2 * n
    limit = 4 * (n + 1)
    # (item, its future, or None with the result computed here)
    queue: deque[tuple[T, Future[R] | None, R | None]] = deque()
    slowest = [0.0]  # seconds of the slowest chunk computed here

    def here(item: T) -> R:
        t = time.monotonic()
        value = fn(item)
        slowest[0] = max(slowest[0], time.monotonic() - t)
        return value

    def head() -> R:
        item, fut, value = queue.popleft()
        if fut is None:
            return value  # type: ignore[return-value]  # computed here: fn's result
        try:
            return fut.result(timeout=max(STUCK_MIN_S, STUCK_FACTOR * slowest[0]))
        except BrokenProcessPool:
            log.warning("post-processing worker died; computing its chunk in this process")
            shutdown_pool()
            return here(item)
        except FutureTimeout:
            log.warning("a post-processing worker seems stuck; stopping the workers and "
                        "computing the rest in this process")
            shutdown_pool(grace_s=0.0)
            return here(item)

    it = iter(items)
    end = object()
    nxt: T | object = next(it, end)
    while nxt is not end:
        item = cast(T, nxt)
        nxt = next(it, end)  # one item ahead, to know the last one
        busy = sum(1 for q in queue if q[1] is not None and not q[1].done())
        pool = _pool if pool is not None else None  # gone after a worker died
        fut = None
        if pool is not None and busy < (n if nxt is end else ahead):
            try:
                fut = pool.submit(_in_chunk_thread, fn, item)
            except BrokenProcessPool:
                log.warning("post-processing workers died; continuing in this process")
                shutdown_pool()
        queue.append((item, fut, None) if fut is not None else (item, None, here(item)))
        while queue and (queue[0][1] is None or queue[0][1].done() or len(queue) >= limit):
            yield head()
    while queue:
        yield head()
