"""Backbones: offline default with real weights, torchvision/timm/module sources, checkpoints, download failures."""

from __future__ import annotations

import pickle
import re
from pathlib import Path
import urllib.error

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision

from featx import ModelLoadError, PretrainedFeatureExtractor
from featx._models.backbones import build_backbone
from featx._models.weights import load_checkpoint

from .conftest import SMALL, TinyCNN, capture_matrix


@pytest.fixture(scope="module")
def default_extractor():
    return PretrainedFeatureExtractor(layers="output", progress=False).fit()


def test_offline_default_weights_are_real_imagenet(default_extractor):
    skimage_data = pytest.importorskip("skimage.data")
    logits = default_extractor.transform([skimage_data.chelsea(), skimage_data.coffee()])
    top1 = logits.argmax(axis=1)
    assert 281 <= top1[0] <= 285, f"chelsea classified as {top1[0]}, not a domestic cat"
    assert top1[1] in (967, 968), f"coffee classified as {top1[1]}, not espresso/cup"


def test_offline_default_matches_timm_pre_logits():
    ext = PretrainedFeatureExtractor(progress=False).fit()
    m = ext.backbone_
    assert ext.layers_ == ["pre_logits"] and ext.n_features_out_ == 1280
    assert ext.model_id_ == "featx:efficientnet_lite0"
    assert ext.preprocess_["mean"] == (0.5, 0.5, 0.5) and ext.preprocess_["std"] == (0.5, 0.5, 0.5)
    assert ext.preprocess_["input_size"] == (224, 224)
    x = torch.randn(3, 3, 224, 224)
    with torch.inference_mode():
        ref = m.forward_head(m.forward_features(x), pre_logits=True)
        got = capture_matrix(ext, x)
    np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=0, atol=1e-5)


def test_default_weights_loaded_by_position_with_shapes_checked():
    bb = build_backbone("efficientnet_lite0", "DEFAULT")
    ref = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    got = bb.module.state_dict()
    assert list(got) == list(ref)
    # the packaged file's first tensor is the stem convolution
    from featx._models.backbones import _offline_weights_file

    packaged = load_checkpoint(_offline_weights_file("efficientnet_lite0"))
    assert torch.equal(got["conv_stem.weight"], packaged["_conv_stem.weight"])
    assert torch.equal(got["classifier.bias"], packaged["_fc.bias"])


def test_resnet18_layers_match_manual_hooks():
    torch.manual_seed(0)
    ext = PretrainedFeatureExtractor("resnet18", weights=None, layers=["layer3", "layer4"], progress=False).fit()
    model = ext.backbone_
    grabbed = {}
    hs = [getattr(model, n).register_forward_hook(lambda m, i, o, n=n: grabbed.__setitem__(n, o)) for n in ("layer3", "layer4")]
    x = torch.randn(2, 3, 64, 64)
    try:
        with torch.inference_mode():
            got = capture_matrix(ext, x)
            model(x)
    finally:
        for h in hs:
            h.remove()
    ref = torch.cat([F.adaptive_avg_pool2d(grabbed[n], 1).flatten(1) for n in ("layer3", "layer4")], 1)
    assert got.shape == (2, 256 + 512)
    np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=1e-6, atol=1e-6)


def test_torchvision_preprocess_comes_from_weights_metadata():
    ext = PretrainedFeatureExtractor("resnet50", weights=None, progress=False).fit()
    t = torchvision.models.ResNet50_Weights.DEFAULT.transforms()
    assert ext.preprocess_["resize_size"] == t.resize_size[0] == 232
    assert ext.preprocess_["input_size"] == (224, 224)
    assert ext.preprocess_["mean"] == tuple(t.mean)
    assert ext.model_id_ == "torchvision:resnet50" and ext.weights_id_ is None


def test_timm_source_and_preprocess_from_data_config():
    ext = PretrainedFeatureExtractor("timm:resnet18", weights=None, preprocess={"input_size": 48}, progress=False).fit()
    cfg = timm.data.resolve_model_data_config(timm.create_model("resnet18"))
    assert ext.model_id_ == "timm:resnet18"
    assert ext.preprocess_["mean"] == tuple(cfg["mean"])
    assert ext.preprocess_["input_size"] == (48, 48)
    # crop ratio kept: 224/crop_pct -> resize, scaled to the new input size
    assert ext.preprocess_["resize_size"] == round(48 * int(224 / cfg["crop_pct"]) / 224)
    assert ext.n_features_out_ == 512


