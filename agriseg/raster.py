"""Open and validate survey rasters, resolve band roles, read tiles with halo and padding.

Datasets are opened by path inside each task (rasterio datasets do not pickle); what travels
between processes is a :class:`SurveyRaster`, a small frozen description of the file.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import re
import threading
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload
from xml.etree import ElementTree

import numpy as np
import rasterio
import rasterio.shutil
from affine import Affine
from rasterio.enums import ColorInterp, MaskFlags, Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.windows import Window

from agriseg.blocks import BlockCache
from agriseg.errors import AgrisegError, BandError, RasterError
from agriseg.grid import IMAGE_CRS, Grid, Tile

log = logging.getLogger(__name__)

MIN_SIDE = 8
ROLES = ("red", "green", "blue", "nir", "rededge", "alpha")

# Names seen in band descriptions of drone and satellite products, mapped to roles.
_DESCRIPTION_ROLES: dict[str, str] = {
    "red": "red",
    "r": "red",
    "b04": "red",
    "b4": "red",
    "green": "green",
    "g": "green",
    "b03": "green",
    "b3": "green",
    "blue": "blue",
    "b": "blue",
    "b02": "blue",
    "b2": "blue",
    "nir": "nir",
    "near infrared": "nir",
    "nearinfrared": "nir",
    "near-infrared": "nir",
    "b08": "nir",
    "b8": "nir",
    "b8a": "nir",  # Sentinel-2's narrow NIR; B08 comes first in band order when both exist
    "rededge": "rededge",
    "red edge": "rededge",
    "red-edge": "rededge",
    "re": "rededge",
    "b05": "rededge",
    "b5": "rededge",
    "alpha": "alpha",
    "mask": "alpha",
}

_COLORINTERP_ROLES = {
    ColorInterp.red: "red",
    ColorInterp.green: "green",
    ColorInterp.blue: "blue",
    ColorInterp.alpha: "alpha",
}


@dataclass(frozen=True, slots=True)
class BandRoles:
    """Which 1-based band of the raster plays which spectral role."""

    bands: tuple[tuple[str, int], ...]

    @classmethod
    def from_mapping(cls, mapping: dict[str, int]) -> BandRoles:
        """Build from ``{"red": 1, ...}``, validating role names."""
        for role in mapping:
            if role not in ROLES:
                raise BandError(
                    f"unknown band role {role!r}; valid roles: {', '.join(ROLES)} "
                    "(e.g. --bands red=1,green=2,blue=3,nir=4)"
                )
        return cls(tuple(sorted(mapping.items(), key=lambda kv: ROLES.index(kv[0]))))

    @classmethod
    def parse(cls, spec: str) -> BandRoles:
        """Parse ``"red=3,green=2,blue=1,nir=4"``.

        Raises:
            BandError: malformed spec or unknown role (the message lists the valid roles).
        """
        mapping: dict[str, int] = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            m = re.fullmatch(r"([A-Za-z_-]+)\s*=\s*(\d+)", part)
            if not m:
                raise BandError(
                    f"cannot parse band role {part!r} in --bands {spec!r}; "
                    "expected ROLE=INDEX pairs like red=1,green=2,blue=3,nir=4"
                )
            role, band = m.group(1).lower().replace("-", "").replace("_", ""), int(m.group(2))
            if role in mapping:
                raise BandError(f"--bands {spec!r} gives {role} twice; give each role once")
            taken = [r for r, b in mapping.items() if b == band]
            if taken:
                raise BandError(
                    f"--bands {spec!r} gives band {band} to both {taken[0]} and {role}; each "
                    "band has one role (gdalinfo lists the bands and their descriptions)"
                )
            mapping[role] = band
        if not mapping:
            raise BandError(f"--bands {spec!r} names no band; e.g. red=1,green=2,blue=3")
        return cls.from_mapping(mapping)

    def as_dict(self) -> dict[str, int]:
        """Role to band index."""
        return dict(self.bands)

    def get(self, role: str) -> int | None:
        """Band index of ``role`` or ``None``."""
        return self.as_dict().get(role)

    def has(self, *roles: str) -> bool:
        """True when every role is present."""
        d = self.as_dict()
        return all(r in d for r in roles)

    @property
    def spectral(self) -> tuple[str, ...]:
        """Roles other than alpha, in canonical order."""
        return tuple(r for r, _ in self.bands if r != "alpha")


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


def _alpha_bands(ds: rasterio.DatasetReader) -> list[int]:
    """The bands of ``ds`` tagged alpha (1-based)."""
    return [i for i, ci in enumerate(ds.colorinterp, start=1) if ci == ColorInterp.alpha]


def _tagged_alpha(path: str) -> set[int]:
    """The bands of ``path`` tagged alpha (none when it cannot be opened).

    Given --bands without its alpha band, an RGBA survey's band 4 looked spare, and a
    missing role's example named it.
    """
    try:
        with _open(path) as ds:
            return set(_alpha_bands(ds))
    except (RasterioError, AgrisegError):
        return set()


@contextlib.contextmanager
def no_georef_warning() -> Iterator[None]:
    """Silence rasterio's NotGeoreferencedWarning for images without a CRS.

    The callers say what a missing CRS means and what to do, once: ``_describe`` (no CRS),
    :func:`image_vrt` (``--gsd``), evaluation and training labels (compared by size).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        yield


