"""A survey through a real multi-process cluster started like on a farm: `dask scheduler` and
`dask worker` processes sharing a scheduler file on loopback."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import rasterio
from click.testing import CliRunner

from agriseg import raster
from agriseg.cli import main
from tests.conftest import stop_processes

DASK = [sys.executable, "-m", "distributed.cli.dask_scheduler"]
WORKER = [sys.executable, "-m", "distributed.cli.dask_worker"]


@pytest.fixture()
def scheduler_file(tmp_path: Path) -> Iterator[Path]:
    sfile = tmp_path / "scheduler.json"
    procs = [
        subprocess.Popen(
            [*DASK, "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
             "--scheduler-file", str(sfile)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
    ]
    try:
        t0 = time.monotonic()
        while not sfile.exists() and time.monotonic() - t0 < 60:
            time.sleep(0.1)
        assert sfile.exists(), "dask scheduler did not start"
        for name in ("w1", "w2"):
            procs.append(subprocess.Popen(
                [*WORKER, "--scheduler-file", str(sfile), "--nthreads", "1", "--nworkers", "1",
                 "--name", name, "--no-dashboard", "--host", "127.0.0.1"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            ))
        from distributed import Client

        with Client(scheduler_file=str(sfile), timeout=60) as c:
            c.wait_for_workers(2, timeout=90)
        yield sfile
    finally:
        stop_processes(procs)


def test_survey_on_existing_cluster(rgba_tif: Path, tmp_path: Path, scheduler_file: Path) -> None:
    out = tmp_path / "o"
    r = CliRunner().invoke(main, ["run", str(rgba_tif), "--out", str(out), "--tile-size", "64",
                                  "--scheduler-file", str(scheduler_file), "--no-progress"])
    assert r.exit_code == 0, r.output
    with rasterio.open(out / "classes.tif") as ds:
        classes = ds.read(1)
    assert (classes == 1).any() and (classes == 0).any()
    # both worker processes took tiles
    from distributed import Client

    with Client(scheduler_file=str(scheduler_file)) as c:
        logs = c.run(lambda dask_worker: len(dask_worker.data) + dask_worker.state.executed_count)
        # and they hold no decoded blocks of the survey once it is done
        cached = c.run(lambda: raster._TILE_BLOCKS.nbytes)
    assert all(n > 0 for n in logs.values()), logs
    assert set(cached.values()) == {0}, cached
    assert np.count_nonzero(classes == 255) > 0


def test_gpu_worker_threads_share_the_cores() -> None:
    from agriseg.predict import gpu_worker_threads

    # at most 8 per GPU, never fewer than 2 (one reading while one runs the model)
    assert [gpu_worker_threads(c, g) for c, g in ((16, 1), (6, 1), (16, 4), (2, 1), (1, 1))] \
        == [8, 6, 4, 2, 2]


@pytest.mark.parametrize("processes", [False, True])
def test_local_cluster_listens_on_loopback_only(processes: bool) -> None:
    """Scheduler, workers and dashboards of the embedded cluster bind to 127.0.0.1 only."""
    import psutil

    from agriseg.predict import dask_client

    with dask_client(workers=1, processes=processes, dashboard="127.0.0.1:0") as client:
        me = psutil.Process()
        listening = {c.laddr.ip for p in (me, *me.children(recursive=True))
                     for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
        assert listening == {"127.0.0.1"}
        assert client.dashboard_link.startswith("http://127.0.0.1:")
        if not processes:
            # Dask's stack-sampling profiler would take the GIL the tile threads need.
            workers = list(client.cluster.workers.values())
            assert workers and all("profile" not in w.periodic_callbacks for w in workers)


class _ResourceModel:
    """A segmenter stand-in that asks for a GPU slot and records its warm-ups."""

    resources: ClassVar[dict[str, float]] = {"GPU": 1}
    # On the class: the task gets a copy of the instance, even on a worker thread.
    warmed: ClassVar[list[int]] = []

    def warm_up(self, tile_size: int) -> None:
        type(self).warmed.append(tile_size)


@pytest.mark.parametrize("offered", [{"GPU": 2}, None])
def test_model_tasks_ask_for_a_resource_only_where_a_worker_offers_it(
    offered: dict[str, float] | None,
) -> None:
    from distributed import Client, LocalCluster

    from agriseg.predict import task_resources, warm_up_workers

    model = _ResourceModel()
    _ResourceModel.warmed.clear()
    with LocalCluster(n_workers=1, processes=False, threads_per_worker=1, resources=offered,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        assert task_resources(client, model) == (model.resources if offered else None)
        # warmed on the worker that offers the slot, or on any worker when none does
        assert warm_up_workers(client, model, 256) is not None
    assert _ResourceModel.warmed == [256]
