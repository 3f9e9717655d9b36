"""Training data: image/label pairs in memory, spatial-block split, patch samplers.

Labels come as a class raster on the image grid, as polygons with a class column (rasterised
on the fly onto the image grid, in any CRS), or as pseudo-labels; pixels without a label are
255 and ignored by the loss. Each pair is read whole into memory (scaled float32), so a pair
should be a field or a crop of a survey, not a whole farm.

The validation split takes whole square blocks of each image; training patches may overlap a
validation block for context, but its labels are blanked in them, so no validation label is
ever trained on.
"""

from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rasterio.windows import Window

from agriseg.classes import ClassSchema
from agriseg.errors import ConfigError, GridMismatchError, InputError, VectorError
from agriseg.grid import Grid
from agriseg.metrics import check_class_raster, map_values, non_class_values
from agriseg.raster import image_vrt, no_georef_warning, open_survey, read_window
from agriseg.train.augment import augment_patch
from agriseg.train.config import AugmentSection

log = logging.getLogger(__name__)

IGNORE = 255


@dataclass(frozen=True, slots=True)
class LabelledImage:
    """One image with labels and its validation blocks.

    Attributes:
        name: file name for logs and the bundle's training summary.
        pixels: float32 ``(C, H, W)`` scaled 0..1.
        labels: uint8 ``(H, W)`` class values, 255 where unlabelled or nodata.
        val: bool ``(H, W)``, True inside validation blocks.
        gsd_m: ground sampling distance in metres.
    """

    name: str
    pixels: np.ndarray
    labels: np.ndarray
    val: np.ndarray
    gsd_m: float

    def class_counts(self, k: int, which: str = "train") -> list[int]:
        """Labelled pixels per class in the training or validation part."""
        sel = self.labels[~self.val] if which == "train" else self.labels[self.val]
        return np.bincount(sel[sel < k], minlength=k)[:k].astype(int).tolist()


def _read_label_raster(path: Path, survey_grid: Grid, k: int,
                       image_plane: bool = False,
                       mapping: dict[int, int] | None = None,
                       names: tuple[str, ...] = ()) -> np.ndarray:
    """Labels of a raster on ``survey_grid``; on the image plane only the size must agree.

    ``mapping`` (label value -> class value, 255 = ignore) recodes a dataset's own codes;
    ``names`` are the class names, for messages.
    """
    import rasterio

    try:
        with no_georef_warning():
            ds = rasterio.open(path)
    except rasterio.errors.RasterioError as exc:
        what = "not found" if not Path(path).exists() else f"not a readable raster ({exc})"
        raise InputError(
            f"{path}: label raster {what}; check `labels:` in the training config (paths are "
            "relative to the config file)"
        ) from exc
    with ds:
        if image_plane and ds.shape == survey_grid.shape_yx:
            pass  # a label image of an image without a CRS: pixel for pixel
        elif ds.crs is None or not Grid(ds.shape, ds.transform, ds.crs).same_as(survey_grid):
            raise GridMismatchError(
                f"{path}: the label raster is not on the image grid (size, transform, CRS "
                "differ); warp it onto the image first: gdalwarp -r near -te <image bounds> "
                "-tr <image pixel size> -t_srs <image CRS>, or give labels as polygons"
            )
        check_class_raster(path, ds, "label raster")
        labels = ds.read(1)
        nodata = ds.nodata
    if mapping:
        # 255 and the raster's nodata stay unlabelled unless the mapping says otherwise.
        unlabelled = {IGNORE: IGNORE, **({nodata: IGNORE} if nodata is not None else {})}
        out, stray = map_values(labels, {**unlabelled, **mapping}, IGNORE)
        if stray.size:
            raise InputError(
                f"{path}: label values {stray[:10].tolist()} are not in label_classes; add "
                "them (VALUE=CLASS, or VALUE=ignore)"
            )
        return out.astype(np.uint8)
    out = labels.astype(np.int64)
    if nodata is not None:
        hidden = labels == nodata
        if nodata != IGNORE and float(nodata).is_integer() and 0 <= nodata < k \
                and hidden.any():
            # QGIS Rasterize may write nodata 0, the value of soil: every soil label was then
            # dropped, and the only hint was "soil has no labelled training pixel".
            name = names[int(nodata)] if int(nodata) < len(names) else str(int(nodata))
            log.warning(
                "%s: the label raster's nodata value %d is the value of class %s, so its %d "
                "pixel(s) of that value are read as unlabelled and teach nothing; if they are "
                "%s labels, unset the nodata value (gdal_edit.py -unsetnodata %s) or write the "
                "raster with another nodata value (255 = unlabelled)",
                path, int(nodata), name, int(hidden.sum()), name, path)
        out[hidden] = IGNORE
    bad = non_class_values(out, k, IGNORE)
    if bad.size:
        raise InputError(
            f"{path}: label values {bad[:10].tolist()} are not classes 0..{k - 1} "
            "(255 = unlabelled); say what they are with `label_classes:` in its data entry "
            "(e.g. label_classes: 10=soil,20=crop,30=weed,0=ignore)"
        )
    return out.astype(np.uint8)


