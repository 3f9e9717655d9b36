"""Training data: label rasters (nodata, grids), the validation split, images without a CRS,
the bundle's default name and the resume checkpoint. Fast: tiny rasters, no training."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.crs import CRS

from agriseg.classes import DEFAULT_CLASSES
from agriseg.errors import BandError, GridMismatchError, InputError, VectorError
from agriseg.grid import Grid
from agriseg.train.data import (
    IGNORE,
    _read_label_raster,
    block_split,
    load_pair,
    rasterize_polygons,
)

UTM = CRS.from_epsg(32615)
ORIGIN = Affine(0.02, 0, 500000, 0, -0.02, 4900000)
IMAGE = Grid((64, 64), ORIGIN, UTM)


def _label_raster(path: Path, values: np.ndarray, transform: Affine = ORIGIN,
                  crs: CRS | None = UTM, nodata: float | None = None) -> Path:
    h, w = values.shape
    with rasterio.open(path, "w", driver="GTiff", width=w, height=h, count=1,
                       dtype=values.dtype, transform=transform, crs=crs, nodata=nodata) as ds:
        ds.write(values, 1)
    return path


def _classes(h: int = 64, w: int = 64) -> np.ndarray:
    return (np.arange(h * w).reshape(h, w) % 4).astype(np.uint8)


# --- nodata of a label raster with label_classes ------------------------------------------


def test_nodata_stays_unlabelled_under_label_classes(tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """nodata 0 with label_classes "0=soil,...": every unlabelled pixel was trained as soil,
    without the warning given when there is no mapping."""
    values = _classes()
    values[:, 32:] = 0  # the unlabelled half, as QGIS Rasterize writes it
    path = _label_raster(tmp_path / "nodata0.tif", values, nodata=0)
    mapping = {0: 0, 1: 1, 2: 2, 3: 3}
    with caplog.at_level(logging.WARNING, logger="agriseg.train.data"):
        out = _read_label_raster(path, IMAGE, 4, mapping=mapping, names=DEFAULT_CLASSES.names)
    assert (out[values == 0] == IGNORE).all() and (out[values == 1] == 1).all()
    assert f"{path}: the label raster's nodata value 0 is mapped to class soil by " \
           "label_classes, but nodata pixels are read as unlabelled" in caplog.text
    assert f"gdal_edit.py -unsetnodata {path}" in caplog.text and "(0=ignore)" in caplog.text
    caplog.clear()
    # a mapping that leaves nodata out: unlabelled, and neither refused nor warned about
    with caplog.at_level(logging.WARNING, logger="agriseg.train.data"):
        out = _read_label_raster(path, IMAGE, 4, mapping={1: 1, 2: 2, 3: 3},
                                 names=DEFAULT_CLASSES.names)
    assert (out[values == 0] == IGNORE).all() and not caplog.text
    # ... as does one that says it is unlabelled
    out = _read_label_raster(path, IMAGE, 4, mapping={0: IGNORE, 1: 1, 2: 2, 3: 3})
    assert (out[values == 0] == IGNORE).all() and not caplog.text


# --- label rasters off the image grid -----------------------------------------------------


def _mismatch(path: Path, image: Grid = IMAGE, image_plane: bool = False) -> str:
    with pytest.raises(GridMismatchError) as err:
        _read_label_raster(path, image, 4, image_plane=image_plane)
    return str(err.value)


def test_grid_mismatch_names_the_difference_and_the_command(tmp_path: Path) -> None:
    warp = ("gdalwarp -r near -dstnodata 255 -te 500000 4899998.72 500001.28 4900000 -tr 0.02 "
            "0.02 -t_srs EPSG:32615")
    coarse = _label_raster(tmp_path / "coarse.tif", _classes(32, 32),
                           ORIGIN @ Affine.scale(2))
    msg = _mismatch(coarse)
    assert "its size is 32x32 px, the image's 64x64 px" in msg
    assert "its pixel size is 0.04 x 0.04, the image's 0.02 x 0.02 (EPSG:32615 units)" in msg
    assert f"{warp} {coarse} {tmp_path / 'coarse_on_image.tif'}" in msg
    shifted = _label_raster(tmp_path / "shifted.tif", _classes(),
                            ORIGIN @ Affine.translation(3, -2))
    msg = _mismatch(shifted)
    assert "its top-left corner is +3 px across and -2 px down from the image's" in msg
    assert "size" not in msg.split(";")[0] and warp in msg
    web = _label_raster(tmp_path / "web.tif", _classes(),
                        Affine(0.03, 0, -10e6, 0, -0.03, 5e6), CRS.from_epsg(3857))
    msg = _mismatch(web)
    assert "its CRS is EPSG:3857, the image's EPSG:32615" in msg and warp in msg
    assert "pixel size" not in msg  # in other units: no comparison
    nocrs = _label_raster(tmp_path / "nocrs.tif", _classes(), crs=None)
    msg = _mismatch(nocrs)
    assert "it has no CRS, the image EPSG:32615" in msg
    assert ("gdal_translate -a_srs EPSG:32615 -a_ullr 500000 4900000 500001.28 4899998.72 "
            f"{nocrs}") in msg


def test_sub_pixel_grid_differences_are_accepted(tmp_path: Path) -> None:
    """A label raster 2e-5 px off (a float32 round trip of its geotransform) was refused."""
    near = Affine(0.0200000001, 0, 500000.0000004, 0, -0.0200000001, 4900000.0000003)
    assert _read_label_raster(_label_raster(tmp_path / "near.tif", _classes(), near),
                              IMAGE, 4).shape == (64, 64)
    off = ORIGIN @ Affine.translation(0.01, 0)  # a hundredth of a pixel is a real offset
    assert "+0.01 px across" in _mismatch(_label_raster(tmp_path / "off.tif", _classes(), off))


def test_label_image_of_an_image_without_crs_names_only_sizes(tmp_path: Path) -> None:
    from PIL import Image

    Image.fromarray(_classes(40, 50)).save(tmp_path / "small.png")
    plane = Grid((64, 64), Affine(0.02, 0, 0, 0, -0.02, 0), UTM)
    msg = _mismatch(tmp_path / "small.png", plane, image_plane=True)
    assert "its size is 50x40 px, the image's 64x64 px" in msg
    assert "gdalwarp" not in msg and "export the labels at the image's size" in msg


# --- the validation split ------------------------------------------------------------------


def _old_block_split(shape: tuple[int, int], block: int, fraction: float,
                     seed: int) -> np.ndarray:
    """The split of agriseg before labels were looked at (checkpoints and tests rely on it)."""
    h, w = shape
    ny, nx = math.ceil(h / block), math.ceil(w / block)
    n = ny * nx
    rng = np.random.default_rng(seed)
    n_val = round(n * fraction)
    if fraction > 0 and n > 1:
        n_val = min(max(n_val, 1), n - 1)
    chosen = np.zeros(n, bool)
    chosen[rng.permutation(n)[:n_val]] = True
    return np.kron(chosen.reshape(ny, nx), np.ones((block, block), bool))[:h, :w].astype(bool)


def test_fully_labelled_rasters_keep_their_split() -> None:
    labels = _classes(200, 260)
    for seed in range(10):
        old = _old_block_split((200, 260), 64, 0.25, seed)
        assert np.array_equal(block_split((200, 260), 64, 0.25, seed, labels), old)
        assert np.array_equal(block_split((200, 260), 64, 0.25, seed), old)


def test_validation_blocks_are_chosen_among_labelled_blocks() -> None:
    """Labels on the left half: all 3 validation blocks fell in the unlabelled half."""
    labels = np.full((256, 256), IGNORE, np.uint8)
    labels[:, :128] = _classes(256, 128)
    for seed in range(20):
        val = block_split((256, 256), 64, 0.2, seed, labels)
        assert val[:, :128].any() and not val[:, 128:].any()
        assert val.sum() == 2 * 64 * 64  # a fifth of the 8 labelled blocks
        assert np.array_equal(val, block_split((256, 256), 64, 0.2, seed, labels))
    # labels within one block: none is taken from training
    one = np.full((256, 256), IGNORE, np.uint8)
    one[10:50, 10:50] = 1
    assert not block_split((256, 256), 64, 0.2, 0, one).any()
    assert not block_split((256, 256), 64, 0.9, 0, one).any()  # whatever the fraction


def test_validation_leaves_training_every_class_of_sparse_labels() -> None:
    """Polygons: a class labelled in one block only must stay in training."""
    labels = np.full((256, 256), IGNORE, np.uint8)
    labels[0:128, 0:128] = 0  # soil: 4 blocks
    labels[128:256, 0:64] = 1  # crop: 2 blocks
    labels[130:140, 200:210] = 2  # weed: 1 block
    labels[0:64, 192:256] = 3  # disease: 1 block
    for seed in range(20):
        val = block_split((256, 256), 64, 0.3, seed, labels)
        assert set(np.unique(labels[~val])) == {0, 1, 2, 3, IGNORE}, seed
        assert set(np.unique(labels[val])) >= {0, 1}, seed  # both parts hold soil and crop
    # two labelled blocks, each with a class of its own: neither goes to validation
    two = np.full((256, 256), IGNORE, np.uint8)
    two[:64, :64], two[192:, 192:] = 1, 2
    assert not block_split((256, 256), 64, 0.2, 0, two).any()


def test_the_validation_block_count_reads_as_english(tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """"1 of them are validation blocks" before."""
    from PIL import Image

    image = tmp_path / "tile.png"
    Image.fromarray(np.full((128, 128, 3), 90, np.uint8)).save(image)
    labels = np.full((128, 128), IGNORE, np.uint8)
    labels[:64, :64] = _classes()  # 4 of the 16 blocks of 32 px
    corner = np.full_like(labels, IGNORE)
    corner[:20, :20] = labels[:20, :20]  # 1 block, which training keeps
    for lab, needle in (
        (labels, "4 of its 16 validation-size blocks (32 px) hold labels; 1 of them is a "
                 "validation block"),
        (corner, "1 of its 16 validation-size blocks (32 px) holds labels; 0 of them are "
                 "validation blocks"),
    ):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="agriseg.train.data"):
            load_pair(image, lab, ("red", "green", "blue"), DEFAULT_CLASSES, 32, 0.25, 0,
                      gsd=0.02)
        assert needle in caplog.text, caplog.text


# --- images without a CRS (gsd:) -----------------------------------------------------------


def test_images_without_crs_are_named_not_their_vrt(tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    image = tmp_path / "tile.png"
    Image.fromarray(rng.integers(1, 255, (64, 64, 3), dtype=np.uint8)).save(image)
    labels = _classes()
    with caplog.at_level(logging.INFO, logger="agriseg.raster"):
        im = load_pair(image, labels, ("red", "green", "blue"), DEFAULT_CLASSES, 32, 0.25, 0,
                       gsd=0.02)
    assert im.gsd_m == pytest.approx(0.02)
    assert f"{image}: 64x64 px" in caplog.text and "image.vrt" not in caplog.text
    with pytest.raises(BandError) as err:
        load_pair(image, labels, ("red", "nir"), DEFAULT_CLASSES, 32, 0.25, 0, gsd=0.02)
    assert str(err.value).startswith(f"{image}:") and "image.vrt" not in str(err.value)
    # Advice for a training config, not for a run (--model labelfree means nothing there).
    assert "remove this image from data:" in str(err.value) and "--model" not in str(err.value)
    assert not logging.getLogger("agriseg.raster").filters  # the renaming ends with the read


# --- the bundle's default name, the checkpoint ---------------------------------------------


def test_bundle_name_defaults_to_the_training_folder(tmp_path: Path) -> None:
    """Every default bundle was named "model": `agriseg run` printed "model: model"."""
    from agriseg.train.config import build_train_config
    from agriseg.train.loop import bundle_name

    def cfg(**values: object) -> object:
        return build_train_config("t.yaml", version=1, out=str(tmp_path / "weeds-2027"),
                                  synthetic={"count": 1}, **values)

    assert bundle_name(cfg()) == "weeds-2027"  # type: ignore[arg-type]
    assert bundle_name(cfg(bundle=str(tmp_path / "beet.safetensors"))) == "beet"  # type: ignore[arg-type]
    assert bundle_name(cfg(bundle=str(tmp_path / "b" / "model.safetensors"))) \
        == "weeds-2027"  # type: ignore[arg-type]


def test_checkpoint_weights_and_state_stay_paired(tmp_path: Path) -> None:
    """A SIGTERM between the two files' replacements paired epoch-2 weights with the state
    of epoch 1; the state now travels inside the weights' file."""
    import torch

    from agriseg.train.loop import _load_checkpoint, _save_checkpoint

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    ident = {"a": 1}

    def step_and_save(epoch: int) -> dict[str, torch.Tensor]:
        model(torch.ones(1, 3)).sum().backward()
        opt.step()
        _save_checkpoint(tmp_path, model, opt, {"identity": ident, "identity_version": 2,
                                                "epoch": epoch})
        return {k: v.clone() for k, v in model.state_dict().items()}

    step_and_save(1)
    epoch1 = (tmp_path / "last.json").read_text()
    weights2 = step_and_save(2)
    (tmp_path / "last.json").write_text(epoch1)  # stopped before last.json was replaced
    fresh = torch.nn.Linear(3, 2)
    meta = _load_checkpoint(tmp_path, fresh, torch.optim.AdamW(fresh.parameters()), ident)
    assert meta["epoch"] == 2
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in weights2.items())
    assert json.loads(epoch1)["epoch"] == 1


