"""Benchmark figures in the docs, read from ``benchmarks/results/*.json`` at build time.

Nothing in the Performance page is retyped: every figure is a reference into
the JSON a benchmark script wrote, so re-running a benchmark and rebuilding
updates the page, and a key that no longer exists fails the build.

- ``{bench}`file.json::key::key@fmt``` (MyST) or ``:bench:`...``` (reST) is
  the value at that path (``::`` between keys; an integer key indexes a
  list), formatted with the Python format spec after ``@`` (``.2f``, ``.0%``,
  ``d``); without ``@``, as ``str()``.
- ``{bench-prefix} file.json::models`` (a directive) makes later references
  of the page relative to that path when they do not name a ``.json`` file:
  ``{bench}`efficientnet_lite0::a32@.1f```.
"""

from __future__ import annotations

from pathlib import Path

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective, SphinxRole

from benchdata import absolute, lookup, render

logger = logging.getLogger(__name__)
_PREFIX = "bench_prefix"


def results_dir(app: Sphinx) -> Path:
    return (Path(app.confdir) / app.config.bench_results_dir).resolve()


class BenchRole(SphinxRole):
    def run(self):
        ref, _, fmt = self.text.partition("@")
        ref = absolute(ref, self.env.temp_data.get(_PREFIX))
        if ".json" not in ref.split("::")[0]:
            return self._fail(f"bench reference {self.text!r} names no .json file and no bench-prefix is set")
        try:
            path, value = lookup(results_dir(self.env.app), ref)
            text = render(value, fmt or None)
        except KeyError as exc:
            return self._fail(str(exc.args[0]))
        self.env.note_dependency(str(path))
        return [nodes.Text(text)], []

    def _fail(self, message: str):
        logger.warning("bench: %s", message, location=self.get_location(), type="bench", subtype="missing")
        return [nodes.problematic(self.rawtext, self.rawtext)], []


class BenchPrefix(SphinxDirective):
    required_arguments = 1
    final_argument_whitespace = True

    def run(self):
        prefix = self.arguments[0].strip()
        if ".json" not in prefix.split("::")[0]:
            logger.warning("bench-prefix %r must start with a .json file", prefix, location=self.get_location(),
                           type="bench", subtype="missing")
        self.env.temp_data[_PREFIX] = prefix  # temp_data is per document: a prefix ends with its page
        return []


def unparsed_roles(app: Sphinx, doctree: nodes.document, docname: str) -> None:
    """Warn about a bench role the parser never saw (a ``|`` inside it splits a Markdown table cell)."""
    for node in doctree.findall(nodes.Text):
        if "{bench}`" in node.astext():
            logger.warning("bench: a {bench} reference was not parsed (is there a '|' inside it, in a table?): %r",
                           node.astext()[:120], location=node.parent, type="bench", subtype="unparsed")


def setup(app: Sphinx) -> dict:
    app.add_config_value("bench_results_dir", "../benchmarks/results", "env")
    app.connect("doctree-resolved", unparsed_roles)
    app.add_role("bench", BenchRole())
    app.add_directive("bench-prefix", BenchPrefix)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