def _open(path: str) -> rasterio.DatasetReader:
    if not path.startswith(("/vsi", "http")) and not os.path.exists(path):
        raise RasterError(f"{path}: file not found; check the path")
    try:
        with no_georef_warning():
            return rasterio.open(path)
    except RasterioError as exc:
        if zipfile.is_zipfile(path):
            # Orthomosaics are often delivered zipped; GDAL reads one only by its inner name.
            with zipfile.ZipFile(path) as z:
                inner = [n for n in z.namelist() if n.lower().endswith((".tif", ".tiff"))]
            raise RasterError(
                f"{path}: is a ZIP archive{' holding ' + ', '.join(inner[:3]) if inner else ''}"
                f"; unzip it (unzip {os.path.basename(path)}) and give the raster inside"
            ) from exc
        raise RasterError(
            f"{path}: not a readable raster ({exc}); give a GeoTIFF, COG or VRT that "
            "gdalinfo can open"
        ) from exc


#: Words of band descriptions that say nothing about the band (product prefixes).
_NEUTRAL_WORDS = frozenset({"rgb", "sr", "toa", "boa", "channel", "ch", "layer", "color", "colour"})

#: Centre wavelengths (nm) of each role, for band descriptions that give only a wavelength.
_WAVELENGTH_ROLES = ((400, 500, "blue"), (500, 600, "green"), (600, 690, "red"),
                     (690, 760, "rededge"), (760, 1000, "nir"))


def _description_role(desc: str) -> str | None:
    """The role a band description names, if any.

    "Red", "B04", "NIR" or, as multispectral cameras name their bands, "Red edge-717",
    "NIR (842 nm)", "Band 3 (560nm)".
    """
    key = desc.strip().lower()
    role = _DESCRIPTION_ROLES.get(key) or _DESCRIPTION_ROLES.get(key.replace(" ", ""))
    if role:
        return role
    words = re.sub(r"\d+(\.\d+)?\s*(nm)?|[^a-z ]", " ", key).split()
    words = [w for w in words if w != "band"]
    if len("".join(words)) >= 2:  # named ("Coastal 443", "LWIR" name none of the roles)
        # The "B" of band codes goes: "Red (B4)", "B02 - Blue", "Red edge (B5)".
        named = [w for w in words if w != "b"] or words
        role = (_DESCRIPTION_ROLES.get(" ".join(named))
                or _DESCRIPTION_ROLES.get("".join(named)))
        if role or len(named) < 2:
            return role
        # A colour word beside a product prefix ("rgb_red", "SR red"); any other word may
        # make it another band (PlanetScope's "coastal_blue", "green_i"; "Red edge
        # reflectance"), so then it names none.
        rest = [w for w in named if w not in _DESCRIPTION_ROLES]
        hits = {_DESCRIPTION_ROLES[w] for w in named if w in _DESCRIPTION_ROLES}
        return hits.pop() if len(hits) == 1 and set(rest) <= _NEUTRAL_WORDS else None
    # A letter left over ("B" of Sentinel-2's "B1") names nothing; a wavelength may.
    nm = [float(m) for m in re.findall(r"(\d{3}(?:\.\d+)?)\s*(?:nm)?", key)]
    hits = {r for lo, hi, r in _WAVELENGTH_ROLES for v in nm if lo <= v < hi}
    return hits.pop() if len(hits) == 1 else None


