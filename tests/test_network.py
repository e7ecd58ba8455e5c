"""One frozen network per process: shared by extractors, never copied or folded per fit, never built for cached work."""

from __future__ import annotations

import copy
import threading

import numpy as np
import pytest
import torch

from featx import PretrainedFeatureExtractor
from featx._models import fold as _fold
from featx._runtime import network as _network

from .conftest import SMALL

_MODEL = dict(model="resnet18", weights=None, preprocess=SMALL, device="cpu", progress=False)


@pytest.fixture
def fresh_networks():
    _network.clear()
    yield
    _network.clear()


@pytest.fixture
def counts(monkeypatch):
    """Deep copies of modules, fold checks and network builds while the test runs."""
    seen = {"deepcopy": 0, "fold_check": 0, "build": 0}
    real_deepcopy, real_same, real_build = copy.deepcopy, _fold._same, _network._build

    def deepcopy(obj, *a, **kw):
        if isinstance(obj, torch.nn.Module):
            seen["deepcopy"] += 1
        return real_deepcopy(obj, *a, **kw)

    def same(*a, **kw):
        seen["fold_check"] += 1
        return real_same(*a, **kw)

    def build(*a, **kw):
        seen["build"] += 1
        return real_build(*a, **kw)

    monkeypatch.setattr(copy, "deepcopy", deepcopy)
    monkeypatch.setattr(_fold, "_same", same)
    monkeypatch.setattr(_network, "_build", build)
    return seen


@pytest.fixture
def images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (40, 48, 3), dtype=np.uint8) for _ in range(6)]


@pytest.mark.filterwarnings("ignore::featx.DeviceWarning")  # bf16 where the CPU only emulates it
def test_a_second_extractor_of_the_same_network_copies_and_folds_nothing(fresh_networks, counts, images):
    first = PretrainedFeatureExtractor(**_MODEL, precision="bf16").fit()
    a = first.transform(images)
    assert counts["build"] == 1 and counts["deepcopy"] >= 1 and counts["fold_check"] == 1
    assert first._runner.folded > 0  # the check really ran and folded
    before = dict(counts)
    second = PretrainedFeatureExtractor(**_MODEL, precision="bf16").fit()
    b = second.transform(images)
    assert counts == before  # no deepcopy, no fold check, no build
    assert second.backbone_ is first.backbone_
    np.testing.assert_array_equal(a, b)


def test_fp32_extractors_of_any_layers_share_one_network(fresh_networks, counts, images):
    a = PretrainedFeatureExtractor(**_MODEL, precision="fp32", layers="layer2").fit()
    b = PretrainedFeatureExtractor(**_MODEL, precision="fp32", layers=["layer4", "layer1"]).fit()
    assert counts["build"] == 1 and a.backbone_ is b.backbone_
    assert a.transform(images).shape == (6, 128) and b.transform(images).shape == (6, 512 + 64)


def test_shared_network_in_two_threads_gives_each_extractor_its_own_features(fresh_networks, images):
    x2 = PretrainedFeatureExtractor(**_MODEL, precision="fp32", layers="layer2", batch_size=1)
    x4 = PretrainedFeatureExtractor(**_MODEL, precision="fp32", layers="layer4", batch_size=1)
    want2, want4 = x2.fit().transform(images), x4.fit().transform(images)  # one after the other
    assert want2.shape == (6, 128) and want4.shape == (6, 512)
    assert x2.backbone_ is x4.backbone_
    results: dict[str, list] = {"2": [], "4": []}
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def work(name, ext):
        try:
            start.wait(timeout=30)
            for _ in range(5):
                results[name].append(ext.transform(images))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=("2", x2)), threading.Thread(target=work, args=("4", x4))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads) and not errors
    assert len(results["2"]) == len(results["4"]) == 5
    for got in results["2"]:
        np.testing.assert_allclose(got, want2, rtol=1e-5, atol=1e-6)
    for got in results["4"]:
        np.testing.assert_allclose(got, want4, rtol=1e-5, atol=1e-6)


def test_a_fully_cached_fit_and_transform_builds_and_runs_no_network(fresh_networks, counts, computed, images,
                                                                      tmp_path):
    cold = PretrainedFeatureExtractor(**_MODEL, cache=str(tmp_path))
    want = cold.fit_transform(images)
    assert counts["build"] == 1 and computed[0] > 0
    _network.clear()  # as in a new process: nothing built yet
    before, ran = dict(counts), computed[0]
    for layers in ("layer3", None):
        warm = PretrainedFeatureExtractor(**_MODEL, cache=str(tmp_path), layers=layers)
        got = warm.fit_transform(images)
        assert warm.last_run_.cache_hits == len(images) and warm.last_run_.computed == 0
    np.testing.assert_array_equal(got, want)
    assert counts == before and computed[0] == ran  # nothing copied, folded, built or run
    assert "_built_runner" not in vars(warm)
    warm.transform([255 - images[0]])  # a new image: now the network is built, once
    assert counts["build"] == before["build"] + 1 and warm.last_run_.computed == 1


def test_hooks_of_collected_extractors_leave_the_shared_network(fresh_networks, images):
    keep = PretrainedFeatureExtractor(**_MODEL, precision="fp32", layers="layer2").fit()
    module = keep.backbone_

    def hooks() -> int:
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())

    base = hooks()
    for layers in ("layer1", "layer3", "layer4"):
        PretrainedFeatureExtractor(**_MODEL, precision="fp32", layers=layers).fit().transform(images[:1])
    import gc

    gc.collect()
    assert hooks() == base
    assert module is keep.backbone_ and keep.transform(images[:2]).shape == (2, 128)


@pytest.mark.filterwarnings("ignore::featx.DeviceWarning")
def test_the_registry_is_bounded(fresh_networks):
    model = {k: v for k, v in _MODEL.items() if k != "preprocess"}
    for i in range(3):  # fp32 networks do not depend on the input size: one shared entry
        PretrainedFeatureExtractor(**model, precision="fp32", preprocess={"input_size": 32 + 8 * i}).fit()
    assert len(_network._NETWORKS) == 1
    for i in range(_network.MAX_NETWORKS + 2):  # a folded one is checked at its input size: one entry each
        PretrainedFeatureExtractor(**model, precision="bf16", preprocess={"input_size": 32 + 8 * i}).fit()
    assert len(_network._NETWORKS) == _network.MAX_NETWORKS
