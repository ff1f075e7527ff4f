"""Every image mode PIL, tifffile, nibabel and pydicom hand back, read by core.io.read_image.

Each file is written here by the library itself (Pillow, tifffile, nibabel, pydicom); each
test asserts what comes back: shape, dtype, whether it is a volume, and the values.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from napari_medclipsam.core.errors import InputError
from napari_medclipsam.core.io import Window, pil_to_array, read_image, to_rgb_uint8

RNG = np.random.default_rng(0)
GRAY = RNG.integers(0, 256, (24, 32), dtype=np.uint8)
RGB = RNG.integers(0, 256, (24, 32, 3), dtype=np.uint8)


def smooth_rgb(height=48, width=64) -> np.ndarray:
    """A smooth colour image (JPEG keeps it within a few levels)."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // (width - 1), y * 255 // (height - 1),
                     (x + y) * 255 // (width + height - 2)], -1).astype(np.uint8)


# --------------------------------------------------------------------------- PIL files


def test_pil_mode_1_png_is_uint8_0_255(tmp_path):
    bits = GRAY > 128
    Image.fromarray(bits).save(tmp_path / "b.png")
    img = read_image(tmp_path / "b.png")
    assert not img.is_volume and img.data.dtype == np.uint8
    assert np.array_equal(img.data, bits.astype(np.uint8) * 255)


def test_pil_mode_L_png(tmp_path):
    Image.fromarray(GRAY, "L").save(tmp_path / "g.png")
    img = read_image(tmp_path / "g.png")
    assert not img.is_volume and np.array_equal(img.data, GRAY)


def test_pil_mode_LA_png_drops_alpha_and_is_not_a_volume(tmp_path):
    la = np.stack([GRAY, np.full_like(GRAY, 77)], -1)           # HxWx2
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    img = read_image(tmp_path / "la.png")
    assert not img.is_volume and img.data.shape == GRAY.shape
    assert np.array_equal(img.data, GRAY)
    assert to_rgb_uint8(img.data).shape == (24, 32, 3)


def test_pil_mode_P_gray_palette_becomes_L(tmp_path):
    Image.fromarray(GRAY, "L").convert("P").save(tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").mode == "P"
    img = read_image(tmp_path / "p.png")
    assert img.data.shape == GRAY.shape and np.array_equal(img.data, GRAY)


def test_pil_mode_P_colour_palette_becomes_rgb(tmp_path):
    labels = (np.arange(24 * 32).reshape(24, 32) % 3).astype(np.uint8)
    im = Image.fromarray(labels, "P")
    im.putpalette([0, 0, 0, 200, 0, 0, 0, 150, 0] + [0] * (253 * 3))
    im.save(tmp_path / "pal.png")
    img = read_image(tmp_path / "pal.png")
    assert img.data.shape == (24, 32, 3) and img.data.dtype == np.uint8
    colours = np.array([[0, 0, 0], [200, 0, 0], [0, 150, 0]], np.uint8)
    assert np.array_equal(img.data, colours[labels])


def test_pil_mode_P_with_transparency(tmp_path):
    labels = (np.arange(24 * 32).reshape(24, 32) % 2).astype(np.uint8)
    im = Image.fromarray(labels, "P")
    im.putpalette([10, 20, 30, 40, 50, 60] + [0] * (254 * 3))
    im.info["transparency"] = 0
    im.save(tmp_path / "pt.png", transparency=0)
    img = read_image(tmp_path / "pt.png")
    assert img.data.shape == (24, 32, 3)
    assert img.data[0, 1].tolist() == [40, 50, 60]


def test_pil_mode_RGB_and_RGBA(tmp_path):
    Image.fromarray(RGB, "RGB").save(tmp_path / "c.png")
    assert np.array_equal(read_image(tmp_path / "c.png").data, RGB)
    rgba = np.concatenate([RGB, np.full((24, 32, 1), 9, np.uint8)], -1)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "ca.png")
    img = read_image(tmp_path / "ca.png")
    assert img.data.shape == (24, 32, 4) and not img.is_volume
    assert np.array_equal(to_rgb_uint8(img.data), RGB)


