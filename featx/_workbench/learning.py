"""How many labels are enough: a learning curve in labelled images per class.

:func:`learning_curve_of` runs scikit-learn's ``learning_curve`` on folds of
the evaluation's own splitter whose training indices are reordered so that
every prefix is stratified: the classes' images are shuffled within each class
and then dealt round-robin, so the first ``k * n_classes`` training images hold
exactly ``k`` of each class. ``learning_curve`` (``shuffle=False``) then fits
on those prefixes. The sizes stop at the smallest class's share of the
smallest training fold (past it a prefix could not stay balanced).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["LADDER", "per_class_sizes", "stratified_prefix_splits", "learning_curve_of", "curve_sentence",
           "plot_learning_curve"]

#: Labelled images per class tried by the curve (those below the cap), then the cap itself.
LADDER = (2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


def per_class_sizes(cap: int) -> list[int]:
    """The ladder's sizes below ``cap``, then ``cap`` (nothing when ``cap`` < 2)."""
    if cap < 2:
        return []
    return [k for k in LADDER if k < cap] + [int(cap)]


def stratified_prefix_splits(y: np.ndarray, splits: list[tuple[np.ndarray, np.ndarray]], seed: int = 0):
    """``splits`` with each training part reordered so that its prefixes are stratified; and the cap.

    Returns ``(splits, cap)``: ``cap`` is the smallest class's image count
    over every training part (the most images per class a balanced prefix can have).
    """
    rng = np.random.default_rng(seed)
    out, cap = [], math.inf
    classes = np.unique(y)
    for train, test in splits:
        groups = [rng.permutation(train[y[train] == c]) for c in classes]
        cap = min(cap, min(len(g) for g in groups))
        depth = max(len(g) for g in groups)
        order = [g[i] for i in range(depth) for g in groups if i < len(g)]  # one of each class, then again
        out.append((np.asarray(order), test))
    return out, int(cap if cap != math.inf else 0)


def learning_curve_of(estimators: dict[str, Any], X: np.ndarray, y: np.ndarray, splitter: Any) -> dict:
    """Accuracy (mean and spread over the folds) against labelled images per class, for each estimator.

    Parameters
    ----------
    estimators : dict of str to estimator
        Unfitted estimators by label (the chosen setup first); each is cloned per fit.
    X, y : arrays
        Features and integer labels.
    splitter : cross-validator
        Folds to use (the evaluation's own): the training parts are reordered
        by :func:`stratified_prefix_splits`, the held-out parts kept.

    Returns
    -------
    dict
        ``per_class`` (the sizes), ``n_classes``, ``curves`` (label to ``mean``
        and ``std`` per size; NaN where a fit was impossible, e.g. more
        neighbours than images) and ``sentence`` (:func:`curve_sentence`).
    """
    from sklearn.model_selection import learning_curve

    from .fits import quiet_fits

    splits, cap = stratified_prefix_splits(y, list(splitter.split(np.zeros(len(y)), y)))
    sizes = per_class_sizes(cap)
    n_classes = len(np.unique(y))
    curves: dict[str, dict] = {}
    if not sizes:
        return {"per_class": [], "n_classes": n_classes, "curves": curves, "sentence": ""}
    for label, est in estimators.items():
        with quiet_fits():
            _, _, test = learning_curve(est, X, y, train_sizes=[k * n_classes for k in sizes], cv=splits,
                                        shuffle=False, error_score=np.nan)
        curves[label] = {"mean": [_num(np.mean(t)) for t in test], "std": [_num(np.std(t)) for t in test]}
    result = {"per_class": sizes, "n_classes": n_classes, "curves": curves, "folds": len(splits)}
    result["sentence"] = curve_sentence(result)
    return result


def _num(v: float) -> float | None:
    return None if not np.isfinite(v) else float(v)


def curve_sentence(curve: dict) -> str:
    """Whether the first curve still rises at its last size, and where the second stops winning.

    Rising: its last step gained more than the last point's standard error
    (its spread over the folds / sqrt(folds)).
    """
    sizes, curves = curve["per_class"], list(curve["curves"].items())
    if len(sizes) < 2 or not curves:
        return ""
    label, c = curves[0]
    m, s = c["mean"], c["std"]
    if m[-1] is None or m[-2] is None:
        return ""
    gain = m[-1] - m[-2]
    se = (s[-1] or 0.0) / math.sqrt(curve.get("folds", 1))
    if gain > se:
        text = (f"{label} is still rising at {sizes[-1]} images per class ({gain:+.3f} from {sizes[-2]}): "
                "more labelled images would likely help.")
    else:
        text = (f"{label} has levelled off at {sizes[-1]} images per class ({gain:+.3f} from {sizes[-2]}, within "
                "its standard error): more labelled images of the same kind are unlikely to help much.")
    if len(curves) > 1:
        other, o = curves[1]
        wins = [k for k, a, b in zip(sizes, o["mean"], m) if a is not None and b is not None and a > b]
        if wins:
            text += f" {other} beats it at {', '.join(map(str, wins))} images per class."
        else:
            text += f" {other} does not beat it at any size."
    return text


def plot_learning_curve(curve: dict, path: Any, plt: Any, title: str) -> Any:
    """Draw the curves (mean, shaded spread) against images per class; returns ``path``."""
    from .._outputs import save_figure

    fig, ax = plt.subplots(figsize=(7, 4.4))
    sizes = np.array(curve["per_class"])
    for label, c in curve["curves"].items():
        m = np.array([np.nan if v is None else v for v in c["mean"]], dtype=float)
        s = np.array([np.nan if v is None else v for v in c["std"]], dtype=float)
        ax.plot(sizes, m, marker="o", label=label)
        ax.fill_between(sizes, m - s, m + s, alpha=0.2)
    ax.axhline(1 / curve["n_classes"], color="red", linestyle=":", linewidth=1, label="chance")
    ax.set_xscale("log")
    ax.set_xticks(sizes, [str(k) for k in sizes])
    ax.minorticks_off()
    ax.set_xlabel("labelled training images per class")
    ax.set_ylabel(f"accuracy on held-out images ({curve.get('folds', '?')} folds)")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return save_figure(fig, path, plt)
