"""Folder evaluation (core.evaluate): pairing by name, scores worked out by hand, outputs."""

from __future__ import annotations

import json

import imageio.v3 as iio
import numpy as np
import pytest

from napari_medclipsam.core.errors import InputError
from napari_medclipsam.core.evaluate import (
    EvaluationResult,
    ImageScore,
    evaluate_folders,
    list_masks,
    score_masks,
    write_evaluation,
)


def square(shape, rows, cols) -> np.ndarray:
    mask = np.zeros(shape, dtype=np.uint8)
    mask[rows[0] : rows[1], cols[0] : cols[1]] = 255
    return mask


# A 10x10 square and the same square one row lower, in 20x20 images: 90 of 100 pixels shared,
# DSC = 2*90/200 = 0.9. Each border has 36 pixels; every border pixel is within 1 pixel of the
# other border, and 18 of each lie exactly on the other border (the two side columns of rows
# 7..14 and the two corners of row 6 for the prediction; symmetric for the ground truth).
GT = square((20, 20), (5, 15), (5, 15))
SHIFTED = square((20, 20), (6, 16), (5, 15))


def test_score_masks_by_hand():
    assert score_masks(SHIFTED, GT) == pytest.approx((0.9, 1.0))
    assert score_masks(SHIFTED, GT, tolerance=0)[1] == pytest.approx(36 / 72)
    # one row = 2 units at spacing 2: within a tolerance of 2, beyond one of 1.5
    assert score_masks(SHIFTED, GT, tolerance=2, spacing=2)[1] == pytest.approx(1.0)
    assert score_masks(SHIFTED, GT, tolerance=1.5, spacing=2)[1] == pytest.approx(0.5)
    assert score_masks(SHIFTED, GT, tolerance=1.5, spacing=1)[1] == pytest.approx(1.0)


def test_score_masks_colour_and_size():
    colour = np.zeros((20, 20, 3), np.uint8)
    colour[5:15, 5:15, 1] = 255  # foreground in one channel only
    assert score_masks(colour, GT) == (1.0, 1.0)
    even = square((20, 20), (4, 14), (6, 16))
    half = even[::2, ::2]  # nearest upsampling restores the square exactly
    assert half.shape == (10, 10) and score_masks(half, even) == (1.0, 1.0)
    with pytest.raises(InputError, match="3-D"):
        score_masks(np.zeros((2, 20, 20)), GT)


@pytest.fixture
def folders(tmp_path):
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir()
    gt.mkdir()
    iio.imwrite(gt / "b_shift.png", GT)
    iio.imwrite(pred / "b_shift.png", SHIFTED)
    iio.imwrite(gt / "a_half.png", square((20, 20), (0, 10), (0, 20)))  # 200 px
    iio.imwrite(pred / "a_half.png", square((20, 20), (0, 5), (0, 20)))  # 100 px: DSC 2/3
    iio.imwrite(gt / "c_missing.png", GT)  # no prediction: DSC 0, NSD 0
    iio.imwrite(gt / "d_empty.png", np.zeros((20, 20), np.uint8))  # no prediction, empty: 1, 1
    iio.imwrite(pred / "e_extra.png", GT)  # no ground truth: ignored
    (pred / "notes.txt").write_text("not a mask")
    iio.imwrite(pred / ".hidden.png", GT)
    return pred, gt


