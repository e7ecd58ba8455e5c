"""Sharing fitted models without pickle: the types a ``skops.io`` file of featx estimators holds."""

from __future__ import annotations

__all__ = ["trusted_types"]

# Everything a fitted featx estimator's state holds beyond plain values (numbers, strings, lists,
# dicts, numpy arrays): featx's own classes, whose loading runs only featx's code. Weights are
# never in the file for PretrainedFeatureExtractor (rebuilt from `model` + `weights`, digest
# checked); FineTunedClassifier's trained weights are numpy arrays.
_TRUSTED = (
    "featx._extractor.PretrainedFeatureExtractor",
    "featx._finetune.FineTunedClassifier",
    "featx._models.layers.Target",
    "featx._runtime.runner.RunStats",
)


def trusted_types() -> list[str]:
    """The featx types to trust when loading a ``skops.io`` file of featx estimators.

    ``skops.io`` loads a file only if every type in it is trusted; pass this
    list to ``skops.io.load`` (scikit-learn's and NumPy's own types are
    trusted by skops already). A file holding any other type is refused
    before anything in it is built. An extractor whose ``model`` is your own
    ``torch.nn.Module`` cannot be stored this way (a module is code): pickle
    it, or use a model name.

    Returns
    -------
    list of str
        Fully qualified type names, as ``skops.io.get_untrusted_types`` reports them.

    Examples
    --------
    >>> import featx
    >>> "featx._extractor.PretrainedFeatureExtractor" in featx.trusted_types()
    True

    Saving and loading a fitted pipeline (``pip install skops``)::

        import skops.io
        skops.io.dump(pipeline, "model.skops")
        pipeline = skops.io.load("model.skops", trusted=featx.trusted_types())
    """
    return list(_TRUSTED)
