"""QGIS styles (.qml) and projects for the outputs, written as plain XML.

Hand-written XML because QGIS's own writer (PyQGIS) is only available to the system Python,
not inside our virtual environment. The formats follow what QGIS 3.22 saves itself.
"""

from __future__ import annotations

import hashlib
import logging
import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from agriseg.classes import ClassSchema

log = logging.getLogger(__name__)

_QML_HEAD = (
    "<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n"
    '<qgis version="3.22.16" styleCategories="AllStyleCategories">\n'
)


# The end of every raster renderer pipe, as QGIS 3.22 writes it.
_PIPE_TAIL = (
    '    <brightnesscontrast brightness="0" contrast="0" gamma="1"/>\n'
    '    <huesaturation saturation="0" grayscaleMode="0" colorizeOn="0" '
    'colorizeRed="255" colorizeGreen="128" colorizeBlue="128" colorizeStrength="100"/>\n'
    '    <rasterresampler maxOversampling="2"/>\n'
    "  </pipe>\n"
    "  <blendMode>0</blendMode>\n"
)


def _atomic_write(path: Path, text: str) -> Path:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def _palette_entry(value: int, color: str, label: str) -> str:
    return (f'        <paletteEntry value="{value}" color="{color}" alpha="255" '
            f"label={quoteattr(label)}/>")


def _paletted_qml(entries: list[str]) -> str:
    """Paletted single-band renderer with the given palette entries (others transparent)."""
    return (
        _QML_HEAD
        + "  <pipe>\n"
        '    <rasterrenderer type="paletted" band="1" opacity="1" alphaBand="-1" '
        'nodataColor="">\n'
        "      <rasterTransparency/>\n"
        "      <colorPalette>\n" + "\n".join(entries) + "\n"
        "      </colorPalette>\n"
        "    </rasterrenderer>\n"
        + _PIPE_TAIL
        + "</qgis>\n"
    )


def class_qml(schema: ClassSchema) -> str:
    """Paletted renderer listing only the real classes (nodata stays transparent)."""
    return _paletted_qml([_palette_entry(c.value, c.hex, c.name) for c in schema.classes])


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
        + _PIPE_TAIL
        + f"  <!-- {label} -->\n"
        "</qgis>\n"
    )


def write_ramp_qml(raster: Path, vmin: float, vmax: float, ramp: str = "vegetation") -> Path:
    """Write ``<stem>.qml`` with a colour ramp beside a continuous raster."""
    return _atomic_write(raster.with_suffix(".qml"), ramp_qml(vmin, vmax, ramp, raster.stem))


# --- vector styles, GeoPackage layer_styles, project -------------------------------------

_VECTOR_HEAD = (
    "<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n"
    '<qgis version="3.22.16" styleCategories="AllStyleCategories" labelsEnabled="0">\n'
)


def _rgba(color: tuple[int, int, int], alpha: int = 255) -> str:
    return f"{color[0]},{color[1]},{color[2]},{alpha}"


def _fill_symbol(name: str, fill: str, outline: str, width: float = 0.4) -> str:
    props = {
        "color": fill, "outline_color": outline, "outline_style": "solid",
        "outline_width": f"{width}", "outline_width_unit": "MM", "style": "solid",
        "joinstyle": "bevel",
    }
    opts = "".join(
        f'<Option type="QString" name="{k}" value="{v}"/>' for k, v in props.items()
    )
    legacy = "".join(f'<prop k="{k}" v="{v}"/>' for k, v in props.items())
    return (
        f'      <symbol type="fill" name="{name}" alpha="1" clip_to_extent="1" force_rhr="0">\n'
        '        <layer class="SimpleFill" enabled="1" locked="0" pass="0">\n'
        f'          <Option type="Map">{opts}</Option>\n'
        f"          {legacy}\n"
        "        </layer>\n"
        "      </symbol>\n"
    )


def _vector_qml(renderer: str, labeling: str = "") -> str:
    head = _VECTOR_HEAD.replace('labelsEnabled="0"', 'labelsEnabled="1"') if labeling \
        else _VECTOR_HEAD
    return (
        head + renderer + labeling
        + "  <blendMode>0</blendMode>\n  <featureBlendMode>0</featureBlendMode>\n"
        "  <layerOpacity>1</layerOpacity>\n  <layerGeometryType>2</layerGeometryType>\n"
        "</qgis>\n"
    )


