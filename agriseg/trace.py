"""Polygons of chosen labels of a label image, traced by ``rasterio.features.shapes``.

``shapes`` (GDAL's polygonizer) costs about 12 ns for every pixel it is given, kept or not,
plus 0.4-0.7 ms per call. The pieces worth tracing usually cover a small part of a chunk, so
their bounding-box crops are packed side by side on a small canvas and traced in one call;
each polygon is then moved back by its piece's offset. Coordinates stay integers (pixel
corners), so pieces of neighbouring chunks share their vertices exactly. The pieces then lose
their small holes and are simplified with their chunk-border vertices kept
(:func:`simplify_pinned`), so that they still meet exactly.
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


def fill_small_holes(polys: np.ndarray, min_area: float) -> np.ndarray:
    """Polygons without the interior rings smaller than ``min_area`` (pixels).

    A hole under the minimum zone area is speckle (single crop pixels inside a weed patch).
    Filling it per piece keeps the union and simplification of noisy masks near linear: a
    raster-wide patch with millions of holes took minutes and GBs. Zone areas come from pixel
    counts, so they stay exact.
    """
    if not len(polys) or min_area <= 0:
        return polys
    rings, ring_of = shapely.get_rings(polys, return_index=True)
    if len(rings) == len(polys):
        return polys  # no holes at all
    shell = np.r_[True, ring_of[1:] != ring_of[:-1]]  # get_rings lists the shell first
    keep = shell | (shapely.area(shapely.polygons(rings)) >= min_area)
    return shapely.polygons(rings[keep], indices=ring_of[keep])


def simplify_pinned(polys: np.ndarray, tolerance: float, pin_x: np.ndarray,
                    pin_y: np.ndarray) -> np.ndarray:
    """Douglas-Peucker simplification that keeps every vertex on the given lines.

    Each ring is cut at its vertices with ``x`` in ``pin_x`` or ``y`` in ``pin_y`` (chunk
    borders) and each section is simplified as a line, which keeps its end points. Pieces of
    one patch in neighbouring chunks so keep their shared border exactly and still union into
    one polygon, while each piece is simplified in its own worker, before the union. GEOS'
    polygon simplifiers may drop any vertex, hence by hand, vectorised over all rings at
    once. A ring without a pinned vertex is cut at its first one.

    Sections simplified on their own may cross: a ring that crosses itself keeps its pixel
    outline, and a polygon whose rings cross each other is repaired with ``make_valid``
    ("structure": shells minus holes). Holes that collapse are dropped; a polygon whose shell
    collapses is kept as it was.

    Args:
        polys: polygons (no multipolygons), in pixel coordinates.
        tolerance: Douglas-Peucker tolerance in the same unit.
        pin_x: x of vertical lines whose vertices stay.
        pin_y: y of horizontal lines whose vertices stay.

    Returns:
        Valid polygons or multipolygons, one per input.
    """
    out = polys.copy()
    if not len(polys) or tolerance <= 0:
        return out
    rings, ring_of = shapely.get_rings(polys, return_index=True)
    xy, v_ring = _simplified_rings(rings, tolerance, pin_x, pin_y)
    alive = np.bincount(v_ring, minlength=len(rings)) >= 3
    is_shell = np.r_[True, ring_of[1:] != ring_of[:-1]]  # get_rings lists the shell first
    ok_poly = np.ones(len(polys), bool)
    ok_poly[ring_of[is_shell & ~alive]] = False
    keep_ring = alive & ok_poly[ring_of]
    if not keep_ring.any():
        return out
    kept, ring_idx = np.unique(v_ring[keep_ring[v_ring]], return_inverse=True)
    new_rings = shapely.linearrings(xy[keep_ring[v_ring]], indices=ring_idx)
    # A ring whose sections cross each other goes back to its pixel outline (the cheap fix:
    # ~1 % of a speckle patch's rings, against make_valid on the whole polygon).
    crossed = ~shapely.is_simple(new_rings)
    new_rings[crossed] = rings[kept[crossed]]
    owners, poly_idx = np.unique(ring_of[kept], return_inverse=True)
    new = shapely.polygons(new_rings, indices=poly_idx)
    bad = ~shapely.is_valid(new)
    if bad.any():
        new[bad] = shapely.make_valid(new[bad], method="structure", keep_collapsed=False)
        lost = bad & shapely.is_empty(new)
        new[lost] = polys[owners[lost]]
    out[owners] = new
    return out


def _simplified_rings(rings: np.ndarray, tolerance: float, pin_x: np.ndarray,
                      pin_y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vertices (without the closing one) and ring index of rings simplified between pins."""
    xy, v_ring = shapely.get_coordinates(rings, return_index=True)
    n_per = np.bincount(v_ring, minlength=len(rings))
    closing = np.zeros(len(xy), bool)
    closing[np.cumsum(n_per) - 1] = True
    xy, v_ring = xy[~closing], v_ring[~closing]
    n_per -= 1
    start = np.cumsum(n_per) - n_per
    local = np.arange(len(xy)) - start[v_ring]
    pin = np.isin(xy[:, 0], pin_x) | np.isin(xy[:, 1], pin_y)
    # Rotate each ring to start at its first pinned vertex (or its first vertex).
    first = np.zeros(len(rings), np.int64)
    has_pin = np.zeros(len(rings), bool)
    pinned = np.flatnonzero(pin)[::-1]  # reversed: the last write is the first pinned vertex
    first[v_ring[pinned]] = local[pinned]
    has_pin[v_ring[pinned]] = True
    pin[start[~has_pin]] = True
    to = start[v_ring] + (local - first[v_ring]) % n_per[v_ring]
    xy_r = np.empty_like(xy)
    xy_r[to] = xy
    pin_r = np.empty_like(pin)
    pin_r[to] = pin
    # Sections run from a pinned vertex to the next one (the ring's start for its last);
    # each becomes a line with its end vertex repeated, simplified with both ends kept.
    sec = np.cumsum(pin_r) - 1
    sec_start = np.flatnonzero(pin_r)
    sec_ring = v_ring[sec_start]  # rotation keeps every vertex in its ring's range
    nxt = np.r_[sec_start[1:], len(xy_r)]
    ring_last = np.r_[sec_ring[1:] != sec_ring[:-1], True]
    end = np.where(ring_last, start[sec_ring], nxt)
    idx = np.insert(np.arange(len(xy_r)), nxt, end)
    line_of = np.insert(sec, nxt, np.arange(len(sec_start)))
    lines = shapely.simplify(shapely.linestrings(xy_r[idx], indices=line_of), tolerance,
                             preserve_topology=False)
    sxy, s_line = shapely.get_coordinates(lines, return_index=True)
    last = np.zeros(len(sxy), bool)
    last[np.cumsum(np.bincount(s_line, minlength=len(sec_start))) - 1] = True
    return sxy[~last], sec_ring[s_line[~last]]
