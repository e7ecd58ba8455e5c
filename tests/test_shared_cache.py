"""The shared object-store cache against a real S3 server (moto's, on the loopback address), and on a file system.

Each S3 test talks to a ``moto`` server process started by the test itself:
many processes writing at once, a worker killed mid-write, the server stopped
mid-job, a read-only bucket, a truncated object, a store that does not answer.
Every test checks the features against an uncached run (fp32: exactly).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
import uuid
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from featx import CacheWarning, PretrainedFeatureExtractor
from featx._cache.objects import SharedCache, check_url, pack, unpack

from .conftest import SMALL, TinyCNN  # noqa: E402
from .s3server import KEYS, MotoServer  # noqa: E402



def _needs_s3() -> None:
    pytest.importorskip("s3fs")  # only the tests against a real S3 server need them
    pytest.importorskip("moto")


@pytest.fixture(scope="module")
def server():
    _needs_s3()
    srv = MotoServer()
    yield srv
    srv.stop()


@pytest.fixture(autouse=True)
def _aws_env(monkeypatch):
    for k, v in KEYS.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("FEATX_CACHE_READ_THROUGH", raising=False)
    SharedCache._registry.clear()
    yield
    SharedCache._registry.clear()


def _use(monkeypatch, endpoint: str) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    SharedCache._registry.clear()


def _fresh_machine(monkeypatch, tmp_path) -> None:
    """As if on another machine: an empty local cache, no handles open."""
    monkeypatch.setenv("FEATX_CACHE_DIR", str(tmp_path / f"local-{uuid.uuid4().hex[:8]}"))
    SharedCache._registry.clear()


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (30 + i % 7, 34 + i % 5, 3), dtype=np.uint8) for i in range(24)]


def _ext(cache=None, **kw) -> PretrainedFeatureExtractor:
    torch.manual_seed(0)
    return PretrainedFeatureExtractor(TinyCNN(), preprocess=SMALL, cache=cache, batch_size=4, num_workers=0,
                                      precision="fp32", progress=False, **kw).fit()


@pytest.fixture(scope="module")
def reference(images):
    return _ext().transform(images)


def _objects(server: MotoServer, bucket: str) -> dict[str, bytes]:
    fs = server.fs()
    paths = [p for p in fs.find(bucket) if not p.endswith("namespace.json")]
    return fs.cat(paths) if paths else {}


def _check_store(server: MotoServer, bucket: str, ext: PretrainedFeatureExtractor, images, reference,
                 others: bool = False) -> int:
    """Every object in the bucket is intact and holds exactly the uncached features of its image; the count
    of ``images``' objects. ``others``: objects of other images may be there too (checked intact)."""
    from featx._cache.sqlite import content_key

    ns = ext._settled.namespace[0]
    widths = ext._runner.plan.widths
    fields = {f: widths[f] for f in ext._runner.plan.out_fields}
    by_key = {content_key(im): i for i, im in enumerate(images)}
    objects, mine = _objects(server, bucket), 0
    for path, blob in objects.items():
        item = path.split("/")[-2].replace("-", ":", 1)
        vectors = unpack(blob, ns, item, fields)
        assert vectors is not None, f"corrupt object {path}"
        if item not in by_key and others:
            continue
        np.testing.assert_array_equal(np.concatenate([vectors[f] for f in ext._runner.plan.out_fields]),
                                      reference[by_key[item]])
        mine += 1
    return mine


# ------------------------------------------------------------------ format


