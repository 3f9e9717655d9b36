"""Label-free crop / weed / disease / soil segmenter for row crops (the default model).

No labels, no weights: three decisions with survey-wide parameters found once in
:meth:`LabelFreeSegmenter.prepare` on full-resolution sample windows, then applied to every
tile the same way.

1. **Vegetation vs soil.** Excess green on chromatic coordinates for RGB (with a darkness guard
   so shadows do not turn green), NDVI with NIR. One threshold for the whole survey: bare soil
   is a tight histogram mode, so where the mode is soil-like the threshold is that mode plus
   ``soil_sigmas`` robust standard deviations, raised to ``veg_mix`` of the way to typical
   vegetation (blurred leaf margins stay soil). Where vegetation is the mode (closed canopy):
   Otsu's threshold if the histogram is two-class (Ashman's D >= 2, plausible range; with
   NIR, three-class Otsu's upper one when the lowest class is water), else a fixed literature
   threshold, with a warning. RGB with a soil mode also has a *green path*
   (:class:`GreenPath`): (G-R)/(G+R) over its own soil-mode threshold where green exceeds
   blue, for glaucous and grass leaves whose blue lowers ExG; and a *yellow path*: bright
   pixels whose blue share B/(R+G+B), averaged over a small window, lies well below the
   share's soil mode (yellowing and senescing leaves, whose ExG sits on the threshold).
2. **Crop vs weed** (the idea of Bah et al. 2018, unsupervised labelling for weeds in line
   crops). Row angle and spacing come from the power spectrum of the vegetation mask of the
   samples (:mod:`agriseg.models.rows`). Per pixel, the *along-row support* is the vegetation
   share on the row line through it (three row spacings to either side), dilated across the
   row by the leaf reach. Vegetation with support below ``row_support`` x the field's median
   support is weed: a plant between rows has soil along its row line, a crop plant has its row.
   Leaves bulging out of a row have less support than the row line but hang together with it:
   vegetation joined to confident row pixels within a short geodesic reach (bounded
   4-connected growth through vegetation) keeps the lower ``row_attached_support`` threshold.
   Without resolvable rows (GSD too coarse, broadcast crops, pasture) every plant is crop and
   the warnings say weeds could not be separated.
   **Appearance** (Bah et al.'s second stage, :mod:`agriseg.models.appearance`): the row rule's
   confident pseudo-labels (plant interiors on the body of the rows = crop, isolated inter-row
   plants = weed) teach a per-survey colour table; row vegetation whose neighbourhood clearly
   looks like the inter-row weeds becomes weed, which finds weeds in and against the rows.
   Used only where held-out sample pixels show that colour separates the two, and never
   relabelling more than ``appearance_max_loss`` of held-out row vegetation.
   **Borders** (:mod:`agriseg.models.boundary`): where crop and weed touch, the pixels near
   the border join the class whose local mean colour they are clearly nearer to, since the
   row geometry draws that border only roughly.
3. **Disease / stress.** Crop whose health feature (RGB: normalised green-red difference, which
   drops with chlorosis and necrosis; multispectral: NDRE and NDVI, or NDVI without red edge),
   averaged over nearby pure-vegetation pixels so mixed leaf-edge pixels do not count, lies more
   than ``disease_sensitivity`` robust standard deviations below the field's crop median (the
   mean of the features' z-scores), the spread being taken from the healthy (upper) half.
   A window mean of few pure pixels is weak evidence, so the z-score is shrunk toward the
   field's norm by ``n / (n + health_prior_px)`` for ``n`` pure pixels in the window (the
   empirical-Bayes estimate of a local mean): stray leaf edges, weed leaves and single odd
   pixels no longer read as disease spots, while a lesion on a leaf keeps its full score.
   Relative, not absolute: cameras differ in white balance, and a uniformly senescent field is
   the norm of that field, not all disease.

Probabilities: each decision has a linear ramp around its threshold (``p = 0.5`` at the
threshold, 1 one softness away), and class scores are the tree's joint probabilities:
``soil = 1 - p_veg``, ``weed = p_veg (1 - p_row)``, ``crop = p_veg p_row (1 - p_dis)``,
``disease = p_veg p_row p_dis``; then the weed-likeness of the colour moves that share of the
crop score to weed (disease keeps its score: discoloured crop can look like a weed species),
and the pixels the border competition moves swap their crop and weed scores.
All neighbourhood sums are integer, so tiles match a whole-raster run bit for bit.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
from rasterio.windows import Window
from scipy import ndimage
from skimage.filters import threshold_multiotsu, threshold_otsu

from agriseg.classes import CROP, DEFAULT_CLASSES, WEED, ClassSchema
from agriseg.models import appearance as app
from agriseg.models.appearance import AppearanceTable
from agriseg.models.base import Prepared, TileContext, reduce_scores
from agriseg.models.boundary import (
    MAX_CELL_PX,
    SAMPLE_STEP,
    BoundaryParams,
    fragments,
    settle,
)
from agriseg.models.filters import box_sum, grow_within, square_opening
from agriseg.models.labelfree_config import NODATA_RIM_MAX_M, YELLOW_MIN_GAP, LabelFreeConfig
from agriseg.models.rows import (
    DECISION_CELL_PX,
    ORIENTATION_CELL_PX,
    RowEstimate,
    RowGaps,
    RowOrientations,
    angle_difference,
    estimate_rows,
    gap_reach,
    major_axis_steps,
    oriented_support,
    row_regularity,
    support_reach,
)

if TYPE_CHECKING:
    from agriseg.raster import SurveyRaster

log = logging.getLogger(__name__)

RGB = ("red", "green", "blue")


#: Smallest side of the parts of a sample window whose rows are estimated one by one.
ORIENTATION_PART_PX = 256
#: Raster pixels per extra direction probe (one 256 px window per ~13 MP).
PROBE_AREA_PX = 200 * 256 * 256
#: Largest fragment (pixels) the speck and island rules move, whatever the GSD: each widens
#: the halo by as much.
FRAGMENT_MAX_PX = 32
#: Sample parts that must agree on a row direction other than the main one to add it.
ORIENTATION_MIN_PARTS = 2
#: Most row directions a survey uses (the main one included).
MAX_ORIENTATIONS = 4


@dataclass(frozen=True, slots=True)
class GreenPath:
    """The RGB green and yellow paths, mapped onto the ExG scale.

    See ``LabelFreeConfig.green_path`` and ``yellow_path``.

    Attributes:
        exg_threshold: the survey's ExG threshold.
        exg_softness: its ramp width.
        ngrdi_threshold: where (G-R)/(G+R) calls a pixel vegetation (None: no green path).
        yellow_threshold: window mean blue share under which bright pixels are vegetation
            (None: no yellow path).
        yellow_radius: that window's radius in pixels.
        bright_sum: least R+G+B of a yellow-path pixel (shadows' chroma is noise).
    """

    exg_threshold: float
    exg_softness: float
    ngrdi_threshold: float | None
    yellow_threshold: float | None = None
    yellow_radius: int = 0
    bright_sum: float = 0.0

    def lift(self, vi: np.ndarray, r: np.ndarray, g: np.ndarray, b: np.ndarray,
             eps: np.float32) -> None:
        """Raise ExG ``vi`` in place to the green path's level where the path calls vegetation.

        The level is :data:`GREEN_PATH_CAP` softnesses above the ExG threshold: vegetation,
        but under the pure-vegetation level (half a softness), so these pixels never feed the
        healthy-crop statistics. (G-R)/(G+R) > t is tested as G - R > t (G + R + eps),
        without a division.
        """
        level = np.float32(self.exg_threshold + GREEN_PATH_CAP * self.exg_softness)
        if self.yellow_threshold is not None:
            path = self.yellow(r, g, b)
            np.maximum(vi, level, out=vi, where=path)
        if self.ngrdi_threshold is None:
            return
        t = np.float32(self.ngrdi_threshold)
        # Row blocks keep the temporaries in cache: whole-tile passes added 60 ms to a 2416 px
        # tile's index, blocks ~40 ms.
        for rows in _row_blocks(vi.shape):
            gi, ri = g[rows], r[rows]
            rhs = gi + ri
            rhs += eps
            rhs *= t
            path = np.greater(np.subtract(gi, ri), rhs)
            path &= np.greater(gi, b[rows])
            np.maximum(vi[rows], level, out=vi[rows], where=path)

    def yellow(self, r: np.ndarray, g: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Where the yellow path calls vegetation (bool, the shape of ``r``).

        The blue share is quantised to 1/:data:`BLUE_SHARE_STEPS` and summed over the window
        in integers, so a tile's result equals the whole raster's wherever the window lies
        inside the tile. Dark pixels count as blue share 1 (never yellow), and pixels must
        keep G > 0.6 R (yellow to orange leaves; red soils and brick are redder).
        """
        assert self.yellow_threshold is not None
        q = _blue_steps(r, g, b, self.bright_sum)
        rad = self.yellow_radius
        n = (2 * rad + 1) ** 2
        # Summed as STEPS - q, so that beyond the array (box_sum's zeros) reads as share 1,
        # not as the yellowest: the mean share is below t where that sum exceeds n (1 - t).
        least = int(n * BLUE_SHARE_STEPS - self.yellow_threshold * BLUE_SHARE_STEPS * n)
        q2 = q.reshape(-1, *q.shape[-2:])
        path = np.empty(q2.shape, bool)
        for k, plane in enumerate(q2):
            np.greater(box_sum(BLUE_SHARE_STEPS - plane, rad), least, out=path[k])
        path = path.reshape(q.shape)
        path &= q < BLUE_SHARE_STEPS  # bright (darker pixels are at the full step count)
        path &= g > np.float32(0.6) * r
        return path


def _blue_steps(r: np.ndarray, g: np.ndarray, b: np.ndarray, bright_sum: float) -> np.ndarray:
    """Blue share B/(R+G+B) in steps of 1/:data:`BLUE_SHARE_STEPS` (uint16, truncated).

    Pixels whose R+G+B is not above ``bright_sum`` get the full step count (share 1).
    """
    out = np.empty(r.shape, np.uint16)
    bright, least = np.float32(bright_sum), np.float32(1e-6)
    # Row blocks keep the temporaries in cache (a 2518 px tile: 13 ms against 29 ms whole).
    for rows in _row_blocks(r.shape):
        tot = r[rows] + g[rows]
        tot += b[rows]
        q = b[rows] * np.float32(BLUE_SHARE_STEPS)
        q /= np.maximum(tot, least)
        q[tot <= bright] = BLUE_SHARE_STEPS
        out[rows] = q  # truncated, as astype(np.uint16)
    return out


#: Pixels per block of the per-pixel passes that run in row blocks (:func:`_row_blocks`).
ROW_BLOCK_PX = 1 << 16


def _row_blocks(shape: tuple[int, ...]) -> Iterator[tuple[Any, ...]]:
    """Index tuples of blocks of whole rows (the last two axes) of about ROW_BLOCK_PX."""
    step = max(1, ROW_BLOCK_PX // max(shape[-1], 1))
    for i in range(0, shape[-2], step):
        yield (..., slice(i, i + step), slice(None))


#: Mean brightness (0-1) above which a pixel bluer than green is taken as no plant.
BLUE_BRIGHT = 0.35
#: Width in pixels of a bright bluish area taken as no plant (see ``_index``).
BLUE_WIDTH = 5
#: Near-white pixels (RGB): the smallest band at least this share of the largest ...
NEUTRAL_RATIO = 0.9
#: ... and a mean brightness (0-1) above this are no plant (see ``_no_plants``).
NEUTRAL_BRIGHT = 0.7

#: Share of the sampled valid pixels with a band at full scale above which ``prepare`` warns
#: of overexposure. The real samples have 0.00-0.04 %; a x1.4 overexposure of Lamberton
#: 2018-09-25 has 45 %.
CLIPPED_WARN_SHARE = 0.02
#: Clipped red or blue is taken at this multiple of full scale (see ``_clip_no_plants``).
#: Of the pixels with red or blue clipped on Lamberton overexposed x1.4 (09-25, 09-05,
#: 08-15), soil that stayed over the threshold / vegetation that fell under it: as recorded
#: (1.0) 35.4/17.1, 5.6/24.7, 7.7/1.9 %; at 1.1 2.6/38.0, 0.3/48.8, 0.5/13.3 % (4-9x fewer
#: pixels wrong, as soil is 3-30x more of them); at 1.2 0.1/60.2, 0.0/69.3, 0.1/33.5 %.
CLIP_HEADROOM = 1.1

#: Highest ExG-scale value of the green path, in ExG softnesses above the threshold.
GREEN_PATH_CAP = 0.45
#: Steps of the yellow path's quantised blue share (its window sums stay within uint16).
BLUE_SHARE_STEPS = 1024
#: Largest radius of the yellow path's window: (2 x 3 + 1)^2 x 1024 fits uint16.
YELLOW_MAX_RADIUS = 3
#: Least R+G+B of a yellow-path pixel, in ``dark_eps`` (a tenth of the survey's median band
#: mean): 8 is R+G+B above 0.8 x that median, about a quarter of the median R+G+B. At 15
#: (half of it) the survey-wide gate took out leaves in shade: Lamberton 09-05 under a hard
#: shadow (x0.45 over a third), yellow-path vegetation inside it 13.5 -> 0.2 % of pixels,
#: 5.7 % of the map changed; at 8 13.6 % (13.4 % unshaded) and 0.9 % changed, at 5 1.8 %
#: (deep-shade soil then enters the blue-share soil fit). The unperturbed samples change by
#: 0-0.22 % of their pixels at 8 and 5 alike.
YELLOW_BRIGHT = 8.0


@dataclass(frozen=True, slots=True)
class LabelFreeParams:
    """Survey-wide parameters handed to every tile (small and picklable)."""

    index: str
    veg_threshold: float
    veg_softness: float
    dark_eps: float
    rows: bool
    row_angle_deg: float
    row_half_px: int
    leaf_px: int
    row_threshold: float
    row_softness: float
    attach_px: int
    attached_threshold: float
    health: str
    health_centre: tuple[float, ...]
    health_spread: tuple[float, ...]
    health_px: int
    disease_sensitivity: float
    health_prior_px: float = 0.0
    appearance: AppearanceTable | None = None
    appearance_px: int = 0
    rim_px: int = 0
    orientations: RowOrientations | None = None
    green: GreenPath | None = None
    boundary: BoundaryParams | None = None
    speck_px: int = 0
    island_px: int = 0
    island_share: float = 0.5
    edge_aware: bool = True
    gaps: RowGaps | None = None
    full_scale: float | None = None


def _ramp(z: np.ndarray) -> np.ndarray:
    """Probability from a signed margin in softness units: 0.5 at 0, saturating at +-1.

    Linear rather than logistic: no transcendental functions, whose SIMD and scalar code paths
    may differ in the last bit, so tiles stay bit-identical to whole-raster runs. Works in
    place on ``z`` (float32; every caller passes a temporary).
    """
    z *= np.float32(0.5)
    z += np.float32(0.5)
    return np.clip(z, 0, 1, out=z)


def _box_mean(
    values: np.ndarray, weight: np.ndarray, radius: int, bound: int, empty: float | None = None
) -> np.ndarray:
    """:func:`_box_mean_count` without the counts."""
    return _box_mean_count(values, weight, radius, bound, empty)[0]


def _window_counts(weight: np.ndarray, radius: int) -> np.ndarray:
    """Number of ``weight`` pixels in each ``(2r+1)^2`` window (bytes below 256 cells)."""
    small = (2 * radius + 1) ** 2 < 256
    return box_sum(weight.view(np.uint8) if small else weight.astype(np.int32), radius)


def _box_mean_count(
    values: np.ndarray, weight: np.ndarray, radius: int, bound: int, empty: float | None = None,
    counts: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Mean of integer ``values`` over ``weight`` pixels in a square window, exactly.

    Direct (non-running) sums of integers: scipy's ``uniform_filter`` keeps a running float
    sum whose rounding depends on where a line starts, which would make tiles and
    whole-raster runs differ in the last bit; integer sums of shifted slices do not. The
    weighted values (within ``-bound..bound``) and the pixel counts are summed apart, the
    counts as bytes while a window holds under 256 pixels (a quarter of the memory traffic
    of one packed integer, and no packing passes). Pixels with no weight in their window
    get ``empty``, or keep their own value when it is None. ``counts``: the
    :func:`_window_counts` of ``weight`` when the caller has them (several features over the
    same pixels).

    Returns:
        The means (float32) and the number of ``weight`` pixels in each window.
    """
    cells = (2 * radius + 1) ** 2
    wide = np.int32 if bound * cells < 2**31 else np.int64
    weighted = np.multiply(values, weight, dtype=wide)
    tot = box_sum(weighted, radius).astype(np.float32)
    n = _window_counts(weight, radius) if counts is None else counts
    n_f = n.astype(np.float32)
    # Sums and counts are exact in float32 (well under 2**24), so this is the correctly
    # rounded mean; where the count is 0 the sum is 0 too, and 0 / 1 keeps it 0.
    np.maximum(n_f, 1, out=n_f)
    tot /= n_f
    if empty is None:
        return np.where(n > 0, tot, values.astype(np.float32)), n
    if empty != 0:
        tot[n == 0] = empty
    return tot, n


@dataclass
class LabelFreeSegmenter:
    """Soil / crop / weed / disease from indices, crop-row geometry and colour departures."""

    config: LabelFreeConfig = field(default_factory=LabelFreeConfig)
    name: str = "labelfree"
    schema: ClassSchema = DEFAULT_CLASSES
    roles: tuple[str, ...] = RGB
    #: Whether the health features use NDRE; ``prepare`` turns it off for a survey whose
    #: "nir" band is darker than its "rededge" band over vegetation (see there).
    ndre: bool = True

    # ------------------------------------------------------------------ features

    def _features(
        self, pixels: np.ndarray, dark_eps: float, full_scale: float | None = None
    ) -> tuple[np.ndarray, np.ndarray, str, str]:
        """Vegetation index ``(..., H, W)`` and health features ``(..., K, H, W)``."""
        vi, index = self._index(pixels, dark_eps, full_scale=full_scale)
        health, names = self._health(pixels, dark_eps, vi)
        return vi, health, index, names

    def _index(
        self, pixels: np.ndarray, dark_eps: float, green: GreenPath | None = None,
        full_scale: float | None = None,
    ) -> tuple[np.ndarray, str]:
        """Vegetation index ``(..., H, W)``: NDVI with NIR, else excess green chromaticity.

        With ``full_scale`` (RGB only), ExG of clipped pixels lowered (:func:`_clip_no_plants`),
        then with ``green``, ExG raised by the green path: the paths take yellow leaves whose
        red is clipped as they take the others (lowering after the paths undid them).
        """
        ch = {r: pixels[..., i, :, :] for i, r in enumerate(self.roles)}
        eps = np.float32(dark_eps)
        if "nir" in ch:
            nir, red = ch["nir"], ch["red"]
            return (nir - red) / (nir + red + eps), "ndvi"
        r, g, b = ch["red"], ch["green"], ch["blue"]
        # (2g - r - b) / (r + g + b + eps), evaluated in that order in place: the same bits
        # with two temporaries instead of six, and in row blocks that keep them in cache.
        # eps damps the chroma of near-black pixels (shadow, sensor noise).
        vi = np.empty(r.shape, np.result_type(r, g, b, np.float32))
        for rows in _row_blocks(r.shape):
            total = r[rows] + g[rows]
            total += b[rows]
            total += eps
            v = vi[rows]
            np.multiply(g[rows], np.float32(2), out=v)
            v -= r[rows]
            v -= b[rows]
            v /= total
        _clip_no_plants(r, g, b, vi, full_scale, dark_eps)
        if green is not None:
            green.lift(vi, r, g, b, eps)
        return vi, "exg"

    def _no_plants(self, pixels: np.ndarray, vi: np.ndarray, floor: float) -> None:
        """Lower ``vi`` in place to -1 over bright bluish areas and near-white pixels (RGB).

        Bright areas bluer than green are no plant: tarps, painted metal, sky mirrored in
        puddles (on the Maricopa sample a blue-grey pad of ExG 0.047 became a "weed" zone).
        Shaded leaves can be as blue as green, but they are dark; sky glints on leaves are
        bright and bluish too, but a pixel or two wide, so only areas that survive an opening
        of :data:`BLUE_WIDTH` px are taken out (all such pixels cost the sample 1.5 % of its
        crop). Applied when classifying, not to the samples the threshold is estimated from,
        which stays as it was (a spike of such values moved the soil mode's threshold).
        Near-white pixels are looked for only where ``vi`` exceeds ``floor`` (where a pixel
        could be vegetation at all).
        """
        if "nir" in self.roles:
            return
        ch = {r: pixels[..., i, :, :] for i, r in enumerate(self.roles)}
        r, g, b = ch["red"], ch["green"], ch["blue"]
        total = r + g + b
        bluish = b > g
        bluish &= total > np.float32(3 * BLUE_BRIGHT)
        wide = square_opening(bluish, BLUE_WIDTH)
        if wide is not None:
            vi[wide] = -1.0
        # Near-white pixels: no leaf is that pale, but a colour cast of a few per cent (a
        # demosaicing fringe, light from the plants beside) lifts their chroma over the
        # threshold. On Maricopa the white drip tape along the rows was crop, the fringe of a
        # white fence strip weed (982 pixels); any width, so no opening.
        at = np.flatnonzero((vi > np.float32(floor)) & (total > np.float32(3 * NEUTRAL_BRIGHT)))
        rgb = [np.take(c, at) for c in (r, g, b)]
        white = np.minimum(np.minimum(*rgb[:2]), rgb[2]) >= np.float32(NEUTRAL_RATIO) * \
            np.maximum(np.maximum(*rgb[:2]), rgb[2])
        vi.reshape(-1)[at[white]] = -1.0

    def _nir_below_rededge(self, pix: list[np.ndarray], val: list[np.ndarray], path: str,
                           warnings: list[str]) -> bool:
        """Whether the "nir" band is darker than the "rededge" one over vegetation (warned).

        Leaves reflect more NIR than red edge, always. An export whose band descriptions
        swap the two made NDRE negative on every leaf, and its z-scores cancelled the other
        health features' evidence: disease was never found, and nothing said why.
        """
        red, nir, edge = (self.roles.index(r) for r in ("red", "nir", "rededge"))
        diffs = []
        for p, v in zip(pix, val, strict=True):
            n, r, e = p[nir][v], p[red][v], p[edge][v]
            leaf = (n - r) > NIR_CHECK_NDVI * (n + r)
            diffs.append(n[leaf] - e[leaf])
        d = np.concatenate(diffs) if diffs else np.zeros(0)
        if d.size < NIR_CHECK_PIXELS or float(np.median(d)) >= 0:
            return False
        warnings.append(f"{path}: the band taken as NIR is darker than the one taken as red "
                        "edge over vegetation, which no leaf is: the two look swapped (NDRE "
                        "left out of the health features); name them with --bands, e.g. "
                        "swapping the nir= and rededge= band numbers")
        return True

    def _health(
        self, pixels: np.ndarray, dark_eps: float, vi: np.ndarray
    ) -> tuple[np.ndarray, str]:
        """Health features ``(..., K, H, W)`` and their names joined by ``+``.

        ``vi`` is :meth:`_index` of the same pixels: with NIR it is the NDVI feature.
        """
        ch = {r: pixels[..., i, :, :] for i, r in enumerate(self.roles)}
        eps = np.float32(dark_eps)
        if "nir" in ch:
            nir, red = ch["nir"], ch["red"]
            feats, names = [vi], ["ndvi"]
            if "rededge" in ch and self.ndre:
                # NDRE tracks chlorophyll in dense canopy but also rises in leaf shade (NIR
                # scatters within the canopy more than red edge); NDVI tracks the visible
                # symptom (red no longer absorbed). Their z-scores are averaged.
                feats.insert(0, (nir - ch["rededge"]) / (nir + ch["rededge"] + eps))
                names.insert(0, "ndre")
            if "green" in ch:
                g = ch["green"]
                feats.append((g - red) / (g + red + eps))
                names.append("ngrdi")
            return np.stack(feats, axis=-3), "+".join(names)
        r, g = ch["red"], ch["green"]
        health = g - r
        total = g + r
        total += eps
        health /= total
        return health[..., None, :, :], "ngrdi"

    # ------------------------------------------------------------------ prepare

    def prepare(self, survey: SurveyRaster) -> Prepared:
        """Thresholds, row geometry and healthy-crop statistics from sample windows."""
        cfg = self.config
        if survey.roles.has("nir", "red"):
            self.roles = ("red", "nir", "rededge") if survey.roles.has("rededge") else (
                "red", "nir")
            # The visible bands serve the health feature (green) and the colour table: chroma
            # over every band read, so that blue, which tells glaucous and grass weeds from
            # the crop, counts (synthetic multispectral weed IoU 0.620 -> 0.677).
            self.roles += tuple(r for r in ("green", "blue") if survey.roles.has(r))
        else:
            self.roles = RGB
        survey.require(self.roles, f"model {self.name!r}")
        gsd = survey.grid.gsd_m
        warnings: list[str] = []
        windows = self._sample(survey)
        pix = [w[0] for w in windows]
        rim = _rim_px(cfg.nodata_rim_px, gsd)
        val = [_without_rim(w[1], rim) for w in windows]
        self.ndre = "rededge" not in self.roles or not self._nir_below_rededge(pix, val,
                                                                                 survey.path,
                                                                                 warnings)
        # Mean over bands first, then select: the same values, without copying (C, n) first.
        brightness = np.concatenate([p.mean(axis=0)[v] for p, v in zip(pix, val, strict=True)])
        dark_eps = float(0.1 * np.median(brightness)) if brightness.size else 0.01
        dark_eps = max(dark_eps, 1e-4)
        # Clipped red or blue overstates a pixel's greenness (see _clip_no_plants): the
        # samples take the ExG classification gives them before the threshold is fitted.
        # Leaving clipped pixels out of the fits instead lost the soil mode where most soil
        # is clipped: overexposed x1.4, Lamberton 08-15 (51 % of sampled pixels clipped) went
        # to Otsu at 0.209 and 20.7 % of its pixels changed class (9.6 % before, 10.2 % so).
        full = _full_scale(survey)
        feats = [self._features(p, dark_eps, full) for p in pix]
        index, health_name = feats[0][2], feats[0][3]
        info: dict[str, Any] = {"index": index, "health_feature": health_name,
                                "sample_windows": len(windows), "gsd_m": round(gsd, 4)}
        if full is not None:
            n_clipped = sum(int(((p >= np.float32(full)).any(axis=0) & v).sum())
                            for p, v in zip(pix, val, strict=True))
            share = n_clipped / max(sum(int(v.sum()) for v in val), 1)
            info["clipped_share_samples"] = round(share, 4)
            if share > CLIPPED_WARN_SHARE:
                warnings.append(
                    f"{survey.path}: overexposed: {share:.1%} of sampled pixels have a "
                    f"saturated band; where red or blue is clipped and green is not, the "
                    f"pixel is taken as no greener than with that band at {CLIP_HEADROOM:g} x "
                    f"full scale")
        values = np.concatenate([f[0][v] for f, v in zip(feats, val, strict=True)])
        thr, soft, how = self._veg_threshold(values, index, warnings, survey.path)
        info.update(veg_threshold=round(thr, 4), veg_softness=round(soft, 4),
                    veg_threshold_method=how)
        green = None
        if index == "exg" and how.startswith("soil mode"):
            # RGB's health feature is (G-R)/(G+R), the green path's own index.
            green, info["green_path"] = self._green_path([f[1][0] for f in feats], val, thr,
                                                         soft)
            green, info["yellow_path"] = self._yellow_path(
                green or GreenPath(thr, soft, None), pix, val, [f[0] for f in feats], dark_eps,
                gsd)
            if green is not None:
                for p, f in zip(pix, feats, strict=True):
                    green.lift(f[0], p[0], p[1], p[2], np.float32(dark_eps))  # RGB order
        vegs = [(f[0] > thr) & v for f, v in zip(feats, val, strict=True)]
        n_veg = int(sum(int(m.sum()) for m in vegs))
        n_valid = int(sum(int(v.sum()) for v in val))
        info["veg_fraction_samples"] = round(n_veg / max(n_valid, 1), 4)

        rows = self._rows(vegs, gsd, n_veg, n_valid, warnings, survey.path, info)
        row_half = leaf = attach = 0
        row_thr = row_soft = att_thr = typical = 0.0
        supports: list[np.ndarray] = []
        orients: RowOrientations | None = None
        if rows is not None:
            row_half, leaf = _row_steps(cfg, rows.angle_deg, rows.spacing_m, gsd)
            probes = self._probes(survey, windows, thr, dark_eps, green)
            orients = self._orientations(windows, vegs, probes, rows, gsd, survey, info)
            for (_, v, r0, c0), m in zip(windows, vegs, strict=True):
                supports.append(oriented_support(m, v, r0, c0, rows.angle_deg, row_half,
                                                 orients, leaf))
            s_veg = np.concatenate([s[m] for s, m in zip(supports, vegs, strict=True)])
            typical = float(np.median(s_veg)) if s_veg.size else 0.0
            row_thr = max(cfg.row_support * typical, 0.02)
            row_soft = max(row_thr / 2, 0.01)
            att_thr = min(max(cfg.row_attached_support * typical, 0.01), row_thr)
            attach = max(0, round(cfg.row_attach_spacings * rows.spacing_m / gsd))
            info.update(row_half_length_m=round(row_half * gsd, 3),
                        leaf_reach_m=round(leaf * gsd, 3),
                        row_support_median=round(typical, 4), row_threshold=round(row_thr, 4),
                        row_attached_threshold=round(att_thr, 4),
                        row_attach_m=round(attach * gsd, 3))
        health_px = max(1, round(cfg.health_window_m / gsd / 2))
        centre, spread = self._health_stats(feats, vegs, supports, row_thr, thr, soft, health_px)
        zs = " + ".join(f"({c:.3f} - {name}) / {sd:.3f}" for c, sd, name in
                        zip(centre, spread, health_name.split("+"), strict=True))
        info.update(health_centre=[round(c, 4) for c in centre],
                    health_spread=[round(sd, 4) for sd in spread],
                    disease_sensitivity=cfg.disease_sensitivity,
                    disease_rule=(
                        f"mean of [{zs}] > {cfg.disease_sensitivity}" if cfg.health_prior_px <= 0
                        else f"mean of [{zs}] x n / (n + {cfg.health_prior_px:g}) > "
                             f"{cfg.disease_sensitivity} (n: pure vegetation pixels within "
                             f"{health_px} px)"))
        params = LabelFreeParams(
            index=index, veg_threshold=thr, veg_softness=soft, dark_eps=dark_eps,
            rows=rows is not None, row_angle_deg=rows.angle_deg if rows else 0.0,
            row_half_px=row_half, leaf_px=leaf, row_threshold=row_thr, row_softness=row_soft,
            attach_px=attach, attached_threshold=att_thr,
            health=health_name, health_centre=centre, health_spread=spread, health_px=health_px,
            disease_sensitivity=cfg.disease_sensitivity, rim_px=rim,
            health_prior_px=cfg.health_prior_px, orientations=orients, green=green,
            edge_aware=cfg.edge_rows,
            gaps=RowGaps(tuple(sp / gsd for sp in (orients.spacings_m if orients is not None
                                                    else (rows.spacing_m,))),
                         floor=cfg.row_gap_floor * row_thr, contrast=cfg.row_gap_contrast,
                         value=row_thr + row_soft / 2)
            if rows is not None and cfg.row_gaps else None,
            full_scale=full,
        )
        if params.gaps is not None:
            info.update(row_gap_floor=round(params.gaps.floor, 4),
                        row_gap_contrast=params.gaps.contrast)
        if rows is not None:
            if cfg.appearance:
                table, info["appearance"] = self._appearance(windows, vegs, supports, typical,
                                                             params)
                params = replace(params, appearance=table, appearance_px=max(
                    0, round(cfg.appearance_radius_m / gsd)) if table is not None else 0)
                info["appearance"]["radius_m"] = round(params.appearance_px * gsd, 3)
            else:
                info["appearance"] = {"used": False, "reason": "disabled in the configuration"}
            if cfg.boundary:
                speck = min(FRAGMENT_MAX_PX, round(cfg.speck_max_m2 / gsd**2))
                island = min(FRAGMENT_MAX_PX, round(cfg.island_max_m2 / gsd**2))
                params = replace(params, boundary=self._boundary(pix, vegs, gsd, info),
                                 speck_px=speck, island_px=island,
                                 island_share=cfg.island_weed_share)
                info["boundary"].update(speck_max_m2=round(speck * gsd**2, 6),
                                        island_max_m2=round(island * gsd**2, 6),
                                        island_weed_share=cfg.island_weed_share)
        halo = max(orients.leaves if orients is not None else (leaf,)) + health_px + 1 + rim
        if green is not None and green.yellow_threshold is not None:
            halo += green.yellow_radius  # vegetation needs the yellow path's whole window
        if rows is not None:
            halves = orients.halves if orients is not None else (row_half,)
            halo += support_reach(max(halves)) + attach
            if params.gaps is not None:
                angles = orients.angles if orients is not None else (rows.angle_deg,)
                halo += max(gap_reach(a, hh, sp) for a, hh, sp in
                            zip(angles, halves, params.gaps.spacings_px, strict=True))
            if orients is not None:
                # A pixel's direction comes from its decision cell: the whole cell must be
                # inside every tile that uses the pixel.
                halo += DECISION_CELL_PX
        halo = max(halo, params.appearance_px)
        if params.boundary is not None:
            # The border competition needs the classes over its own reach around the core,
            # and the fragment rules the classes before them over a fragment's reach.
            halo += params.boundary.reach + _fragment_reach(params)
        info["halo_px"] = halo
        # Warnings are returned, not logged: the caller reports them once, at warning level.
        return Prepared(params, halo=halo, info=info, warnings=tuple(warnings))

    def _appearance(
        self,
        windows: list[tuple[np.ndarray, np.ndarray, int, int]],
        vegs: list[np.ndarray],
        supports: list[np.ndarray],
        typical: float,
        params: LabelFreeParams,
    ) -> tuple[AppearanceTable | None, dict[str, Any]]:
        """Colour table of crop vs weed from the row rule's confident pseudo-labels.

        Crop: plant interiors whose along-row support reaches the field's median (the body of
        the rows). Weed: plant interiors the row rule calls weed outright (``p_row == 0``: well
        below the threshold and not attached to a row). Interior = vegetation whose 8
        neighbours are vegetation too: margins are mixed with soil, and as small weeds are
        mostly margin, the table would otherwise learn "mixed with soil" as the weed colour
        and call the edges of crop rows weed.
        """
        cfg = self.config
        parts: dict[str, list[list[np.ndarray]]] = {"crop": [], "weed": []}
        for (pix, _, r0, c0), m, s in zip(windows, vegs, supports, strict=True):
            pure = ndimage.binary_erosion(m, _EIGHT)
            p_row = self._row_probability(s, m, params)
            test = app.heldout(r0, c0, m.shape)
            fs = app.features(pix, params.dark_eps)
            for name, sel in (("crop", pure & (s >= typical)), ("weed", pure & (p_row == 0))):
                parts[name].append([x[sel] for x in fs] + [test[sel]])
        crop, weed = ([np.concatenate(c) for c in zip(*parts[k], strict=True)]
                      for k in ("crop", "weed"))
        table, info = app.fit(
            tuple(crop[:3]), tuple(weed[:3]), crop[3], weed[3], bins=cfg.appearance_bins,
            max_loss=cfg.appearance_max_loss, min_ratio=cfg.appearance_min_ratio,
            min_recall=cfg.appearance_min_recall, min_pixels=cfg.appearance_min_pixels)
        names = (f"{self.roles[0]} chroma", f"{self.roles[1]} chroma", "brightness")
        info["features"] = [f for f, n in zip(names, cfg.appearance_bins, strict=True) if n > 1]
        log.info("appearance table: %s", info)
        return table, info

    def _boundary(self, pix: list[np.ndarray], vegs: list[np.ndarray], gsd: float,
                  info: dict[str, Any]) -> BoundaryParams:
        """Settings of the crop / weed border competition at this survey's GSD."""
        cfg = self.config
        sums = np.concatenate([p.sum(axis=0, dtype=np.float32)[m]
                               for p, m in zip(pix, vegs, strict=True)])
        typical = float(np.median(sums)) if sums.size else 1.0
        # Cells hold whole samples (SAMPLE_STEP apart), so run.json and the halo see the
        # cell the competition really uses.
        cell = SAMPLE_STEP * max(1, min(round(cfg.boundary_cell_m / gsd), MAX_CELL_PX)
                                 // SAMPLE_STEP)
        b = BoundaryParams(band_px=max(1, round(cfg.boundary_band_m / gsd)), cell_px=cell,
                           margin=cfg.boundary_margin, offset=cfg.boundary_offset * typical)
        info["boundary"] = {"band_m": round(b.band_px * gsd, 3),
                            "cell_m": round(b.cell_px * gsd, 3), "margin": b.margin,
                            "offset": round(b.offset, 5)}
        return b

    def _sample(self, survey: SurveyRaster) -> list[tuple[np.ndarray, np.ndarray, int, int]]:
        """Read up to ``sample_windows`` full-resolution windows spread over the valid area."""
        import rasterio

        from agriseg.raster import read_overview, read_window

        h, w = survey.grid.shape_yx
        side = self.config.sample_side_px
        wh, ww = min(side, h), min(side, w)
        _, ov_valid, factor = read_overview(survey, self.roles[:1])
        cands: list[tuple[float, int, int]] = []
        for r0 in _starts(h, wh):
            for c0 in _starts(w, ww):
                cands.append((_valid_share(ov_valid, factor, r0, c0, wh, ww), r0, c0))
        good = [c for c in cands if c[0] >= 0.5] or sorted(cands, reverse=True)[:1]
        n = self.config.sample_windows
        if len(good) > n:
            pick = np.linspace(0, len(good) - 1, n).round().astype(int)
            good = [good[i] for i in pick]
        out = []
        with rasterio.open(survey.path) as ds:
            for _, r0, c0 in good:
                data, valid = read_window(survey, self.roles, Window(c0, r0, ww, wh), ds)
                out.append((data, valid, r0, c0))
        return out

    def _veg_threshold(
        self, values: np.ndarray, index: str, warnings: list[str], path: str
    ) -> tuple[float, float, str]:
        """One survey-wide vegetation threshold.

        Bare soil is the one population every field shows and it is tight in ExG/NDVI, while
        vegetation is a broad tail (mixed pixels, yellowing, shade). So where the histogram's
        mode is soil-like, the threshold is the soil mode plus ``soil_sigmas`` robust standard
        deviations of its lower (vegetation-free) flank; Otsu on such skewed, unbalanced data
        lands too high and cuts yellow leaves and seedlings. Where the mode is vegetation
        (closed canopy), Otsu is used if the histogram is two-class, else a fixed threshold.
        """
        cfg = self.config
        fixed = cfg.exg_fixed if index == "exg" else cfg.ndvi_fixed
        lo, hi = cfg.exg_range if index == "exg" else cfg.ndvi_range
        soil_max = cfg.exg_soil_mode_max if index == "exg" else cfg.ndvi_soil_mode_max
        values = values[np.isfinite(values)]
        if values.size < 100 or np.ptp(values) <= 0:
            warnings.append(f"{path}: too few valid pixels to fit a vegetation threshold; "
                            f"using the fixed {index} threshold {fixed}")
            return fixed, 0.05, "fixed (too few pixels)"
        v, mode, sigma = _soil_mode(values)
        if mode <= soil_max or (index == "ndvi" and mode < NDVI_SOIL_MODE_LIMIT
                                and mode < float(threshold_otsu(v, nbins=512))):
            t = mode + cfg.soil_sigmas * sigma
            above = v[v > t]
            if above.size > 0.002 * v.size:
                # Blur and mixed leaf/soil pixels sit between the two: call a pixel vegetation
                # only once it is ``veg_mix`` of the way from soil to typical vegetation.
                t = max(t, mode + cfg.veg_mix * (float(np.percentile(above, 75)) - mode))
            if t <= hi:
                t = max(t, lo)
                share = float((values > t).mean())
                if share < 0.002:
                    warnings.append(f"{path}: almost no vegetation ({share:.2%} of sampled "
                                    f"pixels above the {index} threshold {t:.3f})")
                return t, max((t - mode) / 3, 0.01), (
                    f"soil mode {mode:.3f}, soil sigma {sigma:.4f}")
        # Two-class Otsu, after three-class Otsu's upper threshold where the lowest class is
        # water (NDVI: NIR darker than red, which no soil or plant is). With water, bare soil
        # and vegetation in one scene (fields along a river, prairie ponds), two classes
        # split water from the rest and call bare fields and villages vegetation.
        candidates = [(float(threshold_otsu(v, nbins=512)), -math.inf)]
        if index == "ndvi" and np.unique(v[:: max(1, v.size // 4096)]).size >= 3:
            t_water, t_veg = threshold_multiotsu(v, classes=3, nbins=256)
            water = v[v <= t_water]
            # Open water reads -0.3 to -0.6; a bare soil's NDVI computed from raw camera
            # numbers can be slightly negative (-0.1 on the NAIP sample), and a scene of such
            # soil and vegetation must not have its vegetation split in two.
            if water.size >= 0.005 * v.size and water.mean() < WATER_NDVI:
                candidates.insert(0, (float(t_veg), float(t_water)))
        for t, floor in candidates:
            a, b = v[(v > floor) & (v <= t)], v[v > t]
            share = b.size / v.size
            d = 0.0
            if a.size > 1 and b.size > 1:
                d = math.sqrt(2) * abs(b.mean() - a.mean()) / math.sqrt(
                    a.var() + b.var() + 1e-12)
            if d >= 2.0 and 0.005 <= share <= 0.995 and lo <= t <= hi:
                soft = max(0.25 * float(b.mean() - a.mean()), 0.01)
                water_note = "" if floor == -math.inf else (
                    f", water below {index} {floor:.3f} ({(v <= floor).mean():.1%}) left out")
                return t, soft, f"otsu (Ashman D {d:.2f}, vegetation {share:.1%}{water_note})"
        share_fixed = float((values > fixed).mean())
        why = (f"Otsu threshold {t:.3f} outside the plausible range {lo}..{hi}"
               if not lo <= t <= hi else
               f"the {index} histogram is not two-class (Ashman D {d:.2f} < 2)")
        looks = ("all vegetation" if share_fixed > 0.9 else "bare" if share_fixed < 0.02
                 else "unusual")
        warnings.append(
            f"{path}: no bare-soil peak and {why}, so the field looks {looks}; using the fixed "
            f"{index} threshold {fixed} ({share_fixed:.1%} of sampled pixels vegetation)"
        )
        return fixed, 0.05, "fixed (" + why + ")"

    def _green_path(
        self, ngrdi: list[np.ndarray], val: list[np.ndarray], thr: float, soft: float,
    ) -> tuple[GreenPath | None, dict[str, Any]]:
        """The green path's (G-R)/(G+R) threshold from the sample windows' soil mode.

        ``ngrdi`` holds each window's (G-R)/(G+R), ``val`` its valid pixels.
        """
        cfg = self.config
        if not cfg.green_path:
            return None, {"used": False, "reason": "disabled in the configuration"}
        values = np.concatenate([n[v] for n, v in zip(ngrdi, val, strict=True)])
        values = values[np.isfinite(values)]
        if values.size < 100:
            return None, {"used": False, "reason": "too few valid pixels"}
        _, mode, sigma = _soil_mode(values)
        # Whether the path applies is ExG's soil-mode decision (prepare calls this only then),
        # not the sign of this mode: a cool cast (R x0.85, B x1.15) lifts a soil's (G-R)/(G+R)
        # mode over ngrdi_min (synthetic 0.033, Maricopa 0.061, Danforth 0.036), and a
        # ``mode >= ngrdi_min`` test switched the path off there (synthetic weed IoU vs truth
        # 0.71 -> 0.62). The threshold still sits soil_sigmas above the mode, so such soil
        # stays soil; every unaltered sample's mode is below ngrdi_min (-0.13 to -0.02).
        n_thr = max(mode + cfg.soil_sigmas * sigma, cfg.ngrdi_min)
        path = GreenPath(thr, soft, n_thr)
        return path, {"used": True, "ngrdi_threshold": round(n_thr, 4),
                      "ngrdi_soil_mode": round(mode, 4),
                      "rule": f"also vegetation where (G-R)/(G+R) > {n_thr:.3f} and G > B"}

    def _yellow_path(
        self, path: GreenPath, pix: list[np.ndarray], val: list[np.ndarray],
        exg: list[np.ndarray], dark_eps: float, gsd: float,
    ) -> tuple[GreenPath | None, dict[str, Any]]:
        """``path`` with the yellow path's threshold from the samples' blue-share soil mode.

        Returns ``path`` as it was (None if it had no green path) when the yellow path is off.
        """
        cfg = self.config
        unchanged = path if path.ngrdi_threshold is not None else None
        if not cfg.yellow_path:
            return unchanged, {"used": False, "reason": "disabled in the configuration"}
        rad = min(YELLOW_MAX_RADIUS, max(1, round(cfg.yellow_window_m / gsd / 2)))
        bright = YELLOW_BRIGHT * dark_eps
        shares = []
        for p, v, e in zip(pix, val, exg, strict=True):
            q = _blue_steps(p[0], p[1], p[2], bright)
            # As in GreenPath.yellow: beyond the window counts as share 1.
            mean = 1 - box_sum(BLUE_SHARE_STEPS - q, rad) / float(
                BLUE_SHARE_STEPS * (2 * rad + 1) ** 2)
            # Bare ground: bright, not green, windows away from dark pixels.
            keep = v & (e <= path.exg_threshold) & (q < BLUE_SHARE_STEPS) & (mean < 1)
            shares.append(mean[keep])
        values = np.concatenate(shares) if shares else np.zeros(0)
        if values.size < 1000:
            return unchanged, {"used": False, "reason": "too few bright soil pixels"}
        # The plants' tail lies below the soil's blue share: its spread from the upper flank.
        _, neg_mode, sigma = _soil_mode(-values)
        mode = -neg_mode
        y_thr = min(mode - cfg.soil_sigmas * sigma, mode - YELLOW_MIN_GAP, cfg.blue_share_max)
        if y_thr <= 0.05:
            return unchanged, {"used": False, "reason": f"blue-share soil mode {mode:.3f}"}
        out = replace(path, yellow_threshold=y_thr, yellow_radius=rad, bright_sum=bright)
        return out, {"used": True, "blue_share_threshold": round(y_thr, 4),
                     "blue_share_soil_mode": round(mode, 4), "window_px": 2 * rad + 1,
                     "rule": f"also vegetation where the mean B/(R+G+B) over {2 * rad + 1} px "
                             f"< {y_thr:.3f}, R+G+B > {bright:.3f} and G > 0.6 R"}

    def _rows(
        self,
        vegs: list[np.ndarray],
        gsd: float,
        n_veg: int,
        n_valid: int,
        warnings: list[str],
        path: str,
        info: dict[str, Any],
    ) -> RowEstimate | None:
        cfg = self.config
        if gsd * 4 > cfg.max_row_spacing_m:
            msg = (f"{path}: GSD {gsd:.3g} m is too coarse to resolve crop rows (needs at "
                   f"least 4 px per row spacing, i.e. GSD <= {cfg.max_row_spacing_m / 4:.3g} m);"
                   " weeds are not separated from crop: all vegetation is labelled crop")
            warnings.append(msg)
            info["rows"] = {"detected": False, "reason": "GSD too coarse"}
            return None
        if n_veg < 0.005 * max(n_valid, 1) or n_veg < 200:
            warnings.append(f"{path}: almost no vegetation in the samples, so no crop rows could "
                            "be looked for; weeds are not separated from crop")
            info["rows"] = {"detected": False, "reason": "no vegetation"}
            return None
        f = _row_decimation(gsd)
        masks = [_decimate(m, f) for m in vegs]
        shapes = {m.shape for m in masks}
        if len(shapes) > 1:
            side = min(min(s) for s in shapes)
            masks = [m[:side, :side] for m in masks]
        est = estimate_rows(masks, gsd * f, cfg.min_row_spacing_m, cfg.max_row_spacing_m)
        if est is None:
            warnings.append(f"{path}: the sampled area is too small to resolve row spacings "
                            f"up to {cfg.max_row_spacing_m} m; weeds are not separated from crop")
            info["rows"] = {"detected": False, "reason": "area too small"}
            return None
        rec = {"angle_deg": round(est.angle_deg, 2), "spacing_m": round(est.spacing_m, 4),
               "contrast": round(est.contrast, 1), "row_width_m": round(est.width_m, 3)}
        if est.contrast < cfg.min_row_contrast:
            warnings.append(
                f"{path}: no regular crop rows found (spectral contrast {est.contrast:.1f} < "
                f"{cfg.min_row_contrast}: broadcast crop, pasture or closed canopy?); weeds are "
                "not separated from crop: all vegetation is labelled crop, disease by colour"
            )
            info["rows"] = {"detected": False, "reason": "no row pattern", **rec}
            return None
        info["rows"] = {"detected": True, **rec}
        log.info("%s: crop rows at %.1f deg, spacing %.3f m (contrast %.0f)", path,
                 est.angle_deg, est.spacing_m, est.contrast)
        return est

    def _probes(
        self,
        survey: SurveyRaster,
        windows: list[tuple[np.ndarray, np.ndarray, int, int]],
        thr: float,
        dark_eps: float,
        green: GreenPath | None = None,
    ) -> list[tuple[np.ndarray, int, int]]:
        """Vegetation masks of small extra windows that only look for row directions.

        The sample windows cover a large survey thinly (9 x 768 px of a 1 GP survey: 0.5 %),
        so a field with other rows may hold none. One :data:`ORIENTATION_PART_PX` window per
        :data:`PROBE_AREA_PX` pixels of raster (at most ``orientation_probes``), spread over
        the valid area away from the sample windows, is read one at a time (a few MB).
        """
        import rasterio

        from agriseg.raster import read_overview, read_window

        cfg = self.config
        h, w = survey.grid.shape_yx
        side = ORIENTATION_PART_PX
        n = min(cfg.orientation_probes, (h * w) // PROBE_AREA_PX)
        if n <= 0 or min(h, w) < side:
            return []
        _, ov_valid, factor = read_overview(survey, self.roles[:1])
        taken = [(r0, c0, r0 + v.shape[0], c0 + v.shape[1]) for _, v, r0, c0 in windows]
        cands = []
        for r0 in _starts(h, side):
            for c0 in _starts(w, side):
                if any(r0 < r1 and c0 < c1 and r0 + side > ra and c0 + side > ca
                       for ra, ca, r1, c1 in taken):
                    continue
                if _valid_share(ov_valid, factor, r0, c0, side, side) >= 0.9:
                    cands.append((r0, c0))
        if len(cands) > n:
            cands = [cands[i] for i in np.linspace(0, len(cands) - 1, n).round().astype(int)]
        out = []
        with rasterio.open(survey.path) as ds:
            for r0, c0 in cands:
                pix, valid = read_window(survey, self.roles, Window(c0, r0, side, side), ds)
                vi, _ = self._index(pix, dark_eps, green, _full_scale(survey))
                out.append(((vi > thr) & _without_rim(valid, _rim_px(cfg.nodata_rim_px,
                                                                      survey.grid.gsd_m)),
                            r0, c0))
        return out

    def _orientations(
        self,
        windows: list[tuple[np.ndarray, np.ndarray, int, int]],
        vegs: list[np.ndarray],
        probes: list[tuple[np.ndarray, int, int]],
        rows: RowEstimate,
        gsd: float,
        survey: SurveyRaster,
        info: dict[str, Any],
    ) -> RowOrientations | None:
        """Row directions of fields that differ from the survey's main one (None: one only).

        Each sample window is cut into parts of at least :data:`ORIENTATION_PART_PX` (a
        window may straddle two fields) and each part's own rows are estimated. A part whose
        rows run at least ``orientation_min_deg`` from a known direction adds its direction if
        the main rows are absent there (their :func:`~agriseg.models.rows.row_regularity` at
        most ``orientation_max_share`` of the part's own); otherwise it votes for the nearest
        known direction. A direction needs :data:`ORIENTATION_MIN_PARTS` parts; at most
        :data:`MAX_ORIENTATIONS` are kept. Every map cell then takes the direction of the
        nearest part that voted.
        """
        cfg = self.config
        if cfg.orientation_min_deg <= 0:
            return None
        parts: list[tuple[np.ndarray, int, int]] = []
        for (_, _, r0, c0), m in zip(windows, vegs, strict=True):
            ny, nx = (max(1, n // ORIENTATION_PART_PX) for n in m.shape)
            for ry in np.array_split(np.arange(m.shape[0]), ny):
                for rx in np.array_split(np.arange(m.shape[1]), nx):
                    parts.append((m[ry[0]:ry[-1] + 1, rx[0]:rx[-1] + 1], r0 + int(ry[0]),
                                  c0 + int(rx[0])))
        parts += probes
        if len(parts) < 2:
            return None
        f = _row_decimation(gsd)
        angles = [rows.angle_deg]
        spacings = [rows.spacing_m]
        member: list[int | None] = []
        for m, _, _ in parts:
            vote: int | None = None
            est = None
            if m.sum() >= max(200, 0.005 * m.size):
                mask = _decimate(m, f)
                est = estimate_rows([mask], gsd * f, cfg.min_row_spacing_m, cfg.max_row_spacing_m)
            if est is not None and est.contrast >= cfg.min_row_contrast:
                near = min(range(len(angles)),
                           key=lambda i: angle_difference(est.angle_deg, angles[i]))
                vote = near
                if near == 0 and angle_difference(est.angle_deg, angles[0]) >= \
                        cfg.orientation_min_deg:
                    binary = mask > 0.5
                    own = row_regularity(binary, gsd * f, est.angle_deg, est.spacing_m)
                    main = row_regularity(binary, gsd * f, rows.angle_deg, rows.spacing_m)
                    if own > 0 and main <= cfg.orientation_max_share * own:
                        angles.append(est.angle_deg)
                        spacings.append(est.spacing_m)
                        vote = len(angles) - 1
            member.append(vote)
        # One part alone is not a field: plot alleys and stray remnants make such peaks. Each
        # direction costs every tile a support pass, so curving rows keep the best-voted few.
        extra = [k for k in range(1, len(angles)) if member.count(k) >= ORIENTATION_MIN_PARTS]
        keep = [0, *sorted(sorted(extra, key=member.count, reverse=True)[:MAX_ORIENTATIONS - 1])]
        if len(keep) == 1:
            return None
        angles = [angles[k] for k in keep]
        spacings = [spacings[k] for k in keep]
        member = [keep.index(k) if k in keep else None for k in member]
        voters = [(r0 + m.shape[0] / 2, c0 + m.shape[1] / 2, k) for (m, r0, c0), k in
                  zip(parts, member, strict=True) if k is not None]
        wy, wx, wk = (np.asarray(v, np.float64) for v in zip(*voters, strict=True))
        h, w = survey.grid.shape_yx
        shape = (-(-h // ORIENTATION_CELL_PX), -(-w // ORIENTATION_CELL_PX))
        cy = (np.arange(shape[0]) + 0.5) * ORIENTATION_CELL_PX
        cx = (np.arange(shape[1]) + 0.5) * ORIENTATION_CELL_PX
        dist = (cy[:, None, None] - wy) ** 2 + (cx[None, :, None] - wx) ** 2
        grid = wk.astype(np.uint8)[np.argmin(dist, axis=2)]
        # Each direction's along-row and leaf reaches from its own spacing (a field of narrow
        # rows beside one of wide rows).
        halves, leaves = zip(*(_row_steps(cfg, a, sp, gsd)
                               for a, sp in zip(angles, spacings, strict=True)), strict=True)
        share = np.bincount(grid.ravel(), minlength=len(angles)) / grid.size
        info["rows"]["orientations"] = [
            {"angle_deg": round(a, 2), "spacing_m": round(spacings[i], 4),
             "window_parts": member.count(i),
             "share": round(float(sh), 3)}
            for i, (a, sh) in enumerate(zip(angles, share, strict=True))]
        log.info("%s: %d row directions (%s); each part of the survey uses the one of its "
                 "nearest sample", survey.path, len(angles),
                 ", ".join(f"{a:.1f} deg on {sh:.0%}" for a, sh in zip(angles, share,
                                                                     strict=True)))
        return RowOrientations(tuple(angles), tuple(halves), tuple(leaves), tuple(spacings),
                               shape, grid.tobytes())

    def _health_stats(
        self,
        feats: list[tuple[np.ndarray, np.ndarray, str, str]],
        vegs: list[np.ndarray],
        supports: list[np.ndarray],
        row_thr: float,
        thr: float,
        soft: float,
        radius: int,
    ) -> tuple[tuple[float, ...], tuple[float, ...]]:
        vals = []
        k = feats[0][1].shape[0] if feats else 1
        for i, (f, m) in enumerate(zip(feats, vegs, strict=True)):
            hs, _ = self._smooth_health(f[1], f[0] >= thr + soft / 2, radius)
            crop = m & (supports[i] >= row_thr) if supports else m
            vals.append(hs[:, crop])
        v = np.concatenate(vals, axis=1) if vals else np.zeros((k, 0), np.float32)
        if v.shape[1] < 50:
            return (0.0,) * k, (1.0,) * k
        p50, p75 = np.percentile(v, [50, 75], axis=1)
        # Spread from the healthy upper half only: diseased pixels pull the lower half down.
        spread = np.maximum((p75 - p50) / 0.6745, 0.01)
        return tuple(float(c) for c in p50), tuple(float(sd) for sd in spread)

    @staticmethod
    def _smooth_health(
        health: np.ndarray, pure: np.ndarray, radius: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Window means of the health features over ``pure`` pixels, and their counts."""
        out = np.empty(health.shape, np.float32)
        n = _window_counts(pure, radius)  # the same for every feature: summed once
        q = np.empty(health.shape[1:], np.int32)
        for k in range(health.shape[0]):
            for rows in _row_blocks(q.shape):  # temporaries in cache
                v = np.clip(health[k][rows], -1, 1)
                v *= np.float32(10000)
                np.rint(v, out=v)
                q[rows] = v  # whole numbers: as astype(np.int32)
            mean, _ = _box_mean_count(q, pure, radius, 10000, counts=n)
            np.divide(mean, np.float32(10000), out=out[k])
        return out, n

    # ------------------------------------------------------------------ predict

    def predict(
        self,
        pixels: np.ndarray,
        valid: np.ndarray,
        params: Any,
        contexts: list[TileContext],
    ) -> np.ndarray:
        """Class probabilities of a batch (see the module docstring for the rules)."""
        n, _, h, w = pixels.shape
        out = np.zeros((n, 4, h, w), np.float32)
        for i in range(n):
            core = _inner(contexts[i].margin)
            for k, plane in enumerate(self._core_scores(pixels[i], valid[i], params,
                                                        contexts[i])):
                out[(i, k, *core)] = plane
        return out

    def predict_classes(
        self,
        pixels: np.ndarray,
        valid: np.ndarray,
        params: Any,
        contexts: list[TileContext],
    ) -> tuple[np.ndarray, np.ndarray]:
        """Class ids and confidence percent, uint8 ``(N, H, W)``, filled inside each margin.

        The same values as reducing :meth:`predict`'s probabilities, without building the
        ``(N, 4, H, W)`` float array: a 1536 px tile's four planes are 50 MB of fresh pages.
        """
        n, _, h, w = pixels.shape
        classes = np.zeros((n, h, w), np.uint8)
        conf = np.zeros((n, h, w), np.uint8)
        for i in range(n):
            core = _inner(contexts[i].margin)
            scores, reduced = self._core(pixels[i], valid[i], params, contexts[i])
            c, p = reduced if reduced is not None else reduce_scores(scores)
            classes[(i, *core)] = c
            conf[(i, *core)] = p
        return classes, conf

    def _core_scores(
        self, pixels: np.ndarray, valid: np.ndarray, params: Any, ctx: TileContext
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Soil, crop, weed and disease probabilities of one tile's core (inside its margin)."""
        return self._core(pixels, valid, params, ctx)[0]

    def _core(
        self, pixels: np.ndarray, valid: np.ndarray, p: LabelFreeParams, ctx: TileContext
    ) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
               tuple[np.ndarray, np.ndarray] | None]:
        """The core's four probability planes, and its classes and confidence when known."""
        b = p.boundary
        if b is None:
            return self._rule_scores(pixels, valid, p, ctx), None
        # The rules' scores over the core and the competition's reach around it; then the
        # border pixels the competition moves swap their crop and weed scores, which moves
        # the class and keeps the confidence.
        m = ctx.margin
        wide = max(m - b.reach - _fragment_reach(p), 0)
        soil, crop, weed, disease = self._rule_scores(pixels, valid, p, replace(ctx,
                                                                              margin=wide))
        classes, conf = reduce_scores((soil, crop, weed, disease))
        to_weed, to_crop = settle(classes, pixels[(slice(None), *_inner(wide))], b,
                                  (ctx.row_off + wide, ctx.col_off + wide))
        _move(to_weed, to_crop, classes, crop, weed)
        none = np.zeros(0, np.intp)
        if p.speck_px > 0:
            _move(none, fragments(classes, WEED, CROP, p.speck_px, 0.0), classes, crop, weed)
        if p.island_px > 0:
            _move(fragments(classes, CROP, WEED, p.island_px, p.island_share), none, classes,
                  crop, weed)
        core = _inner(m - wide)
        return (soil[core], crop[core], weed[core], disease[core]), (classes[core], conf[core])

    def _rule_scores(
        self, pixels: np.ndarray, valid: np.ndarray, p: LabelFreeParams, ctx: TileContext
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The rules' probabilities of one tile's core (see the module docstring)."""
        m = ctx.margin
        # Only the along-row support needs the whole halo. Each later step works on the
        # window it must fill for the core (core + its own reach), so the halo is not
        # processed again and again; the crops are exact (see _row_probability).
        core = _inner(m)
        vi, _ = self._index(pixels, p.dark_eps, p.green, p.full_scale)
        self._no_plants(pixels, vi, p.veg_threshold - p.veg_softness)
        ok = _without_rim(valid, p.rim_px)
        like: np.ndarray | None = None
        z_veg = (vi[core] - np.float32(p.veg_threshold)) / np.float32(p.veg_softness)
        p_veg = _ramp(z_veg)
        p_veg[~ok[core]] = 0  # nodata and its blended rim: soil (nodata is masked later)
        if p.rows:
            veg = (vi > p.veg_threshold) & ok
            grown = _inner(max(m - p.attach_px, 0))
            # A row line leaving the raster continues into the reflected edge padding, where
            # rows at an angle run the other way: only the raster's own pixels count.
            inside = ctx.inside(veg.shape)
            s = oriented_support(veg, ok if inside is None else ok & inside, ctx.row_off,
                                 ctx.col_off, p.row_angle_deg, p.row_half_px, p.orientations,
                                 p.leaf_px, edge_aware=p.edge_aware, gaps=p.gaps)[grown]
            p_row = self._row_probability(s, veg[grown], p)[_inner(min(p.attach_px, m))]
            if p.appearance is not None:
                r = p.appearance_px
                near = _inner(max(m - r, 0))
                # The table knows plant interiors only (it was fitted on them): a leaf
                # margin mixed with soil looks like nothing in it, so margins take the
                # mean of the interior pixels around them and have no say themselves.
                # Only interior pixels are looked up (a fifth to a half of a tile).
                pure = _interior(veg, m - r)
                at = np.flatnonzero(pure)
                window = pixels[(slice(None), *near)]
                level = np.zeros(pure.shape, np.uint8)
                level.ravel()[at] = app.weed_likeness(
                    np.stack([np.take(b, at) for b in window])[:, None, :], p.dark_eps,
                    p.appearance)[0]
                if r > 0:
                    like = _box_mean(level, pure, r, 255, empty=0)[_inner(min(r, m))]
                else:
                    like = np.where(pure, level, np.uint8(0)).astype(np.float32)
                like /= np.float32(255)
        else:
            p_row = np.ones(p_veg.shape, np.float32)
        near = _inner(max(m - p.health_px, 0))
        # Health only where the core's window reaches, not over the whole halo.
        health, _ = self._health(pixels[(slice(None), *near)], p.dark_eps, vi[near])
        hs, n_pure = self._smooth_health(
            health, ((vi >= p.veg_threshold + p.veg_softness / 2) & ok)[near], p.health_px)
        hs = hs[(slice(None), *_inner(min(p.health_px, m)))]
        z = np.zeros(p_veg.shape, np.float32)
        for k, (c, sd) in enumerate(zip(p.health_centre, p.health_spread, strict=True)):
            z += (np.float32(c) - hs[k]) / np.float32(sd)
        z /= np.float32(len(p.health_centre))
        if p.health_prior_px > 0:
            _shrink(z, n_pure[_inner(min(p.health_px, m))], p.health_prior_px)
        p_dis = _ramp(z - np.float32(p.disease_sensitivity))
        plant_row = p_veg * p_row
        soil = np.subtract(1, p_veg, dtype=np.float32)
        crop = plant_row * (1 - p_dis)
        weed = p_veg - plant_row
        disease = np.multiply(plant_row, p_dis, out=p_dis)
        if like is not None:
            # Row vegetation that looks like this survey's inter-row weeds is weed; the
            # health rule goes first, since discoloured crop can look like a weed species.
            moved = crop * like
            crop -= moved
            weed += moved
        return soil, crop, weed, disease

    @staticmethod
    def _row_probability(s: np.ndarray, veg: np.ndarray, p: LabelFreeParams) -> np.ndarray:
        """P(on a row) from the along-row support, with hysteresis for attached leaves.

        Vegetation reached from confident row pixels (support >= threshold) within
        ``attach_px`` 4-connected steps through vegetation of at least the attached threshold
        gets that lower threshold. Each step looks one pixel away, so the result is
        translation-equivariant and exact ``attach_px`` pixels in from the tile border.
        """
        thr = np.float32(p.row_threshold)
        if p.attach_px > 0 and p.attached_threshold < p.row_threshold:
            core = veg & (s >= thr)
            grow = veg & (s >= np.float32(p.attached_threshold))
            joined = grow_within(core, grow, p.attach_px)
            thr_map = np.where(joined, np.float32(p.attached_threshold), thr)
            soft = np.where(joined, np.float32(max(p.attached_threshold / 2, 0.01)),
                            np.float32(p.row_softness))
            z = np.subtract(s, thr_map)
            z /= soft
            return _ramp(z)
        return _ramp((s - thr) / np.float32(p.row_softness))

    def describe(self) -> dict[str, Any]:
        """Name, roles and configuration for run.json."""
        return {"name": self.name, "kind": "rule", "roles": list(self.roles),
                "config": asdict(self.config)}


def _fragment_reach(p: LabelFreeParams) -> int:
    """Halo the speck and island rules need beyond the border competition's reach."""
    return sum(n + 1 for n in (p.speck_px, p.island_px) if n > 0)


def _move(to_weed: np.ndarray, to_crop: np.ndarray, classes: np.ndarray, crop: np.ndarray,
          weed: np.ndarray) -> None:
    """Move pixels (flat indices) between crop and weed: classes, and scores swapped.

    The moved pixel's best score stays its best, now under the other class, so the
    confidence is kept.
    """
    for moved, gain, lose, cls in ((to_weed, weed, crop, WEED), (to_crop, crop, weed, CROP)):
        hi = np.maximum(crop.flat[moved], weed.flat[moved])
        lo = np.minimum(crop.flat[moved], weed.flat[moved])
        # A tie went to crop (the lower class id): the loser steps just below.
        gain.flat[moved] = hi
        lose.flat[moved] = np.where(lo < hi, lo, np.nextafter(lo, np.float32(-1)))
        classes.flat[moved] = cls


#: Mean NDVI below which three-class Otsu's lowest class is taken for water.
WATER_NDVI = -0.2


def _full_scale(survey: SurveyRaster) -> float | None:
    """The scaled value of the raw type's largest value (a clipped band); None for floats.

    Computed as :func:`agriseg.raster.scaled_bands` scales, so clipped pixels equal it;
    255 for 8-bit data in a wider type. uint16 reflectance read as /10000 gives 6.5535,
    which no pixel reaches, and 12-bit data in uint16 clips at 4095, which is not known:
    there the rule does nothing.
    """
    dtype = np.dtype(survey.dtype)
    if dtype.kind not in "ui":
        return None
    # 8-bit data in a wider type is read /255 (see agriseg.raster): it clips at 255.
    raw = 255 if dtype.itemsize > 1 and abs(survey.scale * 255 - 1) < 1e-9 else \
        np.iinfo(dtype).max
    top = np.multiply(np.array(raw, dtype), np.float32(survey.scale), dtype=np.float32)
    if survey.offset:
        top = top + np.float32(survey.offset)
    return float(top)


def _clip_no_plants(r: np.ndarray, g: np.ndarray, b: np.ndarray, vi: np.ndarray,
                    full_scale: float | None, eps: float) -> None:
    """Lower ExG ``vi`` in place where red or blue is at full scale and green is not.

    Such a pixel's true red or blue exceeds the recorded value, so its recorded chroma
    overstates its greenness: on Lamberton 2018-09-25 overexposed x1.4, 97 % of the pixels
    whose class changed had a saturated band, and red was clipped on 98.7 % of the soil that
    became vegetation (its median ExG 0.011 -> 0.050, over the threshold). Its ExG is taken
    with the clipped bands at :data:`CLIP_HEADROOM` x full scale. Bright yellow canopy clips
    red and green together and is kept. Nothing to do without a ``full_scale`` (float data).
    """
    if full_scale is None:
        return
    top = np.float32(full_scale)
    at = np.flatnonzero(np.maximum(r, b) >= top)
    at = at[np.take(g, at) < top]
    if not at.size:
        return
    rr, gg, bb = (np.take(c, at) for c in (r, g, b))
    high = top * np.float32(CLIP_HEADROOM)
    rr[rr >= top] = high
    bb[bb >= top] = high
    exg = (gg * np.float32(2) - rr - bb) / (rr + gg + bb + np.float32(eps))
    flat = vi.reshape(-1)
    flat[at] = np.minimum(flat[at], exg)


def _soil_mode(values: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Trimmed values, histogram mode and robust sigma of the mode's lower flank.

    Bare soil is a tight mode of a vegetation index and the vegetation a broad tail above
    it, so the flank below the mode measures the soil's own spread.
    """
    p_lo, p_hi = np.percentile(values, [0.5, 99.5])
    v = values[(values >= p_lo) & (values <= p_hi)]
    hist, edges = np.histogram(v, bins=256, range=(float(p_lo), float(p_hi) + 1e-9))
    hist = ndimage.gaussian_filter1d(hist.astype(np.float64), 2)
    mode = float((edges[np.argmax(hist)] + edges[np.argmax(hist) + 1]) / 2)
    below = mode - v[v < mode]
    sigma = max(float(np.median(below)) / 0.6745 if below.size else 0.0, 0.003)
    return v, mode, sigma


def _shrink(z: np.ndarray, n: np.ndarray, prior: float) -> None:
    """Scale the health z-scores ``z`` in place by ``n / (n + prior)``.

    Every pixel, in four float32 passes (~1.5 ms per 1280 px tile): scaling only the pixels
    that could still reach the disease ramp gathered half of them (soil far from plants has
    a large z-score too) and took 15 ms per tile in the run.
    """
    n_f = n.astype(np.float32)
    d = n_f + np.float32(prior)
    np.divide(n_f, d, out=n_f)
    z *= n_f




#: NDVI above which a pixel counts as a leaf for the NIR / red-edge order check, and the
#: fewest such pixels the check needs.
NIR_CHECK_NDVI = 0.4
NIR_CHECK_PIXELS = 1000
#: Highest NDVI mode still taken for soil when it lies in Otsu's lower class, above
#: ``ndvi_soil_mode_max``. A NIR calibration 1.3 x too bright lifted the Danforth sample's
#: soil mode over 0.3 (0.208 as calibrated, 0.289 at x1.2): the threshold fell to Otsu's
#: 0.51 and 22 % of the crop was lost, silently (8.3 % of the map changed, 0.9 % so).
NDVI_SOIL_MODE_LIMIT = 0.5


def _rim_px(rim_px: int, gsd: float) -> int:
    """``nodata_rim_px`` at pixel size ``gsd``: no wider than :data:`NODATA_RIM_MAX_M`."""
    # The epsilon: a GSD stored as 0.05000000001 m is 5 cm.
    return min(rim_px, int(NODATA_RIM_MAX_M / gsd + 1e-6)) if gsd > 0 else rim_px


def _without_rim(valid: np.ndarray, rim_px: int) -> np.ndarray:
    """``valid`` less the pixels within ``rim_px`` 4-connected steps of invalid ones.

    The array's own border is not nodata: only invalid pixels inside it start a rim.
    """
    if rim_px <= 0 or valid.all():
        return valid
    return valid & ~grow_within(~valid, np.ones_like(valid), rim_px)


def _inner(margin: int) -> tuple[slice, slice]:
    """Slices that drop ``margin`` pixels from every side of a 2D array."""
    cut = slice(margin, -margin or None)
    return cut, cut


_EIGHT = np.ones((3, 3), bool)


def _interior(veg: np.ndarray, margin: int) -> np.ndarray:
    """Vegetation whose 8 neighbours are vegetation, on ``veg[_inner(max(margin, 0))]``.

    Exact wherever the one-pixel neighbourhood lies in ``veg``; beyond the array the
    neighbours count as vegetation (only pixels the caller discards see that).
    """
    margin = max(margin, 0)
    extra = min(margin, 1)
    v = veg[_inner(margin - extra)]
    # Separable 3 x 3 erosion with slice ANDs: scipy's binary_erosion costs 5x as much here.
    a = v.copy()
    a[:, 1:] &= v[:, :-1]
    a[:, :-1] &= v[:, 1:]
    b = a.copy()
    b[1:] &= a[:-1]
    b[:-1] &= a[1:]
    return b[_inner(extra)]


def _row_steps(cfg: LabelFreeConfig, angle_deg: float, spacing_m: float,
               gsd: float) -> tuple[int, int]:
    """Along-row half length (major-axis steps) and leaf reach (px) of a row direction.

    For rows ``spacing_m`` apart at ``angle_deg``; the half length covers
    ``row_reach_spacings`` spacings within the configured bounds.
    """
    reach = min(max(cfg.row_reach_spacings * spacing_m, cfg.row_reach_min_m),
                cfg.row_reach_max_m)
    return (max(2, major_axis_steps(angle_deg, reach / gsd)),
            max(0, round(cfg.leaf_reach_spacings * spacing_m / gsd)))


def _row_decimation(gsd: float) -> int:
    """Integer factor that brings the vegetation mask to ~2.5 cm pixels for row estimates.

    Rows need ~2.5 cm pixels at most; coarser work is faster and just as good.
    """
    return max(1, int(0.025 // gsd))


def _valid_share(
    ov_valid: np.ndarray, factor: float, r0: int, c0: int, h: int, w: int
) -> float:
    """Share of valid overview cells under the full-resolution window ``(r0, c0, h, w)``."""
    r_a, c_a = int(r0 / factor), int(c0 / factor)
    sub = ov_valid[r_a: max(int((r0 + h) / factor), r_a + 1),
                   c_a: max(int((c0 + w) / factor), c_a + 1)]
    return float(sub.mean()) if sub.size else 0.0


def _starts(n: int, side: int) -> list[int]:
    """Window starts covering ``0..n`` with windows of ``side``, the last flush with the end."""
    starts = list(range(0, max(n - side, 0) + 1, side))
    if starts[-1] + side < n:
        starts.append(n - side)
    return starts


def _decimate(mask: np.ndarray, f: int) -> np.ndarray:
    """Block-mean of a mask by an integer factor (crops the ragged edge)."""
    if f == 1:
        return mask.astype(np.float32)
    h, w = (mask.shape[0] // f) * f, (mask.shape[1] // f) * f
    return mask[:h, :w].reshape(h // f, f, w // f, f).mean(axis=(1, 3), dtype=np.float32)
