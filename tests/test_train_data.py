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
from agriseg.errors import BandError, GridMismatchError
from agriseg.grid import Grid
from agriseg.train.data import IGNORE, _read_label_raster, block_split, load_pair

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
