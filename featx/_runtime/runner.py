"""The transform engine: DataLoader -> device -> truncated forward -> pooled fields -> output rows (and cache).

A *field* is one layer's output under one elementary pooling, e.g.
``output:layer4|avg`` or ``input:fc|vec`` (the input of the classifier, i.e.
``pre_logits``). The output matrix is the requested fields side by side; the
cache stores fields, so ``catavgmax`` reuses ``avg`` and ``max``, and the same
layer reached by name or by alias shares entries.

The engine takes plain values (a shared :class:`~featx._runtime.network.Network`, a
:class:`Plan`, :class:`RunSettings` and a :class:`~featx._runtime.schedule.Schedule`,
all settled by :func:`featx._runtime.settling.settle`) and returns a :class:`RunStats`
record per run; it never sees the estimator and writes no files of its own.
"""

from __future__ import annotations

import functools
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import Subset

from .device import autocast
from .compiled import CompiledEngine
from .keys import item_keys
from .quantized import QuantizedEngine
from .engines import build_engine
from .._exceptions import DeviceWarning
from .._models.layers import PRE_LOGITS, LayerCapture, Probe, Target, resolve_layers
from .loading import batches, loader_workers, ordered_streams
from .network import Network
from .._models.pooling import layer_parts, part_width, pool_parts, pooling_error
from .._images.bands import load_bands
from .._images.preprocess import ImageDataset, Items, collate, load_error, normalize_batch
from .schedule import PHASE_BATCHES, TUNE_BATCHES, Schedule

#: Batches per segment of eager streams while a compiled package may appear: between segments the runner
#: looks for it and, once it is there, runs the rest of the run as one stream with it.
SEGMENT_BATCHES = 16

__all__ = ["Plan", "RunSettings", "Runner", "RunStats", "cached_run"]


@dataclass
class Plan:
    """What a fitted extractor computes, as fields."""

    targets: list[Target]
    parts: list[tuple[str, ...]]
    all_targets: list[Target]  # requested + every stage + pre_logits: what a cached run stores
    all_parts: list[tuple[str, ...]]
    gem_p: float
    out_fields: list[str]
    widths: dict[str, int]

    def fields(self, store_all: bool) -> list[str]:
        """The fields a run computes: the requested ones, or (``store_all``, a cached run) every stored one."""
        targets, parts = (self.all_targets, self.all_parts) if store_all else (self.targets, self.parts)
        return [self.field(t, p) for t, ps in zip(targets, parts) for p in ps]

    def field(self, t: Target, part: str) -> str:
        name = f"gem:{self.gem_p!r}" if part == "gem" else part
        # featx < 0.2 pooled (H, W, C) maps over the wrong axes and token sequences with their class
        # token: the layout goes into those fields' names, so no such cache entry is ever read back
        if t.layout == "nhwc":
            name += "@nhwc"
        elif t.layout == "tokens" and t.prefix and part not in ("cls", "flatten"):
            name += f"@patch{t.prefix}"
        return f"{t.kind}:{t.module}|{name}"

    @classmethod
    def build(cls, targets: list[Target], pr: Probe, pooling: str, gem_p: float) -> "Plan":
        def parts_of(t: Target, wanted: list[str], stored: bool = False) -> tuple[str, ...]:
            if len(t.shape) == 1:
                return layer_parts(t.shape, ())
            if stored and t.layout == "tokens" and t.prefix:
                wanted = [*wanted, "cls"]  # a later pooling="cls" or "cls+avg" then hits the cache too
            return tuple(p for p in dict.fromkeys(wanted)
                         if not pooling_error(p, t.display, t.shape, t.layout, t.prefix))

        req = pool_parts(pooling)
        parts = [parts_of(t, req) for t in targets]
        # stored besides the request: the pooling menu's elementary parts (gem at this extractor's gem_p), so
        # a grid over poolings costs one backbone pass per image
        extra_parts = [p for p in ["avg", "max", "avgmax", "gem", *req] if p != "flatten"]
        all_targets = list(targets)
        all_parts = [parts_of(t, [*req, "avg", "max", "avgmax", "gem"], stored=True) for t in targets]
        seen = {(t.module, t.kind) for t in targets}
        names = [f"stage{i + 1}" for i in range(len(pr.stages))]
        names += [f"block{i + 1}" for i in range(len(pr.blocks))]
        for name in names + [PRE_LOGITS]:
            t = resolve_layers([name], pr)[0]
            if (t.module, t.kind) not in seen:
                seen.add((t.module, t.kind))
                all_targets.append(t)
                all_parts.append(parts_of(t, extra_parts, stored=True))
        plan = cls(targets, parts, all_targets, all_parts, gem_p, [], {})
        for t, ps in zip(all_targets, all_parts):
            for p in ps:
                plan.widths[plan.field(t, p)] = part_width(t.shape, p, t.layout)
        plan.out_fields = [plan.field(t, p) for t, ps in zip(targets, parts) for p in ps]
        return plan



