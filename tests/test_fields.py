"""Per-field statistics against truth computed directly from pixels and polygons."""

from __future__ import annotations

import os
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import rasterio
import shapely
from affine import Affine
from rasterio.crs import CRS
from shapely import affinity

from agriseg.classes import DEFAULT_CLASSES
from agriseg.errors import VectorError
from agriseg.fields import (
    hist_quantiles,
    read_fields,
    summarize_fields,
    whole_raster_field,
    write_fields,
)
from agriseg.grid import Grid
from tests.conftest import LAMBERTON, LAMBERTON_PLOTS
from tests.test_vectorize import write_mask

T = Affine(0.05, 0, 500000.0, 0, -0.05, 4900000.0)


def _field_raster(tmp_path: Path, h: int = 400, w: int = 360, seed: int = 1):
    rng = np.random.default_rng(seed)
    cls = rng.choice(4, size=(h, w), p=[0.4, 0.45, 0.1, 0.05]).astype(np.uint8)
    cls[:30, :] = 255
    idx = rng.normal(0.3, 0.2, (h, w)).astype(np.float32)
    idx[cls == 255] = np.nan
    src = write_mask(tmp_path / "classes.tif", cls, transform=T)
    ipath = tmp_path / "exg.tif"
    with rasterio.open(ipath, "w", driver="GTiff", width=w, height=h, count=1, dtype="float32",
                       crs="EPSG:32615", transform=T, nodata=float("nan"), tiled=True,
                       blockxsize=64, blockysize=64) as dst:
        dst.write(idx, 1)
    return cls, idx, src, ipath


def _pixel_truth(cls: np.ndarray, poly: shapely.Geometry, t: Affine) -> np.ndarray:
    h, w = cls.shape
    cols, rows = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
    xs, ys = t @ (cols, rows)
    inside = shapely.contains_xy(poly, xs, ys)
    return np.bincount(cls[inside], minlength=256)


def _fields_file(tmp_path: Path) -> Path:
    x0, y0 = 500000.0, 4900000.0
    a = affinity.rotate(shapely.box(x0 + 2, y0 - 12, x0 + 6, y0 - 4), 20)
    b = shapely.box(x0 + 8, y0 - 19, x0 + 16, y0 - 8)
    partly = shapely.box(x0 + 14, y0 - 5, x0 + 25, y0 + 3)  # crosses the top edge
    outside = shapely.box(x0 + 100, y0 - 10, x0 + 110, y0)
    # off the pixel lattice, so no pixel centre lies exactly on an edge (ambiguous truth)
    bowtie = affinity.translate(shapely.Polygon(
        [(x0 + 2, y0 - 19), (x0 + 6, y0 - 15), (x0 + 6, y0 - 19), (x0 + 2, y0 - 15)]), 0.013, 0.007)
    dup = b  # a duplicated plot must keep all its pixels too
    g = gpd.GeoDataFrame(
        {"name": ["A", "B", "P", "O", "X", "B2"], "group": [1, 1, 1, 2, 2, 2]},
        geometry=[a, b, partly, outside, bowtie, dup], crs=32615,
    )
    path = tmp_path / "fields.gpkg"
    g.to_file(path, engine="pyogrio")
    return path


