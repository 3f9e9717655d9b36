"""Resume after interruption, worker loss, hostile environments and bad rasters."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import dask
import numpy as np
import pytest
import rasterio
import rasterio.shutil
from affine import Affine
from click.testing import CliRunner
from distributed import Client, LocalCluster

from agriseg.classes import DEFAULT_CLASSES
from agriseg.cli import main
from agriseg.config import build_run_config
from agriseg.errors import OutputError, ResumeError
from agriseg.output import disk_estimate
from agriseg.survey import _output_specs, process_survey
from tests.conftest import toy_field, write_rgba

AGRISEG = [sys.executable, "-m", "agriseg"]
# These tests are about the pipeline's mechanics; the cheapest model keeps them quick.
FAST = "index-threshold"


def _read(path: Path) -> np.ndarray:
    with rasterio.open(path) as ds:
        return ds.read(1)


def _same_outputs(a: Path, b: Path) -> None:
    for name in ("classes.tif", "confidence.tif", "indices/exg.tif"):
        x, y = _read(a / name), _read(b / name)
        assert np.array_equal(x, y, equal_nan=True), name


@pytest.fixture()
def big_tif(tmp_path: Path) -> Path:
    rgb, valid = toy_field(640, 576, seed=3)
    return write_rgba(tmp_path / "big.tif", rgb, valid)


def _cfg(src: Path, out: Path, scheduler: str, **kw: object):
    """A run of the cheapest model in 64 px tiles (90 tiles on ``big_tif``)."""
    return build_run_config(model=FAST, input=src, out=out, tile_size=64, scheduler=scheduler, **kw)


def _interrupt_after(n: int):
    def progress(done: int, total: int, px: int) -> None:
        if done >= n and done < total:
            raise KeyboardInterrupt

    return progress


def test_interrupt_then_resume_is_identical(big_tif: Path, tmp_path: Path, scheduler: str) -> None:
    ref = process_survey(_cfg(big_tif, tmp_path / "ref", scheduler))
    cfg = _cfg(big_tif, tmp_path / "run", scheduler, checkpoint_seconds=0)
    with pytest.raises(KeyboardInterrupt):
        process_survey(cfg, progress=_interrupt_after(20))
    ckpt = json.loads((tmp_path / "run" / ".agriseg-work" / "checkpoint.json").read_text())
    assert 20 <= len(ckpt["done"]) < 90
    assert not (tmp_path / "run" / "run.json").exists()
    seen: list[int] = []
    res = process_survey(cfg, progress=lambda d, t, p: seen.append(d))
    assert seen[0] >= 20  # started from the checkpoint, not from zero
    _same_outputs(ref.out_dir, res.out_dir)
    # counted from the tiles in one run, from the finished mask after a resume: the same
    assert res.manifest["class_pixels"] == ref.manifest["class_pixels"]


def test_unreadable_checkpoint_starts_over(big_tif: Path, tmp_path: Path, scheduler: str,
                                          caplog: pytest.LogCaptureFixture) -> None:
    ref = process_survey(_cfg(big_tif, tmp_path / "ref", scheduler))
    cfg = _cfg(big_tif, tmp_path / "run", scheduler, checkpoint_seconds=0)
    with pytest.raises(KeyboardInterrupt):
        process_survey(cfg, progress=_interrupt_after(20))
    (tmp_path / "run" / ".agriseg-work" / "checkpoint.json").write_text('{"identity": {"inp')
    seen: list[int] = []
    with caplog.at_level("WARNING", logger="agriseg.predict"):
        res = process_survey(cfg, progress=lambda d, t, p: seen.append(d))
    assert "unreadable checkpoint, starting over" in caplog.text
    assert seen[0] < 20  # every tile again
    _same_outputs(ref.out_dir, res.out_dir)


def test_resume_refused_when_input_changed(big_tif: Path, tmp_path: Path, scheduler: str) -> None:
    cfg = _cfg(big_tif, tmp_path / "run", scheduler, checkpoint_seconds=0)
    with pytest.raises(KeyboardInterrupt):
        process_survey(cfg, progress=_interrupt_after(5))
    with rasterio.open(big_tif, "r+") as ds:  # the survey changed since
        ds.write(np.zeros((1, 8, 8), "uint8"), [1], window=((0, 8), (0, 8)))
    with pytest.raises(ResumeError, match="--overwrite"):
        process_survey(cfg)
    changed = build_run_config(
        model=FAST, input=big_tif, out=tmp_path / "run", tile_size=128, scheduler=scheduler
    )
    with pytest.raises(ResumeError, match=r"tile_size.* -> 128"):
        process_survey(changed)
    fresh = _cfg(big_tif, tmp_path / "run", scheduler, overwrite=True)
    assert process_survey(fresh).manifest["plan"]["tiles"] == 90


def test_interrupted_overwrite_keeps_the_finished_results(big_tif: Path, tmp_path: Path,
                                                          scheduler: str) -> None:
    """--overwrite deleted a finished run's outputs at start-up: a Ctrl-C then left nothing."""
    out = tmp_path / "run"
    first = process_survey(_cfg(big_tif, out, scheduler, skip=["report", "project"]))
    before = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    classes = _read(out / "classes.tif")
    again = _cfg(big_tif, out, scheduler, skip=["report", "project"], indices=False,
                 overwrite=True, checkpoint_seconds=0)
    with pytest.raises(KeyboardInterrupt):
        process_survey(again, progress=_interrupt_after(5))
    assert (out / "run.json").exists()
    assert all((out / rel).exists() for rel in first.outputs.values())
    # another run (--no-resume ignores the checkpoint) still needs --overwrite
    with pytest.raises(OutputError, match="holds the results of a finished run"):
        process_survey(again.model_copy(update={"overwrite": False, "resume": False}))
    # the same command without --overwrite resumes it, and the old run's extras go
    resumed = process_survey(again.model_copy(update={"overwrite": False}))
    assert resumed.manifest["parameters"]["indices"] is False
    assert not (out / "indices").exists()  # files and folder
    assert not (out / ".agriseg-work").exists()
    after = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert set(after) < set(before)
    assert np.array_equal(classes, _read(out / "classes.tif"))
    assert first.manifest["parameters"]["indices"] is True


