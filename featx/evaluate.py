"""How well does transfer learning work on a folder of labelled photos?

:func:`evaluate_folder` embeds every image once (through the embedding cache),
then runs a cross-validated ``GridSearchCV`` for each classifier x candidate
layer over the classifier's main hyper-parameters, optionally next to a
random-init backbone and raw pixels, and writes a report (table, plots, JSON).
It is what ``featx evaluate`` and ``featx demo`` run.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ._options import DEFAULT_MODEL
from ._outputs import save_figure, written as atomic
from ._workbench.fits import quiet_fits
from ._workbench.learning import learning_curve_of, plot_learning_curve
from ._workbench.mistakes import contact_sheet, error_analysis, format_errors
from ._workbench.transfer import transfer_note

__all__ = ["CLASSIFIERS", "LOW_DATA", "EvalResult", "EvalRow", "evaluate_folder", "format_learning_curve",
           "format_nested", "format_report", "format_table", "write_report"]


def _classifiers() -> dict[str, tuple[Any, dict]]:
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier, NearestCentroid
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import Normalizer, StandardScaler
    from sklearn.svm import SVC, LinearSVC

    return {
        # iteration caps keep unconverged fits (raw pixels, random features) from
        # dominating the run time; their accuracy is what it is at the cap
        "logreg": (make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)),
                   {"logisticregression__C": [0.01, 0.1, 1.0]}),
        "linear_svm": (make_pipeline(StandardScaler(), LinearSVC(max_iter=1000)),
                       {"linearsvc__C": [0.001, 0.01, 0.1]}),
        "rbf_svm": (make_pipeline(StandardScaler(), SVC(kernel="rbf")),
                    {"svc__C": [0.1, 1.0, 10.0, 100.0]}),
        "random_forest": (RandomForestClassifier(n_estimators=100, random_state=0),
                          {"max_features": ["sqrt", 0.05]}),
        # low-data classifiers on unit-length features (Euclidean on them ranks as cosine does)
        "centroid": (make_pipeline(Normalizer(), NearestCentroid()), {}),
        "knn": (make_pipeline(Normalizer(), KNeighborsClassifier()),
                {"kneighborsclassifier__n_neighbors": [1, 3, 7]}),
    }


CLASSIFIERS = ("logreg", "linear_svm", "rbf_svm", "random_forest", "centroid", "knn")
#: Classifiers meant for a few images per class: the learning curve draws the best of them beside the choice.
LOW_DATA = ("centroid", "knn")


@dataclass
class EvalRow:
    """One (features, classifier, layer) result.

    Parameters
    ----------
    features : str
        ``"pretrained"``, ``"random-init"``, ``"raw pixels"``, ``"tta ..."`` or ``"fine-tuned"``.
    classifier, layer : str
        The classifier's name (one of ``CLASSIFIERS``) and the layer.
    mean, std : float
        Cross-validated accuracy of the best parameters, and its spread over the folds.
    best_params : dict
        The parameters the search chose.
    fit_seconds : float
        The cross-validated search alone (embedding is in ``EvalResult.extract_seconds``).
    """

    features: str  # "pretrained", "random-init", "raw pixels"
    classifier: str
    layer: str
    mean: float
    std: float
    best_params: dict
    fit_seconds: float  # the cross-validated search (or fine-tuning) alone; embedding is in extract_seconds


@dataclass
class EvalResult:
    """Everything :func:`evaluate_folder` measured; :func:`write_report` writes it as ``results.json``.

    Parameters
    ----------
    folder, model : str
        The folder and the backbone evaluated.
    n_images, cv_folds : int
        Images evaluated (after leaving out unreadable ones) and folds.
    class_names, layers : list of str
        The classes (sub-folder names) and the candidate layers.
    rows : list of EvalRow
        One per feature set x classifier x layer (and the fine-tuned row).
    extract_seconds : dict
        Seconds to embed each feature set (near 0 from the cache).
    best : dict
        The chosen row (first within one image of the top; see the user guide).
    confusion : list of list of int
        Confusion matrix of the chosen setup under cross-validation.
    skipped : list of (str, str)
        Images left out, with the reason.
    saved : str or None
        Where the best pipeline was written (``save=``).
    nested : dict
        The accuracy to expect on new images (nested cross-validation).
    learning_curve : dict
        Accuracy against labelled images per class, and its sentence.
    report, confused_pairs, misclassified : dict, list, list
        What the chosen setup gets wrong under cross-validation.
    transfer_note : str
        Said when the pretrained rows do not beat the baselines by more than their spread.
    """

    folder: str
    n_images: int
    class_names: list[str]
    model: str
    layers: list[str]
    cv_folds: int
    rows: list[EvalRow] = field(default_factory=list)
    extract_seconds: dict = field(default_factory=dict)
    best: dict = field(default_factory=dict)
    confusion: list[list[int]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) left out (on_error="skip")
    saved: str | None = None  # where the best pipeline was written (``save=``)
    # Nested cross-validation of the whole selection (``nested=True``): ``mean``, ``std``, per-fold
    # ``scores``, the ``selections`` each outer fold's inner search made, ``fit_seconds``; {} when off.
    nested: dict = field(default_factory=dict)
    # The chosen setup's (and the best low-data classifier's) accuracy against labelled images per class
    # (``per_class``, ``curves``, ``sentence``, ``folds``); {} when off.
    learning_curve: dict = field(default_factory=dict)
    # Per-class precision, recall, F1 and support of the chosen setup under cross-validation
    # (scikit-learn's ``classification_report`` as a dict).
    report: dict = field(default_factory=dict)
    # The most confused (true, predicted) pairs: ``{"true", "predicted", "count", "share"}``, most frequent first.
    confused_pairs: list = field(default_factory=list)
    # Every image the chosen setup got wrong under cross-validation: ``{"path", "true", "predicted"}``.
    misclassified: list = field(default_factory=list)
    # A sentence when the pretrained rows do not beat raw pixels or random-init by more than their spread,
    # else "" (needs ``compare=True``).
    transfer_note: str = ""


def _raw_pixels(paths: list[str], size: int = 16) -> np.ndarray:
    """Baseline features: each image resized to ``size`` x ``size`` RGB, flattened, in [0, 1]."""
    from PIL import Image, ImageOps

    out = np.empty((len(paths), size * size * 3), dtype=np.float32)
    for i, p in enumerate(paths):
        with Image.open(p) as img:
            img = ImageOps.exif_transpose(img).convert("RGB").resize((size, size), Image.BILINEAR)
            out[i] = np.asarray(img, dtype=np.float32).reshape(-1) / 255.0
    return out


def _layer_columns(names: np.ndarray, layer: str) -> np.ndarray:
    return np.array([n.startswith(layer + "_") for n in names])


def evaluate_folder(
    folder: str | Path,
    *,
    model: str = DEFAULT_MODEL,
    weights: Any = "DEFAULT",
    layers: list[str] | None = None,
    pooling: str = "avg",
    classifiers: tuple[str, ...] = CLASSIFIERS,
    compare: bool = False,
    tta: str | None = None,
    finetune: bool = False,
    finetune_params: dict | None = None,
    cv: int = 5,
    cache: Any = True,
    device: str = "auto",
    precision: str = "auto",
    on_error: str = "raise",
    progress: bool | None = None,
    log: Callable[[str], None] = print,
    save: str | Path | None = None,
    nested: bool = True,
    learning_curve: bool = True,
) -> EvalResult:
    """Cross-validate classifiers x layers on frozen features of ``folder`` (one sub-folder per class).

    Parameters
    ----------
    folder : str or Path
        Folder-per-class images (see :func:`featx.load_image_folder`).
    model : str, default="efficientnet_lite0"
        Backbone.
    weights : str, path or None, default="DEFAULT"
        The backbone's weights, as for :class:`featx.PretrainedFeatureExtractor`
        (``None``: random init, then the rows are labelled ``random-init``).
    layers : list of str or None
        Candidate layers; None: the last two stages (of a transformer: the
        last two blocks) and ``pre_logits``.
    pooling : str, default="avg"
        Pooling of every candidate layer (``"cls+avg"``: DINOv2's recipe on
        token layers).
    classifiers : tuple of str
        Any of ``logreg``, ``linear_svm``, ``rbf_svm``, ``random_forest``.
    compare : bool, default=False
        Also evaluate a random-init backbone of the same architecture and raw
        pixels (16 x 16 RGB), to show what pretraining buys.
    tta : str or None, default=None
        Also evaluate frozen features averaged over test-time augmentation
        views (``"hflip"``, ``"five_crop"``, ``"ten_crop"``, ``"multiscale"``).
    finetune : bool, default=False
        Also cross-validate a :class:`featx.FineTunedClassifier` (same folds;
        its ``fit`` holds out part of each training fold for early stopping).
    finetune_params : dict or None
        Parameters of the fine-tuned classifier (default: ``trainable_from=1``,
        ``max_epochs=10``).
    cv : int, default=5
        Stratified folds (fewer if a class has fewer images).
    cache : None, True or path, default=True
        The embedding cache: the backbone runs once per image, and reruns are free.
    device, precision, progress
        As for :class:`featx.PretrainedFeatureExtractor`.
    on_error : {"raise", "skip"}, default="raise"
        An image that cannot be read: ``"raise"`` stops with
        :class:`featx.ImageLoadError`; ``"skip"`` leaves it out of every
        evaluation and lists it in ``EvalResult.skipped`` (and in the log).
    log : callable
        Receives progress lines.
    save : str, Path or None, default=None
        Write the best pipeline (an extractor of the best layer, then the
        best classifier refitted on every image) to this ``skops.io`` file;
        load it with ``skops.io.load(path, trusted=featx.trusted_types())``.
        Needs ``pip install skops`` and a ``model`` given by name.
    nested : bool, default=True
        Also estimate the accuracy to expect on new images from the whole
        selection (classifier, layer and parameters chosen by the best
        cross-validated mean): nested cross-validation, the same search run
        inside each outer training fold, its choice scored on the held-out
        fold. The best row's own mean is the maximum of many means on the
        same folds, so it is optimistic, the more so the smaller the data
        set; the nested figure is not. Costs about ``cv`` times the search's
        fit time (no image is embedded again); its result, with the choice
        each outer fold made, is ``EvalResult.nested``.
    learning_curve : bool, default=True
        Also draw the chosen setup's learning curve: cross-validated accuracy
        against labelled training images per class (2, 5, 10, 20, ... up to
        the smallest class's share of a training fold), beside the best
        low-data classifier (``centroid`` or ``knn``) on the same layer, with
        a sentence on whether it still rises at the full size
        (``EvalResult.learning_curve``). Costs a few fits per size; no image
        is embedded again.

    Returns
    -------
    EvalResult
        Besides the rows and the best one: the per-class report, the most
        confused pairs and every misclassified image of the chosen setup
        under cross-validation (``report``, ``confused_pairs``,
        ``misclassified``), and, with ``compare=True``, ``transfer_note``: a
        sentence when the pretrained rows do not beat raw pixels or a
        random-init backbone by more than their spread.

    Examples
    --------
    >>> import tempfile
    >>> from featx import make_demo_folder
    >>> from featx.evaluate import evaluate_folder
    >>> folder = make_demo_folder(tempfile.mkdtemp(), n_per_class=3, size=32)
    >>> result = evaluate_folder(folder, model="resnet18", weights=None, layers=["layer4"],
    ...                          classifiers=("centroid",), cv=3, cache=None, log=lambda line: None)
    >>> result.n_images, len(result.rows), len(result.nested["scores"]), result.learning_curve["per_class"]
    (24, 1, 3, [2])
    """
    from sklearn.model_selection import StratifiedKFold

    from .datasets import load_image_folder

    _check_arguments(on_error, classifiers)
    paths, y, class_names = load_image_folder(folder)
    if len(class_names) < 2:
        raise ValueError(f"{str(folder)!r} has one class ({class_names[0]!r}); evaluation needs at least two.")
    layers = list(layers) if layers is not None else default_layers(model)
    result = EvalResult(str(folder), len(paths), class_names, model, layers, _folds(y, cv, class_names, log))
    spec = dict(model=model, layers=layers, pooling=pooling, cache=cache, device=device, precision=precision,
                progress=progress, on_error="nan" if on_error == "skip" else "raise")
    variants = _variants(weights, compare, tta)
    feature_sets, skipped = _embed(variants, spec, paths, result, log)
    if skipped:
        paths, y, feature_sets = _leave_out(skipped, paths, y, feature_sets, result, log)
    if compare:
        t = time.perf_counter()
        raw = _raw_pixels(paths)
        result.extract_seconds["raw pixels"] = time.perf_counter() - t
        feature_sets.append(("raw pixels", raw, np.array([f"px_{i}" for i in range(raw.shape[1])]), ["16x16 RGB"]))
    splitter = StratifiedKFold(result.cv_folds, shuffle=True, random_state=0)
    main_rows = _search(feature_sets, classifiers, y, splitter, variants[0][0], result)
    best = _first_of_the_best(main_rows, len(y))
    if finetune:
        result.rows.append(_finetune_row(model, weights, paths, y, splitter, finetune_params, device, log))
    if best is not None:
        main_sets = [fs for fs in feature_sets if fs[0] == variants[0][0]]
        _analyse(best, main_rows, main_sets, classifiers, paths, y, splitter, result, log,
                 nested=nested, learning_curve=learning_curve)
        if save is not None:
            row, est, _ = best
            result.saved = str(_save_pipeline(spec, variants[0][1], row.layer, est, save))
            log(f"saved the best pipeline ({row.classifier} on {row.layer}) to {result.saved}")
    return result


def _check_arguments(on_error: str, classifiers: tuple[str, ...]) -> None:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error={on_error!r} is invalid. Use 'raise' or 'skip'.")
    unknown = set(classifiers) - set(CLASSIFIERS)
    if unknown:
        raise ValueError(f"unknown classifier(s) {sorted(unknown)}; choose from {list(CLASSIFIERS)}")


def _analyse(best: tuple, main_rows: list[tuple], main_sets: list[tuple], classifiers: tuple[str, ...],
             paths: list[str], y: np.ndarray, splitter: Any, result: EvalResult, log: Callable[[str], None], *,
             nested: bool, learning_curve: bool) -> None:
    """Everything past the table: the honest estimate, the chosen setup's mistakes and curve, the transfer note."""
    if nested:
        _record_nested(main_sets, classifiers, y, splitter, result, log)
    _record_best(best, y, splitter, result, paths)
    if learning_curve:
        _record_learning_curve(best, main_rows, y, splitter, result, log)
    result.transfer_note = transfer_note(result.rows, main_sets[0][0])


def _record_best(best: tuple, y: np.ndarray, splitter: Any, result: EvalResult, paths: list[str]) -> None:
    """The best row, its confusion matrix and what it gets wrong (cross-validated predictions) into ``result``."""
    from sklearn.base import clone
    from sklearn.model_selection import cross_val_predict

    row, est, X = best
    with quiet_fits():
        pred = cross_val_predict(clone(est), X, y, cv=splitter)
    result.best = asdict(row)
    errors = error_analysis(y, pred, result.class_names, paths)
    result.confusion, result.report = errors["confusion"], errors["report"]
    result.confused_pairs, result.misclassified = errors["confused_pairs"], errors["misclassified"]


def _record_learning_curve(best: tuple, main_rows: list[tuple], y: np.ndarray, splitter: Any, result: EvalResult,
                           log: Callable[[str], None]) -> None:
    """The chosen setup's learning curve, beside the best row of the other family (low-data or not) on its layer."""
    from sklearn.base import clone

    row, est, X = best
    low = row.classifier in LOW_DATA
    others = [r for r in main_rows if r[0].layer == row.layer and (r[0].classifier in LOW_DATA) != low]
    estimators = {f"{row.classifier} on {row.layer}": clone(est)}
    if others:
        other = max(others, key=lambda r: r[0].mean)
        estimators[f"{other[0].classifier} on {row.layer}"] = clone(other[1])
    t = time.perf_counter()
    result.learning_curve = curve = learning_curve_of(estimators, X, y, splitter)
    if curve["per_class"]:
        curve["fit_seconds"] = time.perf_counter() - t
        log(f"learning curve ({', '.join(map(str, curve['per_class']))} images per class) in "
            f"{curve['fit_seconds']:.1f} s")


def _save_pipeline(spec: dict, weights: Any, layer: str, estimator: Any, path: str | Path) -> Path:
    """The best classifier behind an extractor of its layer, as a fitted Pipeline in a ``skops.io`` file.

    The extractor keeps the evaluation's cache: a local directory as an
    absolute path (the same cache from any working directory), a URL as it
    is, ``True`` or None as they are.
    """
    from sklearn.pipeline import Pipeline

    from ._extractor import PretrainedFeatureExtractor

    try:
        import skops.io as sio
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError("saving a pipeline needs skops: pip install 'featx[skops]'") from None
    cache = spec["cache"]
    if isinstance(cache, (str, os.PathLike)) and "://" not in str(cache):
        cache = str(Path(cache).resolve())
    ext = PretrainedFeatureExtractor(spec["model"], weights=weights, layers=[layer], pooling=spec["pooling"],
                                     cache=cache, device=spec["device"], precision=spec["precision"])
    steps = list(estimator.steps) if isinstance(estimator, Pipeline) else [("classifier", estimator)]
    pipe = Pipeline([("features", ext.fit()), *steps])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sio.dump(pipe, path)
    return path


def _variants(weights: Any, compare: bool, tta: str | None) -> list[tuple[str, Any, str | None]]:
    """``(label, weights, tta)`` of each feature set to embed; the first is the backbone asked for."""
    variants = [("pretrained" if weights is not None else "random-init", weights, None)]
    if compare and weights is not None:
        variants.append(("random-init", None, None))
    if tta is not None:
        variants.append((f"tta {tta}", weights, tta))
    return variants


def _folds(y: np.ndarray, cv: int, class_names: list[str], log: Callable[[str], None] | None = None) -> int:
    """Stratified folds: ``cv``, or fewer when a class has fewer images (at least 2); ``log`` says so."""
    counts = np.bincount(y, minlength=len(class_names))
    folds = int(min(cv, counts.min()))
    if folds < 2:
        raise ValueError(f"every class needs at least 2 images for cross-validation; counts: "
                         f"{dict(zip(class_names, counts.tolist()))}")
    if folds < cv and log is not None:  # said before anything runs, not only in the last line
        log(f"{cv}-fold cross-validation asked for, but class {class_names[int(counts.argmin())]!r} has only "
            f"{int(counts.min())} images: running {folds} folds")
    return folds


def _embed(variants: list[tuple], spec: dict, paths: list[str], result: EvalResult, log: Callable[[str], None]):
    """Each variant's features (through the cache) and the unreadable images ``{path: reason}``."""
    from ._exceptions import ImageLoadWarning
    from ._extractor import PretrainedFeatureExtractor

    feature_sets: list[tuple[str, np.ndarray, np.ndarray, list[str]]] = []
    skipped: dict[str, str] = {}  # path -> reason, once per image whichever variant failed on it
    for label, weights, views in variants:
        t = time.perf_counter()
        model = spec["model"]
        ext = PretrainedFeatureExtractor(model, weights=weights, tta=views, **{k: v for k, v in spec.items()
                                                                                if k != "model"})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ImageLoadWarning)  # reported once, by _leave_out
            feats = ext.fit_transform(paths)
        for i, reason in ext.failed_reasons_:
            skipped.setdefault(paths[i], reason)
        result.extract_seconds[label] = time.perf_counter() - t
        streams = ext.last_run_.streams
        log(f"{label}: {len(paths)} images embedded in {result.extract_seconds[label]:.1f} s "
            f"({ext.device_}, {ext.precision_}, {streams} stream{'s' if streams > 1 else ''})")
        feature_sets.append((label, feats, ext.get_feature_names_out(), list(ext.layers_)))
    return feature_sets, skipped


