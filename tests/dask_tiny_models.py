"""A Dask worker preload for tests (Dask's own ``distributed.worker.preload`` setting): every
worker process builds SAM with the tiny test architecture and knows the tiny ViT, as the
in-process tests' ``model_flags`` fixture arranges with monkeypatch. Set it through the
environment before a cluster starts::

    PYTHONPATH=tests  DASK_DISTRIBUTED__WORKER__PRELOAD='["dask_tiny_models"]'
"""

from __future__ import annotations


def dask_setup(worker=None) -> None:
    from tiny_clip import register_tiny_vit
    from tiny_sam2 import tiny_builder

    from napari_medclipsam.core import models

    register_tiny_vit()
    models.build_sam = tiny_builder
