"""Raster grids and tiling maths. No I/O happens here.

A :class:`Grid` is the one georeferencing object of the package: shape (rows, cols), affine
transform and CRS. A :class:`TilePlan` cuts a grid into core tiles aligned to the output block
size, each with a halo read around it so that a model with a receptive margin up to the halo
sees the same context whether the raster is processed whole or in tiles; the writer keeps only
the core, so results carry no seams.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

from affine import Affine
from rasterio.crs import CRS
from rasterio.windows import Window

from agriseg.errors import ConfigError

BLOCK_SIZES = (512, 256, 128, 64, 32, 16)
#: Projection distortion taken at the CRS's word: where the ground scale at a grid's centre is
#: within this share of the CRS's unit (UTM inside its zone: <= 0.1 %; state planes in theirs),
#: lengths and areas are the CRS's own, as GIS tools report them in that CRS.
SCALE_TOLERANCE = 0.01
#: Shear of the CRS's axes on the ground (degrees) beyond which a survey is warned about.
SHEAR_TOLERANCE_DEG = 2.0
SWATH_PX = 8192
"""Width of the column groups of tiles that run one after the other (see :func:`plan_tiles`)."""
#: CRS of images run without georeferencing (``--gsd``): metres on the image plane, x east
#: along the columns, y north up the rows; no place on Earth.
IMAGE_CRS = CRS.from_wkt(
    'LOCAL_CS["image plane, not georeferenced (agriseg --gsd)",LOCAL_DATUM["image",32767],'
    'UNIT["metre",1,AUTHORITY["EPSG","9001"]],AXIS["x",EAST],AXIS["y",NORTH]]'
)


def on_earth(crs: CRS | None) -> bool:
    """True for geographic and projected CRSs; False for no CRS and for local ones.

    Outputs in a local CRS (:data:`IMAGE_CRS`) have no longitude/latitude and cannot be
    reprojected.
    """
    return crs is not None and bool(crs.is_geographic or crs.is_projected)


@dataclass(frozen=True, slots=True)
class Grid:
    """Shape + affine transform + CRS of a raster.

    Attributes:
        shape_yx: ``(height, width)`` in pixels.
        transform: pixel-to-CRS affine transform (pixel corners).
        crs: coordinate reference system.
    """

    shape_yx: tuple[int, int]
    transform: Affine
    crs: CRS

    @property
    def height(self) -> int:
        """Number of rows."""
        return self.shape_yx[0]

    @property
    def width(self) -> int:
        """Number of columns."""
        return self.shape_yx[1]

    @property
    def res_xy(self) -> tuple[float, float]:
        """Pixel size ``(x, y)`` in CRS units (positive numbers)."""
        t = self.transform
        return (math.hypot(t.a, t.d), math.hypot(t.b, t.e))

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """``(left, bottom, right, top)`` in CRS units (north-up grids)."""
        t = self.transform
        xs = (t.c, t.c + t.a * self.width)
        ys = (t.f, t.f + t.e * self.height)
        return (min(xs), min(ys), max(xs), max(ys))

    @property
    def res_m(self) -> tuple[float, float]:
        """Pixel size ``(x, y)`` in metres.

        For a geographic CRS degrees are converted at the grid's centre latitude, which is what
        row spacing and area thresholds need.
        """
        rx, ry = self.res_xy
        if self.crs.is_geographic:
            lat = math.radians((self.bounds[1] + self.bounds[3]) / 2)
            metres_per_deg = 111_320.0
            return (rx * metres_per_deg * math.cos(lat), ry * metres_per_deg)
        mx, my = self.metres_per_unit
        return (rx * mx, ry * my)

    @property
    def metres_per_unit(self) -> tuple[float, float]:
        """Ground metres per CRS unit along x and y (projected and local CRSs).

        The CRS's linear unit (metre, US survey foot ...), times the projection's scale at the
        grid's centre where that is more than :data:`SCALE_TOLERANCE` off: Web Mercator
        (EPSG:3857) stretches distances by 1 / cos(latitude), 1.39x at 44 N, and a state plane
        or UTM zone far from the survey by tens of per cent; every length the run reports
        (GSD, row spacing, zone sizes) goes through here.
        """
        scale = self._ground_scale()
        return (scale.unit, scale.unit) if scale.nominal else (scale.x, scale.y)

    @property
    def square_metres_per_unit2(self) -> float:
        """Ground area of one square CRS unit (projected and local CRSs), for every area.

        Not the product of :attr:`metres_per_unit`: a projection may shear the ground (the
        sinusoidal, far from its central meridian), where lengths along x and y overstate the
        area; equal-area projections keep it at the unit's square.
        """
        scale = self._ground_scale()
        return scale.unit**2 if scale.nominal else scale.area

    @property
    def projection_stretch(self) -> float | None:
        """How much the CRS stretches ground distances at the grid's centre, if it matters.

        CRS length over ground length (mean of x and y) where that is beyond
        :data:`SCALE_TOLERANCE`; else None.
        """
        if self.crs.is_geographic:
            return None
        scale = self._ground_scale()
        stretch = 2 * scale.unit / (scale.x + scale.y)
        return None if abs(stretch - 1) <= SCALE_TOLERANCE else stretch

    @property
    def projection_shear(self) -> float | None:
        """How far the CRS's right angles are off on the ground at the grid's centre, if it matters.

        Degrees, where beyond :data:`SHEAR_TOLERANCE_DEG`; else None.
        """
        if self.crs.is_geographic:
            return None
        shear = self._ground_scale().shear_deg
        return shear if shear > SHEAR_TOLERANCE_DEG else None

    def _ground_scale(self) -> GroundScale:
        left, bottom, right, top = self.bounds
        step = 256 * max(self.res_xy)
        return _ground_scale(self.crs, (left + right) / 2, (bottom + top) / 2, step)

    def utm_epsg(self) -> int | None:
        """EPSG code of the WGS 84 UTM zone of the grid's centre (None off the Earth)."""
        if not on_earth(self.crs):
            return None
        from rasterio.warp import transform

        left, bottom, right, top = self.bounds
        try:
            lons, lats = transform(self.crs, "EPSG:4326", [(left + right) / 2],
                                   [(bottom + top) / 2])
        except Exception:  # GDAL raises CPLE_AppDefinedError and others off the projection
            return None
        lon, lat = lons[0], lats[0]
        if not (math.isfinite(lon) and -90 <= lat <= 90):
            return None
        zone = min(int((lon + 180) // 6) + 1, 60)
        return (32600 if lat >= 0 else 32700) + zone

    @property
    def gsd_m(self) -> float:
        """Ground sampling distance in metres (mean of x and y, see :attr:`res_m`)."""
        return sum(self.res_m) / 2

    @property
    def pixel_area_m2(self) -> float:
        """Ground area of one pixel in square metres (x times y: pixels need not be square).

        Approximate for a geographic CRS (at the centre latitude): the field summaries use
        each row's area on the ellipsoid (:func:`agriseg.vectorize.row_pixel_areas`).
        """
        if self.crs.is_geographic:
            rx, ry = self.res_m
            return rx * ry
        ux, uy = self.res_xy
        return ux * uy * self.square_metres_per_unit2

    def window_transform(self, window: Window) -> Affine:
        """Affine transform of a window's top-left pixel."""
        return self.transform @ Affine.translation(window.col_off, window.row_off)

    def same_as(self, other: Grid, tol: float = 1e-6) -> bool:
        """True when shapes, CRS and transforms agree (within ``tol`` pixel)."""
        if self.shape_yx != other.shape_yx or self.crs != other.crs:
            return False
        return self.transform.almost_equals(other.transform, precision=tol * min(self.res_xy))

    def to_dict(self) -> dict[str, object]:
        """JSON-friendly form for manifests."""
        return {
            "shape_yx": list(self.shape_yx),
            "transform": list(self.transform)[:6],
            "crs": self.crs.to_string(),
            "gsd_m": round(self.gsd_m, 6),
        }


#: WGS 84's semi-major axis (m) and first eccentricity squared, for ground distances.
_WGS84_A = 6378137.0
_WGS84_E2 = 6.69437999014e-3


@dataclass(frozen=True, slots=True)
class GroundScale:
    """How a CRS maps onto the ground at one point.

    Attributes:
        x: ground metres per CRS unit along the CRS's x axis.
        y: the same along y.
        area: ground square metres per square CRS unit.
        shear_deg: how far from 90 degrees the x and y axes are on the ground.
        unit: the CRS's nominal linear unit in metres.
    """

    x: float
    y: float
    area: float
    shear_deg: float
    unit: float

    @property
    def nominal(self) -> bool:
        """Whether the CRS's own unit is good to :data:`SCALE_TOLERANCE` in length and area."""
        u = self.unit
        return (abs(self.x / u - 1) <= SCALE_TOLERANCE and abs(self.y / u - 1) <= SCALE_TOLERANCE
                and abs(self.area / u**2 - 1) <= SCALE_TOLERANCE)


#: WGS 84's semi-major axis (m) and first eccentricity squared, for ground distances.
_WGS84_A = 6378137.0
_WGS84_E2 = 6.69437999014e-3


@functools.lru_cache(maxsize=64)
def _ground_scale(crs: CRS, x: float, y: float, step: float) -> GroundScale:
    """The CRS's :class:`GroundScale` at ``(x, y)``, measured over ``step`` CRS units.

    Measured, not derived from projection formulas: the ground vectors of ``step`` CRS units
    east and north of the point, through GDAL's transform to longitude and latitude (any
    projection GDAL knows, whatever its unit). Over such short steps the ellipsoid's radii of
    curvature at the point give them to far better than the 1 % that matters here, and need
    neither pyproj nor a geodesic solver (the GPU machines carry neither). Local CRSs, and
    points GDAL cannot take back to the ellipsoid, get the nominal unit.
    """
    from rasterio.warp import transform

    try:
        unit = float(crs.units_factor[1])
    except Exception:  # a CRS without a unit GDAL names (rasterio raises CRSError)
        unit = 1.0
    plain = GroundScale(unit, unit, unit * unit, 0.0, unit)
    if not crs.is_projected:
        return plain
    try:
        lon, lat = transform(crs, "EPSG:4326", [x, x + step, x], [y, y, y + step])
    except Exception:  # GDAL raises CPLE_AppDefinedError and others off the projection
        return plain
    if not all(math.isfinite(v) for v in (*lon, *lat)) or abs(lat[0]) >= 90:
        return plain
    phi = math.radians(lat[0])
    w = math.sqrt(1 - _WGS84_E2 * math.sin(phi) ** 2)
    across = _WGS84_A / w * math.cos(phi)  # metres per radian of longitude
    along = _WGS84_A * (1 - _WGS84_E2) / w**3  # metres per radian of latitude

    def ground(i: int) -> tuple[float, float]:
        """East and north metres of step ``i``."""
        dlon = (lon[i] - lon[0] + 180.0) % 360.0 - 180.0
        return across * math.radians(dlon), along * math.radians(lat[i] - lat[0])

    (ex, nx), (ey, ny) = ground(1), ground(2)
    mx, my = math.hypot(ex, nx) / step, math.hypot(ey, ny) / step
    area = abs(ex * ny - ey * nx) / step**2
    if not (mx > 0 and my > 0 and area > 0):
        return plain
    # |sin| of the angle between the two ground vectors is area / (x y).
    shear = math.degrees(math.acos(min(1.0, area / (mx * my))))
    return GroundScale(mx, my, area, shear, unit)


@dataclass(frozen=True, slots=True)
class Tile:
    """One unit of work: a core window written to the output and the window read around it.

    Attributes:
        index_yx: ``(row, col)`` of the tile in the plan.
        core: pixels this tile owns in the output.
        read: core grown by the halo and clipped to the raster.
        pad: ``(top, bottom, left, right)`` pixels to reflect-pad the read array with so that
            it becomes ``core`` grown by the full halo on every side.
        swath: the column group ("swath") the tile runs in; swaths run one after the other.
        swath_end: the last tile of its row in its swath (the next tile starts a new row).
    """

    index_yx: tuple[int, int]
    core: Window
    read: Window
    pad: tuple[int, int, int, int]
    swath: int = 0
    swath_end: bool = True

    @property
    def key(self) -> str:
        """Stable id used for Dask keys and the resume checkpoint."""
        return f"{self.index_yx[0]}_{self.index_yx[1]}"

    @property
    def core_in_padded(self) -> tuple[slice, slice]:
        """Slices that cut the core out of the padded (core + 2 * halo) array."""
        top = self.pad[0] + int(self.core.row_off - self.read.row_off)
        left = self.pad[2] + int(self.core.col_off - self.read.col_off)
        return (
            slice(top, top + int(self.core.height)),
            slice(left, left + int(self.core.width)),
        )


@dataclass(frozen=True, slots=True)
class TilePlan:
    """How a grid is cut into tiles.

    Attributes:
        grid: the raster grid being tiled.
        tile_size: core tile edge in pixels (a multiple of ``block_size``).
        halo: context pixels read on every side of a core.
        block_size: internal block edge of the output GeoTIFFs.
        tiles: all tiles in run order: swath by swath, row-major in each (see
            :func:`plan_tiles`).
    """

    grid: Grid
    tile_size: int
    halo: int
    block_size: int
    tiles: tuple[Tile, ...] = field(repr=False)

    def __iter__(self) -> Iterator[Tile]:
        return iter(self.tiles)

    def __len__(self) -> int:
        return len(self.tiles)

    @property
    def shape_tiles_yx(self) -> tuple[int, int]:
        """Number of tile rows and columns."""
        return (
            math.ceil(self.grid.height / self.tile_size),
            math.ceil(self.grid.width / self.tile_size),
        )

    @property
    def read_overhead(self) -> float:
        """Pixels the model sees per output pixel (1.0 means no halo)."""
        seen = sum(
            (t.core.height + 2 * self.halo) * (t.core.width + 2 * self.halo) for t in self.tiles
        )
        return seen / max(1, self.grid.height * self.grid.width)


def block_size_for(tile_size: int) -> int:
    """Largest GeoTIFF block edge (16..512) that divides ``tile_size``.

    Raises:
        ConfigError: ``tile_size`` is not a positive multiple of 16.
    """
    for b in BLOCK_SIZES:
        if tile_size > 0 and tile_size % b == 0:
            return b
    raise ConfigError(
        f"tile size {tile_size} is not a positive multiple of 16; "
        "use e.g. 512, 1024 or 2048 (GeoTIFF blocks must be multiples of 16)"
    )


#: Padded tile edge (core + both halos) above which a tile's per-pixel work slowed down on the
#: 2-core reference VM (AMD EPYC, 32 MiB L3 shared by both workers): label-free tiles with a
#: 120 px halo, 268 MP, cost 15.1 s per padded MP at 1520 px and 18.7 at 1776 px (1.24x);
#: their planes no longer stay in the cache between passes. See benchmarks/RESULTS.md.
CACHE_PADDED_PX = 1536
LARGE_TILE_COST = 1.25


def auto_tile_size(halo: int, base: int = 1024, step: int = 256, largest: int = 2048,
                   max_overhead: float = 1.35, multiple: int = 1) -> int:
    """Default core tile edge for a model's halo.

    ``base`` pixels while the halo makes the model read at most ``max_overhead`` pixels per
    output pixel. Wider halos (the label-free model's along-row support reaches ~2 m) would
    re-read and re-decode much of the raster, so the size is then the one of ``base``,
    ``base + step``, ... ``largest`` with the least modelled cost per output pixel: the
    overhead, times :data:`LARGE_TILE_COST` where the padded tile is wider than
    :data:`CACHE_PADDED_PX` (bigger tiles also cost worker memory and a longer tail at the
    end of a run). The result is then rounded up to ``multiple`` (a model's block interior,
    see :attr:`agriseg.models.base.Prepared.tile_multiple`) and to 16.
    """
    def overhead(size: int) -> float:
        return ((size + 2 * halo) / size) ** 2

    def cost(size: int) -> float:
        return overhead(size) * (LARGE_TILE_COST if size + 2 * halo > CACHE_PADDED_PX else 1.0)

    size = base
    if overhead(base) > max_overhead:
        size = min(range(base, largest + 1, step), key=cost)  # the smallest of equal costs
    multiple = math.lcm(max(int(multiple), 1), 16)
    return -(-size // multiple) * multiple


def plan_tiles(grid: Grid, tile_size: int, halo: int, swath_px: int = SWATH_PX) -> TilePlan:
    """Cut ``grid`` into core tiles of ``tile_size`` with ``halo`` context pixels.

    Cores partition the raster exactly (the last row and column of tiles may be smaller).
    Read windows are cores grown by ``halo`` and clipped to the raster; the clipped amount is
    returned as reflect padding so every tile presents ``core + 2 * halo`` pixels to the model.

    Tiles run in column groups ("swaths") of equal numbers of tile columns, at most about
    ``swath_px`` wide, row-major inside each: the halo rows that a tile row shares with the
    next are then decoded once and held for a swath's width rather than the raster's (the
    shared block cache of :mod:`agriseg.raster` held ~190 MiB at 32 768 px wide, row-major).
    Rasters up to ``swath_px`` wide are one swath: plain row-major order.

    Args:
        grid: the raster grid.
        tile_size: core tile edge in pixels, a multiple of 16.
        halo: context pixels on each side, ``>= 0``.
        swath_px: widest swath in pixels (rounded up to whole tiles).

    Returns:
        The plan, tiles in run order.

    Raises:
        ConfigError: invalid tile size or halo.
    """
    block = block_size_for(tile_size)
    if halo < 0:
        raise ConfigError(f"halo must be >= 0 pixels, got {halo}")
    height, width = grid.shape_yx
    if height <= 0 or width <= 0:
        raise ConfigError(f"cannot tile an empty grid of shape {grid.shape_yx}")
    n_cols = math.ceil(width / tile_size)
    n_swaths = math.ceil(n_cols / max(1, math.ceil(swath_px / tile_size)))
    per_swath = math.ceil(n_cols / n_swaths)
    tiles = []
    for sw in range(n_swaths):
        first, last = sw * per_swath, min(n_cols, (sw + 1) * per_swath) - 1
        for ty, row0 in enumerate(range(0, height, tile_size)):
            h = min(tile_size, height - row0)
            r0, r1 = max(0, row0 - halo), min(height, row0 + h + halo)
            for tx in range(first, last + 1):
                col0 = tx * tile_size
                w = min(tile_size, width - col0)
                c0, c1 = max(0, col0 - halo), min(width, col0 + w + halo)
                pad = (
                    halo - (row0 - r0),
                    halo - (r1 - row0 - h),
                    halo - (col0 - c0),
                    halo - (c1 - col0 - w),
                )
                tiles.append(Tile((ty, tx), Window(col0, row0, w, h),
                                  Window(c0, r0, c1 - c0, r1 - r0), pad, sw, tx == last))
    return TilePlan(grid, tile_size, halo, block, tuple(tiles))
