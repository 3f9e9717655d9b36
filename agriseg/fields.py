"""Field polygons in, per-field health statistics out.

Fields come from any OGR vector (GeoPackage, Shapefile, GeoJSON) in any CRS; they are
reprojected to the raster, repaired when invalid, and fields outside or partly outside the
raster are reported, never silently dropped. Statistics are computed chunk by chunk: the field
ids are rasterised for one chunk at a time and counted with ``np.bincount`` (class pixels,
index histograms), so memory depends on the number of fields, not on the raster size.

Health score (0-100, also in the README and the report)::

    W = weed / (crop + weed + disease)          weed pressure
    D = disease / (crop + disease)              disease incidence
    S = min(1, C / C90)                         stand: C = (crop + disease) / valid pixels,
                                                C90 = 90th percentile of C over all fields
    health = 100 * (1 - W) * (1 - D) * S

A field with (almost) no vegetation, under :data:`MIN_VEGETATION` of its valid pixels, has no
score (NaN). ``rank`` 1 is the lowest score: the field to visit first; fields under
:data:`MIN_COVERED_PCT` covered by valid pixels keep their score but are ranked after all others.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pyproj
import rasterio
import shapely
from rasterio.windows import Window

from agriseg.classes import ClassSchema
from agriseg.errors import OutputError, VectorError
from agriseg.fieldchunk import HIST_BINS, INDEX_RANGE, FieldTask, field_chunk
from agriseg.grid import Grid, on_earth
from agriseg.pool import ordered_map
from agriseg.vectorize import (
    aligned_chunk,
    areas_m2,
    chunk_windows,
    grid_of,
    min_overlap,
    row_pixel_areas,
    zone_field_overlaps,
)

log = logging.getLogger(__name__)

#: ``status`` of a field that overlaps the raster but holds no valid pixel.
NO_PIXELS = "no valid pixels"


def some_ids(ids: list[str], most: int = 10) -> str:
    r"""The first ``most`` field ids, comma-separated, and how many more there are.

    Control characters are escaped (``\n``): ids come from the user's file, and a newline
    in one split the log line and the report note in two.
    """
    more = f" and {len(ids) - most} more" if len(ids) > most else ""
    return ", ".join(_printable(str(i)) for i in ids[:most]) + more


def _printable(text: str) -> str:
    """``text`` with its unprintable characters as Python escapes; other text unchanged."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


@dataclass(frozen=True, slots=True)
class FieldSet:
    """Field polygons ready for zonal statistics.

    Attributes:
        fields: ``field_id`` (str), ``status`` and geometry, in the raster CRS.
        id_column: the source column the ids came from (``"(row number)"`` when none).
        source: the file read, or ``"(whole raster)"``.
        notes: what was repaired, dropped or found outside the raster, for logs and report.
        layer: the layer of ``source`` read (None for the whole raster).
    """

    fields: gpd.GeoDataFrame
    id_column: str
    source: str
    notes: tuple[str, ...] = ()
    layer: str | None = None


def _polygonal(geom: shapely.Geometry) -> shapely.Geometry | None:
    """Polygonal part of a repaired geometry (``make_valid`` may add lines or points)."""
    if geom is None or geom.is_empty:
        return None
    if isinstance(geom, shapely.Polygon | shapely.MultiPolygon):
        return geom
    # Collections may nest: make_valid gives GEOMETRYCOLLECTION(MULTIPOLYGON, LINESTRING)
    # for a two-part field with a spike, whose polygons were dropped with the spike.
    while True:
        flat = shapely.get_parts(geom if isinstance(geom, np.ndarray) else [geom])
        if not any(isinstance(g, shapely.GeometryCollection | shapely.MultiPolygon)
                   for g in flat):
            break
        geom = flat
    parts = [g for g in flat if isinstance(g, shapely.Polygon) and not g.is_empty]
    return shapely.MultiPolygon(parts) if parts else None


def _pick_id_column(df: pd.DataFrame, requested: str | None, path: str) -> str | None:
    cols = [c for c in df.columns if c != df.geometry.name]
    if requested is not None:
        if requested not in cols:
            raise VectorError(
                f"{path}: --field-id {requested!r} is not a column; columns: "
                f"{', '.join(cols) or '(none)'}"
            )
        s = df[requested]
        if s.isna().any() or s.duplicated().any() or _blank(s).any():
            # str() per value: pandas' string dtype keeps missing values as NaN under astype.
            dup = [str(v) for v in s[s.duplicated()].unique()[:5]]
            raise VectorError(
                f"{path}: --field-id column {requested!r} must be unique and non-empty "
                f"(duplicates: {', '.join(dup) or 'empty values'}); pick another column or "
                "omit --field-id to number the fields"
            )
        return requested
    usable = [c for c in cols if _usable_ids(df[c])]
    if not usable:
        return None
    # Names and codes before measurements: a unique "area" column beside duplicated names
    # made the ids 100, 40, 36; KML's generated "id" (f.1, f.2) came before its "Name".
    return min(usable, key=lambda c: (_ID_NAMES.get(str(c).lower(), len(_ID_NAMES)),
                                      df[c].dtype.kind == "f", cols.index(c)))