def _leave_out(skipped: dict[str, str], paths: list[str], y: np.ndarray, feature_sets: list[tuple],
               result: EvalResult, log: Callable[[str], None]):
    """Drop the unreadable images from the paths, labels and every feature set (and say so)."""
    result.skipped = list(skipped.items())
    keep = np.array([p not in skipped for p in paths])
    log(f"skipped {len(skipped)} of {len(paths)} images that could not be read:")
    for p, reason in result.skipped:
        log(f"  {p}: {reason}")
    paths, y = [p for p, k in zip(paths, keep) if k], y[keep]
    result.n_images = len(paths)
    try:
        result.cv_folds = min(result.cv_folds, _folds(y, result.cv_folds, result.class_names))
    except ValueError:
        raise ValueError("after skipping unreadable images, a class has fewer than 2 images left") from None
    return paths, y, [(label, f[keep], names, lyr) for label, f, names, lyr in feature_sets]


def _search(feature_sets: list[tuple], classifiers: tuple[str, ...], y: np.ndarray, splitter: Any, main: str,
            result: EvalResult):
    """A GridSearchCV row per feature set x classifier x layer (into ``result.rows``); returns the ``main``
    feature set's rows as ``(row, fitted best estimator, X)``."""
    from sklearn.base import clone
    from sklearn.model_selection import GridSearchCV

    grids = _classifiers()
    main_rows = []
    for label, feats, names, layer_list in feature_sets:
        for clf_name in classifiers:
            estimator, grid = grids[clf_name]
            for layer in layer_list:
                X = feats if label == "raw pixels" else feats[:, _layer_columns(names, layer)]
                t = time.perf_counter()
                with quiet_fits():  # one BLAS thread (see quiet_fits), no convergence chatter
                    search = GridSearchCV(clone(estimator), grid, cv=splitter).fit(X, y)
                i = search.best_index_
                row = EvalRow(label, clf_name, layer, float(search.cv_results_["mean_test_score"][i]),
                              float(search.cv_results_["std_test_score"][i]),
                              {k.split("__")[-1]: v for k, v in search.best_params_.items()},
                              time.perf_counter() - t)
                result.rows.append(row)
                if label == main:  # the backbone asked for
                    main_rows.append((row, search.best_estimator_, X))
    return main_rows


