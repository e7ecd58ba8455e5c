"""The per-image embedding cache: SQLite (standard library) in WAL mode.

One database file, ``<cache dir>/featx-cache.sqlite``, holds:

- ``namespaces``: one row per fingerprint of everything that changes the
  numbers (backbone identity, weights digest, preprocessing, precision, the
  feature-format version and the major.minor versions of torch and of the
  model library), with a JSON provenance record;
- ``embeddings``: one row per (namespace, image content key, field), where a
  field is one layer's output under one elementary pooling
  (``output:blocks.4|avg``); the vector is float32 bytes with a blake2b
  checksum, verified on every read;
- ``files``: path + size + mtime -> content hash, so unchanged files are not
  re-read on warm calls (like git's index; entries younger than the clock's
  racy window are re-hashed).

Writes are transactions (atomic: a process killed at any instant leaves the
previous state); WAL lets readers and one writer at a time work concurrently
from several processes. Any cache failure degrades to a warning
(:class:`featx.CacheWarning`): the transform still returns correct results.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sqlite3
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from .._exceptions import CacheWarning
from .base import EmbeddingStore, store_info

__all__ = [
    "FORMAT_VERSION",
    "DB_NAME",
    "default_cache_dir",
    "resolve_cache_dir",
    "EmbeddingCache",
    "content_key",
    "namespace_for",
    "process_alive",
]

#: Bump when the meaning of stored vectors changes; old entries are then never read.
FORMAT_VERSION = 1
DB_NAME = "featx-cache.sqlite"
_SCHEMA_VERSION = "1"
_RACY_NS = 2_000_000_000  # files modified this recently before hashing are re-hashed
_CHUNK = 400  # SQLite host parameters per IN (...) list
_BUSY_TIMEOUT = 60.0  # seconds a writer waits for another process's transaction

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS namespaces(ns TEXT PRIMARY KEY, info TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS embeddings(
    ns TEXT NOT NULL, item TEXT NOT NULL, field TEXT NOT NULL,
    vec BLOB NOT NULL, digest BLOB NOT NULL, atime REAL NOT NULL,
    UNIQUE(ns, item, field));
CREATE INDEX IF NOT EXISTS embeddings_atime ON embeddings(atime);
CREATE TABLE IF NOT EXISTS files(
    path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
    hashed_ns INTEGER NOT NULL, hash TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS claims(
    ns TEXT NOT NULL, item TEXT NOT NULL, owner TEXT NOT NULL, expires REAL NOT NULL,
    PRIMARY KEY(ns, item));
"""

#: URL -> version (ETag, size, modification time) -> content hash; created when first written, so that opening
#: a database made by an older featx writes nothing (it may be read-only, or on a full disk).
_URLS_TABLE = "CREATE TABLE IF NOT EXISTS urls(url TEXT PRIMARY KEY, version TEXT NOT NULL, hash TEXT NOT NULL)"

#: A claim on an image being computed lapses after this long (a stuck or remote owner cannot block forever).
CLAIM_TTL = 15 * 60.0


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _alive(owner: str) -> bool:
    """Whether a claim's owner still runs (known only on this host; elsewhere its expiry decides)."""
    host, _, pid = owner.rpartition(":")
    return process_alive(host, pid)


def process_alive(host: str, pid: Any) -> bool:
    """Whether process ``pid`` of ``host`` may still run: False only for one of this host that is gone."""
    if host != socket.gethostname():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, OSError):
        return True
    return True


