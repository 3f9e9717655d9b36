"""End-to-end runs through a real Dask cluster on real GeoTIFFs."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import click
import numpy as np
import pytest
import rasterio
from affine import Affine
from click.testing import CliRunner

from agriseg.classes import DEFAULT_CLASSES
from agriseg.cli import main
from agriseg.config import build_run_config
from agriseg.survey import process_survey
from tests.conftest import LAMBERTON


def _run(src: Path, out: Path, scheduler: str, **kw: object):
    kw.setdefault("model", "index-threshold")  # pipeline mechanics; models have own tests
    cfg = build_run_config(input=src, out=out, scheduler=scheduler, **kw)
    return process_survey(cfg)


def _read(path: Path) -> np.ndarray:
    with rasterio.open(path) as ds:
        return ds.read(1)


@pytest.mark.parametrize("tile_size", [32, 64, 112])
def test_tiled_equals_untiled(
    rgba_tif: Path, tmp_path: Path, scheduler: str, tile_size: int
) -> None:
    whole = _run(rgba_tif, tmp_path / "whole", scheduler, tile_size=512, indices=False)
    tiled = _run(rgba_tif, tmp_path / "tiled", scheduler, tile_size=tile_size, indices=False)
    for name in ("classes", "confidence"):
        a, b = _read(whole.outputs[name]), _read(tiled.outputs[name])
        assert np.array_equal(a, b), f"{name} differs between tiled and untiled runs"


@pytest.mark.parametrize("processes", [False, True])
def test_embedded_cluster_threads_or_processes(rgba_tif: Path, tmp_path: Path,
                                               processes: bool) -> None:
    """The embedded cluster (threads by default, processes on request) gives the same mask."""
    cfg = build_run_config(input=rgba_tif, out=tmp_path / "o", model="index-threshold",
                           indices=False, tile_size=64, processes=processes, workers=2,
                           skip=("quicklook", "report", "project"))
    res = process_survey(cfg)
    plan = json.loads((res.out_dir / "run.json").read_text())["plan"]
    assert plan["tiles_with_data"] > 1
    assert plan["workers"] == ("local processes" if processes else "local threads")
    assert (plan["worker_count"], plan["worker_threads"]) == (2, 2)
    ref = process_survey(build_run_config(input=rgba_tif, out=tmp_path / "ref",
                                          model="index-threshold", indices=False,
                                          tile_size=512, skip=("report", "project")))
    assert np.array_equal(_read(res.outputs["classes"]), _read(ref.outputs["classes"]))


def test_grid_nodata_and_cog_preserved(rgba_tif: Path, tmp_path: Path, scheduler: str) -> None:
    res = _run(rgba_tif, tmp_path / "o", scheduler, tile_size=64)
    with rasterio.open(rgba_tif) as src, rasterio.open(res.outputs["classes"]) as out:
        assert out.crs == src.crs and out.transform == src.transform
        assert out.shape == src.shape
        assert out.nodata == 255 and out.dtypes[0] == "uint8"
        classes = out.read(1)
        assert ((classes == 255) == (src.read(4) == 0)).all()
        counted = np.bincount(classes.ravel(), minlength=256)
        assert out.colormap(1)[1][:3] == (46, 160, 44)
        assert out.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
    assert (res.out_dir / "classes.qml").exists()
    assert "<Category>crop</Category>" in (res.out_dir / "classes.tif.aux.xml").read_text()
    manifest = json.loads((res.out_dir / "run.json").read_text())
    assert manifest["class_pixels"]["crop"] > 0
    # counted as the tiles were written, equal to counting the finished mask
    assert manifest["class_pixels"] == {
        **{c.name: int(counted[c.value]) for c in DEFAULT_CLASSES.classes},
        "nodata": int(counted[255]),
    }
    assert not (res.out_dir / ".agriseg-work").exists()
    assert {"indices/exg", "indices/vari", "indices/gli"} <= set(res.outputs)


def test_cli_run_on_real_sample(tmp_path: Path, scheduler: str) -> None:
    out = tmp_path / "demo"
    args = [
        "run",
        str(LAMBERTON),
        "--out",
        str(out),
        "--scheduler",
        scheduler,
        "--tile-size",
        "512",
        "--no-progress",
    ]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "Outputs in" in r.output
    classes = _read(out / "classes.tif")
    with rasterio.open(out / "classes.tif") as ds:
        assert ds.overviews(1), "a COG larger than one block must have overviews"
    share = np.bincount(classes[classes != 255], minlength=4) / (classes != 255).sum()
    assert 0.05 < share[1] < 0.95  # real canopy and real soil both found
    # a second run without --overwrite is refused, with the fix in the message
    r2 = CliRunner().invoke(main, args)
    assert r2.exit_code == 2 and "--overwrite" in r2.output


def test_shipped_model_on_real_sample(tmp_path: Path, scheduler: str) -> None:
    """`--model unet-default` (the bundled weights) through both CPU engines."""
    maps = {}
    for engine in ("torch", "onnx"):
        out = tmp_path / engine
        r = CliRunner().invoke(main, ["run", str(LAMBERTON), "--out", str(out), "--scheduler",
                                      scheduler, "--model", "unet-default", "--engine", engine,
                                      "--skip", "zones,fields,report,project", "--no-progress"])
        assert r.exit_code == 0, r.output
        assert json.loads((out / "run.json").read_text())["model"]["name"] == "unet-default"
        maps[engine] = _read(out / "classes.tif")
    valid = maps["torch"] != 255
    share = np.bincount(maps["torch"][valid], minlength=4) / valid.sum()
    assert 0.05 < share[1] < 0.95  # real canopy and real soil both found
    # bf16 (where the CPU computes it) or float32 PyTorch against float32 ONNX Runtime
    assert (maps["torch"] == maps["onnx"]).mean() > 0.99


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda p: p.write_bytes(b"not a tiff at all"), "not a readable raster"),
        (lambda p: None, "file not found"),
    ],
)
def test_cli_bad_input(tmp_path: Path, make, needle: str) -> None:
    src = tmp_path / "bad.tif"
    make(src)
    r = CliRunner().invoke(main, ["run", str(src), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2
    assert needle in r.output and "Traceback" not in r.output
    assert not (tmp_path / "o" / "run.json").exists()


def test_cli_empty_paths(rgba_tif: Path, tmp_path: Path) -> None:
    """An empty --out became "." (outputs in the current folder); an empty INPUT, the folder."""
    for args, where in (([str(rgba_tif), "--out", ""], "--out"), (["", "--out", "o"], "INPUT"),
                        ([str(rgba_tif), "--out", "o", "--fields", " "], "--fields")):
        r = CliRunner().invoke(main, ["run", *args])
        assert r.exit_code == 2 and where in r.output and "is empty; give a path" in r.output


def test_cli_no_crs(tmp_path: Path) -> None:
    from tests.conftest import toy_field, write_rgba

    rgb, valid = toy_field(40, 40)
    src = write_rgba(tmp_path / "nocrs.tif", rgb, valid, crs=None)
    r = CliRunner().invoke(main, ["run", str(src), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "no CRS" in r.output and "gdal_edit" in r.output
    assert "--gsd" in r.output


def test_cli_image_without_georeferencing(rgba_tif: Path, tmp_path: Path,
                                          scheduler: str) -> None:
    """A PNG (e.g. a labelled dataset tile) runs with --gsd, in image coordinates."""
    import geopandas as gpd
    from PIL import Image

    from agriseg.grid import on_earth
    from tests.conftest import toy_field

    rgb, _ = toy_field(96, 120)
    png = tmp_path / "tile.png"
    Image.fromarray(np.moveaxis(rgb, 0, -1)).save(png)
    out = tmp_path / "o"
    args = ["run", str(png), "--out", str(out), "--scheduler", scheduler, "--no-progress",
            "--min-zone-area", "0", "--gsd", "0.01"]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    # two copies of the image plane's local CRS compared unequal: "CRS mismatch" from geopandas
    assert not [w for w in seen if "CRS mismatch" in str(w.message)]
    with rasterio.open(out / "classes.tif") as ds:
        assert ds.shape == (96, 120) and not on_earth(ds.crs)
        assert ds.transform.a == 0.01 and ds.transform.e == -0.01
        pred = ds.read(1)
    run = json.loads((out / "run.json").read_text())
    assert run["input"]["image"] == str(png) and run["input"]["grid"]["gsd_m"] == 0.01
    zones = gpd.read_file(out / "zones.gpkg", layer="zones")
    assert len(zones) and zones["centroid_lon"].isna().all()
    assert (zones["field_id"] == "survey").all()  # the one field of a run without --fields
    assert gpd.read_file(out / "fields.gpkg", layer="fields")["lon"].isna().all()
    r = CliRunner().invoke(main, ["prescription", str(out), "--rate", "weed=2", "--grid", "0.2"])
    assert r.exit_code == 0 and (out / "prescription.shp").exists(), r.output
    # labels of the image compare pixel for pixel
    Image.fromarray(pred).save(tmp_path / "truth.png")
    r = CliRunner().invoke(main, ["evaluate", str(out / "classes.tif"),
                                  str(tmp_path / "truth.png")])
    assert r.exit_code == 0 and "pixel accuracy 1.0000" in r.output, r.output
    # a truth coded otherwise is refused until its values are named
    Image.fromarray(np.where(pred == 0, 7, pred).astype(np.uint8)).save(tmp_path / "t7.png")
    ev = ["evaluate", str(out / "classes.tif"), str(tmp_path / "t7.png")]
    r = CliRunner().invoke(main, ev)
    assert r.exit_code == 2 and "values [7]" in r.output and "--truth-classes" in r.output
    r = CliRunner().invoke(main, [*ev, "--truth-classes", "7=soil,1=crop,2=weed,3=disease"])
    assert r.exit_code == 0 and "pixel accuracy 1.0000" in r.output, r.output
    r = CliRunner().invoke(main, [*ev, "--truth-classes", "7=dirt"])
    assert r.exit_code == 2 and "(soil, crop, weed, disease, ignore)" in r.output
    # a dataset of tiles: pairs pooled into one confusion matrix
    r = CliRunner().invoke(main, ["evaluate", "--json", str(out / "classes.tif"),
                                  str(tmp_path / "truth.png"), str(out / "classes.tif"),
                                  str(tmp_path / "truth.png")])
    assert r.exit_code == 0, r.output
    pooled = json.loads(r.output[r.output.index("{"):])
    assert np.sum(pooled["confusion"]) == 2 * (pred != 255).sum()
    r = CliRunner().invoke(main, ["evaluate", str(out / "classes.tif")])
    assert r.exit_code == 2 and "pairs" in r.output
    # errors name the user's image, not the VRT it is read through
    Image.fromarray(rgb[1]).save(tmp_path / "gray.png")
    r = CliRunner().invoke(main, ["run", str(tmp_path / "gray.png"), "--out",
                                  str(tmp_path / "gr"), "--gsd", "0.01"])
    assert r.exit_code == 2 and f"{tmp_path / 'gray.png'}: has 1 band(s)" in r.output, r.output
    # ... and the refused run leaves no image.vrt, which made the corrected command fail
    assert not (tmp_path / "gr").exists()
    r = CliRunner().invoke(main, ["run", str(png), "--out", str(tmp_path / "gr"), "--gsd", "0.01",
                                  "--bands", "red=1,green=2,blue=3,nir=4"])
    assert r.exit_code == 2 and not (tmp_path / "gr").exists(), r.output
    # a georeferenced raster keeps its CRS: --gsd is refused
    r = CliRunner().invoke(main, ["run", str(rgba_tif), "--out", str(tmp_path / "g"),
                                  "--gsd", "0.01"])
    assert r.exit_code == 2 and "drop it" in r.output and "Traceback" not in r.output


def test_cli_bad_bands(rgba_tif: Path, tmp_path: Path) -> None:
    r = CliRunner().invoke(
        main, ["run", str(rgba_tif), "--out", str(tmp_path / "o"), "--bands", "red=1,purple=2"]
    )
    assert r.exit_code == 2 and "purple" in r.output and "valid roles" in r.output
    r = CliRunner().invoke(
        main,
        ["run", str(rgba_tif), "--out", str(tmp_path / "o"), "--bands", "red=1,green=2,blue=9"],
    )
    assert r.exit_code == 2 and "blue=9" in r.output
    for spec, needle in (("red=1,green=1,blue=3", "band 1 to both red and green"),
                         ("red=1,red=2,blue=3", "gives red twice")):
        r = CliRunner().invoke(main, ["run", str(rgba_tif), "--out", str(tmp_path / "o"),
                                      "--bands", spec])
        assert r.exit_code == 2 and needle in r.output


def test_cli_help_everywhere() -> None:
    for cmd in ([], ["run"], ["synth"], ["evaluate"], ["models"], ["prescription"], ["export"]):
        r = CliRunner().invoke(main, [*cmd, "--help"])
        assert r.exit_code == 0 and "Usage" in r.output
        # click's no-rewrap marker is the \b character; a raw docstring prints it literally
        assert "\\b" not in r.output, r.output
    r = CliRunner().invoke(main, ["--help"])
    assert "\n      agriseg run survey.tif --fields fields.gpkg --out results/\n" in r.output


def test_cli_skip_steps(rgba_tif: Path, tmp_path: Path, scheduler: str) -> None:
    out = tmp_path / "s"
    base = ["run", str(rgba_tif), "--out", str(out), "--scheduler", scheduler,
            "--model", "index-threshold", "--no-progress"]
    r = CliRunner().invoke(main, [*base, "--skip", "bogus"])
    assert r.exit_code == 2 and "valid steps" in r.output and "zones" in r.output
    r = CliRunner().invoke(main, [*base, "--skip", "zones,report", "--skip", "project"])
    assert r.exit_code == 0, r.output
    assert (out / "classes.tif").exists() and (out / "fields.gpkg").exists()
    assert not (out / "report.html").exists() and not (out / "project.qgs").exists()
    r = CliRunner().invoke(main, ["prescription", str(out), "--rate", "weed=1"])
    assert r.exit_code == 2 and "skipped the zones step" in r.output, r.output
    assert json.loads((out / "run.json").read_text())["parameters"]["skip"] == [
        "zones", "report", "project"]
    # the report is built from the field summaries: skipping those skips it (was a traceback)
    r = CliRunner().invoke(main, [*base, "--skip", "fields", "--out", str(tmp_path / "f")])
    assert r.exit_code == 0 and "skipping report too" in r.output, r.output
    assert not (tmp_path / "f" / "report.html").exists()
    assert (tmp_path / "f" / "project.qgs").exists()


def test_cli_progress_bar(rgba_tif: Path, tmp_path: Path, scheduler: str) -> None:
    """The terminal's progress bar (rich) runs through a multi-tile survey to its end."""
    r = CliRunner().invoke(main, ["run", str(rgba_tif), "--out", str(tmp_path / "p"),
                                  "--scheduler", scheduler, "--model", "index-threshold",
                                  "--tile-size", "128", "--skip", "zones,fields,report,project",
                                  "--progress"])
    assert r.exit_code == 0, r.output
    n = json.loads((tmp_path / "p" / "run.json").read_text())["timings_s"]["tiles_run"]
    assert n > 1 and f"{n}/{n}" in r.output and "MP/s" in r.output


