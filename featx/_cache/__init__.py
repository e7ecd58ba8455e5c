"""The per-image embedding cache: the store protocol (:mod:`.base`), content and namespace keys with the
SQLite store (:mod:`.sqlite`), and the shared object store under a storage URL (:mod:`.objects`).

Imports nothing of featx's models, images or runtime.
"""
