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

The package takes 8-bit pixels (:data:`PACKAGE_INPUT`): featx's
normalisation is compiled into it, fused with the quantisation of its input,
so a batch is read once instead of being converted to float, normalised and
then quantised in three passes.

Checks: a freshly compiled package is compared with the quantised network it
was compiled from (run by PyTorch itself, :data:`REFERENCE_COSINE`) before
it is published, and the SHA-256 digest of those bytes is kept beside it
(``<digest>.sha256``). A process that loads the package checks that its
bytes are still those (a few milliseconds: hashing, no forward pass); a
package without that record (an older store, a lost file) or with other
bytes is compared with fp32 on calibration crops instead
(:data:`FP32_COSINE`; a damaged package fails it) and, if it passes, its
digest is recorded. A checked package is kept loaded for the process
(:data:`KEEP_LOADED`), so the extractors of a grid search or of a
cross-validation share it and none loads or checks it again. A package that
fails, does not load, or cannot be compiled (no C++ compiler) is removed
with one :class:`featx.BackendWarning`, and the quantised network runs in
PyTorch instead: the same int8 arithmetic, slower.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .._exceptions import BackendWarning
from .._images.calibration import calibration_images
from .._images.preprocess import normalize_batch
from .._models.layers import LayerCapture
from .._outputs import written
from .compiled import _lock, load_package, publish_package, strip_metadata_asserts
from .device import require_torchao
from .engines import DIGEST_SUFFIX, Truncated

__all__ = ["QuantizedEngine", "require_torchao", "REFERENCE_COSINE", "FP32_COSINE", "PACKAGE_INPUT", "Pixels",
           "digest_path"]

#: Smallest per-image cosine between a compiled package and the quantised network it was compiled from.
REFERENCE_COSINE = 0.99
#: Smallest median cosine between a package loaded from disk and fp32, on calibration crops (a damaged or
#: foreign package gives about 0; int8 of a random-init network can be as low as 0.9).
FP32_COSINE = 0.5

#: Calibration crops a package loaded from disk is checked on.
CHECK_IMAGES = 2

#: How featx quantises, part of the cache key: depthwise convolutions stay in float (see :func:`_depthwise`).
SCHEME = "dwfloat"

#: What a package takes, part of its key: ``(N, 3, H, W)`` uint8 pixels, channels-last (see :class:`Pixels`).
PACKAGE_INPUT = "uint8-pixels"

#: Checked packages kept loaded per process, most recently used last (a package of resnet50 is about 26 MB).
KEEP_LOADED = 4

#: Packages this process has compiled, and loaded from disk (observability for tests and benchmarks).
compilations = 0
loads = 0

_LOADED: "OrderedDict[tuple, Callable]" = OrderedDict()
_LOADED_LOCK = threading.Lock()


