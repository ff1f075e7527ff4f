"""``medclipsam evaluate``: DSC and NSD of a folder of predicted masks against ground truth."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

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


def _read_mask(path: Path) -> np.ndarray:
    from ..core.io import read_image

    return np.asarray(read_image(path).data) > 0


def run_evaluate(args: argparse.Namespace) -> int:
    from ..core.io import SUPPORTED, file_stem, write_text
    from ..core.metrics import dice, nsd, resize_nearest

    pred_dir, gt_dir = Path(args.pred), Path(args.gt)
    for d, flag in ((pred_dir, "--pred"), (gt_dir, "--gt")):
        if not d.is_dir():
            raise CLIError(f"{flag} {d}: not a folder.")

    def index(d: Path) -> dict[str, Path]:
        return {file_stem(p): p for p in sorted(d.iterdir())
                if p.is_file() and p.name.lower().endswith(SUPPORTED)
                and not p.name.startswith(".")}

    preds, gts = index(pred_dir), index(gt_dir)
    if not gts:
        raise CLIError(f"--gt {gt_dir}: no mask files found.")
    common = sorted(set(preds) & set(gts))
    if not common:
        raise CLIError(f"No file names in common between {pred_dir} and {gt_dir}; predictions "
                       "are paired with ground truth by name.")
    missing = sorted(set(gts) - set(preds))
    extra = sorted(set(preds) - set(gts))
    rows = []
    for name in sorted(gts):
        gt = _read_mask(gts[name])
        if name in preds:
            pred = _read_mask(preds[name])
            if pred.ndim == 3 and gt.ndim == 2 and pred.shape[-1] in (3, 4):
                pred = pred.any(axis=-1)
            if pred.shape != gt.shape:
                pred = resize_nearest(pred, gt.shape)
            status = "ok"
        else:
            pred = np.zeros_like(gt)
            status = "missing prediction (scored as empty)"
        rows.append({"name": name, "dsc": dice(pred, gt),
                     "nsd": nsd(pred, gt, tolerance=args.tolerance, spacing=args.spacing),
                     "status": status})
    mean_dsc = float(np.mean([r["dsc"] for r in rows]))
    mean_nsd = float(np.mean([r["nsd"] for r in rows]))
    width = max(len(r["name"]) for r in rows)
    print(f"{'image':<{width}}  {'DSC':>7}  {'NSD':>7}")
    for r in rows:
        note = "" if r["status"] == "ok" else f"  {r['status']}"
        print(f"{r['name']:<{width}}  {r['dsc']:7.4f}  {r['nsd']:7.4f}{note}")
    print(f"{'mean':<{width}}  {mean_dsc:7.4f}  {mean_nsd:7.4f}   ({len(rows)} images, NSD "
          f"tolerance {args.tolerance:g} px, spacing {args.spacing:g})")
    if missing:
        print(f"warning: {len(missing)} ground-truth mask(s) have no prediction: "
              f"{', '.join(missing[:10])}", file=sys.stderr)
    if extra:
        print(f"warning: {len(extra)} prediction(s) have no ground truth and were ignored: "
              f"{', '.join(extra[:10])}", file=sys.stderr)
    out = Path(args.out) if args.out else pred_dir / "evaluation.csv"
    lines = ["name,dsc,nsd,status"] + [f"{r['name']},{r['dsc']:.6f},{r['nsd']:.6f},{r['status']}"
                                       for r in rows]
    lines.append(f"mean,{mean_dsc:.6f},{mean_nsd:.6f},{len(rows)} images")
    write_text(out, "\n".join(lines) + "\n")
    write_text(out.with_suffix(".json"), json.dumps(
        {"mean_dsc": mean_dsc, "mean_nsd": mean_nsd, "tolerance": args.tolerance,
         "spacing": args.spacing, "images": rows, "missing": missing, "ignored": extra},
        indent=2))
    print(f"Saved {out} and {out.with_suffix('.json')}")
    return 0
