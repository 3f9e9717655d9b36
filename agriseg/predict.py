"""Dask orchestration: one task per tile, one writer, bounded memory, durable progress.

Each task receives small values (the :class:`SurveyRaster`, a :class:`Tile`, the segmenter and
its prepared parameters), opens the raster by path on the worker, reads core + halo, runs the
model and returns only the core as uint8 classes / confidence (plus requested float32 index
cores). The client consumes results with ``as_completed`` and keeps at most ``max_in_flight``
tasks submitted, so memory is bounded by tiles in flight, never by raster size.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask
import numpy as np
from distributed import Client, LocalCluster, as_completed

from agriseg import heap
from agriseg.classes import ClassSchema
from agriseg.errors import AgrisegError, ClusterError, OutputError, ResumeError
from agriseg.grid import Grid, Tile, TilePlan
from agriseg.indices import compute_index
from agriseg.models.base import Prepared, Segmenter, TileContext, reduce_scores
from agriseg.output import TileWriter, halve
from agriseg.raster import SurveyRaster, raw_scalable, read_tile, scale_values

log = logging.getLogger(__name__)

MAX_RESUBMITS = 3
"""How often a tile whose result was lost (worker died) is submitted again."""

Progress = Callable[[int, int, int], None]
"""``progress(tiles_done, tiles_total, core_pixels_done)``."""


@dataclass(frozen=True, slots=True)
class TileResult:
    """Core arrays of one finished tile, keyed by output name."""

    tile: Tile
    arrays: dict[str, np.ndarray]
    seconds: float
    # Pixels per value of arrays["classes"], counted on the worker (in parallel, rather than
    # by the single writer).
    class_counts: np.ndarray | None = None
    # First overview level of some arrays, made on the worker (output.halve) for the same
    # reason: on a GPU the writer threads bounded the tile stream (profiles of 1 GP runs on
    # H200s, benchmarks/RESULTS.md).
    halves: dict[str, np.ndarray] = field(default_factory=dict)


def scores_to_outputs(
    scores: np.ndarray, valid: np.ndarray, nodata: int = 255
) -> tuple[np.ndarray, np.ndarray]:
    """Class ids and confidence (percent, 0..100) from ``(K, H, W)`` probabilities."""
    classes, conf = reduce_scores(scores)
    return _mask_nodata(classes, conf, valid, nodata)


def _mask_nodata(
    classes: np.ndarray, conf: np.ndarray, valid: np.ndarray, nodata: int
) -> tuple[np.ndarray, np.ndarray]:
    classes[~valid] = nodata
    conf[~valid] = 255
    return classes, conf


def segment_tile(
    survey: SurveyRaster,
    tile: Tile,
    segmenter: Segmenter,
    params: Any,
    index_names: tuple[str, ...] = (),
    probabilities: tuple[tuple[str, int], ...] = (),
    halving: tuple[tuple[str, float, str], ...] = (),
) -> TileResult:
    """Read, segment and crop one tile (runs on a worker).

    ``probabilities`` names the classes (with their score plane) whose probability, in
    percent, is returned as ``probability/<name>`` beside the classes and confidence.
    ``halving`` names outputs (with nodata and resampling) whose first overview level is
    returned too (:func:`agriseg.output.halve`).
    """
    t0 = time.perf_counter()
    roles = tuple(dict.fromkeys((*segmenter.roles, *_index_roles(index_names))))
    # Models that can reduce their scores where they run (PyTorch on a GPU) return classes
    # and confidence directly; the others return probabilities.
    reduce = None if probabilities else getattr(segmenter, "predict_classes", None)
    scale = raw_band_scale(survey, segmenter, probabilities)
    raw = scale is not None
    pixels, valid = read_tile(survey, roles, tile, raw=raw)
    # dict.fromkeys keeps order, so the model's channels come first.
    model_px = pixels[: len(segmenter.roles)]
    ys, xs = tile.core_in_padded
    ctx = TileContext(
        int(tile.core.row_off) - ys.start, int(tile.core.col_off) - xs.start, survey.grid.gsd_m,
        margin=min(ys.start, xs.start, model_px.shape[1] - ys.stop, model_px.shape[2] - xs.stop),
        raster_shape=survey.grid.shape_yx,
    )
    core_valid = valid[ys, xs]
    nodata = segmenter.schema.nodata
    reduced = None
    if reduce is not None:
        scaling = {} if scale is None else {"scale": scale}
        reduced = reduce(model_px[None], valid[None], params, [ctx], **scaling)
    if reduced is None and raw:
        pixels = scale_values(pixels, survey)
        model_px, raw = pixels[: len(segmenter.roles)], False
    arrays: dict[str, np.ndarray] = {}
    if reduced is not None:
        classes, conf = (np.ascontiguousarray(a[0][ys, xs]) for a in reduced)
        classes, conf = _mask_nodata(classes, conf, core_valid, nodata)
    else:
        scores = segmenter.predict(model_px[None], valid[None], params, [ctx])[0][:, ys, xs]
        classes, conf = scores_to_outputs(scores, core_valid, nodata)
        for name, plane in probabilities:
            percent = np.clip(scores[plane], 0, 1) * np.float32(100)
            prob = np.rint(percent, out=percent).astype(np.uint8)
            prob[~core_valid] = 255
            arrays[f"probability/{name}"] = prob
    arrays = {"classes": classes, "confidence": conf, **arrays}
    core_px = pixels[:, ys, xs]
    if raw and index_names:
        core_px = scale_values(core_px, survey)
    for name in index_names:
        values = compute_index(name, core_px, roles)
        values[~core_valid] = np.nan
        arrays[f"indices/{name}"] = values
    counts = value_counts(classes, (*(c.value for c in segmenter.schema.classes), nodata))
    halves = {name: halve(arrays[name], nd, resampling)
              for name, nd, resampling in halving if name in arrays}
    return TileResult(tile, arrays, time.perf_counter() - t0, counts, halves)


def raw_band_scale(survey: SurveyRaster, segmenter: Segmenter,
                   probabilities: tuple[tuple[str, int], ...] = ()) -> float | None:
    """The scale with which :func:`segment_tile` hands ``segmenter`` 8-bit band values.

    None where it hands over scaled float32: the segmenter does not take raw bands
    (``takes_raw_bands``), the bands are not 8-bit (:func:`~agriseg.raster.raw_scalable`), or
    the run asks for probabilities (``predict``, not ``predict_classes``). A model that takes
    them scales them where it runs: a GPU gets a quarter of the bytes, and the tile threads
    skip a float32 pass over every pixel.
    """
    if probabilities or not getattr(segmenter, "takes_raw_bands", False):
        return None
    return survey.scale if raw_scalable(survey) else None


def value_counts(values: np.ndarray, expected: Sequence[int]) -> np.ndarray:
    """Pixels per value (length 256) of a uint8 array whose values should be ``expected``.

    One comparison per expected value instead of ``np.bincount``, which widens the array to
    int64 and holds the GIL throughout: 8 ms per 4 MP tile on one core against 1.3 ms, and
    on a GPU host the worker threads queued behind it. Unexpected values fall back to it.
    """
    counts = np.zeros(256, np.int64)
    for v in expected:
        counts[v] = np.count_nonzero(values == v)
    if counts.sum() != values.size:
        counts = np.bincount(values.ravel(), minlength=256)
    return counts


def _index_roles(index_names: Sequence[str]) -> list[str]:
    from agriseg.indices import INDICES

    return [r for n in index_names for r in INDICES[n].roles]


# --------------------------------------------------------------------------- checkpoint


def input_identity(path: str) -> dict[str, Any]:
    """What a checkpoint belongs to: path, size, mtime and a checksum of the header."""
    st = os.stat(path)
    with open(path, "rb") as f:
        head = hashlib.sha256(f.read(65536)).hexdigest()
    return {"path": path, "size": st.st_size, "mtime": int(st.st_mtime), "header_sha256": head}


def _short(value: Any, most: int = 48) -> str:
    text = repr(value)
    return text if len(text) <= most else text[: most - 3] + "..."


def describe_changes(key: str, old: Any, new: Any, most: int = 3) -> str:
    """``key`` and what changed inside it: ``model (config.row_support: 0.5 -> 0.45)``."""
    found: list[str] = []

    def walk(a: Any, b: Any, where: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict) and a.get("name") != b.get("name"):
            # Another model altogether: its name says it, not every setting it has.
            here = f"{where}.name" if where else "name"
            found.append(f"{here}: {a.get('name')!r} -> {b.get('name')!r}")
        elif isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                if a.get(k) != b.get(k):
                    walk(a.get(k), b.get(k), f"{where}.{k}" if where else str(k))
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            for i, (x, y) in enumerate(zip(a, b, strict=True)):
                if x != y:  # items counted from 1, as in configuration errors
                    walk(x, y, f"{where} #{i + 1}" if where else f"#{i + 1}")
        elif isinstance(a, list) and isinstance(b, list):
            found.append(f"{where or key}: {len(a)} item(s) -> {len(b)}")
        elif a != b:
            text = f"{_short(a)} -> {_short(b)}"
            found.append(f"{where}: {text}" if where else text)

    walk(old, new, "")
    if not found:
        return key
    text = ", ".join(v if len(v) <= 120 else v[:117] + "..." for v in found[:most])
    return f"{key} ({text}{', ...' if len(found) > most else ''})"


@dataclass
class Checkpoint:
    """Durable record of finished tiles, written atomically beside the working files."""

    path: Path
    identity: dict[str, Any]
    done: set[str] = field(default_factory=set)

    @classmethod
    def load_or_new(cls, path: Path, identity: dict[str, Any], resume: bool) -> Checkpoint:
        """Load a matching checkpoint when resuming, else start empty.

        Raises:
            ResumeError: the checkpoint belongs to another input, model or parameters.
        """
        # Compare in JSON form: tuples in model configs come back from the file as lists.
        identity = json.loads(json.dumps(identity, default=str))
        if resume and path.exists():
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                log.warning("%s: unreadable checkpoint, starting over", path)
                return cls(path, identity)
            old = data.get("identity", {})
            changed = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
            if changed:
                what = "; ".join(describe_changes(k, old.get(k), identity.get(k)) for k in changed)
                raise ResumeError(
                    f"{path.parent.parent}: an unfinished run with a different {what} is "
                    "there; rerun with --overwrite to start over, or restore the original "
                    "input and options to resume it"
                )
            done = set(data.get("done", []))
            log.info("resuming: %d tile(s) already done", len(done))
            return cls(path, identity, done)
        return cls(path, identity)

    def save(self) -> None:
        """Write atomically (temporary file + rename).

        Raises:
            OutputError: the checkpoint cannot be written (disk full, read-only).
        """
        tmp = self.path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps({"identity": self.identity, "done": sorted(self.done)}))
            os.replace(tmp, self.path)
        except OSError as exc:
            raise OutputError(
                f"{self.path}: cannot record progress ({exc.strerror or exc}); is the disk "
                "full? Free space and rerun the same command to resume"
            ) from exc


# --------------------------------------------------------------------------- cluster


def wait_for_scheduler_file(path: str, timeout: float) -> None:
    """Wait up to ``timeout`` s for a scheduler file to appear and name an address.

    A job script may start the scheduler beside agriseg; ``Client`` itself waits for a missing
    file forever (a mistyped path hung the run), and fails an assertion on one that holds no
    address (a file of something else, one still being written). Run before any work, like
    :func:`check_scheduler_port`: a mistyped path took the survey's read and the model's
    preparation, then the wait, to report.

    Raises:
        ClusterError: no address in the file after ``timeout`` s.
    """
    deadline = time.monotonic() + timeout
    if _scheduler_address(path) is None:
        log.info("waiting up to %.0f s for the scheduler file %s", timeout, path)
    while (address := _scheduler_address(path)) is None:
        if time.monotonic() >= deadline:
            what = ("not found" if not os.path.exists(path) else
                    "holds no scheduler address (it is not a Dask scheduler file)")
            raise ClusterError(
                f"{path}: scheduler file {what} after {timeout:.0f} s; start the scheduler "
                f"with `dask scheduler --scheduler-file {path}` (on storage this machine sees), "
                "check the path, or leave --scheduler-file out to use a local cluster"
            )
        time.sleep(0.2)
    log.debug("scheduler file %s: %s", path, address)


def _scheduler_address(path: str) -> str | None:
    """The ``address`` a scheduler file holds, or None (missing, unreadable, not one)."""
    try:
        with open(path, encoding="utf-8") as fh:
            info = json.load(fh)
    except (OSError, ValueError):
        return None
    address = info.get("address") if isinstance(info, dict) else None
    return address if isinstance(address, str) and address else None


def check_scheduler_port(address: str, timeout: float = 10.0) -> None:
    """Fail at once when nothing listens at a ``tcp://host:port`` scheduler address.

    Run before any work: the client connects only after the model check and the tile plan,
    so a mistyped address took ~16 s to report. Whether it is a Dask scheduler is for the
    client's handshake to find out (see :func:`_connect`).

    Raises:
        ClusterError: the connection is refused or times out.
    """
    import socket
    from urllib.parse import urlsplit

    if "://" in address and not address.startswith("tcp://"):
        return  # tls://, inproc://, ucx://: left to Dask
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = None, None
    if not host or not port:
        raise ClusterError(f"--scheduler {address}: give the address as tcp://HOST:PORT "
                           "(the scheduler listens on port 8786 by default)")
    try:
        socket.create_connection((host, port), timeout=min(timeout, 5.0)).close()
    except OSError as exc:
        raise ClusterError(
            f"cannot reach a Dask scheduler at {address} ({exc.strerror or exc}); check the "
            "address (port 8786 by default, 8787 is its dashboard) and that `dask scheduler` "
            "is running, or leave --scheduler out to use a local cluster"
        ) from exc


@contextlib.contextmanager
def dask_client(
    scheduler: str | None = None,
    scheduler_file: str | None = None,
    workers: int | None = None,
    threads_per_worker: int | None = None,
    processes: bool = False,
    dashboard: str = "127.0.0.1:8787",
    timeout: float = 10.0,
    resources: dict[str, float] | None = None,
) -> Iterator[Client]:
    """An existing cluster (``scheduler`` address or file) or an embedded LocalCluster.

    Local CPU workers are threads of this process unless ``processes``. With
    ``resources={"GPU": 1}`` (a model that runs on CUDA) the local cluster gets one worker
    per GPU (``workers`` overrides), each with :func:`gpu_worker_threads` threads and one unit
    of the resource per thread. One GPU: a worker of threads in this process unless
    ``processes``. Several: one process each, dask-cuda's LocalCUDACluster when installed (it
    pins each worker to its device), else a LocalCluster whose workers pick their device by
    name.

    Raises:
        ClusterError: the scheduler cannot be reached in ``timeout`` seconds, or it went
            away while the client was in use.
    """
    if scheduler or scheduler_file:
        if scheduler_file and not scheduler:
            wait_for_scheduler_file(scheduler_file, timeout)
        client = _connect(scheduler, scheduler_file, timeout)
        address = str(client.scheduler.address)
        where = f"{address} (scheduler file {scheduler_file})" if scheduler_file else address
        flag = "--scheduler-file" if scheduler_file else "--scheduler"
        try:
            with _scheduler_loss(client, f"Dask scheduler at {where}", "start the scheduler "
                                 "and its workers again and rerun the same command to resume, "
                                 f"or rerun without {flag} to finish on a local cluster"):
                yield client
        finally:
            _close_client(client, timeout)
        return
    cores = os.cpu_count() or 2
    kwargs: dict[str, Any] = {
        "dashboard_address": dashboard,
        "silence_logs": logging.ERROR,
    }
    cluster_cls: Any = LocalCluster
    if resources and "GPU" in resources:
        gpus = workers or _cuda_device_count()
        # Several tiles in flight per GPU: while one runs on the device the others are read,
        # decoded and copied (one H200 with 16 cores: 67 MP/s of tiles with 4 threads, 82-98
        # with 8). The worker offers one GPU "slot" per thread, so GPU tasks do not queue
        # behind each other on the worker's single GPU resource.
        threads = threads_per_worker or gpu_worker_threads(cores, gpus)
        kwargs.update(n_workers=gpus, threads_per_worker=threads,
                      resources={k: v * threads for k, v in resources.items()})
        if gpus == 1 and not processes:
            # Threads of this process: no worker process to start, and no second PyTorch
            # import, CUDA context and model. On an H200 a worker process took 11 s to load
            # and warm up the model (warm_up_workers), the threads 1.4-3 s.
            kwargs.update(processes=False, worker_dashboard_address="127.0.0.1:0")
        else:
            try:
                from dask_cuda import LocalCUDACluster

                cluster_cls = LocalCUDACluster
            except ImportError:
                kwargs.update(processes=True)
    else:
        threads = threads_per_worker or 1
        kwargs.update(n_workers=workers or max(1, cores // threads), processes=processes,
                      threads_per_worker=threads)
        if not processes:
            # Worker threads still start each worker's HTTP server, on every interface unless
            # told otherwise (worker processes bind to the cluster's host, 127.0.0.1).
            kwargs["worker_dashboard_address"] = "127.0.0.1:0"
    host = dashboard.rsplit(":", 1)[0]
    settings: dict[str, Any] = dict(_worker_malloc_env())
    # Dask's statistical profiler walks every thread's stack each 10 ms holding the GIL, which
    # worker threads running tiles need (the dashboard's profile page stays empty).
    settings["distributed.worker.profile.enabled"] = False
    if host not in ("", "0.0.0.0"):
        # The printed link otherwise names the machine's address, where nothing listens.
        settings["distributed.dashboard.link"] = f"http://{host}:{{port}}/status"
    with contextlib.ExitStack() as stack:
        stack.enter_context(dask.config.set(settings))
        with warnings.catch_warnings():
            # Another run holds the port: Dask takes a free one, which the log names
            # ("Dask dashboard: ..."); its warning on stderr only alarmed.
            warnings.filterwarnings("ignore", r"Port \d+ is already in use", UserWarning)
            cluster = stack.enter_context(cluster_cls(**kwargs))
        client = stack.enter_context(Client(cluster))
        with _scheduler_loss(client, "embedded Dask scheduler",
                             "rerun the same command to resume"):
            yield client


def _close_client(client: Client, timeout: float) -> None:
    """Close a client of an existing cluster without Dask's log lines.

    A client that lost its scheduler is trying to reconnect (for ``timeout`` s); closing it
    ends that, and Dask then logged "Failed to reconnect" and the cancelled reconnection's
    traceback above the run's own one-line error. Nothing it logs while closing matters by
    then: the run has finished or failed already.
    """
    names = ["distributed", *(n for n in logging.root.manager.loggerDict
                              if n.startswith("distributed."))]
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
    try:
        with contextlib.suppress(Exception):
            client.close(timeout=min(timeout, 5.0))
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


@contextlib.contextmanager
def _scheduler_loss(client: Client, what: str, todo: str) -> Iterator[None]:
    """Turn an error that means ``client`` lost its scheduler into a one-line ClusterError.

    Args:
        client: the client whose scheduler may be lost.
        what: the scheduler, as the message names it.
        todo: what to do about it.

    Raises:
        ClusterError: the scheduler went away (its connection closed) mid-run.
    """
    try:
        yield
    except (AgrisegError, KeyboardInterrupt):
        raise
    except Exception as exc:
        if not scheduler_lost(client, exc):
            raise
        raise ClusterError(
            f"lost the {what} mid-run (its connection closed: was it stopped or killed?); "
            f"the tiles finished so far are saved: {todo}"
        ) from exc


def _connect(scheduler: str | None, scheduler_file: str | None, timeout: float) -> Client:
    """A client of an existing scheduler, or a ClusterError within about ``timeout``.

    Something else listening at the address (the dashboard's port 8787 given for the
    scheduler's 8786, a web server) left Dask's handshake waiting past its own timeout, or
    read an HTTP reply as a frame length and asked for exabytes; so the connection runs in
    a thread with a deadline, and any failure is "not a Dask scheduler".
    """
    where = scheduler or scheduler_file
    result: dict[str, Any] = {}

    def connect() -> None:
        try:
            result["client"] = Client(scheduler, scheduler_file=scheduler_file, timeout=timeout)
        except Exception as exc:  # reported below, whatever it is (MemoryError too)
            result["error"] = exc

    thread = threading.Thread(target=connect, name="agriseg-connect", daemon=True)
    thread.start()
    thread.join(timeout + 5)
    exc = result.get("error")
    if "client" in result:
        return result["client"]
    if isinstance(exc, (OSError, TimeoutError)) or exc is None:
        why = f" ({exc})" if exc else ""
        if scheduler_file and not scheduler:
            # A killed scheduler leaves its file behind: the file is found, its address dead.
            raise ClusterError(
                f"cannot reach the Dask scheduler that {scheduler_file} names "
                f"({_scheduler_address(scheduler_file)}) within {timeout:.0f} s{why}; the file "
                "may be left from a scheduler that has stopped: start `dask scheduler "
                f"--scheduler-file {scheduler_file}` and its workers again, or leave "
                "--scheduler-file out to use a local cluster"
            ) from exc
        raise ClusterError(
            f"cannot reach a Dask scheduler at {where} within {timeout:.0f} s{why}; check the "
            "address (the scheduler listens on port 8786 by default, 8787 is its dashboard) "
            "and that `dask scheduler` is running, or leave --scheduler out to use a local "
            "cluster"
        ) from exc
    raise ClusterError(
        f"{where}: what answers there is not a Dask scheduler ({type(exc).__name__}: "
        f"{str(exc)[:120]}); check the address (port 8786 by default, 8787 is the "
        "dashboard), or leave --scheduler out to use a local cluster"
    ) from exc


def scheduler_lost(client: Client, exc: BaseException) -> bool:
    """Whether ``exc``, raised by a client call or a future, means its scheduler is gone.

    The client drops every future when its connection to the scheduler closes (they are
    cancelled with the reason ``scheduler-connection-lost``), so none of the work in flight
    can be had again, even if a scheduler comes back at the address. A worker lost while its
    result was gathered raises too, and is not this: its tile can run on another worker.
    """
    from distributed.comm import CommClosedError

    if client.status != "running":  # reconnecting, or closed after failing to
        return True
    if "scheduler-connection-lost" in str(exc):
        return True
    # The scheduler's own connection reset while gathering (before the client noticed).
    address = getattr(client.scheduler, "address", None)
    return isinstance(exc, (CommClosedError, OSError)) and bool(address) and \
        str(address) in str(exc)


# Tiles allocate and free arrays of a few to a few tens of MB per step. Dask's nanny sets
# MALLOC_TRIM_THRESHOLD_=64 KiB, which also freezes glibc's mmap threshold at 128 KiB: every
# such array is then a fresh mmap whose pages the kernel zeroes and faults in again, which cost
# the label-free model ~30 % of its time (measured: 0.38 s -> 0.26 s per 1024 px tile). Keeping
# arrays up to 64 MiB on the heap and trimming only above 256 MiB reuses the pages. Few arenas:
# see agriseg.heap.
WORKER_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": 64 * 2**20, "MALLOC_TRIM_THRESHOLD_": 256 * 2**20,
                     "MALLOC_ARENA_MAX": heap.ARENA_MAX}


GPU_WORKER_THREADS = 8
"""Most threads of a local GPU worker (tiles read and post-processed around the model)."""


def gpu_worker_threads(cores: int, gpus: int) -> int:
    """Threads of each local GPU worker: the host's cores shared by its GPUs, at most 8."""
    return max(2, min(GPU_WORKER_THREADS, cores // max(gpus, 1)))


def _cuda_device_count() -> int:
    import torch

    return max(1, torch.cuda.device_count())


def _worker_malloc_env() -> dict[str, Any]:
    """Dask config keys that give local worker processes :data:`WORKER_MALLOC_ENV`."""
    return {f"distributed.nanny.pre-spawn-environ.{k}": v for k, v in WORKER_MALLOC_ENV.items()}


def check_workers_see(client: Client, path: str) -> None:
    """Fail clearly when some worker cannot open ``path`` (no shared storage)."""
    result = client.run(os.path.exists, path)
    blind = [w for w, ok in result.items() if not ok]
    if blind:
        raise ClusterError(
            f"{path}: not visible to Dask worker(s) {', '.join(blind)}; put the input (and "
            "--out) on storage every worker mounts at the same path"
        )


# --------------------------------------------------------------------------- run


def run_tiles(
    client: Client,
    survey: SurveyRaster,
    plan: TilePlan,
    tiles: Sequence[Tile],
    segmenter: Segmenter,
    prepared: Prepared,
    writer: TileWriter,
    checkpoint: Checkpoint,
    index_names: tuple[str, ...] = (),
    progress: Progress | None = None,
    max_in_flight: int | None = None,
    sync_seconds: float = 15.0,
    probabilities: tuple[tuple[str, int], ...] = (),
) -> dict[str, float]:
    """Segment ``tiles`` on the cluster and write their cores as they complete.

    Returns:
        Timing figures: seconds in tasks, tiles run, seconds to the first finished tile
        (cluster and model start-up included) and the rate of the tile stream after it
        (``stream_mp_s``, output MP/s between the first and the last finished tile).
    """
    # Largest tiles first (longest-processing-time-first scheduling): the thin tiles of the
    # last row and column then fill the end of the run, instead of one worker finishing a
    # full tile while the others idle (U-Net, 16.8 MP in 9 tiles: one worker was idle ~20 %
    # of the run). Within each swath (see agriseg.grid.plan_tiles): the thin tiles of a swath's
    # last row wait for its end, not the run's, so the blocks they share with the row above
    # are not held through every later swath. Sorting is stable: equal tiles keep plan order.
    todo = sorted((t for t in tiles if t.key not in checkpoint.done),
                  key=lambda t: (t.swath, -int(t.core.width * t.core.height)))
    total = len(tiles)
    done_px = sum(int(t.core.width * t.core.height) for t in tiles if t.key in checkpoint.done)
    if progress:
        progress(total - len(todo), total, done_px)
    if not todo:
        return {"task_seconds": 0.0, "tiles_run": 0}
    nthreads = sum(client.nthreads().values()) or 1
    limit = max_in_flight or 2 * nthreads + 2
    queue = iter(todo)
    task_seconds = 0.0

    resources = task_resources(client, segmenter)
    halving = tuple((name, nodata, how) for name, (nodata, how) in writer.halving.items())

    by_key: dict[Any, Tile] = {}
    attempts: dict[str, int] = {}

    def submit(tile: Tile, attempt: int = 0) -> Any:
        # The model and its parameters travel with each task, like the survey (under a KB
        # each), rather than scattered once: Dask's active memory manager keeps a single copy
        # of scattered data, broadcast or not, and a worker lost with it failed every later
        # tile of the run ("lost dependencies").
        fut = client.submit(
            segment_tile, survey, tile, segmenter, prepared.params, index_names, probabilities,
            halving, key=f"segment-{tile.key}-{id(writer)}-{attempt}", retries=2, pure=False,
            resources=resources,
        )
        by_key[fut.key] = tile
        return fut

    t_start = time.monotonic()
    pending = as_completed([submit(t) for _, t in zip(range(limit), queue, strict=False)])
    last_sync = time.monotonic()
    first: tuple[float, int] | None = None  # (time, pixels done) at the first finished tile
    unsynced: list[str] = []
    n_done = total - len(todo)
    finished = False
    try:
        for fut in pending:
            try:
                res: TileResult = fut.result()
            except AgrisegError:
                raise
            except Exception as exc:
                if scheduler_lost(client, exc):
                    # Every task in flight is gone with it. Resubmitting waited out the
                    # client's reconnection (--scheduler-timeout), and a scheduler restarted
                    # at the same address, whose workers had left, hung the run for good.
                    # dask_client says which scheduler; the finally below saves the tiles.
                    raise
                # A worker lost while its result was being gathered surfaces here as a
                # distributed-internal error: resubmit the tile a few times before giving up.
                tile = by_key.pop(fut.key)
                attempts[tile.key] = n_try = attempts.get(tile.key, 0) + 1
                if n_try > MAX_RESUBMITS:
                    raise ClusterError(
                        f"tile {tile.key} failed {n_try} times: {type(exc).__name__}: {exc}"
                    ) from exc
                log.warning("tile %s: %s: %s; resubmitting", tile.key, type(exc).__name__, exc)
                pending.add(submit(tile, n_try))
                continue
            by_key.pop(fut.key, None)
            writer.write(res.tile, res.arrays, res.class_counts, res.halves)
            fut.release()
            task_seconds += res.seconds
            unsynced.append(res.tile.key)
            n_done += 1
            done_px += int(res.tile.core.width * res.tile.core.height)
            if first is None:
                first = (time.monotonic(), done_px)
            if progress:
                progress(n_done, total, done_px)
            nxt = next(queue, None)
            if nxt is not None:
                pending.add(submit(nxt))
            if time.monotonic() - last_sync > sync_seconds:
                _sync(writer, checkpoint, unsynced)
                last_sync = time.monotonic()
        finished = True
    finally:
        pending.clear()
        if not finished:
            # Keep what finished durable even when leaving on an error or Ctrl-C; a failure
            # here (disk full) must not mask the original exception.
            with contextlib.suppress(Exception):
                _sync(writer, checkpoint, unsynced)
    # After the last tile a failed flush is the error: finalising from an incomplete working
    # file would have followed (it was suppressed with the rest).
    _sync(writer, checkpoint, unsynced)
    figures = {"task_seconds": task_seconds, "tiles_run": len(todo)}
    if first is not None:
        stream_s = time.monotonic() - first[0]
        figures["first_tile_s"] = first[0] - t_start
        if stream_s > 0 and done_px > first[1]:
            figures["stream_mp_s"] = (done_px - first[1]) / 1e6 / stream_s
    return figures


def warm_up_workers(client: Client, segmenter: Segmenter, tile_size: int,
                    scale: float | None = None) -> float | None:
    """Have every worker that will run tiles load the model first (``warm_up``, if any).

    Runs before the tiles, so the first tiles do not queue behind the model load (and on a
    GPU behind cuDNN's autotuning) all at once. A failure is left to the tiles to report.
    ``scale``: the tiles' :func:`raw_band_scale`.

    Returns:
        Seconds it took; None when the segmenter has nothing to warm up.
    """
    warm = getattr(segmenter, "warm_up", None)
    if warm is None:
        return None
    resources = task_resources(client, segmenter)
    workers = client.scheduler_info(n_workers=-1).get("workers", {})
    futures = [
        client.submit(warm, tile_size, *([] if scale is None else [scale]), workers=[addr],
                      allow_other_workers=False,
                      resources=resources, pure=False, key=f"warm-up-{addr}-{id(segmenter)}")
        for addr, info in workers.items()
        if not resources or _offers(info, resources)
    ]
    t = time.perf_counter()
    for fut in futures:
        try:
            fut.result()
        except Exception as exc:  # the tiles raise it again, with their error handling
            log.debug("model warm-up failed: %s: %s", type(exc).__name__, exc)
    return time.perf_counter() - t


def task_resources(client: Client, segmenter: Segmenter) -> dict[str, float] | None:
    """Dask resources the model's tasks ask for, when some worker offers them.

    A segmenter may declare ``resources = {"GPU": 1}``. Tasks are pinned to such workers only
    when the cluster has at least one, else they would wait forever; a mixed cluster then
    runs model tasks on its GPU workers only.
    """
    wanted: dict[str, float] | None = getattr(segmenter, "resources", None)
    if not wanted:
        return None
    workers = client.scheduler_info(n_workers=-1).get("workers", {}).values()
    if any(_offers(w, wanted) for w in workers):
        return wanted
    log.warning("no worker offers %s; running model tasks on any worker", wanted)
    return None


def _offers(worker_info: dict[str, Any], wanted: dict[str, float]) -> bool:
    """Whether a worker (its ``scheduler_info`` entry) offers every resource in ``wanted``."""
    offered = worker_info.get("resources", {})
    return all(offered.get(k, 0) >= v for k, v in wanted.items())


def _sync(writer: TileWriter, checkpoint: Checkpoint, unsynced: list[str]) -> None:
    """Make written tiles durable, then record them (order matters for crash safety)."""
    if not unsynced:
        return
    writer.sync()
    checkpoint.done.update(unsynced)
    checkpoint.save()
    unsynced.clear()


def class_areas_m2(path: Path, schema: ClassSchema, counts: dict[str, int],
                   grid: Grid) -> dict[str, float]:
    """Ground area per class (and nodata) from :func:`class_counts`.

    Pixels times their area; in a geographic CRS, where a pixel's area shrinks towards the
    poles, each row's pixels times that row's area on the ellipsoid (one more read of the
    class raster), as the field summaries count them.
    """
    if not grid.crs.is_geographic:
        return {k: v * grid.pixel_area_m2 for k, v in counts.items()}
    from agriseg.vectorize import row_pixel_areas  # GeoPandas: ~1 s to import

    rows = row_pixel_areas(grid)
    if rows is None:
        return {k: v * grid.pixel_area_m2 for k, v in counts.items()}
    import rasterio

    areas = np.zeros(256)
    with rasterio.open(path) as ds:
        for _, window in ds.block_windows(1):
            block = ds.read(1, window=window)
            weight = np.broadcast_to(rows[window.row_off:window.row_off + block.shape[0], None],
                                     block.shape)
            areas += np.bincount(block.ravel(), weights=weight.ravel(), minlength=256)
    out = {c.name: float(areas[c.value]) for c in schema.classes}
    out["nodata"] = float(rows.sum()) * grid.width - sum(out.values())
    return out


def class_counts(
    path: Path, schema: ClassSchema, values: np.ndarray | None = None
) -> dict[str, int]:
    """Pixel count per class of a class raster, read block by block.

    Args:
        path: the class raster.
        schema: its classes.
        values: pixels per value (256) already counted for the whole raster; the file is
            then only asked for its size. Pixels of no class (tiles never written) are nodata.
    """
    import rasterio

    with rasterio.open(path) as ds:
        total = ds.width * ds.height
        if values is None:
            values = np.zeros(256, np.int64)
            for _, window in ds.block_windows(1):
                values += np.bincount(ds.read(1, window=window).ravel(), minlength=256)
    out = {c.name: int(values[c.value]) for c in schema.classes}
    out["nodata"] = total - sum(out.values())
    return out
