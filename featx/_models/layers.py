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
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

from .._exceptions import ParameterError, alt, arg
from .pooling import channels, default_layout, layer_parts, pool

__all__ = ["LayerInfo", "Target", "probe", "resolve_layers", "LayerCapture", "stage_names", "block_names",
           "prefix_tokens"]

PRE_LOGITS = "pre_logits"
OUTPUT = "output"
#: Where a message sends a user for every layer name (``featx layers MODEL`` on the command line).
LIST_LAYERS = alt("featx.list_layers(model)", "'featx layers {model}'")


class LayerInfo(NamedTuple):
    """One selectable layer of a backbone, as :func:`~featx.list_layers` reports it.

    Parameters
    ----------
    name : str
        The module name, as ``named_modules()`` reports it (or ``pre_logits``
        / ``output``).
    alias : str or None
        featx's alias for it (``stage3``, ``block12``, ``pre_logits``...), if any.
    shape : tuple of int
        Per-image output shape (no batch axis).
    layout : {"nchw", "nhwc", "tokens", "vec"}
        How ``shape`` reads: ``(C, H, W)`` maps, ``(H, W, C)`` maps, ``(L, C)``
        token sequences, or a vector.
    prefix : int
        For token sequences, the class/register tokens at their start
        (excluded by ``avg``/``max``/``gem`` pooling).

    Examples
    --------
    >>> from featx import list_layers
    >>> layer = [l for l in list_layers("resnet18") if l.alias == "stage5"][0]
    >>> layer
    LayerInfo(name='layer4', alias='stage5', shape=(512, 7, 7), layout='nchw', prefix=0)
    >>> layer.channels
    512
    """

    name: str
    alias: str | None
    shape: tuple[int, ...]
    layout: str = "nchw"
    prefix: int = 0  # class/register tokens first in a token sequence (excluded by avg/max/gem)

    @property
    def channels(self) -> int:
        """Features per image of one elementary pooling (``avg``, ``max``, ``cls``...) of this layer."""
        return channels(self.shape, self.layout)


@dataclass
class _Record:
    name: str
    shape: tuple[int, ...] | None  # per-image shape of the last call's output, None if not a tensor
    calls: int
    leaf: bool
    module_type: type
    layout: str = ""  # see LayerInfo; set once the probe has run
    prefix: int = 0  # class/register tokens at the start of a token sequence


@dataclass
class Probe:
    """What one forward pass on a dummy batch revealed about a backbone."""

    records: dict[str, _Record]  # in execution order (first call)
    classifier: str | None  # module whose input is pre_logits
    classifier_input: tuple[int, ...] | None
    stages: list[str]
    blocks: list[str] = field(default_factory=list)  # transformer blocks (aliases blockK)
    aliases: dict[str, str] = field(default_factory=dict)  # the backbone's own aliases (e.g. CLIP's "embedding")


@dataclass(frozen=True)
class Target:
    """A resolved layer request: the name shown to users and what to hook."""

    display: str
    module: str
    kind: str  # "output" or "input"
    calls: int
    shape: tuple[int, ...]
    layout: str = ""  # "" (from extractors pickled before layouts existed): by rank, see default_layout
    prefix: int = 0


class _StopForward(Exception):
    """Raised from a hook to end the forward pass once every requested layer is captured."""


