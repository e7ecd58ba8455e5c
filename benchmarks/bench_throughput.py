"""CPU/GPU throughput of featx from JPEG files against the bare model, first call included, and 12 MP photos.

    python benchmarks/bench_throughput.py [--n 96,1024] [--models efficientnet_lite0,resnet50]
                                          [--repeats 3] [--device cpu] [--no-rss]

On real JPEG files (500x375 crops of scikit-image's photographs), in one run,
per backbone, images/s of:

  (b)   the bare model's fp32 eager forward pass on already-decoded, resized,
        normalised tensors, at its best batch size and memory format: a sweep
        (medians of interleaved runs per configuration) picks the
        configuration, which is then timed in the same interleaved rounds as
        featx, so a/b compares runs minutes apart on this noisy shared machine
        never, and the sweep's best-of-many pick is not inflated by noise;
  (b16) the same with bf16 autocast, where the CPU has native bf16 (context);
  (a)   featx with its defaults (``cache=None`` only) from files, for each N:
        the *first* ``transform`` of a freshly fitted extractor and a second
        call on the same N images;
  (a32) featx with ``precision="fp32"`` from files (steady state);
  (ort) featx with ``backend="onnxruntime"`` (fp32) from files, if installed;
  (a8)  featx with ``precision="int8"`` from files, if torchao is installed and
        the device is the CPU, with its package already in the artifact store
        (built by the warm-up, which prints how long that took): the first
        call of a freshly fitted extractor (in this process, which keeps the
        package loaded), the steady state, and the first and second calls in
        a new process (which loads the package from disk and checks it;
        import and fit not timed);
  (dec) the decode-only ceiling: featx's own decoding and resizing of the
        files, one thread per core, no model;

and the ratios a/b (first call), first/second, a32/b, ort/a32, a8/b. Then, on
12-megapixel phone-size JPEGs (4000x3000): featx's default against a naive
single-core loop (PIL open, convert, resize, center crop: no model at all),
and featx's 12 MP rate as a fraction of its 500x375 rate. Optionally the peak
resident memory for N vs 4N images. Rates are medians of --repeats runs,
interleaved; each ratio is the median of the ratios within a round (paired).
The header states the CPU's capability and whether the C allocator keeps
freed buffers (featx sets it in ``fit``, :mod:`featx._runtime.malloc`; it is set
before the bare baselines run, so they get it too:
``benchmarks/bench_allocator.py`` measures what it changes); results go to JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _data import machine, make_big_jpegs, make_jpegs, write_results  # noqa: E402

from featx import PretrainedFeatureExtractor  # noqa: E402
from featx._models.backbones import build_backbone  # noqa: E402
from featx._runtime.engines import _ort_installed  # noqa: E402
from featx._runtime.malloc import keep_cpu_buffers  # noqa: E402


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _bare_runner(module, cfg, device, n: int, fmt: str, bs: int, dtype):
    """A callable timing the bare model over n pre-decoded, pre-resized, normalised images (images/s)."""
    h, w = cfg["input_size"]
    mf = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
    x_all = torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(0))
    batches = [x_all[i:i + bs].to(device).contiguous(memory_format=mf) for i in range(0, n, bs)]

    def run():
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            for b in batches:
                module(b)
        if device.type == "cuda":
            torch.cuda.synchronize()

    def rate() -> float:
        module.to(device).to(memory_format=mf).eval()  # the module is shared by the configurations
        run()  # warm-up: first-call costs of this configuration are not part of the steady state
        return n / _timed(run)

    return rate


SWEEP = [1, 2, 4, 8, 16, 32]


def _bare_best(module, cfg, device, n: int, repeats: int, dtype=None) -> tuple[dict, object]:
    """The best batch size x memory format by median of interleaved runs, and a timer for it."""
    sizes = SWEEP if device.type == "cpu" else [16, 32, 64, 128, 256]
    configs = [{"memory_format": fmt, "batch_size": bs} for fmt in ("contiguous", "channels_last") for bs in sizes]
    runners = [_bare_runner(module, cfg, device, n, c["memory_format"], c["batch_size"], dtype) for c in configs]
    rates: list[list[float]] = [[] for _ in configs]
    for _ in range(repeats):
        for r, rn in zip(rates, runners):
            r.append(rn())
    best = max(range(len(configs)), key=lambda i: statistics.median(rates[i]))
    return configs[best], runners[best]


def _naive_pil(paths: list[str], cfg: dict) -> None:
    """What a user writes first: PIL open, convert, resize the shorter side, center crop (one core)."""
    from PIL import Image

    rs = cfg["resize_size"]
    ch, cw = cfg["input_size"]
    for p in paths:
        img = Image.open(p).convert("RGB")
        w, h = img.size
        s = rs / min(w, h)
        img = img.resize((max(cw, round(w * s)), max(ch, round(h * s))), Image.BICUBIC)
        left, top = (img.size[0] - cw) // 2, (img.size[1] - ch) // 2
        np.asarray(img.crop((left, top, left + cw, top + ch)))


def _decode_only(paths: list[str], cfg: dict) -> None:
    """featx's decoding and resizing alone, one thread per core (the ceiling of a decode-bound model)."""
    from concurrent.futures import ThreadPoolExecutor

    from featx._images.preprocess import load_item, resize_crop

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        list(pool.map(lambda p: resize_crop(load_item(p, cfg["resize_size"]), cfg), paths))


