"""Post-processing steps of a survey run: zones, field summaries, report, QGIS project.

Each step takes the run's ``SurveyContext`` (see :mod:`agriseg.survey`), writes under
``ctx.work_dir`` and lists its files in ``ctx.outputs``; the survey moves them into place.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agriseg.classes import file_stem
from agriseg.grid import on_earth
from agriseg.indices import INDICES, index_label
from agriseg.pool import shutdown_pool
from agriseg.qgis import (
    ProjectLayer,
    class_qml,
    fields_qml,
    ramp_qml,
    rgb_qml,
    write_gpkg_style,
    write_project,
    zone_ids_qml,
    zones_qml,
)
from agriseg.quicklook import colour_stretch, display_roles
from agriseg.raster import read_overview

# geopandas, the zone/field modules and matplotlib (report) are imported inside the steps:
# they cost ~1.1 s of start-up that a run skipping these steps should not pay.
if TYPE_CHECKING:
    import geopandas as gpd

    from agriseg.fields import FieldSet
    from agriseg.raster import SurveyRaster
    from agriseg.survey import PostStep, SurveyContext

log = logging.getLogger(__name__)


def _fieldset(ctx: SurveyContext) -> FieldSet:
    from agriseg.fields import read_fields, whole_raster_field

    if ctx.fieldset is not None:  # read and checked before the tiles
        return ctx.fieldset
    if ctx.config.fields is None:
        return whole_raster_field(ctx.survey.grid)
    return read_fields(ctx.config.fields, ctx.survey.grid, ctx.config.field_id,
                       ctx.config.fields_layer)


def _read_zones(work: Path) -> gpd.GeoDataFrame | None:
    import geopandas as gpd

    path = work / "zones.gpkg"
    return gpd.read_file(path, layer="zones") if path.exists() else None


def zones_step(ctx: SurveyContext) -> None:
    """``zones.gpkg`` (styled) and ``zone_ids.tif`` (instance ids) from the class mask."""
    from agriseg.vectorize import ZoneParams, vectorize_zones, write_zones

    fields = _fieldset(ctx).fields  # without --fields the whole survey: field_id "survey"
    work = ctx.work_dir
    ids_tif = work / "zone_ids.tif"
    zones = vectorize_zones(
        work / "classes.tif", ctx.schema, ZoneParams(min_area_m2=ctx.config.min_zone_area),
        confidence_tif=work / "confidence.tif", fields=fields, zone_raster=work / "zones.work.tif",
    )
    # The scan's worker processes are done: their memory goes before the zone raster's COG
    # copy takes its buffers (at 1 GP the idle worker held ~0.25 GB PSS through it).
    shutdown_pool()
    info: dict[str, object] = {"count": len(zones), "min_area_m2": ctx.config.min_zone_area}
    if zones.empty:
        # An all-empty zone layer or raster would open in QGIS as a broken layer: skip them.
        (work / "zones.work.tif").unlink(missing_ok=True)
        log.info("zones: no at-risk patch of %s m2 or more; no zone files written",
                 ctx.config.min_zone_area)
    else:
        import rasterio

        from agriseg.output import OutputSpec, finalize_cog

        with rasterio.open(work / "zones.work.tif") as ds:
            dtype = ds.dtypes[0]  # uint16 or uint32, by the number of zones
        finalize_cog(work / "zones.work.tif", ids_tif,
                     OutputSpec("zone_ids", dtype, 0, "NEAREST", "zone id"), sparse=True)
        (work / "zones.work.tif").unlink(missing_ok=True)
        ids_tif.with_suffix(".qml").write_text(
            zone_ids_qml(dict(zip(zones["zone_id"], zones["class"], strict=True)), ctx.schema))
        write_zones(zones, work / "zones.gpkg")
        write_gpkg_style(work / "zones.gpkg", "zones", zones_qml(ctx.schema))
        ctx.outputs["zones"] = Path("zones.gpkg")
        ctx.outputs["zone_ids"] = Path("zone_ids.tif")
        info["by_class"] = zones["class"].value_counts().to_dict()
        info["area_m2_by_class"] = zones.groupby("class")["area_m2"].sum().round(3).to_dict()
    ctx.manifest["zones"] = info


def fields_step(ctx: SurveyContext) -> None:
    """``fields.gpkg`` (styled by health) and ``fields.csv``."""
    import numpy as np
    import pandas as pd

    from agriseg.fields import NO_PIXELS, some_ids, summarize_fields, write_fields

    fs = _fieldset(ctx)
    for note in fs.notes:
        log.warning("%s", note)
    work = ctx.work_dir
    zones = _read_zones(work)
    indices = {name.split("/", 1)[1]: work / rel for name, rel in ctx.outputs.items()
               if name.startswith("indices/")}
    summary = summarize_fields(fs, work / "classes.tif", ctx.schema, indices, zones)
    if "zones" in ctx.config.skip:  # not computed: empty, not 0
        summary["zones"] = pd.array([pd.NA] * len(summary), dtype="Int64")
    notes = list(fs.notes)
    notes += _unmeasured(summary, ctx)
    if summary["rank"].isna().all() and len(summary) > 1:
        # No visiting order: the fields as the file lists them (the hidden scores' order
        # read as one).
        pos = {fid: i for i, fid in enumerate(fs.fields["field_id"])}
        order = np.argsort(summary["field_id"].map(pos).to_numpy(), kind="stable")
        summary = summary.iloc[order].reset_index(drop=True)
    empty = summary["field_id"][summary["status"] == NO_PIXELS].tolist()
    if empty:
        notes.append(
            f"{fs.source}: {len(empty)} field(s) hold no valid pixel (over the survey's "
            f"nodata, or smaller than a pixel): {some_ids(empty)}")
        log.warning("%s", notes[-1])
    write_fields(summary, work / "fields.gpkg", work / "fields.csv")
    write_gpkg_style(work / "fields.gpkg", "fields", fields_qml())
    ctx.outputs["fields"] = Path("fields.gpkg")
    ctx.outputs["fields_csv"] = Path("fields.csv")
    ctx.manifest["fields"] = {
        "source": fs.source, "layer": fs.layer, "id_column": fs.id_column,
        "count": len(summary),
        "notes": notes,
        "median_health_score": None if summary["health_score"].isna().all()
        else round(float(summary["health_score"].median()), 2),
    }


def _unmeasured(summary: gpd.GeoDataFrame, ctx: SurveyContext) -> list[str]:
    """Empty the field measures the model could not make, and say why (notes).

    Without crop rows the label-free model calls every plant crop: weed pressure 0.00 read
    as measured. On pixels too coarse for rows (satellite tiles) the classes mean plant
    cover: a green field under the survey's one NDVI cut was "98 % soil, health 1.5, visit
    first", woods and pasture scored 100, and the disease rule cannot see a patch.
    """
    import numpy as np
    import pandas as pd

    from agriseg.models.base import blind_roles

    info = ctx.prepared.info if isinstance(ctx.prepared.info, dict) else {}
    blind, cover = blind_roles(info)
    found = info.get("rows")
    rows: dict[str, Any] = found if isinstance(found, dict) else {}
    if cover:
        summary["weed_pressure_pct"] = np.nan
        summary["disease_incidence_pct"] = np.nan
        summary["health_score"] = np.nan
        summary["rank"] = pd.array([pd.NA] * len(summary), dtype="Int64")
        why = (f"at {ctx.survey.grid.gsd_m:.3g} m per pixel" if rows else
               f"with model {ctx.segmenter.name!r}")
        note = (f"{why} the classes mean plant cover (soil: bare ground, water, senesced "
                "plants; crop: any plant cover, woods and pasture too): fields get class "
                "shares and index statistics, but no weed pressure, disease incidence or "
                "health score")
    elif "weed" in blind and ctx.schema.by_role("weed") is not None:
        summary["weed_pressure_pct"] = np.nan
        note = (f"no crop rows found ({rows.get('reason', 'unknown')}): weeds are not "
                "separated from crop, so fields get no weed pressure, and their health "
                "score counts none")
    else:
        return []
    log.warning("%s", note)
    return [note]


def rows_text(rows: dict[str, Any]) -> str:
    """One line on the crop rows a model found (``prepared.info["rows"]``) for the report."""
    if not rows.get("detected"):
        return f"not found ({rows.get('reason', 'no row pattern')}): weeds not separated from crop"
    text = f"{rows['angle_deg']:.1f} deg from east, {rows['spacing_m']:.2f} m apart"
    extra = rows.get("orientations", [])[1:]
    if extra:
        text += "; other fields: " + ", ".join(
            f"{o['angle_deg']:.1f} deg on {o['share']:.0%} of the survey" for o in extra)
    return text


def vegetation_text(info: dict[str, Any]) -> str | None:
    """One line on a model's vegetation rule (``prepared.info``) for the report, if it has one."""
    if "veg_threshold" not in info:
        return None
    text = (f"{index_label(str(info.get('index', 'index')))} > {info['veg_threshold']:.3f} "
            f"({info.get('veg_threshold_method', 'threshold')})")
    green = info.get("green_path")
    if isinstance(green, dict) and green.get("used"):
        text += f"; or (G-R)/(G+R) > {green['ngrdi_threshold']:.3f} where G > B"
    yellow = info.get("yellow_path")
    if isinstance(yellow, dict) and yellow.get("used"):
        text += (f"; or yellow leaves: blue share B/(R+G+B) < "
                 f"{yellow['blue_share_threshold']:.3f} over {yellow['window_px']} px")
    table = info.get("appearance")
    if isinstance(table, dict):
        text += ("; crop/weed colour table used" if table.get("used")
                 else f"; no crop/weed colour table ({table.get('reason', 'not used')})")
    return text


