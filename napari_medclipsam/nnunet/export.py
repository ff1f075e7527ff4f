"""Export images and their (corrected) masks as a raw nnU-Net v2 dataset.

Layout written (the nnU-Net v2 raw format)::

    RAW/Dataset{ID:03d}_{Name}/
        imagesTr/{case}_0000.{png|nii.gz}
        labelsTr/{case}.{png|nii.gz}          0 background, 1 the target
        dataset.json                          channel_names, labels, numTraining, file_ending
        medclipsam_cases.json                 per case: corrected by hand or raw zero-shot, source

Conventions
-----------
* 2-D natural images (uint8/uint16, grayscale or RGB) are written as PNG; everything else
  (float or signed 2-D data such as CT slices in HU, and all volumes) as NIfTI, keeping the
  intensities and the spacing. A dataset has one file ending: appending float data to a PNG
  dataset is refused.
* RGB images whose three channels are equal are stored as grayscale (one channel).
* Masks are binary: every label value > 0 is the target (label 1).
* Volumes are (Z, Y, X); ``spacing`` is given in that order.

Safety: a new dataset is written into a hidden staging folder and renamed into place only after
nnU-Net's own integrity check passed, so an interrupted export leaves nothing behind. Appending
(only on request) never replaces an existing case: the new files are written beside the
dataset, moved in, checked, and removed again if the check fails.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.errors import InputError
from ..core.io import SUPPORTED, file_stem, read_image

CASES_FILE = "medclipsam_cases.json"
MASK_SUFFIXES = ("", "_mask", "_seg", "_label", "_labels", "_gt", "-mask", "_segmentation")
_SAFE = re.compile(r"[^A-Za-z0-9-]+")


@dataclass
class ExportCase:
    """One training case.

    Attributes
    ----------
    case_id : str
        nnU-Net case identifier (letters, digits, ``-`` and ``_``).
    image : np.ndarray
        (Y, X) grayscale, (Y, X, 3) RGB, or (Z, Y, X) volume.
    mask : np.ndarray
        Same spatial shape as ``image``; values > 0 are the target.
    spacing : tuple of float
        Pixel/voxel size per spatial axis of ``image`` ((Y, X) or (Z, Y, X)).
    corrected : bool
        True when a person corrected the mask; False for a raw zero-shot mask.
    source : str
        Where it came from (file path or napari layer name), recorded in the case list.
    origin : tuple of float or None
        World position of the first voxel (Z, Y, X), for volumes.
    """

    case_id: str
    image: np.ndarray
    mask: np.ndarray
    spacing: tuple[float, ...] | None = None
    corrected: bool = False
    source: str = ""
    origin: tuple[float, ...] | None = None
    direction: tuple[float, ...] | None = field(default=None, repr=False)

    @property
    def is_volume(self) -> bool:
        return self.image.ndim == 3 and not (self.image.shape[-1] in (3, 4)
                                             and self.mask.ndim == 2)

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(self.image.shape if self.is_volume else self.image.shape[:2])


@dataclass
class ExportResult:
    """What :func:`export_dataset` wrote."""

    folder: Path
    dataset_name: str
    cases: list[str]
    n_corrected: int
    n_zero_shot: int
    file_ending: str
    appended: bool
    converted: list[str] = field(default_factory=list)
    """Cases converted to the dataset's kind (colour -> gray by luminance, or gray -> RGB)."""


# --------------------------------------------------------------------------- names


def safe_case_id(text: str) -> str:
    """Make ``text`` usable as an nnU-Net case identifier (no spaces, no dots)."""
    out = _SAFE.sub("_", text).strip("_")
    if not out:
        raise InputError(f"Cannot make a case identifier from {text!r}.")
    return out


