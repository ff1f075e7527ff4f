"""Time the vectorised contrastive losses against the brute-force loop reference (CPU).

    python benchmarks/bench_losses.py [--batch 64 512] [--dim 512] [--repeats 20]
                                      [--brute-repeats 3] [--threads 2]

For each loss of :data:`napari_medclipsam.finetune.losses.LOSSES` and each batch size,
times one forward + backward pass from random ``[B, D]`` float32 image and text features
(normalisation, similarity and loss) for the vectorised code and for the Python double loop
over the paper's sums in ``tests/loss_reference.py`` (the tests' reference). The brute force
is timed on fewer repeats (``--brute-repeats``; once at B >= 256, where one pass takes many
seconds, and the autograd graph of ~10^7 scalar nodes needs about 9 GB of memory at B=512).
Prints a Markdown table of medians and their ratio.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def _time(fn, img, txt, repeats: int, warmup: int) -> float:
    """Median seconds of ``fn(img, txt).backward()`` over ``repeats`` runs."""
    times = []
    for k in range(warmup + repeats):
        a = img.detach().requires_grad_(True)
        b = txt.detach().requires_grad_(True)
        start = time.perf_counter()
        fn(a, b).backward()
        elapsed = time.perf_counter() - start
        if k >= warmup:
            times.append(elapsed)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--dim", type=int, default=512, help="feature dimension D")
    parser.add_argument("--repeats", type=int, default=20, help="timed vectorised passes")
    parser.add_argument("--brute-repeats", type=int, default=3,
                        help="timed brute-force passes (1 at B >= 256)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--losses", nargs="+", default=None,
                        help="subset of: infonce dcl hn-nce dhn-nce (default: all)")
    args = parser.parse_args(argv)
    if min(args.batch) < 2 or args.dim < 1 or args.repeats < 1 or args.brute_repeats < 1:
        parser.error("--batch must be >= 2, --dim, --repeats and --brute-repeats >= 1")

    import torch
    from loss_reference import reference_loss

    from napari_medclipsam.finetune.losses import LOSSES

    names = args.losses or list(LOSSES)
    unknown = [n for n in names if n not in LOSSES]
    if unknown:
        parser.error(f"unknown loss(es) {unknown}; choose from {list(LOSSES)}")

    torch.set_num_threads(args.threads)
    print(f"# contrastive losses, forward + backward, float32, D={args.dim}, CPU "
          f"({platform.processor() or platform.machine()}), torch {torch.__version__}, "
          f"{args.threads} threads\n")
    print("| loss | B | vectorised ms (median) | brute-force loop ms (median, runs) "
          "| speed-up |")
    print("|---|---:|---:|---:|---:|")
    for batch in args.batch:
        g = torch.Generator().manual_seed(batch)
        img = torch.randn(batch, args.dim, generator=g)
        txt = torch.randn(batch, args.dim, generator=g)
        brute_runs = 1 if batch >= 256 else args.brute_repeats
        for name in names:
            fast = _time(LOSSES[name], img, txt, args.repeats, warmup=2)

            def brute(a, b, name=name):
                return reference_loss(name, a, b)

            slow = _time(brute, img, txt, brute_runs, warmup=0)
            print(f"| {name} | {batch} | {fast * 1e3:.3f} | {slow * 1e3:,.0f} ({brute_runs}) "
                  f"| {slow / fast:,.0f}x |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