def test_cli_model_options(rgba_tif: Path, tmp_path: Path, scheduler: str) -> None:
    """`--model-option` and `model_options:` set the label-free model's configuration; bad
    names, values and models are refused before any output is written."""
    out = tmp_path / "m"
    base = ["run", str(rgba_tif), "--out", str(out), "--scheduler", scheduler, "--no-progress",
            "--skip", "zones,fields,report,project", "--no-indices"]
    config = tmp_path / "run.yaml"
    config.write_text("model_options:\n  disease_sensitivity: 3\n  row_support: 0.5\n")
    r = CliRunner().invoke(main, [*base, "--config", str(config), "--model-option",
                                  "row_support=0.45", "--model-option", "appearance=false",
                                  "--model-option", "exg_range=[0.03, 0.3]"])
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "run.json").read_text())
    used = manifest["model"]["config"]
    assert used["disease_sensitivity"] == 3.0 and used["row_support"] == 0.45
    assert used["appearance"] is False and used["exg_range"] == [0.03, 0.3]
    assert manifest["parameters"]["model_options"]["row_support"] == 0.45
    for option, needle in [("row_suport=0.5", "did you mean row_support? (valid options: "
                                              "min_row_spacing_m"),
                           ("disease_sensitivity=high", "must be a number"),
                           ("appearance=1", "must be true or false"),
                           ("sample_windows=2.5", "must be a whole number"),
                           ("exg_range=0.1", "a list of 2 numbers"),
                           ("disease_sensitivity=-1", "must be > 0"),
                           ("boundary_margin=0.7", "boundary_margin must be in [0, 0.5)"),
                           ("island_weed_share=0", "island_weed_share must be in (0, 1]"),
                           ("row_gap_contrast=0.5", "row_gap_contrast >= 1"),
                           ("no_equals_sign", "expected NAME=VALUE")]:
        bad = tmp_path / option.split("=")[0]
        r = CliRunner().invoke(main, [*base[:3], str(bad), *base[4:], "--model-option", option])
        assert r.exit_code == 2, (option, r.output)
        assert needle in r.output and "Traceback" not in r.output, (option, r.output)
        assert not (bad / "run.json").exists()
    r = CliRunner().invoke(main, [*base[:3], str(tmp_path / "it"), *base[4:], "--model",
                                  "index-threshold", "--model-option", "row_support=0.5"])
    assert r.exit_code == 2 and "takes no model options" in r.output, r.output
    config.write_text("model_options: [1, 2]\n")  # a list: named, not a TypeError
    r = CliRunner().invoke(main, [*base[:3], str(tmp_path / "l"), *base[4:], "--config",
                                  str(config), "--model-option", "row_support=0.5"])
    assert r.exit_code == 2 and "model_options: Input should be a valid dict" in r.output
    r = CliRunner().invoke(main, ["models"])
    assert r.exit_code == 0 and "disease_sensitivity=5.0" in r.output
    assert "robust z-score below the healthy crop median" in r.output
    assert "  onnx   ONNX Runtime, float32" in r.output  # what each engine runs as here


