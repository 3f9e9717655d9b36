"""The shared block cache, and tiles read through it against direct window reads."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine

from agriseg import raster
from agriseg.blocks import BlockCache
from agriseg.grid import plan_tiles
from agriseg.raster import open_survey, read_tile, read_window
from tests.conftest import toy_field, write_rgba


def test_cache_loads_each_key_once_while_threads_wait() -> None:
    cache = BlockCache(10**6)
    calls: list[int] = []

    def load() -> tuple[np.ndarray, ...]:
        calls.append(1)
        time.sleep(0.2)  # the other threads ask while this load runs
        return (np.arange(4),)

    got: list[tuple[np.ndarray, ...]] = []
    threads = [threading.Thread(target=lambda: got.append(cache.get("k", load)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(got) == 4 and all(g is got[0] for g in got)
    assert (cache.hits, cache.misses) == (3, 1)


def test_get_many_loads_free_keys_before_waiting_for_others() -> None:
    cache = BlockCache(10**6)
    started, release = threading.Event(), threading.Event()

    def slow() -> tuple[np.ndarray, ...]:
        started.set()
        release.wait(5)
        return (np.zeros(1),)

    other = threading.Thread(target=lambda: cache.get("shared", slow))
    other.start()
    started.wait(5)
    order: list[str] = []

    def own() -> tuple[np.ndarray, ...]:
        order.append("own loaded")
        return (np.ones(1),)

    got = cache.get_many([("shared", lambda: pytest.fail("loaded twice")), ("own", own)])
    key, value = next(got)  # "shared" is being loaded elsewhere: "own" comes first
    assert (key, order, value[0][0]) == ("own", ["own loaded"], 1)
    release.set()
    key, value = next(got)
    assert (key, value[0][0]) == ("shared", 0)
    other.join()
    assert cache.deferred == 1 and (cache.hits, cache.misses) == (1, 2)


def test_cache_evicts_least_recently_used_by_bytes() -> None:
    cache = BlockCache(2 * 800)  # two arrays of 100 float64
    for key in ("a", "b"):
        cache.get(key, lambda: (np.zeros(100),))
    cache.get("a", lambda: pytest.fail("a is cached"))
    cache.get("c", lambda: (np.zeros(100),))  # evicts b, the least recently used
    assert cache.nbytes == 1600
    reloaded: list[str] = []
    cache.get("b", lambda: (reloaded.append("b"), np.zeros(100))[1:])
    cache.get("c", lambda: pytest.fail("c is cached"))
    assert reloaded == ["b"]
    cache.clear()
    assert cache.nbytes == 0


def test_cache_keeps_no_failed_load() -> None:
    cache = BlockCache(10**6)

    def bad() -> tuple[np.ndarray, ...]:
        raise OSError("bad block")

    with pytest.raises(OSError, match="bad block"):
        cache.get("k", bad)
    assert cache.get("k", lambda: (np.ones(2),))[0].sum() == 2


def _gtiff(path: Path, data: np.ndarray, **extra: object) -> Path:
    c, h, w = data.shape
    with rasterio.open(path, "w", driver="GTiff", width=w, height=h, count=c,
                       dtype=data.dtype, crs="EPSG:32615",
                       transform=Affine(0.02, 0, 5e5, 0, -0.02, 5e6), **extra) as dst:
        dst.write(data)
    return path


def _files(tmp_path: Path) -> dict[str, Path]:
    rgb, valid = toy_field(700, 900)
    rng = np.random.default_rng(3)
    u16 = rng.integers(1, 4000, (4, 700, 900)).astype(np.uint16)
    u16[:, :50, :70] = 0
    return {
        "alpha": write_rgba(tmp_path / "rgba.tif", rgb, valid, block=256),
        "gdal": _gtiff(tmp_path / "u16.tif", u16, nodata=0, tiled=True, blockxsize=128,
                       blockysize=128),
        "striped": _gtiff(tmp_path / "striped.tif", rgb),
    }


@pytest.mark.parametrize("kind", ["alpha", "gdal", "striped"])
def test_tiles_read_through_the_cache_equal_direct_reads(
    tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ragged edge blocks, alpha / GDAL masks, tiles reaching past the raster (padding)."""
    if kind == "striped":  # as if its strips were too wide to cache
        monkeypatch.setattr(raster, "CACHE_BLOCK_MAX_BYTES", 2**16)
    raster.clear_tile_cache()
    survey = open_survey(_files(tmp_path)[kind])
    roles = survey.roles.spectral
    for tile in plan_tiles(survey.grid, 256, 40):
        pixels, valid = read_tile(survey, roles, tile)
        direct, direct_valid = read_window(survey, roles, tile.read)
        top, _, left, _ = tile.pad
        h, w = direct_valid.shape
        inner = (slice(top, top + h), slice(left, left + w))
        np.testing.assert_array_equal(pixels[(slice(None), *inner)], direct)
        np.testing.assert_array_equal(valid[inner], direct_valid)
    cache = raster._TILE_BLOCKS
    if kind == "striped":  # read window by window
        assert cache.misses == 0
    else:
        # Every cache block decoded once; the neighbours' halos were served from memory.
        assert cache.misses == 2 * 2 and cache.hits > cache.misses
    raster.clear_tile_cache()


