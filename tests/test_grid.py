from __future__ import annotations

import numpy as np
import pytest
from affine import Affine
from hypothesis import given, settings
from hypothesis import strategies as st
from rasterio.crs import CRS

from agriseg.errors import ConfigError
from agriseg.grid import (
    CACHE_PADDED_PX,
    LARGE_TILE_COST,
    Grid,
    auto_tile_size,
    block_size_for,
    plan_tiles,
)

GRID = dict(transform=Affine(0.5, 0, 1000, 0, -0.5, 2000), crs=CRS.from_epsg(32615))


@settings(max_examples=150, deadline=None)
@given(
    h=st.integers(1, 700),
    w=st.integers(1, 700),
    tile=st.sampled_from([16, 32, 48, 64, 128, 256]),
    halo=st.integers(0, 80),
)
def test_cores_partition_and_halos(h: int, w: int, tile: int, halo: int) -> None:
    plan = plan_tiles(Grid((h, w), **GRID), tile, halo)
    cover = np.zeros((h, w), np.int32)
    for t in plan:
        c, r = t.core, t.read
        r0, c0 = int(c.row_off), int(c.col_off)
        cover[r0 : r0 + int(c.height), c0 : c0 + int(c.width)] += 1
        # read window = core grown by halo, clipped to the raster
        assert r.row_off == max(0, c.row_off - halo)
        assert r.col_off == max(0, c.col_off - halo)
        assert r.row_off + r.height == min(h, c.row_off + c.height + halo)
        assert r.col_off + r.width == min(w, c.col_off + c.width + halo)
        top, bottom, left, right = t.pad
        assert min(t.pad) >= 0
        assert r.height + top + bottom == c.height + 2 * halo
        assert r.width + left + right == c.width + 2 * halo
        ys, xs = t.core_in_padded
        assert (ys.start, xs.start) == (halo, halo)
        assert ys.stop - ys.start == c.height and xs.stop - xs.start == c.width
        # cores start on output block boundaries
        assert c.row_off % plan.block_size == 0 and c.col_off % plan.block_size == 0
    assert (cover == 1).all()
    assert plan.shape_tiles_yx[0] * plan.shape_tiles_yx[1] == len(plan)


def test_block_size_and_errors() -> None:
    assert block_size_for(1024) == 512
    assert block_size_for(48) == 16
    with pytest.raises(ConfigError, match="multiple of 16"):
        block_size_for(100)
    with pytest.raises(ConfigError, match="halo"):
        plan_tiles(Grid((10, 10), **GRID), 16, -1)


def test_grid_facts() -> None:
    g = Grid((200, 100), **GRID)
    assert g.res_xy == (0.5, 0.5)
    assert g.bounds == (1000, 1900, 1050, 2000)
    assert g.gsd_m == pytest.approx(0.5)
    geo = Grid((10, 10), Affine(1e-5, 0, -93.0, 0, -1e-5, 44.0), CRS.from_epsg(4326))
    assert geo.gsd_m == pytest.approx(0.95, rel=0.1)  # ~1.1 m x 0.8 m at 44 N


def test_ground_scale_of_stretching_and_foot_crss() -> None:
    """Web Mercator, a state plane far from its zone and a local CRS in feet give ground
    metres; UTM inside its zone keeps the CRS's own metres."""
    utm = Grid((567, 1642), Affine(0.0269, 0, 315760.6, 0, -0.0269, 4900915.7),
               CRS.from_epsg(32615))
    assert utm.res_m == (0.0269, 0.0269) and utm.projection_stretch is None
    assert utm.utm_epsg() == 32615
    # The same place in EPSG:3857 (44.2 N): 1.39x more CRS metres than ground metres.
    merc = Grid((615, 1657), Affine(0.0374, 0, -10609630.0, 0, -0.0374, 5498480.0),
                CRS.from_epsg(3857))
    assert merc.gsd_m == pytest.approx(0.0269, rel=0.01)
    assert merc.projection_stretch == pytest.approx(1.39, rel=0.01)
    assert merc.utm_epsg() == 32615
    # Florida East (US survey feet) used for data 2,000 km away: feet and distortion both.
    far = Grid((100, 100), Affine(0.1, 0, 9_000_000, 0, -0.1, 3_000_000), CRS.from_epsg(2236))
    assert far.projection_stretch is not None
    near = Grid((100, 100), Affine(0.1, 0, 600_000, 0, -0.1, 800_000), CRS.from_epsg(2236))
    assert near.res_m == pytest.approx((0.03048, 0.03048), rel=1e-4)
    feet = CRS.from_wkt('LOCAL_CS["Arbitrary (ft)",LOCAL_DATUM["Local Datum",0],'
                        'UNIT["US survey foot",0.3048006096],AXIS["Easting",EAST],'
                        'AXIS["Northing",NORTH]]')
    local = Grid((100, 100), Affine(0.0882, 0, 0, 0, -0.0882, 50), feet)
    assert local.gsd_m == pytest.approx(0.02688, rel=1e-3)
    assert local.projection_stretch is None and local.utm_epsg() is None