# --- labels of public datasets: colours, binary masks, codes, polygon names -----------------

WEEDMAP = "0,0,0=soil;0,255,0=crop;255,0,0=weed"


def _colour_png(path: Path, alpha: bool = False) -> Path:
    """A WeedMap-style label image: black background, green crop, red weed (64 x 64)."""
    from PIL import Image

    rgb = np.zeros((64, 64, 4 if alpha else 3), np.uint8)
    rgb[:20, :, 1] = 255  # crop
    rgb[40:, :10, 0] = 255  # weed
    if alpha:
        rgb[..., 3] = 255
        rgb[:, 60:, 3] = 0  # transparent: unlabelled
    Image.fromarray(rgb).save(path)
    return path


def _png(path: Path, values: np.ndarray) -> Path:
    from PIL import Image

    Image.fromarray(values).save(path)
    return path


def test_colour_coded_labels_are_read_with_label_colors(tmp_path: Path) -> None:
    """WeedMap's *_GroundTruth_color.png trains with label_colors (evaluate's --truth-colors);
    transparent pixels are unlabelled."""
    from agriseg.train.config import parse_label_colors

    colours = parse_label_colors(WEEDMAP, DEFAULT_CLASSES)
    out = _read_label_raster(_colour_png(tmp_path / "rgb.png"), IMAGE, 4, image_plane=True,
                             colours=colours)
    assert out.dtype == np.uint8 and (out[:20] == 1).all() and (out[40:, :10] == 2).all()
    assert (out[20:40] == 0).all()
    out = _read_label_raster(_colour_png(tmp_path / "rgba.png", alpha=True), IMAGE, 4,
                             image_plane=True, colours=colours)
    assert (out[:, 60:] == IGNORE).all() and (out[:20, :60] == 1).all()
    # a colour mapped to ignore is unlabelled
    out = _read_label_raster(tmp_path / "rgb.png", IMAGE, 4, image_plane=True,
                             colours=parse_label_colors("0,0,0=ignore;0,255,0=crop;255,0,0=weed",
                                                        DEFAULT_CLASSES))
    assert (out[20:40] == IGNORE).all()


