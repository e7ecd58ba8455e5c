"""``in_chans``: a pretrained backbone's first convolution adapted to another number of input channels.

As timm does for its own models (``timm.models.adapt_input_conv``): for one
channel the pretrained RGB filters are summed; for more than three they are
repeated (channel ``i`` gets the filter of RGB channel ``i % 3``) and scaled
by ``3 / in_chans``, so an input whose bands look alike gives activations of
the usual size. The normalisation follows the filters: channel ``i`` is
normalised with the mean and std of RGB channel ``i % 3``, and one channel
with the averages of the three.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

from .._exceptions import ParameterError, arg
from .weights import Backbone

__all__ = ["adapt_stem", "channel_stats", "first_conv", "input_channels"]

#: The attribute an adapted module carries: how many channels its input has (3 when absent).
CHANNELS_ATTR = "featx_in_chans"


def input_channels(module: nn.Module) -> int:
    """The number of input channels ``module`` reads (example inputs for probes, exports and checks)."""
    return int(getattr(module, CHANNELS_ATTR, 3))


def first_conv(module: nn.Module) -> tuple[str, nn.Conv2d] | None:
    """The first registered ``nn.Conv2d`` reading three channels (the stem), as ``(name, conv)``."""
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Conv2d) and sub.in_channels == 3 and sub.groups == 1:
            return name, sub
    return None


def channel_stats(values: tuple[float, ...], in_chans: int) -> tuple[float, ...]:
    """RGB normalisation statistics spread over ``in_chans`` channels the way the filters are."""
    values = tuple(float(v) for v in values)
    if in_chans == len(values):
        return values
    if in_chans == 1:
        return (sum(values) / len(values),)
    return tuple(values[i % len(values)] for i in range(in_chans))


def adapt_stem(backbone: Backbone, in_chans: int) -> Backbone:
    """A copy of ``backbone`` whose stem reads ``in_chans`` channels (refused where it cannot be adapted)."""
    from timm.models import adapt_input_conv

    module = copy.deepcopy(backbone.module)
    if getattr(module, "transform_input", False):  # Inception-v3 / GoogLeNet re-normalise R, G and B themselves
        raise ParameterError(
            f"{arg('in_chans', in_chans)} cannot be used with {backbone.identity}: its pretrained network "
            "re-normalises the R, G and B channels itself (transform_input=True) before its first convolution. "
            "Use another backbone for non-RGB input.", "in_chans")
    found = first_conv(module)
    if found is None:
        raise ParameterError(
            f"{arg('in_chans', in_chans)}: {backbone.identity} has no convolution reading 3 channels to adapt "
            "(featx adapts the first nn.Conv2d, as timm's adapt_input_conv does). Use a backbone with a "
            "convolutional stem or patch embedding.", "in_chans")
    name, conv = found
    with torch.no_grad():
        weight = adapt_input_conv(in_chans, conv.weight.detach().clone())
    conv.weight = nn.Parameter(weight.to(conv.weight.dtype), requires_grad=False)
    conv.in_channels = in_chans
    for sub in module.modules():  # Hugging Face patch embeddings check the channel count they were built for
        if getattr(sub, "num_channels", None) == 3 and isinstance(getattr(sub, "projection", None), nn.Conv2d):
            sub.num_channels = in_chans
    setattr(module, CHANNELS_ATTR, in_chans)
    _check_forward(module, backbone, in_chans, name)
    prep = dict(backbone.preprocess)
    prep["mean"], prep["std"] = channel_stats(prep["mean"], in_chans), channel_stats(prep["std"], in_chans)
    return dataclasses.replace(backbone, module=module, preprocess=prep, probes={}, digest="", shared=False)


def _check_forward(module: nn.Module, backbone: Backbone, in_chans: int, stem: str) -> None:
    """One forward pass: a network that uses its input before the stem (or has a second RGB path) fails here."""
    size = tuple(backbone.preprocess["input_size"])
    try:
        with torch.inference_mode():
            module.eval()(torch.zeros(1, in_chans, *size))
    except Exception as exc:  # noqa: BLE001 - any failure means the stem was not the only reader of the input
        raise ParameterError(
            f"{arg('in_chans', in_chans)}: {backbone.identity} still fails with its first convolution "
            f"({stem!r}) adapted ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "its input is read elsewhere too. Use another backbone for non-RGB input.", "in_chans") from exc
