"""Learned segmenters: a model bundle run through ONNX Runtime or PyTorch.

The :class:`NeuralSegmenter` that travels to Dask workers holds only the bundle path and its
small metadata; each worker process loads the network once (module-level cache keyed by path,
mtime and engine) and reuses it for every tile. PyTorch runs on GPU (bf16/fp16 autocast,
channels_last, pinned host memory) and on CPUs that compute bf16 natively (AVX512-BF16, AMX),
where bf16 is about twice as fast as float32. On other CPUs the bundle is exported to ONNX
once, cached beside it (or in the user cache when the bundle folder is read-only), checked
against the PyTorch outputs, and run with ONNX Runtime, which is ~1.4x faster than eager
float32 PyTorch; PyTorch is the fallback for architectures ONNX cannot express with dynamic
shapes (PSPNet's adaptive pooling, SegNet's unpooling).

Seamless tiles: the outer ``margin`` pixels of every array handed to :meth:`predict` are
context only (the pipeline's halo). The interior is cut into sub-patches whose sides are
multiples of 32 and whose origins stay on the input's 32-pixel lattice, each read with
``margin`` pixels of real context and centre-cropped, and sub-patches are batched per model
call. So a pixel's score does not depend on where tile borders fall, up to the network's
receptive field beyond the margin and float noise.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import secrets
import sys
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np

from agriseg.classes import ClassSchema
from agriseg.errors import ConfigError, ModelError, OutputError
from agriseg.models.base import Prepared, TileContext
from agriseg.models.bundle import (
    BundleMeta,
    bundle_digest,
    bundle_files,
    load_bundle_model,
    read_bundle_meta,
)
from agriseg.models.spec import SIZE_MULTIPLE

if TYPE_CHECKING:
    from torch import nn

    from agriseg.raster import SurveyRaster

log = logging.getLogger(__name__)

Engine = Literal["auto", "torch", "onnx"]
ENGINES = ("auto", "torch", "onnx")
ONNX_OPSET = 17
#: Architectures PyTorch cannot export to ONNX with dynamic tile sizes: PSPNet pools to fixed
#: bins of the input's size, SegNet's unpooling branches on tensor values. They always run
#: on PyTorch; trying the export dumped the exporter's whole graph to the terminal each run.
ONNX_UNSUPPORTED = frozenset({"pspnet", "segnet"})
#: Training standard deviations between a survey's band mean and the bundle's training mean
#: beyond which the run warns (see ``NeuralSegmenter._radiometry_doubt``). With unet-default
#: (8-bit camera RGB): the camera samples 0.9 at most, NAIP 1.3; reflectance 2.9 (synthetic
#: multispectral) and 3.1 (Sentinel-2).
RADIOMETRY_SIGMAS = 2.0
# ONNX must reproduce the PyTorch probabilities to this absolute tolerance.
ONNX_TOLERANCE = 1e-4
# Largest sub-patch interior side; bigger tiles are split and the pieces batched.
MAX_BLOCK = 2048
# Largest model input side on CPU: it bounds each engine thread's activation memory (U-Net
# resnet18 on ONNX Runtime: +194 MB per call at 704 px, +415 MB at 1088). With one engine
# thread per core the rate per pixel is flat from 704 to 1344 px, so bigger inputs only save
# margin: 1088 px ran a 67 MP survey 5 % faster for +0.45 GB peak (benchmarks/RESULTS.md).
# (Two engine threads in one process did slow on big inputs: 0.71 MP/s at 704, 0.57 at 1088.)
# GPUs prefer big inputs and use MAX_BLOCK.
CPU_BLOCK_INPUT = 704
# Input pixels per model call (bounds activation memory when small blocks are batched).
MAX_BATCH_PIXELS = 4 * 1024 * 1024
# Batch shapes given a CUDA graph each (a survey has a handful: full tiles, the last row and
# column); further shapes run eagerly. Each graph keeps its activations on the GPU.
MAX_CUDA_GRAPHS = 4


@dataclass(frozen=True, slots=True)
class NeuralParams:
    """Survey-wide values for :meth:`NeuralSegmenter.predict`.

    Attributes:
        margin: outer pixels of each input array used as context only (multiple of 16).
    """

    margin: int


def _ceil_to(v: int, m: int) -> int:
    return int(math.ceil(v / m) * m)


def torch_threads() -> int:
    """Intra-op threads for this process, chosen deliberately.

    ``AGRISEG_THREADS`` wins. Inside a Dask worker each Dask thread gets its share of the
    host's cores (Dask's nanny sets ``OMP_NUM_THREADS=1``, which would otherwise apply even to a
    single worker on a big machine); outside Dask every core is used.
    """
    env = os.environ.get("AGRISEG_THREADS")
    if env:
        try:
            return max(1, int(env))
        except ValueError as exc:
            raise ConfigError(f"AGRISEG_THREADS={env!r} is not an integer") from exc
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return cores
    nthreads = getattr(getattr(worker, "state", None), "nthreads", None) or 1
    per_host = os.environ.get("AGRISEG_WORKERS_PER_HOST")
    if per_host:
        return max(1, cores // (max(1, int(per_host)) * nthreads))
    # LocalCluster and `dask worker --nworkers auto` fill the host with one Dask thread per
    # core, so each Dask thread gets one intra-op thread (no oversubscription).
    return 1


# --------------------------------------------------------------------------- runners


@dataclass(frozen=True, slots=True)
class _Graph:
    """A captured CUDA graph with its static input and output tensors."""

    graph: Any
    input: Any
    output: Any


class _TorchRunner:
    """Probabilities, or classes and confidence, from PyTorch.

    Mixed precision where the hardware computes it natively: bf16 (or fp16) autocast on a
    GPU; on a CPU with AVX512-BF16 or AMX (:func:`cpu_bf16_native`) bf16 weights
    (:func:`~agriseg.models.arch.bfloat16_model`, autocast for architectures that cannot
    take them); float32 otherwise. The first convolution stays float32
    (:func:`~agriseg.models.arch.full_precision_stem`).
    """

    def __init__(self, model: nn.Module, device: str, meta: BundleMeta) -> None:
        import torch

        from agriseg.models.arch import (
            bfloat16_model,
            fold_batch_norms,
            full_precision_stem,
            ieee_float32_convolutions,
        )

        self.device = torch.device(device)
        model = model.eval()
        # amp: the compute dtype below float32 (None: float32); autocast: whether it comes
        # from autocast (GPU) or from bf16 weights (CPU, see bfloat16_model).
        self.amp: Any = None
        self.autocast = False
        if self.device.type == "cpu":
            model = fold_batch_norms(model, meta.arch.in_channels)
            if cpu_bf16_native():
                self.amp = torch.bfloat16
                self.autocast = not bfloat16_model(model, meta.arch.in_channels)
        self.model = model.to(self.device).to(memory_format=torch.channels_last).eval()
        self.mean = torch.tensor(meta.mean, dtype=torch.float32, device=self.device)[:, None, None]
        self.std = torch.tensor(meta.std, dtype=torch.float32, device=self.device)[:, None, None]
        self._local = threading.local()
        if self.device.type == "cuda":
            self.amp = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            self.autocast = True
            # Tiles come in a handful of shapes (full, last row, last column): cuDNN's
            # autotuner picks each shape's fastest kernels once.
            torch.backends.cudnn.benchmark = True
            ieee_float32_convolutions()
        if self.autocast:
            full_precision_stem(self.model)
        self.engine = f"torch-{self.device.type}"
        # CUDA graphs of the reducing forward pass, one per batch shape, input dtype and
        # scale (None: capture failed).
        self._graphs: dict[tuple[tuple[int, ...], Any, float | None], _Graph | None] = {}
        self._graph_lock = threading.Lock()
        self.use_graphs = self.device.type == "cuda" and os.environ.get(
            "AGRISEG_CUDA_GRAPHS", "1") != "0"

    def _stream(self) -> Any:
        """A CUDA stream per worker thread, so one tile's copies overlap another's model."""
        import torch

        if self.device.type != "cuda":
            return contextlib.nullcontext()
        stream = getattr(self._local, "stream", None)
        if stream is None:
            stream = self._local.stream = torch.cuda.Stream(self.device)
        return torch.cuda.stream(stream)

    def _to_device(self, batch: np.ndarray) -> Any:
        import torch

        x = torch.from_numpy(batch)
        if self.device.type == "cuda":
            # Through PyTorch's caching pinned-memory pool: the copy to the GPU runs as DMA on
            # this thread's stream, and the pool reuses the block once that copy is done.
            x = x.pin_memory().to(self.device, non_blocking=True)
        return x

    def _forward(self, x: Any, normalise: bool) -> Any:
        """Softmax probabilities of device tensor ``x`` (float32 NCHW)."""
        import torch

        if normalise:
            x = (x - self.mean) / self.std
        x = x.contiguous(memory_format=torch.channels_last)
        # No autocast weight cache: a CUDA graph must cast the weights inside its capture.
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.autocast,
                            cache_enabled=False):
            logits = self.model(x)
        return torch.softmax(logits.float(), dim=1)

    def _reduce(self, x: Any, scale: float | None = None) -> Any:
        """Class ids and confidence percent, uint8 ``(B, 2, H, W)`` on the device.

        ``scale``: ``x`` holds 8-bit band values, ``x * scale`` the model's 0..1 inputs.
        """
        import torch

        if scale is not None:
            # As numpy scales them on the host (raster.scaled_bands): float32 times float32.
            x = x.to(torch.float32) * torch.tensor(scale, dtype=torch.float32)
        best, ids = self._forward(x, normalise=True).max(dim=1)
        conf = torch.round(best * 100).to(torch.uint8)
        return torch.stack((ids.to(torch.uint8), conf), dim=1)

    def _graph(self, shape: tuple[int, ...], dtype: Any, scale: float | None) -> _Graph | None:
        """The CUDA graph of :meth:`_reduce` for inputs of ``shape``, ``dtype`` and ``scale``.

        Captured on first use.

        Eager PyTorch makes a few hundred Python calls per forward pass, each of which gives
        up and takes back the GIL; with a worker's other threads reading and decoding tiles,
        those hand-overs, not the GPU, set the pace. A graph replays the whole pass in one
        call. Called with ``_graph_lock`` held.
        """
        import torch

        key = (shape, dtype, scale)
        if key in self._graphs:
            return self._graphs[key]
        graph: _Graph | None = None
        if len(self._graphs) < MAX_CUDA_GRAPHS:
            try:
                static_in = torch.zeros(shape, dtype=dtype, device=self.device)
                # Warm-up passes on a side stream before the capture (cuDNN's autotuner runs
                # here, outside the graph), as torch.cuda.graphs asks.
                side = torch.cuda.Stream(self.device)
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):
                    for _ in range(2):
                        self._reduce(static_in, scale)
                torch.cuda.current_stream(self.device).wait_stream(side)
                g = torch.cuda.CUDAGraph()
                # thread_local: the other worker threads may keep using CUDA meanwhile.
                with torch.cuda.graph(g, capture_error_mode="thread_local"):
                    static_out = self._reduce(static_in, scale)
                graph = _Graph(g, static_in, static_out)
            except RuntimeError as exc:
                log.warning("CUDA graph capture failed for input shape %s (%s); running that "
                            "shape without a graph", shape, exc)
        self._graphs[key] = graph
        return graph

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities ``(B, K, H, W)`` of normalised float32 inputs."""
        import torch

        with self._stream(), torch.inference_mode():
            return self._forward(self._to_device(batch), normalise=False).cpu().numpy()

    def classes(self, batch: np.ndarray, scale: float | None = None) -> np.ndarray:
        """Class ids and confidence percent, uint8 ``(B, 2, H, W)``, of raw 0..1 inputs.

        As :func:`agriseg.predict.scores_to_outputs` derives them from probabilities: ties go
        to the lowest class id, confidence is the rounded top probability x 100. ``scale``:
        ``batch`` holds 8-bit values, scaled by it on the device.
        """
        import torch

        with self._stream(), torch.inference_mode():
            x = self._to_device(batch)
            if self.use_graphs:
                # One graph's buffers serve one batch at a time; the GPU runs a tile in a few
                # ms, so threads queueing here wait little.
                with self._graph_lock:
                    graph = self._graph(tuple(x.shape), x.dtype, scale)
                    if graph is not None:
                        graph.input.copy_(x)
                        graph.graph.replay()
                        return graph.output.cpu().numpy()
            return self._reduce(x, scale).cpu().numpy()


