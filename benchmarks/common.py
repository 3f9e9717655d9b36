"""Shared helpers for the benchmark scripts: big test rasters and process-tree memory.

Benchmarks print figures; they are not timed tests (the machines are noisy). Ratios are
measured within one run so they compare like with like.
"""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import rasterio
from affine import Affine
from rasterio.enums import ColorInterp

CACHE = Path(os.environ.get("AGRISEG_BENCH_CACHE", "/tmp/agriseg-bench"))


def machine() -> str:
    """One line naming the machine, for result tables."""
    return f"{platform.node()} {platform.machine()} {os.cpu_count()} cores, " \
           f"{psutil.virtual_memory().total / 2**30:.0f} GiB"


def git_commit() -> str:
    """Short commit of the working tree (``unknown`` outside git)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def synthetic_rgb(size: int = 8192, seed: int = 0) -> Path:
    """A deflate-tiled RGBA field raster of ``size`` px, cached between runs.

    Uses agriseg.synth (crop rows, weeds, disease, nodata border), generated in strips of
    rows so memory stays small.
    """
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"field_rgb_{size}_{seed}.tif"
    if path.exists():
        return path
    from agriseg.synth import FieldSpec, write_field

    tmp = path.with_suffix(".partial.tif")
    truth = CACHE / f"field_rgb_{size}_{seed}_truth.tif"
    write_field(FieldSpec(size=size, seed=seed, nodata_border=False), tmp, truth)
    os.replace(tmp, path)
    return path


def vrt_mosaic(tile: Path, n: int, out: Path) -> Path:
    """A VRT of ``n x n`` copies of ``tile`` side by side (a big raster at no disk cost).

    Written by hand because rasterio has no buildvrt and gdalbuildvrt may be absent.
    """
    with rasterio.open(tile) as ds:
        w, h, count = ds.width, ds.height, ds.count
        t = ds.transform
        crs = ds.crs.to_wkt()
        interp = [ci.name.capitalize() if ci != ColorInterp.undefined else "Undefined"
                  for ci in ds.colorinterp]
        bx, by = ds.block_shapes[0]
    gt = Affine(t.a, 0, t.c, 0, t.e, t.f)
    bands = []
    for b in range(1, count + 1):
        srcs = "".join(
            f"<SimpleSource><SourceFilename relativeToVRT=\"0\">{tile}</SourceFilename>"
            f"<SourceBand>{b}</SourceBand>"
            f"<SourceProperties RasterXSize=\"{w}\" RasterYSize=\"{h}\" DataType=\"Byte\" "
            f"BlockXSize=\"{bx}\" BlockYSize=\"{by}\"/>"
            f"<SrcRect xOff=\"0\" yOff=\"0\" xSize=\"{w}\" ySize=\"{h}\"/>"
            f"<DstRect xOff=\"{i * w}\" yOff=\"{j * h}\" xSize=\"{w}\" ySize=\"{h}\"/>"
            "</SimpleSource>"
            for j in range(n) for i in range(n)
        )
        bands.append(
            f"<VRTRasterBand dataType=\"Byte\" band=\"{b}\"><ColorInterp>{interp[b - 1]}"
            f"</ColorInterp>{srcs}</VRTRasterBand>"
        )
    gts = ", ".join(repr(v) for v in (gt.c, gt.a, 0.0, gt.f, 0.0, gt.e))
    out.write_text(
        f"<VRTDataset rasterXSize=\"{w * n}\" rasterYSize=\"{h * n}\">"
        f"<SRS>{crs}</SRS><GeoTransform>{gts}</GeoTransform>{''.join(bands)}</VRTDataset>"
    )
    return out


class PeakRSS:
    """Samples the summed RSS of a process and all its children (Dask workers included).

    ``peak`` sums RSS, which counts pages shared between processes once per process (shared
    libraries in every worker, and all of a forked child's pages it still shares with its
    parent). ``peak_pss`` sums the proportional set size (Linux), which splits shared pages
    between their processes: the tree's real physical memory.

    PSS costs: the kernel walks every page table of the process to report it (``smaps``),
    holding its memory-map lock, which stalls the process's own page faults and ``mmap``
    calls. Sampled every 0.1 s it slowed a 67 MP `agriseg run` by 10 % (51.7 against 46.9 s
    on 2 cores), so speed benchmarks pass ``pss=False``: RSS alone comes from the kernel's
    counters (``statm``), at no measurable cost.
    """

    def __init__(self, pid: int, interval: float = 0.1, pss: bool = True) -> None:
        self.pid = pid
        self.interval = interval
        self.pss = pss
        self.peak = 0
        self.peak_pss = 0
        # (monotonic seconds, summed PSS) of every sample, for timelines.
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                root = psutil.Process(self.pid)
                procs = [root, *root.children(recursive=True)]
                total = pss = 0
                for p in procs:
                    with contextlib.suppress(psutil.Error):
                        info = p.memory_full_info() if self.pss else p.memory_info()
                        total += info.rss
                        pss += getattr(info, "pss", info.rss)
                self.peak = max(self.peak, total)
                self.peak_pss = max(self.peak_pss, pss)
                self.samples.append((time.monotonic(), pss))
            except psutil.Error:
                return
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_measured(cmd: list[str]) -> tuple[float, int, str]:
    """Run a command; return (seconds, peak RSS bytes of its process tree, stderr tail).

    For speed figures: the memory sampler reads RSS only (see :class:`PeakRSS`).
    """
    dt, mem, err = run_measured_memory(cmd, pss=False)
    return dt, mem.peak, err


def run_measured_memory(
    cmd: list[str], lines: list[tuple[float, str]] | None = None, pss: bool = True
) -> tuple[float, PeakRSS, str]:
    """Run a command; return (seconds, its process tree's memory sampler, stderr tail).

    ``lines`` collects its stderr lines with their monotonic arrival times (for
    :func:`peak_phases`); ``pss=False`` samples RSS only, which does not slow the command.
    """
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    got: list[tuple[float, str]] = [] if lines is None else lines
    with PeakRSS(proc.pid, pss=pss) as mem:
        assert proc.stderr is not None
        for line in proc.stderr:
            got.append((time.monotonic(), line.rstrip()))
        proc.wait()
    dt = time.perf_counter() - t0
    err = "\n".join(text for _, text in got)
    if proc.returncode:
        raise RuntimeError(f"{cmd} failed:\n{err[-2000:]}")
    return dt, mem, err[-500:]


def peak_phases(mem: PeakRSS, lines: list[tuple[float, str]]) -> list[tuple[str, int]]:
    """Peak PSS between consecutive stage lines of a run's log (tile progress lines merged).

    Returns:
        (stage line, peak bytes) in order; the stage is the last log line before the samples.
    """
    stages = [(t, text) for t, text in lines if not text.startswith(("tiles ", "estimate:"))]
    out: list[tuple[str, int]] = []
    for t, pss in mem.samples:
        label = "start"
        for ts, text in stages:
            if ts > t:
                break
            label = text
        if out and out[-1][0] == label:
            out[-1] = (label, max(out[-1][1], pss))
        else:
            out.append((label, pss))
    return out


def read_rate_mp_s(path: Path, bands: list[int] | None = None) -> float:
    """Read-only decode rate of a raster, block by block, in MP/s (the I/O limit)."""
    t0 = time.perf_counter()
    px = 0
    with rasterio.open(path) as ds:
        idx = bands or list(range(1, ds.count + 1))
        for _, win in ds.block_windows(1):
            a = ds.read(idx, window=win)
            px += a.shape[1] * a.shape[2]
    return px / 1e6 / (time.perf_counter() - t0)


def mp(n_px: float) -> str:
    """Megapixels as text."""
    return f"{n_px / 1e6:.0f} MP"


__all__ = ["CACHE", "PeakRSS", "git_commit", "machine", "mp", "np", "peak_phases", "read_rate_mp_s",
           "run_measured", "run_measured_memory", "synthetic_rgb", "vrt_mosaic"]
