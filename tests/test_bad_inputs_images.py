"""Hostile and careless image inputs, for reading and for ``evaluate`` (issue 11).

Each case builds its file here (small: a "bomb" is only a header that promises a huge image),
then asserts the exact outcome: the one-line error names the cause, the user's files are
unchanged (by hash) and nothing is left behind (no new file, no temporary).
"""

from __future__ import annotations

import hashlib
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from napari_medclipsam.core.errors import InputError
from napari_medclipsam.core.io import SUPPORTED, read_image, to_rgb_uint8


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones included) -> sha256."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- builders


def png_bytes(array: np.ndarray) -> bytes:
    import io

    out = io.BytesIO()
    Image.fromarray(array).save(out, "PNG")
    return out.getvalue()


def png_chunk(tag: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + tag + data
            + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))


def png_bomb(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR promising width x height gray pixels, 1 kB of data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
            + png_chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + png_chunk(b"IEND", b""))


def tiff_bomb(width: int, height: int) -> bytes:
    """A little-endian baseline TIFF whose tags promise width x height 8-bit pixels."""
    entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 1),
               (262, 3, 1, 1), (273, 4, 1, 0), (277, 3, 1, 1), (278, 4, 1, height),
               (279, 4, 1, 16)]
    ifd_size = 2 + 12 * len(entries) + 4
    data_offset = 8 + ifd_size
    ifd = struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        value = data_offset if tag == 273 else value
        packed = struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value)
        ifd += struct.pack("<HHI", tag, kind, count) + packed
    ifd += struct.pack("<I", 0)
    return b"II*\0" + struct.pack("<I", 8) + ifd + b"\0" * 16


def nifti_bomb(path: Path, shape=(30000, 30000, 30000)) -> Path:
    """A NIfTI-1 header promising ``shape`` uint8 voxels, followed by no data at all."""
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.uint8)
    header["vox_offset"] = 352
    path.write_bytes(header.binaryblock + b"\0" * 4)
    return path


