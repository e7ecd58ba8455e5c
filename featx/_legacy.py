"""Module paths of featx 0.2 that saved extractors name, served from where their classes live now.

featx 0.3 grouped its private modules into subpackages (``featx._runner`` is
``featx._runtime.runner`` now). A pickle names the module of every class in
it (a fitted extractor's ``last_run_`` is a ``featx._runner.RunStats``), so
without these aliases an extractor pickled by 0.2 would not load. Each old
path is a stand-in module that forwards attribute reads to the new one; it is
made only when something imports the old path.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

__all__ = ["MOVED", "install"]

#: featx 0.2 module -> featx 0.3 module.
MOVED = {
    "featx._preprocess": "featx._images.preprocess",
    "featx._backbones": "featx._models.backbones", "featx._weights": "featx._models.weights",
    "featx._hub": "featx._models.hub", "featx._open_clip": "featx._models.open_clip",
    "featx._layers": "featx._models.layers", "featx._pooling": "featx._models.pooling",
    "featx._fold": "featx._models.fold",
    "featx._objstore": "featx._cache.objects",
    "featx._device": "featx._runtime.device", "featx._malloc": "featx._runtime.malloc",
    "featx._schedule": "featx._runtime.schedule", "featx._loading": "featx._runtime.loading",
    "featx._engines": "featx._runtime.engines", "featx._runner": "featx._runtime.runner",
}


class _Forward(importlib.abc.Loader):
    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec):
        return None  # a plain new module

    def exec_module(self, module) -> None:
        target = self.target
        module.__getattr__ = lambda name: getattr(importlib.import_module(target), name)
        module.__doc__ = f"featx 0.2's {module.__name__}: moved to {target}."


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        new = MOVED.get(name)
        return None if new is None else importlib.util.spec_from_loader(name, _Forward(new))


def install() -> None:
    """Serve the old paths in this process (once; ``import featx`` does it)."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.append(_Finder())
