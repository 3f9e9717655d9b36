"""The whole run as one function, for the CLI and the Python API.

``process_survey``: validate input -> prepare the model on the whole survey -> plan tiles ->
segment on Dask -> finalise COGs and styles -> post-processing steps (zones, fields, report,
project) -> ``run.json``. Everything is written under ``OUT/.agriseg-work`` first and moved into
place at the end; ``run.json`` is written last, so its presence means the run is complete.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agriseg import __version__, heap
from agriseg.classes import ClassSchema, file_stem
from agriseg.config import RunConfig
from agriseg.errors import AgrisegError, ConfigError, OutputError, RasterError
from agriseg.grid import Grid, Tile, TilePlan, auto_tile_size, plan_tiles
from agriseg.indices import INDICES, available_indices
from agriseg.models import load_segmenter
from agriseg.models.base import Prepared, Segmenter
from agriseg.output import OutputSpec, TileWriter, disk_estimate, finalize_cog
from agriseg.pool import keep_from_workers, shutdown_pool
from agriseg.postprocess import POSTPROCESS_STEPS
from agriseg.predict import (
    Checkpoint,
    Progress,
    check_scheduler_port,
    check_workers_see,
    class_areas_m2,
    class_counts,
    dask_client,
    input_identity,
    raw_band_scale,
    run_tiles,
    wait_for_scheduler_file,
    warm_up_workers,
)
from agriseg.qgis import write_class_qml, write_ramp_qml
from agriseg.raster import (
    SurveyRaster,
    clear_tile_cache,
    gdal_reason,
    image_vrt,
    open_survey,
    read_overview,
    tile_has_data,
)

if TYPE_CHECKING:
    from agriseg.fields import FieldSet

log = logging.getLogger(__name__)

WORK_DIR = ".agriseg-work"
MANIFEST = "run.json"
#: run.json while it is written, before the outputs move into --out.
MANIFEST_PARTIAL = f".{MANIFEST}.partial"
#: Lock file a run holds in its output folder (see ``_run_lock``).
LOCK_FILE = ".agriseg.lock"
#: The input image on its image-plane grid, in the output folder (runs with ``--gsd``).
IMAGE_VRT = "image.vrt"


@dataclass
class SurveyContext:
    """What post-processing steps get: the run so far and where to put files."""

    config: RunConfig
    survey: SurveyRaster
    segmenter: Segmenter
    prepared: Prepared
    plan: TilePlan
    schema: ClassSchema
    out_dir: Path
    work_dir: Path
    outputs: dict[str, Path] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    #: ``--fields``, read before the tiles (None without it or when no step uses it).
    fieldset: FieldSet | None = None


PostStep = Callable[[SurveyContext], None]
"""A step after segmentation; writes files under ``ctx.work_dir`` and lists them in
``ctx.outputs`` (name -> path relative to the output folder), to be moved into place."""

POST_STEPS: list[tuple[str, PostStep]] = []


def _quicklook_step(ctx: SurveyContext) -> None:
    """Image beside classes as ``quicklook.png`` (decimated reads, so cheap at any size)."""
    from agriseg.quicklook import write_quicklook

    write_quicklook(ctx.survey, ctx.work_dir / "classes.tif", ctx.work_dir / "quicklook.png",
                    ctx.schema)
    ctx.outputs["quicklook"] = Path("quicklook.png")


POST_STEPS.append(("quicklook", _quicklook_step))
POST_STEPS.extend(POSTPROCESS_STEPS)


@dataclass(frozen=True, slots=True)
class SurveyResult:
    """Where the outputs are and the manifest."""

    out_dir: Path
    outputs: dict[str, Path]
    manifest: dict[str, Any]


@contextlib.contextmanager
def _run_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on the output folder for the run.

    Two runs into one folder (a cron job's rerun that finds the first still going, a command
    started twice) would write the same working files. The kernel drops the lock when its
    process ends, however it ends, so a rerun after a crash resumes. Without ``flock``
    (Windows, some network file systems) runs are not guarded.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    if out.exists() and not out.is_dir():
        yield  # _prepare_out_dir says what is wrong
        return
    path = out / LOCK_FILE
    if path.is_symlink():
        # A planted link made the run truncate and overwrite the file it pointed to.
        raise OutputError(f"{path}: is a symbolic link, not agriseg's lock file; remove it "
                          "and rerun")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        fh = open(fd, "a+")  # noqa: SIM115 - held open for the whole run
    except OSError:
        yield  # _prepare_out_dir says what is wrong
        return
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown process"
            raise OutputError(
                f"{out}: another agriseg run is writing there ({holder}); wait for it to "
                "finish (rerunning the same command then resumes or reports it done), or "
                "choose another --out"
            ) from None
        except OSError as exc:
            log.debug("%s: no lock (%s); concurrent runs are not guarded", path, exc)
            yield
            return
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {platform.node()}, started "
                 f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        fh.flush()
        keep_from_workers(fh.fileno())  # else a worker outliving a killed run holds it
        try:
            yield
        finally:
            keep_from_workers(fh.fileno(), kept=False)
            # Removed while still held, so no run can be starting on it meanwhile; a run
            # killed outright leaves it, harmless (only the lock on it counts).
            path.unlink(missing_ok=True)


def _prepare_out_dir(out: Path, overwrite: bool, resume: bool = True) -> tuple[Path, bool]:
    """Create or check the output folder.

    A finished run's results stay in place until this run's replace them (see
    :func:`_replace_old_run`): an interrupted or failed ``--overwrite`` run used to leave an
    empty folder where finished results had been.

    Returns:
        ``(working folder, whether this run replaces a finished one)``.
    """
    work = out / WORK_DIR
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder; choose another --out")
    links = [work] if work.is_symlink() else (
        [p for p in work.rglob("*") if p.is_symlink()] if work.is_dir() else [])
    if links:
        # GDAL and the writers follow links: planted ones made the run write working files
        # into, or over, files elsewhere (a results folder from a tarball can carry them).
        raise OutputError(
            f"{out}: the working folder holds symbolic links ({', '.join(map(str, links[:3]))}"
            f"); agriseg writes there, so it does not follow them: remove {work} and rerun"
        )
    # An --overwrite run that got as far as its tiles may be resumed without --overwrite
    # (the checkpoint then checks that it is the same run); --no-resume starts another run,
    # which needs --overwrite like any other.
    # A replacing run that was stopped after it removed the old run.json (which goes first:
    # see _replace_old_run) still has old outputs to clear: its marker lists them.
    marked = resume and (work / REPLACING).exists()
    replacing = marked or ((out / MANIFEST).exists() and overwrite)
    if (out / MANIFEST).exists() and not replacing:
        if work.exists() and not (work / REPLACING).exists():
            # A finished run stopped while removing its working files (run.json is written
            # before that): nothing in them is needed, and at 1 GP they are ~20 GB.
            shutil.rmtree(work, ignore_errors=True)
            log.info("%s: removed the working files a finished run left behind", work)
        raise OutputError(
            f"{out}: holds the results of a finished run; use --overwrite to replace them "
            "or choose another --out"
        )
    if not overwrite and not (out / MANIFEST).exists() and not work.exists():
        # No agriseg run wrote these: the user's own report.html or classes.tif were
        # replaced without a word.
        theirs = sorted(n for n in OUTPUT_NAMES - {LOCK_FILE} if (out / n).exists())
        if theirs:
            raise OutputError(
                f"{out}: holds files of the names this run writes ({', '.join(theirs[:4])}"
                f"{', ...' if len(theirs) > 4 else ''}) that no agriseg run left there; move "
                "them, choose another --out, or use --overwrite to replace them"
            )
    old_list = None
    if overwrite and work.exists():
        with contextlib.suppress(OSError):
            old_list = (work / REPLACING).read_text()  # old outputs still to remove
        shutil.rmtree(work)
    try:
        work.mkdir(parents=True, exist_ok=True)
        if old_list and replacing:
            (work / REPLACING).write_text(old_list)
        probe = work / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise OutputError(
            f"{out}: cannot write there ({exc.strerror or exc}); choose a writable --out"
        ) from exc
    return work, replacing


#: Longest path of a file the run writes (SQLite's limit, less room for multi-byte names).
MAX_PATH_CHARS = 480

#: Marker in the working folder of a run that replaces a finished run's results.
REPLACING = "replacing"


def _replace_old_run(out: Path) -> None:
    """Remove the finished run's run.json, then its outputs (with their sidecars).

    Done just before the new outputs move in: a style left beside a raster this run does
    not write would outlive it (a zone_ids.qml with no zone_ids.tif). run.json goes first,
    so that a folder with a run.json is always complete (a kill in between left the old
    run.json listing deleted files); the list of old outputs waits in the working folder's
    marker until they are gone, for a resumed run to finish the job.
    """
    marker = out / WORK_DIR / REPLACING
    try:
        old = json.loads((out / MANIFEST).read_text()).get("outputs", {})
        marker.write_text(json.dumps(old))
    except (OSError, ValueError):
        try:  # run.json already removed by the interrupted run: its list is in the marker
            old = json.loads(marker.read_text() or "{}")
        except (OSError, ValueError):
            old = {}
    (out / MANIFEST).unlink(missing_ok=True)
    for rel in old.values():
        if not _own_output(str(rel)):
            # run.json is a file anyone can edit (or receive in a tarball): a crafted one
            # listed files outside --out, and they were deleted.
            log.warning("%s: run.json lists %r, which no agriseg run writes; left alone",
                        out, str(rel)[:200])
            continue
        for p in (out / rel, *_sidecars(out / rel)):
            if p.is_file() or p.is_symlink():
                p.unlink()  # a link itself, never what it points to
    stale = sorted(p.name for p in out.glob("prescription.*"))
    if stale:
        # Made from the replaced run by `agriseg prescription`: a sprayer map that no longer
        # matches the maps beside it.
        log.warning("%s: %s is from the replaced run; make it again with agriseg "
                    "prescription", out, " / ".join(stale[:2]) + (" ..." if len(stale) > 2
                                                                 else ""))
    for name in OUTPUT_FOLDERS - {WORK_DIR}:  # indices/ of a run with indices, say
        with contextlib.suppress(OSError):
            (out / name).rmdir()  # only if empty; this run's files move in afterwards


def _own_output(rel: str) -> bool:
    """Whether ``rel`` (from a run.json) names a file agriseg writes in its output folder."""
    parts = Path(rel).parts
    if not parts or Path(rel).is_absolute() or any(p in ("", ".", "..") for p in parts):
        return False
    if len(parts) == 1:
        return parts[0] in OUTPUT_NAMES
    return len(parts) == 2 and parts[0] in OUTPUT_FOLDERS - {WORK_DIR} \
        and not parts[1].startswith(".")


#: Files a run writes in its output folder, besides those in :data:`OUTPUT_FOLDERS`.
OUTPUT_NAMES = frozenset({
    MANIFEST, IMAGE_VRT, LOCK_FILE, "classes.tif", "confidence.tif", "zone_ids.tif",
    "zones.gpkg", "fields.gpkg", "fields.csv", "quicklook.png", "report.html", "project.qgs",
})
#: Folders of the output folder that the run writes into (or, for the work folder, removes).
OUTPUT_FOLDERS = frozenset({WORK_DIR, "indices", "probability"})


def _refuse_inputs_among_outputs(config: RunConfig) -> None:
    """Refuse a run whose outputs would replace its own input files.

    ``agriseg run classes.tif --fields fields.gpkg --out .`` would write over the survey and
    the field polygons it reads (and ``--overwrite`` would delete them), so an input inside
    ``--out`` under a name the run writes is refused before any work.

    Raises:
        OutputError: naming the input and the output that would replace it.
    """
    out = Path(config.out).resolve()
    for what, path in (("survey", config.input), ("fields", config.fields)):
        if path is None or str(path).startswith("/vsi"):
            continue
        try:
            rel = Path(path).resolve().relative_to(out)
        except ValueError:
            continue  # not inside --out
        if rel.parts[0] in OUTPUT_FOLDERS or str(rel) in OUTPUT_NAMES:
            raise OutputError(
                f"{path}: the {what} file lies in --out {config.out} under a name the run "
                f"writes ({rel}), so its outputs would replace it; choose another --out, "
                "e.g. --out results/"
            )


def _remove_empty_dirs(*dirs: Path | None) -> None:
    """Remove each of ``dirs`` that exists and is empty, in order (never anything else)."""
    for d in dirs:
        if d is not None:
            with contextlib.suppress(OSError):  # not empty, or not there
                d.rmdir()


def _release_tile_memory() -> None:
    """Give back what the tiles held before post-processing starts (and forks its workers).

    With worker threads the model, its ONNX Runtime session, the shared block cache and the
    tiles' freed arrays stay in this process; glibc keeps freed heap pages unless asked.
    Releasing them keeps the post-processing steps' peak (and the pages its forked workers
    share) down.
    """
    import gc

    neural = sys.modules.get("agriseg.models.neural")  # loaded only if a learned model ran
    if neural is not None:
        neural.release_runners()
    clear_tile_cache()
    gc.collect()
    heap.trim()


#: Vegetation share of the valid pixels under which a run warns that it found almost none.
LITTLE_VEGETATION = 0.03


def _warn_little_vegetation(counts: dict[str, int], schema: ClassSchema,
                            ctx: SurveyContext) -> None:
    """Say so when almost nothing is vegetation (in the log, run.json and the report).

    A senesced (yellow-brown) or harvested crop, or residue, reads as soil to a model that
    looks for green: the Lamberton 2018-09-25 sample came out 98 % soil without a word.
    """
    soil = schema.by_role("soil")
    valid = sum(v for k, v in counts.items() if k != "nodata")
    if soil is None or not valid:
        return
    share = 1 - counts[soil.name] / valid
    if share < LITTLE_VEGETATION:
        text = (f"only {100 * share:.1f} % of the survey's valid pixels are vegetation: a "
                "senesced (yellow or brown) or harvested crop, or residue, reads as soil to a "
                "model that looks for green leaves")
        log.warning("%s", text)
        ctx.manifest.setdefault("warnings", []).append(text)


#: Ground pixel aspect beyond which a survey is warned about (a geographic CRS away from the
#: equator, or an anisotropic resampling).
NON_SQUARE_PIXELS = 1.1


def _with_projection_note(survey: SurveyRaster) -> SurveyRaster:
    """The survey, warned about a CRS that stretches or shears, or far from square pixels.

    Lengths and areas are corrected (:attr:`Grid.metres_per_unit`), but with one scale for
    the whole survey; the user should know, and how to get exact figures.
    """
    grid = survey.grid
    stretch = grid.projection_stretch
    rx, ry = grid.res_m
    squash = max(rx, ry) / min(rx, ry)
    shear = grid.projection_shear
    if shear is not None:
        # Sinusoidal or Mollweide far from the central meridian: the pixels are parallelograms
        # on the ground. Areas use the projection's area scale; no single length does.
        text = (f"{survey.path}: the CRS ({_crs_name(grid)}) shears the ground by {shear:.0f} "
                "degrees at this survey: areas are right (its area scale is used), but the "
                "models see the field skewed, and GSD, crop-row spacing and direction are "
                "approximate")
    elif stretch is not None:
        text = (f"{survey.path}: the CRS ({_crs_name(grid)}) stretches ground distances "
                f"{stretch:.2f}x at this survey; lengths and areas are corrected with the "
                "scale at its centre (good to about 0.1 % across a few km)")
    elif squash > NON_SQUARE_PIXELS:
        # Degrees of longitude shrink with latitude: 1e-6 x 1e-6 deg is 0.07 x 0.11 m at 44 N.
        # Areas are right (row by row on the ellipsoid), but images look squashed to the
        # models, and crop-row directions and spacings are measured in square pixels.
        text = (f"{survey.path}: its pixels are {rx:.3g} x {ry:.3g} m on the ground (x by y), "
                f"{squash:.2f}x longer one way; areas are exact, but the models see the field "
                "squashed and crop-row spacing and direction come out distorted")
    else:
        return survey
    utm = grid.utm_epsg()  # a coordinate transform: only for a survey warned about
    if utm is not None:
        text += (f"; for exact metric outputs reproject it to its UTM zone: gdalwarp -t_srs "
                 f"EPSG:{utm} -r near {survey.path} survey_utm.tif")
    log.warning("%s", text)
    return replace(survey, warnings=(*survey.warnings, text))


def _crs_name(grid: Grid) -> str:
    """``EPSG:3857``, ``ESRI:54008``; a WKT's projection name is no name a user typed."""
    name = grid.crs.to_string()
    return name if len(name) <= 40 and "[" not in name else "its projection"


