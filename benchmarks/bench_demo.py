"""`featx demo` as a user runs it: its wall time, and the figures the evaluation page quotes.

    python benchmarks/bench_demo.py [--runs 1] [--no-figures]

Runs ``python -m featx demo`` in a fresh process with an empty embedding
cache (the first run a new user sees: the backbone embeds every image) and
everything on (baselines, nested cross-validation, learning curve, per-class
report, contact sheet), ``--runs`` times; records the wall time of each run
(median too) and, from the last run's ``results.json``, the figures of
``docs/user_guide/evaluation.md``: the best row and the nested estimate, the
selections, the learning curve, the most confused pairs, the baselines' best
rows. Copies the report's plots into ``docs/`` (``demo_*.png``) so the page
shows the run its numbers come from. Writes ``benchmarks/results/bench_demo.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _data import machine, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
#: Report plots copied into docs/ (report name -> docs name).
FIGURES = {"accuracy_by_layer.png": "demo_accuracy_by_layer.png", "learning_curve.png": "demo_learning_curve.png",
           "misclassified.png": "demo_misclassified.png"}


def run_demo(work: Path) -> tuple[float, dict, str]:
    """One ``featx demo`` in a fresh process and an empty cache: (wall seconds, results.json, stdout)."""
    env = dict(os.environ, FEATX_CACHE_DIR=str(work / "cache"), PYTHONUNBUFFERED="1")
    t = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "featx", "demo", "-o", str(work / "report")],
                         env=env, capture_output=True, text=True, cwd=work)
    seconds = time.perf_counter() - t
    if res.returncode != 0:
        raise SystemExit(f"featx demo failed:\n{res.stdout}\n{res.stderr}")
    return seconds, json.loads((work / "report" / "results.json").read_text()), res.stdout


def figures(data: dict) -> dict:
    """What the evaluation page quotes, from one run's results.json."""
    lc = data["learning_curve"]
    return {
        "n_images": data["n_images"], "n_classes": len(data["class_names"]), "cv_folds": data["cv_folds"],
        "chance": 1 / len(data["class_names"]),
        "best": {k: data["best"][k] for k in ("classifier", "layer", "mean", "std")},
        "nested": {k: data["nested"][k] for k in ("mean", "std", "inner_folds", "fit_seconds")},
        "best_minus_nested": data["best"]["mean"] - data["nested"]["mean"],
        "selections": [f"{s['classifier']} on {s['layer']}" for s in data["nested"]["selections"]],
        "selections_text": ", ".join(f"{k} in {v} folds" for k, v in Counter(
            f"{s['classifier']} on {s['layer']}" for s in data["nested"]["selections"]).most_common()),
        "baselines": {f: best_row(data, f) for f in ("random-init", "raw pixels")},
        "learning_curve": {"per_class": lc["per_class"], "sentence": lc["sentence"],
                           "per_class_text": ", ".join(map(str, lc["per_class"])),
                           "curves": {k: v["mean"] for k, v in lc["curves"].items()},
                           "fit_seconds": lc.get("fit_seconds")},
        "low_data_best": best_row(data, "pretrained", ("centroid", "knn")),
        "confused_pairs": data["confused_pairs"][:3],
        "misclassified": len(data["misclassified"]),
        "macro_f1": data["report"]["macro avg"]["f1-score"],
        "transfer_note": data["transfer_note"],
    }


def best_row(data: dict, features: str, classifiers: tuple[str, ...] | None = None) -> dict | None:
    """The top row of a feature set (of these classifiers only, if given), or None."""
    rows = [r for r in data["rows"] if r["features"] == features and (classifiers is None or r["classifier"] in classifiers)]
    top = max(rows, key=lambda r: r["mean"]) if rows else None
    return top and {k: top[k] for k in ("classifier", "layer", "mean", "std")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--no-figures", action="store_true", help="do not copy the plots into docs/")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_demo.json"))
    args = ap.parse_args()
    mach = machine()
    print(f"featx demo, cold cache, fresh process; {mach['line']}", flush=True)
    seconds = []
    for i in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="featx-bench-demo-") as tmp:
            work = Path(tmp)
            s, data, stdout = run_demo(work)
            seconds.append(s)
            print(f"run {i + 1}: {s:.1f} s", flush=True)
            if i == args.runs - 1:
                print(stdout)
                if not args.no_figures:
                    for src, dst in FIGURES.items():
                        if (work / "report" / src).exists():
                            shutil.copyfile(work / "report" / src, ROOT / "docs" / dst)
                            print(f"copied {src} to docs/{dst}")
    results = {"machine": mach, "torch": torch.__version__, "runs": args.runs, "seconds": seconds,
               "median_seconds": statistics.median(seconds), "figures": figures(data)}
    print(f"median wall time of featx demo: {results['median_seconds']:.1f} s")
    write_results(args.out, results)


if __name__ == "__main__":
    main()
