"""The per-case review record (accepted / corrected, seconds, edits, Dice automatic vs final)
kept in medclipsam_cases.json, the dataset update it comes with, and the workload summary."""

import json

import imageio.v3 as iio
import numpy as np
import pytest

from napari_medclipsam.core.errors import InputError
from napari_medclipsam.nnunet.export import (
    CASES_FILE,
    cases_from_arrays,
    export_dataset,
    read_case_list,
)
from napari_medclipsam.nnunet.review import (
    ReviewRecord,
    dice_auto_final,
    read_reviews,
    record_review,
    review_case,
    review_summary,
)


def square_case(seed, size=24):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 100, (size, size)).astype(np.uint8)
    mask = np.zeros((size, size), np.uint8)
    mask[6:16, 6:16] = 1          # 100 pixels
    img[mask > 0] += 120
    return img, mask


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.fixture
def zero_shot_dataset(tmp_path):
    """Dataset 31 with two raw zero-shot pseudo-labels, 'a' and 'b'."""
    cases = []
    for i, name in enumerate("ab"):
        img, mask = square_case(i)
        cases += cases_from_arrays(img, mask, name, corrected=False)
    export_dataset(cases, tmp_path, 31, "Rev", label_name="square", verify=False)
    return tmp_path, tmp_path / "Dataset031_Rev"


def test_two_reviews_are_recorded_read_back_and_summarised(zero_shot_dataset):
    raw, ds = zero_shot_dataset
    # 'a': the automatic mask accepted as it is (status derived from the masks)
    img, auto = square_case(0)
    rec_a = review_case(cases_from_arrays(img, auto, "a")[0], auto, raw, 31, "Rev",
                        seconds=12.5, edits=0, verify=False)
    assert rec_a.status == "accepted" and rec_a.dice_auto_final == 1.0 and rec_a.count == 1
    # 'c': a new image whose automatic mask missed 40 of the 100 pixels; the person fixed it
    img_c, final = square_case(2)
    auto_c = final.copy()
    auto_c[6:10, 6:16] = 0                          # 60 pixels left
    rec_c = review_case(cases_from_arrays(img_c, final, "c")[0], auto_c, raw, 31, "Rev",
                        seconds=47.5, edits=3, status="corrected", verify=False)
    assert rec_c.dice_auto_final == pytest.approx(2 * 60 / (60 + 100))   # 0.75
    # read back from medclipsam_cases.json, beside each case's entry
    cases = json.loads((ds / CASES_FILE).read_text())
    assert cases["a"]["review"]["status"] == "accepted"
    assert cases["a"]["corrected"] is True                 # human-verified now
    assert cases["a"]["relabelled_from"] == "zero-shot"
    assert cases["b"]["corrected"] is False and "review" not in cases["b"]
    assert cases["c"]["corrected"] is True and cases["c"]["review"]["edits"] == 3
    assert read_reviews(ds) == {"a": rec_a, "c": rec_c}
    assert json.loads((ds / "dataset.json").read_text())["numTraining"] == 3
    np.testing.assert_array_equal(iio.imread(ds / "labelsTr/c.png"), final)
    s = review_summary(ds)
    assert (s.n_cases, s.n_reviewed, s.n_accepted, s.n_corrected) == (3, 2, 1, 1)
    assert s.share_accepted == 0.5
    assert s.mean_seconds == pytest.approx(30.0) and s.total_seconds == pytest.approx(60.0)
    assert s.mean_edits == pytest.approx(1.5)
    assert s.mean_dice_auto_final == pytest.approx((1.0 + 0.75) / 2)
    assert s.format() == ("2 of 3 cases reviewed: 50% accepted unmodified, 30.0 s and 1.5 "
                          "edits per case (1.0 min in all), Dice automatic vs final 0.875.")


def test_a_re_review_updates_the_case_and_never_duplicates_it(zero_shot_dataset):
    raw, ds = zero_shot_dataset
    img, auto = square_case(1)
    first = auto.copy()
    first[6:16, 6:11] = 0                            # the person removed half: 50 pixels
    review_case(cases_from_arrays(img, first, "b")[0], auto, raw, 31, "Rev", seconds=20,
                edits=2, verify=False)
    second = auto.copy()
    second[6:8, :] = 0                               # ... and later kept 80 of them instead
    rec = review_case(cases_from_arrays(img, second, "b")[0], auto, raw, 31, "Rev",
                      seconds=5, edits=1, verify=False)
    assert rec == ReviewRecord("corrected", 25.0, 3, pytest.approx(2 * 80 / 180),
                               rec.reviewed_at, count=2)   # effort adds up, outcome latest
    cases = read_case_list(ds)
    assert list(cases) == ["a", "b"] and cases["b"]["review"] == rec.to_json()
    assert sorted(p.name for p in (ds / "labelsTr").iterdir()) == ["a.png", "b.png"]
    np.testing.assert_array_equal(iio.imread(ds / "labelsTr/b.png"), second)
    assert json.loads((ds / "dataset.json").read_text())["numTraining"] == 2
    s = review_summary(ds)
    assert (s.n_reviewed, s.mean_seconds, s.mean_edits) == (1, 25.0, 3.0)
    # record_review alone (the label written elsewhere) updates the same record
    rec = record_review(ds, "b", status="accepted", seconds=2, edits=0, dice_auto_final=1.0)
    assert (rec.count, rec.seconds, rec.status) == (3, 27.0, "accepted")
    assert read_reviews(ds)["b"] == rec