#: ``--bands`` layouts of common untagged multispectral exports, by spectral band count.
_LAYOUT_HINTS = {
    4: "--bands blue=1,green=2,red=3,nir=4 (PlanetScope) or --bands "
       "green=1,red=2,rededge=3,nir=4 (Parrot Sequoia)",
    5: "--bands blue=1,green=2,red=3,rededge=4,nir=5 (DJI P4 Multispectral, MicaSense "
       "Altum) or --bands blue=1,green=2,red=3,nir=4,rededge=5 (MicaSense RedEdge)",
    8: "--bands red=5,green=6,blue=7,nir=8 (the second date of a two-date R,G,B,NIR stack) "
       "or --bands blue=2,green=4,red=6,rededge=7,nir=8 (PlanetScope SuperDove)",
    # The 10/20 m Sentinel-2 stack leaves B1, B9 and B10 out: B2..B8, B8A, B11, B12.
    10: "--bands blue=1,green=2,red=3,rededge=4,nir=7 (Sentinel-2 B2..B8, B8A, B11, B12)",
    # 12- and 13-band Sentinel-2 stacks (B1..B12, B8A after B8) agree on their first eight.
    12: "--bands blue=2,green=3,red=4,rededge=5,nir=8 (Sentinel-2, bands B1..B12 in order)",
}


def _unused_bands(ds: rasterio.DatasetReader, roles: dict[str, int], *,
                  tagged: bool = False) -> list[str]:
    """A warning naming the data bands that ``roles`` leave unused (none: []).

    Args:
        ds: the raster.
        roles: the roles found.
        tagged: every role came from the bands' colour interpretation, none was guessed.
    """
    alpha = _alpha_bands(ds)
    unused = [i for i in range(1, ds.count + 1) if i not in roles.values() and i not in alpha]
    if not unused:
        return []
    listed = f"{', '.join(map(str, unused[:8]))}{' ...' if len(unused) > 8 else ''}"
    which = f"band {listed} is" if len(unused) == 1 else f"bands {listed} are"
    pairs = ", ".join(f"{r}={i}" for r, i in roles.items())
    if tagged:
        return [_untagged_spare_note(roles, unused, which, pairs)]
    # A two-date stack read as R,G,B,NIR ran on its first date alone, silently.
    n = ds.count - len(alpha)
    return [f"band roles guessed for {n} bands ({pairs}): {which} not used; if that is not "
            f"the layout, name the bands, e.g. {_layout_hint(n)}"]


def _untagged_spare_note(roles: dict[str, int], unused: list[int], which: str,
                         pairs: str) -> str:
    """The warning for bands left untagged beside tagged ones (R,G,B,Undefined,Alpha).

    The roles were read from the tags, not guessed, and the untagged bands are most likely
    NIR or red edge: the example keeps the tagged roles and names the spare bands, where the
    untagged layouts' hint (PlanetScope, Sequoia) dropped the alpha band and the tags.
    """
    free = [r for r in ("nir", "rededge") if r not in roles]
    named = {**roles, **dict(zip(free, unused, strict=False))}
    example = ",".join(f"{r}={i}" for r, i in sorted(named.items(), key=lambda kv: kv[1]))
    one = len(unused) == 1
    return (f"band roles from colour interpretation ({pairs}): {which} not used (tagged "
            f"neither red, green, blue nor alpha); if {'it is' if one else 'they are'} NIR or "
            f"red edge, name all the bands, e.g. --bands {example}"
            + ("" if len(unused) <= len(free) else " (with the bands that hold them)"))


