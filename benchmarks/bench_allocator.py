"""What keeping freed activation buffers (featx._runtime.malloc) is worth: fresh processes with and without it.

    python benchmarks/bench_allocator.py [--models efficientnet_lite0,resnet50] [--n 256,96] [--repeats 3]

glibc's malloc hands large freed blocks back to the OS until a large enough
block has been freed once, so a CPU forward pass touches new pages for its
activations at every batch, and how fast a process runs depends on what it
did before. featx sets the thresholds glibc would reach on its own when it
fits a CPU extractor. The setting lasts for the process, so each measurement
is a fresh process: ``FEATX_KEEP_CPU_BUFFERS=0`` (glibc's defaults) or not
(featx's default), alternating, ``--repeats`` rounds. Each process, from
500x375 JPEG files, ``cache=None``:

* featx's default (``precision="auto"``): first ``transform`` of N images and a second one;
* featx ``precision="fp32"``: a second ``transform`` of N (steady state);
* the bare model's fp32 forward pass on pre-made tensors, batch 4, channels_last,
  two threads, over 64 images, after the fit: a user's loop in the same process.

Rates are medians of the rounds; "kept / default" is the median of the
per-round ratios. The header states the CPU's capability; results go to JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _data import machine, make_jpegs, write_results  # noqa: E402

MEASURES = ("featx default, first call", "featx default, second call", "featx fp32, second call", "bare fp32 loop")


def _child(model: str, paths: list[str]) -> dict:
    import torch

    from featx import PretrainedFeatureExtractor
    from featx._models.backbones import build_backbone

    weights = "DEFAULT" if model.startswith("efficientnet_lite") else None
    kw = dict(weights=weights, device="cpu", cache=None, progress=False)

    def rate(fn, n: int) -> float:
        t = time.perf_counter()
        fn()
        return n / (time.perf_counter() - t)

    out = {}
    ext = PretrainedFeatureExtractor(model, **kw).fit()
    out[MEASURES[0]] = rate(lambda: ext.transform(paths), len(paths))
    out[MEASURES[1]] = rate(lambda: ext.transform(paths), len(paths))
    fp32 = PretrainedFeatureExtractor(model, precision="fp32", **kw).fit()
    fp32.transform(paths)  # first call: measures its schedule where it has none remembered
    out[MEASURES[2]] = rate(lambda: fp32.transform(paths), len(paths))
    module = build_backbone(model, weights).module.eval().to(memory_format=torch.channels_last)
    x = torch.randn(64, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    batches = [x[i:i + 4].contiguous(memory_format=torch.channels_last) for i in range(0, 64, 4)]

    def bare() -> None:
        with torch.inference_mode():
            for b in batches:
                module(b)

    bare()  # warm-up
    out[MEASURES[3]] = rate(bare, 64)
    return out


def _spawn(model: str, n: int, data: str, kept: bool) -> dict:
    env = dict(os.environ, FEATX_KEEP_CPU_BUFFERS="1" if kept else "0")
    res = subprocess.run([sys.executable, __file__, "--child", model, "--n", str(n), "--data", data],
                         env=env, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="efficientnet_lite0,resnet50")
    ap.add_argument("--n", default="256,96", help="images per transform, one per model")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--data", default=str(Path(tempfile.gettempdir()) / "featx-bench-jpegs"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "bench_allocator.json"))
    args = ap.parse_args()
    if args.child:
        paths, _ = make_jpegs(args.data, int(args.n))
        print(json.dumps(_child(args.child, paths)))
        return

    models, sizes = args.models.split(","), [int(v) for v in args.n.split(",")]
    sizes += sizes[-1:] * (len(models) - len(sizes))
    make_jpegs(args.data, max(sizes))
    mach = machine()
    print(f"featx C allocator buffers, fresh processes: {mach['line']}")
    print(f"medians of {args.repeats} rounds, alternating; img/s; 500x375 JPEG files")
    results = {"machine": mach, "models": {}}
    for model, n in zip(models, sizes):
        samples: dict[str, list[dict]] = {"default": [], "kept": []}
        for r in range(args.repeats):
            for kept in ((False, True) if r % 2 == 0 else (True, False)):
                samples["kept" if kept else "default"].append(_spawn(model, n, args.data, kept))
        row = {}
        print(f"\n{f'{model}, N={n}':<32} {'glibc default':>12} {'featx kept':>12} {'kept/default':>14}")
        for m in MEASURES:
            d = statistics.median(s[m] for s in samples["default"])
            k = statistics.median(s[m] for s in samples["kept"])
            ratio = statistics.median(b[m] / a[m] for a, b in zip(samples["default"], samples["kept"]))
            row[m] = {"default": d, "kept": k, "kept/default": ratio}
            print(f"  {m:<30} {d:12.1f} {k:12.1f} {ratio:14.2f}")
        row["samples"] = samples
        results["models"][model] = row
    write_results(args.out, results)


if __name__ == "__main__":
    main()