def _first_tensor(out: Any) -> torch.Tensor | None:
    """The tensor a module's output stands for: itself, the first of a tuple, or the first
    value of a mapping (a Hugging Face ``ModelOutput``, e.g. ``last_hidden_state``)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


def probe(module: nn.Module, input_size: tuple[int, int], device: torch.device,
          classifier: str | None = None, stages: list[str] | None = None,
          aliases: dict[str, str] | None = None, channels: int = 3) -> Probe:
    """Run one dummy image (``channels`` x ``input_size``) through ``module`` and record every module's output."""
    records: dict[str, _Record] = {}
    cls_input: dict[str, tuple[int, ...]] = {}
    handles = []

    def make_hook(name: str, sub: nn.Module):
        leaf = next(iter(sub.children()), None) is None

        def hook(_m, args, out):
            t = _first_tensor(out)
            # one row per image, or it cannot be pooled per image (e.g. Swin's attention windows)
            shape = tuple(t.shape[1:]) if t is not None and t.ndim >= 2 and t.shape[0] == 1 else None
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
        x = torch.randn((1, channels, *input_size), generator=gen).to(device)
        with torch.inference_mode():
            try:
                module(x)
            except Exception as exc:
                raise ParameterError(
                    f"the model failed on a {input_size[0]}x{input_size[1]} input ({type(exc).__name__}: {exc}). "
                    f"If it expects another size, pass {arg('preprocess', {'input_size': ...})}.", "preprocess"
                ) from exc
    finally:
        for h in handles:
            h.remove()

    if classifier is None:
        leaves = [r for r in records.values() if r.leaf]
        if leaves and issubclass(leaves[-1].module_type, nn.Linear):
            classifier = leaves[-1].name
    cin = cls_input.get(classifier) if classifier else None
    _set_layouts(module, records, input_size)
    blocks = block_names(module, records)
    if stages is None:
        # a transformer's patchify convolution is not a stage: probed stages only for non-transformers
        stages = [] if blocks else stage_names(module, records)
    if blocks == stages:  # timm lists a ViT's blocks as its feature stages: they are blocks
        stages = []
    return Probe(records=records, classifier=classifier, classifier_input=cin, stages=stages, blocks=blocks,
                 aliases=dict(aliases or {}))


