"""Negative transfer, said plainly: do the pretrained features beat the baselines by more than their spread?

:func:`transfer_note` compares the best row of the backbone asked for with
the best row of each baseline evaluated beside it (raw pixels, a random-init
backbone of the same architecture). When the margin is not larger than the
larger of the two rows' spreads (standard deviation over the folds), the
pretrained network is not shown to help on this data, and the note says so
and what to try.
"""

from __future__ import annotations

from typing import Any

__all__ = ["BASELINES", "transfer_note"]

#: Feature sets that are baselines (not a pretrained network).
BASELINES = ("raw pixels", "random-init")


def transfer_note(rows: list[Any], main: str = "pretrained") -> str:
    """A sentence when ``main``'s best row does not beat a baseline's by more than their spread, else ``""``.

    Parameters
    ----------
    rows : list of EvalRow
        The evaluation's rows (``features``, ``classifier``, ``layer``, ``mean``, ``std``).
    main : str
        The feature set of the backbone asked for; no note when it is itself a baseline.
    """
    if main in BASELINES:
        return ""
    ours = [r for r in rows if r.features == main]
    if not ours:
        return ""
    best = max(ours, key=lambda r: r.mean)
    behind = []
    for label in BASELINES:
        theirs = [r for r in rows if r.features == label]
        if not theirs:
            continue
        top = max(theirs, key=lambda r: r.mean)
        if best.mean - top.mean <= max(best.std, top.std):
            behind.append(f"{label} ({top.classifier} on {top.layer}: {top.mean:.3f} ± {top.std:.3f})")
    if not behind:
        return ""
    return (f"The pretrained features ({best.classifier} on {best.layer}: {best.mean:.3f} ± {best.std:.3f}) do not "
            f"beat {' or '.join(behind)} by more than their spread: on these images the pretrained network is not "
            "shown to help (negative transfer is possible). Try another backbone family (a DINOv2 or CLIP model, "
            "say), a shallower or deeper layer, fine-tuning, or more labelled images.")
