"""Shared object-store cache benchmark: cold vs warm against a real S3 server, with and without the local layer.

Runs moto's S3 server on the loopback address (``pip install 'moto[server]' s3fs``)
and the offline default backbone over real JPEG photos (random 500x375 crops
of scikit-image's bundled photographs):

    python benchmarks/bench_shared_cache.py [--n 128] [--repeats 3]

Prints, in one run, images/s (median of ``--repeats``) and S3 requests per
image for:

- no cache, and the local SQLite cache warm (the references);
- S3 cold (computes and publishes), with the local read-through layer and without;
- S3 warm on the same machine (the local layer answers: no request);
- S3 warm on another machine (an empty local cache: one GET per image, then
  local), and with the local layer turned off (``FEATX_CACHE_READ_THROUGH=0``).

Loopback S3 is a best case for latency; the request counts are what carries
over to a real bucket.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent / "tests"))
from _data import machine, make_jpegs, write_results  # noqa: E402
from s3server import KEYS, MotoServer  # noqa: E402

from featx import PretrainedFeatureExtractor  # noqa: E402
from featx._cache.objects import SharedCache  # noqa: E402


def _machine_switch(tmp: str, read_through: bool) -> None:
    """As if on a new machine: an empty local cache directory, no open handles."""
    os.environ["FEATX_CACHE_DIR"] = str(Path(tmp) / f"local-{uuid.uuid4().hex[:8]}")
    os.environ["FEATX_CACHE_READ_THROUGH"] = "1" if read_through else "0"
    SharedCache._registry.clear()


def _server_cpu(pid: int) -> float:
    """CPU seconds the S3 server process has used (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _timed(paths: list[str], cache) -> tuple[float, np.ndarray, dict]:
    """One transform: images/s, the features, and the S3 requests it made (per image)."""
    ext = PretrainedFeatureExtractor(cache=cache, progress=False).fit()
    before = dict(SharedCache.open(cache).store_.requests) if isinstance(cache, str) and "://" in cache else None
    t = time.perf_counter()
    out = ext.transform(paths)
    rate = len(paths) / (time.perf_counter() - t)
    per_image = {}
    if before is not None:
        after = SharedCache.open(cache).store_.requests
        per_image = {k: (after[k] - before[k]) / len(paths) for k in ("get", "put")}
    return rate, out, per_image


def _row(key: str, name: str, rates: list[float], requests: dict, results: dict) -> None:
    med = statistics.median(rates)
    req = f"GET {requests.get('get', 0):.2f}  PUT {requests.get('put', 0):.2f}" if requests else "-"
    print(f"{name:<46} {med:>8.1f} img/s   requests/image: {req}")
    results[key] = {"label": name, "images_per_s": med, "runs": rates,
                    "get_per_image": requests.get("get", 0.0), "put_per_image": requests.get("put", 0.0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=128, help="number of JPEG images (default 128)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per row (median reported)")
    ap.add_argument("--data", default=str(Path(tempfile.gettempdir()) / "featx-bench-jpegs"))
    ap.add_argument("--out", default=str(ROOT / "results" / "bench_shared_cache.json"))
    args = ap.parse_args()

    mach = machine()
    paths, _ = make_jpegs(args.data, args.n)
    print(f"featx shared cache benchmark: {len(paths)} JPEGs 500x375, efficientnet_lite0 (precision auto), "
          f"moto S3 server on loopback\nmachine: {mach['line']}\n")
    os.environ.update(KEYS)
    server = MotoServer()
    os.environ["AWS_ENDPOINT_URL"] = server.endpoint
    results: dict = {"n_images": len(paths), "machine": mach, "rows": {}}
    rows = results["rows"]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            _machine_switch(tmp, True)
            PretrainedFeatureExtractor(progress=False).fit().transform(paths[:8])  # warm the process
            ref = None
            rates = []
            for _ in range(args.repeats):
                r, ref, _ = _timed(paths, None)
                rates.append(r)
            _row("none", "no cache", rates, {}, rows)
            local = str(Path(tmp) / "sqlite")
            _timed(paths, local)
            _row("sqlite_warm", "local SQLite cache, warm", [_timed(paths, local)[0] for _ in range(args.repeats)], {},
                 rows)

            for read_through in (True, False):
                label = "with local layer" if read_through else "no local layer"
                tag = "local" if read_through else "nolocal"
                cold, warm_other, reqs_cold, reqs_other, server_ms = [], [], {}, {}, []
                for _ in range(args.repeats):
                    url = f"s3://{server.bucket()}/featx"
                    _machine_switch(tmp, read_through)
                    cpu = _server_cpu(server.proc.pid)
                    r, out, reqs_cold = _timed(paths, url)
                    server_ms.append(1000 * (_server_cpu(server.proc.pid) - cpu) / len(paths))
                    assert np.array_equal(out, ref)
                    cold.append(r)
                    _machine_switch(tmp, read_through)
                    r, out, reqs_other = _timed(paths, url)
                    assert np.array_equal(out, ref)
                    warm_other.append(r)
                _row(f"s3_cold_{tag}", f"S3 cold, {label}", cold, reqs_cold, rows)
                rows[f"s3_cold_{tag}"]["server_cpu_ms_per_image"] = statistics.median(server_ms)
                print(f"{'':<46} (the S3 server used {statistics.median(server_ms):.1f} ms of CPU per image, "
                      "on the same cores)")
                _row(f"s3_other_{tag}", f"S3 warm, another machine, {label}", warm_other, reqs_other, rows)
                if read_through:
                    same = [_timed(paths, url) for _ in range(args.repeats)]
                    _row("s3_same", "S3 warm, same machine (local layer answers)", [s[0] for s in same], same[-1][2],
                         rows)
    finally:
        server.stop()
    write_results(args.out, results)


if __name__ == "__main__":
    main()
