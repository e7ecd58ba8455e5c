"""Bad input, hostile files and faults: a clear error or a defined result for each, and no work lost."""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import sqlite3
import time
import warnings

import numpy as np
import pytest
import torch

from featx import CacheWarning, DeviceWarning, ImageLoadError, ImageLoadWarning, ModelLoadError, PretrainedFeatureExtractor
from featx._cache.sqlite import DB_NAME

from .conftest import SMALL, TinyCNN
from .make_gauntlet import _png_with_size, build


@pytest.fixture(scope="module")
def gauntlet(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gauntlet")
    cases = build(folder)
    return folder, cases


def _ext(model, **kw):
    kw = {"preprocess": SMALL, "num_workers": 0, "progress": False, **kw}
    return PretrainedFeatureExtractor(model, **kw).fit()


def test_gauntlet_nan_policy(gauntlet, tiny_cnn):
    folder, cases = gauntlet
    names = sorted(cases)
    paths = [str(folder / n) for n in names]
    ext = _ext(tiny_cnn, on_error="nan", batch_size=4)
    with pytest.warns(ImageLoadWarning) as rec:
        out = ext.transform(paths)
    bad = [i for i, n in enumerate(names) if cases[n] != "ok"]
    assert len(rec) == 1 and f"{len(bad)} of {len(paths)} images could not be read" in str(rec[0].message)
    assert ext.failed_indices_.tolist() == bad
    for i, n in enumerate(names):
        if cases[n] == "ok":
            assert np.isfinite(out[i]).all(), n
            # every readable image gets the features it gets when read alone
            np.testing.assert_allclose(out[i], ext.transform([paths[i]])[0], rtol=1e-5, atol=1e-6, err_msg=n)
        else:
            assert np.isnan(out[i]).all(), n


def test_gauntlet_raise_policy_names_each_case(gauntlet, tiny_cnn):
    folder, cases = gauntlet
    ext = _ext(tiny_cnn)
    good = str(folder / "good.jpg")
    for name, outcome in sorted(cases.items()):
        path = str(folder / name)
        if outcome == "ok":
            assert np.isfinite(ext.transform([path])).all(), name
            continue
        with pytest.raises(ImageLoadError) as info:
            ext.transform([good, path])
        err = info.value
        assert err.index == 1 and err.path == path, name
        assert outcome.removeprefix("error: ") in str(err), (name, str(err))


def test_gauntlet_through_worker_processes(gauntlet, tiny_cnn):
    folder, cases = gauntlet
    paths = [str(folder / n) for n in sorted(cases)]
    ext = _ext(tiny_cnn, on_error="nan", num_workers=2, batch_size=3)
    with pytest.warns(ImageLoadWarning):
        a = ext.transform(paths)
    with pytest.warns(ImageLoadWarning):
        b = _ext(tiny_cnn, on_error="nan", batch_size=3).transform(paths)
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ImageLoadError, match=r"item \d+ \('.*'\)"):
        _ext(tiny_cnn, num_workers=2, batch_size=3).transform(paths)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow warns at open; featx refuses
