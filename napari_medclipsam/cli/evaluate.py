"""``medclipsam evaluate``: DSC and NSD of a folder of predicted masks against ground truth.

The scoring is :func:`napari_medclipsam.core.evaluate.evaluate_folders`; this module parses the
flags, prints the table and writes ``evaluation.csv`` and ``evaluation.json``.

The NSD tolerance is in millimetres for masks that carry a spacing (NIfTI header zooms, DICOM
PixelSpacing) and in pixels for those that do not (PNG, JPEG, TIFF, BMP); ``--spacing``
replaces the files' spacing. The summary line says which was used. The output files are
checked before any scoring: an existing one is replaced only with ``--overwrite``, an input
mask never."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import CLIError, check_writable_folder

__all__ = ["add_parser", "run_evaluate"]


def _spacing(text: str) -> float | tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected one number or one per axis separated by commas (e.g. 1.5 or 3,0.8,0.8); "
            f"got {text!r}") from None
    return values[0] if len(values) == 1 else values


def add_parser(sub) -> None:
    """Register ``evaluate`` on the top-level subparsers."""
    ev = sub.add_parser("evaluate", help="DSC and NSD of predicted masks against ground truth.")
    ev.add_argument("--pred", required=True, metavar="DIR", help="predicted masks.")
    ev.add_argument("--gt", required=True, metavar="DIR", help="ground-truth masks.")
    ev.add_argument("-o", "--out", metavar="CSV",
                    help="where to save per-image scores, with the same name ending .json "
                         "beside it (default PRED/evaluation.csv).")
    ev.add_argument("--overwrite", action="store_true",
                    help="replace existing output files (an input mask is never replaced).")
    ev.add_argument("--tolerance", type=float, default=2.0,
                    help="NSD tolerance (default 2): in mm for masks with a spacing in their "
                         "header (NIfTI, DICOM), in pixels for masks without (PNG, TIFF...).")
    ev.add_argument("--spacing", type=_spacing, default=None, metavar="S[,S...]",
                    help="use this spacing for every mask instead of the files' own: one "
                         "value or one per axis in array order (Z,Y,X); the tolerance is then "
                         "in its units.")
    ev.set_defaults(func=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> int:
    from ..core.evaluate import (
        OutputExistsError,
        evaluate_folders,
        evaluation_paths,
        list_masks,
        write_evaluation,
    )

    pred_dir, gt_dir = Path(args.pred), Path(args.gt)
    for d, flag in ((pred_dir, "--pred"), (gt_dir, "--gt")):
        if not d.is_dir():
            raise CLIError(f"{flag} {d}: not a folder.")
    gts = list_masks(gt_dir)
    if not gts:
        raise CLIError(f"--gt {gt_dir}: no mask files found.")
    inputs = [*gts.values(), *list_masks(pred_dir).values()]
    out = Path(args.out) if args.out else pred_dir / "evaluation.csv"
    overwrite = bool(getattr(args, "overwrite", False))
    try:   # before any scoring: fail before the work, not after it
        evaluation_paths(out, overwrite=overwrite, inputs=inputs)
        check_writable_folder(out.parent)
    except OutputExistsError as exc:
        raise CLIError(f"{exc.path} already exists; pass --overwrite to replace it, or choose "
                       "another file with -o.") from exc
    result = evaluate_folders(pred_dir, gt_dir, tolerance=args.tolerance, spacing=args.spacing)
    rows = result.rows
    width = max(len("image"), *(len(r.name) for r in rows))
    print(f"{'image':<{width}}  {'DSC':>7}  {'NSD':>7}")
    for r in rows:
        note = "" if r.status == "ok" else f"  {r.status}"
        print(f"{r.name:<{width}}  {r.dsc:7.4f}  {r.nsd:7.4f}{note}")
    print(f"{'mean':<{width}}  {result.mean_dsc:7.4f}  {result.mean_nsd:7.4f}   "
          f"({len(rows)} images)")
    print(result.describe_nsd())
    print_warnings(result)
    try:
        out_csv, out_json = write_evaluation(result, out, overwrite=overwrite)
    except OutputExistsError as exc:
        raise CLIError(f"{exc.path} appeared while scoring; nothing replaced. Pass --overwrite "
                       "to replace it, or choose another file with -o.") from exc
    print(f"Saved {out_csv} and {out_json}")
    return 0


def print_warnings(result, *, explain_missing: bool = False) -> None:
    """On stderr: an :class:`~napari_medclipsam.core.evaluate.EvaluationResult`'s notes, its
    ground truths without a prediction and its predictions without a ground truth (at most 10
    names each). ``explain_missing`` adds that a missing prediction is scored as empty (for
    a command that prints no per-image table saying so)."""
    for note in result.notes:
        print(f"warning: {note}", file=sys.stderr)
    if result.missing:
        how = " (scored as empty)" if explain_missing else ""
        print(f"warning: {len(result.missing)} ground-truth mask(s) have no prediction{how}: "
              f"{', '.join(result.missing[:10])}", file=sys.stderr)
    if result.ignored:
        print(f"warning: {len(result.ignored)} prediction(s) have no ground truth and were "
              f"ignored: {', '.join(result.ignored[:10])}", file=sys.stderr)
