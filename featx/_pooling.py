"""Pooling of intermediate feature maps into fixed-length vectors.

A layer's output is pooled per image:

- 4-D ``(N, C, H, W)`` maps: pooled over H and W (``flatten`` keeps C*H*W values);
- 3-D ``(N, L, C)`` token sequences (vision transformers): pooled over L;
- 2-D ``(N, D)`` vectors (already pooled, e.g. ``pre_logits``): returned as they are,
  whatever the pooling.
"""

from __future__ import annotations

import torch

__all__ = ["POOLINGS", "pool", "pool_parts", "pooled_width", "column_names", "FLATTEN_MAX_FEATURES"]

POOLINGS = ("avg", "max", "avgmax", "gem", "flatten")

#: ``flatten`` refuses layers whose flattened size per image exceeds this (1 MiB of float32).
FLATTEN_MAX_FEATURES = 262_144

_GEM_EPS = 1e-6


def pool_parts(pooling: str) -> list[str]:
    """The elementary poolings a pooling is made of (``avgmax`` is ``avg`` then ``max``)."""
    return ["avg", "max"] if pooling == "avgmax" else [pooling]


def _reduce_dims(x: torch.Tensor) -> tuple[int, ...]:
    return (2, 3) if x.ndim == 4 else (1,)


def pool(x: torch.Tensor, pooling: str, gem_p: float = 3.0) -> torch.Tensor:
    """Pool one layer's output ``x`` into an ``(N, D)`` float32 tensor."""
    x = x.float()
    if x.ndim == 2:
        return x
    if x.ndim not in (3, 4):
        raise ValueError(f"cannot pool a layer output with shape {tuple(x.shape)}; expected 2-D, 3-D or 4-D.")
    if pooling == "flatten":
        return x.reshape(x.shape[0], -1)
    dims = _reduce_dims(x)
    if pooling == "avg":
        return x.mean(dims)
    if pooling == "max":
        return x.amax(dims)
    if pooling == "avgmax":
        return torch.cat([x.mean(dims), x.amax(dims)], dim=1)
    if pooling == "gem":
        # Generalised mean (Radenovic et al.): (mean(x^p))^(1/p) over positive activations.
        return x.clamp(min=_GEM_EPS).pow(gem_p).mean(dims).pow(1.0 / gem_p)
    raise ValueError(f"pooling={pooling!r} is invalid. It must be one of {list(POOLINGS)}.")


def _channels(shape: tuple[int, ...]) -> int:
    """Channel count of a per-image output shape: (C, H, W) or (L, C)."""
    return shape[0] if len(shape) == 3 else shape[-1]


def pooled_width(shape: tuple[int, ...], pooling: str) -> int:
    """Number of features ``pool`` gives for one image whose layer output has ``shape`` (no batch axis)."""
    if len(shape) == 1:
        return shape[0]
    if pooling == "flatten":
        n = 1
        for s in shape:
            n *= s
        return n
    return _channels(shape) * (2 if pooling == "avgmax" else 1)


def column_names(layer: str, shape: tuple[int, ...], pooling: str) -> list[str]:
    """Readable, stable names for the columns one layer contributes."""
    if len(shape) == 1:
        return [f"{layer}_{i}" for i in range(shape[0])]
    if pooling == "avgmax":
        c = _channels(shape)
        return [f"{layer}_avg_{i}" for i in range(c)] + [f"{layer}_max_{i}" for i in range(c)]
    return [f"{layer}_{pooling}_{i}" for i in range(pooled_width(shape, pooling))]
