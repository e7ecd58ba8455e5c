"""
What the embedding cache saves
==============================

The same images transformed three times with ``cache=`` set: the first call
runs the backbone, later calls (a new extractor, as in every fold of a grid
search or a rerun of the script) read the stored embeddings. A grid over
layers and poolings is served from the same entries: a miss stores every
stage with average and max pooling.
"""

import time

import matplotlib.pyplot as plt

from _common import demo_data, scratch_dir
from featx import PretrainedFeatureExtractor

paths, y, class_names = demo_data()
cache = scratch_dir()
timings = {}
for label, params in [("cold", {}), ("warm", {}), ("warm, other layer", {"layers": "stage4", "pooling": "max"})]:
    ext = PretrainedFeatureExtractor(cache=cache, **params).fit()
    start = time.perf_counter()
    X = ext.transform(paths)
    timings[label] = time.perf_counter() - start
    print(f"{label:<18} {len(paths)} images -> {X.shape[1]:>4} features in {timings[label]:.3f} s")
print(f"warm is {timings['cold'] / timings['warm']:.0f}x faster than cold")

# %%
fig, ax = plt.subplots(figsize=(5, 3))
ax.bar(list(timings), list(timings.values()))
ax.set_yscale("log")
ax.set_ylabel("seconds (log scale)")
ax.set_title(f"transform of {len(paths)} images")
for i, t in enumerate(timings.values()):
    ax.annotate(f"{t:.2g} s", (i, t), ha="center", va="bottom")
fig.tight_layout()
plt.show()
