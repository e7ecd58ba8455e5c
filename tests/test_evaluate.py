"""evaluate_folder: what it times and how it runs the classifier fits."""

import time

import numpy as np
import pytest

import featx
from featx.evaluate import evaluate_folder, format_table


def test_fit_times_exclude_embedding_time(image_folder, monkeypatch):
    real = featx.PretrainedFeatureExtractor.fit_transform

    def slow(self, X, y=None, **kw):
        time.sleep(1.0)
        return real(self, X, y, **kw)

    monkeypatch.setattr(featx.PretrainedFeatureExtractor, "fit_transform", slow)
    res = evaluate_folder(image_folder, layers=["pre_logits"], classifiers=("logreg",),
                          cv=2, cache=None, log=lambda line: None)
    assert res.extract_seconds["pretrained"] >= 1.0
    assert all(0 < r.fit_seconds < 1.0 for r in res.rows), [r.fit_seconds for r in res.rows]
    table = format_table(res)
    assert "fit s" in table and "embedded: pretrained" in table


def test_classifier_fits_use_one_blas_thread(image_folder, monkeypatch):
    import threadpoolctl  # a scikit-learn dependency
    from sklearn.model_selection import GridSearchCV

    seen = []
    real = GridSearchCV.fit

    def spy(self, X, y=None, **kw):
        seen.extend(p["num_threads"] for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas")
        return real(self, X, y, **kw)

    monkeypatch.setattr(GridSearchCV, "fit", spy)
    before = [p["num_threads"] for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"]
    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
        inside = [p["num_threads"] for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"]
        evaluate_folder(image_folder, layers=["pre_logits"], classifiers=("logreg",),
                        cv=2, cache=None, log=lambda line: None)
        after = [p["num_threads"] for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"]
    assert seen and set(seen) == {1}
    assert after == inside  # the caller's limits are restored
    assert before  # numpy has a BLAS that threadpoolctl sees (else the test proves nothing)


def test_the_best_row_is_the_first_within_one_image_of_the_top():
    from featx.evaluate import EvalRow, _first_of_the_best

    def row(clf, mean):
        return (EvalRow("pretrained", clf, "stage5", mean, 0.01, {}, 0.1), clf, None)

    n = 160
    rows = [row("logreg", 154 / n), row("rbf_svm", 155 / n), row("random_forest", 150 / n)]
    assert _first_of_the_best(rows, n)[1] == "logreg"  # one image apart: tied, the first listed wins
    rows = [row("logreg", 153 / n), row("rbf_svm", 155 / n)]
    assert _first_of_the_best(rows, n)[1] == "rbf_svm"  # two images better: a real difference
    assert _first_of_the_best([], n) is None


def test_nested_cv_is_scikit_learns_nested_cross_validation_of_the_selection(image_folder):
    from sklearn.base import clone
    from sklearn.model_selection import GridSearchCV, StratifiedKFold, cross_val_score

    from featx import PretrainedFeatureExtractor, load_image_folder
    from featx.evaluate import NESTED_INNER_FOLDS, _classifiers, format_nested

    res = evaluate_folder(image_folder, model="resnet18", weights=None, layers=["pre_logits"],
                          classifiers=("logreg",), cv=3, cache=None, precision="fp32", log=lambda line: None)
    n = res.nested
    assert len(n["scores"]) == 3 and len(n["selections"]) == 3 and n["inner_folds"] == min(3, NESTED_INNER_FOLDS)
    # one candidate row: the selection is the grid search alone, so it must equal sklearn's own nested CV
    paths, y, _ = load_image_folder(image_folder)
    X = PretrainedFeatureExtractor("resnet18", weights=None, layers=["pre_logits"], precision="fp32",
                                   progress=False).fit().transform(paths)
    est, grid = _classifiers()["logreg"]
    inner = StratifiedKFold(n["inner_folds"], shuffle=True, random_state=1)
    outer = StratifiedKFold(3, shuffle=True, random_state=0)
    want = cross_val_score(GridSearchCV(clone(est), grid, cv=inner), X, y, cv=outer)
    np.testing.assert_allclose(n["scores"], want, atol=1e-12)
    assert n["mean"] == pytest.approx(want.mean()) and all(s["layer"] == "pre_logits" for s in n["selections"])
    assert "expected on new images" in format_nested(res) and "logreg on pre_logits x3" in format_nested(res)
    off = evaluate_folder(image_folder, model="resnet18", weights=None, layers=["pre_logits"], classifiers=("logreg",),
                          cv=3, cache=None, precision="fp32", log=lambda line: None, nested=False)
    assert off.nested == {} and format_nested(off) == ""


def test_more_folds_than_the_smallest_class_is_said_before_anything_runs(image_folder, monkeypatch):
    lines = []
    real = featx.PretrainedFeatureExtractor.fit_transform

    def embedding(self, X, y=None, **kw):
        lines.append("<embedding>")
        return real(self, X, y, **kw)

    monkeypatch.setattr(featx.PretrainedFeatureExtractor, "fit_transform", embedding)
    res = evaluate_folder(image_folder, model="resnet18", weights=None, layers=["layer4"], classifiers=("logreg",),
                          cv=12, cache=None, nested=False, log=lines.append)
    assert res.cv_folds == 8  # 8 images per class
    assert lines[0] == "12-fold cross-validation asked for, but class 'cat' has only 8 images: running 8 folds"
    assert lines[1] == "<embedding>"
    quiet = []
    evaluate_folder(image_folder, model="resnet18", weights=None, layers=["layer4"], classifiers=("logreg",),
                    cv=4, cache=None, nested=False, log=quiet.append)
    assert not any("asked for" in line for line in quiet)
