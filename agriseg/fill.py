"""Undeclared nodata: which pixels of a survey raster are fill, not data.

Orthomosaics exported without a nodata value or an alpha band fill the area outside the flight
with black (0 in every band), white (the integer type's maximum in every band) or a large
negative value (-9999, -10000 in every band). Such a fill is taken as nodata only where it
runs in from the raster's edges, covering enough of them; the same pixels are left out of the
values that band roles and scale are judged on. Everything here looks at the decimated sample
that :func:`agriseg.raster.open_survey` reads; nothing opens a file.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import rasterio

# The raster's own logger: these lines are about the survey being opened, and filters on it
# (agriseg.train.data names an image instead of its temporary VRT) must see them.
log = logging.getLogger("agriseg.raster")

def _valid_values(
    ds: rasterio.DatasetReader, bands: list[int], alpha: int | None,
    sample: Callable[[], np.ndarray],
) -> np.ndarray:
    """Raw values ``(C, N)`` (float64) of ``bands`` at the sample's valid pixels.

    Valid: alpha above 0, or no band at the declared nodata; every band finite; and not an
    undeclared fill: black in every band, the integer type's maximum in every band (white),
    or a large negative value (-10000) in every band.
    """
    every = sample()
    data = every[[b - 1 for b in bands]].astype(np.float64)
    valid = np.isfinite(data).all(axis=0)
    dtype = np.dtype(ds.dtypes[bands[0] - 1])
    if dtype.kind in "ui":
        # A white fill (65535 in every band of a uint16 export) would set the 99th
        # percentile, and so the scale.
        valid &= ~(data == np.iinfo(dtype).max).all(axis=0)
    if alpha:
        valid &= every[alpha - 1] > 0
    elif ds.nodata is not None:
        valid &= ~(data == ds.nodata).any(axis=0)
    valid &= data.any(axis=0) & ~(data <= -9999).all(axis=0)
    return data[:, valid]


def _undeclared_edge_fill(
    ds: rasterio.DatasetReader, p: str, values: np.ndarray
) -> tuple[str, list[str]]:
    """The mask source for an undeclared black or white fill along the edges, and warnings.

    Args:
        ds: the raster, which declares neither nodata nor alpha.
        p: its path, for messages.
        values: decimated spectral bands ``(C, H, W)``.

    Returns:
        ``"black"``, ``"white"`` or ``"none"``, and the warnings for run.json and the report.
    """
    share = _black_fill_share(values)
    if share is not None:
        log.info(
            "%s: declares no nodata, but %.1f %% of it is pure black (every band 0) "
            "along its edges: taken as nodata (set a nodata value or an alpha band to "
            "say otherwise)", p, 100 * share,
        )
        if not _is_jpeg(ds):
            return "black", []
        # Lossy blocks smear the fill's edge into values of a few units that are not
        # black: a rim of "pixels" around the footprint gets classes.
        return "black", [
            "is JPEG-compressed, which leaves near-black pixels along the black fill's "
            "edge; they are classified. To mask them, add an alpha band first: "
            f"nearblack -setalpha -near 25 -of GTiff -o masked.tif {p}"
        ]
    dtype = np.dtype(ds.dtypes[0])  # the survey's dtype, which the reads mask with
    if dtype.kind not in "ui":
        return "none", []
    top = int(np.iinfo(dtype).max)
    share = _white_fill_share(values, top)
    if share is None:
        return "none", []
    return "white", [_white_fill_note(ds, p, share, top)]


def _black_fill_share(bands: np.ndarray) -> float | None:
    """Share of pure-black pixels when they look like an orthomosaic's fill, else ``None``.

    Orthomosaics exported without alpha or nodata (JPEG-compressed RGB, some reflectance
    exports) fill the area outside the flight with black: every band exactly 0, touching the
    raster's edges. Real imagery has hardly any pixel at 0 in every band, so black on at
    least 2 % of the edge and 0.5 % of the raster is fill; a stray black pixel inside is not.

    Args:
        bands: decimated spectral bands ``(C, H, W)``.
    """
    return _edge_fill_share(np.asarray(~bands.any(axis=0)))


#: Most pixels at the type's maximum in every band that the data inside a white fill may hold,
#: as a share of the pixels outside the fill. The unaltered samples hold under 0.05 %, a
#: white-filled Maricopa or Lamberton mosaic 0.01-0.2 %; overexposed (x2) mosaics 2.5-74 %,
#: where a white border cannot be told from clipped soil running off the edge.
WHITE_INSIDE_SHARE = 0.01

#: Least share of the raster's outermost pixels (all four sides) a white fill must cover. The
#: fill around an orthomosaic's footprint runs along most of its edges (the samples' fills:
#: 49-100 % of the edge pixels); a white roof, vehicle or panel touching one edge covers a few
#: per cent of them (5-10 % in the probes that were taken for fill before this rule).
WHITE_EDGE_SHARE = 0.2


def _white_fill_share(bands: np.ndarray, top: int) -> float | None:
    """Share of an undeclared white fill (every band at ``top``) along the edges, else None.

    Metashape and JPEG exports without alpha or nodata may fill the area outside the flight
    with white, which was read as bright soil. Overexposure clips soil to the same white, so
    only white that runs straight in from the raster's edges counts as fill (rows and
    columns of it, as a fill around the footprint is), on the evidence of black fill (see
    :func:`_black_fill_share`), only when it covers :data:`WHITE_EDGE_SHARE` of the edge
    pixels (a white object touching one edge does not), and only where the data inside holds
    hardly any such pixel (:data:`WHITE_INSIDE_SHARE`): an overexposed survey gets no fill
    warning.

    Args:
        bands: decimated spectral bands ``(C, H, W)`` of an integer type.
        top: the type's maximum (255 for uint8).
    """
    white = np.asarray((bands == top).all(axis=0))
    rim = np.concatenate([white[0], white[-1], white[1:-1, 0], white[1:-1, -1]])
    if rim.mean() < WHITE_EDGE_SHARE:
        return None
    runs = _edge_runs(white)
    share = _edge_fill_share(runs)
    inside = int((~runs).sum())
    if share is None or not inside or (white & ~runs).sum() > WHITE_INSIDE_SHARE * inside:
        return None
    return share


def _edge_runs(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` reached from an edge along their row or column through ``mask``."""
    runs = np.zeros_like(mask)
    for axis in (0, 1):
        runs |= np.logical_and.accumulate(mask, axis=axis)
        runs |= np.flip(np.logical_and.accumulate(np.flip(mask, axis), axis=axis), axis)
    return runs


