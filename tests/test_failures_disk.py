"""The disk filling up while the COG outputs are finalised.

A file-size limit (``RLIMIT_FSIZE``, with SIGXFSZ ignored) makes writes past it fail with
EFBIG as a full disk fails them with ENOSPC, without root. It is set in the child only, so the
tiles are written first, unlimited, by a run stopped after its last tile.
"""

from __future__ import annotations

import resource
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import rasterio

from agriseg.config import build_run_config
from agriseg.survey import process_survey
from tests.conftest import toy_field, write_rgba

LIMIT = 40_000
"""Bytes per file: above every file a resumed run writes before its COGs, below the class
mask's COG (~120 KB for this survey)."""


def _limit_file_size(limit: int = LIMIT) -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a killed process
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def _stop_after_last_tile(done: int, total: int, pixels: int) -> None:
    if total and done == total:
        raise KeyboardInterrupt


def test_disk_full_while_finalising_the_class_mask(tmp_path: Path) -> None:
    rgb, valid = toy_field(1024, 1024, seed=3)
    src = write_rgba(tmp_path / "survey.tif", rgb, valid)
    out = tmp_path / "out"
    skip = ("quicklook", "zones", "fields", "report", "project")
    # Every tile segmented and recorded, nothing finalised (as if the disk filled just then).
    with pytest.raises(KeyboardInterrupt):
        process_survey(build_run_config(input=src, out=out, workers=1, indices=False,
                                        skip=skip), progress=_stop_after_last_tile)
    work = out / ".agriseg-work"
    assert (work / "classes.work.tif").stat().st_size < 4 * LIMIT  # limit sized as meant
    cmd = [sys.executable, "-m", "agriseg", "run", str(src), "--out", str(out), "--workers",
           "1", "--no-indices", "--skip", ",".join(skip), "--no-progress"]

    r = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=_limit_file_size,
                       timeout=120)
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"Error: {work / 'classes.tif'}: writing the COG failed"), r.stderr
    assert "disk is probably full" in last and "rerun the same command to resume" in last
    assert "Traceback" not in r.stderr
    # GDAL had left a cut-short classes.tif, renamed into place as if complete
    assert not (work / "classes.tif").exists() and not list(work.glob(".*partial*"))
    assert sorted(p.name for p in out.iterdir()) == [".agriseg-work"]

    # With space again the same command resumes from the saved tiles and finishes.
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "resuming: 1 tile(s) already done" in r.stderr
    with rasterio.open(out / "classes.tif") as ds:
        classes = ds.read(1)
        assert ds.overviews(1) == [2]
        ds.read(1, out_shape=(512, 512))  # the overview is whole too
    assert set(np.unique(classes)) <= {0, 1, 2, 3, 255} and (classes == 1).any()
    assert np.array_equal(classes == 255, ~valid)


def test_cut_short_cog_is_never_renamed_into_place(tmp_path: Path) -> None:
    """GDAL's COG copy returns without error when its writes fail; finalize_cog checks.

    Before, a confidence.tif cut short at the limit was renamed into place and the run
    finished, run.json and all, with an unreadable output.
    """
    from agriseg.output import overview_file

    src = tmp_path / "confidence.work.tif"
    rng = np.random.default_rng(0)
    profile = {"driver": "GTiff", "width": 1024, "height": 1024, "count": 1, "dtype": "uint8",
               "crs": "EPSG:32615", "transform": rasterio.Affine(0.02, 0, 5e5, 0, -0.02, 4.9e6),
               "nodata": 255, "tiled": True, "blockxsize": 512, "blockysize": 512}
    # Incompressible: the COG (full resolution and overview, ~1.3 MB) is larger than the
    # working file (1.05 MB) and its overview file, which are written unlimited, as the tiles
    # wrote them.
    with rasterio.open(src, "w", **profile) as ds:
        ds.write(rng.integers(0, 255, (1, 1024, 1024), dtype="uint8"))
    half = {**profile, "width": 512, "height": 512,
            "transform": profile["transform"] @ rasterio.Affine.scale(2)}
    with rasterio.open(overview_file(src), "w", **half) as ds:
        ds.write(rng.integers(0, 255, (1, 512, 512), dtype="uint8"))
    dst = tmp_path / "confidence.tif"
    code = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from agriseg.errors import OutputError
        from agriseg.output import OutputSpec, finalize_cog
        spec = OutputSpec("confidence", "uint8", 255, "AVERAGE", "noise")
        try:
            finalize_cog(Path({str(src)!r}), Path({str(dst)!r}), spec)
        except OutputError as exc:
            print(exc)
            sys.exit(2)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       preexec_fn=lambda: _limit_file_size(1_200_000), timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stdout.startswith(f"{dst}: writing the COG failed"), r.stdout
    assert not dst.exists() and not list(tmp_path.glob(".*partial*"))
    assert src.stat().st_size < 1_200_000  # only the COG passed the limit
