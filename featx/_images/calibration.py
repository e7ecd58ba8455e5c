"""The fixed calibration images of ``precision="int8"``: crops of scikit-learn's two sample photographs.

Static int8 quantisation measures the range of every activation on a few
images. featx always uses the same ones (:data:`CROPS` crops of
``sklearn.datasets.load_sample_images()``, a Chinese temple and a flower,
taken at fixed positions and scales, then resized and center-cropped as the
model's own preprocessing does), never the user's data: the quantised
network, and so every int8 feature and its cache entries, depends on the
weights alone. The crops' digest (:func:`calibration_digest`) is in the
cache key and in the compiled package's name.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

import numpy as np
import torch

from .preprocess import resize_crop

__all__ = ["CROPS", "calibration_images", "calibration_digest"]

#: Calibration crops (half from each photograph).
CROPS = 32


@lru_cache(maxsize=8)
def _crops(resize_size: int, input_size: tuple[int, int], interpolation: str) -> torch.Tensor:
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images  # two 427 x 640 RGB uint8 photographs, bundled with scikit-learn
    rng = np.random.default_rng(0)
    cfg = {"resize_size": resize_size, "input_size": input_size, "interpolation": interpolation}
    out = []
    for k in range(CROPS):
        img = torch.from_numpy(np.array(photos[k % 2])).permute(2, 0, 1)
        h, w = img.shape[-2:]
        side = int(min(h, w) * rng.uniform(0.3, 1.0))  # from a detail to the whole scene
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        out.append(resize_crop(img[:, top:top + side, left:left + side], cfg))
    return torch.stack(out)


def calibration_images(cfg: dict) -> torch.Tensor:
    """``(CROPS, 3, H, W)`` uint8 crops for the preprocessing ``cfg`` (``resize_size``, ``input_size``, ``interpolation``)."""
    return _crops(int(cfg["resize_size"]), tuple(int(s) for s in cfg["input_size"]), str(cfg["interpolation"]))


def calibration_digest(cfg: dict) -> str:
    """Digest of the calibration pixels for ``cfg`` (names the quantised network with the weights)."""
    return hashlib.blake2b(calibration_images(cfg).numpy().tobytes(), digest_size=8).hexdigest()
