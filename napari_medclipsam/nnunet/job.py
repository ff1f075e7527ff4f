"""Planning, preprocessing and training as a background process that outlives napari.

One job per dataset, in ``$nnUNet_results/Dataset{ID}_{Name}/medclipsam_job/``::

    job.json       what to run: dataset, configuration, schedule, folders, device
    status.json    phase, epoch, cycle, loss, pseudo-Dice, ETA, checkpoints, pid, error
    log.txt        everything the process printed (nnU-Net's own log is in fold_all/)

Phases: ``starting`` -> ``planning`` -> ``preprocessing`` -> ``training`` -> ``done``, or
``failed`` (with ``error``) or ``cancelled``. A job whose status says it is running but whose
process is gone (a crash, a reboot) reads as ``crashed``. :func:`cancel` kills the whole
process tree (nnU-Net's data-augmentation workers included); :func:`start_training` with
``resume=True`` continues a cancelled, crashed or failed run from its last finished epoch.

The process is ``python -m napari_medclipsam.nnunet.job JOB_DIR``, started in its own session
(process group), with nnU-Net's folders and ``nnUNet_extTrainer`` in its environment.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import InputError
from .schedule import SCHEDULE_ENV, EnsembleSchedule

JOB_FOLDER = "medclipsam_job"
TRAINER_NAME = "nnUNetTrainerCheckpointEnsemble"
PLANS = "nnUNetPlans"
FOLD = "all"
JOB_DIR_ENV = "MEDCLIPSAM_NNUNET_JOB_DIR"
RUNNING_PHASES = ("starting", "planning", "preprocessing", "training")
_BARE_TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d [\d:.]+:\s*$")
ENV_NAMES = {"raw": "nnUNet_raw", "preprocessed": "nnUNet_preprocessed",
             "results": "nnUNet_results"}


@dataclass(frozen=True)
class NnUNetFolders:
    """nnU-Net's three folders (raw data, preprocessed data, trained models)."""

    raw: Path
    preprocessed: Path
    results: Path

    @classmethod
    def resolve(cls, raw=None, preprocessed=None, results=None) -> NnUNetFolders:
        """Folders from the arguments, else from ``$nnUNet_raw``, ``$nnUNet_preprocessed``,
        ``$nnUNet_results``."""
        given = {"raw": raw, "preprocessed": preprocessed, "results": results}
        out = {}
        for key, value in given.items():
            value = value or os.environ.get(ENV_NAMES[key])
            if not value:
                raise InputError(
                    f"nnU-Net's {key} folder is not set: pass --{key} DIR or set "
                    f"{ENV_NAMES[key]} (see nnU-Net's documentation/setting_up_paths.md).")
            out[key] = Path(value).expanduser().resolve()
        return cls(**out)

    def env(self) -> dict[str, str]:
        return {ENV_NAMES[k]: str(getattr(self, k)) for k in ENV_NAMES}


def dataset_name_for(folders: NnUNetFolders, dataset_id: int) -> str:
    """``Dataset{ID:03d}_{Name}`` as found in the raw, preprocessed or results folder."""
    from .export import find_dataset

    for base in (folders.raw, folders.preprocessed, folders.results):
        found = find_dataset(base, dataset_id)
        if found is not None:
            return found.name
    raise InputError(f"No Dataset{dataset_id:03d}_* in {folders.raw}: export the "
                     f"pseudo-labels first (medclipsam nnunet export).")


def job_dir_for(folders: NnUNetFolders, dataset_id: int) -> Path:
    return folders.results / dataset_name_for(folders, dataset_id) / JOB_FOLDER


def model_dir_for(folders: NnUNetFolders, dataset_id: int, configuration: str = "2d") -> Path:
    """The trainer's output folder (holds plans.json, dataset.json and ``fold_all/``)."""
    return (folders.results / dataset_name_for(folders, dataset_id)
            / f"{TRAINER_NAME}__{PLANS}__{configuration}")


# --------------------------------------------------------------------------- status


