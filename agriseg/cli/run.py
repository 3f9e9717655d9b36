"""``agriseg run``: the overnight survey command."""

from __future__ import annotations

import logging
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any

import click

from agriseg.cli import NonEmptyPath, StopRequest, stop_signals
from agriseg.config import build_run_config, load_run_yaml
from agriseg.grid import TilePlan


@click.command()
@click.argument("input", required=False, type=NonEmptyPath(dir_okay=False, path_type=Path))
@click.option("--out", "-o", type=NonEmptyPath(file_okay=False, path_type=Path),
              help="Output folder (created; must not hold a finished run unless --overwrite).")
@click.option("--fields", type=NonEmptyPath(path_type=Path),
              help="Field polygons (GeoPackage, Shapefile or a folder of them, GeoJSON, KML, "
              "FlatGeobuf; any CRS).")
@click.option("--field-id", help="Id column of --fields [a unique, non-blank column, names "
              "like field_id, plot, name, id first; never fractional numbers].")
@click.option("--fields-layer", help="Layer of --fields, for a GeoPackage holding several "
              "(default: its first polygon layer, with a warning naming the others).")
@click.option("--model", "-m", help="Registered model name (see `agriseg models`) or bundle path.")
@click.option("--model-option", "model_option", multiple=True, metavar="NAME=VALUE",
              help="Set an option of the model (repeatable), e.g. disease_sensitivity=4 or "
              "row_support=0.5 for the label-free model; the names are LabelFreeConfig's "
              "fields, listed by `agriseg models`. Overrides `model_options:` of --config.")
@click.option("--engine", type=click.Choice(["auto", "torch", "onnx"]),
              help="Engine for learned models. torch: bf16 where the hardware computes it "
              "natively (GPUs; CPUs with AVX512-BF16 or AMX), the first layer in float32; onnx: "
              "ONNX Runtime, float32, on CPU [auto: torch on a GPU or a CPU with native bf16, "
              "onnx elsewhere].")
@click.option("--bands",
              help="Band roles when the file does not say, e.g. red=3,green=2,blue=1,nir=4.")
@click.option("--gsd", type=float,
              help="Pixel size in metres of an image without georeferencing (photo, labelled "
              "dataset tile): it is then run in image coordinates, outputs keep its rows and "
              "columns (no map position, no lon/lat).")
@click.option("--tile-size", type=int,
              help="Core tile edge in pixels, multiple of 16 [1024, up to 2048 when the "
              "model's halo is wide].")
@click.option("--halo", type=int,
              help="Context pixels around each tile [the model's margin]. Learned models take "
              "multiples of 16 and give every model input this much context: 16 feeds ~10 % "
              "fewer model pixels than their default 32 but changes more pixels next to block "
              "borders (benchmarks/seams.py); at most 256. A halo narrower than the "
              "model's margin is warned about (seams); one wider than the survey is cut to it.")
@click.option("--workers", type=int, help="Local workers (threads of this process; "
              "processes with `processes: true` in --config) [CPU cores; with a model on "
              "GPU: one worker per GPU, a process each when there are several].")
@click.option("--threads-per-worker", type=int, help="Threads per local worker [1; per GPU "
              "worker: the cores shared among the GPUs, at most 8, so tiles are read while "
              "the GPU works].")
@click.option("--scheduler", help="Address of an existing Dask scheduler, e.g. tcp://host:8786.")
@click.option("--scheduler-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Scheduler file of an existing Dask cluster.")
@click.option("--scheduler-timeout", type=float,
              help="Seconds to wait for --scheduler, or for --scheduler-file to appear, "
                   "before giving up [10].")
@click.option("--checkpoint-seconds", type=float,
              help="How often finished tiles are flushed and recorded for resume [15].")
@click.option("--no-indices", is_flag=True, default=None, help="Skip vegetation index rasters.")
@click.option("--probabilities", "probability_classes", metavar="CLASSES",
              help="Also write probability/<class>.tif (percent 0-100, COG + .qml) for these "
                   "classes, comma-separated, e.g. weed,disease, or all: thresholds of your "
                   "own in QGIS (a stricter weed map for spraying) [none].")
@click.option("--skip", multiple=True,
              help="Leave out post-processing steps (repeatable, or comma-separated: "
                   "--skip zones,report): quicklook, zones, fields, report, project. The "
                   "report is built from the field summaries: skipping fields skips it too.")
@click.option("--min-zone-area", type=float, help="Smallest at-risk zone kept, m2 [0.25].")
@click.option("--config", "config_file",
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="YAML run config (see workflows/); command-line options override it.")
@click.option("--overwrite", is_flag=True, default=None, help="Replace a finished run in --out.")
@click.option("--no-resume", is_flag=True, default=None,
              help="Start over instead of resuming an interrupted run in --out.")
