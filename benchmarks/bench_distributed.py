"""Ray Data's overhead: local transform vs ray_transform with 1 and 2 actors, on one machine.

    python benchmarks/bench_distributed.py [--n 512] [--n-large 2048] [--repeats 3] [--model efficientnet_lite0]

On the same JPEG files (500x375), in one run, interleaved, cache off:

* ``local transform``: ``transform`` of an extractor already fitted and
  warmed up in this process (the most favourable local figure);
* ``local, fresh process``: ``python -c`` that imports featx, fits and
  transforms, i.e. a local job paying its own start-up (at ``--n`` only);
* ``ray_transform`` with one actor holding every core (``num_cpus`` = cores)
  and with one actor per core. Ray is started once (``ray.init``) before
  timing; each Ray call is a whole job: Ray Data's planning, starting the
  actors (a fresh Python process each, importing torch/timm/sklearn/featx),
  loading the backbone, then the batches.

Each configuration runs at two sizes, ``n`` and ``n_large``. A job's time is
modelled as ``fixed + per_image * n``; the difference between the two sizes
gives the per-image cost without the start-up, and so two overhead ratios:
end to end (Ray time / local time at each size) and marginal (Ray's
per-image cost / local's). On one 2-core machine no speedup is expected; the
goal for one actor is Ray time <= 1.3x local time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _data import make_jpegs, write_results  # noqa: E402

from featx import PretrainedFeatureExtractor  # noqa: E402

_FRESH = """
import sys
from featx import PretrainedFeatureExtractor
paths = open(sys.argv[2]).read().split()
PretrainedFeatureExtractor(sys.argv[1], progress=False).fit().transform(paths)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--n-large", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--batch-size", type=int, default=128, help="images per Ray batch")
    ap.add_argument("--data", default=str(Path(tempfile.gettempdir()) / "featx-bench-jpegs"))
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "bench_distributed.json"))
    args = ap.parse_args()
    import ray

    from featx.distributed import ray_transform

    cores = os.cpu_count() or 1
    all_paths, _ = make_jpegs(args.data, max(args.n, args.n_large))
    sizes = (args.n, args.n_large)
    list_file = Path(tempfile.mkdtemp()) / "paths.txt"
    ext = PretrainedFeatureExtractor(args.model, progress=False)
    local_ext = PretrainedFeatureExtractor(args.model, progress=False).fit()
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False

    def fresh(paths):
        list_file.write_text("\n".join(paths))
        subprocess.run([sys.executable, "-c", _FRESH, args.model, str(list_file)], check=True)

    one, many = f"ray, 1 actor x {cores} cpus", f"ray, {cores} actors x 1 cpu"
    runs = {
        "local transform": lambda p: local_ext.transform(p),
        "local, fresh process": fresh,
        one: lambda p: ray_transform(p, ext, batch_size=args.batch_size, concurrency=1, num_cpus=cores),
        many: lambda p: ray_transform(p, ext, batch_size=args.batch_size, concurrency=cores, num_cpus=1),
    }
    check = all_paths[:args.n]
    ref = local_ext.transform(check)  # also warms the local extractor up (and tunes its batch size)
    for name in (one, many):  # warm-up, and the results must agree
        err = float(np.abs(runs[name](check) - ref).max() / np.abs(ref).max())
        print(f"{name}: max difference from local transform {err:.1e} (relative to the largest feature)")
        assert err < 1e-5, name
    samples = {(k, n): [] for k in runs for n in sizes if k != "local, fresh process" or n == args.n}
    for _ in range(args.repeats):
        for (k, n), times in samples.items():
            t = time.perf_counter()
            runs[k](all_paths[:n])
            times.append(time.perf_counter() - t)
            print(f"  {k} n={n}: {times[-1]:.2f} s", flush=True)
    ray.shutdown()
    med = {key: statistics.median(v) for key, v in samples.items()}
    loc = "local transform"
    dn = args.n_large - args.n
    print(f"\nJPEGs 500x375, {args.model}, {cores} cores, CPU, Ray batch {args.batch_size}; "
          f"medians of {args.repeats} interleaved runs")
    print(f"{'configuration':<24}{'n':>6}{'seconds':>9}{'images/s':>10}{'x local':>9}")
    for (k, n), s in med.items():
        print(f"{k:<24}{n:>6}{s:>9.2f}{n / s:>10.1f}{s / med[(loc, n)]:>9.2f}")
    per_local = (med[(loc, args.n_large)] - med[(loc, args.n)]) / dn
    print(f"\n{'configuration':<24}{'fixed s':>9}{'ms/image':>10}{'marginal x local':>18}")
    model = {}
    for k in (loc, one, many):
        per = (med[(k, args.n_large)] - med[(k, args.n)]) / dn
        fixed = med[(k, args.n)] - per * args.n
        model[k] = {"fixed_seconds": fixed, "seconds_per_image": per, "marginal_ratio": per / per_local}
        print(f"{k:<24}{fixed:>9.2f}{per * 1e3:>10.2f}{per / per_local:>18.2f}")
    startup = med[("local, fresh process", args.n)] - med[(loc, args.n)]
    print(f"a fresh local process costs {startup:.1f} s more than the warm transform (Python, imports, model load)")
    f1, p1 = model[one]["fixed_seconds"], model[one]["seconds_per_image"]
    if p1 < 1.3 * per_local:
        # Ray(n) <= 1.3 local(n)  <=>  f1 + p1 n <= 1.3 (fl + pl n)
        fl = model[loc]["fixed_seconds"]
        n_even = max(0.0, (f1 - 1.3 * fl) / (1.3 * per_local - p1))
        print(f"1 actor is within 1.3x of the warm local transform from about {n_even:.0f} images per job")
    write_results(args.out, {
        "model": args.model, "cores": cores, "sizes": list(sizes), "batch_size": args.batch_size,
        "seconds": {f"{k}, n={n}": v for (k, n), v in samples.items()},
        "median_seconds": {f"{k}, n={n}": s for (k, n), s in med.items()},
        "end_to_end_ratio": {f"{k}, n={n}": s / med[(loc, n)] for (k, n), s in med.items()},
        "fixed_plus_per_image": model, "fresh_process_startup_seconds": startup})


if __name__ == "__main__":
    main()
