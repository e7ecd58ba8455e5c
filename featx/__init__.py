"""featx: pretrained CNN features for scikit-learn.

>>> from featx import PretrainedFeatureExtractor, load_image_folder
"""

from ._exceptions import CacheWarning, DeviceWarning, FeatxWarning, ImageLoadError, ModelLoadError
from ._extractor import PretrainedFeatureExtractor
from ._inspect import list_layers
from ._layers import LayerInfo
from .datasets import load_image_folder, make_demo_folder

__version__ = "0.1.0"

__all__ = [
    "PretrainedFeatureExtractor",
    "list_layers",
    "LayerInfo",
    "load_image_folder",
    "make_demo_folder",
    "ImageLoadError",
    "ModelLoadError",
    "FeatxWarning",
    "DeviceWarning",
    "CacheWarning",
    "__version__",
]
