"""Batches of decoded images, produced off the critical path.

Three ways, chosen by the runner:

- worker processes (a torch ``DataLoader``): for GPUs, where the CPU cores
  are free to decode while the device computes;
- one prefetch thread: for CPU inference, where the model already uses every
  core. Pillow's decoders and torchvision's resize release the GIL, so the
  thread decodes the next batch in the gaps of the model's own threads
  (single-threaded layers, Python glue) without the cost of starting
  processes and moving tensors between them;
- inline, for inputs of a batch or two.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterator

import torch

__all__ = ["THREAD", "PARALLEL", "batches"]

#: ``workers`` value that asks for the prefetch thread.
THREAD = -1
#: ``workers`` value that asks for decoding each batch on all cores, between forward passes.
PARALLEL = -2


def batches(dataset: torch.utils.data.Dataset, batch_size: int, workers: int, collate: Callable,
            pin_memory: bool = False, depth: int = 2) -> Iterator:
    """Iterate over ``collate``-d batches of ``dataset`` in order."""
    if workers == THREAD:
        return _threaded(dataset, batch_size, collate, depth)
    if workers == PARALLEL:
        return _parallel(dataset, batch_size, collate)
    return iter(torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate,
        pin_memory=pin_memory, prefetch_factor=4 if workers else None,
    ))


def _threaded(dataset, batch_size: int, collate: Callable, depth: int) -> Iterator:
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for start in range(0, len(dataset), batch_size):
                if stop.is_set():
                    return
                item = collate([dataset[k] for k in range(start, min(start + batch_size, len(dataset)))])
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as exc:  # handed to the consumer, re-raised there
            q.put(exc)
            return
        q.put(done)

    thread = threading.Thread(target=produce, name="featx-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


def _parallel(dataset, batch_size: int, collate: Callable) -> Iterator:
    """Decode each batch with one thread per core, then hand it over: the model and
    the decoders take turns on all cores instead of fighting over them."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    threads = max(1, min(batch_size, os.cpu_count() or 1))
    with ThreadPoolExecutor(threads, thread_name_prefix="featx-decode") as pool:
        for start in range(0, len(dataset), batch_size):
            yield collate(list(pool.map(dataset.__getitem__, range(start, min(start + batch_size, len(dataset))))))