def report_step(ctx: SurveyContext) -> None:
    """``report.html``: one offline file with maps, table, charts and parameters."""
    import geopandas as gpd

    from agriseg.report import write_report

    work = ctx.work_dir
    summary = gpd.read_file(work / "fields.gpkg", layer="fields")
    zones = _read_zones(work)
    params = json.loads(ctx.config.model_dump_json())
    params["model"] = ctx.segmenter.name
    params["gsd_m"] = round(ctx.survey.grid.gsd_m, 4)
    params["raster_px"] = f"{ctx.survey.grid.width} x {ctx.survey.grid.height}"
    crs = ctx.survey.grid.crs
    params["crs"] = crs.to_string() if on_earth(crs) else "none: image coordinates (--gsd)"
    vegetation = vegetation_text(ctx.prepared.info)
    if vegetation:
        params["vegetation"] = vegetation
    rows = ctx.prepared.info.get("rows")
    if isinstance(rows, dict):
        params["crop rows"] = rows_text(rows)
    notes = list(ctx.manifest.get("fields", {}).get("notes", []))
    notes += [str(w) for w in ctx.prepared.warnings]
    notes += [str(w) for w in ctx.manifest.get("warnings", [])]
    indices = [n.split("/", 1)[1] for n in ctx.outputs if n.startswith("indices/")]
    # Seconds of maps and charts (a map per field): said, so a quiet console is not a hang.
    log.info("report: %d field(s), %d zone(s) ...", len(summary),
             0 if zones is None else len(zones))
    write_report(work / "report.html", ctx.survey, ctx.survey.roles.as_dict(),
                 work / "classes.tif", ctx.schema, summary, zones, params, indices, notes,
                 has_fields=ctx.config.fields is not None,
                 zones_computed="zones" not in ctx.config.skip)
    ctx.outputs["report"] = Path("report.html")