def test_pil_cmyk_jpeg_is_not_inverted(tmp_path):
    source = smooth_rgb()
    Image.fromarray(source).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    img = read_image(tmp_path / "cmyk.jpg")
    assert img.data.shape == source.shape and img.data.dtype == np.uint8
    error = np.abs(img.data.astype(int) - source.astype(int))
    assert error.mean() < 4, error.mean()       # inverted would be ~128 off
    assert np.array_equal(to_rgb_uint8(img.data), img.data)


def test_pil_rgb_jpeg(tmp_path):
    source = smooth_rgb()
    Image.fromarray(source).save(tmp_path / "c.jpg", quality=95)
    img = read_image(tmp_path / "c.jpg")
    assert np.abs(img.data.astype(int) - source.astype(int)).mean() < 4


def test_pil_mode_I16_png_is_uint16(tmp_path):
    deep = (RNG.integers(0, 65536, (24, 32))).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "d.png")
    assert Image.open(tmp_path / "d.png").mode.startswith("I")
    img = read_image(tmp_path / "d.png")
    assert img.data.dtype == np.uint16 and np.array_equal(img.data, deep)
    out = to_rgb_uint8(img.data)
    assert out.dtype == np.uint8 and out.max() == 255 and out.min() == 0


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L"])
def test_pil_16bit_modes_in_memory_are_native_uint16(mode):
    values = np.arange(24 * 32, dtype=np.uint16).reshape(24, 32) * 80
    raw = values.astype(">u2" if mode == "I;16B" else "<u2").tobytes()
    im = Image.frombytes(mode, (32, 24), raw)
    data = pil_to_array(im)
    assert data.dtype == np.dtype(np.uint16) and data.dtype.isnative
    assert np.array_equal(data, values)


def test_pil_mode_I_and_F_in_memory():
    values = (np.arange(24 * 32, dtype=np.int32).reshape(24, 32) - 300) * 1000
    assert np.array_equal(pil_to_array(Image.fromarray(values, "I")), values)
    floats = np.linspace(-1, 1, 24 * 32, dtype=np.float32).reshape(24, 32)
    data = pil_to_array(Image.fromarray(floats, "F"))
    assert data.dtype == np.float32 and np.array_equal(data, floats)


def test_pil_mode_YCbCr_in_memory_becomes_rgb():
    source = smooth_rgb()
    ycc = Image.fromarray(source).convert("YCbCr")
    data = pil_to_array(ycc)
    assert data.shape == source.shape
    assert np.abs(data.astype(int) - source.astype(int)).max() <= 3


def test_pil_mode_1_and_palette_bmp(tmp_path):
    Image.fromarray(GRAY > 100).save(tmp_path / "b.bmp")
    assert np.array_equal(read_image(tmp_path / "b.bmp").data, (GRAY > 100) * np.uint8(255))
    Image.fromarray(GRAY, "L").save(tmp_path / "g.bmp")
    assert np.array_equal(read_image(tmp_path / "g.bmp").data, GRAY)


# --------------------------------------------------------------------------- TIFF


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int8, np.int16, np.uint32,
                                   np.int32, np.float32, np.float64])
def test_tiff_dtypes_are_kept(tmp_path, dtype):
    import tifffile

    info = np.iinfo(dtype) if np.dtype(dtype).kind in "ui" else None
    low, high = (info.min, info.max) if info else (-5.0, 5.0)
    data = np.linspace(low, high, 24 * 32).reshape(24, 32).astype(dtype)
    tifffile.imwrite(tmp_path / "t.tif", data)
    img = read_image(tmp_path / "t.tif")
    assert not img.is_volume and img.data.dtype == np.dtype(dtype)
    assert np.array_equal(img.data, data)
    out = to_rgb_uint8(img.data)
    assert out.shape == (24, 32, 3) and out[0, 0, 0] == 0 and out[-1, -1, 0] == 255