def test_evaluate_folders_pairs_by_name_and_scores(folders):
    pred, gt = folders
    result = evaluate_folders(pred, gt)
    assert [r.name for r in result.rows] == ["a_half", "b_shift", "c_missing", "d_empty"]
    scores = {r.name: r for r in result.rows}
    assert scores["a_half"].dsc == pytest.approx(2 / 3)
    # Borders: P (rows 0..4) = rows 0, 4 + columns 0, 19 of rows 1..3 = 46 pixels; G (rows
    # 0..9) = rows 0, 9 + columns 0, 19 of rows 1..8 = 56. Within 2 pixels of G's border: all
    # of P's except row 4, columns 3..16 (4 rows from row 0, 5 from row 9, >= 3 from the side
    # columns): 46 - 14 = 32. Within 2 of P's border: G's row 0 (20) and its side columns in
    # rows 1..6 (12); rows 7, 8 and row 9 are >= 3 away: 32. NSD = 64 / 102.
    assert scores["a_half"].nsd == pytest.approx((32 + 32) / (46 + 56))
    assert (scores["b_shift"].dsc, scores["b_shift"].nsd) == pytest.approx((0.9, 1.0))
    assert (scores["c_missing"].dsc, scores["c_missing"].nsd) == (0.0, 0.0)
    assert (scores["d_empty"].dsc, scores["d_empty"].nsd) == (1.0, 1.0)
    assert scores["c_missing"].status == scores["d_empty"].status != "ok"
    assert scores["a_half"].status == "ok"
    assert result.missing == ["c_missing", "d_empty"]
    assert result.ignored == ["e_extra"]
    assert result.mean_dsc == pytest.approx((2 / 3 + 0.9 + 0 + 1) / 4)
    assert result.mean_nsd == pytest.approx((64 / 102 + 1 + 0 + 1) / 4)


def test_evaluate_folders_tolerance_and_spacing_reach_nsd(folders):
    pred, gt = folders
    result = evaluate_folders(pred, gt, tolerance=1.5, spacing=2.0)
    assert {r.name: r.nsd for r in result.rows}["b_shift"] == pytest.approx(0.5)
    assert (result.tolerance, result.spacing) == (1.5, 2.0)
    assert {r.unit for r in result.rows} == {"given"}
    assert result.rows[0].spacing == (2.0, 2.0)
    assert result.describe_nsd() == "NSD tolerance 1.5 in the units of the given spacing (2)"


def test_write_evaluation_csv_and_json(folders, tmp_path):
    pred, gt = folders
    result = evaluate_folders(pred, gt)
    csv, js = write_evaluation(result, tmp_path / "out" / "scores.csv")
    assert js == tmp_path / "out" / "scores.json"
    lines = csv.read_text().splitlines()
    assert lines[0] == "name,dsc,nsd,status,spacing,note"
    assert lines[1] == "a_half,0.666667,0.627451,ok,pixels,"
    assert lines[2] == "b_shift,0.900000,1.000000,ok,pixels,"
    assert lines[3] == "c_missing,0.000000,0.000000,missing prediction (scored as empty),pixels,"
    assert lines[-1] == (f"mean,{result.mean_dsc:.6f},{result.mean_nsd:.6f},4 images,"
                         "NSD tolerance 2 px (no spacing in the PNG files),")
    data = json.loads(js.read_text())
    assert list(data) == ["mean_dsc", "mean_nsd", "tolerance", "spacing", "nsd", "images",
                          "missing", "ignored", "notes"]
    assert data["images"][1] == {"name": "b_shift", "dsc": 0.9, "nsd": 1.0, "status": "ok",
                                 "spacing": None, "unit": "px", "note": ""}
    assert data["nsd"] == "NSD tolerance 2 px (no spacing in the PNG files)"
    assert data["missing"] == ["c_missing", "d_empty"] and data["ignored"] == ["e_extra"]
    assert data["mean_dsc"] == pytest.approx(result.mean_dsc)


def test_result_to_csv_is_plain_dataclass_maths():
    result = EvaluationResult(rows=[ImageScore("x", 0.5, 0.25)], mean_dsc=0.5, mean_nsd=0.25)
    assert result.to_csv() == (
        "name,dsc,nsd,status,spacing,note\nx,0.500000,0.250000,ok,pixels,\n"
        "mean,0.500000,0.250000,1 images,NSD tolerance 2 px (no spacing in the files),\n")


def test_list_masks_keys_by_name_without_suffix(folders):
    pred, _ = folders
    assert sorted(list_masks(pred)) == ["a_half", "b_shift", "e_extra"]


