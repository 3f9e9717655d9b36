"""Zones and field summaries computed on worker processes equal the serial results exactly."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from multiprocessing.connection import wait as wait_for
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import rasterio
import shapely
from affine import Affine
from scipy import ndimage

from agriseg import pool
from agriseg.classes import DEFAULT_CLASSES, DISEASE, WEED
from agriseg.fields import FieldSet, summarize_fields, whole_raster_field
from agriseg.pool import ordered_map, post_workers
from agriseg.vectorize import ZoneParams, grid_of, vectorize_zones
from tests.test_fields import _fields_file
from tests.test_vectorize import _conf, write_mask

GEO_T = Affine(1e-6, 0, -93.0, 0, -1e-6, 44.5)


def _noisy_mask(h: int = 260, w: int = 300) -> np.ndarray:
    """Blobs, rings and specks of both at-risk classes that straddle 32-px chunk borders."""
    rng = np.random.default_rng(3)
    noise = ndimage.gaussian_filter(rng.random((h, w)), 3)
    cls = np.ones(noise.shape, np.uint8)
    cls[:, :9] = 0
    cls[noise > np.quantile(noise, 0.75)] = WEED
    cls[(noise < np.quantile(noise, 0.12)) | (noise > np.quantile(noise, 0.95))] = DISEASE
    cls[::41, :] = 0
    cls[-3:, :4] = 255
    return cls


def _square(x: int) -> int:
    return x * x


@pytest.mark.parametrize("workers", [1, 2])
def test_ordered_map_keeps_order(workers: int) -> None:
    assert list(ordered_map(_square, range(40), workers)) == [i * i for i in range(40)]


_PARENT = os.getpid()


def _square_or_hang(x: int) -> int:
    """Squares in the calling process; hangs in a forked worker (a lock copied held)."""
    if os.getpid() != _PARENT:
        time.sleep(3600)
    return x * x


def test_stuck_worker_is_killed_and_its_chunks_computed_here(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    import agriseg.pool as pool

    monkeypatch.setattr(pool, "STUCK_MIN_S", 1.0)
    t = time.monotonic()
    assert list(ordered_map(_square_or_hang, range(6), 1)) == [i * i for i in range(6)]
    assert time.monotonic() - t < 30
    assert pool.worker_pids() == []  # the stuck worker was killed with its pool
    # Stopping a pool whose worker never returns does not wait for it either.
    stuck = pool.get_pool(1)
    assert stuck is not None
    stuck.submit(_square_or_hang, 3)
    time.sleep(0.5)
    procs = list(stuck._processes.values())
    t = time.monotonic()
    pool.shutdown_pool(grace_s=0.5)
    assert time.monotonic() - t < 10
    assert wait_for([p.sentinel for p in procs], 5)  # killed: its sentinel is ready


def test_post_workers_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGRISEG_POST_WORKERS", "0")
    assert post_workers() == 0
    monkeypatch.setenv("AGRISEG_POST_WORKERS", "3")
    assert post_workers() == 3


@pytest.fixture(params=["fork", "forkserver"])
def start_method(request: pytest.FixtureRequest) -> Iterator[str]:
    """Pools whose workers are forked from this process, or from the fork server (what the
    CLI uses once PyTorch is imported)."""
    if request.param == "forkserver":
        import torch  # noqa: F401  (the trigger: a process that imported PyTorch)

        pool.allow_fork_server()
    pool.shutdown_pool()
    try:
        assert pool.start_method() == request.param
        yield request.param
    finally:
        pool.allow_fork_server(False)
        pool.shutdown_pool()


def _has_torch(_: int) -> bool:
    return "torch" in sys.modules


def test_fork_server_workers_do_not_carry_pytorch(start_method: str) -> None:
    import torch  # noqa: F401

    workers = pool.get_pool(1)
    assert workers is not None
    assert workers.submit(_has_torch, 0).result(timeout=120) is (start_method == "fork")


def test_fork_server_ignores_a_folder_named_agriseg_in_the_working_folder(
        tmp_path: Path) -> None:
    """Run from the folder holding a clone, the fork server (`python -c`: the working folder
    first on sys.path) imported the clone's top folder as the package: every post-processing
    worker died on "cannot import name '__version__' from 'agriseg'"."""
    import subprocess

    from tests.conftest import toy_field, write_rgba

    cli = Path(sys.executable).parent / "agriseg"
    if not cli.exists():
        pytest.skip("no agriseg console script beside this interpreter")
    rgb, _ = toy_field(160, 200, seed=2)
    src = write_rgba(tmp_path / "f.tif", rgb)
    (tmp_path / "agriseg").mkdir()
    r = subprocess.run(
        [str(cli), "run", str(src), "--out", str(tmp_path / "o"), "--model", "unet-default",
         "--no-progress", "--workers", "1", "--min-zone-area", "0"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "AGRISEG_POST_WORKERS": "1", "AGRISEG_CPU_BF16": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "worker died" not in r.stderr and "ImportError" not in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize("geographic", [False, True])
def test_parallel_zones_equal_serial(tmp_path: Path, geographic: bool, start_method: str) -> None:
    cls = _noisy_mask()
    kw = {"transform": GEO_T, "crs": "EPSG:4326"} if geographic else {}
    src = write_mask(tmp_path / "c.tif", cls, block=32, **kw)
    conf = write_mask(tmp_path / "f.tif", _conf(cls), block=32, **kw)
    min_area = 2e-4 if geographic else 6 * 0.05**2
    out = {}
    for workers in (0, 2):
        zr = tmp_path / f"zid{workers}.tif"
        z = vectorize_zones(src, DEFAULT_CLASSES, ZoneParams(min_area_m2=min_area, chunk=32),
                            confidence_tif=conf, zone_raster=zr, workers=workers)
        with rasterio.open(zr) as ds:
            out[workers] = (z, ds.read(1))
    (z0, r0), (z2, r2) = out[0], out[2]
    assert len(z0) > 20
    pd.testing.assert_frame_equal(pd.DataFrame(z0.drop(columns="geometry")),
                                  pd.DataFrame(z2.drop(columns="geometry")))
    assert (shapely.to_wkb(z0.geometry.to_numpy()) == shapely.to_wkb(z2.geometry.to_numpy())).all()
    np.testing.assert_array_equal(r0, r2)


def test_parallel_field_summaries_equal_serial(tmp_path: Path, start_method: str) -> None:
    cls = _noisy_mask(400, 360)
    src = write_mask(tmp_path / "classes.tif", cls, block=32,
                     transform=Affine(0.05, 0, 500000.0, 0, -0.05, 4900000.0))
    rng = np.random.default_rng(5)
    idx = rng.normal(0.3, 0.2, cls.shape).astype(np.float32)
    idx[cls == 255] = np.nan
    ipath = tmp_path / "exg.tif"
    with rasterio.open(src) as ds:
        prof = ds.profile
        grid = grid_of(ds)
    prof.update(dtype="float32", nodata=float("nan"))
    with rasterio.open(ipath, "w", **prof) as dst:
        dst.write(idx, 1)
    fields = gpd.read_file(_fields_file(tmp_path))
    fields = fields.to_crs(grid.crs)
    fs = FieldSet(gpd.GeoDataFrame({"field_id": fields["name"], "status": "ok"},
                                   geometry=fields.geometry, crs=grid.crs), "name", "test")
    for fieldset in (fs, whole_raster_field(grid)):
        s0, s2 = (summarize_fields(fieldset, src, DEFAULT_CLASSES, {"exg": ipath}, chunk=32,
                                   workers=w) for w in (0, 2))
        pd.testing.assert_frame_equal(s0, s2)
