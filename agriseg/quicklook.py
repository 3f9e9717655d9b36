"""Quick-look PNG: the survey image beside its class map, from decimated reads.

Both rasters are read at reduced resolution (at most ``max_side`` pixels on the long side,
GDAL overviews used when present), so a quick look of a multi-gigapixel survey costs a second.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import Resampling

from agriseg.classes import DEFAULT_CLASSES, ClassSchema
from agriseg.errors import OutputError
from agriseg.raster import SurveyRaster, read_overview

log = logging.getLogger(__name__)


def plain_text(text: str) -> str:
    """``text`` for a Matplotlib label, drawn as written.

    Matplotlib reads text between two ``$`` as mathtext: a field id with a TeX command
    between dollars ended a run with a parse error, "cost $5 to $7" was set in italics
    without its dollars.
    """
    return text.replace("$", r"\$")


def _display_rgb(survey: SurveyRaster, max_side: int) -> tuple[np.ndarray, str]:
    """Decimated true colour (or NIR false colour without RGB), stretched 1-99.5 %."""
    roles = display_roles(survey.roles.as_dict())
    label = ("image (RGB)" if roles == ("red", "green", "blue") else
             "image (NIR-R-G false colour)" if roles[0] == "nir" else f"image ({roles[0]})")
    data, valid, _ = read_overview(survey, roles, max_side)
    return to_rgba(data, valid, colour_stretch(data, valid)), label


def display_roles(roles: Mapping[str, int]) -> tuple[str, str, str]:
    """Band roles drawn as red, green and blue.

    True colour, else NIR-R-G false colour, else the first spectral band in grey.
    """
    if all(r in roles for r in ("red", "green", "blue")):
        return ("red", "green", "blue")
    if all(r in roles for r in ("nir", "red", "green")):
        return ("nir", "red", "green")
    first = next(r for r in roles if r != "alpha")
    return (first, first, first)


def colour_stretch(data: np.ndarray, valid: np.ndarray) -> tuple[float, float]:
    """Display range of ``data`` (bands, rows, cols): its valid values' 1 and 99.5 percentiles.

    One range for all bands keeps the colour balance: a stretch per band turns beige soil
    lavender and yellow leaves green.
    """
    if not valid.any():
        return 0.0, 1.0
    lo, hi = np.percentile(data[:, valid], [1, 99.5])
    return float(lo), float(hi) if hi > lo else float(lo) + 1.0


def to_rgba(data: np.ndarray, valid: np.ndarray, stretch: tuple[float, float]) -> np.ndarray:
    """RGBA float image (rows, cols, 4) of three bands through ``stretch``; alpha = valid."""
    lo, hi = stretch
    rgba = np.zeros((*valid.shape, 4), np.float32)
    rgba[..., :3] = np.clip((data[:3] - lo) / (hi - lo), 0, 1).transpose(1, 2, 0)
    rgba[..., 3] = valid
    return rgba


def write_quicklook(
    survey: SurveyRaster,
    classes_path: str | Path,
    out_png: str | Path,
    schema: ClassSchema = DEFAULT_CLASSES,
    max_side: int = 1600,
    title: str | None = None,
) -> Path:
    """Write a PNG with the image on the left and the class map on the right.

    Args:
        survey: the input survey.
        classes_path: class raster on the survey's grid.
        out_png: PNG to write.
        schema: class names and colours for the map and legend.
        max_side: long side of each panel in pixels.
        title: figure title (default: the input file name).

    Returns:
        ``out_png``.

    Raises:
        OutputError: the PNG cannot be written.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    image, label = _display_rgb(survey, max_side)
    with rasterio.open(classes_path) as ds:
        cls = ds.read(1, out_shape=image.shape[:2], resampling=Resampling.nearest)
    lut = np.zeros((256, 4), np.float32)
    for c in schema.classes:
        lut[c.value, :3] = np.array(c.color) / 255
        lut[c.value, 3] = 1
    cmap = lut[cls]
    counts = np.bincount(cls.ravel(), minlength=256)
    total = max(int(sum(counts[c.value] for c in schema.classes)), 1)

    h, w = cls.shape
    landscape = w >= h
    # Two panels stacked for wide rasters, side by side for tall ones; ~7 inch panels.
    # At least room for the titles and the legend: a strip-shaped raster (a 60 x 1500 px
    # flight line) had them drawn over each other.
    if landscape:
        fig_w, fig_h = 10.0, min(max(2 * 10.0 * h / w + 1.0, 3.5), 14.0)
    else:
        fig_w, fig_h = min(max(2 * 7.0 * w / h + 0.5, 6.0), 16.0), 7.5
    fig, axes = plt.subplots(
        2 if landscape else 1, 1 if landscape else 2, figsize=(fig_w, fig_h), dpi=110
    )
    for ax, arr, name in ((axes[0], image, label), (axes[1], cmap, "classes")):
        ax.imshow(arr, interpolation="nearest")
        ax.set_title(plain_text(name), fontsize=9)
        ax.set_axis_off()
    handles = [
        Patch(color=(c.color[0] / 255, c.color[1] / 255, c.color[2] / 255),
              label=plain_text(f"{c.name} {counts[c.value] / total:.1%}"))
        for c in schema.classes
    ]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.suptitle(plain_text(title or Path(survey.path).name), fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    out = Path(out_png)
    try:
        fig.savefig(out)
    except OSError as exc:
        raise OutputError(f"{out}: cannot write the quick-look PNG ({exc})") from exc
    finally:
        plt.close(fig)
    log.debug("quick look: %s", out)  # written in the working folder; the run lists it
    return out
