"""Pseudo-labels for self-training: a segmenter's confident pixels become labels.

The survey is run through the normal pipeline (:func:`agriseg.survey.process_survey`) with the
label-free (or any) segmenter; pixels whose confidence is below the threshold become 255 and
are ignored by the loss, so the learned model only imitates what the teacher is sure about and
fills the rest from context.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
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


def teacher_stamp(image: Path, teacher: str, bands: str | None,
                  gsd: float | None) -> dict[str, object]:
    """What decides a teacher's run of ``image``: its cached outputs are reused only when equal.

    The teacher is named and, when it is a bundle, identified by the SHA-256 of its files
    (:func:`agriseg.models.bundle.bundle_digest`: every byte, hashed once per size and mtime;
    bundles are megabytes, so hashing them costs milliseconds); a registered model by its name
    and the agriseg version that implements it. The image is identified by path, size and
    mtime (hashing a survey of gigabytes would cost more than the teacher's run). The
    confidence threshold is not in it: it is applied to the cached confidence raster on
    every read.

    Args:
        image: survey raster.
        teacher: registered model name or bundle path (as :func:`_teacher` resolved it).
        bands: band roles given for the image (None: detected).
        gsd: pixel size of an image without a CRS.

    Returns:
        A JSON-friendly mapping.
    """
    from agriseg import __version__
    from agriseg.models.registry import available_models

    img = Path(image).resolve()
    size: int | None
    mtime: int | None
    try:
        st = img.stat()
        size, mtime = st.st_size, st.st_mtime_ns
    except OSError:  # the teacher's run then says what is wrong with the path
        size = mtime = None
    if teacher in available_models():
        model: dict[str, object] = {"name": teacher, "agriseg": __version__}
    else:
        from agriseg.models.bundle import bundle_digest

        model = {"bundle": str(Path(teacher).resolve()), "sha256": bundle_digest(teacher)}
    return {"image": str(img), "image_size": size, "image_mtime_ns": mtime,
            "model": model, "bands": bands, "gsd": gsd}


def stamp_matches(stamp_file: Path, stamp: Mapping[str, object]) -> bool:
    """Whether ``stamp_file`` holds ``stamp`` (as JSON): a cached output of the same inputs.

    A missing or damaged file matches nothing.
    """
    try:
        return bool(json.loads(stamp_file.read_text()) == json.loads(json.dumps(stamp)))
    except (OSError, ValueError):
        return False


def pseudo_labels(
    image: Path,
    work: Path,
    model: str = "labelfree",
    min_confidence: float = 0.8,
    bands: str | None = None,
    scheduler: str | None = None,
    gsd: float | None = None,
    reuse: bool = True,
) -> tuple[np.ndarray, dict[str, object]]:
    """Label ``image`` with ``model``'s confident pixels.

    Args:
        image: survey raster.
        work: folder for the teacher's run (reused when its :func:`teacher_stamp` matches,
            so resumes are cheap).
        model: teacher model name or bundle.
        min_confidence: 0..1; pixels below get 255 (ignored).
        bands: band roles of the image, when not detected.
        scheduler: Dask scheduler address (default: a local cluster).
        gsd: pixel size in metres of an image without a CRS (``agriseg run --gsd``).
        reuse: False runs the teacher again even when a matching run is cached
            (``agriseg train --overwrite``).

    Returns:
        ``(labels uint8 on the image grid, summary)``.
    """
    from agriseg.config import build_run_config
    from agriseg.survey import process_survey
    from agriseg.train.loop import tidy_path

    shown = tidy_path(image)  # for the log lines; the stamp keeps the path as given
    teacher = _teacher(model)
    out = work / Path(image).stem
    stamp = teacher_stamp(image, teacher, bands, gsd)
    stamp_file = out / "teacher.json"
    cached = reuse and (out / "run.json").exists() and stamp_matches(stamp_file, stamp)
    if not cached:
        # Removed first: a run interrupted halfway must not leave a stamp that matches it.
        stamp_file.unlink(missing_ok=True)
        log.info("pseudo-labels for %s: running the teacher %s ...", shown, teacher)
        cfg = build_run_config(
            input=image, out=out, model=teacher, bands=bands, indices=False, overwrite=True,
            scheduler=scheduler, gsd=gsd,
        )
        process_survey(cfg)
        stamp_file.write_text(json.dumps(stamp))
    else:
        log.info("pseudo-labels for %s: reusing the teacher's run in %s", shown,
                 tidy_path(out))
    with rasterio.open(out / "classes.tif") as c, rasterio.open(out / "confidence.tif") as f:
        classes = c.read(1)
        conf = f.read(1)
    labels = classes.copy()
    labels[(conf == 255) | (conf < round(min_confidence * 100))] = IGNORE
    kept = int((labels != IGNORE).sum())
    total = int((classes != IGNORE).sum())
    summary = {"teacher": teacher, "min_confidence": min_confidence,
               "labelled_share": round(kept / max(total, 1), 4)}
    log.info("pseudo-labels for %s from %s: %.0f %% of valid pixels confident", shown, teacher,
             100 * kept / max(total, 1))
    return labels, summary
