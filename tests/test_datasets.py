"""load_image_folder."""

from __future__ import annotations

import pytest
from PIL import Image

from featx import load_image_folder


def test_folder_per_class(image_folder):
    paths, y, names = load_image_folder(image_folder)
    assert names == ["cat", "dog", "fox"]
    assert len(paths) == 24 and y.tolist() == [0] * 8 + [1] * 8 + [2] * 8
    assert all(p.endswith((".jpg", ".png")) for p in paths)
    assert paths == sorted(paths)


def test_recursive_ignores_non_images_and_hidden(tmp_path):
    (tmp_path / "b" / "sub").mkdir(parents=True)
    (tmp_path / "a").mkdir()
    (tmp_path / ".hidden").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "a" / "x.JPG")
    Image.new("RGB", (4, 4)).save(tmp_path / "b" / "sub" / "y.png")
    (tmp_path / "b" / "notes.txt").write_text("hi")
    (tmp_path / "b" / ".z.jpg").write_text("hidden")
    paths, y, names = load_image_folder(tmp_path)
    assert names == ["a", "b"] and y.tolist() == [0, 1]
    assert paths[1].endswith("sub/y.png")


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        load_image_folder(tmp_path / "nope")
    with pytest.raises(ValueError, match="no sub-folders"):
        load_image_folder(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"\['empty'\].*contain no images"):
        load_image_folder(tmp_path)
