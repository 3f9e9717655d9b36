"""Per-survey crop vs weed appearance learned from row-geometry pseudo-labels.

The second stage of Bah et al. (2018): the crop-row rule labels vegetation on the rows crop and
isolated vegetation between them weed, but it cannot see a weed that grows in or against a row.
Those pseudo-labels are good enough to learn what this survey's crop and weeds *look* like, and
appearance then finds weeds where geometry cannot.

The classifier is a likelihood-ratio lookup table on quantised per-pixel colour: the first two
chromatic coordinates (band / sum of every band given, so a band that is not an axis still
shapes them: blue in multispectral surveys) and, optionally, the brightness (sum of bands; one
cell by default, since the shaded side of a crop row is as dark as a dark weed). Two smoothed
histograms (confident row vegetation, isolated inter-row vegetation) are fitted on half of the
sample pixels, and the other half sets and checks the operating point:

* the ratio threshold is the one that relabels at most ``max_loss`` of the held-out row
  vegetation (so however the pseudo-labels look, the rows cannot turn to weed en masse), and
  never below ``min_ratio`` (a cell must be clearly more typical of weed than of crop);
* the table is used only if that threshold catches at least ``min_recall`` of the held-out
  inter-row vegetation. When crop and weeds share one colour (a volunteer crop, a weed species
  like the crop) recall stays near ``max_loss`` and the pure row rule is kept.

Applying the table to a tile is three multiply-adds, a clip and one gather per pixel. Only
correctly rounded operations are used (no logarithms), so a pixel's cell does not depend on the
tile it is in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

#: Block side (pixels, absolute raster coordinates) of the train / held-out checkerboard:
#: neighbouring pixels of one plant are alike, so a per-pixel split would leak.
SPLIT_BLOCK_PX = 64


@dataclass(frozen=True, slots=True, eq=False)
class AppearanceTable:
    """Weed-likeness per colour cell (small and picklable).

    Attributes:
        lo: lower edge of each feature's range.
        scale: cells per feature unit.
        bins: cells per feature.
        table: uint8 ``prod(bins)``, the weed-likeness of each cell in 0..255 (128 at the
            ratio threshold); integers, so that neighbourhood means of it are exact sums.
    """

    lo: tuple[float, float, float]
    scale: tuple[float, float, float]
    bins: tuple[int, int, int]
    table: np.ndarray


def features(pixels: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Chromatic coordinates of the first two bands and the brightness, ``(..., H, W)`` each.

    Args:
        pixels: float32 ``(..., C, H, W)`` with at least 2 bands.
        eps: added to the band sum so that near-black pixels have damped chroma.
    """
    s = pixels.sum(axis=-3, dtype=np.float32)
    d = s + np.float32(eps)
    return pixels[..., 0, :, :] / d, pixels[..., 1, :, :] / d, s


def cells(feats: tuple[np.ndarray, ...], tab: AppearanceTable) -> np.ndarray:
    """Flat cell index of every pixel (int32)."""
    idx: np.ndarray | None = None
    for f, lo, sc, n in zip(feats, tab.lo, tab.scale, tab.bins, strict=True):
        if n == 1:
            continue
        q = np.subtract(f, np.float32(lo))
        q *= np.float32(sc)
        np.clip(q, 0, n - 1, out=q)
        qi = q.astype(np.int32)
        if idx is None:
            idx = qi
        else:
            idx *= np.int32(n)
            idx += qi
    return np.zeros(feats[0].shape, np.int32) if idx is None else idx


def weed_likeness(pixels: np.ndarray, eps: float, tab: AppearanceTable) -> np.ndarray:
    """Weed-likeness (uint8, 0..255) of every pixel of ``(C, H, W)`` pixels."""
    return np.take(tab.table, cells(features(pixels, eps), tab))