def project_step(ctx: SurveyContext) -> None:
    """``project.qgs``: every output with relative paths and embedded styles."""
    layers: list[ProjectLayer] = []
    out = ctx.outputs
    if "zones" in out:
        layers.append(ProjectLayer(out["zones"], "at-risk zones", zones_qml(ctx.schema),
                                   layer="zones"))
    if "fields" in out:
        layers.append(ProjectLayer(out["fields"], "fields (health)", fields_qml(),
                                   layer="fields", visible=ctx.config.fields is not None))
    if "zone_ids" in out:
        qml = (ctx.work_dir / out["zone_ids"]).with_suffix(".qml").read_text()
        layers.append(ProjectLayer(out["zone_ids"], "zone ids", qml, visible=False))
    layers.append(ProjectLayer(out["classes"], "classes", class_qml(ctx.schema), opacity=0.75))
    layers.append(ProjectLayer(out["confidence"], "confidence", ramp_qml(0, 100, "confidence"),
                               visible=False))
    # Probability outputs by file stem, with their class's place and name (N_A -> N/A).
    classes = {f"probability/{file_stem(n)}": (i, n) for i, n in enumerate(ctx.schema.names)}
    last = (len(classes), "")
    for name, rel in sorted(out.items(), key=lambda kv: (classes.get(kv[0], last)[0], kv[0])):
        if name.startswith("probability/"):
            label = classes.get(name, (0, name.split("/", 1)[1]))[1]
            layers.append(ProjectLayer(rel, f"{label} probability (%)",
                                       ramp_qml(0, 100, "confidence"), visible=False,
                                       group="class probabilities"))
        elif name.startswith("indices/"):
            d = INDICES[name.split("/", 1)[1]]
            layers.append(ProjectLayer(rel, index_label(d.name), ramp_qml(d.vmin, d.vmax),
                                       visible=False, group="vegetation indices"))
    layers.append(ProjectLayer(Path(ctx.survey.path), "input image",
                               _image_qml(ctx.survey)))
    grid = ctx.survey.grid
    write_project(ctx.work_dir / "project.qgs", layers, grid.crs.to_wkt(),
                  grid.crs.to_string(), grid.bounds, title=f"agriseg: {Path(ctx.survey.path).name}",
                  geographic=grid.crs.is_geographic, home=ctx.out_dir)
    ctx.outputs["project"] = Path("project.qgs")


