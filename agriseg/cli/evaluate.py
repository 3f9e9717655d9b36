"""``agriseg evaluate``: accuracy of a class raster against a truth raster."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command()
@click.argument("pred", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("truth", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--truth-classes",
              help="What TRUTH's values are, when coded otherwise than 0=soil, 1=crop, "
              "2=weed, 3=disease: e.g. 0=soil,1=weed,2=crop,9=ignore (every value the "
              "truth holds must be listed).")
def evaluate(pred: Path, truth: Path, as_json: bool, truth_classes: str | None) -> None:
    """Per-class IoU, F1, pixel accuracy and confusion matrix of PRED against TRUTH.

    Both rasters must share one grid (size, transform, CRS), or, when either has no CRS
    (a PNG label image, a run with --gsd), one size; class 255 is ignored.
    """
    from agriseg.metrics import evaluate_rasters, parse_truth_classes

    mapping = parse_truth_classes(truth_classes) if truth_classes else None
    scores = evaluate_rasters(pred, truth, truth_classes=mapping)
    click.echo(json.dumps(scores.to_dict(), indent=2) if as_json else scores.table())