@dataclass(frozen=True)
class RunSettings:
    """How a fitted extractor runs, settled once in ``fit``."""

    batch_size: int
    num_workers: Any  # the parameter: an int or "auto" (see featx._runtime.loading.loader_workers)
    on_error: str = "raise"
    backend: str = "torch"
    onnx_file: Path | None = None  # where the ONNX graph lives (backend "onnxruntime")
    threads: int = 1  # intra-op threads of ONNX Runtime
    gpu_decode: bool = False
    tta: str | None = None
    store_all: bool = False  # compute every stored field (a cached run), not only the requested ones
    compiled_file: Path | None = None  # where the compiled package lives (backend "torch.compile" on the CPU)
    compile_params: dict | None = None  # the extractor's parameters: what the compiling process rebuilds
    compile_after: float = 0.0  # eager seconds before the package is compiled (featx._runtime.compiled.compile_after_s)
    judge_compiled: bool = False  # backend="auto": keep the package only if it was timed faster than eager


@dataclass
class RunStats:
    """What one ``transform`` did: returned by the engine, kept by the extractor as ``last_run_``."""

    images: int = 0
    computed: int = 0  # images that went through the backbone
    cache_hits: int = 0
    duplicates: int = 0  # same content twice in one call: computed once
    streams: int = 1  # forward passes side by side (after the fp32 schedule was measured, the winner)
    failed: list = field(default_factory=list)  # (index, reason) of the items that could not be read
    measured: int | None = None  # the stream count this run measured as faster (None: it measured nothing)


