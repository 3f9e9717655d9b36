"""At-risk zones (weed patches, disease spots) as polygons, vectorised chunk by chunk.

The class mask is read in block-aligned chunks; ``rasterio.features.shapes`` polygonises each
chunk in *pixel* coordinates (integers, so pieces from neighbouring chunks share exactly the
same vertices). Only pieces touching an inner chunk edge are merged, per class, by the
connected components of their shared edges; everything else is final as soon as its chunk is
done. Memory is bounded by one chunk plus the zones themselves, never by the raster size.

Areas are ground areas in square metres: pixel counts times the pixel area in a projected CRS,
or the polygon area in the local UTM zone when the raster CRS is geographic.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import rasterio
import shapely
from affine import Affine
from pyproj import CRS as ProjCRS
from pyproj.aoi import AreaOfInterest
from pyproj.database import query_utm_crs_info
from rasterio.crs import CRS
from rasterio.errors import RasterioError
from rasterio.features import rasterize, shapes
from rasterio.windows import Window
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from agriseg.classes import ClassSchema
from agriseg.errors import OutputError, RasterError
from agriseg.grid import Grid

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


def local_metric_crs(crs: CRS, bounds: tuple[float, float, float, float]) -> ProjCRS | None:
    """The UTM CRS around ``bounds`` when ``crs`` is geographic; ``None`` when it is projected.

    Areas in a geographic CRS are in square degrees; the local UTM zone is conformal and its
    scale error is below 0.1 % within a zone, well inside what field areas need.
    """
    if not crs.is_geographic:
        return None
    west, south, east, north = bounds
    infos = query_utm_crs_info(
        datum_name="WGS 84",
        area_of_interest=AreaOfInterest(west, south, east, north),
    )
    if not infos:
        return ProjCRS.from_epsg(6933)  # equal-area world CRS outside UTM's latitude band
    lon = (west + east) / 2
    # Several zones overlap a wide AOI; prefer the one holding the centre.
    best = min(infos, key=lambda i: abs((i.area_of_use.west + i.area_of_use.east) / 2 - lon))
    return ProjCRS.from_authority(best.auth_name, best.code)


def areas_m2(geoms_crs: np.ndarray, grid: Grid) -> np.ndarray:
    """Ground areas in square metres of polygons given in the grid's CRS."""
    if len(geoms_crs) == 0:
        return np.zeros(0)
    local = local_metric_crs(grid.crs, grid.bounds)
    if local is None:
        factor = grid.crs.linear_units_factor[1] if grid.crs.is_projected else 1.0
        return shapely.area(geoms_crs) * factor**2
    s = gpd.GeoSeries(geoms_crs, crs=grid.crs).to_crs(local)
    return s.area.to_numpy()


def pixel_to_crs(geoms: np.ndarray, transform: Affine) -> np.ndarray:
    """Apply a raster's affine transform to geometries in pixel coordinates."""
    a, b, c, d, e, f = transform[:6]
    return shapely.transform(geoms, lambda xy: xy @ np.array([[a, d], [b, e]]) + np.array([c, f]))


def _disk(radius: int) -> np.ndarray:
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return (xx * xx + yy * yy) <= radius * radius