_NCHW_TYPES = (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def prefix_tokens(module: nn.Module) -> int:
    """Class, register and distillation tokens at the start of a transformer's token sequences.

    timm models say it (``num_prefix_tokens``); a Hugging Face ViT/DINOv2 has a
    class token plus ``config.num_register_tokens``; an open_clip or
    torchvision ViT has a class token (``class_embedding`` / ``class_token``).
    """
    n = getattr(module, "num_prefix_tokens", None)
    if isinstance(n, int):
        return n
    config = getattr(module, "config", None)
    if config is not None and hasattr(config, "image_size") and hasattr(config, "hidden_size"):
        return 1 + int(getattr(config, "num_register_tokens", 0) or 0)
    if any(hasattr(module, a) for a in ("class_embedding", "class_token", "cls_token")):
        return 1
    return 0


def _map_layout(rec: _Record, input_size: tuple[int, int], root_fmt: str) -> str:
    """``"nchw"`` or ``"nhwc"`` for a 3-D per-image shape.

    Convolutions, 2-D batch norms and 2-D pools produce (C, H, W). Otherwise
    the two axes whose ratio is the input's aspect ratio are the spatial ones
    (H == W for square inputs); when both readings fit (e.g. 16 x 16 x 16),
    the model's own ``output_fmt`` decides (timm's Swin says ``"NHWC"``).
    """
    if issubclass(rec.module_type, _NCHW_TYPES):
        return "nchw"
    a, b, c = rec.shape
    aspect = input_size[0] / input_size[1]

    def fits(h: int, w: int) -> bool:
        return abs(h / w - aspect) <= 0.5 * aspect / min(h, w) + 1e-9

    chw, hwc = fits(b, c), fits(a, b)
    if chw != hwc:
        return "nchw" if chw else "nhwc"
    return "nhwc" if root_fmt.upper() == "NHWC" else "nchw"


def _set_layouts(module: nn.Module, records: dict[str, _Record], input_size: tuple[int, int]) -> None:
    root_fmt = str(getattr(module, "output_fmt", "NCHW"))
    prefix = prefix_tokens(module)
    lengths = [r.shape[0] for r in records.values() if r.shape is not None and len(r.shape) == 2]
    # prefix tokens belong to sequences of the transformer's main length (not e.g. a patch embedding's)
    seq_len = max(lengths, key=lengths.count) if lengths else None
    for rec in records.values():
        if rec.shape is None:
            continue
        rec.layout = _map_layout(rec, input_size, root_fmt) if len(rec.shape) == 3 else default_layout(rec.shape)
        if rec.layout == "tokens" and rec.shape[0] == seq_len and rec.shape[0] > prefix:
            rec.prefix = prefix


def block_names(module: nn.Module, records: dict[str, _Record]) -> list[str]:
    """A transformer's blocks: the longest list of modules (``nn.Sequential`` / ``nn.ModuleList``)
    whose children all output token sequences of one shape (timm's ``blocks``, Hugging Face's
    ``encoder.layer``, open_clip's ``transformer.resblocks``); [] for other models."""
    best: list[str] = []
    for name, sub in module.named_modules():
        if not isinstance(sub, (nn.Sequential, nn.ModuleList)) or len(sub) < 2:
            continue
        names = [f"{name}.{k}" if name else k for k, _ in sub.named_children()]
        recs = [records.get(n) for n in names]
        shapes = {r.shape for r in recs if r is not None}
        if (all(r is not None and r.layout == "tokens" for r in recs) and len(shapes) == 1
                and len(names) > len(best)):
            best = names
    return best


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
        if rec is None or rec.shape is None or len(rec.shape) != 3:
            return None
        return rec.shape[:2] if rec.layout == "nhwc" else rec.shape[1:]

    candidates: list[str] = []
    for name, child in module.named_children():
        grand = [f"{name}.{g}" for g, _ in child.named_children()]
        sizes = {spatial(g) for g in grand} - {None}
        if isinstance(child, (nn.Sequential, nn.ModuleList)) and len(sizes) >= 2:
            candidates.extend(grand)  # a trunk that spans several resolutions
        else:
            candidates.append(name)
    order = {n: i for i, n in enumerate(records)}
    maps = [(order[n], n, spatial(n)) for n in candidates if spatial(n) is not None]
    maps.sort()
    stages: list[str] = []
    last_hw = None
    for _, name, hw in maps:
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
    aliases = {v: k for k, v in _aliases(pr).items()}
    rows = []
    if pr.classifier_input is not None:
        rows.append(LayerInfo(PRE_LOGITS, PRE_LOGITS, pr.classifier_input, "vec"))
    for name, rec in pr.records.items():
        if rec.shape is None:
            continue
        display = name or OUTPUT
        alias = aliases.get(name, OUTPUT if name == "" else None)
        rows.append(LayerInfo(display, alias, rec.shape, rec.layout, rec.prefix))
    return rows


def _aliases(pr: Probe) -> dict[str, str]:
    """``stageK``, ``blockK`` and the backbone's own aliases -> module name."""
    out = {f"stage{i + 1}": s for i, s in enumerate(pr.stages)}
    out.update({f"block{i + 1}": b for i, b in enumerate(pr.blocks)})
    out.update(pr.aliases)
    return out


def resolve_layers(layers: Any, pr: Probe) -> list[Target]:
    """Resolve the ``layers`` parameter (None, a name or a list of names) to hook targets."""
    if layers is None:
        layers = [PRE_LOGITS]
    elif isinstance(layers, str):
        layers = [layers]
    elif isinstance(layers, (list, tuple)) and layers and all(isinstance(n, str) for n in layers):
        layers = list(layers)
    else:
        raise ParameterError(
            f"{arg('layers', layers)} is invalid. Pass None (the pre-logits features), a layer name, "
            f"or a non-empty list of layer names (see {LIST_LAYERS}).", "layers")
    stage_alias = _aliases(pr)
    valid = [n or OUTPUT for n, r in pr.records.items() if r.shape is not None]
    targets: list[Target] = []
    seen: dict[tuple[str, str], str] = {}
    for req in layers:
        if req == PRE_LOGITS:
            if pr.classifier is not None and pr.classifier_input is not None:
                rec = pr.records[pr.classifier]
                tgt = Target(PRE_LOGITS, pr.classifier, "input", rec.calls, pr.classifier_input, "vec")
            else:  # no classifier head: the model's own output is the embedding
                rec = pr.records[""]
                tgt = Target(PRE_LOGITS, "", "output", rec.calls, rec.shape, rec.layout, rec.prefix)
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
                raise ParameterError(
                    f"layer {req!r} not found{hint} Aliases: {', '.join(aliases)}; or any module name. "
                    f"See {LIST_LAYERS} for every name with its output shape.", "layers")
            tgt = Target(req, name, "output", rec.calls, rec.shape, rec.layout, rec.prefix)
        key = (tgt.module, tgt.kind)
        if key in seen:
            raise ParameterError(
                f"{alt('layers', '--layers')} names the same layer twice ({seen[key]!r} and {req!r}); list each layer once.",
                "layers")
        seen[key] = req
        targets.append(tgt)
    return targets


def _hook(capture: "weakref.ref[LayerCapture]", i: int):
    def hook(_m, _args, out):
        cap = capture()
        if cap is not None:
            cap.store(i, out)

    return hook


def _pre_hook(capture: "weakref.ref[LayerCapture]", i: int):
    def hook(_m, args):
        cap = capture()
        if cap is not None:
            cap.store(i, args[0] if args else None)

    return hook


def _remove(handles: list) -> None:
    for h in handles:
        h.remove()


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
        self.parts = [layer_parts(t.shape, p) for t, p in zip(targets, parts)]
        self.gem_p = gem_p
        self._local = threading.local()  # results, counts, missing, active: one call per thread
        named = dict(module.named_modules())
        me = weakref.ref(self)
        handles = []
        for i, t in enumerate(targets):
            sub = named[t.module]
            if t.kind == "input":
                handles.append(sub.register_forward_pre_hook(_pre_hook(me, i)))
            else:
                handles.append(sub.register_forward_hook(_hook(me, i)))
        # the module may be shared by many captures (featx._runtime.network): each removes its own hooks when collected
        self._release = weakref.finalize(self, _remove, handles)

    def store(self, i: int, value: Any) -> None:
        st = self._local
        if not getattr(st, "active", False):  # the backbone is being run directly, not through the capture
            return
        st.counts[i] += 1
        if st.counts[i] != self.targets[i].calls:
            return
        st.results[i] = self._pooled(i, value) if st.stop else value
        st.missing -= 1
        if st.missing == 0 and st.stop:
            raise _StopForward

    def _pooled(self, i: int, value: Any) -> dict[str, torch.Tensor]:
        t = _first_tensor(value).float()  # once for all its parts (pool would convert it for each)
        tg = self.targets[i]
        return {p: pool(t, "avg" if p == "vec" else p, self.gem_p, tg.layout, tg.prefix) for p in self.parts[i]}

    def close(self) -> None:
        """Remove this capture's hooks from the module now (they are removed when it is collected anyway)."""
        self._release()

    def run(self, x: torch.Tensor, *, stop: bool = True) -> list[dict[str, torch.Tensor]]:
        """Pooled outputs per target: ``[{part: (N, d) float32 tensor}]``.

        ``stop``: end the forward pass once the deepest target has run (by an
        exception from its hook). ``stop=False`` runs the whole forward pass,
        for graph capture (``torch.export`` follows no exceptions): the layers
        after the deepest target then compute nothing that is returned, and a
        compiler drops them as dead code. The pooling then runs after the
        forward pass, not in the hooks, so that a traced graph attributes no
        pooling operation to the hooked modules (PT2E's quantizer matches
        module patterns and refuses a convolution or an activation whose
        output feeds featx's pooling from inside).
        """
        n = len(self.targets)
        st = self._local
        st.results, st.counts, st.missing, st.active, st.stop = [None] * n, [0] * n, n, True, stop
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
        return results if stop else [self._pooled(i, v) for i, v in enumerate(results)]
