"""Settling: the one place that decides everything a fitted extractor computes and how.

:func:`settle` is a function of the estimator's parameters (and, when an
unpickled extractor is rebuilt, of its fitted device, precision and backend):
it validates what needs a device or a model to judge, and returns a frozen
:class:`Settled` record of device, precision, backend, batch size,
preprocessing, layer targets and plan, cache location and namespace,
exported-graph path and the CPU :class:`~featx._runtime.schedule.Schedule`. The
estimator's ``fit`` copies its fitted attributes from the record;
``__setstate__`` settles again from the fitted values; the fine-tuner uses
the backbone half (:func:`settle_backbone`). Process-wide settings are made
here, through :func:`featx._runtime.process.prepare`, and nowhere else.

The record builds the engine (:meth:`Settled.runner`) and runs it
(:meth:`Settled.run`); the network under it is built once per process
(:mod:`featx._runtime.network`), and a run whose every image is cached builds
nothing at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from .._models.backbones import get_template, probe_template, resolve_preprocess
from .._cache.sqlite import default_cache_dir, namespace_for
from .device import auto_batch_size, cpu_streams, fp32_stream_candidates, precision_name, resolve_device
from .compiled import artifact_key, artifact_path, compile_after_s
from .engines import graph_key, onnx_path, resolve_compute
from .._exceptions import ModelLoadError, ParameterError, arg
from .._models.fold import folds
from .._models.layers import Probe, Target, resolve_layers
from .loading import engine_threads, show_progress
from .network import frozen_network
from .._cache.objects import is_url, open_cache, resolve_cache
from .._models.pooling import FLATTEN_MAX_FEATURES, column_names, pooled_width, pooling_error
from .process import prepare
from .runner import Plan, Runner, RunSettings, RunStats, cached_run
from .schedule import Schedule, schedule_key
from .._models.weights import Backbone

__all__ = ["Settled", "settle", "settle_backbone", "check_weights"]


@dataclass(frozen=True)
class Settled:
    """Everything ``fit`` decides, as plain values (the record is frozen; its schedule learns)."""

    device: torch.device
    dtype: torch.dtype | None
    backend: str  # requested and resolved; the runner may fall back to "torch"
    batch_size: int
    preprocess: dict
    template: Backbone
    probe: Probe
    targets: list[Target]
    feature_names: np.ndarray
    plan: Plan
    cache_dir: str | None
    namespace: tuple[str, dict]
    onnx_file: Path | None
    schedule: Schedule
    settings: RunSettings
    progress: bool | None

    @property
    def precision(self) -> str:
        return precision_name(self.dtype)

    def runner(self) -> Runner:
        """A runner on the process's shared network for this record (builds the network if no extractor has)."""
        targets = self.plan.all_targets if self.settings.store_all else self.plan.targets
        net = frozen_network(self.template, self.device, self.dtype, frozenset(t.module for t in targets),
                             tuple(self.preprocess["input_size"]))
        return Runner(net, self.plan, self.device, self.dtype, self.preprocess, self.settings, self.schedule)

    def run(self, runner: Callable[[], Runner], items: Any, out: np.ndarray) -> RunStats:
        """Fill ``out`` (from the cache where there is one); ``runner`` is called only if something is computed.

        A stream count the run measured is kept by the schedule (and added to
        its remembered votes) here.
        """
        cache = open_cache(self.cache_dir)
        progress = show_progress(self.progress)
        if cache is None:
            stats = runner().run(items, np.arange(len(items)), out, progress=progress)
        else:
            stats = cached_run(runner, self.plan, cache, self.namespace, items, out, progress=progress,
                               streams=self.schedule.streams)
        if stats.measured is not None:
            self.schedule.record(stats.measured)
        return stats


def settle_backbone(model: Any, weights: Any, preprocess: dict | None,
                    device: torch.device, in_chans: int = 3) -> tuple[Backbone, dict, Probe]:
    """The backbone half of settling (shared with the fine-tuner): template, preprocessing and shape probe."""
    prepare(device)
    template = get_template(model, weights, int(in_chans))
    cfg = resolve_preprocess(template.preprocess, preprocess)
    return template, cfg, probe_template(template, cfg["input_size"])


