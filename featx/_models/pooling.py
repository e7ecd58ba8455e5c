"""Pooling of intermediate layer outputs into fixed-length vectors.

A layer's output is pooled per image according to its *layout* (found when
the backbone is probed, see :mod:`featx._models.layers`):

- ``"nchw"``: ``(N, C, H, W)`` maps (CNNs): pooled over H and W;
- ``"nhwc"``: ``(N, H, W, C)`` maps (Swin and other timm models with
  ``output_fmt="NHWC"``): pooled over H and W, never over C; ``flatten``
  gives the values in C, H, W order, as for ``"nchw"``;
- ``"tokens"``: ``(N, L, C)`` sequences (vision transformers) whose first
  ``prefix`` tokens are the class token and any register or distillation
  tokens: ``"cls"`` is token 0; ``"avg"``, ``"max"`` and ``"gem"`` pool the
  patch tokens only (the prefix excluded, as timm's ``global_pool="avg"``
  does); ``"cls+avg"`` is the two side by side (DINOv2's linear-probe
  recipe); ``flatten`` keeps every token;
- ``"avgmax"`` is the mean of ``"avg"`` and ``"max"`` (``C`` features) and
  ``"catavgmax"`` their concatenation (``2C``), as timm names them
  (``SelectAdaptivePool2d``); featx <= 0.2 called the concatenation
  ``"avgmax"``;
- ``"vec"``: ``(N, D)`` vectors (already pooled, e.g. ``pre_logits``): returned
  as they are, whatever the pooling.
"""

from __future__ import annotations

import torch

from .._exceptions import ParameterError, arg
from .._options import POOLINGS, TOKEN_POOLINGS

__all__ = ["POOLINGS", "TOKEN_POOLINGS", "layer_parts", "pool", "pool_parts", "pooled_width", "part_width",
           "channels", "column_names", "default_layout", "pooling_error", "FLATTEN_MAX_FEATURES"]

#: ``flatten`` refuses layers whose flattened size per image exceeds this (1 MiB of float32).
FLATTEN_MAX_FEATURES = 262_144

_GEM_EPS = 1e-6
_COMPOSITE = {"catavgmax": ["avg", "max"], "cls+avg": ["cls", "avg"]}


def pool_parts(pooling: str) -> list[str]:
    """The elementary poolings a pooling is made of (``catavgmax`` is ``avg`` then ``max``)."""
    return list(_COMPOSITE.get(pooling, [pooling]))


def default_layout(shape: tuple[int, ...]) -> str:
    """The layout of a per-image shape when nothing else is known: vec, tokens or nchw by rank."""
    return {1: "vec", 2: "tokens", 3: "nchw"}.get(len(shape), "")


def channels(shape: tuple[int, ...], layout: str | None = None) -> int:
    """The channel count (features per elementary pooling) of a per-image output shape."""
    layout = layout or default_layout(shape)
    return shape[0] if layout in ("vec", "nchw") else shape[-1]


def layer_parts(shape: tuple[int, ...], parts) -> tuple[str, ...]:
    """The elementary poolings computed for a layer: ``("vec",)`` for a layer that outputs vectors, else ``parts``."""
    return ("vec",) if len(shape) == 1 else tuple(parts)


def part_width(shape: tuple[int, ...], part: str, layout: str | None = None) -> int:
    """Width of one elementary pooling (``vec``, ``avg``, ``cls``, ``flatten``...) of ``shape``."""
    if part == "flatten":
        n = 1
        for s in shape:
            n *= s
        return n
    return channels(shape, layout)


def pooled_width(shape: tuple[int, ...], pooling: str, layout: str | None = None) -> int:
    """Number of features ``pool`` gives for one image whose layer output has ``shape`` (no batch axis)."""
    if len(shape) == 1:
        return shape[0]
    return sum(part_width(shape, p, layout) for p in pool_parts(pooling))


def pooling_error(pooling: str, layer: str, shape: tuple[int, ...], layout: str | None, prefix: int) -> str | None:
    """Why ``pooling`` cannot apply to a layer (None when it can)."""
    layout = layout or default_layout(shape)
    if pooling not in TOKEN_POOLINGS or layout == "vec":
        return None
    if layout != "tokens":
        return (f"{arg('pooling', pooling)} takes a transformer's class token, but layer {layer!r} is a "
                f"{'(C, H, W)' if layout == 'nchw' else '(H, W, C)'} map {shape}. Use 'avg', 'max', 'gem' or "
                "'catavgmax' for maps.")
    if prefix < 1:
        return (f"{arg('pooling', pooling)} takes the class token, but layer {layer!r} (tokens {shape}) has no "
                f"class token. Use {arg('pooling', 'avg')} (the mean of its tokens) instead.")
    return None


def pool(x: torch.Tensor, pooling: str, gem_p: float = 3.0, layout: str | None = None, prefix: int = 0) -> torch.Tensor:
    """Pool one layer's output ``x`` (batch first) into an ``(N, D)`` float32 tensor."""
    x = x.float()
    if x.ndim == 2:
        return x
    if x.ndim not in (3, 4):
        raise ValueError(f"cannot pool a layer output with shape {tuple(x.shape)}; expected 2-D, 3-D or 4-D.")
    layout = layout or default_layout(tuple(x.shape[1:]))
    if pooling in _COMPOSITE:
        return torch.cat([pool(x, p, gem_p, layout, prefix) for p in _COMPOSITE[pooling]], dim=1)
    if layout == "nhwc":
        x = x.permute(0, 3, 1, 2)  # a view: pooled over H and W like any map
    if pooling == "flatten":
        return x.reshape(x.shape[0], -1)
    if layout == "tokens":
        if pooling == "cls":
            return x[:, 0]
        x, dims = x[:, prefix:], (1,)
    elif pooling == "cls":
        raise ValueError(f"pooling='cls' needs a token sequence, got a map of shape {tuple(x.shape)}.")
    else:
        dims = (2, 3)
    if pooling == "avg":
        return x.mean(dims)
    if pooling == "max":
        return x.amax(dims)
    if pooling == "avgmax":  # timm's meaning: the mean of the two (catavgmax is their concatenation)
        return 0.5 * (x.mean(dims) + x.amax(dims))
    if pooling == "gem":
        # Generalised mean (Radenovic et al.): (mean(x^p))^(1/p) over positive activations.
        return x.clamp(min=_GEM_EPS).pow(gem_p).mean(dims).pow(1.0 / gem_p)
    raise ParameterError(f"{arg('pooling', pooling)} is invalid. It must be one of {list(POOLINGS)}.", "pooling")


def column_names(layer: str, shape: tuple[int, ...], pooling: str, layout: str | None = None) -> list[str]:
    """Readable, stable names for the columns one layer contributes: ``{layer}_{pooling}_{i}``."""
    if len(shape) == 1:
        return [f"{layer}_{i}" for i in range(shape[0])]
    return [f"{layer}_{p}_{i}" for p in pool_parts(pooling) for i in range(part_width(shape, p, layout))]
