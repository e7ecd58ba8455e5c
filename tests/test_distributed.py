"""Ray Data and Spark: real local engines, a few dozen images, a small random-init backbone.

Marked ``distributed``: they start real engines (seconds each) and run in the
default test command, kept small.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from featx import PretrainedFeatureExtractor

from .s3server import KEYS, MotoServer, free_port

pytestmark = pytest.mark.distributed

SMALL = {"input_size": 32, "resize_size": 36}
S3_PORT = free_port()  # the S3 test's server: its address is in the Ray workers' environment from the start


def _extractor(**kw):
    return PretrainedFeatureExtractor("resnet18", weights=None, preprocess=SMALL, layers=["layer2", "layer4"],
                                      pooling="catavgmax", progress=False, **kw)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("dist")
    rng = np.random.default_rng(0)
    out = []
    for i in range(36):
        p = root / f"{i:03d}.jpg"
        Image.fromarray(rng.integers(0, 256, (40 + i % 5, 48, 3), dtype=np.uint8)).save(p, quality=90)
        out.append(str(p))
    return out


@pytest.fixture(scope="module")
def local(paths):
    return _extractor().fit().transform(paths)


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # workers import tests.conftest (the crashing model) from the repository root
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""),
                                       "AWS_ENDPOINT_URL": f"http://127.0.0.1:{S3_PORT}", **KEYS,
                                       # no local layer in the actors: a hit in a rerun is a hit in S3
                                       "FEATX_CACHE_READ_THROUGH": "0"}})
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    ray.shutdown()


def test_ray_equals_local(ray_session, paths, local):
    from featx.distributed import ray_transform

    got = ray_transform(paths, _extractor(), batch_size=8, concurrency=2)
    assert got.shape == local.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, local, rtol=1e-5, atol=1e-6)


def test_list_input_is_cut_into_whole_batches(ray_session, paths):
    from featx.distributed import _rows_dataset

    ds = _rows_dataset(ray_session, paths, "path", 8)
    sizes = ds.map_batches(lambda b: {"n": [len(b["path"])]}, batch_size=8).take_all()
    assert sorted(r["n"] for r in sizes) == [4, 8, 8, 8, 8]  # 36 images: no batch cut at a block edge
    assert [r["__featx_row__"] for r in ds.take_all()] == list(range(len(paths)))


def test_ray_dataset_of_bytes_and_parquet(ray_session, paths, local, tmp_path):
    import pyarrow.parquet as pq

    from featx.distributed import ray_transform

    ds = ray_session.data.read_binary_files(os.path.dirname(paths[0]), include_paths=True)
    out = ray_transform(ds, _extractor(), column="bytes", batch_size=16, write_parquet=str(tmp_path / "pq"))
    rows = out.take_all()
    by_path = {os.path.basename(r["path"]): np.asarray(r["features"]) for r in rows}
    assert len(by_path) == len(paths)
    for i, p in enumerate(paths):
        np.testing.assert_allclose(by_path[os.path.basename(p)], local[i], rtol=1e-5, atol=1e-6)
    table = pq.read_table(tmp_path / "pq")
    assert table.num_rows == len(paths) and "features" in table.column_names
    assert "bytes" not in table.column_names and "path" in table.column_names  # no copy of every image
    asked = ray_transform(ds, _extractor(), column="bytes", batch_size=16, write_parquet=str(tmp_path / "pq2"),
                          parquet_columns=["path", "bytes"])
    assert asked.count() == len(paths) and "bytes" in pq.read_table(tmp_path / "pq2").column_names


def test_ray_fails_at_once_when_the_cluster_cannot_place_the_actors(ray_session, paths):
    from concurrent.futures import ThreadPoolExecutor

    from featx.distributed import ray_transform

    def refused():
        with pytest.raises(ValueError, match=r"1 GPU\(s\), but the Ray cluster has 0\. Pass num_gpus=0"):
            ray_transform(paths, _extractor(), concurrency=4, num_gpus=0.25)
        with pytest.raises(ValueError, match=r"3 CPU\(s\), but the Ray cluster has 2 CPU\(s\).*Pass concurrency=2"):
            ray_transform(paths, _extractor(), concurrency=3, num_cpus=1)
        # a Dataset's read tasks need a CPU: the README's old advice (concurrency = cores) deadlocked here
        ds = ray_session.data.read_binary_files(os.path.dirname(paths[0]), include_paths=True)
        with pytest.raises(ValueError, match="leave one for the Dataset's read tasks.*Pass concurrency=1"):
            ray_transform(ds, _extractor(), column="bytes", concurrency=2, num_cpus=1)

    # refused before any actor is placed: a deadlock (the old behaviour) turns into a failure, not a hang
    pool = ThreadPoolExecutor(1)
    try:
        pool.submit(refused).result(timeout=300)
    finally:
        pool.shutdown(wait=False)


def test_ray_recovers_from_a_killed_actor(ray_session, paths, tmp_path):
    import torch

    from featx.distributed import ray_transform

    from .conftest import CrashOnce, TinyCNN

    torch.manual_seed(0)
    plain = TinyCNN()
    crashing = CrashOnce(str(tmp_path / "killed"))
    crashing.load_state_dict(plain.state_dict())
    want = PretrainedFeatureExtractor(plain, preprocess=SMALL, progress=False).fit().transform(paths)
    got = ray_transform(paths, PretrainedFeatureExtractor(crashing, preprocess=SMALL, batch_size=4),
                        batch_size=12, concurrency=1)
    assert (tmp_path / "killed").exists()  # a worker did die mid-job
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_ray_rerun_uses_the_shared_cache(ray_session, paths, local, tmp_path):
    from featx._cache.sqlite import EmbeddingCache
    from featx.distributed import ray_transform

    cache = tmp_path / "cache"
    first = ray_transform(paths[:20], _extractor(cache=str(cache)), batch_size=8, concurrency=2)
    np.testing.assert_allclose(first, local[:20], rtol=1e-5, atol=1e-6)
    assert EmbeddingCache.open(cache).info()["namespaces"][0]["images"] == 20
    # the grown dataset: 16 new images computed, 20 read back
    grown = ray_transform(paths, _extractor(cache=str(cache)), batch_size=8, concurrency=2)
    np.testing.assert_allclose(grown, local, rtol=1e-5, atol=1e-6)
    assert EmbeddingCache.open(cache).info()["namespaces"][0]["images"] == len(paths)


def test_ray_actors_share_an_s3_cache(ray_session, paths, tmp_path, monkeypatch):
    """Actors on a cluster share one S3 cache: the second run computes nothing (forward passes counted)."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto")
    import torch

    from featx.distributed import ray_transform

    from .conftest import CountingCNN, TinyCNN

    server = MotoServer(S3_PORT)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
        for k, v in KEYS.items():
            monkeypatch.setenv(k, v)
        url = f"s3://{server.bucket()}/cluster"
        torch.manual_seed(0)
        plain = TinyCNN()
        counting = CountingCNN(str(tmp_path / "forward.log"))
        counting.load_state_dict(plain.state_dict())
        want = PretrainedFeatureExtractor(plain, preprocess=SMALL, precision="fp32", progress=False).fit().transform(paths)

        def run():
            log = tmp_path / "forward.log"
            log.write_text("")
            ext = PretrainedFeatureExtractor(counting, preprocess=SMALL, precision="fp32", batch_size=4, cache=url,
                                             progress=False)
            got = ray_transform(paths, ext, batch_size=12, concurrency=2)
            return got, sum(int(n) for n in log.read_text().split())

        first, computed_first = run()
        np.testing.assert_allclose(first, want, rtol=1e-5, atol=1e-6)
        assert computed_first >= len(paths)
        assert len([p for p in server.fs().find(url[5:]) if not p.endswith("namespace.json")]) == len(paths)
        second, computed_second = run()
        assert computed_second == 0
        np.testing.assert_array_equal(second, first)  # read back, bit for bit
    finally:
        server.stop()


