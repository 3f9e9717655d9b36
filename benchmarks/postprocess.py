"""Vectorise + per-field summaries throughput (MP of mask per second) and peak memory.

    .venv/bin/python benchmarks/postprocess.py [--sizes 4096 8192] [--fields 100] [--repeat 3]

For each size a synthetic class mask (crop rows, weed blobs and disease spots that cross chunk
borders) and confidence raster are written block by block; then a *fresh process* runs
``vectorize_zones`` (with the zone-id raster and mean confidence) and ``summarize_fields``
(a grid of fields) and reports MP/s and peak RSS: of that process, and of the whole process
tree with the post-processing worker processes (see ``agriseg.pool``; a sum of each process's
peak, so an upper bound: forked workers share their parent's pages). Memory flat in raster size
means the peak RSS barely changes between sizes. ``--workers`` sets ``AGRISEG_POST_WORKERS``
(default: usable cores - 1), ``--chunk`` the chunk edge of both steps. With ``--repeat N`` each
size runs in N fresh processes and the fastest run is reported (shared machines are noisy; the
slowest time is printed too). The child runs with ``GDAL_CACHEMAX=64`` (MB): GDAL's block
cache otherwise grows to 5 % of RAM with the blocks read, which is GDAL's bounded cache, not
the algorithm's memory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.windows import Window

T0 = Affine(0.02, 0, 500000.0, 0, -0.02, 4900000.0)


def write_synthetic(path: Path, conf_path: Path, size: int, block: int = 512) -> None:
    prof = dict(driver="GTiff", width=size, height=size, count=1, dtype="uint8", crs="EPSG:32615",
                transform=T0, nodata=255, tiled=True, blockxsize=block, blockysize=block,
                compress="deflate", predictor=2, BIGTIFF="IF_SAFER")
    with rasterio.open(path, "w", **prof) as dst, rasterio.open(conf_path, "w", **prof) as cdst:
        for r in range(0, size, 2048):
            yy, xx = np.mgrid[r:min(size, r + 2048), 0:size].astype(np.float32)
            cls = (np.sin(xx / 6.0) > -0.2).astype(np.uint8)  # crop rows on soil
            weed = np.sin(xx / 97.0) * np.sin(yy / 131.0) > 0.8
            spots = np.cos(xx / 41.0 + yy / 23.0) * np.cos(yy / 57.0 - xx / 89.0) > 0.9
            cls[weed] = 2
            cls[spots] = 3
            conf = (60 + (cls * 9)).astype(np.uint8)
            w = Window(0, r, size, cls.shape[0])
            dst.write(cls, 1, window=w)
            cdst.write(conf, 1, window=w)


def peak_rss_mb(pid: int | str = "self") -> float:
    """A process's peak resident memory in MB (this one by default).

    ``/proc/self/status`` VmHWM belongs to the process image; ``ru_maxrss`` is kept across
    ``execve`` on Linux, so in the child it would report the parent's peak (the synthetic
    raster writer's), not the post-processing's.
    """
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        if pid != "self":
            return 0.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(classes: str, conf: str, n_fields: int, chunk: int | None) -> dict[str, float]:
    import geopandas as gpd
    import shapely

    from agriseg.classes import DEFAULT_CLASSES
    from agriseg.fields import FieldSet, summarize_fields
    from agriseg.pool import post_workers, worker_pids
    from agriseg.vectorize import ZoneParams, vectorize_zones

    with rasterio.open(classes) as ds:
        h, w = ds.shape
        left, bottom, right, top = ds.bounds
    k = int(np.sqrt(n_fields))
    xs, ys = np.linspace(left, right, k + 1), np.linspace(bottom, top, k + 1)
    boxes = [shapely.box(xs[i], ys[j], xs[i + 1], ys[j + 1]) for i in range(k) for j in range(k)]
    fields = gpd.GeoDataFrame({"field_id": [str(i) for i in range(len(boxes))],
                               "status": "ok"}, geometry=boxes, crs="EPSG:32615")
    t = time.perf_counter()
    zp = ZoneParams(min_area_m2=0.25) if chunk is None else ZoneParams(min_area_m2=0.25,
                                                                          chunk=chunk)
    zones = vectorize_zones(classes, DEFAULT_CLASSES, zp,
                            confidence_tif=conf, fields=fields,
                            zone_raster=Path(classes).with_name("zone_ids.tif"))
    t_zones = time.perf_counter() - t
    t = time.perf_counter()
    summarize_fields(FieldSet(fields, "field_id", "bench"), classes, DEFAULT_CLASSES,
                     zones=zones, **({} if chunk is None else {"chunk": chunk}))
    t_fields = time.perf_counter() - t
    workers_mb = sum(peak_rss_mb(pid) for pid in worker_pids())
    mp = h * w / 1e6
    return {
        "megapixels": mp, "zones": len(zones), "fields": len(fields),
        "vectorize_s": round(t_zones, 2), "summaries_s": round(t_fields, 2),
        "mp_per_s": round(mp / (t_zones + t_fields), 1),
        "vectorize_mp_s": round(mp / t_zones, 1), "summaries_mp_s": round(mp / t_fields, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "tree_peak_rss_mb": round(peak_rss_mb() + workers_mb, 1),
        "workers": post_workers(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--fields", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=1, help="fresh processes per size; best kept")
    ap.add_argument("--workers", type=int, help="post-processing worker processes")
    ap.add_argument("--chunk", type=int, help="chunk edge in pixels (default: the library's)")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(run_one(a.child[0], a.child[1], a.fields, a.chunk)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        for size in a.sizes:
            c, f = Path(tmp) / f"classes_{size}.tif", Path(tmp) / f"conf_{size}.tif"
            write_synthetic(c, f, size)
            runs = []
            for _ in range(max(1, a.repeat)):
                env = {**os.environ, "GDAL_CACHEMAX": "64"}
                if a.workers is not None:
                    env["AGRISEG_POST_WORKERS"] = str(a.workers)
                extra = [] if a.chunk is None else ["--chunk", str(a.chunk)]
                out = subprocess.run([sys.executable, __file__, "--fields", str(a.fields), *extra,
                                      "--child", str(c), str(f)], check=True,
                                     capture_output=True, text=True, env=env).stdout
                runs.append(json.loads(out.strip().splitlines()[-1]))
            r = max(runs, key=lambda x: x["mp_per_s"])
            worst = min(x["mp_per_s"] for x in runs)
            print(f"{size}x{size} ({r['megapixels']:.0f} MP, {r['zones']} zones, "
                  f"{r['fields']} fields): {r['mp_per_s']} MP/s vectorise+summaries "
                  f"(vectorise {r['vectorize_mp_s']} MP/s, summaries {r['summaries_mp_s']} "
                  f"MP/s; slowest of {len(runs)}: {worst} MP/s), {r['workers']} worker(s), "
                  f"peak RSS {max(x['peak_rss_mb'] for x in runs)} MB (with workers "
                  f"{max(x['tree_peak_rss_mb'] for x in runs)} MB)", flush=True)


if __name__ == "__main__":
    main()
