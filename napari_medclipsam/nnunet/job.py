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

One job per dataset, and only ours are ever signalled
-----------------------------------------------------
* The job process holds ``$nnUNet_results/Dataset{ID}_{Name}/.medclipsam_job.lock`` for its
  whole life (a POSIX record lock: the kernel releases it when the process dies, and the
  job's forked workers do not inherit it). :func:`start_training` holds a second lock
  (``.medclipsam_job.start.lock``) from its checks until the new process has taken the job
  lock, so two starts at the same moment cannot both pass: the second is refused, naming the
  running job's pid. A dead job's lock is free again at once (nothing stale to remove).
* The job records its pid, start time (``create_time``), process group (``pgid``) and command
  line in ``status.json``. Before any signal, a process must prove it is the job: same pid and
  start time, and a command line running this module on this job folder (its workers: in its
  process group, started after it, and running this module or carrying this job's
  ``MEDCLIPSAM_NNUNET_JOB_DIR``). A pid without a recorded start time, or running another
  program, is refused with the reason, and nothing is signalled.
* After a SIGKILL of the job its data-augmentation workers live on: :func:`read_status` lists
  them (``leftovers``) and :func:`cancel` stops them; a new start is refused until they are
  gone.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import select
import shlex
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import InputError
from ..core.runtime import process_create_time, process_matches
from .schedule import SCHEDULE_ENV, EnsembleSchedule

JOB_FOLDER = "medclipsam_job"
TRAINER_NAME = "nnUNetTrainerCheckpointEnsemble"
PLANS = "nnUNetPlans"
FOLD = "all"
JOB_DIR_ENV = "MEDCLIPSAM_NNUNET_JOB_DIR"
RUNNING_PHASES = ("starting", "planning", "preprocessing", "training")
ENTRY_MODULE = "napari_medclipsam.nnunet.job"
JOB_LOCK = ".medclipsam_job.lock"             # beside the job folder: held by the job process
START_LOCK = ".medclipsam_job.start.lock"     # held by start_training while it starts one
READY_FD_ENV = "MEDCLIPSAM_JOB_READY_FD"      # the pipe the new job answers on (ok / busy)
START_TIMEOUT_S = 120.0                       # for the new process to take the job lock
STARTING_GRACE_S = 60.0                       # "starting" without a pid yet, not crashed
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


def _same_path(a, b) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except (OSError, ValueError, TypeError):
        return False


def _is_job_command(cmdline: list[str], job_dir: Path) -> bool:
    """``python -m napari_medclipsam.nnunet.job JOB_DIR`` for this job folder."""
    return (ENTRY_MODULE in cmdline and bool(cmdline)
            and _same_path(cmdline[-1], job_dir))


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def identify_job(job_dir: str | Path, status: dict | None = None):
    """The job's own process, verified: ``(psutil.Process or None, problem or None)``.

    The process named by ``status.json`` counts as the job only if its pid, its start time
    (``create_time``, within a second) and its command line (this module on this job folder)
    all match. ``problem`` says why a live process with that pid is not taken for the job
    when that is not plain: no start time recorded (it cannot be told from another program),
    or the same start time but another command line. A pid that is gone, or that started at
    another time (reused by another program), is (None, None): the job is not running.
    """
    import psutil

    job_dir = Path(job_dir)
    status = _read_json(job_dir / "status.json") if status is None else status
    pid = status.get("pid")
    if not pid:
        return None, None
    try:
        proc = psutil.Process(int(pid))
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None, None
        started = proc.create_time()
    except (psutil.NoSuchProcess, ValueError, TypeError):
        return None, None
    except psutil.Error as exc:
        return None, f"pid {pid} cannot be inspected ({type(exc).__name__})"
    recorded = status.get("create_time")
    if not isinstance(recorded, int | float) or isinstance(recorded, bool):
        return None, (f"status.json records no start time for pid {pid}, so it cannot be told "
                      "apart from another program that got the same pid")
    if abs(started - recorded) > 1.0:
        return None, None   # the pid now belongs to another program: the job is gone
    try:
        cmdline = proc.cmdline()
    except psutil.Error as exc:
        return None, f"the command line of pid {pid} cannot be read ({type(exc).__name__})"
    if not _is_job_command(cmdline, job_dir):
        shown = shlex.join(cmdline)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        return None, f"pid {pid} runs {shown!r}, not this job"
    return proc, None


def _job_member(proc, job_dir: Path, job_started: float | None) -> bool:
    """Whether ``proc`` (in the job's process group or under the job) is one of the job's
    processes: started after the job and running this module on this job folder, or carrying
    this job's folder in its environment (workers started by spawn)."""
    import psutil

    try:
        if proc.pid == os.getpid() or proc.status() == psutil.STATUS_ZOMBIE:
            return False
        if job_started is None or proc.create_time() < job_started - 1.0:
            return False
        if _is_job_command(proc.cmdline(), job_dir):
            return True
        return _same_path(proc.environ().get(JOB_DIR_ENV, ""), job_dir)
    except (psutil.Error, OSError):
        return False


def job_processes(job_dir: str | Path, status: dict | None = None) -> list:
    """Every live process of the job, each verified (:func:`identify_job`, and the workers by
    :func:`_job_member`): the job itself first when it runs, then its children and the rest
    of its process group (workers whose parent died)."""
    import psutil

    job_dir = Path(job_dir)
    status = _read_json(job_dir / "status.json") if status is None else status
    leader, _ = identify_job(job_dir, status)
    started = status.get("create_time")
    if not isinstance(started, int | float) or isinstance(started, bool):
        return []
    found = {}
    if leader is not None:
        found[leader.pid] = leader
        with contextlib.suppress(psutil.Error):
            for child in leader.children(recursive=True):
                if _job_member(child, job_dir, started):
                    found.setdefault(child.pid, child)
    pgid = status.get("pgid", status.get("pid"))
    if os.name == "posix" and pgid:
        for proc in psutil.process_iter():
            if proc.pid in found:
                continue
            try:
                in_group = os.getpgid(proc.pid) == int(pgid)
            except (OSError, ValueError):
                continue
            if in_group and _job_member(proc, job_dir, started):
                found[proc.pid] = proc
    return list(found.values())


def read_status(job_dir: str | Path, log_lines: int = 20) -> dict:
    """The job's status with ``running`` (bool) and ``log_tail`` (last lines of log.txt).

    A status that claims a running phase whose process is gone reads as ``crashed``; then
    ``leftovers`` lists the pids of its workers that still run (verified as the job's; cancel
    stops them). ``unverified`` says why a live process with the recorded pid is not taken
    for the job (see :func:`identify_job`).
    """
    job_dir = Path(job_dir)
    status = _read_json(job_dir / "status.json")
    if not status:
        return {"phase": "none", "running": False, "log_tail": ""}
    leader, problem = identify_job(job_dir, status)
    running = leader is not None
    phase = status.get("phase")
    if phase in RUNNING_PHASES and not running:
        fresh = (phase == "starting" and not status.get("pid")
                 and time.time() - float(status.get("started") or 0) < STARTING_GRACE_S)
        if not fresh:
            status["phase"] = "crashed"
            if not problem:
                left = [p.pid for p in job_processes(job_dir, status)]
                if left:
                    status["leftovers"] = left
    if problem:
        status["unverified"] = problem
    status["running"] = running and phase in RUNNING_PHASES
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
    if details and status.get("leftovers"):
        pids = ", ".join(str(p) for p in status["leftovers"][:8])
        parts.append(f"{len(status['leftovers'])} process(es) of the crashed job still run "
                     f"(pids {pids}): cancel stops them")
    if details and status.get("unverified"):
        parts.append(f"not verified: {status['unverified']}")
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
                   preprocess_workers: int = 2, seed: int | None = None) -> Path:
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
    seed : int, optional
        Seeds Python's, NumPy's and torch's generators in the training process before
        nnU-Net starts: the weights' initialisation and the order of the patches. With
        ``data_workers=0`` on the CPU the same seed gives the same checkpoints (augmentation
        workers draw their own numbers). Default: unseeded, as nnU-Net.

    Raises
    ------
    InputError
        A job of this dataset runs already (or is being started, or its crashed predecessor's
        workers still run); a previous run exists and neither resume nor restart was asked
        for; nothing to resume; the checkpoint to resume from is unsafe or unreadable; an
        export is writing the dataset right now.
    """
    if resume and restart:
        raise InputError("resume and restart exclude each other.")
    if configuration not in ("2d", "3d_fullres", "3d_lowres"):
        raise InputError(f"Unknown configuration {configuration!r}: use 2d or 3d_fullres.")
    if device not in ("auto", "cpu", "cuda", "mps"):
        raise InputError(f"Unknown device {device!r}: use auto, cpu, cuda or mps.")
    from .export import repair_dataset

    name = dataset_name_for(folders, dataset_id)
    repair_dataset(folders.raw, dataset_id)   # a killed export's leftovers, before planning
    base = folders.results / name
    base.mkdir(parents=True, exist_ok=True)
    with _start_lock(base, name):
        return _start_locked(dataset_id, name, schedule, folders=folders,
                             configuration=configuration, device=device, resume=resume,
                             restart=restart, data_workers=data_workers,
                             preprocess_workers=preprocess_workers, seed=seed)


@contextlib.contextmanager
def _start_lock(base: Path, name: str):
    """Held while a job of this dataset is being started (others wait for it, then find the
    job lock taken)."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(base / START_LOCK), timeout=START_TIMEOUT_S + 30)
    try:
        lock.acquire()
    except Timeout:
        raise InputError(f"Another training of {name} is being started and does not finish "
                         "starting: try again in a minute.") from None
    try:
        yield
    finally:
        lock.release()


