"""End-to-end speed of ``process_survey`` with the label-free model on a big RGB raster.

Builds (once, cached in --work) a deflate-tiled RGBA GeoTIFF of --size x --size pixels by
tiling a 1024 px synthetic field, measures the read-only decode rate of that file (all bands,
block by block, 2 threads like the 2 workers), then runs the survey to the finished class mask
and confidence COGs (no index rasters, no zones / fields / report: issue 4's "end to end for the
class mask") and prints both in MP/s. The default tile size is the run's own (auto).

    .venv/bin/python benchmarks/labelfree_speed.py --size 8192
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import ColorInterp

from agriseg.config import build_run_config
from agriseg.survey import process_survey
from agriseg.synth import FieldSpec, make_field


def build(path: Path, size: int, one_direction: bool = False) -> None:
    field = make_field(FieldSpec(size=1024, seed=7, row_angle_deg=20.0, row_spacing_m=0.76,
                                 nodata_border=False))
    # Mirrored copies make a herringbone (rows at +20 and -20 degrees, the model's costlier
    # two-direction path); plain copies keep one direction, with a seam every 1024 px.
    flip = 1 if one_direction else -1
    reps = -(-size // 1024)
    profile = {"driver": "GTiff", "width": size, "height": size, "count": 4, "dtype": "uint8",
               "crs": field.grid.crs, "transform": field.grid.transform, "tiled": True,
               "blockxsize": 512, "blockysize": 512, "compress": "deflate"}
    with rasterio.open(path, "w", **profile) as dst:
        for i in range(reps):
            # Mirror alternate copies so rows stay continuous across the seams.
            strip = np.concatenate(
                [field.image[:, :, :: (1 if j % 2 == 0 else flip)] for j in range(reps)], axis=2
            )[:, :, :size]
            strip = strip[:, :: (1 if i % 2 == 0 else flip)]
            h = min(1024, size - i * 1024)
            win = rasterio.windows.Window(0, i * 1024, size, h)
            dst.write(strip[:, :h], [1, 2, 3], window=win)
            dst.write(np.full((h, size), 255, np.uint8), 4, window=win)
        dst.colorinterp = [ColorInterp.red, ColorInterp.green, ColorInterp.blue,
                           ColorInterp.alpha]


def decode_rate(path: Path, threads: int = 2) -> float:
    with rasterio.open(path) as ds:
        windows = [w for _, w in ds.block_windows(1)]
        n = ds.width * ds.height

    def read(ws: list) -> None:
        with rasterio.open(path) as ds:
            for w in ws:
                ds.read(window=w)

    t = time.perf_counter()
    with ThreadPoolExecutor(threads) as ex:
        list(ex.map(read, [windows[i::threads] for i in range(threads)]))
    return n / 1e6 / (time.perf_counter() - t)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--tile-size", type=int, default=None, help="[auto, as agriseg run]")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "agriseg-bench")
    ap.add_argument("--mosaic", type=int, default=1, metavar="N",
                    help="run on a VRT mosaic of N x N copies of the --size raster (1 GP: "
                         "--size 8192 --mosaic 4) [1]")
    ap.add_argument("--one-direction", action="store_true",
                    help="rows in one direction (copies not mirrored) instead of the "
                         "herringbone of two")
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    src = args.work / f"field_{args.size}{'_one' if args.one_direction else ''}.tif"
    if not src.exists():
        t = time.perf_counter()
        build(src, args.size, args.one_direction)
        print(f"built {src} in {time.perf_counter() - t:.0f} s")
    if args.mosaic > 1:
        from common import vrt_mosaic

        src = vrt_mosaic(src, args.mosaic, args.work / f"field_{args.size}_x{args.mosaic}.vrt")
    side = args.size * args.mosaic
    mp = side * side / 1e6
    io = decode_rate(src, args.workers)
    cfg = build_run_config(input=src, out=args.work / "out", model="labelfree",
                           tile_size=args.tile_size, workers=args.workers, indices=False,
                           skip=("quicklook", "zones", "fields", "report", "project"),
                           overwrite=True)
    t = time.perf_counter()
    res = process_survey(cfg)
    total = time.perf_counter() - t
    tm = res.manifest["timings_s"]
    prep = res.manifest["model"]["prepared"]
    plan = res.manifest["plan"]
    print(f"raster {side}x{side} ({mp:.0f} MP), tile {plan['tile_size']}, halo "
          f"{prep['halo_px']} px ({plan['model_pixels_per_output_pixel']:.2f} model px per "
          f"output px), {args.workers} workers")
    print(f"read-only decode      : {io:7.1f} MP/s")
    print(f"segment (tiles+write) : {mp / tm['segment_s']:7.1f} MP/s  ({tm['segment_s']:.1f} s, "
          f"{tm['task_seconds'] / tm['tiles_run']:.2f} s per tile in a worker)")
    print(f"class mask end to end : {mp / total:7.1f} MP/s  ({total:.1f} s, prepare "
          f"{tm['prepare_s']:.1f} s, finalize {tm.get('finalize_s', 0):.1f} s)")
    print(f"rows: {prep['rows']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
