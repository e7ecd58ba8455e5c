"""scikit-learn conformance, pipelines, determinism, pickling, devices."""

from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap
from unittest import mock

import joblib
import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.base import clone
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import RandomForestClassifier
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, cross_val_score
from sklearn.pipeline import FeatureUnion, make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC
from sklearn.utils import estimator_checks as ec

from featx import DeviceWarning, ModelLoadError, PretrainedFeatureExtractor
from featx._runtime.device import resolve_device, resolve_precision

from .conftest import SMALL, TinyCNN

SKLEARN_CHECKS = [
    ec.check_no_attributes_set_in_init,
    ec.check_parameters_default_constructible,
    ec.check_get_params_invariance,
    ec.check_set_params,
    ec.check_dont_overwrite_parameters,
    ec.check_estimators_overwrite_params,
    ec.check_estimator_cloneable,
    ec.check_estimator_repr,
    ec.check_mixin_order,
    ec.check_valid_tag_types,
    ec.check_estimator_tags_renamed,
    ec.check_transformers_unfitted,
    ec.check_fit_check_is_fitted,
    ec.check_estimators_fit_returns_self,
    ec.check_do_not_raise_errors_in_init_or_set_params,
    ec.check_get_feature_names_out_error,
]


@pytest.mark.parametrize("check", SKLEARN_CHECKS, ids=lambda c: c.__name__)
def test_sklearn_check(check):
    check("PretrainedFeatureExtractor", PretrainedFeatureExtractor(progress=False))


@pytest.mark.parametrize("make", ["extractor", "classifier"])
def test_tags_are_honest(make, tiny_cnn, image_paths):
    """Each tag, checked by what the estimator does, not by the value the code sets."""
    from featx import FineTunedClassifier

    kw = dict(preprocess=SMALL, device="cpu", progress=False)
    est = (PretrainedFeatureExtractor(tiny_cnn, **kw) if make == "extractor"
           else FineTunedClassifier(tiny_cnn, max_epochs=1, validation_fraction=0, **kw))
    tags = est.__sklearn_tags__()
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (4, 20, 20), dtype=np.uint8)  # N x H x W
    y = np.array([0, 1, 0, 1])
    out = (lambda e, X: e.transform(X)) if make == "extractor" else (lambda e, X: e.predict_proba(X))
    with pytest.raises(NotFittedError):
        out(est, gray)
    assert tags.requires_fit is True
    fitted = clone(est).fit(gray, y)  # 3-D: a grayscale batch
    matrix = rng.normal(size=(4, 6))  # a feature matrix, which is not images
    with pytest.raises(ValueError, match="feature matrix"):
        out(fitted, matrix)
    assert tags.input_tags.two_d_array is False
    assert tags.input_tags.three_d_array is True and out(fitted, gray).shape[0] == 4
    paths = list(image_paths[0][:4])  # strings: file paths
    assert tags.input_tags.string is True and out(fitted, paths).shape[0] == 4
    if make == "extractor":
        clone(est).fit(gray)  # no y
        assert tags.target_tags.required is False
        floats = gray.astype(np.float64) / 255
        assert fitted.transform(floats).dtype == np.float32 and tags.transformer_tags.preserves_dtype == ["float32"]
    again = clone(est).fit(gray, y)  # deterministic: refitting gives the same outputs
    np.testing.assert_array_equal(out(again, paths), out(fitted, paths))
    assert tags.non_deterministic is False


def test_init_is_cheap_and_verbatim():
    with mock.patch("featx._runtime.settling.get_template") as build:
        ext = PretrainedFeatureExtractor("no_such_model", layers="x", device="cuda:7", batch_size=0)
    build.assert_not_called()
    assert ext.get_params()["model"] == "no_such_model" and ext.get_params()["batch_size"] == 0
    with pytest.raises(TypeError):
        PretrainedFeatureExtractor("resnet18", None)  # everything after model is keyword-only


def test_clone_gives_an_unbuilt_estimator(tiny_cnn):
    ext = PretrainedFeatureExtractor(tiny_cnn, preprocess=SMALL).fit()
    c = clone(ext)
    assert not hasattr(c, "backbone_") and c.get_params()["preprocess"] == SMALL
    with pytest.raises(NotFittedError):
        c.transform(np.zeros((1, 8, 8, 3), np.uint8))


