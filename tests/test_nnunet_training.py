"""A tiny real nnU-Net v2 run through the ``medclipsam nnunet`` commands: export, planning,
preprocessing and training with checkpoint ensembling in a background process, ensemble
prediction with uncertainty; then cancel (the whole process tree) and resume."""

import json
import math
import time

import imageio.v3 as iio
import numpy as np
import psutil
import pytest

from napari_medclipsam.cli import main
from napari_medclipsam.core.errors import InputError
from napari_medclipsam.nnunet import job
from napari_medclipsam.nnunet.ensemble import entropy, list_checkpoints, load_ensemble
from napari_medclipsam.nnunet.schedule import EnsembleSchedule
from napari_medclipsam.nnunet.trainer import load_checkpoint_file

pytestmark = pytest.mark.timeout(600)


def make_folder(root, n=6, size=64, seed=0):
    """Images with one bright disk each; the masks are the disks."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        yy, xx = np.mgrid[:size, :size]
        cy, cx = rng.integers(20, size - 20, 2)
        r = rng.integers(8, 14)
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        img = (rng.normal(60, 20, (size, size)) + 120 * mask).clip(0, 255).astype(np.uint8)
        iio.imwrite(root / "images" / f"case{i}.png", img)
        iio.imwrite(root / "masks" / f"case{i}.png", mask.astype(np.uint8) * 255)


def folder_flags(root):
    return ["--raw", str(root / "raw"), "--preprocessed", str(root / "pre"),
            "--results", str(root / "res")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("nnunet")
    make_folder(root)
    assert main(["nnunet", "export", "--images", str(root / "images"), "--masks",
                 str(root / "masks"), "--dataset-id", "7", "--name", "Toy", "--out",
                 str(root / "raw"), "--label-name", "disk"]) == 0
    t0 = time.monotonic()
    code = main(["nnunet", "train", "--dataset-id", "7", "--epochs", "4", "--cycles", "2",
                 "--checkpoints-per-cycle", "2", "--iterations-per-epoch", "4",
                 "--val-iterations-per-epoch", "1", "--lr", "0.01", "--lr-min", "0.001",
                 "--device", "cpu", "--data-workers", "0", "--seed", "0", "--wait",
                 *folder_flags(root)])
    return root, code, time.monotonic() - t0


def test_training_runs_in_the_background_and_keeps_exactly_the_ensemble(trained, capsys):
    root, code, seconds = trained
    folders = job.NnUNetFolders.resolve(root / "raw", root / "pre", root / "res")
    status = job.read_status(job.job_dir_for(folders, 7))
    assert code == 0, status
    assert status["phase"] == "done" and not status["running"]
    assert status["epoch"] == 4 and status["cycle"] == 2
    model_dir = job.model_dir_for(folders, 7)
    names = [p.name for p in list_checkpoints(model_dir)]
    # 2 cycles x 2 epochs, G_d = 2 -> exactly 4 members, named by cycle and epoch
    assert names == ["cycle1_epoch0001.pth", "cycle1_epoch0002.pth", "cycle2_epoch0003.pth",
                     "cycle2_epoch0004.pth"]
    # the learning rate nnU-Net logged at each epoch equals the schedule
    schedule = EnsembleSchedule(epochs=4, cycles=2, checkpoints_per_cycle=2,
                                iterations_per_epoch=4, val_iterations_per_epoch=1,
                                lr_max=0.01, lr_min=0.001)
    final = load_checkpoint_file(model_dir / "fold_all" / "checkpoint_final.pth")  # weights_only
    lrs = final["logging"]["lrs"]
    np.testing.assert_allclose(lrs, [0.01, 0.001, 0.01, 0.001])
    np.testing.assert_allclose(lrs, [schedule.lr_at(e) for e in range(4)])
    members = [load_checkpoint_file(p) for p in list_checkpoints(model_dir)]
    assert [m["lr"] for m in members] == pytest.approx([0.01, 0.001, 0.01, 0.001])
    assert [m["cycle"] for m in members] == [1, 1, 2, 2]
    # the members differ (they are snapshots of a moving network)
    w = [next(iter(m["network_weights"].values())) for m in members]
    assert not np.allclose(w[0].numpy(), w[3].numpy())
    assert len(status["train_losses"]) == 4
    capsys.readouterr()
    assert main(["nnunet", "status", "--dataset-id", "7", *folder_flags(root)]) == 0
    out = capsys.readouterr().out
    assert "done" in out and "epoch 4/4" in out and "cycle 2/2" in out


def test_ensemble_prediction_is_the_mean_softmax_with_its_entropy(trained):
    root, code, _ = trained
    assert code == 0
    folders = job.NnUNetFolders.resolve(root / "raw", root / "pre", root / "res")
    model_dir = job.model_dir_for(folders, 7)
    img = iio.imread(root / "images" / "case0.png")
    disk = iio.imread(root / "masks" / "case0.png") > 0
    ens = load_ensemble(model_dir, device="cpu", use_mirroring=False)
    out = ens.predict_image(img)
    assert out.n_checkpoints == 4
    assert out.probabilities.shape == (2, *img.shape) and out.mask.shape == img.shape
    assert out.probabilities.min() >= 0 and out.probabilities.max() <= 1
    np.testing.assert_allclose(out.probabilities.sum(0), 1, atol=1e-5)
    assert out.entropy.min() >= 0 and out.entropy.max() <= math.log(2) + 1e-6
    # eq. 21 through the real network: the mean of each checkpoint's own softmax
    singles = [load_ensemble(model_dir, [p], device="cpu", use_mirroring=False
                             ).predict_image(img).probabilities
               for p in list_checkpoints(model_dir)]
    np.testing.assert_allclose(out.probabilities, np.mean(singles, axis=0), atol=1e-5)
    np.testing.assert_allclose(out.entropy, entropy(np.mean(singles, axis=0)), atol=1e-4)
    np.testing.assert_array_equal(out.mask, out.probabilities[1] > 0.5)
    # after a few iterations the network already sees the disk
    assert out.foreground[disk].mean() > out.foreground[~disk].mean() + 0.1
    # our batched mirroring averages exactly what nnU-Net's one-flip-at-a-time loop does
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    mirrored = load_ensemble(model_dir, device="cpu", use_mirroring=True)
    x = torch.randn(1, 1, *mirrored.configuration_manager.patch_size)
    np.testing.assert_allclose(
        mirrored._internal_maybe_mirror_and_predict(x).numpy(),
        nnUNetPredictor._internal_maybe_mirror_and_predict(mirrored, x).numpy(),
        rtol=1e-4, atol=1e-4)
    # a stack of three copies with a 2-D model: slice by slice, same maps
    stack = ens.predict_image(np.stack([img] * 3), spacing=(5.0, 1.0, 1.0))
    np.testing.assert_allclose(stack.probabilities[:, 1], out.probabilities, atol=1e-5)


def test_predict_command_writes_maps_and_a_ranking(trained, tmp_path):
    root, code, _ = trained
    assert code == 0
    out = tmp_path / "pred"
    assert main(["nnunet", "predict", "--dataset-id", "7", "--input", str(root / "images"),
                 "-o", str(out), "--device", "cpu", "--no-mirroring",
                 *folder_flags(root)]) == 0
    import tifffile

    for i in range(6):
        mask = iio.imread(out / "masks" / f"case{i}.png")
        prob = tifffile.imread(out / "probability" / f"case{i}.tif")
        h = tifffile.imread(out / "uncertainty" / f"case{i}.tif")
        assert mask.shape == prob.shape == h.shape == (64, 64)
        np.testing.assert_array_equal(mask > 0, prob > 0.5)
        assert prob.min() >= 0 and prob.max() <= 1 and h.max() <= math.log(2) + 1e-6
    rows = (out / "uncertainty_ranking.csv").read_text().splitlines()
    assert rows[0].startswith("case,mean_entropy") and len(rows) == 7
    means = [float(r.split(",")[1]) for r in rows[1:]]
    assert means == sorted(means, reverse=True)
    meta = json.loads((out / "ensemble.json").read_text())
    assert meta["entropy"]["units"] == "nats" and len(meta["checkpoints"]) == 4
    # never into a non-empty folder without --overwrite
    assert main(["nnunet", "predict", "--dataset-id", "7", "--input", str(root / "images"),
                 "-o", str(out), "--device", "cpu", *folder_flags(root)]) == 2


def test_a_second_training_is_refused_without_resume_or_restart(trained):
    root, code, _ = trained
    folders = job.NnUNetFolders.resolve(root / "raw", root / "pre", root / "res")
    with pytest.raises(InputError, match="has a training already"):
        job.start_training(7, EnsembleSchedule(epochs=2, cycles=1, checkpoints_per_cycle=1),
                           folders=folders, device="cpu")
    with pytest.raises(InputError, match="finished already"):
        job.start_training(7, EnsembleSchedule(epochs=4, cycles=2, checkpoints_per_cycle=2),
                           folders=folders, device="cpu", resume=True)


def _wait_for(predicate, timeout, job_dir):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        status = job.read_status(job_dir)
        if predicate(status):
            return status
        if not status["running"] and status.get("phase") not in ("starting", "none"):
            raise AssertionError(f"job stopped: {status}")
        time.sleep(0.3)
    raise AssertionError(f"timed out: {job.read_status(job_dir)}")


def test_cancel_kills_the_process_tree_and_resume_finishes(tmp_path):
    make_folder(tmp_path, n=4)
    folders = job.NnUNetFolders.resolve(tmp_path / "raw", tmp_path / "pre", tmp_path / "res")
    assert main(["nnunet", "export", "--images", str(tmp_path / "images"), "--masks",
                 str(tmp_path / "masks"), "--dataset-id", "3", "--name", "Cancel", "--out",
                 str(tmp_path / "raw"), "--no-verify"]) == 0
    schedule = EnsembleSchedule(epochs=4, cycles=2, checkpoints_per_cycle=1,
                                iterations_per_epoch=6, val_iterations_per_epoch=1)
    # one augmentation worker: the job has a child process that cancel must kill too
    job_dir = job.start_training(3, schedule, folders=folders, device="cpu", data_workers=1)
    status = _wait_for(lambda s: s.get("phase") == "training" and s.get("epoch", 0) >= 1,
                       300, job_dir)
    pid = status["pid"]
    tree = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    assert len(tree) >= 2, "expected nnU-Net's augmentation worker under the job"
    assert job.cancel(job_dir)
    gone, alive = psutil.wait_procs(tree, timeout=10)
    assert not alive
    status = job.read_status(job_dir)
    assert status["phase"] == "cancelled" and not status["running"]
    done_epochs = status["epoch"]
    assert 1 <= done_epochs < 4
    assert not job.cancel(job_dir)   # nothing left to cancel
    with pytest.raises(InputError, match="same schedule"):
        job.start_training(3, EnsembleSchedule(epochs=8, cycles=2, checkpoints_per_cycle=1),
                           folders=folders, device="cpu", resume=True)
    # resume through the CLI with the saved schedule
    assert main(["nnunet", "train", "--dataset-id", "3", "--resume", "--device", "cpu",
                 "--data-workers", "0", "--wait", *folder_flags(tmp_path)]) == 0
    status = job.read_status(job_dir)
    assert status["phase"] == "done" and status["epoch"] == 4
    log = (job_dir / "log.txt").read_text()
    assert "resume" in log
    # resumed, not restarted: the first epochs were not trained twice
    model_dir = job.model_dir_for(folders, 3)
    final = load_checkpoint_file(model_dir / "fold_all" / "checkpoint_final.pth")
    assert len(final["logging"]["lrs"]) == 4
    assert [p.name for p in list_checkpoints(model_dir)] == [
        "cycle1_epoch0002.pth", "cycle2_epoch0004.pth"]
    starts = final["logging"]["epoch_start_timestamps"]
    assert all(b > a for a, b in zip(starts, starts[1:], strict=False))


# --------------------------------------------------------------------------- several targets


def make_two_target_folder(root, n=6, size=64, seed=1):
    """Images with a bright disk and a dark square each; masks 1 = disk, 3 = square."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        lab = np.zeros((size, size), np.uint8)
        cy, cx = rng.integers(14, 24, 2)
        lab[(yy - cy) ** 2 + (xx - cx) ** 2 < 10 ** 2] = 1
        sy, sx = rng.integers(36, 44, 2)
        lab[sy - 9: sy + 9, sx - 9: sx + 9] = 3
        img = rng.normal(120, 15, (size, size)) + 110 * (lab == 1) - 100 * (lab == 3)
        iio.imwrite(root / "images" / f"case{i}.png", img.clip(0, 255).astype(np.uint8))
        iio.imwrite(root / "masks" / f"case{i}.png", lab)


