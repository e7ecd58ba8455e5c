"""Pretrained weights that need a download: found in the local cache, or a clear error at once when offline.

Without this, timm's Hugging Face downloads retry for most of a minute
("Retrying in 8s") and torchvision prints a ``Downloading: https://...`` line
before failing. featx looks in the caches first (torch hub's
``checkpoints/`` folder, the Hugging Face hub cache); when the weights are not
there, it tries one connection to the download host (or the HTTPS proxy) with
a short timeout, and if that fails raises :class:`featx.ModelLoadError`
saying how to get the weights. Weights that are cached are loaded offline
(Hugging Face's offline mode for the call), so nothing waits on a network.
"""

from __future__ import annotations

import contextlib
import socket
import urllib.request
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

from .._exceptions import ModelLoadError, alt, arg
from .._options import DEFAULT_MODEL

__all__ = ["OFFLINE_CHOICES", "reachable", "torchvision_weights_ready", "timm_weights_ready"]

#: Seconds to wait for one TCP connection to a download host.
CONNECT_TIMEOUT = 3.0

#: What a user without the network can do instead (the parameters as parts: the CLI names its flags).
OFFLINE_CHOICES = (
    f"pass {alt('weights=<path to a local .pth/.safetensors file>', '--weights <path to a local .pth/.safetensors file>')}, "
    f"{arg('weights', None)} for random initialisation, or use featx's offline default {arg('model', DEFAULT_MODEL)}."
)

_OFFLINE_HINT = (
    "To work offline, download the weights once on a machine with a network (the same call there fills the "
    "cache), copy the cache folder over, or " + OFFLINE_CHOICES
)


def reachable(url: str, timeout: float = CONNECT_TIMEOUT) -> bool:
    """Whether one TCP connection to ``url``'s host (or to the HTTPS proxy) opens within ``timeout`` seconds."""
    target = urllib.request.getproxies().get(urlparse(url).scheme) or url
    parsed = urlparse(target if "://" in target else f"http://{target}")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def _hub_checkpoint(url: str) -> Path:
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


def torchvision_weights_ready(name: str, weights_enum: Any) -> None:
    """Return when ``weights_enum`` is cached or its host answers; else raise at once."""
    url = weights_enum.url
    path = _hub_checkpoint(url)
    if path.exists() or reachable(url):
        return
    raise ModelLoadError(
        f"the pretrained weights of torchvision model {name!r} ({weights_enum}) are not in the local cache "
        f"({path}) and {urlparse(url).hostname} cannot be reached (no network?). On a machine with a network, "
        f"`python -c \"import torchvision; torchvision.models.get_model('{name}', weights='{weights_enum.name}')\"` "
        f"downloads {path.name} into torch's cache; copy it into {path.parent} here. {_OFFLINE_HINT}"
    )


def _hf_cached(repo: str, filename: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    names = [filename] if filename else ["model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"]
    return any(isinstance(try_to_load_from_cache(repo, n), str) for n in names)


@contextlib.contextmanager
def timm_weights_ready(name: str) -> Iterator[None]:
    """Around ``timm.create_model(name, pretrained=True)``: offline mode when the weights are cached and
    the hub is unreachable; a :class:`featx.ModelLoadError` at once when they are not cached either."""
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:  # an unknown name: timm.create_model says so
        cfg = None
    if cfg is None:
        yield
        return
    repo = getattr(cfg, "hf_hub_id", None)
    if repo:
        from huggingface_hub import constants

        cached = _hf_cached(repo, getattr(cfg, "hf_hub_filename", None))
        host_url = constants.ENDPOINT
        online = not constants.HF_HUB_OFFLINE and reachable(host_url)
    else:
        url = getattr(cfg, "url", None) or ""
        cached = bool(url) and _hub_checkpoint(url).exists()
        host_url = url
        online = bool(url) and reachable(url)
    if online:
        yield
        return
    if not cached:
        where = f"the Hugging Face hub cache ({repo})" if repo else f"torch's cache ({_hub_checkpoint(host_url)})"
        raise ModelLoadError(
            f"the pretrained weights of timm model {name!r} are not in {where} and "
            f"{urlparse(host_url).hostname or 'the download host'} cannot be reached (no network, or HF_HUB_OFFLINE=1). "
            f"On a machine with a network, `python -c \"import timm; timm.create_model('{name}', pretrained=True)\"` "
            "fills the cache (~/.cache/huggingface); copy it here and set HF_HUB_OFFLINE=1. " + _OFFLINE_HINT
        )
    if repo:  # cached but unreachable: load from the cache without a single retry
        from huggingface_hub import constants

        saved = constants.HF_HUB_OFFLINE
        constants.HF_HUB_OFFLINE = True
        try:
            yield
        finally:
            constants.HF_HUB_OFFLINE = saved
    else:
        yield
