"""The embedding cache on shared storage: immutable objects under an fsspec URL, read through the local cache.

``cache="s3://bucket/prefix"`` (``gs://``, ``az://``, ``file:///mnt/nfs/...``,
any fsspec URL) selects this store. SQLite needs working locks and shared
memory, which network file systems do not reliably give and object storage
cannot give at all; this store needs neither:

- **one object per (namespace, image, set of fields an extractor asks
  for)**, named by its content key:
  ``<prefix>/featx-v1/<namespace>/<image key>/<digest of the field names>``. An object is
  never modified: a writer publishes it once, with create-only semantics
  (S3's ``If-None-Match: *``; on a file system, a unique temporary file
  hard-linked into place), so any number of writers on any number of
  machines share a store with no lock and no read-modify-write. Two writers
  of the same object publish the same numbers; the second is told it exists.
- **every object carries its identity and a checksum** (magic, a JSON
  header naming namespace, image and field, the float32 vector, a blake2b
  digest of all of it), verified on every read: a truncated, corrupt or
  misplaced object is a miss (recomputed, then replaced), never a wrong
  feature.
- **faults never fail a transform**: a store that is unreachable, too slow
  (``FEATX_CACHE_TIMEOUT`` seconds per call, default 30), or denies a request gives a :class:`featx.CacheWarning` and
  the features are computed; a store that failed is left alone for a minute,
  so a dead server costs one timeout, not one per batch; a store that
  refuses writes (a read-only bucket) is still read.
- **local read-through**: the local SQLite cache (``$FEATX_CACHE_DIR`` or the
  user cache directory) fronts the store, so a repeated job on one machine
  reads from local disk; hits from the store are copied into it.
  ``FEATX_CACHE_READ_THROUGH=0`` turns the local layer off (e.g. on workers
  whose local disk does not outlive the job).

Connection settings (endpoint, credentials, timeouts) are fsspec's: its
configuration files or ``FSSPEC_<PROTOCOL>_<OPTION>`` environment variables
(``FSSPEC_S3_ENDPOINT_URL=http://...``), and each driver's own (``AWS_*``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import struct
import threading
import time
import uuid
import warnings
from typing import Any, Iterable, Sequence

import numpy as np

from .sqlite import EmbeddingCache, _digest, _hash_file, default_cache_dir, resolve_cache_dir
from .._exceptions import CacheWarning
from .._options import FSSPEC_DRIVERS
from .base import EmbeddingStore, store_info

__all__ = ["LAYOUT", "SharedCache", "check_url", "is_url", "open_cache", "pack", "resolve_cache", "unpack"]

LAYOUT = "featx-v1"
_MAGIC = b"FXE1"
_MAGIC_SIGNED = b"FXS1"
_COOLDOWN = 60.0  # seconds a store that just failed is not asked again
_CONCURRENCY = 32  # requests in flight at once on an async store
# timeouts for S3, unless fsspec's configuration sets its own: a slow store costs seconds, not minutes
_S3_DEFAULTS = {"config_kwargs": {"connect_timeout": 5, "read_timeout": 20,
                                  "retries": {"max_attempts": 3, "mode": "standard"}}}


def is_url(text: Any) -> bool:
    """Whether a ``cache=`` value is a URL (``scheme://...``) rather than a directory."""
    return isinstance(text, str) and re.match(r"^[A-Za-z][A-Za-z0-9+.-]+://", text) is not None


def check_url(url: str) -> str:
    """``url`` if fsspec can open its scheme here; else a ValueError naming what to install."""
    import fsspec

    protocol = url.split("://", 1)[0].lower()
    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError as exc:
        driver = FSSPEC_DRIVERS.get(protocol)
        fix = (f"pip install '{driver[1]}' ({driver[0]})" if driver
               else f"install the fsspec driver for {protocol!r} ({exc})")
        raise ValueError(f"cache={url!r} needs the {protocol!r} storage driver, which is not installed: {fix}.") from None
    except ValueError:
        raise ValueError(
            f"cache={url!r}: fsspec knows no storage scheme {protocol!r}. Use s3://, gs://, az://, file:// "
            "(or another fsspec URL), or a local directory path."
        ) from None
    return url


def resolve_cache(cache: Any) -> str | None:
    """The ``cache`` parameter as a checked URL, a directory (as a string) or None."""
    if is_url(cache):  # never a relative path: "s3://bucket" must not become a folder named "s3:"
        return check_url(cache)
    root = resolve_cache_dir(cache)
    return None if root is None else str(root)


def open_cache(location: str | None) -> "EmbeddingCache | SharedCache | None":
    """The process's cache handle for a fitted ``cache_dir_``: SQLite for a directory, objects for a URL."""
    from pathlib import Path

    if location is None:
        return None
    if is_url(location):
        return SharedCache.open(location)
    return EmbeddingCache.open(Path(location))


# ------------------------------------------------------------------ objects


def _signing_key() -> bytes | None:
    """The key objects are signed with: ``$FEATX_CACHE_KEY`` (any text; hashed to 32 bytes), or None."""
    secret = os.environ.get("FEATX_CACHE_KEY")
    return hashlib.sha256(secret.encode()).digest() if secret else None


def _mac(key: bytes, body: bytes) -> bytes:
    return hashlib.blake2b(body, key=key, digest_size=16).digest()


def pack(ns: str, item: str, vectors: dict[str, np.ndarray]) -> bytes:
    """One stored object: magic, header length, JSON header, the float32 vectors, then a check of all before it.

    The check is blake2b (8 bytes), or with ``FEATX_CACHE_KEY`` set a keyed
    blake2b MAC (16 bytes, magic ``FXS1``) over the namespace, item, fields
    and vectors: only a holder of the key can make an object readers accept.
    """
    fields = sorted(vectors)
    arrays = [np.ascontiguousarray(vectors[f], dtype=np.float32).ravel() for f in fields]
    header = json.dumps({"ns": ns, "item": item, "fields": fields, "widths": [a.size for a in arrays]}).encode()
    key = _signing_key()
    payload = struct.pack("<I", len(header)) + header + b"".join(a.tobytes() for a in arrays)
    if key is not None:
        body = _MAGIC_SIGNED + payload
        return body + _mac(key, body)
    body = _MAGIC + payload
    return body + _digest(body)


def unpack(blob: bytes, ns: str, item: str, widths: dict[str, int]) -> dict[str, np.ndarray] | None:
    """The vectors in ``blob`` if it is intact, is the object asked for and (with a key) is signed by it; else None.

    With ``FEATX_CACHE_KEY`` set, an unsigned object, or one signed with
    another key, is refused: whoever can write to the bucket cannot choose
    the features. Without it, signed objects are read as intact ones (their
    signature cannot be checked).
    """
    key = _signing_key()
    if len(blob) < 24:
        return None
    if blob[:4] == _MAGIC_SIGNED:
        if key is not None and not hmac.compare_digest(_mac(key, blob[:-16]), blob[-16:]):
            return None
        tail = 16
    elif blob[:4] == _MAGIC and key is None and _digest(blob[:-8]) == blob[-8:]:
        tail = 8
    else:
        return None
    blob = blob[:-tail] + b"\0" * 8  # the layout below expects an 8-byte check at the end
    (n,) = struct.unpack("<I", blob[4:8])
    try:
        header = json.loads(blob[8:8 + n])
    except ValueError:
        return None
    fields = sorted(widths)
    expected = {"ns": ns, "item": item, "fields": fields, "widths": [widths[f] for f in fields]}
    data = np.frombuffer(blob[8 + n:-8], dtype=np.float32)
    if header != expected or data.size != sum(expected["widths"]):
        return None
    bounds = np.cumsum([0, *expected["widths"]])
    return {f: data[a:b] for f, a, b in zip(fields, bounds[:-1], bounds[1:])}


class ObjectStore:
    """Whole-object reads and create-only writes under one fsspec URL, counting requests."""

    def __init__(self, url: str):
        import fsspec

        self.url = url.rstrip("/")
        protocol = self.url.split("://", 1)[0].lower()
        options: dict = {"skip_instance_cache": True}  # a handle per process (and after a fork)
        if protocol in ("s3", "s3a") and "config_kwargs" not in fsspec.config.conf.get("s3", {}):
            options.update(_S3_DEFAULTS)
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **options)
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))
        self.requests = {"get": 0, "put": 0, "list": 0, "delete": 0}

    def _deadline(self) -> dict:
        """A bound on one call's whole time, retries included (``FEATX_CACHE_TIMEOUT``, default 30 s).

        A driver's own timeouts do not always bound a call: s3fs retries five
        times, and a PUT to a server that accepts and never answers was seen
        to wait for minutes. fsspec's ``timeout=`` bounds it (async drivers).
        """
        if not getattr(self.fs, "async_impl", False):
            return {}
        return {"timeout": float(os.environ.get("FEATX_CACHE_TIMEOUT", "30"))}

    def path(self, *parts: str) -> str:
        return "/".join([self.root, LAYOUT, *parts])

    def get(self, paths: Sequence[str]) -> dict[str, bytes | None]:
        """Each object's bytes, None where it does not exist; any other failure raises."""
        if not paths:
            return {}
        self.requests["get"] += len(paths)
        results = self.fs.cat(list(paths), on_error="return", **self._deadline())  # concurrent on async stores
        out: dict[str, bytes | None] = {}
        for p in paths:
            r = results.get(p, FileNotFoundError(p))
            if isinstance(r, FileNotFoundError):
                out[p] = None
            elif isinstance(r, BaseException):
                raise r
            else:
                out[p] = r
        return out

    def put(self, objects: dict[str, bytes], *, replace: bool = False) -> None:
        """Publish each object whole; one that exists already is left as it is (unless ``replace``)."""
        from concurrent.futures import ThreadPoolExecutor

        self.requests["put"] += len(objects)
        items = list(objects.items())
        if self.local:
            results = [self._publish_file(p, data, replace) for p, data in items]
        else:
            with ThreadPoolExecutor(min(_CONCURRENCY, max(1, len(items)))) as pool:
                results = list(pool.map(lambda kv: self._publish_object(*kv, replace), items))
        for r in results:
            if isinstance(r, BaseException) and not isinstance(r, FileExistsError):
                raise r

    def _publish_object(self, path: str, data: bytes, replace: bool) -> BaseException | None:
        """One PUT: an object store shows an object only once it is whole; ``If-None-Match`` makes it create-only."""
        try:
            self.fs.pipe_file(path, data, mode="overwrite" if replace else "create", **self._deadline())
        except Exception as exc:  # noqa: BLE001 - returned to put, which decides
            return exc
        return None

    def _publish_file(self, path: str, data: bytes, replace: bool) -> BaseException | None:
        """A unique temporary file, flushed to disk, then linked into place: readers never see a partial file."""
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if replace:
                os.replace(tmp, path)
                return None
            try:
                os.link(tmp, path)  # create-only: fails if another writer published first
            except FileExistsError as exc:
                return exc
        except OSError as exc:
            return exc
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return None

    def walk(self) -> list[tuple[str, int, float]]:
        """``(path, size, modified)`` of every object under the layout."""
        self.requests["list"] += 1
        try:
            found = self.fs.find(self.path(), detail=True)
        except FileNotFoundError:
            return []
        out = []
        for p, info in found.items():
            mtime = info.get("LastModified") or info.get("mtime") or info.get("created") or 0
            out.append((p, int(info.get("size") or 0), mtime.timestamp() if hasattr(mtime, "timestamp") else float(mtime)))
        return out

    def delete(self, paths: Sequence[str]) -> None:
        self.requests["delete"] += len(paths)
        for i in range(0, len(paths), 1000):
            self.fs.rm(list(paths[i:i + 1000]))