def test_class_areas_match_truth(tmp_path: Path) -> None:
    cls, idx, src, ipath = _field_raster(tmp_path)
    with rasterio.open(src) as ds:
        grid = Grid(ds.shape, ds.transform, ds.crs)
    fs = read_fields(_fields_file(tmp_path), grid)
    assert fs.id_column == "name"
    st = dict(zip(fs.fields["field_id"], fs.fields["status"], strict=True))
    assert st == {"A": "ok", "B": "ok", "P": "partly outside raster", "O": "outside raster",
                  "X": "repaired", "B2": "ok"}
    assert any("repaired 1 invalid geometry" in n for n in fs.notes)
    assert any("2 field(s) share their geometry with another (B, B2)" in n for n in fs.notes)
    s = summarize_fields(fs, src, DEFAULT_CLASSES, indices={"exg": ipath}, chunk=64)
    s = s.set_index("field_id")
    px = 0.05**2
    for fid in ("A", "B", "P", "X", "B2"):
        geom = fs.fields.set_index("field_id").geometry[fid]
        truth = _pixel_truth(cls, geom, T)
        for c in DEFAULT_CLASSES.classes:
            got = s.loc[fid, f"{c.name}_m2"]
            assert got == pytest.approx(truth[c.value] * px, rel=0.01, abs=1e-3), (fid, c.name)
        valid = truth[:4].sum() * px
        assert s.loc[fid, "covered_pct"] == pytest.approx(valid / geom.area * 100, abs=1.0)
        # index statistics from the histograms agree with numpy on the same pixels
        h, w = cls.shape
        cols, rows = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
        xs, ys = T @ (cols, rows)
        v = idx[shapely.contains_xy(geom, xs, ys) & (cls != 255)]
        assert s.loc[fid, "exg_mean"] == pytest.approx(v.mean(), abs=1e-3)
        for q, name in ((50, "median"), (10, "p10"), (90, "p90")):
            assert s.loc[fid, f"exg_{name}"] == pytest.approx(np.percentile(v, q), abs=4e-3)
    assert s.loc["O", "covered_pct"] == 0 and np.isnan(s.loc["O", "health_score"])
    # no valid pixel: no areas either (0 m2 at risk read as a measured clean field)
    assert np.isnan(s.loc["O", "at_risk_m2"]) and np.isnan(s.loc["O", "crop_m2"])
    assert s.loc["P", "covered_pct"] < 40
    assert s.loc["B", "crop_m2"] == s.loc["B2", "crop_m2"]
    # derived measures
    b = s.loc["B"]
    veg = b.crop_m2 + b.weed_m2 + b.disease_m2
    assert b.weed_pressure_pct == pytest.approx(100 * b.weed_m2 / veg, abs=1e-2)
    assert b.disease_incidence_pct == pytest.approx(
        100 * b.disease_m2 / (b.crop_m2 + b.disease_m2), abs=1e-2)
    assert s["health_score"].min() >= 0 and s["health_score"].max() <= 100
    ranked = s.sort_values("rank")
    well = ranked[ranked["covered_pct"] >= 50]["health_score"].dropna().to_numpy()
    assert (np.diff(well) >= 0).all()
    assert ranked.index[-2:].tolist() == ["P", "O"]  # P: under 40 % covered, ranked last
    g, c = write_fields(s.reset_index(), tmp_path / "fields.gpkg", tmp_path / "fields.csv")
    back = pd.read_csv(c)
    assert len(back) == 6 and "health_score" in back and len(gpd.read_file(g)) == 6
    assert c.read_bytes().startswith(b"\xef\xbb\xbffield_id,")  # Excel reads it as UTF-8


def test_fields_without_valid_pixels_are_flagged(tmp_path: Path) -> None:
    *_, src, _ = _field_raster(tmp_path)
    x0, y0 = 500000.0, 4900000.0
    g = gpd.GeoDataFrame(
        {"name": ["nodata", "speck", "plot"]},
        geometry=[shapely.box(x0 + 2, y0 - 1.2, x0 + 6, y0 - 0.2),  # in the nodata rows
                  shapely.box(x0 + 10.001, y0 - 10.011, x0 + 10.011, y0 - 10.001),  # < 1 px
                  shapely.box(x0 + 8, y0 - 19, x0 + 16, y0 - 8)], crs=32615)
    g.to_file(tmp_path / "f.gpkg", engine="pyogrio")
    with rasterio.open(src) as ds:
        grid = Grid(ds.shape, ds.transform, ds.crs)
    s = summarize_fields(read_fields(tmp_path / "f.gpkg", grid), src, DEFAULT_CLASSES)
    st = dict(zip(s["field_id"], s["status"], strict=True))
    assert st == {"nodata": "no valid pixels", "speck": "no valid pixels", "plot": "ok"}


def test_fields_drawn_to_the_raster_edge_in_another_crs_are_inside(tmp_path: Path) -> None:
    """Reprojection puts such a field a hair outside the raster: not "partly outside"."""
    grid = Grid((400, 600), T, CRS.from_epsg(32615))
    x0, y0, x1, y1 = grid.bounds
    halves = gpd.GeoDataFrame({"name": ["W", "E", "P"]}, crs=32615, geometry=[
        shapely.box(x0, y0, (x0 + x1) / 2, y1), shapely.box((x0 + x1) / 2, y0, x1, y1),
        shapely.box(x1 - 5, y0, x1 + 0.5, y1)])  # P: 10 pixels past the edge
    path = tmp_path / "f.geojson"
    halves.to_crs(4326).to_file(path)
    st = dict(zip(*read_fields(path, grid).fields[["field_id", "status"]].T.to_numpy(),
                  strict=True))
    assert st == {"W": "ok", "E": "ok", "P": "partly outside raster"}