def _layout_hint(n: int) -> str:
    """The ``--bands`` examples for ``n`` untagged bands (the closest count's)."""
    return _LAYOUT_HINTS.get(n) or _LAYOUT_HINTS[12 if n >= 12 else 5 if n < 8 else 8]


#: Sentinel-2 band codes as its file names write them (zero-padded): B02, B8A, B11.
_S2_FILE_BAND = re.compile(r"b(0[1-9]|1[0-2]|8a)")
_S2_FILE_ROLES = {"b02": "blue", "b03": "green", "b04": "red", "b05": "rededge",
                  "b06": "rededge", "b07": "rededge", "b08": "nir", "b8a": "nir"}
#: Landsat 8/9 OLI band codes (B2 blue ... B5 NIR); Landsat 4-7 number theirs otherwise (B4
#: is NIR there), and so does Sentinel-2 unpadded, so a code alone names no band.
_LANDSAT_FILE_BAND = re.compile(r"b([1-9]|1[01])")
_LANDSAT89_ROLES = {"b2": "blue", "b3": "green", "b4": "red", "b5": "nir"}
_LANDSAT89_PREFIX = re.compile(r"lc0?[89]")
_OTHER_LANDSAT_PREFIX = re.compile(r"l[cotem]0?[1-9]")
#: Colour words of file names (Pix4D's ``..._reflectance_red edge.tif``), and the words that
#: beside one make it another band (``coastal_blue``, ``green_i``, ``swir``).
_FILE_COLOUR_WORDS = frozenset({"blue", "green", "red", "nir", "rededge", "re"})
_FILE_COLOUR_PAIRS = frozenset({("red", "edge"), ("near", "infrared")})
_OTHER_BAND_WORDS = frozenset({"coastal", "aerosol", "deep", "yellow", "swir", "tir", "lwir",
                               "thermal", "pan", "cirrus", "i", "ii"})


def _file_name_band(name: str) -> tuple[str | None, str | None]:
    """The role a single-band file's name says, and its Sentinel-2 band code if any.

    ``T32TQM_20230101T101010_B04_10m.jp2`` is red (``B04``), ``LC08_..._SR_B5.TIF`` NIR,
    ``field_transparent_reflectance_red edge.tif`` red edge; ``B4.tif`` (which sensor?),
    ``coastal_blue.tif`` or a name saying two bands say none.
    """
    stem = os.path.splitext(name.replace("\\", "/").rsplit("/", 1)[-1])[0].lower()
    tokens = [t for t in re.split(r"[_\-.\s]+", stem) if t]
    landsat89 = bool(_LANDSAT89_PREFIX.match(stem))
    if landsat89:
        codes = {t for t in tokens if _LANDSAT_FILE_BAND.fullmatch(t)}
        table = _LANDSAT89_ROLES
    elif _OTHER_LANDSAT_PREFIX.match(stem):
        return None, None  # Landsat 4-7: other band numbers, and no colour words either
    else:
        codes = {t for t in tokens if _S2_FILE_BAND.fullmatch(t)}
        table = _S2_FILE_ROLES
    words: set[str | None] = set()
    if not _OTHER_BAND_WORDS.intersection(tokens):
        i = 0
        while i < len(tokens):
            pair = tuple(tokens[i:i + 2])
            if pair in _FILE_COLOUR_PAIRS:  # "red edge" names red edge, not red
                words.add(_description_role(" ".join(pair)))
                i += 2
                continue
            if tokens[i] in _FILE_COLOUR_WORDS:
                words.add(_description_role(tokens[i]))
            i += 1
    if len(codes) > 1 or len(words) > 1:
        return None, None
    code = next(iter(codes), None)
    said = {table.get(code)} if code else set()
    if len(said | words) != 1:  # nothing, or a code and a word that disagree ("B11_red")
        return None, None
    role = (said | words).pop()
    return role, code if code and not landsat89 else None


