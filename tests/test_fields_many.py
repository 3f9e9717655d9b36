"""Fields in numbers (breeding trials): zones across plot edges, slivers, sparse histograms."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import rasterio
import shapely
from rasterio.features import rasterize
from rasterio.windows import Window

from agriseg.classes import DEFAULT_CLASSES, WEED
from agriseg.fieldchunk import HIST_BINS, INDEX_RANGE
from agriseg.fields import (
    NO_PIXELS,
    _zones_per_field,
    read_fields,
    some_ids,
    summarize_fields,
    write_fields,
)
from agriseg.grid import Grid
from agriseg.vectorize import _assign_fields, vectorize_zones
from tests.test_fields import T, _field_raster, _fields_file
from tests.test_vectorize import write_mask

X0, Y0 = 500000.0, 4900000.0  # the rasters' top-left corner; 5 cm pixels


def _grid(src: Path) -> Grid:
    with rasterio.open(src) as ds:
        return Grid(ds.shape, ds.transform, ds.crs)


def _plots(tmp_path: Path, boxes: dict[str, tuple[float, float, float, float]]) -> Path:
    """Boxes given as (x0, y0, x1, y1) offsets in metres from the raster's top-left corner."""
    path = tmp_path / "plots.gpkg"
    gpd.GeoDataFrame({"plot": list(boxes)}, crs=32615, geometry=[
        shapely.box(X0 + a, Y0 + b, X0 + c, Y0 + d) for a, b, c, d in boxes.values()
    ]).to_file(path, engine="pyogrio")
    return path


def test_zone_across_an_alley_goes_to_the_plot_holding_most_of_it(tmp_path: Path) -> None:
    """Its representative point fell in the alley between plots: no field_id, zones = 0."""
    cls = np.ones((40, 80), np.uint8)
    cls[10:20, 10:50] = WEED  # x 0.5 .. 2.5 m, centre 1.5 m: in the alley
    src = write_mask(tmp_path / "c.tif", cls)
    fs = read_fields(_plots(tmp_path, {
        "A": (0.2, -1.8, 1.45, -0.1),  # 19 of the zone's 40 columns
        "B": (1.6, -1.8, 3.9, -0.1),  # 18 of them
        "far": (0.2, -1.95, 3.9, -1.85),
    }), _grid(src))
    zones = vectorize_zones(src, DEFAULT_CLASSES, fields=fs.fields)
    assert len(zones) == 1
    assert zones["field_id"].tolist() == ["A"]
    s = summarize_fields(fs, src, DEFAULT_CLASSES, zones=zones).set_index("field_id")
    # Counted in each plot holding part of it, as its pixels count in at_risk_m2.
    assert s.loc["A", "zones"] == 1 and s.loc["B", "zones"] == 1 and s.loc["far", "zones"] == 0
    assert (s.loc[s["at_risk_m2"] > 0, "zones"] > 0).all()


def test_field_of_a_zone_by_area_with_ties_and_slivers() -> None:
    fields = gpd.GeoDataFrame({"field_id": ["big", "outer", "inner", "small", "grazed"]},
                              crs=32615, geometry=[
        shapely.box(0, 0, 10, 10),
        shapely.box(20, 0, 40, 20), shapely.box(22, 2, 28, 8),  # nested
        shapely.box(10, 0, 12, 10),
        shapely.box(50.999, 0, 60, 10),
    ])
    zones = gpd.GeoDataFrame(geometry=[
        # mostly in "big", its representative point on the bar into "small" (6 % of it)
        shapely.union_all([shapely.box(6, 0, 9.5, 4.5), shapely.box(9, 4.5, 12, 5.5),
                           shapely.box(6, 5.5, 9.5, 10)]),
        shapely.box(23, 3, 24, 4),  # in both nested fields: the smaller one
        shapely.box(45, 0, 51, 1),  # grazes "grazed" by a sliver: no field
        shapely.box(100, 0, 101, 1),  # in no field
    ], crs=32615)
    assert shapely.contains(fields.geometry[3], zones.geometry.representative_point()[0])
    ids = _assign_fields(zones, fields, min_area=0.05**2 / 2)
    assert ids.tolist() == ["big", "inner", None, None]
    assert _zones_per_field(fields, zones, 0.05**2 / 2).tolist() == [1, 1, 1, 1, 0]
    assert _assign_fields(zones, None).isna().all()