def _int8_available(device) -> bool:
    import importlib.util

    return device.type == "cpu" and importlib.util.find_spec("torchao") is not None


def _paired(samples: dict[str, list[float]], num: str, den: str) -> float:
    """Median over the interleaved rounds of the ratio of two rates measured in the same round."""
    return statistics.median(a / b for a, b in zip(samples[num], samples[den]))


def _model_rows(model: str, paths: list[str], sizes: list[int], device, repeats: int, big: list[str]) -> dict:
    weights = "DEFAULT" if model.startswith("efficientnet_lite") else None
    kw = dict(weights=weights, device=str(device), progress=False)
    default = PretrainedFeatureExtractor(model, **kw).fit()
    cfg = default.preprocess_
    row: dict = {"precision_auto": default.precision_, "streams": default.streams_}
    module = build_backbone(model, weights).module
    n_bare = 64
    bare = {}
    row["b_config"], bare["b_bare_fp32"] = _bare_best(module, cfg, device, n_bare, repeats)
    if default.autocast_dtype_ is not None:
        row["b16_config"], bare["b16_bare_bf16"] = _bare_best(module, cfg, device, n_bare, repeats,
                                                              default.autocast_dtype_)
    exts = {"a32": PretrainedFeatureExtractor(model, precision="fp32", **kw).fit()}
    if device.type == "cpu" and _ort_installed():
        exts["ort"] = PretrainedFeatureExtractor(model, backend="onnxruntime", cache=None, **kw).fit()
    if _int8_available(device):
        exts["a8"] = PretrainedFeatureExtractor(model, precision="int8", **kw).fit()
    for name, ext in exts.items():
        t = _timed(lambda: ext.transform(paths[:8]))  # warm-up (ONNX export, int8 package)
        if name == "a8":
            row["a8_warmup_seconds"] = t
            print(f"  {model}: int8 warm-up (quantise and compile, or load the package) {t:.1f} s")
    samples: dict[str, list[float]] = {}
    nmax = max(sizes)
    for _ in range(repeats):  # interleaved: the bare baselines too
        for name, rate in bare.items():
            samples.setdefault(name, []).append(rate())
        for n in sizes:
            fresh = PretrainedFeatureExtractor(model, **kw).fit()
            samples.setdefault(f"a_first_{n}", []).append(n / _timed(lambda: fresh.transform(paths[:n])))
            samples.setdefault(f"a_second_{n}", []).append(n / _timed(lambda: fresh.transform(paths[:n])))
        for name, ext in exts.items():
            samples.setdefault(name, []).append(nmax / _timed(lambda: ext.transform(paths[:nmax])))
        if "a8" in exts:  # a fresh extractor over the warm store: this process keeps the package loaded
            fresh8 = PretrainedFeatureExtractor(model, precision="int8", **kw).fit()
            samples.setdefault("a8_first", []).append(sizes[0] / _timed(lambda: fresh8.transform(paths[:sizes[0]])))
            # a new process over the warm store: it loads the package from disk and checks it
            first, second = _fresh_process_rates(model, paths[:sizes[0]], str(device), "int8")
            samples.setdefault("a8_first_process", []).append(first)
            samples.setdefault("a8_second_process", []).append(second)
        samples.setdefault("dec", []).append(nmax / _timed(lambda: _decode_only(paths[:nmax], cfg)))
        samples.setdefault("a_12mp", []).append(len(big) / _timed(lambda: default.transform(big)))
        samples.setdefault("naive_pil_12mp_1core", []).append(len(big) / _timed(lambda: _naive_pil(big, cfg)))
    row.update({k: statistics.median(v) for k, v in samples.items()})
    row["samples"] = samples
    for n in sizes:
        row[f"a/b_first_{n}"] = _paired(samples, f"a_first_{n}", "b_bare_fp32")
        row[f"first/second_{n}"] = _paired(samples, f"a_first_{n}", f"a_second_{n}")
    row["a32/b"] = _paired(samples, "a32", "b_bare_fp32")
    if "ort" in row:
        row["ort/a32"] = _paired(samples, "ort", "a32")
    if "a8" in row:
        row["a8/b"] = _paired(samples, "a8", "b_bare_fp32")
        row["a8_first/b"] = _paired(samples, "a8_first", "b_bare_fp32")
        row["a8_first_process/b"] = _paired(samples, "a8_first_process", "b_bare_fp32")
        row["a8_first/second_process"] = _paired(samples, "a8_first_process", "a8_second_process")
    row["dec/b"] = _paired(samples, "dec", "b_bare_fp32")
    row["12mp/naive_pil"] = _paired(samples, "a_12mp", "naive_pil_12mp_1core")
    row["12mp/500x375"] = _paired(samples, "a_12mp", f"a_second_{nmax}")
    return row


