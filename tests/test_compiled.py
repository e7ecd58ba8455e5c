"""backend="torch.compile" on the CPU: a package compiled ahead of time in another process, kept on disk."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch

from featx import BackendWarning, PretrainedFeatureExtractor
from featx._runtime import compiled

KW = dict(model="resnet18", weights=None, preprocess={"input_size": 32, "resize_size": 36}, device="cpu",
          progress=False, batch_size=4, precision="fp32")


def _images(n=10, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (40, 48, 3), dtype=np.uint8) for _ in range(n)]


def _wait(engine, timeout=600):
    child = engine._child
    assert child, "no compilation was started"
    child.wait(timeout=timeout)
    assert child.returncode == 0, engine.path.with_suffix(".log").read_text()[-2000:]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A cache directory whose package for KW was compiled once (by the first test's extractor)."""
    return tmp_path_factory.mktemp("compiled-store")


def test_compiled_features_equal_eager_and_the_package_is_kept(store, monkeypatch):
    monkeypatch.setenv("FEATX_CACHE_DIR", str(store))
    X = _images()
    ref = PretrainedFeatureExtractor(**KW, backend="torch").fit().transform(X)
    ext = PretrainedFeatureExtractor(**KW, backend="torch.compile").fit()
    with warnings.catch_warnings():
        warnings.simplefilter("error", BackendWarning)
        first = ext.transform(X)  # eager while the package compiles elsewhere: no wait
        engine = ext._runner.engine
        assert isinstance(engine, compiled.CompiledEngine) and not engine.ready
        _wait(engine)
        again = ext.transform(X)
    assert engine.ready and engine.compiled_batches >= 2  # the full batches ran compiled
    scale = np.abs(ref).max()
    np.testing.assert_allclose(first, ref, rtol=0, atol=1e-6 * scale)
    np.testing.assert_allclose(again, ref, rtol=0, atol=1e-5 * scale)
    assert ext.backend_ == "torch.compile" and ext.precision_ == "fp32"
    assert [p.suffix for p in (store / "compiled").iterdir()] == [".pt2"]  # no lock, log or temporary left


def test_another_process_loads_the_package_instead_of_compiling(store):
    code = textwrap.dedent(f"""
        import numpy as np
        from featx import PretrainedFeatureExtractor
        rng = np.random.default_rng(0)
        X = [rng.integers(0, 256, (40, 48, 3), dtype=np.uint8) for _ in range(10)]
        ext = PretrainedFeatureExtractor(**{KW!r}, backend="torch.compile").fit()
        ext.transform(X)
        e = ext._runner.engine
        print(e.ready, e._child, e.compiled_batches)
    """)
    env = {**os.environ, "FEATX_CACHE_DIR": str(store)}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["True", "None", "3"]  # loaded at once, no compilation started; 3 batches (padded)


def test_a_corrupt_package_warns_runs_eager_and_is_compiled_again(store, tmp_path, monkeypatch):
    (tmp_path / "compiled").mkdir()
    (package,) = (store / "compiled").glob("*.pt2")
    damaged = tmp_path / "compiled" / package.name
    damaged.write_bytes(package.read_bytes()[: package.stat().st_size // 3])
    monkeypatch.setenv("FEATX_CACHE_DIR", str(tmp_path))
    started = []
    monkeypatch.setattr(compiled, "compile_in_background", lambda *a, **k: started.append(a) or None)
    X = _images()
    ref = PretrainedFeatureExtractor(**KW, backend="torch").fit().transform(X)
    ext = PretrainedFeatureExtractor(**KW, backend="torch.compile").fit()
    with pytest.warns(BackendWarning, match="does not load"):
        got = ext.transform(X)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6 * np.abs(ref).max())
    assert not damaged.exists() and started == []  # removed; this run stays eager
    ext2 = PretrainedFeatureExtractor(**KW, backend="torch.compile").fit()
    ext2.transform(X)
    assert len(started) == 1  # the next extractor compiles it again


def test_a_failed_compilation_warns_once_and_gives_eager_features(tmp_path, monkeypatch):
    monkeypatch.setenv("FEATX_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(compiled, "_child_command", lambda spec, idle=True: [
        sys.executable, "-c", "import sys; print('error: no C++ compiler found'); sys.exit(1)"])
    X = _images(20)
    ref = PretrainedFeatureExtractor(**KW, backend="torch").fit().transform(X)
    ext = PretrainedFeatureExtractor(**KW, backend="torch.compile").fit()
    ext.transform(X[:4])  # starts the (failing) compilation
    ext._runner.engine._child.wait(timeout=60)
    with pytest.warns(BackendWarning, match="compilation failed: error: no C\\+\\+ compiler found") as record:
        got = ext.transform(X)
        ext.transform(X)
    assert len([w for w in record if issubclass(w.category, BackendWarning)]) == 1
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6 * np.abs(ref).max())
    assert not list((tmp_path / "compiled").glob("*.lock"))