def test_a_zone_too_large_to_intersect_goes_by_its_point(monkeypatch: pytest.MonkeyPatch) -> None:
    """A patch percolating through the survey: intersected with every plot, it took hours."""
    import agriseg.vectorize as vectorize

    fields = gpd.GeoDataFrame({"field_id": ["big", "small"]}, crs=32615,
                              geometry=[shapely.box(0, 0, 10, 10), shapely.box(10, 0, 12, 10)])
    zone = shapely.union_all([shapely.box(6, 0, 9.5, 4.5), shapely.box(9, 4.5, 12, 5.5),
                              shapely.box(6, 5.5, 9.5, 10)])
    zones = gpd.GeoDataFrame(geometry=[zone], crs=32615)
    assert _assign_fields(zones, fields).tolist() == ["big"]  # by area
    monkeypatch.setattr(vectorize, "OVERLAP_VERTICES", 4)
    assert _assign_fields(zones, fields).tolist() == ["small"]  # by its point
    assert _zones_per_field(fields, zones).tolist() == [1, 1]  # counted where it reaches
    # A plot wholly inside it does not win over the one holding its point, and a point in
    # no field leaves it without one.
    inner = gpd.GeoDataFrame({"field_id": ["inner"]}, crs=32615,
                             geometry=[shapely.box(6.5, 0.5, 7.5, 1.5)])
    both = pd.concat([fields, inner], ignore_index=True)
    assert _assign_fields(zones, both).tolist() == ["small"]
    assert _assign_fields(zones, both.iloc[[0, 2]]).tolist() == [None]


def test_fields_partly_outside_without_valid_pixels_say_so(tmp_path: Path) -> None:
    *_, src, _ = _field_raster(tmp_path)  # rows 0-29 (1.5 m) are nodata
    bowtie = shapely.Polygon([(X0 + 8, Y0 - 1), (X0 + 9, Y0 + 1), (X0 + 9, Y0 - 1),
                              (X0 + 8, Y0 + 1)])
    g = gpd.GeoDataFrame({"name": ["edge", "edge_repaired", "edge_seen", "plot"]}, crs=32615,
                         geometry=[shapely.box(X0 + 2, Y0 - 1.2, X0 + 6, Y0 + 3), bowtie,
                                   shapely.box(X0 + 10, Y0 - 4, X0 + 12, Y0 + 2),
                                   shapely.box(X0 + 8, Y0 - 19, X0 + 16, Y0 - 8)])
    g.to_file(tmp_path / "f.gpkg", engine="pyogrio")
    fs = read_fields(tmp_path / "f.gpkg", _grid(src))
    assert fs.fields["status"].tolist() == [
        "partly outside raster", "repaired, partly outside raster", "partly outside raster",
        "ok"]
    s = summarize_fields(fs, src, DEFAULT_CLASSES).set_index("field_id")
    # The caller counts the fields without pixels by this status.
    assert s["status"].to_dict() == {"edge": NO_PIXELS, "edge_repaired": NO_PIXELS,
                                     "edge_seen": "partly outside raster", "plot": "ok"}
    assert s.loc["edge", "covered_pct"] == 0 and np.isnan(s.loc["edge", "at_risk_m2"])


def test_poorly_covered_fields_are_ranked_after_the_others(tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture
                                                          ) -> None:
    """A plot 98 % over nodata, its few valid pixels weeds, led the report with health 0."""
    cls = np.ones((100, 100), np.uint8)  # crop
    cls[:, :50] = 255
    cls[:, 50:52] = WEED  # the valid edge of the sliver plot: health 0
    cls[20:40, 80:82] = WEED  # a little weed in a well covered plot
    src = write_mask(tmp_path / "c.tif", cls)
    fs = read_fields(_plots(tmp_path, {
        "sliver": (0.1, -4.9, 2.6, -0.1),  # one pixel column of it is valid
        "weedy": (3.0, -2.5, 4.9, -0.1),
        "clean": (3.0, -4.9, 4.9, -2.6),
    }), _grid(src))
    with caplog.at_level("INFO", logger="agriseg.fields"):
        s = summarize_fields(fs, src, DEFAULT_CLASSES)
    assert s["field_id"].tolist() == ["weedy", "clean", "sliver"]
    assert s["rank"].tolist() == [1, 2, 3]
    sliver = s.iloc[2]
    assert sliver["covered_pct"] < 5 and sliver["health_score"] == 0  # kept, not hidden
    assert "1 field(s) under 50 % covered" in caplog.text and "sliver" in caplog.text


