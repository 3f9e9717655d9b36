"""Torch-free description of a network: what a bundle stores and a worker needs to know.

Kept apart from :mod:`agriseg.models.arch` so that reading a bundle's metadata or running its
ONNX export never imports PyTorch (seconds and ~300 MB per process).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from agriseg.classes import MAX_CLASSES
from agriseg.errors import ConfigError

# Model input must be a multiple of this (five stride-2 stages).
SIZE_MULTIPLE = 32

#: Most input bands a network takes (a bundle claiming millions built a 3 GB first layer).
MAX_IN_CHANNELS = 64
#: Largest integer in a network option (decoder widths and the like).
MAX_OPTION_INT = 4096
#: Encoder names: smp's and timm's identifiers; no hub prefix (``tu-hf-hub:...`` went online),
#: no path.
_ENCODER_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,80}")
#: Words of option names that would load files or reach the network inside smp or timm
#: (``checkpoint_path`` had timm torch.load any file) ...
_UNSAFE_WORDS = frozenset({"path", "url", "file", "filename", "weights", "pretrained",
                           "pretrained_cfg", "hub", "checkpoint", "cache", "dir", "overlay"})
#: ... and options with such a word that load nothing (timm's stochastic depth).
_SAFE_OPTIONS = frozenset({"drop_path_rate"})


def _unsafe_option(key: str) -> bool:
    words = set(key.lower().split("_"))
    return key not in _SAFE_OPTIONS and bool(words & _UNSAFE_WORDS or "pretrain" in key)


def check_spec(spec: ArchSpec) -> ArchSpec:
    """Bounds and names a network description must respect before anything is built.

    Bundles are files from elsewhere: their metadata must not make agriseg read other files,
    go online or allocate without bound.

    Raises:
        ConfigError: what is out of bounds.
    """
    if not _ENCODER_NAME.fullmatch(spec.encoder) or not re.fullmatch(r"[a-z0-9_+]{1,32}",
                                                                       spec.arch):
        raise ConfigError(f"architecture {spec.arch[:40]!r} / encoder {spec.encoder[:80]!r}: "
                          "names of letters, digits, '_', '-' and '.' only (timm encoders as "
                          "tu-<name>, never a hub: or a path)")
    if not 1 <= spec.in_channels <= MAX_IN_CHANNELS or not 2 <= spec.classes <= MAX_CLASSES \
            or not 1 <= spec.depth <= 8:
        raise ConfigError(f"network of {spec.in_channels} input band(s), {spec.classes} "
                          f"classes, depth {spec.depth}: need 1..{MAX_IN_CHANNELS} bands, "
                          f"2..{MAX_CLASSES} classes, depth 1..8")
    for key, value in spec.options:
        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,40}", str(key)) or _unsafe_option(key):
            raise ConfigError(f"network option {str(key)[:40]!r} is not allowed (no option may "
                              "name files, weights or downloads)")
        if not _plain_value(value):
            raise ConfigError(f"network option {key}={str(value)[:60]}: give a number up to "
                              f"{MAX_OPTION_INT}, a boolean, a short name, or a list or mapping "
                              "of up to 16 of them")
    return spec


def _plain_value(value: Any) -> bool:
    """A number, boolean, short name, or a list / mapping of up to 16 of them (one level).

    smp 0.6 takes ``decoder_use_norm: {type: layernorm}``.
    """
    if isinstance(value, dict):
        return len(value) <= 16 and all(
            isinstance(k, str) and not _unsafe_option(k) and _plain(v) for k, v in value.items())
    items = value if isinstance(value, tuple | list) else (value,)
    return len(items) <= 16 and all(_plain(v) for v in items)


def _plain(v: Any) -> bool:
    if v is None or isinstance(v, bool):
        return True
    if isinstance(v, int):
        return abs(v) <= MAX_OPTION_INT
    if isinstance(v, float):
        return math.isfinite(v) and abs(v) <= MAX_OPTION_INT
    return isinstance(v, str) and re.fullmatch(r"[A-Za-z0-9_\-]{0,32}", v) is not None


@dataclass(frozen=True, slots=True)
class ArchSpec:
    """What :func:`create_model` needs to rebuild a network (stored in bundles)."""

    arch: str
    encoder: str
    in_channels: int
    classes: int
    depth: int
    options: tuple[tuple[str, Any], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {
            "arch": self.arch,
            "encoder": self.encoder,
            "in_channels": self.in_channels,
            "classes": self.classes,
            "depth": self.depth,
            "options": {k: list(v) if isinstance(v, tuple) else v for k, v in self.options},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ArchSpec:
        """Inverse of :meth:`to_dict`, checked (:func:`check_spec`).

        Raises:
            ConfigError: out-of-bounds values or names; KeyError/TypeError/ValueError for
                missing or mistyped fields.
        """
        opts = data.get("options") or {}
        if not isinstance(opts, dict):
            raise TypeError(f"model options must be a mapping, got {type(opts).__name__}")
        return check_spec(cls(
            str(data["arch"]), str(data["encoder"]), int(data["in_channels"]),
            int(data["classes"]), int(data["depth"]),
            tuple(sorted((str(k), tuple(v) if isinstance(v, list) else v)
                         for k, v in opts.items())),
        ))
