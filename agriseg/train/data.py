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
import os
import shlex
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
import torch
from rasterio.windows import Window

from agriseg.classes import DEFAULT_CLASSES, ClassSchema, SegClass
from agriseg.errors import (
    AgrisegError,
    GridMismatchError,
    InputError,
    VectorError,
)
from agriseg.grid import Grid
from agriseg.metrics import (
    MAX_COLOURS,
    MAX_LABELS,
    TOP_SHARE,
    check_class_raster,
    cli_number,
    colour_classes,
    colour_codes,
    crs_label,
    example_mapping,
    map_values,
    non_class_values,
    read_colour_codes,
    refuse_jpeg,
    top_as_grey_level,
    warp_command,
)
from agriseg.raster import image_vrt, open_survey, read_window
from agriseg.rasterfile import no_georef_warning
from agriseg.train.augment import augment_patch
from agriseg.train.config import AugmentSection, name_key

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


#: Largest offset, in image pixels, of a label raster's corners from the image's at which it
#: still counts as on the image grid. Grid.same_as allows 1e-6 px, but label rasters exported
#: by other tools (QGIS, a float32 round trip of the geotransform) were refused at 2e-5 px;
#: far below 1e-3 px every pixel centre falls in the same image pixel, so reading the labels
#: pixel for pixel is what warping them with nearest neighbour would give.
GRID_TOLERANCE_PX = 1e-3


def _corner_offset_px(label: Grid, image: Grid) -> float:
    """Largest offset, in image pixels, of the corners of ``label`` from those of ``image``."""
    to_image = ~image.transform
    h, w = label.shape_yx
    worst = 0.0
    for col, row in ((0, 0), (w, 0), (0, h), (w, h)):
        c, r = to_image @ (label.transform @ (col, row))
        worst = max(worst, abs(c - col), abs(r - row))
    return worst


def _grid_mismatch(path: Path, label: Grid, crs_missing: bool, image: Grid,
                   image_plane: bool) -> GridMismatchError:
    """The error for a label raster off the image grid: what differs and the command to fix it.

    ``label`` holds the label raster's shape, transform and CRS (its CRS is a placeholder when
    ``crs_missing``).
    """
    lh, lw = label.shape_yx
    ih, iw = image.shape_yx
    size = f"its size is {lw}x{lh} px, the image's {iw}x{ih} px"
    if image_plane:
        # An image without a CRS: its labels can only be matched pixel for pixel.
        return GridMismatchError(
            f"{path}: the label image is not on the image grid ({size}); an image given with "
            "gsd: needs a label image of exactly its size: export the labels at the image's "
            "size")
    left, bottom, right, top = image.bounds
    rx, ry = image.res_xy
    crs = crs_label(image.crs)
    if crs_missing:
        if (lh, lw) == (ih, iw):
            fix = ("if it holds the image's labels pixel for pixel, give it the image's "
                   f"georeferencing: gdal_translate -a_srs {shlex.quote(crs)} -a_ullr "
                   f"{cli_number(left)} {cli_number(top)} {cli_number(right)} {cli_number(bottom)} "
                   f"{shlex.quote(str(path))} "
                   f"{shlex.quote(str(Path(path).with_name(Path(path).stem + '_georef.tif')))}")
        else:
            fix = ("export the labels with the image's georeferencing (a GeoTIFF on the "
                   "image's grid), or give labels as polygons")
        return GridMismatchError(
            f"{path}: the label raster is not on the image grid (it has no CRS, the image "
            f"{crs}{'' if (lh, lw) == (ih, iw) else '; ' + size}); {fix}")
    diffs = []
    if label.crs != image.crs:
        diffs.append(f"its CRS is {crs_label(label.crs)}, the image's {crs}")
    if (lh, lw) != (ih, iw):
        diffs.append(size)
    if label.crs == image.crs:
        lx, ly = label.res_xy
        # A pixel size that differs by less than the tolerance over the raster's width is
        # no difference worth naming (the corner offset says all).
        if abs(lx - rx) * max(lw, iw) > GRID_TOLERANCE_PX * rx \
                or abs(ly - ry) * max(lh, ih) > GRID_TOLERANCE_PX * ry:
            diffs.append(f"its pixel size is {lx:.6g} x {ly:.6g}, the image's {rx:.6g} x "
                         f"{ry:.6g} ({crs} units)")
        dc, dr = ~image.transform @ (label.transform.c, label.transform.f)
        if max(abs(dc), abs(dr)) > GRID_TOLERANCE_PX:
            diffs.append(f"its top-left corner is {dc:+.4g} px across and {dr:+.4g} px down "
                         "from the image's")
    if not diffs:
        diffs.append(f"its far corner is {_corner_offset_px(label, image):.4g} px off the "
                     "image's")
    return GridMismatchError(
        f"{path}: the label raster is not on the image grid ({'; '.join(diffs)}); warp it onto "
        f"the image grid: {warp_command(path, image, suffix='_on_image')}, and give that as "
        "labels (or give labels as polygons)")


