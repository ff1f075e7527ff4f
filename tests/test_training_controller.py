"""The training widget's Qt-free controller on plain arrays and files (no Qt, no napari):
schedule and folders from field values, export cases (a two-target label map becomes two
classes), job status, the review queue's order, a folder ranking, and the review record (time
by an injected clock, edits, Dice automatic vs final)."""

import csv
import json
import math
import os

import numpy as np
import pandas as pd
import pytest

from napari_medclipsam._widgets.training_controller import (
    JobStatus,
    Prediction,
    TrainingController,
    export_label_table,
    folders_from_values,
    label_name_from_layer,
    label_table_from_features,
    schedule_from_values,
    status_line,
)
from napari_medclipsam.core.errors import InputError
from napari_medclipsam.nnunet.job import NnUNetFolders, format_eta


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, t=100.0):
        self.t = t

    def __call__(self):
        return self.t


@pytest.fixture(autouse=True)
def no_env_folders(monkeypatch):
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def folders(tmp_path):
    return NnUNetFolders(*(tmp_path / k for k in ("raw", "pre", "res")))


def _disks(seed=0, size=48):
    """An image with two bright disks; label map 1 = left disk, 2 = right disk."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    left = (yy - 24) ** 2 + (xx - 12) ** 2 < 36
    right = (yy - 24) ** 2 + (xx - 36) ** 2 < 49
    img = (40 + 10 * rng.standard_normal((size, size)) + 120 * left + 180 * right)
    labels = left.astype(np.int32) + 2 * right.astype(np.int32)
    return img.clip(0, 255).astype(np.uint8), labels


def _features(table):
    return pd.DataFrame({"index": [0, *table.values()], "name": ["background", *table]})


def test_schedule_from_values():
    s = schedule_from_values(epochs=12, cycles=3, checkpoints_per_cycle=2,
                             iterations_per_epoch=5, val_iterations_per_epoch=0, lr_max=0.02)
    assert (s.epochs, s.cycles, s.checkpoints_per_cycle, s.cycle_length) == (12, 3, 2, 4)
    assert (s.iterations_per_epoch, s.val_iterations_per_epoch) == (5, 0)
    assert s.lr_max == 0.02 and s.lr_min == 1e-4
    assert s.ensemble_epochs() == [2, 3, 6, 7, 10, 11]
    # a learning rate below the floor: the floor follows it (the cosine never goes up)
    low = schedule_from_values(epochs=4, cycles=1, checkpoints_per_cycle=1, lr_max=5e-5)
    assert low.lr_min == low.lr_max == 5e-5
    with pytest.raises(InputError, match="multiple of cycles"):
        schedule_from_values(epochs=10, cycles=3)


def test_folders_from_values(tmp_path, monkeypatch):
    with pytest.raises(InputError, match="raw and results folder"):
        folders_from_values({"preprocessed": str(tmp_path / "p")})
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "r"))
    f = folders_from_values({"raw": str(tmp_path / "a"), "preprocessed": str(tmp_path / "p"),
                             "results": "  "})
    assert f.raw == (tmp_path / "a").resolve() and f.results == (tmp_path / "r").resolve()


def test_label_tables_from_layer_features():
    table = {"left disk": 1, "right disk": 2}
    assert label_table_from_features(_features(table)) == table
    assert export_label_table(_features(table)) == table
    one = _features({"tumor": 3})
    assert label_table_from_features(one) == {"tumor": 3}
    assert export_label_table(one) is None                   # one target: binary export
    assert label_table_from_features(pd.DataFrame({"index": [0, 1]})) is None
    assert label_table_from_features(pd.DataFrame()) is None
    assert label_table_from_features(None) is None
    with pytest.raises(InputError, match="share the value"):
        export_label_table(pd.DataFrame({"index": [1, 1], "name": ["a", "b"]}))
    assert label_name_from_layer("SAM mask [breast tumor +1]") == "breast tumor"
    assert label_name_from_layer("mask") is None


def test_status_line_and_job_status():
    assert format_eta(None) == "" and format_eta(9.4) == "9 s"
    assert format_eta(760) == "12 min 40 s" and format_eta(3 * 3600 + 300) == "3 h 05 min"
    raw = {"phase": "training", "running": True, "epoch": 3, "epochs": 600, "cycle": 1,
           "cycles": 3, "train_loss": 0.51234, "pseudo_dice": 0.7, "eta_s": 125, "pid": 42}
    status = JobStatus.from_dict(raw)
    assert status.running and status.exists and not status.resumable and status.pid == 42
    assert status.line == status_line(raw) == (
        "training · epoch 3/600 · cycle 1/3 · loss 0.5123 · pseudo-Dice 0.700 · ETA 2 min 05 s")
    assert "Boom" in status_line({"phase": "failed", "error": "Boom", "running": False})
    crashed = JobStatus.from_dict({"phase": "crashed", "running": False, "epoch": 7})
    assert crashed.resumable and "Resume" in crashed.line
    done = JobStatus.from_dict({"phase": "done", "epoch": 3, "epochs": 4})
    assert done.epoch == 4                                    # done: every epoch
    assert JobStatus().line == "No training for this dataset yet."


def test_locate_job_reads_its_schedule_and_status(folders):
    ctl = TrainingController()
    assert ctl.locate_job(None, 5) is None and ctl.refresh().phase == "none"
    (folders.raw / "Dataset005_Toy").mkdir(parents=True)
    job_dir = folders.results / "Dataset005_Toy" / "medclipsam_job"
    job_dir.mkdir(parents=True)
    (job_dir / "job.json").write_text(json.dumps(
        {"schedule": {"epochs": 8, "cycles": 2, "lr_max": 0.02, "lr_min": 0.002},
         "device": "cpu"}))
    (job_dir / "status.json").write_text(json.dumps(
        {"phase": "done", "epoch": 7, "epochs": 8, "checkpoints": ["a.pth", "b.pth"]}))
    (job_dir / "log.txt").write_text("Epoch 1\nEpoch 2\n")
    job = ctl.locate_job(folders, 5)
    assert job["schedule"]["epochs"] == 8 and ctl.state.job_dir == job_dir
    assert ctl.state.lr_min == 0.002
    assert ctl.locate_job(folders, 5) is None                 # the same job: nothing new
    status = ctl.refresh()
    assert status.phase == "done" and (status.epoch, status.epochs) == (8, 8)
    assert status.checkpoints == ("a.pth", "b.pth") and "Epoch 2" in status.log_tail
    assert ctl.state.status is status


def test_export_a_two_target_label_map_as_two_classes(folders):
    ctl = TrainingController()
    img, labels = _disks()
    stack = np.stack([img, img, img])
    label_stack = np.stack([labels, np.zeros_like(labels), labels])
    table = export_label_table(_features({"left disk": 1, "right disk": 2}))
    cases = ctl.export_cases(stack, label_stack, "two disks", spacing=(3.0, 0.5, 0.5),
                             as_slices=True, label_table=table)
    assert [c.case_id for c in cases] == ["two_disks_z000", "two_disks_z002"]
    assert cases[0].spacing == (0.5, 0.5) and cases[0].label_table == table
    label_stack[0] = 0                      # painting after the click changes nothing
    assert cases[0].mask.max() == 2
    result = ctl.export(cases, folders, 4, "Disks", label_table=table)
    assert ctl.state.last_export is result and result.label_table == table
    ds = json.loads((result.folder / "dataset.json").read_text())
    assert ds["labels"] == {"background": 0, "left disk": 1, "right disk": 2}
    assert ds["numTraining"] == 2
    assert "Classes: 1=left disk, 2=right disk" in ctl.export_message(result)
    # a value the table does not name is refused, naming it
    bad = labels.copy()
    bad[0, 0] = 5
    with pytest.raises(InputError, match="5"):
        ctl.export_cases(img, bad, "bad", label_table=table)


def _prediction(source, entropy_means, shape=(16, 16), classes=("background", "target"),
                values=(0, 1)):
    """A Prediction whose slice z has mean entropy ``entropy_means[z]`` (one value: 2-D)."""
    z = len(entropy_means)
    entropy = np.stack([np.full(shape, h, np.float32) for h in entropy_means])
    mask = np.zeros((z, *shape), np.uint8)
    mask[:, 4:10, 4:10] = values[1]
    if len(values) > 2:
        mask[:, 11:14, 11:14] = values[2]
    if z == 1:
        mask, entropy = mask[0], entropy[0]
    return Prediction(source, (mask > 0).astype(np.float32), mask, entropy, classes, values,
                      2, stack=z > 1)


def test_review_queue_is_ranked_by_entropy_worst_first():
    ctl = TrainingController()
    items = ctl.use_prediction(_prediction("new scan", [0.1, 0.5, 0.3, 0.5]))
    assert [i.slice_index for i in items] == [1, 3, 2, 0]   # ties keep slice order
    assert [i.case for i in items] == ["new_scan_z001", "new_scan_z003", "new_scan_z002",
                                       "new_scan_z000"]
    assert items[0].mean_entropy == pytest.approx(0.5) and items[0].status == ""
    assert ctl.state.review is items and ctl.state.current is None
    one = ctl.use_prediction(_prediction("photo", [0.2]))
    assert len(one) == 1 and one[0].slice_index is None and one[0].case == "photo"
    three = _prediction("x", [0.1], classes=("background", "a", "b"), values=(0, 1, 2))
    assert three.max_entropy == pytest.approx(math.log(3)) and three.multi
    assert three.labels == {"a": 1, "b": 2}
    assert three.features() == {"index": [0, 1, 2], "name": ["background", "a", "b"]}


def test_review_records_time_edits_and_dice(folders):
    clock = Clock(100.0)
    ctl = TrainingController(clock=clock)
    img, labels = _disks()
    ctl.export(ctl.export_cases(img, labels > 0, "seed"), folders, 2, "Rev")
    stack = np.stack([img, img, img])
    ctl.use_prediction(_prediction("new", [0.2, 0.6, 0.4], shape=img.shape))
    with pytest.raises(InputError, match="Open row"):
        ctl.prepare_review(0, "accepted", stack[1], folders=folders, dataset_id=2, name="X")

    # row 0 (z=1): opened at t=100, three edits, marked corrected at t=142.5
    item = ctl.open_review(0, "new")
    assert item.slice_index == 1 and ctl.state.current == 0
    auto = ctl.automatic_mask(0)
    final = auto.copy()
    final[4:10, 4:7] = 0                                      # 18 of 36 pixels erased
    final[20:23, 20:22] = 1                                   # 6 added
    for _ in range(3):
        ctl.note_edit()
    clock.t = 142.5
    job = ctl.prepare_review(0, "corrected", stack[1], final, folders=folders, dataset_id=2,
                             name="ignored", spacing=(0.5, 0.5))
    clock.t = 500.0                                           # the export's time is not counted
    assert (job.seconds, job.edits, job.name) == (42.5, 3, "Rev")
    record = ctl.submit_review(job, verify=False)
    expected = 2 * 18 / (36 + 24)
    assert record.status == "corrected" and record.seconds == 42.5 and record.edits == 3
    assert record.dice_auto_final == pytest.approx(expected, abs=1e-6)
    assert ctl.state.review[0].record == record and ctl.state.review[0].status == "corrected"

    # row 1 (z=2): accepted unmodified, whatever the layer holds, 8 s later
    clock.t = 600.0
    ctl.open_review(1, "new")
    clock.t = 608.0
    job = ctl.prepare_review(1, "accepted", stack[2], np.zeros_like(auto), folders=folders,
                             dataset_id=2, name="Rev")
    accepted = ctl.submit_review(job, verify=False)
    assert (accepted.status, accepted.seconds, accepted.edits) == ("accepted", 8.0, 0)
    assert accepted.dice_auto_final == 1.0

    folder = folders.raw / "Dataset002_Rev"
    ds = json.loads((folder / "dataset.json").read_text())
    assert ds["numTraining"] == 3
    cases = json.loads((folder / "medclipsam_cases.json").read_text())
    assert cases["new_z001"]["review"]["seconds"] == 42.5
    assert cases["new_z001"]["review"]["edits"] == 3
    assert cases["new_z001"]["corrected"] is True and cases["new_z002"]["corrected"] is True
    assert cases["new_z002"]["review"]["status"] == "accepted"
    summary = ctl.state.summary
    assert summary.n_reviewed == 2 and summary.share_accepted == 0.5
    assert summary.mean_seconds == pytest.approx((42.5 + 8.0) / 2)
    assert summary.mean_dice_auto_final == pytest.approx((expected + 1.0) / 2, abs=1e-6)
    assert ctl.summary(folders, 2) == summary
    # "corrected" with nothing changed is not a correction: told, nothing written
    ctl.open_review(2, "new")
    job = ctl.prepare_review(2, "corrected", stack[0], ctl.automatic_mask(2),
                             folders=folders, dataset_id=2, name="Rev")
    with pytest.raises(InputError, match="accepted"):
        ctl.submit_review(job, verify=False)
    assert json.loads((folder / "dataset.json").read_text())["numTraining"] == 3


def test_review_of_a_two_target_prediction_uses_the_label_table(folders):
    clock = Clock(0.0)
    ctl = TrainingController(clock=clock)
    img, labels = _disks()
    table = {"left disk": 1, "right disk": 2}
    ctl.export(ctl.export_cases(img, labels, "seed", label_table=table), folders, 3, "Two",
               label_table=table)
    ctl.use_prediction(_prediction("new", [0.3], shape=img.shape,
                                   classes=("background", *table), values=(0, 1, 2)))
    ctl.open_review(0, "new")
    auto = ctl.automatic_mask(0)
    final = auto.copy()
    final[final == 2] = 0                                     # the second target removed
    clock.t = 12.0
    record = ctl.submit_review(ctl.prepare_review(0, "corrected", img, final,
                                                  folders=folders, dataset_id=3, name="Two"),
                               verify=False)
    # mean over the labels present: Dice 1 for label 1, 0 for label 2
    assert record.dice_auto_final == pytest.approx(0.5) and record.seconds == 12.0
    folder = folders.raw / "Dataset003_Two"
    assert json.loads((folder / "dataset.json").read_text())["numTraining"] == 2


def test_a_folder_ranking_becomes_the_queue(tmp_path):
    import imageio.v3 as iio
    import tifffile

    pred, images = tmp_path / "pred", tmp_path / "images"
    for sub in ("masks", "probability", "uncertainty"):
        (pred / sub).mkdir(parents=True)
    images.mkdir()
    rows = [("b", 0.4), ("a", 0.2)]
    for case, h in rows:
        iio.imwrite(images / f"{case}_0000.png", np.full((8, 8), 50, np.uint8))
        mask = np.zeros((8, 8), np.uint8)
        mask[2:5, 2:5] = 255
        iio.imwrite(pred / "masks" / f"{case}.png", mask)
        tifffile.imwrite(pred / "probability" / f"{case}.tif", np.full((8, 8), 0.3, np.float32))
        tifffile.imwrite(pred / "uncertainty" / f"{case}.tif", np.full((8, 8), h, np.float32))
    with open(pred / "uncertainty_ranking.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["case", "mean_entropy", "max_entropy"])
        w.writerows([(c, h, h) for c, h in rows])
    (pred / "ensemble.json").write_text(json.dumps({"classes": ["background", "disk"],
                                                    "labels": {"disk": 1}}))
    ctl = TrainingController()
    assert ctl.recorded_images_dir(pred) is None
    with pytest.raises(InputError, match="which images"):
        ctl.load_ranking(pred)
    with pytest.raises(InputError, match="uncertainty_ranking.csv"):
        ctl.load_ranking(images, images)
    items = ctl.load_ranking(pred, images)
    assert [i.case for i in items] == ["b", "a"] and items[0].mean_entropy == 0.4
    assert items[0].files.image == images / "b_0000.png"
    assert ctl.state.review_folder == pred
    maps = ctl.read_folder_maps(0)
    assert set(np.unique(maps.mask)) == {0, 1} and maps.mask.sum() == 9   # 0/255 -> 0/1
    assert maps.uncertainty.mean() == pytest.approx(0.4)
    assert maps.max_entropy == pytest.approx(math.log(2))
    assert ctl.automatic_mask(0) is maps.mask
    os.remove(images / "a_0000.png")
    with pytest.raises(InputError, match="No image for case 'a'"):
        ctl.load_ranking(pred, images)
