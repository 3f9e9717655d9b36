"""QGIS styles (.qml) and projects for the outputs, written as plain XML.

Hand-written XML because QGIS's own writer (PyQGIS) is only available to the system Python,
not inside our virtual environment. The formats follow what QGIS 3.22 saves itself.
"""

from __future__ import annotations

import os
from pathlib import Path
from xml.sax.saxutils import quoteattr

from agriseg.classes import ClassSchema

_QML_HEAD = (
    "<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n"
    '<qgis version="3.22.16" styleCategories="AllStyleCategories">\n'
)


def _atomic_write(path: Path, text: str) -> Path:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def class_qml(schema: ClassSchema) -> str:
    """Paletted renderer listing only the real classes (nodata stays transparent)."""
    entries = "\n".join(
        f"        <paletteEntry value=\"{c.value}\" color=\"{c.hex}\" alpha=\"255\" "
        f"label={quoteattr(c.name)}/>"
        for c in schema.classes
    )
    return (
        _QML_HEAD
        + "  <pipe>\n"
        '    <rasterrenderer type="paletted" band="1" opacity="1" alphaBand="-1" '
        'nodataColor="">\n'
        "      <rasterTransparency/>\n"
        "      <colorPalette>\n"
        f"{entries}\n"
        "      </colorPalette>\n"
        "    </rasterrenderer>\n"
        '    <brightnesscontrast brightness="0" contrast="0" gamma="1"/>\n'
        '    <huesaturation saturation="0" grayscaleMode="0" colorizeOn="0" '
        'colorizeRed="255" colorizeGreen="128" colorizeBlue="128" colorizeStrength="100"/>\n'
        '    <rasterresampler maxOversampling="2"/>\n'
        "  </pipe>\n"
        "  <blendMode>0</blendMode>\n"
        "</qgis>\n"
    )


def write_class_qml(raster: Path, schema: ClassSchema) -> Path:
    """Write ``<stem>.qml`` beside a class raster (QGIS looks for the stem, not ``.tif.qml``)."""
    return _atomic_write(raster.with_suffix(".qml"), class_qml(schema))


RAMPS: dict[str, list[tuple[float, str]]] = {
    # (position 0..1, colour): colour-blind-safe-ish ramps
    "vegetation": [(0.0, "#a50026"), (0.25, "#f46d43"), (0.5, "#fee08b"), (0.75, "#a6d96a"),
                   (1.0, "#006837")],
    "confidence": [(0.0, "#440154"), (0.5, "#21918c"), (1.0, "#fde725")],
}


def ramp_qml(vmin: float, vmax: float, ramp: str = "vegetation", label: str = "") -> str:
    """Singleband pseudocolour renderer with an interpolated ramp from ``vmin`` to ``vmax``."""
    stops = RAMPS[ramp]
    items = "\n".join(
        f'            <item value="{vmin + p * (vmax - vmin):.6g}" color="{c}" alpha="255" '
        f'label="{vmin + p * (vmax - vmin):.3g}"/>'
        for p, c in stops
    )
    return (
        _QML_HEAD
        + "  <pipe>\n"
        f'    <rasterrenderer type="singlebandpseudocolor" band="1" opacity="1" '
        f'alphaBand="-1" classificationMin="{vmin}" classificationMax="{vmax}" nodataColor="">\n'
        "      <rasterTransparency/>\n"
        "      <minMaxOrigin><limits>None</limits><extent>WholeRaster</extent>"
        "<statAccuracy>Estimated</statAccuracy><cumulativeCutLower>0.02</cumulativeCutLower>"
        "<cumulativeCutUpper>0.98</cumulativeCutUpper><stdDevFactor>2</stdDevFactor>"
        "</minMaxOrigin>\n"
        f'      <rastershader><colorrampshader colorRampType="INTERPOLATED" '
        f'classificationMode="1" clip="0" minimumValue="{vmin}" maximumValue="{vmax}" '
        f"labelPrecision=\"3\">\n"
        f"{items}\n"
        "      </colorrampshader></rastershader>\n"
        "    </rasterrenderer>\n"
        '    <brightnesscontrast brightness="0" contrast="0" gamma="1"/>\n'
        '    <huesaturation saturation="0" grayscaleMode="0" colorizeOn="0" '
        'colorizeRed="255" colorizeGreen="128" colorizeBlue="128" colorizeStrength="100"/>\n'
        '    <rasterresampler maxOversampling="2"/>\n'
        "  </pipe>\n"
        "  <blendMode>0</blendMode>\n"
        f"  <!-- {label} -->\n"
        "</qgis>\n"
    )


def write_ramp_qml(raster: Path, vmin: float, vmax: float, ramp: str = "vegetation") -> Path:
    """Write ``<stem>.qml`` with a colour ramp beside a continuous raster."""
    return _atomic_write(raster.with_suffix(".qml"), ramp_qml(vmin, vmax, ramp, raster.stem))
