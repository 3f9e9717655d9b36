"""Open and validate survey rasters, resolve band roles, read tiles with halo and padding.

Datasets are opened by path inside each task (rasterio datasets do not pickle); what travels
between processes is a :class:`SurveyRaster`, a small frozen description of the file. Which
band is which is worked out in :mod:`agriseg.bands`, which pixels are undeclared fill in
:mod:`agriseg.fill`; :func:`open_survey` brings them together with the scale.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import numpy as np
import rasterio
import rasterio.shutil
from affine import Affine
from rasterio.enums import ColorInterp, MaskFlags, Resampling
from rasterio.errors import RasterioError
from rasterio.windows import Window

from agriseg.bands import (
    BandRoles,
    _alpha_doubt,
    _description_role,
    _detect_roles,
    _looks_like_alpha,
    _tagged_alpha,
)
from agriseg.blocks import BlockCache
from agriseg.errors import AgrisegError, BandError, RasterError
from agriseg.fill import _black_fill_share, _negative_fill, _undeclared_edge_fill, _valid_values
from agriseg.grid import IMAGE_CRS, Grid, Tile
from agriseg.rasterfile import _decimated_shape, _open, no_georef_warning

log = logging.getLogger(__name__)

MIN_SIDE = 8


@dataclass(frozen=True, slots=True)
class SurveyRaster:
    """A validated input raster, described by value so it can travel to Dask workers.

    Attributes:
        path: absolute path (or GDAL URI) of the raster.
        grid: its grid.
        count: number of bands.
        dtype: numpy dtype name of the bands.
        roles: spectral band roles.
        nodata: declared nodata value, or the undeclared fill found (``mask_source`` fill).
        scale: multiply raw values by this, then add ``offset``, to get reflectance-like
            0..1 values.
        mask_source: how validity is decided: ``alpha`` (band ``roles.alpha``), ``gdal``
            (GDAL's mask: nodata or per-dataset mask), ``black`` (pixels 0 in every band
            read: an orthomosaic's undeclared fill), ``white`` (pixels at the type's maximum,
            255 for uint8, in every band read: the undeclared white fill of Metashape and JPEG
            exports), ``fill`` (an undeclared large negative fill such as -10000 in every
            band, kept in ``nodata``) or ``none`` (every pixel valid).
        roles_from: how the roles were found (``--bands``, band descriptions, colour
            interpretation or the band order convention, with any physics checks).
        offset: added after ``scale`` (Sentinel-2 L2A since processing baseline 04.00:
            -0.1, as the file declares it).
        warnings: doubts about the roles or the scaling, for run.json and the report.
    """

    path: str
    grid: Grid
    count: int
    dtype: str
    roles: BandRoles
    nodata: float | None
    scale: float
    mask_source: str
    roles_from: str = ""
    offset: float = 0.0
    warnings: tuple[str, ...] = ()

    def require(self, roles: tuple[str, ...], who: str = "the model", *,
                name_bands: str = "--bands",
                otherwise: str = "run a model for the bands it has (e.g. --model labelfree) "
                                 "or a survey that has them") -> None:
        """Raise a clear :class:`BandError` unless all ``roles`` are available.

        Args:
            roles: the band roles needed.
            who: what needs them, for the message.
            name_bands: where the user names band roles (``--bands`` for a run, a data
                entry's ``bands:`` for training).
            otherwise: what to do when the raster has no band left for a missing role.

        Raises:
            BandError: listing the missing and present roles and the ``--bands`` fix.
        """
        missing = [r for r in roles if not self.roles.has(r)]
        if missing:
            present = ", ".join(f"{r}={i}" for r, i in self.roles.bands) or "none"
            # The example uses this raster's spare bands: a fixed red=1,...,nir=4 named the
            # alpha band of an RGBA survey as NIR.
            used = {i for _, i in self.roles.bands} | _tagged_alpha(self.path)
            spare = [i for i in range(1, self.count + 1) if i not in used]
            if len(spare) >= len(missing):
                pairs = [(r, i) for r, i in self.roles.bands if r != "alpha"]
                pairs += list(zip(missing, spare, strict=False))
                example = ",".join(f"{r}={i}" for r, i in pairs)
                fix = (f"Name the bands with --bands, e.g. --bands {example}"
                       if name_bands == "--bands" else
                       f"Name the bands with {name_bands}, e.g. {example}")
            else:
                fix = f"It has no band left for {', '.join(missing)}: {otherwise}"
            raise BandError(
                f"{self.path}: {who} needs band roles {', '.join(roles)} but "
                f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing "
                f"(found: {present}; {self.count} band(s)). {fix}"
            )

    def to_dict(self) -> dict[str, object]:
        """JSON-friendly description for manifests."""
        return {
            "path": self.path,
            "grid": self.grid.to_dict(),
            "count": self.count,
            "dtype": self.dtype,
            "roles": self.roles.as_dict(),
            "roles_from": self.roles_from,
            "nodata": self.nodata,
            "scale": self.scale,
            "offset": self.offset,
            "mask_source": self.mask_source,
        }


def _choose_scale(dtype: np.dtype[Any], values: np.ndarray) -> float:
    """Scale raw values to 0..1 reflectance-like values (documented in the README).

    uint8, and wider integers holding nothing above 255: 1/255. Integer types: 1/10000 when
    the 99th percentile of a decimated read is below 12000 (Sentinel-2 / Landsat style
    reflectance x 10000), else 1/65535. Floats: 1 when values look like 0..1 reflectance,
    1/255 for 0..255, else 1/10000.
    """
    if dtype == np.uint8:
        return 1.0 / 255.0
    p99 = float(np.percentile(values, 99)) if values.size else 1.0
    if np.issubdtype(dtype, np.integer):
        if values.size and values.max() <= 255:
            # 8-bit data in a wider type (a 16-bit export of an RGB mosaic): no reflectance
            # x 10000 survey is that dark everywhere (soil reflects 0.1-0.3).
            return 1.0 / 255.0
        return 1.0 / 10000.0 if p99 < 12000 else 1.0 / 65535.0
    if p99 <= 1.5:
        return 1.0
    if p99 <= 255 * 1.5:
        return 1.0 / 255.0
    return 1.0 / 10000.0


def _tag_values(ds: rasterio.DatasetReader, bands: list[int], name: str) -> set[float]:
    """Numeric values of metadata items (the dataset's, ``bands``') whose key has ``name``.

    Sentinel-2 converters write BOA_ADD_OFFSET, BOA_ADD_OFFSET_B04, ...
    """
    items = list(ds.tags().items())
    for b in bands:
        items += ds.tags(b).items()
    found = set()
    for key, value in items:
        if name in key.upper():
            with contextlib.suppress(ValueError):
                found.add(float(value))
    return found


def _scaling(
    ds: rasterio.DatasetReader, p: str, bands: list[int], alpha: int | None,
    sample: Callable[[], np.ndarray], gsd_m: float,
) -> tuple[float, float, list[str]]:
    """Scale and offset from raw values to 0..1 reflectance, and doubts about them.

    In order: the scale and offset the bands declare (GDAL's, ``gdal_edit.py -scale -offset``;
    Sentinel-2 L2A since processing baseline 04.00 declares 0.0001 and -0.1), when they give
    reflectance-like values; Sentinel-2's BOA_ADD_OFFSET / BOA_QUANTIFICATION_VALUE metadata;
    else a scale guessed from the values (:func:`_choose_scale`), no offset.
    """
    dtype = np.dtype(ds.dtypes[bands[0] - 1])
    if dtype == np.uint8 and all(ds.scales[b - 1] == 1 and ds.offsets[b - 1] == 0
                                 for b in bands):
        return 1.0 / 255.0, 0.0, []
    values = _valid_values(ds, bands, alpha, sample)
    # The darkest band's 1st percentile: an offset's floor (Sentinel-2's 1000).
    floor = float(np.percentile(values, 1, axis=1).min()) if values.shape[1] else 0.0
    scales = {float(ds.scales[b - 1]) for b in bands}
    offsets = {float(ds.offsets[b - 1]) for b in bands}
    if scales != {1.0} or offsets != {0.0}:
        scale, offset = float(ds.scales[bands[0] - 1]), float(ds.offsets[bands[0] - 1])
        p99 = float(np.percentile(values * scale + offset, 99)) if values.size else 0.5
        if scale > 0 and 0.02 < p99 <= 1.5:
            if len(scales) > 1 or len(offsets) > 1:
                log.warning("%s: its bands declare different scales or offsets; all are "
                            "read with band %d's (%g, %g)", p, bands[0], scale, offset)
            log.info("%s: reflectance = value x %g + %g, as the bands declare", p, scale, offset)
            return scale, offset, []
        log.info("%s: the declared scale %g and offset %g do not give 0..1 reflectance (99th "
                 "percentile %.3g); ignored", p, scale, offset, p99)
    adds = _tag_values(ds, bands, "BOA_ADD_OFFSET")
    if len(adds) == 1:
        quant = _tag_values(ds, bands, "QUANTIFICATION_VALUE")
        q = quant.pop() if len(quant) == 1 and min(quant) > 0 else 10000.0
        add = adds.pop()
        # Only where the values carry it: data harmonised to the old baseline (the offset
        # removed) keep the tags they were made from.
        if add < 0 and floor >= 0.9 * -add:
            log.info("%s: reflectance = (value %+g) / %g, from its BOA_ADD_OFFSET metadata",
                     p, add, q)
            return 1.0 / q, add / q, []
        log.info("%s: BOA_ADD_OFFSET %g in its metadata, but its values (1st percentile %g) "
                 "do not carry it; not applied", p, add, floor)
    scale = _choose_scale(dtype, values)
    notes = []
    if (np.issubdtype(dtype, np.integer) and scale == 1.0 / 10000.0 and gsd_m >= 5
            and values.shape[1] >= 100 and floor >= 1000):
        # Sentinel-2 L2A since processing baseline 04.00 (2022) stores reflectance x 10000
        # + 1000; without its metadata nothing tells it apart, but no band of real
        # reflectance x 10000 data has almost every pixel above 0.1 (vegetation reflects
        # 0.02-0.05 in blue). Satellite pixels only: drone cameras scale reflectance their
        # own ways (MicaSense's uint16 exports x 32768 are as bright).
        notes.append(
            "every band is at least 1000 almost everywhere, as in Sentinel-2 L2A products "
            "of processing baseline 04.00 and later, whose reflectance is (value - 1000) / "
            "10000; read as value / 10000, their indices (NDVI) come out too low. If it is "
            f"such a product, declare it and rerun: gdal_edit.py -scale 0.0001 -offset -0.1 {p}"
        )
    return scale, 0.0, notes


def absolute_path(path: str | os.PathLike[str]) -> str:
    """``path`` made absolute as the operating system resolves it.

    ``os.path.abspath`` drops ``link/..`` as text, where the system follows the link first:
    ``linkdata/../rgb.tif`` read another raster than the one the fields and ``--out`` beside
    it were resolved against. Paths without ``..`` keep their links (a survey linked into a
    project folder is recorded under that name).
    """
    p = os.fspath(path)
    return os.path.realpath(p) if ".." in Path(p).parts else os.path.abspath(p)


def image_vrt(src: str | os.PathLike[str], vrt: str | os.PathLike[str], gsd_m: float) -> str:
    """A VRT that places an image without georeferencing on a metric image plane.

    The VRT reads ``src`` unchanged and gives it pixels of ``gsd_m`` metres, the top-left
    corner at (0, 0) and :data:`agriseg.grid.IMAGE_CRS`; outputs on its grid have the image's
    rows and columns, so they compare pixel for pixel with labels of the image. The file is
    only rewritten when its content changes, which keeps a resumed run's input the same.

    Args:
        src: the image (PNG, JPEG, TIFF: anything GDAL reads) without a CRS.
        vrt: where to write the VRT.
        gsd_m: ground sampling distance in metres.

    Returns:
        The VRT's path.

    Raises:
        RasterError: the image cannot be read, or it has a CRS (``--gsd`` would hide it).
    """
    p = absolute_path(os.fspath(src))
    with _open(p) as ds:
        if ds.crs is not None:
            raise RasterError(
                f"{p}: is georeferenced ({ds.crs.to_string()}); --gsd is only for images "
                "without a CRS: drop it"
            )
        if ds.driver in ("PNG", "JPEG") and ds.width * ds.height > 50e6:
            # Neither format has tiles: every tile read decodes the image from its top.
            log.warning(
                "%s: a %.0f MP %s is decoded from its first row for every tile; convert it "
                "once to a tiled GeoTIFF for speed (gdal_translate -co TILED=YES -co "
                "COMPRESS=DEFLATE IN OUT.tif, then --gsd on that)",
                p, ds.width * ds.height / 1e6, ds.driver,
            )
    out = Path(vrt)
    tmp = out.with_name(f".{out.name}.partial")
    try:
        with no_georef_warning():
            rasterio.shutil.copy(p, tmp, driver="VRT")
            with rasterio.open(tmp, "r+") as ds:
                ds.crs = IMAGE_CRS
                ds.transform = Affine(gsd_m, 0, 0, 0, -gsd_m, 0)
        if out.exists() and out.read_bytes() == tmp.read_bytes():
            tmp.unlink()
        else:
            os.replace(tmp, out)
    except RasterioError as exc:
        tmp.unlink(missing_ok=True)
        raise RasterError(f"{p}: cannot wrap the image in a VRT ({exc})") from exc
    return os.fspath(out)


def open_survey(path: str | os.PathLike[str], bands: str | BandRoles | None = None) -> SurveyRaster:
    """Open, validate and describe a survey raster.

    Args:
        path: GDAL-readable raster (GeoTIFF, COG, VRT).
        bands: explicit band roles (``"red=3,green=2,blue=1,nir=4"``); detected when omitted.

    Returns:
        The validated description.

    Raises:
        RasterError: unreadable, not georeferenced, rotated, unsupported dtype.
        BandError: a band role names a band the raster does not have.
    """
    p = os.fspath(path)
    if not p.startswith(("/vsi", "http")):
        p = absolute_path(p)
    with _open(p) as ds:
        try:
            return _describe(ds, p, bands)
        except RasterioError as exc:
            raise RasterError(
                f"{p}: cannot read the raster ({gdal_reason(exc)}); the file is probably "
                "truncated or corrupt: re-export it (gdalinfo -checksum shows bad blocks)"
            ) from exc


def _describe(
    ds: rasterio.DatasetReader, p: str, bands: str | BandRoles | None
) -> SurveyRaster:
    """Validate an open dataset and describe it (see :func:`open_survey`)."""
    if ds.driver == "VRT":
        # GDAL opens a VRT whose sources are gone and fails only when it reads them.
        missing = [f for f in ds.files[1:]
                   if not f.startswith(("/vsi", "http")) and not os.path.exists(f)]
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise RasterError(
                f"{p}: the VRT's source file(s) {', '.join(missing[:3])}{more} do not exist; "
                "put them back where the VRT expects them, or rebuild it (gdalbuildvrt)"
            )
    if ds.count == 0 or ds.width < MIN_SIDE or ds.height < MIN_SIDE:
        raise RasterError(
            f"{p}: raster is {ds.width}x{ds.height} px with {ds.count} band(s); at least "
            f"{MIN_SIDE}x{MIN_SIDE} px and one band are needed to segment anything"
        )
    dtype = np.dtype(ds.dtypes[0])
    if dtype.kind == "c":
        raise RasterError(
            f"{p}: complex data type {dtype} is not imagery; convert to uint8, uint16 or "
            "float32 (gdal_translate -ot Float32)"
        )
    _refuse_gcps_only(ds, p)
    if ds.crs is None:
        raise RasterError(
            f"{p}: raster has no CRS, so outputs could not be placed on a map; assign one, "
            "e.g. gdal_edit.py -a_srs EPSG:32615 FILE, or, for an image without "
            "georeferencing (a photo, a dataset tile), give its pixel size in metres "
            "(agriseg run --gsd, or gsd: in a training data entry) to work in image "
            "coordinates"
        )
    t = ds.transform
    if t.is_identity or (t.a == 1 and t.e == 1 and t.c == 0 and t.f == 0):
        raise RasterError(
            f"{p}: raster has no geotransform (pixel coordinates only); georeference it "
            "first (gdal_edit.py -a_ullr or gdalwarp with GCPs)"
        )
    if t.b != 0 or t.d != 0:
        raise RasterError(
            f"{p}: rotated or sheared geotransform is not supported; warp it north-up "
            "first: gdalwarp -r near IN OUT"
        )
    if t.e > 0 or t.a < 0:  # maps, report and fields assume rows run south, columns east
        how = "south-up: rows run north" if t.e > 0 else "columns run west"
        raise RasterError(
            f"{p}: the grid is flipped ({how}); warp it north-up first: gdalwarp -r near IN OUT"
        )
    grid = Grid((ds.height, ds.width), t, ds.crs)
    # Role checks and the scale choice share one decimated read of every band, made only if
    # one of them needs it (8-bit rasters and explicit --bands mostly do not).
    small = _decimated_shape(ds.height, ds.width, SAMPLE_SIDE)
    sample = functools.cache(lambda: _decimated_bands(ds, list(range(1, ds.count + 1)), small))
    notes: list[str] = []  # doubts, warned about and kept for run.json and the report
    if isinstance(bands, str):
        bands = BandRoles.parse(bands)
    if bands is not None:
        mapping = bands.as_dict()
        for role, idx in mapping.items():
            if not 1 <= idx <= ds.count:
                raise BandError(
                    f"{p}: --bands gives {role}={idx} but the raster has {ds.count} "
                    f"band(s); use indices 1..{ds.count}"
                )
        how = "--bands"
    else:
        mapping, how, notes = _detect_roles(ds, sample)
    alpha = mapping.get("alpha")
    if alpha is None:
        flagged = [
            i for i, f in enumerate(ds.mask_flag_enums, start=1) if MaskFlags.alpha in f
        ]
        if flagged:
            alpha = None  # GDAL already derives the mask from the flagged alpha band
        elif bands is None and mapping.get("nir") == 4 and ds.count == 4 and _looks_like_alpha(
            ds, 4
        ):
            # e.g. drone RGB with an unflagged 0/255 validity band: it is not NIR.
            log.info("%s: band 4 is a validity mask (0 and its maximum) and is used as alpha, not "
                     "NIR", p)
            del mapping["nir"]
            mapping["alpha"] = alpha = 4
    if alpha is not None:
        mask_source = "alpha"
        if bands is None and "nir" not in mapping:
            notes += _alpha_doubt(sample()[alpha - 1], alpha)
    elif ds.nodata is not None or any(
        MaskFlags.per_dataset in f or MaskFlags.alpha in f for f in ds.mask_flag_enums
    ):
        mask_source = "gdal"
    else:
        mask_source = "none"
    spectral = [i for r, i in mapping.items() if r != "alpha"]
    # The fill checks below share one copy of the spectral bands of the sample.
    spectral_sample = functools.cache(lambda: sample()[[i - 1 for i in spectral]])
    if not spectral:
        _refuse_palette(ds, p, sample)
    if not spectral and ds.count < 3:
        # Often a derived product (an NDVI, a DEM, a class map) given instead of the image.
        named = [f"band {i} {what}" for i, d in enumerate(ds.descriptions, start=1)
                 if d and (what := _description_role(d))]
        said = (f"band descriptions that name only {', '.join(named)}" if named else
                "no band descriptions naming them")
        raise BandError(
            f"{p}: has {ds.count} band(s) and {said}, but "
            "segmenting needs colour (red, green, blue) or red and NIR bands. If it is a "
            "band stack, name the bands, e.g. --bands red=1,nir=2; a single-band product "
            "(an NDVI, a DEM, a mask) cannot be segmented: run on the orthomosaic it was made "
            "from"
        )
    if not spectral:
        raise BandError(
            f"{p}: cannot tell which band is which ({ds.count} band(s), detected from "
            f"{how}); name them with --bands, e.g. --bands red=1,green=2,blue=3"
        )
    if np.dtype(ds.dtypes[spectral[0] - 1]).kind not in "uif":
        raise RasterError(f"{p}: unsupported data type {ds.dtypes[spectral[0] - 1]}")
    if mask_source == "none" and len(spectral) >= 2:  # red + NIR stacks too
        mask_source, fill_notes = _undeclared_edge_fill(ds, p, spectral_sample())
        notes += fill_notes
    nodata = ds.nodata
    if mask_source == "gdal" and alpha is None and nodata is not None and np.isfinite(nodata):
        # A declared nodata that no pixel holds while the edges hold another fill (declared
        # -9999, filled -10000): the fill was read as soil, its NDVI of exactly 0 made the
        # soil mode, and every real pixel of the Danforth sample became crop.
        values = spectral_sample()
        if not (values == nodata).any():
            fill = _negative_fill(values) if dtype.kind in "fi" else None
            black = _black_fill_share(values) if fill is None else None
            if fill is not None or black is not None:
                found = fill if fill is not None else 0.0
                notes.append(
                    f"declares nodata {nodata:g}, which no sampled pixel holds, but its edges "
                    f"hold {found:g} in every band: taken as nodata (fix the file with "
                    f"gdal_edit.py -a_nodata {found:g})")
                nodata, mask_source = (fill, "fill") if fill is not None else (None, "black")
    if mask_source == "none" and dtype.kind in "fi":
        fill = _negative_fill(spectral_sample())
        if fill is not None:
            nodata, mask_source = fill, "fill"
            log.info(
                "%s: declares no nodata, but its edges hold %g in every band: taken as "
                "nodata (set the nodata value, e.g. gdal_edit.py -a_nodata %g, to say so)",
                p, fill, fill,
            )
    scale, offset, doubts = _scaling(ds, p, spectral, alpha, sample, grid.gsd_m)
    notes += doubts
    for note in notes:
        log.warning("%s: %s", p, note)
    roles = BandRoles.from_mapping(mapping)
    log.info(
        "%s: %dx%d px, %d band(s) %s (%d spectral), roles %s (from %s), mask from %s, scale "
        "%.6g%s, GSD %.3g m", p, grid.width, grid.height, ds.count, dtype, len(spectral),
        roles.as_dict(), how, mask_source, scale, f", offset {offset:g}" if offset else "",
        grid.gsd_m,
    )
    return SurveyRaster(p, grid, int(ds.count), str(dtype), roles, nodata, scale, mask_source,
                        how, offset, tuple(notes))


def _refuse_gcps_only(ds: rasterio.DatasetReader, p: str) -> None:
    """Raise for a raster georeferenced by ground control points only.

    GDAL keeps the GCPs' CRS apart from the dataset's, and there is no geotransform: the
    "no CRS" error's advice (gdal_edit.py -a_srs) changed nothing, and the error came back.

    Raises:
        RasterError: with the gdalwarp command that puts the raster on a grid.
    """
    if not ds.transform.is_identity:
        return
    gcps, crs = ds.gcps
    if not gcps:
        return
    code = crs.to_epsg() if crs is not None else None
    if code is not None:
        where, warp = f"in EPSG:{code}", f"gdalwarp -r near -t_srs EPSG:{code} {p} warped.tif"
    elif crs is not None:  # a CRS without an EPSG code: gdalwarp warps into the GCPs' CRS
        where, warp = f"in {crs.to_string()}", f"gdalwarp -r near {p} warped.tif"
    else:
        where = "without a CRS"
        warp = (f"gdalwarp -r near -s_srs EPSG:CODE -t_srs EPSG:CODE {p} warped.tif, with "
                "CODE the CRS the GCPs' coordinates are in")
    raise RasterError(
        f"{p}: is georeferenced by {len(gcps)} ground control points (GCPs, {where}) only, "
        "without a geotransform, so its pixels are not on a map grid and assigning a CRS "
        f"does not help; warp it onto a grid first, e.g. {warp}, and run on warped.tif"
    )


#: Fewest distinct values of a paletted band that make it an image, not a class map: the
#: class maps with colour tables (agriseg's classes.tif, the synthetic truths) hold 4-5.
PALETTE_IMAGE_VALUES = 16


def _refuse_palette(ds: rasterio.DatasetReader, p: str,
                    sample: Callable[[], np.ndarray]) -> None:
    """Raise for a paletted image: its band holds colour-table indices, not colours.

    It was told it had too few bands and that a single-band product cannot be segmented,
    though its colours are one gdal_translate away. A class map with a colour table (few
    distinct values) is left to that message, which fits it.

    Raises:
        BandError: with the gdal_translate -expand command.
    """
    palette = [i for i, ci in enumerate(ds.colorinterp, start=1) if ci == ColorInterp.palette]
    if not palette or len(np.unique(sample()[palette[0] - 1])) <= PALETTE_IMAGE_VALUES:
        return
    try:
        entries = list(ds.colormap(palette[0]).values())
    except ValueError:  # tagged palette without a colour table
        entries = []
    # A colour table with transparent entries keeps them as an alpha band.
    expand = "rgba" if any(len(e) > 3 and e[3] < 255 for e in entries) else "rgb"
    raise BandError(
        f"{p}: is a paletted image (band {palette[0]} holds indices into a colour table, not "
        f"colours); expand it to colour bands first: gdal_translate -expand {expand} {p} "
        f"{expand}.tif, and run on {expand}.tif (a class map cannot be segmented: run on the "
        "orthomosaic it was made from)"
    )


def _read_valid(
    ds: rasterio.DatasetReader,
    survey: SurveyRaster,
    window: Window | None,
    out_shape: tuple[int, int] | None = None,
) -> np.ndarray:
    alpha = survey.roles.get("alpha")
    kw: dict[str, object] = {"window": window, "out_shape": out_shape}
    if survey.mask_source == "alpha" and alpha is not None:
        return np.asarray(ds.read(alpha, resampling=Resampling.nearest, **kw) > 0)
    if survey.mask_source == "gdal":
        return np.asarray(ds.read_masks(1, resampling=Resampling.nearest, **kw) > 0)
    if out_shape is not None:
        return np.ones(out_shape, dtype=bool)
    if window is not None:
        return np.ones((int(window.height), int(window.width)), dtype=bool)
    return np.ones(survey.grid.shape_yx, dtype=bool)


def _read_bands_mask(
    ds: rasterio.DatasetReader, survey: SurveyRaster, idx: list[int], window: Window
) -> tuple[np.ndarray, np.ndarray]:
    """Bands ``idx`` in ``window`` and what marks their valid pixels.

    That is bool validity (:func:`_read_valid`), or an unsigned alpha band, valid where
    nonzero (``bool(alpha)``). An alpha band comes in the same read as the bands: read on its
    own it cost a sixth of a GPU run's block decoding (1 GP RGBA mosaic, H200 host) although
    GDAL's cache held it. Bands and alpha are views of that one read, kept as they are by a
    block cache (no copy; for uint8 the same bytes as the bands and a bool validity).
    """
    alpha = survey.roles.get("alpha")
    if survey.mask_source == "alpha" and alpha is not None and len(set(ds.dtypes)) == 1:
        both = ds.read([*idx, alpha], window=window)
        if both.dtype.kind == "u":
            return both[:-1], both[-1]
        return both[:-1].copy(), both[-1] > 0
    return ds.read(idx, window=window), _read_valid(ds, survey, window)


def read_window(
    survey: SurveyRaster,
    roles: tuple[str, ...],
    window: Window,
    ds: rasterio.DatasetReader | None = None,
    raw: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Read ``roles`` in ``window`` as scaled float32 ``(C, H, W)`` plus validity ``(H, W)``.

    ``raw``: the band values unscaled instead (only where :func:`raw_scalable`).

    Raises:
        RasterError: the window cannot be read (corrupt or truncated file): names the window.
    """
    own = ds is None
    idx = [survey.roles.as_dict()[r] for r in roles]
    try:
        with _read_errors(survey, window):
            if ds is None:
                ds = rasterio.open(survey.path)
            data, mask = _read_bands_mask(ds, survey, idx, window)
            valid = mask.astype(bool, copy=False)
    finally:
        if own and ds is not None:
            ds.close()
    return (_raw_bands if raw else scaled_bands)(data, valid, survey)


def gdal_reason(exc: BaseException) -> str:
    """GDAL's own words for a failed read.

    rasterio's "Read failed. See previous exception for details." names none; the exception
    it chains does.
    """
    text = str(exc)
    if "See previous exception" in text and exc.__cause__ is not None:
        text = str(exc.__cause__)
    return text.strip().rstrip(".") or type(exc).__name__


_BLOCK_OFFSET = re.compile(r"IReadBlock failed at X offset (\d+), Y offset (\d+)")


def _bad_block(path: str, reason: str) -> str:
    """Where GDAL's failed block lies, in pixels; "" when the reason names no block.

    GDAL names a block by its column and row among the blocks ("X offset 5, Y offset 4"),
    which read as pixel 5, 4.
    """
    m = _BLOCK_OFFSET.search(reason)
    # GDAL names the file whose block failed first ("cut.tif, band 1: ..."): the survey's
    # own, or a source of a VRT mosaic, whose blocks and offset are another matter.
    named = reason.split(", band ", 1)[0]
    if m is None or "," in named or os.path.basename(named) != os.path.basename(path):
        return ""
    try:
        with _open(path) as ds:
            bh, bw = ds.block_shapes[0]
            height, width = ds.height, ds.width
    except (RasterioError, AgrisegError):
        return ""
    bx, by = int(m.group(1)), int(m.group(2))
    return (f"; the bad block is the file's block {bx}, {by}: rows {by * bh}.."
            f"{min((by + 1) * bh, height)}, cols {bx * bw}..{min((bx + 1) * bw, width)}")


@contextlib.contextmanager
def _read_errors(survey: SurveyRaster, window: Window) -> Iterator[None]:
    try:
        yield
    except RasterioError as exc:
        reason = gdal_reason(exc)
        raise RasterError(
            f"{survey.path}: cannot read pixels in window rows {int(window.row_off)}.."
            f"{int(window.row_off + window.height)}, cols {int(window.col_off)}.."
            f"{int(window.col_off + window.width)} ({reason}"
            f"{_bad_block(survey.path, reason)}); the file is probably truncated or corrupt: "
            "re-export or re-download it (gdalinfo -checksum shows bad blocks)"
        ) from exc


# Tiles of one process read through a shared cache of decoded blocks (see agriseg.blocks).
# Tiles drop the blocks no later tile needs (see _read_shared), so what stays is about two rows
# of cache blocks across a swath of tiles (the overlap one tile row leaves to the next; swaths
# are ~8192 px wide, see agriseg.grid.plan_tiles) and the tiles in flight: ~60 MiB for RGBA.
TILE_CACHE_BYTES = 192 * 2**20
# Cache blocks are the file's blocks grouped to at least this side, so a tile needs few reads.
CACHE_BLOCK_SIDE = 512
# Files whose cache block would be larger (striped files: one block is a whole-width strip)
# are read window by window as before.
CACHE_BLOCK_MAX_BYTES = 8 * 2**20
_TILE_BLOCKS = BlockCache(TILE_CACHE_BYTES)


def clear_tile_cache() -> None:
    """Free the decoded blocks that tiles of this process shared."""
    _TILE_BLOCKS.clear()


@functools.lru_cache(maxsize=8)
def _cache_block_shape(stamp: tuple[str, int, int]) -> tuple[int, int]:
    # The whole stamp is the cache key: a rewritten file is looked at again.
    with rasterio.open(stamp[0]) as ds:
        bh, bw = ds.block_shapes[0]
        return (min(bh * math.ceil(CACHE_BLOCK_SIDE / bh), ds.height),
                min(bw * math.ceil(CACHE_BLOCK_SIDE / bw), ds.width))


def _read_shared(
    survey: SurveyRaster,
    roles: tuple[str, ...],
    window: Window,
    needed_from: tuple[int | None, int, bool] | None = None,
    raw: bool = False,
) -> tuple[np.ndarray, np.ndarray] | None:
    """:func:`read_window` through the shared block cache; None where it does not apply.

    Args:
        survey: the raster.
        roles: band roles to read, in this order.
        window: the window (inside the raster).
        needed_from: ``(row, col, swath_end)``: where the read windows of the tiles after
            this one start (next tile row, None if there is none; next tile in the row or
            the next swath), and whether this is the last tile of its row in the swath.
            Blocks wholly above and left of it are dropped once read: tiles run row-major
            in each swath (see :func:`agriseg.grid.plan_tiles`), so no later tile asks for
            them (an earlier one still running loads them uncached), and the cache then
            holds about two rows of blocks across the swath rather than every block of the
            last few tile rows. The last tile of a row in its swath also drops the blocks it
            shares with the next swath, which decodes them again rather than the cache
            holding them through the whole swath.
        raw: the band values unscaled instead (only where :func:`raw_scalable`).
    """
    stamp = _file_stamp(survey.path)
    if stamp is None:  # a GDAL URI (/vsicurl/...) or a path only GDAL resolves
        return None
    ch, cw = _cache_block_shape(stamp)
    idx = [survey.roles.as_dict()[r] for r in roles]
    # A cache block holds the bands and a one-byte validity mask per pixel.
    if ch * cw * (len(idx) * np.dtype(survey.dtype).itemsize + 1) > CACHE_BLOCK_MAX_BYTES:
        return None
    source = (stamp, tuple(idx), survey.mask_source)  # + block row and column
    r0, c0 = int(window.row_off), int(window.col_off)
    h, w = int(window.height), int(window.width)
    data = np.empty((len(idx), h, w), survey.dtype)
    valid = np.empty((h, w), bool)
    ds: rasterio.DatasetReader | None = None

    def overlap(by: int, bx: int) -> tuple[slice, slice, slice, slice]:
        """The block's intersection with the window: rows, cols in the window, then in it."""
        y0, y1 = max(r0, by * ch), min(r0 + h, by * ch + ch)
        x0, x1 = max(c0, bx * cw), min(c0 + w, bx * cw + cw)
        return (slice(y0 - r0, y1 - r0), slice(x0 - c0, x1 - c0),
                slice(y0 - by * ch, y1 - by * ch), slice(x0 - bx * cw, x1 - bx * cw))

    def load(block: Window) -> tuple[np.ndarray, ...]:
        nonlocal ds
        with _read_errors(survey, block):
            if ds is None:
                ds = rasterio.open(survey.path)
            return _read_bands_mask(ds, survey, idx, block)

    spans = {(by, bx): overlap(by, bx) for by in range(r0 // ch, (r0 + h - 1) // ch + 1)
             for bx in range(c0 // cw, (c0 + w - 1) // cw + 1)}

    def area(cell: tuple[int, int]) -> int:
        ys, xs = spans[cell][:2]
        return (ys.stop - ys.start) * (xs.stop - xs.start)

    # The blocks mostly inside the window first: the halo's blocks, mostly outside it, are
    # the neighbouring tiles' own, which their threads may have decoded by then.
    items = [((*source, by, bx), functools.partial(load, Window(
        bx * cw, by * ch, min(cw, survey.grid.width - bx * cw),
        min(ch, survey.grid.height - by * ch))))
        for by, bx in sorted(spans, key=area, reverse=True)]
    try:
        for key, got in _TILE_BLOCKS.get_many(items):
            dy, dx, sy, sx = spans[key[-2:]]
            data[:, dy, dx] = got[0][:, sy, sx]
            valid[dy, dx] = got[1][sy, sx]  # an alpha mask: nonzero is valid
    finally:
        if ds is not None:
            ds.close()
    if needed_from is not None:
        row, col, swath_end = needed_from
        rows = range(r0 // ch, (r0 + h - 1) // ch + 1 if row is None else row // ch)
        _TILE_BLOCKS.drop((*source, by, bx) for by in rows for bx in range(c0 // cw, col // cw))
        if swath_end:
            # Not retired: the next swath asks for them again and shares them among its tiles.
            _TILE_BLOCKS.drop(((*source, by, bx) for by in rows
                               for bx in range(col // cw, (c0 + w - 1) // cw + 1)),
                              retire=False)
    return (_raw_bands if raw else scaled_bands)(data, valid, survey)


def scaled_bands(
    raw: np.ndarray, valid: np.ndarray, survey: SurveyRaster
) -> tuple[np.ndarray, np.ndarray]:
    """Raw band values to scaled float32; nodata in any band or non-finite is invalid (0).

    The validity every reader of a survey shares: tiles, overviews and the report's maps.
    """
    data = scale_values(raw, survey)
    valid = _band_validity(raw, valid, survey)
    if raw.dtype.kind == "f":  # integers are always finite
        valid &= np.isfinite(data).all(axis=0)
    if not valid.all():
        if raw.dtype.kind == "f":  # NaN and inf stay NaN when multiplied by 0
            data[:, ~valid] = 0.0
        else:
            # 3x faster than the boolean index (a 2112 px RGBA tile: 23 against 70 ms).
            np.multiply(data, valid, out=data)
    return data, valid


def scale_values(raw: np.ndarray, survey: SurveyRaster) -> np.ndarray:
    """Band values in the survey's float32 units: ``raw * scale + offset``.

    One pass converts and scales (an integer band times a float32 scalar is float32). Raw
    tiles (:func:`read_tile` with ``raw=True``) scaled here equal the scaled read.
    """
    data = np.multiply(raw, np.float32(survey.scale), dtype=np.float32)
    if survey.offset:
        data += np.float32(survey.offset)
    return data


def raw_scalable(survey: SurveyRaster) -> bool:
    """Whether :func:`read_tile` can return ``survey``'s band values unscaled (``raw=True``).

    8-bit bands without an offset: ``raw * scale`` is then what :func:`scaled_bands` gives,
    zeros included, so a model may scale them where it runs (a GPU gets a quarter of the
    bytes, and the tile threads skip a float32 pass over every pixel).
    """
    return np.dtype(survey.dtype) == np.uint8 and not survey.offset


def _band_validity(raw: np.ndarray, valid: np.ndarray, survey: SurveyRaster) -> np.ndarray:
    """``valid`` (updated in place) less the pixels whose band values are the survey's fill."""
    # GDAL's mask flags the nodata value of band 1 only; check every band.
    if survey.nodata is not None:
        valid &= ~(raw == survey.nodata).any(axis=0)
    elif survey.mask_source == "black":
        valid &= raw.any(axis=0)
    elif survey.mask_source == "white":
        valid &= ~(raw == np.iinfo(np.dtype(survey.dtype)).max).all(axis=0)
    return valid


def _raw_bands(
    raw: np.ndarray, valid: np.ndarray, survey: SurveyRaster
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`scaled_bands` without the scaling: 8-bit values, 0 where invalid."""
    valid = _band_validity(raw, valid, survey)
    if not valid.all():
        raw = np.multiply(raw, valid, out=raw if raw.flags.writeable else None)
    return raw, valid


def read_tile(
    survey: SurveyRaster,
    roles: tuple[str, ...],
    tile: Tile,
    ds: rasterio.DatasetReader | None = None,
    raw: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Read a tile's read window and reflect-pad it to ``core + 2 * halo``.

    Args:
        survey: the raster.
        roles: band roles to read, in this order.
        tile: the tile.
        ds: an open dataset to read from (otherwise through the shared block cache).
        raw: the 8-bit band values unscaled, 0 where invalid (only where
            :func:`raw_scalable`): ``pixels * survey.scale`` is what ``raw=False`` returns.

    Returns:
        ``(pixels, valid)``: float32 ``(C, H, W)`` scaled values and bool ``(H, W)``; padded
        pixels take reflected values and validity so edge tiles match a whole-raster run.
    """
    halo = int(tile.core.row_off - tile.read.row_off) + tile.pad[0]
    # The last tile of a row in its swath: the blocks it shares with the next swath are
    # decoded again there rather than held through the whole swath. No tile row below: no
    # later tile of the swath reads these rows.
    core_end = int(tile.core.row_off + tile.core.height)
    needed_from = (None if core_end >= survey.grid.height else core_end - halo,
                   int(tile.core.col_off + tile.core.width) - halo, tile.swath_end)
    if raw and not raw_scalable(survey):
        raise ValueError(f"{survey.path}: {survey.dtype} bands cannot be read unscaled")
    shared = _read_shared(survey, roles, tile.read, needed_from, raw) if ds is None else None
    data, valid = shared or read_window(survey, roles, tile.read, ds, raw=raw)
    top, bottom, left, right = tile.pad
    if any(tile.pad):
        data = np.pad(data, ((0, 0), (top, bottom), (left, right)), mode="symmetric")
        valid = np.pad(valid, ((top, bottom), (left, right)), mode="symmetric")
    return data, valid


# Decimated whole-raster reads decode every block of a file without internal overviews (about
# 3 s per 100 MP of RGBA here). A run needs one for the model's prepare, the nodata-tile plan
# and the quick-look, so one read of every band at OVERVIEW_SIDE serves them all.
OVERVIEW_SIDE = 2048
# Side of the decimated read of every band that the band-role check and the scale choice
# look at when a raster is opened.
SAMPLE_SIDE = 512
# Largest full-resolution window one thread of :func:`_sampled_read` holds.
SAMPLED_READ_BYTES = 64 * 2**20
# Largest every-band sample at OVERVIEW_SIDE kept from the band check's pass for the overview
# read: a 2048 px RGBA sample is 16 MB, 5 bands of 16 bits 40 MB. Longer stacks (13 bands of
# 16 bits: 109 MB, of which the overview reads a few) are read twice instead.
SHARED_SAMPLE_BYTES = 48 * 2**20
# One file's sample at a time: (file stamp, shape) -> every band.
_SHARED_SAMPLE: dict[tuple[object, tuple[int, int]], np.ndarray] = {}
_OVERVIEWS: dict[tuple[object, ...], tuple[np.ndarray, np.ndarray, float]] = {}


def read_overview(
    survey: SurveyRaster, roles: tuple[str, ...], max_side: int = OVERVIEW_SIDE
) -> tuple[np.ndarray, np.ndarray, float]:
    """Read a decimated view of the whole raster (uses the file's overviews when present).

    Views up to :data:`OVERVIEW_SIDE` come from one cached read of all spectral bands, reduced
    by block means where a smaller ``max_side`` is asked for; validity is then "any valid
    input pixel in the cell", so no cell with data is lost.

    Returns:
        ``(pixels, valid, factor)`` where ``factor`` is input pixels per overview pixel.
    """
    if max_side > OVERVIEW_SIDE:
        data, valid, factor = _read_overview(survey, roles, max_side)
        return data, valid, factor
    bands = survey.roles.spectral
    # The path too: every unstamped one (/vsizip/...) has the stamp None.
    key = (survey.path, _file_stamp(survey.path), bands, survey.mask_source, survey.scale,
           survey.offset)
    if key not in _OVERVIEWS:
        _OVERVIEWS.clear()  # one survey at a time: bounded memory in long-lived processes
        _OVERVIEWS[key] = _read_overview(survey, bands, OVERVIEW_SIDE)
    data, valid, factor = _OVERVIEWS[key]
    data = data[[bands.index(r) for r in roles]]
    k = math.ceil(max(valid.shape) / max_side)
    if k <= 1:
        return data, valid, factor
    return (*_block_mean(data, valid, k), survey.grid.width / math.ceil(valid.shape[1] / k))


def _block_mean(data: np.ndarray, valid: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean of valid pixels over ``k x k`` blocks (ragged edge blocks use what they have)."""
    h, w = valid.shape
    ph, pw = -h % k, -w % k
    v = np.pad(valid, ((0, ph), (0, pw))).astype(np.float32)
    d = np.pad(data, ((0, 0), (0, ph), (0, pw))) * v
    hk, wk = (h + ph) // k, (w + pw) // k
    n = v.reshape(hk, k, wk, k).sum(axis=(1, 3))
    s = d.reshape(d.shape[0], hk, k, wk, k).sum(axis=(2, 4))
    return (s / np.maximum(n, 1)).astype(np.float32), n > 0


def _read_overview(
    survey: SurveyRaster, roles: tuple[str, ...], max_side: int
) -> tuple[np.ndarray, np.ndarray, float]:
    shape = _decimated_shape(survey.grid.height, survey.grid.width, max_side)
    try:
        with rasterio.open(survey.path) as ds:
            idx = [survey.roles.as_dict()[r] for r in roles]
            alpha = survey.roles.get("alpha")
            if _gdal_decimates_fast(ds, idx[0], shape):
                raw = _read_by_type(ds, idx, out_shape=(len(idx), *shape),
                                    resampling=Resampling.average)
                valid = _read_valid(ds, survey, None, shape)
            else:
                extra = [alpha] if survey.mask_source == "alpha" and alpha is not None else []
                both = _shared_sample(survey.path, [*idx, *extra], shape)
                if both is None:
                    both = _sampled_read(survey.path, [*idx, *extra], shape)
                raw = both[: len(idx)]
                valid = both[-1] > 0 if extra else _read_valid(ds, survey, None, shape)
    except RasterioError as exc:
        raise RasterError(
            f"{survey.path}: cannot read an overview ({gdal_reason(exc)}); the file is "
            "probably truncated or corrupt: re-export or re-download it (gdalinfo -checksum "
            "shows bad blocks)"
        ) from exc
    data, valid = scaled_bands(raw, valid, survey)
    factor = survey.grid.width / shape[1]
    return data, valid, factor


def _read_by_type(ds: rasterio.DatasetReader, indexes: list[int], **kw: Any) -> np.ndarray:
    """``ds.read(indexes, **kw)``, one data type at a time into the type that holds them all.

    rasterio refuses to read bands of two types at once ("more than one 'dtype' found"): a
    VRT of uint16 colour bands and a uint8 alpha.
    """
    types = [ds.dtypes[i - 1] for i in indexes]
    if len(set(types)) == 1:
        return np.asarray(ds.read(indexes, **kw))
    parts = {t: [k for k, u in enumerate(types) if u == t] for t in dict.fromkeys(types)}
    shape = kw.pop("out_shape", None)
    read = {t: ds.read([indexes[k] for k in at], **kw,
                       **({"out_shape": (len(at), *shape[1:])} if shape else {}))
            for t, at in parts.items()}
    out = np.empty((len(indexes), *next(iter(read.values())).shape[1:]), np.result_type(*types))
    for t, at in parts.items():
        out[at] = read[t]
    return out


def _decimated_bands(ds: rasterio.DatasetReader, indexes: list[int],
                     shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour decimated read of ``indexes`` that decodes each block at most once.

    On a file without overviews the same pass also samples every band at
    :data:`OVERVIEW_SIDE` for the run's overview read (:func:`read_overview`), which would
    otherwise decode the whole file again: 1.3 s of a 67 MP RGBA run's 5 s before its first
    tile here (2 cores), about 20 s per GP.
    """
    if _gdal_decimates_fast(ds, indexes[0], shape):
        return _read_by_type(ds, indexes, out_shape=(len(indexes), *shape),
                             resampling=Resampling.nearest)
    _SHARED_SAMPLE.clear()  # an earlier survey's, never taken
    big = _decimated_shape(ds.height, ds.width, OVERVIEW_SIDE)
    every = list(range(1, ds.count + 1))
    nbytes = ds.count * big[0] * big[1] * np.dtype(ds.dtypes[0]).itemsize
    stamp = _file_stamp(ds.name)
    # Not shared: a file read whole by the overview (GDAL reads it directly), samples too
    # big to hold meanwhile, and paths that cannot be stamped (/vsizip/, /vsicurl/).
    if (big in (shape, (ds.height, ds.width)) or nbytes > SHARED_SAMPLE_BYTES
            or stamp is None or len(set(ds.dtypes)) > 1):
        return _sampled_read(ds.name, indexes, shape)
    small, large = _sampled_read(ds.name, every, shape, also=big)
    _SHARED_SAMPLE[stamp, big] = large
    return small[[i - 1 for i in indexes]]


def _shared_sample(path: str, indexes: list[int], shape: tuple[int, int]) -> np.ndarray | None:
    """Bands ``indexes`` at ``shape`` from the sample :func:`_decimated_bands` kept, if any.

    Taken once: the overview read keeps what it needs (:data:`_OVERVIEWS`).
    """
    stamp = _file_stamp(path)
    every = None if stamp is None else _SHARED_SAMPLE.pop((stamp, shape), None)
    return None if every is None else every[[i - 1 for i in indexes]]


def _file_stamp(path: str) -> tuple[str, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:  # a GDAL URI (/vsicurl/...)
        return None
    return (path, st.st_mtime_ns, st.st_size)


def _gdal_decimates_fast(ds: rasterio.DatasetReader, band: int, shape: tuple[int, int]) -> bool:
    """Whether GDAL reads ``shape`` cheaply: from the file's overviews, or not decimated."""
    return bool(ds.overviews(band)) or shape == (ds.height, ds.width)


def sample_positions(size: int, count: int) -> np.ndarray:
    """Indices of ``count`` nearest-neighbour samples of ``size`` cells (each cell's centre)."""
    return np.minimum(((np.arange(count) + 0.5) * size / count).astype(np.int64), size - 1)


@overload
def _sampled_read(path: str, indexes: list[int], shape: tuple[int, int]) -> np.ndarray: ...


@overload
def _sampled_read(path: str, indexes: list[int], shape: tuple[int, int],
                  also: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]: ...


def _sampled_read(
    path: str, indexes: list[int], shape: tuple[int, int], also: tuple[int, int] | None = None
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Nearest-neighbour decimated read that decodes each block once, on up to 8 threads.

    With ``also``, the same pass samples that second shape too and both are returned.

    Written by hand because GDAL's decimated RasterIO on a file without overviews decodes the
    whole file once per band (4 bands of a 268 MP RGBA file: 14.7 s, one band: 3.9 s); here
    full-resolution strips of every band are read together and sampled in numpy. Each thread
    holds at most :data:`SAMPLED_READ_BYTES` (a 1 GP VRT mosaic on 16 cores: 4.7 s on two).
    """
    from concurrent.futures import ThreadPoolExecutor

    with rasterio.open(path) as ds:
        height, width = ds.height, ds.width
        strip, block_w = (max(v, 1) for v in ds.block_shapes[0])
        dtype = np.result_type(*(ds.dtypes[i - 1] for i in indexes))
    # Column windows keep each read under the budget however wide the raster is.
    per_col = strip * len(indexes) * np.dtype(dtype).itemsize
    span = max(block_w, (SAMPLED_READ_BYTES // per_col) // block_w * block_w)
    shapes = [shape] if also is None else [shape, also]
    grids = [(sample_positions(height, sh[0]), sample_positions(width, sh[1])) for sh in shapes]
    outs = [np.zeros((len(indexes), *sh), dtype) for sh in shapes]
    starts = [r for r in range(0, height, strip)
              if any(((rows >= r) & (rows < r + strip)).any() for rows, _ in grids)]

    stop = threading.Event()

    def work(part: list[int]) -> None:
        try:
            read_part(part)
        except BaseException:
            stop.set()  # the others stop at once, before the caller sees this one fail
            raise

    def read_part(part: list[int]) -> None:
        with rasterio.open(path) as ds:
            for r0 in part:
                sels = [np.nonzero((rows >= r0) & (rows < r0 + strip))[0] for rows, _ in grids]
                h = min(strip, height - r0)
                for c0 in range(0, width, span):
                    if stop.is_set():
                        return
                    csels = [np.nonzero((cols >= c0) & (cols < c0 + span))[0]
                             for _, cols in grids]
                    if not any(sel.size and csel.size for sel, csel in zip(sels, csels,
                                                                           strict=True)):
                        continue
                    w = min(span, width - c0)
                    block = _read_by_type(ds, indexes, window=Window(c0, r0, w, h))
                    for out, (rows, cols), sel, csel in zip(outs, grids, sels, csels,
                                                            strict=True):
                        if sel.size and csel.size:
                            out[:, sel[:, None], csel[None, :]] = block[:, rows[sel] - r0][
                                :, :, cols[csel] - c0]

    n = max(1, min(8, len(os.sched_getaffinity(0)), len(starts)))
    with ThreadPoolExecutor(n) as pool:
        try:
            list(pool.map(work, [starts[i::n] for i in range(n)]))
        except BaseException:
            # Ctrl-C, or a bad block in one thread: the others stop at their next strip
            # instead of decoding the rest of the file (minutes on a few GP) before the pool
            # lets the error through.
            stop.set()
            raise
    return outs[0] if also is None else (outs[0], outs[1])


def tile_has_data(valid_overview: np.ndarray, factor: float, tile: Tile) -> bool:
    """Whether a tile's core may contain valid pixels, judged on the overview mask.

    One overview pixel of margin is kept on every side so decimation never drops a tile with
    a thin strip of data.
    """
    h, w = valid_overview.shape
    r0 = max(0, math.floor(tile.core.row_off / factor) - 1)
    r1 = min(h, math.ceil((tile.core.row_off + tile.core.height) / factor) + 1)
    c0 = max(0, math.floor(tile.core.col_off / factor) - 1)
    c1 = min(w, math.ceil((tile.core.col_off + tile.core.width) / factor) + 1)
    return bool(valid_overview[r0:r1, c0:c1].any())
