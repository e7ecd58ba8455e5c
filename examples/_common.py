"""Shared by the examples: a small real labelled image set that needs no download."""

import atexit
import shutil
import tempfile

from featx import load_image_folder, make_demo_folder


def scratch_dir(prefix: str = "featx-example-") -> str:
    """A temporary folder removed when the example ends (data and caches leave nothing behind)."""
    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def demo_data(n_per_class: int = 10):
    """(paths, y, class_names) of patches cut from scikit-image's bundled photographs."""
    root = make_demo_folder(scratch_dir(), n_per_class=n_per_class)
    return load_image_folder(root)
