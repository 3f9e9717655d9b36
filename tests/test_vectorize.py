"""Zones from class masks: chunked vectorising, border merging, areas, zone-id raster."""

from __future__ import annotations

from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
from affine import Affine
from scipy import ndimage

from agriseg.classes import DEFAULT_CLASSES, DISEASE, WEED
from agriseg.vectorize import ZoneParams, areas_m2, vectorize_zones, write_zones
from agriseg.vectorize import grid_of as _grid_of

UTM_T = Affine(0.05, 0, 500000.0, 0, -0.05, 4900000.0)


def write_mask(path: Path, arr: np.ndarray, transform: Affine = UTM_T, crs: str = "EPSG:32615",
               nodata: int = 255, block: int = 64) -> Path:
    h, w = arr.shape
    with rasterio.open(path, "w", driver="GTiff", width=w, height=h, count=1, dtype=arr.dtype,
                       crs=crs, transform=transform, nodata=nodata, tiled=True,
                       blockxsize=block, blockysize=block, compress="deflate") as dst:
        dst.write(arr, 1)
    return path


def _blob_mask(h: int = 300, w: int = 280) -> np.ndarray:
    cls = np.ones((h, w), np.uint8)  # crop
    cls[:, :20] = 0
    yy, xx = np.mgrid[0:h, 0:w]
    # one weed blob straddling the chunk corner at (128, 128): four chunks
    cls[(yy - 128) ** 2 + (xx - 128) ** 2 < 40**2] = WEED
    # an L-shaped disease patch crossing a vertical and a horizontal border
    cls[200:210, 60:200] = DISEASE
    cls[120:210, 190:200] = DISEASE
    # specks below the area threshold
    cls[20, 250] = WEED
    cls[280:282, 30:32] = DISEASE
    cls[-5:, -5:] = 255
    return cls


def _conf(cls: np.ndarray) -> np.ndarray:
    conf = np.where(cls == WEED, 80, 60).astype(np.uint8)
    conf[cls == 255] = 255
    return conf


@pytest.mark.parametrize("chunk", [64, 128, 4096])
def test_patch_across_chunks_is_one_polygon(tmp_path: Path, chunk: int) -> None:
    cls = _blob_mask()
    src = write_mask(tmp_path / "classes.tif", cls)
    conf = write_mask(tmp_path / "confidence.tif", _conf(cls))
    zr = tmp_path / "zones.tif"
    z = vectorize_zones(src, DEFAULT_CLASSES, ZoneParams(min_area_m2=0.05, chunk=chunk),
                        confidence_tif=conf, zone_raster=zr)
    assert sorted(z["class"]) == ["disease", "weed"], z
    assert z.geometry.is_valid.all()
    weed = z[z["class"] == "weed"].iloc[0]
    truth_px = int((cls == WEED).sum()) - 1  # minus the speck
    assert weed.pixels == truth_px
    assert weed.area_m2 == pytest.approx(truth_px * 0.05**2, abs=1e-3)
    assert weed.mean_confidence == pytest.approx(80)
    assert z.iloc[0]["zone_id"] == 1 and z.iloc[0]["area_m2"] >= z.iloc[1]["area_m2"]
    # zone raster: instance ids, exactly the patch pixels
    with rasterio.open(zr) as ds:
        zid = ds.read(1)
        assert ds.dtypes[0] == "uint16" and ds.nodata == 0  # few ids: uint16
    assert ((zid > 0) == np.isin(cls, (WEED, DISEASE)) & ~_specks(cls)).all()
    assert set(np.unique(zid)) == {0, 1, 2}
    lon, lat = weed.centroid_lon, weed.centroid_lat
    assert -94 < lon < -92 and 44 < lat < 45


def _specks(cls: np.ndarray) -> np.ndarray:
    out = np.zeros(cls.shape, bool)
    out[20, 250] = True
    out[280:282, 30:32] = True
    return out


