"""Training: CLI run on a tiny synthetic pair, polygons, pseudo-labels, resume, config errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import yaml
from click.testing import CliRunner
from shapely.geometry import box

from agriseg.cli import main
from agriseg.models.bundle import read_bundle
from agriseg.synth import FieldSpec, write_field
from agriseg.train import load_train_config, train

TINY = {
    "model": {"arch": "unet", "encoder": "tiny"},
    "patch_size": 32,
    "batch_size": 2,
    "epochs": 2,
    "steps_per_epoch": 3,
    "validation": {"block_size": 64, "fraction": 0.25},
    "threads": 1,
}


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("pair")
    img, truth = d / "field.tif", d / "truth.tif"
    write_field(FieldSpec(size=128, seed=7, gsd=0.02), img, truth)
    return img, truth


def _polygons(path: Path, image: Path) -> Path:
    with rasterio.open(image) as ds:
        left, bottom, right, top = ds.bounds
        crs = ds.crs
    w, h = right - left, top - bottom
    gdf = gpd.GeoDataFrame(
        {"class": ["soil", "crop", "weed"]},
        geometry=[box(left, bottom, left + w / 3, top), box(left + w / 3, bottom, left + 2 * w / 3,
                  top), box(left + 2 * w / 3, bottom, right, bottom + h / 2)],
        crs=crs,
    ).to_crs("EPSG:4326")  # labels drawn in another CRS are reprojected on the fly
    gdf.to_file(path)
    return path


def _write_cfg(path: Path, **values: object) -> Path:
    path.write_text(yaml.safe_dump({"version": 1, **TINY, **values}))
    return path


def test_cli_train_resume_and_export(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    img, truth = pair
    polys = _polygons(tmp_path / "labels.gpkg", img)
    cfg = _write_cfg(tmp_path / "train.yaml", out="run", data=[
        {"image": str(img), "labels": str(truth)},
        {"image": str(img), "polygons": polys.name, "class_column": "class"},
    ])
    r = CliRunner().invoke(main, ["train", str(cfg), "--no-progress"])
    assert r.exit_code == 0, r.output
    run = tmp_path / "run"
    bundle = run / "model.safetensors"
    assert bundle.exists() and (run / "curves.png").stat().st_size > 1000
    umask = os.umask(0o022)
    os.umask(umask)
    assert bundle.stat().st_mode & 0o777 == 0o666 & ~umask  # safetensors wrote it 0600
    hist = json.loads((run / "history.json").read_text())
    assert [h["epoch"] for h in hist] == [1, 2]
    assert set(hist[0]["val"]["iou"]) == {"soil", "crop", "weed", "disease"}
    assert len(hist[0]["val"]["confusion"]) == 4
    meta, _ = read_bundle(bundle)
    assert meta.roles == ("red", "green", "blue") and meta.arch.encoder == "tiny"
    assert [d["source"] for d in meta.training["images"]] == ["raster labels", "polygons"]
    assert meta.gsd_range_m == (0.02, 0.02)

    r = CliRunner().invoke(main, ["train", str(cfg), "--no-progress"])  # a rerun, by mistake
    assert r.exit_code == 2 and "--resume continues it, --overwrite starts over" in r.output
    assert json.loads((run / "history.json").read_text()) == hist
    r = CliRunner().invoke(main, ["train", str(cfg), "--resume", "--epochs", "3", "--no-progress"])
    assert r.exit_code == 0, r.output
    hist2 = json.loads((run / "history.json").read_text())
    assert [h["epoch"] for h in hist2] == [1, 2, 3]
    assert hist2[:2] == hist, "resume continues; finished epochs are not rerun"

    # a changed configuration cannot resume the old checkpoint
    _write_cfg(cfg, out="run", data=[{"image": str(img), "labels": str(truth)}])
    r = CliRunner().invoke(main, ["train", str(cfg), "--resume", "--no-progress"])
    assert r.exit_code == 2 and "different training configuration" in r.output
    assert "->" in r.output, r.output  # names what changed


def test_cpu_training_saves_plain_weights(tmp_path: Path, pair: tuple[Path, Path],
                                          caplog: pytest.LogCaptureFixture) -> None:
    """Training runs channels-last in float32 on CPU (even where bf16 is native); the bundle
    holds the plain architecture's weights, contiguous."""
    import logging

    import torch

    from agriseg.models.arch import build_model

    img, truth = pair
    cfg = _write_cfg(tmp_path / "t.yaml", out="run", epochs=1, device="cpu",
                     data=[{"image": str(img), "labels": str(truth)}])
    with caplog.at_level(logging.INFO, logger="agriseg.train.loop"):
        result = train(load_train_config(cfg))
    assert "cpu, float32" in caplog.text
    meta, state = read_bundle(result.bundle)
    model = build_model(meta.arch)
    model.load_state_dict(state)  # strict: the same keys as an untouched model
    assert all(v.is_contiguous() and torch.isfinite(v).all() for v in state.values())


