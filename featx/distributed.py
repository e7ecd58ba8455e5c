"""Scale-out on existing engines: Ray Data and Apache Spark.

Both run a :class:`featx.PretrainedFeatureExtractor` rebuilt on each worker
from its *parameters* (``get_params()``), never from a pickled loaded model:
the backbone is loaded once per Ray actor or once per Spark Python worker,
and the features are the same as the local ``transform`` on the same images.

The embedding cache works on a cluster when every worker reaches the same
store. A storage URL (``cache="s3://bucket/featx"``, ``"gs://..."``,
``"file:///mnt/nfs/featx"``) is made for that: immutable, checksummed objects
published create-only, which any number of machines share without locks, each
fronted by its own local SQLite cache. A local directory is one SQLite
database: the workers of one machine share it safely, several machines should
not (network file systems do not give SQLite reliable locks). A rerun after a
failure, or on a grown dataset, then computes only the images not yet cached.

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


def _positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_resources(ray: Any, concurrency: int, num_gpus: float, num_cpus: float | None, reads: bool) -> None:
    """Fail at once when the cluster cannot place the actors (Ray would wait for them forever).

    Actors reserve ``num_cpus`` each (Ray Data's default: 1, GPU actors
    included); a Dataset input also needs a CPU for its read tasks, or the
    actors take every CPU and the reads starve.
    """
    if not ray.is_initialized():
        ray.init()  # what Ray Data would do on first use; done here to read the cluster's resources
    have = ray.cluster_resources()
    cpus, gpus = float(have.get("CPU", 0)), float(have.get("GPU", 0))
    per_cpu = 1.0 if num_cpus is None else float(num_cpus)
    if num_gpus * concurrency > gpus:
        raise ValueError(
            f"ray_transform asks for {concurrency} actor(s) x num_gpus={num_gpus:g} = {num_gpus * concurrency:g} GPU(s), "
            f"but the Ray cluster has {gpus:g}. Pass num_gpus=0 to run on CPUs, or start Ray on nodes with GPUs "
            "(on an autoscaling cluster that adds them on demand, pass check_resources=False)."
        )
    spare = 1.0 if reads else 0.0
    if per_cpu * concurrency + spare > cpus:
        fit = max(1, int((cpus - spare) // per_cpu)) if cpus - spare >= per_cpu else 0
        why = " and leave one for the Dataset's read tasks" if reads else ""
        fix = (f"concurrency={fit}" if fit else f"num_cpus={max(0.0, cpus - spare) or 0.5:g}")
        raise ValueError(
            f"ray_transform asks for {concurrency} actor(s) x num_cpus={per_cpu:g} = {per_cpu * concurrency:g} CPU(s)"
            f"{why}, but the Ray cluster has {cpus:g} CPU(s): the job would wait forever. Pass {fix} "
            "(on an autoscaling cluster, check_resources=False)."
        )


def _rows_dataset(ray: Any, paths: list[str], column: str, batch_size: int) -> Any:
    """A Dataset of (row id, path) rows cut into one block per batch of ``batch_size``.

    Ray Data otherwise cuts batches at its own block edges (e.g. 128, 1, 128,
    1, ... images), each small batch paying a forward pass of its own.
    """
    import pyarrow as pa

    blocks = [pa.table({_ROW_ID: np.arange(i, min(i + batch_size, len(paths))), column: paths[i:i + batch_size]})
              for i in range(0, len(paths), batch_size)]
    return ray.data.from_arrow(blocks)  # one block per table


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
    parquet_columns: list[str] | None = None,
    check_resources: bool = True,
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
        actor is restarted and its batch retried (Ray Data's default). On
        CPU-only nodes, one single-threaded actor per core (``num_cpus=1``)
        is faster and steadier than one actor using every core, whose
        threads wait for each other whenever Ray's own processes take a core.
    num_gpus : float, default=0
        GPUs per actor (use ``extractor`` with ``device="auto"``).
    num_cpus : float or None
        CPUs reserved per actor (Ray's default: 1). Ray sets the actor's
        ``OMP_NUM_THREADS`` to it, so it is also the number of threads
        PyTorch uses there: on CPUs, ``concurrency`` x ``num_cpus`` should
        cover the cores (minus one for a Dataset input, whose read tasks
        need a CPU); GPU actors need several CPUs each to decode images
        fast enough to keep the GPU busy.
    write_parquet : str or None
        Also write the result as Parquet files here: the row id (list input)
        or every input column except binary ones (image bytes), and the
        features.
    parquet_columns : list of str or None
        The columns to write instead (``output_column`` is always written).
    check_resources : bool, default=True
        Before submitting, check that the cluster has the CPUs and GPUs the
        actors (and a Dataset's reads) need, and raise ``ValueError`` saying
        what to pass if not; Ray itself would wait for them forever. Turn it
        off on an autoscaling cluster that adds nodes on demand.

    Returns
    -------
    features : ndarray of shape (n_images, n_features) or ray.data.Dataset
        For a list input, the features in its order; for a Dataset, the
        Dataset with ``output_column`` added.

    Examples
    --------
    >>> import ray  # doctest: +SKIP
    >>> from featx import PretrainedFeatureExtractor
    >>> from featx.distributed import ray_transform
    >>> ray.init()  # doctest: +SKIP
    >>> X = ray_transform(paths, PretrainedFeatureExtractor(cache="/shared/featx-cache"),
    ...                   concurrency=4)  # doctest: +SKIP
    """
    params = _params(extractor)
    _positive("batch_size", batch_size)
    _positive("concurrency", concurrency)
    _need("ray.data", "ray")
    import ray

    as_list = not isinstance(data, ray.data.Dataset)
    if check_resources:
        _check_resources(ray, concurrency, num_gpus, num_cpus, reads=not as_list)
    if as_list:
        paths = [str(p) for p in data]
        if not paths:
            raise ValueError("data is empty: ray_transform needs at least one image path.")
        ds = _rows_dataset(ray, paths, column, batch_size)
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
        _parquet_view(result, output_column, parquet_columns).write_parquet(write_parquet)
    return _collect(result, len(paths), output_column) if as_list else result


