"""
Your own torch module
=====================

Any ``torch.nn.Module`` works: here a small CNN of your own, with explicit preprocessing.
"""

import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

from _common import demo_data
from featx import PretrainedFeatureExtractor, list_layers


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.pool(self.block2(self.block1(x))).flatten(1))


torch.manual_seed(0)
net = SmallNet()  # in real use: load your trained weights, or pass weights="my_net.pth"
prep = {"input_size": 64, "resize_size": 72, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
for layer in list_layers(net, preprocess=prep):
    if layer.alias:
        print(f"{layer.name:<10} alias {layer.alias:<10} shape {layer.shape}")
paths, y, _ = demo_data()
ext = PretrainedFeatureExtractor(net, layers=["block1", "block2"], pooling="catavgmax", preprocess=prep)
scores = cross_val_score(make_pipeline(ext, StandardScaler(), LogisticRegression(max_iter=3000)), paths, y, cv=4)
print(f"SmallNet (random weights) block1+block2 catavgmax: accuracy {scores.mean():.3f}")

# %%
# What the two blocks give: the mean of each feature over the images, by class.
import matplotlib.pyplot as plt
import numpy as np

X = ext.fit_transform(paths)
fig, ax = plt.subplots(figsize=(6, 2.8))
image = ax.imshow(np.stack([X[np.asarray(y) == c].mean(0) for c in np.unique(y)]), aspect="auto", cmap="viridis")
ax.set_xlabel(f"feature ({X.shape[1]}: block1 then block2, average then max pooled)")
ax.set_ylabel("class")
fig.colorbar(image, ax=ax, label="mean value")
fig.tight_layout()
plt.show()
