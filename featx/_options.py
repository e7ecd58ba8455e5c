"""Option values shared by the estimators, the command line and the docs (torch-free, cheap to import)."""

from __future__ import annotations

__all__ = ["PRECISIONS", "POOLINGS", "TOKEN_POOLINGS"]

#: ``precision=`` values. "auto": bf16 on GPUs and on CPUs with native bf16, fp32 elsewhere.
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
#: ``pooling=`` values (see :mod:`featx._pooling`).
POOLINGS = ("avg", "max", "avgmax", "gem", "flatten", "cls", "cls+avg")
#: Poolings that need a class token (layers with token layout and at least one prefix token).
TOKEN_POOLINGS = ("cls", "cls+avg")
