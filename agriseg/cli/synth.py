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
@click.option("--overwrite", is_flag=True, help="Replace existing files.")
def synth(out: Path, truth: Path, size: int, seed: int, gsd: float, nir: bool,
          overwrite: bool) -> None:
    """Write a synthetic crop-row field OUT and its truth classes (soil, crop, weed, disease)."""
    from agriseg.errors import OutputError
    from agriseg.synth import FieldSpec, write_field

    for p in (out, truth):
        if p.exists() and not overwrite:
            raise OutputError(f"{p}: exists; use --overwrite to replace it")
    spec = FieldSpec(size=size, seed=seed, gsd=gsd, multispectral=nir)
    write_field(spec, out, truth)
    click.echo(f"wrote {out} and {truth}")
