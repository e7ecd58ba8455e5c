"""Item keys: what names each input image's content in the embedding cache.

A local file is keyed by its content hash, remembered by the store per path,
size and modification time (:meth:`~featx._cache.sqlite.EmbeddingCache.path_keys`);
an in-memory image by a hash of its pixels
(:func:`~featx._cache.sqlite.content_key`); an image at a URL by the hash of
its bytes, remembered per URL and version (ETag, size, modification time:
:func:`url_keys`), so a warm run over cached URLs downloads no image bytes.
The keys of a file and of a URL with the same bytes are the same.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .._cache.base import EmbeddingStore
from .._cache.sqlite import content_key
from .._images.preprocess import named_bytes
from .._images.remote import CONCURRENCY, Unreadable, URLError, is_url, local_path, read_url, url_versions

__all__ = ["HOLD_BYTES", "item_keys", "url_keys"]


def item_keys(items: Any, cache: EmbeddingStore) -> list[str | None]:
    """Content keys of every item (None where it cannot be read: it then fails in the loader).

    URL items are keyed by :func:`url_keys`, which may put the bytes it had to
    download (or the reason it could not) in their place in ``items``.
    """
    if items.kind != "list":
        return [content_key(items[i]) for i in range(len(items))]
    keys: list[str | None] = [None] * len(items)
    url_idx = [i for i, it in enumerate(items.data) if is_url(it) and local_path(it) is None]
    for i, (k, replacement) in zip(url_idx, url_keys([items[i] for i in url_idx], cache)):
        keys[i] = k
        if replacement is not None:
            items.data[i] = replacement
    urls = set(url_idx)
    path_idx = [i for i, it in enumerate(items.data) if isinstance(it, (str, os.PathLike)) and i not in urls]
    for i, k in zip(path_idx, cache.path_keys([_as_local(items[i]) for i in path_idx])):
        keys[i] = k
    for i, it in enumerate(items.data):
        if keys[i] is None and not isinstance(it, (str, os.PathLike)):
            try:
                keys[i] = content_key(it)
            except Exception:  # an unhashable oddity: no key, so the loader reports it
                keys[i] = None
    return keys


def _as_local(item: Any) -> str:
    path = os.fspath(item)
    return local_path(path) or path if is_url(path) else path


#: Downloaded bytes held for the loader while keying cold URLs, at most (beyond it they are read again).
HOLD_BYTES = 256 << 20


def url_keys(urls: list[str], cache: EmbeddingStore) -> list[tuple[str | None, Any]]:
    """``(content key, replacement)`` of each URL: the key from the store's index when the URL's version
    (ETag, size, modification time) is unchanged, else from its bytes, downloaded once.

    ``replacement`` is what the loader should read instead of the URL: the
    bytes just downloaded (named by the URL, up to :data:`HOLD_BYTES` in all),
    :class:`~featx._images.remote.Unreadable` when the URL cannot be read, or None.
    """
    versions = url_versions(urls)
    known = cache.known_urls([u for u, v in zip(urls, versions) if isinstance(v, str)])
    out: list[tuple[str | None, Any]] = [(None, None)] * len(urls)
    fetch = []
    for i, (u, v) in enumerate(zip(urls, versions)):
        if isinstance(v, URLError):
            out[i] = (None, Unreadable(u, str(v)))
        elif isinstance(v, str) and known.get(u, (None,))[0] == v:
            out[i] = (known[u][1], None)
        else:
            fetch.append(i)

    def download(i: int):
        try:
            return read_url(urls[i])
        except URLError as exc:
            return exc

    held, fresh = 0, []
    with ThreadPoolExecutor(max(1, min(CONCURRENCY, len(fetch)))) as pool:
        for i, data in zip(fetch, pool.map(download, fetch)):
            if isinstance(data, URLError):
                out[i] = (None, Unreadable(urls[i], str(data)))
                continue
            key = content_key(data)
            keep = held + len(data) <= HOLD_BYTES
            held += len(data) if keep else 0
            out[i] = (key, named_bytes(data, urls[i]) if keep else None)
            if isinstance(versions[i], str):
                fresh.append((urls[i], versions[i], key))
    cache.remember_urls(fresh)
    return out
