"""Time to first mask, a volume by propagation, and SAM 2 re-prompting, on full-size
random-weight models (the same compute as the released ones; nothing downloaded).

    python benchmarks/bench_fast_path.py [--cases first,volume,reprompt] [--threads 2]
        [--depth 155] [--side 240] [--all-slices-sample 3]

Cases (side by side in one process, so ratios are comparable on a noisy machine):

* ``first``: the whole chain on one 512x512 image (M2IB at layer 9 on BiomedCLIP's
  architecture, Otsu coarse mask, SAM) from loaded models to the first mask: today's path
  (SAM ViT-B, fp32) against the light path (SAM 2.1 hiera tiny, bf16 where the CPU has it).
* ``volume``: a (depth, side, side) volume: "All slices" as before (the chain on every slice,
  ViT-B fp32; timed on ``--all-slices-sample`` slices and scaled to the depth, since the slices
  are independent runs) against ``ZeroShotPipeline.propagate_volume`` (CLIP ranking of every
  slice, the chain on the best one, SAM 2.1 tiny propagation through all slices in bf16,
  ``stop_after_empty=0`` so every slice is computed: random weights would otherwise stop early
  and flatter the figure).
* ``reprompt``: SAM 2.1 tiny re-prompt from the cached embedding (median of 30): sam2's own
  decoder (``SAM2ImagePredictor.predict``, in the session's precision) against ours
  (``_FastMaskDecoder``, float32), two sessions on the same image, calls interleaved.

Prints Markdown tables for ``benchmarks/RESULTS.md``.
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

PROMPT = "breast tumor"


def _pipeline(clip, sam_name: str, precision: str, layer: int = 9):
    import torch

    from napari_medclipsam.core.config import PipelineConfig, SaliencyConfig, SamConfig
    from napari_medclipsam.core.models import SamBundle, build_sam
    from napari_medclipsam.core.pipeline import ZeroShotPipeline

    torch.manual_seed(0)
    model = build_sam(sam_name).eval().requires_grad_(False)
    bundle = SamBundle(model, sam_name, "cpu", None, None)
    config = PipelineConfig(sam_model=sam_name, device="cpu", precision=precision,
                            saliency=SaliencyConfig(layer=layer),
                            sam=SamConfig(stop_after_empty=0))
    return ZeroShotPipeline(config, clip=clip, sam=bundle)


def _image(rng: np.random.Generator, side: int) -> np.ndarray:
    """A grey image with a bright blob, so the chain has something to find."""
    yy, xx = np.mgrid[:side, :side]
    blob = np.exp(-(((yy - side * 0.4) ** 2 + (xx - side * 0.55) ** 2) / (2 * (side / 9) ** 2)))
    return (0.3 * rng.random((side, side)) + blob).astype(np.float32)


def first_mask(clip, rng, images: int = 4) -> list[str]:
    """Each path on ``images`` different images in turn: the first one (the process's first
    use of the path's kernels) and the median of the others."""
    from napari_medclipsam.core.precision import resolve_precision

    paths = (("today: ViT-B, fp32", "vit_b", "fp32"),
             ("light: SAM 2.1 tiny, bf16", "sam2_t", "auto"))
    pipes = {label: _pipeline(clip, sam_name, precision) for label, sam_name, precision in paths}
    runs: dict[str, list[tuple[float, dict[str, float], bool]]] = {label: [] for label in pipes}
    for _ in range(images):
        image = _image(rng, 512)
        for label, pipe in pipes.items():  # interleaved: both see the same machine load
            start = time.perf_counter()
            stages: dict[str, float] = {}
            last = [start, None]

            def progress(stage: str, fraction: float, stages=stages, last=last) -> None:
                now = time.perf_counter()
                if last[1] is not None:
                    key = last[1].split(" step")[0]
                    stages[key] = stages.get(key, 0.0) + now - last[0]
                last[0], last[1] = now, stage

            result = pipe.segment(image, PROMPT, progress=progress)
            runs[label].append((time.perf_counter() - start, stages, result.found))
    rows, totals = [], {}
    for label, _, precision in paths:
        first, *rest = runs[label]
        for name, chosen in (("first image", [first]), (f"next {len(rest)}, median", rest)):
            total = statistics.median(r[0] for r in chosen)
            m2ib = statistics.median(r[1].get("saliency", 0.0) for r in chosen)
            encoder = statistics.median(r[1].get("encoding image (SAM)", 0.0) for r in chosen)
            totals[label, name] = total
            rows.append(f"| {label} | {resolve_precision(precision, 'cpu')} | {name} | "
                        f"{m2ib:.2f} | {encoder:.2f} | **{total:.2f}** | "
                        f"{'yes' if all(r[2] for r in chosen) else 'no'} |")
    ratios = [totals[paths[0][0], name] / totals[paths[1][0], name]
              for name in ("first image", f"next {images - 1}, median")]
    return ["| path | precision | image | M2IB s | SAM encoder s | first mask s | found |",
            "|---|---|---|---:|---:|---:|---|", *rows, "",
            f"Speed-up: **{ratios[0]:.1f}x** on the first image, **{ratios[1]:.1f}x** on the "
            "next ones."]


def volume(clip, rng, depth: int, side: int, sample: int) -> list[str]:
    vol = np.stack([_image(rng, side) for _ in range(depth)])
    today = _pipeline(clip, "vit_b", "fp32")
    picks = list(np.linspace(0, depth - 1, sample).round().astype(int))
    start = time.perf_counter()
    today.segment_volume(vol, PROMPT, slices=picks)
    per_slice = (time.perf_counter() - start) / len(picks)
    all_slices = per_slice * depth
    light = _pipeline(clip, "sam2_t", "auto")
    marks: dict[str, float] = {}
    start = time.perf_counter()

    def progress(stage: str, fraction: float) -> None:
        key = stage.split(":")[0].split(" z=")[0]
        marks.setdefault(key, time.perf_counter() - start)

    result = light.propagate_volume(vol, PROMPT, progress=progress)
    total = time.perf_counter() - start
    prop = result.propagation
    size = light.propagation_model(vol.shape[1:]).model.image_size
    rank_s = marks.get("seed slice", total)
    seed_s = marks.get("propagating", total) - rank_s
    prop_s = total - marks.get("propagating", total)
    return [
        "| path | s | per slice s |", "|---|---:|---:|",
        f"| today: All slices, ViT-B fp32 (timed on {len(picks)} slices, x{depth}) | "
        f"{all_slices:.0f} | {per_slice:.2f} |",
        f"| propagation, SAM 2.1 tiny at {size}x{size}, bf16: total | **{total:.0f}** | "
        f"{total / depth:.2f} |",
        f"| - ranking {depth} slices with CLIP | {rank_s:.1f} | |",
        f"| - the chain on the seed slice (z={result.found_slices}) | {seed_s:.1f} | |",
        f"| - propagation through {len(prop.propagated)} slices | {prop_s:.1f} | "
        f"{prop_s / max(len(prop.propagated), 1):.2f} |",
        "", f"Speed-up: **{all_slices / total:.1f}x**.",
    ]


def reprompt(repeats: int = 30) -> list[str]:
    import torch

    from napari_medclipsam.core.models import SamBundle, build_sam
    from napari_medclipsam.core.sam import make_session

    torch.manual_seed(0)
    bundle = SamBundle(build_sam("sam2_t").eval().requires_grad_(False), "sam2_t", "cpu",
                       None, None)
    image = (np.random.default_rng(0).random((512, 512, 3)) * 255).astype(np.uint8)
    rows = []
    for precision in ("fp32", "bf16"):
        sessions = {fast: make_session(bundle, precision=precision) for fast in (False, True)}
        sessions[False].fast = False  # sam2's own decoder, through SAM2ImagePredictor
        start = time.perf_counter()
        sessions[True].set_image(image)
        encode = time.perf_counter() - start
        sessions[False].set_image(image)
        points = np.random.default_rng(1).uniform(150, 300, (10, 2))
        times = {(fast, name): [] for fast in (False, True)
                 for name in ("1 box", "2 boxes", "1 box + 10 points")}
        for i in range(repeats + 2):
            shift = i % 7
            cases = {
                "1 box": dict(boxes=[[100 + shift, 120, 300, 330]]),
                "2 boxes": dict(boxes=[[100 + shift, 120, 300, 330], [320, 40, 480, 200]]),
                "1 box + 10 points": dict(boxes=[[100 + shift, 120, 300, 330]], points=points,
                                          point_labels=np.ones(10, int)),
            }
            for fast, session in sessions.items():  # interleaved: the same machine load
                for name, kwargs in cases.items():
                    t0 = time.perf_counter()
                    session.set_image(image)
                    session.predict(**kwargs)
                    if i >= 2:
                        times[fast, name].append(1000 * (time.perf_counter() - t0))
        for (fast, name), values in times.items():
            decoder = "ours, fp32" if fast else f"sam2's, {precision}"
            rows.append(f"| {precision} (encoder {encode:.2f} s) | {decoder} | {name} | "
                        f"**{statistics.median(values):.1f}** | {min(values):.1f} | "
                        f"{max(values):.1f} |")
    return ["| session | decoder | prompt | median ms | min ms | max ms |",
            "|---|---|---|---:|---:|---:|",
            *rows]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="first,volume,reprompt")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--depth", type=int, default=155)
    parser.add_argument("--side", type=int, default=240)
    parser.add_argument("--all-slices-sample", type=int, default=3)
    args = parser.parse_args(argv)

    import torch
    from bench_m2ib import build_random_biomedclip

    torch.set_num_threads(args.threads)
    cases = args.cases.split(",")
    print(f"Machine: {platform.machine()} {platform.processor() or ''}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"Python {platform.python_version()}\n")
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        clip = build_random_biomedclip(Path(tmp)) if {"first", "volume"} & set(cases) else None
        if "first" in cases:
            print("### Time to first mask (512x512)\n")
            print("\n".join(first_mask(clip, rng)) + "\n")
        if "volume" in cases:
            print(f"### Volume {args.depth}x{args.side}x{args.side}\n")
            print("\n".join(volume(clip, rng, args.depth, args.side,
                                   args.all_slices_sample)) + "\n")
    if "reprompt" in cases:
        print("### SAM 2.1 tiny re-prompt (512x512, cached embedding)\n")
        print("\n".join(reprompt()) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
