"""Hostile and careless inputs to ``medclipsam nnunet``: each case asserts the exact one-line
error (exit status 2, no traceback), that every file the user had is unchanged (by hash; the
datasets' empty lock files aside) and that nothing half-written is left behind.

The world of each case: images + masks (2 pairs), a raw folder with Dataset005_Faults, and a
results folder with the model folder of Dataset005 (plans.json, dataset.json and a
``fold_all/`` to resume), into which the cases put their hostile checkpoints.
"""

import hashlib
import json
import os
import pickle
import shlex
import shutil
import subprocess
import sys

import imageio.v3 as iio
import numpy as np
import psutil
import pytest
import torch

from napari_medclipsam.cli import main
from napari_medclipsam.nnunet import job
from napari_medclipsam.nnunet.export import JOURNAL

MODEL = "res/Dataset005_Faults/nnUNetTrainerCheckpointEnsemble__nnUNetPlans__2d"
UNSAFE = "refused: the file contains Python objects, not only weights; it may be unsafe"
ERR = "medclipsam nnunet: error: "


class Payload:
    """What a malicious pickle runs when it is unpickled (it never should be)."""

    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def pairs(folder, n=2, size=32, mask_size=None, values=(1,)):
    (folder / "img").mkdir(parents=True, exist_ok=True)
    (folder / "msk").mkdir(exist_ok=True)
    for i in range(n):
        rng = np.random.default_rng(i)
        img = rng.integers(0, 255, (size, size)).astype(np.uint8)
        m = mask_size or size
        mask = np.zeros((m, m), np.uint8)
        for k, v in enumerate(values):
            mask[2 + 6 * k:6 + 6 * k, 4:12] = v
        iio.imwrite(folder / "img" / f"c{i}.png", img)
        iio.imwrite(folder / "msk" / f"c{i}.png", mask)


