"""Bare forward pass of the same exported graph: eager PyTorch vs ONNX Runtime vs OpenVINO.

    python benchmarks/bench_runtimes.py [--models resnet18,resnet50,efficientnet_lite0] [--repeats 5]

For each model (random-init weights, 224 px, pre-decoded inputs), one run
measures images/s of eager PyTorch (channels_last) and of the graph featx
exports for ``backend="onnxruntime"`` (up to ``pre_logits``, avg pooling) in
ONNX Runtime and, when installed, OpenVINO (LATENCY and THROUGHPUT hints), at
batch sizes 4, 8 and 16. Runs are interleaved; figures are medians. It answers
issue 8's question: does OpenVINO add a clear gain over ONNX Runtime here?
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
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _data import write_results  # noqa: E402

from featx import PretrainedFeatureExtractor  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet18,resnet50,efficientnet_lite0")
    ap.add_argument("--batches", default="4,8,16")
    ap.add_argument("--n", type=int, default=64, help="images per timed run")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "bench_runtimes.json"))
    args = ap.parse_args()
    try:
        import openvino as ov
    except ImportError:
        ov = None
    import onnxruntime as ort

    cores = os.cpu_count() or 1
    print(f"bare forward, {args.n} images per run, {cores} cores, torch {torch.__version__}, onnxruntime "
          f"{ort.__version__}, openvino {ov.__version__ if ov else 'not installed'}")
    results: dict = {"cores": cores, "models": {}}
    for model in args.models.split(","):
        weights = "DEFAULT" if model.startswith("efficientnet_lite") else None
        cache = tempfile.mkdtemp()
        ext = PretrainedFeatureExtractor(model, weights=weights, backend="onnxruntime", cache=None, progress=False)
        os.environ["FEATX_CACHE_DIR"] = cache
        ext.fit()
        ext.transform(np.zeros((1, 64, 64, 3), np.uint8))  # exports the graph
        (onnx_file,) = Path(cache, "onnx").glob("*.onnx")
        h, w = ext.preprocess_["input_size"]
        x = torch.randn(args.n, 3, h, w, generator=torch.Generator().manual_seed(0))
        xn = x.numpy()
        eager = ext._runner.capture
        so = ort.SessionOptions()
        so.intra_op_num_threads = cores
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sess = ort.InferenceSession(str(onnx_file), so, providers=["CPUExecutionProvider"])
        fns = {}
        for bs in map(int, args.batches.split(",")):
            xs = [x[i:i + bs].contiguous(memory_format=torch.channels_last) for i in range(0, args.n, bs)]
            ns = [xn[i:i + bs] for i in range(0, args.n, bs)]

            def run_eager(xs=xs):
                with torch.inference_mode():
                    for b in xs:
                        eager.run(b)

            fns[f"eager torch, batch {bs}"] = run_eager
            fns[f"onnxruntime, batch {bs}"] = lambda ns=ns: [sess.run(None, {"x": b}) for b in ns]
            if ov is not None:
                core = ov.Core()
                for hint in ("LATENCY", "THROUGHPUT"):
                    compiled = core.compile_model(str(onnx_file), "CPU", {"PERFORMANCE_HINT": hint})
                    req = compiled.create_infer_request()
                    fns[f"openvino {hint.lower()}, batch {bs}"] = lambda ns=ns, req=req: [req.infer({0: b}) for b in ns]
        for fn in fns.values():
            fn()  # warm-up
        samples = {k: [] for k in fns}
        for _ in range(args.repeats):
            for k, fn in fns.items():
                t = time.perf_counter()
                fn()
                samples[k].append(args.n / (time.perf_counter() - t))
        rates = {k: statistics.median(v) for k, v in samples.items()}
        best = {kind: max((r, k) for k, r in rates.items() if k.startswith(kind))
                for kind in ("eager", "onnxruntime", "openvino") if any(k.startswith(kind) for k in rates)}
        print(f"\n{model} ({h}x{w}; medians of {args.repeats} interleaved runs)")
        for k, r in rates.items():
            print(f"  {k:<34}{r:>8.1f} img/s")
        line = ", ".join(f"best {kind}: {r:.1f} ({k.split(', ')[1]})" for kind, (r, k) in best.items())
        print(f"  {line}")
        if "openvino" in best:
            print(f"  onnxruntime / eager = {best['onnxruntime'][0] / best['eager'][0]:.2f}; "
                  f"openvino / onnxruntime = {best['openvino'][0] / best['onnxruntime'][0]:.2f}")
        results["models"][model] = {"rates": rates, "samples": samples}
    write_results(args.out, results)


if __name__ == "__main__":
    main()
