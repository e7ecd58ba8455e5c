"""Nothing hangs, nothing is half-written, names are data (issue: hostile inputs and faulty disks)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from featx import ImageLoadError, OutputError, PretrainedFeatureExtractor
from featx._outputs import path_line, read_path_lines
from featx.cli import main

SMALL = {"input_size": 32, "resize_size": 36}
KW = dict(model="resnet18", weights=None, preprocess=SMALL, device="cpu", progress=False, precision="fp32")
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="POSIX FIFOs and byte file names")


def _photos(folder, n=4, names=None):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i, name in enumerate(names or [f"{i}.jpg" for i in range(n)]):
        p = os.path.join(os.fsdecode(folder), name)
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(p, format="JPEG")
        paths.append(p)
    return paths


def _within(seconds, fn):
    """Run ``fn`` in a thread; fail (instead of hanging the suite) if it has not returned by the deadline."""
    box = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"still running after {seconds} s: it hangs"
    if "error" in box:
        raise box["error"]
    return box["value"]


# ------------------------------------------------------------------ 1. no input can hang a run


@linux_only
@pytest.mark.parametrize("cache", [False, True])
def test_a_fifo_among_the_inputs_is_a_per_item_error_not_a_hang(tmp_path, cache):
    paths = _photos(tmp_path / "d", 2)
    fifo = tmp_path / "d" / "x.jpg"
    os.mkfifo(fifo)  # nobody ever writes to it: a plain open() would wait forever
    items = [paths[0], str(fifo), paths[1]]
    ext = PretrainedFeatureExtractor(**KW, on_error="nan", cache=str(tmp_path / "c") if cache else None).fit()
    with pytest.warns(Warning, match="could not be read"):
        X = _within(120, lambda: ext.transform(items))
    assert ext.failed_indices_.tolist() == [1] and "FIFO" in ext.failed_reasons_[0][1]
    assert np.isnan(X[1]).all() and np.isfinite(X[[0, 2]]).all()
    strict = PretrainedFeatureExtractor(**KW).fit()
    with pytest.raises(ImageLoadError, match=r"x\.jpg.*is a FIFO, not a regular file"):
        _within(120, lambda: strict.transform(items))


@linux_only
def test_cli_extract_of_a_folder_with_a_fifo_finishes(tmp_path, capsys):
    _photos(tmp_path / "d", 3)
    os.mkfifo(tmp_path / "d" / "x.jpg")
    out = tmp_path / "o.csv"
    code = _within(180, lambda: main(["extract", str(tmp_path / "d"), "-o", str(out), "--on-error", "skip",
                                      "--model", "resnet18", "--weights", "none", "--no-progress"]))
    assert code == 0 and "x.jpg: is a FIFO" in capsys.readouterr().err
    assert len(pd.read_csv(out)) == 3


# ------------------------------------------------------------------ 2-5. outputs whole or not at all

_FULL_DISK = textwrap.dedent("""
    import resource, sys
    import numpy as np
    from featx import PretrainedFeatureExtractor
    from featx.cli import main
    what, path, images = sys.argv[1], sys.argv[2], sys.argv[3:]
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))  # a disk with 64 KB free
    if what == "npy":
        ext = PretrainedFeatureExtractor("resnet18", weights=None, preprocess={"input_size": 32, "resize_size": 36},
                                         device="cpu", progress=False, precision="fp32").fit()
        try:
            ext.transform_to_npy(images * 10, path)  # 40 x 512 float32: 80 KB
        except OSError as exc:
            print(type(exc).__name__, exc)
            sys.exit(3)
    else:
        sys.exit(main(["extract", *images, "-o", path, "--model", "resnet18", "--weights", "none", "--no-progress"]))
