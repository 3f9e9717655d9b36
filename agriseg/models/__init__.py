"""Segmentation models behind one interface: rule-based and learned."""

from agriseg.models.base import Prepared, Segmenter, TileContext
from agriseg.models.registry import available_models, load_segmenter

__all__ = ["Prepared", "Segmenter", "TileContext", "available_models", "load_segmenter"]