@click.option("--progress/--no-progress", default=None,
              help="Progress bar [on when stderr is a terminal].")
@click.option("-q", "--quiet", "quiet_run", is_flag=True,
              help="Only warnings and errors (as agriseg -q run ...).")
@click.pass_context
def run(ctx: click.Context, config_file: Path | None, progress: bool | None, quiet_run: bool,
        **opts: Any) -> None:
    """Segment a survey raster into soil / crop / weed / disease and write QGIS-ready outputs.

    INPUT is any GDAL-readable georeferenced raster: RGB, RGBA (alpha = nodata) or
    multispectral (NIR / red edge), uint8, uint16 or float; an image without a CRS runs with
    --gsd. Outputs in --out: classes.tif (COG + .qml), confidence.tif, indices/*.tif,
    probability/*.tif with --probabilities and run.json; with the full pipeline also
    quicklook.png, zones.gpkg and zone_ids.tif (when there are at-risk zones),
    fields.gpkg/.csv, report.html and project.qgs.

    An interrupted run resumes when the same command is run again.
    """
    import distributed  # noqa: F401  (imported first so its logging setup can be quietened)

    from agriseg import pool
    from agriseg.cli import quiet_third_party
    from agriseg.survey import process_survey

    quiet_third_party((ctx.obj or {}).get("verbose", 0))

    values: dict[str, Any] = load_run_yaml(config_file) if config_file else {}
    if opts.pop("no_indices"):
        values["indices"] = False
    if opts.pop("no_resume"):
        values["resume"] = False
    model_option = opts.pop("model_option")
    if model_option:
        base = values.get("model_options") or {}
        # Not a mapping (a list in the YAML): left for the config check to name.
        values["model_options"] = ({**base, **_model_options(model_option)}
                                   if isinstance(base, dict) else base)
    classes = opts.pop("probability_classes")
    if classes:
        values["probabilities"] = tuple(x.strip().lower() for x in classes.split(",") if x.strip())
    skip = opts.pop("skip")
    if skip:
        values["skip"] = tuple(x.strip() for s in skip for x in s.split(",") if x.strip())
    for key, val in opts.items():
        if val is not None:
            values[key] = val
    if "input" not in values:
        raise click.UsageError("give INPUT (or `input:` in --config)")
    given = str(values["input"])
    if opts.get("input") is None and config_file and not Path(given).exists() \
            and not given.startswith("/vsi") and "://" not in given:
        # The workflow configs hold a placeholder survey.tif: the survey is on the command line.
        raise click.UsageError(
            f"{values['input']}: not found (`input:` of {config_file}); give the survey on the "
            f"command line: agriseg run SURVEY.tif --config {config_file} ..."
        )
    if "out" not in values:
        raise click.UsageError("give --out DIR (or `out:` in --config)")
    cfg = build_run_config(str(config_file) if config_file else "options", **values)
    quiet = quiet_run or bool((ctx.obj or {}).get("quiet"))
    if quiet_run:
        logging.getLogger().setLevel(logging.WARNING)
    show = sys.stderr.isatty() if progress is None else progress
    bar: _LogProgress | _ProgressBar = (
        _Silent() if quiet and not progress else _ProgressBar() if show else _LogProgress()
    )
    # This command's main module is safe to import again in post-processing workers.
    pool.allow_fork_server()
    with stop_signals() as stop:
        try:
            result = process_survey(cfg, progress=bar.update, on_plan=bar.start)
        except KeyboardInterrupt:
            bar.stop()
            _interrupted(ctx, cfg.out, stop)
        except Exception:
            # A Ctrl-C inside a library's own handler can come out as another error
            # (Matplotlib turned one into "ValueError: Invalid affine transformation matrix"
            # mid-report).
            if not stop.requested:
                raise
            bar.stop()
            _interrupted(ctx, cfg.out, stop)
        finally:
            bar.stop()
            pool.allow_fork_server(False)
    # The run is finished and its outputs in place: a Ctrl-C now (while the summary prints or
    # the interpreter exits) has nothing left to stop, and killed the process mid-print.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if quiet:  # -q: only warnings and errors
        return
    m = result.manifest
    click.echo(
        f"Done: {m['plan']['tiles_with_data']} tiles, {m['throughput_mp_s']} MP/s, "
        f"{m['timings_s']['total_s']} s. Outputs in {result.out_dir}/"
    )
    for name, path in sorted(result.outputs.items()):
        click.echo(f"  {name:<20} {path}")
    qgs = result.out_dir / "project.qgs"
    if qgs.exists():
        shown = str(qgs)
        if shown.startswith("-"):  # "qgis -out/project.qgs" would pass an option to qgis
            shown = f"./{shown}"
        click.echo(f"Open in QGIS: qgis {shlex.quote(shown)}")
    else:
        click.echo(f"Open in QGIS: drag {result.out_dir / 'classes.tif'} into the map")


