"""Layer selection: list a backbone's layers, resolve names and aliases, and run
the forward pass only as far as the deepest requested layer.

Outputs are captured with forward hooks on named modules (the most general
mechanism: graph tracing fails on some models). Once every requested layer has
produced its output, the hook raises a private exception that ends the forward
pass, so no compute is spent on the layers after it.
"""

from __future__ import annotations

import difflib
import threading
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from ._pooling import pool

__all__ = ["LayerInfo", "Target", "probe", "resolve_layers", "LayerCapture", "stage_names"]

PRE_LOGITS = "pre_logits"
OUTPUT = "output"


class LayerInfo(NamedTuple):
    """One selectable layer: its module name, its featx alias (or None), and its
    per-image output shape (no batch axis)."""

    name: str
    alias: str | None
    shape: tuple[int, ...]


@dataclass
class _Record:
    name: str
    shape: tuple[int, ...] | None  # per-image shape of the last call's output, None if not a tensor
    calls: int
    leaf: bool
    module_type: type


@dataclass
class Probe:
    """What one forward pass on a dummy batch revealed about a backbone."""

    records: dict[str, _Record]  # in execution order (first call)
    classifier: str | None  # module whose input is pre_logits
    classifier_input: tuple[int, ...] | None
    stages: list[str]


@dataclass(frozen=True)
class Target:
    """A resolved layer request: the name shown to users and what to hook."""

    display: str
    module: str
    kind: str  # "output" or "input"
    calls: int
    shape: tuple[int, ...]


class _StopForward(Exception):
    """Raised from a hook to end the forward pass once every requested layer is captured."""


