"""Regenerate the synthetic sample fields in ``sample_tiles/synthetic/``.

Run from anywhere: ``python sample_tiles/make_synthetic.py``. The output is seeded (same
agriseg version -> the same RGB and truth rasters byte for byte; the 16-bit multispectral one
within a unit in a few pixels, float rounding differing between CPUs), so the files can be
checked into git and rebuilt at will. See ``agriseg.synth`` for what the fields contain.
"""

from __future__ import annotations

import logging
from pathlib import Path

from agriseg.synth import FieldSpec, write_field

OUT = Path(__file__).resolve().parent / "synthetic"

FIELDS: dict[str, FieldSpec] = {
    "field_rgb": FieldSpec(size=512, seed=1),
    "field_ms": FieldSpec(size=512, seed=2, multispectral=True),
}


def main() -> None:
    """Write every field in ``FIELDS`` and its ``*_truth.tif`` into ``OUT``."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    OUT.mkdir(parents=True, exist_ok=True)
    for name, spec in FIELDS.items():
        field = write_field(spec, OUT / f"{name}.tif", OUT / f"{name}_truth.tif")
        logging.info("%s: %s", name, field.info["class_fractions"])


if __name__ == "__main__":
    main()
