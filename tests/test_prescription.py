"""``agriseg prescription`` on real (tiny) run folders: outputs, damaged runs, options."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from affine import Affine
from click.testing import CliRunner, Result

from agriseg.classes import DEFAULT_CLASSES, DISEASE, WEED
from agriseg.cli import main
from agriseg.errors import OutputError
from agriseg.prescription import MAX_CELLS, _cell_count, smallest_grid, write_prescription
from agriseg.vectorize import ZoneParams, vectorize_zones, write_zones

UTM_T = Affine(0.05, 0, 500000.0, 0, -0.05, 4900000.0)  # 5 cm pixels


def _mask(path: Path, arr: np.ndarray) -> Path:
    with rasterio.open(path, "w", driver="GTiff", width=arr.shape[1], height=arr.shape[0],
                       count=1, dtype=arr.dtype, crs="EPSG:32615", transform=UTM_T,
                       nodata=255) as dst:
        dst.write(arr, 1)
    return path


@pytest.fixture()
def run(tmp_path: Path) -> Path:
    """A finished run's folder: 20 m x 20 m, one weed zone in the first 10 m cell, one
    disease zone in the last."""
    cls = np.ones((400, 400), np.uint8)
    cls[10:60, 10:60] = WEED
    cls[300:340, 300:340] = DISEASE
    out = tmp_path / "run"
    out.mkdir()
    _mask(out / "classes.tif", cls)
    zones = vectorize_zones(out / "classes.tif", DEFAULT_CLASSES, ZoneParams(min_area_m2=0))
    write_zones(zones, out / "zones.gpkg")
    (out / "run.json").write_text(json.dumps({"schema": DEFAULT_CLASSES.to_dict(),
                                              "parameters": {"skip": []}}))
    return out


def _rx(*args: str) -> Result:
    return CliRunner().invoke(main, ["prescription", *args])


def _refused(r: Result, needle: str) -> None:
    assert r.exit_code == 2 and needle in r.output, r.output
    assert "Traceback" not in r.output


def _rates(path: Path) -> list[tuple[str, float]]:
    gdf = gpd.read_file(path, layer=path.stem)
    return sorted(zip(gdf["class"], gdf["RATE"], strict=True))


# --- 1. output paths -------------------------------------------------------------------------

@pytest.mark.parametrize(("out", "needle"), [
    ("missing/deeper/rx.shp", "folder does not exist"),
    ("run/run.json/rx.shp", "is not a folder"),
    ("rx.txt", "write a .shp or .gpkg"),
    ("", "is empty; give a path"),
])
def test_bad_out_is_refused_before_any_work(run: Path, out: str, needle: str) -> None:
    (run / "classes.tif").write_text("not a raster")  # --grid would fail on it: checked first
    target = str(run.parent / out) if out else out
    _refused(_rx(str(run), "--rate", "weed=1", "--grid", "10", "--out", target), needle)
    assert not (run.parent / "missing").exists()  # no folder tree made for a typo


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_out_in_a_folder_that_takes_no_files(run: Path) -> None:
    _refused(_rx(str(run), "--rate", "weed=1", "--out", "/proc/rx.shp"), "cannot write there")


@pytest.mark.skipif(sys.platform == "win32" or os.geteuid() == 0,
                    reason="root writes into read-only folders")
def test_out_in_a_read_only_folder(run: Path, tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        _refused(_rx(str(run), "--rate", "weed=1", "--out", str(ro / "rx.shp")),
                 "cannot write there")
    finally:
        ro.chmod(0o755)


def test_write_prescription_makes_no_folders(run: Path, tmp_path: Path) -> None:
    zones = gpd.read_file(run / "zones.gpkg", layer="zones").assign(RATE=1.0)
    with pytest.raises(OutputError, match="cannot write the prescription"):
        write_prescription(zones, tmp_path / "nope" / "rx.gpkg")
    assert not (tmp_path / "nope").exists()


# --- 2. --overwrite replaces every file of a Shapefile ---------------------------------------

def test_overwrite_removes_the_old_shapefiles_sidecars(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "rx.shp"
    assert _rx(str(run), "--rate", "weed=1", "--out", str(out)).exit_code == 0
    stale = ["rx.qix", "rx.sbn", "rx.sbx", "rx.shp.xml", "rx.QIX", "rx.qmd"]
    for name in [*stale, "rx.backup.shp", "rx2.qix"]:
        (tmp_path / name).write_text("old")
    r = _rx(str(run), "--rate", "weed=3", "--out", str(out), "--overwrite")
    assert r.exit_code == 0, r.output
    assert not [n for n in stale if (tmp_path / n).exists()]
    assert (tmp_path / "rx.backup.shp").exists() and (tmp_path / "rx2.qix").exists()
    assert _rates(out) == [("weed", 3.0)] and (tmp_path / "rx.qml").exists()
    assert not list(tmp_path.glob(".rx.*"))  # no temporary folder left


def test_sidecars_of_a_removed_shapefile_need_overwrite(run: Path, tmp_path: Path) -> None:
    (tmp_path / "rx.qix").write_text("old")  # QGIS would use it for the new rx.shp
    out = str(tmp_path / "rx.shp")
    _refused(_rx(str(run), "--rate", "weed=1", "--out", out), "rx.qix")
    assert _rx(str(run), "--rate", "weed=1", "--out", out, "--overwrite").exit_code == 0
    assert not (tmp_path / "rx.qix").exists()


@pytest.mark.parametrize(("name", "clash"), [
    ("classes.shp", "classes.qml"),    # the class mask's style
    ("zones.gpkg", "zones.gpkg"),      # the run's zones, even with --overwrite
    ("Fields.GPKG", "Fields.gpkg"),    # any case: a case-insensitive file system
    ("indices/exg.shp", "exg.qml"),    # an output run.json lists, in a subfolder
])
def test_the_runs_own_files_are_never_replaced(run: Path, name: str, clash: str) -> None:
    (run / "indices").mkdir()
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, "outputs": {"x": "indices/exg.tif"}}))
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    r = _rx(str(run), "--rate", "weed=1", "--grid", "10", "--out", str(run / name),
            "--overwrite")
    _refused(r, f"would replace the run's own {clash}")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_rates_of_classes_the_run_could_not_find_are_noted(run: Path, tmp_path: Path) -> None:
    """No rows (no weeds separated) or satellite pixels: an all-zero weed map read as
    'no weeds anywhere'."""
    info = json.loads((run / "run.json").read_text())
    info["model"] = {"prepared": {"rows": {"detected": False, "reason": "GSD too coarse"}}}
    (run / "run.json").write_text(json.dumps(info))
    r = _rx(str(run), "--rate", "weed=1,disease=2", "--grid", "10", "--out",
            str(tmp_path / "rx.gpkg"))
    assert r.exit_code == 0 and "could not find weed, disease" in r.output, r.output


def test_upper_case_extension_reports_the_file_written(run: Path, tmp_path: Path) -> None:
    r = _rx(str(run), "--rate", "weed=1", "--out", str(tmp_path / "RX.SHP"))
    assert r.exit_code == 0, r.output
    assert f"wrote {tmp_path / 'RX.shp'}:" in r.output and (tmp_path / "RX.shp").exists()


# --- 3. damaged or foreign run folders -------------------------------------------------------

def _zones_without(run: Path, column: str | None, layer: str = "zones") -> None:
    zones = gpd.read_file(run / "zones.gpkg", layer="zones")
    (run / "zones.gpkg").unlink()
    zones.drop(columns=[column] if column else []).to_file(run / "zones.gpkg", layer=layer)


@pytest.mark.parametrize(("damage", "grid", "needle"), [
    (lambda r: (r / "run.json").write_text("{not json"), False, "run.json: cannot read it"),
    (lambda r: (r / "run.json").write_text(""), False, "run.json: cannot read it"),
    (lambda r: (r / "run.json").write_text("[1, 2]"), False, "holds a JSON list"),
    (lambda r: (r / "run.json").write_text('{"schema": [1]}'), False, "class schema"),
    (lambda r: (r / "classes.tif").write_text("junk"), True, "classes.tif: cannot read it"),
    (lambda r: (r / "zones.gpkg").write_text("junk"), False, "zones.gpkg: cannot read"),
    (lambda r: _zones_without(r, None, layer="other"), False, "zones.gpkg: cannot read"),
    (lambda r: _zones_without(r, "area_m2"), False, "has no area_m2 column"),
])
def test_damaged_run_folder_names_the_file(run: Path, damage: object, grid: bool,
                                           needle: str) -> None:
    damage(run)  # type: ignore[operator]
    _refused(_rx(str(run), "--rate", "weed=1", *(["--grid", "10"] if grid else [])), needle)
    assert not (run / "prescription.shp").exists()


def test_unfinished_run_is_refused(run: Path) -> None:
    (run / "run.json").unlink()
    (run / ".agriseg-work").mkdir()  # what a stopped run leaves
    _refused(_rx(str(run), "--rate", "weed=1", "--grid", "10"), "not a finished agriseg run")
    (run / ".agriseg-work").rmdir()
    (run / "zones.gpkg").unlink()  # not "the run found no at-risk zones": it has not said
    _refused(_rx(str(run), "--rate", "weed=1"), "not a finished agriseg run")


# --- 4. --crs --------------------------------------------------------------------------------

@pytest.mark.parametrize("crs", ["EPSG:5703", "EPSG:4978", "EPSG:4979", "EPSG:5972"])
def test_crs_must_be_a_2d_map_crs(run: Path, crs: str) -> None:
    # vertical, geocentric, geographic 3D, projected + height
    _refused(_rx(str(run), "--rate", "weed=1", "--crs", crs), "not a 2D geographic or projected")
    assert not (run / "prescription.shp").exists()


def test_projected_crs_is_taken(run: Path) -> None:
    r = _rx(str(run), "--rate", "weed=1", "--crs", "EPSG:32615")
    assert r.exit_code == 0, r.output
    assert gpd.read_file(run / "prescription.shp").crs.to_epsg() == 32615


# --- 5-7. rates per zone and per cell --------------------------------------------------------

def test_rate_zero_leaves_zones_out_and_says_so(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "rx.gpkg"
    r = _rx(str(run), "--rate", "weed=0,disease=1", "--out", str(out))
    assert r.exit_code == 0, r.output
    assert "no zone of weed" not in r.output and "rate 0 for weed" in r.output
    assert _rates(out) == [("disease", 1.0)]
    r = _rx(str(run), "--rate", "weed=0", "--out", str(tmp_path / "none.gpkg"))
    _refused(r, "zones of weed have rate 0")
    assert "no zone of weed" not in r.output and not (tmp_path / "none.gpkg").exists()


def test_base_rate_is_for_grid_cells_only(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "rx.gpkg"
    r = _rx(str(run), "--rate", "disease=1", "--base-rate", "0.5", "--out", str(out))
    assert r.exit_code == 0 and "--base-rate is for --grid cells" in r.output, r.output
    assert _rates(out) == [("disease", 1.0)]  # the weed zone is not written at 0.5
    # per cell, a class's rate applies even below the base rate (README: "the highest rate
    # of the classes covering ..., others --base-rate")
    grid = tmp_path / "grid.gpkg"
    r = _rx(str(run), "--rate", "weed=0.2", "--base-rate", "2", "--grid", "10",
            "--out", str(grid))
    assert r.exit_code == 0, r.output
    assert sorted(gpd.read_file(grid, layer="grid")["RATE"]) == [0.2, 2, 2, 2]


def test_class_names_match_in_any_case(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "rx.gpkg"
    r = _rx(str(run), "--rate", "Weed=2,DISEASE=1", "--out", str(out))
    assert r.exit_code == 0, r.output
    assert _rates(out) == [("disease", 1.0), ("weed", 2.0)]
    grid = tmp_path / "grid.gpkg"
    assert _rx(str(run), "--rate", "WEED=2", "--grid", "10", "--out", str(grid)).exit_code == 0
    assert sorted(gpd.read_file(grid, layer="grid")["RATE"]) == [0, 0, 0, 2]
    _refused(_rx(str(run), "--rate", "weed=1,Weed=2"), "more than once")


# --- 8. empty paths --------------------------------------------------------------------------

def test_export_refuses_an_empty_out(tmp_path: Path) -> None:
    r = CliRunner().invoke(main, ["export", str(tmp_path / "b.safetensors"), "--onnx",
                                  "--out", "", "--overwrite"])
    assert r.exit_code == 2 and "is empty; give a path" in r.output, r.output


# --- 9. grid size ----------------------------------------------------------------------------

def test_grid_with_too_many_cells_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "big"
    run.mkdir()
    _mask(run / "classes.tif", np.ones((1024, 1024), np.uint8))  # 1.05 MP
    r = _rx(str(run), "--rate", "weed=1", "--grid", "0.05")
    _refused(r, "1,048,576 cells")
    assert "--grid 0.052 or larger" in r.output and "sprayer sections" in r.output
    # the smallest edge of two significant digits that fits (the partial edge cells count)
    assert smallest_grid(1024, 1024, (0.05, 0.05)) == 0.052
    assert _cell_count(1024, 1024, (0.05, 0.05), 0.052) <= MAX_CELLS
    assert _cell_count(1024, 1024, (0.05, 0.05), 0.051) > MAX_CELLS
