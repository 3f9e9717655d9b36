"""One error hierarchy for agriseg.

Every error a user can cause derives from :class:`AgrisegError` and also from the builtin it
resembles, so callers can catch either (the rasterio convention). Messages say which file is
wrong, what is wrong with it and what to do about it; the CLI prints them on one line and exits
with status 2.
"""

from __future__ import annotations


class AgrisegError(Exception):
    """Base class of every error agriseg raises on purpose."""

    exit_code: int = 2


class InputError(AgrisegError, ValueError):
    """An input file (raster, vector, config) is unusable as given."""


class RasterError(InputError):
    """The input raster cannot be read or is not georeferenced the way we need."""


class BandError(InputError):
    """Band roles are missing, unknown or do not match what the model needs."""


class VectorError(InputError):
    """A vector file (fields, labels) is unusable."""


class ConfigError(AgrisegError, ValueError):
    """A run, training or model configuration is invalid."""


class ModelError(AgrisegError, ValueError):
    """A model bundle is missing, unsafe, corrupt or does not fit the input."""


class OutputError(AgrisegError, OSError):
    """Outputs cannot be written (exists without --overwrite, read-only, disk full)."""


class ResumeError(AgrisegError, RuntimeError):
    """A checkpoint does not belong to the run that tries to resume it."""


class ClusterError(AgrisegError, RuntimeError):
    """The Dask cluster cannot be reached or its workers cannot see the input."""


class GridMismatchError(InputError):
    """Two rasters that must share one grid (prediction and truth) do not."""
