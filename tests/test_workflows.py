from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from agriseg.config import build_run_config, load_yaml
from tests.conftest import REPO

WORKFLOWS = REPO / "workflows"


@pytest.mark.parametrize("path", sorted(WORKFLOWS.glob("*.yaml")), ids=lambda p: p.name)
def test_workflow_configs_validate(path: Path) -> None:
    data = load_yaml(path)
    if "epochs" in data or "train" in path.name:
        pytest.skip("training config, validated by the training tests")
    cfg = build_run_config(str(path), **data)
    assert cfg.version == 1


@pytest.mark.parametrize("path", sorted(WORKFLOWS.glob("*.py")), ids=lambda p: p.name)
def test_workflow_scripts_parse(path: Path) -> None:
    ast.parse(path.read_text())


def test_run_config_paths_are_relative_to_it(rgba_tif: Path, tmp_path: Path,
                                            scheduler: str) -> None:
    """As in training configs: a config and the files beside it work from any folder."""
    import json
    import shutil

    from click.testing import CliRunner

    from agriseg.cli import main
    from agriseg.config import load_run_yaml

    job = tmp_path / "job"
    job.mkdir()
    shutil.copy(rgba_tif, job / "survey.tif")
    cfg = job / "run.yaml"
    cfg.write_text("version: 1\ninput: survey.tif\nout: results\nmodel: index-threshold\n"
                   "skip: [zones, fields, report, project]\n")
    values = load_run_yaml(cfg)
    assert values["input"] == str(job / "survey.tif") and values["model"] == "index-threshold"
    r = CliRunner().invoke(main, ["run", "--config", str(cfg), "--scheduler", scheduler,
                                  "--no-progress"])
    assert r.exit_code == 0, r.output
    assert json.loads((job / "results" / "run.json").read_text())["input"]["path"] == str(
        job / "survey.tif")
    # the demo config names the samples from the workflows folder
    demo = load_run_yaml(WORKFLOWS / "demo.yaml")
    assert Path(demo["input"]).exists() and Path(demo["fields"]).exists()
    assert demo["out"] == str(REPO / "out" / "demo")


def test_unknown_key_is_rejected_with_its_name(tmp_path: Path) -> None:
    from agriseg.errors import ConfigError

    with pytest.raises(ConfigError, match="tile_sise"):
        build_run_config("x.yaml", input="a.tif", out="o", tile_sise=512)
    with pytest.raises(ConfigError, match="multiple of 16"):
        build_run_config("x.yaml", input="a.tif", out="o", tile_size=500)


def test_yaml_shorthands_as_on_the_command_line() -> None:
    """`skip: zones`, `probabilities: weed,disease` and `bands:` as a mapping."""
    cfg = build_run_config("x.yaml", input="a.tif", out="o", skip="zones, report",
                           probabilities="weed", bands={"red": 3, "green": 2, "blue": 1})
    assert cfg.skip == ("zones", "report") and cfg.probabilities == ("weed",)
    assert cfg.bands == "red=3,green=2,blue=1"



@pytest.mark.parametrize(("text", "needle"), [
    (b"tile_size: [1,2\n", "not valid YAML (line 2, column 1: expected ','"),
    (b"- a\n- b\n", "must be a YAML mapping"),
    (b"", "must be a YAML mapping"),
    (b"!!python/object/apply:os.system [echo x]\n", "could not determine a constructor"),
    (bytes(range(250, 256)) * 4, "not a text file"),  # was a UnicodeDecodeError traceback
])
def test_unreadable_configs_say_why(tmp_path: Path, text: bytes, needle: str) -> None:
    from agriseg.errors import ConfigError

    path = tmp_path / "c.yaml"
    path.write_bytes(text)
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_yaml(path)

def test_labelled_dataset_script(tmp_path: Path, scheduler: str) -> None:
    """The dataset workflow runs each PNG tile with --gsd and pools the scores."""
    import os
    import subprocess
    import sys

    import numpy as np
    from PIL import Image

    from tests.conftest import toy_field

    imgs, labs = tmp_path / "images", tmp_path / "labels"
    imgs.mkdir()
    labs.mkdir()
    for i in range(2):
        rgb, _ = toy_field(64, 72, seed=i)
        Image.fromarray(np.moveaxis(rgb, 0, -1)).save(imgs / f"t{i}.png")
        Image.fromarray(np.where(rgb[1] > rgb[0], 1, 0).astype(np.uint8)).save(
            labs / f"t{i}_mask.png")
    (imgs / "unlabelled.png").write_bytes((imgs / "t0.png").read_bytes())
    env = {**os.environ, "AGRISEG": str(Path(sys.executable).with_name("agriseg")),
           "LABEL_SUFFIX": "_mask"}
    cmd = ["bash", str(WORKFLOWS / "labelled_dataset.sh"), str(imgs), str(labs),
           str(tmp_path / "out"), "--gsd", "0.01", "--model", "index-threshold",
           "--scheduler", scheduler]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "2 pairs, pixels pooled" in r.stdout and "mean IoU" in r.stdout
    assert "no label for" in r.stderr and (tmp_path / "out" / "scores.txt").exists()
    # a rerun skips the tiles already done
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and "2 pairs" in r.stdout, r.stderr
    assert r.stderr.count("reusing") == 2


