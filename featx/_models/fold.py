"""Fold each BatchNorm into the convolution before it, for reduced-precision inference.

A frozen backbone's BatchNorm is an affine map per channel: ``y = (conv(x) -
mean) / sqrt(var + eps) * gamma + beta``. Folded into the convolution's
weights and bias it costs nothing, where it otherwise costs one more pass over
every feature map (what it gains, and how close the features stay to fp32,
is measured on the Performance page of the docs). Inference engines (ONNX
Runtime, OpenVINO, TensorRT, inductor's freezing) all do this.

featx folds only where it already computes in reduced precision, so explicit
``precision="fp32"`` stays the module's own arithmetic. A pair is folded only
when the trace of one forward pass shows the BatchNorm reading the
convolution's output and nothing else reading it, the convolution is not a
layer the extractor captures, and the BatchNorm's own forward is known
(``nn.BatchNorm2d`` or timm's ``BatchNormAct2d``, whose activation is kept
under the same name). The folded copy must reproduce the original's outputs
in fp32, or the original is kept.
"""

from __future__ import annotations

import copy
from typing import Iterable

import torch
from torch import nn

__all__ = ["fold_batchnorm", "folds"]

#: Largest difference between folded and original outputs, relative to their scale, that counts as equal.
_TOLERANCE = 1e-4


def folds(dtype: torch.dtype | None) -> bool:
    """Whether an extractor computing in ``dtype`` (None: fp32) runs a folded backbone."""
    return dtype is not None and dtype.is_floating_point  # int8: the quantizer folds them itself


class _FoldedNormAct(nn.Module):
    """What is left of timm's ``BatchNormAct2d`` once its normalisation is folded: drop, then act."""

    def __init__(self, drop: nn.Module, act: nn.Module):
        super().__init__()
        self.drop, self.act = drop, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(x))


def _replacement(bn: nn.Module) -> nn.Module | None:
    """The module that stands in for a folded BatchNorm, or None when its forward is not known."""
    if type(bn) is nn.BatchNorm2d:
        return nn.Identity()
    if type(bn).__name__ == "BatchNormAct2d" and isinstance(getattr(bn, "act", None), nn.Module) \
            and isinstance(getattr(bn, "drop", None), nn.Module):
        return _FoldedNormAct(bn.drop, bn.act)
    return None


def _foldable(bn: nn.Module) -> bool:
    return (isinstance(bn, nn.BatchNorm2d) and not bn.training and bn.track_running_stats
            and bn.running_mean is not None and bn.running_var is not None)


def _linear_conv(module: object) -> bool:
    """A convolution whose output is linear in its weight: ``nn.Conv2d``, or timm's ``Conv2dSame``
    (zero padding, then the same convolution). Others, such as weight-standardised convolutions, are not."""
    return type(module) is nn.Conv2d or (isinstance(module, nn.Conv2d) and type(module).__name__ == "Conv2dSame")


def _trace(module: nn.Module, example: torch.Tensor) -> list[tuple[str, str]]:
    """(conv name, BatchNorm name) pairs where, in one forward pass, the BatchNorm alone reads the conv's output."""
    calls: list[tuple[str, nn.Module, tuple, object]] = []
    hooks = [m.register_forward_hook(lambda m, a, o, n=n: calls.append((n, m, a, o)))
             for n, m in module.named_modules() if n]
    try:
        with torch.inference_mode():
            module(example)
    finally:
        for h in hooks:
            h.remove()
    times: dict[str, int] = {}
    for name, *_ in calls:
        times[name] = times.get(name, 0) + 1
    readers: dict[int, list[str]] = {}
    for name, _, args, _ in calls:
        for a in args:
            if isinstance(a, torch.Tensor):
                readers.setdefault(id(a), []).append(name)
    pairs = []
    outputs = {id(o): (n, m) for n, m, _, o in calls if isinstance(o, torch.Tensor)}
    for name, bn, args, _ in calls:
        if not (_foldable(bn) and times[name] == 1 and args and isinstance(args[0], torch.Tensor)):
            continue
        conv_name, conv = outputs.get(id(args[0]), (None, None))
        if (_linear_conv(conv) and times[conv_name] == 1 and readers[id(args[0])] == [name]
                and conv.out_channels == bn.num_features):
            pairs.append((conv_name, name))
    return pairs


def _fold_pair(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    with torch.no_grad():
        scale = torch.rsqrt(bn.running_var.float() + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.float()
        bias = conv.bias.float() if conv.bias is not None else torch.zeros_like(scale)
        shift = (bias - bn.running_mean.float()) * scale
        if bn.bias is not None:
            shift = shift + bn.bias.float()
        conv.weight.copy_(conv.weight.float() * scale.view(-1, 1, 1, 1))
        conv.bias = nn.Parameter(shift.to(conv.weight.dtype), requires_grad=False)


def _outputs(module: nn.Module, example: torch.Tensor, names: Iterable[str]) -> list[torch.Tensor]:
    """The module's output and the outputs of the named submodules, on ``example``."""
    seen: dict[str, torch.Tensor] = {}
    subs = dict(module.named_modules())
    hooks = [subs[n].register_forward_hook(lambda m, a, o, n=n: seen.setdefault(n, o)) for n in names if n in subs]
    try:
        with torch.inference_mode():
            out = module(example)
    finally:
        for h in hooks:
            h.remove()
    tensors = [out] if isinstance(out, torch.Tensor) else [t for t in (out if isinstance(out, (tuple, list)) else [])
                                                          if isinstance(t, torch.Tensor)]
    return tensors + [v for _, v in sorted(seen.items()) if isinstance(v, torch.Tensor)]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x.shape != y.shape:
            return False
        scale = max(x.abs().max().item(), 1e-6)
        if not torch.isfinite(y).all() or (x - y).abs().max().item() > _TOLERANCE * scale:
            return False
    return True


def fold_batchnorm(module: nn.Module, example: torch.Tensor, keep: Iterable[str] = ()) -> tuple[nn.Module, int]:
    """A copy of ``module`` with every safely foldable BatchNorm folded, and how many were.

    ``example`` is one input batch (fp32, on the module's device); ``keep``
    names the submodules whose outputs are read (captured layers): a
    convolution among them keeps its BatchNorm, and their outputs must stay
    the same. Returns ``module`` itself, and 0, when nothing can be folded or
    the folded copy does not reproduce it.
    """
    keep = set(keep)
    pairs = [(c, b) for c, b in _trace(module, example) if c not in keep and b not in keep]
    if not pairs:
        return module, 0
    folded = copy.deepcopy(module)
    subs = dict(folded.named_modules())
    done = 0
    for conv_name, bn_name in pairs:
        stand_in = _replacement(subs[bn_name])
        if stand_in is None:
            continue
        _fold_pair(subs[conv_name], subs[bn_name])
        parent_name, _, attr = bn_name.rpartition(".")
        setattr(subs[parent_name] if parent_name else folded, attr, stand_in)
        done += 1
    if not done:
        return module, 0
    if not _same(_outputs(module, example, keep), _outputs(folded, example, keep)):
        return module, 0
    return folded, done
