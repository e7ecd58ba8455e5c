"""BatchNorm folded into the convolution before it, where featx computes in reduced precision."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
import torchvision
from torch import nn

from featx import PretrainedFeatureExtractor
from featx._models.fold import fold_batchnorm

from .conftest import SMALL


def _randomize_bn(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters, so a wrong fold shows."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) - 0.5)
    return model.eval()


def _x(size=32, n=2):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(2))


def _bn_count(model):
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize("make", [
    lambda: torchvision.models.resnet18(num_classes=7),
    lambda: timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=7),  # Conv2dSame, BatchNormAct2d
])
def test_every_batchnorm_of_a_cnn_is_folded_and_outputs_are_unchanged_in_fp32(make):
    model = _randomize_bn(make())
    before = _bn_count(model)
    with torch.inference_mode():
        ref = model(_x())
    folded, n = fold_batchnorm(model, _x(n=1))
    assert n == before > 0 and _bn_count(folded) == 0
    assert _bn_count(model) == before  # the original is left as it was
    with torch.inference_mode():
        out = folded(_x())
    np.testing.assert_allclose(out.numpy(), ref.numpy(), rtol=1e-4, atol=1e-5 * ref.abs().max().item())


def test_a_timm_norm_act_keeps_its_activation_under_its_name():
    model = _randomize_bn(timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=7))
    folded, _ = fold_batchnorm(model, _x(n=1))
    names = dict(folded.named_modules())
    assert isinstance(names["bn1.act"], type(dict(model.named_modules())["bn1.act"]))


class TwoReaders(nn.Module):
    """The conv's output goes to the BatchNorm and to another module."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.side = nn.ReLU()

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + self.side(y)


class FunctionalReader(nn.Module):
    """The conv's output is also read by a plain tensor operation, which no module hook sees."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + 2 * y


class StdConv(nn.Conv2d):
    """A weight-standardised convolution: scaling its weight changes nothing, so a fold would be lost."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return nn.functional.conv2d(x, w, self.bias, self.stride, self.padding)


@pytest.mark.parametrize("model", [
    TwoReaders(),
    FunctionalReader(),  # the trace pairs it; the check against the original refuses it
    nn.Sequential(StdConv(3, 4, 3, padding=1), nn.BatchNorm2d(4)),
    nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.SyncBatchNorm(4)),  # a forward featx does not know
], ids=["two-readers", "functional-reader", "standardised-conv", "other-norm"])
def test_a_batchnorm_that_cannot_be_folded_exactly_is_left_alone(model):
    model = _randomize_bn(model)
    folded, n = fold_batchnorm(model, _x(n=1))
    assert n == 0 and folded is model


def test_a_captured_convolution_keeps_its_batchnorm():
    model = _randomize_bn(torchvision.models.resnet18())
    folded, n = fold_batchnorm(model, _x(n=1), keep={"layer1.0.conv1", "layer2.0.bn2"})
    names = dict(folded.named_modules())
    assert isinstance(names["layer1.0.bn1"], nn.BatchNorm2d) and isinstance(names["layer2.0.bn2"], nn.BatchNorm2d)
    assert n == _bn_count(model) - 2


def _cos(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_bf16_extractor_runs_folded_and_stays_close_to_fp32(image_paths):
    paths, _ = image_paths
    model = _randomize_bn(torchvision.models.resnet18())
    kw = dict(model=model, layers=["layer2", "layer4"], cache=None, batch_size=4, preprocess=SMALL, progress=False)
    fp32 = PretrainedFeatureExtractor(precision="fp32", **kw).fit()
    bf16 = PretrainedFeatureExtractor(precision="bf16", **kw).fit()
    assert _bn_count(fp32.backbone_) == 20 and _bn_count(bf16.backbone_) == 0  # explicit fp32: the module as given
    assert _cos(bf16.transform(paths), fp32.transform(paths)).min() > 0.999
    assert bf16._settled.namespace[1]["batchnorm"] == "folded" and "batchnorm" not in fp32._settled.namespace[1]
