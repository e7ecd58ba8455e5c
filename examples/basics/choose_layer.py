"""
Which layer gives the best features, and how good is it really?
===============================================================

:func:`featx.evaluate.evaluate_folder` (what ``featx evaluate`` runs)
cross-validates classifiers on every stage of the offline default backbone,
and on its pre-logits features, from one pass of the backbone over the images
(a cache miss stores every stage). Besides the best row it reports the
accuracy to expect on new images (nested cross-validation), a learning curve
(would more labels help?) and what the chosen setup gets wrong.
"""

import sys

import matplotlib.pyplot as plt

from _common import demo_folder, shared_cache
from featx import list_layers
from featx.evaluate import evaluate_folder, format_report

folder = demo_folder()
layers = [r.alias for r in list_layers() if r.alias and r.alias.startswith("stage")] + ["pre_logits"]
result = evaluate_folder(folder, layers=layers, classifiers=("logreg", "centroid"), cv=4,
                         cache=shared_cache(), log=lambda line: None)

# %%
# One row per classifier and layer. Early stages see edges and textures,
# later ones parts and objects; which is best depends on how far your images
# are from ImageNet's.
for r in result.rows:
    print(f"{r.classifier:<9} {r.layer:<11} {r.mean:.3f} ± {r.std:.3f}")
print(f"best layer: {result.best['layer']} ({result.best['classifier']}, {result.best['mean']:.3f})")

# %%
# The best row is the top of many cross-validated means on the same folds,
# so it is optimistic; the nested estimate reruns the whole selection inside
# each outer fold and is not. Then the learning curve, per-class precision
# and recall, and the most confused pairs.
print(format_report(result))

# %%
# The learning curve: accuracy against labelled training images per class,
# the chosen setup beside the nearest-centroid classifier on the same layer.
curve = result.learning_curve
fig, ax = plt.subplots(figsize=(6, 3.5))
for label, c in curve["curves"].items():
    ax.plot(curve["per_class"], c["mean"], marker="o", label=label)
ax.set_xlabel("labelled training images per class")
ax.set_ylabel("held-out accuracy")
ax.set_ylim(0, 1.02)
ax.set_title("efficientnet_lite0: learning curve")
ax.legend()
fig.tight_layout()
if len(sys.argv) > 1:  # python choose_layer.py plot.png: save instead of showing
    fig.savefig(sys.argv[1], dpi=100)
    print(f"plot: {sys.argv[1]}")
else:
    plt.show()
