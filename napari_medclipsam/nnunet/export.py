"""Export images and their (corrected) masks as a raw nnU-Net v2 dataset.

Layout written (the nnU-Net v2 raw format)::

    RAW/Dataset{ID:03d}_{Name}/
        imagesTr/{case}_0000.{png|nii.gz}
        labelsTr/{case}.{png|nii.gz}          0 background, 1..C the targets
        dataset.json                          channel_names, labels, numTraining, file_ending
                                              (+ medclipsam_label_values, see below)
        medclipsam_cases.json                 per case: corrected by hand or raw zero-shot, source,
                                              and the review record (see ``review.py``)

Conventions
-----------
* 2-D natural images (uint8/uint16, grayscale or RGB) are written as PNG; everything else
  (float or signed 2-D data such as CT slices in HU, and all volumes) as NIfTI, keeping the
  intensities and the spacing. A dataset has one file ending: appending float data to a PNG
  dataset is refused.
* RGB images whose three channels are equal are stored as grayscale (one channel).
* Masks are binary by default: every label value > 0 is the target (label 1, named
  ``label_name``).
* Several targets in one label map: pass a label table ``label_table={"left lung": 1,
  "right lung": 2, "nodule": 3}`` (name -> value in the masks; background 0 is implicit). The
  masks keep their values; a value that is not in the table is refused (InputError naming it).
  nnU-Net needs consecutive labels 0..C, so values that are not 1..C (say 1, 2, 5) are
  remapped in order of value (1, 2, 3): ``dataset.json`` ``"labels"`` holds nnU-Net's values and
  ``"medclipsam_label_values"`` the table as given (name -> value in the user's masks; written
  whenever a table is given, identical to ``"labels"`` when nothing was remapped). The
  prediction (``ensemble.py``) maps its label maps back to the table's values, so a predicted
  mask can be corrected in the same napari Labels layer and exported again with the same table.
  Appending to a dataset must use its table (a different one is refused, naming the names that
  differ); a mask without a table may only join a dataset with one target.
* Volumes are (Z, Y, X); ``spacing`` is given in that order.

Safety (what nnU-Net can see of an export is always a whole dataset)
------------------------------------------------------------------------
* One writer per dataset ID: every export, append, relabel and repair holds the dataset's lock
  (``RAW/.Dataset{ID:03d}.medclipsam.lock``, a ``filelock``; the kernel lets it go when the
  process dies, so a killed run never leaves it taken). A second writer is refused at once.
* A new dataset is written into a hidden staging folder beside it
  (``RAW/.Dataset{ID:03d}_{Name}.partial-{pid}-{token}``), checked by nnU-Net, and renamed into
  place in one step. A staging folder whose process is gone (the pid in its name is dead, or
  alive but started later than the folder's recorded owner) is removed by the next run.
* An append is journalled: the new files are written and checked in a hidden staging folder
  inside the dataset (``.medclipsam-append-staging``; for the check it also holds links to the
  dataset's own files), then the journal ``.medclipsam-append.json`` listing every file to add
  and the new ``dataset.json``'s hash is written and fsync'd, the labels and images are moved in,
  ``medclipsam_cases.json`` is written and ``dataset.json`` LAST (atomically), then the journal
  is deleted. A journal found by the next export, append, relabel or training of that dataset
  (or ``medclipsam nnunet repair``) means a run died half way: the append is completed when the
  new ``dataset.json`` is in place or every listed file is still there (in the dataset or the
  staging folder), else rolled back (the listed files removed, their cases dropped from
  ``medclipsam_cases.json``); one line says which (:func:`repair_dataset`).
* Cases are never overwritten; :func:`replace_label` is the one deliberate exception.
* Test hook (tests only): ``MEDCLIPSAM_TEST_KILL_AT=POINT[#N]`` SIGKILLs the process at the Nth
  (default first) pass through a named point (:data:`FAULT_POINTS`), so fault tests can kill
  an export between any two steps.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.errors import InputError
from ..core.io import SUPPORTED, file_stem, read_image
from ..core.runtime import process_create_time, process_matches

CASES_FILE = "medclipsam_cases.json"
MASK_SUFFIXES = ("", "_mask", "_seg", "_label", "_labels", "_gt", "-mask", "_segmentation")
_SAFE = re.compile(r"[^A-Za-z0-9-]+")
LABEL_VALUES_KEY = "medclipsam_label_values"
RESERVED_LABEL_NAMES = ("background", "ignore")   # nnU-Net's: label 0, and unannotated pixels
JOURNAL = ".medclipsam-append.json"
APPEND_STAGING = ".medclipsam-append-staging"
KILL_AT_ENV = "MEDCLIPSAM_TEST_KILL_AT"             # test-only fault injection (see above)
FAULT_POINTS = (
    "export:staged",          # new export: every case written into the staging folder
    "export:checked",         # new export: checked, just before the rename into place
    "append:staged",          # append: every case written into the staging folder
    "append:journal",         # append: journal written, nothing moved yet
    "append:move",            # append: after each file moved into the dataset (use #N)
    "append:cases",           # append: medclipsam_cases.json written, dataset.json not yet
    "append:dataset-json",    # append: dataset.json written, journal not deleted yet
)
_OWNER_FILE = ".medclipsam-owner.json"              # inside a new export's staging folder
_PARTIAL_RE = re.compile(r"^\.Dataset\d{3}_[A-Za-z0-9_-]+\.partial-"
                         r"(?:(?P<pid>\d+)-[0-9a-f]{8}|(?P<legacy>[a-z0-9_]{8}))$")
_LEGACY_STALE_S = 24 * 3600.0                       # pid-less staging of an older version
_RELABEL_RE = re.compile(r"^\.[A-Za-z0-9_-]+\.relabel\.(png|nii\.gz)$")
_FAULT_HITS: dict[str, int] = {}
log = logging.getLogger("medclipsam")


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
        Same spatial shape as ``image``; values > 0 are the target, or, with ``label_table``,
        the table's values.
    spacing : tuple of float
        Pixel/voxel size per spatial axis of ``image`` ((Y, X) or (Z, Y, X)).
    corrected : bool
        True when a person corrected the mask; False for a raw zero-shot mask.
    source : str
        Where it came from (file path or napari layer name), recorded in the case list.
    origin : tuple of float or None
        World position of the first voxel (Z, Y, X), for volumes.
    label_table : dict of str to int, optional
        The label table ``mask`` is read with (name -> value); None: binary (> 0 is the target).
    record : dict
        Extra fields for the case's entry in ``medclipsam_cases.json`` (e.g. ``review``).
    """

    case_id: str
    image: np.ndarray
    mask: np.ndarray
    spacing: tuple[float, ...] | None = None
    corrected: bool = False
    source: str = ""
    origin: tuple[float, ...] | None = None
    direction: tuple[float, ...] | None = field(default=None, repr=False)
    label_table: dict[str, int] | None = None
    record: dict = field(default_factory=dict, repr=False)

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
    label_table: dict[str, int] | None = None
    """The dataset's label table (name -> value in the masks); None for a binary export."""
    repaired: list[str] = field(default_factory=list)
    """What the run found and repaired first (a killed export's leftovers), one line each."""


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


