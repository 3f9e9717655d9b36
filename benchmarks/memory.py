"""Peak RSS of the whole `agriseg run` process tree (client + Dask workers) versus raster size.

    python benchmarks/memory.py [--model NAME] [--sizes 1,2,4]

Builds one 8192 x 8192 deflate-tiled synthetic field (67 MP) and VRT mosaics of it
(2 x 2 = 268 MP, 4 x 4 = 1.07 GP) so big rasters cost no disk. Target: under 2 GB at 1 GP and
within 20 % of the 67 MP run (memory must not grow with the raster). Memory is the peak of the
summed proportional set size (PSS) of the process tree; the summed RSS is printed beside it,
but it counts every page a forked post-processing worker shares with its parent twice.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from common import (
    git_commit,
    machine,
    peak_phases,
    run_measured_memory,
    synthetic_rgb,
    vrt_mosaic,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None, help="model name or bundle [default model]")
    ap.add_argument("--sizes", default="1,2,4", help="mosaic factors (n x n copies of 67 MP)")
    ap.add_argument("--tile", type=int, default=8192, help="edge of the base raster")
    ap.add_argument("--tile-size", type=int, default=1024)
    ap.add_argument("--phases", action="store_true",
                    help="also print the peak PSS during each stage of each run")
    a = ap.parse_args()
    base = synthetic_rgb(a.tile)
    print(f"# memory benchmark, commit {git_commit()}, {machine()}")
    print(f"{'raster':>10} {'MP':>8} {'seconds':>8} {'MP/s':>7} {'peak PSS GB':>12} "
          f"{'vs first':>9} {'peak RSS-sum GB':>16}")
    first = None
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(x) for x in a.sizes.split(",")):
            src = base if n == 1 else vrt_mosaic(base, n, Path(tmp) / f"mosaic{n}.vrt")
            mpx = (a.tile * n) ** 2 / 1e6
            cmd = [sys.executable, "-P", "-m", "agriseg", "run", str(src), "--out",
                   str(Path(tmp) / f"out{n}"), "--tile-size", str(a.tile_size), "--no-progress",
                   "--no-indices", "--overwrite"]
            if a.model:
                cmd += ["--model", a.model]
            lines: list[tuple[float, str]] = []
            dt, mem, _ = run_measured_memory(cmd, lines)
            peak = mem.peak_pss
            first = first or peak
            print(f"{n}x{n:<8} {mpx:8.0f} {dt:8.1f} {mpx / dt:7.2f} {peak / 1e9:12.2f} "
                  f"{peak / first:9.2f} {mem.peak / 1e9:16.2f}")
            if a.phases:
                for stage, pss in peak_phases(mem, lines):
                    print(f"    {pss / 1e9:5.2f} GB  after: {stage[:100]}")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
