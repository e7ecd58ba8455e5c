"""What goes wrong: per-class precision and recall, the most confused pairs, and the misclassified images.

All from one set of cross-validated predictions (``cross_val_predict``) of
the chosen setup, so every image is predicted by a model that did not see it.
:func:`contact_sheet` draws the misclassified images as captioned thumbnails,
grouped by (true, predicted) pair, so that mislabelled or ambiguous images
show at a glance.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["TOP_PAIRS", "SHEET_MAX", "error_analysis", "format_errors", "contact_sheet"]

#: Confused pairs kept (the most frequent first).
TOP_PAIRS = 5
#: Thumbnails on the contact sheet at most (the most confused pairs first).
SHEET_MAX = 60
_THUMB, _CAPTION, _COLUMNS = 112, 30, 8


def error_analysis(y: np.ndarray, pred: np.ndarray, class_names: list[str], paths: list[str]) -> dict:
    """The report of cross-validated predictions ``pred`` of labels ``y``.

    Returns
    -------
    dict
        ``report``: scikit-learn's ``classification_report`` as a dict
        (per class ``precision``, ``recall``, ``f1-score``, ``support``, and
        the averages); ``confused_pairs``: up to :data:`TOP_PAIRS` of
        ``{"true", "predicted", "count", "share"}`` (``share``: of the true
        class's images), most frequent first; ``misclassified``: every wrong
        prediction as ``{"path", "true", "predicted"}``, grouped by pair in
        the same order; ``confusion``: the confusion matrix (lists of counts,
        true classes by row).
    """
    from sklearn.metrics import classification_report, confusion_matrix

    k = len(class_names)
    report = classification_report(y, pred, labels=list(range(k)), target_names=class_names, output_dict=True,
                                   zero_division=0)
    cm = confusion_matrix(y, pred, labels=list(range(k)))
    pairs = sorted(((int(cm[i, j]), i, j) for i in range(k) for j in range(k) if i != j and cm[i, j]),
                   key=lambda t: (-t[0], t[1], t[2]))
    rank = {(i, j): r for r, (_, i, j) in enumerate(pairs)}
    wrong = sorted((int(n) for n in np.flatnonzero(pred != y)), key=lambda n: (rank[(y[n], pred[n])], n))
    return {
        "report": report,
        "confusion": cm.tolist(),
        "confused_pairs": [{"true": class_names[i], "predicted": class_names[j], "count": c,
                            "share": c / max(1, int(cm[i].sum()))} for c, i, j in pairs[:TOP_PAIRS]],
        "misclassified": [{"path": str(paths[n]), "true": class_names[y[n]], "predicted": class_names[pred[n]]}
                          for n in wrong],
    }


def format_errors(errors: dict, class_names: list[str]) -> str:
    """Per-class precision/recall/F1 lines and the confused pairs, as text."""
    rep = errors["report"]
    width = max(12, *(len(c) for c in class_names))
    lines = [f"{'class':<{width}} {'precision':>9} {'recall':>7} {'f1':>6} {'images':>7}"]
    for c in class_names:
        r = rep[c]
        lines.append(f"{c:<{width}} {r['precision']:>9.3f} {r['recall']:>7.3f} {r['f1-score']:>6.3f} "
                     f"{int(r['support']):>7d}")
    pairs = errors["confused_pairs"]
    if pairs:
        lines.append("most confused (true -> predicted): " + ", ".join(
            f"{p['true']} -> {p['predicted']} {p['count']} ({p['share']:.0%})" for p in pairs))
    else:
        lines.append("no image was misclassified")
    return "\n".join(lines)


def contact_sheet(misclassified: list[dict], path: str | Path, total: int) -> Path | None:
    """Thumbnails of the misclassified images captioned ``true -> predicted``, written to ``path`` (PNG).

    Draws the first :data:`SHEET_MAX` (the most confused pairs first); an
    image that cannot be read any more is drawn as a grey tile with its
    caption. Returns None when nothing was misclassified.
    """
    from PIL import Image, ImageDraw, ImageFont, ImageOps

    from .._outputs import written

    items = misclassified[:SHEET_MAX]
    if not items:
        return None
    font = ImageFont.load_default()
    cols = min(_COLUMNS, len(items))
    rows = -(-len(items) // cols)
    header = 26
    sheet = Image.new("RGB", (cols * _THUMB, header + rows * (_THUMB + _CAPTION)), "white")
    draw = ImageDraw.Draw(sheet)
    shown = f"{len(items)} of {len(misclassified)}" if len(items) < len(misclassified) else f"{len(items)}"
    draw.text((6, 6), f"misclassified under cross-validation: {shown} of {total} images (true -> predicted)",
              fill="black", font=font)
    for n, item in enumerate(items):
        x, y0 = (n % cols) * _THUMB, header + (n // cols) * (_THUMB + _CAPTION)
        sheet.paste(_thumbnail(item["path"], Image, ImageOps), (x + 2, y0 + 2))
        draw.text((x + 4, y0 + _THUMB), _clip(item["true"]), fill="darkgreen", font=font)
        draw.text((x + 4, y0 + _THUMB + 13), "-> " + _clip(item["predicted"], 15), fill="firebrick", font=font)
    path = Path(path)
    with written(path) as tmp:
        sheet.save(tmp, format="PNG")
    return path


def _thumbnail(path: str, Image: Any, ImageOps: Any):
    size = (_THUMB - 4, _THUMB - 4)
    try:
        with Image.open(path) as img:
            return ImageOps.pad(ImageOps.exif_transpose(img).convert("RGB"), size, color="white")
    except Exception:  # noqa: BLE001 - moved or unreadable since: a grey tile, the caption still says which
        return Image.new("RGB", size, "lightgrey")


def _clip(text: str, n: int = 18) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"
