"""bf16 vs fp32: agreement and speed of M2IB and the SAM / SAM 2 image encoders.

    python benchmarks/bench_precision.py [--threads 2] [--images 3]

Full-size random-weight models (BiomedCLIP's architecture, SAM ViT-B, SAM 2.1 hiera tiny;
the same compute as the released ones, nothing downloaded) and the toy models of the tests
(the shapes CLIP trained for seconds on disks and squares, tests/toy_clip.py). For each image,
the same input runs in fp32 and under bf16 autocast (``core.precision``):

* saliency: Pearson correlation of the M2IB maps; Dice of the Otsu masks (all components)
  and of the coarse masks after keeping the top-1 component by confidence;
* SAM: Dice of the masks for the same box (encoder, and decoder for SAM 2, in the precision).

Prints Markdown tables for ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)


def saliency_rows(label: str, clip, images, prompts, config) -> list[str]:
    from napari_medclipsam.core.config import CoarseMaskConfig
    from napari_medclipsam.core.postprocess import coarse_mask
    from napari_medclipsam.core.precision import autocast
    from napari_medclipsam.core.saliency import m2ib_saliency

    corrs, dices, kept, times = [], [], [], {"fp32": 0.0, "bf16": 0.0}
    for image, prompt in zip(images, prompts, strict=True):
        maps = {}
        for precision in ("fp32", "bf16"):
            start = time.perf_counter()
            with autocast(precision, "cpu"):
                maps[precision] = m2ib_saliency(clip, image, prompt, config)
            times[precision] += time.perf_counter() - start
        corrs.append(np.corrcoef(maps["fp32"].ravel(), maps["bf16"].ravel())[0, 1])
        every = CoarseMaskConfig(top_k=None)  # Otsu and connected components, all kept
        dices.append(dice(*[coarse_mask(maps[p], every).mask for p in ("fp32", "bf16")]))
        kept.append(dice(*[coarse_mask(maps[p], CoarseMaskConfig()).mask
                           for p in ("fp32", "bf16")]))
    n = len(images)
    return [f"| {label} | {n} | {min(corrs):.4f} | {np.mean(corrs):.4f} | {min(dices):.3f} | "
            f"{np.mean(dices):.3f} | {min(kept):.3f} | {times['fp32'] / n:.2f} | "
            f"{times['bf16'] / n:.2f} |"]


def sam_rows(label: str, bundle, images, boxes) -> list[str]:
    from napari_medclipsam.core.sam import make_session

    dices, times = [], {"fp32": 0.0, "bf16": 0.0}
    for image, box in zip(images, boxes, strict=True):
        masks = {}
        for precision in ("fp32", "bf16"):
            session = make_session(bundle, precision=precision)
            start = time.perf_counter()
            session.set_image(image)
            times[precision] += time.perf_counter() - start
            masks[precision] = session.predict(boxes=[box])
        dices.append(dice(masks["fp32"], masks["bf16"]))
    n = len(images)
    return [f"| {label} | {n} | {min(dices):.4f} | {np.mean(dices):.4f} | "
            f"{times['fp32'] / n:.2f} | {times['bf16'] / n:.2f} |"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--images", type=int, default=3)
    args = parser.parse_args(argv)

    import torch
    from bench_m2ib import build_random_biomedclip
    from tiny_clip import register_tiny_vit
    from toy_clip import make_toy_clip_dir, random_image

    from napari_medclipsam.core.config import SaliencyConfig
    from napari_medclipsam.core.models import SamBundle, build_sam, load_clip
    from napari_medclipsam.core.precision import bf16_supported

    torch.set_num_threads(args.threads)
    print(f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}; native bf16 on this CPU: {bf16_supported('cpu')}\n")
    rng = np.random.default_rng(0)
    n = args.images
    big = [(rng.random((512, 512, 3)) * 255).astype(np.uint8) for _ in range(n)]
    for image in big:  # a bright blob, so masks are not all noise
        image[150:330, 200:380] = np.clip(image[150:330, 200:380].astype(int) + 90, 0, 255)
    toy_images, toy_prompts = [], []
    for i in range(n):
        kind = ("disk", "square")[i % 2]
        image, _ = random_image(rng, ("disk", "square"))
        toy_images.append(image)
        toy_prompts.append(f"a {kind}")
    rows = ["| model | images | min corr | mean corr | min Dice (Otsu) | mean Dice (Otsu) | "
            "min Dice (top-1 component) | fp32 s | bf16 s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    with tempfile.TemporaryDirectory() as tmp:
        clip = build_random_biomedclip(Path(tmp) / "big")
        rows += saliency_rows("BiomedCLIP architecture, random, layer 9", clip, big,
                              ["breast tumor"] * n, SaliencyConfig(layer=9))
        register_tiny_vit()
        toy = load_clip(f"local-dir:{make_toy_clip_dir(Path(tmp) / 'toy')}", "cpu")
        rows += saliency_rows("toy shapes CLIP (trained), layer 2", toy, toy_images,
                              toy_prompts, SaliencyConfig(layer=2))
    print("### M2IB saliency, bf16 vs fp32\n")
    print("\n".join(rows) + "\n")

    rows = ["| SAM | images | min Dice | mean Dice | fp32 encoder s | bf16 encoder s |",
            "|---|---:|---:|---:|---:|---:|"]
    box = [190, 140, 390, 340]
    for name in ("vit_b", "sam2_t"):
        torch.manual_seed(0)
        bundle = SamBundle(build_sam(name).eval().requires_grad_(False), name, "cpu", None,
                           None)
        rows += sam_rows(f"{name} (full size, random)", bundle, big, [box] * n)
    from tiny_sam import build_tiny_sam
    from tiny_sam2 import build_tiny_sam2

    small = [np.ascontiguousarray(image[::8, ::8]) for image in big]
    rows += sam_rows("tiny SAM (tests)", SamBundle(build_tiny_sam(), "vit_b", "cpu", None,
                                                   None), small, [[24, 18, 48, 42]] * n)
    rows += sam_rows("tiny SAM 2.1 (tests)", SamBundle(build_tiny_sam2(), "sam2_t", "cpu",
                                                       None, None), small, [[24, 18, 48, 42]] * n)
    print("### SAM masks for the same box, bf16 vs fp32\n")
    print("\n".join(rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