def dataset_folder_name(dataset_id: int, name: str) -> str:
    """``Dataset{ID:03d}_{Name}`` after checking both parts."""
    if not isinstance(dataset_id, int) or not 1 <= dataset_id <= 999:
        raise InputError(f"The dataset ID must be an integer from 1 to 999; got {dataset_id!r}.")
    if not name or not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise InputError(f"The dataset name may hold letters, digits, '_' and '-' only; "
                         f"got {name!r}.")
    return f"Dataset{dataset_id:03d}_{name}"


def find_dataset(raw_dir: str | Path, dataset_id: int) -> Path | None:
    """The existing ``Dataset{ID:03d}_*`` folder in ``raw_dir``, if any."""
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        return None
    hits = sorted(p for p in raw_dir.glob(f"Dataset{dataset_id:03d}_*") if p.is_dir())
    return hits[0] if hits else None


# --------------------------------------------------------------------------- case builders


def cases_from_arrays(image: np.ndarray, labels: np.ndarray, name: str, *,
                      spacing: Sequence[float] | None = None,
                      origin: Sequence[float] | None = None, corrected: bool = True,
                      as_slices: bool = False, slices: str = "labelled",
                      rgb: bool | None = None) -> list[ExportCase]:
    """Cases from an in-memory image and its label image (e.g. napari layers' data).

    Parameters
    ----------
    image : np.ndarray
        (Y, X), (Y, X, 3) RGB or (Z, Y, X).
    labels : np.ndarray
        Same spatial shape; values > 0 are the target.
    name : str
        Case identifier (sanitised); slices get ``{name}_z{index:03d}``.
    spacing, origin : sequence of float, optional
        Per spatial axis, e.g. a napari layer's ``scale`` and ``translate``.
    as_slices : bool
        Export a (Z, Y, X) stack as 2-D slices (for the 2-D nnU-Net of the paper) instead of
        one volume.
    slices : {"labelled", "all"}
        With ``as_slices``: only slices whose mask is not empty (a slice nobody labelled is
        usually unannotated, not empty), or every slice.
    rgb : bool, optional
        Whether a 3-D array with a last axis of 3/4 is RGB(A); guessed when None.
    """
    image = np.asarray(image)
    labels = np.asarray(labels)
    if rgb is None:
        rgb = image.ndim == 3 and image.shape[-1] in (3, 4) and labels.ndim == 2
    spatial = image.shape[:2] if rgb else image.shape
    if tuple(labels.shape) != tuple(spatial):
        raise InputError(f"The labels ({labels.shape}) do not match the image ({spatial}): "
                         "pick the labels drawn on this image.")
    if image.ndim not in (2, 3) or (rgb and image.ndim != 3):
        raise InputError(f"Expected a 2-D image, an RGB image or a 3-D stack; got shape "
                         f"{image.shape}.")
    if rgb and image.shape[-1] == 4:
        image = image[..., :3]
    case = safe_case_id(name)
    spacing = tuple(float(s) for s in spacing) if spacing is not None else None
    if image.ndim == 3 and not rgb and as_slices:
        if slices not in ("labelled", "all"):
            raise InputError(f"slices must be 'labelled' or 'all'; got {slices!r}.")
        out = []
        for z in range(image.shape[0]):
            if slices == "labelled" and not (labels[z] > 0).any():
                continue
            out.append(ExportCase(f"{case}_z{z:03d}", image[z], labels[z],
                                  spacing[1:] if spacing else None, corrected,
                                  f"{name} [z={z}]"))
        if not out:
            raise InputError(f"No slice of {name!r} has a label: paint the target on the "
                             "slices to export, or export all slices.")
        return out
    return [ExportCase(case, image, labels, spacing, corrected, name,
                       tuple(float(v) for v in origin) if origin is not None else None)]


