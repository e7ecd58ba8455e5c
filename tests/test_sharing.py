"""Fitted pipelines shared as skops files: round trips in a fresh process, and untrusted files refused."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import featx
from featx.datasets import find_images
from featx import FineTunedClassifier, PretrainedFeatureExtractor

sio = pytest.importorskip("skops.io")

SMALL = {"input_size": 32, "resize_size": 36}


def _fresh(code: str, *args: str) -> str:
    """Run ``code`` in a new interpreter (nothing imported, nothing trusted yet); its stdout."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


LOAD_AND_PREDICT = """
    import sys, numpy as np, skops.io as sio, featx
    model = sio.load(sys.argv[1], trusted=featx.trusted_types())
    paths = [l for l in open(sys.argv[2]).read().splitlines()]
    np.save(sys.argv[3], model.{method}(paths))
"""


def _save_paths(tmp_path, paths) -> Path:
    listing = tmp_path / "paths.txt"
    listing.write_text("\n".join(paths))
    return listing


def _round_trip(model, paths, tmp_path) -> tuple[np.ndarray, np.ndarray]:
    """``model``'s probabilities here, and those of its skops copy loaded in a fresh process."""
    expected = model.predict_proba(paths)
    target = tmp_path / "model.skops"
    sio.dump(model, target)
    assert set(sio.get_untrusted_types(file=target)) <= set(featx.trusted_types())
    _fresh(LOAD_AND_PREDICT.format(method="predict_proba"), str(target), str(_save_paths(tmp_path, paths)),
           str(tmp_path / "out.npy"))
    return expected, np.load(tmp_path / "out.npy")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_pipeline_round_trip_in_a_fresh_process(tmp_path, image_paths, precision):
    paths, y = image_paths
    ext = PretrainedFeatureExtractor("resnet18", weights=None, layers=["layer2", "layer4"], preprocess=SMALL,
                                     cache=None, precision=precision)
    pipe = make_pipeline(ext, StandardScaler(), LogisticRegression(max_iter=500)).fit(paths, y)
    expected, loaded = _round_trip(pipe, paths, tmp_path)
    np.testing.assert_array_equal(loaded, expected)


def test_finetuned_classifier_round_trip_in_a_fresh_process(tmp_path, image_paths):
    paths, y = image_paths
    clf = FineTunedClassifier("resnet18", weights=None, preprocess=SMALL, max_epochs=1, batch_size=8,
                              random_state=0).fit(paths, y)
    expected, loaded = _round_trip(clf, paths, tmp_path)
    np.testing.assert_array_equal(loaded.argmax(1), expected.argmax(1))
    np.testing.assert_allclose(loaded, expected, rtol=0, atol=1e-6)


def test_trusted_types_are_exactly_what_featx_files_need(image_paths, tmp_path):
    """The list names real classes, and every one of them is needed by some file (nothing trusted in vain)."""
    import importlib

    for name in featx.trusted_types():
        module, _, cls = name.rpartition(".")
        assert isinstance(getattr(importlib.import_module(module), cls), type), name
    paths, y = image_paths
    ext = PretrainedFeatureExtractor("resnet18", weights=None, preprocess=SMALL, cache=None).fit()
    ext.transform(paths[:2])
    clf = FineTunedClassifier("resnet18", weights=None, preprocess=SMALL, max_epochs=1, random_state=0)
    needed = set()
    for i, obj in enumerate([ext, clf.fit(paths, y)]):
        sio.dump(obj, tmp_path / f"{i}.skops")
        needed |= set(sio.get_untrusted_types(file=tmp_path / f"{i}.skops"))
    assert needed == set(featx.trusted_types())


MARKER_MODULE = '''
import os
from sklearn.base import BaseEstimator, TransformerMixin

class WritesMarker(TransformerMixin, BaseEstimator):
    """A step whose loading would run code: it writes a file when its state is restored."""

    def __init__(self, marker=None):
        self.marker = marker

    def fit(self, X, y=None):
        return self

    def transform(self, X):
        return X

    def __setstate__(self, state):
        with open(state["marker"], "w") as f:
            f.write("code ran")
        self.__dict__.update(state)
'''


