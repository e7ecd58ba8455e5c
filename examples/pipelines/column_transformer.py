"""
Image features next to tabular columns
======================================

A ``ColumnTransformer`` over a DataFrame with a column of paths.
"""


import numpy as np
import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from _common import demo_data, shared_cache
from featx import PretrainedFeatureExtractor

paths, y, class_names = demo_data()
rng = np.random.default_rng(0)
df = pd.DataFrame({
    "photo": paths,
    "file_kb": rng.normal(50, 10, len(paths)),  # tabular columns that carry no signal here
    "camera": rng.choice(["phone", "dslr"], len(paths)),
})
features = ColumnTransformer([
    ("image", make_pipeline(PretrainedFeatureExtractor(cache=shared_cache()), StandardScaler()), "photo"),
    ("size", StandardScaler(), ["file_kb"]),
    ("camera", OneHotEncoder(sparse_output=False), ["camera"]),
])
model = make_pipeline(features, LogisticRegression(max_iter=3000))
scores = cross_val_score(model, df, y, cv=4)
print(f"image + tabular columns: accuracy {scores.mean():.3f} ± {scores.std():.3f}")
out = features.set_output(transform="pandas").fit_transform(df.head(3))
print(out.iloc[:, [0, 1, -3, -2, -1]])

# %%
# The image columns carry the signal; the tabular ones here are noise.
import matplotlib.pyplot as plt

tab = cross_val_score(make_pipeline(ColumnTransformer([("size", StandardScaler(), ["file_kb"]),
                                                       ("camera", OneHotEncoder(sparse_output=False), ["camera"])]),
                                    LogisticRegression(max_iter=3000)), df, y, cv=4)
fig, ax = plt.subplots(figsize=(5, 2.6))
ax.bar(["tabular only", "image + tabular"], [tab.mean(), scores.mean()], yerr=[tab.std(), scores.std()],
       color=["tab:gray", "tab:blue"])
ax.axhline(1 / len(class_names), color="k", ls=":", label="chance")
ax.set_ylabel("4-fold CV accuracy")
ax.set_ylim(0, 1)
ax.legend()
fig.tight_layout()
plt.show()