# -------------------------------------------------------------------- cache


def _is_vector(path: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    return name != "namespace.json" and ".tmp-" not in name


class SharedCache(EmbeddingStore):
    """The cache interface of :class:`~featx._cache.sqlite.EmbeddingCache` on an :class:`ObjectStore`.

    Use :meth:`open`. Every remote call goes through :meth:`_remote`, which
    turns any failure into a :class:`CacheWarning` and a miss.
    """

    _registry: dict[tuple[int, str], "SharedCache"] = {}
    _registry_lock = threading.Lock()
    kind = "shared object store"
    eviction = "oldest"  # objects are immutable and stores keep no access times

    @property
    def location(self) -> str:
        return self.url

    def __init__(self, url: str, local: EmbeddingCache | None):
        self.url = url.rstrip("/")
        self.path = self.url
        self.store_ = ObjectStore(self.url)
        self.local = local
        self.writable = True
        self._down_until = 0.0  # the circuit: open (the store is not asked) until then
        self._warned_until = 0.0  # a failure before this was already reported
        self._namespaces: set[str] = set()
        self._corrupt: set[str] = set()  # objects this handle found corrupt: recomputed vectors replace them
        self._publisher = None  # one background thread publishing objects while the backbone runs
        self._pending: list = []

    @classmethod
    def open(cls, url: str) -> "SharedCache":
        """The process's handle on ``url`` (with the local read-through layer unless turned off)."""
        key = (os.getpid(), url.rstrip("/"))
        with cls._registry_lock:
            cache = cls._registry.get(key)
            if cache is None:
                local = None
                if os.environ.get("FEATX_CACHE_READ_THROUGH", "1") not in ("0", "false", "no", "off"):
                    local = EmbeddingCache.open(default_cache_dir())
                cache = cls._registry[key] = cls(url, local)
            return cache

    # ------------------------------------------------------------ faults

    def _remote(self, what: str, call, *, default=None, writing: bool = False):
        """``call()``, or ``default`` with a warning when the store fails (and a minute's rest for it)."""
        if not self._usable(writing):
            return default
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 - any store failure degrades to computing
            self._failed(what, exc, writing)
            return default

    def _usable(self, writing: bool) -> bool:
        return time.monotonic() >= self._down_until and (self.writable or not writing)

    def _failed(self, what: str, exc: BaseException, writing: bool) -> None:
        """Warn once for a failure; a refused write stops writes, anything else rests the store a minute."""
        if writing and isinstance(exc, PermissionError):
            if self.writable:
                self.writable = False
                warnings.warn(f"featx cache at {self.url!r} refuses writes ({exc}); results are correct but new "
                              "embeddings are not shared (it is still read).", CacheWarning, stacklevel=5)
            return
        now = time.monotonic()
        self._down_until = max(self._down_until, now + _COOLDOWN)
        if now < self._warned_until:
            return  # already reported
        self._warned_until = self._down_until
        warnings.warn(f"featx cache at {self.url!r}: {what} failed ({type(exc).__name__}: {exc}); results are "
                      f"correct (computed here); the store is not asked again for {_COOLDOWN:.0f} s.",
                      CacheWarning, stacklevel=5)

    def _publish(self, objects: dict[str, bytes], replace: bool) -> None:
        """Queue a publish: it runs beside the next batches' compute; :meth:`flush` waits for it."""
        from concurrent.futures import ThreadPoolExecutor

        if not objects or not self._usable(writing=True):
            return
        if self._publisher is None:
            self._publisher = ThreadPoolExecutor(1, thread_name_prefix="featx-publish")
        job = self._publisher.submit(self._put, objects, replace)
        self._pending.append((job, objects, replace))

    def _put(self, objects: dict[str, bytes], replace: bool) -> bool:
        """The publisher thread's job: skipped while the circuit is open; a failure opens it at once.

        Without this, every batch queued while the store hangs would wait
        out its own timeout (one per batch); now the first failure stops the
        rest, and :meth:`flush` reports it once.
        """
        if not self._usable(writing=True):
            return False  # dropped: the store failed earlier in this run (or refuses writes)
        try:
            self.store_.put(objects, replace=replace)
        except PermissionError:
            raise
        except Exception:
            self._down_until = max(self._down_until, time.monotonic() + _COOLDOWN)
            raise
        return True

    def flush(self) -> None:
        """Wait until every queued object is published (or its failure is reported)."""
        pending, self._pending = self._pending, []
        for job, objects, replace in pending:
            exc = job.exception()
            if exc is not None:
                self._failed("replacing corrupt objects" if replace else "writing", exc, writing=True)
            elif replace and job.result():  # replaced (not dropped while the circuit was open)
                self._corrupt.difference_update(objects)

    # ----------------------------------------------------------- content

    def known_urls(self, urls: Sequence[str]) -> dict[str, tuple[str, str]]:
        return self.local.known_urls(urls) if self.local is not None else {}

    def remember_urls(self, rows: Sequence[tuple[str, str, str]]) -> None:
        if self.local is not None:
            self.local.remember_urls(rows)

    def path_keys(self, paths: Sequence[str]) -> list[str | None]:
        """Content keys of local files (remembered by the local layer when there is one)."""
        if self.local is not None:
            return self.local.path_keys(paths)
        keys: list[str | None] = []
        for p in paths:
            try:
                keys.append(_hash_file(p) if os.path.isfile(p) else None)
            except OSError:
                keys.append(None)
        return keys

    def claim(self, ns: str, keys: Sequence[str]) -> set[str]:
        """Claims are the local layer's: processes of one machine share it (across machines, none)."""
        return self.local.claim(ns, keys) if self.local is not None else set(keys)

    def claimed_elsewhere(self, ns: str, keys: Sequence[str]) -> set[str]:
        return self.local.claimed_elsewhere(ns, keys) if self.local is not None else set()

    def release(self, ns: str, keys: Iterable[str]) -> None:
        if self.local is not None:
            self.local.release(ns, keys)

    def register_namespace(self, ns: str, info: dict) -> None:
        if self.local is not None:
            self.local.register_namespace(ns, info)
        if ns in self._namespaces:
            return
        blob = json.dumps(info, sort_keys=True).encode()
        if self._remote("writing the namespace record", lambda: self.store_.put({self._ns_path(ns): blob}),
                        default=False, writing=True) is None:
            self._namespaces.add(ns)

    def _ns_path(self, ns: str) -> str:
        return self.store_.path(ns, "namespace.json")

    def _object(self, ns: str, item: str, fields: Iterable[str]) -> str:
        """An image's object for one set of fields (the fields one extractor asks for)."""
        bundle = _digest("\n".join(sorted(fields)).encode()).hex()
        return self.store_.path(ns, item.replace(":", "-"), bundle)

    def lookup(self, ns: str, keys: Iterable[str], widths: dict[str, int]) -> dict[str, dict[str, np.ndarray]]:
        """Local hits first, then the store's objects for the rest (copied into the local layer)."""
        keys = sorted(set(keys))
        found = self.local.lookup(ns, keys, widths) if self.local is not None else {}
        wanted = [k for k in keys if len(found.get(k, ())) < len(widths)]
        if not wanted:
            return found
        paths = [self._object(ns, k, widths) for k in wanted]
        blobs = self._remote("reading", lambda: self.store_.get(paths), default={})
        fetched, bad = [], []
        for k, p in zip(wanted, paths):
            blob = blobs.get(p)
            if blob is None:
                continue
            vectors = unpack(blob, ns, k, widths)
            if vectors is None or not all(np.isfinite(v).all() for v in vectors.values()):  # NaN/inf: no feature
                bad.append(p)
                continue
            found[k] = vectors
            fetched += [(k, f, v) for f, v in vectors.items()]
        if bad:
            self._corrupt.update(bad)
            plural = "s" if len(bad) > 1 else ""
            warnings.warn(f"featx cache: {len(bad)} corrupt, truncated, non-finite or unsigned object{plural} in "
                          f"{self.url!r} (first: {bad[0]!r}); recomputing and replacing them.",
                          CacheWarning, stacklevel=3)
        if fetched and self.local is not None:
            self.local.store(ns, fetched)
        return found

    def store(self, ns: str, rows: list[tuple[str, str, np.ndarray]], *,
              requested: Sequence[str] | None = None) -> bool:
        """Write rows to the local layer; queue each image's ``requested`` fields for publishing as one object.

        Without ``requested``, an image's object holds every field of its rows.
        Publishing overlaps the next batches; :meth:`flush` (called at the end
        of every run) waits for it.
        """
        if self.local is not None:
            self.local.store(ns, rows)
        per_item: dict[str, dict[str, np.ndarray]] = {}
        for k, f, v in rows:
            if requested is None or f in requested:
                per_item.setdefault(k, {})[f] = v
        objects = {self._object(ns, k, vecs): pack(ns, k, vecs) for k, vecs in per_item.items()}
        replace = {p: b for p, b in objects.items() if p in self._corrupt}
        self._publish({p: b for p, b in objects.items() if p not in replace}, replace=False)
        self._publish(replace, replace=True)
        return self._usable(writing=True)

    # -------------------------------------------------------- management

    def _objects(self) -> list[tuple[str, int, float]]:
        """Published vectors (not namespace records, not a killed writer's temporary files)."""
        return [o for o in self.store_.walk() if _is_vector(o[0])]

    def info(self) -> dict:
        """Objects, bytes and the per-namespace breakdown with provenance (one listing of the store)."""
        listing = [o for o in self.store_.walk() if ".tmp-" not in o[0]]
        base = self.store_.path()
        per_ns: dict[str, dict] = {}
        for p, size, mtime in listing:
            ns, _, rest = p[len(base) + 1:].partition("/")
            entry = per_ns.setdefault(ns, {"namespace": ns, "entries": 0, "items": set(), "vector_bytes": 0,
                                           "created": mtime, "last_used": None, "provenance": {}})
            if rest == "namespace.json":
                entry["created"] = mtime
                continue
            entry["entries"] += 1
            entry["items"].add(rest.split("/")[0])
            entry["vector_bytes"] += size
            entry["last_used"] = max(entry["last_used"] or 0, mtime)
        records = self.store_.get([self._ns_path(ns) for ns in per_ns])
        namespaces = []
        for ns, entry in sorted(per_ns.items(), key=lambda kv: kv[1]["created"]):
            blob = records.get(self._ns_path(ns))
            entry["provenance"] = json.loads(blob) if blob else {"model": "?", "preprocess": {}}
            entry["images"] = len(entry.pop("items"))
            namespaces.append(entry)
        total = sum(size for _, size, _ in listing)
        return store_info(location=self.location, kind=self.kind, size_bytes=total,
                          entries=sum(n["entries"] for n in namespaces), namespaces=namespaces,
                          files_indexed=None, parts={"objects": total})

    def clear(self) -> int:
        """Delete every object of the layout (other data under the prefix is left alone); return how many vectors."""
        paths = [p for p, _, _ in self.store_.walk()]
        if paths:
            self.store_.delete(paths)
        self._namespaces.clear()
        return sum(1 for p in paths if _is_vector(p))

    def prune(self, max_bytes: int) -> int:
        """Delete the oldest objects until the store holds at most 90% of ``max_bytes``; return how many went.

        Objects are immutable and object stores keep no access times, so the
        order is by age (when written), not by last use: a bucket lifecycle
        rule does the same job on the server's side.
        """
        listing = self.store_.walk()
        stale = [p for p, _, m in listing if ".tmp-" in p and m < time.time() - 3600]  # a killed writer's
        if stale:
            self.store_.delete(stale)
        objects = sorted((o for o in listing if _is_vector(o[0])), key=lambda o: o[2])
        size = sum(s for p, s, _ in listing if p not in stale)
        if size <= max_bytes:
            return 0
        victims, excess = [], size - 0.9 * max_bytes
        for p, s, _ in objects:
            if excess <= 0:
                break
            victims.append(p)
            excess -= s
        self.store_.delete(victims)
        return len(victims)

    def close(self) -> None:
        self.flush()
        with self._registry_lock:
            for k, v in list(self._registry.items()):
                if v is self:
                    del self._registry[k]
