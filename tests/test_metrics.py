"""Accuracy against truth rasters: what evaluate_rasters refuses and how it maps truths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine

from agriseg.errors import ConfigError, InputError
from agriseg.metrics import evaluate_rasters, parse_truth_classes

CLASSES = np.array([[0, 1, 2, 3], [0, 1, 2, 255]], np.uint8)


def _tif(path: Path, data: np.ndarray, nodata: float | None = None) -> Path:
    bands = data if data.ndim == 3 else data[None]
    with rasterio.open(path, "w", driver="GTiff", width=bands.shape[2], height=bands.shape[1],
                       count=bands.shape[0], dtype=bands.dtype, crs="EPSG:32615",
                       nodata=nodata, transform=Affine(0.1, 0, 5e5, 0, -0.1, 5e6)) as dst:
        dst.write(bands)
    return path


def test_refuses_what_is_not_a_class_raster(tmp_path: Path) -> None:
    truth = _tif(tmp_path / "t.tif", CLASSES, nodata=255)
    image = _tif(tmp_path / "rgb.tif", np.stack([CLASSES] * 3))
    with pytest.raises(InputError, match="has 3 bands; the prediction must be a single-band"):
        evaluate_rasters(image, truth)
    with pytest.raises(InputError, match="has 3 bands; the truth"):
        evaluate_rasters(truth, image)
    floats = _tif(tmp_path / "f.tif", CLASSES.astype(np.float32) + 0.5)
    with pytest.raises(InputError, match="holds float32 values"):
        evaluate_rasters(floats, truth)
    odd = _tif(tmp_path / "odd.tif", (CLASSES.astype(np.int16) - 1))  # -1 .. 254
    with pytest.raises(InputError, match=r"odd.tif: holds values \[-1, 254\]"):
        evaluate_rasters(odd, truth)  # was a ValueError from deep inside numpy
    # a confidence raster given as truth: no mapping of 60 values to paste
    conf = _tif(tmp_path / "conf.tif", np.arange(40, 100, dtype=np.uint8).reshape(6, 10))
    pred = _tif(tmp_path / "p.tif", np.zeros((6, 10), np.uint8))
    with pytest.raises(InputError, match=r"more than 20 values .* a continuous raster"):
        evaluate_rasters(pred, conf)


def test_truth_with_negative_codes_and_its_own_nodata(tmp_path: Path) -> None:
    pred = _tif(tmp_path / "p.tif", CLASSES, nodata=255)
    # Coded -1 = soil, 0 = crop, 1 = weed, 2 = disease; nodata -9999 in the corner.
    coded = np.where(CLASSES == 255, -9999, CLASSES.astype(np.int16) - 1).astype(np.int16)
    truth = _tif(tmp_path / "t.tif", coded, nodata=-9999)
    with pytest.raises(InputError) as err:
        evaluate_rasters(pred, truth)
    # The example maps the four codes to the four classes in order and leaves out the
    # declared nodata (it suggested 0..3 as they are and -1=ignore: nothing right).
    assert str(err.value).endswith("(its declared nodata) is already read as unlabelled, "
                                   "e.g. --truth-classes -1=soil,0=crop,1=weed,2=disease")
    # More codes than classes: the classes as they are, and each unknown value once (it used
    # to repeat a known one).
    five = _tif(tmp_path / "five.tif", np.array([[-1, 0, 1, 2, 3, 0]], np.int16))
    with pytest.raises(InputError, match=r"e\.g\. --truth-classes 0=soil,1=crop,2=weed,"
                                         r"3=disease,-1=ignore$"):
        evaluate_rasters(_tif(tmp_path / "p6.tif", np.zeros((1, 6), np.uint8)), five)
    mapping = parse_truth_classes("-1=soil,0=crop,1=weed,2=disease")
    scores = evaluate_rasters(pred, truth, truth_classes=mapping)
    assert scores.accuracy == 1.0 and scores.confusion.sum() == 7  # the nodata pixel ignored
    with pytest.raises(ConfigError, match="VALUE an integer"):
        parse_truth_classes("x=soil")
    with pytest.raises(ConfigError, match="value 0 is given twice"):
        parse_truth_classes("0=soil,0=crop,1=crop")  # the last pair won, silently
    with pytest.raises(ConfigError, match="no value a label raster can hold"):
        parse_truth_classes("99999999999999999999999=soil")


def test_evaluate_scores_a_run_of_other_classes_on_them(tmp_path: Path) -> None:
    """A model of other classes was scored as soil/crop/weed/disease (or refused)."""
    import json

    from click.testing import CliRunner

    from agriseg.classes import ClassSchema, SegClass
    from agriseg.cli import main

    schema = ClassSchema((SegClass(0, "background", (1, 1, 1)), SegClass(1, "plant", (2, 2, 2)),
                          SegClass(2, "thistle", (3, 3, 3), True),
                          SegClass(3, "mud", (4, 4, 4)), SegClass(4, "stress", (5, 5, 5), True)))
    run = tmp_path / "run"
    run.mkdir()
    pred = np.array([[0, 1, 2, 3, 4, 4]], np.uint8)
    _tif(run / "classes.tif", pred, nodata=255)
    (run / "run.json").write_text(json.dumps({"schema": schema.to_dict()}))
    truth = _tif(tmp_path / "t.tif", np.array([[7, 1, 2, 3, 4, 1]], np.uint8))
    r = CliRunner().invoke(main, ["evaluate", str(run / "classes.tif"), str(truth),
                                  "--truth-classes", "7=background,1=plant,2=thistle,3=mud,"
                                  "4=stress", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert list(out["iou"]) == ["background", "plant", "thistle", "mud", "stress"]
    assert out["iou"]["stress"] == 0.5 and out["iou"]["background"] == 1.0
    # moved away from its run.json: the mask's own band description names its classes
    alone = tmp_path / "alone.tif"
    _tif(alone, pred, nodata=255)
    with rasterio.open(alone, "r+") as ds:
        ds.set_band_description(1, "class id (0=background, 1=plant, 2=thistle, 3=mud, "
                                   "4=stress, 255=nodata)")
    r = CliRunner().invoke(main, ["evaluate", str(alone), str(truth), "--truth-classes",
                                  "7=background,1=plant,2=thistle,3=mud,4=stress", "--json"])
    assert r.exit_code == 0, r.output
    assert "classes its band description names: background, plant" in r.output
    # a class may itself be called "nodata": the last such entry is the nodata value
    from agriseg.cli.evaluate import _described_schema

    with rasterio.open(alone, "r+") as ds:
        ds.set_band_description(1, "class id (0=soil, 1=nodata, 2=crop (maize), 255=nodata)")
    own, is_mask = _described_schema(alone)
    assert is_mask and own is not None and own.names == ("soil", "nodata", "crop (maize)")
    assert own.nodata == 255


def test_coded_truth_gets_a_mapping_that_works(tmp_path: Path) -> None:
    """Codes 10/20/30/40 with 255 unlabelled: the suggested mapping, pasted, scores them."""
    pred = _tif(tmp_path / "p.tif", CLASSES, nodata=255)
    coded = np.where(CLASSES == 255, 255, (CLASSES.astype(np.int16) + 1) * 10).astype(np.uint8)
    truth = _tif(tmp_path / "t.tif", coded)  # no nodata tag: 255 is still unlabelled
    with pytest.raises(InputError) as err:
        evaluate_rasters(pred, truth)
    example = str(err.value).rsplit("--truth-classes ", 1)[1]
    assert example == "10=soil,20=crop,30=weed,40=disease"
    scores = evaluate_rasters(pred, truth, truth_classes=parse_truth_classes(example))
    assert scores.accuracy == 1.0
    with pytest.raises(InputError, match="no labelled pixel is left"):
        evaluate_rasters(pred, truth, truth_classes=parse_truth_classes(
            "10=ignore,20=ignore,30=ignore,40=ignore"))


def test_classes_without_truth_pixels_are_marked_and_a_second_mean_follows() -> None:
    """A predicted-only class scores IoU 0 in the documented mean; the truth's own mean too."""
    from agriseg.metrics import Scores

    # soil, crop, weed in the truth; disease predicted only; weed merged away (left out)
    conf = np.array([[90, 5, 0, 5], [2, 40, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    scores = Scores(conf, ("soil", "crop", "weed", "disease"), {"weed": "merged into soil"})
    assert scores.miou_classes == ("soil", "crop", "disease")
    assert scores.no_truth == ("disease",)  # weed is left out, not in the mean: unmarked
    assert scores.miou == pytest.approx((90 / 102 + 40 / 47 + 0) / 3)
    assert scores.miou_truth == pytest.approx((90 / 102 + 40 / 47) / 2)
    table = scores.table()
    assert "(no truth pixels: IoU 0, in mean IoU)" in table
    assert (f"mean IoU over the classes the truth holds (soil, crop): "
            f"{scores.miou_truth:.4f}") in table
    d = scores.to_dict()
    assert d["no_truth_pixels"] == ["disease"] and d["miou_truth_classes"] == ["soil", "crop"]
    assert d["miou"] == pytest.approx(scores.miou)  # the existing key keeps its meaning


def test_poor_models_are_not_taken_for_an_unlabelled_zero() -> None:
    """Dropping real soil labels raises the accuracy of any model poor on the rest: a model
    that misses all weed, or predicts soil everywhere, was told to read 0 as unlabelled
    (found on the real samples' maps against perturbed copies)."""
    from agriseg.metrics import suggest_truth_coding

    # rows truth soil / crop / weed / disease; Lamberton 09-05 with every weed predicted soil
    misses_weed = np.array([[629_000, 0, 0, 0], [0, 141_000, 0, 0], [17_000, 0, 0, 0],
                            [0, 0, 0, 0]])
    assert suggest_truth_coding(misses_weed) is None
    all_soil = np.array([[470_000, 0, 0, 0], [530_000, 0, 0, 0], [0] * 4, [0] * 4])
    assert suggest_truth_coding(all_soil) is None
    # ... while 1..3 beside an unlabelled 0 that samples the scene is still read so
    shifted = np.array([[30_000, 8_000, 1_000, 0], [60_000, 1_000, 0, 0],
                        [2_000, 15_000, 0, 0], [0, 300, 2_500, 0]])
    rec = suggest_truth_coding(shifted)
    assert rec is not None and rec.option == "--truth-classes 0=ignore,1=soil,2=crop,3=weed"
