"""The embedding cache: keys, hits and misses, grids for free, faults, concurrency, management."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline

from featx import CacheWarning, PretrainedFeatureExtractor
from featx._cache import sqlite as cache_mod
from featx._cache.sqlite import DB_NAME, EmbeddingCache, default_cache_dir, resolve_cache_dir

from .conftest import SMALL, TinyCNN, make_image


@pytest.fixture
def cache_dir(tmp_path):
    return tmp_path / "cache"


@pytest.fixture
def files(tmp_path, image_paths):
    """A private copy of some images (tests edit and rename them)."""
    d = tmp_path / "imgs"
    d.mkdir()
    out = []
    for p in image_paths[0][:10]:
        dst = d / Path(p).name.replace(".", f"_{len(out)}.")
        shutil.copy(p, dst)
        out.append(str(dst))
    return out


def _ext(model, cache_dir, **kw):
    kw = {"preprocess": SMALL, "num_workers": 0, "precision": "fp32", **kw}
    return PretrainedFeatureExtractor(model, cache=str(cache_dir), progress=False, **kw).fit()


def assert_same(a, b):
    """Equal up to float noise: a batch of other composition may round differently (< 1e-5)."""
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _reference(model, X, **kw):
    kw.setdefault("preprocess", SMALL)
    kw.setdefault("precision", "fp32")
    return PretrainedFeatureExtractor(model, progress=False, num_workers=0, **kw).fit().transform(X)


# ------------------------------------------------------------ the parameter


def test_resolve_cache_dir(monkeypatch, tmp_path):
    assert resolve_cache_dir(None) is None and resolve_cache_dir(False) is None
    assert resolve_cache_dir(tmp_path) == tmp_path and resolve_cache_dir(str(tmp_path)) == tmp_path
    monkeypatch.setenv("FEATX_CACHE_DIR", str(tmp_path / "env"))
    assert resolve_cache_dir(True) == tmp_path / "env"
    monkeypatch.delenv("FEATX_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    if sys.platform.startswith("linux"):
        assert default_cache_dir() == tmp_path / "xdg" / "featx"
    with pytest.raises(ValueError, match="cache=3 is invalid"):
        PretrainedFeatureExtractor(TinyCNN(), cache=3).fit()


def test_cache_param_survives_clone_and_pickle(tiny_cnn, cache_dir, files):
    import pickle

    from sklearn.base import clone

    ext = _ext(tiny_cnn, cache_dir)
    assert clone(ext).get_params()["cache"] == str(cache_dir)
    a = ext.transform(files)
    back = pickle.loads(pickle.dumps(ext))
    np.testing.assert_array_equal(back.transform(files), a)
    assert back.last_run_.computed == 0


# ----------------------------------------------------------- hits and misses


def test_cold_then_warm_identical_and_no_compute(tiny_cnn, cache_dir, files):
    ref = _reference(tiny_cnn, files)
    ext = _ext(tiny_cnn, cache_dir)
    cold = ext.transform(files)
    assert ext.last_run_.computed == len(files) and ext.last_run_.cache_hits == 0
    warm = ext.transform(files)
    assert ext.last_run_.computed == 0 and ext.last_run_.cache_hits == len(files)
    np.testing.assert_array_equal(cold, ref)
    np.testing.assert_array_equal(warm, ref)


def test_renamed_file_hits_and_edited_file_misses(tiny_cnn, cache_dir, files, tmp_path):
    ext = _ext(tiny_cnn, cache_dir)
    ext.transform(files)
    renamed = str(tmp_path / "renamed.jpg")
    os.rename(files[0], renamed)
    edited = files[1]
    img = np.asarray(Image.open(edited)).copy()
    img[0, 0] = 255 - img[0, 0]
    Image.fromarray(img).save(edited, format="PNG" if edited.endswith(".png") else "JPEG", quality=100)
    out = ext.transform([renamed, edited, files[2]])
    assert ext.last_run_.computed == 1 and ext.last_run_.cache_hits == 2
    assert_same(out, _reference(tiny_cnn, [renamed, edited, files[2]]))


def test_arrays_pil_and_bytes_keyed_by_content(tiny_cnn, cache_dir, files):
    rng = np.random.default_rng(0)
    a = make_image(rng, 0, (40, 40))
    ext = _ext(tiny_cnn, cache_dir)
    ext.transform([a])
    ext.transform([a.copy(), Image.fromarray(a)])
    assert ext.last_run_.cache_hits == 1 and ext.last_run_.computed == 1  # the PIL image has its own key
    ext.transform([a[:, :39]])  # other shape: a miss
    assert ext.last_run_.computed == 1
    ext.transform(files[:2])
    ext.transform([Path(files[0]).read_bytes(), files[1]])  # bytes of a file share its key
    assert ext.last_run_.computed == 0


def test_duplicates_in_one_call_computed_once(tiny_cnn, cache_dir, files):
    ext = _ext(tiny_cnn, cache_dir)
    X = [files[0], files[1], files[0], files[0]]
    out = ext.transform(X)
    assert ext.last_run_.computed == 2 and ext.last_run_.duplicates == 2
    assert_same(out, _reference(tiny_cnn, X))


def test_unchanged_files_are_not_rehashed(tiny_cnn, cache_dir, files, monkeypatch):
    old = time.time() - 3600
    for f in files:
        os.utime(f, (old, old))
    ext = _ext(tiny_cnn, cache_dir)
    ext.transform(files)
    calls = []
    real = cache_mod._hash_file
    monkeypatch.setattr(cache_mod, "_hash_file", lambda p: calls.append(p) or real(p))
    ext.transform(files)
    assert calls == []
    os.utime(files[3], (old + 10, old + 10))  # touched: re-hashed, still a hit (same bytes)
    ext.transform(files)
    assert calls == [files[3]] and ext.last_run_.computed == 0


# ------------------------------------------------------------------- keys


def test_every_key_component_changes_the_namespace_or_field(tiny_cnn, monkeypatch, tmp_path):
    base = _ext(tiny_cnn, tmp_path)
    ns0 = base._settled.namespace[0]
    fields0 = base._settled.plan.out_fields
    torch.manual_seed(5)
    other_weights = tmp_path / "w.pth"
    torch.save(TinyCNN().state_dict(), other_weights)
    changed_ns = {
        "weights": _ext(tiny_cnn, tmp_path, weights=other_weights),
        "preprocess": _ext(tiny_cnn, tmp_path, preprocess={"input_size": 32, "resize_size": 40}),
        "mean": _ext(tiny_cnn, tmp_path, preprocess={**SMALL, "mean": (0.5, 0.5, 0.5)}),
        "precision": _ext(tiny_cnn, tmp_path, precision="bf16"),
        "model": _ext("resnet18", tmp_path, weights=None),
    }
    for what, ext in changed_ns.items():
        assert ext._settled.namespace[0] != ns0, what
    changed_field = {
        "layer": _ext(tiny_cnn, tmp_path, layers="stage1"),
        "pooling": _ext(tiny_cnn, tmp_path, layers="stage2", pooling="max"),
        "gem_p": _ext(tiny_cnn, tmp_path, layers="stage2", pooling="gem", gem_p=4.0),
    }
    gem3 = _ext(tiny_cnn, tmp_path, layers="stage2", pooling="gem")
    assert changed_field["gem_p"]._settled.plan.out_fields != gem3._settled.plan.out_fields
    for what, ext in changed_field.items():
        assert ext._settled.namespace[0] == ns0 and ext._settled.plan.out_fields != fields0, what
    same = [_ext(tiny_cnn, tmp_path, batch_size=7), _ext(tiny_cnn, tmp_path, num_workers=2)]
    same.append(PretrainedFeatureExtractor(tiny_cnn, preprocess=SMALL, cache=str(tmp_path), precision="fp32",
                                           progress=True).fit())
    for ext in same:
        assert ext._settled.namespace[0] == ns0 and ext._settled.plan.out_fields == fields0
    monkeypatch.setattr("featx._cache.sqlite.FORMAT_VERSION", 999)
    assert base.fit()._settled.namespace[0] != ns0
    monkeypatch.setattr("featx._cache.sqlite.FORMAT_VERSION", 1)
    monkeypatch.setattr("torch.__version__", "99.1.0")
    assert base.fit()._settled.namespace[0] != ns0


def test_alias_and_module_name_share_entries(tiny_cnn, cache_dir, files):
    _ext(tiny_cnn, cache_dir, layers="stage3").transform(files)
    ext = _ext(tiny_cnn, cache_dir, layers="stage2")  # module 'stage2' is alias stage3
    ext.transform(files)
    assert ext.last_run_.computed == 0


# -------------------------------------------------------- grids for free


def test_layer_and_pooling_grid_runs_backbone_once(cache_dir, files):
    model = "resnet18"
    kw = dict(weights=None, preprocess={"input_size": 48})
    first = _ext(model, cache_dir, layers="layer1", **kw)
    first.transform(files)
    assert first.last_run_.computed == len(files)
    for layers, pooling in [("pre_logits", "avg"), (["layer3", "layer4"], "catavgmax"), ("stage1", "max"), ("layer2", "avg")]:
        ext = _ext(model, cache_dir, layers=layers, pooling=pooling, **kw)
        got = ext.transform(files)
        assert ext.last_run_.computed == 0, (layers, pooling)
        np.testing.assert_allclose(got, _reference(model, files, layers=layers, pooling=pooling, **kw), rtol=1e-6, atol=1e-6)


def test_a_grid_over_the_pooling_menu_costs_one_pass_per_image(cache_dir, files, computed):
    model, kw = "resnet18", dict(weights=None, preprocess={"input_size": 48})
    menu = ["avg", "max", "avgmax", "catavgmax", "gem"]
    got = {p: _ext(model, cache_dir, layers=["layer3", "pre_logits"], pooling=p, **kw).transform(files) for p in menu}
    assert computed[0] == len(files)  # the first (avg) run stored what the others read
    for p in menu:
        want = _reference(model, files, layers=["layer3", "pre_logits"], pooling=p, **kw)
        np.testing.assert_allclose(got[p], want, rtol=1e-5, atol=1e-6, err_msg=p)


def test_grid_search_processes_each_image_once(tiny_cnn, cache_dir, image_paths, computed):
    paths, y = image_paths
    pipe = make_pipeline(PretrainedFeatureExtractor(tiny_cnn, preprocess=SMALL, cache=str(cache_dir), progress=False),
                         LogisticRegression(max_iter=300))
    grid = {"pretrainedfeatureextractor__layers": ["stage1", "stage2", "pre_logits"],
            "pretrainedfeatureextractor__pooling": ["avg", "catavgmax"], "logisticregression__C": [0.1, 1.0]}
    GridSearchCV(pipe, grid, cv=3).fit(paths, y)
    assert computed[0] == len(paths)


# ------------------------------------------------------------------ faults


def test_bad_item_keeps_earlier_work(tiny_cnn, cache_dir, files, tmp_path):
    from featx import ImageLoadError

    ext = _ext(tiny_cnn, cache_dir, batch_size=2)
    X = files[:5] + [str(tmp_path / "missing.jpg")] + files[5:]
    with pytest.raises(ImageLoadError):
        ext.transform(X)
    ext.transform(files)
    assert ext.last_run_.cache_hits == 5 and ext.last_run_.computed == len(files) - 5


def test_corrupt_entry_detected_and_recomputed(tiny_cnn, cache_dir, files):
    ext = _ext(tiny_cnn, cache_dir)
    ref = ext.transform(files[:3])
    with sqlite3.connect(cache_dir / DB_NAME) as conn:
        conn.execute("UPDATE embeddings SET vec = zeroblob(length(vec)) WHERE rowid = (SELECT MIN(rowid) FROM embeddings WHERE field LIKE 'input:fc|%')")
        conn.execute("UPDATE embeddings SET vec = substr(vec, 1, 8) WHERE rowid = (SELECT MAX(rowid) FROM embeddings WHERE field LIKE 'input:fc|%')")
    with pytest.warns(CacheWarning, match="2 corrupt entries"):
        out = ext.transform(files[:3])
    assert ext.last_run_.computed == 2
    assert_same(out, ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheWarning)
        assert_same(ext.transform(files[:3]), ref)
    assert ext.last_run_.computed == 0


def test_corrupt_database_file_moved_aside(tiny_cnn, cache_dir, files):
    cache_dir.mkdir()
    (cache_dir / DB_NAME).write_bytes(b"this is not a database" * 100)
    with pytest.warns(CacheWarning, match="corrupt"):
        out = _ext(tiny_cnn, cache_dir).transform(files[:2])
    np.testing.assert_array_equal(out, _reference(tiny_cnn, files[:2]))
    assert any(p.name.startswith(f"{DB_NAME}.corrupt-") for p in cache_dir.iterdir())


def test_unusable_cache_dir_degrades_to_warning(tiny_cnn, tmp_path, files):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.warns(CacheWarning, match="unusable"):
        out = _ext(tiny_cnn, blocker / "cache").transform(files[:2])
    np.testing.assert_array_equal(out, _reference(tiny_cnn, files[:2]))


def test_read_only_database_degrades_to_warning(tiny_cnn, cache_dir, files):
    ext = _ext(tiny_cnn, cache_dir)
    ext.transform(files[:2])
    cache = EmbeddingCache.open(cache_dir)
    cache._conn.execute("PRAGMA query_only=ON")  # every write now fails, as on a read-only or full disk
    try:
        with pytest.warns(CacheWarning, match="cannot be written"):
            out = ext.transform(files[:4])
        assert ext.last_run_.cache_hits == 2
        assert_same(out, _reference(tiny_cnn, files[:4]))
    finally:
        cache.close()


_WORKER = textwrap.dedent("""
    import sys, numpy as np, torch
    sys.path.insert(0, {tests!r})
    from conftest import TinyCNN, SMALL
    from featx import PretrainedFeatureExtractor
    torch.manual_seed(0)
    model = TinyCNN()
    {slow}
    ext = PretrainedFeatureExtractor(model, preprocess=SMALL, cache={cache!r}, batch_size=2, num_workers=0, precision="fp32",
                                     progress=False).fit()
    np.save(sys.argv[1], ext.transform({files!r}))
