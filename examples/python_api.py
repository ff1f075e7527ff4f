"""Zero-shot segmentation from Python: one image, one prompt, every intermediate result.

    python examples/python_api.py [IMAGE] [PROMPT]

Downloads BiomedCLIP and SAM ViT-B on first use (into $MEDCLIPSAM_HOME); offline, pass
local files instead: PipelineConfig(clip_model="local-dir:/path/to/BiomedCLIP",
sam_checkpoint="/path/to/sam_vit_b_01ec64.pth").
"""

from __future__ import annotations

import sys
from pathlib import Path

from napari_medclipsam.core.config import CoarseMaskConfig, PipelineConfig, SaliencyConfig
from napari_medclipsam.core.io import read_image
from napari_medclipsam.core.pipeline import ZeroShotPipeline

HERE = Path(__file__).parent


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "images" / "us_lesion.png"
    prompt = sys.argv[2] if len(sys.argv) > 2 else "breast tumor"
    config = PipelineConfig(
        sam_model="vit_b",
        saliency=SaliencyConfig(layer=9, beta=1.0),  # the paper's breast-ultrasound setting
        coarse=CoarseMaskConfig(method="otsu", top_k=1),
    )
    pipeline = ZeroShotPipeline(config)
    image = read_image(path)
    result = pipeline.segment(image.data, prompt,
                              progress=lambda stage, f: print(f"{stage:>9s} {f:4.0%}"))
    print(result.message)
    print("boxes (XYXY):", result.prompts.boxes.tolist())
    for c in result.coarse.components:
        print(f"component {c.label}: area {c.area}, confidence {c.confidence:.3f}")
    # Re-prompting SAM with an edited box reuses the cached image embedding:
    if result.found:
        box = result.prompts.boxes[0] + [-5, -5, 5, 5]
        edited = type(result.prompts).from_dict({**result.prompts.to_dict(),
                                                 "boxes": [box.tolist()]})
        mask = pipeline.refine(pipeline_rgb(image.data), edited)
        print("mask pixels after editing the box:", int(mask.sum()))


def pipeline_rgb(data):
    from napari_medclipsam.core.io import to_rgb_uint8

    return to_rgb_uint8(data)


if __name__ == "__main__":
    main()
