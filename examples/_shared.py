"""Shared by the examples: a small real labelled image set that needs no download, and one cache.

scikit-learn's fits in the examples run on one BLAS thread: on a few hundred
samples a multi-threaded BLAS is many times slower than one thread when the
cores are busy (the docs build runs the examples while other work may share
the machine). When the gallery runs them all in one process, they share the
demo images and one embedding cache, so each image is embedded once for the
whole gallery.
"""

import atexit
import shutil
import tempfile

from threadpoolctl import threadpool_limits

from featx import load_image_folder, make_demo_folder

BLAS_THREADS = 1
threadpool_limits(limits=BLAS_THREADS, user_api="blas")  # for the whole example (and the gallery's process)

_SHARED: dict = {}


def scratch_dir(prefix: str = "featx-example-") -> str:
    """A temporary folder removed when the process ends (data and caches leave nothing behind)."""
    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def shared_cache() -> str:
    """The embedding cache of this process: one per example run alone, one for the whole gallery build."""
    if "cache" not in _SHARED:
        _SHARED["cache"] = scratch_dir("featx-example-cache-")
    return _SHARED["cache"]


def demo_folder(n_per_class: int = 10) -> str:
    """A folder of patches cut from scikit-image's bundled photographs, one sub-folder per class (made once per
    process)."""
    print(f"(scikit-learn fits here use {BLAS_THREADS} BLAS thread)")
    if n_per_class not in _SHARED:
        _SHARED[n_per_class] = str(make_demo_folder(scratch_dir(), n_per_class=n_per_class))
    return _SHARED[n_per_class]


def demo_data(n_per_class: int = 10):
    """(paths, y, class_names) of the demo folder's images."""
    return load_image_folder(demo_folder(n_per_class))
