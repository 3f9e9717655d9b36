"""Model bundles: weights as safetensors plus versioned JSON metadata, never a pickle.

A bundle is either

- one ``NAME.safetensors`` file whose header metadata holds the JSON under
  ``agriseg_bundle`` (easy to ship and copy), or
- a folder with ``weights.safetensors`` and ``metadata.json`` (easy to read and edit).

The metadata records everything needed to rebuild and use the network: format version,
architecture spec, class schema (names, colours), input band roles, normalisation, training
patch size, halo (receptive margin), the GSD range it was trained on, metrics and a summary of
the training data. Loading checks every part and fails with a :class:`ModelError` that names
the file and the fix: pickled checkpoints are refused outright, truncated files, unknown format
versions and weights that do not fit the declared architecture are reported clearly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import struct
import time
from dataclasses import dataclass, field, replace
from functools import lru_cache, partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agriseg.classes import ClassSchema
from agriseg.errors import ConfigError, ModelError
from agriseg.models.spec import ArchSpec

if TYPE_CHECKING:
    import torch
    from torch import nn

    from agriseg.models.base import Segmenter

log = logging.getLogger(__name__)

BUNDLE_FORMAT = "agriseg-bundle"
BUNDLE_VERSION = 1
WEIGHTS_NAME = "weights.safetensors"
METADATA_NAME = "metadata.json"
HEADER_KEY = "agriseg_bundle"
_PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".bin", ".tar")


@dataclass(frozen=True, slots=True)
class BundleMeta:
    """What a bundle says about its network.

    Attributes:
        arch: architecture spec to rebuild the network.
        schema: output classes (names, colours) in channel order.
        roles: input band roles in channel order.
        mean: per-channel mean subtracted from 0..1 scaled input.
        std: per-channel standard deviation the input is divided by.
        patch_size: training patch edge in pixels.
        halo: receptive margin in pixels the pipeline should read around each tile.
        gsd_range_m: ``(min, max)`` ground sampling distance of the training data, metres.
        name: a short name for logs and run.json.
        metrics: validation metrics (JSON-friendly).
        training: summary of the training data and settings (JSON-friendly).
        created: ISO time of writing.
    """

    arch: ArchSpec
    schema: ClassSchema
    roles: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    patch_size: int = 256
    halo: int = 32
    gsd_range_m: tuple[float, float] | None = None
    name: str = "bundle"
    metrics: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    created: str = ""

    def __post_init__(self) -> None:
        n = self.arch.in_channels
        if len(self.roles) != n or len(self.mean) != n or len(self.std) != n:
            raise ConfigError(
                f"bundle metadata: {n} input channel(s) but roles {list(self.roles)}, "
                f"{len(self.mean)} mean and {len(self.std)} std value(s); give one per channel"
            )
        if self.arch.classes != len(self.schema):
            raise ConfigError(
                f"bundle metadata: the network has {self.arch.classes} outputs but the class "
                f"schema has {len(self.schema)} classes ({', '.join(self.schema.names)})"
            )
        if not all(math.isfinite(s) and s > 0 for s in self.std) or not all(
                math.isfinite(m) for m in self.mean):
            # NaN means painted every pixel soil, an infinite std every pixel weed.
            raise ConfigError(f"bundle metadata: mean must be finite and std finite and "
                              f"positive, got {list(self.mean)}, {list(self.std)}")
        from agriseg.bands import ROLES

        if not set(self.roles) <= set(ROLES) - {"alpha"} or len(set(self.roles)) != n:
            raise ConfigError(f"bundle metadata: roles {list(self.roles)[:8]} must be distinct "
                              f"band roles of {', '.join(r for r in ROLES if r != 'alpha')}")
        if not 0 <= self.halo <= 1024 or not 16 <= self.patch_size <= 8192:
            raise ConfigError(f"bundle metadata: halo {self.halo} must be 0..1024 and patch "
                              f"size {self.patch_size} 16..8192 pixels")
        if self.gsd_range_m is not None and not (
                math.isfinite(self.gsd_range_m[0]) and math.isfinite(self.gsd_range_m[1])
                and 0 < self.gsd_range_m[0] <= self.gsd_range_m[1]):
            raise ConfigError(f"bundle metadata: gsd_range_m {list(self.gsd_range_m)} must be "
                              "two positive metres, smallest first")

    def to_dict(self) -> dict[str, Any]:
        """JSON form written into the bundle."""
        return {
            "format": BUNDLE_FORMAT,
            "format_version": BUNDLE_VERSION,
            "name": self.name,
            "model": self.arch.to_dict(),
            "schema": self.schema.to_dict(),
            "roles": list(self.roles),
            "normalization": {"mean": list(self.mean), "std": list(self.std)},
            "patch_size": self.patch_size,
            "halo": self.halo,
            "gsd_range_m": list(self.gsd_range_m) if self.gsd_range_m else None,
            "metrics": self.metrics,
            "training": self.training,
            "created": self.created,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "bundle") -> BundleMeta:
        """Validate and parse bundle metadata.

        Raises:
            ModelError: not agriseg metadata, unknown version, or missing/invalid fields.
        """
        if not isinstance(data, dict) or data.get("format") != BUNDLE_FORMAT:
            raise ModelError(
                f"{source}: not an agriseg model bundle (metadata lacks format "
                f"{BUNDLE_FORMAT!r}); create bundles with `agriseg train`"
            )
        ver = data.get("format_version")
        if ver != BUNDLE_VERSION:
            raise ModelError(
                f"{source}: bundle format version {ver!r} is not supported by this agriseg "
                f"(it reads version {BUNDLE_VERSION}); upgrade agriseg or re-export the bundle"
            )
        try:
            gsd = data.get("gsd_range_m")
            norm = data["normalization"]
            return cls(
                arch=ArchSpec.from_dict(data["model"]),
                schema=ClassSchema.from_dict(data["schema"]),
                roles=tuple(str(r) for r in data["roles"]),
                mean=tuple(float(v) for v in norm["mean"]),
                std=tuple(float(v) for v in norm["std"]),
                patch_size=int(data.get("patch_size", 256)),
                halo=int(data.get("halo", 32)),
                gsd_range_m=(float(gsd[0]), float(gsd[1])) if gsd else None,
                name=str(data.get("name", "bundle")),
                metrics=dict(data.get("metrics") or {}),
                training=dict(data.get("training") or {}),
                created=str(data.get("created", "")),
            )
        except (KeyError, TypeError, ValueError, IndexError, ConfigError) as exc:
            raise ModelError(f"{source}: invalid bundle metadata ({str(exc)[:300]})") from exc


def _state_dict_for_saving(model: nn.Module | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    sd = model if isinstance(model, dict) else model.state_dict()
    # safetensors refuses shared or strided storage; clone keeps every tensor independent.
    return {k: v.detach().cpu().contiguous().clone() for k, v in sd.items()}


def save_bundle(
    model: nn.Module | dict[str, torch.Tensor], meta: BundleMeta, path: str | os.PathLike[str]
) -> Path:
    """Write a bundle atomically.

    Args:
        model: the network (or its state dict).
        meta: its metadata (``created`` is filled in when empty).
        path: ``*.safetensors`` for a one-file bundle, otherwise a folder.

    Returns:
        The bundle path.
    """
    from safetensors.torch import save_file

    p = Path(path)
    if not meta.created:
        meta = replace(meta, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    tensors = _state_dict_for_saving(model)
    text = json.dumps(meta.to_dict(), sort_keys=True)
    if p.suffix == ".safetensors":
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.partial")
        save_file(tensors, str(tmp), metadata={HEADER_KEY: text})
        os.replace(tmp, p)
    else:
        p.mkdir(parents=True, exist_ok=True)
        tmp = p / f".{WEIGHTS_NAME}.partial"
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, p / WEIGHTS_NAME)
        (p / f".{METADATA_NAME}.partial").write_text(json.dumps(meta.to_dict(), indent=2))
        os.replace(p / f".{METADATA_NAME}.partial", p / METADATA_NAME)
    # safetensors creates its file readable by its owner only; a bundle is shared (cluster
    # workers of other users read it), so it gets the permissions of any file written here.
    umask = os.umask(0)
    os.umask(umask)
    for written in ([p] if p.suffix == ".safetensors" else [p / WEIGHTS_NAME, p / METADATA_NAME]):
        written.chmod(0o666 & ~umask)
    log.info("wrote model bundle %s", p)
    return p


#: Largest bundle metadata accepted (a few KB in practice; a crafted one held millions of
#: classes).
MAX_METADATA_BYTES = 4 * 2**20


def _refuse_pickle(path: Path) -> None:
    with open(path, "rb") as f:
        head = f.read(9)
    # A safetensors file starts with its header length (u64) and the JSON header's "{".
    if len(head) == 9 and head[8:9] == b"{":
        return
    if path.suffix.lower() == ".onnx":
        raise ModelError(
            f"{path}: is an ONNX model, not an agriseg model bundle; give the .safetensors "
            "bundle it was exported from (agriseg exports and caches the ONNX file itself when "
            "it runs with ONNX Runtime)"
        )
    pickled = (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")) or \
        head[:4] == b"PK\x03\x04"
    if pickled or path.suffix.lower() in _PICKLE_SUFFIXES:
        raise ModelError(
            f"{path}: looks like a pickled PyTorch checkpoint; agriseg never unpickles model "
            "files (unpickling runs arbitrary code). In a trusted environment load it yourself "
            "and save it with agriseg.models.bundle.save_bundle (weights as .safetensors + "
            "JSON metadata)"
        )


def _read_safetensors_header(path: Path) -> dict[str, Any]:
    """Parse and sanity-check the safetensors header without loading tensors.

    Raises:
        ModelError: not safetensors, or shorter than its header says (truncated download).
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ModelError(f"{path}: empty or truncated model file ({size} bytes); "
                             "copy or download it again")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, 100_000_000):
            raise ModelError(
                f"{path}: not a safetensors file or truncated (header of {n} bytes in a "
                f"{size}-byte file); copy or download the bundle again"
            )
        try:
            header = json.loads(f.read(n))
        except (ValueError, RecursionError) as exc:
            raise ModelError(f"{path}: corrupt safetensors header ({str(exc)[:200]}); copy it "
                             "again") from exc
    if not isinstance(header, dict):
        raise ModelError(f"{path}: corrupt safetensors header; copy it again")
    try:
        end = max(
            (int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
            default=0)
        meta = header.get("__metadata__") or {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise TypeError("__metadata__ must map names to strings")
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise ModelError(f"{path}: corrupt safetensors header ({str(exc)[:200]}); copy or "
                         "download the bundle again") from exc
    if 8 + n + end != size:
        raise ModelError(
            f"{path}: truncated or padded safetensors file (expected {8 + n + end} bytes, found "
            f"{size}); copy or download the bundle again"
        )
    return header


def bundle_files(path: str | os.PathLike[str]) -> tuple[Path, Path | None]:
    """``(weights file, metadata file or None)`` of a bundle path.

    Raises:
        ModelError: missing path or an incomplete bundle folder.
    """
    p = Path(path)
    if p.is_dir():
        w, m = p / WEIGHTS_NAME, p / METADATA_NAME
        missing = [x.name for x in (w, m) if not x.exists()]
        if missing:
            raise ModelError(
                f"{p}: bundle folder lacks {', '.join(missing)}; a bundle folder holds "
                f"{WEIGHTS_NAME} and {METADATA_NAME} (written by `agriseg train`)"
            )
        return w, m
    if not p.exists():
        raise ModelError(f"{p}: model bundle not found; check the path")
    return p, None


def read_bundle_meta(path: str | os.PathLike[str]) -> BundleMeta:
    """Bundle metadata, checked (no pickle, complete file), without loading the weights.

    Raises:
        ModelError: pickle, truncated/corrupt file, bad metadata, unknown version.
    """
    weights, meta_file = bundle_files(path)
    _refuse_pickle(weights)
    header = _read_safetensors_header(weights)
    if meta_file is not None:
        try:
            if meta_file.stat().st_size > MAX_METADATA_BYTES:
                raise ValueError(f"{meta_file.stat().st_size} bytes; metadata is a few KB")
            data = json.loads(meta_file.read_text())
        except (OSError, ValueError, RecursionError) as exc:
            raise ModelError(f"{meta_file}: unreadable bundle metadata ({str(exc)[:200]})") \
                from exc
        source = str(meta_file)
    else:
        text = (header.get("__metadata__") or {}).get(HEADER_KEY)
        if text is None:
            raise ModelError(
                f"{weights}: a safetensors file without agriseg metadata (no "
                f"{HEADER_KEY!r} entry in its header); wrap plain weights with "
                "agriseg.models.bundle.save_bundle, giving architecture, classes and bands"
            )
        try:
            if len(text) > MAX_METADATA_BYTES:
                raise ValueError(f"{len(text)} characters; metadata is a few KB")
            data = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise ModelError(f"{weights}: corrupt bundle metadata in the header "
                             f"({str(exc)[:200]})") from exc
        source = str(weights)
    return BundleMeta.from_dict(data, source)


def read_bundle(
    path: str | os.PathLike[str],
) -> tuple[BundleMeta, dict[str, torch.Tensor]]:
    """Load metadata and weights (no pickle involved).

    Raises:
        ModelError: pickle, truncated/corrupt file, bad metadata, unknown version.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    meta = read_bundle_meta(path)
    weights, _ = bundle_files(path)
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"{weights}: cannot read weights ({exc}); copy the bundle again") from exc
    return meta, tensors


def load_bundle_model(path: str | os.PathLike[str]) -> tuple[BundleMeta, nn.Module]:
    """Rebuild the network of a bundle in eval mode, with its weights.

    Raises:
        ModelError: as :func:`read_bundle`, or weights that do not fit the architecture.
    """
    from agriseg.models.arch import build_model

    meta, tensors = read_bundle(path)
    try:
        model = build_model(meta.arch)
    except ConfigError as exc:
        raise ModelError(f"{path}: {exc}") from exc
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if expected[k].shape != tensors[k].shape)
    if missing or unexpected or wrong:
        detail = "; ".join(
            f"{what}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
            for what, keys in (("missing", missing), ("unexpected", unexpected),
                               ("wrong shape", wrong)) if keys
        )
        raise ModelError(
            f"{path}: weights do not match the declared architecture {meta.arch.arch}/"
            f"{meta.arch.encoder} ({detail}); the metadata and weights come from different "
            "models"
        )
    # Stored weights may be half precision to save space; the model computes in float32.
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in tensors.items()})
    model.eval()
    return meta, model


def bundle_digest(path: str | os.PathLike[str]) -> str:
    """SHA-256 of the bundle's weights and metadata (cache key for ONNX exports).

    A run asks for it up to three times (the ONNX cache, the resume record, run.json):
    the files are hashed once per version of them (path, size and mtime).
    """
    files = tuple(f for f in bundle_files(path) if f is not None)
    stats = tuple((str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    return _digest(stats)


@lru_cache(maxsize=16)
def _digest(stats: tuple[tuple[str, int, int], ...]) -> str:
    h = hashlib.sha256()
    for name, _, _ in stats:
        with open(name, "rb") as fh:
            for chunk in iter(partial(fh.read, 1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def load_bundle_segmenter(path: str | os.PathLike[str], engine: str = "auto") -> Segmenter:
    """A :class:`NeuralSegmenter` for the bundle at ``path`` (weights load lazily on workers).

    Raises:
        ModelError: the bundle is unsafe, corrupt or inconsistent.
    """
    from agriseg.models.neural import NeuralSegmenter, onnx_cache_path, uses_onnx

    # Checked here so a bad bundle fails before any Dask work starts. An ONNX export of these
    # exact bytes (same digest) was verified against PyTorch when it was made, so when ONNX
    # Runtime will run it and the export is cached the weights need no second check, and
    # PyTorch no import.
    meta = read_bundle_meta(path)
    cached = uses_onnx(engine, arch=meta.arch.arch) and \
        onnx_cache_path(path, bundle_digest(path)).exists()
    if not cached:
        meta, _ = load_bundle_model(path)
    return NeuralSegmenter(str(Path(path).resolve()), meta, engine=engine)
