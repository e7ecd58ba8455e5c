"""Dataset containers as X: Hugging Face ``{"bytes", "path"}`` records, pyarrow arrays, pandas columns."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from featx import ImageLoadError, PretrainedFeatureExtractor

pa = pytest.importorskip("pyarrow")

SMALL = {"input_size": 32, "resize_size": 36}
KW = dict(model="resnet18", weights=None, preprocess=SMALL, device="cpu", progress=False, precision="fp32")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("records")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(5):
        p = root / f"{i}.jpg"
        Image.fromarray(rng.integers(0, 256, (40, 44, 3), dtype=np.uint8)).save(p, quality=90)
        paths.append(str(p))
    return paths


@pytest.fixture(scope="module")
def reference(files):
    return PretrainedFeatureExtractor(**KW).fit().transform(files)


def _records(files, with_bytes=True):
    return [{"bytes": open(p, "rb").read() if with_bytes else None, "path": p} for p in files]


def test_records_arrow_and_pandas_columns_give_the_features_of_the_files(files, reference):
    ext = PretrainedFeatureExtractor(**KW).fit()
    records = _records(files)
    containers = {
        "records with bytes": records,
        "records with a path only": _records(files, with_bytes=False),
        "pyarrow binary": pa.array([r["bytes"] for r in records], type=pa.binary()),
        "pyarrow string (paths)": pa.array(files),
        "pyarrow chunked struct (datasets' Image(decode=False))": pa.chunked_array(
            [pa.array(records[:2]), pa.array(records[2:])]),
        "pandas column of records": pd.Series(records),
        "pandas column of bytes": pd.DataFrame({"image": [r["bytes"] for r in records]}),
    }
    for name, X in containers.items():
        np.testing.assert_array_equal(ext.transform(X), reference, err_msg=name)


def test_a_record_hits_the_cache_entry_of_its_file(files, reference, tmp_path):
    ext = PretrainedFeatureExtractor(**KW, cache=str(tmp_path)).fit()
    ext.transform(files)
    np.testing.assert_array_equal(ext.transform(_records(files)), reference)
    assert ext.last_run_.cache_hits == len(files) and ext.last_run_.computed == 0


def test_bad_records_are_per_item_errors_naming_the_record(files, tmp_path):
    ext = PretrainedFeatureExtractor(**KW).fit()
    with pytest.raises(ImageLoadError, match=r"item 1: a record with keys \['foo'\] has neither 'bytes' nor 'path'"):
        ext.transform([files[0], {"foo": 1}])
    with pytest.raises(ImageLoadError, match=r"item 0 \('shard-7/cat.jpg'\): not a recognised image format"):
        ext.transform([{"bytes": b"<html>", "path": "shard-7/cat.jpg"}])  # the error names the record's path
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(ImageLoadError, match="empty file"):
        ext.transform([str(empty)])


def test_named_bytes_reach_dataloader_workers_with_their_name(files):
    ext = PretrainedFeatureExtractor(**KW, num_workers=2, on_error="nan").fit()
    records = _records(files) + [{"bytes": b"junk", "path": "bad/one.jpg"}]
    with pytest.warns(Warning, match="bad/one.jpg"):
        X = ext.transform(records)
    assert ext.failed_indices_.tolist() == [5] and np.isfinite(X[:5]).all()


def test_hugging_face_dataset_columns_in_their_row_order(files, reference):
    """A ``datasets`` column (decode=False or True), a shuffled selection, a one-column Dataset and a pyarrow
    table: read from their arrow data in the dataset's own order, never decoded by ``datasets``."""
    datasets = pytest.importorskip("datasets")
    ext = PretrainedFeatureExtractor(**KW).fit()
    ds = datasets.Dataset.from_dict({"image": _records(files), "label": list(range(len(files)))})
    raw = ds.cast_column("image", datasets.Image(decode=False))
    decoded = ds.cast_column("image", datasets.Image())
    np.testing.assert_array_equal(ext.transform(raw["image"]), reference)
    np.testing.assert_array_equal(ext.transform(decoded["image"]), reference)
    picked = raw.shuffle(seed=0).select([3, 0, 2])
    order = picked["label"]
    np.testing.assert_array_equal(ext.transform(picked["image"]), reference[order])
    np.testing.assert_array_equal(ext.transform(picked.select_columns(["image"])), reference[order])
    np.testing.assert_array_equal(ext.transform(raw.data.table.select(["image"])), reference)
    with pytest.raises(ValueError, match=r"a datasets.Dataset with columns \['image', 'label'\]; .*ds\['image'\]"):
        ext.transform(raw)


def test_arrow_columns_are_read_a_value_at_a_time(files, tmp_path):
    """No whole-column conversion to Python objects: the items are the arrow column, read lazily; a URL's
    downloaded bytes are kept beside it."""
    from featx._images.containers import ArrowColumn
    from featx._images.preprocess import as_items

    column = pa.chunked_array([pa.array(files[:2]), pa.array(files[2:])])
    items = as_items(column)
    assert isinstance(items.data, ArrowColumn) and items.data.array is column and len(items) == len(files)
    assert items[4] == files[4] and list(items.data) == files
    items.data[1] = b"replacement"
    assert items[1] == b"replacement" and column[1].as_py() == files[1]
    with pytest.raises(ValueError, match="X is empty"):
        as_items(pa.array([], type=pa.binary()))
