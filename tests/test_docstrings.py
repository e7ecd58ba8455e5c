"""Every public class and function has numpydoc sections and an Examples section that runs (as a doctest)."""

from __future__ import annotations

import doctest
import inspect
import re

import pytest

import featx
import featx.distributed

PUBLIC = [(featx, n) for n in featx.__all__ if n != "__version__"] + \
         [(featx.distributed, n) for n in featx.distributed.__all__]


def _section(doc: str, title: str) -> str | None:
    m = re.search(rf"^{title}\n-{{{len(title)}}}\n(.*?)(?=^\w[\w ]*\n-+\n|\Z)", doc, re.M | re.S)
    return m.group(1) if m else None


@pytest.mark.parametrize("module,name", PUBLIC, ids=[n for _, n in PUBLIC])
def test_public_names_have_a_runnable_examples_section(module, name):
    obj = getattr(module, name)
    doc = inspect.getdoc(obj)
    assert doc and doc.splitlines()[0].endswith("."), f"{name}: no one-line summary ending with a period"
    examples = _section(doc, "Examples")
    assert examples is not None, f"{name} has no Examples section"
    parsed = doctest.DocTestParser().get_examples(examples)
    assert parsed, f"{name}'s Examples section has no >>> example"
    if inspect.isclass(obj) and issubclass(obj, BaseException):
        return  # raised by featx, not built by users: their arguments are not an API
    params = [p for p in inspect.signature(obj).parameters if p not in ("self", "args", "kwargs")]
    documented = {n.strip() for line in re.findall(r"^(\w[\w, ]*) :", _section(doc, "Parameters") or "", re.M)
                  for n in line.split(",")}
    missing = [p for p in params if p not in documented]
    assert not missing, f"{name}: parameters not documented: {missing}"


def test_the_checker_sees_a_missing_section():
    doc = "Summary.\n\nParameters\n----------\nx : int\n    An x.\n"
    assert _section(doc, "Examples") is None and "x : int" in _section(doc, "Parameters")