def test_set_params_then_fit_rebuilds(tiny_cnn):
    ext = PretrainedFeatureExtractor(tiny_cnn, preprocess=SMALL, progress=False).fit()
    assert ext.n_features_out_ == 16
    ext.set_params(layers="stem", pooling="catavgmax").fit()
    assert ext.n_features_out_ == 16 and ext.layers_ == ["stem"]


@pytest.mark.parametrize(
    "kw,match",
    [({"batch_size": 0}, "batch_size=0"), ({"num_workers": -1}, "num_workers=-1"), ({"progress": "yes"}, "progress='yes'"),
     ({"precision": "int4"}, "precision='int4'"), ({"device": "tpu"}, "device='tpu'"), ({"preprocess": {"size": 3}}, "unknown key"),
     ({"preprocess": {"input_size": 64, "resize_size": 32}}, "smaller than input_size")],
)
def test_bad_params_fail_in_fit(tiny_cnn, kw, match):
    ext = PretrainedFeatureExtractor(tiny_cnn, **kw)
    with pytest.raises(ValueError, match=match):
        ext.fit()


# ------------------------------------------------------------- pipelines


@pytest.fixture
def small_ext(tiny_cnn):
    return PretrainedFeatureExtractor(tiny_cnn, preprocess=SMALL, progress=False, num_workers=0)


@pytest.mark.parametrize("clf", [SVC(), RandomForestClassifier(n_estimators=20, random_state=0), LogisticRegression(max_iter=500)])
def test_pipelines_learn_from_paths(small_ext, image_paths, clf):
    paths, y = image_paths
    pipe = make_pipeline(small_ext, StandardScaler(), clf)
    scores = cross_val_score(pipe, paths, y, cv=3)
    assert scores.mean() > 0.6, scores  # three colour-coded classes: chance is 1/3


def test_grid_search_over_extractor_and_classifier_params(small_ext, image_paths):
    paths, y = image_paths
    pipe = make_pipeline(small_ext, StandardScaler(), LogisticRegression(max_iter=500))
    grid = {"pretrainedfeatureextractor__layers": ["stem", ["stage1", "stage2"]],
            "pretrainedfeatureextractor__pooling": ["avg", "gem"], "logisticregression__C": [0.1, 1.0]}
    search = GridSearchCV(pipe, grid, cv=3).fit(paths, y)
    assert len(search.cv_results_["params"]) == 8
    assert search.best_score_ > 0.6
    assert search.predict(paths[:4]).shape == (4,)


def test_feature_union_of_two_extractors(small_ext, image_paths):
    paths, _ = image_paths
    union = FeatureUnion([("a", small_ext), ("b", clone(small_ext).set_params(layers="stem", pooling="max"))])
    out = union.fit_transform(paths[:5])
    assert out.shape == (5, 16 + 8)
    names = union.get_feature_names_out()
    assert names[0] == "a__pre_logits_0" and names[-1] == "b__stem_max_7"


def test_column_transformer_over_dataframe(small_ext, image_paths):
    paths, y = image_paths
    df = pd.DataFrame({"path": paths, "age": np.arange(len(paths), dtype=float)})
    ct = ColumnTransformer([("img", small_ext, "path"), ("num", StandardScaler(), ["age"])])
    out = ct.fit_transform(df)
    assert out.shape == (len(paths), 17)
    ct_list = ColumnTransformer([("img", clone(small_ext), ["path"])])
    np.testing.assert_allclose(ct_list.fit_transform(df), out[:, :16])
    model = make_pipeline(ct, LogisticRegression(max_iter=500)).fit(df, y)
    assert model.score(df, y) > 0.6


def test_set_output_pandas(small_ext, image_paths):
    paths, _ = image_paths
    s = pd.Series(paths[:4], index=[10, 11, 12, 13])
    out = small_ext.set_output(transform="pandas").fit_transform(s)
    assert isinstance(out, pd.DataFrame)
    assert list(out.columns) == list(small_ext.get_feature_names_out())
    assert list(out.index) == [10, 11, 12, 13]
    assert (out.dtypes == np.float32).all()


# ------------------------------------------------------------ determinism


def test_deterministic_and_batch_size_invariant(image_paths):
    paths = image_paths[0][:10]
    ext = PretrainedFeatureExtractor("resnet18", weights=None, preprocess={"input_size": 64}, num_workers=0, progress=False).fit()
    a = ext.transform(paths)
    np.testing.assert_array_equal(ext.transform(paths), a)
    for bs, nw in [(1, 0), (3, 0), (4, 2)]:
        b = clone(ext).set_params(batch_size=bs, num_workers=nw).fit().transform(paths)
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * np.abs(a).max())
    assert a.dtype == np.float32 and np.isfinite(a).all()


