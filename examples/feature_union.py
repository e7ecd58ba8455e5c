"""
Two extractors side by side
===========================

A ``FeatureUnion`` of a mid-level stage and the pre-logits features.

Any two backbones combine the same way, e.g. PretrainedFeatureExtractor("resnet50")
next to the default (torchvision downloads its weights once, then works offline).
"""


from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import FeatureUnion, make_pipeline
from sklearn.preprocessing import StandardScaler

from _common import demo_data, scratch_dir
from featx import PretrainedFeatureExtractor

paths, y, _ = demo_data()
cache = scratch_dir()
union = FeatureUnion([
    ("texture", PretrainedFeatureExtractor(layers="stage4", pooling="gem", cache=cache)),
    ("semantics", PretrainedFeatureExtractor(cache=cache)),
])
pipe = make_pipeline(union, StandardScaler(), LogisticRegression(max_iter=3000))
scores = cross_val_score(pipe, paths, y, cv=4)
names = union.fit(paths[:2]).get_feature_names_out()
print(f"{len(names)} features: {names[0]} ... {names[-1]}")
print(f"accuracy {scores.mean():.3f} ± {scores.std():.3f}")
