"""The NIfTI / DICOM reader and the Labels -> NIfTI writer, used the way a person uses napari.

Every scan is written here by nibabel or pydicom; nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from napari_medclipsam.core.errors import InputError
from napari_medclipsam.core.io import read_dicom_series, read_image

PLUGIN = "napari-medclipsam"
NIFTI_AFFINE = np.array([[0.8, 0.0, 0.0, -40.0],
                         [0.0, 0.8, 0.0, 12.5],
                         [0.0, 0.0, 2.5, 30.0],
                         [0.0, 0.0, 0.0, 1.0]])
MARKER_IJK = (7, 3, 4)          # NIfTI voxel (i, j, k) -> napari data[k, j, i]

# the DICOM series: 5 axial CT slices, 16x16, positions 2.5 mm apart, files named out of order
SLICE_Z = [-20.0, -17.5, -15.0, -12.5, -10.0]             # sorted position k -> z (LPS, mm)
FILE_NAMES = ["IM0003.dcm", "IM0000.dcm", "1.2.826.0.1.3680043.2.1125.7", "IM0004",
              "IM0001.dcm"]                                # file for position k (one UID-named)
ROW_COL_SPACING = (0.7, 0.6)
IPP_XY = (-50.0, -30.0)


def raw_slice(k: int) -> np.ndarray:
    """Stored (pre-rescale) pixels of the slice at sorted position k: unique per slice."""
    return (np.arange(256, dtype=np.int16).reshape(16, 16) + 1000 * (k + 1)).astype(np.int16)


def write_ct_slice(path: Path, pixels: np.ndarray, *, z: float | None, instance: int,
                   series_uid: str, study_uid: str, window=(40, 400), description="CT axial"):
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.Modality, ds.SeriesDescription, ds.InstanceNumber = "CT", description, instance
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.SamplesPerPixel, ds.PixelRepresentation = 1, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.PixelSpacing = list(ROW_COL_SPACING)
    ds.SliceThickness = 5.0                       # deliberately not the position step
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    if z is not None:
        ds.ImagePositionPatient = [IPP_XY[0], IPP_XY[1], z]
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = pixels.astype(np.int16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)


def write_series(folder: Path, *, with_positions=True, series_uid=None, study_uid=None,
                 names=FILE_NAMES, z=SLICE_Z, window=(40, 400)) -> Path:
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    series_uid, study_uid = series_uid or generate_uid(), study_uid or generate_uid()
    n = len(z)
    for k, (name, zk) in enumerate(zip(names, z, strict=True)):
        # InstanceNumber runs against the positions: sorting must use the positions
        write_ct_slice(folder / name, raw_slice(k), z=zk if with_positions else None,
                       instance=(k + 1) if not with_positions else n - k,
                       series_uid=series_uid, study_uid=study_uid, window=window)
    return folder


@pytest.fixture
def nifti_scan(tmp_path):
    import nibabel as nib

    xyz = np.random.default_rng(0).integers(0, 400, (12, 10, 6)).astype(np.int16)
    xyz[MARKER_IJK] = 3000
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(xyz, NIFTI_AFFINE), str(path))
    return path, xyz


@pytest.fixture
def viewer(make_napari_viewer, monkeypatch):
    """A real viewer with in-memory napari settings (reader choices are not saved to disk)."""
    import napari.settings
    from napari.settings import NapariSettings

    v = make_napari_viewer()
    monkeypatch.setattr(napari.settings, "_SETTINGS", NapariSettings(None))
    return v


# --------------------------------------------------------------------------- NIfTI


def test_nifti_opens_with_spacing_origin_and_orientation(viewer, nifti_scan):
    path, xyz = nifti_scan
    layers = viewer.open(str(path), plugin=PLUGIN)
    assert len(layers) == 1 and layers[0].__class__.__name__ == "Image"
    layer = layers[0]
    assert layer.name == "scan"
    assert layer.data.shape == (6, 10, 12)
    i, j, k = MARKER_IJK
    assert layer.data[k, j, i] == 3000 and (layer.data == 3000).sum() == 1
    assert np.array_equal(layer.data, xyz.transpose(2, 1, 0))
    assert tuple(layer.scale) == pytest.approx((2.5, 0.8, 0.8))
    assert tuple(layer.translate) == pytest.approx((30.0, 12.5, -40.0))
    # the marker's world position (napari, z y x) is the NIfTI affine's (x y z), reversed
    world = np.asarray(layer.data_to_world((k, j, i)))
    assert world[::-1] == pytest.approx((NIFTI_AFFINE @ [i, j, k, 1])[:3])
    low, high = layer.contrast_limits      # robust percentiles: the lone marker is clipped
    assert 0 <= low < 10 and 380 < high < 400
    assert np.allclose(layer.metadata["affine"], NIFTI_AFFINE)
    assert layer.metadata["source_path"] == str(path)


def test_open_without_plugin_asks_once_then_uses_ours(viewer, nifti_scan, monkeypatch):
    """napari's own reader also claims *.nii.gz, so a drop (no plugin named) asks which
    plugin to use in napari's reader dialog; after 'remember this choice' the file type opens
    with ours. (``viewer.open(path)`` in Python defaults to ``plugin="napari"``, napari's
    built-in reader; pass ``plugin=None`` to get the drop's behaviour.)"""
    from napari._qt.dialogs import qt_reader_dialog
    from napari.errors import MultipleReaderError

    path, _ = nifti_scan
    with pytest.raises(MultipleReaderError) as info:
        viewer.open(str(path), plugin=None)
    assert PLUGIN in info.value.available_plugins

    offered = []

    def click_ours_and_ok(dialog):           # what a person does in the modal dialog
        buttons = {b.text(): b for b in dialog.reader_btn_group.buttons()}
        offered.extend(buttons)
        buttons["MedCLIP-SAM"].setChecked(True)
        dialog.persist_checkbox.setChecked(True)    # "Remember this choice ..."
        return 1                                    # OK

    monkeypatch.setattr(qt_reader_dialog.QtReaderDialog, "exec_", click_ours_and_ok)
    viewer.window._qt_viewer._qt_open([str(path)], stack=False)   # what a drop calls
    assert "MedCLIP-SAM" in offered and len(offered) == 2          # ours and napari's
    assert tuple(viewer.layers[-1].scale) == pytest.approx((2.5, 0.8, 0.8))

    again = viewer.open(str(path), plugin=None)                   # no plugin named
    assert tuple(again[0].scale) == pytest.approx((2.5, 0.8, 0.8))
    assert tuple(again[0].translate) == pytest.approx((30.0, 12.5, -40.0))


def test_bad_nifti_gives_a_clear_error_and_no_layer(viewer, tmp_path):
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"this is not a NIfTI file" * 20)
    with pytest.raises(Exception) as info:   # noqa: B017 - napari wraps the plugin's error
        viewer.open(str(bad), plugin=PLUGIN)
    chain, error = [], info.value
    while error is not None:
        chain.append(error)
        error = error.__cause__ or getattr(error, "original_error", None)
    ours = [e for e in chain if isinstance(e, InputError)]
    assert ours and "broken.nii.gz" in str(ours[0]) and "\n" not in str(ours[0])
    assert len(viewer.layers) == 0


