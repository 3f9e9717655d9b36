"""Synthetic fields: determinism, realism bounds, georeferencing of the written files."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from click.testing import CliRunner
from rasterio.enums import ColorInterp

from agriseg.classes import CROP, DISEASE, NODATA_CLASS, SOIL, WEED
from agriseg.errors import ConfigError
from agriseg.indices import exg, ndvi
from agriseg.synth import ROLES_MS, ROLES_RGB, FieldSpec, SynthField, make_field, write_field


@pytest.fixture(scope="module")
def rgb_field() -> SynthField:
    return make_field(FieldSpec(size=512, seed=1))


@pytest.fixture(scope="module")
def ms_field() -> SynthField:
    return make_field(FieldSpec(size=256, seed=2, multispectral=True))


def _shares(field: SynthField) -> dict[int, float]:
    n = field.valid.sum()
    return {c: float((field.truth == c).sum() / n) for c in (SOIL, CROP, WEED, DISEASE)}


def test_deterministic() -> None:
    spec = FieldSpec(size=256, seed=7)
    a, b = make_field(spec), make_field(spec)
    for x, y in ((a.image, b.image), (a.truth, b.truth), (a.valid, b.valid)):
        assert np.array_equal(x, y)
    assert a.info["class_fractions"] == b.info["class_fractions"]
    c = make_field(FieldSpec(size=256, seed=8))
    assert not np.array_equal(a.image, c.image)


def test_shapes_and_dtypes(rgb_field: SynthField) -> None:
    f = rgb_field
    assert f.image.shape == (3, 512, 512) and f.image.dtype == np.uint8
    assert f.truth.shape == (512, 512) and f.truth.dtype == np.uint8
    assert f.valid.shape == (512, 512) and f.valid.dtype == bool
    assert f.roles == ROLES_RGB
    assert f.grid.shape_yx == (512, 512)
    assert f.grid.gsd_m == pytest.approx(0.02)
    wide = make_field(FieldSpec(shape_yx=(96, 200), seed=3))
    assert wide.image.shape == (3, 96, 200) and wide.truth.shape == (96, 200)


def test_class_shares_plausible(rgb_field: SynthField) -> None:
    f = rgb_field
    s = _shares(f)
    assert s[SOIL] > 0.35 and s[CROP] > 0.2
    assert s[SOIL] + s[CROP] > 0.8
    for c in (WEED, DISEASE):
        assert 0.0 < s[c] < 0.15
    assert set(np.unique(f.truth)) <= {SOIL, CROP, WEED, DISEASE, NODATA_CLASS}
    # truth is nodata exactly outside the footprint, which covers ~5-15 % of the raster
    assert np.array_equal(f.truth == NODATA_CLASS, ~f.valid)
    assert 0.04 < 1 - f.valid.mean() < 0.16
    assert (f.image[:, ~f.valid] == 0).all()


@pytest.mark.parametrize("seed", [0, 5, 11])
def test_shares_across_seeds(seed: int) -> None:
    s = _shares(make_field(FieldSpec(size=256, seed=seed)))
    assert s[SOIL] > s[WEED] and s[CROP] > s[WEED] and s[CROP] > s[DISEASE]
    assert 0 < s[WEED] < 0.15 and 0 < s[DISEASE] < 0.15


def test_crop_is_greener_than_soil(rgb_field: SynthField) -> None:
    f = rgb_field
    rgb = f.image.astype(np.float32) / 255.0
    e = exg(rgb[0], rgb[1], rgb[2])
    assert e[f.truth == CROP].mean() > e[f.truth == SOIL].mean() + 0.15
    # weeds are green too, disease is yellower than healthy crop
    assert e[f.truth == WEED].mean() > e[f.truth == SOIL].mean() + 0.1
    red_share = rgb[0] / np.maximum(rgb.sum(axis=0), 1e-6)
    assert red_share[f.truth == DISEASE].mean() > red_share[f.truth == CROP].mean()


def test_rows_follow_angle_and_spacing() -> None:
    f = make_field(FieldSpec(size=384, seed=4, row_angle_deg=30.0, row_spacing_m=0.75))
    assert f.info["row_angle_deg"] == pytest.approx(30.0)
    assert f.info["row_spacing_m"] == pytest.approx(0.75)
    ys, xs = np.nonzero(f.truth == CROP)
    th = math.radians(30.0)
    # Across-row coordinate for a north-up grid (y grows downwards): crop pixels cluster
    # at one phase of the row period.
    u = ((ys + 0.5) * math.cos(th) + (xs + 0.5) * math.sin(th)) * 0.02
    phase = np.exp(2j * np.pi * u / 0.75)
    assert abs(phase.mean()) > 0.5
    wrong = np.exp(2j * np.pi * u / 0.6)
    assert abs(wrong.mean()) < 0.2


def test_densities_switch_layers_off() -> None:
    f = make_field(FieldSpec(size=256, seed=3, weed_density=0, disease_density=0))
    assert not np.isin(f.truth, [WEED, DISEASE]).any()
    g = make_field(FieldSpec(size=256, seed=3, nodata_border=False))
    assert g.valid.all() and (g.truth != NODATA_CLASS).all()


def test_spec_validation() -> None:
    with pytest.raises(ConfigError):
        FieldSpec(crop_cover=1.5)
    with pytest.raises(ConfigError):
        FieldSpec(seed=-1)
    with pytest.raises(ConfigError):
        FieldSpec(gsd=0)
    with pytest.raises(ConfigError):
        FieldSpec(crs="EPSG:4326")
    # NaN and infinity failed deep inside numpy; a huge density filled memory
    for bad in ({"row_angle_deg": math.nan}, {"row_angle_deg": math.inf},
                {"weed_density": math.nan}, {"origin_xy": (math.nan, 0.0)}):
        with pytest.raises(ConfigError, match="must be a finite number"):
            FieldSpec(**bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"must be 0\.\.100"):
        FieldSpec(disease_density=1e9)


def test_write_rgb_georeferenced(tmp_path: Path) -> None:
    spec = FieldSpec(size=300, seed=1, origin_xy=(450000.0, 5000000.0))
    img, tru = tmp_path / "f.tif", tmp_path / "f_truth.tif"
    field = write_field(spec, img, tru)
    expected = Affine(0.02, 0.0, 450000.0, 0.0, -0.02, 5000000.0)
    with rasterio.open(img) as ds:
        assert ds.count == 4 and ds.dtypes == ("uint8",) * 4
        assert ds.crs.to_epsg() == 32615
        assert ds.transform.almost_equals(expected)
        assert ds.colorinterp == (
            ColorInterp.red, ColorInterp.green, ColorInterp.blue, ColorInterp.alpha
        )
        assert ds.block_shapes[0] == (256, 256)
        assert ds.compression.name.lower() == "deflate"
        data = ds.read()
    assert np.array_equal(data[:3], field.image)
    assert np.array_equal(data[3] > 0, field.valid)
    assert set(np.unique(data[3])) == {0, 255}
    with rasterio.open(tru) as ds:
        assert ds.count == 1 and ds.nodata == NODATA_CLASS
        assert ds.crs.to_epsg() == 32615 and ds.transform.almost_equals(expected)
        assert ds.colormap(1)[CROP][:3] == (46, 160, 44)
        assert np.array_equal(ds.read(1), field.truth)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.tif", "f_truth.tif"]


def test_multispectral(ms_field: SynthField, tmp_path: Path) -> None:
    f = ms_field
    assert f.image.dtype == np.uint16 and f.image.shape == (5, 256, 256)
    assert f.roles == ROLES_MS
    refl = f.image.astype(np.float32) / 10000.0
    crop, soil = f.truth == CROP, f.truth == SOIL
    nir, red = refl[4], refl[0]
    # plausible reflectance: green leaves dark in red, bright in NIR; soil in between
    assert 0.3 < nir[crop].mean() < 0.6 and red[crop].mean() < 0.08
    assert 0.15 < nir[soil].mean() < 0.4 and 0.1 < red[soil].mean() < 0.3
    v = ndvi(nir, red)
    assert v[crop].mean() > 0.7 > 0.3 > v[soil].mean()
    dis = f.truth == DISEASE
    assert v[dis].mean() < v[crop].mean()
    assert (f.image[:, ~f.valid] == 0).all() and (f.image[:, f.valid] > 0).all()

    img, tru = tmp_path / "ms.tif", tmp_path / "ms_truth.tif"
    write_field(FieldSpec(size=256, seed=2, multispectral=True), img, tru)
    with rasterio.open(img) as ds:
        assert ds.count == 5 and ds.dtypes[0] == "uint16" and ds.nodata == 0
        assert ds.descriptions == ROLES_MS
        assert np.array_equal(ds.read(), f.image)
    with rasterio.open(tru) as ds:
        assert ds.nodata == NODATA_CLASS and np.array_equal(ds.read(1), f.truth)


def test_cli(tmp_path: Path) -> None:
    from agriseg.cli import main

    out, tru = tmp_path / "c.tif", tmp_path / "c_truth.tif"
    args = ["synth", str(out), "--truth", str(tru), "--size", "128", "--seed", "3",
            "--row-angle", "10", "--weeds", "2"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert out.exists() and tru.exists()
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2 and "exists" in res.output


@pytest.mark.parametrize(("args", "message"), [
    (["same.tif", "--truth", "same.tif"], "two different files"),
    (["f.png", "--truth", "t.tif"], "name it .tif"),
    (["nodir/f.tif", "--truth", "t.tif"], "does not exist"),
    (["f.tif", "--truth", "t.tif", "--size", "100000"], "too large"),
])
def test_cli_refuses_bad_outputs_before_building(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], message: str
) -> None:
    from agriseg.cli import main

    monkeypatch.chdir(tmp_path)
    size = [] if "--size" in args else ["--size", "64"]
    res = CliRunner().invoke(main, ["synth", *args, *size])
    assert res.exit_code != 0 and message in res.output, res.output
    assert "Traceback" not in res.output
    assert list(tmp_path.iterdir()) == []  # nothing half-written under any name
