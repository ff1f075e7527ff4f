"""Seconds per 512x512 image for each saliency method and the DenseCRF threshold, side by
side (full-size BiomedCLIP architecture, random weights: the compute of the real model).

    python benchmarks/bench_saliency_methods.py [--threads 2] [--repeats 2] [--chains]

Methods: M2IB at layer 9 (MedCLIP-SAMv2's breast/brain setting; 10 steps, batch 10),
gScoreCAM (MedCLIP-SAM: 300 channels, batches of 128) and GradCAM, each in fp32 and in bf16
(``--precision auto`` where the CPU has it); then each coarse-mask method on the same map.
Each cell is the median of ``--repeats`` runs after one warm-up. Prints a Markdown table.

``--chains``: instead, each method's whole chain from loaded models to the mask on a 512x512
image, side by side in one process with the CPU's default SAM (SAM 2.1 tiny, random weights)
and bf16 where the CPU has it: MedCLIP-SAMv2 (M2IB + Otsu + SAM; with and without the prompt
faithfulness check, on by default, so its cost shows), MedCLIP-SAM (gScoreCAM +
DenseCRF + SAM), GradCAM + Otsu + SAM, and SaLIP (SAM's automatic masks with SaLIP's one crop
layer, CLIP scoring of the crops, SAM on the best box) with the stages timed. Random SAM
weights predict IoUs and stabilities that SaLIP's default thresholds reject, so SaLIP is timed
twice: with the defaults (the generator's cost; nothing passes) and with both thresholds at 0
(every proposal scored by CLIP: the most the later stages can cost).
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
    parser.add_argument("--chains", action="store_true",
                        help="time each method's whole chain to the mask instead")
    parser.add_argument("--salip", action="store_true",
                        help="time SaLIP's generator settings and its CLIP scoring instead")
    args = parser.parse_args(argv)
    if args.chains:
        return chains(args.threads, args.repeats)
    if args.salip:
        return salip_costs(args.threads)

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


def chains(threads: int, repeats: int) -> int:
    """Each method's whole chain on the same 512x512 images, interleaved."""
    import dataclasses

    import torch
    from bench_fast_path import _image, _pipeline
    from bench_m2ib import build_random_biomedclip

    from napari_medclipsam.core.config import (
        CoarseMaskConfig,
        FaithfulnessConfig,
        SaliencyConfig,
        SalipConfig,
    )
    from napari_medclipsam.core.precision import resolve_precision

    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    precision = resolve_precision("auto", "cpu")
    print(f"Machine: {platform.machine()}, {threads} threads, torch {torch.__version__}, "
          f"{precision}\n")
    with tempfile.TemporaryDirectory() as tmp:
        clip = build_random_biomedclip(Path(tmp))
        open_gates = SalipConfig(pred_iou_thresh=0.0, stability_thresh=0.0)
        variants = {
            "MedCLIP-SAMv2: M2IB (layer 9) + Otsu + SAM": {},
            "the same, --no-faithfulness": {
                "faithfulness": FaithfulnessConfig(enabled=False)},
            "MedCLIP-SAM: gScoreCAM + DenseCRF + SAM": {
                "saliency": SaliencyConfig(method="gscorecam"),
                "coarse": CoarseMaskConfig(method="crf")},
            "GradCAM + Otsu + SAM": {"saliency": SaliencyConfig(method="gradcam")},
            "SaLIP, default thresholds": {"method": "salip"},
            "SaLIP, thresholds 0": {"method": "salip", "salip": open_gates},
        }
        pipes = {}
        for name, changes in variants.items():
            pipe = _pipeline(clip, "sam2_t", "auto")  # seeded: the same SAM weights for all
            if "saliency" in changes:
                changes = {**changes, "saliency": dataclasses.replace(
                    changes["saliency"], layer=9)}
            pipe.config = dataclasses.replace(pipe.config, **changes)
            pipes[name] = pipe
        runs: dict[str, list[tuple[float, dict[str, float], str]]] = {n: [] for n in pipes}
        for i in range(repeats + 1):
            image = _image(rng, 512)
            for name, pipe in pipes.items():
                stages: dict[str, float] = {}
                last = [time.perf_counter(), None]

                def progress(stage, fraction, stages=stages, last=last):
                    now = time.perf_counter()
                    if last[1] is not None:
                        key = last[1].split(" step")[0].split(":")[0]
                        key = "CLIP scoring" if key.startswith("CLIP scoring") else key
                        stages[key] = stages.get(key, 0.0) + now - last[0]
                    last[0], last[1] = now, stage

                start = time.perf_counter()
                result = pipe.segment(image, "breast tumor", progress=progress)
                if i:  # the first round warms the kernels up
                    salip = result.extra.get("salip")
                    note = (f"{len(salip['proposals'])} proposals" if salip else
                            f"{len(result.coarse.components)} component(s)")
                    runs[name].append((time.perf_counter() - start, stages, note))
    rows = ["| chain (SAM 2.1 tiny, " + precision + ") | s per image | stages (s) | found |",
            "|---|---:|---|---|"]
    for name, done in runs.items():
        total = statistics.median(r[0] for r in done)
        keys = list(dict.fromkeys(k for r in done for k in r[1]))
        parts = ", ".join(f"{k} {statistics.median(r[1].get(k, 0.0) for r in done):.2f}"
                          for k in keys if k not in ("done",))
        rows.append(f"| {name} | **{total:.2f}** | {parts} | {done[-1][2]} |")
    print("\n".join(rows))
    return 0