def test_placeholder_input_of_a_workflow_says_to_give_the_survey(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from agriseg.cli import main

    r = CliRunner().invoke(main, ["run", "--config", str(WORKFLOWS / "overnight.yaml"),
                                  "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "give the survey on the command line" in r.output, r.output
    assert not (tmp_path / "o").exists()


def test_conda_environment_lists_what_pyproject_needs() -> None:
    """environment.yml (conda users) names every dependency of pyproject.toml, at least at
    the same minimum version: conda users install agriseg itself with --no-deps."""
    import tomllib

    import yaml

    root = REPO
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    conda_name = {"torch": "pytorch", "dask": "distributed"}  # dask[distributed]: both listed

    def parse(spec: str) -> tuple[str, str]:
        name, version = re.match(r"([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?\s*(>=\s*[\w.]+)?",
                                    spec).groups()  # type: ignore[union-attr]
        name = name.lower().replace("_", "-")
        return conda_name.get(name, name), (version or "").replace(" ", "")

    env = yaml.safe_load((root / "environment.yml").read_text())["dependencies"]
    listed = dict(parse(d) for d in env if isinstance(d, str))
    for spec in [*project["dependencies"], *project["optional-dependencies"]["dev"]]:
        name, version = parse(spec)
        assert name in listed, f"environment.yml lacks {spec}"
        if version:
            assert listed[name] == version, f"environment.yml: {name}{listed[name]}, not {version}"


def test_labelled_dataset_pairs_names_literally(tmp_path: Path) -> None:
    """images/tile[1].tif is scored against labels/tile[1].tif, not labels/tile1.tif (the
    name was a glob), and names with spaces and newlines reach `evaluate` intact.

    A stub stands in for agriseg: the pairing is the script's, and a real run per image would
    only slow this down (test_labelled_dataset_script runs the real thing).
    """
    import os
    import subprocess

    imgs, labs = tmp_path / "images", tmp_path / "lab[1]"
    imgs.mkdir()
    labs.mkdir()
    (tmp_path / "lab1").mkdir()  # a decoy the labels folder used to match as a glob too
    odd = "a b\nc*"
    for name in ["tile[1]", odd, "nolabel"]:
        (imgs / f"{name}.tif").write_bytes(b"image")
    for name in ["tile[1]", "tile1", odd, "a bXc", "a b"]:
        (labs / f"{name}.tif").write_bytes(b"label")
        (tmp_path / "lab1" / f"{name}.tif").write_bytes(b"decoy")
    log = tmp_path / "evaluate.args"
    stub = tmp_path / "agriseg-stub"
    # `run IMAGE --out DIR ...` leaves DIR/run.json; `evaluate ARGS` records them, NUL-separated.
    stub.write_text('#!/usr/bin/env bash\nset -eu\n'
                    'if [ "$1" = run ]; then mkdir -p "$4"; touch "$4/run.json"; exit; fi\n'
                    'shift; printf "%s\\0" "$@" > "$STUB_LOG"; echo scored\n')
    stub.chmod(0o755)
    out = tmp_path / "out"
    r = subprocess.run(["bash", str(WORKFLOWS / "labelled_dataset.sh"), str(imgs), str(labs),
                        str(out)], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "AGRISEG": str(stub), "STUB_LOG": str(log)})
    assert r.returncode == 0, r.stderr
    assert f"no label for {imgs / 'nolabel.tif'}" in r.stderr
    assert (out / "scores.txt").read_text() == "scored\n"
    args = log.read_text().split("\0")[:-1]
    assert args == [str(out / odd / "classes.tif"), str(labs / f"{odd}.tif"),
                    str(out / "tile[1]" / "classes.tif"), str(labs / "tile[1].tif")]
    assert (out / odd / "run.json").exists() and (out / "tile[1]" / "run.json").exists()


def _stub_agriseg(tmp_path: Path) -> Path:
    """A stand-in for agriseg: `run IMAGE --out DIR ...` leaves DIR/run.json and appends its
    arguments to $RUN_LOG, one run a line; `evaluate ARGS` records them in $STUB_LOG,
    NUL-separated."""
    stub = tmp_path / "agriseg-stub"
    stub.write_text('#!/usr/bin/env bash\nset -eu\n'
                    'if [ "$1" = run ]; then mkdir -p "$4"; touch "$4/run.json"; '
                    'echo "$*" >> "$RUN_LOG"; exit; fi\n'
                    'shift; printf "%s\\0" "$@" > "$STUB_LOG"; echo scored\n')
    stub.chmod(0o755)
    return stub


def test_labelled_dataset_skips_gis_sidecars(tmp_path: Path) -> None:
    """tile1.pgw sorts before tile1.png (.tfw before .tif): it was taken as the label, and as
    an image `agriseg run tile1.pgw` stopped the whole dataset."""
    import os
    import subprocess

    imgs, labs = tmp_path / "images", tmp_path / "labels"
    imgs.mkdir()
    labs.mkdir()
    sidecars = ["pgw", "aux.xml", "prj", "json", "xml", "qml"]
    for folder in (imgs, labs):
        (folder / "tile1.PNG").write_bytes(b"png")
        (folder / "tile2.tif").write_bytes(b"tif")
        for ext in [*sidecars, "tfw", "tif.ovr"]:
            (folder / f"tile1.{ext}").write_bytes(b"sidecar")
        (folder / "tile2.tfw").write_bytes(b"sidecar")
    (labs / "tile3.tfw").write_bytes(b"sidecar")  # a sidecar alone is no label
    (imgs / "tile3.tif").write_bytes(b"tif")
    out, log, runs = tmp_path / "out", tmp_path / "evaluate.args", tmp_path / "runs"
    r = subprocess.run(["bash", str(WORKFLOWS / "labelled_dataset.sh"), str(imgs), str(labs),
                        str(out)], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "AGRISEG": str(_stub_agriseg(tmp_path)),
                            "STUB_LOG": str(log), "RUN_LOG": str(runs)})
    assert r.returncode == 0, r.stderr
    assert log.read_text().split("\0")[:-1] == [
        str(out / "tile1" / "classes.tif"), str(labs / "tile1.PNG"),
        str(out / "tile2" / "classes.tif"), str(labs / "tile2.tif")]
    ran = [line.split()[1] for line in runs.read_text().splitlines()]
    assert ran == [str(imgs / "tile1.PNG"), str(imgs / "tile2.tif")]  # no sidecar run
    assert f"no label for {imgs / 'tile3.tif'}" in r.stderr


def test_labelled_dataset_reruns_when_the_options_change(tmp_path: Path) -> None:
    """A rerun with another --gsd or --model reused the masks of the first run."""
    import os
    import subprocess

    imgs, labs = tmp_path / "images", tmp_path / "labels"
    imgs.mkdir()
    labs.mkdir()
    (imgs / "t.png").write_bytes(b"png")
    (labs / "t.png").write_bytes(b"png")
    out, runs = tmp_path / "out", tmp_path / "runs"
    env = {**os.environ, "AGRISEG": str(_stub_agriseg(tmp_path)),
           "STUB_LOG": str(tmp_path / "evaluate.args"), "RUN_LOG": str(runs)}

    def dataset(*options: str) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(["bash", str(WORKFLOWS / "labelled_dataset.sh"), str(imgs),
                            str(labs), str(out), *options], capture_output=True, text=True,
                           timeout=60, env=env)
        assert r.returncode == 0, r.stderr
        return r

    dataset("--gsd", "0.01")
    assert (out / "t" / "run.args").exists()
    r = dataset("--gsd", "0.01")
    assert f"reusing {out / 't'}" in r.stderr
    assert len(runs.read_text().splitlines()) == 1
    r = dataset("--gsd", "0.02")
    assert "run with other options" in r.stderr
    last = runs.read_text().splitlines()[-1]
    assert len(runs.read_text().splitlines()) == 2
    assert "--overwrite" in last and last.endswith("--gsd 0.02")
    r = dataset("--gsd", "0.02")
    assert "reusing" in r.stderr and len(runs.read_text().splitlines()) == 2
    # the same folder written relative to the working folder is the same option
    r = subprocess.run(["bash", str(WORKFLOWS / "labelled_dataset.sh"), "./images", str(labs),
                        str(out), "--gsd", "0.02"], capture_output=True, text=True,
                       timeout=60, env=env, cwd=tmp_path)
    assert r.returncode == 0 and "reusing" in r.stderr, r.stderr
    assert len(runs.read_text().splitlines()) == 2


def test_labelled_dataset_image_suffix(tmp_path: Path) -> None:
    """CWFID names its files 001_image.png and 001_annotation.png: IMAGE_SUFFIX and
    LABEL_SUFFIX pair them (without IMAGE_SUFFIX every image was "no label", skipped)."""
    import os
    import subprocess

    imgs, labs = tmp_path / "images", tmp_path / "annotations"
    imgs.mkdir()
    labs.mkdir()
    for n in ("001", "002"):
        (imgs / f"{n}_image.png").write_bytes(b"image")
        (labs / f"{n}_annotation.png").write_bytes(b"label")
    stub, log = _stub_agriseg(tmp_path), tmp_path / "evaluate.args"
    out = tmp_path / "out"
    r = subprocess.run(["bash", str(WORKFLOWS / "labelled_dataset.sh"), str(imgs), str(labs),
                        f"{out}/", "--gsd", "0.01"], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "AGRISEG": str(stub), "STUB_LOG": str(log),
                            "RUN_LOG": str(tmp_path / "runs.log"), "IMAGE_SUFFIX": "_image",
                            "LABEL_SUFFIX": "_annotation"})
    assert r.returncode == 0, r.stderr
    args = log.read_text().split("\0")[:-1]
    assert args == [str(out / "001" / "classes.tif"), str(labs / "001_annotation.png"),
                    str(out / "002" / "classes.tif"), str(labs / "002_annotation.png")]
