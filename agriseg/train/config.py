"""Typed, versioned training configuration (``agriseg train CONFIG.yaml``).

Relative paths in a YAML file are resolved against the file's folder, so a config and its
data can be moved together. Unknown keys are errors.

Example::

    version: 1
    out: runs/my-model
    model: {arch: unet, encoder: small}
    bands: [red, green, blue]
    data:
      - {image: field1.tif, labels: field1_labels.tif}          # raster mask, same grid
      - {image: field2.tif, polygons: labels.gpkg, class_column: class}
      - {image: tile.png, labels: tile_color.png, gsd: 0.01,
         label_colors: "0,0,0=soil;0,255,0=crop;255,0,0=weed"}     # colour-coded labels
      - {image: field3.tif, polygons: beet.gpkg, label_classes: "Sugar beet=crop,background=soil"}
    epochs: 20
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Final, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core.core_schema import SerializerFunctionWrapHandler

from agriseg.classes import DEFAULT_CLASSES, ClassSchema, SegClass
from agriseg.config import format_validation, gsd_problem, load_yaml
from agriseg.errors import ConfigError

TRAIN_CONFIG_VERSION: Final = 1


class _Strict(BaseModel):
    # NaN and infinity are refused as such ("nan" passed every bound check or failed one
    # with a misleading message).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ModelSection(_Strict):
    """Network to train."""

    arch: str = Field(
        "unet", description="unet, unetplusplus, fpn, pspnet, deeplabv3plus, fcn, segnet"
    )
    encoder: str = Field("small", description="tiny, small or an smp encoder name (random init)")
    depth: int | None = Field(None, ge=1, le=5)
    options: dict[str, Any] = Field(default_factory=dict, description="extra smp arguments")
    init_from: Path | None = Field(
        None, description="bundle whose weights start the training, or a registered learned "
        "model's name (unet-default)")


class PseudoLabels(_Strict):
    """Labels from a segmenter's confident pixels (self-training)."""

    model: str = Field("labelfree", description="registered model name or bundle path")
    min_confidence: float = Field(0.8, ge=0, le=1, description="pixels below are ignored")
    bands: str | None = Field(None, description="band roles of the image, if not detected")


