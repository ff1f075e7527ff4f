"""The zero-shot chain on the tiny random-weight CLIP and SAM of the tests (nothing
downloaded). Used by the fixtures, the end-to-end GUI session and the viewer-first script."""

from __future__ import annotations

from pathlib import Path


def build_tiny_pipeline(clip_dir: str | Path, sam_checkpoint: str | Path, steps: int = 2):
    """A ZeroShotPipeline on ``local-dir:clip_dir`` and the tiny SAM checkpoint, on the CPU,
    with the bottleneck after block 2 (the tiny ViT has 4), ``steps`` M2IB steps, batch 2."""
    from tiny_clip import register_tiny_vit
    from tiny_sam import build_tiny_sam

    from napari_medclipsam.core.config import PipelineConfig, SaliencyConfig
    from napari_medclipsam.core.models import load_clip, load_sam
    from napari_medclipsam.core.pipeline import ZeroShotPipeline

    register_tiny_vit()  # the tiny CLIP's timm trunk, for a fresh process
    config = PipelineConfig(clip_model=f"local-dir:{clip_dir}", device="cpu",
                            saliency=SaliencyConfig(layer=2, steps=steps, batch_size=2))
    return ZeroShotPipeline(config, clip=load_clip(config.clip_model, "cpu"),
                            sam=load_sam("vit_b", sam_checkpoint, "cpu",
                                         builder=build_tiny_sam))