def test_module_source_uses_a_copy_and_imagenet_defaults(tiny_cnn):
    before = {k: v.clone() for k, v in tiny_cnn.state_dict().items()}
    tiny_cnn.train()
    ext = PretrainedFeatureExtractor(tiny_cnn, preprocess=SMALL, progress=False).fit()
    assert tiny_cnn.training, "fit must not put the user's module in eval mode"
    assert ext.backbone_ is not tiny_cnn and not ext.backbone_.training
    assert all(torch.equal(before[k], v) for k, v in tiny_cnn.state_dict().items())
    assert ext.model_id_.endswith("TinyCNN") and ext.n_features_out_ == 16
    assert ext.preprocess_["mean"] == (0.485, 0.456, 0.406)


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_checkpoint_files_load(tmp_path, tiny_cnn, fmt):
    torch.manual_seed(1)
    trained = TinyCNN()
    path = tmp_path / f"w.{fmt}"
    if fmt == "pth":
        torch.save({"state_dict": trained.state_dict()}, path)
    else:
        from safetensors.torch import save_file

        save_file(trained.state_dict(), str(path))
    # fp32: in bf16 the backbone's BatchNorm would be folded into its convolution
    ext = PretrainedFeatureExtractor(tiny_cnn, weights=path, preprocess=SMALL, precision="fp32", progress=False).fit()
    for k, v in trained.state_dict().items():
        assert torch.equal(ext.backbone_.state_dict()[k], v)
    assert ext.weights_id_ == f"file:{path}"


def test_torchvision_checkpoint_mismatch_names_first_tensor(tmp_path):
    sd = torchvision.models.resnet18().state_dict()
    sd["fc.weight"] = torch.zeros(10, 512)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(ModelLoadError, match=r"fc\.weight.*\(10, 512\).*\(1000, 512\)"):
        PretrainedFeatureExtractor("resnet18", weights=str(path)).fit()


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickle_checkpoint_with_code_is_refused_and_code_does_not_run(tmp_path, tiny_cnn):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"weight": _Evil(str(marker))}, f)
    with pytest.raises(ModelLoadError, match="weights_only=True"):
        PretrainedFeatureExtractor(tiny_cnn, weights=path).fit()
    assert not marker.exists()


