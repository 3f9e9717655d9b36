"""COG finalisation of a run's two masks, step by step, without the tiles.

    python benchmarks/finalize.py [--size 32768] [--folder /tmp/agriseg-finalize]

Writes the working files a run leaves for ``classes`` and ``confidence`` (uint8, PACKBITS,
512 px blocks, the first overview level beside each as ``.ovr``, both made as the tile
writer makes them) with blobby classes and an 8 px blobby confidence plus noise, then times
what :func:`agriseg.output.finalize_cog` does with them: the smaller overview levels (in
turn, as a run builds them, and side by side), and the COG copies side by side (as a run makes
them) in ZSTD and DEFLATE, then one mask alone on all cores and on one thread. On a GPU
machine the copies are most of a large run's finalisation (benchmarks/RESULTS.md, "Eighth GPU
session").
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import rasterio
import rasterio.shutil
from affine import Affine
from rasterio.windows import Window

from agriseg import output
from agriseg.output import COG_BLOCK, OutputSpec, halve, overview_file

SPECS = [OutputSpec("classes", "uint8", 255, "NEAREST", "classes"),
         OutputSpec("confidence", "uint8", 255, "AVERAGE", "confidence")]
TILE = 2048


def _profile(size: int, half: bool) -> dict[str, object]:
    side, transform = size, Affine(0.02, 0, 500000, 0, -0.02, 5000000)
    if half:
        side, transform = (size + 1) // 2, transform * Affine.scale(2)
    return {"driver": "GTiff", "width": side, "height": side, "count": 1, "dtype": "uint8",
            "crs": "EPSG:32633", "transform": transform, "nodata": 255, "tiled": True,
            "blockxsize": COG_BLOCK, "blockysize": COG_BLOCK, "bigtiff": "IF_SAFER",
            "sparse_ok": True, "compress": "packbits"}


def _make(folder: Path, spec: OutputSpec, base: np.ndarray, size: int) -> None:
    path = folder / f"{spec.name}.work.tif"
    with rasterio.open(path, "w", **_profile(size, False)) as dst, \
            rasterio.open(overview_file(path), "w", **_profile(size, True)) as ovr:
        for row in range(0, size, TILE):
            for col in range(0, size, TILE):
                tile = np.roll(base, (row // 7 + col // 3) % 97, axis=1)
                dst.write(tile, 1, window=Window(col, row, TILE, TILE))
                small = halve(tile, 255, spec.resampling)
                ovr.write(small, 1, window=Window(col // 2, row // 2, *small.shape[::-1]))
    shutil.copy(overview_file(path), folder / f"{spec.name}.ovr.first-level")


def _side_by_side(step: Callable[[OutputSpec], None]) -> float:
    t = time.perf_counter()
    threads = [threading.Thread(target=step, args=(spec,)) for spec in SPECS]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=32768, help="side, a multiple of 2048")
    ap.add_argument("--folder", type=Path, default=Path("/tmp/agriseg-finalize"))
    args = ap.parse_args()
    folder, size = args.folder, args.size
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ones = np.ones((32, 32), np.uint8)
    classes = np.kron(rng.integers(0, 4, (TILE // 32, TILE // 32)).astype(np.uint8), ones)
    blobs = np.kron(rng.integers(40, 90, (TILE // 8, TILE // 8)), np.ones((8, 8)))
    confidence = (blobs + rng.integers(0, 3, (TILE, TILE))).astype(np.uint8)
    t = time.perf_counter()
    makers = [threading.Thread(target=_make, args=(folder, spec, base, size))
              for spec, base in zip(SPECS, (classes, confidence), strict=True)]
    for th in makers:
        th.start()
    for th in makers:
        th.join()
    print(f"working files of {size} x {size} px made in {time.perf_counter() - t:.1f} s",
          flush=True)

    def overviews(spec: OutputSpec) -> None:
        output._build_overviews(folder / f"{spec.name}.work.tif", spec)

    def first_level_only() -> None:
        for spec in SPECS:
            shutil.copy(folder / f"{spec.name}.ovr.first-level",
                        overview_file(folder / f"{spec.name}.work.tif"))

    def copy(codec: str, threads: str = "ALL_CPUS") -> Callable[[OutputSpec], None]:
        options = ({"COMPRESS": "ZSTD", "LEVEL": "1"} if codec == "zstd" else
                   {"COMPRESS": "DEFLATE", "LEVEL": "1", "PREDICTOR": "NO"})

        def run(spec: OutputSpec) -> None:
            rasterio.shutil.copy(
                folder / f"{spec.name}.work.tif", folder / f"{spec.name}.{codec}.tif",
                driver="COG", BLOCKSIZE=str(COG_BLOCK), OVERVIEWS="FORCE_USE_EXISTING",
                BIGTIFF="IF_SAFER", NUM_THREADS=threads, **options)
        return run

    timed = []
    for spec in SPECS:
        t = time.perf_counter()
        overviews(spec)
        timed.append(f"{spec.name} {time.perf_counter() - t:.2f} s")
    print("overview levels in turn (as a run builds them):", ", ".join(timed), flush=True)
    first_level_only()
    # A run builds one at a time (output._OVERVIEW_LOCK); here without that lock.
    saved = output._OVERVIEW_LOCK
    output._OVERVIEW_LOCK = contextlib.nullcontext()  # type: ignore[assignment]
    try:
        print(f"overview levels side by side: {_side_by_side(overviews):.2f} s", flush=True)
    finally:
        output._OVERVIEW_LOCK = saved
    for codec in ("zstd", "deflate"):
        print(f"COG copies side by side, {codec}: {_side_by_side(copy(codec)):.2f} s",
              flush=True)
    for spec in SPECS:
        for codec, threads in (("zstd", "ALL_CPUS"), ("zstd", "1"), ("deflate", "ALL_CPUS")):
            t = time.perf_counter()
            copy(codec, threads)(spec)
            mb = (folder / f"{spec.name}.{codec}.tif").stat().st_size / 2**20
            print(f"COG copy of {spec.name} alone, {codec}, threads {threads}: "
                  f"{time.perf_counter() - t:.2f} s, {mb:.0f} MB", flush=True)
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
