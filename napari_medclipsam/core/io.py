"""Reading images and volumes, intensity windowing, and safe (atomic) writing.

Conventions
-----------
* 2-D images are returned as they are stored: (H, W) grayscale, (H, W, 3) RGB or
  (H, W, 4) RGBA, any of uint8, uint16, int16, float.
* Volumes are (Z, Y, X): NIfTI data, stored (X, Y, Z), is transposed on reading and
  back on writing, and the original affine is kept, so a mask written with
  :func:`write_nifti_like` overlays the scan in any viewer.
* Geometry: ``meta["affine"]`` is a NIfTI-style 4x4 voxel -> RAS millimetre matrix whose
  columns follow the *stored* index order (x/column, y/row, z/slice), for NIfTI files and for
  DICOM (built from ImageOrientationPatient, PixelSpacing, slice positions and
  ImagePositionPatient, converted from DICOM's LPS to RAS). ``spacing`` and ``meta["origin"]``
  are the same geometry in the order of ``data`` ((Z, Y, X) or (Y, X)); see
  :func:`scale_translate_from_affine`.
* Models see HxWx3 uint8 RGB. :func:`to_rgb_uint8` makes it:

  - uint8 data is used as it is (grayscale replicated to three channels; alpha dropped);
  - any other dtype is *windowed*: values are clipped to ``[low, high]`` and scaled to
    0..255. The window is given explicitly (``Window.from_center_width(-600, 1500)``
    for a CT lung window, in Hounsfield units) or, by default, taken from the 0.5th and
    99.5th percentiles of the image, or of the whole volume for volumes, so every slice
    of a scan is windowed the same way.
"""

from __future__ import annotations

import os
import re
import secrets
import stat
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
DICOM_SUFFIXES = (".dcm", ".dicom")
SUPPORTED = IMAGE_SUFFIXES + NIFTI_SUFFIXES + DICOM_SUFFIXES


@dataclass(frozen=True)
class Window:
    """An intensity window ``[low, high]`` mapped to 0..255."""

    low: float
    high: float

    def __post_init__(self) -> None:
        if not np.isfinite([self.low, self.high]).all() or self.high <= self.low:
            raise InputError(f"A window needs low < high; got [{self.low}, {self.high}].")

    @classmethod
    def from_center_width(cls, center: float, width: float) -> Window:
        return cls(center - width / 2.0, center + width / 2.0)

    @classmethod
    def parse(cls, text: str) -> Window:
        """``"C,W"`` (centre and width, e.g. ``-600,1500``) -> Window."""
        try:
            center, width = (float(v) for v in text.split(","))
        except ValueError as exc:
            raise InputError(f"A window is 'CENTER,WIDTH' (e.g. -600,1500); got {text!r}.") \
                from exc
        return cls.from_center_width(center, width)


@dataclass
class ImageData:
    """An image or volume read from disk.

    Attributes
    ----------
    data : np.ndarray
        (H, W), (H, W, C) or, for volumes, (Z, Y, X).
    is_volume : bool
        True for 3-D scalar volumes.
    spacing : tuple of float
        Pixel/voxel size per axis of ``data`` (1.0 where unknown).
    path : Path
    meta : dict
        ``affine`` and ``header`` for NIfTI; free-form otherwise.
    """

    data: np.ndarray
    is_volume: bool
    spacing: tuple[float, ...]
    path: Path
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return file_stem(self.path)