def _write_json(path: Path, data: dict) -> None:
    from ..core.io import write_text

    write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def update_status(job_dir: str | Path, **fields) -> dict:
    """Merge ``fields`` into ``status.json`` (atomically) and return the new status."""
    path = Path(job_dir) / "status.json"
    status = _read_json(path)
    status.update(fields, updated=time.time())
    _write_json(path, status)
    return status


def _read_json(path: Path) -> dict:
    for _ in range(3):
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except json.JSONDecodeError:
            time.sleep(0.05)
    return {}


def _alive(pid: int | None, create_time: float | None) -> bool:
    if not pid:
        return False
    try:
        import psutil

        proc = psutil.Process(pid)
        if create_time is not None and abs(proc.create_time() - create_time) > 1.0:
            return False   # the pid was reused by another program
        return proc.status() != psutil.STATUS_ZOMBIE
    except Exception:
        return False


def read_status(job_dir: str | Path, log_lines: int = 20) -> dict:
    """The job's status with ``running`` (bool) and ``log_tail`` (last lines of log.txt).

    A status that claims a running phase whose process is gone reads as ``crashed``.
    """
    job_dir = Path(job_dir)
    status = _read_json(job_dir / "status.json")
    if not status:
        return {"phase": "none", "running": False, "log_tail": ""}
    running = _alive(status.get("pid"), status.get("create_time"))
    if status.get("phase") in RUNNING_PHASES and not running:
        status["phase"] = "crashed"
    status["running"] = running and status.get("phase") in RUNNING_PHASES
    status["log_tail"] = tail(job_dir / "log.txt", log_lines)
    return status


