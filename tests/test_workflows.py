from __future__ import annotations

import ast
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


def test_unknown_key_is_rejected_with_its_name(tmp_path: Path) -> None:
    from agriseg.errors import ConfigError

    with pytest.raises(ConfigError, match="tile_sise"):
        build_run_config("x.yaml", input="a.tif", out="o", tile_sise=512)
    with pytest.raises(ConfigError, match="multiple of 16"):
        build_run_config("x.yaml", input="a.tif", out="o", tile_size=500)