def _print_model(model: str, row: dict, sizes: list[int], repeats: int) -> None:
    p = lambda label, v, extra="": print(f"  {label:<58}{v:>8.1f} img/s{extra}")  # noqa: E731
    print(f"\n{model}: featx default precision {row['precision_auto']}, {row['streams']} stream(s); "
          f"medians of {repeats} interleaved runs")
    p("(b) bare fp32 eager forward, best config", row["b_bare_fp32"],
      f"   batch {row['b_config']['batch_size']}, {row['b_config']['memory_format']}")
    if "b16_bare_bf16" in row:
        p("(b16) bare bf16 autocast forward, best config (context)", row["b16_bare_bf16"],
          f"   batch {row['b16_config']['batch_size']}, {row['b16_config']['memory_format']}")
    for n in sizes:
        p(f"(a) featx default from JPEG, first call, N={n}", row[f"a_first_{n}"], f"   a/b = {row[f'a/b_first_{n}']:.2f}")
        p(f"(a) featx default from JPEG, second call, N={n}", row[f"a_second_{n}"],
          f"   first/second = {row[f'first/second_{n}']:.2f}")
    p("(a32) featx precision='fp32' from JPEG", row["a32"], f"   a32/b = {row['a32/b']:.2f}")
    if "ort" in row:
        p("(ort) featx backend='onnxruntime' (fp32) from JPEG", row["ort"], f"   ort/a32 = {row['ort/a32']:.2f}")
    if "a8" in row:
        p(f"(a8) featx precision='int8' from JPEG, first call, N={sizes[0]}", row["a8_first"],
          f"   a8/b = {row['a8_first/b']:.2f} (warm store)")
        p("(a8) featx precision='int8' from JPEG, steady state", row["a8"], f"   a8/b = {row['a8/b']:.2f}")
        p(f"(a8) int8, first call of a new process, N={sizes[0]}", row["a8_first_process"],
          f"   a8/b = {row['a8_first_process/b']:.2f}, first/second = {row['a8_first/second_process']:.2f}")
    p("(dec) decode-only ceiling: featx's decoding, one thread per core", row["dec"], f"   dec/b = {row['dec/b']:.2f}")
    p("(12mp) featx default, 4000x3000 JPEGs", row["a_12mp"],
      f"   {row['12mp/500x375']:.2f} of its 500x375 rate")
    p("(pil) naive PIL loop on one core, 4000x3000 (no model)", row["naive_pil_12mp_1core"],
      f"   featx/naive = {row['12mp/naive_pil']:.2f}")


_RATES_CHILD = textwrap.dedent("""
    import json, sys, time
    from featx import PretrainedFeatureExtractor
    paths, model, device, precision = json.load(open(sys.argv[1])), sys.argv[2], sys.argv[3], sys.argv[4]
    ext = PretrainedFeatureExtractor(model, weights="DEFAULT" if model.startswith("efficientnet_lite") else None,
                                     device=device, precision=precision, progress=False).fit()
    rates = []
    for _ in range(2):
        t = time.perf_counter()
        ext.transform(paths)
        rates.append(len(paths) / (time.perf_counter() - t))
    print(json.dumps(rates))
""")


