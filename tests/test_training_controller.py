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
    CPU_REFERENCE_CORES,
    EPOCH_OVERHEAD_S,
    LOG_LINES,
    MAX_LINE,
    SCHEDULE_PRESETS,
    SECONDS_PER_ITERATION,
    STARTUP_S,
    VALIDATION_COST,
    JobStatus,
    Prediction,
    TrainingController,
    estimate_training,
    export_label_table,
    filter_log,
    folders_from_values,
    format_duration,
    full_log,
    guess_device,
    in_gui_words,
    label_name_from_layer,
    label_table_from_features,
    measured_seconds_per_iteration,
    preset_named,
    preset_of,
    schedule_from_values,
    status_line,
    uncertainty_words,
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


# --------------------------------------------------------------------------- time estimate
PAPER = dict(epochs=600, cycles=3, checkpoints_per_cycle=10, iterations_per_epoch=250,
             val_iterations_per_epoch=50)


def _expected_seconds(schedule, per_iteration, device):
    per_epoch = (schedule.iterations_per_epoch
                 + VALIDATION_COST * schedule.val_iterations_per_epoch) * per_iteration
    return STARTUP_S + schedule.epochs * (per_epoch + EPOCH_OVERHEAD_S[device])


def test_the_estimate_is_epochs_times_iterations_times_the_device_cost():
    paper = schedule_from_values(**PAPER)
    cpu = estimate_training(paper, "cpu", "2d", cores=CPU_REFERENCE_CORES)
    assert cpu.seconds_per_iteration == SECONDS_PER_ITERATION[("cpu", "2d")]
    assert cpu.seconds == pytest.approx(
        _expected_seconds(paper, SECONDS_PER_ITERATION[("cpu", "2d")], "cpu"))
    assert cpu.iterations == 150_000 and not cpu.measured
    # nnU-Net's length on a CPU is days, and the words say so and offer the quick preset
    assert cpu.seconds > 5 * 24 * 3600 and cpu.too_long
    assert cpu.duration.endswith("days")
    assert "days" in cpu.words() and "Quick try" in cpu.words() and "CPU" in cpu.words()
    # more cores: faster, but not linearly
    eight = estimate_training(paper, "cpu", "2d", cores=8)
    assert cpu.seconds / 4 < eight.seconds < cpu.seconds / 2
    # the same schedule on a GPU: hours, without the warning
    gpu = estimate_training(paper, "cuda", "2d")
    assert 3600 < gpu.seconds < 24 * 3600 and not gpu.too_long
    assert gpu.duration.endswith("h") and "GPU" in gpu.words()
    assert "Quick try" not in gpu.words()
    # a 3-D iteration costs more; a resumed run counts only the epochs left
    assert estimate_training(paper, "cuda", "3d_fullres").seconds > gpu.seconds
    half = estimate_training(paper, "cuda", "2d", epochs_done=300)
    assert half.iterations == 75_000
    assert half.seconds - STARTUP_S == pytest.approx((gpu.seconds - STARTUP_S) / 2)
    # a measured cost replaces the table's
    measured = estimate_training(paper, "cpu", seconds_per_iteration=0.5, why="chosen")
    assert measured.measured and measured.seconds == pytest.approx(
        _expected_seconds(paper, 0.5, "cpu"))
    assert "timed in this dataset's last run" in measured.words()


def test_presets_set_the_schedule_and_say_their_time():
    keys = [p.key for p in SCHEDULE_PRESETS]
    assert keys == ["quick", "short", "paper"]
    for preset in SCHEDULE_PRESETS:
        schedule = preset.schedule()                       # every preset is a valid schedule
        assert preset_of(preset.values()) is preset and preset_named(preset.key) is preset
        assert schedule.n_checkpoints == preset.cycles * preset.checkpoints_per_cycle
    assert preset_named("paper").values() == PAPER
    assert preset_of({**PAPER, "epochs": 300}) is None     # custom
    with pytest.raises(InputError, match="quick, short, paper"):
        preset_named("fast")
    quick = preset_named("quick")
    # "a first model within the hour on a CPU", even on 2 cores
    on_cpu = estimate_training(quick.schedule(), "cpu", cores=2)
    assert on_cpu.seconds < 3600 and not on_cpu.too_long
    label = quick.label("cpu", cores=2)
    assert label == f"Quick try: ~{on_cpu.duration}" and label.endswith("min")
    assert preset_named("paper").label("cpu", cores=2).endswith("days")
    assert preset_named("paper").label("cuda").endswith(" h")
    assert "10 epochs × 20 iterations" in quick.details