def _small_tiles_cmd(src: Path, out: Path, *extra: str) -> list[str]:
    """A subprocess run with many small tiles and one worker."""
    return [*AGRISEG, "run", str(src), "--out", str(out), "--tile-size", "64", "--workers", "1",
            *extra, "--no-progress", "--model", FAST]


def _slow_run_cmd(src: Path, out: Path) -> list[str]:
    """:func:`_small_tiles_cmd` with a checkpoint after every tile."""
    return _small_tiles_cmd(src, out, "--checkpoint-seconds", "0")


def _poll(pred, timeout: float = 60.0) -> bool:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return True
        time.sleep(0.02)
    return False


def _done_tiles(out: Path) -> int:
    try:
        return len(json.loads((out / ".agriseg-work" / "checkpoint.json").read_text())["done"])
    except (OSError, ValueError):
        return 0


@pytest.mark.parametrize("stage", ["tiles", "finalize"])
def test_sigkill_subprocess_then_resume(
    big_tif: Path, tmp_path: Path, scheduler: str, stage: str
) -> None:
    out = tmp_path / "killed"
    cmd = _slow_run_cmd(big_tif, out)
    proc = subprocess.Popen(
        cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        if stage == "tiles":
            hit = _poll(lambda: _done_tiles(out) >= 10 or proc.poll() is not None)
        else:
            work = out / ".agriseg-work"
            hit = _poll(
                lambda: (
                    any(work.glob(".*.partial.tif"))
                    or (work / "classes.tif").exists()
                    or proc.poll() is not None
                )
            )
        assert hit, "run made no progress"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (out / "run.json").exists() or proc.returncode == 0
    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    ref = process_survey(_cfg(big_tif, tmp_path / "ref", scheduler))
    _same_outputs(ref.out_dir, out)


def test_worker_killed_mid_run(big_tif: Path, tmp_path: Path) -> None:
    # Dask's active memory manager, run often, drops every extra copy of data that no waiting
    # task needs before the kill (it runs every 2 s by default, so this was a race).
    amm = {"distributed.scheduler.active-memory-manager.interval": "50ms"}
    with dask.config.set(amm), LocalCluster(n_workers=2, threads_per_worker=1,
                                            dashboard_address=None) as cluster:
        killed: list[int] = []

        def progress(done: int, total: int, px: int) -> None:
            if done >= 5 and not killed:
                nanny = next(iter(cluster.workers.values()))
                victim = nanny.process.process.pid
                os.kill(victim, signal.SIGKILL)
                killed.append(victim)

        cfg = _cfg(big_tif, tmp_path / "w", cluster.scheduler_address)
        res = process_survey(cfg, progress=progress)
        assert killed
        ref = process_survey(_cfg(big_tif, tmp_path / "ref", cluster.scheduler_address))
    _same_outputs(ref.out_dir, res.out_dir)


def test_sigterm_stops_cleanly_with_resume_hint(big_tif: Path, tmp_path: Path) -> None:
    out = tmp_path / "t"
    cmd = _slow_run_cmd(big_tif, out)
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    _poll(lambda: _done_tiles(out) >= 5 or proc.poll() is not None)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("run finished before SIGTERM arrived")
    assert proc.returncode == 143, err  # terminated, not Ctrl-C (130)
    assert "Finished tiles are saved" in err and "run this to resume" in err
    assert "Traceback" not in err
    assert _done_tiles(out) >= 5


# ----------------------------------------------------------------- hostile environment


def _cli(*args: str) -> tuple[int, str]:
    r = CliRunner().invoke(main, list(args))
    return r.exit_code, r.output


def test_interrupt_before_dask_call_starts_logs_no_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Ctrl-C while distributed.utils.sync has not started its coroutine yet: Dask's cancel
    # callback then raises NameError on the event loop (seen in CI after SIGTERM). Made
    # deterministic by keeping the loop busy until after the interrupt has landed.
    from distributed.utils import LoopRunner, sync

    from agriseg.cli import quiet_third_party

    async def work() -> int:
        return 1

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    quiet_third_party(0)
    runner = LoopRunner(asynchronous=False)
    runner.start()
    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        runner.loop.add_callback(time.sleep, 0.3)
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        with pytest.raises(KeyboardInterrupt):
            sync(runner.loop, work)
        time.sleep(0.5)  # let the loop run the cancel callback
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        runner.stop()
    assert not [r for r in caplog.records if r.exc_info], caplog.text


def test_unretrieved_shutdown_timeout_is_not_reported(caplog: pytest.LogCaptureFixture) -> None:
    # asyncio reports a future whose exception nobody retrieved when it is collected: a Dask
    # shutdown timeout under a finished run (exit 0) printed "TimeoutError: Timeout".
    import asyncio
    import gc

    from agriseg.cli import quiet_third_party

    quiet_third_party(0)

    async def unretrieved(exc: BaseException) -> None:
        fut = asyncio.get_running_loop().create_future()
        fut.set_exception(exc)
        del fut
        gc.collect()

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        asyncio.run(unretrieved(TimeoutError("Timeout")))
        assert not caplog.records, caplog.text
        asyncio.run(unretrieved(ValueError("a real one")))  # others are still reported
    assert "never retrieved" in caplog.text and "a real one" in caplog.text


def test_output_folder_not_writable(rgba_tif: Path, tmp_path: Path) -> None:
    if os.geteuid() == 0:
        target = Path("/proc/agriseg-out")  # read-only for root too
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        target = ro / "out"
    code, out = _cli("run", str(rgba_tif), "--out", str(target))
    assert code == 2 and "cannot write there" in out and "Traceback" not in out


def test_disk_full_is_a_clear_error(big_tif: Path, tmp_path: Path) -> None:
    out = tmp_path / "full"

    def limit() -> None:
        # A file-size limit makes writes fail with EFBIG like a full disk (no root needed).
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))

    r = subprocess.run(
        _small_tiles_cmd(big_tif, out),
        capture_output=True,
        text=True,
        preexec_fn=limit,
        timeout=300,
    )
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("Error:") and "disk" in last, r.stderr
    assert "Traceback" not in r.stderr
    assert not (out / "run.json").exists() and not (out / "classes.tif").exists()