""")


def _on_a_full_disk(what, path, images):
    return subprocess.run([sys.executable, "-c", _FULL_DISK, what, str(path), *images], capture_output=True,
                          text=True, timeout=300)


def test_transform_to_npy_on_a_full_disk_fails_before_computing_and_leaves_nothing(tmp_path):
    images = _photos(tmp_path / "d", 4)
    out = tmp_path / "o" / "x.npy"
    res = _on_a_full_disk("npy", out, images)
    assert res.returncode == 3, res.stderr[-2000:]  # an error, not SIGBUS (-7)
    assert "OutputError" in res.stdout and "needs 82 KB" in res.stdout and "x.npy" in res.stdout
    assert os.listdir(out.parent) == []  # no full-size file of zero rows, no partial file


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".npz"])
def test_cli_outputs_on_a_full_disk_leave_no_partial_file(tmp_path, suffix):
    images = _photos(tmp_path / "d", 4)
    listing = tmp_path / "list.txt"
    listing.write_text("".join(path_line(p) for p in images * 30))  # 120 rows x 512 features: over 64 KB
    out = tmp_path / "o" / f"x{suffix}"
    res = _on_a_full_disk("cli", out, [str(listing)])
    assert res.returncode == 1 and "no space left to write" in res.stderr, res.stderr[-2000:]
    assert os.listdir(out.parent) == []


def test_a_failed_run_leaves_the_previous_npy_and_no_partial_file(tmp_path):
    images = _photos(tmp_path / "d", 3)
    out = tmp_path / "x.npy"
    np.save(out, np.ones((2, 2), np.float32))
    ext = PretrainedFeatureExtractor(**KW).fit()
    with pytest.raises(ImageLoadError, match="missing.jpg"):
        ext.transform_to_npy([*images, str(tmp_path / "missing.jpg")], out)
    np.testing.assert_array_equal(np.load(out), np.ones((2, 2)))  # untouched: no file with zero rows
    assert sorted(os.listdir(tmp_path)) == ["d", "x.npy"]
    done = ext.transform_to_npy(images, out)
    np.testing.assert_array_equal(done, ext.transform(images))


@pytest.mark.parametrize("suffix", [".npy", ".csv", ".npz"])
def test_an_unwritable_output_fails_before_any_image_is_computed(tmp_path, computed, capsys, suffix):
    images = _photos(tmp_path / "d", 2)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the output's folder should be")
    code = main(["extract", *images[:1], "-o", str(blocker / f"x{suffix}"), "--model", "resnet18", "--weights",
                 "none", "--no-progress"])
    assert code == 1 and "cannot write" in capsys.readouterr().err and computed[0] == 0
    ext = PretrainedFeatureExtractor(**KW).fit()
    with pytest.raises(OutputError, match="cannot write"):
        ext.transform_to_npy(images, blocker / "x.npy")
    assert computed[0] == 0


# ------------------------------------------------------------------ 7-8. names are data


@linux_only
@pytest.mark.parametrize("cache", [False, True])
def test_file_names_that_are_not_utf8_work_with_every_cache(tmp_path, cache):
    odd = os.fsdecode(b"bad\xff.jpg")  # a valid POSIX name, not UTF-8
    images = _photos(tmp_path / "d", names=[odd, "good.jpg"])
    ext = PretrainedFeatureExtractor(**KW, on_error="nan", cache=str(tmp_path / "c") if cache else None).fit()
    X = ext.transform(images)
    assert ext.failed_indices_.tolist() == []
    np.testing.assert_array_equal(X, PretrainedFeatureExtractor(**KW).fit().transform(images))
    if cache:
        assert ext.transform(images) is not None and ext.last_run_.cache_hits == 2


@linux_only
def test_cli_writes_odd_names_in_every_format_and_the_listing_maps_rows_to_names(tmp_path):
    names = [os.fsdecode(b"bad\xff.jpg"), "two\nlines.jpg", '"quoted".jpg', "plain.jpg"]
    images = _photos(tmp_path / "d", names=names)
    wanted = sorted(images)
    base = ["--model", "resnet18", "--weights", "none", "--no-progress"]
    assert main(["extract", str(tmp_path / "d"), "-o", str(tmp_path / "x.npy"), *base]) == 0
    listing = (tmp_path / "x.paths.txt").read_text(encoding="utf-8")
    got = read_path_lines(listing)
    assert len(got) == len(np.load(tmp_path / "x.npy")) == 4 and sorted(got) == wanted
    assert os.path.join(str(tmp_path / "d"), "plain.jpg") + "\n" in listing  # plain names stay verbatim
    # the listing is an input too: the same rows again
    assert main(["extract", str(tmp_path / "x.paths.txt"), "-o", str(tmp_path / "y.npy"), *base]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), np.load(tmp_path / "x.npy"))
    for suffix in (".csv", ".parquet", ".npz"):
        assert main(["extract", str(tmp_path / "x.paths.txt"), "-o", str(tmp_path / f"x{suffix}"), *base]) == 0
    csv = pd.read_csv(tmp_path / "x.csv", encoding_errors="surrogateescape", dtype={"path": object})
    parquet = pd.read_parquet(tmp_path / "x.parquet")
    npz = np.load(tmp_path / "x.npz")
    assert csv["path"].tolist() == got and npz["paths"].tolist() == got
    assert [os.fsdecode(p) for p in parquet["path"]] == got  # bytes: the names' own


def test_path_listing_round_trips_any_name():
    names = ["a.jpg", "with space.jpg", "new\nline.jpg", "cr\r.jpg", '"q".jpg', os.fsdecode(b"\xfe\xff.png"),
             "C:\\photos\\x.jpg", "ünï.jpg"]
    text = "".join(path_line(n) for n in names)
    assert text.count("\n") == len(names) and read_path_lines(text) == names
    assert read_path_lines("a.jpg\r\nb.jpg\r\n") == ["a.jpg", "b.jpg"]  # a plain list written on Windows


# ------------------------------------------------------------------ 10. the cache tells the truth

_FULL_CACHE = textwrap.dedent("""
    import resource, sys
    from featx.cli import main
    resource.setrlimit(resource.RLIMIT_FSIZE, (1024, resource.RLIM_INFINITY))  # no file may grow: a full disk
    sys.exit(main(["cache", *sys.argv[1:]]))