def _record_nested(feature_sets: list[tuple], classifiers: tuple[str, ...], y: np.ndarray, splitter: Any,
                   result: EvalResult, log: Callable[[str], None]) -> None:
    result.nested = n = _nested(feature_sets, classifiers, y, splitter, result.cv_folds)
    log(f"nested CV ({result.cv_folds} outer x {n['inner_folds']} inner folds): {n['mean']:.3f} ± "
        f"{n['std']:.3f} in {n['fit_seconds']:.1f} s")


def _nested(feature_sets: list[tuple], classifiers: tuple[str, ...], y: np.ndarray, splitter: Any,
            folds: int) -> dict:
    """Nested cross-validation of the selection :func:`_search` makes (same grids, same tie rule).

    The inner searches use :data:`NESTED_INNER_FOLDS` folds (the selection
    rule is the same; fewer folds keep the cost near twice the search's), and
    the outer folds run side by side, one process per core, each with one
    BLAS thread.
    """
    import os

    from joblib import Parallel, delayed

    t = time.perf_counter()
    splits = list(splitter.split(np.zeros(len(y)), y))
    small = len(y) * len(classifiers) * len(feature_sets[0][3]) < 2000  # not worth starting worker processes
    jobs = 1 if small else max(1, min(len(splits), os.cpu_count() or 1))
    outcomes = Parallel(n_jobs=jobs)(delayed(_outer_fold)(feature_sets, classifiers, y, train, test, folds)
                                     for train, test in splits)
    scores = [s for s, _ in outcomes]
    return {"mean": float(np.mean(scores)), "std": float(np.std(scores)), "scores": scores,
            "selections": [sel for _, sel in outcomes], "inner_folds": min(folds, NESTED_INNER_FOLDS),
            "fit_seconds": time.perf_counter() - t}


