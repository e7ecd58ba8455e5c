"""Every example runs offline, end to end, in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _env(tmp_path):
    return dict(os.environ, FEATX_CACHE_DIR=str(tmp_path / "cache"), MPLBACKEND="Agg")


def test_quickstart_runs_and_learns(tmp_path):
    res = subprocess.run([sys.executable, str(EXAMPLES / "basics" / "quickstart.py")], capture_output=True, text=True, timeout=600, env=_env(tmp_path))
    assert res.returncode == 0, res.stderr
    line = [l for l in res.stdout.splitlines() if "cross-validated accuracy" in l][0]
    acc = float(line.split("accuracy ")[1].split()[0])
    assert acc > 0.5, res.stdout  # eight classes: chance is 0.125


def test_quickstart_on_a_users_folder(image_folder, tmp_path):
    res = subprocess.run([sys.executable, str(EXAMPLES / "basics" / "quickstart.py"), str(image_folder)], capture_output=True, text=True, timeout=600, env=_env(tmp_path))
    assert res.returncode == 0, res.stderr
    assert "24 images, 3 classes: cat, dog, fox" in res.stdout


@pytest.mark.parametrize("n", [1, 3])
def test_make_demo_folder(tmp_path, n):
    from featx import load_image_folder, make_demo_folder

    paths, y, names = load_image_folder(make_demo_folder(tmp_path, n_per_class=n, size=32))
    assert len(paths) == 8 * n and len(names) == 8


@pytest.mark.parametrize(
    "script,expect",
    [
        ("pipelines/grid_search_classifiers.py", "best: "),
        ("basics/choose_layer.py", "expected on new images: "),
        ("basics/pretrained_vs_random.py", "raw pixels"),
        ("beyond/custom_module.py", "SmallNet (random weights)"),
        ("pipelines/feature_union.py", "texture__stage4_gem_0"),
        ("pipelines/column_transformer.py", "image + tabular columns"),
        ("beyond/embedding_projection.py", "80 images x 1280 features"),
        ("beyond/cache_speedup.py", "warm, other layer"),
    ],
)
def test_example_runs(script, expect, tmp_path):
    name = Path(script).name
    args = [sys.executable, str(EXAMPLES / script)] + ([str(tmp_path / "plot.png")] if name == "choose_layer.py" else [])
    res = subprocess.run(args, capture_output=True, text=True, timeout=600, env=_env(tmp_path), cwd=tmp_path)
    assert "BLAS thread" in res.stdout  # each example says how many BLAS threads its fits use
    assert res.returncode == 0, res.stderr
    assert expect in res.stdout
    if name == "choose_layer.py":
        assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if name == "pretrained_vs_random.py":
        acc = {line.split()[0]: float(line.split("accuracy ")[1].split()[0]) for line in res.stdout.splitlines()
               if "accuracy " in line}
        assert acc["pretrained"] > acc["random-init"] + 0.1