def _vrt_source_names(ds: rasterio.DatasetReader,
                      alpha: list[int]) -> list[str | None] | None:
    """The file each band of a ``gdalbuildvrt -separate`` stack reads (its band 1).

    ``None`` for a band that reads another band of its file, and ``None`` in all for a raster
    that is not a VRT, a VRT with a band made of several sources or none (a mosaic) or
    computed (a derived band), or one that cannot be parsed. ``alpha``: the bands tagged
    alpha, which may have any sources.
    """
    if ds.driver != "VRT" or len(ds.files) > ds.count + 1:  # more files than bands: a mosaic
        return None
    try:
        text = ds.tags(ns="xml:VRT").get("xml:VRT")
        if not text and os.path.isfile(ds.name):
            text = Path(ds.name).read_text(encoding="utf-8")
        root = ElementTree.fromstring(text) if text else None
    except (RasterioError, OSError, UnicodeDecodeError, ElementTree.ParseError):
        return None
    if root is None or root.tag != "VRTDataset" or root.get("subClass"):
        return None
    bands = root.findall("VRTRasterBand")
    if len(bands) != ds.count:
        return None
    names: list[str | None] = []
    for i, band in enumerate(bands, start=1):
        sources = [e for e in band if e.tag.endswith("Source")]
        if band.get("subClass") or (len(sources) != 1 and i not in alpha):
            return None
        src = sources[0] if len(sources) == 1 else None
        name = src.findtext("SourceFilename") if src is not None else None
        reads = (src.findtext("SourceBand") or "1").strip() if src is not None else ""
        names.append(name.strip() if name and name.strip() and reads == "1" else None)
    return names


def _source_name_roles(ds: rasterio.DatasetReader, alpha: list[int]) -> dict[str, int]:
    """Roles of a VRT stack of single-band files from the files' names ({} for none).

    ``gdalbuildvrt -separate`` copies no band description, so a Sentinel-2 stack of B02, B03,
    B04, B08 was read as R,G,B,NIR (red = B02). Only B05 of Sentinel-2's red-edge bands is
    red edge when present (else the first there), B8A is NIR only without B08; two bands
    named alike, or a band tagged alpha (``alpha``) named a colour, leave every name unread.
    """
    names = _vrt_source_names(ds, alpha)
    if not names:
        return {}
    found = [_file_name_band(n) if n else (None, None) for n in names]
    codes = {c for _, c in found if c}
    rededge = min(codes & {"b05", "b06", "b07"}, default=None)
    roles: dict[str, int] = {}
    for i, (role, code) in enumerate(found, start=1):
        if role is None or code in {"b06", "b07"} - {rededge}:
            continue
        if code == "b8a" and "b08" in codes:  # the narrow NIR, beside the broad one
            continue
        if role in roles or i in alpha:
            return {}
        roles[role] = i
    return roles


