"""featx's exceptions and warnings.

Every exception subclasses the builtin a user would already catch, so
``except ValueError`` keeps working around a featx call.
"""

from __future__ import annotations

import json
from typing import Any, Callable

__all__ = [
    "ParameterError",
    "FeatxWarning",
    "DeviceWarning",
    "CacheWarning",
    "BackendWarning",
    "ImageLoadWarning",
    "ImageLoadError",
    "ModelLoadError",
    "OutputError",
]


class FeatxWarning(UserWarning):
    """Base class of every warning featx emits.

    Filter on it to silence (or raise) all of featx's warnings at once, and on
    a subclass for one kind.

    See Also
    --------
    DeviceWarning, CacheWarning, BackendWarning, ImageLoadWarning

    Examples
    --------
    >>> import warnings
    >>> from featx import CacheWarning, FeatxWarning
    >>> issubclass(CacheWarning, FeatxWarning)
    True
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("error", FeatxWarning)  # every featx warning becomes an exception
    ...     try:
    ...         warnings.warn("cache is read-only", CacheWarning)
    ...     except FeatxWarning as w:
    ...         print(type(w).__name__, w)
    CacheWarning cache is read-only
    """


class DeviceWarning(FeatxWarning):
    """A device or precision request could not be honoured as asked.

    Emitted, for example, when ``precision="bf16"`` is asked of a CPU that only
    emulates bf16 (slower than fp32 there), when CUDA runs out of memory and
    the batch is halved, or when an extractor fitted on a GPU is loaded on a
    machine without one.

    Examples
    --------
    >>> import warnings
    >>> from featx import DeviceWarning
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     warnings.filterwarnings("ignore", category=DeviceWarning)  # I know my CPU emulates bf16
    ...     warnings.warn("bf16 is emulated on this CPU", DeviceWarning)
    >>> caught
    []
    """


class CacheWarning(FeatxWarning):
    """The embedding cache could not be read or written; work goes on without it.

    A corrupt entry is recomputed, a corrupt database file moved aside, an
    unwritable or full cache skipped: features are always correct, only the
    saving is lost.

    Examples
    --------
    >>> import warnings
    >>> from featx import CacheWarning
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     warnings.warn("cache directory is not writable", CacheWarning)
    >>> [type(w.message).__name__ for w in caught]
    ['CacheWarning']
    """


class BackendWarning(FeatxWarning):
    """A requested inference backend could not be used; featx fell back to eager PyTorch.

    The message says why (the model did not export, or its exported graph did
    not match eager PyTorch on a check batch). Features are those of eager
    PyTorch.

    Examples
    --------
    >>> import warnings
    >>> from featx import BackendWarning
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("error", BackendWarning)  # insist on the backend I asked for
    ...     try:
    ...         warnings.warn("could not export this model", BackendWarning)
    ...     except BackendWarning as w:
    ...         print("refused:", w)
    refused: could not export this model
    """


class ImageLoadWarning(FeatxWarning):
    """Some items could not be read and became rows of NaN (``on_error="nan"``).

    Emitted once per ``transform``, with the count and the first few paths;
    the extractor's ``failed_indices_`` lists them all.

    Examples
    --------
    >>> import warnings
    >>> from featx import ImageLoadWarning, PretrainedFeatureExtractor
    >>> ext = PretrainedFeatureExtractor(weights=None, preprocess={"input_size": 32}, on_error="nan").fit()
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     X = ext.transform(["missing.jpg"])
    >>> [type(w.message).__name__ for w in caught], ext.failed_indices_
    (['ImageLoadWarning'], array([0]))
    """


class ChannelsWarning(FeatxWarning):
    """An image with more channels than RGB(A) was read as RGB(A): the extra bands are not used.

    With the default ``in_chans=3``, featx reads 1, 3 or 4 channel images
    (grayscale, RGB, RGB with transparency). A 4-channel array is read as
    RGBA (its fourth channel composited as transparency), and a TIFF with
    more bands than RGB(A) (a near-infrared band, a multispectral stack) is
    read as Pillow decodes it, which drops the extra bands or takes its first
    page. Python's default warning filter shows it once per kind of input.
    Pass ``in_chans`` (the number of bands) to use every band.

    Examples
    --------
    >>> import warnings
    >>> import numpy as np
    >>> from featx import ChannelsWarning, PretrainedFeatureExtractor
    >>> ext = PretrainedFeatureExtractor(weights=None, preprocess={"input_size": 32}).fit()
    >>> rgb_nir = np.zeros((40, 40, 4), dtype=np.uint8)
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     X = ext.transform([rgb_nir])
    >>> any(issubclass(w.category, ChannelsWarning) for w in caught)
    True
    """


class ImageLoadError(ValueError):
    """An input item could not be turned into an image.

    Parameters
    ----------
    index : int
        Position of the item in the input sequence.
    path : str or None
        The item's file path, when it has one.
    reason : str
        What went wrong.

    Attributes
    ----------
    index, path, reason
        The parameters, kept for handlers (and pickling).

    Examples
    --------
    >>> from featx import PretrainedFeatureExtractor
    >>> ext = PretrainedFeatureExtractor(weights=None, preprocess={"input_size": 32}).fit()
    >>> try:
    ...     ext.transform(["missing.jpg"])
    ... except ValueError as err:  # an ImageLoadError is a ValueError
    ...     print(type(err).__name__, err.index, err.path, err.reason)
    ImageLoadError 0 missing.jpg file not found
    """

    def __init__(self, index: int, path: str | None, reason: str):
        self.index = index
        self.path = path
        self.reason = reason
        where = f"item {index}" + (f" ({path!r})" if path is not None else "")
        super().__init__(f"cannot load {where}: {reason}")

    def __reduce__(self):
        return (type(self), (self.index, self.path, self.reason))