@pytest.mark.parametrize("side", [10_000, 60_000])
def test_decompression_bomb_rejected_before_any_decode(tiny_cnn, tmp_path, monkeypatch, side):
    """Refused from the header: no decode call, so no pixel buffer. 10000 x 10000 is between Pillow's
    limit and twice it, where Pillow itself only warns and would decode 300 MB; 60000 x 60000 is past it."""
    from PIL import Image, ImageFile

    assert Image.MAX_IMAGE_PIXELS < side * side  # the file is a bomb by Pillow's own limit
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_with_size(side, side))
    decodes = []

    def no_decode(self, *a, **k):
        decodes.append(self.size)
        raise AssertionError(f"{self.size} image was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    with pytest.raises(ImageLoadError, match="decompression bomb"):
        _ext(tiny_cnn, num_workers=0).transform([str(path)])
    assert decodes == []


def test_nan_policy_with_cache_stores_only_good_items(gauntlet, tiny_cnn, tmp_path):
    folder, cases = gauntlet
    paths = [str(folder / n) for n in sorted(cases)]
    ext = _ext(tiny_cnn, on_error="nan", cache=str(tmp_path))
    with pytest.warns(ImageLoadWarning):
        first = ext.transform(paths)
    n_good = sum(v == "ok" for v in cases.values())
    assert ext.last_run_.computed == n_good
    with pytest.warns(ImageLoadWarning):
        second = ext.transform(paths)
    assert ext.last_run_.cache_hits == n_good and ext.last_run_.computed == 0
    np.testing.assert_array_equal(first, second)


def test_mixed_types_in_one_sequence(tiny_cnn, gauntlet):
    folder, _ = gauntlet
    from PIL import Image

    path = str(folder / "good.jpg")
    arr = np.array(Image.open(path).convert("RGB"))
    X = [path, arr, Image.fromarray(arr), torch.from_numpy(arr).permute(2, 0, 1), arr.astype(np.float32) / 255]
    out = _ext(tiny_cnn).transform(X)
    for row in out[1:4]:
        np.testing.assert_array_equal(row, out[0])
    np.testing.assert_allclose(out[4], out[0], atol=0.02 * np.abs(out[0]).max())


@pytest.mark.parametrize(
    "item,match",
    [
        (np.zeros((8, 8, 3), bool), "unsupported array dtype bool"),
        (np.zeros((8, 8, 3), np.int64), "unsupported pixel dtype int64"),
        (np.full((8, 8), -0.5, np.float32), r"must lie in \[0, 1\]"),
        (np.full((8, 8, 3), np.inf, np.float32), "NaN or infinite"),
        (np.zeros((8, 8, 5), np.uint8), "with 5 channels .* in_chans=3 reads 1, 3 or 4 .*pass in_chans=5"),
        (np.zeros((1, 2, 3, 4, 5), np.uint8), "H x W or H x W x C"),
    ],
)
def test_array_cases(tiny_cnn, item, match):
    with pytest.raises(ImageLoadError, match=match):
        _ext(tiny_cnn).transform([np.zeros((8, 8, 3), np.uint8), item])


def test_invalid_on_error(tiny_cnn):
    with pytest.raises(ValueError, match="on_error='skip' is invalid"):
        PretrainedFeatureExtractor(tiny_cnn, on_error="skip").fit()


# ---------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("header", [b"\x00" * 8 + b"garbage", (2**40).to_bytes(8, "little") + b"{}", b"\x05\x00\x00\x00\x00\x00\x00\x00{\"a\":"])
def test_corrupt_safetensors_rejected(tmp_path, tiny_cnn, header):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(header)
    with pytest.raises(ModelLoadError, match="cannot read safetensors file"):
        PretrainedFeatureExtractor(tiny_cnn, weights=path).fit()


def test_checkpoint_shape_mismatch_names_tensor(tmp_path, tiny_cnn):
    sd = tiny_cnn.state_dict()
    sd["stage1.0.weight"] = torch.zeros(12, 8, 5, 5)
    torch.save(sd, tmp_path / "w.pth")
    with pytest.raises(ModelLoadError, match=r"'stage1\.0\.weight' has shape \(12, 8, 5, 5\), expected \(12, 8, 3, 3\)"):
        PretrainedFeatureExtractor(tiny_cnn, weights=tmp_path / "w.pth").fit()


# ------------------------------------------------------------------ devices


def test_out_of_memory_halves_the_batch(tiny_cnn, gauntlet, monkeypatch):
    folder, _ = gauntlet
    X = np.random.default_rng(0).integers(0, 255, (7, 40, 40, 3), dtype=np.uint8)
    ref = _ext(tiny_cnn, batch_size=7).transform(X)
    ext = _ext(tiny_cnn, batch_size=7)
    runner = ext._runner
    real_run = runner.engine
    sizes = []

    def fake_run(x):
        sizes.append(x.shape[0])
        if x.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_run(x)

    monkeypatch.setattr(runner, "engine", fake_run)
    with pytest.warns(DeviceWarning, match="retrying with 3") as rec:
        out = ext.transform(X)
    assert all("out of memory" in str(w.message) for w in rec)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    assert max(s for s in sizes if s <= 2) == 2
    sizes.clear()
    ext.transform(X)  # later batches are split up front: no more failed attempts at 7
    assert 7 not in sizes


def test_out_of_memory_on_a_single_image_is_raised(tiny_cnn, monkeypatch):
    ext = _ext(tiny_cnn)
    def oom(x):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(ext._runner, "engine", oom)
    with pytest.raises(torch.OutOfMemoryError), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeviceWarning)
        ext.transform(np.zeros((3, 8, 8, 3), np.uint8))


# -------------------------------------------------------------- cache faults


