"""The snippets and sample outputs of the README and the docs pages are run, so they cannot go stale.

The README and the Markdown pages under ``docs/`` (in the order of the docs'
table of contents) are read as one session, top to bottom, in one empty
folder with the network blocked and a fresh cache (``FEATX_CACHE_DIR``):

- a console block (lines ``$ featx ...``, each followed by its output) runs
  each command and matches the output: ``...`` stands for any text (a whole
  line of ``...`` for any lines), a decimal number for any decimal number
  (timings, sizes and accuracies vary by machine; counts, names, layers and
  the demo's best classifier must match exactly);
- ``python`` blocks run in order in one namespace (``>>>`` blocks as
  doctests); one whose comment says it needs a download must fail offline
  with :class:`featx.ModelLoadError`, which shows both that it needs one and
  that the error is clean;
- a block after ``<!-- not run: REASON -->`` (a cluster, a bucket) is
  compiled, and every name it imports from featx must exist.

The demo's console block (``featx demo --data photos``, in the command-line
page) runs first, so every snippet runs on the demo's images in ``photos/``.
"""

from __future__ import annotations

import ast
import contextlib
import doctest
import importlib
import io
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
_GUIDE = ("inputs", "backbones", "estimator", "cache", "precision", "tta_finetune", "scaling", "evaluation", "cli")
PAGES = [README, ROOT / "docs" / "getting_started.md", *(ROOT / "docs" / "user_guide" / f"{n}.md" for n in _GUIDE),
         ROOT / "docs" / "development.md", ROOT / "docs" / "index.md"]
_FENCE = re.compile(r"(?:<!-- not run: (?P<reason>[^>]*?) -->\s*\n)?^```(?P<lang>\w*)\n(?P<body>.*?)^```", re.M | re.S)
_NUMBER = re.compile(r"\d+\.\d+")


def blocks(text: str | None = None) -> list[tuple[str, str, str | None]]:
    """(lang, body, not-run reason) of each fenced block, in order (default: of every page, in order)."""
    text = "\n".join(p.read_text() for p in PAGES) if text is None else text
    return [(m["lang"], m["body"], m["reason"]) for m in _FENCE.finditer(text)]


def output_pattern(expected: str) -> re.Pattern:
    """A regex for ``expected``: ``...`` is any text, decimals any decimal, runs of spaces any spaces."""
    parts = []
    for line in expected.strip("\n").splitlines():
        if line.strip() == "...":
            parts.append(r"(?:[^\n]*\n)*?")
            continue
        out = []
        for piece in re.split(r"(\.\.\.|\d+\.\d+| +)", line):
            if piece == "...":
                out.append(".*?")
            elif piece and _NUMBER.fullmatch(piece):
                out.append(r"\d+\.\d+")
            elif piece and piece.isspace():
                out.append(" +")
            else:
                out.append(re.escape(piece))
        parts.append("".join(out) + r" *\n")
    return re.compile("".join(parts))


def console_sessions(body: str) -> list[tuple[list[str], str]]:
    """[(argv after 'featx', expected output)] of a console block."""
    sessions: list[tuple[list[str], str]] = []
    for line in body.splitlines():
        if line.startswith("$ "):
            argv = shlex.split(line[2:])
            assert argv[0] == "featx", f"README console line runs {argv[0]!r}, not featx: {line}"
            sessions.append((argv[1:], ""))
        elif sessions:
            sessions[-1] = (sessions[-1][0], sessions[-1][1] + line + "\n")
    return sessions


# ---------------------------------------------------------------- the checker itself


def test_output_pattern_matches_what_it_should_and_nothing_else():
    pat = output_pattern("160 images, 1280 features, 3.7 s -> out.npz\n...\nbest: logreg on stage5: 0.969\n")
    ok = "160 images, 1280 features, 12.25 s -> out.npz\nanything\nat all\nbest: logreg on stage5: 0.950\n"
    assert pat.fullmatch(ok)
    assert pat.fullmatch(ok.replace("anything\nat all\n", ""))
    for wrong in (ok.replace("160", "128"), ok.replace("stage5", "stage4"), ok.replace("out.npz", "out.npy"),
                  ok.replace("12.25", "12")):
        assert not pat.fullmatch(wrong), wrong


def test_blocks_and_sessions_are_parsed():
    text = "a\n<!-- not run: a cluster -->\n```python\nimport ray\n```\n```\n$ featx layers x\nout 1\nout 2\n```\n"
    (lang1, body1, why1), (lang2, body2, why2) = blocks(text)
    assert (lang1, body1, why1) == ("python", "import ray\n", "a cluster")
    assert why2 is None and console_sessions(body2) == [(["layers", "x"], "out 1\nout 2\n")]