def test_missing_extra_and_bad_extractor(monkeypatch):
    import sys

    from featx.distributed import ray_transform, spark_udf

    with pytest.raises(TypeError, match="PretrainedFeatureExtractor"):
        ray_transform(["a.jpg"], object())
    for bad in ({"batch_size": 0}, {"concurrency": 0}, {"batch_size": 2.5}):
        with pytest.raises(ValueError, match=f"{next(iter(bad))} must be a positive integer"):
            ray_transform(["a.jpg"], _extractor(), **bad)
    with pytest.raises(ValueError, match="data is empty"):
        ray_transform([], _extractor())
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got -1"):
        spark_udf(_extractor(), batch_size=-1)
    for name in ("ray", "ray.data", "pyspark", "pyspark.ml", "pyspark.ml.functions"):
        monkeypatch.setitem(sys.modules, name, None)  # what an absent package looks like to import
    with pytest.raises(ImportError, match=r"pip install 'featx\[ray\]'"):
        ray_transform(["a.jpg"], _extractor())
    with pytest.raises(ImportError, match=r"pip install 'featx\[spark\]'"):
        spark_udf(_extractor())


@pytest.fixture(scope="module")
def spark():
    pytest.importorskip("pyspark")
    from pyspark.sql import SparkSession

    import sys

    os.environ["PYSPARK_PYTHON"] = sys.executable  # workers run this environment's Python (with featx)
    os.environ["PYSPARK_DRIVER_PYTHON"] = sys.executable
    session = (SparkSession.builder.master("local[2]").appName("featx-tests")
               .config("spark.ui.enabled", "false").config("spark.sql.execution.arrow.pyspark.enabled", "true")
               .getOrCreate())
    yield session
    session.stop()