#: Folds of nested cross-validation's inner searches.
NESTED_INNER_FOLDS = 3


def _outer_fold(feature_sets: list[tuple], classifiers: tuple[str, ...], y: np.ndarray, train: np.ndarray,
                test: np.ndarray, folds: int) -> tuple[float, dict]:
    """One outer fold: the whole search on ``train``, its choice refitted there and scored on ``test``."""
    from sklearn.model_selection import StratifiedKFold

    k = max(2, min(folds, NESTED_INNER_FOLDS, int(np.bincount(y[train]).min())))
    inner = StratifiedKFold(k, shuffle=True, random_state=1)
    sets = [(label, f[train], names, layers) for label, f, names, layers in feature_sets]
    rows = _search(sets, classifiers, y[train], inner, feature_sets[0][0], EvalResult("", len(train), [], "", [], folds))
    row, est, _ = _first_of_the_best(rows, len(train))
    label, feats, names, _ = feature_sets[0]
    X = feats[test] if label == "raw pixels" else feats[test][:, _layer_columns(names, row.layer)]
    return float(est.score(X, y[test])), {"classifier": row.classifier, "layer": row.layer, "params": row.best_params,
                                          "inner_mean": row.mean}


def _first_of_the_best(rows: list[tuple], n: int):
    """The first row (in classifier, then layer order) whose accuracy is at most one image below the top.

    Rows that differ by one image out of ``n`` or less are tied: which of
    them scores higher can change with the CPU's arithmetic (bf16 or fp32),
    so the tie goes to the one listed first, the simpler classifier.
    """
    if not rows:
        return None
    top = max(r[0].mean for r in rows)
    return next(r for r in rows if r[0].mean >= top - 1.0 / n - 1e-9)


