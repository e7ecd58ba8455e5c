"""featx's exceptions and warnings.

Every exception subclasses the builtin a user would already catch, so
``except ValueError`` keeps working around a featx call.
"""

from __future__ import annotations

__all__ = [
    "FeatxWarning",
    "DeviceWarning",
    "CacheWarning",
    "BackendWarning",
    "ImageLoadWarning",
    "ImageLoadError",
    "ModelLoadError",
]


class FeatxWarning(UserWarning):
    """Base class of every warning featx emits."""


class DeviceWarning(FeatxWarning):
    """A device or precision request could not be honoured as asked."""


class CacheWarning(FeatxWarning):
    """The embedding cache could not be read or written; work goes on without it."""


class BackendWarning(FeatxWarning):
    """A requested inference backend could not be used; featx fell back to eager PyTorch."""


class ImageLoadWarning(FeatxWarning):
    """Some items could not be read and became rows of NaN (``on_error="nan"``)."""


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
    """

    def __init__(self, index: int, path: str | None, reason: str):
        self.index = index
        self.path = path
        self.reason = reason
        where = f"item {index}" + (f" ({path!r})" if path is not None else "")
        super().__init__(f"cannot load {where}: {reason}")

    def __reduce__(self):
        return (type(self), (self.index, self.path, self.reason))


class ModelLoadError(RuntimeError):
    """A backbone or its weights could not be built or loaded."""
