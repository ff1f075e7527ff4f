"""``medclipsam evaluate``: DSC and NSD of a folder of predicted masks against ground truth.

The scoring is :func:`napari_medclipsam.core.evaluate.evaluate_folders`; this module parses the
flags, prints the table and writes ``evaluation.csv`` and ``evaluation.json``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import CLIError

__all__ = ["add_parser", "run_evaluate"]


def add_parser(sub) -> None:
    """Register ``evaluate`` on the top-level subparsers."""
    ev = sub.add_parser("evaluate", help="DSC and NSD of predicted masks against ground truth.")
    ev.add_argument("--pred", required=True, metavar="DIR", help="predicted masks.")
    ev.add_argument("--gt", required=True, metavar="DIR", help="ground-truth masks.")
    ev.add_argument("-o", "--out", metavar="CSV",
                    help="where to save per-image scores (default PRED/evaluation.csv).")
    ev.add_argument("--tolerance", type=float, default=2.0,
                    help="NSD tolerance in pixels (default 2).")
    ev.add_argument("--spacing", type=float, default=1.0, help="pixel spacing (default 1).")
    ev.set_defaults(func=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> int:
    from ..core.evaluate import evaluate_folders, list_masks, write_evaluation

    pred_dir, gt_dir = Path(args.pred), Path(args.gt)
    for d, flag in ((pred_dir, "--pred"), (gt_dir, "--gt")):
        if not d.is_dir():
            raise CLIError(f"{flag} {d}: not a folder.")
    if not list_masks(gt_dir):
        raise CLIError(f"--gt {gt_dir}: no mask files found.")
    result = evaluate_folders(pred_dir, gt_dir, tolerance=args.tolerance, spacing=args.spacing)
    rows = result.rows
    width = max(len(r.name) for r in rows)
    print(f"{'image':<{width}}  {'DSC':>7}  {'NSD':>7}")
    for r in rows:
        note = "" if r.status == "ok" else f"  {r.status}"
        print(f"{r.name:<{width}}  {r.dsc:7.4f}  {r.nsd:7.4f}{note}")
    print(f"{'mean':<{width}}  {result.mean_dsc:7.4f}  {result.mean_nsd:7.4f}   ({len(rows)} "
          f"images, NSD tolerance {args.tolerance:g} px, spacing {args.spacing:g})")
    if result.missing:
        print(f"warning: {len(result.missing)} ground-truth mask(s) have no prediction: "
              f"{', '.join(result.missing[:10])}", file=sys.stderr)
    if result.ignored:
        print(f"warning: {len(result.ignored)} prediction(s) have no ground truth and were "
              f"ignored: {', '.join(result.ignored[:10])}", file=sys.stderr)
    out_csv, out_json = write_evaluation(
        result, Path(args.out) if args.out else pred_dir / "evaluation.csv")
    print(f"Saved {out_csv} and {out_json}")
    return 0
