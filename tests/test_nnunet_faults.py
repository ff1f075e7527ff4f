"""Fault tests: ``medclipsam nnunet export`` (new and ``--append``) SIGKILLed at every step and at
random moments, two trainings started at the same moment, a training SIGKILLed with its
data-augmentation workers alive.

After each fault the invariants are checked: ``dataset.json`` matches the files present,
nnU-Net's own ``verify_dataset_integrity`` passes, the case list names exactly the cases,
nothing half-written is left (journal, staging folders, temporaries), the next append works;
one training per dataset; a crashed job's workers are found and stopped, and only they.

The kill points are the export's test-only hook ``MEDCLIPSAM_TEST_KILL_AT=POINT[#N]``
(``napari_medclipsam.nnunet.export.FAULT_POINTS``); the random kills need no hook.
"""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import imageio.v3 as iio
import numpy as np
import psutil
import pytest

from napari_medclipsam.nnunet import job
from napari_medclipsam.nnunet.export import (
    APPEND_STAGING,
    CASES_FILE,
    FAULT_POINTS,
    JOURNAL,
    KILL_AT_ENV,
    _verify,
    find_dataset,
)

pytestmark = pytest.mark.timeout(600)


# --------------------------------------------------------------------------- helpers


def write_pairs(folder, start, n, size=32):
    """``n`` image/mask pairs ``c{start}..`` (a bright square on noise) in folder/img, /msk."""
    (folder / "img").mkdir(parents=True, exist_ok=True)
    (folder / "msk").mkdir(exist_ok=True)
    for i in range(start, start + n):
        rng = np.random.default_rng(i)
        mask = np.zeros((size, size), np.uint8)
        y, x = rng.integers(4, size - 14, 2)
        mask[y:y + 10, x:x + 10] = 1
        img = (rng.normal(60, 15, (size, size)) + 120 * mask).clip(0, 255).astype(np.uint8)
        iio.imwrite(folder / "img" / f"c{i}.png", img)
        iio.imwrite(folder / "msk" / f"c{i}.png", mask * 255)
    return folder / "img", folder / "msk"