def test_cli_probability_rasters(rgba_tif: Path, tmp_path: Path, scheduler: str) -> None:
    """`--probabilities` writes one percent raster per named class, consistent with the
    class mask and confidence, the same whatever the tiling, and listed in the project."""
    base = ["run", str(rgba_tif), "--scheduler", scheduler, "--no-progress", "--no-indices",
            "--skip", "quicklook,zones,fields,report"]
    r = CliRunner().invoke(main, [*base, "--out", str(tmp_path / "bad"),
                                  "--probabilities", "weed,wheat"])
    assert r.exit_code == 2 and "wheat" in r.output and "soil, crop, weed, disease" in r.output
    assert not (tmp_path / "bad").exists()
    runs = {}
    for tile in ("512", "64"):
        out = tmp_path / f"t{tile}"
        r = CliRunner().invoke(main, [*base, "--out", str(out), "--tile-size", tile,
                                      "--probabilities", "Weed,DISEASE"])  # any case
        assert r.exit_code == 0, r.output
        runs[tile] = out
    out = runs["512"]
    classes, conf = _read(out / "classes.tif"), _read(out / "confidence.tif")
    weed = _read(out / "probability" / "weed.tif")
    assert (out / "probability" / "weed.qml").exists()
    assert not (out / "probability" / "soil.tif").exists()
    assert np.array_equal(weed == 255, classes == DEFAULT_CLASSES.nodata)
    is_weed = classes == 2
    assert is_weed.any() and np.array_equal(weed[is_weed], conf[is_weed])
    assert weed[classes < 255].max() <= 100
    for name in ("weed", "disease"):
        assert np.array_equal(_read(out / "probability" / f"{name}.tif"),
                              _read(runs["64"] / "probability" / f"{name}.tif"))
    assert "weed probability (%)" in (out / "project.qgs").read_text()
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["parameters"]["probabilities"] == ["weed", "disease"]


