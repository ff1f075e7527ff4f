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
* Safety: a file's decoded size is checked from its header before any pixel is decoded
  (:func:`check_decoded_size`; limit ``$MEDCLIPSAM_MAX_PIXELS``, default 178,956,970 pixels
  for 2-D images, PIL's own threshold, and 1.5e9 voxels for volumes). The chain refuses 2-D
  images with a side under 8 pixels or an aspect ratio over 50:1 (:func:`check_image_shape`).
  Writes are atomic (:func:`atomic_path`), honour the umask, and leave temporaries named
  ``.NAME.partial-PID-TOKEN.SUFFIX`` that :func:`remove_stale_temporaries` cleans after a
  killed run. Every image mode the readers meet is listed in :func:`read_image`.
"""

from __future__ import annotations

import errno
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
from .runtime import process_matches

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


# --------------------------------------------------------------------------- size limits

#: Environment variable: the largest number of pixels (2-D, per channel) or voxels (3-D) a
#: file may decode to. A number (``4e9``) sets both limits; ``none`` or ``0`` turns the check
#: off. The check reads only the file's header, before any pixel is decoded.
MAX_PIXELS_ENV = "MEDCLIPSAM_MAX_PIXELS"
#: Default limit for a 2-D image: PIL's own refusal threshold (twice
#: ``PIL.Image.MAX_IMAGE_PIXELS`` as Pillow ships it), about 13,400 x 13,400 pixels.
DEFAULT_MAX_PIXELS_2D = 2 * 89_478_485
#: Default limit for a volume: 1.5e9 voxels (about 1,150^3; 3 GB as int16, 6 GB as float32).
DEFAULT_MAX_VOXELS_3D = 1_500_000_000

_PIL_LOCK = threading.Lock()


def max_pixels(volume: bool = False) -> int | None:
    """The decoded-size limit in force: ``$MEDCLIPSAM_MAX_PIXELS`` when set, else
    :data:`DEFAULT_MAX_VOXELS_3D` for volumes and :data:`DEFAULT_MAX_PIXELS_2D` for 2-D
    images; None when the check is turned off."""
    text = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_VOXELS_3D if volume else DEFAULT_MAX_PIXELS_2D
    if text.lower() in ("0", "none", "off"):
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not np.isfinite(value) or value < 1:
        raise InputError(f"{MAX_PIXELS_ENV}={text!r} is not a pixel count; set it to a number "
                         "such as 4e9, or to 'none' to turn the size check off.")
    return int(value)


def check_decoded_size(shape: tuple[int, ...], path: str | Path) -> None:
    """Refuse, before decoding, an image whose header promises an empty axis or more pixels
    than :func:`max_pixels` allows.

    Parameters
    ----------
    shape : tuple of int
        Spatial shape from the header, without a colour axis: (H, W) or (Z, Y, X)
        (a leading frame/page axis counts as Z).
    """
    name = Path(path).name
    shape = tuple(int(s) for s in shape)
    if not shape or min(shape) <= 0:
        raise InputError(f"{name}: the image has an empty axis (shape {shape}).")
    count = int(np.prod(shape, dtype=object))
    volume = len(shape) > 2 and int(np.prod(shape[:-2], dtype=object)) > 1
    limit = max_pixels(volume)
    if limit is not None and count > limit:
        kind = "voxels" if volume else "pixels"
        raise InputError(
            f"{name}: its header asks for {'x'.join(map(str, shape))} = {count:,} {kind}, "
            f"over the limit of {limit:,} (a decompression bomb or a damaged header?); if the "
            f"file is genuine, raise the limit with {MAX_PIXELS_ENV}=N.")


# --------------------------------------------------------------------------- reading


def _looks_like_text(path: Path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(512)
    if not head or b"\0" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def read_image(path: str | Path) -> ImageData:
    """Read a PNG/JPEG/TIFF/BMP image, a NIfTI image or volume, or a DICOM file.

    What comes back for each kind of file and mode:

    - PIL formats (PNG, JPEG, BMP; first frame only): ``1`` -> uint8 0/255; ``L`` -> uint8;
      ``LA``/``La`` -> uint8 (alpha dropped: gray + alpha is an image, not a volume); ``P``/
      ``PA`` -> uint8 gray when the palette is gray, else RGB; ``RGB``/``RGBA`` as stored;
      ``CMYK`` (Adobe-inverted JPEGs included), ``YCbCr``, ``LAB``, ``HSV``, ``RGBX``,
      ``RGBa`` -> RGB; ``I;16*`` -> uint16; ``I`` -> int32; ``F`` -> float32.
    - TIFF (tifffile): the first series; several pages of one size are a (Z, Y, X) volume;
      any integer or float dtype; gray + alpha drops the alpha; MINISWHITE is inverted, palette
      and CMYK (separated) TIFFs become RGB.
    - NIfTI: 2-D, 3-D, and 4-D with one volume (squeezed); a 4-D file with several volumes is
      refused (say which one to use by extracting it). RGB24 NIfTI images become RGB.
    - DICOM: rescaled (slope/intercept); MONOCHROME1 inverted so bright is dense, its window
      mirrored to match; a WindowWidth <= 0 is ignored (automatic window); RGB, YBR and
      PALETTE COLOR become uint8 RGB; multi-frame grayscale is a (frames, Y, X) volume.

    The header's size is checked before decoding (:func:`check_decoded_size`).

    Raises
    ------
    InputError
        For a missing, empty, unreadable, truncated, oversized or unsupported file, in one
        line that names the cause.
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
        if suffix in (".tif", ".tiff"):
            return _read_tiff(path)
        if suffix in IMAGE_SUFFIXES:
            return _read_pil(path)
    except InputError:
        raise
    except MemoryError as exc:
        raise InputError(f"Could not read {path}: not enough memory to decode it.") from exc
    except Exception as exc:
        text = " (the file holds text)" if _looks_like_text(path) else ""
        raise InputError(f"Could not read {path}{text}: {type(exc).__name__}: "
                         f"{' '.join(str(exc).split())}") from exc
    raise InputError(f"{path.name}: unsupported file type {suffix!r}; supported: "
                     f"{', '.join(SUPPORTED)}.")


def _image2d(data: np.ndarray, path: Path, spacing=None, meta=None) -> ImageData:
    return ImageData(data, False, tuple(spacing or (1.0, 1.0)), path, dict(meta or {}))


def _gray_if_equal(rgb: np.ndarray) -> np.ndarray:
    """HxWx3 whose channels are equal -> HxW."""
    if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all():
        return np.ascontiguousarray(rgb[..., 0])
    return rgb


def _open_pil(path: Path):
    """PIL.Image.open with PIL's own bomb check lifted (ours, :func:`check_decoded_size`,
    runs next on the header's size and names the environment variable)."""
    from PIL import Image, UnidentifiedImageError

    with _PIL_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            return Image.open(path)
        except UnidentifiedImageError as exc:
            what = "a text file" if _looks_like_text(path) else "not an image PIL can read"
            raise InputError(f"{path.name}: not a {_suffix(path).lstrip('.').upper()} image "
                             f"({what}).") from exc
        except OSError as exc:
            raise InputError(f"Could not decode {path.name}: the file is truncated or damaged "
                             f"({' '.join(str(exc).split())}).") from exc
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def pil_to_array(im) -> np.ndarray:
    """A PIL image of any mode -> (H, W) or (H, W, 3|4) array (see :func:`read_image`),
    writable (a napari Labels layer is painted in place; torch warns on read-only arrays)."""
    return np.require(_pil_pixels(im), requirements="W")


def _pil_pixels(im) -> np.ndarray:
    """The pixels of ``im`` by mode; may be a read-only view of PIL's buffer."""
    mode = im.mode
    if mode == "1":
        return np.asarray(im, dtype=bool).astype(np.uint8) * 255
    if mode in ("L", "RGB", "RGBA", "F"):
        return np.asarray(im)
    if mode in ("LA", "La"):
        return np.asarray(im.getchannel(0))
    if mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in im.info
        rgb = np.asarray(im.convert("RGBA" if has_alpha else "RGB"))[..., :3]
        return _gray_if_equal(rgb)
    if mode.startswith("I;16"):
        return np.asarray(im).astype(np.uint16)
    if mode == "I":
        return np.asarray(im).astype(np.int32)
    if mode in ("RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"):
        return np.asarray(im.convert("RGB"))
    try:
        return np.asarray(im.convert("RGB"))
    except (ValueError, OSError) as exc:
        raise InputError(f"PIL image mode {mode!r} is not supported.") from exc


def _read_pil(path: Path) -> ImageData:
    im = _open_pil(path)
    with im:
        width, height = im.size
        check_decoded_size((height, width), path)
        try:
            im.load()
        except (OSError, SyntaxError, ValueError) as exc:
            raise InputError(f"Could not decode {path.name}: the file is truncated or damaged "
                             f"({' '.join(str(exc).split())}).") from exc
        data = pil_to_array(im)
    return _image2d(data, path, meta={"mode": im.mode})


def _read_tiff(path: Path) -> ImageData:
    import tifffile

    try:
        tif = tifffile.TiffFile(str(path))
    except tifffile.TiffFileError as exc:
        if _looks_like_text(path):
            raise InputError(f"{path.name}: not a TIFF image (the file holds text).") from exc
        raise InputError(f"{path.name}: not a TIFF image ({exc}).") from exc
    with tif:
        if not tif.series:
            raise InputError(f"{path.name}: the TIFF file holds no image.")
        series = tif.series[0]
        axes, shape = series.axes, tuple(series.shape)
        check_decoded_size(tuple(n for n, a in zip(shape, axes, strict=True) if a != "S"),
                           path)
        page = series.pages[0] if series.pages else tif.pages[0]
        photometric = int(getattr(page, "photometric", 1))
        compression = int(getattr(page, "compression", 1))
        colormap = getattr(page, "colormap", None)
        try:
            data = np.asarray(series.asarray())
        except (ValueError, OSError, EOFError) as exc:
            raise InputError(f"Could not decode {path.name}: the file is truncated or damaged "
                             f"({' '.join(str(exc).split())}).") from exc
    # drop singleton axes other than Y, X and the samples
    keep = [i for i, a in enumerate(axes) if a in "YXS" or shape[i] > 1]
    data = data.reshape([shape[i] for i in keep])
    axes = "".join(axes[i] for i in keep)
    samples = shape[axes.index("S")] if "S" in axes else 1
    if photometric == 3 and colormap is not None and samples == 1:       # PALETTE
        lut = np.asarray(colormap)
        lut = (lut >> 8).astype(np.uint8) if lut.max() > 255 else lut.astype(np.uint8)
        data = _gray_if_equal(np.moveaxis(lut[:, data], 0, -1))
        axes, samples = axes + "S", 3
    elif photometric == 0 and samples == 1:                               # MINISWHITE
        if data.dtype.kind in "ui":
            info = np.iinfo(data.dtype)
            data = (info.max + info.min - data.astype(np.int64)).astype(data.dtype)
        elif data.dtype.kind == "f":
            data = float(np.nanmax(data)) + float(np.nanmin(data)) - data
        elif data.dtype == bool:
            data = ~data
    elif photometric == 5 and samples >= 4 and data.dtype == np.uint8:   # SEPARATED (CMYK)
        cmy, k = data[..., :3].astype(np.float32), data[..., 3:4].astype(np.float32)
        data = np.rint((255.0 - cmy) * (255.0 - k) / 255.0).astype(np.uint8)
        samples = 3
    elif photometric == 6 and samples == 3 and data.dtype == np.uint8 \
            and compression not in (6, 7):                                # YCbCr, raw
        data = _ycbcr_to_rgb(data)
    if samples == 2:                       # gray + alpha: an image, not a 2-column volume
        data = data[..., 0]
    elif samples > 4:
        data = data[..., :3]
    if data.dtype == bool:
        data = data.astype(np.uint8) * 255
    colour = data.ndim >= 3 and "S" in axes and samples in (3, 4)
    planes = data.ndim - (3 if colour else 2)
    meta = {"axes": axes}
    if planes == 0:
        return _image2d(data, path, meta=meta)
    if planes == 1 and not colour:
        return ImageData(data, True, (1.0, 1.0, 1.0), path, meta)
    raise InputError(f"{path.name}: a TIFF of shape {shape} (axes {series.axes}) is not a 2-D "
                     "image or a grayscale (Z, Y, X) stack; save the image or volume to use "
                     "on its own.")


def _ycbcr_to_rgb(data: np.ndarray) -> np.ndarray:
    """uint8 YCbCr (ITU-R BT.601, full range, as TIFF and JPEG store it) -> uint8 RGB."""
    y, cb, cr = (data[..., i].astype(np.float32) for i in range(3))
    cb, cr = cb - 128.0, cr - 128.0
    rgb = np.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], -1)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _classify(data: np.ndarray, path: Path, spacing, meta) -> ImageData:
    data = np.squeeze(data) if data.ndim > 3 else data
    if data.ndim == 2:
        return _image2d(data, path, spacing, meta)
    if data.ndim == 3 and data.shape[-1] in (3, 4) and data.shape[0] > 4:
        return _image2d(data, path, spacing, meta)
    if data.ndim == 3 and data.shape[-1] in (1, 2) and data.shape[0] > 4:
        return _image2d(data[..., 0], path, spacing, meta)    # gray (+ alpha, dropped)
    if data.ndim == 3:
        return ImageData(data, True, tuple(spacing or (1.0, 1.0, 1.0)), path, meta)
    raise InputError(f"{path.name}: cannot use an array of shape {data.shape}; expected a 2-D "
                     "image (H, W[, C]) or a 3-D volume (Z, Y, X).")


