"""Crop-row geometry: find row angle and spacing once, then score row membership per pixel.

Two halves:

* :func:`estimate_rows` runs once per survey on a few full-resolution sample windows of the
  vegetation mask: the averaged 2D power spectrum (phase-free, so windows anywhere in the field
  add up) has its strongest peak in the band of plausible row spacings at the row frequency;
  the peak is then refined on a fine angle x spacing grid with the Fourier coefficient of the
  vegetation pixels' projection on the row normal (a projection-profile periodogram).
* :func:`along_row_support` runs on every tile: the share of vegetation on a digital line
  segment through each pixel in the row direction. The digital line is defined in absolute
  raster coordinates (each column shifted by ``round(tan(angle) * absolute_col)``) and summed
  with integer cumulative sums, so a tile computes bit-for-bit what a whole-raster run
  computes for the same pixel: tiled output equals untiled output.

A survey across fields whose rows run in different directions carries a
:class:`RowOrientations`; :func:`oriented_support` then gives each pixel the support in its
own field's direction (:func:`row_regularity` tells a real second direction from a secondary
peak of the main rows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from agriseg.models.filters import max_filter, transposed


@dataclass(frozen=True, slots=True)
class RowEstimate:
    """Row geometry found on the sample windows.

    Attributes:
        angle_deg: row direction, degrees counter-clockwise from the raster's +x (east) axis
            as seen on a north-up map, in ``(-90, 90]``.
        spacing_m: distance between row centre lines in metres.
        contrast: spectral peak power over the median power of the spacing band; high for
            regular rows, about 1-10 for no rows.
        width_m: width of the vegetated part of a row (half-maximum of the cross-row profile).
    """

    angle_deg: float
    spacing_m: float
    contrast: float
    width_m: float


def _image_angle(angle_deg: float) -> float:
    """Map angle (counter-clockwise, y up) to image angle (y down), radians."""
    return -math.radians(angle_deg)


def _fold_angle(deg: float) -> float:
    """Fold a line direction into ``(-90, 90]``."""
    deg = (deg + 90.0) % 180.0 - 90.0
    return 90.0 if deg == -90.0 else deg


def estimate_rows(
    masks: list[np.ndarray],
    gsd_m: float,
    min_spacing_m: float,
    max_spacing_m: float,
) -> RowEstimate | None:
    """Estimate row angle and spacing from vegetation masks of sample windows.

    Args:
        masks: 2D boolean or 0/1 vegetation masks (equal shapes), at ``gsd_m``.
        gsd_m: their pixel size in metres.
        min_spacing_m: smallest plausible row spacing.
        max_spacing_m: largest plausible row spacing.

    Returns:
        The estimate, or ``None`` when no spacing in the band is resolvable (fewer than 4
        pixels per row period, or a window shorter than 3 periods).
    """
    if not masks:
        return None
    n_y, n_x = masks[0].shape
    lo = max(min_spacing_m, 4 * gsd_m)
    hi = min(max_spacing_m, min(n_y, n_x) * gsd_m / 3)
    if lo >= hi:
        return None
    # Hann taper: the window edges would otherwise put a cross of leakage through the spectrum.
    taper = np.outer(np.hanning(n_y), np.hanning(n_x)).astype(np.float32)
    power = np.zeros((n_y, n_x), np.float64)
    for m in masks:
        a = m.astype(np.float32)
        a -= a.mean()
        power += np.abs(np.fft.fft2(a * taper)) ** 2
    fy = np.fft.fftfreq(n_y)[:, None] / gsd_m  # cycles per metre
    fx = np.fft.fftfreq(n_x)[None, :] / gsd_m
    radius = np.hypot(fy, fx)
    band = (radius >= 1 / hi) & (radius <= 1 / lo) & (fx >= 0)
    if not band.any():
        return None
    banded = np.where(band, power, 0.0)
    if banded.max() <= 0:  # uniform masks (all plant or all soil): no pattern at all
        return RowEstimate(0.0, 0.0, 0.0, 0.0)
    iy, ix = np.unravel_index(int(np.argmax(banded)), power.shape)
    median = float(np.median(power[band]))
    contrast = float(power[iy, ix] / median) if median > 0 else 0.0
    f_y, f_x = float(fy[iy, 0]), float(fx[0, ix])
    # Image coordinates have y down; the normal of the rows points along (f_x, f_y).
    normal_img = math.atan2(f_y, f_x)
    spacing = 1.0 / math.hypot(f_y, f_x)
    normal_img, spacing, width = _refine(masks, gsd_m, normal_img, spacing)
    row_img = normal_img + math.pi / 2
    angle = _fold_angle(-math.degrees(row_img))
    return RowEstimate(angle, spacing, contrast, width)


def _refine(
    masks: list[np.ndarray], gsd_m: float, normal: float, spacing: float
) -> tuple[float, float, float]:
    """Refine normal angle and spacing by maximising the projection-profile periodogram."""
    rng = np.random.default_rng(0)
    pts = []
    for k, m in enumerate(masks):
        yy, xx = np.nonzero(m)
        if yy.size > 3000:
            keep = rng.choice(yy.size, 3000, replace=False)
            yy, xx = yy[keep], xx[keep]
        pts.append((yy.astype(np.float64) * gsd_m, xx.astype(np.float64) * gsd_m, k))
    if not any(p[0].size for p in pts):
        return normal, spacing, 0.0
    size = min(masks[0].shape) * gsd_m
    # Search +-1.5 FFT bins in angle and frequency, 21 x 21 grid.
    d_ang = 1.5 * spacing / size
    d_frq = 1.5 / size
    angles = normal + np.linspace(-d_ang, d_ang, 21)
    freqs = 1 / spacing + np.linspace(-d_frq, d_frq, 21)
    freqs = freqs[freqs > 0]
    best = (-1.0, normal, spacing)
    d_f = freqs[1] - freqs[0] if freqs.size > 1 else 0.0
    for a in angles:
        ca, sa = math.cos(a), math.sin(a)
        score: np.ndarray = np.zeros(freqs.size)
        for py, px, _ in pts:
            proj = px * ca + py * sa
            # The frequencies are evenly spaced, so each point's phasor at the next one is
            # the last times a fixed step: two complex exponentials per point, not 21.
            ph = np.exp(-2j * np.pi * freqs[0] * proj)
            step = np.exp(-2j * np.pi * d_f * proj)
            for j in range(freqs.size):
                score[j] += abs(ph.sum()) ** 2
                ph *= step
        j = int(np.argmax(score))
        if score[j] > best[0]:
            best = (float(score[j]), float(a), float(1 / freqs[j]))
    _, normal, spacing = best
    return normal, spacing, _row_width(pts, normal, spacing, masks)


def _row_width(
    pts: list[tuple[np.ndarray, np.ndarray, int]],
    normal: float,
    spacing: float,
    masks: list[np.ndarray],
) -> float:
    """Vegetated width of a row: half-maximum width of the phase-aligned cross-row profile."""
    bins = 32
    profile = np.zeros(bins)
    ca, sa = math.cos(normal), math.sin(normal)
    for yy, xx, k in pts:
        if yy.size == 0:
            continue
        proj = (xx * ca + yy * sa) / spacing
        phase = np.angle(np.exp(2j * np.pi * proj).sum()) / (2 * np.pi)
        idx = np.floor(((proj - phase) % 1.0) * bins).astype(int) % bins
        hist = np.bincount(idx, minlength=bins).astype(np.float64)
        profile += hist / max(masks[k].size, 1)
    if profile.max() <= 0:
        return 0.0
    half = profile.min() + (profile.max() - profile.min()) / 2
    return float((profile >= half).sum() / bins * spacing)


def row_regularity(mask: np.ndarray, gsd_m: float, angle_deg: float, spacing_m: float) -> float:
    """How strongly ``mask``'s vegetation follows rows at ``angle_deg`` and ``spacing_m``.

    The magnitude of the first Fourier coefficient of the vegetation pixels' positions across
    the rows (a projection-profile periodogram at one frequency), per pixel: about 0.4-0.6 for
    narrow regular rows, lower for wide canopies, near 0 for rows in another direction or no
    rows. The best value within +-2 degrees and +-3 % spacing is taken, so that a slightly
    different estimate of the same rows still scores.

    Args:
        mask: 2D boolean vegetation mask at ``gsd_m``.
        gsd_m: its pixel size in metres.
        angle_deg: row direction (see :class:`RowEstimate`).
        spacing_m: row spacing in metres.
    """
    yy, xx = np.nonzero(mask)
    if yy.size < 50 or spacing_m <= 0:
        return 0.0
    if yy.size > 20000:
        keep = np.random.default_rng(0).choice(yy.size, 20000, replace=False)
        yy, xx = yy[keep], xx[keep]
    y, x = yy * gsd_m, xx * gsd_m
    normal = _image_angle(angle_deg) + math.pi / 2
    best = 0.0
    for a in normal + np.radians(np.linspace(-2.0, 2.0, 9)):
        proj = x * math.cos(a) + y * math.sin(a)
        for sp in spacing_m * np.linspace(0.97, 1.03, 7):
            best = max(best, float(abs(np.exp(-2j * np.pi / sp * proj).sum())) / yy.size)
    return best


def angle_difference(a_deg: float, b_deg: float) -> float:
    """Smallest angle between two line directions, degrees (0..90)."""
    d = abs(a_deg - b_deg) % 180.0
    return min(d, 180.0 - d)


def major_axis_steps(angle_deg: float, length_px: float) -> int:
    """Steps along the major axis that cover ``length_px`` along a line at ``angle_deg``."""
    a = _image_angle(angle_deg)
    return max(1, round(length_px * max(abs(math.cos(a)), abs(math.sin(a)))))


def support_reach(half_length_px: int) -> int:
    """Pixels :func:`along_row_support` reaches from its centre, in x and in y."""
    return half_length_px + 1


def along_row_support(
    veg: np.ndarray,
    valid: np.ndarray,
    row_off: int,
    col_off: int,
    angle_deg: float,
    half_length_px: int,
    edge_aware: bool = False,
) -> np.ndarray:
    """Share of vegetation along the row direction through every pixel.

    For each pixel, the vegetation share of the valid pixels on the digital row line through it,
    ``half_length_px`` steps to either side. On a crop row it is the row's fill (about 1 for
    closed rows, still 1/2 at a row's end); for a plant between rows it is its length over the
    segment's.

    With ``edge_aware``, a line that runs into invalid pixels (nodata, or beyond the raster)
    on one side takes the larger of that share and the share on that side alone: the row may
    go on where nothing is seen. A plot cut lengthwise by the survey's edge keeps a sliver of
    its rows, whose lines otherwise run mostly through the alley beside it, and was weed.
    Lines within the array border (truncated by the array, not by invalid pixels) are
    incomplete anyway; crop them away as before.

    Args:
        veg: bool ``(H, W)`` vegetation.
        valid: bool ``(H, W)`` valid input.
        row_off: absolute raster row of ``veg[0, 0]``.
        col_off: absolute raster column of ``veg[0, 0]``.
        angle_deg: row direction (see :class:`RowEstimate`).
        half_length_px: steps along the major axis on each side.
        edge_aware: rows may go on beyond invalid pixels (see above).

    Returns:
        float32 ``(H, W)`` in 0..1 (0 where no valid pixel is on the segment). Values within
        :func:`support_reach` of the array border are incomplete; crop them away.
    """
    a = _image_angle(angle_deg)
    dx, dy = math.cos(a), math.sin(a)
    # Packing: vegetation count in the low half, valid count in the high half, one running sum
    # for both. While a segment has under 256 pixels both counts fit a byte, so the sums are
    # uint16: half the memory traffic of 32-bit sums, and the shares come from one lookup.
    small = 2 * half_length_px + 1 < 256
    dtype, shift = (np.uint16, 8) if small else (np.uint32, 16)
    packed = np.left_shift(valid, shift, dtype=dtype)
    packed |= veg & valid
    share = _share_small if small else _share
    halves = edge_aware and not bool(valid.all())
    steep = abs(dy) > abs(dx)
    if steep:
        sums = _line_sums(packed, row_off, dx / dy, half_length_px, halves)
    else:  # lines closer to the x axis: the same sums on the transpose, down its rows
        sums = _line_sums(transposed(packed), col_off, dy / dx, half_length_px,
                          halves)
    out = share(sums[0])
    flat = out.reshape(-1)
    for part in sums[1:]:
        # A side with fewer valid pixels than its steps runs into invalid ones (or off the
        # array, where values are cropped away); it counts when vegetation fills it up to
        # there: a plant with soil between it and the edge is no row running off the raster.
        # Shares only where a side is cut: a band along the edges (the lookups of whole
        # arrays cost the label-free run ~5 %).
        at = np.flatnonzero(np.right_shift(part, shift) < half_length_px + 1)
        side = share(part.reshape(-1)[at])
        keep = side >= np.float32(EDGE_ROW_FILL)
        at, side = at[keep], side[keep]
        flat[at] = np.maximum(flat[at], side)
    return out if steep else transposed(out)


#: Least vegetation share of the visible part of a row line that runs off the survey for the
#: row to count as going on beyond it (see ``along_row_support(edge_aware=True)``).
EDGE_ROW_FILL = 0.9


def _line_sums(packed: np.ndarray, major_off: int, slope: float, half: int,
               halves: bool = False) -> list[np.ndarray]:
    """Sums over ``[i - half, i + half]`` along lines ``j = j0 + round(slope * i_abs)``.

    With ``halves``, also the sums over ``[i, i + half]`` and ``[i - half, i]``.

    The lines step one row at a time (axis 0) and drift along axis 1, so each row is placed
    whole at its line offset in a sheared array: pixels of one digital line then share a
    column, and one running sum down the rows gives every window as a difference of two
    rows. Whole-row slices keep every step a contiguous numpy pass (a flat-index scatter and
    gather of the same shear cost ~3x more). The running sums are unsigned and may wrap
    around: a window is a difference of two of them, exact modulo the dtype's range, which
    holds any window's true sum.
    """
    n, m = packed.shape
    i_abs = np.arange(major_off, major_off + n, dtype=np.float64)
    # Shifts depend only on the absolute row, so every tile agrees on the digital lines.
    shift = np.rint(slope * i_abs).astype(np.int64)
    span = int(shift.max() - shift.min())
    starts = (shift.max() - shift).tolist()
    csum = np.zeros((n, m + span), packed.dtype)
    s = starts[0]
    csum[0, s : s + m] = packed[0]
    for i in range(1, n):
        s = starts[i]
        csum[i] = csum[i - 1]
        csum[i, s : s + m] += packed[i]
    out = np.empty((n, m), packed.dtype)
    up = np.empty((n, m), packed.dtype) if halves else out
    down = np.empty((n, m), packed.dtype) if halves else out
    for i in range(n):
        s = starts[i]
        hi, lo = min(i + half, n - 1), i - half - 1
        if lo >= 0:
            np.subtract(csum[hi, s : s + m], csum[lo, s : s + m], out=out[i])
        else:
            out[i] = csum[hi, s : s + m]
        if halves:
            if i >= 1:
                np.subtract(csum[hi, s : s + m], csum[i - 1, s : s + m], out=up[i])
            else:
                up[i] = csum[hi, s : s + m]
            if lo >= 0:
                np.subtract(csum[i, s : s + m], csum[lo, s : s + m], out=down[i])
            else:
                down[i] = csum[i, s : s + m]
    return [out, up, down] if halves else [out]


def _share(packed_sum: np.ndarray) -> np.ndarray:
    """Vegetation over valid count of 16-bit halves, float32 (0 where nothing is valid)."""
    veg = (packed_sum & 0xFFFF).astype(np.float32)
    n = (packed_sum >> 16).astype(np.float32)
    # Where no pixel is valid the vegetation count is 0 too, so 0 / 1 gives the 0 wanted.
    np.maximum(n, 1, out=n)
    veg /= n
    return veg


def _share_small(packed_sum: np.ndarray) -> np.ndarray:
    """:func:`_share` of byte halves, through a table of every packed value."""
    return np.take(_SHARE_TABLE, packed_sum)


def _share_table() -> np.ndarray:
    v = np.arange(1 << 16, dtype=np.uint32)
    veg = (v & 0xFF).astype(np.float32)
    # The same float32 division as _share, so both paths give the same bits.
    veg /= np.maximum((v >> 8).astype(np.float32), 1)
    return veg


_SHARE_TABLE = _share_table()


#: Side (raster pixels) of the cells of the row-direction map of a survey with several.
ORIENTATION_CELL_PX = 256
#: Side of the cells in which a tile decides the row direction from its own vegetation.
DECISION_CELL_PX = 64
#: Vegetation pixels a decision cell needs to decide; with fewer it keeps the map's direction.
DECISION_MIN_VEG = 100


@dataclass(frozen=True, slots=True)
class RowGaps:
    """How a row line keeps its plants through a gappy stretch (see :func:`fill_row_gaps`).

    Attributes:
        spacings_px: row spacing in pixels of each row direction (the main one first, then
            those of :attr:`RowOrientations.angles`).
        floor: least support of a pixel's own row line and of the lines one and two spacings
            across.
        contrast: the own line's support must be at least this many times the larger support
            of the two lines half a spacing to either side (the inter-rows).
        value: the support a line that passes takes, if it has less.
    """

    spacings_px: tuple[float, ...]
    floor: float
    contrast: float
    value: float


def row_offset(angle_deg: float, spacing_px: float) -> tuple[int, int]:
    """``spacing_px`` across rows running at ``angle_deg``, as whole ``(dy, dx)`` pixels."""
    a = _image_angle(angle_deg)
    return round(spacing_px * math.cos(a)), round(-spacing_px * math.sin(a))


def gap_reach(angle_deg: float, half_length_px: int, spacing_px: float) -> int:
    """Pixels :func:`fill_row_gaps` reaches beyond :func:`support_reach`, in x and in y.

    It reads the support two row spacings across, whose line reaches ``half_length_px``
    steps along the major axis and less along the other: rows near an axis need nothing more.
    """
    a = _image_angle(angle_deg)
    cx, cy = abs(math.cos(a)), abs(math.sin(a))
    minor = math.ceil(half_length_px * min(cx, cy) / max(cx, cy)) + 1
    seg_y, seg_x = (half_length_px + 1, minor) if cy > cx else (minor, half_length_px + 1)
    oy, ox = row_offset(angle_deg, 2 * spacing_px)
    return max(0, seg_y + abs(oy) - support_reach(half_length_px),
               seg_x + abs(ox) - support_reach(half_length_px))


def fill_row_gaps(s: np.ndarray, lines: np.ndarray, veg: np.ndarray, angle_deg: float,
                  spacing_px: float, gaps: RowGaps, only: np.ndarray | None = None) -> np.ndarray:
    """Support of row lines raised where a gappy stretch keeps the field's row pattern.

    A thin stand or a stretch with missing plants has little vegetation on its row line, as
    little as a weed between rows has on its own, so its plants were weed (Maricopa sorghum:
    60 % of the weed pixels lay on row centres). What tells them apart is where the line
    lies: a row line has rows one spacing to either side and empty inter-rows half a spacing
    away; a line between rows has the rows half a spacing away. A line whose own support is
    at least ``floor``, with lines one and two spacings across at least as supported and
    ``contrast`` times more than both lines half a spacing across, takes ``value`` at its
    vegetation pixels (elsewhere the support does not decide a class). Two spacings: with an
    estimate of half the true spacing (thin rows) a weedy inter-row centre line has rows one
    "spacing" across, but inter-rows two. The test reads the support at fixed pixel offsets,
    so tiles whose halo covers :func:`gap_reach` more equal the whole raster.

    Args:
        s: the support each pixel's class is decided on (dilated by the leaf reach; with
            several row directions, each pixel's own direction's), ``(H, W)`` float32.
        lines: the along-row support in this direction, undilated, read across the rows.
            Undilated: with several directions a mixed, dilated support across would owe its
            value to other pixels' decision cells and need the halo to cover the whole
            offset beyond a cell; and the lines across are whole rows or inter-rows, which a
            leaf's width does not change.
        veg: bool ``(H, W)`` vegetation.
        angle_deg: row direction.
        spacing_px: row spacing in pixels.
        gaps: the rule's thresholds.
        only: test only these pixels (bool ``(H, W)``; with several directions, those of
            this one).

    Returns:
        ``s`` with passing lines raised; values within :func:`gap_reach` plus
        :func:`support_reach` of the border are incomplete.
    """
    h, w = s.shape
    (fy, fx), (hy, hx) = row_offset(angle_deg, spacing_px), row_offset(angle_deg, spacing_px / 2)
    (ty, tx) = row_offset(angle_deg, 2 * spacing_px)
    ay, ax = max(abs(fy), abs(hy), abs(ty)), max(abs(fx), abs(hx), abs(tx))
    floor, value = np.float32(gaps.floor), np.float32(gaps.value)
    # Only vegetation on lines between the floor and the value can change (a few per cent of
    # the pixels): their neighbours are gathered at flat offsets, away from the border where
    # those would wrap.
    cand = s >= floor
    cand &= s < value
    cand &= veg
    if only is not None:
        cand &= only
    cand[:ay] = cand[h - ay:] = False
    cand[:, :ax] = cand[:, w - ax:] = False
    at = np.flatnonzero(cand)
    flat = lines.reshape(-1)
    full, half, two = fy * w + fx, hy * w + hx, ty * w + tx
    ok = np.maximum(flat[at + full], flat[at - full]) >= floor
    ok &= np.maximum(flat[at + two], flat[at - two]) >= floor
    ok &= s.reshape(-1)[at] >= np.float32(gaps.contrast) * np.maximum(flat[at + half],
                                                                       flat[at - half])
    out = s.copy()
    out.reshape(-1)[at[ok]] = value
    return out


@dataclass(frozen=True, slots=True)
class RowOrientations:
    """Row directions of a survey whose fields differ, and which applies where.

    Attributes:
        angles: row directions in degrees (see :class:`~agriseg.models.rows.RowEstimate`);
            the first is the survey's main direction.
        halves: along-row half length of each, in major-axis steps.
        leaves: leaf reach (dilation across the rows) of each, in pixels.
        spacings_m: row spacing of each, in metres.
        shape: cells of the direction map (rows, columns).
        cells: the map, row-major uint8 direction indices (bytes: small, hashable), one per
            :data:`ORIENTATION_CELL_PX` square of the raster; each cell takes the direction
            of the nearest sample window that showed rows. Tiles refine it per
            :data:`DECISION_CELL_PX` square from their own vegetation.
    """

    angles: tuple[float, ...]
    halves: tuple[int, ...]
    leaves: tuple[int, ...]
    spacings_m: tuple[float, ...]
    shape: tuple[int, int]
    cells: bytes

    def at(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """The map's direction index at absolute raster ``rows`` x ``cols`` (a 2D grid)."""
        grid = np.frombuffer(self.cells, np.uint8).reshape(self.shape)
        r = np.clip(rows // ORIENTATION_CELL_PX, 0, self.shape[0] - 1)
        c = np.clip(cols // ORIENTATION_CELL_PX, 0, self.shape[1] - 1)
        return grid[r[:, None], c[None, :]]


def oriented_support(
    veg: np.ndarray, valid: np.ndarray, row_off: int, col_off: int, angle_deg: float,
    half: int, orientations: RowOrientations | None, leaf: int = 0, edge_aware: bool = False,
    gaps: RowGaps | None = None,
) -> np.ndarray:
    """:func:`along_row_support` in each pixel's row direction, dilated by the leaf reach.

    The dilation is a maximum filter across the rows: leaves stick out of the row line. With
    one direction for the survey (``orientations`` None) that is ``angle_deg`` and the reach
    ``leaf``; values within ``leaf`` of the array border are incomplete. Else the support is
    computed in every direction, and each :data:`DECISION_CELL_PX` cell (absolute raster
    cells) keeps the direction in which its vegetation has the highest mean support: on a
    field's rows that is the rows' direction by far (a line across rows sees their cover, one
    along them the row). Cells with little vegetation keep the map's direction, and each
    direction has its own leaf reach. A cell's choice depends only on its own pixels' support,
    so tiles whose halo holds the cell and the support's reach around it equal the whole
    raster bit for bit. With ``gaps``, gappy row lines are then filled (:func:`fill_row_gaps`),
    each direction's pixels from that direction's own undilated support across the rows.
    """
    if orientations is None:
        raw = along_row_support(veg, valid, row_off, col_off, angle_deg, half, edge_aware)
        s = max_filter(raw, leaf) if leaf > 0 else raw
        return s if gaps is None else fill_row_gaps(s, raw, veg, angle_deg,
                                                    gaps.spacings_px[0], gaps)
    h, w = veg.shape
    sup = [along_row_support(veg, valid, row_off, col_off, a, hh, edge_aware)
           for a, hh in zip(orientations.angles, orientations.halves, strict=True)]
    c = DECISION_CELL_PX
    r_cell = (np.arange(row_off, row_off + h) // c) - (row_off // c)
    c_cell = (np.arange(col_off, col_off + w) // c) - (col_off // c)
    n_r, n_c = int(r_cell[-1]) + 1, int(c_cell[-1]) + 1
    v = (veg & valid).ravel()
    # The cell of each vegetation pixel, gathered once for the count and every direction.
    ids = (r_cell[:, None] * n_c + c_cell[None, :]).ravel()[v]
    n = np.bincount(ids, minlength=n_r * n_c)
    # Sums over the same pixels compare as means do; each cell's pixels are added in the same
    # (row-major) order in any tile, so the sums and the choice are exact.
    sums = np.stack([np.bincount(ids, weights=s.ravel()[v], minlength=n_r * n_c)
                     for s in sup])
    best = np.argmax(sums, axis=0).astype(np.uint8)
    # The map's direction of each decision cell (they nest in the map's cells).
    prior = orientations.at((np.arange(n_r) + row_off // c) * c,
                            (np.arange(n_c) + col_off // c) * c).ravel()
    choice = np.where(n >= DECISION_MIN_VEG, best, prior).reshape(n_r, n_c)
    # Cells are runs of rows and columns: repeating the choices beats a lookup per pixel.
    idx = np.repeat(np.repeat(choice, np.bincount(r_cell), axis=0), np.bincount(c_cell), axis=1)
    where = [idx == k for k in range(len(sup))]
    out = sup[0] if gaps is None else sup[0].copy()  # the gap test reads each one whole
    for k in range(1, len(sup)):
        np.copyto(out, sup[k], where=where[k])
    # Each direction's own leaf reach: a field of narrow rows beside one of wide rows.
    reaches = set(orientations.leaves)
    dilated = {r: max_filter(out, r) if r > 0 else out for r in reaches}
    if len(reaches) == 1:  # one reach for all: nothing to pick per direction
        res = dilated[orientations.leaves[0]]
    else:
        res = dilated[orientations.leaves[0]].copy()
        for k in range(1, len(sup)):
            np.copyto(res, dilated[orientations.leaves[k]], where=where[k])
    if gaps is None:
        return res
    for k, (a, sp) in enumerate(zip(orientations.angles, gaps.spacings_px, strict=True)):
        res = fill_row_gaps(res, sup[k], veg, a, sp, gaps, only=where[k])
    return res
