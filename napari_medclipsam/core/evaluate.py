"""Folder evaluation: predicted masks against ground truth, paired by file name.

Every ground-truth mask is scored (DSC and NSD, :mod:`napari_medclipsam.core.metrics`); a
ground truth without a prediction counts as an empty prediction, a prediction without a
ground truth is ignored and listed. Pairing is by file name without suffix
(``case_01.png`` <-> ``case_01.nii.gz``), never by listing order.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError

__all__ = ["EvaluationResult", "ImageScore", "evaluate_folders", "list_masks", "read_mask",
           "score_masks", "write_evaluation"]

#: Status of a ground-truth mask that has a prediction.
OK = "ok"
#: Status of a ground-truth mask without a prediction (scored against an empty mask).
MISSING = "missing prediction (scored as empty)"


@dataclass(frozen=True)
class ImageScore:
    """The scores of one ground-truth mask.

    Attributes
    ----------
    name : str
        File name without suffix, shared by the prediction and the ground truth.
    dsc, nsd : float
        In [0, 1].
    status : str
        ``"ok"``, or ``"missing prediction (scored as empty)"``.
    """

    name: str
    dsc: float
    nsd: float
    status: str = OK


@dataclass(frozen=True)
class EvaluationResult:
    """Scores of a folder of predictions, one row per ground-truth mask (sorted by name).

    Attributes
    ----------
    rows : list of ImageScore
    mean_dsc, mean_nsd : float
        Means over ``rows`` (missing predictions count as 0 unless the ground truth is empty).
    missing : list of str
        Ground-truth names without a prediction.
    ignored : list of str
        Prediction names without a ground truth (not scored).
    tolerance : float
        NSD tolerance, in ``spacing`` units.
    spacing : float or sequence of float
        Pixel spacing the NSD used.
    """

    rows: list[ImageScore]
    mean_dsc: float
    mean_nsd: float
    missing: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    tolerance: float = 2.0
    spacing: float | Sequence[float] = 1.0

    def to_csv(self) -> str:
        """``name,dsc,nsd,status`` per image, then a ``mean`` row (6 decimals)."""
        lines = ["name,dsc,nsd,status"]
        lines += [f"{r.name},{r.dsc:.6f},{r.nsd:.6f},{r.status}" for r in self.rows]
        lines.append(f"mean,{self.mean_dsc:.6f},{self.mean_nsd:.6f},{len(self.rows)} images")
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary: means, parameters, per-image rows, missing and ignored names."""
        spacing = self.spacing if np.ndim(self.spacing) == 0 else list(self.spacing)
        return {"mean_dsc": self.mean_dsc, "mean_nsd": self.mean_nsd,
                "tolerance": self.tolerance, "spacing": spacing,
                "images": [asdict(r) for r in self.rows], "missing": list(self.missing),
                "ignored": list(self.ignored)}


def list_masks(folder: str | Path) -> dict[str, Path]:
    """Supported mask files of ``folder`` (not hidden ones), keyed by name without suffix.

    Raises
    ------
    InputError
        If ``folder`` is not a folder.
    """
    from .io import SUPPORTED, file_stem

    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder.")
    return {file_stem(p): p for p in sorted(folder.iterdir())
            if p.is_file() and p.name.lower().endswith(SUPPORTED)
            and not p.name.startswith(".")}


def read_mask(path: str | Path) -> np.ndarray:
    """A mask file as a bool array (values > 0 are foreground), (H, W), (H, W, C) or (Z, Y, X)."""
    from .io import read_image

    return np.asarray(read_image(path).data) > 0


def score_masks(pred: np.ndarray, gt: np.ndarray, *, tolerance: float = 2.0,
                spacing: float | Sequence[float] = 1.0) -> tuple[float, float]:
    """DSC and NSD of one prediction against its ground truth, as the folder evaluation does.

    A colour (H, W, 3|4) prediction of a 2-D ground truth counts a pixel as foreground if any
    channel is; a prediction of another size is resized to the ground truth's (nearest).

    Returns
    -------
    (dsc, nsd) : tuple of float
    """
    from .metrics import dice, nsd, resize_nearest

    pred, gt = np.asarray(pred) > 0, np.asarray(gt) > 0
    if pred.ndim == 3 and gt.ndim == 2 and pred.shape[-1] in (3, 4):
        pred = pred.any(axis=-1)
    if pred.ndim != gt.ndim:
        raise InputError(f"the prediction is {pred.ndim}-D {pred.shape} but the ground truth is "
                         f"{gt.ndim}-D {gt.shape}.")
    if pred.shape != gt.shape:
        pred = resize_nearest(pred, gt.shape)
    return dice(pred, gt), nsd(pred, gt, tolerance=tolerance, spacing=spacing)


def evaluate_folders(pred_dir: str | Path, gt_dir: str | Path, *, tolerance: float = 2.0,
                     spacing: float | Sequence[float] = 1.0) -> EvaluationResult:
    """Score every ground-truth mask of ``gt_dir`` against the same-name prediction.

    Parameters
    ----------
    pred_dir, gt_dir : str or Path
        Folders of mask files (PNG/JPEG/TIFF, NIfTI, DICOM); values > 0 are foreground.
    tolerance : float
        NSD tolerance in ``spacing`` units (the paper: 2 pixels).
    spacing : float or sequence of float
        Pixel spacing, one value or one per axis.

    Returns
    -------
    EvaluationResult
        Rows sorted by name; missing predictions are scored against an empty mask.

    Raises
    ------
    InputError
        A folder is missing, the ground truth has no masks, no names are shared, a mask's
        dimensions do not match, or ``tolerance``/``spacing`` are out of range.
    """
    if not tolerance >= 0:
        raise InputError(f"the NSD tolerance must be >= 0; got {tolerance}.")
    if not (np.asarray(spacing, dtype=np.float64) > 0).all():
        raise InputError(f"the pixel spacing must be > 0; got {spacing}.")
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    preds, gts = list_masks(pred_dir), list_masks(gt_dir)
    if not gts:
        raise InputError(f"{gt_dir}: no mask files found.")
    if not set(preds) & set(gts):
        raise InputError(f"No file names in common between {pred_dir} and {gt_dir}; "
                         "predictions are paired with ground truth by name.")
    rows = []
    for name in sorted(gts):
        gt = read_mask(gts[name])
        if name in preds:
            pred, status = read_mask(preds[name]), OK
        else:
            pred, status = np.zeros_like(gt), MISSING
        try:
            dsc, nsd = score_masks(pred, gt, tolerance=tolerance, spacing=spacing)
        except (InputError, ValueError) as exc:
            raise InputError(f"{name}: {exc}") from exc
        rows.append(ImageScore(name, dsc, nsd, status))
    return EvaluationResult(
        rows=rows, mean_dsc=float(np.mean([r.dsc for r in rows])),
        mean_nsd=float(np.mean([r.nsd for r in rows])),
        missing=sorted(set(gts) - set(preds)), ignored=sorted(set(preds) - set(gts)),
        tolerance=tolerance, spacing=spacing)


def write_evaluation(result: EvaluationResult, out_csv: str | Path) -> tuple[Path, Path]:
    """Write ``out_csv`` (:meth:`EvaluationResult.to_csv`) and the same name with ``.json``
    (:meth:`EvaluationResult.to_dict`), each atomically.

    Returns
    -------
    (csv_path, json_path) : tuple of Path
    """
    from .io import write_text

    out_csv = Path(out_csv)
    out_json = out_csv.with_suffix(".json")
    write_text(out_csv, result.to_csv())
    write_text(out_json, json.dumps(result.to_dict(), indent=2))
    return out_csv, out_json