def format_eta(seconds: float | None) -> str:
    """``3 h 05 min``, ``12 min 40 s`` or ``9 s`` ('' when unknown)."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return ""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600} h {(s % 3600) // 60:02d} min"
    if s >= 60:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s} s"


def format_status(status: dict, sep: str = " | ", details: bool = False) -> str:
    """One line: phase, epoch e/E, cycle c/D, loss, pseudo-Dice, ETA (known parts only);
    with ``details`` also the learning rate, the ensemble checkpoints so far and the error."""
    parts = [status.get("phase", "none")]
    if status.get("epochs"):
        parts.append(f"epoch {status.get('epoch') or 0}/{status['epochs']}")
    if status.get("cycles"):
        parts.append(f"cycle {status.get('cycle') or 0}/{status['cycles']}")
    if status.get("train_loss") is not None:
        parts.append(f"loss {status['train_loss']:.4f}")
    if status.get("pseudo_dice") is not None:
        parts.append(f"pseudo-Dice {status['pseudo_dice']:.3f}")
    if details and status.get("lr") is not None:
        parts.append(f"lr {status['lr']:.2e}")
    eta = format_eta(status.get("eta_s")) if status.get("running") else ""
    if eta:
        parts.append(f"ETA {eta}")
    if details and status.get("checkpoints"):
        parts.append(f"{len(status['checkpoints'])} ensemble checkpoints")
    if details and status.get("error"):
        parts.append(f"error: {status['error']}")
    return sep.join(parts)


def tail(path: Path, lines: int = 20) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            text = f.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""
    # progress bars rewrite their line with \r: keep the last state of each line; drop
    # nnU-Net's empty log lines (a bare timestamp)
    rows = [row.split("\r")[-1] for row in text.splitlines()]
    rows = [r for r in rows if r.strip() and not _BARE_TIMESTAMP.match(r)]
    return "\n".join(rows[-lines:]) if lines > 0 else ""


# --------------------------------------------------------------------------- start / cancel


def start_training(dataset_id: int, schedule: EnsembleSchedule, *,
                   folders: NnUNetFolders, configuration: str = "2d", device: str = "auto",
                   resume: bool = False, restart: bool = False, data_workers: int | None = None,
                   preprocess_workers: int = 2) -> Path:
    """Start planning, preprocessing and training in a background process; return the job dir.

    Parameters
    ----------
    dataset_id : int
        A dataset exported to ``folders.raw``.
    schedule : EnsembleSchedule
    configuration : str
        nnU-Net configuration: "2d" (the paper's) or "3d_fullres".
    device : str
        "auto" (CUDA, then MPS, then CPU), "cuda", "mps" or "cpu".
    resume : bool
        Continue a cancelled, crashed or failed run of this dataset from its last epoch.
    restart : bool
        Delete this dataset's previous training of our trainer and start over.
    data_workers : int, optional
        nnU-Net's data-augmentation processes (``nnUNet_n_proc_DA``); 0 runs augmentation in
        the training process. Default: nnU-Net's choice.

    Raises
    ------
    InputError
        A job is running already; a previous run exists and neither resume nor restart was
        asked for; nothing to resume.
    """
    if resume and restart:
        raise InputError("resume and restart exclude each other.")
    if configuration not in ("2d", "3d_fullres", "3d_lowres"):
        raise InputError(f"Unknown configuration {configuration!r}: use 2d or 3d_fullres.")
    if device not in ("auto", "cpu", "cuda", "mps"):
        raise InputError(f"Unknown device {device!r}: use auto, cpu, cuda or mps.")
    name = dataset_name_for(folders, dataset_id)
    job_dir = folders.results / name / JOB_FOLDER
    model_dir = model_dir_for(folders, dataset_id, configuration)
    status = read_status(job_dir)
    if status["running"]:
        raise InputError(f"A training of {name} is running already (pid {status.get('pid')}): "
                         "watch it with status, or cancel it first.")
    has_previous = (model_dir / f"fold_{FOLD}").is_dir()
    if resume:
        if not has_previous:
            raise InputError(f"Nothing to resume: no training of {name} in {model_dir}.")
        if status.get("phase") == "done":
            raise InputError(f"The training of {name} is finished already: predict with it, or "
                             "start over with restart.")
        old = saved_schedule(job_dir)
        if old is not None and old != schedule:
            raise InputError(f"The run was started with {old}; "
                             "resume it with the same schedule (or start over with restart).")
    elif has_previous and not restart:
        raise InputError(f"{name} has a training already ({model_dir}): resume it, or start "
                         "over with restart (deletes it), or export to a new dataset ID.")
    if restart:
        import shutil

        shutil.rmtree(model_dir, ignore_errors=True)
        shutil.rmtree(job_dir, ignore_errors=True)
    job_dir.mkdir(parents=True, exist_ok=True)
    job = {"dataset_id": dataset_id, "dataset_name": name, "configuration": configuration,
           "schedule": json.loads(schedule.to_json()), "device": device, "resume": resume,
           "folders": {k: str(v) for k, v in folders.env().items()},
           "preprocess_workers": preprocess_workers, "data_workers": data_workers,
           "trainer": TRAINER_NAME,
           "model_dir": str(model_dir)}
    _write_json(job_dir / "job.json", job)
    env = dict(os.environ)
    env.update(folders.env())
    env["nnUNet_extTrainer"] = os.pathsep.join(
        p for p in (_trainer_path(), os.environ.get("nnUNet_extTrainer")) if p)
    env[SCHEDULE_ENV] = schedule.to_json()
    env[JOB_DIR_ENV] = str(job_dir)
    env["PYTHONUNBUFFERED"] = "1"
    log = open(job_dir / "log.txt", "ab")  # noqa: SIM115 (handed to the child)
    log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} "
              f"{'resume' if resume else 'start'} {name}\n".encode())
    log.flush()
    kept = {k: status[k] for k in ("epoch", "cycle", "train_losses", "checkpoints", "lr",
                                   "train_loss", "pseudo_dice") if resume and k in status}
    _write_json(job_dir / "status.json", {
        "phase": "starting", "dataset": name, "epoch": 0, "epochs": schedule.epochs,
        "cycle": 0, "cycles": schedule.cycles, "started": time.time(), "updated": time.time(),
        **kept})
    kwargs = {"start_new_session": True} if os.name == "posix" else {
        "creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
    proc = subprocess.Popen([sys.executable, "-m", "napari_medclipsam.nnunet.job", str(job_dir)],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=env, close_fds=True, **kwargs)
    log.close()
    update_status(job_dir, pid=proc.pid, create_time=_create_time(proc.pid))
    return job_dir


def _trainer_path() -> str:
    # The trainer module imports torch and nnU-Net: compute its folder without importing it.
    return str(Path(__file__).with_name("trainers"))


def _create_time(pid: int) -> float | None:
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:
        return None


def cancel(job_dir: str | Path, timeout: float = 10.0) -> bool:
    """Stop the job's whole process tree (SIGTERM, then SIGKILL); return True if it ran.

    The last finished epoch is kept: resume continues from there.
    """
    import psutil

    job_dir = Path(job_dir)
    status = read_status(job_dir)
    if not status["running"]:
        return False
    pid = int(status["pid"])
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    if os.name == "posix":
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)   # the job leads its own process group
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    if os.name == "posix":
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=timeout)
    update_status(job_dir, phase="cancelled", cancelled=time.time())
    return True


def saved_schedule(job_dir: str | Path) -> EnsembleSchedule | None:
    """The schedule a job was started with (what ``resume`` must be given), if any."""
    data = _read_json(Path(job_dir) / "job.json").get("schedule")
    return EnsembleSchedule(**data) if data else None


def wait(job_dir: str | Path, timeout: float | None = None, poll: float = 0.5) -> dict:
    """Block until the job is no longer running (or ``timeout`` s); return its status."""
    end = None if timeout is None else time.monotonic() + timeout
    while True:
        status = read_status(job_dir)
        if not status["running"]:
            return status
        if end is not None and time.monotonic() > end:
            return status
        time.sleep(poll)


# --------------------------------------------------------------------------- the process


def pick_device(name: str):
    """``auto``/``cpu``/``cuda``/``mps`` -> torch.device (the package's device choice)."""
    import torch

    from ..core.models import resolve_device

    return torch.device(resolve_device(name))


def _plan_and_preprocess(job: dict, job_dir: Path) -> None:
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints,
        plan_experiments,
        preprocess,
    )

    did = int(job["dataset_id"])
    workers = int(job.get("preprocess_workers", 2))
    update_status(job_dir, phase="planning")
    extract_fingerprints([did], num_processes=workers, check_dataset_integrity=True,
                         clean=True, verbose=False, show_progress_bar=False)
    plan_experiments([did])
    update_status(job_dir, phase="preprocessing")
    preprocess([did], configurations=(job["configuration"],), num_processes=(workers,),
               verbose=False, show_progress_bar=False)


def _run(job_dir: Path) -> int:
    job = json.loads((job_dir / "job.json").read_text())
    try:
        device = pick_device(job["device"])
        import torch

        if device.type == "cpu":
            torch.set_num_threads(max(1, os.cpu_count() or 1))
            os.environ.setdefault("nnUNet_compile", "false")
        prep = (Path(job["folders"]["nnUNet_preprocessed"]) / job["dataset_name"]
                / f"{PLANS}.json")
        if not (job["resume"] and prep.is_file()):
            _plan_and_preprocess(job, job_dir)
        update_status(job_dir, phase="training", device=str(device))
        if job.get("data_workers") is not None:
            # Only now: nnU-Net's planner also reads it and fails on 0.
            os.environ["nnUNet_n_proc_DA"] = str(int(job["data_workers"]))
        from nnunetv2.run.run_training import run_training

        run_training(str(job["dataset_id"]), job["configuration"], FOLD,
                     trainer_class_name=TRAINER_NAME, plans_identifier=PLANS,
                     continue_training=bool(job["resume"]), device=device)
    except BaseException as exc:   # the status must say why it stopped
        traceback.print_exc()
        update_status(job_dir, phase="failed", error=f"{type(exc).__name__}: {exc}")
        return 1
    update_status(job_dir, phase="done", finished=time.time(), eta_s=0)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m napari_medclipsam.nnunet.job JOB_DIR", file=sys.stderr)
        return 2
    return _run(Path(argv[0]))


if __name__ == "__main__":
    sys.exit(main())