def test_spark_paths_and_binary_content(spark, paths, local):
    from featx.distributed import spark_udf

    udf = spark_udf(_extractor(), batch_size=8)
    df = spark.createDataFrame([(i, p) for i, p in enumerate(paths)], ["i", "path"])
    rows = df.withColumn("features", udf("path")).orderBy("i").collect()
    got = np.array([r["features"] for r in rows], dtype=np.float32)
    np.testing.assert_allclose(got, local, rtol=1e-5, atol=1e-6)

    files = spark.read.format("binaryFile").load(os.path.dirname(paths[0]))
    rows = files.withColumn("features", udf("content")).select("path", "features").collect()
    by_name = {os.path.basename(r["path"]): np.asarray(r["features"], dtype=np.float32) for r in rows}
    for i, p in enumerate(paths):
        np.testing.assert_allclose(by_name[os.path.basename(p)], local[i], rtol=1e-5, atol=1e-6)


def _vit_extractor():
    """A token-layer extractor (random init is seeded: every worker builds the same weights)."""
    return PretrainedFeatureExtractor("vit_tiny_patch16_224", weights=None, layers=["block6", "block12"],
                                      pooling="cls+avg", precision="fp32", progress=False)


@pytest.fixture(scope="module")
def vit_local(paths):
    return _vit_extractor().fit().transform(paths[:12])


def test_ray_with_a_vision_transformer(ray_session, paths, vit_local):
    from featx.distributed import ray_transform

    got = ray_transform(paths[:12], _vit_extractor(), batch_size=4, concurrency=2)
    assert got.shape == vit_local.shape == (12, 4 * 192)
    np.testing.assert_allclose(got, vit_local, rtol=1e-5, atol=1e-5)


def test_spark_with_a_vision_transformer(spark, paths, vit_local):
    from featx.distributed import spark_udf

    df = spark.createDataFrame([(i, p) for i, p in enumerate(paths[:12])], ["i", "path"])
    rows = df.withColumn("features", spark_udf(_vit_extractor(), batch_size=4)("path")).orderBy("i").collect()
    np.testing.assert_allclose(np.array([r["features"] for r in rows], dtype=np.float32), vit_local,
                               rtol=1e-5, atol=1e-5)
