"""napari reader for scans: NIfTI files, DICOM files and DICOM series folders.

Reading itself is :mod:`napari_medclipsam.core.io` (``read_image`` and
``read_dicom_series``), so the CLI and napari read a file the same way; this module only turns
an :class:`~napari_medclipsam.core.io.ImageData` into napari's layer data tuple:

* ``scale``: voxel spacing in (Z, Y, X) order (for a DICOM series, the step between sorted
  slice positions, not SliceThickness);
* ``translate``: the origin in the same order (see
  :func:`~napari_medclipsam.core.io.scale_translate_from_affine`; for an axis-aligned scan it is
  the NIfTI affine's translation, or the first slice's ImagePositionPatient, reversed to
  (z, y, x));
* ``contrast_limits``: the DICOM WindowCenter/Width when valid, else the 0.5-99.5 percentiles;
* ``metadata``: ``affine`` (4x4 voxel -> RAS) and ``source_path``, which the NIfTI labels
  writer (:mod:`._io.writers`) reuses, plus what the file said (modality, series, ...).

A folder holding several DICOM series opens its largest series; the layer name says
``(series 1 of N)`` and a notification lists the others (``metadata["other_series"]``).

Nothing here imports torch, open_clip or torchvision.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..core.io import (
    DICOM_SUFFIXES,
    NIFTI_SUFFIXES,
    ImageData,
    auto_window,
    is_dicom_file,
    read_dicom_series,
    read_image,
)

LayerData = tuple[Any, dict[str, Any], str]

# percentiles of ~4 M strided voxels match the whole-volume ones closely and take ~0.1 s
_WINDOW_SAMPLES = 1 << 22


def get_reader(path: str | list[str]) -> Callable[[str | list[str]], list[LayerData]] | None:
    """npe2 reader getter: a reader for NIfTI, DICOM files and DICOM folders, else None.

    A list of paths (napari's "open as stack") is read as one DICOM series when every path
    is a DICOM file.
    """
    if isinstance(path, list | tuple):
        if len(path) == 1:
            return get_reader(path[0])
        if path and all(_is_dicom(Path(p)) for p in path):
            return read_scan
        return None
    p = Path(path)
    if p.is_dir():
        return read_scan if _folder_has_dicom(p) else None
    name = p.name.lower()
    if name.endswith(NIFTI_SUFFIXES) or _is_dicom(p):
        return read_scan
    return None


def read_scan(path: str | list[str]) -> list[LayerData]:
    """Read a NIfTI file, a DICOM file, a DICOM folder or a list of DICOM files.

    Raises :class:`~napari_medclipsam.core.errors.InputError` (one line saying what is wrong)
    for a file that cannot be read; napari shows it as a notification.
    """
    if isinstance(path, list | tuple):
        image = read_image(path[0]) if len(path) == 1 else read_dicom_series(list(path))
    elif Path(path).is_dir():
        image = read_dicom_series(path)
    else:
        image = read_image(path)
    return [image_layer_data(image)]


def image_layer_data(image: ImageData) -> LayerData:
    """:class:`ImageData` -> ``(data, kwargs, "image")`` with scale, translate, window and
    the source geometry in ``metadata``."""
    data = image.data
    rgb = not image.is_volume and data.ndim == 3
    spatial = data.ndim - 1 if rgb else data.ndim
    meta = image.meta
    name = image.name or Path(image.path).name
    others = meta.get("other_series") or []
    if others:
        name = f"{name} (series 1 of {len(others) + 1})"
        _notify(f"{image.path} holds {len(others) + 1} DICOM series; opened the largest "
                f"({data.shape[0] if image.is_volume else 1} images). Others: "
                + "; ".join(f"{desc or uid} ({n} files)" for uid, desc, n in others))
    metadata: dict[str, Any] = {
        "source_path": str(meta.get("source_path", image.path)),
        "spacing": tuple(float(s) for s in image.spacing),
    }
    for key in ("affine", "qform_code", "sform_code", "origin", "modality",
                "series_instance_uid", "series_description", "sorted_by", "other_series",
                "irregular_spacing", "dropped_files"):
        value = meta.get(key)
        if value is not None and not (isinstance(value, str | list) and not value):
            metadata[key] = value
    if "affine" in metadata:
        metadata["affine"] = np.asarray(metadata["affine"], dtype=np.float64)
    kwargs: dict[str, Any] = {
        "name": name,
        "scale": tuple(float(s) for s in image.spacing[-spatial:]),
        "metadata": metadata,
    }
    origin = meta.get("origin")
    if origin is not None and len(origin) == spatial:
        kwargs["translate"] = tuple(float(t) for t in origin)
    if rgb:
        kwargs["rgb"] = True
    else:
        window = meta.get("window") or auto_window(data, max_values=_WINDOW_SAMPLES)
        kwargs["contrast_limits"] = [float(window.low), float(window.high)]
        metadata["window"] = (float(window.low), float(window.high))
    return (data, kwargs, "image")


def _is_dicom(path: Path) -> bool:
    return path.is_file() and (path.name.lower().endswith(DICOM_SUFFIXES)
                               or is_dicom_file(path))


def _folder_has_dicom(folder: Path) -> bool:
    """Cheap check: stops at the first file (hidden ones skipped) with the DICM mark."""
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and is_dicom_file(Path(root) / name):
                return True
    return False


def _notify(message: str) -> None:
    try:
        from napari.utils.notifications import show_info
    except ImportError:  # pragma: no cover - the reader always runs inside napari
        return
    show_info(message)
