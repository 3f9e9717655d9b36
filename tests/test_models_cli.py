"""``agriseg models BUNDLE``: one bundle's metadata, read from its header."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from agriseg.classes import ClassSchema, SegClass
from agriseg.cli import main
from agriseg.models.arch import build_model, make_spec
from agriseg.models.bundle import BundleMeta, save_bundle


def _bundle(path: Path, **meta_kw: object) -> Path:
    schema = ClassSchema((SegClass(0, "background", (0, 0, 0)),
                          SegClass(1, "sugarbeet", (0, 200, 0), role="crop"),
                          SegClass(2, "weed", (255, 215, 0), at_risk=True)))
    spec = make_spec("unet", "tiny", 4, 3)
    meta = BundleMeta(spec, schema, ("red", "green", "blue", "nir"), (0.4,) * 4, (0.2,) * 4,
                      patch_size=64, halo=16, gsd_range_m=(0.01, 0.05), name="beet-2027",
                      **meta_kw)  # type: ignore[arg-type]
    return save_bundle(build_model(spec), meta, path)


def test_models_describes_one_bundle(tmp_path: Path) -> None:
    """`agriseg models BUNDLE` was refused ("unexpected extra argument")."""
    val = {"iou": {"background": 0.91, "sugarbeet": 0.8, "weed": None}, "miou": 0.855,
           "accuracy": 0.93}
    path = _bundle(tmp_path / "beet.safetensors",
                   metrics={"epoch": 7, "val": val, "train_loss": 0.3},
                   training={"epochs": 10, "agriseg": "0.1.0",
                             "images": [{"source": "polygons"}, {"source": "polygons"}]})
    r = CliRunner().invoke(main, ["models", str(path)])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert f"bundle:       {path}" in lines
    assert "architecture: unet/tiny, depth 5" in lines
    assert r.output.startswith(f"bundle:       {path}\nname:         beet-2027 (created ")
    assert "bands:        red, green, blue, nir" in lines
    assert "GSD range:    0.01-0.05 m (trained on)" in lines
    assert "      1  sugarbeet   crop              0.800" in lines, r.output
    assert "      2  weed        weed, at risk         -" in lines, r.output  # null IoU
    assert "validation:   mIoU 0.855, accuracy 0.930 at epoch 7 of 10" in lines
    assert "training:     2 image(s) (2 polygons), agriseg 0.1.0" in lines
    # a bundle trained without validation pixels, as a folder
    folder = _bundle(tmp_path / "beet", metrics={"epoch": 3, "val": None, "train_loss": 0.25})
    r = CliRunner().invoke(main, ["models", str(folder)])
    assert r.exit_code == 0 and "training loss 0.2500" in r.output, r.output


def test_models_names_and_mistakes(tmp_path: Path) -> None:
    r = CliRunner().invoke(main, ["models", "unet-default"])  # a learned model's name
    assert r.exit_code == 0 and "name:         unet-default" in r.output, r.output
    r = CliRunner().invoke(main, ["models", "labelfree"])
    assert r.exit_code == 2 and "labelfree: is a rule-based model" in r.output
    r = CliRunner().invoke(main, ["models", str(tmp_path / "nope.safetensors")])
    assert r.exit_code == 2 and "no such model bundle or model name" in r.output
    pickled = tmp_path / "model.pt"
    pickled.write_bytes(b"\x80\x04" + b"\0" * 20)
    r = CliRunner().invoke(main, ["models", str(pickled)])
    assert r.exit_code == 2 and "never unpickles" in r.output
    r = CliRunner().invoke(main, ["models", "--help"])
    assert "[BUNDLE]" in r.output and "learned model's name" in r.output
    r = CliRunner().invoke(main, ["models"])  # the listing, as before
    assert r.exit_code == 0 and "labelfree options" in r.output
    # plain text: no Sphinx roles or double backticks; module constants shown by value
    assert ":data:" not in r.output and ":mod:" not in r.output and "``" not in r.output
    assert "at least 0.045" in r.output
