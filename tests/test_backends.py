"""Inference backends (eager, torch.compile, ONNX Runtime), streaming to .npy, and GPU JPEG decoding."""

from __future__ import annotations

import importlib.util
import io
import multiprocessing as mp
import os
import warnings
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from featx import BackendWarning, PretrainedFeatureExtractor
from featx._runtime.engines import resolve_backend
from featx._images.preprocess import ImageDataset, _device_jpeg, _fast_jpeg, as_items

from .conftest import SMALL, TinyCNN

needs_ort = pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None,
                               reason="the onnx extra is not installed")

CPU = torch.device("cpu")


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-12))


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(3).integers(0, 256, (5, 70, 90, 3), dtype=np.uint8)


# The acceptance grid of the ONNX Runtime backend: the offline default (real
# weights), torchvision resnet18 and a timm model, two layers x two poolings each.
CASES = [
    ("efficientnet_lite0", "DEFAULT", ["stage3", "pre_logits"], "avg"),
    ("efficientnet_lite0", "DEFAULT", ["stage4", "stage5"], "gem"),
    ("resnet18", None, ["layer2", "layer4"], "catavgmax"),
    ("resnet18", None, ["layer3", "pre_logits"], "max"),
    ("timm:resnet10t", None, ["layer1", "layer3"], "avg"),
    ("timm:resnet10t", None, ["layer2", "layer4"], "gem"),
]


@needs_ort
@pytest.mark.parametrize("model,weights,layers,pooling", CASES)
def test_onnxruntime_matches_torch(model, weights, layers, pooling, images, tmp_path):
    kw = dict(weights=weights, layers=layers, pooling=pooling, preprocess={"input_size": 64}, progress=False)
    ref = PretrainedFeatureExtractor(model, precision="fp32", **kw).fit().transform(images)
    ext = PretrainedFeatureExtractor(model, precision="fp32", backend="onnxruntime", cache=tmp_path, **kw).fit()
    with warnings.catch_warnings():
        warnings.simplefilter("error", BackendWarning)  # a silent fallback to torch would make this test vacuous
        got = ext.transform(images)
    assert ext.backend_ == "onnxruntime"
    assert got.dtype == np.float32 and got.shape == ref.shape
    assert _rel(ref, got) < 1e-4
    assert len(list((tmp_path / "onnx").glob("*.onnx"))) == 1


@needs_ort
def test_onnx_graph_is_truncated_and_exported_once(tiny_cnn, images, tmp_path):
    import onnx

    kw = dict(layers=["stage1"], preprocess=SMALL, progress=False, backend="onnxruntime", cache=tmp_path)
    ext = PretrainedFeatureExtractor(tiny_cnn, precision="fp32", **kw).fit()
    ref = PretrainedFeatureExtractor(tiny_cnn, precision="fp32", layers=["stage1"], preprocess=SMALL, progress=False).fit()
    # cache=None: the uncached plan (only the requested layer) goes to the default cache directory
    with mock.patch.dict(os.environ, {"FEATX_CACHE_DIR": str(tmp_path / "default")}):
        unc = PretrainedFeatureExtractor(tiny_cnn, precision="fp32", layers=["stage1"], preprocess=SMALL, progress=False,
                                         backend="onnxruntime").fit()
        np.testing.assert_allclose(unc.transform(images), ref.transform(images), rtol=1e-4, atol=1e-6)
    (path,) = (tmp_path / "default" / "onnx").glob("*.onnx")
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    convs = sum(n.op_type == "Conv" for n in onnx.load(str(path)).graph.node)
    assert convs == 2 and "Gemm" not in ops and "MatMul" not in ops  # stem + stage1 only: no stage2, no head
    mtime = path.stat().st_mtime_ns
    again = PretrainedFeatureExtractor(tiny_cnn, precision="fp32", layers=["stage1"], preprocess=SMALL, progress=False,
                                       backend="onnxruntime")
    with mock.patch.dict(os.environ, {"FEATX_CACHE_DIR": str(tmp_path / "default")}):
        again.fit().transform(images)
    assert path.stat().st_mtime_ns == mtime  # reused, not exported again
    np.testing.assert_allclose(ext.transform(images), ref.transform(images), rtol=1e-4, atol=1e-6)


def _export_in_child(args):
    cache_dir, seed = args
    from tests.conftest import TinyCNN as Tiny

    torch.manual_seed(0)
    ext = PretrainedFeatureExtractor(Tiny(), precision="fp32", layers=["stage2"], preprocess={"input_size": 32, "resize_size": 36},
                                     progress=False, backend="onnxruntime", cache=cache_dir).fit()
    imgs = np.random.default_rng(seed).integers(0, 256, (3, 40, 40, 3), dtype=np.uint8)
    return ext.backend_, ext.transform(imgs)


