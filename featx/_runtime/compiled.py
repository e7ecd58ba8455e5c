"""Compiled graphs kept on disk: the truncated backbone as an AOTInductor package, built in the background.

``backend="torch.compile"`` on the CPU runs the capture (the backbone up to
the deepest requested layer, with the pooling) as a graph compiled ahead of
time by TorchInductor, with freezing, for one batch shape (featx pads short
batches to ``batch_size``), one thread count and one CPU. Compiling takes
seconds to a minute, so:

- **compiled once, kept on disk.** The package is stored in
  ``<cache dir>/compiled/<digest>.pt2``, the digest naming everything that
  defines it (:func:`artifact_key`: the embedding namespace, the fields
  computed, input size, batch size, threads, precision, CPU capability and
  torch version). A later extractor, in this process or another, loads it in
  milliseconds instead of compiling.
- **no first-call tax.** A run that finds the package missing runs eager
  PyTorch, and when it ends a separate process
  (:mod:`featx._runtime.compile_child`) rebuilds the same network from the
  extractor's parameters, exports and compiles it, and publishes the package
  atomically (a temporary name, then a rename), at the lowest CPU priority
  (Linux's ``SCHED_IDLE``: only on a core nothing else wants). Not during the
  run: a compilation beside it slowed the eager run measurably even at that
  priority (see the Performance page). Later runs look for the package
  between batches and switch to it when it appears. Concurrent processes
  compile a graph once (a lock file next to it).
- **checked.** The first batch run by a loaded package is compared with eager
  PyTorch on the same batch; a package that disagrees, or cannot be loaded,
  is removed (it is compiled again next time) with one
  :class:`featx.BackendWarning`, and the run goes on in eager PyTorch. So is a
  compilation that fails (no C++ compiler, a model that does not export).

Features agree with eager PyTorch within :data:`RTOL` of their scale in
fp32, and within :data:`~featx._runtime.engines.RTOL_BF16` in bf16 (a
compiled bf16 graph rounds differently, by a few bf16 steps), so the two
share cache entries.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

from .._exceptions import BackendWarning
from .._cache.sqlite import process_alive
from .._outputs import written
from .._models.layers import LayerCapture
from .device import cpu_capability
from .engines import RTOL, RTOL_BF16, disagreement

__all__ = ["RTOL", "artifact_key", "artifact_path", "CompiledEngine", "compile_in_background"]

#: Directory of the packages inside a cache directory.
DIRECTORY = "compiled"
#: A lock older than this is a crashed compiler's: another process may take it over.
STALE_LOCK_S = 15 * 60
_FORMAT = "aoti-1"


def artifact_key(namespace: str, fields: list[str], input_size: tuple[int, int], batch_size: int, threads: int,
                 precision: str) -> str:
    """Digest naming a compiled package: everything that defines the compiled code."""
    c = cpu_capability()
    machine = f"{c['isa']}-bf16{int(bool(c['avx512_bf16']))}-amx{int(bool(c['amx']))}-vnni{int(bool(c.get('vnni')))}"
    text = "|".join([_FORMAT, namespace, ",".join(fields), f"{input_size[0]}x{input_size[1]}", f"batch{batch_size}",
                     f"threads{threads}", precision, machine, torch.__version__])
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def artifact_path(root: Path, key: str) -> Path:
    return Path(root) / DIRECTORY / f"{key}.pt2"


# ------------------------------------------------------------------ compiling and publishing


def strip_metadata_asserts(gm: torch.fx.GraphModule) -> None:
    """Drop export's tensor-metadata assertions: under autocast they name the pre-cast dtype and fail freezing
    (and the quantizer reads them as uses of the tensors)."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_function" and "assert_tensor_metadata" in str(node.target):
            graph.erase_node(node)
    gm.recompile()