""")


def _script(cache_dir, files, slow=""):
    return _WORKER.format(tests=str(Path(__file__).parent), cache=str(cache_dir), files=files, slow=slow)


def test_concurrent_processes_share_one_cache(cache_dir, files, tmp_path):
    torch.manual_seed(0)
    ref = _reference(TinyCNN(), files)
    script = _script(cache_dir, files)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / f"out{i}.npy")], stderr=subprocess.PIPE, text=True) for i in range(3)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    for i in range(3):
        np.testing.assert_array_equal(np.load(tmp_path / f"out{i}.npy"), ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheWarning)
        torch.manual_seed(0)
        ext = _ext(TinyCNN(), cache_dir)
        np.testing.assert_array_equal(ext.transform(files), ref)
    assert ext.last_run_.computed == 0


def _open_and_store(root, barrier, results, i):
    """Child: open the cache at the same moment as a sibling, store 4 rows, report warnings."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        barrier.wait()
        cache = EmbeddingCache.open(root)
        ok = cache is not None and cache.store("ns", [(f"{i}-{j}", "f", np.full(3, j, np.float32)) for j in range(4)])
    results.put((i, bool(ok), [str(w.message) for w in seen]))


def test_processes_opening_a_new_cache_at_once_both_use_it(tmp_path):
    # a fresh database switched to WAL by two processes at once: SQLite answers one of them
    # "database is locked" at once (no busy wait); featx then ran that worker without a cache
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    for round_ in range(16):
        root = tmp_path / f"c{round_}"
        barrier, results = ctx.Barrier(2), ctx.Queue()
        procs = [ctx.Process(target=_open_and_store, args=(root, barrier, results, i)) for i in range(2)]
        for p in procs:
            p.start()
        got = sorted(results.get(timeout=120) for _ in procs)
        for p in procs:
            p.join(timeout=60)
        assert got == [(0, True, []), (1, True, [])], f"round {round_}: {got}"
        with sqlite3.connect(root / DB_NAME) as conn:
            assert conn.execute("SELECT COUNT(DISTINCT item) FROM embeddings").fetchone()[0] == 8


