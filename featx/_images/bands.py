"""Images for a backbone with ``in_chans`` other than 3: every band of a TIFF, array or tensor, as it is.

An item becomes a ``C x H x W`` uint8 tensor with ``C == in_chans``:

- a TIFF is read with all its bands (tifffile: samples per pixel, or a stack
  of single-band pages), planar or interleaved;
- a numpy array ``H x W x C`` (or ``H x W``) and a torch tensor ``C x H x W``
  are taken as they are;
- with ``in_chans=1``, colour images of any format (JPEG, PNG, RGB arrays, ...)
  become grayscale by Pillow's luminance rule, after featx's usual RGB(A)
  handling;
- an image with another number of channels is an error naming both counts.

Pixel values follow featx's rule: uint8 as it is, uint16 divided by 65535,
floats in [0, 1].
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
from PIL import Image

from .preprocess import (TIFF_MAGIC, _BadItem, _array_to_hwc, _open_image, _to_rgb_pil, item_bytes, max_pixels,
                         to_uint8, unit_pixels)

__all__ = ["load_bands"]


def load_bands(item: Any, draft_size: int | None = None, decode_device: torch.device | None = None, *,
               channels: int) -> torch.Tensor:
    """One item -> a ``channels x H x W`` uint8 tensor (``draft_size`` and ``decode_device`` are not used)."""
    arr = _read(item, channels)
    if arr.ndim == 2:
        arr = arr[..., None]
    c = arr.shape[2]
    if c != channels:
        if channels == 1 and c in (3, 4):
            arr = np.asarray(Image.fromarray(_array_to_hwc(arr)).convert("L"))[..., None]
        else:
            raise _BadItem(f"an image with {c} channel{'s' * (c != 1)} (shape {arr.shape}), but in_chans={channels}: "
                           f"pass images with {channels} bands, or set in_chans={c}")
    arr = np.ascontiguousarray(_as_uint8(arr))
    if not arr.flags.writeable:  # torch cannot wrap read-only memory safely
        arr = arr.copy()
    return torch.from_numpy(arr).permute(2, 0, 1)


def _read(item: Any, channels: int) -> np.ndarray:
    """The item's pixels as an ``H x W`` or ``H x W x C`` array, every band kept."""
    data = item_bytes(item)
    if data is not None:
        if data[:4] in TIFF_MAGIC:
            return _read_tiff(data, channels)
        return _open_image(io.BytesIO(data), None)  # RGB by featx's rules; grayscale below for in_chans=1
    if isinstance(item, Image.Image):
        return _to_rgb_pil(item)
    if isinstance(item, np.ndarray):
        if item.ndim == 3 and item.shape[2] != channels and item.shape[0] == channels:
            raise _BadItem(f"array of shape {item.shape} looks channels-first; featx expects numpy images as "
                           "H x W x C (transpose with arr.transpose(1, 2, 0))")
        return item
    if isinstance(item, torch.Tensor):
        t = item.detach().cpu()
        if t.dtype in (torch.bfloat16, torch.float16):
            t = t.float()
        return t.permute(1, 2, 0).numpy() if t.ndim == 3 else t.numpy()
    raise _BadItem(f"unsupported item type {type(item).__name__} for in_chans={channels}; use a path, image "
                   "bytes, a numpy array H x W x C or a torch tensor C x H x W")


def _read_tiff(data: bytes, channels: int) -> np.ndarray:
    try:
        import tifffile
    except ImportError:  # pragma: no cover - installed with scikit-image
        raise _BadItem("reading every band of a TIFF needs tifffile: pip install 'featx[tiff]'") from None
    try:
        arr = tifffile.imread(io.BytesIO(data))
    except Exception as exc:  # noqa: BLE001 - tifffile raises many kinds
        raise _BadItem(f"corrupt or unreadable TIFF ({type(exc).__name__}: {exc})") from None
    arr = np.squeeze(arr)
    if arr.ndim == 3 and arr.shape[2] != channels and arr.shape[0] == channels:
        arr = np.moveaxis(arr, 0, 2)  # planar bands, or a stack of single-band pages
    if arr.ndim not in (2, 3):
        raise _BadItem(f"a TIFF of shape {arr.shape}: featx reads H x W x bands (or bands x H x W)")
    if arr.shape[0] * arr.shape[1] > max_pixels():
        raise _BadItem(f"image too large to decode: {arr.shape[1]} x {arr.shape[0]} pixels is over "
                       f"FEATX_MAX_PIXELS={max_pixels()}")
    return arr


def _as_uint8(arr: np.ndarray) -> np.ndarray:
    unit = unit_pixels(arr)
    return arr if unit is None else to_uint8(unit)
