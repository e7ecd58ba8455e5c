"""Pooling values against numpy, names, and the flatten guard."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from featx import PretrainedFeatureExtractor
from featx._pooling import column_names, pool, pooled_width

from .conftest import SMALL


@pytest.fixture
def fmap():
    return torch.rand(2, 3, 4, 5, generator=torch.Generator().manual_seed(0)) * 2 - 0.5


def test_avg_max_avgmax(fmap):
    a = fmap.numpy()
    np.testing.assert_allclose(pool(fmap, "avg").numpy(), a.mean((2, 3)), rtol=1e-6)
    np.testing.assert_allclose(pool(fmap, "max").numpy(), a.max((2, 3)), rtol=1e-6)
    np.testing.assert_allclose(pool(fmap, "avgmax").numpy(), np.concatenate([a.mean((2, 3)), a.max((2, 3))], 1), rtol=1e-6)


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
    assert pool(vec, "avgmax") is not None and pool(vec, "avgmax").shape == (2, 9)


def test_pool_rejects_5d():
    with pytest.raises(ValueError, match="cannot pool"):
        pool(torch.rand(1, 2, 3, 4, 5), "avg")


def test_widths_and_names():
    assert pooled_width((8, 4, 4), "avgmax") == 16
    assert pooled_width((8, 4, 4), "flatten") == 128
    assert pooled_width((10,), "gem") == 10
    assert column_names("layer4", (2, 3, 3), "avgmax") == ["layer4_avg_0", "layer4_avg_1", "layer4_max_0", "layer4_max_1"]
    assert column_names("pre_logits", (2,), "avg") == ["pre_logits_0", "pre_logits_1"]
    assert column_names("stem", (2, 1, 1), "gem") == ["stem_gem_0", "stem_gem_1"]


@pytest.mark.parametrize("pooling,width", [("avg", 8 + 16), ("max", 24), ("avgmax", 48), ("gem", 24), ("flatten", 8 * 16 * 16 + 16 * 4 * 4)])
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