def default_layers(model: Any) -> list[str]:
    """The last two stages of a CNN (or blocks of a transformer) and ``pre_logits``.

    Parameters
    ----------
    model : str or torch.nn.Module
        As for :class:`featx.PretrainedFeatureExtractor` (shapes only: no weights are loaded).

    Returns
    -------
    layers : list of str
        Layer aliases, shallowest first.
    """
    from ._inspect import list_layers

    aliases = [r.alias for r in list_layers(model, weights=None) if r.alias]
    for kind in ("stage", "block"):
        found = [a for a in aliases if a.startswith(kind)]
        if found:
            return found[-2:] + ["pre_logits"]
    return ["pre_logits"]


def _finetune_row(model: str, weights: Any, paths: list[str], y: np.ndarray, splitter: Any, params: dict | None,
                  device: str, log: Callable[[str], None]) -> EvalRow:
    from sklearn.model_selection import cross_val_score

    from ._finetune import FineTunedClassifier

    kw = {"trainable_from": 1, "max_epochs": 10, "progress": False}
    kw.update(params or {})
    clf = FineTunedClassifier(model, weights=weights, device=device, **kw)
    t = time.perf_counter()
    scores = cross_val_score(clf, paths, y, cv=splitter)
    seconds = time.perf_counter() - t
    log(f"fine-tuned: {splitter.get_n_splits()} folds in {seconds:.1f} s")
    shown = {k: v for k, v in kw.items() if k != "progress"}
    return EvalRow("fine-tuned", "finetune", f"from {kw['trainable_from']}", float(scores.mean()),
                   float(scores.std()), shown, seconds)


