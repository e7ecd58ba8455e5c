"""Real JPEG photos for the benchmarks, made offline from scikit-image's bundled photographs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "brick", "camera")


def make_jpegs(folder: str | Path, n: int, size: tuple[int, int] = (500, 375), seed: int = 0) -> tuple[list[str], list[int]]:
    """Write ``n`` JPEG files of ``size`` (width, height): random crops of real photographs.

    Returns the paths and each image's label (the index of its source photograph).
    """
    from skimage import data

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sources = []
    for name in PHOTOS:
        img = np.asarray(getattr(data, name)())
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        sources.append(Image.fromarray(img[..., :3].astype(np.uint8)))
    rng = np.random.default_rng(seed)
    paths, labels = [], []
    for i in range(n):
        path = folder / f"img_{i:05d}.jpg"
        paths.append(str(path))
        labels.append(i % len(sources))
        if path.exists():
            continue
        src = sources[i % len(sources)]
        w, h = src.size
        cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        img = src.crop((x0, y0, x0 + cw, y0 + ch)).resize(size, Image.BICUBIC)
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        img.save(path, quality=90)
    return paths, labels


def write_results(path: str | Path, results: dict) -> None:
    """Write a benchmark's figures as JSON, so later runs can be compared."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out}")


def machine() -> dict:
    """What every benchmark prints first: CPU model and capability (ISA, native bf16, VNNI, AMX), cores, torch."""
    import platform

    from featx._runtime.device import cpu_capability, describe_cpu

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu_model": model, **cpu_capability(), "line": f"{model}; {describe_cpu()}"}


def make_big_jpegs(folder: str | Path, n: int, size: tuple[int, int] = (4000, 3000)) -> list[str]:
    """``n`` phone-size JPEGs (12 MP by default): the same crops as :func:`make_jpegs`, upscaled."""
    small, _ = make_jpegs(Path(folder) / "src", n)
    out = []
    for i, p in enumerate(small):
        path = Path(folder) / f"big_{i:04d}.jpg"
        if not path.exists():
            Image.open(p).resize(size, Image.BICUBIC).save(path, quality=90)
        out.append(str(path))
    return out
