"""Folder evaluation: predicted masks against ground truth, paired by file name.

Every ground-truth mask is scored (DSC and NSD, :mod:`napari_medclipsam.core.metrics`); a
ground truth without a prediction counts as an empty prediction, a prediction without a
ground truth is ignored and listed. Pairing is by file name without suffix
(``case_01.png`` <-> ``case_01.nii.gz``), never by listing order.

The NSD tolerance is in the units of the spacing used, chosen per case: the spacing given by
the caller if any; else the ground truth file's own (NIfTI header zooms, DICOM PixelSpacing),
so the tolerance is in millimetres; else (PNG, JPEG, TIFF, BMP: no spacing) pixels. A
prediction whose header spacing disagrees with its ground truth's on the same grid is scored
at the ground truth's spacing and the disagreement is recorded in the row's ``note``. Each row
records the spacing it used; :meth:`EvaluationResult.describe_nsd` says it in one line.

:func:`write_evaluation` never replaces an input mask, and replaces an existing output only
when asked to.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError

__all__ = ["EvaluationResult", "ImageScore", "OutputExistsError", "evaluate_folders",
           "evaluation_paths", "list_masks", "read_mask", "score_masks", "write_evaluation"]

#: Status of a ground-truth mask that has a prediction.
OK = "ok"
#: Status of a ground-truth mask without a prediction (scored against an empty mask).
MISSING = "missing prediction (scored as empty)"
#: Unit of a spacing-less file.
PIXELS = "px"


class OutputExistsError(InputError):
    """An output file exists and replacing it was not allowed; ``.path`` names it."""

    def __init__(self, path: Path) -> None:
        super().__init__(f"{path} already exists; it is not replaced without overwrite.")
        self.path = Path(path)


def format_spacing(spacing: Sequence[float] | None, unit: str) -> str:
    """``(1.5, 1.5, 3.0), "mm"`` -> ``"(1.5, 1.5, 3) mm"``; None -> ``"pixels"``."""
    if spacing is None or unit == PIXELS:
        return "pixels"
    values = f"({', '.join(f'{float(v):g}' for v in spacing)})"
    return f"{values} as given" if unit == "given" else f"{values} {unit}"


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
    spacing : tuple of float or None
        The spacing the NSD used, one value per axis in array order ((Z, Y, X) or (Y, X));
        None for pixels.
    unit : str
        Unit of ``spacing`` and of the tolerance: ``"mm"`` (or the NIfTI header's unit),
        ``"px"`` for files without spacing, ``"given"`` for a spacing the caller gave.
    note : str
        Anything the reader should know about this case (e.g. disagreeing spacings).
    """

    name: str
    dsc: float
    nsd: float
    status: str = OK
    spacing: tuple[float, ...] | None = None
    unit: str = PIXELS
    note: str = ""


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
        NSD tolerance, in the unit of each row's spacing.
    spacing : None, float or sequence of float
        The spacing the caller gave; None: each file's own (see the module docstring).
    inputs : tuple of Path
        Every mask file of both folders; :func:`write_evaluation` never writes onto them.
    """

    rows: list[ImageScore]
    mean_dsc: float
    mean_nsd: float
    missing: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    tolerance: float = 2.0
    spacing: float | Sequence[float] | None = None
    inputs: tuple[Path, ...] = ()

    @property
    def notes(self) -> list[str]:
        """``"name: note"`` for every row with a note."""
        return [f"{r.name}: {r.note}" for r in self.rows if r.note]

    def describe_nsd(self) -> str:
        """One line: the tolerance and the spacing(s) it was measured at, and where they
        came from (e.g. ``NSD tolerance 2 mm at spacing (1.5, 1.5, 1.5) mm from the files'
        headers``, or ``NSD tolerance 2 px (no spacing in the PNG files)``)."""
        tol = f"{self.tolerance:g}"
        if self.spacing is not None:
            given = np.atleast_1d(np.asarray(self.spacing, dtype=float)).tolist()
            return (f"NSD tolerance {tol} in the units of the given spacing "
                    f"({', '.join(f'{v:g}' for v in given)})")
        in_pixels = [r for r in self.rows if r.unit == PIXELS]
        physical = [r for r in self.rows if r.unit != PIXELS]
        if not physical:
            kinds = sorted({self._kind(r.name) for r in in_pixels} - {""})
            files = f"the {'/'.join(kinds)} files" if kinds else "the files"
            return f"NSD tolerance {tol} px (no spacing in {files})"
        spacings = {(r.spacing, r.unit) for r in physical}
        units = sorted({u for _, u in spacings})
        unit = units[0] if len(units) == 1 else "/".join(units)
        if len(spacings) == 1:
            (spacing, unit), = spacings
            text = (f"NSD tolerance {tol} {unit} at spacing {format_spacing(spacing, unit)} "
                    "from the files' headers")
        else:
            text = (f"NSD tolerance {tol} {unit} at each file's own spacing from its header "
                    f"({len(spacings)} different spacings)")
        if in_pixels:
            text += f"; {tol} px for the {len(in_pixels)} case(s) without spacing"
        return text

    def _kind(self, name: str) -> str:
        from .io import file_stem

        for path in self.inputs:
            if file_stem(path) == name:
                return Path(path).suffix.lstrip(".").upper()
        return ""

    def to_csv(self) -> str:
        """``name,dsc,nsd,status,spacing,note`` per image, then a ``mean`` row (6 decimals;
        spacing as ``(1.5, 1.5, 1.5) mm`` or ``pixels``; cells with commas quoted)."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["name", "dsc", "nsd", "status", "spacing", "note"])
        for r in self.rows:
            writer.writerow([r.name, f"{r.dsc:.6f}", f"{r.nsd:.6f}", r.status,
                             format_spacing(r.spacing, r.unit), r.note])
        writer.writerow(["mean", f"{self.mean_dsc:.6f}", f"{self.mean_nsd:.6f}",
                         f"{len(self.rows)} images", self.describe_nsd(), ""])
        return out.getvalue()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary: means, parameters, per-image rows, missing and ignored names."""
        if self.spacing is None:
            spacing: Any = "from the files (pixels where they have none)"
        else:
            spacing = self.spacing if np.ndim(self.spacing) == 0 else list(self.spacing)
        images = []
        for r in self.rows:
            row = asdict(r)
            row["spacing"] = None if r.spacing is None else list(r.spacing)
            images.append(row)
        return {"mean_dsc": self.mean_dsc, "mean_nsd": self.mean_nsd,
                "tolerance": self.tolerance, "spacing": spacing, "nsd": self.describe_nsd(),
                "images": images, "missing": list(self.missing),
                "ignored": list(self.ignored), "notes": self.notes}


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


def _mask_of(image) -> np.ndarray:
    """ImageData -> bool mask: values > 0; a 2-D colour mask counts a pixel as foreground if
    any colour channel is > 0 (alpha ignored, unless the colour channels are all 0)."""
    data = np.asarray(image.data)
    if not image.is_volume and data.ndim == 3 and data.shape[-1] in (3, 4):
        colour = data[..., :3] > 0
        if data.shape[-1] == 4 and not colour.any():
            return data[..., 3] > 0
        return colour.any(axis=-1)
    return data > 0


def read_mask(path: str | Path) -> np.ndarray:
    """A mask file as a bool array (values > 0 are foreground), (H, W) or (Z, Y, X); a colour
    mask is foreground where any colour channel is."""
    from .io import read_image

    return _mask_of(read_image(path))


def _read_case(path: Path) -> tuple[np.ndarray, tuple[float, ...] | None, str]:
    """(mask, spacing or None, unit) of one mask file."""
    from .io import read_image

    image = read_image(path)
    mask = _mask_of(image)
    if image.meta.get("spacing_known"):
        spacing = tuple(float(v) for v in image.spacing[-mask.ndim:])
        if len(spacing) == mask.ndim:
            return mask, spacing, str(image.meta.get("spacing_unit", "mm"))
    return mask, None, PIXELS


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
                     spacing: float | Sequence[float] | None = None) -> EvaluationResult:
    """Score every ground-truth mask of ``gt_dir`` against the same-name prediction.

    Parameters
    ----------
    pred_dir, gt_dir : str or Path
        Folders of mask files (PNG/JPEG/TIFF, NIfTI, DICOM); values > 0 are foreground.
    tolerance : float
        NSD tolerance in the unit of the spacing used: millimetres for files with spacing
        (NIfTI, DICOM), pixels for files without (the paper: 2 pixels).
    spacing : None, float or sequence of float
        None (default): each ground truth's own spacing from its header, pixels where it has
        none. A value (or one per axis, in array order) replaces every file's spacing.

    Returns
    -------
    EvaluationResult
        Rows sorted by name, each with the spacing it used; missing predictions are scored
        against an empty mask.

    Raises
    ------
    InputError
        A folder is missing, the ground truth has no masks, no names are shared, a mask is
        unreadable or its dimensions do not match, or ``tolerance``/``spacing`` are out of
        range.
    """
    if not tolerance >= 0:
        raise InputError(f"the NSD tolerance must be >= 0; got {tolerance}.")
    if spacing is not None:
        values = np.asarray(spacing, dtype=np.float64)
        if values.ndim > 1 or values.size == 0 or not (np.isfinite(values) & (values > 0)).all():
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
        try:
            gt, gt_spacing, unit = _read_case(gts[name])
            if name in preds:
                pred, pred_spacing, pred_unit = _read_case(preds[name])
                status = OK
            else:
                pred, pred_spacing, pred_unit, status = np.zeros_like(gt), None, PIXELS, MISSING
        except InputError as exc:
            raise InputError(f"{name}: {exc}") from exc
        note = ""
        if spacing is not None:
            used, unit = spacing, "given"
        elif gt_spacing is not None:
            used = gt_spacing
            if pred_spacing is not None and pred.shape == gt.shape and (
                    pred_unit != unit or not np.allclose(pred_spacing, gt_spacing, rtol=1e-3,
                                                         atol=1e-6)):
                note = (f"prediction spacing {format_spacing(pred_spacing, pred_unit)} differs "
                        f"from the ground truth's {format_spacing(gt_spacing, unit)}; the "
                        "ground truth's was used")
        else:
            used = 1.0
            if pred_spacing is not None:
                note = ("the prediction has a spacing but the ground truth has none; scored "
                        "in pixels")
        try:
            dsc, nsd = score_masks(pred, gt, tolerance=tolerance, spacing=used)
        except (InputError, ValueError) as exc:
            raise InputError(f"{name}: {exc}") from exc
        row_spacing = None if unit == PIXELS else tuple(
            float(v) for v in np.broadcast_to(np.asarray(used, dtype=float), (gt.ndim,)))
        rows.append(ImageScore(name, dsc, nsd, status, row_spacing, unit, note))
    return EvaluationResult(
        rows=rows, mean_dsc=float(np.mean([r.dsc for r in rows])),
        mean_nsd=float(np.mean([r.nsd for r in rows])),
        missing=sorted(set(gts) - set(preds)), ignored=sorted(set(preds) - set(gts)),
        tolerance=tolerance, spacing=spacing,
        inputs=tuple(sorted({*preds.values(), *gts.values()})))


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(os.path.abspath(a)) == Path(os.path.abspath(b))


def evaluation_paths(out_csv: str | Path, *, overwrite: bool = False,
                     inputs: Sequence[str | Path] = ()) -> tuple[Path, Path]:
    """The CSV and JSON paths :func:`write_evaluation` would write, checked before any work.

    Raises
    ------
    InputError
        ``out_csv`` has a mask's suffix (it would be taken for a mask), names a folder, or
        it or its ``.json`` is one of ``inputs`` (never overwritten, not even with
        ``overwrite``).
    OutputExistsError
        One of them exists and ``overwrite`` is False.
    """
    from .io import SUPPORTED

    out_csv = Path(out_csv)
    if out_csv.name.lower().endswith(SUPPORTED):
        raise InputError(f"{out_csv}: a scores file named like a mask would be read as one; "
                         "give a .csv file name.")
    out_json = out_csv.with_suffix(".json")
    if out_json == out_csv:
        raise InputError(f"{out_csv}: the scores are written as CSV and JSON side by side; "
                         "give a .csv file name.")
    for path in (out_csv, out_json):
        if path.is_dir():
            raise InputError(f"{path} is a folder; give a file name such as scores.csv.")
        if os.path.lexists(path) and any(_same_file(path, Path(i)) for i in inputs):
            raise InputError(f"{path} is one of the masks being evaluated; it is never "
                             "overwritten. Choose another output file.")
    if not overwrite:
        for path in (out_csv, out_json):
            if os.path.lexists(path):
                raise OutputExistsError(path)
    return out_csv, out_json


def write_evaluation(result: EvaluationResult, out_csv: str | Path, *,
                     overwrite: bool = False) -> tuple[Path, Path]:
    """Write ``out_csv`` (:meth:`EvaluationResult.to_csv`) and the same name with ``.json``
    (:meth:`EvaluationResult.to_dict`), each atomically.

    An existing file is replaced only with ``overwrite``; an input mask of ``result`` never
    (see :func:`evaluation_paths`).

    Returns
    -------
    (csv_path, json_path) : tuple of Path
    """
    from .io import write_text

    out_csv, out_json = evaluation_paths(out_csv, overwrite=overwrite, inputs=result.inputs)
    for path, text in ((out_csv, result.to_csv()),
                       (out_json, json.dumps(result.to_dict(), indent=2))):
        try:
            write_text(path, text, overwrite=overwrite)
        except FileExistsError as exc:
            raise OutputExistsError(path) from exc
    return out_csv, out_json
