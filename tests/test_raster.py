"""Raster reading: decimated whole-raster reads (one decode pass) and band-role detection."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.enums import ColorInterp
from rasterio.windows import Window

import agriseg.bands as band_roles
import agriseg.raster as raster
from agriseg.errors import BandError
from agriseg.raster import open_survey, read_overview
from agriseg.rasterfile import no_georef_warning
from tests.conftest import SAMPLES, write_rgba


@pytest.mark.parametrize("budget", [raster.SAMPLED_READ_BYTES, 4 * 16 * 64])
def test_sampled_read_matches_full_read(tmp_path: Path, budget: int,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (3, 333, 517), dtype=np.uint8)
    path = write_rgba(tmp_path / "r.tif", rgb, block=16)
    monkeypatch.setattr(raster, "SAMPLED_READ_BYTES", budget)  # forces column windows too
    got = raster._sampled_read(str(path), [1, 3, 4], (41, 70))
    with rasterio.open(path) as ds:
        full = ds.read([1, 3, 4])
    rows = np.minimum(((np.arange(41) + 0.5) * 333 / 41).astype(int), 332)
    cols = np.minimum(((np.arange(70) + 0.5) * 517 / 70).astype(int), 516)
    assert np.array_equal(got, full[:, rows][:, :, cols])


def test_overview_is_read_once_and_reduced(tmp_path: Path) -> None:
    rgb = np.zeros((3, 300, 400), np.uint8)
    rgb[1, :, 200:] = 200
    valid = np.ones((300, 400), bool)
    valid[:, :40] = False
    survey = open_survey(write_rgba(tmp_path / "r.tif", rgb, valid, block=16))
    big, big_valid, f_big = read_overview(survey, ("green",), 200)
    small, small_valid, f_small = read_overview(survey, ("red", "green"), 50)
    assert big.shape == (1, 150, 200) and f_big == pytest.approx(2.0)
    assert small.shape == (2, 38, 50) and f_small == pytest.approx(8.0)
    # Any valid pixel keeps a cell valid; values average valid pixels only.
    assert small_valid[:, 5:].all() and not small_valid[:, :2].any()
    assert small[1, :, -1] == pytest.approx(200 / 255)
    assert big_valid[:, 20:].all() and not big_valid[:, :20].any()


def _reflectance(path: Path, means: list[float], tags: list[ColorInterp]) -> Path:
    """A float32 reflectance raster in UTM 15N whose band ``i`` scatters around ``means[i]``."""
    rng = np.random.default_rng(1)
    data = np.stack([m + 0.01 * rng.random((60, 80)) for m in means]).astype(np.float32)
    data[:, :5, :5] = -10000  # nodata corner, left out of the medians
    with rasterio.open(path, "w", driver="GTiff", width=80, height=60, count=len(means),
                       dtype="float32", crs="EPSG:32615", nodata=-10000,
                       transform=Affine(0.03, 0, 720000, 0, -0.03, 4300000)) as dst:
        dst.write(data)
        dst.colorinterp = tags
    return path


RGB_TAGS = [ColorInterp.red, ColorInterp.green, ColorInterp.blue, ColorInterp.undefined,
            ColorInterp.undefined]


def test_five_band_camera_order_is_checked_against_reflectance(tmp_path: Path) -> None:
    # Stored B,G,R,RE,NIR but tagged R,G,B (the Danforth sample's export): blue is darkest,
    # NIR brightest, whatever the tags say.
    path = _reflectance(tmp_path / "bgr.tif", [0.03, 0.08, 0.06, 0.10, 0.30], RGB_TAGS)
    survey = open_survey(path)
    assert survey.roles.as_dict() == {"red": 3, "green": 2, "blue": 1, "nir": 5, "rededge": 4}


def test_consistent_five_band_tags_are_kept(tmp_path: Path) -> None:
    # R,G,B,NIR,RE (MicaSense RedEdge order after R/B tags): nothing to swap, NIR is band 4.
    path = _reflectance(tmp_path / "rgb.tif", [0.06, 0.08, 0.03, 0.30, 0.10], RGB_TAGS)
    survey = open_survey(path)
    assert survey.roles.as_dict() == {"red": 1, "green": 2, "blue": 3, "nir": 4, "rededge": 5}


UNTAGGED = [ColorInterp.gray] + [ColorInterp.undefined] * 4


def test_untagged_five_bands_follow_reflectance(tmp_path: Path) -> None:
    # A MicaSense RedEdge export (B,G,R,NIR,RE) without any tags: not R,G,B,NIR + a spare.
    path = _reflectance(tmp_path / "micasense.tif", [0.03, 0.08, 0.06, 0.30, 0.10], UNTAGGED)
    survey = open_survey(path)
    assert survey.roles.as_dict() == {"red": 3, "green": 2, "blue": 1, "nir": 4, "rededge": 5}
    assert survey.to_dict()["roles_from"].startswith("band order convention for 5 bands")


def test_untagged_eight_bit_five_bands_name_the_unused_band(tmp_path: Path) -> None:
    """An 8-bit stack of five untagged bands (WeedMap's R,G,B,NIR,RE PNGs, one file a band)
    is read R,G,B,NIR by convention; its fifth band was dropped without a word."""
    rng = np.random.default_rng(2)
    data = rng.integers(20, 200, (5, 60, 80)).astype(np.uint8)
    path = tmp_path / "stack.tif"
    grid = {"crs": "EPSG:32615", "transform": Affine(0.01, 0, 720000, 0, -0.01, 4300000)}
    with rasterio.open(path, "w", driver="GTiff", width=80, height=60, count=5, dtype="uint8",
                       **grid) as dst:
        dst.write(data)
        dst.colorinterp = UNTAGGED
    survey = open_survey(path)
    assert survey.roles.as_dict() == {"red": 1, "green": 2, "blue": 3, "nir": 4}
    (note,) = survey.warnings
    assert "band 5 is not used" in note and "--bands" in note


@pytest.mark.parametrize(("descriptions", "roles"), [
    # MicaSense Dual / Metashape style: names with wavelengths, in B,G,R,RE,NIR order
    (["Blue-444", "Green-531", "Red-650", "Red edge-717", "NIR-842"],
     {"blue": 1, "green": 2, "red": 3, "rededge": 4, "nir": 5}),
    (["Band 1 (475 nm)", "Band 2 (560 nm)", "Band 3 (668 nm)", "Band 4 (717 nm)",
      "Band 5 (842 nm)"], {"blue": 1, "green": 2, "red": 3, "rededge": 4, "nir": 5}),
    # Sentinel-2 names: the coastal band B1 is no blue, B8A no red edge
    (["B1", "B2", "B3", "B4", "B8A"], {"blue": 2, "green": 3, "red": 4, "nir": 5}),
    (["Coastal 443", "Blue", "Green", "Red", "NIR"],
     {"blue": 2, "green": 3, "red": 4, "nir": 5}),
    # Names with band codes, as converters and QGIS users write them
    (["Blue (B2)", "Green (B3)", "Red (B4)", "Red edge (B5)", "NIR (B8)"],
     {"blue": 1, "green": 2, "red": 3, "rededge": 4, "nir": 5}),
    (["B02 - Blue", "B03 - Green", "B04 - Red", "B05 - Red edge", "B08 - NIR"],
     {"blue": 1, "green": 2, "red": 3, "rededge": 4, "nir": 5}),
    (["rgb_blue", "rgb_green", "rgb_red", "SR_B4", "nir"],
     {"blue": 1, "green": 2, "red": 3, "nir": 5}),
])
def test_band_descriptions_with_wavelengths(tmp_path: Path, descriptions: list[str],
                                            roles: dict[str, int]) -> None:
    path = _reflectance(tmp_path / "ms.tif", [0.03, 0.08, 0.06, 0.10, 0.30], UNTAGGED)
    with rasterio.open(path, "r+") as ds:
        for i, d in enumerate(descriptions, start=1):
            ds.set_band_description(i, d)
    survey = open_survey(path)
    assert survey.roles.as_dict() == roles
    assert survey.to_dict()["roles_from"] == "band descriptions"


@pytest.mark.parametrize(("means", "doubt"), [
    ([0.06, 0.08, 0.03, 0.30], None),  # R,G,B,NIR: the convention fits
    ([0.03, 0.08, 0.06, 0.30], "band 3 (taken as blue) is brighter"),  # PlanetScope B,G,R,NIR
    ([0.08, 0.06, 0.10, 0.30], "band 3 (taken as blue) is brighter"),  # Sequoia G,R,RE,NIR
    ([0.06, 0.30, 0.03, 0.08], "band 4 (taken as NIR) is darker"),  # R,NIR,B,G, say
])
def test_untagged_four_bands_are_checked_not_reordered(
    tmp_path: Path, means: list[float], doubt: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    path = _reflectance(tmp_path / "four.tif", means, UNTAGGED[:4])
    with caplog.at_level("WARNING", logger="agriseg.raster"):
        survey = open_survey(path)
    assert survey.roles.as_dict() == {"red": 1, "green": 2, "blue": 3, "nir": 4}
    how = survey.to_dict()["roles_from"]
    if doubt is None:
        assert "doubtful" not in how and not caplog.records
    else:
        assert doubt in how and doubt in caplog.text and "--bands" in caplog.text


def test_untagged_sentinel2_stack_gets_the_sentinel2_hint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """B1..B12 without descriptions: the hint named drone cameras' five-band layouts."""
    means = [0.08, 0.05, 0.07, 0.05, 0.10, 0.25, 0.30, 0.32, 0.33, 0.10, 0.20, 0.12]
    path = _reflectance(tmp_path / "s2.tif", means,
                        [ColorInterp.gray] + [ColorInterp.undefined] * 11)
    with caplog.at_level("WARNING", logger="agriseg.raster"):
        open_survey(path)
    assert "--bands blue=2,green=3,red=4,rededge=5,nir=8 (Sentinel-2" in caplog.text


def test_unused_bands_of_a_long_untagged_stack_are_named(tmp_path: Path) -> None:
    """A two-date R,G,B,NIR stack (8 bands) ran on its first date alone, silently."""
    means = [0.06, 0.08, 0.03, 0.30] * 2
    path = _reflectance(tmp_path / "two_dates.tif", means,
                        [ColorInterp.gray] + [ColorInterp.undefined] * 7)
    survey = open_survey(path)
    assert survey.roles.as_dict() == {"red": 1, "green": 2, "blue": 3, "nir": 4}
    assert any("bands 5, 6, 7, 8 are not used" in w for w in survey.warnings)
    # tagged R,G,B with spare bands too (the colour-interpretation path)
    tagged = _reflectance(tmp_path / "tagged.tif", means, [ColorInterp.red, ColorInterp.green,
                          ColorInterp.blue] + [ColorInterp.undefined] * 5)
    assert any("are not used" in w for w in open_survey(tagged).warnings)


@pytest.mark.parametrize(("dtype", "fill", "declared", "source"), [
    ("float32", -10000, -9999, "fill"),  # a reflectance export's fill, another declared
    ("uint16", 0, 65535, "black"),
])
def test_a_declared_nodata_no_pixel_holds_gives_way_to_the_edge_fill(
    tmp_path: Path, dtype: str, fill: float, declared: float, source: str
) -> None:
    """Declared -9999, filled -10000: the fill read as soil, and every real pixel of the
    Danforth sample became crop."""
    rng = np.random.default_rng(3)
    data = (rng.random((4, 100, 100)) * 0.3 + 0.05) * (10000 if dtype == "uint16" else 1)
    yy, xx = np.mgrid[0:100, 0:100]
    data[:, (xx + yy) < 60] = fill
    path = tmp_path / "wrong_nodata.tif"
    with rasterio.open(path, "w", driver="GTiff", width=100, height=100, count=4, dtype=dtype,
                       crs="EPSG:32615", nodata=declared,
                       transform=Affine(0.03, 0, 720000, 0, -0.03, 4300000)) as dst:
        dst.write(data.astype(dtype))
    s = open_survey(path)
    assert s.mask_source == source
    assert any(f"declares nodata {declared:g}" in w for w in s.warnings)
    _, valid = raster.read_window(s, s.roles.spectral, Window(0, 0, 100, 100))
    assert (valid == ((xx + yy) >= 60)).all()


def test_undeclared_fill_is_left_out_of_the_band_order_check(tmp_path: Path) -> None:
    """A camera export (B,G,R,NIR,RE, uint16) whose black fill, declared nowhere, covers most
    of the raster: the medians that order the bands are of the image, not of the fill."""
    rng = np.random.default_rng(2)
    means = [0.03, 0.08, 0.06, 0.30, 0.10]
    data = np.stack([m + 0.01 * rng.random((100, 100)) for m in means]) * 32768
    yy, xx = np.mgrid[0:100, 0:100]
    data[:, (xx + yy) < 130] = 0  # 66 % fill
    path = tmp_path / "fill.tif"
    with rasterio.open(path, "w", driver="GTiff", width=100, height=100, count=5,
                       dtype="uint16", crs="EPSG:32615",
                       transform=Affine(0.03, 0, 720000, 0, -0.03, 4300000)) as dst:
        dst.write(data.astype(np.uint16))
        dst.colorinterp = UNTAGGED
    survey = open_survey(path)
    assert survey.mask_source == "black"
    assert survey.roles.as_dict() == {"red": 3, "green": 2, "blue": 1, "nir": 4, "rededge": 5}


def test_doubtful_band_order_reaches_the_run_warnings(tmp_path: Path) -> None:
    path = _reflectance(tmp_path / "five.tif", [0.03, 0.08, 0.06, 0.10, 0.30, 0.2],
                        [*UNTAGGED, ColorInterp.undefined])
    survey = open_survey(path)
    assert "doubtful" in survey.roles_from
    assert len(survey.warnings) == 1 and "--bands blue=1,green=2,red=3,rededge=4,nir=5" in \
        survey.warnings[0]


def _sentinel2(path: Path, offset: int = 1000, **tags: str) -> tuple[Path, np.ndarray]:
    """B2,B3,B4,B8 in uint16 as reflectance x 10000 + ``offset``; returns the reflectance."""
    rng = np.random.default_rng(3)
    refl = np.stack([m + 0.02 * rng.random((64, 64)) for m in (0.03, 0.06, 0.04, 0.35)])
    with rasterio.open(path, "w", driver="GTiff", width=64, height=64, count=4,
                       dtype="uint16", crs="EPSG:32633", nodata=0,
                       transform=Affine(10, 0, 600000, 0, -10, 5300000)) as dst:
        dst.write(np.rint(refl * 10000 + offset).astype(np.uint16))
        for i, d in enumerate(("B02", "B03", "B04", "B08"), start=1):
            dst.set_band_description(i, d)
        if tags:
            dst.update_tags(**tags)
    return path, refl.astype(np.float32)


@pytest.mark.parametrize("how", ["declared", "tags", "none", "baseline 03", "harmonised"])
def test_sentinel2_offset_is_applied_when_the_file_says_so(tmp_path: Path, how: str) -> None:
    """Sentinel-2 L2A since processing baseline 04.00: reflectance = (value - 1000) / 10000.
    Data harmonised to the old baseline keep the tags but not the offset."""
    tags = {"BOA_ADD_OFFSET_B04": "-1000", "BOA_QUANTIFICATION_VALUE": "10000"}
    path, refl = _sentinel2(tmp_path / "s2.tif",
                            0 if how in ("baseline 03", "harmonised") else 1000,
                            **(tags if how in ("tags", "harmonised") else {}))
    if how == "declared":
        with rasterio.open(path, "r+") as ds:
            ds.scales, ds.offsets = (0.0001,) * 4, (-0.1,) * 4
    survey = open_survey(path)
    got, valid = raster.read_window(survey, ("red", "nir"), Window(0, 0, 64, 64))
    assert valid.all()
    if how == "none":  # nothing says so: read as value / 10000, with a warning that says how
        assert survey.offset == 0 and len(survey.warnings) == 1
        assert "gdal_edit.py -scale 0.0001 -offset -0.1" in survey.warnings[0]
        np.testing.assert_allclose(got, refl[[2, 3]] + 0.1, atol=1e-4)
    else:
        assert not survey.warnings
        assert survey.offset == pytest.approx(
            0 if how in ("baseline 03", "harmonised") else -0.1)
        np.testing.assert_allclose(got, refl[[2, 3]], atol=1e-4)


def _rgb(path: Path, rgb: np.ndarray, **extra: object) -> Path:
    """A 3-band GeoTIFF in UTM 15N of ``rgb`` (its dtype), no alpha, no nodata unless given."""
    _, h, w = rgb.shape
    with rasterio.open(path, "w", driver="GTiff", width=w, height=h, count=3, dtype=rgb.dtype,
                       crs="EPSG:32615", transform=Affine(0.02, 0, 5e5, 0, -0.02, 5e6),
                       **extra) as dst:
        dst.write(rgb)
    return path


def test_undeclared_black_fill_is_nodata(tmp_path: Path) -> None:
    """An RGB orthomosaic without alpha or nodata: its black fill along the edges is nodata."""
    rgb = np.full((3, 200, 200), 120, np.uint8)
    yy, xx = np.mgrid[0:200, 0:200]
    fill = (xx + yy) < 60
    rgb[:, fill] = 0
    rgb[2, 50:60, 50:60] = 0  # yellow leaves: blue 0 alone is data
    s = open_survey(_rgb(tmp_path / "fill.tif", rgb))
    assert s.mask_source == "black"
    _, valid = raster.read_window(s, s.roles.spectral, Window(0, 0, 200, 200))
    assert (valid == ~fill).all()
    # a few black pixels inside are not fill; a declared nodata keeps its own rule
    inside = np.full((3, 200, 200), 120, np.uint8)
    inside[:, 90:110, 90:110] = 0
    assert open_survey(_rgb(tmp_path / "inside.tif", inside)).mask_source == "none"
    assert open_survey(_rgb(tmp_path / "declared.tif", rgb, nodata=0)).mask_source == "gdal"


def test_jpeg_black_fill_warns_of_its_smeared_edge(tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    rgb = np.full((3, 256, 256), 120, np.uint8)
    yy, xx = np.mgrid[0:256, 0:256]
    rgb[:, (xx + yy) < 80] = 0
    path = _rgb(tmp_path / "jpeg.tif", rgb, compress="JPEG", tiled=True, blockxsize=128,
                blockysize=128)
    with caplog.at_level("WARNING", logger="agriseg.raster"):
        survey = open_survey(path)
    assert survey.mask_source == "black"
    assert "JPEG-compressed" in caplog.text and "nearblack -setalpha" in caplog.text
    # and in the warnings that reach run.json and the report (it was only logged)
    assert any("JPEG-compressed" in w and "nearblack -setalpha" in w for w in survey.warnings)


def test_unflagged_validity_band_is_alpha_not_nir(tmp_path: Path) -> None:
    """Drone RGB + a fourth 0/255 band without the alpha flag: a validity mask, not NIR."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(40, 200, (3, 200, 200), dtype=np.uint8)
    yy, xx = np.mgrid[0:200, 0:200]
    valid = (xx + yy) >= 60
    band4 = np.where(valid, 255, 0).astype(np.uint8)[None]
    path = _rgb(tmp_path / "rgbv.tif", rgb)
    with rasterio.open(path) as src:
        profile = {**src.profile, "count": 4, "photometric": "MINISBLACK"}
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(np.concatenate([rgb, band4]))
    with rasterio.open(path) as ds:
        assert ColorInterp.alpha not in ds.colorinterp  # nothing flags band 4
    s = open_survey(path)
    assert s.roles.as_dict() == {"red": 1, "green": 2, "blue": 3, "alpha": 4}
    assert s.mask_source == "alpha"
    _, got = raster.read_window(s, s.roles.spectral, Window(0, 0, 200, 200))
    assert (got == valid).all()
    # The same mask in a 16-bit copy (x257: 0/65535), and resampled (a graded edge).
    graded = band4.astype(np.uint16)[0] * 257
    graded[(xx + yy == 60)] = 32896
    with rasterio.open(path, "w", **{**profile, "dtype": "uint16"}) as dst:
        dst.write(np.concatenate([rgb.astype(np.uint16) * 257, graded[None]]))
    assert open_survey(path).roles.as_dict() == {"red": 1, "green": 2, "blue": 3, "alpha": 4}


@pytest.mark.parametrize(("graded", "warned"), [(True, True), (False, False)])
def test_alpha_band_holding_data_is_doubted(tmp_path: Path, graded: bool, warned: bool) -> None:
    """An RGB+NIR tile saved as an RGBA PNG: GDAL tags NIR alpha, and it masked the image."""
    rng = np.random.default_rng(1)
    rgba = rng.integers(1, 255, (4, 128, 128), dtype=np.uint8)
    if not graded:  # a real alpha: opaque, a transparent corner, a feathered pixel or two
        rgba[3] = 255
        rgba[3, :20, :20] = 0
        rgba[3, 20, :3] = 128
    path = tmp_path / "tile.png"
    with no_georef_warning():
        with rasterio.open(path, "w", driver="PNG", width=128, height=128, count=4,
                           dtype="uint8") as dst:
            dst.write(rgba)
        with rasterio.open(path) as ds:
            assert ds.colorinterp[3] == ColorInterp.alpha
    s = open_survey(raster.image_vrt(path, tmp_path / "image.vrt", 0.01))
    doubts = [w for w in s.warnings if "tagged alpha" in w]
    assert bool(doubts) == warned
    if not warned:  # the same 0/255 alpha in a 16-bit survey: no doubt either
        wide = tmp_path / "wide.tif"
        with rasterio.open(wide, "w", driver="GTiff", width=128, height=128, count=4,
                           dtype="uint16", photometric="RGB", alpha="YES", crs="EPSG:32615",
                           transform=Affine(0.02, 0, 5e5, 0, -0.02, 49e5)) as dst:
            dst.write(np.concatenate([rgba[:3].astype(np.uint16) * 200,
                                      np.where(rgba[3:] > 0, 255, 0).astype(np.uint16)]))
        assert not [w for w in open_survey(wide).warnings if "tagged alpha" in w]
    if warned:
        assert "--bands red=1,green=2,blue=3,nir=4" in doubts[0]


def test_image_vrt_places_an_unreferenced_image(tmp_path: Path) -> None:
    """--gsd: the image on a metric image plane; rewritten only when it changes (resume)."""
    import os

    from PIL import Image

    from agriseg.grid import on_earth

    png = tmp_path / "tile.png"
    Image.fromarray(np.full((30, 40, 3), 90, np.uint8)).save(png)
    vrt = raster.image_vrt(png, tmp_path / "image.vrt", 0.01)
    s = open_survey(vrt)
    assert s.grid.shape_yx == (30, 40) and s.grid.gsd_m == pytest.approx(0.01)
    assert not on_earth(s.grid.crs)
    os.utime(vrt, (1, 1))
    raster.image_vrt(png, tmp_path / "image.vrt", 0.01)
    assert os.stat(vrt).st_mtime == 1  # same content: not rewritten
    raster.image_vrt(png, tmp_path / "image.vrt", 0.02)
    assert os.stat(vrt).st_mtime != 1
    with pytest.raises(raster.RasterError, match="drop it"):
        raster.image_vrt(_rgb(tmp_path / "geo.tif", np.full((3, 20, 20), 9, np.uint8)),
                         tmp_path / "x.vrt", 0.01)


def test_undeclared_zero_fill_in_float_reflectance(tmp_path: Path) -> None:
    refl = np.full((3, 120, 120), 0.2, np.float32)
    refl[:, :, :20] = 0.0  # a strip of fill along the left edge
    s = open_survey(_rgb(tmp_path / "refl.tif", refl), "red=1,green=2,blue=3")
    assert s.mask_source == "black"
    _, valid = raster.read_window(s, s.roles.spectral, Window(0, 0, 120, 120))
    assert not valid[:, :20].any() and valid[:, 20:].all()


@pytest.mark.parametrize(("dtype", "fill"), [("float32", -10000.0), ("int16", -32768.0)])
def test_undeclared_negative_fill_is_nodata(tmp_path: Path, dtype: str, fill: float) -> None:
    """Reflectance exports fill outside the flight with -10000 (int16 DNs: -32768)."""
    refl = np.full((3, 120, 120), 0.2 if dtype == "float32" else 2000, dtype)
    refl[:, :, :20] = fill
    refl[0, 60, 60] = fill  # one band at the fill value: invalid, as with a declared nodata
    s = open_survey(_rgb(tmp_path / "refl.tif", refl), "red=1,green=2,blue=3")
    assert (s.mask_source, s.nodata) == ("fill", fill)
    _, valid = raster.read_window(s, s.roles.spectral, Window(0, 0, 120, 120))
    assert not valid[:, :20].any() and valid[:, 20:].sum() == 120 * 100 - 1
    inside = np.full((3, 120, 120), 0.2, np.float32)
    inside[:, 50:60, 50:60] = -10000.0  # not along the edges: left alone
    assert open_survey(_rgb(tmp_path / "inside.tif", inside),
                       "red=1,green=2,blue=3").mask_source == "none"


def test_single_band_product_is_refused_with_what_to_run(tmp_path: Path) -> None:
    ndvi = _reflectance(tmp_path / "ndvi.tif", [0.4], [ColorInterp.gray])
    with pytest.raises(BandError, match=r"single-band product .* orthomosaic"):
        open_survey(ndvi)


def test_descriptions_without_green_and_tagged_alpha(tmp_path: Path) -> None:
    """Red, red edge and NIR named in the descriptions are taken as named (the R,G,B,NIR
    convention made NIR the blue band and the alpha band NIR), and a band tagged alpha is
    never given a spectral role."""
    rgb, valid = np.full((3, 64, 64), 80, np.uint8), np.ones((64, 64), bool)
    valid[:, :8] = False
    path = write_rgba(tmp_path / "rrn.tif", rgb, valid)
    with rasterio.open(path, "r+") as ds:
        ds.colorinterp = [ColorInterp.undefined] * 3 + [ColorInterp.alpha]
        for i, name in enumerate(["Red", "RedEdge", "NIR", ""], start=1):
            ds.set_band_description(i, name)
    survey = open_survey(path)
    assert survey.roles.as_dict() == {"red": 1, "rededge": 2, "nir": 3, "alpha": 4}
    assert survey.mask_source == "alpha"
    with rasterio.open(path, "r+") as ds:  # untagged but alpha: the convention skips it
        for i in range(1, 4):
            ds.set_band_description(i, "")
    rgba = open_survey(path)
    assert rgba.roles.as_dict() == {"red": 1, "green": 2, "blue": 3, "alpha": 4}
    with pytest.raises(BandError, match="no band left for nir"):  # not "--bands ...,nir=4"
        rgba.require(("red", "green", "blue", "nir"))
    given = open_survey(path, "red=1,nir=2")  # --bands without the alpha band: still alpha
    with pytest.raises(BandError, match="no band left for green, blue"):
        given.require(("red", "green", "blue", "nir"))
    two = tmp_path / "rn.tif"
    with rasterio.open(path) as src:
        profile = {**src.profile, "count": 2, "nodata": 0}
        profile.pop("photometric", None)
        with rasterio.open(two, "w", **profile) as dst:
            dst.write(src.read([1, 3]))
            dst.set_band_description(1, "Red")
            dst.set_band_description(2, "NIR")
    assert open_survey(two).roles.as_dict() == {"red": 1, "nir": 2}  # was "no descriptions"
    # without a declared nodata, their black fill along the edges is nodata as with 3 bands
    bare = tmp_path / "rn_bare.tif"
    with rasterio.open(two) as src:
        profile, data, names = {**src.profile, "nodata": None}, src.read(), src.descriptions
    data[:, :, :8] = 0  # the fill
    with rasterio.open(bare, "w", **profile) as dst:
        dst.write(data)
        dst.descriptions = names
    assert open_survey(bare).mask_source == "black"


def test_eight_bit_values_in_sixteen_bits_scale_by_255(tmp_path: Path) -> None:
    """A 16-bit export of an 8-bit mosaic was read as reflectance x 10000 (0..0.0255)."""
    rgb = np.random.default_rng(0).integers(20, 256, (3, 64, 64)).astype(np.uint16)
    assert open_survey(_rgb(tmp_path / "u16.tif", rgb)).scale == pytest.approx(1 / 255)
    assert open_survey(_rgb(tmp_path / "refl.tif", rgb * 20)).scale == pytest.approx(1e-4)


def test_dot_dot_after_a_link_is_followed_like_the_system(tmp_path: Path) -> None:
    """``link/../x.tif`` named another file than the one the system opens."""
    (tmp_path / "real" / "data").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "real" / "data")
    (tmp_path / "real" / "x.tif").write_bytes(b"")
    assert raster.absolute_path(tmp_path / "link" / ".." / "x.tif") == str(
        (tmp_path / "real" / "x.tif").resolve())
    assert raster.absolute_path(tmp_path / "link") == str(tmp_path / "link")  # links kept


def test_a_corrupt_block_is_named_in_pixels(tmp_path: Path) -> None:
    """GDAL names a bad block by its column and row among blocks, which read as pixels."""
    rng = np.random.default_rng(0)
    path = _rgb(tmp_path / "cut.tif", rng.integers(0, 255, (3, 256, 256), dtype=np.uint8),
                compress="DEFLATE", tiled=True, blockxsize=64, blockysize=64)
    s = open_survey(path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.6)])
    raster.clear_tile_cache()
    with pytest.raises(raster.RasterError) as err:
        raster.read_window(s, s.roles.spectral, Window(0, 0, 256, 256))
    msg = str(err.value)
    assert "cannot read pixels" in msg and "gdalinfo -checksum" in msg
    assert "the bad block is the file's block" in msg and "rows 128..192" in msg
    # Through a VRT the failed block is its source's: no pixel window of the VRT is made up.
    vrt = tmp_path / "mosaic.vrt"
    vrt.write_text(f"""<VRTDataset rasterXSize="256" rasterYSize="256">
  <SRS>EPSG:32615</SRS><GeoTransform>500000, 0.02, 0, 4900000, 0, -0.02</GeoTransform>
  {''.join(f'<VRTRasterBand dataType="Byte" band="{b}"><SimpleSource><SourceFilename '
           f'relativeToVRT="1">cut.tif</SourceFilename><SourceBand>{b}</SourceBand>'
           '</SimpleSource></VRTRasterBand>' for b in (1, 2, 3))}
</VRTDataset>""")
    raster.clear_tile_cache()
    with pytest.raises(raster.RasterError) as err:  # opening reads a sample already
        v = open_survey(vrt)
        raster.read_window(v, v.roles.spectral, Window(0, 0, 256, 256))
    assert "cut.tif" in str(err.value) and "the bad block" not in str(err.value)
    assert raster._bad_block(str(vrt), "cut.tif, band 1: IReadBlock failed at X offset 1, "
                             "Y offset 2") == ""



@pytest.mark.parametrize("dtype", ["uint8", "uint16"])
def test_alpha_validity_through_the_block_cache(tmp_path: Path, dtype: str) -> None:
    # The cache keeps a block's bands and its alpha as views of one read; validity is the
    # alpha's nonzero pixels, as a direct read of the window says.
    from agriseg.grid import plan_tiles

    rng = np.random.default_rng(3)
    h, w = 300, 260
    top = np.iinfo(dtype).max
    rgb = rng.integers(1, top, (3, h, w)).astype(dtype)
    alpha = np.where(rng.random((h, w)) > 0.3, top, 0).astype(dtype)
    alpha[:40] = 0
    profile = {"driver": "GTiff", "width": w, "height": h, "count": 4, "dtype": dtype,
               "crs": "EPSG:32615", "transform": Affine(0.02, 0, 500000.0, 0, -0.02, 4900000.0),
               "tiled": True, "blockxsize": 64, "blockysize": 64, "compress": "deflate"}
    path = tmp_path / f"rgba_{dtype}.tif"
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(np.concatenate([rgb, alpha[None]]))
        dst.colorinterp = [ColorInterp.red, ColorInterp.green, ColorInterp.blue,
                           ColorInterp.alpha]
    survey = open_survey(str(path))
    assert survey.mask_source == "alpha"
    raster.clear_tile_cache()
    roles = ("red", "green", "blue")
    for tile in plan_tiles(survey.grid, 128, 16):
        with rasterio.open(path) as ds:
            direct = raster.read_tile(survey, roles, tile, ds)
        cached = raster.read_tile(survey, roles, tile)
        np.testing.assert_array_equal(cached[1], direct[1])
        np.testing.assert_array_equal(cached[0], direct[0])
    window = Window(0, 0, w, h)
    data, valid = raster.read_window(survey, roles, window)
    np.testing.assert_array_equal(valid, alpha > 0)
    assert valid.dtype == bool and not data[:, ~valid].any()


@pytest.mark.parametrize("fill", ["alpha", "nodata"])
def test_raw_tiles_times_scale_are_the_scaled_tiles(tmp_path: Path, fill: str) -> None:
    # A model that scales 8-bit bands itself (on a GPU) must see what the float reads give:
    # the same values, zeros where invalid, through the block cache and direct reads alike.
    from agriseg.grid import plan_tiles

    rng = np.random.default_rng(8)
    h, w = 300, 260
    rgb = rng.integers(1, 255, (3, h, w)).astype(np.uint8)
    valid = rng.random((h, w)) > 0.25
    valid[:50] = False
    if fill == "alpha":
        path = write_rgba(tmp_path / "rgba.tif", rgb, valid, block=64)
    else:
        rgb[:, ~valid] = 0
        rgb[0, 60, 60] = 0  # one band at the nodata value: invalid too
        path = tmp_path / "nodata.tif"
        with rasterio.open(path, "w", driver="GTiff", width=w, height=h, count=3,
                           dtype="uint8", crs="EPSG:32615", nodata=0, tiled=True,
                           blockxsize=64, blockysize=64,
                           transform=Affine(0.02, 0, 500000.0, 0, -0.02, 4900000.0)) as dst:
            dst.write(rgb)
    survey = open_survey(str(path))
    assert raster.raw_scalable(survey)
    raster.clear_tile_cache()
    roles = survey.roles.spectral
    for tile in plan_tiles(survey.grid, 128, 16):
        scaled, scaled_valid = raster.read_tile(survey, roles, tile)
        with rasterio.open(path) as ds:
            reads = [raster.read_tile(survey, roles, tile, raw=True),
                     raster.read_tile(survey, roles, tile, ds, raw=True)]
        for pixels, ok in reads:
            assert pixels.dtype == np.uint8
            np.testing.assert_array_equal(ok, scaled_valid)
            np.testing.assert_array_equal(
                np.multiply(pixels, np.float32(survey.scale), dtype=np.float32), scaled)
    u16 = tmp_path / "u16.tif"
    with rasterio.open(u16, "w", driver="GTiff", width=w, height=h, count=3, dtype="uint16",
                       crs="EPSG:32615", transform=Affine(0.02, 0, 500000.0, 0, -0.02,
                                                          4900000.0)) as dst:
        dst.write(rgb.astype(np.uint16) * 257)
    wide = open_survey(str(u16))
    assert not raster.raw_scalable(wide)
    with pytest.raises(ValueError, match="unscaled"):
        raster.read_tile(wide, roles, next(iter(plan_tiles(wide.grid, 128, 16))), raw=True)


def test_band_check_and_overview_share_one_pass_over_a_file_without_overviews(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The graded-alpha check samples every band when the raster is opened; on a file without
    # overviews the overview read then takes its bands from that same pass.
    rng = np.random.default_rng(5)
    h, w = 700, 600
    valid = rng.random((h, w)) > 0.2
    path = write_rgba(tmp_path / "big.tif", rng.integers(0, 255, (3, h, w)), valid, block=64)
    monkeypatch.setattr(raster, "OVERVIEW_SIDE", 300)
    monkeypatch.setattr(raster, "SAMPLE_SIDE", 100)
    passes: list[tuple[int, int] | None] = []
    real = raster._sampled_read

    def counted(*args: object, **kw: object) -> object:
        passes.append(kw.get("also"))  # type: ignore[arg-type]
        return real(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(raster, "_sampled_read", counted)
    raster._OVERVIEWS.clear()
    survey = open_survey(str(path))
    data, ov_valid, _ = read_overview(survey, ("red", "green", "blue"), 300)
    assert passes == [(300, 257)] and not raster._SHARED_SAMPLE
    # The same values as a pass of its own.
    raster._OVERVIEWS.clear()
    own = raster._read_overview(survey, ("red", "green", "blue"), 300)
    assert len(passes) == 2 and passes[1] is None
    np.testing.assert_array_equal(own[0], data)
    np.testing.assert_array_equal(own[1], ov_valid)


def test_a_failed_sampled_read_stops_the_other_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Ctrl-C or a bad block: the other threads stop instead of decoding the rest of the file.
    rng = np.random.default_rng(6)
    path = write_rgba(tmp_path / "many.tif", rng.integers(0, 255, (3, 2048, 64)), block=16)
    monkeypatch.setattr(raster.os, "sched_getaffinity", lambda _: set(range(4)))
    reads = 0
    real = rasterio.io.DatasetReader.read

    def read(self: rasterio.io.DatasetReader, *args: object, **kw: object) -> np.ndarray:
        nonlocal reads
        reads += 1
        if reads == 3:
            raise KeyboardInterrupt
        return real(self, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(rasterio.io.DatasetReader, "read", read)
    with pytest.raises(KeyboardInterrupt):
        raster._sampled_read(str(path), [1, 2, 3], (512, 16))
    assert reads < 20  # of 128 strips


def _band_file(path: Path, mean: float) -> Path:
    """A single-band float32 reflectance GeoTIFF (one band of a ``-separate`` stack)."""
    rng = np.random.default_rng(len(path.name))
    with rasterio.open(path, "w", driver="GTiff", width=80, height=60, count=1,
                       dtype="float32", crs="EPSG:32615",
                       transform=Affine(0.03, 0, 720000, 0, -0.03, 4300000)) as dst:
        dst.write((mean + 0.01 * rng.random((1, 60, 80))).astype(np.float32))
    return path


def _separate_vrt(folder: Path, names: list[str], means: list[float] | None = None,
                  tiles: int = 1, alpha: int | None = None) -> Path:
    """``gdalbuildvrt -separate stack.vrt NAMES...`` written by hand (gdalbuildvrt may be
    absent): one source per band, or ``tiles`` side-by-side sources per band (a mosaic)."""
    means = means or [0.05] * len(names)
    bands = []
    for b, (name, mean) in enumerate(zip(names, means, strict=True), start=1):
        srcs = ""
        for t in range(tiles):
            tile = name if tiles == 1 else f"tile{t}_{name}"
            _band_file(folder / tile, mean)
            srcs += (f"<SimpleSource><SourceFilename relativeToVRT=\"1\">{tile}</SourceFilename>"
                     "<SourceBand>1</SourceBand><SrcRect xOff=\"0\" yOff=\"0\" xSize=\"80\" "
                     f"ySize=\"60\"/><DstRect xOff=\"{80 * t}\" yOff=\"0\" xSize=\"80\" "
                     "ySize=\"60\"/></SimpleSource>")
        interp = f"<ColorInterp>{'Alpha' if b == alpha else 'Undefined'}</ColorInterp>"
        bands.append(f"<VRTRasterBand dataType=\"Float32\" band=\"{b}\">{interp}{srcs}"
                     "</VRTRasterBand>")
    vrt = folder / "stack.vrt"
    vrt.write_text(
        f"<VRTDataset rasterXSize=\"{80 * tiles}\" rasterYSize=\"60\"><SRS>EPSG:32615</SRS>"
        "<GeoTransform>720000, 0.03, 0, 4300000, 0, -0.03</GeoTransform>"
        f"{''.join(bands)}</VRTDataset>")
    return vrt


S2 = "T15TVG_20230704T170901_{}_10m.tif"
L8 = "LC08_L2SP_027029_20230704_20230712_02_T1_SR_{}.TIF"
PIX4D = "field_transparent_reflectance_{}.tif"


@pytest.mark.parametrize(("names", "roles"), [
    # Sentinel-2 B02, B03, B04, B08: the R,G,B,NIR order read B02 (blue) as red
    ([S2.format(b) for b in ("B02", "B03", "B04", "B08")],
     {"blue": 1, "green": 2, "red": 3, "nir": 4}),
    # The 10/20 m stack: B05 is the red edge (not B06, B07), B08 the NIR (not B8A)
    ([S2.format(b) for b in ("B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11",
                             "B12")], {"blue": 1, "green": 2, "red": 3, "rededge": 4, "nir": 7}),
    # without B05 and B08, the first red edge band and B8A
    ([S2.format(b) for b in ("B8A", "B07", "B06", "B04", "B03", "B02")],
     {"nir": 1, "rededge": 3, "red": 4, "green": 5, "blue": 6}),
    # Pix4D reflectance maps: "red edge" is the red edge, not red
    ([PIX4D.format(c) for c in ("blue", "green", "red", "red edge", "nir")],
     {"blue": 1, "green": 2, "red": 3, "rededge": 4, "nir": 5}),
    ([PIX4D.format(c) for c in ("green", "red", "red_edge", "nir")],
     {"green": 1, "red": 2, "rededge": 3, "nir": 4}),
    # other bands' names ("coastal_blue", PlanetScope's "green_i") name no role
    ([PIX4D.format(c) for c in ("coastal_blue", "green_i", "red", "nir")], {"red": 3, "nir": 4}),
    # Landsat 8/9 Collection 2 surface reflectance, in any order
    ([L8.format(b) for b in ("B2", "B3", "B4", "B5")],
     {"blue": 1, "green": 2, "red": 3, "nir": 4}),
    ([L8.replace("LC08", "LC09").format(b) for b in ("B5", "B4", "B3", "B2", "B6")],
     {"nir": 1, "red": 2, "green": 3, "blue": 4}),
])
def test_separate_vrt_roles_come_from_source_file_names(
    tmp_path: Path, names: list[str], roles: dict[str, int], caplog: pytest.LogCaptureFixture
) -> None:
    """``gdalbuildvrt -separate`` copies no band descriptions: the file names say the bands."""
    vrt = _separate_vrt(tmp_path, names)
    with caplog.at_level("INFO", logger="agriseg.raster"):
        survey = open_survey(str(vrt))
    assert survey.roles.as_dict() == roles
    assert survey.to_dict()["roles_from"] == "VRT source file names"
    assert "from VRT source file names" in caplog.text and not survey.warnings


@pytest.mark.parametrize("names", [
    ["B1.tif", "B2.tif", "B3.tif", "B4.tif"],  # which sensor? (Landsat 7's B4 is NIR)
    [f"LE07_L2SP_027029_20200704_20200730_02_T1_SR_B{b}.TIF" for b in (1, 2, 3, 4)],
    [f"field_SR_B{b}.tif" for b in (2, 3, 4, 5)],  # Landsat 4-7 write SR_B# too
    [S2.format("B04"), "other_" + S2.format("B04"), S2.format("B03"), S2.format("B02")],
    [PIX4D.format(c) for c in ("coastal_blue", "green_i", "red", "swir")],  # one role only
])
def test_separate_vrt_with_ambiguous_names_keeps_the_band_order(
    tmp_path: Path, names: list[str]
) -> None:
    survey = open_survey(str(_separate_vrt(tmp_path, names, [0.06, 0.08, 0.03, 0.30])))
    assert survey.roles.as_dict() == {"red": 1, "green": 2, "blue": 3, "nir": 4}
    assert survey.to_dict()["roles_from"].startswith("band order convention")


def test_mosaic_vrt_roles_do_not_come_from_file_names(tmp_path: Path) -> None:
    """Several sources per band (a mosaic of tiles): their names say nothing of the band."""
    names = [S2.format(b) for b in ("B02", "B03", "B04", "B08")]
    vrt = _separate_vrt(tmp_path, names, [0.06, 0.08, 0.03, 0.30], tiles=2)
    with rasterio.open(vrt) as ds:
        assert ds.width == 160 and len(ds.files) == 9
    survey = open_survey(str(vrt))
    assert survey.roles.as_dict() == {"red": 1, "green": 2, "blue": 3, "nir": 4}
    assert survey.to_dict()["roles_from"].startswith("band order convention")
    # one file per band, each placed twice (as vrt_mosaic repeats a tile): still a mosaic
    vrt.write_text(vrt.read_text().replace("tile1_", "tile0_"))
    with rasterio.open(vrt) as ds:
        assert len(ds.files) == 5
    survey = open_survey(str(vrt))
    assert survey.to_dict()["roles_from"].startswith("band order convention")


def test_separate_vrt_alpha_band_and_descriptions(tmp_path: Path) -> None:
    """A band tagged alpha stays alpha, and one whose file names a colour voids the names;
    band descriptions, when the VRT has them, come before the file names."""
    names = [PIX4D.format(c) for c in ("blue", "green", "red", "nir", "mask")]
    vrt = _separate_vrt(tmp_path, names, alpha=5)
    assert open_survey(str(vrt)).roles.as_dict() == {
        "blue": 1, "green": 2, "red": 3, "nir": 4, "alpha": 5}
    (tmp_path / "named").mkdir()
    vrt = _separate_vrt(tmp_path / "named", [*names[:4], PIX4D.format("red edge")], alpha=5)
    assert open_survey(str(vrt)).to_dict()["roles_from"] != "VRT source file names"
    vrt = _separate_vrt(tmp_path, names[:4])
    with rasterio.open(vrt, "r+") as ds:
        for i, d in enumerate(["Red", "Green", "Blue", "NIR"], start=1):
            ds.set_band_description(i, d)
    survey = open_survey(str(vrt))
    assert survey.roles.as_dict() == {"red": 1, "green": 2, "blue": 3, "nir": 4}
    assert survey.to_dict()["roles_from"] == "band descriptions"


@pytest.mark.parametrize(("name", "role"), [
    ("S2B_MSIL2A_20230704T170901_N0509_R112_T15TVG_20230704T212226_B8A_20m.jp2", "nir"),
    ("/data/GRANULE/IMG_DATA/R10m/T15TVG_20230704T170901_B04_10m.jp2", "red"),
    ("B04 - red.tif", "red"),
    ("LC8027029201518LGN00_B4.TIF", "red"),  # pre-collection Landsat 8
    ("field_red edge.tif", "rededge"),
    ("field-RE.tif", "rededge"),
    ("Near Infrared.tif", "nir"),
    ("B11_red.tif", None),  # a code and a colour that disagree
    ("B04.tif", "red"),
    ("B4.tif", None),
    ("LT05_L2SP_027029_19990704_20200907_02_T1_SR_B3.TIF", None),
    ("field_red_nir.tif", None),
    ("coastal_blue.tif", None),
    ("field_ndvi.tif", None),
    ("B01.tif", None),
])
def test_file_name_band(name: str, role: str | None) -> None:
    assert band_roles._file_name_band(name)[0] == role


def test_gdalbuildvrt_separate_stack(tmp_path: Path) -> None:
    import shutil
    import subprocess

    if shutil.which("gdalbuildvrt") is None:
        pytest.skip("gdalbuildvrt not installed")
    names = [S2.format(b) for b in ("B02", "B03", "B04", "B08")]
    files = [str(_band_file(tmp_path / n, m)) for n, m in zip(names, [0.03, 0.06, 0.05, 0.3],
                                                               strict=True)]
    vrt = tmp_path / "stack.vrt"
    subprocess.run(["gdalbuildvrt", "-q", "-separate", str(vrt), *files], check=True)
    survey = open_survey(str(vrt))
    assert survey.roles.as_dict() == {"blue": 1, "green": 2, "red": 3, "nir": 4}
    assert survey.to_dict()["roles_from"] == "VRT source file names"


@pytest.mark.parametrize("case", ["small", "zipped"])
def test_no_sample_is_kept_where_the_overview_read_cannot_use_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    # A raster the overview reads whole, and paths without a file stamp (/vsizip/: every such
    # path would share one key, and a later survey could take an earlier one's pixels).
    import zipfile

    rng = np.random.default_rng(7)
    h, w = 700, 600
    path = write_rgba(tmp_path / "f.tif", rng.integers(0, 255, (3, h, w)),
                      rng.random((h, w)) > 0.2, block=64)
    monkeypatch.setattr(raster, "SAMPLE_SIDE", 100)
    monkeypatch.setattr(raster, "OVERVIEW_SIDE", 2048 if case == "small" else 300)
    name = str(path)
    if case == "zipped":
        with zipfile.ZipFile(tmp_path / "f.zip", "w") as z:
            z.write(path, "f.tif")
        name = f"/vsizip/{tmp_path / 'f.zip'}/f.tif"
    raster._SHARED_SAMPLE[("stale",), (1, 1)] = np.zeros((4, 1, 1), np.uint8)
    survey = open_survey(name)
    assert survey.mask_source == "alpha" and not raster._SHARED_SAMPLE


def test_a_vrt_of_two_data_types_is_read_band_type_by_band_type(tmp_path: Path) -> None:
    # uint16 colour bands beside a uint8 alpha: rasterio reads one data type at a time.
    rng = np.random.default_rng(8)
    h, w = 400, 300
    profile = {"driver": "GTiff", "width": w, "height": h, "crs": "EPSG:32615",
               "transform": Affine(0.02, 0, 500000.0, 0, -0.02, 4900000.0), "tiled": True,
               "blockxsize": 64, "blockysize": 64}
    rgb = rng.integers(1000, 60000, (3, h, w)).astype("uint16")
    alpha = np.where(rng.random((h, w)) > 0.25, 255, 0).astype("uint8")
    with rasterio.open(tmp_path / "rgb16.tif", "w", count=3, dtype="uint16", **profile) as d:
        d.write(rgb)
    with rasterio.open(tmp_path / "a8.tif", "w", count=1, dtype="uint8", **profile) as d:
        d.write(alpha, 1)

    def band(n: int, file: str, src: int, dtype: str, interp: str) -> str:
        return (f'<VRTRasterBand dataType="{dtype}" band="{n}"><ColorInterp>{interp}'
                f'</ColorInterp><SimpleSource><SourceFilename relativeToVRT="1">{file}'
                f"</SourceFilename><SourceBand>{src}</SourceBand></SimpleSource>"
                "</VRTRasterBand>")

    bands = [band(i, "rgb16.tif", i, "UInt16", c) for i, c in
             ((1, "Red"), (2, "Green"), (3, "Blue"))] + [band(4, "a8.tif", 1, "Byte", "Alpha")]
    vrt = tmp_path / "mixed.vrt"
    vrt.write_text(f'<VRTDataset rasterXSize="{w}" rasterYSize="{h}"><SRS>EPSG:32615</SRS>'
                   "<GeoTransform>500000, 0.02, 0, 4900000, 0, -0.02</GeoTransform>"
                   f"{''.join(bands)}</VRTDataset>")
    survey = open_survey(str(vrt))
    assert survey.mask_source == "alpha"
    _, valid, _ = read_overview(survey, ("red", "green", "blue"))
    np.testing.assert_array_equal(valid, alpha > 0)
    both = raster._sampled_read(str(vrt), [1, 4], (h, w))
    assert both.dtype == np.uint16
    np.testing.assert_array_equal(both[0], rgb[0])
    np.testing.assert_array_equal(both[1], alpha)


def _field_with_corner(dtype: str, top: int, size: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Textured soil and plants, with four corners of ``top`` in every band (the fill around a
    footprint turned 45 degrees: 60 % of the edge pixels, 18 % of the raster).

    The data are 8-bit colours, or reflectance x 10000 in 16 bits.
    """
    rng = np.random.default_rng(0)
    low, high = (20, 130) if dtype == "uint8" else (500, 5000)
    rgb = rng.integers(low, high, (3, size, size)).astype(dtype)
    yy, xx = np.mgrid[0:size, 0:size]
    fill = np.abs(xx - size / 2) + np.abs(yy - size / 2) > size * 0.7
    rgb[:, fill] = top
    return rgb, fill


@pytest.mark.parametrize(("dtype", "top"), [("uint8", 255), ("uint16", 65535)])
def test_undeclared_white_fill_is_nodata_and_warned(tmp_path: Path, dtype: str,
                                                    top: int) -> None:
    """Metashape/JPEG exports fill outside the survey with white: it was read as bright soil."""
    rgb, fill = _field_with_corner(dtype, top)
    s = open_survey(_rgb(tmp_path / "white.tif", rgb))
    assert s.mask_source == "white"  # as the black fill, taken as nodata
    _, valid = raster.read_window(s, s.roles.spectral, Window(0, 0, 200, 200))
    assert (valid == ~fill).all()
    (note,) = s.warnings
    assert "pure white" in note and f"gdal_edit.py -a_nodata {top} " in note
    assert "nearblack" not in note
    # the fill is left out of the scale choice too (a 65535 fill set the 99th percentile)
    assert s.scale == pytest.approx(1 / 255 if dtype == "uint8" else 1 / 10000)
    # declared, it is GDAL's mask, without a warning
    declared = open_survey(_rgb(tmp_path / "declared.tif", rgb, nodata=top))
    assert declared.mask_source == "gdal" and not declared.warnings


def test_jpeg_white_fill_suggests_nearblack_white(tmp_path: Path) -> None:
    rgb, _ = _field_with_corner("uint8", 255, 256)
    path = _rgb(tmp_path / "jpeg.tif", rgb, compress="JPEG", tiled=True, blockxsize=128,
                blockysize=128)
    s = open_survey(path)
    assert s.mask_source == "white"
    assert any("nearblack -white -setalpha" in w for w in s.warnings), s.warnings


def test_overexposed_survey_is_no_white_fill(tmp_path: Path) -> None:
    """Clipped soil running off the edges is overexposure, not fill: no mask, no warning."""
    with rasterio.open(SAMPLES / "maricopa_sorghum_uav" / "orthomosaic.tif") as ds:
        rgb = ds.read([1, 2, 3], window=Window(300, 300, 400, 400))
    for gain in (1.0, 1.4, 2.0):  # 1.4: 72 % of the pixels white, 70 % of the edge
        bright = np.clip(rgb * gain, 0, 255).astype(np.uint8)
        s = open_survey(_rgb(tmp_path / f"x{gain}.tif", bright))
        assert s.mask_source == "none" and not s.warnings, (gain, s.warnings)
    # a few white pixels inside are no fill either
    inside = np.full((3, 200, 200), 120, np.uint8)
    inside[:, 90:110, 90:110] = 255
    assert open_survey(_rgb(tmp_path / "inside.tif", inside)).mask_source == "none"
    # nor is a white roof or panel touching one edge (5 % of the edge pixels, 4 % of the
    # raster: it was taken for fill and masked)
    roof = np.full((3, 200, 200), 120, np.uint8)
    roof[:, 60:100, :40] = 255
    s = open_survey(_rgb(tmp_path / "roof.tif", roof))
    assert s.mask_source == "none" and not s.warnings


@pytest.mark.parametrize("path", sorted(SAMPLES.glob("*/*.tif")), ids=lambda p: p.name)
def test_samples_get_no_white_fill_warning(path: Path) -> None:
    try:
        s = open_survey(path)
    except BandError:  # class maps, masks
        return
    assert s.mask_source != "white" and not any("white" in w for w in s.warnings)


def _gcp_raster(path: Path) -> Path:
    """A raster georeferenced by four GCPs in UTM 15N only (gdal_translate -gcp ... -a_srs)."""
    from rasterio.control import GroundControlPoint

    gcps = [GroundControlPoint(row, col, 315760.6 + 0.02 * col, 4900915.7 - 0.02 * row)
            for row in (0, 40) for col in (0, 60)]
    rgb = np.random.default_rng(0).integers(0, 255, (3, 40, 60), dtype=np.uint8)
    with rasterio.open(path, "w", driver="GTiff", width=60, height=40, count=3,
                       dtype="uint8", gcps=gcps, crs="EPSG:32615") as dst:
        dst.write(rgb)
    return path


def _gcp_vrt_without_crs(path: Path, src: Path) -> Path:
    """A VRT of ``src`` with GCPs in no CRS (rasterio writes no GCPs without one)."""
    gcps = "".join(f'<GCP Id="{i}" Pixel="{c}" Line="{r}" X="{315760 + c}" Y="{4900915 - r}"/>'
                   for i, (r, c) in enumerate(((0, 0), (0, 60), (40, 0), (40, 60))))
    bands = "".join(f'<VRTRasterBand dataType="Byte" band="{b}"><SimpleSource><SourceFilename '
                    f'relativeToVRT="1">{src.name}</SourceFilename><SourceBand>{b}</SourceBand>'
                    "</SimpleSource></VRTRasterBand>" for b in (1, 2, 3))
    path.write_text(f'<VRTDataset rasterXSize="60" rasterYSize="40"><GCPList Projection="">'
                    f"{gcps}</GCPList>{bands}</VRTDataset>")
    return path


def test_gcp_only_raster_is_refused_with_gdalwarp(tmp_path: Path) -> None:
    """The "no CRS" error's gdal_edit.py -a_srs advice did not help: GCPs need a warp."""
    from agriseg.errors import RasterError

    path = _gcp_raster(tmp_path / "gcps.tif")
    with pytest.raises(RasterError, match=r"ground control points.*gdalwarp -r near -t_srs "
                                          r"EPSG:32615 \S+gcps.tif warped.tif"):
        open_survey(path)
    with rasterio.open(path, "r+") as ds:  # what gdal_edit.py -a_srs EPSG:32615 does
        ds.crs = "EPSG:32615"
    with pytest.raises(RasterError, match="ground control points"):
        open_survey(path)
    with pytest.raises(RasterError, match=r"GCPs, without a CRS.*-s_srs EPSG:CODE"):
        open_survey(_gcp_vrt_without_crs(tmp_path / "bare.vrt", path))


def _paletted(path: Path, values: np.ndarray) -> Path:
    with rasterio.open(path, "w", driver="GTiff", width=values.shape[1], height=values.shape[0],
                       count=1, dtype="uint8", crs="EPSG:32615",
                       transform=Affine(0.02, 0, 5e5, 0, -0.02, 5e6)) as dst:
        dst.write(values.astype(np.uint8), 1)
        dst.write_colormap(1, {i: (i, 255 - i, i // 2, 255) for i in range(256)})
    return path


def test_paletted_image_is_told_to_expand_its_palette(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    image = _paletted(tmp_path / "pal.tif", rng.integers(0, 64, (60, 80)))
    with pytest.raises(BandError, match=r"paletted image.*gdal_translate -expand rgb "):
        open_survey(image)
    # a class map with a colour table (few values) keeps the single-band product's message
    classes = _paletted(tmp_path / "classes.tif", rng.integers(0, 4, (60, 80)))
    with pytest.raises(BandError, match=r"single-band product .* orthomosaic"):
        open_survey(classes)


def test_untagged_band_beside_tagged_ones_is_named_with_the_tags_kept(tmp_path: Path) -> None:
    """R,G,B,Undefined,Alpha (uint8): the roles come from the tags, and band 4 is the spare."""
    rng = np.random.default_rng(0)
    data = rng.integers(1, 255, (5, 60, 80), dtype=np.uint8)
    data[4] = 255
    path = tmp_path / "rgbua.tif"
    with rasterio.open(path, "w", driver="GTiff", width=80, height=60, count=5, dtype="uint8",
                       crs="EPSG:32615", transform=Affine(0.02, 0, 5e5, 0, -0.02, 5e6)) as dst:
        dst.write(data)
        dst.colorinterp = [ColorInterp.red, ColorInterp.green, ColorInterp.blue,
                           ColorInterp.undefined, ColorInterp.alpha]
    (note,) = open_survey(path).warnings
    assert "guessed" not in note and "band 4 is not used" in note
    assert "--bands red=1,green=2,blue=3,nir=4,alpha=5" in note and "PlanetScope" not in note