# ---------------------------------------------------------------- the README


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    root = tmp_path_factory.mktemp("readme")
    mp = pytest.MonkeyPatch()
    mp.chdir(root)
    mp.setenv("FEATX_CACHE_DIR", str(root / "cache"))
    yield root
    mp.undo()


def _run_featx(argv: list[str]) -> str:
    from featx.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(argv)
    assert rc == 0, f"featx {' '.join(argv)} exited {rc}:\n{out.getvalue()}"
    return out.getvalue()


def _imports_exist(tree: ast.AST) -> None:
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "featx":
            mod = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(mod, alias.name), f"README imports {alias.name} from {node.module}, which has none"


def test_readme_runs_as_written(session):
    import featx

    found = blocks()
    consoles = [b for lang, b, why in found if lang == "" and b.startswith("$ featx")]
    demo = [b for b in consoles if b.startswith("$ featx demo --data photos")]
    assert len(demo) == 1, "one console block must be the demo writing photos/ (the snippets use it)"
    consoles = demo + [b for b in consoles if b is not demo[0]]
    namespace: dict = {"__name__": "readme"}
    ran = {"console": 0, "python": 0, "doctest": 0, "download": 0, "not run": 0}
    # the console blocks first: the demo makes photos/, the python snippets use it
    for body in consoles:
        for argv, expected in console_sessions(body):
            actual = _run_featx(argv)
            assert output_pattern(expected).fullmatch(actual), (
                f"README sample output of 'featx {' '.join(argv)}' is stale.\nREADME:\n{expected}\nactual:\n{actual}")
            ran["console"] += 1
    for lang, body, why in found:
        if lang != "python":
            continue
        if why is not None:
            _imports_exist(ast.parse(body))  # parsing is the syntax check
            ran["not run"] += 1
        elif body.lstrip().startswith(">>>"):
            test = doctest.DocTestParser().get_doctest(body, namespace, "README", "README.md", 0)
            runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
            out = io.StringIO()
            runner.run(test, out=out.write)
            assert runner.failures == 0, out.getvalue()
            ran["doctest"] += 1
        elif re.search(r"#.*\bdownload", body):
            with pytest.raises(featx.ModelLoadError):
                exec(compile(body, "README", "exec"), namespace)
            ran["download"] += 1
        else:
            exec(compile(body, "README", "exec"), namespace)
            ran["python"] += 1
    assert all(ran.values()), ran  # every kind of block was met (a parser that finds nothing passes nothing)


def test_pages_are_the_docs_pages():
    """Every Markdown page of the docs that has code is in PAGES (a new page is run too), and none is missing."""
    docs = {p for p in (ROOT / "docs").rglob("*.md") if "_build" not in p.parts and "```" in p.read_text()}
    runnable = {p for p in docs if any(lang in ("python", "") for lang, _, _ in blocks(p.read_text()))}
    assert runnable <= set(PAGES), sorted(map(str, runnable - set(PAGES)))
    assert all(p.is_file() for p in PAGES)


def test_readme_use_snippet_leads_with_the_demo_winner():
    """The README's snippet is the classifier and layer that the demo's sample output marks best, with the cache on."""
    best = re.search(r"best: (\w+) on (\w+):", "\n".join(p.read_text() for p in PAGES))
    assert best, "no page has a demo sample with a 'best:' line"
    first = next(b for lang, b, why in blocks(README.read_text()) if lang == "python" and why is None)
    names = {"logreg": "LogisticRegression", "rbf_svm": "SVC(", "linear_svm": "LinearSVC", "random_forest": "RandomForest"}
    assert names[best[1]] in first and f'"{best[2]}"' in first and "cache=True" in first, first


def paragraphs(text: str) -> list[str]:
    """The prose paragraphs of a Markdown text (code blocks, tables, headings left out), whitespace-normalised."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    out = []
    for para in re.split(r"\n\s*\n", text):
        para = " ".join(para.split())
        if para and not para.startswith(("#", "|", "<!--", "![")):
            out.append(para)
    return out


def test_paragraphs_are_said_once():
    """No prose paragraph appears twice in the README and the docs pages together."""
    assert paragraphs("a b\nc\n\n```\nx\n```\n\n| t |\n\n# h\n\nd") == ["a b c", "d"]
    seen: dict[str, Path] = {}
    for page in PAGES + [ROOT / "docs" / "performance.md", ROOT / "docs" / "installation.md",
                         ROOT / "docs" / "faq.md"]:
        for para in paragraphs(page.read_text()):
            if len(para) < 60:  # "and", "then open ..." and other short links between blocks
                continue
            assert para not in seen, f"said twice, in {seen[para].name} and {page.name}: {para[:100]}"
            seen[para] = page