def _detect_roles(
    ds: rasterio.DatasetReader, sample: Callable[[], np.ndarray]
) -> tuple[dict[str, int], str, list[str]]:
    """Guess band roles from descriptions (or names), colour interpretation, then band count.

    A VRT stack of single-band files without descriptions is named by its files' names.

    ``sample`` returns every band at :data:`SAMPLE_SIDE` (see :func:`_describe`).

    Returns:
        The roles, how they were found, and doubts about them (warnings).
    """
    # A band tagged alpha is never data, whichever way the others are found.
    tagged_alpha = _alpha_bands(ds)
    roles: dict[str, int] = {}
    for i, desc in enumerate(ds.descriptions, start=1):
        role = _description_role(desc) if desc else None
        if role and role not in roles and (i not in tagged_alpha or role == "alpha"):
            roles[role] = i
    if len(roles.keys() - {"alpha"}) >= 2:  # e.g. Red, RedEdge, NIR: no green needed
        if tagged_alpha and "alpha" not in roles and tagged_alpha[0] not in roles.values():
            roles["alpha"] = tagged_alpha[0]
        return roles, "band descriptions", []
    if not any(ds.descriptions):
        # A VRT stack of single-band files (gdalbuildvrt -separate) has no descriptions;
        # the files' names often say the band (Sentinel-2 B04, Landsat 8/9 SR_B4, Pix4D
        # "..._red edge.tif").
        roles = _source_name_roles(ds, tagged_alpha)
        if len(roles) >= 2:
            if tagged_alpha:
                roles["alpha"] = tagged_alpha[0]
            return roles, "VRT source file names", []
    roles = {}
    for i, ci in enumerate(ds.colorinterp, start=1):
        role = _COLORINTERP_ROLES.get(ci)
        if role and role not in roles:
            roles[role] = i
    if roles.keys() >= {"red", "green", "blue"}:
        how = "colour interpretation"
        from_tags = dict(roles)
        if ds.count >= 4 + ("alpha" in roles) and "nir" not in roles:
            # RGBN products (NAIP) tag band 4 as undefined; take the next spare band as NIR.
            spare = [i for i in range(1, ds.count + 1) if i not in roles.values()]
            if spare and (ds.dtypes[0] != "uint8" or ds.count == 4):
                roles["nir"] = spare[0]
        if ds.dtypes[0] != "uint8" and "nir" in roles:
            roles, notes = _reflectance_order(ds, roles, sample)
            if notes:
                how += ", " + "; ".join(notes) + " (override with --bands)"
        return roles, how, _unused_bands(ds, roles, tagged=roles == from_tags)
    order = [i for i in range(1, ds.count + 1) if i not in tagged_alpha]
    n = len(order)
    if n >= 3:
        roles = dict(zip(("red", "green", "blue", "nir"), order, strict=False))
        if tagged_alpha:
            roles["alpha"] = tagged_alpha[0]
        how = f"band order convention for {n} bands (R,G,B{',NIR' if n >= 4 else ''})"
        if ds.dtypes[0] != "uint8" and n >= 4:
            # Untagged multispectral exports: five bands get the camera-layout check of tagged
            # ones; other layouts are only checked, since no single order is common to them.
            roles, notes = _reflectance_order(ds, roles, sample)
            doubt = None if notes else _convention_doubt(ds, sample)
            if notes:
                how += ", " + "; ".join(notes) + " (override with --bands)"
            elif doubt:
                how += f", doubtful: {doubt}"
                hint = _layout_hint(n)
                described = [d for d in ds.descriptions if d]
                said = (f" (band descriptions {', '.join(map(repr, described[:6]))} name no "
                        "band this program knows)" if described else "")
                return roles, how, [
                    f"band roles guessed from the band order R,G,B,NIR{said}, but {doubt}: "
                    "indices and classes may use the wrong bands; name the bands, e.g. "
                    f"{hint}"
                ]
        return roles, how, _unused_bands(ds, roles) if n > 5 else []
    return {}, "nothing (fewer than 3 bands and no descriptions)", []


def _band_medians(
    ds: rasterio.DatasetReader, sample: Callable[[], np.ndarray]
) -> dict[int, float] | None:
    """Median of every band over the sample's valid pixels (None when too few are valid).

    Undeclared fills are left out as well (they are found only once the roles are known; see
    :func:`_valid_values`): medians over a fill that covered half a camera's raster swapped
    its bands.
    """
    values = _valid_values(ds, list(range(1, ds.count + 1)), None, sample)
    if values.shape[1] < 100:
        return None
    return {i: float(np.median(values[i - 1])) for i in range(1, ds.count + 1)}


