"""Scale-out on existing engines: Ray Data and Apache Spark.

Both run a :class:`featx.PretrainedFeatureExtractor` rebuilt on each worker
from its *parameters* (``get_params()``), never from a pickled loaded model:
the backbone is loaded once per Ray actor or once per Spark Python worker,
and the features are the same as the local ``transform`` on the same images.

The embedding cache works on a cluster when every worker reaches the same
``cache=`` directory: the workers of one machine always do; several machines
need a shared filesystem whose locking SQLite trusts (a local disk per node
also works, each node then keeping its own cache). A rerun after a failure, or
on a grown dataset, then computes only the images not yet in the cache.

Install the engines with ``pip install 'featx[ray]'`` or ``'featx[spark]'``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["ray_transform", "spark_udf"]

_ROW_ID = "__featx_row__"


def _need(module: str, extra: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"{module} could not be imported ({exc}); featx's {extra} support needs: pip install 'featx[{extra}]'"
        ) from exc


def _params(extractor: Any) -> dict:
    from ._extractor import PretrainedFeatureExtractor

    if not isinstance(extractor, PretrainedFeatureExtractor):
        raise TypeError(
            f"extractor must be a featx.PretrainedFeatureExtractor, got {type(extractor).__name__}"
        )
    params = extractor.get_params()
    params["progress"] = False  # workers' stderr is not a terminal anyone watches
    return params


class _RayExtractor:
    """A Ray Data actor: builds the extractor once, then embeds batches."""

    def __init__(self, params: dict, column: str, output_column: str):
        from ._extractor import PretrainedFeatureExtractor

        self.ext = PretrainedFeatureExtractor(**params).fit()
        self.column = column
        self.output_column = output_column

    def __call__(self, batch: dict) -> dict:
        items = list(batch[self.column])
        out = dict(batch)
        out[self.output_column] = self.ext.transform(items)
        return out


def ray_transform(
    data: Any,
    extractor: Any,
    *,
    column: str = "path",
    output_column: str = "features",
    batch_size: int = 128,
    concurrency: int = 1,
    num_gpus: float = 0,
    num_cpus: float | None = None,
    write_parquet: str | None = None,
) -> Any:
    """Embed images with Ray Data: one actor per ``concurrency``, the backbone loaded once per actor.

    Parameters
    ----------
    data : list of str or ray.data.Dataset
        File paths, or a Dataset whose ``column`` holds paths or image-file
        bytes (e.g. ``ray.data.read_binary_files(..., include_paths=True)``
        with ``column="bytes"``).
    extractor : PretrainedFeatureExtractor
        Its parameters (fitted or not) configure every actor.
    column, output_column : str
        Input column, and the column the features (float32 vectors) go to.
    batch_size : int, default=128
        Images per call of an actor (at least 96 lets the extractor tune its
        CPU batch size inside the actor).
    concurrency : int, default=1
        Number of actors (a fixed ``ray.data.ActorPoolStrategy``). A crashed
        actor is restarted and its batch retried (Ray Data's default).
    num_gpus : float, default=0
        GPUs per actor (use ``extractor`` with ``device="auto"``).
    num_cpus : float or None
        CPUs reserved per actor (Ray's default: 1).
    write_parquet : str or None
        Also write the result (paths and features) as Parquet files here.

    Returns
    -------
    ndarray of shape (n_images, n_features) for a list input, in its order;
    otherwise the ray.data.Dataset with ``output_column`` added.
    """
    _need("ray.data", "ray")
    import ray

    params = _params(extractor)
    as_list = not isinstance(data, ray.data.Dataset)
    if as_list:
        paths = [str(p) for p in data]
        ds = ray.data.from_items([{_ROW_ID: i, column: p} for i, p in enumerate(paths)])
    else:
        ds = data
    # Ray Data restarts a crashed actor and retries its batch (its default for actor pools)
    result = ds.map_batches(
        _RayExtractor,
        fn_constructor_args=(params, column, output_column),
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_gpus=num_gpus,
        num_cpus=num_cpus,
    )
    if write_parquet is not None:
        result = result.materialize()
        result.write_parquet(write_parquet)
    if not as_list:
        return result
    rows = result.select_columns([_ROW_ID, output_column]).take_all()
    if len(rows) != len(paths):
        raise RuntimeError(f"Ray returned {len(rows)} rows for {len(paths)} images")
    out = np.empty((len(paths), len(rows[0][output_column]) if rows else 0), dtype=np.float32)
    for r in rows:
        out[int(r[_ROW_ID])] = r[output_column]
    return out


def spark_udf(extractor: Any, *, batch_size: int = 64):
    """A Spark pandas UDF that embeds a column of file paths or image bytes.

    Built on ``pyspark.ml.functions.predict_batch_udf``: each Python worker
    builds the extractor once (from its parameters) and receives numpy
    batches of ``batch_size`` rows.

    Parameters
    ----------
    extractor : PretrainedFeatureExtractor
        Its parameters configure every worker.
    batch_size : int, default=64
        Rows per call.

    Returns
    -------
    A UDF mapping a string (path) or binary (file content) column to
    ``array<float>`` features, e.g.
    ``df.withColumn("features", spark_udf(ext)("path"))`` or, with
    ``spark.read.format("binaryFile")``, ``spark_udf(ext)("content")``.
    """
    _need("pyspark.ml.functions", "spark")
    from pyspark.ml.functions import predict_batch_udf
    from pyspark.sql.types import ArrayType, FloatType

    params = _params(extractor)

    def make_predict_fn():
        from featx import PretrainedFeatureExtractor

        ext = PretrainedFeatureExtractor(**params).fit()

        def predict(inputs: np.ndarray) -> np.ndarray:
            items = [bytes(x) if isinstance(x, (bytearray, memoryview)) else x for x in inputs]
            return ext.transform(items)

        return predict

    return predict_batch_udf(make_predict_fn, return_type=ArrayType(FloatType()), batch_size=batch_size)