#: Column names taken as field ids first, best first (lower case).
_ID_NAMES = {n: i for i, n in enumerate((
    "field_id", "fieldid", "field_name", "fieldname", "field", "plot_id", "plotid", "plot",
    "name", "label", "code", "id",
))}


def _why_no_ids(df: pd.DataFrame) -> str:
    """Why the id-like columns (or, without any, the first three) cannot name the fields.

    "no column with unique values" beside a ``field_id`` column left the user to find its
    duplicates.
    """
    cols = [c for c in df.columns if c != df.geometry.name]
    named = [c for c in cols if str(c).lower() in _ID_NAMES] or cols[:3]
    return "; ".join(_why_not_ids(str(c), df[c]) for c in named)


def _why_not_ids(name: str, s: pd.Series) -> str:
    """Why the column ``name`` (values ``s``) is not usable as ids (see :func:`_usable_ids`)."""
    if s.isna().any() or _blank(s).any():
        return f"column {name!r} has empty values"
    counts = s.value_counts()
    if counts.iloc[0] > 1:
        return (f"column {name!r} has duplicate values (e.g. {_printable(str(counts.index[0]))!r}"
                f" x{counts.iloc[0]})")
    return f"column {name!r} holds fractional numbers"


def _layer_count(path: str) -> int:
    """Number of layers of ``path`` (0 when it cannot be listed)."""
    import pyogrio

    try:
        return len(pyogrio.list_layers(path))
    except Exception:  # pyogrio raises DataSourceError and friends
        return 0


def _blank(s: pd.Series) -> pd.Series:
    """Text values a table reads back as missing ("", "NA", "nan", "None")."""
    if s.dtype.kind in "biufcmM":
        return pd.Series(False, index=s.index)
    return s.astype(str).str.strip().isin(("", "nan", "NaN", "None", "NA", "N/A"))


def _usable_ids(s: pd.Series) -> bool:
    """Unique, none missing or blank, and no fractional numbers (a measurement, not an id)."""
    if s.isna().any() or s.duplicated().any() or _blank(s).any():
        return False
    return s.dtype.kind != "f" or bool((s == np.round(s)).all())


def _id_text(ids: pd.Series) -> pd.Series:
    """Field ids as text: whole numbers stored as floats (Shapefile numbers) without ".0"."""
    if ids.dtype.kind == "f" and np.isfinite(ids).all() and (ids == np.round(ids)).all():
        return pd.Series([f"{v:.0f}" for v in ids], index=ids.index)
    return ids.astype(str)


def _raster_summary(path: str) -> str | None:
    """What a raster ``path`` is ("GTiff, 20x20 px, 4 band(s)"), or None for no raster.

    A GeoTIFF given to --fields was "not recognized as being in a supported file format",
    as if it were corrupt.
    """
    import warnings

    from rasterio.errors import NotGeoreferencedWarning, RasterioError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as ds:
                return f"{ds.driver}, {ds.width}x{ds.height} px, {ds.count} band(s)"
    except (RasterioError, OSError):
        return None


def _layer_file(path: str, layer: str) -> str | None:
    """The file of ``layer`` in a folder of vector files (a folder of Shapefiles), else None."""
    if not os.path.isdir(path):
        return None
    found = sorted(Path(path).glob(f"{layer}.*"))
    vector = [f for f in found if f.suffix.lower() in _VECTOR_SUFFIXES]
    return os.fspath(vector[0]) if vector else None


#: Suffixes of the vector files GDAL reads from a folder as layers.
_VECTOR_SUFFIXES = (".shp", ".gpkg", ".geojson", ".json", ".kml", ".gml", ".tab", ".mif")


def _no_crs_error(path: str, layer: str, several: bool, raster_crs: str) -> VectorError:
    """The error for fields without a CRS, naming the layer and its file where there are several.

    A folder of Shapefiles with one layer lacking its .prj named the folder, and the ogr2ogr
    example converted the folder's first layer.

    Args:
        path: the --fields path.
        layer: the layer read.
        several: whether ``path`` holds several layers (or is a folder of files).
        raster_crs: the raster's CRS, the likely one of coordinates in metres.
    """
    file = _layer_file(path, layer) if several else None
    if not several:
        where, source = path + ":", path
    else:
        where = f"{path}: layer {layer!r}" + (f" ({file})" if file else "")
        source = file if file else f"{path} {layer}"
    return VectorError(
        f"{where} has no CRS, so fields cannot be placed on the raster; set it, e.g. "
        f"ogr2ogr -a_srs EPSG:4326 fixed.gpkg {source} (EPSG:4326 for longitude and "
        f"latitude, the raster's {raster_crs} for its coordinates), then give --fields "
        "fixed.gpkg"
    )


