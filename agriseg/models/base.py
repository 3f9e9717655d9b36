"""The one model interface the pipeline knows.

Every segmenter, rule-based or neural, is a :class:`Segmenter`: it names the band roles it
reads (in channel order), may compute survey-wide parameters once in :meth:`prepare` (on an
overview or samples, so every tile uses the same thresholds), and turns a batch of scaled
float tiles into per-class scores. The pipeline never branches on the model kind.

Segmenters travel to Dask workers by pickle, so they must be cheap to pickle: neural models
hold a bundle path and load weights lazily, once per worker process.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from agriseg.classes import ClassSchema

if TYPE_CHECKING:
    from agriseg.raster import SurveyRaster


@dataclass(frozen=True, slots=True)
class TileContext:
    """Where a padded tile array sits in the raster.

    Attributes:
        row_off: raster row of the padded array's first row (negative inside edge padding).
        col_off: raster column of the padded array's first column.
        gsd_m: ground sampling distance in metres.
        margin: pixels on each side of the padded array that the caller discards (the halo).
            A model may leave its scores there at zero and skip the work; 0 means every
            pixel is used.
        raster_shape: ``(height, width)`` of the raster, when known. Pixels of the array
            outside it are edge padding (the raster reflected), which a model that follows
            lines across the image should not take for more field.
    """

    row_off: int
    col_off: int
    gsd_m: float
    margin: int = 0
    raster_shape: tuple[int, int] | None = None

    def inside(self, shape: tuple[int, int]) -> np.ndarray | None:
        """Bool ``shape`` array, True on raster pixels (None without ``raster_shape``)."""
        if self.raster_shape is None:
            return None
        rows = np.arange(self.row_off, self.row_off + shape[0])
        cols = np.arange(self.col_off, self.col_off + shape[1])
        return (((rows >= 0) & (rows < self.raster_shape[0]))[:, None]
                & ((cols >= 0) & (cols < self.raster_shape[1]))[None, :])


@dataclass(frozen=True, slots=True)
class Prepared:
    """Survey-wide parameters from :meth:`Segmenter.prepare`.

    Attributes:
        params: small picklable value handed to every :meth:`Segmenter.predict` call.
        halo: receptive margin in pixels the model needs at this survey's GSD.
        info: JSON-friendly facts for run.json and the log (thresholds, row angle, ...).
        warnings: what could not be done (e.g. rows not resolvable at this GSD).
        tile_multiple: core tile edges the model splits evenly (its block interior), used
            to round the default tile size; 1 when any size suits it.
    """

    params: Any
    halo: int
    info: dict[str, Any] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    tile_multiple: int = 1


#: What ``Prepared.info["measures"]`` says of a model whose classes mean plant cover only.
PLANT_COVER = "plant cover"


def blind_roles(info: Mapping[str, Any]) -> tuple[frozenset[str], bool]:
    """The class roles a prepared model could not find on its survey, from ``Prepared.info``.

    Without crop rows (``info["rows"]["detected"]`` false) weeds are not told from crop; on
    pixels too coarse for rows, or with a model that says its classes mean plant cover
    (``info["measures"]``), neither weed nor disease is. Field summaries and prescriptions
    leave such measures empty or say so: an all-zero weed share read as "no weeds".

    Returns:
        The roles, and whether the classes mean plant cover only.
    """
    rows = info.get("rows")
    no_rows = isinstance(rows, dict) and rows.get("detected") is False
    cover = info.get("measures") == PLANT_COVER or (
        isinstance(rows, dict) and no_rows and rows.get("reason") == "GSD too coarse")
    return frozenset({"weed", "disease"} if cover else {"weed"} if no_rows else ()), cover


@runtime_checkable
class Segmenter(Protocol):
    """A semantic segmentation model as the pipeline sees it."""

    @property
    def name(self) -> str:
        """Short name for logs and run.json."""
        ...

    @property
    def schema(self) -> ClassSchema:
        """Classes the scores refer to, in channel order."""
        ...

    @property
    def roles(self) -> tuple[str, ...]:
        """Band roles read, in channel order (may be settled by :meth:`prepare`)."""
        ...

    def prepare(self, survey: SurveyRaster) -> Prepared:
        """Compute survey-wide parameters once, before any tile runs."""
        ...

    def predict(
        self,
        pixels: np.ndarray,
        valid: np.ndarray,
        params: Any,
        contexts: list[TileContext],
    ) -> np.ndarray:
        """Score a batch.

        Args:
            pixels: float32 ``(N, C, H, W)`` scaled to 0..1, channels in ``roles`` order.
            valid: bool ``(N, H, W)``, False where the input is nodata.
            params: ``Prepared.params`` from :meth:`prepare`.
            contexts: where each tile sits in the raster.

        Returns:
            float32 ``(N, K, H, W)`` class probabilities (summing to 1 over K).
        """
        ...

    def describe(self) -> dict[str, Any]:
        """JSON-friendly description for run.json."""
        ...


# Optional, beside the protocol: a segmenter may also offer
#     predict_classes(pixels, valid, params, contexts, scale=None) -> (classes, confidence) | None
# with uint8 ``(N, H, W)`` class ids and confidence percent (what the pipeline would derive
# from ``predict``'s probabilities), or None when it cannot. One whose ``takes_raw_bands`` is
# True also takes ``scale``: ``pixels`` are then 8-bit band values (0 where invalid) and
# ``pixels * scale`` the float32 ones. Learned models on a GPU use it to
# reduce the scores on the device and copy back 2 bytes per pixel instead of 4 x K; the
# label-free model to skip building the float planes. On the CPU both reduce as below.
# And
#     with_halo(halo) -> Segmenter
# when the run's ``--halo`` is the context the model itself must use (learned models feed
# each block that much context; segmenters without it read their context from
# ``TileContext.margin``).


def reduce_scores(scores: Sequence[np.ndarray] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Class ids (uint8) and confidence percent (uint8, 0..100) of ``K`` score planes.

    Ties go to the lowest class id, as with ``argmax``.
    """
    # A running maximum over the few class planes: np.argmax along a strided first axis
    # costs ~4x more. Where plane k beats every earlier one, k is also the largest id so far,
    # so a maximum with k * better sets it without a masked store (a 1536 px label-free tile:
    # 8.0 vs 11.0 ms; 7.6 vs 15.3 ms where classes alternate more).
    best = np.array(scores[0], np.float32)
    classes = np.zeros(best.shape, np.uint8)
    for k in range(1, len(scores)):
        better = np.greater(scores[k], best)
        np.maximum(classes, better.view(np.uint8) * np.uint8(k), out=classes)
        np.maximum(best, scores[k], out=best)
    best *= 100
    return classes, np.rint(best, out=best).astype(np.uint8)
