"""Batches of decoded images, produced off the critical path.

Three ways, chosen by the runner:

- worker processes (a torch ``DataLoader``): for GPUs, where the CPU cores
  are free to decode while the device computes;
- parallel decoding (``PARALLEL``): for CPU inference with one all-core
  stream, groups of batches are decoded by one thread per core between
  forward passes (Pillow's and torchvision's decoders release the GIL);
- inline, for inputs of a batch or two.

:func:`ordered_streams` is the fourth design, for CPU inference with
several single-threaded streams: each stream decodes *and* computes its own
batches, so no core waits for another and decoding overlaps computing.
"""

from __future__ import annotations

import itertools
import os
import threading
from typing import Any, Callable, Iterator, TypeVar

import torch

__all__ = ["PARALLEL", "batches", "engine_threads", "loader_workers", "ordered_streams", "show_progress"]

#: ``workers`` value that asks for decoding on all cores, between forward passes.
PARALLEL = -2

#: Most images the parallel design decodes per group (see :func:`_parallel`).
DECODE_GROUP_IMAGES = 128

#: Most bytes of decoded, resized images per group (bounds memory for large inputs and TTA views).
DECODE_GROUP_BYTES = 64 << 20

T = TypeVar("T")


def loader_workers(n: int, batch_size: int, num_workers: Any, device: torch.device, gpu_decode: bool) -> int:
    """How ``n`` images are decoded: a number of DataLoader worker processes, 0 (inline) or :data:`PARALLEL`.

    The one worker policy of featx: ``num_workers`` (an int) as given;
    ``"auto"``: on CUDA, inline for less than two batches, else up to 8
    worker processes (the CPU decodes while the GPU computes); on the CPU,
    inline for one image, else groups of batches decoded by one thread per
    core between forward passes (the model already uses every core; decoders
    running beside it slow it down more than they save). A single batch is
    decoded on every core too: a batch of phone photos decoded on one core
    left the others idle, slower than the same images in two single-threaded streams.
    Decoding on the GPU happens in this process (CUDA does not survive fork).
    """
    if gpu_decode:
        return 0
    if num_workers != "auto":
        return int(num_workers)
    if device.type == "cuda":
        return 0 if n < 2 * batch_size else max(1, min(8, (os.cpu_count() or 1) - 1))
    return PARALLEL if n > 1 and _cores() > 1 else 0


def show_progress(progress: bool | None) -> bool:
    """The ``progress`` parameter resolved: None shows a bar when stderr is a terminal."""
    import sys

    return bool(progress) if progress is not None else sys.stderr.isatty()


def engine_threads(num_workers: Any) -> int:
    """Intra-op threads for a backend that takes a count (ONNX Runtime): the cores the decoders leave."""
    workers = int(num_workers) if num_workers != "auto" else 0
    return max(1, (os.cpu_count() or 1) - workers)


def batches(dataset: torch.utils.data.Dataset, batch_size: int, workers: int, collate: Callable,
            pin_memory: bool = False) -> Iterator:
    """Iterate over ``collate``-d batches of ``dataset`` in order."""
    if workers == PARALLEL:
        return _parallel(dataset, batch_size, collate)
    return iter(torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate,
        pin_memory=pin_memory, prefetch_factor=4 if workers else None,
    ))


def _parallel(dataset, batch_size: int, collate: Callable) -> Iterator:
    """Decode on every core between forward passes, in groups of batches, and hand the batches over.

    The first batch is decoded alone; its images' size sets how many are
    decoded per group after it (:data:`DECODE_GROUP_IMAGES`, at most
    :data:`DECODE_GROUP_BYTES`). Groups, not single batches, because a decoder
    thread handed a few images starts late: waking it takes a millisecond or
    more (on a VM an idle core is slow to wake, and right after a forward pass
    the model's OpenMP threads still spin on the other cores), so small
    hand-overs decode no faster than one core (measured: see the
    Performance page of the docs). The calling thread decodes too, pulling
    the next image from a shared counter, so it never waits for a helper
    that has not started.
    """
    from concurrent.futures import ThreadPoolExecutor

    n = len(dataset)
    helpers = _cores() - 1
    with ThreadPoolExecutor(max(1, helpers), thread_name_prefix="featx-decode") as pool:
        start, group = 0, batch_size
        while start < n:
            stop = min(start + group, n)
            items = _decode_range(dataset, start, stop, pool, helpers)
            if start == 0:
                group = decode_group(batch_size, _largest_item(items))
            start = stop
            for k in range(0, len(items), batch_size):
                yield collate(items[k:k + batch_size])


