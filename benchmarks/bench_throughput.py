"""Throughput of featx against the bare model and a naive loop, and peak memory for N vs 4N images.

    python benchmarks/bench_throughput.py [--n 256] [--device cpu] [--models efficientnet_lite0,resnet18,resnet50]
                                          [--backends torch,onnxruntime]

On the same real JPEG files (500x375 crops of scikit-image's photographs), in
one run, per backbone, it prints images/s for:

  (a) featx end to end from files (transform on paths, cache off);
  (b) the bare model's forward pass on already-decoded, already-resized,
      normalised tensors, at its best batch size and memory format (a sweep);
  (c) a naive per-image loop (PIL open, torchvision transforms, model(x[None]));
  (d) featx on pre-decoded arrays (full-size uint8 images in memory);

and the ratios a/b, a/c, d/b. With several --backends, (a) and (d) are
measured for each (e.g. ``a[onnxruntime]/b``: featx with ONNX Runtime from
files against the best *eager PyTorch* bare forward pass). Then the peak
resident memory of a fresh process running featx on N and on 4N images, into
an in-memory matrix and streamed to a memory-mapped .npy file. Timings are
medians of --repeats runs, interleaved. Results go to a JSON file as well.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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
from _data import make_jpegs, write_results  # noqa: E402

from featx import PretrainedFeatureExtractor  # noqa: E402
from featx._backbones import build_backbone  # noqa: E402
from featx._runner import tuned_batch_sizes  # noqa: E402


def _median_rate(fn, n_images: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return n_images / statistics.median(times)


def _bare_runner(module, cfg, device, n: int, fmt: str, bs: int):
    """A closure running the bare model over n pre-decoded, pre-resized, normalised images."""
    h, w = cfg["input_size"]
    x_all = torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(0))
    mf = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
    m = module.to(device).to(memory_format=mf).eval()
    batches = [x_all[i:i + bs].to(device).contiguous(memory_format=mf) for i in range(0, n, bs)]

    def run():
        with torch.inference_mode():
            for b in batches:
                m(b)
        if device.type == "cuda":
            torch.cuda.synchronize()

    run()  # warm-up
    return run


def _bare_sweep(module, cfg, device, n: int, repeats: int) -> tuple[dict, list]:
    """The best batch size and memory format of the bare model on this machine."""
    best, best_cfg, table = 0.0, {}, []
    for fmt in ("contiguous", "channels_last"):
        for bs in ([1, 2, 4, 8, 16, 32] if device.type == "cpu" else [16, 32, 64, 128, 256]):
            rate = _median_rate(_bare_runner(module, cfg, device, n, fmt, bs), n, min(repeats, 3))
            table.append({"memory_format": fmt, "batch_size": bs, "images_per_s": rate})
            if rate > best:
                best, best_cfg = rate, {"memory_format": fmt, "batch_size": bs}
    return best_cfg, table


def _naive_loop(module, cfg, paths, device) -> None:
    from PIL import Image
    from torchvision import transforms as T

    tf = T.Compose([
        T.Resize(cfg["resize_size"], interpolation=T.InterpolationMode(cfg["interpolation"])),
        T.CenterCrop(cfg["input_size"]),
        T.ToTensor(),
        T.Normalize(cfg["mean"], cfg["std"]),
    ])
    with torch.no_grad():
        for p in paths:
            x = tf(Image.open(p).convert("RGB")).to(device)
            module(x[None])


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
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(paths, f)
    res = subprocess.run([sys.executable, "-c", _RSS_CHILD, f.name, model, device, mode], capture_output=True, text=True, check=True)
    os.unlink(f.name)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--models", default="efficientnet_lite0,resnet18,resnet50")
    ap.add_argument("--backends", default="torch,onnxruntime",
                    help="comma-separated featx backends to measure (torch, onnxruntime, torch.compile)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--data", default=str(Path(tempfile.gettempdir()) / "featx-bench-jpegs"))
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "bench_throughput.json"))
    ap.add_argument("--no-rss", action="store_true", help="skip the N vs 4N peak-memory measurement")
    args = ap.parse_args()

    device = torch.device(args.device)
    paths, _ = make_jpegs(args.data, args.n)
    from PIL import Image

    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
               f"({torch.get_num_threads()} threads)")
    if device.type == "cuda":
        machine += f", {torch.cuda.get_device_name(device)}"
    print(f"featx throughput: {len(paths)} JPEGs 500x375, device {device}; {machine}")
    results = {"n_images": len(paths), "device": str(device), "machine": machine, "models": {}}

    backends = args.backends.split(",")
    for model in args.models.split(","):
        weights = "DEFAULT" if model.startswith("efficientnet_lite") else None
        bb = build_backbone(model, weights)
        exts = {}
        for backend in backends:
            exts[backend] = PretrainedFeatureExtractor(model, weights=weights, device=str(device), progress=False,
                                                       backend=backend).fit()
            exts[backend].transform(paths)  # warm-up: export/compile, and batch_size="auto" tuning
        cfg = exts[backends[0]].preprocess_

        best_cfg, sweep = _bare_sweep(bb.module, cfg, device, min(len(paths), 32), args.repeats)
        # The sweep's maximum is biased upwards on a noisy machine; the figures
        # compared are medians of runs interleaved a, b, d, c, a, b, d, c, ...
        bare = _bare_runner(bb.module, cfg, device, len(paths), best_cfg["memory_format"], best_cfg["batch_size"])
        naive_n = min(len(paths), 64)
        naive_model = build_backbone(model, weights).module.to(device).eval()
        runs = {"b": (bare, len(paths)),
                "c": (lambda: _naive_loop(naive_model, cfg, paths[:naive_n], device), naive_n)}
        for backend, ext in exts.items():
            runs[f"a[{backend}]"] = (lambda ext=ext: ext.transform(paths), len(paths))
            runs[f"d[{backend}]"] = (lambda ext=ext: ext.transform(arrays), len(paths))
        samples = {k: [] for k in runs}
        for _ in range(args.repeats):
            for k, (fn, n_img) in runs.items():
                t = time.perf_counter()
                fn()
                samples[k].append(n_img / (time.perf_counter() - t))
        rate = {k: statistics.median(v) for k, v in samples.items()}
        rate_b, rate_c = rate["b"], rate["c"]
        row = {"b_bare_best": rate_b, "b_best_config": best_cfg, "c_naive_loop": rate_c, "samples": samples,
               "sweep": sweep, "backends": {}}
        results["models"][model] = row
        tuned = {k[-1]: v for k, v in tuned_batch_sizes().items() if k[0] == exts[backends[0]].model_id_}
        print(f"\n{model} (bare best: batch {best_cfg['batch_size']}, {best_cfg['memory_format']}; "
              f"medians of {args.repeats} interleaved runs)")
        print(f"  {'(b) bare eager forward, best config':<44}{rate_b:>8.1f} img/s")
        print(f"  {'(c) naive per-image loop':<44}{rate_c:>8.1f} img/s")
        for backend, ext in exts.items():
            ra, rd = rate[f"a[{backend}]"], rate[f"d[{backend}]"]
            bs = tuned.get(ext.backend_, ext.batch_size_)
            row["backends"][backend] = {"used": ext.backend_, "batch_size": bs, "a_featx_files": ra,
                                        "d_featx_arrays": rd, "a/b": ra / rate_b, "a/c": ra / rate_c,
                                        "d/b": rd / rate_b}
            label = f"{backend}" + ("" if ext.backend_ == backend else f" (fell back to {ext.backend_})")
            print(f"  {'(a) featx from JPEG files, ' + label:<44}{ra:>8.1f} img/s   batch {bs}")
            print(f"  {'(d) featx from decoded arrays, ' + label:<44}{rd:>8.1f} img/s")
            print(f"      {backend}: a/b = {ra / rate_b:.2f}   a/c = {ra / rate_c:.2f}   d/b = {rd / rate_b:.2f}")

    if not args.no_rss:
        model = args.models.split(",")[0]
        paths4, _ = make_jpegs(args.data, 4 * args.n)
        results["peak_rss"] = {}
        for mode in ("memory", "npy"):
            small = _peak_rss(model, paths4[: args.n], args.device, mode)
            big = _peak_rss(model, paths4, args.device, mode)
            extra_out = big["out_bytes"] - small["out_bytes"]
            growth = (big["peak_kib"] - small["peak_kib"]) * 1024
            allowed = extra_out + 0.10 * small["peak_kib"] * 1024
            results["peak_rss"][mode] = {"model": model, "N": args.n, "N_peak_mib": small["peak_kib"] / 1024,
                                         "4N_peak_mib": big["peak_kib"] / 1024, "extra_output_mib": extra_out / 2**20,
                                         "growth_mib": growth / 2**20, "allowed_mib": allowed / 2**20}
            where = "in-memory matrix" if mode == "memory" else "transform_to_npy (memory-mapped file)"
            print(f"\npeak RSS ({model}, {where}): N={args.n}: {small['peak_kib'] / 1024:.0f} MiB; "
                  f"4N={4 * args.n}: {big['peak_kib'] / 1024:.0f} MiB; growth {growth / 2**20:.1f} MiB vs extra "
                  f"output matrix {extra_out / 2**20:.1f} MiB + 10% of N's peak = {allowed / 2**20:.0f} MiB allowed")
    write_results(args.out, results)


if __name__ == "__main__":
    main()
