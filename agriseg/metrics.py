"""Segmentation accuracy: confusion matrix, per-class IoU and F1, pixel accuracy.

Rasters are compared block by block, so any size fits in memory.
"""

from __future__ import annotations

import logging
import math
import shlex
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import rasterio
from rasterio.crs import CRS

from agriseg.classes import DEFAULT_CLASSES, ClassSchema
from agriseg.errors import ConfigError, GridMismatchError, InputError, RasterError
from agriseg.grid import Grid, on_earth
from agriseg.rasterfile import no_georef_warning

log = logging.getLogger(__name__)

#: More unknown truth values than this is no label raster: no mapping to suggest.
MAX_LABELS = 20
#: Distinct unmapped colours counted in a colour-coded truth (a photo has millions).
MAX_COLOURS = 1000
#: Share of a coded truth's pixels at 255 beyond which 255 may be a class, not the unlabelled
#: value: a few stray pixels are no class level.
TOP_SHARE = 0.01
#: A recoding of the truth is suggested when it lifts pixel accuracy from under
#: ``RECODE_LOW`` to ``RECODE_HIGH`` or more, or by ``RECODE_GAIN``. A reasonable model on
#: rightly coded labels scores over 0.7, and reordering right labels lifts it by far less
#: than 0.3: only class-for-class swaps of large classes would.
RECODE_LOW, RECODE_HIGH, RECODE_GAIN = 0.6, 0.8, 0.3
#: ... and reads at least this share of the pixels as other classes (a few stray pixels of a
#: rare class say nothing of the coding).
RECODE_MIN_SHARE = 0.01
#: Least share of the labelled pixels that two predicted classes must each hold before value
#: 0 is offered as unlabelled: a prediction of (nearly) one class "fits" any truth once the
#: truth's largest class is dropped (everything predicted soil, a senesced date against a
#: green one).
RECODE_DROP_CLASS_SHARE = 0.1
#: How much more often value 0's pixels may be predicted soil than the other codes' pixels
#: while still read as an unlabelled background: a real unlabelled area is a sample of the
#: scene; real soil labels are predicted soil far more often than the rest (a model that
#: misses weed gave "0=ignore" with 0 100 % soil against 10 % for the other codes).
RECODE_DROP_SOIL_EXCESS = 0.25