class Runner:
    """One fitted extractor's capture and engine on a shared frozen network.

    The engine (eager, compiled or ONNX Runtime) is built here, so ``backend``
    is the backend that runs, ``"torch"`` after a fallback. The hooks and the
    per-call state are the runner's own; the network is not mutated. The
    out-of-memory split (``max_chunk``) is what a runner learns while it runs;
    the CPU stream count is read from ``schedule`` at each run, and a
    measurement is reported in the run's stats (``measured``), not kept here.
    """

    def __init__(self, network: Network, plan: Plan, device: torch.device, dtype: torch.dtype | None, cfg: dict,
                 settings: RunSettings, schedule: Schedule | None = None):
        self.module, self.folded = network.module, network.folded  # folded: BatchNorms folded into convolutions
        self.plan, self.device, self.dtype, self.cfg, self.settings = plan, device, dtype, cfg, settings
        self.schedule = schedule if schedule is not None else Schedule()
        self.max_chunk: int | None = None  # set after an out-of-memory error
        self.mean = torch.tensor(cfg["mean"], device=device).view(1, -1, 1, 1)  # one per input channel
        self.std = torch.tensor(cfg["std"], device=device).view(1, -1, 1, 1)
        targets, parts = (plan.all_targets, plan.all_parts) if settings.store_all else (plan.targets, plan.parts)
        self.capture = LayerCapture(self.module, targets, parts, plan.gem_p)
        self.fields = plan.fields(settings.store_all)
        compiled = _compiled_engine(self.capture, settings, device, dtype, cfg, self.mean, self.std)
        if compiled is not None:
            self.backend, self.engine = settings.backend, compiled
        else:
            self.backend, self.engine = build_engine(settings.backend, self.capture, onnx_file=settings.onnx_file,
                                                     input_size=tuple(cfg["input_size"]), threads=settings.threads)

    def forward(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """Fields of one decoded batch.

        A short batch (the last of a run, or of a run's cache misses) is padded
        to the full batch size with copies of its last image: kernels may
        round differently for another batch size (seen: 3e-8 in fp32 on the
        CPU), and an image's features must not depend on how many images
        happened to be computed with it, so a cached row equals an uncached one
        exactly. On an out-of-memory error the batch is run in halves
        (recursively, down to one image), and later batches are split the
        same way.
        """
        views = batch.shape[1] if batch.ndim == 5 else 0  # N x V x C x H x W: test-time augmentation
        x = batch.to(self.device, non_blocking=True)
        if views:
            x = x.flatten(0, 1)
        rows, full = x.shape[0], self.settings.batch_size * max(views, 1)
        if 0 < rows < full and not self.max_chunk:
            x = torch.cat([x, x[-1:].expand(full - rows, *x.shape[1:])])
        if not getattr(self.engine, "takes_pixels", False):  # the int8 package normalises its pixels itself
            x = normalize_batch(x, self.mean, self.std)
        if self.backend != "onnxruntime":
            x = x.contiguous(memory_format=torch.channels_last)
        step = self.max_chunk or x.shape[0]
        chunks = []
        for start in range(0, x.shape[0], step):
            chunks.append(self._forward_chunk(x[start:start + step]))
        out = {f: (torch.cat([c[f] for c in chunks]) if len(chunks) > 1 else chunks[0][f])[:rows] for f in self.fields}
        if views:  # features averaged over each image's views
            out = {f: v.float().view(-1, views, v.shape[-1]).mean(1) for f, v in out.items()}
        return out

    def _forward_chunk(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        try:
            with autocast(self.device, self.dtype):
                results = self.engine(x)
        except torch.OutOfMemoryError:
            if x.shape[0] == 1:
                raise
            half = x.shape[0] // 2
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if self.max_chunk is None or half < self.max_chunk:
                warnings.warn(
                    f"out of memory on {self.device} with {x.shape[0]} images per forward pass; "
                    f"retrying with {half}. Pass a smaller batch_size to avoid the retries.",
                    DeviceWarning,
                    stacklevel=4,
                )
                self.max_chunk = half
            a, b = self._forward_chunk(x[:half]), self._forward_chunk(x[half:])
            return {f: torch.cat([a[f], b[f]]) for f in a}
        cap = self.capture
        return {self.plan.field(t, p): r[p] for t, ps, r in zip(cap.targets, cap.parts, results) for p in ps}

    def run(self, items: Items, indices: np.ndarray, out: np.ndarray, *, progress: bool = False,
            sink: Callable[[np.ndarray, dict[str, np.ndarray]], None] | None = None) -> RunStats:
        """Fill ``out[indices]``; hand each finished batch's fields to ``sink`` (the cache) at once.

        With ``on_error="raise"`` a bad item raises :class:`ImageLoadError`
        after the good items of its batch have been computed and handed to
        ``sink``, so no work is lost. With ``"nan"`` its row is NaN and it is
        listed in the returned stats' ``failed``.
        """
        stats = RunStats(images=len(indices), streams=self.schedule.streams)
        begin = getattr(self.engine, "begin_run", None)
        if begin is not None:
            begin(len(indices))  # a compiled package's engine: how much eager work this run still holds
        channels = len(self.cfg["mean"])  # in_chans: 3 unless the stem was adapted
        dataset = ImageDataset(items, indices, self.cfg, self.device if self.settings.gpu_decode else None,
                               self.settings.tta,
                               loader=None if channels == 3 else functools.partial(load_bands, channels=channels))
        bar = _progress_bar(len(indices)) if progress else None
        try:
            for idx, fields, errors in self._computed(dataset, stats):
                if fields is not None:
                    stats.computed += self._write(idx.numpy(), fields, out, sink)
                if errors and self.settings.on_error == "raise":
                    raise load_error(items, errors)
                for i, _ in errors:
                    out[i] = np.nan
                stats.failed.extend(errors)
                if bar is not None:
                    bar.update(len(idx) + len(errors))
        finally:
            if bar is not None:
                bar.close()
            finished = getattr(self.engine, "finished_run", None)
            if finished is not None:
                finished()  # an engine that builds itself between runs (the compiled package)
        return stats

    def _write(self, rows: np.ndarray, fields: dict[str, torch.Tensor], out: np.ndarray, sink) -> int:
        """One computed batch into ``out`` (and ``sink``); returns its number of rows."""
        cols = [fields[f] for f in self.plan.out_fields]
        out[rows] = (torch.cat(cols, 1) if len(cols) > 1 else cols[0]).float().cpu().numpy()
        if sink is not None:
            sink(rows, {f: v.float().cpu().numpy() for f, v in fields.items()})
        return len(rows)

    def _computed(self, dataset: ImageDataset, stats: RunStats):
        """``(indices, fields or None, errors)`` per batch, in order.

        With several CPU streams, each stream decodes and computes whole
        batches (single-threaded); otherwise batches are decoded (see
        :func:`featx._runtime.loading.batches`) and computed here, one after the other.
        An fp32 schedule not yet decided (``schedule.pending()``) is measured
        on the first :data:`~featx._runtime.schedule.TUNE_BATCHES` batches, if there
        are that many; the winner runs the rest and is reported in
        ``stats.measured`` (and ``stats.streams``).
        """
        n_jobs = -(-len(dataset) // self.settings.batch_size)
        start = 0
        poll = getattr(self.engine, "poll", None)  # a compiled package that may appear (it runs as one stream)
        if poll is not None and poll():
            stats.streams = 1
            yield from self._jobs(dataset, 0, n_jobs, 1)
            return
        candidates = self.schedule.pending()  # other extractors or processes may have decided it
        streams = self.schedule.streams
        try:
            if poll is not None:
                self.engine.hold = True  # eager streams: the package is taken up between segments, not inside
            if candidates > 1 and n_jobs >= TUNE_BATCHES:
                streams = yield from self._measured(dataset, candidates)
                stats.measured, start = streams, TUNE_BATCHES
            stats.streams = streams
            if poll is None or streams == 1:
                if poll is not None:
                    self.engine.hold = False  # one stream: the engine switches itself, between batches
                yield from self._jobs(dataset, start, n_jobs, streams)
                return
            while start < n_jobs:
                if poll():  # the package is ready: the rest of the run is one stream with it
                    self.engine.hold = False
                    yield from self._jobs(dataset, start, n_jobs, 1)
                    return
                hi = min(n_jobs, start + SEGMENT_BATCHES)
                yield from self._jobs(dataset, start, hi, streams)
                start = hi
        finally:
            if poll is not None:
                self.engine.hold = False

    def _measured(self, dataset: ImageDataset, candidates: int):
        """Run the first batches alternately with ``candidates`` streams and one; return the faster count.

        Each schedule is judged by its fastest phase: a schedule's first phase
        pays its kernels' first-use setup, and a phase can be slowed by a
        neighbour on a shared machine; neither says which schedule is faster.
        """
        seconds: dict[int, list[float]] = {candidates: [], 1: []}
        for phase in range(TUNE_BATCHES // PHASE_BATCHES):
            streams = candidates if phase % 2 == 0 else 1
            lo = phase * PHASE_BATCHES
            t0 = time.perf_counter()
            yield from self._jobs(dataset, lo, lo + PHASE_BATCHES, streams)
            seconds[streams].append(time.perf_counter() - t0)
        return candidates if min(seconds[candidates]) < min(seconds[1]) else 1

    def _jobs(self, dataset: ImageDataset, lo: int, hi: int, streams: int):
        """Batches ``lo`` to ``hi - 1`` with ``streams`` single-threaded streams, or decoded by
        :func:`featx._runtime.loading.batches` and computed here, one after the other."""
        size, n = self.settings.batch_size, len(dataset)
        if streams > 1 and hi - lo > 1:
            def job(k: int):
                k += lo
                idx, batch, errors = collate([dataset[j] for j in range(k * size, min((k + 1) * size, n))])
                return idx, None if batch is None else self.forward(batch), errors

            yield from ordered_streams(hi - lo, job, streams)
            return
        part = dataset if lo == 0 and hi * size >= n else Subset(dataset, range(lo * size, min(hi * size, n)))
        workers = loader_workers(len(part), size, self.settings.num_workers, self.device, self.settings.gpu_decode)
        loader = batches(part, size, workers, collate,
                         pin_memory=self.device.type == "cuda" and not self.settings.gpu_decode)
        with torch.inference_mode():
            for idx, batch, errors in loader:
                yield idx, None if batch is None else self.forward(batch), errors


def _compiled_engine(cap: LayerCapture, settings: RunSettings, device: torch.device, dtype: torch.dtype | None,
                     cfg: dict, mean: torch.Tensor, std: torch.Tensor) -> CompiledEngine | QuantizedEngine | None:
    """The CPU's engine of a package kept on disk (``backend="torch.compile"`` in fp32, int8), else None."""
    if settings.compiled_file is None or device.type != "cpu":
        return None
    if dtype == torch.int8:
        return QuantizedEngine(cap, settings.compiled_file, settings.batch_size, cfg, mean.cpu(), std.cpu())
    return CompiledEngine(cap, settings.compiled_file, settings.batch_size, settings.compile_params,
                          settings.compile_after, settings.judge_compiled)


def _progress_bar(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="img", desc="featx", leave=False)


# ------------------------------------------------------------------ caching


#: Items whose cached rows are looked up (and copied into the output) at a time.
LOOKUP_CHUNK = 1024
#: Misses a process claims (and computes) at a time, so that processes sharing a cache split the work.
CLAIM_AHEAD = 512
#: Seconds between looks at images another process is computing.
CLAIM_POLL = 0.2


def cached_run(runner: Callable[[], Runner], plan: Plan, cache: Any, namespace: tuple[str, dict], items: Items,
               out: np.ndarray, *, progress: bool = False, streams: int = 1) -> RunStats:
    """Fill ``out`` from the cache, running the backbone only on the misses (each distinct image once).

    A stored row holding NaN or infinity is a miss (whoever wrote it, a
    shared store included), and a computed one is not stored.

    ``runner`` is called only when something is missing, so a fully cached
    run builds no network; ``streams`` is what the stats report then.
    """
    ns, info = namespace
    cache.register_namespace(ns, info)
    keys = item_keys(items, cache)
    fields = plan.out_fields
    widths = {f: plan.widths[f] for f in fields}
    todo: list[int] = []
    dups: list[tuple[int, int]] = []
    first: dict[str, int] = {}
    n_hits = 0
    for lo in range(0, len(keys), LOOKUP_CHUNK):  # hits go straight to ``out``: memory stays a chunk's worth
        chunk = keys[lo:lo + LOOKUP_CHUNK]
        hits = cache.lookup(ns, [k for k in chunk if k is not None and k not in first], widths)
        n_hits += _plan_misses(chunk, lo, hits, fields, out, todo, dups, first)
        del hits

    def sink(rows: np.ndarray, computed: dict[str, np.ndarray]) -> None:
        finite = np.logical_and.reduce([np.isfinite(v).all(axis=1) for v in computed.values()])
        payload = [(keys[i], f, v[r]) for r, i in enumerate(rows) if keys[i] is not None and finite[r]
                   for f, v in computed.items()]  # a NaN or infinite row is never cached
        if payload:
            cache.store(ns, payload, requested=fields)

    stats = RunStats(streams=streams)
    try:
        if todo:
            stats = _claimed_run(runner, cache, ns, keys, widths, items, todo, out, progress, sink, stats)
    finally:
        cache.flush()  # a shared store publishes beside the compute: done when the run is
    for i, j in dups:
        out[i] = out[j]
    reasons = dict(stats.failed)
    stats.failed = sorted(stats.failed + [(i, reasons[j]) for i, j in dups if j in reasons])
    stats.images, stats.duplicates = len(items), len(dups)
    stats.cache_hits += n_hits
    return stats


def _claimed_run(runner, cache, ns: str, keys: list, widths: dict, items: Items, todo: list[int], out: np.ndarray,
                 progress: bool, sink, total: RunStats) -> RunStats:
    """Compute the misses ``todo``, never an image another process sharing the cache is computing.

    Images are claimed :data:`CLAIM_AHEAD` at a time (:meth:`EmbeddingStore.claim`);
    the ones another live process holds are left to it while this process
    computes its own, then read from the cache when that process has stored
    them. What it released without storing (a failed image, a crash) is
    computed here; so is everything still missing after
    :data:`~featx._cache.sqlite.CLAIM_TTL` (a claim cannot block forever).
    """
    from .._cache.sqlite import CLAIM_TTL

    queue, waiting = list(todo), []
    deadline = time.monotonic() + CLAIM_TTL
    while queue or waiting:
        if queue:
            batch, queue = queue[:CLAIM_AHEAD], queue[CLAIM_AHEAD:]
            mine = cache.claim(ns, [keys[i] for i in batch if keys[i] is not None])
            now = [i for i in batch if keys[i] is None or keys[i] in mine]
            waiting += [i for i in batch if keys[i] is not None and keys[i] not in mine]
            _merge(total, _run_claimed(runner, cache, ns, keys, items, now, out, progress, sink))
            continue
        got = cache.lookup(ns, [keys[i] for i in waiting], widths)  # what the others have stored meanwhile
        still = []
        for i in waiting:
            row = _full_row(got.get(keys[i]), list(widths))
            if row is None:
                still.append(i)
            else:
                out[i] = row
                total.cache_hits += 1
        waiting = still
        if not waiting:
            break
        busy = cache.claimed_elsewhere(ns, [keys[i] for i in waiting])
        if time.monotonic() > deadline:  # a claim that outlived its owner's work: compute the rest here
            _merge(total, _run_claimed(runner, cache, ns, keys, items, waiting, out, progress, sink))
            break
        free = [i for i in waiting if keys[i] not in busy]
        if free:
            queue, waiting = free, [i for i in waiting if keys[i] in busy]
            continue
        time.sleep(CLAIM_POLL)
    return total


def _run_claimed(runner, cache, ns, keys, items, rows: list[int], out, progress, sink) -> RunStats | None:
    if not rows:
        return None
    try:
        return runner().run(items, np.asarray(rows), out, progress=progress, sink=sink)
    finally:
        cache.flush()  # stored before the claims go: a waiting process finds the rows when it looks
        cache.release(ns, [keys[i] for i in rows if keys[i] is not None])


def _merge(total: RunStats, part: RunStats | None) -> None:
    if part is None:
        return
    total.computed += part.computed
    total.failed += part.failed
    total.streams = part.streams
    total.measured = part.measured if part.measured is not None else total.measured


def _full_row(got: dict | None, fields: list[str]) -> np.ndarray | None:
    """A cached item's output row, or None when a field is missing or not finite (then it is computed)."""
    if got is None or len(got) < len(fields) or not all(f in got and np.isfinite(got[f]).all() for f in fields):
        return None
    return np.concatenate([got[f] for f in fields]) if len(fields) > 1 else got[fields[0]]


def _plan_misses(keys: list, offset: int, hits: dict, fields: list[str], out: np.ndarray, todo: list[int],
                 dups: list[tuple[int, int]], first: dict[str, int]) -> int:
    """Copy the full hits of ``keys`` (items ``offset``...) into ``out``; append the items to compute to ``todo``
    and the duplicates ``(i, first i)`` to ``dups``; return the number of hits."""
    n_hits = 0
    for i, k in enumerate(keys, offset):
        if k is not None:
            row = _full_row(hits.get(k), fields)
            if row is not None:
                out[i] = row
                n_hits += 1
                continue  # a stored row that is not finite is never served: it is recomputed
            if k in first:
                dups.append((i, first[k]))
                continue
            first[k] = i
        todo.append(i)
    return n_hits