def format_table(result: EvalResult) -> str:
    """The results as an aligned text table, best pretrained row marked with '*'.

    ``fit s`` is each row's cross-validated search (for the fine-tuned row,
    its cross-validated training); the time to embed each feature set, shared
    by all its rows (near 0 when it came from the cache), is on the last line.
    """
    header = (f"{'features':<16} {'classifier':<14} {'layer':<12} {'accuracy':>16} {'fit s':>8}  "
              "best parameters")
    lines = [header, "-" * len(header)]
    best = result.best
    for r in sorted(result.rows, key=lambda r: (r.features != "pretrained", r.features, r.classifier)):
        mark = "*" if best and r.features == best["features"] and r.classifier == best["classifier"] and r.layer == best["layer"] else " "
        params = ", ".join(f"{k}={v}" for k, v in r.best_params.items())
        lines.append(f"{r.features:<16} {r.classifier:<14} {r.layer:<12} {r.mean:>8.3f} ± {r.std:.3f}{mark}"
                     f"{r.fit_seconds:>8.1f}  {params}")
    if result.extract_seconds:
        lines.append("embedded: " + ", ".join(f"{k} {v:.1f} s" for k, v in result.extract_seconds.items()))
    return "\n".join(lines)


def format_nested(result: EvalResult) -> str:
    """Two lines: the nested-CV accuracy to expect on new images, and how stable the selection was."""
    n = result.nested
    if not n:
        return ""
    from collections import Counter

    picks = Counter(f"{s['classifier']} on {s['layer']}" for s in n["selections"])
    chosen = ", ".join(f"{k} x{v}" for k, v in picks.most_common())
    return (f"expected on new images: {n['mean']:.3f} ± {n['std']:.3f} (nested CV: the whole selection rerun in "
            f"each of {len(n['scores'])} outer folds; the best row's {result.best.get('mean', float('nan')):.3f} is "
            f"the top of many means, optimistic)\nselected per outer fold: {chosen}")