def test_sheared_equal_area_projection_keeps_areas() -> None:
    """The sinusoidal (equal-area) at 95 W, 44 N shears the ground by ~49 degrees: lengths
    along y are 1.5x the CRS's, but a pixel's area is its CRS area."""
    sinu = Grid((906, 3455), Affine(0.018, 0, -7620000.0, 0, -0.018, 4900000.0),
                CRS.from_string("ESRI:54008"))
    assert sinu.square_metres_per_unit2 == pytest.approx(1.0, rel=2e-3)
    assert sinu.pixel_area_m2 == pytest.approx(0.018**2, rel=2e-3)
    assert sinu.projection_shear == pytest.approx(49, abs=3)
    assert sinu.res_m[1] > 1.4 * 0.018
    utm = Grid((100, 100), Affine(0.02, 0, 315760.0, 0, -0.02, 4900915.0), CRS.from_epsg(32615))
    assert utm.projection_shear is None and utm.square_metres_per_unit2 == 1.0


@given(halo=st.integers(0, 600), multiple=st.integers(1, 1000))
def test_auto_tile_size_rounds_up_to_the_models_block(halo: int, multiple: int) -> None:
    plain, size = auto_tile_size(halo), auto_tile_size(halo, multiple=multiple)
    assert size % multiple == 0 and size % 16 == 0
    assert plain <= size < plain + multiple * 16
    block_size_for(size)  # a valid tile size


@given(halo=st.integers(0, 600))
def test_auto_tile_size_bounds_the_halo_overhead(halo: int) -> None:
    size = auto_tile_size(halo)
    assert 1024 <= size <= 2048 and size % 256 == 0

    def cost(s: int) -> float:
        big = s + 2 * halo > CACHE_PADDED_PX
        return ((s + 2 * halo) / s) ** 2 * (LARGE_TILE_COST if big else 1.0)

    if ((1024 + 2 * halo) / 1024) ** 2 <= 1.35:
        assert size == 1024  # narrow halos (neural models) keep the base tile
    else:
        # No other candidate is cheaper per output pixel, and none smaller is as cheap.
        assert all(cost(size) <= cost(s) for s in range(1024, 2049, 256))
        assert all(cost(s) > cost(size) for s in range(1024, size, 256))


def test_auto_tile_size_for_the_label_free_halo() -> None:
    """The label-free model's 120 px halo (2 cm GSD, 0.76 m rows): 1280 px tiles, whose
    1520 px padded planes stay in the cache, not 1536 px ones at a lower overhead."""
    assert auto_tile_size(120) == 1280
    assert auto_tile_size(32) == 1024


@settings(max_examples=100, deadline=None)
@given(
    h=st.integers(1, 600),
    w=st.integers(1, 2000),
    tile=st.sampled_from([16, 64, 128]),
    swath_px=st.integers(1, 900),
)
def test_swaths_are_column_groups_run_one_after_the_other(
    h: int, w: int, tile: int, swath_px: int
) -> None:
    plan = plan_tiles(Grid((h, w), **GRID), tile, 8, swath_px=swath_px)
    per = max(1, -(-swath_px // tile))  # most tile columns a swath may have
    order = [(t.swath, t.index_yx[0], t.index_yx[1]) for t in plan]
    assert order == sorted(order)  # swath by swath, row-major inside
    for sw in {t.swath for t in plan}:
        cols = sorted({t.index_yx[1] for t in plan if t.swath == sw})
        assert cols == list(range(cols[0], cols[-1] + 1)) and len(cols) <= per
        for t in plan:
            if t.swath == sw:
                assert t.swath_end == (t.index_yx[1] == cols[-1])
    if w <= swath_px:
        assert {t.swath for t in plan} == {0}
