"""agriseg: aerial agriculture field analysis.

Tiled crop / weed / disease / soil segmentation of georeferenced orthomosaics on Dask,
stitched into QGIS-ready outputs.
"""

import os

# GDAL's block cache defaults to 5 % of RAM in every process (client and each Dask worker);
# filled by a long survey it made memory grow with the raster. 256 MB is plenty for
# block-by-block reads and writes; set GDAL_CACHEMAX yourself to override.
os.environ.setdefault("GDAL_CACHEMAX", "256")

from agriseg.classes import DEFAULT_CLASSES, ClassSchema
from agriseg.errors import AgrisegError

__version__ = "0.1.0"

__all__ = ["DEFAULT_CLASSES", "AgrisegError", "ClassSchema", "__version__"]
