"""The embedding stores share one written protocol, and the command line uses only it."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import numpy as np
import pytest

from featx._cache.sqlite import EmbeddingCache
from featx._cache.objects import SharedCache
from featx._cache.base import EmbeddingStore

INFO_KEYS = {"path", "kind", "size_bytes", "entries", "namespaces", "files_indexed", "parts"}
NS_KEYS = {"namespace", "entries", "images", "vector_bytes", "created", "last_used", "provenance"}


def _stores(tmp_path):
    sqlite = EmbeddingCache(tmp_path / "db")
    objects = SharedCache((tmp_path / "bucket").as_uri(), local=None)  # file:// : the object layout on a disk
    return {"sqlite": sqlite, "objects": objects}


@pytest.mark.parametrize("which", ["sqlite", "objects"])
def test_both_stores_keep_the_protocol_with_the_same_meaning(tmp_path, which):
    store = _stores(tmp_path)[which]
    assert isinstance(store, EmbeddingStore) and store.kind and store.eviction and store.location
    rng = np.random.default_rng(0)
    vec = {f"k{i}": rng.random(4, dtype=np.float32) for i in range(3)}
    store.register_namespace("ns", {"model": "m", "preprocess": {"input_size": [32, 32]}})
    rows = [(k, "f", v) for k, v in vec.items()] + [(k, "g", 2 * v) for k, v in vec.items()]
    assert store.store("ns", rows, requested=["f"]) is True
    store.flush()  # every row handed over is written when it returns
    hits = store.lookup("ns", list(vec), {"f": 4})
    assert sorted(hits) == sorted(vec)
    for k, v in vec.items():
        np.testing.assert_array_equal(hits[k]["f"], v)
    info = store.info()
    assert set(info) == INFO_KEYS and info["entries"] >= 3 and info["size_bytes"] > 0
    assert [set(ns) == NS_KEYS for ns in info["namespaces"]] == [True]
    assert info["namespaces"][0]["images"] == 3 and info["kind"] == store.kind
    assert info["size_bytes"] == sum(info["parts"].values())
    assert store.prune(10**12) == 0  # under the limit: nothing goes
    removed = store.clear()
    assert removed == info["entries"] and store.lookup("ns", list(vec), {"f": 4}) == {}
    assert store.info()["entries"] == 0
    store.close()


def test_a_store_missing_a_method_cannot_be_made():
    class Half(EmbeddingStore):
        def lookup(self, ns, keys, widths):
            return {}

    with pytest.raises(TypeError, match="abstract"):
        Half()


def test_the_command_line_never_asks_which_store_it_holds():
    import featx.cli as cli

    tree = ast.parse(inspect.getsource(cli))
    offenders = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "isinstance":
            offenders.append(ast.unparse(node))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get" \
                and node.args and isinstance(node.args[0], ast.Constant) and node.args[0].value == "store":
            offenders.append(ast.unparse(node))
    assert [o for o in offenders if "Cache" in o or "str" in o or "store" in o] == []


def test_the_sqlite_store_holds_no_engine_artifacts(tmp_path):
    assert not hasattr(EmbeddingCache, "graphs")
    src = Path(inspect.getsourcefile(EmbeddingCache)).read_text()
    assert ".onnx" not in src
