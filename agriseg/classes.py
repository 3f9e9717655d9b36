"""The class schema shared by models, writers, styles and reports."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from agriseg.errors import ConfigError

NODATA_CLASS = 255


#: What a class stands for in the field summaries (health score, vegetation share).
ROLES = ("soil", "crop", "weed", "disease")


#: Longest class name (names become column names and file names).
MAX_NAME_CHARS = 128
#: Most classes a schema holds: class rasters are bytes and 255 is nodata.
MAX_CLASSES = 255


def file_stem(name: str) -> str:
    """The file name a class's rasters get (``probability/<stem>.tif``).

    Path separators become ``_`` and leading dots and spaces go, so a name never reaches
    outside its folder: a bundle's class "../../x" wrote rasters outside --out.
    """
    stem = re.sub(r"[/\\]", "_", name).lstrip(". ")
    return stem or "class"


@dataclass(frozen=True, slots=True)
class SegClass:
    """One output class: its pixel value, name and display colour.

    Attributes:
        value: pixel value in the class raster.
        name: class name (the ``<name>_pct`` columns, legends, ``--rate NAME=``).
        color: display colour, RGB 0-255.
        at_risk: patches of it become at-risk zones.
        role: which of :data:`ROLES` it plays in the field summaries; default: its name, if
            that is one of them (a "sugarbeet" class says ``role: crop``).
    """

    value: int
    name: str
    color: tuple[int, int, int]
    at_risk: bool = False
    role: str | None = None

    def __post_init__(self) -> None:
        if not self.name.strip() or any(ch in self.name for ch in ",=") \
                or self.name.strip().lower() == "ignore":
            raise ConfigError(
                f"class name {self.name[:MAX_NAME_CHARS]!r}: give a non-empty name without ',' "
                "or '=', other than 'ignore' (command-line options name classes as NAME=VALUE "
                "lists)"
            )
        if len(self.name) > MAX_NAME_CHARS or any(
                unicodedata.category(ch) in ("Cc", "Cs") for ch in self.name):
            # Names head CSV columns and legends, and become file names (see file_stem).
            raise ConfigError(
                f"class name {self.name[:MAX_NAME_CHARS]!r}: give at most {MAX_NAME_CHARS} "
                "characters, without control characters (line breaks, tabs)"
            )
        if len(self.color) != 3 or not all(0 <= int(v) <= 255 for v in self.color):
            raise ConfigError(
                f"class {self.name!r}: colour {list(self.color)} must be three values 0-255"
            )
        if self.role is None and self.name.lower() in ROLES:
            object.__setattr__(self, "role", self.name.lower())
        if self.role is not None and self.role not in ROLES:
            raise ConfigError(
                f"class {self.name!r}: role {self.role!r} is not one of {', '.join(ROLES)}"
            )

    @property
    def hex(self) -> str:
        """Colour as ``#rrggbb``."""
        return "#{:02x}{:02x}{:02x}".format(*self.color)