def test_an_image_in_a_short_batch_gets_exactly_its_full_batch_features(tiny_cnn):
    """The last batch of a run (or of a run's cache misses) is padded to the batch size: a cached row, computed
    among however many misses, equals the uncached one bit for bit (fp32 kernels round by batch size)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rng = np.random.default_rng(3)
        images = [rng.integers(0, 256, (36, 38, 3), dtype=np.uint8) for _ in range(8)]
        ext = PretrainedFeatureExtractor(tiny_cnn, preprocess={"input_size": 32}, batch_size=4, num_workers=0,
                                         precision="fp32", progress=False).fit()
        full = ext.transform(images)
        for n in (1, 2, 3, 5, 7):  # the image at row n - 1 ends a short batch
            np.testing.assert_array_equal(ext.transform(images[:n])[n - 1], full[n - 1])
    finally:
        torch.set_num_threads(threads)


def test_progress_bar(small_ext, image_paths, monkeypatch):
    from tqdm.auto import tqdm

    bars = []
    real_init = tqdm.__init__

    def init(self, *a, **kw):
        real_init(self, *a, **kw)
        bars.append(self)

    monkeypatch.setattr(tqdm, "__init__", init)
    small_ext.set_params(progress=True).fit().transform(image_paths[0][:3])
    (bar,) = bars
    assert bar.total == 3 and bar.n == 3 and bar.unit == "img"  # every image counted once


# --------------------------------------------------------------- pickling


def test_pickle_does_not_embed_named_backbone_weights(tmp_path):
    ext = PretrainedFeatureExtractor(progress=False).fit()
    blob = pickle.dumps(ext)
    assert len(blob) < 200_000, f"pickle holds {len(blob):,} bytes: the weights were embedded"
    back = pickle.loads(blob)
    # rebuilt on loading from the name, so transform starts from fitted state
    assert back.backbone_ is ext.backbone_ and back.weights_digest_ == ext.weights_digest_  # one network per process
    x = np.random.default_rng(0).integers(0, 255, (2, 64, 64, 3), dtype=np.uint8)
    np.testing.assert_array_equal(back.transform(x), ext.transform(x))


def test_module_model_pickled_through_its_tensors(tiny_cnn):
    ext = PretrainedFeatureExtractor(tiny_cnn, preprocess=SMALL, progress=False).fit()
    back = pickle.loads(pickle.dumps(ext))
    assert isinstance(back.model, TinyCNN)
    for k, v in tiny_cnn.state_dict().items():
        assert torch.equal(back.model.state_dict()[k], v)
    x = np.random.default_rng(0).integers(0, 255, (3, 40, 40, 3), dtype=np.uint8)
    np.testing.assert_array_equal(back.transform(x), ext.transform(x))


def test_pipeline_loads_in_a_fresh_process_and_predicts_identically(tmp_path, image_paths):
    paths, y = image_paths
    pipe = make_pipeline(
        PretrainedFeatureExtractor("resnet18", weights=None, preprocess={"input_size": 48}, progress=False),
        LogisticRegression(max_iter=300),
    )
    torch.manual_seed(0)
    # random-init weights cannot be rebuilt from a name: save them as a checkpoint the pipeline points to
    import torchvision

    ckpt = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), ckpt)
    pipe.set_params(pretrainedfeatureextractor__weights=str(ckpt)).fit(paths, y)
    joblib.dump(pipe, tmp_path / "pipe.joblib")
    np.save(tmp_path / "expected.npy", pipe.predict_proba(paths))
    code = textwrap.dedent(f"""
        import joblib, numpy as np, sys
        pipe = joblib.load({str(tmp_path / 'pipe.joblib')!r})
        got = pipe.predict_proba({list(paths)!r})
        np.testing.assert_array_equal(got, np.load({str(tmp_path / 'expected.npy')!r}))
        print("identical")
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "identical" in res.stdout


def test_changed_weights_detected_after_unpickling(tmp_path, tiny_cnn):
    ckpt = tmp_path / "w.pth"
    torch.save(tiny_cnn.state_dict(), ckpt)
    ext = PretrainedFeatureExtractor(TinyCNN(), weights=ckpt, preprocess=SMALL, progress=False).fit()
    blob = pickle.dumps(ext)
    sd = tiny_cnn.state_dict()
    sd["fc.bias"] = sd["fc.bias"] + 1
    torch.save(sd, ckpt)
    with pytest.raises(ModelLoadError, match="differ from those this extractor was fitted with"):
        pickle.loads(blob)  # the backbone is rebuilt on loading: refused there, before any transform