def _nifti_unit(header) -> str:
    try:
        unit = header.get_xyzt_units()[0]
    except Exception:  # noqa: BLE001 - a damaged units field is not worth refusing the file
        return "mm"
    return {"micron": "um", "meter": "m"}.get(unit, "mm")


def _gzip_problem(path: Path) -> str | None:
    """Why a file with gzip's magic number cannot be decompressed (None: it can, or it is
    not gzip at all)."""
    import gzip

    with open(path, "rb") as fh:
        if fh.read(2) != b"\x1f\x8b":
            return None
    try:
        with gzip.open(path, "rb") as fh:
            while fh.read(1 << 20):
                pass
    except (OSError, EOFError) as exc:
        return " ".join(str(exc).split()) or type(exc).__name__
    return None


def _read_nifti(path: Path) -> ImageData:
    import nibabel as nib

    try:
        img = nib.load(str(path))
    except nib.filebasedimages.ImageFileError as exc:
        damaged = _gzip_problem(path) if _suffix(path) == ".nii.gz" else None
        if damaged:
            raise InputError(f"Could not decode {path.name}: the gzip data is truncated or "
                             f"damaged ({damaged}).") from exc
        if _looks_like_text(path):
            raise InputError(f"{path.name}: not a NIfTI image (the file holds text).") from exc
        raise InputError(f"{path.name}: not a NIfTI image ({' '.join(str(exc).split())}).") \
            from exc
    stored = tuple(int(n) for n in img.header.get_data_shape())
    shape = stored
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) == 4:
        raise InputError(
            f"{path.name}: a 4-D NIfTI {shape} holding {shape[3]} volumes; one 3-D volume per "
            "file is read: extract the one to use (e.g. nibabel: nib.save(img.slicer[..., 0], "
            "'one.nii.gz'), or fslroi IN OUT 0 1).")
    if len(shape) > 4 or len(shape) < 2:
        raise InputError(f"{path.name}: NIfTI with shape {stored} is not supported "
                         "(expected 2-D or 3-D scalar data).")
    flat = len(shape) == 2 or shape[2] == 1
    check_decoded_size(shape[:2][::-1] if flat else shape[::-1], path)
    try:
        data = np.asarray(img.dataobj).reshape(shape)
    except (EOFError, OSError, ValueError) as exc:
        raise InputError(f"Could not decode {path.name}: the file is truncated or damaged "
                         f"({' '.join(str(exc).split())}).") from exc
    zooms = tuple(float(z) for z in img.header.get_zooms()[: len(shape)])
    meta = {"affine": img.affine, "header": img.header,
            "qform_code": int(img.header["qform_code"]),
            "sform_code": int(img.header["sform_code"]),
            "spacing_known": True, "spacing_unit": _nifti_unit(img.header)}
    rgb = data.dtype.names is not None
    if rgb:
        if not flat or not set("RGB") <= set(data.dtype.names):
            raise InputError(f"{path.name}: a colour NIfTI volume ({data.dtype.names}) is not "
                             "supported; convert it to grayscale.")
        data = np.stack([data[c] for c in "RGB"], axis=-1)
    if flat:
        meta["origin"] = scale_translate_from_affine(img.affine, 2)[1]
        data = data.reshape(shape[:2] + data.shape[len(shape):])
        data = np.swapaxes(data, 0, 1) if rgb else data.T
        return ImageData(data, False, zooms[:2][::-1], path, meta)
    meta["origin"] = scale_translate_from_affine(img.affine, 3)[1]
    return ImageData(np.ascontiguousarray(data.transpose(2, 1, 0)), True, zooms[::-1],
                     path, meta)


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


