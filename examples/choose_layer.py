"""Which layer gives the best features? Cross-validate each stage and plot accuracy per layer.

Writes choose_layer.png next to this script (or to the path given as argument).
"""

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.model_selection import GridSearchCV  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

from _common import demo_data, scratch_dir  # noqa: E402
from featx import PretrainedFeatureExtractor, list_layers  # noqa: E402

out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("choose_layer.png")
paths, y, class_names = demo_data()
layers = [r.alias for r in list_layers() if r.alias and r.alias.startswith("stage")] + ["pre_logits"]
pipe = make_pipeline(PretrainedFeatureExtractor(cache=scratch_dir()), StandardScaler(), LogisticRegression(max_iter=3000))
search = GridSearchCV(pipe, {"pretrainedfeatureextractor__layers": layers}, cv=4).fit(paths, y)
scores = search.cv_results_["mean_test_score"]
stds = search.cv_results_["std_test_score"]
for layer, m, s in zip(layers, scores, stds):
    print(f"{layer:<12} {m:.3f} ± {s:.3f}")
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.errorbar(range(len(layers)), scores, yerr=stds, marker="o", capsize=3)
ax.set_xticks(range(len(layers)), layers)
ax.set_ylabel("4-fold CV accuracy")
ax.set_ylim(0, 1.02)
ax.set_title("efficientnet_lite0 + logistic regression: accuracy per layer")
fig.tight_layout()
fig.savefig(out, dpi=100)
print(f"best layer: {search.best_params_['pretrainedfeatureextractor__layers']}; plot: {out}")