# ------------------------------------------------ messages that name parameters

_MARK = "\x1f"  # never in a path or a value a message quotes


def arg(name: str, value: Any = ...) -> str:
    """``name=value`` inside a featx message: Python's spelling in ``str(exc)``, a flag on the command line.

    The part travels inside the message text between two unit-separator
    characters; a :class:`ParameterError` or :class:`ModelLoadError` turns it
    back into a part (``exc.parts``), so ``str(exc)`` reads ``weights=None``
    while the ``featx`` command prints ``--weights none`` from the same part,
    without reading the prose. ``value=...`` is a placeholder (``input_size=...``
    in Python, ``--input-size N`` on the command line).
    """
    return _MARK + json.dumps(["arg", name, _py_value(value), _cli_value(value)]) + _MARK


def alt(python: str, cli: str) -> str:
    """Words that differ by interface: ``python`` in ``str(exc)``, ``cli`` (with ``{model}``) on the command line."""
    return _MARK + json.dumps(["alt", python, cli]) + _MARK


def _py_value(value: Any) -> str:
    if value is ...:
        return "..."
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {_py_value(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _cli_value(value: Any) -> Any:
    if value is ...:
        return None
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    if isinstance(value, dict):
        return {k: _cli_value(v) for k, v in value.items()}
    return str(value)


def _split(text: str) -> tuple:
    """The message's parts: strings, and ``("arg", name, python, cli)`` / ``("alt", python, cli)`` tuples."""
    pieces = text.split(_MARK)
    return tuple(json.loads(p) if i % 2 else p for i, p in enumerate(pieces) if p)


def _python(part: Any) -> str:
    if isinstance(part, str):
        return part
    return f"{part[1]}={part[2]}" if part[0] == "arg" else part[1]


class _Phrased:
    """A message made of parts, so each interface can say it in its own terms (see :func:`arg`)."""

    def __init__(self, message: str, param: str | None = None):
        self.parts = _split(message)
        self.param = param
        self._raw = message
        super().__init__("".join(map(_python, self.parts)))

    def __reduce__(self):
        return (type(self), (self._raw, self.param))

    def render(self, part: Callable[[Any], str]) -> str:
        """The message with every ``arg``/``alt`` part given by ``part`` (the CLI passes its flags)."""
        return "".join(p if isinstance(p, str) else part(p) for p in self.parts)


class ParameterError(_Phrased, ValueError):
    """A parameter's value is invalid; the message names the value and the fix.

    Parameters
    ----------
    message : str
        What is wrong and what to pass instead; the parameter values it
        names are kept as parts, so the ``featx`` command can name its flags.
    param : str or None
        The parameter the error concerns (``"device"``, ``"layers"``, ...).

    Attributes
    ----------
    param : str or None
        The parameter, for handlers (the ``featx`` command names its flag).
    parts : tuple
        The message's parts: text, and the parameter values it names.

    Examples
    --------
    >>> from featx import PretrainedFeatureExtractor
    >>> try:
    ...     PretrainedFeatureExtractor(weights=None, device="gpu").fit()
    ... except ValueError as err:  # a ParameterError is a ValueError
    ...     print(type(err).__name__, err.param)
    ParameterError device
    """


class ModelLoadError(_Phrased, RuntimeError):
    """A backbone or its weights could not be built or loaded.

    The message names the model or file and says how to fix it (for a name
    that needs a download, how to work offline).

    Parameters
    ----------
    message : str
        What could not be loaded and what to do; the parameter values it
        names are kept as parts, so the ``featx`` command can name its flags.
    param : str or None, default=None
        The parameter the error concerns.

    Attributes
    ----------
    param : str or None
        The parameter, for handlers.
    parts : tuple
        The message's parts: text, and the parameter values it names.

    Examples
    --------
    >>> from featx import PretrainedFeatureExtractor
    >>> try:
    ...     PretrainedFeatureExtractor("resnet18", weights="no/such/file.pth").fit()
    ... except RuntimeError as err:  # a ModelLoadError is a RuntimeError
    ...     print(type(err).__name__, err)
    ModelLoadError weights file 'no/such/file.pth' does not exist (or is not a file).
    """


class OutputError(OSError):
    """An output file could not be written (its folder, its permissions, or the space it needs).

    Raised before any image is computed where it can be known then (a
    missing or read-only folder), and otherwise when the file is written, in
    which case nothing that looks complete is left behind: outputs are
    written to a temporary name beside the file and renamed onto it whole.

    Examples
    --------
    >>> import numpy as np
    >>> from featx import PretrainedFeatureExtractor
    >>> ext = PretrainedFeatureExtractor(weights=None, preprocess={"input_size": 32}).fit()
    >>> try:
    ...     ext.transform_to_npy(np.zeros((1, 8, 8, 3), np.uint8), "/proc/features.npy")
    ... except OSError as err:  # an OutputError is an OSError
    ...     print(type(err).__name__)
    OutputError
    """
