"""Weak supervision with nnU-Net v2: pseudo-label export, the checkpoint-ensembling trainer,
the background training job, ensemble prediction with an uncertainty (entropy) map, and the
per-case review record (``review.py``). One target (binary) or several in one label map.

Nothing here imports napari or Qt; ``nnunetv2`` and ``torch`` are imported late.
"""