def test_gpu_fitted_extractor_loads_on_cpu_only_machine(tiny_cnn):
    ext = PretrainedFeatureExtractor(tiny_cnn, preprocess=SMALL, precision="fp32", progress=False).fit()
    state = ext.__getstate__()
    state["device_"] = "cuda:0"
    state["autocast_dtype_"] = torch.float16
    blob = pickle.dumps(state)
    with mock.patch("torch.cuda.is_available", return_value=False):
        new = PretrainedFeatureExtractor.__new__(PretrainedFeatureExtractor)
        with pytest.warns(DeviceWarning, match="run on the CPU"):
            new.__setstate__(pickle.loads(blob))
    assert new.device_ == torch.device("cpu") and new.autocast_dtype_ is None
    x = np.zeros((2, 40, 40, 3), np.uint8)
    np.testing.assert_array_equal(new.transform(x), ext.transform(x))


# ----------------------------------------------------------------- devices


def test_resolve_device():
    with mock.patch("torch.cuda.is_available", return_value=False), mock.patch("featx._runtime.device._mps_available", return_value=False):
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
        with pytest.raises(ValueError, match="MPS is not available"):
            resolve_device("mps")
    with mock.patch("torch.cuda.is_available", return_value=True):
        assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


def test_resolve_precision():
    cpu = torch.device("cpu")
    with mock.patch("featx._runtime.device.cpu_native_bf16", return_value=False):
        assert resolve_precision("auto", cpu) is None and resolve_precision("fp32", cpu) is None
    with mock.patch("featx._runtime.device.cpu_native_bf16", return_value=True):
        assert resolve_precision("auto", cpu) == torch.bfloat16 and resolve_precision("fp32", cpu) is None
        assert resolve_precision("bf16", cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="fp16"):
        resolve_precision("fp16", cpu)
    with mock.patch("torch.cuda.is_bf16_supported", return_value=False):
        assert resolve_precision("auto", torch.device("cuda")) == torch.float16


def test_bf16_on_cpu_close_to_fp32(tiny_cnn):
    x = np.random.default_rng(0).integers(0, 255, (2, 40, 40, 3), dtype=np.uint8)
    a = PretrainedFeatureExtractor(tiny_cnn, preprocess=SMALL, progress=False).fit().transform(x)
    b = PretrainedFeatureExtractor(tiny_cnn, preprocess=SMALL, precision="bf16", progress=False).fit().transform(x)
    assert b.dtype == np.float32
    np.testing.assert_allclose(b, a, atol=0.05 * np.abs(a).max())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no cuda device")
def test_cuda_matches_cpu(image_paths):
    paths = image_paths[0][:6]
    kw = dict(model="resnet18", weights=None, preprocess={"input_size": 64}, progress=False)
    torch.manual_seed(0)
    cpu = PretrainedFeatureExtractor(**kw, device="cpu").fit()
    gpu = PretrainedFeatureExtractor(**kw, device="cuda", precision="fp32").fit()
    gpu.backbone_.load_state_dict(cpu.backbone_.state_dict())
    np.testing.assert_allclose(gpu.transform(paths), cpu.transform(paths), rtol=1e-3, atol=1e-3)


# ------------------------------------------------------------ precision by CPU capability


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_follows_native_bf16(tiny_cnn, monkeypatch, native):
    import featx._runtime.device as dev

    monkeypatch.setattr(dev, "cpu_native_bf16", lambda: native)
    ext = PretrainedFeatureExtractor(tiny_cnn, preprocess=SMALL, device="cpu", progress=False).fit()
    assert ext.precision_ == ("bf16" if native else "fp32")
    assert ext.autocast_dtype_ == (torch.bfloat16 if native else None)
    assert ext.streams_ == (torch.get_num_threads() if native else 1)
    # batch "auto" on the CPU with backend="auto": 8, what the compiled package (bf16 or fp32) gains from;
    # eager bf16 streams alone keep 4 (measured; see the parameter's docs)
    assert ext.batch_size_ == 8
    eager = PretrainedFeatureExtractor(tiny_cnn, preprocess=SMALL, device="cpu", progress=False, backend="torch").fit()
    assert eager.batch_size_ == (4 if native else 8)
    # explicit fp32 stays exact, whatever the CPU
    exact = PretrainedFeatureExtractor(tiny_cnn, preprocess=SMALL, device="cpu", precision="fp32", progress=False).fit()
    assert exact.precision_ == "fp32" and exact.autocast_dtype_ is None and exact.streams_ == 1
    assert exact.batch_size_ == 8
    # ONNX Runtime's fp32 gains nothing from batch 8: 4
    ort = PretrainedFeatureExtractor(tiny_cnn, preprocess=SMALL, device="cpu", precision="fp32",
                                     backend="onnxruntime", progress=False).fit()
    assert ort.backend_ == "onnxruntime" and ort.batch_size_ == 4