def _pick_layer(path: str, layer: str | None) -> str:
    """The layer of ``path`` to read: ``layer``, else its only or first polygon layer.

    GeoPackages made in QGIS often hold several layers (fields, tracks, sample points), and
    OGR's default, the first one, may not be the fields.
    """
    import pyogrio

    try:
        layers = [(str(name), str(kind or "")) for name, kind in pyogrio.list_layers(path)]
    except Exception as exc:  # pyogrio raises DataSourceError and friends
        raster = _raster_summary(path)
        if raster:
            raise VectorError(
                f"{path}: is a raster ({raster}), not a vector file; --fields wants the field "
                "polygons (GeoPackage, GeoJSON, Shapefile), e.g. drawn in QGIS or exported "
                "from farm software"
            ) from exc
        raise VectorError(
            f"{path}: not a readable vector file ({exc}); give a GeoPackage, Shapefile or "
            "GeoJSON"
        ) from exc
    names = [name for name, _ in layers]
    if layer is not None:
        if layer not in names:
            raise VectorError(
                f"{path}: has no layer {layer!r}; its layers: {', '.join(names) or '(none)'}"
            )
        return layer
    if not layers:
        raise VectorError(f"{path}: holds no layers; give a file with field polygons")
    polygons = [name for name, kind in layers if "polygon" in kind.lower()]
    chosen = (polygons or names)[0]
    if len(layers) > 1:
        log.warning(
            "%s: holds %d layers (%s); reading %r as the fields; name another with "
            "--fields-layer", path, len(layers), ", ".join(names), chosen,
        )
    return chosen


