"""Block writers for tile results and finalisation into Cloud-Optimized GeoTIFFs.

One process (the client) owns every output file: workers return arrays, the
:class:`TileWriter` puts each core into a block-aligned tiled GeoTIFF as it arrives, so memory
is bounded by the tiles in flight, and writes each tile's first overview level (2 x 2 cells,
made by the workers with :func:`halve`) beside it as GDAL's external ``.ovr``.
:func:`finalize_cog` then builds the smaller levels from that, copies the working file
through GDAL's COG driver (layout) and renames it into place, so a half-written output never
carries its final name.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import numpy as np
import numpy.typing as npt
import rasterio
import rasterio.shutil
from affine import Affine
from rasterio._err import CPLE_BaseError
from rasterio.enums import Resampling
from rasterio.errors import RasterioError
from rasterio.windows import Window

from agriseg.classes import ClassSchema
from agriseg.errors import OutputError
from agriseg.grid import Tile, TilePlan, block_size_for
from agriseg.raster import gdal_reason

log = logging.getLogger(__name__)

#: What GDAL raises through rasterio: writes (disk full) raise CPLE errors, which are no
#: RasterioError, and a "No space left" escaped as a traceback.
GDAL_ERRORS = (RasterioError, CPLE_BaseError)

MAX_PENDING_TILES = 4
"""Tiles whose writes may still be queued (bounds the writer's memory)."""


@dataclass(frozen=True, slots=True)
class OutputSpec:
    """One raster output of a run.

    Attributes:
        name: file stem (``classes`` -> ``classes.tif``); may contain a sub-folder.
        dtype: numpy dtype name.
        nodata: nodata value written where the input is nodata.
        resampling: GDAL overview resampling (``NEAREST`` or ``MODE`` for classes).
        description: band description.
    """

    name: str
    dtype: str
    nodata: float
    resampling: str
    description: str


def _gtiff_profile(plan: TilePlan, spec: OutputSpec, half: bool = False) -> dict[str, object]:
    """Working GeoTIFF of ``spec`` on the plan's grid, or on its first overview level."""
    g = plan.grid
    width, height, transform, block = g.width, g.height, g.transform, plan.block_size
    if half:
        width, height = (width + 1) // 2, (height + 1) // 2
        transform = transform @ Affine.scale(2)
        block = block_size_for(plan.tile_size // 2)
    return {
        "driver": "GTiff",
        "width": width,
        "height": height,
        "count": 1,
        "dtype": spec.dtype,
        "crs": g.crs,
        "transform": transform,
        "nodata": spec.nodata,
        "tiled": True,
        "blockxsize": block,
        "blockysize": block,
        "bigtiff": "IF_SAFER",
        "sparse_ok": True,
        **_working_codec(spec.dtype),
    }


def halve(arr: np.ndarray, nodata: float, resampling: str) -> np.ndarray:
    """The first overview level (factor 2, sizes rounded up) of a tile core, as GDAL makes it.

    ``NEAREST`` keeps the even rows and columns; ``AVERAGE`` is the mean of the valid pixels
    of each 2 x 2 cell (integers rounded half up, as GDAL rounds), nodata where none is valid.
    Cores start on even pixels (tile sizes are multiples of 32), so tiles halve independently.
    On odd sizes the last cell is partial (its pixels' own mean), where GDAL's builder would
    resample the whole row by ``width / ceil(width / 2)``: less than a pixel apart at the far
    edge of the overview.
    """
    if resampling == "NEAREST":
        return np.ascontiguousarray(arr[::2, ::2])
    h, w = arr.shape
    if h % 2 or w % 2:
        pad = np.full((h + h % 2, w + w % 2), nodata, arr.dtype)
        pad[:h, :w] = arr
        arr = pad
    cells = [arr[i::2, j::2] for i in (0, 1) for j in (0, 1)]
    if arr.dtype.kind == "f":
        bad_f = np.isnan(arr) if np.isnan(nodata) else arr == nodata
        if bad_f.any():
            return _masked_mean(np.stack(cells), nodata).astype(arr.dtype)
        # Float outputs are written within FLOAT_MAX_ERROR, so their mean need not be
        # GDAL's float64 one to the last bit: four strided float32 passes.
        mean = cells[0] + cells[1]
        mean += cells[2]
        mean += cells[3]
        mean *= np.float32(0.25)
        return mean
    # Integers: the sum of all four, less nodata times the nodata count, in 16-bit for bytes
    # (a few strided passes, in the tile tasks or the writer threads).
    wide: type[np.integer[Any]] = np.uint16 if arr.dtype.itemsize == 1 else np.int64
    total: npt.NDArray[np.integer[Any]] = cells[0].astype(wide)
    for c in cells[1:]:
        np.add(total, c, out=total)
    bad = arr == nodata
    if not bad.any():
        np.add(total, 2, out=total)
        return (total // 4).astype(arr.dtype)
    n_bad: npt.NDArray[np.integer[Any]] = np.zeros(total.shape, wide)
    for i in (0, 1):
        for j in (0, 1):
            np.add(n_bad, bad[i::2, j::2], out=n_bad)
    np.subtract(total, n_bad * wide(int(nodata)), out=total)
    count = 4 - n_bad
    none = count == 0
    np.maximum(count, 1, out=count)
    np.add(total, count // 2, out=total)
    out = (total // count).astype(arr.dtype)
    out[none] = nodata
    return out


def _masked_mean(stack: np.ndarray, nodata: float) -> np.ndarray:
    """Mean over axis 0 of the values that are not ``nodata`` (NaN too), in float64."""
    valid = ~np.isnan(stack) if np.isnan(nodata) else stack != nodata
    n = valid.sum(axis=0)
    out = np.where(valid, stack, 0).sum(axis=0, dtype=np.float64) / np.maximum(n, 1)
    out[n == 0] = nodata
    return out


def _working_codec(dtype: str) -> dict[str, object]:
    """Compression of a working file (temporary; the single writer must keep up).

    The writer reopens its files in update mode after each checkpoint, where GDAL ignores the
    creation's ZSTD_LEVEL and DEFLATE's ZLEVEL (measured, GDAL 3.10): a 2.4 MP class tile plus
    its confidence tile then cost ~75 ms to encode as ZSTD or DEFLATE, LZW 35 ms, PACKBITS
    7 ms, uncompressed 5 ms. Masks: PACKBITS (run-length, ~7x smaller than raw on class and
    confidence masks, 1.4x the size of ZSTD), so the writer keeps up with the label-free
    workers. Floats (index rasters): none; noisy float32 shrinks ~10 % under ZSTD at ~100 ms
    per MP and index. Nodata blocks are still left out (SPARSE_OK).
    """
    if np.dtype(dtype).kind == "f":
        return {"compress": "none"}
    return {"compress": "packbits"}


def disk_estimate(specs: list[OutputSpec], pixels: int) -> int:
    """Bytes of disk that the working files and COGs of ``specs`` take at most, at the end.

    Per valid pixel: the working file with its first overview level (1.25x raw: floats are
    written uncompressed, and PACKBITS never grows a mask much) plus the COG. Float32 index
    COGs took ~1.1 B per pixel on the real samples and the benchmark raster (1.5 B counted),
    mask COGs 0.06-0.15 B (0.5 B counted).
    """
    total = 0.0
    for spec in specs:
        dt = np.dtype(spec.dtype)
        total += dt.itemsize * (1.25 + (0.375 if dt.kind == "f" else 0.5))
    return int(total * pixels)


class TileWriter:
    """Writes tile cores of several outputs into working GeoTIFFs.

    Files are opened once and kept open; :meth:`sync` closes and reopens them so that all
    written blocks are durable on disk (used by the resume checkpoint). Writes run in the
    background, one thread per file (each output and its first overview level): each file
    is written in order, different files at the same time, while the caller gathers the next
    tiles. On a GPU the writer bounds the tile stream: in the caller's thread it spent ~13 of
    a 1 GP run's 24 s of tiles encoding and counting; on one thread per output, that thread
    was busy ~80 % of the tiles (core 70 %, overview level 30 %) while the caller waited for
    it. At most :data:`MAX_PENDING_TILES` tiles wait to be written.
    """

    def __init__(
        self,
        plan: TilePlan,
        specs: list[OutputSpec],
        work_dir: Path,
        schema: ClassSchema | None = None,
        resume: bool = False,
    ) -> None:
        self.plan = plan
        self.specs = {s.name: s for s in specs}
        self.work_dir = work_dir
        self.schema = schema
        self._open: dict[str, rasterio.io.DatasetWriter] = {}
        # The first overview level of each output, written beside it as GDAL's external
        # overview file (``.ovr``) while the tiles arrive: GDAL would otherwise read the whole
        # output back to make it at the end (at 1 GP: 1.4 s for the class mask, 4.5 s for the
        # confidence's averages, single-threaded), and builds only the smaller levels now.
        self._half: dict[str, rasterio.io.DatasetWriter] = {}
        #: Outputs whose first overview level is written: name -> (nodata, resampling), for
        #: callers that halve the cores themselves (:func:`halve`).
        self.halving: dict[str, tuple[float, str]] = {}
        # One thread per file: (output name, False) for the output, (name, True) for its
        # first overview level (a file of its own, so the two write at the same time).
        self._threads: dict[tuple[str, bool], ThreadPoolExecutor] = {}
        self._pending: deque[list[Future[None]]] = deque()
        self._failed = False
        # Pixels per value of the "classes" output, counted as tiles arrive (reading the
        # finished 1 GP mask back to count it took 4.2 s after everything else). Unknown
        # when resuming: tiles of the earlier run were not seen.
        self.class_values: np.ndarray | None = None if resume else np.zeros(256, np.int64)
        g = plan.grid
        halvable = bool(cog_overview_factors(g.width, g.height)) and plan.tile_size % 32 == 0
        for spec in specs:
            path = self.path(spec.name)
            path.parent.mkdir(parents=True, exist_ok=True)
            half = halvable and spec.resampling in ("NEAREST", "AVERAGE")
            fresh = not (resume and path.exists())
            if fresh:
                self._create(spec, path)
                if half:
                    self._create(spec, overview_file(path), half=True)
            if half and overview_file(path).exists():
                # A resumed run keeps the level only if the interrupted one wrote it.
                self.halving[spec.name] = (spec.nodata, spec.resampling)
        self._reopen()

    def path(self, name: str) -> Path:
        """Working file of output ``name``."""
        return self.work_dir / f"{name}.work.tif"

    def _create(self, spec: OutputSpec, path: Path, half: bool = False) -> None:
        try:
            with rasterio.open(path, "w", **_gtiff_profile(self.plan, spec, half)) as dst:
                dst.set_band_description(1, spec.description)
                if spec.name == "classes" and self.schema is not None:
                    dst.write_colormap(1, self.schema.colormap())
        except GDAL_ERRORS as exc:
            raise OutputError(f"{path}: cannot create working raster ({gdal_reason(exc)})") from exc

    def _reopen(self) -> None:
        for name in self.specs:
            paths = [(self._open, self.path(name))]
            if name in self.halving:
                paths.append((self._half, overview_file(self.path(name))))
            for store, path in paths:
                try:
                    store[name] = rasterio.open(path, "r+")
                except (*GDAL_ERRORS, TypeError) as exc:
                    # TypeError: "not recognized as being in a supported file format", a
                    # working file whose header a full disk cut short.
                    raise OutputError(
                        f"{path}: cannot open working raster for update ({gdal_reason(exc)}); "
                        "is the disk full? Free space and rerun to resume, or rerun with "
                        "--overwrite to start over"
                    ) from exc

    def write(
        self,
        tile: Tile,
        arrays: Mapping[str, np.ndarray],
        class_counts: np.ndarray | None = None,
        halves: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        """Queue the core arrays of ``tile`` (each ``(h, w)`` of the core window) for writing.

        Args:
            tile: the tile.
            arrays: output name -> core array.
            class_counts: pixels per value of ``arrays["classes"]`` when the caller has
                counted them already (the workers do, in parallel).
            halves: output name -> first overview level of its core (:func:`halve` with the
                output's :attr:`halving`) when the caller made it; the writer halves the rest.

        Raises:
            OutputError: an earlier tile's write failed (disk full).
        """
        if "classes" in arrays and self.class_values is not None:
            self.class_values += (class_counts if class_counts is not None else
                                  np.bincount(arrays["classes"].ravel(), minlength=256))
        futures = []
        for name, arr in arrays.items():
            futures.append(self._thread(name, False).submit(self._write_core, name, tile, arr))
            if name in self._half:
                half = halves.get(name) if halves else None
                futures.append(self._thread(name, True).submit(
                    self._write_half, name, tile, arr, half))
        self._pending.append(futures)
        while len(self._pending) > MAX_PENDING_TILES:
            self._wait(self._pending.popleft())

    def _thread(self, name: str, half: bool) -> ThreadPoolExecutor:
        pool = self._threads.get((name, half))
        if pool is None:
            pool = self._threads[name, half] = ThreadPoolExecutor(
                1, thread_name_prefix="agriseg-write")
        return pool

    def _write_core(self, name: str, tile: Tile, arr: np.ndarray) -> None:
        with self._write_errors(name, tile):
            self._open[name].write(arr.astype(self.specs[name].dtype, copy=False), 1,
                                   window=tile.core)

    def _write_half(self, name: str, tile: Tile, arr: np.ndarray,
                    small: np.ndarray | None) -> None:
        spec = self.specs[name]
        if small is None:
            small = halve(arr.astype(spec.dtype, copy=False), spec.nodata, spec.resampling)
        small = small.astype(spec.dtype, copy=False)
        core = tile.core
        with self._write_errors(name, tile, half=True):
            self._half[name].write(small, 1, window=Window(
                core.col_off // 2, core.row_off // 2, small.shape[1], small.shape[0]))

    @contextlib.contextmanager
    def _write_errors(self, name: str, tile: Tile, half: bool = False) -> Iterator[None]:
        path = overview_file(self.path(name)) if half else self.path(name)
        try:
            yield
        except GDAL_ERRORS as exc:
            raise OutputError(
                f"{path}: writing tile {tile.key} failed ({gdal_reason(exc)}); is "
                "the disk full? Free space and rerun the same command to resume"
            ) from exc

    def _wait(self, futures: list[Future[None]]) -> None:
        """Wait for all of ``futures``, then raise the first error among them."""
        wait(futures)
        for fut in futures:
            if fut.exception() is not None:
                # Remembered: the caller's error path syncs what it can, and a sync that
                # found nothing left to wait for recorded the failed tile as written (a
                # resume then left it empty).
                self._failed = True
            fut.result()

    def _drain(self) -> None:
        """Wait for every queued write; raise the first error once all are done."""
        everything = [f for futures in self._pending for f in futures]
        self._pending.clear()
        self._wait(everything)

    def sync(self) -> None:
        """Flush every file to disk by closing and reopening it.

        Raises:
            OutputError: a write failed since the writer was made: the tiles queued since the
                last sync are not all written, so none may be recorded as done.
        """
        self.close()
        if self._failed:
            raise OutputError("a tile write failed earlier: the tiles since the last "
                              "checkpoint are written again when the run resumes")
        self._reopen()

    def close(self) -> None:
        """Finish the queued writes and close all working files."""
        try:
            self._drain()
        finally:
            for pool in self._threads.values():
                pool.shutdown()
            self._threads.clear()
            errors = []
            for ds in [*self._open.values(), *self._half.values()]:
                try:
                    ds.close()
                except GDAL_ERRORS as exc:
                    errors.append(f"{ds.name}: {gdal_reason(exc)}")
            self._open.clear()
            self._half.clear()
            if errors:
                raise OutputError(
                    "closing working rasters failed (disk full?): " + "; ".join(errors)
                )


def _aux_xml_categories(schema: ClassSchema) -> str:
    names = {c.value: c.name for c in schema.classes}
    cats = "".join(
        f"      <Category>{escape(names.get(v, ''))}</Category>\n"
        for v in range(max(names) + 1)
    )
    rows = "".join(
        f'      <Row index="{i}"><F>{c.value}</F><F>{escape(c.name)}</F>'
        f"<F>{c.color[0]}</F><F>{c.color[1]}</F><F>{c.color[2]}</F><F>255</F></Row>\n"
        for i, c in enumerate(schema.classes)
    )
    cols = "".join(
        f'      <FieldDefn index="{i}"><Name>{n}</Name><Type>{t}</Type><Usage>{u}</Usage>'
        "</FieldDefn>\n"
        for i, (n, t, u) in enumerate(
            [("value", 0, 5), ("class", 2, 2), ("red", 0, 6), ("green", 0, 7),
             ("blue", 0, 8), ("alpha", 0, 9)]
        )
    )
    return (
        "<PAMDataset>\n"
        '  <PAMRasterBand band="1">\n'
        "    <CategoryNames>\n"
        f"{cats}"
        "    </CategoryNames>\n"
        '    <GDALRasterAttributeTable tableType="thematic">\n'
        f"{cols}{rows}"
        "    </GDALRasterAttributeTable>\n"
        "  </PAMRasterBand>\n"
        "</PAMDataset>\n"
    )


# Largest absolute error of a value in a float output COG (index rasters span about -1..1,
# so this is ~1/4000 of their range, far below what cameras resolve).
FLOAT_MAX_ERROR = 0.0005


COG_BLOCK = 512


def cog_overview_factors(width: int, height: int, block: int = COG_BLOCK) -> list[int]:
    """Overview factors GDAL's COG driver makes: halve (rounding down) until one block holds it."""
    factors: list[int] = []
    side = max(width, height)
    while side > block:
        side //= 2
        factors.append(2 ** (len(factors) + 1))
    return factors


def overview_file(path: Path) -> Path:
    """GDAL's external overview file of ``path`` (read as its overviews when present)."""
    return path.with_name(path.name + ".ovr")


def _build_overviews(src: Path, spec: OutputSpec, threads: str = "ALL_CPUS") -> bool:
    """Add the COG's overviews to the working file ``src`` itself; False if none are due.

    ``threads`` is GDAL_NUM_THREADS for the build.

    The COG driver would build them in a temporary file of its own, compressed with the
    final codec: 9-11 s for a 1 GP class mask here, against 2.5 s for GDAL's overview
    builder on the working file (PACKBITS, 512 px blocks) plus 1.1 s more for the copy.
    """
    with rasterio.open(src) as ds:
        factors = cog_overview_factors(ds.width, ds.height)
    if not factors:
        return False
    ovr = overview_file(src)
    if ovr.exists():
        # The tile writer made the first level; the others are its own overviews (GDAL
        # reads the .ovr's internal overviews as the next levels).
        src, factors = ovr, factors[:-1]
        if not factors:
            return True
    floating = np.dtype(spec.dtype).kind == "f"
    # One build at a time, on all cores (GDAL_NUM_THREADS): two builds side by side contend
    # in GDAL's block cache and take longer than the two in turn (268 MP class + confidence:
    # 3.3 s side by side, 2.0 s in turn).
    with _OVERVIEW_LOCK, rasterio.Env(
        COMPRESS_OVERVIEW="NONE" if floating else "PACKBITS",
        GDAL_TIFF_OVR_BLOCKSIZE=COG_BLOCK,
        GDAL_NUM_THREADS=threads,
    ), rasterio.open(src, "r+") as ds:
        ds.build_overviews(factors, Resampling[spec.resampling.lower()])
    return True


_OVERVIEW_LOCK = threading.Lock()
_TIMINGS_LOCK = threading.Lock()


def finalize_cog(src: Path, dst: Path, spec: OutputSpec, schema: ClassSchema | None = None,
                 sparse: bool = False, timings: dict[str, float] | None = None) -> Path:
    """Copy a working GeoTIFF to a COG at ``dst`` (via a temporary name, then rename).

    Class rasters get NEAREST overviews, the colour table and category names (a
    ``.aux.xml`` sidecar, which QGIS and GDAL read). ``sparse`` leaves blocks of nodata out
    of the file (readers see nodata there): for mostly empty rasters such as zone ids, 30 %
    faster to write. ``timings`` adds the seconds spent building overviews and
    copying (``cog_overviews_s``, ``cog_copy_s``).

    Raises:
        OutputError: GDAL failed (disk full, read-only folder).
    """
    tmp = dst.with_name(f".{dst.stem}.partial.tif")
    # Class, confidence and id masks: ZSTD level 1 (GDAL >= 2.3, QGIS 3.4 and later read
    # it). Against DEFLATE level 1 (used until 2026-11-28), a 1 GP class mask was written in
    # 1.0 s instead of 1.8 s on 2 threads at a quarter of the size (18 against 68 MB), and a
    # noisy confidence mask in 1.6 s instead of 5.4 s: the copies were most of a large
    # run's finalisation. Sizes on the real samples: class masks 8 % smaller, noisy
    # confidence masks of satellite scenes up to 8 % larger. Long runs of equal values leave
    # little for a predictor to gain.
    # Float index rasters: LERC + ZSTD within FLOAT_MAX_ERROR (GDAL >= 2.4 and QGIS read it).
    # Index values are noisy floats that lossless codecs barely shrink: a 67 MP ExG raster is
    # 297 MB as lossless ZSTD and 97 MB within 0.0005, written in 1.7 s instead of 2.8 s.
    floating = np.dtype(spec.dtype).kind == "f"
    codec = ({"COMPRESS": "LERC_ZSTD", "MAX_Z_ERROR": str(FLOAT_MAX_ERROR), "LEVEL": "1"}
             if floating else {"COMPRESS": "ZSTD", "LEVEL": "1", "PREDICTOR": "NO"})
    try:
        # Mostly empty rasters (zone ids) on one thread: GDAL's threaded overview builder
        # holds whole-width chunks per thread, which for a 1 GP zone raster cost 0.08 GB more
        # at the peak for no gain in time (4.0-4.1 s against 3.8-4.6 s for the whole COG).
        t0 = time.perf_counter()
        built = _build_overviews(src, spec, "1" if sparse else "ALL_CPUS")
        t1 = time.perf_counter()
        rasterio.shutil.copy(
            src,
            tmp,
            driver="COG",
            **codec,
            BLOCKSIZE=str(COG_BLOCK),
            OVERVIEW_RESAMPLING=spec.resampling,
            OVERVIEWS="FORCE_USE_EXISTING" if built else "AUTO",
            BIGTIFF="IF_SAFER",
            NUM_THREADS="ALL_CPUS",
            SPARSE_OK="TRUE" if sparse else "FALSE",
        )
        # GDAL reports a failed write (disk full, file-size limit) on stderr only and the
        # copy returns: a cut-short COG was renamed into place, and a run finished with an
        # unreadable confidence.tif.
        check_complete(tmp, sparse)
        if timings is not None:
            with _TIMINGS_LOCK:  # finalisations run side by side
                timings["cog_overviews_s"] = timings.get("cog_overviews_s", 0.0) + t1 - t0
                timings["cog_copy_s"] = (timings.get("cog_copy_s", 0.0)
                                         + time.perf_counter() - t1)
    except (*GDAL_ERRORS, OSError) as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(
            f"{dst}: writing the COG failed ({gdal_reason(exc)}); the disk is probably full "
            f"({_free_space(dst.parent)} free there) or a file-size limit was reached: free "
            "space or choose another --out, then rerun the same command to resume"
        ) from exc
    if schema is not None:
        aux = tmp.with_name(tmp.name + ".aux.xml")
        aux.write_text(_aux_xml_categories(schema))
        os.replace(aux, dst.with_name(dst.name + ".aux.xml"))
    os.replace(tmp, dst)
    log.debug("wrote %s", dst)
    return dst


def check_complete(path: Path, sparse: bool = False) -> None:
    """Make sure GDAL wrote the whole of the GeoTIFF ``path`` (cheap: no pixel is read).

    GDAL's copy does not fail when a write does (a full disk, a file-size limit): it says so
    on stderr and leaves the file cut short. A COG holds its full-resolution blocks last, so
    the last of them (the last one written, for ``sparse`` files) must lie within the file.

    Raises:
        OSError: the file cannot be opened or its last block is missing or cut off.
    """
    size = path.stat().st_size
    try:
        with rasterio.open(path) as ds:
            bh, bw = ds.block_shapes[0]
            cols, rows = -(-ds.width // bw), -(-ds.height // bh)
            last = None
            for row in range(rows - 1, -1, -1):
                for col in range(cols - 1, -1, -1):
                    offset = ds.get_tag_item(f"BLOCK_OFFSET_{col}_{row}", "TIFF", bidx=1)
                    length = ds.get_tag_item(f"BLOCK_SIZE_{col}_{row}", "TIFF", bidx=1)
                    if (offset and int(offset)) or not sparse:
                        last = (int(offset or 0), int(length or 0))
                        break
                if last is not None:
                    break
    except GDAL_ERRORS as exc:
        raise OSError(f"{path.name} was left unreadable, {size} bytes long: "
                      f"{gdal_reason(exc)}") from exc
    if last is not None and (not last[0] or not last[1] or sum(last) > size):
        raise OSError(f"{path.name} was cut short at {size} bytes")


def _free_space(folder: Path) -> str:
    """Free space on the disk holding ``folder``, for messages (``?`` if unknown)."""
    import shutil

    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return "?"
    return f"{free / 1e9:.1f} GB" if free >= 1e9 else f"{free / 1e6:.1f} MB"