def test_sigkill_mid_transform_then_rerun_resumes(cache_dir, files, tmp_path):
    torch.manual_seed(0)
    ref = _reference(TinyCNN(), files)
    slow = "import time; model.stem.register_forward_hook(lambda *a: time.sleep(0.3))"
    proc = subprocess.Popen([sys.executable, "-c", _script(cache_dir, files, slow), str(tmp_path / "x.npy")])
    db = cache_dir / DB_NAME
    deadline = time.time() + 120
    n = 0
    while time.time() < deadline and proc.poll() is None:
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as conn:
                n = conn.execute("SELECT COUNT(DISTINCT item) FROM embeddings").fetchone()[0]
        except sqlite3.Error:
            n = 0
        if n >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the worker finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheWarning)
        ext = _ext(TinyCNN(), cache_dir)
        out = ext.transform(files)
    assert_same(out, ref)
    assert 2 <= ext.last_run_.cache_hits < len(files)
    assert ext.last_run_.computed == len(files) - ext.last_run_.cache_hits


# ------------------------------------------------------------- management


def test_info_clear_prune(tiny_cnn, cache_dir, files, monkeypatch):
    ticks = iter(range(1_000_000, 2_000_000))  # a clock that moves on at every write: no ties, no sleeps
    monkeypatch.setattr(cache_mod, "_clock", lambda: float(next(ticks)))
    ext = _ext(tiny_cnn, cache_dir)
    ext.transform(files[:5])
    _ext("resnet18", cache_dir, weights=None).transform(files[:5])
    cache = EmbeddingCache.open(cache_dir)
    info = cache.info()
    assert len(info["namespaces"]) == 2 and info["entries"] > 0 and info["size_bytes"] > 0
    models = sorted(n["provenance"]["model"] for n in info["namespaces"])
    assert models == ["module:TinyCNN", "torchvision:resnet18"]
    prov = info["namespaces"][0]["provenance"]
    assert {"torch_full", "featx", "weights_digest", "preprocess", "precision"} <= set(prov)
    # touch the TinyCNN entries: LRU must evict the resnet18 ones first
    ext.transform(files[:5])
    cache._vacuum()  # measure the compacted size (the WAL holds recent writes)
    big = cache.info()["size_bytes"]
    removed = cache.prune(int(big * 0.5))
    after = cache.info()
    assert removed > 0 and after["size_bytes"] <= big * 0.5
    left = {n["provenance"]["model"]: n["entries"] for n in after["namespaces"]}
    assert "torchvision:resnet18" not in left or left["torchvision:resnet18"] < info["namespaces"][1]["entries"]
    cache.clear()
    assert cache.info()["entries"] == 0
    ext.transform(files[:1])
    assert ext.last_run_.computed == 1


@pytest.mark.parametrize("url", ["s3://bucket/prefix", "file:///mnt/nfs/featx", "memory://featx"])
def test_a_url_is_never_taken_for_a_relative_path(url, tmp_path, monkeypatch):
    """A URL selects the shared object store (tests/test_shared_cache.py); fit connects to nothing."""
    pytest.importorskip("s3fs")
    monkeypatch.chdir(tmp_path)
    ext = PretrainedFeatureExtractor(TinyCNN(), preprocess=SMALL, cache=url, progress=False).fit()
    assert ext.cache_dir_ == url
    assert list(tmp_path.iterdir()) == []  # no folder named "s3:" (or anything else) was created


def test_default_cache_dir_is_the_platform_user_cache(monkeypatch):
    import platformdirs

    monkeypatch.delenv("FEATX_CACHE_DIR", raising=False)
    assert default_cache_dir() == Path(platformdirs.user_cache_dir("featx", appauthor=False))
    monkeypatch.setenv("FEATX_CACHE_DIR", "~/elsewhere")
    assert default_cache_dir() == Path("~/elsewhere").expanduser()
