"""Accuracy of the shipped learned model against the label-free segmenter.

Held-out synthetic fields (seeds never used in training: workflows/train-default.yaml uses
1000-1007) are segmented through the full pipeline by each model and scored against their
truth. Prints per-class IoU, mean IoU, pixel accuracy and end-to-end MP/s.

    .venv/bin/python benchmarks/learned_accuracy.py [--fields 4] [--size 768] [--models ...]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import numpy as np
from distributed import LocalCluster

from agriseg.config import build_run_config
from agriseg.metrics import Scores, confusion
from agriseg.survey import process_survey
from agriseg.synth import FieldSpec, write_field

HELD_OUT_SEED = 9000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fields", type=int, default=4)
    ap.add_argument("--size", type=int, default=768)
    ap.add_argument("--models", nargs="+", default=["unet-default", "labelfree", "index-threshold"])
    ap.add_argument("--engine", default="auto")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import rasterio

    gsds = [0.01, 0.015, 0.02, 0.03]
    with tempfile.TemporaryDirectory() as tmp, LocalCluster(
        n_workers=2, threads_per_worker=1, dashboard_address=None
    ) as cluster:
        root = Path(tmp)
        fields = []
        for i in range(args.fields):
            spec = FieldSpec(size=args.size, seed=HELD_OUT_SEED + i, gsd=gsds[i % len(gsds)])
            img, truth = root / f"f{i}.tif", root / f"f{i}-truth.tif"
            write_field(spec, img, truth)
            fields.append((img, truth))
        print(f"{args.fields} held-out synthetic fields, {args.size} px, seeds "
              f"{HELD_OUT_SEED}..{HELD_OUT_SEED + args.fields - 1}, GSD {gsds[:args.fields]} m")
        header = f"{'model':<16} {'soil':>6} {'crop':>6} {'weed':>6} {'disease':>7} " \
                 f"{'mIoU':>6} {'acc':>6} {'MP/s':>6}"
        print(header)
        for name in args.models:
            conf = np.zeros((4, 4), np.int64)
            mps = []
            for i, (img, truth) in enumerate(fields):
                cfg = build_run_config(input=img, out=root / f"{name}-{i}", model=name,
                                       engine=args.engine, indices=False, tile_size=512,
                                       scheduler=cluster.scheduler_address)
                res = process_survey(cfg)
                with rasterio.open(res.outputs["classes"]) as p, rasterio.open(truth) as t:
                    conf += confusion(t.read(1), p.read(1), 4)
                mps.append(res.manifest["throughput_mp_s"])
            s = Scores(conf, ("soil", "crop", "weed", "disease"))
            iou = s.iou
            print(f"{name:<16} {iou['soil']:6.3f} {iou['crop']:6.3f} {iou['weed']:6.3f} "
                  f"{iou['disease']:7.3f} {s.miou:6.3f} {s.accuracy:6.3f} {np.mean(mps):6.2f}")


if __name__ == "__main__":
    main()