def test_one_process_compiles_a_graph_at_a_time(tmp_path):
    path = tmp_path / "compiled" / "k.pt2"
    path.parent.mkdir()
    assert compiled._lock(path) is True
    assert compiled._lock(path) is False  # held by a live compiler
    assert compiled.compile_in_background({}, path, 4, 1) is None
    lock = path.with_suffix(".lock")
    os.utime(lock, (0, 0))  # a crashed compiler's lock, long ago
    assert compiled._lock(path) is True


def test_a_fresh_lock_of_a_killed_compiler_on_this_host_is_taken_over_at_once(tmp_path):
    """A compilation killed mid-way (SIGKILL, no cleanup) left a lock that made int8 wait its 15 stale minutes."""
    import socket
    import subprocess
    import sys

    path = tmp_path / "compiled" / "k.pt2"
    path.parent.mkdir()
    lock = path.with_suffix(".lock")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lock.write_text(f"{socket.gethostname()} {gone.pid}")  # fresh mtime, holder exited
    assert compiled._lock(path) is True
    assert lock.read_text() == f"{socket.gethostname()} {os.getpid()}"
    lock.write_text(f"another-host {gone.pid}")  # cannot tell there: trusted until stale
    assert compiled._lock(path) is False
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        compiled._hand_lock_to(path, alive.pid)  # the compiling child holds it, though its parent may exit
        assert compiled._lock(path) is False
    finally:
        alive.kill()
        alive.wait()
    assert compiled._lock(path) is True


def test_auto_precision_with_explicit_torch_compile_is_fp32():
    auto = PretrainedFeatureExtractor(**{**KW, "precision": "auto"}, backend="torch.compile").fit()
    assert auto.precision_ == "fp32" and auto._settled.settings.compiled_file is not None


def test_bf16_is_a_package_too_and_its_features_agree_with_eager_bf16(tmp_path, monkeypatch):
    """A compiled bf16 graph rounds differently from eager bf16 (a few bf16 steps): within RTOL_BF16, so the
    two share cache entries; its eager phase runs bf16's streams."""
    from featx._runtime.engines import RTOL_BF16

    monkeypatch.setenv("FEATX_CACHE_DIR", str(tmp_path))
    kw = {**KW, "precision": "bf16", "batch_size": "auto"}
    X = _images(16)
    ref = PretrainedFeatureExtractor(**kw, backend="torch").fit().transform(X)
    ext = PretrainedFeatureExtractor(**kw, backend="torch.compile").fit()
    assert ext.batch_size_ == 8 and ext._settled.settings.compiled_file is not None
    first = ext.transform(X)
    assert ext.last_run_.streams == torch.get_num_threads()  # eager bf16 streams while it compiles
    engine = ext._runner.engine
    _wait(engine)
    with warnings.catch_warnings():
        warnings.simplefilter("error", BackendWarning)
        again = ext.transform(_images(16))
    assert engine.ready and engine.compiled_batches == 2 and ext.last_run_.streams == 1
    np.testing.assert_array_equal(first, ref)
    scale = np.abs(ref).max()
    assert 0 < np.abs(again - ref).max() <= RTOL_BF16 * scale  # another rounding, within a few bf16 steps


def test_auto_backend_compiles_on_the_cpu_in_fp32_and_bf16_only():
    from featx._runtime.engines import resolve_backend

    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu, None) == "torch.compile"
    assert resolve_backend("auto", cpu, torch.bfloat16) == "torch.compile"
    assert resolve_backend("auto", cpu, torch.float16) == "torch"
    assert resolve_backend("auto", torch.device("meta"), None) == "torch"


def test_the_compiling_process_settles_the_precision_that_was_resolved_here():
    """precision="auto" is fp32 with this backend here, but eager bf16 where the child would settle it anew."""
    ext = PretrainedFeatureExtractor(**{**KW, "precision": "auto"}, backend="torch.compile").fit()
    assert ext._settled.settings.compile_params["precision"] == "fp32"


# ------------------------------------------------------------------ backend="auto": rent, then buy


