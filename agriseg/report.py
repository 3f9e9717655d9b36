"""A self-contained HTML report: one file, images inlined as base64 PNG, no network.

Maps and charts are drawn with matplotlib (Agg) from decimated reads, so the report costs the
same for a 10 MP and a 10 GP survey apart from the number of fields drawn.
"""

from __future__ import annotations

import base64
import functools
import html
import io
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import geopandas as gpd
import numpy as np
import pandas as pd
import rasterio
import shapely
from matplotlib import patheffects
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator
from rasterio.enums import Resampling
from rasterio.windows import Window, from_bounds

from agriseg.classes import ClassSchema
from agriseg.errors import OutputError
from agriseg.indices import index_label
from agriseg.quicklook import colour_stretch, display_roles, plain_text, to_rgba
from agriseg.raster import SurveyRaster, read_overview, sample_positions, scaled_bands

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

MAX_FIELD_MAPS = 60
# Field maps drawn at once; each holds a strip of its window (see _window_mean).
FIELD_MAP_THREADS = 2
HEALTH_FORMULA = (
    "W = weed / (crop + weed + disease)  (weed pressure)\n"
    "D = disease / (crop + disease)      (disease incidence)\n"
    "S = min(1, C / C90), C = (crop + disease) / valid pixels, C90 = 90th percentile of C\n"
    "    over all fields                 (stand)\n"
    "health = 100 x (1 - W) x (1 - D) x S"
)

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#222;
background:#f6f7f4}
header{background:#24502c;color:#fff;padding:18px 28px}
header h1{margin:0 0 4px;font-size:24px} header p{margin:0;opacity:.85}
main{padding:10px 28px 40px;max-width:1400px}
h2{border-bottom:2px solid #24502c;padding-bottom:4px;margin-top:32px}
.cards{display:flex;flex-wrap:wrap;gap:12px}
.card{background:#fff;border-radius:8px;padding:10px 16px;box-shadow:0 1px 3px #0002;
min-width:140px}
.card b{display:block;font-size:22px}
img{max-width:100%;background:#fff;border-radius:6px;box-shadow:0 1px 3px #0002}
table{border-collapse:collapse;background:#fff;font-size:13px}
th,td{padding:4px 8px;border-bottom:1px solid #ddd;text-align:right}
th.id{text-align:left} td.id{text-align:left;min-width:6em;max-width:22em;overflow-wrap:anywhere}
th{background:#e8ece4;position:sticky;top:0} td:first-child,th:first-child{text-align:left}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(300px,1fr));gap:12px}
.field{background:#fff;border-radius:8px;padding:8px;box-shadow:0 1px 3px #0002}
.field h3{margin:0 0 4px;font-size:15px;overflow-wrap:anywhere}
pre{background:#fff;padding:10px;border-radius:6px;overflow-x:auto}
.note{color:#8a4b00}
"""


def _subplots(nrows: int = 1, ncols: int = 1, figsize: tuple[float, float] = (6, 4),
              **kw: Any) -> tuple[Figure, Any]:
    # Figure without pyplot: no global state, no GUI backend, safe in any thread.
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, **kw)


def _png(fig: Figure, dpi: int = 90) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


#: Longest field id drawn on maps and charts (the table shows it whole).
LABEL_CHARS = 24


def _label(value: object) -> str:
    """A field id short enough for a map or chart label.

    A 300-character id squeezed the report's maps to a quarter of their figure.
    """
    text = str(value)
    if len(text) > LABEL_CHARS:
        # The end kept too: ids often differ only there ("Plot 7 north ... A" / "... B").
        tail = LABEL_CHARS // 3
        text = text[: LABEL_CHARS - tail - 1] + "\u2026" + text[-tail:]
    return plain_text(text)


def _img(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{html.escape(alt)}">'


def _read_image(
    survey: str | SurveyRaster, roles: Mapping[str, int], window: Window | None,
    shape: tuple[int, int], stretch: tuple[float, float] | None = None,
) -> tuple[np.ndarray, tuple[float, float]]:
    """RGBA float image of ``window`` decimated to ``shape``, and its display range.

    ``stretch`` (the survey's, so the field maps' colours compare) or else the image's own
    :func:`~agriseg.quicklook.colour_stretch`.
    """
    names = display_roles(roles)
    if isinstance(survey, SurveyRaster) and window is None:
        # The whole survey: the run's cached overview (read once for the model's prepare and
        # the quick-look) has the detail; GDAL's decimated read of a file without overviews
        # decodes every block again (1 GP: 10-30 s, and a block cache as big as allowed).
        data, valid, _ = read_overview(survey, names)
        if valid.shape[0] > shape[0] or valid.shape[1] > shape[1]:
            # Sampled to the map's size, not block-averaged: an integer reduction of the
            # overview could leave the map coarser than asked.
            ys = sample_positions(valid.shape[0], shape[0])
            xs = sample_positions(valid.shape[1], shape[1])
            data, valid = data[:, ys[:, None], xs], valid[ys[:, None], xs]
    else:
        path = survey.path if isinstance(survey, SurveyRaster) else survey
        bands = [roles[r] for r in names]
        with rasterio.open(path) as ds:
            if window is not None and not ds.overviews(bands[0]):
                data, valid = _window_mean(ds, bands, roles.get("alpha"), window, shape)
            else:
                data = ds.read(bands, window=window, out_shape=(3, *shape),
                               resampling=Resampling.average).astype(np.float32)
                if "alpha" in roles:
                    valid = ds.read(roles["alpha"], window=window, out_shape=shape,
                                    resampling=Resampling.nearest) > 0
                else:
                    valid = ds.read_masks(bands[0], window=window, out_shape=shape,
                                          resampling=Resampling.nearest) > 0
        valid &= np.isfinite(data).all(axis=0)
        if isinstance(survey, SurveyRaster):
            # The validity the run used (GDAL's mask knows nothing of an undeclared fill),
            # in the overview's units, for its stretch.
            data, valid = scaled_bands(data, valid, survey)
    stretch = stretch or colour_stretch(data, valid)
    return to_rgba(data, valid, stretch), stretch


def _window_mean(ds: rasterio.DatasetReader, bands: list[int], alpha: int | None,
                 window: Window, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Mean of the valid pixels of ``window`` in each cell of a ``shape`` grid, and validity.

    Written by hand for files without overviews: GDAL's averaged decimated read of a big
    window went through the 64 MB block cache band by band, decoding every block once per
    band (a 30 MP field of an RGBA mosaic in 1.7 s; ten field maps were 23 s of a 24 s
    report). Here a strip of whole blocks at a time is read with all bands at once, so each
    block is decoded once; cells average only valid pixels (``alpha`` > 0, else GDAL's mask).
    """
    r0, c0, h, w = (int(window.row_off), int(window.col_off), int(window.height),
                    int(window.width))
    n_rows, n_cols = shape
    row_edges = np.arange(n_rows + 1) * h // n_rows
    col_starts = np.arange(n_cols) * w // n_cols
    sums = np.zeros((len(bands), n_rows, n_cols))
    counts = np.zeros((n_rows, n_cols), np.int64)
    block_h = ds.block_shapes[0][0]
    strip = block_h * max(1, 256 // block_h)  # ~34 MB of an RGBA strip 32768 px wide
    y = r0
    while y < r0 + h:
        y_end = min(r0 + h, (y // strip + 1) * strip)
        part = Window(c0, y, w, y_end - y)
        ok = (ds.read(alpha, window=part) if alpha else ds.read_masks(bands[0], window=part)) > 0
        data = ds.read(bands, window=part)
        data[:, ~ok] = 0
        # Integer sums are exact and twice as fast as float ones.
        acc = np.int64 if data.dtype.kind in "iu" else np.float64
        col_sum = np.add.reduceat(data, col_starts, axis=2, dtype=acc)
        col_n = np.add.reduceat(ok, col_starts, axis=1, dtype=np.int64)
        cells = np.searchsorted(row_edges, np.arange(y - r0, y_end - r0), side="right") - 1
        first = np.flatnonzero(np.r_[True, cells[1:] != cells[:-1]])
        sums[:, cells[first]] += np.add.reduceat(col_sum, first, axis=1)
        counts[cells[first]] += np.add.reduceat(col_n, first, axis=0)
        y = y_end
    valid = counts > 0
    mean = (sums / np.maximum(counts, 1)).astype(np.float32)
    return mean, valid


def _read_classes(path: Path, schema: ClassSchema, window: Window | None,
                  shape: tuple[int, int], alpha: float = 1.0) -> np.ndarray:
    with rasterio.open(path) as ds:
        cls = ds.read(1, window=window, out_shape=shape, resampling=Resampling.nearest)
    lut = np.zeros((256, 4), np.float32)
    for c in schema.classes:
        lut[c.value] = (*(v / 255 for v in c.color), alpha)
    return lut[cls]


def _shape_for(h: float, w: float, max_side: int) -> tuple[int, int]:
    f = max(1.0, max(h, w) / max_side)
    return (max(1, round(h / f)), max(1, round(w / f)))


def _rgb01(color: tuple[int, int, int]) -> tuple[float, float, float]:
    r, g, b = color
    return (r / 255, g / 255, b / 255)


def _outline(on_image: bool) -> dict[str, Any]:
    """Field outline style: black on the class map, white with a dark edge on the image.

    Plain white vanished over light soil and over nodata.
    """
    if not on_image:
        return {"color": "black", "linewidth": 0.8}
    return {"color": "white", "linewidth": 0.8,
            "path_effects": [patheffects.withStroke(linewidth=1.8, foreground="black")]}


def _legend(schema: ClassSchema) -> list[Patch]:
    return [Patch(color=_rgb01(c.color), label=plain_text(c.name)) for c in schema.classes]


def _overview(survey: str | SurveyRaster, roles: Mapping[str, int], classes_tif: Path,
              schema: ClassSchema, fields: gpd.GeoDataFrame, zones: gpd.GeoDataFrame | None,
              show_fields: bool, zones_computed: bool = True) -> tuple[str, tuple[float, float]]:
    with rasterio.open(classes_tif) as ds:
        h, w = ds.shape
        left, bottom, right, top = ds.bounds
    shape = _shape_for(h, w, 1100)
    extent = (left, right, bottom, top)
    img, stretch = _read_image(survey, roles, None, shape)
    cls = _read_classes(classes_tif, schema, None, shape)
    # Wide surveys stack image over classes; tall ones sit side by side.
    if w >= h:  # at least room for the legend under a strip-shaped survey
        fig, axes = _subplots(2, 1, figsize=(12, min(16.0, max(12 * h / w * 2 + 1, 5.0))))
    else:
        fig, axes = _subplots(1, 2, figsize=(12, min(16.0, 6 * h / w + 1)))
    for ax, data, title in ((axes[0], img, "Image"), (axes[1], cls, "Classes and at-risk zones")):
        ax.imshow(data, extent=extent, interpolation="nearest")
        ax.set_title(title)
        ax.set_xticks([])
        ax.set_yticks([])
        if show_fields and not fields.empty:
            fields.boundary.plot(ax=ax, **_outline(data is img))
        if data is cls and zones is not None and not zones.empty:
            zones.boundary.plot(ax=ax, color="magenta", linewidth=0.9)
        ax.set_xlim(left, right)
        ax.set_ylim(bottom, top)
    if show_fields and len(fields) <= 80:
        raster = shapely.box(left, bottom, right, top)
        halo = [patheffects.withStroke(linewidth=2, foreground="black")]  # legible on soil
        for _, row in fields.iterrows():
            if row.geometry is None or row.get("status") == "outside raster":
                continue
            # On the part inside the raster: a field reaching past its edge kept its label
            # outside the map.
            p = row.geometry.intersection(raster).representative_point()
            axes[0].annotate(_label(row["field_id"]), (p.x, p.y), color="yellow", fontsize=7,
                             ha="center", va="center", weight="bold", path_effects=halo)
    zone_key = [Patch(facecolor="none", edgecolor="magenta", label="zone")]
    axes[1].legend(handles=[*_legend(schema), *(zone_key if zones_computed else [])],
                   loc="lower right", fontsize=8, framealpha=0.9)
    fig.tight_layout()
    return _png(fig), stretch


def _field_map(survey: str | SurveyRaster, roles: Mapping[str, int], classes_tif: Path,
               schema: ClassSchema, geom: Any, zones: gpd.GeoDataFrame | None,
               stretch: tuple[float, float]) -> str | None:
    with rasterio.open(classes_tif) as ds:
        minx, miny, maxx, maxy = geom.bounds
        pad = 0.05 * max(maxx - minx, maxy - miny)
        win = from_bounds(minx - pad, miny - pad, maxx + pad, maxy + pad, ds.transform)
        win = win.intersection(Window(0, 0, ds.width, ds.height)).round_offsets().round_lengths()
        if win.width < 1 or win.height < 1:
            return None
        b = ds.window_bounds(win)
    shape = _shape_for(win.height, win.width, 260)
    extent = (b[0], b[2], b[1], b[3])
    img, _ = _read_image(survey, roles, win, shape, stretch)
    cls = _read_classes(classes_tif, schema, win, shape)
    tall = win.height > win.width
    fig, axes = _subplots(1, 2, figsize=(4, 3.2) if tall else (4, 2.2))
    for ax, data in zip(axes, (img, cls), strict=True):
        ax.imshow(data, extent=extent, interpolation="nearest")
        gpd.GeoSeries([geom]).boundary.plot(ax=ax, **_outline(data is img))
        if data is cls and zones is not None and not zones.empty:
            near = zones[zones.intersects(geom)]
            if not near.empty:
                near.boundary.plot(ax=ax, color="magenta", linewidth=0.8)
        ax.set_xlim(extent[0], extent[1])
        ax.set_ylim(extent[2], extent[3])
        ax.set_axis_off()
    fig.subplots_adjust(0, 0, 1, 1, 0.04, 0)
    return _png(fig, dpi=80)


def _class_chart(summary: gpd.GeoDataFrame, schema: ClassSchema) -> str:
    s = summary[summary["covered_pct"].fillna(0) > 0].head(60)
    fig, ax = _subplots(figsize=(10, max(2.0, 0.22 * len(s) + 1)))
    left = np.zeros(len(s))
    # Positions, not the ids as categories: two ids cut to the same label shared one bar.
    y = np.arange(len(s))
    for c in schema.classes:
        v = s[f"{c.name}_pct"].fillna(0).to_numpy()
        ax.barh(y, v, left=left, color=np.array(c.color) / 255, label=plain_text(c.name))
        left += v
    ax.set_yticks(y, [_label(v) for v in s["field_id"]])
    ax.invert_yaxis()
    ax.set_xlabel("share of valid pixels, %")
    ax.set_xlim(0, 100)
    ax.set_title("Class shares per field (lowest health first)", pad=24)
    # Above the bars: inside them it hid the last field's.
    ax.legend(ncol=len(schema), loc="lower center", bbox_to_anchor=(0.5, 1.0), fontsize=8,
              frameon=False)
    fig.tight_layout()
    return _png(fig)


def _index_chart(summary: gpd.GeoDataFrame, index_names: Sequence[str]) -> str | None:
    names = [n for n in index_names if f"{n}_median" in summary]
    if not names:
        return None
    s = summary[summary["covered_pct"].fillna(0) > 0].head(60)
    fig, axes = _subplots(1, len(names), figsize=(4 * len(names), max(2.5, 0.2 * len(s) + 1)),
                             squeeze=False)
    y = np.arange(len(s))
    for ax, n in zip(axes[0], names, strict=True):
        ax.hlines(y, s[f"{n}_p10"], s[f"{n}_p90"], color="#6a9f58", linewidth=3)
        ax.plot(s[f"{n}_median"], y, "k|", markersize=10)
        names = [_label(v) for v in s["field_id"]]
        ax.set_yticks(y, names if ax is axes[0][0] else [""] * len(y),
                      fontsize=7)
        ax.invert_yaxis()
        ax.set_title(f"{index_label(n)}: "
                     "p10 to p90, median tick")
        ax.xaxis.set_major_locator(MaxNLocator(5))  # GLI's 0.0025 steps overlapped
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def _health_chart(summary: gpd.GeoDataFrame) -> str | None:
    v = summary["health_score"].dropna().to_numpy()
    if len(v) < 2:
        return None
    fig, ax = _subplots(figsize=(5, 2.6))
    ax.hist(v, bins=np.linspace(0, 100, 21), color="#3b7d3c")
    ax.set_xlabel("health score")
    ax.set_ylabel("fields")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # no "1.5 fields"
    ax.set_title("Health score distribution")
    fig.tight_layout()
    return _png(fig)


_TABLE_COLS = (
    ("rank", "rank", "{:.0f}"), ("field_id", "field", "{}"), ("status", "status", "{}"),
    ("health_score", "health", "{:.1f}"), ("area_ha", "area ha", "{:.4f}"),
    ("covered_pct", "covered %", "{:.1f}"), ("vegetation_pct", "vegetation %", "{:.1f}"),
    ("weed_pressure_pct", "weed pressure %", "{:.2f}"),
    ("disease_incidence_pct", "disease incid. %", "{:.2f}"),
    ("at_risk_m2", "at-risk m2", "{:.2f}"), ("zones", "zones", "{:.0f}"),
)


def _param(value: Any) -> str:
    """A run parameter as a reader wants it: "-" for none, lists without brackets."""
    if value is None or value == {} or value == []:
        return "-"
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    return str(value)


def _fmt(v: Any, f: str) -> str:
    if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
        return "-"
    try:
        # Escaped whatever it is: field ids come from the user's file and may hold markup.
        return html.escape(f.format(v))
    except (ValueError, TypeError):
        return html.escape(str(v))


def _table(summary: gpd.GeoDataFrame, index_names: Sequence[str]) -> str:
    cols = [c for c in _TABLE_COLS if c[0] in summary]
    if summary["area_ha"].median() < 1:
        # Plots of a few square metres read better in m2 than as 0.0008 ha.
        summary = summary.assign(area_m2=summary["area_ha"] * 1e4)
        cols = [("area_m2", "area m2", "{:.1f}") if c[0] == "area_ha" else c for c in cols]
    cols += [(f"{n}_median", f"{n} median", "{:.3f}") for n in index_names
             if f"{n}_median" in summary]
    head = "".join(f"<th{' class=id' if c == 'field_id' else ''}>{html.escape(t)}</th>"
                   for c, t, _ in cols)
    rows = "".join(
        "<tr>" + "".join(f"<td{' class=id' if c == 'field_id' else ''}>{_fmt(r[c], f)}</td>"
                         for c, _, f in cols) + "</tr>"
        for _, r in summary.iterrows()
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _quiet_glyphs(func: Callable[P, R]) -> Callable[P, R]:
    """``func`` without matplotlib's missing-glyph warnings.

    Field ids in scripts the bundled font lacks (CJK) draw as boxes in the charts (the HTML
    table shows them right); a warning per glyph and figure flooded the log.
    """
    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Glyph .* missing from font", UserWarning)
            return func(*args, **kwargs)
    return wrapper


@_quiet_glyphs
def write_report(
    path: str | os.PathLike[str],
    survey: str | SurveyRaster,
    roles: Mapping[str, int],
    classes_tif: Path,
    schema: ClassSchema,
    summary: gpd.GeoDataFrame,
    zones: gpd.GeoDataFrame | None,
    parameters: Mapping[str, Any],
    index_names: Sequence[str] = (),
    notes: Sequence[str] = (),
    title: str = "Field survey report",
    has_fields: bool = True,
    zones_computed: bool = True,
) -> Path:
    """Write ``report.html`` (everything inline: opens offline, mails as one file).

    Args:
        path: the HTML file to write.
        survey: the input image (for the picture underneath the maps): its path, or the run's
            :class:`~agriseg.raster.SurveyRaster`, whose cached overview then gives the
            whole-survey map without decoding the image again.
        roles: band roles of the input (``{"red": 1, ...}``).
        classes_tif: class raster.
        schema: class schema.
        summary: per-field table from :func:`agriseg.fields.summarize_fields`.
        zones: at-risk zones (or ``None``).
        parameters: run parameters to list at the end.
        index_names: vegetation indices summarised per field.
        notes: warnings to show (repaired fields, fields outside the raster, ...).
        title: page title.
        has_fields: fields came from a file (draw and label them on the overview).
        zones_computed: the zones step ran (``--skip zones``: "not computed", not 0).

    Raises:
        OutputError: the file cannot be written.
    """
    t0 = time.perf_counter()
    path = Path(path)
    path_of = survey.path if isinstance(survey, SurveyRaster) else survey
    n_zones = 0 if zones is None else len(zones)
    valid_ha = float(summary["valid_ha"].sum())
    surveyed = (f"{valid_ha * 1e4:.1f} m2" if valid_ha < 0.01 else
                f"{valid_ha:.3f} ha" if valid_ha < 10 else f"{valid_ha:.1f} ha")
    cards = [
        # With fields, the sum of their valid areas (overlapping fields count twice).
        ("in fields" if has_fields else "surveyed", surveyed),
        ("fields", f"{len(summary)}" if has_fields else "whole survey"),
        ("at-risk zones", f"{n_zones}" if zones_computed else "not computed"),
    ]
    if has_fields:
        cards.append(("median health", _fmt(float(summary["health_score"].median()), "{:.1f}")))
    else:
        # One "field" is its own reference stand (S = 1): its score says less than the shares.
        row = summary.iloc[0]
        cards += [("weed pressure", _fmt(row.get("weed_pressure_pct"), "{:.1f} %")),
                  ("disease incidence", _fmt(row.get("disease_incidence_pct"), "{:.1f} %"))]
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<header><h1>{html.escape(title)}</h1><p>{html.escape(os.path.basename(path_of))}"
        f" · {time.strftime('%Y-%m-%d %H:%M')}</p></header><main>",
        "<div class='cards'>" + "".join(
            f"<div class='card'>{html.escape(k)}<b>{html.escape(v)}</b></div>" for k, v in cards
        ) + "</div>",
    ]
    if notes:
        parts.append("<ul>" + "".join(f"<li class='note'>{html.escape(n)}</li>" for n in notes)
                     + "</ul>")
    parts.append("<h2>Overview</h2>")
    overview, stretch = _overview(survey, roles, classes_tif, schema, summary, zones,
                                  has_fields, zones_computed)
    parts.append(_img(overview, "overview map"))
    scored = bool(summary["health_score"].notna().any())
    parts.append("<h2>Fields</h2><p>Ranked by health score: rank 1 needs attention first.</p>"
                 if scored else "<h2>Fields</h2><p>No field has a health score (see the notes "
                 "above).</p>")
    parts.append(_table(summary, index_names))
    if scored:  # a satellite run has none: the formula only raised the question
        parts.append("<h3>Health score</h3><pre>" + html.escape(HEALTH_FORMULA) + "</pre>")
    parts.append("<h2>Charts</h2>")
    for chart in (_class_chart(summary, schema), _index_chart(summary, index_names),
                  _health_chart(summary)):
        if chart:
            parts.append(f"<p>{_img(chart, 'chart')}</p>")
    if has_fields:
        shown = summary[summary["covered_pct"].fillna(0) > 0].head(MAX_FIELD_MAPS)
        parts.append("<h2>Field maps</h2>")
        if len(summary) > len(shown):
            parts.append(f"<p>{len(shown)} of {len(summary)} fields shown (lowest health "
                         "first; fields outside the raster have no map).</p>")
        parts.append("<div class='grid'>")
        rows = [r for _, r in shown.iterrows()]
        # Maps in threads: reading and decoding the fields' windows release the GIL, and the
        # figures are pyplot-free (see _subplots).
        with ThreadPoolExecutor(min(FIELD_MAP_THREADS, os.cpu_count() or 1)) as pool:
            uris = list(pool.map(lambda r: _field_map(survey, roles, classes_tif, schema,
                                                      r.geometry, zones, stretch), rows))
        # The classes playing weed and disease, under their own names (a model's classes
        # may be "weed/grass" and "Cercospora": fixed weed_pct columns showed "-").
        risky = [c for c in (schema.by_role("weed"), schema.by_role("disease")) if c is not None]
        for r, uri in zip(rows, uris, strict=True):
            if uri is None:
                continue
            shares = "".join(f"{html.escape(c.name)} {_fmt(r.get(f'{c.name}_pct'), '{:.1f}')} % · "
                             for c in risky)
            parts.append(
                f"<div class='field'><h3>{html.escape(str(r['field_id']))} · health "
                f"{_fmt(r['health_score'], '{:.1f}')} · rank {_fmt(r['rank'], '{:.0f}')}</h3>"
                f"{_img(uri, 'field ' + str(r['field_id']))}"
                f"<div>{shares}zones {_fmt(r['zones'], '{:.0f}')}</div></div>"
            )
        parts.append("</div>")
    if n_zones:
        assert zones is not None  # n_zones > 0 only when zones is given
        top = zones.head(20)
        parts.append("<h2>Largest at-risk zones</h2><table><thead><tr><th>zone</th>"
                     "<th>class</th><th>area m2</th><th>confidence %</th><th>field</th>"
                     "<th>lat</th><th>lon</th></tr></thead><tbody>")
        for _, z in top.iterrows():
            parts.append(
                f"<tr><td>{z['zone_id']}</td><td>{html.escape(str(z['class']))}</td>"
                f"<td>{z['area_m2']:.{2 if z['area_m2'] >= 0.1 else 4}f}</td>"
                f"<td>{_fmt(z['mean_confidence'], '{:.0f}')}</td>"
                f"<td class=id>{_fmt(z['field_id'], '{}')}</td>"
                f"<td>{z['centroid_lat']:.6f}</td><td>{z['centroid_lon']:.6f}</td></tr>"
            )
        parts.append("</tbody></table>")
    parts.append("<h2>Run parameters</h2><table><tbody>" + "".join(
        f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(_param(v))}</td></tr>"
        for k, v in parameters.items()
    ) + "</tbody></table>")
    parts.append("<p>Health score, class shares and zones: see README, section Outputs.</p>")
    parts.append("</main></body></html>")
    tmp = path.with_name(f".{path.stem}.partial.html")
    try:
        tmp.write_text("\n".join(parts), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{path}: cannot write the report ({exc.strerror or exc})") from exc
    log.debug("report: %s (%.1f s)", path, time.perf_counter() - t0)
    return path

