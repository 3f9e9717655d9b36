"""End-to-end `agriseg run` throughput against the model-only limit of the fastest engine.

    python benchmarks/throughput.py [--size 8192] [--arch unet --encoder resnet18]

Same synthetic raster (deflate-tiled RGB), same model (U-Net resnet18, 4 classes, random
init: speed does not depend on the weights) for every figure:
1. read-only decode rate of the raster (the I/O limit);
2. model-only MP/s of each engine (ONNX Runtime, PyTorch), all cores, on 512 x 512 inputs and
   on inputs of the size the pipeline feeds (tile + 2 x margin), both as one process whose
   intra-op threads use every core and as one single-threaded process per core running at
   once (summed); the fastest engine, size and layout is the limit;
3. end-to-end MP/s of `agriseg run` with the fastest engine and the run's own worker layout
   (output pixels per second, so the halo's extra model pixels count against it),
printed with `ratio = end-to-end / model-only limit`. Target on CPU: >= 0.85.

On a machine with a CUDA GPU (or with `--device cuda`) the engine is PyTorch on the GPU:
model-only MP/s is measured on the device alone (input already on the GPU) and through the
runner the pipeline uses (host float32 in, host probabilities out), the end-to-end run uses
the default GPU worker layout, nvidia-smi's utilisation is sampled during the run, and big
rasters (`--size` above 8192) are VRT mosaics of a 4096 px synthetic field. Target on one
H100: > 100 MP/s end to end.

The machine is shared: run it when nothing else runs (the figures print the load average).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from common import (
    CACHE,
    git_commit,
    machine,
    read_rate_mp_s,
    run_measured,
    synthetic_rgb,
    vrt_mosaic,
)


def run_command(src: Path, out: Path, bundle: Path, engine: str,
                tile_size: int | None, halo: int) -> list[str]:
    """`agriseg run` to the class mask only (no indices, no post-processing steps)."""
    cmd = [sys.executable, "-P", "-m", "agriseg", "run", str(src), "--out", str(out),
           "--model", str(bundle), "--engine", engine, "--no-indices", "--no-progress",
           "--skip", "quicklook,zones,fields,report,project", "--halo", str(halo)]
    return cmd + (["--tile-size", str(tile_size)] if tile_size else [])


def make_bundle(arch: str, encoder: str) -> Path:
    """A random-init bundle for speed tests (cached)."""
    from agriseg.classes import DEFAULT_CLASSES
    from agriseg.models.arch import build_model, make_spec
    from agriseg.models.bundle import BundleMeta, save_bundle

    path = CACHE / f"bench_{arch}_{encoder}.safetensors"
    if path.exists():
        return path
    spec = make_spec(arch, encoder, in_channels=3, classes=4)
    model = build_model(spec)
    meta = BundleMeta(spec, DEFAULT_CLASSES, ("red", "green", "blue"), (0.5,) * 3, (0.25,) * 3,
                      patch_size=512, halo=32, name=f"bench-{arch}-{encoder}")
    return save_bundle(model, meta, path)


def pipeline_input_side(tile: int, margin: int = 32) -> int:
    """Side of the model inputs the pipeline feeds for core tiles of ``tile`` px on CPU."""
    from agriseg.models.neural import _block_layout

    return _block_layout(tile, margin, gpu=False)[0] + 2 * margin


def model_only(bundle: Path, engine: str, tile: int = 512, seconds: float = 20.0,
               start_at: float | None = None) -> float:
    """MP/s of the engine alone on ``tile`` x ``tile`` inputs, batch 1, all cores.

    ``start_at`` (a ``time.time()``): wait after the warm-up until then before timing.
    """
    from agriseg.models.bundle import load_bundle_segmenter
    from agriseg.models.neural import get_runner

    seg = load_bundle_segmenter(bundle, engine)
    runner = get_runner(seg.path, seg.engine if engine != "auto" else "onnx", seg.meta)
    x = np.random.default_rng(0).random((1, 3, tile, tile), dtype=np.float32)
    runner(x)  # warm-up (ONNX export and session creation happen outside the timing)
    if start_at is not None:
        time.sleep(max(0.0, start_at - time.time()))
    return timed_rate(lambda: runner(x), tile * tile, seconds, min_calls=3)


def timed_rate(call: Callable[[], object], px_per_call: int, seconds: float, min_calls: int,
               sync: Callable[[], object] | None = None) -> float:
    """MP/s of ``call`` repeated for at least ``min_calls`` calls and ``seconds`` seconds.

    ``sync`` (e.g. ``torch.cuda.synchronize``) runs before the clock starts and stops, so
    asynchronous work is inside the timed window.
    """
    if sync:
        sync()
    t0, calls = time.perf_counter(), 0
    while calls < min_calls or time.perf_counter() - t0 < seconds:
        call()
        calls += 1
    if sync:
        sync()
    return calls * px_per_call / 1e6 / (time.perf_counter() - t0)


def model_only_per_core(bundle: Path, engine: str, tile: int, procs: int,
                        seconds: float = 20.0) -> float:
    """Summed MP/s of ``procs`` single-threaded processes running the engine at the same time.

    Each process warms up, then waits for a common start time so the timed windows overlap.
    """
    start = time.time() + 15.0
    code = ("import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); "
            "import throughput as t; print(t.model_only(Path(sys.argv[2]), sys.argv[3], "
            "int(sys.argv[4]), float(sys.argv[6]), start_at=float(sys.argv[5])))")
    env = {**os.environ, "AGRISEG_THREADS": "1"}
    jobs = [subprocess.Popen([sys.executable, "-c", code, str(Path(__file__).parent), str(bundle),
                              engine, str(tile), str(start), str(seconds)],
                             stdout=subprocess.PIPE, text=True, env=env) for _ in range(procs)]
    return sum(float(j.communicate()[0].split()[-1]) for j in jobs)


def gpu_model_only(bundle: Path, side: int, batch: int, seconds: float = 5.0
                   ) -> tuple[float, float]:
    """MP/s on CUDA for ``batch`` x ``side`` px inputs: device only, and through the runner.

    Device only: the input already on the GPU, bf16/fp16 autocast, channels_last, timed
    between synchronisations. Runner: what a tile task calls (host float32 in, host
    float32 probabilities out), so the copies each way and the softmax count.
    """
    import torch

    from agriseg.models.bundle import load_bundle_segmenter
    from agriseg.models.neural import get_runner

    seg = load_bundle_segmenter(bundle, "torch")
    runner = get_runner(seg.path, "torch", seg.meta)
    host = np.random.default_rng(0).random((batch, 3, side, side), dtype=np.float32)
    dev = torch.from_numpy(host).to(runner.device).contiguous(memory_format=torch.channels_last)

    def device_only() -> None:
        with torch.inference_mode(), torch.autocast(
            runner.device.type, dtype=runner.amp, enabled=runner.autocast
        ):
            runner.model(dev)

    rates = []
    for call in (device_only, lambda: runner(host)):
        for _ in range(3):  # cuDNN autotuning and allocator warm-up
            call()
        rates.append(timed_rate(call, batch * side * side, seconds, min_calls=5,
                                sync=torch.cuda.synchronize))
    return rates[0], rates[1]


def gpu_runner_threads(bundle: Path, side: int, threads: int, graphs: bool,
                       seconds: float = 5.0) -> float:
    """MP/s of the tile tasks' reducing call (host float32 in, uint8 classes and confidence
    out) from ``threads`` threads at once, with or without CUDA graphs.

    Eager PyTorch gives up and takes back the GIL at each of a forward pass's few hundred
    operator calls; this shows what that costs when several threads share one GPU.
    """
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from agriseg.models.bundle import load_bundle_segmenter
    from agriseg.models.neural import get_runner

    seg = load_bundle_segmenter(bundle, "torch")
    runner = get_runner(seg.path, "torch", seg.meta)
    runner.use_graphs = graphs
    host = np.random.default_rng(0).random((1, 3, side, side), dtype=np.float32)
    for _ in range(3):
        runner.classes(host)
    torch.cuda.synchronize()
    calls = [0] * threads
    stop = time.perf_counter() + seconds

    def loop(i: int) -> None:
        while time.perf_counter() < stop:
            runner.classes(host)
            calls[i] += 1

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(loop, range(threads)))
    return sum(calls) * side * side / 1e6 / (time.perf_counter() - t0)


class GpuSampler:
    """nvidia-smi's GPU utilisation and memory, sampled every 200 ms while in the block."""

    def __init__(self) -> None:
        self.util: list[float] = []
        self.mem_mib: list[float] = []
        self._proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> GpuSampler:
        try:
            self._proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used",
                 "--format=csv,noheader,nounits", "-lms", "200"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:
            self._proc = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is None:
            return
        self._proc.terminate()
        out, _ = self._proc.communicate()
        for line in out.splitlines():
            parts = [p.strip() for p in line.split(",")]
            if len(parts) >= 2 and parts[0].replace(".", "").isdigit():
                self.util.append(float(parts[0]))
                self.mem_mib.append(float(parts[1]))

    def summary(self) -> str:
        if not self.util:
            return "GPU utilisation: not sampled (no nvidia-smi)"
        busy = [u for u in self.util if u > 0]
        return (f"GPU utilisation: mean {np.mean(self.util):.0f} % over the run, "
                f"{np.mean(busy) if busy else 0:.0f} % while busy, max {max(self.util):.0f} %; "
                f"GPU memory max {max(self.mem_mib) / 1024:.1f} GiB "
                f"({len(self.util)} samples)")


