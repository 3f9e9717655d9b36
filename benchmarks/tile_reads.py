"""Tile reads through the shared block cache: the read path of a run, without the model.

    python benchmarks/tile_reads.py [--size 16384] [--threads 2,8] [--rounds 3]

Every tile of a VRT mosaic of a 4096 px synthetic RGBA field (deflate) is read with
``agriseg.raster.read_tile``, in the order a run submits them, by a pool of threads of one
process, as a GPU worker's tile threads read them. Prints MP/s and the block cache's counts:
blocks decoded (misses), decoded again after a later tile dropped them (retired), found
decoded or decoding (hits), put off while another thread decoded them (deferred).

``--root`` reads with the ``agriseg`` package found there instead (a copy of another commit,
e.g. ``git archive HEAD~1 agriseg | tar -x -C /tmp/base``): interleave two roots for an
A/B of the read path on one machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=16384, help="mosaic side, a multiple of 4096")
    ap.add_argument("--threads", default="2,8", help="comma-separated thread counts")
    ap.add_argument("--tile-size", type=int, default=2048, help="core tile [2048, GPU runs']")
    ap.add_argument("--halo", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3, help="reads of the whole mosaic per count")
    ap.add_argument("--source", type=Path, default=None,
                    help="read this raster instead of the mosaic (e.g. one GeoTIFF of the "
                    "same pixels, to see what the VRT costs)")
    ap.add_argument("--root", type=Path, default=None,
                    help="import agriseg from this folder [the installed one]")
    a = ap.parse_args()
    if a.root is not None:
        sys.path.insert(0, str(a.root.resolve()))
    from common import CACHE, git_commit, machine, synthetic_rgb, vrt_mosaic

    import agriseg
    from agriseg import raster
    from agriseg.grid import plan_tiles

    src = a.source or vrt_mosaic(synthetic_rgb(4096), a.size // 4096,
                                 CACHE / f"mosaic_{a.size}.vrt")
    survey = raster.open_survey(str(src))
    roles = survey.roles.spectral[:3]
    # As agriseg.predict.run_tiles submits them: swath by swath, largest tiles first.
    tiles = sorted(plan_tiles(survey.grid, a.tile_size, a.halo),
                   key=lambda t: (t.swath, -int(t.core.width * t.core.height)))
    mpx = survey.grid.width * survey.grid.height / 1e6
    print(f"# tile reads, commit {git_commit()}, {machine()}, {time.strftime('%Y-%m-%d')}; "
          f"agriseg from {Path(agriseg.__file__).parent}")
    print(f"raster {src.name} ({mpx:.0f} MP), {len(tiles)} tiles of {a.tile_size} px + "
          f"{a.halo} px halo")
    cache = raster._TILE_BLOCKS
    for threads in (int(n) for n in a.threads.split(",")):
        for _ in range(a.rounds):
            raster.clear_tile_cache()
            t0 = time.perf_counter()
            with ThreadPoolExecutor(threads) as pool:
                for _pixels, valid in pool.map(lambda t: raster.read_tile(survey, roles, t),
                                               tiles):
                    del valid
            dt = time.perf_counter() - t0
            print(f"{threads:>2} threads: {mpx / dt:7.1f} MP/s ({dt:.2f} s); blocks decoded "
                  f"{cache.misses}, again {cache.retired_loads}, hits {cache.hits}, deferred "
                  f"{getattr(cache, 'deferred', '-')}", flush=True)


if __name__ == "__main__":
    main()