def test_crs_mismatch_and_id_column(tmp_path: Path) -> None:
    with rasterio.open(LAMBERTON) as ds:
        grid = Grid(ds.shape, ds.transform, ds.crs)
        rng = np.random.default_rng(0)
        cls = rng.choice(4, size=ds.shape, p=[0.3, 0.5, 0.15, 0.05]).astype(np.uint8)
    src = write_mask(tmp_path / "c.tif", cls, transform=grid.transform, crs="EPSG:32615")
    utm = read_fields(LAMBERTON_PLOTS, grid)
    geo = read_fields(LAMBERTON_PLOTS.with_name("lamberton_plots_epsg4326.geojson"), grid,
                      field_id="ID")
    assert len(utm.fields) == 40 and utm.id_column == "ID" and geo.id_column == "ID"
    a = summarize_fields(utm, src, DEFAULT_CLASSES).set_index("field_id").sort_index()
    b = summarize_fields(geo, src, DEFAULT_CLASSES).set_index("field_id").sort_index()
    assert (a.index == b.index).all()
    np.testing.assert_allclose(a["crop_m2"], b["crop_m2"], rtol=0.01)
    np.testing.assert_allclose(a["area_ha"], b["area_ha"], rtol=0.001)
    with pytest.raises(VectorError, match="not a column; columns: fid, ID"):
        read_fields(LAMBERTON_PLOTS, grid, field_id="plot")


def test_whole_raster_and_geographic(tmp_path: Path) -> None:
    t = Affine(6.3e-7, 0, -95.2, 0, -4.5e-7, 44.9)
    cls = np.ones((300, 200), np.uint8)
    cls[:, :50] = 0
    cls[100:200, 100:150] = 2
    cls[:20] = 255
    src = write_mask(tmp_path / "geo.tif", cls, transform=t, crs="EPSG:4326")
    with rasterio.open(src) as ds:
        grid = Grid(ds.shape, ds.transform, ds.crs)
    s = summarize_fields(whole_raster_field(grid), src, DEFAULT_CLASSES).iloc[0]
    assert s.field_id == "survey"
    box = gpd.GeoSeries([shapely.box(*grid.bounds)], crs=4326).to_crs("EPSG:6933")
    assert s.area_ha * 1e4 == pytest.approx(box.area.iloc[0], rel=2e-3)
    assert s.covered_pct == pytest.approx(280 / 300 * 100, abs=0.05)
    weed = gpd.GeoSeries([shapely.box(*(t @ (100, 200)), *(t @ (150, 100)))], crs=4326)
    assert s.weed_m2 == pytest.approx(weed.to_crs("EPSG:6933").area.iloc[0], rel=2e-3)
    assert s.weed_pressure_pct == pytest.approx(100 * 5000 / (280 * 150), abs=0.01)


def test_bad_fields_files(tmp_path: Path) -> None:
    grid = Grid((10, 10), T, rasterio.crs.CRS.from_epsg(32615))
    bad = tmp_path / "bad.gpkg"
    bad.write_text("nope")
    with pytest.raises(VectorError, match="not a readable vector"):
        read_fields(bad, grid)
    with pytest.raises(VectorError, match="not found"):
        read_fields(tmp_path / "missing.gpkg", grid)
    (tmp_path / "plots.csv").write_text("id,name\n1,a\n")
    with pytest.raises(VectorError, match="table without geometries"):
        read_fields(tmp_path / "plots.csv", grid)
    pts = gpd.GeoDataFrame({"a": [1]}, geometry=[shapely.Point(500000, 4900000)], crs=32615)
    pts.to_file(tmp_path / "pts.gpkg")
    with pytest.raises(VectorError, match="no polygon"):
        read_fields(tmp_path / "pts.gpkg", grid)
    inside = shapely.box(500000.1, 4899999.6, 500000.3, 4899999.8)
    dup = gpd.GeoDataFrame({"a": [1, 1]}, geometry=[inside] * 2, crs=32615)
    dup.to_file(tmp_path / "dup.gpkg")
    with pytest.raises(VectorError, match="unique"):
        read_fields(tmp_path / "dup.gpkg", grid, field_id="a")
    fs = read_fields(tmp_path / "dup.gpkg", grid)
    assert fs.id_column == "(row number)" and list(fs.fields["field_id"]) == ["1", "2"]