def default_cache_dir() -> Path:
    """``$FEATX_CACHE_DIR``, else the platform's user cache directory for featx (``platformdirs``)."""
    env = os.environ.get("FEATX_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("featx", appauthor=False))


def resolve_cache_dir(cache: Any) -> Path | None:
    """The ``cache`` parameter (None, True/False, or a directory; URLs are :mod:`featx._cache.objects`'s) as a directory or None."""
    if cache is None or cache is False:
        return None
    if cache is True:
        return default_cache_dir()
    if isinstance(cache, (str, os.PathLike)):
        return Path(os.fspath(cache)).expanduser()
    raise ValueError(
        f"cache={cache!r} is invalid. Use None (no cache), True (the default location: "
        "$FEATX_CACHE_DIR or the user cache directory), a directory path, or a storage URL "
        "(s3://bucket/prefix, gs://..., file:///mnt/shared/...)."
    )


def _major_minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def _model_library(model_id: str) -> tuple[str, str] | None:
    """The library (name, version) whose code computes a backbone of this identity, if any."""
    source = model_id.split(":", 1)[0]
    if source in ("featx", "timm"):
        import timm

        return "timm", timm.__version__
    if source == "torchvision":
        import torchvision

        return "torchvision", torchvision.__version__
    if source == "open_clip":
        import open_clip

        return "open_clip", open_clip.__version__
    return None


def namespace_for(*, model_id: str, weights_id: str | None, weights_digest: str, code: str | None,
                  preprocess: dict, precision: str, tta: str | None = None,
                  folded: bool = False) -> tuple[str, dict]:
    """Digest of everything that changes an extractor's numbers, and its provenance record.

    ``precision`` is ``"fp32"``, or the autocast dtype's name as ``str(dtype)``
    (``"torch.bfloat16"``): what earlier featx versions stored. ``folded``:
    the backbone runs with its BatchNorms folded into its convolutions.
    """
    import torch

    from .._version import __version__

    library = _model_library(model_id)
    key = {
        "format": FORMAT_VERSION,
        "model": model_id,
        "weights_digest": weights_digest,
        "code": code,
        "preprocess": {k: list(v) if isinstance(v, tuple) else v for k, v in sorted(preprocess.items())},
        "precision": precision,
        "torch": _major_minor(torch.__version__),
        "library": None if library is None else [library[0], _major_minor(library[1])],
    }
    if tta is not None:  # absent otherwise, so plain extractors keep their entries
        key["tta"] = tta
    if folded:
        key["batchnorm"] = "folded"
    ns = hashlib.blake2b(json.dumps(key, sort_keys=True).encode(), digest_size=16).hexdigest()
    info = dict(key, weights=weights_id, featx=__version__, torch_full=torch.__version__,
                library_full=None if library is None else list(library))
    return ns, info


def _clock() -> float:
    """The time recorded as an entry's last use (what ``prune`` evicts by); one place, so tests can step it."""
    return time.time()


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=8).digest()


def content_key(item: Any) -> str | None:
    """Content hash of an in-memory item (arrays, tensors, PIL images, bytes); None for paths.

    Paths are hashed by :meth:`EmbeddingCache.path_keys`, which remembers the
    hashes of unchanged files.
    """
    import torch
    from PIL import Image

    h = hashlib.blake2b(digest_size=16)
    if isinstance(item, (bytes, bytearray, memoryview)):
        h.update(item)
        return "f:" + h.hexdigest()  # the same key as a file with these bytes
    if isinstance(item, torch.Tensor):
        item = item.detach().cpu()
        if item.dtype == torch.bfloat16:
            item = item.float()
        item = item.numpy()
    if isinstance(item, np.ndarray):
        arr = np.ascontiguousarray(item)
        h.update(f"{arr.dtype.str}|{arr.shape}|".encode())
        h.update(memoryview(arr).cast("B"))
        return "a:" + h.hexdigest()
    if isinstance(item, Image.Image):
        orientation = item.getexif().get(0x0112, 1)
        h.update(f"{item.mode}|{item.size}|{orientation}|{item.info.get('transparency')!r}|".encode())
        h.update(item.tobytes())
        if item.mode == "P":
            h.update(bytes(item.getpalette() or []))
        return "p:" + h.hexdigest()
    return None


def _stored_path(path: str) -> str | bytes:
    """A path as the files table holds it: text, or the file name's own bytes where they are not UTF-8.

    POSIX names are bytes; Python carries undecodable ones as lone
    surrogates, which SQLite's text cannot hold. As a blob such a name never
    equals any text name, so no two files share a row.
    """
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return os.fsencode(path)