def test_colours_label_colors_does_not_name_are_listed(tmp_path: Path) -> None:
    from agriseg.train.config import parse_label_colors

    path = _colour_png(tmp_path / "rgb.png")
    with pytest.raises(InputError) as err:
        _read_label_raster(path, IMAGE, 4, image_plane=True,
                           colours=parse_label_colors("0,0,0=soil;0,255,0=crop",
                                                      DEFAULT_CLASSES))
    assert "holds colours that label_colors does not name: 255,0,0 (240 px)" in str(err.value)
    assert 'label_colors: "0,0,0=soil;0,255,0=crop;255,0,0=ignore"' in str(err.value)
    # a class raster is no colour-coded label image
    grey = _png(tmp_path / "grey.png", _classes())
    with pytest.raises(InputError, match="label_colors needs colour-coded labels"):
        _read_label_raster(grey, IMAGE, 4, image_plane=True,
                           colours=parse_label_colors(WEEDMAP, DEFAULT_CLASSES))


def test_colour_coded_labels_without_label_colors_get_an_example_of_their_colours(
        tmp_path: Path) -> None:
    """"has 3 bands ... Convert colours to class values first" said not how."""
    path = _colour_png(tmp_path / "rgb.png")
    with pytest.raises(InputError) as err:
        _read_label_raster(path, IMAGE, 4, image_plane=True)
    msg = str(err.value)
    assert msg.startswith(f"{path}: has 3 bands (RGB)")
    # most frequent first, with their pixel counts, and an example built from them
    assert "0,0,0 (2576 px), 0,255,0 (1280 px), 255,0,0 (240 px)" in msg
    assert f'label_colors: "{WEEDMAP}"' in msg
    # a custom class of that colour is named by its own name
    from agriseg.classes import ClassSchema, SegClass

    schema = ClassSchema((SegClass(0, "background", (0, 0, 0), role="soil"),
                          SegClass(1, "beet", (0, 255, 0), role="crop"),
                          SegClass(2, "weed", (255, 0, 0))))
    with pytest.raises(InputError, match='"0,0,0=background;0,255,0=beet;255,0,0=weed"'):
        _read_label_raster(path, IMAGE, 3, image_plane=True, names=schema.names, schema=schema)


