"""The class schema shared by models, writers, styles and reports."""

from __future__ import annotations

from dataclasses import dataclass

from agriseg.errors import ConfigError

NODATA_CLASS = 255


@dataclass(frozen=True, slots=True)
class SegClass:
    """One output class: its pixel value, name and display colour."""

    value: int
    name: str
    color: tuple[int, int, int]
    at_risk: bool = False

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
        values = [c.value for c in self.classes]
        if values != list(range(len(values))):
            raise ConfigError(f"class values must be 0..{len(values) - 1} in order, got {values}")
        if len({c.name for c in self.classes}) != len(values):
            raise ConfigError(f"class names must be unique, got {[c.name for c in self.classes]}")

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

    def value_of(self, name: str) -> int:
        """Pixel value of the class called ``name``.

        Raises:
            ConfigError: no class has that name (the message lists the valid ones).
        """
        for c in self.classes:
            if c.name == name:
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
                {"value": c.value, "name": c.name, "color": list(c.color), "at_risk": c.at_risk}
                for c in self.classes
            ],
        }

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> ClassSchema:
        """Inverse of :meth:`to_dict`."""
        try:
            raw = data["classes"]
            assert isinstance(raw, list)
            classes = tuple(
                SegClass(
                    int(c["value"]),
                    str(c["name"]),
                    (int(c["color"][0]), int(c["color"][1]), int(c["color"][2])),
                    bool(c.get("at_risk", False)),
                )
                for c in raw
            )
            nodata = int(data.get("nodata", NODATA_CLASS))  # type: ignore[call-overload]
        except (KeyError, TypeError, ValueError, AssertionError, IndexError) as exc:
            raise ConfigError(f"invalid class schema {data!r}: {exc}") from exc
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