@pytest.mark.parametrize(("seconds", "text"), [
    (30, "1 min"), (80, "2 min"), (44 * 60, "44 min"), (90 * 60, "1.5 h"), (2 * 3600, "2 h"),
    (20 * 3600, "20 h"), (3 * 86400, "3 days"), (5.26 * 86400, "5.3 days"),
    (15.2 * 86400, "15 days")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_the_cost_measured_in_a_previous_run(folders):
    status = {"epoch_time_s": 62.0, "device": "cpu", "iterations_per_epoch": 4}
    schedule = {"iterations_per_epoch": 4, "val_iterations_per_epoch": 2}
    expected = (62.0 - EPOCH_OVERHEAD_S["cpu"]) / (4 + VALIDATION_COST * 2)
    assert measured_seconds_per_iteration(status, schedule, "cpu") == pytest.approx(expected)
    assert measured_seconds_per_iteration({**status, "device": "cuda:0"}, schedule,
                                          "cuda") == pytest.approx(
        (62.0 - EPOCH_OVERHEAD_S["cuda"]) / (4 + VALIDATION_COST * 2))
    assert measured_seconds_per_iteration(status, schedule, "cuda") is None  # other device
    assert measured_seconds_per_iteration({"device": "cpu"}, schedule, "cpu") is None

    # the controller uses this dataset's last run when it was on the same device
    ctl = TrainingController()
    (folders.raw / "Dataset004_Toy").mkdir(parents=True)
    job_dir = folders.results / "Dataset004_Toy" / "medclipsam_job"
    job_dir.mkdir(parents=True)
    (job_dir / "job.json").write_text(json.dumps(
        {"schedule": schedule, "device": "cpu", "configuration": "2d"}))
    (job_dir / "status.json").write_text(json.dumps(
        {"phase": "cancelled", "epoch": 2, "epochs": 10, **status}))
    paper = schedule_from_values(**PAPER)
    assert not ctl.estimate(paper, "cpu").measured              # no job located yet
    ctl.locate_job(folders, 4)
    estimate = ctl.estimate(paper, "cpu", "2d")
    assert estimate.measured and estimate.seconds_per_iteration == pytest.approx(expected)
    assert not ctl.estimate(paper, "cuda").measured             # not measured there
    assert not ctl.estimate(paper, "cpu", "3d_fullres").measured


def test_guess_device_without_importing_torch(monkeypatch):
    import importlib.metadata
    import sys
    import types

    for choice in ("cpu", "cuda", "mps"):
        assert guess_device(choice) == (choice, "chosen")
    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(is_available=lambda: True),
                                 backends=types.SimpleNamespace())
    monkeypatch.setitem(sys.modules, "torch", fake)
    assert guess_device("auto") == ("cuda", "found by torch")
    fake.cuda.is_available = lambda: False
    assert guess_device("auto") == ("cpu", "torch finds no GPU")
    # torch not imported: a CPU-only build says CPU whatever drivers there are
    monkeypatch.delitem(sys.modules, "torch")
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "2.5.0+cpu")
    assert guess_device("auto") == ("cpu", "torch is the CPU-only build")
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "2.5.0+cu124")
    monkeypatch.setattr(os.path, "exists", lambda p: p == "/proc/driver/nvidia/version")
    assert guess_device("auto") == ("cuda", "an NVIDIA driver is installed")
    assert "torch" not in sys.modules


# --------------------------------------------------------------------------- the job's log
NETWORK_DUMP = """\
PlainConvUNet(
  (encoder): PlainConvEncoder(
    (stages): Sequential(
      (0): Sequential(
        (0): StackedConvBlocks(
          (convs): Sequential(
            (0): ConvDropoutNormReLU(
              (conv): Conv2d(1, 32, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))
            )
          )
        )
      )
    )
  )
)"""
PLANS = "{'data_identifier': 'nnUNetPlans_2d', 'batch_size': 10, " + \
    ", ".join(f"'k{i}': {i}" for i in range(200)) + "}"
