"""The engine: settling (:mod:`.settle`, the one place that decides device, precision, backend, batch
size, schedule and cache), the process-wide settings (:mod:`.process`), shared frozen networks
(:mod:`.network`), inference backends (:mod:`.engines`), decoding schedules (:mod:`.loading`,
:mod:`.schedule`) and the runner (:mod:`.runner`).

The estimators use what this package exports and nothing inside it.
"""

from .runner import RunStats
from .settling import Settled, settle

__all__ = ["RunStats", "Settled", "settle"]
