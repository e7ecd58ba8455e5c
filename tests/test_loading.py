"""Batch production (inline, worker processes, parallel decode, CPU streams); results independent of scheduling."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from PIL import Image

from featx import PretrainedFeatureExtractor
import featx._runtime.loading as loading
from featx._runtime.loading import PARALLEL, batches, decode_group, ordered_streams
from featx._images.preprocess import ImageDataset, Items, collate


@pytest.fixture
def dataset(image_paths):
    paths = list(image_paths[0][:11]) + ["/no/such.jpg"]
    return ImageDataset(Items(paths, "list"), np.arange(len(paths)), {"input_size": (32, 32), "resize_size": 36, "interpolation": "bilinear"})


@pytest.mark.parametrize("workers", [PARALLEL, 2])
def test_every_mode_gives_the_inline_batches(dataset, workers):
    ref = list(batches(dataset, 4, 0, collate))
    got = list(batches(dataset, 4, workers, collate))
    assert len(got) == len(ref) == 3
    for (i1, b1, e1), (i2, b2, e2) in zip(ref, got):
        assert torch.equal(i1, i2) and torch.equal(b1, b2) and e1 == e2
    assert ref[-1][2] and "not found" in ref[-1][2][0][1]


class _Recording(torch.utils.data.Dataset):
    """Items ``(i, tensor of item_bytes uint8, None)``; records which thread decoded what, and when."""

    def __init__(self, n, item_bytes=10, barrier=None, fail_at=None):
        self.n, self.item_bytes, self.barrier, self.fail_at = n, item_bytes, barrier, fail_at
        self.seen, self.threads = [], set()

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.seen.append(i)
        self.threads.add(threading.current_thread().name)
        if self.barrier is not None and i < 2:
            self.barrier.wait()  # the first two items must be decoded at the same time
        if i == self.fail_at:
            raise ValueError(f"item {i} broke")
        return i, torch.full((self.item_bytes,), i % 256, dtype=torch.uint8), None


def _decoded_before_each_batch(ds, batch_size):
    counts, indices = [], []
    for idx, batch, errors in batches(ds, batch_size, PARALLEL, collate):
        counts.append(len(ds.seen))
        indices += idx.tolist()
        assert batch.shape == (len(idx), ds.item_bytes) and torch.equal(batch[:, 0], (idx % 256).to(torch.uint8))
    assert indices == list(range(ds.n))  # in order, each once
    return counts


def test_parallel_decodes_groups_of_batches_after_the_first(monkeypatch):
    monkeypatch.setattr(loading, "DECODE_GROUP_IMAGES", 12)
    counts = _decoded_before_each_batch(_Recording(40), 4)
    # the first batch alone, then 12 images (3 batches) per group, the last group short
    assert counts == [4, 16, 16, 16, 28, 28, 28, 40, 40, 40]


def test_parallel_groups_are_bounded_by_bytes(monkeypatch):
    monkeypatch.setattr(loading, "DECODE_GROUP_BYTES", 10 * 1000)
    counts = _decoded_before_each_batch(_Recording(20, item_bytes=1000), 4)
    assert counts == [4, 12, 12, 20, 20]  # 10 images fit: groups of 2 whole batches
    big = _Recording(12, item_bytes=64 << 20)
    assert _decoded_before_each_batch(big, 4) == [4, 8, 12]  # nothing fits: one batch at a time


def test_decode_group_sizes():
    assert decode_group(4, 3 * 224 * 224) == 128  # 224 x 224 crops: the image cap
    assert decode_group(32, 3 * 224 * 224) == 128
    assert decode_group(48, 3 * 224 * 224) == 96  # whole batches only
    assert decode_group(4, 10 * 3 * 518 * 518) == 8  # ten TTA views of 518 x 518: the byte cap
    assert decode_group(256, 3 * 224 * 224) == 256  # never less than one batch
    assert decode_group(4, 0) == 128


def test_parallel_decodes_on_this_thread_and_a_helper_at_once(monkeypatch):
    monkeypatch.setattr(loading, "_cores", lambda: 2)
    ds = _Recording(24, barrier=threading.Barrier(2, timeout=10))
    _decoded_before_each_batch(ds, 2)
    assert threading.current_thread().name in ds.threads
    assert any(name.startswith("featx-decode") for name in ds.threads)


def test_parallel_on_one_core_decodes_here(monkeypatch):
    monkeypatch.setattr(loading, "_cores", lambda: 1)
    ds = _Recording(10)
    assert _decoded_before_each_batch(ds, 4) == [4, 10, 10]
    assert ds.threads == {threading.current_thread().name}


@pytest.mark.parametrize("fail_at", [0, 9])
def test_parallel_raises_a_decoders_error_and_stops_decoding(monkeypatch, fail_at):
    monkeypatch.setattr(loading, "_cores", lambda: 2)
    ds = _Recording(400, fail_at=fail_at)
    with pytest.raises(ValueError, match=f"item {fail_at} broke"):
        list(batches(ds, 4, PARALLEL, collate))
    assert len(ds.seen) < 140  # the group in progress at most, none after it


def test_streams_yield_in_order_from_several_threads():
    names = {}
    barrier = threading.Barrier(2, timeout=10)  # both streams must be running at once to pass

    def job(k):
        if k < 2:
            barrier.wait()
        names[k] = (threading.current_thread().name, torch.get_num_threads())
        return k * k

    before = torch.get_num_threads()
    assert list(ordered_streams(9, job, 2)) == [k * k for k in range(9)]
    assert {n for n, _ in names.values()} == {"featx-stream-0", "featx-stream-1"}
    assert {t for _, t in names.values()} == {1}  # one torch thread per stream
    assert torch.get_num_threads() == before  # and the process's setting restored


def test_streams_raise_at_the_failing_jobs_turn_and_stop():
    started = []

    def job(k):
        started.append(k)
        if k == 3:
            raise ValueError("job 3 broke")
        return k

    got = []
    with pytest.raises(ValueError, match="job 3 broke"):
        for v in ordered_streams(100, job, 2, ahead=1):
            got.append(v)
    assert got == [0, 1, 2]
    assert max(started) < 3 + 2 * 2  # no job started beyond the bounded look-ahead


def test_streams_stay_bounded_when_the_consumer_is_slow():
    running = []

    def job(k):
        running.append(k)
        return k

    gen = ordered_streams(50, job, 2, ahead=2)
    assert next(gen) == 0
    bound = 1 + 2 * 2 + 1  # the one consumed, streams x ahead waiting, one more taking its slot
    deadline = threading.Event()
    for _ in range(600):  # the streams run ahead until the bound stops them (a hang fails after 60 s)
        if len(running) >= bound - 1:
            break
        deadline.wait(0.1)
    assert len(running) >= bound - 1, f"the streams ran only {len(running)} jobs: they never ran ahead"
    deadline.wait(0.2)  # had nothing stopped them, they would go on now
    assert len(running) <= bound
    gen.close()


def _reference(tiny_cnn, X, **kw):
    return PretrainedFeatureExtractor(tiny_cnn, preprocess={"input_size": 30, "resize_size": 34}, precision="fp32",
                                      progress=False, **kw).fit()


def test_results_do_not_depend_on_batch_size_streams_or_threads(tiny_cnn, image_paths):
    paths = (list(image_paths[0]) * 4)[:37]
    X = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    ref = _reference(tiny_cnn, X, batch_size=1, num_workers=0).transform(X)
    saved = torch.get_num_threads()
    try:
        for bs in (3, 4, 16):
            for streams in (1, 2, 3):
                for threads in (1, 2):
                    torch.set_num_threads(threads)
                    ext = _reference(tiny_cnn, X, batch_size=bs)
                    # fit settles the schedule from the CPU and precision; forced here
                    ext._settled.schedule.record(streams, remember_it=False)
                    np.testing.assert_allclose(ext.transform(X), ref, rtol=1e-5, atol=1e-6,
                                               err_msg=f"batch {bs}, {streams} streams, {threads} threads")
                    assert ext.last_run_.computed == len(X) and ext.last_run_.streams == streams
    finally:
        torch.set_num_threads(saved)


def test_streams_keep_errors_in_order_and_lose_no_work(tiny_cnn, image_paths, tmp_path):
    paths = list(image_paths[0][:9])
    bad = paths[:5] + [str(tmp_path / "missing.jpg")] + paths[5:]
    ext = _reference(tiny_cnn, bad, batch_size=2, on_error="nan")
    ext._settled.schedule.record(2, remember_it=False)
    with pytest.warns(Warning, match="1 of 10 images"):
        out = ext.transform(bad)
    assert list(ext.failed_indices_) == [5] and np.isnan(out[5]).all()
    good = np.delete(out, 5, axis=0)
    np.testing.assert_allclose(good, _reference(tiny_cnn, paths).transform(paths), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(loading._cores() < 2, reason="needs two cores to decode on two threads")
def test_a_single_cpu_batch_is_decoded_on_every_core():
    # 8 phone photos in one batch of 8 were decoded on one core while the other waited (12 MP: slower than two streams of 4)
    ds = _Recording(8, barrier=threading.Barrier(2, timeout=10))
    workers = loading.loader_workers(len(ds), 8, "auto", torch.device("cpu"), False)
    got = list(batches(ds, 8, workers, collate))
    assert [idx.tolist() for idx, _, _ in got] == [list(range(8))]
    assert len(ds.threads) >= 2


def test_a_single_image_is_decoded_inline():
    assert loading.loader_workers(1, 8, "auto", torch.device("cpu"), False) == 0
    assert loading.loader_workers(8, 8, 0, torch.device("cpu"), False) == 0  # an explicit count is kept