def read_fields(
    path: str | os.PathLike[str],
    grid: Grid,
    field_id: str | None = None,
    layer: str | None = None,
) -> FieldSet:
    """Read field polygons and put them on the raster's grid.

    Args:
        path: GeoPackage, Shapefile, GeoJSON, any CRS.
        grid: the raster grid (its CRS is the target CRS).
        field_id: id column; default the first column with unique non-empty values, else the
            row number (1-based).
        layer: the layer to read; default the file's only layer, or its first polygon layer
            (with a warning naming the others).

    Returns:
        The fields with a status per field and notes on repairs and coverage.

    Raises:
        VectorError: unreadable file, no such layer, no CRS, no polygons, bad id column.
    """
    p = os.fspath(path)
    if not os.path.exists(p):
        raise VectorError(f"{p}: fields file not found; check the --fields path")
    chosen = _pick_layer(p, layer)
    try:
        df = gpd.read_file(p, layer=chosen, engine="pyogrio")
    except Exception as exc:  # pyogrio raises DataSourceError, DataLayerError, ...
        raise VectorError(
            f"{p}: not a readable vector file ({exc}); give a GeoPackage, Shapefile or GeoJSON"
        ) from exc
    if not isinstance(df, gpd.GeoDataFrame):  # e.g. a CSV: pyogrio gives a plain table
        raise VectorError(
            f"{p}: layer {chosen!r} is a table without geometries; give the field polygons "
            "(GeoPackage, Shapefile, GeoJSON)"
        )
    if df.empty:
        raise VectorError(f"{p}: holds no features; give a file with field polygons")
    if df.crs is None:
        epsg = grid.crs.to_epsg()
        raster_crs = f"EPSG:{epsg}" if epsg else pyproj.CRS.from_wkt(grid.crs.to_wkt()).name
        raise _no_crs_error(p, chosen, os.path.isdir(p) or _layer_count(p) > 1, raster_crs)
    col = _pick_id_column(df, field_id, p)
    if col is not None and field_id is None:
        log.info("%s: fields named by column %r (--field-id to choose another)", p, col)
    ids = _id_text(df[col]) if col else pd.Series(
        [str(i) for i in range(1, len(df) + 1)], index=df.index)
    notes: list[str] = []
    if col is None:
        why = _why_no_ids(df)
        notes.append(f"{p}: no column with unique values{f' ({why})' if why else ''}; fields "
                     f"are numbered 1..{len(df)}")
    same_crs = df.crs == grid.crs
    if not same_crs and not (on_earth(df.crs) and on_earth(grid.crs)):
        # No transformation joins a local CRS (an image run with --gsd) to a map CRS.
        raise VectorError(
            f"{p}: its fields ({df.crs.name}) cannot be placed on the raster "
            f"({pyproj.CRS.from_wkt(grid.crs.to_wkt()).name}): "
            "an image without georeferencing has no map coordinates. Drop --fields (the whole "
            "image is summarised as one field), draw the fields on this run's classes.tif "
            "instead, or georeference the image first (gdal_translate -a_srs ... -a_ullr ...)"
        )
    try:
        geoms = df.geometry.to_numpy() if same_crs else df.geometry.to_crs(grid.crs).to_numpy()
    except Exception as exc:  # pyproj.exceptions.ProjError and friends
        raise VectorError(
            f"{p}: cannot reproject the fields from {df.crs.to_string()} to the raster's "
            f"{grid.crs.to_string()} ({exc}); check both CRSs, or reproject the fields with "
            "ogr2ogr -t_srs first"
        ) from exc
    # Fields far outside the raster's CRS area (lon/lat nonsense, wrong CRS) reproject to
    # inf/NaN; GEOS cannot repair those, so they count as features without a polygon.
    xy, owner = shapely.get_coordinates(geoms, return_index=True)
    broken = np.bincount(owner[~np.isfinite(xy).all(axis=1)], minlength=len(geoms)) > 0
    if broken.any() and broken.sum() == (~shapely.is_missing(geoms)).sum():
        src_xy = shapely.get_coordinates(df.geometry.to_numpy())
        if df.crs.is_geographic and len(src_xy) and np.abs(src_xy[:, 0]).max() <= 90 \
                and np.abs(src_xy[:, 1]).max() > 90:
            raise VectorError(
                f"{p}: its coordinates look like (latitude, longitude): y reaches "
                f"{src_xy[np.abs(src_xy[:, 1]).argmax(), 1]:g}, beyond any latitude; write "
                "the file with longitude first (x) and latitude second (y), as GeoJSON and "
                "GeoPackage expect"
            )
        raise VectorError(
            f"{p}: its coordinates do not fit its CRS {df.crs.to_string()} (none of them "
            f"reprojects to the raster's {grid.crs.to_string()}); a GeoJSON without a crs member "
            "is read as lon/lat (EPSG:4326): set the CRS the coordinates are in, e.g. ogr2ogr "
            f"-a_srs {grid.crs.to_string()} fixed.gpkg {os.path.basename(p)}"
        )
    if broken.any():
        geoms = geoms.copy()
        geoms[broken] = None
    status = np.array(["ok"] * len(df), dtype=object)
    invalid = ~shapely.is_valid(geoms) & ~shapely.is_missing(geoms)
    if invalid.any():
        geoms = geoms.copy()
        geoms[invalid] = shapely.make_valid(geoms[invalid])
        status[invalid] = "repaired"
        notes.append(
            f"{p}: repaired {int(invalid.sum())} invalid geometry(ies) (fields "
            f"{some_ids(ids[invalid].tolist())})"
        )
    geoms = np.array([_polygonal(g) for g in geoms], dtype=object)
    bad = np.array([g is None for g in geoms])
    if bad.all():
        raise VectorError(
            f"{p}: no polygon geometries (fields must be polygons; points or lines cannot be "
            "summarised)"
        )
    if bad.any():
        notes.append(
            f"{p}: skipped {int(bad.sum())} feature(s) without a polygon "
            f"({some_ids(ids[bad].tolist())})"
        )
    box = shapely.box(*grid.bounds)
    keep = ~bad
    # Half a pixel of slack: a field drawn to the raster's edge in another CRS comes back a
    # hair outside it after reprojection, and was flagged "partly outside" for that.
    slack = abs(grid.transform.a) / 2
    inside = shapely.within(geoms[keep], box.buffer(slack, join_style="mitre"))
    touches = shapely.intersects(geoms[keep], box)
    if not touches.any():
        raise VectorError(
            f"{p}: none of the {int(keep.sum())} field(s) overlaps the raster (raster bounds "
            f"{tuple(round(b, 2) for b in grid.bounds)} in {grid.crs.to_string()}); check that "
            "the fields and the survey cover the same place and that the fields' CRS is right"
        )
    st = status[keep]
    st[~touches] = "outside raster"
    part = touches & ~inside
    # A repaired field keeps saying so: "partly outside raster" alone hid the repair.
    st[part] = np.where(st[part] == "repaired", "repaired, partly outside raster",
                        "partly outside raster")
    for label in ("outside raster", "partly outside raster"):
        these = st == label if label == "outside raster" else part
        n = int(these.sum())
        if n:
            notes.append(
                f"{p}: {n} field(s) {label} ({some_ids(ids[keep][these].tolist())})"
            )
    kept_ids = ids[keep].to_numpy()
    wkb = pd.Series(shapely.to_wkb(shapely.normalize(geoms[keep])))
    twins = wkb.duplicated(keep=False).to_numpy()
    if twins.any():
        # Kept (a plot may be listed under two ids on purpose), but said: areas sum twice.
        notes.append(f"{p}: {int(twins.sum())} field(s) share their geometry with another "
                     f"({some_ids(kept_ids[twins].tolist())}); each is summarised in full")
    fields = gpd.GeoDataFrame(
        {"field_id": kept_ids, "status": st},
        geometry=gpd.GeoSeries(geoms[keep], crs=grid.crs), crs=grid.crs,
    ).reset_index(drop=True)
    return FieldSet(fields, col or "(row number)", p, tuple(notes), chosen)


