"""Prescription maps for sprayer terminals: grid cells or zones with a numeric rate.

Terminals (John Deere, Trimble, Raven, ISOBUS task controllers via converters) import a
Shapefile or GeoPackage of polygons with one numeric rate column, usually in WGS 84 lon/lat.
Grid cells get the highest rate of the rated classes whose share of the cell's valid pixels
reaches ``min_share`` (even when that is below ``base_rate``); the other cells get
``base_rate``. Per zone, each zone of a class with a rate above 0 is one polygon at that rate;
zones of classes without a rate, or with rate 0, are left out.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import geopandas as gpd
import numpy as np
import rasterio
import shapely
from rasterio.errors import RasterioIOError

from agriseg.classes import ClassSchema
from agriseg.errors import ConfigError, OutputError, RasterError, VectorError
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
        base_rate: rate of grid cells where no rated class reaches ``min_share``; not used
            per zone (outside the zones there is no polygon to give it to).
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
    """Refuse an output CRS that is unknown or not a 2D map CRS, before any work.

    Terminals read x/y of a geographic (lon/lat) or projected 2D CRS. A vertical CRS
    (EPSG:5703) wrote lat/lon swapped with a VERTCS .prj, a geocentric one (EPSG:4978) ECEF
    coordinates, and 3D or compound CRSs carry a height the polygons do not have.

    Raises:
        ConfigError: the CRS is unknown, or not a 2D geographic or projected CRS.
    """
    from pyproj import CRS
    from pyproj.exceptions import CRSError

    examples = "e.g. EPSG:4326 (WGS 84 lon/lat) or the UTM zone's (EPSG:326NN north, 327NN south)"
    try:
        parsed = CRS.from_user_input(crs)
    except CRSError as exc:
        raise ConfigError(f"--crs {crs!r}: not a CRS PROJ knows ({exc}); give an EPSG code, "
                          f"{examples}") from exc
    # is_projected is also true of a compound CRS with a vertical part, and is_geographic of
    # a 3D one: the axis count is what tells a 2D map CRS.
    flat = (parsed.is_geographic or parsed.is_projected) and not (
        parsed.is_vertical or parsed.is_geocentric) and len(parsed.axis_info) == 2
    if not flat:
        raise ConfigError(f"--crs {crs!r} ({parsed.type_name}: {parsed.name}) is not a 2D "
                          f"geographic or projected CRS; give one, {examples}")


#: Files of a Shapefile besides the .shp (GDAL's, ESRI's spatial indexes and metadata,
#: QGIS's spatial index and styles). A stale .qix or .sbn of a replaced Shapefile made QGIS
#: draw the old cells; a stale style or metadata file would describe the old one.
SHAPEFILE_SIDECARS = (".shp", ".shx", ".dbf", ".prj", ".cpg", ".qix", ".sbn", ".sbx", ".fbn",
                      ".fbx", ".ain", ".aih", ".atx", ".ixs", ".mxs", ".shp.xml", ".qml",
                      ".qmd", ".qpj", ".sld", ".shp.aux.xml")


def shapefile_files(path: str | os.PathLike[str]) -> list[Path]:
    """The files of the Shapefile ``path`` (it and its sidecars) that exist, in any case.

    Only names made of the stem and one of :data:`SHAPEFILE_SIDECARS` (matched
    case-insensitively, as ArcGIS writes ``.SHP.XML``); a ``rx.backup.shp`` is another file.
    """
    path = Path(path)
    stem = path.stem
    try:
        names = list(path.parent.iterdir())
    except OSError:  # no folder (yet): no files
        return []
    return sorted(f for f in names if f.name.startswith(stem)
                  and f.name[len(stem):].lower() in SHAPEFILE_SIDECARS and not f.is_dir())


def output_path(path: str | os.PathLike[str]) -> Path:
    """``path`` with its extension in lower case, as the file is written (``X.SHP`` -> ``X.shp``).

    GDAL's Shapefile driver writes ``.shp`` whatever case it is given, so the upper-case
    name reported a file that did not exist on a case-sensitive file system.

    Raises:
        OutputError: neither a .shp nor a .gpkg path.
    """
    path = Path(path)
    path = path.with_suffix(path.suffix.lower()) if path.suffix else path
    if path.suffix not in (".shp", ".gpkg"):
        raise OutputError(f"{path}: write a .shp or .gpkg prescription (terminals read these)")
    return path


def check_output(path: str | os.PathLike[str], overwrite: bool = False,
                 protected: Collection[Path] = ()) -> None:
    """Refuse an output the prescription cannot be written to, before any work.

    Checks the extension, that the folder exists (it is not created: a typo in --out made a
    whole new folder tree), that none of the files it would write is one of ``protected``
    (the run's own outputs and styles, even with ``overwrite``), that the file is new or
    ``overwrite`` is set, and that the folder takes a file (a probe folder is made and
    removed).

    Raises:
        OutputError: what is wrong, with what to do.
    """
    path = output_path(path)
    parent = path.parent
    try:
        folder, is_dir = parent.exists(), parent.is_dir()
        exists = is_dir and path.exists()
        sidecars = shapefile_files(path) if is_dir and path.suffix == ".shp" else []
    except OSError as exc:  # a file name longer than the file system takes
        raise OutputError(f"{path}: cannot be written ({exc.strerror or exc}); choose a "
                          "shorter --out") from exc
    if not folder:
        raise OutputError(f"{parent}: folder does not exist; create it or choose another --out")
    if not is_dir:
        raise OutputError(f"{parent}: is not a folder; choose another --out")
    writes = ([path.with_name(path.stem + s) for s in SHAPEFILE_SIDECARS]
              if path.suffix == ".shp" else [path])
    # Case-folded: on a case-insensitive file system Classes.qml is classes.qml. A
    # --out classes.shp --overwrite replaced the class mask's style with the rates', and
    # --out fields.gpkg the field summaries.
    taken = {(p.parent.resolve(), p.name.casefold()) for p in protected}
    clash = [w.name for w in writes if (parent.resolve(), w.name.casefold()) in taken]
    if clash:
        raise OutputError(f"{path}: would replace the run's own {', '.join(clash)}; choose "
                          f"another name, e.g. prescription{path.suffix}")
    if exists and not overwrite:
        # A sprayer map already handed to a terminal must not change under its name unasked.
        raise OutputError(f"{path}: exists; use --overwrite to replace it or --out another file")
    if sidecars and not overwrite:
        # Left by a removed Shapefile of this name: QGIS would read the new one with their
        # spatial index or style.
        raise OutputError(f"{path}: files of an earlier Shapefile of this name are there "
                          f"({', '.join(f.name for f in sidecars[:4])}); use --overwrite to "
                          "replace them or --out another file")
    try:
        probe = tempfile.mkdtemp(prefix=".rx.", suffix=".probe", dir=parent)
        os.rmdir(probe)
    except OSError as exc:  # read-only folder or file system, /proc, no permission
        raise OutputError(f"{parent}: cannot write there ({exc.strerror or exc}); choose a "
                          "writable --out") from exc


def parse_rates(spec: str, schema: ClassSchema) -> tuple[tuple[str, float], ...]:
    """Parse ``"weed=2.5,disease=1"`` into ``(("weed", 2.5), ("disease", 1.0))``.

    Class names match case-insensitively and come back as the schema spells them
    (``Weed=1`` -> ``("weed", 1.0)``), so grid cells and zones find the same class.

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
        # value_of raises with the valid names; class values are 0..n-1 in order
        out.append((schema.names[schema.value_of(m.group(1))], value))  # range: Prescription
    if not out:
        raise ConfigError(f"--rate {spec!r} names no class; e.g. --rate weed=2.5,disease=1.0")
    return tuple(out)


#: Most cells a grid prescription may have. Sprayer sections are metres wide, so a finer
#: grid prescribes nothing more; a 1-pixel grid on a 1.6 MP raster made 1.5 million cells
#: and a 1.8 GB peak, and terminals and QGIS crawl through such files.
MAX_CELLS = 1_000_000


def _cell_count(height_px: int, width_px: int, res_m: tuple[float, float], grid_m: float) -> int:
    """Cells of a ``grid_m`` grid over a raster (partial cells at the far edges count)."""
    return math.ceil(height_px / (grid_m / res_m[1])) * math.ceil(width_px / (grid_m / res_m[0]))


def smallest_grid(height_px: int, width_px: int, res_m: tuple[float, float],
                  max_cells: int = MAX_CELLS) -> float:
    """The smallest grid edge (two significant digits, rounded up) giving at most ``max_cells``.

    Args:
        height_px: raster height in pixels.
        width_px: raster width in pixels.
        res_m: pixel size in metres, (x, y).
        max_cells: the most cells allowed.
    """
    g = math.sqrt(height_px * res_m[1] * width_px * res_m[0] / max_cells)
    step = 10.0 ** (math.floor(math.log10(g)) - 1)
    n = math.ceil(g / step)
    while _cell_count(height_px, width_px, res_m, n * step) > max_cells:
        n += 1  # the partial cells at the far edges add a few
    nice = float(f"{n * step:.12g}")  # 1.3, not 1.3000000000000003
    return nice if _cell_count(height_px, width_px, res_m, nice) <= max_cells else n * step


def grid_prescription(classes_tif: str | os.PathLike[str], schema: ClassSchema,
                      rx: Prescription, chunk: int = 2048) -> gpd.GeoDataFrame:
    """Square cells of ``rx.grid_m`` metres (aligned to the raster's corner) with rates.

    Class shares per cell are counted chunk by chunk with ``np.bincount``. A cell gets the
    highest rate of the rated classes reaching ``rx.min_share`` of its valid pixels, even
    one below ``rx.base_rate`` (the README's rule: a class given a low rate wants it there);
    cells where none does get ``rx.base_rate``.

    Raises:
        RasterError: ``classes_tif`` is not a class raster GDAL can read.
        ConfigError: the grid is finer than a pixel, or makes more than :data:`MAX_CELLS`.
    """
    assert rx.grid_m is not None
    try:
        with rasterio.open(classes_tif) as ds:
            return _grid_cells(ds, schema, rx, chunk)
    except RasterioIOError as exc:  # not a raster, truncated, unreadable
        raise RasterError(f"{classes_tif}: cannot read it as a class raster ({exc}); give the "
                          "--out folder of a finished `agriseg run`, or rerun it") from exc


def _grid_cells(ds: rasterio.DatasetReader, schema: ClassSchema, rx: Prescription,
                chunk: int) -> gpd.GeoDataFrame:
    """:func:`grid_prescription` on an open class raster."""
    assert rx.grid_m is not None
    if ds.dtypes[0] != "uint8":
        # Class ids index a 256-entry table: other types failed with an IndexError.
        raise RasterError(f"{ds.name}: holds {ds.dtypes[0]} values, not the uint8 class ids "
                          "`agriseg run` writes; give the --out folder of a finished run")
    grid = grid_of(ds)
    # Per axis: pixels need not be square, cells must be.
    cell_x, cell_y = (rx.grid_m / r for r in grid.res_m)
    if min(cell_x, cell_y) < 1:
        raise ConfigError(
            f"--grid {rx.grid_m} m is smaller than a pixel ({max(grid.res_m):.3g} m); use "
            "a larger grid"
        )
    ny, nx = math.ceil(grid.height / cell_y), math.ceil(grid.width / cell_x)
    if ny * nx > MAX_CELLS:
        least = smallest_grid(grid.height, grid.width, grid.res_m)
        raise ConfigError(
            f"--grid {rx.grid_m:g} m makes {ny * nx:,} cells on this {grid.width} x "
            f"{grid.height} px raster, more than {MAX_CELLS:,}: sprayer sections are metres "
            f"wide, so finer cells prescribe nothing more; use --grid {least:g} or larger"
        )
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
    best = np.full(len(keep), -np.inf)  # highest rate of a class that reaches min_share
    for name, value in rx.rates:
        got = share[:, schema.value_of(name)]
        hit = (got >= rx.min_share) & (got > 0)  # --min-share 0: any of it, not every cell
        best = np.where(hit, np.maximum(best, value), best)
    rate = np.where(np.isfinite(best), best, rx.base_rate)
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


#: Columns of the run's ``zones`` layer a zone prescription copies.
ZONE_COLUMNS = ("zone_id", "class", "area_m2")


def read_zones(zones_gpkg: str | os.PathLike[str]) -> gpd.GeoDataFrame:
    """The ``zones`` layer of a run's zones.gpkg, checked for the columns a prescription needs.

    Raises:
        VectorError: not a GeoPackage, no ``zones`` layer, or columns missing.
    """
    try:
        zones = gpd.read_file(zones_gpkg, layer="zones", engine="pyogrio")
    except (RuntimeError, OSError, ValueError) as exc:  # pyogrio's errors are RuntimeErrors
        # GDAL's hint to prefix a driver name would mislead: the file is not a GeoPackage.
        why = str(exc).split("; It might help")[0]
        raise VectorError(f"{zones_gpkg}: cannot read its `zones` layer ({why}); it is not the "
                          "zones.gpkg of an agriseg run: rerun `agriseg run`, or use --grid "
                          "METRES for a grid prescription") from exc
    missing = [c for c in ZONE_COLUMNS if c not in zones.columns]
    if missing:
        raise VectorError(f"{zones_gpkg}: the `zones` layer has no {', '.join(missing)} "
                          f"column(s) (it needs {', '.join(ZONE_COLUMNS)}); it is not the "
                          "zones.gpkg of an agriseg run: rerun `agriseg run`, or use --grid "
                          "METRES for a grid prescription")
    return zones


def zone_prescription(zones: str | os.PathLike[str] | gpd.GeoDataFrame,
                      rx: Prescription) -> gpd.GeoDataFrame:
    """One polygon per zone of a class with a rate above 0, at that rate.

    Zones of classes without a rate, or with rate 0, are left out (outside the polygons the
    terminal applies no product, or its own default); ``rx.base_rate`` is for grid cells.
    Class names match case-insensitively.

    Args:
        zones: a run's zones.gpkg, or its ``zones`` layer from :func:`read_zones`.
        rx: the rates.

    Raises:
        VectorError: ``zones`` cannot be read as a run's zones.
    """
    if not isinstance(zones, gpd.GeoDataFrame):
        zones = read_zones(zones)
    rates = {name.lower(): value for name, value in rx.rates}
    rate = zones["class"].astype(str).str.lower().map(rates).astype(float)  # NaN: no rate
    out = gpd.GeoDataFrame(
        {"zone_id": zones["zone_id"], "class": zones["class"], rx.column: rate,
         "area_m2": zones["area_m2"]},
        geometry=zones.geometry, crs=zones.crs,
    )
    return out[out[rx.column] > 0].reset_index(drop=True)


def write_prescription(gdf: gpd.GeoDataFrame, path: str | os.PathLike[str],
                       crs: str | None = "EPSG:4326", column: str = "RATE") -> Path:
    """Write a Shapefile (``.shp``) or GeoPackage (``.gpkg``) via a temporary name.

    Styled for QGIS by ``column`` (a ``.qml`` beside a Shapefile, ``layer_styles`` in a
    GeoPackage), one colour per rate. An existing file of that name is replaced; for a
    Shapefile, so are all its sidecars (:data:`SHAPEFILE_SIDECARS`): those the new one does
    not have are removed. The folder must exist.

    Raises:
        OutputError: unknown extension, no such folder, or the file cannot be written.
    """
    path = output_path(path)
    ext = path.suffix
    if crs and gdf.crs is not None and not on_earth(gdf.crs):
        # A run with --gsd has no place on Earth: a sprayer cannot use it anyway, but the
        # map is still useful in image coordinates.
        log.warning("prescription: the run is in image coordinates (--gsd); not "
                    "reprojected to %s", crs)
    elif crs:
        gdf = gdf.to_crs(crs)
    if ext == ".shp":
        gdf = gdf.rename(columns=_shapefile_names([str(c) for c in gdf.columns]))
    tmp_dir: Path | None = None
    try:
        # A fresh folder each time (a fixed name left by a killed write moved its files in),
        # with a short name: the stem in it failed outputs named near the 255-byte limit.
        tmp_dir = Path(tempfile.mkdtemp(prefix=".rx.", suffix=".partial",
                                        dir=path.parent))
        tmp = tmp_dir / path.name
        gdf.to_file(tmp, driver="ESRI Shapefile" if ext == ".shp" else "GPKG",
                    layer=path.stem, engine="pyogrio")
        style = rates_qml(column, gdf[column].tolist()) if column in gdf else None
        if style and ext == ".shp":  # QGIS loads a .qml of the same name as the default style
            tmp.with_suffix(".qml").write_text(style, encoding="utf-8")
        elif style:
            write_gpkg_style(tmp, path.stem, style)
        new = {f.name for f in tmp_dir.iterdir()}
        if ext == ".shp":
            for old in shapefile_files(path):
                if old.name not in new:
                    old.unlink()
                    log.debug("prescription: removed %s of the replaced Shapefile", old)
        for name in sorted(new, key=lambda n: n == path.name):  # the .shp last
            os.replace(tmp_dir / name, path.parent / name)
    except Exception as exc:  # pyogrio raises several types for I/O failures
        raise OutputError(f"{path}: cannot write the prescription ({exc}); check that the "
                          "folder exists and is writable, or choose another --out") from exc
    finally:
        if tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    log.debug("prescription: %s (%d polygons)", path, len(gdf))
    return path
