"""Torch-free description of a network: what a bundle stores and a worker needs to know.

Kept apart from :mod:`agriseg.models.arch` so that reading a bundle's metadata or running its
ONNX export never imports PyTorch (seconds and ~300 MB per process).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Model input must be a multiple of this (five stride-2 stages).
SIZE_MULTIPLE = 32


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
        """Inverse of :meth:`to_dict`."""
        opts = data.get("options") or {}
        return cls(
            str(data["arch"]), str(data["encoder"]), int(data["in_channels"]),
            int(data["classes"]), int(data["depth"]),
            tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in opts.items())),
        )
