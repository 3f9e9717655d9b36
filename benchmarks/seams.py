"""Seams: how much tiling changes a learned model's class map, by context margin (``--halo``).

    python benchmarks/seams.py [--model unet-default] [--halos 0,16,32,64] [--tile-size 256]

The real RGB samples in ``sample_tiles/`` big enough to hold tile borders away from their
edges (and the synthetic field) run through `agriseg run`
with small tiles, so each class map has many tile borders, once per halo. Each is compared
with one prediction of the whole image in a single model call (no borders at all): the share
of pixels whose class differs, next to tile borders (< 8 px) and elsewhere, and how many of
them the whole-image prediction was confident about (top probability >= 0.7). Both run on ONNX
Runtime in float32, so the differences are the tiling's, not bf16 rounding. The whole image is
reflected by a padding congruent to the halo modulo 32, so it sits on the same 32 px stride
lattice as the tiles' model inputs; pixels within 96 px of the raster's edge are left out
(edge padding differs between the two). ``model px`` is what each halo costs: model input
pixels per output pixel, as run.json reports them for these tiles.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import git_commit, machine

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = [
    "maricopa_sorghum_uav/orthomosaic.tif",
    "lamberton_soybean_uav/20180815_Lamberton_clipped.tif",
    "northdakota_naip/m_4709963_se_14_1_20200831.tif",
    "synthetic/field_rgb.tif",
]
EDGE = 96
NEAR = 8
SURE = 0.7


def whole_image(seg: object, path: Path, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Classes and top probability of the whole image in one ONNX Runtime call."""
    import rasterio

    from agriseg.models.neural import get_runner
    from agriseg.raster import open_survey

    survey = open_survey(str(path))
    idx = [survey.roles.as_dict()[r] for r in seg.roles]  # type: ignore[attr-defined]
    with rasterio.open(path) as ds:
        x = ds.read(idx).astype(np.float32) * survey.scale
    h, w = x.shape[1:]
    side_h, side_w = -(-(h + 2 * pad) // 32) * 32, -(-(w + 2 * pad) // 32) * 32
    x = np.pad(x, ((0, 0), (pad, side_h - h - pad), (pad, side_w - w - pad)), mode="symmetric")
    runner = get_runner(seg.path, "onnx", seg.meta)  # type: ignore[attr-defined]
    prob = runner(seg._normalise(x[None]))[0][:, pad:pad + h, pad:pad + w]  # type: ignore[attr-defined]
    return prob.argmax(0), prob.max(0)


def tiled(model: str, path: Path, out: Path, tile: int, halo: int) -> tuple[np.ndarray, float]:
    """The class mask of `agriseg run` with ``tile`` px tiles and ``halo``; model px per px."""
    import rasterio

    from agriseg.config import build_run_config
    from agriseg.survey import process_survey

    cfg = build_run_config(input=path, out=out, model=model, engine="onnx", tile_size=tile,
                           halo=halo, indices=False, overwrite=True,
                           skip=("quicklook", "zones", "fields", "report", "project"))
    res = process_survey(cfg)
    with rasterio.open(res.outputs["classes"]) as ds:
        classes = ds.read(1)
    return classes, json.loads((out / "run.json").read_text())["plan"][
        "model_pixels_per_output_pixel"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="unet-default", help="registered name or bundle path")
    ap.add_argument("--halos", default="0,16,32,64")
    ap.add_argument("--tile-size", type=int, default=256)
    a = ap.parse_args()
    logging.getLogger("agriseg").setLevel(logging.ERROR)  # the NAIP tile's GSD warning, per run
    from agriseg.models import load_segmenter

    seg = load_segmenter(a.model, "onnx")
    halos = [int(v) for v in a.halos.split(",")]
    print(f"# seams: {machine()}, commit {git_commit()}, model {a.model}, tiles {a.tile_size} "
          f"px, ONNX Runtime float32")
    print(f"# class changes against one whole-image call, in % of pixels >= {EDGE} px from "
          f"the raster edge: all | within {NEAR} px of a tile border | elsewhere | confident")
    totals: dict[int, list[int]] = {h: [0, 0, 0, 0, 0, 0] for h in halos}
    with tempfile.TemporaryDirectory() as tmp:
        for rel in SAMPLES:
            path = ROOT / "sample_tiles" / rel
            refs = {p: whole_image(seg, path, p) for p in {64 + h % 32 for h in halos}}
            print(f"{rel}:")
            for halo in halos:
                ref, conf = refs[64 + halo % 32]
                got, model_px = tiled(a.model, path, Path(tmp) / f"h{halo}", a.tile_size, halo)
                h, w = got.shape
                keep = np.zeros((h, w), bool)
                keep[EDGE:h - EDGE, EDGE:w - EDGE] = True
                keep &= got != 255
                rows, cols = np.arange(h) % a.tile_size, np.arange(w) % a.tile_size
                near_r = np.minimum(rows, a.tile_size - 1 - rows) < NEAR
                near_c = np.minimum(cols, a.tile_size - 1 - cols) < NEAR
                near = (near_r[:, None] | near_c[None, :]) & keep
                far = keep & ~near
                differ = (got != ref) & keep
                sure = differ & (conf >= SURE)
                n = max(int(keep.sum()), 1)
                row = [int(v) for v in (differ.sum(), (differ & near).sum(), near.sum(),
                                        (differ & far).sum(), far.sum(), sure.sum())]
                totals[halo] = [t + v for t, v in zip(totals[halo], row, strict=True)]
                print(f"  halo {halo:3d}: {100 * differ.sum() / n:6.3f} | "
                      f"{100 * row[1] / max(row[2], 1):6.3f} | {100 * row[3] / max(row[4], 1):6.3f}"
                      f" | {100 * sure.sum() / n:7.4f}   model px {model_px:.2f}")
    print("all samples (pixel-weighted):")
    for halo, (d, dn, nn, df, nf, s) in totals.items():
        n = max(nn + nf, 1)
        print(f"  halo {halo:3d}: {100 * d / n:6.3f} | {100 * dn / max(nn, 1):6.3f} | "
              f"{100 * df / max(nf, 1):6.3f} | {100 * s / n:7.4f}")


if __name__ == "__main__":
    main()