class JobLock:
    """The lock a job process holds for its whole life (one job per dataset).

    POSIX record locks (``fcntl.lockf``) belong to the process: the kernel drops them when it
    dies, and processes it forks do not inherit them (its data-augmentation workers must
    not keep a dead job's dataset locked). Elsewhere ``msvcrt.locking`` on one byte. The
    holder writes its pid into the file (for the message of a refused start).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.fd: int | None = None

    def try_acquire(self) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            if os.name == "posix":
                import fcntl

                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            else:   # pragma: no cover (Windows)
                import msvcrt

                msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            os.close(fd)
            return False
        self.fd = fd
        return True

    def write_pid(self) -> None:
        if self.fd is not None and os.name == "posix":
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        with contextlib.suppress(OSError):
            if os.name == "posix":
                import fcntl

                fcntl.lockf(fd, fcntl.LOCK_UN)
        os.close(fd)

    def holder(self) -> int | None:
        """The pid written by the process holding the lock (None if unknown)."""
        try:
            text = self.path.read_text().strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None


def job_lock_holder(base: str | Path) -> int | None:
    """The pid of the job holding ``base/.medclipsam_job.lock``; 0 when it is held but its
    pid is unknown; None when no job holds it. Call it only from a process that is not the
    job (closing the file releases a POSIX lock held by the calling process)."""
    lock = JobLock(Path(base) / JOB_LOCK)
    if not lock.path.exists():
        return None
    if lock.try_acquire():
        lock.release()
        return None
    return lock.holder() or 0


def _start_locked(dataset_id: int, name: str, schedule: EnsembleSchedule, *,
                  folders: NnUNetFolders, configuration: str, device: str, resume: bool,
                  restart: bool, data_workers: int | None, preprocess_workers: int,
                  seed: int | None) -> Path:
    job_dir = folders.results / name / JOB_FOLDER
    model_dir = model_dir_for(folders, dataset_id, configuration)
    holder = job_lock_holder(job_dir.parent)
    status = read_status(job_dir)
    if holder is not None or status["running"]:
        pid = holder or status.get("pid") or "unknown"
        raise InputError(f"A training of {name} is running already (pid {pid}): "
                         "watch it with status, or cancel it first.")
    if status.get("leftovers"):
        pids = ", ".join(str(p) for p in status["leftovers"][:8])
        raise InputError(f"{len(status['leftovers'])} process(es) of the crashed training of "
                         f"{name} still run (pids {pids}): stop them with cancel first.")
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
        latest = resume_checkpoint(model_dir)
        if latest is not None:
            read_checkpoint(latest)   # refuse an unsafe or broken one here, in one line
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
           "seed": seed, "trainer": TRAINER_NAME,
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
    read_fd = write_fd = None
    if os.name == "posix":
        # The new process answers on this pipe once it holds the job lock (or found it
        # taken); until then this start holds the start lock.
        read_fd, write_fd = os.pipe()
        env[READY_FD_ENV] = str(write_fd)
        kwargs = {"start_new_session": True, "pass_fds": (write_fd,)}
    else:   # pragma: no cover (Windows)
        kwargs = {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
    try:
        proc = subprocess.Popen([sys.executable, "-m", ENTRY_MODULE, str(job_dir)],
                                stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, close_fds=True, **kwargs)
    finally:
        log.close()
        if write_fd is not None:
            os.close(write_fd)
    if read_fd is None:   # pragma: no cover (Windows: no handshake)
        update_status(job_dir, pid=proc.pid, create_time=process_create_time(proc.pid))
        return job_dir
    answer = _read_answer(read_fd, proc, START_TIMEOUT_S)
    if answer == "ok":
        return job_dir
    if answer.startswith("busy"):
        pid = answer.partition(" ")[2] or "unknown"
        raise InputError(f"A training of {name} is running already (pid {pid}): "
                         "watch it with status, or cancel it first.")
    try:
        proc.wait(timeout=5)   # it closed the pipe without answering: it is ending
    except subprocess.TimeoutExpired:   # no answer in time: stop it (ours: we just started it)
        proc.kill()
        proc.wait()
    update_status(job_dir, phase="failed",
                  error=f"the job process did not start (exit status {proc.returncode})")
    raise InputError(f"The training process of {name} did not start (exit status "
                     f"{proc.returncode}): see {job_dir / 'log.txt'}.")


def _read_answer(fd: int, proc: subprocess.Popen, timeout: float) -> str:
    """The new job's one-line answer on the pipe ("ok" or "busy PID"; "" if none)."""
    data = b""
    end = time.monotonic() + timeout
    try:
        while b"\n" not in data:
            left = end - time.monotonic()
            if left <= 0:
                break
            ready, _, _ = select.select([fd], [], [], min(left, 1.0))
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            chunk = os.read(fd, 256)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(fd)
    return data.decode(errors="replace").strip()