def file_stem(path: str | Path) -> str:
    """File name without its (double) suffix: ``case_01.nii.gz`` -> ``case_01``."""
    name = Path(path).name
    for suffix in (".nii.gz", *SUPPORTED):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def read_image(path: str | Path) -> ImageData:
    """Read a PNG/JPEG/TIFF/BMP image, a NIfTI image or volume, or a DICOM file.

    Raises
    ------
    InputError
        For a missing, empty, unreadable or unsupported file, with what to do instead.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"Image not found: {path}.")
    if path.stat().st_size == 0:
        raise InputError(f"{path} is empty (0 bytes).")
    suffix = _suffix(path)
    try:
        if suffix in NIFTI_SUFFIXES:
            return _read_nifti(path)
        if suffix in DICOM_SUFFIXES or (suffix not in SUPPORTED and is_dicom_file(path)):
            return _read_dicom(path)
        if suffix in IMAGE_SUFFIXES:
            return _read_raster(path)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"Could not read {path}: {type(exc).__name__}: {exc}") from exc
    raise InputError(f"{path.name}: unsupported file type {suffix!r}; supported: "
                     f"{', '.join(SUPPORTED)}.")


def _read_raster(path: Path) -> ImageData:
    if _suffix(path) in (".tif", ".tiff"):
        import tifffile

        data = tifffile.imread(str(path))
    else:
        import imageio.v3 as iio

        data = iio.imread(str(path))
    data = np.asarray(data)
    return _classify(data, path, spacing=None, meta={})


def _classify(data: np.ndarray, path: Path, spacing, meta) -> ImageData:
    data = np.squeeze(data) if data.ndim > 3 else data
    if data.ndim == 2:
        return ImageData(data, False, tuple(spacing or (1.0, 1.0)), path, meta)
    if data.ndim == 3 and data.shape[-1] in (3, 4) and data.shape[0] > 4:
        return ImageData(data, False, tuple(spacing or (1.0, 1.0)), path, meta)
    if data.ndim == 3 and data.shape[-1] == 1:
        return ImageData(data[..., 0], False, tuple(spacing or (1.0, 1.0)), path, meta)
    if data.ndim == 3:
        return ImageData(data, True, tuple(spacing or (1.0, 1.0, 1.0)), path, meta)
    raise InputError(f"{path.name}: cannot use an array of shape {data.shape}; expected a 2-D "
                     "image (H, W[, C]) or a 3-D volume (Z, Y, X).")


def _read_nifti(path: Path) -> ImageData:
    import nibabel as nib

    img = nib.load(str(path))
    data = np.asarray(img.dataobj)
    zooms = tuple(float(z) for z in img.header.get_zooms()[: data.ndim])
    meta = {"affine": img.affine, "header": img.header,
            "qform_code": int(img.header["qform_code"]),
            "sform_code": int(img.header["sform_code"])}
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim == 2 or (data.ndim == 3 and data.shape[2] == 1):
        meta["origin"] = scale_translate_from_affine(img.affine, 2)[1]
        data = data if data.ndim == 2 else data[:, :, 0]
        return ImageData(data.T, False, zooms[:2][::-1], path, meta)
    if data.ndim == 3:
        meta["origin"] = scale_translate_from_affine(img.affine, 3)[1]
        return ImageData(np.ascontiguousarray(data.transpose(2, 1, 0)), True, zooms[::-1],
                         path, meta)
    raise InputError(f"{path.name}: NIfTI with shape {data.shape} is not supported "
                     "(expected 2-D or 3-D scalar data).")


# --------------------------------------------------------------------------- geometry

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def scale_translate_from_affine(affine: np.ndarray, ndim: int = 3
                                ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """A NIfTI-style 4x4 affine -> (spacing, origin) in the order of the data, (Z, Y, X).

    ``spacing`` holds the lengths of the affine's first ``ndim`` columns. ``origin`` is the
    world position of voxel 0 expressed along the voxel axes (the translation ``t`` solved
    in the frame of the normalised columns ``R``: ``R @ origin = t``). For the usual
    axis-aligned scan (RAS, positive diagonal) that is the affine's translation itself,
    reversed to (z, y, x); an axis stored flipped keeps its world coordinate measured along
    the voxel axis, so world positions in napari stay in millimetres along each data axis.
    """
    affine = np.asarray(affine, dtype=np.float64)
    columns = affine[:3, :ndim]
    zooms = np.linalg.norm(columns, axis=0)
    zooms = np.where(zooms > 0, zooms, 1.0)
    origin = np.linalg.lstsq(columns / zooms, affine[:3, 3], rcond=None)[0]
    return (tuple(float(z) for z in zooms[::-1]), tuple(float(o) for o in origin[::-1]))


def affine_from_scale_translate(scale, translate) -> np.ndarray:
    """napari ``scale``/``translate`` in (Z, Y, X) or (Y, X) order -> 4x4 NIfTI affine.

    An axis-aligned affine (no rotation, no flip): the inverse of
    :func:`scale_translate_from_affine` for scans stored that way.
    """
    scale = [float(s) for s in scale][::-1]
    translate = [float(t) for t in translate][::-1]
    affine = np.eye(4)
    for axis, (step, shift) in enumerate(zip(scale, translate, strict=True)):
        affine[axis, axis] = step
        affine[axis, 3] = shift
    return affine


# --------------------------------------------------------------------------- DICOM


def is_dicom_file(path: str | Path) -> bool:
    """True for a file carrying DICOM's ``DICM`` marker at byte 128 (cheap: reads 132 bytes)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def _first(value) -> float:
    """A DICOM decimal string that may be multi-valued -> its first value."""
    from pydicom.multival import MultiValue

    if isinstance(value, MultiValue | list | tuple):
        value = value[0]
    return float(value)


