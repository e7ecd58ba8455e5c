"""The docs' Performance page: every figure is a reference into benchmarks/results/*.json, and every reference resolves."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PERFORMANCE = ROOT / "docs" / "performance.md"
#: Pages whose every figure is a ``{bench}`` reference into the results (none typed).
FROM_RESULTS = [PERFORMANCE, ROOT / "docs" / "user_guide" / "evaluation.md"]


def _benchdata():
    spec = importlib.util.spec_from_file_location("benchdata", ROOT / "docs" / "_ext" / "benchdata.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


benchdata = _benchdata()
sys.path.insert(0, str(ROOT / "docs" / "_ext"))
import readme  # noqa: E402 - docs/_ext/readme.py: the README's generated block


def test_lookup_and_render(tmp_path):
    (tmp_path / "r.json").write_text(json.dumps({"models": {"m": {"a/b": 1.23456, "sizes": [96, 1024]}}}))
    path, value = benchdata.lookup(tmp_path, "r.json::models::m::a/b")
    assert path == tmp_path / "r.json" and value == 1.23456
    assert benchdata.render(value, ".2f") == "1.23" and benchdata.render(value, None) == "1.23456"
    assert benchdata.lookup(tmp_path, "r.json::models::m::sizes::1")[1] == 1024
    with pytest.raises(KeyError, match=r"no key 'models::x' \(there: \['m'\]\)"):
        benchdata.lookup(tmp_path, "r.json::models::x::a/b")
    with pytest.raises(KeyError, match="a list of 2"):
        benchdata.lookup(tmp_path, "r.json::models::m::sizes::7")
    with pytest.raises(KeyError, match="no results file"):
        benchdata.lookup(tmp_path, "missing.json::a")
    with pytest.raises(KeyError, match="cannot format"):
        benchdata.render("bf16", ".2f")


def test_references_take_the_pages_prefix():
    text = ("{bench}`a.json::x@d` and\n:::{bench-prefix} b.json::models\n:::\n"
            "| {bench}`m::k@.1f` | {bench}`c.json::y` |\n")
    assert benchdata.references(text) == ["a.json::x@d", "b.json::models::m::k@.1f", "c.json::y"]


@pytest.mark.parametrize("page", FROM_RESULTS, ids=lambda p: p.name)
def test_every_figure_resolves_in_the_results(page):
    text = page.read_text()
    refs = benchdata.references(text)
    assert len(refs) > (100 if page == PERFORMANCE else 20)
    for ref in refs:
        key, _, fmt = ref.partition("@")
        _, value = benchdata.lookup(RESULTS, key)
        benchdata.render(value, fmt or None)


#: Every page a user reads as prose: none types a measured figure (the README's generated block aside).
PROSE = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "docs" / "user_guide").glob("*.md"))]
#: Version numbers are not measurements: ``Python >= 3.10``, ``torch 2.2``, ``featx 0.2``, ``Ray 2.4``, headings.
VERSIONS = re.compile(r"(?i)\b(python|torch|pytorch|featx|ray|cuda|torchvision|timm)\s*(>=|<=|==|<|>)?\s*\d+(\.\d+)+"
                      r"|^#+ .*$|\b\d+\.\d+\.\d+\w*", re.M)


def _typed_figures(text: str) -> list[str]:
    prose = benchdata.ROLE.sub("", text)
    prose = re.sub(re.escape(readme.BEGIN) + ".*?" + re.escape(readme.END), "", prose, flags=re.S)
    prose = re.sub(r"```.*?```", "", prose, flags=re.S)  # code blocks
    prose = re.sub(r"`[^`]*`", "", prose)  # code: script names, options and constants
    prose = VERSIONS.sub("", prose)
    return re.findall(r"(?<![\w.])\d+\.\d+(?![\w.])|\b\d+(?:\.\d+)?x\b(?!\d)", prose)


@pytest.mark.parametrize("page", PROSE, ids=lambda p: p.name)
def test_the_page_types_no_figure_itself(page):
    """Outside the roles and the generated block, no measured number: decimals and ratios come only from the
    JSON (it once found the same bf16 speed-up given three ways on three pages)."""
    typed = _typed_figures(page.read_text())
    assert not typed, f"figures typed into {page.name} instead of read from JSON: {typed}"


def test_the_typed_figure_check_catches_figures():
    assert _typed_figures("runs 1.74-1.79x faster, cosine 0.995") == ["1.74", "1.79x", "0.995"]
    assert _typed_figures("Python >= 3.10, torch 2.2, featx 0.2, version 0.3.0.dev0, `0.5`") == []


def test_the_readmes_figures_are_generated_from_the_results_and_current():
    text = (ROOT / "README.md").read_text()
    assert readme.current(text) == readme.block(), "README's figures are stale: run python docs/_ext/readme.py"
    assert "{bench}" not in readme.block() and len(benchdata.references(readme.TEMPLATE.read_text())) >= 8


def test_the_package_version_is_the_changelogs_newest_entry():
    import re

    from featx import __version__

    changelog = (Path(__file__).resolve().parents[1] / "docs" / "changelog.md").read_text()
    newest = re.search(r"^## (\d+\.\d+)", changelog, re.M).group(1)
    assert ".".join(__version__.split(".")[:2]) == newest, (
        f"featx.__version__ is {__version__!r} but the changelog's newest entry is {newest}: the cache's "
        "provenance records and the docs' header would name the wrong release")


def test_the_repository_tracks_no_build_artifacts_and_no_orphan_results():
    import shutil
    import subprocess

    root = Path(__file__).resolve().parents[1]
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("not a git checkout")
    tracked = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True).stdout.split()
    assert [f for f in tracked if f.endswith((".whl", ".egg", ".pyc"))] == []
    readers = "".join(p.read_text() for p in [*root.glob("docs/**/*.md"), *root.glob("docs/**/*.rst"),
                                              *root.glob("benchmarks/*.py"), root / "README.md"])
    orphans = [f for f in tracked if f.startswith("benchmarks/results/")
               and Path(f).stem not in readers and Path(f).name not in readers]
    assert orphans == [], f"results that no page or benchmark reads: {orphans}"


def _benchcharts():
    spec = importlib.util.spec_from_file_location("benchcharts", ROOT / "docs" / "_ext" / "benchcharts.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_performance_page_opens_with_charts_drawn_from_the_results(tmp_path):
    pytest.importorskip("matplotlib")
    charts = _benchcharts()
    text = PERFORMANCE.read_text()
    first_table = text.index("\n|")
    shown = re.findall(r"\(_charts/(\w+)\.png\)", text[:first_table])
    assert len(shown) >= 3 and set(shown) <= set(charts.CHARTS)
    written = charts.draw_all(tmp_path)
    assert [p.name for p in written] == [f"{n}.png" for n in charts.CHARTS]
    for p in written:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000


def test_api_names_in_the_guide_become_links():
    """Inline code naming a documented object links to its API page (the guide had 2 links for about 24 names)."""
    import apilinks  # docs/_ext/apilinks.py

    import featx

    names = apilinks.documented()
    for short in ("PretrainedFeatureExtractor", "list_layers", "ParameterError", "trusted_types"):
        assert apilinks.target(short, names) == f"featx.{short}" and short in featx.__all__
    assert apilinks.target("featx.list_layers()", names) == "featx.list_layers"
    assert apilinks.target("ray_transform", names) == "featx.distributed.ray_transform"
    assert apilinks.target("featx.evaluate.evaluate_folder", names) == "featx.evaluate.evaluate_folder"
    assert apilinks.target("transform", names) is None and apilinks.target("pooling='avg'", names) is None
    public = set(featx.__all__)
    assert {n for n, full in names.items() if full.startswith("featx.") and full.count(".") == 1
            and "." not in n} <= public  # the API page lists only what featx exports


def test_the_gallery_is_grouped_with_quickstart_first():
    import gallery_order  # docs/_ext/gallery_order.py

    examples = ROOT / "examples"
    groups = [p.name for p in sorted(examples.iterdir()) if (p / "README.txt").is_file()]
    conf = (ROOT / "docs" / "conf.py").read_text()
    order = re.search(r'"subsection_order": \[([^\]]*)\]', conf).group(1)
    assert [g.split("/")[-1].strip('" ') for g in order.split(",")] == ["basics", "pipelines", "beyond"]
    assert sorted(groups) == sorted(["basics", "pipelines", "beyond"])
    key = gallery_order.ExampleOrder(str(examples / "basics"))
    scripts = sorted((p.name for p in (examples / "basics").glob("[a-z]*.py")), key=key)
    assert scripts[0] == "quickstart.py"
    every = {p.name for g in groups for p in (examples / g).glob("[a-z]*.py")}
    assert every == set(gallery_order.FIRST)  # each example placed by name
    for g in groups:  # each example draws its own figure: its own thumbnail, not the default picture
        for script in (examples / g).glob("[a-z]*.py"):
            assert "plt.show()" in script.read_text() or "savefig" in script.read_text(), script.name