# --------------------------------------------------------------------------- label tables


def check_label_table(labels: Mapping[str, int]) -> dict[str, int]:
    """Check a label table (name -> value in the masks) -> a copy sorted by value.

    Background (0) is implicit; a ``"background": 0`` entry (as in a dataset.json) is dropped.

    Raises
    ------
    InputError
        Empty table, an empty or reserved name ("background" other than 0, "ignore"), a value
        that is not an integer >= 1, or two names with one value.
    """
    if not isinstance(labels, Mapping):
        raise InputError(f"The label table must map names to values; got {labels!r}.")
    table: dict[str, int] = {}
    for name, value in labels.items():
        name = str(name).strip()
        if name == "background" and not isinstance(value, bool) and value == 0:
            continue
        if not name:
            raise InputError("A label name is empty: name every label value.")
        if name in RESERVED_LABEL_NAMES:
            raise InputError(f"{name!r} is a name nnU-Net reserves; choose another name.")
        if (isinstance(value, bool) or not isinstance(value, int | np.integer)
                or not 1 <= value <= 65535):
            raise InputError(f"Label {name!r} has the value {value!r}: label values are "
                             "integers from 1 to 65535 (0 is the background).")
        if name in table:
            raise InputError(f"Label {name!r} appears twice in the label table.")
        table[name] = int(value)
    if not table:
        raise InputError("The label table is empty: name at least one label value.")
    by_value: dict[int, list[str]] = {}
    for name, value in table.items():
        by_value.setdefault(value, []).append(name)
    shared = {v: n for v, n in by_value.items() if len(n) > 1}
    if shared:
        v, names = next(iter(shared.items()))
        raise InputError(f"Labels {', '.join(map(repr, names))} share the value {v}: give "
                         "each structure its own value.")
    if len(table) > 255:
        raise InputError(f"{len(table)} labels: at most 255 are supported.")
    return dict(sorted(table.items(), key=lambda kv: kv[1]))


def parse_label_table(text: str) -> dict[str, int]:
    """``"1=left lung, 2=right lung"`` -> ``{"left lung": 1, "right lung": 2}`` (checked).

    Pairs are separated by commas; each is ``value=name`` (``name=value`` is accepted too).
    """
    table: dict[str, int] = {}
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        left, sep, right = (s.strip() for s in part.partition("="))
        if not sep:
            raise InputError(f"{part!r} in the label table is not value=name (e.g. "
                             "'1=left lung,2=right lung').")
        if re.fullmatch(r"\d+", left):
            value, name = int(left), right
        elif re.fullmatch(r"\d+", right):
            value, name = int(right), left
        else:
            raise InputError(f"{part!r} in the label table has no integer value (e.g. "
                             "'1=left lung').")
        if name in table:
            raise InputError(f"Label {name!r} appears twice in the label table.")
        table[name] = value
    return check_label_table(table)


def format_label_table(labels: Mapping[str, int]) -> str:
    """``{"left lung": 1, "right lung": 2}`` -> ``"1=left lung, 2=right lung"``."""
    return ", ".join(f"{v}={n}" for n, v in sorted(labels.items(), key=lambda kv: kv[1]))


def nnunet_label_values(labels: Mapping[str, int]) -> dict[str, int]:
    """The table's names with nnU-Net's consecutive values 1..C, in order of the given values."""
    return {name: i for i, name in enumerate(check_label_table(labels), 1)}


