"""backend="torch.compile" on the CPU (fp32 packages kept on disk) against eager PyTorch, from JPEG files.

    python benchmarks/bench_compiled.py [--n 512] [--models efficientnet_lite0,resnet50] [--repeats 3]

Per backbone (efficientnet_lite0 with its ImageNet weights, the others with
random weights: speed does not depend on the values), in one run, images/s
from 500x375 JPEG files (``cache=None``):

- eager fp32 (``precision="fp32"``) and featx's default (``precision="auto"``:
  bf16 streams where the CPU has native bf16), steady state;
- compiled fp32 with the package store empty: the first call of 96 images
  (eager; the compilation starts when it ends), then a new extractor's first
  call of ``--n`` images while that compilation is under way (it switches to
  the package when it appears), and how long the compilation took;
- compiled fp32 with the package on disk: a new extractor's first call
  (the package loaded, not compiled) and its second call;

medians of ``--repeats`` interleaved rounds for the steady-state rates; the
ratios are taken within a round. Writes ``benchmarks/results/bench_compiled.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _data import machine, make_jpegs, write_results  # noqa: E402

from featx import PretrainedFeatureExtractor, __version__  # noqa: E402


def _rate(ext, paths) -> float:
    t = time.perf_counter()
    ext.transform(paths)
    return len(paths) / (time.perf_counter() - t)


def _ext(model, **kw):
    weights = "DEFAULT" if model == "efficientnet_lite0" else None
    return PretrainedFeatureExtractor(model, weights=weights, device="cpu", progress=False, **kw).fit()


def _wait(ext, timeout=1200) -> float:
    engine = ext._runner.engine
    t = time.perf_counter()
    if engine._child:
        engine._child.wait(timeout=timeout)
    return time.perf_counter() - t


def bench(model: str, paths: list[str], repeats: int) -> dict:
    store = tempfile.mkdtemp(prefix="featx-compiled-")
    os.environ["FEATX_CACHE_DIR"] = store
    eager32, default = _ext(model, precision="fp32"), _ext(model)
    _rate(eager32, paths[:32]), _rate(default, paths[:32])  # first-use setup of both
    # cold store: the first calls run while the package compiles in another process
    cold = _ext(model, backend="torch.compile")
    t0 = time.perf_counter()
    first96 = _rate(cold, paths[:96])
    cold_n = _ext(model, backend="torch.compile")  # the compile started after the call above is under way
    first_n = _rate(cold_n, paths)
    compile_s = _wait(cold) + (time.perf_counter() - t0)
    switched = cold_n._runner.engine.compiled_batches
    warm = _ext(model, backend="torch.compile")  # the package is on disk now: loaded
    t = time.perf_counter()
    warm_first = _rate(warm, paths)
    load_first_s = time.perf_counter() - t
    rows = {"eager_fp32": [], "default": [], "compiled_fp32": []}
    for _ in range(repeats):
        rows["eager_fp32"].append(_rate(eager32, paths))
        rows["default"].append(_rate(default, paths))
        rows["compiled_fp32"].append(_rate(warm, paths))
    ratio_c = statistics.median(c / e for c, e in zip(rows["compiled_fp32"], rows["eager_fp32"]))
    ratio_d = statistics.median(c / d for c, d in zip(rows["compiled_fp32"], rows["default"]))
    med = {k: statistics.median(v) for k, v in rows.items()}
    eager_first = med["eager_fp32"]
    print(f"{model}: default precision {default.precision_}, {default.streams_} stream(s); compiled batch "
          f"{warm.batch_size_}, package compiled in {compile_s:.1f} s")
    print(f"  eager fp32 (steady)                              {med['eager_fp32']:8.1f} img/s")
    print(f"  featx default (steady)                           {med['default']:8.1f} img/s")
    print(f"  compiled fp32, package on disk (steady)          {med['compiled_fp32']:8.1f} img/s   "
          f"compiled/eager fp32 = {ratio_c:.2f}, compiled/default = {ratio_d:.2f}")
    print(f"  compiled fp32, package on disk, first call       {warm_first:8.1f} img/s   "
          f"first/steady = {warm_first / med['compiled_fp32']:.2f}")
    print(f"  compiled fp32, store empty, first call of 96     {first96:8.1f} img/s   "
          f"/ eager fp32 = {first96 / eager_first:.2f}")
    print(f"  compiled fp32, compiling beside it, call of {len(paths):<5d} {first_n:8.1f} img/s   "
          f"/ eager fp32 = {first_n / eager_first:.2f} ({switched} batches ran compiled)")
    return {"precision_default": default.precision_, "streams_default": default.streams_,
            "batch_compiled": warm.batch_size_, "compile_s": compile_s, "rates": rows, "medians": med,
            "compiled_over_eager_fp32": ratio_c, "compiled_over_default": ratio_d,
            "warm_store_first_call": warm_first, "warm_store_first_over_steady": warm_first / med["compiled_fp32"],
            "cold_store_first_96": first96, "cold_store_first_96_over_eager": first96 / eager_first,
            "cold_store_first_n": first_n, "cold_store_first_n_over_eager": first_n / eager_first,
            "cold_store_batches_compiled": switched, "load_first_call_s": load_first_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--models", default="efficientnet_lite0,resnet50")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--data", default=str(Path(tempfile.gettempdir()) / "featx-bench-jpegs"))
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "bench_compiled.json"))
    args = ap.parse_args()
    mach = machine()
    paths, _ = make_jpegs(args.data, max(args.n, 96))
    paths = paths[: args.n]
    print(f"featx {__version__}, compiled vs eager on the CPU; {mach['line']}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {len(paths)} JPEGs 500x375")
    results = {"machine": mach, "torch": torch.__version__, "featx": __version__, "n": len(paths), "models": {}}
    for model in args.models.split(","):
        results["models"][model] = bench(model, paths, args.repeats)
    write_results(args.out, results)


if __name__ == "__main__":
    main()