def _variant(images: list, k: int) -> list:
    """The images with one pixel changed by ``k``: new content, so new cache entries for every child."""
    out = [im.copy() for im in images]
    for im in out:
        im[0, 0, 0] = (int(im[0, 0, 0]) + k + 1) % 256
    return out


def _child(cache_dir, images, order_seed, writing, stall):
    """Embed ``paths`` into the cache; ``writing`` is 1 exactly while a cache write transaction runs.

    The write is slowed down (SQLite's progress handler sleeps inside it);
    with ``stall`` the first write stops inside its transaction until the
    child is killed, so that kill lands inside it for certain.
    """
    from featx._cache.sqlite import EmbeddingCache

    torch.set_num_threads(1)  # a forked child must not enter the parent's OpenMP pool (it hangs there)
    torch.manual_seed(0)
    model = TinyCNN()
    ext = PretrainedFeatureExtractor(model, preprocess=SMALL, cache=cache_dir, batch_size=2, num_workers=0, progress=False).fit()
    real_write = EmbeddingCache._write

    def slow_write(self, fn, *args):
        def inside(conn, *a):
            writing.value = 1  # within BEGIN IMMEDIATE ... COMMIT
            if stall:
                time.sleep(600)  # inside the transaction until the kill
            conn.set_progress_handler(lambda: time.sleep(0.001) or 0, 50)
            try:
                return fn(conn, *a)
            finally:
                conn.set_progress_handler(None, 0)

        try:
            return real_write(self, inside, *args)
        finally:
            writing.value = 0  # committed (or rolled back)

    EmbeddingCache._write = slow_write
    X = _variant(images, order_seed)
    random.Random(order_seed).shuffle(X)
    ext.transform(X)
    os._exit(0)


def test_sigkill_during_cache_writes_never_corrupts(image_paths, tmp_path):
    from PIL import Image

    images = [np.asarray(Image.open(p).convert("RGB")) for p in image_paths[0]]
    cache_dir = str(tmp_path / "cache")
    ctx = mp.get_context("fork")
    rng = random.Random(0)
    killed_mid_write = 0
    for k in range(20):
        writing = ctx.Value("i", 0, lock=False)
        stall = k % 2 == 0  # every other kill lands inside a write for certain; the rest anywhere near one
        proc = ctx.Process(target=_child, args=(cache_dir, images, k, writing, stall))
        proc.start()
        deadline = time.monotonic() + 120
        while writing.value == 0 and proc.is_alive() and time.monotonic() < deadline:
            time.sleep(0.0005)
        assert writing.value == 1 or not stall, "a stalled child never began a write"
        time.sleep(rng.uniform(0.0, 0.005))  # somewhere inside (or just after) the write transaction
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        # the child is dead, so the flag is final: 1 means it died inside a write transaction
        assert proc.exitcode == -signal.SIGKILL or not stall
        if proc.exitcode == -signal.SIGKILL and writing.value == 1:
            killed_mid_write += 1
        assert writing.value == 1 or not stall, "a stalled child was killed outside its write"
        # after each kill the cache is consistent: what the child committed reads back intact and right
        X = _variant(images, k)
        torch.manual_seed(0)
        ref = _ext(TinyCNN()).transform(X)
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("error", CacheWarning)
            got = _ext(TinyCNN(), cache=cache_dir).transform(X)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    assert killed_mid_write >= 10  # the ten stalled children at least
    with sqlite3.connect(os.path.join(cache_dir, DB_NAME)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_image_load_warning_points_at_the_callers_line(tiny_cnn, tmp_path):
    """Through scikit-learn's set_output wrapper and a Pipeline, the warning names this file, not sklearn's."""
    import warnings

    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from featx import ImageLoadWarning, PretrainedFeatureExtractor

    X = [np.zeros((20, 20, 3), np.uint8), str(tmp_path / "missing.jpg")]
    ext = PretrainedFeatureExtractor(tiny_cnn, preprocess={"input_size": 16, "resize_size": 18}, on_error="nan",
                                     progress=False).fit()
    pipe = make_pipeline(PretrainedFeatureExtractor(tiny_cnn, preprocess={"input_size": 16, "resize_size": 18},
                                                    on_error="nan", progress=False), StandardScaler())
    for call in (lambda: ext.transform(X), lambda: ext.set_output(transform="default").transform(X),
                 lambda: pipe.fit_transform(X)):
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            call()
        (w,) = [w for w in got if issubclass(w.category, ImageLoadWarning)]
        assert w.filename == __file__, w.filename