class _OnnxRunner:
    """Probabilities from ONNX Runtime (softmax is part of the exported graph)."""

    engine = "onnx"

    def __init__(self, onnx_path: Path, threads: int) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # Spinning intra-op threads take the cores the reader and writer need between model
        # calls (measured under load: 0.34 vs 0.52 MP/s at 1088 px); the arena only holds on to
        # memory (1.47 vs 1.29 GB peak at 1088 px, same speed).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.enable_cpu_mem_arena = False
        self.session = ort.InferenceSession(
            str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"]
        )
        self.input = self.session.get_inputs()[0].name

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        out = self.session.run(None, {self.input: np.ascontiguousarray(batch)})[0]
        return np.asarray(out, dtype=np.float32)


_RUNNERS: dict[tuple[str, float, str], Any] = {}
_LOCK = threading.Lock()
_THREADS_SET = False


def _with_softmax(model: nn.Module) -> nn.Module:
    from torch import nn

    return nn.Sequential(model, nn.Softmax(dim=1)).eval()


def onnx_cache_path(bundle: str | os.PathLike[str], digest: str) -> Path:
    """Where the ONNX export of a bundle lives: beside it, or the user cache if read-only."""
    weights, meta_file = bundle_files(bundle)
    beside = (
        weights.parent / f"model-{digest[:12]}.onnx"
        if meta_file is not None
        else weights.with_name(f"{weights.stem}-{digest[:12]}.onnx")
    )
    shipped = Path(__file__).resolve().parents[1] in weights.resolve().parents
    # Never write into the installed package (shipped bundles); use the user cache instead.
    if not shipped and (os.access(beside.parent, os.W_OK) or beside.exists()):
        return beside
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "agriseg" / "onnx"
    return cache / f"{digest}.onnx"


