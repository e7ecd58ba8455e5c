"""open_clip image towers as featx backbones (``model="open_clip:ViT-B-32"``; the ``clip`` extra).

The backbone is the CLIP model's ``visual`` tower. Its output, alias
``"embedding"`` (also ``pre_logits``: the tower has no classifier), is the
projected image embedding that ``encode_image`` returns, unnormalised;
``block1`` ... ``blockN`` are its transformer blocks (class token first).
Preprocessing is the tower's own ``preprocess_cfg`` (CLIP's mean and std,
bicubic resize of the shorter side to the input size, center crop).
"""

from __future__ import annotations

import logging
from typing import Any

from .weights import Backbone, download_message
from .._exceptions import ModelLoadError, ParameterError, arg

__all__ = ["build_open_clip", "EMBEDDING"]

#: Alias of a CLIP tower's projected image embedding.
EMBEDDING = "embedding"


def _import():
    try:
        import open_clip
    except ImportError as exc:
        raise ImportError(
            "model='open_clip:...' needs the open_clip package: pip install 'featx[clip]' "
            "(or pip install open_clip_torch)."
        ) from exc
    return open_clip


def build_open_clip(name: str, weights: Any) -> Backbone:
    """The image tower of open_clip model ``name`` as a ``Backbone``.

    ``weights``: ``"DEFAULT"`` (the first pretrained tag open_clip lists for
    the model, e.g. ``"openai"`` for ViT-B-32), an open_clip pretrained tag
    such as ``"laion2b_s34b_b79k"``, or None (random initialisation).
    """
    open_clip = _import()
    if name not in open_clip.list_models():
        raise ParameterError(f"{arg('model', 'open_clip:' + name)} is not an open_clip model. See "
                             "open_clip.list_models().", "model")
    tags = open_clip.list_pretrained_tags_by_model(name)
    tag = None
    if weights == "DEFAULT":
        if not tags:
            raise ParameterError(f"open_clip model {name!r} has no pretrained weights; use {arg('weights', None)}.",
                                 "weights")
        tag = tags[0]
    elif weights is not None:
        if weights not in tags:
            raise ParameterError(f"{arg('weights', weights)} is not a pretrained tag of open_clip model {name!r}. "
                                 f"Tags: {', '.join(tags) or 'none'}; or 'DEFAULT' or None.", "weights")
        tag = weights
    quiet = logging.getLogger()  # open_clip logs a warning for every random initialisation
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        model = open_clip.create_model(name, pretrained=tag)
    except Exception as exc:  # a download that failed (offline) surfaces in many types
        if tag is None:
            raise
        raise ModelLoadError(download_message(f"open_clip model {name!r} ({tag})", exc)) from exc
    finally:
        quiet.setLevel(level)
    visual = model.visual
    pc = getattr(visual, "preprocess_cfg", None) or {}
    size = pc.get("size", getattr(visual, "image_size", 224))
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    interp = pc.get("interpolation", "bicubic")
    preprocess = {
        "input_size": (int(h), int(w)),
        "resize_size": int(min(h, w)),  # resize_mode "shortest" then center crop, as open_clip does
        "mean": tuple(float(v) for v in pc.get("mean", open_clip.OPENAI_DATASET_MEAN)),
        "std": tuple(float(v) for v in pc.get("std", open_clip.OPENAI_DATASET_STD)),
        "interpolation": interp if interp in ("bilinear", "bicubic", "nearest") else "bicubic",
    }
    return Backbone(
        module=visual,
        preprocess=preprocess,
        identity=f"open_clip:{name}",
        weights=None if tag is None else f"open_clip:{name}/{tag}",
        aliases={EMBEDDING: ""},
    )
