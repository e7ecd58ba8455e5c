"""Charts for the Performance page, drawn at build time from ``benchmarks/results/*.json`` (nothing typed).

When the builder starts, each chart of :data:`CHARTS` is drawn with
matplotlib (a docs dependency) into ``docs/_charts/`` (not tracked: always
the figures of the JSON the build reads), which the page references as
``_charts/<name>.png``. Every chart has labelled axes with units and states
its machine in the caption below it on the page.
"""

from __future__ import annotations

import json
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1]
RESULTS = DOCS.parent / "benchmarks" / "results"
OUT = DOCS / "_charts"


def _load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def _bars(ax, groups: list[str], series: dict[str, list[float]], ylabel: str, fmt: str = "{:.0f}") -> None:
    """Grouped bars: one group per entry of ``groups``, one bar per series, each labelled with its value."""
    import numpy as np

    width = 0.8 / len(series)
    xs = np.arange(len(groups))
    for k, (label, values) in enumerate(series.items()):
        bars = ax.bar(xs + (k - (len(series) - 1) / 2) * width, values, width, label=label)
        ax.bar_label(bars, [fmt.format(v) for v in values], fontsize=7, padding=2)
    ax.set_xticks(xs, groups)
    ax.set_ylabel(ylabel)
    ax.set_ylim(top=ax.get_ylim()[1] * 1.15)  # room for the value labels and the legend
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)


def throughput(plt) -> object:
    """Images/s from JPEG files: bare fp32 forward pass, featx's default, int8; per model and machine kind."""
    machines = [("Xeon, AVX-512 + AMX", _load("bench_throughput_int8.json")),
                ("EPYC, AVX512_BF16, no AMX", _load("bench_throughput_int8_amd.json"))]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, model in zip(axes, ("efficientnet_lite0", "resnet50")):
        rows = [m["models"][model] for _, m in machines]
        _bars(ax, [name for name, _ in machines], {
            "bare fp32 forward (b)": [r["b_bare_fp32"] for r in rows],
            "featx default, first call": [r["a_first_96"] for r in rows],
            "featx int8, steady": [r["a8"] for r in rows],
        }, "images / s (500x375 JPEG files)")
        ax.set_title(model)
    axes[0].legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return fig


def accuracy(plt) -> object:
    """5-fold CV accuracy per layer (logistic regression) on fp32, bf16 and int8 features of efficientnet_lite0."""
    bf16 = _load("bench_precision.json")["models"]["efficientnet_lite0"]
    int8 = _load("bench_precision_int8.json")["models"]["efficientnet_lite0"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, data_set in zip(axes, ("demo", "other photos")):
        layers = list(bf16[data_set])
        for label, values, style in (
                ("fp32", [bf16[data_set][lyr]["fp32"]["logreg"] for lyr in layers], "o-"),
                ("bf16", [bf16[data_set][lyr]["bf16"]["logreg"] for lyr in layers], "s--"),
                ("int8", [int8[data_set][lyr]["int8"]["logreg"] for lyr in layers], "^:")):
            ax.plot(layers, values, style, label=label)
        ax.set_title(f"{data_set} set")
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("5-fold CV accuracy (logistic regression)")
    axes[0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def cache(plt) -> object:
    """A grid search over cached features against joblib.Memory and no cache: wall seconds, log scale."""
    data = _load("bench_cache.json")
    rows = data["grid_search"]
    fig, ax = plt.subplots(figsize=(7, 3.4))
    names = [r["config"] for r in rows]
    bars = ax.barh(names, [r["wall_s"] for r in rows], color=["tab:green", "tab:orange", "tab:red"][:len(rows)])
    ax.bar_label(bars, [f"{r['wall_s']:.0f} s, {r['images_through_backbone']} backbone passes" for r in rows],
                 fontsize=8, padding=3)
    ax.set_xscale("log")
    ax.set_xlabel(f"wall seconds of one GridSearchCV ({data['n_images']} images, log scale)")
    ax.invert_yaxis()
    ax.set_xlim(right=max(r["wall_s"] for r in rows) * 40)  # room for the labels
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def ray(plt) -> object:
    """Ray against a local transform: median wall seconds per configuration and data size."""
    data = _load("bench_distributed.json")
    med = data["median_seconds"]
    configs = sorted({k.rsplit(", n=", 1)[0] for k in med if ", n=" in k and "fresh" not in k})
    sizes = data["sizes"]
    fig, ax = plt.subplots(figsize=(7, 3.4))
    _bars(ax, [f"{n} images" for n in sizes],
          {c: [med.get(f"{c}, n={n}", float("nan")) for n in sizes] for c in configs}, "median wall seconds")
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(f"{data['model']}, {data['cores']} cores")
    fig.tight_layout()
    return fig


#: name -> drawing function (the page shows ``_charts/<name>.png``).
CHARTS = {"throughput": throughput, "accuracy": accuracy, "cache": cache, "ray": ray}


def draw_all(out: Path = OUT) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(exist_ok=True)
    written = []
    for name, fn in CHARTS.items():
        fig = fn(plt)
        path = out / f"{name}.png"
        tmp = path.with_name(f".{path.name}.partial.png")
        fig.savefig(tmp, dpi=110)  # whole or not at all
        tmp.replace(path)
        plt.close(fig)
        written.append(path)
    return written


def _on_builder_inited(app) -> None:
    draw_all()


def setup(app):
    app.connect("builder-inited", _on_builder_inited)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