def _hash_file(path: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "f:" + h.hexdigest()


class EmbeddingCache(EmbeddingStore):
    """A handle on one cache directory's database, shared per process.

    Use :meth:`open`, which returns None (after a warning) when the directory
    cannot hold a cache.
    """

    _registry: dict[tuple[int, str], "EmbeddingCache"] = {}
    _registry_lock = threading.Lock()
    kind = "SQLite database"
    eviction = "least-recently-used"

    @property
    def location(self) -> str:
        return str(self.path)

    def __init__(self, root: Path):
        self.root = Path(root)
        self.path = self.root / DB_NAME
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        self.writable = True
        self._connect()

    # ------------------------------------------------------------ opening

    @classmethod
    def open(cls, root: Path) -> "EmbeddingCache | None":
        """The process's handle on ``root``, or None with a :class:`CacheWarning`."""
        key = (os.getpid(), str(Path(root).resolve()))
        with cls._registry_lock:
            cache = cls._registry.get(key)
            if cache is not None:
                return cache
            try:
                cache = cls(root)
            except (OSError, sqlite3.Error) as exc:
                warnings.warn(
                    f"featx cache at {str(root)!r} is unusable ({type(exc).__name__}: {exc}); "
                    "continuing without a cache.",
                    CacheWarning,
                    stacklevel=3,
                )
                return None
            cls._registry[key] = cache
            return cache

    def _connect(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            self._conn = self._open_db()
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError):
                if self.path.is_file() and not os.access(self.path, os.W_OK) or not os.access(self.root, os.W_OK):
                    self._conn = self._open_read_only(exc)
                    return
                raise
            self._quarantine(exc)
            self._conn = self._open_db()

    def _open_read_only(self, why: BaseException) -> sqlite3.Connection:
        """A cache whose file or folder is read-only: read (hits served), never written, with one warning.

        WAL readers need the ``-shm`` file, which a read-only folder cannot
        get; SQLite's ``immutable`` mode reads without it (the file must then
        not change while it is open, which a read-only cache does not).
        """
        last: BaseException = why
        for query in ("mode=ro", "mode=ro&immutable=1"):
            try:
                conn = sqlite3.connect(f"{self.path.resolve().as_uri()}?{query}", uri=True, timeout=_BUSY_TIMEOUT,
                                       check_same_thread=False, isolation_level=None)
            except sqlite3.Error as exc:
                last = exc
                continue
            try:
                row = conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
                if row is None or row[0] != _SCHEMA_VERSION:
                    raise sqlite3.DatabaseError(f"cache schema {row and row[0]!r}, expected {_SCHEMA_VERSION!r}")
            except sqlite3.Error as exc:
                conn.close()
                last = exc
                continue
            self.writable = False
            warnings.warn(f"featx cache at {str(self.root)!r} is read-only ({why}): its embeddings are read, new "
                          "ones are computed but not saved.", CacheWarning, stacklevel=5)
            return conn
        raise last

    def _open_db(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=_BUSY_TIMEOUT, check_same_thread=False, isolation_level=None)
        try:
            _switch_to_wal(conn)
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.executescript(_SCHEMA)
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (_SCHEMA_VERSION,))
            row = conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row[0] != _SCHEMA_VERSION:
                raise sqlite3.DatabaseError(f"cache schema {row[0]!r}, expected {_SCHEMA_VERSION!r}")
            conn.execute("PRAGMA quick_check(1)").fetchone()
        except BaseException:
            conn.close()
            raise
        return conn

    def _quarantine(self, exc: BaseException) -> None:
        """Move a corrupt database aside (kept for inspection) so a fresh one can start."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside = self.path.with_name(f"{DB_NAME}.corrupt-{stamp}-{os.getpid()}")
        warnings.warn(
            f"featx cache database {str(self.path)!r} is corrupt ({exc}); moved it to {aside.name!r} "
            "and started a new one. Embeddings will be recomputed.",
            CacheWarning,
            stacklevel=4,
        )
        for suffix in ("", "-wal", "-shm"):
            src = Path(str(self.path) + suffix)
            if src.exists():
                os.replace(src, str(aside) + suffix)

    def _recover(self, exc: sqlite3.DatabaseError) -> None:
        """Called when a query finds the database malformed."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
            self._quarantine(exc)
            self._conn = self._open_db()

    def _write(self, fn, *args) -> bool:
        """Run ``fn(conn, *args)`` in a write transaction; False (with a warning) if it fails."""
        if not self.writable:
            return False
        with self._lock:
            conn = self._conn
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    fn(conn, *args)
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
                return True
            except sqlite3.DatabaseError as exc:
                if not isinstance(exc, sqlite3.OperationalError):
                    self._recover(exc)
                    return False
                self.writable = False
                warnings.warn(
                    f"featx cache at {str(self.root)!r} cannot be written ({exc}); results are correct "
                    "but new embeddings are not saved.",
                    CacheWarning,
                    stacklevel=4,
                )
                return False

    def _read(self, sql: str, params: Sequence) -> list[tuple]:
        with self._lock:
            try:
                return self._conn.execute(sql, params).fetchall()
            except sqlite3.DatabaseError as exc:
                if isinstance(exc, sqlite3.OperationalError):
                    warnings.warn(f"featx cache read failed ({exc}); recomputing.", CacheWarning, stacklevel=4)
                    return []
                self._recover(exc)
                return []

    # ------------------------------------------------------------- content

    def path_keys(self, paths: Sequence[str]) -> list[str | None]:
        """Content keys of files, re-hashing only new or changed ones. None where unreadable."""
        stats: list[os.stat_result | None] = []
        for p in paths:
            try:
                st = os.stat(p)
                stats.append(st if os.path.isfile(p) else None)
            except OSError:
                stats.append(None)
        known: dict[str | bytes, tuple] = {}
        wanted = [_stored_path(os.path.abspath(p)) for p in paths]
        for chunk in _chunks(sorted(set(wanted), key=lambda v: (isinstance(v, bytes), v))):
            rows = self._read(
                f"SELECT path, size, mtime_ns, hashed_ns, hash FROM files WHERE path IN ({_qs(chunk)})", chunk
            )
            known.update({r[0]: r[1:] for r in rows})
        keys: list[str | None] = []
        fresh = []
        for p, ap, st in zip(paths, wanted, stats):
            if st is None:
                keys.append(None)
                continue
            row = known.get(ap)
            if row is not None and row[0] == st.st_size and row[1] == st.st_mtime_ns and st.st_mtime_ns < row[2] - _RACY_NS:
                keys.append(row[3])
                continue
            now = time.time_ns()
            try:
                key = _hash_file(p)
            except OSError:
                keys.append(None)
                continue
            keys.append(key)
            fresh.append((ap, st.st_size, st.st_mtime_ns, now, key))
        if fresh:
            self._write(lambda c, rows: c.executemany("INSERT OR REPLACE INTO files VALUES (?,?,?,?,?)", rows), fresh)
        return keys

    def known_urls(self, urls: Sequence[str]) -> dict[str, tuple[str, str]]:
        """``{url: (version, content key)}`` recorded for these URLs."""
        known: dict[str, tuple[str, str]] = {}
        for chunk in _chunks(sorted(set(urls))):
            known.update({u: (v, h) for u, v, h in self._read_quiet(  # no table yet: nothing known
                f"SELECT url, version, hash FROM urls WHERE url IN ({_qs(chunk)})", chunk)})
        return known

    def remember_urls(self, rows: Sequence[tuple[str, str, str]]) -> None:
        """Record ``(url, version, content key)`` rows (a failure only costs a download next time)."""
        if rows:
            self._write(lambda c, r: (c.execute(_URLS_TABLE),
                                      c.executemany("INSERT OR REPLACE INTO urls VALUES (?,?,?)", r)), list(rows))

    # ------------------------------------------------------------ claims

    def _claims(self, ns: str, keys: Sequence[str]) -> dict[str, tuple[str, float]]:
        rows: dict[str, tuple[str, float]] = {}
        for chunk in _chunks(list(keys)):
            for item, owner, expires in self._read_quiet(
                    f"SELECT item, owner, expires FROM claims WHERE ns=? AND item IN ({_qs(chunk)})", [ns, *chunk]):
                rows[item] = (owner, expires)
        return rows

    def _read_quiet(self, sql: str, params: Sequence) -> list[tuple]:
        with self._lock:
            try:
                return self._conn.execute(sql, params).fetchall()
            except sqlite3.Error:  # an old read-only database without the table: no coordination
                return []

    def claimed_elsewhere(self, ns: str, keys: Sequence[str]) -> set[str]:
        me, now = _owner(), time.time()
        return {k for k, (owner, expires) in self._claims(ns, keys).items()
                if owner != me and expires > now and _alive(owner)}

    def claim(self, ns: str, keys: Sequence[str]) -> set[str]:
        keys = list(dict.fromkeys(keys))
        if not keys or not self.writable:
            return set(keys)
        me, now = _owner(), time.time()
        got: set[str] = set()

        def take(c: sqlite3.Connection) -> None:
            for chunk in _chunks(keys):
                held = c.execute(f"SELECT item, owner, expires FROM claims WHERE ns=? AND item IN ({_qs(chunk)})",
                                 [ns, *chunk]).fetchall()
                stale = [item for item, owner, expires in held
                         if owner != me and (expires <= now or not _alive(owner))]
                if stale:
                    c.execute(f"DELETE FROM claims WHERE ns=? AND item IN ({_qs(stale)})", [ns, *stale])
                c.executemany("INSERT OR IGNORE INTO claims VALUES (?,?,?,?)",
                              [(ns, k, me, now + CLAIM_TTL) for k in chunk])
                got.update(r[0] for r in c.execute(
                    f"SELECT item FROM claims WHERE ns=? AND owner=? AND item IN ({_qs(chunk)})", [ns, me, *chunk]))

        return got if self._write(take) else set(keys)

    def release(self, ns: str, keys: Iterable[str]) -> None:
        keys = list(keys)
        if keys and self.writable:
            me = _owner()
            self._write(lambda c: [c.execute(f"DELETE FROM claims WHERE ns=? AND owner=? AND item IN ({_qs(ch)})",
                                             [ns, me, *ch]) for ch in _chunks(keys)])

    # --------------------------------------------------------- namespaces

    def register_namespace(self, ns: str, info: dict) -> None:
        if self._read("SELECT 1 FROM namespaces WHERE ns=?", (ns,)):
            return
        self._write(
            lambda c: c.execute(
                "INSERT OR IGNORE INTO namespaces VALUES (?,?,?)", (ns, json.dumps(info, sort_keys=True), time.time())
            )
        )

    # ----------------------------------------------------------- vectors

    def lookup(self, ns: str, keys: Iterable[str], widths: dict[str, int]) -> dict[str, dict[str, np.ndarray]]:
        """``{item key: {field: vector}}`` for the stored, intact entries among ``keys`` x ``widths``.

        A corrupt entry (bad checksum or length) is reported with a
        :class:`CacheWarning` and left out, so it is recomputed and replaced.
        """
        keys = sorted(set(keys))
        fields = sorted(widths)
        found: dict[str, dict[str, np.ndarray]] = {}
        bad: list[tuple[str, str]] = []
        hit_rows: list[int] = []
        for chunk in _chunks(keys, _CHUNK - len(fields) - 1):
            rows = self._read(
                f"SELECT rowid, item, field, vec, digest FROM embeddings WHERE ns=? "
                f"AND item IN ({_qs(chunk)}) AND field IN ({_qs(fields)})",
                [ns, *chunk, *fields],
            )
            for rowid, item, field, vec, digest in rows:
                if len(vec) != 4 * widths[field] or _digest(vec) != digest:
                    bad.append((item, field))
                    continue
                found.setdefault(item, {})[field] = np.frombuffer(vec, dtype=np.float32)
                hit_rows.append(rowid)
        if bad:
            warnings.warn(
                f"featx cache: {len(bad)} corrupt entr{'y' if len(bad) == 1 else 'ies'} in {str(self.path)!r} "
                f"(checksum or length mismatch, first: field {bad[0][1]!r}); recomputing them.",
                CacheWarning,
                stacklevel=3,
            )
        if hit_rows:
            now = _clock()
            self._write(
                lambda c: [
                    c.execute(f"UPDATE embeddings SET atime=? WHERE rowid IN ({_qs(ch)})", [now, *ch])
                    for ch in _chunks(hit_rows)
                ]
            )
        return found

    def store(self, ns: str, rows: list[tuple[str, str, np.ndarray]], *,
              requested: Sequence[str] | None = None) -> bool:
        """Write every ``(item key, field, vector)`` row in one transaction, committed when it returns."""
        now = _clock()
        payload = []
        for item, field, vec in rows:
            data = np.ascontiguousarray(vec, dtype=np.float32).tobytes()
            payload.append((ns, item, field, data, _digest(data), now))
        return self._write(lambda c: c.executemany("INSERT OR REPLACE INTO embeddings VALUES (?,?,?,?,?,?)", payload))

    def flush(self) -> None:
        """Nothing to wait for: every write here is a committed transaction when ``store`` returns."""

    # --------------------------------------------------------- management

    def _db_bytes(self) -> int:
        return sum(Path(str(self.path) + s).stat().st_size for s in ("", "-wal") if Path(str(self.path) + s).exists())

    def info(self) -> dict:
        """Size on disk, entry counts and a per-namespace breakdown with provenance (:func:`featx._cache.base.store_info`)."""
        db = self._db_bytes()
        per_ns = self._read(
            "SELECT n.ns, n.info, n.created, COUNT(e.rowid), COALESCE(SUM(LENGTH(e.vec)), 0), "
            "COUNT(DISTINCT e.item), MAX(e.atime) FROM namespaces n LEFT JOIN embeddings e ON e.ns = n.ns "
            "GROUP BY n.ns ORDER BY n.created",
            (),
        )
        files = self._read("SELECT COUNT(*) FROM files", ())
        namespaces = []
        for ns, info, created, n_rows, nbytes, n_items, last in per_ns:
            namespaces.append(
                {"namespace": ns, "entries": n_rows, "images": n_items, "vector_bytes": nbytes,
                 "created": created, "last_used": last, "provenance": json.loads(info)}
            )
        kind = self.kind if self.writable else f"{self.kind}, read-only"
        return store_info(location=self.location, kind=kind, size_bytes=db,
                          entries=sum(n["entries"] for n in namespaces), namespaces=namespaces,
                          files_indexed=files[0][0] if files else 0, parts={"database": db})

    def clear(self) -> int:
        """Delete every entry, namespace and file hash, and shrink the file; return how many entries went."""
        rows = self._read("SELECT COUNT(*) FROM embeddings", ())
        if not self._write(lambda c: [c.execute(f"DELETE FROM {t}") for t in ("embeddings", "namespaces", "files", "claims")] + [c.execute("DROP TABLE IF EXISTS urls")]):
            raise OSError(f"featx cache at {str(self.root)!r}: nothing was removed: {self._unwritable()}")
        self._vacuum()
        return rows[0][0] if rows else 0

    def _unwritable(self) -> str:
        return ("its database cannot be written (a full disk, or a read-only file or folder). Free space on its "
                "disk or fix its permissions, then run this again.")

    def prune(self, max_bytes: int) -> int:
        """Evict the least recently used entries until the database is at most 90% of ``max_bytes``.

        Like ccache, it evicts down to 90% of the limit, so that the next few
        writes do not immediately exceed it again. Returns how many entries went.
        """
        self._vacuum()
        removed = 0
        for _ in range(10):  # the file has been compacted (above, or at the end of the last pass)
            size = self._db_bytes()
            if size <= max_bytes:
                break
            rows = self._read("SELECT rowid, LENGTH(vec) FROM embeddings ORDER BY atime", ())
            if not rows:
                break
            # bytes per entry on disk beyond its vector (keys, index, page slack), from the current file
            overhead = max(0.0, (size - sum(n for _, n in rows)) / len(rows))
            excess, freed, victims = size - 0.9 * max_bytes, 0.0, []
            for rowid, n in rows:
                if freed >= excess:
                    break
                victims.append(rowid)
                freed += n + overhead
            if not self._write(lambda c: [c.execute(f"DELETE FROM embeddings WHERE rowid IN ({_qs(ch)})", ch)
                                          for ch in _chunks(victims)]):
                raise OSError(f"featx cache at {str(self.root)!r}: {removed} entries were evicted, then no more: "
                              f"{self._unwritable()}")
            self._write(lambda c: [
                c.execute("DELETE FROM namespaces WHERE ns NOT IN (SELECT DISTINCT ns FROM embeddings)"),
                c.execute("DELETE FROM files WHERE hash NOT IN (SELECT DISTINCT item FROM embeddings)"),
                *([c.execute("DELETE FROM urls WHERE hash NOT IN (SELECT DISTINCT item FROM embeddings)")]
                  if c.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='urls'").fetchone()
                  else []),  # created by the first URL run only
            ])
            removed += len(victims)
            self._vacuum()
        return removed

    def _vacuum(self) -> None:
        with self._lock:
            try:
                self._conn.execute("VACUUM")  # in WAL mode the compacted pages land in the WAL...
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # ...so fold it back into the file
            except sqlite3.OperationalError as exc:  # another process holds the database
                warnings.warn(f"featx cache: could not compact the database ({exc}).", CacheWarning, stacklevel=3)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
        with self._registry_lock:
            for k, v in list(self._registry.items()):
                if v is self:
                    del self._registry[k]


def _switch_to_wal(conn: sqlite3.Connection) -> None:
    """``PRAGMA journal_mode=WAL``, waiting out another process doing the same.

    SQLite answers "database is locked" at once, without its busy wait, to a
    connection switching a new database to WAL while another one does: two
    workers opening a fresh cache together lost one of them to "no cache".
    Retried here for up to the busy timeout.
    """
    deadline = time.monotonic() + _BUSY_TIMEOUT
    delay = 0.001
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def _qs(seq: Sequence) -> str:
    return ",".join("?" * len(seq))


def _chunks(seq: Sequence, size: int = _CHUNK):
    seq = list(seq)
    for i in range(0, len(seq), max(1, size)):
        yield seq[i:i + size]