def _model_options(items: tuple[str, ...]) -> dict[str, Any]:
    """``NAME=VALUE`` pairs, each value read as a YAML scalar or list (4, 0.5, true, [1, 2])."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name.strip():
            raise click.BadParameter(f"{item!r}: expected NAME=VALUE", param_hint="--model-option")
        try:
            out[name.strip()] = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise click.BadParameter(f"{item!r}: {exc}", param_hint="--model-option") from exc
    return out


def _interrupted(ctx: click.Context, out: str | Path, stop: StopRequest) -> None:
    """Say what an interrupted run left and how to resume it, then exit 130 (143: SIGTERM)."""
    from agriseg.survey import REPLACING, WORK_DIR

    args = sys.argv
    work = Path(out) / WORK_DIR
    if (work / "checkpoint.json").exists():
        saved = f"Finished tiles are saved in {work}; run this to resume"
        if (work / REPLACING).exists():
            # --overwrite again would start over; the old results stay until this run ends
            args = [a for a in args if a != "--overwrite"]
            saved += " (the previous results stay in place until it finishes)"
    else:
        saved = "No tile was finished yet; run the same command again"
    cmd = " ".join(shlex.quote(a) for a in args)
    click.echo(f"Interrupted. {saved}:\n  {cmd}", err=True)
    ctx.exit(stop.exit_code)


class _LogProgress:
    """Quiet progress for logs: a line every 10 % when stderr is not a terminal."""

    def __init__(self) -> None:
        self._next = 0.0
        self._t0 = time.perf_counter()
        self._estimated = False
        self._first: tuple[float, int] | None = None

    def start(self, plan: TilePlan, n: int) -> None:
        mp = plan.grid.width * plan.grid.height / 1e6
        click.echo(
            f"{n} of {len(plan)} tiles of {plan.tile_size} px hold data ({mp:.1f} MP raster, "
            f"halo {plan.halo} px, {plan.read_overhead:.2f} px read per output px)",
            err=True,
        )

    def _estimate(self, done: int, total: int) -> None:
        # Early estimate from the first finished tiles (start-up excluded), printed once.
        now = time.perf_counter()
        if self._first is None:
            self._first = (now, done)
            return
        t0, d0 = self._first
        if not self._estimated and done - d0 >= max(2, total // 20) and done < total:
            rate = (done - d0) / max(now - t0, 1e-9)
            left = (total - done) / rate
            when = f"{left / 60:.1f} min" if left >= 60 else f"{max(left, 1):.0f} s"
            click.echo(f"estimate: about {when} for the remaining {total - done} tiles",
                       err=True)
            self._estimated = True

    def update(self, done: int, total: int, pixels: int) -> None:
        self._estimate(done, total)
        frac = done / max(total, 1)
        if frac >= self._next:
            rate = pixels / 1e6 / max(time.perf_counter() - self._t0, 1e-9)
            click.echo(f"tiles {done}/{total} ({frac:.0%}, {rate:.1f} MP/s)", err=True)
            self._next = frac + 0.1

    def stop(self) -> None:
        pass


class _ProgressBar(_LogProgress):
    """rich progress bar: tiles done / total, MP/s, ETA."""

    def __init__(self) -> None:
        super().__init__()
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(
            TextColumn("[bold]segmenting"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), transient=False,
        )
        self._task: Any = None

    def start(self, plan: TilePlan, n: int) -> None:
        super().start(plan, n)
        self._progress.start()
        self._task = self._progress.add_task("tiles", total=n, rate="")

    def update(self, done: int, total: int, pixels: int) -> None:
        if self._task is None:
            return
        self._estimate(done, total)
        rate = pixels / 1e6 / max(time.perf_counter() - self._t0, 1e-9)
        self._progress.update(self._task, completed=done, total=total, rate=f"{rate:.1f} MP/s")

    def stop(self) -> None:
        self._progress.stop()


class _Silent(_LogProgress):
    """No progress at all (``agriseg -q``)."""

    def start(self, plan: TilePlan, n: int) -> None:
        pass

    def update(self, done: int, total: int, pixels: int) -> None:
        pass
