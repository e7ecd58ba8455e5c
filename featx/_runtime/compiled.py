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

Features agree with eager PyTorch within :data:`RTOL` of their scale, so the
two share cache entries.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

from .._exceptions import BackendWarning
from .._models.layers import LayerCapture
from .device import cpu_capability
from .engines import RTOL, disagreement

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


def publish_package(ep, path: Path) -> None:
    """Compile an exported program with AOTInductor (freezing on) and publish the package at ``path`` atomically.

    It is written under a temporary name beside ``path`` and renamed onto it,
    so readers see no package or a whole one.
    """
    import torch._inductor.config as inductor_config

    fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".tmp.pt2", dir=path.parent)
    os.close(fd)
    try:
        with inductor_config.patch(freezing=True):
            torch._inductor.aoti_compile_and_package(ep, package_path=tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ------------------------------------------------------------------ the compiling process


def _lock(path: Path) -> bool:
    """Take the compile lock for ``path``; False when another live process holds it."""
    lock = path.with_suffix(".lock")
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                if time.time() - lock.stat().st_mtime < STALE_LOCK_S:
                    return False
                lock.unlink()  # a crashed compiler's: take it over
            except OSError:
                return False
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False


def compile_in_background(params: dict, path: Path, batch_size: int, threads: int) -> subprocess.Popen | None:
    """Start a process that compiles the package at ``path`` (None: another process is compiling it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or not _lock(path):
        return None
    fd, spec = tempfile.mkstemp(prefix=path.stem + ".", suffix=".spec", dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        pickle.dump({"params": params, "path": str(path), "batch_size": batch_size, "threads": threads}, f)
    log = open(path.with_suffix(".log"), "wb")  # noqa: SIM115 - the child writes it; kept for the error message
    try:
        return subprocess.Popen(_child_command(spec), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    except OSError:
        path.with_suffix(".lock").unlink(missing_ok=True)
        return None
    finally:
        log.close()


#: The compiling process lowers its priority before it imports anything (torch's import alone is seconds of
#: CPU): SCHED_IDLE where Linux offers it (it runs only on a core nothing else wants), else nice 19.
_CHILD = ("import os\n"
          "try:\n    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))\n"
          "except (AttributeError, OSError):\n"
          "    try:\n        os.nice(19)\n    except (AttributeError, OSError):\n        pass\n"
          "import sys, runpy\nsys.argv = ['featx-compile', {spec!r}]\n"
          "runpy.run_module('featx._runtime.compile_child', run_name='__main__')\n")


def _child_command(spec: str) -> list[str]:
    return [sys.executable, "-c", _CHILD.format(spec=spec)]


# ------------------------------------------------------------------ the engine


class CompiledEngine:
    """Eager PyTorch until the compiled package is there, then the package (checked once against eager)."""

    def __init__(self, cap: LayerCapture, path: Path, batch_size: int, params: dict):
        self.cap, self.path, self.batch_size = cap, path, batch_size
        self.eager = cap.run
        self._params = params  # what the compiling process rebuilds the network from
        self._fn: Callable | None = None
        self._checked = False
        self._child = None
        self._given_up = False
        self._looked = 0.0
        self.compiled_batches = 0  # batches the package ran (observability for tests and benchmarks)

    @property
    def ready(self) -> bool:
        return self._fn is not None

    def _give_up(self, why: str) -> None:
        self._fn, self._given_up = None, True
        warnings.warn(f"the compiled graph cannot be used ({why}); running eager PyTorch instead.", BackendWarning,
                      stacklevel=4)

    def finished_run(self) -> None:
        """Called when a run ends: start the package's compilation if it is missing and nobody compiles it.

        Not before: a compilation under way takes cores and memory bandwidth
        from the eager run beside it (even at the lowest priority), so the
        run that finds the package missing finishes at eager speed, and the
        package serves the runs after it, in this process or another.
        """
        if self._fn is None and not self._given_up and self._child is None and not self.path.exists():
            self._child = compile_in_background(self._params, self.path, self.batch_size,
                                                torch.get_num_threads()) or False

    def _look(self) -> None:
        """Load the package if it has appeared; report a compilation that failed."""
        if self.path.exists():
            try:
                self._fn = torch._inductor.aoti_load_package(str(self.path))
            except Exception as exc:  # a damaged package: removed, compiled again next time
                self.path.unlink(missing_ok=True)
                self._give_up(f"{self.path.name} does not load: {type(exc).__name__}: {str(exc)[:200]}")
            return
        if self._child and self._child.poll() not in (None, 0):  # a Popen; False: another process compiles it
            self.path.with_suffix(".lock").unlink(missing_ok=True)  # a child that died before it could
            log = self.path.with_suffix(".log")
            last = log.read_text(errors="replace").strip().splitlines()[-1:] if log.exists() else []
            self._give_up(f"compilation failed: {last[0][:300] if last else 'exit code ' + str(self._child.returncode)}")

    def __call__(self, x: torch.Tensor) -> list:
        if self._fn is None and not self._given_up and (time.monotonic() - self._looked > 0.05 or not self._looked):
            self._looked = time.monotonic()
            self._look()
        if self._fn is None or x.shape[0] != self.batch_size:
            return self.eager(x)
        outs = self._fn(x)
        parts = self.cap.parts
        it = iter(outs)
        got = [{p: next(it) for p in ps} for ps in parts]
        if not self._checked:
            want = self.eager(x)
            why = disagreement(want, got)
            if why is not None:
                self.path.unlink(missing_ok=True)
                self._give_up(f"it disagrees with eager PyTorch: {why}")
                return want
            self._checked = True
        self.compiled_batches += 1
        return got