def load_package(path: Path) -> Callable[[torch.Tensor], list]:
    """A package on disk as a function of one input batch, returning its flat list of outputs.

    Through PyTorch's C++ package loader where it has one: milliseconds,
    where ``torch._inductor.aoti_load_package`` first imports TorchInductor's
    Python side (measured: 1.3-1.9 s in a new process, which a small first
    call would pay). The outputs are the same tensors either way.
    """
    try:
        from torch._C._aoti import AOTIModelPackageLoader as loader_cls
    except ImportError:  # a torch without it: the Python loader
        loader_cls = None
    if loader_cls is not None:
        for args in ((str(path), "model", False, 1, -1), (str(path), "model")):
            try:
                loader = loader_cls(*args)
            except TypeError:  # another torch's signature
                continue
            return lambda x: loader.boxed_run([x])
    fn = torch._inductor.aoti_load_package(str(path))
    return lambda x: list(fn(x))


def publish_package(ep, path: Path, verify: Callable[[Path], None] | None = None) -> None:
    """Compile an exported program with AOTInductor (freezing on) and publish the package at ``path`` atomically.

    It is written under a temporary name beside ``path`` and renamed onto it,
    so readers see no package or a whole one. ``verify`` is called with the
    temporary file before the rename; an exception from it publishes nothing.
    """
    import torch._inductor.config as inductor_config

    fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".tmp.pt2", dir=path.parent)
    os.close(fd)
    try:
        with inductor_config.patch(freezing=True):
            torch._inductor.aoti_compile_and_package(ep, package_path=tmp)
        if verify is not None:
            verify(Path(tmp))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ------------------------------------------------------------------ the compiling process


def _lock(path: Path) -> bool:
    """Take the compile lock for ``path``; False when another live process holds it.

    The lock names its holder (``host pid``): a lock whose holder was on this
    host and has exited (killed mid-compilation) is taken over at once;
    another host's is trusted until :data:`STALE_LOCK_S` old.
    """
    lock = path.with_suffix(".lock")
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                if time.time() - lock.stat().st_mtime < STALE_LOCK_S and not _holder_exited(lock):
                    return False
                lock.unlink()  # a crashed compiler's: take it over
            except OSError:
                return False
            continue
        with os.fdopen(fd, "w") as f:
            f.write(_owner(os.getpid()))
        return True
    return False


def _owner(pid: int) -> str:
    return f"{socket.gethostname()} {pid}"


def _hand_lock_to(path: Path, pid: int) -> None:
    """The compiling process ``pid`` holds the lock now (the process that took it may exit first)."""
    with written(path.with_suffix(".lock")) as tmp:
        tmp.write_text(_owner(pid))


def _holder_exited(lock: Path) -> bool:
    """Whether the lock's holder was a process of this host that no longer runs."""
    try:
        host, _, pid = lock.read_text().strip().rpartition(" ")
        pid = int(pid)
    except (OSError, ValueError):
        return False  # being written, or unreadable: trust it (it goes stale in time)
    host = host or socket.gethostname()  # an older featx wrote the pid alone
    return not process_alive(host, pid) or (host == socket.gethostname() and _zombie(pid))


def _zombie(pid: int) -> bool:
    """A child that has exited but not been waited for still answers ``kill(pid, 0)``."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] == "Z"
    except (OSError, IndexError):
        return False


class NotRebuildable(Exception):
    """The extractor's parameters cannot be handed to the compiling process (a model object pickle cannot name)."""