def test_small_disk_warned_before_the_tiles(big_tif: Path, tmp_path: Path, scheduler: str,
                                           monkeypatch: pytest.MonkeyPatch,
                                           caplog: pytest.LogCaptureFixture) -> None:
    """A disk that looks too small is named before the tiles start.

    Only a warning: the estimate is an upper bound, and a full disk stops with its own error
    and resumes.
    """
    import shutil

    real = shutil.disk_usage

    def small(path: object) -> object:
        return real(path)._replace(free=200_000)  # type: ignore[arg-type]

    monkeypatch.setattr("agriseg.survey.shutil.disk_usage", small)
    seen: list[int] = []
    with caplog.at_level("WARNING", logger="agriseg.survey"):
        res = process_survey(_cfg(big_tif, tmp_path / "run", scheduler),
                             progress=lambda d, t, p: seen.append(len(caplog.records)))
    warning = next(r.message for r in caplog.records if "of disk" in r.message)
    assert "0 MB are free" in warning and "--no-indices" in warning and "--out" in warning
    assert seen and seen[0] >= 1  # logged before the first tile finished
    written = sum(f.stat().st_size for f in res.out_dir.rglob("*.tif"))
    specs = _output_specs(DEFAULT_CLASSES, ("exg", "vari", "gli"))
    assert disk_estimate(specs, 640 * 576) > written


