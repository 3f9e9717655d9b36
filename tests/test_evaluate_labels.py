"""`agriseg evaluate` against label rasters as datasets ship them: their own nodata, binary
0/255 masks, partial class sets, other codings, PNG tiles, JPEG and colour-coded labels."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from agriseg.cli import main
from agriseg.errors import ConfigError, GridMismatchError, InputError
from agriseg.metrics import (
    evaluate_rasters,
    parse_pred_classes,
    parse_truth_classes,
    parse_truth_colors,
)
from tests.test_metrics import CLASSES, _tif

#: WeedMap-style colours: background black, crop green, weed red.
COLOURS = {0: (0, 0, 0), 1: (0, 255, 0), 2: (255, 0, 0), 3: (255, 0, 255),
           255: (255, 255, 255)}


def _png(path: Path, data: np.ndarray, mode: str | None = None) -> Path:
    Image.fromarray(data, mode).save(path)
    return path


def _rgb(classes: np.ndarray) -> np.ndarray:
    rgb = np.zeros((*classes.shape, 3), np.uint8)
    for value, colour in COLOURS.items():
        rgb[classes == value] = colour
    return rgb


def test_truth_nodata_is_unlabelled_without_a_mapping(tmp_path: Path) -> None:
    """A declared nodata (9, int16 -1) was unlabelled only with --truth-classes."""
    pred = _tif(tmp_path / "p.tif", CLASSES, nodata=255)
    nine = _tif(tmp_path / "nine.tif", np.where(CLASSES == 255, 9, CLASSES).astype(np.uint8),
                nodata=9)
    minus = _tif(tmp_path / "minus.tif",
                 np.where(CLASSES == 255, -1, CLASSES).astype(np.int16), nodata=-1)
    for truth in (nine, minus):
        scores = evaluate_rasters(pred, truth)
        assert scores.accuracy == 1.0 and scores.confusion.sum() == 7


def test_declared_nodata_that_is_a_class_is_warned_of(tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    pred = _tif(tmp_path / "p.tif", CLASSES, nodata=255)
    truth = _tif(tmp_path / "t.tif", CLASSES, nodata=0)
    with caplog.at_level(logging.WARNING, "agriseg.metrics"):
        scores = evaluate_rasters(pred, truth)
    assert scores.confusion[0].sum() == 0  # soil read as unlabelled, as declared
    assert "value 0 (soil) is the file's declared nodata" in caplog.text
    assert "--truth-classes 0=soil,1=crop,2=weed,3=disease" in caplog.text


def test_binary_mask_warns_and_scores_with_merged_classes(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An Agriculture-Vision 0/255 weed mask lost every weed pixel to "255 = unlabelled"."""
    pred_classes = np.array([[0, 1, 2, 3, 2, 0]], np.uint8)
    pred = _tif(tmp_path / "p.tif", pred_classes, nodata=255)
    mask = _png(tmp_path / "weed.png", np.array([[0, 0, 255, 0, 255, 255]], np.uint8))
    with caplog.at_level(logging.WARNING, "agriseg.metrics"):
        evaluate_rasters(pred, mask)
    assert "holds only values 0 and 255, and 255 is read as unlabelled" in caplog.text
    hint = "--truth-classes 0=soil,255=weed --pred-classes crop=soil,disease=soil"
    assert hint in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, "agriseg.metrics"):
        scores = evaluate_rasters(pred, mask, truth_classes=parse_truth_classes("0=soil,255=weed"),
                                  pred_classes=parse_pred_classes("crop=soil,disease=soil"))
    assert not caplog.text  # 255 is named now
    assert scores.confusion.tolist() == [[3, 0, 0, 0], [0, 0, 0, 0], [1, 0, 2, 0], [0, 0, 0, 0]]
    assert scores.miou_classes == ("soil", "weed")
    assert scores.left_out == {"crop": "merged into soil", "disease": "merged into soil"}
    assert parse_pred_classes("Disease=ignore") == {3: 255}
    with pytest.raises(ConfigError, match=r"classes among soil, crop, weed, disease, e\.g\."):
        parse_pred_classes("crop=dirt")
    with pytest.raises(ConfigError, match="class 'crop' is given twice"):
        parse_pred_classes("crop=soil,crop=weed")
    # the CLI option, documented in --help
    r = CliRunner().invoke(main, ["evaluate", str(pred), str(mask), "--truth-classes",
                                  "0=soil,255=weed", "--pred-classes", "crop=soil,disease=soil"])
    assert r.exit_code == 0, r.output
    assert "merged into soil, not in mean IoU" in r.output
    assert "mean IoU 0.7083 over soil, weed" in r.output  # soil 3/4, weed 2/3
    help_text = CliRunner().invoke(main, ["evaluate", "--help"]).output
    assert "--pred-classes" in help_text and "--truth-colors" in help_text