def threaded_read_rate(path: Path, threads: int, side: int = 2112, windows: int = 48) -> float:
    """MP/s of ``windows`` reads of ``side`` px float32 windows by ``threads`` at once.

    Each thread opens its own dataset, as the pipeline's tile tasks do.
    """
    from concurrent.futures import ThreadPoolExecutor

    import rasterio
    from rasterio.windows import Window

    with rasterio.open(path) as ds:
        w, h = ds.width, ds.height
    side = min(side, w, h)
    rng = np.random.default_rng(0)
    offs = [(int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1)))
            for _ in range(windows)]

    def read(off: tuple[int, int]) -> None:
        with rasterio.open(path) as ds:
            a = ds.read(window=Window(off[1], off[0], side, side))
            (a[:3].astype(np.float32) / 255).sum()

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(read, offs))
    return windows * side * side / 1e6 / (time.perf_counter() - t0)


def run_gpu(a: argparse.Namespace) -> None:
    """The CUDA variant of :func:`main` (see the module docstring)."""
    base = synthetic_rgb(min(a.size, 4096))
    import rasterio
    from rasterio.enums import Resampling

    # Orthomosaics come with overviews, and a VRT of tiles that have them uses theirs: the
    # run's overview read (which tiles hold data) then does not decode the whole mosaic.
    with rasterio.open(base, "r+") as ds:
        if not ds.overviews(1):
            ds.build_overviews([2, 4, 8, 16, 32], Resampling.average)
    src = base if a.size <= 4096 else vrt_mosaic(base, a.size // 4096,
                                                  CACHE / f"mosaic_{a.size}.vrt")
    bundle = make_bundle(a.arch, a.encoder)
    import torch

    mpx = (a.size // 4096 * 4096 if a.size > 4096 else a.size) ** 2 / 1e6
    print(f"# throughput (GPU), commit {git_commit()}, {machine()}, "
          f"{torch.cuda.get_device_name(0)}, {time.strftime('%Y-%m-%d')}")
    print(f"raster {src.name} ({mpx:.0f} MP, RGBA deflate), model {a.arch}/{a.encoder}")
    limit = a.limit or 0.0
    if not a.limit:
        print(f"read-only decode, 1 thread, {base.name}: {read_rate_mp_s(base):8.2f} MP/s",
              flush=True)
        for threads in (1, 4, 8, 16):
            print(f"tile reads ({min(2112, a.size)} px, float32) of {src.name}, "
                  f"{threads:>2} threads: "
                  f"{threaded_read_rate(src, threads):8.1f} MP/s", flush=True)
        from agriseg.models.neural import MAX_BATCH_PIXELS

        for side in (512, 2112):
            batch = max(1, MAX_BATCH_PIXELS // (side * side))
            dev, run = gpu_model_only(bundle, side, batch)
            print(f"model-only torch-cuda {batch:>2} x {side:>4} px: {dev:9.1f} MP/s on the "
                  f"device, {run:8.1f} MP/s through the runner (host copies + softmax)",
                  flush=True)
            limit = max(limit, dev)
    for threads in (int(t) for t in a.runner_threads.split(",") if t):
        for graphs in (False, True):
            rate = gpu_runner_threads(bundle, min(2112, a.size), threads, graphs)
            print(f"runner.classes, 1 x {min(2112, a.size)} px, {threads:>2} thread(s), CUDA "
                  f"graphs {'on ' if graphs else 'off'}: {rate:8.1f} MP/s", flush=True)
    for layout in a.layouts.split(",") if a.layouts else [""]:
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            cmd = run_command(src, Path(tmp) / "o", bundle, "torch", a.tile_size, a.halo)
            if a.wrap:
                cmd = [*shlex.split(a.wrap), *cmd]
            if layout.endswith("p"):  # worker processes instead of threads of the run
                conf = Path(tmp) / "processes.yaml"
                conf.write_text("processes: true\n")
                cmd += ["--config", str(conf)]
            workers, _, threads = layout.removesuffix("p").partition("x")
            if workers:
                cmd += ["--workers", workers]
            if threads:
                cmd += ["--threads-per-worker", threads]
            with GpuSampler() as gpu:
                dt, peak, _ = run_measured(cmd)
            m = json.loads((Path(tmp) / "o" / "run.json").read_text())
        t, plan = m["timings_s"], m["plan"]
        print(f"end to end ({plan['workers']}, {plan['worker_count']} x "
              f"{plan['worker_threads'] // max(plan['worker_count'], 1)} threads, tile "
              f"{plan['tile_size']} px): {mpx / dt:7.1f} MP/s wall incl. start-up and COG "
              f"finalisation ({dt:.1f} s); tiles {m['throughput_mp_s']:.1f} MP/s incl. cluster "
              f"start; tile stream {m.get('stream_mp_s') or 0:.1f} MP/s after the first tile "
              f"({t.get('first_tile_s', 0):.1f} s to it); finalisation {t['finalize_s']:.1f} s; "
              f"peak RSS {peak / 1e9:.2f} GB", flush=True)
        print(f"  {gpu.summary()}")
        print(f"  ratio={(m.get('stream_mp_s') or 0) / limit:.2f} (tile stream / device-only "
              f"limit {limit:.0f} MP/s); timings {t}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--arch", default="unet")
    ap.add_argument("--encoder", default="resnet18")
    ap.add_argument("--tile-size", type=int, default=None,
                    help="core tile of the run [the run's default on CPU: 1280 = 2 x 640 px "
                    "blocks, 704 px model inputs with the 32 px margin, 1.21 model px per "
                    "output px]")
    ap.add_argument("--halo", type=int, default=32,
                    help="context of every model input (`agriseg run --halo`) [32, the "
                    "bundle's; 16 feeds 1.10 instead of 1.21 model px per output px]")
    ap.add_argument("--engines", default="onnx,torch")
    ap.add_argument("--workers", type=int, default=None,
                    help="local workers of the run [the run's default: one per core, one "
                    "thread each]; 1 = one worker whose engine threads use every core")
    ap.add_argument("--json", type=Path, help="also write the figures as JSON (CPU)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="cuda: PyTorch on the GPU [auto: cuda when PyTorch sees one]")
    ap.add_argument("--layouts", default="",
                    help="GPU: comma-separated WORKERSxTHREADS local layouts, one run each, "
                    "e.g. 1x16,2x8 (empty parts: the run's default; a trailing p: worker "
                    "processes, e.g. x8p) [the run's default]")
    ap.add_argument("--runner-threads", default="",
                    help="GPU: also time the tile tasks' model call from these numbers of "
                         "threads at once, with and without CUDA graphs (e.g. 1,8)")
    ap.add_argument("--wrap", default="",
                    help="GPU: a command prefix for the end-to-end runs, e.g. a profiler: "
                    "'py-spy record -r 40 --idle -f speedscope -o spy.json --'")
    ap.add_argument("--limit", type=float, default=None,
                    help="GPU: device-only MP/s measured before; skips the model-only and "
                    "read figures")
    a = ap.parse_args()
    from agriseg.models.neural import cuda_available

    if a.device == "cuda" or (a.device == "auto" and cuda_available()):
        run_gpu(a)
        return
    if a.tile_size is None:
        from agriseg.grid import auto_tile_size
        from agriseg.models.neural import _block_interior

        a.tile_size = auto_tile_size(a.halo, multiple=_block_interior(a.halo, gpu=False))
    src = synthetic_rgb(a.size)
    bundle = make_bundle(a.arch, a.encoder)
    mpx = a.size * a.size / 1e6
    print(f"# throughput, commit {git_commit()}, {machine()}, {time.strftime('%Y-%m-%d')}, "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"raster {a.size}x{a.size} RGB deflate ({mpx:.0f} MP), model {a.arch}/{a.encoder}")
    io = read_rate_mp_s(src)
    print(f"read-only decode        {io:8.2f} MP/s")
    limits: dict[str, float] = {}
    cores = os.cpu_count() or 2
    for engine in a.engines.split(","):
        for side in dict.fromkeys((512, 576, pipeline_input_side(a.tile_size, a.halo))):
            os.environ["AGRISEG_THREADS"] = str(cores)
            mps = model_only(bundle, engine, side)
            print(f"model-only {engine:<6} {side:>4} px {mps:8.2f} MP/s (1 process x {cores} "
                  "threads)", flush=True)
            limits[engine] = max(limits.get(engine, 0.0), mps)
            if cores > 1:
                mps = model_only_per_core(bundle, engine, side, cores)
                print(f"model-only {engine:<6} {side:>4} px {mps:8.2f} MP/s ({cores} processes x "
                      "1 thread)", flush=True)
                limits[engine] = max(limits[engine], mps)
    os.environ.pop("AGRISEG_THREADS", None)
    best = max(limits, key=limits.__getitem__)
    results = {"io_mp_s": io, "model_only_mp_s": limits, "engine": best}
    with tempfile.TemporaryDirectory() as tmp:
        cmd = run_command(src, Path(tmp) / "o", bundle, best, a.tile_size, a.halo)
        if a.workers:
            cmd += ["--workers", str(a.workers), "--threads-per-worker", "1"]
            # One worker owning every core: the engine's intra-op threads do the parallel work.
            os.environ["AGRISEG_THREADS"] = str(max(1, cores // a.workers))
        print(f"run layout: {a.workers or cores} workers x "
              f"{max(1, cores // (a.workers or cores))} engine threads", flush=True)
        dt, peak, _ = run_measured(cmd)
        manifest = json.loads((Path(tmp) / "o" / "run.json").read_text())
    e2e_segment = manifest["throughput_mp_s"]
    t = manifest["timings_s"]
    # Zones/fields/report run after the mask and depend on what the mask shows (a random-init
    # model paints speckle); they are reported apart, not counted against the model limit.
    post = sum(v for k, v in t.items() if k.split("_s")[0] in
               ("quicklook", "zones", "fields", "report", "project"))
    e2e_total = mpx / (dt - post)
    print(f"post-processing          {post:8.1f} s (zones, fields, report; not in the ratio)")
    ratio = e2e_total / limits[best]
    side = pipeline_input_side(a.tile_size, a.halo)
    n_blocks = -(-a.tile_size // (side - 2 * a.halo))
    overhead = (n_blocks * side / a.tile_size) ** 2
    print(f"end-to-end agriseg run  {e2e_total:8.2f} MP/s (wall, incl. start-up and COG "
          f"finalisation; tiles only: {e2e_segment:.2f} MP/s), peak RSS {peak / 1e9:.2f} GB")
    print(f"margin overhead         {overhead:8.3f} model px per output px ({n_blocks} x "
          f"{n_blocks} inputs of {side} px per {a.tile_size} px tile, halo {a.halo} px)")
    print(f"ratio={ratio:.2f} (end-to-end / model-only {best}); tiles-only "
          f"ratio={e2e_segment / limits[best]:.2f}; load average {os.getloadavg()[0]:.2f}")
    # The target's ratio counts output pixels, so the margin's model pixels count against it
    # and cap it at 1 / overhead. Counting the model pixels the run feeds instead says how
    # close the rest of the pipeline (reads, hand-offs, writer, start-up, COGs) comes to the
    # model running alone; reported beside it, not instead of it.
    fed = ratio * overhead
    print(f"model px fed / model-only limit: {fed:.2f} wall, "
          f"{e2e_segment * overhead / limits[best]:.2f} tiles only (the pipeline's efficiency "
          f"around the model; the ratio above is capped at {1 / overhead:.2f} by the margin)")
    results.update(e2e_mp_s=e2e_total, e2e_tiles_mp_s=e2e_segment, ratio=ratio,
                   peak_rss_gb=peak / 1e9, halo_overhead=overhead, model_px_ratio=fed)
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
