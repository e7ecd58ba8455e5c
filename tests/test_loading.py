"""Batch production (inline, worker processes, prefetch thread, parallel decode) and CPU batch-size tuning."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from featx import PretrainedFeatureExtractor
from featx._loading import PARALLEL, THREAD, batches
from featx._preprocess import ImageDataset, Items, collate
from featx._runner import _Tuner, last_run, tuned_batch_sizes



@pytest.fixture
def dataset(image_paths):
    paths = list(image_paths[0][:11]) + ["/no/such.jpg"]
    return ImageDataset(Items(paths, "list"), np.arange(len(paths)), {"input_size": (32, 32), "resize_size": 36, "interpolation": "bilinear"})


@pytest.mark.parametrize("workers", [THREAD, PARALLEL, 2])
def test_every_mode_gives_the_inline_batches(dataset, workers):
    ref = list(batches(dataset, 4, 0, collate))
    got = list(batches(dataset, 4, workers, collate))
    assert len(got) == len(ref) == 3
    for (i1, b1, e1), (i2, b2, e2) in zip(ref, got):
        assert torch.equal(i1, i2) and torch.equal(b1, b2) and e1 == e2
    assert ref[-1][2] and "not found" in ref[-1][2][0][1]


def test_thread_errors_reach_the_consumer(dataset):
    def broken_collate(batch):
        raise RuntimeError("collate exploded")

    with pytest.raises(RuntimeError, match="collate exploded"):
        list(batches(dataset, 4, THREAD, broken_collate))


def test_auto_batch_size_tunes_on_real_batches(tiny_cnn, image_paths):
    paths = (list(image_paths[0]) * 5)[: _Tuner.MIN_IMAGES + 4]
    X = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    prep = {"input_size": 30, "resize_size": 34}  # an input size no other test tunes
    ref = PretrainedFeatureExtractor(tiny_cnn, preprocess=prep, batch_size=4, progress=False).fit().transform(X)
    ext = PretrainedFeatureExtractor(tiny_cnn, preprocess=prep, progress=False).fit()
    before = dict(tuned_batch_sizes())
    out = ext.transform(X)
    assert last_run().images == len(X)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    new = {k: v for k, v in tuned_batch_sizes().items() if k not in before}
    assert len(new) == 1 and list(new.values())[0] in _Tuner.CANDIDATES
    # a fixed batch_size is never tuned
    PretrainedFeatureExtractor(tiny_cnn, preprocess={"input_size": 40, "resize_size": 44}, batch_size=3, progress=False).fit().transform(X)
    assert len(tuned_batch_sizes()) == len(before) + 1
