"""PretrainedFeatureExtractor: the frozen layers of a pretrained network as a scikit-learn transformer."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted
from torch import nn

from ._doclink import DocLinkMixin
from ._exceptions import FeatxWarning, ImageLoadWarning, ParameterError, arg
from ._images.preprocess import as_items, item_path
from ._options import DEFAULT_MODEL, ON_ERROR, POOLINGS, TTA_MODES
from ._pickling import pack_state, unpack_state
from ._outputs import npy_memmap, written
from ._runtime import RunStats, Settled, settle

__all__ = ["PretrainedFeatureExtractor"]


def _user_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the first frame outside featx and scikit-learn.

    ``transform`` is reached through scikit-learn's wrappers (``set_output``,
    ``Pipeline``, ``fit_transform``), so a fixed level would name one of
    their lines instead of the user's.
    """
    import joblib
    import sklearn

    skip = tuple(str(Path(m.__file__).resolve().parent) for m in (sys.modules[__package__], sklearn, joblib))
    frame, level = sys._getframe(1), 1
    while frame is not None and str(Path(frame.f_code.co_filename).resolve()).startswith(skip):
        frame, level = frame.f_back, level + 1
    return level


class PretrainedFeatureExtractor(DocLinkMixin, TransformerMixin, BaseEstimator):
    """Embed images with the frozen layers of a pretrained network (a CNN or a vision transformer).

    ``transform`` maps a sequence of images (file paths, PIL images, arrays or
    tensors) to a float32 matrix of shape ``(n_images, n_features_out_)``, ready
    for any scikit-learn estimator. The backbone is built in ``fit`` (never in
    ``__init__``), so the estimator clones, pickles and grid-searches like any
    other.

    Parameters
    ----------
    model : str or torch.nn.Module, default="efficientnet_lite0"
        The backbone. ``"efficientnet_lite0"`` (the default, also ``_lite1`` and
        ``_lite2`` when their packages are installed) runs offline with
        ImageNet weights shipped on PyPI. Other names are looked up in
        torchvision, then timm (``"resnet50"``, ``"convnext_tiny"``,
        ``"resnet50.a1_in1k"``); prefix ``"timm:"`` or ``"torchvision:"`` to
        choose the source. An ``nn.Module`` is used as given (a copy of it).
    weights : str, path or None, default="DEFAULT"
        ``"DEFAULT"``: the model's pretrained weights (the packaged ones for the
        offline models, torchvision's ``DEFAULT`` enum member, timm's weights
        for the tag in the name, or the module's own weights). A torchvision
        enum member name such as ``"IMAGENET1K_V2"``. ``None``: random
        initialisation, seeded, so the same in every process. A path to a local ``.pt``/``.pth``/``.safetensors``
        state_dict, loaded with ``torch.load(..., weights_only=True)``.
    layers : str, list of str or None, default=None
        Which layers to read. None is ``"pre_logits"``: the global-pooled
        penultimate features (the input of the classifier head). Otherwise
        module names as ``model.named_modules()`` reports them, the aliases
        ``"stage1"`` ... ``"stageK"`` for the backbone's stages,
        ``"block1"`` ... ``"blockN"`` for a vision transformer's blocks, or
        ``"output"``. Several layers are concatenated in the order given. See
        :func:`featx.list_layers`.
    pooling : {"avg", "max", "avgmax", "catavgmax", "gem", "flatten", "cls", "cls+avg"}, default="avg"
        How a layer's output becomes a vector. For a spatial map (``C x H x W``,
        or ``H x W x C`` as Swin's stages give, pooled over H and W either way):
        global average, global max, the mean of the two (``"avgmax"``, as in
        timm), the two concatenated (``"catavgmax"``, ``2C``; featx <= 0.2
        called this ``"avgmax"`` and warns about the change), generalised
        mean with exponent ``gem_p``, or all ``C*H*W`` values (refused beyond
        262,144 values per image). For a transformer's token sequence
        (``L x C``): ``"avg"``, ``"max"`` and ``"gem"`` pool the patch tokens
        only (the class and register tokens excluded, as timm's
        ``global_pool="avg"``), ``"cls"`` is the class token, ``"cls+avg"``
        the class token and the patch tokens' mean side by side (``2C``, the
        DINOv2 linear-evaluation recipe). Layers that already output vectors
        (``pre_logits``) are left as they are.
    gem_p : float, default=3.0
        Exponent of GeM pooling (1 is average pooling; large values approach max).
    preprocess : dict or None, default=None
        Overrides of the model's own preprocessing, with keys ``input_size``
        (int or (height, width)), ``resize_size`` (shorter side before the
        center crop), ``mean``, ``std`` and ``interpolation``
        (``"bilinear"``, ``"bicubic"``, ``"nearest"``). Changing
        ``input_size`` alone keeps the model's crop ratio. None uses the
        weights' metadata (torchvision), timm's resolved data config, or
        ImageNet defaults (224 px crop of a 256 px resize) for an ``nn.Module``.
        With ``in_chans`` other than 3, ``mean`` and ``std`` take one value
        per input channel.
    in_chans : int, default=3
        Number of input channels (named after timm's parameter). Other than
        3, the backbone's first convolution is adapted from its pretrained
        RGB filters as timm's ``adapt_input_conv`` does (summed for one
        channel; repeated and scaled by ``3 / in_chans`` for more), channel
        ``i`` is normalised with the mean and std of RGB channel ``i % 3``
        (one channel: their averages), and images are read with all their
        bands: every band of a TIFF, arrays ``H x W x in_chans`` and tensors
        ``in_chans x H x W`` as they are; with ``in_chans=1`` colour images
        become grayscale. An image with another number of channels is an
        error naming both counts. The channel count is in the cache key.
        Refused for backbones whose stem cannot be adapted (Inception-v3 and
        GoogLeNet re-normalise RGB themselves) and with ``precision="int8"``
        (calibrated on RGB photographs).
    device : str or torch.device, default="auto"
        ``"auto"`` picks CUDA, then Apple MPS, then the CPU, when ``fit`` runs.
    precision : {"auto", "fp32", "bf16", "fp16", "int8"}, default="auto"
        ``"auto"`` is bf16 autocast on CUDA devices that support it (fp16 on
        older ones); on the CPU, bf16 autocast where the CPU computes bf16
        natively (AVX512_BF16 or AMX, as PyTorch reports it) and fp32
        elsewhere; what bf16 gains in speed and changes in the features and
        in cross-validated accuracy is measured on the Performance page of
        the docs. The choice is in ``precision_`` and in the cache key. In
        bf16 and fp16 the backbone runs with each BatchNorm folded into the
        convolution before it (where that provably gives the same outputs in
        fp32). ``"fp32"`` is exact
        everywhere: the module's own arithmetic. ``"bf16"`` on a CPU that
        only emulates it warns (:class:`featx.DeviceWarning`) that it is
        slower there. ``"int8"`` (the CPU only; ``pip install
        'featx[int8]'``): the truncated backbone quantised statically by
        torchao's PT2E flow (int8 weights and activations, ranges calibrated
        on fixed crops of scikit-learn's two sample photographs, never on
        your data, so features depend on the weights alone) and compiled by
        TorchInductor, once per cache directory: the first transform that
        needs it quantises and compiles (seconds to a minute), later ones and
        other processes load the package from ``<cache dir>/compiled/``.
        Features are close to fp32's, not equal, and have their own cache
        entries; a CPU without VNNI or AMX warns. What int8 gains and
        changes is measured on the Performance page of the docs; ``"auto"``
        never picks it.
    batch_size : int or "auto", default="auto"
        Images per forward pass. ``"auto"``: 64 on CUDA; on the CPU, 8 for
        one eager fp32 stream, a compiled package (fp32 or bf16) or int8,
        and 4 otherwise (per stream with eager bf16 streams, see
        ``streams_``): the best batch as measured on the Performance page of
        the docs. Results do not depend on it (within
        1e-5 in fp32).
    num_workers : int or "auto", default="auto"
        Decoding and resizing. An int: that many DataLoader worker processes
        (0: in the main thread). ``"auto"``: on CUDA, up to 8 worker processes
        decode while the GPU computes; on the CPU, groups of batches are decoded
        by one thread per core between forward passes (the model already uses every
        core, and decoders running beside it slow it down more than they
        save); inline for inputs of less than two batches.
    cache : None, True, path or URL, default=None
        Per-image embedding cache. None: off. A directory: an SQLite database
        there (created if needed). True: ``$FEATX_CACHE_DIR``, else the user
        cache directory (``~/.cache/featx`` on Linux). Entries are keyed by the
        image's content (a file's bytes, an array's pixels) and by everything
        that changes the numbers (model, weights digest, preprocessing,
        precision, layer, pooling), so a renamed file hits and an edited one
        misses. With a cache, a miss runs the backbone through every stage and
        stores all stage outputs and ``pre_logits`` with avg and max pooling
        too, so a later grid over ``layers`` and ``pooling`` runs the backbone
        once per image in all. A storage URL (``"s3://bucket/prefix"``,
        ``"gs://..."``, ``"file:///mnt/nfs/featx"``, any fsspec URL) shares
        one cache between many machines: immutable checksummed objects, one
        per image, written create-only (no locks; any number of writers),
        read through the local cache (``featx[s3]`` for S3). Cache faults warn
        (:class:`featx.CacheWarning`) and never change results.
    on_error : {"raise", "nan"}, default="raise"
        What an unreadable item does. ``"raise"``: :class:`featx.ImageLoadError`
        (a ``ValueError``) naming the item's index, path and the cause, raised
        after the good images before it have been computed (and cached).
        ``"nan"``: its row is NaN, one :class:`featx.ImageLoadWarning` lists
        the count and the first few, and ``failed_indices_`` records them, so a
        ``SimpleImputer`` or a mask can follow.
    progress : bool or None, default=None
        Show a tqdm progress bar; None shows it when stderr is a terminal.
    backend : {"auto", "torch", "torch.compile", "onnxruntime"}, default="auto"
        What runs the backbone. ``"auto"``: on the CPU in fp32 or bf16 (the
        resolved precision), the compiled package below, compiled once the
        eager runs of its graph in this cache directory have cost about as
        much as a compilation (30 s of eager work, ``FEATX_COMPILE_AFTER_S``
        to change it; so small jobs never compile, and a large one switches
        part-way), and kept only if the compiling process timed it faster
        than eager PyTorch; until then, and where it was not kept, eager
        PyTorch with featx's CPU schedule (bf16 streams); on GPUs, eager
        PyTorch. ``"torch"``: eager PyTorch. ``"torch.compile"``: on the CPU
        in fp32 (its ``"auto"`` precision there) or bf16, the truncated
        forward pass compiled ahead of time by TorchInductor and kept in
        ``<cache dir>/compiled/``: a run that finds it missing runs eager
        PyTorch and, when it ends, starts its compilation in another process
        at the lowest priority, so no call waits for a compilation; later runs
        and processes switch to the package as soon as it is there. Its
        features equal eager PyTorch's (fp32: within 1e-5 of their scale;
        bf16: within a few bf16 rounding steps, the engines round
        differently) and share cache entries. On GPUs, and in fp16,
        ``torch.compile`` in this process (the first batch pays the
        compilation). ``"onnxruntime"``
        (CPU, fp32; needs ``pip install 'featx[onnx]'``): the backbone up to
        the deepest requested layer plus the pooling, exported once to ONNX
        and stored in ``<cache dir>/onnx/`` (the default cache directory when
        ``cache`` is None), then run by ONNX Runtime. What each backend gains
        on which CPU is measured on the Performance page of the docs. Backends
        agree within 1e-4 (relative), so they share cache entries. A model
        that cannot be exported or compiled runs in eager PyTorch, with one
        :class:`featx.BackendWarning` saying why; ``backend_`` then reads
        ``"torch"``.
    gpu_decode : bool, default=False
        On a CUDA device, decode JPEG files (and bytes) on the GPU with
        nvJPEG (``torchvision.io.decode_jpeg(device="cuda")``) and resize
        them there, in this process; other formats, rotated (EXIF) photos and
        unusual JPEGs are decoded on the CPU as usual. Worth it when the CPU
        cannot decode as fast as the GPU computes. nvJPEG's pixels may differ
        from libjpeg-turbo's by a grey level, which the cache does not
        distinguish. Refused on other devices.
    tta : {None, "hflip", "five_crop", "ten_crop", "multiscale"}, default=None
        Test-time augmentation: each image's features are the average over
        several views, run through the backbone in the same batch. The
        backbone cost is multiplied by the number of views: ``"hflip"`` (2:
        the center crop and its mirror image), ``"five_crop"`` (5: four
        corners and the center of the resized image), ``"ten_crop"`` (10:
        those and their mirror images), ``"multiscale"`` (3: center crops
        after resizing the shorter side to 0.875, 1 and 1.25 times
        ``resize_size``). The views are part of the cache key. Not with
        ``pooling="flatten"``.

    Attributes
    ----------
    backbone_ : torch.nn.Module
        The frozen backbone, in ``eval()`` mode, on ``device_``; in bf16 or
        fp16, with its BatchNorms folded into their convolutions (see
        ``precision``). Shared, read-only, by every extractor of the process
        that runs the same network; reading it builds it if no transform has.
    device_ : torch.device
        The resolved device.
    autocast_dtype_ : torch.dtype or None
        The autocast dtype, or None for fp32; ``torch.int8`` stands for
        ``precision="int8"`` (a quantised graph, not an autocast).
    precision_ : str
        The resolved precision: ``"fp32"``, ``"bf16"``, ``"fp16"`` or ``"int8"``.
    streams_ : int
        Forward passes run side by side. On the CPU with bf16, one
        single-threaded stream per torch thread, each decoding and computing
        its own batches. With eager fp32 on a multi-core CPU the faster of
        the two depends on the model and the machine (see the Performance
        page of the docs), so a ``transform`` of at least 16 batches
        measures both on its own images and keeps the faster one; the
        majority of three such measurements is remembered across processes
        in ``schedules.json`` in the cache directory. ``streams_`` is the
        current decision, the one the runner uses (after a measuring
        ``transform``, its winner), or 1 until it is decided. 1 on GPUs and
        other backends.
    backend_ : str
        The backend in use: ``"auto"`` resolved, and ``"torch"`` after a
        fallback (known once the engine is built: in ``fit`` without a cache,
        else at the first image computed).
    preprocess_ : dict
        The resolved preprocessing (``input_size``, ``resize_size``, ``mean``,
        ``std``, ``interpolation``).
    layers_ : list of str
        The requested layers as featx names them (aliases such as
        ``"stage4"`` or ``"pre_logits"`` kept: they name the feature columns),
        in output order.
    layer_modules_ : dict
        For each name in ``layers_``, the module it hooks, as
        ``list_layers`` and ``named_modules()`` spell it (for example
        ``{"stage4": "layer3"}``); ``"input of fc"`` where the layer is a
        module's input (``pre_logits``: the classifier's input).
    layer_shapes_ : dict
        Per-image output shape of each layer in ``layers_``.
    n_features_out_ : int
        Number of output columns.
    model_id_ : str
        The backbone's identity (``"featx:efficientnet_lite0"``,
        ``"torchvision:resnet50"``, ...).
    weights_id_ : str or None
        Where the weights came from.
    weights_digest_ : str
        A digest of the weights' values; checked when a pickled extractor
        rebuilds its backbone.
    batch_size_ : int
        The resolved batch size (per stream).
    cache_dir_ : str or None
        The resolved cache directory, or the storage URL.
    failed_indices_ : ndarray of int
        Indices of the items the last ``transform`` could not read
        (``on_error="nan"``); empty when all were read.
    failed_reasons_ : list of (int, str)
        The same items with the reason each could not be read.
    last_run_ : object
        What the latest ``transform`` did: ``images``, ``computed`` (images
        that went through the backbone), ``cache_hits``, ``duplicates``
        (repeated content, computed once), ``streams`` and ``failed``. Each
        transform replaces its contents (it describes a run, not fitted
        state); ``failed_indices_`` and ``failed_reasons_`` read it.

    Examples
    --------
    >>> import numpy as np
    >>> from featx import PretrainedFeatureExtractor
    >>> images = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    >>> ext = PretrainedFeatureExtractor(progress=False).fit(images)
    >>> ext.transform(images).shape
    (2, 1280)
    >>> ext.get_feature_names_out()[:2]
    array(['pre_logits_0', 'pre_logits_1'], dtype=object)
    """

    def __init__(
        self,
        model: str | nn.Module = DEFAULT_MODEL,
        *,
        weights: Any = "DEFAULT",
        layers: str | list[str] | None = None,
        pooling: str = "avg",
        gem_p: float = 3.0,
        preprocess: dict | None = None,
        in_chans: int = 3,
        device: str | torch.device = "auto",
        precision: str = "auto",
        batch_size: int | str = "auto",
        num_workers: int | str = "auto",
        cache: Any = None,
        on_error: str = "raise",
        progress: bool | None = None,
        backend: str = "auto",
        gpu_decode: bool = False,
        tta: str | None = None,
    ):
        self.model = model
        self.weights = weights
        self.layers = layers
        self.pooling = pooling
        self.gem_p = gem_p
        self.preprocess = preprocess
        self.in_chans = in_chans
        self.device = device
        self.precision = precision
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.cache = cache
        self.on_error = on_error
        self.progress = progress
        self.backend = backend
        self.gpu_decode = gpu_decode
        self.tta = tta

    # ------------------------------------------------------------- validation

    def _check_params(self) -> None:
        """Refuse invalid parameter values (those that need no device or model to judge)."""
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling={self.pooling!r} is invalid. It must be one of {list(POOLINGS)}.")
        if self.pooling == "avgmax":
            warnings.warn(
                "pooling='avgmax' follows timm since featx 0.3: the mean of average and max pooling (C features). "
                "featx 0.2's 'avgmax' concatenated them (2C features): that is pooling='catavgmax' now.",
                FeatxWarning,
                stacklevel=3,
            )
        if isinstance(self.gem_p, bool) or not isinstance(self.gem_p, (int, float)) or not self.gem_p > 0:
            raise ValueError(f"gem_p={self.gem_p!r} is invalid. It must be a positive number.")
        if isinstance(self.in_chans, bool) or not isinstance(self.in_chans, (int, np.integer)) or self.in_chans < 1:
            raise ParameterError(f"{arg('in_chans', self.in_chans)} is invalid. Use the number of bands of the "
                                 "images (3 for RGB, 1 for grayscale).", "in_chans")
        for name, low in (("batch_size", 1), ("num_workers", 0)):
            v = getattr(self, name)
            if v != "auto" and (isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low):
                raise ValueError(f"{name}={v!r} is invalid. Use 'auto' or an int >= {low}.")
        if self.on_error not in ON_ERROR:
            raise ValueError(f"on_error={self.on_error!r} is invalid. Use 'raise' or 'nan'.")
        if self.tta is not None and self.tta not in TTA_MODES:
            raise ValueError(f"tta={self.tta!r} is invalid. It must be one of {[None, *TTA_MODES]}.")
        if self.tta is not None and self.pooling == "flatten":
            raise ParameterError(
                f"{arg('tta', self.tta)} averages pooled features over views; it cannot be combined with "
                f"{arg('pooling', 'flatten')} (spatial maps of flipped or shifted views do not line up). Use "
                f"{arg('pooling', 'avg')} or 'gem'.", "tta")
        for name in ("progress", "gpu_decode"):
            if getattr(self, name) not in ((None, True, False) if name == "progress" else (True, False)):
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid. Use True or False"
                                 f"{' or None (auto)' if name == 'progress' else ''}.")

    # -------------------------------------------------------------------- fit

    def fit(self, X: Any = None, y: Any = None) -> "PretrainedFeatureExtractor":
        """Settle the backbone, layers, preprocessing, device, precision, schedule and cache.

        The extractor learns nothing from the data: ``X`` and ``y`` are
        accepted for Pipeline compatibility and ignored. Everything is
        decided here, in one place; the frozen network it
        runs is built once per process and shared by every extractor that
        needs the same one (later fits, e.g. inside ``GridSearchCV``, copy
        nothing). Without a cache the network is ready when ``fit`` returns;
        with one it is built by the first ``transform`` that has an image to
        compute, so a search over cached features builds none.

        Parameters
        ----------
        X : ignored
        y : ignored

        Returns
        -------
        self : PretrainedFeatureExtractor
            The fitted extractor.
        """
        self._check_params()
        self._adopt(settle(self.get_params(deep=False)))
        self.last_run_ = RunStats(streams=self.streams_)
        return self

    def _adopt(self, s: Settled) -> None:
        """Copy the fitted attributes from a settled record."""
        self.__dict__.pop("_built_runner", None)
        self._settled = s
        self.device_ = s.device
        self.autocast_dtype_ = s.dtype
        self.precision_ = s.precision
        self.preprocess_ = s.preprocess
        self.model_id_ = s.template.identity
        self.weights_id_ = s.template.weights
        self.weights_digest_ = s.template.digest
        self.layers_ = [t.display for t in s.targets]
        self.layer_modules_ = {t.display: (t.module if t.kind == "output" else f"input of {t.module}")
                               for t in s.targets}
        self.layer_shapes_ = {t.display: t.shape for t in s.targets}
        self.n_features_out_ = len(s.feature_names)
        self.batch_size_ = s.batch_size
        self.cache_dir_ = s.cache_dir
        self._feature_names = s.feature_names
        self._backend = s.backend
        if s.cache_dir is None:  # every transform computes: the network is heavy state, built now
            _ = self._runner

    @property
    def _runner(self):
        """The engine on the shared network, built on first use."""
        runner = self.__dict__.get("_built_runner")
        if runner is None:
            runner = self.__dict__["_built_runner"] = self._settled.runner()
        return runner

    @property
    def backbone_(self) -> nn.Module:
        """The frozen backbone on ``device_`` (shared by every extractor of this network in the process)."""
        return self._runner.module

    @property
    def backend_(self) -> str:
        """The backend in use: ``"auto"`` resolved, and ``"torch"`` after a fallback (once the engine is built)."""
        runner = self.__dict__.get("_built_runner")
        return runner.backend if runner is not None else self._backend

    @property
    def streams_(self) -> int:
        """Forward passes run side by side: the schedule's current decision (what the runner uses)."""
        return self._settled.schedule.streams

    @property
    def failed_indices_(self) -> np.ndarray:
        """Indices of the items the last ``transform`` could not read (``on_error="nan"``)."""
        return np.asarray([i for i, _ in self.last_run_.failed], dtype=np.intp)

    @property
    def failed_reasons_(self) -> list[tuple[int, str]]:
        """``(index, reason)`` of the items the last ``transform`` could not read."""
        return [(int(i), reason) for i, reason in self.last_run_.failed]

    # -------------------------------------------------------------- transform

    def transform(self, X: Any) -> np.ndarray:
        r"""Embed the images in ``X``.

        Parameters
        ----------
        X : sequence of images, or an image batch
            File paths (str or PathLike), image-file bytes, PIL images, numpy
            arrays (H x W or H x W x C each) or torch tensors (C x H x W each),
            in a list, tuple, 1-D array, pandas Series or one-column DataFrame;
            or a numpy batch N x H x W x C, or a torch batch N x C x H x W.

        Returns
        -------
        features : ndarray of shape (n_images, n_features_out\_), dtype float32
            One row per input item, in order; a row of NaN for an item that
            could not be read when ``on_error="nan"``.

        Raises
        ------
        featx.ImageLoadError
            When an item cannot be read; the message names its index and path.
            Embeddings computed before it in the same call are already in the
            cache.
        """
        check_is_fitted(self, "n_features_out_")
        items = as_items(X)
        out = np.empty((len(items), self.n_features_out_), dtype=np.float32)
        self._fill(items, out)
        return out

    def transform_to_npy(self, X: Any, path: str | os.PathLike) -> np.ndarray:
        r"""Embed the images in ``X`` straight into a ``.npy`` file, for outputs larger than memory.

        Rows are written into a memory-mapped file as batches finish, so the
        process holds only the model and a few batches, whatever the number
        of images. The file is written whole or not at all: its disk space
        is claimed before the first image is computed (a full disk or an
        unwritable folder is a :class:`featx.OutputError` then, naming the
        space needed), rows go to a temporary file beside ``path``
        (``.NAME.XXXX.partial.npy``), renamed onto ``path`` when every row is
        there; an error removes it, and a killed process leaves only that
        hidden partial file. With ``cache`` set, running again recomputes
        nothing that was finished.

        Parameters
        ----------
        X : sequence of images, or an image batch
            As for :meth:`transform`.
        path : str or path-like
            The ``.npy`` file to create (overwritten if it exists).

        Returns
        -------
        features : numpy.memmap of shape (n_images, n_features_out\_), dtype float32
            The file, memory-mapped read-only; ``np.load(path, mmap_mode="r")``
            opens it again later.

        Examples
        --------
        >>> import numpy as np, tempfile, os
        >>> from featx import PretrainedFeatureExtractor
        >>> images = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
        >>> ext = PretrainedFeatureExtractor(progress=False).fit()
        >>> path = os.path.join(tempfile.mkdtemp(), "features.npy")
        >>> ext.transform_to_npy(images, path).shape
        (3, 1280)
        >>> np.load(path).shape
        (3, 1280)
        """
        check_is_fitted(self, "n_features_out_")
        path = Path(path)
        if path.suffix.lower() != ".npy":
            raise ValueError(f"path={str(path)!r} must name a .npy file (e.g. 'features.npy').")
        items = as_items(X)
        shape = (len(items), self.n_features_out_)
        with written(path) as tmp:
            out = npy_memmap(tmp, shape, np.float32, shown=path)
            try:
                self._fill(items, out)
                out.flush()
            finally:
                del out
        return np.load(path, mmap_mode="r")

    def _fill(self, items: Any, out: np.ndarray) -> None:
        """Compute (or read from the cache) every item's row of ``out``; record the run in ``last_run_``."""
        stats = self._settled.run(lambda: self._runner, items, out)
        # the record of the last run is an observer, not fitted state: one object, its contents replaced
        vars(self.last_run_).update(vars(stats))
        failed = stats.failed
        if failed:
            shown = "; ".join(
                f"{i} ({item_path(items[i]) or type(items[i]).__name__}): {reason}" for i, reason in failed[:3]
            )
            warnings.warn(
                f"{len(failed)} of {len(items)} images could not be read; their rows are NaN "
                f"(indices in failed_indices_). First: {shown}",
                ImageLoadWarning,
                stacklevel=_user_stacklevel(),
            )

    # --------------------------------------------------------- sklearn glue

    def get_feature_names_out(self, input_features: Any = None) -> np.ndarray:
        """Column names: ``{layer}_{pooling}_{i}`` (``{layer}_{i}`` for vector layers).

        Parameters
        ----------
        input_features : ignored
            Present for API compatibility; images have no input feature names.

        Returns
        -------
        feature_names_out : ndarray of str objects
            ``<layer>_<pooling>_<k>`` for each column (``pre_logits_<k>`` for
            the pre-logits features), in the order of ``transform``'s columns.
        """
        check_is_fitted(self, "n_features_out_")
        return self._feature_names.copy()

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False  # X is a collection of images, not a feature matrix
        tags.input_tags.three_d_array = True  # N x H x W grayscale batches
        tags.input_tags.string = True  # file paths
        tags.target_tags.required = False
        tags.transformer_tags.preserves_dtype = ["float32"]  # output is always float32
        tags.non_deterministic = False
        return tags

    # ------------------------------------------------------------- pickling

    def __getstate__(self) -> dict:
        state = dict(super().__getstate__())
        # The backbone is rebuilt from model + weights after loading (and its
        # digest checked), so the weights are never duplicated in the pickle.
        for derived in ("_built_runner", "_settled", "_feature_names"):  # settled again by __setstate__
            state.pop(derived, None)
        if "n_features_out_" in state:
            state["backend_"] = self.backend_
        return pack_state(state)

    def __setstate__(self, state: dict) -> None:
        state = unpack_state(state)
        fitted = state.pop("backend_", None) if "n_features_out_" in state else None
        state.pop("streams_", None)  # pickles of featx <= 0.2 stored it; it is the schedule's decision now
        for stale in ("_backend", "_plan", "_namespace", "_tune"):  # featx 0.2's derived state
            state.pop(stale, None)
        state.setdefault("in_chans", 3)  # pickled before the parameter existed
        super().__setstate__(state)
        if fitted is not None:  # the device (and so the schedule) may have changed with the machine
            keep = {"device_": self.device_, "autocast_dtype_": state.get("autocast_dtype_"),
                    "backend_": fitted, "weights_digest_": self.weights_digest_}
            self._adopt(settle(self.get_params(deep=False), fitted=keep))
