"""The ``agriseg`` command line: thin click commands over the library functions.

Each sub-command lives in its own module and is registered below. Errors derived from
:class:`~agriseg.errors.AgrisegError` are printed as one line and exit with status 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import click

from agriseg import __version__
from agriseg.errors import AgrisegError


@dataclass
class StopRequest:
    """The stop signals a long command received (see :func:`stop_signals`)."""

    interrupted: bool = False  #: Ctrl-C (SIGINT)
    terminated: bool = False  #: SIGTERM (systemd stop, kill, a batch system's time limit)

    @property
    def requested(self) -> bool:
        """Whether a stop was asked for (an error raised since may be the stop itself)."""
        return self.interrupted or self.terminated

    @property
    def exit_code(self) -> int:
        """130 for Ctrl-C, 143 for SIGTERM, as shells report them."""
        return 143 if self.terminated else 130


@contextlib.contextmanager
def stop_signals(ctrl_c: bool = True) -> Iterator[StopRequest]:
    """SIGTERM, and Ctrl-C with ``ctrl_c``, raise KeyboardInterrupt and are remembered.

    SIGTERM takes Ctrl-C's clean path (flush, checkpoint, say how to resume). Remembering
    them lets a command tell a stop that a library turned into another error (Matplotlib:
    "Invalid affine transformation matrix" mid-report) from a real error. A SIGINT the
    process was started to ignore (a job started with & in a script) stays ignored: a
    Ctrl-C meant for the script must not stop the command. The previous handlers come back
    on exit.
    """
    stop = StopRequest()

    def interrupt(signum: int, frame: object) -> None:
        stop.interrupted = True
        raise KeyboardInterrupt

    def terminate(signum: int, frame: object) -> None:
        stop.terminated = True
        raise KeyboardInterrupt

    previous_term = signal.signal(signal.SIGTERM, terminate)
    previous_int = signal.getsignal(signal.SIGINT)
    own_int = ctrl_c and previous_int is signal.default_int_handler
    if own_int:
        signal.signal(signal.SIGINT, interrupt)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        if own_int:
            signal.signal(signal.SIGINT, previous_int)


class NonEmptyPath(click.Path):
    """``click.Path`` that refuses an empty string (it became ".", the current folder)."""

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        """The path, or a usage error for an empty string or one GDAL cannot take."""
        if isinstance(value, str) and not value.strip():
            self.fail("is empty; give a path", param, ctx)
        try:
            os.fsdecode(value).encode("utf-8")
        except UnicodeEncodeError:
            # A file name in another encoding (Latin-1 from an old USB stick): GDAL takes
            # UTF-8 paths only, and failed with a traceback deep in rasterio.
            self.fail(f"{os.fsdecode(value)!r} is not valid UTF-8; rename it (convmv -f "
                      "latin1 -t utf8 --notest FILE)", param, ctx)
        return super().convert(value, param, ctx)


class AgrisegGroup(click.Group):
    """Turns library errors into one-line messages with exit status 2."""

    def invoke(self, ctx: click.Context) -> Any:
        """Run the sub-command, rendering AgrisegError cleanly."""
        try:
            return super().invoke(ctx)
        except AgrisegError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"Error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            ctx.exit(130)


@click.group(cls=AgrisegGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="agriseg")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.pass_context
def main(ctx: click.Context, verbose: int, quiet: bool, debug: bool) -> None:
    """Aerial agriculture field analysis: crop / weed / disease / soil maps from orthomosaics.

    \b
    Typical night run:
        agriseg run survey.tif --fields fields.gpkg --out results/
    then open results/project.qgs in QGIS.
    """  # noqa: D301 (click's no-rewrap marker is the \b character)
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    level = logging.WARNING if quiet else (logging.INFO if verbose < 2 else logging.DEBUG)
    if verbose == 0 and not quiet:
        level = logging.INFO
    logging.basicConfig(
        level=level,
        format="%(levelname)s %(name)s: %(message)s" if verbose > 1 else "%(message)s",
        stream=sys.stderr,
        force=True,
    )
    ctx.obj["verbose"] = verbose
    ctx.obj["quiet"] = quiet
    quiet_third_party(verbose)


def quiet_third_party(verbose: int) -> None:
    """Keep third-party chatter (Dask, GDAL bindings) out of the log unless -vv."""
    for noisy in ("distributed", "rasterio", "fiona", "pyogrio", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.ERROR if verbose < 2 else logging.INFO)
    tornado = logging.getLogger("tornado.application")
    if not any(isinstance(f, _UnboundCancelFilter) for f in tornado.filters):
        tornado.addFilter(_UnboundCancelFilter())
    loop_log = logging.getLogger("asyncio")
    if verbose < 2 and not any(isinstance(f, _ShutdownTimeoutFilter) for f in loop_log.filters):
        loop_log.addFilter(_ShutdownTimeoutFilter())


class _UnboundCancelFilter(logging.Filter):
    """Drops the traceback of a Dask cancel callback that had nothing to cancel.

    When Ctrl-C or SIGTERM lands while ``distributed.utils.sync`` has not yet started
    its coroutine, the cancel callback it schedules reads ``future`` before it is bound
    (distributed 2026.8), and tornado logs that NameError with a traceback after our
    clean "Interrupted ... run the same command again" message. Nothing was left running.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (isinstance(exc, NameError) and "'future'" in str(exc))


class _ShutdownTimeoutFilter(logging.Filter):
    """Drops asyncio's report of a Dask timeout that nobody waited for.

    About once in 240 finished runs (a regression hunt, 2026-11-28) a timeout of the embedded
    cluster's shutdown, which Dask does not wait for, reached asyncio's "Future exception was
    never retrieved" report: three lines and "TimeoutError: Timeout" under a run that had
    written everything and exited 0. ``-vv`` keeps them.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (str(record.msg).startswith("Future exception was never retrieved")
                    and type(exc).__name__ == "TimeoutError")


def _register() -> None:
    from agriseg.cli.evaluate import evaluate
    from agriseg.cli.export import export
    from agriseg.cli.models import models
    from agriseg.cli.prescription import prescription
    from agriseg.cli.run import run
    from agriseg.cli.synth import synth
    from agriseg.cli.train import train

    for cmd in (run, synth, evaluate, models, train, export, prescription):
        main.add_command(cmd)


_register()


def entry_point() -> None:
    """The ``agriseg`` program: :func:`main`, then an interpreter exit without the last sweeps.

    A run leaves a few million objects (PyTorch's and Dask's modules, the model, the plan);
    the cyclic garbage collector's passes over them while the interpreter tears down took
    1.2-1.4 s of every command's wall time (most of a small survey's fixed cost after its
    outputs are written). Freezing them first makes those passes skip them; the process's
    memory goes back to the OS on exit all the same. Only the real program does this: the
    tests call :func:`main` in one long-lived process.
    """
    try:
        main()
    finally:
        gc.freeze()