def _clamp_halo(halo: int, grid: Grid, model_most: int | None = None) -> int:
    """``--halo`` no wider than the survey: context beyond it is padding, and costs memory.

    Rounded up to 16 px, the step learned models take their context in; a halo cut to the
    survey is also cut to ``model_most`` (a learned model's most), rather than refused.
    """
    most = -(-max(grid.height, grid.width) // 16) * 16
    if halo > most and model_most is not None:
        most = min(most, model_most)
    if halo > most:
        log.info("--halo %d is wider than the survey (%d x %d px); using %d", halo,
                 grid.width, grid.height, most)
        return most
    return halo


def _refuse_empty(survey: SurveyRaster) -> None:
    """Refuse a survey without a valid pixel (read from its overview), before any work.

    Raises:
        RasterError: every pixel is nodata.
    """
    if not read_overview(survey, survey.roles.spectral[:1])[1].any():
        raise _all_nodata(survey)


def _all_nodata(survey: SurveyRaster) -> RasterError:
    return RasterError(
        f"{survey.path}: every pixel is nodata (alpha 0, nodata value or mask); check "
        "that the right file was given, or fix its nodata/alpha with gdal_edit.py"
    )


def _model_overhead(segmenter: Segmenter, plan: TilePlan) -> float:
    """Model input pixels per output pixel.

    The tile halo, plus the block margins of models that run a tile in blocks (learned
    models say how many pixels they feed through ``model_pixels``).
    """
    model_pixels = getattr(segmenter, "model_pixels", None)
    if model_pixels is None:
        return plan.read_overhead
    seen = sum(model_pixels(int(t.core.height), int(t.core.width)) for t in plan.tiles)
    return seen / max(1, plan.grid.height * plan.grid.width)


def _probability_planes(
    requested: tuple[str, ...], schema: ClassSchema
) -> tuple[tuple[str, int], ...]:
    """Requested class names (or ``all``) with their score plane, in the schema's order.

    Raises:
        ConfigError: a name the model's schema does not have, with the valid names.
    """
    names = [c.name for c in schema.classes]
    lower = {n.lower(): n for n in names}
    asked = {lower.get(r.lower(), r) for r in requested}  # WEED is weed
    wanted = set(names) if "all" in {r.lower() for r in requested} else asked
    unknown = sorted(wanted - set(names))
    if unknown:
        raise ConfigError(
            f"--probabilities: unknown class(es) {', '.join(unknown)}; this model's classes are "
            f"{', '.join(names)} (or all)"
        )
    # Named by their file stem (probability/<stem>.tif): "N/A" writes N_A.tif.
    return tuple((file_stem(n), k) for k, n in enumerate(names) if n in wanted)


def _output_specs(
    schema: ClassSchema, index_names: tuple[str, ...], probability_names: tuple[str, ...] = ()
) -> list[OutputSpec]:
    specs = [
        # NEAREST overviews, GDAL's default for paletted rasters: they keep each class's share
        # when zoomed out, where MODE drops every weed patch smaller than half an overview
        # pixel's window, and they build 2.5x faster (268 MP: 2.4 s instead of 6.1 s).
        OutputSpec("classes", "uint8", schema.nodata, "NEAREST", schema.description()),
        OutputSpec("confidence", "uint8", 255, "AVERAGE",
                   "confidence of the chosen class, percent 0-100 (255 = nodata)"),
    ]
    specs += [
        OutputSpec(f"probability/{n}", "uint8", 255, "AVERAGE",
                   f"probability of {n}, percent 0-100 (255 = nodata)")
        for n in probability_names
    ]
    specs += [
        OutputSpec(f"indices/{n}", "float32", float("nan"), "AVERAGE", INDICES[n].description)
        for n in index_names
    ]
    return specs


def process_survey(
    config: RunConfig,
    progress: Progress | None = None,
    on_plan: Callable[[TilePlan, int], None] | None = None,
) -> SurveyResult:
    """Run a survey end to end.

    Side effect: glibc's malloc arenas of this process are capped from here on, at two unless
    ``MALLOC_ARENA_MAX`` says otherwise (see :mod:`agriseg.heap`): memory no longer creeps up
    through long runs, and tiles run faster.

    Args:
        config: the validated run configuration.
        progress: called as tiles finish: ``(tiles_done, tiles_total, pixels_done)``.
        on_plan: called once the plan is known, with the number of tiles that hold data.

    Returns:
        Output paths and the manifest.

    Raises:
        AgrisegError: any user-facing problem, with a message that says what to do.
    """
    try:
        with contextlib.ExitStack() as run_scope:
            return _process(config, progress, on_plan, run_scope)
    except AgrisegError:
        raise
    except OSError as exc:
        # Disk full, file-size limits, vanished folders: say where, keep the traceback chained.
        what = ("choose a shorter --out" if exc.errno == errno.ENAMETOOLONG else
                "free disk space or choose another --out, then rerun the same command to "
                "resume")
        raise OutputError(
            f"{config.out}: writing outputs failed ({exc.strerror or gdal_reason(exc)}"
            f"{': ' + str(exc.filename) if exc.filename else ''}); {what}"
        ) from exc


def _process(
    config: RunConfig,
    progress: Progress | None,
    on_plan: Callable[[TilePlan, int], None] | None,
    run_scope: contextlib.ExitStack,
) -> SurveyResult:
    t_start = time.perf_counter()
    # Before the tile threads start: their arenas are created on first use.
    heap.limit_arenas()
    timings: dict[str, float] = {}
    unknown = set(config.skip) - {name for name, _ in POST_STEPS}
    if unknown:
        raise ConfigError(
            f"cannot skip {', '.join(sorted(unknown))}: no such step; valid steps: "
            f"{', '.join(name for name, _ in POST_STEPS)}"
        )
    _refuse_inputs_among_outputs(config)
    longest = len(str(Path(config.out).resolve() / WORK_DIR / "indices" / "gndvi.work.tif.ovr"))
    if longest > MAX_PATH_CHARS:
        # SQLite (GeoPackages) opens paths of up to 512 bytes: past that the run failed
        # after all its tiles, storing the fields' style.
        raise OutputError(f"{config.out}: the path is too long for the files written in it "
                          f"({longest} characters, GeoPackages take {MAX_PATH_CHARS}); "
                          "choose a shorter --out")
    if config.scheduler:
        check_scheduler_port(config.scheduler, config.scheduler_timeout)
    elif config.scheduler_file:
        wait_for_scheduler_file(str(config.scheduler_file), config.scheduler_timeout)
    # A learned model's check imports PyTorch and builds the model (~5 s on a GPU machine);
    # meanwhile the whole-survey overview that every run reads is read (GDAL releases the GIL).
    loader = ThreadPoolExecutor(1, thread_name_prefix="agriseg-load")
    try:
        loading = loader.submit(load_segmenter, config.model, config.engine,
                                config.model_options)
        if config.model_options:
            # Only rule-based models take options and they load at once: a bad option is
            # reported now rather than after the overview read (seconds on a big survey).
            loading.result()
        fieldset = None
        if config.gsd is None:
            survey = _with_projection_note(open_survey(config.input, config.bands))
            _refuse_empty(survey)
            fieldset = _read_fields_first(config, survey)
        segmenter = loading.result()
    finally:
        loader.shutdown(wait=False)
    own_margin = getattr(segmenter, "margin", None)  # a learned model's, before --halo
    planes = _probability_planes(config.probabilities, segmenter.schema)
    out = Path(config.out)
    # Registered before the lock, so it runs after the lock file is gone: a run refused
    # before it wrote anything (the model's prepare found the bands missing) leaves no
    # empty folders behind, --out's parents that it created (a/b/out) included.
    created = [d for d in (out.absolute(), *out.absolute().parents) if not d.exists()]
    run_scope.callback(_remove_empty_dirs, out / WORK_DIR, *created)
    run_scope.enter_context(_run_lock(out))
    work, replacing = _prepare_out_dir(out, config.overwrite, config.resume)
    if config.gsd is not None:
        # Workers, report and QGIS project all read the image through this VRT, which
        # gives it a metric image-plane grid (see image_vrt).
        vrt = image_vrt(config.input, out / IMAGE_VRT, config.gsd)
        try:
            try:
                survey = open_survey(vrt, config.bands)
            except AgrisegError as exc:  # name the user's file, not our wrapper
                # The VRT's absolute path first: replacing the relative one inside it gave
                # "/here//here/image.png" for a relative --out.
                text = str(exc)
                for name in dict.fromkeys((str(Path(vrt).absolute()), str(vrt))):
                    text = text.replace(name, str(config.input))
                raise type(exc)(text) from exc
            _refuse_empty(survey)
            fieldset = _read_fields_first(config, survey)
        except AgrisegError:
            # Refused before any tile: the VRT is all this run wrote, and left behind it made
            # the corrected command fail ("holds files ... that no agriseg run left there").
            Path(vrt).unlink(missing_ok=True)
            raise

    halo_wanted = None if config.halo is None else _clamp_halo(
        config.halo, survey.grid, getattr(segmenter, "max_halo", None))
    with_halo = getattr(segmenter, "with_halo", None)
    if halo_wanted is not None and with_halo is not None:
        if halo_wanted == config.halo:
            with_halo(config.halo)  # its checks name the value given
        segmenter = with_halo(halo_wanted)

    t = time.perf_counter()
    prepared = segmenter.prepare(survey)
    survey.require(segmenter.roles, f"model {segmenter.name!r}")
    timings["prepare_s"] = time.perf_counter() - t
    for w in prepared.warnings:
        log.warning("%s", w)
    runs_as = prepared.info.get("runs_as")
    log.info("model: %s%s", segmenter.name, f" ({runs_as})" if runs_as else "")
    if halo_wanted is None:
        halo = prepared.halo
    else:
        halo = halo_wanted
        margin = own_margin if own_margin is not None else prepared.halo
        if halo < margin:
            log.warning(
                "--halo %d is narrower than model %s's margin of %d px: classes next to tile "
                "borders can differ from a seamless run; leave --halo out for seamless output",
                halo, segmenter.name, margin,
            )
    tile_size = config.tile_size or auto_tile_size(halo, multiple=prepared.tile_multiple)
    plan = plan_tiles(survey.grid, tile_size, halo)
    _, ov_valid, factor = read_overview(survey, survey.roles.spectral[:1], 2048)
    tiles = [t for t in plan if tile_has_data(ov_valid, factor, t)]
    if not tiles:
        raise _all_nodata(survey)
    model_px = _model_overhead(segmenter, plan)
    data_px = sum(t.core.width * t.core.height for t in tiles)
    log.info(
        "plan: %d tile(s) of %d px + %d px halo, %d hold data (%.1f MP), %.2f model px per "
        "output px", len(plan), plan.tile_size, plan.halo, len(tiles), data_px / 1e6, model_px,
    )
    if on_plan:
        on_plan(plan, len(tiles))
    schema = segmenter.schema
    index_names = tuple(available_indices(survey.roles.spectral)) if config.indices else ()
    specs = _output_specs(schema, index_names, tuple(n for n, _ in planes))
    input_id = input_identity(survey.path)
    identity = {
        **input_id,
        **({"image": input_identity(str(config.input))} if config.gsd is not None else {}),
        "model": segmenter.describe(),
        "tile_size": plan.tile_size,
        "halo": plan.halo,
        "bands": survey.roles.as_dict(),
        "indices": list(index_names),
        "probabilities": [n for n, _ in planes],
        "agriseg": __version__,
    }
    checkpoint = Checkpoint.load_or_new(work / "checkpoint.json", identity, config.resume)
    if replacing:  # from here on, the same command without --overwrite resumes this run
        (work / REPLACING).touch()
    resumed = len(checkpoint.done)
    _check_disk(work, specs, data_px, bool(checkpoint.done))
    writer = TileWriter(plan, specs, work, schema, resume=bool(checkpoint.done))
    t = time.perf_counter()
    try:
        layout, nthreads = _segment_on_cluster(
            config, survey, plan, tiles, segmenter, prepared, writer, checkpoint, index_names,
            planes, progress, timings)
    finally:
        writer.close()
        _release_tile_memory()
    timings["segment_s"] = time.perf_counter() - t
    log.info("%d tile(s) segmented and written in %.1f s%s", len(tiles) - resumed,
             timings["segment_s"], f" ({resumed} more done before the resume)" if resumed
             else "")

    t = time.perf_counter()
    ctx = SurveyContext(config, survey, segmenter, prepared, plan, schema, out, work,
                        timings=timings, fieldset=fieldset)
    if survey.warnings:  # doubts about band roles or scaling: for run.json and the report
        ctx.manifest.setdefault("warnings", []).extend(survey.warnings)

    _finalize_outputs(specs, writer, ctx)
    # GDAL's overview builders and COG copies free ~0.5 GB of buffers (268 MP) that glibc
    # would otherwise keep through the post-processing steps.
    heap.trim()
    timings["finalize_s"] = time.perf_counter() - t

    counts = class_counts(work / "classes.tif", schema, writer.class_values)
    _warn_little_vegetation(counts, schema, ctx)
    _run_post_steps(ctx, config.skip, timings)

    timings["total_s"] = time.perf_counter() - t_start
    # A rate, not a duration: the tile stream after the first tile (start-up excluded).
    stream_mp_s = timings.pop("stream_mp_s", None)
    valid_px = sum(v for k, v in counts.items() if k != "nodata")
    manifest: dict[str, Any] = {
        "agriseg": __version__,
        "config_version": config.version,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "input": {**survey.to_dict(), "identity": input_id,
                  **({"image": str(config.input), "gsd_m": config.gsd}
                     if config.gsd is not None else {})},
        "model": {**segmenter.describe(), "prepared": prepared.info,
                  "warnings": list(prepared.warnings)},
        "schema": schema.to_dict(),
        "parameters": json.loads(config.model_dump_json()),
        "plan": {"tiles": len(plan), "tiles_with_data": len(tiles), "tile_size": plan.tile_size,
                 "halo": plan.halo, "block_size": plan.block_size,
                 "read_pixels_per_output_pixel": round(plan.read_overhead, 4),
                 "model_pixels_per_output_pixel": round(model_px, 4),
                 "workers": layout, "worker_count": len(nthreads),
                 "worker_threads": sum(nthreads.values())},
        "class_pixels": counts,
        "class_area_m2": {k: round(v, 3) for k, v in class_areas_m2(
            work / "classes.tif", schema, counts, survey.grid).items()},
        "throughput_mp_s": round(valid_px / 1e6 / max(timings.get("segment_s", 1e-9), 1e-9), 3),
        "stream_mp_s": None if stream_mp_s is None else round(stream_mp_s, 3),
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "versions": _versions(),
        "outputs": {k: str(v) for k, v in sorted(ctx.outputs.items())},
        **ctx.manifest,
    }
    # Every doubt in one list, the model's too (a satellite tile's "too coarse to resolve
    # crop rows" was only under model.warnings, where a script checking warnings missed it).
    doubts = [*manifest.get("warnings", []), *prepared.warnings]
    if doubts:
        manifest["warnings"] = list(dict.fromkeys(str(w) for w in doubts))
    tmp = out / MANIFEST_PARTIAL
    try:
        # Before anything moves into place: on a full disk the outputs stay in the working
        # folder (a rerun resumes from there) rather than lying in --out without a run.json.
        tmp.write_text(json.dumps(manifest, indent=2, default=str))
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    if replacing:
        _replace_old_run(out)
    final = _move_into_place(ctx)
    finished = False
    try:
        os.replace(tmp, out / MANIFEST)
        finished = True
        shutil.rmtree(work, ignore_errors=True)
    except KeyboardInterrupt:
        if not finished:
            raise
        # Ctrl-C or SIGTERM while removing the working files: the results are complete
        # (run.json is in place), so finish the cleanup and report success, not "resume".
        shutil.rmtree(work, ignore_errors=True)
    log.info("done in %.1f s: %s", timings["total_s"], out)
    return SurveyResult(out, final, manifest)


def _check_disk(work: Path, specs: list[OutputSpec], pixels: int, resuming: bool) -> None:
    """Warn before the tiles when the output folder's disk looks too small for the run.

    Only a warning: the estimate is an upper bound, and a run that does fill the disk stops
    with a clear error and resumes when rerun.
    """
    need = disk_estimate(specs, pixels)
    if resuming:  # what earlier attempts wrote is already taken from the free space
        need -= sum(f.stat().st_blocks * 512 for f in work.rglob("*") if f.is_file())
    free = shutil.disk_usage(work).free
    log.info("disk: at most %s for working files and outputs, %s free", _size(max(need, 0)),
             _size(free))
    if need > free:
        floats = [s for s in specs if s.name.startswith("indices/")]
        hint = (f", pass --no-indices (the index rasters take "
                f"{_size(disk_estimate(floats, pixels))} of it)" if floats else "")
        log.warning(
            "%s: this run may need up to %s of disk for its working files and outputs but %s "
            "are free; free space%s, or choose another --out. A run that fills the disk stops "
            "with an error and resumes when rerun", work.parent, _size(need), _size(free), hint,
        )


def _size(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def _read_fields_first(config: RunConfig, survey: SurveyRaster) -> FieldSet | None:
    """``--fields``, read and checked before the tiles.

    A wrong file (unreadable, no CRS, no overlap, a missing id column or layer) then fails the
    run in seconds, not after a night of segmentation.
    """
    if config.fields is None or {"zones", "fields"} <= set(config.skip):
        return None
    from agriseg.fields import read_fields

    return read_fields(config.fields, survey.grid, config.field_id, config.fields_layer)


def _segment_on_cluster(
    config: RunConfig,
    survey: SurveyRaster,
    plan: TilePlan,
    tiles: list[Tile],
    segmenter: Segmenter,
    prepared: Prepared,
    writer: TileWriter,
    checkpoint: Checkpoint,
    index_names: tuple[str, ...],
    planes: tuple[tuple[str, int], ...],
    progress: Progress | None,
    timings: dict[str, float],
) -> tuple[str, dict[str, int]]:
    """Run every tile on the configured Dask cluster into ``writer``.

    Returns:
        The worker layout (for run.json) and the threads of each worker.
    """
    local = not (config.scheduler or config.scheduler_file)
    resources = getattr(segmenter, "resources", None)
    local_only = [name for name, value in (("--workers", config.workers),
                                           ("--threads-per-worker", config.threads_per_worker),
                                           ("processes", config.processes)) if value]
    if local_only and not local:
        log.warning("%s only shape the embedded cluster: the existing cluster's workers run "
                    "the tiles as they were started", ", ".join(local_only))
    with dask_client(
        config.scheduler,
        str(config.scheduler_file) if config.scheduler_file else None,
        config.workers,
        config.threads_per_worker,
        config.processes,
        timeout=config.scheduler_timeout,
        resources=resources,
    ) as client:
        if not local:
            check_workers_see(client, survey.path)
        nthreads = client.nthreads()
        layout = ("existing cluster" if not local else
                  f"local {'GPU ' if resources else ''}"
                  f"{'processes' if client.cluster.processes else 'threads'}")
        # Only when the scheduler serves one: the link is formatted even when it does not.
        if "dashboard" in client.scheduler_info(n_workers=0).get("services", {}):
            log.info("Dask dashboard: %s", client.dashboard_link)
        warm_s = warm_up_workers(client, segmenter, plan.tile_size,
                                 raw_band_scale(survey, segmenter, planes))
        if warm_s is not None:
            timings["warm_up_s"] = warm_s
        timings.update(
            run_tiles(client, survey, plan, tiles, segmenter, prepared, writer, checkpoint,
                      index_names, progress, sync_seconds=config.checkpoint_seconds,
                      probabilities=planes)
        )
        if not layout.endswith("threads"):
            # Workers in other processes (those of an existing cluster live on) would
            # otherwise keep this survey's last decoded blocks (at most
            # raster.TILE_CACHE_BYTES each). Housekeeping only: every tile is written
            # by now, so a worker that cannot run it must not fail the survey.
            try:
                client.run(clear_tile_cache)
            except Exception as exc:  # any worker-side failure
                log.debug("could not clear the workers' block caches: %s", exc)
    return layout, nthreads


def _finalize_outputs(specs: list[OutputSpec], writer: TileWriter, ctx: SurveyContext) -> None:
    """Turn the writer's working files into styled COGs in the work folder."""
    work, schema = ctx.work_dir, ctx.schema

    def finalize(spec: OutputSpec) -> None:
        dst = work / f"{spec.name}.tif"
        dst.parent.mkdir(parents=True, exist_ok=True)
        finalize_cog(writer.path(spec.name), dst, spec, schema if spec.name == "classes" else None,
                     timings=ctx.timings)
        if spec.name == "classes":
            write_class_qml(dst, schema)
        elif spec.name == "confidence" or spec.name.startswith("probability/"):
            write_ramp_qml(dst, 0, 100, "confidence")
        else:
            d = INDICES[spec.name.split("/")[-1]]
            write_ramp_qml(dst, d.vmin, d.vmax, "vegetation")

    # Two COGs at a time: overview building is single-threaded in GDAL, which releases the
    # GIL, so both cores are used.
    with ThreadPoolExecutor(2) as pool:
        for spec, _ in zip(specs, pool.map(finalize, specs), strict=True):
            ctx.outputs[spec.name] = Path(f"{spec.name}.tif")


# Post-processing steps that read another step's output.
_STEP_NEEDS = {"report": "fields"}


def _run_post_steps(ctx: SurveyContext, skip: tuple[str, ...], timings: dict[str, float]) -> None:
    """Zones, field summaries, quick look, report and project, minus ``skip``, timed."""
    skipped = set(skip)
    for name, step in POST_STEPS:
        if name in skipped:
            log.info("skipping %s (--skip)", name)
            continue
        needs = _STEP_NEEDS.get(name)
        if needs in skipped:
            log.warning("skipping %s too: it is built from the %s step's output (--skip %s)",
                        name, needs, needs)
            skipped.add(name)
            continue
        t = time.perf_counter()
        try:
            step(ctx)
        finally:
            # A step's forked workers keep their heap and GDAL block cache while idle; the
            # next step forks fresh ones in milliseconds.
            shutdown_pool()
            heap.trim()
        timings[f"{name}_s"] = time.perf_counter() - t


def run_files(out: Path, outputs: Iterable[str] = ()) -> frozenset[Path]:
    """The files in run folder ``out`` that ``agriseg run`` writes (or may write), with styles.

    ``outputs`` are the relative paths a run.json lists; names no run writes are ignored
    (run.json is a file anyone can edit). Other tools that write into a run folder (the
    prescription) must not replace these.
    """
    rels = set(OUTPUT_NAMES) | {str(r) for r in outputs if _own_output(str(r))}
    return frozenset(f for rel in rels for f in (out / rel, *_sidecars(out / rel)))


def _sidecars(path: Path) -> tuple[Path, Path]:
    """The QGIS style and GDAL auxiliary files that travel with an output file."""
    return path.with_suffix(".qml"), path.with_name(path.name + ".aux.xml")


def _move_into_place(ctx: SurveyContext) -> dict[str, Path]:
    """Rename finished files (and their sidecars) from the working folder into ``out``."""
    final: dict[str, Path] = {}
    for name, rel in ctx.outputs.items():
        src = ctx.work_dir / rel
        dst = ctx.out_dir / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        for sidecar in _sidecars(src):
            if sidecar.exists():
                os.replace(sidecar, dst.parent / sidecar.name)
        os.replace(src, dst)
        final[name] = dst
    return final


def _versions() -> dict[str, str]:
    import dask
    import numpy
    import rasterio

    v = {
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "rasterio": rasterio.__version__,
        "gdal": rasterio.__gdal_version__,
        "dask": dask.__version__,
    }
    for dist in ("torch", "segmentation-models-pytorch", "onnxruntime"):
        with contextlib.suppress(PackageNotFoundError):
            v[dist] = version(dist)
    return v
