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

from _common import demo_data, shared_cache
from featx import PretrainedFeatureExtractor

paths, y, _ = demo_data()
cache = shared_cache()
union = FeatureUnion([
    ("texture", PretrainedFeatureExtractor(layers="stage4", pooling="gem", cache=cache)),
    ("semantics", PretrainedFeatureExtractor(cache=cache)),
])
pipe = make_pipeline(union, StandardScaler(), LogisticRegression(max_iter=3000))
scores = cross_val_score(pipe, paths, y, cv=4)
names = union.fit(paths[:2]).get_feature_names_out()
print(f"{len(names)} features: {names[0]} ... {names[-1]}")
print(f"accuracy {scores.mean():.3f} ± {scores.std():.3f}")

# %%
# Each extractor alone, and the union (the cache answers all three from one pass).
import matplotlib.pyplot as plt

alone = {name: cross_val_score(make_pipeline(ext, StandardScaler(), LogisticRegression(max_iter=3000)),
                               paths, y, cv=4) for name, ext in union.transformer_list}
rows = {**alone, "union": scores}
fig, ax = plt.subplots(figsize=(5, 2.6))
ax.bar(list(rows), [s.mean() for s in rows.values()], yerr=[s.std() for s in rows.values()], color="tab:green")
ax.set_ylabel("4-fold CV accuracy")
ax.set_ylim(0, 1)
ax.set_title("stage4 (GeM) + pre_logits")
fig.tight_layout()
plt.show()