@pytest.fixture(scope="module")
def trained_two_targets(tmp_path_factory):
    root = tmp_path_factory.mktemp("nnunet_multi")
    make_two_target_folder(root)
    assert main(["nnunet", "export", "--images", str(root / "images"), "--masks",
                 str(root / "masks"), "--dataset-id", "8", "--name", "TwoTargets", "--out",
                 str(root / "raw"), "--labels", "1=disk,3=square", "--no-verify"]) == 0
    res = root / "raw" / "Dataset008_TwoTargets"
    t0 = time.monotonic()
    # 8 iterations an epoch: with 4, about one unseeded run in five had not yet told the
    # classes apart; the seed makes this run the same every time
    code = main(["nnunet", "train", "--dataset-id", "8", "--epochs", "4", "--cycles", "2",
                 "--checkpoints-per-cycle", "2", "--iterations-per-epoch", "8",
                 "--val-iterations-per-epoch", "1", "--lr", "0.01", "--lr-min", "0.001",
                 "--device", "cpu", "--data-workers", "0", "--seed", "0", "--wait",
                 *folder_flags(root)])
    return root, res, code, time.monotonic() - t0


def test_two_targets_are_exported_trained_and_predicted_by_name(trained_two_targets, tmp_path,
                                                               capsys):
    import tifffile

    root, ds, code, seconds = trained_two_targets
    folders = job.NnUNetFolders.resolve(root / "raw", root / "pre", root / "res")
    assert code == 0, job.read_status(job.job_dir_for(folders, 8))
    # the square's value 3 went to nnU-Net as 2 and comes back as 3
    meta = json.loads((ds / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "disk": 1, "square": 2}
    assert meta["medclipsam_label_values"] == {"disk": 1, "square": 3}
    model_dir = job.model_dir_for(folders, 8)
    ens = load_ensemble(model_dir, device="cpu", use_mirroring=False)
    assert ens.n_classes == 3 and ens.class_names == ("background", "disk", "square")
    assert ens.labels == {"disk": 1, "square": 3}
    img = iio.imread(root / "images" / "case0.png")
    lab = iio.imread(root / "masks" / "case0.png")
    out = ens.predict_image(img)
    assert out.probabilities.shape == (3, *img.shape) and out.labels == ens.labels
    np.testing.assert_allclose(out.probabilities.sum(0), 1, atol=1e-5)
    assert out.entropy.min() >= 0 and out.entropy.max() <= math.log(3) + 1e-6
    np.testing.assert_allclose(out.entropy, entropy(out.probabilities), atol=1e-5)
    assert set(np.unique(out.mask)) <= {0, 1, 3}
    np.testing.assert_array_equal(out.mask, np.array([0, 1, 3])[out.probabilities.argmax(0)])
    # what the tiny run learned: each class is most probable on its own structure
    disk, square, bg = lab == 1, lab == 3, lab == 0
    p_disk, p_square = out.probabilities[1], out.probabilities[2]
    assert p_disk[disk].mean() > p_disk[square | bg].mean() + 0.1
    assert p_square[square].mean() > p_square[disk | bg].mean() + 0.1
    assert (out.mask[disk] == 1).mean() > 0.8 and (out.mask[square] == 3).mean() > 0.8
    assert (out.mask[bg] == 0).mean() > 0.7
    assert out.entropy.max() > math.log(2)   # three-way doubt, possible only with C = 3
    # the folder prediction names the classes and writes all of them
    capsys.readouterr()
    assert main(["nnunet", "predict", "--dataset-id", "8", "--input", str(root / "images"),
                 "-o", str(tmp_path / "pred"), "--device", "cpu", "--no-mirroring",
                 *folder_flags(root)]) == 0
    assert "Classes in the masks (value=name, also in ensemble.json): 1=disk, 3=square" \
        in capsys.readouterr().out
    assert len((tmp_path / "pred" / "uncertainty_ranking.csv").read_text().splitlines()) == 7
    info = json.loads((tmp_path / "pred" / "ensemble.json").read_text())
    assert info["classes"] == ["background", "disk", "square"]
    assert info["labels"] == {"disk": 1, "square": 3}
    assert info["entropy"]["max"] == pytest.approx(math.log(3))
    probs = tifffile.imread(tmp_path / "pred" / "class_probabilities" / "case0.tif")
    np.testing.assert_allclose(probs, out.probabilities, atol=1e-5)
    np.testing.assert_allclose(tifffile.imread(tmp_path / "pred" / "probability" / "case0.tif"),
                               1 - out.probabilities[0], atol=1e-5)
    np.testing.assert_array_equal(iio.imread(tmp_path / "pred" / "masks" / "case0.png"),
                                  out.mask)


def test_a_seed_repeats_the_training_and_another_seed_does_not(tmp_path):
    """``--seed`` with ``--data-workers 0`` on the CPU: the same checkpoints to the bit;
    another seed gives other weights (so the first equality is the seed's doing)."""
    make_folder(tmp_path, n=4)
    assert main(["nnunet", "export", "--images", str(tmp_path / "images"), "--masks",
                 str(tmp_path / "masks"), "--dataset-id", "9", "--name", "Seeded", "--out",
                 str(tmp_path / "raw"), "--label-name", "disk", "--no-verify"]) == 0
    folders = job.NnUNetFolders.resolve(tmp_path / "raw", tmp_path / "pre", tmp_path / "res")
    weights = []
    for i, seed in enumerate((3, 3, 4)):
        assert main(["nnunet", "train", "--dataset-id", "9", "--epochs", "1", "--cycles", "1",
                     "--checkpoints-per-cycle", "1", "--iterations-per-epoch", "2",
                     "--val-iterations-per-epoch", "1", "--device", "cpu",
                     "--data-workers", "0", "--seed", str(seed), "--wait",
                     *(["--restart"] if i else []), *folder_flags(tmp_path)]) == 0
        assert json.loads((job.job_dir_for(folders, 9) / "job.json").read_text())["seed"] == seed
        [member] = list_checkpoints(job.model_dir_for(folders, 9))
        weights.append(load_checkpoint_file(member)["network_weights"])
    first, again, other = weights
    assert first.keys() == again.keys() == other.keys()
    assert all(np.array_equal(first[k].numpy(), again[k].numpy()) for k in first)
    assert not all(np.array_equal(first[k].numpy(), other[k].numpy()) for k in first)
