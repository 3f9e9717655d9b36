"""Band roles: which band of a survey raster is red, green, blue, NIR, red edge or alpha.

Roles are named with ``--bands`` (:meth:`BandRoles.parse`) or found in the file by
:func:`_detect_roles`: band descriptions ("Red", "B04", "NIR (842 nm)"), the file names of a
VRT stack of single-band files (Sentinel-2, Landsat 8/9, Pix4D), colour interpretation, else
the band order convention (R,G,B,NIR). Reflectance rasters are checked against physics (blue
darkest, NIR brightest), bands left unused or tagged alpha but graded like data are warned
about, and an untagged 0/255 band is recognised as a validity mask. The checks look at the
decimated sample that :func:`agriseg.raster.open_survey` reads once.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import rasterio
from rasterio.enums import ColorInterp, Resampling
from rasterio.errors import RasterioError

from agriseg.errors import AgrisegError, BandError
from agriseg.fill import _valid_values
from agriseg.rasterfile import _decimated_shape, _open

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

    ``sample`` returns every band at :data:`agriseg.raster.SAMPLE_SIDE` (see
    :func:`agriseg.raster._describe`).

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
        # Five bands too: an 8-bit stack of R,G,B,NIR,RE (WeedMap's PNGs, one file a band)
        # gets no camera-layout check, and its fifth band was dropped without a word.
        return roles, how, _unused_bands(ds, roles) if n >= 5 else []
    return {}, "nothing (fewer than 3 bands and no descriptions)", []


def _band_medians(
    ds: rasterio.DatasetReader, sample: Callable[[], np.ndarray]
) -> dict[int, float] | None:
    """Median of every band over the sample's valid pixels (None when too few are valid).

    Undeclared fills are left out as well (they are found only once the roles are known; see
    :func:`agriseg.fill._valid_values`): medians over a fill that covered half a camera's
    raster swapped its bands.
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
