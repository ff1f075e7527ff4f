"""Seconds per 512x512 image for each saliency method and the DenseCRF threshold, side by
side (full-size BiomedCLIP architecture, random weights: the compute of the real model).

    python benchmarks/bench_saliency_methods.py [--threads 2] [--repeats 2]

Methods: M2IB at layer 9 (MedCLIP-SAMv2's breast/brain setting; 10 steps, batch 10),
gScoreCAM (MedCLIP-SAM: 300 channels, batches of 128) and GradCAM, each in fp32 and in bf16
(``--precision auto`` where the CPU has it); then each coarse-mask method on the same map.
Each cell is the median of ``--repeats`` runs after one warm-up. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)

    import torch
    from bench_m2ib import build_random_biomedclip

    from napari_medclipsam.core.cam import cam_saliency
    from napari_medclipsam.core.config import CoarseMaskConfig, SaliencyConfig
    from napari_medclipsam.core.postprocess import coarse_mask
    from napari_medclipsam.core.precision import autocast, bf16_supported
    from napari_medclipsam.core.saliency import encode_text, m2ib_saliency

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    image = (rng.random((512, 512, 3)) * 255).astype(np.uint8)
    methods = {
        "M2IB, layer 9": (m2ib_saliency, SaliencyConfig(layer=9)),
        "gScoreCAM": (cam_saliency, SaliencyConfig(method="gscorecam")),
        "GradCAM": (cam_saliency, SaliencyConfig(method="gradcam")),
    }
    precisions = ["fp32"] + (["bf16"] if bf16_supported("cpu") else [])
    print(f"Machine: {platform.machine()}, {args.threads} threads, torch {torch.__version__}\n")
    rows = ["| saliency | " + " | ".join(f"{p} s" for p in precisions) + " |",
            "|---|" + "---:|" * len(precisions)]
    saliency = None
    with tempfile.TemporaryDirectory() as tmp:
        clip = build_random_biomedclip(Path(tmp))
        text = encode_text(clip, "breast tumor")
        for name, (fn, cfg) in methods.items():
            cells = []
            for precision in precisions:
                times = []
                for i in range(args.repeats + 1):
                    start = time.perf_counter()
                    with autocast(precision, "cpu"):
                        result = fn(clip, image, "breast tumor", cfg, text_embedding=text)
                    if i:  # the first run warms the kernels up
                        times.append(time.perf_counter() - start)
                saliency = result if saliency is None else saliency
                cells.append(f"{statistics.median(times):.2f}")
            rows.append(f"| {name} | " + " | ".join(cells) + " |")
    print("\n".join(rows) + "\n")
    rows = ["| coarse mask on the 512x512 map | ms |", "|---|---:|"]
    for method in ("otsu", "kmeans", "crf"):
        times = []
        for _ in range(args.repeats + 1):
            start = time.perf_counter()
            coarse_mask(saliency, CoarseMaskConfig(method=method), image=image)
            times.append(1000 * (time.perf_counter() - start))
        rows.append(f"| {method} | {statistics.median(times[1:]):.0f} |")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
