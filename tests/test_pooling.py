"""Pooling values against numpy, names, and the flatten guard."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from featx import PretrainedFeatureExtractor
from featx._models.pooling import column_names, pool, pooled_width

from .conftest import SMALL


@pytest.fixture
def fmap():
    return torch.rand(2, 3, 4, 5, generator=torch.Generator().manual_seed(0)) * 2 - 0.5


def test_avg_max_catavgmax(fmap):
    a = fmap.numpy()
    np.testing.assert_allclose(pool(fmap, "avg").numpy(), a.mean((2, 3)), rtol=1e-6)
    np.testing.assert_allclose(pool(fmap, "max").numpy(), a.max((2, 3)), rtol=1e-6)
    np.testing.assert_allclose(pool(fmap, "catavgmax").numpy(), np.concatenate([a.mean((2, 3)), a.max((2, 3))], 1), rtol=1e-6)


@pytest.mark.parametrize("name", ["avgmax", "catavgmax"])
def test_avgmax_names_mean_what_timm_means(fmap, name):
    from timm.layers import SelectAdaptivePool2d

    ref = SelectAdaptivePool2d(pool_type=name, flatten=True)(fmap)  # timm's own pooling: the reference
    np.testing.assert_allclose(pool(fmap, name).numpy(), ref.numpy(), rtol=1e-6, atol=1e-7)
    assert pooled_width((3, 4, 5), name) == ref.shape[1]


def test_avgmax_warns_that_its_meaning_follows_timm(tiny_cnn):
    import warnings

    from featx import FeatxWarning, PretrainedFeatureExtractor

    from .conftest import SMALL

    images = np.random.default_rng(0).integers(0, 256, (2, 40, 40, 3), dtype=np.uint8)
    kw = dict(layers="stage2", preprocess=SMALL, progress=False, device="cpu", precision="fp32")
    with pytest.warns(FeatxWarning, match="catavgmax"):
        mean = PretrainedFeatureExtractor(tiny_cnn, pooling="avgmax", **kw).fit()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FeatxWarning)
        cat = PretrainedFeatureExtractor(tiny_cnn, pooling="catavgmax", **kw).fit()
    a, c = mean.transform(images), cat.transform(images)
    assert a.shape == (2, 16) and c.shape == (2, 32)
    np.testing.assert_allclose(a, 0.5 * (c[:, :16] + c[:, 16:]), rtol=1e-5, atol=1e-6)
    assert list(mean.get_feature_names_out()[:1]) == ["stage2_avgmax_0"]


@pytest.mark.parametrize("p", [1.0, 3.0, 7.5])
def test_gem(fmap, p):
    a = np.clip(fmap.numpy().astype(np.float64), 1e-6, None)
    ref = (a**p).mean((2, 3)) ** (1 / p)
    np.testing.assert_allclose(pool(fmap, "gem", p).numpy(), ref, rtol=1e-5)


def test_flatten_and_tokens(fmap):
    np.testing.assert_array_equal(pool(fmap, "flatten").numpy(), fmap.numpy().reshape(2, -1))
    tokens = torch.rand(2, 7, 6)
    np.testing.assert_allclose(pool(tokens, "avg").numpy(), tokens.numpy().mean(1), rtol=1e-6)
    vec = torch.rand(2, 9)
    assert pool(vec, "catavgmax") is not None and pool(vec, "catavgmax").shape == (2, 9)


def test_pool_rejects_5d():
    with pytest.raises(ValueError, match="cannot pool"):
        pool(torch.rand(1, 2, 3, 4, 5), "avg")


def test_widths_and_names():
    assert pooled_width((8, 4, 4), "catavgmax") == 16
    assert pooled_width((8, 4, 4), "flatten") == 128
    assert pooled_width((10,), "gem") == 10
    assert column_names("layer4", (2, 3, 3), "catavgmax") == ["layer4_avg_0", "layer4_avg_1", "layer4_max_0", "layer4_max_1"]
    assert column_names("pre_logits", (2,), "avg") == ["pre_logits_0", "pre_logits_1"]
    assert column_names("stem", (2, 1, 1), "gem") == ["stem_gem_0", "stem_gem_1"]


@pytest.mark.parametrize("pooling,width", [("avg", 8 + 16), ("max", 24), ("catavgmax", 48), ("gem", 24), ("flatten", 8 * 16 * 16 + 16 * 4 * 4)])
def test_extractor_pooling_widths_and_names(tiny_cnn, pooling, width):
    ext = PretrainedFeatureExtractor(tiny_cnn, layers=["stem", "stage2"], pooling=pooling, preprocess=SMALL, progress=False).fit()
    out = ext.transform(np.zeros((2, 32, 32, 3), np.uint8))
    assert out.shape == (2, width) == (2, ext.n_features_out_)
    assert len(ext.get_feature_names_out()) == width
    assert len(set(ext.get_feature_names_out())) == width


def test_flatten_guard_names_layer_and_fix():
    with pytest.raises(ValueError, match=r"flatten.*'relu'.*over the limit.*pooling='avg'"):
        PretrainedFeatureExtractor("resnet18", weights=None, layers="relu", pooling="flatten").fit()


@pytest.mark.parametrize("kw,match", [({"pooling": "mean"}, "pooling='mean' is invalid"), ({"gem_p": 0}, "gem_p=0"), ({"gem_p": "3"}, "gem_p='3'")])
def test_bad_pooling_params(tiny_cnn, kw, match):
    with pytest.raises(ValueError, match=match):
        PretrainedFeatureExtractor(tiny_cnn, preprocess=SMALL, **kw).fit()