def test_fields_on_an_image_without_georeferencing(tmp_path: Path) -> None:
    """A --gsd run's image plane: map fields are refused clearly, fields drawn on it work."""
    from agriseg.grid import IMAGE_CRS

    grid = Grid((400, 360), Affine(0.05, 0, 0, 0, -0.05, 0), IMAGE_CRS)
    utm = gpd.GeoDataFrame({"n": [1]}, geometry=[shapely.box(500001, 4899990, 500005, 4899999)],
                           crs=32615)
    utm.to_file(tmp_path / "utm.gpkg")
    with pytest.raises(VectorError, match=r"no map coordinates.*Drop --fields"):
        read_fields(tmp_path / "utm.gpkg", grid)
    local = gpd.GeoDataFrame({"n": ["a"]}, geometry=[shapely.box(1, -10, 10, -1)],
                             crs=IMAGE_CRS.to_wkt())
    local.to_file(tmp_path / "local.gpkg")
    fs = read_fields(tmp_path / "local.gpkg", grid)
    assert list(fs.fields["field_id"]) == ["a"] and list(fs.fields["status"]) == ["ok"]


def test_hist_quantiles() -> None:
    rng = np.random.default_rng(0)
    v = rng.normal(0.2, 0.1, 10000)
    h = np.bincount(np.clip(((v + 1) / 2 * 1000).astype(int), 0, 999), minlength=1000)
    q = hist_quantiles(h[None], -1, 1, (0.1, 0.5, 0.9))[0]
    np.testing.assert_allclose(q, np.percentile(v, [10, 50, 90]), atol=2e-3)
    assert np.isnan(hist_quantiles(np.zeros((1, 10)), 0, 1, (0.5,))).all()


def test_fields_hostile_cases_via_cli(tmp_path: Path) -> None:
    """Issue 8's fields cases end to end: exit 2, one line, the file named, nothing finished."""
    from click.testing import CliRunner

    from agriseg.cli import main
    from tests.conftest import LAMBERTON, SAMPLES

    empty = tmp_path / "empty.gpkg"
    gpd.GeoDataFrame({"a": []}, geometry=[], crs=32615).to_file(empty)
    elsewhere = SAMPLES / "danforth_maize_uav" / "square_crop_with_plot_ids.geojson"
    cases = [
        (empty, [], "holds no features"),
        (elsewhere, [], "overlaps the raster"),
        (SAMPLES / "lamberton_soybean_uav" / "lamberton_plots_small.geojson",
         ["--field-id", "nope"], "is not a column"),
    ]
    for path, extra, needle in cases:
        out = tmp_path / f"o_{path.stem}"
        r = CliRunner().invoke(main, ["run", str(LAMBERTON), "--out", str(out), "--fields",
                                      str(path), "--model", "index-threshold", "--no-progress",
                                      *extra])
        assert r.exit_code == 2, r.output
        assert needle in r.output and str(path) in r.output and "Traceback" not in r.output
        assert not out.exists()  # refused before the tiles, not after a night of them


def test_layer_of_a_multi_layer_geopackage(tmp_path: Path,
                                          caplog: pytest.LogCaptureFixture) -> None:
    """A GeoPackage from QGIS often holds more than the fields: the polygons, or the named one."""
    grid = Grid((400, 360), T, rasterio.crs.CRS.from_epsg(32615))
    path = tmp_path / "project.gpkg"
    x0, y0 = 500000.0, 4900000.0
    gpd.GeoDataFrame({"n": [1]}, geometry=[shapely.Point(x0 + 3, y0 - 3)], crs=32615).to_file(
        path, layer="samples", engine="pyogrio")
    for layer, names in (("fields", ["a", "b"]), ("zones", ["z"])):
        boxes = [shapely.box(x0 + 1 + 5 * i, y0 - 6, x0 + 4 + 5 * i, y0 - 1)
                 for i in range(len(names))]
        gpd.GeoDataFrame({"name": names}, geometry=boxes, crs=32615).to_file(
            path, layer=layer, engine="pyogrio")
    with caplog.at_level("WARNING", logger="agriseg.fields"):
        fs = read_fields(path, grid)
    assert fs.layer == "fields" and list(fs.fields["field_id"]) == ["a", "b"]
    assert "samples, fields, zones" in caplog.text and "--fields-layer" in caplog.text
    assert list(read_fields(path, grid, layer="zones").fields["field_id"]) == ["z"]
    with pytest.raises(VectorError, match="no layer 'plots'; its layers: samples, fields, zones"):
        read_fields(path, grid, layer="plots")


