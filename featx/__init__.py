"""featx: pretrained CNN and vision-transformer features for scikit-learn.

>>> from featx import PretrainedFeatureExtractor, load_image_folder

Public names are imported on first use (PEP 562), so ``import featx`` and
``featx --help`` stay fast; torch, torchvision and timm load when an
extractor, a backbone or a layer listing is first needed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ._exceptions import BackendWarning, CacheWarning, ChannelsWarning, DeviceWarning, FeatxWarning, ImageLoadError, ImageLoadWarning, ModelLoadError, OutputError, ParameterError

from ._legacy import install as _install_legacy_paths
from ._sharing import trusted_types
from ._version import __version__

_install_legacy_paths()  # extractors pickled by featx 0.2 name its old module paths

_LAZY = {
    "PretrainedFeatureExtractor": "._extractor",
    "FineTunedClassifier": "._finetune",
    "list_layers": "._inspect",
    "LayerInfo": "._models.layers",
    "load_image_folder": ".datasets",
    "make_demo_folder": ".datasets",
}

__all__ = [
    "PretrainedFeatureExtractor",
    "FineTunedClassifier",
    "list_layers",
    "LayerInfo",
    "load_image_folder",
    "make_demo_folder",
    "trusted_types",
    "ImageLoadError",
    "ImageLoadWarning",
    "ChannelsWarning",
    "ModelLoadError",
    "ParameterError",
    "OutputError",
    "FeatxWarning",
    "DeviceWarning",
    "CacheWarning",
    "BackendWarning",
    "__version__",
]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'featx' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # pragma: no cover
    from ._extractor import PretrainedFeatureExtractor
    from ._finetune import FineTunedClassifier
    from ._inspect import list_layers
    from ._models.layers import LayerInfo
    from .datasets import load_image_folder, make_demo_folder