def zones_qml(schema: ClassSchema, attribute: str = "class") -> str:
    """Categorised polygon style: one translucent fill per at-risk class, by class name."""
    classes = schema.at_risk or schema.classes
    cats = "".join(
        f'      <category render="true" value={quoteattr(c.name)} label={quoteattr(c.name)} '
        f'symbol="{i}"/>\n'
        for i, c in enumerate(classes)
    )
    symbols = "".join(
        _fill_symbol(str(i), _rgba(c.color, 140), _rgba(c.color), 0.5)
        for i, c in enumerate(classes)
    )
    return _vector_qml(
        f'  <renderer-v2 type="categorizedSymbol" attr={quoteattr(attribute)} '
        'forceraster="0" symbollevels="0" enableorderby="0" referencescale="-1">\n'
        f"    <categories>\n{cats}    </categories>\n"
        f"    <symbols>\n{symbols}    </symbols>\n"
        "  </renderer-v2>\n"
    )


HEALTH_CLASSES: tuple[tuple[float, float, str], ...] = (
    (0, 20, "#d7191c"), (20, 40, "#fdae61"), (40, 60, "#ffffbf"), (60, 80, "#a6d96a"),
    (80, 100.0001, "#1a9641"),
)
"""Graduated classes of the health score (lower bound, upper bound, colour)."""


NO_SCORE_COLOR = "#bdbdbd"
"""Fill of fields without a health score (no vegetation, no valid pixel)."""


def fields_qml(attribute: str = "health_score", label: str = "field_id") -> str:
    """Fields by health score, red (0) to green (100), grey without a score; labelled by id.

    Rules rather than a graduated renderer: that one draws nothing for a NULL score, so a
    field without vegetation vanished from the map.
    """
    field = f'"{attribute}"'
    rules, symbols = [], []
    for i, (lo, hi, color) in enumerate(HEALTH_CLASSES):
        # Full precision: the top bound is 100.0001, and "< 100" left a perfect field grey.
        flt = f"{field} >= {lo:.10g} AND {field} < {hi:.10g}"
        rules.append(f'    <rule key="{{health-{i}}}" filter={quoteattr(flt)} '
                     f'label="{lo:g} - {min(hi, 100):g}" symbol="{i}"/>\n')
        symbols.append(_fill_symbol(str(i), _rgba(_hex_rgb(color), 110), "35,35,35,255", 0.3))
    n = len(HEALTH_CLASSES)
    rules.append(f'    <rule key="{{health-none}}" filter="ELSE" label="no score" '
                 f'symbol="{n}"/>\n')
    symbols.append(_fill_symbol(str(n), _rgba(_hex_rgb(NO_SCORE_COLOR), 90), "35,35,35,255",
                                0.3))
    return _vector_qml(
        '  <renderer-v2 type="RuleRenderer" forceraster="0" symbollevels="0" '
        'enableorderby="0" referencescale="-1">\n'
        f'    <rules key="{{health}}">\n{"".join(rules)}    </rules>\n'
        f"    <symbols>\n{''.join(symbols)}    </symbols>\n"
        "  </renderer-v2>\n",
        _labels(label),
    )


def _labels(field: str) -> str:
    """Simple labels of ``field`` over each polygon, dark text on a light halo."""
    return (
        '  <labeling type="simple">\n'
        '    <settings calloutType="simple">\n'
        f'      <text-style fieldName={quoteattr(field)} isExpression="0" fontSize="8" '
        'fontSizeUnit="Point" fontWeight="75" textColor="20,20,20,255" textOpacity="1" '
        'multilineHeight="1" fontLetterSpacing="0" fontWordSpacing="0">\n'
        '        <text-buffer bufferDraw="1" bufferSize="0.8" bufferSizeUnits="MM" '
        'bufferColor="255,255,255,255" bufferOpacity="0.8" bufferJoinStyle="128"/>\n'
        "      </text-style>\n"
        '      <text-format wrapChar="" autoWrapLength="0" multilineAlign="3"/>\n'
        '      <placement placement="1" offsetType="0" centroidWhole="0" centroidInside="1" '
        'fitInPolygonOnly="0" priority="5"/>\n'
        '      <rendering obstacle="1" displayAll="0" limitNumLabels="0" minFeatureSize="0" '
        'upsidedownLabels="0" scaleVisibility="0" drawLabels="1"/>\n'
        "    </settings>\n"
        "  </labeling>\n"
    )