@dataclass(frozen=True, slots=True)
class ClassSchema:
    """Ordered classes with contiguous values ``0..K-1``; ``255`` is nodata."""

    classes: tuple[SegClass, ...]
    nodata: int = NODATA_CLASS

    def __post_init__(self) -> None:
        if not 1 <= len(self.classes) <= MAX_CLASSES:
            raise ConfigError(f"a class schema holds 1 to {MAX_CLASSES} classes (class rasters "
                              f"are bytes, 255 is nodata), got {len(self.classes)}")
        if not len(self.classes) <= self.nodata <= 255:
            raise ConfigError(f"nodata class value {self.nodata}: must be above the class "
                              f"values (0..{len(self.classes) - 1}) and at most 255")
        values = [c.value for c in self.classes]
        if values != list(range(len(values))):
            raise ConfigError(f"class values must be 0..{len(values) - 1} in order, got {values}")
        if len({file_stem(c.name).lower() for c in self.classes}) != len(values):
            raise ConfigError(f"class names must be unique, case aside and with '/' and '\\' "
                              f"taken as '_' (they name columns, --rate classes and files), "
                              f"got {[c.name for c in self.classes]}")
        roles = [c.role for c in self.classes if c.role]
        if len(set(roles)) != len(roles):
            raise ConfigError(
                f"classes {', '.join(c.name for c in self.classes if c.role)} give a role twice "
                f"({', '.join(roles)}); each of {', '.join(ROLES)} belongs to one class at most"
            )

    def __len__(self) -> int:
        return len(self.classes)

    @property
    def names(self) -> tuple[str, ...]:
        """Class names in value order."""
        return tuple(c.name for c in self.classes)

    @property
    def at_risk(self) -> tuple[SegClass, ...]:
        """Classes whose patches become at-risk zones."""
        return tuple(c for c in self.classes if c.at_risk)

    def by_role(self, role: str) -> SegClass | None:
        """The class playing ``role`` (see :data:`ROLES`), if any."""
        return next((c for c in self.classes if c.role == role), None)

    def value_of(self, name: str) -> int:
        """Pixel value of the class called ``name`` (case-insensitive).

        Raises:
            ConfigError: no class has that name (the message lists the valid ones).
        """
        for c in self.classes:
            if c.name == name:
                return c.value
        for c in self.classes:  # names are unique regardless of case
            if c.name.lower() == name.lower():
                return c.value
        raise ConfigError(f"unknown class {name!r}; valid classes: {', '.join(self.names)}")

    def colormap(self) -> dict[int, tuple[int, int, int, int]]:
        """GDAL colour table: the class colours, nodata transparent."""
        cmap = {c.value: (*c.color, 255) for c in self.classes}
        cmap[self.nodata] = (0, 0, 0, 0)
        return cmap

    def to_dict(self) -> dict[str, object]:
        """JSON-friendly form (used in bundles and run.json)."""
        return {
            "nodata": self.nodata,
            "classes": [
                {"value": c.value, "name": c.name, "color": list(c.color), "at_risk": c.at_risk,
                 "role": c.role}
                for c in self.classes
            ],
        }

    def description(self) -> str:
        """The class mask's band description, ``class id (0=soil, ..., 255=nodata)``."""
        pairs = ", ".join(f"{c.value}={c.name}" for c in self.classes)
        return f"class id ({pairs}, {self.nodata}=nodata)"

    @classmethod
    def from_description(cls, text: str,
                         colours: dict[int, tuple[int, ...]] | None = None) -> ClassSchema | None:
        """Inverse of :meth:`description` (roles from the names, colours from ``colours``).

        A classes.tif moved away from its run.json keeps that description and its colour
        table inside the file. None when ``text`` is no such description.
        """
        match = re.fullmatch(r"class id \((.*)\)", text)
        if match is None:
            return None
        colours = colours or {}
        try:
            pairs = [part.split("=", 1) for part in match.group(1).split(", ")]
            values = {int(v): name for v, name in pairs}
            # The last "=nodata" entry: a class may itself be called "nodata".
            nodata = max((v for v, name in values.items() if name == "nodata"),
                         default=NODATA_CLASS)
            classes = tuple(
                SegClass(v, name, tuple(colours.get(v, (128, 128, 128))[:3]))  # type: ignore[arg-type]
                for v, name in sorted(values.items()) if v != nodata)
            return cls(classes, nodata)
        except (ValueError, ConfigError):
            return None

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> ClassSchema:
        """Inverse of :meth:`to_dict`."""
        try:
            raw = data["classes"]
            assert isinstance(raw, list)
            if len(raw) > MAX_CLASSES:
                raise ConfigError(f"a class schema holds at most {MAX_CLASSES} classes (class "
                                  f"rasters are bytes), got {len(raw)}")
            classes = tuple(
                SegClass(
                    int(c["value"]),
                    str(c["name"]),
                    (int(c["color"][0]), int(c["color"][1]), int(c["color"][2])),
                    bool(c.get("at_risk", False)),
                    None if c.get("role") is None else str(c["role"]),
                )
                for c in raw
            )
            nodata = int(data.get("nodata", NODATA_CLASS))  # type: ignore[call-overload]
        except ConfigError:
            raise
        except (KeyError, TypeError, ValueError, AssertionError, IndexError) as exc:
            raise ConfigError(f"invalid class schema ({exc}): {str(data)[:300]}") from exc
        return cls(classes, nodata)


DEFAULT_CLASSES = ClassSchema(
    (
        SegClass(0, "soil", (166, 118, 66)),
        SegClass(1, "crop", (46, 160, 44)),
        SegClass(2, "weed", (255, 215, 0), at_risk=True),
        SegClass(3, "disease", (214, 39, 40), at_risk=True),
    )
)
SOIL, CROP, WEED, DISEASE = 0, 1, 2, 3