def test_nested_collections_keep_their_polygons() -> None:
    """make_valid gives GEOMETRYCOLLECTION(MULTIPOLYGON, LINESTRING) for a two-part field
    with a spike: its polygons were dropped with the spike, and the field with them."""
    from agriseg.fields import _polygonal

    spiked = shapely.MultiPolygon([shapely.box(0, 0, 4, 4), shapely.Polygon(
        [(10, 0), (14, 0), (14, 4), (10, 4), (10, 2), (8, 2), (10, 2)])])
    for geom in (shapely.make_valid(spiked),
                 shapely.GeometryCollection([shapely.MultiPolygon(
                     [shapely.box(0, 0, 1, 1), shapely.box(2, 0, 3, 1)]),
                     shapely.LineString([(0, 0), (5, 5)])])):
        poly = _polygonal(geom)
        assert poly is not None and poly.geom_type == "MultiPolygon"
        assert len(poly.geoms) == 2
    assert _polygonal(shapely.GeometryCollection([shapely.LineString([(0, 0), (1, 1)])])) is None


def test_invalid_geometry_repaired_and_reported(tmp_path: Path) -> None:
    grid = Grid((10, 10), T, rasterio.crs.CRS.from_epsg(32615))
    x0, y0 = T.c, T.f - 0.4
    bowtie = shapely.Polygon([(x0, y0), (x0 + 0.3, y0 + 0.3), (x0 + 0.3, y0), (x0, y0 + 0.3)])
    gdf = gpd.GeoDataFrame({"name": ["bow"]}, geometry=[bowtie], crs=32615)
    gdf.to_file(tmp_path / "bow.gpkg")
    fs = read_fields(tmp_path / "bow.gpkg", grid)
    assert fs.fields["status"].iloc[0].startswith("repaired")  # also when partly outside
    assert any("repaired 1 invalid" in n for n in fs.notes)
    assert fs.fields.geometry.is_valid.all()


def test_zones_count_in_every_field_that_holds_them(tmp_path: Path) -> None:
    """Nested fields and the whole survey (no --fields) counted no zone before."""
    from agriseg.fields import _zones_per_field

    x0, y0 = 500000.0, 4900000.0
    fields = gpd.GeoDataFrame(
        {"field_id": ["outer", "inner", "other"]},
        geometry=[shapely.box(x0, y0 - 20, x0 + 20, y0),
                  shapely.box(x0 + 2, y0 - 8, x0 + 8, y0 - 2),
                  shapely.box(x0 + 30, y0 - 20, x0 + 40, y0)], crs=32615)
    zones = gpd.GeoDataFrame(
        {"field_id": ["outer", "outer", None]},  # each zone names one field only
        geometry=[shapely.box(x0 + 3, y0 - 4, x0 + 4, y0 - 3),
                  shapely.box(x0 + 12, y0 - 14, x0 + 13, y0 - 13),
                  shapely.box(x0 + 33, y0 - 4, x0 + 34, y0 - 3)], crs=32615)
    assert _zones_per_field(fields, zones).tolist() == [2, 1, 1]
    assert _zones_per_field(fields, None).tolist() == [0, 0, 0]


def test_csv_cells_are_not_spreadsheet_formulas(tmp_path: Path) -> None:
    ids = ["=cmd|' /C calc'!A0", "+1+2", "@SUM(A1)", "-2+3", "-7", "Süd, \"Nord\""]
    s = gpd.GeoDataFrame({"field_id": ids, "score": range(6)},
                         geometry=[shapely.box(i, 0, i + 1, 1) for i in range(6)], crs=32615)
    g, c = write_fields(s, tmp_path / "f.gpkg", tmp_path / "f.csv")
    back = pd.read_csv(c, dtype=str)["field_id"].tolist()
    assert back == ["'=cmd|' /C calc'!A0", "'+1+2", "'@SUM(A1)", "'-2+3", "-7", "Süd, \"Nord\""]
    assert gpd.read_file(g)["field_id"].tolist() == ids  # the GeoPackage keeps them as they are


def test_fields_whose_coordinates_do_not_fit_their_crs(tmp_path: Path) -> None:
    """UTM coordinates in a GeoJSON without a crs member (read as lon/lat)."""
    *_, src, _ = _field_raster(tmp_path)
    path = tmp_path / "nocrs.geojson"
    gpd.GeoDataFrame({"name": ["a"]}, geometry=[shapely.box(500002, 4899990, 500006, 4899996)],
                     crs=None).to_file(path, engine="pyogrio")
    with rasterio.open(src) as ds:
        grid = Grid(ds.shape, ds.transform, ds.crs)
    with pytest.raises(VectorError, match="coordinates do not fit its CRS EPSG:4326"):
        read_fields(path, grid)
    # latitude first: told so, not to assign the raster's CRS
    swapped = tmp_path / "latlon.geojson"
    gpd.GeoDataFrame({"name": ["a"]}, geometry=[shapely.box(44.2, -93.01, 44.21, -93.0)],
                     crs=4326).to_file(swapped, engine="pyogrio")
    with pytest.raises(VectorError, match=r"look like \(latitude, longitude\)"):
        read_fields(swapped, grid)


