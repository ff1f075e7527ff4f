"""Shared fixtures: tiny and toy models written to disk once per test session.

Nothing here downloads anything; every model is built through open_clip's, timm's and
segment-anything's own constructors.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    """A random-weight BiomedCLIP-shaped ``local-dir:`` folder (fast; knows nothing)."""
    from tiny_clip import write_tiny_clip_dir

    return write_tiny_clip_dir(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="session")
def tiny_sam_checkpoint(tmp_path_factory):
    """A random-weight tiny SAM checkpoint (state dict in SAM's format)."""
    from tiny_sam import save_tiny_sam_checkpoint

    return save_tiny_sam_checkpoint(tmp_path_factory.mktemp("tiny_sam") / "sam_tiny.pth")


@pytest.fixture(scope="session")
def tiny_sam2_checkpoint(tmp_path_factory):
    """A random-weight tiny SAM 2.1 checkpoint (``{"model": state dict}``, as released)."""
    from tiny_sam2 import save_tiny_sam2_checkpoint

    return save_tiny_sam2_checkpoint(tmp_path_factory.mktemp("tiny_sam2") / "sam2_tiny.pt")


@pytest.fixture
def tiny_sam2_pipeline(tiny_clip_dir, tiny_sam2_checkpoint):
    """A ZeroShotPipeline on the tiny CLIP and the tiny SAM 2.1 (2 saliency steps)."""
    from tiny_pipeline import build_tiny_pipeline

    from napari_medclipsam.core.models import clear_model_cache

    clear_model_cache()
    yield build_tiny_pipeline(tiny_clip_dir, tiny_sam2_checkpoint, steps=2, sam="sam2_t")
    clear_model_cache()


@pytest.fixture(scope="session")
def toy_clip_dir(tmp_path_factory):
    """A ``local-dir:`` folder holding the toy CLIP trained on disks and squares."""
    from toy_clip import make_toy_clip_dir

    return make_toy_clip_dir(tmp_path_factory.mktemp("toy_clip"))


@pytest.fixture
def tiny_pipeline(tiny_clip_dir, tiny_sam_checkpoint):
    """A ZeroShotPipeline on the tiny random-weight CLIP and SAM (2 saliency steps)."""
    from tiny_pipeline import build_tiny_pipeline

    from napari_medclipsam.core.models import clear_model_cache

    clear_model_cache()
    yield build_tiny_pipeline(tiny_clip_dir, tiny_sam_checkpoint, steps=2)
    clear_model_cache()


@pytest.fixture
def model_flags(request, tiny_clip_dir, tiny_sam_checkpoint, monkeypatch, tmp_path):
    """``medclipsam`` flags pointing at the tiny local models (SAM's architecture is the tiny
    one); ``MODEL_STEPS`` in a test module sets the M2IB steps (default 3)."""
    from tiny_sam2 import tiny_builder

    from napari_medclipsam.core import models

    steps = getattr(request.module, "MODEL_STEPS", 3)
    monkeypatch.setattr(models, "build_sam", tiny_builder)
    monkeypatch.setenv("MEDCLIPSAM_HOME", str(tmp_path / "cache"))
    models.clear_model_cache()
    yield ["--clip-model", f"local-dir:{tiny_clip_dir}", "--sam-model", "vit_b",
           "--sam-checkpoint", str(tiny_sam_checkpoint), "--device", "cpu", "--steps",
           str(steps), "--batch-size", "2", "--layer", "2"]
    models.clear_model_cache()


@pytest.fixture(scope="session")
def tiny_clipseg_dir(tmp_path_factory):
    """A random-weight tiny CLIPSeg folder (config, weights, processor): ``local-dir:``."""
    from tiny_clipseg import write_tiny_clipseg_dir

    return write_tiny_clipseg_dir(tmp_path_factory.mktemp("tiny_clipseg"))