@pytest.fixture
def world(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.delenv(name, raising=False)
    pairs(tmp_path / "in")
    assert main(["nnunet", "export", "--images", "in/img", "--masks", "in/msk",
                 "--dataset-id", "5", "--name", "Faults", "--out", "raw", "--no-verify"]) == 0
    model = tmp_path / MODEL
    (model / "fold_all").mkdir(parents=True)
    shutil.copy(tmp_path / "raw/Dataset005_Faults/dataset.json", model / "dataset.json")
    (model / "plans.json").write_text("{}")
    (tmp_path / "pre").mkdir()
    (tmp_path / "out").mkdir()
    return tmp_path


def digest(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()
            and not p.name.endswith((".medclipsam.lock", ".medclipsam_job.lock",
                                     ".medclipsam_job.start.lock"))}


FOLDERS = ["--raw", "raw", "--preprocessed", "pre", "--results", "res"]


def predict(checkpoint):
    return ["nnunet", "predict", "--dataset-id", "5", "--input", "in/img", "-o", "out",
            "--device", "cpu", "--checkpoints", checkpoint, *FOLDERS]


def export(*extra, images="in/img", masks="in/msk", out="raw"):
    return ["nnunet", "export", "--images", images, "--masks", masks, "--dataset-id", "6",
            "--name", "New", "--out", out, "--no-verify", *extra]


# ---- setups: each writes its hostile input into the world and returns (argv, expected line)


def evil_checkpoint(w):
    torch.save({"network_weights": {}, "payload": Payload()}, w / "evil.pth")
    return predict("evil.pth"), f"evil.pth: {UNSAFE}. Use a checkpoint this training wrote."


def plain_pickle_checkpoint(w):
    (w / "plain.pth").write_bytes(pickle.dumps({"payload": Payload()}))
    return predict("plain.pth"), f"plain.pth: {UNSAFE}. Use a checkpoint this training wrote."


def missing_checkpoint(w):
    return predict("gone.pth"), "Checkpoint gone.pth does not exist."


def folder_as_checkpoint(w):
    return predict("in"), "Checkpoint in is not a file."


def truncated_checkpoint(w):
    torch.save({"network_weights": {"w": torch.zeros(64)}}, w / "whole.pth")
    data = (w / "whole.pth").read_bytes()
    (w / "half.pth").write_bytes(data[: len(data) // 2])
    return predict("half.pth"), ("half.pth is not a readable PyTorch checkpoint (truncated, "
                                 "damaged or another kind of file).")


def empty_checkpoint(w):
    (w / "empty.pth").write_bytes(b"")
    return predict("empty.pth"), ("empty.pth is not a readable PyTorch checkpoint (truncated, "
                                  "damaged or another kind of file).")


def text_as_checkpoint(w):
    (w / "notes.pth").write_text("these are not weights\n")
    return predict("notes.pth"), ("notes.pth is not a readable PyTorch checkpoint "
                                  "(truncated, damaged or another kind of file).")


def weights_without_network(w):
    torch.save({"w": torch.zeros(3)}, w / "other.pth")
    return predict("other.pth"), ("other.pth is not an nnU-Net checkpoint (no network "
                                  "weights in it).")


def evil_resume_checkpoint(w):
    latest = w / MODEL / "fold_all" / "checkpoint_latest.pth"
    torch.save({"network_weights": {}, "payload": Payload()}, latest)
    return (["nnunet", "train", "--dataset-id", "5", "--resume", "--device", "cpu", *FOLDERS],
            f"{latest.resolve()}: {UNSAFE}. Use a checkpoint this training wrote.")


def out_is_a_file(w):
    (w / "raw.txt").write_text("not a folder")
    return export(out="raw.txt"), ("raw.txt is a file, not a folder: give nnU-Net's raw "
                                   "folder (a folder; it is created if missing).")


def out_inside_a_file(w):
    (w / "raw.txt").write_text("not a folder")
    return export(out="raw.txt/raw"), ("raw.txt/raw cannot be created here: raw.txt is a "
                                       "file, not a folder.")


def path_traversal_name(w):
    return (["nnunet", "export", "--images", "in/img", "--masks", "in/msk", "--dataset-id",
             "6", "--name", "../../evil", "--out", "raw"],
            "The dataset name may hold letters, digits, '_' and '-' only; got '../../evil'.")


def dataset_id_out_of_range(w):
    return (["nnunet", "export", "--images", "in/img", "--masks", "in/msk", "--dataset-id",
             "1000", "--name", "Big", "--out", "raw"],
            "The dataset ID must be an integer from 1 to 999; got 1000.")


def append_with_another_name(w):
    return (["nnunet", "export", "--images", "in/img", "--masks", "in/msk", "--dataset-id",
             "5", "--name", "Other", "--out", "raw", "--append", "--no-verify"],
            "Dataset ID 5 is Dataset005_Faults, not Dataset005_Other: use its name or another "
            "ID.")


def mask_of_another_size(w):
    pairs(w / "odd", mask_size=16)
    return (export(images="odd/img", masks="odd/msk"),
            "c0: the mask is 16x16 but the image 32x32: give each image its own mask.")


def empty_masks_folder(w):
    (w / "nomasks").mkdir()
    return (export(masks="nomasks"),
            "2 of 2 images have no mask in nomasks (matched by name, e.g. case.png <-> "
            "case.png or case_mask.png): c0.png, c1.png.")


def every_mask_empty(w):
    pairs(w / "blank", values=())
    return (export(images="blank/img", masks="blank/msk"),
            "Every mask is empty: paint (or segment) the target before exporting.")


def label_outside_the_table(w):
    pairs(w / "multi", values=(1, 7))
    return (export("--labels", "1=lung", images="multi/img", masks="multi/msk"),
            "c0: label value(s) 7 are not in the label table (1=lung): name them or erase "
            "them.")


def missing_images_folder(w):
    return export(images="nowhere"), "The images folder nowhere does not exist."


def damaged_journal(w):
    (w / "raw/Dataset005_Faults" / JOURNAL).write_text("{not json")
    return (["nnunet", "export", "--images", "in/img", "--masks", "in/msk", "--dataset-id",
             "5", "--name", "Faults", "--out", "raw", "--append", "--no-verify"],
            f"raw/Dataset005_Faults/{JOURNAL} is not a journal this tool wrote (Expecting "
            "property name enclosed in double quotes: line 1 column 2 (char 1)): look at it, "
            "and remove it by hand once the dataset is as it should be.")


def _status(w, **fields):
    job_dir = w / "res/Dataset005_Faults/medclipsam_job"
    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / "status.json").write_text(json.dumps({"phase": "training", **fields}))
    return ["nnunet", "cancel", "--dataset-id", "5", *FOLDERS]


def cancel_pid_1_without_start_time(w):
    return (_status(w, pid=1),
            "Refused to stop pid 1: status.json records no start time for pid 1, so it cannot "
            "be told apart from another program that got the same pid. Nothing was signalled.")


def cancel_this_process_without_start_time(w):
    pid = os.getpid()
    return (_status(w, pid=pid),
            f"Refused to stop pid {pid}: status.json records no start time for pid {pid}, so "
            "it cannot be told apart from another program that got the same pid. Nothing was "
            "signalled.")


def cancel_this_process_with_its_start_time(w):
    me = psutil.Process()
    shown = shlex.join(me.cmdline())
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return (_status(w, pid=me.pid, create_time=me.create_time(), pgid=os.getpgid(0)),
            f"Refused to stop pid {me.pid}: pid {me.pid} runs {shown!r}, not this job. Nothing "
            "was signalled.")


CASES = [evil_checkpoint, plain_pickle_checkpoint, missing_checkpoint, folder_as_checkpoint,
         truncated_checkpoint, empty_checkpoint, text_as_checkpoint, weights_without_network,
         evil_resume_checkpoint, out_is_a_file, out_inside_a_file, path_traversal_name,
         dataset_id_out_of_range, append_with_another_name, mask_of_another_size,
         empty_masks_folder, every_mask_empty, label_outside_the_table, missing_images_folder,
         damaged_journal, cancel_pid_1_without_start_time,
         cancel_this_process_without_start_time, cancel_this_process_with_its_start_time]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_a_hostile_input_gets_one_line_and_changes_nothing(world, case, capsys):
    argv, expected = case(world)
    before = digest(world)
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and "weights_only" not in err
    assert err.strip().splitlines()[-1] == ERR + expected
    assert digest(world) == before
    assert not (world / "PWNED").exists()            # no pickle ran
    assert [p.name for p in world.rglob("*") if ".partial-" in p.name] == []
    assert psutil.pid_exists(1)


def test_a_read_only_raw_folder_gets_one_line(tmp_path):
    """A really read-only folder: bind-mounted read-only in a private mount namespace (as
    root, where permissions do not stop writes), else a folder without write permission."""
    pairs(tmp_path / "in")
    ro = tmp_path / "ro"
    ro.mkdir()
    argv = [sys.executable, "-m", "napari_medclipsam.cli", "nnunet", "export", "--images",
            "in/img", "--masks", "in/msk", "--dataset-id", "5", "--name", "T", "--out", "ro"]
    if os.geteuid() == 0:
        if not shutil.which("unshare"):
            pytest.skip("root without unshare: cannot make a read-only folder")
        argv = ["unshare", "-rm", "sh", "-c", 'mount --bind "$1" "$1" && mount -o '
                'remount,bind,ro "$1" "$1" && shift && exec "$@"', "sh", str(ro), *argv]
    else:
        ro.chmod(0o555)
    before = digest(tmp_path)
    proc = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True)
    if "unshare" in proc.stderr or "mount:" in proc.stderr:
        pytest.skip(f"no private read-only mount here: {proc.stderr.strip()}")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line in (ERR + "Cannot write in ro (Read-only file system): choose a folder you "
                          "can write to.",
                    ERR + "Cannot write in ro (Permission denied): choose a folder you can "
                          "write to.")
    assert digest(tmp_path) == before and list(ro.iterdir()) == []


def test_cancel_leaves_a_live_process_it_cannot_verify_alone(world, capsys):
    """A finished job whose pid now names another program: nothing is signalled."""
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        job_dir = world / "res/Dataset005_Faults/medclipsam_job"
        job_dir.mkdir(parents=True)
        (job_dir / "status.json").write_text(json.dumps(
            {"phase": "training", "pid": other.pid, "create_time": 1000.0}))
        assert job.read_status(job_dir)["phase"] == "crashed"
        assert main(["nnunet", "cancel", "--dataset-id", "5", *FOLDERS]) == 0
        assert capsys.readouterr().out.strip() == (
            f"No training of this dataset is running; pid {other.pid} named in status.json "
            "now belongs to another program (it started at another time) and was left alone.")
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()