def test_objects_carry_their_identity_and_a_checksum():
    vecs = {"output:stage2|avg": np.arange(5, dtype=np.float32), "output:stem|max": np.ones(3, np.float32)}
    blob = pack("ns1", "a:00ff", vecs)
    widths = {"output:stage2|avg": 5, "output:stem|max": 3}
    got = unpack(blob, "ns1", "a:00ff", widths)
    assert got.keys() == vecs.keys() and all(np.array_equal(got[k], vecs[k]) for k in vecs)
    assert unpack(blob[:-9] + blob[-8:], "ns1", "a:00ff", widths) is None  # truncated
    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 1
    assert unpack(bytes(flipped), "ns1", "a:00ff", widths) is None  # one bit changed
    assert unpack(blob, "ns2", "a:00ff", widths) is None  # another namespace's object
    assert unpack(blob, "ns1", "a:00fe", widths) is None  # another image's
    assert unpack(blob, "ns1", "a:00ff", {"output:stage2|avg": 5}) is None  # another set of fields
    assert unpack(b"", "ns1", "a:00ff", widths) is None


@pytest.mark.parametrize("url, match", [
    ("foo://bucket/prefix", "knows no storage scheme 'foo'"),
    ("gs://bucket/prefix", "needs the 'gs' storage driver.*gcsfs"),
])
def test_a_url_fsspec_cannot_open_is_a_clear_error(url, match, tmp_path, monkeypatch):
    pytest.importorskip("fsspec")
    if url.startswith("gs"):
        try:
            import gcsfs  # noqa: F401
            pytest.skip("gcsfs is installed here")
        except ImportError:
            pass
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=match):
        _ext(cache=url)
    assert list(tmp_path.iterdir()) == []  # never a folder named "foo:" or "gs:"


def test_missing_s3_driver_names_the_extra(monkeypatch):
    import importlib

    monkeypatch.setitem(sys.modules, "s3fs", None)  # as if not installed: importing it fails
    registry = importlib.import_module("fsspec.registry")._registry  # drivers imported so far
    for name in ("s3", "s3a"):
        monkeypatch.delitem(registry, name, raising=False)
    with pytest.raises(ValueError, match=r"needs the 's3' storage driver.*pip install 'featx\[s3\]' \(s3fs"):
        check_url("s3://bucket/prefix")


def test_file_url_store_is_shared_and_exact(tmp_path, monkeypatch, images, reference, computed):
    """``file://`` (a network file system mounted locally): the object store, not SQLite."""
    url = (tmp_path / "nfs").as_uri()
    first = _ext(cache=url).transform(images)
    np.testing.assert_array_equal(first, reference)
    assert not list((tmp_path / "nfs").rglob("*.sqlite"))
    assert computed[0] == len(images)
    _fresh_machine(monkeypatch, tmp_path)
    ext = _ext(cache=url)
    np.testing.assert_array_equal(ext.transform(images), reference)
    assert ext.last_run_.computed == 0 and computed[0] == len(images)
    assert not [p for p in (tmp_path / "nfs").rglob("*") if ".tmp-" in p.name]  # no temporary left behind


# -------------------------------------------------------------------- S3


def test_s3_cache_is_shared_between_machines_and_read_through_locally(server, tmp_path, monkeypatch, images,
                                                                      reference):
    _use(monkeypatch, server.endpoint)
    url = f"s3://{server.bucket()}/team/featx"
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheWarning)
        ext = _ext(cache=url)
        np.testing.assert_array_equal(ext.transform(images), reference)
        assert ext.last_run_.computed == len(images)
        store = SharedCache.open(url).store_
        assert store.requests["put"] == len(images) + 1  # one object per image, and the namespace record
        # the same machine again: the local layer answers, the store is not asked
        gets = store.requests["get"]
        np.testing.assert_array_equal(ext.transform(images), reference)
        assert ext.last_run_.cache_hits == len(images) and store.requests["get"] == gets
        # another machine (an empty local cache): every embedding comes from the store
        _fresh_machine(monkeypatch, tmp_path)
        other = _ext(cache=url)
        np.testing.assert_array_equal(other.transform(images), reference)
        assert other.last_run_.computed == 0
        assert SharedCache.open(url).store_.requests == {"get": len(images), "put": 1, "list": 0, "delete": 0}
    assert _check_store(server, url.split("/")[2], ext, images, reference) == len(images)


