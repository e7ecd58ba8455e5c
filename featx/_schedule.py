"""How an fp32 forward pass is scheduled on the CPU: one all-core stream or one single-threaded stream per core.

In bf16 the answer is always per-core streams (see :func:`featx._device.cpu_streams`).
In fp32 it depends on the model *and* the machine, measured side by side
(``benchmarks/bench_streams.py`` and interleaved runs, 2 cores, batch 4):

========================  ==================  =====================
per-core streams / one    AVX2, no bf16       AVX512 + AVX512_BF16
========================  ==================  =====================
efficientnet_lite0        1.16                1.31
resnet18                  1.09                1.16
resnet50                  1.18                0.75
convnext_tiny             --                  1.11
========================  ==================  =====================

No rule of thumb predicts resnet50 on the AVX-512 part, so featx measures it:
the first ``transform`` of at least :data:`TUNE_BATCHES` batches runs its
first batches alternately in both schedules (real work: every image counts),
keeps the faster for the rest, and remembers the choice, keyed by CPU
capability, thread count, torch version, model, weights, input size, batch
size and the layers computed, in ``schedules.json`` in the cache directory
(the default one when ``cache=None``), so later processes start with it.
The features do not depend on the schedule (within 1e-5).
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from pathlib import Path

import torch

from ._device import cpu_capability

__all__ = ["TUNE_BATCHES", "PHASE_BATCHES", "schedule_key", "recall", "remember"]

#: Batches in each alternating measurement phase (streams, one stream, streams, one stream).
PHASE_BATCHES = 4
#: A transform needs this many batches to measure; smaller ones run one all-core stream.
TUNE_BATCHES = 4 * PHASE_BATCHES

_LOCK = threading.Lock()
_KNOWN: dict[tuple[str, str], int] = {}  # (file, key) -> streams: what this process already read or decided
FILE_NAME = "schedules.json"


def schedule_key(model_id: str, weights_digest: str, input_size: tuple[int, int], batch_size: int,
                 threads: int, fields: list[str]) -> str:
    """Everything the faster schedule depends on, as one string."""
    c = cpu_capability()
    torch_mm = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    return "|".join([f"{c['isa']}-bf16{int(c['avx512_bf16'] or c['amx'])}", f"threads{threads}", f"torch{torch_mm}",
                     model_id, weights_digest, f"{input_size[0]}x{input_size[1]}", f"batch{batch_size}",
                     ",".join(fields)])


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def recall(directory: Path, key: str) -> int | None:
    """The stream count remembered for ``key``, or None if it was never measured."""
    path = directory / FILE_NAME
    with _LOCK:
        if (str(path), key) in _KNOWN:
            return _KNOWN[str(path), key]
    value = _read(path).get(key)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        with _LOCK:
            _KNOWN[str(path), key] = value
        return value
    return None


def remember(directory: Path, key: str, streams: int) -> None:
    """Record the measured choice; an unwritable directory only loses the memory, never the run."""
    path = directory / FILE_NAME
    with _LOCK:
        _KNOWN[str(path), key] = streams
        try:
            directory.mkdir(parents=True, exist_ok=True)
            data = _read(path)
            data[key] = streams
            fd, tmp = tempfile.mkstemp(prefix=FILE_NAME + ".", suffix=".tmp", dir=directory)
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, path)  # readers see the old file or the new one, never half of one
        except OSError:
            pass
