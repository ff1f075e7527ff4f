"""``medclipsam nnunet predict --scheduler``: the ensemble prediction shared out over a Dask
cluster writes the files a run on this machine writes, byte for byte; a bad case is recorded
and the others go on; a wrong or unreachable scheduler is one line.

The model is tiny and untrained (no nnU-Net training: two checkpoints of a 3-stage U-Net with
random weights, written as the trainer writes them), so a test costs seconds; the outputs
are noisy maps, which is what a byte comparison wants.
"""

import json
import shutil
import time

import imageio.v3 as iio
import numpy as np
import pytest

from napari_medclipsam import cluster
from napari_medclipsam.cli import main

pytestmark = pytest.mark.timeout(300)

PLANS = {
    "dataset_name": "Dataset009_Dask", "plans_name": "nnUNetPlans",
    "original_median_spacing_after_transp": [999.0, 1.0, 1.0],
    "original_median_shape_after_transp": [1, 48, 48],
    "image_reader_writer": "NaturalImage2DIO",
    "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
    "configurations": {"2d": {
        "data_identifier": "nnUNetPlans_2d", "preprocessor_name": "DefaultPreprocessor",
        "batch_size": 2, "patch_size": [48, 48], "median_image_size_in_voxels": [48.0, 48.0],
        "spacing": [1.0, 1.0], "normalization_schemes": ["ZScoreNormalization"],
        "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0,
                                      "force_separate_z": None},
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0,
                                     "force_separate_z": None},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                               "force_separate_z": None},
        "architecture": {
            "network_class_name":
                "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {
                "n_stages": 3, "features_per_stage": [8, 16, 32],
                "conv_op": "torch.nn.modules.conv.Conv2d",
                "kernel_sizes": [[3, 3]] * 3, "strides": [[1, 1], [2, 2], [2, 2]],
                "n_conv_per_stage": [2, 2, 2], "n_conv_per_stage_decoder": [2, 2],
                "conv_bias": True,
                "norm_op": "torch.nn.modules.instancenorm.InstanceNorm2d",
                "norm_op_kwargs": {"eps": 1e-05, "affine": True},
                "dropout_op": None, "dropout_op_kwargs": None,
                "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}},
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
        "batch_dice": True}},
    "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
    "foreground_intensity_properties_per_channel": {"0": {
        "max": 255.0, "mean": 150.0, "median": 150.0, "min": 0.0, "percentile_00_5": 10.0,
        "percentile_99_5": 250.0, "std": 40.0}},
}


def make_images(folder, n=6, size=48, seed=0):
    """Images of different sizes with a bright disk each (and their masks, for the export)."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    for i in range(n):
        h, w = size + 4 * i, size + 2 * (i % 3)
        yy, xx = np.mgrid[:h, :w]
        cy, cx = rng.integers(14, size - 14, 2)
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 < 9 ** 2
        img = (rng.normal(60, 20, (h, w)) + 120 * mask).clip(0, 255).astype(np.uint8)
        iio.imwrite(folder / "images" / f"case{i}.png", img)
        iio.imwrite(folder / "masks" / f"case{i}.png", mask.astype(np.uint8) * 255)


def flags(root):
    return ["--raw", str(root / "raw"), "--preprocessed", str(root / "pre"),
            "--results", str(root / "res")]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A raw dataset (exported as users do) and a model folder with two random checkpoints."""
    import torch
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from napari_medclipsam.nnunet.trainer import nnUNetTrainerCheckpointEnsemble

    root = tmp_path_factory.mktemp("nnunet_dask")
    make_images(root)
    assert main(["nnunet", "export", "--images", str(root / "images"), "--masks",
                 str(root / "masks"), "--dataset-id", "9", "--name", "Dask", "--out",
                 str(root / "raw"), "--no-verify"]) == 0
    (root / "pre").mkdir()
    folder = root / "res" / "Dataset009_Dask" / \
        "nnUNetTrainerCheckpointEnsemble__nnUNetPlans__2d"
    (folder / "fold_all" / "ensemble").mkdir(parents=True)
    shutil.copy(root / "raw" / "Dataset009_Dask" / "dataset.json", folder / "dataset.json")
    (folder / "plans.json").write_text(json.dumps(PLANS))
    plans = PlansManager(PLANS)
    for epoch in (1, 2):
        torch.manual_seed(epoch)
        net = nnUNetTrainerCheckpointEnsemble.build_network_architecture(
            plans, plans.get_configuration("2d"), 1, 2, enable_deep_supervision=False)
        torch.save({"network_weights": net.state_dict(), "init_args": {"configuration": "2d"},
                    "trainer_name": "nnUNetTrainerCheckpointEnsemble",
                    "inference_allowed_mirroring_axes": (0, 1)},
                   folder / "fold_all" / "ensemble" / f"cycle1_epoch{epoch:04d}.pth")
    return root