def test_tiff_pages_are_a_volume(tmp_path):
    import tifffile

    stack = RNG.integers(0, 4000, (5, 24, 32)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "s.tif", stack)
    img = read_image(tmp_path / "s.tif")
    assert img.is_volume and img.data.shape == (5, 24, 32) and np.array_equal(img.data, stack)
    with tifffile.TiffWriter(tmp_path / "pages.tif") as tw:      # separate pages, no metadata
        for plane in stack:
            tw.write(plane, photometric="minisblack", metadata=None)
    img = read_image(tmp_path / "pages.tif")
    assert img.is_volume and np.array_equal(img.data, stack)


def test_tiff_single_page_with_leading_axis_is_2d(tmp_path):
    import tifffile

    tifffile.imwrite(tmp_path / "one.tif", GRAY[None])
    img = read_image(tmp_path / "one.tif")
    assert not img.is_volume and np.array_equal(img.data, GRAY)


def test_tiff_rgb_and_gray_alpha(tmp_path):
    import tifffile

    tifffile.imwrite(tmp_path / "rgb.tif", RGB, photometric="rgb")
    assert np.array_equal(read_image(tmp_path / "rgb.tif").data, RGB)
    la = np.stack([GRAY, np.full_like(GRAY, 255)], -1)
    tifffile.imwrite(tmp_path / "la.tif", la, photometric="minisblack",
                     extrasamples=["unassalpha"])
    img = read_image(tmp_path / "la.tif")
    assert not img.is_volume and np.array_equal(img.data, GRAY)


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "I;16", "I", "F"])
def test_tiff_written_by_pillow(tmp_path, mode):
    source = Image.fromarray(GRAY, "L")
    im = source.convert(mode) if mode not in ("I;16",) else Image.fromarray(
        GRAY.astype(np.uint16) * 256)
    im.save(tmp_path / "p.tif")
    img = read_image(tmp_path / "p.tif")
    assert not img.is_volume and img.data.shape == (24, 32)
    expected = pil_to_array(im)
    if mode == "LA":
        expected = GRAY
    assert np.array_equal(img.data, expected)


def test_tiff_cmyk_and_ycbcr_written_by_pillow_become_rgb(tmp_path):
    source = smooth_rgb()
    Image.fromarray(source).convert("CMYK").save(tmp_path / "cmyk.tif")
    img = read_image(tmp_path / "cmyk.tif")
    assert img.data.shape == source.shape and np.array_equal(img.data, source)
    Image.fromarray(source).convert("YCbCr").save(tmp_path / "ycc.tif")
    img = read_image(tmp_path / "ycc.tif")
    assert img.data.shape == source.shape
    assert np.abs(img.data.astype(int) - source.astype(int)).max() <= 3


def test_tiff_miniswhite_is_inverted(tmp_path):
    import tifffile

    tifffile.imwrite(tmp_path / "w.tif", GRAY, photometric="miniswhite")
    img = read_image(tmp_path / "w.tif")
    assert np.array_equal(img.data, 255 - GRAY)


# --------------------------------------------------------------------------- NIfTI


def _nifti(path, data, zooms=None):
    import nibabel as nib

    img = nib.Nifti1Image(data, np.diag([*(zooms or (1.0,) * 3), 1.0]))
    if zooms:
        img.header.set_zooms(zooms[: data.ndim] + (1.0,) * max(data.ndim - 3, 0))
    nib.save(img, str(path))
    return path


def test_nifti_2d(tmp_path):
    xy = RNG.integers(0, 1000, (32, 24)).astype(np.int16)
    img = read_image(_nifti(tmp_path / "a.nii.gz", xy, (0.5, 0.7, 1.0)))
    assert not img.is_volume and img.data.shape == (24, 32)
    assert np.array_equal(img.data, xy.T) and img.spacing == pytest.approx((0.7, 0.5))
    assert img.meta["spacing_known"] and img.meta["spacing_unit"] == "mm"


def test_nifti_one_slice_3d_is_2d(tmp_path):
    xy1 = RNG.integers(0, 1000, (32, 24, 1)).astype(np.float32)
    img = read_image(_nifti(tmp_path / "a.nii", xy1))
    assert not img.is_volume and np.array_equal(img.data, xy1[..., 0].T)


