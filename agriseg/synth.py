"""Deterministic synthetic georeferenced crop fields with known ground truth.

The fields imitate drone orthomosaics of row crops (soybean, maize, sorghum) at 1-5 cm GSD so
that a label-free segmenter (vegetation index + Otsu threshold, row geometry, colour anomaly)
is measured honestly rather than on cartoon stripes:

* **soil**: a field-specific tan / brown / grey base with texture at several scales, embossed
  clods lit from the sun's side, planter marks and moist streaks parallel to the rows, sprayer
  wheel tracks, bright stones and straw residue;
* **crop**: slightly wavy rows of individual plants (lit domes with leaf crevices, a shaded
  side, plant-to-plant size and colour variation, missing plants and planter skips) that cast
  shadows on the soil;
* **weeds**: mostly between the rows, in clustered patches of one dominant species plus
  scattered singles, in greens that overlap the crop's (yellow-green broadleaves, bluish
  glaucous ones, crop-like volunteers, star-shaped grasses); a few grow inside the rows;
* **disease**: graded patches on the crop canopy, healthy -> chlorotic (yellow) -> necrotic
  (brown), mottled; only clearly discoloured crop pixels are labelled disease, so mild
  yellowing stays "crop" as a human annotator would leave it;
* **acquisition**: illumination gradient, orthomosaic seam exposure steps, soft optics,
  sensor noise, and an irregular nodata footprint like ODM / Pix4D edges.

Everything is rendered as surface reflectance in five bands (R, G, B, red edge, NIR) from
plausible spectra, then either tone-mapped to 8-bit RGB like a consumer camera or stored as
reflectance x 10000 like a calibrated multispectral camera. The truth raster is the class of
each pixel before optical blur, so mixed edge pixels are genuinely ambiguous.

Each component draws from its own random stream derived from the seed, so e.g. changing
``weed_density`` leaves the soil and crop rows unchanged. Same spec -> identical arrays.

Performance: everything is vectorised; smooth fields are built on coarse grids and upsampled
once, per-pixel work runs in cache-sized row blocks, and sparse layers (weeds, disease,
stones) are kept as flat pixel indices.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from affine import Affine
from rasterio.crs import CRS
from scipy import ndimage

from agriseg.classes import CROP, DEFAULT_CLASSES, DISEASE, NODATA_CLASS, SOIL, WEED
from agriseg.errors import ConfigError, OutputError
from agriseg.grid import Grid

log = logging.getLogger(__name__)

ROLES_RGB: tuple[str, ...] = ("red", "green", "blue")
ROLES_MS: tuple[str, ...] = ("red", "green", "blue", "rededge", "nir")

# Independent random streams, one per scene component (see module docstring).
(
    _S_LAYOUT,
    _S_ROWS,
    _S_TEXTURE,
    _S_SOIL,
    _S_CROP,
    _S_WEED,
    _S_DISEASE,
    _S_BORDER,
    _S_LIGHT,
    _S_SENSOR,
) = range(1, 11)

# Surface reflectance, bands R, G, B, red edge, NIR (MicaSense-like centres 668, 560, 475,
# 717, 842 nm). Values follow typical field spectra: green leaves absorb red and blue and
# reflect ~0.45 in NIR; soils rise slowly with wavelength; stress raises red, lowers NIR.
_SOILS = np.array(
    [
        [0.240, 0.200, 0.160, 0.265, 0.290],  # dry tan loam
        [0.150, 0.115, 0.090, 0.170, 0.210],  # dark brown, organic
        [0.215, 0.205, 0.190, 0.225, 0.245],  # grey silt / crusted
    ],
    np.float32,
)
_STONE = np.array([0.300, 0.290, 0.270, 0.310, 0.320], np.float32)
_RESIDUE = np.array([0.330, 0.290, 0.210, 0.370, 0.420], np.float32)  # dry straw: NDVI ~0.1
_CROP = np.array([0.045, 0.105, 0.040, 0.220, 0.480], np.float32)
_CROP_YELLOW = np.array([0.012, 0.012, -0.008, 0.010, -0.020], np.float32)  # per unit vigour
_CHLOROTIC = np.array([0.140, 0.160, 0.042, 0.270, 0.390], np.float32)
_NECROTIC = np.array([0.170, 0.125, 0.080, 0.200, 0.260], np.float32)
_WEED_SPECTRA = np.array(
    [
        [0.060, 0.135, 0.036, 0.250, 0.470],  # pigweed-like: yellow-green broadleaf
        [0.075, 0.120, 0.080, 0.240, 0.440],  # lambsquarters-like: glaucous, bluish
        [0.046, 0.106, 0.042, 0.220, 0.460],  # volunteer / crop-like green
        [0.050, 0.100, 0.058, 0.210, 0.420],  # grass: darker bluish green, narrow blades
    ],
    np.float32,
)
_WEED_GRASS = 3
# Fraction of direct sunlight left in cast shadow per band: skylight is blue.
_AMBIENT = np.array([0.34, 0.37, 0.46, 0.35, 0.35], np.float32)
# Within the canopy leaves scatter NIR (and red edge) so much that self-shade is shallow
# there: the shading factor is raised to these powers.
_VEG_SHADE_POWER = (1.0, 1.0, 1.0, 0.75, 0.5)
_VEG_AMBIENT = 0.35
_BLOCK_PX = 1 << 18


MAX_PIXELS = 8192 * 8192
"""Largest synthetic field: ~4.7 GB of memory while it is built (1.2 GB at 4096 x 4096)."""
#: Largest weed / disease density multiplier (x1: the default field; x3 is a weedy one).
MAX_DENSITY = 100.0


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """What to synthesise.

    Attributes:
        size: square raster edge in pixels (ignored when ``shape_yx`` is given).
        seed: random seed (``>= 0``); the same spec always gives identical arrays.
        gsd: ground sampling distance in metres per pixel.
        row_angle_deg: direction of the crop rows in degrees counter-clockwise from east (+x);
            ``None`` draws one from the seed in ``[0, 180)``.
        row_spacing_m: centre-to-centre row distance; ``None`` draws ``0.5..0.9`` m.
        crop_cover: fraction of the row spacing covered by canopy across a row (0..0.95).
        weed_density: multiplier of weed patches and single weeds per square metre.
        disease_density: multiplier of disease patches per square metre of field.
        multispectral: add red-edge and NIR bands and store calibrated reflectance.
        nodata_border: cut an irregular orthomosaic footprint (5-15 % nodata).
        crs: CRS of the output (a projected CRS in metres).
        origin_xy: top-left corner in CRS units.
        shape_yx: ``(height, width)`` overriding ``size`` for non-square rasters.
    """

    size: int = 1024
    seed: int = 0
    gsd: float = 0.02
    row_angle_deg: float | None = None
    row_spacing_m: float | None = None
    crop_cover: float = 0.45
    weed_density: float = 1.0
    disease_density: float = 1.0
    multispectral: bool = False
    nodata_border: bool = True
    crs: str = "EPSG:32615"
    origin_xy: tuple[float, float] = (500000.0, 4900000.0)
    shape_yx: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        h, w = self.shape
        if h < 16 or w < 16:
            raise ConfigError(f"synthetic field must be at least 16x16 pixels, got {h}x{w}")
        if h * w > MAX_PIXELS:
            raise ConfigError(
                f"synthetic field of {h}x{w} pixels is too large: it is built in memory "
                f"(~70 bytes per pixel), so at most {MAX_PIXELS // 8192}x8192; for a bigger test "
                "raster, mosaic several fields (gdalbuildvrt), as benchmarks/throughput.py does"
            )
        if self.seed < 0:
            raise ConfigError(f"seed must be >= 0, got {self.seed}")
        numbers = {"gsd": self.gsd, "row_angle_deg": self.row_angle_deg,
                   "row_spacing_m": self.row_spacing_m, "crop_cover": self.crop_cover,
                   "weed_density": self.weed_density, "disease_density": self.disease_density,
                   "origin_xy": self.origin_xy[0], "origin_xy ": self.origin_xy[1]}
        for name, value in numbers.items():
            if value is not None and not math.isfinite(value):
                raise ConfigError(f"{name.strip()} must be a finite number, got {value}")
        if not 0.002 <= self.gsd <= 0.5:
            raise ConfigError(f"gsd must be 0.002..0.5 m per pixel, got {self.gsd}")
        if self.row_spacing_m is not None and not 0.1 <= self.row_spacing_m <= 5.0:
            raise ConfigError(f"row_spacing_m must be 0.1..5 m, got {self.row_spacing_m}")
        if not 0.0 < self.crop_cover <= 0.95:
            raise ConfigError(f"crop_cover must be in (0, 0.95], got {self.crop_cover}")
        if not (0 <= self.weed_density <= MAX_DENSITY and 0 <= self.disease_density <= MAX_DENSITY):
            # Each unit is a few plants or patches per square metre: 1e9 filled memory.
            raise ConfigError(f"weed_density and disease_density must be 0..{MAX_DENSITY:g}, "
                              f"got {self.weed_density:g} and {self.disease_density:g}")
        try:
            crs = CRS.from_user_input(self.crs)
        except Exception as exc:  # rasterio raises several types for bad input
            raise ConfigError(f"invalid CRS {self.crs!r}: {exc}") from exc
        if not crs.is_projected:
            raise ConfigError(f"CRS {self.crs!r} is not projected; synthetic fields need metres")

    @property
    def shape(self) -> tuple[int, int]:
        """``(height, width)`` in pixels."""
        if self.shape_yx is not None:
            return (int(self.shape_yx[0]), int(self.shape_yx[1]))
        return (int(self.size), int(self.size))


@dataclass(frozen=True, slots=True)
class SynthField:
    """A synthesised field and its ground truth.

    Attributes:
        image: RGB ``uint8 (3, H, W)`` (validity is in ``valid``, written as alpha) or, when
            multispectral, ``uint16 (5, H, W)`` reflectance x 10000 in R, G, B, RE, NIR order
            (0 outside ``valid``, at least 1 inside).
        truth: ``uint8 (H, W)`` classes 0 soil, 1 crop, 2 weed, 3 disease; 255 outside valid.
        valid: ``bool (H, W)`` inside the orthomosaic footprint.
        grid: georeferencing of all three arrays.
        roles: band role of each image channel.
        info: JSON-friendly facts about the scene (row geometry, counts, class fractions).
    """

    image: np.ndarray
    truth: np.ndarray
    valid: np.ndarray
    grid: Grid
    roles: tuple[str, ...]
    info: dict[str, object]


@dataclass(frozen=True, slots=True)
class _Layout:
    """Field-wide parameters drawn from the layout stream."""

    angle_deg: float
    spacing: float
    row_phase: float
    half_width: float
    pitch: float
    canopy_height: float
    sun_az: float
    sun_el: float
    soil_mix: np.ndarray
    exposure: float
    drift: tuple[float, float, float, float, float, float]

    @property
    def sun_xy(self) -> tuple[float, float]:
        """Horizontal unit vector towards the sun in pixel axes (x right, y down)."""
        az = math.radians(self.sun_az)
        return (math.sin(az), -math.cos(az))

    def uv(self, y_m: np.ndarray, x_m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Row frame (across ``u``, along ``v``; metres, drift ignored) of image metres.

        Row ``k`` is centred on ``u = k * spacing``.
        """
        th = math.radians(self.angle_deg)
        s, c = np.float32(math.sin(th)), np.float32(math.cos(th))
        return (y_m * c + x_m * s - np.float32(self.row_phase), x_m * c - y_m * s)

    def xy_px(self, u: np.ndarray, v: np.ndarray, gsd: float) -> tuple[np.ndarray, np.ndarray]:
        """Inverse of :meth:`uv`, to pixel-centre coordinates ``(x, y)``."""
        th = math.radians(self.angle_deg)
        s, c = math.sin(th), math.cos(th)
        uu = u + self.row_phase
        return ((uu * s + v * c) / gsd - 0.5, (uu * c - v * s) / gsd - 0.5)