# --------------------------------------------------------------------------- DICOM


def test_dicom_series_folder_is_sorted_by_position(viewer, tmp_path):
    folder = write_series(tmp_path / "ct_series")
    (folder / "notes.txt").write_text("not DICOM")
    layers = viewer.open(str(folder), plugin=PLUGIN)
    assert len(layers) == 1
    layer = layers[0]
    assert layer.name == "ct_series"
    assert layer.data.shape == (5, 16, 16) and layer.data.dtype == np.int16
    for k in range(5):                       # slice k is the one at the k-th lowest z
        assert np.array_equal(layer.data[k], raw_slice(k) - 1024)
    assert tuple(layer.scale) == pytest.approx((2.5, *ROW_COL_SPACING))   # not SliceThickness
    assert tuple(layer.translate) == pytest.approx((SLICE_Z[0], IPP_XY[1], IPP_XY[0]))
    assert tuple(layer.contrast_limits) == pytest.approx((40 - 200, 40 + 200))
    affine = layer.metadata["affine"]        # voxel (col, row, slice) -> RAS
    assert np.allclose(affine[:3, 3], (-IPP_XY[0], -IPP_XY[1], SLICE_Z[0]))
    assert np.allclose(np.diag(affine)[:3], (-0.6, -0.7, 2.5))
    assert layer.metadata["sorted_by"] == "ImagePositionPatient"
    assert layer.metadata["modality"] == "CT"


