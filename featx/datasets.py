"""Image folders as (paths, labels) for scikit-learn."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = ["load_image_folder", "make_demo_folder", "IMAGE_EXTENSIONS", "DEMO_SOURCES"]

#: File extensions :func:`load_image_folder` treats as images (case-insensitive).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".avif", ".heic", ".heif")


def find_images(folder: str | os.PathLike) -> list[str]:
    """The image files under ``folder`` (recursively; hidden files and folders skipped), sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [os.path.join(dirpath, f) for f in filenames
                  if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found)


def load_image_folder(root: str | os.PathLike) -> tuple[list[str], np.ndarray, list[str]]:
    """Read a folder-per-class layout: ``root/<class>/**/<image>``.

    Parameters
    ----------
    root : str or PathLike
        A folder whose sub-folders are the classes. Images are found
        recursively inside each class folder; files whose extension is not in
        ``featx.datasets.IMAGE_EXTENSIONS`` and hidden files are ignored.

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
    found = [find_images(root / name) for name in class_names]
    paths = [p for f in found for p in f]
    labels = [label for label, f in enumerate(found) for _ in f]
    empty = [name for name, f in zip(class_names, found) if not f]
    if empty:
        raise ValueError(
            f"load_image_folder: class folder(s) {empty} under {str(root)!r} contain no images "
            f"(extensions {', '.join(IMAGE_EXTENSIONS)})."
        )
    return paths, np.asarray(labels, dtype=np.int64), class_names


#: scikit-image images used by :func:`make_demo_folder`, one class each: four
#: colour photographs and four grayscale ones (three textures and a street
#: scene), so that colour alone cannot tell the classes apart.
DEMO_SOURCES = ("astronaut", "chelsea", "coffee", "rocket", "brick", "grass", "gravel", "camera")


def make_demo_folder(
    root: str | os.PathLike, *, n_per_class: int = 20, size: int = 64, seed: int = 0
) -> Path:
    """Write a small real image set, folder-per-class, that needs no download.

    Each class is one image bundled with scikit-image: four colour
    photographs (astronaut, cat, coffee cup, rocket launch) and four grayscale
    ones (brick wall, grass, gravel, a photographer in a park); its images
    are random ``size`` x ``size`` patches of it, randomly flipped. Telling the
    sources apart from small patches is a texture and scene task where
    pretrained features clearly beat random ones and raw pixels.

    Parameters
    ----------
    root : str or PathLike
        Folder to write ``root/<class>/<i>.jpg`` into (created if needed).
    n_per_class : int, default=20
        Patches per class.
    size : int, default=64
        Patch side in pixels.
    seed : int, default=0
        Seed of the patch positions.

    Returns
    -------
    root : Path
        The folder, with one sub-folder of images per class.

    Examples
    --------
    >>> import tempfile
    >>> from featx.datasets import make_demo_folder, load_image_folder
    >>> root = make_demo_folder(tempfile.mkdtemp(), n_per_class=2)
    >>> paths, y, names = load_image_folder(root)
    >>> len(paths), names[:3]
    (16, ['astronaut', 'brick', 'camera'])
    """
    try:
        from skimage import data
    except ImportError as exc:
        raise ImportError(
            "make_demo_folder needs scikit-image for its bundled photographs: pip install 'featx[demo]'"
        ) from exc
    return write_patches(root, {name: np.asarray(getattr(data, name)()) for name in DEMO_SOURCES},
                         n_per_class=n_per_class, size=size, seed=seed)


def write_patches(root: str | os.PathLike, sources: dict, *, n_per_class: int, size: int, seed: int = 0) -> Path:
    """Folder-per-class JPEGs of random ``size`` px patches (randomly flipped) of each source image.

    ``sources`` maps a class name to an image array (H x W or H x W x C, uint8).
    """
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    for name, img in sources.items():
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        img = img[..., :3].astype(np.uint8)
        h, w = img.shape[:2]
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            y0 = int(rng.integers(0, h - size + 1))
            x0 = int(rng.integers(0, w - size + 1))
            patch = img[y0:y0 + size, x0:x0 + size]
            if rng.random() < 0.5:
                patch = patch[:, ::-1]
            Image.fromarray(np.ascontiguousarray(patch)).save(folder / f"{i:03d}.jpg", quality=90)
    return root