def test_several_labels_mean_the_dice_over_present_labels(tmp_path):
    table = {"liver": 1, "spleen": 2, "lesion": 4}
    img = np.zeros((20, 20), np.uint8)
    final = np.zeros((20, 20), np.uint8)
    final[2:12, 2:12] = 1                          # liver 100
    final[14:18, 2:12] = 2                         # spleen 40
    export_dataset(cases_from_arrays(img + 50, final, "old", label_table=table), tmp_path,
                   32, "Multi", verify=False)
    auto = final.copy()
    auto[14:18, 2:7] = 1                           # 20 spleen pixels called liver
    # the label table comes from the dataset; 'lesion' is in neither mask: not counted
    rec = review_case(cases_from_arrays(img + 60, final, "new")[0], auto, tmp_path, 32,
                      "Multi", seconds=8, edits=1, verify=False)
    liver = 2 * 100 / (120 + 100)
    spleen = 2 * 20 / (20 + 40)
    assert rec.dice_auto_final == pytest.approx((liver + spleen) / 2)
    assert dice_auto_final(auto, final, [1, 2, 4]) == pytest.approx((liver + spleen) / 2)
    assert dice_auto_final(auto, final) == 1.0     # binary would not see the class swap
    ds = tmp_path / "Dataset032_Multi"
    np.testing.assert_array_equal(iio.imread(ds / "labelsTr/new.png"), final)
    # a wrong class is a correction even where the foreground is the same
    with pytest.raises(InputError, match="record it as 'corrected'"):
        review_case(cases_from_arrays(img + 60, final, "new2")[0], auto, tmp_path, 32,
                    "Multi", seconds=1, edits=0, status="accepted", verify=False)


def test_a_reviewed_label_replaces_a_zero_shot_one_and_passes_nnunets_check(
        zero_shot_dataset):
    raw, ds = zero_shot_dataset
    img, auto = square_case(0)
    final = auto.copy()
    final[16:20, 6:16] = 1
    review_case(cases_from_arrays(img, final, "a")[0], auto, raw, 31, "Rev", seconds=3,
                edits=1, verify=True)
    np.testing.assert_array_equal(iio.imread(ds / "labelsTr/a.png"), final)
    assert not [p for p in ds.rglob(".*")]          # no temporary file left
    # when nnU-Net's check fails after the change, the old label and record come back
    iio.imwrite(ds / "labelsTr/b.png", np.zeros((5, 5), np.uint8))   # someone broke 'b'
    before = snapshot(ds)
    with pytest.raises(InputError, match="dataset check failed"):
        review_case(cases_from_arrays(img, auto, "a")[0], auto, raw, 31, "Rev", seconds=3,
                    edits=1, verify=True)
    assert snapshot(ds) == before


def test_bad_reviews_are_refused_and_change_nothing(zero_shot_dataset):
    raw, ds = zero_shot_dataset
    before = snapshot(ds)
    img, auto = square_case(0)
    case = cases_from_arrays(img, auto, "a")[0]
    at = (raw, 31, "Rev")
    kw = {"seconds": 1, "edits": 0, "verify": False}
    with pytest.raises(InputError, match="record it as 'accepted'"):
        review_case(case, auto, *at, **kw, status="corrected")
    with pytest.raises(InputError, match="'accepted' or 'corrected'"):
        review_case(case, auto, *at, **kw, status="skipped")
    with pytest.raises(InputError, match="seconds"):
        review_case(case, auto, *at, **{**kw, "seconds": -1})
    with pytest.raises(InputError, match="edits"):
        review_case(case, auto, *at, **{**kw, "edits": 1.5})
    with pytest.raises(InputError, match="differ in shape"):
        review_case(case, auto[:10], *at, **kw)
    small = cases_from_arrays(img[:10, :10], auto[:10, :10], "a")[0]   # not the case's shape
    with pytest.raises(InputError, match="the case"):
        review_case(small, auto[:10, :10], *at, **kw)
    with pytest.raises(InputError, match="differs"):                   # another table
        review_case(case, auto, *at, **kw, label_table={"disk": 1})
    with pytest.raises(InputError, match="no case 'zz'"):
        record_review(ds, "zz", status="accepted", seconds=1, edits=0)
    assert snapshot(ds) == before
    assert review_summary(ds).format() == "0 of 2 cases reviewed."
