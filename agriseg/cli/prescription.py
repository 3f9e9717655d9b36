"""``agriseg prescription``: a sprayer prescription map from a finished run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click


@click.command()
@click.argument("run_dir", metavar="DIR",
                type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--rate", "rates", required=True,
              help="Rate per class, e.g. weed=2.5,disease=1.0 (units per ha of your product).")
@click.option("--grid", "grid_m", type=float, default=None,
              help="Grid cell edge in metres (e.g. 10). Without it: one polygon per zone.")
@click.option("--min-share", type=float, default=1.0, show_default=True,
              help="Percent of a cell's valid pixels a class needs to trigger its rate.")
@click.option("--base-rate", type=float, default=0.0, show_default=True,
              help="Rate of cells with nothing to treat.")
@click.option("--column", default="RATE", show_default=True,
              help="Name of the rate column (10 characters at most for Shapefiles).")
@click.option("--crs", default="EPSG:4326", show_default=True,
              help="CRS of the output; terminals usually expect WGS 84 lon/lat.")
@click.option("--out", "-o", type=click.Path(dir_okay=False, path_type=Path),
              help="Output .shp or .gpkg [DIR/prescription.shp].")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
def prescription(run_dir: Path, rates: str, grid_m: float | None, min_share: float,
                 base_rate: float, column: str, crs: str, out: Path | None,
                 overwrite: bool) -> None:
    """Write a prescription map (Shapefile/GeoPackage with a numeric rate) from run DIR.

    \b
    Grid cells:  agriseg prescription out/ --rate weed=2.5,disease=1 --grid 10
    Per zone:    agriseg prescription out/ --rate weed=2.5 --out rx.gpkg
    """  # noqa: D301 (click's no-rewrap marker is the \b character)
    from agriseg.classes import DEFAULT_CLASSES, ClassSchema
    from agriseg.errors import ConfigError, InputError, OutputError
    from agriseg.prescription import (
        Prescription,
        check_crs,
        grid_prescription,
        parse_rates,
        write_prescription,
    )

    classes = run_dir / "classes.tif"
    if not classes.exists():
        raise InputError(f"{run_dir}: no classes.tif; give the --out folder of `agriseg run`")
    schema = DEFAULT_CLASSES
    manifest = run_dir / "run.json"
    run_info: dict[str, Any] = {}
    if manifest.exists():
        run_info = json.loads(manifest.read_text())
        schema = ClassSchema.from_dict(run_info.get("schema", DEFAULT_CLASSES.to_dict()))
    if len(column) > 10 and (out is None or out.suffix.lower() == ".shp"):
        raise ConfigError(f"--column {column!r} is longer than 10 characters, which Shapefiles "
                          "truncate; use a shorter name or --out FILE.gpkg")
    rx = Prescription(parse_rates(rates, schema), grid_m, min_share / 100, base_rate, column)
    check_crs(crs)
    out = out or run_dir / "prescription.shp"
    try:
        exists = out.exists()
    except OSError as exc:  # a file name longer than the file system takes
        raise OutputError(f"{out}: cannot be written ({exc.strerror}); choose a shorter "
                          "--out") from exc
    if exists and not overwrite:
        # A sprayer map already handed to a terminal must not change under its name unasked.
        raise OutputError(f"{out}: exists; use --overwrite to replace it or --out another file")
    if grid_m is not None:
        gdf = grid_prescription(classes, schema, rx)
    else:
        from agriseg.prescription import zone_prescription

        zones = run_dir / "zones.gpkg"
        if not zones.exists():
            skipped = "zones" in run_info.get("parameters", {}).get("skip", [])
            why = ("the run skipped the zones step (--skip zones): rerun without it, or"
                   if skipped else "the run found no at-risk zones:")
            raise InputError(
                f"{zones}: not found; {why} use --grid METRES for a grid prescription"
            )
        gdf = zone_prescription(zones, rx)
        unused = sorted({name for name, _ in rx.rates} - set(gdf["class"]))
        if unused and not gdf.empty:
            click.echo(f"note: no zone of {', '.join(unused)}; its rate is not used", err=True)
        if gdf.empty:
            # An empty file handed to a terminal reads as "nothing to spray", which the run
            # did not say: its zones are of other classes than those given rates.
            rated = ", ".join(name for name, _ in rx.rates)
            raise InputError(
                f"{zones}: no zone of {rated} (the at-risk classes are "
                f"{', '.join(c.name for c in schema.at_risk) or 'none'}); give rates for "
                "those, or use --grid METRES for a grid prescription"
            )
    write_prescription(gdf, out, crs, column)
    treated = int((gdf[column] > base_rate).sum())
    click.echo(f"wrote {out}: {len(gdf)} polygon(s), {treated} with a rate above {base_rate}")