def label_table_of(ds_json: dict) -> dict[str, int]:
    """A dataset's label table: name -> value in the user's masks.

    ``medclipsam_label_values`` when the export recorded one (a table was given), else
    dataset.json's ``labels`` without the background (nnU-Net's values).
    """
    if ds_json.get(LABEL_VALUES_KEY):
        return check_label_table(ds_json[LABEL_VALUES_KEY])
    return {k: int(v) for k, v in sorted(ds_json["labels"].items(), key=lambda kv: kv[1])
            if k != "background" and not isinstance(v, list | tuple)}


def label_table_difference(old: Mapping[str, int], new: Mapping[str, int]) -> str:
    """Which names differ between two tables, in words (empty when they are equal)."""
    parts = []
    missing = [n for n in old if n not in new]
    added = [n for n in new if n not in old]
    moved = [f"{n} ({old[n]} -> {new[n]})" for n in old if n in new and old[n] != new[n]]
    if missing:
        parts.append("missing " + ", ".join(missing))
    if added:
        parts.append("not in the dataset " + ", ".join(added))
    if moved:
        parts.append("other value " + ", ".join(moved))
    return "; ".join(parts)


def check_mask_values(mask: np.ndarray, labels: Mapping[str, int], what: str) -> None:
    """Raise an InputError naming the values of ``mask`` (other than 0) not in ``labels``."""
    found = np.unique(np.asarray(mask))
    allowed = set(labels.values())
    bad = [v for v in found.tolist() if v != 0 and v not in allowed]
    if bad:
        shown = ", ".join(str(v) for v in bad[:10]) + (" ..." if len(bad) > 10 else "")
        raise InputError(f"{what}: label value(s) {shown} are not in the label table "
                         f"({format_label_table(labels)}): name them or erase them.")


def _map_labels(mask: np.ndarray, labels: Mapping[str, int] | None, what: str) -> np.ndarray:
    """Mask -> nnU-Net's uint8 label map: binary (> 0 -> 1) or the table remapped to 1..C."""
    mask = np.asarray(mask)
    if labels is None:
        return (mask > 0).astype(np.uint8)
    check_mask_values(mask, labels, what)
    out = np.zeros(mask.shape, np.uint8)
    for name, new in nnunet_label_values(labels).items():
        out[mask == labels[name]] = new
    return out


# --------------------------------------------------------------------------- case builders


def cases_from_arrays(image: np.ndarray, labels: np.ndarray, name: str, *,
                      spacing: Sequence[float] | None = None,
                      origin: Sequence[float] | None = None, corrected: bool = True,
                      as_slices: bool = False, slices: str = "labelled",
                      rgb: bool | None = None,
                      label_table: Mapping[str, int] | None = None) -> list[ExportCase]:
    """Cases from an in-memory image and its label image (e.g. napari layers' data).

    Parameters
    ----------
    image : np.ndarray
        (Y, X), (Y, X, 3) RGB or (Z, Y, X).
    labels : np.ndarray
        Same spatial shape; values > 0 are the target (or the values of ``label_table``).
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
    label_table : dict of str to int, optional
        Several targets: name -> value in ``labels`` (background 0 implicit); a value of
        ``labels`` not in the table is an InputError. None: binary.
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
    if label_table is not None:
        label_table = check_label_table(label_table)
        check_mask_values(labels, label_table, repr(name))
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
                                  f"{name} [z={z}]", label_table=label_table))
        if not out:
            raise InputError(f"No slice of {name!r} has a label: paint the target on the "
                             "slices to export, or export all slices.")
        return out
    return [ExportCase(case, image, labels, spacing, corrected, name,
                       tuple(float(v) for v in origin) if origin is not None else None,
                       label_table=label_table)]


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
                       corrected: bool = False,
                       label_table: Mapping[str, int] | None = None) -> Iterator[ExportCase]:
    """Yield one case per image/mask pair (read lazily, one pair at a time).

    ``label_table`` (name -> value in the masks) for several targets; None: binary. The masks'
    values are checked against it when the case is exported.
    """
    if label_table is not None:
        label_table = check_label_table(label_table)
    for img_path, mask_path in pair_images_and_masks(images_dir, masks_dir):
        img = read_image(img_path)
        mask = read_image(mask_path).data
        if mask.ndim == 3 and not img.is_volume:
            mask = mask[..., 0]   # an RGB-saved mask
        yield ExportCase(safe_case_id(re.sub(r"_0000$", "", img.name)), img.data, mask,
                         img.spacing, corrected, str(img_path), label_table=label_table,
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


def _prepare(case: ExportCase, label_table: Mapping[str, int] | None = None
             ) -> tuple[np.ndarray, np.ndarray, int, bool]:
    """-> (image channels-last or volume, uint8 nnU-Net label map, n_channels, natural2d).

    The label map is binary without ``label_table``, else the table's values remapped to 1..C.
    """
    image = np.asarray(case.image)
    mask = np.asarray(case.mask)
    if case.is_volume:
        if mask.shape != image.shape:
            raise InputError(f"{case.case_id}: the mask is {_size(mask.shape)} but the volume "
                             f"{_size(image.shape)}: give each image its own mask.")
        return image, _map_labels(mask, label_table, case.case_id), 1, False
    if image.ndim == 3:
        if image.shape[-1] == 4:
            image = image[..., :3]
        if image.shape[-1] != 3:
            raise InputError(f"{case.case_id}: expected (Y, X) or (Y, X, 3); got {image.shape}.")
        if (image[..., 0] == image[..., 1]).all() and (image[..., 0] == image[..., 2]).all():
            image = image[..., 0]
    if mask.shape != image.shape[:2]:
        raise InputError(f"{case.case_id}: the mask is {_size(mask.shape)} but the image "
                         f"{_size(image.shape[:2])}: give each image its own mask.")
    n_channels = 1 if image.ndim == 2 else 3
    natural = image.dtype in (np.uint8, np.uint16)
    return image, _map_labels(mask, label_table, case.case_id), n_channels, natural


def _size(shape: Sequence[int]) -> str:
    return "x".join(str(n) for n in shape)


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
                  name: str, label_table: Mapping[str, int] | None = None) -> dict:
    labels = ({"background": 0, **nnunet_label_values(label_table)} if label_table
              else {"background": 0, label_name: 1})
    out = {
        "name": name,
        "description": "Pseudo-labels exported by napari-medclipsam (MedCLIP-SAMv2 weak "
                       "supervision); see medclipsam_cases.json for which were corrected.",
        "channel_names": channel_names,
        "labels": labels,
        "numTraining": n,
        "file_ending": file_ending,
    }
    if label_table:
        out[LABEL_VALUES_KEY] = dict(label_table)   # name -> value in the user's masks
    return out


def _verify(folder: Path, name: str | None = None) -> None:
    """nnU-Net's ``verify_dataset_integrity``, in a child process (``name``: the dataset's
    name in the message, when ``folder`` is its staging folder).

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
        raise InputError(f"nnU-Net's dataset check failed for {name or folder.name}: {reason}")


