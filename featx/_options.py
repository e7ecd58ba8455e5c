"""Option values shared by the estimators, the command line and the docs (torch-free, cheap to import)."""

from __future__ import annotations

__all__ = ["BACKENDS", "DEFAULT_MODEL", "FSSPEC_DRIVERS", "ON_ERROR", "PRECISIONS", "POOLINGS", "TOKEN_POOLINGS",
           "TTA_MODES"]

#: The offline default backbone (ImageNet weights shipped on PyPI).
DEFAULT_MODEL = "efficientnet_lite0"
#: ``precision=`` values. "auto": bf16 on GPUs and on CPUs with native bf16, fp32 elsewhere; "int8": CPU only.
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
#: ``pooling=`` values (see :mod:`featx._models.pooling`).
POOLINGS = ("avg", "max", "avgmax", "catavgmax", "gem", "flatten", "cls", "cls+avg")
#: Poolings that need a class token (layers with token layout and at least one prefix token).
TOKEN_POOLINGS = ("cls", "cls+avg")
#: ``backend=`` values (see :mod:`featx._runtime.engines`).
BACKENDS = ("torch", "torch.compile", "onnxruntime", "auto")
#: ``tta=`` values other than None (see :data:`featx._images.preprocess.TTA_VIEWS` for their views).
TTA_MODES = ("hflip", "five_crop", "ten_crop", "multiscale")
#: fsspec protocol -> (the package its driver needs, what to pip install), for the error when it is missing
#: (a shared cache's URL, an image's URL).
FSSPEC_DRIVERS = {
    "s3": ("s3fs", "featx[s3]"), "s3a": ("s3fs", "featx[s3]"), "gs": ("gcsfs", "gcsfs"), "gcs": ("gcsfs", "gcsfs"),
    "az": ("adlfs", "adlfs"), "abfs": ("adlfs", "adlfs"), "abfss": ("adlfs", "adlfs"),
    "http": ("aiohttp", "featx[http]"), "https": ("aiohttp", "featx[http]"),
}
#: The extractor's ``on_error=`` values.
ON_ERROR = ("raise", "nan")