def test_areas_with_rectangular_pixels(tmp_path: Path) -> None:
    """Pixels 2 cm wide and 3 cm tall: areas are x times y, not the mean edge squared."""
    t = Affine(0.02, 0, 500000.0, 0, -0.03, 4900000.0)
    grid = Grid((100, 100), t, CRS.from_epsg(32615))
    assert grid.pixel_area_m2 == pytest.approx(0.0006)
    cls = np.zeros((100, 100), np.uint8)
    cls[:, 50:] = 1
    src = write_mask(tmp_path / "c.tif", cls, transform=t)
    s = summarize_fields(whole_raster_field(grid), src, DEFAULT_CLASSES).iloc[0]
    assert s["soil_m2"] == pytest.approx(5000 * 0.0006) and s["area_ha"] == pytest.approx(6e-4)


def test_run_class_areas_are_the_field_tables_in_a_geographic_crs(tmp_path: Path) -> None:
    """run.json's class areas used a mean pixel size: 2.8 % off on a warped drone survey."""
    from agriseg.predict import class_areas_m2, class_counts

    t = Affine(1e-4, 0, -95.0, 0, -1e-4, 46.0)  # ~7.7 x 11.1 m pixels, 0.2 degrees tall
    cls = np.zeros((2000, 500), np.uint8)
    cls[:, 250:] = 1
    cls[:100] = 255
    src = write_mask(tmp_path / "c.tif", cls, transform=t, crs="EPSG:4326")
    grid = Grid(cls.shape, t, CRS.from_epsg(4326))
    areas = class_areas_m2(src, DEFAULT_CLASSES, class_counts(src, DEFAULT_CLASSES), grid)
    s = summarize_fields(whole_raster_field(grid), src, DEFAULT_CLASSES).iloc[0]
    for name in ("soil", "crop"):
        assert areas[name] == pytest.approx(s[f"{name}_m2"], rel=1e-6)
    assert sum(areas.values()) == pytest.approx(s["area_ha"] * 1e4, rel=1e-3)


def test_whole_number_ids_stored_as_floats_read_as_integers(tmp_path: Path) -> None:
    *_, src, _ = _field_raster(tmp_path)
    x0, y0 = 500000.0, 4900000.0
    gpd.GeoDataFrame({"plot": [101.0, 102.0]},  # a Shapefile's numbers come back as floats
                     geometry=[shapely.box(x0 + 2, y0 - 12, x0 + 6, y0 - 4),
                               shapely.box(x0 + 8, y0 - 19, x0 + 16, y0 - 8)],
                     crs=32615).to_file(tmp_path / "p.gpkg", engine="pyogrio")
    with rasterio.open(src) as ds:
        grid = Grid(ds.shape, ds.transform, ds.crs)
    assert read_fields(tmp_path / "p.gpkg", grid).fields["field_id"].tolist() == ["101", "102"]


def test_field_areas_at_any_extent_in_a_geographic_crs(tmp_path: Path) -> None:
    """A local UTM zone gave a whole-world raster's field 0 ha."""
    from agriseg.vectorize import row_pixel_areas

    t = Affine(1.5, 0, -180.0, 0, -1.5, 84.0)
    cls = np.ones((112, 240), np.uint8)
    src = write_mask(tmp_path / "c.tif", cls, transform=t, crs="EPSG:4326")
    grid = Grid(cls.shape, t, CRS.from_epsg(4326))
    s = summarize_fields(whole_raster_field(grid), src, DEFAULT_CLASSES).iloc[0]
    rows = row_pixel_areas(grid)
    assert rows is not None
    assert s["area_ha"] * 1e4 == pytest.approx(rows.sum() * 240, rel=1e-4)
    assert s["covered_pct"] == pytest.approx(100, abs=0.01)


def test_measures_of_classes_a_schema_lacks_are_empty(tmp_path: Path) -> None:
    from agriseg.classes import ClassSchema, SegClass

    *_, src, _ = _field_raster(tmp_path)
    three = ClassSchema((SegClass(0, "soil", (1, 1, 1)), SegClass(1, "crop", (2, 2, 2)),
                         SegClass(2, "weed", (3, 3, 3), True)))
    with rasterio.open(src) as ds:
        grid = Grid(ds.shape, ds.transform, ds.crs)
    s = summarize_fields(whole_raster_field(grid), src, three).iloc[0]
    assert np.isnan(s["disease_incidence_pct"])  # no disease class: no such measure, not 0
    assert s["weed_pressure_pct"] >= 0 and s["vegetation_pct"] > 0
    assert 0 <= s["health_score"] <= 100


