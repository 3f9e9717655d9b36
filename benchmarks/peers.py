"""agriseg against NRCan's geo-inference: same raster, same model, side by side.

    python benchmarks/peers.py [--size 4096] [--patch-size 512] [--skip-torch]

1. Creates once, cached in ``$AGRISEG_BENCH_CACHE/peers-venv`` (default
   /tmp/agriseg-bench/peers-venv), a separate Python 3.11 venv with torch 2.14.1 /
   torchvision 0.29.1 (the releases on this machine's disk: other versions download GBs) and
   the latest ``geo-inference`` from PyPI (3.2.x; it pulls torchgeo, dask-image, rioxarray).
2. Builds one raster for both tools: the synthetic field of ``common.synthetic_rgb`` written
   again as 3-band RGB (geo-inference reads every band and feeds them all to the model; the
   synthetic field has no nodata, so dropping alpha changes no pixel).
3. Builds one model for both: U-Net resnet18, 4 classes, random init (speed does not depend
   on the weights), saved as an agriseg bundle and exported with the same weights as the
   TorchScript file geo-inference loads. geo-inference hands the model the raw uint8 patch,
   so the exported wrapper does what its ``examples/script_model.py`` does: scale to 0..1,
   normalise with the bundle's mean/std and return 4-class log-softmax.
4. Runs geo-inference (CPU, ``--patch_size 512``, its own defaults otherwise: stride = half a
   patch, i.e. every pixel goes through the model 4 times and is blended with Hann windows;
   Dask threads = cores - 1) and ``agriseg run`` (ONNX Runtime and PyTorch engines, its default
   tile; in its default layout, one single-threaded worker per core, and with one worker owning
   every core via AGRISEG_THREADS), each as a subprocess, measuring wall
   time and peak RSS of the whole process tree (start-up and output writing included).
5. Prints wall seconds, MP/s, peak RSS and CPU seconds per run (CPU seconds suffer less
   from other load on a shared machine), agriseg's "mask only" time (wall less its quicklook,
   zones, field and report steps, read from run.json: geo-inference writes only the mask),
   ``speedup=agriseg/geo-inference`` per agriseg engine and the share of pixels on which the
   two class maps agree (same weights: a check that both tools ran the same model on the same
   bands).

Caveat: with random weights the class map is speckle, and agriseg's zones step (after the
mask is final) can dominate its wall time; compare the "mask only" rows for like-for-like work.

Target (issue 7): agriseg >= 5x geo-inference's throughput at lower peak RSS.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import rasterio
from common import CACHE, git_commit, machine, run_measured_memory, synthetic_rgb
from rasterio.enums import ColorInterp
from throughput import make_bundle

PEERS_VENV = CACHE / "peers-venv"
PEERS_PYTHON = "python3.11"
# The torch releases on this machine's disk; anything else downloads gigabytes.
TORCH_PINS = ("torch==2.14.1", "torchvision==0.29.1")
READY = PEERS_VENV / ".agriseg-ready"


def _check(cmd: list[str]) -> str:
    """Run ``cmd`` (argv list, no shell); return stdout or raise with its stderr tail."""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{cmd} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout


def peers_venv() -> Path:
    """Python of the geo-inference venv, creating and filling it on first use."""
    py = PEERS_VENV / "bin" / "python"
    if READY.exists() and py.exists():
        return py
    if not py.exists():
        print(f"creating {PEERS_VENV} ({PEERS_PYTHON})", flush=True)
        _check([PEERS_PYTHON, "-m", "venv", str(PEERS_VENV)])
    print("installing torch, then geo-inference into it (several minutes)", flush=True)
    _check([str(py), "-m", "pip", "install", "-q", *TORCH_PINS])
    _check([str(py), "-m", "pip", "install", "-q", "geo-inference"])
    _check([str(py), "-c", "import geo_inference.geo_inference"])
    READY.write_text(time.strftime("%Y-%m-%d %H:%M:%S\n"))
    return py


def peer_version(py: Path, dist: str) -> str:
    """Installed version of ``dist`` in the venv of ``py``."""
    code = f"import importlib.metadata as m; print(m.version({dist!r}))"
    return _check([str(py), "-c", code]).strip()


def rgb_copy(src: Path) -> Path:
    """``src`` as a 3-band RGB deflate-tiled GeoTIFF (cached beside it), block by block."""
    out = src.with_name(src.stem + "_rgb3.tif")
    if out.exists():
        return out
    tmp = out.with_suffix(".partial.tif")
    with rasterio.open(src) as ds:
        profile = ds.profile
        profile.update(count=3, photometric="RGB", compress="deflate", tiled=True,
                       blockxsize=256, blockysize=256, interleave="pixel")
        profile.pop("nodata", None)
        with rasterio.open(tmp, "w", **profile) as dst:
            dst.colorinterp = [ColorInterp.red, ColorInterp.green, ColorInterp.blue]
            for _, win in ds.block_windows(1):
                dst.write(ds.read([1, 2, 3], window=win), window=win)
    os.replace(tmp, out)
    return out


def torchscript_for_geo_inference(bundle: Path) -> Path:
    """The bundle's network with the same weights, traced as geo-inference wants it.

    geo-inference calls ``model(uint8 tensor of shape (1, bands, patch, patch))`` and blends
    the outputs, one channel per class; the wrapper scales, normalises with the bundle's
    mean/std and returns log-softmax like geo-inference's ``examples/script_model.py``.
    """
    import torch
    from torch import nn

    from agriseg.models.bundle import load_bundle_model

    out = bundle.with_name(bundle.stem + "_geo_inference.pt")
    if out.exists() and out.stat().st_mtime >= bundle.stat().st_mtime:
        return out
    meta, net = load_bundle_model(bundle)

    class GeoInferenceModel(nn.Module):
        def __init__(self, net: nn.Module, mean: tuple[float, ...],
                     std: tuple[float, ...]) -> None:
            super().__init__()
            self.net = net
            self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
            self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = (x.float() / 255.0 - self.mean) / self.std
            return torch.log_softmax(self.net(x), dim=1)

    wrapped = GeoInferenceModel(net, meta.mean, meta.std).eval()
    example = torch.randint(0, 256, (1, len(meta.mean), 512, 512), dtype=torch.uint8)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.trace is deprecated; geo-inference needs it
        traced = torch.jit.trace(wrapped, example)
    tmp = out.with_suffix(".partial.pt")
    traced.save(str(tmp))
    os.replace(tmp, out)
    return out


@contextlib.contextmanager
def environ(**values: str) -> Iterator[None]:
    """Set environment variables for the subprocesses started inside the block."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def measured(cmd: list[str]) -> tuple[float, int, float, int]:
    """``run_measured`` plus the CPU seconds (user + system) the process tree used.

    CPU seconds depend less on what else the machine runs than wall time does; they count
    every descendant its parent waited for (Dask workers included). Returns (seconds, peak
    summed RSS, CPU seconds, peak summed PSS): RSS counts the pages a forked child shares
    with its parent twice (agriseg's post-processing workers are forked), PSS once, as the
    kernel and a cgroup memory limit do.
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    dt, mem, _ = run_measured_memory(cmd)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return dt, mem.peak, cpu, mem.peak_pss


def post_seconds(run_json: Path) -> float:
    """Seconds ``agriseg run`` spent after the class raster was final (quicklook, zones,
    field summaries, report: work geo-inference does not do), from its run.json."""
    from agriseg.survey import POST_STEPS

    timings = json.loads(run_json.read_text())["timings_s"]
    return sum(float(timings.get(f"{name}_s", 0.0)) for name, _ in POST_STEPS)


def agreement(a: Path, b: Path) -> float:
    """Share of pixels where two class rasters (same grid, 255 = nodata) hold the same class."""
    same = total = 0
    with rasterio.open(a) as da, rasterio.open(b) as db:
        if (da.width, da.height) != (db.width, db.height):
            raise RuntimeError(f"{a} and {b} differ in size")
        for _, win in da.block_windows(1):
            x, y = da.read(1, window=win), db.read(1, window=win)
            valid = (x != 255) & (y != 255)
            same += int(np.count_nonzero((x == y) & valid))
            total += int(np.count_nonzero(valid))
    return same / max(total, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=4096, help="raster edge in pixels [4096]")
    ap.add_argument("--patch-size", type=int, default=512, help="geo-inference patch [512]")
    ap.add_argument("--tile-size", type=int, default=None,
                    help="agriseg core tile [the run's default]")
    ap.add_argument("--workers", default="auto,1",
                    help="agriseg worker layouts to run, comma-separated: auto = the run's "
                    "default (one single-threaded worker per core), N = N workers sharing the "
                    "cores as engine threads [auto,1]")
    ap.add_argument("--skip-torch", action="store_true", help="agriseg ONNX engine only")
    a = ap.parse_args()

    py = peers_venv()
    gi_version = peer_version(py, "geo-inference")
    src = rgb_copy(synthetic_rgb(a.size))
    bundle = make_bundle("unet", "resnet18")
    script = torchscript_for_geo_inference(bundle)
    mpx = a.size * a.size / 1e6
    cores = os.cpu_count() or 2

    print(f"# peers, commit {git_commit()}, {machine()}, {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"raster {a.size}x{a.size} RGB deflate ({mpx:.1f} MP), U-Net resnet18, 4 classes; "
          f"geo-inference {gi_version} (torch {peer_version(py, 'torch')}), patch "
          f"{a.patch_size}, stride {a.patch_size // 2}; agriseg tile {a.tile_size or 'auto'}, "
          f"layouts {a.workers}")
    print(f"{'tool':<14} {'engine':<8} {'seconds':>8} {'MP/s':>7} {'peak RSS GB':>12} "
          f"{'PSS GB':>7} {'CPU s':>8} {'CPU s/MP':>9}")
    rows: dict[str, tuple[float, int, float, int]] = {}

    def row(tool: str, engine: str, dt: float, peak: int, cpu: float, pss: int) -> None:
        print(f"{tool:<14} {engine:<8} {dt:8.1f} {mpx / dt:7.3f} {peak / 1e9:12.2f} "
              f"{pss / 1e9:7.2f} {cpu:8.1f} {cpu / mpx:9.1f}", flush=True)

    with tempfile.TemporaryDirectory(prefix="agriseg-peers-") as tmp:
        gi_dir = Path(tmp) / "geo-inference"
        cmd = [str(PEERS_VENV / "bin" / "geo_inference"), "-i", str(src), "-m", str(script),
               "-wd", str(gi_dir), "-ps", str(a.patch_size), "-cls", "4", "-d", "cpu"]
        rows["geo-inference"] = measured(cmd)
        row("geo-inference", "torch", *rows["geo-inference"])
        masks = sorted(gi_dir.glob("*_mask_*.tif"))
        if not masks:
            raise RuntimeError(f"geo-inference wrote no mask in {gi_dir}")

        engines = ["onnx"] if a.skip_torch else ["onnx", "torch"]
        runs = [(e, w) for w in a.workers.split(",") for e in engines]
        outs: dict[str, Path] = {}
        for engine, workers in runs:
            name = engine if workers == "auto" else f"{engine} {workers}w"
            out = Path(tmp) / f"agriseg-{engine}-{workers}"
            cmd = [sys.executable, "-P", "-m", "agriseg", "run", str(src), "--out", str(out),
                   "--model", str(bundle), "--engine", engine, "--no-indices", "--no-progress"]
            if a.tile_size:
                cmd += ["--tile-size", str(a.tile_size)]
            env: dict[str, str] = {}
            if workers != "auto":
                cmd += ["--workers", workers]
                env["AGRISEG_THREADS"] = str(max(1, cores // int(workers)))
            with environ(**env):
                rows[name] = measured(cmd)
            outs[name] = out / "classes.tif"
            row("agriseg", name, *rows[name])
            dt, peak, cpu, pss = rows[name]
            mask_dt = dt - post_seconds(out / "run.json")
            rows[f"{name} mask"] = (mask_dt, peak, cpu, pss)
            print(f"{'  mask only':<14} {name:<8} {mask_dt:8.1f} {mpx / mask_dt:7.3f} "
                  "(wall less agriseg's post-processing steps)", flush=True)

        gi_dt, gi_peak, gi_cpu, gi_pss = rows["geo-inference"]
        for name in outs:
            dt, peak, cpu, pss = rows[name]
            mask_dt = rows[f"{name} mask"][0]
            print(f"speedup={gi_dt / dt:.1f}x (agriseg {name} / geo-inference MP/s, whole "
                  f"runs; mask only {gi_dt / mask_dt:.1f}x; by CPU seconds "
                  f"{gi_cpu / cpu:.1f}x), peak RSS {peak / gi_peak:.2f}x and PSS "
                  f"{pss / gi_pss:.2f}x of geo-inference's; "
                  f"class agreement {agreement(outs[name], masks[0]):.1%}")

if __name__ == "__main__":
    main()
