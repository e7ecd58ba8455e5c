"""The transform engine: DataLoader -> device -> truncated forward -> pooled fields -> output rows (and cache).

A *field* is one layer's output under one elementary pooling, e.g.
``output:layer4|avg`` or ``input:fc|vec`` (the input of the classifier, i.e.
``pre_logits``). The output matrix is the requested fields side by side; the
cache stores fields, so ``avgmax`` reuses ``avg`` and ``max``, and the same
layer reached by name or by alias shares entries.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import Subset

from ._backbones import Backbone
from ._cache import FORMAT_VERSION, EmbeddingCache, content_key
from ._device import autocast
from ._engines import build_engine, graph_key, onnx_path
from ._exceptions import DeviceWarning, ImageLoadError
from ._loading import PARALLEL, batches, ordered_streams
from ._layers import PRE_LOGITS, LayerCapture, Probe, Target, probe, resolve_layers
from ._pooling import part_width, pool_parts, pooling_error
from ._preprocess import ImageDataset, Items, collate, item_path, normalize_batch
from ._schedule import PHASE_BATCHES, TUNE_BATCHES, recall, remember

__all__ = ["Plan", "RunOptions", "Runner", "RunStats", "begin_run", "last_run", "total_computed", "probe_template",
           "namespace_of", "transform_cached"]

_PROBE_LOCK = threading.Lock()


def probe_template(template: Backbone, input_size: tuple[int, int]) -> Probe:
    """Probe a (possibly shared) template once per input size, on the CPU."""
    key = tuple(input_size)
    with _PROBE_LOCK:
        pr = template.probes.get(key)
        if pr is None:
            pr = probe(template.module, key, torch.device("cpu"), template.classifier, template.stages,
                       template.aliases)
            template.probes[key] = pr
    return pr


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
                return ("vec",)
            if stored and t.layout == "tokens" and t.prefix:
                wanted = [*wanted, "cls"]  # a later pooling="cls" or "cls+avg" then hits the cache too
            return tuple(p for p in dict.fromkeys(wanted)
                         if not pooling_error(p, t.display, t.shape, t.layout, t.prefix))

        req = pool_parts(pooling)
        parts = [parts_of(t, req) for t in targets]
        extra_parts = [p for p in ["avg", "max", *req] if p != "flatten"]
        all_targets = list(targets)
        all_parts = [parts_of(t, [*req, "avg", "max"], stored=True) for t in targets]
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


@dataclass
class RunOptions:
    batch_size: int
    num_workers: Any  # int or "auto"
    progress: bool
    on_error: str = "raise"


@dataclass
class RunStats:
    """What the last transform in this process did (read by the CLI and the benchmarks)."""

    images: int = 0
    computed: int = 0  # images that went through the backbone
    cache_hits: int = 0
    duplicates: int = 0  # same content twice in one call: computed once
    streams: int = 1  # forward passes side by side (after the fp32 schedule was measured, the winner)


_LAST = RunStats()
_TOTAL_COMPUTED = [0]


def begin_run(n: int) -> None:
    """Reset :func:`last_run` for a transform of ``n`` images."""
    global _LAST
    _LAST = RunStats(images=n)


def last_run() -> RunStats:
    """Statistics of the most recent ``transform`` in this process."""
    return RunStats(**vars(_LAST))


def total_computed() -> int:
    """Images pushed through a backbone by this process so far."""
    return _TOTAL_COMPUTED[0]


def place(module: nn.Module, device: torch.device) -> nn.Module:
    # channels_last is faster for convolutions on CUDA and on x86 CPUs (oneDNN):
    # 79 vs 49 img/s for efficientnet_lite0, batch 4, on 2 AVX2 cores.
    return module.to(device).to(memory_format=torch.channels_last).eval()


class Runner:
    """A fitted extractor's private backbone on its device, with its layer captures."""

    def __init__(self, module: nn.Module, plan: Plan, device: torch.device, dtype: torch.dtype | None, cfg: dict,
                 backend: str = "torch", onnx_dir: Path | None = None, namespace: str = "", threads: int = 0,
                 gpu_decode: bool = False, tta: str | None = None, streams: int = 1,
                 tune: tuple[Path, str, int] | None = None):
        self.module = place(module, device)
        self.streams = streams  # > 1: single-threaded CPU streams that decode and compute their own batches
        self.tune = tune  # (directory, key, candidate streams): fp32 schedule still to be measured
        self.tta = tta
        self.decode_device = device if gpu_decode else None
        self.backend = backend  # requested; becomes "torch" if the requested one cannot run
        self._engine_args = (onnx_dir, namespace, threads or (os.cpu_count() or 1))
        self._engines: dict[bool, Any] = {}
        self.plan = plan
        self.device = device
        self.dtype = dtype
        self.cfg = cfg
        self._captures: dict[bool, LayerCapture] = {}
        self.max_chunk: int | None = None  # set after an out-of-memory error
        self.mean = torch.tensor(cfg["mean"], device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg["std"], device=device).view(1, 3, 1, 1)

    def capture(self, store_all: bool) -> LayerCapture:
        cap = self._captures.get(store_all)
        if cap is None:
            p = self.plan
            targets, parts = (p.all_targets, p.all_parts) if store_all else (p.targets, p.parts)
            cap = self._captures[store_all] = LayerCapture(self.module, targets, parts, p.gem_p)
        return cap

    def fields(self, cap: LayerCapture) -> list[str]:
        """The names of the fields ``cap`` computes, in its output order."""
        return [self.plan.field(t, p) for t, ps in zip(cap.targets, cap.parts) for p in ps]

    def engine(self, store_all: bool):
        """The callable that runs the capture (eager, compiled or ONNX Runtime)."""
        fn = self._engines.get(store_all)
        if fn is None:
            cap = self.capture(store_all)
            onnx_dir, ns, threads = self._engine_args
            path = None
            if self.backend == "onnxruntime":
                path = onnx_path(onnx_dir, graph_key(ns, self.fields(cap), tuple(self.cfg["input_size"])))
            self.backend, fn = build_engine(self.backend, cap, onnx_file=path,
                                            input_size=tuple(self.cfg["input_size"]), threads=threads)
            self._engines[store_all] = fn
        return fn

    def workers(self, n: int, opts: RunOptions) -> int:
        if self.decode_device is not None:
            return 0  # decoding on the GPU happens in this process (CUDA does not survive fork)
        if opts.num_workers != "auto":
            return int(opts.num_workers)
        if n < 2 * opts.batch_size:
            return 0
        cores = os.cpu_count() or 1
        if self.device.type == "cuda":
            return max(1, min(8, cores - 1))
        return PARALLEL  # CPU inference: decode each batch on all cores, between forward passes

    def forward(self, batch: torch.Tensor, store_all: bool) -> dict[str, torch.Tensor]:
        """Fields of one decoded batch.

        On an out-of-memory error the batch is run in halves (recursively, down
        to one image), and later batches are split the same way; every image's
        features are the same as in an unsplit run.
        """
        views = batch.shape[1] if batch.ndim == 5 else 0  # N x V x C x H x W: test-time augmentation
        x = batch.to(self.device, non_blocking=True)
        if views:
            x = x.flatten(0, 1)
        x = normalize_batch(x, self.mean, self.std)
        if self.backend != "onnxruntime":
            x = x.contiguous(memory_format=torch.channels_last)
        cap = self.capture(store_all)
        engine = self.engine(store_all)
        chunks = []
        for start in range(0, x.shape[0], self.max_chunk or x.shape[0]):
            chunks.append(self._forward_chunk(cap, engine, x[start:start + (self.max_chunk or x.shape[0])]))
        out = {f: torch.cat([c[f] for c in chunks]) if len(chunks) > 1 else chunks[0][f] for f in self.fields(cap)}
        if views:  # features averaged over each image's views
            out = {f: v.float().view(-1, views, v.shape[-1]).mean(1) for f, v in out.items()}
        return out

    def _forward_chunk(self, cap: LayerCapture, engine, x: torch.Tensor) -> dict[str, torch.Tensor]:
        try:
            with autocast(self.device, self.dtype):
                results = engine(x)
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
            a = self._forward_chunk(cap, engine, x[:half])
            b = self._forward_chunk(cap, engine, x[half:])
            return {f: torch.cat([a[f], b[f]]) for f in a}
        return {self.plan.field(t, p): r[p] for t, ps, r in zip(cap.targets, cap.parts, results) for p in ps}

    def run(
        self,
        items: Items,
        indices: np.ndarray,
        out: np.ndarray,
        opts: RunOptions,
        sink: Callable[[np.ndarray, dict[str, np.ndarray]], None] | None = None,
    ) -> list[tuple[int, str]]:
        """Fill ``out[indices]``; hand each finished batch's fields to ``sink`` (the cache) at once.

        With ``opts.on_error == "raise"`` a bad item raises
        :class:`ImageLoadError` after the good items of its batch have been
        computed and handed to ``sink``, so no work is lost. With ``"nan"`` its
        row is NaN; the returned list holds ``(index, reason)`` of such items.
        """
        failed: list[tuple[int, str]] = []
        store_all = sink is not None
        dataset = ImageDataset(items, indices, self.cfg, self.decode_device, self.tta)
        bar = _progress_bar(len(indices)) if opts.progress else None
        try:
            for idx, fields, errors in self._computed(dataset, opts, store_all):
                if fields is not None:
                    rows = idx.numpy()
                    cols = [fields[f] for f in self.plan.out_fields]
                    block = torch.cat(cols, 1) if len(cols) > 1 else cols[0]
                    out[rows] = block.float().cpu().numpy()
                    _TOTAL_COMPUTED[0] += len(rows)
                    _LAST.computed += len(rows)
                    if sink is not None:
                        sink(rows, {f: v.float().cpu().numpy() for f, v in fields.items()})
                    if bar is not None:
                        bar.update(len(rows))
                if errors:
                    if opts.on_error == "raise":
                        i, reason = errors[0]
                        raise ImageLoadError(i, item_path(items[i]), reason)
                    for i, reason in errors:
                        out[i] = np.nan
                    failed.extend(errors)
                    if bar is not None:
                        bar.update(len(errors))
        finally:
            if bar is not None:
                bar.close()
        return failed

    def _computed(self, dataset: ImageDataset, opts: RunOptions, store_all: bool):
        """``(indices, fields or None, errors)`` per batch, in order.

        With several CPU streams, each stream decodes and computes whole
        batches (single-threaded); otherwise batches are decoded (see
        :func:`featx._loading.batches`) and computed here, one after the other.
        An fp32 schedule not yet measured (``tune``) is measured on the first
        :data:`~featx._schedule.TUNE_BATCHES` batches, if there are that many.
        """
        n_jobs = -(-len(dataset) // opts.batch_size)
        start = 0
        if self.tune is not None:
            directory, key, candidates = self.tune
            remembered = recall(directory, key)  # other extractors or processes may have completed the votes
            if remembered is not None:
                self.streams, self.tune = remembered, None
            elif n_jobs >= TUNE_BATCHES:
                self.streams = yield from self._measured(dataset, opts, store_all, candidates)
                remember(directory, key, self.streams)
                self.tune, start = None, TUNE_BATCHES
        _LAST.streams = self.streams
        yield from self._jobs(dataset, opts, store_all, start, n_jobs, self.streams)

    def _measured(self, dataset: ImageDataset, opts: RunOptions, store_all: bool, candidates: int):
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
            yield from self._jobs(dataset, opts, store_all, lo, lo + PHASE_BATCHES, streams)
            seconds[streams].append(time.perf_counter() - t0)
        return candidates if min(seconds[candidates]) < min(seconds[1]) else 1

    def _jobs(self, dataset: ImageDataset, opts: RunOptions, store_all: bool, lo: int, hi: int, streams: int):
        """Batches ``lo`` to ``hi - 1`` with ``streams`` single-threaded streams, or decoded by
        :func:`featx._loading.batches` and computed here, one after the other."""
        size, n = opts.batch_size, len(dataset)
        if streams > 1 and hi - lo > 1:
            def job(k: int):
                k += lo
                idx, batch, errors = collate([dataset[j] for j in range(k * size, min((k + 1) * size, n))])
                return idx, None if batch is None else self.forward(batch, store_all), errors

            yield from ordered_streams(hi - lo, job, streams)
            return
        part = dataset if lo == 0 and hi * size >= n else Subset(dataset, range(lo * size, min(hi * size, n)))
        loader = batches(part, size, self.workers(len(part), opts), collate,
                         pin_memory=self.device.type == "cuda" and self.decode_device is None)
        with torch.inference_mode():
            for idx, batch, errors in loader:
                yield idx, None if batch is None else self.forward(batch, store_all), errors


def _progress_bar(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="img", desc="featx", leave=False)


# ------------------------------------------------------------------ caching


def _major_minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def namespace_of(est: Any) -> tuple[str, dict]:
    """Digest of everything that changes a fitted extractor's numbers, and its provenance record."""
    import timm
    import torchvision

    import featx

    source = est.model_id_.split(":", 1)[0]
    library = {"featx": ("timm", timm.__version__), "timm": ("timm", timm.__version__),
               "torchvision": ("torchvision", torchvision.__version__)}.get(source)
    if source == "open_clip":
        import open_clip

        library = ("open_clip", open_clip.__version__)
    key = {
        "format": FORMAT_VERSION,
        "model": est.model_id_,
        "weights_digest": est.weights_digest_,
        "code": getattr(est, "_code_digest", None),
        "preprocess": {k: list(v) if isinstance(v, tuple) else v for k, v in sorted(est.preprocess_.items())},
        "precision": str(est.autocast_dtype_ or "fp32"),
        "torch": _major_minor(torch.__version__),
        "library": None if library is None else [library[0], _major_minor(library[1])],
    }
    if getattr(est, "tta", None) is not None:  # absent otherwise, so plain extractors keep their entries
        key["tta"] = est.tta
    ns = hashlib.blake2b(json.dumps(key, sort_keys=True).encode(), digest_size=16).hexdigest()
    info = dict(key, weights=est.weights_id_, featx=featx.__version__, torch_full=torch.__version__,
                library_full=None if library is None else list(library))
    return ns, info


def item_keys(items: Items, cache: EmbeddingCache) -> list[str | None]:
    """Content keys of every item (None where it cannot be read: it then fails in the loader)."""
    if items.kind != "list":
        return [content_key(items[i]) for i in range(len(items))]
    keys: list[str | None] = [None] * len(items)
    path_idx = [i for i, it in enumerate(items.data) if isinstance(it, (str, os.PathLike))]
    for i, k in zip(path_idx, cache.path_keys([os.fspath(items[i]) for i in path_idx])):
        keys[i] = k
    for i, it in enumerate(items.data):
        if keys[i] is None and not isinstance(it, (str, os.PathLike)):
            try:
                keys[i] = content_key(it)
            except Exception:  # an unhashable oddity: no key, so the loader reports it
                keys[i] = None
    return keys


def transform_cached(
    est: Any, items: Items, out: np.ndarray, cache: EmbeddingCache, opts: RunOptions
) -> list[tuple[int, str]]:
    """Fill ``out`` from the cache, running the backbone only on the misses (each distinct image once)."""
    plan: Plan = est._plan
    ns, info = namespace_of(est)
    cache.register_namespace(ns, info)
    keys = item_keys(items, cache)
    wanted = {f: plan.widths[f] for f in plan.out_fields}
    hits = cache.lookup(ns, [k for k in keys if k is not None], wanted)
    todo: list[int] = []
    dups: list[tuple[int, int]] = []
    first: dict[str, int] = {}
    for i, k in enumerate(keys):
        if k is not None:
            got = hits.get(k)
            if got is not None and len(got) == len(wanted):
                out[i] = np.concatenate([got[f] for f in plan.out_fields]) if len(wanted) > 1 else got[plan.out_fields[0]]
                _LAST.cache_hits += 1
                continue
            if k in first:
                dups.append((i, first[k]))
                continue
            first[k] = i
        todo.append(i)
    _LAST.duplicates = len(dups)

    def sink(rows: np.ndarray, fields: dict[str, np.ndarray]) -> None:
        payload = [(keys[i], f, v[r]) for r, i in enumerate(rows) if keys[i] is not None for f, v in fields.items()]
        if payload:
            cache.store(ns, payload)

    failed = est._get_runner().run(items, np.asarray(todo), out, opts, sink=sink) if todo else []
    for i, j in dups:
        out[i] = out[j]
    bad = {i for i, _ in failed}
    failed += [(i, reason) for i, j in dups if j in bad for reason in [dict(failed)[j]]]
    return sorted(failed)