class Pixels(nn.Module):
    """``module`` behind featx's normalisation: a function of 8-bit pixels.

    The same operations, in the same order, as
    :func:`featx._images.preprocess.normalize_batch` (``x / 255``, minus the
    mean, over the standard deviation, in float32), so the package sees the
    values eager PyTorch would, and the compiler fuses them with the
    quantisation of the input.
    """

    def __init__(self, module: nn.Module, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.module = module
        self.register_buffer("mean", mean.detach().float().reshape(1, -1, 1, 1).clone())
        self.register_buffer("std", std.detach().float().reshape(1, -1, 1, 1).clone())

    def forward(self, x: torch.Tensor):
        return self.module(x.float().div(255.0).sub(self.mean).div(self.std))


def digest_path(path: Path) -> Path:
    """Where the SHA-256 digest of a package's checked bytes is kept."""
    return Path(path).with_suffix(DIGEST_SUFFIX)


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _recorded_digest(path: Path) -> str | None:
    try:
        return digest_path(path).read_text().strip() or None
    except OSError:
        return None


def _record_digest(path: Path, digest: str) -> None:
    with written(digest_path(path)) as tmp:
        tmp.write_text(digest + "\n")


def _identity(path: Path) -> tuple | None:
    """The file at ``path`` as this process last saw it (a rebuilt package is another file)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (str(path), st.st_ino, st.st_size, st.st_mtime_ns)


def _loaded(path: Path) -> Callable | None:
    """The checked package loaded from ``path`` earlier in this process, if the file is still that one."""
    ident = _identity(path)
    with _LOADED_LOCK:
        fn = _LOADED.get(ident) if ident is not None else None
        if fn is not None:
            _LOADED.move_to_end(ident)
        return fn


def _keep_loaded(path: Path, fn: Callable) -> None:
    ident = _identity(path)
    if ident is None:
        return
    with _LOADED_LOCK:
        _LOADED[ident] = fn
        _LOADED.move_to_end(ident)
        while len(_LOADED) > KEEP_LOADED:
            _LOADED.popitem(last=False)


def forget_loaded() -> None:
    """Drop the packages this process keeps loaded (as a fresh process would start)."""
    with _LOADED_LOCK:
        _LOADED.clear()


def _exported(cap: LayerCapture, x: torch.Tensor, mean: torch.Tensor | None = None,
              std: torch.Tensor | None = None) -> torch.fx.GraphModule:
    """The capture as an FX graph the quantizer can annotate (of pixels, :class:`Pixels`, with ``mean``/``std``)."""
    module = Truncated(cap, stop=False)
    if mean is not None:
        module = Pixels(module, mean, std)
    ep = torch.export.export(module.eval(), (x,))
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


def quantize(cap: LayerCapture, calibration: torch.Tensor, batch_size: int, mean: torch.Tensor | None = None,
             std: torch.Tensor | None = None) -> torch.fx.GraphModule:
    """The capture quantised to int8, calibrated on ``calibration`` (channels-last).

    With ``mean`` and ``std`` the network takes uint8 pixels and normalises
    them itself (:class:`Pixels`), and ``calibration`` is pixels; without, it
    takes normalised float batches.
    """
    require_torchao()
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    with torch.no_grad():
        gm = _exported(cap, calibration[:batch_size], mean, std)
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


def _compile(reference: torch.fx.GraphModule, x: torch.Tensor, path: Path) -> Callable:
    """Compile the quantised network with AOTInductor (freezing on) and publish the package atomically.

    Before it is published, the package is compared with ``reference`` on
    ``x`` (:data:`REFERENCE_COSINE`) and the digest of its bytes is recorded
    (:func:`digest_path`), so a process that finds the package finds the
    record too. Returns the loaded package.
    """
    global compilations
    loaded: list[Callable] = []

    def verify(tmp: Path) -> None:
        fn = load_package(tmp)
        with torch.no_grad():
            cosine = _min_cosine(tuple(reference(x)), tuple(fn(x)))
        if not cosine >= REFERENCE_COSINE:
            raise ValueError(f"it disagrees with the quantised network (cosine {cosine:.4f})")
        _record_digest(path, _digest(tmp))
        loaded.append(fn)

    with torch.no_grad():
        publish_package(torch.export.export(reference, (x,)), path, verify=verify)
    compilations += 1
    return loaded[0]


def _min_cosine(want: tuple, got: tuple) -> float:
    return min(float(torch.nn.functional.cosine_similarity(w.float().flatten(1), g.float().flatten(1), eps=1e-12).min())
               for w, g in zip(want, got))


def _median_cosine(want: tuple, got: tuple) -> float:
    return min(float(torch.nn.functional.cosine_similarity(w.float().flatten(1), g.float().flatten(1),
                                                           eps=1e-12).median()) for w, g in zip(want, got))


class QuantizedEngine:
    """The int8 package (built on first use when missing), or the quantised network in PyTorch after a fallback.

    It takes batches of 8-bit pixels (:data:`takes_pixels`): the runner
    hands them over unnormalised, channels-last.
    """

    #: The runner passes uint8 pixels, not normalised batches (the package normalises, :class:`Pixels`).
    takes_pixels = True

    def __init__(self, cap: LayerCapture, path: Path, batch_size: int, cfg: dict, mean: torch.Tensor,
                 std: torch.Tensor):
        self.cap, self.path, self.batch_size = cap, Path(path), batch_size
        self._cfg, self._mean, self._std = cfg, mean, std
        self._fn: Callable | None = None
        self.compiled_batches = 0

    def _calibration(self) -> torch.Tensor:
        """The calibration crops as the package takes them: uint8 pixels, channels-last."""
        return calibration_images(self._cfg).contiguous(memory_format=torch.channels_last)

    def _normalized(self, pixels: torch.Tensor) -> torch.Tensor:
        return normalize_batch(pixels, self._mean, self._std).contiguous(memory_format=torch.channels_last)

    def _give_up(self, why: str, reference: Any) -> None:
        warnings.warn(f"the compiled int8 graph cannot be used ({why}); running the quantised network in PyTorch "
                      "instead (the same int8 arithmetic, slower).", BackendWarning, stacklevel=5)
        self._fn = reference

    def _checked(self, fn: Callable, digest: str, calibration: torch.Tensor) -> None:
        """Raise unless the package ``fn``, whose bytes have ``digest``, is the one checked when it was built (or,
        without that record, gives int8's features: then its digest is recorded)."""
        if digest == _recorded_digest(self.path):
            return
        x = calibration[:CHECK_IMAGES]
        with torch.no_grad():
            got = tuple(o[:CHECK_IMAGES] for o in fn(_padded(x, self.batch_size)))
            want = Truncated(self.cap, stop=False)(self._normalized(x))
        cosine = _median_cosine(want, got)
        if not cosine >= FP32_COSINE:
            raise ValueError(f"its features are not int8's (median cosine {cosine:.3f} to fp32)")
        try:
            _record_digest(self.path, digest)  # for the next process
        except OSError:
            pass  # a read-only store: the next process checks against fp32 again

    def _load(self, calibration: torch.Tensor) -> bool:
        """Load the package from disk and check it; False (and removed) when it fails."""
        global loads
        try:
            digest = _digest(self.path)  # before loading: a file replaced meanwhile fails the check
            fn = load_package(self.path)
            loads += 1
            self._checked(fn, digest, calibration)
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
        _keep_loaded(self.path, fn)
        return True

    def _build(self) -> None:
        self._fn = _loaded(self.path)  # checked by an earlier extractor of this process
        if self._fn is not None:
            return
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
            reference = quantize(self.cap, calibration, self.batch_size, self._mean, self._std)
            try:
                self._fn = _compile(reference, _padded(calibration[:self.batch_size], self.batch_size), self.path)
                _keep_loaded(self.path, self._fn)
            except Exception as exc:  # no C++ compiler, an op AOTInductor cannot lower, a disagreement
                self._give_up(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc) else ''}",
                              reference)
        finally:
            self.path.with_suffix(".lock").unlink(missing_ok=True)

    def __call__(self, x: torch.Tensor) -> list:
        if self._fn is None:
            self._build()
        if x.dtype != torch.uint8:  # featx's images are 8-bit (its one pixel rule): this is their exact value
            x = x.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)
        size, n = self.batch_size, x.shape[0]
        outs = []
        with torch.no_grad():
            for start in range(0, n, size):
                outs.append(tuple(self._fn(_padded(x[start:start + size], size))))
        self.compiled_batches += len(outs)
        flat = [torch.cat([o[k] for o in outs])[:n] if len(outs) > 1 else outs[0][k][:n] for k in range(len(outs[0]))]
        it = iter(flat)
        return [{p: next(it) for p in ps} for ps in self.cap.parts]
