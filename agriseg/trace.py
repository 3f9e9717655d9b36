"""Polygons of chosen labels of a label image, traced by ``rasterio.features.shapes``.

``shapes`` (GDAL's polygonizer) costs about 12 ns for every pixel it is given, kept or not,
plus 0.4-0.7 ms per call. The pieces worth tracing usually cover a small part of a chunk, so
their bounding-box crops are packed side by side on a small canvas and traced in one call;
each polygon is then moved back by its piece's offset. Coordinates stay integers (pixel
corners), so pieces of neighbouring chunks share their vertices exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import numpy as np
import shapely
from rasterio.features import shapes


@dataclass(frozen=True, slots=True)
class Boxes:
    """Bounding boxes (inclusive rows and columns) and first pixel of labels in one chunk.

    Attributes:
        labels: the labels, ascending.
        r0, r1, c0, c1: first and last row and column of each label.
        seed: row-major flat index of each label's first pixel.
    """

    labels: np.ndarray
    r0: np.ndarray
    r1: np.ndarray
    c0: np.ndarray
    c1: np.ndarray
    seed: np.ndarray


def label_boxes(sel: np.ndarray, ls: np.ndarray, labels: np.ndarray, n: int,
                width: int) -> Boxes:
    """Boxes of ``labels`` from the flat indices ``sel`` of labelled pixels and their labels ``ls``.

    Uses the pixel lists the caller already has: ``ndimage.find_objects`` would scan the whole
    chunk again for every label.
    """
    want = np.zeros(n + 1, bool)
    want[labels] = True
    pick = want[ls]
    s, lab = sel[pick], ls[pick]
    first = np.full(n + 1, np.iinfo(np.int64).max, np.int64)
    last = np.full(n + 1, -1, np.int64)
    np.minimum.at(first, lab, s)
    np.maximum.at(last, lab, s)
    col = s % width
    cmin = np.full(n + 1, width, np.int64)
    cmax = np.full(n + 1, -1, np.int64)
    np.minimum.at(cmin, lab, col)
    np.maximum.at(cmax, lab, col)
    f, la = first[labels], last[labels]
    return Boxes(labels, f // width, la // width, cmin[labels], cmax[labels], f)


def _shelf_pack(heights: np.ndarray, widths: np.ndarray,
                canvas_width: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Top-left corners of boxes packed in rows ("shelves"), tallest first, and the height.

    Hand-written: a dozen lines, where a rectangle-packing library would be a new dependency
    for a canvas that only has to be much smaller than the chunk.
    """
    ys = np.zeros(len(heights), np.int64)
    xs = np.zeros(len(heights), np.int64)
    y = x = shelf = 0
    for i in np.argsort(-heights, kind="stable").tolist():
        h, w = int(heights[i]), int(widths[i])
        if x + w > canvas_width:
            y, x, shelf = y + shelf, 0, 0
        ys[i], xs[i] = y, x
        x += w
        shelf = max(shelf, h)
    return ys, xs, y + shelf


def _polygons(rings: list[list[list[tuple[float, float]]]], dx: np.ndarray,
              dy: np.ndarray) -> np.ndarray:
    """Polygons from GeoJSON-style ring lists, each moved by ``(dx, dy)``, built in one call.

    All coordinates go through one ``np.fromiter`` over the flattened lists: converting each
    ring's list of tuples with ``np.asarray`` cost 2.5 times as much (~10 against 4 ms for
    the 23 000 vertices of a 4 MP chunk).
    """
    if not rings:
        return np.zeros(0, dtype=object)
    n_rings = np.fromiter((len(poly) for poly in rings), np.int64, len(rings))
    ring_len = np.fromiter((len(ring) for poly in rings for ring in poly), np.int64,
                           int(n_rings.sum()))
    n = int(ring_len.sum())
    xy = np.fromiter(chain.from_iterable(chain.from_iterable(chain.from_iterable(rings))),
                     np.float64, 2 * n).reshape(n, 2)
    poly_len = np.add.reduceat(ring_len, np.cumsum(n_rings) - n_rings)
    xy[:, 0] += np.repeat(dx, poly_len)
    xy[:, 1] += np.repeat(dy, poly_len)
    return shapely.from_ragged_array(
        shapely.GeometryType.POLYGON, xy,
        (np.r_[0, np.cumsum(ring_len)], np.r_[0, np.cumsum(n_rings)]),
    )


def trace_labels(lab: np.ndarray, boxes: Boxes, row0: int,
                 col0: int) -> tuple[np.ndarray, np.ndarray]:
    """Polygons (4-connectivity) of the labels in ``boxes``, in pixel coordinates.

    Args:
        lab: int32 label image of one chunk (0 = nothing).
        boxes: the labels to trace, from :func:`label_boxes`.
        row0: the chunk's first row in the raster (polygons are in raster pixel coordinates).
        col0: the chunk's first column in the raster.

    Returns:
        Polygons and the label of each.
    """
    if not len(boxes.labels):
        return np.zeros(0, dtype=object), np.zeros(0, np.int64)
    h = boxes.r1 - boxes.r0 + 1
    w = boxes.c1 - boxes.c0 + 1
    ys, xs, canvas_h = _shelf_pack(h, w, lab.shape[1])
    r_lo, r_hi = int(boxes.r0.min()), int(boxes.r1.max()) + 1
    c_lo, c_hi = int(boxes.c0.min()), int(boxes.c1.max()) + 1
    if canvas_h * lab.shape[1] < (r_hi - r_lo) * (c_hi - c_lo) // 2:
        canvas = np.zeros((canvas_h, lab.shape[1]), np.int32)
        for i, lbl in enumerate(boxes.labels.tolist()):
            crop = lab[boxes.r0[i]:boxes.r1[i] + 1, boxes.c0[i]:boxes.c1[i] + 1]
            np.copyto(canvas[ys[i]:ys[i] + h[i], xs[i]:xs[i] + w[i]], crop, where=crop == lbl)
        mask = canvas != 0
        off_x = np.zeros(int(boxes.labels.max()) + 1, np.int64)
        off_y = np.zeros_like(off_x)
        off_x[boxes.labels] = col0 + boxes.c0 - xs
        off_y[boxes.labels] = row0 + boxes.r0 - ys
    else:
        # Boxes spread over most of the chunk: packing would not shrink what shapes scans.
        canvas = lab[r_lo:r_hi, c_lo:c_hi]
        want = np.zeros(int(canvas.max()) + 1, bool)
        want[boxes.labels] = True
        mask = want[canvas]
        off_x = np.full(len(want), col0 + c_lo, np.int64)
        off_y = np.full(len(want), row0 + r_lo, np.int64)
    rings, labels = [], []
    for geom, val in shapes(canvas, mask=mask, connectivity=4):
        rings.append(geom["coordinates"])
        labels.append(int(val))
    lbl_arr = np.array(labels, np.int64)
    return _polygons(rings, off_x[lbl_arr], off_y[lbl_arr]), lbl_arr