# --------------------------------------------------------------------------- faults, locks, repair


def fault_point(name: str) -> None:
    """Test-only hook: SIGKILL this process at ``name`` when ``$MEDCLIPSAM_TEST_KILL_AT`` is
    ``name`` or ``name#N`` (the Nth pass). Does nothing otherwise."""
    spec = os.environ.get(KILL_AT_ENV)
    if not spec:
        return
    point, _, nth = spec.partition("#")
    if point != name:
        return
    _FAULT_HITS[name] = _FAULT_HITS.get(name, 0) + 1
    if _FAULT_HITS[name] >= int(nth or 1):
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))


def lock_path(raw_dir: str | Path, dataset_id: int) -> Path:
    """The lock file every writer of dataset ``dataset_id`` in ``raw_dir`` holds."""
    return Path(raw_dir) / f".Dataset{int(dataset_id):03d}.medclipsam.lock"


def _check_raw_dir(raw_dir: Path) -> None:
    if raw_dir.exists() and not raw_dir.is_dir():
        raise InputError(f"{raw_dir} is a file, not a folder: give nnU-Net's raw folder "
                         "(a folder; it is created if missing).")


@contextlib.contextmanager
def dataset_lock(raw_dir: str | Path, dataset_id: int) -> Iterator[None]:
    """Hold the lock of dataset ``dataset_id`` (refused at once when another process holds it).

    The lock is an OS file lock (``filelock``): it goes with the process, so a killed export
    never leaves the dataset locked; the empty lock file stays (hidden) in ``raw_dir``.
    """
    from filelock import FileLock, Timeout

    raw_dir = Path(raw_dir)
    _check_raw_dir(raw_dir)
    try:
        raw_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        blocker = next((p for p in raw_dir.parents if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            raise InputError(f"{raw_dir} cannot be created here: {blocker} is a file, not a "
                             "folder.") from None
        raise InputError(f"Cannot create {raw_dir} ({exc.strerror or exc}): choose a folder "
                         "you can write to.") from None
    lock = FileLock(str(lock_path(raw_dir, dataset_id)), timeout=0)
    try:
        lock.acquire()
    except Timeout:   # (a TimeoutError, so an OSError: caught first)
        raise InputError(f"Dataset{int(dataset_id):03d} in {raw_dir} is being written by "
                         "another export, append or review right now: wait until it has "
                         "finished, then try again.") from None
    except OSError as exc:
        raise InputError(f"Cannot write in {raw_dir} ({exc.strerror or exc}): choose a folder "
                         "you can write to.") from None
    try:
        yield
    finally:
        lock.release()


def _fsync_dir(folder: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _json_bytes(data) -> bytes:
    return (json.dumps(data, indent=2) + "\n").encode()


def _write_durable(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably (temporary file, fsync, rename,
    fsync of the folder); the file gets the umask's mode."""
    from ..core.io import temporary_name

    tmp = path.parent / temporary_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _sha256(path: Path) -> str | None:
    from ..core.models import file_sha256

    try:
        return file_sha256(path)
    except FileNotFoundError:
        return None


def remove_stale_staging(raw_dir: str | Path) -> list[Path]:
    """Remove the staging folders of new exports whose process is gone; return them.

    Only hidden folders named exactly ``.Dataset{NNN}_{Name}.partial-{pid}-{8 hex}`` are
    considered, and of those only the ones whose pid is dead, or alive but started at another
    time than the owner recorded in the folder (the pid was reused). Staging folders of older
    versions (``.Dataset{NNN}_{Name}.partial-{8 chars}``, no pid) go when older than a day.
    """
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        return []
    removed = []
    for entry in sorted(raw_dir.iterdir()):
        match = _PARTIAL_RE.match(entry.name)
        if match is None or entry.is_symlink() or not entry.is_dir():
            continue
        if match["legacy"]:
            try:
                stale = time.time() - entry.stat().st_mtime > _LEGACY_STALE_S
            except OSError:
                continue
        else:
            try:
                owner = json.loads((entry / _OWNER_FILE).read_text())
                pid, created = int(owner["pid"]), owner.get("create_time")
            except (OSError, ValueError, KeyError, TypeError):
                pid, created = int(match["pid"]), None
            if pid != int(match["pid"]):
                continue   # not a folder we wrote
            stale = process_matches(pid, created) is False
        if stale:
            shutil.rmtree(entry, ignore_errors=True)
            if not entry.exists():
                removed.append(entry)
    return removed


def _journal_cases(journal: dict) -> str:
    cases = list(journal.get("cases", []))
    shown = ", ".join(cases[:5]) + (" ..." if len(cases) > 5 else "")
    return f"{len(cases)} case(s): {shown}" if cases else "no cases"


def _read_journal(folder: Path) -> dict | None:
    path = folder / JOURNAL
    if not path.is_file():
        return None
    try:
        journal = json.loads(path.read_text())
        files = journal["files"]
        if (not isinstance(files, list) or journal.get("staging") != APPEND_STAGING
                or not all(_journal_path_ok(f) for f in files)):
            raise ValueError("unexpected content")
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{path} is not a journal this tool wrote ({exc}): look at it, and "
                         "remove it by hand once the dataset is as it should be.") from None
    return journal


def _journal_path_ok(rel) -> bool:
    return (isinstance(rel, str) and rel.count("/") == 1
            and rel.split("/")[0] in ("imagesTr", "labelsTr")
            and re.fullmatch(r"[A-Za-z0-9_-]+\.(png|nii\.gz)", rel.split("/")[1]) is not None)


def _finish_append(folder: Path, journal: dict) -> None:
    """Roll an append forward from wherever it stopped (idempotent): move the rest of the
    listed files in (labels first), write the case list, then dataset.json, then drop the
    journal and the staging folder."""
    staging = folder / APPEND_STAGING
    files = sorted(journal["files"], key=lambda rel: (not rel.startswith("labelsTr/"), rel))
    for rel in files:
        src, dest = staging / rel, folder / rel
        if dest.exists():
            if src.exists():
                raise InputError(f"{dest} and its staged copy both exist: the dataset was "
                                 "changed during the append; check it by hand.")
            continue
        os.rename(src, dest)
        fault_point("append:move")
    for sub in ("labelsTr", "imagesTr"):
        _fsync_dir(folder / sub)
    if (staging / CASES_FILE).is_file():
        _write_durable(folder / CASES_FILE, (staging / CASES_FILE).read_bytes())
    fault_point("append:cases")
    if _sha256(folder / "dataset.json") != journal["dataset_json_sha256"]:
        _write_durable(folder / "dataset.json", (staging / "dataset.json").read_bytes())
    fault_point("append:dataset-json")
    (folder / JOURNAL).unlink()
    _fsync_dir(folder)
    shutil.rmtree(staging, ignore_errors=True)


def _roll_back_append(folder: Path, journal: dict) -> None:
    """Undo an append that has not written its dataset.json (idempotent): remove the listed
    files from the dataset, drop their cases from the case list, then the journal."""
    for rel in journal["files"]:
        (folder / rel).unlink(missing_ok=True)
    for sub in ("labelsTr", "imagesTr"):
        if (folder / sub).is_dir():
            _fsync_dir(folder / sub)
    path = folder / CASES_FILE
    if path.is_file():
        cases = json.loads(path.read_text())
        kept = {k: v for k, v in cases.items() if k not in set(journal.get("cases", []))}
        if kept != cases:
            if kept or journal.get("had_case_list", True):
                _write_durable(path, _json_bytes(kept))
            else:
                path.unlink()
    (folder / JOURNAL).unlink(missing_ok=True)
    _fsync_dir(folder)
    shutil.rmtree(folder / APPEND_STAGING, ignore_errors=True)


def _repair_folder(folder: Path) -> list[str]:
    """Finish or undo a killed append in ``folder`` and remove a killed run's leftovers there
    (the caller holds the dataset's lock)."""
    from ..core.io import remove_stale_temporaries

    notes = []
    journal = _read_journal(folder)
    if journal is not None:
        staging = folder / APPEND_STAGING
        committed = _sha256(folder / "dataset.json") == journal["dataset_json_sha256"]
        complete = (staging / "dataset.json").is_file() and all(
            (folder / rel).exists() or (staging / rel).exists() for rel in journal["files"])
        who = f"(pid {journal.get('pid', '?')}, {_journal_cases(journal)})"
        if committed or complete:
            _finish_append(folder, journal)
            notes.append(f"{folder.name}: completed an append that was interrupted {who}.")
        else:
            _roll_back_append(folder, journal)
            notes.append(f"{folder.name}: rolled back an append that was interrupted {who}; "
                         "the dataset is as it was before it: export those cases again.")
    elif (folder / APPEND_STAGING).exists():
        shutil.rmtree(folder / APPEND_STAGING, ignore_errors=True)
        notes.append(f"{folder.name}: removed the staging folder of an append that was "
                     "interrupted before it changed the dataset.")
    leftovers = remove_stale_temporaries(folder) + [
        p for p in sorted(folder.iterdir()) if _RELABEL_RE.match(p.name) and p.is_file()]
    for p in leftovers:
        p.unlink(missing_ok=True)
    if leftovers:
        notes.append(f"{folder.name}: removed {len(leftovers)} temporary file(s) of an "
                     "interrupted run.")
    return notes


def _repair_locked(raw_dir: Path, dataset_id: int) -> list[str]:
    notes = [f"Removed the staging folder of an export that was interrupted: {p.name}."
             for p in remove_stale_staging(raw_dir)]
    folder = find_dataset(raw_dir, dataset_id)
    if folder is not None:
        notes += _repair_folder(folder)
    for note in notes:
        log.warning(note)
    return notes


def repair_dataset(raw_dir: str | Path, dataset_id: int) -> list[str]:
    """Find and repair what killed runs left for dataset ``dataset_id`` in ``raw_dir``.

    Completes or rolls back an interrupted append (its journal), removes staging folders of
    killed new exports (of any dataset; only those whose process is gone) and temporary files
    in the dataset. Every export, append and relabel does this first; the training does it
    before planning. Returns one line per thing done (also logged as a warning); [] when
    nothing was left over.
    """
    raw_dir = Path(raw_dir)
    _check_raw_dir(raw_dir)
    if not _may_need_repair(raw_dir, dataset_id):
        return []   # (without taking the lock: a read-only raw folder can still be trained)
    with dataset_lock(raw_dir, dataset_id):
        return _repair_locked(raw_dir, dataset_id)


def _may_need_repair(raw_dir: Path, dataset_id: int) -> bool:
    """Whether a killed run may have left something (cheap: names only, no lock)."""
    if not raw_dir.is_dir():
        return False
    if any(_PARTIAL_RE.match(p.name) for p in raw_dir.iterdir()):
        return True
    folder = find_dataset(raw_dir, dataset_id)
    if folder is None:
        return False
    return any(p.name in (JOURNAL, APPEND_STAGING) or _RELABEL_RE.match(p.name)
               or (p.name.startswith(".") and ".partial-" in p.name)   # core.io temporaries
               for p in folder.iterdir())


def _link_for_check(src: Path, dest: Path) -> None:
    """A link to ``src`` at ``dest`` (hard link, else symbolic), for nnU-Net's check."""
    try:
        os.link(src, dest)
    except OSError:
        os.symlink(src.resolve(), dest)


def _commit_append(folder: Path, staging: Path, written: list[str], ds_json: dict,
                   all_cases: dict, had_case_list: bool, verify: bool) -> None:
    """Move the cases staged in ``staging`` into the dataset ``folder`` (journalled)."""
    ending = ds_json["file_ending"]
    files = [f"labelsTr/{c}{ending}" for c in written] + [
        f"imagesTr/{c}_0000{ending}" for c in written]
    for rel in files:
        if (folder / rel).exists():
            raise InputError(f"{folder / rel} appeared during the export; stopped.")
        _fsync_file(staging / rel)
    new_json = _json_bytes(ds_json)
    _write_durable(staging / "dataset.json", new_json)
    _write_durable(staging / CASES_FILE, _json_bytes(all_cases))
    if verify:
        # nnU-Net checks a whole dataset: the staging folder gets links to the dataset's own
        # files beside the new ones, so the check runs before the dataset changes at all.
        for sub in ("imagesTr", "labelsTr"):
            for f in sorted((folder / sub).iterdir()):
                if f.is_file() and not f.name.startswith("."):
                    _link_for_check(f, staging / sub / f.name)
        _verify(staging, folder.name)
    for sub in ("imagesTr", "labelsTr"):
        _fsync_dir(staging / sub)
    _fsync_dir(staging)
    fault_point("append:staged")
    journal = {"format": 1, "pid": os.getpid(), "create_time": process_create_time(),
               "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "staging": APPEND_STAGING,
               "cases": list(written), "files": files,
               "dataset_json_sha256": hashlib.sha256(new_json).hexdigest(),
               "had_case_list": had_case_list}
    _write_durable(folder / JOURNAL, _json_bytes(journal))
    fault_point("append:journal")
    try:
        _finish_append(folder, journal)
    except BaseException:
        if _sha256(folder / "dataset.json") != journal["dataset_json_sha256"]:
            _roll_back_append(folder, journal)
        raise


def export_dataset(cases: Iterable[ExportCase], raw_dir: str | Path, dataset_id: int,
                   name: str, *, label_name: str = "target",
                   label_table: Mapping[str, int] | None = None,
                   channel_name: str | None = None, append: bool = False, verify: bool = True,
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
        Binary export: the name of label 1 in dataset.json (e.g. "tumor"); unused with a table.
    label_table : dict of str to int, optional
        Several targets in one label map: name -> value in the masks (background 0 implicit),
        e.g. ``{"left lung": 1, "right lung": 2, "nodule": 3}``; masks keep their values
        (remapped in order to 1..C if they are not consecutive; see the module docstring).
        Default: each case's own ``label_table``, else binary (values > 0 -> 1). When appending
        it must equal the dataset's table.
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
        mixed channel counts or file types, empty masks everywhere, a mask value not in the
        label table, a table other than the dataset's, or a failed check.
    """
    raw_dir = Path(raw_dir)
    folder_name = dataset_folder_name(dataset_id, name)
    with dataset_lock(raw_dir, dataset_id):
        repaired = _repair_locked(raw_dir, dataset_id)
        result = _export_locked(cases, raw_dir, dataset_id, name, folder_name,
                                label_name=label_name, label_table=label_table,
                                channel_name=channel_name, append=append, verify=verify,
                                progress=progress)
    result.repaired = repaired
    return result


def _export_locked(cases: Iterable[ExportCase], raw_dir: Path, dataset_id: int, name: str,
                   folder_name: str, *, label_name: str, label_table: Mapping[str, int] | None,
                   channel_name: str | None, append: bool, verify: bool,
                   progress: Callable[[int, int | None], None] | None) -> ExportResult:
    existing = find_dataset(raw_dir, dataset_id)
    if existing is not None and not append:
        raise InputError(f"{existing} exists already: add cases to it with append "
                         f"(--append), or choose another dataset ID.")
    if existing is not None and existing.name != folder_name:
        raise InputError(f"Dataset ID {dataset_id} is {existing.name}, not {folder_name}: use "
                         f"its name or another ID.")
    old_json: dict | None = None
    old_cases: dict = {}
    if existing is not None:
        old_json = json.loads((existing / "dataset.json").read_text())
        if (existing / CASES_FILE).is_file():
            old_cases = json.loads((existing / CASES_FILE).read_text())
        _check_orphans(existing, old_json["file_ending"])
    table = check_label_table(label_table) if label_table is not None else None
    # The dataset's table: the existing one, the one given, or the first case's.
    ds_table = label_table_of(old_json) if old_json else table
    if old_json and table is not None and table != ds_table:
        raise _table_error(folder_name, ds_table, table)
    saw_binary = False

    if existing is None:
        # beside the dataset; renamed into place whole. The owner file tells a later run
        # whether the process that writes it is still alive.
        staging = raw_dir / f".{folder_name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
        staging.mkdir()
        (staging / _OWNER_FILE).write_text(json.dumps(
            {"pid": os.getpid(), "create_time": process_create_time()}))
    else:
        # inside the dataset (hidden, so nnU-Net ignores it): the moves are renames
        staging = existing / APPEND_STAGING
        shutil.rmtree(staging, ignore_errors=True)   # no journal: nothing was moved from it
        staging.mkdir()
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
                    existing is not None and case_exists(existing, case.case_id)):
                raise InputError(f"Case {case.case_id!r} exists already in {folder_name}: "
                                 "cases are never overwritten; rename it.")
            case_table = table
            if case.label_table is not None:
                own = check_label_table(case.label_table)
                if table is not None and own != table:
                    raise InputError(f"{case.case_id} was read with the label table "
                                     f"{format_label_table(own)}, not the one given "
                                     f"({label_table_difference(table, own)}).")
                case_table = own
            if case_table is None:
                if ds_table is not None and len(ds_table) > 1:
                    raise InputError(f"{folder_name} has several labels "
                                     f"({format_label_table(ds_table)}): give its label table "
                                     f"to export {case.case_id} (--labels).")
                saw_binary = True
            elif ds_table is None:
                if saw_binary and len(case_table) > 1:
                    raise InputError(f"{case.case_id} has several labels but earlier cases "
                                     "were binary: give one label table for all cases.")
                ds_table = case_table
            elif case_table != ds_table:
                raise _table_error(folder_name, ds_table, case_table)
            prepared = _prepare(case, case_table)
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
                "foreground_fraction": round(float((prepared[1] > 0).mean()), 6)}
            if case_table is not None and len(case_table) > 1:
                written[case.case_id]["label_fractions"] = {
                    n: round(float((prepared[1] == v).mean()), 6)
                    for n, v in nnunet_label_values(case_table).items()}
            written[case.case_id].update(case.record)
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
                                n_total, file_ending, name, ds_table)
        if old_json:
            ds_json = {**old_json, "numTraining": n_total}
        if existing is None:
            write_json(staging / "dataset.json", ds_json)
            write_json(staging / CASES_FILE, all_cases)
            fault_point("export:staged")
            if verify:
                _verify(staging, folder_name)
            (staging / _OWNER_FILE).unlink()
            for sub in ("imagesTr", "labelsTr"):
                for f in (staging / sub).iterdir():
                    _fsync_file(f)
                _fsync_dir(staging / sub)
            fault_point("export:checked")
            target = raw_dir / folder_name
            staging.rename(target)   # one atomic step: the dataset appears whole or not at all
            staging = None
            _fsync_dir(raw_dir)
        else:
            target = existing
            _commit_append(existing, staging, list(written), ds_json, all_cases,
                           (existing / CASES_FILE).is_file(), verify)
            staging = None
        n_corr = sum(v["corrected"] for v in written.values())
        return ExportResult(target, folder_name, list(written), n_corr, len(written) - n_corr,
                            file_ending, existing is not None, converted,
                            label_table_of(ds_json) if LABEL_VALUES_KEY in ds_json
                            or len(label_table_of(ds_json)) > 1 else None)
    finally:
        if staging is not None and staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def replace_label(folder: str | Path, case_id: str, mask: np.ndarray, *,
                  label_table: Mapping[str, int] | None = None, corrected: bool = True,
                  record: dict | None = None, verify: bool = True) -> dict:
    """Replace the label of a case already in a dataset (a reviewed or re-reviewed case).

    The one exception to "cases are never overwritten", for a deliberate correction: a raw
    zero-shot pseudo-label corrected by a person, or a corrected one corrected again. The
    image is kept; the new label is written beside the dataset, checked (shape, values), moved
    into ``labelsTr`` in one step, the case's entry in ``medclipsam_cases.json`` is updated
    (``corrected``, ``relabelled``, ``relabelled_from``, ``record``), and nnU-Net's check runs
    (``verify``); if it fails the old label and record are put back.

    Parameters
    ----------
    folder : path
        The dataset folder (``RAW/Dataset{ID:03d}_{Name}``).
    mask : np.ndarray
        The case's spatial shape; values as in ``label_table`` (default: the dataset's table
        if it has several labels, else binary: > 0 is the target).

    Returns
    -------
    dict
        The case's new entry in ``medclipsam_cases.json``.
    """
    folder = Path(folder)
    match = re.match(r"Dataset(\d{3})_", folder.name)
    if match is None or not folder.is_dir():
        raise InputError(f"{folder} is not a dataset folder (RAW/Dataset{{NNN}}_{{Name}}).")
    with dataset_lock(folder.parent, int(match[1])):
        _repair_locked(folder.parent, int(match[1]))
        return _replace_label_locked(folder, case_id, mask, label_table=label_table,
                                     corrected=corrected, record=record, verify=verify)


def _replace_label_locked(folder: Path, case_id: str, mask: np.ndarray, *,
                          label_table: Mapping[str, int] | None, corrected: bool,
                          record: dict | None, verify: bool) -> dict:
    ds_json = json.loads((folder / "dataset.json").read_text())
    ending = ds_json["file_ending"]
    lab_path = folder / "labelsTr" / f"{case_id}{ending}"
    if not lab_path.is_file():
        raise InputError(f"{folder.name} has no case {case_id!r}: export it first.")
    ds_table = label_table_of(ds_json)
    table = check_label_table(label_table) if label_table is not None else None
    if table is None and (LABEL_VALUES_KEY in ds_json or len(ds_table) > 1):
        table = ds_table
    if table is not None and table != ds_table:
        raise _table_error(folder.name, ds_table, table)
    new = _map_labels(mask, table, case_id)
    old_bytes = lab_path.read_bytes()
    cases = read_case_list(folder)
    tmp = folder / f".{case_id}.relabel{ending}"
    try:
        if ending == ".png":
            import imageio.v3 as iio

            shape = iio.imread(lab_path).shape
            if new.shape != shape:
                raise InputError(f"{case_id}: the mask is {new.shape}, the case {shape}.")
            _write_png(tmp, new)
        else:
            import SimpleITK as sitk

            old = sitk.ReadImage(str(lab_path))
            shape = tuple(reversed(old.GetSize()))
            if new.shape != shape:
                raise InputError(f"{case_id}: the mask is {new.shape}, the case {shape}.")
            img = sitk.GetImageFromArray(np.ascontiguousarray(new))
            img.CopyInformation(old)   # spacing, origin, direction of the case
            sitk.WriteImage(img, str(tmp), useCompression=True)
        entry = dict(cases.get(case_id, {}))
        entry.update({
            "corrected": bool(corrected), "relabelled": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "relabelled_from": "corrected" if entry.get("corrected") else "zero-shot",
            "foreground_fraction": round(float((new > 0).mean()), 6)})
        if table is not None and len(table) > 1:
            entry["label_fractions"] = {n: round(float((new == v).mean()), 6)
                                        for n, v in nnunet_label_values(table).items()}
        entry.update(record or {})
        tmp.replace(lab_path)   # one step: the case has its old label or the new one
        try:
            write_json(folder / CASES_FILE, {**cases, case_id: entry})
            if verify:
                _verify(folder)
        except BaseException:
            tmp.write_bytes(old_bytes)
            tmp.replace(lab_path)
            write_json(folder / CASES_FILE, cases)
            raise
        return entry
    finally:
        tmp.unlink(missing_ok=True)


def _table_error(folder_name: str, old: Mapping[str, int], new: Mapping[str, int]
                 ) -> InputError:
    return InputError(f"{folder_name} uses the label table {format_label_table(old)}; this one "
                      f"differs ({label_table_difference(old, new)}): use the same names and "
                      "values, or export to a new dataset.")


def _label_of(ds_json: dict) -> str:
    return next((k for k, v in ds_json["labels"].items() if v == 1), "target")


def case_exists(folder: Path, case_id: str) -> bool:
    """Whether the dataset folder holds an image or a label of ``case_id``."""
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


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` as indented JSON, atomically (a temporary file renamed into place)."""
    from ..core.io import write_text

    write_text(path, json.dumps(data, indent=2) + "\n")


def read_case_list(folder: str | Path) -> dict[str, dict]:
    """The per-case record (corrected or zero-shot, source) of an exported dataset."""
    path = Path(folder) / CASES_FILE
    return json.loads(path.read_text()) if path.is_file() else {}
