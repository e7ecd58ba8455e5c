"""``in_chans``: multispectral and grayscale input with pretrained weights (the stem adapted as timm does)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from featx import ParameterError, PretrainedFeatureExtractor
from featx._models.backbones import build_backbone, get_template

from .conftest import SMALL, TinyCNN

tifffile = pytest.importorskip("tifffile")


def _photo_patches(n: int, size: int = 72) -> list[np.ndarray]:
    """Crops of scikit-learn's two bundled photographs (real images, no download)."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        photo = photos[i % len(photos)]
        top, left = rng.integers(0, photo.shape[0] - size), rng.integers(0, photo.shape[1] - size)
        out.append(np.ascontiguousarray(photo[top:top + size, left:left + size]))
    return out


def _twelve_bands(rgb: np.ndarray) -> np.ndarray:
    """RGB plus nine derived bands (gray, differences, inverted, blurred), ``H x W x 12`` uint8."""
    f = rgb.astype(np.float32)
    gray = f.mean(2)
    blur = np.asarray(Image.fromarray(rgb).resize((rgb.shape[1] // 4, rgb.shape[0] // 4)).resize(
        (rgb.shape[1], rgb.shape[0]), Image.BILINEAR), dtype=np.float32)
    extra = [gray, (f[..., 0] - f[..., 1]) / 2 + 128, (f[..., 1] - f[..., 2]) / 2 + 128, 255 - gray,
             blur[..., 0], blur[..., 1], blur[..., 2], np.abs(f[..., 0] - blur[..., 0]), f.max(2)]
    return np.clip(np.dstack([f, *[e[..., None] for e in extra]]), 0, 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def tiff_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("bands")
    arrays = [_twelve_bands(p) for p in _photo_patches(6)]
    paths = []
    for i, arr in enumerate(arrays):
        path = root / f"scene{i}.tif"
        # half interleaved (samples per pixel), half planar (bands x H x W): both are read as H x W x 12
        tifffile.imwrite(path, arr if i % 2 else np.moveaxis(arr, 2, 0), photometric="minisblack",
                         planarconfig="contig" if i % 2 else "separate")
        paths.append(str(path))
    return paths, arrays


def test_twelve_band_tiffs_embed_with_the_pretrained_backbone(tiff_set):
    paths, arrays = tiff_set
    ext = PretrainedFeatureExtractor(in_chans=12, precision="fp32", backend="torch").fit()
    X = ext.transform(paths)
    assert X.shape == (6, ext.n_features_out_) and np.isfinite(X).all()
    np.testing.assert_array_equal(X, ext.transform(arrays))  # the files hold exactly these bands
    assert len(ext.preprocess_["mean"]) == len(ext.preprocess_["std"]) == 12
    # the bands matter: features differ from those of the RGB bands alone, read by the RGB network
    rgb = PretrainedFeatureExtractor(precision="fp32", backend="torch").fit().transform([a[..., :3] for a in arrays])
    assert not np.allclose(X, rgb, atol=1e-3)


def test_adapted_stem_is_timms_adapt_input_conv_of_the_pretrained_weights():
    from timm.models import adapt_input_conv

    rgb = get_template("efficientnet_lite0").module.conv_stem.weight
    for n in (1, 4, 12):
        adapted = build_backbone("efficientnet_lite0", "DEFAULT", in_chans=n).module.conv_stem
        assert adapted.in_channels == n
        torch.testing.assert_close(adapted.weight, adapt_input_conv(n, rgb.clone()), rtol=0, atol=0)
    assert get_template("efficientnet_lite0", "DEFAULT", 3) is get_template("efficientnet_lite0")  # unchanged


def test_one_channel_equals_the_rgb_network_on_gray_replicated():
    """efficientnet_lite0 normalises every channel alike (mean = std = 0.5): timm's summed filters make a
    1-channel input exactly the RGB network on the gray image copied to three channels."""
    gray = [np.asarray(Image.fromarray(p).convert("L")) for p in _photo_patches(4)]
    one = PretrainedFeatureExtractor(in_chans=1, precision="fp32", backend="torch").fit()
    three = PretrainedFeatureExtractor(precision="fp32", backend="torch").fit()
    want = three.transform([np.repeat(g[..., None], 3, 2) for g in gray])
    np.testing.assert_allclose(one.transform(gray), want, rtol=0, atol=1e-5)
    assert one.preprocess_["mean"] == (0.5,) and one.preprocess_["std"] == (0.5,)
    # colour photographs become grayscale by Pillow's rule for a 1-channel backbone
    photos = _photo_patches(4)
    np.testing.assert_array_equal(one.transform(photos), one.transform(gray))


def test_channel_statistics_follow_the_repeated_filters():
    ext = PretrainedFeatureExtractor("resnet18", weights=None, in_chans=5, preprocess=SMALL).fit()
    m, s = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    assert ext.preprocess_["mean"] == tuple(m[i % 3] for i in range(5))
    assert ext.preprocess_["std"] == tuple(s[i % 3] for i in range(5))
    ones = PretrainedFeatureExtractor("resnet18", weights=None, in_chans=1, preprocess=SMALL).fit()
    assert ones.preprocess_["mean"] == pytest.approx((sum(m) / 3,))
    own = PretrainedFeatureExtractor("resnet18", weights=None, in_chans=2, preprocess={**SMALL, "mean": [0.1, 0.2],
                                                                                      "std": [0.3, 0.4]}).fit()
    assert own.preprocess_["mean"] == (0.1, 0.2) and own.preprocess_["std"] == (0.3, 0.4)
    with pytest.raises(ValueError, match=r"must be a sequence of 2 floats \(one per input channel"):
        PretrainedFeatureExtractor("resnet18", weights=None, in_chans=2, preprocess={"mean": [0.1, 0.2, 0.3]}).fit()


def _by_hand(model: torch.nn.Module, arrays: list[np.ndarray], size: int, mean, std) -> np.ndarray:
    """An independent computation: resize/crop by torchvision, normalise, run, global-average the output map."""
    from torchvision.transforms.v2 import functional as TF

    xs = []
    for a in arrays:
        t = torch.from_numpy(a).permute(2, 0, 1)
        t = TF.center_crop(TF.resize(t, [SMALL["resize_size"]], antialias=True), [size, size])
        xs.append((t.float() / 255 - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1))
    with torch.inference_mode():
        return model.eval()(torch.stack(xs)).numpy()


@pytest.mark.parametrize("family", ["torchvision:resnet18", "timm:resnet18", "module", "hf_dinov2", "open_clip"])
def test_every_backbone_family_takes_other_channel_counts(family):
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (40, 44, 4), dtype=np.uint8) for _ in range(3)]
    kw = dict(weights=None, preprocess=SMALL, precision="fp32", backend="torch")
    if family == "module":
        torch.manual_seed(0)
        model = TinyCNN()
    elif family == "hf_dinov2":
        transformers = pytest.importorskip("transformers")
        torch.manual_seed(0)
        model = transformers.Dinov2Model(transformers.Dinov2Config(
            image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64)).eval()
        kw = dict(kw, weights="DEFAULT", preprocess={"input_size": 32, "resize_size": 36})
    elif family == "open_clip":
        pytest.importorskip("open_clip")
        model = "open_clip:ViT-S-32"
        kw = dict(kw, preprocess=None)
    else:
        model = family
    ext = PretrainedFeatureExtractor(model, in_chans=4, **kw).fit()
    X = ext.transform(arrays)
    assert X.shape[0] == 3 and np.isfinite(X).all()
    if family == "module":  # against the adapted network, computed by hand
        from timm.models import adapt_input_conv

        hand = TinyCNN()
        hand.load_state_dict(model.state_dict())
        hand.stem[0].weight = torch.nn.Parameter(adapt_input_conv(4, hand.stem[0].weight.detach().clone()))
        hand.stem[0].in_channels = 4
        out = PretrainedFeatureExtractor(model, in_chans=4, layers="output", **kw).fit()
        want = _by_hand(hand, arrays, SMALL["input_size"], out.preprocess_["mean"], out.preprocess_["std"])
        np.testing.assert_allclose(out.transform(arrays), want, rtol=1e-4, atol=1e-5)


