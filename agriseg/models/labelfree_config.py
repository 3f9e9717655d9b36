"""Options of the label-free segmenter: :class:`LabelFreeConfig` and their checks.

Apart from the segmenter (:mod:`agriseg.models.labelfree`): listing the options (`agriseg
models`) and checking a run's ``model_options:`` need none of its imports (SciPy,
scikit-image, cc3d).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from agriseg.errors import ConfigError

#: Least distance of the yellow path's threshold below the blue share's soil mode. A warm
#: cast (R x1.15, B x0.85) lowers the soil's share towards the cap and narrows its flank:
#: Lamberton 08-15's mode 0.269 -> 0.227, 6 sigma only 0.029, threshold 0.198; soil fringes
#: then entered the path and 8.5 % of the map changed (crop 51.6 -> 57.6 %); with this gap
#: (threshold 0.181) 4.4 % (crop 52.6 %). 09-25 under that cast (mode 0.196, 6 sigma 0.042)
#: goes 1.5 -> 1.7 %. Every unaltered sample's threshold lies 0.048 (09-25) to 0.123 below
#: its mode, so none of them changes.
YELLOW_MIN_GAP = 0.045

#: Widest nodata rim, in metres. The blend at a clipped or warped edge is a resampling
#: artefact a few pixels wide (Lamberton resampled to 7 cm: with 1 px instead of 2, 69 of its
#: 149 weed pixels lay within 4 px of the edge, against 20 of 100), but counted in pixels
#: alone the rim took 20 m of crop around every cloud-masked or warp-filled hole of a 10 m
#: Sentinel-2 tile (a forest parcel 100 -> 99.5 % vegetation). 2 px up to 12.5 cm pixels,
#: 1 px up to 25 cm, none at 0.25 m and coarser.
NODATA_RIM_MAX_M = 0.25


@dataclass(frozen=True, slots=True)
class LabelFreeConfig:
    """Tunable parameters of the label-free segmenter (defaults suit drone row crops).

    Attributes:
        min_row_spacing_m: smallest row spacing searched for.
        max_row_spacing_m: largest row spacing searched for.
        min_row_contrast: spectral peak over band median needed to accept rows; below it the
            field is treated as having no rows.
        row_reach_spacings: half length of the along-row line, in row spacings.
        row_reach_min_m: lower bound of that half length.
        row_reach_max_m: upper bound of that half length.
        leaf_reach_spacings: dilation across the row (leaves sticking out of the row line), in
            row spacings.
        row_support: vegetation is crop when its along-row support is at least this share of
            the field's median support (lower: fewer weeds).
        row_attached_support: vegetation joined to such crop through vegetation (see
            ``row_attach_spacings``) is crop down to this lower share of the median: leaves of a
            large plant bulging out of its row have less support than the row line, but they
            hang together with the row, while a weed patch between rows is separate from it or
            has much lower support (against 0.4, 0.2 keeps the crop leaf tips beyond the
            row's support band, a third of the false weed pixels on the synthetic fields).
        row_attach_spacings: how far (geodesically, through vegetation) that attachment reaches
            from the row, in row spacings.
        orientation_min_deg: a survey may hold fields whose rows run in other directions.
            Parts of the sample windows whose own rows run at least this many degrees from
            the survey's main direction add a direction (two parts must agree), and every
            64 px cell then uses the direction its vegetation supports best (0: one direction
            for the whole survey).
        orientation_max_share: a part adds a direction (see ``orientation_min_deg``) only
            where the main direction's row regularity is at most this share of its own, i.e.
            the main rows are absent there: breeding plots (alleys across the rows) and
            senesced fields show secondary peaks while their main rows are still plain.
        orientation_probes: at most this many extra 256 px windows (one per ~13 MP of raster)
            look for other row directions where the sample windows do not reach.
        disease_sensitivity: robust z-score below the healthy crop median that marks disease
            (lower: more disease).
        health_window_m: side of the window over which the health feature is averaged.
        health_prior_px: how many pixels' worth of weight the field's healthy norm has against
            the pure-vegetation pixels of that window: the window's z-score is scaled by
            ``n / (n + health_prior_px)`` (0: off; 1-3.5 raised the synthetic fields'
            disease IoU by 0.03-0.08, 8 starts to lose real lesions).
        exg_fixed: fallback ExG threshold when the histogram is not two-class.
        ndvi_fixed: fallback NDVI threshold.
        exg_range: plausible range of an ExG threshold.
        ndvi_range: plausible range of an NDVI threshold.
        exg_soil_mode_max: a histogram mode at or below this ExG is bare soil.
        ndvi_soil_mode_max: a histogram mode at or below this NDVI is bare soil.
        soil_sigmas: vegetation starts this many robust standard deviations above the soil
            mode.
        green_path: RGB with a bare-soil mode: also call vegetation the pixels whose
            (G-R)/(G+R) clears its own soil-mode threshold (``soil_sigmas`` above that index's
            soil mode, at least ``ngrdi_min``) where green exceeds blue. Glaucous and grass
            leaves reflect blue, which lowers ExG, so their soil-mixed margins fall under the
            ExG threshold; grey or bluish gravel (green <= blue) and reddish soil (G < R) stay
            soil. Such pixels are vegetation but never count as pure vegetation, so the
            healthy-crop statistics still learn from ExG vegetation only (the colour table
            does see the interiors of such leaves).
        ngrdi_min: lowest (G-R)/(G+R) threshold of the green path.
        yellow_path: RGB with a bare-soil mode: also call vegetation the bright pixels whose
            blue share B/(R+G+B), averaged over ``yellow_window_m``, lies ``soil_sigmas``
            (and at least :data:`YELLOW_MIN_GAP`) below that share's soil mode and under
            ``blue_share_max``. Yellowing and senescing leaves absorb blue (carotenoids) but
            lose green, so their ExG sits on the threshold; soil and residue keep a higher,
            tight blue share. Such pixels are vegetation but, as the green path's, never pure
            vegetation.
        blue_share_max: highest blue share the yellow path takes for plants.
        yellow_window_m: side of the window the blue share is averaged over (single pixels
            of soil scatter into the leaves' range; a leaf's pixels do not).
        veg_mix: vegetation also starts at least this share of the way from the soil mode
            to the typical pixels above the threshold (their 75th percentile), so blurred leaf
            margins stay soil.
        sample_windows: number of full-resolution windows read in prepare.
        sample_side_px: side of a sample window in pixels.
        appearance: learn this survey's crop vs weed colour from the row rule's confident
            pseudo-labels and relabel row vegetation that clearly looks like the inter-row
            weeds (see :mod:`agriseg.models.appearance`); only used where held-out samples show
            that colour separates them.
        appearance_bins: cells of the colour table per feature (two chromatic coordinates,
            brightness).
        appearance_max_loss: largest share of held-out confident row vegetation the table may
            relabel weed (bounds the damage when the pseudo-labels mislead).
        appearance_min_ratio: smallest weed / crop likelihood ratio of a colour cell that
            relabels it.
        appearance_min_recall: the table is used only if it catches at least this share of
            held-out inter-row vegetation at that operating point.
        appearance_min_pixels: fewest pseudo-labelled pixels per class and half.
        appearance_radius_m: the table's weed-likeness is averaged over the vegetation within
            this distance (a square window), so that single pixels of a crop leaf with an odd
            colour stay crop while a weed plant, a patch of such pixels, becomes weed.
        boundary: settle the borders where crop and weed touch by local colour (see
            :mod:`agriseg.models.boundary`): a pixel within ``boundary_band_m`` of the other
            class joins the class whose mean colour around it (the 3 x 3 cells of
            ``boundary_cell_m`` around its own) it is clearly nearer to. Only with rows
            (without them there is no weed to compete).
        boundary_band_m: how near the other class a pixel must be to be in question.
        boundary_cell_m: side of those cells (at most ``boundary.MAX_CELL_PX`` pixels).
        boundary_margin: share of the way past the midpoint between the two means a pixel
            must lie to change class.
        boundary_offset: the colour is the bands over their sum plus this share of the
            survey's median vegetation band sum (brightness still counts for dark pixels).
        speck_max_m2: after the border competition, weed fragments of at most this area that
            touch crop become crop (leaf tips the row geometry cut off; 16 cm^2 is 4 pixels
            at 2 cm, at most ``FRAGMENT_MAX_PX``; 0: off). Only with ``boundary``.
        island_max_m2: then crop pieces of at most this area whose contacts with other
            classes are at least ``island_weed_share`` weed become weed (parts of a weed
            plant; 64 cm^2 is 16 pixels at 2 cm). Off by default: 0.0064 gains ~0.005 weed
            IoU on the synthetic fields for ~5 % of the run's time. Only with ``boundary``.
        island_weed_share: see ``island_max_m2``.
        edge_rows: a row line that runs into nodata or off the raster on one side takes the
            larger of its vegetation share and that side's alone (the row may go on where
            nothing is seen): slivers of plots cut lengthwise by a survey's edge were weed
            (Lamberton 08-15: 71 % of the weed pixels within 25 px of the nodata edge).
        row_gaps: a row line keeps its plants through a gappy stretch or a thin stand when it
            lies where the field's rows repeat: its own support at least ``row_gap_floor`` x
            the row threshold, as much on lines one and two row spacings across, and
            ``row_gap_contrast`` times more than on both lines half a spacing across (the
            inter-rows). Its plants were weed (Maricopa sorghum: 60 % of the weed pixels lay
            on row centres); a plant between rows has the rows half a spacing away.
        row_gap_floor: see ``row_gaps``.
        row_gap_contrast: see ``row_gaps``.
        nodata_rim_px: valid pixels this close to nodata are treated as soil: clipped or
            warped orthomosaics blend their edge pixels with the fill colour (dark, with a
            shifted chroma that reads as vegetation), which made a false weed strip along the
            edge of the Lamberton sample (half of its weed pixels). At most
            :data:`NODATA_RIM_MAX_M` wide (none at 0.25 m pixels and coarser).
    """

    min_row_spacing_m: float = 0.2
    max_row_spacing_m: float = 1.5
    min_row_contrast: float = 20.0
    row_reach_spacings: float = 3.0
    row_reach_min_m: float = 0.75
    row_reach_max_m: float = 4.0
    leaf_reach_spacings: float = 0.09
    row_support: float = 0.6
    row_attached_support: float = 0.2
    row_attach_spacings: float = 0.1
    orientation_min_deg: float = 5.0
    orientation_max_share: float = 0.35
    orientation_probes: int = 48
    disease_sensitivity: float = 5.0
    health_window_m: float = 0.1
    health_prior_px: float = 2.0
    exg_fixed: float = 0.1
    ndvi_fixed: float = 0.35
    exg_range: tuple[float, float] = (0.02, 0.35)
    exg_soil_mode_max: float = 0.06
    ndvi_soil_mode_max: float = 0.3
    soil_sigmas: float = 6.0
    green_path: bool = True
    ngrdi_min: float = 0.02
    yellow_path: bool = True
    blue_share_max: float = 0.2
    yellow_window_m: float = 0.15
    veg_mix: float = 0.33
    ndvi_range: tuple[float, float] = (0.15, 0.7)
    sample_windows: int = 9
    sample_side_px: int = 768
    appearance: bool = True
    appearance_bins: tuple[int, int, int] = (24, 24, 1)
    appearance_max_loss: float = 0.01
    appearance_min_ratio: float = 4.0
    appearance_min_recall: float = 0.2
    appearance_min_pixels: int = 200
    appearance_radius_m: float = 0.04
    boundary: bool = True
    boundary_band_m: float = 0.04
    boundary_cell_m: float = 0.16
    boundary_margin: float = 0.1
    boundary_offset: float = 0.6
    speck_max_m2: float = 0.0016
    island_max_m2: float = 0.0
    island_weed_share: float = 0.5
    edge_rows: bool = True
    row_gaps: bool = True
    row_gap_floor: float = 0.5
    row_gap_contrast: float = 2.0
    nodata_rim_px: int = 2

    def __post_init__(self) -> None:
        _check_bounds(self)
        _check_ranges(self)
        if not 0 < self.min_row_spacing_m < self.max_row_spacing_m:
            raise ConfigError(
                f"labelfree: need 0 < min_row_spacing_m < max_row_spacing_m, got "
                f"{self.min_row_spacing_m}, {self.max_row_spacing_m}"
            )
        if not 0 < self.row_support < 1:
            raise ConfigError(f"labelfree: row_support must be in (0, 1), got {self.row_support}")
        if self.health_prior_px < 0:
            raise ConfigError(
                f"labelfree: health_prior_px must be >= 0, got {self.health_prior_px}"
            )
        if self.disease_sensitivity <= 0:
            raise ConfigError(
                f"labelfree: disease_sensitivity must be > 0, got {self.disease_sensitivity}"
            )
        if self.boundary_band_m <= 0 or self.boundary_cell_m <= 0:
            raise ConfigError(
                f"labelfree: boundary_band_m and boundary_cell_m must be > 0, got "
                f"{self.boundary_band_m}, {self.boundary_cell_m} (boundary=false turns the "
                f"border competition off)"
            )
        if not 0 <= self.boundary_margin < 0.5:
            raise ConfigError(
                f"labelfree: boundary_margin must be in [0, 0.5), got {self.boundary_margin}"
            )
        if self.speck_max_m2 < 0 or self.island_max_m2 < 0:
            raise ConfigError(
                f"labelfree: speck_max_m2 and island_max_m2 must be >= 0 (0: off), got "
                f"{self.speck_max_m2}, {self.island_max_m2}"
            )
        if not 0 < self.blue_share_max < 1 or self.yellow_window_m <= 0:
            raise ConfigError(
                f"labelfree: need 0 < blue_share_max < 1 and yellow_window_m > 0, got "
                f"{self.blue_share_max}, {self.yellow_window_m} (yellow_path=false turns the "
                "yellow path off)"
            )
        if not 0 < self.row_gap_floor <= 1 or self.row_gap_contrast < 1:
            raise ConfigError(
                f"labelfree: need 0 < row_gap_floor <= 1 and row_gap_contrast >= 1, got "
                f"{self.row_gap_floor}, {self.row_gap_contrast} (row_gaps=false turns the "
                "rule off)"
            )
        if not 0 < self.island_weed_share <= 1:
            raise ConfigError(
                f"labelfree: island_weed_share must be in (0, 1], got {self.island_weed_share}"
            )


#: Lower bounds of single numeric options: (options, bound, inclusive, what the bound means).
#: A count of 0 or a negative size reached numpy or range() as a traceback (sample_windows=0:
#: "need at least one array to concatenate"), and a negative rim or probe count was taken
#: silently as none.
_LOWER_BOUNDS: tuple[tuple[tuple[str, ...], float, bool, str], ...] = (
    (("sample_windows", "appearance_min_pixels"), 1, True, "a count"),
    (("sample_side_px",), 8, True, "pixels; the smallest raster agriseg reads is 8 x 8"),
    (("row_reach_spacings", "row_reach_min_m", "row_reach_max_m", "health_window_m",
      "appearance_min_ratio"), 0, False, "a length or ratio"),
    (("min_row_contrast", "leaf_reach_spacings", "row_attach_spacings", "soil_sigmas",
      "appearance_radius_m", "boundary_offset"), 0, True, "a length, ratio or weight"),
    (("orientation_probes", "nodata_rim_px"), 0, True, "0 turns it off"),
)

#: Options that are shares or angles, with their closed range.
_CLOSED_RANGES: tuple[tuple[tuple[str, ...], float, float, str], ...] = (
    (("row_attached_support", "orientation_max_share", "veg_mix", "appearance_max_loss",
      "appearance_min_recall"), 0, 1, "a share"),
    (("orientation_min_deg",), 0, 90, "degrees between row directions; 0 turns it off"),
    (("ndvi_fixed", "ngrdi_min"), -1, 1, "a normalised difference"),
)


def _check_bounds(cfg: LabelFreeConfig) -> None:
    """Raise ConfigError for a numeric option outside its natural bounds (see the tables).

    Raises:
        ConfigError: naming the option, its bound, what it means and the value given.
    """
    for names, low, inclusive, meaning in _LOWER_BOUNDS:
        for name in names:
            value = getattr(cfg, name)
            if value < low or (value == low and not inclusive):
                raise ConfigError(
                    f"labelfree: {name} must be {'>=' if inclusive else '>'} {low:g} "
                    f"({meaning}; default {getattr(_DEFAULTS, name)!r}), got {value!r}"
                )
    for names, lo, hi, meaning in _CLOSED_RANGES:
        for name in names:
            value = getattr(cfg, name)
            if not lo <= value <= hi:
                raise ConfigError(
                    f"labelfree: {name} must be in [{lo:g}, {hi:g}] ({meaning}; default "
                    f"{getattr(_DEFAULTS, name)!r}), got {value!r}"
                )


def _check_ranges(cfg: LabelFreeConfig) -> None:
    """Raise ConfigError for a [min, max] pair given upside down or out of its domain.

    Raises:
        ConfigError: naming the options, the rule and the values given.
    """
    if cfg.row_reach_min_m > cfg.row_reach_max_m:
        raise ConfigError(
            f"labelfree: need row_reach_min_m <= row_reach_max_m, got {cfg.row_reach_min_m}, "
            f"{cfg.row_reach_max_m}"
        )
    for name, lo, hi in (("exg_range", -1.0, 2.0), ("ndvi_range", -1.0, 1.0)):
        low, high = getattr(cfg, name)
        # ExG = 2g - r - b of chromatic coordinates lies in [-1, 2]; NDVI in [-1, 1].
        if not lo <= low < high <= hi:
            raise ConfigError(
                f"labelfree: {name} must be [min, max] with {lo:g} <= min < max <= {hi:g} "
                f"(default {list(getattr(_DEFAULTS, name))}), got [{low}, {high}]"
            )
    if min(cfg.appearance_bins) < 1:
        raise ConfigError(
            f"labelfree: appearance_bins must be three counts >= 1 (1 leaves a feature out; "
            f"default {list(_DEFAULTS.appearance_bins)}), got {list(cfg.appearance_bins)}"
        )


_DEFAULTS = LabelFreeConfig()


def labelfree_config(options: Mapping[str, Any]) -> LabelFreeConfig:
    """A :class:`LabelFreeConfig` with ``options`` replacing its defaults.

    The options come from a run config (``model_options:``) or ``--model-option``. Values
    are checked against each field's default: numbers for numbers (an integer where the
    default is one), true/false for switches, lists of numbers of the same length for ranges.

    Raises:
        ConfigError: an unknown name (the message lists the valid ones) or a wrong value.
    """
    defaults = _DEFAULTS
    names = [f.name for f in fields(LabelFreeConfig)]
    values: dict[str, Any] = {}
    for key, value in options.items():
        if key not in names:
            near = difflib.get_close_matches(key, names, n=1)
            raise ConfigError(f"labelfree: unknown model option {key!r}"
                              + (f"; did you mean {near[0]}?" if near else "")
                              + f" (valid options: {', '.join(names)}; `agriseg models` "
                              "describes them)")
        default = getattr(defaults, key)
        values[key] = _option_value(key, value, default)
    return LabelFreeConfig(**values)


def _option_value(key: str, value: Any, default: Any) -> Any:
    """``value`` as the type of ``default``, or ConfigError saying what was expected."""
    def wrong(expected: str) -> ConfigError:
        return ConfigError(f"labelfree: model option {key} must be {expected} (default "
                           f"{default!r}), got {value!r}")

    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise wrong("true or false")
        return value
    if isinstance(default, tuple):
        if not isinstance(value, (list, tuple)) or len(value) != len(default):
            raise wrong(f"a list of {len(default)} numbers")
        return tuple(_option_value(key, v, d) for v, d in zip(value, default, strict=True))
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise wrong("a number")
    if isinstance(default, int):
        if value != int(value):
            raise wrong("a whole number")
        return int(value)
    return float(value)
