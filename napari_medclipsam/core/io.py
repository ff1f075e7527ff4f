"""Reading images and volumes, intensity windowing, and safe (atomic) writing.

Conventions
-----------
* 2-D images are returned as they are stored: (H, W) grayscale, (H, W, 3) RGB or
  (H, W, 4) RGBA, any of uint8, uint16, int16, float.
* Volumes are (Z, Y, X): NIfTI data, stored (X, Y, Z), is transposed on reading and
  back on writing, and the original affine is kept, so a mask written with
  :func:`write_nifti_like` overlays the scan in any viewer.
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
import tempfile
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
        if suffix in DICOM_SUFFIXES:
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
    meta = {"affine": img.affine, "header": img.header}
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim == 2:
        return ImageData(data.T, False, zooms[::-1], path, meta)
    if data.ndim == 3:
        if data.shape[2] == 1:
            return ImageData(data[:, :, 0].T, False, zooms[:2][::-1], path, meta)
        return ImageData(np.ascontiguousarray(data.transpose(2, 1, 0)), True, zooms[::-1],
                         path, meta)
    raise InputError(f"{path.name}: NIfTI with shape {data.shape} is not supported "
                     "(expected 2-D or 3-D scalar data).")


def _read_dicom(path: Path) -> ImageData:
    import pydicom

    ds = pydicom.dcmread(str(path))
    if "PixelData" not in ds:
        raise InputError(f"{path.name}: the DICOM file holds no image (no PixelData).")
    data = ds.pixel_array.astype(np.float32)
    slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
    intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
    if getattr(ds, "PhotometricInterpretation", "") != "RGB":
        data = data * slope + intercept
        if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1":
            data = data.max() + data.min() - data
    spacing = getattr(ds, "PixelSpacing", None)
    spacing = tuple(float(s) for s in spacing) if spacing is not None else None
    meta: dict[str, Any] = {"modality": str(getattr(ds, "Modality", ""))}
    center = getattr(ds, "WindowCenter", None)
    width = getattr(ds, "WindowWidth", None)
    if center is not None and width is not None:
        def first(value) -> float:
            return float(value[0] if isinstance(value, pydicom.multival.MultiValue) else value)

        meta["window"] = Window.from_center_width(first(center), first(width))
    if ds.get("PhotometricInterpretation") == "RGB":
        data = data.astype(np.uint8)
    return _classify(data, path, spacing, meta)


# --------------------------------------------------------------------------- intensities


def auto_window(data: np.ndarray, percentiles: tuple[float, float] = (0.5, 99.5)) -> Window:
    """The window spanning the given percentiles of the finite values of ``data``."""
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


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it replaces ``target`` in one
    step, on error it is removed, so a reader never sees a half-written file."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(target.suffixes) or ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


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
