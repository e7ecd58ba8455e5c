"""featx's default ``backend="auto"`` on the CPU, cold and warm artifact store, against eager PyTorch, from JPEGs.

    python benchmarks/bench_auto.py [--n efficientnet_lite0=4096,resnet50=2048] [--models ...] [--out ...]

Per backbone (efficientnet_lite0 with its ImageNet weights, resnet50 with
random weights: speed does not depend on the values), from 500x375 JPEG
files, ``cache=None``, in one run:

  (b)     the bare model's eager fp32 forward pass, batch 8, channels_last,
          on pre-decoded tensors (medians of 5 timed passes over 64 images);
  (eager) featx with ``backend="torch"`` (eager PyTorch, featx's previous
          default), steady state;
  (cold)  featx's default in a fresh artifact store: one job of ``--n``
          images, in which the compilation starts once its eager work has
          cost ``FEATX_COMPILE_AFTER_S`` (default rule) and the job switches
          to the package if the compiling process timed it faster than eager;
          the job's rate against (eager), how many batches ran compiled and
          the verdict (a job too small to start the compilation is followed
          by one that compiles it, so that (warm) has a package to load);
  (warm)  in a new process with that store: the default's first call of 96
          images (a new extractor) and its second call on 96 others, and
          its steady rate against (b);

(warm) runs in a subprocess, so "first call" includes loading the package
and its one-image check. Ratios are taken against rates measured in the same
run. Where the CPU has native bf16, ``"auto"`` resolves to eager bf16 streams
and this script says so. Writes ``benchmarks/results/bench_auto.json``.
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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _data import machine, make_jpegs, write_results  # noqa: E402

from featx import PretrainedFeatureExtractor, __version__  # noqa: E402
from featx._runtime import compiled  # noqa: E402
from featx._runtime.malloc import keep_cpu_buffers  # noqa: E402


def _weights(model):
    return "DEFAULT" if model == "efficientnet_lite0" else None


def _ext(model, **kw):
    return PretrainedFeatureExtractor(model, weights=_weights(model), device="cpu", progress=False, **kw).fit()


def _rate(ext, paths) -> float:
    t = time.perf_counter()
    ext.transform(paths)
    return len(paths) / (time.perf_counter() - t)


def _bare(ext, n=64, bs=8, repeats=5) -> float:
    """The bare eager fp32 forward pass of the extractor's own (unfolded) backbone on random tensors."""
    from featx._models.backbones import build_backbone

    module = build_backbone(ext.model, ext.weights).module.eval().to(memory_format=torch.channels_last)
    h, w = ext.preprocess_["input_size"]
    xs = [torch.randn(bs, 3, h, w).contiguous(memory_format=torch.channels_last) for _ in range(n // bs)]
    times = []
    with torch.inference_mode():
        module(xs[0])
        for _ in range(repeats):
            t = time.perf_counter()
            for x in xs:
                module(x)
            times.append(time.perf_counter() - t)
    return n / statistics.median(times)


_WARM = textwrap.dedent("""
    import json, sys, time
    from featx import PretrainedFeatureExtractor
    model, weights, paths = sys.argv[1], (None if sys.argv[2] == "None" else sys.argv[2]), sys.argv[3:]
    ext = PretrainedFeatureExtractor(model, weights=weights, device="cpu", progress=False).fit()
    out = {}
    for name, part in (("first", paths[:96]), ("second", paths[96:192]), ("steady", paths[192:])):
        t = time.perf_counter(); ext.transform(part); out[name] = len(part) / (time.perf_counter() - t)
    e = ext._runner.engine
    out.update(backend=ext.backend_, ready=bool(getattr(e, "ready", False)), started=bool(getattr(e, "started", False)))
    import os; out["store"] = sorted(os.listdir(os.path.join(os.environ["FEATX_CACHE_DIR"], "compiled")))
    print(json.dumps(out))
""")


def bench(model: str, paths: list[str], n: int) -> dict:
    store = tempfile.mkdtemp(prefix="featx-auto-")
    os.environ["FEATX_CACHE_DIR"] = store
    default = _ext(model)
    row: dict = {"backend_default": default.backend_, "precision_default": default.precision_,
                 "compile_after_s": compiled.compile_after_s()}
    eager = _ext(model, backend="torch")
    _rate(eager, paths[:32])  # first-use setup
    row["eager"] = statistics.median(_rate(eager, paths[:256]) for _ in range(3))
    row["bare"] = _bare(default)
    if default.backend_ != "torch.compile":
        print(f"{model}: backend='auto' is {default.backend_!r} in {default.precision_} on this CPU (no package)")
        row["featx_default"] = statistics.median(_rate(default, paths[:256]) for _ in range(3))
        row["default_over_bare"] = row["featx_default"] / row["bare"]
        return row
    t = time.perf_counter()
    default.transform(paths[:n])  # the cold job
    row["cold_job_s"] = time.perf_counter() - t
    row["cold_job_rate"] = n / row["cold_job_s"]
    engine = default._runner.engine
    row["cold_batches_compiled"] = engine.compiled_batches
    row["cold_compilation_started"] = engine.started
    print(f"  (after the cold job: compilation started {engine.started}, eager seconds recorded "
          f"{compiled.eager_seconds(engine.path):.1f}, streams {default.last_run_.streams})", flush=True)
    if engine._child:
        t = time.perf_counter()
        engine._child.wait(timeout=1800)
        row["compile_finished_after_job_s"] = time.perf_counter() - t
    elif compiled.read_verdict(engine.path) is None:  # a job too small to pay for it: compile it now, for (warm)
        os.environ["FEATX_COMPILE_AFTER_S"] = "0"
        try:
            primer = _ext(model)
            primer.transform(paths[:8])
            if primer._runner.engine._child:
                primer._runner.engine._child.wait(timeout=1800)
        finally:
            del os.environ["FEATX_COMPILE_AFTER_S"]
    row["verdict"] = compiled.read_verdict(engine.path)
    row["cold_job_over_eager"] = row["cold_job_rate"] / row["eager"]
    res = subprocess.run([sys.executable, "-c", _WARM, model, str(_weights(model)), *paths[:448]],
                         capture_output=True, text=True, env={**os.environ, "FEATX_CACHE_DIR": store}, timeout=1800)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-2000:])
    warm = json.loads(res.stdout.strip().splitlines()[-1])
    row["warm"] = warm
    row["warm_first_over_second"] = warm["first"] / warm["second"]
    row["warm_steady_over_bare"] = warm["steady"] / row["bare"]
    row["warm_first_over_bare"] = warm["first"] / row["bare"]
    v = row["verdict"] or {}
    print(f"{model}: default backend {default.backend_}, precision {default.precision_}; compile after "
          f"{row['compile_after_s']:.0f} s of eager work")
    print(f"  bare eager fp32 (b)                         {row['bare']:8.1f} img/s")
    print(f"  featx backend='torch' (eager), steady       {row['eager']:8.1f} img/s")
    print(f"  default, cold store, one job of {n:<5d}       {row['cold_job_rate']:8.1f} img/s   / eager = "
          f"{row['cold_job_over_eager']:.2f}; {row['cold_batches_compiled']} batches compiled; verdict gain "
          f"{v.get('gain', float('nan')):.2f} ({'kept' if v.get('gain', 0) >= compiled.MIN_GAIN else 'eager stays'})")
    print(f"  default, warm store, new process: first 96  {warm['first']:8.1f} img/s   first/second = "
          f"{row['warm_first_over_second']:.2f}; / b = {row['warm_first_over_bare']:.2f}")
    print(f"  default, warm store, steady                 {warm['steady']:8.1f} img/s   / b = "
          f"{row['warm_steady_over_bare']:.2f} (package {'in use' if warm['ready'] else 'not used'})")
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", default="efficientnet_lite0=4096,resnet50=2048",
                    help="images in the cold-store job, per model (model=N,...), or one N for all")
    ap.add_argument("--models", default="efficientnet_lite0,resnet50")
    ap.add_argument("--data", default=str(Path(tempfile.gettempdir()) / "featx-bench-jpegs"))
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "bench_auto.json"))
    args = ap.parse_args()
    keep_cpu_buffers()  # featx sets it in fit; the bare baseline gets it too
    mach = machine()
    sizes = dict(kv.split("=") for kv in args.n.split(",")) if "=" in args.n else {}
    n_of = {m: int(sizes.get(m, args.n if not sizes else 1024)) for m in args.models.split(",")}
    paths, _ = make_jpegs(args.data, max(max(n_of.values()), 448))
    print(f"featx {__version__}, backend='auto' on the CPU; {mach['line']}; {len(paths)} JPEGs 500x375")
    results = {"machine": mach, "torch": torch.__version__, "featx": __version__, "n": n_of, "models": {}}
    for model in args.models.split(","):
        results["models"][model] = bench(model, paths, n_of[model])
    write_results(args.out, results)


if __name__ == "__main__":
    main()
