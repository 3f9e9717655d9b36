"""Per-chunk work of the zones pass, run in pool workers or in the calling process.

Everything here depends on one chunk only: reading the at-risk classes, labelling them, per-label
counts, the labels along the chunk's edges (the caller joins them across chunks) and the traced
polygons of the pieces that may be kept, and (for the zone-id raster) the traced pieces'
pixels, spilled to a file. Imports are kept light (no geopandas, no pyproj) so workers start
fast.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import cc3d
import numpy as np
import rasterio
from rasterio.windows import Window
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from agriseg.errors import OutputError
from agriseg.trace import fill_small_holes, simplify_pinned, trace_pixels


def _disk(radius: int) -> np.ndarray:
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return (xx * xx + yy * yy) <= radius * radius


def _plus_one_where(cls: np.ndarray, risk_values: np.ndarray) -> np.ndarray:
    """``cls + 1`` where ``cls`` is one of ``risk_values``, 0 elsewhere (uint8 arithmetic).

    One comparison per at-risk class: a 256-entry lookup table (``lut[cls]``) costs ~11 ms
    per 4 MP chunk, as numpy's fancy indexing does not vectorise, against ~1.2 ms for this
    with the usual two at-risk classes.
    """
    at_risk = np.zeros(cls.shape, bool)
    for v in risk_values.tolist():
        at_risk |= cls == v
    out = np.add(cls, 1, dtype=np.uint8)
    out *= at_risk
    return out


def read_risk(
    ds: rasterio.DatasetReader,
    win: Window,
    risk_values: np.ndarray,
    nodata: int,
    radius: int,
) -> np.ndarray:
    """At-risk class values + 1 in ``win`` (0 elsewhere), closed per class.

    Values are stored + 1 so that an at-risk class 0 stays distinct from "no zone"; the
    closing uses a disk of ``radius`` pixels.
    """
    if radius == 0:
        return _plus_one_where(ds.read(1, window=win), risk_values)
    halo = 2 * radius  # closing = dilation then erosion: each reaches ``radius`` pixels
    r0, c0 = max(0, win.row_off - halo), max(0, win.col_off - halo)
    r1 = min(ds.height, win.row_off + win.height + halo)
    c1 = min(ds.width, win.col_off + win.width + halo)
    cls = ds.read(1, window=Window(c0, r0, c1 - c0, r1 - r0))
    out = np.zeros(cls.shape, np.uint8)
    valid = cls != nodata
    disk = _disk(radius)
    for v in risk_values:
        m = cls == v
        if not m.any():
            continue
        closed = ndimage.binary_closing(m, structure=disk) | m
        # Closing only fills valid gaps: it never paints zones over nodata.
        out[closed & valid] = v + 1
    ys = slice(win.row_off - r0, win.row_off - r0 + win.height)
    xs = slice(win.col_off - c0, win.col_off - c0 + win.width)
    return out[ys, xs]


def label_chunk(risk: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Patches of one chunk: labels, each label's value (+1) and the labelled pixels.

    ``cc3d`` labels every at-risk class on its own in one pass (4-connectivity, as ``shapes``
    traces: pixels that touch only at a corner are separate patches, and touching classes stay
    separate patches). It numbers patches by their first pixel in raster order, as
    ``ndimage.label`` does. Patches in a group where classes touch (weed next to disease)
    are then renumbered after all the others, ordered by the group's first pixel, then class,
    then first pixel: the order an earlier version gave them (one ``ndimage.label`` over all
    at-risk pixels, touching groups split afterwards), on which zone ids of equally large
    zones and the union order of pieces depend. Their old labels are left without pixels.

    Returns:
        ``lab`` (uint16 or uint32, 0 = none), ``vals`` (index = label, 0 for unused labels),
        ``sel`` (flat indices of labelled pixels, ascending) and ``ls`` (their labels).
    """
    # C order in and out: cc3d keeps the input's memory order, and ``flat`` must be a view.
    risk = np.ascontiguousarray(risk)
    # cc3d's smallest dtype (uint16 below 65536 labels) writes half the bytes of uint32:
    # ~2.5 ms less per 4 MP chunk.
    lab, n = cc3d.connected_components(risk, connectivity=4, return_N=True)
    lab = np.ascontiguousarray(lab)
    flat, rflat = lab.reshape(-1), risk.reshape(-1)
    # Labelled = at risk. nonzero has a fast path for bool only: the mask and its scan cost a
    # third of scanning the uint8 values (and a tenth of scanning the int32 labels).
    sel = np.flatnonzero(risk != 0)
    ls = flat[sel]
    rv = rflat[sel]
    vals = np.zeros(n + 1, np.uint8)
    vals[ls] = rv
    pairs = _touching(lab, risk, sel)
    if len(pairs):
        g = coo_matrix((np.ones(len(pairs), np.int8), (pairs[:, 0], pairs[:, 1])),
                       shape=(n + 1, n + 1))
        _, group = connected_components(g, directed=False)
        first = np.full(int(group.max()) + 1, n + 1, np.int64)
        np.minimum.at(first, group, np.arange(n + 1))
        mixed = np.zeros(n + 1, bool)
        mixed[pairs.ravel()] = True
        m = np.flatnonzero(mixed)
        m = m[np.lexsort((m, vals[m], first[group[m]]))]
        if n + len(m) > np.iinfo(lab.dtype).max:
            lab = lab.astype(np.uint32)
            flat = lab.reshape(-1)
        new = np.arange(n + 1, dtype=np.int32)
        new[m] = np.arange(n + 1, n + 1 + len(m), dtype=np.int32)
        moved = mixed[ls]
        ls = np.where(moved, new[ls], ls)
        flat[sel[moved]] = ls[moved]
        vals = np.concatenate([vals, vals[m]])
        vals[m] = 0
    return lab, vals, sel, ls


