"""agriseg: aerial agriculture field analysis.

Tiled crop / weed / disease / soil segmentation of georeferenced orthomosaics on Dask,
stitched into QGIS-ready outputs.
"""

import os

# GDAL's block cache defaults to 5 % of RAM in every process (client and each Dask worker);
# filled by a long survey it made memory grow with the raster. Every read and write here is
# block by block, so the cache only needs a few block rows: at 256 MB it held the output
# rasters' unflushed blocks (all of them up to 67 MP) and grew the post-processing workers,
# 0.24 GB more peak memory at 67 MP than 64 MB, for no measured speed (see
# benchmarks/RESULTS.md). Set GDAL_CACHEMAX yourself to override.
os.environ.setdefault("GDAL_CACHEMAX", "64")

from agriseg.classes import DEFAULT_CLASSES, ClassSchema
from agriseg.errors import AgrisegError

__version__ = "0.1.0"

__all__ = ["DEFAULT_CLASSES", "AgrisegError", "ClassSchema", "__version__"]
