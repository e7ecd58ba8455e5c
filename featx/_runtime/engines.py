"""Inference backends: what runs the truncated backbone on a normalised batch.

Every engine maps an ``(N, 3, H, W)`` float32 batch to the pooled fields of a
:class:`~featx._models.layers.LayerCapture`: ``[{part: (N, d) tensor}]`` per target.

- ``torch``: eager PyTorch with forward hooks (the reference);
- ``torch.compile``: the same capture compiled by TorchInductor (the first
  batch pays the compilation; a failure falls back to eager with a warning);
- ``onnxruntime``: the truncated graph (the backbone up to the deepest
  requested layer, plus the pooling) exported once to ONNX with a dynamic
  batch axis, stored in ``<cache dir>/onnx/`` under a digest of everything
  that defines it, and run by ONNX Runtime's CPU provider.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from .device import resolve_precision
from .._exceptions import BackendWarning, ParameterError, arg
from .._models.layers import LayerCapture
from .._models.stem import input_channels
from .._options import BACKENDS

__all__ = ["BACKENDS", "resolve_compute", "resolve_backend", "build_engine", "graph_key", "onnx_path", "artifacts",
           "prune_artifacts", "clear_artifacts", "artifact_bytes"]


#: ONNX opset of exported graphs (supported by every ONNX Runtime >= 1.14).
OPSET = 17
#: Largest difference from eager PyTorch accepted, relative to the largest value.
RTOL = 1e-4
#: The same for bf16 outputs: a compiled bf16 graph rounds differently from eager bf16, by a few bf16 steps
#: (measured: up to 0.5% of the largest value for resnet50, 1.8% for efficientnet_lite0, whose eager bf16
#: features are themselves further from fp32); a damaged or foreign package is off by far more.
RTOL_BF16 = 2.0 ** -4

Engine = Callable[[torch.Tensor], list]


def _ort_installed() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None


def resolve_compute(backend: str, precision: str, device: torch.device) -> tuple[str, torch.dtype | None]:
    """The backend and autocast dtype a fitted extractor will use, decided together.

    ``precision="auto"`` with ``backend="onnxruntime"`` is fp32 (ONNX Runtime
    computes in fp32 here), and so is ``backend="torch.compile"`` on the CPU
    (its package kept on disk is compiled in fp32, whose features equal eager
    PyTorch's; see :mod:`featx._runtime.compiled`). ``backend="auto"`` is
    that compiled package on the CPU in fp32 or bf16 (compiled once eager
    runs of the graph have cost about a compilation:
    :func:`featx._runtime.compiled.compile_after_s`, and kept only if timed
    faster; measured on the Performance page of the docs); on GPUs, eager PyTorch. ``precision="int8"`` runs
    a compiled quantised graph (:mod:`featx._runtime.quantized`): its backend
    is ``"torch.compile"`` whichever of ``"torch"``, ``"torch.compile"`` or
    ``"auto"`` asked for it.
    """
    if precision == "int8":
        if backend == "onnxruntime" or backend not in BACKENDS:
            raise ParameterError(
                f"{arg('precision', 'int8')} runs as a quantised graph compiled by TorchInductor, not with "
                f"{arg('backend', backend)}. Use {arg('backend', 'torch')} (the default), 'auto' or 'torch.compile' "
                "with it, or another precision.", "backend")
        return "torch.compile", resolve_precision(precision, device)
    if precision == "auto" and (backend == "onnxruntime" or (backend == "torch.compile" and device.type == "cpu")):
        precision = "fp32"
    dtype = resolve_precision(precision, device)
    return resolve_backend(backend, device, dtype), dtype


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype | None) -> str:
    """The backend a fitted extractor will use (``"auto"`` resolved; impossible requests refused)."""
    if backend not in BACKENDS:
        raise ParameterError(f"{arg('backend', backend)} is invalid. It must be one of {list(BACKENDS)}.", "backend")
    if backend == "auto":
        # on the CPU in fp32 or bf16: the compiled package, compiled once eager runs of the graph have cost
        # about a compilation and kept only if it was timed faster (Performance page); elsewhere eager PyTorch
        return "torch.compile" if device.type == "cpu" and dtype in (None, torch.bfloat16) else "torch"
    if backend == "onnxruntime":
        if device.type != "cpu":
            raise ParameterError(
                f"{arg('backend', 'onnxruntime')} runs on the CPU only, but {arg('device', str(device))}. "
                f"Use {arg('backend', 'torch')} (or 'auto') on GPUs, or {arg('device', 'cpu')}.", "backend")
        if dtype is not None:
            raise ParameterError(
                f"{arg('backend', 'onnxruntime')} computes in fp32; use {arg('precision', 'fp32')} (or 'auto') with "
                f"it, or {arg('backend', 'torch')} for bf16.", "backend")
        if not _ort_installed():
            raise ImportError(
                "backend='onnxruntime' needs the onnx and onnxruntime packages: pip install 'featx[onnx]'"
            )
    return backend


def onnx_path(root: Path, key: str) -> Path:
    """Where the exported graph for ``key`` lives."""
    return root / "onnx" / f"{key}.onnx"


# ------------------------------------------------- artifacts on disk (housekeeping for `featx cache`)


def artifacts(root: Path) -> list[Path]:
    """The engines' files kept in a cache directory (exported ONNX graphs, compiled packages), least recently used first."""
    found = []
    for p in [*(Path(root) / "onnx").glob("*.onnx"), *(Path(root) / "compiled").glob("*.pt2")]:
        try:
            st = p.stat()
            found.append((max(st.st_atime, st.st_mtime), p))  # exported, or last used (featx sets atime)
        except OSError:  # removed meanwhile
            continue
    return [p for _, p in sorted(found)]


def artifact_bytes(paths: list[Path]) -> int:
    total = 0
    for p in paths:
        try:
            total += p.stat().st_size
        except OSError:
            pass
    return total


def prune_artifacts(root: Path, max_bytes: int, other_bytes: int) -> tuple[int, int]:
    """Remove artifacts, least recently used first, until they and ``other_bytes`` fit in ``max_bytes``.

    They go before embeddings (re-exporting a graph takes seconds; an
    embedding took a forward pass). Returns ``(removed, bytes left)``.
    """
    paths, removed = artifacts(root), 0
    while paths and other_bytes + artifact_bytes(paths) > max_bytes:
        _remove_artifact(paths.pop(0))
        removed += 1
    return removed, artifact_bytes(paths)


def clear_artifacts(root: Path) -> int:
    """Remove every artifact; return how many."""
    paths = artifacts(root)
    for p in paths:
        _remove_artifact(p)
    return len(paths)


#: Suffix of the file beside an int8 package that records the digest of its checked bytes
#: (:func:`featx._runtime.quantized.digest_path`).
DIGEST_SUFFIX = ".sha256"
#: Files kept beside a compiled package that describe it, removed with it.
SIDECARS = (DIGEST_SUFFIX,)


def _remove_artifact(path: Path) -> None:
    """Remove an artifact and the files that describe it (a rebuilt package gets its own)."""
    path.unlink(missing_ok=True)
    for suffix in SIDECARS:
        path.with_suffix(suffix).unlink(missing_ok=True)


class Truncated(nn.Module):
    """The capture as a module returning a flat tuple of pooled tensors (what gets exported or compiled).

    ``stop=False`` runs the whole forward pass (``torch.export`` follows no
    exceptions; what comes after the deepest target is dead code to a compiler).
    """

    def __init__(self, cap: LayerCapture, stop: bool = True):
        super().__init__()
        self.backbone = cap.module
        self._cap, self._stop = cap, stop

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        results = self._cap.run(x, stop=self._stop)
        return tuple(r[p] for r, ps in zip(results, self._cap.parts) for p in ps)


def disagreement(want: list, got: list, rtol: float = RTOL) -> str | None:
    """Why an engine's fields ``got`` differ from eager ``want`` beyond ``rtol`` of their scale (None: they agree)."""
    for w, g in zip(want, got):
        for p, ref in w.items():
            ref = ref.float()
            err = float((g[p].float() - ref).abs().max())
            scale = max(float(ref.abs().max()), 1e-6)
            if g[p].shape != ref.shape or not err <= rtol * scale:
                return f"max difference {err:.3g} for values up to {scale:.3g}"
    return None


def _export(cap: LayerCapture, input_size: tuple[int, int], path: Path) -> None:
    """Trace the truncated forward pass and write it to ``path`` atomically.

    Tracing records only the operations that ran, so the layers after the
    deepest requested one (skipped by the capture) are not in the graph.
    Concurrent exporters each write a private temporary file and rename it
    into place; the last rename wins and every reader sees a whole file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    x = torch.rand(2, input_channels(cap.module), *input_size)
    module = Truncated(cap).eval()
    n_out = sum(len(ps) for ps in cap.parts)
    names = [f"f{i}" for i in range(n_out)]
    fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
            with torch.no_grad():
                torch.onnx.export(
                    module, (x,), tmp, dynamo=False, opset_version=OPSET, input_names=["x"], output_names=names,
                    dynamic_axes={"x": {0: "batch"}, **{n: {0: "batch"} for n in names}},
                )
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide a shared cache's graphs from other users
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _ort_engine(cap: LayerCapture, path: Path, input_size: tuple[int, int], threads: int) -> Engine:
    import onnxruntime as ort

    if not path.exists():
        _export(cap, input_size, path)
    else:
        try:  # marks it used (atime; mtime stays the export time): `featx cache prune` evicts the least recently used first
            os.utime(path, ns=(time.time_ns(), path.stat().st_mtime_ns))
        except OSError:
            pass
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle ORT threads sleep instead of spinning, leaving the cores to the
    # decoders between forward passes (measured faster with the default decoding).
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception:  # a damaged file (e.g. a disk filled up mid-write elsewhere): export again, once
        _export(cap, input_size, path)
        session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    n_out = sum(len(ps) for ps in cap.parts)
    names = [o.name for o in session.get_outputs()]
    if len(names) != n_out:
        raise RuntimeError(f"the ONNX graph at {path} has {len(names)} outputs, expected {n_out}")
    parts = cap.parts

    def run(x: torch.Tensor) -> list:
        arr = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        outs = iter(session.run(names, {"x": arr}))
        return [{p: torch.from_numpy(next(outs)) for p in ps} for ps in parts]

    _check_against_eager(cap, run, input_size)
    return run


def _check_against_eager(cap: LayerCapture, run: Engine, input_size: tuple[int, int]) -> None:
    """Compare the engine with eager PyTorch on a batch of a size other than the traced one.

    Tracing bakes in whatever it cannot follow (a detour through numpy, a
    data-dependent branch, a batch size turned into a constant) and only
    warns; this catches such graphs before they give wrong features.
    """
    x = torch.rand(3, input_channels(cap.module), *input_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = cap.run(x.contiguous(memory_format=torch.channels_last))
    why = disagreement(want, run(x))
    if why is not None:
        raise RuntimeError(
            f"the exported graph disagrees with PyTorch ({why}); the model likely has steps tracing cannot capture"
        )


def _compiled_engine(cap: LayerCapture) -> Engine:
    eager = cap.run  # one bound method object: ``cap.run`` is a new one at every access
    compiled = torch.compile(eager, dynamic=None)
    state = {"fn": compiled}

    def run(x: torch.Tensor) -> list:
        fn = state["fn"]
        if fn is eager:  # after a fallback: eager's own errors are eager's, raised as they are
            return fn(x)
        try:
            return fn(x)
        except Exception as exc:  # no C++ compiler, an unsupported op, ...: eager from now on
            warnings.warn(
                f"torch.compile failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                "running eager PyTorch instead.",
                BackendWarning,
                stacklevel=2,
            )
            state["fn"] = eager
            return eager(x)

    return run


def build_engine(backend: str, cap: LayerCapture, *, onnx_file: Path | None, input_size: tuple[int, int],
                 threads: int) -> tuple[str, Engine]:
    """``(backend actually used, engine)``; an export failure falls back to eager with one warning.

    ``"torch.compile"`` here is ``torch.compile`` in this process (GPUs, and
    bf16/fp16 on the CPU); in fp32 on the CPU the runner uses a package
    compiled ahead of time and kept on disk instead (:mod:`featx._runtime.compiled`).
    """
    if backend == "torch.compile":
        return backend, _compiled_engine(cap)
    if backend == "onnxruntime":
        assert onnx_file is not None
        try:
            return backend, _ort_engine(cap, onnx_file, input_size, threads)
        except Exception as exc:
            warnings.warn(
                f"could not run this model with ONNX Runtime ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:300] if str(exc) else ''}); using eager PyTorch instead.",
                BackendWarning,
                stacklevel=2,
            )
    return "torch", cap.run


def graph_key(namespace: str, fields: list[str], input_size: tuple[int, int]) -> str:
    """Digest naming an exported graph: the embedding namespace + the fields it computes + the opset."""
    text = "|".join([namespace, ",".join(fields), f"{input_size[0]}x{input_size[1]}", f"opset{OPSET}",
                     torch.__version__.split("+")[0]])
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()
