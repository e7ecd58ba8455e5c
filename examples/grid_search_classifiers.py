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

from _common import demo_data, scratch_dir
from featx import PretrainedFeatureExtractor

paths, y, class_names = demo_data()
pipe = Pipeline([
    ("features", PretrainedFeatureExtractor(cache=scratch_dir())),
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