def _first_tensor(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


def probe(module: nn.Module, input_size: tuple[int, int], device: torch.device,
          classifier: str | None = None, stages: list[str] | None = None) -> Probe:
    """Run one dummy image through ``module`` and record every module's output."""
    records: dict[str, _Record] = {}
    cls_input: dict[str, tuple[int, ...]] = {}
    handles = []

    def make_hook(name: str, sub: nn.Module):
        leaf = next(iter(sub.children()), None) is None

        def hook(_m, args, out):
            t = _first_tensor(out)
            shape = tuple(t.shape[1:]) if t is not None else None
            rec = records.get(name)
            if rec is None:
                records[name] = _Record(name, shape, 1, leaf, type(sub))
            else:
                rec.shape, rec.calls = shape, rec.calls + 1
                records[name] = records.pop(name)  # keep dict order = order of last call
            if args and isinstance(args[0], torch.Tensor):
                cls_input[name] = tuple(args[0].shape[1:])

        return hook

    for name, sub in module.named_modules():
        handles.append(sub.register_forward_hook(make_hook(name, sub)))
    try:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn((1, 3, *input_size), generator=gen).to(device)
        with torch.inference_mode():
            module(x)
    finally:
        for h in handles:
            h.remove()

    if classifier is None:
        leaves = [r for r in records.values() if r.leaf]
        if leaves and issubclass(leaves[-1].module_type, nn.Linear):
            classifier = leaves[-1].name
    cin = cls_input.get(classifier) if classifier else None
    if stages is None:
        stages = stage_names(module, records)
    return Probe(records=records, classifier=classifier, classifier_input=cin, stages=stages)


def stage_names(module: nn.Module, records: dict[str, _Record]) -> list[str]:
    """Stage outputs of a backbone without timm's ``feature_info``.

    The candidates are the top-level children, descending once into a
    container child whose children change resolution (a trunk such as
    torchvision's ``features``).
    For each run of equal spatial size, the last module is the stage's output;
    1x1 maps (global pooling) are not stages.
    """
    def spatial(n: str):
        rec = records.get(n)
        return rec.shape[1:] if rec is not None and rec.shape is not None and len(rec.shape) == 3 else None

    candidates: list[str] = []
    for name, child in module.named_children():
        grand = [f"{name}.{g}" for g, _ in child.named_children()]
        sizes = {spatial(g) for g in grand} - {None}
        if isinstance(child, (nn.Sequential, nn.ModuleList)) and len(sizes) >= 2:
            candidates.extend(grand)  # a trunk that spans several resolutions
        else:
            candidates.append(name)
    order = {n: i for i, n in enumerate(records)}
    maps = [(order[n], n, records[n].shape) for n in candidates
            if n in records and records[n].shape is not None and len(records[n].shape) == 3]
    maps.sort()
    stages: list[str] = []
    last_hw = None
    for _, name, shape in maps:
        hw = shape[1:]
        if hw == (1, 1):
            continue
        if hw == last_hw:
            stages[-1] = name
        else:
            stages.append(name)
            last_hw = hw
    return stages


def layer_table(pr: Probe) -> list[LayerInfo]:
    """Every selectable layer in execution order, with aliases and shapes."""
    aliases = {s: f"stage{i + 1}" for i, s in enumerate(pr.stages)}
    rows = []
    if pr.classifier_input is not None:
        rows.append(LayerInfo(PRE_LOGITS, PRE_LOGITS, pr.classifier_input))
    for name, rec in pr.records.items():
        if rec.shape is None:
            continue
        display = name or OUTPUT
        alias = aliases.get(name, OUTPUT if name == "" else None)
        rows.append(LayerInfo(display, alias, rec.shape))
    return rows


def resolve_layers(layers: Any, pr: Probe) -> list[Target]:
    """Resolve the ``layers`` parameter (None, a name or a list of names) to hook targets."""
    if layers is None:
        layers = [PRE_LOGITS]
    elif isinstance(layers, str):
        layers = [layers]
    elif isinstance(layers, (list, tuple)) and layers and all(isinstance(n, str) for n in layers):
        layers = list(layers)
    else:
        raise ValueError(
            f"layers={layers!r} is invalid. Pass None (the pre-logits features), a layer name, "
            "or a non-empty list of layer names (see featx.list_layers(model))."
        )
    stage_alias = {f"stage{i + 1}": s for i, s in enumerate(pr.stages)}
    valid = [n or OUTPUT for n, r in pr.records.items() if r.shape is not None]
    targets: list[Target] = []
    seen: dict[tuple[str, str], str] = {}
    for req in layers:
        if req == PRE_LOGITS:
            if pr.classifier is not None and pr.classifier_input is not None:
                rec = pr.records[pr.classifier]
                tgt = Target(PRE_LOGITS, pr.classifier, "input", rec.calls, pr.classifier_input)
            else:  # no classifier head: the model's own output is the embedding
                rec = pr.records[""]
                tgt = Target(PRE_LOGITS, "", "output", rec.calls, rec.shape)
        else:
            if req == OUTPUT:
                name = ""
            elif req in pr.records:  # a real module name wins over an alias
                name = req
            else:
                name = stage_alias.get(req, req)
            rec = pr.records.get(name)
            if rec is None or rec.shape is None:
                aliases = list(stage_alias) + [PRE_LOGITS, OUTPUT]
                top = aliases + [n for n in valid if "." not in n]  # submodules only when nothing above is close
                close = (difflib.get_close_matches(req, top, n=3, cutoff=0.6)
                         or difflib.get_close_matches(req, valid, n=3, cutoff=0.6))
                hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else "."
                raise ValueError(
                    f"layer {req!r} not found{hint} Aliases: {', '.join(aliases)}; or any module name. "
                    "See featx.list_layers(model) for every name with its output shape."
                )
            tgt = Target(req, name, "output", rec.calls, rec.shape)
        key = (tgt.module, tgt.kind)
        if key in seen:
            raise ValueError(
                f"layers names the same layer twice ({seen[key]!r} and {req!r}); list each layer once."
            )
        seen[key] = req
        targets.append(tgt)
    return targets


class LayerCapture:
    """Runs a backbone on a batch and returns the pooled outputs of its targets.

    ``parts[i]`` lists the elementary poolings (``avg``, ``max``, ``gem``,
    ``flatten``) to compute for target ``i``; a target whose output is already
    a vector gets the single part ``vec``. Pooling happens inside the hook, so
    no full-size map outlives its layer and in-place ops after it cannot
    change it. The state of a call is per thread, so several threads may run
    the same capture at once (featx's CPU streams do).
    """

    def __init__(self, module: nn.Module, targets: list[Target], parts: list[tuple[str, ...]], gem_p: float):
        self.module = module
        self.targets = targets
        self.parts = [("vec",) if len(t.shape) == 1 else tuple(p) for t, p in zip(targets, parts)]
        self.gem_p = gem_p
        self._local = threading.local()  # results, counts, missing, active: one call per thread
        self._handles = []
        named = dict(module.named_modules())
        for i, t in enumerate(targets):
            sub = named[t.module]
            if t.kind == "input":
                self._handles.append(sub.register_forward_pre_hook(self._make_pre_hook(i)))
            else:
                self._handles.append(sub.register_forward_hook(self._make_hook(i)))

    def _store(self, i: int, value: Any) -> None:
        st = self._local
        if not getattr(st, "active", False):  # the backbone is being run directly, not through the capture
            return
        st.counts[i] += 1
        if st.counts[i] != self.targets[i].calls:
            return
        t = _first_tensor(value)
        st.results[i] = {p: pool(t, "avg" if p == "vec" else p, self.gem_p) for p in self.parts[i]}
        st.missing -= 1
        if st.missing == 0:
            raise _StopForward

    def _make_hook(self, i: int):
        def hook(_m, _args, out):
            self._store(i, out)

        return hook

    def _make_pre_hook(self, i: int):
        def hook(_m, args):
            self._store(i, args[0] if args else None)

        return hook

    def run(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Pooled outputs per target: ``[{part: (N, d) float32 tensor}]``."""
        n = len(self.targets)
        st = self._local
        st.results, st.counts, st.missing, st.active = [None] * n, [0] * n, n, True
        try:
            self.module(x)
        except _StopForward:
            pass
        finally:
            st.active = False
        if st.missing:
            missing = [t.display for t, r in zip(self.targets, st.results) if r is None]
            raise RuntimeError(f"layer(s) {missing} produced no output in this forward pass.")
        results, st.results = st.results, []
        return results

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The targets' parts, concatenated in order: ``(N, D)``."""
        results = self.run(x)
        cols = [r[p] for r, ps in zip(results, self.parts) for p in ps]
        return torch.cat(cols, dim=1) if len(cols) > 1 else cols[0]