def _warn_nodata_class(path: Path, nodata: int, name: str, hidden: int, mapped: bool) -> None:
    """Warn that the label raster's nodata value, a class's value, leaves pixels unlabelled."""
    # QGIS Rasterize may write nodata 0, the value of soil: every soil label was then
    # dropped, and the only hint was "soil has no labelled training pixel".
    if mapped:
        log.warning(
            "%s: the label raster's nodata value %d is mapped to class %s by label_classes, "
            "but nodata pixels are read as unlabelled, so its %d pixel(s) of that value teach "
            "nothing; if they are %s labels, unset the nodata value (gdal_edit.py "
            "-unsetnodata %s), and if they are unlabelled, map the value to ignore (%d=ignore)",
            path, nodata, name, hidden, name, path, nodata)
    else:
        log.warning(
            "%s: the label raster's nodata value %d is the value of class %s, so its %d "
            "pixel(s) of that value are read as unlabelled and teach nothing; if they are "
            "%s labels, unset the nodata value (gdal_edit.py -unsetnodata %s) or write the "
            "raster with another nodata value (255 = unlabelled)",
            path, nodata, name, hidden, name, path)


def _read_label_raster(path: Path, survey_grid: Grid, k: int,
                       image_plane: bool = False,
                       mapping: dict[int, int] | None = None,
                       names: tuple[str, ...] = (),
                       colours: dict[tuple[int, int, int], int] | None = None,
                       schema: ClassSchema | None = None) -> np.ndarray:
    """Labels of a raster on ``survey_grid``; on the image plane only the size must agree.

    ``mapping`` (label value -> class value, 255 = ignore) recodes a dataset's own codes;
    ``colours`` (``(r, g, b)`` -> class value) reads colour-coded labels instead (RGB, RGBA or
    a colour table; transparent pixels are unlabelled). ``names`` are the class names, and
    ``schema`` the classes (default: those of ``names``), for messages. The raster's nodata
    pixels are unlabelled, with or without a mapping.

    Raises:
        InputError: unreadable, not class labels (JPEG, floats), label values or colours that
            are no class nor mapped, colour-coded labels without ``colours``.
        GridMismatchError: the raster is off the image grid.
    """
    schema = schema or _schema_of(k, names)
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
        else:
            label = Grid(ds.shape, ds.transform, ds.crs or survey_grid.crs)
            if image_plane or ds.crs is None or ds.crs != survey_grid.crs \
                    or ds.shape != survey_grid.shape_yx \
                    or _corner_offset_px(label, survey_grid) > GRID_TOLERANCE_PX:
                raise _grid_mismatch(path, label, ds.crs is None, survey_grid, image_plane)
        if colours is not None:
            return _read_colour_labels(path, ds, colours, schema)
        if ds.count in (3, 4) and ds.driver != "JPEG" and all(d == "uint8" for d in ds.dtypes):
            raise _colour_labels_error(path, ds, schema)
        check_class_raster(path, ds, "label raster")
        labels = ds.read(1)
        nodata = ds.nodata
    hidden = labels == nodata if nodata is not None else np.zeros(labels.shape, bool)
    # The nodata value as a label value (-1 of an int16 raster too); None when no label can
    # hold it (a float nodata of an integer raster).
    code = int(nodata) if nodata is not None and float(nodata).is_integer() else None
    if mapping:
        # 255 stays unlabelled unless the mapping says otherwise; the raster's nodata always
        # does, as without a mapping: a mapping "0=soil" of a raster of nodata 0 trained every
        # unlabelled pixel as soil.
        out, stray = map_values(labels, {IGNORE: IGNORE, **mapping}, IGNORE)
        out[hidden] = IGNORE
        if code is not None:
            stray = stray[stray != code]
        if stray.size:
            example = example_mapping(mapping, stray[:MAX_LABELS].tolist(), schema)
            raise InputError(
                f"{path}: label values {stray[:10].tolist()} are not in label_classes; add "
                f"them (VALUE=CLASS, or VALUE=ignore), e.g. label_classes: \"{example}\""
            )
        target = mapping.get(code, IGNORE) if code is not None else IGNORE
        if code is not None and target != IGNORE and hidden.any():
            name = names[target] if target < len(names) else str(target)
            _warn_nodata_class(path, code, name, int(hidden.sum()), mapped=True)
        return out.astype(np.uint8)
    out = labels.astype(np.int64)
    if nodata is not None:
        if code is not None and code != IGNORE and 0 <= code < k and hidden.any():
            name = names[code] if code < len(names) else str(code)
            _warn_nodata_class(path, code, name, int(hidden.sum()), mapped=False)
        out[hidden] = IGNORE
    bad = non_class_values(out, k, IGNORE)
    if bad.size:
        raise _unknown_values_error(path, out, bad, schema, code)
    _warn_of_binary_mask(path, out, schema, code)
    return out.astype(np.uint8)


