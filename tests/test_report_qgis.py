"""Report, styles and QGIS project: opened by real QGIS and real Chromium where installed."""

from __future__ import annotations

import io
import json
import shutil
import sqlite3
import subprocess
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
from PIL import Image
from rasterio.crs import CRS
from rasterio.windows import Window

from agriseg.classes import DEFAULT_CLASSES, DISEASE, WEED
from agriseg.config import build_run_config
from agriseg.fields import read_fields, summarize_fields, write_fields
from agriseg.grid import Grid
from agriseg.qgis import (
    ProjectLayer,
    class_qml,
    fields_qml,
    rgb_qml,
    write_gpkg_style,
    write_project,
    write_ramp_qml,
    zone_ids_qml,
    zones_qml,
)
from agriseg.quicklook import colour_stretch, to_rgba
from agriseg.raster import open_survey
from agriseg.report import _read_image, write_report
from agriseg.survey import process_survey
from agriseg.vectorize import ZoneParams, vectorize_zones, write_zones
from tests.conftest import toy_field, write_rgba
from tests.test_vectorize import UTM_T, write_mask

TOOLS = Path("/work/shared/tools")
if not TOOLS.exists():
    TOOLS = Path(__file__).resolve().parents[2] / "shared" / "tools"
QGIS_CHECK = TOOLS / "qgis_check.py"


