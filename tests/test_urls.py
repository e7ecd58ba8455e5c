"""Images at fsspec URLs: a loopback HTTP server and a real S3 endpoint (moto), requests counted at the server."""

from __future__ import annotations

import http.server
import io
import socket
import threading
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featx import ImageLoadError, PretrainedFeatureExtractor
from featx._images import remote

from .s3server import KEYS, MotoServer

KW = dict(model="resnet18", weights=None, layers=["layer2"], preprocess={"input_size": 32, "resize_size": 36},
          precision="fp32", device="cpu", progress=False)
N = 40


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("served")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(N):
        p = root / f"{i:02d}.jpg"
        Image.fromarray(rng.integers(0, 256, (30 + i % 5, 40, 3), dtype=np.uint8)).save(p, quality=90)
        paths.append(p)
    return paths


class _Counting(http.server.SimpleHTTPRequestHandler):
    """Serves files, counting GET requests and the image bytes they sent; ``/denied/...`` answers 403."""

    counts = {"GET": 0, "HEAD": 0, "bytes": 0}

    def log_message(self, *args):
        pass

    def do_GET(self):
        type(self).counts["GET"] += 1
        if self.path.startswith("/denied/"):
            self.send_error(403)
            return
        before = self.wfile
        counter = _ByteCounter(before, type(self).counts)
        self.wfile = counter
        try:
            super().do_GET()
        finally:
            self.wfile = before

    def do_HEAD(self):
        type(self).counts["HEAD"] += 1
        if self.path.startswith("/denied/"):
            self.send_error(403)
            return
        super().do_HEAD()


class _ByteCounter:
    def __init__(self, raw, counts):
        self.raw, self.counts = raw, counts

    def write(self, data):
        self.counts["bytes"] += len(data)
        return self.raw.write(data)

    def __getattr__(self, name):
        return getattr(self.raw, name)