def pair_images_and_masks(images_dir: str | Path, masks_dir: str | Path
                          ) -> list[tuple[Path, Path]]:
    """Pair each image with its mask by file name, never by listing order.

    A mask matches an image when its name without suffix equals the image's, optionally
    followed by one of ``_mask``, ``_seg``, ``_label``, ``_gt``, ... .

    Raises
    ------
    InputError
        If a folder is missing or empty, or an image has no mask (or more than one).
    """
    images_dir, masks_dir = Path(images_dir), Path(masks_dir)
    for d, what in ((images_dir, "images"), (masks_dir, "masks")):
        if not d.is_dir():
            raise InputError(f"The {what} folder {d} does not exist.")

    def listing(d: Path) -> list[Path]:
        return sorted(p for p in d.iterdir() if p.is_file() and not p.name.startswith(".")
                      and p.name.lower().endswith(SUPPORTED))

    images, masks = listing(images_dir), listing(masks_dir)
    if not images:
        raise InputError(f"No images in {images_dir} (supported: {', '.join(SUPPORTED)}).")
    by_stem: dict[str, list[Path]] = {}
    for m in masks:
        by_stem.setdefault(file_stem(m), []).append(m)
    pairs, missing = [], []
    for img in images:
        stem = file_stem(img)
        stem_no_channel = re.sub(r"_0000$", "", stem)
        hits = [m for s in MASK_SUFFIXES for base in dict.fromkeys((stem, stem_no_channel))
                for m in by_stem.get(base + s, [])]
        if not hits:
            missing.append(img.name)
        elif len(set(hits)) > 1:
            raise InputError(f"{img.name} matches several masks: "
                             f"{', '.join(sorted(h.name for h in set(hits)))}. Keep one.")
        else:
            pairs.append((img, hits[0]))
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise InputError(f"{len(missing)} of {len(images)} images have no mask in {masks_dir} "
                         f"(matched by name, e.g. case.png <-> case.png or case_mask.png): "
                         f"{shown}.")
    return pairs


def cases_from_folders(images_dir: str | Path, masks_dir: str | Path, *,
                       corrected: bool = False) -> Iterator[ExportCase]:
    """Yield one case per image/mask pair (read lazily, one pair at a time)."""
    for img_path, mask_path in pair_images_and_masks(images_dir, masks_dir):
        img = read_image(img_path)
        mask = read_image(mask_path).data
        if mask.ndim == 3 and not img.is_volume:
            mask = mask[..., 0]   # an RGB-saved mask
        yield ExportCase(safe_case_id(re.sub(r"_0000$", "", img.name)), img.data, mask,
                         img.spacing, corrected, str(img_path),
                         **_nifti_geometry(img))


def _nifti_geometry(img) -> dict:
    """Origin and direction (ZYX order for the origin) from a NIfTI affine, if any."""
    affine = img.meta.get("affine") if img.is_volume else None
    if affine is None:
        return {}
    affine = np.asarray(affine, dtype=float)
    # NIfTI is RAS, ITK is LPS: flip the first two world axes.
    lps = np.diag([-1.0, -1.0, 1.0]) @ affine[:3, :3]
    zooms = np.linalg.norm(lps, axis=0)
    direction = lps / np.where(zooms == 0, 1, zooms)
    origin = np.diag([-1.0, -1.0, 1.0]) @ affine[:3, 3]
    return {"origin": tuple(origin[::-1]), "direction": tuple(direction.ravel())}


# --------------------------------------------------------------------------- writing


def _prepare(case: ExportCase) -> tuple[np.ndarray, np.ndarray, int, bool]:
    """-> (image channels-last or volume, binary uint8 mask, n_channels, natural2d)."""
    image = np.asarray(case.image)
    mask = np.asarray(case.mask)
    if case.is_volume:
        if mask.shape != image.shape:
            raise InputError(f"{case.case_id}: mask {mask.shape} != volume {image.shape}.")
        return image, (mask > 0).astype(np.uint8), 1, False
    if image.ndim == 3:
        if image.shape[-1] == 4:
            image = image[..., :3]
        if image.shape[-1] != 3:
            raise InputError(f"{case.case_id}: expected (Y, X) or (Y, X, 3); got {image.shape}.")
        if (image[..., 0] == image[..., 1]).all() and (image[..., 0] == image[..., 2]).all():
            image = image[..., 0]
    if mask.shape != image.shape[:2]:
        raise InputError(f"{case.case_id}: mask {mask.shape} != image {image.shape[:2]}.")
    n_channels = 1 if image.ndim == 2 else 3
    natural = image.dtype in (np.uint8, np.uint16)
    return image, (mask > 0).astype(np.uint8), n_channels, natural