def jpeg_bomb(path: Path, width: int = 65000, height: int = 65000) -> Path:
    """A small JPEG whose SOF0 marker is rewritten to promise width x height pixels."""
    import io

    out = io.BytesIO()
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(out, "JPEG")
    data = bytearray(out.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    path.write_bytes(bytes(data))
    return path


def write_dicom(path: Path, pixels: np.ndarray, **kw) -> Path:
    from test_image_modes import write_dicom as build

    return build(path, pixels, **kw)


def dicom_bomb(path: Path) -> Path:
    """Rows = Columns = 65535 and 1000 frames promised, 128 bytes of pixel data given."""
    write_dicom(path, np.zeros((1, 8, 8), np.uint16), frames=1000,
                extra={"Rows": 65535, "Columns": 65535})
    return path


def nifti(path: Path, data: np.ndarray, zooms=(1.0, 1.0, 1.0)) -> Path:
    import nibabel as nib

    nib.save(nib.Nifti1Image(data, np.diag([*zooms, 1.0])), str(path))
    return path


# --------------------------------------------------------------------------- read cases


@dataclass
class ReadCase:
    id: str
    build: Callable[[Path], Path]            # tmp_path -> the file to read
    error: str | None                         # exact one-line message ({path}, {name})
    env: dict | None = None
    check: Callable | None = None             # for files that must be read: ImageData -> None


def _truncated_png(d: Path) -> Path:
    data = png_bytes(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8))
    (d / "cut.png").write_bytes(data[: len(data) // 2])
    return d / "cut.png"


def _truncated_nifti(d: Path) -> Path:
    nifti(d / "cut.nii", np.ones((20, 20, 20), np.int16))
    data = (d / "cut.nii").read_bytes()
    (d / "cut.nii").write_bytes(data[: len(data) // 2])
    return d / "cut.nii"


def _truncated_gzip_nifti(d: Path) -> Path:
    nifti(d / "cut.nii.gz", np.random.default_rng(0).integers(0, 999, (20, 20, 20))
          .astype(np.int16))
    data = (d / "cut.nii.gz").read_bytes()
    (d / "cut.nii.gz").write_bytes(data[: len(data) // 2])
    return d / "cut.nii.gz"


def _text_as(name: str) -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        (d / name).write_text("# not an image\nJust some notes.\n")
        return d / name
    return build


def _write(name: str, data: bytes) -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        (d / name).write_bytes(data)
        return d / name
    return build


def _la_png(d: Path) -> Path:
    Image.fromarray(np.stack([np.full((20, 30), 90, np.uint8),
                              np.full((20, 30), 255, np.uint8)], -1), "LA").save(d / "la.png")
    return d / "la.png"


def _check_la(img) -> None:
    assert not img.is_volume and img.data.shape == (20, 30) and (img.data == 90).all()


def _cmyk_jpeg(d: Path) -> Path:
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[..., 0] = 220                                           # a red image
    Image.fromarray(rgb).convert("CMYK").save(d / "cmyk.jpg", quality=95)
    return d / "cmyk.jpg"


def _check_cmyk(img) -> None:
    mean = img.data.reshape(-1, 3).mean(axis=0)
    assert abs(mean[0] - 220) < 4 and mean[1] < 4 and mean[2] < 4   # red, not cyan


def _dicom_ww0(d: Path) -> Path:
    return write_dicom(d / "ww0.dcm", np.arange(64, dtype=np.uint16).reshape(8, 8) * 50,
                       window=(40, 0))


def _check_ww0(img) -> None:
    assert "window" not in img.meta
    rgb = to_rgb_uint8(img.data)
    assert rgb.min() == 0 and rgb.max() == 255


def _no_pixels_dicom(d: Path) -> Path:
    path = write_dicom(d / "nopix.dcm", np.zeros((8, 8), np.uint16))
    import pydicom

    ds = pydicom.dcmread(str(path))
    del ds.PixelData
    ds.save_as(str(path))
    return path


def _small_png(d: Path) -> Path:
    (d / "small.png").write_bytes(png_bytes(np.zeros((100, 100), np.uint8)))
    return d / "small.png"


LIMIT_HINT = "(a decompression bomb or a damaged header?); if the file is genuine, raise the " \
             "limit with MEDCLIPSAM_MAX_PIXELS=N."

READ_CASES = [
    ReadCase("zero-byte png", _write("empty.png", b""), "{path} is empty (0 bytes)."),
    ReadCase("truncated png", _truncated_png,
             "Could not decode cut.png: the file is truncated or damaged ({detail})."),
    ReadCase("text named .png", _text_as("notes.png"), "notes.png: not a PNG image (a text "
                                                       "file)."),
    ReadCase("markdown file", _text_as("README.md"),
             "README.md: unsupported file type '.md'; supported: " + ", ".join(SUPPORTED)
             + "."),
    ReadCase("text named .jpg", _text_as("a.jpg"), "a.jpg: not a JPG image (a text file)."),
    ReadCase("text named .tif", _text_as("a.tif"),
             "a.tif: not a TIFF image (the file holds text)."),
    ReadCase("text named .nii", _text_as("a.nii"),
             "a.nii: not a NIfTI image (the file holds text)."),
    ReadCase("text named .dcm", _text_as("a.dcm"), "a.dcm: not a DICOM file (the file holds "
                                                   "text)."),
    ReadCase("truncated nifti", _truncated_nifti,
             "Could not decode cut.nii: the file is truncated or damaged ({detail})."),
    ReadCase("truncated nifti.gz", _truncated_gzip_nifti,
             "Could not decode cut.nii.gz: {detail}"),
    ReadCase("png bomb header", _write("bomb.png", png_bomb(100000, 100000)),
             "bomb.png: its header asks for 100000x100000 = 10,000,000,000 pixels, over the "
             "limit of 178,956,970 " + LIMIT_HINT),
    ReadCase("tiff bomb header", _write("bomb.tif", tiff_bomb(100000, 100000)),
             "bomb.tif: its header asks for 100000x100000 = 10,000,000,000 pixels, over the "
             "limit of 178,956,970 " + LIMIT_HINT),
    ReadCase("jpeg bomb header", lambda d: jpeg_bomb(d / "bomb.jpg"),
             "bomb.jpg: its header asks for 65000x65000 = 4,225,000,000 pixels, over the "
             "limit of 178,956,970 " + LIMIT_HINT),
    ReadCase("nifti bomb header", lambda d: nifti_bomb(d / "bomb.nii"),
             "bomb.nii: its header asks for 30000x30000x30000 = 27,000,000,000,000 voxels, "
             "over the limit of 1,500,000,000 " + LIMIT_HINT),
    ReadCase("dicom bomb header", lambda d: dicom_bomb(d / "bomb.dcm"),
             "bomb.dcm: its header asks for 1000x65535x65535 = 4,294,836,225,000 voxels, over "
             "the limit of 1,500,000,000 " + LIMIT_HINT),
    ReadCase("limit lowered by env", _small_png,
             "small.png: its header asks for 100x100 = 10,000 pixels, over the limit of 5,000 "
             + LIMIT_HINT, env={"MEDCLIPSAM_MAX_PIXELS": "5000"}),
    ReadCase("limit turned off by env", _small_png, None, env={"MEDCLIPSAM_MAX_PIXELS": "none"},
             check=lambda img: img.data.shape == (100, 100) or pytest.fail("shape")),
    ReadCase("limit env not a number", _small_png,
             "MEDCLIPSAM_MAX_PIXELS='lots' is not a pixel count; set it to a number such as "
             "4e9, or to 'none' to turn the size check off.",
             env={"MEDCLIPSAM_MAX_PIXELS": "lots"}),
    ReadCase("nifti with an empty axis", lambda d: nifti(d / "z.nii", np.zeros((0, 10, 10),
                                                                             np.uint8)),
             "z.nii: the image has an empty axis (shape (10, 10, 0))."),
    ReadCase("nifti 4-D several volumes", lambda d: nifti(d / "t.nii.gz",
                                                          np.zeros((8, 8, 4, 3), np.int16)),
             "t.nii.gz: a 4-D NIfTI (8, 8, 4, 3) holding 3 volumes; one 3-D volume per file is "
             "read: extract the one to use (e.g. nibabel: nib.save(img.slicer[..., 0], "
             "'one.nii.gz'), or fslroi IN OUT 0 1)."),
    ReadCase("dicom without pixels", _no_pixels_dicom,
             "nopix.dcm: the DICOM file holds no image (no PixelData)."),
    ReadCase("gray+alpha png is an image", _la_png, None, check=_check_la),
    ReadCase("cmyk jpeg not inverted", _cmyk_jpeg, None, check=_check_cmyk),
    ReadCase("dicom window width 0", _dicom_ww0, None, check=_check_ww0),
]


@pytest.mark.parametrize("case", READ_CASES, ids=[c.id for c in READ_CASES])
def test_reading_bad_images(case: ReadCase, tmp_path, monkeypatch):
    for key, value in (case.env or {}).items():
        monkeypatch.setenv(key, value)
    path = case.build(tmp_path)
    before = snapshot(tmp_path)
    if case.error is None:
        case.check(read_image(path))
    else:
        with pytest.raises(InputError) as info:
            read_image(path)
        message = str(info.value)
        assert "\n" not in message
        if "{detail}" in case.error:
            head = case.error.split("{detail}")[0].format(path=path)
            assert message.startswith(head) and len(message) > len(head) + 3, message
        else:
            assert message == case.error.format(path=path, name=path.name)
    assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------- arrays the chain
# cannot use


ARRAY_CASES = [
    ("2x10000", np.zeros((2, 10000), np.uint8),
     "The image is 2x10000 pixels; segmentation needs at least 8 pixels on each side "
     "(enlarge or pad it)."),
    ("10000x2 rgb", np.zeros((10000, 2, 3), np.uint8),
     "The image is 10000x2 pixels; segmentation needs at least 8 pixels on each side "
     "(enlarge or pad it)."),
    ("10x1000", np.zeros((10, 1000), np.uint16),
     "The image is 10x1000 pixels, an aspect ratio of 100:1; segmentation handles at most "
     "50:1 (crop it, or pad it closer to square)."),
    ("0 rows", np.zeros((0, 30), np.uint8), "The image is empty (0x30 pixels)."),
    ("all NaN", np.full((16, 16), np.nan, np.float32),
     "The image holds no finite values (all NaN or infinite)."),
    ("all inf", np.full((16, 16), np.inf, np.float64),
     "The image holds no finite values (all NaN or infinite)."),
    ("complex", np.zeros((16, 16), np.complex64),
     "Cannot use image data of type complex64; expected numbers."),
    ("volume", np.zeros((5, 16, 16, 2), np.uint8),
     "Expected a 2-D grayscale or RGB(A) image; got shape (5, 16, 16, 2). For a volume, "
     "process it slice by slice."),
]


@pytest.mark.parametrize("array,error", [c[1:] for c in ARRAY_CASES],
                         ids=[c[0] for c in ARRAY_CASES])
def test_arrays_the_chain_cannot_use(array, error):
    with pytest.raises(InputError) as info:
        to_rgb_uint8(array)
    assert str(info.value) == error


@pytest.mark.parametrize("array", [np.zeros((8, 400), np.uint8), np.zeros((16, 16), bool),
                                   np.full((16, 16), 7, np.uint16),
                                   np.where(np.eye(16) > 0, np.nan, 1.0)],
                         ids=["8x400 at 50:1", "all-false bool", "constant uint16",
                              "partly NaN"])
def test_edge_arrays_the_chain_accepts(array):
    out = to_rgb_uint8(array)
    assert out.shape == (*array.shape[:2], 3) and out.dtype == np.uint8


def test_segment_refuses_a_2x10000_image_before_any_model(tiny_pipeline):
    calls = []
    with pytest.raises(InputError, match=r"^The image is 2x10000 pixels; segmentation needs"):
        tiny_pipeline.segment(np.zeros((2, 10000), np.uint8), "a tumour",
                              progress=lambda stage, f: calls.append(stage))
    assert calls == []                                      # nothing ran


def test_segment_a_constant_image_does_not_crash(tiny_pipeline):
    result = tiny_pipeline.segment(np.zeros((32, 40), np.uint8), "a tumour")
    assert result.mask.shape == (32, 40) and result.mask.dtype == bool
    assert isinstance(result.found, bool) and result.message


# --------------------------------------------------------------------------- evaluate cases


@pytest.fixture
def eval_folders(tmp_path):
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir()
    gt.mkdir()
    mask = np.zeros((20, 20), np.uint8)
    mask[5:15, 5:15] = 255
    (gt / "a.png").write_bytes(png_bytes(mask))
    (pred / "a.png").write_bytes(png_bytes(mask))
    return pred, gt


def run_evaluate(args, capsys) -> tuple[int, str]:
    from napari_medclipsam.cli import main

    code = main(["evaluate", *map(str, args)])
    return code, capsys.readouterr().err


EVAL_CASES = [
    # (id, setup(pred, gt, tmp) -> extra args, exact stderr line)
    ("-o onto a ground-truth mask", lambda p, g, t: ["-o", g / "a.png", "--overwrite"],
     "medclipsam evaluate: error: {gt}/a.png: a scores file named like a mask would be read "
     "as one; give a .csv file name."),
    ("-o onto a prediction (upper-case suffix)", lambda p, g, t: ["-o", p / "A.PNG"],
     "medclipsam evaluate: error: {pred}/A.PNG: a scores file named like a mask would be read "
     "as one; give a .csv file name."),
    ("-o a hard link to the ground truth", lambda p, g, t: (
        os.link(g / "a.png", t / "gt_link.csv"), ["-o", t / "gt_link.csv", "--overwrite"])[1],
     "medclipsam evaluate: error: {tmp}/gt_link.csv is one of the masks being evaluated; it "
     "is never overwritten. Choose another output file."),
    ("-o existing csv without --overwrite", lambda p, g, t: (
        (t / "scores.csv").write_text("mine\n"), ["-o", t / "scores.csv"])[1],
     "medclipsam evaluate: error: {tmp}/scores.csv already exists; pass --overwrite to replace "
     "it, or choose another file with -o."),
    ("-o whose json twin exists", lambda p, g, t: (
        (t / "s.json").write_text("{}"), ["-o", t / "s.csv"])[1],
     "medclipsam evaluate: error: {tmp}/s.json already exists; pass --overwrite to replace "
     "it, or choose another file with -o."),
    ("-o under a file, refused before scoring", lambda p, g, t: (
        (t / "notes").write_text("mine\n"), ["-o", t / "notes" / "scores.csv"])[1],
     "medclipsam evaluate: error: -o {tmp}/notes: exists and is not a folder; choose a "
     "folder."),
    ("-o is a folder", lambda p, g, t: ((t / "out.csv").mkdir(), ["-o", t / "out.csv"])[1],
     "medclipsam evaluate: error: {tmp}/out.csv is a folder; give a file name such as "
     "scores.csv."),
    ("default output exists", lambda p, g, t: ((p / "evaluation.csv").write_text("old\n"),
                                               [])[1],
     "medclipsam evaluate: error: {pred}/evaluation.csv already exists; pass --overwrite to "
     "replace it, or choose another file with -o."),
    ("truncated ground truth", lambda p, g, t: (
        (g / "a.png").write_bytes((g / "a.png").read_bytes()[:60]), [])[1],
     "medclipsam evaluate: error: a: Could not decode a.png: the file is truncated or damaged"),
    ("text file as a prediction", lambda p, g, t: ((p / "a.png").write_text("no\n"), [])[1],
     "medclipsam evaluate: error: a: a.png: not a PNG image (a text file)."),
    ("bomb as a ground truth", lambda p, g, t: (
        (g / "a.png").write_bytes(png_bomb(50000, 50000)), [])[1],
     "medclipsam evaluate: error: a: a.png: its header asks for 50000x50000 = 2,500,000,000 "
     "pixels, over the limit of 178,956,970 " + LIMIT_HINT),
    ("2-D prediction for a 3-D ground truth", lambda p, g, t: (
        (g / "a.png").unlink(), nifti(g / "a.nii.gz", np.ones((20, 20, 4), np.uint8)), [])[2],
     "medclipsam evaluate: error: a: the prediction is 2-D (20, 20) but the ground truth is "
     "3-D (4, 20, 20)."),
]


@pytest.mark.parametrize("setup,expected", [c[1:] for c in EVAL_CASES],
                         ids=[c[0] for c in EVAL_CASES])
def test_evaluate_bad_inputs(setup, expected, eval_folders, tmp_path, capsys):
    pred, gt = eval_folders
    extra = setup(pred, gt, tmp_path)
    before = snapshot(tmp_path)
    code, err = run_evaluate(["--pred", pred, "--gt", gt, *extra], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    text = expected.format(gt=gt, pred=pred, tmp=tmp_path)
    assert lines[0] == text or (lines[0].startswith(text) and "truncated" in text), lines[0]
    assert snapshot(tmp_path) == before                    # nothing changed, nothing added


def test_evaluate_overwrite_replaces_only_our_output(eval_folders, tmp_path, capsys):
    pred, gt = eval_folders
    (tmp_path / "scores.csv").write_text("old\n")
    inputs = {**snapshot(pred), **{f"gt/{k}": v for k, v in snapshot(gt).items()}}
    code, _ = run_evaluate(["--pred", pred, "--gt", gt, "-o", tmp_path / "scores.csv",
                            "--overwrite"], capsys)
    assert code == 0
    assert (tmp_path / "scores.csv").read_text().startswith("name,dsc,nsd,status")
    assert {**snapshot(pred), **{f"gt/{k}": v for k, v in snapshot(gt).items()}} == inputs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gt", "pred", "scores.csv",
                                                          "scores.json"]
