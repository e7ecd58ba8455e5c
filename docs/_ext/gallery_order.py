"""The gallery's order within each group: the list below first (Quickstart leads), then by file name."""

from __future__ import annotations

import os

FIRST = ["quickstart.py", "choose_layer.py", "pretrained_vs_random.py", "grid_search_classifiers.py",
         "feature_union.py", "column_transformer.py", "custom_module.py", "embedding_projection.py",
         "cache_speedup.py"]


class ExampleOrder:
    """A sphinx-gallery ``within_subsection_order`` key (called with each example's file name)."""

    def __init__(self, src_dir: str):
        self.src_dir = src_dir

    def __call__(self, filename: str) -> tuple[int, str]:
        name = os.path.basename(filename)
        return (FIRST.index(name) if name in FIRST else len(FIRST), name)

    def __repr__(self) -> str:
        return f"<{type(self).__name__}>"