""")


@pytest.mark.parametrize("action", [["clear"], ["prune", "--max-size", "1K"]])
def test_prune_and_clear_on_a_full_disk_fail_and_say_so(tmp_path, action):
    cache = tmp_path / "c"
    images = _photos(tmp_path / "d", 4)
    PretrainedFeatureExtractor(**KW, cache=str(cache)).fit().transform(images)
    res = subprocess.run([sys.executable, "-c", _FULL_CACHE, *action, "--cache-dir", str(cache)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 1 and "cannot be written" in res.stderr, (res.stdout, res.stderr[-2000:])
    assert "removed" not in res.stdout and "evicted" not in res.stdout
    again = PretrainedFeatureExtractor(**KW, cache=str(cache)).fit()
    again.transform(images)
    assert again.last_run_.cache_hits == 4  # nothing was removed, as it said


# ------------------------------------------------------------------ 11. a read-only cache is read

_READ_ONLY_CHILD = textwrap.dedent("""
    import os, sqlite3, sys, warnings
    from featx import PretrainedFeatureExtractor
    from featx.cli import main
    import featx._cache.sqlite, featx._cache.objects, featx._runtime.engines, featx._runtime.compiled
    import featx.evaluate  # the CLI's parser imports it: before this process may no longer read the checkout
    cache, images = sys.argv[1], sys.argv[2:]
    PretrainedFeatureExtractor("resnet18", weights=None, preprocess={"input_size": 32, "resize_size": 36},
                               device="cpu", progress=False, precision="fp32").fit().transform(images)  # imports
    if os.geteuid() == 0:  # root ignores permissions: become nobody (the interpreter lives in root's home,
        os.setgid(65534)   # so everything it needs is imported above)
        os.setuid(65534)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ext = PretrainedFeatureExtractor("resnet18", weights=None, preprocess={"input_size": 32, "resize_size": 36},
                                         device="cpu", progress=False, precision="fp32", cache=cache).fit()
        ext.transform(images + images[:1])
    print("hits", ext.last_run_.cache_hits, "computed", ext.last_run_.computed)
    print("warnings", [str(w.message)[:80] for w in caught if "read-only" in str(w.message)])
    sys.exit(main(["cache", "info", "--cache-dir", cache]))