def whole_raster_field(grid: Grid) -> FieldSet:
    """The whole raster as one field (used without ``--fields``); nodata stays excluded."""
    fields = gpd.GeoDataFrame(
        {"field_id": ["survey"], "status": ["ok"]},
        geometry=gpd.GeoSeries([shapely.box(*grid.bounds)], crs=grid.crs), crs=grid.crs,
    )
    return FieldSet(fields, "(whole raster)", "(whole raster)", ())


def _layers(geoms: np.ndarray) -> np.ndarray:
    """Greedy colouring so that fields in one layer never overlap.

    Rasterising burns one id per pixel; overlapping fields (duplicated plots, nested
    management zones) are rasterised in separate layers so each keeps all its pixels.
    """
    layer = np.zeros(len(geoms), np.int64)
    if len(geoms) < 2:
        return layer
    tree = shapely.STRtree(geoms)
    i, j = tree.query(geoms, predicate="intersects")
    keep = i < j
    i, j = i[keep], j[keep]
    overlap = shapely.area(shapely.intersection(geoms[i], geoms[j])) > 0
    i, j = i[overlap], j[overlap]
    if len(i) == 0:
        return layer
    neighbours: dict[int, list[int]] = {}
    for a, b in zip(i.tolist(), j.tolist(), strict=True):
        neighbours.setdefault(b, []).append(a)
    for k in range(len(geoms)):
        used = {int(layer[n]) for n in neighbours.get(k, [])}
        layer[k] = next(x for x in range(len(geoms)) if x not in used)
    return layer


# Kept under its old name for callers of this module.
_row_pixel_area = row_pixel_areas


def summarize_fields(
    fieldset: FieldSet,
    classes_tif: str | os.PathLike[str],
    schema: ClassSchema,
    indices: dict[str, Path] | None = None,
    zones: gpd.GeoDataFrame | None = None,
    chunk: int = 2048,
    workers: int | None = None,
) -> gpd.GeoDataFrame:
    """Per-field class areas, index statistics, risk measures and a health score.

    Args:
        fieldset: fields from :func:`read_fields` or :func:`whole_raster_field`.
        classes_tif: class raster.
        schema: its class schema (classes named soil/crop/weed/disease feed the measures).
        indices: index name -> float32 raster on the same grid (NaN nodata).
        zones: zones with a ``field_id`` column, for the zone count per field.
        chunk: chunk edge in pixels.
        workers: worker processes for the per-chunk counts besides this one (0 = none);
            default :func:`agriseg.pool.post_workers`. The result does not depend on it.

    Returns:
        One row per field (outside ones included), sorted by ``rank`` (1 = lowest health).
    """
    fields = fieldset.fields
    n, k = len(fields), len(schema)
    geoms = fields.geometry.to_numpy()
    layer = _layers(geoms)
    trees = [(np.flatnonzero(layer == lv), shapely.STRtree(geoms[layer == lv]))
             for lv in np.unique(layer)]
    counts = np.zeros((n + 1) * (k + 1), np.float64)
    indices = dict(indices or {})
    sums = {name: np.zeros(n + 1, np.float64) for name in indices}
    with rasterio.open(classes_tif) as ds:
        grid = grid_of(ds)
        step = aligned_chunk(ds, chunk)
    # A bin counts each pixel of the raster at most once, so uint32 is exact below 2**32
    # pixels and halves the largest table (22,500 plots, 3 indices: 540 -> 270 MB).
    hist_dtype = np.uint32 if grid.height * grid.width < 2**32 else np.int64
    hist = {name: np.zeros((n + 1, HIST_BINS), hist_dtype) for name in indices}
    for path in indices.values():
        rasterio.open(path).close()  # fail on a missing index before handing out chunks
    row_area = _row_pixel_area(grid)
    px_area = grid.pixel_area_m2
    wins = list(chunk_windows(grid.height, grid.width, step))
    tasks = (_field_task(os.fspath(classes_tif), indices, win, grid, geoms, trees, k,
                         row_area) for win in wins)
    for fc in ordered_map(field_chunk, tasks, workers):
        if fc is None:
            continue
        for c in fc.counts:
            counts += c
        for name, hs in fc.hist.items():
            # Sparse per chunk (the fields it holds): integer counts, so adding only their
            # rows gives the same table as adding whole ones.
            for present, rows in hs:
                hist[name][present] += rows.astype(hist_dtype, copy=False)
        for name, ss in fc.sums.items():
            for x in ss:
                sums[name] += x
    area_px = counts.reshape(n + 1, k + 1)[1:]
    if row_area is None:
        area_px = area_px * px_area
    return _table(fieldset, schema, area_px, hist, sums, zones, grid)


