"""FineTunedClassifier: train the last layers of a pretrained CNN as a scikit-learn classifier."""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted
from torch import nn

from ._doclink import DocLinkMixin
from ._images.preprocess import ImageDataset, Items, as_items, collate, load_error, normalize_batch
from ._models.backbones import get_template, instantiate
from ._models.layers import PRE_LOGITS, LayerCapture, resolve_layers
from ._options import DEFAULT_MODEL
from ._pickling import pack_state, unpack_state
from ._runtime.device import autocast, resolve_device, resolve_precision
from ._runtime.loading import PARALLEL, batches, show_progress
from ._runtime.settling import settle_backbone

__all__ = ["FineTunedClassifier"]


class FineTunedClassifier(DocLinkMixin, ClassifierMixin, BaseEstimator):
    """Fine-tune the top layers of a pretrained network (a CNN or a vision transformer) on labelled images.

    The backbone's classifier head is replaced by a linear layer for the
    task's classes (fed by the ``pre_logits`` features); every layer below
    ``trainable_from`` stays frozen (weights and batch-norm statistics), the
    rest is trained with AdamW, the backbone at a smaller learning rate than
    the head, on lightly augmented images (random crops and mirror images),
    with early stopping on a stratified held-out split. Training is seeded:
    on the CPU the same data and parameters give the same model.

    Parameters
    ----------
    model : str or torch.nn.Module, default="efficientnet_lite0"
        The backbone, as for :class:`featx.PretrainedFeatureExtractor`.
    weights : str, path or None, default="DEFAULT"
        The starting weights, as for :class:`featx.PretrainedFeatureExtractor`.
    trainable_from : int or str, default=1
        What is trained. An int ``k``: the head and the last ``k`` stages
        (the last ``k`` blocks of a vision transformer, and what follows
        them, e.g. its final norm; ``0``: the head only, a linear probe
        trained by gradient descent).
        A layer name or alias (``"layer4"``, ``"stage5"``, ``"blocks.6"``):
        the head and every parameter from that layer on, in the order the
        model registers them (its execution order for torchvision and timm
        CNNs).
    head_lr : float, default=1e-3
        Learning rate of the new head.
    backbone_lr : float, default=1e-4
        Learning rate of the trainable backbone layers.
    weight_decay : float, default=1e-4
        AdamW weight decay.
    max_epochs : int, default=10
        Passes over the training split.
    batch_size : int, default=16
        Images per optimisation step.
    validation_fraction : float, default=0.2
        Share of the images held out (stratified) for early stopping; the
        weights of the epoch with the lowest validation loss are kept. 0
        trains for ``max_epochs`` without validation (also when there are too
        few images to hold out one per class).
    patience : int, default=3
        Epochs without a better validation loss before training stops.
    augment : bool, default=True
        Random crops (from the image resized to ``resize_size``) and
        horizontal flips while training; the center crop when predicting.
    preprocess : dict or None, default=None
        Overrides of the model's preprocessing, as for the extractor.
    device : str or torch.device, default="auto"
        ``"auto"``: CUDA, then MPS, then the CPU.
    precision : {"auto", "fp32", "bf16", "fp16"}, default="auto"
        Autocast dtype (``"auto"``: bf16/fp16 on CUDA, fp32 elsewhere).
    random_state : int, RandomState or None, default=0
        Seeds the split, the shuffling, the augmentations and dropout. An int
        repeats exactly (on the CPU); None draws a fresh seed at each ``fit``;
        a ``numpy.random.RandomState`` gives the seed (drawn from it).
    progress : bool or None, default=None
        A progress bar per epoch; None shows it when stderr is a terminal.

    Attributes
    ----------
    classes_ : ndarray
        The class labels.
    model_id_ : str
        The backbone's identity.
    preprocess_ : dict
        The resolved preprocessing.
    device_ : torch.device
        The device it trained on (and predicts on).
    trainable_parameters_ : list of str
        Names of the backbone parameters that were trained (the head's are
        ``head.weight`` and ``head.bias``).
    n_epochs_ : int
        Epochs run.
    best_epoch_ : int
        The epoch whose weights were kept (1-based).
    history_ : list of dict
        Per epoch: ``train_loss``, ``val_loss``, ``val_accuracy`` (None
        without validation) and ``seconds``.
    network_ : torch.nn.Module
        The fine-tuned backbone (its original head unused) and ``head``.

    Examples
    --------
    >>> import numpy as np
    >>> from featx import FineTunedClassifier
    >>> rng = np.random.default_rng(0)
    >>> X = rng.integers(0, 256, (8, 48, 48, 3), dtype=np.uint8)
    >>> y = np.array([0, 1] * 4)
    >>> clf = FineTunedClassifier(max_epochs=1, preprocess={"input_size": 32}, validation_fraction=0,
    ...                           progress=False).fit(X, y)
    >>> clf.predict_proba(X[:2]).shape
    (2, 2)
    """

    def __init__(
        self,
        model: str | nn.Module = DEFAULT_MODEL,
        *,
        weights: Any = "DEFAULT",
        trainable_from: int | str = 1,
        head_lr: float = 1e-3,
        backbone_lr: float = 1e-4,
        weight_decay: float = 1e-4,
        max_epochs: int = 10,
        batch_size: int = 16,
        validation_fraction: float = 0.2,
        patience: int = 3,
        augment: bool = True,
        preprocess: dict | None = None,
        device: str | torch.device = "auto",
        precision: str = "auto",
        random_state: int = 0,
        progress: bool | None = None,
    ):
        self.model = model
        self.weights = weights
        self.trainable_from = trainable_from
        self.head_lr = head_lr
        self.backbone_lr = backbone_lr
        self.weight_decay = weight_decay
        self.max_epochs = max_epochs
        self.batch_size = batch_size
        self.validation_fraction = validation_fraction
        self.patience = patience
        self.augment = augment
        self.preprocess = preprocess
        self.device = device
        self.precision = precision
        self.random_state = random_state
        self.progress = progress

    # ------------------------------------------------------------ validation

    def _check_params(self) -> None:
        """Refuse invalid parameter values, naming the parameter and what it accepts."""
        def positive(name: str, integer: bool = False, allow_zero: bool = False) -> None:
            v = getattr(self, name)
            kinds = (int, np.integer) if integer else (int, float, np.integer, np.floating)
            ok = isinstance(v, kinds) and not isinstance(v, bool) and (v >= 0 if allow_zero else v > 0)
            if not ok:
                what = "an int" if integer else "a number"
                raise ValueError(f"{name}={v!r} is invalid. It must be {what} {'>= 0' if allow_zero else '> 0'}.")

        for name in ("head_lr", "backbone_lr"):
            positive(name)
        positive("weight_decay", allow_zero=True)
        positive("max_epochs", integer=True)
        positive("batch_size", integer=True)
        positive("patience", integer=True)
        if not isinstance(self.validation_fraction, (int, float)) or not 0 <= self.validation_fraction < 1:
            raise ValueError(f"validation_fraction={self.validation_fraction!r} is invalid. Use a number in [0, 1).")
        if isinstance(self.trainable_from, bool) or not isinstance(self.trainable_from, (int, np.integer, str)) or (
            not isinstance(self.trainable_from, str) and self.trainable_from < 0
        ):
            raise ValueError(
                f"trainable_from={self.trainable_from!r} is invalid. Use a number of final stages (0: the head "
                "only) or a layer name such as 'layer4' or 'stage5'."
            )
        if self.augment not in (True, False):
            raise ValueError(f"augment={self.augment!r} is invalid. Use True or False.")
        rs = self.random_state
        if not (rs is None or isinstance(rs, np.random.RandomState)
                or (isinstance(rs, (int, np.integer)) and not isinstance(rs, bool) and 0 <= rs < 2**32)):
            raise ValueError(f"random_state={rs!r} is invalid. Use None (a fresh seed), an int in [0, 2**32) "
                             "or a numpy RandomState.")

    # ------------------------------------------------------------------- fit

    def fit(self, X: Any, y: Any) -> "FineTunedClassifier":
        """Fine-tune on images ``X`` with labels ``y``.

        Parameters
        ----------
        X : sequence of images, or an image batch
            As for :meth:`featx.PretrainedFeatureExtractor.transform`.
        y : array-like of shape (n_images,)
            Class labels.

        Returns
        -------
        self : FineTunedClassifier
            The fitted classifier.
        """
        self._check_params()
        items = as_items(X)
        y = np.asarray(y)
        if y.ndim != 1 or len(y) != len(items):
            raise ValueError(f"y must be 1-D with one label per image: got shape {y.shape} for {len(items)} images.")
        check_classification_targets(y)
        classes, y_enc = np.unique(y, return_inverse=True)
        if len(classes) < 2:
            raise ValueError(f"y has a single class ({classes[0]!r}); a classifier needs at least two.")
        self.__dict__.pop("classes_", None)  # a failed refit leaves the estimator unfitted

        device = resolve_device(self.device)
        dtype = resolve_precision(self.precision, device, training=True)
        template, cfg, pr = settle_backbone(self.model, self.weights, self.preprocess, device)
        pre_logits = resolve_layers([PRE_LOGITS], pr)[0]
        backbone = instantiate(template)  # a private copy: the user's module is never trained in place
        start = _first_trainable(backbone, self.trainable_from, pr)

        self.device_ = device
        self.autocast_dtype_ = dtype
        self.preprocess_ = cfg
        self.model_id_ = template.identity
        self._pre_logits = pre_logits
        names = [n for n, _ in backbone.named_parameters()]
        # the original classifier (whose input is pre_logits) is never run: nothing of it is trained
        unused = pre_logits.module + "." if pre_logits.kind == "input" and pre_logits.module else None
        trainable = names[names.index(start):] if start is not None else []
        self.trainable_parameters_ = [n for n in trainable if unused is None or not n.startswith(unused)]

        seed = _seed(self.random_state)
        rng = np.random.default_rng(seed)
        train_idx, val_idx = _split(y_enc, self.validation_fraction, seed)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            head = nn.Linear(pre_logits.shape[0], len(classes))
            self.network_ = _Network(backbone, head, pre_logits, cfg).to(device)
            _set_trainable(self.network_, set(self.trainable_parameters_))
            self._train(items, y_enc, train_idx, val_idx, rng)
        self.classes_ = classes
        return self

    def _train(self, items: Items, y: np.ndarray, train_idx: np.ndarray, val_idx: np.ndarray,
               rng: np.random.Generator) -> None:
        """Epochs of AdamW on the trainable parameters; keep the weights of the best validation loss."""
        cfg = self.preprocess_
        rs = max(cfg["resize_size"], *cfg["input_size"])
        train_x = self._load(items, train_idx, dict(cfg, input_size=(rs, rs)) if self.augment else cfg)
        val_x = self._load(items, val_idx, cfg) if len(val_idx) else None  # decoded once, cropped afresh each epoch
        y_t = torch.as_tensor(y, dtype=torch.long)
        opt = self._optimizer()
        scaler = torch.amp.GradScaler("cuda") if self.autocast_dtype_ == torch.float16 else None
        best_loss, best_state, best_epoch, stale = math.inf, None, 0, 0
        self.history_ = []
        for epoch in range(1, int(self.max_epochs) + 1):
            t0 = time.perf_counter()
            rec = {"epoch": epoch, "val_loss": None, "val_accuracy": None,
                   "train_loss": self._epoch(train_x, y_t[train_idx], rng.permutation(len(train_idx)), opt, scaler,
                                             epoch)}
            if val_x is not None:
                rec.update(self._validation(val_x, y_t[val_idx]))
            rec["seconds"] = time.perf_counter() - t0
            self.history_.append(rec)
            score = rec["val_loss"] if rec["val_loss"] is not None else -epoch  # no validation: keep the last
            if score < best_loss:
                best_loss, best_epoch, stale = score, epoch, 0
                best_state = {k: v.detach().clone() for k, v in self.network_.state_dict().items()}
            else:
                stale += 1
                if val_x is not None and stale >= self.patience:
                    break
        self.network_.load_state_dict(best_state)
        self.network_.eval()
        self.n_epochs_, self.best_epoch_ = len(self.history_), best_epoch

    def _optimizer(self) -> torch.optim.Optimizer:
        """AdamW: the head at ``head_lr``, the trainable backbone parameters at ``backbone_lr``."""
        net = self.network_
        groups = [{"params": list(net.head.parameters()), "lr": self.head_lr}]
        body = [p for p in net.backbone.parameters() if p.requires_grad]
        if body:
            groups.append({"params": body, "lr": self.backbone_lr})
        return torch.optim.AdamW(groups, weight_decay=self.weight_decay)

    def _epoch(self, x: torch.Tensor, y: torch.Tensor, order: np.ndarray, opt: torch.optim.Optimizer,
               scaler: Any, epoch: int) -> float:
        """One pass over the training images in ``order``; returns the mean training loss."""
        net, device, size = self.network_, self.device_, int(self.batch_size)
        net.train_mode()
        show = show_progress(self.progress)
        total, bar = 0.0, _bar(len(order), epoch, self.max_epochs) if show else None
        for s in range(0, len(order), size):
            sel = order[s:s + size]
            xb = _augment(x[sel], self.preprocess_["input_size"]) if self.augment else x[sel]
            xb = normalize_batch(xb.to(device), net.mean, net.std).contiguous(memory_format=torch.channels_last)
            opt.zero_grad(set_to_none=True)
            with autocast(device, self.autocast_dtype_):
                loss = nn.functional.cross_entropy(net(xb).float(), y[sel].to(device))
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            total += float(loss.detach()) * len(sel)
            if bar is not None:
                bar.update(len(sel))
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        if bar is not None:
            bar.close()
        return total / len(order)

    def _validation(self, x: torch.Tensor, y: torch.Tensor) -> dict:
        """Loss and accuracy on the held-out images."""
        logits = self._logits(x)
        return {"val_loss": float(nn.functional.cross_entropy(logits, y)),
                "val_accuracy": float((logits.argmax(1) == y).float().mean())}

    def _stream(self, items: Items, indices: np.ndarray, cfg: dict):
        """Decoded, resized batches of ``items[indices]``: ``(positions in indices, tensor)``, in order."""
        loader = batches(ImageDataset(items, np.asarray(indices), cfg), int(self.batch_size),
                         PARALLEL if len(indices) > int(self.batch_size) else 0, collate)
        pos = {int(i): k for k, i in enumerate(indices)}
        for idx, batch, errors in loader:
            if errors:
                raise load_error(items, errors)
            yield np.array([pos[int(i)] for i in idx]), batch

    def _load(self, items: Items, indices: np.ndarray, cfg: dict) -> torch.Tensor:
        """Decode and resize ``items[indices]`` into one tensor, in order (training data)."""
        parts = [batch for _, batch in self._stream(items, indices, cfg)]
        return torch.cat(parts) if parts else torch.empty(0, 3, *cfg["input_size"], dtype=torch.uint8)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        net = self.network_
        net.eval()
        outs = []
        with torch.inference_mode():
            for s in range(0, len(x), int(self.batch_size)):
                xb = normalize_batch(x[s:s + int(self.batch_size)].to(self.device_), net.mean, net.std)
                with autocast(self.device_, self.autocast_dtype_):
                    outs.append(net(xb.contiguous(memory_format=torch.channels_last)).float().cpu())
        return torch.cat(outs)

    # --------------------------------------------------------------- predict

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities, shape ``(n_images, n_classes)``, rows summing to 1.

        Parameters
        ----------
        X : sequence of images, or an image batch

        Returns
        -------
        proba : ndarray of shape (n_images, n_classes), dtype float64
            Class probabilities (softmax of the head's logits), columns in
            the order of ``classes_``.
        """
        check_is_fitted(self, "classes_")
        items = as_items(X)
        proba = np.empty((len(items), len(self.classes_)), dtype=np.float64)
        for idx, x in self._stream(items, np.arange(len(items)), self.preprocess_):
            proba[idx] = torch.softmax(self._logits(x).double(), 1).numpy()
        return proba

    def predict(self, X: Any) -> np.ndarray:
        """Predicted class labels.

        Parameters
        ----------
        X : sequence of images, or an image batch

        Returns
        -------
        labels : ndarray of shape (n_images,)
            The most probable class of each image, from ``classes_``.
        """
        check_is_fitted(self, "classes_")
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.three_d_array = True
        tags.input_tags.string = True
        # seeded training repeats exactly on the CPU only; "auto" is the CPU on a machine without an accelerator
        device = self.__dict__.get("device_")
        if device is None:
            try:
                device = resolve_device(self.device)
            except (ValueError, RuntimeError):  # an invalid or absent device: fit will say so
                device = torch.device("cuda")
        tags.non_deterministic = device.type != "cpu"
        return tags

    # -------------------------------------------------------------- pickling

    def __getstate__(self) -> dict:
        state = dict(super().__getstate__())
        net = state.pop("network_", None)
        if net is not None:
            # the fine-tuned weights cannot be rebuilt from a name: keep them, as numpy arrays (plain
            # data for pickle and for skops.io alike; float32 parameters, so nothing is rounded)
            state["_network_state"] = {k: v.detach().cpu().numpy() for k, v in net.state_dict().items()}
        return pack_state(state)

    def __setstate__(self, state: dict) -> None:
        weights = state.pop("_network_state", None)
        super().__setstate__(unpack_state(state))
        if weights is not None:
            # the architecture from the name (random initialisation: no weight files needed), then the weights
            template = get_template(self.model, None if isinstance(self.model, str) else "DEFAULT")
            head = nn.Linear(self._pre_logits.shape[0], len(self.classes_))
            net = _Network(instantiate(template), head, self._pre_logits, self.preprocess_)
            net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.items()})
            self.network_ = net.to(self.device_).eval()


class _Network(nn.Module):
    """Backbone up to ``pre_logits`` (read by a hook) followed by a new linear head."""

    def __init__(self, backbone: nn.Module, head: nn.Linear, pre_logits, cfg: dict):
        super().__init__()
        self.backbone = backbone.to(memory_format=torch.channels_last)
        self.head = head
        self.register_buffer("mean", torch.tensor(cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg["std"]).view(1, 3, 1, 1), persistent=False)
        self._capture = LayerCapture(self.backbone, [pre_logits], [("vec",)], 3.0)

    def train_mode(self) -> None:
        """Train mode only where something is trained: frozen layers keep their batch-norm statistics."""
        self.eval()
        for m in self.modules():
            if any(p.requires_grad for p in m.parameters(recurse=False)):
                m.train()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self._capture.run(x)[0]["vec"]
        return self.head(feats.to(self.head.weight.dtype))


def _first_trainable(backbone: nn.Module, trainable_from: int | str, pr) -> str | None:
    """Name of the first backbone parameter to train (None: the head only)."""
    if isinstance(trainable_from, str):
        target = resolve_layers([trainable_from], pr)[0]
        prefix = target.module
    else:
        k = int(trainable_from)
        if k == 0:
            return None
        # a transformer's units are its blocks (a ViT has no stages)
        units, word = (pr.stages, "stage") if pr.stages else (pr.blocks, "block")
        n = len(units)
        if k > n:
            raise ValueError(
                f"trainable_from={k} asks for more {word}s than the model has ({n}: "
                f"{', '.join(f'{word}{i + 1}' for i in range(n))}). Use at most {n}, or a layer name."
            )
        prefix = units[n - k]
    for name, _ in backbone.named_parameters():
        if prefix == "" or name.startswith(prefix + "."):
            return name
    raise ValueError(
        f"trainable_from={trainable_from!r} names layer {prefix!r}, which has no parameters to train. "
        "Pick a layer with weights (a stage or a block)."
    )


def _set_trainable(net: _Network, trainable: set[str]) -> None:
    for name, p in net.backbone.named_parameters():
        p.requires_grad_(name in trainable)
    for p in net.head.parameters():
        p.requires_grad_(True)


def _seed(random_state: Any) -> int:
    """One int seed for numpy and torch: the int itself, or one drawn (from fresh entropy for None)."""
    if random_state is None:
        return int(np.random.SeedSequence().generate_state(1)[0])
    if isinstance(random_state, np.random.RandomState):
        return int(random_state.randint(0, 2**31 - 1))
    return int(random_state)


def _split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified hold-out indices (none when too few images to hold out, and keep, one per class)."""
    from sklearn.model_selection import train_test_split

    n_classes = int(y.max()) + 1
    n_val = int(round(fraction * len(y)))
    if fraction == 0 or n_val < n_classes or len(y) - n_val < n_classes or np.bincount(y).min() < 2:
        return np.arange(len(y)), np.empty(0, dtype=np.intp)
    train, val = train_test_split(np.arange(len(y)), test_size=n_val, stratify=y, random_state=seed)
    return np.sort(train), np.sort(val)


def _augment(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Random ``size`` crops and horizontal flips, drawn per image (from torch's seeded generator)."""
    from torchvision.transforms import v2

    views = v2.Compose([v2.RandomCrop(list(size)), v2.RandomHorizontalFlip()])
    return torch.stack([views(img) for img in x])


def _bar(total: int, epoch: int, epochs: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="img", desc=f"epoch {epoch}/{epochs}", leave=False)