""")


@linux_only
def test_a_read_only_cache_is_read_not_ignored(tmp_path_factory):
    import tempfile

    root = tempfile.mkdtemp(prefix="featx-ro-")  # a folder anyone may enter (pytest's own is private to its user)
    os.chmod(root, 0o755)
    try:
        images = _photos(Path(root) / "d", 3)
        cache = os.path.join(root, "cache")
        PretrainedFeatureExtractor(**KW, cache=cache).fit().transform(images[:2])
        from featx._cache.sqlite import EmbeddingCache

        for c in list(EmbeddingCache._registry.values()):
            c.close()  # checkpoint the WAL into the file, as a finished job leaves it
        for name in os.listdir(cache):
            os.chmod(os.path.join(cache, name), 0o444)
        os.chmod(cache, 0o555)
        res = subprocess.run([sys.executable, "-c", _READ_ONLY_CHILD, cache, *images], capture_output=True,
                             text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        assert "hits 3 computed 1" in res.stdout  # the two cached images served (one twice), the new one computed
        assert "is read-only" in res.stdout and "no featx cache" not in res.stdout
        assert "images=2" in res.stdout and "(SQLite database, read-only)" in res.stdout  # `featx cache info`
    finally:
        for dirpath, dirnames, _ in os.walk(root):
            for d in dirnames:
                os.chmod(os.path.join(dirpath, d), 0o755)
        import shutil

        shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------------ 12. memory bounded whatever the hits


def test_cached_rows_are_looked_up_and_written_a_chunk_at_a_time(tmp_path, monkeypatch):
    from featx._cache.sqlite import EmbeddingCache
    from featx._runtime import runner

    images = _photos(tmp_path / "d", 5)
    items = images * 2 + [images[0]]  # duplicates across chunks too
    ext = PretrainedFeatureExtractor(**KW, cache=str(tmp_path / "c")).fit()
    want = ext.transform(images)
    sizes, real = [], EmbeddingCache.lookup
    monkeypatch.setattr(EmbeddingCache, "lookup", lambda self, ns, keys, widths: sizes.append(len(keys)) or
                        real(self, ns, keys, widths))
    monkeypatch.setattr(runner, "LOOKUP_CHUNK", 3)
    got = ext.transform_to_npy(items, tmp_path / "x.npy")
    assert max(sizes) <= 3 and len(sizes) == 4  # never all the hits at once
    np.testing.assert_array_equal(got, want[[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0]])
    assert ext.last_run_.cache_hits == 11 and ext.last_run_.computed == 0


# ------------------------------------------------------------------ 13. each image computed once across processes

_WORKER = textwrap.dedent("""
    import json, os, sys, time
    import numpy as np
    from featx import PretrainedFeatureExtractor
    cache, go, out, images = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
    ext = PretrainedFeatureExtractor("resnet18", weights=None, preprocess={"input_size": 32, "resize_size": 36},
                                     device="cpu", progress=False, precision="fp32", cache=cache, batch_size=4).fit()
    while not os.path.exists(go):  # both workers start their transform together
        time.sleep(0.01)
    X = ext.transform(images)
    np.save(out, X)
    print(json.dumps({"computed": ext.last_run_.computed, "hits": ext.last_run_.cache_hits}))
