"""Process-wide settings featx makes, in one visible place.

featx changes one thing outside its own objects: before the first CPU
forward pass it asks glibc to keep freed activation buffers
(:func:`featx._runtime.malloc.keep_cpu_buffers`, once per process; the user's
``MALLOC_*`` variables and ``FEATX_KEEP_CPU_BUFFERS=0`` are respected).
Settling (:func:`featx._runtime.settling.settle`) and the fine-tuner call
:func:`prepare` and nothing else does; the schedule key reads the outcome
from here.
"""

from __future__ import annotations

import torch

from .malloc import TOP_PAD, TRIM_THRESHOLD, keep_cpu_buffers

__all__ = ["prepare", "allocator_setting"]


def prepare(device: torch.device) -> None:
    """Apply featx's process-wide settings for computing on ``device`` (idempotent, thread-safe)."""
    if device.type == "cpu":
        keep_cpu_buffers()


def allocator_setting() -> str:
    """The C allocator's setting as it bears on CPU speed (part of the schedule key); applies it if not yet."""
    return f"buffers-kept{TRIM_THRESHOLD >> 20}M-pad{TOP_PAD >> 20}M" if keep_cpu_buffers() else "buffers-default"
