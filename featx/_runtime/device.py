"""Device and precision resolution: the one place featx decides where and how it computes."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings

import torch

from .._exceptions import DeviceWarning, ParameterError, arg

__all__ = ["resolve_device", "resolve_precision", "precision_name", "cpu_capability", "cpu_native_bf16",
           "cpu_streams", "fp32_stream_candidates", "autocast", "load_device"]

from .._options import PRECISIONS  # noqa: E402


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(device: str | torch.device) -> torch.device:
    """Turn a ``device`` parameter into a :class:`torch.device`.

    ``"auto"`` picks CUDA, then MPS, then the CPU. An explicit device that this
    machine lacks is an error, never a silent fallback.
    """
    if isinstance(device, torch.device):
        dev = device
    elif isinstance(device, str):
        if device == "auto":
            if torch.cuda.is_available():
                return torch.device("cuda")
            if _mps_available():
                return torch.device("mps")
            return torch.device("cpu")
        try:
            dev = torch.device(device)
        except RuntimeError as exc:
            raise ParameterError(
                f"{arg('device', device)} is not a valid device. Use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'.",
                "device") from exc
    else:
        raise ParameterError(f"{arg('device', device)} is invalid. Use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'.",
                             "device")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ParameterError(
                f"{arg('device', str(dev))} was requested but CUDA is not available on this machine. "
                f"Use {arg('device', 'auto')} (picks CUDA when present, else the CPU) or {arg('device', 'cpu')}.",
                "device")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ParameterError(
                f"{arg('device', str(dev))} does not exist: this machine has {torch.cuda.device_count()} CUDA "
                "device(s).", "device")
    if dev.type == "mps" and not _mps_available():
        raise ParameterError(
            f"{arg('device', 'mps')} was requested but MPS is not available. Use {arg('device', 'auto')} or "
            f"{arg('device', 'cpu')}.", "device")
    return dev


def _cpu_flag(name: str) -> bool:
    fn = getattr(torch.cpu, name, None)  # private probes of torch.cpu (present since torch 2.1)
    try:
        return bool(fn()) if fn is not None else False
    except Exception:
        return False


def cpu_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512_BF16 or AMX), as PyTorch's own probes report it.

    Decided by capability, never by a list of CPU models: where this is False
    (AVX2 parts, for example) bf16 is emulated and slower than fp32.
    """
    return _cpu_flag("_is_avx512_bf16_supported") or _cpu_flag("_is_amx_tile_supported")


def cpu_capability() -> dict:
    """What this CPU offers PyTorch: vector ISA, native bf16, VNNI, AMX, cores and threads (for reports)."""
    try:
        isa = torch.backends.cpu.get_cpu_capability()
    except Exception:  # very old torch
        isa = "unknown"
    return {
        "isa": isa,
        "avx512_bf16": _cpu_flag("_is_avx512_bf16_supported"),
        "vnni": _cpu_flag("_is_vnni_supported"),
        "amx": _cpu_flag("_is_amx_tile_supported"),
        "cores": os.cpu_count() or 1,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def describe_cpu() -> str:
    """One line for benchmark headers and ``featx`` reports."""
    c = cpu_capability()
    flags = ", ".join(f"{k}={'yes' if c[k] else 'no'}" for k in ("avx512_bf16", "vnni", "amx"))
    return f"CPU {c['isa']} ({flags}), {c['cores']} cores, {c['torch_threads']} torch threads, torch {c['torch']}"


def resolve_precision(precision: str, device: torch.device, training: bool = False) -> torch.dtype | None:
    """Return the autocast dtype for ``precision`` on ``device``, or None for plain fp32.

    ``"int8"`` (CPU only; needs torchao) returns ``torch.int8``, which stands
    for static quantisation (:mod:`featx._runtime.quantized`), not an
    autocast; a CPU without VNNI or AMX warns that it may not be faster.

    ``"auto"`` is bf16 on CUDA devices that support it, fp16 on older CUDA
    devices; on the CPU, bf16 where the CPU computes it natively
    (:func:`cpu_native_bf16`) and fp32 elsewhere. ``training=True`` (fine-tuning)
    keeps fp32 on the CPU. An explicit ``"bf16"`` on a CPU that only emulates
    it warns that it is slower there.
    """
    if precision not in PRECISIONS:
        raise ParameterError(f"{arg('precision', precision)} is invalid. It must be one of {list(PRECISIONS)}.",
                             "precision")
    if precision == "fp32":
        return None
    if precision == "auto":
        if device.type == "cpu":
            return torch.bfloat16 if not training and cpu_native_bf16() else None
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision == "int8":
        return _int8(device)
    if precision == "fp16" and device.type == "cpu":
        raise ParameterError(f"{arg('precision', 'fp16')} is not supported on the CPU. Use 'fp32' or 'bf16'.",
                             "precision")
    if precision == "bf16" and device.type == "cpu" and not cpu_native_bf16():
        warnings.warn(
            f"precision='bf16' on this CPU ({cpu_capability()['isa']}, no AVX512_BF16 or AMX) is emulated and "
            "slower than fp32. Use precision='auto' (fp32 here, bf16 where the CPU has it) or 'fp32'.",
            DeviceWarning,
            stacklevel=3,
        )
    return torch.bfloat16 if precision == "bf16" else torch.float16


def _int8(device: torch.device) -> torch.dtype:
    """``precision="int8"``: static int8 quantisation on the CPU (torch.int8 stands for it; no autocast)."""
    if device.type != "cpu":
        raise ParameterError(f"{arg('precision', 'int8')} runs on the CPU only, but the device is {str(device)!r}. "
                             f"Use {arg('precision', 'auto')} (bf16 or fp16 on GPUs), or {arg('device', 'cpu')}.",
                             "precision")
    require_torchao()
    c = cpu_capability()
    if not (c["vnni"] or c["amx"]):
        warnings.warn(
            f"precision='int8' on this CPU ({c['isa']}, no VNNI or AMX) has no int8 dot-product instructions and "
            "may be no faster than fp32. Use precision='auto' here.",
            DeviceWarning,
            stacklevel=4,
        )
    return torch.int8


def require_torchao() -> None:
    """Raise the error naming the extra when torchao (the PT2E quantisation flow) is missing."""
    if importlib.util.find_spec("torchao") is None:
        raise ImportError("precision='int8' needs torchao (PT2E quantisation): pip install 'featx[int8]'")


def precision_name(dtype: torch.dtype | None) -> str:
    """``"fp32"``, ``"bf16"``, ``"fp16"`` or ``"int8"``: the resolved precision as users name it."""
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int8: "int8"}[dtype]