# --------------------------------------------------------------------------- noise helpers


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream])


def _blocks(shape: tuple[int, int]) -> Iterator[slice]:
    """Row slices of about ``_BLOCK_PX`` pixels, so chained temporaries stay in cache."""
    step = max(1, _BLOCK_PX // shape[1])
    for r0 in range(0, shape[0], step):
        yield slice(r0, min(shape[0], r0 + step))


def _interp_axis(a: np.ndarray, coords: np.ndarray, step: float, axis: int) -> np.ndarray:
    """Linear interpolation along ``axis`` of a coarse grid.

    Sample ``j`` of the coarse axis sits at full-resolution coordinate ``(j - 1) * step``;
    ``coords`` are the full-resolution positions to interpolate at.
    """
    pos = coords / step + 1.0
    i0 = np.clip(np.floor(pos).astype(np.intp), 0, a.shape[axis] - 2)
    t = (pos - i0).astype(np.float32)
    a0 = np.take(a, i0, axis=axis)
    a1 = np.take(a, i0 + 1, axis=axis)
    shape = [1] * a.ndim
    shape[axis] = coords.size
    a1 -= a0
    a1 *= t.reshape(shape)
    a1 += a0
    return a1


def _low_shape(shape: tuple[int, int], step: int) -> tuple[int, int]:
    return (int(shape[0] / step) + 3, int(shape[1] / step) + 3)


def _low_coords(n: int, step: int) -> np.ndarray:
    """Full-resolution coordinates of the samples of a coarse axis (see _interp_axis)."""
    return (np.arange(int(n / step) + 3, dtype=np.float64) - 1.0) * step


def _upsample(low: np.ndarray, shape: tuple[int, int], step: int) -> np.ndarray:
    """Bilinear upsampling of a coarse grid made with :func:`_low_shape`.

    With an integer step the interpolation weights repeat every ``step`` pixels, so it is
    two broadcast operations per pixel instead of two gathers, done in cache-sized blocks.
    """
    h, w = shape
    s = int(step)
    t = (np.arange(s, dtype=np.float32) + 0.5) / s
    mh, mw = -(-h // s), -(-w // s)
    a = low[1 : 1 + mh]
    rows = a[:, None, :] + (low[2 : 2 + mh] - a)[:, None, :] * t[None, :, None]
    rows = rows.reshape(mh * s, -1)[:h]
    out = np.empty(shape, np.float32)
    for sl in _blocks(shape):
        a = rows[sl, 1 : 1 + mw]
        blk = (rows[sl, 2 : 2 + mw] - a)[:, :, None] * t
        blk += a[:, :, None]
        out[sl] = blk.reshape(blk.shape[0], mw * s)[:, :w]
    return out


def _white(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Unit-variance white noise (uniform: several times cheaper than Gaussian draws)."""
    n = rng.random(shape, dtype=np.float32)
    n -= np.float32(0.5)
    n *= np.float32(math.sqrt(12.0))
    return n


def _kernel(sigma: float) -> np.ndarray:
    r = max(1, round(2.5 * sigma))
    x = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-(x * x) / (2.0 * sigma * sigma))
    return (k / k.sum()).astype(np.float32)


def _blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Small-sigma Gaussian blur in float32 (scipy's filters work in float64, ~10x slower).

    Runs in row blocks so both passes stay in cache. Borders are renormalised by the weights
    that fell inside, which keeps edges unbiased without padding copies.
    """
    k = _kernel(sigma)
    r = k.size // 2
    h, w = a.shape
    vnorm = (1.0 / np.convolve(np.ones(h), k)[r : r + h]).astype(np.float32)
    hnorm = (1.0 / np.convolve(np.ones(w), k)[r : r + w]).astype(np.float32)
    out = np.empty((h, w), np.float32)
    for sl in _blocks((h, w)):
        r0, r1 = sl.start, sl.stop
        acc = a[r0:r1] * k[r]
        for o in range(1, r + 1):
            y0 = max(r0, o)
            if y0 < r1:
                acc[y0 - r0 :] += a[y0 - o : r1 - o] * k[r + o]
            y1 = min(r1, h - o)
            if y1 > r0:
                acc[: y1 - r0] += a[r0 + o : y1 + o] * k[r + o]
        if r0 < r or r1 > h - r:
            acc *= vnorm[r0:r1, None]
        blk = acc * k[r]
        for o in range(1, min(r, w - 1) + 1):
            blk[:, o:] += acc[:, :-o] * k[r + o]
            blk[:, :-o] += acc[:, o:] * k[r + o]
        e = min(r, w)
        blk[:, :e] *= hnorm[:e]
        e2 = max(e, w - r)
        blk[:, e2:] *= hnorm[e2:]
        out[sl] = blk
    return out


def _step_for(scale_px: float) -> int:
    """Coarse-grid step (integer pixels) for noise of correlation length ``scale_px``."""
    return max(1, round(scale_px / 2.0))


def _low_noise(rng: np.random.Generator, shape: tuple[int, int], scale_px: float) -> np.ndarray:
    """Unit-variance smooth noise on the coarse grid of :func:`_step_for`."""
    low = rng.standard_normal(_low_shape(shape, _step_for(scale_px)), dtype=np.float32)
    low = ndimage.gaussian_filter(low, 1.0, mode="wrap")
    low -= low.mean()
    low /= max(float(low.std()), 1e-6)
    return low


def _noise(rng: np.random.Generator, shape: tuple[int, int], scale_px: float) -> np.ndarray:
    """Zero-mean, roughly unit-variance random field of correlation length ~``scale_px``.

    Large scales are smoothed on a coarse grid and upsampled (a full-resolution Gaussian of
    sigma 100 px would cost a thousand taps per pixel); small ones are blurred in place.
    """
    if scale_px < 2.0:
        n = _white(rng, shape)
        sigma = scale_px * 0.5
        if sigma < 0.35:
            return n
        k = _kernel(sigma)
        n = _blur(n, sigma)
        # A separable blur scales the variance of white noise by (sum k^2)^2.
        n *= np.float32(1.0 / float((k * k).sum()))
        return n
    return _upsample(_low_noise(rng, shape, scale_px), shape, _step_for(scale_px))


def _noise_on(
    rng: np.random.Generator, shape: tuple[int, int], scale_px: float, step: int
) -> np.ndarray:
    """Smooth noise of ``scale_px`` (>= 2 * step) sampled on the coarse grid of ``step``."""
    low = _low_noise(rng, shape, scale_px)
    ys, xs = _low_coords(shape[0], step), _low_coords(shape[1], step)
    src = _step_for(scale_px)
    return _interp_axis(_interp_axis(low, ys, src, 0), xs, src, 1)


def _table_1d(
    rng: np.random.Generator, lo: float, hi: float, scale: float, res: float
) -> tuple[np.ndarray, float]:
    """Smooth unit-variance 1D noise tabulated every ``res`` from ``lo`` to ``hi``."""
    dx = scale / 2.0
    n = int((hi - lo) / dx) + 4
    knots = ndimage.gaussian_filter1d(rng.standard_normal(n), 1.0)
    knots = (knots - knots.mean()) / max(knots.std(), 1e-9)
    fine = np.arange(lo, hi + 2 * res, res)
    return np.interp(fine, lo - dx + dx * np.arange(n), knots).astype(np.float32), lo


def _lookup_1d(
    table: tuple[np.ndarray, float], coord: np.ndarray, res: float
) -> np.ndarray:
    """Nearest-entry lookup in a fine table (one gather, cheaper than interpolating)."""
    values, lo = table
    out = np.empty(coord.shape, np.float32)
    for sl in _blocks(coord.shape):
        pos = coord[sl] - np.float32(lo - 0.5 * res)
        pos *= np.float32(1.0 / res)
        i = pos.astype(np.intp)
        np.clip(i, 0, values.size - 1, out=i)
        np.take(values, i, out=out[sl])
    return out


def _noise_1d(
    rng: np.random.Generator, coord: np.ndarray, lo: float, hi: float, scale: float
) -> np.ndarray:
    """Smooth 1D noise evaluated at ``coord`` (same units as ``scale``), unit variance."""
    res = scale / 16.0
    return _lookup_1d(_table_1d(rng, lo, hi, scale, res), coord, res)


def _shift(a: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``a`` moved by (dy, dx) pixels, zero filled."""
    out = np.zeros_like(a)
    h, w = a.shape
    if abs(dy) >= h or abs(dx) >= w:
        return out
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[yd, xd] = a[ys, xs]
    return out


def _at_least_one(rng: np.random.Generator, mean: float) -> int:
    """Poisson count, but one when ``mean > 0`` draws zero (every class shows up)."""
    if mean <= 0:
        return 0
    return max(1, int(rng.poisson(mean)))


def _specks(
    rng: np.random.Generator,
    shape: tuple[int, int],
    n: int,
    semi_a: np.ndarray,
    semi_b: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Anti-aliased small ellipses at random places: (flat pixel indices, cover 0..1)."""
    h, w = shape
    if n == 0:
        return np.zeros(0, np.intp), np.zeros(0, np.float32)
    cx, cy = rng.uniform(0, w, n), rng.uniform(0, h, n)
    ori = rng.uniform(0, math.pi, n)
    r = math.ceil(float(max(semi_a.max(), semi_b.max()))) + 1
    oy, ox = np.mgrid[-r : r + 1, -r : r + 1]
    ix = np.floor(cx).astype(np.intp)[:, None] + ox.ravel()[None, :]
    iy = np.floor(cy).astype(np.intp)[:, None] + oy.ravel()[None, :]
    dx, dy = ix + 0.5 - cx[:, None], iy + 0.5 - cy[:, None]
    ca, sa = np.cos(ori)[:, None], np.sin(ori)[:, None]
    p = (dx * ca + dy * sa) / semi_a[:, None]
    q = (dy * ca - dx * sa) / semi_b[:, None]
    dist = np.sqrt(p * p + q * q)
    cover = np.clip((1.0 - dist) * np.minimum(semi_a, semi_b)[:, None] + 0.5, 0.0, 1.0)
    keep = (cover > 0) & (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h)
    flat = (iy * w + ix)[keep]
    cover = cover[keep]
    # Overlapping specks: keep the largest cover per pixel.
    order = np.lexsort((-cover, flat))
    flat, cover = flat[order], cover[order]
    first = np.ones(flat.size, bool)
    first[1:] = flat[1:] != flat[:-1]
    return flat[first], cover[first].astype(np.float32)


# ------------------------------------------------------------------------------- layout


def _layout(spec: FieldSpec) -> _Layout:
    rng = _rng(spec.seed, _S_LAYOUT)
    # Draw every value unconditionally so explicit overrides do not shift the stream.
    angle = float(rng.uniform(0.0, 180.0))
    spacing = float(rng.uniform(0.5, 0.9))
    if spec.row_angle_deg is not None:
        angle = float(spec.row_angle_deg) % 180.0
    if spec.row_spacing_m is not None:
        spacing = float(spec.row_spacing_m)
    half_width = spec.crop_cover * spacing / 2.0
    pitch = max(half_width * float(rng.uniform(1.0, 1.5)), 2.5 * spec.gsd)
    soil_mix = rng.dirichlet([1.2, 1.0, 0.8]).astype(np.float32)
    drift = (
        float(rng.uniform(0.01, 0.04)),  # planter steering: amplitude (m)
        float(rng.uniform(8.0, 30.0)),  # wavelength (m)
        float(rng.uniform(0, 2 * math.pi)),
        float(rng.uniform(0.003, 0.012)),  # hitch wobble
        float(rng.uniform(1.5, 4.0)),
        float(rng.uniform(0, 2 * math.pi)),
    )
    return _Layout(
        angle_deg=angle,
        spacing=spacing,
        row_phase=float(rng.uniform(0.0, spacing)),
        half_width=half_width,
        pitch=pitch,
        canopy_height=float(rng.uniform(0.15, 0.4)),
        sun_az=float(rng.uniform(0.0, 360.0)),
        sun_el=float(rng.uniform(35.0, 65.0)),
        soil_mix=soil_mix,
        exposure=float(rng.uniform(2.1, 2.7)),
        drift=drift,
    )


@dataclass(slots=True)
class _Rows:
    """Per-pixel row coordinates in metres."""

    u: np.ndarray  # across rows (with drift), row k centred at (k + k_min) * spacing
    v: np.ndarray  # along rows
    k: np.ndarray  # row index into the row tables (0-based)
    d: np.ndarray  # signed lateral distance from the row centre line
    u_range: tuple[float, float]
    v_range: tuple[float, float]
    n_rows: int
    k_min: int


def _row_coords(spec: FieldSpec, lay: _Layout, rng: np.random.Generator) -> _Rows:
    h, w = spec.shape
    gsd = spec.gsd
    x = ((np.arange(w, dtype=np.float32) + 0.5) * gsd)[None, :]
    y = ((np.arange(h, dtype=np.float32) + 0.5) * gsd)[:, None]
    u, v = lay.uv(y, x)
    cu, cv = lay.uv(
        np.array([0.0, 0.0, h * gsd, h * gsd], np.float32),
        np.array([0.0, w * gsd, 0.0, w * gsd], np.float32),
    )
    a1, l1, p1, a2, l2, p2 = lay.drift
    # Lateral drift depends on v only: tabulate it finely and look it up once per pixel.
    res = gsd / 4.0
    v_lo, v_hi = float(cv.min()) - 1.0, float(cv.max()) + 1.0
    vt = np.arange(v_lo, v_hi + 2 * res, res)
    drift = a1 * np.sin(vt * (2 * math.pi / l1) + p1) + a2 * np.sin(vt * (2 * math.pi / l2) + p2)
    u -= _lookup_1d((drift.astype(np.float32), v_lo), v, res)
    u_lo = float(cu.min()) - 0.1
    u_hi = float(cu.max()) + 0.1
    k_min = math.floor(u_lo / lay.spacing + 0.5) - 1
    n_rows = math.floor(u_hi / lay.spacing + 0.5) + 2 - k_min
    kf = np.floor(u * np.float32(1.0 / lay.spacing) + np.float32(0.5))
    d = u - kf * np.float32(lay.spacing)
    k = kf.astype(np.int32) - np.int32(k_min)
    np.clip(k, 0, n_rows - 1, out=k)
    # Planter units wobble partly independently: a field correlated over ~2 rows.
    d -= np.float32(rng.uniform(0.003, 0.008)) * _noise(rng, (h, w), 1.5 / gsd)
    return _Rows(
        u, v, k, d, (u_lo, u_hi), (float(cv.min()) - 0.5, float(cv.max()) + 0.5), n_rows, k_min
    )


@dataclass(slots=True)
class _Bank:
    """Full-resolution texture fields shared by layers that never overlap on a pixel."""

    white: np.ndarray  # pixel grain: leaf texture on plants, soil grain elsewhere
    fine: np.ndarray  # ~1.5 px: ragged leaf margins, soil micro relief, footprint edge
    leaf: np.ndarray  # ~3.5 cm: leaf crevices on plants, clods on soil


def _bank(spec: FieldSpec, rng: np.random.Generator) -> _Bank:
    shape, gsd = spec.shape, spec.gsd
    return _Bank(
        white=_white(rng, shape),
        fine=_noise(rng, shape, max(0.012 / gsd, 1.5)),
        leaf=_noise(rng, shape, max(0.035 / gsd, 1.2)),
    )


# --------------------------------------------------------------------------------- crop


@dataclass(slots=True)
class _Crop:
    canopy: np.ndarray  # bool
    light: np.ndarray  # direct-light fraction on the leaf surface 0..1
    f: np.ndarray  # 0 at the plant edge, 1 at its top
    bright: np.ndarray  # per-plant brightness factor
    yellow: np.ndarray  # per-plant vigour colour shift
    n_plants: int


def _plant_q(
    plant_tab: np.ndarray, idx: np.ndarray, d: np.ndarray, v: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Offsets from plant ``idx`` in plant radii (across, along) and their squared norm."""
    g = np.take(plant_tab, idx, axis=0)
    ri = g[..., 2]
    a = (d - g[..., 0]) * ri
    b = (v - g[..., 1]) * ri
    return a * a + b * b, a, b


def _crop(
    spec: FieldSpec, lay: _Layout, rows: _Rows, bank: _Bank, rng: np.random.Generator
) -> _Crop:
    shape = spec.shape
    gsd = spec.gsd
    w = lay.half_width
    p = lay.pitch
    j_min = math.floor(rows.v_range[0] / p) - 3
    n_j = math.floor(rows.v_range[1] / p) + 4 - j_min
    n_k = rows.n_rows
    tab = (n_k, n_j)
    j = np.arange(j_min, j_min + n_j, dtype=np.float32)[None, :]
    vc = ((j + rng.uniform(-0.2, 0.2, tab)) * p).astype(np.float32)
    uc = np.clip(rng.normal(0.0, 0.12 * w, tab), -0.3 * w, 0.3 * w).astype(np.float32)
    vigour_row = rng.normal(1.0, 0.05, (n_k, 1))
    radius = w * rng.uniform(0.75, 1.15, tab) * vigour_row
    late = rng.random(tab) < 0.08  # late emergence: small plants
    radius = np.where(late, radius * rng.uniform(0.35, 0.7, tab), radius)
    present = rng.random(tab) >= 0.05
    # Planter skips: runs of missing plants 0.3-1.5 m long, ~1 per 30 m of row.
    n_skips = rng.poisson(n_j * p / 30.0, n_k)
    for kk in np.flatnonzero(n_skips):
        for _ in range(int(n_skips[kk])):
            start = int(rng.integers(0, n_j))
            present[kk, start : start + max(1, round(rng.uniform(0.3, 1.5) / p))] = False
    rinv = np.where(present, 1.0 / radius, 1e4).astype(np.float32)
    bright_t = np.clip(rng.normal(1.0, 0.07, tab), 0.8, 1.2).astype(np.float32)
    yellow_t = np.clip(rng.normal(0.0, 0.35, tab), -1.0, 1.0).astype(np.float32)

    # Domain warping turns the disc of each plant into an irregular, lobed leaf cluster.
    warp_px = 0.7 * w / gsd
    warp_v = _noise(rng, shape, warp_px)
    warp_u = _noise(rng, shape, warp_px)
    vigour = _noise(rng, shape, 6.0 / gsd)

    # Lambert shading of a dome; the sun vector is expressed in (across, along) row axes.
    th = math.radians(lay.angle_deg)
    sx, sy = lay.sun_xy
    cos_el, sin_el = math.cos(math.radians(lay.sun_el)), math.sin(math.radians(lay.sun_el))
    lu = np.float32((sx * math.sin(th) + sy * math.cos(th)) * cos_el)
    lv = np.float32((sx * math.cos(th) - sy * math.sin(th)) * cos_el)
    lz = np.float32(sin_el)

    canopy = np.empty(shape, bool)
    f_out = np.empty(shape, np.float32)
    light_out = np.empty(shape, np.float32)
    bright = np.empty(shape, np.float32)
    yellow = np.empty(shape, np.float32)
    # One packed table: a row gather fetches all of a plant's numbers at once.
    plant_tab = np.stack(
        [uc.ravel(), vc.ravel(), rinv.ravel(), np.zeros(uc.size, np.float32)], axis=1
    )
    colour_tab = np.stack([bright_t.ravel(), yellow_t.ravel()], axis=1)
    aw = np.float32(0.22 * w)
    inv_p = np.float32(1.0 / p)
    for sl in _blocks(shape):
        v_w = rows.v[sl] + aw * warp_v[sl]
        d_w = rows.d[sl] + aw * warp_u[sl]
        j0 = np.rint(v_w * inv_p).astype(np.int32)
        j0 -= np.int32(j_min)
        np.clip(j0, 1, n_j - 2, out=j0)
        j0 += rows.k[sl] * np.int32(n_j)
        # The nearest plant and its neighbours on both sides; plants two pitches away only
        # reach pixels that their nearer neighbours already cover.
        best_q, best_a, best_b = _plant_q(plant_tab, j0, d_w, v_w)
        best_i = j0.copy()
        for dj in (-1, 1):
            idx = j0 + np.int32(dj)
            q, a, b = _plant_q(plant_tab, idx, d_w, v_w)
            better = q < best_q
            np.copyto(best_q, q, where=better)
            np.copyto(best_a, a, where=better)
            np.copyto(best_b, b, where=better)
            np.copyto(best_i, idx, where=better)
        vig = 1.0 + 0.07 * vigour[sl]
        q = best_q / (vig * vig) * (1.0 + 0.2 * bank.fine[sl])
        canopy[sl] = q < 1.0
        f = np.clip(1.0 - q, 0.0, 1.0)
        f_out[sl] = f
        norm = np.sqrt(best_a * best_a + best_b * best_b + f) + np.float32(1e-6)
        light = (best_a * lu + best_b * lv + np.sqrt(f) * lz) / norm
        # Crevices between leaves: dark where a leaf-scale field crosses zero (a vein net).
        lf = bank.leaf[sl] * np.float32(4.0)
        light *= 1.0 - 0.45 / (1.0 + lf * lf)
        light *= 1.0 + 0.08 * bank.white[sl]
        light_out[sl] = np.clip(light, 0.0, 1.0)
        col = np.take(colour_tab, best_i, axis=0)
        bright[sl] = col[:, :, 0]
        yellow[sl] = col[:, :, 1]
    return _Crop(
        canopy=canopy,
        light=light_out,
        f=f_out,
        bright=bright,
        yellow=yellow,
        n_plants=int(present.sum()),
    )


# -------------------------------------------------------------------------------- weeds


@dataclass(slots=True)
class _Weeds:
    idx: np.ndarray  # flat indices of visible weed pixels (after crop occlusion)
    f: np.ndarray  # at idx: 0 at the leaf edge, 1 at the plant centre
    species: np.ndarray  # at idx
    bright: np.ndarray  # at idx
    n_patches: int
    n_plants: int
    n_in_row: int


def _splat(
    shape: tuple[int, int],
    bx: np.ndarray,
    by: np.ndarray,
    ca: np.ndarray,
    sa: np.ndarray,
    ia: np.ndarray,
    ib: np.ndarray,
    reach: np.ndarray,
    fine: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rasterise many small ellipses at once; the nearest (lowest ``q``) wins each pixel.

    Blades are grouped by stencil size and evaluated on ``(blades, stencil)`` arrays, so the
    cost is proportional to the blades' area, not to the image or to the number of blades.

    Returns:
        Flat pixel indices, normalised squared distance ``q < 1`` and the winning blade.
    """
    h, w = shape
    rr = np.ceil(reach).astype(np.int32)
    flats, qs, blades = [], [], []
    ff = fine.ravel()
    for r in np.unique(rr).tolist():
        oy, ox = np.mgrid[-r : r + 1, -r : r + 1].astype(np.int32)
        oy, ox = oy.ravel(), ox.ravel()
        sel = np.flatnonzero(rr == r)
        per = max(1, (1 << 21) // oy.size)
        for c in range(0, sel.size, per):
            bl = sel[c : c + per]
            cx, cy = bx[bl, None], by[bl, None]
            ix = np.rint(cx).astype(np.int32) + ox
            iy = np.rint(cy).astype(np.int32) + oy
            dx, dy = ix - cx, iy - cy
            cc, ss = ca[bl, None], sa[bl, None]
            q = ((dx * cc + dy * ss) * ia[bl, None]) ** 2
            q += ((dy * cc - dx * ss) * ib[bl, None]) ** 2
            keep = (q < 1.7) & (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h)
            flat = iy[keep] * w + ix[keep]
            qk = q[keep]
            # Ragged leaf margins from the shared fine texture.
            qk *= np.maximum(1.0 + 0.3 * ff[flat], 0.6)
            inside = qk < 1.0
            flats.append(flat[inside])
            qs.append(qk[inside])
            blades.append(np.broadcast_to(bl[:, None], keep.shape)[keep][inside])
    if not flats:
        return np.zeros(0, np.intp), np.zeros(0, np.float32), np.zeros(0, np.intp)
    flat, q, blade = np.concatenate(flats), np.concatenate(qs), np.concatenate(blades)
    order = np.lexsort((q, flat))
    flat, q, blade = flat[order], q[order], blade[order]
    first = np.ones(flat.size, bool)
    first[1:] = flat[1:] != flat[:-1]
    return flat[first].astype(np.intp), q[first], blade[first]


def _weeds(
    spec: FieldSpec,
    lay: _Layout,
    rows: _Rows,
    crop: _Crop,
    bank: _Bank,
    rng: np.random.Generator,
) -> _Weeds:
    shape = spec.shape
    h, w = shape
    gsd = spec.gsd
    sp = lay.spacing
    u_lo, u_hi = rows.u_range
    v_lo, v_hi = rows.v_range
    # Sample in the row frame's bounding box (larger than the image), then crop to the image.
    frame_area = (u_hi - u_lo) * (v_hi - v_lo)
    cu: list[np.ndarray] = []
    cv: list[np.ndarray] = []
    rad: list[np.ndarray] = []
    spc: list[np.ndarray] = []
    grp: list[np.ndarray] = []
    in_row: list[np.ndarray] = []
    n_patches = _at_least_one(rng, frame_area * 0.1 * spec.weed_density)
    patch_species = rng.choice(4, n_patches, p=[0.35, 0.2, 0.15, 0.3])
    patch_k = rng.integers(0, rows.n_rows, n_patches) + rows.k_min
    patch_u = (patch_k + 0.5) * sp + rng.normal(0.0, 0.12 * sp, n_patches)
    patch_v = rng.uniform(v_lo, v_hi, n_patches)
    patch_r = np.clip(rng.lognormal(math.log(0.22), 0.5, n_patches), 0.05, 0.5)
    if spec.weed_density > 0 and n_patches:
        # Guarantee one patch inside the image so that small fields still have weeds.
        yx = rng.uniform(0.2, 0.8, 2) * np.array([h * gsd, w * gsd])
        pu, pv = lay.uv(yx[:1].astype(np.float32), yx[1:].astype(np.float32))
        patch_u[0] = (math.floor(float(pu[0]) / sp) + 0.5) * sp
        patch_v[0] = float(pv[0])
    for i in range(n_patches):
        n = 1 + int(rng.poisson(math.pi * patch_r[i] ** 2 * rng.uniform(100, 300)))
        # Cultivation leaves weed patches stretched along the inter-row.
        cu.append(patch_u[i] + rng.normal(0.0, patch_r[i] * 0.45, n))
        cv.append(patch_v[i] + rng.normal(0.0, patch_r[i] * 0.75, n))
        rad.append(np.clip(rng.lognormal(math.log(0.045), 0.45, n), 0.01, 0.14))
        mixed = rng.random(n) < 0.15
        spc.append(np.where(mixed, rng.integers(0, 4, n), patch_species[i]))
        grp.append(np.full(n, i))
        in_row.append(np.zeros(n, bool))
    n_single = int(rng.poisson(frame_area * 0.25 * spec.weed_density))
    cu.append(rng.uniform(u_lo, u_hi, n_single))
    cv.append(rng.uniform(v_lo, v_hi, n_single))
    rad.append(np.clip(rng.lognormal(math.log(0.035), 0.6, n_single), 0.008, 0.15))
    spc.append(rng.integers(0, 4, n_single))
    grp.append(np.arange(n_patches, n_patches + n_single))
    in_row.append(np.zeros(n_single, bool))
    # A few weeds emerge inside the crop row and grow through the canopy.
    n_in = int(rng.poisson(frame_area * 0.03 * spec.weed_density))
    k_in = rng.integers(0, rows.n_rows, n_in) + rows.k_min
    cu.append(k_in * sp + rng.normal(0.0, 0.3 * lay.half_width, n_in))
    cv.append(rng.uniform(v_lo, v_hi, n_in))
    rad.append(np.clip(rng.lognormal(math.log(0.05), 0.4, n_in), 0.015, 0.15))
    spc.append(rng.integers(0, 4, n_in))
    grp.append(np.arange(n_patches + n_single, n_patches + n_single + n_in))
    in_row.append(np.ones(n_in, bool))

    px, py = lay.xy_px(np.concatenate(cu), np.concatenate(cv), gsd)
    p_rad, p_sp = np.concatenate(rad), np.concatenate(spc).astype(np.int8)
    p_grp, p_in = np.concatenate(grp), np.concatenate(in_row)
    margin = p_rad / gsd * 2.0
    keep = (px > -margin) & (px < w + margin) & (py > -margin) & (py < h + margin)
    px, py, p_rad, p_sp, p_grp, p_in = (a[keep] for a in (px, py, p_rad, p_sp, p_grp, p_in))
    n_plants = int(keep.sum())
    p_bright = np.clip(rng.normal(1.0, 0.1, n_plants), 0.75, 1.3).astype(np.float32)

    # Leaves: grasses have 3-6 narrow blades at random angles, broadleaves 3-5 broad leaves
    # spread evenly around the stem (a rosette), all radiating from the plant centre.
    grass_p = p_sp == _WEED_GRASS
    n_blades = np.where(grass_p, rng.integers(3, 7, n_plants), rng.integers(3, 6, n_plants))
    owner = np.repeat(np.arange(n_plants), n_blades)
    n_b = owner.size
    nth = np.arange(n_b) - np.repeat(np.cumsum(n_blades) - n_blades, n_blades)
    even = rng.uniform(0, 2 * math.pi, n_plants)[owner] + 2 * math.pi * nth / n_blades[owner]
    grass = grass_p[owner]
    ori = np.where(grass, rng.uniform(0, 2 * math.pi, n_b), even + rng.normal(0, 0.25, n_b))
    r_px = p_rad[owner] / gsd
    semi_a = r_px * np.where(grass, 0.55, rng.uniform(0.45, 0.6, n_b))
    semi_b = r_px * np.where(grass, rng.uniform(0.12, 0.2, n_b), rng.uniform(0.28, 0.4, n_b))
    # Sub-pixel leaves still darken a pixel at drone GSDs; at coarser GSDs they fade out.
    min_px = min(1.0, 0.05 / gsd)
    semi_a, semi_b = np.maximum(semi_a, 0.6 * min_px), np.maximum(semi_b, 0.45 * min_px)
    off = semi_a * np.where(grass, 0.9, 0.8)
    bx = (px[owner] + off * np.cos(ori)).astype(np.float32)
    by = (py[owner] + off * np.sin(ori)).astype(np.float32)
    ca, sa = np.cos(ori).astype(np.float32), np.sin(ori).astype(np.float32)
    ia, ib = (1.0 / semi_a).astype(np.float32), (1.0 / semi_b).astype(np.float32)
    reach = np.maximum(semi_a, semi_b) * 1.3 + 1.0
    idx, q, blade = _splat(shape, bx, by, ca, sa, ia, ib, reach, bank.fine)
    plant = owner[blade]
    # Weeds germinate under the crop and are hidden by it, except those inside the row,
    # which push through the canopy gaps and are what an annotator sees there.
    seen = ~crop.canopy.ravel()[idx] | p_in[plant]
    idx, plant = idx[seen], plant[seen]
    return _Weeds(
        idx=idx,
        f=np.clip(1.0 - q[seen], 0.0, 1.0),
        species=p_sp[plant],
        bright=p_bright[plant],
        n_patches=int(np.unique(p_grp[p_grp < n_patches]).size),
        n_plants=n_plants,
        n_in_row=int(p_in.sum()),
    )


# ------------------------------------------------------------------------------ disease


def _disease(
    spec: FieldSpec, lay: _Layout, rng: np.random.Generator
) -> tuple[np.ndarray, list[tuple[float, float, float]]]:
    """Severity 0..1 per pixel (meaningful on crop canopy) and the patches (x, y, r) in px."""
    shape = spec.shape
    h, w = shape
    gsd = spec.gsd
    sev = np.zeros(shape, np.float32)
    # Patch centres lie on rows inside the image, so a small field still shows disease.
    n = _at_least_one(rng, h * w * gsd * gsd * 0.012 * spec.disease_density)
    u, v = lay.uv(rng.uniform(0, h * gsd, n), rng.uniform(0, w * gsd, n))
    u = np.round(u / lay.spacing) * lay.spacing
    px, py = lay.xy_px(u, v, gsd)
    # Radius 0.2-1.5 m, but a small field is not swallowed by one patch.
    r_hi = max(0.2, min(1.5, 0.2 * min(h, w) * gsd))
    radius = np.exp(rng.uniform(math.log(min(0.2, r_hi) * 0.999), math.log(r_hi), n)) / gsd
    peak = rng.uniform(0.55, 1.0, n)
    patches = []
    for i in range(n):
        reach = radius[i] * 1.6
        x0, x1 = max(0, int(px[i] - reach)), min(w, int(px[i] + reach) + 1)
        y0, y1 = max(0, int(py[i] - reach)), min(h, int(py[i] + reach) + 1)
        if x0 >= x1 or y0 >= y1:
            continue
        box = (y1 - y0, x1 - x0)
        yy = (np.arange(y0, y1, dtype=np.float32)[:, None] - py[i]) / radius[i]
        xx = (np.arange(x0, x1, dtype=np.float32)[None, :] - px[i]) / radius[i]
        rho2 = (xx * xx + yy * yy) * (1.0 + 0.35 * _noise(rng, box, 0.25 / gsd)) ** 2
        s_i = np.float32(peak[i]) * np.clip(1.0 - rho2, 0.0, 1.0) ** 0.6
        # Lesions spread leaf by leaf: mottled severity.
        s_i *= np.clip(0.85 + 0.3 * _noise(rng, box, 0.03 / gsd), 0.0, 1.4)
        np.maximum(sev[y0:y1, x0:x1], np.clip(s_i, 0.0, 1.0), out=sev[y0:y1, x0:x1])
        patches.append((float(px[i]), float(py[i]), float(radius[i])))
    return sev, patches


# --------------------------------------------------------------------------------- soil


@dataclass(slots=True)
class _Soil:
    bright: np.ndarray  # brightness factor (texture, clods, tracks, moisture)
    hue: np.ndarray  # towards another soil colour
    stone_idx: np.ndarray
    stone_w: np.ndarray
    residue_idx: np.ndarray
    residue_w: np.ndarray
    info: dict[str, object]


def _soil(
    spec: FieldSpec, lay: _Layout, rows: _Rows, bank: _Bank, rng: np.random.Generator
) -> _Soil:
    shape = spec.shape
    h, w = shape
    gsd = spec.gsd
    area = h * w * gsd * gsd
    sx, sy = lay.sun_xy
    # Everything smooth is summed on one coarse grid and upsampled once.
    step = max(1, round(0.04 / gsd))
    big = 1.0 + 0.07 * _noise_on(rng, shape, 3.0 / gsd, step)
    big += 0.05 * _noise_on(rng, shape, 0.5 / gsd, step)
    big += 0.05 * _noise_on(rng, shape, max(0.08 / gsd, 2 * step), step)
    # Moisture: darker streaks along the rows and in low spots.
    ly = _low_coords(h, step).astype(np.float32)[:, None] * np.float32(gsd)
    lx = _low_coords(w, step).astype(np.float32)[None, :] * np.float32(gsd)
    lu, _ = lay.uv(ly, lx)
    moist = 0.55 * _noise_1d(rng, lu, float(lu.min()), float(lu.max()), 0.5)
    moist += 0.7 * _noise_on(rng, shape, 4.0 / gsd, step)
    big *= 1.0 - 0.35 * np.clip((moist - 0.5) * 0.6, 0.0, 1.0)
    bright = _upsample(big, shape, step)
    hue = _noise(rng, shape, 5.0 / gsd)
    del big, moist, lu

    # Wheel tracks of the sprayer: pairs of compacted, darker, smoother strips every
    # 18-36 m, centred between rows.
    period_rows = max(2, round(rng.uniform(18.0, 36.0) / lay.spacing))
    period = period_rows * lay.spacing
    gauge = round(rng.uniform(1.5, 2.0) / lay.spacing) * lay.spacing / 2.0
    offset = (rng.integers(0, period_rows) + 0.5) * lay.spacing
    half_w = np.float32(rng.uniform(0.17, 0.23))
    till_scale = max(0.03, 2 * gsd)
    till_lo, till_hi = rows.u_range
    till = _noise_1d(rng, rows.u, till_lo - 0.2, till_hi + 0.2, till_scale)
    relief_sd = 1.0
    for sl in _blocks(shape):
        hgt = bank.leaf[sl] + 0.5 * bank.fine[sl]
        gy, gx = np.gradient(hgt)
        relief = gx * np.float32(sx) + gy * np.float32(sy)
        if sl.start == 0:
            # Normalise by the first block so the clod contrast does not depend on GSD.
            relief_sd = max(float(relief.std()), 1e-6)
        m = np.mod(rows.u[sl] - np.float32(offset), np.float32(period))
        m -= np.float32(period / 2)
        dist = np.minimum(np.abs(m - np.float32(gauge)), np.abs(m + np.float32(gauge)))
        dist *= 1.0 / half_w
        dist *= dist
        track = np.clip(1.0 - dist * dist, 0.0, 1.0)
        relief *= np.float32(0.10 / relief_sd)
        relief *= 1.0 - 0.7 * track
        b = bright[sl]
        b *= 1.0 + relief
        b *= 1.0 - 0.24 * track
        # Planter furrows and tillage marks run with the rows; pixel grain on top.
        b *= 1.0 + 0.035 * till[sl] + 0.03 * bank.white[sl]
    del till

    n_stone = int(rng.poisson(area * 3.0))
    r_stone = np.clip(rng.lognormal(math.log(0.012), 0.5, n_stone), 0.004, 0.04) / gsd
    stone = _specks(rng, shape, n_stone, np.maximum(r_stone, 0.5),
                    np.maximum(r_stone * rng.uniform(0.6, 1.0, n_stone), 0.5))
    n_res = int(rng.poisson(area * 2.0))
    l_res = rng.uniform(0.02, 0.08, n_res) / gsd
    residue = _specks(rng, shape, n_res, np.maximum(l_res, 0.6), np.full(n_res, 0.5))
    info: dict[str, object] = {
        "tramline_period_m": round(period, 3),
        "wheel_gauge_m": round(2 * gauge, 3),
    }
    return _Soil(bright, hue, *stone, *residue, info)


# ------------------------------------------------------------------------------ footprint


def _footprint(spec: FieldSpec, bank: _Bank, rng: np.random.Generator) -> np.ndarray:
    """Valid mask of an orthomosaic footprint: a ragged polygon with flight-line steps."""
    shape = spec.shape
    h, w = shape
    target = float(rng.uniform(0.06, 0.14))
    if not spec.nodata_border:
        return np.ones(shape, bool)
    step = max(1, round(max(h, w) / 384.0))
    lh, lw = _low_shape(shape, step)
    ys = (_low_coords(h, step) - h / 2.0)[:, None]
    xs = (_low_coords(w, step) - w / 2.0)[None, :]
    n_edges = int(rng.integers(5, 9))
    beta = rng.uniform(0, 2 * math.pi)
    big = float(max(h, w))
    d = np.full((lh, lw), np.inf)
    for i in range(n_edges):
        phi = beta + 2 * math.pi * (i + rng.uniform(-0.25, 0.25)) / n_edges
        nx, ny = math.cos(phi), math.sin(phi)
        support = abs(nx) * w / 2 + abs(ny) * h / 2
        di = support * rng.uniform(0.8, 1.0) - (xs * nx + ys * ny)
        # Image footprints along each flight line end at different distances: steps.
        t = ys * nx - xs * ny
        step_len = rng.uniform(0.08, 0.2) * big
        table = rng.normal(0.0, 0.012 * big, int(4 * big / step_len) + 4)
        di = di + table[((t + 2 * big) / step_len).astype(np.intp)]
        d = np.minimum(d, di)
    d = d.astype(np.float32)
    d += np.float32(0.006 * big) * _noise(rng, (lh, lw), 6.0)
    # The threshold sets the nodata share exactly (on the coarse grid).
    tau = float(np.quantile(d, target))
    full = _upsample(d, shape, step)
    full += np.float32(1.2) * bank.fine
    return full > tau


# ------------------------------------------------------------------------------ compose


def _illumination(spec: FieldSpec, rng: np.random.Generator) -> np.ndarray:
    """Gentle gradient, slow brightness drift and orthomosaic seam exposure steps."""
    shape = spec.shape
    h, w = shape
    gsd = spec.gsd
    step = max(1, round(max(h, w) / 256.0), round(1.0 / gsd))
    ly = _low_coords(h, step)[:, None] / h - 0.5
    lx = _low_coords(w, step)[None, :] / w - 0.5
    gx, gy = rng.uniform(-0.06, 0.06, 2)
    low = 1.0 + gx * lx + gy * ly
    low = low + 0.02 * _noise_on(rng, shape, max(8.0 / gsd, 2 * step), step)
    n_cells = 2 + int(h * w * gsd * gsd / 600.0)
    cy, cx = rng.uniform(-0.5, 0.5, n_cells), rng.uniform(-0.5, 0.5, n_cells)
    gain = rng.normal(0.0, 0.02, n_cells)
    cell = ((ly[..., None] - cy) ** 2 + (lx[..., None] - cx) ** 2).argmin(axis=2)
    return _upsample((low + gain[cell]).astype(np.float32), shape, step)


def _shadows(
    spec: FieldSpec, lay: _Layout, crop: _Crop, weeds: _Weeds
) -> np.ndarray:
    """Soft cast-shadow strength 0..1 on the ground."""
    shape = spec.shape
    heights = np.where(crop.canopy, np.sqrt(crop.f), np.float32(0.0))
    heights *= np.float32(lay.canopy_height)
    heights.ravel()[weeds.idx] = np.maximum(heights.ravel()[weeds.idx], 0.06 * weeds.f)
    sx, sy = lay.sun_xy
    reach = lay.canopy_height / math.tan(math.radians(lay.sun_el)) / spec.gsd
    shadow = np.zeros(shape, bool)
    # A ground pixel is shaded when vegetation towards the sun is taller than the ray.
    for frac in (0.25, 0.5, 0.75, 1.0):
        dy, dx = -round(sy * reach * frac), -round(sx * reach * frac)
        if dx == 0 and dy == 0:
            continue
        shadow |= _shift(heights > np.float32(frac * lay.canopy_height), dy, dx)
    soft = _blur(shadow.astype(np.float32), 0.8)
    soft[crop.canopy] = 0.0
    return soft


def _compose(
    spec: FieldSpec,
    lay: _Layout,
    crop: _Crop,
    weeds: _Weeds,
    soil: _Soil,
    dis_idx: np.ndarray,
    dis_sev: np.ndarray,
    shadow: np.ndarray,
    illum: np.ndarray,
    grain: np.ndarray,
) -> np.ndarray:
    """Surface reflectance ``(bands, H, W)`` after illumination and optical blur."""
    shape = spec.shape
    n_bands = 5 if spec.multispectral else 3
    mix = lay.soil_mix
    soil_base = (mix[:, None] * _SOILS).sum(axis=0)
    # Hue drifts across the field towards the least represented soil.
    soil_hue = 0.25 * (_SOILS[int(np.argmin(mix))] - soil_base)
    refl = np.empty((n_bands, *shape), np.float32)
    amb_v = np.float32(_VEG_AMBIENT)
    for sl in _blocks(shape):
        vshade = amb_v + (1 - amb_v) * crop.light[sl]
        crop_base = crop.bright[sl]
        sb = soil.bright[sl]
        hue = soil.hue[sl]
        sh = shadow[sl]
        for b in range(n_bands):
            soil_b = hue * soil_hue[b]
            soil_b += soil_base[b]
            soil_b *= sb
            soil_b *= 1.0 - sh * (1.0 - _AMBIENT[b])
            crop_b = crop.yellow[sl] * _CROP_YELLOW[b]
            crop_b += _CROP[b]
            crop_b *= crop_base
            power = _VEG_SHADE_POWER[b]
            crop_b *= vshade if power == 1.0 else vshade**power
            out = np.where(crop.canopy[sl], crop_b, soil_b)
            out *= illum[sl]
            refl[b, sl] = out

    sh_flat, il_flat, grain_flat = shadow.ravel(), illum.ravel(), grain.ravel()
    canopy_flat = crop.canopy.ravel()
    light_flat = crop.light.ravel()
    for idx, cover, spectrum in (
        (soil.stone_idx, soil.stone_w, _STONE),
        (soil.residue_idx, soil.residue_w, _RESIDUE),
    ):
        # Specks only show on bare soil.
        keep = ~canopy_flat[idx]
        idx, cover = idx[keep], cover[keep]
        for b in range(n_bands):
            cur = refl[b].ravel()[idx]
            target = spectrum[b] * (1.0 - sh_flat[idx] * (1.0 - _AMBIENT[b])) * il_flat[idx]
            refl[b].ravel()[idx] = cur + cover * (target - cur)

    if dis_idx.size:
        chl = np.clip(dis_sev / 0.6, 0.0, 1.0)
        nec = np.clip((dis_sev - 0.6) / 0.4, 0.0, 1.0)
        vs = amb_v + (1 - amb_v) * light_flat[dis_idx]
        yel, cb = crop.yellow.ravel()[dis_idx], crop.bright.ravel()[dis_idx]
        for b in range(n_bands):
            val = (_CROP[b] + yel * _CROP_YELLOW[b]) * cb
            val += chl * (_CHLOROTIC[b] - val)
            val += nec * (_NECROTIC[b] - val)
            refl[b].ravel()[dis_idx] = val * vs ** _VEG_SHADE_POWER[b] * il_flat[dis_idx]

    if weeds.idx.size:
        wi = weeds.idx
        ws = amb_v + (1 - amb_v) * (0.3 + 0.7 * np.sqrt(weeds.f))
        ws *= 1.0 + 0.08 * grain_flat[wi]
        # Weeds between the rows sit partly in the crop's shadow.
        wsh = 0.6 * sh_flat[wi]
        for b in range(n_bands):
            val = _WEED_SPECTRA[weeds.species, b] * weeds.bright
            val *= ws ** _VEG_SHADE_POWER[b] * (1.0 - wsh * (1.0 - _AMBIENT[b]))
            refl[b].ravel()[wi] = val * il_flat[wi]

    # Optics and orthorectification resampling soften edges (mixed pixels).
    for b in range(n_bands):
        refl[b] = _blur(refl[b], 0.55)
    return refl


def make_field(spec: FieldSpec) -> SynthField:
    """Synthesise a field image and its ground truth (see the module docstring).

    Args:
        spec: what to make.

    Returns:
        The image, truth, validity, grid, band roles and scene facts.
    """
    t0 = time.perf_counter()
    shape = spec.shape
    h, w = shape
    gsd = spec.gsd
    seed = spec.seed
    lay = _layout(spec)
    bank = _bank(spec, _rng(seed, _S_TEXTURE))
    rows = _row_coords(spec, lay, _rng(seed, _S_ROWS))
    crop = _crop(spec, lay, rows, bank, _rng(seed, _S_CROP))
    weeds = _weeds(spec, lay, rows, crop, bank, _rng(seed, _S_WEED))
    sev, patches = _disease(spec, lay, _rng(seed, _S_DISEASE))
    soil = _soil(spec, lay, rows, bank, _rng(seed, _S_SOIL))
    del rows
    valid = _footprint(spec, bank, _rng(seed, _S_BORDER))
    grain = bank.white
    del bank
    illum = _illumination(spec, _rng(seed, _S_LIGHT))

    crop_vis = crop.canopy.copy()
    crop_vis.ravel()[weeds.idx] = False
    dis_idx = np.flatnonzero(sev)
    dis_idx = dis_idx[crop_vis.ravel()[dis_idx]]
    dis_sev = sev.ravel()[dis_idx]
    del sev
    truth = crop_vis.astype(np.uint8)  # SOIL 0 / CROP 1
    assert (SOIL, CROP) == (0, 1)
    truth.ravel()[weeds.idx] = WEED
    # Mild yellowing stays crop, as an annotator would leave it; clear symptoms are disease.
    truth.ravel()[dis_idx[dis_sev > 0.3]] = DISEASE
    truth[~valid] = NODATA_CLASS
    del crop_vis

    shadow = _shadows(spec, lay, crop, weeds)
    refl = _compose(spec, lay, crop, weeds, soil, dis_idx, dis_sev, shadow, illum, grain)
    n_plants, soil_info = crop.n_plants, soil.info
    del shadow, illum, crop, soil

    sensor = _rng(seed, _S_SENSOR)
    invalid = ~valid
    # Sensor noise reuses the grain field mirrored or shifted (white noise either way, and
    # uncorrelated with the texture it made), which saves a random draw per band.
    noise = (
        grain[::-1],
        grain[:, ::-1],
        grain[::-1, ::-1],
        np.roll(grain[::-1], (h // 3, w // 3), axis=(0, 1)),
        np.roll(grain[:, ::-1], (h // 5, w // 2), axis=(0, 1)),
    )
    if spec.multispectral:
        # Calibration is never perfect: a per-band gain error of a few percent.
        gain = np.asarray(sensor.normal(1.0, 0.02, refl.shape[0]), np.float32)
        image = np.empty(refl.shape, np.uint16)
        for b in range(refl.shape[0]):
            band = refl[b] * np.float32(gain[b] * 10000.0)
            band += noise[b] * np.float32(30.0)
            np.clip(band, 1, 65535, out=band)
            band[invalid] = 0
            image[b] = np.rint(band)
        roles = ROLES_MS
    else:
        lin = refl
        lin *= np.float32(lay.exposure)
        # Consumer cameras boost saturation a little.
        luma = lin.mean(axis=0)
        luma *= np.float32(-0.12)
        image = np.empty(refl.shape, np.uint8)
        for b in range(refl.shape[0]):
            band = lin[b] * np.float32(1.12)
            band += luma
            np.clip(band, 0.0, 1.0, out=band)
            # A square-root tone curve, close to the sRGB response of consumer cameras.
            dn = np.sqrt(band, out=band)
            dn *= np.float32(255.0)
            dn += noise[b] * (0.6 + 0.01 * dn)
            np.clip(dn, 0.0, 255.0, out=dn)
            dn[invalid] = 0
            image[b] = np.rint(dn)
        roles = ROLES_RGB
    del refl, grain, noise

    x0, y0 = spec.origin_xy
    grid = Grid(shape, Affine(gsd, 0.0, x0, 0.0, -gsd, y0), CRS.from_user_input(spec.crs))
    n_valid = max(1, int(valid.sum()))
    counts = np.bincount(truth.ravel(), minlength=256)
    transform = grid.transform
    info: dict[str, object] = {
        "row_angle_deg": round(lay.angle_deg, 4),
        "row_angle_convention": "direction of the rows, degrees counter-clockwise from east",
        "row_spacing_m": round(lay.spacing, 4),
        "canopy_width_m": round(2 * lay.half_width, 4),
        "plant_pitch_m": round(lay.pitch, 4),
        "canopy_height_m": round(lay.canopy_height, 3),
        "n_plants": n_plants,
        "n_weed_patches": weeds.n_patches,
        "n_weed_plants": weeds.n_plants,
        "n_in_row_weeds": weeds.n_in_row,
        "n_disease_patches": len(patches),
        "disease_patches_xy_r": [
            [
                round(transform.c + (x + 0.5) * gsd, 3),
                round(transform.f - (y + 0.5) * gsd, 3),
                round(r * gsd, 3),
            ]
            for x, y, r in patches
        ],
        "sun_azimuth_deg": round(lay.sun_az, 2),
        "sun_elevation_deg": round(lay.sun_el, 2),
        "nodata_fraction": round(1.0 - n_valid / (h * w), 4),
        "class_fractions": {
            c.name: round(int(counts[c.value]) / n_valid, 5) for c in DEFAULT_CLASSES.classes
        },
        **soil_info,
    }
    info["build_s"] = round(time.perf_counter() - t0, 3)
    log.debug("synthetic field %dx%d seed %d built in %.2f s", h, w, seed, info["build_s"])
    return SynthField(image, truth, valid, grid, roles, info)


# -------------------------------------------------------------------------------- write


def write_field(
    spec: FieldSpec, image_path: str | os.PathLike[str], truth_path: str | os.PathLike[str]
) -> SynthField:
    """Synthesise a field and write it and its truth as tiled DEFLATE GeoTIFFs.

    RGB fields become 4-band uint8 R, G, B, alpha (alpha 0 outside the footprint);
    multispectral ones 5-band uint16 reflectance x 10000 with nodata 0 and band
    descriptions. The truth is 1-band uint8 with nodata 255 and a colour table. Both files
    are written under temporary names and renamed at the end, so a crash never leaves a
    half-written raster under the final name.

    Args:
        spec: what to make.
        image_path: output image GeoTIFF.
        truth_path: output truth GeoTIFF.

    Returns:
        The field that was written.

    Raises:
        OutputError: a file cannot be written.
    """
    import rasterio
    from rasterio.enums import ColorInterp
    from rasterio.errors import RasterioError

    image_path, truth_path = Path(image_path), Path(truth_path)
    if image_path.resolve() == truth_path.resolve():
        raise OutputError(f"{image_path}: the image and its truth need two different files")
    for p in (image_path, truth_path):
        if p.suffix.lower() not in (".tif", ".tiff"):
            raise OutputError(f"{p}: synthetic fields are written as GeoTIFF; name it .tif")
        if not p.parent.is_dir():
            raise OutputError(f"{p}: folder {p.parent} does not exist; create it first")
    field = make_field(spec)
    h, w = spec.shape
    common = {
        "driver": "GTiff",
        "width": w,
        "height": h,
        "crs": field.grid.crs,
        "transform": field.grid.transform,
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
        "compress": "deflate",
    }
    tmp_img = image_path.with_name(f".{image_path.name}.{os.getpid()}.partial")
    tmp_truth = truth_path.with_name(f".{truth_path.name}.{os.getpid()}.partial")
    try:
        if spec.multispectral:
            profile = {**common, "count": 5, "dtype": "uint16", "nodata": 0, "predictor": 2}
            with rasterio.open(tmp_img, "w", **profile) as dst:
                dst.write(field.image)
                for i, role in enumerate(field.roles, start=1):
                    dst.set_band_description(i, role)
        else:
            profile = {
                **common, "count": 4, "dtype": "uint8", "photometric": "RGB", "alpha": "YES"
            }
            with rasterio.open(tmp_img, "w", **profile) as dst:
                dst.write(field.image, [1, 2, 3])
                dst.write(np.where(field.valid, 255, 0).astype(np.uint8), 4)
                dst.colorinterp = [
                    ColorInterp.red, ColorInterp.green, ColorInterp.blue, ColorInterp.alpha
                ]
        profile = {**common, "count": 1, "dtype": "uint8", "nodata": NODATA_CLASS}
        with rasterio.open(tmp_truth, "w", **profile) as dst:
            # The colour table must precede the pixels: GDAL cannot switch the TIFF to
            # palette photometric once data is written.
            dst.write_colormap(1, DEFAULT_CLASSES.colormap())
            dst.write(field.truth, 1)
            dst.set_band_description(1, "class")
            dst.update_tags(1, **{f"class_{c.value}": c.name for c in DEFAULT_CLASSES.classes})
        os.replace(tmp_img, image_path)
        os.replace(tmp_truth, truth_path)
    except (OSError, RasterioError) as exc:
        raise OutputError(
            f"cannot write synthetic field to {image_path} / {truth_path}: {exc}"
        ) from exc
    finally:
        for tmp in (tmp_img, tmp_truth):
            tmp.unlink(missing_ok=True)
    log.debug(
        "wrote synthetic field %s (%dx%d, %s) and truth %s",
        image_path, h, w, "multispectral" if spec.multispectral else "RGB", truth_path,
    )
    return field
