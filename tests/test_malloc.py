"""featx keeps a CPU forward pass's freed activation memory for the next batch (glibc's thresholds)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from featx._runtime import malloc as _malloc

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# The first layers of a mobile CNN (efficientnet-like: stem, depthwise and pointwise convolutions) at batch 6,
# 224 x 224, channels-last: activations of 4-29 MiB each, over 64 MiB of heap at the peak (so glibc's own
# largest trim threshold is not enough), allocated and freed in every forward pass. The process's minor page
# faults over 20 passes say whether freed memory was reused or handed back to the OS.
_ROUNDS = textwrap.dedent("""
    import resource, sys, torch, torch.nn as nn
    from featx._runtime.malloc import keep_cpu_buffers
    if sys.argv[1] == "keep":
        assert keep_cpu_buffers()
    torch.manual_seed(0)
    def block(i, o, s):
        return [nn.Conv2d(i, i, 3, s, 1, groups=i), nn.ReLU(), nn.Conv2d(i, o, 1)]
    m = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1), nn.ReLU(), *block(32, 16, 1), nn.Conv2d(16, 96, 1), nn.ReLU(),
                      *block(96, 24, 2)).eval().to(memory_format=torch.channels_last)
    x = torch.randn(6, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        for _ in range(2):
            m(x)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(20):
            m(x)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _faults(mode: str) -> int:
    env = {k: v for k, v in os.environ.items() if k not in _malloc._USER_SET}
    env["OMP_NUM_THREADS"] = "1"
    out = subprocess.run([sys.executable, "-c", _ROUNDS, mode], capture_output=True, text=True, env=env, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc thresholds (Linux with glibc)")
def test_freed_activations_are_reused_instead_of_faulted_in_again():
    # without featx's thresholds glibc unmaps or trims the activations after every pass (measured: ~317000
    # faults; ~97000 with glibc's own largest thresholds, 32 and 64 MiB); with them, (almost) no new page
    default, kept = _faults("default"), _faults("keep")
    assert default > 20 * 1000, default
    assert kept < default / 20, (kept, default)


@pytest.fixture
def fresh(monkeypatch):
    """keep_cpu_buffers decides again, and calls a recording mallopt instead of glibc's."""
    calls: list[tuple[int, int]] = []

    def mallopt(param: int, value: int) -> int:
        calls.append((param, value))
        return 1

    monkeypatch.setattr(_malloc, "_DONE", [])
    monkeypatch.setattr(_malloc, "_glibc", lambda: mallopt)
    for name in ("FEATX_KEEP_CPU_BUFFERS", *_malloc._USER_SET):
        monkeypatch.delenv(name, raising=False)
    return calls


def test_sets_the_thresholds_once_per_process(fresh):
    assert _malloc.keep_cpu_buffers() is True
    assert _malloc.keep_cpu_buffers() is True
    # M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_TOP_PAD
    assert fresh == [(-1, 1024 ** 3), (-3, 32 * 1024 ** 2), (-2, 256 * 1024 ** 2)]


@pytest.mark.parametrize("name, value", [("FEATX_KEEP_CPU_BUFFERS", "0"), ("MALLOC_MMAP_THRESHOLD_", "131072"),
                                         ("MALLOC_TRIM_THRESHOLD_", "131072"), ("MALLOC_TOP_PAD_", "0")])
def test_a_users_choice_is_left_alone(fresh, monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    assert _malloc.keep_cpu_buffers() is False
    assert fresh == []


def test_another_c_library_is_left_alone(fresh, monkeypatch):
    monkeypatch.setattr(_malloc, "_glibc", lambda: None)
    assert _malloc.keep_cpu_buffers() is False


def test_a_refused_trim_threshold_sets_nothing_else(fresh, monkeypatch):
    calls = []
    monkeypatch.setattr(_malloc, "_glibc", lambda: lambda p, v: calls.append(p) or 0)
    assert _malloc.keep_cpu_buffers() is False
    assert calls == [-1]


def test_a_cpu_extractor_sets_them_when_fitted(monkeypatch, tiny_cnn):
    from featx import PretrainedFeatureExtractor

    calls = []
    monkeypatch.setattr("featx._runtime.process.keep_cpu_buffers", lambda: calls.append(1) or True)
    PretrainedFeatureExtractor(tiny_cnn, device="cpu", cache=None).fit()
    assert calls  # at least once (idempotent: the fp32 schedule's key asks again for the outcome)


def test_fine_tuning_on_the_cpu_sets_them(monkeypatch):
    import numpy as np

    from featx import FineTunedClassifier

    from .conftest import SMALL, TinyCNN

    calls = []
    monkeypatch.setattr("featx._runtime.process.keep_cpu_buffers", lambda: calls.append(1) or True)
    rng = np.random.default_rng(0)
    X = rng.integers(0, 256, size=(8, 40, 52, 3), dtype=np.uint8)
    FineTunedClassifier(TinyCNN(), trainable_from=0, max_epochs=1, preprocess=SMALL, progress=False,
                        validation_fraction=0, device="cpu").fit(X, np.array([0, 1] * 4))
    assert calls == [1]
