"""Export of pseudo-labels as a raw nnU-Net v2 dataset: round trips read back with nnU-Net's own
readers, nnU-Net's integrity check, refusal to overwrite, atomicity."""

import json

import imageio.v3 as iio
import numpy as np
import pytest

from napari_medclipsam.core.errors import InputError
from napari_medclipsam.nnunet.export import (
    CASES_FILE,
    ExportCase,
    _verify,
    cases_from_arrays,
    cases_from_folders,
    export_dataset,
    pair_images_and_masks,
    read_case_list,
)


def disk_image(seed, size=48, dtype=np.uint8):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.integers(size // 3, 2 * size // 3, 2)
    mask = (yy - cy) ** 2 + (xx - cx) ** 2 < (size // 6) ** 2
    img = (rng.normal(60, 15, (size, size)) + 120 * mask).clip(0, 255).astype(dtype)
    return img, mask.astype(np.uint8)


def left_in(folder):
    """What is in ``folder`` besides the datasets' (empty, hidden) lock files."""
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".medclipsam.lock"))


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_2d_round_trip_passes_nnunets_check(tmp_path):
    from nnunetv2.imageio.natural_image_reader_writer import NaturalImage2DIO

    cases = []
    for i in range(3):
        img, mask = disk_image(i)
        cases += cases_from_arrays(img, mask * 2, f"us {i}", corrected=i == 0)  # label 2 -> 1
    res = export_dataset(cases, tmp_path, 12, "Breast", label_name="tumor")
    ds = tmp_path / "Dataset012_Breast"
    assert res.folder == ds and res.file_ending == ".png"
    assert res.cases == ["us_0", "us_1", "us_2"]
    meta = json.loads((ds / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "tumor": 1}
    assert meta["numTraining"] == 3 and meta["channel_names"] == {"0": "image"}
    rw = NaturalImage2DIO()
    for i, case in enumerate(res.cases):
        img, mask = disk_image(i)
        data, props = rw.read_images([str(ds / "imagesTr" / f"{case}_0000.png")])
        seg, _ = rw.read_seg(str(ds / "labelsTr" / f"{case}.png"))
        np.testing.assert_array_equal(data[0, 0], img)
        np.testing.assert_array_equal(seg[0, 0], mask)         # binary 0/1
    record = read_case_list(ds)
    assert [record[c]["corrected"] for c in res.cases] == [True, False, False]
    assert (res.n_corrected, res.n_zero_shot) == (1, 2)
    assert left_in(tmp_path) == ["Dataset012_Breast"]   # no staging left


def test_3d_volume_round_trip_keeps_spacing_and_passes_check(tmp_path):
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    rng = np.random.default_rng(0)
    vol = rng.normal(0, 100, (6, 20, 24)).astype(np.int16)   # CT-like, signed
    lab = np.zeros(vol.shape, np.uint8)
    lab[2:4, 5:12, 6:15] = 1
    cases = cases_from_arrays(vol, lab, "ct01", spacing=(3.0, 0.8, 0.7),
                              origin=(10.0, -5.0, 2.5))
    res = export_dataset(cases, tmp_path, 5, "Lung", channel_name="CT")
    ds = tmp_path / "Dataset005_Lung"
    assert res.file_ending == ".nii.gz"
    assert json.loads((ds / "dataset.json").read_text())["channel_names"] == {"0": "CT"}
    data, props = SimpleITKIO().read_images([str(ds / "imagesTr" / "ct01_0000.nii.gz")])
    np.testing.assert_array_equal(data[0], vol)
    np.testing.assert_allclose(props["spacing"], (3.0, 0.8, 0.7))          # (Z, Y, X)
    np.testing.assert_allclose(props["sitk_stuff"]["origin"], (2.5, -5.0, 10.0))  # (X, Y, Z)
    seg, _ = SimpleITKIO().read_seg(str(ds / "labelsTr" / "ct01.nii.gz"))
    np.testing.assert_array_equal(seg[0], lab)


def test_stack_as_2d_slices_exports_labelled_slices_only(tmp_path):
    vol = np.stack([disk_image(i)[0] for i in range(5)])
    lab = np.zeros(vol.shape, np.uint8)
    lab[1] = disk_image(1)[1]
    lab[3] = disk_image(3)[1]
    cases = cases_from_arrays(vol, lab, "stack", spacing=(2.0, 1.0, 1.0), as_slices=True)
    assert [c.case_id for c in cases] == ["stack_z001", "stack_z003"]
    assert len(cases_from_arrays(vol, lab, "stack", as_slices=True, slices="all")) == 5
    res = export_dataset(cases, tmp_path, 3, "Stack", verify=False)
    assert res.file_ending == ".png" and len(res.cases) == 2
    with pytest.raises(InputError, match="No slice"):
        cases_from_arrays(vol, np.zeros_like(lab), "stack", as_slices=True)


def test_rgb_with_equal_channels_becomes_grayscale_and_colour_stays_rgb(tmp_path):
    img, mask = disk_image(0)
    gray_rgb = np.repeat(img[..., None], 3, axis=2)
    export_dataset(cases_from_arrays(gray_rgb, mask, "g"), tmp_path, 1, "Gray", verify=False)
    assert iio.imread(tmp_path / "Dataset001_Gray/imagesTr/g_0000.png").ndim == 2
    colour = gray_rgb.copy()
    colour[..., 0] //= 2
    export_dataset(cases_from_arrays(colour, mask, "c"), tmp_path, 2, "Colour", verify=False)
    meta = json.loads((tmp_path / "Dataset002_Colour/dataset.json").read_text())
    assert meta["channel_names"] == {"0": "R", "1": "G", "2": "B"}


def test_a_colour_image_in_a_grayscale_dataset_is_converted_and_recorded(tmp_path):
    # an ultrasound frame with coloured overlays among grayscale frames (as in BUSI)
    img, mask = disk_image(0)
    overlay = np.repeat(disk_image(1)[0][..., None], 3, axis=2)
    overlay[5:10, 5:40] = (255, 255, 0)
    cases = [*cases_from_arrays(img, mask, "gray"), *cases_from_arrays(overlay, mask, "over")]
    res = export_dataset(cases, tmp_path, 6, "US", verify=False)
    assert res.converted == ["over"]
    out = iio.imread(tmp_path / "Dataset006_US/imagesTr/over_0000.png")
    assert out.shape == img.shape and out.dtype == np.uint8
    assert out[7, 20] == round(0.299 * 255 + 0.587 * 255)          # luminance of yellow
    np.testing.assert_array_equal(out[20:, :], disk_image(1)[0][20:, :])   # gray part intact
    assert read_case_list(tmp_path / "Dataset006_US")["over"]["converted"] == "colour->gray"


def test_existing_dataset_is_never_overwritten_and_append_adds(tmp_path):
    img, mask = disk_image(0)
    export_dataset(cases_from_arrays(img, mask, "a"), tmp_path, 7, "X", verify=False)
    ds = tmp_path / "Dataset007_X"
    before = snapshot(ds)
    with pytest.raises(InputError, match="exists already"):
        export_dataset(cases_from_arrays(img, mask, "b"), tmp_path, 7, "X", verify=False)
    with pytest.raises(InputError, match="exists already"):   # same ID, other name
        export_dataset(cases_from_arrays(img, mask, "b"), tmp_path, 7, "Y", verify=False)
    with pytest.raises(InputError, match="never overwritten"):  # same case on append
        export_dataset(cases_from_arrays(img, 1 - mask, "a"), tmp_path, 7, "X", append=True,
                       verify=False)
    assert snapshot(ds) == before
    img2, mask2 = disk_image(1)
    res = export_dataset(cases_from_arrays(img2, mask2, "b", corrected=False), tmp_path, 7,
                         "X", append=True)
    assert res.appended and res.cases == ["b"]
    meta = json.loads((ds / "dataset.json").read_text())
    assert meta["numTraining"] == 2
    assert set(json.loads((ds / CASES_FILE).read_text())) == {"a", "b"}
    assert (ds / "labelsTr/a.png").read_bytes() == before[ds.relative_to(ds) / "labelsTr/a.png"]


def test_interrupted_export_leaves_nothing(tmp_path):
    def cases():
        for i in range(3):
            img, mask = disk_image(i)
            yield ExportCase(f"c{i}", img, mask)
        raise KeyboardInterrupt   # the user stops it half way

    with pytest.raises(KeyboardInterrupt):
        export_dataset(cases(), tmp_path, 9, "Half", verify=False)
    assert left_in(tmp_path) == []


def test_bad_inputs_are_refused_with_a_reason(tmp_path):
    img, mask = disk_image(0)
    with pytest.raises(InputError, match="do not match"):
        cases_from_arrays(img, mask[:10], "x")
    with pytest.raises(InputError, match="empty"):
        export_dataset(cases_from_arrays(img, 0 * mask, "x"), tmp_path, 4, "E", verify=False)
    with pytest.raises(InputError, match="dataset ID"):
        export_dataset(cases_from_arrays(img, mask, "x"), tmp_path, 1000, "E", verify=False)
    # a float slice cannot join a PNG dataset
    mixed = [ExportCase("u8", img, mask), ExportCase("f32", img.astype(np.float32), mask)]
    with pytest.raises(InputError, match="PNG"):
        export_dataset(mixed, tmp_path, 4, "Mixed", verify=False)
    assert left_in(tmp_path) == []


def test_nnunet_check_catches_a_broken_dataset(tmp_path):
    img, mask = disk_image(0)
    export_dataset(cases_from_arrays(img, mask, "a"), tmp_path, 8, "Broken", verify=False)
    ds = tmp_path / "Dataset008_Broken"
    iio.imwrite(ds / "labelsTr/a.png", np.zeros((10, 10), np.uint8))   # wrong shape
    with pytest.raises(InputError, match="dataset check failed"):
        _verify(ds)


def test_folders_are_paired_by_name_not_listing_order(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "msk").mkdir()
    for i, name in enumerate(["zeta", "alpha", "mid"]):
        img, mask = disk_image(i)
        iio.imwrite(tmp_path / "img" / f"{name}.png", img)
        iio.imwrite(tmp_path / "msk" / f"{name}_mask.png", mask * 255)
    pairs = pair_images_and_masks(tmp_path / "img", tmp_path / "msk")
    assert [(a.stem, b.stem) for a, b in pairs] == [
        ("alpha", "alpha_mask"), ("mid", "mid_mask"), ("zeta", "zeta_mask")]
    cases = list(cases_from_folders(tmp_path / "img", tmp_path / "msk", corrected=True))
    np.testing.assert_array_equal(cases[2].mask > 0, disk_image(0)[1] > 0)   # zeta = seed 0
    iio.imwrite(tmp_path / "img" / "lonely.png", disk_image(5)[0])
    with pytest.raises(InputError, match="lonely.png"):
        pair_images_and_masks(tmp_path / "img", tmp_path / "msk")


# --------------------------------------------------------------------------- several targets


def lungs_and_nodule(seed, size=48, values=(1, 2, 3)):
    """An image with two 'lungs' and a 'nodule' inside the left one; its label map."""
    rng = np.random.default_rng(seed)
    img = rng.normal(60, 10, (size, size)).clip(0, 255).astype(np.uint8)
    lab = np.zeros((size, size), np.uint8)
    lab[8:40, 4:22] = values[0]
    lab[8:40, 26:44] = values[1]
    lab[18:24, 10:16] = values[2]
    img[lab > 0] += 80
    return img, lab


def test_several_targets_keep_their_values_and_names(tmp_path):
    from nnunetv2.imageio.natural_image_reader_writer import NaturalImage2DIO

    table = {"left lung": 1, "right lung": 2, "nodule": 3}
    cases = []
    for i in range(2):
        img, lab = lungs_and_nodule(i)
        cases += cases_from_arrays(img, lab, f"ct{i}", label_table=table)
    res = export_dataset(cases, tmp_path, 21, "Chest")   # nnU-Net's check runs
    ds = tmp_path / "Dataset021_Chest"
    meta = json.loads((ds / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "left lung": 1, "right lung": 2, "nodule": 3}
    assert meta["medclipsam_label_values"] == table
    assert res.label_table == table
    seg, _ = NaturalImage2DIO().read_seg(str(ds / "labelsTr" / "ct0.png"))
    np.testing.assert_array_equal(seg[0, 0], lungs_and_nodule(0)[1])   # values kept
    entry = read_case_list(ds)["ct0"]
    assert entry["label_fractions"]["nodule"] == pytest.approx(36 / 48**2, abs=1e-6)
    assert entry["foreground_fraction"] == pytest.approx((lungs_and_nodule(0)[1] > 0).mean(),
                                                         abs=1e-6)


def test_values_that_are_not_consecutive_are_remapped_in_order_and_recorded(tmp_path):
    from nnunetv2.imageio.natural_image_reader_writer import NaturalImage2DIO

    img, lab = lungs_and_nodule(0, values=(7, 2, 40))   # user's values: 2, 7, 40
    table = {"nodule": 40, "left lung": 7, "right lung": 2}
    export_dataset(cases_from_arrays(img, lab, "c", label_table=table), tmp_path, 22, "Remap")
    ds = tmp_path / "Dataset022_Remap"
    meta = json.loads((ds / "dataset.json").read_text())
    # nnU-Net's consecutive values, in the order of the user's: 2 -> 1, 7 -> 2, 40 -> 3
    assert meta["labels"] == {"background": 0, "right lung": 1, "left lung": 2, "nodule": 3}
    assert meta["medclipsam_label_values"] == {"right lung": 2, "left lung": 7, "nodule": 40}
    seg = NaturalImage2DIO().read_seg(str(ds / "labelsTr" / "c.png"))[0][0, 0]
    np.testing.assert_array_equal(seg, lungs_and_nodule(0, values=(2, 1, 3))[1])


def test_a_value_outside_the_table_is_refused_naming_it(tmp_path):
    img, lab = lungs_and_nodule(0)
    lab[0, 0] = 9
    with pytest.raises(InputError, match=r"label value\(s\) 9 are not in the label table"):
        cases_from_arrays(img, lab, "x", label_table={"left lung": 1, "right lung": 2,
                                                       "nodule": 3})
    # the same check when the table is given to the export only
    with pytest.raises(InputError, match=r"x: label value\(s\) 3, 9"):
        export_dataset([ExportCase("x", img, lab)], tmp_path, 23, "Bad",
                       label_table={"left lung": 1, "right lung": 2}, verify=False)
    assert left_in(tmp_path) == []


def test_appending_needs_the_same_table(tmp_path):
    table = {"left lung": 1, "right lung": 2, "nodule": 3}
    img, lab = lungs_and_nodule(0)
    export_dataset(cases_from_arrays(img, lab, "a", label_table=table), tmp_path, 24, "App",
                   verify=False)
    ds = tmp_path / "Dataset024_App"
    before = snapshot(ds)
    other = {"left lung": 1, "right lung": 2, "tumour": 3}
    with pytest.raises(InputError, match="missing nodule; not in the dataset tumour"):
        export_dataset(cases_from_arrays(img, lab, "b", label_table=other), tmp_path, 24,
                       "App", append=True, verify=False)
    with pytest.raises(InputError, match=r"other value nodule \(3 -> 4\)"):
        export_dataset(cases_from_arrays(img, lab, "b"), tmp_path, 24, "App", append=True,
                       label_table={**table, "nodule": 4}, verify=False)
    with pytest.raises(InputError, match="give its label table"):   # a binary mask
        export_dataset(cases_from_arrays(img, lab, "b"), tmp_path, 24, "App", append=True,
                       verify=False)
    assert snapshot(ds) == before
    img2, lab2 = lungs_and_nodule(1)
    res = export_dataset(cases_from_arrays(img2, lab2, "b"), tmp_path, 24, "App",
                         append=True, label_table=dict(reversed(table.items())))  # same table
    assert res.cases == ["b"] and res.label_table == table
    assert json.loads((ds / "dataset.json").read_text())["numTraining"] == 2


def test_binary_stays_the_default_and_one_named_target_can_be_a_table(tmp_path):
    img, lab = lungs_and_nodule(0)
    export_dataset(cases_from_arrays(img, lab, "a"), tmp_path, 25, "Bin", label_name="lung",
                   verify=False)
    ds = tmp_path / "Dataset025_Bin"
    meta = json.loads((ds / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "lung": 1}
    assert "medclipsam_label_values" not in meta
    assert set(np.unique(iio.imread(ds / "labelsTr/a.png"))) == {0, 1}
    # appending with the binary dataset's own one-name table is the same dataset
    export_dataset(cases_from_arrays(img, (lab > 0) * 1, "b", label_table={"lung": 1}),
                   tmp_path, 25, "Bin", append=True, verify=False)
    with pytest.raises(InputError, match="not in the dataset tumour"):
        export_dataset(cases_from_arrays(img, lab > 0, "c", label_table={"tumour": 1}),
                       tmp_path, 25, "Bin", append=True, verify=False)


def test_label_tables_are_checked_and_parsed():
    from napari_medclipsam.nnunet.export import (
        check_label_table,
        format_label_table,
        nnunet_label_values,
        parse_label_table,
    )

    assert parse_label_table("1=left lung, 2=right lung,3=nodule") == {
        "left lung": 1, "right lung": 2, "nodule": 3}
    assert parse_label_table("nodule=5,lung=2") == {"lung": 2, "nodule": 5}   # sorted by value
    assert format_label_table({"nodule": 5, "lung": 2}) == "2=lung, 5=nodule"
    assert nnunet_label_values({"nodule": 5, "lung": 2}) == {"lung": 1, "nodule": 2}
    assert check_label_table({"background": 0, "a": 1}) == {"a": 1}   # dataset.json style
    for bad, match in [("1=a,2", "not value=name"), ("x=y", "no integer"),
                       ("1=a,2=a", "twice"), ("0=a", "from 1"), ("1=a,1=b", "share the value"),
                       ("1=ignore", "reserves"), ("2=background", "reserves"), ("", "empty")]:
        with pytest.raises(InputError, match=match):
            parse_label_table(bad)


def test_folders_with_several_targets(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "msk").mkdir()
    for i in range(2):
        img, lab = lungs_and_nodule(i)
        iio.imwrite(tmp_path / "img" / f"p{i}.png", img)
        iio.imwrite(tmp_path / "msk" / f"p{i}.png", lab)
    table = {"left lung": 1, "right lung": 2, "nodule": 3}
    res = export_dataset(cases_from_folders(tmp_path / "img", tmp_path / "msk",
                                            label_table=table), tmp_path / "raw", 26, "F",
                         verify=False)
    assert res.label_table == table
    ds = tmp_path / "raw" / "Dataset026_F"
    np.testing.assert_array_equal(iio.imread(ds / "labelsTr/p1.png"), lungs_and_nodule(1)[1])
    iio.imwrite(tmp_path / "msk" / "p1.png", lungs_and_nodule(1)[1] * 80)   # 0/80/160/240
    with pytest.raises(InputError, match="p1: label value"):
        export_dataset(cases_from_folders(tmp_path / "img", tmp_path / "msk",
                                          label_table=table), tmp_path / "raw", 27, "G",
                       verify=False)


def test_export_command_takes_a_label_table(tmp_path, capsys):
    from napari_medclipsam.cli import main

    (tmp_path / "img").mkdir()
    (tmp_path / "msk").mkdir()
    img, lab = lungs_and_nodule(0, values=(1, 2, 5))
    iio.imwrite(tmp_path / "img" / "p0.png", img)
    iio.imwrite(tmp_path / "msk" / "p0.png", lab)
    args = ["nnunet", "export", "--images", str(tmp_path / "img"), "--masks",
            str(tmp_path / "msk"), "--dataset-id", "28", "--name", "Cli", "--out",
            str(tmp_path / "raw"), "--no-verify"]
    assert main([*args, "--labels", "1=left lung,2=right lung"]) == 2
    assert "label value(s) 5 are not in the label table" in capsys.readouterr().err
    assert main([*args, "--labels", "1=left lung,2=right lung,5=nodule"]) == 0
    out = capsys.readouterr().out
    assert "Labels (value=name): 1=left lung, 2=right lung, 5=nodule" in out
    assert "stored as 1=left lung, 2=right lung, 3=nodule" in out
    meta = json.loads((tmp_path / "raw/Dataset028_Cli/dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "left lung": 1, "right lung": 2, "nodule": 3}
    assert main([*args, "--append", "--labels", "1=left lung,2=right lung,5=tumour"]) == 2
    assert "missing nodule; not in the dataset tumour" in capsys.readouterr().err
    assert main([*args, "--labels", "1=a,b"]) == 2
    assert "not value=name" in capsys.readouterr().err
