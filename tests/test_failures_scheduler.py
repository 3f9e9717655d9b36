"""An external Dask scheduler killed mid-run: a prompt one-line error, then a resume.

The cluster is started as on a farm (`dask scheduler` and `dask worker` processes sharing a
scheduler file on loopback) and the scheduler is SIGKILLed while tiles are in flight.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import rasterio
from click.testing import CliRunner

from agriseg.cli import main
from tests.conftest import stop_processes, toy_field, write_rgba

SCHEDULER = [sys.executable, "-m", "distributed.cli.dask_scheduler"]
WORKER = [sys.executable, "-m", "distributed.cli.dask_worker"]


class _Cluster:
    """`dask scheduler` + one single-threaded `dask worker`, started from a scheduler file."""

    def __init__(self, sfile: Path) -> None:
        self.sfile = sfile
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        self.sfile.unlink(missing_ok=True)  # a killed scheduler leaves its file behind
        self.scheduler = subprocess.Popen(
            [*SCHEDULER, "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
             "--scheduler-file", str(self.sfile)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self.procs.append(self.scheduler)
        t0 = time.monotonic()
        while not self.sfile.exists() and time.monotonic() - t0 < 60:
            time.sleep(0.05)
        assert self.sfile.exists(), "dask scheduler did not start"
        self.procs.append(subprocess.Popen(
            [*WORKER, "--scheduler-file", str(self.sfile), "--nthreads", "1", "--nworkers",
             "1", "--no-dashboard", "--host", "127.0.0.1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        from distributed import Client

        with Client(scheduler_file=str(self.sfile), timeout=60) as c:
            c.wait_for_workers(1, timeout=60)

    def kill_scheduler(self) -> None:
        os.killpg(self.scheduler.pid, signal.SIGKILL)
        self.scheduler.wait()

    def stop(self) -> None:
        stop_processes(self.procs)
        self.procs.clear()


@pytest.fixture()
def farm(tmp_path: Path) -> Iterator[_Cluster]:
    cluster = _Cluster(tmp_path / "scheduler.json")
    try:
        yield cluster
    finally:
        cluster.stop()


def _done_tiles(out: Path) -> int:
    try:
        return len(json.loads((out / ".agriseg-work" / "checkpoint.json").read_text())["done"])
    except (OSError, ValueError, KeyError):
        return 0


def test_scheduler_killed_mid_run_fails_fast_then_resumes(tmp_path: Path,
                                                          farm: _Cluster) -> None:
    rgb, valid = toy_field(512, 512, seed=5)
    src = write_rgba(tmp_path / "survey.tif", rgb, valid)
    out = tmp_path / "out"
    # The default (label-free) model in 64 px tiles: 64 tiles, several seconds on one worker.
    # A long --scheduler-timeout: the run must not wait out the client's reconnection.
    args = ["run", str(src), "--out", str(out), "--tile-size", "64", "--no-indices",
            "--skip", "quicklook,zones,fields,report,project", "--checkpoint-seconds", "0",
            "--scheduler-file", str(farm.sfile), "--scheduler-timeout", "60", "--no-progress"]
    farm.start()
    proc = subprocess.Popen([sys.executable, "-m", "agriseg", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        t0 = time.monotonic()
        while _done_tiles(out) < 3 and proc.poll() is None and time.monotonic() - t0 < 60:
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before the scheduler was killed"
        farm.kill_scheduler()
        killed = time.monotonic()
        _, err = proc.communicate(timeout=60)
        took = time.monotonic() - killed
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    assert proc.returncode == 2, err
    assert took < 15, f"{took:.1f} s to give up after the scheduler was killed"
    last = err.strip().splitlines()[-1]
    address = json.loads(farm.sfile.read_text())["address"]
    assert last.startswith(f"Error: lost the Dask scheduler at {address} (scheduler file "
                           f"{farm.sfile})"), err
    assert "rerun the same command to resume" in last
    assert "Traceback" not in err and "resubmitting" not in err, err
    # nothing that looks finished: only the working folder, with the saved tiles
    assert sorted(p.name for p in out.iterdir()) == [".agriseg-work"]
    saved = _done_tiles(out)
    assert 3 <= saved < 64

    # The same command against a fresh scheduler (same scheduler file) resumes.
    farm.stop()
    farm.start()
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert f"resuming: {saved} tile(s) already done" in r.output
    assert (out / "run.json").exists() and not (out / ".agriseg-work").exists()
    with rasterio.open(out / "classes.tif") as ds:
        classes = ds.read(1)
        assert ds.shape == (512, 512)
    assert set(np.unique(classes)) <= {0, 1, 2, 3, 255}
    assert (classes == 0).any() and (classes == 1).any()
    assert np.array_equal(classes == 255, ~valid)