def _convention_doubt(ds: rasterio.DatasetReader, sample: Callable[[], np.ndarray]) -> str | None:
    """Why an untagged multispectral raster does not look like R,G,B,NIR, if it does not.

    Surface reflectance of soil and vegetation alike is lowest in blue and highest in NIR. Two
    four-band layouts break the convention: PlanetScope's B,G,R,NIR and Parrot Sequoia's
    G,R,RE,NIR; both put a band brighter than band 1 in third place.
    """
    med = _band_medians(ds, sample)
    if med is None:
        return None
    if med[3] > 1.1 * med[1]:
        return "band 3 (taken as blue) is brighter than band 1 (taken as red)"
    if med[4] < max(med[1], med[2], med[3]):
        return "band 4 (taken as NIR) is darker than a visible band"
    return None


def _reflectance_order(
    ds: rasterio.DatasetReader, roles: dict[str, int], sample: Callable[[], np.ndarray]
) -> tuple[dict[str, int], list[str]]:
    """Check colour-interpretation roles of a multispectral reflectance raster against physics.

    Multispectral exports often carry RGB colour tags on bands stored as B,G,R,... and leave
    NIR and red edge untagged, in an order that differs between cameras (MicaSense RedEdge
    ...,NIR,RE; Altum ...,RE,NIR). Surface reflectance of soil and vegetation alike is lowest in
    blue and highest in the NIR plateau, so in that five-band layout (RGB tags and two
    untagged bands): a "red" band darker than the "blue" band swaps them, and of the two
    untagged bands the brighter is NIR and the other red edge. Only used for non-8-bit
    rasters (camera JPEG colours follow white balance, not physics).
    """
    spare = [i for i in range(1, ds.count + 1)
             if (i not in roles.values() or i == roles["nir"]) and i != roles.get("alpha")]
    if len(spare) != 2 or "rededge" in roles:
        # Not the five-band camera layout: top-of-atmosphere reflectance (haze) can make blue
        # brighter than red over dense canopy, so the tags are trusted as they are.
        return roles, []
    med = _band_medians(ds, sample)
    if med is None:
        return roles, []
    roles, notes = dict(roles), list[str]()
    if med[roles["red"]] < 0.9 * med[roles["blue"]]:
        roles["red"], roles["blue"] = roles["blue"], roles["red"]
        notes.append(f"red and blue swapped (band {roles['blue']} is darker than band "
                     f"{roles['red']}, as blue reflectance is)")
    nir, rededge = sorted(spare, key=med.__getitem__, reverse=True)
    if nir != roles["nir"]:
        notes.append(f"NIR is band {nir}, the brighter untagged band")
    roles["nir"], roles["rededge"] = nir, rededge
    notes.append(f"red edge is band {rededge}")
    return roles, notes


#: Share of an alpha band's pixels between transparent and opaque above which it looks like
#: data. Orthomosaic tools feather the footprint's edge over a few pixels (well under 1 %).
ALPHA_DATA_SHARE = 0.05


def _alpha_doubt(values: np.ndarray, band: int) -> list[str]:
    """A warning when the alpha band ``band`` holds graded values, as a NIR band does.

    RGB + NIR tiles saved as 4-channel PNGs (labelled datasets) come back from GDAL with the
    NIR band tagged alpha: it became the nodata mask, and NIR went unused.
    """
    # Between the band's own extremes, not the type's: a 16-bit survey may hold a 0/255 alpha.
    if not values.size or len(np.unique(values)) <= 2:
        return []
    graded = float(((values > values.min()) & (values < values.max())).mean())
    if graded <= ALPHA_DATA_SHARE:
        return []
    return [f"band {band} is tagged alpha and used as the nodata mask, but {graded:.0%} of "
            "its pixels are neither transparent nor opaque, as a NIR band saved in an alpha "
            f"channel is: if it is NIR, give --bands red=1,green=2,blue=3,nir={band}"]


