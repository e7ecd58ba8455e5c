"""
A map of the embeddings
=======================

Each image's ``pre_logits`` features (1280 numbers for the offline default),
projected to two dimensions with PCA (linear: what a linear classifier sees)
and t-SNE (neighbourhoods), one colour per class. Classes that form separate
clusters are easy for any classifier on these features.
"""

import matplotlib.pyplot as plt
import numpy as np
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE
from sklearn.preprocessing import StandardScaler

from _common import demo_data, shared_cache
from featx import PretrainedFeatureExtractor

paths, y, class_names = demo_data()
X = PretrainedFeatureExtractor(cache=shared_cache()).fit_transform(paths)
X = StandardScaler().fit_transform(X)
print(f"{X.shape[0]} images x {X.shape[1]} features")
projections = {
    "PCA": PCA(n_components=2, random_state=0).fit_transform(X),
    "t-SNE": TSNE(n_components=2, perplexity=20, init="pca", random_state=0).fit_transform(X),
}

# %%
fig, axes = plt.subplots(1, 2, figsize=(9, 4))
for ax, (name, Z) in zip(axes, projections.items()):
    for k, label in enumerate(class_names):
        ax.scatter(*Z[np.asarray(y) == k].T, s=12, label=label)
    ax.set_title(f"{name} of pre_logits features")
    ax.set_xticks([])
    ax.set_yticks([])
axes[1].legend(loc="center left", bbox_to_anchor=(1, 0.5), fontsize="small")
fig.tight_layout()
plt.show()
