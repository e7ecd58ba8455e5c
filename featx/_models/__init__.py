"""Backbones and what is read from them: building named and user models with their weights (offline
default, torchvision, timm, open_clip, checkpoints), the shape probe and layer names, pooling, and
BatchNorm folding.

Imports nothing of featx's caches or runtime.
"""
