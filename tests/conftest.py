"""Shared fixtures: tiny images on disk, tiny models, fixed seeds. Nothing here downloads."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

SMALL = {"input_size": 32, "resize_size": 36}


@pytest.fixture(autouse=True, scope="session")
def _no_network():
    """Tests never download: any connection to a non-loopback address fails at once."""
    import socket

    real_connect = socket.socket.connect

    def guarded(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and not (host.startswith("127.") or host in ("localhost", "::1") or host.startswith("/")):
            raise OSError(f"featx tests must not use the network (tried to connect to {address!r})")
        return real_connect(self, address)

    socket.socket.connect = guarded
    yield
    socket.socket.connect = real_connect


@pytest.fixture(autouse=True)
def _private_cache_dir(tmp_path_factory, monkeypatch):
    """featx's default directory (ONNX graphs, measured schedules) is a fresh one per test, never the user's;
    a test or module that chose its own keeps it."""
    import os

    if "FEATX_CACHE_DIR" not in os.environ:
        monkeypatch.setenv("FEATX_CACHE_DIR", str(tmp_path_factory.mktemp("featx-default-cache")))


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture
def computed(monkeypatch):
    """``computed[0]``: images pushed through a backbone (by any extractor) while the test runs."""
    import threading

    from featx._runtime.runner import Runner

    count, lock, original = [0], threading.Lock(), Runner.forward

    def forward(self, batch):
        with lock:
            count[0] += batch.shape[0]
        return original(self, batch)

    monkeypatch.setattr(Runner, "forward", forward)
    return count


def capture_matrix(ext, x: torch.Tensor) -> torch.Tensor:
    """The requested fields of a fitted extractor's capture on a normalised batch, side by side: ``(N, D)``."""
    cap = ext._runner.capture
    cols = [r[p] for r, ps in zip(cap.run(x), cap.parts) for p in ps]
    return torch.cat(cols, dim=1) if len(cols) > 1 else cols[0]


class TinyCNN(nn.Module):
    """A small classifier-shaped CNN: stem, two stages, global pool, linear head."""

    def __init__(self, n_classes: int = 5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.stage1 = nn.Sequential(nn.Conv2d(8, 12, 3, stride=2, padding=1), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(12, 16, 3, stride=2, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(16, n_classes)

    def forward(self, x):
        return self.fc(self.flatten(self.pool(self.stage2(self.stage1(self.stem(x))))))


class CrashOnce(TinyCNN):
    """TinyCNN whose process dies the first time it sees a real batch (a worker killed mid-job).

    The first crash leaves ``marker`` behind, so the retried batch succeeds.
    """

    def __init__(self, marker: str):
        super().__init__()
        self.marker = marker

    def forward(self, x):
        import os

        if x.shape[0] > 1 and not os.path.exists(self.marker):
            with open(self.marker, "w") as f:
                f.write(str(os.getpid()))
            os._exit(1)
        return super().forward(x)


class CountingCNN(TinyCNN):
    """TinyCNN that appends each batch's size to the file ``log``: forward passes counted across processes.

    The one-image shape probe (run when an extractor is built or unpickled) is
    not logged: featx pads every real batch to its ``batch_size`` (use > 1).
    """

    def __init__(self, log: str):
        super().__init__()
        self.log = log

    def forward(self, x):
        if x.shape[0] > 1:
            with open(self.log, "a") as f:
                f.write(f"{x.shape[0]}\n")
        return super().forward(x)


@pytest.fixture
def tiny_cnn():
    torch.manual_seed(0)
    m = TinyCNN()
    # non-trivial batch-norm statistics, so a lost buffer would show
    m.stem[1].running_mean.uniform_(-0.5, 0.5)
    m.stem[1].running_var.uniform_(0.5, 2.0)
    return m


def make_image(rng: np.random.Generator, label: int, size=(40, 52)) -> np.ndarray:
    """An RGB uint8 image whose dominant colour depends on ``label``."""
    h, w = size
    img = rng.integers(0, 90, (h, w, 3)).astype(np.int16)
    img[..., label % 3] += 150
    yy, xx = np.mgrid[0:h, 0:w]
    img[(yy // 6 + xx // 6 + label) % 2 == 0] += 15
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """root/<class>/<i>.jpg|png: 3 classes x 8 images of assorted sizes."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for label, name in enumerate(["cat", "dog", "fox"]):
        d = root / name
        d.mkdir()
        for i in range(8):
            size = (36 + 4 * (i % 3), 44 + 6 * (i % 4))
            arr = make_image(rng, label, size)
            ext = "png" if i % 4 == 3 else "jpg"
            Image.fromarray(arr).save(d / f"{i:02d}.{ext}", quality=92)
    return root


@pytest.fixture(scope="session")
def image_paths(image_folder):
    from featx import load_image_folder

    paths, y, _ = load_image_folder(image_folder)
    return paths, y


@pytest.fixture(autouse=True)
def _no_background_compilation(monkeypatch):
    """``backend="auto"`` compiles a graph once 30 s of eager work went into it; in the suite, whose runs are tiny
    but many, that would start compilations at random points. Tests of the rule set FEATX_COMPILE_AFTER_S
    themselves (``backend="torch.compile"`` compiles after the first run whatever it says)."""
    import os

    if "FEATX_COMPILE_AFTER_S" not in os.environ:
        monkeypatch.setenv("FEATX_COMPILE_AFTER_S", "inf")