def test_nifti_3d(tmp_path):
    xyz = RNG.integers(0, 1000, (32, 24, 6)).astype(np.int16)
    img = read_image(_nifti(tmp_path / "v.nii.gz", xyz, (1.5, 1.5, 3.0)))
    assert img.is_volume and img.data.shape == (6, 24, 32)
    assert np.array_equal(img.data, xyz.transpose(2, 1, 0))
    assert img.spacing == pytest.approx((3.0, 1.5, 1.5))


def test_nifti_4d_with_one_volume_is_squeezed(tmp_path):
    xyzt = RNG.integers(0, 1000, (32, 24, 6, 1)).astype(np.int16)
    img = read_image(_nifti(tmp_path / "v4.nii.gz", xyzt))
    assert img.is_volume and np.array_equal(img.data, xyzt[..., 0].transpose(2, 1, 0))


def test_nifti_4d_with_several_volumes_is_refused(tmp_path):
    xyzt = np.zeros((16, 12, 6, 3), np.int16)
    with pytest.raises(InputError) as info:
        read_image(_nifti(tmp_path / "dwi.nii.gz", xyzt))
    assert str(info.value).startswith("dwi.nii.gz: a 4-D NIfTI (16, 12, 6, 3) holding 3 "
                                      "volumes; one 3-D volume per file is read")


def test_nifti_rgb24_2d_becomes_rgb(tmp_path):
    import nibabel as nib

    rgb_type = np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")])
    xy = np.zeros((32, 24), rgb_type)
    xy["R"], xy["G"], xy["B"] = RGB[..., 0].T, RGB[..., 1].T, RGB[..., 2].T
    nib.save(nib.Nifti1Image(xy, np.eye(4)), str(tmp_path / "c.nii"))
    img = read_image(tmp_path / "c.nii")
    assert not img.is_volume and np.array_equal(img.data, RGB)


# --------------------------------------------------------------------------- DICOM


def write_dicom(path, pixels, *, photometric="MONOCHROME2", window=None, frames=None,
                bits=16, signed=False, extra=None):
    """A DICOM file built by pydicom (uncompressed, explicit VR little endian)."""
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = pydicom.uid.SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "OT"
    colour = photometric in ("RGB", "YBR_FULL")
    shape = pixels.shape[1:] if frames else pixels.shape
    ds.Rows, ds.Columns = shape[:2]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
    ds.SamplesPerPixel = 3 if colour else 1
    if colour:
        ds.PlanarConfiguration = 0
    ds.PixelRepresentation = 1 if signed else 0
    ds.PhotometricInterpretation = photometric
    ds.PixelSpacing = [0.8, 0.6]
    if frames:
        ds.NumberOfFrames = frames
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    for key, value in (extra or {}).items():
        setattr(ds, key, value)
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return path


def test_dicom_monochrome2_keeps_values_and_window(tmp_path):
    pixels = (np.arange(24 * 32, dtype=np.uint16).reshape(24, 32) * 3)
    img = read_image(write_dicom(tmp_path / "m2.dcm", pixels, window=(1000, 800)))
    assert np.array_equal(img.data, pixels) and img.meta["window"] == Window(600, 1400)
    assert img.spacing == pytest.approx((0.8, 0.6)) and img.meta["spacing_known"]


def test_dicom_monochrome1_is_inverted_with_its_window(tmp_path):
    pixels = (np.arange(24 * 32, dtype=np.uint16).reshape(24, 32) * 3)
    img = read_image(write_dicom(tmp_path / "m1.dcm", pixels, photometric="MONOCHROME1",
                                 window=(1000, 800)))
    low, high = int(pixels.min()), int(pixels.max())
    assert np.array_equal(img.data, high + low - pixels.astype(np.float32))
    # the brightest stored value is the darkest shown
    assert img.data[0, 0] == high and img.data[-1, -1] == low
    # the stored window [600, 1400] mirrored the same way
    assert img.meta["window"] == Window(high + low - 1400, high + low - 600)
    shown = to_rgb_uint8(img.data, img.meta["window"])
    stored_shown = to_rgb_uint8(pixels, Window(600, 1400))
    # shown inverted relative to the stored pixels under their window (rounding aside)
    assert np.abs(shown.astype(int) - (255 - stored_shown.astype(int))).max() <= 1


