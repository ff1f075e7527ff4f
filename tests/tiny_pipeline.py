"""The zero-shot chain on the tiny random-weight CLIP and SAM of the tests (nothing
downloaded). Used by the fixtures, the end-to-end GUI session and the viewer-first script."""

from __future__ import annotations

from pathlib import Path


def build_tiny_pipeline(clip_dir: str | Path, sam_checkpoint: str | Path, steps: int = 2,
                        sam: str = "vit_b"):
    """A ZeroShotPipeline on ``local-dir:clip_dir`` and the tiny SAM checkpoint, on the CPU,
    with the bottleneck after block 2 (the tiny ViT has 4), ``steps`` M2IB steps, batch 2.
    ``sam="sam2_t"`` with a tiny SAM 2.1 checkpoint uses the SAM 2 backend."""
    from tiny_clip import register_tiny_vit
    from tiny_sam2 import tiny_builder

    from napari_medclipsam.core.config import PipelineConfig, SaliencyConfig
    from napari_medclipsam.core.models import load_clip, load_sam
    from napari_medclipsam.core.pipeline import ZeroShotPipeline

    register_tiny_vit()  # the tiny CLIP's timm trunk, for a fresh process
    config = PipelineConfig(clip_model=f"local-dir:{clip_dir}", device="cpu", sam_model=sam,
                            sam_checkpoint=str(sam_checkpoint),
                            saliency=SaliencyConfig(layer=2, steps=steps, batch_size=2))
    return ZeroShotPipeline(config, clip=load_clip(config.clip_model, "cpu"),
                            sam=load_sam(sam, sam_checkpoint, "cpu",
                                         builder=lambda: tiny_builder(sam)))


RUNNER = """
import signal, sys, time
# Ctrl-C acts as in a terminal, even when the tests run as a background job (a shell starts
# those, and so this child, with SIGINT ignored)
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.path.insert(0, {tests!r})
from napari_medclipsam.cli import main, segment
from napari_medclipsam.core import models
from napari_medclipsam.core.pipeline import ZeroShotPipeline

def build_sam(name):
    from tiny_sam2 import tiny_builder
    return tiny_builder(name)

original_load_clip = models.load_clip

def load_clip(*args, **kwargs):
    from tiny_clip import register_tiny_vit
    register_tiny_vit()
    return original_load_clip(*args, **kwargs)

models.build_sam, models.load_clip = build_sam, load_clip
if {delay}:
    segment.CHECKPOINT_SECONDS = 0.0  # save every slice
    original_segment = ZeroShotPipeline.segment

    def slow_segment(self, *args, **kwargs):
        time.sleep({delay})
        return original_segment(self, *args, **kwargs)

    ZeroShotPipeline.segment = slow_segment
sys.exit(main(sys.argv[1:]))
"""


def write_cli_runner(folder: str | Path, delay: float = 0.0) -> Path:
    """A script running ``medclipsam`` on the tiny models in a fresh process (the tiny CLIP
    is registered and torch imported only inside main, as in a real run). With ``delay``,
    each image or slice first sleeps that long and a volume is saved after every slice, so
    a test can signal the process mid-run."""
    path = Path(folder) / "runner.py"
    path.write_text(RUNNER.format(tests=str(Path(__file__).parent), delay=delay))
    return path


def disk_images(n: int, seed: int = 0):
    """``n`` 64x64 grey RGB uint8 images with three bright disks on a noisy background (the
    calibration tests' cases)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:64, :64]
    out = []
    for _ in range(n):
        img = rng.normal(60, 10, (64, 64))
        for _ in range(3):
            cy, cx = rng.integers(10, 54, 2)
            r = rng.integers(4, 9)
            img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = rng.uniform(150, 250)
        out.append(np.repeat(img.clip(0, 255).astype(np.uint8)[..., None], 3, axis=2))
    return out
