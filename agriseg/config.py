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
            msg += f" (got {value!r})"
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


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Safe-load a YAML mapping.

    Raises:
        ConfigError: unreadable file, YAML error or not a mapping.
    """
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a text file ({exc}); a config is YAML text, see "
                          "workflows/ for examples") from exc
    except yaml.MarkedYAMLError as exc:
        # One line with the place, not PyYAML's multi-line report naming "<unicode string>".
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(f"{path}: not valid YAML ({where}{exc.problem or exc}); see "
                          "workflows/ for examples") from exc
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read YAML config ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a YAML mapping of option: value")
    return data
