"""Layer listing, resolution and the truncated forward pass."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from featx import LayerInfo, PretrainedFeatureExtractor, list_layers

from .conftest import SMALL, capture_matrix


def test_list_layers_tiny(tiny_cnn):
    rows = list_layers(tiny_cnn, preprocess=SMALL)
    assert all(isinstance(r, LayerInfo) for r in rows)
    by_name = {r.name: r for r in rows}
    assert rows[0] == LayerInfo("pre_logits", "pre_logits", (16,), "vec")
    assert {r.layout for r in rows if len(r.shape) == 3} == {"nchw"} and by_name["stem"].channels == 8
    assert by_name["stem"].shape == (8, 16, 16) and by_name["stem"].alias == "stage1"
    assert by_name["stage1"].shape == (12, 8, 8) and by_name["stage1"].alias == "stage2"
    assert by_name["stage2"].shape == (16, 4, 4) and by_name["stage2"].alias == "stage3"
    assert by_name["output"].shape == (5,)
    assert by_name["stem.0"].shape == (8, 16, 16) and by_name["stem.0"].alias is None


def test_list_layers_torchvision_efficientnet_stages():
    rows = list_layers("efficientnet_b0", preprocess={"input_size": 64})
    stages = [r.name for r in rows if r.alias and r.alias.startswith("stage")]
    assert stages == ["features.1", "features.2", "features.3", "features.5", "features.8"]


def test_list_layers_default_uses_timm_feature_info():
    rows = list_layers(preprocess={"input_size": 64})
    stages = {r.alias: r.name for r in rows if r.alias and r.alias.startswith("stage")}
    assert stages == {"stage1": "blocks.0", "stage2": "blocks.1", "stage3": "blocks.2", "stage4": "blocks.4", "stage5": "blocks.6"}


def test_unknown_layer_suggests_close_matches(tiny_cnn):
    with pytest.raises(ValueError, match=r"layer 'stag2' not found; did you mean|layer 'stag2' not found\. Did you mean 'stage2'"):
        PretrainedFeatureExtractor(tiny_cnn, layers="stag2", preprocess=SMALL).fit()


def test_resnet_unknown_layer_message_lists_valid():
    with pytest.raises(ValueError) as info:
        PretrainedFeatureExtractor("resnet18", weights=None, layers=["layr4"], preprocess=SMALL).fit()
    msg = str(info.value)
    assert "'layr4' not found" in msg and "'layer4'" in msg and "Aliases: stage1" in msg and "list_layers" in msg and len(msg) < 400


@pytest.mark.parametrize("layers", [[], 3, ["stem", 3], ("stem", None)])
def test_invalid_layers_param(tiny_cnn, layers):
    with pytest.raises(ValueError, match="layers="):
        PretrainedFeatureExtractor(tiny_cnn, layers=layers, preprocess=SMALL).fit()


def test_same_layer_twice_rejected(tiny_cnn):
    with pytest.raises(ValueError, match="same layer twice"):
        PretrainedFeatureExtractor(tiny_cnn, layers=["stage2", "stage3"], preprocess=SMALL).fit()


def test_forward_stops_after_deepest_requested_layer(tiny_cnn):
    ext = PretrainedFeatureExtractor(tiny_cnn, layers=["stem", "stage1"], preprocess=SMALL, progress=False).fit()
    calls = []
    for name in ("stage2", "pool", "fc"):
        getattr(ext.backbone_, name).register_forward_pre_hook(lambda m, a, n=name: calls.append(n))
    out = ext.transform(torch.rand(3, 3, 32, 32))
    assert out.shape == (3, 8 + 12)
    assert calls == [], f"layers after the deepest requested one ran: {calls}"


def test_aliases_and_order(tiny_cnn):
    ext = PretrainedFeatureExtractor(tiny_cnn, layers=["stage3", "stem", "pre_logits"], preprocess=SMALL, precision="fp32",
                                     progress=False).fit()
    assert ext.layers_ == ["stage3", "stem", "pre_logits"]
    names = ext.get_feature_names_out()
    assert names[0] == "stage3_avg_0" and names[16] == "stem_avg_0" and names[-1] == "pre_logits_15"
    x = torch.rand(2, 3, 32, 32)
    out = ext.transform(x)
    # stage3 (alias of module 'stage2') avg-pooled equals pre_logits (the classifier input)
    torch.testing.assert_close(torch.from_numpy(out[:, :16]), torch.from_numpy(out[:, -16:]))


def test_module_called_twice_uses_last_call():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.act = nn.ReLU()

        def forward(self, x):
            return self.act(self.conv(self.act(x) - 0.5))

    m = Twice()
    ext = PretrainedFeatureExtractor(m, layers="act", pooling="avg", preprocess=SMALL, progress=False).fit()
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        ref = torch.relu(m.conv(torch.relu(x) - 0.5)).mean((2, 3))
    got = capture_matrix(ext, x)
    torch.testing.assert_close(got, ref)


def test_model_without_head_uses_its_output_as_pre_logits():
    m = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    ext = PretrainedFeatureExtractor(m, preprocess=SMALL, progress=False).fit()
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        ref = m(x)
    torch.testing.assert_close(capture_matrix(ext, x), ref)
    assert ext.n_features_out_ == 6


def test_output_alias_gives_logits(tiny_cnn):
    ext = PretrainedFeatureExtractor(tiny_cnn, layers="output", preprocess=SMALL, progress=False).fit()
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        ref = ext.backbone_(x)
    torch.testing.assert_close(capture_matrix(ext, x), ref)
