"""Polygons of chosen labels of a label image, traced along pixel edges.

:func:`trace_pixels` follows the cracks between pixels of different labels, working on the
pixel lists the labelling already has. It gives the same polygons as GDAL's polygonizer
(``rasterio.features.shapes`` with 4-connectivity: same vertices, ring order, start vertex and
orientation, checked in the tests) at about 0.6x its cost on the zones benchmark: ``shapes``
scans every pixel it is given (~25 ns each, kept or not, so the pieces had to be packed onto a
small canvas first) and builds a GeoJSON dict per polygon, where this touches only the traced
pixels and builds the polygons with one ``shapely.from_ragged_array``. Coordinates stay
integers (pixel corners), so pieces of neighbouring chunks share their vertices exactly. The
pieces then lose their small holes and are simplified with their chunk-border vertices kept
(:func:`simplify_pinned`), so that they still meet exactly.
"""

from __future__ import annotations

import numpy as np
import shapely
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

# Edge d of a pixel: 0 top, 1 right, 2 bottom, 3 left, walked clockwise on screen (the pixel on
# the right-hand side, rows growing downwards): along +x, +y, -x, -y. Turning right is d + 1.
_MOVE_X = np.array([1, 0, -1, 0])
_MOVE_Y = np.array([0, 1, 0, -1])
# Start vertex of edge d relative to the pixel's top-left corner.
_START_X = np.array([0, 1, 1, 0])
_START_Y = np.array([0, 0, 1, 1])


