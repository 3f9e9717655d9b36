"""``agriseg synth``: synthetic georeferenced fields with ground truth."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--truth", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Where to write the ground-truth class raster.")
@click.option("--size", default=1024, show_default=True, help="Raster edge in pixels.")
@click.option("--seed", default=0, show_default=True, help="Random seed (deterministic).")
@click.option("--gsd", default=0.02, show_default=True, help="Pixel size in metres.")
@click.option("--nir", is_flag=True, help="Add red-edge and NIR bands (multispectral).")
@click.option("--row-angle", type=float, default=None,
              help="Row direction, degrees counter-clockwise from east [default: random].")
@click.option("--row-spacing", type=float, default=None,
              help="Row spacing in metres [default: random 0.5-0.9].")
@click.option("--crop-cover", default=0.45, show_default=True,
              help="Fraction of the row spacing covered by canopy.")
@click.option("--weeds", "weed_density", default=1.0, show_default=True,
              help="Weed density multiplier (0 for none).")
@click.option("--disease", "disease_density", default=1.0, show_default=True,
              help="Disease patch density multiplier (0 for none).")
@click.option("--no-border", is_flag=True, help="No irregular nodata footprint edge.")
@click.option("--crs", default="EPSG:32615", show_default=True, help="Projected CRS.")
@click.option("--origin", type=(float, float), default=(500000.0, 4900000.0),
              show_default=True, help="Top-left corner X Y in CRS units.")
@click.option("--overwrite", is_flag=True, help="Replace existing files.")
def synth(out: Path, truth: Path, size: int, seed: int, gsd: float, nir: bool,
          row_angle: float | None, row_spacing: float | None, crop_cover: float,
          weed_density: float, disease_density: float, no_border: bool, crs: str,
          origin: tuple[float, float], overwrite: bool) -> None:
    """Write a synthetic crop-row field OUT and its truth classes (soil, crop, weed, disease)."""
    from agriseg.errors import OutputError
    from agriseg.synth import FieldSpec, write_field

    for p in (out, truth):
        if p.exists() and not overwrite:
            raise OutputError(f"{p}: exists; use --overwrite to replace it")
    spec = FieldSpec(
        size=size, seed=seed, gsd=gsd, multispectral=nir, row_angle_deg=row_angle,
        row_spacing_m=row_spacing, crop_cover=crop_cover, weed_density=weed_density,
        disease_density=disease_density, nodata_border=not no_border, crs=crs,
        origin_xy=origin,
    )
    field = write_field(spec, out, truth)
    fractions = field.info["class_fractions"]
    assert isinstance(fractions, dict)
    shares = ", ".join(f"{k} {v:.1%}" for k, v in fractions.items())
    # As `agriseg run` reports rows: counter-clockwise from east, within -90..90 degrees.
    angle = (float(field.info["row_angle_deg"]) + 90.0) % 180.0 - 90.0  # type: ignore[arg-type]
    click.echo(
        f"wrote {out} and {truth}: rows at {angle:.1f} deg, "
        f"{field.info['row_spacing_m']:.2f} m apart; {shares}"
    )
