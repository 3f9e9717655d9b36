"""Vegetation indices from band roles.

Inputs are reflectance-like float32 arrays scaled to 0..1 (see :mod:`agriseg.raster`). Every
function is elementwise and safe where the denominator is zero (returns 0 there).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

_EPS = np.float32(1e-6)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.zeros(np.broadcast(num, den).shape, np.float32)
    np.divide(num, den, out=out, where=np.abs(den) > _EPS)
    return out


def exg(red: np.ndarray, green: np.ndarray, blue: np.ndarray) -> np.ndarray:
    """Excess green ``2g - r - b`` on chromatic coordinates (range -1..2)."""
    total = red + green + blue
    return _ratio(2 * green - red - blue, total)


def vari(red: np.ndarray, green: np.ndarray, blue: np.ndarray) -> np.ndarray:
    """Visible atmospherically resistant index ``(g - r) / (g + r - b)``, clipped to -1..1."""
    return np.clip(_ratio(green - red, green + red - blue), -1, 1)


def gli(red: np.ndarray, green: np.ndarray, blue: np.ndarray) -> np.ndarray:
    """Green leaf index ``(2g - r - b) / (2g + r + b)`` (range -1..1)."""
    return _ratio(2 * green - red - blue, 2 * green + red + blue)


def ndvi(nir: np.ndarray, red: np.ndarray) -> np.ndarray:
    """Normalised difference vegetation index."""
    return _ratio(nir - red, nir + red)


def ndre(nir: np.ndarray, rededge: np.ndarray) -> np.ndarray:
    """Normalised difference red-edge index."""
    return _ratio(nir - rededge, nir + rededge)


def gndvi(nir: np.ndarray, green: np.ndarray) -> np.ndarray:
    """Green NDVI."""
    return _ratio(nir - green, nir + green)


@dataclass(frozen=True, slots=True)
class IndexDef:
    """An index: the roles it reads (argument order), its function and display range."""

    name: str
    roles: tuple[str, ...]
    func: Callable[..., np.ndarray]
    vmin: float
    vmax: float
    description: str


def index_label(name: str) -> str:
    """An index's name as written in the literature (ExG, VARI, NDVI), for layers and charts."""
    return {"exg": "ExG"}.get(name, name.upper())


INDICES: dict[str, IndexDef] = {
    d.name: d
    for d in (
        IndexDef("exg", ("red", "green", "blue"), exg, -0.2, 0.6, "Excess green (RGB)"),
        IndexDef("vari", ("red", "green", "blue"), vari, -0.5, 0.5, "VARI (RGB)"),
        IndexDef("gli", ("red", "green", "blue"), gli, -0.2, 0.4, "Green leaf index (RGB)"),
        IndexDef("ndvi", ("nir", "red"), ndvi, -0.2, 1.0, "NDVI (NIR, red)"),
        IndexDef("ndre", ("nir", "rededge"), ndre, -0.1, 0.6, "NDRE (NIR, red edge)"),
        IndexDef("gndvi", ("nir", "green"), gndvi, -0.1, 0.9, "Green NDVI (NIR, green)"),
    )
}


def available_indices(roles: tuple[str, ...] | set[str]) -> list[str]:
    """Names of the indices to write for ``roles``: NIR ones when there is NIR, else RGB ones.

    The RGB indices assume camera colours; on multispectral reflectance, where bare soil's
    green exceeds its blue, ExG and VARI called soil vegetation on their fixed map ramps,
    next to NDVI / NDRE that measure it properly.
    """
    have = set(roles)
    names = [name for name, d in INDICES.items() if set(d.roles) <= have]
    if "nir" in have:
        names = [n for n in names if "nir" in INDICES[n].roles]
    return names


def compute_index(name: str, pixels: np.ndarray, roles: tuple[str, ...]) -> np.ndarray:
    """Compute index ``name`` from ``pixels`` (``(..., C, H, W)``, channels in ``roles`` order)."""
    d = INDICES[name]
    args = [pixels[..., roles.index(r), :, :] for r in d.roles]
    return d.func(*args).astype(np.float32, copy=False)
