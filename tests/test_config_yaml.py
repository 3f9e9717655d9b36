"""Crafted or broken YAML configs end in one-line ConfigErrors, quickly and in little memory.

Everything goes through :func:`agriseg.config.load_yaml`, which ``agriseg run --config``,
``agriseg train --config`` and the workflow files use.
"""

from __future__ import annotations

import re
import time
import tracemalloc
from pathlib import Path

import pytest
from click.testing import CliRunner

from agriseg.cli import main
from agriseg.config import MAX_YAML_DEPTH, build_run_config, load_run_yaml, load_yaml
from agriseg.errors import ConfigError
from agriseg.train.config import load_train_config


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def _refused(path: Path) -> str:
    """The message of the ConfigError that loading ``path`` raises: one line, short."""
    with pytest.raises(ConfigError) as info:
        load_yaml(path)
    msg = str(info.value)
    assert str(path) in msg and "\n" not in msg and len(msg) < 500, msg
    return msg


def test_duplicate_key_is_refused_with_its_line(tmp_path: Path) -> None:
    """`out:` twice ran with the second one, silently."""
    msg = _refused(_write(tmp_path, "version: 1\nout: a\ninput: x.tif\nout: b\n"))
    assert "duplicate key 'out' (first on line 2)" in msg and "line 4, column 1" in msg
    assert "give each key once" in msg


@pytest.mark.parametrize(("text", "key", "line"), [
    ("model_options:\n  a: 1\n  b: 2\n  a: 3\n", "'a'", 4),  # nested mapping
    ("1: x\n01: y\n", "1", 2),  # different text, the same key once read
    ("a: {b: 1, b: 2}\n", "'b'", 1),  # flow mapping
])
def test_duplicate_keys_anywhere(tmp_path: Path, text: str, key: str, line: int) -> None:
    msg = _refused(_write(tmp_path, text))
    assert f"line {line}," in msg and f"duplicate key {key}" in msg


def test_aliases_and_merges_still_load(tmp_path: Path) -> None:
    """Sharing a value, and overriding a merged key, are not duplicates."""
    data = load_yaml(_write(tmp_path, "a: &c [weed, disease]\nb: *c\n"
                                      "base: &m {x: 1, y: 2}\nm:\n  <<: *m\n  x: 3\n"))
    assert data["b"] == ["weed", "disease"] and data["m"] == {"x": 3, "y": 2}


def test_a_merged_mapping_built_after_its_user_is_no_duplicate(tmp_path: Path) -> None:
    """`mid` merges `base` and overrides `halo`; `run`, built first, merges `mid`."""
    data = load_yaml(_write(tmp_path, "profiles:\n  base: &base\n    halo: 32\n"
                                      "  mid: &mid\n    <<: *base\n    halo: 48\n"
                                      "run:\n  <<: *mid\n"))
    assert data["run"] == data["profiles"]["mid"] == {"halo": 48}
    msg = _refused(_write(tmp_path, "p:\n  b: &b {x: 1}\n  m: &m\n    <<: *b\n    y: 1\n"
                                    "    y: 2\nr:\n  <<: *m\n"))
    assert "duplicate key 'y' (first on line 5)" in msg


def test_billion_laughs_is_refused_fast_and_small(tmp_path: Path) -> None:
    """10**9 "lol"s once expanded: refused while parsing, before anything big is built."""
    lines = ["version: 1", "input: x.tif", "out: o",
             'a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    lines.append("skip: *a8")
    path = _write(tmp_path, "\n".join(lines) + "\n")
    tracemalloc.start()
    start = time.perf_counter()
    try:
        msg = _refused(path)
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "values once aliases are expanded" in msg and "billion laughs" in msg, msg
    assert "lol" not in msg  # no value in the message, let alone the expanded one
    assert seconds < 0.5 and peak < 20e6, (seconds, peak)


@pytest.mark.parametrize("text", ["a: &a [1, *a]\n", "a: &a {b: *a}\n"])
def test_alias_loop_is_refused(tmp_path: Path, text: str) -> None:
    assert "(a loop)" in _refused(_write(tmp_path, text))


@pytest.mark.parametrize("text", [
    "model_options: " + "[" * 20000 + "]" * 20000 + "\n",  # was a RecursionError
    "model_options: {a: " + "{a: " * 3000 + "1" + "}" * 3001 + "\n",  # likewise
    # short in the text, deep once the aliases are expanded
    "a0: &a0 [1]\n" + "".join(f"a{i}: &a{i} [*a{i - 1}]\n" for i in range(1, 80)),
])
def test_deep_nesting_is_refused(tmp_path: Path, text: str) -> None:
    msg = _refused(_write(tmp_path, text))
    assert f"nested more than {MAX_YAML_DEPTH} levels deep" in msg


def test_usual_nesting_loads(tmp_path: Path) -> None:
    text = "a: " + "[" * 20 + "1" + "]" * 20 + "\n"
    assert load_yaml(_write(tmp_path, text))["a"] is not None


@pytest.mark.parametrize("number", ["9" * 5000, "-" + "9" * 5000, "0x" + "f" * 4000])
def test_huge_integer_is_refused(tmp_path: Path, number: str) -> None:
    """Past Python's 4300 digits: was a ValueError traceback (or one when a message showed it)."""
    msg = _refused(_write(tmp_path, f"version: 1\nworkers: {number}\n"))
    assert "line 2, column 10: integer" in msg and "is too large" in msg
    assert "give a smaller number" in msg


def test_large_but_convertible_integer_loads(tmp_path: Path) -> None:
    assert load_yaml(_write(tmp_path, f"a: {'9' * 4300}\nb: 0x1f\n"))["b"] == 31


def test_out_of_range_timestamp_is_one_line(tmp_path: Path) -> None:
    """A scalar that looks like a date but is none was a ValueError traceback."""
    msg = _refused(_write(tmp_path, "input: 2001-13-45\n"))
    assert "cannot read '2001-13-45' as timestamp" in msg and "quote it" in msg


def test_huge_value_is_cut_short_in_messages(tmp_path: Path) -> None:
    path = _write(tmp_path, f"input: x.tif\nout: o\ngsd: {'y' * 1_000_000}\n")
    with pytest.raises(ConfigError) as info:
        build_run_config(str(path), **load_yaml(path))
    msg = str(info.value)
    assert "gsd:" in msg and "(1000002 characters)" in msg and len(msg) < 500, msg


@pytest.mark.parametrize("load", [load_run_yaml, load_train_config], ids=["run", "train"])
def test_run_and_training_configs_use_the_bounded_loader(tmp_path: Path, load: object) -> None:
    path = _write(tmp_path, "epochs: 1\nepochs: 2\n")
    with pytest.raises(ConfigError, match=re.escape("duplicate key 'epochs'")):
        load(path)  # type: ignore[operator]


def test_cli_reports_a_refused_config_on_one_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "version: 1\ninput: x.tif\nout: o\nout: p\n")
    r = CliRunner().invoke(main, ["run", "--config", str(path)])
    assert r.exit_code == 2, r.output
    assert "duplicate key 'out'" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "o").exists() and not (tmp_path / "p").exists()


def test_a_long_written_out_config_is_no_alias_bomb(tmp_path: Path) -> None:
    """A training config listing 20 000 tiles (no aliases) is read: only what aliases
    multiply counts against the bound."""
    path = tmp_path / "many.yaml"
    path.write_text("data:\n" + "".join(f"  - {{image: i{i}.tif, labels: l{i}.tif}}\n"
                                        for i in range(20_000)))
    assert len(load_yaml(path)["data"]) == 20_000