def test_same_zones_whatever_the_chunking(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    noise = ndimage.gaussian_filter(rng.random((256, 256)), 4)
    cls = np.where(noise > np.quantile(noise, 0.8), WEED, 1).astype(np.uint8)
    src = write_mask(tmp_path / "c.tif", cls, block=32)
    a = vectorize_zones(src, DEFAULT_CLASSES, ZoneParams(min_area_m2=0, chunk=32, simplify_m=0))
    b = vectorize_zones(src, DEFAULT_CLASSES, ZoneParams(min_area_m2=0, chunk=512, simplify_m=0))
    assert len(a) == len(b)
    assert a["pixels"].sum() == (cls == WEED).sum()
    ua, ub = shapely.union_all(a.geometry.values), shapely.union_all(b.geometry.values)
    assert ua.symmetric_difference(ub).area < 1e-9
    assert sorted(a["pixels"]) == sorted(b["pixels"])


def test_min_area_closing_and_simplify(tmp_path: Path) -> None:
    cls = np.ones((120, 120), np.uint8)
    cls[10:30, 10:30] = WEED
    cls[10:30, 32:52] = WEED  # 2-px gap (10 cm) to the first square
    cls[100, 100] = WEED
    src = write_mask(tmp_path / "c.tif", cls)
    two = vectorize_zones(src, DEFAULT_CLASSES, ZoneParams(min_area_m2=0.01))
    assert len(two) == 2  # the speck (0.0025 m2) is gone, the squares are apart
    one = vectorize_zones(src, DEFAULT_CLASSES, ZoneParams(min_area_m2=0.01, closing_m=0.1))
    # the 2-px gap is filled (a disk leaves the gap's outer corners open)
    assert len(one) == 1 and 20 * 40 + 30 < one.iloc[0]["pixels"] <= 20 * 42
    # simplify keeps rectangles exact and never invalidates
    assert one.geometry.is_valid.all() and len(one.geometry.iloc[0].exterior.coords) == 5


def test_area_in_geographic_crs(tmp_path: Path) -> None:
    # ~5 cm pixels at 44.9 N expressed in degrees
    t = Affine(6.3e-7, 0, -95.2, 0, -4.5e-7, 44.9)
    cls = np.ones((200, 200), np.uint8)
    cls[50:150, 50:150] = DISEASE
    src = write_mask(tmp_path / "geo.tif", cls, transform=t, crs="EPSG:4326")
    z = vectorize_zones(src, DEFAULT_CLASSES, ZoneParams(min_area_m2=0))
    poly = z.geometry.iloc[0]
    truth = gpd.GeoSeries([poly], crs=4326).to_crs("EPSG:6933").area.iloc[0]  # equal area
    assert z.iloc[0]["area_m2"] == pytest.approx(truth, rel=2e-3)
    with rasterio.open(src) as ds:
        assert areas_m2(np.array([poly]), _grid_of(ds))[0] == pytest.approx(truth, rel=2e-3)


def test_area_in_web_mercator(tmp_path: Path) -> None:
    """EPSG:3857 metres are 1 / cos(latitude) ground metres: zone and polygon areas are
    ground areas (as in the UTM zone), not CRS square metres."""
    t = Affine(0.07, 0, -10609630.0, 0, -0.07, 5498480.0)  # ~5 cm on the ground at 44.2 N
    cls = np.ones((200, 200), np.uint8)
    cls[50:150, 50:150] = DISEASE
    src = write_mask(tmp_path / "merc.tif", cls, transform=t, crs="EPSG:3857")
    z = vectorize_zones(src, DEFAULT_CLASSES, ZoneParams(min_area_m2=0))
    poly = z.geometry.iloc[0]
    truth = gpd.GeoSeries([poly], crs=3857).to_crs("EPSG:32615").area.iloc[0]
    assert z.iloc[0]["area_m2"] == pytest.approx(truth, rel=5e-3)
    with rasterio.open(src) as ds:
        assert areas_m2(np.array([poly]), _grid_of(ds))[0] == pytest.approx(truth, rel=5e-3)


def test_no_zones_and_field_ids(tmp_path: Path) -> None:
    cls = np.ones((64, 64), np.uint8)
    src = write_mask(tmp_path / "c.tif", cls)
    z = vectorize_zones(src, DEFAULT_CLASSES)
    assert z.empty and list(z.columns)[:3] == ["zone_id", "class", "area_m2"]
    cls[5:15, 5:15] = WEED
    cls[40:60, 40:60] = DISEASE
    src = write_mask(tmp_path / "c2.tif", cls)
    fields = gpd.GeoDataFrame(
        {"field_id": ["A"]},
        geometry=[shapely.box(500000.0, 4900000.0 - 1.0, 500001.0, 4900000.0)], crs=32615,
    )
    z = vectorize_zones(src, DEFAULT_CLASSES, fields=fields)
    assert dict(zip(z["class"], z["field_id"], strict=True)) == {"weed": "A", "disease": None}
    out = write_zones(z, tmp_path / "zones.gpkg")
    back = gpd.read_file(out)
    assert len(back) == 2 and back.crs.to_epsg() == 32615


def test_prescription_cli(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from agriseg.cli import main

    cls = np.ones((400, 400), np.uint8)  # 20 m x 20 m at 5 cm
    cls[10:60, 10:60] = WEED  # in the first 10 m cell only
    cls[300:302, 300:302] = DISEASE  # 4 px: below 1 % of a cell
    run = tmp_path / "run"
    run.mkdir()
    write_mask(run / "classes.tif", cls)
    z = vectorize_zones(run / "classes.tif", DEFAULT_CLASSES, ZoneParams(min_area_m2=0))
    write_zones(z, run / "zones.gpkg")
    r = CliRunner().invoke(main, ["prescription", str(run), "--rate", "weed=2.5,disease=1",
                                  "--grid", "10"])
    assert r.exit_code == 0, r.output
    rx = gpd.read_file(run / "prescription.shp")
    assert rx.crs.to_epsg() == 4326 and len(rx) == 4
    assert sorted(rx["RATE"]) == [0, 0, 0, 2.5]
    assert "diseas_pct" in rx and r.output.count("wrote") == 1
    # styled for QGIS: a .qml of the same name (its default style), a class per rate
    qml = (run / "prescription.qml").read_text()
    assert 'attr="RATE"' in qml and qml.count("<range ") == 2
    again = ["prescription", str(run), "--rate", "weed=3", "--grid", "10"]
    r = CliRunner().invoke(main, again)
    assert r.exit_code == 2 and "--overwrite" in r.output
    assert sorted(gpd.read_file(run / "prescription.shp")["RATE"]) == [0, 0, 0, 2.5]
    assert CliRunner().invoke(main, [*again, "--overwrite"]).exit_code == 0
    assert sorted(gpd.read_file(run / "prescription.shp")["RATE"]) == [0, 0, 0, 3.0]
    r = CliRunner().invoke(main, ["prescription", str(run), "--rate", "weed=2.5,disease=1",
                                  "--out", str(tmp_path / "zones_rx.gpkg")])
    assert r.exit_code == 0, r.output
    assert sorted(gpd.read_file(tmp_path / "zones_rx.gpkg", layer="zones_rx")["RATE"]) == [1.0, 2.5]
    r = CliRunner().invoke(main, ["prescription", str(run), "--rate", "weed=2.5,disease=1",
                                  "--grid", "10", "--out", str(tmp_path / "grid_rx.gpkg")])
    assert r.exit_code == 0, r.output
    # full names in a GeoPackage (cut to 10 characters in Shapefiles only)
    assert "disease_pct" in gpd.read_file(tmp_path / "grid_rx.gpkg", layer="grid_rx")
    import sqlite3

    with sqlite3.connect(tmp_path / "grid_rx.gpkg") as con:
        assert con.execute("select count(*) from layer_styles").fetchone() == (1,)
    r = CliRunner().invoke(main, ["prescription", str(run), "--rate", "weeds=2"])
    assert r.exit_code == 2 and "valid classes" in r.output
    # rates only for classes without zones: no empty file that reads "nothing to spray"
    r = CliRunner().invoke(main, ["prescription", str(run), "--rate", "soil=1", "--out",
                                  str(tmp_path / "none.gpkg")])
    assert r.exit_code == 2 and "no zone of soil" in r.output
    assert not (tmp_path / "none.gpkg").exists()
    r = CliRunner().invoke(main, ["prescription", str(run), "--rate", "weed=2,soil=1", "--out",
                                  str(tmp_path / "some.gpkg")])
    assert r.exit_code == 0 and "no zone of soil; its rate is not used" in r.output
    r = CliRunner().invoke(main, ["prescription", "--help"])
    assert r.exit_code == 0 and "--grid" in r.output



@pytest.mark.parametrize(("args", "needle"), [
    (["--rate", "weed=-2"], "finite number >= 0"),
    (["--rate", "weed=nan"], "finite number >= 0"),
    (["--rate", "weed=2,weed=3"], "more than once"),
    (["--rate", "weed=2", "--base-rate", "-1"], "--base-rate=-1.0"),
    (["--rate", "weed=2", "--min-share", "200"], "percentage 0..100"),
    (["--rate", "weed=2", "--grid", "-5"], "cell edge in metres"),
    (["--rate", "weed=2", "--column", ""], "starting with a letter"),
    (["--rate", "weed=2", "--column", "Class"], "is taken"),  # collided with zones' class
    (["--rate", "weed=2", "--column", "fid"], "is taken"),  # GDAL's error before
    (["--rate", "weed=2", "--crs", "EPSG:99999"], "not a CRS PROJ knows"),  # pyproj traceback
])
def test_prescription_cli_refuses_bad_options(tmp_path: Path, args: list[str],
                                              needle: str) -> None:
    from click.testing import CliRunner

    from agriseg.cli import main

    run = tmp_path / "run"
    run.mkdir()
    write_mask(run / "classes.tif", np.ones((40, 40), np.uint8))
    r = CliRunner().invoke(main, ["prescription", str(run), "--out",
                                  str(tmp_path / "rx.gpkg"), *args])
    assert r.exit_code == 2 and needle in r.output, r.output
    assert "Traceback" not in r.output and not (tmp_path / "rx.gpkg").exists()

def test_chunked_labels_match_whole_array_reference(tmp_path: Path) -> None:
    """The chunked scan (labels joined across chunk borders) gives the zones of one big label.

    Reference: ``ndimage.label`` per class on the whole (small) array, 4-connectivity, patches
    below the minimum area dropped. Blobs, rings and diagonal contacts straddle 32-px chunks.
    """
    rng = np.random.default_rng(7)
    noise = ndimage.gaussian_filter(rng.random((200, 232)), 3)
    cls = np.ones(noise.shape, np.uint8)
    cls[noise > np.quantile(noise, 0.75)] = WEED
    cls[(noise < np.quantile(noise, 0.12)) | (noise > np.quantile(noise, 0.95))] = DISEASE
    cls[::37, :] = 0  # thin soil lines cut some patches exactly on and off chunk borders
    cls[64, 30:90] = WEED  # a one-pixel line along a chunk border
    cls[95, 95] = cls[96, 96] = WEED  # corner contact across a chunk corner: two patches
    cls[-3:, :4] = 255
    src = write_mask(tmp_path / "c.tif", cls, block=32)
    conf = write_mask(tmp_path / "f.tif", _conf(cls), block=32)
    min_px = 6
    zr = tmp_path / "zid.tif"
    z = vectorize_zones(src, DEFAULT_CLASSES, ZoneParams(min_area_m2=min_px * 0.05**2 - 1e-9,
                                                         chunk=32, simplify_m=0),
                        confidence_tif=conf, zone_raster=zr)
    ref = []
    cross = ndimage.generate_binary_structure(2, 1)
    for value, name in ((WEED, "weed"), (DISEASE, "disease")):
        lab, n = ndimage.label(cls == value, structure=cross)
        sizes = np.bincount(lab.ravel(), minlength=n + 1)
        ref += [(name, int(sizes[i])) for i in range(1, n + 1) if sizes[i] >= min_px]
    assert sorted(zip(z["class"], z["pixels"], strict=True)) == sorted(ref)
    np.testing.assert_allclose(z["area_m2"], z["pixels"] * 0.05**2, atol=1e-3)
    assert (np.diff(z["area_m2"].to_numpy()) <= 0).all()  # largest first
    assert z.geometry.is_valid.all() and (z.geometry.geom_type == "Polygon").all()
    # each zone's polygon covers exactly its patch; the zone raster holds the same ids
    with rasterio.open(zr) as ds:
        zid = ds.read(1)
    straddling = 0
    for row in z.itertuples():
        m = zid == row.zone_id
        assert m.sum() == row.pixels
        rr, cc = np.nonzero(m)
        straddling += (rr.min() // 32 != rr.max() // 32) or (cc.min() // 32 != cc.max() // 32)
        value = WEED if row._2 == "weed" else DISEASE
        assert (cls[m] == value).all()
        lab, _ = ndimage.label(cls == value, structure=cross)
        assert len(np.unique(lab[m])) == 1  # one reference patch, entirely
        assert row.area_m2 == pytest.approx(row.pixels * 0.05**2, abs=1e-3)
        # The outline covers the patch; only holes below the minimum zone area are filled.
        filled = row.geometry.area - row.pixels * 0.05**2
        holes = shapely.get_num_interior_rings(shapely.get_parts(row.geometry)).sum()
        assert filled >= -1e-9
        lab_holes = ndimage.label(ndimage.binary_fill_holes(lab == lab[m][0]) & ~m)[1]
        assert filled <= max(lab_holes - holes, 0) * 0.25 + 1e-9
        assert row.mean_confidence == pytest.approx(80 if value == WEED else 60)
    assert set(np.unique(zid)) == {0, *z["zone_id"]}
    assert straddling > 20  # many patches cross chunk borders


@pytest.mark.parametrize("seed", range(12))
def test_tracing_gives_gdal_polygons(seed: int) -> None:
    """trace_pixels gives the polygons ``shapes`` (GDAL) gives, vertex for vertex, for any
    subset of labels: touching labels of two classes, holes, islands in holes, corners where
    a patch meets itself, chunk edges, small and odd-shaped chunks."""
    from rasterio.features import shapes

    from agriseg.trace import trace_pixels
    from agriseg.zonechunk import label_chunk

    rng = np.random.default_rng(seed)
    shape = (int(rng.integers(1, 200)), int(rng.integers(1, 200)))
    sigma = (0.6, 1.0, 2.0)[seed % 3]
    n1 = ndimage.gaussian_filter(rng.random(shape), sigma)
    n2 = ndimage.gaussian_filter(rng.random(shape), sigma)
    risk = np.zeros(shape, np.uint8)
    risk[n1 > np.quantile(n1, 0.5)] = WEED + 1
    risk[n2 > np.quantile(n2, 0.6)] = DISEASE + 1
    if seed % 4 == 0:
        risk[::2, ::2] = WEED + 1  # many patches touching only at corners
    if seed == 11:  # percolating speckle: rings of thousands of vertices meeting themselves
        shape = (400, 400)
        f = [ndimage.gaussian_filter(rng.random(shape), 1.5) for _ in range(3)]
        risk = np.choose(np.argmax([f[0], f[1] + 0.04, f[2]], axis=0),
                         [0, WEED + 1, DISEASE + 1]).astype(np.uint8)
    lab, vals, sel, ls = label_chunk(risk)
    want = np.zeros(len(vals), bool)
    want[1:] = rng.random(len(vals) - 1) < 0.8
    pick = want[ls]
    got, labels = trace_pixels(lab, sel[pick], ls[pick], row0=100, col0=7)
    ref = {int(v): shapely.affinity.translate(shapely.geometry.shape(g), xoff=7, yoff=100)
           for g, v in shapes(lab.astype(np.int32), mask=want[lab], connectivity=4)}
    assert labels.tolist() == sorted(ref)
    assert shapely.is_valid(got).all()
    for g, v in zip(got, labels.tolist(), strict=True):
        assert shapely.to_wkb(g) == shapely.to_wkb(ref[v])


def _split_touching_reference(risk: np.ndarray) -> np.ndarray:
    """Labels as an earlier version numbered them: one ndimage.label over all at-risk pixels,
    then each group where classes touch split per class and appended after all others."""
    cross = ndimage.generate_binary_structure(2, 1)
    lab, n = ndimage.label(risk, structure=cross)
    for m in range(1, n + 1):
        inside = lab == m
        vs = np.unique(risk[inside])
        if len(vs) < 2:
            continue
        for v in vs:
            part = inside & (risk == v)
            lv, k = ndimage.label(part, structure=cross)
            lab[part] = lv[part] + n
            n += k
    return lab


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_label_chunk_keeps_the_split_numbering_order(seed: int) -> None:
    """cc3d labels, renumbered, order patches as the ndimage split did: zone ids of equally
    large zones and the union order of pieces depend on it."""
    from agriseg.zonechunk import label_chunk

    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.random((300, 260)), 2)
    noise2 = ndimage.gaussian_filter(rng.random((300, 260)), 2)
    risk = np.zeros(noise.shape, np.uint8)
    risk[noise > 0.52] = WEED + 1
    risk[noise2 > 0.53] = DISEASE + 1
    lab, vals, sel, ls = label_chunk(risk)
    ref = _split_touching_reference(risk)
    assert (ref > 0).sum() > 1000 and ref.max() > np.unique(ref).size  # groups were split
    # Same patches, in the same order: the ascending label lists map one to one.
    assert np.array_equal(lab > 0, ref > 0)
    pairs = np.unique(np.stack([lab.ravel(), ref.ravel()], axis=1), axis=0)
    assert len(np.unique(pairs[:, 0])) == len(np.unique(pairs[:, 1])) == len(pairs)
    assert np.all(np.diff(pairs[:, 1]) > 0)  # sorted by cc3d label, so also by the old one
    assert np.array_equal(sel, np.flatnonzero(risk)) and np.array_equal(ls, lab.ravel()[sel])
    assert np.array_equal(vals[lab], np.where(lab > 0, risk, 0))


def _traced_pieces(seed: int, size: int, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """Polygons of a speckle mask's pieces, traced chunk by chunk, and their patch labels."""
    from agriseg.trace import trace_pixels

    rng = np.random.default_rng(seed)
    mask = ndimage.gaussian_filter(rng.random((size, size)), 1.2) > 0.5
    patch = ndimage.label(mask)[0]
    polys, owners = [], []
    for r0 in range(0, size, chunk):
        for c0 in range(0, size, chunk):
            sub = mask[r0:r0 + chunk, c0:c0 + chunk]
            lab, n = ndimage.label(sub)
            if not n:
                continue
            flat = lab.ravel()
            sel = np.flatnonzero(flat)
            got, labels = trace_pixels(lab, sel, flat[sel], r0, c0)
            first = sel[np.unique(flat[sel], return_index=True)[1]]  # first pixel per label
            polys.append(got)
            owners.append(patch[r0:r0 + chunk, c0:c0 + chunk].ravel()[first][labels - 1])
    return np.concatenate(polys), np.concatenate(owners)


@pytest.mark.parametrize("seed", range(4))
def test_pinned_simplification_keeps_chunk_borders(seed: int) -> None:
    """Pieces simplified on their own still meet exactly along chunk borders."""
    from agriseg.trace import simplify_pinned

    size, chunk = 96, 32
    polys, owners = _traced_pieces(seed, size, chunk)
    lines = np.arange(0, size + 1, chunk, dtype=np.float64)
    simple = simplify_pinned(polys, 1.0, lines, lines)
    assert shapely.is_valid(simple).all()
    assert shapely.get_num_coordinates(simple).sum() < shapely.get_num_coordinates(polys).sum()
    for before, after in zip(polys, simple, strict=True):
        # nothing moves by more than the tolerance (holes that collapse are filled)
        assert before.buffer(1.01).contains(after)  # 1 % for the buffer's chords
        assert after.buffer(1.01).contains(before)
        on_line = [tuple(p) for p in shapely.get_coordinates(before)
                   if p[0] in lines or p[1] in lines]
        assert set(on_line) <= {tuple(p) for p in shapely.get_coordinates(after)}
    for o in np.unique(owners):
        exact = shapely.union_all(polys[owners == o])
        merged = shapely.union_all(simple[owners == o])
        # one patch stays one polygon: no gap or sliver along the chunk borders
        assert shapely.get_num_geometries(merged) == shapely.get_num_geometries(exact)
        assert abs(merged.area - exact.area) <= exact.length * 0.5


def test_percolating_speckle_is_one_valid_zone(tmp_path: Path) -> None:
    """A weed class over half the raster in speckle: one patch across every chunk, quickly."""
    rng = np.random.default_rng(11)
    noise = ndimage.gaussian_filter(rng.random((256, 256)), 1.2)
    cls = np.where(noise > np.quantile(noise, 0.45), WEED, 1).astype(np.uint8)
    src = write_mask(tmp_path / "c.tif", cls, block=32)
    exact = vectorize_zones(src, DEFAULT_CLASSES,
                            ZoneParams(min_area_m2=0.1, chunk=64, simplify_m=0))
    z = vectorize_zones(src, DEFAULT_CLASSES, ZoneParams(min_area_m2=0.1, chunk=64))
    assert list(z["pixels"]) == list(exact["pixels"])
    assert exact.iloc[0]["pixels"] > 0.4 * cls.size  # it percolates
    assert z.geometry.is_valid.all()
    for a, b in zip(z.geometry, exact.geometry, strict=True):
        assert a.buffer(0.0505).contains(b) and b.buffer(0.0505).contains(a)
        assert shapely.get_num_coordinates(a) < shapely.get_num_coordinates(b)


def test_holes_above_min_area_stay_in_geographic_crs(tmp_path: Path) -> None:
    t = Affine(6.3e-7, 0, -95.2, 0, -4.5e-7, 44.9)  # ~5 cm pixels at 44.9 N
    cls = np.ones((200, 200), np.uint8)
    cls[50:150, 50:150] = DISEASE
    cls[90:110, 90:110] = 1  # ~1 m2 of crop inside: a real hole
    cls[60, 60] = 1  # one pixel: speckle, filled
    src = write_mask(tmp_path / "geo.tif", cls, transform=t, crs="EPSG:4326")
    z = vectorize_zones(src, DEFAULT_CLASSES, ZoneParams(min_area_m2=0.25))
    assert len(z) == 1 and shapely.get_num_interior_rings(z.geometry.iloc[0]) == 1


def test_scan_keeps_only_pieces_that_may_become_zones(tmp_path: Path) -> None:
    """Specks wholly inside a chunk are counted there and leave no rows in the tables."""
    from agriseg.vectorize import _scan
    from agriseg.zonechunk import ScanTask, read_spill

    cls = np.ones((256, 256), np.uint8)
    cls[3::8, 3::8] = WEED  # 1024 lone pixels, none on a chunk edge (chunks of 64)
    cls[101:161, 101:161] = WEED  # one patch over the corner of four chunks; 49 specks in it
    src = write_mask(tmp_path / "c.tif", cls)
    job = ScanTask(str(src), None, (0, 0, 256, 256), (256, 256), np.array([WEED + 1]), 255, 0,
                   None, min_px_area=200.0, min_hole_px=0.0, simplify_px=0.0)
    spill = tmp_path / "spill"
    spill.mkdir()
    scan = _scan(job, 64, 0, str(spill))
    assert scan.dropped == 1024 - 49
    # the tables hold the patch's four pieces only, and they merge into one
    assert len(scan.root) - 1 == len(scan.pieces) == 4
    assert len(np.unique(scan.root[1:])) == 1
    # only the pieces' pixels are spilled for the zone raster (rows 101-127 | 128-160)
    spilled = [read_spill(str(spill / f"{i}.npy")) for i in range(16)]
    sizes = [0] * 5 + [27 * 27, 27 * 33] + [0] * 2 + [33 * 27, 33 * 33] + [0] * 5
    assert [len(idx) for idx, _ in spilled] == sizes
    assert all(set(rows.tolist()) <= {1} for _, rows in spilled)
    zr = tmp_path / "zid.tif"
    (tmp_path / ".zid.pixels-left-by-a-killed-run").mkdir()
    z = vectorize_zones(src, DEFAULT_CLASSES, ZoneParams(min_area_m2=0.5, chunk=64),
                        zone_raster=zr)
    assert list(z["pixels"]) == [60 * 60]
    patch = np.zeros(cls.shape, np.uint32)
    patch[101:161, 101:161] = 1
    with rasterio.open(zr) as ds:
        assert np.array_equal(ds.read(1), patch)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.tif", "spill", "zid.tif"]


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_spill_on_a_full_disk_is_a_clear_error() -> None:
    from agriseg.errors import OutputError
    from agriseg.zonechunk import _spill

    with pytest.raises(OutputError, match="free disk space"):
        _spill("/dev/full", np.arange(10), np.ones(10, np.int64))


def test_zones_are_valid_in_map_coordinates(tmp_path: Path) -> None:
    """Specks with holes touching their shell crossed it once moved to map coordinates."""
    from agriseg.synth import FieldSpec, write_field

    field = write_field(FieldSpec(size=768, seed=1, weed_density=3, disease_density=3),
                        tmp_path / "f.tif", tmp_path / "t.tif")
    src = write_mask(tmp_path / "c.tif", field.truth.astype(np.uint8),
                     transform=Affine(0.02, 0, 500000, 0, -0.02, 4900000))
    zones = vectorize_zones(src, DEFAULT_CLASSES, ZoneParams(min_area_m2=0), workers=0)
    assert len(zones) > 100 and zones.is_valid.all()
    # the run's per-class sums add unrounded areas: one-pixel zones are 0.0004 m2, not 0
    assert (zones["area_m2"] > 0).all()
    assert zones["area_m2"].sum() == pytest.approx(zones["pixels"].sum() * 0.0004, rel=1e-6)


def test_prescription_cells_are_square_with_rectangular_pixels(tmp_path: Path) -> None:
    from agriseg.prescription import Prescription, grid_prescription

    cls = np.ones((400, 600), np.uint8)  # 12 m wide, 12 m tall in 2 x 3 cm pixels
    cls[:40, :60] = WEED
    src = write_mask(tmp_path / "c.tif", cls, transform=Affine(0.02, 0, 5e5, 0, -0.03, 4.9e6))
    cells = grid_prescription(src, DEFAULT_CLASSES, Prescription((("weed", 2.0),), grid_m=5.0))
    inner = cells.geometry.bounds.iloc[0]  # the top-left cell, whole
    assert inner.maxx - inner.minx == pytest.approx(5.0)
    assert inner.maxy - inner.miny == pytest.approx(5.0)
    assert len(cells) == 9 and cells["RATE"].tolist().count(2.0) == 1
    # --min-share 0: a cell needs some of the class, not none (every cell got the rate)
    cells = grid_prescription(src, DEFAULT_CLASSES,
                              Prescription((("weed", 2.0),), grid_m=5.0, min_share=0.0))
    assert cells["RATE"].tolist().count(2.0) == 1


def test_prescription_share_columns_stay_apart() -> None:
    """Classes sharing six letters wrote one Shapefile column (the last one's shares)."""
    from agriseg.prescription import _shapefile_names

    cols = ["cell_id", "RATE", "stress_low_pct", "stress_high_pct", "stress_mid_pct",
            "weed_pct", "disease_pct"]
    renamed = [_shapefile_names(cols).get(c, c) for c in cols]
    assert renamed == ["cell_id", "RATE", "stress_pct", "stres2_pct", "stres3_pct", "weed_pct",
                       "diseas_pct"]
