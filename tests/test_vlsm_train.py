"""Fine-tuning VLSMs (napari_medclipsam.vlsm.train and .data): toy models learn to segment the
shape the prompt names; the loss is medvlsm's; training resumes exactly; data sources and the
output folder follow their rules."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from toy_vlsm import CLASSES, dice, two_shape_image, write_shape_dataset

from napari_medclipsam.core.errors import InputError
from napari_medclipsam.vlsm import data as vd
from napari_medclipsam.vlsm import models as vm
from napari_medclipsam.vlsm import train as vt

FAST = {"prompt_sets": ("p1",), "batch_size": 8, "lr": 3e-3, "min_epochs": 0}


def _selectivity(model, n: int = 20) -> np.ndarray:
    """Per fresh image: Dice of the "disk" mask with the disk and with the square, and of the
    "square" mask with the square and with the disk."""
    rows = []
    for j in range(n):
        image, regions = two_shape_image(10_000 + j)
        pred = model.probabilities(image, list(CLASSES)) > 0.5
        rows.append((dice(pred[0], regions["disk"]), dice(pred[0], regions["square"]),
                     dice(pred[1], regions["square"]), dice(pred[1], regions["disk"])))
    return np.array(rows)


def test_tiny_clipseg_learns_to_segment_the_named_shape(tmp_path, tiny_clipseg_dir):
    images, masks = write_shape_dataset(tmp_path / "data", n=80)
    cases = vd.folder_cases(images, masks, CLASSES)
    model = vm.build_vlsm("clipseg", clipseg_model=f"local-dir:{tiny_clipseg_dir}",
                          device="cpu")
    config = vt.VlsmTrainConfig(epochs=120, patience=120, **FAST)
    lines: list[str] = []
    result = vt.train_vlsm(model, cases, tmp_path / "model", config, log=lines.append)
    assert (result.n_train, result.n_val) == (136, 24)  # 68 + 12 cases, two classes each
    assert len(lines) == 120 and lines[0].startswith("epoch 1/120: loss")
    first = result.history[0]["val_dice"]
    assert result.best_dice > 0.75 and result.best_dice > first + 0.4, (first, result)
    trained = vm.load_vlsm(str(tmp_path / "model"), "cpu")
    assert trained.info["classes"] == ["disk", "square"]
    assert trained.info["training"]["best_val_dice"] == pytest.approx(result.best_dice)
    sel = _selectivity(trained)
    assert sel[:, 0].mean() > 0.7 and sel[:, 2].mean() > 0.6, sel.mean(axis=0)
    assert (sel[:, 0] > sel[:, 1]).sum() >= 18 and (sel[:, 2] > sel[:, 3]).sum() >= 18
    untrained = _selectivity(vm.load_clipseg(f"local-dir:{tiny_clipseg_dir}", "cpu"))
    assert untrained[:, 0].mean() < 0.5  # what training added, not what the model had


def test_biomedclipseg_on_a_toy_clip_learns_the_named_shape(tmp_path, toy_clip_dir,
                                                            tiny_clipseg_dir):
    images, masks = write_shape_dataset(tmp_path / "data", n=60)
    model = vm.build_vlsm("biomedclipseg", clip_model=f"local-dir:{toy_clip_dir}",
                          clipseg_model=f"local-dir:{tiny_clipseg_dir}",
                          decoder_init="clipseg", device="cpu")
    config = vt.VlsmTrainConfig(epochs=100, patience=100, **FAST)
    result = vt.train_vlsm(model, vd.folder_cases(images, masks, CLASSES),
                           tmp_path / "model", config)
    assert result.best_dice > 0.7, result.history[-1]
    sel = _selectivity(vm.load_vlsm(str(tmp_path / "model"), "cpu"))
    assert (sel[:, 0] > sel[:, 1]).sum() >= 17 and (sel[:, 2] > sel[:, 3]).sum() >= 17


def test_loss_is_dice_plus_a_fifth_of_bce():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 8, 8))
    target = rng.random((3, 8, 8)) > 0.6
    target[2] = False  # an empty target
    p = 1 / (1 + np.exp(-logits))
    t = target.astype(float)
    soft = 1 - (2 * (p * t).sum((1, 2)) + 1e-5) / (p.sum((1, 2)) + t.sum((1, 2)) + 1e-5)
    bce = -(t * np.log(p) + (1 - t) * np.log(1 - p)).mean()
    loss = vt.dice_bce_loss(torch.tensor(logits), torch.tensor(target))
    assert float(loss) == pytest.approx(soft.mean() + 0.2 * bce, rel=1e-5)
    assert vt.hard_dice(np.zeros((2, 2), bool), np.zeros((2, 2), bool)) == 1.0


def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path, tiny_clipseg_dir):
    images, masks = write_shape_dataset(tmp_path / "data", n=8)
    cases = vd.folder_cases(images, masks, CLASSES)

    def run(out, epochs, resume=False):
        model = vm.build_vlsm("clipseg", clipseg_model=f"local-dir:{tiny_clipseg_dir}",
                              device="cpu")
        config = vt.VlsmTrainConfig(epochs=epochs, patience=50, **FAST)
        return model, vt.train_vlsm(model, cases, out, config, resume=resume)

    straight, whole = run(tmp_path / "a", 4)
    run(tmp_path / "b", 2)
    resumed, rest = run(tmp_path / "b", 4, resume=True)
    assert [h["epoch"] for h in rest.history] == [1, 2, 3, 4]
    for ours, theirs in zip(rest.history, whole.history, strict=True):
        assert ours["val_loss"] == pytest.approx(theirs["val_loss"], rel=1e-4)
    for key, value in straight.decoder.state_dict().items():
        assert torch.allclose(resumed.decoder.state_dict()[key], value, atol=1e-5), key

    model = vm.build_vlsm("clipseg", clipseg_model=f"local-dir:{tiny_clipseg_dir}",
                          device="cpu")
    changed = vt.VlsmTrainConfig(epochs=6, patience=50, **{**FAST, "lr": 1e-3})
    with pytest.raises(InputError, match="other settings.*lr"):
        vt.train_vlsm(model, cases, tmp_path / "b", changed, resume=True)
    with pytest.raises(InputError, match="already holds a VLSM model"):
        vt.train_vlsm(model, cases, tmp_path / "b", changed)
    checkpoint = tmp_path / "b" / vt.CHECKPOINT
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])  # a copy cut short
    with pytest.raises(InputError, match="damaged or truncated"):
        vt.train_vlsm(model, cases, tmp_path / "b", changed, resume=True)


def test_output_folder_rules(tmp_path):
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not empty"):
        vt.check_output(tmp_path / "foreign")
    with pytest.raises(InputError, match="not empty"):
        vt.check_output(tmp_path / "foreign", overwrite=True)
    (tmp_path / "data").mkdir()
    with pytest.raises(InputError, match="input folder"):
        vt.check_output(tmp_path / "data" / "model", inputs=[tmp_path / "data"])
    with pytest.raises(InputError, match="Nothing to resume"):
        vt.check_output(tmp_path / "new", resume=True)
    assert vt.check_output(tmp_path / "new") == "new"
    with pytest.raises(ValueError, match="prompt set"):
        vt.VlsmTrainConfig(prompt_sets="p1,p12")
    assert vt.VlsmTrainConfig(prompt_sets="p1, P6").prompt_sets == ("p1", "p6")


def test_split_is_by_name_and_stable():
    names = [f"case_{i:02d}" for i in range(20)]
    train, val = vd.split_by_name(names)
    assert len(val) == 3 and not set(train) & set(val)
    assert vd.split_by_name(list(reversed(names))) == (train, val)
    # a new case never moves an old one across the split
    more_train, more_val = vd.split_by_name([*names, "case_99"])
    assert set(val) <= set(more_val) | {"case_99"} and set(train) <= set(more_train)
    with pytest.raises(InputError, match="at least 2"):
        vd.split_by_name(["only"])


def test_captions_come_from_the_mask_and_the_levels():
    image, regions = two_shape_image(3)
    make = vt.caption_maker(("p1", "p5", "p7"), {"Disk": ["a round flat shape"]})
    captions = make("disk", regions["disk"], image)
    assert captions[0] == "disk"
    assert captions[1].startswith("one ") and captions[1].endswith("round disk")
    assert "bright" in captions[1]  # the toy disks are bright on a dark background
    assert captions[2] == "disk which is a round flat shape"
    with pytest.raises(InputError, match="definition"):
        vt.caption_maker(("p7",))("disk", regions["disk"], image)


def test_nnunet_dataset_gives_one_class_per_label(tmp_path):
    folder = tmp_path / "Dataset001_Toy"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "gray"}, "file_ending": ".png", "numTraining": 3,
        "labels": {"background": 0, "disk": 1, "square_region": 2}}))
    for i in range(3):
        image, regions = two_shape_image(i)
        labels = np.zeros(image.shape[:2], np.uint8)
        labels[regions["disk"]], labels[regions["square"]] = 1, 2
        Image.fromarray(image[..., 0]).save(folder / "imagesTr" / f"toy_{i:03d}_0000.png")
        Image.fromarray(labels).save(folder / "labelsTr" / f"toy_{i:03d}.png")
    (folder / "labelsTr" / "toy_009.png").write_bytes(b"")  # labels without an image
    lines: list[str] = []
    cases = vd.dataset_cases(folder, log=lines.append)
    assert [c.name for c in cases] == ["toy_000", "toy_001", "toy_002"]
    assert cases[0].classes == (("disk", 1), ("square region", 2))
    assert "toy_009" in lines[0]
    samples = vd.load_samples(cases, lambda name, target, rgb: [name])
    assert len(samples) == 6 and samples[1].class_name == "square region"
    first, regions = two_shape_image(0)
    np.testing.assert_array_equal(samples[0].target, regions["disk"])
    with pytest.raises(InputError, match="medclipsam_cases.json"):
        vd.dataset_cases(folder, corrected_only=True)
    (folder / "medclipsam_cases.json").write_text(json.dumps(
        {"toy_000": {"corrected": True}, "toy_001": {"corrected": False}}))
    assert [c.name for c in vd.dataset_cases(folder, corrected_only=True)] == ["toy_000"]


def test_volumes_give_labelled_slices_and_bad_cases_are_left_out(tmp_path):
    import nibabel as nib

    volume = np.zeros((10, 32, 32), np.float32)
    volume[:, 8:24, 8:24] = np.linspace(1, 100, 10)[:, None, None]
    labels = np.zeros((10, 32, 32), np.uint8)
    labels[4:6, 12:20, 12:20] = 1
    for name, data in (("vol.nii.gz", volume), ("vol_mask.nii.gz", labels)):
        nib.save(nib.Nifti1Image(data.transpose(2, 1, 0), np.eye(4)), tmp_path / name)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG broken")
    cases = [vd.TrainingCase("vol", tmp_path / "vol.nii.gz", tmp_path / "vol_mask.nii.gz",
                             (("lesion", None),)),
             vd.TrainingCase("broken", tmp_path / "broken.png", tmp_path / "broken.png",
                             (("lesion", None),))]
    lines: list[str] = []
    samples = vd.load_samples(cases, lambda name, target, rgb: [name], log=lines.append)
    assert [s.index for s in samples].count(4) == 1 and len(samples) == 4  # 2 full, 2 empty
    assert sum(s.target.any() for s in samples) == 2
    assert len({s.image_key for s in samples}) == 4
    assert lines and lines[0].startswith("broken: cannot be used")
