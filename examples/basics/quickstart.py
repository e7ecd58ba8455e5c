"""
Quickstart: transfer learning on a folder of labelled photos
============================================================

Builds a small real image set (patches of photographs bundled with
scikit-image, one class per photograph), embeds it with featx's offline
default backbone, and tunes the setup that wins ``featx demo`` (logistic
regression on the ``stage5`` features) with GridSearchCV. Offline, on the CPU.
As a script::

    python examples/basics/quickstart.py [FOLDER]

With FOLDER (one sub-folder per class), your own photos are used instead.
"""

import sys
import tempfile
import time

import matplotlib.pyplot as plt
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import ConfusionMatrixDisplay
from sklearn.model_selection import GridSearchCV, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from featx import PretrainedFeatureExtractor, load_image_folder, make_demo_folder


def main(folder=None):
    if folder is None:  # the demo images live in a temporary folder, removed afterwards
        with tempfile.TemporaryDirectory(prefix="featx-demo-") as tmp:
            return main(make_demo_folder(tmp, n_per_class=12))
    paths, y, class_names = load_image_folder(folder)
    print(f"{len(paths)} images, {len(class_names)} classes: {', '.join(class_names)}")
    start = time.perf_counter()
    # cache=True: each image goes through the CNN once for the whole search, and
    # never again on later runs ($FEATX_CACHE_DIR or ~/.cache/featx).
    pipe = make_pipeline(PretrainedFeatureExtractor(layers="stage5", cache=True), StandardScaler(),
                         LogisticRegression(max_iter=500))
    search = GridSearchCV(pipe, {"logisticregression__C": [0.01, 0.1, 1.0]}, cv=3).fit(paths, y)
    print(f"best C={search.best_params_['logisticregression__C']}, cross-validated accuracy {search.best_score_:.3f} "
          f"(chance {1 / len(class_names):.3f}), {time.perf_counter() - start:.0f} s")
    # Which classes does the best model confuse? Out-of-fold predictions, so
    # every image is predicted by a model that did not see it (cache hits only).
    predicted = cross_val_predict(search.best_estimator_, paths, y, cv=3)
    disp = ConfusionMatrixDisplay.from_predictions(y, predicted, display_labels=class_names, xticks_rotation=45,
                                                   colorbar=False)
    disp.ax_.set_title("out-of-fold predictions, stage5 + logistic regression")
    disp.figure_.tight_layout()
    return search


# %%
# Run it: the demo images, or the folder given on the command line.
search = main(sys.argv[1] if len(sys.argv) > 1 and not sys.argv[1].startswith("-") else None)
plt.show()
