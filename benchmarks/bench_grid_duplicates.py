"""Images computed more than once by a parallel grid search sharing one cache.

    python benchmarks/bench_grid_duplicates.py [--n 80] [--n-jobs 2]

``GridSearchCV(n_jobs=2)`` over a Pipeline(extractor with ``cache=``,
logistic regression) on N labelled images: its worker processes fit and
transform the same images at the same time. Every transform appends the
number of images it pushed through the backbone to a log; the duplicates are
that sum minus N (0: each image computed once, by one worker). Also the
search's wall time. BLAS runs one thread per worker.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _data import machine, write_results  # noqa: E402

from featx import PretrainedFeatureExtractor  # noqa: E402


class LoggedExtractor(PretrainedFeatureExtractor):
    """Appends ``computed`` of every transform to $FEATX_BENCH_LOG (defined in __main__: sent to workers by value)."""

    def transform(self, X):
        out = super().transform(X)
        with open(os.environ["FEATX_BENCH_LOG"], "a") as f:
            f.write(f"{os.getpid()} {self.last_run_.computed}\n")
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=80)
    ap.add_argument("--n-jobs", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "bench_grid_duplicates.json"))
    args = ap.parse_args()
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import make_pipeline

    from featx import load_image_folder, make_demo_folder

    mach = machine()
    print(f"parallel grid search over one cache: {mach['line']}")
    tmp = Path(tempfile.mkdtemp(prefix="featx-bench-grid-"))
    folder = make_demo_folder(tmp / "demo", n_per_class=max(2, args.n // 8), size=64)
    paths, y, _ = load_image_folder(folder)
    paths, y = paths[:args.n], y[:args.n]
    log = tmp / "computed.log"
    os.environ["FEATX_BENCH_LOG"] = str(log)
    pipe = make_pipeline(LoggedExtractor(preprocess={"input_size": 96}, cache=str(tmp / "cache"), progress=False),
                         LogisticRegression(max_iter=500))
    grid = GridSearchCV(pipe, {"logisticregression__C": [0.1, 1.0]}, cv=3, n_jobs=args.n_jobs)
    t0 = time.perf_counter()
    grid.fit(paths, y)
    seconds = time.perf_counter() - t0
    lines = [line.split() for line in log.read_text().splitlines()]
    computed = sum(int(c) for _, c in lines)
    workers = len({pid for pid, _ in lines})
    dups = computed - len(paths)
    print(f"  {len(paths)} images, {len(lines)} transforms in {workers} processes: {computed} computed, "
          f"{dups} duplicates; {seconds:.1f} s")
    write_results(args.out, {"machine": mach, "n_images": len(paths), "n_jobs": args.n_jobs, "transforms": len(lines),
                             "processes": workers, "computed": computed, "duplicates": dups, "seconds": seconds})


if __name__ == "__main__":
    main()
