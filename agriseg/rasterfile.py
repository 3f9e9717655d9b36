"""Open a raster file by path, with errors that say what to do; shapes of decimated reads.

The pieces that :mod:`agriseg.raster` and :mod:`agriseg.bands` both need, kept apart so that
neither imports the other's module at load time.
"""

from __future__ import annotations

import contextlib
import os
import warnings
import zipfile
from collections.abc import Iterator

import rasterio
from rasterio.errors import NotGeoreferencedWarning, RasterioError

from agriseg.errors import RasterError


@contextlib.contextmanager
def no_georef_warning() -> Iterator[None]:
    """Silence rasterio's NotGeoreferencedWarning for images without a CRS.

    The callers say what a missing CRS means and what to do, once: ``_describe`` (no CRS),
    :func:`agriseg.raster.image_vrt` (``--gsd``), evaluation and training labels (compared by
    size).
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


def _decimated_shape(height: int, width: int, max_side: int) -> tuple[int, int]:
    f = max(1.0, max(height, width) / max_side)
    return (max(1, round(height / f)), max(1, round(width / f)))
