"""Output files written whole or not at all, checked before any image is computed, with names as data.

Every file featx writes for a user (``transform_to_npy``, the command line's
``.npy``/``.npz``/``.csv``/``.parquet`` and ``.paths.txt``, reports) goes
through :func:`written`: it is written under a temporary name beside its
destination (``.NAME.XXXX.partial.EXT``, so a crash leaves nothing that looks
complete) and renamed onto it only when whole. :func:`reserve` claims a
memory-mapped file's blocks before anything is computed, so a full disk is
an :class:`~featx.OutputError` naming the space needed, never a SIGBUS.
:func:`check_writable` tries the folder first, so a read-only or impossible
destination fails before the first forward pass.

Names are data: :func:`path_line` writes one path per line, verbatim when it
is plain text, and as a JSON string (a line starting with ``"``) when it
holds a line break, starts with a quote or has bytes that are not UTF-8
(kept as ``\\udcXX`` escapes, which ``os.fsencode`` turns back into the
bytes); :func:`read_path_lines` reads either.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from ._exceptions import OutputError

__all__ = ["check_writable", "written", "save_figure", "reserve", "npy_memmap", "path_line", "read_path_lines"]

_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG}


def _describe(exc: OSError) -> str:
    return exc.strerror or str(exc)


def check_writable(path: str | os.PathLike) -> Path:
    """Make sure a file can be created at ``path`` (its folder created if needed); return it as a Path."""
    path = Path(path)
    parent = path.parent
    if path.is_dir():
        raise OutputError(f"output {str(path)!r} is a folder; give a file name inside it.")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot write {str(path)!r}: its folder {str(parent)!r} cannot be created "
                          f"({_describe(exc)}). Choose another output path.") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".check", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"cannot write {str(path)!r}: {_describe(exc)} in {str(parent)!r}. Choose another output "
                          "path, or make the folder writable.") from None
    return path


@contextlib.contextmanager
def written(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``: renamed onto ``path`` when the block ends, removed if it fails.

    The temporary name keeps the destination's extension (``np.save`` and
    pandas choose formats by it). A full disk raises :class:`OutputError`
    naming the file.
    """
    path = check_writable(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".partial{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 is not what the user's umask gives a new file
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OutputError) or exc.errno not in _NO_SPACE:
            raise
        raise OutputError(f"no space left to write {str(path)!r} ({_describe(exc)}); nothing was written. "
                          f"Free space on its disk ({_free(path.parent)} free) or choose another path.") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_figure(fig, path: str | os.PathLike, plt, dpi: int = 110) -> Path:
    """Lay out a matplotlib figure, write it to ``path`` whole or not at all (:func:`written`), close it."""
    fig.tight_layout()
    with written(path) as tmp:
        fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    return Path(path)


def _free(folder: Path) -> str:
    try:
        return _size(shutil.disk_usage(folder).free)
    except OSError:
        return "unknown"


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def reserve(path: Path, nbytes: int, shown: str | os.PathLike | None = None) -> None:
    """Claim ``nbytes`` of disk for ``path`` now (a memory-mapped file's pages then never fault on a full disk)."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as exc:
        if exc.errno in _NO_SPACE:
            raise OutputError(f"not enough space to write {str(shown or path)!r}: it needs {_size(nbytes)}, its "
                              f"disk has {_free(path.parent)} free. Free space or choose another path.") from None
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)):
            raise
        if shutil.disk_usage(path.parent).free < nbytes:  # a file system without fallocate: check at least
            raise OutputError(f"not enough space to write {str(shown or path)!r}: it needs {_size(nbytes)}, its "
                              f"disk has {_free(path.parent)} free.") from None
    except AttributeError:  # no posix_fallocate (macOS, Windows)
        if shutil.disk_usage(path.parent).free < nbytes:
            raise OutputError(f"not enough space to write {str(shown or path)!r}: it needs {_size(nbytes)}, its "
                              f"disk has {_free(path.parent)} free.") from None
    finally:
        os.close(fd)


def npy_memmap(tmp: Path, shape: tuple[int, ...], dtype, shown: str | os.PathLike) -> "np.memmap":
    """A new ``.npy`` at ``tmp`` mapped for writing, its blocks claimed (:class:`OutputError` if they do not fit)."""
    import numpy as np

    need = int(np.prod(shape)) * np.dtype(dtype).itemsize + 128  # + the header (64-byte aligned, short)
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
    except OSError as exc:  # a file-size limit refuses even the sparse file
        if exc.errno not in _NO_SPACE:
            raise
        raise OutputError(f"not enough space to write {str(shown)!r}: it needs {_size(need)} ({_describe(exc)}). "
                          "Free space or choose another path.") from None
    try:
        reserve(tmp, out.offset + out.nbytes, shown=shown)
    except BaseException:
        del out
        raise
    return out


def _plain(p: str) -> bool:
    if "\n" in p or "\r" in p or p.startswith('"'):
        return False
    try:
        p.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def path_line(p: str) -> str:
    """One path as a line of a ``.paths.txt`` listing (with its newline)."""
    return (p if _plain(p) else json.dumps(p)) + "\n"


def read_path_lines(text: str) -> list[str]:
    """The paths of a listing written by :func:`path_line` (a plain list of paths reads as itself)."""
    lines = (line.rstrip("\r") for line in text.split("\n"))  # a plain list written on Windows too
    return [json.loads(line) if line.startswith('"') else line for line in lines if line]