@needs_ort
def test_concurrent_exports_do_not_corrupt(tmp_path):
    with mp.get_context("spawn").Pool(3) as pool:
        results = pool.map(_export_in_child, [(str(tmp_path), s) for s in (1, 1, 1)])
    assert all(b == "onnxruntime" for b, _ in results)
    for _, feats in results[1:]:
        np.testing.assert_allclose(feats, results[0][1], rtol=1e-5)
    files = list((tmp_path / "onnx").iterdir())
    assert [f.suffix for f in files] == [".onnx"]  # one finished file, no temporaries left behind
    import onnxruntime as ort

    ort.InferenceSession(str(files[0]), providers=["CPUExecutionProvider"])


@needs_ort
def test_damaged_onnx_file_is_exported_again(tiny_cnn, images, tmp_path):
    kw = dict(layers=["stage2"], preprocess=SMALL, progress=False, backend="onnxruntime", cache=tmp_path)
    first = PretrainedFeatureExtractor(tiny_cnn, precision="fp32", **kw).fit().transform(images)
    (path,) = (tmp_path / "onnx").glob("*.onnx")
    path.write_bytes(b"not an onnx file")
    import featx._cache.sqlite as cache_mod

    with mock.patch.object(cache_mod.EmbeddingCache, "lookup", return_value={}):  # force a recompute
        second = PretrainedFeatureExtractor(tiny_cnn, precision="fp32", **kw).fit().transform(images)
    np.testing.assert_allclose(second, first, rtol=1e-5)
    assert path.stat().st_size > 1000


class _Unexportable(TinyCNN):
    def forward(self, x):
        feats = self.stage2(self.stage1(self.stem(x)))
        return self.fc(torch.from_numpy(feats.mean((2, 3)).numpy()))  # leaves torch: cannot be traced


@needs_ort
def test_export_failure_falls_back_to_torch_with_one_warning(images, tmp_path):
    torch.manual_seed(0)
    m = _Unexportable()
    ref = PretrainedFeatureExtractor(m, precision="fp32", preprocess=SMALL, progress=False).fit().transform(images)
    ext = PretrainedFeatureExtractor(m, precision="fp32", preprocess=SMALL, progress=False, backend="onnxruntime",
                                     cache=tmp_path)
    with pytest.warns(BackendWarning, match="ONNX Runtime.*eager PyTorch") as rec:
        ext.fit()  # the backend is settled in fit: the export is tried there
        got = ext.transform(images)
        ext.transform(images[:2][::-1].copy())
    assert len([w for w in rec if issubclass(w.category, BackendWarning)]) == 1
    assert ext.backend_ == "torch"
    np.testing.assert_allclose(got, ref, rtol=1e-6)


@needs_ort
def test_backend_validation():
    with pytest.raises(ValueError, match="backend='onnx' is invalid"):
        resolve_backend("onnx", CPU, None)
    with pytest.raises(ValueError, match="precision='fp32'"):
        resolve_backend("onnxruntime", CPU, torch.bfloat16)
    with pytest.raises(ValueError, match="CPU only"):
        resolve_backend("onnxruntime", torch.device("cuda"), None)
    assert resolve_backend("auto", CPU, None) == "torch.compile"
    assert resolve_backend("auto", CPU, torch.bfloat16) == "torch.compile"
    assert resolve_backend("auto", torch.device("cuda"), None) == "torch"
    with mock.patch("featx._runtime.engines._ort_installed", return_value=False):
        with pytest.raises(ImportError, match=r"pip install 'featx\[onnx\]'"):
            resolve_backend("onnxruntime", CPU, None)
    with pytest.raises(ValueError, match="backend="):
        PretrainedFeatureExtractor(backend="tensorrt").fit()