#: Widest ``--halo`` a learned model takes: each input grows by twice it.
MAX_HALO = 256

#: Tile edge the ONNX metadata suggests to tools that tile by themselves.
ONNX_TILE_SIZE = 512


def onnx_metadata(meta: BundleMeta, digest: str) -> dict[str, str]:
    """Metadata written into an exported ONNX model, so that it stands on its own.

    ``agriseg_bundle`` holds the bundle's whole metadata (classes with colours, band roles,
    normalisation, margin, training GSD). The other keys are those the Deepness QGIS plugin
    reads to set itself up (JSON values, its documented names): class names, the expected
    resolution in cm per pixel, a tile size, an overlap in percent that covers the bundle's
    margin on both sides, and the per-band standardisation it applies after dividing 8-bit
    pixels by 255 (the same as agriseg's for uint8 RGB surveys).

    Args:
        meta: the bundle's metadata.
        digest: the bundle's SHA-256, to match the export to its source.

    Returns:
        ``{key: value}`` strings.
    """
    tile = ONNX_TILE_SIZE
    out = {
        "agriseg_bundle_sha256": digest,
        "agriseg_bundle": json.dumps(meta.to_dict(), separators=(",", ":")),
        "model_type": json.dumps("Segmentor"),
        "class_names": json.dumps({str(i): n for i, n in enumerate(meta.schema.names)}),
        "tile_size": json.dumps(tile),
        "tiles_size": json.dumps(tile),  # the name in Deepness's documentation
        "tiles_overlap": json.dumps(math.ceil(100 * 2 * meta.halo / tile)),
        "standardization_mean": json.dumps(list(meta.mean)),
        "standardization_std": json.dumps(list(meta.std)),
    }
    if meta.gsd_range_m:
        lo, hi = meta.gsd_range_m
        out["resolution"] = json.dumps(round(100 * math.sqrt(lo * hi), 3))
    return out


