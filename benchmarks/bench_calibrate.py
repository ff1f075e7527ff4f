"""Cost of ``medclipsam calibrate`` on a CPU with full-size random-weight models (issue 13).

    python benchmarks/bench_calibrate.py [--cases 20] [--checkpoints 5,10,20] [--size 512]
        [--grid-cases 3] [--threads 2]

Models: BiomedCLIP's exact architecture (``bench_m2ib.build_random_biomedclip``) and SAM 2.1
hiera tiny (the CPU default) built by ``sam2``'s own config, random weights: the compute of the
released models, nothing downloaded. Precision "auto" (bf16 where the CPU has it).
Images: ``--size`` x ``--size`` grey images with one or two bright blobs, their "corrected"
masks the blobs.

Two measurements, printed as Markdown for ``benchmarks/RESULTS.md``:

1. **Cases**: one :func:`~napari_medclipsam.core.calibrate.calibrate` run on ``--cases`` cases
   with the default grid (M2IB layers 7,8,9 x betas 0.1,1,2; otsu, kmeans; eta_c 0, 0.5; top-1,
   top-2; single / per-component boxes, margin 0 / 2%, or points: 360 combinations), its time
   split into saliency, SAM encoder and post-processing (of which SAM's decoder), and the
   cumulative time after each ``--checkpoints`` case (the same run, read as it goes: cases are
   independent, so this is the cost of calibrating on that many). Cross-validation (5 folds) is
   timed on the first 5, 10, ... rows of the table.
2. **Post-processing grid**: on ``--grid-cases`` other cases, the same 9 saliency maps with the
   small post-processing grid (otsu, kmeans x top-1, top-2 x single, per-component boxes: 8 per
   map) and the default one (40 per map): post-processing milliseconds per combination and
   case, which the caches (one threshold per map and method, one component labelling per
   (threshold, eta_c, top-K), SAM's decoder once per distinct prompt set) keep nearly flat.
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

PROMPT = "breast tumor"


def _case(rng: np.random.Generator, side: int, name: str):
    """A grey image with one or two bright blobs; the corrected mask is the blobs."""
    from napari_medclipsam.core.calibrate import CalibrationCase

    yy, xx = np.mgrid[:side, :side]
    field = np.zeros((side, side))
    for _ in range(int(rng.integers(1, 3))):
        cy, cx = rng.uniform(0.25, 0.75, 2) * side
        r = rng.uniform(0.05, 0.12) * side
        field = np.maximum(field, np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r)))
    image = (0.3 * rng.random((side, side)) + field).clip(0, 1.3) / 1.3
    rgb = np.repeat((255 * image).astype(np.uint8)[..., None], 3, axis=2)
    return CalibrationCase(name, rgb, field > 0.5, (PROMPT,))


def _pipeline(clip):
    import torch

    from napari_medclipsam.core.config import PipelineConfig
    from napari_medclipsam.core.models import SamBundle, build_sam
    from napari_medclipsam.core.pipeline import ZeroShotPipeline

    torch.manual_seed(0)
    model = build_sam("sam2_t").eval().requires_grad_(False)
    bundle = SamBundle(model, "sam2_t", "cpu", None, None)
    config = PipelineConfig(sam_model="sam2_t", device="cpu", precision="auto")
    return ZeroShotPipeline(config, clip=clip, sam=bundle)


def cases_run(pipe, cases, checkpoints: list[int]) -> list[str]:
    from napari_medclipsam.core.calibrate import DiceTable, SearchSpace, calibrate, cross_validate

    starts: dict[int, float] = {}
    t0 = time.perf_counter()

    def progress(stage: str, fraction: float) -> None:
        if stage.startswith("case "):
            i = int(stage.split()[1].split("/")[0])
            starts.setdefault(i, time.perf_counter() - t0)
        elif stage == "Dice table done":
            starts.setdefault(len(cases) + 1, time.perf_counter() - t0)

    result = calibrate(pipe, cases, SearchSpace(), folds=min(5, len(cases)), seed=0,
                       progress=progress)
    total = time.perf_counter() - t0
    table, stats = result.table, result.table.stats
    n, m = len(cases), len(table.combinations)
    ends = {i: starts[i + 1] for i in starts if i + 1 in starts}  # case i ends as i+1 starts
    cv_times = {}
    for k in checkpoints:
        sub = DiceTable(table.names[:k], table.combinations, table.values[:k],
                        table.prompt_options, table.base)
        t1 = time.perf_counter()
        cross_validate(sub, min(5, k), 0)
        cv_times[k] = time.perf_counter() - t1
    post = stats["postprocess_s"]
    rows = [
        f"Default grid: {m} combinations, {int(stats['saliency_maps'] / n)} saliency maps per "
        f"case, {n} cases ({cases[0].image.shape[0]}x{cases[0].image.shape[1]}), "
        f"precision {pipe.precision}, total {total:.0f} s.",
        "",
        "| stage | total (s) | per case (s) | share |",
        "|---|---:|---:|---:|",
    ]
    for label, seconds in (("saliency (M2IB, one m2ib_saliencies call per case)",
                            stats["saliency_s"]),
                           ("SAM 2.1 tiny image encoder (once per case)", stats["sam_encoder_s"]),
                           ("post-processing, all combinations", post),
                           ("  of which thresholds (Otsu, KMeans: once per map and method)",
                            stats["threshold_s"]),
                           ("  of which SAM decoder "
                            f"({int(stats['sam_decoder_calls'])} calls for {n * m} entries)",
                            stats["sam_decoder_s"])):
        rows.append(f"| {label} | {seconds:.1f} | {seconds / n:.2f} | {seconds / total:.0%} |")
    rows += ["", f"Post-processing per combination and case: {1000 * post / (n * m):.1f} ms.",
             "", "| cases | cumulative time (s) | per case (s) | cross-validation (ms) |",
             "|---:|---:|---:|---:|"]
    for k in checkpoints:
        end = ends[k]
        rows.append(f"| {k} | {end:.0f} | {end / k:.1f} | {1000 * cv_times[k]:.1f} |")
    chosen = result.combination.describe(table.prompt_options)
    rows += ["", f"(random weights: chosen {chosen}; CV Dice {result.cv.tuned_dice:.3f} vs "
                 f"defaults {result.cv.default_dice:.3f}, meaningless here)"]
    return rows


def grid_run(pipe, cases) -> list[str]:
    from napari_medclipsam.core.calibrate import SearchSpace, dice_table

    small = SearchSpace(eta_cs=(0.0,), box_margins=(0.0,), prompt_modes=("boxes",))
    rows = ["| post-processing grid | combinations (per map) | saliency (s/case) | "
            "SAM encoder (s/case) | post-processing (s/case) | of which thresholds (s/case) | "
            "ms per combination | SAM decoder calls per case |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, space in (("small", small), ("default", SearchSpace())):
        pipe.session.clear_cache()  # each grid pays its own encoder runs
        t = dice_table(pipe, cases, space)
        s, n, m = t.stats, len(cases), len(t.combinations)
        rows.append(f"| {label} | {m} ({m // 9}) | {s['saliency_s'] / n:.1f} | "
                    f"{s['sam_encoder_s'] / n:.2f} | {s['postprocess_s'] / n:.2f} | "
                    f"{s['threshold_s'] / n:.2f} | "
                    f"{1000 * s['postprocess_s'] / (n * m):.1f} | "
                    f"{s['sam_decoder_calls'] / n:.0f} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--checkpoints", default="5,10,20")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--grid-cases", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip", choices=("cases", "grid"), default=None)
    args = parser.parse_args(argv)

    import torch
    from bench_m2ib import build_random_biomedclip

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    checkpoints = [k for k in (int(v) for v in args.checkpoints.split(",")) if k <= args.cases]
    with tempfile.TemporaryDirectory() as tmp:
        clip = build_random_biomedclip(Path(tmp))
        pipe = _pipeline(clip)
        print(f"# calibrate, BiomedCLIP + SAM 2.1 tiny (random weights), "
              f"{platform.processor() or platform.machine()}, {args.threads} threads, "
              f"torch {torch.__version__}")
        if args.skip != "cases":
            cases = [_case(rng, args.size, f"case{i:02d}") for i in range(args.cases)]
            print("\n".join(cases_run(pipe, cases, checkpoints)), flush=True)
        if args.skip != "grid":
            cases = [_case(rng, args.size, f"grid{i:02d}") for i in range(args.grid_cases)]
            print()
            print("\n".join(grid_run(pipe, cases)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
