"""Device and precision resolution: the one place featx decides where and how it computes."""

from __future__ import annotations

import contextlib
import warnings

import torch

from ._exceptions import DeviceWarning

__all__ = ["resolve_device", "resolve_precision", "autocast", "load_device"]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(device: str | torch.device) -> torch.device:
    """Turn a ``device`` parameter into a :class:`torch.device`.

    ``"auto"`` picks CUDA, then MPS, then the CPU. An explicit device that this
    machine lacks is an error, never a silent fallback.
    """
    if isinstance(device, torch.device):
        dev = device
    elif isinstance(device, str):
        if device == "auto":
            if torch.cuda.is_available():
                return torch.device("cuda")
            if _mps_available():
                return torch.device("mps")
            return torch.device("cpu")
        try:
            dev = torch.device(device)
        except RuntimeError as exc:
            raise ValueError(
                f"device={device!r} is not a valid device. Use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'."
            ) from exc
    else:
        raise ValueError(f"device={device!r} is invalid. Use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'.")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device={str(dev)!r} was requested but CUDA is not available on this machine. "
                "Use device='auto' (picks CUDA when present, else the CPU) or device='cpu'."
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device={str(dev)!r} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)."
            )
    if dev.type == "mps" and not _mps_available():
        raise ValueError(
            "device='mps' was requested but MPS is not available. Use device='auto' or device='cpu'."
        )
    return dev


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Return the autocast dtype for ``precision`` on ``device``, or None for plain fp32.

    ``"auto"`` is bf16 on CUDA devices that support it, fp16 on older CUDA
    devices, and fp32 elsewhere (CPU autocast is slower than fp32 on most CPUs
    and changes the numbers).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is invalid. It must be one of {list(PRECISIONS)}.")
    if precision == "fp32":
        return None
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision == "fp16" and device.type == "cpu":
        raise ValueError("precision='fp16' is not supported on the CPU. Use 'fp32' or 'bf16'.")
    return torch.bfloat16 if precision == "bf16" else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Context manager: autocast to ``dtype`` on ``device``, or nothing when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def load_device(device_str: str) -> torch.device:
    """Device for an object unpickled on this machine: falls back to the CPU with a warning."""
    dev = torch.device(device_str)
    if dev.type == "cuda" and not torch.cuda.is_available():
        warnings.warn(
            f"this extractor was fitted on {device_str!r}, which this machine lacks; it will run on the CPU.",
            DeviceWarning,
            stacklevel=3,
        )
        return torch.device("cpu")
    if dev.type == "mps" and not _mps_available():
        warnings.warn(
            f"this extractor was fitted on {device_str!r}, which this machine lacks; it will run on the CPU.",
            DeviceWarning,
            stacklevel=3,
        )
        return torch.device("cpu")
    return dev