def cpu_streams(device: torch.device, dtype: torch.dtype | None, backend: str) -> int:
    """How many forward passes run side by side on the CPU, each single-threaded, with its own decoding.

    On the CPU with eager PyTorch and bf16 autocast, one single-threaded
    stream per core decodes and computes its own batches, because the bf16
    kernels of small batches scale badly across threads (measured by
    ``benchmarks/bench_streams.py``; figures on the Performance page of the
    docs). In fp32 the gain depends on the model, the machine and the
    allocator, so in fp32 featx measures it
    (:func:`fp32_stream_candidates`, :mod:`featx._runtime.schedule`). GPUs
    and ONNX Runtime (which has its own threads) keep one stream; a compiled
    bf16 package runs eager bf16 streams until it is there (then one stream,
    all threads); int8 runs one stream.
    The count is the process's torch thread count when ``fit`` runs
    (``torch.set_num_threads`` or ``OMP_NUM_THREADS`` limit it).
    """
    if dtype is None or dtype == torch.int8:
        return 1
    # a bf16 package (backend "torch.compile") runs eager bf16 streams until it is there
    return _eager_cpu_threads(device, "torch" if backend == "torch.compile" else backend)


def auto_batch_size(device: torch.device, dtype: torch.dtype | None, backend: str) -> int:
    """``batch_size="auto"``: 64 on CUDA; on the CPU 8 for one fp32 or int8 stream, else 4.

    The rule follows the bare model's best batch from JPEG files, measured
    side by side (``benchmarks/bench_throughput.py``; figures on the
    Performance page of the docs): one eager fp32 stream gains from 8, while
    bf16 streams and ONNX Runtime gain nothing from it and keep 4, half the
    latency and memory per stream. A compiled package (fp32 or bf16) gains
    from 8 (bf16: measured on the Performance page), and its eager phase
    loses nothing by it.
    """
    if device.type == "cuda":
        return 64
    if dtype == torch.int8 or (device.type == "cpu" and backend == "torch.compile"):
        return 8  # int8 and compiled packages (fp32 or bf16) gain from 8; their eager phase loses nothing by it
    return 8 if device.type == "cpu" and dtype is None and backend == "torch" else 4


def fp32_stream_candidates(device: torch.device, dtype: torch.dtype | None, backend: str) -> int:
    """Streams worth measuring against one all-core stream for eager fp32 on the CPU (1: nothing to measure).

    ``"torch.compile"`` in fp32 runs eager PyTorch until its package is there
    (and for good where the package was timed no faster): that eager phase
    gets the same measured schedule; the package itself runs as one stream.
    """
    if dtype is not None:
        return 1
    return _eager_cpu_threads(device, "torch" if backend == "torch.compile" else backend)


def _eager_cpu_threads(device: torch.device, backend: str) -> int:
    """The torch thread count for eager PyTorch on the CPU (one stream per thread); 1 elsewhere."""
    return max(1, torch.get_num_threads()) if device.type == "cpu" and backend == "torch" else 1


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Context manager: autocast to ``dtype`` on ``device``, or nothing when ``dtype`` is None."""
    if dtype is None or dtype == torch.int8:  # int8: a quantised graph, not an autocast
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def load_device(device_str: str) -> torch.device:
    """Device for an object unpickled on this machine: falls back to the CPU with a warning."""
    dev = torch.device(device_str)
    present = {"cuda": torch.cuda.is_available, "mps": _mps_available}.get(dev.type, lambda: True)
    if not present():
        warnings.warn(
            f"this extractor was fitted on {device_str!r}, which this machine lacks; it will run on the CPU.",
            DeviceWarning,
            stacklevel=3,
        )
        return torch.device("cpu")
    return dev
