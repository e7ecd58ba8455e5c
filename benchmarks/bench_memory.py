"""Peak memory of ``transform_to_npy`` over a warm cache: 1,000 vs 10,000 cached images.

    python benchmarks/bench_memory.py [--n 1000,10000]

Builds a cache of the largest N small JPEGs (efficientnet_lite0 with its
ImageNet weights, 1280 features, ``preprocess={"input_size": 64}`` to keep
the build short), then, in a fresh process per N, runs ``transform_to_npy``
over the first N (every row a cache hit) and reports the peak resident set
size (``ru_maxrss``) after the extractor was fitted and warmed on 8 images.
The output's own pages are a memory-mapped file, so the growth from N to 10N
should be far below the size of the extra rows held in memory.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _data import machine, write_results  # noqa: E402

_CHILD = """
import json, resource, sys
from featx import PretrainedFeatureExtractor
paths = json.load(open(sys.argv[1]))[:int(sys.argv[3])]
ext = PretrainedFeatureExtractor(preprocess={"input_size": 64}, cache=sys.argv[2], progress=False).fit()
ext.transform(paths[:8])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = ext.transform_to_npy(paths, sys.argv[4])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"base_mib": base / 1024, "peak_mib": peak / 1024, "hits": ext.last_run_.cache_hits,
                  "row_bytes": int(out.shape[1] * 4)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", default="1000,10000")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "bench_memory.json"))
    args = ap.parse_args()
    sizes = [int(v) for v in args.n.split(",")]
    mach = machine()
    print(f"transform_to_npy over a warm cache: {mach['line']}")
    from PIL import Image

    from featx import PretrainedFeatureExtractor

    tmp = Path(tempfile.mkdtemp(prefix="featx-bench-memory-"))
    rng = np.random.default_rng(0)
    paths = []
    for i in range(max(sizes)):
        p = tmp / "img" / f"{i:05d}.jpg"
        p.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(p, quality=85)
        paths.append(str(p))
    cache = tmp / "cache"
    PretrainedFeatureExtractor(preprocess={"input_size": 64}, cache=str(cache), progress=False).fit().transform(paths)
    listing = tmp / "paths.json"
    listing.write_text(json.dumps(paths))
    rows = {}
    for n in sizes:
        res = subprocess.run([sys.executable, "-c", _CHILD, str(listing), str(cache), str(n), str(tmp / f"{n}.npy")],
                             capture_output=True, text=True, check=True)
        rows[str(n)] = json.loads(res.stdout.strip().splitlines()[-1])
        r = rows[str(n)]
        print(f"  N={n:>6}: peak RSS {r['peak_mib']:.0f} MiB (after warm-up {r['base_mib']:.0f} MiB), "
              f"{r['hits']} cache hits")
    lo, hi = str(min(sizes)), str(max(sizes))
    growth = rows[hi]["peak_mib"] - rows[lo]["peak_mib"]
    extra = (int(hi) - int(lo)) * rows[hi]["row_bytes"] / 2**20
    print(f"  growth {growth:.1f} MiB for {int(hi) - int(lo)} more rows ({extra:.1f} MiB of features, kept on disk)")
    write_results(args.out, {"machine": mach, "sizes": sizes, "rows": rows, "growth_mib": growth,
                             "extra_rows_mib": extra})


if __name__ == "__main__":
    main()