class DataPair(_Strict):
    """One training image with its labels: a raster mask, polygons, or pseudo-labels."""

    image: Path
    labels: Path | None = Field(None, description="class raster on the image grid (255 = none)")
    label_classes: str | None = Field(
        None, description="what the label raster's values are, as evaluate's --truth-classes: "
        "VALUE=CLASS,... with CLASS a class name or ignore (10=soil,20=crop,30=weed,0=ignore); "
        "for polygons, what the class column's names are: NAME=CLASS,... (Sugar beet=crop,"
        "background=soil), names case-insensitive",
    )
    label_colors: str | None = Field(
        None, description="colours of colour-coded labels (RGB, RGBA or a colour table), as "
        "evaluate's --truth-colors: R,G,B=CLASS;... (0,0,0=soil;0,255,0=crop;255,0,0=weed); "
        "transparent pixels are unlabelled",
    )
    polygons: Path | None = Field(None, description="GeoPackage/Shapefile/GeoJSON of labels")
    class_column: str = Field("class", description="polygon column: class name or value")
    layer: str | None = None
    pseudo: PseudoLabels | None = None
    bands: str | None = Field(None, description="band roles, e.g. red=1,green=2,blue=3")
    gsd: float | None = Field(
        None, gt=0, le=1000,
        description="pixel size in metres of an image without a CRS (PNG/JPEG); its labels "
        "are then an image of the same size",
    )

    @model_validator(mode="after")
    def _one_label_source(self) -> DataPair:
        n = sum(x is not None for x in (self.labels, self.polygons, self.pseudo))
        if n != 1:
            raise ValueError("give exactly one of labels, polygons or pseudo for each image")
        if self.label_classes is not None and self.pseudo is not None:
            raise ValueError("label_classes maps the values of a label raster or the class "
                             "names of polygons: give `labels:` or `polygons:`, not `pseudo:`")
        if self.label_colors is not None and self.labels is None:
            raise ValueError("label_colors maps the colours of a colour-coded label image: "
                             "give it as `labels:`")
        if self.label_colors is not None and self.label_classes is not None:
            raise ValueError("give label_colors (colour-coded labels) or label_classes (label "
                             "values), not both")
        if self.gsd is not None and self.polygons is not None:
            raise ValueError("polygons need a georeferenced image; with gsd give labels as "
                             "an image of the same size")
        problem = gsd_problem(self.gsd)  # as `agriseg run --gsd`: a unit mistake
        if problem:
            raise ValueError(f"gsd {problem}")
        return self

    @model_serializer(mode="wrap")
    def _without_unset_colors(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # A training's resume identity is its dumped config: a checkpoint written before
        # label_colors existed holds no such key, and a `label_colors: null` added to every
        # data item would refuse its resume as "changed".
        out: dict[str, Any] = handler(self)
        if out.get("label_colors", 0) is None:
            del out["label_colors"]
        return out


class SyntheticSection(_Strict):
    """Synthetic fields with truth (agriseg.synth) added to the training data."""

    count: int = Field(4, ge=0, le=1000)
    size: int = Field(512, ge=64, le=8192)
    seed: int = Field(1000, description="first seed; field i uses seed + i")
    gsd: list[Annotated[float, Field(gt=0, le=10)]] = Field(
        default_factory=lambda: [0.01, 0.03], min_length=1, max_length=2,
        description="GSD range, m: [low, high], or [one]")


class AugmentSection(_Strict):
    """Random augmentations of training patches."""

    flips: bool = True
    rot90: bool = True
    brightness: float = Field(0.08, ge=0, le=1, description="max additive change (0..1 scale)")
    contrast: float = Field(0.15, ge=0, le=1, description="max relative contrast change")
    scale: float = Field(0.15, ge=0, le=0.5, description="max relative zoom in or out")


class ValidationSection(_Strict):
    """Spatial-block validation split (whole blocks, so neighbours never leak)."""

    block_size: int = Field(256, ge=32, le=8192)
    fraction: float = Field(0.2, ge=0, lt=1)
    seed: int = 0


_Byte = Annotated[int, Field(ge=0, le=255)]


class ClassEntry(_Strict):
    """One class of a custom schema."""

    name: str = Field(min_length=1, pattern=r"^[^,=]+$")
    color: tuple[_Byte, _Byte, _Byte]
    at_risk: bool = False
    role: Literal["soil", "crop", "weed", "disease"] | None = Field(
        None, description="what it is in the field summaries; default: its name if one of these"
    )

    @field_validator("name", mode="before")
    @classmethod
    def _strip(cls, v: Any) -> Any:
        return v.strip() if isinstance(v, str) else v  # " soil " was a class of no role

    @field_validator("role", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return v.strip().lower() if isinstance(v, str) else v  # "Soil", as names match


class TrainConfig(_Strict):
    """Everything one ``agriseg train`` needs."""

    version: Literal[1] = TRAIN_CONFIG_VERSION
    out: Path = Field(description="training folder: checkpoints, curves, metrics")
    bundle: Path | None = Field(
        None, description="where the best model goes [OUT/model.safetensors]"
    )
    name: str | None = Field(None, description="model name stored in the bundle")
    model: ModelSection = Field(default_factory=ModelSection)
    bands: list[str] = Field(default_factory=lambda: ["red", "green", "blue"])
    classes: list[ClassEntry] | None = Field(None, min_length=2,
                                             description="default: soil, crop, weed, disease")
    data: list[DataPair] = Field(default_factory=list)
    synthetic: SyntheticSection | None = None
    patch_size: int = Field(128, ge=32, le=2048)
    batch_size: int = Field(8, ge=1, le=1024)
    epochs: int = Field(10, ge=1, le=10000)
    steps_per_epoch: int = Field(50, ge=1, le=100000)
    lr: float = Field(3e-3, gt=0, le=1)
    weight_decay: float = Field(1e-4, ge=0)
    sampler: Literal["balanced", "random"] = "balanced"
    augment: AugmentSection = Field(default_factory=AugmentSection)
    validation: ValidationSection = Field(default_factory=ValidationSection)
    halo: int = Field(32, ge=0, le=1024, description="receptive margin stored in the bundle")
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = Field(True, description="mixed precision (bf16 or fp16) on GPU")
    threads: int | None = Field(None, ge=1, le=256, description="CPU threads [all cores]")
    scheduler: str | None = Field(None, description="Dask scheduler for pseudo-labelling runs")

    @field_validator("bands")
    @classmethod
    def _band_roles(cls, v: list[str]) -> list[str]:
        # Checked here, before any data is read: an empty list crashed the image read, and a
        # repeated role or alpha trained a whole epoch before the bundle refused them.
        from agriseg.bands import ROLES

        valid = ", ".join(r for r in ROLES if r != "alpha")
        if not v:
            raise ValueError(f"give the band roles the model reads, in channel order, from "
                             f"{valid} (e.g. [red, green, blue])")
        if "alpha" in v:
            raise ValueError(f"alpha is not an input band: it marks nodata pixels, which are "
                             f"never trained on anyway; list only {valid}")
        unknown = [b for b in v if b not in ROLES]
        if unknown:
            raise ValueError(f"unknown band role(s) {', '.join(map(repr, unknown))}; valid "
                             f"roles: {valid}")
        twice = sorted({b for b in v if v.count(b) > 1})
        if twice:
            raise ValueError(f"band role(s) {', '.join(twice)} listed twice; give each role "
                             "once, in the model's channel order")
        return v

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.patch_size % 32:
            raise ValueError(f"patch_size must be a multiple of 32, got {self.patch_size}")
        if not self.data and not (self.synthetic and self.synthetic.count):
            raise ValueError("no training data: give `data:` pairs and/or `synthetic:` fields")
        if self.synthetic and self.synthetic.count:
            from agriseg.synth import ROLES_MS

            if not set(self.bands) <= set(ROLES_MS):
                raise ValueError(
                    f"synthetic fields have the bands {', '.join(ROLES_MS)} (multispectral when "
                    f"the model reads red edge or NIR); bands {self.bands} are not all among them"
                )
        # Synthetic truth and the registered teachers label by value in the default classes;
        # under other classes (or another order) they would teach the wrong ones, silently.
        names = [c.name for c in self.classes] if self.classes else list(DEFAULT_CLASSES.names)
        if names != list(DEFAULT_CLASSES.names):
            default = ", ".join(DEFAULT_CLASSES.names)
            if self.synthetic and self.synthetic.count:
                raise ValueError(f"synthetic fields are labelled {default} (in that order); with "
                                 f"classes {', '.join(names)} remove `synthetic:`")
            from agriseg.models.registry import available_models

            for i, pair in enumerate(self.data):
                if pair.pseudo is not None and pair.pseudo.model in available_models():
                    raise ValueError(
                        f"data #{i + 1}: the teacher {pair.pseudo.model!r} labels {default} (in "
                        f"that order), not the classes {', '.join(names)}; use a bundle of these "
                        "classes as the teacher, or labels of your own")
        try:  # names, colours and roles together (unique names, one class per role)
            schema = self.schema()
        except ConfigError as exc:
            raise ValueError(str(exc)) from exc
        from agriseg.metrics import parse_truth_classes

        for i, pair in enumerate(self.data):
            if pair.label_classes is not None and pair.polygons is not None:
                try:
                    parse_name_classes(pair.label_classes, schema)
                except ConfigError as exc:
                    raise ValueError(f"data #{i + 1}: label_classes: {exc}") from exc
            elif pair.label_classes is not None:
                try:
                    parse_truth_classes(pair.label_classes, schema)
                except ConfigError as exc:
                    raise ValueError(f"data #{i + 1}: label_classes: "
                                     f"{str(exc).split(': ', 1)[-1]}") from exc
            if pair.label_colors is not None:
                try:
                    parse_label_colors(pair.label_colors, schema)
                except ConfigError as exc:
                    raise ValueError(f"data #{i + 1}: label_colors: {exc}") from exc
        return self

    # Deliberately shadows pydantic's deprecated v1 ``BaseModel.schema()`` classmethod.
    def schema(self) -> ClassSchema:  # type: ignore[override]
        """The class schema to train."""
        if not self.classes:
            return DEFAULT_CLASSES
        return ClassSchema(
            tuple(SegClass(i, c.name, c.color, c.at_risk, c.role)
                  for i, c in enumerate(self.classes))
        )

    @property
    def bundle_path(self) -> Path:
        """Where the best model is written."""
        return self.bundle or self.out / "model.safetensors"


def _class_values(schema: ClassSchema) -> dict[str, int]:
    """Class name (lower case) -> value, and ``ignore`` -> the schema's nodata."""
    return {c.name.lower(): c.value for c in schema.classes} | {"ignore": schema.nodata}


def name_key(name: object) -> str:
    """A polygon class-column value as :func:`parse_name_classes` keys it.

    Names in lower case without surrounding blanks ("Sugar beet " is "sugar beet"); integer
    codes as their decimal digits (10, 10.0 and "010" are "10").
    """
    if isinstance(name, str):
        text = name.strip()
        digits = text[1:] if text[:1] in "+-" else text
        return str(int(text)) if digits.isdigit() else text.lower()
    if isinstance(name, float) and name.is_integer():
        return str(int(name))
    return str(name).strip().lower()


def parse_name_classes(text: str, schema: ClassSchema) -> dict[str, int]:
    """``"Sugar beet=crop,Weed=weed,background=soil"`` as ``{name key: class value}``.

    The ``label_classes:`` of polygons: what the names (or codes) of their class column are.
    Keys are :func:`name_key` of the names, so they match case-insensitively.

    Raises:
        ConfigError: a malformed pair, an unknown class or a name given twice.
    """
    classes = _class_values(schema)
    valid = ", ".join([*schema.names, "ignore"])
    out: dict[str, int] = {}
    for part in filter(None, (x.strip() for x in text.split(","))):
        name, eq, cls = part.rpartition("=")
        if not eq or not name.strip() or cls.strip().lower() not in classes:
            raise ConfigError(
                f"{part!r}: expected NAME=CLASS pairs separated by ',' (NAME a value of the "
                f"class column, CLASS one of {valid}), e.g. \"Sugar beet="
                f"{_named(schema, 'crop')},background={_named(schema, 'soil')}\"")
        key = name_key(name)
        if key in out:
            raise ConfigError(f"name {name.strip()!r} is given twice (names match "
                              "case-insensitively); give each name once")
        out[key] = classes[cls.strip().lower()]
    if not out:
        raise ConfigError("is empty; give NAME=CLASS pairs separated by ','")
    return out


def _named(schema: ClassSchema, role: str) -> str:
    """The name of the class playing ``role``, else the first class's (for examples)."""
    c = schema.by_role(role)
    return c.name if c else schema.names[0]


def parse_label_colors(text: str, schema: ClassSchema) -> dict[tuple[int, int, int], int]:
    """``label_colors:`` as ``{(r, g, b): class value}``: evaluate's ``--truth-colors``.

    Raises:
        ConfigError: as :func:`agriseg.metrics.parse_truth_colors`, worded for the config.
    """
    from agriseg.metrics import parse_truth_colors

    try:
        out = parse_truth_colors(text, schema)
    except ConfigError as exc:
        # "--truth-colors '0,0,0=dirt': expected ..." names an option the config does not have.
        raise ConfigError(str(exc).removeprefix("--truth-colors").lstrip(": ")) from exc
    if not out:
        raise ConfigError("is empty; give R,G,B=CLASS pairs separated by ';'")
    return out


def resolve_paths(values: dict[str, Any], base: Path) -> dict[str, Any]:
    """Make relative paths in a loaded YAML mapping relative to the YAML file."""

    def fix(p: Any) -> Any:
        if isinstance(p, str) and p and not Path(p).is_absolute():
            return str(base / p)
        return p

    def fix_model(m: Any) -> Any:
        # A registered name (labelfree, unet-default) stays a name, as `run --model` reads it
        # (a name wins over a same-named file there too); anything else is a bundle path, and
        # relative to the config like every path in it. Only paths with "/" were, so a
        # teacher.safetensors beside the config was looked up in the working directory.
        from agriseg.models.registry import available_models

        return m if isinstance(m, str) and m in available_models() else fix(m)

    out = dict(values)
    for key in ("out", "bundle"):
        if key in out:
            out[key] = fix(out[key])
    if isinstance(out.get("model"), dict) and out["model"].get("init_from"):
        out["model"] = {**out["model"], "init_from": fix_model(out["model"]["init_from"])}
    if isinstance(out.get("data"), list):
        pairs = []
        for d in out["data"]:
            if isinstance(d, dict):
                d = {k: fix(v) if k in ("image", "labels", "polygons") else v for k, v in d.items()}
                if isinstance(d.get("pseudo"), dict) and "model" in d["pseudo"]:
                    d["pseudo"] = {**d["pseudo"], "model": fix_model(d["pseudo"]["model"])}
            pairs.append(d)
        out["data"] = pairs
    return out


def build_train_config(source: str = "options", **values: Any) -> TrainConfig:
    """Validate ``values`` into a :class:`TrainConfig`.

    Raises:
        ConfigError: every invalid key and why, prefixed by ``source``.
    """
    try:
        return TrainConfig(**values)
    except ValidationError as exc:
        raise ConfigError(
            format_validation(exc, source, TrainConfig, "training configuration")
        ) from exc


def load_train_config(path: str | Path, **overrides: Any) -> TrainConfig:
    """Read a YAML training config (paths relative to the file), applying ``overrides``.

    Raises:
        ConfigError: unreadable YAML, unknown keys or invalid values.
    """
    p = Path(path)
    values = resolve_paths(load_yaml(p), p.resolve().parent)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return build_train_config(str(p), **values)
