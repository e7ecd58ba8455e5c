"""FineTunedClassifier and test-time augmentation."""

from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV, cross_val_score

from featx import FineTunedClassifier, ImageLoadError, PretrainedFeatureExtractor
from featx._images.preprocess import TTA_VIEWS, resize_crop, tta_views

from .conftest import SMALL, TinyCNN

SIZE = {"input_size": 64, "resize_size": 72}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Real photographs: 4 classes x 8 patches of scikit-image's bundled images."""
    pytest.importorskip("skimage")  # only the tests on real photographs need it
    from featx import load_image_folder, make_demo_folder

    root = make_demo_folder(tmp_path_factory.mktemp("demo"), n_per_class=8, size=64, seed=1)
    paths, y, names = load_image_folder(root)
    keep = np.isin(y, [0, 1, 2, 3])
    return [p for p, k in zip(paths, keep) if k], y[keep]


def _lite0(**kw):
    base = dict(trainable_from=1, max_epochs=2, batch_size=8, preprocess=SIZE, progress=False)
    base.update(kw)
    return FineTunedClassifier(**base)


@pytest.fixture(scope="module")
def fitted(demo):
    paths, y = demo
    return _lite0(head_lr=3e-3).fit(paths, y)


def test_fine_tuning_real_weights(fitted, demo):
    from featx._models.backbones import get_template

    paths, y = demo
    clf = fitted
    template = get_template("efficientnet_lite0", "DEFAULT")
    before = dict(template.module.named_parameters())
    after = dict(clf.network_.backbone.named_parameters())
    trained = set(clf.trainable_parameters_)
    assert trained and all(n.startswith(("blocks.6.", "conv_head.", "bn2.")) for n in trained)
    assert not any(n.startswith("classifier.") for n in trained)
    for name, p in after.items():
        if name in trained:
            continue
        assert torch.equal(p.detach().cpu(), before[name].detach()), name  # frozen: bit-identical
    changed = [n for n in trained if not torch.equal(after[n].detach().cpu(), before[n].detach())]
    assert len(changed) == len(trained)
    # batch-norm statistics of frozen layers did not move
    buffers_before = dict(template.module.named_buffers())
    for name, b in clf.network_.backbone.named_buffers():
        if not name.startswith(("blocks.6.", "bn2.")):
            assert torch.equal(b.cpu(), buffers_before[name]), name
    proba = clf.predict_proba(paths)
    assert proba.shape == (len(paths), 4)
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-9)
    np.testing.assert_array_equal(clf.predict(paths), clf.classes_[proba.argmax(1)])
    assert clf.score(paths, y) > 0.5  # real features of 4 distinct photographs, after two epochs
    assert clf.n_epochs_ == len(clf.history_) == 2 and 1 <= clf.best_epoch_ <= 2
    assert all(h["val_loss"] is not None for h in clf.history_)


def test_fixed_seed_repeats_exactly_on_cpu(fitted, demo):
    paths, y = demo
    again = _lite0(head_lr=3e-3).fit(paths, y)
    np.testing.assert_array_equal(again.predict_proba(paths), fitted.predict_proba(paths))
    other = _lite0(head_lr=3e-3, random_state=1).fit(paths, y)
    assert not np.array_equal(other.predict_proba(paths), fitted.predict_proba(paths))