def salip_costs(threads: int) -> int:
    """SaLIP's two costs on a 512x512 image: SAM 2.1 tiny's automatic mask generator under
    a few settings (its grid of points and crop layers), and CLIP scoring N crops (random
    weights propose nothing that passes SaLIP's thresholds, so the crops are made here)."""
    import torch
    from bench_fast_path import _image
    from bench_m2ib import build_random_biomedclip

    from napari_medclipsam.core.config import SalipConfig
    from napari_medclipsam.core.io import to_rgb_uint8
    from napari_medclipsam.core.models import SamBundle, build_sam
    from napari_medclipsam.core.precision import resolve_precision
    from napari_medclipsam.core.salip import (
        Proposal,
        crop_embeddings,
        crop_image,
        generate_proposals,
    )

    torch.set_num_threads(threads)
    precision = resolve_precision("auto", "cpu")
    rgb = to_rgb_uint8(_image(np.random.default_rng(0), 512))
    torch.manual_seed(0)
    bundle = SamBundle(build_sam("sam2_t").eval().requires_grad_(False), "sam2_t", "cpu", None,
                       None)
    rows = [f"| SaLIP stage (SAM 2.1 tiny, {precision}) | s per 512x512 image |", "|---|---:|"]
    generate_proposals(bundle, rgb, SalipConfig(points_per_side=4, crop_n_layers=0), precision)
    for pps, layers in ((16, 1), (16, 0), (8, 1), (8, 0)):
        start = time.perf_counter()
        generate_proposals(bundle, rgb, SalipConfig(points_per_side=pps, crop_n_layers=layers),
                           precision)
        rows.append(f"| generator: {pps} points per side, {layers} crop layer(s) | "
                    f"{time.perf_counter() - start:.2f} |")
    with tempfile.TemporaryDirectory() as tmp:
        clip = build_random_biomedclip(Path(tmp))
        rng = np.random.default_rng(1)
        for n in (10, 50):
            crops = []
            for _ in range(n):
                y0, x0 = (int(v) for v in rng.integers(0, 400, 2))
                mask = np.zeros((512, 512), dtype=bool)
                mask[y0:y0 + 100, x0:x0 + 80] = True
                crops.append(crop_image(rgb, Proposal(mask, (x0, y0, x0 + 79, y0 + 99), 8000,
                                                      1.0, 1.0)))
            crop_embeddings(clip, crops[:2], precision)
            start = time.perf_counter()
            crop_embeddings(clip, crops, precision)
            rows.append(f"| CLIP scoring of {n} crops | {time.perf_counter() - start:.2f} |")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