def _schema_of(k: int, names: tuple[str, ...]) -> ClassSchema:
    """The classes of ``k`` values named ``names`` (unnamed: the default classes), for messages."""
    if names in ((), DEFAULT_CLASSES.names) and k == len(DEFAULT_CLASSES):
        return DEFAULT_CLASSES
    return ClassSchema(tuple(SegClass(i, names[i] if i < len(names) else f"class{i}", (0, 0, 0))
                             for i in range(k)))


def _choices(schema: ClassSchema) -> str:
    return ", ".join([*schema.names, "ignore"])


def _unknown_values_error(path: Path, out: np.ndarray, bad: np.ndarray, schema: ClassSchema,
                          nodata: int | None) -> InputError:
    """The error for label values that are no class: a ``label_classes:`` of those found."""
    k = len(schema)
    if bad.size > MAX_LABELS:
        return InputError(
            f"{path}: holds {bad.size} values that are not classes 0..{k - 1} ({bad.min()}.."
            f"{bad.max()} among them): it looks like a continuous raster (an image band, an "
            "index, a confidence), not class labels; give a raster of class values (255 = "
            "unlabelled, others mapped with `label_classes:`)")
    present = [int(v) for v in np.unique(out) if v != IGNORE]
    # Built from the values found, as evaluate's hint: 0/128 is "0=soil,128=crop", not a
    # 10/20/30 example to translate.
    coded = [v for v in present if v != 0]
    note = ""
    if len(present) == k + 1 and coded != present and not any(0 < v < k for v in coded):
        # A class code each, and 0 beside them: 0 is the unlabelled background (10..40 and
        # 0 were asked for as "0=soil,1=crop,...,10=ignore", the codes ignored).
        example = ",".join([*(f"{v}={n}" for v, n in zip(coded, schema.names, strict=True)),
                            "0=ignore"])
    else:
        note = ""
        top = int((out == IGNORE).sum())
        if top and nodata != IGNORE:
            share = f"{IGNORE} ({100 * top / out.size:.3g} % of the pixels)"
            # Grey levels (0/128/255, 0/85/170/255): 255 the last class, as evaluate reads them.
            grey = top_as_grey_level(present, k, top / out.size) \
                if top >= TOP_SHARE * out.size else None
            if grey is not None:
                present, note = grey
            else:
                cls = schema.names[len(present)] if len(present) < k else "CLASS"
                note = f"; {share} is read as unlabelled (if it is a class, map it too: " \
                       f"{IGNORE}={cls})"
        example = example_mapping(None, bad.tolist(), schema, present, nodata is not None)
    head, _, rest = example.partition(" (")
    return InputError(
        f"{path}: label values {bad[:10].tolist()} are not classes 0..{k - 1} (255 = "
        "unlabelled); say what each value is with `label_classes:` in its data entry "
        f"(VALUE=CLASS,..., CLASS one of {_choices(schema)}), e.g. label_classes: "
        f"\"{head}\"{' (' + rest if rest else ''}{note}")