def rasterize_polygons(
    path: Path, column: str, layer: str | None, grid: object, schema: ClassSchema
) -> np.ndarray:
    """Burn labelled polygons onto ``grid`` (255 outside every polygon).

    Raises:
        VectorError: unreadable file, missing column (lists the columns), unknown class.
    """
    import geopandas as gpd
    from rasterio.features import rasterize

    try:
        gdf = gpd.read_file(path, layer=layer) if layer else gpd.read_file(path)
    except Exception as exc:  # pyogrio raises several types for unreadable files
        raise VectorError(f"{path}: cannot read label polygons ({exc})") from exc
    if column not in gdf.columns:
        cols = ", ".join(c for c in gdf.columns if c != "geometry")
        raise VectorError(
            f"{path}: no column {column!r} with the class of each polygon; columns: {cols}; "
            "set class_column in the training config"
        )
    if gdf.crs is None:
        raise VectorError(f"{path}: label polygons have no CRS; set one in QGIS and save again")
    gdf = gdf[gdf.geometry.notna() & ~gdf.geometry.is_empty].to_crs(grid.crs)  # type: ignore[attr-defined]
    shapes = []
    for geom, raw in zip(gdf.geometry, gdf[column], strict=True):
        if raw is None or (isinstance(raw, float) and math.isnan(raw)):
            continue
        if isinstance(raw, str) and not raw.strip().isdigit():
            try:
                value = schema.value_of(raw.strip().lower())
            except ConfigError as exc:
                raise VectorError(f"{path}: column {column!r}: {exc}") from exc
        else:
            if isinstance(raw, float) and not raw.is_integer():  # int() truncated 1.7 to 1
                raise VectorError(f"{path}: column {column!r} holds {raw}, not a class value; "
                                  f"valid values 0..{len(schema) - 1} ({', '.join(schema.names)})")
            value = int(raw)
            if not 0 <= value < len(schema):
                raise VectorError(
                    f"{path}: column {column!r} holds class value {value}; valid values "
                    f"0..{len(schema) - 1} ({', '.join(schema.names)})"
                )
        shapes.append((geom, value))
    h, w = grid.shape_yx  # type: ignore[attr-defined]
    if not shapes:
        raise VectorError(f"{path}: no labelled polygons (column {column!r} is empty)")
    burnt = rasterize(
        shapes, out_shape=(h, w), transform=grid.transform, fill=IGNORE,  # type: ignore[attr-defined]
        dtype="uint8",
    )
    if (burnt == IGNORE).all():
        crs = gdf.crs.to_string()
        raise VectorError(
            f"{path}: none of the {len(shapes)} labelled polygon(s) covers a pixel centre of the "
            f"image (polygons' bounds {tuple(round(b, 2) for b in gdf.total_bounds)} in {crs}); "
            "check that they belong to this image and that their CRS is right (a GeoJSON "
            "without one is read as lon/lat, EPSG:4326)")
    return burnt


