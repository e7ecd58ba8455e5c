"""bf16 (and int8) vs fp32 features on the CPU: how close, and does it change what a classifier learns?

    python benchmarks/bench_precision.py [--models efficientnet_lite0,torchvision:resnet18] [--n-per-class 40]
                                         [--precisions bf16,int8] [--out results/bench_precision.json]

For each model, on two labelled image sets made offline from bundled photos
(the ``featx demo`` set: patches of 8 scikit-image photographs; and a second
set of patches of 9 *other* photographs: Hubble deep field, histology,
coins, moon, cells, retina, a motorcycle, and scikit-learn's china and
flower), per layer (every stage and ``pre_logits``, average pooling):

* the cosine similarity of each image's bf16 (or int8) features to its fp32
  features (min and median over the images);
* 5-fold cross-validated accuracy of logistic regression and a linear SVM
  (standardised features, same folds) on fp32 and on bf16 (int8) features.

``--precisions`` names the precisions compared with fp32 (default ``bf16``;
``int8`` needs torchao; ``bf16c`` is bf16 through the compiled package that
``backend="auto"`` uses where bf16 is native: the package is compiled first,
in a store of its own, and the features are those of a new extractor that
loads it). bf16's rows keep their keys (``cos_min``,
``cos_median``, ``bf16``); another precision ``p`` adds ``p``,
``p_cos_min``, ``p_cos_median`` and ``max_accuracy_difference_p``.

40 patches per class (320 and 360 images) so that one image moves accuracy by
less than a third of a point: with 20, one image was 0.6 points and a
"within 1 point" reading could not tell one flipped image from two.

The offline default backbone has real ImageNet weights; the torchvision
model is random-init (torchvision's weights need a download), which still
shows whether bf16 moves features more than a classifier can tolerate. The
header states the CPU's capability: on a CPU without native bf16 the numbers
are the same but bf16 is slower there (featx then defaults to fp32).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _data import machine, write_results  # noqa: E402

from featx import PretrainedFeatureExtractor, list_layers, load_image_folder  # noqa: E402
from featx.datasets import make_demo_folder, write_patches  # noqa: E402

OTHER_SOURCES = ("hubble_deep_field", "immunohistochemistry", "coins", "moon", "cell", "retina", "stereo_motorcycle")


def second_set(root: Path, n_per_class: int, size: int) -> Path:
    from skimage import data
    from sklearn.datasets import load_sample_images

    sources = {}
    for name in OTHER_SOURCES:
        img = getattr(data, name)()
        sources[name] = np.asarray(img[0] if isinstance(img, tuple) else img)
    for fname, img in zip(load_sample_images().filenames, load_sample_images().images):
        sources[Path(fname).stem] = img
    return write_patches(root, sources, n_per_class=n_per_class, size=size, seed=1)


def cv_scores(X: np.ndarray, y: np.ndarray) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    out = {}
    for name, clf in {"logreg": LogisticRegression(C=0.1, max_iter=2000), "linear_svm": LinearSVC(C=0.01)}.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out[name] = float(cross_val_score(make_pipeline(StandardScaler(), clf), X, y, cv=folds).mean())
    return out


def _extractor(model: str, weights, layers: list[str], prec: str, paths: list[str]):
    """A fitted extractor computing in ``prec``; for ``bf16c``, one whose compiled bf16 package is on disk
    (compiled by a first extractor, in the store ``FEATX_CACHE_DIR`` names; no embedding cache, so every
    feature is computed by the package)."""
    if prec != "bf16c":
        return PretrainedFeatureExtractor(model, weights=weights, layers=layers, precision=prec, progress=False).fit()
    kw = dict(weights=weights, layers=layers, precision="bf16", backend="torch.compile", progress=False)
    first = PretrainedFeatureExtractor(model, **kw).fit()
    first.transform(paths[:16])  # eager, and the package's compilation starts in another process
    child = first._runner.engine._child
    if child is not None:
        child.wait(timeout=1800)
    return PretrainedFeatureExtractor(model, **kw).fit()  # loads the package: the caller checks it computed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="efficientnet_lite0,torchvision:resnet18")
    ap.add_argument("--n-per-class", type=int, default=40)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--precisions", default="bf16", help="compared with fp32: bf16, int8 or both")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "bench_precision.json"))
    args = ap.parse_args()
    if "bf16c" in args.precisions.split(","):  # the compiled packages in a store of their own
        import os

        os.environ["FEATX_CACHE_DIR"] = tempfile.mkdtemp(prefix="featx-bench-precision-store-")
    mach = machine()
    others = args.precisions.split(",")
    print(f"{'/'.join(others)} vs fp32 features: {mach['line']}")
    tmp = Path(tempfile.mkdtemp(prefix="featx-bench-precision-"))
    sets = {"demo": make_demo_folder(tmp / "demo", n_per_class=args.n_per_class, size=args.size),
            "other photos": second_set(tmp / "other", args.n_per_class, args.size)}
    results: dict = {"machine": mach, "n_per_class": args.n_per_class, "size": args.size, "models": {}}
    for model in args.models.split(","):
        weights = "DEFAULT" if "efficientnet_lite" in model else None
        layers = [r.alias for r in list_layers(model, weights=None) if r.alias and r.alias.startswith("stage")]
        layers.append("pre_logits")
        print(f"\n{model} ({'ImageNet weights' if weights else 'random init'}); layers {', '.join(layers)}")
        print(f"  {'set':<13}{'layer':<11}{'prec':<6}{'cos min':>9}{'cos med':>9}   {'logreg fp32/p':>17}   "
              f"{'linear SVM fp32/p':>21}")
        rows = results["models"][model] = {}
        for set_name, folder in sets.items():
            paths, y, _ = load_image_folder(folder)
            feats = {}
            for prec in ("fp32", *others):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # the emulated-bf16 warning on CPUs without it
                    ext = _extractor(model, weights, layers, prec, paths)
                    feats[prec] = ext.transform(paths)
                    if prec == "bf16c":
                        assert ext._runner.engine.compiled_batches > 0, "the package computed no batch"
            names = ext.get_feature_names_out()
            for layer in layers:
                cols = np.array([n.rsplit("_", 1)[0] in (layer, f"{layer}_avg") for n in names])
                a = feats["fp32"][:, cols]
                row = rows.setdefault(set_name, {})[layer] = {"fp32": cv_scores(a, y)}
                for prec in others:
                    b = feats[prec][:, cols]
                    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
                    s32, sp = row["fp32"], cv_scores(b, y)
                    prefix = "" if prec == "bf16" else f"{prec}_"
                    row.update({f"{prefix}cos_min": float(cos.min()), f"{prefix}cos_median": float(np.median(cos)),
                                prec: sp})
                    print(f"  {set_name:<13}{layer:<11}{prec:<6}{cos.min():>9.5f}{np.median(cos):>9.5f}   "
                          f"{s32['logreg']:>8.3f}/{sp['logreg']:<8.3f}   {s32['linear_svm']:>10.3f}/{sp['linear_svm']:<10.3f}")
    for prec in others:
        worst = max(abs(r["fp32"][c] - r[prec][c]) for m in results["models"].values() for s in m.values()
                    for r in s.values() for c in ("logreg", "linear_svm"))
        results["max_accuracy_difference" + ("" if prec == "bf16" else f"_{prec}")] = worst
        print(f"\nlargest |accuracy(fp32) - accuracy({prec})| over every model, set, layer and classifier: {worst:.3f}")
    write_results(args.out, results)


if __name__ == "__main__":
    main()