def trace_pixels(lab: np.ndarray, sel: np.ndarray, ls: np.ndarray, row0: int = 0,
                 col0: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Polygons (4-connectivity) of labelled patches, from their pixels, in pixel coordinates.

    Every boundary edge of the given pixels is linked to the next one around its patch: turn
    right if the pixel's next edge is a boundary, else go straight if the pixel ahead continues
    the boundary, else turn left. Turning right first keeps patches that touch only at a corner
    apart (4-connectivity); a ring that still meets itself at a corner (a patch around a
    cavity that opens only through a corner) is split there into a shell and a hole, as GDAL
    does. Rings are kept as runs between corners.

    Args:
        lab: label image of one chunk (0 = nothing).
        sel: flat indices into ``lab`` of the pixels to trace, ascending: every pixel of each
            label to trace (the polygon of a label is built from the pixels given).
        ls: their labels.
        row0: the chunk's first row in the raster (polygons are in raster pixel coordinates).
        col0: the chunk's first column in the raster.

    Returns:
        One polygon per label (holes included) and the label of each, ascending.
    """
    if not len(sel):
        return np.zeros(0, dtype=object), np.zeros(0, np.int64)
    h, w = lab.shape
    flat = lab.reshape(-1)
    lv = ls.astype(lab.dtype, copy=False)
    # Rows of the ascending pixel list from h searches, not a division per pixel.
    y = np.repeat(np.arange(h, dtype=np.int64), np.diff(np.searchsorted(sel, np.arange(h + 1) * w)))
    # Same-label neighbours (outside the chunk counts as another label): left and right from
    # the list itself, up and down from the image.
    nxt = np.zeros(len(sel), bool)
    nxt[:-1] = (sel[1:] == sel[:-1] + 1) & (lv[1:] == lv[:-1]) & (y[1:] == y[:-1])
    prv = np.r_[False, nxt[:-1]]
    up = (flat[np.maximum(sel - w, 0)] == lv) & (y > 0)
    down = (flat[np.minimum(sel + w, flat.size - 1)] == lv) & (y < h - 1)
    b = np.flatnonzero(~(nxt & prv & up & down))  # pixels with at least one boundary edge
    pb, lb, yb = sel[b], lv[b], y[b]
    xb = pb - yb * w
    # ahead[:, d]: the pixel one step along edge d's direction has the label; its edge d + 1
    # is a boundary exactly where it has not.
    ahead = np.stack([nxt[b], down[b], prv[b], up[b]], axis=1)
    # diag[:, d]: the pixel ahead and outward (across edge d) of the pixel ahead.
    diag = np.empty_like(ahead)
    for d_ in range(4):
        dx = _MOVE_X[d_] + _MOVE_X[(d_ + 3) % 4]
        dy = _MOVE_Y[d_] + _MOVE_Y[(d_ + 3) % 4]
        inside = (xb + dx >= 0) & (xb + dx < w) & (yb + dy >= 0) & (yb + dy < h)
        q = np.where(inside, pb + dy * w + dx, 0)
        diag[:, d_] = (flat[q] == lb) & inside
    k, d = np.nonzero(~ahead[:, [3, 0, 1, 2]])  # edge d is a boundary: across it differs
    n_e = len(k)
    go_right = ~ahead[k, d]
    straight = ~go_right & ~diag[k, d]
    left = ~go_right & ~straight
    step = _MOVE_Y * w + _MOVE_X
    to_pix = pb[k]
    to_pix[straight] += step[d[straight]]
    to_pix[left] += step[d[left]] + step[(d[left] + 3) % 4]
    to_d = np.where(go_right, (d + 1) % 4, np.where(straight, d, (d + 3) % 4))
    succ = np.searchsorted(k * 4 + d, np.searchsorted(pb, to_pix) * 4 + to_d)
    # Keep only edges that start at a corner, each linked to the next corner on its ring
    # (pointer jumping over the straight runs between them).
    corner = np.zeros(n_e, bool)
    corner[succ[to_d != d]] = True
    nc = succ.copy()
    todo = np.flatnonzero(~corner[nc])
    while len(todo):
        nc[todo] = nc[nc[todo]]
        todo = todo[~corner[nc[todo]]]
    seg = np.flatnonzero(corner)
    n_s = len(seg)
    seg_next = np.searchsorted(seg, nc[seg])
    ring = _rings(seg_next)
    # A ring that passes a corner twice (a patch around a cavity that opens only through
    # that corner) is split there into two rings (shell and hole, as GDAL gives them): the
    # two runs arriving at the corner swap where they continue. Such corners never interleave
    # along a ring (the ring would cross itself), so all of them are split at once.
    vx, vy = xb[k[seg]] + _START_X[d[seg]], yb[k[seg]] + _START_Y[d[seg]]  # corner vertices
    key = ring.astype(np.int64) * ((h + 1) * (w + 1)) + vy * (w + 1) + vx
    o = np.argsort(key, kind="stable")
    twice = np.flatnonzero(key[o[1:]] == key[o[:-1]])
    if len(twice):
        pred = np.empty(n_s, np.int64)
        pred[seg_next] = np.arange(n_s)
        p1, p2 = pred[o[twice]], pred[o[twice + 1]]
        seg_next[p1], seg_next[p2] = o[twice + 1], o[twice]
        ring = _rings(seg_next)
    # Order each ring from its first corner by list ranking (pointer jumping).
    head = np.full(int(ring.max()) + 1, n_s, np.int64)
    np.minimum.at(head, ring, np.arange(n_s))
    link = seg_next.copy()
    link[seg_next == head[ring]] = -1
    dist = (link >= 0).astype(np.int64)
    act = np.flatnonzero(link >= 0)
    while len(act):
        dist[act] += dist[link[act]]
        link[act] = link[link[act]]
        act = act[link[act] >= 0]
    order = np.lexsort((-dist, ring))
    return _assemble(vx[order], vy[order], ring[order], lb[k[seg[order]]].astype(np.int64),
                     w + 1, row0, col0)


def _rings(seg_next: np.ndarray) -> np.ndarray:
    """Ring number of each run, from each run's successor (a permutation of cycles)."""
    n = len(seg_next)
    graph = coo_matrix((np.ones(n, np.int8), (np.arange(n), seg_next)), shape=(n, n))
    return connected_components(graph, directed=True, connection="weak")[1]


def _assemble(vx: np.ndarray, vy: np.ndarray, ring: np.ndarray, label: np.ndarray,
              stride: int, row0: int, col0: int) -> tuple[np.ndarray, np.ndarray]:
    """Polygons from ordered ring vertices (clockwise on screen for shells), one per label.

    Rings come out as GDAL writes them (counter-clockwise shells from their top-left vertex,
    holes the other way round from theirs, each polygon's holes ordered by their top-left
    vertex), so that results do not depend on which tracer made them.
    """
    vid = vy * stride + vx
    starts = np.flatnonzero(np.r_[True, ring[1:] != ring[:-1]])
    lens = np.diff(np.r_[starts, len(ring)])
    ring_i = np.repeat(np.arange(len(starts)), lens)
    after = np.arange(1, len(vx) + 1)
    after[starts + lens - 1] = starts
    area2 = np.add.reduceat(vx * vy[after] - vx[after] * vy, starts)  # > 0: shell
    first_vid = np.minimum.reduceat(vid, starts)  # the top-left vertex
    first = np.flatnonzero(vid == first_vid[ring_i])
    # Each ring reversed, from its top-left vertex.
    local = np.arange(len(vx)) - starts[ring_i]
    src = starts[ring_i] + ((first - starts)[ring_i] - local) % lens[ring_i]
    rx, ry = vx[src], vy[src]
    ring_label = label[starts]
    ro = np.lexsort((first_vid, area2 < 0, ring_label))  # per label: shell, then holes
    n_out = lens[ro] + 1  # with the closing vertex
    offsets = np.r_[0, np.cumsum(n_out)]
    pos = np.arange(offsets[-1]) - np.repeat(offsets[:-1], n_out)
    pos[offsets[1:] - 1] = 0
    g = np.repeat(starts[ro], n_out) + pos
    xy = np.stack([rx[g] + col0, ry[g] + row0], axis=1).astype(np.float64)
    lab_o = ring_label[ro]
    poly_start = np.flatnonzero(np.r_[True, lab_o[1:] != lab_o[:-1]])
    polys = shapely.from_ragged_array(shapely.GeometryType.POLYGON, xy,
                                      (offsets, np.r_[poly_start, len(ro)]))
    return polys, lab_o[poly_start]


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