def test_classes_the_mapping_does_not_name_are_left_out_of_the_mean(tmp_path: Path) -> None:
    """A soil/crop/weed truth: stray disease pixels scored 0 and dragged the mean down."""
    pred = _tif(tmp_path / "p.tif", np.array([[0, 1, 2, 3, 1, 0]], np.uint8), nodata=255)
    truth = _tif(tmp_path / "t.tif", np.array([[5, 6, 7, 5, 6, 5]], np.uint8))
    mapping = "5=soil,6=crop,7=weed"
    scores = evaluate_rasters(pred, truth, truth_classes=parse_truth_classes(mapping))
    assert scores.left_out == {"disease": "not in truth"}
    assert scores.miou == pytest.approx((2 / 3 + 1 + 1) / 3)
    assert "(not in truth, not in mean IoU)" in scores.table()
    r = CliRunner().invoke(main, ["evaluate", str(pred), str(truth), "--truth-classes", mapping,
                                  "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output[r.output.index("{"):])
    assert out["miou_classes"] == ["soil", "crop", "weed"]
    assert out["left_out"] == {"disease": "not in truth"}
    # Without a mapping the truth is read as all four classes: the mean covers each present.
    plain = _tif(tmp_path / "plain.tif", np.array([[0, 1, 2, 0, 1, 0]], np.uint8))
    assert evaluate_rasters(pred, plain).miou_classes == ("soil", "crop", "weed", "disease")


def test_json_writes_null_for_classes_absent_from_both(tmp_path: Path) -> None:
    pred = _tif(tmp_path / "p.tif", np.array([[0, 1, 0]], np.uint8), nodata=255)
    truth = _tif(tmp_path / "t.tif", np.array([[0, 1, 1]], np.uint8))
    r = CliRunner().invoke(main, ["evaluate", str(pred), str(truth), "--json"])
    assert r.exit_code == 0, r.output

    def refuse(name: str) -> None:
        raise AssertionError(f"{name} is not JSON")

    out = json.loads(r.output[r.output.index("{"):], parse_constant=refuse)
    assert out["iou"]["weed"] is None and out["f1"]["disease"] is None
    assert out["miou_classes"] == ["soil", "crop"]


@pytest.mark.parametrize(("codes", "nodata", "example", "note"), [
    # classes 1..4 beside a declared nodata 0: the 0 is not to be mapped
    ([[1, 2, 3, 4], [0, 1, 2, 0]], 0, "1=soil,2=crop,3=weed,4=disease",
     "0 (its declared nodata) is already read as unlabelled"),
    # 10/20/30 beside 255: the three classes in order (all three were ignored)
    ([[10, 20, 30, 255], [10, 10, 20, 30]], None, "10=soil,20=crop,30=weed",
     "255 is already read as unlabelled"),
    # 0 beside codes none of which is a class: 0 may be soil or the unlabelled background
    ([[0, 10, 20, 30]], None,
     "0=soil,10=crop,20=weed,30=disease (or, if 0 is unlabelled, 0=ignore,10=soil,20=crop,"
     "30=weed)", None),
])
def test_suggested_mapping_fits_the_codes(tmp_path: Path, codes: list[list[int]],
                                          nodata: int | None, example: str,
                                          note: str | None) -> None:
    truth = _tif(tmp_path / "t.tif", np.array(codes, np.uint8), nodata=nodata)
    pred = _tif(tmp_path / "p.tif", np.zeros_like(np.array(codes, np.uint8)), nodata=255)
    with pytest.raises(InputError) as err:
        evaluate_rasters(pred, truth)
    assert str(err.value).endswith(f"e.g. --truth-classes {example}"), err.value
    if note:
        assert note in str(err.value)
    if "(or" not in example:  # pasted, it scores
        evaluate_rasters(pred, truth, truth_classes=parse_truth_classes(example))


def test_suggested_mapping_ignores_an_undeclared_negative_code(tmp_path: Path) -> None:
    """-1 beside 1..4 with no nodata declared: 0..3 kept as they were ignored disease."""
    codes = np.array([[-1, 1, 2, 3], [4, 4, 1, -1]], np.int16)
    truth = _tif(tmp_path / "t.tif", codes)
    pred = _tif(tmp_path / "p.tif", np.zeros(codes.shape, np.uint8), nodata=255)
    with pytest.raises(InputError) as err:
        evaluate_rasters(pred, truth)
    example = "1=soil,2=crop,3=weed,4=disease,-1=ignore"
    assert str(err.value).endswith(f"e.g. --truth-classes {example}"), err.value
    evaluate_rasters(pred, truth, truth_classes=parse_truth_classes(example))


@pytest.mark.parametrize(("codes", "example"), [
    ([0, 1, 2, -1], "0=soil,1=crop,2=weed,3=disease,-1=ignore"),  # classes beside a -1
    ([0, 1, 3, 200], "0=soil,1=crop,2=weed,3=disease,200=ignore"),  # classes and a stray
])
def test_codes_that_are_classes_keep_their_classes(tmp_path: Path, codes: list[int],
                                                    example: str) -> None:
    truth = _tif(tmp_path / "t.tif", np.array([codes, codes], np.int16))
    pred = _tif(tmp_path / "p.tif", np.zeros((2, 4), np.uint8), nodata=255)
    with pytest.raises(InputError) as err:
        evaluate_rasters(pred, truth)
    assert str(err.value).endswith(f"e.g. --truth-classes {example}"), err.value


def test_int8_truth_with_its_nodata(tmp_path: Path) -> None:
    """int8 kept -1 where 255 was written back: "-1 (its declared nodata)" was refused."""
    truth = _tif(tmp_path / "t.tif", np.array([[0, 1, -1, 2]], np.int8), nodata=-1)
    pred = _tif(tmp_path / "p.tif", np.array([[0, 1, 3, 2]], np.uint8), nodata=255)
    assert evaluate_rasters(pred, truth).accuracy == 1.0


def test_png_size_mismatch_names_the_sizes(tmp_path: Path) -> None:
    """A PNG tile has no CRS: its LOCAL_CS WKT and a gdalwarp -t_srs hint only confused."""
    pred = _png(tmp_path / "p.png", np.zeros((2, 4), np.uint8))
    truth = _png(tmp_path / "t.png", np.zeros((3, 4), np.uint8))
    with pytest.raises(GridMismatchError) as err:
        evaluate_rasters(pred, truth)
    msg = str(err.value)
    assert "sizes differ, prediction 4x2 vs truth 4x3 (width x height); the label must have " \
           "the image's size" in msg
    assert "LOCAL_CS" not in msg and "gdalwarp" not in msg


def test_jpeg_labels_are_refused_as_lossy(tmp_path: Path) -> None:
    pred = _png(tmp_path / "p.png", np.zeros((8, 8), np.uint8))
    labels = np.zeros((8, 8), np.uint8)
    labels[2:6, 2:6] = 2
    Image.fromarray(labels).save(tmp_path / "t.jpg", quality=90)
    with pytest.raises(InputError, match=r"t\.jpg: is a JPEG, and JPEG is lossy \(its "
                                         r"compression invents values at class edges\); save "
                                         "the truth as PNG or TIFF"):
        evaluate_rasters(pred, tmp_path / "t.jpg")


def test_colour_coded_truths(tmp_path: Path) -> None:
    """WeedMap-style RGB labels were refused with no way forward."""
    pred = _png(tmp_path / "p.png", np.where(CLASSES == 3, 0, CLASSES))
    truth_classes = np.where(CLASSES == 3, 0, CLASSES)
    rgb = _png(tmp_path / "rgb.png", _rgb(truth_classes))
    with pytest.raises(InputError, match=r"has 3 bands.*--truth-colors R,G,B=CLASS"):
        evaluate_rasters(pred, rgb)
    colours = parse_truth_colors("0,0,0=soil;0,255,0=crop;255,0,0=weed; 255,255,255=ignore")
    scores = evaluate_rasters(pred, rgb, truth_colors=colours)
    assert scores.accuracy == 1.0 and scores.confusion.sum() == 7
    assert scores.left_out == {"disease": "not in truth"}
    # RGBA: transparent pixels are unlabelled whatever their colour
    alpha = np.full(CLASSES.shape, 255, np.uint8)
    alpha[0, 0] = 0
    rgba = _png(tmp_path / "rgba.png", np.dstack([_rgb(truth_classes), alpha]), "RGBA")
    assert evaluate_rasters(pred, rgba, truth_colors=colours).confusion.sum() == 6
    # a palette PNG maps through its colour table
    palette = Image.fromarray(truth_classes, "P")
    table = [0] * 768
    for value, colour in COLOURS.items():
        table[value * 3:value * 3 + 3] = colour
    palette.putpalette(table)
    palette.save(tmp_path / "pal.png")
    assert evaluate_rasters(pred, tmp_path / "pal.png",
                            truth_colors=colours).accuracy == 1.0
    # unnamed colours: the most frequent first, with their pixel counts
    with pytest.raises(InputError, match=r"holds colours that --truth-colors does not name: "
                                         r"0,255,0 \(2 px\), 255,0,0 \(2 px\)"):
        evaluate_rasters(pred, rgb, truth_colors=parse_truth_colors("0,0,0=soil"))
    with pytest.raises(ConfigError, match=r"expected R,G,B=CLASS .*e\.g\. 0,0,0=soil;0,255,0="
                                          "crop"):
        parse_truth_colors("0,0,0=soil,0,255,0=crop")
    with pytest.raises(InputError, match="--truth-colors needs colour-coded labels"):
        evaluate_rasters(pred, tmp_path / "p.png", truth_colors=colours)
    r = CliRunner().invoke(main, ["evaluate", str(pred), str(rgb), "--truth-colors",
                                  "0,0,0=soil;0,255,0=crop;255,0,0=weed;255,255,255=ignore"])
    assert r.exit_code == 0 and "pixel accuracy 1.0000" in r.output, r.output
    r = CliRunner().invoke(main, ["evaluate", str(pred), str(rgb), "--truth-colors",
                                  "0,0,0=soil", "--truth-classes", "0=soil"])
    assert r.exit_code == 2 and "not both" in r.output


def test_grey_and_alpha_truth_says_to_take_band_one(tmp_path: Path) -> None:
    pred = _png(tmp_path / "p.png", CLASSES)
    la = _png(tmp_path / "la.png", np.dstack([CLASSES, np.full(CLASSES.shape, 255, np.uint8)]),
              "LA")
    with pytest.raises(InputError, match=r"has 2 bands \(grey and alpha\?\).*gdal_translate -b 1"):
        evaluate_rasters(pred, la)


def test_an_image_given_as_prediction_gets_no_default_classes_note(tmp_path: Path) -> None:
    """The note 'scoring it as the default classes' came before 'has 4 bands'."""
    image = _tif(tmp_path / "image.tif", np.zeros((4, 2, 4), np.uint8))
    truth = _tif(tmp_path / "t.tif", CLASSES)
    r = CliRunner().invoke(main, ["evaluate", str(image), str(truth)])
    assert r.exit_code == 2 and "has 4 bands" in r.output
    assert "default classes" not in r.output

