"""Working files and COG finalisation: the background tile writer, and overviews built on the
working file match what GDAL's COG driver makes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import rasterio
import rasterio.shutil
from affine import Affine
from rasterio.crs import CRS
from rasterio.windows import Window

from agriseg.errors import OutputError
from agriseg.grid import Grid, TilePlan, plan_tiles
from agriseg.output import (
    OutputSpec,
    TileWriter,
    cog_overview_factors,
    finalize_cog,
    halve,
)


def _working(path: Path, data: np.ndarray, nodata: float) -> Path:
    h, w = data.shape
    with rasterio.open(path, "w", driver="GTiff", width=w, height=h, count=1,
                       dtype=data.dtype, nodata=nodata, crs="EPSG:32615",
                       transform=Affine(0.02, 0, 5e5, 0, -0.02, 5e6), tiled=True,
                       blockxsize=256, blockysize=256, compress="packbits") as dst:
        dst.write(data, 1)
    return path


@pytest.mark.parametrize("shape", [(300, 260), (1024, 2048), (768, 1536)])
@pytest.mark.parametrize("resampling", ["NEAREST", "AVERAGE"])
def test_finalized_cog_equals_the_cog_drivers_own(
    tmp_path: Path, shape: tuple[int, int], resampling: str
) -> None:
    rng = np.random.default_rng(sum(shape))
    data = rng.integers(0, 100, shape).astype(np.uint8)
    data[: shape[0] // 3, : shape[1] // 4] = 255  # nodata, which AVERAGE must skip
    src = _working(tmp_path / "x.work.tif", data, 255)
    reference = tmp_path / "reference.tif"
    rasterio.shutil.copy(src, reference, driver="COG", COMPRESS="DEFLATE", BLOCKSIZE="512",
                         OVERVIEW_RESAMPLING=resampling)
    ours = finalize_cog(src, tmp_path / "ours.tif",
                        OutputSpec("x", "uint8", 255, resampling, "test"))
    with rasterio.open(reference) as a, rasterio.open(ours) as b:
        assert b.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        assert a.overviews(1) == b.overviews(1) == cog_overview_factors(shape[1], shape[0])
        np.testing.assert_array_equal(a.read(1), b.read(1))
        for level in range(len(a.overviews(1))):
            with rasterio.open(reference, overview_level=level) as oa, \
                    rasterio.open(ours, overview_level=level) as ob:
                np.testing.assert_array_equal(oa.read(1), ob.read(1))


@pytest.mark.parametrize("resampling", ["NEAREST", "AVERAGE"])
def test_odd_sizes_get_overviews_that_cover_the_whole_raster(
    tmp_path: Path, resampling: str
) -> None:
    """GDAL's overview builder rounds overview sizes up (the COG driver's own rounds down)."""
    h, w = 567, 1643
    data = np.full((h, w), 40, np.uint8)
    data[:, -1] = 90  # the last column, which rounded-down overview sizes would drop
    data[:100, :100] = 255
    ours = finalize_cog(_working(tmp_path / "x.work.tif", data, 255), tmp_path / "ours.tif",
                        OutputSpec("x", "uint8", 255, resampling, "test"))
    with rasterio.open(ours) as ds:
        assert ds.overviews(1) == [2, 4] == cog_overview_factors(w, h)
    for level, f in enumerate([2, 4]):
        with rasterio.open(ours, overview_level=level) as ov:
            o = ov.read(1)
        assert o.shape == (-(-h // f), -(-w // f))
        assert (o[: 100 // f, : 100 // f] == 255).all()  # nodata stays nodata
        assert (o[100 // f + 1 :, :-1] == 40).all()
        if resampling == "AVERAGE":  # the last column's pixels count in the edge pixel
            assert (o[:, -1] > 40).all()


@pytest.mark.parametrize(("w", "h", "factors"), [
    (512, 512, []), (513, 40, [2]), (1025, 40, [2]), (1642, 567, [2, 4]),
    (32768, 32768, [2, 4, 8, 16, 32, 64]),
])
def test_overview_factors_follow_the_cog_driver(w: int, h: int, factors: list[int]) -> None:
    assert cog_overview_factors(w, h) == factors


def test_sparse_cog_leaves_empty_blocks_out_and_reads_back_the_same(tmp_path: Path) -> None:
    data = np.zeros((1024, 1536), np.uint16)
    data[600:700, 900:1000] = 7  # one patch: every other 512 px block holds only nodata
    src = _working(tmp_path / "z.work.tif", data, 0)
    spec = OutputSpec("zone_ids", "uint16", 0, "NEAREST", "zone id")
    dense = finalize_cog(src, tmp_path / "dense.tif", spec)
    sparse = finalize_cog(_working(tmp_path / "z2.work.tif", data, 0), tmp_path / "sparse.tif",
                          spec, sparse=True)
    with rasterio.open(sparse) as ds:
        assert ds.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        np.testing.assert_array_equal(ds.read(1), data)
        assert ds.get_tag_item("BLOCK_OFFSET_0_0", "TIFF", bidx=1) in (None, "", "0")
    with rasterio.open(dense) as ds:
        assert ds.get_tag_item("BLOCK_OFFSET_0_0", "TIFF", bidx=1) not in (None, "", "0")


def _writer(tmp_path: Path) -> tuple[TileWriter, TilePlan]:
    grid = Grid((96, 160), Affine(0.02, 0, 5e5, 0, -0.02, 5e6), CRS.from_epsg(32615))
    plan = plan_tiles(grid, 32, 4)
    specs = [OutputSpec("classes", "uint8", 255, "NEAREST", "class"),
             OutputSpec("confidence", "uint8", 255, "NEAREST", "confidence")]
    return TileWriter(plan, specs, tmp_path), plan


def test_tile_writer_writes_every_tile_in_the_background_and_counts_classes(
    tmp_path: Path,
) -> None:
    writer, plan = _writer(tmp_path)
    expected = np.zeros((96, 160), np.uint8)
    for i, tile in enumerate(plan):
        h, w = int(tile.core.height), int(tile.core.width)
        classes = np.full((h, w), i % 5, np.uint8)
        expected[tile.core.toslices()] = classes
        # every other tile comes with the worker's own counts
        counts = np.bincount(classes.ravel(), minlength=256) if i % 2 else None
        writer.write(tile, {"classes": classes, "confidence": classes + 50}, counts)
        if i == len(plan) // 2:
            writer.sync()  # mid-run checkpoint: queued writes land before the files reopen
    writer.close()
    with rasterio.open(writer.path("classes")) as a, rasterio.open(writer.path("confidence")) as b:
        np.testing.assert_array_equal(a.read(1), expected)
        np.testing.assert_array_equal(b.read(1), expected + 50)
    assert writer.class_values is not None
    np.testing.assert_array_equal(writer.class_values, np.bincount(expected.ravel(), minlength=256))


def test_a_failed_background_write_is_reported_once_the_writes_are_done(tmp_path: Path) -> None:
    writer, plan = _writer(tmp_path)
    tile = next(iter(plan))
    outside = dataclasses.replace(tile, core=Window(500, 500, 32, 32))
    writer.write(outside, {"classes": np.zeros((32, 32), np.uint8)})
    with pytest.raises(OutputError, match="writing tile"):
        writer.sync()
    assert not writer._open  # the files were closed all the same
    # The run's error path syncs once more before recording the tiles since the last sync;
    # with the failed write no longer queued that sync passed, and a resumed run left the
    # failed tile empty.
    with pytest.raises(OutputError, match="failed earlier"):
        writer.sync()
    writer.close()


@pytest.mark.parametrize("shape", [(512, 768), (301, 259)])
def test_first_overview_level_is_exact_2x2_cells(shape: tuple[int, int]) -> None:
    """halve() equals GDAL's own first level where the sizes are even; on odd sizes every
    output pixel is still the mean of (or the first pixel in) its own 2 x 2 cell."""
    from rasterio.enums import Resampling

    from agriseg.output import halve

    rng = np.random.default_rng(0)
    ints = rng.integers(0, 101, shape).astype(np.uint8)
    ints[: shape[0] // 3, : shape[1] // 4] = 255
    floats = rng.random(shape, dtype=np.float32)
    floats[ints == 255] = np.nan
    h2, w2 = -(-shape[0] // 2), -(-shape[1] // 2)
    for data, nodata in ((ints, 255.0), (floats, float("nan"))):
        for resampling in ("NEAREST", "AVERAGE"):
            got = halve(data, nodata, resampling)
            assert got.shape == (h2, w2) and got.dtype == data.dtype
            if shape[0] % 2 == 0 and shape[1] % 2 == 0:
                mem = rasterio.MemoryFile()
                with mem.open(driver="GTiff", width=shape[1], height=shape[0], count=1,
                              dtype=data.dtype, nodata=nodata, crs="EPSG:32615",
                              transform=Affine(0.02, 0, 5e5, 0, -0.02, 5e6)) as ds:
                    ds.write(data, 1)
                    ds.build_overviews([2], Resampling[resampling.lower()])
                with mem.open(overview_level=0) as ov:
                    if data.dtype.kind == "f":  # float32 sums, not GDAL's float64 ones
                        np.testing.assert_allclose(got, ov.read(1), rtol=1e-6)
                        full = np.nan_to_num(data, nan=0.5)
                        np.testing.assert_allclose(halve(full, nodata, resampling),
                                                   halve(full.astype(np.float64), nodata,
                                                         resampling), rtol=1e-6)
                    else:
                        np.testing.assert_array_equal(got, ov.read(1))
            else:
                # The ragged last cell of an odd raster is its one pixel.
                assert got[-1, -1] == data[-1, -1] or np.isnan(got[-1, -1])


@pytest.mark.parametrize("resume", [False, True])
def test_tile_writer_makes_the_first_overview_level(tmp_path: Path, resume: bool) -> None:
    """The working files get a .ovr with the first level as the tiles arrive; the finished
    COG has every level, and equals the COG driver's own (even sizes), also when a run is
    resumed halfway."""
    grid = Grid((1280, 1536), Affine(0.02, 0, 5e5, 0, -0.02, 5e6), CRS.from_epsg(32615))
    plan = plan_tiles(grid, 256, 8)
    specs = [OutputSpec("classes", "uint8", 255, "NEAREST", "class"),
             OutputSpec("confidence", "uint8", 255, "AVERAGE", "confidence")]
    rng = np.random.default_rng(1)
    full = {s.name: rng.integers(0, 101, (1280, 1536)).astype(np.uint8) for s in specs}
    full["confidence"][:300, :200] = 255
    writer = TileWriter(plan, specs, tmp_path)
    tiles = list(plan)
    assert set(writer.halving) == {"classes", "confidence"}
    for i, tile in enumerate(tiles):
        cores = {n: a[tile.core.toslices()] for n, a in full.items()}
        # Every other tile comes with its first level made by the caller (as tile tasks do).
        halves = {n: halve(cores[n], *how) for n, how in writer.halving.items()} if i % 2 else None
        writer.write(tile, cores, halves=halves)
        if resume and i == len(tiles) // 2:
            writer.sync()
            writer.close()
            writer = TileWriter(plan, specs, tmp_path, resume=True)
    writer.close()
    for spec in specs:
        src = writer.path(spec.name)
        assert src.with_name(src.name + ".ovr").exists()
        reference = tmp_path / f"{spec.name}.reference.tif"
        rasterio.shutil.copy(_working(tmp_path / f"{spec.name}.plain.tif", full[spec.name],
                                      255), reference, driver="COG", COMPRESS="DEFLATE",
                             BLOCKSIZE="512", OVERVIEW_RESAMPLING=spec.resampling)
        ours = finalize_cog(src, tmp_path / f"{spec.name}.tif", spec)
        with rasterio.open(reference) as a, rasterio.open(ours) as b:
            assert b.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
            assert b.overviews(1) == a.overviews(1) == cog_overview_factors(1536, 1280)
            np.testing.assert_array_equal(a.read(1), b.read(1))
        for level in range(2):
            with rasterio.open(reference, overview_level=level) as oa, \
                    rasterio.open(ours, overview_level=level) as ob:
                np.testing.assert_array_equal(oa.read(1), ob.read(1))