def luminance(rgb: np.ndarray, axis: int = -1) -> np.ndarray:
    """ITU-R BT.601 luminance of RGB(A) along ``axis``, in the input's dtype (rounded)."""
    rgb = np.moveaxis(np.asarray(rgb), axis, -1)
    gray = rgb[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    if rgb.dtype.kind in "ui":
        info = np.iinfo(rgb.dtype)
        gray = np.clip(np.rint(gray), info.min, info.max)
    return gray.astype(rgb.dtype)


def _convert_channels(prepared: tuple, n_channels: int) -> tuple[tuple, str]:
    """Convert a 2-D case to 1 channel (ITU-R BT.601 luminance) or to 3 (replicated)."""
    image, mask, _, natural = prepared
    if n_channels == 1:
        return (luminance(image), mask, 1, natural), "colour->gray"
    return (np.repeat(image[..., None], 3, axis=2), mask, 3, natural), "gray->rgb"


def _write_png(path: Path, data: np.ndarray) -> None:
    import imageio.v3 as iio

    iio.imwrite(str(path), np.ascontiguousarray(data), extension=".png")


def _write_nifti(path: Path, data: np.ndarray, case: ExportCase) -> None:
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(data))
    ndim = data.ndim
    spacing = case.spacing if case.spacing else (1.0,) * ndim
    img.SetSpacing(tuple(float(s) for s in reversed(spacing[-ndim:])))
    if case.origin is not None and len(case.origin) == ndim:
        img.SetOrigin(tuple(float(v) for v in reversed(case.origin)))
    if case.direction is not None and len(case.direction) == ndim * ndim:
        img.SetDirection(tuple(float(v) for v in case.direction))
    sitk.WriteImage(img, str(path), useCompression=True)


def _write_case(case: ExportCase, staging: Path, file_ending: str,
                prepared: tuple[np.ndarray, np.ndarray, int, bool]) -> tuple[Path, Path]:
    image, mask, _, _ = prepared
    img_path = staging / "imagesTr" / f"{case.case_id}_0000{file_ending}"
    lab_path = staging / "labelsTr" / f"{case.case_id}{file_ending}"
    if file_ending == ".png":
        _write_png(img_path, image)
        _write_png(lab_path, mask)
    else:
        if not case.is_volume and image.ndim == 3:
            raise InputError(f"{case.case_id}: RGB images can only go into a PNG dataset.")
        _write_nifti(img_path, image if case.is_volume or image.dtype.kind == "f"
                     else image.astype(np.float32), case)
        _write_nifti(lab_path, mask, case)
    return img_path, lab_path


def _dataset_json(channel_names: dict[str, str], label_name: str, n: int, file_ending: str,
                  name: str) -> dict:
    return {
        "name": name,
        "description": "Pseudo-labels exported by napari-medclipsam (MedCLIP-SAMv2 weak "
                       "supervision); see medclipsam_cases.json for which were corrected.",
        "channel_names": channel_names,
        "labels": {"background": 0, label_name: 1},
        "numTraining": n,
        "file_ending": file_ending,
    }


