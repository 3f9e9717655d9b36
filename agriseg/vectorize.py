"""At-risk zones (weed patches, disease spots) as polygons, from a chunked labelling pass.

The class mask is read in block-aligned chunks. Each chunk's at-risk patches are labelled
with one ``cc3d.connected_components`` (4-connectivity, each class on its own, so weed and
disease that touch stay separate patches) and counted with ``np.bincount``; labels of
neighbouring chunks are joined through the same-class pixel pairs along chunk borders, so a
patch that crosses chunks is ONE zone. Patches below the minimum area are dropped before any
polygon is built: only the pieces that may be kept are traced along their pixel edges (the
polygons GDAL's polygonizer gives, see :mod:`agriseg.trace`), in *pixel* coordinates
(integers, so pieces from neighbouring chunks share exactly the same vertices), simplified in
the chunk's worker with their chunk-border vertices kept, and the pieces of one patch are
unioned.
For the zone-id raster, the labelling pass spills each traced piece's pixels to a temporary
file, which the second pass reads back to burn the kept zones' ids (not by rasterising the
polygons back, which would burn in their filled holes). Memory is bounded by one chunk plus
per-patch tables and the zones themselves, never by the raster size.

Areas are ground areas in square metres: pixel counts times the pixel area in a projected CRS,
and times each row's pixel area on the ellipsoid when the raster CRS is geographic.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import rasterio
import shapely
from affine import Affine
from rasterio.crs import CRS
from rasterio.errors import RasterioError
from rasterio.windows import Window
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from agriseg import heap
from agriseg.classes import ClassSchema
from agriseg.errors import OutputError, RasterError
from agriseg.grid import Grid, on_earth
from agriseg.pool import ordered_map
from agriseg.zonechunk import ScanTask, read_spill, scan_chunk

log = logging.getLogger(__name__)

ZONE_COLUMNS = (
    "zone_id", "class", "area_m2", "pixels", "mean_confidence", "field_id",
    "centroid_lon", "centroid_lat",
)


@dataclass(frozen=True, slots=True)
class ZoneParams:
    """How zones are cut from the class mask.

    Attributes:
        min_area_m2: zones smaller than this (after merging) are dropped.
        closing_m: radius in metres of a morphological closing per at-risk class before
            vectorising (joins patches separated by thin gaps); 0 = off.
        simplify_m: Douglas-Peucker tolerance in metres; ``None`` = one pixel (removes the
            staircase without moving edges by more than a pixel); 0 = off.
        chunk: chunk edge in pixels (rounded up to the raster's block size).
    """

    min_area_m2: float = 0.25
    closing_m: float = 0.0
    simplify_m: float | None = None
    chunk: int = 2048


def chunk_windows(height: int, width: int, chunk: int) -> Iterator[Window]:
    """Row-major windows of ``chunk`` pixels that cover a raster exactly."""
    for r in range(0, height, chunk):
        for c in range(0, width, chunk):
            yield Window(c, r, min(chunk, width - c), min(chunk, height - r))


def aligned_chunk(ds: rasterio.DatasetReader, chunk: int) -> int:
    """``chunk`` rounded up to a multiple of the file's block size (whole-block reads)."""
    by, bx = ds.block_shapes[0]
    b = max(1, max(by, bx))
    return max(b, math.ceil(chunk / b) * b)


def grid_of(ds: rasterio.DatasetReader) -> Grid:
    """The :class:`Grid` of an open dataset."""
    return Grid((ds.height, ds.width), ds.transform, ds.crs)


#: Global equal-area CRS for areas of polygons in lon/lat (Lambert cylindrical, WGS 84).
EQUAL_AREA = "EPSG:6933"


def areas_m2(geoms_crs: np.ndarray, grid: Grid) -> np.ndarray:
    """Ground areas in square metres of polygons given in the grid's CRS.

    In a geographic CRS, areas in the global equal-area CRS EPSG:6933 (cylindrical: parallels
    and meridians stay straight, so a pixel's area is exact there) after densifying the
    edges to 0.01 degree. A local UTM zone misjudged polygons far from its centre (a
    whole-world raster's fields came out 0 ha); geodesic areas take a polygon's edges for
    great circles, where a raster's pixel edges are parallels.
    """
    if len(geoms_crs) == 0:
        return np.zeros(0)
    if grid.crs.is_geographic:
        dense = shapely.segmentize(geoms_crs, 0.01)
        return gpd.GeoSeries(dense, crs=grid.crs).to_crs(EQUAL_AREA).area.to_numpy()
    return shapely.area(geoms_crs) * grid.square_metres_per_unit2


def pixel_to_crs(geoms: np.ndarray, transform: Affine) -> np.ndarray:
    """Apply a raster's affine transform to geometries in pixel coordinates."""
    a, b, c, d, e, f = transform[:6]
    return shapely.transform(geoms, lambda xy: xy @ np.array([[a, d], [b, e]]) + np.array([c, f]))


def row_pixel_areas(grid: Grid) -> np.ndarray | None:
    """Ground area of a pixel in each row for a geographic CRS (None: constant area).

    Exact on the ellipsoid: the area between two parallels per radian of longitude is
    ``a^2 / 2 * (q(phi1) - q(phi2))`` with ``q`` the authalic function.
    """
    if not grid.crs.is_geographic:
        return None
    ell = grid.crs.to_dict().get("ellps") or "WGS84"
    from pyproj import Geod

    g = Geod(ellps=ell if isinstance(ell, str) else "WGS84")
    a, e2 = g.a, g.es
    e = math.sqrt(e2)
    t = grid.transform
    lat = np.radians(t.f + t.e * np.arange(grid.height + 1))
    s = np.sin(lat)
    q = (1 - e2) * (s / (1 - e2 * s * s) - np.log((1 - e * s) / (1 + e * s)) / (2 * e))
    return a * a / 2 * np.abs(np.diff(q)) * math.radians(abs(t.a))


@dataclass(slots=True)
class _Scan:
    """What the labelling pass keeps: per-label tables (index 0 = no patch) and polygons.

    Global labels number the chunks' returned pieces in chunk order (row-major), each chunk
    after the last label of the one before; ``root`` maps each global label to its patch
    after merging across chunk borders; chunk ``i``'s labels are ``bases[i] + 1 .. bases[i + 1]``.
    """

    value: np.ndarray
    pixels: np.ndarray
    conf_sum: np.ndarray
    conf_n: np.ndarray
    area: np.ndarray
    root: np.ndarray
    pieces: np.ndarray
    piece_label: np.ndarray
    bases: np.ndarray
    dropped: int


def _spill_path(spill_dir: str, i_chunk: int) -> str:
    """Where chunk ``i_chunk`` spills its traced pixels (see :func:`read_spill`)."""
    return os.path.join(spill_dir, f"{i_chunk}.npy")


def _edge_pairs(a_lab: np.ndarray, a_val: np.ndarray, b_lab: np.ndarray,
                b_val: np.ndarray) -> np.ndarray:
    """Global label pairs of 4-neighbours of the same class across one chunk border."""
    m = (b_val > 0) & (a_val == b_val)
    if not m.any():
        return np.zeros((0, 2), np.int64)
    return np.unique(np.stack([a_lab[m], b_lab[m]], axis=1), axis=0)


# The chunks this process labels and traces itself leave freed native heap (GEOS, cc3d, GDAL)
# that glibc keeps: over the 256 chunks of a 1 GP mask ~40 MB more at the peak than with a
# trim every 8 chunks. A trim after every chunk saved a little more but cost ~20 % of the
# scan (pages faulted in again).
TRIM_EVERY = 8


def _scan(job: ScanTask, chunk: int, workers: int | None, spill_dir: str | None) -> _Scan:
    """One pass over the mask: label patches, count their pixels, trace the big ones.

    The chunks are labelled and traced by :func:`agriseg.zonechunk.scan_chunk` (in worker
    processes, see :mod:`agriseg.pool`); here their tables are concatenated in chunk order and
    their labels joined across chunk borders. A patch's size is only known once its pieces in
    every chunk are merged, so a piece is traced when it is big enough on its own or when it
    touches an inner chunk border (it may grow). Traced pieces come back simplified, with
    their chunk-border vertices in place.

    Args:
        job: the whole raster as one task: its window and row areas are cut per chunk.
        chunk: chunk edge in pixels.
        workers: as in :func:`vectorize_zones`.
        spill_dir: folder for each chunk's traced pixels (``{i}.npy``), or ``None``.
    """
    height, width = job.shape
    wins = [(int(w.row_off), int(w.col_off), int(w.height), int(w.width))
            for w in chunk_windows(height, width, chunk)]
    tasks = (replace(job, win=win, row_area=None if job.row_area is None
                     else job.row_area[win[0]:win[0] + win[2]],
                     spill=None if spill_dir is None else _spill_path(spill_dir, i))
             for i, win in enumerate(wins))
    value_t: list[np.ndarray] = [np.zeros(1, np.uint8)]
    pixels_t: list[np.ndarray] = []
    conf_sum_t: list[np.ndarray] = []
    conf_n_t: list[np.ndarray] = []
    area_t: list[np.ndarray] = []
    for t in (pixels_t, conf_sum_t, conf_n_t, area_t):
        t.append(np.zeros(1))
    pairs: list[np.ndarray] = []
    pieces: list[np.ndarray] = []
    piece_label: list[np.ndarray] = []
    bases = np.zeros(len(wins) + 1, np.int64)
    # Labels and values of the row above the current chunk row (all columns) and of the column
    # left of the current chunk: the only state carried between chunks.
    top_lab = np.zeros(width, np.int64)
    top_val = np.zeros(width, np.uint8)
    left_lab: np.ndarray | None = None
    left_val: np.ndarray | None = None
    base = dropped = 0
    for i_chunk, ((r0, c0, _, w), cs) in enumerate(
            zip(wins, ordered_map(scan_chunk, tasks, workers), strict=True)):
        bases[i_chunk] = base
        dropped += cs.dropped
        if i_chunk % TRIM_EVERY == TRIM_EVERY - 1:
            heap.trim()
        n = len(cs.value) - 1
        if n == 0:
            top_lab[c0:c0 + w] = 0
            top_val[c0:c0 + w] = 0
            left_lab = left_val = None
            continue

        def glob(x: np.ndarray, b: int = base) -> np.ndarray:
            return np.where(x > 0, x.astype(np.int64) + b, 0)

        value_t.append(cs.value[1:])
        pixels_t.append(cs.pixels[1:])
        area_t.append(cs.area[1:])
        conf_sum_t.append(cs.conf_sum[1:])
        conf_n_t.append(cs.conf_n[1:])
        e_top, e_bottom, e_left, e_right = cs.edges
        v_top, v_bottom, v_left, v_right = cs.edge_values
        if r0 > 0:
            pairs.append(_edge_pairs(top_lab[c0:c0 + w], top_val[c0:c0 + w], glob(e_top), v_top))
        if c0 > 0 and left_lab is not None:
            assert left_val is not None  # set together with left_lab
            pairs.append(_edge_pairs(left_lab, left_val, glob(e_left), v_left))
        if len(cs.polys):
            pieces.append(cs.polys)
            piece_label.append(cs.poly_label + base)
        top_lab[c0:c0 + w] = glob(e_bottom)
        top_val[c0:c0 + w] = v_bottom
        left_lab, left_val = glob(e_right), v_right
        base += n
    bases[-1] = base
    n_lab = base + 1
    # Labelling only sees one chunk; joining its labels across chunk borders is a
    # connectivity problem on the graph of same-class border pixel pairs, solved in C by
    # scipy's connected_components (one node per label: memory ~ number of patches).
    pp = np.concatenate(pairs) if pairs else np.zeros((0, 2), np.int64)
    graph = coo_matrix((np.ones(len(pp), np.int8), (pp[:, 0], pp[:, 1])), shape=(n_lab, n_lab))
    _, root = connected_components(graph, directed=False)
    return _Scan(
        value=np.concatenate(value_t), pixels=np.concatenate(pixels_t).astype(np.int64),
        conf_sum=np.concatenate(conf_sum_t), conf_n=np.concatenate(conf_n_t).astype(np.int64),
        area=np.concatenate(area_t), root=root,
        pieces=np.concatenate(pieces) if pieces else np.zeros(0, dtype=object),
        piece_label=np.concatenate(piece_label) if piece_label else np.zeros(0, np.int64),
        bases=bases, dropped=dropped,
    )


def vectorize_zones(
    classes_tif: str | os.PathLike[str],
    schema: ClassSchema,
    params: ZoneParams | None = None,
    confidence_tif: str | os.PathLike[str] | None = None,
    fields: gpd.GeoDataFrame | None = None,
    zone_raster: str | os.PathLike[str] | None = None,
    workers: int | None = None,
) -> gpd.GeoDataFrame:
    """Polygons of the at-risk classes of a class mask.

    Two chunked passes: the first labels 4-connected patches of each class per chunk
    (``cc3d``), counts their pixels and confidence, merges labels across chunk
    borders and traces only the patches that may reach the minimum area (spilling their
    pixels to a temporary folder beside ``zone_raster``, when given); the second (only with
    ``zone_raster``) writes the kept zones' ids from the spilled pixels.

    Args:
        classes_tif: uint8 class raster (``schema.nodata`` = nodata).
        schema: class schema; its ``at_risk`` classes become zones.
        params: thresholds and chunking (defaults: :class:`ZoneParams`).
        confidence_tif: confidence raster (percent, 255 nodata) on the same grid, for
            ``mean_confidence``.
        fields: field polygons in the raster CRS with a ``field_id`` column; each zone gets
            the id of the field holding the largest part of it (at least half a pixel; ties,
            as with nested fields, go to the field holding the zone's representative point,
            then to the smaller field), or none when no field holds any of it.
        zone_raster: where to write a tiled GeoTIFF of zone ids (0 = no zone): uint16, or
            uint32 beyond 65 535 zones.
        workers: worker processes for the per-chunk work besides this one (0 = none);
            default :func:`agriseg.pool.post_workers`. The result does not depend on it.

    Returns:
        Zones in the raster CRS, largest first, columns :data:`ZONE_COLUMNS` + geometry.

    Raises:
        RasterError: the class raster cannot be read.
        OutputError: the zone raster cannot be written.
    """
    p = params or ZoneParams()
    values = np.array([c.value + 1 for c in schema.at_risk], dtype=np.int64)
    names = {c.value + 1: c.name for c in schema.at_risk}
    try:
        ds = rasterio.open(classes_tif)
    except RasterioError as exc:
        raise RasterError(f"{classes_tif}: cannot open the class raster ({exc})") from exc
    with ds:
        grid = grid_of(ds)
        chunk = aligned_chunk(ds, p.chunk)
        radius = round(p.closing_m / grid.gsd_m) if p.closing_m > 0 else 0
        geographic = grid.crs.is_geographic
        # Zone areas are pixel counts x pixel area (projected) or sums of ellipsoidal per-pixel
        # areas (geographic, within 0.2 % of the polygon's equal-area area, tested); the slack only
        # decides which patches are traced before the exact test.
        unit = 1.0 if geographic else grid.pixel_area_m2
        slack = 1e-2 if geographic else 1e-6
        min_px = p.min_area_m2 * (1 - slack) / unit
        row_area = row_pixel_areas(grid)
        # Holes are measured in pixels: the mean pixel's ground area is close enough for
        # telling speckle holes from real ones.
        px_m2 = float(row_area.mean()) if row_area is not None else grid.pixel_area_m2
    if confidence_tif is not None:
        # Opened here once so that a missing file fails before any chunk is handed out.
        rasterio.open(confidence_tif).close()
    job = ScanTask(
        os.fspath(classes_tif), None if confidence_tif is None else os.fspath(confidence_tif),
        (0, 0, grid.height, grid.width), grid.shape_yx, values, schema.nodata, radius, row_area,
        min_px, min_hole_px=p.min_area_m2 / px_m2,
        simplify_px=1.0 if p.simplify_m is None else p.simplify_m / grid.gsd_m)
    spill: contextlib.AbstractContextManager[str | None] = contextlib.nullcontext()
    if zone_raster is not None:
        # Beside the zone raster: the output folder is writable and sized for rasters. A
        # folder left by a run that was killed here is removed first.
        prefix = f".{Path(zone_raster).stem}.pixels-"
        for stale in Path(zone_raster).parent.glob(f"{prefix}*"):
            shutil.rmtree(stale, ignore_errors=True)
        spill = tempfile.TemporaryDirectory(dir=Path(zone_raster).parent, prefix=prefix)
    with spill as spill_dir:
        return _zones(job, p, grid, chunk, names, unit, min_px, fields, zone_raster,
                      spill_dir, workers)


def _zones(job: ScanTask, p: ZoneParams, grid: Grid, chunk: int, names: dict[int, str],
           unit: float, min_px: float, fields: gpd.GeoDataFrame | None,
           zone_raster: str | os.PathLike[str] | None, spill_dir: str | None,
           workers: int | None) -> gpd.GeoDataFrame:
    """:func:`vectorize_zones` once the task is set up (``spill_dir`` with ``zone_raster``)."""
    scan = _scan(job, chunk, workers, spill_dir)
    root = scan.root
    n_comp = int(root.max()) + 1
    comp_area = np.bincount(root, weights=scan.area, minlength=n_comp)
    big = comp_area >= min_px
    big[root[0]] = False
    pl = scan.piece_label
    pc = root[pl]
    take = big[pc]
    pl, pc, geoms = pl[take], pc[take], scan.pieces[take]
    order = np.argsort(pc, kind="stable")
    pc, pl, geoms = pc[order], pl[order], geoms[order]
    starts = np.flatnonzero(np.r_[True, pc[1:] != pc[:-1]]) if len(pc) else np.zeros(0, int)
    ends = np.append(starts[1:], len(pc)) if len(pc) else starts
    comps = pc[starts]
    pix = np.empty(len(comps), dtype=object)
    for i, (s, e) in enumerate(zip(starts, ends, strict=True)):
        # Pieces of a patch cut by chunk borders share whole pixel edges (simplification
        # keeps them): their union is one polygon (4-connected pixels).
        pix[i] = geoms[s] if e - s == 1 else shapely.union_all(geoms[s:e])
    vals = scan.value[pl[starts]].astype(np.int64)
    # Labels left without pixels by label_chunk are not patches; specks wholly inside a
    # chunk were counted and dropped there.
    n_patches = scan.dropped + int(
        np.count_nonzero(np.bincount(root, weights=scan.pixels, minlength=n_comp)))
    if len(pix):
        crs_geoms = pixel_to_crs(pix, grid.transform)
        # Map coordinates of a few hundred thousand metres keep fewer significant digits than
        # pixel ones: a hole touching its shell at a vertex can come out crossing it.
        bad = ~shapely.is_valid(crs_geoms)
        if bad.any():
            crs_geoms[bad] = shapely.make_valid(crs_geoms[bad], method="structure",
                                                keep_collapsed=False)
        # Pixel count x pixel area (ellipsoidal per-row areas for geographic grids).
        area = comp_area[comps] * unit
        keep = area >= p.min_area_m2
        pix, vals, crs_geoms, area, comps = (
            pix[keep], vals[keep], crs_geoms[keep], area[keep], comps[keep])
        order = np.argsort(-area, kind="stable")
        pix, vals, crs_geoms, area, comps = (
            pix[order], vals[order], crs_geoms[order], area[order], comps[order])
    else:
        crs_geoms, area = np.array([], dtype=object), np.zeros(0)
    log.info(
        "zones: %d patch(es) of %s, %d below %.3g m2 dropped",
        len(pix), "/".join(names.values()) or "no at-risk class", n_patches - len(pix),
        p.min_area_m2,
    )
    ids = np.arange(1, len(pix) + 1, dtype=np.int64)
    comp_zone = np.zeros(n_comp, np.uint32)
    comp_zone[comps] = ids
    label_zone = comp_zone[root]
    label_zone[0] = 0
    pixels = np.bincount(root, weights=scan.pixels, minlength=n_comp)[comps].astype(np.int64)
    conf_sum = np.bincount(root, weights=scan.conf_sum, minlength=n_comp)[comps]
    conf_n = np.bincount(root, weights=scan.conf_n, minlength=n_comp)[comps]
    if zone_raster is not None:
        assert spill_dir is not None  # given with zone_raster
        _write_zone_raster(job.classes_tif, zone_raster, label_zone, scan.bases, spill_dir,
                           chunk)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.where(conf_n > 0, conf_sum / np.maximum(conf_n, 1), np.nan)
    gdf = gpd.GeoDataFrame(
        {
            "zone_id": ids,
            "class": pd.Series([names[int(v)] for v in vals], dtype=object),
            "area_m2": np.round(area, 6),  # a 1 cm pixel is 0.0001 m2
            "pixels": pixels,
            "mean_confidence": np.round(mean_conf, 1),
        },
        geometry=gpd.GeoSeries(crs_geoms, crs=grid.crs),
        crs=grid.crs,
    )
    gdf["field_id"] = _assign_fields(gdf, fields, min_overlap(grid))
    lon, lat = _scout_points(crs_geoms, grid.crs)
    gdf["centroid_lon"], gdf["centroid_lat"] = np.round(lon, 7), np.round(lat, 7)
    return gdf[[*ZONE_COLUMNS, "geometry"]]


def _write_zone_raster(
    classes_tif: str | os.PathLike[str],
    zone_raster: str | os.PathLike[str],
    label_zone: np.ndarray,
    bases: np.ndarray,
    spill_dir: str,
    chunk: int,
) -> None:
    """Write zone ids chunk by chunk from the traced pixels the labelling pass spilled.

    Chunks without a kept zone are skipped (sparse, read as 0). This runs in the calling
    process: per chunk it is a file read, a lookup and the encoding, and sending the pixel
    lists back from workers would cost more than it saves.
    """
    zone_raster = Path(zone_raster)
    tmp = zone_raster.with_name(f".{zone_raster.stem}.partial.tif")
    with rasterio.open(classes_tif) as src:
        prof = src.profile
        wins = list(chunk_windows(src.height, src.width, chunk))
    # A working file (finalize_cog recompresses it): ZSTD level 1 encodes ids several times
    # faster than DEFLATE; without a predictor, as ids are mostly runs of zeros and
    # constants: 67 MP in 0.16 s instead of 0.23 s, and smaller. uint16 while the ids fit:
    # the COG copy then moves half the bytes (1 GP: 4 GB of mostly zeros as uint32).
    dtype = np.uint16 if label_zone.max(initial=0) <= np.iinfo(np.uint16).max else np.uint32
    prof.update(dtype=np.dtype(dtype).name, nodata=0, count=1, compress="zstd", zstd_level=1,
                tiled=True, sparse_ok=True, BIGTIFF="IF_SAFER")
    prof.pop("photometric", None)
    prof.pop("predictor", None)
    try:
        dst = rasterio.open(tmp, "w", **prof)
    except RasterioError as exc:
        raise OutputError(f"{zone_raster}: cannot create the zone raster ({exc})") from exc
    try:
        with dst:
            for i, win in enumerate(wins):
                base = int(bases[i])
                if not label_zone[base + 1:bases[i + 1] + 1].any():
                    continue
                idx, rows = read_spill(_spill_path(spill_dir, i))
                out = np.zeros((int(win.height), int(win.width)), dtype)
                out.ravel()[idx] = label_zone[rows.astype(np.int64) + base]
                dst.write(out, 1, window=win)
            dst.set_band_description(1, "zone id (0 = no zone); see zone_id in zones.gpkg")
    except RasterioError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{zone_raster}: writing zone ids failed ({exc})") from exc
    os.replace(tmp, zone_raster)


def _scout_points(geoms: np.ndarray, crs: CRS) -> tuple[np.ndarray, np.ndarray]:
    """Lon/lat of each zone's centroid, or of a point inside it.

    A ring-shaped patch has its centroid outside; scouts walk to this point, so it must be in.
    """
    if len(geoms) == 0 or not on_earth(crs):  # no place on Earth: an image run with --gsd
        return np.full(len(geoms), np.nan), np.full(len(geoms), np.nan)
    pts = shapely.centroid(geoms)
    outside = ~shapely.contains_properly(geoms, pts)
    pts[outside] = shapely.point_on_surface(geoms[outside])
    ll = gpd.GeoSeries(pts, crs=crs).to_crs(4326)
    return ll.x.to_numpy(), ll.y.to_numpy()


def min_overlap(grid: Grid) -> float:
    """Half a pixel's area in the grid's CRS units: the least part of a zone a field holds.

    Simplified zone outlines cut pixel corners, so a zone along a plot's edge grazes its
    neighbour by slivers that hold no pixel of it.
    """
    return abs(grid.transform.determinant) / 2


def zone_field_overlaps(
    zones: np.ndarray, fields: np.ndarray, min_area: float = 0.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Positions of the zones and fields sharing more than ``min_area``, and that area.

    Both in one CRS, areas in its units. Only pairs that intersect (found with a spatial
    index) are intersected, and not those where one holds the other (the share is the
    smaller's area): an intersection costs about 17 us a pair, and a speck inside its plot,
    or a plot under a large zone, is the common case.

    A zone of more than :data:`OVERLAP_VERTICES` vertices is not intersected: its pairs with
    the fields it intersects get NaN.

    Returns:
        ``(zone, field, area)``: one entry per overlapping pair, by zone.
    """
    if len(zones) == 0 or len(fields) == 0:
        none = np.zeros(0, np.intp)
        return none, none, np.zeros(0)
    tree = shapely.STRtree(fields)
    zi, fi = tree.query(zones, predicate="intersects")
    area = np.full(len(zi), np.nan)
    pair = zi.astype(np.int64) * len(fields) + fi
    for predicate, whole in (("within", shapely.area(zones)[zi]),
                             ("contains", shapely.area(fields)[fi])):
        a, b = tree.query(zones, predicate=predicate)
        held = np.isin(pair, a.astype(np.int64) * len(fields) + b)
        area[held] = whole[held]
    huge = shapely.get_num_coordinates(zones) > OVERLAP_VERTICES
    area[huge[zi]] = np.nan  # not measured at all: such a zone goes by its point
    cut = np.isnan(area) & ~huge[zi]
    area[cut] = shapely.area(shapely.intersection(zones[zi[cut]], fields[fi[cut]]))
    keep = (area > min_area) | np.isnan(area)
    return zi[keep], fi[keep], area[keep]


#: Most vertices of a zone intersected with the fields it touches. A patch percolating
#: through a weedy survey has hundreds of thousands, and each intersection costs in
#: proportion (18 ms a plot for 700 000 vertices at 4 MP: +18 s with 400 plots, hours with
#: thousands at 67 MP); such a zone is assigned by its representative point instead.
OVERLAP_VERTICES = 20_000


def _assign_fields(zones: gpd.GeoDataFrame, fields: gpd.GeoDataFrame | None,
                   min_area: float = 0.0) -> pd.Series:
    """The ``field_id`` of the field holding the largest part of each zone (None: none).

    By area, not by the zone's representative point: in a breeding trial a zone crossing
    plots had its point in the alley between them (no field) or in the plot holding 15 % of
    it. The point only breaks ties (nested fields holding the same part, or a zone too large
    to intersect, see :data:`OVERLAP_VERTICES`), then the smaller field, then the first
    listed. Both are in the raster CRS (compared as coordinates: two
    copies of an image plane's local CRS compare unequal).
    """
    none = pd.Series([None] * len(zones), index=zones.index, dtype=object)
    if fields is None or zones.empty or fields.empty:
        return none
    zg, fg = zones.geometry.to_numpy(), fields.geometry.to_numpy()
    zi, fi, area = zone_field_overlaps(zg, fg, min_area)
    if len(zi) == 0:
        return none
    # Unmeasured (a zone too large to intersect): all its fields tie, and only one holding
    # its representative point may have it.
    unmeasured = np.isnan(area)
    area = np.nan_to_num(area, nan=0.0)
    best = np.zeros(len(zg))
    np.maximum.at(best, zi, area)
    # Equal up to rounding: a zone inside nested fields has the same part in each.
    tied = area >= best[zi] * (1 - 1e-9)
    zi, fi, unmeasured = zi[tied], fi[tied], unmeasured[tied]
    holds = shapely.contains(fg[fi], shapely.point_on_surface(zg[zi]))
    usable = holds | ~unmeasured
    zi, fi, holds = zi[usable], fi[usable], holds[usable]
    if len(zi) == 0:
        return none
    order = np.lexsort((fi, shapely.area(fg)[fi], ~holds, zi))
    zi, fi = zi[order], fi[order]
    first = np.r_[True, zi[1:] != zi[:-1]]
    ids = np.full(len(zg), None, dtype=object)
    ids[zi[first]] = fields["field_id"].to_numpy()[fi[first]]
    return pd.Series(ids, index=zones.index, dtype=object)


def write_zones(
    zones: gpd.GeoDataFrame, path: str | os.PathLike[str], layer: str = "zones"
) -> Path:
    """Write zones to a GeoPackage via a temporary name.

    Raises:
        OutputError: the file cannot be written.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.partial.gpkg")
    tmp.unlink(missing_ok=True)
    try:
        zones.to_file(tmp, layer=layer, driver="GPKG", engine="pyogrio")
    except Exception as exc:  # pyogrio raises several unrelated types for I/O failures
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{path}: cannot write zones ({exc}); is the disk full?") from exc
    os.replace(tmp, path)
    return path