def _dicom_window(ds) -> Window | None:
    """The first valid WindowCenter/WindowWidth pair (in rescaled units, e.g. HU); None when
    absent or when no width is > 0 (a width of 0 means no window: the automatic one is used).
    """
    from pydicom.multival import MultiValue

    centers, widths = ds.get("WindowCenter"), ds.get("WindowWidth")
    if centers is None or widths is None:
        return None
    centers = list(centers) if isinstance(centers, MultiValue | list | tuple) else [centers]
    widths = list(widths) if isinstance(widths, MultiValue | list | tuple) else [widths]
    for center, width in zip(centers, widths, strict=False):
        try:
            center, width = float(center), float(width)
        except (TypeError, ValueError):
            continue
        if np.isfinite([center, width]).all() and width > 0:
            return Window.from_center_width(center, width)
    return None


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

    try:
        ds = pydicom.dcmread(str(path))
    except pydicom.errors.InvalidDicomError as exc:
        what = " (the file holds text)" if _looks_like_text(path) else ""
        raise InputError(f"{path.name}: not a DICOM file{what}.") from exc
    if "PixelData" not in ds:
        raise InputError(f"{path.name}: the DICOM file holds no image (no PixelData).")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    check_decoded_size((frames, rows, cols) if frames > 1 else (rows, cols), path)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    try:
        data = ds.pixel_array
    except Exception as exc:
        raise InputError(f"Could not decode the pixels of {path.name} "
                         f"({photometric}, {ds.file_meta.get('TransferSyntaxUID', '?')}): "
                         f"{' '.join(str(exc).split())}") from exc
    pixel = ds.get("PixelSpacing")
    pixel = tuple(float(s) for s in pixel) if pixel is not None and len(pixel) == 2 \
        else None
    meta = _dicom_meta(ds, path)
    if pixel is not None:
        meta.update(spacing_known=True, spacing_unit="mm")
    if samples >= 3 or photometric == "PALETTE COLOR":
        data = _dicom_rgb(ds, data, photometric)
        if data.ndim == 4:
            raise InputError(f"{path.name}: a colour multi-frame DICOM ({data.shape[0]} "
                             "frames) is not supported; save the frame to use as an image.")
        return _image2d(data, path, pixel, meta)
    data = data.astype(np.float32)
    slope, intercept = _rescale(ds)
    data = data * slope + intercept
    window = _dicom_window(ds)
    if photometric == "MONOCHROME1":          # stored dark = dense: flip so bright is dense
        high, low = float(np.nanmax(data)), float(np.nanmin(data))
        data = high + low - data
        if window is not None:
            window = Window(high + low - window.high, high + low - window.low)
    if window is not None:
        meta["window"] = window
    step = _slice_step(ds)
    affine = _dicom_affine(ds, step)
    if affine is not None:
        meta["affine"] = affine
    if data.ndim == 3:                         # multi-frame: (frames, rows, cols)
        if affine is not None:
            meta["origin"] = scale_translate_from_affine(affine, 3)[1]
        return ImageData(data, True, (step, *(pixel or (1.0, 1.0))), path, meta)
    if affine is not None:
        meta["origin"] = scale_translate_from_affine(affine, 2)[1]
    return _image2d(data, path, pixel, meta)