def test_dicom_series_without_positions_falls_back_to_instance_number(tmp_path):
    folder = write_series(tmp_path / "no_pos", with_positions=False)
    image = read_dicom_series(folder)
    assert image.meta["sorted_by"] == "InstanceNumber"
    for k in range(5):
        assert np.array_equal(image.data[k], raw_slice(k) - 1024)
    assert image.spacing == pytest.approx((5.0, *ROW_COL_SPACING))   # SliceThickness then


def test_folder_with_two_series_opens_the_largest_and_says_so(viewer, tmp_path):
    folder = write_series(tmp_path / "study")
    write_series(tmp_path / "study" / "scout", names=["S1.dcm", "S2.dcm"], z=[0.0, 5.0])
    layer = viewer.open(str(folder), plugin=PLUGIN)[0]
    assert layer.data.shape == (5, 16, 16)
    assert layer.name == "study (series 1 of 2)"
    (other,) = layer.metadata["other_series"]
    assert other[2] == 2


def test_single_dicom_file_and_extensionless_file(viewer, tmp_path):
    folder = write_series(tmp_path / "ct_series", window=(-600, 1500))
    layer = viewer.open(str(folder / "IM0000.dcm"), plugin=PLUGIN)[0]   # position k=1
    assert layer.data.shape == (16, 16)
    assert np.allclose(layer.data, raw_slice(1) - 1024)
    assert tuple(layer.scale) == pytest.approx(ROW_COL_SPACING)
    assert tuple(layer.translate) == pytest.approx((IPP_XY[1], IPP_XY[0]))
    assert tuple(layer.contrast_limits) == pytest.approx((-1350, 150))
    # no extension: recognised by the DICM marker (the CLI reads it the same way)
    image = read_image(folder / "IM0004")
    assert np.allclose(image.data, raw_slice(3) - 1024)


def test_invalid_window_falls_back_to_percentiles(viewer, tmp_path):
    folder = write_series(tmp_path / "bad_window", window=(40, 0))
    layer = viewer.open(str(folder), plugin=PLUGIN)[0]
    values = layer.data.astype(float)
    assert tuple(layer.contrast_limits) == pytest.approx(
        tuple(np.percentile(values, (0.5, 99.5))), rel=1e-3)


def test_reader_declines_what_it_does_not_read(tmp_path):
    from napari_medclipsam._io.readers import get_reader

    (tmp_path / "photo.png").write_bytes(b"\x89PNG")
    (tmp_path / "empty_folder").mkdir()
    (tmp_path / "text_folder").mkdir()
    (tmp_path / "text_folder" / "a.txt").write_text("hello")
    assert get_reader(str(tmp_path / "photo.png")) is None
    assert get_reader(str(tmp_path / "empty_folder")) is None
    assert get_reader(str(tmp_path / "text_folder")) is None
    assert get_reader(str(tmp_path / "scan.nii.gz")) is not None


# --------------------------------------------------------------------------- writer


def test_labels_painted_on_the_scan_save_with_its_affine(viewer, nifti_scan, tmp_path):
    import nibabel as nib

    path, _ = nifti_scan
    image = viewer.open(str(path), plugin=PLUGIN)[0]
    viewer.layers.selection.active = image
    viewer._new_labels()                      # the "New labels" button: no metadata copied
    labels = viewer.layers[-1]
    assert labels.__class__.__name__ == "Labels" and not labels.metadata
    i, j, k = MARKER_IJK
    labels.data[k, j, i] = 1
    labels.data[2, 5:8, 1:4] = 2
    expected = np.asarray(labels.data).copy()
    viewer.layers.selection = {labels}
    out = tmp_path / "out" / "mask.nii.gz"
    saved = viewer.layers.save(str(out), selected=True, plugin=PLUGIN)
    assert saved == [str(out)]
    back = nib.load(str(out))
    assert np.allclose(back.affine, NIFTI_AFFINE)
    assert back.get_data_dtype() == np.uint8
    data = np.asarray(back.dataobj)
    assert data.shape == (12, 10, 6) and data[i, j, k] == 1
    assert np.array_equal(data.transpose(2, 1, 0), expected)
    assert [p.name for p in out.parent.iterdir()] == ["mask.nii.gz"]   # atomic: no leftovers


