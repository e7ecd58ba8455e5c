"""The low-data workbench behind :func:`featx.evaluate.evaluate_folder`: what a cross-validated table leaves out.

- :mod:`.learning`: how many labels are enough (a learning curve per class size);
- :mod:`.mistakes`: what goes wrong (per-class report, confused pairs, a contact sheet of the misclassified);
- :mod:`.transfer`: whether the pretrained features help at all on this data.

These modules take features and labels, never images to embed: the
evaluation embeds each image once, and everything here reuses those features.
"""
