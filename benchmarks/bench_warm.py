"""The warm path: what a fit and a grid search cost when every image is already in the cache.

    python benchmarks/bench_warm.py [--n 60] [--repeats 5] [--out benchmarks/results/bench_warm.json]

Prints, side by side in one run, on the offline default backbone
(efficientnet_lite0, default precision) and ``--n`` JPEGs of 500x375:

- cold vs warm ``fit_transform`` (a new extractor each time; cold: the cache
  empty, in a process that has already built the network once for 8 other
  images; warm: every image cached), and their ratio;
- a warm ``fit`` alone (a new extractor of the same network), median of many;
- ``GridSearchCV`` over 3 layers x 2 poolings x 3 C x 5 folds (90 fits + the
  refit) of StandardScaler + LogisticRegression on the cached images, with
  the cache warm and starting from an empty cache; scikit-learn's fits run
  with one BLAS thread (threadpoolctl), as featx's own evaluations do;
- the network builds and images through a backbone during each part.

Medians of ``--repeats`` runs (interleaved where two things are compared).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _data import machine, make_jpegs, write_results  # noqa: E402

import torch  # noqa: E402

from featx import PretrainedFeatureExtractor, __version__  # noqa: E402

GRID = {"ext__layers": ["stage4", "stage5", "pre_logits"], "ext__pooling": ["avg", "max"],
        "clf__C": [0.1, 1.0, 10.0]}


class Counts:
    """Network builds and images through a backbone (featx >= 0.3 internals; absent: not counted)."""

    def __init__(self):
        self.builds = self.images = 0
        try:
            from featx._runtime import network, runner
        except ImportError:
            return
        real_build, real_forward = network._build, runner.Runner.forward

        def build(*a, **kw):
            self.builds += 1
            return real_build(*a, **kw)

        def forward(r, batch):
            self.images += batch.shape[0]
            return real_forward(r, batch)

        network._build, runner.Runner.forward = build, forward

    def snapshot(self) -> tuple[int, int]:
        return self.builds, self.images


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def _search(paths, y, cache):
    pipe = Pipeline([("ext", PretrainedFeatureExtractor(cache=cache, progress=False)),
                     ("scale", StandardScaler()), ("clf", LogisticRegression(max_iter=2000))])
    search = GridSearchCV(pipe, GRID, cv=StratifiedKFold(5, shuffle=True, random_state=0))
    with threadpool_limits(1):
        return search.fit(paths, y)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--fits", type=int, default=50, help="warm fits timed (median reported)")
    ap.add_argument("--data", default=str(Path(tempfile.gettempdir()) / "featx-bench-jpegs"))
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "bench_warm.json"))
    args = ap.parse_args()

    mach = machine()
    paths, labels = make_jpegs(args.data, args.n)
    y = np.asarray(labels)
    print(f"featx {__version__} warm-path benchmark: {len(paths)} JPEGs 500x375, efficientnet_lite0 default precision")
    print(f"machine: {mach['line']}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    counts = Counts()
    extra, _ = make_jpegs(Path(args.data) / "warmup", 8, seed=1)
    PretrainedFeatureExtractor(progress=False).fit().transform(extra)  # imports, weights, the network: once

    cold_s, warm_s, fit_s = [], [], []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            c, cold = _timed(lambda: PretrainedFeatureExtractor(cache=tmp, progress=False).fit_transform(paths))
            b0 = counts.snapshot()
            w, warm = _timed(lambda: PretrainedFeatureExtractor(cache=tmp, progress=False).fit_transform(paths))
            b1 = counts.snapshot()
            assert np.array_equal(cold, warm)
            cold_s.append(c)
            warm_s.append(w)
    warm_builds, warm_images = b1[0] - b0[0], b1[1] - b0[1]
    for _ in range(args.fits):
        fit_s.append(_timed(lambda: PretrainedFeatureExtractor(progress=False).fit())[0])
    cold, warm, fit = statistics.median(cold_s), statistics.median(warm_s), statistics.median(fit_s)
    print(f"\n{'':<44}{'seconds':>10}")
    print(f"{'fit_transform, cache empty (cold)':<44}{cold:>10.3f}")
    print(f"{'fit_transform, every image cached (warm)':<44}{warm:>10.4f}   cold/warm = {cold / warm:.0f}x")
    print(f"{'fit alone, warm (median of %d)' % args.fits:<44}{fit * 1000:>9.2f}ms")
    print(f"   warm fit_transform: {warm_builds} network builds, {warm_images} images through a backbone")

    grid_warm, grid_cold, n_fits = [], [], 0
    for _ in range(max(1, args.repeats // 2)):
        with tempfile.TemporaryDirectory() as tmp:
            b0 = counts.snapshot()
            gc_s, search = _timed(lambda: _search(paths, y, tmp))  # starts from an empty cache
            b1 = counts.snapshot()
            gw_s, search_w = _timed(lambda: _search(paths, y, tmp))  # every image cached
            b2 = counts.snapshot()
        grid_cold.append(gc_s)
        grid_warm.append(gw_s)
        n_fits = len(search.cv_results_["params"]) * 5 + 1
        assert search.best_params_ == search_w.best_params_
    gw, gcold = statistics.median(grid_warm), statistics.median(grid_cold)
    print(f"\nGridSearchCV, 3 layers x 2 poolings x 3 C x 5 folds = {n_fits} fits, 1 BLAS thread")
    print(f"{'cache warm':<44}{gw:>10.2f}   ({b2[0] - b1[0]} network builds, {b2[1] - b1[1]} images through a backbone)")
    print(f"{'cache empty at the start':<44}{gcold:>10.2f}   ({b1[0] - b0[0]} network builds, {b1[1] - b0[1]} images)")
    print(f"   best: {search_w.best_params_}, CV accuracy {search_w.best_score_:.3f}")
    write_results(args.out, {
        "machine": mach, "torch": torch.__version__, "featx": __version__, "threads": torch.get_num_threads(),
        "n_images": len(paths), "repeats": args.repeats,
        "fit_transform": {"cold_s": cold, "warm_s": warm, "ratio": cold / warm, "warm_network_builds": warm_builds,
                          "warm_images_computed": warm_images, "cold_runs_s": cold_s, "warm_runs_s": warm_s},
        "warm_fit": {"median_ms": fit * 1000, "fits": args.fits},
        "grid_search": {"fits": n_fits, "warm_s": gw, "cold_s": gcold, "warm_runs_s": grid_warm,
                        "cold_runs_s": grid_cold, "warm_network_builds": b2[0] - b1[0],
                        "warm_images_computed": b2[1] - b1[1], "best_score": search_w.best_score_},
    })


if __name__ == "__main__":
    main()
