"""
Which classifier? A grid over estimators
========================================

GridSearchCV over classifiers (SVC, random forest, logistic regression) on frozen CNN features.

The classifier itself is a grid parameter; the embedding cache makes the CNN
run once per image for the whole search.
"""


from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from _common import demo_data, shared_cache
from featx import PretrainedFeatureExtractor

paths, y, class_names = demo_data()
pipe = Pipeline([
    ("features", PretrainedFeatureExtractor(cache=shared_cache())),
    ("scale", StandardScaler()),
    ("clf", SVC()),
])
grid = [
    {"clf": [SVC()], "clf__C": [0.1, 1, 10]},
    {"clf": [RandomForestClassifier(n_estimators=200, random_state=0)], "clf__max_features": ["sqrt", 0.05]},
    {"clf": [LogisticRegression(max_iter=3000)], "clf__C": [0.01, 0.1, 1]},
]
search = GridSearchCV(pipe, grid, cv=4).fit(paths, y)
for params, score in zip(search.cv_results_["params"], search.cv_results_["mean_test_score"]):
    name = type(params["clf"]).__name__
    rest = {k: v for k, v in params.items() if k != "clf"}
    print(f"{name:<24} {rest}  accuracy {score:.3f}")
print(f"best: {type(search.best_params_['clf']).__name__}, accuracy {search.best_score_:.3f}")

# %%
# Every candidate of the grid, best on top.
import matplotlib.pyplot as plt

labels = [f"{type(p['clf']).__name__} {', '.join(f'{k[5:]}={v}' for k, v in p.items() if k != 'clf')}"
          for p in search.cv_results_["params"]]
order = search.cv_results_["mean_test_score"].argsort()
fig, ax = plt.subplots(figsize=(6, 3.2))
ax.barh([labels[i] for i in order], search.cv_results_["mean_test_score"][order],
        xerr=search.cv_results_["std_test_score"][order], color="tab:blue")
ax.set_xlabel("4-fold CV accuracy")
ax.set_xlim(0, 1)
ax.set_title("GridSearchCV over classifiers on cached features")
fig.tight_layout()
plt.show()