def rates_qml(attribute: str, rates: Sequence[float]) -> str:
    """Graduated style of a prescription: one class per distinct rate, yellow to red.

    Ranges of width 0 around each rate rather than categories: a category's value is text and
    a Shapefile's rate a double, which QGIS does not always match.
    """
    values = sorted({float(r) for r in rates})
    n = max(len(values) - 1, 1)
    ranges, symbols = [], []
    for i, v in enumerate(values):
        t = i / n
        color = (255, round(255 - 200 * t), round(178 * (1 - t)))  # pale yellow to red
        ranges.append(f'      <range render="true" lower="{v - 1e-9:.10g}" '
                      f'upper="{v + 1e-9:.10g}" label="{v:g}" symbol="{i}"/>\n')
        symbols.append(_fill_symbol(str(i), _rgba(color, 170), "60,60,60,255", 0.2))
    return _vector_qml(
        f'  <renderer-v2 type="graduatedSymbol" attr={quoteattr(attribute)} '
        'graduatedMethod="GraduatedColor" forceraster="0" symbollevels="0" '
        'enableorderby="0" referencescale="-1">\n'
        f"    <ranges>\n{''.join(ranges)}    </ranges>\n"
        f"    <symbols>\n{''.join(symbols)}    </symbols>\n"
        '    <mode name="custom"/>\n'
        "  </renderer-v2>\n"
    )


def _hex_rgb(h: str) -> tuple[int, int, int]:
    return (int(h[1:3], 16), int(h[3:5], 16), int(h[5:7], 16))


def zone_ids_qml(zone_classes: dict[int, str], schema: ClassSchema) -> str:
    """Paletted style of a zone-id raster: each zone in its class colour.

    The shade varies per zone so neighbouring instances stay apart; 0 (no zone) is nodata
    and stays transparent.
    """
    colors = {c.name: c.color for c in schema.classes}
    entries = []
    for zid, name in sorted(zone_classes.items()):
        shade = 0.65 + 0.35 * ((zid * 0.61803398875) % 1.0)
        r, g, b = (min(255, int(v * shade)) for v in colors.get(name, (128, 128, 128)))
        entries.append(
            _palette_entry(zid, f"#{r:02x}{g:02x}{b:02x}", f"zone {zid} ({name})")
        )
    return _paletted_qml(entries)


def rgb_qml(red: int, green: int, blue: int, alpha: int = -1,
            stretch: tuple[float, float] | None = None, fill: float | None = None) -> str:
    """Multiband colour style for the input image.

    Args:
        red: band drawn as red.
        green: band drawn as green.
        blue: band drawn as blue.
        alpha: alpha band, -1 for none.
        stretch: one display range (raw values) for all three bands, which keeps the colour
            balance; ``None`` shows the values as they are (8-bit imagery). Without it QGIS
            draws 16-bit and float bands modulo 256 (noise).
        fill: a value that is nodata in every band without being declared (an orthomosaic's
            black fill): drawn transparent.
    """
    transparency = "      <rasterTransparency/>\n" if fill is None else (
        "      <rasterTransparency><threeValuePixelList>"
        f'<pixelListEntry red="{fill:g}" green="{fill:g}" blue="{fill:g}" '
        'percentTransparent="100"/></threeValuePixelList></rasterTransparency>\n')
    limits = "CumulativeCut" if stretch is None else "None"
    enhancement = "" if stretch is None else "".join(
        f"      <{c}ContrastEnhancement><minValue>{stretch[0]:.6g}</minValue><maxValue>"
        f"{stretch[1]:.6g}</maxValue><algorithm>StretchToMinimumMaximum</algorithm>"
        f"</{c}ContrastEnhancement>\n" for c in ("red", "green", "blue"))
    return (
        _QML_HEAD
        + "  <pipe>\n"
        f'    <rasterrenderer type="multibandcolor" opacity="1" alphaBand="{alpha}" '
        f'redBand="{red}" greenBand="{green}" blueBand="{blue}" nodataColor="">\n'
        + transparency
        + f"      <minMaxOrigin><limits>{limits}</limits><extent>WholeRaster</extent>"
        "<statAccuracy>Estimated</statAccuracy><cumulativeCutLower>0.02</cumulativeCutLower>"
        "<cumulativeCutUpper>0.98</cumulativeCutUpper><stdDevFactor>2</stdDevFactor>"
        "</minMaxOrigin>\n"
        + enhancement
        + "    </rasterrenderer>\n"
        '    <rasterresampler maxOversampling="2"/>\n'
        "  </pipe>\n"
        "  <blendMode>0</blendMode>\n"
        "</qgis>\n"
    )


_LAYER_STYLES_DDL = (
    'CREATE TABLE IF NOT EXISTS "layer_styles" ( "id" INTEGER PRIMARY KEY AUTOINCREMENT NOT '
    'NULL, "f_table_catalog" TEXT(256), "f_table_schema" TEXT(256), "f_table_name" '
    'TEXT(256), "f_geometry_column" TEXT(256), "styleName" TEXT(30), "styleQML" TEXT, '
    '"styleSLD" TEXT, "useAsDefault" BOOLEAN, "description" TEXT, "owner" TEXT(30), "ui" '
    "TEXT(30), \"update_time\" DATETIME DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')))"
)