def fit(
    crop: tuple[np.ndarray, ...],
    weed: tuple[np.ndarray, ...],
    crop_test: np.ndarray,
    weed_test: np.ndarray,
    *,
    bins: tuple[int, int, int],
    max_loss: float,
    min_ratio: float,
    min_recall: float,
    min_pixels: int,
) -> tuple[AppearanceTable | None, dict[str, Any]]:
    """Fit the table on pseudo-labelled pixels and decide whether it separates them.

    Args:
        crop: the three features of confident row vegetation (1D arrays).
        weed: the three features of isolated inter-row vegetation.
        crop_test: bool, which of ``crop`` are held out (not fitted, used to check).
        weed_test: bool, the same for ``weed``.
        bins: cells per feature.
        max_loss: largest share of held-out row vegetation the table may relabel.
        min_ratio: smallest weed / crop likelihood ratio that relabels a cell.
        min_recall: smallest share of held-out inter-row vegetation that must be caught.
        min_pixels: fewest pixels of each class in each half.

    Returns:
        The table (``None`` when not separable) and the figures behind the decision.
    """
    n_c, n_w = int(crop[0].size), int(weed[0].size)
    info: dict[str, Any] = {"crop_pixels": n_c, "weed_pixels": n_w}
    halves = (int((~crop_test).sum()), int(crop_test.sum()),
              int((~weed_test).sum()), int(weed_test.sum()))
    if min(halves) < min_pixels:
        info.update(used=False, reason=f"too few pseudo-labelled pixels (< {min_pixels} of a "
                                       "class in a half)")
        return None, info
    both = [np.concatenate([c, w]) for c, w in zip(crop, weed, strict=True)]
    lo, scale = [], []
    for f, n in zip(both, bins, strict=True):
        a, b = np.percentile(f, [0.5, 99.5])
        b = max(float(b), float(a) + 1e-6)
        lo.append(float(a))
        scale.append(n / (b - float(a)))
    proto = AppearanceTable(tuple(lo), tuple(scale), bins, np.zeros(0, np.uint8))  # type: ignore[arg-type]
    c_idx, w_idx = cells(crop, proto), cells(weed, proto)
    size = int(np.prod(bins))

    def density(idx: np.ndarray) -> np.ndarray:
        h = np.bincount(idx, minlength=size).astype(np.float64).reshape(bins)
        # One cell of blur, plus half a pixel everywhere, so that empty cells are not
        # infinitely weed- or crop-like.
        h = ndimage.gaussian_filter(h, 1.0, mode="nearest") + 0.5
        return (h / h.sum()).ravel()

    ratio = density(w_idx[~weed_test]) / density(c_idx[~crop_test])
    r_crop, r_weed = ratio[c_idx[crop_test]], ratio[w_idx[weed_test]]
    thr = max(float(np.quantile(r_crop, 1 - max_loss)), min_ratio)
    # The quantile can sit on a tie: count what the rule (ratio > thr) really relabels.
    loss = float((r_crop > thr).mean())
    recall = float((r_weed > thr).mean())
    info.update(ratio_threshold=round(thr, 3), heldout_row_relabelled=round(loss, 4),
                heldout_interrow_recall=round(recall, 4))
    if recall < min_recall:
        info.update(used=False, reason=f"crop and weed pseudo-labels not separable by colour "
                                       f"(held-out recall {recall:.3f} < {min_recall})")
        return None, info
    # Weed-likeness 0.5 at the threshold, 0 at half and 1 at twice the ratio; a linear ramp
    # in log ratio, computed once here, so tiles only look it up.
    z = np.log2(np.maximum(ratio, 1e-12) / thr)
    table = np.rint(np.clip(0.5 + 0.5 * z, 0.0, 1.0) * 255).astype(np.uint8)
    info.update(used=True, reason="separable",
                table_weed_cells=int((table > 128).sum()), table_cells=size)
    return AppearanceTable(proto.lo, proto.scale, bins, table), info


def heldout(row_off: int, col_off: int, shape: tuple[int, int]) -> np.ndarray:
    """Checkerboard of ``SPLIT_BLOCK_PX`` blocks in absolute coordinates: True = held out."""
    r = (np.arange(row_off, row_off + shape[0]) // SPLIT_BLOCK_PX)[:, None]
    c = (np.arange(col_off, col_off + shape[1]) // SPLIT_BLOCK_PX)[None, :]
    return ((r + c) % 2).astype(bool)
