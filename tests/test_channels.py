"""Images with more bands than RGB(A): never misread in silence (issue: multispectral TIFFs, RGB + NIR arrays)."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest

from featx import ChannelsWarning, ImageLoadError, PretrainedFeatureExtractor
from featx._images.preprocess import load_item

tifffile = pytest.importorskip("tifffile")

KW = dict(model="resnet18", weights=None, preprocess={"input_size": 32, "resize_size": 36}, device="cpu",
          progress=False, precision="fp32")


def _tiff(arr: np.ndarray, **kw) -> bytes:
    out = io.BytesIO()
    tifffile.imwrite(out, arr, **kw)
    return out.getvalue()


def _bands(n, h=20, w=30, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, n), dtype=np.uint8)


def _caught(item):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = load_item(item)
    return out, [w for w in caught if issubclass(w.category, ChannelsWarning)]


def test_a_four_channel_array_warns_that_it_is_read_as_rgba():
    arr = _bands(4)
    out, warned = _caught(arr)
    assert tuple(out.shape) == (3, 20, 30) and len(warned) == 1
    assert "read as RGBA" in str(warned[0].message) and "arr[..., :3]" in str(warned[0].message)
    assert _caught(arr[..., :3])[1] == []  # RGB: nothing to say


def test_an_array_with_more_bands_names_them():
    ext = PretrainedFeatureExtractor(**KW).fit()
    with pytest.raises(ImageLoadError, match=r"image array with 12 channels .*pass in_chans=12 to use every band"):
        ext.transform([_bands(12)])


@pytest.mark.parametrize("n, kw", [(4, {"photometric": "rgb", "extrasamples": [0]}),  # RGB + an unspecified band
                                   (5, {"photometric": "rgb"})])
def test_a_tiff_whose_extra_bands_pillow_drops_warns(n, kw):
    out, warned = _caught(_tiff(_bands(n), **kw))
    assert tuple(out.shape) == (3, 20, 30) and len(warned) == 1
    assert f"a TIFF with {n} samples per pixel is read as one RGB image of 30 x 20" in str(warned[0].message)


def test_a_band_stack_read_as_its_first_page_warns():
    out, warned = _caught(_tiff(_bands(12)))  # tifffile writes 20 pages of 30 x 12: Pillow reads page 1
    assert len(warned) == 1 and "a TIFF with 20 pages of 12 x 30" in str(warned[0].message)


def test_rgba_and_rgb_tiffs_do_not_warn():
    assert _caught(_tiff(_bands(4), photometric="rgb", extrasamples=[2]))[1] == []  # unassociated alpha
    assert _caught(_tiff(_bands(3), photometric="rgb"))[1] == []


def test_a_tiff_pillow_cannot_decode_names_its_band_count():
    data = _tiff(_bands(12), photometric="minisblack", planarconfig="contig")
    ext = PretrainedFeatureExtractor(**KW).fit()
    with pytest.raises(ImageLoadError, match=r"a TIFF with 12 samples per pixel that Pillow cannot decode"):
        ext.transform([data])
