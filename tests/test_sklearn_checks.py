"""scikit-learn's estimator checks on both estimators, with image inputs where a check makes a feature matrix.

sklearn's checks build ``X`` as a small numeric matrix; featx refuses a
matrix (it is not a collection of images), so each row is painted into a
16 x 16 RGB image (distinct rows, distinct images) by replacing sklearn's
``_enforce_estimator_tags_X`` for the duration of the check. The check's
own logic (what it fits, calls and compares) runs unchanged.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.utils import estimator_checks as ec

from featx import FineTunedClassifier, PretrainedFeatureExtractor

from .conftest import SMALL, TinyCNN

SIDE = 16


def _as_images(X: np.ndarray) -> np.ndarray:
    """Each row of a numeric matrix as an N x 16 x 16 x 3 uint8 image: its values, scaled to 0-255, tiled."""
    X = np.asarray(X, dtype=np.float64)
    X = (X - X.min()) / (np.ptp(X) or 1.0)
    reps = -(-SIDE * SIDE * 3 // X.shape[1])
    images = np.stack([np.tile(row, reps)[:SIDE * SIDE * 3].reshape(SIDE, SIDE, 3) for row in X])
    return (images * 255).round().astype(np.uint8)


@pytest.fixture
def image_inputs(monkeypatch):
    def enforce(estimator, X, X_test=None, kernel=None):
        if X_test is not None:
            return _as_images(X), _as_images(X_test)
        return _as_images(X)

    real_y = ec._enforce_estimator_tags_y

    def enforce_y(estimator, y):
        y = np.asarray(y)
        if y.ndim > 1:  # a check that takes labels from X's first column got image rows: the first pixel's value
            y = y.reshape(len(y), -1)[:, 0].astype(int) * 3 // 256
        return real_y(estimator, y)

    monkeypatch.setattr(ec, "_enforce_estimator_tags_X", enforce)
    monkeypatch.setattr(ec, "_enforce_estimator_tags_y", enforce_y)


def _extractor():
    torch.manual_seed(0)
    return PretrainedFeatureExtractor(TinyCNN(), preprocess=SMALL, device="cpu", progress=False)


def _classifier():
    torch.manual_seed(0)
    return FineTunedClassifier(TinyCNN(), max_epochs=2, batch_size=8, preprocess=SMALL, device="cpu",
                               validation_fraction=0, progress=False)


ESTIMATORS = {"extractor": _extractor, "classifier": _classifier}
IMAGE_CHECKS = [ec.check_dict_unchanged, ec.check_fit_idempotent, ec.check_estimators_pickle]


def test_rows_become_distinct_images():
    X = np.random.default_rng(0).normal(size=(5, 3))
    images = _as_images(X)
    assert images.shape == (5, SIDE, SIDE, 3) and images.dtype == np.uint8
    assert len({im.tobytes() for im in images}) == 5


@pytest.mark.parametrize("which", sorted(ESTIMATORS))
@pytest.mark.parametrize("check", IMAGE_CHECKS, ids=lambda c: c.__name__)
def test_sklearn_check_on_images(check, which, image_inputs):
    est = ESTIMATORS[which]()
    check(type(est).__name__, est)


def test_check_dict_unchanged_catches_a_transform_that_changes_fitted_state(image_inputs, monkeypatch):
    """The adapted check can fail: a transform that rewrites a fitted attribute is caught."""
    real = PretrainedFeatureExtractor.transform

    def transform(self, X):
        self.batch_size_ = 999
        return real(self, X)

    monkeypatch.setattr(PretrainedFeatureExtractor, "transform", transform)
    with pytest.raises(AssertionError, match="changes __dict__"):
        ec.check_dict_unchanged("PretrainedFeatureExtractor", _extractor())


@pytest.mark.parametrize("which", sorted(ESTIMATORS))
def test_n_features_in(which):
    """``check_n_features_in`` for image inputs.

    sklearn's version asserts ``n_features_in_ == X.shape[1]`` after fit; for
    a collection of images there is no such count (a 16 x 16 RGB batch's
    ``shape[1]`` is its height), so, as scikit-learn's own text vectorizers
    do, featx's estimators never set ``n_features_in_``. What a Pipeline
    relies on holds instead: the attribute is absent before and after fit,
    and the step after the extractor sees ``n_features_out_`` features.
    """
    X = _as_images(np.random.default_rng(0).normal(loc=100, size=(12, 2)))
    y = np.arange(12) % 2
    est = ESTIMATORS[which]()
    assert not hasattr(est, "n_features_in_")
    est.fit(X, y)
    assert not hasattr(est, "n_features_in_")
    if which == "extractor":
        pipe = make_pipeline(clone(est), LogisticRegression()).fit(X, y)
        assert pipe[-1].n_features_in_ == pipe[0].n_features_out_ == pipe[0].transform(X).shape[1]


@pytest.mark.parametrize("cls", ["PretrainedFeatureExtractor", "FineTunedClassifier"])
def test_html_repr_links_to_the_api_page(cls, monkeypatch):
    """The "?" of the HTML repr opens the class's API page, as scikit-learn's estimators do (it had no link)."""
    import re
    from pathlib import Path

    import featx

    est = getattr(featx, cls)()
    links = set(re.findall(r'href="([^"#]+)', est._repr_html_()))
    page = f"/generated/featx.{cls}.html"
    assert any(link.startswith("https://") and link.endswith(page) for link in links), links
    api = (Path(__file__).resolve().parents[1] / "docs" / "api.rst").read_text()
    assert re.search(rf"^\s+{cls}$", api, re.M) and ":toctree: generated" in api  # the page the link names exists
    monkeypatch.setenv("FEATX_DOCS_URL", "file:///srv/featx-docs/")
    assert f"file:///srv/featx-docs{page}" in est._repr_html_()