def check_weights(template: Backbone, digest: str, model_id: str, weights_id: str | None) -> None:
    """Refuse a rebuilt backbone whose weights are not those an extractor was fitted with."""
    if template.digest != digest:
        raise ModelLoadError(
            f"the weights of {model_id} ({weights_id}) differ from those this extractor "
            "was fitted with (their digest changed). Refit the extractor, or restore the original weights."
        )


def _columns(targets: list[Target], pooling: str) -> list[str]:
    """The output column names, refusing a pooling a layer cannot take."""
    names: list[str] = []
    for t in targets:
        problem = pooling_error(pooling, t.display, t.shape, t.layout, t.prefix)
        if problem:
            raise ParameterError(problem, "pooling")
        width = pooled_width(t.shape, pooling, t.layout)
        if pooling == "flatten" and width > FLATTEN_MAX_FEATURES:
            raise ParameterError(
                f"{arg('pooling', 'flatten')} on layer {t.display!r} (output {t.shape}) gives {width:,} features "
                f"per image, over the limit of {FLATTEN_MAX_FEATURES:,}. Use {arg('pooling', 'avg')} or 'gem', a "
                f"deeper layer, or a smaller {arg('preprocess', {'input_size': ...})}.", "pooling")
        names.extend(column_names(t.display, t.shape, pooling, t.layout))
    return names


def _trusted(url: str) -> bool:
    """Whether a loaded extractor may use the shared store ``url``, else warn (once per load) and say how."""
    import os
    import warnings

    from .._exceptions import CacheWarning

    trusted = [u.strip().rstrip("/") for u in os.environ.get("FEATX_TRUSTED_CACHES", "").split(",") if u.strip()]
    if any(url.rstrip("/") == u or url.startswith(u + "/") for u in trusted):
        return True
    warnings.warn(
        f"this extractor was saved with cache={url!r}, a shared store; loaded, it does not read or write it (the "
        "features are computed here). To use it, refit (ext.fit()) or list it in FEATX_TRUSTED_CACHES before "
        "loading; to drop it, ext.set_params(cache=None).fit().",
        CacheWarning, stacklevel=6)
    return False


def _precision_key(dtype: torch.dtype | None, cfg: dict) -> str:
    """The precision as the cache key names it; int8's names its calibration crops too."""
    if dtype == torch.int8:
        from .._images.calibration import calibration_digest
        from .quantized import SCHEME

        return f"int8:{SCHEME}:{calibration_digest(cfg)}"
    return str(dtype or "fp32")


def _package_precision(dtype: torch.dtype | None) -> str:
    """The precision as a compiled package's key names it; int8's names what its input is (see
    :data:`featx._runtime.quantized.PACKAGE_INPUT`): packages that took other inputs are never loaded."""
    if dtype == torch.int8:
        from .quantized import PACKAGE_INPUT

        return f"int8:{PACKAGE_INPUT}"
    return precision_name(dtype)


def _check_device(params: Mapping[str, Any], device: torch.device) -> None:
    if params["gpu_decode"] and device.type != "cuda":
        raise ValueError(
            f"gpu_decode=True decodes JPEGs with nvJPEG on a CUDA device, but the device is {str(device)!r}. "
            "Use gpu_decode=False (the default) on this machine."
        )


def _work_dir(cache_dir: str | None) -> Path:
    """Where schedules and exported graphs live: the cache directory, else the default one."""
    local = cache_dir is not None and not is_url(cache_dir)
    return Path(cache_dir) if local else default_cache_dir()


def _schedule(device, dtype, backend, batch_size, template, cfg, plan, work_dir) -> Schedule:
    fixed = cpu_streams(device, dtype, backend)
    candidates = fp32_stream_candidates(device, dtype, backend)
    if candidates <= 1:
        return Schedule(fixed)
    key = schedule_key(template.identity, template.digest, tuple(cfg["input_size"]), batch_size, candidates,
                       plan.out_fields)
    return Schedule(fixed, candidates=candidates, directory=work_dir, key=key)