def _collect(result: Any, n: int, output_column: str) -> np.ndarray:
    """The features of a list input's ``n`` rows, in its order."""
    # whole blocks back, placed by row id (select_columns would add a Project task per block)
    out, seen = None, 0
    for b in result.iter_batches(batch_size=None, batch_format="numpy"):
        feats = np.asarray(b[output_column], dtype=np.float32)
        if out is None:
            out = np.empty((n, feats.shape[1]), dtype=np.float32)
        out[b[_ROW_ID]] = feats
        seen += len(feats)
    if seen != n:
        raise RuntimeError(f"Ray returned {seen} rows for {n} images")
    return out


def _parquet_view(result: Any, output_column: str, columns: list[str] | None) -> Any:
    """The columns worth writing: ids, paths and features, not the raw image bytes (unless asked)."""
    import pyarrow as pa

    schema = result.schema()
    names = list(schema.names)
    if columns is None:
        types = dict(zip(names, schema.types))
        columns = [n for n in names if not (isinstance(types[n], pa.DataType) and
                                            (pa.types.is_binary(types[n]) or pa.types.is_large_binary(types[n])))]
    keep = list(dict.fromkeys([*columns, output_column]))
    return result if keep == names else result.select_columns(keep)


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
    udf : callable
        A pandas UDF mapping a string (path) or binary (file content) column
        to ``array<float>`` features.

    Examples
    --------
    >>> from featx import PretrainedFeatureExtractor
    >>> from featx.distributed import spark_udf
    >>> embed = spark_udf(PretrainedFeatureExtractor(cache="/shared/featx-cache"))  # doctest: +SKIP
    >>> df.withColumn("features", embed("path"))  # doctest: +SKIP
    >>> files = spark.read.format("binaryFile").load("/data/photos/*.jpg")  # doctest: +SKIP
    >>> files.withColumn("features", embed("content"))  # doctest: +SKIP
    """
    params = _params(extractor)
    _positive("batch_size", batch_size)
    _need("pyspark.ml.functions", "spark")
    from pyspark.ml.functions import predict_batch_udf
    from pyspark.sql.types import ArrayType, FloatType

    def make_predict_fn():
        from featx._extractor import PretrainedFeatureExtractor

        ext = PretrainedFeatureExtractor(**params).fit()

        def predict(inputs: np.ndarray) -> np.ndarray:
            items = [bytes(x) if isinstance(x, (bytearray, memoryview)) else x for x in inputs]
            return ext.transform(items)

        return predict

    return predict_batch_udf(make_predict_fn, return_type=ArrayType(FloatType()), batch_size=batch_size)