def block_split(shape: tuple[int, int], block: int, fraction: float, seed: int) -> np.ndarray:
    """Validation mask made of whole ``block`` squares, about ``fraction`` of the blocks."""
    h, w = shape
    ny, nx = math.ceil(h / block), math.ceil(w / block)
    n = ny * nx
    rng = np.random.default_rng(seed)
    n_val = round(n * fraction)
    if fraction > 0 and n > 1:
        n_val = min(max(n_val, 1), n - 1)
    chosen = np.zeros(n, bool)
    chosen[rng.permutation(n)[:n_val]] = True
    grid = chosen.reshape(ny, nx)
    return np.kron(grid, np.ones((block, block), bool))[:h, :w].astype(bool)


def load_pair(
    image: Path,
    labels: np.ndarray | Path,
    roles: tuple[str, ...],
    schema: ClassSchema,
    val_block: int,
    val_fraction: float,
    seed: int,
    bands: str | None = None,
    gsd: float | None = None,
    label_classes: dict[int, int] | None = None,
) -> LabelledImage:
    """Read an image whole and attach labels (raster path or array on its grid).

    With ``gsd`` the image has no CRS (a PNG or JPEG tile of a labelled dataset): it is read on
    the image plane (see :func:`agriseg.raster.image_vrt`), and its label image only has to
    have the same size.

    Raises:
        BandError: the image lacks a band role of the model.
        GridMismatchError: a label raster is on another grid.
    """
    with tempfile.TemporaryDirectory(prefix="agriseg-image-") as tmp:
        src = image if gsd is None else image_vrt(image, Path(tmp) / "image.vrt", gsd)
        survey = open_survey(src, bands)
        survey.require(roles, "the training config")
        h, w = survey.grid.shape_yx
        pixels, valid = read_window(survey, roles, Window(0, 0, w, h))
    lab = labels if isinstance(labels, np.ndarray) else _read_label_raster(
        labels, survey.grid, len(schema), image_plane=gsd is not None, mapping=label_classes,
        names=schema.names,
    )
    lab = lab.copy()
    labelled = lab != IGNORE
    lab[~valid] = IGNORE
    if not (lab != IGNORE).any():
        # Named here: the sampler could only say that no pixel was labelled at all.
        why = ("every labelled pixel lies on the image's nodata (alpha 0, nodata value)"
               if labelled.any() else "the labels hold no class pixel")
        raise InputError(f"{image}: {why}; check that the labels belong to this image")
    val = block_split((h, w), val_block, val_fraction, seed)
    return LabelledImage(Path(image).name, pixels, lab, val, survey.grid.gsd_m)


def _crop(arr: np.ndarray, y: int, x: int, size: int, fill: float) -> np.ndarray:
    """``arr[..., y:y+size, x:x+size]``, padded with ``fill`` where it leaves the array."""
    h, w = arr.shape[-2:]
    y0, x0, y1, x1 = max(y, 0), max(x, 0), min(y + size, h), min(x + size, w)
    out = np.full((*arr.shape[:-2], size, size), fill, arr.dtype)
    if y1 > y0 and x1 > x0:
        out[..., y0 - y : y1 - y, x0 - x : x1 - x] = arr[..., y0:y1, x0:x1]
    return out