_CONCURRENT = textwrap.dedent("""
    import os, sys, time, numpy as np, torch
    sys.path.insert(0, {tests!r})
    from conftest import TinyCNN, SMALL
    from featx import PretrainedFeatureExtractor
    images = list(np.load({images!r}))
    order = [int(i) for i in sys.argv[2].split(",")]
    cache = sys.argv[3] if sys.argv[3] != "none" else None
    torch.set_num_threads(1)  # one kernel schedule everywhere, so "exact" is meaningful across processes
    torch.manual_seed(0)
    ext = PretrainedFeatureExtractor(TinyCNN(), preprocess=SMALL, cache=cache, batch_size=2, num_workers=0,
                                     precision="fp32", progress=False).fit()
    open(os.path.join({ready!r}, str(os.getpid())), "w").close()  # fitted: ready to start
    while not os.path.exists({go!r}):  # start together
        time.sleep(0.01)
    np.save(sys.argv[1], ext.transform([images[i] for i in order]))
""")


def test_many_processes_write_overlapping_images_at_once(server, tmp_path, monkeypatch, images, reference):
    """6 processes, each on 12 of 24 images (every image wanted by 3), all starting at once: no corrupt or
    missing object, every process's features equal the uncached ones exactly."""
    _use(monkeypatch, server.endpoint)
    bucket = server.bucket()
    url = f"s3://{bucket}/shared"
    np.save(tmp_path / "images.npy", np.stack([np.resize(im, (36, 38, 3)) for im in images]))
    same_size = list(np.load(tmp_path / "images.npy"))
    go = tmp_path / "go"
    go.touch()
    ready = tmp_path / "ready"
    ready.mkdir()
    script = _CONCURRENT.format(tests=str(Path(__file__).parent), images=str(tmp_path / "images.npy"), go=str(go),
                                ready=str(ready))
    # the uncached run: the same script, every image, no cache
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "ref.npy"), ",".join(map(str, range(len(images)))),
                    "none"], check=True, timeout=300)
    ref = np.load(tmp_path / "ref.npy")
    go.unlink()
    for f in ready.iterdir():
        f.unlink()
    procs, orders = [], []
    for i in range(6):
        order = [(4 * i + j) % len(images) for j in range(12)]
        random.Random(i).shuffle(order)
        orders.append(order)
        env = dict(os.environ, FEATX_CACHE_DIR=str(tmp_path / f"local{i}"))
        procs.append(subprocess.Popen([sys.executable, "-c", script, str(tmp_path / f"out{i}.npy"),
                                       ",".join(map(str, order)), url], env=env, stderr=subprocess.PIPE, text=True))
    deadline = time.monotonic() + 300
    while len(list(ready.iterdir())) < len(procs):  # every process fitted and waiting: then all start at once
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "a writer died before starting"
        time.sleep(0.05)
    go.touch()
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        assert "CacheWarning" not in err, err[-3000:]
    for i, order in enumerate(orders):
        np.testing.assert_array_equal(np.load(tmp_path / f"out{i}.npy"), ref[order])
    assert _check_store(server, bucket, _ext(cache=url), same_size, ref) == len(images)  # none missing, none extra


