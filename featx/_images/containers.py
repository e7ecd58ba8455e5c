"""Columns of dataset containers read lazily: pyarrow arrays, Hugging Face ``datasets`` columns.

A column of image values (binary or string, or the ``{"bytes", "path"}``
structs of a Hugging Face ``Image`` feature) is read one value at a time as
the loader asks for it, without converting the whole column into Python
objects first; values are converted the way a list item is
(:func:`featx._images.preprocess.as_items` turns records into bytes or paths).
"""

from __future__ import annotations

from collections.abc import MutableSequence
from typing import Any, Callable, Iterator

__all__ = ["ArrowColumn", "arrow_column"]


class ArrowColumn(MutableSequence):
    """A pyarrow ``Array`` or ``ChunkedArray`` as a sequence of items; ``record`` converts struct values.

    Assignments (a URL replaced by the bytes downloaded to key it) are kept
    beside the column, which is never modified.
    """

    def __init__(self, array: Any, record: Callable[[dict], Any]):
        self.array = array
        self.record = record
        self.replaced: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.array)

    def _value(self, value: Any) -> Any:
        return self.record(value) if isinstance(value, dict) else value

    def __getitem__(self, i: int) -> Any:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        i = int(i)
        if i < 0:
            i += len(self)
        if i in self.replaced:
            return self.replaced[i]
        return self._value(self.array[i].as_py())

    def __iter__(self) -> Iterator[Any]:
        chunks = self.array.chunks if hasattr(self.array, "chunks") else [self.array]
        i = 0
        for chunk in chunks:
            for scalar in chunk:
                yield self.replaced[i] if i in self.replaced else self._value(scalar.as_py())
                i += 1

    def __setitem__(self, i: int, value: Any) -> None:
        self.replaced[int(i)] = value

    def __delitem__(self, i: int) -> None:
        raise TypeError("an image column cannot be shortened")

    def insert(self, i: int, value: Any) -> None:
        raise TypeError("an image column cannot be lengthened")


def arrow_column(X: Any) -> Any | None:
    """The pyarrow array behind ``X`` (a pyarrow Array/ChunkedArray, a ``datasets`` Column, or a one-column
    ``datasets.Dataset``) in ``X``'s own row order; None for anything else."""
    mod = type(X).__module__
    if mod.startswith("pyarrow"):
        if hasattr(X, "num_columns"):  # a Table or RecordBatch
            if X.num_columns != 1:
                raise ValueError(f"X is a pyarrow table with columns {X.column_names[:5]}; featx expects one column "
                                 "of images. Pass table.column('image').")
            return X.column(0)
        return X if hasattr(X, "to_pylist") else None
    if not mod.startswith("datasets"):
        return None
    if hasattr(X, "source") and hasattr(X, "column_name"):  # datasets >= 3: ds["image"] is a lazy Column
        return X.source.with_format("arrow")[X.column_name]
    if hasattr(X, "column_names") and hasattr(X, "with_format"):  # a Dataset
        if len(X.column_names) != 1:
            raise ValueError(f"X is a datasets.Dataset with columns {X.column_names[:5]}; featx expects one column "
                             "of images. Pass ds['image'] (or ds.select_columns(['image'])).")
        return X.with_format("arrow")[X.column_names[0]]
    return None
