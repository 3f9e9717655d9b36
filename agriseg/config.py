"""Typed, versioned run configuration (pydantic), loadable from safe YAML.

The CLI builds a :class:`RunConfig` from its options; workflow files in ``workflows/`` are the
same object in YAML (``agriseg run --config FILE``). Unknown keys are errors, so a typo never
passes silently.
"""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from agriseg.errors import ConfigError
from agriseg.raster import absolute_path

CONFIG_VERSION: Literal[1] = 1


#: Smallest ``--gsd`` taken (metres): close-range photos of plants are ~0.1-1 mm per pixel.
MIN_GSD_M = 0.0001


def gsd_problem(gsd: float | None) -> str | None:
    """What is wrong with a pixel size given in metres, or None.

    For a run's ``--gsd`` and a training image's ``gsd:`` alike: values under
    :data:`MIN_GSD_M` are in another unit.
    """
    if gsd is None or gsd >= MIN_GSD_M:
        return None
    return (f"is metres per pixel: {gsd:g} m is {gsd * 1000:g} mm; close-range images are "
            f"{MIN_GSD_M * 1000:g}-1 mm, drone ones 5-50 mm (give 0.01 for 1 cm)")


class RunConfig(BaseModel):
    """Everything one ``agriseg run`` needs."""

    # NaN and infinity are refused as such ("nan" passed every bound check or failed one
    # with a misleading message).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    version: Literal[1] = CONFIG_VERSION
    input: Path = Field(description="survey raster (GeoTIFF, COG or VRT)")
    out: Path = Field(description="output folder")
    fields: Path | None = Field(None, description="field polygons (GeoPackage/Shapefile/GeoJSON)")
    field_id: str | None = Field(None, description="id column of the fields layer")
    fields_layer: str | None = Field(
        None, description="layer of the fields file (default: its only or first polygon layer)"
    )
    model: str | None = Field(None, description="registered model name or bundle path")
    model_options: dict[str, Any] = Field(
        default_factory=dict,
        description="settings of the model's own configuration, e.g. {disease_sensitivity: 4} "
        "for the label-free model (any LabelFreeConfig field; other models take none)",
    )
    engine: Literal["auto", "torch", "onnx"] = Field(
        "auto", description="learned-model engine: auto (PyTorch on a GPU or on a CPU with "
        "native bf16, ONNX Runtime on other CPUs)"
    )
    bands: str | None = Field(None, description="band roles, e.g. red=1,green=2,blue=3,nir=4")
    gsd: float | None = Field(
        None, gt=0, le=1000,
        description="pixel size in metres of an input without a CRS (run in image coordinates)",
    )
    tile_size: int | None = Field(
        None, ge=16, le=16384,
        description="core tile edge in pixels; default: 1024, larger when the halo is wide",
    )
    halo: int | None = Field(
        None, ge=0, le=4096,
        description="context pixels around each tile, and for learned models around each "
        "model input (a multiple of 16); default: the model's",
    )
    workers: int | None = Field(None, ge=1, le=1024, description="local workers")
    threads_per_worker: int | None = Field(
        None, ge=1, le=256,
        description="threads per local worker; default: 1 per CPU worker, and per GPU worker "
        "the host's cores shared among its GPUs (at most 8), so reading overlaps the model",
    )
    # Threads by default: the models' work is numpy, GDAL and ONNX Runtime calls that release
    # the GIL, so threads kept pace with processes (label-free 268 MP: 36.2 vs 35.0 s of
    # tiles; U-Net 16.8 MP: 33.0 vs 39.6 s) while sharing one copy of the model and the
    # imports (0.96 vs 1.54 GB, 0.99 vs 1.72 GB PSS) and starting nothing.
    processes: bool = Field(
        False, description="local workers as processes (default: threads of this process, "
        "as fast here and about half the memory, with nothing to start)",
    )
    scheduler: str | None = Field(None, description="address of an existing Dask scheduler")
    scheduler_file: Path | None = Field(None, description="scheduler file of an existing cluster")
    indices: bool = Field(True, description="write vegetation index rasters")
    probabilities: tuple[str, ...] = Field(
        (), description="classes whose probability rasters (percent) to write, e.g. "
        "[weed, disease], or [all]",
    )
    min_zone_area: float = Field(0.25, ge=0, description="smallest at-risk zone kept, m2")
    scheduler_timeout: float = Field(10.0, gt=0, description="seconds to reach a scheduler")
    checkpoint_seconds: float = Field(
        15.0, ge=0, description="how often finished tiles are flushed and recorded for resume"
    )
    skip: tuple[str, ...] = Field(
        (), description="post-processing steps to leave out: quicklook, zones, fields, "
        "report, project"
    )
    overwrite: bool = False
    resume: bool = True

    @field_validator("skip", "probabilities", mode="before")
    @classmethod
    def _names_from_text(cls, v: Any) -> Any:
        # `skip: zones` or `probabilities: weed,disease` in YAML, as on the command line.
        if isinstance(v, str):
            return tuple(x.strip() for x in v.split(",") if x.strip())
        return v

    @field_validator("bands", mode="before")
    @classmethod
    def _bands_from_mapping(cls, v: Any) -> Any:
        # `bands: {red: 3, green: 2, blue: 1}` in YAML, for the command line's red=3,...
        if isinstance(v, dict):
            return ",".join(f"{role}={band}" for role, band in v.items())
        return v

    @field_validator("gsd")
    @classmethod
    def _plausible_gsd(cls, v: float | None) -> float | None:
        # Metres per pixel: 1e-05 (a value in the wrong unit) gave the label-free model a
        # 5000 px context around a 64 px tile, and the run took gigabytes and never ended.
        problem = gsd_problem(v)
        if problem:
            raise ValueError(problem)
        return v

    @field_validator("tile_size")
    @classmethod
    def _tile_multiple_of_16(cls, v: int | None) -> int | None:
        if v is not None and v % 16:
            raise ValueError(f"must be a multiple of 16 (GeoTIFF block rule), got {v}")
        return v