def _child(script: str, paths: list[str], *args: str):
    """Run ``script`` in a new Python process with ``paths`` (a JSON file) and ``args``; its last line, as JSON."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(paths, f)
    try:
        res = subprocess.run([sys.executable, "-c", script, f.name, *args], capture_output=True, text=True, check=True)
    finally:
        os.unlink(f.name)
    return json.loads(res.stdout.strip().splitlines()[-1])


def _fresh_process_rates(model: str, paths: list[str], device: str, precision: str) -> tuple[float, float]:
    """images/s of the first and second ``transform`` of ``paths`` in a new process (import and fit not timed)."""
    first, second = _child(_RATES_CHILD, paths, model, device, precision)
    return first, second


_RSS_CHILD = textwrap.dedent("""
    import json, os, resource, sys, tempfile
    from featx import PretrainedFeatureExtractor
    paths = json.load(open(sys.argv[1]))
    model = sys.argv[2]
    ext = PretrainedFeatureExtractor(model, weights="DEFAULT" if model.startswith("efficientnet_lite") else None,
                                     device=sys.argv[3], progress=False).fit()
    ext.transform(paths[:8])
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if sys.argv[4] == "npy":
        out = ext.transform_to_npy(paths, os.path.join(tempfile.mkdtemp(), "features.npy"))
    else:
        out = ext.transform(paths)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"base_kib": base, "peak_kib": peak, "out_bytes": out.nbytes}))
""")


def _peak_rss(model: str, paths: list[str], device: str, mode: str) -> dict:
    return _child(_RSS_CHILD, paths, model, device, mode)


def _rss_rows(model: str, data: str, n: int, device: str) -> dict:
    paths4, _ = make_jpegs(data, 4 * n)
    rows = {}
    for mode in ("memory", "npy"):
        small, big = _peak_rss(model, paths4[:n], device, mode), _peak_rss(model, paths4, device, mode)
        extra = big["out_bytes"] - small["out_bytes"]
        growth = (big["peak_kib"] - small["peak_kib"]) * 1024
        rows[mode] = {"model": model, "N": n, "N_peak_mib": small["peak_kib"] / 1024,
                      "4N_peak_mib": big["peak_kib"] / 1024, "extra_output_mib": extra / 2**20,
                      "growth_mib": growth / 2**20}
        print(f"\npeak RSS ({model}, {mode}): N={n}: {small['peak_kib'] / 1024:.0f} MiB; 4N: "
              f"{big['peak_kib'] / 1024:.0f} MiB; growth {growth / 2**20:.1f} MiB vs extra output {extra / 2**20:.1f} MiB")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", default="96,1024", help="comma-separated transform sizes (first vs second call)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--models", default="efficientnet_lite0,resnet50")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--big", type=int, default=8, help="12 MP JPEGs per timed run")
    ap.add_argument("--data", default=str(Path(tempfile.gettempdir()) / "featx-bench-jpegs"))
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "bench_throughput.json"))
    ap.add_argument("--no-rss", action="store_true", help="skip the N vs 4N peak-memory measurement")
    ap.add_argument("--sweep", default=",".join(map(str, SWEEP)), help="CPU batch sizes the bare baseline tries")
    args = ap.parse_args()
    SWEEP[:] = [int(v) for v in args.sweep.split(",")]

    device = torch.device(args.device)
    sizes = [int(v) for v in args.n.split(",")]
    paths, _ = make_jpegs(args.data, max(sizes))
    big = make_big_jpegs(Path(args.data) / "12mp", args.big)
    mach = machine()
    if device.type == "cuda":
        mach["gpu"] = torch.cuda.get_device_name(device)
    if device.type == "cpu":  # what featx's fit does: in this process, the bare baselines keep buffers too
        mach["allocator_kept"] = keep_cpu_buffers()
        mach["line"] += f"; C allocator keeps freed buffers: {'yes' if mach['allocator_kept'] else 'no'}"
    print(f"featx throughput, device {device}: {mach['line']}" + (f", {mach['gpu']}" if "gpu" in mach else ""))
    print(f"{max(sizes)} JPEGs 500x375 and {len(big)} JPEGs 4000x3000")
    results = {"device": str(device), "machine": mach, "sizes": sizes, "models": {}}
    for model in args.models.split(","):
        row = _model_rows(model, paths, sizes, device, args.repeats, big)
        results["models"][model] = row
        _print_model(model, row, sizes, args.repeats)
    if not args.no_rss:
        results["peak_rss"] = _rss_rows(args.models.split(",")[0], args.data, 256, args.device)
    write_results(args.out, results)


if __name__ == "__main__":
    main()
