"""The hand-written neighbourhood filters equal their scipy counterparts exactly."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from agriseg.models import filters
from agriseg.models.filters import box_sum, grow_within, max_filter, square_opening, transposed

SHAPES = st.tuples(st.integers(1, 40), st.integers(1, 40))


@settings(max_examples=60, deadline=None)
@given(shape=SHAPES, radius=st.integers(0, 9), seed=st.integers(0, 2**16))
def test_box_sum_and_max_filter_match_scipy(shape: tuple[int, int], radius: int,
                                            seed: int) -> None:
    rng = np.random.default_rng(seed)
    ints = rng.integers(-10000, 10000, shape).astype(np.int32)
    ones = np.ones(2 * radius + 1)
    want = ndimage.correlate1d(ndimage.correlate1d(ints, ones, axis=0, mode="constant"),
                               ones, axis=1, mode="constant")
    assert np.array_equal(box_sum(ints, radius), want)
    floats = rng.random(shape, dtype=np.float32)
    assert np.array_equal(max_filter(floats, radius),
                          ndimage.maximum_filter(floats, size=2 * radius + 1, mode="nearest"))


@settings(max_examples=60, deadline=None)
@given(shape=SHAPES, steps=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_grow_within_matches_binary_dilation(shape: tuple[int, int], steps: int,
                                             seed: int) -> None:
    rng = np.random.default_rng(seed)
    mask = rng.random(shape) < 0.6
    seed_px = mask & (rng.random(shape) < 0.1)
    want = ndimage.binary_dilation(seed_px, iterations=steps, mask=mask)
    assert np.array_equal(grow_within(seed_px, mask, steps), want)


@settings(max_examples=80, deadline=None)
@given(shape=SHAPES, n=st.integers(1, 7), density=st.floats(0.1, 0.95),
       seed=st.integers(0, 2**16))
def test_square_opening_matches_scipy(shape: tuple[int, int], n: int, density: float,
                                      seed: int) -> None:
    mask = np.random.default_rng(seed).random((2, *shape)) < density  # a leading batch axis
    want = ndimage.binary_opening(mask, structure=np.ones((1, n, n), bool))
    got = square_opening(mask, n)
    assert np.array_equal(np.zeros_like(mask) if got is None else got, want)


@settings(max_examples=60, deadline=None)
@given(shape=st.tuples(st.integers(1, 300), st.integers(1, 300)), block=st.integers(1, 64),
       dtype=st.sampled_from(["uint8", "uint16", "float32", "float64"]))
def test_transposed_is_the_contiguous_transpose(shape: tuple[int, int], block: int,
                                               dtype: str) -> None:
    a = (np.arange(shape[0] * shape[1]) % 251).astype(dtype).reshape(shape)
    old = filters.TRANSPOSE_BLOCK
    filters.TRANSPOSE_BLOCK = block  # blocks that do not divide the shape, and one-pixel ones
    try:
        t = transposed(a)
    finally:
        filters.TRANSPOSE_BLOCK = old
    assert t.flags.c_contiguous and t.dtype == a.dtype
    assert np.array_equal(t, a.T)