@needs_ort
def test_auto_backend_is_the_compiled_package_on_cpu(tiny_cnn, images, tmp_path, monkeypatch):
    import featx._runtime.device as dev

    monkeypatch.setattr(dev, "cpu_native_bf16", lambda: False)  # an AVX2-class CPU
    ext = PretrainedFeatureExtractor(tiny_cnn, preprocess=SMALL, progress=False, backend="auto", cache=tmp_path).fit()
    assert ext.backend_ == "torch.compile" and ext.precision_ == "fp32"
    # where bf16 is native, auto precision is bf16, compiled in bf16 the same way (eager bf16 streams until then)
    monkeypatch.setattr(dev, "cpu_native_bf16", lambda: True)
    fast = PretrainedFeatureExtractor(tiny_cnn, preprocess=SMALL, progress=False, backend="auto").fit()
    assert fast.backend_ == "torch.compile" and fast.precision_ == "bf16"
    # an explicit onnxruntime backend makes precision="auto" fp32 (it computes in fp32), on any CPU
    ort = PretrainedFeatureExtractor(tiny_cnn, preprocess=SMALL, progress=False, backend="onnxruntime", cache=tmp_path).fit()
    assert ort.backend_ == "onnxruntime" and ort.precision_ == "fp32"
    ref = PretrainedFeatureExtractor(tiny_cnn, precision="fp32", preprocess=SMALL, progress=False).fit().transform(images)
    np.testing.assert_allclose(ext.transform(images), ref, rtol=1e-4, atol=1e-6)


@needs_ort
def test_backends_share_cache_entries(tiny_cnn, images, tmp_path):

    kw = dict(preprocess=SMALL, progress=False, cache=tmp_path)
    a = PretrainedFeatureExtractor(tiny_cnn, precision="fp32", **kw).fit().transform(images)
    ext = PretrainedFeatureExtractor(tiny_cnn, precision="fp32", backend="onnxruntime", **kw).fit()
    b = ext.transform(images)
    assert ext.last_run_.cache_hits == len(images)
    np.testing.assert_array_equal(a, b)