def _field_task(
    classes_tif: str,
    indices: dict[str, Path],
    win: Window,
    grid: Grid,
    geoms: np.ndarray,
    trees: list[tuple[np.ndarray, shapely.STRtree]],
    k: int,
    row_area: np.ndarray | None,
) -> FieldTask:
    """The fields touching ``win``, per layer, and what a worker needs to count them."""
    h, w = int(win.height), int(win.width)
    tr = grid.window_transform(win)
    left, top = tr.c, tr.f
    right, bottom = tr.c + tr.a * w, tr.f + tr.e * h
    cbox = shapely.box(min(left, right), min(top, bottom), max(left, right), max(top, bottom))
    layers = []
    for members, tree in trees:
        hits = members[tree.query(cbox, predicate="intersects")]
        if len(hits):
            layers.append((geoms[hits], hits + 1))
    r0 = int(win.row_off)
    return FieldTask(
        classes_tif, {name: os.fspath(p) for name, p in indices.items()},
        (r0, int(win.col_off), h, w), tr, layers, k, len(geoms), _code_dtype(len(geoms), k),
        None if row_area is None else row_area[r0:r0 + h],
    )


def _code_dtype(n_fields: int, k: int) -> str:
    """Smallest unsigned dtype for ``field_id * (k + 1) + class`` codes.

    GDAL's rasterize costs about the bytes it writes: uint16 ids halve it against uint32.
    """
    top = n_fields * (k + 1) + k
    return "uint8" if top < 2**8 else "uint16" if top < 2**16 else "uint32"


#: Histogram rows turned into quantiles at a time: the cumulative counts of 22,500 plots'
#: 1000 bins at once were a 180 MB temporary per index.
_QUANTILE_ROWS = 4096


def hist_quantiles(h: np.ndarray, lo: float, hi: float, qs: tuple[float, ...]) -> np.ndarray:
    """Quantiles from histograms ``(n, bins)``, linear within a bin (NaN for empty rows)."""
    if len(h) > _QUANTILE_ROWS:
        return np.concatenate([hist_quantiles(h[i:i + _QUANTILE_ROWS], lo, hi, qs)
                               for i in range(0, len(h), _QUANTILE_ROWS)])
    n, bins = h.shape
    cum = np.cumsum(h, axis=1)
    total = cum[:, -1]
    width = (hi - lo) / bins
    out = np.full((n, len(qs)), np.nan)
    for j, q in enumerate(qs):
        target = q * total
        b = np.argmax(cum >= target[:, None], axis=1)
        before = np.where(b > 0, cum[np.arange(n), np.maximum(b - 1, 0)], 0)
        inbin = h[np.arange(n), b]
        frac = np.where(inbin > 0, (target - before) / np.maximum(inbin, 1), 0.5)
        out[:, j] = np.where(total > 0, lo + (b + frac) * width, np.nan)
    return out