@dataclass(frozen=True, slots=True)
class Scores:
    """Accuracy of a prediction against the truth.

    Attributes:
        confusion: ``(K, K)`` pixel counts, rows = truth, columns = prediction.
        names: class names in index order.
        left_out: classes kept out of the mean IoU, with why ("not in truth", "merged into
            soil"): a truth of soil, crop and weed only says nothing of disease, and a few
            stray disease pixels scored 0 and dragged the mean down.
    """

    confusion: np.ndarray
    names: tuple[str, ...]
    left_out: dict[str, str] = field(default_factory=dict)

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
    def miou_classes(self) -> tuple[str, ...]:
        """The classes the mean IoU covers: present in truth or prediction, not left out."""
        return tuple(n for n, v in self.iou.items()
                     if not np.isnan(v) and n not in self.left_out)

    @property
    def miou(self) -> float:
        """Mean IoU over :attr:`miou_classes`."""
        return self._mean_iou(self.miou_classes)

    @property
    def no_truth(self) -> tuple[str, ...]:
        """Classes in the mean IoU that the truth holds no pixel of (predicted only).

        Their IoU is 0 whatever the model does elsewhere: a few stray disease pixels against
        a soil/crop/weed truth pulled the mean from 0.98 to 0.74 with nothing to say why.
        """
        truth = dict(zip(self.names, self.confusion.sum(1).tolist(), strict=True))
        return tuple(n for n in self.miou_classes if truth[n] == 0)

    @property
    def miou_truth_classes(self) -> tuple[str, ...]:
        """:attr:`miou_classes` less :attr:`no_truth`: the classes the truth holds."""
        absent = self.no_truth
        return tuple(n for n in self.miou_classes if n not in absent)

    @property
    def miou_truth(self) -> float:
        """Mean IoU over :attr:`miou_truth_classes` (NaN where the truth holds none)."""
        return self._mean_iou(self.miou_truth_classes)

    def _mean_iou(self, names: tuple[str, ...]) -> float:
        """Mean IoU over ``names`` (NaN for none)."""
        iou = self.iou
        vals = [iou[n] for n in names]
        return float(np.mean(vals)) if vals else float("nan")

    def to_dict(self) -> dict[str, object]:
        """JSON-friendly form: NaN (a class absent from both rasters) is None (null)."""
        return {
            "iou": {n: _finite(v) for n, v in self.iou.items()},
            "f1": {n: _finite(v) for n, v in self.f1.items()},
            "accuracy": _finite(self.accuracy),
            "miou": _finite(self.miou),
            "miou_classes": list(self.miou_classes),
            "left_out": dict(self.left_out),
            # Classes in the mean with no truth pixel, and the mean without them.
            "no_truth_pixels": list(self.no_truth),
            "miou_truth": _finite(self.miou_truth),
            "miou_truth_classes": list(self.miou_truth_classes),
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
        no_truth = self.no_truth
        for i, n in enumerate(self.names):
            note = f"  ({self.left_out[n]}, not in mean IoU)" if n in self.left_out else ""
            if n in no_truth:
                note = "  (no truth pixels: IoU 0, in mean IoU)"
            lines.append(
                f"{n:<{w}} {self.iou[n]:7.3f} {self.f1[n]:7.3f} {truth[i]:12d} {pred[i]:12d}"
                + note
            )
        over = f" over {', '.join(self.miou_classes)}" if self.left_out else ""
        lines.append(f"pixel accuracy {self.accuracy:.4f}   mean IoU {self.miou:.4f}{over}")
        if no_truth:
            lines.append(f"mean IoU over the classes the truth holds "
                         f"({', '.join(self.miou_truth_classes)}): {self.miou_truth:.4f}")
        lines.append("confusion (rows truth, columns prediction):")
        lines.append(" " * w + "".join(f"{n:>{w}}" for n in self.names))
        for i, n in enumerate(self.names):
            lines.append(f"{n:<{w}}" + "".join(f"{v:{w}d}" for v in self.confusion[i]))
        return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class Recoding:
    """A reading of the truth's codes under which the prediction agrees far better.

    The scores stay as read; this is what a user who picked the wrong coding (1..3 for
    soil..weed read as crop..disease; crop and weed swapped) is shown.

    Attributes:
        accuracy: pixel accuracy as scored.
        recoded: pixel accuracy read this way, over the pixels the reading keeps.
        kind: ``"value"`` (class values, ``--truth-classes``) or ``"colour"``
            (``--truth-colors``): what the codes are.
        codes: per truth code (or codes) holding pixels, in order: the code(s) as written,
            the class it is scored as, the class it reads as, and the share of its pixels
            predicted as that class.
        ignored: codes the reading takes as unlabelled (``"0"``).
        option: the option that reads the truth so, e.g. ``--truth-classes
            0=ignore,1=soil,2=crop,3=weed``.
    """

    accuracy: float
    recoded: float
    kind: str
    codes: tuple[tuple[str, str, str, float], ...]
    ignored: tuple[str, ...]
    option: str

    def to_dict(self) -> dict[str, object]:
        """JSON-friendly form."""
        return {
            "accuracy": self.accuracy,
            "recoded_accuracy": self.recoded,
            "codes": [{"code": c, "scored_as": was, "reads_as": now, "share": share}
                      for c, was, now, share in self.codes],
            "ignored": list(self.ignored),
            "option": self.option,
        }


def suggest_truth_coding(
    confusion: np.ndarray, schema: ClassSchema = DEFAULT_CLASSES,
    truth_classes: dict[int, int] | None = None,
    truth_colors: dict[tuple[int, int, int], int] | None = None,
) -> Recoding | None:
    """A recoding of the truth that fits the prediction far better, or None.

    The truth's codes (rows of ``confusion``) are matched one to one onto the predicted
    classes so that most pixels agree (the best assignment, not each row's own most
    predicted class); when the truth was read as it is, reading value 0 as unlabelled is
    tried too (1..3 beside a 0 background). The reading is returned when it lifts pixel
    accuracy, or the mean recall of the truth's codes (a crop/weed swap under a field of
    soil barely moves pixel accuracy), from under :data:`RECODE_LOW` to :data:`RECODE_HIGH`
    or by :data:`RECODE_GAIN`, raises pixel accuracy, and reads at least
    :data:`RECODE_MIN_SHARE` of the pixels otherwise, each code read anew mostly predicted
    as its new class (codes holding under that share together excepted): a model that is
    merely poor is not taken for a coding error.

    Args:
        confusion: ``(K, K)`` counts as scored (pooled over pairs), rows truth.
        schema: the classes.
        truth_classes: the ``--truth-classes`` the truth was read with, if any.
        truth_colors: the ``--truth-colors`` the truth was read with, if any.

    Returns:
        The reading, with the option that scores the truth so; None when the truth as read
        fits as well or nearly.
    """
    from scipy.optimize import linear_sum_assignment

    c = confusion.astype(np.float64)
    total = c.sum()
    if not total:
        return None
    held = [r for r in range(len(c)) if c[r].sum()]  # truth rows holding pixels
    same = {r: r for r in held}
    before, before_recall = _agreement(c, same)

    def worth(new: dict[int, int]) -> tuple[bool, float]:
        """Whether reading row r as new[r] is worth saying, and its pixel accuracy."""
        after, recall = _agreement(c, new)
        moved = [r for r in new if new[r] != r]
        # Codes read anew that are not mostly their new class: a model that predicts soil
        # everywhere "fits" 1..3 as soil and then anything.
        unlike = sum(c[r].sum() for r in moved if c[r, new[r]] < c[r].sum() / 2)
        lifts = [(before, after), (before_recall, recall)]
        ok = (after > before and sum(c[r].sum() for r in moved) >= RECODE_MIN_SHARE * total
              and unlike < RECODE_MIN_SHARE * total
              and any((b < RECODE_LOW and a >= RECODE_HIGH) or a - b >= RECODE_GAIN
                      for b, a in lifts))
        return ok, after

    rows, cols = linear_sum_assignment(c, maximize=True)
    full = {r: col for r, col in zip(rows.tolist(), cols.tolist(), strict=True) if r in held}
    full_ok, full_acc = worth(full)
    drop_ok, drop_acc, drop = False, 0.0, {}
    zero = c[0].sum()
    if truth_classes is None and truth_colors is None and 0 < zero < total \
            and _zero_looks_unlabelled(c):
        # Value 0 read as soil may be the unlabelled background of 1..3 codes.
        rows, cols = linear_sum_assignment(c[1:], maximize=True)
        drop = {r + 1: col for r, col in zip(rows.tolist(), cols.tolist(), strict=True)
                if r + 1 in held}
        # Not a recoding when only 0 goes: that is dropping soil where the model is poor.
        if any(drop[r] != r for r in drop):
            drop_ok, drop_acc = worth(drop)
    if drop_ok and (not full_ok or c[0, full[0]] < zero / 2
                    or any(full[r] != drop[r] for r in drop)):
        # 0 explained by no class of its own, or the other codes read otherwise without it.
        return _recoding(c, schema, drop, before, drop_acc, None, None, ignore_zero=True)
    if full_ok:
        return _recoding(c, schema, full, before, full_acc, truth_classes, truth_colors)
    return None


def _zero_looks_unlabelled(c: np.ndarray) -> bool:
    """Whether truth value 0 (rows of ``c``) may be an unlabelled background.

    Only when the prediction holds two classes of some size (:data:`RECODE_DROP_CLASS_SHARE`)
    and 0's pixels are predicted soil about as often as the other codes' are
    (:data:`RECODE_DROP_SOIL_EXCESS`): dropping real soil labels always raises the accuracy
    of a model poor on the rest.
    """
    total = c.sum()
    predicted = c.sum(axis=0) / total
    if np.sort(predicted)[-2] < RECODE_DROP_CLASS_SHARE:
        return False
    zero, rest = c[0].sum(), c[1:].sum()
    if not rest:
        return False
    return bool(c[0, 0] / zero - c[1:, 0].sum() / rest <= RECODE_DROP_SOIL_EXCESS)


def _agreement(c: np.ndarray, new: dict[int, int]) -> tuple[float, float]:
    """Pixel accuracy and mean recall of truth rows ``r`` read as classes ``new[r]``.

    Over the rows in ``new`` only. The mean recall weighs each code alike: a crop/weed swap
    under a field of soil moves pixel accuracy from 0.80 to 0.99 only, recall from 0.33.
    """
    rows = list(new)
    hits = np.array([c[r, new[r]] for r in rows])
    sizes = c[rows].sum(1)
    return float(hits.sum() / sizes.sum()), float(np.mean(hits / sizes))


def _recoding(c: np.ndarray, schema: ClassSchema, new: dict[int, int], before: float,
              after: float, truth_classes: dict[int, int] | None,
              truth_colors: dict[tuple[int, int, int], int] | None,
              ignore_zero: bool = False) -> Recoding:
    """The :class:`Recoding` that reads each truth row ``r`` as class ``new[r]``."""
    names = schema.names
    kind = "colour" if truth_colors else "value"
    # The truth's codes behind each row: the values themselves, or those the mapping names.
    given: dict[str, int]
    if truth_colors:
        given = {f"{r},{g},{b}": v for (r, g, b), v in truth_colors.items()}
    elif truth_classes:
        given = {str(v): cls for v, cls in sorted(truth_classes.items())}
    else:
        # Rows are the values themselves; 0 goes first as "0=ignore" where it is dropped.
        given = {str(r): r for r in range(len(c)) if c[r].sum() and not (ignore_zero and r == 0)}
    pairs: list[str] = []
    codes: list[tuple[str, str, str, float]] = []
    by_row: dict[int, list[str]] = {}
    for code, row in given.items():
        if row == schema.nodata or row not in new or not c[row].sum():
            # Ignored, or a class the truth holds no pixel of: kept as given.
            pairs.append(f"{code}={'ignore' if row == schema.nodata else names[row]}")
            continue
        pairs.append(f"{code}={names[new[row]]}")
        by_row.setdefault(row, []).append(code)
    for row, row_codes in by_row.items():
        codes.append((" and ".join(row_codes), names[row], names[new[row]],
                      float(c[row, new[row]] / c[row].sum())))
    if ignore_zero:
        pairs.insert(0, "0=ignore")
    if truth_colors:
        option = "--truth-colors " + shlex.quote(";".join(pairs))
    else:
        option = "--truth-classes " + ",".join(pairs)
    return Recoding(before, after, kind, tuple(codes), ("0",) if ignore_zero else (), option)


def _finite(value: float) -> float | None:
    """``value``, or None for NaN: JSON has no NaN (``json.dumps`` wrote invalid JSON)."""
    return None if math.isnan(value) else value


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


def _class_values(schema: ClassSchema) -> dict[str, int]:
    """Class name -> value, and ``ignore`` -> the schema's nodata.

    Names in lower case: a class "Background" is "background" too.
    """
    return {c.name.lower(): c.value for c in schema.classes} | {"ignore": schema.nodata}


def parse_truth_classes(text: str, schema: ClassSchema = DEFAULT_CLASSES) -> dict[int, int]:
    """``"0=soil,1=crop,2=weed,255=ignore"`` as ``{truth value: class value}``.

    Raises:
        ConfigError: a malformed pair or an unknown class name (valid names are listed).
    """
    names = _class_values(schema)
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


def parse_pred_classes(text: str, schema: ClassSchema = DEFAULT_CLASSES) -> dict[int, int]:
    """``"crop=soil,disease=ignore"`` as ``{class value: class value, or nodata to ignore}``.

    Merges prediction classes a truth does not tell apart (a binary weed mask knows weed and
    not-weed only).

    Raises:
        ConfigError: a malformed pair or an unknown class name (valid names are listed).
    """
    names = _class_values(schema)
    valid = ", ".join(schema.names)
    out: dict[int, int] = {}
    for part in filter(None, (x.strip() for x in text.split(","))):
        src, _, dst = (s.strip().lower() for s in part.partition("="))
        if src not in names or src == "ignore" or dst not in names:
            raise ConfigError(
                f"--pred-classes {part!r}: expected CLASS=CLASS (a predicted class, then the "
                f"class to count it as, or ignore) with classes among {valid}, e.g. "
                f"{schema.names[-1]}={schema.names[0]}"
            )
        if names[src] in out:
            raise ConfigError(f"--pred-classes: class {src!r} is given twice; give each "
                              "predicted class once")
        out[names[src]] = names[dst]
    return out


def parse_truth_colors(text: str,
                       schema: ClassSchema = DEFAULT_CLASSES) -> dict[tuple[int, int, int], int]:
    """``"0,0,0=soil;0,255,0=crop;255,0,0=weed"`` as ``{(r, g, b): class value}``.

    ``;`` separates the pairs because ``,`` separates a colour's values.

    Raises:
        ConfigError: a malformed pair, a value outside 0-255 or an unknown class name.
    """
    names = _class_values(schema)
    out: dict[tuple[int, int, int], int] = {}
    for part in filter(None, (x.strip() for x in text.split(";"))):
        colour, _, name = part.rpartition("=")
        try:
            rgb = tuple(int(v) for v in colour.split(","))
        except ValueError:
            rgb = ()
        name = name.strip().lower()
        if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb) or name not in names:
            raise ConfigError(
                f"--truth-colors {part!r}: expected R,G,B=CLASS (R, G, B 0-255; CLASS one of "
                f"{', '.join([*schema.names, 'ignore'])}), pairs separated by ';', e.g. "
                "0,0,0=" + ";0,255,0=".join(schema.names[:2])
            )
        key = (rgb[0], rgb[1], rgb[2])
        if key in out:
            raise ConfigError(f"--truth-colors: colour {colour.strip()} is given twice; give "
                              "each colour once")
        out[key] = names[name]
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
    """Refuse what cannot be a class raster: JPEG, several bands, non-integer values.

    Raises:
        InputError: naming ``path`` as the ``role`` ("prediction", "truth", ...).
    """
    refuse_jpeg(path, ds, role)
    if ds.count == 2:
        raise InputError(
            f"{path}: has 2 bands (grey and alpha?); the {role} must be a single-band raster "
            f"of class values: keep the first band, e.g. gdal_translate -b 1 {path} "
            "labels.tif"
        )
    if ds.count != 1:
        colours = ("; colour-coded labels can be scored as they are with --truth-colors "
                   "R,G,B=CLASS;...") if role == "truth" else ""
        raise InputError(
            f"{path}: has {ds.count} bands; the {role} must be a single-band raster of class "
            "values (as `agriseg run` writes classes.tif). Is it the image, or colour-coded "
            f"labels? Convert colours to class values first{colours}"
        )
    if np.dtype(ds.dtypes[0]).kind not in "iu":
        raise InputError(
            f"{path}: holds {ds.dtypes[0]} values; the {role} must hold integer class values "
            "(0=soil, 1=crop, 2=weed, 3=disease, 255=unlabelled)"
        )


