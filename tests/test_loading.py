"""Batch production (inline, worker processes, parallel decode, CPU streams); results independent of scheduling."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from PIL import Image

from featx import PretrainedFeatureExtractor
from featx._loading import PARALLEL, batches, ordered_streams
from featx._preprocess import ImageDataset, Items, collate


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
    threading.Event().wait(0.2)  # give the streams time to run ahead as far as they may
    assert len(running) <= 1 + 2 * 2 + 1
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
                    runner = ext._runner  # fit settles the schedule from the CPU and precision; forced here
                    runner.streams, runner.tune = streams, None
                    np.testing.assert_allclose(ext.transform(X), ref, rtol=1e-5, atol=1e-6,
                                               err_msg=f"batch {bs}, {streams} streams, {threads} threads")
                    assert ext.last_run_.computed == len(X) and ext.last_run_.streams == streams
    finally:
        torch.set_num_threads(saved)


def test_streams_keep_errors_in_order_and_lose_no_work(tiny_cnn, image_paths, tmp_path):
    paths = list(image_paths[0][:9])
    bad = paths[:5] + [str(tmp_path / "missing.jpg")] + paths[5:]
    ext = _reference(tiny_cnn, bad, batch_size=2, on_error="nan")
    runner = ext._runner
    runner.streams, runner.tune = 2, None
    with pytest.warns(Warning, match="1 of 10 images"):
        out = ext.transform(bad)
    assert list(ext.failed_indices_) == [5] and np.isnan(out[5]).all()
    good = np.delete(out, 5, axis=0)
    np.testing.assert_allclose(good, _reference(tiny_cnn, paths).transform(paths), rtol=1e-5, atol=1e-6)
