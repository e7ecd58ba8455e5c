"""Shared by the examples: a small real labelled image set that needs no download."""

import tempfile

from featx import load_image_folder, make_demo_folder


def demo_data(n_per_class: int = 10):
    """(paths, y, class_names) of patches cut from scikit-image's bundled photographs."""
    root = make_demo_folder(tempfile.mkdtemp(prefix="featx-example-"), n_per_class=n_per_class)
    return load_image_folder(root)
