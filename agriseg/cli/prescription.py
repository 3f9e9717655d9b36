"""``agriseg prescription``: a sprayer prescription map from a finished run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from agriseg.cli import NonEmptyPath

if TYPE_CHECKING:
    import geopandas as gpd

    from agriseg.classes import ClassSchema
    from agriseg.prescription import Prescription


@click.command()
@click.argument("run_dir", metavar="DIR",
                type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--rate", "rates", required=True,
              help="Rate per class, e.g. weed=2.5,disease=1.0 (units per ha of your product; "
                   "class names in any case). Per zone, rate 0 leaves the class's zones out.")
@click.option("--grid", "grid_m", type=float, default=None,
              help="Grid cell edge in metres (e.g. 10; at most 1,000,000 cells). Without it: "
                   "one polygon per zone of a class with a rate.")
@click.option("--min-share", type=float, default=1.0, show_default=True,
              help="Percent of a cell's valid pixels a class needs to trigger its rate.")
@click.option("--base-rate", type=float, default=0.0, show_default=True,
              help="Rate of grid cells where no rated class reaches --min-share; where one "
                   "does, the highest such class rate applies, even if lower. Not used per "
                   "zone (zones of classes without a rate are left out).")
@click.option("--column", default="RATE", show_default=True,
              help="Name of the rate column (10 characters at most for Shapefiles).")
@click.option("--crs", default="EPSG:4326", show_default=True,
              help="2D geographic or projected CRS of the output; terminals usually expect "
                   "WGS 84 lon/lat.")
@click.option("--out", "-o", type=NonEmptyPath(dir_okay=False, path_type=Path),
              help="Output .shp or .gpkg, in an existing folder [DIR/prescription.shp].")
@click.option("--overwrite", is_flag=True,
              help="Replace an existing output file (for a Shapefile, with all its sidecars).")
def prescription(run_dir: Path, rates: str, grid_m: float | None, min_share: float,
                 base_rate: float, column: str, crs: str, out: Path | None,
                 overwrite: bool) -> None:
    """Write a prescription map (Shapefile/GeoPackage with a numeric rate) from run DIR.

    \b
    Grid cells:  agriseg prescription out/ --rate weed=2.5,disease=1 --grid 10
    Per zone:    agriseg prescription out/ --rate weed=2.5 --out rx.gpkg
    """  # noqa: D301 (click's no-rewrap marker is the \b character)
    from agriseg.errors import ConfigError, InputError
    from agriseg.prescription import (
        Prescription,
        check_crs,
        check_output,
        grid_prescription,
        output_path,
        parse_rates,
        write_prescription,
    )
    from agriseg.survey import run_files

    classes = run_dir / "classes.tif"
    if not classes.exists():
        raise InputError(f"{run_dir}: no classes.tif; give the --out folder of `agriseg run`")
    manifest = run_dir / "run.json"
    run_info, schema = _run_info(run_dir, manifest)
    if len(column) > 10 and (out is None or out.suffix.lower() == ".shp"):
        raise ConfigError(f"--column {column!r} is longer than 10 characters, which Shapefiles "
                          "truncate; use a shorter name or --out FILE.gpkg")
    rx = Prescription(parse_rates(rates, schema), grid_m, min_share / 100, base_rate, column)
    _note_unmeasured(run_info, schema, rx)
    check_crs(crs)
    out = output_path(out or run_dir / "prescription.shp")
    # Before the work: a wrong --out is found in a second.
    listed = run_info.get("outputs")
    check_output(out, overwrite,
                 run_files(run_dir, listed.values() if isinstance(listed, dict) else ()))
    if grid_m is not None:
        gdf = grid_prescription(classes, schema, rx)
        changed = int((gdf[column] != base_rate).sum())
        summary = f"{len(gdf)} cell(s), {changed} at a rate other than --base-rate {base_rate:g}"
    else:
        gdf = _zone_map(run_dir, manifest, run_info, schema, rx)
        summary = f"{len(gdf)} zone polygon(s)"
    written = write_prescription(gdf, out, crs, column)
    click.echo(f"wrote {written}: {summary}")


def _note_unmeasured(run_info: dict[str, Any], schema: ClassSchema, rx: Prescription) -> None:
    """Say so when a rated class is one the run's model could not find.

    A run without crop rows (no weeds separated) or on satellite pixels (plant cover only)
    gave an all-zero weed map that read as "no weeds anywhere".
    """
    from agriseg.models.base import blind_roles

    model = run_info.get("model")
    prepared = model.get("prepared") if isinstance(model, dict) else None
    info: dict[str, Any] = prepared if isinstance(prepared, dict) else {}
    found = info.get("rows")
    rows: dict[str, Any] = found if isinstance(found, dict) else {}
    blind, cover = blind_roles(info)
    roles = {c.name: c.role for c in schema.classes}
    missed = [name for name, _ in rx.rates if roles.get(name) in blind]
    if missed:
        why = ("its classes mean plant cover" if cover else
               f"it found no crop rows ({rows.get('reason', 'unknown')})")
        click.echo(f"note: the run could not find {', '.join(missed)}: {why}; this map's "
                   f"{' and '.join(missed)} cells or zones are not a finding that there are "
                   "none", err=True)


def _run_info(run_dir: Path, manifest: Path) -> tuple[dict[str, Any], ClassSchema]:
    """The run's run.json and class schema (the default classes for a folder without one).

    Raises:
        InputError: run.json is unreadable or not a run's, or the run has not finished.
    """
    from agriseg.classes import DEFAULT_CLASSES, ClassSchema
    from agriseg.errors import AgrisegError, InputError
    from agriseg.survey import MANIFEST_PARTIAL, WORK_DIR

    if not manifest.exists():
        # What a run that has not finished leaves in its --out folder.
        if any((run_dir / m).exists() for m in (WORK_DIR, MANIFEST_PARTIAL)):
            raise InputError(f"{run_dir}: not a finished agriseg run: no run.json; finish or "
                             "resume the run first (run the same `agriseg run` command again)")
        # A classes.tif put in a folder of its own (as the tests do): its classes are taken
        # for the default ones, which the user should know.
        click.echo(f"note: {run_dir} has no run.json; reading classes.tif as the default "
                   f"classes {', '.join(DEFAULT_CLASSES.names)}", err=True)
        return {}, DEFAULT_CLASSES
    try:
        run_info = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # unreadable, not UTF-8, not JSON, empty
        raise InputError(f"{manifest}: cannot read it as a run's JSON ({exc}); the run folder "
                         "is damaged: rerun `agriseg run`") from exc
    if not isinstance(run_info, dict):
        raise InputError(f"{manifest}: holds a JSON {type(run_info).__name__}, not the object "
                         "`agriseg run` writes; rerun `agriseg run`")
    try:
        schema = ClassSchema.from_dict(run_info.get("schema", DEFAULT_CLASSES.to_dict()))
    except (AgrisegError, AttributeError, TypeError) as exc:  # schema not an object
        raise InputError(f"{manifest}: its class schema is unusable ({exc}); rerun "
                         "`agriseg run`") from exc
    return run_info, schema


def _zone_map(run_dir: Path, manifest: Path, run_info: dict[str, Any], schema: ClassSchema,
              rx: Prescription) -> gpd.GeoDataFrame:
    """The per-zone prescription, with notes on rates that write nothing.

    Raises:
        InputError: no zones.gpkg, or no zone would be written.
    """
    from agriseg.errors import InputError
    from agriseg.prescription import read_zones, zone_prescription

    zones_path = run_dir / "zones.gpkg"
    if not zones_path.exists():
        if not manifest.exists():
            raise InputError(f"{zones_path}: not found, and {run_dir} has no run.json: not a "
                             "finished agriseg run; finish or resume the run first, or use "
                             "--grid METRES for a grid prescription")
        params = run_info.get("parameters")
        skip = params.get("skip") if isinstance(params, dict) else None
        skipped = isinstance(skip, list) and "zones" in skip
        why = ("the run skipped the zones step (--skip zones): rerun without it, or"
               if skipped else "the run found no at-risk zones:")
        raise InputError(f"{zones_path}: not found; {why} use --grid METRES for a grid "
                         "prescription")
    if rx.base_rate:
        click.echo("note: --base-rate is for --grid cells; per zone, only zones of classes "
                   "with a rate above 0 are written", err=True)
    zones = read_zones(zones_path)
    gdf = zone_prescription(zones, rx)
    # Which classes have zones is asked of all zones, before rate 0 leaves some out: a rate
    # of 0 for a class with zones said "no zone of weed".
    count = zones["class"].astype(str).str.lower().value_counts()
    absent = [name for name, _ in rx.rates if name.lower() not in count]
    zero = [name for name, value in rx.rates if value == 0 and name.lower() in count]
    if gdf.empty:
        # An empty file handed to a terminal reads as "nothing to spray", which the run did
        # not say.
        if zero:
            raise InputError(
                f"{zones_path}: the zones of {', '.join(zero)} have rate 0, which leaves them "
                "out, and no other zone has a rate: the map would be empty; give rates above "
                "0, or use --grid METRES (cells are written at any rate)"
            )
        rated = ", ".join(name for name, _ in rx.rates)
        raise InputError(
            f"{zones_path}: no zone of {rated} (the at-risk classes are "
            f"{', '.join(c.name for c in schema.at_risk) or 'none'}); give rates for "
            "those, or use --grid METRES for a grid prescription"
        )
    if absent:
        click.echo(f"note: no zone of {', '.join(absent)}; its rate is not used", err=True)
    for name in zero:
        click.echo(f"note: rate 0 for {name}: its {count[name.lower()]} zone(s) are left out "
                   "of the map", err=True)
    return gdf
