"""Pseudo-labels for self-training: a segmenter's confident pixels become labels.

The survey is run through the normal pipeline (:func:`agriseg.survey.process_survey`) with the
label-free (or any) segmenter; pixels whose confidence is below the threshold become 255 and
are ignored by the loss, so the learned model only imitates what the teacher is sure about and
fills the rest from context.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import rasterio

from agriseg.errors import ModelError
from agriseg.train.data import IGNORE

log = logging.getLogger(__name__)

FALLBACK_TEACHER = "index-threshold"


def _teacher(model: str) -> str:
    """``model`` if it resolves, else the index-threshold segmenter (with a warning)."""
    from agriseg.models.registry import available_models

    if model in available_models() or Path(model).exists():
        return model
    if model == "labelfree":
        log.warning("label-free segmenter not available in this build; pseudo-labels come from "
                    "%s instead", FALLBACK_TEACHER)
        return FALLBACK_TEACHER
    raise ModelError(
        f"pseudo-label model {model!r} is not a registered name or bundle path; valid names: "
        f"{', '.join(available_models())}"
    )


def pseudo_labels(
    image: Path,
    work: Path,
    model: str = "labelfree",
    min_confidence: float = 0.8,
    bands: str | None = None,
    scheduler: str | None = None,
    gsd: float | None = None,
) -> tuple[np.ndarray, dict[str, object]]:
    """Label ``image`` with ``model``'s confident pixels.

    Args:
        image: survey raster.
        work: folder for the teacher's run (reused when it matches, so resumes are cheap).
        model: teacher model name or bundle.
        min_confidence: 0..1; pixels below get 255 (ignored).
        bands: band roles of the image, when not detected.
        scheduler: Dask scheduler address (default: a local cluster).
        gsd: pixel size in metres of an image without a CRS (``agriseg run --gsd``).

    Returns:
        ``(labels uint8 on the image grid, summary)``.
    """
    from agriseg.config import build_run_config
    from agriseg.survey import process_survey

    teacher = _teacher(model)
    out = work / Path(image).stem
    stamp = {"image": str(Path(image).resolve()), "model": teacher, "gsd": gsd}
    done = out / "run.json"
    reuse = False
    if done.exists() and (out / "teacher.json").exists():
        reuse = json.loads((out / "teacher.json").read_text()) == stamp
    if not reuse:
        cfg = build_run_config(
            input=image, out=out, model=teacher, bands=bands, indices=False, overwrite=True,
            scheduler=scheduler, gsd=gsd,
        )
        process_survey(cfg)
        (out / "teacher.json").write_text(json.dumps(stamp))
    with rasterio.open(out / "classes.tif") as c, rasterio.open(out / "confidence.tif") as f:
        classes = c.read(1)
        conf = f.read(1)
    labels = classes.copy()
    labels[(conf == 255) | (conf < round(min_confidence * 100))] = IGNORE
    kept = int((labels != IGNORE).sum())
    total = int((classes != IGNORE).sum())
    summary = {"teacher": teacher, "min_confidence": min_confidence,
               "labelled_share": round(kept / max(total, 1), 4)}
    log.info("pseudo-labels for %s from %s: %.0f %% of valid pixels confident", image, teacher,
             100 * kept / max(total, 1))
    return labels, summary
