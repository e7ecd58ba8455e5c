"""Images in, model-ready batches out: reading paths, bytes, PIL images, arrays and tensors, resizing, cropping.

Imports nothing of featx's models, caches or runtime.
"""
