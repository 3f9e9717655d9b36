"""``agriseg evaluate``: accuracy of a class raster against a truth raster."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command()
@click.argument("pred", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("truth", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def evaluate(pred: Path, truth: Path, as_json: bool) -> None:
    """Per-class IoU, F1, pixel accuracy and confusion matrix of PRED against TRUTH.

    Both rasters must share one grid (size, transform, CRS); class 255 is ignored.
    """
    from agriseg.metrics import evaluate_rasters

    scores = evaluate_rasters(pred, truth)
    click.echo(json.dumps(scores.to_dict(), indent=2) if as_json else scores.table())
