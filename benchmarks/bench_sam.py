"""Time SAM prompting from a cached image embedding (full-size ViT-B, random weights, CPU).

    python benchmarks/bench_sam.py [--repeats 20] [--size 512] [--threads 2] [--model vit_b]

Measures the first prompt (image encoder + decoder) and re-prompts answered from
:class:`~napari_medclipsam.core.sam.SamSession`'s cache (prompt encoder + mask decoder +
upsampling to the image size), for one box, two boxes, and one box with 10 points. Random
weights time exactly like trained ones; nothing is downloaded. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGET_MS = 50.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20, help="re-prompts timed per case")
    parser.add_argument("--size", type=int, default=512, help="image side (pixels)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--model", default="vit_b", choices=("vit_b", "vit_l", "vit_h"))
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.size < 8:
        parser.error("--repeats must be >= 1 and --size >= 8")

    import torch
    from segment_anything import sam_model_registry

    from napari_medclipsam.core.sam import SamSession

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    sam = sam_model_registry[args.model](checkpoint=None).eval().requires_grad_(False)
    session = SamSession(sam, f"{args.model}:random")
    size = args.size
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)

    def box(shift: int) -> np.ndarray:
        x0 = size * 0.2 + shift % (size // 4)
        y0 = size * 0.25 + (3 * shift) % (size // 4)
        return np.array([x0, y0, x0 + size * 0.4, y0 + size * 0.35])

    start = time.perf_counter()
    session.set_image(image)
    encode_ms = (time.perf_counter() - start) * 1e3
    start = time.perf_counter()
    session.predict(boxes=box(0)[None])
    first_decode_ms = (time.perf_counter() - start) * 1e3

    points = rng.uniform(size * 0.25, size * 0.6, (10, 2))
    labels = np.array([1] * 7 + [0] * 3)
    cases = {
        "1 box": lambda i: {"boxes": box(i)[None]},
        "2 boxes (batched)": lambda i: {"boxes": np.stack([box(i), box(i + 37) * 0.5])},
        "1 box + 10 points": lambda i: {"boxes": box(i)[None], "points": points + i % 5,
                                        "point_labels": labels},
        "1 box, multimask": lambda i: {"boxes": box(i)[None], "multimask_output": True},
    }
    calls_before = session.encoder_calls

    def time_cases(names) -> dict[str, list[float]]:
        timings = {}
        for name in names:
            make = cases[name]
            for i in range(2):  # warm-up
                session.set_image(image)
                session.predict(**make(i))
            times = []
            for i in range(args.repeats):
                prompt = make(i + 1)
                start = time.perf_counter()
                session.set_image(image)  # cache hit: hashes the image, restores the embedding
                session.predict(**prompt)
                times.append((time.perf_counter() - start) * 1e3)
            timings[name] = times
        return timings

    timings = time_cases(cases)
    session.fast = False  # segment-anything's MaskDecoder itself, on the same cached embedding
    stock = time_cases(["1 box", "2 boxes (batched)"])
    # Agreement of the two decoders on the same prompts (random weights, full size).
    prompts = [cases["1 box"](3), cases["2 boxes (batched)"](5), cases["1 box + 10 points"](7)]
    stock_logits = [session.predict(**p, return_logits=True) for p in prompts]
    session.fast = True
    fast_logits = [session.predict(**p, return_logits=True) for p in prompts]
    pairs = list(zip(fast_logits, stock_logits, strict=True))
    max_diff = max(float(np.abs(a - b).max()) for a, b in pairs)
    scale = max(float(np.abs(b).mean()) for b in stock_logits)
    flipped = sum(int(((a > 0) != (b > 0)).sum()) for a, b in pairs)
    assert session.encoder_calls == calls_before, "a re-prompt ran the image encoder"

    hash_times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        session.set_image(image)
        hash_times.append((time.perf_counter() - start) * 1e3)

    print(f"SAM {args.model} (random weights), image {size}x{size}x3 uint8, CPU "
          f"({platform.processor() or platform.machine()}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.repeats} re-prompts per row\n")
    print("| step | median ms | min ms | max ms |")
    print("|---|---:|---:|---:|")
    print(f"| first prompt: set_image (encoder) | {encode_ms:.0f} | | |")
    print(f"| first prompt: predict(1 box), incl. per-image decoder cache | "
          f"{first_decode_ms:.1f} | | |")
    print(f"| first prompt: total | {encode_ms + first_decode_ms:.0f} | | |")
    print(f"| cache hit: set_image (hash + restore) | {statistics.median(hash_times):.2f} | "
          f"{min(hash_times):.2f} | {max(hash_times):.2f} |")
    for label, table in (("", timings), (", stock MaskDecoder", stock)):
        for name, times in table.items():
            print(f"| re-prompt: set_image (cached) + predict({name}){label} | "
                  f"{statistics.median(times):.1f} | {min(times):.1f} | {max(times):.1f} |")
    print(f"\nfast vs stock decoder: max |logit difference| {max_diff:.2e} (mean |logit| "
          f"{scale:.2f}), mask pixels that differ: {flipped} of {3 * size * size}")
    worst = statistics.median(timings["1 box"])
    verdict = "meets" if worst < TARGET_MS else "misses"
    print(f"\nre-prompt median (1 box) {worst:.1f} ms {verdict} the {TARGET_MS:.0f} ms target; "
          f"encoder calls: {session.encoder_calls}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
