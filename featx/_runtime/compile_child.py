"""The compiling process of :mod:`featx._runtime.compiled`: settle, export, compile, publish.

Started by :func:`featx._runtime.compiled.compile_in_background` with the
path of a spec file (the extractor's parameters, the package's path, batch
size and threads); it rebuilds the same network as the extractor that asked
(the same settled record, in eager PyTorch), exports the truncated forward
pass, compiles it with AOTInductor (freezing on) and renames the package
into place. Its lock and log are removed when it is done.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import statistics
import sys
import time
from pathlib import Path

import torch

from .compiled import JUDGE_REPEATS, MIN_GAIN, load_package, publish_package, strip_metadata_asserts, write_verdict
from .engines import Truncated
from .settling import settle

__all__: list[str] = []


def _compile(spec_file: str) -> None:
    """The child: rebuild the extractor's network from its parameters, export, compile, publish."""
    with open(spec_file, "rb") as f:
        spec = pickle.load(f)
    os.unlink(spec_file)
    path = Path(spec["path"])
    torch.set_num_threads(spec["threads"])
    try:
        settled = settle({**spec["params"], "backend": "torch"})
        runner = settled.runner()
        x = torch.rand(spec["batch_size"], len(settled.preprocess["mean"]), *settled.preprocess["input_size"],
                       generator=torch.Generator().manual_seed(0))
        x = x.contiguous(memory_format=torch.channels_last)
        eager = Truncated(runner.capture, stop=False).eval()
        with torch.no_grad(), _autocast(settled.dtype):
            ep = torch.export.export(eager, (x,))
            strip_metadata_asserts(ep.graph_module)
            publish_package(ep, path)
        if spec.get("verdict"):
            _judge(path, eager, x, settled.dtype)
        path.with_suffix(".log").unlink(missing_ok=True)
    finally:
        path.with_suffix(".lock").unlink(missing_ok=True)


def _judge(path: Path, eager, x: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    """Time the package against eager PyTorch on the same batch (interleaved, medians) and write the verdict
    beside it; a package that is not :data:`~featx._runtime.compiled.MIN_GAIN` times faster is removed
    (``backend="auto"`` then keeps eager PyTorch for this graph)."""
    fn = load_package(path)
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    with torch.inference_mode(), _autocast(dtype):  # eager in the precision the package was compiled in
        for rep in range(JUDGE_REPEATS + 2):
            for name, f in (("eager", eager), ("compiled", fn)):
                t = time.perf_counter()
                f(x)
                if rep >= 2:  # the first two: first-use setup
                    times[name].append(time.perf_counter() - t)
    eager_s, compiled_s = statistics.median(times["eager"]), statistics.median(times["compiled"])
    gain = eager_s / compiled_s
    write_verdict(path, {"eager_s": eager_s, "compiled_s": compiled_s, "gain": gain, "min_gain": MIN_GAIN,
                         "batch_size": int(x.shape[0]), "threads": torch.get_num_threads()})
    if gain < MIN_GAIN:
        path.unlink(missing_ok=True)


def _autocast(dtype: torch.dtype | None):
    return contextlib.nullcontext() if dtype is None else torch.autocast("cpu", dtype=dtype)



if __name__ == "__main__":
    _compile(sys.argv[1])