def _image_qml(survey: SurveyRaster) -> str:
    """The input image's style: as it is when 8-bit, else with the quick look's stretch."""
    roles = survey.roles.as_dict()
    names = display_roles(roles)
    stretch = None
    if survey.dtype != "uint8" or survey.scale != 1 / 255 or survey.offset:
        data, valid, _ = read_overview(survey, names)
        lo, hi = colour_stretch(data, valid)
        import rasterio

        with rasterio.open(survey.path) as ds:
            band = roles[names[0]]
            declared = (ds.scales[band - 1], ds.offsets[band - 1])
        # QGIS shows the values a band declares scaled (gdal_edit.py -scale -offset), so the
        # stretch is then in reflectance; otherwise in the file's raw values.
        if declared != (1.0, 0.0) and declared == (survey.scale, survey.offset):
            stretch = (lo, hi)
        else:
            stretch = ((lo - survey.offset) / survey.scale, (hi - survey.offset) / survey.scale)
    import numpy as np

    dtype = np.dtype(survey.dtype)
    white = float(np.iinfo(dtype).max) if dtype.kind in "ui" else None
    fill = {"black": 0.0, "white": white, "fill": survey.nodata}.get(survey.mask_source)
    r, g, b = (roles[n] for n in names)
    return rgb_qml(r, g, b, roles.get("alpha", -1), stretch, fill)


POSTPROCESS_STEPS: list[tuple[str, PostStep]] = [
    ("zones", zones_step),
    ("fields", fields_step),
    ("report", report_step),
    ("project", project_step),
]