def _read_risk(
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


def _chunk_pieces(
    risk: np.ndarray, win: Window
) -> tuple[list[shapely.Polygon], list[int]]:
    """Polygons (global pixel coordinates) and class values (+1) of one chunk."""
    tr = Affine.translation(win.col_off, win.row_off)
    geoms, vals = [], []
    for geom, val in shapes(risk, mask=risk > 0, connectivity=4, transform=tr):
        rings = geom["coordinates"]
        geoms.append(shapely.Polygon(rings[0], rings[1:]))
        vals.append(int(val))
    return geoms, vals


def _merge_border_pieces(geoms: np.ndarray, vals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Union pieces of the same class that share an edge (pieces cut by chunk borders)."""
    if len(geoms) < 2:
        return geoms, vals
    tree = shapely.STRtree(geoms)
    i, j = tree.query(geoms, predicate="intersects")
    keep = (i < j) & (vals[i] == vals[j])
    i, j = i[keep], j[keep]
    # Pieces touching at a single corner are separate patches under 4-connectivity.
    shared = shapely.length(shapely.intersection(geoms[i], geoms[j])) > 0
    i, j = i[shared], j[shared]
    n = len(geoms)
    graph = coo_matrix((np.ones(len(i), np.int8), (i, j)), shape=(n, n))
    ncomp, labels = connected_components(graph, directed=False)
    order = np.argsort(labels, kind="stable")
    bounds = np.flatnonzero(np.diff(labels[order])) + 1
    out_g, out_v = [], []
    for members in np.split(order, bounds):
        if len(members) == 1:
            out_g.append(geoms[members[0]])
        else:
            out_g.append(shapely.union_all(geoms[members]))
        out_v.append(vals[members[0]])
    log.debug("merged %d border pieces into %d", n, ncomp)
    return np.array(out_g, dtype=object), np.array(out_v)


def _explode(geoms: np.ndarray, vals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    parts, idx = shapely.get_parts(geoms, return_index=True)
    return parts, vals[idx]


def vectorize_zones(
    classes_tif: str | os.PathLike[str],
    schema: ClassSchema,
    params: ZoneParams | None = None,
    confidence_tif: str | os.PathLike[str] | None = None,
    fields: gpd.GeoDataFrame | None = None,
    zone_raster: str | os.PathLike[str] | None = None,
) -> gpd.GeoDataFrame:
    """Polygons of the at-risk classes of a class mask.

    Args:
        classes_tif: uint8 class raster (``schema.nodata`` = nodata).
        schema: class schema; its ``at_risk`` classes become zones.
        params: thresholds and chunking (defaults: :class:`ZoneParams`).
        confidence_tif: confidence raster (percent, 255 nodata) on the same grid, for
            ``mean_confidence``.
        fields: field polygons in the raster CRS with a ``field_id`` column; each zone gets
            the id of the field holding its centroid (or its representative point).
        zone_raster: where to write a uint32 tiled GeoTIFF of zone ids (0 = no zone).

    Returns:
        Zones in the raster CRS, largest first, columns :data:`ZONE_COLUMNS` + geometry.

    Raises:
        RasterError: the class raster cannot be read.
        OutputError: the zone raster cannot be written.
    """
    p = params or ZoneParams()
    risk = np.array([c.value for c in schema.at_risk], dtype=np.int64)
    names = {c.value + 1: c.name for c in schema.at_risk}
    try:
        ds = rasterio.open(classes_tif)
    except RasterioError as exc:
        raise RasterError(f"{classes_tif}: cannot open the class raster ({exc})") from exc
    with ds:
        grid = grid_of(ds)
        chunk = aligned_chunk(ds, p.chunk)
        radius = round(p.closing_m / grid.gsd_m) if p.closing_m > 0 else 0
        final_g: list[shapely.Polygon] = []
        final_v: list[int] = []
        border_g: list[shapely.Polygon] = []
        border_v: list[int] = []
        for win in chunk_windows(grid.height, grid.width, chunk):
            arr = _read_risk(ds, win, risk, schema.nodata, radius)
            if not arr.any():
                continue
            g, v = _chunk_pieces(arr, win)
            if not g:
                continue
            ga = np.array(g, dtype=object)
            b = shapely.bounds(ga)
            # Integer pixel coordinates: equality tests are exact.
            inner = (
                ((b[:, 0] == win.col_off) & (win.col_off > 0))
                | ((b[:, 1] == win.row_off) & (win.row_off > 0))
                | ((b[:, 2] == win.col_off + win.width) & (win.col_off + win.width < grid.width))
                | ((b[:, 3] == win.row_off + win.height)
                   & (win.row_off + win.height < grid.height))
            )
            for k in np.flatnonzero(inner):
                border_g.append(g[k])
                border_v.append(v[k])
            for k in np.flatnonzero(~inner):
                final_g.append(g[k])
                final_v.append(v[k])
        mg, mv = _merge_border_pieces(np.array(border_g, dtype=object), np.array(border_v))
        mg, mv = _explode(mg, mv)
        pix = np.concatenate([np.array(final_g, dtype=object), mg]) if len(mg) else np.array(
            final_g, dtype=object)
        vals = np.concatenate([np.array(final_v, dtype=np.int64), mv.astype(np.int64)])
    n_pieces = len(pix)
    if n_pieces:
        crs_geoms = pixel_to_crs(pix, grid.transform)
        area = areas_m2(crs_geoms, grid)
        keep = area >= p.min_area_m2
        pix, vals, crs_geoms, area = pix[keep], vals[keep], crs_geoms[keep], area[keep]
        order = np.argsort(-area, kind="stable")
        pix, vals, crs_geoms, area = pix[order], vals[order], crs_geoms[order], area[order]
    else:
        crs_geoms, area = np.array([], dtype=object), np.zeros(0)
    log.info(
        "zones: %d patch(es) of %s, %d below %.3g m2 dropped",
        len(pix), "/".join(names.values()) or "no at-risk class", n_pieces - len(pix),
        p.min_area_m2,
    )
    ids = np.arange(1, len(pix) + 1, dtype=np.int64)
    pixels, conf_sum, conf_n = _zone_pixel_stats(
        classes_tif, confidence_tif, pix, ids, grid, chunk, zone_raster)
    mean_conf = np.where(conf_n > 0, conf_sum / np.maximum(conf_n, 1), np.nan)
    simplify_px = 1.0 if p.simplify_m is None else p.simplify_m / grid.gsd_m
    if simplify_px > 0 and len(pix):
        out_pix = shapely.simplify(pix, simplify_px, preserve_topology=True)
        out_geoms = pixel_to_crs(out_pix, grid.transform)
    else:
        out_geoms = crs_geoms
    gdf = gpd.GeoDataFrame(
        {
            "zone_id": ids,
            "class": pd.Series([names[int(v)] for v in vals], dtype=object),
            "area_m2": np.round(area, 3),
            "pixels": pixels,
            "mean_confidence": np.round(mean_conf, 1),
        },
        geometry=gpd.GeoSeries(out_geoms, crs=grid.crs),
        crs=grid.crs,
    )
    gdf["field_id"] = _assign_fields(gdf, fields)
    lon, lat = _scout_points(crs_geoms, grid.crs)
    gdf["centroid_lon"], gdf["centroid_lat"] = np.round(lon, 7), np.round(lat, 7)
    return gdf[[*ZONE_COLUMNS, "geometry"]]


def _scout_points(geoms: np.ndarray, crs: CRS) -> tuple[np.ndarray, np.ndarray]:
    """Lon/lat of each zone's centroid, or of a point inside it.

    A ring-shaped patch has its centroid outside; scouts walk to this point, so it must be in.
    """
    if len(geoms) == 0:
        return np.zeros(0), np.zeros(0)
    pts = shapely.centroid(geoms)
    outside = ~shapely.contains_properly(geoms, pts)
    pts[outside] = shapely.point_on_surface(geoms[outside])
    ll = gpd.GeoSeries(pts, crs=crs).to_crs(4326)
    return ll.x.to_numpy(), ll.y.to_numpy()


def _assign_fields(zones: gpd.GeoDataFrame, fields: gpd.GeoDataFrame | None) -> pd.Series:
    if fields is None or zones.empty:
        return pd.Series([None] * len(zones), index=zones.index, dtype=object)
    pts = zones.geometry.representative_point()
    # Zones overlapping no field keep a null id (patches outside the plots).
    hit = gpd.sjoin(
        gpd.GeoDataFrame(geometry=pts, crs=zones.crs), fields[["field_id", "geometry"]],
        predicate="within", how="left",
    )
    hit = hit[~hit.index.duplicated(keep="first")]
    return hit["field_id"].astype(object).where(hit["field_id"].notna(), None)


def _zone_pixel_stats(
    classes_tif: str | os.PathLike[str],
    confidence_tif: str | os.PathLike[str] | None,
    pix: np.ndarray,
    ids: np.ndarray,
    grid: Grid,
    chunk: int,
    zone_raster: str | os.PathLike[str] | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixel count and confidence sum per zone; also writes the zone-id raster.

    Zones are rasterised chunk by chunk; they follow pixel edges, so rasterising (pixel
    centres) gives back exactly their pixels.
    """
    n = len(ids) + 1
    pixels = np.zeros(n, np.int64)
    conf_sum = np.zeros(n, np.float64)
    conf_n = np.zeros(n, np.int64)
    tree = shapely.STRtree(pix) if len(pix) else None
    dst = None
    tmp = None
    if zone_raster is not None:
        zone_raster = Path(zone_raster)
        tmp = zone_raster.with_name(f".{zone_raster.stem}.partial.tif")
        with rasterio.open(classes_tif) as src:
            prof = src.profile
        prof.update(dtype="uint32", nodata=0, count=1, compress="deflate", predictor=2,
                    tiled=True, sparse_ok=True, BIGTIFF="IF_SAFER")
        prof.pop("photometric", None)
        try:
            dst = rasterio.open(tmp, "w", **prof)
        except RasterioError as exc:
            raise OutputError(f"{zone_raster}: cannot create the zone raster ({exc})") from exc
    conf_ds = rasterio.open(confidence_tif) if confidence_tif is not None else None
    try:
        for win in chunk_windows(grid.height, grid.width, chunk):
            h, w = int(win.height), int(win.width)
            if tree is None:
                continue
            hits = tree.query(shapely.box(win.col_off, win.row_off, win.col_off + w,
                                          win.row_off + h))
            if len(hits) == 0:
                continue
            tr = Affine.translation(win.col_off, win.row_off)
            zid = rasterize(
                zip(pix[hits], ids[hits], strict=True), out_shape=(h, w), transform=tr,
                fill=0, dtype="uint32",
            )
            flat = zid.ravel()
            pixels += np.bincount(flat, minlength=n)
            if conf_ds is not None:
                conf = conf_ds.read(1, window=win).ravel()
                ok = conf != 255
                conf_sum += np.bincount(flat[ok], weights=conf[ok], minlength=n)
                conf_n += np.bincount(flat[ok], minlength=n)
            if dst is not None:
                dst.write(zid, 1, window=win)
    except RasterioError as exc:
        raise OutputError(f"{zone_raster or classes_tif}: zone statistics failed ({exc})") from exc
    finally:
        if conf_ds is not None:
            conf_ds.close()
        if dst is not None:
            dst.set_band_description(1, "zone id (0 = no zone); see zone_id in zones.gpkg")
            dst.close()
    if tmp is not None and zone_raster is not None:
        os.replace(tmp, zone_raster)
    return pixels[1:], conf_sum[1:], conf_n[1:]


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