def _dense_hist(fs: gpd.GeoDataFrame, cls: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``(fields + 1, bins)`` as the dense per-chunk tables summed to, from the whole raster."""
    lo, hi = INDEX_RANGE["exg"]
    out = np.zeros((len(fs) + 1) * HIST_BINS, np.int64)
    geoms = fs.geometry.to_numpy()
    for i, g in enumerate(geoms, start=1):  # one burn per field: overlapping ones keep all
        fid = rasterize([(g, i)], out_shape=cls.shape, transform=T, fill=0, dtype="uint16")
        ok = (fid > 0) & (cls < len(DEFAULT_CLASSES)) & np.isfinite(idx)
        x = idx[ok] - np.float32(lo)
        x /= hi - lo
        x *= HIST_BINS
        b = np.clip(x, 0, HIST_BINS - 1).astype(np.intp) + i * HIST_BINS
        out += np.bincount(b, minlength=out.size)
    return out.reshape(-1, HIST_BINS)


def test_sparse_chunk_histograms_add_up_to_the_dense_ones(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import agriseg.fields as F
    from agriseg.fieldchunk import field_chunk

    cls, idx, src, ipath = _field_raster(tmp_path)
    fs = read_fields(_fields_file(tmp_path), _grid(src))  # overlapping twins: two layers
    seen: dict[str, np.ndarray] = {}
    table = F._table

    def keep(*args: Any) -> gpd.GeoDataFrame:
        seen.update(args[3])  # the histograms, as _table gets them
        return table(*args)

    monkeypatch.setattr(F, "_table", keep)
    summarize_fields(fs, src, DEFAULT_CLASSES, indices={"exg": ipath}, chunk=64, workers=0)
    dense = _dense_hist(fs.fields, cls, idx)
    np.testing.assert_array_equal(seen["exg"].reshape(dense.shape), dense)
    # Each chunk sends only the fields with valid pixels in it.
    geoms = fs.fields.geometry.to_numpy()
    fc = field_chunk(F._field_task(
        str(src), {"exg": ipath}, Window(0, 128, 64, 64), _grid(src), geoms,
        [(np.arange(len(geoms)), shapely.STRtree(geoms))], len(DEFAULT_CLASSES), None))
    assert fc is not None
    ((present, rows),) = fc.hist["exg"]
    assert 0 < len(present) < len(fs.fields) and rows.shape == (len(present), HIST_BINS)
    assert (rows.sum(axis=1) > 0).all()


def test_small_areas_are_written_without_exponents(tmp_path: Path) -> None:
    s = gpd.GeoDataFrame({"field_id": ["a", "b"], "area_ha": [2e-06, 0.5],
                          "weed_m2": [1.5e-05, np.nan], "crop_pct": [3.0, 12.25]},
                         geometry=[shapely.box(0, 0, 1, 1)] * 2, crs=32615)
    _, c = write_fields(s, tmp_path / "f.gpkg", tmp_path / "f.csv")
    text = c.read_text(encoding="utf-8-sig")
    assert "e-" not in text
    assert text.splitlines()[1:] == ["a,0.000002,0.000015,3.0", "b,0.5,,12.25"]
    back = pd.read_csv(c)
    assert back["area_ha"].tolist() == [2e-06, 0.5]


def test_ids_with_control_characters_are_escaped_in_notes() -> None:
    assert some_ids(["a\nb", "Süd\t1", "plain"]) == "a\\nb, Süd\\t1, plain"
    assert some_ids([str(i) for i in range(12)], most=2) == "0, 1 and 10 more"