def test_second_run_into_the_same_folder_is_refused(rgba_tif: Path, tmp_path: Path,
                                                    scheduler: str) -> None:
    """A cron rerun that finds the first run still writing must not write beside it."""
    import fcntl

    out = tmp_path / "o"
    out.mkdir()
    with open(out / ".agriseg.lock", "a+") as held:  # what a running agriseg holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 4242 on farm-pc, started 2026-11-27 20:00:00\n")
        held.flush()
        r = CliRunner().invoke(main, ["run", str(rgba_tif), "--out", str(out), "--scheduler",
                                      scheduler, "--model", FAST, "--no-progress"])
        assert r.exit_code == 2 and "another agriseg run is writing there" in r.output
        assert "pid 4242 on farm-pc" in r.output and "Traceback" not in r.output
        assert sorted(p.name for p in out.iterdir()) == [".agriseg.lock"]
    # released (the holder ended): the run goes ahead and leaves no lock behind
    r = CliRunner().invoke(main, ["run", str(rgba_tif), "--out", str(out), "--scheduler",
                                  scheduler, "--model", FAST, "--no-progress"])
    assert r.exit_code == 0, r.output
    assert not (out / ".agriseg.lock").exists() and (out / "run.json").exists()


@pytest.mark.skipif(sys.platform != "linux", reason="post-processing workers fork on Linux")
@pytest.mark.parametrize("server", [False, True])
def test_a_killed_runs_workers_neither_keep_its_lock_nor_outlive_it(tmp_path: Path,
                                                                     server: bool) -> None:
    """SIGKILL during the field summaries: a forked worker held the folder's flock forever.

    Workers from the fork server (a run that imported PyTorch) outlived it too: they kept
    the server alive, so it never left them.
    """
    import fcntl

    lock = tmp_path / ".agriseg.lock"
    # A stand-in for PyTorch in sys.modules makes the pool use the fork server.
    server_lines = ("sys.modules.setdefault('torch', types.ModuleType('torch'))\n"
                    "pool.allow_fork_server()\n") if server else ""
    script = (
        "import fcntl, os, sys, time, types\n"
        "from agriseg import pool\n"
        f"{server_lines}"
        "fh = open(sys.argv[1], 'a+')\n"
        "fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
        "pool.keep_from_workers(fh.fileno())\n"
        "print(pool.start_method(), flush=True)\n"
        "print(pool.get_pool(1).submit(os.getpid).result(), flush=True)\n"
        "time.sleep(120)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(lock)], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == ("forkserver" if server else "fork")
        worker = int(proc.stdout.readline())
    finally:
        proc.kill()
        proc.wait()

    def alive(pid: int) -> bool:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return False
        return state != "Z"

    with open(lock, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free at once: no worker holds it
    deadline = time.monotonic() + 10
    while alive(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(worker)


def test_inputs_that_outputs_would_replace_are_refused(rgba_tif: Path, tmp_path: Path) -> None:
    """``--out .`` beside a survey named classes.tif or fields named fields.gpkg."""
    out = tmp_path / "farm"
    (out / "indices").mkdir(parents=True)
    shutil.copy(rgba_tif, out / "classes.tif")
    shutil.copy(rgba_tif, out / "indices" / "ndvi.tif")
    shutil.copy(rgba_tif, out / "ortho.tif")
    fields = out / "fields.gpkg"
    fields.write_bytes(b"the user's field polygons")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for args in (["classes.tif"], ["indices/ndvi.tif"], ["ortho.tif", "--fields", "fields.gpkg"]):
        args[0] = str(out / args[0])
        if len(args) > 1:
            args[2] = str(out / args[2])
        code, text = _cli("run", *args, "--out", str(out), "--overwrite", "--no-progress")
        assert code == 2 and "under a name the run writes" in text, text
        assert "choose another --out" in text and "Traceback" not in text
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_scheduler_unreachable(rgba_tif: Path, tmp_path: Path) -> None:
    t0 = time.monotonic()
    code, out = _cli(
        "run",
        str(rgba_tif),
        "--out",
        str(tmp_path / "o"),
        "--scheduler",
        "tcp://127.0.0.1:9",
        "--scheduler-timeout",
        "2",
    )
    assert code == 2 and "cannot reach a Dask scheduler" in out
    assert time.monotonic() - t0 < 60


def test_scheduler_address_that_is_no_scheduler(rgba_tif: Path, tmp_path: Path) -> None:
    """A web server at the address (the dashboard's port given for the scheduler's) hung the
    run past its timeout, or made Dask allocate exabytes."""
    import http.server
    import threading

    class Quiet(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    t0 = time.monotonic()
    try:
        code, out = _cli("run", str(rgba_tif), "--out", str(tmp_path / "o"), "--scheduler",
                         f"tcp://127.0.0.1:{server.server_address[1]}",
                         "--scheduler-timeout", "2")
    finally:
        server.shutdown()
    assert code == 2 and "Dask scheduler" in out and "Traceback" not in out, out
    assert time.monotonic() - t0 < 60


def test_scheduler_file_missing(rgba_tif: Path, tmp_path: Path) -> None:
    """A mistyped --scheduler-file fails after --scheduler-timeout (Client waits forever)."""
    t0 = time.monotonic()
    missing = tmp_path / "nope" / "scheduler.json"
    code, out = _cli("run", str(rgba_tif), "--out", str(tmp_path / "o"), "--scheduler-file",
                     str(missing), "--scheduler-timeout", "1")
    assert code == 2 and "scheduler file not found after 1 s" in out and str(missing) in out
    assert time.monotonic() - t0 < 60
    # said before anything else is done: no survey read, no output folder
    assert "waiting up to 1 s for the scheduler file" in out and "px, " not in out
    assert not (tmp_path / "o").exists()
    # a file that is not a scheduler file (distributed failed an assertion on it)
    for i, text in enumerate(("garbage", "", "[1]", '{"address": 5}')):
        bad = tmp_path / f"s{i}.json"
        bad.write_text(text)
        code, out = _cli("run", str(rgba_tif), "--out", str(tmp_path / "o"),
                         "--scheduler-file", str(bad), "--scheduler-timeout", "0.5")
        assert code == 2 and "holds no scheduler address" in out and "Traceback" not in out
    # a file left by a scheduler that has stopped: its address is dead
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    stale = tmp_path / "stale.json"
    stale.write_text(json.dumps({"type": "Scheduler", "address": f"tcp://127.0.0.1:{port}"}))
    code, out = _cli("run", str(rgba_tif), "--out", str(tmp_path / "o"), "--scheduler-file",
                     str(stale), "--scheduler-timeout", "1")
    assert code == 2 and "Traceback" not in out, out
    assert "may be left from a scheduler that has stopped" in out and str(port) in out, out
    assert "--scheduler-file out" in out, out


def test_workers_cannot_see_input(scheduler: str) -> None:
    from agriseg.errors import ClusterError
    from agriseg.predict import check_workers_see

    with Client(scheduler) as client:
        check_workers_see(client, __file__)
        with pytest.raises(ClusterError, match="not visible to Dask worker"):
            check_workers_see(client, "/nonexistent/survey.tif")


# ----------------------------------------------------------------- bad rasters


def _profile(h: int = 32, w: int = 32, **kw: object) -> dict[str, object]:
    p: dict[str, object] = {
        "driver": "GTiff",
        "height": h,
        "width": w,
        "count": 3,
        "dtype": "uint8",
        "crs": "EPSG:32615",
        "transform": Affine(0.02, 0, 5e5, 0, -0.02, 4.9e6),
    }
    p.update(kw)
    return p


def _write(path: Path, data: np.ndarray | None = None, **kw: object) -> Path:
    prof = _profile(**kw)
    with rasterio.open(path, "w", **prof) as ds:
        if data is None:
            data = np.full((prof["count"], prof["height"], prof["width"]), 100, dtype=prof["dtype"])
        ds.write(data)
    return path


@pytest.mark.parametrize(
    ("kind", "needle"),
    [
        ("identity", "no geotransform"),
        ("rotated", "rotated or sheared"),
        ("southup", "the grid is flipped (south-up"),
        ("complex", "complex data type"),
        ("tiny", "at least 8x8"),
        ("allnodata", "every pixel is nodata"),
        ("truncated", "truncated or corrupt"),
        ("onebands", "a single-band product"),
        ("onebands_red", "needs band roles"),
        ("sparse", "every pixel is nodata"),
        ("vrt", "source file(s)"),
        ("zip", "is a ZIP archive holding tile.tif; unzip it"),
    ],
)
def test_bad_rasters(tmp_path: Path, kind: str, needle: str) -> None:
    src = tmp_path / f"{kind}.tif"
    if kind == "identity":
        _write(src, transform=Affine.identity(), crs=None)
        src2 = tmp_path / "identity_crs.tif"
        _write(src2, transform=Affine.identity())
        src = src2
    elif kind == "rotated":
        _write(src, transform=Affine(0.02, 0.01, 5e5, 0.01, -0.02, 4.9e6))
    elif kind == "southup":  # the report's field maps failed deep in rasterio
        _write(src, transform=Affine(0.02, 0, 5e5, 0, 0.02, 4.9e6))
    elif kind == "complex":
        _write(src, dtype="complex64", count=1)
    elif kind == "tiny":
        _write(src, h=1, w=1)
    elif kind == "allnodata":
        _write(src, np.zeros((3, 32, 32), "uint8"), nodata=0)
    elif kind == "truncated":
        rgb, valid = toy_field(512, 512)
        write_rgba(src, rgb, valid, block=128)
        data = src.read_bytes()
        src.write_bytes(data[: len(data) // 2])
    elif kind.startswith("onebands"):
        _write(src, count=1)
    elif kind == "sparse":
        prof = _profile(
            h=40000,
            w=40000,
            count=3,
            nodata=0,
            tiled=True,
            blockxsize=512,
            blockysize=512,
            sparse_ok=True,
            compress="deflate",
        )
        with rasterio.open(src, "w", **prof):
            pass  # nothing written: a huge, all-nodata, tiny file
    elif kind == "zip":  # an orthomosaic as delivered
        import zipfile

        tile = _write(tmp_path / "tile.tif")
        src = tmp_path / "delivery.zip"
        with zipfile.ZipFile(src, "w") as z:
            z.write(tile, "tile.tif")
    elif kind == "vrt":  # a mosaic whose tiles were moved away
        tile = _write(tmp_path / "tile.tif")
        src = tmp_path / "mosaic.vrt"
        rasterio.shutil.copy(tile, src, driver="VRT")
        tile.unlink()
    extra = ["--bands", "red=1"] if kind == "onebands_red" else []
    code, out = _cli("run", str(src), "--out", str(tmp_path / "o"), "--no-progress", *extra)
    assert code == 2, out
    assert needle in out, out
    assert "Traceback" not in out
    assert not (tmp_path / "o" / "run.json").exists()
    assert not (tmp_path / "o" / "classes.tif").exists()
    if kind != "truncated":  # found while reading the tiles
        # Refused before any work, or (missing bands) once the model settled them in its
        # prepare: no output folder is left behind either way.
        assert not (tmp_path / "o").exists()
        assert "no vegetation" not in out


def test_geographic_crs_works(tmp_path: Path, scheduler: str) -> None:
    rgb, valid = toy_field(64, 64)
    src = write_rgba(
        tmp_path / "geo.tif",
        rgb,
        valid,
        transform=Affine(2e-7, 0, -95.0, 0, -2e-7, 44.0),
        crs="EPSG:4326",
    )
    res = process_survey(
        build_run_config(model=FAST, input=src, out=tmp_path / "o", scheduler=scheduler)
    )
    area = res.manifest["class_area_m2"]
    px = res.manifest["class_pixels"]
    # 2e-7 deg is ~2.2 cm north-south, ~1.6 cm east-west at 44 N: ~3.6 cm2 per pixel
    per_px = area["crop"] / px["crop"]
    assert 2.5e-4 < per_px < 4.5e-4


def test_red_and_nir_only_runs_with_the_default_model(tmp_path: Path, scheduler: str) -> None:
    """A two-band red + NIR stack: the label-free model settles on NDVI in its prepare (an
    early check against its RGB default refused it, 2026-11-27)."""
    rgb, valid = toy_field(96, 96)
    red = np.where(valid, rgb[0].astype(np.uint16) * 10 + 100, 0)
    nir = np.where(valid, np.where(rgb[1] > rgb[0], 4000, 1800), 0).astype(np.uint16)
    src = tmp_path / "rn.tif"
    with rasterio.open(src, "w", driver="GTiff", width=96, height=96, count=2, dtype="uint16",
                       crs="EPSG:32615", nodata=0,
                       transform=Affine(0.02, 0, 5e5, 0, -0.02, 4.9e6)) as dst:
        dst.write(np.stack([red, nir]))
    code, out = _cli("run", str(src), "--out", str(tmp_path / "o"), "--bands", "red=1,nir=2",
                     "--scheduler", scheduler, "--no-progress", "--skip", "report,project")
    assert code == 0, out
    run = json.loads((tmp_path / "o" / "run.json").read_text())
    assert run["model"]["roles"][:2] == ["red", "nir"] and "indices/ndvi" in run["outputs"]


def test_out_path_too_long_for_geopackages(rgba_tif: Path, tmp_path: Path) -> None:
    """Past SQLite's path limit the run failed after all its tiles; now before any work."""
    out = tmp_path.joinpath(*["d" * 100] * 5)
    code, text = _cli("run", str(rgba_tif), "--out", str(out))
    assert code == 2 and "the path is too long" in text and not out.parent.exists()
