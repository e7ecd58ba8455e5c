"""CPU forward passes: one stream using every core vs one single-threaded stream per core.

    python benchmarks/bench_streams.py [--models efficientnet_lite0,resnet18,resnet50] [--batch-size 4] [--repeats 3]

A measurement for a possible change to featx's CPU path (not what featx does
today): on the same pre-made input batches, in one run, interleaved,

* ``one stream``: ``torch.set_num_threads(cores)``, the batches one after the
  other (what featx's ``transform`` does between decoding batches);
* ``per-core streams``: ``torch.set_num_threads(1)`` and one Python thread per
  core, each running its share of the batches through the same module
  (PyTorch releases the GIL inside its operators).

Named backbones with random weights (speed does not depend on the values),
channels_last as featx runs them, 224 x 224 inputs.
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
from _data import write_results  # noqa: E402

from featx._backbones import build_backbone  # noqa: E402


def _rate(module, x: torch.Tensor, n_batches: int, streams: int) -> float:
    def run(k: int) -> None:
        with torch.inference_mode():
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
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "bench_streams.json"))
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    results = {}
    print(f"{cores} cores, batch {args.batch_size}, {args.batches} batches per run, "
          f"medians of {args.repeats} interleaved runs (img/s)")
    for name in args.models.split(","):
        # channels_last, as featx runs CPU models (faster with oneDNN)
        module = build_backbone(name, None).module.eval().to(memory_format=torch.channels_last)
        x = torch.randn(args.batch_size, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        x = x.contiguous(memory_format=torch.channels_last)
        _rate(module, x, 2, 1)  # warm-up
        one, per_core = [], []
        for _ in range(args.repeats):
            one.append(_rate(module, x, args.batches, 1))
            per_core.append(_rate(module, x, args.batches, cores))
        a, b = statistics.median(one), statistics.median(per_core)
        results[name] = {"one_stream": one, "per_core_streams": per_core, "ratio": b / a}
        print(f"{name:<20} one stream x {cores} threads {a:6.1f}   {cores} streams x 1 thread {b:6.1f}   "
              f"ratio {b / a:.2f}")
    torch.set_num_threads(cores)
    write_results(args.out, {"cores": cores, "batch_size": args.batch_size, "models": results})


if __name__ == "__main__":
    main()