""")


def test_two_processes_sharing_a_cache_compute_each_image_once(tmp_path):
    images = _photos(tmp_path / "d", 40)
    cache, go = tmp_path / "cache", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(cache), str(go), str(tmp_path / f"{k}.npy"),
                               *images], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in range(2)]
    import time

    time.sleep(3)  # let both import and fit; the file is their common start
    go.write_text("")
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
        results.append(__import__("json").loads(out.strip().splitlines()[-1]))
    assert sum(r["computed"] for r in results) == 40  # no image computed by both
    assert all(r["computed"] + r["hits"] == 40 for r in results)
    np.testing.assert_array_equal(np.load(tmp_path / "0.npy"), np.load(tmp_path / "1.npy"))
    np.testing.assert_array_equal(np.load(tmp_path / "0.npy"), PretrainedFeatureExtractor(**KW).fit().transform(images))


def test_an_image_claimed_by_a_live_process_is_awaited_and_a_dead_ones_claim_is_void(tmp_path, computed):
    import socket
    import time

    from featx._cache.sqlite import EmbeddingCache

    images = _photos(tmp_path / "d", 3)
    cache_dir = tmp_path / "cache"
    ext = PretrainedFeatureExtractor(**KW, cache=str(cache_dir)).fit()
    want = PretrainedFeatureExtractor(**KW).fit().transform(images)
    store = EmbeddingCache.open(cache_dir)
    ns = ext._settled.namespace[0]
    store.register_namespace(*ext._settled.namespace)
    keys = store.path_keys(images)
    live, dead = f"{socket.gethostname()}:{os.getppid()}", f"{socket.gethostname()}:{2**22 + 12345}"
    store._write(lambda c: c.executemany("INSERT INTO claims VALUES (?,?,?,?)", [
        (ns, keys[0], live, time.time() + 600), (ns, keys[1], dead, time.time() + 600)]))
    computed[0] = 0  # from here on
    result = {}
    worker = threading.Thread(target=lambda: result.setdefault("X", ext.transform(images)), daemon=True)
    worker.start()
    deadline = time.monotonic() + 120
    while computed[0] < 2 and time.monotonic() < deadline:  # images 1 (dead owner's) and 2 are computed...
        time.sleep(0.05)
    time.sleep(0.5)
    assert worker.is_alive() and computed[0] == 2  # ...and image 0 is awaited, not computed
    # the live owner finishes: its row is stored and its claim released
    row = want[0]
    store.store(ns, [(keys[0], ext._runner.plan.out_fields[0], row)])
    store._write(lambda c: c.execute("DELETE FROM claims WHERE owner=?", (live,)))
    worker.join(60)
    assert not worker.is_alive() and computed[0] == 2
    np.testing.assert_array_equal(result["X"], want)
    assert ext.last_run_.cache_hits == 1 and ext.last_run_.computed == 2


# ------------------------------------------------------------------ 16. a decode budget in pixels


def test_images_over_the_pixel_budget_are_drafted_or_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("FEATX_MAX_PIXELS", "4000000")
    rng = np.random.default_rng(0)
    big = rng.integers(0, 256, (2400, 2400, 3), dtype=np.uint8)  # 5.8 MP
    png, jpg = tmp_path / "big.png", tmp_path / "big.jpg"
    Image.fromarray(big).save(png)
    Image.fromarray(big).save(jpg, quality=80)
    ext = PretrainedFeatureExtractor(**KW).fit()
    with pytest.raises(ImageLoadError, match=r"2400 x 2400 pixels \(PNG cannot be decoded at a reduced size\) is "
                                             r"over FEATX_MAX_PIXELS=4000000"):
        ext.transform([str(png)])
    assert np.isfinite(ext.transform([str(jpg)])).all()  # a JPEG is decoded at a reduced DCT scale instead


# ------------------------------------------------------------------ 3. a killed run leaves nothing that looks whole

_KILLED = textwrap.dedent("""
    import sys
    from featx import PretrainedFeatureExtractor
    ext = PretrainedFeatureExtractor("resnet18", weights=None, preprocess={"input_size": 32, "resize_size": 36},
                                     device="cpu", progress=False, precision="fp32", batch_size=2).fit()
    ext.transform_to_npy(sys.argv[2:] * 200, sys.argv[1])
""")


def test_a_run_killed_while_writing_leaves_no_file_that_looks_complete(tmp_path):
    import signal
    import time

    images = _photos(tmp_path / "d", 4)
    out = tmp_path / "o" / "x.npy"
    p = subprocess.Popen([sys.executable, "-c", _KILLED, str(out), *images], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not list(out.parent.glob(".x.npy.*.partial.npy")) if out.parent.exists() else True:
        assert p.poll() is None and time.monotonic() < deadline, p.stderr.read()[-2000:] if p.stderr else ""
        time.sleep(0.05)
    time.sleep(0.5)  # rows are being written
    p.send_signal(signal.SIGKILL)
    p.wait(60)
    assert not out.exists()  # no full-size file with zero rows where images were not done
    assert [f.name.startswith(".x.npy.") and f.name.endswith(".partial.npy") for f in out.parent.iterdir()] == [True]
