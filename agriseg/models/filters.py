"""Small exact neighbourhood filters for the label-free model's per-tile work.

Written by hand because the scipy.ndimage equivalents are several times slower at the small
radii used here (a 1536 px tile: ``correlate1d`` box sums 73 ms, ``maximum_filter`` 69 ms,
``binary_dilation`` with a mask 77 ms), while sums and maxima of a few shifted slices are
memory-bound numpy passes. Each function equals its scipy counterpart exactly (tested), so
tiled runs still match whole-raster runs bit for bit.
"""

from __future__ import annotations

import numpy as np

#: Side of the blocks :func:`transposed` copies one at a time.
TRANSPOSE_BLOCK = 128


def transposed(a: np.ndarray) -> np.ndarray:
    """``a.T`` of a 2D array as a C-contiguous copy (``np.ascontiguousarray(a.T)``).

    By blocks: numpy copies a transposed view element by element down whole columns, which
    misses the cache on every read of a large array. A 2518 px tile's float32 plane took
    34 ms that way and 9 ms in 128 px blocks, its uint16 plane 31 and 6 ms.
    """
    h, w = a.shape
    out = np.empty((w, h), a.dtype)
    b = TRANSPOSE_BLOCK
    for i in range(0, h, b):
        for j in range(0, w, b):
            out[j:j + b, i:i + b] = a[i:i + b, j:j + b].T
    return out


def box_sum(a: np.ndarray, radius: int) -> np.ndarray:
    """Sum over the ``(2r+1)^2`` window around each pixel, zeros outside the array.

    Equals ``correlate1d`` with unit weights along both axes in ``mode="constant"`` for
    integer input (exact; keep the dtype wide enough for the sums).
    """
    h, w = a.shape
    r = radius
    pad = np.zeros((h + 2 * r, w + 2 * r), a.dtype)
    pad[r:r + h, r:r + w] = a
    rows = pad[0:h].copy()
    for k in range(1, 2 * r + 1):
        rows += pad[k:k + h]
    out = rows[:, 0:w].copy()
    for k in range(1, 2 * r + 1):
        out += rows[:, k:k + w]
    return out


def max_filter(a: np.ndarray, radius: int) -> np.ndarray:
    """Maximum over the ``(2r+1)^2`` window, edges repeated (``maximum_filter``, "nearest").

    Per axis, maxima over windows of 1, 2, 4, ... pixels, each from two of the previous
    (maximum is idempotent, so two overlapping power-of-two windows cover any length):
    ``log2(2r+1) + 1`` passes instead of ``2r``.
    """
    pad = np.pad(a, radius, mode="edge")
    return _max_along(_max_along(pad, 2 * radius + 1, 0), 2 * radius + 1, 1)


def or_filter(a: np.ndarray, radius: int) -> np.ndarray:
    """Bitwise OR over the ``(2r+1)^2`` window of an integer array, edges repeated.

    Several binary masks packed as bits of one byte dilate in one pass (like
    :func:`max_filter`: OR is idempotent too).
    """
    pad = np.pad(a, radius, mode="edge")
    n = 2 * radius + 1
    return _max_along(_max_along(pad, n, 0, np.bitwise_or), n, 1, np.bitwise_or)


def _max_along(a: np.ndarray, length: int, axis: int, op: np.ufunc = np.maximum) -> np.ndarray:
    """Maxima (or idempotent ``op``) of ``length`` consecutive pixels along ``axis`` (valid)."""
    n = a.shape[axis] - length + 1
    cur, width = a, 1
    while 2 * width <= length:
        m = cur.shape[axis] - width
        cur = op(_along(cur, 0, m, axis), _along(cur, width, m, axis))
        width *= 2
    if width == length:
        return _along(cur, 0, n, axis) if cur is not a else _along(cur, 0, n, axis).copy()
    return op(_along(cur, 0, n, axis), _along(cur, length - width, n, axis))


def _along(a: np.ndarray, start: int, size: int, axis: int) -> np.ndarray:
    return a[start:start + size] if axis == 0 else a[:, start:start + size]


def grow_within(seed: np.ndarray, mask: np.ndarray, steps: int) -> np.ndarray:
    """``seed`` grown ``steps`` 4-connected steps through ``mask`` (outside the array: False).

    Equals ``binary_dilation(seed, iterations=steps, mask=mask)`` for ``seed`` inside ``mask``.
    """
    x = seed & mask
    for _ in range(steps):
        d = x.copy()
        d[1:] |= x[:-1]
        d[:-1] |= x[1:]
        d[:, 1:] |= x[:, :-1]
        d[:, :-1] |= x[:, 1:]
        d &= mask
        if np.array_equal(d, x):
            break
        x = d
    return x


def square_opening(a: np.ndarray, n: int) -> np.ndarray | None:
    """Binary opening of ``a`` (``(..., H, W)``) by an ``n x n`` square, or None if empty.

    Equals ``scipy.ndimage.binary_opening`` with that square (outside the array is
    background). Separable runs of ``n`` along each axis, so a mask whose areas are all
    narrower than ``n`` costs eight ANDs: on a synthetic field's 2460 px tile with scattered
    bright pixels 135 ms for scipy's opening against ~10 ms here.
    """
    h, w = a.shape[-2:]
    if h < n or w < n:
        return None
    rows = a[..., :, : w - n + 1].copy()
    for k in range(1, n):
        rows &= a[..., :, k : k + w - n + 1]
    core = rows[..., : h - n + 1, :].copy()
    for k in range(1, n):
        core &= rows[..., k : k + h - n + 1, :]
    if not core.any():
        return None
    spread = np.zeros((*core.shape[:-1], w), bool)
    for k in range(n):
        spread[..., :, k : k + w - n + 1] |= core
    out = np.zeros(a.shape, bool)
    for k in range(n):
        out[..., k : k + h - n + 1, :] |= spread
    return out
