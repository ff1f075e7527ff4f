"""Reading, windowing and atomic writing (real files in tmp_path)."""

import numpy as np
import pytest

from napari_medclipsam.core.errors import InputError
from napari_medclipsam.core.io import (
    Window,
    apply_window,
    atomic_path,
    auto_window,
    file_stem,
    read_image,
    to_rgb_uint8,
    write_float_tiff,
    write_mask_png,
    write_nifti_like,
)


def test_to_rgb_uint8_keeps_8bit_and_replicates_gray():
    gray = (np.arange(80, dtype=np.uint8).reshape(8, 10) * 3).astype(np.uint8)
    rgb = to_rgb_uint8(gray)
    assert rgb.shape == (8, 10, 3) and rgb.dtype == np.uint8
    assert (rgb[..., 0] == gray).all() and (rgb[..., 2] == gray).all()


def test_to_rgb_uint8_drops_alpha():
    rgba = np.zeros((9, 10, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 10
    out = to_rgb_uint8(rgba)
    assert out.shape == (9, 10, 3) and (out[..., 0] == 200).all() and (out[..., 1] == 0).all()


def test_window_maps_low_high_to_0_255_and_clips():
    ct = np.array([[-2000, -1350, -600], [150, 1000, 3000]], dtype=np.int16)
    out = apply_window(ct, Window.from_center_width(-600, 1500))
    assert out.tolist() == [[0, 0, 128], [255, 255, 255]]


def test_16bit_default_window_uses_percentiles():
    img = np.linspace(0, 65535, 100 * 100).reshape(100, 100).astype(np.uint16)
    w = auto_window(img)
    assert w.low == pytest.approx(np.percentile(img, 0.5))
    assert w.high == pytest.approx(np.percentile(img, 99.5))
    out = to_rgb_uint8(img)
    assert out.dtype == np.uint8 and out.min() == 0 and out.max() == 255


def test_float_with_nan_and_constant_images():
    img = np.ones((8, 8), np.float32)
    img[0, 0] = np.nan
    out = to_rgb_uint8(img)
    assert out.shape == (8, 8, 3)
    with pytest.raises(InputError, match="finite"):
        to_rgb_uint8(np.full((8, 8), np.nan, np.float32))


def test_bad_shapes_and_windows_raise_clear_errors():
    with pytest.raises(InputError, match="slice by slice"):
        to_rgb_uint8(np.zeros((3, 8, 8), np.uint8)[..., None].repeat(5, -1))
    with pytest.raises(InputError, match="low < high"):
        Window(5, 1)
    with pytest.raises(InputError, match="CENTER,WIDTH"):
        Window.parse("lung")


def test_png_round_trip_and_errors(tmp_path):
    mask = np.zeros((10, 12), bool)
    mask[2:5, 3:9] = True
    write_mask_png(tmp_path / "m.png", mask)
    back = read_image(tmp_path / "m.png")
    assert not back.is_volume and back.data.dtype == np.uint8
    assert set(np.unique(back.data)) == {0, 255} and ((back.data > 0) == mask).all()
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        read_image(tmp_path / "empty.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match=r"bad.png: not a PNG image \(a text file\)"):
        read_image(tmp_path / "bad.png")
    with pytest.raises(InputError, match="not found"):
        read_image(tmp_path / "nope.png")
    (tmp_path / "x.xyz").write_bytes(b"1")
    with pytest.raises(InputError, match="unsupported"):
        read_image(tmp_path / "x.xyz")


def test_nifti_volume_round_trip_keeps_orientation_and_spacing(tmp_path):
    import nibabel as nib

    xyz = np.random.default_rng(0).integers(0, 1000, (20, 16, 6)).astype(np.int16)
    affine = np.diag([0.8, 0.9, 2.5, 1.0])
    nib.save(nib.Nifti1Image(xyz, affine), str(tmp_path / "scan.nii.gz"))
    img = read_image(tmp_path / "scan.nii.gz")
    assert img.is_volume and img.data.shape == (6, 16, 20) and img.name == "scan"
    assert img.spacing == pytest.approx((2.5, 0.9, 0.8))
    assert (img.data[3] == xyz[:, :, 3].T).all()
    mask = img.data > 500
    write_nifti_like(tmp_path / "mask.nii.gz", mask, img)
    back = nib.load(str(tmp_path / "mask.nii.gz"))
    assert np.allclose(back.affine, affine)
    assert (np.asarray(back.dataobj) == (xyz > 500)).all()


def test_dicom_is_rescaled(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = pydicom.uid.CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = FileDataset(str(tmp_path / "a.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
    pixels = np.arange(64, dtype=np.uint16).reshape(8, 8)
    ds.Rows, ds.Columns = 8, 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.SamplesPerPixel, ds.PixelRepresentation = 1, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.RescaleSlope, ds.RescaleIntercept = 2, -1024
    ds.PixelSpacing = [0.7, 0.6]
    ds.WindowCenter, ds.WindowWidth = 40, 400
    ds.PixelData = pixels.tobytes()
    ds.save_as(str(tmp_path / "a.dcm"), enforce_file_format=True)
    img = read_image(tmp_path / "a.dcm")
    assert img.data[0, 1] == pytest.approx(2 * 1 - 1024)
    assert img.spacing == pytest.approx((0.7, 0.6))
    assert img.meta["window"] == Window.from_center_width(40, 400)


def test_atomic_path_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "out.tif"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    write_float_tiff(target, np.ones((3, 3)))
    assert [p.name for p in tmp_path.iterdir()] == ["out.tif"]


def test_file_stem_handles_double_suffix():
    assert file_stem("a/b/case_01.nii.gz") == "case_01"
    assert file_stem("img.final.png") == "img.final"


def _dead_pid() -> int:
    """The id of a process that has exited (a child we started and waited for)."""
    import subprocess
    import sys

    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)
    return int(child.stdout)


def test_atomic_path_temporary_is_named_and_owned(tmp_path):
    import os

    target = tmp_path / "map.tif"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path
        assert tmp.name.startswith(f".map.tif.partial-{os.getpid()}-")
        assert tmp.name.endswith(".tif") and tmp.exists()
        tmp.write_bytes(b"x")
    assert [p.name for p in tmp_path.iterdir()] == ["map.tif"]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_and_folders_honour_the_umask(tmp_path, umask):
    import os
    import stat

    old = os.umask(umask)
    try:
        write_mask_png(tmp_path / "new" / "m.png", np.ones((4, 4), bool))
    finally:
        os.umask(old)
    file_mode = stat.S_IMODE((tmp_path / "new" / "m.png").stat().st_mode)
    dir_mode = stat.S_IMODE((tmp_path / "new").stat().st_mode)
    assert file_mode == 0o666 & ~umask
    assert dir_mode == 0o777 & ~umask


def test_remove_stale_temporaries_removes_only_dead_runs_leftovers(tmp_path):
    import os
    import time

    from napari_medclipsam.core.io import remove_stale_temporaries

    dead = _dead_pid()
    stale = tmp_path / f".sal.tif.partial-{dead}-0123abcd.tif"
    stale.write_bytes(b"half a map")
    live = tmp_path / f".sal.tif.partial-{os.getpid()}-89abcdef.tif"
    live.write_bytes(b"being written")
    old_live = tmp_path / f".old.png.partial-{os.getpid()}-00000000.png"
    old_live.write_bytes(b"a reused pid's leftover")
    day_ago = time.time() - 2 * 24 * 3600
    os.utime(old_live, (day_ago, day_ago))
    keep = {
        ".hidden.tif": b"the user's hidden file",
        "sal.tif": b"a finished map",
        f".sal.tif.partial-{dead}-0123abcd.png": b"suffix differs from the target's",
        f".sal.tif.partial-{dead}-XYZ.tif": b"not our token",
        f"sal.tif.partial-{dead}-0123abcd.tif": b"not hidden",
    }
    for name, data in keep.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / f".dir.tif.partial-{dead}-0123abcd.tif").mkdir()   # a folder: not ours
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(removed) == sorted([stale, old_live])
    assert not stale.exists() and not old_live.exists()
    assert live.read_bytes() == b"being written"
    for name, data in keep.items():
        assert (tmp_path / name).read_bytes() == data
    assert remove_stale_temporaries(tmp_path / "missing") == []


def test_remove_stale_temporaries_keeps_what_this_process_writes(tmp_path):
    import os
    import time

    from napari_medclipsam.core.io import remove_stale_temporaries

    with atomic_path(tmp_path / "a.png") as tmp:
        day_ago = time.time() - 2 * 24 * 3600
        os.utime(tmp, (day_ago, day_ago))
        assert remove_stale_temporaries(tmp_path) == []
        tmp.write_bytes(b"done")
    assert (tmp_path / "a.png").read_bytes() == b"done"


def test_atomic_write_under_a_file_says_not_a_folder(tmp_path):
    """A file where a folder is needed is named as such, not taken for an existing target."""
    from napari_medclipsam.core.io import write_text

    (tmp_path / "notes").write_text("mine\n")
    for target in (tmp_path / "notes" / "scores.csv", tmp_path / "notes" / "sub" / "x.csv"):
        with pytest.raises(NotADirectoryError):
            write_text(target, "a", overwrite=False)
    assert (tmp_path / "notes").read_text() == "mine\n"