def refuse_jpeg(path: str | Path, ds: rasterio.DatasetReader, role: str) -> None:
    """Refuse a JPEG: its artefact values at class edges are not labels to map or ignore."""
    if ds.driver == "JPEG":
        raise InputError(
            f"{path}: is a JPEG, and JPEG is lossy (its compression invents values at class "
            f"edges); save the {role} as PNG or TIFF"
        )


def _declared_nodata(ds: rasterio.DatasetReader) -> int | None:
    """The raster's own nodata value as an integer, or None (none, NaN or fractional)."""
    value = ds.nodata
    if value is None or not math.isfinite(value) or value != int(value):
        return None
    return int(value)


def _distinct(arr: np.ndarray) -> np.ndarray:
    """The distinct values of ``arr``, sorted (a byte array by counting: no sort per block)."""
    if arr.dtype == np.uint8:
        return np.flatnonzero(np.bincount(arr.ravel(), minlength=256))
    return np.unique(arr)


def colour_codes(path: str | Path, ds: rasterio.DatasetReader) -> np.ndarray | None:
    """For a one-band truth with a colour table: each index's ``0xRRGGBB`` code, else None.

    Raises:
        InputError: the truth is not 8-bit RGB(A), nor one band with a colour table.
    """
    refuse_jpeg(path, ds, "truth")
    if ds.count in (3, 4) and all(d == "uint8" for d in ds.dtypes):
        return None
    if ds.count == 1 and ds.dtypes[0] in ("uint8", "uint16"):
        try:
            table = ds.colormap(1)
        except ValueError:  # no colour table
            table = {}
        if table:
            codes = np.full(65536 if ds.dtypes[0] == "uint16" else 256, -1, np.int64)
            for index, (r, g, b, *_) in table.items():
                codes[index] = (r << 16) | (g << 8) | b
            return codes
    raise InputError(
        f"{path}: --truth-colors needs colour-coded labels (3 or 4 bands of 8-bit RGB(A), or "
        f"one band with a colour table), not {ds.count} band(s) of {ds.dtypes[0]}; give class "
        "values with --truth-classes instead"
    )