def _dicom_window(ds) -> Window | None:
    """WindowCenter/WindowWidth (in rescaled units, e.g. HU) when present and valid."""
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is None or width is None:
        return None
    try:
        center, width = _first(center), _first(width)
    except (TypeError, ValueError, IndexError):
        return None
    if not np.isfinite([center, width]).all() or width <= 0:
        return None
    return Window.from_center_width(center, width)


def _rescale(ds) -> tuple[float, float]:
    slope = ds.get("RescaleSlope")
    intercept = ds.get("RescaleIntercept")
    slope = float(slope) if slope not in (None, "") else 1.0
    return (slope or 1.0), (float(intercept) if intercept not in (None, "") else 0.0)


def _orientation(ds) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Unit row, column and normal directions (LPS) from ImageOrientationPatient."""
    iop = ds.get("ImageOrientationPatient")
    if iop is None or len(iop) != 6:
        return None
    row, col = np.asarray(iop[:3], dtype=np.float64), np.asarray(iop[3:], dtype=np.float64)
    normal = np.cross(row, col)
    if np.linalg.norm(normal) < 1e-6:
        return None
    return (row / np.linalg.norm(row), col / np.linalg.norm(col),
            normal / np.linalg.norm(normal))


def _dicom_affine(ds, slice_step: float) -> np.ndarray | None:
    """Voxel (column, row, slice) -> RAS affine from orientation, spacing and position."""
    frame = _orientation(ds)
    position = ds.get("ImagePositionPatient")
    spacing = ds.get("PixelSpacing")
    if frame is None or position is None or len(position) != 3:
        return None
    row_step, col_step = (float(s) for s in spacing) if spacing is not None else (1.0, 1.0)
    row, col, normal = frame
    lps = np.eye(4)
    lps[:3, 0] = row * col_step      # along a row: increasing column index
    lps[:3, 1] = col * row_step      # down a column: increasing row index
    lps[:3, 2] = normal * slice_step
    lps[:3, 3] = np.asarray(position, dtype=np.float64)
    return _LPS_TO_RAS @ lps


def _slice_step(ds) -> float:
    for key in ("SpacingBetweenSlices", "SliceThickness"):
        value = ds.get(key)
        if value not in (None, "") and float(value) > 0:
            return float(value)
    return 1.0


def _dicom_meta(ds, path) -> dict[str, Any]:
    return {"modality": str(ds.get("Modality", "")),
            "series_instance_uid": str(ds.get("SeriesInstanceUID", "")),
            "series_description": str(ds.get("SeriesDescription", "")),
            "source_path": str(path)}


def _read_dicom(path: Path) -> ImageData:
    import pydicom

    ds = pydicom.dcmread(str(path))
    if "PixelData" not in ds:
        raise InputError(f"{path.name}: the DICOM file holds no image (no PixelData).")
    data = ds.pixel_array.astype(np.float32)
    rgb = ds.get("PhotometricInterpretation") == "RGB"
    if not rgb:
        slope, intercept = _rescale(ds)
        data = data * slope + intercept
        if ds.get("PhotometricInterpretation") == "MONOCHROME1":
            data = data.max() + data.min() - data
    pixel = ds.get("PixelSpacing")
    pixel = tuple(float(s) for s in pixel) if pixel is not None else (1.0, 1.0)
    meta = _dicom_meta(ds, path)
    window = _dicom_window(ds)
    if window is not None:
        meta["window"] = window
    if rgb:
        return _classify(data.astype(np.uint8), path, pixel, meta)
    step = _slice_step(ds)
    affine = _dicom_affine(ds, step)
    if affine is not None:
        meta["affine"] = affine
    if data.ndim == 3 and data.shape[-1] not in (3, 4):   # multi-frame: (frames, rows, cols)
        if affine is not None:
            meta["origin"] = scale_translate_from_affine(affine, 3)[1]
        return ImageData(data, True, (step, *pixel), path, meta)
    if affine is not None:
        meta["origin"] = scale_translate_from_affine(affine, 2)[1]
    return _classify(data, path, pixel, meta)


def _dicom_files(source) -> list[Path]:
    """DICOM files under a folder (recursively; hidden entries and DICOMDIR skipped), or the
    given list of files; recognised by the 'DICM' marker, whatever their names."""
    if isinstance(source, str | os.PathLike):
        folder = Path(source)
        if not folder.is_dir():
            raise InputError(f"Not a folder: {folder}.")
        candidates = []
        for root, dirs, files in os.walk(folder):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            candidates += [Path(root) / f for f in sorted(files)
                           if not f.startswith(".") and f.upper() != "DICOMDIR"]
    else:
        candidates = [Path(p) for p in source]
    return [p for p in candidates if p.is_file() and is_dicom_file(p)]


def read_dicom_series(source: str | Path | list[str | Path]) -> ImageData:
    """Read one DICOM series as a (Z, Y, X) volume (or (Y, X) for a single slice).

    Parameters
    ----------
    source : folder or list of files
        A folder is searched recursively; files are recognised by the ``DICM`` marker
        (extension-less and UID-named files work).

    Returns
    -------
    ImageData
        ``data`` is int16/int32 when RescaleSlope/Intercept keep values integral, else
        float32, with the rescale applied (Hounsfield units for CT). Slices are sorted by
        ImagePositionPatient projected on the slice normal (ImageOrientationPatient's row x
        column), falling back to InstanceNumber, then file name, when positions are missing.
        ``spacing`` is (median step between sorted positions, row spacing, column spacing).
        ``meta`` holds ``affine`` (4x4, voxel (column, row, slice) -> RAS mm; see the module
        docstring), ``origin`` ((Z, Y, X), from the first sorted slice's
        ImagePositionPatient), ``window`` (WindowCenter/Width when valid), ``sorted_by``,
        ``files`` (sorted) and, when the folder holds several series, ``other_series`` (the
        largest series is read; the others are listed as (uid, description, n_files)).

    Raises
    ------
    InputError
        No DICOM image found, unreadable pixel data, or several images at one position.
    """
    import pydicom

    label = str(source) if isinstance(source, str | os.PathLike) else f"{len(source)} files"
    files = _dicom_files(source)
    headers = []
    for f in files:
        try:
            ds = pydicom.dcmread(str(f), stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - a broken file among many is skipped
            continue
        if "Rows" in ds and "Columns" in ds:
            headers.append((f, ds))
    if not headers:
        raise InputError(f"No DICOM image found in {label} (files are recognised by the "
                         "'DICM' marker at byte 128).")

    series: dict[str, list] = {}
    for f, ds in headers:
        series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((f, ds))
    ranked = sorted(series.items(), key=lambda kv: len(kv[1]), reverse=True)
    uid, members = ranked[0]
    others = [(u, str(m[0][1].get("SeriesDescription", "")), len(m)) for u, m in ranked[1:]]

    # keep the slices sharing the most common geometry (a localizer can share the series)
    def geometry(ds):
        iop = ds.get("ImageOrientationPatient")
        iop = tuple(round(float(v), 4) for v in iop) if iop is not None else None
        return int(ds.Rows), int(ds.Columns), iop

    kinds: dict[tuple, list] = {}
    for f, ds in members:
        kinds.setdefault(geometry(ds), []).append((f, ds))
    members = max(kinds.values(), key=len)
    dropped = sum(len(v) for v in kinds.values()) - len(members)

    frame = _orientation(members[0][1])
    positions = [ds.get("ImagePositionPatient") for _, ds in members]
    if frame is not None and all(p is not None and len(p) == 3 for p in positions):
        keys = [float(np.dot(frame[2], np.asarray(p, dtype=np.float64))) for p in positions]
        sorted_by = "ImagePositionPatient"
    elif all(ds.get("InstanceNumber") not in (None, "") for _, ds in members):
        keys = [float(ds.InstanceNumber) for _, ds in members]
        sorted_by = "InstanceNumber"
    else:
        keys = list(range(len(members)))
        sorted_by = "file name"
    order = np.argsort(np.asarray(keys), kind="stable")
    members = [members[i] for i in order]
    keys = np.asarray(keys, dtype=np.float64)[order]
    if len(members) > 1 and sorted_by != "file name" and np.unique(keys).size < len(keys):
        raise InputError(
            f"{label}: {len(members)} images share {np.unique(keys).size} slice positions "
            f"({sorted_by}); the series holds several images per position (echoes, time "
            "points or duplicates). Put one of them in a folder of its own.")

    first_ds = members[0][1]
    meta = _dicom_meta(first_ds, members[0][0])
    meta["source_path"] = str(source) if isinstance(source, str | os.PathLike) \
        else str(Path(members[0][0]).parent)
    meta.update(sorted_by=sorted_by, files=[str(f) for f, _ in members], other_series=others)
    if dropped:
        meta["dropped_files"] = dropped
    if sorted_by == "ImagePositionPatient" and len(members) > 1:
        steps = np.diff(keys)
        step = float(np.median(steps))
        if np.abs(steps - step).max() > 0.01 * step + 1e-3:
            meta["irregular_spacing"] = (float(steps.min()), float(steps.max()))
    else:
        step = _slice_step(first_ds)

    rows, cols = int(first_ds.Rows), int(first_ds.Columns)
    slopes = [_rescale(ds) for _, ds in members]
    integral = all(float(s).is_integer() and float(i).is_integer() for s, i in slopes)
    bits = int(first_ds.get("BitsStored", 16) or 16)
    signed = int(first_ds.get("PixelRepresentation", 0) or 0) == 1
    raw = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
    if integral:   # exact integers; int16 at the end when the values fit (CT in HU do)
        ends = [v * s + i for s, i in slopes for v in raw]
        info = np.iinfo(np.int16)
        dtype = np.int16 if info.min <= min(ends) and max(ends) <= info.max else np.int32
    else:
        dtype = np.float32
    volume = np.empty((len(members), rows, cols), dtype=dtype)
    for z, ((f, _), (slope, intercept)) in enumerate(zip(members, slopes, strict=True)):
        try:
            pixels = pydicom.dcmread(str(f)).pixel_array
        except Exception as exc:
            raise InputError(f"Could not read the pixels of {f}: {type(exc).__name__}: {exc}") \
                from exc
        if pixels.shape != (rows, cols):
            raise InputError(f"{f.name}: a {pixels.shape} image in a series of {rows}x{cols} "
                             "slices (multi-frame or colour images are read one by one).")
        if dtype == np.float32:
            volume[z] = pixels.astype(np.float32) * slope + intercept
        else:
            volume[z] = pixels.astype(np.int32) * int(slope) + int(intercept)
    if first_ds.get("PhotometricInterpretation") == "MONOCHROME1":
        volume = (float(volume.max()) + float(volume.min()) - volume.astype(np.float64)
                  ).astype(dtype)
    if dtype == np.int32 and volume.size and volume.min() >= -(2 ** 15) \
            and volume.max() < 2 ** 15:
        volume = volume.astype(np.int16)
    pixel = first_ds.get("PixelSpacing")
    pixel = tuple(float(s) for s in pixel) if pixel is not None else (1.0, 1.0)
    window = _dicom_window(first_ds)
    if window is not None:
        meta["window"] = window
    affine = _dicom_affine(first_ds, step)
    path = Path(meta["source_path"])
    if len(members) == 1:
        if affine is not None:
            meta["affine"] = affine
            meta["origin"] = scale_translate_from_affine(affine, 2)[1]
        return ImageData(volume[0], False, pixel, path, meta)
    if affine is not None:
        meta["affine"] = affine
        meta["origin"] = scale_translate_from_affine(affine, 3)[1]
    return ImageData(volume, True, (step, *pixel), path, meta)


# --------------------------------------------------------------------------- intensities


def auto_window(data: np.ndarray, percentiles: tuple[float, float] = (0.5, 99.5),
                max_values: int | None = None) -> Window:
    """The window spanning the given percentiles of the finite values of ``data``.

    ``max_values`` bounds the work on large volumes: the percentiles are then taken over an
    evenly strided sample of about that many values.
    """
    data = np.asarray(data)
    if max_values is not None and data.size > max_values:
        data = data.reshape(-1)[:: int(np.ceil(data.size / max_values))]
    values = np.asarray(data, dtype=np.float64)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        raise InputError("The image holds no finite values (all NaN or infinite).")
    low, high = np.percentile(finite, percentiles)
    if high <= low:
        low, high = float(finite.min()), float(finite.max())
    if high <= low:
        high = low + 1.0
    return Window(float(low), float(high))


def apply_window(data: np.ndarray, window: Window) -> np.ndarray:
    """Clip to the window and scale to uint8 0..255 (NaN -> 0)."""
    scaled = (np.asarray(data, dtype=np.float32) - window.low) / (window.high - window.low)
    scaled = np.nan_to_num(scaled, nan=0.0, posinf=1.0, neginf=0.0)
    return np.clip(np.rint(scaled * 255.0), 0, 255).astype(np.uint8)


def to_rgb_uint8(image: np.ndarray, window: Window | None = None) -> np.ndarray:
    """Any 2-D image -> HxWx3 uint8 RGB (see the module docstring for the windowing).

    Parameters
    ----------
    image : np.ndarray
        (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); bool, integer or float.
    window : Window, optional
        Intensity window for non-uint8 data; default: the image's 0.5-99.5 percentiles.
    """
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim == 3 and image.shape[-1] == 4:
        image = image[..., :3]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] != 3):
        raise InputError(f"Expected a 2-D grayscale or RGB(A) image; got shape {image.shape}. "
                         "For a volume, process it slice by slice.")
    if min(image.shape[:2]) < 2:
        raise InputError(f"The image is too small ({image.shape[0]}x{image.shape[1]}).")
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    if image.dtype != np.uint8 or window is not None:
        image = apply_window(image, window or auto_window(image))
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return np.ascontiguousarray(image)


# --------------------------------------------------------------------------- writing


_TEMP_MARK = ".partial-"
_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.partial-(?P<pid>[0-9]+)-(?P<token>[0-9a-f]{8})"
                      r"(?P<suffix>\.[^/]*)$")
_STALE_AFTER_S = 24 * 3600.0          # a live pid's temporary older than this is stale too
_ACTIVE_TEMPS: set[Path] = set()      # temporaries this process is writing now
_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows
    (``/proc/self/status``), else by setting and restoring it under a lock."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def temporary_name(target: str | Path) -> str:
    """The name of a temporary file for ``target``:
    ``.{target.name}.partial-{pid}-{8 hex}{suffixes}`` (hidden, recognisable as ours, owned
    by a process id so :func:`remove_stale_temporaries` can tell a killed run's leftovers)."""
    target = Path(target)
    suffix = "".join(target.suffixes) or ".tmp"
    return f".{target.name}{_TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}{suffix}"


def _parse_temporary(name: str) -> int | None:
    """The owning pid when ``name`` is exactly one of our temporary names, else None."""
    match = _TEMP_RE.match(name)
    if match is None:
        return None
    target, suffix = match["name"], match["suffix"]
    expected = "".join(Path(target).suffixes) or ".tmp"
    return int(match["pid"]) if suffix == expected else None


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it replaces ``target`` in one
    step, on error it is removed, so a reader never sees a half-written file.

    The temporary is named by :func:`temporary_name` and created empty (exclusively); the
    final file gets mode ``0o666 & ~umask`` like any file the user's tools create. A
    temporary left by a killed process is removed by :func:`remove_stale_temporaries`.
    Missing parent folders are made with the umask's modes.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp_path = target.parent / temporary_name(target)
        try:
            fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        break
    active = tmp_path.resolve()
    _ACTIVE_TEMPS.add(active)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~current_umask())
        os.replace(tmp_path, target)
    finally:
        _ACTIVE_TEMPS.discard(active)
        if tmp_path.exists():
            tmp_path.unlink()