def test_evaluate_folders_refuses_bad_input(folders, tmp_path):
    pred, gt = folders
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="not a folder"):
        evaluate_folders(tmp_path / "nope", gt)
    with pytest.raises(InputError, match="no mask files"):
        evaluate_folders(pred, empty)
    with pytest.raises(InputError, match="No file names in common"):
        evaluate_folders(empty, gt)
    with pytest.raises(InputError, match="tolerance"):
        evaluate_folders(pred, gt, tolerance=-1)
    with pytest.raises(InputError, match="spacing"):
        evaluate_folders(pred, gt, spacing=0)


# --------------------------------------------------------------------------- spacing from files


def write_nifti_mask(path, zyx: np.ndarray, zooms_xyz=(1.5, 1.5, 1.5)):
    import nibabel as nib

    img = nib.Nifti1Image(zyx.transpose(2, 1, 0).astype(np.uint8), np.diag([*zooms_xyz, 1.0]))
    nib.save(img, str(path))
    return path


def cube(shape=(12, 16, 16), z=(3, 9), y=(4, 12), x=(4, 12)) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    mask[z[0]:z[1], y[0]:y[1], x[0]:x[1]] = 1
    return mask


@pytest.fixture
def nifti_folders(tmp_path):
    """A cube and the same cube 2 slices lower, spacing 1.5 mm: 2 voxels = 3 mm > 2 mm."""
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir()
    gt.mkdir()
    write_nifti_mask(gt / "case.nii.gz", cube())
    write_nifti_mask(pred / "case.nii.gz", cube(z=(5, 11)))
    return pred, gt


def test_evaluate_nifti_uses_the_headers_spacing_in_mm(nifti_folders):
    from napari_medclipsam.core.metrics import nsd

    pred, gt = nifti_folders
    result = evaluate_folders(pred, gt)
    row = result.rows[0]
    at_mm = nsd(cube(z=(5, 11)), cube(), tolerance=2.0, spacing=1.5)
    in_pixels = nsd(cube(z=(5, 11)), cube(), tolerance=2.0, spacing=1.0)
    assert in_pixels == pytest.approx(1.0) and at_mm < 0.9     # the answers differ
    assert row.nsd == pytest.approx(at_mm)
    assert (row.spacing, row.unit, row.note) == ((1.5, 1.5, 1.5), "mm", "")
    assert result.describe_nsd() == ("NSD tolerance 2 mm at spacing (1.5, 1.5, 1.5) mm from "
                                     "the files' headers")
    # a given spacing replaces the headers'
    given = evaluate_folders(pred, gt, spacing=1.0)
    assert given.rows[0].nsd == pytest.approx(in_pixels)
    assert given.rows[0].unit == "given"


def test_evaluate_nifti_anisotropic_spacing_in_array_order(tmp_path):
    from napari_medclipsam.core.metrics import nsd

    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir()
    gt.mkdir()
    zooms = (0.5, 0.5, 3.0)                       # x, y, z in the header
    write_nifti_mask(gt / "c.nii.gz", cube(), zooms)
    write_nifti_mask(pred / "c.nii.gz", cube(x=(6, 14)), zooms)
    row = evaluate_folders(pred, gt).rows[0]
    assert row.spacing == (3.0, 0.5, 0.5)
    assert row.nsd == pytest.approx(nsd(cube(x=(6, 14)), cube(), 2.0, (3.0, 0.5, 0.5)))
    assert row.nsd == pytest.approx(1.0)          # 2 voxels * 0.5 mm = 1 mm <= 2 mm