def write_gpkg_style(gpkg: Path, layer: str, qml: str, geometry_column: str = "geom") -> None:
    """Store ``qml`` as the default style of ``layer`` in the GeoPackage's ``layer_styles``.

    The table and row are what QGIS 3.22 writes itself (``saveStyleToDatabase``); QGIS only
    matches rows with ``f_table_schema = ''`` (not NULL), so that is what we write.

    Raises:
        OutputError: the GeoPackage cannot be updated.
    """
    import sqlite3

    from agriseg.errors import OutputError

    try:
        con = sqlite3.connect(gpkg)
        try:
            with con:
                con.execute(_LAYER_STYLES_DDL)
                con.execute(
                    "INSERT OR IGNORE INTO gpkg_contents (table_name, data_type, identifier, "
                    "description, last_change) VALUES ('layer_styles', 'attributes', "
                    "'layer_styles', '', strftime('%Y-%m-%dT%H:%M:%fZ','now'))"
                )
                con.execute(
                    "UPDATE layer_styles SET useAsDefault = 0 WHERE f_table_name = ?", (layer,)
                )
                con.execute(
                    "INSERT INTO layer_styles (f_table_catalog, f_table_schema, f_table_name, "
                    "f_geometry_column, styleName, styleQML, styleSLD, useAsDefault, "
                    "description, owner, ui) VALUES ('', '', ?, ?, ?, ?, '', 1, ?, '', NULL)",
                    (layer, geometry_column, layer, qml, "written by agriseg"),
                )
        finally:
            con.close()
    except sqlite3.Error as exc:
        raise OutputError(f"{gpkg}: cannot store the QGIS style of {layer!r} ({exc})") from exc


@dataclass(frozen=True, slots=True)
class ProjectLayer:
    """One layer of a QGIS project.

    Attributes:
        path: the file (absolute, or relative to the project folder).
        name: name shown in the layer panel.
        qml: style (the text of a ``.qml``) embedded in the project.
        layer: layer name inside a GeoPackage (vector layers only).
        visible: checked in the layer panel.
        group: name of the layer-panel group it goes into ("" = top level).
        opacity: raster opacity 0..1 (vectors keep the style's own alpha).
    """

    path: Path
    name: str
    qml: str
    layer: str | None = None
    visible: bool = True
    group: str = ""
    opacity: float = 1.0

    @property
    def is_vector(self) -> bool:
        """True for GeoPackage / Shapefile / GeoJSON layers."""
        return self.layer is not None or self.path.suffix.lower() in (".gpkg", ".shp", ".geojson")


def _srs_xml(crs_wkt: str, authid: str) -> str:
    return (
        "<spatialrefsys>"
        f"<wkt>{escape(crs_wkt)}</wkt><authid>{escape(authid)}</authid>"
        "</spatialrefsys>"
    )


def _style_body(qml: str, opacity: float) -> str:
    """Children of a ``.qml``'s root element, to embed in a project's ``<maplayer>``."""
    root = ET.fromstring(qml.split("\n", 1)[1] if qml.startswith("<!DOCTYPE") else qml)
    if opacity != 1.0:
        for r in root.iter("rasterrenderer"):
            r.set("opacity", f"{opacity:g}")
    return "".join(ET.tostring(child, encoding="unicode") for child in root)


def _datasource(path: Path, project_dir: Path) -> str:
    """Path as QGIS stores it: ``./x`` inside the project's folder, absolute outside it.

    The outputs travel with the project; the input image usually stays where it was, and a
    relative ``../../surveys/x.tif`` broke as soon as the results folder was moved.
    """
    p = (path if path.is_absolute() else project_dir / path).resolve()
    try:
        rel = os.path.relpath(p, project_dir.resolve())
    except ValueError:  # another drive on Windows: no relative path exists
        return str(p)
    rel = rel.replace(os.sep, "/")
    return str(p) if rel.startswith("../") else f"./{rel}"