def _quick_run(src: Path, out: Path, scheduler: str, *extra: str) -> list[str]:
    """CLI arguments of a fast run (index-threshold model, class mask and indices only)."""
    return ["run", str(src), "--out", str(out), "--scheduler", scheduler,
            "--model", "index-threshold", "--no-progress", *extra, "--skip",
            "quicklook,zones,fields,report,project"]


def test_overwrite_leaves_nothing_of_the_old_run(rgba_tif: Path, tmp_path: Path,
                                                 scheduler: str) -> None:
    """--overwrite removes the old run's outputs with their styles, not only the rasters."""
    out = tmp_path / "o"
    base = _quick_run(rgba_tif, out, scheduler)
    assert CliRunner().invoke(main, base).exit_code == 0
    assert (out / "indices" / "exg.qml").exists()
    r = CliRunner().invoke(main, [*base, "--no-indices", "--overwrite"])
    assert r.exit_code == 0, r.output
    left = sorted(p.name for p in (out / "indices").glob("*")) if (out / "indices").exists() else []
    assert left == []
    assert (out / "classes.qml").exists() and (out / "classes.tif.aux.xml").exists()


def test_overwrite_stopped_while_replacing_never_looks_finished(
        rgba_tif: Path, tmp_path: Path, scheduler: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kill between removing the old outputs and moving the new ones in left the old
    run.json listing files that were gone; run.json now goes first, and the resumed run
    removes the rest of the old outputs from the list kept in its working folder."""
    import agriseg.survey as survey_mod

    out = tmp_path / "o"
    base = _quick_run(rgba_tif, out, scheduler)
    assert CliRunner().invoke(main, base).exit_code == 0
    assert (out / "indices" / "exg.tif").exists()

    def killed(ctx: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(survey_mod, "_move_into_place", killed)
    r = CliRunner().invoke(main, [*base, "--no-indices", "--overwrite"])
    assert r.exit_code == 130 and "to resume" in r.output, r.output
    assert not (out / "run.json").exists()
    monkeypatch.undo()
    r = CliRunner().invoke(main, [*base, "--no-indices"])
    assert r.exit_code == 0, r.output
    assert (out / "run.json").exists() and (out / "classes.tif").exists()
    assert not (out / "indices").exists()


def test_stop_after_the_run_finished_is_no_interruption(
        rgba_tif: Path, tmp_path: Path, scheduler: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A SIGTERM while the finished run removed its working files said "Interrupted ...
    resume" (exit 143) over complete results; and working files a finished run left behind
    are removed by the next run into that folder."""
    import shutil

    out = tmp_path / "o"
    base = _quick_run(rgba_tif, out, scheduler, "--no-indices")
    real = shutil.rmtree
    calls = []

    def stopped(path: object, *args: object, **kwargs: object) -> None:
        calls.append(path)
        if len(calls) == 1:
            raise KeyboardInterrupt
        real(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(shutil, "rmtree", stopped)
    r = CliRunner().invoke(main, base)
    monkeypatch.undo()
    assert r.exit_code == 0 and "Done:" in r.output and "resume" not in r.output, r.output
    assert (out / "run.json").exists() and not (out / ".agriseg-work").exists()
    (out / ".agriseg-work").mkdir()
    (out / ".agriseg-work" / "classes.work.tif").write_bytes(b"left behind")
    r = CliRunner().invoke(main, base)
    assert r.exit_code != 0 and "finished run" in r.output
    assert not (out / ".agriseg-work").exists()


def test_ctrl_c_turned_into_another_error_is_an_interruption(
        rgba_tif: Path, tmp_path: Path, scheduler: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Matplotlib turned a Ctrl-C while drawing the report into "ValueError: Invalid affine
    transformation matrix": a traceback and exit 1 instead of "Interrupted ... resume"."""
    import os
    import signal

    from agriseg import report

    real = report.write_report

    def drawing(*args: object, **kwargs: object) -> object:
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        except KeyboardInterrupt:
            raise ValueError("Invalid affine transformation matrix") from None
        return real(*args, **kwargs)  # type: ignore[arg-type]

    out = tmp_path / "o"
    args = ["run", str(rgba_tif), "--out", str(out), "--scheduler", scheduler, "--model",
            "index-threshold", "--no-progress", "--skip", "quicklook,project"]
    # Python's own Ctrl-C handler, as in a terminal (CI may start the tests with SIGINT
    # ignored, which the run then leaves ignored: see the end of this test)
    started = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        monkeypatch.setattr(report, "write_report", drawing)
        r = CliRunner().invoke(main, args)
        monkeypatch.undo()
    finally:
        signal.signal(signal.SIGINT, started)
    assert r.exit_code == 130, r.output
    assert "Interrupted" in r.output and "resume" in r.output and "Traceback" not in r.output
    assert not (out / "run.json").exists()
    r = CliRunner().invoke(main, args)  # the flag does not outlive the run
    assert r.exit_code == 0 and (out / "report.html").exists(), r.output
    # a process started with SIGINT ignored (a job started with & in a script) keeps it so
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        monkeypatch.setattr(report, "write_report", drawing)
        r = CliRunner().invoke(main, [*args, "--overwrite"])
        monkeypatch.undo()
    finally:
        signal.signal(signal.SIGINT, previous)
    assert r.exit_code == 0 and "Interrupted" not in r.output, r.output


def test_output_folder_from_elsewhere_cannot_reach_outside_it(
        rgba_tif: Path, tmp_path: Path, scheduler: str) -> None:
    """A results folder is a file tree anyone can hand over: a run.json listing files
    outside it made --overwrite delete them, and planted links made the run write through
    them (the lock file truncated its target)."""
    out = tmp_path / "o"
    base = _quick_run(rgba_tif, out, scheduler, "--no-indices")
    assert CliRunner().invoke(main, base).exit_code == 0
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    manifest = json.loads((out / "run.json").read_text())
    manifest["outputs"]["evil"] = str(victim)
    manifest["outputs"]["evil2"] = "../victim.txt"
    (out / "run.json").write_text(json.dumps(manifest))
    r = CliRunner().invoke(main, [*base, "--overwrite"])
    assert r.exit_code == 0, r.output
    assert victim.read_text() == "keep me" and "which no agriseg run writes" in r.output
    (out / ".agriseg.lock").symlink_to(victim)
    r = CliRunner().invoke(main, [*base, "--overwrite"])
    assert r.exit_code != 0 and "symbolic link" in r.output
    assert victim.read_text() == "keep me"
    (out / ".agriseg.lock").unlink()
    (out / ".agriseg-work").mkdir()
    (out / ".agriseg-work" / "classes.work.tif").symlink_to(victim)
    r = CliRunner().invoke(main, [*base, "--overwrite"])
    assert r.exit_code != 0 and "symbolic links" in r.output
    assert victim.read_text() == "keep me"


def test_class_names_become_safe_file_names() -> None:
    """A bundle's class "../../x" wrote its probability raster outside --out; names with
    '/' (grass/broadleaf, N/A) are fine as names and get '_' in their file names."""
    from agriseg.classes import ClassSchema, SegClass
    from agriseg.survey import _own_output, _probability_planes

    schema = ClassSchema(tuple(SegClass(i, n, (0, 0, 0)) for i, n in enumerate(
        ["soil", "../../x", "N/A", "grass/broadleaf weed"])))
    planes = _probability_planes(("all",), schema)
    assert [n for n, _ in planes] == ["soil", "_.._x", "N_A", "grass_broadleaf weed"]
    assert all(_own_output(f"probability/{n}.tif") for n, _ in planes)


def test_satellite_pixels_get_no_health_score(tmp_path: Path, scheduler: str) -> None:
    """At 0.5 m per pixel no rows resolve: classes mean plant cover. Weed pressure 0.00,
    disease incidence and a health score read as measured (a green Sentinel-2 field was
    "98 % soil, health 1.5, visit first")."""
    import geopandas as gpd
    import pandas as pd
    import shapely

    from agriseg.synth import FieldSpec, write_field

    img, truth = tmp_path / "coarse.tif", tmp_path / "truth.tif"
    write_field(FieldSpec(size=256, gsd=0.5), img, truth)
    with rasterio.open(img) as ds:
        (x0, y0, x1, y1), crs = ds.bounds, ds.crs
    third = (x1 - x0) / 3
    gpd.GeoDataFrame({"field_id": ["c", "a", "b"]}, crs=crs,
                     geometry=[shapely.box(x0 + i * third, y0, x0 + (i + 1) * third, y1)
                               for i in range(3)]).to_file(tmp_path / "f.gpkg")
    cfg = build_run_config(input=img, out=tmp_path / "o", scheduler=scheduler,
                           fields=tmp_path / "f.gpkg", skip=["quicklook", "project"],
                           indices=False)
    manifest = process_survey(cfg).manifest
    report = (tmp_path / "o" / "report.html").read_text()
    assert "No field has a health score" in report and "mean plant cover" in report
    table = pd.read_csv(tmp_path / "o" / "fields.csv")
    assert table["field_id"].tolist() == ["c", "a", "b"]  # as listed: there is no ranking
    row = table.iloc[0]
    assert np.isnan(row["health_score"]) and np.isnan(row["weed_pressure_pct"])
    assert np.isnan(row["disease_incidence_pct"]) and row["vegetation_pct"] > 0
    assert table["rank"].isna().all()
    assert any("mean plant cover" in n for n in manifest["fields"]["notes"])


def test_index_threshold_says_it_finds_no_weeds(rgba_tif: Path, tmp_path: Path,
                                                scheduler: str) -> None:
    """Its weed and disease shares are 0 by construction: said, not left for a finding."""
    cfg = build_run_config(input=rgba_tif, out=tmp_path / "o", scheduler=scheduler,
                           model="index-threshold", skip=["quicklook", "report", "project"],
                           indices=False)
    manifest = process_survey(cfg).manifest
    assert any("separates soil and crop only" in w for w in manifest["model"]["warnings"])
    # its fields get plant cover, not a health score (woods scored 100)
    import pandas as pd

    row = pd.read_csv(tmp_path / "o" / "fields.csv").iloc[0]
    assert np.isnan(row["health_score"]) and np.isnan(row["weed_pressure_pct"])
    # and in the one list of doubts a script reads
    assert any("separates soil and crop only" in w for w in manifest["warnings"])


def test_cli_halo_clamped_and_narrow_halo_warned(rgba_tif: Path, tmp_path: Path,
                                                 scheduler: str) -> None:
    """A --halo wider than the survey is cut to it (it was padding costing gigabytes); one
    narrower than the model's margin runs, with a warning that it can leave seams."""
    base = ["run", str(rgba_tif), "--scheduler", scheduler, "--no-progress", "--no-indices",
            "--skip", "zones,fields,report,project,quicklook"]
    with rasterio.open(rgba_tif) as ds:
        side = -(-max(ds.shape) // 16) * 16
    r = CliRunner().invoke(main, [*base, "--out", str(tmp_path / "w"), "--halo", "4096"])
    assert r.exit_code == 0, r.output
    assert "wider than the survey" in r.output
    assert json.loads((tmp_path / "w" / "run.json").read_text())["plan"]["halo"] == side
    # option errors name the option as typed, not pydantic's "options: ... Value error,"
    r = CliRunner().invoke(main, [*base, "--out", str(tmp_path / "t"), "--tile-size", "1000"])
    assert r.exit_code == 2
    assert "invalid option: --tile-size: must be a multiple of 16" in r.output, r.output
    # -q: the warning and nothing else (no plan, progress lines or list of outputs)
    r = CliRunner().invoke(main, ["-q", *base, "--out", str(tmp_path / "n"), "--halo", "4"])
    assert r.exit_code == 0, r.output
    assert r.output.startswith("--halo 4 is narrower than model labelfree's margin")
    assert r.output.count("\n") == 1, r.output


def test_almost_no_vegetation_is_said(tmp_path: Path, scheduler: str) -> None:
    """A bare (or senesced, or harvested) survey came out all soil without a word."""
    from tests.conftest import write_rgba

    rng = np.random.default_rng(0)
    soil = (np.array([150, 120, 95])[:, None, None] + rng.normal(0, 6, (3, 96, 96)))
    src = write_rgba(tmp_path / "bare.tif", soil.clip(0, 255).astype(np.uint8),
                     np.ones((96, 96), bool))
    res = _run(src, tmp_path / "o", scheduler, model="labelfree",
               skip=["zones", "fields", "report", "project"])
    assert any("% of the survey's valid pixels are vegetation" in w
               for w in res.manifest["warnings"])


def test_user_files_under_output_names_are_not_replaced(rgba_tif: Path, tmp_path: Path) -> None:
    """A folder of the user's own report.html was written over without a word."""
    import os

    from agriseg.cli import NonEmptyPath

    out = tmp_path / "mine"
    out.mkdir()
    (out / "report.html").write_text("my report")
    r = CliRunner().invoke(main, ["run", str(rgba_tif), "--out", str(out), "--no-progress"])
    assert r.exit_code == 2 and "that no agriseg run left there" in r.output, r.output
    assert (out / "report.html").read_text() == "my report"
    # a file name in another encoding: named, not a traceback from inside GDAL
    with pytest.raises(click.BadParameter, match="not valid UTF-8"):
        NonEmptyPath().convert(os.fsdecode(b"caf\xe9.tif"), None, None)


def test_web_mercator_survey_gets_ground_areas_and_a_warning(tmp_path: Path,
                                                             scheduler: str) -> None:
    """The same field in EPSG:3857 and in its UTM zone: the same class areas (3857's metres
    are 1.39x ground metres at 44 N), and a warning that says how to get exact figures."""
    from tests.conftest import toy_field, write_rgba

    rgb, valid = toy_field()
    utm = write_rgba(tmp_path / "utm.tif", rgb, valid,
                     transform=Affine(0.02, 0, 315760.0, 0, -0.02, 4900915.0))
    merc = write_rgba(tmp_path / "merc.tif", rgb, valid, crs="EPSG:3857",
                      transform=Affine(0.02 * 1.3948, 0, -10609630.0, 0, -0.02 * 1.3948,
                                       5498480.0))
    areas = []
    for src in (utm, merc):
        cfg = build_run_config(input=src, out=tmp_path / src.stem, scheduler=scheduler,
                               skip=["zones", "fields", "quicklook", "report", "project"],
                               indices=False)
        manifest = process_survey(cfg).manifest
        areas.append(manifest["class_area_m2"])
    assert not any("stretches" in w for w in json.loads(
        (tmp_path / "utm" / "run.json").read_text()).get("warnings", []))
    assert any("stretches ground distances 1.4" in w and "EPSG:32615" in w
               for w in manifest["warnings"])
    for name in ("soil", "crop"):
        assert areas[1][name] == pytest.approx(areas[0][name], rel=0.02)


def test_geographic_survey_with_squashed_pixels_is_warned(tmp_path: Path,
                                                          scheduler: str) -> None:
    """Square pixels in degrees are 1.39x taller than wide at 44 N: areas are exact, the
    models see a squashed field; said, with the UTM zone to warp to."""
    from tests.conftest import toy_field, write_rgba

    rgb, valid = toy_field()
    src = write_rgba(tmp_path / "geo.tif", rgb, valid, crs="EPSG:4326",
                     transform=Affine(2.5e-7, 0, -95.3, 0, -2.5e-7, 44.2))
    cfg = build_run_config(input=src, out=tmp_path / "o", scheduler=scheduler,
                           skip=["zones", "fields", "quicklook", "report", "project"],
                           indices=False)
    manifest = process_survey(cfg).manifest
    assert any("1.39x longer one way" in w and "EPSG:32615" in w for w in manifest["warnings"])


def test_implausible_gsd_is_refused(tmp_path: Path) -> None:
    """--gsd in the wrong unit (1e-05 m) ran a 5000 px context around a 64 px image for
    gigabytes and never ended; refused, saying what the unit is."""
    r = CliRunner().invoke(main, ["run", str(tmp_path / "x.png"), "--out", str(tmp_path / "o"),
                                  "--gsd", "0.00001"])
    assert r.exit_code == 2 and "metres per pixel" in r.output and "0.01 mm" in r.output
    assert not (tmp_path / "o").exists()
