"""Frozen networks on their device, built once per process and shared by every extractor that needs them.

A fitted extractor needs its backbone on a device, in ``channels_last``, and
in bf16/fp16 with its BatchNorms folded (:mod:`featx._models.fold`, whose check
runs a forward pass). All of that is a function of the weights, the device,
the precision and (for folding) the layers that are read, so it is done once
per process for each such combination and the inference-only module is
shared: ``GridSearchCV``'s 91 fits of one backbone copy and fold it once,
not 91 times. Nothing mutates a shared network: each runner registers its
own forward hooks (removed when the runner is collected) and keeps its
per-call state per thread (:class:`featx._models.layers.LayerCapture`), so
extractors with different layers may run one network in several threads at
once.

The registry is a documented cache of at most :data:`MAX_NETWORKS` entries
(least recently used evicted); :func:`clear` empties it.
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from .._models.fold import fold_batchnorm, folds
from .._models.stem import input_channels
from .._models.weights import Backbone

__all__ = ["Network", "frozen_network", "clear", "MAX_NETWORKS"]

#: Networks kept per process (each as large as its weights).
MAX_NETWORKS = 4

_LOCK = threading.RLock()
_NETWORKS: "OrderedDict[tuple, Network]" = OrderedDict()


@dataclass(frozen=True)
class Network:
    """An inference-only module on its device (do not mutate it), and how many BatchNorms were folded."""

    module: nn.Module
    folded: int
    template: Backbone  # held so that the key's id() stays this template's while the entry lives


def place(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` on ``device`` in ``channels_last``, in ``eval()`` mode (in place).

    channels_last is faster for convolutions on CUDA and on x86 CPUs (oneDNN).
    """
    return module.to(device).to(memory_format=torch.channels_last).eval()


def _example(input_size: tuple[int, int], device: torch.device, channels: int) -> torch.Tensor:
    """One fixed random input batch of the model's size (checks a folded backbone against the original)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, channels, *input_size, generator=g)
    return x.to(device).contiguous(memory_format=torch.channels_last)


def _build(template: Backbone, device: torch.device, dtype: torch.dtype | None, keep: frozenset[str],
           input_size: tuple[int, int]) -> Network:
    # a shared template stays on the CPU for every other user of it: the network is a copy
    module = copy.deepcopy(template.module) if template.shared else template.module
    module = place(module, device)
    folded = 0
    if folds(dtype):
        module, folded = fold_batchnorm(module, _example(input_size, device, input_channels(module)), keep)
    return Network(module, folded, template)


def frozen_network(template: Backbone, device: torch.device, dtype: torch.dtype | None, keep: frozenset[str],
                   input_size: tuple[int, int]) -> Network:
    """The network for ``template`` on ``device`` in ``dtype``; ``keep``: the modules whose outputs are read.

    A template shared within the process (a named model) gives a network
    shared within the process; a private one (a user's ``nn.Module``,
    already copied by :func:`featx._models.backbones.get_template`) is placed and
    folded as it is, for its one extractor.
    """
    if not template.shared:
        return _build(template, device, dtype, keep, input_size)
    fold = folds(dtype)
    key = (id(template), template.digest, str(device), str(dtype), keep if fold else None,
           tuple(input_size) if fold else None)
    with _LOCK:  # two threads fitting the same extractor build it once
        net = _NETWORKS.get(key)
        if net is None:
            net = _NETWORKS[key] = _build(template, device, dtype, keep, input_size)
            while len(_NETWORKS) > MAX_NETWORKS:
                _NETWORKS.popitem(last=False)
        _NETWORKS.move_to_end(key)
        return net


def clear() -> None:
    """Forget every shared network (the next extractor builds its own again)."""
    with _LOCK:
        _NETWORKS.clear()
