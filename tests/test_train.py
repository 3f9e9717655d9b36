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


def _trained_pixels(cfg: Path, bundle: Path) -> dict[str, dict[str, int]]:
    """Train ``cfg`` (it must succeed); the first image's train and validation pixels."""
    r = CliRunner().invoke(main, ["train", str(cfg), "--no-progress"])
    assert r.exit_code == 0, r.output
    meta, _ = read_bundle(bundle)
    image = meta.training["images"][0]
    return {"train": image["train_pixels"], "val": image["val_pixels"]}


def test_a_batch_too_small_for_batch_norm_is_named(tmp_path: Path,
                                                   pair: tuple[Path, Path]) -> None:
    """batch_size 1 on DeepLabV3+ (image pooling to 1 x 1) ended in a traceback at the first
    step."""
    img, truth = pair
    cfg = _write_cfg(tmp_path / "t.yaml", out="run", data=[{"image": str(img),
                                                            "labels": str(truth)}])
    text = yaml.safe_load(cfg.read_text())
    text.update(batch_size=1, model={"arch": "deeplabv3plus", "encoder": "tiny"})
    cfg.write_text(yaml.safe_dump(text))
    r = CliRunner().invoke(main, ["train", str(cfg), "--no-progress"])
    assert r.exit_code == 2 and "use batch_size 2 or more" in r.output, r.output
    assert "Traceback" not in r.output