def _share(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


#: Least vegetation share of a field's valid pixels for a health score.
MIN_VEGETATION = 0.01

#: Least share of a field's area covered by valid pixels, in percent, for a place in the
#: visiting order among the others: a plot 98 % over nodata, its ~50 valid pixels a few
#: weeds, scored 0 and led the report. Such fields keep their score and are ranked last.
MIN_COVERED_PCT = 50.0


def health_score(weed_pressure: np.ndarray, disease_incidence: np.ndarray,
                 crop_cover: np.ndarray) -> np.ndarray:
    """The 0-100 health score of the module docstring (NaN where there is no vegetation)."""
    c90 = np.nanpercentile(crop_cover, 90) if np.isfinite(crop_cover).any() else np.nan
    stand = np.clip(_share(crop_cover, np.full_like(crop_cover, c90)), 0, 1)
    stand = np.where(np.isfinite(stand), stand, 1.0)
    return 100 * (1 - weed_pressure) * (1 - disease_incidence) * stand


def _zones_per_field(fields: gpd.GeoDataFrame, zones: gpd.GeoDataFrame | None,
                     min_area: float = 0.0) -> np.ndarray:
    """Zones overlapping each field by more than ``min_area`` (both in the raster's CRS).

    A zone counts in every field holding part of it, as its at-risk pixels count in each
    field's ``at_risk_m2``: a plot with zone pixels never shows 0 zones, and its zone's
    ``field_id`` (the field holding most of it) is always one of the fields counting it. So
    the counts can sum to more than the zones (zones crossing plot edges, nested fields).
    Counted from the geometries, not from the zones' ``field_id``: that names one field per
    zone, so nested or overlapping fields (a management zone inside a field) and the whole
    survey of a run without ``--fields`` (zones without a field id) counted none.
    """
    if zones is None or zones.empty:
        return np.zeros(len(fields), np.int64)
    # Both are in the raster's CRS (an image plane's, with --gsd, cannot even be transformed).
    _, field, _ = zone_field_overlaps(zones.geometry.to_numpy(), fields.geometry.to_numpy(),
                                      min_area)
    return np.bincount(field, minlength=len(fields))


def _table(
    fs: FieldSet,
    schema: ClassSchema,
    area: np.ndarray,
    hist: dict[str, np.ndarray],
    sums: dict[str, np.ndarray],
    zones: gpd.GeoDataFrame | None,
    grid: Grid,
) -> gpd.GeoDataFrame:
    fields = fs.fields
    k = len(schema)
    geo_area = pd.Series(areas_m2(fields.geometry.to_numpy(), grid), index=fields.index)
    valid = area[:, :k].sum(axis=1)
    out = pd.DataFrame({"field_id": fields["field_id"], "status": fields["status"]})
    # A field overlapping the raster can still hold no valid pixel (over nodata, or smaller
    # than a pixel): "ok" beside empty statistics would read as a healthy field with no data.
    # Partly outside ones too: their inside part over nodata kept "partly outside raster"
    # and missed the caller's count of fields without pixels (read's notes still list them).
    out.loc[(valid == 0) & (out["status"] != "outside raster"), "status"] = NO_PIXELS
    out["area_ha"] = geo_area.to_numpy() / 1e4
    out["covered_pct"] = np.clip(_share(valid, geo_area.to_numpy()) * 100, 0, 100)
    out["valid_ha"] = valid / 1e4
    names = schema.names
    # No valid pixel, no measurement: areas are empty like the shares, not "0 m2 at risk".
    seen = np.where(valid > 0, 1.0, np.nan)
    for c in schema.classes:
        out[f"{c.name}_pct"] = _share(area[:, c.value], valid) * 100
        out[f"{c.name}_m2"] = area[:, c.value] * seen

    def col(role: str) -> np.ndarray:
        c = schema.by_role(role)
        return area[:, c.value] if c is not None else np.zeros(len(out))

    crop, weed, disease = col("crop"), col("weed"), col("disease")
    # The plant roles only: a class without a role (water, shadow, road of a custom model)
    # was counted as vegetation when it was "everything but soil".
    veg = crop + weed + disease
    out["vegetation_pct"] = _share(veg, valid) * 100
    wp = _share(weed, veg)
    di = _share(disease, crop + disease)
    cover = _share(crop + disease, valid)
    out["weed_pressure_pct"] = wp * 100
    out["disease_incidence_pct"] = di * 100
    # A schema without such a class (a model of other classes) has no such measure: empty,
    # not 0 (the health score still counts it as none).
    for column, needs in (("weed_pressure_pct", "weed"), ("disease_incidence_pct", "disease")):
        if schema.by_role(needs) is None:
            out[column] = np.nan
    if schema.by_role("crop") is None:
        # Without a crop class every weed pixel was "100 % weed pressure, health 0".
        log.warning("classes %s: none plays the crop (no role: crop), so the fields get no "
                    "weed pressure, disease incidence or health score", ", ".join(names))
        out["weed_pressure_pct"] = out["disease_incidence_pct"] = np.nan
        wp = di = np.full(len(out), np.nan)
    at_risk = sum((area[:, c.value] for c in schema.at_risk), np.zeros(len(out)))
    out["at_risk_m2"] = at_risk * seen
    out["zones"] = _zones_per_field(fields, zones, min_overlap(grid))
    for name in hist:
        h = hist[name].reshape(-1, HIST_BINS)[1:]
        lo, hi = INDEX_RANGE.get(name, (-1.0, 1.0))
        npx = h.sum(axis=1)
        out[f"{name}_mean"] = _share(sums[name][1:], npx)
        qs = hist_quantiles(h, lo, hi, (0.5, 0.1, 0.9))
        out[f"{name}_median"], out[f"{name}_p10"], out[f"{name}_p90"] = qs.T
    # Weeds without crop (a failed stand) have no disease incidence but do have a score: 0.
    score = health_score(wp, np.where(np.isnan(di) & (veg > 0), 0.0, di), cover)
    # A few plant pixels on a bare (or harvested, or senesced) field are no stand to score:
    # two weed pixels made such plots "100 % weed pressure, visit first".
    out["health_score"] = np.where(_share(veg, valid) >= MIN_VEGETATION, score, np.nan)
    # Unscored fields (no vegetation, no valid pixel) have no place in the visiting order,
    # and poorly covered ones come after all others: their score stands for a sliver.
    score = out["health_score"]
    covered = out["covered_pct"] >= MIN_COVERED_PCT
    order = score.where(covered).rank(method="first", na_option="keep")
    rest = score.where(~covered).rank(method="first", na_option="keep") + order.count()
    out["rank"] = order.fillna(rest).astype("Int64")
    late = int((~covered & score.notna()).sum())
    if late and order.count():
        log.info("%d field(s) under %g %% covered by valid pixels ranked after the others: %s",
                 late, MIN_COVERED_PCT,
                 some_ids(out["field_id"][~covered & score.notna()].tolist()))
    if on_earth(fields.crs):
        ll = fields.geometry.representative_point().to_crs(4326)
        out["lon"], out["lat"] = ll.x.round(7).to_numpy(), ll.y.round(7).to_numpy()
    else:  # an image run with --gsd: no place on Earth
        out["lon"] = out["lat"] = np.nan
    # Plots can be a few square metres: hectares need more decimals than percentages.
    out = out.round({c: 6 if c.endswith("_ha") else 3 for c in out.columns
                     if out[c].dtype.kind == "f" and c not in ("lon", "lat")})
    gdf = gpd.GeoDataFrame(out, geometry=fields.geometry.to_numpy(), crs=fields.crs)
    return gdf.sort_values("rank", na_position="last").reset_index(drop=True)


def _csv_text(value: object) -> object:
    """A text cell Excel will not run as a formula (field ids come from the user's file).

    Text starting with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return is a formula to a
    spreadsheet (``=cmd|' /C calc'!A0``); a leading apostrophe makes it text, as OWASP's CSV
    injection advice says. Negative numbers stay as they are.
    """
    if not isinstance(value, str) or not value.startswith(("=", "+", "-", "@", "\t", "\r")):
        return value
    try:
        float(value)
    except ValueError:
        return "'" + value
    return value


def _positional(values: pd.Series) -> pd.Series:
    """Floats as the CSV writes them, but never in scientific notation (2e-06 for 0.000002).

    A plot of a few square metres is 0.000x ha: spreadsheets and readers expecting plain
    decimals misread "2e-06". Only columns holding such values are turned into text (all
    their digits, as the shortest repr); the others keep pandas' formatting.
    """
    v = values.to_numpy(dtype=np.float64)
    a = np.abs(v[np.isfinite(v)])
    if not (((a > 0) & (a < 1e-4)) | (a >= 1e16)).any():
        return values
    return pd.Series([np.format_float_positional(x, trim="0") if not np.isnan(x) else ""
                      for x in v], index=values.index, dtype=object)


def write_fields(summary: gpd.GeoDataFrame, gpkg: str | os.PathLike[str],
                 csv: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write ``fields.gpkg`` (layer ``fields``) and ``fields.csv`` via temporary names.

    Raises:
        OutputError: a file cannot be written.
    """
    gpkg, csv = Path(gpkg), Path(csv)
    tmp_g = gpkg.with_name(f".{gpkg.stem}.partial.gpkg")
    tmp_c = csv.with_name(f".{csv.stem}.partial.csv")
    tmp_g.unlink(missing_ok=True)
    try:
        summary.to_file(tmp_g, layer="fields", driver="GPKG", engine="pyogrio")
        # UTF-8 with a byte-order mark: Excel, where agronomists open it, reads a CSV
        # without one in the system's code page (field names like "Südfeld" garbled);
        # QGIS, pandas and LibreOffice read it either way.
        table = pd.DataFrame(summary.drop(columns="geometry"))
        for col in table.select_dtypes(include=["object", "string"]).columns:
            table[col] = table[col].map(_csv_text)
        for col in table.select_dtypes(include="float").columns:
            table[col] = _positional(table[col])
        table.to_csv(tmp_c, index=False, encoding="utf-8-sig")
    except Exception as exc:  # pyogrio and pandas raise several types for I/O failures
        tmp_g.unlink(missing_ok=True)
        tmp_c.unlink(missing_ok=True)
        raise OutputError(f"{gpkg}: cannot write field summaries ({exc}); disk full?") from exc
    os.replace(tmp_g, gpkg)
    os.replace(tmp_c, csv)
    return gpkg, csv
