"""Pickling helpers shared by featx's estimators: modules as CPU tensors, devices as strings."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ._runtime.device import load_device

__all__ = ["pack_state", "unpack_state"]


def pack_state(state: dict) -> dict:
    """An estimator's ``__dict__`` made portable: a user ``nn.Module`` as CPU tensors, ``device_`` and dtypes as strings.

    Strings rather than torch objects also keep the state loadable by
    ``skops.io`` (which rebuilds only plain values and trusted types).
    """
    dtypes = sorted(k for k, v in state.items() if isinstance(v, torch.dtype))
    for k in dtypes:
        state[k] = str(state[k]).removeprefix("torch.")
    if dtypes:
        state["_dtype_attrs"] = dtypes
    if isinstance(state.get("model"), nn.Module):
        state["model"] = _ModuleState(state["model"])
    if isinstance(state.get("device_"), torch.device):
        state["device_"] = str(state["device_"])
    return state


def unpack_state(state: dict) -> dict:
    """The reverse of :func:`pack_state` on this machine: a missing GPU becomes the CPU (with a warning)."""
    for k in state.pop("_dtype_attrs", ()):
        state[k] = getattr(torch, state[k])
    if isinstance(state.get("model"), _ModuleState):
        state["model"] = state["model"].module
    if isinstance(state.get("device_"), str):
        state["device_"] = load_device(state["device_"])
        if state["device_"].type != "cuda" and state.get("autocast_dtype_") == torch.float16:
            state["autocast_dtype_"] = None
    return state


class _ModuleState:
    """Pickles an ``nn.Module`` as a weight-less skeleton plus its tensors on the CPU.

    The tensors go through the state of every parameter and buffer (persistent
    or not), so a module on a GPU loads on a CPU-only machine.
    """

    def __init__(self, module: nn.Module):
        self.module = module

    def __reduce__(self):
        skeleton = copy.deepcopy(self.module).to("meta")
        tensors = {
            name: t.detach().cpu()
            for name, t in list(self.module.named_parameters()) + list(self.module.named_buffers())
        }
        return (_restore_module, (skeleton, tensors))


def _restore_module(skeleton: nn.Module, tensors: dict[str, torch.Tensor]) -> _ModuleState:
    module = skeleton.to_empty(device="cpu")
    with torch.no_grad():
        for name, value in tensors.items():
            owner, _, attr = name.rpartition(".")
            sub = module.get_submodule(owner) if owner else module
            target = getattr(sub, attr)
            target.copy_(value)
    return _ModuleState(module)