BLOCK_BYTES = 512 * 512 * 4  # one RGBA cache block


def _read_every_tile(path: Path, shape_hw: tuple[int, int], tile: int,
                     swath_px: int) -> tuple[int, int]:
    """Read a random RGBA raster's tiles in plan order: (cache misses, peak cache bytes)."""
    rgb = np.random.default_rng(5).integers(0, 255, (3, *shape_hw), dtype=np.uint8)
    survey = open_survey(write_rgba(path, rgb, block=256))
    raster.clear_tile_cache()
    cache = raster._TILE_BLOCKS
    peak = 0
    for t in plan_tiles(survey.grid, tile, 40, swath_px=swath_px):
        read_tile(survey, survey.roles.spectral, t)
        peak = max(peak, cache.nbytes)
    # In plan order no tile asks for a block an earlier tile dropped as no longer needed.
    assert cache.retired_loads == 0
    misses = cache.misses
    raster.clear_tile_cache()
    return misses, peak


def test_tiles_in_row_major_order_decode_each_block_once_and_keep_two_rows(
    tmp_path: Path,
) -> None:
    misses, peak = _read_every_tile(tmp_path / "big.tif", (2048, 2048), 384, swath_px=2048)
    assert misses == 4 * 4  # each 512 px cache block decoded once
    # Blocks no later tile needs are dropped: at most two rows of four blocks and the
    # blocks of the tile being read stay, not all sixteen.
    assert peak <= 10 * BLOCK_BYTES


def test_swaths_hold_blocks_for_their_width_only(tmp_path: Path) -> None:
    # 4 swaths of 4 tiles of 256 px.
    misses, peak = _read_every_tile(tmp_path / "wide.tif", (1024, 4096), 256, swath_px=1024)
    # 2 x 8 cache blocks; at each of the 3 swath borders the halos reach into one block
    # column on either side, which both swaths decode.
    assert 16 <= misses <= 16 + 3 * 2 * 2
    # About two rows of a swath's blocks (3 across with its neighbour's edge), not of all 8.
    assert peak <= 8 * BLOCK_BYTES


def test_dropped_entries_free_their_bytes() -> None:
    cache = BlockCache(10**6)
    for key in ("a", "b"):
        cache.get(key, lambda: (np.zeros(100),))
    cache.drop(["a", "missing"])
    assert cache.nbytes == 800
    reloaded: list[str] = []
    cache.get("a", lambda: (reloaded.append("a"), np.zeros(100))[1:])
    assert reloaded == ["a"]


def test_a_dropped_key_asked_for_late_is_loaded_but_not_kept() -> None:
    # Tiles finish out of order: a later tile may drop a block an earlier one still reads.
    cache = BlockCache(10**6)
    cache.get("a", lambda: (np.zeros(100),))
    cache.drop(["a"])
    loads: list[str] = []
    for _ in range(2):
        cache.get("a", lambda: (loads.append("a"), np.zeros(100))[1:])
    assert loads == ["a", "a"] and cache.nbytes == 0 and cache.retired_loads == 2
    cache.clear()  # a new survey: the key may be cached again
    cache.get("a", lambda: (np.zeros(100),))
    assert cache.nbytes == 800


def _gated_load() -> tuple[Callable[[], tuple[np.ndarray, ...]], threading.Event,
                           threading.Event, list[str]]:
    """``(load, started, release, loads)``: a load that waits for ``release`` once begun."""
    started, release = threading.Event(), threading.Event()
    loads: list[str] = []

    def load() -> tuple[np.ndarray, ...]:
        loads.append("load")
        started.set()
        release.wait(5)
        return (np.zeros(100),)

    return load, started, release, loads


def test_a_key_dropped_while_loading_is_not_kept() -> None:
    cache = BlockCache(10**6)
    slow, started, release, _ = _gated_load()
    worker = threading.Thread(target=cache.get, args=("a", slow))
    worker.start()
    started.wait(5)
    cache.drop(["a"])
    release.set()
    worker.join(5)
    assert cache.nbytes == 0


def test_only_the_latest_dropped_keys_are_remembered(monkeypatch: pytest.MonkeyPatch) -> None:
    from agriseg import blocks

    monkeypatch.setattr(blocks, "RETIRED_KEYS", 3)
    cache = BlockCache(10**6)
    cache.drop(["a", "b", "c", "d"])
    for key in ("a", "d"):
        cache.get(key, lambda: (np.zeros(100),))
    # "a" was forgotten and is cached again; "d" is still retired
    assert cache.nbytes == 800 and cache.retired_loads == 1


def test_late_callers_of_a_retired_key_share_one_load() -> None:
    cache = BlockCache(10**6)
    cache.drop(["a"])
    slow, started, release, loads = _gated_load()
    first = threading.Thread(target=cache.get, args=("a", slow))
    first.start()
    started.wait(5)
    second = threading.Thread(target=cache.get, args=("a", slow))
    second.start()
    time.sleep(0.05)  # the second caller now waits for the first's load
    release.set()
    first.join(5)
    second.join(5)
    assert loads == ["load"] and cache.nbytes == 0 and cache.retired_loads == 1