def colour_classes(codes: np.ndarray, colours: dict[int, int], nodata: int,
                    unmapped: Counter[int]) -> np.ndarray:
    """``0xRRGGBB`` codes as class values; codes not in ``colours`` are counted in ``unmapped``.

    Codes below 0 (transparent pixels, palette indices without a colour) are unlabelled.
    """
    out = np.full(codes.shape, nodata, np.int64)
    known = codes < 0
    for code, value in colours.items():
        hit = codes == code
        out[hit] = value
        known |= hit
    if not known.all():
        values, counts = np.unique(codes[~known], return_counts=True)
        for v, n in zip(values.tolist(), counts.tolist(), strict=True):
            # Bounded: a photo given as truth has a colour for nearly every pixel.
            if v in unmapped or len(unmapped) < MAX_COLOURS:
                unmapped[v] += n
    return out


def read_colour_codes(ds: rasterio.DatasetReader, window: rasterio.windows.Window,
                       palette: np.ndarray | None) -> np.ndarray:
    """The truth's ``0xRRGGBB`` codes in ``window``; -1 where transparent (alpha 0)."""
    if palette is not None:
        return palette[ds.read(1, window=window)]
    rgb = ds.read(window=window).astype(np.int64)
    codes = (rgb[0] << 16) | (rgb[1] << 8) | rgb[2]
    if ds.count == 4:
        codes[rgb[3] == 0] = -1
    return codes


