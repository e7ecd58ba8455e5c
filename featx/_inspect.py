"""featx.list_layers: what a backbone offers to ``layers=``."""

from __future__ import annotations

from typing import Any

import torch

from ._models.backbones import build_backbone, resolve_preprocess
from ._models.layers import LayerInfo, layer_table, probe
from ._options import DEFAULT_MODEL

__all__ = ["list_layers"]


def list_layers(model: Any = DEFAULT_MODEL, *, weights: Any = None, preprocess: dict | None = None) -> list[LayerInfo]:
    """The layers of ``model`` that ``layers=`` accepts, with their output shapes.

    Parameters
    ----------
    model : str or torch.nn.Module, default="efficientnet_lite0"
        As for :class:`PretrainedFeatureExtractor`.
    weights : str, path or None, default=None
        Shapes do not depend on the weights, so the default builds the
        architecture with random weights and never downloads anything.
    preprocess : dict or None, default=None
        Preprocessing overrides; ``input_size`` changes the spatial shapes.

    Returns
    -------
    layers : list of LayerInfo
        ``(name, alias, shape, layout, prefix)`` per layer, in execution
        order, starting with ``pre_logits`` when the model has a classifier
        head. ``alias`` is ``"stageK"``, ``"blockK"`` (a transformer's
        blocks), ``"pre_logits"``, ``"output"`` or None; ``shape`` is the
        per-image output shape; ``layout`` says how to read it: ``"nchw"``
        (``(C, H, W)`` maps), ``"nhwc"`` (``(H, W, C)`` maps, e.g. Swin),
        ``"tokens"`` (``(L, C)``: ``prefix`` class/register tokens, then
        patch tokens) or ``"vec"``. ``.channels`` is the width of one pooling.

    Examples
    --------
    >>> from featx import list_layers
    >>> [(l.name, l.shape) for l in list_layers("resnet18") if l.alias and l.alias.startswith("stage")][-1]
    ('layer4', (512, 7, 7))
    """
    bb = build_backbone(model, weights)
    cfg = resolve_preprocess(bb.preprocess, preprocess)
    pr = probe(bb.module, cfg["input_size"], torch.device("cpu"), bb.classifier, bb.stages, bb.aliases)
    return layer_table(pr)
