"""Run a survey on Kubernetes with dask-kubernetes (operator).

    pip install dask-kubernetes
    python workflows/kubernetes_cluster.py /data/survey.tif /data/results --workers 8

The worker image must contain agriseg (e.g. built from this repository with `pip install .`)
and mount the volume holding the survey at the same path as this client.
"""

from __future__ import annotations

import argparse

from dask_kubernetes.operator import KubeCluster  # type: ignore[import-not-found]
from distributed import Client

from agriseg.config import build_run_config
from agriseg.survey import process_survey


def main() -> None:
    """Start the cluster, run the survey through it, shut it down."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("input")
    ap.add_argument("out")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--image", default="ghcr.io/agriseg/agriseg:latest")
    a = ap.parse_args()
    with KubeCluster(name="agriseg", image=a.image, n_workers=a.workers,
                     resources={"requests": {"memory": "4Gi", "cpu": "2"}}) as cluster, \
            Client(cluster) as client:
        client.wait_for_workers(1, timeout=600)
        cfg = build_run_config(input=a.input, out=a.out, scheduler=cluster.scheduler_address,
                               tile_size=2048, scheduler_timeout=120)
        result = process_survey(cfg)
        print(f"done: {result.out_dir} ({result.manifest['throughput_mp_s']} MP/s)")


if __name__ == "__main__":
    main()
