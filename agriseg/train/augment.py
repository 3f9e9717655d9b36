"""Patch augmentations: flips, 90-degree rotations, brightness and contrast.

Aerial images have no "up", so flips and rotations are label-preserving; brightness and
contrast changes imitate exposure and illumination differences between flights. Scale changes
happen when the patch is cropped (see :class:`agriseg.train.data.PatchSampler`).
"""

from __future__ import annotations

import numpy as np

from agriseg.train.config import AugmentSection


def augment_patch(
    img: np.ndarray, lab: np.ndarray, cfg: AugmentSection, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Augment one ``(C, P, P)`` patch and its ``(P, P)`` labels consistently."""
    if cfg.flips:
        if rng.random() < 0.5:
            img, lab = img[:, :, ::-1], lab[:, ::-1]
        if rng.random() < 0.5:
            img, lab = img[:, ::-1, :], lab[::-1, :]
    if cfg.rot90 and img.shape[1] == img.shape[2]:
        k = int(rng.integers(4))
        if k:
            img, lab = np.rot90(img, k, axes=(1, 2)), np.rot90(lab, k)
    img = np.ascontiguousarray(img, dtype=np.float32)
    if cfg.contrast:
        f = 1.0 + rng.uniform(-cfg.contrast, cfg.contrast)
        mean = img.mean(axis=(1, 2), keepdims=True)
        img = (img - mean) * np.float32(f) + mean
    if cfg.brightness:
        img = img + np.float32(rng.uniform(-cfg.brightness, cfg.brightness))
    return np.clip(img, 0.0, 1.5, out=img), np.ascontiguousarray(lab)
