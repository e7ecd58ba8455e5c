"""The "?" link of an estimator's HTML repr (scikit-learn's ``_doc_link_module`` / ``_doc_link_template``)."""

from __future__ import annotations

import os

__all__ = ["DOCS_URL", "DocLinkMixin"]

#: Where featx's documentation site is published, by release series; ``FEATX_DOCS_URL`` overrides it (a mirror,
#: or ``file:///.../docs/_build/html/`` for a local build).
DOCS_URL = "https://featx.readthedocs.io/en/{version}/"


class DocLinkMixin:
    """Link the HTML repr of a featx estimator to its API page, as scikit-learn's own estimators are linked.

    scikit-learn shows the link only for classes of ``_doc_link_module``, and
    fills ``{estimator_module}`` with the public module (``featx``) and
    ``{estimator_name}`` with the class name: the API reference's autosummary
    pages are ``generated/featx.<Name>.html``.
    """

    _doc_link_module = "featx"

    @property
    def _doc_link_template(self) -> str:
        from ._version import __version__

        base = os.environ.get("FEATX_DOCS_URL") or DOCS_URL.format(version=".".join(__version__.split(".")[:2]))
        return base.rstrip("/") + "/generated/{estimator_module}.{estimator_name}.html"
