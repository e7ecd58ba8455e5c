"""Embedding cache benchmark: cold vs warm transform, and a whole GridSearchCV.

Run on the offline default backbone over real JPEG photos (random 500x375
crops of scikit-image's bundled photographs; the class of an image is its
source photograph):

    python benchmarks/bench_cache.py [--n 200] [--out benchmarks/results/bench_cache.json]

Prints, in one run:

- cold vs warm ``transform`` time and their ratio (and warm with every file
  re-hashed, to show what the path+size+mtime index saves);
- ``GridSearchCV`` (5 folds x 4 values of C x 3 layers, StandardScaler +
  LogisticRegression) wall time and the number of images the backbone
  processed, for: the featx cache, sklearn ``Pipeline(memory=joblib.Memory)``,
  and no cache;
- the floor: one cold extraction of the three layers plus the classifier fits
  alone on the precomputed features.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import joblib
import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _data import make_jpegs, write_results  # noqa: E402

from featx import PretrainedFeatureExtractor  # noqa: E402
from featx._cache import sqlite as _cache  # noqa: E402
from featx._runtime.runner import Runner  # noqa: E402

_COMPUTED = [0]
_forward = Runner.forward


def _counting_forward(self, batch):
    """Runner.forward, counting the images pushed through a backbone (GridSearchCV's clones included)."""
    _COMPUTED[0] += batch.shape[0]
    return _forward(self, batch)


Runner.forward = _counting_forward


def total_computed() -> int:
    return _COMPUTED[0]

LAYERS = ["stage4", "stage5", "pre_logits"]
CS = [0.01, 0.1, 1.0, 10.0]


def _clf():
    return LogisticRegression(max_iter=2000)


def _grid(paths, y, cache=None, memory=None):
    ext = PretrainedFeatureExtractor(cache=cache, progress=False)
    pipe = Pipeline([("ext", ext), ("scale", StandardScaler()), ("clf", _clf())], memory=memory)
    grid = {"ext__layers": LAYERS, "clf__C": CS}
    cv = StratifiedKFold(5, shuffle=True, random_state=0)
    before = total_computed()
    start = time.perf_counter()
    search = GridSearchCV(pipe, grid, cv=cv).fit(paths, y)
    return time.perf_counter() - start, total_computed() - before, search.best_score_


def _floor(paths, y):
    start = time.perf_counter()
    ext = PretrainedFeatureExtractor(layers=LAYERS, progress=False).fit()
    feats = ext.transform(paths)
    extract = time.perf_counter() - start
    names = ext.get_feature_names_out()
    cv = StratifiedKFold(5, shuffle=True, random_state=0)
    t = time.perf_counter()
    best = 0.0
    for layer in LAYERS:
        cols = np.array([n.startswith(layer + "_") for n in names])
        search = GridSearchCV(make_pipeline(StandardScaler(), _clf()), {"logisticregression__C": CS}, cv=cv).fit(feats[:, cols], y)
        best = max(best, search.best_score_)
    return extract, time.perf_counter() - t, best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="number of JPEG images (default 200)")
    ap.add_argument("--data", default=str(Path(tempfile.gettempdir()) / "featx-bench-jpegs"))
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "bench_cache.json"))
    ap.add_argument("--repeats", type=int, default=5, help="warm transform repeats (median reported)")
    ap.add_argument("--grid-repeats", type=int, default=3, help="featx-cache search and floor repeats (medians)")
    args = ap.parse_args()

    paths, labels = make_jpegs(args.data, args.n)
    y = np.asarray(labels)  # class = source photograph
    print(f"featx cache benchmark: {len(paths)} JPEGs 500x375, efficientnet_lite0, CPU, "
          f"{os.cpu_count()} cores, torch threads {__import__('torch').get_num_threads()}, {platform.processor() or platform.machine()}")
    PretrainedFeatureExtractor(progress=False).fit().transform(paths[:8])  # warm the process (imports, weights)

    results: dict = {"n_images": len(paths), "machine": platform.platform(), "cores": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        ext = PretrainedFeatureExtractor(cache=tmp, progress=False).fit()
        t = time.perf_counter()
        cold_out = ext.transform(paths)
        cold = time.perf_counter() - t
        warm_times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            warm_out = ext.transform(paths)
            warm_times.append(time.perf_counter() - t)
        warm = statistics.median(warm_times)
        assert np.array_equal(cold_out, warm_out)
        racy = _cache._RACY_NS
        _cache._RACY_NS = 10**30  # every file looks freshly modified: re-hashed on each call
        rehash_times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            ext.transform(paths)
            rehash_times.append(time.perf_counter() - t)
        _cache._RACY_NS = racy
        rehash = statistics.median(rehash_times)
    print()
    print(f"{'transform':<34}{'seconds':>10}")
    print(f"{'cold (cache empty)':<34}{cold:>10.3f}")
    print(f"{'warm (median of %d)' % args.repeats:<34}{warm:>10.4f}")
    print(f"{'warm, every file re-hashed':<34}{rehash:>10.4f}")
    print(f"cold / warm = {cold / warm:.0f}x   (re-hashing costs {rehash / warm:.2f}x the warm call)")
    results["transform"] = {"cold_s": cold, "warm_s": warm, "warm_rehash_s": rehash, "ratio": cold / warm}

    # The featx-cache search and the floor are short: run them --grid-repeats
    # times, interleaved, and report medians (the machine is shared and noisy).
    cache_runs, floor_runs = [], []
    for _ in range(args.grid_repeats):
        with tempfile.TemporaryDirectory() as tmp:
            cache_runs.append(_grid(paths, y, cache=tmp))
        floor_runs.append(_floor(paths, y))
    rows = [("featx cache (cold start)", statistics.median(r[0] for r in cache_runs), cache_runs[0][1], cache_runs[0][2])]
    with tempfile.TemporaryDirectory() as tmp:
        wall, n, score = _grid(paths, y, memory=joblib.Memory(tmp, verbose=0))
        rows.append(("Pipeline(memory=joblib.Memory)", wall, n, score))
    wall, n, score = _grid(paths, y)
    rows.append(("no cache", wall, n, score))
    extract = statistics.median(r[0] for r in floor_runs)
    fits = statistics.median(r[1] for r in floor_runs)
    fscore = floor_runs[0][2]
    floor = statistics.median(r[0] + r[1] for r in floor_runs)
    ratios = [c[0] / (f[0] + f[1]) for c, f in zip(cache_runs, floor_runs)]

    print()
    print(f"GridSearchCV: 5 folds x {len(CS)} C x {len(LAYERS)} layers = {5 * len(CS) * len(LAYERS)} fits (+ refit), N = {len(paths)}")
    print(f"{'configuration':<34}{'wall s':>10}{'images through backbone':>26}{'x N':>7}{'x floor':>9}{'best acc':>10}")
    for name, wall, n, score in rows:
        print(f"{name:<34}{wall:>10.1f}{n:>26}{n / len(paths):>7.1f}{wall / floor:>9.2f}{score:>10.3f}")
    print(f"{'floor: 1 extraction + fits':<34}{floor:>10.1f}{len(paths):>26}{1.0:>7.1f}{1.0:>9.2f}{fscore:>10.3f}")
    print(f"   (extraction {extract:.1f} s + classifier fits {fits:.1f} s; medians of {args.grid_repeats} interleaved runs;")
    print(f"    featx cache / floor per pair of runs: {', '.join(f'{r:.2f}' for r in ratios)}, median {statistics.median(ratios):.2f})")
    results["grid_search"] = [{"config": name, "wall_s": wall, "images_through_backbone": n, "x_floor": wall / floor,
                               "best_score": score} for name, wall, n, score in rows]
    results["floor"] = {"extract_s": extract, "fits_s": fits, "total_s": floor}
    results["featx_cache_over_floor_per_run"] = ratios
    write_results(args.out, results)


if __name__ == "__main__":
    main()