def test_weeds_without_crop_score_zero(tmp_path: Path) -> None:
    """A field of weeds only (a failed stand) is the first to visit, not unscored and last."""
    cls = np.ones((40, 60), np.uint8)  # crop
    cls[:, :20] = 2  # weed
    cls[:, 40:] = 0  # soil, with one weed pixel: no stand to score
    cls[10, 50] = 2
    src = write_mask(tmp_path / "classes.tif", cls, transform=T)
    x0, y0 = 500000.0, 4900000.0
    g = gpd.GeoDataFrame({"name": ["weedy", "crop", "bare"]}, crs=32615, geometry=[
        shapely.box(x0 + 0.1, y0 - 1.9, x0 + 0.9, y0 - 0.1),
        shapely.box(x0 + 1.1, y0 - 1.9, x0 + 1.9, y0 - 0.1),
        shapely.box(x0 + 2.1, y0 - 1.9, x0 + 2.9, y0 - 0.1)])
    g.to_file(tmp_path / "f.gpkg", engine="pyogrio")
    with rasterio.open(src) as ds:
        grid = Grid(ds.shape, ds.transform, ds.crs)
    s = summarize_fields(read_fields(tmp_path / "f.gpkg", grid), src, DEFAULT_CLASSES)
    s = s.set_index("field_id")
    assert s.loc["weedy", "health_score"] == 0 and s.loc["weedy", "rank"] == 1
    assert np.isnan(s.loc["weedy", "disease_incidence_pct"])  # no crop: no incidence
    assert s.loc["crop", "health_score"] == 100
    assert s.loc["bare", "weed_pressure_pct"] == 100 and np.isnan(s.loc["bare", "health_score"])
    assert pd.isna(s.loc["bare", "rank"])


def test_default_id_column_prefers_names_to_measurements(tmp_path: Path) -> None:
    """A unique area column beside duplicated names made the ids 100, 40, ...; a generated KML
    id came before its names; blank text counted as an id."""
    x0, y0 = 500000.0, 4900000.0
    boxes = [shapely.box(x0 + i, y0 - 1, x0 + i + 0.5, y0 - 0.5) for i in range(3)]
    grid = Grid((40, 80), Affine(0.05, 0, x0, 0, -0.05, y0), CRS.from_epsg(32615))

    def pick(**columns: list[object]) -> str:
        path = tmp_path / "f.gpkg"
        gpd.GeoDataFrame(columns, geometry=boxes, crs=32615).to_file(path, engine="pyogrio")
        return read_fields(path, grid).id_column

    assert pick(area=[100.5, 40.2, 36.1], name=["A", "A", "B"], n=[7, 8, 9]) == "n"
    assert pick(id=["f.1", "f.2", "f.3"], Name=["north", "south", "east"]) == "Name"
    assert pick(label=["a", " ", "c"], plot=[3.0, 1.0, 2.0]) == "plot"
    assert pick(area=[100.5, 40.2, 36.1]) == "(row number)"