JOB_LOG = f"""
==== 2026-11-24 09:28:29 start Dataset001_M
Dataset001_M
Using <class 'nnunetv2.imageio.natural_image_reader_writer.NaturalImage2DIO'> as reader/writer

####################
verify_dataset_integrity Done.
If you didn't see any error messages then your dataset is most likely OK!
####################
2D U-Net configuration:
{PLANS}
/x/torch/jit/_script.py:1643: FutureWarning: `torch.jit.interface` is deprecated.
  warnings.warn(
Trainer 'nnUNetTrainerCheckpointEnsemble' not found in nnunetv2.training.nnUNetTrainer.
Searching in: /x/trainers
  Inspecting module: nnUNetTrainerCheckpointEnsemble
Found class nnUNetTrainerCheckpointEnsemble in nnUNetTrainerCheckpointEnsemble
Using device: cpu

#######################################################################
Please cite the following paper when using nnU-Net:
Isensee, F., Jaeger, P. F., Kohl, S. A., Petersen, J., & Maier-Hein, K. H. (2021). nnU-Net: a
#######################################################################

{NETWORK_DUMP}
2026-11-24 09:28:45.008401: Unable to plot network architecture:
2026-11-24 09:28:45.008439: No module named 'hiddenlayer'
This is the configuration used by this training:
Configuration name: 2d
 {PLANS}

These are the global plan.json settings:
 {PLANS}

2026-11-24 09:28:46.310723: Epoch 0
2026-11-24 09:28:46.310800: Current learning rate: 0.01
2026-11-24 09:29:17.880100: train_loss 0.038
2026-11-24 09:29:17.880200: Pseudo dice [np.float32(0.9597)]
2026-11-24 09:29:17.880476: Epoch time: 31.57 s
2026-11-24 09:29:18.353449: Yayy! New best EMA pseudo Dice: 0.2888999879360199
2026-11-24 09:29:19.273583: Epoch 1
2026-11-24 09:30:21.440000: Ensemble checkpoint cycle1_epoch0002.pth
2026-11-24 09:30:21.446206: Epoch time: 62.17 s
Traceback (most recent call last):
  File "/x/job.py", line 3, in _run
RuntimeError: {{'boom': 1}} out of memory
"""


def test_the_log_tail_leaves_out_nnunets_dumps():
    text = filter_log(JOB_LOG, lines=100)
    lines = text.splitlines()
    for dump in ("PlainConvUNet(", "(encoder)", "Conv2d(", "data_identifier", "####",
                 "Please cite", "Isensee", "FutureWarning", "warnings.warn", "Searching in",
                 "Inspecting module", "reader/writer", "configuration used by",
                 "plan.json settings", "hiddenlayer", "verify_dataset_integrity"):
        assert dump not in text, dump
    assert lines[0] == "==== 2026-11-24 09:28:29 start Dataset001_M"
    assert "09:28:46 Epoch 0" in lines and "09:28:46 Current learning rate: 0.01" in lines
    assert "09:29:17 Pseudo dice [0.9597]" in lines                  # no np.float32(...)
    assert "09:30:21 Ensemble checkpoint cycle1_epoch0002.pth" in lines
    assert "09:30:21 Epoch time: 62.17 s" in lines
    # errors stay, even when they look like a dump
    assert lines[-3:] == ["Traceback (most recent call last):",
                          '  File "/x/job.py", line 3, in _run',
                          "RuntimeError: {'boom': 1} out of memory"]
    assert all(len(line) <= MAX_LINE for line in lines)
    assert filter_log(JOB_LOG).splitlines() == lines[-LOG_LINES:]    # the last lines
    assert filter_log(None) == filter_log("") == ""
    long = "2026-11-24 09:30:21.446206: note " + "x" * 500
    assert filter_log(long) == "09:30:21 note " + "x" * (MAX_LINE - 8) + "..."