def _killable_child(url, images, k, writing, local_dir, stall=False):
    """Embed new content into the S3 cache; ``writing`` is 1 exactly while objects are being published.

    With ``stall``, the first publication of vectors stops half-way (half its
    objects written) until the child is killed: that kill lands mid-write for certain.
    """
    from featx._cache.objects import ObjectStore

    os.environ["FEATX_CACHE_DIR"] = local_dir
    torch.set_num_threads(1)  # a forked child must not enter the parent's OpenMP pool (it hangs there)
    real_put = ObjectStore.put

    def flagged_put(self, objects, **kw):
        writing.value = 1
        if stall and any(not p.endswith("namespace.json") for p in objects):
            half = dict(list(objects.items())[: len(objects) // 2])
            if half:
                real_put(self, half, **kw)
            time.sleep(600)  # the rest is never written: killed here
        try:
            return real_put(self, objects, **kw)
        finally:
            writing.value = 0

    ObjectStore.put = flagged_put
    _ext(cache=url).transform(_variant(images, k))
    os._exit(0)


def _variant(images, k):
    out = [im.copy() for im in images]
    for im in out:
        im[0, 0, 0] = (int(im[0, 0, 0]) + k + 1) % 256
    return out


def test_a_worker_killed_mid_write_leaves_no_partial_object(server, tmp_path, monkeypatch, images):
    _use(monkeypatch, server.endpoint)
    bucket = server.bucket()
    url = f"s3://{bucket}/killed"
    ctx = mp.get_context("fork")
    rng = random.Random(0)
    killed_mid_write = 0
    for k in range(8):
        writing = ctx.Value("i", 0, lock=False)
        stall = k % 2 == 0  # every other kill lands mid-publication for certain; the rest anywhere near one
        proc = ctx.Process(target=_killable_child, args=(url, images, k, writing, str(tmp_path / f"child{k}"), stall))
        proc.start()
        deadline = time.monotonic() + 60
        while writing.value == 0 and proc.is_alive() and time.monotonic() < deadline:
            time.sleep(0.0005)
        assert writing.value == 1 or not stall, "a stalled child never began to publish"
        time.sleep(rng.uniform(0.0, 0.003))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        if proc.exitcode == -signal.SIGKILL and writing.value == 1:
            killed_mid_write += 1
        # whatever the child published is whole and right; the rest is computed
        X = _variant(images, k)
        ref = _ext().transform(X)
        _fresh_machine(monkeypatch, tmp_path)
        with warnings.catch_warnings():
            warnings.simplefilter("error", CacheWarning)
            ext = _ext(cache=url)
            np.testing.assert_array_equal(ext.transform(X), ref)
        assert _check_store(server, bucket, ext, X, ref, others=True) == len(images)
    assert killed_mid_write >= 4  # the four stalled children at least


def test_server_stopped_mid_job_warns_and_computes(tmp_path, monkeypatch, images, reference):
    _needs_s3()
    srv = MotoServer()
    try:
        _use(monkeypatch, srv.endpoint)
        url = f"s3://{srv.bucket()}/p"
        from featx._cache.objects import ObjectStore

        real_put, calls = ObjectStore.put, [0]

        def put_then_crash(self, objects, **kw):
            calls[0] += 1
            out = real_put(self, objects, **kw)
            if calls[0] == 3:  # the namespace record and two batches are in: the server dies
                srv.stop()
            return out

        monkeypatch.setattr(ObjectStore, "put", put_then_crash)
        with pytest.warns(CacheWarning, match="writing failed") as record:
            ext = _ext(cache=url)
            out = ext.transform(images)
        np.testing.assert_array_equal(out, reference)
        assert ext.last_run_.computed == len(images)
        assert len([w for w in record if issubclass(w.category, CacheWarning)]) == 1  # then left alone
        # and a job that starts with the server down: one warning, correct features
        _fresh_machine(monkeypatch, tmp_path)
        with pytest.warns(CacheWarning, match="failed .*EndpointConnectionError.*not asked again"):
            np.testing.assert_array_equal(_ext(cache=url).transform(images), reference)
    finally:
        srv.stop()


def test_a_store_that_does_not_answer_costs_one_timeout(tmp_path, monkeypatch, images, reference):
    """A black hole (accepts connections, never replies): the read times out once, with a warning."""
    _needs_s3()
    import fsspec
    import threading

    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(64)
    conns = []
    stop = threading.Event()

    def accept():
        hole.settimeout(0.2)
        while not stop.is_set():
            try:
                conns.append(hole.accept()[0])
            except OSError:
                pass

    threading.Thread(target=accept, daemon=True).start()
    try:
        _use(monkeypatch, f"http://127.0.0.1:{hole.getsockname()[1]}")
        # the user's fsspec configuration wins over featx's default timeouts
        monkeypatch.setitem(fsspec.config.conf, "s3", {"config_kwargs": {
            "connect_timeout": 1, "read_timeout": 1, "retries": {"max_attempts": 1}}})
        monkeypatch.setenv("FEATX_CACHE_TIMEOUT", "3")  # featx's bound on a call, retries included
        from featx._cache.objects import ObjectStore

        calls = []
        for name in ("get", "put"):
            real = getattr(ObjectStore, name)
            monkeypatch.setattr(ObjectStore, name, lambda self, *a, _real=real, _n=name, **k: calls.append(_n) or
                                _real(self, *a, **k))
        with pytest.warns(CacheWarning, match="failed .*not asked again") as record:
            ext = _ext(cache="s3://slow-bucket/p")
            out = ext.transform(images)
        np.testing.assert_array_equal(out, reference)
        assert len([w for w in record if issubclass(w.category, CacheWarning)]) == 1
        assert len(calls) == 1  # one bounded wait, then the store is not asked again in the run
    finally:
        stop.set()
        for c in conns:
            c.close()
        hole.close()


def test_read_only_bucket_is_read_and_not_written(tmp_path, monkeypatch, images, reference):
    _needs_s3()
    import boto3

    srv = MotoServer()
    try:
        _use(monkeypatch, srv.endpoint)
        bucket = srv.bucket()
        url = f"s3://{bucket}/ro"
        half = len(images) // 2
        _ext(cache=url).transform(images[:half])  # written while the bucket was writable
        iam = boto3.client("iam", endpoint_url=srv.endpoint)
        iam.create_user(UserName="reader")
        iam.put_user_policy(UserName="reader", PolicyName="read-only", PolicyDocument=json.dumps({
            "Version": "2012-10-17",
            # reading actions only, by wildcard (AWS's AmazonS3ReadOnlyAccess is Get* and List*): moto 5.2 checks
            # ListObjectsV2 as s3:ListObjectsV2 and HeadObject as s3:HeadObject, which AWS's own names do not match
            "Statement": [{"Effect": "Allow", "Action": ["s3:Get*", "s3:List*", "s3:Head*"], "Resource": "*"}]}))
        key = iam.create_access_key(UserName="reader")["AccessKey"]
        urllib.request.urlopen(urllib.request.Request(srv.endpoint + "/moto-api/reset-auth", data=b"0",
                                                      method="POST", headers={"Content-Type": "text/plain"}))
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        _fresh_machine(monkeypatch, tmp_path)
        with pytest.warns(CacheWarning, match="refuses writes") as record:
            ext = _ext(cache=url)
            out = ext.transform(images)
        np.testing.assert_array_equal(out, reference)
        assert ext.last_run_.cache_hits == half and ext.last_run_.computed == len(images) - half
        assert len([w for w in record if issubclass(w.category, CacheWarning)]) == 1
    finally:
        srv.stop()


def test_a_truncated_object_is_recomputed_and_replaced(server, tmp_path, monkeypatch, images, reference):
    _use(monkeypatch, server.endpoint)
    bucket = server.bucket()
    url = f"s3://{bucket}/t"
    ext = _ext(cache=url)
    ext.transform(images)
    fs = server.fs()
    victim = sorted(_objects(server, bucket))[0]
    fs.pipe_file(victim, fs.cat_file(victim)[:40])  # cut short, as by a faulty proxy
    _fresh_machine(monkeypatch, tmp_path)
    with pytest.warns(CacheWarning, match="1 corrupt, truncated, non-finite or unsigned object"):
        again = _ext(cache=url)
        out = again.transform(images)
    np.testing.assert_array_equal(out, reference)
    assert again.last_run_.computed == 1
    assert _check_store(server, bucket, ext, images, reference) == len(images)  # replaced by a whole one


def test_cache_command_manages_an_s3_store(server, monkeypatch, images, capsys):
    from featx.cli import main

    _use(monkeypatch, server.endpoint)
    bucket = server.bucket()
    url = f"s3://{bucket}/cli"
    _ext(cache=url).transform(images)
    assert main(["cache", "info", "--cache-dir", url]) == 0
    out = capsys.readouterr().out
    assert f"entries    {len(images)} in 1 namespace(s)\n" in out and "(shared object store)" in out and "module:TinyCNN" in out and f"images={len(images)}" in out
    size = SharedCache(url, None).info()["size_bytes"]
    assert main(["cache", "prune", "--cache-dir", url, "--max-size", str(size // 2)]) == 0
    assert "oldest entries" in capsys.readouterr().out
    left = SharedCache(url, None).info()
    assert 0 < left["entries"] < len(images) and left["size_bytes"] <= size // 2
    assert main(["cache", "clear", "--cache-dir", url]) == 0
    assert server.fs().find(bucket) == []


def test_a_store_frozen_mid_run_costs_one_timeout_not_one_per_batch(tmp_path, monkeypatch, images, reference):
    """SIGSTOP the real server once the run has read: the first write times out, the rest are not attempted."""
    _needs_s3()
    import signal

    srv = MotoServer()
    try:
        _use(monkeypatch, srv.endpoint)
        monkeypatch.setenv("FEATX_CACHE_TIMEOUT", "2")
        url = f"s3://{srv.bucket()}/p"
        from featx._cache.objects import ObjectStore

        real_get, real_put, puts = ObjectStore.get, ObjectStore.put, []

        def get_then_freeze(self, paths):
            out = real_get(self, paths)
            srv.proc.send_signal(signal.SIGSTOP)  # the server stops answering, connections stay open
            return out

        def counted_put(self, objects, **kw):
            puts.append(len(objects))
            return real_put(self, objects, **kw)

        monkeypatch.setattr(ObjectStore, "get", get_then_freeze)
        monkeypatch.setattr(ObjectStore, "put", counted_put)
        with pytest.warns(CacheWarning, match="writing .*failed") as record:
            ext = _ext(cache=url)  # 24 images in batches of 4: six batches to publish
            out = ext.transform(images)
        np.testing.assert_array_equal(out, reference)
        assert len([w for w in record if issubclass(w.category, CacheWarning)]) == 1
        # the first write after the freeze times out and nothing more is attempted: that is the first batch's
        # (after the namespace record) or, where the record is written after the lookup, the record itself
        assert len(puts) in (1, 2), puts
    finally:
        srv.proc.send_signal(signal.SIGCONT)
        srv.stop()


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_valid_object_holding_non_finite_features_is_never_served(server, tmp_path, monkeypatch, images, reference,
                                                                    bad):
    from featx._cache.objects import pack

    _use(monkeypatch, server.endpoint)
    bucket = server.bucket()
    url = f"s3://{bucket}/nan"
    ext = _ext(cache=url)
    ext.transform(images)
    fs = server.fs()
    victim = sorted(_objects(server, bucket))[0]
    ns = ext._settled.namespace[0]
    item = victim.split("/")[-2].replace("-", ":", 1)
    field = ext._runner.plan.out_fields[0]
    poisoned = np.full(ext._runner.plan.widths[field], bad, np.float32)
    fs.pipe_file(victim, pack(ns, item, {field: poisoned}))  # checksummed and well-formed, but not a feature
    _fresh_machine(monkeypatch, tmp_path)
    with pytest.warns(CacheWarning, match="1 corrupt, truncated, non-finite or unsigned object"):
        again = _ext(cache=url)
        out = again.transform(images)
    np.testing.assert_array_equal(out, reference)
    assert again.last_run_.computed == 1 and again.failed_indices_.tolist() == []
    assert _check_store(server, bucket, ext, images, reference) == len(images)  # replaced by the real features


def test_a_loaded_extractor_does_not_use_its_shared_store_until_confirmed(tmp_path, monkeypatch, images, reference):
    import pickle

    store = tmp_path / "store"
    url = store.as_uri()
    blob = pickle.dumps(_ext(cache=url))  # saved by someone else, pointing at their store
    assert not store.exists() or not any(store.rglob("*"))
    with pytest.warns(CacheWarning, match=rf"saved with cache='{re.escape(url)}'.*FEATX_TRUSTED_CACHES"):
        loaded = pickle.loads(blob)
    np.testing.assert_array_equal(loaded.transform(images), reference)
    assert not store.exists() or not any(p.is_file() for p in store.rglob("*"))  # nothing read or written there
    monkeypatch.setenv("FEATX_TRUSTED_CACHES", url)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheWarning)
        trusted = pickle.loads(blob)
    np.testing.assert_array_equal(trusted.transform(images), reference)
    assert any(p.is_file() for p in store.rglob("*"))  # confirmed: it is the store again


def test_with_a_key_only_signed_objects_are_read(tmp_path, monkeypatch, images, reference):
    """FEATX_CACHE_KEY: someone who can write to the bucket, but lacks the key, cannot choose the features."""
    from featx._cache.objects import pack, unpack

    url = (tmp_path / "bucket").as_uri()
    monkeypatch.setenv("FEATX_CACHE_KEY", "team secret")
    writer = _ext(cache=url)
    writer.transform(images)
    ns = writer._settled.namespace[0]
    field = writer._runner.plan.out_fields[0]
    width = writer._runner.plan.widths[field]
    objects = sorted(p for p in (tmp_path / "bucket").rglob("*") if p.is_file() and p.name != "namespace.json")
    assert objects and all(p.read_bytes()[:4] == b"FXS1" for p in objects)  # signed
    _fresh_machine(monkeypatch, tmp_path)
    reader = _ext(cache=url)
    np.testing.assert_array_equal(reader.transform(images), reference)
    assert reader.last_run_.computed == 0  # the key's holder reads them
    # a forger without the key: a well-formed, checksummed object holding another image's features
    victim = objects[0]
    item = victim.parent.name.replace("-", ":", 1)
    with monkeypatch.context() as m:
        m.delenv("FEATX_CACHE_KEY")
        forged = pack(ns, item, {field: reference[5][:width]})
        assert unpack(forged, ns, item, {field: width}) is not None  # valid to a reader without the key
    victim.write_bytes(forged)
    _fresh_machine(monkeypatch, tmp_path)
    with pytest.warns(CacheWarning, match="1 corrupt, truncated, non-finite or unsigned object"):
        checked = _ext(cache=url)
        out = checked.transform(images)
    np.testing.assert_array_equal(out, reference)  # refused, recomputed, not served
    assert checked.last_run_.computed == 1 and victim.read_bytes()[:4] == b"FXS1"  # and replaced, signed
    monkeypatch.setenv("FEATX_CACHE_KEY", "another key")
    _fresh_machine(monkeypatch, tmp_path)
    with pytest.warns(CacheWarning, match=f"{len(images)} corrupt, truncated, non-finite or unsigned objects"):
        other = _ext(cache=url)
        np.testing.assert_array_equal(other.transform(images), reference)
    assert other.last_run_.computed == len(images)


def test_a_skops_file_does_not_point_predictions_at_its_shared_store(tmp_path, images, reference):
    skops_io = pytest.importorskip("skops.io")
    import featx

    store = tmp_path / "someone_elses_store"
    path = tmp_path / "model.skops"
    kw = dict(weights=None, preprocess=SMALL, precision="fp32", progress=False)  # a named model: skops stores it
    skops_io.dump(PretrainedFeatureExtractor("resnet18", cache=store.as_uri(), **kw).fit(), path)
    with pytest.warns(CacheWarning, match="saved with cache="):
        loaded = skops_io.load(path, trusted=featx.trusted_types())
    want = PretrainedFeatureExtractor("resnet18", **kw).fit().transform(images)
    np.testing.assert_array_equal(loaded.transform(images), want)
    assert not store.exists() or not any(p.is_file() for p in store.rglob("*"))  # nothing read or written there
