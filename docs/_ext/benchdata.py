"""Values of ``benchmarks/results/*.json`` by reference (``file.json::key::key@fmt``); no Sphinx needed.

Used by the docs' ``{bench}`` role (:mod:`benchfigures`) and by the tests that
check every reference of the Performance page resolves.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

#: A ``{bench}`ref``` role in MyST Markdown.
ROLE = re.compile(r"\{bench\}`([^`]+)`")
#: A ``{bench-prefix} ref`` directive (colon fence) in MyST Markdown.
PREFIX = re.compile(r"^:::\{bench-prefix\}\s+(\S.*?)\s*$", re.M)


def lookup(root: Path, ref: str):
    """The value at ``file.json::k1::k2`` under ``root``; KeyError saying which key is missing."""
    file, *keys = [part.strip() for part in ref.split("::")]
    path = root / file
    if not path.is_file():
        raise KeyError(f"no results file {path}")
    value = json.loads(path.read_text())
    for depth, key in enumerate(keys):
        try:
            value = value[int(key)] if isinstance(value, list) else value[key]
        except (KeyError, IndexError, ValueError):
            have = list(value) if isinstance(value, dict) else f"a list of {len(value)}"
            raise KeyError(f"{file}: no key {'::'.join(keys[:depth + 1])!r} (there: {have})") from None
    return path, value


def render(value, fmt: str | None) -> str:
    """``value`` formatted with the format spec ``fmt`` (``str()`` without one); KeyError if it does not apply."""
    if fmt is None:
        return str(value)
    try:
        return format(value, fmt)
    except (TypeError, ValueError) as exc:
        raise KeyError(f"cannot format {value!r} with {fmt!r}: {exc}") from None


def absolute(ref: str, prefix: str | None) -> str:
    """``ref`` with ``prefix`` in front when it names no ``.json`` file itself (and a prefix is set)."""
    return f"{prefix}::{ref}" if prefix is not None and ".json" not in ref.split("::")[0] else ref


def references(text: str) -> list[str]:
    """Every role's reference in a MyST page, made absolute with the page's bench-prefix directives."""
    refs, prefix = [], None
    for m in re.finditer(ROLE.pattern + "|" + PREFIX.pattern, text, re.M):
        if m.group(2) is not None:
            prefix = m.group(2)
            continue
        refs.append(absolute(m.group(1), prefix))
    return refs