def test_pickle_keeps_the_fine_tuned_weights(fitted, demo, tmp_path):
    paths, _ = demo
    blob = pickle.dumps(fitted)
    np.testing.assert_allclose(pickle.loads(blob).predict_proba(paths[:6]), fitted.predict_proba(paths[:6]), atol=1e-6)
    # in a fresh process that pretends to have had a GPU at fit time: loads on the CPU
    f = tmp_path / "clf.pkl"
    state = fitted.__getstate__()
    state["device_"] = "cuda:0"
    with open(f, "wb") as fh:
        pickle.dump((FineTunedClassifier, state), fh)
    code = textwrap.dedent(f"""
        import pickle, warnings, numpy as np
        from featx import FineTunedClassifier, DeviceWarning
        cls, state = pickle.load(open({str(f)!r}, "rb"))
        obj = cls.__new__(cls)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            obj.__setstate__(state)
        assert any(issubclass(x.category, DeviceWarning) for x in w)
        print(obj.device_, obj.predict_proba({paths[:3]!r}).round(6).tolist())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("cpu ")
    np.testing.assert_allclose(eval(out[4:]), fitted.predict_proba(paths[:3]), atol=1e-5)


def test_sklearn_tools(demo):
    paths, y = demo
    torch.manual_seed(0)
    base = FineTunedClassifier(TinyCNN(), trainable_from=0, max_epochs=2, preprocess=SMALL, progress=False,
                               validation_fraction=0)
    c = clone(base)
    assert c.get_params()["trainable_from"] == 0 and not hasattr(c, "classes_")
    scores = cross_val_score(base, paths, y, cv=2)
    assert scores.shape == (2,) and np.all((0 <= scores) & (scores <= 1))
    gs = GridSearchCV(base, {"trainable_from": [0, 1], "head_lr": [1e-3, 1e-2]}, cv=2).fit(paths, y)
    assert set(gs.best_params_) == {"trainable_from", "head_lr"}
    assert gs.predict(paths[:3]).shape == (3,)


def test_trainable_from_layer_name_and_user_module_untouched():
    rng = np.random.default_rng(0)
    X = rng.integers(0, 256, (12, 40, 40, 3), dtype=np.uint8)
    y = np.array([0, 1, 2] * 4)
    torch.manual_seed(0)
    m = TinyCNN()
    original = {k: v.clone() for k, v in m.state_dict().items()}
    clf = FineTunedClassifier(m, trainable_from="stage1", max_epochs=2, preprocess=SMALL, progress=False,
                              validation_fraction=0).fit(X, y)
    assert clf.trainable_parameters_ == ["stage1.0.weight", "stage1.0.bias", "stage2.0.weight", "stage2.0.bias"]
    for k, v in m.state_dict().items():
        assert torch.equal(v, original[k])  # the user's module was copied, not trained
    head_only = FineTunedClassifier(m, trainable_from=0, max_epochs=1, preprocess=SMALL, progress=False,
                                    validation_fraction=0).fit(X, y)
    assert head_only.trainable_parameters_ == []
    assert head_only.best_epoch_ == 1 and head_only.history_[0]["val_loss"] is None


def test_early_stopping_keeps_the_best_epoch():
    rng = np.random.default_rng(0)
    X = rng.integers(0, 256, (20, 40, 40, 3), dtype=np.uint8)
    y = np.array([0, 1] * 10)  # pure noise: validation loss soon stops improving
    torch.manual_seed(0)
    clf = FineTunedClassifier(TinyCNN(), trainable_from=2, head_lr=0.05, backbone_lr=0.05, max_epochs=30,
                              patience=2, preprocess=SMALL, progress=False, validation_fraction=0.3).fit(X, y)
    losses = [h["val_loss"] for h in clf.history_]
    assert clf.n_epochs_ < 30
    assert clf.best_epoch_ == int(np.argmin(losses)) + 1
    assert clf.n_epochs_ == clf.best_epoch_ + 2


@pytest.mark.parametrize(
    "params,match",
    [
        ({"trainable_from": -1}, "trainable_from=-1 is invalid"),
        ({"trainable_from": 9}, "more stages than the model has"),
        ({"trainable_from": "stage9"}, "layer 'stage9' not found"),
        ({"head_lr": 0}, "head_lr=0 is invalid"),
        ({"max_epochs": 1.5}, "max_epochs=1.5 is invalid"),
        ({"validation_fraction": 1.0}, "validation_fraction=1.0 is invalid"),
        ({"augment": "yes"}, "augment='yes' is invalid"),
    ],
)
def test_bad_parameters(params, match):
    X = np.zeros((4, 40, 40, 3), np.uint8)
    with pytest.raises(ValueError, match=match):
        FineTunedClassifier(TinyCNN(), preprocess=SMALL, progress=False, **params).fit(X, [0, 1, 0, 1])


def test_bad_targets_and_images(tmp_path):
    X = np.zeros((4, 40, 40, 3), np.uint8)
    clf = FineTunedClassifier(TinyCNN(), preprocess=SMALL, progress=False, max_epochs=1)
    with pytest.raises(ValueError, match="single class"):
        clf.fit(X, [1, 1, 1, 1])
    with pytest.raises(ValueError, match="one label per image"):
        clf.fit(X, [0, 1])
    with pytest.raises(ValueError, match="Unknown label type"):
        clf.fit(X, [0.5, 1.5, 2.5, 3.5])
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"nope")
    with pytest.raises(ImageLoadError, match="bad.jpg"):
        clf.fit([X[0], X[1], str(bad), X[3]], [0, 1, 0, 1])
    with pytest.raises(Exception, match="not fitted"):
        clf.predict(X)


# -------------------------------------------------------------------- TTA


def test_tta_views_are_the_documented_crops():
    img = torch.arange(3 * 50 * 60, dtype=torch.float32).reshape(3, 50, 60) / (3 * 50 * 60)
    cfg = {"input_size": (32, 32), "resize_size": 40, "interpolation": "bilinear"}
    center = resize_crop(img, cfg)
    for tta, n in TTA_VIEWS.items():
        views = tta_views(img, cfg, tta)
        assert views.shape == (n, 3, 32, 32), tta
    torch.testing.assert_close(tta_views(img, cfg, "hflip")[1], center.flip(-1))
    ten = tta_views(img, cfg, "ten_crop")
    torch.testing.assert_close(ten[4], center)  # five_crop's last view is the center crop
    # the mirrored five crops of the mirrored image: left and right corners swap places
    torch.testing.assert_close(ten[5:], ten[[1, 0, 3, 2, 4]].flip(-1))
    torch.testing.assert_close(tta_views(img, cfg, "multiscale")[1], center)
    with pytest.raises(ValueError, match="tta='rot90' is invalid"):
        tta_views(img, cfg, "rot90")


def test_tta_features_are_the_mean_over_views(tiny_cnn):
    imgs = np.random.default_rng(2).integers(0, 256, (3, 50, 60, 3), dtype=np.uint8)
    plain = PretrainedFeatureExtractor(tiny_cnn, preprocess=SMALL, progress=False, layers=["stage1", "pre_logits"],
                                       pooling="catavgmax").fit()
    tta = PretrainedFeatureExtractor(tiny_cnn, preprocess=SMALL, progress=False, layers=["stage1", "pre_logits"],
                                     pooling="catavgmax", tta="hflip", batch_size=2).fit()
    got = tta.transform(imgs)
    assert not np.allclose(got, plain.transform(imgs), rtol=1e-3)
    cfg = plain.preprocess_
    views = torch.stack([tta_views(torch.from_numpy(im).permute(2, 0, 1), cfg, "hflip") for im in imgs])
    # the views as ready-made 32 x 32 inputs (resize 32 -> 32 and crop 32: unchanged)
    direct = PretrainedFeatureExtractor(tiny_cnn, preprocess={"input_size": 32, "resize_size": 32}, progress=False,
                                        layers=["stage1", "pre_logits"], pooling="catavgmax").fit()
    exact = direct.transform(views.flatten(0, 1)).reshape(3, 2, -1).mean(1)
    np.testing.assert_allclose(got, exact, rtol=1e-5, atol=1e-6)


def test_tta_is_part_of_the_cache_key(tiny_cnn, tmp_path):

    imgs = np.random.default_rng(2).integers(0, 256, (3, 50, 60, 3), dtype=np.uint8)
    kw = dict(preprocess=SMALL, progress=False, cache=tmp_path)
    a = PretrainedFeatureExtractor(tiny_cnn, **kw).fit().transform(imgs)
    ext = PretrainedFeatureExtractor(tiny_cnn, tta="five_crop", **kw).fit()
    b = ext.transform(imgs)
    assert ext.last_run_.cache_hits == 0 and not np.allclose(a, b)
    ext = PretrainedFeatureExtractor(tiny_cnn, tta="five_crop", **kw).fit()
    c = ext.transform(imgs)
    assert ext.last_run_.cache_hits == 3
    np.testing.assert_array_equal(b, c)


def test_tta_parameter_errors():
    with pytest.raises(ValueError, match="tta='rot90' is invalid"):
        PretrainedFeatureExtractor(tta="rot90").fit()
    with pytest.raises(ValueError, match="pooling='flatten'"):
        PretrainedFeatureExtractor(tta="hflip", pooling="flatten").fit()


def _noise(n=12):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, 40, 40, 3), dtype=np.uint8), np.array([0, 1, 2] * (n // 3))


def test_random_state_none_int_and_generator():
    """None means a fresh seed (as everywhere in scikit-learn); an int repeats; a RandomState is accepted."""
    X, y = _noise()
    kw = dict(trainable_from=1, max_epochs=1, preprocess=SMALL, progress=False, validation_fraction=0)
    m = TinyCNN()

    def head(clf):
        return clf.network_.head.weight.detach().clone()

    a, b = (FineTunedClassifier(m, random_state=None, **kw).fit(X, y) for _ in range(2))
    assert not torch.equal(head(a), head(b))
    c, d = (FineTunedClassifier(m, random_state=3, **kw).fit(X, y) for _ in range(2))
    assert torch.equal(head(c), head(d))
    e = FineTunedClassifier(m, random_state=np.random.RandomState(3), **kw).fit(X, y)
    assert e.classes_.tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="random_state='x' is invalid"):
        FineTunedClassifier(m, random_state="x", **kw).fit(X, y)


def test_non_deterministic_tag_follows_the_resolved_device(monkeypatch):
    import featx._runtime.device as dev

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert FineTunedClassifier().__sklearn_tags__().non_deterministic is False  # "auto" on a CPU-only machine
    assert FineTunedClassifier(device="cpu").__sklearn_tags__().non_deterministic is False
    assert dev.resolve_device("auto").type == "cpu"