class PatchSampler:
    """Random or class-balanced training patches with augmentation.

    Balanced sampling picks a class uniformly among those present, then a random labelled
    pixel of that class, and centres the patch there, so rare classes (weed, disease) are seen
    as often as soil.
    """

    def __init__(
        self,
        images: list[LabelledImage],
        patch: int,
        k: int,
        mode: str = "balanced",
        augment: AugmentSection | None = None,
        seed: int = 0,
        max_points: int = 200_000,
    ) -> None:
        self.images = images
        self.patch = patch
        self.k = k
        self.mode = mode
        self.augment = augment or AugmentSection(flips=False, rot90=False, brightness=0,
                                                 contrast=0, scale=0)
        self.rng = np.random.default_rng(seed)
        self.train_labels = [np.where(im.val, IGNORE, im.labels).astype(np.uint8) for im in images]
        # Per class: (image index, flat pixel index) samples to centre patches on.
        self.points: dict[int, np.ndarray] = {}
        pick = np.random.default_rng(seed + 1)
        for c in range(k):
            parts = []
            for i, lab in enumerate(self.train_labels):
                idx = np.flatnonzero(lab.ravel() == c)
                if idx.size > max_points:
                    idx = pick.choice(idx, max_points, replace=False)
                parts.append(np.stack([np.full(idx.size, i), idx], 1))
            pts = np.concatenate(parts) if parts else np.empty((0, 2), np.int64)
            if pts.size:
                self.points[c] = pts
        if not self.points:
            raise InputError(
                "no labelled training pixels outside the validation blocks; label more "
                "area or lower validation.fraction"
            )
        self.weights = np.array([max(1, int((lab != IGNORE).sum())) for lab in self.train_labels],
                                float)
        self.weights /= self.weights.sum()

    def state(self) -> dict[str, object]:
        """JSON-friendly RNG state (for resume)."""
        return dict(self.rng.bit_generator.state)

    def set_state(self, state: dict[str, object]) -> None:
        """Restore :meth:`state`."""
        self.rng.bit_generator.state = state

    def _centre(self) -> tuple[int, int, int]:
        if self.mode == "balanced":
            c = list(self.points)[self.rng.integers(len(self.points))]
            i, flat = self.points[c][self.rng.integers(len(self.points[c]))]
            w = self.train_labels[int(i)].shape[1]
            return int(i), int(flat) // w, int(flat) % w
        i = int(self.rng.choice(len(self.images), p=self.weights))
        h, w = self.train_labels[i].shape
        return i, int(self.rng.integers(h)), int(self.rng.integers(w))

    def sample(self) -> tuple[np.ndarray, np.ndarray]:
        """One augmented patch: float32 ``(C, P, P)`` and int64 labels ``(P, P)``."""
        a = self.augment
        for _ in range(20):
            i, cy, cx = self._centre()
            f = math.exp(self.rng.uniform(math.log(1 - a.scale), math.log(1 + a.scale))) \
                if a.scale else 1.0
            size = max(8, round(self.patch * f))
            y, x = cy - size // 2 + int(self.rng.integers(-size // 4, size // 4 + 1)), \
                cx - size // 2 + int(self.rng.integers(-size // 4, size // 4 + 1))
            lab = _crop(self.train_labels[i], y, x, size, IGNORE)
            if (lab != IGNORE).any():
                break
        img = _crop(self.images[i].pixels, y, x, size, 0.0)
        if size != self.patch:
            t = torch.from_numpy(img)[None]
            img = torch.nn.functional.interpolate(
                t, size=(self.patch, self.patch), mode="bilinear", align_corners=False
            )[0].numpy()
            lab = torch.nn.functional.interpolate(
                torch.from_numpy(lab)[None, None].float(), size=(self.patch, self.patch),
                mode="nearest",
            )[0, 0].numpy().astype(np.uint8)
        img, lab = augment_patch(img, lab, a, self.rng)
        return img.astype(np.float32), lab.astype(np.int64)

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` patches stacked as tensors."""
        xs, ys = zip(*(self.sample() for _ in range(n)), strict=True)
        return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))


def validation_windows(images: list[LabelledImage], block: int) -> list[tuple[int, int, int]]:
    """``(image index, row, col)`` of every validation block that holds labels."""
    out = []
    for i, im in enumerate(images):
        h, w = im.labels.shape
        for y in range(0, h, block):
            for x in range(0, w, block):
                sl = (slice(y, y + block), slice(x, x + block))
                if im.val[sl].any() and (im.labels[sl][im.val[sl]] != IGNORE).any():
                    out.append((i, y, x))
    return out


def channel_stats(images: list[LabelledImage]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std over labelled training pixels (the bundle's normalisation)."""
    sums: np.ndarray | None = None
    sq: np.ndarray | None = None
    n = 0
    for im in images:
        sel = (im.labels != IGNORE) & ~im.val
        px = im.pixels[:, sel].astype(np.float64)
        s, q = px.sum(1), (px**2).sum(1)
        sums = s if sums is None else sums + s
        sq = q if sq is None else sq + q
        n += px.shape[1]
    if not n or sums is None or sq is None:
        c = images[0].pixels.shape[0] if images else 3
        return (0.5,) * c, (0.25,) * c
    mean = sums / n
    std = np.sqrt(np.maximum(sq / n - mean**2, 1e-8))
    return tuple(float(v) for v in mean), tuple(float(max(v, 1e-3)) for v in std)
