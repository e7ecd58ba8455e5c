"""Image folders as (paths, labels) for scikit-learn."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = ["load_image_folder", "IMAGE_EXTENSIONS"]

#: File extensions :func:`load_image_folder` treats as images (case-insensitive).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def load_image_folder(root: str | os.PathLike) -> tuple[list[str], np.ndarray, list[str]]:
    """Read a folder-per-class layout: ``root/<class>/**/<image>``.

    Parameters
    ----------
    root : str or PathLike
        A folder whose sub-folders are the classes. Images are found
        recursively inside each class folder; files whose extension is not in
        :data:`IMAGE_EXTENSIONS` and hidden files are ignored.

    Returns
    -------
    paths : list of str
        Image paths, grouped by class and sorted within it.
    y : ndarray of shape (n_images,), dtype int64
        The class index of each image (an index into ``class_names``).
    class_names : list of str
        Sorted class folder names.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> from PIL import Image
    >>> from featx import load_image_folder
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> for cls in ("cats", "dogs"):
    ...     (root / cls).mkdir()
    ...     Image.new("RGB", (8, 8)).save(root / cls / "a.jpg")
    >>> paths, y, class_names = load_image_folder(root)
    >>> y.tolist(), class_names
    ([0, 1], ['cats', 'dogs'])
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"load_image_folder: {str(root)!r} is not a directory.")
    class_names = sorted(
        d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")
    )
    if not class_names:
        raise ValueError(
            f"load_image_folder: {str(root)!r} has no sub-folders; expected one sub-folder per class."
        )
    paths: list[str] = []
    labels: list[int] = []
    empty = []
    for label, name in enumerate(class_names):
        found = []
        for dirpath, dirnames, filenames in os.walk(root / name):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for f in filenames:
                if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS):
                    found.append(os.path.join(dirpath, f))
        if not found:
            empty.append(name)
        found.sort()
        paths.extend(found)
        labels.extend([label] * len(found))
    if empty:
        raise ValueError(
            f"load_image_folder: class folder(s) {empty} under {str(root)!r} contain no images "
            f"(extensions {', '.join(IMAGE_EXTENSIONS)})."
        )
    return paths, np.asarray(labels, dtype=np.int64), class_names