def _answer(fd: int | None, text: str) -> None:
    if fd is None:
        return
    with contextlib.suppress(OSError):
        os.write(fd, (text + "\n").encode())
    with contextlib.suppress(OSError):
        os.close(fd)


def resume_checkpoint(model_dir: str | Path) -> Path | None:
    """The checkpoint nnU-Net continues from (final, else latest, else best), if any."""
    fold = Path(model_dir) / f"fold_{FOLD}"
    for name in ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth"):
        if (fold / name).is_file():
            return fold / name
    return None


UNSAFE_CHECKPOINT = ("refused: the file contains Python objects, not only weights; it may be "
                     "unsafe")


def read_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Load an nnU-Net checkpoint safely (``weights_only=True``) or raise one clear line.

    Raises
    ------
    InputError
        Missing file; a file holding Python objects other than weights (refused as possibly
        unsafe; it is never unpickled); a file that is not a readable PyTorch checkpoint
        (truncated, another format); a checkpoint without nnU-Net's network weights.
    """
    import pickle
    import warnings

    from ..core.models import is_unsafe_pickle
    from .trainer import load_checkpoint_file

    path = Path(path)
    if not path.exists():
        raise InputError(f"Checkpoint {path} does not exist.")
    if not path.is_file():
        raise InputError(f"Checkpoint {path} is not a file.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ckpt = load_checkpoint_file(path, map_location)
    except pickle.UnpicklingError as exc:
        if is_unsafe_pickle(exc):
            raise InputError(f"{path}: {UNSAFE_CHECKPOINT}. Use a checkpoint this training "
                             "wrote.") from None
        raise InputError(f"{path} is not a readable PyTorch checkpoint (not a checkpoint "
                         "file, or damaged).") from None
    except OSError as exc:
        raise InputError(f"Checkpoint {path} cannot be read: {exc.strerror or exc}.") from None
    except Exception:
        raise InputError(f"{path} is not a readable PyTorch checkpoint (truncated, damaged or "
                         "another kind of file).") from None
    if not isinstance(ckpt, dict) or "network_weights" not in ckpt:
        raise InputError(f"{path} is not an nnU-Net checkpoint (no network weights in it).")
    return ckpt


def _trainer_path() -> str:
    # The trainer module imports torch and nnU-Net: compute its folder without importing it.
    return str(Path(__file__).with_name("trainers"))


@dataclass
class StopReport:
    """What :func:`stop_job` did."""

    stopped: list[int] = field(default_factory=list)
    """Pids signalled (each verified as the job's first)."""
    job: bool = False
    """The job itself was running and was stopped (else: only a crashed job's leftovers)."""
    note: str = ""
    """Why a process named by status.json was left alone, if one was."""


def stop_job(job_dir: str | Path, timeout: float = 10.0) -> StopReport:
    """Stop the job's processes (SIGTERM, then SIGKILL), each verified as the job's first.

    Stops the running job with its whole process tree, or, after a crash, the workers it
    left (:func:`job_processes`). The last finished epoch is kept: resume continues there.

    Raises
    ------
    InputError
        status.json says the job runs and names a live process that cannot be verified as the
        job (no start time recorded, or another program with that start time): nothing is
        signalled.
    """
    import psutil

    job_dir = Path(job_dir)
    status = _read_json(job_dir / "status.json")
    if not status:
        return StopReport()
    leader, problem = identify_job(job_dir, status)
    if problem and status.get("phase") in RUNNING_PHASES:
        raise InputError(f"Refused to stop pid {status.get('pid')}: {problem}. Nothing was "
                         "signalled.")
    report = StopReport(job=leader is not None)
    if problem:
        report.note = problem
    elif leader is None and status.get("pid") and process_matches(status["pid"]) is True:
        report.note = (f"pid {status['pid']} named in status.json now belongs to another "
                       "program (it started at another time) and was left alone")
    seen: dict[int, object] = {}
    for _ in range(3):   # a worker may fork while the job stops: look again
        procs = [p for p in job_processes(job_dir, status) if p.pid not in seen]
        if not procs:
            break
        for p in procs:
            seen[p.pid] = p
            with contextlib.suppress(psutil.NoSuchProcess):
                p.terminate()
        _, alive = psutil.wait_procs(procs, timeout=timeout)
        for p in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(alive, timeout=timeout)
    report.stopped = sorted(seen)
    if report.job and status.get("phase") in RUNNING_PHASES:  # a finished job stays done
        update_status(job_dir, phase="cancelled", cancelled=time.time())
    elif report.stopped:
        update_status(job_dir, leftovers_stopped=report.stopped, cancelled=time.time())
    return report


def cancel(job_dir: str | Path, timeout: float = 10.0) -> bool:
    """Stop the job's whole process tree (SIGTERM, then SIGKILL); return True if it ran.

    Also stops the leftovers of a crashed job (True then too). Every process is verified as
    the job's before it is signalled (see :func:`stop_job`, which says what was done).
    The last finished epoch is kept: resume continues from there.
    """
    return bool(stop_job(job_dir, timeout).stopped)


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
        if job.get("seed") is not None:
            _seed_everything(int(job["seed"]))
        from nnunetv2.run.run_training import run_training

        run_training(str(job["dataset_id"]), job["configuration"], FOLD,
                     trainer_class_name=TRAINER_NAME, plans_identifier=PLANS,
                     continue_training=bool(job["resume"]), device=device)
    except BaseException as exc:   # the status must say why it stopped
        traceback.print_exc()
        update_status(job_dir, phase="failed", error=_error_line(exc))
        return 1
    update_status(job_dir, phase="done", finished=time.time(), eta_s=0)
    return 0


def _seed_everything(seed: int) -> None:
    """Seed the generators nnU-Net draws from in this process (``random``, NumPy's global
    one, torch's)."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def _error_line(exc: BaseException) -> str:
    """The status's one-line error; an unsafe checkpoint is named as refused (torch's own
    message would suggest turning the safety off)."""
    import pickle

    if isinstance(exc, pickle.UnpicklingError) and (
            "Weights only load failed" in str(exc) or "Unsupported global" in str(exc)):
        return f"a checkpoint of this training was {UNSAFE_CHECKPOINT}"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _take_ready_fd() -> int | None:
    value = os.environ.pop(READY_FD_ENV, None)   # not for nnU-Net's workers
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def main(argv: list[str] | None = None) -> int:
    """The job process: take the dataset's job lock (or answer "busy PID" and exit), record
    pid, start time, process group and command line in status.json, answer "ok", run."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m napari_medclipsam.nnunet.job JOB_DIR", file=sys.stderr)
        return 2
    job_dir = Path(argv[0])
    ready = _take_ready_fd()
    lock = JobLock(job_dir.parent / JOB_LOCK)
    if not lock.try_acquire():
        _answer(ready, f"busy {lock.holder() or ''}".strip())
        print("Another training of this dataset holds its lock; not started.", file=sys.stderr)
        return 3
    try:
        lock.write_pid()
        identity = {"pid": os.getpid(), "create_time": process_create_time(),
                    "pgid": os.getpgid(0) if os.name == "posix" else None}
        with contextlib.suppress(Exception):
            import psutil

            identity["command"] = psutil.Process().cmdline()
        update_status(job_dir, **identity)
        _answer(ready, "ok")
        ready = None   # answered and closed: the number may be reused by any file now
        return _run(job_dir)
    finally:
        _answer(ready, "failed")
        lock.release()


if __name__ == "__main__":
    sys.exit(main())
