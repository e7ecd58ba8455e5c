"""The fp32 CPU schedule (one all-core stream or per-core streams): measured on real work, remembered."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from featx import PretrainedFeatureExtractor
from featx._runtime.runner import Runner
from featx._runtime.schedule import FILE_NAME, TUNE_BATCHES, VOTES, recall, remember

from .conftest import SMALL, TinyCNN


@pytest.fixture
def two_threads():
    saved = torch.get_num_threads()
    torch.set_num_threads(2)  # the choice exists only with several threads (also on a 1-core machine)
    yield
    torch.set_num_threads(saved)


@pytest.fixture
def images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (40, 48, 3), dtype=np.uint8) for _ in range(2 * TUNE_BATCHES + 3)]


def _ext(model, cache_dir, **kw):
    kw = {"batch_size": 2, **kw}
    return PretrainedFeatureExtractor(model, preprocess=SMALL, precision="fp32", device="cpu", progress=False,
                                      cache=str(cache_dir), **kw).fit()


def _slow_when(monkeypatch, slow_streams: bool):
    """Make one schedule slower: the per-core streams run with one torch thread each, the all-core one with 2."""
    real = Runner.forward

    def forward(self, batch):
        if (torch.get_num_threads() == 1) == slow_streams:
            time.sleep(0.02)
        return real(self, batch)

    monkeypatch.setattr(Runner, "forward", forward)


@pytest.mark.parametrize("slow_streams", [True, False])
def test_transforms_measure_keep_the_faster_and_remember_the_majority(tiny_cnn, images, tmp_path, two_threads,
                                                                       monkeypatch, slow_streams):
    _slow_when(monkeypatch, slow_streams)
    winner = 1 if slow_streams else 2
    for vote in range(1, VOTES + 1):
        ext = _ext(tiny_cnn, tmp_path)
        assert ext.streams_ == 1 and ext._settled.schedule.pending() == 2  # not decided yet: measured again
        out = ext.transform([im ^ vote for im in images])  # new images each time: computed
        assert ext.last_run_.streams == winner and ext.last_run_.computed == len(images)
        assert ext.streams_ == winner and ext.last_run_.measured == winner  # streams_: what the runner used
        saved = json.loads((tmp_path / FILE_NAME).read_text())
        assert list(saved.values()) == [[winner] * vote]
    key = next(iter(saved))
    assert "threads2" in key and "32x32" in key and "batch2" in key and "decode-grouped" in key
    # every image was computed once and the features do not depend on the schedule
    ref = _ext(tiny_cnn, tmp_path / "other", batch_size=5)
    ref._settled.schedule.record(1, remember_it=False)
    np.testing.assert_allclose(out, ref.transform([im ^ VOTES for im in images]), rtol=1e-5, atol=1e-6)
    # decided: a new extractor for the same model starts with the choice, without measuring
    again = _ext(tiny_cnn, tmp_path)
    assert again.streams_ == winner and again._settled.schedule.pending() == 0
    again.transform([255 - im for im in images[:6]])  # new images: computed, not cache hits
    assert again.last_run_.computed == 6 and again.last_run_.streams == winner


def test_one_swayed_measurement_is_outvoted(tmp_path):
    key = "k"
    for streams, decided in [(2, None), (1, None), (2, 2)]:
        remember(tmp_path, key, streams)
        assert recall(tmp_path, key) == decided
    # the last VOTES measurements count: a stale majority is replaced
    other = tmp_path / "other"
    for streams in (2, 2, 1, 1, 1):
        remember(other, key, streams)
    assert json.loads((other / FILE_NAME).read_text())[key] == [1, 1, 1] and recall(other, key) == 1


def test_the_choice_is_remembered_across_processes(tmp_path):
    code = (
        "import sys, torch; sys.path.insert(0, {tests!r}); torch.set_num_threads(2)\n"
        "import numpy as np; from conftest import TinyCNN, SMALL; from featx import PretrainedFeatureExtractor\n"
        "torch.manual_seed(0); m = TinyCNN()\n"
        "e = PretrainedFeatureExtractor(m, preprocess=SMALL, precision='fp32', batch_size=2, progress=False,"
        " cache={cache!r}).fit()\n"
        "print(e.streams_)\n"
        "k = 40 * int(sys.argv[1])  # new images in each process: computed, not cache hits\n"
        "e.transform([np.full((40, 48, 3), k + i, np.uint8) for i in range(40)])\n"
    ).format(tests=os.path.dirname(__file__), cache=str(tmp_path))
    for vote in range(1, VOTES + 1):  # each process measures and votes until the choice is decided
        run = subprocess.run([sys.executable, "-c", code, str(vote)], capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        assert run.stdout.split() == ["1"]
        votes = list(json.loads((tmp_path / FILE_NAME).read_text()).values())[0]
        assert len(votes) == vote
    decided = subprocess.run([sys.executable, "-c", code, "0"], capture_output=True, text=True, timeout=300)
    assert decided.returncode == 0, decided.stderr
    assert decided.stdout.split() == [str(max(set(votes), key=votes.count))]


def test_small_inputs_are_not_measured(tiny_cnn, images, tmp_path, two_threads):
    ext = _ext(tiny_cnn, tmp_path)
    ext.transform(images[: 2 * (TUNE_BATCHES - 1)])  # one batch short
    assert ext.last_run_.streams == 1 and not (tmp_path / FILE_NAME).exists()


def test_a_damaged_or_unwritable_memory_never_fails_a_transform(tiny_cnn, images, tmp_path, two_threads):
    (tmp_path / FILE_NAME).write_text("{not json")
    ext = _ext(tiny_cnn, tmp_path)
    assert ext.streams_ == 1
    ext.transform(images)
    assert len(json.loads((tmp_path / FILE_NAME).read_text())) == 1  # rewritten whole
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    ext = _ext(TinyCNN(), blocker / "cache")  # the cache directory cannot be created
    with pytest.warns(Warning):  # the embedding cache says it cannot write; the schedule stays silent
        ext.transform(images)
    assert ext.last_run_.streams in (1, 2)


def test_bf16_and_other_backends_are_not_measured(tiny_cnn, tmp_path, two_threads, monkeypatch):
    import featx._runtime.device as dev

    monkeypatch.setattr(dev, "cpu_native_bf16", lambda: True)
    bf16 = PretrainedFeatureExtractor(tiny_cnn, preprocess=SMALL, device="cpu", progress=False,
                                      cache=str(tmp_path)).fit()
    assert bf16.precision_ == "bf16" and bf16.streams_ == 2 and bf16._settled.schedule.pending() == 0
    single = _ext(tiny_cnn, tmp_path)
    torch.set_num_threads(1)
    assert _ext(tiny_cnn, tmp_path)._settled.schedule.pending() == 0  # one thread: nothing to choose
    assert single._settled.schedule.pending() == 2