def test_train_on_images_without_georeferencing(tmp_path: Path,
                                                pair: tuple[Path, Path]) -> None:
    """A labelled dataset of PNG tiles (no CRS) trains with ``gsd`` per image."""
    import numpy as np
    from PIL import Image

    img, truth = pair
    with rasterio.open(img) as ds, rasterio.open(truth) as ts:
        rgb, lab = ds.read([1, 2, 3]), ts.read(1)
    Image.fromarray(np.moveaxis(rgb, 0, -1)).save(tmp_path / "tile.png")
    Image.fromarray(lab).save(tmp_path / "tile_labels.png")
    cfg = _write_cfg(tmp_path / "t.yaml", out="run", epochs=1, data=[
        {"image": "tile.png", "labels": "tile_labels.png", "gsd": 0.02}])
    r = CliRunner().invoke(main, ["train", str(cfg), "--no-progress"])
    assert r.exit_code == 0, r.output
    meta, _ = read_bundle(tmp_path / "run" / "model.safetensors")
    assert meta.gsd_range_m == (0.02, 0.02)
    # without gsd the same image is refused, saying what to do
    cfg = _write_cfg(tmp_path / "u.yaml", out="run2", epochs=1, data=[
        {"image": "tile.png", "labels": "tile_labels.png"}])
    r = CliRunner().invoke(main, ["train", str(cfg), "--no-progress"])
    assert r.exit_code == 2 and "--gsd" in r.output and "Traceback" not in r.output


def test_pseudo_labels_from_teacher(tmp_path: Path, rgba_tif: Path, scheduler: str) -> None:
    cfg = _write_cfg(tmp_path / "t.yaml", out="run", data=[])
    r = CliRunner().invoke(main, [
        "train", str(cfg), "--pseudo-labels", str(rgba_tif), "--pseudo-model", "index-threshold",
        "--min-confidence", "0.9", "--scheduler", scheduler, "--no-progress",
    ])
    assert r.exit_code == 0, r.output
    meta, _ = read_bundle(tmp_path / "run" / "model.safetensors")
    src = meta.training["images"][0]
    assert src["source"] == "pseudo-labels" and src["teacher"] == "index-threshold"
    assert 0 < src["labelled_share"] < 1  # uncertain pixels were dropped


