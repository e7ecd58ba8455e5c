"""Inputs: every accepted kind gives the same features; the image-mode rule; clear errors."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from featx import ImageLoadError, PretrainedFeatureExtractor
from featx._images.preprocess import load_item, resize_crop

from .conftest import SMALL, make_image


@pytest.fixture
def ext(tiny_cnn):
    return PretrainedFeatureExtractor(tiny_cnn, layers=["stem", "stage2"], preprocess=SMALL, progress=False, num_workers=0).fit()


@pytest.fixture
def arrays():
    rng = np.random.default_rng(1)
    return [make_image(rng, i, (40 + 3 * i, 50)) for i in range(3)]


def test_all_input_kinds_agree(ext, arrays, tmp_path):
    paths = []
    for i, a in enumerate(arrays):
        p = tmp_path / f"{i}.png"
        Image.fromarray(a).save(p)
        paths.append(p)
    ref = ext.transform(arrays)
    variants = {
        "str paths": [str(p) for p in paths],
        "PathLike": paths,
        "Series": pd.Series([str(p) for p in paths]),
        "DataFrame column": pd.DataFrame({"path": [str(p) for p in paths]}),
        "object array (n, 1)": np.array([[str(p)] for p in paths], dtype=object),
        "bytes": [p.read_bytes() for p in paths],
        "PIL": [Image.fromarray(a) for a in arrays],
        "torch CHW": [torch.from_numpy(a).permute(2, 0, 1) for a in arrays],
        "float64 arrays": [a.astype(np.float64) / 255 for a in arrays],
        "float32 arrays": [a.astype(np.float32) / 255 for a in arrays],
        "uint16 arrays": [a.astype(np.uint16) * 257 for a in arrays],
        "float torch CHW": [torch.from_numpy(a).permute(2, 0, 1).float() / 255 for a in arrays],
        "tuple": tuple(arrays),
    }
    for name, X in variants.items():
        np.testing.assert_array_equal(ext.transform(X), ref, err_msg=name)


def test_sixteen_bit_and_float_grayscale_files_match_8_bit(ext, arrays, tmp_path):
    gray8 = [a[..., 0] for a in arrays]
    ref = ext.transform(gray8)
    p16 = []
    for i, g in enumerate(gray8):
        p16.append(tmp_path / f"{i}.png")
        Image.fromarray(g.astype(np.uint16) * 257).save(p16[-1])
    assert Image.open(p16[0]).mode.startswith("I;16")
    np.testing.assert_array_equal(ext.transform(p16), ref)
    np.testing.assert_array_equal(ext.transform([Image.fromarray(g.astype(np.float32) / 255, mode="F") for g in gray8]), ref)


@pytest.mark.parametrize("photo", ["coffee", "chelsea", "astronaut"])
def test_same_photo_any_dtype_same_features_as_timm_pipeline(photo):
    """Real weights, real photographs: every pixel dtype agrees with the uint8 path within 1e-3,
    and the uint8 path agrees with timm's own PIL-based preprocessing within 5e-3 (torchvision's
    uint8 resampler and Pillow's differ by a grey level here and there: 0.4% on coffee; the float
    path before the 8-bit rule differed by 1.4-3%)."""
    skdata = pytest.importorskip("skimage.data")
    import timm.data

    img = getattr(skdata, photo)()
    ext = _real_ext()
    ref = ext.transform([img])[0]
    rel = lambda a: float(np.linalg.norm(a - ref) / np.linalg.norm(ref))  # noqa: E731
    for name, x in {
        "float32": img.astype(np.float32) / 255,
        "float64": img.astype(np.float64) / 255,
        "uint16": img.astype(np.uint16) * 257,
        "tensor uint8": torch.from_numpy(img).permute(2, 0, 1),
        "tensor float": torch.from_numpy(img).permute(2, 0, 1).float() / 255,
    }.items():
        assert rel(ext.transform([x])[0]) < 1e-3, name
    # independent computation: timm's transforms on a PIL image, then the model's own head input
    module = ext.backbone_
    tf = timm.data.create_transform(**timm.data.resolve_data_config({}, model=_real_template_module()))
    x = tf(Image.fromarray(img))[None].contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        want = module.forward_head(module.forward_features(x), pre_logits=True)[0].numpy()
    assert float(np.linalg.norm(want - ref) / np.linalg.norm(want)) < 5e-3


def _real_ext():
    global _REAL
    if _REAL is None:
        _REAL = PretrainedFeatureExtractor(precision="fp32", progress=False).fit()
    return _REAL


def _real_template_module():
    from featx._models.backbones import build_backbone

    return build_backbone("efficientnet_lite0", "DEFAULT").module


_REAL = None


def test_batches_numpy_and_torch(ext):
    rng = np.random.default_rng(2)
    batch = np.stack([make_image(rng, i, (40, 40)) for i in range(4)])
    ref = ext.transform(list(batch))
    np.testing.assert_array_equal(ext.transform(batch), ref)
    np.testing.assert_array_equal(ext.transform(torch.from_numpy(batch).permute(0, 3, 1, 2)), ref)
    gray = batch[..., 0]
    np.testing.assert_array_equal(ext.transform(gray), ext.transform(list(np.repeat(gray[..., None], 3, -1))))


def test_resize_shorter_side_then_center_crop():
    img = torch.arange(3 * 40 * 80, dtype=torch.float32).reshape(3, 40, 80) / (3 * 40 * 80)
    out = resize_crop(img, {"resize_size": 20, "input_size": (16, 16), "interpolation": "bilinear"})
    assert out.shape == (3, 16, 16)
    tall = resize_crop(torch.zeros(3, 10000, 3, dtype=torch.uint8), {"resize_size": 36, "input_size": (32, 32), "interpolation": "bilinear"})
    assert tall.shape == (3, 32, 32)


# ------------------------------------------------------------ the mode rule


def _decoded(img: Image.Image, fmt="PNG", **save) -> torch.Tensor:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return load_item(buf.getvalue())


def test_grayscale_replicated():
    g = np.arange(64, dtype=np.uint8).reshape(8, 8) * 3
    t = _decoded(Image.fromarray(g, "L"))
    assert t.dtype == torch.uint8 and t.shape == (3, 8, 8)
    for c in range(3):
        np.testing.assert_array_equal(t[c].numpy(), g)


def test_alpha_composited_on_white():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:2, :, 3] = 0  # transparent
    rgba[2:, :, 3] = 255  # opaque red
    t = _decoded(Image.fromarray(rgba, "RGBA")).numpy()
    assert (t[:, :2] == 255).all()
    assert (t[0, 2:] == 200).all() and (t[1, 2:] == 0).all() and (t[2, 2:] == 0).all()
    la = Image.fromarray(np.stack([np.full((4, 4), 10, np.uint8), np.full((4, 4), 0, np.uint8)], -1), "LA")
    assert (_decoded(la).numpy() == 255).all()
    # the same rule for a 4-channel array
    arr_t = load_item(rgba).numpy()
    np.testing.assert_array_equal(arr_t, t)


def test_palette_with_and_without_transparency():
    p = Image.new("P", (4, 4))
    p.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    p.putdata([1] * 16)
    np.testing.assert_array_equal(_decoded(p).numpy()[:, 0, 0], [10, 20, 30])
    p.info["transparency"] = 1
    assert (_decoded(p, transparency=1).numpy() == 255).all()


def test_sixteen_bit_scaled_not_clipped():
    v8 = np.array([[0, 1, 128, 255]], dtype=np.uint16)
    img = Image.fromarray((v8 * 257).astype(np.uint16))
    assert img.mode.startswith("I;16")
    t = _decoded(img)
    assert t.dtype == torch.uint8
    np.testing.assert_array_equal(t[0].numpy(), v8)
    np.testing.assert_array_equal(load_item((v8 * 257).astype(np.uint16))[1].numpy(), v8)
    # levels between 8-bit ones round to the nearest
    np.testing.assert_array_equal(load_item(np.array([[127, 128, 65406, 65535]], np.uint16))[0].numpy(), [[0, 0, 254, 255]])


def test_cmyk_jpeg_becomes_rgb():
    rgb = Image.fromarray(np.full((16, 16, 3), (200, 40, 40), np.uint8))
    t = _decoded(rgb.convert("CMYK"), "JPEG", quality=95)
    assert t.shape == (3, 16, 16)
    np.testing.assert_allclose(t.float().mean((1, 2)).numpy(), [200, 40, 40], atol=6)


def test_animated_gif_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 0, 255)]]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    t = load_item(buf.getvalue())
    assert t[0].float().mean() > 200 and t[2].float().mean() < 50


_ORIENT = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_applied(orientation):
    a = np.arange(3 * 4 * 3, dtype=np.uint8).reshape(3, 4, 3) * 2
    img = Image.fromarray(a)
    exif = Image.Exif()
    exif[0x0112] = orientation
    t = _decoded(img, exif=exif.tobytes())
    np.testing.assert_array_equal(t.permute(1, 2, 0).numpy(), _ORIENT[orientation](a))


# ------------------------------------------------------------------ errors


def test_bad_path_names_index_and_path(ext, arrays, tmp_path):
    good = tmp_path / "ok.png"
    Image.fromarray(arrays[0]).save(good)
    missing = tmp_path / "missing.jpg"
    with pytest.raises(ImageLoadError) as info:
        ext.transform([str(good), str(missing)])
    err = info.value
    assert isinstance(err, ValueError)
    assert err.index == 1 and err.path == str(missing)
    assert "item 1" in str(err) and str(missing) in str(err) and "not found" in str(err)


@pytest.mark.parametrize(
    "make,reason",
    [
        (lambda d: d, "directory"),
        (lambda d: (d / "page.jpg").write_text("<html>not an image</html>") and d / "page.jpg", "not a recognised image"),
        (lambda d: (d / "empty.jpg").write_bytes(b"") or d / "empty.jpg", "empty file"),
    ],
)
def test_unreadable_files(ext, tmp_path, make, reason):
    with pytest.raises(ImageLoadError, match=reason):
        ext.transform([make(tmp_path)])


def test_truncated_jpeg_rejected(ext, arrays, tmp_path):
    buf = io.BytesIO()
    Image.fromarray(arrays[0]).save(buf, format="JPEG")
    p = tmp_path / "cut.jpg"
    p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageLoadError, match="truncated"):
        ext.transform([p])


def test_error_inside_worker_process_surfaces_in_main(tiny_cnn, image_paths, tmp_path):
    ext = PretrainedFeatureExtractor(tiny_cnn, preprocess=SMALL, batch_size=2, num_workers=2, progress=False).fit()
    paths = list(image_paths[0][:9]) + [str(tmp_path / "gone.jpg")]
    with pytest.raises(ImageLoadError) as info:
        ext.transform(paths)
    assert info.value.index == 9 and "gone.jpg" in str(info.value)


@pytest.mark.parametrize(
    "item,match",
    [
        (None, "item is None"),
        (np.zeros((3, 8, 8), np.uint8), "channels-first"),
        (np.zeros((8, 8, 2), np.uint8), "with 2 channels .* in_chans=3 reads 1, 3 or 4 .*pass in_chans=2"),
        (np.full((8, 8, 3), 2.0), r"must lie in \[0, 1\]"),
        (np.full((8, 8, 3), np.nan), "NaN"),
        (np.zeros((8, 8, 3), np.int32), "unsupported pixel dtype int32"),
        (np.zeros((2, 8, 8, 3), np.uint8), "H x W or H x W x C"),
        (torch.zeros(5, 8, 8), "C x H x W"),
        (3.5, "unsupported item type float"),
    ],
)
def test_bad_items_named(ext, arrays, item, match):
    with pytest.raises(ImageLoadError, match=match) as info:
        ext.transform([arrays[0], item])
    assert info.value.index == 1


@pytest.mark.parametrize(
    "X,match",
    [
        (np.zeros((5, 10)), "looks like a feature matrix"),
        ([], "empty"),
        ("photo.jpg", "single str"),
        (pd.DataFrame({"a": ["x"], "b": ["y"]}), "one column"),
        (np.zeros(4), "1-D numeric array"),
        (torch.zeros(4, 5), "torch tensor X"),
        (12, "sequence of images"),
    ],
)
def test_bad_X(ext, X, match):
    with pytest.raises(ValueError, match=match):
        ext.transform(X)



@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_fast_jpeg_path_matches_pillow(orientation, mode):
    from featx._images.preprocess import _fast_jpeg, _open_image

    rng = np.random.default_rng(orientation)
    img = Image.fromarray(make_image(rng, 1, (37, 53))).convert(mode)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90, exif=exif.tobytes())
    fast = _fast_jpeg(buf.getvalue(), None)
    assert fast is not None, "a plain JPEG should take the fast path"
    np.testing.assert_array_equal(fast.permute(1, 2, 0).numpy(), _open_image(io.BytesIO(buf.getvalue()), None))
    cmyk = io.BytesIO()
    img.convert("CMYK").save(cmyk, format="JPEG")
    assert _fast_jpeg(cmyk.getvalue(), None) is None  # CMYK goes through Pillow's conversion


# ------------------------------------------------------------------ phone formats


def _phone_photo(tmp_path, fmt, orientation=1):
    yy, xx = np.mgrid[0:48, 0:64]
    arr = np.stack([xx * 4, yy * 5, 255 - xx * 2 - yy * 2], axis=2).clip(0, 255).astype(np.uint8)  # smooth, like a photo
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = orientation
    path = tmp_path / f"photo_{orientation}.{fmt}"
    if fmt == "heic":
        pillow_heif = pytest.importorskip("pillow_heif")
        pillow_heif.register_heif_opener()
    img.save(path, exif=exif.tobytes(), quality=95)
    return path, arr


@pytest.mark.parametrize("fmt", ["avif", "heic"])
def test_phone_formats_decode_like_pillow_with_orientation_and_cache(fmt, ext, tmp_path):
    from PIL import features

    if fmt == "avif" and not features.check("avif"):
        pytest.skip("this Pillow has no AVIF support (Pillow >= 11.2 reads it natively)")
    path, arr = _phone_photo(tmp_path, fmt)
    t = load_item(str(path))
    assert t.dtype == torch.uint8 and tuple(t.shape) == (3, 48, 64)
    assert np.abs(t.permute(1, 2, 0).numpy().astype(int) - arr).mean() < 4  # lossy, but the same picture
    with Image.open(path) as img:  # an independent decode of the same file
        np.testing.assert_array_equal(ext.transform([str(path)]), ext.transform([np.asarray(img.convert("RGB"))]))
    rotated, _ = _phone_photo(tmp_path, fmt, orientation=6)
    assert tuple(load_item(str(rotated)).shape) == (3, 64, 48)  # EXIF orientation applied

    cached = PretrainedFeatureExtractor(ext.model, layers=["stem"], preprocess=SMALL, cache=str(tmp_path / "c"),
                                        progress=False).fit()
    first = cached.transform([str(path), str(rotated)])
    np.testing.assert_array_equal(cached.transform([str(path), str(rotated)]), first)
    assert cached.last_run_.cache_hits == 2  # keyed by the file's bytes, as for JPEG


def test_heic_without_the_plugin_names_the_extra(tmp_path, monkeypatch, ext):
    import sys

    import featx._images.preprocess as pre

    path, _ = _phone_photo(tmp_path, "heic")
    monkeypatch.setattr(pre, "_HEIF_READY", [])
    monkeypatch.setitem(sys.modules, "pillow_heif", None)  # not installed
    with pytest.raises(ImageLoadError, match=r"HEIC/HEIF.*pip install 'featx\[heif\]'"):
        ext.transform([str(path)])


def test_huge_avif_refused_before_decoding(tmp_path, monkeypatch):
    from PIL import features

    if not features.check("avif"):
        pytest.skip("no AVIF support in this Pillow")
    path, _ = _phone_photo(tmp_path, "avif")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(Exception, match="decompression bomb"):
        load_item(str(path))