def test_a_file_with_an_untrusted_type_is_refused_and_runs_nothing(tmp_path, image_paths):
    (tmp_path / "sneaky.py").write_text(MARKER_MODULE)
    sys.path.insert(0, str(tmp_path))
    try:
        import sneaky
    finally:
        sys.path.remove(str(tmp_path))
    marker = tmp_path / "marker.txt"
    paths, y = image_paths
    ext = PretrainedFeatureExtractor("resnet18", weights=None, preprocess=SMALL, cache=None)
    pipe = make_pipeline(ext, sneaky.WritesMarker(str(marker)), LogisticRegression()).fit(paths, y)
    target = tmp_path / "sneaky.skops"
    sio.dump(pipe, target)
    assert not marker.exists()
    out = _fresh("""
        import sys
        sys.path.insert(0, sys.argv[2])
        import skops.io as sio, featx
        try:
            sio.load(sys.argv[1], trusted=featx.trusted_types())
        except sio.exceptions.UntrustedTypesFoundException as exc:
            print("refused:", exc)
        else:
            print("loaded")
    """, str(target), str(tmp_path))
    assert out.startswith("refused:") and "sneaky.WritesMarker" in out
    assert not marker.exists()
    # the marker class does run code when trusted: the refusal above is what kept it from running
    _fresh("""
        import sys
        sys.path.insert(0, sys.argv[2])
        import skops.io as sio, featx
        sio.load(sys.argv[1], trusted=featx.trusted_types() + ["sneaky.WritesMarker"])
    """, str(target), str(tmp_path))
    assert marker.read_text() == "code ran"


def test_evaluate_saves_the_best_pipeline(tmp_path, image_folder):
    from featx.cli import main

    target = tmp_path / "best" / "model.skops"
    rc = main(["evaluate", str(image_folder), "--model", "resnet18", "--weights", "none", "--layers",
               "layer3,layer4", "--classifiers", "logreg", "--cv", "2", "--no-cache", "-o", str(tmp_path / "rep"),
               "--save", str(target)])
    assert rc == 0
    best = json.loads((tmp_path / "rep" / "results.json").read_text())["best"]
    pipe = sio.load(target, trusted=featx.trusted_types())
    ext = pipe.steps[0][1]
    assert isinstance(ext, PretrainedFeatureExtractor) and ext.layers_ == [best["layer"]]
    assert (ext.model, ext.weights, ext.cache) == ("resnet18", None, None)
    paths, y, _ = featx.load_image_folder(image_folder)
    # the classifier was refitted on every image's features of that layer
    feats = PretrainedFeatureExtractor("resnet18", weights=None, layers=[best["layer"]], cache=None).fit_transform(paths)
    np.testing.assert_array_equal(pipe.predict(paths), pipe[1:].predict(feats))
    assert pipe.score(paths, y) > 0.9


def test_evaluate_save_keeps_the_cache_directory(tmp_path, image_folder, monkeypatch):
    """``--save`` with ``--cache-dir``: the saved pipeline reads the same cache (it once said ``cache=True``)."""
    from featx.evaluate import evaluate_folder

    monkeypatch.chdir(tmp_path)
    target = tmp_path / "m.skops"
    result = evaluate_folder(image_folder, model="resnet18", weights=None, layers=["layer4"], classifiers=("logreg",),
                             cv=2, cache="mycache", save=target, log=lambda line: None)
    assert result.saved == str(target)
    pipe = sio.load(target, trusted=featx.trusted_types())
    assert pipe.steps[0][1].cache == str(tmp_path / "mycache")  # absolute: the same cache from any folder
    monkeypatch.chdir(image_folder)
    pipe.predict(find_images(image_folder)[:2])
    assert pipe.steps[0][1].last_run_.cache_hits == 2  # embedded by the evaluation, answered by its cache