def format_validation(exc: ValidationError, source: str, model: type[BaseModel],
                      what: str = "configuration") -> str:
    """Every invalid key of ``exc`` and why; unknown keys get the valid ones (and a guess)."""
    parts = []
    for err in exc.errors():
        # List items counted from 1, as a YAML reader counts them ("data #2", not "data.1").
        loc = ".".join(f"#{x + 1}" if isinstance(x, int) else str(x) for x in err["loc"])
        loc = loc.replace(".#", " #") or "(top level)"
        if source == "options" and len(err["loc"]) == 1:  # command-line options
            loc = "--" + loc.replace("_", "-")
        msg = err["msg"].removeprefix("Value error, ")
        value = err.get("input")
        if err["type"] != "extra_forbidden" and isinstance(value, str | int | float) \
                and not isinstance(value, bool) and repr(value) not in msg:
            msg += f" (got {short_repr(value)})"
        keys = _keys_at(model, err["loc"][:-1]) if err["type"] == "extra_forbidden" else None
        if keys:
            near = difflib.get_close_matches(str(err["loc"][-1]), keys, n=1)
            msg = ("unknown key" + (f"; did you mean {near[0]}?" if near else "")
                   + f" (valid here: {', '.join(keys)})")
        parts.append(f"{loc}: {msg}")
    if source == "options":
        return "invalid option: " + "; ".join(parts)
    return f"{source}: invalid {what}: " + "; ".join(parts)


def _keys_at(model: type[BaseModel], path: tuple[int | str, ...]) -> list[str] | None:
    """The keys of the (nested) model at ``path`` of a validation error, if it is one."""
    cls: type[BaseModel] | None = model
    for part in path:
        if isinstance(part, int):  # an item of a list
            continue
        field = cls.model_fields.get(part) if cls is not None else None
        cls = _model_in(field.annotation) if field is not None else None
        if cls is None:
            return None
    return list(cls.model_fields) if cls is not None else None