def _role_name(schema: ClassSchema, role: str) -> str:
    """The name of the class playing ``role``, else the last class's (for examples)."""
    c = schema.by_role(role)
    return c.name if c else schema.names[-1]


def _warn_of_binary_mask(path: Path, out: np.ndarray, schema: ClassSchema,
                         nodata: int | None) -> None:
    """Warn of a mask of one class value and 255, read without ``label_classes``.

    255 is unlabelled, so a 0/255 weed mask (Agriculture-Vision style) trained soil only,
    with just a note at the end that the other classes had no pixel. It is a warning, not
    an error: a tile of a dataset coded as documented (0..3, 255 unlabelled) may hold only
    soil and unlabelled pixels. A declared nodata of 255 says the 255 pixels are unlabelled
    on purpose, so it passes silently.
    """
    if nodata == IGNORE:
        return
    seen = np.flatnonzero(np.bincount(out.ravel(), minlength=IGNORE + 1))
    if len(seen) != 2 or seen[1] != IGNORE:
        return
    low = int(seen[0])
    positive = _role_name(schema, "weed")
    background = schema.names[low]
    if background == positive:
        background = schema.names[0] if schema.names[0] != positive else schema.names[-1]
    log.warning(
        "%s: holds only values %d and %d (a binary mask?), and %d is read as unlabelled, so it "
        "labels %s only; if %d is a class, say so with `label_classes:` in its data entry, "
        "e.g. label_classes: \"%d=%s,%d=%s\" (to train just these two classes, list them "
        "under `classes:`, see README, Training your own model)",
        path, low, IGNORE, IGNORE, schema.names[low], IGNORE, low, background, IGNORE,
        positive)


