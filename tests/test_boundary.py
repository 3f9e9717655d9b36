"""The crop / weed border competition: what it moves, what it leaves, and tiling exactness."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from agriseg.classes import CROP, SOIL, WEED
from agriseg.models.boundary import BoundaryParams, fragments, settle
from agriseg.models.filters import or_filter

PARAMS = BoundaryParams(band_px=2, cell_px=4, margin=0.1, offset=0.6)
CROP_RGB = (0.30, 0.55, 0.20)
WEED_RGB = (0.45, 0.60, 0.15)  # yellow-green, like a pigweed beside the crop


def _scene(weed_rgb: tuple[float, float, float], shift: int) -> tuple[np.ndarray, np.ndarray,
                                                                       np.ndarray]:
    """A crop row (columns < 30) touching a weed (30..49) on soil; the class map puts the
    border ``shift`` px into the weed, as the row geometry does."""
    rng = np.random.default_rng(0)
    truth = np.full((60, 80), SOIL, np.uint8)
    truth[:, :30] = CROP
    truth[10:50, 30:50] = WEED
    colours = {SOIL: (0.40, 0.33, 0.25), CROP: CROP_RGB, WEED: weed_rgb}
    pixels = np.zeros((3, *truth.shape), np.float32)
    for k, rgb in colours.items():
        pixels[:, truth == k] = np.asarray(rgb, np.float32)[:, None]
    pixels += rng.normal(0, 0.01, pixels.shape).astype(np.float32)
    classes = truth.copy()
    classes[10:50, 30:30 + shift] = CROP
    return truth, classes, pixels


def _apply(classes: np.ndarray, pixels: np.ndarray,
           origin: tuple[int, int] = (0, 0)) -> np.ndarray:
    to_weed, to_crop = settle(classes, pixels, PARAMS, origin)
    out = classes.copy()
    out.flat[to_weed] = WEED
    out.flat[to_crop] = CROP
    return out


def test_a_misplaced_border_moves_to_the_colour_edge() -> None:
    truth, classes, pixels = _scene(WEED_RGB, shift=2)
    out = _apply(classes, pixels)
    assert (classes != truth).sum() == 80
    assert np.array_equal(out, truth)


def test_a_crop_coloured_weed_stays_where_the_geometry_put_it() -> None:
    _, classes, pixels = _scene(CROP_RGB, shift=2)
    assert np.array_equal(_apply(classes, pixels), classes)


def test_nothing_to_compete_without_both_classes() -> None:
    truth, _, pixels = _scene(WEED_RGB, shift=0)
    only_crop = np.where(truth == WEED, SOIL, truth).astype(np.uint8)
    to_weed, to_crop = settle(only_crop, pixels, PARAMS)
    assert to_weed.size == 0 and to_crop.size == 0


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), r0=st.integers(0, 40), c0=st.integers(0, 40))
def test_windows_match_the_whole_array(seed: int, r0: int, c0: int) -> None:
    """A window with the competition's reach around its core moves exactly what the whole
    array moves there (tiles stay bit-identical): the cells and samples sit on the raster's
    grid wherever the window starts."""
    rng = np.random.default_rng(seed)
    blobs = ndimage.uniform_filter(rng.random((300, 200)), 9)
    classes = np.digitize(blobs, np.quantile(blobs, [0.3, 0.65, 0.97])).astype(np.uint8)
    pixels = rng.random((3, 300, 200), dtype=np.float32) * 0.2
    pixels[1] += np.where(classes == WEED, 0.5, 0.4).astype(np.float32)
    whole = _apply(classes, pixels)
    reach, side = PARAMS.reach, 150
    win = (slice(r0, r0 + side + 2 * reach), slice(c0, c0 + side + 2 * reach))
    part = _apply(classes[win], pixels[(slice(None), *win)], (r0, c0))
    core = (slice(reach, -reach), slice(reach, -reach))
    assert np.array_equal(part[core], whole[win][core])
    assert (whole != classes).any()


@settings(max_examples=40, deadline=None)
@given(shape=st.tuples(st.integers(1, 30), st.integers(1, 30)), radius=st.integers(0, 5),
       seed=st.integers(0, 2**16))
def test_or_filter_dilates_every_bit(shape: tuple[int, int], radius: int, seed: int) -> None:
    bits = np.random.default_rng(seed).integers(0, 4, shape).astype(np.uint8)
    got = or_filter(bits, radius)
    for bit in (1, 2):
        want = ndimage.maximum_filter(bits & bit, size=2 * radius + 1, mode="nearest")
        assert np.array_equal(got & bit, want)


def test_small_weed_fragments_stuck_to_crop_become_crop() -> None:
    classes = np.full((30, 40), SOIL, np.uint8)
    classes[:, :10] = CROP
    classes[5:7, 10] = WEED  # 2 px against the row: a cut-off leaf tip
    classes[12:14, 20:22] = WEED  # 4 px on soil: a seedling, stays
    classes[20:26, 10:16] = WEED  # 36 px against the row: a weed, stays
    got = np.sort(fragments(classes, WEED, CROP, 4, 0.0))
    assert np.array_equal(got, np.sort(np.ravel_multi_index(([5, 6], [10, 10]), classes.shape)))
    assert fragments(np.full((5, 5), CROP, np.uint8), WEED, CROP, 4, 0.0).size == 0


def test_small_crop_pieces_inside_a_weed_become_weed() -> None:
    classes = np.full((30, 40), SOIL, np.uint8)
    classes[5:15, 5:15] = WEED
    classes[8:10, 8:11] = CROP  # 6 px inside the weed patch: part of the weed plant
    classes[20:22, 20:23] = CROP  # a 6 px seedling on soil, touching a weed on one side
    classes[20:22, 23] = WEED
    inside = np.zeros(classes.shape, bool)
    inside[8:10, 8:11] = True
    assert np.array_equal(np.sort(fragments(classes, CROP, WEED, 16, 0.5)),
                          np.flatnonzero(inside))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), r0=st.integers(0, 30), c0=st.integers(0, 30),
       crop_pieces=st.booleans())
def test_fragment_windows_match_the_whole_array(seed: int, r0: int, c0: int,
                                                crop_pieces: bool) -> None:
    rng = np.random.default_rng(seed)
    classes = rng.choice(np.array([SOIL, CROP, WEED], np.uint8), (120, 110), p=[0.5, 0.3, 0.2])
    max_px, side = 4, 50
    cls, other, share = (CROP, WEED, 0.5) if crop_pieces else (WEED, CROP, 0.0)
    def moved(c: np.ndarray) -> np.ndarray:
        out = np.zeros(c.shape, bool)
        out.flat[fragments(c, cls, other, max_px, share)] = True
        return out
    whole = moved(classes)
    k = max_px + 1
    win = (slice(r0, r0 + side + 2 * k), slice(c0, c0 + side + 2 * k))
    assert np.array_equal(moved(classes[win])[k:-k, k:-k], whole[win][k:-k, k:-k])
    assert whole.any()
