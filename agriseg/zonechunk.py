"""Per-chunk work of the zones pass, run in pool workers or in the calling process.

Everything here depends on one chunk only: reading the at-risk classes, labelling them, per-label
counts, the labels along the chunk's edges (the caller joins them across chunks) and the traced
polygons of the pieces that may be kept; then, in the second pass, the zone ids of the kept
pieces. Imports are kept light (no geopandas, no pyproj) so workers start fast.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import rasterio
from rasterio.windows import Window
from scipy import ndimage

from agriseg.trace import label_boxes, trace_labels

# 4-connectivity, as ``shapes(connectivity=4)`` traces: pixels that touch only at a corner are
# separate patches.
CROSS = ndimage.generate_binary_structure(2, 1)


def _disk(radius: int) -> np.ndarray:
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return (xx * xx + yy * yy) <= radius * radius


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
        cls = ds.read(1, window=win)
        lut = np.zeros(256, np.uint8)
        lut[risk_values] = risk_values + 1
        return lut[cls]
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
    """Patches of one chunk: int32 labels, each label's value (+1) and the labelled pixels.

    One ``ndimage.label`` over all at-risk pixels (labelling each class on its own costs one
    full-chunk pass per class); components where weed and disease touch are then labelled
    again per class inside their own bounding box, so touching classes stay separate patches,
    as ``shapes`` keeps distinct values apart. Their old labels are left without pixels.

    Returns:
        ``lab`` (0 = none), ``vals`` (index = label, 0 for unused labels), ``sel`` (flat indices
        of labelled pixels, ascending) and ``ls`` (their labels).
    """
    lab, n = ndimage.label(risk, structure=CROSS)
    flat = lab.ravel()
    # Labelled = at risk. nonzero has a fast path for bool only: the mask and its scan cost a
    # third of scanning the uint8 values (and a tenth of scanning the int32 labels).
    sel = np.flatnonzero(risk != 0)
    ls = flat[sel]
    rv = risk.ravel()[sel]
    vals = np.zeros(n + 1, np.uint8)
    vals[ls] = rv
    mixed = np.unique(ls[rv != vals[ls]])
    if len(mixed):
        b = label_boxes(sel, ls, mixed, n, risk.shape[1])
        for m, r0, r1, c0, c1 in zip(mixed.tolist(), b.r0.tolist(), b.r1.tolist(),
                                     b.c0.tolist(), b.c1.tolist(), strict=True):
            ys, xs = slice(r0, r1 + 1), slice(c0, c1 + 1)
            sub_lab, sub_risk = lab[ys, xs], risk[ys, xs]  # views: relabelled in place
            inside = sub_lab == m
            for v in np.unique(sub_risk[inside]).tolist():
                part = inside & (sub_risk == v)
                lv, k = ndimage.label(part, structure=CROSS)
                sub_lab[part] = lv[part] + n
                n += k
        ls = flat[sel]
        vals = np.zeros(n + 1, np.uint8)
        vals[ls] = rv
    return lab, vals, sel, ls


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


@dataclass(slots=True)
class ChunkScan:
    """What one chunk contributes; per-label arrays are indexed by the chunk-local label.

    Attributes:
        value, pixels, area, conf_sum, conf_n: per label (index 0 = no patch).
        edges: labels along the top, bottom, left and right edge (chunk-local, int32).
        edge_values: the at-risk value (+1) along the same edges.
        polys: traced polygons in raster pixel coordinates; ``poly_label`` their labels.
        traced: labels traced; ``box`` their first/last row and column; ``seed`` the flat
            index of their first pixel (chunk-local).
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
    traced: np.ndarray
    box: np.ndarray
    seed: np.ndarray


def scan_chunk(t: ScanTask) -> ChunkScan:
    """Label one chunk, count its pieces and trace those that may be kept.

    A piece is traced when it is big enough on its own or touches an inner chunk edge (its
    patch may continue in the neighbouring chunk).
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
    polys, poly_label = np.zeros(0, dtype=object), np.zeros(0, np.int64)
    traced, box, seed = np.zeros(0, np.int64), np.zeros((0, 4), np.int64), np.zeros(0, np.int64)
    if trace.any():
        boxes = label_boxes(sel, ls, np.flatnonzero(trace), n, w)
        polys, poly_label = trace_labels(lab, boxes, r0, c0)
        traced, seed = boxes.labels, boxes.seed
        box = np.stack([boxes.r0, boxes.r1, boxes.c0, boxes.c1], axis=1)
    return ChunkScan(
        value=vals, pixels=pixels, area=area, conf_sum=conf_sum, conf_n=conf_n,
        edges=(lab[0].copy(), lab[-1].copy(), lab[:, 0].copy(), lab[:, -1].copy()),
        edge_values=(risk[0].copy(), risk[-1].copy(), risk[:, 0].copy(), risk[:, -1].copy()),
        polys=polys, poly_label=poly_label, traced=traced, box=box, seed=seed,
    )


@dataclass(frozen=True, slots=True)
class ZoneIdTask:
    """The kept pieces of one chunk, to burn their zone ids.

    Attributes:
        classes_tif, win, values, nodata, radius: as in :class:`ScanTask`.
        zone: zone id of each piece; ``box``, ``seed`` and ``value`` as traced.
    """

    classes_tif: str
    win: tuple[int, int, int, int]
    values: np.ndarray
    nodata: int
    radius: int
    zone: np.ndarray
    box: np.ndarray
    seed: np.ndarray
    value: np.ndarray


def zone_id_chunk(t: ZoneIdTask) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices (chunk-local, ascending) of the kept pieces' pixels and their zone ids.

    Each kept piece is labelled again inside its bounding box only (its class, from its first
    pixel): far cheaper than labelling the whole chunk. Sparse output: a chunk's zones cover a
    small part of it, and this is what travels back from a worker.
    """
    r0, c0, h, w = t.win
    with rasterio.open(t.classes_tif) as ds:
        risk = read_risk(ds, Window(c0, r0, w, h), t.values - 1, t.nodata, t.radius)
    out = np.zeros(risk.shape, np.uint32)
    for z, (b0, b1, d0, d1), sd, v in zip(t.zone.tolist(), t.box.tolist(), t.seed.tolist(),
                                          t.value.tolist(), strict=True):
        ys, xs = slice(b0, b1 + 1), slice(d0, d1 + 1)
        lc, _ = ndimage.label(risk[ys, xs] == v, structure=CROSS)
        # The piece is the component holding its first pixel.
        piece = lc == lc[sd // w - b0, sd % w - d0]
        out[ys, xs][piece] = z
    flat = out.ravel()
    idx = np.flatnonzero(flat)
    return idx, flat[idx]