def cli(*args, env=None, kill_after=None, timeout=180):
    """``python -m napari_medclipsam.cli ARGS`` -> (exit status, stdout, stderr); SIGKILLed
    after ``kill_after`` s if it still runs then."""
    proc = subprocess.Popen([sys.executable, "-m", "napari_medclipsam.cli", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    if kill_after is not None:
        try:
            proc.wait(kill_after)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def export_args(pairs, raw, *extra):
    img, msk = pairs
    return ["nnunet", "export", "--images", img, "--masks", msk, "--dataset-id", 5,
            "--name", "Faults", "--out", raw, *extra]


def digest(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def check_invariants(raw, n_cases, verify=True):
    """The dataset in ``raw`` is whole: files, dataset.json, case list and nnU-Net agree."""
    ds = find_dataset(raw, 5)
    assert ds is not None
    meta = json.loads((ds / "dataset.json").read_text())
    ending = meta["file_ending"]
    images = sorted(p.name[:-len("_0000" + ending)] for p in (ds / "imagesTr").iterdir())
    labels = sorted(p.name[:-len(ending)] for p in (ds / "labelsTr").iterdir())
    assert images == labels
    assert meta["numTraining"] == len(images) == n_cases
    assert sorted(json.loads((ds / CASES_FILE).read_text())) == images
    assert not (ds / JOURNAL).exists() and not (ds / APPEND_STAGING).exists()
    assert [p.name for p in ds.iterdir() if p.name.startswith(".")] == []
    assert [p.name for p in raw.iterdir() if ".partial-" in p.name] == []
    if verify:
        _verify(ds)   # nnU-Net's verify_dataset_integrity (raises if it fails)
    return ds


@pytest.fixture
def base(tmp_path):
    """A raw folder holding Dataset005_Faults with c0..c2, and pairs c3..c5 to append."""
    raw = tmp_path / "raw"
    code, _, err = cli(*export_args(write_pairs(tmp_path / "first", 0, 3), raw, "--no-verify"))
    assert code == 0, err
    return raw, write_pairs(tmp_path / "more", 3, 3), tmp_path


def test_the_kill_points_are_the_documented_ones():
    assert KILL_AT_ENV == "MEDCLIPSAM_TEST_KILL_AT"
    assert {p.split(":")[0] for p in FAULT_POINTS} == {"export", "append"}


# --------------------------------------------------------------------------- append


@pytest.mark.parametrize("point, completed, check", [
    ("append:staged", False, True),    # staged and checked, no journal: nothing changed
    ("append:journal", True, True),    # journal written, nothing moved
    ("append:move#2", True, False),    # two of three labels moved
    ("append:move#4", True, False),    # labels and one image moved: nnU-Net would see 4 of 3
    ("append:cases", True, False),     # case list written, dataset.json not
    ("append:dataset-json", True, False),   # dataset.json written, journal not removed
])
def test_a_killed_append_is_completed_or_rolled_back_by_the_next_run(base, point, completed,
                                                                     check):
    """``check``: the killed append ran nnU-Net's check on its staging folder first (the
    staging then also holds links to the dataset's files); else ``--no-verify`` (faster)."""
    raw, more, tmp = base
    ds = find_dataset(raw, 5)
    before = digest(ds)
    code, _, _ = cli(*export_args(more, raw, "--append", *([] if check else ["--no-verify"])),
                     env={KILL_AT_ENV: point})
    assert code == -signal.SIGKILL
    assert (ds / JOURNAL).exists() == (point != "append:staged")
    # the next run (here: repair; any export, append or train does the same first)
    code, out, err = cli("nnunet", "repair", "--dataset-id", 5, "--raw", raw)
    assert code == 0, err
    if completed:
        assert "Dataset005_Faults: completed an append that was interrupted" in err
        assert "3 case(s): c3, c4, c5" in err
        check_invariants(raw, 6)
    else:
        assert "removed the staging folder of an append that was interrupted" in err
        check_invariants(raw, 3)
        assert digest(ds) == before   # untouched
    # and the next append works
    code, out, err = cli(*export_args(write_pairs(tmp / "last", 6, 2), raw, "--append",
                                      *([] if check else ["--no-verify"])))
    assert code == 0, err
    assert "Added 2 cases" in out and ("integrity check passed" in out) == check
    check_invariants(raw, 8 if completed else 5, verify=False)
    assert cli("nnunet", "repair", "--dataset-id", 5, "--raw", raw)[1].startswith("Nothing")


def test_a_killed_append_whose_files_are_gone_is_rolled_back(base):
    """When the journal's files cannot all be found the append is undone, not guessed."""
    raw, more, tmp = base
    ds = find_dataset(raw, 5)
    before = digest(ds)
    code, _, _ = cli(*export_args(more, raw, "--append", "--no-verify"),
                     env={KILL_AT_ENV: "append:move#4"})
    assert code == -signal.SIGKILL
    (ds / APPEND_STAGING / "imagesTr" / "c5_0000.png").unlink()   # lost before the move
    code, out, err = cli(*export_args(write_pairs(tmp / "last", 6, 1), raw, "--append"))
    assert code == 0, err
    assert "rolled back an append that was interrupted" in err
    assert "export those cases again" in err
    check_invariants(raw, 4, verify=False)   # the append ran nnU-Net's check
    after = digest(ds)
    assert {k: v for k, v in after.items() if "c6" not in k and k not in (
        "dataset.json", CASES_FILE)} == {k: v for k, v in before.items() if k not in (
            "dataset.json", CASES_FILE)}
    assert json.loads((ds / "dataset.json").read_text())["numTraining"] == 4


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_an_append_killed_at_a_random_moment_leaves_all_or_nothing(base, seed):
    raw, more, _ = base
    delay = np.random.default_rng(seed).uniform(0.5, 3.0)   # the append takes ~1-3 s
    cli(*export_args(more, raw, "--append", "--no-verify"), kill_after=delay)
    code, _, err = cli("nnunet", "repair", "--dataset-id", 5, "--raw", raw)
    assert code == 0, err
    ds = find_dataset(raw, 5)
    n = json.loads((ds / "dataset.json").read_text())["numTraining"]
    assert n in (3, 6)            # the three new cases, all or none
    check_invariants(raw, n)


# --------------------------------------------------------------------------- new export


@pytest.mark.parametrize("point", ["export:staged", "export:checked"])
def test_a_killed_new_export_leaves_no_dataset_and_its_staging_goes_next_run(tmp_path, point):
    raw = tmp_path / "raw"
    pairs = write_pairs(tmp_path / "in", 0, 3)
    code, _, _ = cli(*export_args(pairs, raw, *(["--no-verify"] if point == "export:staged"
                                              else [])), env={KILL_AT_ENV: point})
    assert code == -signal.SIGKILL
    assert find_dataset(raw, 5) is None    # nnU-Net sees nothing
    partial = [p.name for p in raw.iterdir() if ".partial-" in p.name]
    assert len(partial) == 1 and partial[0].startswith(".Dataset005_Faults.partial-")
    code, out, err = cli(*export_args(pairs, raw))
    assert code == 0, err
    assert f"Removed the staging folder of an export that was interrupted: {partial[0]}" in err
    check_invariants(raw, 3, verify=False)   # the export ran nnU-Net's check


@pytest.mark.parametrize("seed", [3, 4])
def test_a_new_export_killed_at_a_random_moment_is_whole_or_absent(tmp_path, seed):
    raw = tmp_path / "raw"
    pairs = write_pairs(tmp_path / "in", 0, 3)
    delay = np.random.default_rng(seed).uniform(0.5, 3.0)   # the export takes ~1-3 s
    cli(*export_args(pairs, raw, "--no-verify"), kill_after=delay)
    if find_dataset(raw, 5) is None:
        code, _, err = cli(*export_args(pairs, raw, "--no-verify"))
        assert code == 0, err
    else:
        cli("nnunet", "repair", "--dataset-id", 5, "--raw", raw)
    check_invariants(raw, 3)


def test_a_staging_folder_of_a_live_export_is_left_alone(tmp_path):
    """Only dead processes' staging folders are removed (the pid in the name, checked with
    its start time), and only names of exactly our pattern."""
    raw = tmp_path / "raw"
    raw.mkdir()
    live = raw / f".Dataset009_Other.partial-{os.getpid()}-0123abcd"
    dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True).stdout.strip()
    dead = raw / f".Dataset009_Other.partial-{dead_pid}-89abcdef"
    foreign = raw / f".Dataset009_Other.partial-{dead_pid}-notours"
    for folder in (live, dead, foreign):
        (folder / "imagesTr").mkdir(parents=True)
    code, _, err = cli(*export_args(write_pairs(tmp_path / "in", 0, 2), raw, "--no-verify"))
    assert code == 0, err
    assert live.is_dir() and foreign.is_dir() and not dead.exists()


def test_a_second_writer_is_refused_while_the_dataset_is_locked(base):
    from napari_medclipsam.nnunet.export import dataset_lock

    raw, more, _ = base
    ds = find_dataset(raw, 5)
    before = digest(ds)
    with dataset_lock(raw, 5):
        code, _, err = cli(*export_args(more, raw, "--append", "--no-verify"))
    assert code == 2
    assert err.strip().splitlines()[-1] == (
        f"medclipsam nnunet: error: Dataset005 in {raw} is being written by another export, "
        "append or review right now: wait until it has finished, then try again.")
    assert digest(ds) == before


# --------------------------------------------------------------------------- training


def make_training_data(root, n=4, size=64):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        yy, xx = np.mgrid[:size, :size]
        cy, cx = rng.integers(20, size - 20, 2)
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 < 100
        img = (rng.normal(60, 20, (size, size)) + 120 * mask).clip(0, 255).astype(np.uint8)
        iio.imwrite(root / "images" / f"case{i}.png", img)
        iio.imwrite(root / "masks" / f"case{i}.png", mask.astype(np.uint8) * 255)


@pytest.fixture(scope="module")
def two_starts(tmp_path_factory):
    """Two ``nnunet train`` of one dataset started at the same moment (one augmentation
    worker each, so the job has children); whatever runs is cancelled at the end."""
    root = tmp_path_factory.mktemp("two_starts")
    make_training_data(root)
    flags = ["--raw", root / "raw", "--preprocessed", root / "pre", "--results", root / "res"]
    code, _, err = cli("nnunet", "export", "--images", root / "images", "--masks",
                       root / "masks", "--dataset-id", 3, "--name", "Race", "--out",
                       root / "raw", "--no-verify")
    assert code == 0, err
    train = [sys.executable, "-m", "napari_medclipsam.cli", "nnunet", "train", "--dataset-id",
             "3", "--epochs", "4", "--cycles", "2", "--checkpoints-per-cycle", "1",
             "--iterations-per-epoch", "50", "--val-iterations-per-epoch", "1", "--device",
             "cpu", "--data-workers", "1", *map(str, flags)]
    procs = [subprocess.Popen(train, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = [(p.wait(120), *p.communicate()) for p in procs]
    folders = job.NnUNetFolders.resolve(root / "raw", root / "pre", root / "res")
    job_dir = job.job_dir_for(folders, 3)
    yield results, job_dir, flags
    job.cancel(job_dir)


def test_two_trainings_started_at_once_only_one_runs(two_starts):
    results, job_dir, _ = two_starts
    codes = sorted(r[0] for r in results)
    assert codes == [0, 2], results
    started = next(r for r in results if r[0] == 0)
    refused = next(r for r in results if r[0] == 2)
    assert "Started training in the background" in started[1]
    status = job.read_status(job_dir)
    assert status["running"]
    assert refused[2].strip() == (
        f"medclipsam nnunet: error: A training of Dataset003_Race is running already (pid "
        f"{status['pid']}): watch it with status, or cancel it first.")
    assert job.job_lock_holder(job_dir.parent) == status["pid"]
    # one job of this dataset in the whole system (its forked workers have its command line)
    roots = []
    for p in psutil.process_iter(["cmdline", "ppid"]):
        cmd = p.info["cmdline"] or []
        if job.ENTRY_MODULE in cmd and cmd[-1] == str(job_dir):
            try:
                parent = psutil.Process(p.info["ppid"]).cmdline()
            except psutil.Error:
                parent = []
            if job.ENTRY_MODULE not in parent:
                roots.append(p.pid)
    assert roots == [status["pid"]]


def test_a_killed_jobs_workers_are_found_and_stopped_by_cancel(two_starts):
    _, job_dir, flags = two_starts
    end = time.monotonic() + 300
    seen = None
    while time.monotonic() < end:   # until nnU-Net's augmentation workers run (and settled)
        status = job.read_status(job_dir)
        assert status["running"], status
        pids = sorted(p.pid for p in job.job_processes(job_dir))
        if status["phase"] == "training" and len(pids) >= 3 and pids == seen:
            break
        seen = pids
        time.sleep(1.0)
    else:
        raise AssertionError(f"no workers: {job.read_status(job_dir)}")
    workers = [p for p in job.job_processes(job_dir) if p.pid != status["pid"]]
    os.kill(status["pid"], signal.SIGKILL)          # the job dies, its workers do not
    psutil.wait_procs([psutil.Process(status["pid"])], timeout=10)
    time.sleep(0.5)
    assert all(p.is_running() for p in workers)
    crashed = job.read_status(job_dir)
    assert crashed["phase"] == "crashed" and not crashed["running"]
    assert sorted(crashed["leftovers"]) == sorted(p.pid for p in workers)
    assert job.job_lock_holder(job_dir.parent) is None   # the kernel freed the job's lock
    code, out, _ = cli("nnunet", "status", "--dataset-id", 3, "--lines", 0, *flags)
    assert f"{len(workers)} process(es) of the crashed job still run" in out
    code, _, err = cli("nnunet", "train", "--dataset-id", 3, "--resume", "--device", "cpu",
                       *flags)
    assert code == 2 and "of the crashed training of Dataset003_Race still run" in err
    code, out, err = cli("nnunet", "cancel", "--dataset-id", 3, *flags)
    assert code == 0, err
    assert f"stopped {len(workers)} process(es) the crashed training left" in out
    _, alive = psutil.wait_procs(workers, timeout=15)
    assert not alive
    after = job.read_status(job_dir)
    assert after["phase"] == "crashed" and "leftovers" not in after
    assert sorted(after["leftovers_stopped"]) == sorted(p.pid for p in workers)
    code, out, _ = cli("nnunet", "cancel", "--dataset-id", 3, *flags)
    assert out.strip() == "No training of this dataset is running."


@pytest.mark.parametrize(("phase", "after"), [("training", "cancelled"), ("done", "done")])
def test_stopping_a_verified_job_marks_only_a_running_one_cancelled(tmp_path, phase, after):
    """A job that finished but whose process is still exiting stays 'done' when stopped."""
    job_dir = tmp_path / "medclipsam_job"
    job_dir.mkdir()
    fake = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                             job.ENTRY_MODULE, str(job_dir)])
    try:
        (job_dir / "status.json").write_text(json.dumps(
            {"phase": phase, "pid": fake.pid,
             "create_time": psutil.Process(fake.pid).create_time()}))
        deadline = time.monotonic() + 30  # a process just started may show no command line
        while not psutil.Process(fake.pid).cmdline() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert job.identify_job(job_dir)[0] is not None  # taken for our job: verified
        report = job.stop_job(job_dir)
        assert report.job and fake.pid in report.stopped
        assert fake.wait(timeout=10) is not None
        assert json.loads((job_dir / "status.json").read_text())["phase"] == after
    finally:
        fake.kill()
        fake.wait()
