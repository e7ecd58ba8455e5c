"""Inline code that names a documented featx object links to its API page.

The user guide is Markdown that reads well on GitHub, so it writes API names
as plain inline code (`` `PretrainedFeatureExtractor` ``, `` `featx.evaluate_folder` ``,
`` `list_layers()` ``) rather than Sphinx roles; this transform turns each
such literal into a cross-reference on the built site. Only the names the API
page documents (its autosummary entries) are linked, so every link resolves.
"""

from __future__ import annotations

import re
from pathlib import Path

from docutils import nodes
from sphinx.addnodes import pending_xref
from sphinx.transforms import SphinxTransform

API = Path(__file__).resolve().parents[1] / "api.rst"


def documented(text: str | None = None) -> dict[str, str]:
    """``{short name: full name}`` of every object listed by the API page's autosummary blocks."""
    text = API.read_text() if text is None else text
    out: dict[str, str] = {}
    module = "featx"
    for line in text.splitlines():
        m = re.match(r"\.\. module:: (\S+)", line)
        if m:
            module = m.group(1)
        elif re.fullmatch(r"   [A-Za-z_][\w]*", line):
            name = line.strip()
            out[name] = f"{module}.{name}"
            out[f"{module}.{name}"] = f"{module}.{name}"
            if module == "featx":
                out[f"featx.{name}"] = f"featx.{name}"
    return out


def target(literal: str, names: dict[str, str]) -> str | None:
    """The full name an inline literal refers to (``list_layers()`` -> ``featx.list_layers``), or None."""
    text = literal.strip()
    if text.endswith("()"):
        text = text[:-2]
    return names.get(text)


class LinkApiNames(SphinxTransform):
    default_priority = 100  # before references are resolved

    def apply(self) -> None:
        if self.env.docname.startswith(("generated/", "api")):
            return  # the API pages link their own names
        names = documented()
        for node in list(self.document.findall(nodes.literal)):
            if isinstance(node.parent, (nodes.reference, pending_xref)) or "code" in node.get("classes", []):
                continue
            full = target(node.astext(), names)
            if full is None:
                continue
            xref = pending_xref("", refdomain="py", reftype="obj", reftarget=full, refexplicit=True,
                                refwarn=True)
            xref += nodes.literal(node.astext(), node.astext(), classes=["xref", "py", "py-obj"])
            node.replace_self(xref)


def setup(app):
    app.add_transform(LinkApiNames)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