def _pid_alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.pid_exists(pid)
    except (OSError, ValueError):
        return True          # cannot tell: keep the file


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Remove the temporary files a killed run left in ``folder`` (not recursive).

    Only files named exactly as :func:`atomic_path` names its temporaries are considered,
    and of those only the ones whose process is gone, or whose process id is alive but the
    file is older than a day (the id was reused); a temporary this process is writing now is
    never removed. Any other file, hidden or not, is left alone.

    Returns
    -------
    list of Path
        The files removed (sorted).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    now = time.time()
    for entry in sorted(folder.iterdir()):
        pid = _parse_temporary(entry.name)
        if pid is None or entry.resolve() in _ACTIVE_TEMPS:
            continue
        try:
            info = entry.lstat()
        except OSError:
            continue
        if not stat.S_ISREG(info.st_mode):
            continue
        if _pid_alive(pid) and now - info.st_mtime < _STALE_AFTER_S:
            continue
        try:
            entry.unlink()
        except FileNotFoundError:
            continue
        removed.append(entry)
    return removed


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_mask_png(path: str | Path, mask: np.ndarray) -> None:
    """HxW mask -> PNG, 0 background and 255 foreground (uint8)."""
    import imageio.v3 as iio

    data = (np.asarray(mask) > 0).astype(np.uint8) * 255
    with atomic_path(path) as tmp:
        iio.imwrite(str(tmp), data, extension=".png")


