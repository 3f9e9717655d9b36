"""Shared fixtures: tiny real-CRS rasters written with rasterio, and one real Dask cluster."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from distributed import LocalCluster
from rasterio.enums import ColorInterp

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "sample_tiles"
LAMBERTON = SAMPLES / "lamberton_soybean_uav" / "20180815_Lamberton_clipped.tif"
LAMBERTON_PLOTS = SAMPLES / "lamberton_soybean_uav" / "lamberton_plots.geojson"
LAMBERTON_PLOTS_SMALL = SAMPLES / "lamberton_soybean_uav" / "lamberton_plots_small.geojson"
UTM15 = "EPSG:32615"


@pytest.fixture(autouse=True, scope="session")
def _short_stuck_worker_timeout() -> Iterator[None]:
    """Give up on a stuck post-processing worker after 30 s instead of 300 s.

    Test chunks take milliseconds; a forked worker stuck on a lock copied in its held state
    (rare, see agriseg.pool) then costs CI half a minute, not five (it did once, 2026-11-27).
    """
    from agriseg import pool

    old = pool.STUCK_MIN_S
    pool.STUCK_MIN_S = 30.0
    yield
    pool.STUCK_MIN_S = old


def write_rgba(
    path: Path,
    rgb: np.ndarray,
    valid: np.ndarray | None = None,
    transform: Affine | None = None,
    crs: str | None = UTM15,
    block: int = 64,
) -> Path:
    """Write uint8 RGB (+ alpha from ``valid``) as a tiled GeoTIFF."""
    _, h, w = rgb.shape
    alpha = np.where(valid if valid is not None else np.ones((h, w), bool), 255, 0).astype("uint8")
    profile = {
        "driver": "GTiff", "width": w, "height": h, "count": 4, "dtype": "uint8",
        "transform": transform or Affine(0.02, 0, 500000.0, 0, -0.02, 4900000.0),
        "tiled": True, "blockxsize": block, "blockysize": block, "compress": "deflate",
    }
    if crs:
        profile["crs"] = crs
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(rgb.astype("uint8"), [1, 2, 3])
        dst.write(alpha, 4)
        dst.colorinterp = [ColorInterp.red, ColorInterp.green, ColorInterp.blue, ColorInterp.alpha]
    return path


def toy_field(h: int = 300, w: int = 260, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Soil with green stripes (rows) and a nodata corner."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    veg = (np.sin((xx * 0.8 + yy * 0.3) / 4.0) > 0.4) | (rng.random((h, w)) > 0.995)
    rgb = np.empty((3, h, w), np.float32)
    rgb[0] = np.where(veg, 60, 150)
    rgb[1] = np.where(veg, 140, 120)
    rgb[2] = np.where(veg, 50, 90)
    rgb += rng.normal(0, 6, rgb.shape)
    valid = (xx + yy) > 40
    return np.clip(rgb, 0, 255).astype(np.uint8), valid


@pytest.fixture()
def rgba_tif(tmp_path: Path) -> Path:
    rgb, valid = toy_field()
    return write_rgba(tmp_path / "field.tif", rgb, valid)


@pytest.fixture(scope="session")
def cluster() -> Iterator[LocalCluster]:
    """One real multi-process Dask cluster for the whole session (starting one costs seconds)."""
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as c:
        yield c


@pytest.fixture()
def scheduler(cluster: LocalCluster) -> str:
    return str(cluster.scheduler_address)


def stop_processes(procs: list[subprocess.Popen[bytes]]) -> None:
    """Stop processes started in their own sessions (a Dask scheduler, workers): TERM, then KILL."""
    for p in reversed(procs):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
