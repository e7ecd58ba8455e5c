"""Option values shared by the estimators, the command line and the docs (torch-free, cheap to import)."""

from __future__ import annotations

__all__ = ["PRECISIONS"]

#: ``precision=`` values. "auto": bf16 on GPUs and on CPUs with native bf16, fp32 elsewhere.
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
