"""Multispectral input (``in_chans``): CV accuracy with every band vs RGB alone, on a set whose classes differ
only in an extra band.

The labelled set: patches of scikit-image's bundled photographs (real RGB), two
classes assigned at random, so RGB carries no class information; a fourth
"near-infrared" band is derived from the patch's own luminance, smoothed for
class 0 and inverted for class 1 (a vegetation-like band that reacts unlike
the visible ones). featx with the pretrained default backbone reads RGB alone
(``in_chans=3``) or all four bands (``in_chans=4``, the stem adapted as timm's
``adapt_input_conv`` does); logistic regression (one BLAS thread) is
cross-validated on ``pre_logits``. A figure, not a pass/fail.

    python benchmarks/bench_multispectral.py [--n 160] [--out benchmarks/results/bench_multispectral.json]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from _data import PHOTOS, machine, write_results


def labelled_set(n: int, size: int = 96, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    from skimage import data

    rng = np.random.default_rng(seed)
    photos = []
    for name in PHOTOS:
        img = np.asarray(getattr(data, name)())
        photos.append(np.repeat(img[..., None], 3, 2) if img.ndim == 2 else img[..., :3])
    y = rng.permutation(np.arange(n) % 2)  # balanced, independent of the pixels
    images = []
    for i in range(n):
        src = photos[i % len(photos)]
        top, left = rng.integers(0, src.shape[0] - size), rng.integers(0, src.shape[1] - size)
        rgb = np.ascontiguousarray(src[top:top + size, left:left + size]).astype(np.uint8)
        lum = Image.fromarray(rgb).convert("L")
        nir = np.asarray(lum.filter(ImageFilter.GaussianBlur(3)) if y[i] == 0 else Image.eval(lum, lambda v: 255 - v))
        images.append(np.dstack([rgb, nir]))
    return images, y


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=160)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "bench_multispectral.json"))
    args = ap.parse_args()

    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    from featx import PretrainedFeatureExtractor

    info = machine()
    print(info["line"])
    images, y = labelled_set(args.n)
    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    rows = {}
    for label, chans, X in (("RGB alone (in_chans=3)", 3, [im[..., :3] for im in images]),
                            ("all four bands (in_chans=4)", 4, images)):
        t = time.perf_counter()
        feats = PretrainedFeatureExtractor(in_chans=chans, precision="fp32").fit_transform(X)
        seconds = time.perf_counter() - t
        with threadpool_limits(1):
            scores = cross_val_score(make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)), feats, y,
                                     cv=folds)
        rows[label] = {"in_chans": chans, "cv_mean": float(scores.mean()), "cv_std": float(scores.std()),
                       "cv_scores": scores.tolist(), "extract_seconds": seconds}
        print(f"{label:<28} 5-fold CV accuracy {scores.mean():.3f} ± {scores.std():.3f}  (embedding {seconds:.1f} s)")
    write_results(args.out, {"machine": info, "torch": torch.__version__, "n_images": args.n,
                             "model": "efficientnet_lite0 (ImageNet weights), pre_logits, fp32",
                             "classifier": "StandardScaler + LogisticRegression, 1 BLAS thread", "rows": rows})


if __name__ == "__main__":
    main()