def format_learning_curve(result: EvalResult) -> str:
    """The learning curve as lines (accuracy per images-per-class size, per curve) and its sentence."""
    curve = result.learning_curve
    if not curve or not curve.get("per_class"):
        return ""
    sizes = curve["per_class"]
    width = max(len(label) for label in curve["curves"])
    lines = [f"{'images per class':<{width}} " + " ".join(f"{k:>6d}" for k in sizes)]
    for label, c in curve["curves"].items():
        lines.append(f"{label:<{width}} " + " ".join("   n/a" if m is None else f"{m:>6.3f}" for m in c["mean"]))
    return "\n".join(lines + [curve["sentence"]])


def format_report(result: EvalResult) -> str:
    """What the CLI prints after the table: nested estimate, learning curve, per-class report, transfer note.

    Parameters
    ----------
    result : EvalResult
        From :func:`evaluate_folder`.

    Returns
    -------
    str
        Paragraphs separated by blank lines; those with nothing to say are left out.
    """
    parts = [format_nested(result), format_learning_curve(result)]
    if result.report:
        parts.append(format_errors({"report": result.report, "confused_pairs": result.confused_pairs},
                                   result.class_names))
    parts.append(result.transfer_note)
    return "\n\n".join(p for p in parts if p)


def write_report(result: EvalResult, out: str | Path) -> list[Path]:
    """Write the report folder: ``results.json`` and the plots, each when there is something to draw.

    Parameters
    ----------
    result : EvalResult
        From :func:`evaluate_folder`.
    out : str or Path
        The report folder (created if missing).

    Returns
    -------
    list of Path
        The files written: ``results.json`` (every field of ``result``),
        ``accuracy_by_layer.png``, ``confusion_matrix.png``,
        ``learning_curve.png`` and ``misclassified.png`` (a contact sheet of
        the chosen setup's cross-validated mistakes).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("the evaluation report's plots need matplotlib: pip install 'featx[demo]'") from exc
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    data = asdict(result)
    with atomic(out / "results.json") as tmp:
        tmp.write_text(json.dumps(data, indent=2))
    written.append(out / "results.json")

    written.append(_plot_accuracy(result, out / "accuracy_by_layer.png", plt))
    if result.confusion:
        written.append(_plot_confusion(result, out / "confusion_matrix.png", plt))
    if result.learning_curve.get("per_class"):
        written.append(plot_learning_curve(
            result.learning_curve, out / "learning_curve.png", plt,
            f"{result.model}: learning curve ({result.n_images} images, {len(result.class_names)} classes)"))
    sheet = contact_sheet(result.misclassified, out / "misclassified.png", result.n_images)
    if sheet is not None:
        written.append(sheet)
    return written


def _plot_accuracy(result: EvalResult, path: Path, plt: Any) -> Path:
    """Accuracy per layer for each classifier, baselines and chance as lines."""
    fig, ax = plt.subplots(figsize=(8, 4.8))
    layers = result.layers
    xs = np.arange(len(layers))
    main = result.rows[0].features if result.rows else "pretrained"  # the backbone asked for (random-init if so)
    for clf in dict.fromkeys(r.classifier for r in result.rows):
        rows = {r.layer: r for r in result.rows if r.features == main and r.classifier == clf}
        if rows:
            means = [rows[l].mean for l in layers]
            stds = [rows[l].std for l in layers]
            ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=f"{main} · {clf}")
    colors = {"random-init": "tab:gray", "raw pixels": "black"}
    for label, color in colors.items():
        if label == main:
            continue
        rows = [r for r in result.rows if r.features == label]
        if rows:
            top = max(rows, key=lambda r: r.mean)
            ax.axhline(top.mean, color=color, linestyle="--", linewidth=1,
                       label=f"{label} (best: {top.classifier}, {top.layer})")
    ax.axhline(1 / len(result.class_names), color="red", linestyle=":", linewidth=1, label="chance")
    ax.set_xticks(xs, layers)
    ax.set_xlabel("layer")
    ax.set_ylabel(f"{result.cv_folds}-fold cross-validated accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"{result.model}: accuracy per layer ({result.n_images} images, {len(result.class_names)} classes)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return save_figure(fig, path, plt)


def _plot_confusion(result: EvalResult, path: Path, plt: Any) -> Path:
    """The confusion matrix of the best pretrained row (cross-validated predictions)."""
    from sklearn.metrics import ConfusionMatrixDisplay

    fig, ax = plt.subplots(figsize=(6, 5.5))
    ConfusionMatrixDisplay(np.array(result.confusion), display_labels=result.class_names).plot(
        ax=ax, colorbar=False, xticks_rotation=45)
    b = result.best
    ax.set_title(f"best: {b['classifier']} on {b['layer']} ({b['mean']:.3f})")
    return save_figure(fig, path, plt)
