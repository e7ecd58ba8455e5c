"""Ray Data's overhead: local transform vs ray_transform with 1 and 2 actors, on one machine.

    python benchmarks/bench_distributed.py [--n 512] [--repeats 3] [--model efficientnet_lite0]

On the same JPEG files (500x375), in one run: images/s of the local
``transform`` (cache off) and of ``featx.distributed.ray_transform`` with one
actor holding every core (``num_cpus`` = cores) and with one actor per core.
Ray is started once (``ray.init``) before timing; each timed Ray call includes
starting its actors and loading the backbone in them, as a real job would.
On one 2-core machine no speedup is expected: the figure of merit is the
overhead ratio (Ray time / local time; goal for one actor: <= 1.3).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _data import make_jpegs, write_results  # noqa: E402

from featx import PretrainedFeatureExtractor  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--batch-size", type=int, default=128, help="images per Ray batch")
    ap.add_argument("--data", default=str(Path(tempfile.gettempdir()) / "featx-bench-jpegs"))
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "bench_distributed.json"))
    args = ap.parse_args()
    import ray

    from featx.distributed import ray_transform

    cores = os.cpu_count() or 1
    paths, _ = make_jpegs(args.data, args.n)
    ext = PretrainedFeatureExtractor(args.model, progress=False)
    local_ext = PretrainedFeatureExtractor(args.model, progress=False).fit()
    local_ext.transform(paths[:8])
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    runs = {
        "local transform": lambda: local_ext.transform(paths),
        "ray, 1 actor, 8 images": lambda: ray_transform(paths[:8], ext, batch_size=8, concurrency=1,
                                                       num_cpus=cores),
        f"ray, 1 actor x {cores} cpus": lambda: ray_transform(paths, ext, batch_size=args.batch_size, concurrency=1,
                                                               num_cpus=cores),
        f"ray, {cores} actors x 1 cpu": lambda: ray_transform(paths, ext, batch_size=args.batch_size,
                                                               concurrency=cores, num_cpus=1),
    }
    ref = local_ext.transform(paths)
    for name, fn in runs.items():  # warm-up, and the results must agree
        got = fn()
        err = float(np.abs(got - ref[:len(got)]).max() / np.abs(ref).max())
        print(f"{name}: max difference from local transform {err:.1e} (relative to the largest feature)")
        assert err < 1e-5, name
    samples = {k: [] for k in runs}
    for _ in range(args.repeats):
        for k, fn in runs.items():
            t = time.perf_counter()
            fn()
            samples[k].append(time.perf_counter() - t)
    ray.shutdown()
    med = {k: statistics.median(v) for k, v in samples.items()}
    base = med["local transform"]
    print(f"{args.n} JPEGs 500x375, {args.model}, {cores} cores, CPU; medians of {args.repeats} interleaved runs")
    print(f"{'configuration':<28}{'seconds':>9}{'images/s':>10}{'x local time':>14}")
    for k, s in med.items():
        n = 8 if "8 images" in k else args.n
        print(f"{k:<28}{s:>9.2f}{n / s:>10.1f}{s / base:>14.2f}")
    fixed = med["ray, 1 actor, 8 images"]
    one = med[f"ray, 1 actor x {cores} cpus"]
    print(f"fixed cost of a Ray job (actor start, imports, model load, 8 images): {fixed:.1f} s; "
          f"beyond it, 1 actor takes {(one - fixed) / base:.2f}x the local time")
    write_results(args.out, {"n_images": args.n, "model": args.model, "cores": cores, "seconds": samples,
                             "median_seconds": med, "overhead": {k: s / base for k, s in med.items()}})


if __name__ == "__main__":
    main()