def compile_in_background(params: dict, path: Path, batch_size: int, threads: int,
                          idle: bool = True, verdict: bool = False) -> subprocess.Popen | None:
    """Start a process that compiles the package at ``path`` (None: another process is compiling it).

    ``idle``: at the lowest CPU priority (a run has ended: nothing waits for
    the package); else at normal priority (a run under way will switch to it).
    ``verdict``: time the package against eager PyTorch and remove it unless
    it gains :data:`MIN_GAIN` (``backend="auto"``).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or not _lock(path):
        return None
    fd, spec = tempfile.mkstemp(prefix=path.stem + ".", suffix=".spec", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            pickle.dump({"params": params, "path": str(path), "batch_size": batch_size, "threads": threads,
                         "verdict": verdict}, f)
    except (pickle.PicklingError, AttributeError, TypeError) as exc:  # a model object pickle cannot name
        os.unlink(spec)
        path.with_suffix(".lock").unlink(missing_ok=True)
        raise NotRebuildable(f"{type(exc).__name__}: {str(exc)[:200]}") from exc
    log = open(path.with_suffix(".log"), "wb")  # noqa: SIM115 - the child writes it; kept for the error message
    try:
        child = subprocess.Popen(_child_command(spec, idle), stdout=log, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL)
        _hand_lock_to(path, child.pid)
        return child
    except OSError:
        path.with_suffix(".lock").unlink(missing_ok=True)
        return None
    finally:
        log.close()


#: The compiling process lowers its priority before it imports anything (torch's import alone is seconds of
#: CPU): SCHED_IDLE where Linux offers it (it runs only on a core nothing else wants), else nice 19.
_IDLE = ("try:\n    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))\n"
         "except (AttributeError, OSError):\n"
         "    try:\n        os.nice(19)\n    except (AttributeError, OSError):\n        pass\n")
_CHILD = ("import os\n{idle}"
          "import sys, runpy\nsys.argv = ['featx-compile', {spec!r}]\n"
          "runpy.run_module('featx._runtime.compile_child', run_name='__main__')\n")


def _child_command(spec: str, idle: bool = True) -> list[str]:
    return [sys.executable, "-c", _CHILD.format(spec=spec, idle=_IDLE if idle else "")]


# ------------------------------------------------------------------ when to compile: rent or buy


def compile_after_s() -> float:
    """Seconds of eager work on one graph, in one store, after which ``backend="auto"`` compiles it.

    The ski-rental rule: a compilation costs about this much CPU time
    (:data:`COMPILE_AFTER_S`, the order of the compile times measured on the
    Performance page), so featx compiles a graph once the eager runs of it
    have cost as much: when the run that crossed it ends (at the lowest
    priority), or part-way through a run with much more eager work to come
    (:data:`MID_RUN_FACTOR`), which then switches to the package when it is
    ready. Jobs that stay small never pay for a compilation.
    ``FEATX_COMPILE_AFTER_S`` overrides it (``0``: compile after the first
    run, as ``backend="torch.compile"`` does; ``inf``: never).
    """
    raw = os.environ.get("FEATX_COMPILE_AFTER_S", "").strip()
    if not raw:
        return COMPILE_AFTER_S
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"FEATX_COMPILE_AFTER_S={raw!r} is not a number of seconds; "
                         "use e.g. 30, 0 (compile after the first run) or inf (never).") from None
    if value < 0 or math.isnan(value):
        raise ValueError(f"FEATX_COMPILE_AFTER_S={raw!r} must be 0 or more seconds (inf: never).")
    return value


#: Eager seconds spent on a graph before ``backend="auto"`` compiles it (see :func:`compile_after_s`).
COMPILE_AFTER_S = 30.0
#: A run that crosses the threshold starts the compilation at once (at normal priority, to switch to the package
#: part-way) only if at least this many times ``compile_after`` of its eager work is still to come; else the
#: compilation starts when the run ends, at the lowest priority. A compilation beside a run slows it (two cores
#: shared); ``benchmarks/bench_auto.py`` measures what a mid-run switch costs and gains (Performance page).
MID_RUN_FACTOR = 8


#: ``backend="auto"`` keeps a package only if it runs a batch at least this many times faster than eager PyTorch,
#: timed by the compiling process (:data:`JUDGE_REPEATS` interleaved runs of each, medians); else eager stays.
MIN_GAIN = 1.1
JUDGE_REPEATS = 5


def verdict_path(path: Path) -> Path:
    return path.with_suffix(".verdict.json")


def write_verdict(path: Path, verdict: dict) -> None:
    with written(verdict_path(path)) as tmp:
        tmp.write_text(json.dumps(verdict))


def read_verdict(path: Path) -> dict | None:
    """The compiling process's timing of the package against eager PyTorch (None: not judged)."""
    try:
        verdict = json.loads(verdict_path(path).read_text())
        return verdict if isinstance(verdict, dict) and isinstance(verdict.get("gain"), (int, float)) else None
    except (OSError, ValueError):
        return None


