"""Per-class IoU of the label-free segmenter on synthetic fields with ground truth.

Fields from :mod:`agriseg.synth` over several seeds, row angles, spacings, weed and disease
densities, in RGB (8-bit camera) and multispectral (reflectance) form. Each field is written
as a GeoTIFF, opened like any survey, prepared and segmented whole (reflect-padded by the
model's halo, as the tiled pipeline does), then scored against its truth.

    .venv/bin/python benchmarks/accuracy.py            # full table (~1-2 min)
    .venv/bin/python benchmarks/accuracy.py --quick    # 4 fields
    .venv/bin/python benchmarks/accuracy.py --held-out # seeds 101-104, never tuned on
    .venv/bin/python benchmarks/accuracy.py --set veg_mix=0.5   # a LabelFreeConfig variant
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from agriseg.classes import DEFAULT_CLASSES
from agriseg.models.base import TileContext
from agriseg.models.labelfree import LabelFreeConfig, LabelFreeSegmenter
from agriseg.raster import open_survey, read_window
from agriseg.synth import FieldSpec, write_field

NAMES = DEFAULT_CLASSES.names


def segment_file(path: Path, config: LabelFreeConfig | None = None) -> tuple[np.ndarray, dict]:
    """Classes of a whole raster with the label-free model, plus its prepare info."""
    from rasterio.windows import Window

    survey = open_survey(path)
    seg = LabelFreeSegmenter(config or LabelFreeConfig())
    prep = seg.prepare(survey)
    h, w = survey.grid.shape_yx
    data, valid = read_window(survey, seg.roles, Window(0, 0, w, h))
    p = prep.halo
    data = np.pad(data, ((0, 0), (p, p), (p, p)), mode="symmetric")
    valid_p = np.pad(valid, p, mode="symmetric")
    scores = seg.predict(data[None], valid_p[None], prep.params,
                         [TileContext(-p, -p, survey.grid.gsd_m, raster_shape=(h, w))])[0]
    classes = scores[:, p:p + h, p:p + w].argmax(0).astype(np.uint8)
    classes[~valid] = 255
    return classes, {**prep.info, "warnings": list(prep.warnings)}


def confusion(pred: np.ndarray, truth: np.ndarray, k: int = 4) -> np.ndarray:
    ok = (truth < k) & (pred < k)
    return np.bincount(truth[ok].astype(int) * k + pred[ok], minlength=k * k).reshape(k, k)


def iou(conf: np.ndarray) -> np.ndarray:
    tp = np.diag(conf).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return tp / (conf.sum(0) + conf.sum(1) - tp)


HELD_OUT_SEEDS = (101, 102, 103, 104)


def held_out_specs(size: int) -> list[tuple[str, FieldSpec]]:
    """Fields never looked at while choosing defaults: the generator's own random angle,
    spacing, weed and disease layout for each seed, in RGB and multispectral."""
    return [(f"h{seed} {'MS' if ms else 'RGB'}", FieldSpec(size=size, seed=seed, multispectral=ms))
            for seed in HELD_OUT_SEEDS for ms in (False, True)]


def specs(quick: bool, size: int) -> list[tuple[str, FieldSpec]]:
    out = []
    grid = [
        # seed, angle, spacing, weed density, disease density
        (1, 0.0, 0.76, 1.0, 1.0),
        (2, 33.0, 0.5, 2.0, 1.0),
        (3, 90.0, 0.9, 0.5, 2.0),
        (4, 121.0, 0.76, 1.0, 0.5),
        (5, 12.0, 0.6, 3.0, 1.0),
        (6, 67.0, 0.7, 1.0, 3.0),
    ]
    if quick:
        grid = grid[:2]
    for (seed, ang, sp, wd, dd), ms in itertools.product(grid, (False, True)):
        name = f"s{seed} {ang:5.1f}deg {sp:.2f}m w{wd:g} d{dd:g} {'MS' if ms else 'RGB'}"
        out.append((name, FieldSpec(size=size, seed=seed, row_angle_deg=ang, row_spacing_m=sp,
                                    weed_density=wd, disease_density=dd, multispectral=ms)))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4 fields instead of 12")
    ap.add_argument("--held-out", action="store_true",
                    help=f"the 8 held-out fields (seeds {', '.join(map(str, HELD_OUT_SEEDS))}, "
                         "random angles and spacings) instead of the benchmark's 12")
    ap.add_argument("--size", type=int, default=1024, help="field edge in pixels [1024]")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a LabelFreeConfig field (repeatable)")
    args = ap.parse_args(argv)
    config = LabelFreeConfig(**{k: type(getattr(LabelFreeConfig(), k))(v) for k, v in
                                (item.split("=", 1) for item in args.set)})
    totals = {"RGB": np.zeros((4, 4), np.int64), "MS": np.zeros((4, 4), np.int64)}
    print(f"| field | {' | '.join(NAMES)} | rows found | s |")
    print("|---|" + "---|" * (len(NAMES) + 2))
    with tempfile.TemporaryDirectory() as tmp:
        fields = held_out_specs(args.size) if args.held_out else specs(args.quick, args.size)
        for name, spec in fields:
            img, tru = Path(tmp) / "f.tif", Path(tmp) / "t.tif"
            field = write_field(spec, img, tru)
            t = time.perf_counter()
            pred, info = segment_file(img, config)
            dt = time.perf_counter() - t
            c = confusion(pred, field.truth)
            totals["MS" if spec.multispectral else "RGB"] += c
            rows = info.get("rows", {})
            found = (f"{rows.get('angle_deg', 0):.1f}deg {rows.get('spacing_m', 0):.2f}m"
                     if rows.get("detected") else "no")
            vals = " | ".join(f"{v:.3f}" for v in iou(c))
            print(f"| {name} | {vals} | {found} | {dt:.1f} |", flush=True)
    for kind, c in totals.items():
        print(f"| **all {kind}** | {' | '.join(f'**{v:.3f}**' for v in iou(c))} | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
