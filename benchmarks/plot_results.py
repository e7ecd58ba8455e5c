"""Charts for the docs' Performance page, drawn from ``benchmarks/results/*.json`` only.

    python benchmarks/plot_results.py

Writes ``docs/perf_throughput_int8.png``: images/s from JPEG files, per
model, of the bare eager fp32 forward pass, featx's default and
``precision="int8"`` (``bench_throughput_int8.json``), with the machine line
as the caption. Re-run it after the benchmark it reads.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
DOCS = HERE.parent / "docs"


def throughput_int8(out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads((HERE / "results" / "bench_throughput_int8.json").read_text())
    # each bar: its median rate, labelled with the ratio the table quotes (median of the per-round ratios)
    bars = [("bare fp32 eager forward", "b_bare_fp32", None), ("featx default (first call of 96)", "a_first_96",
            "a/b_first_96"), ("featx precision='int8' (steady)", "a8", "a8/b")]
    models = list(data["models"])
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.4))
    for ax, model in zip(axes, models):
        row = data["models"][model]
        values = [row[k] for _, k, _ in bars]
        ax.barh(range(len(bars)), values, color=["#999999", "#4c72b0", "#dd8452"])
        ax.set_yticks(range(len(bars)), [label for label, _, _ in bars], fontsize=8)
        ax.invert_yaxis()
        for i, (v, (_, _, ratio)) in enumerate(zip(values, bars)):
            ax.text(v, i, f" {v:.0f}" + (f" ({row[ratio]:.2f}x)" if ratio else ""), va="center", fontsize=8)
        ax.set_xlim(0, max(values) * 1.45)
        ax.set_title(model, fontsize=10)
        ax.set_xlabel("images/s, 500x375 JPEGs (ratio to bare)", fontsize=8)
    fig.suptitle(data["machine"]["line"].split("; C allocator")[0], fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


if __name__ == "__main__":
    print("wrote", throughput_int8(DOCS / "perf_throughput_int8.png"))