def test_config_errors_are_clear(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    img, truth = pair
    bad = _write_cfg(tmp_path / "a.yaml", out="r", data=[{"image": str(img)}])
    r = CliRunner().invoke(main, ["train", str(bad)])
    assert r.exit_code == 2 and "exactly one of labels, polygons or pseudo" in r.output
    bad = _write_cfg(tmp_path / "b.yaml", out="r", epoch=3,
                     data=[{"image": str(img), "labels": str(truth)}])
    r = CliRunner().invoke(main, ["train", str(bad)])
    assert r.exit_code == 2 and "epoch" in r.output and "Traceback" not in r.output
    bad = _write_cfg(tmp_path / "c.yaml", out="r", model={"arch": "unet", "encoder": "nope"},
                     data=[{"image": str(img), "labels": str(truth)}])
    r = CliRunner().invoke(main, ["train", str(bad)])
    assert r.exit_code == 2 and "valid choices" in r.output
    polys = _polygons(tmp_path / "p.gpkg", img)
    bad = _write_cfg(tmp_path / "d.yaml", out="r", data=[
        {"image": str(img), "polygons": str(polys), "class_column": "kind"}])
    r = CliRunner().invoke(main, ["train", str(bad)])
    assert r.exit_code == 2 and "no column 'kind'" in r.output and "class" in r.output
    bad = _write_cfg(tmp_path / "e.yaml", out="r", data=[
        {"image": str(img), "labels": "moved.tif"}])
    r = CliRunner().invoke(main, ["train", str(bad)])
    assert r.exit_code == 2 and "label raster not found" in r.output
    assert str(tmp_path / "moved.tif") in r.output and "Traceback" not in r.output
    # an unknown key names the valid ones, with a guess
    bad = _write_cfg(tmp_path / "f.yaml", out="r", data=[{"image": str(img), "label": "x"}])
    r = CliRunner().invoke(main, ["train", str(bad)])
    assert r.exit_code == 2 and "data #1.label: unknown key; did you mean labels?" in r.output
    # custom classes: colours 0-255, one class per role (a colour of 300 crashed `run` later)
    for classes, needle in [
        ([{"name": "a", "color": [1, 2, 300]}, {"name": "b", "color": [0, 0, 0]}],
         "less than or equal to 255"),
        ([{"name": "a", "color": [1, 2, 3], "role": "crop"},
          {"name": "b", "color": [0, 0, 0], "role": "crop"}], "give a role twice"),
        ([{"name": "only", "color": [1, 2, 3]}], "at least 2 items"),
    ]:
        bad = _write_cfg(tmp_path / "g.yaml", out="r", classes=classes,
                         data=[{"image": str(img), "labels": str(truth)}])
        r = CliRunner().invoke(main, ["train", str(bad)])
        assert r.exit_code == 2 and needle in r.output, r.output
    # the image itself, float labels, negative labels (wrapped round to classes in uint8)
    with rasterio.open(truth) as ds:
        profile, classes = ds.profile, ds.read(1)
    profile.pop("photometric", None)
    floats = tmp_path / "floats.tif"
    with rasterio.open(floats, "w", **{**profile, "dtype": "float32", "nodata": None}) as dst:
        dst.write(classes.astype(np.float32), 1)
    negative = tmp_path / "negative.tif"
    with rasterio.open(negative, "w", **{**profile, "dtype": "int16", "nodata": None}) as dst:
        dst.write(np.where(classes == 1, -3, classes.astype(np.int16)), 1)
    for labels, needle in ((img, "has 4 bands"), (floats, "holds float32 values"),
                           (negative, "label values [-3]")):
        bad = _write_cfg(tmp_path / "g.yaml", out="r", data=[
            {"image": str(img), "labels": str(labels)}])
        r = CliRunner().invoke(main, ["train", str(bad)])
        assert r.exit_code == 2 and needle in r.output and "Traceback" not in r.output, r.output
    # tracebacks before: an empty or NaN GSD range, `out:` naming a file, --pseudo-labels
    # with `data: null` (and a mapping where the list goes: named, not lost in the flag's list)
    for extra, args, needle in (
        ({"synthetic": {"count": 1, "gsd": []}}, [], "synthetic.gsd: List should have at least"),
        ({"synthetic": {"count": 1, "gsd": [float("nan")]}}, [], "Input should be a finite"),
        ({"out": str(img), "synthetic": {"count": 1}}, [], "exists and is not a folder"),
        ({"data": {"image": str(img), "labels": str(truth)}}, ["--pseudo-labels", str(img)],
         "data: Input should be a valid list"),
    ):
        bad = _write_cfg(tmp_path / "h.yaml", **{"out": str(tmp_path / "r"), **extra})
        r = CliRunner().invoke(main, ["train", str(bad), *args])
        assert r.exit_code == 2 and needle in r.output and "Traceback" not in r.output, r.output
    # synthetic truth and the registered teachers label the default classes, by value
    three = [{"name": "background", "color": [1, 2, 3]}, {"name": "plant", "color": [4, 5, 6]},
             {"name": "thistle", "color": [7, 8, 9], "at_risk": True}]
    for extra, needle in (({"synthetic": {"count": 1}}, "synthetic fields are labelled soil"),
                          ({"data": [{"image": str(img), "pseudo": {"model": "labelfree"}}]},
                           "the teacher 'labelfree' labels soil, crop, weed, disease")):
        bad = _write_cfg(tmp_path / "j.yaml", out=str(tmp_path / "r"), classes=three, **extra)
        r = CliRunner().invoke(main, ["train", str(bad)])
        assert r.exit_code == 2 and needle in r.output and "Traceback" not in r.output, r.output
    # labels that cannot teach anything say why (all said "label more area" before)
    far = gpd.read_file(polys).to_crs(3857)
    far["geometry"] = far.translate(5000, 0)
    far.to_file(tmp_path / "far.gpkg")
    fractional = gpd.read_file(polys)
    fractional["class"] = [0.0, 1.7, 2.0]  # int() made 1.7 crop, silently
    fractional.to_file(tmp_path / "frac.gpkg")
    with rasterio.open(img) as ds:
        profile, data = ds.profile, ds.read()
    data[-1] = 0  # alpha 0 everywhere: no valid pixel under the labels
    with rasterio.open(tmp_path / "empty.tif", "w", **profile) as dst:
        dst.write(data)
    for entry, needle in (
        ({"image": str(img), "polygons": str(tmp_path / "far.gpkg")},
         "none of the 3 labelled polygon(s) covers a pixel centre"),
        ({"image": str(img), "polygons": str(tmp_path / "frac.gpkg")}, "holds 1.7, not a class"),
        ({"image": str(tmp_path / "empty.tif"), "labels": str(truth)},
         "every labelled pixel lies on the image's nodata"),
    ):
        bad = _write_cfg(tmp_path / "i.yaml", out=str(tmp_path / "r"), data=[entry])
        r = CliRunner().invoke(main, ["train", str(bad)])
        assert r.exit_code == 2 and needle in r.output and "Traceback" not in r.output, r.output


def test_help() -> None:
    for cmd in (["train"], ["export"]):
        r = CliRunner().invoke(main, [*cmd, "--help"])
        assert r.exit_code == 0 and "Usage" in r.output


@pytest.mark.slow
def test_training_improves_iou(tmp_path: Path) -> None:
    cfg_path = _write_cfg(
        tmp_path / "s.yaml", out="run", synthetic={"count": 2, "size": 256, "seed": 50},
        model={"arch": "unet", "encoder": "tiny"}, patch_size=64, batch_size=8, epochs=6,
        steps_per_epoch=25, lr=0.01, threads=2,
    )
    result = train(load_train_config(cfg_path))
    mious = [h.val.miou for h in result.history]
    assert max(mious[-2:]) > mious[0] + 0.05, mious


def test_multispectral_model_trains_on_multispectral_synthetic_fields(tmp_path: Path) -> None:
    bands = ["red", "green", "blue", "rededge", "nir"]
    cfg_path = _write_cfg(tmp_path / "ms.yaml", out="run", bands=bands, epochs=1,
                          model={"arch": "unet", "encoder": "small"},
                          synthetic={"count": 1, "size": 128, "seed": 60})
    result = train(load_train_config(cfg_path))
    meta, _ = read_bundle(result.bundle)
    assert list(meta.roles) == bands
    assert meta.arch.in_channels == 5


def test_classes_without_labels_are_named(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    """Labels of soil, crop and weed only: disease cannot be learned, and is said to be."""
    img, _ = pair
    polys = _polygons(tmp_path / "labels.gpkg", img)
    cfg = _write_cfg(tmp_path / "train.yaml", out="run", epochs=1, data=[
        {"image": str(img), "polygons": polys.name, "class_column": "class"}])
    r = CliRunner().invoke(main, ["train", str(cfg), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "class(es) disease have no labelled training pixel" in r.output


def test_label_codes_of_a_dataset_are_mapped(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    """A dataset coded 10/20/30/40 (0 = unlabelled) trains with label_classes, as evaluate's
    --truth-classes; without it the error says how."""
    img, truth = pair
    with rasterio.open(truth) as ds:
        profile, classes = ds.profile, ds.read(1)
    coded = np.where(classes == 255, 0, (classes.astype(np.int16) + 1) * 10).astype(np.uint8)
    recoded = tmp_path / "coded.tif"
    with rasterio.open(recoded, "w", **{**profile, "nodata": None}) as dst:
        dst.write(coded, 1)
    entry = {"image": str(img), "labels": str(recoded)}
    cfg = _write_cfg(tmp_path / "a.yaml", out="a", epochs=1, data=[entry])
    r = CliRunner().invoke(main, ["train", str(cfg), "--no-progress"])
    assert r.exit_code == 2 and "label_classes: 10=soil" in r.output, r.output
    cfg = _write_cfg(tmp_path / "b.yaml", out="b", epochs=1, data=[
        {**entry, "label_classes": "10=soil,20=crop,30=weed,40=disease,0=ignore"}])
    r = CliRunner().invoke(main, ["train", str(cfg), "--no-progress"])
    assert r.exit_code == 0, r.output
    meta, _ = read_bundle(tmp_path / "b" / "model.safetensors")
    pixels = meta.training["images"][0]["train_pixels"]
    assert all(pixels[n] > 0 for n in ("soil", "crop", "weed"))
    cfg = _write_cfg(tmp_path / "c.yaml", out="c", epochs=1, data=[
        {**entry, "label_classes": "10=dirt"}])
    r = CliRunner().invoke(main, ["train", str(cfg), "--no-progress"])
    assert r.exit_code == 2 and "data #1: label_classes" in r.output, r.output