@pytest.mark.parametrize("width", [0, -10, "0\\0"])
def test_dicom_window_width_zero_means_automatic(tmp_path, width):
    pixels = (np.arange(24 * 32, dtype=np.uint16).reshape(24, 32) * 3)
    center = "40\\40" if isinstance(width, str) else 40
    img = read_image(write_dicom(tmp_path / "w0.dcm", pixels, window=(center, width)))
    assert "window" not in img.meta
    auto = to_rgb_uint8(img.data)
    assert auto.min() == 0 and auto.max() == 255
    given = to_rgb_uint8(img.data, Window.parse("1000,800"))          # --window works too
    assert given[0, 0, 0] == 0 and given[-1, -1, 0] == 255


def test_dicom_second_window_used_when_first_is_invalid(tmp_path):
    pixels = np.zeros((24, 32), np.uint16)
    img = read_image(write_dicom(tmp_path / "w2.dcm", pixels, window=("40\\300", "0\\200")))
    assert img.meta["window"] == Window.from_center_width(300, 200)


def test_dicom_rgb(tmp_path):
    img = read_image(write_dicom(tmp_path / "c.dcm", RGB, photometric="RGB", bits=8))
    assert not img.is_volume and img.data.dtype == np.uint8 and np.array_equal(img.data, RGB)


def test_dicom_ybr_full_becomes_rgb(tmp_path):
    from pydicom.pixels import convert_color_space

    source = smooth_rgb()
    ybr = convert_color_space(source, "RGB", "YBR_FULL")
    img = read_image(write_dicom(tmp_path / "y.dcm", ybr, photometric="YBR_FULL", bits=8))
    assert img.data.shape == source.shape and img.data.dtype == np.uint8
    assert np.abs(img.data.astype(int) - source.astype(int)).max() <= 3


def test_dicom_palette_colour_becomes_rgb(tmp_path):
    lut = np.zeros((3, 256), np.uint16)
    lut[0, 1], lut[1, 2], lut[2, 3] = 65535, 65535, 65535          # 1 red, 2 green, 3 blue
    labels = (np.arange(24 * 32).reshape(24, 32) % 4).astype(np.uint8)
    extra = {f"{c}PaletteColorLookupTableDescriptor": [256, 0, 16] for c in
             ("Red", "Green", "Blue")}
    extra.update({f"{c}PaletteColorLookupTableData": lut[i].tobytes()
                  for i, c in enumerate(("Red", "Green", "Blue"))})
    img = read_image(write_dicom(tmp_path / "p.dcm", labels, photometric="PALETTE COLOR",
                                 bits=8, extra=extra))
    colours = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)
    assert np.array_equal(img.data, colours[labels])


def test_dicom_multiframe_is_a_volume(tmp_path):
    frames = RNG.integers(0, 4000, (4, 24, 32)).astype(np.uint16)
    img = read_image(write_dicom(tmp_path / "mf.dcm", frames, frames=4))
    assert img.is_volume and img.data.shape == (4, 24, 32)
    assert np.array_equal(img.data, frames)


def test_dicom_signed_with_rescale(tmp_path):
    pixels = (np.arange(24 * 32).reshape(24, 32) - 400).astype(np.int16)
    img = read_image(write_dicom(tmp_path / "s.dcm", pixels, signed=True,
                                 extra={"RescaleSlope": 2, "RescaleIntercept": -1024}))
    assert np.array_equal(img.data, pixels * 2.0 - 1024)


def test_decoded_images_are_writable(tmp_path):
    """A PNG mask read for napari is painted in place; a read-only array would refuse it."""
    from PIL import Image

    from napari_medclipsam.core.io import read_image

    for mode, shape in (("L", (12, 10)), ("RGB", (12, 10, 3)), ("P", (12, 10))):
        path = tmp_path / f"{mode}.png"
        Image.fromarray(np.zeros(shape, np.uint8)).convert(mode).save(path)
        data = read_image(path).data
        assert data.flags.writeable, mode
        data[0, 0] = 1