def test_missing_checkpoint_file(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        PretrainedFeatureExtractor("resnet18", weights=str(tmp_path / "nope.pth")).fit()


def test_download_failure_explains_how_to_work_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache: a download is needed

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(ModelLoadError) as info:
        PretrainedFeatureExtractor("resnet18", weights="IMAGENET1K_V1").fit()
    msg = str(info.value)
    assert "resnet18" in msg and "offline" in msg and "weights=None" in msg and "efficientnet_lite0" in msg


def test_timm_download_failure_explains_how_to_work_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    import timm.models._builder as builder

    def no_network(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(builder, "load_pretrained", no_network)
    with pytest.raises(ModelLoadError, match="offline"):
        PretrainedFeatureExtractor("timm:resnet18.a1_in1k").fit()


@pytest.mark.parametrize(
    "model,weights,match",
    [
        ("resnet5O", None, r"not a known model\. Did you mean .*resnet50"),
        ("resnet18", "IMAGENET1K_V3", r"not a weights name.*Did you mean 'IMAGENET1K_V1'"),
        ("efficientnet_lite0", "IMAGENET", "is invalid for model='efficientnet_lite0'"),
        (42, None, "model=42 is invalid"),
    ],
)
def test_bad_model_or_weights(model, weights, match):
    with pytest.raises(ValueError, match=match):
        PretrainedFeatureExtractor(model, weights=weights).fit()


def test_missing_offline_package_says_what_to_install(monkeypatch):
    import featx._models.backbones as bbm

    monkeypatch.setitem(bbm.OFFLINE_MODELS, "efficientnet_lite9", ("tf_efficientnet_lite0", "no_such_pkg_xyz", "efficientnet-lite9-pytorch-model"))
    with pytest.raises(ModelLoadError, match="pip install efficientnet-lite9-pytorch-model"):
        PretrainedFeatureExtractor("efficientnet_lite9").fit()



def _empty_caches(monkeypatch, tmp_path):
    import huggingface_hub.constants as hf

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hf"))
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)  # a loopback proxy would pass the session's network guard
    return hf


@pytest.mark.parametrize("model", ["timm:resnet50", "resnet50", "timm:resnet18.tv_in1k"])
def test_uncached_weights_fail_within_seconds_when_offline(model, monkeypatch, tmp_path, capfd):
    """No network (the test session refuses every non-loopback connection): a clear error at once,
    with no retries and no 'Downloading' line."""
    import socket

    from featx._models import hub

    _empty_caches(monkeypatch, tmp_path)
    attempts, real = [], socket.create_connection
    monkeypatch.setattr(socket, "create_connection",
                        lambda address, timeout=None, *a, **k: attempts.append(timeout) or real(address, timeout, *a, **k))
    with pytest.raises(ModelLoadError, match="cannot be reached") as info:
        PretrainedFeatureExtractor(model).fit()
    assert attempts == [hub.CONNECT_TIMEOUT]  # one bounded connection attempt, then the error: no retries
    assert "weights=None" in str(info.value) and "python -c" in str(info.value)
    err = capfd.readouterr().err
    assert "Downloading" not in err and "Retrying" not in err


def test_cached_hub_weights_load_offline(monkeypatch, tmp_path):
    """Weights already in the Hugging Face cache load with the hub unreachable, without a retry."""
    import timm
    from safetensors.torch import save_file

    hf = _empty_caches(monkeypatch, tmp_path)
    name = "resnet10t.c3_in1k"
    repo = timm.models.get_pretrained_cfg(name).hf_hub_id
    torch.manual_seed(3)
    sd = timm.create_model(name, pretrained=False).state_dict()
    commit = "0" * 40
    root = Path(hf.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"
    (root / "snapshots" / commit).mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(root / "snapshots" / commit / "model.safetensors"))
    import socket

    attempts, real = [], socket.socket.connect
    monkeypatch.setattr(socket.socket, "connect", lambda self, address: attempts.append(address) or real(self, address))
    ext = PretrainedFeatureExtractor(f"timm:{name}", progress=False).fit()
    assert attempts == []  # loaded from the cache with the hub offline for the call: no connection tried
    torch.testing.assert_close(ext.backbone_.state_dict()["fc.weight"], sd["fc.weight"])
    assert hf.HF_HUB_OFFLINE is False  # offline mode was for that call only


def test_concurrent_first_builds_build_once(monkeypatch):
    """Threads asking for the same named backbone at once share one build (no check-then-build race)."""
    import threading
    import time

    from featx._models import backbones as _backbones

    real, calls = _backbones._build_torchvision, []

    def slow_build(name, weights):
        calls.append(name)
        time.sleep(0.2)  # long enough for every thread to ask while the first build runs
        return real(name, weights)

    monkeypatch.setattr(_backbones, "_build_torchvision", slow_build)
    _backbones._shared_template.cache_clear()
    got = []
    threads = [threading.Thread(target=lambda: got.append(_backbones.get_template("resnet18", None))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == ["resnet18"] and len(got) == 4 and all(g is got[0] for g in got)


@pytest.mark.parametrize("name", ["inception_v3", "googlenet"])
def test_a_local_checkpoint_gets_the_construction_arguments_of_pretrained_weights(name, tmp_path):
    """torchvision sets transform_input=True (and keeps the auxiliary heads) whenever weights are given."""
    import torchvision

    from featx._models.backbones import build_backbone

    torch.manual_seed(0)
    pretrained_shape = torchvision.models.get_model(name, weights=None, transform_input=True, aux_logits=True,
                                                    init_weights=False)
    path = tmp_path / f"{name}.pth"
    torch.save(pretrained_shape.state_dict(), path)
    module = build_backbone(f"torchvision:{name}", str(path)).module
    assert module.transform_input is True  # as with weights="DEFAULT": the same weights, the same network
    x = torch.rand(1, 3, 96, 96) if name == "googlenet" else torch.rand(1, 3, 299, 299)
    with torch.no_grad():
        torch.testing.assert_close(module.eval()(x), pretrained_shape.eval()(x))
    assert build_backbone(f"torchvision:{name}", None).module.transform_input is False  # random init: as torchvision


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_checkpoint_with_non_finite_weights_is_refused_naming_the_tensor(tmp_path, tiny_cnn, bad):
    from featx import ModelLoadError

    sd = tiny_cnn.state_dict()
    name = next(k for k, v in sd.items() if v.is_floating_point() and v.ndim == 4)
    sd[name] = sd[name].clone()
    sd[name].view(-1)[3] = bad
    path = tmp_path / "diverged.pth"
    torch.save(sd, path)
    with pytest.raises(ModelLoadError, match=rf"tensor '{re.escape(name)}' holds 1 NaN or infinite value"):
        PretrainedFeatureExtractor(tiny_cnn, weights=str(path), preprocess=SMALL).fit()


@pytest.mark.parametrize("name", ["inception_v3", "googlenet"])
def test_random_init_torchvision_models_build_without_torchvisions_future_warning(name):
    """``featx layers inception_v3`` printed torchvision's FutureWarning about its default initialisation: featx
    states today's default (init_weights=True), so the weights are the ones torchvision gives, silently."""
    import warnings

    import torchvision

    from featx._models.backbones import build_backbone

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        got = build_backbone(name, None).module
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        want = torchvision.models.get_model(name, weights=None)
    for (k, a), (_, b) in zip(got.state_dict().items(), want.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)


def test_a_local_vit_checkpoint_gets_the_image_size_of_its_weights(tmp_path):
    """torchvision builds vit_b_16's SWAG weights at 384 pixels (``image_size`` from the weights' metadata):
    a local copy of such weights is built at that size with those weights' preprocessing, not refused."""
    import torchvision

    from featx._models.backbones import build_backbone

    torch.manual_seed(0)
    swag = torchvision.models.get_model("vit_b_16", weights=None, image_size=384)
    path = tmp_path / "vit_b_16_swag.pth"
    torch.save(swag.state_dict(), path)
    backbone = build_backbone("torchvision:vit_b_16", str(path))
    assert backbone.module.image_size == 384
    want = torchvision.models.ViT_B_16_Weights.IMAGENET1K_SWAG_E2E_V1.transforms()
    assert backbone.preprocess["input_size"] == (384, 384) and backbone.preprocess["resize_size"] == want.resize_size[0]
    for (k, a), b in zip(backbone.module.state_dict().items(), swag.state_dict().values()):
        assert torch.equal(a, b), k
    assert build_backbone("torchvision:vit_b_16", None).module.image_size == 224  # random init: torchvision's default