def test_custom_classes_take_their_roles(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A 'sugarbeet' class counted as no crop: every weed pixel made 100 % weed pressure."""
    from agriseg.classes import ClassSchema, SegClass

    cls = np.ones((40, 40), np.uint8)  # sugarbeet
    cls[:4, :] = 2  # weed: 10 %
    cls[20:, :] = 0  # background
    src = write_mask(tmp_path / "classes.tif", cls, transform=T)
    x0, y0 = 500000.0, 4900000.0
    g = gpd.GeoDataFrame({"name": ["f"]}, crs=32615,
                         geometry=[shapely.box(x0 + 0.01, y0 - 1.99, x0 + 1.99, y0 - 0.01)])
    g.to_file(tmp_path / "f.gpkg", engine="pyogrio")
    with rasterio.open(src) as ds:
        grid = Grid(ds.shape, ds.transform, ds.crs)
    fs = read_fields(tmp_path / "f.gpkg", grid)

    def schema(role: str | None) -> ClassSchema:
        return ClassSchema((SegClass(0, "background", (120, 90, 60), role="soil"),
                            SegClass(1, "sugarbeet", (0, 200, 0), role=role),
                            SegClass(2, "weed", (255, 0, 255), at_risk=True)))

    row = summarize_fields(fs, src, schema("crop")).iloc[0]
    assert row["weed_pressure_pct"] == pytest.approx(20.0)  # 4 of 20 plant rows
    assert row["vegetation_pct"] == pytest.approx(50.0) and row["health_score"] > 0
    with caplog.at_level("WARNING", logger="agriseg.fields"):
        row = summarize_fields(fs, src, schema(None)).iloc[0]
    assert np.isnan(row["weed_pressure_pct"]) and np.isnan(row["health_score"])
    assert "none plays the crop" in caplog.text
    # A class without a role (water, shadow) is no vegetation: only the weed rows are.
    assert row["vegetation_pct"] == pytest.approx(10.0)


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"name": "ignore"}, "other than 'ignore'"),
    ({"name": "a,b"}, "without ','"),
    ({"color": (0, 0, 300)}, "three values 0-255"),
    ({"role": "tree"}, "not one of soil, crop, weed, disease"),
])
def test_class_entries_are_checked(kwargs: dict[str, object], needle: str) -> None:
    from agriseg.classes import SegClass
    from agriseg.errors import ConfigError

    with pytest.raises(ConfigError, match=needle):
        SegClass(**{"value": 0, "name": "x", "color": (1, 2, 3), **kwargs})  # type: ignore[arg-type]


def test_a_folder_of_shapefiles(tmp_path: Path) -> None:
    """GDAL opens a folder of Shapefiles as one source: --fields takes it (click refused)."""
    from click.testing import CliRunner

    from agriseg.cli import main

    folder = tmp_path / "shp"
    folder.mkdir()
    gpd.read_file(LAMBERTON_PLOTS).iloc[:3].to_file(folder / "plots.shp")
    with rasterio.open(LAMBERTON) as ds:
        grid = Grid(ds.shape, ds.transform, ds.crs)
    assert len(read_fields(folder, grid).fields) == 3
    r = CliRunner().invoke(main, ["run", "--help"])
    assert "a folder of them" in " ".join(r.output.split())


@pytest.mark.filterwarnings("ignore:'crs' was not provided")
def test_a_layer_without_crs_in_a_folder_is_named(tmp_path: Path) -> None:
    """The error named the folder, and its ogr2ogr example converted the folder's first layer."""
    folder = tmp_path / "shpdir"
    folder.mkdir()
    plots = gpd.read_file(LAMBERTON_PLOTS).iloc[:3]
    plots.set_crs(None, allow_override=True).to_file(folder / "f_nocrs.shp")
    plots.to_file(folder / "f_shp.shp")
    with rasterio.open(LAMBERTON) as ds:
        grid = Grid(ds.shape, ds.transform, ds.crs)
    nocrs = os.fspath(folder / "f_nocrs.shp")
    with pytest.raises(VectorError) as err:
        read_fields(folder, grid, layer="f_nocrs")
    msg = str(err.value)
    assert f"layer 'f_nocrs' ({nocrs}) has no CRS" in msg
    assert f"ogr2ogr -a_srs EPSG:4326 fixed.gpkg {nocrs} " in msg and "EPSG:32615" in msg
    # one file: named as before
    with pytest.raises(VectorError, match=r"f_nocrs.shp: has no CRS"):
        read_fields(folder / "f_nocrs.shp", grid)


def test_a_raster_given_as_fields_is_named_a_raster(tmp_path: Path) -> None:
    grid = Grid((10, 10), T, rasterio.crs.CRS.from_epsg(32615))
    src = write_mask(tmp_path / "c.tif", np.zeros((20, 20), np.uint8), transform=T)
    with pytest.raises(VectorError, match=r"is a raster \(GTiff, 20x20 px, 1 band\(s\)\), not a "
                                          r"vector file; --fields wants the field polygons"):
        read_fields(src, grid)


def test_duplicate_ids_are_named_when_fields_are_numbered(tmp_path: Path) -> None:
    grid = Grid((400, 360), T, rasterio.crs.CRS.from_epsg(32615))
    boxes = [shapely.box(500001 + 3 * i, 4899990, 500002 + 3 * i, 4899995) for i in range(4)]
    g = gpd.GeoDataFrame({"field_id": ["A", "B", "A", "A"], "area": [1.5, 1.5, 2.0, 2.5]},
                         geometry=boxes, crs=32615)
    g.to_file(tmp_path / "dup.gpkg")
    fs = read_fields(tmp_path / "dup.gpkg", grid)
    assert fs.id_column == "(row number)"
    (note,) = fs.notes
    assert "no column with unique values (column 'field_id' has duplicate values (e.g. 'A' x3))"\
        in note and "numbered 1..4" in note