def _touching(lab: np.ndarray, risk: np.ndarray, sel: np.ndarray) -> np.ndarray:
    """Label pairs of 4-neighbour pixels of two different at-risk classes (one way each).

    Only the at-risk pixels ``sel`` and their right and lower neighbours are looked at.
    """
    w = risk.shape[1]
    flat = lab.reshape(-1)
    # A one-row pad so the lower neighbours of the last row exist (they are never at risk).
    padded = np.append(risk.reshape(-1), np.zeros(w, np.uint8))
    rflat = padded[:-w]
    out = []
    for step in (1, w):
        nb = padded[sel + step]
        hit = (nb != 0) & (nb != rflat[sel])
        s = sel[hit]
        if step == 1:
            s = s[s % w != w - 1]  # the right neighbour of a row's last pixel is the next row
        out.append(np.stack([flat[s], flat[s + step]], axis=1))
    return np.concatenate(out)


@dataclass(frozen=True, slots=True)
class ScanTask:
    """One chunk of the labelling pass.

    Attributes:
        classes_tif: the class raster.
        confidence_tif: confidence raster (percent, 255 nodata) or ``None``.
        win: ``(row, col, height, width)`` of the chunk.
        shape: raster ``(height, width)`` (which chunk edges are inner edges).
        values: at-risk class values + 1.
        nodata: the class raster's nodata value.
        radius: closing radius in pixels.
        row_area: ground area of a pixel in each of the chunk's rows (``None``: 1 per pixel).
        min_px_area: pieces at least this big (same unit as the areas) are traced.
        min_hole_px: holes smaller than this (pixels) are filled in traced pieces.
        simplify_px: Douglas-Peucker tolerance in pixels for traced pieces (0 = none).
        spill: file to write the traced pieces' pixels to (see :func:`read_spill`), or
            ``None`` when no zone-id raster is wanted.
    """

    classes_tif: str
    confidence_tif: str | None
    win: tuple[int, int, int, int]
    shape: tuple[int, int]
    values: np.ndarray
    nodata: int
    radius: int
    row_area: np.ndarray | None
    min_px_area: float
    min_hole_px: float
    simplify_px: float
    spill: str | None = None


@dataclass(slots=True)
class ChunkScan:
    """What one chunk contributes; per-label arrays are indexed by the chunk-local label.

    Attributes:
        value, pixels, area, conf_sum, conf_n: per label (index 0 = no patch).
        edges: labels along the top, bottom, left and right edge (chunk-local, int32).
        edge_values: the at-risk value (+1) along the same edges.
        polys: traced polygons in raster pixel coordinates; ``poly_label`` their labels.
        dropped: patches left out of the tables: wholly inside the chunk and too small.
    """

    value: np.ndarray
    pixels: np.ndarray
    area: np.ndarray
    conf_sum: np.ndarray
    conf_n: np.ndarray
    edges: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
    edge_values: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
    polys: np.ndarray
    poly_label: np.ndarray
    dropped: int = 0


