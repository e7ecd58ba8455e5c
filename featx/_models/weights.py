"""What a backbone is and where its weights come from: the ``Backbone`` record, local checkpoints, digests.

Shared by the builders (:mod:`featx._models.backbones`, :mod:`featx._models.open_clip`) and
free of them, so neither imports the other back.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .._exceptions import ModelLoadError
from .hub import OFFLINE_CHOICES

__all__ = ["Backbone", "CHECKPOINT_SUFFIXES", "OFFLINE_HINT", "download_message", "file_weights_id",
           "is_checkpoint_path", "load_checkpoint", "load_into", "weights_digest"]

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")

OFFLINE_HINT = "To work offline, " + OFFLINE_CHOICES


@dataclass
class Backbone:
    """A built backbone and what featx knows about it.

    ``stages`` lists the module names of the stage outputs (alias ``stageK`` is
    ``stages[K-1]``); None means "find them by probing". ``classifier`` is the
    module whose *input* is the ``pre_logits`` layer; None means "the last
    executed module, when it is a Linear".
    """

    module: nn.Module
    preprocess: dict[str, Any]
    identity: str
    weights: str | None
    stages: list[str] | None = None
    classifier: str | None = None
    digest: str = field(default="", repr=False)
    shared: bool = field(default=False, repr=False)
    code: str | None = None  # digest of a user module's source code
    #: probe results per input size (shapes and call counts do not depend on device or weights)
    probes: dict = field(default_factory=dict, repr=False)
    #: extra layer aliases -> module names (e.g. a CLIP tower's "embedding" -> "", its output)
    aliases: dict = field(default_factory=dict)


def is_checkpoint_path(weights: Any) -> bool:
    if isinstance(weights, os.PathLike):
        return True
    return isinstance(weights, str) and (
        weights.lower().endswith(CHECKPOINT_SUFFIXES) or os.sep in weights or "/" in weights
    )


def _state_dict_from(obj: Any, path: str) -> dict[str, torch.Tensor]:
    """Unwrap the usual checkpoint containers down to a name -> tensor mapping."""
    for key in ("state_dict", "model_state_dict", "model", "state_dict_ema"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelLoadError(
            f"checkpoint {path!r} does not hold a state_dict (a mapping of names to tensors). "
            "Save it with torch.save(model.state_dict(), path) or safetensors."
        )
    sd = {k.removeprefix("module."): v for k, v in obj.items()}
    return sd


def load_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a state_dict from ``.pt``/``.pth``/``.bin`` (``weights_only=True``) or ``.safetensors``.

    Never unpickles arbitrary objects: a file that needs more than tensors and
    plain containers is refused.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelLoadError(f"weights file {path!r} does not exist (or is not a file).")
    if path.lower().endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except Exception as exc:  # safetensors raises its own SafetensorError
            raise ModelLoadError(f"cannot read safetensors file {path!r}: {exc}") from exc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle.UnpicklingError, RuntimeError, EOFError, ...
        raise ModelLoadError(
            f"cannot load checkpoint {path!r} safely: {type(exc).__name__}: {str(exc).splitlines()[0]}. "
            "featx only loads tensors (torch.load(..., weights_only=True)) and never runs code from a "
            "checkpoint; re-save it as a plain state_dict or as .safetensors."
        ) from exc
    return _state_dict_from(obj, path)


def load_into(module: nn.Module, sd: dict[str, torch.Tensor], source: str, by_position: bool = False) -> None:
    """Load ``sd`` into ``module`` strictly, naming the first mismatch."""
    target = module.state_dict()
    if by_position:
        if len(sd) != len(target):
            raise ModelLoadError(
                f"{source} holds {len(sd)} tensors but the architecture expects {len(target)}."
            )
        mapped = {}
        for (src_name, tensor), (dst_name, ref) in zip(sd.items(), target.items()):
            if tuple(tensor.shape) != tuple(ref.shape):
                raise ModelLoadError(
                    f"{source}: tensor {src_name!r} has shape {tuple(tensor.shape)} but its position "
                    f"maps to {dst_name!r} of shape {tuple(ref.shape)}."
                )
            mapped[dst_name] = tensor
        sd = mapped
    missing = [k for k in target if k not in sd]
    unexpected = [k for k in sd if k not in target]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s), first {missing[0]!r}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensor(s), first {unexpected[0]!r}")
        raise ModelLoadError(f"{source} does not fit the architecture: {'; '.join(parts)}.")
    for name, ref in target.items():
        if tuple(sd[name].shape) != tuple(ref.shape):
            raise ModelLoadError(
                f"{source} does not fit the architecture: tensor {name!r} has shape "
                f"{tuple(sd[name].shape)}, expected {tuple(ref.shape)}."
            )
    for name, tensor in sd.items():  # a diverged training run's checkpoint: every feature would be NaN
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise ModelLoadError(
                f"{source}: tensor {name!r} holds {bad} NaN or infinite value(s) of {tensor.numel()}; every "
                "feature computed with it would be NaN. Use a checkpoint saved before training diverged."
            )
    module.load_state_dict(sd, strict=True)


def file_weights_id(path: Any) -> str:
    """The provenance of weights loaded from a local file: ``file:<absolute path>``."""
    return f"file:{os.path.abspath(os.fspath(path))}"


def download_message(what: str, exc: BaseException) -> str:
    first = str(exc).splitlines()[0] if str(exc) else ""
    return (
        f"could not get the pretrained weights of {what}: they are not in the local cache and "
        f"downloading them failed ({type(exc).__name__}: {first}). {OFFLINE_HINT}"
    )


def weights_digest(module: nn.Module) -> str:
    """A content digest of every parameter and buffer (names, shapes, dtypes, values)."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