def eager_seconds(path: Path) -> float:
    """Eager seconds recorded for the package at ``path`` by earlier runs (any process)."""
    try:
        return float(path.with_suffix(".eager").read_text())
    except (OSError, ValueError):
        return 0.0


def record_eager_seconds(path: Path, seconds: float) -> None:
    """Add ``seconds`` to the eager time recorded for ``path`` (atomic replace; a lost update only delays)."""
    if seconds <= 0:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        total = eager_seconds(path) + seconds
        with written(path.with_suffix(".eager")) as tmp:
            tmp.write_text(f"{total:.3f}")
    except OSError:
        pass  # a read-only store: the rule just never fires there


# ------------------------------------------------------------------ the engine


_START_LOCK = threading.Lock()


class CompiledEngine:
    """Eager PyTorch until the compiled package is there, then the package (checked once against eager).

    ``compile_after``: eager seconds on this graph (recorded in the store,
    across runs and processes) after which the package is compiled; 0
    (``backend="torch.compile"``): when the first run ends. ``judge``
    (``backend="auto"``): the compiling process times the package against
    eager PyTorch and removes it unless it gains :data:`MIN_GAIN`; eager
    PyTorch then stays for this graph, without a warning.
    """

    def __init__(self, cap: LayerCapture, path: Path, batch_size: int, params: dict, compile_after: float = 0.0,
                 judge: bool = False):
        self.cap, self.path, self.batch_size = cap, path, batch_size
        self.eager = cap.run
        self._params = params  # what the compiling process rebuilds the network from
        self.compile_after = compile_after
        # the process's thread count, read here (in fit): eager streams call the engine from single-threaded
        # threads, and the package is compiled for the count its key names
        self.threads = torch.get_num_threads()
        self.judge = judge  # backend="auto": the package is timed against eager and kept only if it gains
        self._fn: Callable | None = None
        self._checked = False
        self._child = None
        self._given_up = False
        self._looked = 0.0
        self._spent: float | None = None  # eager seconds recorded before this run (read at its first batch)
        self._eager_s = 0.0  # eager seconds of this run, not yet recorded
        self._left = self._done = 0  # images of this run still to compute, and computed eagerly so far
        self.hold = False  # True while the runner's eager streams run: the package is not taken up mid-segment
        self.slower = False  # the compiling process timed the package no faster than eager (backend="auto")
        self.compiled_batches = 0  # batches the package ran (observability for tests and benchmarks)

    @property
    def ready(self) -> bool:
        return self._fn is not None

    @property
    def started(self) -> bool:
        """Whether this engine started the package's compilation."""
        return bool(self._child)

    def _give_up(self, why: str) -> None:
        self._fn, self._given_up = None, True
        warnings.warn(f"the compiled graph cannot be used ({why}); running eager PyTorch instead.", BackendWarning,
                      stacklevel=4)

    @property
    def _judged(self) -> bool:
        """backend="auto" and the package was timed: whether it gained enough is decided."""
        return self.judge and read_verdict(self.path) is not None

    def _wanted(self) -> bool:
        return (self._fn is None and not self._given_up and self._child is None and not self.path.exists()
                and not self._judged)

    def _start(self, idle: bool) -> None:
        with _START_LOCK:  # eager streams call the engine from several threads
            if self._wanted():
                self._start_locked(idle)

    def _start_locked(self, idle: bool) -> None:
        try:
            self._child = compile_in_background(self._params, self.path, self.batch_size, self.threads,
                                                idle=idle, verdict=self.judge) or False
        except NotRebuildable as exc:
            self._give_up(f"the compiling process cannot rebuild this model: {exc}")

    def finished_run(self) -> None:
        """Called when a run ends: record its eager time; start the compilation if it is due and nobody runs it.

        At the lowest priority: a compilation takes cores and memory bandwidth
        from a run beside it, and no run waits for this one.
        """
        deferred = self.compile_after > 0
        if deferred and self._eager_s:
            record_eager_seconds(self.path, self._eager_s)
        spent = (self._spent or 0.0) + self._eager_s
        self._spent, self._eager_s = None, 0.0
        if self._wanted() and (not deferred or spent >= self.compile_after):
            self._start(idle=True)

    def poll(self) -> bool:
        """Take up the package if it has appeared (the runner calls this between its eager stream segments)."""
        if self._fn is None and not self._given_up:
            self._looked = time.monotonic()
            self._look()
        return self._fn is not None

    def _look(self) -> None:
        """Load the package if it has appeared; report a compilation that failed."""
        if self.judge:
            verdict = read_verdict(self.path)
            if verdict is not None and verdict["gain"] < MIN_GAIN:  # measured: eager stays, quietly
                self.slower = self._given_up = True
                return
        if self.path.exists():
            try:
                self._fn = load_package(self.path)
            except Exception as exc:  # a damaged package: removed, compiled again next time
                self.path.unlink(missing_ok=True)
                self._give_up(f"{self.path.name} does not load: {type(exc).__name__}: {str(exc)[:200]}")
            return
        if self._child and self._child.poll() not in (None, 0):  # a Popen; False: another process compiles it
            self.path.with_suffix(".lock").unlink(missing_ok=True)  # a child that died before it could
            log = self.path.with_suffix(".log")
            last = log.read_text(errors="replace").strip().splitlines()[-1:] if log.exists() else []
            self._give_up(f"compilation failed: {last[0][:300] if last else 'exit code ' + str(self._child.returncode)}")

    def _run_eager(self, x: torch.Tensor) -> list:
        """Eager PyTorch, timed: a run that has cost as much as a compilation starts it (at normal priority,
        since this run will switch to the package when it is ready)."""
        if self._given_up or self.compile_after <= 0 or not math.isfinite(self.compile_after):
            return self.eager(x)
        if self._spent is None:
            self._spent = eager_seconds(self.path)
        t = time.perf_counter()
        out = self.eager(x)
        self._eager_s += time.perf_counter() - t
        self._done += x.shape[0]
        self._left -= x.shape[0]
        if self._spent + self._eager_s >= self.compile_after and self._left > 0:
            left_s = self._left * self._eager_s / self._done  # this run's eager work still to come
            if left_s >= MID_RUN_FACTOR * self.compile_after and self._wanted():  # the files last: once per batch
                self._start(idle=False)
        return out

    def begin_run(self, images: int) -> None:
        """Called when a run starts, with the number of images it will compute."""
        self._left, self._done = images, 0

    def __call__(self, x: torch.Tensor) -> list:
        if self.hold:
            return self._run_eager(x) if self._fn is None else self.eager(x)
        if self._fn is None and not self._given_up and (time.monotonic() - self._looked > 0.05 or not self._looked):
            self._looked = time.monotonic()
            self._look()
        if self._fn is None or x.shape[0] != self.batch_size:
            return self._run_eager(x) if self._fn is None else self.eager(x)
        outs = self._fn(x)
        parts = self.cap.parts
        it = iter(outs)
        got = [{p: next(it) for p in ps} for ps in parts]
        if not self._checked:
            # checked on the batch's first image only: a wrong package is wrong everywhere, and the check
            # costs an eighth of an eager batch instead of a whole one on a new extractor's first call
            want = self.eager(x[:1])
            why = disagreement(want, [{p: v[:1] for p, v in d.items()} for d in got],
                               RTOL_BF16 if self._params.get("precision") == "bf16" else RTOL)
            if why is not None:
                self.path.unlink(missing_ok=True)
                self._give_up(f"it disagrees with eager PyTorch: {why}")
                return self.eager(x)
            self._checked = True
        self.compiled_batches += 1
        return got