def export_onnx(
    bundle: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    check_size: int = 96,
) -> tuple[Path, float]:
    """Export a bundle to ONNX (probabilities output, dynamic batch and size) and verify it.

    Args:
        bundle: bundle path.
        out: ONNX file to write; default: the cache path beside the bundle.
        check_size: side of the random test input compared against PyTorch.

    Returns:
        ``(onnx path, max absolute difference of probabilities vs PyTorch)``.

    Raises:
        ModelError: the architecture cannot be exported with dynamic shapes, or ONNX Runtime
            disagrees with PyTorch beyond :data:`ONNX_TOLERANCE`.
    """
    import warnings

    import onnxruntime as ort
    import torch

    meta = read_bundle_meta(bundle)
    if meta.arch.arch in ONNX_UNSUPPORTED:
        raise ModelError(
            f"{bundle}: architecture {meta.arch.arch} cannot be exported to ONNX with dynamic "
            "tile sizes (PyTorch's exporter does not support it); `agriseg run` runs it with "
            "PyTorch; tools that need ONNX (the Deepness QGIS plugin) need another "
            "architecture (unet, unetplusplus, fpn, deeplabv3plus or fcn)"
        )
    meta, model = load_bundle_model(bundle)
    digest = bundle_digest(bundle)
    dst = Path(out) if out else onnx_cache_path(bundle, digest)
    wrapped = _with_softmax(model)
    side = _ceil_to(check_size, SIZE_MULTIPLE)
    x = torch.rand(2, meta.arch.in_channels, side, side + SIZE_MULTIPLE,
                   generator=torch.Generator().manual_seed(0))
    # A private temporary name (two workers may export at once), created with the usual
    # permissions: mkstemp's 0600 left the cache beside a shared bundle unreadable to workers
    # running as other users.
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.{secrets.token_hex(4)}.partial")
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    except OSError as exc:  # OutputError is an OSError: the run's fallback still catches it
        raise OutputError(
            f"{dst}: cannot write the ONNX file there ({exc.strerror or exc}); choose a "
            "writable path"
        ) from exc
    try:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    wrapped, (x[:1],), str(tmp), dynamo=False, opset_version=ONNX_OPSET,
                    input_names=["pixels"], output_names=["probabilities"],
                    dynamic_axes={"pixels": {0: "n", 2: "h", 3: "w"},
                                  "probabilities": {0: "n", 2: "h", 3: "w"}},
                )
        except Exception as exc:  # the exporter raises many unrelated types
            raise ModelError(
                f"{bundle}: architecture {meta.arch.arch} cannot be exported to ONNX with "
                f"dynamic tile sizes ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); "
                "run it with `agriseg run --engine torch`"
            ) from exc
        import onnx

        proto = onnx.load(str(tmp))
        for key, value in onnx_metadata(meta, digest).items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save(proto, str(tmp))
        sess = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        got = sess.run(None, {"pixels": x.numpy()})[0]
        with torch.inference_mode():
            want = wrapped(x).numpy()
        diff = float(np.abs(got - want).max())
        if not diff <= ONNX_TOLERANCE:
            raise ModelError(
                f"{bundle}: the ONNX export disagrees with PyTorch (max difference {diff:.2e} > "
                f"{ONNX_TOLERANCE:g}); run it with `agriseg run --engine torch` and report "
                "the architecture"
            )
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("exported %s to ONNX %s (max |onnx - torch| = %.2e)", bundle, dst, diff)
    return dst, diff


def _cached_onnx(bundle: str) -> Path:
    digest = bundle_digest(bundle)
    path = onnx_cache_path(bundle, digest)
    if path.exists():
        return path
    # Two workers may export at once; each writes a private temporary file and renames.
    return export_onnx(bundle, path)[0]


