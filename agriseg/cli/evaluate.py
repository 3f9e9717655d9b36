"""``agriseg evaluate``: accuracy of a class raster against a truth raster."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click
import numpy as np

if TYPE_CHECKING:
    from agriseg.classes import ClassSchema
    from agriseg.metrics import Recoding


@click.command()
@click.argument("rasters", nargs=-1, required=True,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--truth-classes",
              help="What TRUTH's values are, when coded otherwise than 0=soil, 1=crop, "
              "2=weed, 3=disease: e.g. 0=soil,1=weed,2=crop,9=ignore (every value the "
              "truth holds must be listed; 255 and the truth's own nodata value are "
              "unlabelled unless listed). Classes it does not name are left out of the "
              "mean IoU.")
@click.option("--truth-colors",
              help="Colour-coded TRUTH (RGB, RGBA or a colour table): each colour's class, "
              "as R,G,B=CLASS pairs separated by ';', e.g. "
              "'0,0,0=soil;0,255,0=crop;255,0,0=weed' (CLASS may be ignore; every colour "
              "must be listed; transparent pixels are unlabelled). Classes it does not "
              "name are left out of the mean IoU.")
@click.option("--pred-classes",
              help="Count predicted classes as others, for a truth that does not tell them "
              "apart: PRED_CLASS=CLASS pairs, CLASS a class or ignore, e.g. "
              "crop=soil,disease=soil to score a binary weed mask. Merged classes are left "
              "out of the mean IoU.")
def evaluate(rasters: tuple[Path, ...], as_json: bool, truth_classes: str | None,
             truth_colors: str | None, pred_classes: str | None) -> None:
    """Per-class IoU, F1, pixel accuracy and confusion matrix of PRED against TRUTH.

    RASTERS is PRED TRUTH, or several such pairs (a labelled dataset of tiles):
    their pixels are pooled into one confusion matrix, so the scores are the dataset's,
    not a mean of per-tile scores. The rasters of a pair share one grid (size, transform,
    CRS), or, when either has no CRS (a PNG label image, a run with --gsd), one size;
    class 255 is ignored. A binary mask of 0 and 255 (255 = the class) needs e.g.
    --truth-classes 0=soil,255=weed --pred-classes crop=soil,disease=soil.

    A truth that agrees far better with the prediction coded otherwise (1..3 for
    soil..weed beside an unlabelled 0, crop and weed swapped) is warned of after the
    scores, with the --truth-classes that reads it so; the scores stay as read. Classes
    in the mean IoU that the truth holds no pixel of are marked, and a second mean over
    the classes the truth holds follows.
    """
    from agriseg.metrics import (
        Scores,
        evaluate_rasters,
        parse_pred_classes,
        parse_truth_classes,
        parse_truth_colors,
        suggest_truth_coding,
    )

    if len(rasters) % 2:
        raise click.UsageError(
            f"give PRED TRUTH pairs; got {len(rasters)} file(s), the last one has no partner"
        )
    if truth_classes and truth_colors:
        raise click.UsageError("give --truth-classes (class values) or --truth-colors "
                               "(colour-coded labels), not both")
    pairs = list(zip(rasters[::2], rasters[1::2], strict=True))
    schemas = {_run_schema(p) for p, _ in pairs}
    if len(schemas) > 1:
        raise click.UsageError("the predictions come from runs of different classes; "
                               "evaluate each model's runs on their own")
    (schema,) = schemas
    mapping = parse_truth_classes(truth_classes, schema) if truth_classes else None
    colours = parse_truth_colors(truth_colors, schema) if truth_colors else None
    merge = parse_pred_classes(pred_classes, schema) if pred_classes else None
    each = [evaluate_rasters(p, t, schema, truth_classes=mapping, pred_classes=merge,
                             truth_colors=colours) for p, t in pairs]
    # One mapping for all pairs, so each leaves out the same classes.
    scores = Scores(np.sum([s.confusion for s in each], axis=0), each[0].names,
                    each[0].left_out)
    # On the pooled matrix: one coding for all pairs, as one option reads them all.
    recoding = suggest_truth_coding(scores.confusion, schema, mapping, colours)
    if as_json:
        if recoding is not None:  # on stderr: stdout stays one JSON document
            click.echo(_recoding_warning(recoding), err=True)
        out = scores.to_dict()
        out["truth_coding"] = recoding.to_dict() if recoding is not None else None
        click.echo(json.dumps(out, indent=2))
        return
    if len(pairs) > 1:
        click.echo(f"{len(pairs)} pairs, pixels pooled")
    click.echo(scores.table())
    if recoding is not None:
        click.echo(_recoding_warning(recoding), err=True)


def _recoding_warning(recoding: Recoding) -> str:
    """The warning for a truth that reads far better coded otherwise (the scores stand)."""
    # The codes that show it; a code of a few pixels that the one-to-one reading moves
    # along ("2 (scored as weed) 0 % predicted crop") is no evidence, only in the option.
    shown = [c for c in recoding.codes if c[3] >= 0.5] or list(recoding.codes)
    parts = [f"{code} (scored as {was}){' is' if i == 0 else ''} {100 * share:.0f} % "
             f"predicted {now}" for i, (code, was, now, share) in enumerate(shown)]
    if recoding.ignored:
        parts.append(f"and {' and '.join(recoding.ignored)} would be unlabelled")
    return (f"Warning: the truth may be coded otherwise than it was read: truth "
            f"{recoding.kind} {', '.join(parts)}. Read so, pixel accuracy would be "
            f"{recoding.recoded:.4f}, not {recoding.accuracy:.4f}: if that is the labels' "
            f"coding, rerun with {recoding.option}; if it is not, the model confuses these "
            "classes (the scores above are as the truth was read).")


def _run_schema(pred: Path) -> ClassSchema:
    """The classes of the run that wrote ``pred`` (its folder's run.json), else the default.

    A model trained on other classes is then scored on its own classes, not on soil, crop,
    weed and disease.
    """
    from agriseg.classes import DEFAULT_CLASSES, ClassSchema
    from agriseg.errors import AgrisegError

    manifest = Path(pred).parent / "run.json"
    try:
        data = json.loads(manifest.read_text())
        return ClassSchema.from_dict(data["schema"])
    except (OSError, ValueError, KeyError, TypeError, AgrisegError):
        pass
    own, is_mask = _described_schema(pred)
    if own is not None:
        click.echo(f"{pred}: no run.json of its run beside it; scoring it as the classes its "
                   f"band description names: {', '.join(own.names)}", err=True)
        return own
    if not is_mask:
        return DEFAULT_CLASSES  # no note: evaluating it fails and says why (the image?)
    click.echo(f"{pred}: no run.json of its run beside it; scoring it as the default "
               f"classes {', '.join(DEFAULT_CLASSES.names)} (a model of other classes: "
               "keep its classes.tif in its run folder)", err=True)
    return DEFAULT_CLASSES


def _described_schema(pred: Path) -> tuple[ClassSchema | None, bool]:
    """The classes ``pred``'s band description names (or None), and whether it is a class mask.

    See :meth:`~agriseg.classes.ClassSchema.description` and
    :func:`agriseg.metrics.check_class_raster` (one opening of the file for both).

    A classes.tif moved away from its run.json keeps that description (and its colour table)
    inside the file: a model of other classes was scored as soil, crop, weed and disease.
    """
    import rasterio

    from agriseg.classes import ClassSchema
    from agriseg.errors import InputError
    from agriseg.metrics import check_class_raster
    from agriseg.rasterfile import no_georef_warning

    try:
        # A PNG prediction (a run with --gsd) has no CRS; evaluate says what that means.
        with no_georef_warning(), rasterio.open(pred) as ds:
            try:
                check_class_raster(pred, ds, "prediction")
            except InputError:  # the image given instead: evaluating it says so
                return None, False
            text = ds.descriptions[0] or ""
            try:
                colours = ds.colormap(1)
            except ValueError:  # no colour table
                colours = {}
    except (OSError, rasterio.errors.RasterioError):
        return None, False
    return ClassSchema.from_description(text, colours), True