@pytest.fixture(scope="module")
def scheduler():
    """One local cluster of two worker processes for the tests that pass its address."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=":0", silence_logs=40) as c:
        yield c.scheduler_address


def predict(root, out, *extra):
    return main(["nnunet", "predict", "--dataset-id", "9", "--input", str(root / "images"),
                 "-o", str(out), "--device", "cpu", *flags(root), *extra])


def files_of(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_a_local_cluster_writes_the_files_of_a_run_here_byte_for_byte(model, tmp_path,
                                                                     monkeypatch, capsys):
    import torch

    # The workers run with one torch thread (--threads-per-worker 1), and so does the run
    # here: a different thread count may split the convolutions' sums differently and change
    # the last bits of the float maps.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0 = time.monotonic()
        assert predict(model, tmp_path / "here") == 0
        here_s = time.monotonic() - t0
    finally:
        torch.set_num_threads(threads)
    here_out = capsys.readouterr().out
    t0 = time.monotonic()
    assert predict(model, tmp_path / "dask", "--scheduler", "local", "--workers", "2",
                   "--threads-per-worker", "1") == 0
    dask_s = time.monotonic() - t0
    out, err = capsys.readouterr()
    assert "Dask: a local cluster of 2 worker(s), 1 torch thread(s) each; dashboard" in err
    assert "2 checkpoint(s) loaded on 2 worker(s) (cpu)" in err
    # the same summary (nnU-Net's own note on CPU devices is printed by the workers there)
    assert out.replace(str(tmp_path / "dask"), "OUT") == "".join(
        line for line in here_out.replace(str(tmp_path / "here"), "OUT").splitlines(True)
        if not line.startswith("perform_everything_on_device"))
    here, dask = tmp_path / "here", tmp_path / "dask"
    names = files_of(here)
    assert names == files_of(dask)
    assert len([n for n in names if n.endswith(".tif")]) == 12 and len(names) == 20
    for name in names:
        if name == "ensemble.json":
            a, b = (json.loads((d / name).read_text()) for d in (here, dask))
            assert a.pop("created") and b.pop("created")
            assert a == b and "failed" not in b
        else:
            assert (here / name).read_bytes() == (dask / name).read_bytes(), name
    print(f"here {here_s:.1f} s, 2 workers {dask_s:.1f} s (cluster start included)")


@pytest.mark.parametrize("where", ["here", "dask"])
def test_a_bad_case_is_recorded_and_the_others_are_written(model, where, tmp_path, capsys,
                                                           request):
    images = tmp_path / "images"
    shutil.copytree(model / "images", images)
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    out = tmp_path / "pred"
    cluster_flags = ["--scheduler", request.getfixturevalue("scheduler")] \
        if where == "dask" else []
    code = main(["nnunet", "predict", "--dataset-id", "9", "--input", str(images), "-o",
                 str(out), "--device", "cpu", "--no-mirroring", *cluster_flags,
                 *flags(model)])
    stdout, err = capsys.readouterr()
    assert code == 1, err
    failures = [line for line in err.splitlines() if "failed" in line]
    assert len(failures) == 1 and failures[0].startswith("broken.png: failed: ")
    assert "1 case(s) failed" in stdout and "broken" in stdout
    assert sorted(p.name for p in (out / "masks").iterdir()) == [f"case{i}.png"
                                                                 for i in range(6)]
    assert len((out / "uncertainty_ranking.csv").read_text().splitlines()) == 7
    info = json.loads((out / "ensemble.json").read_text())
    assert [f["case"] for f in info["failed"]] == ["broken"]
    assert info["failed"][0]["file"] == str((images / "broken.png").resolve())
    assert not list(out.rglob("*.tmp*")) and not list(out.glob(".medclipsam-probe*"))


def test_a_full_disk_stops_the_run_here_in_one_line(model, tmp_path, capsys, monkeypatch):
    """A failure every later case would share is not recorded case by case: the run stops."""
    import errno

    from napari_medclipsam.core import io

    calls = []

    def full(path, *args, **kwargs):
        calls.append(path)
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(io, "write_float_tiff", full)
    out = tmp_path / "pred"
    assert predict(model, out) != 0
    err = [line for line in capsys.readouterr().err.splitlines()
           if not line.startswith("perform_everything")]
    assert len(calls) == 1
    assert [line for line in err if "no space left" in line] == err[-1:], err
    assert not (out / "ensemble.json").exists() and not list(out.rglob("*.tmp*"))


def test_a_scheduler_that_is_not_one_is_refused_in_one_line(model, tmp_path, capsys):
    assert predict(model, tmp_path / "o", "--scheduler", "nonsense") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("medclipsam nnunet: error: --scheduler 'nonsense': give 'local'")
    assert predict(model, tmp_path / "o", "--workers", "2") == 2
    assert capsys.readouterr().err.strip() == \
        "medclipsam nnunet: error: --workers applies with --scheduler."
    assert not (tmp_path / "o").exists()


def test_an_unreachable_scheduler_is_one_line_naming_it(model, tmp_path, capsys, monkeypatch):
    # open_client waits 20 s for a scheduler; nothing listens on port 1, so 1 s shows it
    monkeypatch.setattr(cluster, "CONNECT_TIMEOUT", "1s")
    t0 = time.monotonic()
    assert predict(model, tmp_path / "o", "--scheduler", "tcp://127.0.0.1:1") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("medclipsam nnunet: error: cannot reach the Dask scheduler at "
                          "tcp://127.0.0.1:1 (")
    assert time.monotonic() - t0 < 25
    assert not (tmp_path / "o").exists()


def test_a_checkpoint_the_workers_cannot_load_stops_the_run_before_any_case(model, scheduler,
                                                                            tmp_path, capsys):
    (tmp_path / "notes.pth").write_text("these are not weights\n")
    code = predict(model, tmp_path / "o", "--scheduler", scheduler, "--checkpoints",
                   str(tmp_path / "notes.pth"))
    err = [line for line in capsys.readouterr().err.splitlines()
           if not line.startswith(("Dask:", "INFO", "WARNING"))]
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("medclipsam nnunet: error: on Dask worker tcp://")
    assert err[0].endswith(f"the ensemble did not load on this worker (InputError: "
                           f"{tmp_path / 'notes.pth'} is not a readable PyTorch checkpoint "
                           "(truncated, damaged or another kind of file).)")
    assert list((tmp_path / "o").iterdir()) == []