def decode_group(batch_size: int, item_bytes: int) -> int:
    """Images decoded per group by the parallel design: whole batches, up to
    :data:`DECODE_GROUP_IMAGES` images and :data:`DECODE_GROUP_BYTES` bytes (at least one batch)."""
    fit = min(DECODE_GROUP_IMAGES, DECODE_GROUP_BYTES // max(1, item_bytes))
    return batch_size * max(1, fit // batch_size)


def _cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS says, else the machine's)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _largest_item(items: list) -> int:
    """Bytes of the largest tensor among decoded dataset items (tuples of which one part is the image)."""
    sizes = [part.element_size() * part.nelement() for item in items
             for part in (item if isinstance(item, tuple) else (item,)) if isinstance(part, torch.Tensor)]
    return max(sizes, default=0)


def _decode_range(dataset, start: int, stop: int, pool, helpers: int) -> list:
    """``[dataset[i] for i in range(start, stop)]``, computed by this thread and ``helpers`` pool threads.

    An exception in any of them stops the others after their current item and is raised here.
    """
    from concurrent.futures import wait

    out: list = [None] * (stop - start)
    counter = itertools.count(start)  # next() on it is atomic under the GIL
    halt = threading.Event()

    def work() -> None:
        try:
            while not halt.is_set() and (i := next(counter)) < stop:
                out[i - start] = dataset[i]
        except BaseException:
            halt.set()  # the other threads stop after their current item
            raise

    futures = [pool.submit(work) for _ in range(min(helpers, stop - start - 1))]
    try:
        work()
    finally:
        wait(futures)
    for f in futures:
        f.result()
    return out


def ordered_streams(n_jobs: int, job: Callable[[int], T], streams: int, ahead: int = 2) -> Iterator[T]:
    """``job(0), job(1), ...`` computed by ``streams`` threads with one torch thread each, yielded in order.

    Each thread takes the next job number as soon as it is free, under
    ``torch.inference_mode()``; at most ``ahead`` jobs per stream are done
    but not yet consumed, so memory stays bounded when the consumer is slow.
    An exception in a job is raised here, at that job's turn; stopping early
    (an exception in the consumer, or closing the generator) lets the
    running jobs finish and starts no new ones. The process's torch thread
    count is restored afterwards (``torch.set_num_threads`` is per thread for
    the running threads, but also sets the default for threads created meanwhile).
    """
    saved = torch.get_num_threads()
    counter = itertools.count()
    lock = threading.Condition()
    done: dict[int, tuple[bool, object]] = {}
    room = threading.Semaphore(max(1, streams * ahead))
    stop = threading.Event()

    def worker() -> None:
        torch.set_num_threads(1)
        with torch.inference_mode():
            while True:
                room.acquire()
                k = next(counter)
                if stop.is_set() or k >= n_jobs:
                    room.release()
                    return
                try:
                    result = (True, job(k))
                except BaseException as exc:  # handed to the consumer, raised there in order
                    result = (False, exc)
                with lock:
                    done[k] = result
                    lock.notify_all()

    threads = [threading.Thread(target=worker, name=f"featx-stream-{i}", daemon=True)
               for i in range(min(streams, n_jobs))]
    for t in threads:
        t.start()
    try:
        for k in range(n_jobs):
            with lock:
                while k not in done:
                    lock.wait()
                ok, value = done.pop(k)
            room.release()
            if not ok:
                raise value  # type: ignore[misc]
            yield value  # type: ignore[misc]
    finally:
        stop.set()
        for _ in threads:
            room.release()  # wake threads waiting for room, so they see ``stop``
        for t in threads:
            t.join()
        torch.set_num_threads(saved)