def _check_same_grid(pred_path: str | Path, truth_path: str | Path,
                     p: rasterio.DatasetReader, t: rasterio.DatasetReader) -> None:
    """Refuse a prediction and truth on different grids (or, without a CRS, of other sizes).

    Raises:
        GridMismatchError: naming both sizes, and for rasters on a map both CRSs.
    """
    if not (on_earth(p.crs) and on_earth(t.crs)):
        log.debug("%s / %s: not both on a map; compared pixel for pixel",
                  pred_path, truth_path)
        if p.shape != t.shape:
            # A PNG tile has no CRS to warp: its CRS (a long LOCAL_CS) and gdalwarp only
            # confused.
            raise GridMismatchError(
                f"{pred_path} and {truth_path}: sizes differ, prediction {p.width}x{p.height} "
                f"vs truth {t.width}x{t.height} (width x height); the label must have the "
                "image's size"
            )
        return
    pred_grid = Grid(p.shape, p.transform, p.crs)
    truth_grid = Grid(t.shape, t.transform, t.crs)
    if not pred_grid.same_as(truth_grid):
        raise GridMismatchError(
            f"{pred_path} and {truth_path} are on different grids "
            f"({'; '.join(_grid_differences(truth_grid, pred_grid))}); put the truth on the "
            f"prediction's grid: {warp_command(truth_path, pred_grid)}, and score against "
            "that (pixels outside the truth become 255, unlabelled)"
        )


def _grid_differences(truth: Grid, pred: Grid) -> list[str]:
    """What differs between the truth's grid and the prediction's, in words."""
    th, tw = truth.shape_yx
    ph, pw = pred.shape_yx
    crs = crs_label(pred.crs)
    diffs = []
    if truth.crs != pred.crs:
        diffs.append(f"the truth's CRS is {crs_label(truth.crs)}, the prediction's {crs}")
    if (th, tw) != (ph, pw):
        diffs.append(f"the truth is {tw}x{th} px, the prediction {pw}x{ph} px")
    if truth.crs == pred.crs:
        tx, ty = truth.res_xy
        px, py = pred.res_xy
        if not (math.isclose(tx, px, rel_tol=1e-6) and math.isclose(ty, py, rel_tol=1e-6)):
            diffs.append(f"the truth's pixel size is {tx:.6g} x {ty:.6g}, the prediction's "
                         f"{px:.6g} x {py:.6g} ({crs} units)")
        dc, dr = ~pred.transform @ (truth.transform.c, truth.transform.f)
        if max(abs(dc), abs(dr)) > 1e-6:
            diffs.append(f"the truth's top-left corner is {dc:+.4g} px across and {dr:+.4g} "
                         "px down from the prediction's")
    return diffs or ["their transforms differ"]


def warp_command(path: str | Path, grid: Grid, nodata: int = 255,
                 suffix: str = "_on_prediction") -> str:
    """The ``gdalwarp`` command that puts the raster ``path`` on ``grid``, pixel for pixel.

    Nearest neighbour keeps class values; ``-te``/``-tr``/``-t_srs`` give the grid's extent,
    pixel size and CRS exactly, and ``-dstnodata`` makes what the raster does not cover
    unlabelled. The output is named after ``path`` and ``suffix``
    (``labels_on_prediction.tif``). Evaluation and training both give it.
    """
    left, bottom, right, top = grid.bounds
    rx, ry = grid.res_xy
    out = Path(path).with_name(Path(path).stem + suffix + ".tif")
    return (f"gdalwarp -r near -dstnodata {nodata} -te {cli_number(left)} {cli_number(bottom)} "
            f"{cli_number(right)} {cli_number(top)} -tr {cli_number(rx)} {cli_number(ry)} "
            f"-t_srs {shlex.quote(crs_label(grid.crs))} {shlex.quote(str(path))} "
            f"{shlex.quote(str(out))}")


