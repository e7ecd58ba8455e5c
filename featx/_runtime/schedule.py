"""How an fp32 forward pass is scheduled on the CPU: one all-core stream or one single-threaded stream per core.

In bf16 the answer is always per-core streams (see :func:`featx._runtime.device.cpu_streams`).
In fp32 which one is faster depends on the model, the machine *and* the C
allocator (``benchmarks/bench_streams.py`` measures them side by side; the
figures are on the Performance page of the docs), and random weights are not
neutral in fp32. With glibc's defaults a process that had not yet freed a
large block paid a page fault per 4 KiB of activations at every batch, which
hurt one all-core stream more than per-core streams; featx now keeps the
buffers (:mod:`featx._runtime.malloc`) and the key says so, so measurements
taken before do not decide for the setting of now.

No rule of thumb predicts these, so featx measures them:
a ``transform`` of at least :data:`TUNE_BATCHES` batches runs its first
batches alternately in both schedules (real work: every image counts) and
keeps the faster for the rest. Each measurement is a vote, kept in
``schedules.json`` in the cache directory (the default one when
``cache=None``), keyed by CPU capability, thread count, torch version,
allocator setting, model, weights, input size, batch size and the layers
computed. Once :data:`VOTES` measurements agree by majority, later
extractors and processes start with the winner and stop measuring: on a
shared machine one measurement can be swayed by a neighbour, three rarely
are. The features do not depend on the schedule (within 1e-5).

A :class:`Schedule` is one extractor's view of this: settled in ``fit``,
shared with its runner, which measures and reports; the extractor's
``streams_`` reads it.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from pathlib import Path

import torch

from .device import cpu_capability
from .process import allocator_setting

__all__ = ["TUNE_BATCHES", "PHASE_BATCHES", "VOTES", "Schedule", "schedule_key", "recall", "remember"]

#: Batches in each alternating measurement phase (streams, one stream, streams, one stream).
PHASE_BATCHES = 4
#: A transform needs this many batches to measure; smaller ones run one all-core stream.
TUNE_BATCHES = 4 * PHASE_BATCHES
#: Measurements kept per key; their majority is the remembered choice once there are this many.
VOTES = 3

_LOCK = threading.Lock()
_KNOWN: dict[tuple[str, str], int] = {}  # (file, key) -> streams: decided choices this process already read
FILE_NAME = "schedules.json"


def schedule_key(model_id: str, weights_digest: str, input_size: tuple[int, int], batch_size: int,
                 threads: int, fields: list[str]) -> str:
    """Everything the faster schedule depends on, as one string.

    The machine's part is read here: the CPU's capability, the torch version
    and whether the C allocator keeps freed activations
    (:func:`featx._runtime.process.allocator_setting`, which applies it if it was not
    yet; it changes the answer: lite0 fp32 preferred per-core streams without
    it, one stream with it). ``decode-grouped``: the one-stream design decodes
    groups of batches between forward passes (:func:`featx._runtime.loading.batches`),
    which made it faster; votes taken before do not decide.
    """
    c = cpu_capability()
    torch_mm = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    buffers = allocator_setting()
    return "|".join([f"{c['isa']}-bf16{int(c['avx512_bf16'] or c['amx'])}", f"threads{threads}", f"torch{torch_mm}",
                     buffers, "decode-grouped", model_id, weights_digest, f"{input_size[0]}x{input_size[1]}",
                     f"batch{batch_size}", ",".join(fields)])


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _votes(value) -> list[int]:
    if not isinstance(value, list):
        return []
    return [v for v in value if isinstance(v, int) and not isinstance(v, bool) and v >= 1][-VOTES:]


def recall(directory: Path, key: str) -> int | None:
    """The majority of the last :data:`VOTES` measurements for ``key``; None while there are fewer."""
    path = directory / FILE_NAME
    with _LOCK:
        if (str(path), key) in _KNOWN:
            return _KNOWN[str(path), key]
    votes = _votes(_read(path).get(key))
    if len(votes) < VOTES:
        return None
    winner = max(set(votes), key=votes.count)
    with _LOCK:
        _KNOWN[str(path), key] = winner
    return winner


def remember(directory: Path, key: str, streams: int) -> None:
    """Add one measurement's winner; an unwritable directory only loses the memory, never the run."""
    path = directory / FILE_NAME
    with _LOCK:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            data = _read(path)
            data[key] = (_votes(data.get(key)) + [streams])[-VOTES:]
            fd, tmp = tempfile.mkstemp(prefix=FILE_NAME + ".", suffix=".tmp", dir=directory)
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, path)  # readers see the old file or the new one, never half of one
        except OSError:
            pass


class Schedule:
    """How many CPU streams one fitted extractor runs: fixed, or recalled, measured and remembered.

    Settled once per ``fit`` (:func:`featx._runtime.settling.settle`). ``fixed`` is the
    count where there is nothing to choose (bf16 streams, GPUs, other
    backends). Otherwise ``candidates`` streams are weighed against one:
    :attr:`streams` is the decision remembered in ``directory`` under ``key``
    (by majority of :data:`VOTES` measurements), or 1 while undecided, and
    :meth:`pending` says how many streams a run should measure. The runner
    measures and reports the winner in its stats; :meth:`record` keeps it for
    this extractor and adds it to the votes. The object is shared by the
    extractor and its runner, so ``streams_`` reads what the runner used.
    """

    def __init__(self, fixed: int = 1, *, candidates: int = 1, directory: Path | None = None, key: str | None = None):
        self.fixed, self.candidates, self.directory, self.key = fixed, candidates, directory, key
        self._decided: int | None = fixed if candidates <= 1 else None
        self._lock = threading.Lock()

    def _recall(self) -> int | None:
        with self._lock:
            if self._decided is None and self.directory is not None and self.key is not None:
                self._decided = recall(self.directory, self.key)
            return self._decided

    @property
    def streams(self) -> int:
        """The stream count to run with now (1 while an fp32 choice is undecided)."""
        decided = self._recall()
        return 1 if decided is None else decided

    def pending(self) -> int:
        """The candidate stream count to measure against one, or 0 when decided (other extractors may have)."""
        return 0 if self._recall() is not None else self.candidates

    def record(self, streams: int, *, remember_it: bool = True) -> None:
        """Keep a measured winner for this extractor; add it to the remembered votes unless ``remember_it`` is False."""
        with self._lock:
            self._decided = int(streams)
        if remember_it and self.directory is not None and self.key is not None:
            remember(self.directory, self.key, int(streams))

    def __repr__(self) -> str:
        return f"Schedule(streams={self.streams}, candidates={self.candidates}, decided={self._decided is not None})"