def test_in_process_torch_compile_matches_eager(tiny_cnn, images):
    """The in-process engine (CUDA, and bf16 on the CPU); fp32 on the CPU runs a package kept on disk."""
    from featx._runtime.engines import _compiled_engine

    kw = dict(layers=["stage1", "pre_logits"], pooling="catavgmax", preprocess=SMALL, progress=False)
    ext = PretrainedFeatureExtractor(tiny_cnn, precision="fp32", batch_size=2, **kw).fit()
    cap = ext._runner.capture
    engine = _compiled_engine(cap)
    x = torch.rand(3, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("error", BackendWarning)
        got, want = engine(x), cap.run(x)
    for g, w in zip(got, want):
        for p in w:
            torch.testing.assert_close(g[p], w[p], rtol=1e-4, atol=1e-5)


def test_in_process_torch_compile_failure_falls_back(tiny_cnn, images):
    from featx._runtime.engines import _compiled_engine

    ext = PretrainedFeatureExtractor(tiny_cnn, precision="fp32", preprocess=SMALL, progress=False).fit()
    cap = ext._runner.capture

    def broken(fn, **kw):
        def run(x):
            raise RuntimeError("no C++ compiler found\nmore detail")
        return run

    with mock.patch("torch.compile", broken):
        engine = _compiled_engine(cap)
    x = torch.rand(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with pytest.warns(BackendWarning, match="no C\\+\\+ compiler found"), torch.inference_mode():
        got = engine(x)
    with torch.inference_mode():
        want = cap.run(x)
    torch.testing.assert_close(got[0]["vec"], want[0]["vec"])


def test_after_a_compile_fallback_eager_errors_raise_once_without_a_second_warning(tiny_cnn, images):
    from featx._runtime.engines import _compiled_engine

    class Cap:  # a capture whose eager run fails the second time it is called
        calls = 0

        def run(self, x):
            Cap.calls += 1
            if Cap.calls > 1:
                raise ValueError("eager failure")
            return [{"vec": x}]

    def broken(fn, **kw):
        def run(x):
            raise RuntimeError("no C++ compiler found")
        return run

    cap = Cap()
    with mock.patch("torch.compile", broken):
        engine = _compiled_engine(cap)
    x = torch.zeros(1, 3)
    with pytest.warns(BackendWarning, match="torch.compile failed"):
        engine(x)  # compiled fails: warned, eager ran once
    assert Cap.calls == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", BackendWarning)
        with pytest.raises(ValueError, match="eager failure"):
            engine(x)  # eager's own error: raised as it is, not another "torch.compile failed", not run twice
    assert Cap.calls == 2


# ------------------------------------------------------------ .npy streaming


def test_transform_to_npy_equals_transform(tiny_cnn, image_paths, tmp_path):
    paths, _ = image_paths
    ext = PretrainedFeatureExtractor(tiny_cnn, precision="fp32", preprocess=SMALL, progress=False, batch_size=4).fit()
    ref = ext.transform(paths)
    mm = ext.transform_to_npy(paths, tmp_path / "sub" / "f.npy")
    assert isinstance(mm, np.memmap) and not mm.flags.writeable
    np.testing.assert_array_equal(np.asarray(mm), ref)
    np.testing.assert_array_equal(np.load(tmp_path / "sub" / "f.npy"), ref)
    cached = PretrainedFeatureExtractor(tiny_cnn, precision="fp32", preprocess=SMALL, progress=False, cache=tmp_path / "c").fit()
    cached.transform(paths[:5])
    np.testing.assert_allclose(cached.transform_to_npy(paths, tmp_path / "g.npy"), ref, rtol=1e-5)


def test_transform_to_npy_errors(tiny_cnn, tmp_path):
    ext = PretrainedFeatureExtractor(tiny_cnn, precision="fp32", preprocess=SMALL, progress=False)
    with pytest.raises(Exception, match="not fitted"):
        ext.transform_to_npy(np.zeros((1, 8, 8, 3), np.uint8), tmp_path / "f.npy")
    ext.fit()
    with pytest.raises(ValueError, match=r"must name a \.npy file"):
        ext.transform_to_npy(np.zeros((1, 8, 8, 3), np.uint8), tmp_path / "f.csv")


def test_transform_to_npy_on_a_bad_image_leaves_no_file_and_keeps_the_work_in_the_cache(tiny_cnn, image_paths,
                                                                                      tmp_path, computed):
    from featx import ImageLoadError

    paths, _ = image_paths
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    ext = PretrainedFeatureExtractor(tiny_cnn, precision="fp32", preprocess=SMALL, progress=False, batch_size=2,
                                     cache=str(tmp_path / "cache")).fit()
    with pytest.raises(ImageLoadError, match="broken.jpg"):
        ext.transform_to_npy(paths[:4] + [str(bad)], tmp_path / "f.npy")
    assert not (tmp_path / "f.npy").exists()  # no file that looks complete with zero rows
    done = computed[0]
    np.testing.assert_array_equal(ext.transform_to_npy(paths[:4], tmp_path / "f.npy"), ext.transform(paths[:4]))
    assert computed[0] == done  # the four good rows came from the cache


# -------------------------------------------------------------- GPU decoding


def _jpeg_bytes(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


def test_device_jpeg_path_matches_cpu_decoder():
    arr = np.random.default_rng(0).integers(0, 256, (30, 44, 3), dtype=np.uint8)
    data = _jpeg_bytes(arr)
    got = _device_jpeg(data, CPU)
    torch.testing.assert_close(got, _fast_jpeg(data, None))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: nvJPEG would ignore it, so the CPU path takes it
    assert _device_jpeg(_jpeg_bytes(arr, exif=exif), CPU) is None
    assert _device_jpeg(b"\x89PNG\r\n\x1a\n", CPU) is None


def test_dataset_decoding_on_a_device_gives_the_same_batch(image_paths):
    paths, _ = image_paths
    items = as_items(paths)
    cfg = {"input_size": (32, 32), "resize_size": 36, "interpolation": "bilinear", "mean": (0.5,) * 3,
           "std": (0.5,) * 3}
    plain = ImageDataset(items, np.arange(len(paths)), cfg)
    on_dev = ImageDataset(items, np.arange(len(paths)), cfg, decode_device=CPU)
    for k in range(len(paths)):
        i, a, _ = plain[k]
        j, b, _ = on_dev[k]
        assert i == j and b.device == CPU
        # the device path skips Pillow's DCT-domain draft downscaling, so pixels may differ slightly
        assert (a.int() - b.int()).abs().float().mean() < 4


def test_gpu_decode_needs_cuda():
    with pytest.raises(ValueError, match="gpu_decode=True.*CUDA"):
        PretrainedFeatureExtractor(gpu_decode=True, device="cpu").fit()
    with pytest.raises(ValueError, match="gpu_decode='yes' is invalid"):
        PretrainedFeatureExtractor(gpu_decode="yes", device="cpu").fit()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no cuda device")
def test_gpu_decode_on_cuda(image_paths):
    paths, _ = image_paths
    kw = dict(weights=None, preprocess={"input_size": 64}, progress=False, device="cuda", precision="fp32")
    ref = PretrainedFeatureExtractor("resnet18", precision="fp32", **kw).fit().transform(paths)
    got = PretrainedFeatureExtractor("resnet18", gpu_decode=True, **kw).fit().transform(paths)
    assert _rel(ref, got) < 0.05
