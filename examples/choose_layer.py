"""
Which layer gives the best features?
====================================

Cross-validates logistic regression on each stage of the offline default
backbone, and on its pre-logits features, with the layer as a
``GridSearchCV`` parameter. The cache makes the backbone run once per image
for the whole search: a miss stores every stage.
"""

import sys

import matplotlib.pyplot as plt
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from _common import demo_data, scratch_dir
from featx import PretrainedFeatureExtractor, list_layers

paths, y, class_names = demo_data()
layers = [r.alias for r in list_layers() if r.alias and r.alias.startswith("stage")] + ["pre_logits"]
pipe = make_pipeline(PretrainedFeatureExtractor(cache=scratch_dir()), StandardScaler(), LogisticRegression(max_iter=3000))
search = GridSearchCV(pipe, {"pretrainedfeatureextractor__layers": layers}, cv=4).fit(paths, y)
scores = search.cv_results_["mean_test_score"]
stds = search.cv_results_["std_test_score"]
for layer, m, s in zip(layers, scores, stds):
    print(f"{layer:<12} {m:.3f} ± {s:.3f}")
print(f"best layer: {search.best_params_['pretrainedfeatureextractor__layers']}")

# %%
# Early stages see edges and textures, later ones parts and objects; which is
# best depends on how far your images are from ImageNet's.
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.errorbar(range(len(layers)), scores, yerr=stds, marker="o", capsize=3)
ax.set_xticks(range(len(layers)), layers)
ax.set_ylabel("4-fold CV accuracy")
ax.set_ylim(0, 1.02)
ax.set_title("efficientnet_lite0 + logistic regression: accuracy per layer")
fig.tight_layout()
if len(sys.argv) > 1:  # python choose_layer.py plot.png: save instead of showing
    fig.savefig(sys.argv[1], dpi=100)
    print(f"plot: {sys.argv[1]}")
else:
    plt.show()
