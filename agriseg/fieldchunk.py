"""Per-chunk work of the field summaries, run in pool workers or in the calling process.

One chunk: rasterise the ids of the fields that touch it (one layer of non-overlapping fields
at a time), read the classes and index values, and count class pixels (or ground areas) and
index histograms per field. Imports are kept light (no geopandas) so workers start fast.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import rasterio
from affine import Affine
from rasterio.features import rasterize
from rasterio.windows import Window

HIST_BINS = 1000
INDEX_RANGE: dict[str, tuple[float, float]] = {"exg": (-1.0, 2.0)}
"""Histogram range per index; the default is -1..1 (normalised differences, VARI, GLI)."""


@dataclass(frozen=True, slots=True)
class FieldTask:
    """One chunk of the field summaries.

    Attributes:
        classes_tif: the class raster.
        indices: index name -> raster path (float32, NaN nodata).
        win: ``(row, col, height, width)`` of the chunk.
        transform: the chunk's affine transform.
        layers: per layer of non-overlapping fields, the fields touching the chunk: their
            polygons and 1-based field numbers.
        k: number of classes; class values 0..k-1 are their own codes, any other value
            (nodata, unknown) counts as ``k``.
        n_fields: number of fields (sizes of the count tables).
        dtype: rasterised id dtype (holds ``n_fields * (k + 1) + k``).
        row_area: ground area of a pixel in each of the chunk's rows (``None``: count pixels).
    """

    classes_tif: str
    indices: dict[str, str]
    win: tuple[int, int, int, int]
    transform: Affine
    layers: list[tuple[np.ndarray, np.ndarray]]
    k: int
    n_fields: int
    dtype: str
    row_area: np.ndarray | None


@dataclass(slots=True)
class FieldCounts:
    """One chunk's contribution, one array per field layer (index 0 = outside all fields).

    Kept per layer so that the caller adds them in the same order as a serial pass: the
    weighted counts (geographic rasters) and index sums are floats, whose sums depend on it.

    Attributes:
        counts: ``field * (k + 1) + class`` pixel counts or ground areas.
        hist: index name -> ``(fields, rows)``: the 1-based numbers of the fields with
            valid pixels in the chunk and their ``(len(fields), HIST_BINS)`` bin counts.
            Sparse: a dense table was 1000 int64 per field of the whole set in every chunk
            (22,500 plots: 180 MB per index per chunk, 2.9 GB peak with one worker).
        sums: index name -> sum of the index values per field.
    """

    counts: list[np.ndarray]
    hist: dict[str, list[tuple[np.ndarray, np.ndarray]]]
    sums: dict[str, list[np.ndarray]]


def field_chunk(t: FieldTask) -> FieldCounts | None:
    """Counts of one chunk (``None`` when no field touches it)."""
    r0, c0, h, w = t.win
    win = Window(c0, r0, w, h)
    size = (t.n_fields + 1) * (t.k + 1)
    out = FieldCounts([], {}, {})
    cls = weights = None
    idx_vals: dict[str, np.ndarray] = {}
    for geoms, ids in t.layers:
        fid = rasterize(
            zip(geoms, ids, strict=True), out_shape=(h, w), transform=t.transform, fill=0,
            dtype=t.dtype,
        ).ravel()
        if cls is None:
            # Read once per chunk, whatever the number of field layers.
            with rasterio.open(t.classes_tif) as ds:
                raw = ds.read(1, window=win).ravel()
            # min(value, k) against an array of k: 0.5 ms per 4 MP chunk, where numpy's
            # scalar minimum (no SIMD) costs 3 ms and a 256-entry lookup table 10 ms.
            cls = np.minimum(raw, np.full_like(raw, t.k))
            for name, path in t.indices.items():
                with rasterio.open(path) as d:
                    idx_vals[name] = d.read(1, window=win).ravel()
            weights = np.repeat(t.row_area, w) if t.row_area is not None else None
            out.hist = {name: [] for name in idx_vals}
            out.sums = {name: [] for name in idx_vals}
        if idx_vals:
            valid = (cls < t.k) & (fid > 0)
            # The valid pixels' field ids once for all indices, and none at all where they
            # are one field (the whole survey without --fields; a chunk inside one field):
            # per-pixel ids and weighted bincounts were most of the summary (a 268 MP
            # whole-survey summary with three indices took 17.4 s, now 9.4 s).
            field_of: np.ndarray | int = 1  # the valid pixels' field(s)
            present = np.ones(1, np.intp)  # their field numbers, for the sparse histograms
            local: np.ndarray | int = 0  # the valid pixels' rows among them
            if t.n_fields > 1:
                f_valid = fid[valid]
                if f_valid.size and f_valid.min() == f_valid.max():
                    field_of = int(f_valid[0])
                    present[0] = field_of
                else:
                    field_of = f_valid.astype(np.intp)
                    present = np.flatnonzero(np.bincount(field_of, minlength=t.n_fields + 1))
                    row_of = np.zeros(t.n_fields + 1, np.intp)
                    row_of[present] = np.arange(len(present))
                    local = row_of[field_of]
            for name, vals in idx_vals.items():
                v = vals[valid]
                f = field_of
                rows = local
                finite = np.isfinite(v)
                if not finite.all():
                    v = v[finite]
                    if isinstance(f, np.ndarray):
                        f = f[finite]
                    if isinstance(rows, np.ndarray):
                        rows = rows[finite]
                out.hist[name].append((present, _histogram(name, v, rows, len(present))))
                if isinstance(f, np.ndarray):
                    out.sums[name].append(np.bincount(f, weights=v, minlength=t.n_fields + 1))
                else:
                    one_sum = np.zeros(t.n_fields + 1)
                    one_sum[f] = np.sum(v, dtype=np.float64)
                    out.sums[name].append(one_sum)
        # One bincount over field_id * (k + 1) + class for every pixel of the chunk: pixels
        # outside all fields land in field 0's bins (dropped by the caller), which is cheaper
        # than selecting the pixels inside fields. In place on the ids (a dtype that holds the
        # largest code): no temporaries.
        code = fid
        code *= t.k + 1
        code += cls
        out.counts.append(_bincount(code, size, weights))
    return out if out.counts else None


def _histogram(name: str, v: np.ndarray, f: np.ndarray | int, n_rows: int) -> np.ndarray:
    """``(n_rows, HIST_BINS)`` counts of index values ``v`` in rows ``f`` (one or each).

    Bins of :data:`INDEX_RANGE` (values beyond it in the end bins), computed in place in the
    values' float32 as ``(v - lo) / (hi - lo) * HIST_BINS``: the bins depend on that rounding.
    """
    lo, hi = INDEX_RANGE.get(name, (-1.0, 1.0))
    x = v - lo
    x /= hi - lo
    x *= HIST_BINS
    np.clip(x, 0, HIST_BINS - 1, out=x)  # then truncation is the floor, as before
    b = x.astype(np.intp)
    b += f * HIST_BINS
    return np.bincount(b, minlength=n_rows * HIST_BINS).reshape(n_rows, HIST_BINS)


def _bincount(code: np.ndarray, size: int, weights: np.ndarray | None) -> np.ndarray:
    """``np.bincount(code, weights, minlength=size)``; unweighted a block of pixels at a time.

    bincount first casts its input to intp: for a whole 4 MP chunk of uint16 codes a 32 MB
    temporary that costs as much as the counting; per 256 K block it stays in cache (12.5 ->
    6.8 ms per chunk). Integer counts are exact either way; weighted (ground area) sums are
    left in one call so their floating-point sums, and the outputs, stay as they were.
    """
    if weights is not None:
        return np.bincount(code, weights=weights, minlength=size)
    block = 1 << 18
    out = np.zeros(size, np.int64)
    for i in range(0, len(code), block):
        out += np.bincount(code[i:i + block], minlength=size)
    return out
