"""A simple vegetation-index segmenter: soil vs crop with one survey-wide threshold.

The baseline the label-free segmenter improves on. ExG on chromatic coordinates for RGB,
NDVI when NIR is present; the threshold is Otsu's on an overview of the whole survey, so every
tile agrees. Weed and disease scores are zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from skimage.filters import threshold_otsu

from agriseg.classes import DEFAULT_CLASSES, ClassSchema
from agriseg.indices import exg, ndvi
from agriseg.models.base import PLANT_COVER, Prepared, TileContext

if TYPE_CHECKING:
    from agriseg.raster import SurveyRaster


@dataclass(frozen=True, slots=True)
class IndexParams:
    """Survey-wide threshold of the index."""

    index: str
    threshold: float
    softness: float


@dataclass
class IndexThresholdSegmenter:
    """Soil / crop from ExG or NDVI with a global Otsu threshold."""

    name: str = "index-threshold"
    schema: ClassSchema = DEFAULT_CLASSES
    roles: tuple[str, ...] = ("red", "green", "blue")

    def _index(self, pixels: np.ndarray) -> np.ndarray:
        if "nir" in self.roles:
            return ndvi(pixels[..., self.roles.index("nir"), :, :], pixels[..., 0, :, :])
        return exg(pixels[..., 0, :, :], pixels[..., 1, :, :], pixels[..., 2, :, :])

    def prepare(self, survey: SurveyRaster) -> Prepared:
        """Otsu threshold of the index on a survey overview."""
        from agriseg.raster import read_overview

        if survey.roles.has("nir", "red"):
            self.roles = ("red", "nir")
        survey.require(self.roles, self.name)
        data, valid, _ = read_overview(survey, self.roles, 1024)
        values = self._index(data)[valid]
        thr = float(threshold_otsu(values)) if values.size > 1 and np.ptp(values) > 0 else 0.0
        softness = float(max(np.std(values) / 4, 1e-3)) if values.size else 0.05
        index = "ndvi" if "nir" in self.roles else "exg"
        params = IndexParams(index, thr, softness)
        # Said in the log, run.json and the report: its weed and disease shares, zones and
        # probabilities are zero by construction, not findings.
        only = (f"{survey.path}: model {self.name!r} separates soil and crop only: weed and "
                "disease are never found (their shares, zones and probabilities are 0); run "
                "the default model (labelfree) for them")
        # "plant cover": the fields get no weed pressure, disease incidence or health score
        # (see agriseg.postprocess); a woodland parcel scored 100.
        return Prepared(params, halo=0, info={"index": index, "threshold": round(thr, 4),
                                              "measures": PLANT_COVER},
                        warnings=(only,))

    def predict(
        self,
        pixels: np.ndarray,
        valid: np.ndarray,
        params: Any,
        contexts: list[TileContext],
    ) -> np.ndarray:
        """Logistic score around the threshold: crop above, soil below."""
        idx = self._index(pixels)
        p_crop = 1.0 / (1.0 + np.exp(-(idx - params.threshold) / params.softness))
        n, _, h, w = pixels.shape
        out = np.zeros((n, len(self.schema), h, w), np.float32)
        out[:, 1] = p_crop
        out[:, 0] = 1.0 - p_crop
        return out

    def describe(self) -> dict[str, Any]:
        """Name and roles."""
        return {"name": self.name, "kind": "rule", "roles": list(self.roles)}