def test_training_curves_draw_class_names_as_written(tmp_path: Path) -> None:
    """A class named with a TeX command between dollars failed the curves at the end."""
    from agriseg.metrics import Scores
    from agriseg.train.loop import EpochResult, write_curves

    scores = Scores(np.array([[5, 1], [2, 7]]), ("soil", "$\\foo$ weed"))
    write_curves([EpochResult(1, 0.9, scores, 1.0, True), EpochResult(2, 0.5, scores, 1.0,
                                                                      False)],
                 tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 1000


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
    assert r.exit_code == 2 and \
        'label_classes: "10=soil,20=crop,30=weed,40=disease,0=ignore"' in r.output, r.output
    cfg = _write_cfg(tmp_path / "b.yaml", out="b", epochs=1, data=[
        {**entry, "label_classes": "10=soil,20=crop,30=weed,40=disease,0=ignore"}])
    pixels = _trained_pixels(cfg, tmp_path / "b" / "model.safetensors")["train"]
    assert all(pixels[n] > 0 for n in ("soil", "crop", "weed"))
    cfg = _write_cfg(tmp_path / "c.yaml", out="c", epochs=1, data=[
        {**entry, "label_classes": "10=dirt"}])
    r = CliRunner().invoke(main, ["train", str(cfg), "--no-progress"])
    assert r.exit_code == 2 and "data #1: label_classes" in r.output, r.output


def test_colour_coded_labels_train_with_label_colors(tmp_path: Path,
                                                    pair: tuple[Path, Path]) -> None:
    """WeedMap-style colour labels (RGBA PNG, transparent = unlabelled) train with
    label_colors, evaluate's --truth-colors; without it the error gives one of its colours."""
    from PIL import Image

    img, truth = pair
    with rasterio.open(img) as ds, rasterio.open(truth) as ts:
        rgb, lab = ds.read([1, 2, 3]), ts.read(1)
    Image.fromarray(np.moveaxis(rgb, 0, -1)).save(tmp_path / "tile.png")
    palette = np.zeros((256, 4), np.uint8)  # soil black, crop green, weed red, disease blue
    palette[:4] = [[0, 0, 0, 255], [0, 255, 0, 255], [255, 0, 0, 255], [0, 0, 255, 255]]
    Image.fromarray(palette[lab]).save(tmp_path / "tile_color.png")  # 255: transparent
    entry = {"image": "tile.png", "labels": "tile_color.png", "gsd": 0.02}
    cfg = _write_cfg(tmp_path / "a.yaml", out="a", epochs=1, data=[entry])
    r = CliRunner().invoke(main, ["train", str(cfg), "--no-progress"])
    assert r.exit_code == 2 and "has 4 bands (RGBA)" in r.output, r.output
    assert 'label_colors: "0,0,0=soil;0,255,0=crop;' in r.output
    cfg = _write_cfg(tmp_path / "b.yaml", out="b", epochs=1, data=[
        {**entry, "label_colors": "0,0,0=soil;0,255,0=crop;255,0,0=weed;0,0,255=disease"}])
    counted = _trained_pixels(cfg, tmp_path / "b" / "model.safetensors")
    pixels = counted["train"]
    assert all(pixels[n] > 0 for n in ("soil", "crop", "weed")), pixels
    assert sum(pixels.values()) + sum(counted["val"].values()) == int((lab != 255).sum())


def test_teacher_runs_are_reused_only_for_the_same_teacher_bands_and_image(
    tmp_path: Path, rgba_tif: Path, scheduler: str
) -> None:
    """The cached teacher run is keyed on what decides the labels; --overwrite ignores it."""
    import shutil

    from agriseg.models.bundle import read_bundle, save_bundle
    from agriseg.train.pseudo import pseudo_labels, teacher_stamp

    work = tmp_path / "pseudo"
    run_json = work / rgba_tif.stem / "run.json"

    def teach(bands: str | None = None, reuse: bool = True) -> int:
        pseudo_labels(rgba_tif, work, "index-threshold", scheduler=scheduler, bands=bands,
                      reuse=reuse)
        return run_json.stat().st_mtime_ns

    first = teach()
    assert teach() == first, "the same teacher, bands and image reuse the cached run"
    rgb = "red=1,green=2,blue=3,alpha=4"
    second = teach(rgb)
    assert second != first, "other bands: the teacher runs again"
    assert teach(rgb) == second
    assert teach(rgb, reuse=False) != second, "--overwrite runs the teacher again"
    st = rgba_tif.stat()
    os.utime(rgba_tif, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the image was rewritten
    third = run_json.stat().st_mtime_ns
    assert teach(rgb) != third
    # a bundle teacher is identified by its content: retrained under the same name, it differs
    shipped = Path(__file__).resolve().parents[1] / "agriseg" / "data" / "unet-default.safetensors"
    teacher = tmp_path / "teacher.safetensors"
    shutil.copy(shipped, teacher)
    before = teacher_stamp(rgba_tif, str(teacher), None, None)
    os.utime(teacher, ns=(st.st_atime_ns, st.st_mtime_ns + 5 * 10**9))
    assert teacher_stamp(rgba_tif, str(teacher), None, None) == before, "touched, same bytes"
    meta, state = read_bundle(teacher)
    name = next(iter(state))
    save_bundle({**state, name: state[name] + 1}, meta, teacher)
    after = teacher_stamp(rgba_tif, str(teacher), None, None)
    assert after["model"] != before["model"] and after["image"] == before["image"]


def test_synthetic_fields_are_cached_by_their_whole_spec(tmp_path: Path) -> None:
    """A cached synthetic field of another size or GSD is not reused under its seed's name."""
    from agriseg.train.config import build_train_config
    from agriseg.train.loop import _synthetic_pairs

    def field(reuse: bool = True, **synthetic: object) -> tuple[int, float, int]:
        cfg = build_train_config(out=str(tmp_path / "run"),
                                 synthetic={"count": 1, "seed": 5, **synthetic})
        ((img, _),) = _synthetic_pairs(cfg, reuse)
        with rasterio.open(img) as ds:
            return ds.width, round(ds.res[0], 4), img.stat().st_mtime_ns

    w, gsd, t0 = field(size=64, gsd=[0.02])
    assert (w, gsd) == (64, 0.02)
    assert field(size=64, gsd=[0.02])[2] == t0, "the same spec is reused"
    assert field(size=96, gsd=[0.02])[:2] == (96, 0.02)
    assert field(size=96, gsd=[0.03])[:2] == (96, 0.03)
    t1 = field(size=96, gsd=[0.03])[2]
    assert field(reuse=False, size=96, gsd=[0.03])[2] != t1, "--overwrite writes them anew"


def test_bundle_destination_is_checked_before_training(tmp_path: Path,
                                                       pair: tuple[Path, Path]) -> None:
    """A bundle path holding another file or in an unwritable place fails at once (it failed
    after epoch 1, with a traceback); another training's bundle needs --overwrite."""
    img, truth = pair
    victim = tmp_path / "victim.tif"
    victim.write_bytes(b"precious")
    (tmp_path / "v.safetensors").write_bytes(b"not a bundle either")
    # labels that do not exist: reading the data first would fail on them instead
    data = [{"image": str(img), "labels": "missing.tif"}]
    for bundle, needle in (
        (victim.name, "victim.tif: exists and is not a model bundle"),
        ("v.safetensors", "v.safetensors: exists and is not an agriseg model bundle"),
        ("/proc/nope/m.safetensors", "cannot write the model bundle into /proc/nope"),
    ):
        cfg = _write_cfg(tmp_path / "t.yaml", out="run", bundle=bundle, data=data)
        r = CliRunner().invoke(main, ["train", str(cfg), "--no-progress"])
        assert r.exit_code == 2 and needle in r.output and "Traceback" not in r.output, r.output
    assert victim.read_bytes() == b"precious"
    # a bundle in folders yet to be made: none is made by a training that fails on its data
    cfg = _write_cfg(tmp_path / "t.yaml", out="run", bundle="new/deep/m.safetensors", data=data)
    r = CliRunner().invoke(main, ["train", str(cfg), "--no-progress"])
    assert r.exit_code == 2 and "missing.tif" in r.output, r.output
    assert not (tmp_path / "new").exists()
    data = [{"image": str(img), "labels": str(truth)}]
    first = _write_cfg(tmp_path / "a.yaml", out="a", bundle="shared.safetensors", epochs=1,
                       data=data)
    assert CliRunner().invoke(main, ["train", str(first), "--no-progress"]).exit_code == 0
    shared = (tmp_path / "shared.safetensors").read_bytes()
    second = _write_cfg(tmp_path / "b.yaml", out="b", bundle="shared.safetensors", epochs=1,
                        data=data, seed=1)
    r = CliRunner().invoke(main, ["train", str(second), "--no-progress"])
    assert r.exit_code == 2 and "holds a model bundle already" in r.output, r.output
    assert "--overwrite replaces it" in r.output
    assert (tmp_path / "shared.safetensors").read_bytes() == shared
    r = CliRunner().invoke(main, ["train", str(second), "--overwrite", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "shared.safetensors").read_bytes() != shared


def test_band_mistakes_are_refused_before_reading_data(tmp_path: Path,
                                                       pair: tuple[Path, Path]) -> None:
    img, truth = pair
    for bands, needle in ((["red", "red", "green"], "band role(s) red listed twice"),
                          (["red", "green", "alpha"], "alpha is not an input band"),
                          ([], "give the band roles the model reads"),
                          (["red", "purple"], "unknown band role(s) 'purple'")):
        cfg = _write_cfg(tmp_path / "t.yaml", out="run", bands=bands,
                         data=[{"image": str(img), "labels": str(truth)}])
        r = CliRunner().invoke(main, ["train", str(cfg), "--no-progress"])
        assert r.exit_code == 2 and needle in r.output and "Traceback" not in r.output, r.output
        assert "bands:" in r.output and not (tmp_path / "run").exists()


def test_teacher_beside_the_config_and_registered_names(
    tmp_path: Path, pair: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`pseudo.model: teacher.safetensors` is the file beside the config, from any working
    directory; registered names (labelfree, unet-default) stay names, init_from included."""
    img, truth = pair
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "teacher.safetensors").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "teacher.safetensors").write_bytes(b"a decoy in the working directory")
    cfg = _write_cfg(proj / "t.yaml", out="run", data=[
        {"image": str(img), "pseudo": {"model": "teacher.safetensors"}},
        {"image": str(img), "pseudo": {"model": "labelfree"}}],
        model={"arch": "unet", "encoder": "small", "init_from": "unet-default"})
    loaded = load_train_config(cfg)
    assert [p.pseudo.model for p in loaded.data if p.pseudo] == [
        str(proj / "teacher.safetensors"), "labelfree"]
    assert loaded.model.init_from == Path("unet-default")
    # the shipped model starts a training by its name (it was looked up as proj/unet-default)
    cfg = _write_cfg(proj / "t.yaml", out="run", epochs=1, steps_per_epoch=1,
                     model={"arch": "unet", "encoder": "small", "init_from": "unet-default"},
                     data=[{"image": str(img), "labels": str(truth)}])
    r = CliRunner().invoke(main, ["train", str(cfg), "--no-progress"])
    assert r.exit_code == 0, r.output
    meta, _ = read_bundle(proj / "run" / "model.safetensors")
    assert meta.training["init_from"] == "unet-default"
    cfg = _write_cfg(proj / "u.yaml", out="run2", epochs=1,
                     model={"arch": "unet", "encoder": "tiny", "init_from": "labelfree"},
                     data=[{"image": str(img), "labels": str(truth)}])
    r = CliRunner().invoke(main, ["train", str(cfg), "--no-progress"])
    assert r.exit_code == 2 and "init_from: labelfree: is a rule-based model" in r.output, r.output


def test_overwrite_starts_from_nothing_and_sigterm_stops_like_ctrl_c(
    tmp_path: Path, pair: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An --overwrite run interrupted in epoch 1 never offers --resume onto the old training;
    SIGTERM says what Ctrl-C says and exits 143."""
    import signal

    import agriseg.train.loop as loop

    img, truth = pair
    cfg = _write_cfg(tmp_path / "t.yaml", out="run",
                     data=[{"image": str(img), "labels": str(truth)}])
    assert CliRunner().invoke(main, ["train", str(cfg), "--no-progress"]).exit_code == 0
    run = tmp_path / "run"
    real = loop.evaluate
    handler = signal.getsignal(signal.SIGTERM)

    _stop_in_epoch(monkeypatch, 1)
    r = CliRunner().invoke(main, ["train", str(cfg), "--overwrite", "--no-progress"])
    assert r.exit_code == 143, r.output
    assert "Interrupted before epoch 1 of 2 finished" in r.output and "--resume" not in r.output
    assert "no epoch was saved. Start again with:" in r.output and "--overwrite" in r.output
    assert not (run / "history.json").exists()
    assert not (run / "checkpoint" / "last.json").exists()
    _stop_in_epoch(monkeypatch, 2)
    r = CliRunner().invoke(main, ["train", str(cfg), "--overwrite", "--no-progress"])
    assert r.exit_code == 143, r.output
    assert "Interrupted after epoch 1 of 2" in r.output
    assert "holds the best of its first 1 epoch(s)" in r.output and "--resume" in r.output
    assert signal.getsignal(signal.SIGTERM) == handler  # put back after the training
    monkeypatch.setattr(loop, "evaluate", real)
    r = CliRunner().invoke(main, ["train", str(cfg), "--resume", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert [h["epoch"] for h in json.loads((run / "history.json").read_text())] == [1, 2]


def _stop_in_epoch(monkeypatch: pytest.MonkeyPatch, epoch: int) -> None:
    """Send this process a real SIGTERM, as `kill` does, at the validation of ``epoch``."""
    import signal

    import agriseg.train.loop as loop

    real = loop.evaluate
    calls: list[int] = []

    def evaluate(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == epoch:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(loop, "evaluate", evaluate)


def _printed_command(output: str) -> list[str]:
    """The arguments after `agriseg` of the command an interrupted training printed."""
    import shlex

    line = output.split(" with:\n", 1)[1].splitlines()[0]
    args = shlex.split(line)
    assert args[:2] == ["agriseg", "train"], line
    return args[1:]


def test_the_printed_command_repeats_the_options_of_the_configuration(
    tmp_path: Path, pair: tuple[Path, Path], rgba_tif: Path, scheduler: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`--overwrite --epochs 3 --pseudo-labels S` interrupted printed `--resume` alone, which
    was refused as another configuration (its data lacked the survey); copy-pasted, the
    printed commands now go on. Paths are printed tidy (no "work/.." in them)."""
    import shutil

    img, truth = pair
    surveys = tmp_path / "my surveys"
    surveys.mkdir()
    survey = surveys / "field 1.tif"  # quoted in the printed command
    shutil.copy(rgba_tif, survey)
    cfg = _write_cfg(tmp_path / "t.yaml", out="work/../run",
                     data=[{"image": str(img), "labels": str(truth)}])
    options = ["--epochs", "3", "--pseudo-labels", str(survey), "--pseudo-labels", str(img),
               "--pseudo-model", "index-threshold", "--min-confidence", "0.9"]
    _stop_in_epoch(monkeypatch, 1)
    r = CliRunner().invoke(main, ["train", str(cfg), "--overwrite", *options, "--scheduler",
                                  scheduler, "--no-progress"])
    assert r.exit_code == 143, r.output
    assert "Interrupted before epoch 1 of 3 finished: no epoch was saved. Start again with:" \
        in r.output, r.output
    again = _printed_command(r.output)
    assert again == ["train", str(cfg), "--overwrite", *options, "--scheduler", scheduler]
    assert f"'{survey}'" in r.output  # the path with a space, quoted

    _stop_in_epoch(monkeypatch, 2)
    r = CliRunner().invoke(main, [*again, "--no-progress"])
    assert r.exit_code == 143, r.output
    run = tmp_path / "run"
    assert f"Interrupted after epoch 1 of 3. {run / 'model.safetensors'} holds the best of " \
           "its first 1 epoch(s) (epoch 1); continue with:" in r.output, r.output
    resume = _printed_command(r.output)
    assert resume == ["train", str(cfg), "--resume", *options, "--scheduler", scheduler]
    assert "/../" not in r.output, r.output

    monkeypatch.undo()
    # without one of its surveys: refused, saying that they belong to the configuration, and
    # before the other's pseudo-labels are prepared
    r = CliRunner().invoke(main, ["train", str(cfg), "--resume", *options[:4],
                                  *options[6:], "--no-progress"])
    assert r.exit_code == 2 and "data: 3 item(s) -> 2" in r.output, r.output
    assert "give the interrupted run's --pseudo-labels (each one)" in r.output
    assert "preparing pseudo-labels" not in r.output, r.output
    r = CliRunner().invoke(main, [*resume, "--no-progress"])
    assert r.exit_code == 0, r.output
    assert [h["epoch"] for h in json.loads((run / "history.json").read_text())] == [1, 2, 3]
    assert f"model bundle: {run / 'model.safetensors'}" in r.output and "/../" not in r.output
    meta, _ = read_bundle(run / "model.safetensors")
    assert [d["source"] for d in meta.training["images"]] == [
        "raster labels", "pseudo-labels", "pseudo-labels"]


def test_the_printed_command_on_resume_repeats_epochs_and_counts_saved_epochs(
    tmp_path: Path, pair: tuple[Path, Path]
) -> None:
    """Built from the checkpoint: a resumed run stopped before its first new epoch said
    "Interrupted after epoch 0", lower-case "continue" after the full stop."""
    from agriseg.cli.train import config_options, interrupted_message
    from agriseg.train.config import load_train_config

    img, truth = pair
    cfg = _write_cfg(tmp_path / "t.yaml", out="run", epochs=1,
                     data=[{"image": str(img), "labels": str(truth)}])
    assert CliRunner().invoke(main, ["train", str(cfg), "--no-progress"]).exit_code == 0
    loaded = load_train_config(cfg, epochs=4)
    text = interrupted_message(loaded, cfg, config_options(epochs=4, min_confidence=0.5), False)
    assert text.startswith("Interrupted after epoch 1 of 4. ") and "(epoch 1); continue" in text
    assert text.endswith(f"\n  agriseg train {cfg} --resume --epochs 4"), text
    assert config_options(pseudo=(Path("a b.tif"),), pseudo_model="m.safetensors",
                          min_confidence=0.85) == [
        "--pseudo-labels", "a b.tif", "--pseudo-model", "m.safetensors",
        "--min-confidence", "0.85"]


def test_label_nodata_that_is_a_class_value_is_named(tmp_path: Path,
                                                     pair: tuple[Path, Path]) -> None:
    """nodata 0 (as QGIS Rasterize may write) hides every soil label: the warning says so."""
    img, truth = pair
    with rasterio.open(truth) as ds:
        profile, classes = ds.profile, ds.read(1)
    zero = tmp_path / "nodata0.tif"
    with rasterio.open(zero, "w", **{**profile, "nodata": 0}) as dst:
        dst.write(classes, 1)
    cfg = _write_cfg(tmp_path / "t.yaml", out="run", epochs=1,
                     data=[{"image": str(img), "labels": str(zero)}])
    r = CliRunner().invoke(main, ["train", str(cfg), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "nodata value 0 is the value of class soil" in r.output, r.output
    assert f"gdal_edit.py -unsetnodata {zero}" in r.output


def test_resume_ignores_execution_settings_and_a_moved_project(
    tmp_path: Path, pair: tuple[Path, Path]
) -> None:
    """threads, device and scheduler may change on resume, and a project folder moved whole
    (config, data, out) resumes; checkpoints of the older identity still resume."""
    import shutil

    from safetensors.torch import load_file, save_file

    from agriseg.train.loop import _legacy_identity

    img, truth = pair
    proj = tmp_path / "proj"
    proj.mkdir()
    shutil.copy(img, proj / "field.tif")
    shutil.copy(truth, proj / "truth.tif")
    data = [{"image": "field.tif", "labels": "truth.tif"}]
    cfg = _write_cfg(proj / "t.yaml", out="run", epochs=1, threads=2, data=data)
    assert CliRunner().invoke(main, ["train", str(cfg), "--no-progress"]).exit_code == 0
    # a checkpoint written before identity version 2 (all settings, absolute paths)
    last = proj / "run" / "checkpoint" / "last.json"
    meta = json.loads(last.read_text())
    meta.pop("identity_version")
    meta["identity"] = _legacy_identity(load_train_config(cfg))
    last.write_text(json.dumps(meta))
    weights = last.with_suffix(".safetensors")
    save_file(load_file(str(weights)), str(weights))  # no state inside, as then
    r = CliRunner().invoke(main, ["train", str(cfg), "--resume", "--epochs", "2",
                                  "--no-progress"])
    assert r.exit_code == 0, r.output
    moved = tmp_path / "moved"
    shutil.move(proj, moved)
    cfg = _write_cfg(moved / "t.yaml", out="run", epochs=1, threads=1, device="cpu",
                     scheduler="tcp://127.0.0.1:1", data=data)
    r = CliRunner().invoke(main, ["train", str(cfg), "--resume", "--epochs", "3",
                                  "--no-progress"])
    assert r.exit_code == 0, r.output
    hist = json.loads((moved / "run" / "history.json").read_text())
    assert [h["epoch"] for h in hist] == [1, 2, 3]


def test_labels_within_one_block_are_trained_and_the_bundle_named_after_out(
    tmp_path: Path, pair: tuple[Path, Path]
) -> None:
    """Labels in one corner: the warning blamed block size as if the image were small; the
    bundle, at its default path, was named "model" like every other."""
    img, truth = pair
    with rasterio.open(truth) as ds:
        profile, classes = ds.profile, ds.read(1)
    corner = np.full_like(classes, 255)
    corner[:40, :40] = classes[:40, :40]
    labels = tmp_path / "corner.tif"
    with rasterio.open(labels, "w", **{**profile, "nodata": 255}) as dst:
        dst.write(corner, 1)
    cfg = _write_cfg(tmp_path / "t.yaml", out="field-a", epochs=1, steps_per_epoch=1,
                     data=[{"image": str(img), "labels": str(labels)}])
    r = CliRunner().invoke(main, ["train", str(cfg), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "no validation block: the labels of each image lie within one block of 64 px, " \
           "which training keeps" in r.output, r.output
    bundle = tmp_path / "field-a" / "model.safetensors"
    meta, _ = read_bundle(bundle)
    assert meta.name == "field-a"
    r = CliRunner().invoke(main, ["models", str(bundle)])
    assert "name:         field-a" in r.output and "validation:   none" in r.output, r.output