def test_refresh_shows_the_filtered_tail_and_the_full_log_keeps_everything(folders):
    ctl = TrainingController()
    assert ctl.full_log() == (None, "")
    (folders.raw / "Dataset006_Toy").mkdir(parents=True)
    job_dir = folders.results / "Dataset006_Toy" / "medclipsam_job"
    job_dir.mkdir(parents=True)
    (job_dir / "status.json").write_text(json.dumps({"phase": "failed", "epoch": 2,
                                                     "epochs": 4, "error": "Boom"}))
    ctl.locate_job(folders, 6)
    assert ctl.full_log() == (job_dir / "log.txt", "")               # nothing written yet
    (job_dir / "log.txt").write_text(JOB_LOG)
    status = ctl.refresh()
    assert status.log_tail == filter_log(JOB_LOG)
    assert "PlainConvUNet" not in status.log_tail and "Epoch time: 62.17 s" in status.log_tail
    path, text = ctl.full_log()
    assert path == job_dir / "log.txt" and text == JOB_LOG
    assert "PlainConvUNet(" in text and "data_identifier" in text
    _, cut = full_log(job_dir, max_bytes=200)
    assert cut.startswith("[... the first ") and cut.endswith("out of memory\n")
    assert len(cut) < 300


def test_status_line_says_the_iteration_of_a_long_epoch():
    raw = {"phase": "training", "running": True, "epoch": 3, "epochs": 600, "cycle": 1,
           "cycles": 3, "iteration": 120, "iterations_per_epoch": 250}
    assert status_line(raw).endswith(" · iteration 120/250 of epoch 4")
    assert "iteration" not in status_line({**raw, "running": False, "phase": "cancelled"})
    assert "iteration" not in status_line({**raw, "iteration": 0})


# --------------------------------------------------------------------------- GUI words
def test_messages_say_what_to_click_not_what_to_type(folders):
    from napari_medclipsam.nnunet.export import cases_from_arrays, export_dataset
    from napari_medclipsam.nnunet.job import model_dir_for

    ctl = TrainingController()
    paper = schedule_from_values(**PAPER)
    with pytest.raises(InputError) as info:                          # nothing exported
        ctl.start(folders, 3, paper)
    assert "click Export first" in str(info.value)
    cases = cases_from_arrays(*_disks(), "c0")
    export_dataset(cases, folders.raw, 3, "Toy", verify=False)
    with pytest.raises(InputError) as info:                          # nothing to resume
        ctl.start(folders, 3, paper, resume=True)
    assert "Nothing to resume" in str(info.value)
    (model_dir_for(folders, 3, "2d") / "fold_all").mkdir(parents=True)
    with pytest.raises(InputError) as info:                          # trained already
        ctl.start(folders, 3, paper)
    assert "press Resume, or tick 'start over' and press Start" in str(info.value)
    assert not (folders.results / "Dataset003_Toy" / "medclipsam_job").exists()
    try:                                                             # exported already
        export_dataset(cases, folders.raw, 3, "Toy", verify=False)
    except InputError as exc:
        message = in_gui_words(str(exc))
    assert "tick 'append to existing dataset'" in message
    from napari_medclipsam.nnunet.job import dataset_name_for

    try:
        dataset_name_for(folders, 9)
    except InputError as exc:
        message = in_gui_words(str(exc))
    assert "click Export first" in message
    for text in (message, str(info.value)):
        assert "--" not in text and "medclipsam " not in text, text
    # what other messages may say, said in the widget's words
    assert in_gui_words("A training of X is running already (pid 3): watch it with status, "
                        "or cancel it first.").endswith("wait for it, or press Cancel first.")
    assert in_gui_words("The training of X is finished already: predict with it, or start "
                        "over with restart.").endswith(
        "press Predict, or tick 'start over' and press Start.")
    assert in_gui_words("2 process(es) of the crashed training of X still run (pids 5, 6): "
                        "stop them with cancel first.").endswith("with Cancel first.")
    assert in_gui_words("X is not empty: use another folder (--overwrite).") == \
        "X is not empty: use another folder."
    assert in_gui_words("Nothing to change.") == "Nothing to change."


# --------------------------------------------------------------------------- uncertainty
def test_the_uncertainty_in_words():
    two = uncertainty_words(2)
    assert two == "0 = all checkpoints agree; 0.69 (ln 2) = a coin flip between two labels"
    assert f"{math.log(2):.2f}" == "0.69"
    three = uncertainty_words(3)
    assert three.startswith(two) and "1.10 (ln 3, the most) = all 3 labels equally likely" \
        in three
    assert uncertainty_words(1) == two
    p = Prediction("img", np.full((4, 4), 0.5, np.float32), np.zeros((4, 4), np.uint8),
                   np.full((4, 4), math.log(2), np.float32), ("background", "target"), (0, 1),
                   3)
    assert "mean uncertainty 0.693 nats (0 = all checkpoints agree" in p.summary()
