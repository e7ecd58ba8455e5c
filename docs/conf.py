"""Sphinx configuration: numpydoc API reference, sphinx-gallery examples, MyST pages, PyData theme.

Builds offline: no intersphinx inventory is fetched (links to scikit-learn,
NumPy and PyTorch are plain text), and the gallery runs the examples on the
offline default backbone. ``-W`` makes every warning, broken references
included (``nitpicky``), an error.
"""

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS / "_ext"))
sys.path.insert(0, str(DOCS.parent / "examples"))  # the examples import their helper module _common

import featx  # noqa: E402

project = "featx"
author = "the featx developers"
copyright = "2026, the featx developers"
release = version = featx.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "numpydoc",
    "sphinx_gallery.gen_gallery",
    "myst_parser",
    "benchfigures",
    "benchcharts",
    "apilinks",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "auto_examples/**.ipynb", "auto_examples/**.py", "auto_examples/**.zip",
                    "auto_examples/**.json", "auto_examples/**.md5", "sg_execution_times.rst",
                    "**/sg_execution_times.rst", "_snippets"]
templates_path = ["_templates"]
nitpicky = True  # a reference that resolves nowhere is a warning, so an error under -W
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence"]

# API reference: autosummary pages from the numpydoc docstrings, validated
autosummary_generate = True
autodoc_typehints = "none"  # the numpydoc "Parameters" sections carry the types
autodoc_default_options = {"inherited-members": False}
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
# every documented object: parameters documented and existing, returns described;
# that every public class and function has a runnable Examples section is
# tests/test_docstrings.py's job (methods share their class's example)
numpydoc_validation_checks = {"GL08", "PR01", "PR02", "PR10", "RT03", "SS03", "GL02", "GL03"}
numpydoc_validation_exclude = {r"\.__init__$", r"^featx\.LayerInfo\.(name|alias|shape|layout|prefix)$"}


def _skip_sklearn_generated(app, what, name, obj, skip, options):
    """sklearn's generated metadata-routing setters (set_fit_request, ...) are sklearn's to document."""
    return True if name.startswith("set_") and name.endswith("_request") else skip


def setup(app):
    app.connect("autodoc-skip-member", _skip_sklearn_generated)


# the gallery: every script in examples/ but the helper runs at build time
sphinx_gallery_conf = {
    "examples_dirs": "../examples",
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"/[a-z][^/]*\.py$",
    "ignore_pattern": r"_(common|shared)\.py$",
    # groups in this order, Quickstart first within its group (docs/_ext/gallery_order.py)
    "subsection_order": ["../examples/basics", "../examples/pipelines", "../examples/beyond"],
    "within_subsection_order": "gallery_order.ExampleOrder",
    # "Examples using this class" on the API pages (the class template's minigallery)
    "backreferences_dir": "generated/backreferences",
    "doc_module": ("featx",),
    "abort_on_example_error": True,
    "download_all_examples": False,
    "show_memory": False,
    "remove_config_comments": True,
    "default_thumb_file": str(DOCS / "demo_accuracy_by_layer.png"),
}

html_theme = "pydata_sphinx_theme"
html_title = f"featx {release}"
html_theme_options = {"navigation_with_keys": False, "show_toc_level": 2}
html_static_path = ["_static"]
html_css_files = ["featx.css"]
# top-level pages have no section navigation to show: no empty left sidebar there
html_sidebars = {page: [] for page in ("index", "installation", "getting_started", "performance", "faq", "api",
                                       "changelog", "development")}