def test_refusals_name_the_parameter(tiff_set, tmp_path):
    import torchvision

    paths, arrays = tiff_set
    ckpt = tmp_path / "googlenet.pth"  # pretrained GoogLeNet weights re-normalise RGB (transform_input=True)
    torch.save(torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False).state_dict(), ckpt)
    with pytest.raises(ParameterError, match=r"in_chans=12 cannot be used with torchvision:googlenet.*"
                                             r"transform_input=True") as info:
        PretrainedFeatureExtractor("googlenet", weights=str(ckpt), in_chans=12).fit()
    assert info.value.param == "in_chans"
    with pytest.raises(ParameterError, match=r"precision='int8' is calibrated on RGB photographs"):
        PretrainedFeatureExtractor(in_chans=12, precision="int8", device="cpu").fit()
    for bad in (0, -3, 2.5, True, "12"):
        with pytest.raises(ParameterError, match=r"in_chans=.* is invalid"):
            PretrainedFeatureExtractor(in_chans=bad).fit()
    ext = PretrainedFeatureExtractor("resnet18", weights=None, in_chans=12, preprocess=SMALL).fit()
    with pytest.raises(ValueError, match=r"an image with 4 channels \(shape \(72, 72, 4\)\), but in_chans=12: pass "
                                         r"images with 12 bands, or set in_chans=4"):
        ext.transform([arrays[0][..., :4]])
    with pytest.raises(ValueError, match=r"an image with 3 channels .* but in_chans=12"):
        ext.transform([_photo_patches(1)[0]])  # an RGB photograph for a 12-band network


def test_with_rgb_a_twelve_band_tiff_is_refused_naming_in_chans(tiff_set, tmp_path):
    paths, _ = tiff_set
    ext = PretrainedFeatureExtractor("resnet18", weights=None, preprocess=SMALL).fit()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=r"12 samples per pixel.*in_chans=<number of bands>"):
            ext.transform(paths[1:2])  # interleaved 12 samples: Pillow cannot decode it


def test_channel_count_is_in_the_cache_key(tmp_path):
    rng = np.random.default_rng(1)
    arrays = [rng.integers(0, 256, (40, 40, 4), dtype=np.uint8) for _ in range(2)]
    kw = dict(weights=None, preprocess=SMALL, cache=str(tmp_path / "c"), precision="fp32", backend="torch")
    four = PretrainedFeatureExtractor("resnet18", in_chans=4, **kw).fit()
    a = four.transform(arrays)
    assert four.last_run_.computed == 2
    rgba = PretrainedFeatureExtractor("resnet18", **kw).fit()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # read as RGBA: the ChannelsWarning
        b = rgba.transform(arrays)
    assert rgba.last_run_.cache_hits == 0 and not np.allclose(a, b)
    again = PretrainedFeatureExtractor("resnet18", in_chans=4, **kw).fit()
    np.testing.assert_array_equal(again.transform(arrays), a)
    assert again.last_run_.cache_hits == 2
