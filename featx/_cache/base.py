"""The protocol every embedding store follows, written down (as joblib's ``StoreBackendBase``).

featx has two stores: :class:`featx._cache.sqlite.EmbeddingCache` (SQLite in a local
directory) and :class:`featx._cache.objects.SharedCache` (immutable objects under a
storage URL, read through a local SQLite layer). The engine
(:func:`featx._runtime.runner.cached_run`) and the command line (``featx cache``)
use only the methods below, with the same meaning in both, and never ask
which store they hold. Exported and compiled graphs are the engines'
artifacts (:mod:`featx._runtime.engines`), not entries of a store.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Iterable, Sequence

import numpy as np

__all__ = ["EmbeddingStore", "store_info"]


class EmbeddingStore(ABC):
    """Per-image vectors by namespace, item key and field.

    A *namespace* names everything that changes an extractor's numbers (see
    :func:`featx._cache.sqlite.namespace_for`); an *item key* names an image's
    content; a *field* is one layer under one elementary pooling. Faults
    never raise from the methods that serve a transform (``path_keys``,
    ``register_namespace``, ``lookup``, ``store``, ``flush``): they warn
    (:class:`featx.CacheWarning`) and turn into misses, so a broken store costs
    recomputation, never a wrong or failed result.
    """

    #: What ``featx cache info`` calls the store ("SQLite database", "shared object store").
    kind: str = ""
    #: The order ``prune`` evicts in ("least-recently-used", "oldest").
    eviction: str = ""
    #: Where the store is: a directory's database path or a storage URL.
    location: str = ""

    @abstractmethod
    def path_keys(self, paths: Sequence[str]) -> list[str | None]:
        """The item key of each file path (None where it cannot be read), from an index where one is kept."""

    def known_urls(self, urls: Sequence[str]) -> dict[str, tuple[str, str]]:
        """``{url: (version, item key)}`` remembered for these URLs (a store that keeps no index: none)."""
        return {}

    def remember_urls(self, rows: Sequence[tuple[str, str, str]]) -> None:
        """Remember ``(url, version, item key)`` rows, where the store keeps an index (else nothing)."""

    @abstractmethod
    def register_namespace(self, ns: str, info: dict) -> None:
        """Record a namespace's provenance (once; later calls are no-ops)."""

    @abstractmethod
    def lookup(self, ns: str, keys: Iterable[str], widths: dict[str, int]) -> dict[str, dict[str, np.ndarray]]:
        """``{item key: {field: vector}}`` for the stored fields of ``widths`` whose width matches."""

    @abstractmethod
    def store(self, ns: str, rows: list[tuple[str, str, np.ndarray]], *,
              requested: Sequence[str] | None = None) -> bool:
        """Write ``(item key, field, vector)`` rows (queued, or committed when it returns); False if it could not.

        ``requested``: the fields the extractor asked for (``rows`` may hold
        more: every stage, for later requests). A store keeps at least those;
        the SQLite store keeps every row, the shared store publishes the
        requested fields of an image as one object, the unit its
        :meth:`lookup` reads.
        """

    @abstractmethod
    def flush(self) -> None:
        """Return when every row handed to :meth:`store` is written, or its failure reported."""

    def claim(self, ns: str, keys: Sequence[str]) -> set[str]:
        """Mark ``keys`` as being computed by this process; return the ones it may compute.

        The rest are being computed by another live process sharing the store
        (a worker of the same grid search, another job): wait for them
        (:meth:`claimed_elsewhere`) instead of computing them twice. A store
        that cannot coordinate returns every key.
        """
        return set(keys)

    def claimed_elsewhere(self, ns: str, keys: Sequence[str]) -> set[str]:
        """The keys another live process has claimed (and not released)."""
        return set()

    def release(self, ns: str, keys: Iterable[str]) -> None:
        """Drop this process's claims on ``keys`` (computed, failed, or given up)."""

    @abstractmethod
    def info(self) -> dict:
        """What the store holds: see :func:`store_info` for the keys, the same in every store."""

    @abstractmethod
    def prune(self, max_bytes: int) -> int:
        """Evict (in :attr:`eviction` order) until the store holds at most 90% of ``max_bytes``; return how many."""

    @abstractmethod
    def clear(self) -> int:
        """Delete every entry and namespace of the store; return how many entries went."""

    @abstractmethod
    def close(self) -> None:
        """Finish pending writes and release the handle."""


def store_info(*, location: str, kind: str, size_bytes: int, entries: int, namespaces: list[dict],
               files_indexed: int | None, parts: dict[str, int] | None = None) -> dict:
    """The one shape of :meth:`EmbeddingStore.info`.

    ``namespaces``: one dict per namespace with ``namespace``, ``entries``,
    ``images``, ``vector_bytes``, ``created``, ``last_used`` (None when the
    store keeps no access times) and ``provenance``. ``files_indexed``: file
    paths whose content key is remembered, or None where the store keeps no
    such index. ``parts``: the sizes that make up ``size_bytes``, by name.
    """
    return {"path": location, "kind": kind, "size_bytes": int(size_bytes), "entries": int(entries),
            "namespaces": namespaces, "files_indexed": files_indexed, "parts": dict(parts or {})}
