"""
What does pretraining buy?
==========================

Pretrained features against the same network with random weights and against
raw pixels, each followed by the same scaler and logistic regression.
"""

import matplotlib.pyplot as plt
import numpy as np
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler

from _common import demo_data, shared_cache
from featx import PretrainedFeatureExtractor


def raw_pixels(paths):
    return np.stack([np.asarray(Image.open(p).convert("RGB").resize((32, 32)), dtype=np.float32).ravel() / 255 for p in paths])


paths, y, class_names = demo_data()
cache = shared_cache()
candidates = {
    "pretrained": PretrainedFeatureExtractor(cache=cache),
    "random-init": PretrainedFeatureExtractor(weights=None, cache=cache),
    "raw pixels": FunctionTransformer(raw_pixels),
}
results = {}
for name, features in candidates.items():
    pipe = make_pipeline(features, StandardScaler(), LogisticRegression(max_iter=3000))
    results[name] = cross_val_score(pipe, paths, y, cv=4)
    print(f"{name:<12} accuracy {results[name].mean():.3f} ± {results[name].std():.3f}")

# %%
# The random-init network is the same architecture and the same pipeline:
# the gap to it is what ImageNet pretraining contributes.
fig, ax = plt.subplots(figsize=(5, 3))
ax.bar(list(results), [s.mean() for s in results.values()], yerr=[s.std() for s in results.values()], capsize=4)
ax.axhline(1 / len(class_names), color="grey", linestyle="--", label="chance")
ax.set_ylabel("4-fold CV accuracy")
ax.set_ylim(0, 1.02)
ax.legend()
fig.tight_layout()
plt.show()