def _strips(ds: rasterio.DatasetReader) -> Iterator[Window]:
    """Row strips of ``ds`` of about 4 M pixels: a colour image is read as int64 codes."""
    rows = max(1, (1 << 22) // max(1, ds.width))
    for y in range(0, ds.height, rows):
        yield Window(0, y, ds.width, min(rows, ds.height - y))


def _rgb(code: int) -> str:
    return f"{code >> 16},{(code >> 8) & 255},{code & 255}"


def _read_colour_labels(path: Path, ds: rasterio.DatasetReader,
                        colours: dict[tuple[int, int, int], int],
                        schema: ClassSchema) -> np.ndarray:
    """Class values of colour-coded labels, as ``evaluate --truth-colors`` reads a truth."""
    refuse_jpeg(path, ds, "label image")
    try:
        palette = colour_codes(path, ds)
    except InputError as exc:
        raise InputError(
            f"{path}: label_colors needs colour-coded labels (3 or 4 bands of 8-bit RGB(A), or "
            f"one band with a colour table), not {ds.count} band(s) of {ds.dtypes[0]}; give "
            "class values with label_classes: instead") from exc
    codes = {(r << 16) | (g << 8) | b: v for (r, g, b), v in colours.items()}
    out = np.full(ds.shape, IGNORE, np.uint8)
    unmapped: Counter[int] = Counter()
    for window in _strips(ds):
        rows = slice(window.row_off, window.row_off + window.height)
        cls = colour_classes(read_colour_codes(ds, window, palette), codes, IGNORE, unmapped)
        out[rows] = cls.astype(np.uint8)
    if unmapped:
        first = ", ".join(f"{_rgb(c)} ({n} px)" for c, n in unmapped.most_common(5))
        more = f" and {len(unmapped) - 5} more" if len(unmapped) > 5 else ""
        names = {c.value: c.name for c in schema.classes} | {IGNORE: "ignore"}
        given = [f"{r},{g},{b}={names[v]}" for (r, g, b), v in colours.items()]
        example = ";".join(given + [f"{_rgb(c)}=ignore" for c, _ in unmapped.most_common(5)])
        raise InputError(
            f"{path}: holds colours that label_colors does not name: {first}{more}; add each "
            f"as R,G,B=CLASS (CLASS one of {_choices(schema)}), e.g. label_colors: "
            f"\"{example}\"")
    return out


#: Colours of colour-coded labels named in the error that asks for ``label_colors:``.
EXAMPLE_COLOURS = 5


def _colour_labels_error(path: Path, ds: rasterio.DatasetReader,
                         schema: ClassSchema) -> InputError:
    """The error for colour-coded labels given without ``label_colors:``.

    Its example ``label_colors:`` holds the most frequent colours of the file.
    """
    counts: Counter[int] = Counter()
    for window in _strips(ds):
        colour_classes(read_colour_codes(ds, window, None), {}, IGNORE, counts)
    bands = f"{ds.count} bands ({'RGBA' if ds.count == 4 else 'RGB'})"
    if len(counts) >= MAX_COLOURS:
        return InputError(
            f"{path}: has {bands} of {len(counts)}+ distinct colours: it looks like a photo "
            "(the image itself?), not labels; the label raster must be a single-band raster of "
            "class values (255 = unlabelled), or colour-coded labels named with `label_colors:`")
    top = [c for c, _ in counts.most_common(EXAMPLE_COLOURS)]
    found = ", ".join(f"{_rgb(c)} ({counts[c]} px)" for c in top)
    more = f" and {len(counts) - len(top)} more" if len(counts) > len(top) else ""
    example = ";".join(f"{_rgb(c)}={_guess_colour(c, schema)}" for c in top)
    return InputError(
        f"{path}: has {bands}; the label raster must be a single-band raster of class values, "
        "or colour-coded labels whose colours `label_colors:` in its data entry names (R,G,B="
        f"CLASS pairs separated by ';', CLASS one of {_choices(schema)}; transparent pixels "
        f"are unlabelled). Its most frequent colours are {found or 'none (all transparent)'}"
        f"{more}; e.g. label_colors: \"{example}\" (check the class of each colour)")


def _guess_colour(code: int, schema: ClassSchema) -> str:
    """A class for a label colour, for examples: a class of that colour, else by its hue.

    Black is the background (soil) and green the crop and red the weed of WeedMap, CWFID
    and most weed datasets; what is no such colour is left to the user to name.
    """
    rgb = (code >> 16, (code >> 8) & 255, code & 255)
    for c in schema.classes:
        if tuple(c.color) == rgb:
            return c.name
    r, g, b = rgb
    role = ("soil" if max(rgb) < 64 else "crop" if g > 2 * max(r, b) else
            "weed" if r > 2 * max(g, b) else None)
    cls = schema.by_role(role) if role else None
    return cls.name if cls else "CLASS"


def rasterize_polygons(
    path: Path, column: str, layer: str | None, grid: object, schema: ClassSchema,
    names: dict[str, int] | None = None,
) -> np.ndarray:
    """Burn labelled polygons onto ``grid`` (255 outside every polygon).

    The class column holds class names (case-insensitive) or values; ``names`` (the polygons'
    ``label_classes:``, see :func:`agriseg.train.config.parse_name_classes`) says what other
    names or codes are, keyed by :func:`agriseg.train.config.name_key`; those mapped to ignore
    are left unlabelled.

    Raises:
        VectorError: unreadable file, missing column (lists the columns), class names or
            values that are no class nor in ``names`` (all of them, with a ``label_classes:``
            that names them).
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
    # Every name that is no class, counted, so that one error names them all (the first
    # unknown name alone made a fix-and-rerun loop of a dataset's several names).
    unknown: Counter[str] = Counter()
    spelled: dict[str, str] = {}
    seen: set[str] = set()
    for geom, raw in zip(gdf.geometry, gdf[column], strict=True):
        if raw is None or (isinstance(raw, float) and math.isnan(raw)):
            continue
        if isinstance(raw, np.generic):
            raw = raw.item()
        if isinstance(raw, float) and not raw.is_integer():  # int() truncated 1.7 to 1
            raise VectorError(f"{path}: column {column!r} holds {raw}, not a class value; "
                              f"valid values 0..{len(schema) - 1} ({', '.join(schema.names)})")
        key = name_key(raw)
        seen.add(key)
        value = _polygon_class(key, schema, names)
        if value is None:
            unknown[key] += 1
            # Codes as their key: a float column's 10.0 is asked for as 10.
            spelled.setdefault(key, key if key.lstrip("-").isdigit() else str(raw).strip())
        elif value != IGNORE:
            shapes.append((geom, value))
    if unknown:
        raise _unknown_names_error(path, column, unknown, spelled, schema, names, seen)
    h, w = grid.shape_yx  # type: ignore[attr-defined]
    if not shapes:
        ignored = " or mapped to ignore" if names and IGNORE in names.values() else ""
        raise VectorError(f"{path}: no labelled polygons (column {column!r} is empty{ignored})")
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


def _polygon_class(key: str, schema: ClassSchema, names: dict[str, int] | None) -> int | None:
    """The class value (or 255, ignore) of a class-column value keyed ``key``; None: unknown.

    ``names`` first; then class names, which need not be listed; then class values 0..K-1,
    unless ``names`` gives codes (a dataset's 1..4 would be shifted silently otherwise).
    """
    if names and key in names:
        return names[key]
    for c in schema.classes:
        if c.name.lower() == key:
            return c.value
    numeric = key.lstrip("-").isdigit()
    if numeric and 0 <= int(key) < len(schema) and not names:
        return int(key)
    return None


#: Class-column values of a polygon file named in the error that asks for label_classes.
MAX_NAMES = 20


def _unknown_names_error(path: Path, column: str, unknown: Counter[str],
                         spelled: dict[str, str], schema: ClassSchema,
                         names: dict[str, int] | None, seen: set[str]) -> VectorError:
    """The error for class-column values that are no class.

    It names all of them, with counts, and a ``label_classes:`` line that names each
    (classes guessed from the names), keeping the given names that some polygon holds; the
    given names that none holds are said to be so (a misspelt "Sugar bet" was copied into
    the example beside the "Sugar beet" it missed).
    """
    found = ", ".join(f"{spelled[key]!r} ({n} polygon{'s' if n > 1 else ''})"
                      for key, n in unknown.most_common(MAX_NAMES))
    more = f" and {len(unknown) - MAX_NAMES} more" if len(unknown) > MAX_NAMES else ""
    by_value = {c.value: c.name for c in schema.classes} | {IGNORE: "ignore"}
    given = [f"{key}={by_value[v]}" for key, v in (names or {}).items() if key in seen]
    stray = [key for key in (names or {}) if key not in seen]
    strays = (f"; label_classes names {', '.join(map(repr, stray))}, which no polygon holds "
              "(misspelt?)" if stray else "")
    codes = sorted((k for k in unknown if k.lstrip("-").isdigit()), key=int)
    # Codes as the classes in order (10/20/30: soil, crop, weed), names by what they say.
    guess = dict(zip(codes, schema.names, strict=False))
    pairs = [f"{spelled[key]}={guess.get(key) or _guess_name(key, schema)}"
             for key, _ in unknown.most_common(MAX_NAMES)]
    which = "not classes" + (" nor in label_classes" if names else "")
    return VectorError(
        f"{path}: column {column!r} holds values that are {which} ({', '.join(schema.names)}): "
        f"{found}{more}{strays}; say what each is with `label_classes:` in its data entry "
        f"(NAME=CLASS pairs separated by ',', CLASS one of {_choices(schema)}; names match "
        f"case-insensitively), e.g. label_classes: \"{','.join(given + pairs)}\" (guessed "
        "from the names: check each), or train classes of your own, listed under `classes:` "
        "(see README, Training your own model)")


def _guess_name(key: str, schema: ClassSchema) -> str:
    """A class for a dataset's class name, for examples: what the words say, else crop.

    Plants other than weeds ("sugar beet", "maize") are the crop of most datasets.
    """
    words = set(key.replace("_", " ").replace("-", " ").split())
    if words & {"unlabeled", "unlabelled", "unknown", "void", "none", "ignore", "nodata"}:
        return "ignore"
    role = ("weed" if any("weed" in w for w in words) else
            "disease" if words & {"disease", "diseased", "blight", "rust", "mildew", "rot",
                                  "infected", "lesion"} else
            "soil" if words & {"background", "bg", "soil", "ground", "bare", "dirt", "earth",
                               "road", "path"} else "crop")
    c = schema.by_role(role)
    return c.name if c else "CLASS"


#: Random draws of validation blocks compared when labels cover only part of an image.
SPLIT_DRAWS = 64


def block_split(shape: tuple[int, int], block: int, fraction: float, seed: int,
                labels: np.ndarray | None = None) -> np.ndarray:
    """Validation mask made of whole ``block`` squares, about ``fraction`` of the blocks.

    With ``labels``, only blocks that hold labelled pixels are candidates (``fraction`` is of
    them), and training keeps at least one of them. Where every block holds labels the split
    is the one drawn without ``labels``; where some do not (partial rasters, polygons), of
    :data:`SPLIT_DRAWS` draws the first that leaves training the most classes, then puts the
    most classes in both parts, is taken, with fewer validation blocks (down to none) while
    every draw leaves training short of a class. Deterministic with ``seed``.
    """
    ny, nx = math.ceil(shape[0] / block), math.ceil(shape[1] / block)
    present = None if labels is None else _block_classes(labels, block, ny, nx)
    return _split(shape, block, fraction, seed, present)


def _split(shape: tuple[int, int], block: int, fraction: float, seed: int,
           present: np.ndarray | None) -> np.ndarray:
    """:func:`block_split` given which label values each block holds (or None)."""
    h, w = shape
    ny, nx = math.ceil(h / block), math.ceil(w / block)
    n = ny * nx
    rng = np.random.default_rng(seed)
    candidates = np.arange(n) if present is None else np.flatnonzero(present.any(1))
    m = candidates.size
    n_val = round(m * fraction)
    if fraction > 0 and m > 1:
        n_val = min(max(n_val, 1), m - 1)
    elif m == 1 and present is not None:
        n_val = 0  # the only labelled block trains (a fraction over 0.5 took it away)
    chosen = np.zeros(n, bool)
    if present is None or m == n:
        # Every block labelled: the split of agriseg before labels were looked at, so that
        # trainings on fully labelled rasters keep their validation blocks.
        chosen[rng.permutation(n)[:n_val]] = True
    else:
        classes = int(present.any(0).sum())
        # Fewer validation blocks when every draw takes a class out of training (two
        # labelled blocks, each with a class of its own): what is not trained is not learnt.
        for k in range(n_val, 0, -1):
            best: tuple[int, int] | None = None
            for _ in range(SPLIT_DRAWS):
                pick = np.zeros(n, bool)
                pick[rng.permutation(candidates)[:k]] = True
                val, train = present[pick].any(0), present[~pick].any(0)
                score = (int(train.sum()), int((val & train).sum()))
                if best is None or score > best:
                    best, chosen = score, pick
            if best is not None and best[0] == classes:
                break
            chosen = np.zeros(n, bool)
    grid = chosen.reshape(ny, nx)
    return np.kron(grid, np.ones((block, block), bool))[:h, :w].astype(bool)


def _block_classes(labels: np.ndarray, block: int, ny: int, nx: int) -> np.ndarray:
    """Which label values each ``block`` square holds: bool ``(blocks, 255)``, row-major."""
    present = np.zeros((ny * nx, IGNORE), bool)
    for by in range(ny):
        # A row of blocks at a time: the whole raster's labelled positions were two int64
        # arrays of its size (1.6 GB for 100 MP of labels).
        strip = labels[by * block:(by + 1) * block]
        rows, cols = np.nonzero(strip != IGNORE)
        present[by * nx + cols // block, strip[rows, cols]] = True
    return present


@contextmanager
def _named_as(vrt: str, image: Path) -> Iterator[None]:
    """Name ``image`` instead of its temporary ``vrt`` in raster messages and errors.

    An image given with ``gsd:`` is read through a VRT in a temporary folder; its log lines
    and errors named /tmp/agriseg-image-xxxx/image.vrt, a file the user never saw.
    """
    name = os.fspath(image)

    class _Rename(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            text = record.getMessage()
            if vrt in text:
                record.msg, record.args = text.replace(vrt, name), ()
            return True

    raster_log = logging.getLogger("agriseg.raster")
    rename = _Rename()
    raster_log.addFilter(rename)
    try:
        yield
    except AgrisegError as exc:
        if vrt not in str(exc):
            raise
        raise type(exc)(str(exc).replace(vrt, name)) from exc
    finally:
        raster_log.removeFilter(rename)


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
    label_colors: dict[tuple[int, int, int], int] | None = None,
) -> LabelledImage:
    """Read an image whole and attach labels (raster path or array on its grid).

    With ``gsd`` the image has no CRS (a PNG or JPEG tile of a labelled dataset): it is read on
    the image plane (see :func:`agriseg.raster.image_vrt`), and its label image only has to
    have the same size. Validation blocks are chosen among the blocks that hold labels (see
    :func:`block_split`). ``label_classes`` recodes a label raster's values, ``label_colors``
    reads colour-coded labels (see :func:`_read_label_raster`).

    Raises:
        BandError: the image lacks a band role of the model.
        GridMismatchError: a label raster is on another grid.
    """
    with tempfile.TemporaryDirectory(prefix="agriseg-image-") as tmp:
        src = image if gsd is None else image_vrt(image, Path(tmp) / "image.vrt", gsd)
        with _named_as(os.fspath(src), image) if gsd is not None else nullcontext():
            survey = open_survey(src, bands)
            survey.require(roles, "the training config", name_bands="bands: in its data entry",
                           otherwise="remove this image from data: or drop the missing roles "
                                     "from the config's bands:")
            h, w = survey.grid.shape_yx
            pixels, valid = read_window(survey, roles, Window(0, 0, w, h))
    lab = labels if isinstance(labels, np.ndarray) else _read_label_raster(
        labels, survey.grid, len(schema), image_plane=gsd is not None, mapping=label_classes,
        names=schema.names, colours=label_colors, schema=schema,
    )
    lab = lab.copy()
    labelled = lab != IGNORE
    lab[~valid] = IGNORE
    if not (lab != IGNORE).any():
        # Named here: the sampler could only say that no pixel was labelled at all.
        why = ("every labelled pixel lies on the image's nodata (alpha 0, nodata value)"
               if labelled.any() else "the labels hold no class pixel")
        raise InputError(f"{image}: {why}; check that the labels belong to this image")
    ny, nx = math.ceil(h / val_block), math.ceil(w / val_block)
    present = _block_classes(lab, val_block, ny, nx)
    val = _split((h, w), val_block, val_fraction, seed, present)
    held = int(present.any(1).sum())
    if held < ny * nx:
        chosen = int(val[::val_block, ::val_block].sum())
        log.info("%s: %d of its %d validation-size blocks (%d px) %s labels; %d of them %s",
                 image, held, ny * nx, val_block, "holds" if held == 1 else "hold", chosen,
                 "is a validation block" if chosen == 1 else "are validation blocks")
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