def test_flipped_scan_keeps_its_flip_when_labels_are_saved(viewer, tmp_path):
    """A LAS scan (x stored flipped): the saved mask has the scan's affine, not a mirror."""
    import napari
    import nibabel as nib

    las = np.diag([-1.5, 1.5, 3.0, 1.0])
    las[:3, 3] = (90.0, -120.0, -60.0)
    nib.save(nib.Nifti1Image(np.ones((8, 9, 4), np.float32), las), str(tmp_path / "las.nii"))
    image = viewer.open(str(tmp_path / "las.nii"), plugin=PLUGIN)[0]
    assert tuple(image.scale) == pytest.approx((3.0, 1.5, 1.5))
    assert tuple(image.translate) == pytest.approx((-60.0, -120.0, -90.0))
    labels = viewer.add_labels(np.zeros(image.data.shape, np.uint8), scale=image.scale,
                               translate=image.translate)
    labels.data[1, 2, 3] = 4
    out = tmp_path / "las_mask.nii"
    napari.save_layers(str(out), [labels], plugin=PLUGIN)
    back = nib.load(str(out))
    assert np.allclose(back.affine, las)
    assert np.asarray(back.dataobj)[3, 2, 1] == 4


def test_writer_fallback_and_2d_labels(tmp_path):
    """Without a source affine the layer's scale/translate give an axis-aligned one; 2-D
    labels become a 2-D NIfTI; large label values get a wider integer type."""
    import napari
    import nibabel as nib
    from napari.layers import Labels

    volume = np.zeros((3, 4, 5), np.int32)
    volume[1, 2, 3] = 700
    layer = Labels(volume, scale=(2.0, 0.5, 0.25), translate=(10.0, -5.0, 3.0))
    napari.save_layers(str(tmp_path / "v.nii.gz"), [layer], plugin=PLUGIN)
    back = nib.load(str(tmp_path / "v.nii.gz"))
    expected = np.diag([0.25, 0.5, 2.0, 1.0])
    expected[:3, 3] = (3.0, -5.0, 10.0)
    assert np.allclose(back.affine, expected)
    assert back.get_data_dtype() == np.int16 and np.asarray(back.dataobj)[3, 2, 1] == 700

    plane = np.zeros((6, 7), np.uint8)
    plane[4, 1] = 3
    layer2d = Labels(plane, scale=(0.7, 0.6), translate=(-30.0, -50.0))
    napari.save_layers(str(tmp_path / "p.nii.gz"), [layer2d], plugin=PLUGIN)
    back2d = nib.load(str(tmp_path / "p.nii.gz"))
    assert back2d.shape == (7, 6) and np.asarray(back2d.dataobj)[1, 4] == 3
    assert np.allclose(back2d.affine[:2, :2], np.diag([0.6, 0.7]))
    assert np.allclose(back2d.affine[:2, 3], (-50.0, -30.0))


def test_dicom_series_labels_save_in_ras(viewer, tmp_path):
    """A mask painted on a DICOM series is written with the series' RAS affine."""
    import nibabel as nib

    folder = write_series(tmp_path / "ct")
    image = viewer.open(str(folder), plugin=PLUGIN)[0]
    labels = viewer.add_labels(np.zeros(image.data.shape, np.uint8), scale=image.scale,
                               translate=image.translate, metadata=dict(image.metadata))
    labels.data[4, 0, 0] = 1
    out = tmp_path / "ct_mask.nii.gz"
    viewer.layers.selection = {labels}
    viewer.layers.save(str(out), selected=True, plugin=PLUGIN)
    back = nib.load(str(out))
    assert np.allclose(back.affine, image.metadata["affine"])
    # voxel (0, 0, 4) lies at LPS (x, y, z) = (IPP_x, IPP_y, z of the 5th slice)
    assert np.allclose(back.affine @ [0, 0, 4, 1],
                       [-IPP_XY[0], -IPP_XY[1], SLICE_Z[4], 1])


def test_reading_and_writing_import_no_torch(nifti_scan, tmp_path):
    """torch/open_clip imported after a viewer exists crash napari under Mesa llvmpipe."""
    import subprocess
    import sys

    path, _ = nifti_scan
    code = ("import sys, numpy as np\n"
            "from napari_medclipsam._io.readers import get_reader\n"
            "from napari_medclipsam._io.writers import labels_affine\n"
            f"(data, kw, kind), = get_reader({str(path)!r})({str(path)!r})\n"
            "labels_affine(data.shape, kw)\n"
            "heavy = [m for m in ('torch', 'open_clip', 'torchvision') if m in sys.modules]\n"
            "print(heavy); sys.exit(1 if heavy else 0)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