def _dicom_rgb(ds, data: np.ndarray, photometric: str) -> np.ndarray:
    """Colour DICOM pixels -> uint8 RGB (pydicom has already turned YBR into RGB)."""
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
        data = apply_color_lut(data, ds)
    else:
        bits = int(ds.get("BitsStored", 8) or 8)
        data = data[..., :3]
    if data.dtype != np.uint8:
        shift = max(bits - 8, 0)
        data = np.clip(data.astype(np.int64) >> shift, 0, 255).astype(np.uint8)
    return data


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
    check_decoded_size((len(members), rows, cols) if len(members) > 1 else (rows, cols),
                       Path(members[0][0]).parent if len(members) > 1 else members[0][0])
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
    window = _dicom_window(first_ds)
    if str(first_ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1":
        high, low = float(volume.max()), float(volume.min())
        volume = (high + low - volume.astype(np.float64)).astype(dtype)
        if window is not None:
            window = Window(high + low - window.high, high + low - window.low)
    if dtype == np.int32 and volume.size and volume.min() >= -(2 ** 15) \
            and volume.max() < 2 ** 15:
        volume = volume.astype(np.int16)
    pixel = first_ds.get("PixelSpacing")
    if pixel is not None:
        meta.update(spacing_known=True, spacing_unit="mm")
    pixel = tuple(float(s) for s in pixel) if pixel is not None else (1.0, 1.0)
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


#: The smallest side, in pixels, of a 2-D image the segmentation chain accepts.
MIN_SIDE = 8
#: The largest aspect ratio (long side : short side) the chain accepts: SAM resizes the long
#: side to 1024 pixels, so at 50:1 the short side keeps about 20 pixels; far beyond, it
#: rounds to 0 and the chain cannot run.
MAX_ASPECT = 50.0


def check_image_shape(shape: tuple[int, ...]) -> None:
    """Refuse a 2-D image the segmentation chain cannot use: an empty axis, a side shorter
    than :data:`MIN_SIDE` pixels, or an aspect ratio beyond :data:`MAX_ASPECT`:1.

    Parameters
    ----------
    shape : tuple of int
        (H, W) or (H, W, C).
    """
    height, width = (int(n) for n in shape[:2])
    if height == 0 or width == 0:
        raise InputError(f"The image is empty ({height}x{width} pixels).")
    if min(height, width) < MIN_SIDE:
        raise InputError(f"The image is {height}x{width} pixels; segmentation needs at least "
                         f"{MIN_SIDE} pixels on each side (enlarge or pad it).")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT:
        raise InputError(f"The image is {height}x{width} pixels, an aspect ratio of "
                         f"{ratio:.0f}:1; segmentation handles at most {MAX_ASPECT:g}:1 "
                         "(crop it, or pad it closer to square).")


def to_rgb_uint8(image: np.ndarray, window: Window | None = None) -> np.ndarray:
    """Any 2-D image -> HxWx3 uint8 RGB (see the module docstring for the windowing).

    Parameters
    ----------
    image : np.ndarray
        (H, W), (H, W, 1), (H, W, 2) (gray + alpha), (H, W, 3) or (H, W, 4); bool, integer
        or float. Its shape must pass :func:`check_image_shape`.
    window : Window, optional
        Intensity window for non-uint8 data; default: the image's 0.5-99.5 percentiles.

    Raises
    ------
    InputError
        A volume or an unusable shape (:func:`check_image_shape`), or, without a window, an
        image with no finite value.
    """
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] in (1, 2):
        image = image[..., 0]
    if image.ndim == 3 and image.shape[-1] == 4:
        image = image[..., :3]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] != 3):
        raise InputError(f"Expected a 2-D grayscale or RGB(A) image; got shape {image.shape}. "
                         "For a volume, process it slice by slice.")
    check_image_shape(image.shape)
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    if image.dtype.kind not in "uifb":
        raise InputError(f"Cannot use image data of type {image.dtype}; expected numbers.")
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
def atomic_path(target: str | Path, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it replaces ``target`` in one
    step, on error it is removed, so a reader never sees a half-written file.

    The temporary is named by :func:`temporary_name` and created empty (exclusively); the
    final file gets mode ``0o666 & ~umask`` like any file the user's tools create. A
    temporary left by a killed process is removed by :func:`remove_stale_temporaries`.
    Missing parent folders are made with the umask's modes.

    With ``overwrite=False`` an existing ``target`` is never replaced, not even one that
    appears while the temporary is written: the file is linked into place (no clobber) and
    :class:`FileExistsError` is raised if ``target`` exists by then.
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # a file stands where a folder is needed: not "target exists"
        blocker = next(p for p in (target.parent, *target.parent.parents)
                       if os.path.lexists(p))
        raise NotADirectoryError(errno.ENOTDIR, "Not a directory", str(blocker)) from None
    if not overwrite and os.path.lexists(target):
        raise FileExistsError(errno.EEXIST, "File exists", str(target))
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
        if overwrite:
            os.replace(tmp_path, target)
        else:
            _link_no_clobber(tmp_path, target)
    finally:
        _ACTIVE_TEMPS.discard(active)
        if tmp_path.exists():
            tmp_path.unlink()


def _link_no_clobber(source: Path, target: Path) -> None:
    """Put ``source`` at ``target`` unless ``target`` exists (atomically where the file
    system has hard links; else checked just before the rename)."""
    try:
        os.link(source, target)
    except FileExistsError:
        raise
    except OSError:
        if os.path.lexists(target):
            raise FileExistsError(errno.EEXIST, "File exists", str(target)) from None
        os.replace(source, target)


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
        if process_matches(pid) is not False and now - info.st_mtime < _STALE_AFTER_S:
            continue
        try:
            entry.unlink()
        except FileNotFoundError:
            continue
        removed.append(entry)
    return removed


def write_text(path: str | Path, text: str, *, overwrite: bool = True) -> None:
    """Write ``text`` (UTF-8) atomically; ``overwrite=False``: see :func:`atomic_path`."""
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_text(text, encoding="utf-8")


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
