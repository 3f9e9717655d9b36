"""`agriseg evaluate` against label rasters as datasets ship them: their own nodata, binary
0/255 masks, partial class sets, other codings, PNG tiles, JPEG and colour-coded labels."""

from __future__ import annotations

import json
import logging
import shlex
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from click.testing import CliRunner
from PIL import Image

from agriseg.classes import DEFAULT_CLASSES
from agriseg.cli import main
from agriseg.errors import ConfigError, GridMismatchError, InputError
from agriseg.metrics import (
    evaluate_rasters,
    parse_pred_classes,
    parse_truth_classes,
    parse_truth_colors,
    suggest_truth_coding,
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



def _field(seed: int = 0, shape: tuple[int, int] = (40, 40)) -> np.ndarray:
    """A field's truth: mostly soil, crop rows, weed patches, a little disease."""
    rng = np.random.default_rng(seed)
    truth = np.zeros(shape, np.uint8)
    truth[:, ::4] = 1
    truth[:, 1::4] = 1
    truth[rng.random(shape) < 0.12] = 2
    truth[rng.random(shape) < 0.03] = 3
    return truth


def _noisy(truth: np.ndarray, share: float, seed: int = 1) -> np.ndarray:
    """``truth`` with ``share`` of its pixels set to a random class."""
    rng = np.random.default_rng(seed)
    pred = truth.copy()
    hit = rng.random(truth.shape) < share
    pred[hit] = rng.integers(0, 4, int(hit.sum()))
    return pred


def _evaluate(*args: object) -> tuple[int, str]:
    r = CliRunner().invoke(main, ["evaluate", *map(str, args)])
    return r.exit_code, r.output


def test_shifted_coding_is_warned_of_with_the_option_that_reads_it(tmp_path: Path) -> None:
    """Labels 1..3 (0 unlabelled) were scored as crop..disease: accuracy 0.39, no hint."""
    cls = np.minimum(_field(), 2)
    pred = _tif(tmp_path / "p.tif", _noisy(cls, 0.03), nodata=255)
    shifted = cls + 1
    shifted[:, 25:] = 0  # unlabelled part
    truth = _tif(tmp_path / "t.tif", shifted)
    before = evaluate_rasters(pred, truth)
    code, out = _evaluate(pred, truth)
    assert code == 0, out
    assert f"pixel accuracy {before.accuracy:.4f}" in out  # the scores stay as read
    assert before.accuracy < 0.6
    warning = out[out.index("Warning: the truth may be coded otherwise"):]
    assert out.index("confusion (rows truth") < out.index("Warning:")  # after the scores
    assert "truth value 1 (scored as crop) is 9" in warning
    assert "% predicted soil, 2 (scored as weed)" in warning
    assert "and 0 would be unlabelled" in warning
    option = "--truth-classes 0=ignore,1=soil,2=crop,3=weed"
    assert f"rerun with {option}; if it is not" in warning
    code, out = _evaluate(pred, truth, *option.split())
    assert code == 0 and "Warning" not in out, out
    assert evaluate_rasters(pred, truth, truth_classes=parse_truth_classes(
        option.split()[1])).accuracy > 0.95


def test_shifted_coding_beside_nodata_0_is_not_called_soil(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """1..3 with nodata=0: the hint said "if 0 means soil, map 0=soil,1=crop,...": wrong."""
    cls = np.minimum(_field(), 2)
    pred = _tif(tmp_path / "p.tif", _noisy(cls, 0.03), nodata=255)
    shifted = cls + 1
    shifted[:, 30:] = 0
    truth = _tif(tmp_path / "t.tif", shifted, nodata=0)
    with caplog.at_level(logging.WARNING, "agriseg.metrics"):
        evaluate_rasters(pred, truth)
    assert "declared nodata" not in caplog.text  # the recoding below says what 0 is
    code, out = _evaluate(pred, truth)
    assert code == 0, out
    assert "declared nodata" not in out and "0=soil" not in out
    assert "rerun with --truth-classes 1=soil,2=crop,3=weed; if it is not" in out
    assert "would be unlabelled" not in out  # 0 is unlabelled already, as declared
    # the soil column of a truth without soil pixels is marked
    assert "(no truth pixels: IoU 0, in mean IoU)" in out
    code, out = _evaluate(pred, truth, "--truth-classes", "1=soil,2=crop,3=weed")
    assert code == 0 and "Warning" not in out, out


def test_swapped_classes_are_warned_of_under_a_field_of_soil(tmp_path: Path) -> None:
    """0 soil, 1 weed, 2 crop: crop/weed IoU 0 while soil kept pixel accuracy at 0.8."""
    cls = np.minimum(_field(), 2)
    pred = _tif(tmp_path / "p.tif", _noisy(cls, 0.02), nodata=255)
    swapped = np.choose(cls, [0, 2, 1]).astype(np.uint8)
    truth = _tif(tmp_path / "t.tif", swapped)
    code, out = _evaluate(pred, truth)
    assert code == 0, out
    assert "rerun with --truth-classes 0=soil,1=weed,2=crop; if it is not" in out
    # A wrong --truth-classes is read through: the option maps the same values anew.
    code, out = _evaluate(pred, truth, "--truth-classes", "0=soil,1=crop,2=weed")
    assert "rerun with --truth-classes 0=soil,1=weed,2=crop; if it is not" in out, out
    code, out = _evaluate(pred, truth, "--truth-classes", "0=soil,1=weed,2=crop")
    assert code == 0 and "Warning" not in out, out
    # colour-coded labels get a --truth-colors back
    rgb = _png(tmp_path / "rgb.png", _rgb(swapped))
    pred_png = _png(tmp_path / "p.png", _noisy(cls, 0.02))
    code, out = _evaluate(pred_png, rgb, "--truth-colors",
                          "0,0,0=soil;0,255,0=crop;255,0,0=weed")
    assert "rerun with --truth-colors '0,0,0=soil;0,255,0=weed;255,0,0=crop'" in out, out
    # --json: the reading as a new key, the warning on stderr, stdout one JSON document
    r = CliRunner().invoke(main, ["evaluate", str(pred), str(truth), "--json"])
    out = json.loads(r.stdout)
    assert out["truth_coding"]["option"] == "--truth-classes 0=soil,1=weed,2=crop"
    assert out["truth_coding"]["codes"][1] == {
        "code": "1", "scored_as": "crop", "reads_as": "weed",
        "share": out["truth_coding"]["codes"][1]["share"]}
    assert "Warning: the truth may be coded otherwise" in r.stderr
    assert out["accuracy"] == out["truth_coding"]["accuracy"]  # the scores stay as read


@pytest.mark.parametrize("model", [
    "noise 10 %", "noise 25 %", "noise 35 %", "crop 40 % as weed", "weed all as crop",
    "weed and disease all as crop", "all soil", "half crop as soil", "disease as weed",
])
def test_no_coding_warning_on_a_rightly_coded_truth(tmp_path: Path, model: str) -> None:
    """Poor and fair models on the right coding: the thresholds never call it a coding."""
    truth = _field(seed=3)
    rng = np.random.default_rng(4)
    pred = truth.copy()
    if model.startswith("noise"):
        pred = _noisy(truth, int(model.split()[1]) / 100, seed=5)
    elif model == "crop 40 % as weed":
        pred[(truth == 1) & (rng.random(truth.shape) < 0.4)] = 2
    elif model == "weed all as crop":
        pred[truth == 2] = 1
    elif model == "weed and disease all as crop":
        pred[truth >= 2] = 1
    elif model == "all soil":
        pred[:] = 0
    elif model == "half crop as soil":
        pred[(truth == 1) & (rng.random(truth.shape) < 0.5)] = 0
    elif model == "disease as weed":
        pred[truth == 3] = 2
    p = _tif(tmp_path / "p.tif", pred, nodata=255)
    for truth_file in (_tif(tmp_path / "t.tif", truth),
                       _tif(tmp_path / "t012.tif", np.minimum(truth, 2))):
        code, out = _evaluate(p, truth_file)
        assert code == 0 and "Warning" not in out, (model, out)
        scores = evaluate_rasters(p, truth_file)
        assert suggest_truth_coding(scores.confusion) is None


def test_coding_check_on_confusion_matrices() -> None:
    """The check itself: shifts, swaps, and what it leaves alone."""
    # right coding, good model
    good = np.array([[900, 20, 10, 0], [15, 300, 25, 0], [5, 20, 100, 0], [0, 5, 0, 20]])
    assert suggest_truth_coding(good) is None
    # a swap of two tiny classes (under 1 % of the pixels) is no coding
    tiny = good.copy()
    tiny[3] = [0, 0, 0, 0]
    tiny[[1, 2]] = tiny[[2, 1]]
    tiny = np.array([[9000, 20, 10, 0], [5, 20, 10, 0], [15, 25, 3, 0], [0, 0, 0, 0]])
    assert suggest_truth_coding(tiny) is None
    # truth values 1..3 of soil..weed, nothing at 0
    shifted = np.zeros((4, 4), np.int64)
    shifted[1:, :3] = good[:3, :3]
    got = suggest_truth_coding(shifted)
    assert got is not None and got.option == "--truth-classes 1=soil,2=crop,3=weed"
    assert got.accuracy == pytest.approx(np.trace(shifted) / shifted.sum())
    assert got.recoded == pytest.approx(1300 / 1395)
    assert [c[:3] for c in got.codes] == [("1", "crop", "soil"), ("2", "weed", "crop"),
                                          ("3", "disease", "weed")]
    # a mapping given: its values are mapped anew, ignored ones kept
    got = suggest_truth_coding(shifted, truth_classes={7: 1, 8: 2, 9: 3, 0: 255})
    assert got is not None
    assert got.option == "--truth-classes 0=ignore,7=soil,8=crop,9=weed"


def test_mean_iou_over_the_classes_the_truth_holds(tmp_path: Path) -> None:
    """0/1/2 labels, 42 stray disease pixels: mean IoU 0.74 instead of 0.98, unmarked."""
    truth = np.minimum(_field(seed=7, shape=(60, 60)), 2)
    pred = truth.copy()
    pred[:6, :7] = 3  # 42 disease pixels
    p = _tif(tmp_path / "p.tif", pred, nodata=255)
    t = _tif(tmp_path / "t.tif", truth)
    scores = evaluate_rasters(p, t)
    iou = scores.iou
    assert scores.miou_classes == ("soil", "crop", "weed", "disease")  # the documented mean
    assert scores.miou == pytest.approx(np.mean([iou[n] for n in scores.names]))
    assert scores.no_truth == ("disease",)
    assert scores.miou_truth_classes == ("soil", "crop", "weed")
    assert scores.miou_truth == pytest.approx((iou["soil"] + iou["crop"] + iou["weed"]) / 3)
    assert scores.miou_truth > 0.95 > 0.8 > scores.miou
    code, out = _evaluate(p, t)
    assert code == 0, out
    disease = next(line for line in out.splitlines() if line.startswith("disease "))
    assert disease.endswith("(no truth pixels: IoU 0, in mean IoU)")
    assert (f"mean IoU over the classes the truth holds (soil, crop, weed): "
            f"{scores.miou_truth:.4f}") in out
    assert f"mean IoU {scores.miou:.4f}" in out
    r = CliRunner().invoke(main, ["evaluate", str(p), str(t), "--json"])
    out_json = json.loads(r.stdout)
    assert out_json["miou"] == pytest.approx(scores.miou)  # unchanged key, unchanged value
    assert out_json["miou_truth"] == pytest.approx(scores.miou_truth)
    assert out_json["miou_truth_classes"] == ["soil", "crop", "weed"]
    assert out_json["no_truth_pixels"] == ["disease"]
    assert out_json["truth_coding"] is None
    # a prediction without stray classes: no marker, no second line, the same two means
    clean = _tif(tmp_path / "clean.tif", truth, nodata=255)
    code, out = _evaluate(clean, t)
    assert "no truth pixels" not in out and "the truth holds" not in out
    assert evaluate_rasters(clean, t).miou_truth == evaluate_rasters(clean, t).miou


def test_grey_level_coding_maps_255_too(tmp_path: Path) -> None:
    """0/128/255 grey levels: the example left 255 out, and pasted it dropped every weed."""
    cls = np.minimum(_field(), 2)
    grey = np.choose(cls, [0, 128, 255]).astype(np.uint8)
    truth = _png(tmp_path / "t.png", grey)
    pred = _png(tmp_path / "p.png", cls)
    with pytest.raises(InputError) as err:
        evaluate_rasters(pred, truth)
    msg = str(err.value)
    share = 100 * np.mean(cls == 2)
    assert (f"255 ({share:.3g} % of the pixels) is read as unlabelled unless mapped, and "
            "steps on evenly from the other values as a class level would, so the example "
            "maps it (255=ignore if it is unlabelled)") in msg
    assert "e.g. --truth-classes 0=soil,128=crop,255=weed (or, if 0 is unlabelled" in msg
    scores = evaluate_rasters(pred, truth, truth_classes=parse_truth_classes(
        "0=soil,128=crop,255=weed"))
    assert scores.accuracy == 1.0 and scores.confusion[2, 2] == np.sum(cls == 2)
    # 255 on a few stray pixels (under 1 %) is the unlabelled value, as before
    rare = np.choose(cls == 2, [grey, 128]).astype(np.uint8)
    rare[0, 0] = 255
    with pytest.raises(InputError) as err:
        evaluate_rasters(pred, _png(tmp_path / "rare.png", rare))
    assert "255 is already read as unlabelled, e.g. --truth-classes 0=soil,128=crop " in str(
        err.value)
    # codes that do not step on to 255 (10/20/30 beside it): named, not mapped
    coded = np.choose(cls, [10, 20, 30]).astype(np.uint8)
    coded[:, :5] = 255
    with pytest.raises(InputError) as err:
        evaluate_rasters(pred, _png(tmp_path / "coded.png", coded))
    assert "255 is already read as unlabelled; 255 holds 12.5 % of the pixels: if it is a " \
           "class, map it too (e.g. 255=disease), e.g. --truth-classes 10=soil,20=crop," \
           "30=weed" in str(err.value)


def test_partial_label_raster_gets_the_gdalwarp_command(tmp_path: Path) -> None:
    """A truth on part of the grid: a vague "gdalwarp -r near -te/-tr/-t_srs" hint."""
    cls = np.minimum(_field(shape=(20, 30)), 2)
    pred = _tif(tmp_path / "p.tif", cls, nodata=255)
    part = tmp_path / "part labels.tif"
    with rasterio.open(part, "w", driver="GTiff", width=12, height=20, count=1, dtype="uint8",
                       crs="EPSG:32615", transform=Affine(0.1, 0, 5e5, 0, -0.1, 5e6)) as dst:
        dst.write(cls[:, :12], 1)
    code, out = _evaluate(pred, part)
    assert code == 2, out
    command = (f"gdalwarp -r near -dstnodata 255 -te 500000 4999998 500003 5000000 -tr 0.1 "
               f"0.1 -t_srs EPSG:32615 '{part}' '{tmp_path / 'part labels_on_prediction.tif'}'")
    assert "the truth is 12x20 px, the prediction 30x20 px" in out
    assert command in out.replace("\n", " "), out
    if shutil.which("gdalwarp"):  # the command, run, gives a truth that scores
        subprocess.run([*shlex.split(command), "-q"], check=True)
        scores = evaluate_rasters(pred, tmp_path / "part labels_on_prediction.tif")
        assert scores.accuracy == 1.0 and scores.confusion.sum() == 20 * 12


def test_palette_truth_is_noted_as_read_by_its_indices(tmp_path: Path) -> None:
    cls = np.minimum(_field(shape=(8, 8)), 2)
    pred = _png(tmp_path / "p.png", cls)
    palette = Image.fromarray(cls, "P")
    palette.putpalette([0, 0, 0, 0, 255, 0, 255, 0, 0])
    palette.save(tmp_path / "pal.png")
    code, out = _evaluate(pred, tmp_path / "pal.png")
    assert code == 0, out
    assert ("pal.png: has a colour table (a palette image); its palette indices are read as "
            "class values (0=soil, 1=crop, 2=weed, 3=disease); to read its colours instead, "
            "give --truth-colors R,G,B=CLASS;...") in out
    code, out = _evaluate(pred, tmp_path / "pal.png", "--truth-colors",
                          "0,0,0=soil;0,255,0=crop;255,0,0=weed")
    assert code == 0 and "palette indices" not in out, out
    # a class raster with the classes' own colours (as agriseg writes them): no note
    own = _tif(tmp_path / "own.tif", cls)
    with rasterio.open(own, "r+") as ds:
        ds.write_colormap(1, DEFAULT_CLASSES.colormap())
    code, out = _evaluate(_tif(tmp_path / "p.tif", cls, nodata=255), own)
    assert code == 0 and "palette indices" not in out, out