def cli_number(v: float) -> str:
    """A coordinate or pixel size for a command line: exact, without float noise."""
    return f"{v:.15g}"


def crs_label(crs: CRS) -> str:
    """``EPSG:32615`` where the CRS has an EPSG code, else its full text."""
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg else str(crs.to_string())


def example_mapping(mapping: dict[int, int] | None, unknown: list[int],
                     schema: ClassSchema, present: list[int] | None = None,
                     declared: bool = False) -> str:
    """A ``--truth-classes`` value naming what is known and each unknown value.

    Args:
        mapping: the --truth-classes given, if any.
        unknown: the truth's values that are neither classes nor mapped.
        schema: the classes.
        present: every value the truth holds but its unlabelled ones (255, its declared
            nodata), sorted; None when not known.
        declared: whether the truth declares a nodata value of its own.
    """
    names = {c.value: c.name for c in schema.classes} | {schema.nodata: "ignore"}
    k = len(schema)
    # A negative code is most likely an undeclared nodata (-1 beside 1..4); beside a
    # declared nodata it is a class code (-1..2).
    codes = [v for v in present or [] if declared or v >= 0]
    negative = [f"{v}=ignore" for v in present or [] if not declared and v < 0]
    if not mapping and present is not None and codes and len(codes) <= k:
        # The classes in order, where the codes cannot be the classes themselves: none of
        # them a class value (10/20/30, beside a 0 or not), or a shifted run (1..4 beside
        # nodata 0, -1..2). Ignoring the codes, or 0..3 kept as they are, scored nothing
        # (or dropped disease).
        rest = [v for v in codes if v != 0]
        if not any(0 < v < k for v in rest):
            example = _in_order(codes, schema)
            if len(rest) < len(codes) and rest:
                # 0 beside codes none of which is a class (0/10/20/30, 0/85/170): 0 may be
                # soil as well as the unlabelled background; only the user knows.
                example += f" (or, if 0 is unlabelled, 0=ignore,{_in_order(rest, schema)})"
            return ",".join([example, *negative])
        shifted = codes == list(range(codes[0], codes[0] + k)) and codes[0] != 0
        if shifted or (set(codes) <= set(range(1, k + 1)) and k in codes):
            return ",".join([_in_order(codes, schema), *negative])
    known = mapping if mapping else {c.value: c.value for c in schema.classes}
    pairs = [f"{v}={names[c]}" for v, c in known.items()]
    return ",".join(pairs + [f"{v}=ignore" for v in unknown if v not in known])


def _in_order(codes: list[int], schema: ClassSchema) -> str:
    """``codes`` as the classes in order: ``10=soil,20=crop,30=weed``."""
    return ",".join(f"{v}={c.name}" for v, c in zip(codes, schema.classes, strict=False))


def _even_levels(codes: list[int]) -> bool:
    """Whether ``codes`` step evenly (within 1), as grey levels do: 0/128/255, 0/85/170/255."""
    steps = np.diff(sorted(codes))
    return len(steps) >= 2 and int(steps.min()) >= 2 and int(steps.max() - steps.min()) <= 1


def top_as_grey_level(present: list[int], k: int, share: float,
                      top: int = 255) -> tuple[list[int], str] | None:
    """``present`` with ``top`` as one more class, and what to say, for a grey-level coding.

    0/128/255 or 0/85/170/255 with fewer values than classes: ``top``, otherwise read as
    unlabelled, steps on evenly from the other values as the last class level would, and an
    example that left it out dropped that class silently. None for other codings. Used by
    evaluation's and training's examples alike.

    Args:
        present: the label's values but the unlabelled ones, sorted.
        k: number of classes.
        share: share of the label's pixels at ``top``.
        top: the value read as unlabelled (255).
    """
    if not (_even_levels([*present, top]) and len(present) < k):
        return None
    return [*present, top], (
        f"; {top} ({100 * share:.3g} % of the pixels) is read as unlabelled unless mapped, and "
        "steps on evenly from the other values as a class level would, so the example maps it "
        f"({top}=ignore if it is unlabelled)")


def _note_palette(path: str | Path, ds: rasterio.DatasetReader, schema: ClassSchema) -> None:
    """Say that a truth with a colour table is read by its indices, not its colours.

    A palette PNG's indices may follow another order than its colours suggest. A table of
    the classes' own colours (a class raster agriseg wrote) goes without a note.
    """
    try:
        table = ds.colormap(1)
    except ValueError:  # no colour table
        return
    if not table or all(tuple(table.get(c.value, ())[:3]) == tuple(c.color)
                        for c in schema.classes):
        return
    log.info("%s: has a colour table (a palette image); its palette indices are read as "
             "class values (%s); to read its colours instead, give --truth-colors "
             "R,G,B=CLASS;...", path, ", ".join(f"{c.value}={c.name}" for c in schema.classes))


