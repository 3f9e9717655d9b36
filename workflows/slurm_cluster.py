"""Run a survey on a SLURM GPU cluster with dask-jobqueue.

    pip install dask-jobqueue
    python workflows/slurm_cluster.py /shared/survey.tif /shared/results --jobs 4 --model BUNDLE

Each SLURM job is one Dask worker with one GPU and 8 threads, advertising one ``GPU`` resource
unit per thread (``resources={"GPU": 8}``): model tasks ask for one unit, so they land on GPU
workers and 8 tiles are read and decoded while the GPU works. Input and output must be on the
shared file system. The workers get agriseg's malloc settings (``WORKER_MALLOC_ENV``), as
its local workers do.
"""

from __future__ import annotations

import argparse
import sys

from distributed import Client

from agriseg.config import build_run_config
from agriseg.predict import WORKER_MALLOC_ENV
from agriseg.survey import process_survey


def main() -> None:
    """Start the cluster, run the survey through it, shut it down."""
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input", help="survey raster on the shared file system")
    ap.add_argument("out", help="output folder on the shared file system")
    ap.add_argument("--jobs", type=int, default=4, help="SLURM jobs (GPU workers) [4]")
    ap.add_argument("--model", default=None, help="model name or bundle path [labelfree]")
    ap.add_argument("--queue", default="gpu", help="SLURM partition [gpu]")
    a = ap.parse_args()
    try:  # after argparse: --help works without the package
        from dask_jobqueue import SLURMCluster
    except ImportError:
        sys.exit("dask-jobqueue is not installed: pip install dask-jobqueue")
    cluster = SLURMCluster(
        queue=a.queue,
        cores=8,
        processes=1,
        memory="32GB",
        walltime="08:00:00",
        job_extra_directives=["--gres=gpu:1"],
        job_script_prologue=[f"export {k}={v}" for k, v in WORKER_MALLOC_ENV.items()],
        # cores=8 with processes=1 already gives each worker 8 threads (--nthreads 8).
        worker_extra_args=["--resources", "GPU=8"],
    )
    cluster.scale(jobs=a.jobs)
    with Client(cluster) as client:
        client.wait_for_workers(1, timeout=1800)
        cfg = build_run_config(input=a.input, out=a.out, model=a.model, engine="torch",
                               scheduler=cluster.scheduler_address, tile_size=2048,
                               scheduler_timeout=120)
        result = process_survey(cfg)
        print(f"done: {result.out_dir} ({result.manifest['throughput_mp_s']} MP/s)")
    cluster.close()


if __name__ == "__main__":
    main()
