"""Weak supervision with nnU-Net v2: pseudo-label export, the checkpoint-ensembling trainer,
the background training job and ensemble prediction with an uncertainty (entropy) map.

Nothing here imports napari or Qt; ``nnunetv2`` and ``torch`` are imported late.
"""