def write_float_tiff(path: str | Path, data: np.ndarray) -> None:
    """Float map (e.g. a saliency map, HxW or ZxYxX float32) -> TIFF."""
    import tifffile

    with atomic_path(path) as tmp:
        tifffile.imwrite(str(tmp), np.asarray(data, dtype=np.float32))


def write_nifti_like(path: str | Path, volume: np.ndarray, reference: ImageData,
                     dtype=np.uint8) -> None:
    """(Z, Y, X) array -> NIfTI with the reference's affine (and header's zooms)."""
    import nibabel as nib

    data = np.asarray(volume).astype(dtype).transpose(2, 1, 0)
    affine = reference.meta.get("affine")
    if affine is None:
        affine = np.diag([*reversed(reference.spacing), 1.0])
    img = nib.Nifti1Image(data, affine)
    img.header.set_zooms(tuple(reversed(reference.spacing))[: data.ndim])
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))


def label_dtype(labels: np.ndarray) -> np.dtype:
    """The smallest integer dtype holding ``labels``: uint8 when 0 <= labels < 256, else
    int16 or int32 (NIfTI readers everywhere understand these)."""
    labels = np.asarray(labels)
    if labels.size == 0:
        return np.dtype(np.uint8)
    low, high = labels.min(), labels.max()
    if labels.dtype.kind == "f" and not np.array_equal(labels, np.round(labels)):
        raise InputError("Labels must be whole numbers; got fractional values.")
    for dtype in (np.uint8, np.int16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= low and high <= info.max:
            return np.dtype(dtype)
    raise InputError(f"Label values {low}..{high} do not fit in int32; relabel them "
                     "consecutively (e.g. skimage.segmentation.relabel_sequential).")


def write_nifti(path: str | Path, data: np.ndarray, affine: np.ndarray, dtype=None,
                qform_code: int = 1, sform_code: int = 1) -> Path:
    """(Z, Y, X) or (Y, X) array -> NIfTI (stored (X, Y, Z) / (X, Y)), written atomically.

    ``affine`` is the 4x4 voxel -> RAS matrix of the stored order (as read from a NIfTI
    file or built by the DICOM readers). ``qform_code``/``sform_code``: 1 = scanner, 2 =
    aligned (0 is replaced by 1 so every reader applies the affine).
    """
    import nibabel as nib

    data = np.asarray(data)
    if data.ndim not in (2, 3):
        raise InputError(f"Can only write 2-D or 3-D arrays as NIfTI; got shape {data.shape}.")
    data = data.astype(dtype or data.dtype).T
    img = nib.Nifti1Image(np.ascontiguousarray(data), np.asarray(affine, dtype=np.float64))
    img.set_qform(img.affine, code=int(qform_code) or 1)
    img.set_sform(img.affine, code=int(sform_code) or 1)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return Path(path)
