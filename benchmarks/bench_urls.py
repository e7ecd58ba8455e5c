"""Images at URLs: throughput from a real S3 endpoint (moto's server on loopback) vs the same files on disk.

Side by side in one process, rounds interleaved, medians: featx's default
extractor (no cache) over ``--n`` 500x375 JPEGs read from local paths, from
``s3://`` URLs (cold: every object downloaded), and a warm second pass over
the URLs with a cache (no image bytes downloaded: the objects' ETags answer).
Decode-bound on two cores, so the gap is what reading through fsspec and the
S3 protocol costs. Needs ``moto[server]`` and ``s3fs`` (the test extra).

    python benchmarks/bench_urls.py [--n 96] [--rounds 3] [--out benchmarks/results/bench_urls.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _data import machine, make_jpegs, write_results

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from s3server import KEYS, MotoServer  # noqa: E402 - the tests' loopback S3 endpoint


def _rate(paths, **kw) -> tuple[float, object]:
    from featx import PretrainedFeatureExtractor

    ext = PretrainedFeatureExtractor(progress=False, **kw).fit()
    t = time.perf_counter()
    X = ext.transform(paths)
    return len(paths) / (time.perf_counter() - t), (X, ext.last_run_)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "bench_urls.json"))
    args = ap.parse_args()

    import numpy as np
    import torch

    info = machine()
    print(info["line"])
    tmp = Path(tempfile.mkdtemp(prefix="featx-bench-urls-"))
    paths, _ = make_jpegs(tmp / "jpg", args.n)
    srv = MotoServer()
    os.environ.update(KEYS, AWS_ENDPOINT_URL=srv.endpoint)
    try:
        bucket = srv.bucket()
        fs = srv.fs()
        for p in paths:
            fs.pipe_file(f"{bucket}/img/{Path(p).name}", Path(p).read_bytes())
        urls = [f"s3://{bucket}/img/{Path(p).name}" for p in paths]
        _rate(paths[:8])  # warm-up: the network built, the decoder's threads started
        rates = {"local files": [], "s3 URLs, cold": [], "s3 URLs, warm cache": []}
        for r in range(args.rounds):
            local, (want, _) = _rate(paths)
            rates["local files"].append(local)
            cache = str(tmp / f"cache{r}")
            cold, (got, _) = _rate(urls, cache=cache)
            rates["s3 URLs, cold"].append(cold)
            warm, (again, stats) = _rate(urls, cache=cache)
            rates["s3 URLs, warm cache"].append(warm)
            assert np.array_equal(got, want) and np.array_equal(again, want) and stats.cache_hits == len(urls)
            print(f"round {r + 1}: local {local:.1f}, s3 cold {cold:.1f}, s3 warm {warm:.1f} img/s")
    finally:
        srv.stop()
    med = {k: statistics.median(v) for k, v in rates.items()}
    base = med["local files"]
    for k, v in med.items():
        print(f"{k:<22} {v:7.1f} img/s  ({v / base:.2f} of local)")
    write_results(args.out, {"machine": info, "torch": torch.__version__, "n_images": args.n, "rounds": args.rounds,
                             "image": "500x375 JPEG", "extractor": "PretrainedFeatureExtractor() defaults",
                             "median_images_per_s": med, "per_round_images_per_s": rates,
                             "ratio_to_local": {k: v / base for k, v in med.items()}})


if __name__ == "__main__":
    main()