def _model_in(tp: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation (``X``, ``X | None``, ``list[X]``)."""
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp
    for arg in typing.get_args(tp):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def build_run_config(source: str = "options", **values: Any) -> RunConfig:
    """Validate ``values`` into a :class:`RunConfig`.

    Raises:
        ConfigError: listing every invalid key and why.
    """
    try:
        return RunConfig(**values)
    except ValidationError as exc:
        raise ConfigError(format_validation(exc, source, RunConfig)) from exc


def load_run_yaml(path: str | Path) -> dict[str, Any]:
    """A run config's mapping, its relative paths made relative to the YAML file.

    As in training configs, so a config and the files beside it work from any folder (cron,
    systemd and cluster jobs start elsewhere). Options given on the command line stay
    relative to the current folder.

    Raises:
        ConfigError: unreadable file, YAML error or not a mapping.
    """
    values = load_yaml(path)
    base = Path(path).resolve().parent

    def fix(value: Any) -> Any:
        if isinstance(value, str) and value and not Path(value).is_absolute():
            return absolute_path(base / value)  # a link/.. as the system follows it
        return value

    for key in ("input", "out", "fields", "scheduler_file"):
        if key in values:
            values[key] = fix(values[key])
    model = values.get("model")
    # A bundle path, not a registered name (those have neither a separator nor a suffix).
    if isinstance(model, str) and ("/" in model or model.endswith(".safetensors")):
        values["model"] = fix(model)
    return values


def short_repr(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to about ``limit`` characters, for error messages.

    A config value can be megabytes long (a pasted file, an expanded alias); a message that
    repeats it whole buries the reason, or runs out of memory building it.
    """
    try:
        text = repr(value)
    except ValueError:  # an int past Python's 4300-digit limit for str()
        return f"<integer of {value.bit_length()} bits>"
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


# Bounds of a config document. Configs are a few dozen keys a few levels deep, so these only
# refuse crafted or broken files: a "billion laughs" (aliases of aliases expanding to 10**9
# items, which end in a MemoryError wherever the data is walked) and nesting deep enough for a
# RecursionError in the parser or in whatever walks the data afterwards.
MAX_YAML_NODES = 100_000
#: Most a document's aliases may multiply its written size beyond MAX_YAML_NODES.
ALIAS_GROWTH = 10
MAX_YAML_DEPTH = 64

# Python's own limit for int(text) (sys.get_int_max_str_digits, 4300 by default): past it the
# conversion raises; no config number comes near it.
_MAX_INT_DIGITS = 4300
_INT_BOUND = 10**_MAX_INT_DIGITS  # the same bound for 0x.., 0o.. and 0b.. integers


class _RefusedYAML(yaml.MarkedYAMLError):
    """A document that parses but that a config never needs (huge, deep, duplicate keys)."""


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader, bounded: unique keys, limited size and depth, no tracebacks.

    Aliases stay allowed (sharing a list between keys is reasonable), but each node records
    how many nodes it stands for once every alias in it is expanded, so a document is refused
    as soon as that passes :data:`MAX_YAML_NODES`, before anything big is built.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0  # nesting of the node being composed, in the text
        # Per composed node: (nodes it expands to, depth it expands to). Keyed by the node
        # itself (identity), as an alias returns the very node of its anchor.
        self._extent: dict[yaml.Node, tuple[int, int]] = {}
        self._written = 0  # nodes composed from the text itself (aliases not expanded)
        # Per mapping node, its keys as written. PyYAML's merge flattening rewrites a merged
        # mapping's keys in place, so a `<<:` mapping merged before its own turn to be
        # built showed the merged keys beside its own: a false "duplicate key".
        self._keys: dict[yaml.Node, tuple[yaml.Node, ...]] = {}

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            target = super().compose_node(parent, index)
            if target is None or target not in self._extent:
                # The anchor is a collection still being composed: `&a [*a]` is a loop that
                # would make every walk of the data endless.
                raise _RefusedYAML(None, None, "alias refers to a collection containing it "
                                   "(a loop); write the values out instead", mark)
            return target
        mark = self.peek_event().start_mark
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise _RefusedYAML(None, None, f"nested more than {MAX_YAML_DEPTH} levels "
                                   "deep; a config needs a few levels", mark)
            composed = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        assert composed is not None  # PyYAML returns None only at the end of a stream
        node = composed
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
            self._keys[node] = tuple(k for k, _ in node.value)
        extents = [self._extent[c] for c in children]
        size = 1 + sum(n for n, _ in extents)
        depth = 1 + max((d for _, d in extents), default=0)
        self._written += 1
        # Only what aliases multiply counts: a training config may list 15 000 tiles.
        if size > MAX_YAML_NODES and size > ALIAS_GROWTH * self._written:
            raise _RefusedYAML(None, None, f"more than {MAX_YAML_NODES} values once aliases are "
                               "expanded (a \"billion laughs\" document?); a config needs far "
                               "fewer: write the values out or use fewer aliases", mark)
        if depth > MAX_YAML_DEPTH:
            raise _RefusedYAML(None, None, f"nested more than {MAX_YAML_DEPTH} levels deep once "
                               "aliases are expanded; a config needs a few levels", mark)
        self._extent[node] = (size, depth)
        return node

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, OverflowError) as exc:
            # A scalar that matches a tag's pattern but not its range: `2001-13-45`, an
            # integer of more digits than Python converts. One line at its place, not a trace.
            what = short_repr(node.value) if isinstance(node, yaml.ScalarNode) else "this"
            raise _RefusedYAML(None, None, f"cannot read {what} as "
                               f"{node.tag.rpartition(':')[2]} ({_first_line(exc)}); "
                               "quote it to keep it as text", node.start_mark) from exc

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        # Python refuses int(text) past 4300 digits with a ValueError, and an integer written
        # in hex or binary converts but then fails the same way when a message repr()s it.
        text = str(node.value)
        value: int | None
        try:
            value = super().construct_yaml_int(node)
        except ValueError:
            value = None
        if value is None or abs(value) >= _INT_BOUND:
            raise _RefusedYAML(None, None, f"integer {text[:12]}... of {len(text)} characters "
                               f"is too large (at most {_MAX_INT_DIGITS} decimal digits); give "
                               "a smaller number", node.start_mark)
        return value

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        # PyYAML keeps the last of repeated keys, so `out:` given twice silently ran with the
        # second. Keys from a `<<:` merge are skipped: overriding them is what merges are for.
        seen: dict[Any, yaml.Node] = {}
        for key_node in self._keys.get(node, tuple(k for k, _ in node.value)):
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:  # unhashable; PyYAML's own error says so below
                continue
            if first is not key_node:
                raise _RefusedYAML(
                    None, None, f"duplicate key {short_repr(key)} (first on line "
                    f"{first.start_mark.line + 1}); give each key once", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


# The constructor table holds SafeConstructor's function itself, so the override above only
# takes effect once registered (add_constructor copies the table; SafeLoader is untouched).
_ConfigLoader.add_constructor("tag:yaml.org,2002:int", _ConfigLoader.construct_yaml_int)


def _first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message, cut short."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text if len(text) <= 120 else text[:120] + "..."


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Safe-load a YAML mapping.

    Only plain data (PyYAML's safe tags), with each key once, at most
    :data:`MAX_YAML_NODES` values once aliases are expanded and :data:`MAX_YAML_DEPTH`
    levels of nesting.

    Raises:
        ConfigError: unreadable file, YAML error, a document past those bounds or not a
            mapping.
    """
    try:
        # _ConfigLoader is a SafeLoader: only plain data, never Python objects.
        data = yaml.load(Path(path).read_text(encoding="utf-8"), Loader=_ConfigLoader)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a text file ({exc}); a config is YAML text, see "
                          "workflows/ for examples") from exc
    except _RefusedYAML as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(f"{path}: refused YAML config ({where}{exc.problem})") from exc
    except yaml.MarkedYAMLError as exc:
        # One line with the place, not PyYAML's multi-line report naming "<unicode string>".
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(f"{path}: not valid YAML ({where}{exc.problem or exc}); see "
                          "workflows/ for examples") from exc
    except RecursionError as exc:
        # The depth bound should come first; this keeps any path we missed to one line.
        raise ConfigError(f"{path}: YAML config nested too deeply to read; a config needs a "
                          "few levels") from exc
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read YAML config ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a YAML mapping of option: value")
    return data