@pytest.fixture(scope="module")
def web(photos):
    handler = type("Handler", (_Counting,), {"counts": {"GET": 0, "HEAD": 0, "bytes": 0}})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: handler(*a, directory=str(photos[0].parent)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler.counts
    server.shutdown()


@pytest.fixture(autouse=True)
def _fresh_servers(monkeypatch):
    remote._down.clear()
    yield
    remote._down.clear()


def _features(X, **kw):
    return PretrainedFeatureExtractor(**KW, **kw).fit().transform(X)


def test_http_urls_give_the_files_features_and_a_warm_run_downloads_no_image_bytes(web, photos, tmp_path):
    base, counts = web
    urls = [f"{base}/{p.name}" for p in photos]
    want = _features([str(p) for p in photos], cache=None)
    np.testing.assert_array_equal(_features(urls, cache=None), want)
    counts.update(GET=0, HEAD=0, bytes=0)
    cold = _features(urls, cache=str(tmp_path / "c"))
    assert counts["GET"] == N  # keyed and computed from one download each
    np.testing.assert_array_equal(cold, want)
    counts.update(GET=0, HEAD=0, bytes=0)
    ext = PretrainedFeatureExtractor(**KW, cache=str(tmp_path / "c")).fit()
    np.testing.assert_array_equal(ext.transform(urls), want)
    assert counts["GET"] == 0 and counts["bytes"] == 0 and counts["HEAD"] == N  # metadata only
    assert ext.last_run_.computed == 0
    # the same bytes on disk share the URL's entries: the key is the content
    local = PretrainedFeatureExtractor(**KW, cache=str(tmp_path / "c")).fit()
    local.transform([str(p) for p in photos])
    assert local.last_run_.computed == 0


def test_a_changed_url_is_downloaded_again(web, photos, tmp_path):
    base, counts = web
    src = photos[0].parent / "changing.jpg"
    src.write_bytes(photos[1].read_bytes())
    url = f"{base}/changing.jpg"
    cache = str(tmp_path / "c")
    first = _features([url], cache=cache)
    src.write_bytes(photos[2].read_bytes() + b"\0" * 7)  # another size: another version
    counts.update(GET=0)
    second = _features([url], cache=cache)
    assert counts["GET"] == 1
    np.testing.assert_array_equal(first, _features([str(photos[1])], cache=None))
    np.testing.assert_array_equal(second, _features([str(photos[2])], cache=None))


def test_url_errors_name_the_url_and_the_cause(web, tmp_path):
    base, _ = web
    for cache in (None, str(tmp_path / "c")):
        with pytest.raises(ImageLoadError, match=r"'http://127\.0\.0\.1:\d+/missing\.jpg'.*not found"):
            _features([f"{base}/missing.jpg"], cache=cache)
        with pytest.raises(ImageLoadError, match=r"permission denied"):
            _features([f"{base}/denied/00.jpg"], cache=cache)
    with pytest.raises(ImageLoadError, match=r"nosuchproto:// is not a protocol fsspec knows"):
        _features(["nosuchproto://bucket/x.jpg"], cache=None)


def test_a_missing_driver_is_named_with_its_extra(monkeypatch):
    import fsspec

    def missing(url, **kw):
        raise ImportError("Install s3fs to access S3")

    monkeypatch.setattr(fsspec.core, "url_to_fs", missing)
    with pytest.raises(ImageLoadError, match=r"reading s3:// URLs needs s3fs \(pip install 'featx\[s3\]'\)"):
        _features(["s3://bucket/x.jpg"], cache=None)


def test_a_frozen_server_costs_one_timeout_per_run(tmp_path, monkeypatch):
    """A server that accepts connections and never answers: one request waits out the timeout, the rest fail
    at once (counted at the server: connections accepted)."""
    monkeypatch.setenv("FEATX_READ_TIMEOUT", "1")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    accepted = []

    def accept():
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            accepted.append(conn)

    threading.Thread(target=accept, daemon=True).start()
    urls = [f"http://127.0.0.1:{sock.getsockname()[1]}/{i}.jpg" for i in range(6)]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ext = PretrainedFeatureExtractor(**KW, cache=str(tmp_path / "c"), on_error="nan").fit()
            X = ext.transform(urls)
        assert np.isnan(X).all() and len(ext.failed_reasons_) == 6
        reasons = [r for _, r in ext.failed_reasons_]
        assert sum("timed out after 1 s" in r for r in reasons) == 1
        assert all("timed out" in r for r in reasons)
        assert len(accepted) == 1
    finally:
        sock.close()
        for c in accepted:
            c.close()


def test_file_and_zip_urls(photos, tmp_path):
    want = _features([str(p) for p in photos[:3]], cache=None)
    np.testing.assert_array_equal(_features([p.as_uri() for p in photos[:3]], cache=None), want)
    archive = tmp_path / "shard.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for p in photos[:3]:
            z.write(p, p.name)
    members = [f"zip://{p.name}::{archive}" for p in photos[:3]]
    np.testing.assert_array_equal(_features(members, cache=str(tmp_path / "c")), want)
    np.testing.assert_array_equal(_features(members, cache=str(tmp_path / "c")), want)


def test_read_timeout_setting_is_checked(monkeypatch):
    for bad in ("0", "-1", "soon", "inf"):
        monkeypatch.setenv("FEATX_READ_TIMEOUT", bad)
        with pytest.raises(ValueError, match="FEATX_READ_TIMEOUT="):
            remote.read_timeout_s()
    monkeypatch.setenv("FEATX_READ_TIMEOUT", "2.5")
    assert remote.read_timeout_s() == 2.5


def test_what_counts_as_a_url():
    assert remote.is_url("s3://b/k.jpg") and remote.is_url("zip://a.jpg::x.zip") and remote.is_url("https://h/x")
    assert not remote.is_url("photos/a.jpg") and not remote.is_url("C:\\x.jpg") and not remote.is_url(b"s3://x")
    assert remote.local_path("file:///tmp/a%20b.jpg") == "/tmp/a b.jpg"
    assert remote.local_path("https://h/x") is None and remote.local_path("file://otherhost/x") is None


# ------------------------------------------------------------------ S3 (moto)


@pytest.fixture(scope="module")
def s3(photos):
    pytest.importorskip("s3fs")
    pytest.importorskip("moto")
    srv = MotoServer()
    bucket = srv.bucket()
    fs = srv.fs()
    for p in photos:
        fs.pipe_file(f"{bucket}/img/{p.name}", p.read_bytes())
    yield srv, bucket
    srv.stop()


def test_s3_urls_give_the_files_features_and_a_warm_run_reads_no_object(s3, photos, tmp_path, monkeypatch):
    import s3fs

    srv, bucket = s3
    for k, v in KEYS.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_ENDPOINT_URL", srv.endpoint)
    s3fs.S3FileSystem.clear_instance_cache()
    reads = []
    real = remote.read_url
    monkeypatch.setattr(remote, "read_url", lambda url: reads.append(url) or real(url))
    import featx._images.preprocess as pre
    import featx._runtime.keys as keys

    monkeypatch.setattr(pre, "read_url", remote.read_url)
    monkeypatch.setattr(keys, "read_url", remote.read_url)
    urls = [f"s3://{bucket}/img/{p.name}" for p in photos]
    want = _features([str(p) for p in photos], cache=None)
    np.testing.assert_array_equal(_features(urls, cache=str(tmp_path / "c")), want)
    assert len(reads) == N
    reads.clear()
    np.testing.assert_array_equal(_features(urls, cache=str(tmp_path / "c")), want)
    assert reads == []  # ETag unchanged: served from the cache without a GET
    with pytest.raises(ImageLoadError, match=rf"'s3://{bucket}/img/none\.jpg'.*not found"):
        _features([f"s3://{bucket}/img/none.jpg"], cache=None)
    s3fs.S3FileSystem.clear_instance_cache()


def test_prune_forgets_the_versions_of_evicted_urls(web, photos, tmp_path):
    from featx._cache.sqlite import EmbeddingCache

    base, _ = web
    urls = [f"{base}/{p.name}" for p in photos[:4]]
    _features(urls, cache=str(tmp_path / "c"))
    cache = EmbeddingCache.open(str(tmp_path / "c"))
    assert len(cache.known_urls(urls)) == 4
    cache.prune(0)
    assert cache.known_urls(urls) == {}
