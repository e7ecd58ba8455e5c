"""``precision="int8"``: the truncated backbone quantised statically, compiled once and kept on disk.

The capture (the backbone up to the deepest requested layer, with the
pooling) is exported with ``torch.export``, quantised by torchao's PT2E flow
with the x86 inductor quantizer (int8 weights per channel, int8 activations
per tensor, the ranges measured on featx's fixed calibration crops,
:mod:`featx._images.calibration`), and compiled by AOTInductor with freezing
into one package for the batch size, thread count, CPU and torch version, in
``<cache dir>/compiled/<digest>.pt2`` beside the fp32 packages
(:mod:`featx._runtime.compiled`). Quantising and compiling take seconds to a
minute; unlike an fp32 package, the int8 one is built in the process that
first needs it (its features are int8's, so eager PyTorch cannot stand in
while it compiles), then loaded in milliseconds by every later extractor and
process. Concurrent processes build it once (the lock file of
:mod:`featx._runtime.compiled`).

Checks: a freshly compiled package is compared with the quantised network it
was compiled from (run by PyTorch itself, :data:`REFERENCE_COSINE`); a
package loaded from disk is compared with fp32 on a calibration batch
(:data:`FP32_COSINE`, a damaged package fails it). A package that fails,
does not load, or cannot be compiled (no C++ compiler) is removed with one
:class:`featx.BackendWarning`, and the quantised network runs in PyTorch
instead: the same int8 arithmetic, slower.
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from .._exceptions import BackendWarning
from .._images.calibration import calibration_images
from .._models.layers import LayerCapture
from .compiled import _lock, load_package, publish_package, strip_metadata_asserts
from .device import require_torchao
from .engines import Truncated

__all__ = ["QuantizedEngine", "require_torchao", "REFERENCE_COSINE", "FP32_COSINE"]

#: Smallest per-image cosine between a compiled package and the quantised network it was compiled from.
REFERENCE_COSINE = 0.99
#: Smallest median cosine between a package loaded from disk and fp32, on calibration crops (a damaged or
#: foreign package gives about 0; int8 of a random-init network can be as low as 0.9).
FP32_COSINE = 0.5

#: Calibration crops a package loaded from disk is checked on.
CHECK_IMAGES = 2

#: How featx quantises, part of the cache key: depthwise convolutions stay in float (see :func:`_depthwise`).
SCHEME = "dwfloat"

#: Packages this process has compiled (observability for tests and benchmarks).
compilations = 0


def _exported(cap: LayerCapture, x: torch.Tensor) -> torch.fx.GraphModule:
    """The capture as an FX graph the quantizer can annotate."""
    ep = torch.export.export(Truncated(cap, stop=False).eval(), (x,))
    gm = ep.module()
    strip_metadata_asserts(gm)
    graph = gm.graph
    graph.eliminate_dead_code()  # the layers after the deepest target
    for node in graph.nodes:
        # A module called several times (torchvision's Bottleneck has one ReLU for three calls) would be
        # one "source partition" with several outputs, which the quantizer refuses: one name per call.
        stack = node.meta.get("nn_module_stack")
        if stack:
            key, (fqn, cls) = list(stack.items())[-1]
            if "@" in key:
                stack[key] = (fqn + key[key.rindex("@"):], cls)
    gm.recompile()
    return gm


def quantize(cap: LayerCapture, calibration: torch.Tensor, batch_size: int) -> torch.fx.GraphModule:
    """The capture quantised to int8, calibrated on ``calibration`` (normalised, channels-last)."""
    require_torchao()
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    with torch.no_grad():
        gm = _exported(cap, calibration[:batch_size])
        quantizer = xiq.X86InductorQuantizer()
        quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
        for fqn in _depthwise(gm):
            quantizer.set_module_name_qconfig(fqn, None)
        prepared = prepare_pt2e(gm, quantizer)
        for start in range(0, len(calibration), batch_size):
            prepared(_padded(calibration[start:start + batch_size], batch_size))
        return convert_pt2e(prepared)


def _depthwise(gm: torch.fx.GraphModule) -> set[str]:
    """The modules of the grouped (depthwise) convolutions in ``gm``: left in float by :func:`quantize`.

    One int8 scale per tensor for a depthwise convolution's activations cost
    EfficientNet-Lite0 most of its fidelity to fp32 (``benchmarks/bench_precision.py``
    measures it), while they hold a small share of the network's arithmetic.
    """
    out = set()
    for node in gm.graph.nodes:
        if node.op == "call_function" and "conv" in str(node.target) and len(node.args) > 6 and node.args[6] != 1:
            stack = node.meta.get("nn_module_stack")
            if stack:
                out.add(list(stack.values())[-1][0])
    return out


def _padded(x: torch.Tensor, size: int) -> torch.Tensor:
    """``x`` padded to ``size`` images with copies of its last, channels-last as the package was compiled for.

    (``torch.cat`` returns a plain contiguous tensor; a package compiled for
    channels-last strides reads such an input as other pixels, with no error.)
    """
    if x.shape[0] != size:
        x = torch.cat([x, x[-1:].expand(size - x.shape[0], *x.shape[1:])])
    return x.contiguous(memory_format=torch.channels_last)


def _compile(reference: torch.fx.GraphModule, x: torch.Tensor, path: Path) -> None:
    """Compile the quantised network with AOTInductor (freezing on) and publish the package atomically."""
    global compilations
    with torch.no_grad():
        publish_package(torch.export.export(reference, (x,)), path)
    compilations += 1


def _min_cosine(want: tuple, got: tuple) -> float:
    return min(float(torch.nn.functional.cosine_similarity(w.float().flatten(1), g.float().flatten(1), eps=1e-12).min())
               for w, g in zip(want, got))


def _median_cosine(want: tuple, got: tuple) -> float:
    return min(float(torch.nn.functional.cosine_similarity(w.float().flatten(1), g.float().flatten(1),
                                                           eps=1e-12).median()) for w, g in zip(want, got))


class QuantizedEngine:
    """The int8 package (built on first use when missing), or the quantised network in PyTorch after a fallback."""

    def __init__(self, cap: LayerCapture, path: Path, batch_size: int, cfg: dict, mean: torch.Tensor,
                 std: torch.Tensor):
        self.cap, self.path, self.batch_size = cap, Path(path), batch_size
        self._cfg, self._mean, self._std = cfg, mean, std
        self._fn: Callable | None = None
        self.compiled_batches = 0

    def _calibration(self) -> torch.Tensor:
        x = calibration_images(self._cfg).float().div_(255.0).sub_(self._mean).div_(self._std)
        return x.contiguous(memory_format=torch.channels_last)

    def _give_up(self, why: str, reference: Any) -> None:
        warnings.warn(f"the compiled int8 graph cannot be used ({why}); running the quantised network in PyTorch "
                      "instead (the same int8 arithmetic, slower).", BackendWarning, stacklevel=5)
        self._fn = reference

    def _load(self, calibration: torch.Tensor) -> bool:
        """Load the package from disk and check it against fp32; False (and removed) when it fails."""
        try:
            fn = load_package(self.path)
            x = calibration[:CHECK_IMAGES]  # a few images: fp32 on a whole batch would cost a first call dearly
            with torch.no_grad():
                got = tuple(o[:CHECK_IMAGES] for o in fn(_padded(x, self.batch_size)))
                want = Truncated(self.cap, stop=False)(x)
            cosine = _median_cosine(want, got)
            if not cosine >= FP32_COSINE:
                raise ValueError(f"its features are not int8's (median cosine {cosine:.3f} to fp32)")
        except Exception as exc:
            warnings.warn(f"the int8 package {self.path.name} is unusable ({type(exc).__name__}: {str(exc)[:200]}); "
                          "building it again.", BackendWarning, stacklevel=5)
            self.path.unlink(missing_ok=True)
            return False
        try:  # marks it used: `featx cache prune` evicts the least recently used first
            os.utime(self.path, ns=(time.time_ns(), self.path.stat().st_mtime_ns))
        except OSError:
            pass
        self._fn = fn
        return True

    def _build(self) -> None:
        calibration = self._calibration()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:  # another process may be building it: wait for its package (or its stale lock)
            if self.path.exists() and self._load(calibration):
                return
            if _lock(self.path):
                break
            time.sleep(0.2)
        try:
            if self.path.exists() and self._load(calibration):  # published between the look and the lock
                return
            reference = quantize(self.cap, calibration, self.batch_size)
            x = calibration[:self.batch_size]
            try:
                _compile(reference, x, self.path)
                fn = load_package(self.path)
                with torch.no_grad():
                    cosine = _min_cosine(tuple(reference(x)), tuple(fn(x)))
                if not cosine >= REFERENCE_COSINE:
                    self.path.unlink(missing_ok=True)
                    raise ValueError(f"it disagrees with the quantised network (cosine {cosine:.4f})")
                self._fn = fn
            except Exception as exc:  # no C++ compiler, an op AOTInductor cannot lower, a disagreement
                self._give_up(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc) else ''}",
                              reference)
        finally:
            self.path.with_suffix(".lock").unlink(missing_ok=True)

    def __call__(self, x: torch.Tensor) -> list:
        if self._fn is None:
            self._build()
        size, n = self.batch_size, x.shape[0]
        outs = []
        with torch.no_grad():
            for start in range(0, n, size):
                outs.append(tuple(self._fn(_padded(x[start:start + size], size))))
        self.compiled_batches += len(outs)
        flat = [torch.cat([o[k] for o in outs])[:n] if len(outs) > 1 else outs[0][k][:n] for k in range(len(outs[0]))]
        it = iter(flat)
        return [{p: next(it) for p in ps} for ps in self.cap.parts]