def test_evaluate_disagreeing_spacings_use_the_ground_truths_and_say_so(tmp_path):
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir()
    gt.mkdir()
    write_nifti_mask(gt / "case.nii.gz", cube())
    write_nifti_mask(pred / "case.nii.gz", cube(z=(5, 11)), (1.0, 1.0, 1.0))
    result = evaluate_folders(pred, gt)
    row = result.rows[0]
    assert row.spacing == (1.5, 1.5, 1.5)
    assert row.note == ("prediction spacing (1, 1, 1) mm differs from the ground truth's "
                        "(1.5, 1.5, 1.5) mm; the ground truth's was used")
    assert result.notes == [f"case: {row.note}"]
    assert result.to_dict()["images"][0]["note"] == row.note


def test_evaluate_mixed_folder_says_which_cases_are_in_pixels(tmp_path):
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir()
    gt.mkdir()
    write_nifti_mask(gt / "vol.nii.gz", cube())
    write_nifti_mask(pred / "vol.nii.gz", cube())
    iio.imwrite(gt / "img.png", GT)
    iio.imwrite(pred / "img.png", SHIFTED)
    result = evaluate_folders(pred, gt)
    units = {r.name: r.unit for r in result.rows}
    assert units == {"img": "px", "vol": "mm"}
    assert result.describe_nsd() == ("NSD tolerance 2 mm at spacing (1.5, 1.5, 1.5) mm from "
                                     "the files' headers; 2 px for the 1 case(s) without "
                                     "spacing")


def test_evaluate_cli_prints_the_spacing_used(nifti_folders, capsys):
    from napari_medclipsam.cli import main

    pred, gt = nifti_folders
    assert main(["evaluate", "--pred", str(pred), "--gt", str(gt)]) == 0
    out = capsys.readouterr().out
    assert "NSD tolerance 2 mm at spacing (1.5, 1.5, 1.5) mm from the files' headers" in out
    data = json.loads((pred / "evaluation.json").read_text())
    assert data["images"][0]["spacing"] == [1.5, 1.5, 1.5]
    assert main(["evaluate", "--pred", str(pred), "--gt", str(gt), "--spacing", "1",
                 "--overwrite"]) == 0
    assert "NSD tolerance 2 in the units of the given spacing (1)" in capsys.readouterr().out
    assert json.loads((pred / "evaluation.json").read_text())["images"][0]["nsd"] == 1.0


def test_colour_and_rgba_masks_are_foreground_where_a_colour_is(tmp_path):
    from napari_medclipsam.core.evaluate import read_mask

    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[..., 3] = 255                          # opaque everywhere
    rgba[5:15, 5:15, 0] = 200                   # red square
    iio.imwrite(tmp_path / "m.png", rgba)
    assert np.array_equal(read_mask(tmp_path / "m.png"), GT > 0)
    alpha_only = np.zeros((20, 20, 4), np.uint8)
    alpha_only[5:15, 5:15, 3] = 255             # black, opaque square on transparency
    iio.imwrite(tmp_path / "a.png", alpha_only)
    assert np.array_equal(read_mask(tmp_path / "a.png"), GT > 0)


def test_write_evaluation_refuses_existing_and_inputs(folders, tmp_path):
    from napari_medclipsam.core.evaluate import OutputExistsError

    pred, gt = folders
    result = evaluate_folders(pred, gt)
    out = tmp_path / "s.csv"
    write_evaluation(result, out)
    before = out.read_bytes()
    with pytest.raises(OutputExistsError, match="s.csv already exists"):
        write_evaluation(result, out)
    assert out.read_bytes() == before
    write_evaluation(result, out, overwrite=True)
    gt_file = gt / "b_shift.png"
    gt_bytes = gt_file.read_bytes()
    with pytest.raises(InputError, match="named like a mask would be read as one"):
        write_evaluation(result, gt_file, overwrite=True)
    # a CSV name that is the same file as a mask (a hard link): refused even with overwrite
    import os

    os.link(gt_file, tmp_path / "linked.csv")
    with pytest.raises(InputError, match="linked.csv is one of the masks being evaluated"):
        write_evaluation(result, tmp_path / "linked.csv", overwrite=True)
    assert gt_file.read_bytes() == gt_bytes
