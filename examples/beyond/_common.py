"""The examples' shared helpers (``examples/_shared.py``), importable from this folder's scripts."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _shared import BLAS_THREADS, demo_data, demo_folder, scratch_dir, shared_cache  # noqa: E402,F401