def _white_fill_note(ds: rasterio.DatasetReader, p: str, share: float, top: int) -> str:
    """The warning for an undeclared white fill, with the command that declares it."""
    fix = f"declare it so that every program sees it: gdal_edit.py -a_nodata {top} {p}"
    if _is_jpeg(ds):
        # JPEG blurs the fill's edge into near-white values that no nodata value matches.
        fix = ("it is JPEG-compressed, so near-white pixels along the fill's edge are still "
               "classified: to mask them too, add an alpha band: nearblack -white -setalpha "
               f"-near 25 -of GTiff -o masked.tif {p} (or {fix})")
    return (f"declares no nodata, but {share:.1%} of it is pure white (every band {top}, the "
            "type's maximum) along its edges, as the fill outside the survey of exports "
            "without alpha is: taken as nodata (an alpha band or a declared nodata value says "
            f"otherwise); {fix}")


def _is_jpeg(ds: rasterio.DatasetReader) -> bool:
    """True for a JPEG file or a JPEG-compressed GeoTIFF (lossy: fills get blurred edges)."""
    compression = str(getattr(ds.compression, "value", ds.compression) or "")
    return ds.driver == "JPEG" or compression.upper().startswith("JPEG")


def _edge_fill_share(fill: np.ndarray) -> float | None:
    """Share of ``fill`` pixels if they cover >= 2 % of the edge and 0.5 % of the raster."""
    edge = np.concatenate([fill[0], fill[-1], fill[:, 0], fill[:, -1]])
    share = float(fill.mean())
    return share if share >= 0.005 and edge.mean() >= 0.02 else None


def _negative_fill(bands: np.ndarray) -> float | None:
    """The fill value of an undeclared large negative fill (-9999, -10000, -32768), else None.

    Reflectance and DEM-style exports fill the area outside the flight with such a value in
    every band; no imagery measures it. Taken as fill on the same evidence as black fill (see
    :func:`_black_fill_share`): at least 2 % of the edge and 0.5 % of the raster.

    Args:
        bands: decimated spectral bands ``(C, H, W)``.
    """
    fill = (bands <= -9999).all(axis=0) & (bands == bands[:1]).all(axis=0)
    if _edge_fill_share(fill) is None:
        return None
    values, counts = np.unique(bands[0][fill], return_counts=True)
    return float(values[np.argmax(counts)])
