"""What does pretraining buy? Pretrained features vs the same CNN with random weights vs raw pixels."""


import numpy as np
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler

from _common import demo_data, scratch_dir
from featx import PretrainedFeatureExtractor


def raw_pixels(paths):
    return np.stack([np.asarray(Image.open(p).convert("RGB").resize((32, 32)), dtype=np.float32).ravel() / 255 for p in paths])


paths, y, class_names = demo_data()
cache = scratch_dir()
candidates = {
    "pretrained": PretrainedFeatureExtractor(cache=cache),
    "random-init": PretrainedFeatureExtractor(weights=None, cache=cache),
    "raw pixels": FunctionTransformer(raw_pixels),
}
for name, features in candidates.items():
    pipe = make_pipeline(features, StandardScaler(), LogisticRegression(max_iter=3000))
    scores = cross_val_score(pipe, paths, y, cv=4)
    print(f"{name:<12} accuracy {scores.mean():.3f} ± {scores.std():.3f}")