def _has_qgis() -> bool:
    try:
        r = subprocess.run(["/usr/bin/python3", "-c", "import qgis.core"], capture_output=True,
                           timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0 and QGIS_CHECK.exists()


needs_qgis = pytest.mark.skipif(not _has_qgis(), reason="python3-qgis not installed")


def _qgis_check(paths: list[Path], png: Path) -> str:
    r = subprocess.run(["/usr/bin/python3", str(QGIS_CHECK), "--expect-styled", "--png",
                        str(png), *map(str, paths)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def _not_blank(png: Path) -> float:
    a = np.asarray(Image.open(png).convert("RGB"), dtype=np.float32)
    return float(a.std())


@pytest.fixture()
def outputs(tmp_path: Path) -> dict[str, object]:
    """A small survey's outputs written by the library functions (zones guaranteed)."""
    h, w = 240, 320
    yy, xx = np.mgrid[0:h, 0:w]
    cls = np.where(np.sin(xx / 5.0) > 0, 1, 0).astype(np.uint8)
    cls[(yy - 60) ** 2 + (xx - 80) ** 2 < 20**2] = WEED
    cls[150:190, 200:260] = DISEASE
    cls[:, :8] = 255
    out = tmp_path / "out"
    out.mkdir()
    write_mask(out / "classes.tif", cls)
    conf = np.full((h, w), 90, np.uint8)
    conf[cls == 255] = 255
    write_ramp_qml(write_mask(out / "confidence.tif", conf), 0, 100, "confidence")
    rgb = np.stack([np.where(cls == 1, 60, 150), np.where(cls == 1, 150, 120),
                    np.full((h, w), 70)]).astype(np.uint8)
    img = write_rgba(tmp_path / "input.tif", rgb, cls != 255, transform=UTM_T)
    (out / "classes.qml").write_text(class_qml(DEFAULT_CLASSES))
    x0, y0 = UTM_T.c, UTM_T.f
    fields = gpd.GeoDataFrame(
        {"plot": ["north", "south"]},
        geometry=[shapely.box(x0 + 1, y0 - 6, x0 + 15, y0 - 0.5),
                  shapely.box(x0 + 1, y0 - 11.5, x0 + 15, y0 - 6)], crs=32615)
    fields.to_file(tmp_path / "fields.geojson")
    grid = Grid((h, w), UTM_T, CRS.from_epsg(32615))
    fs = read_fields(tmp_path / "fields.geojson", grid)
    zones = vectorize_zones(out / "classes.tif", DEFAULT_CLASSES, ZoneParams(min_area_m2=0.1),
                            confidence_tif=out / "confidence.tif", fields=fs.fields,
                            zone_raster=out / "zone_ids.tif")
    write_zones(zones, out / "zones.gpkg")
    write_gpkg_style(out / "zones.gpkg", "zones", zones_qml(DEFAULT_CLASSES))
    (out / "zone_ids.qml").write_text(
        zone_ids_qml(dict(zip(zones["zone_id"], zones["class"], strict=True)), DEFAULT_CLASSES))
    summary = summarize_fields(fs, out / "classes.tif", DEFAULT_CLASSES, zones=zones)
    write_fields(summary, out / "fields.gpkg", out / "fields.csv")
    write_gpkg_style(out / "fields.gpkg", "fields", fields_qml())
    return {"out": out, "image": img, "zones": zones, "summary": summary, "grid": grid}


def test_layer_styles_rows(outputs: dict[str, object]) -> None:
    out = outputs["out"]
    assert isinstance(out, Path)
    with sqlite3.connect(out / "zones.gpkg") as con:
        rows = con.execute("SELECT f_table_catalog, f_table_schema, f_table_name, "
                           "f_geometry_column, useAsDefault, styleQML FROM layer_styles").fetchall()
    assert len(rows) == 1
    cat, schema, table, geom, default, qml = rows[0]
    assert (cat, schema, table, geom, default) == ("", "", "zones", "geom", 1)
    assert 'type="categorizedSymbol"' in qml and 'value="weed"' in qml
    # the styles table does not get in the way of reading the data
    assert len(gpd.read_file(out / "zones.gpkg", layer="zones")) == 2


def _project(outputs: dict[str, object]) -> Path:
    out, grid = outputs["out"], outputs["grid"]
    assert isinstance(out, Path) and isinstance(grid, Grid)
    layers = [
        ProjectLayer(Path("zones.gpkg"), "zones", zones_qml(DEFAULT_CLASSES), layer="zones"),
        ProjectLayer(Path("fields.gpkg"), "fields", fields_qml(), layer="fields"),
        ProjectLayer(Path("zone_ids.tif"), "zone ids", (out / "zone_ids.qml").read_text(),
                     visible=False),
        ProjectLayer(Path("classes.tif"), "classes", class_qml(DEFAULT_CLASSES), opacity=0.7),
        ProjectLayer(Path(str(outputs["image"])), "input image", rgb_qml(1, 2, 3, 4),
                     group="base"),
    ]
    return write_project(out / "project.qgs", layers, grid.crs.to_wkt(), "EPSG:32615",
                         grid.bounds)


def test_project_paths_and_order(outputs: dict[str, object]) -> None:
    text = _project(outputs).read_text()
    assert "<datasource>./classes.tif</datasource>" in text
    # the input outside out/: absolute, so the results folder can be moved
    assert f"<datasource>{(outputs['out'] / '..' / 'input.tif').resolve()}</datasource>" in text
    assert "./zones.gpkg|layername=zones" in text
    assert text.index("name=\"zones\"") < text.index("name=\"classes\"") < text.index(
        "name=\"input image\"")
    assert 'checked="Qt::Unchecked"' in text and 'opacity="0.7"' in text


@needs_qgis
def test_qgis_opens_every_output_and_project(outputs: dict[str, object], tmp_path: Path) -> None:
    _project(outputs)
    png = tmp_path / "map.png"
    report = _qgis_check([outputs["out"]], png)  # type: ignore[list-item]
    assert "0 failed" in report and "project.qgs" in report
    assert "categorizedSymbol" in report and "RuleRenderer" in report
    assert _not_blank(png) > 10


@pytest.mark.slow
def test_report_renders_in_chromium(outputs: dict[str, object], tmp_path: Path) -> None:
    if shutil.which("chromium") is None:
        pytest.skip("chromium not installed (apt-get install -y chromium)")
    out = outputs["out"]
    assert isinstance(out, Path)
    html = write_report(out / "report.html", str(outputs["image"]), {"red": 1, "green": 2,
                        "blue": 3, "alpha": 4}, out / "classes.tif", DEFAULT_CLASSES,
                        outputs["summary"], outputs["zones"], {"tile_size": 1024},
                        ("exg",), ("a note",))
    text = html.read_text()
    assert "http://" not in text.replace("http://www.w3.org", "") and "<script" not in text
    assert text.count("data:image/png;base64,") >= 4
    png = tmp_path / "report.png"
    subprocess.run([str(TOOLS / "screenshot.sh"), str(html), str(png), "1280", "2400"],
                   check=True, timeout=180)
    assert _not_blank(png) > 10


def test_report_escapes_field_ids(outputs: dict[str, object]) -> None:
    """Field ids come from the user's file: markup in them must stay text in the report."""
    out = outputs["out"]
    assert isinstance(out, Path)
    summary = outputs["summary"].copy()  # type: ignore[attr-defined]
    summary["field_id"] = ["<script>alert(1)</script>", 'Feld "Süd" & Nord']
    page = write_report(out / "report.html", str(outputs["image"]), {"red": 1, "green": 2,
                        "blue": 3, "alpha": 4}, out / "classes.tif", DEFAULT_CLASSES,
                        summary, outputs["zones"], {"tile_size": 1024}, ("exg",), ())
    text = page.read_text()
    assert "<script" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "Feld &quot;Süd&quot; &amp; Nord" in text


def test_report_names_a_models_own_classes(outputs: dict[str, object]) -> None:
    """Field captions read the weed and disease shares of the classes playing those roles
    (a model's "weed/grass" showed "weed - %"), and zones outside every field show "-", not
    nan."""
    from dataclasses import replace

    from agriseg.classes import ClassSchema

    out = outputs["out"]
    assert isinstance(out, Path)
    names = {"weed": "weed/grass", "disease": "Cercospora"}
    schema = ClassSchema(tuple(replace(c, name=names.get(c.name, c.name))
                               for c in DEFAULT_CLASSES.classes))
    summary = outputs["summary"].rename(  # type: ignore[attr-defined]
        columns={f"{k}_pct": f"{v}_pct" for k, v in names.items()})
    zones = outputs["zones"].copy()  # type: ignore[attr-defined]
    zones["field_id"] = None
    page = write_report(out / "report.html", str(outputs["image"]), {"red": 1, "green": 2,
                        "blue": 3, "alpha": 4}, out / "classes.tif", schema,
                        summary, zones, {"tile_size": 1024}, ("exg",), ())
    text = page.read_text()
    first = summary.iloc[0]
    assert f"weed/grass {first['weed/grass_pct']:.1f} %" in text
    assert "weed - %" not in text and ">nan<" not in text


def test_whole_survey_map_from_the_cached_overview(outputs: dict[str, object]) -> None:
    # The run hands the report its SurveyRaster: the whole-survey map then comes from the
    # overview read for the model's prepare, and must match a fresh GDAL read.
    survey = open_survey(str(outputs["image"]))
    roles = survey.roles.as_dict()
    shape = survey.grid.shape_yx
    fresh, _ = _read_image(str(outputs["image"]), roles, None, shape)
    cached, stretch = _read_image(survey, roles, None, shape)
    assert cached.shape == fresh.shape
    np.testing.assert_array_equal(cached[..., 3], fresh[..., 3])
    shown = fresh[..., 3] > 0  # colours under nodata are transparent either way
    np.testing.assert_allclose(cached[shown], fresh[shown], atol=1e-5)
    # A field map drawn with the survey's stretch shows its pixels in the overview's colours
    # (a stretch per band, or per field, changed them: beige soil came out lavender).
    window = Window(0, 0, shape[1], shape[0])
    field, same = _read_image(survey, roles, window, shape, stretch)
    assert same == stretch
    np.testing.assert_allclose(field[shown], cached[shown], atol=1e-5)
    # A smaller map gets exactly the size asked for, as from GDAL.
    half = (shape[0] // 2, shape[1] // 3)
    assert _read_image(survey, roles, None, half)[0].shape == (*half, 4)


def test_one_stretch_keeps_the_colour_balance() -> None:
    beige = np.array([200.0, 180.0, 150.0])
    leaf = np.array([60.0, 120.0, 40.0])
    data = np.stack([np.full((4, 4), c) for c in beige])
    data[:, :2] = leaf[:, None, None]
    valid = np.ones((4, 4), bool)
    rgba = to_rgba(data, valid, colour_stretch(data, valid))
    soil = rgba[3, 0, :3]
    assert soil[0] > soil[1] > soil[2]  # still beige: red > green > blue


def test_field_window_mean_equals_the_area_mean_of_valid_pixels(tmp_path: Path) -> None:
    """The field maps' own averaged read (files without overviews): strips, ragged cells."""
    from agriseg.report import _window_mean
    from tests.conftest import toy_field

    rgb, valid = toy_field(700, 530)
    path = write_rgba(tmp_path / "f.tif", rgb, valid, block=64)  # strips of four block rows
    win, shape = Window(37, 11, 480, 650), (47, 31)
    with rasterio.open(path) as ds:
        mean, ok = _window_mean(ds, [1, 2, 3], 4, win, shape)
    px = rgb[:, 11:661, 37:517].astype(np.float64)
    v = valid[11:661, 37:517]
    rows = np.arange(shape[0] + 1) * 650 // shape[0]
    cols = np.arange(shape[1] + 1) * 480 // shape[1]
    for i in range(shape[0]):
        for j in range(shape[1]):
            cell = (slice(rows[i], rows[i + 1]), slice(cols[j], cols[j + 1]))
            assert ok[i, j] == v[cell].any()
            if ok[i, j]:
                want = px[(slice(None), *cell)][:, v[cell]].mean(axis=1)
                np.testing.assert_allclose(mean[:, i, j], want, rtol=1e-6)

def test_run_writes_every_output(rgba_tif: Path, tmp_path: Path, scheduler: str) -> None:
    x0, y0 = 500000.0, 4900000.0
    fields = gpd.GeoDataFrame(
        {"name": ["a", "b", "off"]},
        geometry=[shapely.box(x0 + 0.5, y0 - 3, x0 + 2.5, y0 - 0.5),
                  shapely.box(x0 + 2.5, y0 - 5.5, x0 + 5, y0 - 3),
                  shapely.box(x0 + 50, y0 - 3, x0 + 52, y0 - 1)], crs=32615).to_crs(4326)
    fields.to_file(tmp_path / "plots.geojson")
    cfg = build_run_config(input=rgba_tif, out=tmp_path / "o", scheduler=scheduler,
                           tile_size=64, fields=tmp_path / "plots.geojson")
    res = process_survey(cfg)
    for name in ("fields", "fields_csv", "report", "project", "classes", "indices/exg"):
        assert res.outputs[name].exists(), name
    summary = gpd.read_file(res.outputs["fields"], layer="fields").set_index("field_id")
    assert summary.loc["off", "status"] == "outside raster"
    assert summary.loc["a", "covered_pct"] > 50
    manifest = json.loads((res.out_dir / "run.json").read_text())
    assert manifest["fields"]["count"] == 3 and "outside raster" in " ".join(
        manifest["fields"]["notes"])
    assert "zones" in manifest
    qgs = res.outputs["project"].read_text()
    assert f">{(res.out_dir / '..' / 'field.tif').resolve()}<" in qgs and "./classes.tif" in qgs
    if _has_qgis():
        _qgis_check([res.out_dir], tmp_path / "run.png")


def test_report_line_on_crop_rows() -> None:
    from agriseg.postprocess import rows_text

    two = {"detected": True, "angle_deg": 90.0, "spacing_m": 0.7611,
           "orientations": [{"angle_deg": 90.0, "share": 0.6}, {"angle_deg": 0.51, "share": 0.4}]}
    assert rows_text(two) == ("90.0 deg from east, 0.76 m apart; other fields: 0.5 deg on 40% "
                              "of the survey")
    assert rows_text({"detected": False, "reason": "GSD too coarse"}).startswith(
        "not found (GSD too coarse)")


def test_report_line_on_the_vegetation_rule() -> None:
    from agriseg.postprocess import vegetation_text

    info = {"index": "exg", "veg_threshold": 0.1071, "veg_threshold_method": "soil mode 0.010",
            "green_path": {"used": True, "ngrdi_threshold": 0.02},
            "appearance": {"used": False, "reason": "too few pseudo-labelled pixels"}}
    assert vegetation_text(info) == (
        "ExG > 0.107 (soil mode 0.010); or (G-R)/(G+R) > 0.020 where G > B; no crop/weed "
        "colour table (too few pseudo-labelled pixels)")
    assert vegetation_text({"threshold": 0.3}) is None  # a model without such a rule


def test_project_shows_16_bit_imagery_in_colour(tmp_path: Path, scheduler: str) -> None:
    """QGIS draws 16-bit bands without a contrast enhancement modulo 256: noise."""
    rgb, valid = toy_field(96, 96)
    raw = (rgb * 40).astype(np.uint16)  # reflectance x 10000, like a multispectral export
    raw[:, ~valid] = 0  # an orthomosaic's undeclared black fill
    src = tmp_path / "u16.tif"
    with rasterio.open(src, "w", driver="GTiff", width=96, height=96, count=3, dtype="uint16",
                       crs="EPSG:32615", transform=UTM_T) as dst:
        dst.write(raw)
    cfg = build_run_config(input=src, out=tmp_path / "o", scheduler=scheduler,
                           skip=["zones", "fields", "report", "quicklook"])
    qgs = process_survey(cfg).outputs["project"].read_text()
    image = qgs[qgs.index('name="input image"'):]
    lo, hi = np.percentile(raw[:, valid], [1, 99.5])
    for band in ("red", "green", "blue"):  # one range for all three: the colours stay
        entry = (f"<{band}ContrastEnhancement><minValue>{lo:.6g}</minValue><maxValue>"
                 f"{hi:.6g}</maxValue>")
        assert entry in image, image[:2000]
    assert 'pixelListEntry red="0" green="0" blue="0" percentTransparent="100"' in image
    if _has_qgis():
        assert "0 failed" in _qgis_check([tmp_path / "o" / "project.qgs"], tmp_path / "p.png")


def test_skipped_zones_are_not_reported_as_none(rgba_tif: Path, tmp_path: Path,
                                                scheduler: str) -> None:
    """`--skip zones` printed "0 zones" in the report and the field table, as if found."""
    import csv

    cfg = build_run_config(input=rgba_tif, out=tmp_path / "o", scheduler=scheduler,
                           skip=["zones", "quicklook", "project"], indices=False)
    res = process_survey(cfg)
    with open(res.outputs["fields_csv"], encoding="utf-8-sig") as fh:
        (row,) = csv.DictReader(fh)
    assert row["zones"] == ""
    page = res.outputs["report"].read_text()
    assert "not computed" in page


def test_field_maps_leave_an_undeclared_black_fill_transparent(tmp_path: Path) -> None:
    rgb, valid = toy_field(64, 64)
    raw = (rgb * 40).astype(np.uint16)
    raw[:, ~valid] = 0
    src = tmp_path / "u16.tif"
    with rasterio.open(src, "w", driver="GTiff", width=64, height=64, count=3, dtype="uint16",
                       crs="EPSG:32615", transform=UTM_T) as dst:
        dst.write(raw)
    survey = open_survey(str(src))
    assert survey.mask_source == "black"
    roles = survey.roles.as_dict()
    field, _ = _read_image(survey, roles, Window(0, 0, 64, 64), (64, 64))
    np.testing.assert_array_equal(field[..., 3] > 0, valid)  # GDAL's mask said all valid


def test_long_field_ids_are_cut_in_the_middle() -> None:
    from agriseg.report import LABEL_CHARS, _label

    a, b = _label("Plot 7 north " + "x" * 40 + " A"), _label("Plot 7 north " + "x" * 40 + " B")
    assert len(a) == LABEL_CHARS and a != b and a.startswith("Plot 7") and a.endswith(" A")
    assert _label("short") == "short"


def test_dollar_signs_in_labels_are_drawn_as_written() -> None:
    """A field id or class name with a TeX command between dollars ended the run in
    Matplotlib's mathtext parser (the report and quick look are drawn from such labels)."""
    from matplotlib.figure import Figure

    from agriseg.report import _label

    fig = Figure()
    ax = fig.subplots()
    ax.set_yticks([0, 1], [_label("Plot $\\frac$"), _label("cost $5 to $7")])
    ax.set_title(_label("a$_$b"))
    fig.savefig(io.BytesIO(), format="png")  # raised ValueError before
    assert _label("cost $5 to $7") == "cost \\$5 to \\$7"


def test_fields_style_covers_a_perfect_score() -> None:
    """A field scoring exactly 100 fell outside '>= 80 AND < 100' into the grey 'no score'."""
    qml = fields_qml()
    assert '&lt; 100.0001' in qml or "< 100.0001" in qml
