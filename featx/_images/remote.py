"""Images at fsspec URLs: ``s3://``, ``gs://``, ``az://``, ``https://``, ``zip://member::archive.zip``, ...

A string item with a URL scheme (``scheme://``) is read through fsspec
(``file://`` URLs are turned into local paths and read as files). Reads are
bounded in time: :func:`read_timeout_s` seconds per call
(``FEATX_READ_TIMEOUT``, default 30), retries included, and a server that
times out once is not asked again by this process for :data:`COOLDOWN`
seconds, so a frozen server costs one timeout per run, not one per image.
Errors name the cause (``not found``, ``permission denied``, ``timed out``)
and, for a missing driver, the package to install.

For the embedding cache, :func:`url_versions` reads each URL's metadata
(ETag, size, modification time: a HEAD request, no image bytes) so that a
cached URL whose version is unchanged is served without a download, as a
local file is by its size and modification time.
"""

from __future__ import annotations

import math
import os
import re
import threading
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

from .._options import FSSPEC_DRIVERS

__all__ = ["COOLDOWN", "URLError", "Unreadable", "is_url", "local_path", "read_timeout_s", "read_url",
           "url_versions"]

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
#: Seconds a server that timed out is not asked again (by this process).
COOLDOWN = 300.0
#: Metadata requests in flight at once (per run).
CONCURRENCY = 16

_down: dict[str, float] = {}  # server -> when it last timed out (monotonic)
_down_lock = threading.Lock()


class URLError(Exception):
    """A URL that cannot be read; the message is the reason (the caller names the URL)."""


class Unreadable:
    """Stands in for a URL whose read already failed (while keying it for the cache): the loader reports the
    reason without asking the server again."""

    def __init__(self, url: str, reason: str):
        self.url, self.reason = url, reason

    def __reduce__(self):
        return (Unreadable, (self.url, self.reason))


def is_url(item: Any) -> bool:
    """Whether ``item`` is a string with a URL scheme (``s3://...``, ``https://...``, ``zip://...::...``)."""
    return isinstance(item, str) and bool(_SCHEME.match(item))


def local_path(item: str) -> str | None:
    """The local path of a ``file://`` URL (None for any other URL)."""
    if not item.lower().startswith("file://") or "::" in item:
        return None
    parsed = urllib.parse.urlparse(item)
    return urllib.request.url2pathname(parsed.path) if parsed.netloc in ("", "localhost") else None


def read_timeout_s() -> float:
    """``FEATX_READ_TIMEOUT``: seconds one URL read (or metadata request) may take, retries included."""
    raw = os.environ.get("FEATX_READ_TIMEOUT", "30")
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not value > 0 or math.isinf(value):
        raise ValueError(f"FEATX_READ_TIMEOUT={raw!r} is invalid: give a number of seconds greater than 0 (default 30).")
    return value


def _server(url: str) -> str:
    """What a timeout is remembered by: the protocol and host (a bucket, a web server), or the archive."""
    head = url.split("::")[-1] if "::" in url else url
    parsed = urllib.parse.urlparse(head)
    return f"{parsed.scheme}://{parsed.netloc}"


def _filesystem(url: str):
    protocol = url.split("://", 1)[0].lower()
    try:
        import fsspec
    except ImportError:
        raise URLError("reading URLs needs fsspec (pip install 'featx[http]', or 'featx[s3]' for s3://)") from None
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as exc:
        driver = FSSPEC_DRIVERS.get(protocol)
        need = f"{driver[0]} (pip install '{driver[1]}')" if driver else f"the fsspec driver for {protocol}://"
        raise URLError(f"reading {protocol}:// URLs needs {need}") from exc
    except ValueError as exc:  # "Protocol not known"
        raise URLError(f"{protocol}:// is not a protocol fsspec knows ({exc})") from exc


def _call(url: str, method: str, timeout: float):
    """``fs.<method>(path)`` bounded by ``timeout`` (async drivers take fsspec's ``timeout=``)."""
    server = _server(url)
    with _down_lock:
        since = _down.get(server)
    if since is not None and time.monotonic() - since < COOLDOWN:
        raise URLError(f"timed out (its server, {server}, did not answer within {timeout:g} s earlier in this run)")
    fs, path = _filesystem(url)
    kwargs = {"timeout": timeout} if getattr(fs, "async_impl", False) else {}
    try:
        return getattr(fs, method)(path, **kwargs)
    except FileNotFoundError:
        raise URLError("not found") from None
    except PermissionError:
        raise URLError("permission denied") from None
    except Exception as exc:  # noqa: BLE001 - sorted into the causes a user can act on
        if _is_timeout(exc):
            with _down_lock:
                _down[server] = time.monotonic()
            raise URLError(f"timed out after {timeout:g} s (FEATX_READ_TIMEOUT)") from None
        if _status(exc) in (401, 403):
            raise URLError("permission denied") from None
        if _status(exc) == 404:
            raise URLError("not found") from None
        raise URLError(f"cannot be read ({type(exc).__name__}: {str(exc)[:200]})") from None


def _is_timeout(exc: BaseException) -> bool:
    import asyncio

    from fsspec.exceptions import FSTimeoutError

    return isinstance(exc, (FSTimeoutError, TimeoutError, asyncio.TimeoutError)) or "timeout" in type(exc).__name__.lower()


def _status(exc: BaseException) -> int | None:
    status = getattr(exc, "status", None) or getattr(exc, "code", None)
    return status if isinstance(status, int) else None


def read_url(url: str) -> bytes:
    """The bytes at ``url``; :class:`URLError` naming the cause when they cannot be read."""
    return bytes(_call(url, "cat_file", read_timeout_s()))


def url_versions(urls: Sequence[str]) -> list[str | URLError | None]:
    """Each URL's version from its metadata (ETag, size, modification time), without reading its bytes.

    None where the store gives nothing to tell versions apart by (the bytes
    must then be read to key it); a :class:`URLError` where the metadata
    cannot be read (not for "not found": fsspec's HTTP metadata says so
    for a refusal too, so the read that follows names the cause). The first URL of each server is asked alone: a frozen
    server then costs one timeout, not one per request in flight.
    """
    timeout = read_timeout_s()
    out: list[str | URLError | None] = [None] * len(urls)
    first: dict[str, int] = {}
    for i, u in enumerate(urls):
        first.setdefault(_server(u), i)

    def version(i: int) -> None:
        try:
            out[i] = _version(_call(urls[i], "info", timeout))
        except URLError as exc:
            # fsspec's HTTP info() says "not found" for any refusal (403 too): the read says which
            out[i] = None if str(exc) == "not found" else exc

    for i in first.values():
        version(i)
    rest = [i for i in range(len(urls)) if i not in set(first.values())]
    if rest:
        with ThreadPoolExecutor(min(CONCURRENCY, len(rest))) as pool:
            list(pool.map(version, rest))
    return out


def _version(info: dict) -> str | None:
    tag = info.get("ETag") or info.get("etag") or info.get("md5") or info.get("Content-MD5") or info.get("Digest")
    modified = info.get("LastModified") or info.get("Last-Modified") or info.get("mtime") or info.get("last_modified")
    if tag is None and modified is None:
        return None
    return f"{tag}|{info.get('size')}|{modified}"