def test_explicit_bf16_warns_only_where_emulated(tiny_cnn, monkeypatch):
    import warnings

    import featx._runtime.device as dev
    from featx import DeviceWarning

    monkeypatch.setattr(dev, "cpu_native_bf16", lambda: False)
    with pytest.warns(DeviceWarning, match="emulated and slower than fp32"):
        PretrainedFeatureExtractor(tiny_cnn, preprocess=SMALL, device="cpu", precision="bf16", progress=False).fit()
    monkeypatch.setattr(dev, "cpu_native_bf16", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeviceWarning)
        ext = PretrainedFeatureExtractor(tiny_cnn, preprocess=SMALL, device="cpu", precision="bf16", progress=False).fit()
    assert ext.precision_ == "bf16"


def test_native_bf16_is_read_from_torch_probes(monkeypatch):
    import featx._runtime.device as dev

    for avx512_bf16, amx, want in [(True, False, True), (False, True, True), (False, False, False)]:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v, raising=False)
        assert dev.cpu_native_bf16() is want
    assert dev.resolve_precision("auto", torch.device("cpu"), training=True) is None  # fine-tuning stays fp32


def test_bf16_features_close_to_fp32_and_cached_apart(tiny_cnn, image_paths, tmp_path):
    X = list(image_paths[0][:6])
    kw = dict(preprocess=SMALL, device="cpu", progress=False, cache=str(tmp_path))
    f32 = PretrainedFeatureExtractor(tiny_cnn, precision="fp32", **kw).fit()
    b16 = PretrainedFeatureExtractor(tiny_cnn, precision="bf16", **kw).fit()
    a, b = f32.transform(X), b16.transform(X)
    assert b.dtype == np.float32
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.99 and not np.array_equal(a, b)  # bf16 really ran, and stayed close
    assert f32._settled.namespace[0] != b16._settled.namespace[0]
    np.testing.assert_array_equal(f32.transform(X), a)  # cached fp32 entries are not bf16 ones


def test_an_extractor_pickled_by_featx_0_2_loads(image_paths):
    """0.2's module paths (``featx._runner.RunStats`` in ``last_run_``) and state (``_plan``, ``streams_``) load."""
    ext = PretrainedFeatureExtractor("resnet18", weights=None, preprocess={"input_size": 32}, device="cpu",
                                     precision="fp32", progress=False).fit()
    want = ext.transform(image_paths[0][:2])
    state = ext.__getstate__()
    state.update(_plan="a 0.2 Plan", streams_=1, backend_="torch")
    blob = pickle.dumps(state, protocol=0).replace(b"featx._runtime.runner", b"featx._runner")
    assert b"cfeatx._runner\nRunStats" in blob
    old = PretrainedFeatureExtractor.__new__(PretrainedFeatureExtractor)
    old.__setstate__(pickle.loads(blob))
    assert type(old.last_run_).__name__ == "RunStats" and "_plan" not in vars(old)
    np.testing.assert_array_equal(old.transform(image_paths[0][:2]), want)


def test_layer_modules_name_the_module_behind_each_alias():
    from featx import PretrainedFeatureExtractor

    ext = PretrainedFeatureExtractor("resnet18", weights=None, layers=["stage4", "layer4", "pre_logits"],
                                     preprocess={"input_size": 32, "resize_size": 36}, device="cpu",
                                     progress=False).fit()
    assert ext.layers_ == ["stage4", "layer4", "pre_logits"]  # the names of the feature columns
    assert ext.layer_modules_ == {"stage4": "layer3", "layer4": "layer4", "pre_logits": "input of fc"}
    names = dict(ext.backbone_.named_modules())
    assert all(m.removeprefix("input of ") in names for m in ext.layer_modules_.values())