def settle(params: Mapping[str, Any], *, fitted: Mapping[str, Any] | None = None) -> Settled:
    """Decide everything for an extractor with these parameters (``get_params(deep=False)``).

    ``fitted``: the ``device_``, ``autocast_dtype_``, ``backend_`` and
    ``weights_digest_`` of an extractor being rebuilt after unpickling; they
    are kept as they were fitted (the device already mapped to this machine),
    and the weights must be the same.
    """
    if fitted is None:
        device = resolve_device(params["device"])
        _check_device(params, device)
        backend, dtype = resolve_compute(params["backend"], params["precision"], device)
    else:
        device, dtype, backend = fitted["device_"], fitted["autocast_dtype_"], fitted["backend_"]
    cache_dir = resolve_cache(params["cache"])
    if fitted is not None and cache_dir is not None and is_url(cache_dir) and not _trusted(cache_dir):
        cache_dir = None  # a loaded model does not point the user's data at a store they did not choose
    in_chans = params.get("in_chans", 3)
    if dtype == torch.int8 and in_chans != 3:
        raise ParameterError(f"{arg('precision', 'int8')} is calibrated on RGB photographs and cannot be used with "
                             f"{arg('in_chans', in_chans)}. Use {arg('precision', 'auto')} or 'fp32'.", "precision")
    template, cfg, pr = settle_backbone(params["model"], params["weights"], params["preprocess"], device, in_chans)
    if fitted is not None:
        check_weights(template, fitted["weights_digest_"], template.identity, template.weights)
    targets = resolve_layers(params["layers"], pr)
    names = _columns(targets, params["pooling"])
    bs = params["batch_size"]
    batch_size = int(bs) if bs != "auto" else auto_batch_size(device, dtype, backend)
    plan = Plan.build(targets, pr, params["pooling"], float(params["gem_p"]))
    namespace = namespace_for(model_id=template.identity, weights_id=template.weights,
                              weights_digest=template.digest, code=template.code, preprocess=cfg,
                              precision=_precision_key(dtype, cfg), tta=params["tta"], folded=folds(dtype))
    work_dir = _work_dir(cache_dir)
    store_all = cache_dir is not None
    onnx_file = compiled_file = None
    if backend == "onnxruntime":
        onnx_file = onnx_path(work_dir, graph_key(namespace[0], plan.fields(store_all), tuple(cfg["input_size"])))
    if backend == "torch.compile" and device.type == "cpu" and dtype in (None, torch.int8, torch.bfloat16):
        compiled_file = artifact_path(work_dir, artifact_key(namespace[0], plan.fields(store_all),
                                                             tuple(cfg["input_size"]), batch_size,
                                                             torch.get_num_threads(), _package_precision(dtype)))
    schedule = _schedule(device, dtype, backend, batch_size, template, cfg, plan, work_dir)
    settings = RunSettings(
        batch_size=batch_size, num_workers=params["num_workers"], on_error=params["on_error"], backend=backend,
        onnx_file=onnx_file, threads=engine_threads(params["num_workers"]), gpu_decode=bool(params["gpu_decode"]),
        tta=params["tta"], store_all=store_all, compiled_file=compiled_file,
        # the compiling process settles again from these: with the precision resolved here, not "auto"
        compile_params=dict(params, precision=precision_name(dtype)) if compiled_file is not None else None,
        # backend="auto" compiles a graph once eager runs of it have cost about a compilation (rent, then buy)
        compile_after=compile_after_s() if params["backend"] == "auto" and dtype != torch.int8 else 0.0,
        judge_compiled=params["backend"] == "auto" and dtype != torch.int8,
    )
    return Settled(device=device, dtype=dtype, backend=backend, batch_size=batch_size, preprocess=cfg,
                   template=template, probe=pr, targets=targets, feature_names=np.asarray(names, dtype=object),
                   plan=plan, cache_dir=cache_dir, namespace=namespace, onnx_file=onnx_file, schedule=schedule,
                   settings=settings, progress=params["progress"])
