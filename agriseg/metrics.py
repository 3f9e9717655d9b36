"""Segmentation accuracy: confusion matrix, per-class IoU and F1, pixel accuracy.

Rasters are compared block by block, so any size fits in memory.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio

from agriseg.classes import DEFAULT_CLASSES, ClassSchema
from agriseg.errors import ConfigError, GridMismatchError, InputError, RasterError
from agriseg.grid import Grid, on_earth
from agriseg.raster import no_georef_warning

log = logging.getLogger(__name__)

#: More unknown truth values than this is no label raster: no mapping to suggest.
MAX_LABELS = 20


@dataclass(frozen=True, slots=True)
class Scores:
    """Accuracy of a prediction against the truth.

    Attributes:
        confusion: ``(K, K)`` pixel counts, rows = truth, columns = prediction.
        names: class names in index order.
    """

    confusion: np.ndarray
    names: tuple[str, ...]

    @property
    def iou(self) -> dict[str, float]:
        """Intersection over union per class (NaN where the class is absent from both)."""
        c = self.confusion.astype(np.float64)
        tp = np.diag(c)
        denom = c.sum(0) + c.sum(1) - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            vals = tp / denom
        return dict(zip(self.names, vals.tolist(), strict=True))

    @property
    def f1(self) -> dict[str, float]:
        """F1 (Dice) per class."""
        c = self.confusion.astype(np.float64)
        tp = np.diag(c)
        denom = c.sum(0) + c.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            vals = 2 * tp / denom
        return dict(zip(self.names, vals.tolist(), strict=True))

    @property
    def accuracy(self) -> float:
        """Share of valid pixels classified correctly."""
        total = self.confusion.sum()
        return float(np.trace(self.confusion) / total) if total else float("nan")

    @property
    def miou(self) -> float:
        """Mean IoU over classes present in truth or prediction."""
        vals = [v for v in self.iou.values() if not np.isnan(v)]
        return float(np.mean(vals)) if vals else float("nan")

    def to_dict(self) -> dict[str, object]:
        """JSON-friendly form."""
        return {
            "iou": self.iou,
            "f1": self.f1,
            "accuracy": self.accuracy,
            "miou": self.miou,
            "confusion": self.confusion.tolist(),
            "names": list(self.names),
        }

    def table(self) -> str:
        """Plain-text report: per-class IoU/F1 and the confusion matrix."""
        # Columns as wide as the longest class name ("background" was cut to "backgroun").
        w = max(10, *(len(n) + 1 for n in self.names))
        lines = [f"{'class':<{w}} {'IoU':>7} {'F1':>7} {'truth px':>12} {'pred px':>12}"]
        truth = self.confusion.sum(1)
        pred = self.confusion.sum(0)
        for i, n in enumerate(self.names):
            lines.append(
                f"{n:<{w}} {self.iou[n]:7.3f} {self.f1[n]:7.3f} {truth[i]:12d} {pred[i]:12d}"
            )
        lines.append(f"pixel accuracy {self.accuracy:.4f}   mean IoU {self.miou:.4f}")
        lines.append("confusion (rows truth, columns prediction):")
        lines.append(" " * w + "".join(f"{n:>{w}}" for n in self.names))
        for i, n in enumerate(self.names):
            lines.append(f"{n:<{w}}" + "".join(f"{v:{w}d}" for v in self.confusion[i]))
        return "\n".join(lines)


def confusion(
    truth: np.ndarray, pred: np.ndarray, k: int, nodata: int = 255
) -> np.ndarray:
    """``(k, k)`` confusion counts over pixels valid in both arrays."""
    t = truth.ravel().astype(np.int64)
    p = pred.ravel().astype(np.int64)
    ok = (t != nodata) & (p != nodata) & (t < k) & (p < k)
    return np.bincount(t[ok] * k + p[ok], minlength=k * k).reshape(k, k)


def score_arrays(
    truth: np.ndarray, pred: np.ndarray, schema: ClassSchema = DEFAULT_CLASSES
) -> Scores:
    """Scores of two in-memory class arrays."""
    return Scores(confusion(truth, pred, len(schema), schema.nodata), schema.names)


def parse_truth_classes(text: str, schema: ClassSchema = DEFAULT_CLASSES) -> dict[int, int]:
    """``"0=soil,1=crop,2=weed,255=ignore"`` as ``{truth value: class value}``.

    Raises:
        ConfigError: a malformed pair or an unknown class name (valid names are listed).
    """
    # The model's class names, in any case (a class "Background" is "background" too).
    names = {c.name.lower(): c.value for c in schema.classes} | {"ignore": schema.nodata}
    example = ",".join(f"{i}={c.name}" for i, c in enumerate(schema.classes[:3]))
    out: dict[int, int] = {}
    for part in filter(None, (x.strip() for x in text.split(","))):
        value, _, name = part.partition("=")
        try:
            number = int(value)  # label rasters may use negative values (int16 -1)
        except ValueError:
            number = None
        name = name.strip().lower()
        if number is None or name not in names:
            raise ConfigError(
                f"--truth-classes {part!r}: expected VALUE=CLASS with VALUE an integer and "
                f"CLASS one of the model's classes or ignore ({', '.join(schema.names)}, "
                f"ignore), e.g. {example}"
            )
        if number in out:  # the last pair won silently: a typo moved a class's truth
            raise ConfigError(f"--truth-classes: value {number} is given twice; give each "
                              "truth value once")
        if not -(2**31) <= number < 2**32:
            raise ConfigError(f"--truth-classes {part!r}: {number} is no value a label raster "
                              "can hold (32-bit integers at most)")
        out[number] = names[name]
    return out


def _mapped(truth: np.ndarray, mapping: dict[int, int] | None, k: int, nodata: int,
            unknown: set[int]) -> np.ndarray:
    """Truth values as class values.

    Values that are neither classes nor mapped are added to ``unknown`` (the caller refuses
    the truth then).
    """
    if mapping:
        out, unlisted = map_values(truth, mapping, nodata)
        unknown.update(int(v) for v in unlisted[:MAX_LABELS + 1])
        return out
    return _checked(truth, k, nodata, unknown)


def map_values(values: np.ndarray, mapping: dict[int, int],
               fill: int) -> tuple[np.ndarray, np.ndarray]:
    """``values`` through ``mapping`` (label code -> class value), ``fill`` where unlisted.

    Returns:
        ``(mapped int64 array, the distinct unlisted values, sorted)``: truths under
        ``--truth-classes`` and training labels under ``label_classes:`` alike.
    """
    out = np.full(values.shape, fill, np.int64)
    for src, dst in mapping.items():
        out[values == src] = dst
    return out, np.unique(values[~np.isin(values, list(mapping))])


def _checked(arr: np.ndarray, k: int, nodata: int, unknown: set[int]) -> np.ndarray:
    """``arr`` as it is; its values that are neither classes nor ``nodata`` go to ``unknown``."""
    unknown.update(int(v) for v in non_class_values(arr, k, nodata)[:MAX_LABELS + 1])
    return arr


def non_class_values(arr: np.ndarray, k: int, nodata: int) -> np.ndarray:
    """The distinct values of ``arr`` (sorted) that are neither classes ``0..k-1`` nor ``nodata``.

    Negative values too: in a uint8 copy they would wrap round to other classes.
    """
    bad = ((arr < 0) | (arr >= k)) & (arr != nodata)
    return np.unique(arr[bad]) if bad.any() else arr[:0].ravel()


def check_class_raster(path: str | Path, ds: rasterio.DatasetReader, role: str) -> None:
    """Refuse what cannot be a class raster: several bands, non-integer values.

    Raises:
        InputError: naming ``path`` as the ``role`` ("prediction", "truth", ...).
    """
    if ds.count != 1:
        raise InputError(
            f"{path}: has {ds.count} bands; the {role} must be a single-band raster of class "
            "values (as `agriseg run` writes classes.tif). Is it the image, or colour-coded "
            "labels? Convert colours to class values first"
        )
    if np.dtype(ds.dtypes[0]).kind not in "iu":
        raise InputError(
            f"{path}: holds {ds.dtypes[0]} values; the {role} must hold integer class values "
            "(0=soil, 1=crop, 2=weed, 3=disease, 255=unlabelled)"
        )


def _example_mapping(mapping: dict[int, int] | None, unknown: list[int],
                     schema: ClassSchema) -> str:
    """A ``--truth-classes`` value naming what is known and each unknown value."""
    names = {c.value: c.name for c in schema.classes} | {schema.nodata: "ignore"}
    if not mapping and len(unknown) == len(schema):
        # As many codes as classes (10/20/30/40): most likely the classes in order.
        return ",".join(f"{v}={c.name}" for v, c in zip(unknown, schema.classes, strict=True))
    known = mapping if mapping else {c.value: c.value for c in schema.classes}
    pairs = [f"{v}={names[c]}" for v, c in known.items()]
    return ",".join(pairs + [f"{v}=ignore" for v in unknown if v not in known])


def evaluate_rasters(
    pred_path: str | Path, truth_path: str | Path, schema: ClassSchema = DEFAULT_CLASSES,
    truth_classes: dict[int, int] | None = None,
) -> Scores:
    """Compare a predicted class raster with a truth raster on the same grid.

    When either raster has no place on Earth (no CRS, e.g. a PNG label image, or a run with
    ``--gsd``), the two are compared pixel for pixel and only their sizes must agree.

    Args:
        pred_path: class raster written by ``agriseg run``.
        truth_path: truth raster (class values, ``schema.nodata`` = unlabelled).
        schema: the classes.
        truth_classes: truth value -> class value, for truths coded otherwise (see
            :func:`parse_truth_classes`); every value the truth holds must be listed.

    Raises:
        GridMismatchError: the two rasters differ in size, transform or CRS.
        InputError: the truth holds values that are not classes (nor mapped).
        RasterError: a file cannot be opened.
    """
    try:
        with ExitStack() as stack:
            with no_georef_warning():
                p = stack.enter_context(rasterio.open(pred_path))
                t = stack.enter_context(rasterio.open(truth_path))
            if not (on_earth(p.crs) and on_earth(t.crs)):
                log.debug("%s / %s: not both on a map; compared pixel for pixel",
                          pred_path, truth_path)
                same = p.shape == t.shape
            else:
                same = Grid(p.shape, p.transform, p.crs).same_as(
                    Grid(t.shape, t.transform, t.crs))
            if not same:
                raise GridMismatchError(
                    f"{pred_path} and {truth_path} are on different grids "
                    f"({p.width}x{p.height} {p.crs} vs {t.width}x{t.height} {t.crs}); "
                    "resample the truth onto the prediction grid first (gdalwarp -r near "
                    "-te/-tr/-t_srs)"
                )
            check_class_raster(pred_path, p, "prediction")
            check_class_raster(truth_path, t, "truth")
            k = len(schema)
            mapping = truth_classes
            if mapping:
                # The truth's own nodata value, and 255 (agriseg's unlabelled), stay unlabelled
                # unless the mapping says otherwise.
                for value in {schema.nodata, *([int(t.nodata)] if t.nodata is not None else [])}:
                    mapping = {value: schema.nodata, **mapping}
            total = np.zeros((k, k), np.int64)
            unknown: set[int] = set()
            unknown_pred: set[int] = set()
            for _, window in p.block_windows(1):
                truth = _mapped(t.read(1, window=window), mapping, k, schema.nodata, unknown)
                pred = p.read(1, window=window)
                if p.nodata is not None and int(p.nodata) != schema.nodata:
                    pred = np.where(pred == p.nodata, schema.nodata, pred)
                pred = _checked(pred, k, schema.nodata, unknown_pred)
                if not (unknown or unknown_pred):
                    total += confusion(truth, pred, k, schema.nodata)
    except rasterio.errors.RasterioError as exc:
        raise RasterError(f"cannot read {pred_path} or {truth_path}: {exc}") from exc
    classes = ", ".join(f"{c.value}={c.name}" for c in schema.classes)
    if unknown_pred:
        raise InputError(
            f"{pred_path}: holds values {sorted(unknown_pred)[:MAX_LABELS]} that are not classes "
            f"({classes}, {schema.nodata}=nodata); the prediction must be a class raster of "
            "agriseg's classes (as `agriseg run` writes classes.tif)"
        )
    if len(unknown) > MAX_LABELS:
        raise InputError(
            f"{truth_path}: holds more than {MAX_LABELS} values that are not classes "
            f"({min(unknown)}..{max(unknown)} among them): it looks like a continuous raster (a "
            "confidence, an index, an image band), not class labels; give the labelled class "
            f"raster ({classes}, {schema.nodata}=unlabelled, or other values mapped with "
            "--truth-classes VALUE=CLASS,...)"
        )
    if unknown:
        vals = sorted(unknown)[:MAX_LABELS]
        raise InputError(
            f"{truth_path}: holds values {vals} that are not classes ({classes}, "
            f"{schema.nodata}=unlabelled); say what each value is with --truth-classes "
            "VALUE=CLASS,... (CLASS one of "
            f"{', '.join([*schema.names, 'ignore'])}), e.g. --truth-classes "
            f"{_example_mapping(truth_classes, vals, schema)}"
        )
    if not total.any():
        raise InputError(
            f"{truth_path}: no labelled pixel is left to compare (every truth value is "
            "unlabelled, ignored or under the prediction's nodata); check --truth-classes and "
            "that the two rasters cover the same place"
        )
    return Scores(total, schema.names)