def scan_chunk(t: ScanTask) -> ChunkScan:
    """Label one chunk, count its pieces and trace those that may be kept.

    A piece is traced when it is big enough on its own or touches an inner chunk edge (its
    patch may continue in the neighbouring chunk). Traced pieces lose their small holes and
    are simplified (see :func:`agriseg.trace.simplify_pinned`). Only traced pieces are
    returned, relabelled 1..n: the others are whole patches below the minimum area, and
    keeping their rows would make the caller's tables grow with the raster (90 k specks
    per 67 MP of a synthetic field against 652 traced pieces).
    """
    r0, c0, h, w = t.win
    win = Window(c0, r0, w, h)
    with rasterio.open(t.classes_tif) as ds:
        risk = read_risk(ds, win, t.values - 1, t.nodata, t.radius)
    lab, vals, sel, ls = label_chunk(risk)
    n = len(vals) - 1
    pixels = np.bincount(ls, minlength=n + 1)
    area = (pixels.astype(np.float64) if t.row_area is None
            else np.bincount(ls, weights=t.row_area[sel // w], minlength=n + 1))
    conf_sum: np.ndarray
    conf_n: np.ndarray
    if t.confidence_tif is not None and n:
        with rasterio.open(t.confidence_tif) as cds:
            conf = cds.read(1, window=win).ravel()[sel]
        ok = conf != 255
        conf_sum = np.bincount(ls[ok], weights=conf[ok], minlength=n + 1)
        conf_n = np.bincount(ls[ok], minlength=n + 1)
    else:
        conf_sum = conf_n = np.zeros(n + 1)
    height, width = t.shape
    open_ = np.zeros(n + 1, bool)
    for inner, edge in ((r0 > 0, lab[0]), (r0 + h < height, lab[-1]),
                        (c0 > 0, lab[:, 0]), (c0 + w < width, lab[:, -1])):
        if inner:
            open_[edge] = True
    trace = (open_ | (area >= t.min_px_area)) & (pixels > 0)
    trace[0] = False
    dropped = int(np.count_nonzero(pixels[1:] > 0)) - int(np.count_nonzero(trace))
    kept = np.flatnonzero(trace)
    # Chunk-local label -> row in the returned tables (0: no patch, or a dropped speck; the
    # caller reads edge labels only on inner chunk edges, where every piece is kept).
    row = np.zeros(n + 1, np.int64)
    row[kept] = np.arange(1, len(kept) + 1)
    sub = np.r_[0, kept]
    row_px = row[ls]
    pick = row_px > 0
    sel_px = sel[pick]
    if t.spill is not None:
        _spill(t.spill, sel_px, row_px[pick])
    polys, poly_label = np.zeros(0, dtype=object), np.zeros(0, np.int64)
    if len(kept):
        polys, poly_label = trace_pixels(lab, sel_px, ls[pick], r0, c0)
        polys = fill_small_holes(polys, t.min_hole_px)
        # Simplified here, in parallel and chunk by chunk, not after the union: the pieces'
        # chunk-border vertices stay, so pieces of one patch still meet exactly.
        polys = simplify_pinned(polys, t.simplify_px, np.array([c0, c0 + w], np.float64),
                                np.array([r0, r0 + h], np.float64))
    return ChunkScan(
        value=vals[sub], pixels=pixels[sub], area=area[sub], conf_sum=conf_sum[sub],
        conf_n=conf_n[sub],
        edges=(row[lab[0]], row[lab[-1]], row[lab[:, 0]], row[lab[:, -1]]),
        edge_values=(risk[0].copy(), risk[-1].copy(), risk[:, 0].copy(), risk[:, -1].copy()),
        polys=polys, poly_label=row[poly_label], dropped=dropped,
    )


def _spill(path: str, idx: np.ndarray, rows: np.ndarray) -> None:
    """Write the flat indices (uint32) and table rows of the pixels of returned pieces."""
    dtype = np.uint16 if len(rows) == 0 or rows.max() < 2**16 else np.uint32
    try:
        with open(path, "wb") as f:
            np.save(f, idx.astype(np.uint32), allow_pickle=False)
            np.save(f, rows.astype(dtype), allow_pickle=False)
    except OSError as exc:
        raise OutputError(
            f"{os.path.dirname(path)}: cannot write the zone pixels kept for the zone-id raster "
            f"({exc.strerror or exc}); free disk space in the output folder, or skip the zones "
            "step (--skip zones)") from exc


def read_spill(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Chunk-local flat indices (ascending) and table rows (1..n) of a chunk's traced pieces.

    The zone-id raster needs every pixel of every kept zone. Spilling them to a file in the
    labelling pass (~6 bytes per at-risk pixel) replaced labelling each chunk a second time
    (reading, closing, ``cc3d`` and scanning it again, ~20 ms per 4 MP chunk, and pickling the
    pixel lists back from the workers); keeping them in memory would grow with the raster.
    """
    with open(path, "rb") as f:
        return np.load(f, allow_pickle=False), np.load(f, allow_pickle=False)