def test_binary_mask_without_label_classes_is_warned_of_with_a_hint(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A 0/255 weed mask read with 255 = unlabelled trained a soil-only model with a generic
    note; a warning says what to write (not an error: a tile coded as documented may hold
    only soil and unlabelled pixels)."""
    mask = np.zeros((64, 64), np.uint8)
    mask[10:20] = 255
    path = _png(tmp_path / "mask.png", mask)
    with caplog.at_level("WARNING", logger="agriseg.train.data"):
        out = _read_label_raster(path, IMAGE, 4, image_plane=True)
    assert (out[10:20] == IGNORE).all() and (out[:10] == 0).all()
    msg = caplog.text
    assert "holds only values 0 and 255 (a binary mask?)" in msg
    assert 'label_classes: "0=soil,255=weed"' in msg and "`classes:`" in msg
    # said what the values are, it reads
    out = _read_label_raster(path, IMAGE, 4, image_plane=True, mapping={0: 0, 255: 2})
    assert (out[10:20] == 2).all() and (out[:10] == 0).all()
    # a declared nodata of 255 says the 255 pixels are unlabelled on purpose (soil only)
    geo = _label_raster(tmp_path / "soil.tif", mask, nodata=255)
    out = _read_label_raster(geo, IMAGE, 4)
    assert (out[10:20] == IGNORE).all() and (out[:10] == 0).all()


def test_unknown_label_values_get_an_example_of_the_values_found(tmp_path: Path) -> None:
    """0/128/255 was told "e.g. label_classes: 10=soil,20=crop,30=weed,0=ignore"."""
    values = np.zeros((64, 64), np.uint8)
    values[20:40] = 128
    values[40:] = 255
    path = _png(tmp_path / "grey.png", values)
    with pytest.raises(InputError) as err:
        _read_label_raster(path, IMAGE, 4, image_plane=True)
    msg = str(err.value)
    assert "label values [128] are not classes 0..3" in msg
    # grey levels: 255 steps on from 0 and 128 as the third class, as evaluate reads them
    assert 'label_classes: "0=soil,128=crop,255=weed"' in msg
    assert "(255=ignore if it is unlabelled)" in msg and "10=soil" not in msg
    values[20:] = 10  # 0/10 beside 255: no level of theirs, so 255 stays unlabelled
    values[60:] = 255
    with pytest.raises(InputError, match=r'"0=soil,10=crop" .*255 \(6.25 % of the pixels\) is '
                                         r"read as unlabelled \(if it is a class, map it too: "
                                         r"255=weed\)"):
        _read_label_raster(_png(tmp_path / "grey2.png", values), IMAGE, 4, image_plane=True)
    coded = _label_raster(tmp_path / "coded.tif", ((_classes() + 1) * 10).astype(np.uint8))
    with pytest.raises(InputError, match='label_classes: "10=soil,20=crop,30=weed,40=disease"'):
        _read_label_raster(coded, IMAGE, 4)
    # a mapping that leaves values out: a full label_classes naming them
    with pytest.raises(InputError, match='label_classes: "10=soil,20=crop,30=ignore,'
                                         '40=ignore"'):
        _read_label_raster(coded, IMAGE, 4, mapping={10: 0, 20: 1})
    # a continuous raster is no label raster: no mapping to suggest
    ramp = _label_raster(tmp_path / "ramp.tif", np.arange(64 * 64).reshape(64, 64)
                         .astype(np.uint16))
    with pytest.raises(InputError, match="looks like a continuous raster"):
        _read_label_raster(ramp, IMAGE, 4)


def _named_polygons(path: Path, names: list[object]) -> Path:
    import geopandas as gpd
    from shapely.geometry import box

    left, top = ORIGIN.c, ORIGIN.f
    step = 64 * 0.02 / len(names)
    gpd.GeoDataFrame(
        {"class": names},
        geometry=[box(left + i * step, top - 1.28, left + (i + 1) * step, top)
                  for i in range(len(names))], crs=UTM).to_file(path)
    return path


def test_polygon_names_of_a_dataset_are_all_named_with_a_label_classes_line(
        tmp_path: Path) -> None:
    """"unknown class 'sugar beet'" named the first unknown name only."""
    path = _named_polygons(tmp_path / "beet.gpkg",
                           ["Sugar beet", "Weed", "background", "sugar beet"])
    with pytest.raises(VectorError) as err:
        rasterize_polygons(path, "class", None, IMAGE, DEFAULT_CLASSES)
    msg = str(err.value)
    assert "'Sugar beet' (2 polygons), 'background' (1 polygon)" in msg
    assert 'label_classes: "Sugar beet=crop,background=soil"' in msg
    assert "`classes:`" in msg and "'Weed'" not in msg  # a class name, case aside
    # misspelt names in label_classes are said to match nothing, and left out of the example
    from agriseg.train.config import parse_name_classes

    with pytest.raises(VectorError) as err:
        rasterize_polygons(path, "class", None, IMAGE, DEFAULT_CLASSES, parse_name_classes(
            "Sugar bet=crop,backgrnd=soil,Weed=weed", DEFAULT_CLASSES))
    msg = str(err.value)
    assert "'sugar bet', 'backgrnd', which no polygon holds (misspelt?)" in msg
    assert 'label_classes: "weed=weed,Sugar beet=crop,background=soil"' in msg


def test_polygon_label_classes_map_names_case_insensitively(tmp_path: Path) -> None:
    from agriseg.train.config import parse_name_classes

    path = _named_polygons(tmp_path / "beet.gpkg",
                           ["Sugar beet", "Weed", "background", "SUGAR BEET "])
    names = parse_name_classes("sugar Beet=crop,Weed=weed,background=soil", DEFAULT_CLASSES)
    out = rasterize_polygons(path, "class", None, IMAGE, DEFAULT_CLASSES, names)
    assert (out[:, :16] == 1).all() and (out[:, 16:32] == 2).all()
    assert (out[:, 32:48] == 0).all() and (out[:, 48:] == 1).all()
    # ignore leaves a name unlabelled; a name neither a class nor listed is refused
    out = rasterize_polygons(path, "class", None, IMAGE, DEFAULT_CLASSES,
                             parse_name_classes("sugar beet=crop,background=ignore",
                                                DEFAULT_CLASSES))
    assert (out[:, 32:48] == IGNORE).all() and (out[:, 16:32] == 2).all()
    with pytest.raises(VectorError, match=r"not classes nor in label_classes .*: 'background' "
                                          r"\(1 polygon\)"):
        rasterize_polygons(path, "class", None, IMAGE, DEFAULT_CLASSES,
                           parse_name_classes("sugar beet=crop", DEFAULT_CLASSES))


def test_polygon_codes_are_mapped_and_asked_for_in_order(tmp_path: Path) -> None:
    from agriseg.train.config import parse_name_classes

    path = _named_polygons(tmp_path / "codes.gpkg", [10.0, 20.0, 30.0, 10.0])
    with pytest.raises(VectorError) as err:
        rasterize_polygons(path, "class", None, IMAGE, DEFAULT_CLASSES)
    assert "'10' (2 polygons), '20' (1 polygon), '30' (1 polygon)" in str(err.value)
    assert 'label_classes: "10=soil,20=crop,30=weed"' in str(err.value)
    out = rasterize_polygons(path, "class", None, IMAGE, DEFAULT_CLASSES,
                             parse_name_classes("10=soil,20=crop,30=weed", DEFAULT_CLASSES))
    assert (out[:, :16] == 0).all() and (out[:, 32:48] == 2).all()


def test_label_colors_and_polygon_label_classes_in_the_config(tmp_path: Path) -> None:
    from agriseg.errors import ConfigError
    from agriseg.train.config import build_train_config

    def err(**item: object) -> str:
        with pytest.raises(ConfigError) as exc:
            build_train_config("t.yaml", out="run", data=[{"image": "a.tif", **item}])
        return str(exc.value)

    ok = build_train_config("t.yaml", out="run", data=[
        {"image": "a.png", "labels": "a_color.png", "gsd": 0.01, "label_colors": WEEDMAP},
        {"image": "b.tif", "polygons": "b.gpkg", "label_classes": "Sugar beet=crop,bg=soil"},
        {"image": "c.tif", "labels": "c.tif"}])
    assert ok.data[0].label_colors == WEEDMAP
    # unset, label_colors stays out of the dump: a resume identity of before it still matches
    assert "label_colors" not in ok.model_dump()["data"][2]
    assert "label_colors" in ok.model_dump()["data"][0]
    assert "not both" in err(labels="a.png", label_colors=WEEDMAP, label_classes="0=soil")
    assert "give it as `labels:`" in err(polygons="a.gpkg", label_colors=WEEDMAP)
    msg = err(labels="a.png", label_colors="0,0,0=dirt")
    assert "data #1: label_colors: '0,0,0=dirt': expected R,G,B=CLASS" in msg
    assert "--truth-colors" not in msg
    assert "data #1: label_classes: 'Sugar beet=plant': expected NAME=CLASS" in err(
        polygons="a.gpkg", label_classes="Sugar beet=plant")
    assert "given twice" in err(polygons="a.gpkg", label_classes="Weed=weed,weed=crop")
    # a gsd in the wrong unit, as run's --gsd
    assert "gsd is metres per pixel: 1e-05 m is 0.01 mm" in err(labels="a.png", gsd=0.00001)
    assert "not `pseudo:`" in err(pseudo={"model": "labelfree"}, label_classes="0=soil")
