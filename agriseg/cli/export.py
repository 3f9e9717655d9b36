"""``agriseg export``: a bundle as ONNX for other tools (checked against PyTorch)."""

from __future__ import annotations

from pathlib import Path

import click

from agriseg.cli import NonEmptyPath


@click.command()
@click.argument("bundle")
@click.option("--onnx", "as_onnx", is_flag=True, required=True,
              help="Write an ONNX model (input: normalised pixels N,C,H,W; output: probabilities).")
@click.option("--out", "-o", type=NonEmptyPath(dir_okay=False, path_type=Path),
              help="ONNX file to write [where `agriseg run` caches it: BUNDLE-<digest>.onnx beside "
                   "the bundle, or ~/.cache/agriseg/onnx/ for shipped bundles].")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out file.")
def export(bundle: str, as_onnx: bool, out: Path | None, overwrite: bool) -> None:
    """Export BUNDLE to ONNX and verify it against the PyTorch outputs.

    BUNDLE is a bundle path or a learned model's name (e.g. unet-default). Input
    normalisation (mean/std per band) is not part of the graph; it is in the ONNX file's
    metadata with the classes and band roles (`agriseg_bundle`, and the keys the
    Deepness QGIS plugin reads: `class_names`, `resolution`, `tile_size`, `tiles_overlap`,
    `standardization_mean`/`std`). H and W must be multiples of 32.
    """
    from agriseg.errors import OutputError
    from agriseg.models.neural import ONNX_TOLERANCE, export_onnx
    from agriseg.models.registry import bundle_path

    path = bundle_path(bundle, "export")
    if out is not None:
        src = path.resolve()
        own = {p.resolve() for p in src.iterdir()} if src.is_dir() else {src}
        if out.resolve() in own:  # --overwrite would replace the bundle with its export
            raise OutputError(f"{out}: is the bundle being exported; write the ONNX model "
                              "elsewhere, e.g. --out model.onnx")
        if not out.resolve().parent.exists():
            raise OutputError(f"{out.parent}: folder does not exist; create it or choose "
                              "another --out")
        if out.exists() and not overwrite:
            raise OutputError(f"{out}: exists; use --overwrite to replace it")

    written, diff = export_onnx(path, out)
    click.echo(f"wrote {written} (max |onnx - torch| = {diff:.2e}, tolerance "
               f"{ONNX_TOLERANCE:g})")
