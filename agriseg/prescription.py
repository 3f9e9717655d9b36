"""Prescription maps for sprayer terminals: grid cells or zones with a numeric rate.

Terminals (John Deere, Trimble, Raven, ISOBUS task controllers via converters) import a
Shapefile or GeoPackage of polygons with one numeric rate column, usually in WGS 84 lon/lat.
Grid cells get the highest rate of the at-risk classes whose share of the cell's valid pixels
reaches ``min_share``; cells with nothing to treat get ``base_rate``.
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import geopandas as gpd
import numpy as np
import rasterio
import shapely

from agriseg.classes import ClassSchema
from agriseg.errors import ConfigError, OutputError
from agriseg.grid import on_earth
from agriseg.qgis import rates_qml, write_gpkg_style
from agriseg.vectorize import aligned_chunk, chunk_windows, grid_of

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Prescription:
    """What to write.

    Attributes:
        rates: class name -> rate (product units per hectare, as the terminal expects).
        grid_m: cell edge in metres; ``None`` = one polygon per zone.
        min_share: share (0..1) of a cell's valid pixels a class needs to trigger its rate.
        base_rate: rate of cells or areas with nothing to treat.
        column: name of the rate column (10 characters at most for Shapefiles).
    """

    rates: tuple[tuple[str, float], ...]
    grid_m: float | None = 10.0
    min_share: float = 0.01
    base_rate: float = 0.0
    column: str = "RATE"

    def __post_init__(self) -> None:
        names = [name for name, _ in self.rates]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ConfigError(f"--rate names {', '.join(twice)} more than once; give each "
                              "class one rate")
        for label, value in [*self.rates, ("--base-rate", self.base_rate)]:
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{label}={value}: a rate must be a finite number >= 0 "
                                  "(product units per hectare)")
        if self.grid_m is not None and not (math.isfinite(self.grid_m) and self.grid_m > 0):
            raise ConfigError(f"--grid {self.grid_m}: give the cell edge in metres, e.g. 10")
        if not 0.0 <= self.min_share <= 1.0:
            raise ConfigError(f"--min-share {self.min_share * 100:g}: give a percentage "
                              "0..100")
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", self.column):
            raise ConfigError(f"--column {self.column!r}: use letters, digits and _, starting "
                              "with a letter (e.g. RATE)")
        if self.column.lower() in _TAKEN or self.column.lower().endswith("_pct"):
            raise ConfigError(f"--column {self.column!r} is taken (the prescription has "
                              "zone_id, class, area_m2, cell_id and *_pct columns; GDAL keeps "
                              "fid and geometry); choose another name, e.g. RATE")


# Columns the prescriptions have besides the rate, and names GDAL keeps for itself; fields
# of Shapefiles and GeoPackages match case-insensitively.
_TAKEN = frozenset({"cell_id", "zone_id", "class", "area_m2", "fid", "geometry", "geom",
                    "ogc_fid"})


def check_crs(crs: str) -> None:
    """Refuse an output CRS that PROJ does not know, before any work.

    Raises:
        ConfigError: the CRS is unknown.
    """
    from pyproj import CRS
    from pyproj.exceptions import CRSError

    try:
        CRS.from_user_input(crs)
    except CRSError as exc:
        raise ConfigError(f"--crs {crs!r}: not a CRS PROJ knows ({exc}); give an EPSG code, "
                          "e.g. EPSG:4326 (WGS 84 lon/lat) or the UTM zone's") from exc


def parse_rates(spec: str, schema: ClassSchema) -> tuple[tuple[str, float], ...]:
    """Parse ``"weed=2.5,disease=1"`` into ``(("weed", 2.5), ("disease", 1.0))``.

    Raises:
        ConfigError: malformed pair, unknown class or negative rate.
    """
    out: list[tuple[str, float]] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        m = re.fullmatch(r"([A-Za-z_][\w-]*)\s*=\s*(\S+)", part)
        try:
            value = float(m.group(2)) if m else None
        except ValueError:
            value = None
        if m is None or value is None:
            raise ConfigError(
                f"cannot parse rate {part!r} in --rate {spec!r}; expected CLASS=NUMBER pairs "
                "like weed=2.5,disease=1.0"
            )
        schema.value_of(m.group(1))  # raises with the valid names
        out.append((m.group(1), value))  # range checked by Prescription
    if not out:
        raise ConfigError(f"--rate {spec!r} names no class; e.g. --rate weed=2.5,disease=1.0")
    return tuple(out)


def grid_prescription(classes_tif: str | os.PathLike[str], schema: ClassSchema,
                      rx: Prescription, chunk: int = 2048) -> gpd.GeoDataFrame:
    """Square cells of ``rx.grid_m`` metres (aligned to the raster's corner) with rates.

    Class shares per cell are counted chunk by chunk with ``np.bincount``.
    """
    assert rx.grid_m is not None
    with rasterio.open(classes_tif) as ds:
        grid = grid_of(ds)
        # Per axis: pixels need not be square, cells must be.
        cell_x, cell_y = (rx.grid_m / r for r in grid.res_m)
        if min(cell_x, cell_y) < 1:
            raise ConfigError(
                f"--grid {rx.grid_m} m is smaller than a pixel ({max(grid.res_m):.3g} m); use "
                "a larger grid"
            )
        ny, nx = math.ceil(grid.height / cell_y), math.ceil(grid.width / cell_x)
        k = len(schema)
        lut = np.full(256, k, np.int64)
        lut[np.arange(k)] = np.arange(k)
        counts: np.ndarray = np.zeros(ny * nx * (k + 1), np.int64)
        for win in chunk_windows(grid.height, grid.width, aligned_chunk(ds, chunk)):
            cls = lut[ds.read(1, window=win)]
            r = (np.arange(win.row_off, win.row_off + win.height) / cell_y).astype(np.int64)
            c = (np.arange(win.col_off, win.col_off + win.width) / cell_x).astype(np.int64)
            cell = r[:, None] * nx + c[None, :]
            counts += np.bincount((cell * (k + 1) + cls).ravel(), minlength=counts.size)
    counts = counts.reshape(ny * nx, k + 1)
    valid = counts[:, :k].sum(axis=1)
    keep = np.flatnonzero(valid > 0)
    share = counts[keep, :k] / valid[keep, None]
    rate = np.full(len(keep), rx.base_rate)
    for name, value in rx.rates:
        got = share[:, schema.value_of(name)]
        hit = (got >= rx.min_share) & (got > 0)  # --min-share 0: any of it, not every cell
        rate = np.where(hit, np.maximum(rate, value), rate)
    rows, cols = keep // nx, keep % nx
    t = grid.transform
    x0 = t.c + t.a * cols * cell_x
    x1 = t.c + t.a * np.minimum((cols + 1) * cell_x, grid.width)
    y0 = t.f + t.e * rows * cell_y
    y1 = t.f + t.e * np.minimum((rows + 1) * cell_y, grid.height)
    cells = shapely.box(np.minimum(x0, x1), np.minimum(y0, y1), np.maximum(x0, x1),
                        np.maximum(y0, y1))
    data: dict[str, object] = {"cell_id": np.arange(1, len(keep) + 1), rx.column: rate}
    for sc in schema.at_risk:
        data[f"{sc.name}_pct"] = np.round(share[:, sc.value] * 100, 2)
    return gpd.GeoDataFrame(data, geometry=cells, crs=grid.crs)


def _shapefile_names(columns: list[str]) -> dict[str, str]:
    """Renames that fit ``<name>_pct`` columns in a Shapefile's 10 characters, unique.

    GDAL would cut them itself, to names that can collide: classes sharing their first six
    letters (stress_low, stress_high) overwrote each other's column.
    """
    taken = {c for c in columns if len(c) <= 10}
    out: dict[str, str] = {}
    for c in columns:
        if len(c) <= 10:
            continue
        stem = c.removesuffix("_pct")
        short, n = f"{stem[:6]}_pct", 1
        while short in taken:
            n += 1
            short = f"{stem[:6 - len(str(n))]}{n}_pct"
        taken.add(short)
        out[c] = short
    return out


def zone_prescription(zones_gpkg: str | os.PathLike[str], rx: Prescription) -> gpd.GeoDataFrame:
    """One polygon per at-risk zone with the rate of its class."""
    zones = gpd.read_file(zones_gpkg, layer="zones")
    rates = dict(rx.rates)
    out = gpd.GeoDataFrame(
        {"zone_id": zones["zone_id"], "class": zones["class"],
         rx.column: zones["class"].map(rates).fillna(rx.base_rate).astype(float),
         "area_m2": zones["area_m2"]},
        geometry=zones.geometry, crs=zones.crs,
    )
    return out[out[rx.column] > 0].reset_index(drop=True)


def write_prescription(gdf: gpd.GeoDataFrame, path: str | os.PathLike[str],
                       crs: str | None = "EPSG:4326", column: str = "RATE") -> Path:
    """Write a Shapefile (``.shp``) or GeoPackage (``.gpkg``) via a temporary name.

    Styled for QGIS by ``column`` (a ``.qml`` beside a Shapefile, ``layer_styles`` in a
    GeoPackage), one colour per rate.

    Raises:
        OutputError: unknown extension or the file cannot be written.
    """
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in (".shp", ".gpkg"):
        raise OutputError(f"{path}: write a .shp or .gpkg prescription (terminals read these)")
    if crs and gdf.crs is not None and not on_earth(gdf.crs):
        # A run with --gsd has no place on Earth: a sprayer cannot use it anyway, but the
        # map is still useful in image coordinates.
        log.warning("prescription: the run is in image coordinates (--gsd); not "
                    "reprojected to %s", crs)
    elif crs:
        gdf = gdf.to_crs(crs)
    if ext == ".shp":
        gdf = gdf.rename(columns=_shapefile_names([str(c) for c in gdf.columns]))
    tmp_dir = path.parent / f".{path.stem}.partial"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    tmp = tmp_dir / path.name
    try:
        gdf.to_file(tmp, driver="ESRI Shapefile" if ext == ".shp" else "GPKG",
                    layer=path.stem, engine="pyogrio")
        style = rates_qml(column, gdf[column].tolist()) if column in gdf else None
        if style and ext == ".shp":  # QGIS loads a .qml of the same name as the default style
            tmp.with_suffix(".qml").write_text(style, encoding="utf-8")
        elif style:
            write_gpkg_style(tmp, path.stem, style)
        for f in tmp_dir.iterdir():
            os.replace(f, path.parent / f.name)
    except Exception as exc:  # pyogrio raises several types for I/O failures
        raise OutputError(f"{path}: cannot write the prescription ({exc})") from exc
    finally:
        for f in tmp_dir.iterdir():
            f.unlink()
        tmp_dir.rmdir()
    log.debug("prescription: %s (%d polygons)", path, len(gdf))
    return path
