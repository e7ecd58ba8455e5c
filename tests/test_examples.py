"""Every example runs offline, end to end, in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _env(tmp_path):
    return dict(os.environ, FEATX_CACHE_DIR=str(tmp_path / "cache"))


def test_quickstart_runs_and_learns(tmp_path):
    res = subprocess.run([sys.executable, str(EXAMPLES / "quickstart.py")], capture_output=True, text=True, timeout=600, env=_env(tmp_path))
    assert res.returncode == 0, res.stderr
    line = [l for l in res.stdout.splitlines() if "cross-validated accuracy" in l][0]
    acc = float(line.split("accuracy ")[1].split()[0])
    assert acc > 0.5, res.stdout  # six classes: chance is 0.167


def test_quickstart_on_a_users_folder(image_folder, tmp_path):
    res = subprocess.run([sys.executable, str(EXAMPLES / "quickstart.py"), str(image_folder)], capture_output=True, text=True, timeout=600, env=_env(tmp_path))
    assert res.returncode == 0, res.stderr
    assert "24 images, 3 classes: cat, dog, fox" in res.stdout


@pytest.mark.parametrize("n", [1, 3])
def test_make_demo_folder(tmp_path, n):
    from featx import load_image_folder, make_demo_folder

    paths, y, names = load_image_folder(make_demo_folder(tmp_path, n_per_class=n, size=32))
    assert len(paths) == 6 * n and len(names) == 6
