"""Frozen features + logistic regression / SVM, frozen + TTA, and fine-tuning, side by side.

    python benchmarks/bench_finetune.py [--n-per-class 20] [--epochs 10] [--tta hflip]

On the demo set (patches of photographs bundled with scikit-image, one class
per photograph, no download), in one run on this machine: cross-validated
accuracy and wall time of each option, through ``featx.evaluate.evaluate_folder``
(the same code as ``featx evaluate --tta ... --finetune``). The embedding
cache starts empty, so the frozen rows include their embedding time.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _data import write_results  # noqa: E402

from featx import make_demo_folder  # noqa: E402
from featx.evaluate import evaluate_folder, format_table  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-per-class", type=int, default=20)
    ap.add_argument("--cv", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--trainable-from", type=int, default=1)
    ap.add_argument("--tta", default="hflip")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "bench_finetune.json"))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="featx-bench-ft-"))
    folder = make_demo_folder(work / "data", n_per_class=args.n_per_class, size=64)
    start = time.perf_counter()
    result = evaluate_folder(
        folder, layers=["pre_logits"], classifiers=("logreg", "linear_svm", "rbf_svm"), cv=args.cv,
        cache=work / "cache", device="cpu", progress=False, tta=args.tta, finetune=True,
        finetune_params={"max_epochs": args.epochs, "trainable_from": args.trainable_from},
    )
    print()
    print(format_table(result))
    print(f"\n{result.n_images} images, {len(result.class_names)} classes, {result.cv_folds}-fold CV; "
          f"embedding: {', '.join(f'{k} {v:.1f} s' for k, v in result.extract_seconds.items())}; "
          f"total {time.perf_counter() - start:.0f} s")
    write_results(args.out, asdict(result))


if __name__ == "__main__":
    main()