def write_project(
    project: Path,
    layers: list[ProjectLayer],
    crs_wkt: str,
    authid: str,
    extent: tuple[float, float, float, float],
    title: str = "agriseg survey",
    geographic: bool = False,
    home: Path | None = None,
) -> Path:
    """Write a QGIS 3.22 project (``.qgs``) with relative paths and embedded styles.

    Args:
        project: the ``.qgs`` file to write.
        layers: top of the layer panel first; groups appear where their first layer is.
        crs_wkt: project CRS as WKT.
        authid: the same CRS as an authority id, e.g. ``EPSG:32615``.
        extent: ``(xmin, ymin, xmax, ymax)`` the map opens on, in the project CRS.
        title: project title.
        geographic: the project CRS is geographic (canvas units degrees).
        home: folder the project will be opened from, which relative layer paths are relative
            to (default: the folder of ``project``; differs when written in a work folder).

    Returns:
        The project path.
    """
    pdir = home or project.parent
    srs = _srs_xml(crs_wkt, authid)
    ids = {}
    maplayers = []
    for lyr in layers:
        lid = lyr.name.replace(" ", "_") + "_" + hashlib.sha1(
            f"{lyr.path}|{lyr.layer}".encode()).hexdigest()[:12]
        ids[lyr.name] = lid
        src = _datasource(lyr.path, pdir)
        if lyr.is_vector:
            src += f"|layername={lyr.layer}" if lyr.layer else ""
            attrs = 'type="vector" geometry="Polygon" wkbType="MultiPolygon"'
            provider = '<provider encoding="UTF-8">ogr</provider>'
        else:
            attrs = 'type="raster"'
            provider = "<provider>gdal</provider>"
        maplayers.append(
            f"    <maplayer {attrs} hasScaleBasedVisibilityFlag=\"0\" minScale=\"1e+08\" "
            'maxScale="0" styleCategories="AllStyleCategories">\n'
            f"      <id>{lid}</id>\n      <datasource>{escape(src)}</datasource>\n"
            f"      <layername>{escape(lyr.name)}</layername>\n"
            f"      <srs>{srs}</srs>\n      {provider}\n"
            f"      {_style_body(lyr.qml, lyr.opacity)}\n"
            "    </maplayer>\n"
        )
    tree: list[str] = []
    open_group: str | None = None
    for lyr in layers:
        if lyr.group != (open_group or ""):
            if open_group:
                tree.append("    </layer-tree-group>\n")
            open_group = lyr.group or None
            if open_group:
                grp_checked = any(x.visible for x in layers if x.group == lyr.group)
                tree.append(
                    f"    <layer-tree-group name={quoteattr(lyr.group)} expanded=\"0\" "
                    f'checked="Qt::{"Checked" if grp_checked else "Unchecked"}">'
                    "<customproperties/>\n"
                )
        src = _datasource(lyr.path, pdir) + (f"|layername={lyr.layer}" if lyr.layer else "")
        tree.append(
            f'      <layer-tree-layer id="{ids[lyr.name]}" name={quoteattr(lyr.name)} '
            f'source={quoteattr(src)} providerKey="{"ogr" if lyr.is_vector else "gdal"}" '
            f'checked="Qt::{"Checked" if lyr.visible else "Unchecked"}" expanded="0">'
            "<customproperties/></layer-tree-layer>\n"
        )
    if open_group:
        tree.append("    </layer-tree-group>\n")
    xmin, ymin, xmax, ymax = extent
    text = (
        "<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n"
        f'<qgis projectname={quoteattr(title)} version="3.22.16-Białowieża">\n'
        '  <homePath path=""/>\n'
        f"  <title>{escape(title)}</title>\n"
        f"  <projectCrs>{srs}</projectCrs>\n"
        "  <layer-tree-group><customproperties/>\n" + "".join(tree) + "  </layer-tree-group>\n"
        '  <mapcanvas name="theMapCanvas" annotationsVisible="1">\n'
        f"    <units>{'degrees' if geographic else 'meters'}</units>\n"
        f"    <extent><xmin>{xmin!r}</xmin><ymin>{ymin!r}</ymin><xmax>{xmax!r}</xmax>"
        f"<ymax>{ymax!r}</ymax></extent>\n"
        f"    <rotation>0</rotation>\n    <destinationsrs>{srs}</destinationsrs>\n"
        "  </mapcanvas>\n"
        "  <projectlayers>\n" + "".join(maplayers) + "  </projectlayers>\n"
        "  <layerorder>\n"
        + "".join(f'    <layer id="{ids[lyr.name]}"/>\n' for lyr in layers)
        + "  </layerorder>\n"
        '  <properties><Paths><Absolute type="bool">false</Absolute></Paths>'
        # QGIS 3.22 ignores <projectCrs> unless projections are flagged as enabled.
        '<SpatialRefSys><ProjectionsEnabled type="int">1</ProjectionsEnabled></SpatialRefSys>'
        "</properties>\n"
        "</qgis>\n"
    )
    return _atomic_write(project, text)