def _fake_compiler(monkeypatch):
    """Record the compilations an engine starts (``idle`` each) instead of starting them."""
    started = []

    def fake(params, path, batch_size, threads, idle=True, verdict=False):
        assert verdict == (params["backend"] == "auto")  # auto asks the compiling process to time the package
        started.append(idle)
        return None  # as if another process were compiling it

    monkeypatch.setattr(compiled, "compile_in_background", fake)
    return started


def test_auto_is_the_compiled_package_on_the_cpu_in_fp32_and_bf16():
    ext = PretrainedFeatureExtractor(**KW).fit()  # backend="auto" is the default
    assert ext.backend_ == "torch.compile" and ext._settled.settings.compiled_file is not None
    assert ext._settled.settings.compile_after == float("inf")  # the suite's setting (conftest)
    assert PretrainedFeatureExtractor(**KW, backend="torch").fit()._settled.settings.compiled_file is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # emulated bf16 warns on CPUs without it
        bf16 = PretrainedFeatureExtractor(**{**KW, "precision": "bf16"}).fit()
    assert bf16.backend_ == "torch.compile" and bf16._settled.settings.compiled_file is not None
    assert bf16._settled.settings.judge_compiled and bf16.streams_ == torch.get_num_threads()


def test_auto_compiles_only_once_eager_runs_have_cost_a_compilation(tmp_path, monkeypatch):
    monkeypatch.setenv("FEATX_CACHE_DIR", str(tmp_path))
    started = _fake_compiler(monkeypatch)
    X = _images(12)
    ref = PretrainedFeatureExtractor(**KW, backend="torch").fit().transform(X)

    monkeypatch.setenv("FEATX_COMPILE_AFTER_S", "1000")  # far more than these runs cost
    ext = PretrainedFeatureExtractor(**KW).fit()
    np.testing.assert_allclose(ext.transform(X), ref, rtol=0, atol=1e-6 * np.abs(ref).max())
    ext.transform(X)
    assert started == []  # small jobs never compile
    package = ext._runner.engine.path
    spent = compiled.eager_seconds(package)
    assert 0 < spent < 1000  # the eager time is recorded in the store, for later runs and processes

    package.with_suffix(".eager").write_text("1000.0")  # earlier runs (any process) paid for it
    ext.transform(X)
    # due, but this run holds little more eager work: it starts when the run ends, at the lowest priority
    assert started == [True]

    monkeypatch.setenv("FEATX_COMPILE_AFTER_S", "1e-6")  # due at the first batch, with the rest of the run to come
    mid = PretrainedFeatureExtractor(**KW).fit()
    mid.transform(X)
    assert started == [True, False]  # started part-way, at normal priority (the run will switch to the package)
    assert compiled.MID_RUN_FACTOR * 1e-6 < compiled.eager_seconds(package)

    monkeypatch.setenv("FEATX_COMPILE_AFTER_S", "0")  # 0: when the first run ends, at the lowest priority
    late = PretrainedFeatureExtractor(**KW).fit()
    late.transform(X)
    assert started == [True, False, True]


def test_auto_never_compiles_with_inf_and_a_bad_setting_names_itself(tmp_path, monkeypatch):
    monkeypatch.setenv("FEATX_CACHE_DIR", str(tmp_path))
    started = _fake_compiler(monkeypatch)
    monkeypatch.setenv("FEATX_COMPILE_AFTER_S", "inf")
    ext = PretrainedFeatureExtractor(**KW).fit()
    ext._runner.engine.path.parent.mkdir(parents=True, exist_ok=True)
    ext._runner.engine.path.with_suffix(".eager").write_text("1e9")
    ext.transform(_images(8))
    assert started == []
    for bad, why in (("soon", "not a number"), ("-1", "0 or more")):
        monkeypatch.setenv("FEATX_COMPILE_AFTER_S", bad)
        with pytest.raises(ValueError, match=f"FEATX_COMPILE_AFTER_S='{bad}'.*{why}"):
            PretrainedFeatureExtractor(**KW).fit()


