"""Names users can pass to ``--model`` and how each becomes a :class:`Segmenter`."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from agriseg.errors import ConfigError, ModelError
from agriseg.models.base import Segmenter

log = logging.getLogger(__name__)


def _shipped_bundle(filename: str) -> Segmenter:
    from pathlib import Path

    from agriseg.models.bundle import load_bundle_segmenter

    path = Path(__file__).resolve().parents[1] / "data" / filename
    if not path.exists():
        raise ModelError(
            f"{path}: the bundled model is missing from this installation; reinstall agriseg "
            "or train it with `agriseg train workflows/train-default.yaml`"
        )
    return load_bundle_segmenter(path)


def _labelfree(options: Mapping[str, Any]) -> Segmenter:
    from agriseg.models.labelfree import LabelFreeSegmenter
    from agriseg.models.labelfree_config import labelfree_config

    return LabelFreeSegmenter(labelfree_config(options))


def _index_threshold() -> Segmenter:
    from agriseg.models.indexthreshold import IndexThresholdSegmenter

    return IndexThresholdSegmenter()


# name -> (factory, one-line description). Other modules register more names here.
_REGISTRY: dict[str, tuple[Callable[[], Segmenter], str]] = {
    "index-threshold": (_index_threshold, "soil/crop from ExG or NDVI, one Otsu threshold"),
    "labelfree": (
        lambda: _labelfree({}),
        "label-free soil/crop/weed/disease: index threshold, crop rows, colour departures",
    ),
    "unet-default": (
        lambda: _shipped_bundle("unet-default.safetensors"),
        "small U-Net bundle shipped with agriseg (synthetic fields + pseudo-labels, RGB)",
    ),
}
DEFAULT_MODEL = "labelfree"


def register(name: str, factory: Callable[[], Segmenter], description: str) -> None:
    """Make ``name`` selectable with ``--model``."""
    _REGISTRY[name] = (factory, description)


def available_models() -> dict[str, str]:
    """Registered model names and their descriptions."""
    return {k: v[1] for k, v in sorted(_REGISTRY.items())}


def bundle_path(bundle: str, what: str) -> Path:
    """The bundle file or folder that a path or a registered model's name stands for.

    Names first, as ``run --model`` resolves them; a learned model knows its bundle file.

    Args:
        bundle: a registered name or a bundle path.
        what: what the caller does with the bundle, for the messages ("describe", "export").

    Raises:
        ModelError: a rule-based model's name (no bundle), or neither a name nor a path.
    """
    names = available_models()
    if bundle in names:
        path = getattr(load_segmenter(bundle), "path", None)
        if path is None:
            raise ModelError(f"{bundle}: is a rule-based model, without a bundle to {what}; "
                             "give a bundle path or a learned model's name (such as "
                             "unet-default)")
        return Path(path)
    if not Path(bundle).exists():
        raise ModelError(f"{bundle}: no such model bundle or model name; give a bundle path "
                         "(a .safetensors file or a bundle folder) or a registered name "
                         f"({', '.join(names)})")
    return Path(bundle)


#: Models that take options (``--model-option``): name -> factory from the options.
_CONFIGURABLE: dict[str, Callable[[Mapping[str, Any]], Segmenter]] = {"labelfree": _labelfree}


def load_segmenter(
    name_or_path: str | None = None, engine: str = "auto",
    options: Mapping[str, Any] | None = None,
) -> Segmenter:
    """Resolve a registered name or a model bundle path to a segmenter.

    Args:
        name_or_path: registered name or bundle path (default: :data:`DEFAULT_MODEL`).
        engine: inference engine of learned models (``auto``, ``torch``, ``onnx``); rule-based
            models ignore it.
        options: settings of the model's own configuration (the label-free model's
            :class:`~agriseg.models.labelfree.LabelFreeConfig` fields); other models take
            none.

    Raises:
        ModelError: unknown name and no such file (the message lists the valid names).
        ConfigError: options the model does not take, or invalid values.
    """
    key = name_or_path or DEFAULT_MODEL
    if options:
        if key not in _CONFIGURABLE:
            raise ConfigError(
                f"model {key!r} takes no model options (got {', '.join(options)}); only "
                f"{', '.join(_CONFIGURABLE)} does"
            )
        seg = _CONFIGURABLE[key](options)
    elif key in _REGISTRY:
        seg = _REGISTRY[key][0]()
    elif os.path.exists(key):
        try:
            from agriseg.models.bundle import load_bundle_segmenter
        except ImportError as exc:
            raise ModelError(f"{key}: model bundles are not supported in this build") from exc
        return load_bundle_segmenter(key, engine)
    else:
        raise ModelError(
            f"unknown model {key!r}: not a registered name and no such file; valid names: "
            f"{', '.join(available_models())} (or give the path of a model bundle)"
        )
    if engine != "auto" and hasattr(seg, "engine"):
        seg.engine = engine
    elif engine != "auto":
        log.warning("--engine %s: model %r runs no neural network, so no engine; the engine "
                    "applies to learned models (unet-default, bundles)", engine, key)
    return seg