def _binary_mask_hint(schema: ClassSchema, low: int) -> str:
    """The options that score a binary mask of ``low`` and 255 (255 = the class)."""
    weed = schema.by_role("weed")
    positive = weed.name if weed else schema.names[-1]
    background = schema.names[0] if schema.names[0] != positive else schema.names[-1]
    merged = ",".join(f"{n}={background}" for n in schema.names
                      if n not in (positive, background))
    return (f"--truth-classes {low}={background},{schema.nodata}={positive}"
            + (f" --pred-classes {merged}" if merged else ""))


def evaluate_rasters(
    pred_path: str | Path, truth_path: str | Path, schema: ClassSchema = DEFAULT_CLASSES,
    truth_classes: dict[int, int] | None = None,
    pred_classes: dict[int, int] | None = None,
    truth_colors: dict[tuple[int, int, int], int] | None = None,
) -> Scores:
    """Compare a predicted class raster with a truth raster on the same grid.

    When either raster has no place on Earth (no CRS, e.g. a PNG label image, or a run with
    ``--gsd``), the two are compared pixel for pixel and only their sizes must agree. The
    truth's own nodata value, and ``schema.nodata``, are unlabelled unless ``truth_classes``
    names them. Both rasters are read a block of the prediction at a time.

    Args:
        pred_path: class raster written by ``agriseg run``.
        truth_path: truth raster (class values, ``schema.nodata`` = unlabelled).
        schema: the classes.
        truth_classes: truth value -> class value, for truths coded otherwise (see
            :func:`parse_truth_classes`); every value the truth holds must be listed.
            Classes it does not name are left out of the mean IoU.
        pred_classes: predicted class value -> the class value it counts as, or
            ``schema.nodata`` to ignore it (see :func:`parse_pred_classes`).
        truth_colors: ``(r, g, b)`` -> class value, for colour-coded truths (RGB, RGBA or a
            colour table; see :func:`parse_truth_colors`); every colour must be listed.

    Raises:
        GridMismatchError: the two rasters differ in size, transform or CRS.
        InputError: the truth holds values (or colours) that are not classes (nor mapped),
            or is no class raster (JPEG, several bands, floats).
        RasterError: a file cannot be opened.
    """
    k = len(schema)
    try:
        with ExitStack() as stack:
            with no_georef_warning():
                p = stack.enter_context(rasterio.open(pred_path))
                t = stack.enter_context(rasterio.open(truth_path))
            # Class checks first: a JPEG or an RGB image is refused as such, whatever its size.
            check_class_raster(pred_path, p, "prediction")
            if truth_colors is None:
                check_class_raster(truth_path, t, "truth")
                _note_palette(truth_path, t, schema)
                palette = None
            else:
                palette = colour_codes(truth_path, t)
            _check_same_grid(pred_path, truth_path, p, t)
            declared = _declared_nodata(t) if truth_colors is None else None
            unlabelled = {schema.nodata, *([declared] if declared is not None else [])}
            mapping = truth_classes
            if mapping:
                # The truth's own nodata value, and 255 (agriseg's unlabelled), stay unlabelled
                # unless the mapping says otherwise.
                mapping = {**dict.fromkeys(unlabelled, schema.nodata), **mapping}
            colours = {(r << 16) | (g << 8) | b: v for (r, g, b), v in (truth_colors or {}).items()}
            merge = np.arange(max(k, schema.nodata) + 1)
            for src, dst in (pred_classes or {}).items():
                merge[src] = dst
            total = np.zeros((k, k), np.int64)
            unknown: set[int] = set()
            unknown_pred: set[int] = set()
            unmapped: Counter[int] = Counter()
            # Pixels of 255 among all, unmapped: a grey-level coding (0/128/255) uses 255 as a
            # class, and an example that left it out dropped that class silently.
            top_px = all_px = 0
            # The truth's distinct values (bounded): a binary 0/255 mask to warn of, and the
            # codes an example --truth-classes maps in order.
            seen: set[int] | None = set()
            for _, window in p.block_windows(1):
                if truth_colors is not None:
                    truth = colour_classes(read_colour_codes(t, window, palette), colours,
                                            schema.nodata, unmapped)
                else:
                    raw = t.read(1, window=window)
                    if seen is not None:
                        seen.update(_distinct(raw).tolist())
                        if len(seen) > k + MAX_LABELS + 2:
                            seen = None
                    if not mapping:
                        top_px += int(np.count_nonzero(raw == schema.nodata))
                        all_px += raw.size
                    if not mapping and declared is not None and declared != schema.nodata:
                        # Widened: an int8 truth turned 255 back into -1.
                        raw = np.where(raw == declared, schema.nodata, raw.astype(np.int64))
                    truth = _mapped(raw, mapping, k, schema.nodata, unknown)
                pred = p.read(1, window=window)
                if p.nodata is not None and int(p.nodata) != schema.nodata:
                    pred = np.where(pred == p.nodata, schema.nodata, pred)
                pred = _checked(pred, k, schema.nodata, unknown_pred)
                if not (unknown or unknown_pred or unmapped):
                    total += confusion(truth, merge[pred], k, schema.nodata)
    except rasterio.errors.RasterioError as exc:
        raise RasterError(f"cannot read {pred_path} or {truth_path}: {exc}") from exc
    classes = ", ".join(f"{c.value}={c.name}" for c in schema.classes)
    if unknown_pred:
        raise InputError(
            f"{pred_path}: holds values {sorted(unknown_pred)[:MAX_LABELS]} that are not classes "
            f"({classes}, {schema.nodata}=nodata); the prediction must be a class raster of "
            "agriseg's classes (as `agriseg run` writes classes.tif)"
        )
    if unmapped:
        first = ", ".join(f"{c >> 16},{(c >> 8) & 255},{c & 255} ({n} px)"
                          for c, n in unmapped.most_common(5))
        more = f" and {len(unmapped) - 5} more" if len(unmapped) > 5 else ""
        raise InputError(
            f"{truth_path}: holds colours that --truth-colors does not name: {first}{more}; add "
            "each as R,G,B=CLASS (or R,G,B=ignore)"
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
        present = sorted(seen - unlabelled) if seen is not None else None
        already = [f"{declared} (its declared nodata)"] if declared not in (None,
                                                                           schema.nodata) else []
        top = ""  # what is said of 255 where it may be a class
        share = top_px / all_px if all_px else 0.0
        if (seen is not None and schema.nodata in seen and declared != schema.nodata
                and not truth_classes and share >= TOP_SHARE and present is not None):
            grey = top_as_grey_level(present, k, share, schema.nodata)
            if grey is not None:
                present, top = grey
            else:
                already.append(str(schema.nodata))
                example = (f"e.g. {schema.nodata}={schema.names[len(present)]}"
                           if len(present) < k else f"{schema.nodata}=CLASS")
                top = (f"; {schema.nodata} holds {100 * share:.3g} % of the pixels: if it is a "
                       f"class, map it too ({example})")
        elif seen is not None and schema.nodata in seen:
            already.append(str(schema.nodata))
        note = (f"; {' and '.join(already)} {'is' if len(already) == 1 else 'are'} already "
                "read as unlabelled" if already else "")
        note += top
        if str(schema.nodata) not in already:
            classes += f", {schema.nodata}=unlabelled"
        raise InputError(
            f"{truth_path}: holds values {vals} that are not classes ({classes}); say what "
            "each value is with --truth-classes "
            "VALUE=CLASS,... (CLASS one of "
            f"{', '.join([*schema.names, 'ignore'])}){note}, e.g. --truth-classes "
            f"{example_mapping(truth_classes, vals, schema, present, declared is not None)}"
        )
    if not total.any():
        raise InputError(
            f"{truth_path}: no labelled pixel is left to compare (every truth value is "
            "unlabelled, ignored or under the prediction's nodata); check --truth-classes and "
            "that the two rasters cover the same place"
        )
    if seen is not None and truth_colors is None:
        # A shifted coding (1..3 beside nodata 0) is named after the scores, with the option
        # that reads it; "if 0 means soil, map 0=soil" would say otherwise.
        recoded = (not truth_classes and declared is not None and 0 <= declared < k
                   and suggest_truth_coding(total, schema) is not None)
        _warn_of_unlabelled(truth_path, seen, declared, truth_classes, schema,
                            recoded=recoded)
    return Scores(total, schema.names, _left_out(schema, truth_classes, truth_colors,
                                                 pred_classes))


def _warn_of_unlabelled(truth_path: str | Path, seen: set[int], declared: int | None,
                        truth_classes: dict[int, int] | None, schema: ClassSchema,
                        recoded: bool = False) -> None:
    """Warn where the unlabelled value likely meant a class.

    A binary mask (0 and 255, Agriculture-Vision style) lost all its positives to "255 =
    unlabelled", and a declared nodata of 0 all its soil, while a full table printed.
    ``recoded``: the scores fit a recoding of the truth far better (see
    :func:`suggest_truth_coding`), which is then the reading to suggest: a declared nodata
    0 beside 1..3 is no soil.
    """
    named = set(truth_classes or ())
    values = seen - {declared} if declared is not None else seen
    if (len(values) == 2 and schema.nodata in values and schema.nodata not in named
            and declared != schema.nodata):
        (low,) = values - {schema.nodata}
        log.warning(
            "%s: holds only values %d and %d, and %d is read as unlabelled; if it is a binary "
            "mask (%d = the class), say so, e.g. %s", truth_path, low, schema.nodata,
            schema.nodata, schema.nodata, _binary_mask_hint(schema, low))
    if (not truth_classes and declared is not None and 0 <= declared < len(schema)
            and declared in seen and not recoded):
        log.warning(
            "%s: value %d (%s) is the file's declared nodata, so it is read as unlabelled; if "
            "it means %s, say so with --truth-classes %s", truth_path, declared,
            schema.names[declared], schema.names[declared],
            ",".join(f"{c.value}={c.name}" for c in schema.classes))


def _left_out(schema: ClassSchema, truth_classes: dict[int, int] | None,
              truth_colors: dict[tuple[int, int, int], int] | None,
              pred_classes: dict[int, int] | None) -> dict[str, str]:
    """Classes the mean IoU leaves out, with why.

    Those a truth's mapping does not name, and those merged away in the prediction.
    """
    out: dict[str, str] = {}
    named = set((truth_classes or {}).values()) | set((truth_colors or {}).values())
    if truth_classes or truth_colors:
        out = {c.name: "not in truth" for c in schema.classes if c.value not in named}
    for src, dst in (pred_classes or {}).items():
        if src != dst:
            out[schema.names[src]] = ("ignored in prediction" if dst == schema.nodata
                                      else f"merged into {schema.names[dst]}")
    return out