@functools.cache
def cpu_bf16_native() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), known without PyTorch.

    There PyTorch's oneDNN kernels run a U-Net resnet18 in bf16 about twice as fast as ONNX
    Runtime in float32 (benchmarks/RESULTS.md); elsewhere bf16 is emulated and slower than
    float32. ``AGRISEG_CPU_BF16=0`` (or ``1``) overrides the detection.
    """
    env = os.environ.get("AGRISEG_CPU_BF16")
    if env in ("0", "1"):
        return env == "1"
    if not sys.platform.startswith("linux"):
        return False
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return bool({"avx512_bf16", "amx_bf16"} & set(line.split(":", 1)[-1].split()))
    except OSError:
        pass
    return False


def uses_onnx(engine: str, cuda: bool | None = None, arch: str | None = None) -> bool:
    """Whether ``engine`` runs through ONNX Runtime here.

    ``auto`` picks the fastest engine of the machine: PyTorch on a GPU or on a CPU with native
    bf16, ONNX Runtime (float32) on other CPUs. ``cuda``: whether PyTorch sees a GPU, where
    that is known (:func:`_make_runner`, on the worker); by default whether one may exist,
    known without importing PyTorch (a GPU PyTorch cannot use then still ends on ONNX
    Runtime, decided on the worker). ``arch``: the bundle's architecture; those in
    :data:`ONNX_UNSUPPORTED` run on PyTorch whatever the engine.
    """
    if arch in ONNX_UNSUPPORTED:
        return False
    if cuda is None:
        cuda = cuda_possible()
    return engine == "onnx" or (engine == "auto" and not cuda and not cpu_bf16_native())


def runs_as(engine: str, arch: str | None = None) -> str:
    """What ``engine`` runs as on machines like this one (for run.json and logs)."""
    if uses_onnx(engine, arch=arch):
        return "ONNX Runtime, float32"
    if cuda_possible():
        return "PyTorch; on a GPU bf16 or fp16 autocast, first layer float32"
    if cpu_bf16_native():
        return "PyTorch on CPU, bf16, first layer float32"
    return "PyTorch on CPU, float32"


def cuda_possible() -> bool:
    """Whether a CUDA device may exist, known without importing PyTorch.

    On Linux an NVIDIA GPU shows as ``/dev/nvidia0``...; elsewhere assume it may.
    """
    if sys.platform.startswith("linux"):
        return any(Path("/dev").glob("nvidia[0-9]*"))
    return True


def cuda_available() -> bool:
    """Whether PyTorch sees a CUDA GPU (imported only where one may exist)."""
    if not cuda_possible():
        return False
    import torch

    return bool(torch.cuda.is_available())


def _make_runner(path: str, engine: str, meta: BundleMeta) -> Any:
    threads = torch_threads()
    cuda = engine != "onnx" and cuda_available()
    if engine == "onnx" and meta.arch.arch in ONNX_UNSUPPORTED:
        log.warning("%s: architecture %s has no ONNX export with dynamic tile sizes; running "
                    "PyTorch", meta.name, meta.arch.arch)
    if uses_onnx(engine, cuda, meta.arch.arch):
        try:
            # No PyTorch import on this path when the export is cached: ~3 s and ~300 MB
            # less per worker.
            return _OnnxRunner(_cached_onnx(path), threads)
        except (ModelError, ImportError, OSError) as exc:
            if engine == "onnx":
                log.warning("%s; falling back to PyTorch", exc)
            else:
                log.info("ONNX Runtime not used for %s (%s); running PyTorch", meta.name, exc)
    import torch

    cuda = cuda or (engine == "onnx" and cuda_available())
    global _THREADS_SET
    if not _THREADS_SET:
        torch.set_num_threads(threads)
        _THREADS_SET = True
        log.debug("torch intra-op threads: %d", threads)
    _, model = load_bundle_model(path)
    return _TorchRunner(model, _cuda_device() if cuda else "cpu", meta)


def _cuda_device() -> str:
    """This process's GPU: a local worker named ``n`` takes GPU ``n`` modulo the count.

    dask-cuda's workers see one GPU each (``CUDA_VISIBLE_DEVICES``), so theirs is ``cuda:0``;
    a plain LocalCluster's GPU workers are named 0, 1, ... and share the device list.
    """
    import torch

    count = torch.cuda.device_count()
    try:
        from distributed import get_worker

        name = get_worker().name
    except (ImportError, ValueError):
        return "cuda:0"
    return f"cuda:{name % count}" if isinstance(name, int) and count > 1 else "cuda:0"


def get_runner(path: str, engine: str, meta: BundleMeta) -> Any:
    """The process-wide runner of a bundle (loaded on first use, then reused)."""
    key = (path, os.stat(bundle_files(path)[0]).st_mtime, engine)
    runner = _RUNNERS.get(key)
    if runner is None:
        with _LOCK:
            runner = _RUNNERS.get(key)
            if runner is None:
                runner = _make_runner(path, engine, meta)
                _RUNNERS[key] = runner
    return runner


def release_runners() -> None:
    """Drop this process's loaded models (a later tile loads them again).

    With worker threads the models live in the agriseg process itself; the post-processing
    steps after the tiles do not need them.
    """
    with _LOCK:
        _RUNNERS.clear()


# --------------------------------------------------------------------------- segmenter


def _on_gpu(runner: Any) -> bool:
    return str(getattr(runner, "engine", "")).endswith("cuda")


def _blocks(length: int, block: int) -> list[int]:
    return list(range(0, length, block))


def _block_interior(margin: int, gpu: bool) -> int:
    """Largest block interior side: whole tiles on a GPU, CPU_BLOCK_INPUT inputs on CPU.

    On CPU a multiple of 64, so that the default tiles (whole numbers of blocks) keep the
    output GeoTIFFs' blocks large: with a 16 px margin, 672 px interiors made 1344 px tiles
    written in 64 px blocks, whose COG copy took 1.8 s instead of 0.7 s on 67 MP.
    """
    if gpu:
        return MAX_BLOCK
    return max((CPU_BLOCK_INPUT - 2 * margin) // 64 * 64, SIZE_MULTIPLE)


def _block_layout(length: int, margin: int, gpu: bool) -> tuple[int, list[int]]:
    """How a core axis of ``length`` px is cut: block interior side and block starts."""
    side = _block_side(length, _block_interior(margin, gpu))
    return side, _blocks(length, side)


def _block_side(length: int, largest: int) -> int:
    """Sub-patch interior side: as few blocks as fit ``largest``, sharing ``length`` evenly.

    Even shares (rounded up to the 32 px lattice) rather than full blocks plus a remainder:
    a 1024 px tile in 448 px blocks would otherwise run 3 x 448 = 1344 px per axis.
    """
    n = math.ceil(length / max(largest, 1))
    return _ceil_to(math.ceil(length / n), SIZE_MULTIPLE)


@dataclass
class NeuralSegmenter:
    """A model bundle as a :class:`~agriseg.models.base.Segmenter`.

    Attributes:
        path: absolute bundle path (weights load lazily, once per worker process).
        meta: bundle metadata (small; travels with the segmenter).
        engine: ``auto`` (:func:`uses_onnx`), ``onnx`` or ``torch``.
        halo: context ring of every model input in pixels, a multiple of 16 (the run's
            ``--halo``, see :meth:`with_halo`); None: the bundle's halo rounded up to 32.
    """

    path: str
    meta: BundleMeta
    engine: str = "auto"
    halo: int | None = None
    #: :meth:`predict_classes` takes 8-bit band values with their ``scale``.
    takes_raw_bands: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ConfigError(
                f"unknown engine {self.engine!r}; valid choices: {', '.join(ENGINES)}"
            )

    @property
    def name(self) -> str:
        """Model name from the bundle."""
        return self.meta.name

    @property
    def schema(self) -> ClassSchema:
        """Output classes from the bundle."""
        return self.meta.schema

    @property
    def roles(self) -> tuple[str, ...]:
        """Input band roles in channel order."""
        return self.meta.roles

    @property
    def margin(self) -> int:
        """Context ring in pixels: :attr:`halo`, or the bundle's rounded up to 32 px."""
        return self.halo if self.halo is not None else self._bundle_margin

    @property
    def max_halo(self) -> int:
        """Widest ``--halo`` this model takes (:data:`MAX_HALO`)."""
        return MAX_HALO

    @property
    def _bundle_margin(self) -> int:
        return _ceil_to(max(self.meta.halo, 0), SIZE_MULTIPLE)

    def with_halo(self, halo: int) -> NeuralSegmenter:
        """This model with ``halo`` px of context around every model input (``--halo``).

        Each block of a tile is centre-cropped from an input ``halo`` px wider on every
        side, so a narrower halo trades seam fidelity for speed: against one whole-image
        prediction, 16 px changes ~3 x more pixels next to block borders than the default
        32 px (benchmarks/seams.py), and feeds 1.10 instead of 1.21 model px per output px
        on CPU.

        Raises:
            ConfigError: ``halo`` is not a multiple of 16 (model inputs must stay multiples
                of the network's 32 px stride), is negative or is above :data:`MAX_HALO`.
        """
        step = SIZE_MULTIPLE // 2
        if halo > MAX_HALO:
            raise ConfigError(
                f"--halo {halo}: a learned model takes at most {MAX_HALO} px of context (its "
                f"default is {self._bundle_margin}; benchmarks/seams.py finds 64 practically "
                "seamless); wider context multiplies the memory of every model input"
            )
        if halo < 0 or halo % step:
            lo = max(halo, 0) // step * step
            raise ConfigError(
                f"--halo {halo}: a learned model takes its context in multiples of {step} px "
                f"(its inputs must stay multiples of {SIZE_MULTIPLE} px); use {lo} or "
                f"{lo + step} (this model's default: {self._bundle_margin})"
            )
        return replace(self, halo=halo)

    def prepare(self, survey: SurveyRaster) -> Prepared:
        """Check bands and GSD against the bundle; no survey statistics are needed.

        Raises:
            BandError: the survey lacks a band role the model was trained on.
        """
        survey.require(self.roles, f"model bundle {self.path}")
        warnings: list[str] = []
        rng = self.meta.gsd_range_m
        gsd = survey.grid.gsd_m
        if rng and not (rng[0] / 2 <= gsd <= rng[1] * 2):
            warnings.append(
                f"{survey.path}: GSD {gsd:.3g} m is far outside the {rng[0]:.3g}-{rng[1]:.3g} m "
                f"the model {self.name!r} was trained on; expect poor results (resample the "
                "survey with gdalwarp -tr, or train on data at this GSD)"
            )
        far = self._radiometry_doubt(survey)
        if far:
            warnings.append(far)
        info = {"bundle": self.path, "engine": self.engine,
                "runs_as": runs_as(self.engine, self.meta.arch.arch), "margin": self.margin,
                "arch": self.meta.arch.arch, "encoder": self.meta.arch.encoder}
        # On CPU a tile runs as blocks of at most CPU_BLOCK_INPUT px; tiles that are whole
        # numbers of full blocks waste no margin on a short last block (1024 px tiles run
        # 2 x 2 inputs of 576 px, 1.27 model px per output px; 1280 px tiles 2 x 2 of 704,
        # 1.21). GPUs take whole tiles of up to MAX_BLOCK: fewer, bigger tiles keep them busy.
        multiple = _block_interior(self.margin, gpu=self._may_use_gpu())
        return Prepared(NeuralParams(self.margin), halo=self.margin, info=info,
                        warnings=tuple(warnings), tile_multiple=multiple)

    def _radiometry_doubt(self, survey: SurveyRaster) -> str | None:
        """A warning when the survey's band means lie far from the bundle's training data.

        A model trained on 8-bit camera RGB (means ~0.5) and run on reflectance (~0.1) gives
        poor classes without a word: mIoU 0.46 against 0.68 in a probe. The survey's mean per
        band more than :data:`RADIOMETRY_SIGMAS` training standard deviations from the
        training mean is worth a warning. The means come from nine 256 px windows: a decimated
        read of a gigapixel mosaic without overviews takes seconds, nine windows milliseconds.
        """
        import rasterio
        from rasterio.windows import Window

        from agriseg.raster import read_window, sample_positions

        h, w = survey.grid.shape_yx
        side = min(256, h, w)
        sums = np.zeros(len(self.roles))
        n = 0
        with rasterio.open(survey.path) as ds:  # once for the nine windows
            for r in sample_positions(h, 3):
                for c in sample_positions(w, 3):
                    r0, c0 = min(max(int(r) - side // 2, 0), h - side), \
                        min(max(int(c) - side // 2, 0), w - side)
                    data, valid = read_window(survey, self.roles, Window(c0, r0, side, side), ds)
                    sums += data[:, valid].sum(axis=1)
                    n += int(valid.sum())
        if n == 0:
            return None
        means = [float(s / n) for s in sums]
        z = [abs(m - mu) / sd for m, mu, sd in zip(means, self.meta.mean, self.meta.std,
                                                    strict=True)]
        if max(z) <= RADIOMETRY_SIGMAS:
            return None
        show = ", ".join(f"{r} {m:.3g} (trained {mu:.3g} +- {sd:.3g})" for r, m, mu, sd in
                         zip(self.roles, means, self.meta.mean, self.meta.std, strict=True))
        return (f"{survey.path}: its band values are far from what the model {self.name!r} was "
                f"trained on ({show}): another camera, bit depth or reflectance scale? Expect "
                "poor results; check the bands (--bands) and the raster's scale, or train on "
                "data like this survey")

    def warm_up(self, tile_size: int, scale: float | None = None) -> None:
        """Load the model into this process before the first tile asks for it.

        On a GPU also run one batch of a full tile's shape: that creates the CUDA context and
        lets cuDNN's autotuner pick that shape's kernels once, before the worker's threads
        all start a first tile at the same time. ``scale``: the tiles will come as 8-bit band
        values with that scale (:meth:`predict_classes`).
        """
        runner = get_runner(self.path, self.engine, self.meta)
        if _on_gpu(runner):
            side = _block_layout(tile_size, self.margin, gpu=True)[0] + 2 * self.margin
            dtype = np.float32 if scale is None else np.uint8
            runner.classes(np.zeros((1, len(self.roles), side, side), dtype), scale)

    def _normalise(self, pixels: np.ndarray) -> np.ndarray:
        mean = np.asarray(self.meta.mean, np.float32)[None, :, None, None]
        std = np.asarray(self.meta.std, np.float32)[None, :, None, None]
        return (pixels - mean) / std

    def predict(
        self,
        pixels: np.ndarray,
        valid: np.ndarray,
        params: Any,
        contexts: list[TileContext],
    ) -> np.ndarray:
        """Class probabilities ``(N, K, H, W)``; the outer ``margin`` ring is context only."""
        runner = get_runner(self.path, self.engine, self.meta)
        m = params.margin if isinstance(params, NeuralParams) else self.margin
        x = self._normalise(pixels.astype(np.float32, copy=False))
        return self._run_blocks(x, m, runner, _on_gpu(runner), len(self.schema), np.float32,
                                contexts, valid)

    def predict_classes(
        self,
        pixels: np.ndarray,
        valid: np.ndarray,
        params: Any,
        contexts: list[TileContext],
        scale: float | None = None,
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """Class ids and confidence percent, uint8 ``(N, H, W)``, reduced by PyTorch.

        Normalisation, softmax and the arg-max run where the model runs, so a GPU copies back
        2 bytes per pixel instead of 4 x K. None on ONNX Runtime (use :meth:`predict`).
        ``scale``: ``pixels`` are 8-bit band values, ``pixels * scale`` the model's inputs
        (scaled where the model runs).
        """
        runner = get_runner(self.path, self.engine, self.meta)
        if not hasattr(runner, "classes"):
            return None
        m = params.margin if isinstance(params, NeuralParams) else self.margin
        if scale is None:
            x, call = pixels.astype(np.float32, copy=False), runner.classes
        else:
            x, call = pixels, functools.partial(runner.classes, scale=scale)
        out = self._run_blocks(x, m, call, _on_gpu(runner), 2, np.uint8, contexts, valid)
        return out[:, 0], out[:, 1]

    def _run_blocks(
        self,
        x: np.ndarray,
        m: int,
        call: Any,
        gpu: bool,
        channels: int,
        dtype: type[np.generic],
        contexts: list[TileContext],
        valid: np.ndarray | None = None,
    ) -> np.ndarray:
        """Run ``call`` on the blocks of ``x`` and assemble its ``(N, channels, H, W)`` output.

        The outer ``m`` pixels of ``x`` are context only. Each block is read with ``m`` px of
        context and centre-cropped; blocks are batched on a GPU. Blocks whose interior holds
        no valid pixel (``valid``, ``(N, H, W)``) are not run: their output stays zero, and
        the caller writes nodata there.
        """
        n, _, h, w = x.shape
        if m and (h <= 2 * m or w <= 2 * m):
            # Too small to carry its own context (tiny rasters): reflect-pad a ring instead.
            padded = np.pad(x, ((0, 0), (0, 0), (m, m), (m, m)), mode="symmetric")
            return self._run_blocks(padded, m, call, gpu, channels, dtype, [])[:, :, m:-m, m:-m]
        ih, iw = h - 2 * m, w - 2 * m
        (by, ys), (bx, xs) = _block_layout(ih, m, gpu), _block_layout(iw, m, gpu)
        # Pad bottom/right so every block has its full (block + 2 * margin) input.
        need_h, need_w = ys[-1] + by + 2 * m, xs[-1] + bx + 2 * m
        if need_h > h or need_w > w:
            x = np.pad(x, ((0, 0), (0, 0), (0, need_h - h), (0, need_w - w)), mode="symmetric")
        out = np.zeros((n, channels, h, w), dtype)
        # Orthomosaics have nodata around the flown area: the tiles along its edge skip the
        # blocks that lie wholly outside it.
        jobs = [(i, y, xx) for i in range(n) for y in ys for xx in xs
                if valid is None or valid[i, m + y : m + y + by, m + xx : m + xx + bx].any()]
        # Batches feed a GPU; on CPU they only add activation memory (ONNX Runtime, 512 px
        # inputs: 0.70 MP/s one at a time, 0.63-0.66 in fours, and 4 GB peak in sixteens).
        per_call = max(1, MAX_BATCH_PIXELS // ((by + 2 * m) * (bx + 2 * m))) if gpu else 1
        for start in range(0, len(jobs), per_call):
            chunk = jobs[start : start + per_call]
            views = [x[i, :, y : y + by + 2 * m, xx : xx + bx + 2 * m] for i, y, xx in chunk]
            # A block that is a whole input (a GPU's usual case: one tile) is not copied.
            batch = np.ascontiguousarray(views[0][None]) if len(views) == 1 else np.stack(views)
            res = call(batch)
            for (i, y, xx), p in zip(chunk, res, strict=True):
                hh, ww = min(by, ih - y), min(bx, iw - xx)
                out[i, :, m + y : m + y + hh, m + xx : m + xx + ww] = p[:, m : m + hh, m : m + ww]
        if m and (not contexts or any(c.margin < m for c in contexts)):
            # The context ring gets its nearest interior result, unless the caller discards it.
            core = out[:, :, m : h - m, m : w - m]
            out = np.pad(core, ((0, 0), (0, 0), (m, m), (m, m)), mode="edge")
        return out

    @property
    def resources(self) -> dict[str, float] | None:
        """Dask resources of a tile task: a GPU slot when the model may run on CUDA."""
        return {"GPU": 1} if self._may_use_gpu() else None

    def _may_use_gpu(self) -> bool:
        """Whether tiles may run on CUDA, known on the client without importing PyTorch.

        Mirrors the runner's choice: the ONNX engine runs on CPU.
        """
        return self.engine != "onnx" and cuda_possible()

    def model_pixels(self, core_h: int, core_w: int) -> int:
        """Model input pixels for one core tile: its blocks with their margins, as run here.

        The tile halo alone understates them: each block carries its own margin.
        """
        m, gpu = self.margin, self._may_use_gpu()
        (sy, ys), (sx, xs) = _block_layout(core_h, m, gpu), _block_layout(core_w, m, gpu)
        return len(ys) * (sy + 2 * m) * len(xs) * (sx + 2 * m)

    def describe(self) -> dict[str, Any]:
        """Bundle facts for run.json."""
        return {
            "name": self.name,
            "kind": "learned",
            "bundle": self.path,
            # The weights themselves, and what the engine resolves to here: a resume after
            # `agriseg train` rewrote the bundle in place mixed two models' tiles.
            "bundle_sha256": bundle_digest(self.path),
            "engine": self.engine,
            "runs_as": runs_as(self.engine, self.meta.arch.arch),
            "arch": self.meta.arch.to_dict(),
            "roles": list(self.roles),
            "halo": self.margin,
            "gsd_range_m": list(self.meta.gsd_range_m) if self.meta.gsd_range_m else None,
        }


def load_neural(path: str | os.PathLike[str], engine: str = "auto") -> NeuralSegmenter:
    """Validate a bundle and wrap it (as ``bundle.load_bundle_segmenter``)."""
    from agriseg.models.bundle import load_bundle_segmenter

    seg = load_bundle_segmenter(path, engine)
    assert isinstance(seg, NeuralSegmenter)
    return seg
