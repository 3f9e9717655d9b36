"""Run a survey on Kubernetes with dask-kubernetes (operator).

    pip install dask-kubernetes
    python workflows/kubernetes_cluster.py /data/survey.tif /data/results --workers 8 \
        --image registry.example.com/agriseg:0.1

The worker image is yours to build: any Python 3.11 image with this repository installed
(``pip install .``, which brings Dask and the GDAL wheels). The pods must mount the volume
holding the survey and the output folder at the same paths as this client. The workers get
agriseg's malloc settings (``WORKER_MALLOC_ENV``), as its local workers do.
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
    ap.add_argument("input", help="survey raster on the shared volume")
    ap.add_argument("out", help="output folder on the shared volume")
    ap.add_argument("--workers", type=int, default=8, help="worker pods [8]")
    ap.add_argument("--image", required=True,
                    help="container image with agriseg installed (pip install . of this "
                         "repository)")
    a = ap.parse_args()
    try:  # after argparse: --help works without the package
        from dask_kubernetes.operator import KubeCluster
    except ImportError:
        sys.exit("dask-kubernetes is not installed: pip install dask-kubernetes")
    with KubeCluster(name="agriseg", image=a.image, n_workers=a.workers,
                     env={k: str(v) for k, v in WORKER_MALLOC_ENV.items()},
                     resources={"requests": {"memory": "4Gi", "cpu": "2"}}) as cluster, \
            Client(cluster) as client:
        client.wait_for_workers(1, timeout=600)
        cfg = build_run_config(input=a.input, out=a.out, scheduler=cluster.scheduler_address,
                               tile_size=2048, scheduler_timeout=120)
        result = process_survey(cfg)
        print(f"done: {result.out_dir} ({result.manifest['throughput_mp_s']} MP/s)")


if __name__ == "__main__":
    main()
