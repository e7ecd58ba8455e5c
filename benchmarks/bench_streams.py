"""CPU forward passes: one stream using every core vs one single-threaded stream per core.

    python benchmarks/bench_streams.py [--models efficientnet_lite0,resnet18,resnet50] [--batch-size 4]
                                       [--repeats 3] [--glibc-default]

The measurement behind featx's CPU schedule (``featx._runtime.device.cpu_streams``,
``featx._runtime.schedule``): on the same pre-made input batches, in one run,
interleaved, in fp32 and (where the CPU has native bf16) with bf16 autocast,

* ``one stream``: ``torch.set_num_threads(cores)``, the batches one after the
  other (what featx's ``transform`` does between decoding batches);
* ``per-core streams``: ``torch.set_num_threads(1)`` and one Python thread per
  core, each running its share of the batches through the same module
  (PyTorch releases the GIL inside its operators).

Named backbones with random weights (in fp32 not quite neutral: denormal values
can slow a random-weight model; featx measures its real model's schedule),
channels_last as featx runs them, 224 x 224 inputs. The C allocator keeps
freed activations as featx sets it (``featx._runtime.malloc.keep_cpu_buffers``);
``--glibc-default`` measures glibc's defaults instead, where the answer differs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _data import machine, write_results  # noqa: E402

from featx._models.backbones import build_backbone  # noqa: E402
from featx._runtime.device import autocast, cpu_native_bf16  # noqa: E402
from featx._runtime.malloc import keep_cpu_buffers  # noqa: E402


def _rate(module, x: torch.Tensor, n_batches: int, streams: int, dtype: torch.dtype | None) -> float:
    def run(k: int) -> None:
        with torch.inference_mode(), autocast(x.device, dtype):
            for _ in range(k):
                module(x)

    cores = os.cpu_count() or 1
    torch.set_num_threads(cores if streams == 1 else 1)
    threads = [threading.Thread(target=run, args=(n_batches // streams,)) for _ in range(streams)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return (n_batches // streams) * streams * x.shape[0] / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="efficientnet_lite0,resnet18,resnet50")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--batches", type=int, default=32, help="batches per timed run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--glibc-default", action="store_true", help="leave glibc's malloc thresholds as they are")
    ap.add_argument("--out", default=None, help="JSON file (default: results/bench_streams[_glibc_default].json)")
    args = ap.parse_args()
    kept = False if args.glibc_default else keep_cpu_buffers()
    cores = os.cpu_count() or 1
    mach = machine()
    precisions = {"fp32": None, **({"bf16": torch.bfloat16} if cpu_native_bf16() else {})}
    results = {}
    print(f"featx CPU schedules: {mach['line']}")
    print(f"allocator: {'featx keeps freed buffers' if kept else 'glibc defaults'}; batch {args.batch_size}, "
          f"{args.batches} batches per run, medians of {args.repeats} interleaved runs (img/s)")
    for name in args.models.split(","):
        # channels_last, as featx runs CPU models (faster with oneDNN)
        module = build_backbone(name, None).module.eval().to(memory_format=torch.channels_last)
        x = torch.randn(args.batch_size, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        x = x.contiguous(memory_format=torch.channels_last)
        for prec, dtype in precisions.items():
            _rate(module, x, 2, 1, dtype)  # warm-up
            one, per_core = [], []
            for _ in range(args.repeats):
                one.append(_rate(module, x, args.batches, 1, dtype))
                per_core.append(_rate(module, x, args.batches, cores, dtype))
            ratio = statistics.median(b / a for a, b in zip(one, per_core))
            a, b = statistics.median(one), statistics.median(per_core)
            results[f"{name} {prec}"] = {"one_stream": one, "per_core_streams": per_core, "ratio": ratio}
            print(f"{name:<20} {prec:<5} one stream x {cores} threads {a:6.1f}   {cores} streams x 1 thread "
                  f"{b:6.1f}   per-core/one {ratio:.2f}")
    torch.set_num_threads(cores)
    out = args.out or str(Path(__file__).resolve().parent / "results" /
                          ("bench_streams_glibc_default.json" if args.glibc_default else "bench_streams.json"))
    write_results(out, {"machine": mach, "allocator_kept": kept, "batch_size": args.batch_size,
                        "models": results})


if __name__ == "__main__":
    main()
