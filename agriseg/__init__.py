"""agriseg: aerial agriculture field analysis.

Tiled crop / weed / disease / soil segmentation of georeferenced orthomosaics on Dask,
stitched into QGIS-ready outputs.
"""

from agriseg.classes import DEFAULT_CLASSES, ClassSchema
from agriseg.errors import AgrisegError

__version__ = "0.1.0"

__all__ = ["DEFAULT_CLASSES", "AgrisegError", "ClassSchema", "__version__"]