#: Share of a validity band's pixels that may lie between 0 and its maximum: a mask
#: resampled with averaging (gdalwarp -r average) grades the edge of the footprint.
MASK_EDGE_SHARE = 0.02


def _looks_like_alpha(ds: rasterio.DatasetReader, band: int) -> bool:
    """True when an undeclared band is a validity mask: 0 and one maximum, nearly only.

    The maximum is 255 or the type's (a 16-bit copy of an 8-bit mask scaled x257 holds
    0/65535); a few graded values are allowed along the edge. Both were read as NIR, and an
    RGB survey ran on an NDVI of its own mask, without a warning.
    """
    dtype = np.dtype(ds.dtypes[band - 1])
    if dtype.kind not in "ui":
        return False
    small = _decimated_shape(ds.height, ds.width, 256)
    values = ds.read(band, out_shape=small, resampling=Resampling.nearest)
    top = int(values.max())
    if top not in (255, np.iinfo(dtype).max) or not (values == 0).any():
        return False
    graded = (values > 0) & (values < top)
    return bool(graded.mean() <= MASK_EDGE_SHARE)


def _decimated_shape(height: int, width: int, max_side: int) -> tuple[int, int]:
    f = max(1.0, max(height, width) / max_side)
    return (max(1, round(height / f)), max(1, round(width / f)))


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
) -> tuple[np.ndarray, np.ndarray]:
    """Read ``roles`` in ``window`` as scaled float32 ``(C, H, W)`` plus validity ``(H, W)``.

    Raises:
        RasterError: the window cannot be read (corrupt or truncated file): names the window.
    """
    own = ds is None
    idx = [survey.roles.as_dict()[r] for r in roles]
    try:
        with _read_errors(survey, window):
            if ds is None:
                ds = rasterio.open(survey.path)
            raw, mask = _read_bands_mask(ds, survey, idx, window)
            valid = mask.astype(bool, copy=False)
    finally:
        if own and ds is not None:
            ds.close()
    return scaled_bands(raw, valid, survey)


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
    raw = np.empty((len(idx), h, w), survey.dtype)
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
            raw[:, dy, dx] = got[0][:, sy, sx]
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
    return scaled_bands(raw, valid, survey)


def scaled_bands(
    raw: np.ndarray, valid: np.ndarray, survey: SurveyRaster
) -> tuple[np.ndarray, np.ndarray]:
    """Raw band values to scaled float32; nodata in any band or non-finite is invalid (0).

    The validity every reader of a survey shares: tiles, overviews and the report's maps.
    """
    # One pass converts and scales (an integer band times a float32 scalar is float32).
    data = np.multiply(raw, np.float32(survey.scale), dtype=np.float32)
    if survey.offset:
        data += np.float32(survey.offset)
    # GDAL's mask flags the nodata value of band 1 only; check every band.
    if survey.nodata is not None:
        valid &= ~(raw == survey.nodata).any(axis=0)
    elif survey.mask_source == "black":
        valid &= raw.any(axis=0)
    elif survey.mask_source == "white":
        valid &= ~(raw == np.iinfo(np.dtype(survey.dtype)).max).all(axis=0)
    if raw.dtype.kind == "f":  # integers are always finite
        valid &= np.isfinite(data).all(axis=0)
    if not valid.all():
        if raw.dtype.kind == "f":  # NaN and inf stay NaN when multiplied by 0
            data[:, ~valid] = 0.0
        else:
            # 3x faster than the boolean index (a 2112 px RGBA tile: 23 against 70 ms).
            np.multiply(data, valid, out=data)
    return data, valid


def read_tile(
    survey: SurveyRaster,
    roles: tuple[str, ...],
    tile: Tile,
    ds: rasterio.DatasetReader | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Read a tile's read window and reflect-pad it to ``core + 2 * halo``.

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
    shared = _read_shared(survey, roles, tile.read, needed_from) if ds is None else None
    data, valid = shared or read_window(survey, roles, tile.read, ds)
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