def _verify(folder: Path) -> None:
    """nnU-Net's ``verify_dataset_integrity``, in a child process.

    It starts a ``spawn`` pool, which re-imports the caller's main module: from a script
    without a ``__main__`` guard, or inside napari, that would recurse or hang. A fresh
    interpreter avoids both.
    """
    code = ("import sys\n"
            "from nnunetv2.experiment_planning.verify_dataset_integrity import "
            "verify_dataset_integrity\n"
            "verify_dataset_integrity(sys.argv[1], num_processes=1)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True,
                          text=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        reason = next((ln for ln in reversed(lines) if "Error" in ln), lines[-1] if lines
                      else f"exit status {proc.returncode}")
        raise InputError(f"nnU-Net's dataset check failed for {folder.name}: {reason}")


def export_dataset(cases: Iterable[ExportCase], raw_dir: str | Path, dataset_id: int,
                   name: str, *, label_name: str = "target", channel_name: str | None = None,
                   append: bool = False, verify: bool = True,
                   progress: Callable[[int, int | None], None] | None = None) -> ExportResult:
    """Write ``cases`` as ``RAW/Dataset{ID:03d}_{Name}`` (or add them to it with ``append``).

    Parameters
    ----------
    cases : iterable of ExportCase
    raw_dir : path
        nnU-Net's raw folder (``$nnUNet_raw``); created if missing.
    dataset_id, name : int, str
        Together the folder name ``Dataset{ID:03d}_{Name}``.
    label_name : str
        Name of label 1 in dataset.json (e.g. "tumor").
    channel_name : str, optional
        Name of the input channel; nnU-Net picks its intensity normalisation from it: "CT"
        uses CT normalisation (for HU data), anything else z-score. Default: "CT" is never
        guessed; "image" for grayscale, "R", "G", "B" for RGB.
    append : bool
        Add to an existing dataset with this ID. Without it an existing dataset is an error.
    verify : bool
        Run nnU-Net's ``verify_dataset_integrity`` (recommended).
    progress : callable(done, total or None), optional

    Raises
    ------
    InputError
        Existing dataset without ``append``, a case that exists already, a duplicate case,
        mixed channel counts or file types, empty masks everywhere, or a failed check.
    """
    raw_dir = Path(raw_dir)
    folder_name = dataset_folder_name(dataset_id, name)
    existing = find_dataset(raw_dir, dataset_id)
    if existing is not None and not append:
        raise InputError(f"{existing} exists already: add cases to it with append "
                         f"(--append), or choose another dataset ID.")
    if existing is not None and existing.name != folder_name:
        raise InputError(f"Dataset ID {dataset_id} is {existing.name}, not {folder_name}: use "
                         f"its name or another ID.")
    raw_dir.mkdir(parents=True, exist_ok=True)
    old_json: dict | None = None
    old_cases: dict = {}
    if existing is not None:
        old_json = json.loads((existing / "dataset.json").read_text())
        if (existing / CASES_FILE).is_file():
            old_cases = json.loads((existing / CASES_FILE).read_text())
        _check_orphans(existing, old_json["file_ending"])

    staging = Path(tempfile.mkdtemp(prefix=f".{folder_name}.partial-", dir=raw_dir))
    try:
        (staging / "imagesTr").mkdir()
        (staging / "labelsTr").mkdir()
        file_ending = old_json["file_ending"] if old_json else None
        n_channels = len(old_json["channel_names"]) if old_json else None
        written: dict[str, dict] = {}
        converted: list[str] = []
        total = len(cases) if isinstance(cases, Sequence) else None
        for done, case in enumerate(cases, 1):
            if case.case_id in written or case.case_id in old_cases or (
                    existing is not None and _case_exists(existing, case.case_id)):
                raise InputError(f"Case {case.case_id!r} exists already in {folder_name}: "
                                 "cases are never overwritten; rename it.")
            prepared = _prepare(case)
            conversion = None
            if n_channels is None:
                n_channels = prepared[2]
            elif prepared[2] != n_channels:
                if case.is_volume:
                    raise InputError(f"{case.case_id} has {prepared[2]} channel(s), the "
                                     f"dataset {n_channels}: export it to a new dataset.")
                # One image of another kind in a dataset (an ultrasound frame with coloured
                # overlays among grayscale ones): convert it, and say so.
                prepared, conversion = _convert_channels(prepared, n_channels)
            if file_ending is None:
                # Decided by the first case: PNG only for 2-D natural (8/16-bit) images.
                file_ending = ".png" if prepared[3] else ".nii.gz"
            if file_ending == ".png" and not prepared[3]:
                kind = "a volume" if case.is_volume else f"{prepared[0].dtype} data"
                raise InputError(f"{case.case_id} is {kind} but the dataset stores PNG images "
                                 "(8/16-bit 2-D): export it to a new dataset.")
            _write_case(case, staging, file_ending, prepared)
            written[case.case_id] = {
                "corrected": bool(case.corrected), "source": case.source,
                "exported": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "foreground_fraction": round(float(prepared[1].mean()), 6)}
            if conversion:
                written[case.case_id]["converted"] = conversion
                converted.append(case.case_id)
            if progress:
                progress(done, total)
        if not written:
            raise InputError("Nothing to export: no cases were given.")
        if all(v["foreground_fraction"] == 0 for v in written.values()) and not old_cases:
            raise InputError("Every mask is empty: paint (or segment) the target before "
                             "exporting.")
        channel_names = (old_json["channel_names"] if old_json else
                         {"0": channel_name or "image"} if n_channels == 1 else
                         {"0": "R", "1": "G", "2": "B"})
        all_cases = {**old_cases, **written}
        n_total = (old_json["numTraining"] if old_json else 0) + len(written)
        ds_json = _dataset_json(channel_names, old_json and _label_of(old_json) or label_name,
                                n_total, file_ending, name)
        if old_json:
            ds_json = {**old_json, "numTraining": n_total}
        if existing is None:
            _write_json(staging / "dataset.json", ds_json)
            _write_json(staging / CASES_FILE, all_cases)
            if verify:
                _verify(staging)
            target = raw_dir / folder_name
            staging.rename(target)   # one atomic step: the dataset appears whole or not at all
            staging = None
        else:
            target = existing
            moved = []
            try:
                for sub in ("imagesTr", "labelsTr"):
                    for f in sorted((staging / sub).iterdir()):
                        dest = target / sub / f.name
                        if dest.exists():
                            raise InputError(f"{dest} appeared during the export; stopped.")
                        f.rename(dest)
                        moved.append(dest)
                _write_json(target / "dataset.json", ds_json)
                _write_json(target / CASES_FILE, all_cases)
                if verify:
                    _verify(target)
            except BaseException:
                for f in moved:
                    f.unlink(missing_ok=True)
                _write_json(target / "dataset.json", old_json)
                _write_json(target / CASES_FILE, old_cases)
                raise
        n_corr = sum(v["corrected"] for v in written.values())
        return ExportResult(target, folder_name, list(written), n_corr, len(written) - n_corr,
                            file_ending, existing is not None, converted)
    finally:
        if staging is not None and staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _label_of(ds_json: dict) -> str:
    return next((k for k, v in ds_json["labels"].items() if v == 1), "target")


def _case_exists(folder: Path, case_id: str) -> bool:
    return any((folder / "labelsTr").glob(f"{case_id}.*")) or any(
        (folder / "imagesTr").glob(f"{case_id}_0000.*"))


def _check_orphans(folder: Path, file_ending: str) -> None:
    images = {p.name[: -len(f"_0000{file_ending}")]
              for p in (folder / "imagesTr").glob(f"*_0000{file_ending}")}
    labels = {p.name[: -len(file_ending)] for p in (folder / "labelsTr").glob(f"*{file_ending}")}
    if images != labels:
        odd = sorted(images ^ labels)
        raise InputError(f"{folder} has images without labels or labels without images "
                         f"({', '.join(odd[:5])}): fix or remove them before appending.")


def _write_json(path: Path, data: dict) -> None:
    from ..core.io import write_text

    write_text(path, json.dumps(data, indent=2) + "\n")


def read_case_list(folder: str | Path) -> dict[str, dict]:
    """The per-case record (corrected or zero-shot, source) of an exported dataset."""
    path = Path(folder) / CASES_FILE
    return json.loads(path.read_text()) if path.is_file() else {}