def test_a_package_loads_without_importing_torchinductor(store):
    """A new process loads a package through PyTorch's C++ loader: torch._inductor's Python side (1.3-1.9 s to
    import) is not imported, and the outputs are aoti_load_package's."""
    (package,) = (store / "compiled").glob("*.pt2")
    code = textwrap.dedent(f"""
        import sys, torch
        from featx._runtime.compiled import load_package
        fn = load_package({str(package)!r})
        x = torch.rand(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
        out = fn(x)
        print("torch._inductor.package" in sys.modules, type(out).__name__, len(out))
        ref = torch._inductor.aoti_load_package({str(package)!r})(x)
        print(all(torch.equal(a, b) for a, b in zip(out, ref)))
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["False", "list", "1", "True"]


def test_a_package_that_disagrees_with_eager_is_removed_with_one_warning(store, tmp_path, monkeypatch):
    """The first compiled batch is checked against eager PyTorch (on its first image only): a package whose
    outputs are off is caught, removed, and the run gives eager's features."""
    (package,) = (store / "compiled").glob("*.pt2")
    (tmp_path / "compiled").mkdir()
    shutil.copy(package, tmp_path / "compiled" / package.name)
    monkeypatch.setenv("FEATX_CACHE_DIR", str(tmp_path))
    real = compiled.load_package

    def off(path):
        fn = real(path)
        return lambda x: [v * 1.01 for v in fn(x)]

    monkeypatch.setattr(compiled, "load_package", off)
    X = _images(8)
    ref = PretrainedFeatureExtractor(**KW, backend="torch").fit().transform(X)
    ext = PretrainedFeatureExtractor(**KW, backend="torch.compile").fit()
    with pytest.warns(BackendWarning, match="disagrees with eager PyTorch") as record:
        got = ext.transform(X)
        again = ext.transform(X)
    assert len([w for w in record if issubclass(w.category, BackendWarning)]) == 1
    assert not (tmp_path / "compiled" / package.name).exists()
    for g in (got, again):
        np.testing.assert_allclose(g, ref, rtol=0, atol=1e-6 * np.abs(ref).max())


def test_a_model_the_compiling_process_cannot_rebuild_warns_once_and_stays_eager(tmp_path, monkeypatch):
    monkeypatch.setenv("FEATX_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("FEATX_COMPILE_AFTER_S", "0")

    class Local(torch.nn.Module):  # defined in a function: pickle cannot name it for another process
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.pool = torch.nn.AdaptiveAvgPool2d(1)

        def forward(self, x):
            return self.pool(self.conv(x)).flatten(1)

    model = Local()
    ref = PretrainedFeatureExtractor(model, layers=["conv"], backend="torch", **{k: KW[k] for k in
                                     ("preprocess", "device", "progress", "batch_size", "precision")}).fit()
    ext = PretrainedFeatureExtractor(model, layers=["conv"], **{k: KW[k] for k in
                                     ("preprocess", "device", "progress", "batch_size", "precision")}).fit()
    X = _images(8)
    with pytest.warns(BackendWarning, match="cannot rebuild this model") as record:
        got = ext.transform(X)
        ext.transform(X)
    assert len([w for w in record if issubclass(w.category, BackendWarning)]) == 1
    assert not list((tmp_path / "compiled").iterdir())  # no lock or spec left behind
    np.testing.assert_allclose(got, ref.transform(X), rtol=0, atol=1e-6)


def test_the_compiling_process_keeps_a_package_only_if_it_beats_eager(store, tmp_path):
    """The verdict: timed against eager PyTorch on the same batch; a package no faster is removed."""
    import time

    from featx._runtime import compile_child

    (package,) = (store / "compiled").glob("*.pt2")
    x = torch.rand(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    slow, fast = tmp_path / "slow.pt2", tmp_path / "fast.pt2"
    shutil.copy(package, slow)
    shutil.copy(package, fast)
    compile_child._judge(slow, lambda x: time.sleep(0.3), x)  # eager far slower: the package stays
    assert slow.exists() and compiled.read_verdict(slow)["gain"] >= compiled.MIN_GAIN
    compile_child._judge(fast, lambda x: None, x)  # eager costs nothing: the package cannot gain
    assert not fast.exists() and compiled.read_verdict(fast)["gain"] < compiled.MIN_GAIN


def test_auto_stays_eager_quietly_where_the_package_was_timed_no_faster(tmp_path, monkeypatch):
    monkeypatch.setenv("FEATX_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("FEATX_COMPILE_AFTER_S", "0")
    started = _fake_compiler(monkeypatch)
    ext = PretrainedFeatureExtractor(**KW).fit()
    path = ext._runner.engine.path
    path.parent.mkdir(parents=True, exist_ok=True)
    compiled.write_verdict(path, {"gain": 0.98, "eager_s": 1.0, "compiled_s": 1.02})
    X = _images(8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", BackendWarning)
        got = ext.transform(X)
    assert started == [] and ext._runner.engine.slower and ext.backend_ == "torch.compile"
    ref = PretrainedFeatureExtractor(**KW, backend="torch").fit().transform(X)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6 * np.abs(ref).max())
    # an explicit backend="torch.compile" is not judged: it compiles as asked
    PretrainedFeatureExtractor(**KW, backend="torch.compile").fit().transform(X)
    assert started == [True]
