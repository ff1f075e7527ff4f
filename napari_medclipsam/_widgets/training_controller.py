"""The Qt-free controller of the "Pseudo-labels & training" widget.

It holds the typed state of the session (:class:`TrainingState`: the training job and its
last :class:`JobStatus`, the last export, the last :class:`Prediction` and the review queue of
:class:`ReviewItem`) and does the work; the widget (:mod:`.training_widget`) only reads
fields, moves layers and wires signals. Nothing here imports Qt or napari, so every method is
testable with plain arrays:

>>> ctl = TrainingController()                                          # doctest: +SKIP
>>> folders = folders_from_values({"raw": "...", "preprocessed": "...", "results": "..."})
>>> cases = ctl.export_cases(image, label_map, "scan", label_table={"liver": 1, "tumor": 2})
>>> ctl.export(cases, folders, 1, "Liver", label_table={"liver": 1, "tumor": 2})  # worker
>>> ctl.start(folders, 1, schedule_from_values(epochs=600))
>>> ctl.refresh().line                                                  # every second
>>> pred = ctl.predict(image, (1.0, 1.0), model_dir, checkpoints)       # worker
>>> ctl.open_review(0); job = ctl.prepare_review(0, "accepted", image_slice)
>>> ctl.submit_review(job)                                              # worker

Several targets: a label map whose ``name`` feature (napari's features table, columns
``index`` and ``name``, as the text-prompt widget writes for its ``label map`` layer) names
more than one non-background value is exported with that label table (one class per
target); anything else is binary (every value > 0 is the target).

Review: a prediction ranks what to check first by mean entropy (the slices of a stack, or
the cases of a folder prediction's ``uncertainty_ranking.csv``); a person opens a row, accepts
the prediction or corrects it, and :func:`~napari_medclipsam.nnunet.review.review_case` adds
the final mask to the dataset (``--append --corrected``) with the time spent (from opening
to marking, by the controller's ``clock``), the number of edits the view counted, and the
Dice between the automatic and the final mask.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_medclipsam.core.errors import InputError
from napari_medclipsam.nnunet.export import (
    ExportCase,
    ExportResult,
    cases_from_arrays,
    check_label_table,
    export_dataset,
    find_dataset,
    format_label_table,
)
from napari_medclipsam.nnunet.job import ENV_NAMES, NnUNetFolders, format_status
from napari_medclipsam.nnunet.review import ReviewRecord, ReviewSummary
from napari_medclipsam.nnunet.schedule import EnsembleSchedule

DEVICES = ("auto", "cpu", "cuda", "mps")
CONFIGURATIONS = ("2d", "3d_fullres")
FOLDER_KEYS = ("raw", "preprocessed", "results")
FINAL_PHASES = ("done", "failed", "cancelled", "crashed")
RESUMABLE_PHASES = ("cancelled", "crashed", "failed")
DEFAULT_LR_MIN = 1e-4
RANKING_FILE = "uncertainty_ranking.csv"

ProgressFn = Callable[[int, "int | None"], None]
StopFn = Callable[[], bool]


# --------------------------------------------------------------------------- small helpers
def label_name_from_layer(name: str) -> str | None:
    """``'SAM mask [breast tumor +1]'`` -> ``'breast tumor'`` (the prompt), else None."""
    m = re.search(r"\[(.+?)(?: \+\d+)?\]$", name)
    return m.group(1).strip() or None if m else None


def label_table_from_features(features: Any) -> dict[str, int] | None:
    """A Labels layer's ``features`` (columns ``index`` and ``name``) -> ``{name: value}``.

    The background (value 0, or a row named "background") is left out; None when the table
    has no ``index`` and ``name`` columns or names nothing else.
    """
    try:
        indices, names = list(features["index"]), list(features["name"])
    except (KeyError, TypeError, IndexError):
        return None
    table: dict[str, int] = {}
    for value, name in zip(indices, names, strict=True):
        if value is None or name is None or (isinstance(name, float) and math.isnan(name)):
            continue
        value, name = int(value), str(name).strip()
        if value == 0 or name in ("", "background"):
            continue
        table[name] = value
    return table or None


def export_label_table(features: Any) -> dict[str, int] | None:
    """The label table to export a label map with: its named targets when there are more
    than one (checked), else None (binary export)."""
    table = label_table_from_features(features)
    if table is None or len(table) < 2:
        return None
    return check_label_table(table)


def folders_from_values(values: Mapping[str, str | None]) -> NnUNetFolders:
    """nnU-Net's folders from ``{"raw", "preprocessed", "results"}`` texts; empty ones fall
    back to the ``nnUNet_*`` environment variables.

    Raises
    ------
    InputError
        Naming every folder that is set nowhere.
    """
    given = {k: (values.get(k) or "").strip() or None for k in FOLDER_KEYS}
    missing = [k for k in FOLDER_KEYS if not (given[k] or os.environ.get(ENV_NAMES[k]))]
    if missing:
        names = (missing[0] if len(missing) == 1
                 else f"{', '.join(missing[:-1])} and {missing[-1]}")
        raise InputError(f"Set nnU-Net's {names} folder(s) under 'nnU-Net folders' (or the "
                         "nnUNet_raw/_preprocessed/_results environment variables).")
    return NnUNetFolders.resolve(**given)


def schedule_from_values(*, epochs: int = 600, cycles: int = 3, checkpoints_per_cycle: int = 10,
                         iterations_per_epoch: int = 250, val_iterations_per_epoch: int = 50,
                         lr_max: float = 0.01, lr_min: float = DEFAULT_LR_MIN
                         ) -> EnsembleSchedule:
    """The checkpoint-ensembling schedule of the widget's fields (checked by
    :class:`~napari_medclipsam.nnunet.schedule.EnsembleSchedule`); ``lr_min`` is capped at
    ``lr_max`` so a small learning rate never makes the cosine go up."""
    return EnsembleSchedule(
        epochs=int(epochs), cycles=int(cycles), checkpoints_per_cycle=int(checkpoints_per_cycle),
        lr_max=float(lr_max), lr_min=min(float(lr_min), float(lr_max)),
        iterations_per_epoch=int(iterations_per_epoch),
        val_iterations_per_epoch=int(val_iterations_per_epoch))


# --------------------------------------------------------------------------- time estimate
#: Seconds per training iteration of nnU-Net's default plans, by device kind and
#: configuration. nnU-Net's planner sizes batch and patch to a fixed memory budget, so the
#: cost of one iteration hardly depends on the dataset. CUDA: nnU-Net's published epoch times
#: (40-100 s per 250 iterations for 2d, 45-150 s for 3d_fullres, A100 to RTX 2080 Ti). CPU: a
#: 2d run (256x256 images, batch 10) measured about 8 s per iteration on 2 cores; it is
#: scaled by the core count (:data:`CPU_REFERENCE_CORES`). MPS: a rough guess between them.
SECONDS_PER_ITERATION: dict[tuple[str, str], float] = {
    ("cuda", "2d"): 0.3, ("cuda", "3d_fullres"): 0.45,
    ("mps", "2d"): 1.5, ("mps", "3d_fullres"): 4.0,
    ("cpu", "2d"): 8.0, ("cpu", "3d_fullres"): 40.0,
}
CPU_REFERENCE_CORES = 2
#: a validation iteration is a forward pass only
VALIDATION_COST = 0.4
#: per epoch: nnU-Net writes checkpoint_latest (and our ensemble members); seconds by device
EPOCH_OVERHEAD_S = {"cuda": 1.0, "mps": 1.5, "cpu": 2.0}
#: planning, preprocessing and building the network before the first epoch
STARTUP_S = 60.0
DEVICE_WORDS = {"cpu": "CPU", "cuda": "GPU", "mps": "Apple GPU"}


def guess_device(choice: str) -> tuple[str, str]:
    """The device kind a training with the Device field ``choice`` runs on, without
    importing torch (seconds on the GUI thread): ``("cpu" | "cuda" | "mps", why)``.

    "auto" asks torch if it is imported already; otherwise a CPU-only torch build
    (``+cpu``), an NVIDIA driver (``/proc/driver/nvidia`` or ``nvidia-smi``) or an Apple
    Silicon Mac decide. The job itself picks the device with torch; this is for the estimate.
    """
    import importlib.metadata
    import platform
    import shutil
    import sys

    if choice in ("cpu", "cuda", "mps"):
        return choice, "chosen"
    torch = sys.modules.get("torch")
    if torch is not None:
        if torch.cuda.is_available():
            return "cuda", "found by torch"
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return "mps", "found by torch"
        return "cpu", "torch finds no GPU"
    try:
        version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        version = ""
    if sys.platform == "darwin":
        return ("mps", "Apple Silicon") if platform.machine() == "arm64" else \
            ("cpu", "no GPU torch can use")
    if "+cpu" in version:
        return "cpu", "torch is the CPU-only build"
    if os.path.exists("/proc/driver/nvidia/version") or shutil.which("nvidia-smi"):
        return "cuda", "an NVIDIA driver is installed"
    return "cpu", "no NVIDIA GPU found"


def format_duration(seconds: float) -> str:
    """Rounded for a person: ``'2 min'``, ``'45 min'``, ``'3.5 h'``, ``'6 days'``."""
    if seconds < 90:
        return "1 min" if seconds < 60 else "2 min"
    minutes = seconds / 60
    if minutes < 60:
        return f"{round(minutes)} min"
    hours = minutes / 60
    if hours < 10:
        return f"{hours:.1f} h".replace(".0 h", " h")
    if hours < 36:
        return f"{round(hours)} h"
    days = hours / 24
    return f"{days:.1f} days".replace(".0 days", " days") if days < 10 else \
        f"{round(days)} days"


@dataclass(frozen=True)
class TrainingEstimate:
    """How long a training takes: ``epochs x (iterations + VALIDATION_COST x validation
    iterations) x seconds per iteration``, an overhead per epoch, and the start-up.

    Attributes
    ----------
    seconds : float
        The whole run, start-up included.
    device : str
        "cpu", "cuda" or "mps": what the cost is for.
    seconds_per_iteration : float
    iterations : int
        Training iterations in all (epochs x iterations per epoch).
    measured : bool
        The cost comes from this dataset's last run on this device (its epoch times), not
        from the table.
    why : str
        How the device was found ("chosen", "no NVIDIA GPU found", ...).
    """

    seconds: float
    device: str
    seconds_per_iteration: float
    iterations: int
    measured: bool = False
    why: str = ""

    @property
    def too_long(self) -> bool:
        """More than a day: say so before Start."""
        return self.seconds > 24 * 3600

    @property
    def duration(self) -> str:
        return format_duration(self.seconds)

    def words(self) -> str:
        """What the widget shows before Start, e.g. "About 15 days on this computer's CPU
        (no NVIDIA GPU found): 150,000 iterations × ~8 s, ... That is days: choose 'Quick
        try' for a first model today, or train on a computer with an NVIDIA GPU."."""
        where = DEVICE_WORDS.get(self.device, self.device)
        why = f" ({self.why})" if self.why and self.why != "chosen" else ""
        source = ("as timed in this dataset's last run" if self.measured
                  else "a rough guess until the first epochs are timed")
        text = (f"About {self.duration} on this computer's {where}{why}: "
                f"{self.iterations:,} iterations × ~{self.seconds_per_iteration:.2g} s, "
                f"{source}.")
        if self.too_long and self.device == "cpu":
            text += (" That is days: choose 'Quick try' for a first model today, or train "
                     "on a computer with an NVIDIA GPU.")
        elif self.too_long:
            text += " That is more than a day: a shorter length gives a first model sooner."
        return text


def measured_seconds_per_iteration(status: Mapping[str, Any], schedule: Mapping[str, Any],
                                   device: str) -> float | None:
    """Seconds per training iteration from a job's status (``epoch_time_s``, ``device``)
    and its schedule, when that run was on ``device`` (kind); else None."""
    epoch_s = status.get("epoch_time_s")
    ran_on = str(status.get("device") or "").split(":")[0]
    iterations = status.get("iterations_per_epoch") or schedule.get("iterations_per_epoch")
    if not epoch_s or ran_on != device or not iterations:
        return None
    work = float(iterations) + VALIDATION_COST * float(
        schedule.get("val_iterations_per_epoch") or 0)
    overhead = EPOCH_OVERHEAD_S.get(device, 2.0)
    return max(float(epoch_s) - overhead, 0.1 * float(epoch_s)) / work


def estimate_training(schedule: EnsembleSchedule, device: str = "cpu",
                      configuration: str = "2d", *, cores: int | None = None,
                      seconds_per_iteration: float | None = None,
                      why: str = "", epochs_done: int = 0) -> TrainingEstimate:
    """The time a training with ``schedule`` takes on ``device`` ("cpu", "cuda", "mps").

    Parameters
    ----------
    schedule : EnsembleSchedule
    device : str
    configuration : str
        "2d" or "3d_fullres" (a 3-D iteration costs more).
    cores : int, optional
        CPU cores (default ``os.cpu_count()``); the CPU cost is scaled from
        :data:`CPU_REFERENCE_CORES` by ``(reference / cores) ** 0.75`` (convolutions do not
        scale perfectly).
    seconds_per_iteration : float, optional
        A measured cost (:func:`measured_seconds_per_iteration`) instead of the table's.
    why : str
        How the device was found, kept for the words.
    epochs_done : int
        Epochs finished already (a resumed run): only the rest is counted.
    """
    measured = seconds_per_iteration is not None
    if seconds_per_iteration is None:
        config = "3d_fullres" if configuration.startswith("3d") else "2d"
        seconds_per_iteration = SECONDS_PER_ITERATION[(device, config)]
        if device == "cpu":
            n = max(1, int(cores or os.cpu_count() or 1))
            seconds_per_iteration *= (CPU_REFERENCE_CORES / n) ** 0.75
    per_epoch = (schedule.iterations_per_epoch
                 + VALIDATION_COST * schedule.val_iterations_per_epoch) * seconds_per_iteration
    epochs = max(schedule.epochs - max(int(epochs_done), 0), 0)
    seconds = STARTUP_S + epochs * (per_epoch + EPOCH_OVERHEAD_S.get(device, 2.0))
    return TrainingEstimate(seconds, device, float(seconds_per_iteration),
                            epochs * schedule.iterations_per_epoch, measured, why)


@dataclass(frozen=True)
class SchedulePreset:
    """A named set of schedule fields (the learning rate and the rest stay)."""

    key: str
    title: str
    epochs: int
    cycles: int
    checkpoints_per_cycle: int
    iterations_per_epoch: int
    val_iterations_per_epoch: int
    hint: str = ""

    def values(self) -> dict[str, int]:
        return {"epochs": self.epochs, "cycles": self.cycles,
                "checkpoints_per_cycle": self.checkpoints_per_cycle,
                "iterations_per_epoch": self.iterations_per_epoch,
                "val_iterations_per_epoch": self.val_iterations_per_epoch}

    def schedule(self, lr_max: float = 0.01, lr_min: float = DEFAULT_LR_MIN
                 ) -> EnsembleSchedule:
        return schedule_from_values(**self.values(), lr_max=lr_max, lr_min=lr_min)

    def label(self, device: str = "cpu", configuration: str = "2d", **kwargs: Any) -> str:
        """``'Quick try: ~25 min'`` on ``device`` (the keywords go to
        :func:`estimate_training`)."""
        estimate = estimate_training(self.schedule(), device, configuration, **kwargs)
        return f"{self.title}: ~{estimate.duration}"

    @property
    def details(self) -> str:
        """``'10 epochs × 20 iterations, 2 cycles × 2 checkpoints.'`` and the hint."""
        return (f"{self.epochs} epochs × {self.iterations_per_epoch} iterations, "
                f"{self.cycles} cycles × {self.checkpoints_per_cycle} checkpoints. {self.hint}")


SCHEDULE_PRESETS: tuple[SchedulePreset, ...] = (
    SchedulePreset("quick", "Quick try", 10, 2, 2, 20, 2,
                   "A first model within the hour on a CPU: checks the whole chain (export, "
                   "training, prediction, review); expect a rough model."),
    SchedulePreset("short", "Short", 60, 3, 5, 100, 10,
                   "Overnight on a CPU, minutes on a GPU: a usable model for simple targets."),
    SchedulePreset("paper", "As the paper", 600, 3, 10, 250, 50,
                   "The paper's schedule (nnU-Net's 250 iterations per epoch, 600 epochs, 3 "
                   "cycles x 10 checkpoints): hours on a GPU, days to weeks on a CPU."),
)


def preset_of(values: Mapping[str, Any]) -> SchedulePreset | None:
    """The preset whose fields are ``values`` (epochs, cycles, ...), or None (custom)."""
    for preset in SCHEDULE_PRESETS:
        if all(int(values.get(k, -1)) == v for k, v in preset.values().items()):
            return preset
    return None


def preset_named(key: str) -> SchedulePreset:
    for preset in SCHEDULE_PRESETS:
        if preset.key == key:
            return preset
    raise InputError(f"Unknown schedule preset {key!r}: "
                     f"{', '.join(p.key for p in SCHEDULE_PRESETS)}.")


# --------------------------------------------------------------------------- the job's log
#: log lines that are nnU-Net's dumps and banners, not progress: dictionaries (plans,
#: configuration), a network's printout (``PlainConvUNet(``, ``(encoder): ...``, ``)``),
#: '####' banners and the citation, the trainer search, reader/writer notices and
#: library warnings. Matched after the timestamp.
_NOISE = re.compile("|".join((
    r"^\s*[\[{(]",                                  # a dict / list / tuple dump
    r"^\s*\)+,?\s*$",                               # the end of a module printout
    r"^\s*\w+\($",                                  # PlainConvUNet(
    r"^\s*\(\w+\): ",                               # (encoder): ...
    r"^\s*#{3,}",                                   # banners
    r"Please cite the following paper|^\s*Isensee, F\.|nnU-Net: a self-configuring",
    r"^INFO: You are using the old nnU-Net|Read more here: http",
    r"^Trainer '.+' not found|^Searching (in|for)|^\s*Inspecting module|^Found class|"
    r"^Using trainer '",
    r"^Using <class '.+'> as reader/writer",
    r"Warning: |^\s*warnings\.warn\(",
    r"^This is the configuration used by this training|^Configuration name: |"
    r"^These are the global plan\.json settings|^2D U-Net configuration:|"
    r"^3D \w+ U-Net configuration:",
    r"^Unable to plot network architecture|^No module named 'hiddenlayer'",
    r"^verify_dataset_integrity Done|^If you didn't see any error messages",
)))
_TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d (\d\d:\d\d:\d\d)(?:\.\d+)?:\s?")
_NP_SCALAR = re.compile(r"np\.float\d+\(([-\d.eE+]+)\)")
#: lines that always stay, however they look: errors and their tracebacks
_KEEP = re.compile(r"Traceback|Error|error:|Exception|^\s+File \"|^==== ")
LOG_LINES = 12
MAX_LINE = 240


def filter_log(text: str | None, lines: int = LOG_LINES) -> str:
    """The job log's last ``lines`` lines a person reads: epochs, learning rate, losses,
    pseudo-Dice, epoch times, ensemble checkpoints, errors; without nnU-Net's plans and
    network dumps, banners and warnings (:func:`full_log` has everything).

    Timestamps shrink to ``HH:MM:SS``, ``np.float32(0.96)`` to ``0.96``, and an overlong
    line is cut with "...".
    """
    kept: list[str] = []
    for raw in (text or "").splitlines():
        m = _TIMESTAMP.match(raw)
        body = raw[m.end():] if m else raw
        if not body.strip():
            continue
        if _NOISE.search(body) and not _KEEP.search(body):
            continue
        if len(body) > 1000 and not _KEEP.search(body):
            continue                                # a dump on one line
        body = _NP_SCALAR.sub(r"\1", body.rstrip())
        if len(body) > MAX_LINE:
            body = body[:MAX_LINE - 3] + "..."
        kept.append(f"{m.group(1)} {body}" if m else body)
    return "\n".join(kept[-lines:]) if lines > 0 else ""


def full_log(job_dir: str | Path | None, max_bytes: int = 4_000_000) -> tuple[Path | None, str]:
    """The job's whole ``log.txt`` (its last ``max_bytes``) and its path; ``(None, "")``
    without a job, ``(path, "")`` before anything was written."""
    if job_dir is None:
        return None, ""
    path = Path(job_dir) / "log.txt"
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except FileNotFoundError:
        return path, ""
    text = data.decode("utf-8", errors="replace")
    if size > max_bytes:
        text = f"[... the first {size - max_bytes:,} bytes are left out ...]\n" + \
            text.split("\n", 1)[-1]
    return path, text


# --------------------------------------------------------------------------- GUI words
#: the command-line phrasings of messages from nnunet/ and what to click instead
_GUI_WORDS: tuple[tuple[re.Pattern, str], ...] = tuple(
    (re.compile(p), r) for p, r in (
        (r"export (?:the pseudo-labels )?first \(medclipsam nnunet export\)",
         "click Export first"),
        (r"add cases to it with append \(--append\)",
         "tick 'append to existing dataset' to add cases to it"),
        (r"watch it with status, or cancel it first", "wait for it, or press Cancel first"),
        (r"stop them with cancel first", "stop them with Cancel first"),
        (r"resume it, or start over with restart \(deletes it\)",
         "press Resume, or tick 'start over' and press Start (deletes it)"),
        (r"predict with it, or start over with restart",
         "press Predict, or tick 'start over' and press Start"),
        (r"resume it with the same schedule \(or start over with restart\)",
         "set the same schedule to Resume it (or tick 'start over' and press Start)"),
        (r"export to a new dataset ID", "export to a new Dataset ID"),
        (r"give its label table to export (\S+) \(--labels\)",
         r"choose a label map layer that names its targets to export \1"),
        (r"pass --(\w+) DIR or set (nnUNet_\w+)",
         r"set it under 'nnU-Net folders' (or the \2 environment variable)"),
        (r"with restart\b", "with 'start over'"),
        (r"\s*\((?:--[\w-]+(?: [A-Z]+)?|medclipsam [^)]*)\)", ""),   # any other flag
    ))


def in_gui_words(message: str) -> str:
    """A message written for the command line (``--append``, ``medclipsam nnunet export``)
    said as what to click in the widget."""
    for pattern, words in _GUI_WORDS:
        message = pattern.sub(words, message)
    return message


# --------------------------------------------------------------------------- uncertainty
def uncertainty_words(n_classes: int = 2) -> str:
    """The entropy scale in words: ``"0 = all checkpoints agree; 0.69 (ln 2) = a coin flip
    between two labels"`` (and ln C, the most, for C classes)."""
    n = max(int(n_classes), 2)
    text = "0 = all checkpoints agree; 0.69 (ln 2) = a coin flip between two labels"
    if n > 2:
        text += f"; {math.log(n):.2f} (ln {n}, the most) = all {n} labels equally likely"
    return text


# --------------------------------------------------------------------------- job status
@dataclass(frozen=True)
class JobStatus:
    """A training job's status, as :func:`~napari_medclipsam.nnunet.job.read_status` reads it.

    Attributes
    ----------
    phase : str
        "none" (no job), "starting", "planning", "preprocessing", "training", "done",
        "failed", "cancelled" or "crashed".
    running : bool
        The job's process is alive and in a running phase.
    epoch, epochs : int
        Finished epochs (all of them once done) and the schedule's total.
    pid : int or None
    checkpoints : tuple of str
        Ensemble checkpoints saved so far.
    log_tail : str
        Last lines of the job's log.
    fields : dict
        Everything ``status.json`` holds (loss, pseudo-Dice, ETA, error...).
    """

    phase: str = "none"
    running: bool = False
    epoch: int = 0
    epochs: int = 0
    pid: int | None = None
    checkpoints: tuple[str, ...] = ()
    log_tail: str = ""
    fields: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, status: Mapping[str, Any]) -> JobStatus:
        phase = str(status.get("phase") or "none")
        epochs = int(status.get("epochs") or 0)
        epoch = epochs if phase == "done" and epochs else int(status.get("epoch") or 0)
        return cls(phase, bool(status.get("running")), epoch, epochs, status.get("pid"),
                   tuple(str(c) for c in status.get("checkpoints") or ()),
                   str(status.get("log_tail") or ""), dict(status))

    @property
    def exists(self) -> bool:
        return self.phase != "none"

    @property
    def resumable(self) -> bool:
        return not self.running and self.phase in RESUMABLE_PHASES

    @property
    def line(self) -> str:
        """``phase · epoch e/E · cycle c/D · loss · pseudo-Dice · ETA`` (known parts only)."""
        return status_line(self)


def status_line(status: JobStatus | Mapping[str, Any]) -> str:
    """``phase · epoch e/E · cycle c/D · loss · pseudo-Dice · ETA`` (known parts only), and
    what to do after a failure or a crash."""
    if not isinstance(status, JobStatus):
        status = JobStatus.from_dict(status)
    if status.phase == "none":
        return "No training for this dataset yet."
    line = format_status({**status.fields, "phase": status.phase, "running": status.running},
                         sep=" · ")
    iteration, per_epoch = status.fields.get("iteration"), status.fields.get(
        "iterations_per_epoch")
    if status.running and status.phase == "training" and iteration and per_epoch:
        line += f" · iteration {iteration}/{per_epoch} of epoch {status.epoch + 1}"
    if status.phase == "failed" and status.fields.get("error"):
        line += f"\n{status.fields['error']}"
    elif status.phase == "crashed":
        line += "\nThe training process is gone (crash, reboot, killed): press Resume."
    return line


# --------------------------------------------------------------------------- prediction
@dataclass
class Prediction:
    """The ensemble's prediction of one image, in the image's grid.

    Attributes
    ----------
    source : str
        The image layer's name.
    probability : np.ndarray
        *spatial float32 probability of any target: ``1 - p(background)`` (for a binary
        model exactly ``p(target)``).
    mask : np.ndarray
        *spatial label map in the exported table's values (0/1 for a binary model).
    entropy : np.ndarray
        *spatial float32 entropy over all C classes, nats, in [0, ln C].
    class_names, label_values : tuple
        Per output class (background first): its name and its value in ``mask``.
    n_checkpoints : int
    stack : bool
        A (Z, Y, X) stack predicted by a 2-D model: its review rows are its slices (a volume
        of a 3-D model is one row).
    """

    source: str
    probability: np.ndarray
    mask: np.ndarray
    entropy: np.ndarray
    class_names: tuple[str, ...]
    label_values: tuple[int, ...]
    n_checkpoints: int
    stack: bool = False

    @property
    def n_classes(self) -> int:
        return max(len(self.class_names), 2)

    @property
    def max_entropy(self) -> float:
        """ln C: the uncertainty layer's upper contrast limit."""
        return math.log(self.n_classes)

    @property
    def labels(self) -> dict[str, int]:
        """The targets: name -> value in ``mask`` (background left out)."""
        return dict(zip(self.class_names[1:], self.label_values[1:], strict=True))

    @property
    def multi(self) -> bool:
        """More than one target (a label map rather than a binary mask)."""
        return self.n_classes > 2

    def features(self) -> dict[str, list]:
        """``{"index": values, "name": names}`` for the mask layer's features table."""
        return {"index": list(self.label_values), "name": list(self.class_names)}

    def summary(self) -> str:
        fg = float((self.mask > 0).mean())
        text = (f"Ensemble of {self.n_checkpoints} checkpoint(s): {100 * fg:.1f}% foreground, "
                f"mean uncertainty {float(self.entropy.mean()):.3f} nats "
                f"({uncertainty_words(self.n_classes)}).")
        if self.multi:
            text += " Classes: " + format_label_table(self.labels) + "."
        return text


# --------------------------------------------------------------------------- review
@dataclass(frozen=True)
class RankingFiles:
    """One case of a folder prediction: the image and the maps written for it."""

    image: Path
    mask: Path
    probability: Path | None
    uncertainty: Path | None


@dataclass
class ReviewItem:
    """One row of the review queue.

    Attributes
    ----------
    case : str
        The nnU-Net case it becomes (``{image}_z{index:03d}`` for a slice of a stack).
    title : str
        What the row shows.
    mean_entropy : float
        Mean uncertainty (nats) of the slice or case: the queue is sorted by it, worst first.
    source : str
        Image layer name (a prediction's rows; for a folder's rows, once opened).
    slice_index : int or None
        Axis-0 index in the source stack; None for a whole image.
    files : RankingFiles or None
        A folder prediction's row: where its image and maps are.
    opened_at : float or None
        ``clock()`` when the row was opened (or last marked); None before.
    edits : int
        Edits of the mask counted since then.
    record : ReviewRecord or None
        The case's review record once marked.
    """

    case: str
    title: str
    mean_entropy: float
    source: str = ""
    slice_index: int | None = None
    files: RankingFiles | None = None
    opened_at: float | None = None
    edits: int = 0
    record: ReviewRecord | None = None
    auto_mask: np.ndarray | None = field(default=None, repr=False)

    @property
    def status(self) -> str:
        """"", "accepted" or "corrected"."""
        return self.record.status if self.record is not None else ""


@dataclass
class FolderMaps:
    """A folder prediction's maps of one case, as read for display."""

    mask: np.ndarray
    probability: np.ndarray | None
    uncertainty: np.ndarray | None
    class_names: tuple[str, ...]
    label_values: tuple[int, ...]

    @property
    def max_entropy(self) -> float:
        return math.log(max(len(self.class_names), 2))

    def features(self) -> dict[str, list]:
        return {"index": list(self.label_values), "name": list(self.class_names)}


@dataclass(frozen=True)
class ReviewJob:
    """What a marked row writes: made in the GUI thread at the click (the time stops there),
    written by :meth:`TrainingController.submit_review` in a worker."""

    index: int
    case: ExportCase
    auto_mask: np.ndarray
    status: str
    seconds: float
    edits: int
    raw: Path
    dataset_id: int
    name: str
    label_table: dict[str, int] | None
    label_name: str


@dataclass
class TrainingState:
    """Everything the widget shows, in one place."""

    job_dir: Path | None = None
    status: JobStatus = field(default_factory=JobStatus)
    lr_min: float = DEFAULT_LR_MIN
    last_export: ExportResult | None = None
    last_prediction: Prediction | None = None
    review: list[ReviewItem] = field(default_factory=list)
    review_folder: Path | None = None
    review_classes: tuple[tuple[str, ...], tuple[int, ...]] = (("background", "target"), (0, 1))
    current: int | None = None
    summary: ReviewSummary | None = None


# --------------------------------------------------------------------------- controller
class TrainingController:
    """Export, training job, prediction and review queue of the training widget.

    Parameters
    ----------
    clock : callable, optional
        Seconds from any origin (default :func:`time.monotonic`); the review times are
        differences of it, so tests pass a fake clock.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.state = TrainingState()
        self.clock = clock
        self.predictor = None
        self._predictor_key: tuple | None = None

    # -- export ---------------------------------------------------------------------------
    @staticmethod
    def export_cases(image: np.ndarray, labels: np.ndarray, name: str, *,
                     spacing: Sequence[float] | None = None,
                     origin: Sequence[float] | None = None, rgb: bool = False,
                     corrected: bool = True, as_slices: bool = False,
                     label_table: Mapping[str, int] | None = None) -> list[ExportCase]:
        """The cases of an image and its label map (a copy of it: painting during the export
        must not change what is written). A (Z, Y, X) stack ``as_slices`` gives one 2-D case
        per labelled slice; ``label_table`` (name -> value) exports several classes."""
        return cases_from_arrays(
            np.asarray(image), np.array(labels, copy=True), name,
            spacing=spacing, origin=origin, corrected=corrected, as_slices=as_slices,
            rgb=rgb, label_table=label_table)

    def export(self, cases: Sequence[ExportCase], folders: NnUNetFolders, dataset_id: int,
               name: str, *, label_name: str = "target",
               label_table: Mapping[str, int] | None = None, append: bool = False,
               progress: ProgressFn | None = None) -> ExportResult:
        """Write ``cases`` as ``Dataset{ID:03d}_{name}`` in the raw folder (worker thread)."""
        result = export_dataset(cases, folders.raw, dataset_id, name, label_name=label_name,
                                label_table=label_table, append=append, progress=progress)
        self.state.last_export = result
        return result

    @staticmethod
    def export_message(result: ExportResult) -> str:
        verb = "Added" if result.appended else "Exported"
        text = (f"{verb} {len(result.cases)} case(s) ({result.n_corrected} corrected, "
                f"{result.n_zero_shot} zero-shot) to {result.folder}.")
        if result.label_table and len(result.label_table) > 1:
            text += f" Classes: {format_label_table(result.label_table)}."
        if result.converted:
            text += " Converted to the dataset's channels: " + ", ".join(result.converted)
        return text

    # -- training job ---------------------------------------------------------------------
    def locate_job(self, folders: NnUNetFolders | None, dataset_id: int) -> dict | None:
        """Find this dataset's job; returns its ``job.json`` when a job other than the one
        shown was found (its schedule, device and configuration, for the fields), else None."""
        from napari_medclipsam.nnunet.job import job_dir_for

        try:
            job_dir = job_dir_for(folders, dataset_id) if folders is not None else None
        except InputError:
            job_dir = None
        if job_dir == self.state.job_dir:
            return None
        self.state.job_dir = job_dir
        if job_dir is None:
            return None
        try:
            job = json.loads((job_dir / "job.json").read_text())
        except (OSError, ValueError):
            return None
        lr_min = (job.get("schedule") or {}).get("lr_min")
        if lr_min is not None:
            self.state.lr_min = float(lr_min)
        return job

    def refresh(self) -> JobStatus:
        """Read the job's status (a JSON file, a pid check and the log's tail: cheap)."""
        from napari_medclipsam.nnunet.job import read_status

        job_dir = self.state.job_dir
        if job_dir is None:
            status = JobStatus()
        else:
            raw = read_status(job_dir, log_lines=400)
            status = JobStatus.from_dict({**raw, "log_tail": filter_log(raw.get("log_tail"))})
        self.state.status = status
        return status

    def full_log(self) -> tuple[Path | None, str]:
        """The shown job's whole log (nnU-Net's plans and network dumps included)."""
        return full_log(self.state.job_dir)

    def iteration_cost(self, device_choice: str = "auto", configuration: str = "2d"
                       ) -> tuple[str, float | None, str]:
        """``(device, measured seconds per iteration or None, how the device was found)``:
        the device kind of the Device field (:func:`guess_device`) and, when this dataset's
        last run was on it with this configuration, the cost measured there."""
        device, why = guess_device(device_choice)
        job_dir = self.state.job_dir
        if job_dir is None:
            return device, None, why
        from napari_medclipsam.nnunet.job import read_status

        job = _read_json_file(job_dir / "job.json")
        if job.get("configuration", configuration) != configuration:
            return device, None, why
        return device, measured_seconds_per_iteration(
            read_status(job_dir, log_lines=0), job.get("schedule") or {}, device), why

    def estimate(self, schedule: EnsembleSchedule, device_choice: str = "auto",
                 configuration: str = "2d", *, cores: int | None = None,
                 epochs_done: int = 0) -> TrainingEstimate:
        """How long ``schedule`` takes here: the cost per iteration measured in this
        dataset's last run when it ran on the same device, else the table's
        (:func:`estimate_training`); ``epochs_done`` for a Resume."""
        device, measured, why = self.iteration_cost(device_choice, configuration)
        return estimate_training(schedule, device, configuration, cores=cores,
                                 seconds_per_iteration=measured, why=why,
                                 epochs_done=epochs_done)

    def start(self, folders: NnUNetFolders, dataset_id: int, schedule: EnsembleSchedule, *,
              configuration: str = "2d", device: str = "auto", resume: bool = False,
              restart: bool = False, data_workers: int | None = None) -> Path:
        """Start (or resume) the training in a background process; returns its job folder."""
        from napari_medclipsam.nnunet.job import dataset_name_for, start_training

        try:
            dataset_name_for(folders, dataset_id)
        except InputError:
            raise InputError(f"There is no dataset {dataset_id} in {folders.raw} yet: choose "
                             "the image and its labels and click Export first.") from None
        try:
            job_dir = start_training(dataset_id, schedule, folders=folders,
                                     configuration=configuration, device=device,
                                     resume=resume, restart=restart,
                                     data_workers=data_workers)
        except InputError as exc:
            raise InputError(in_gui_words(str(exc))) from exc
        self.state.job_dir = job_dir
        self.state.lr_min = schedule.lr_min
        return job_dir

    def cancel(self) -> bool:
        """Stop the running training's process tree (waits for it: call in a worker).
        False when nothing was running."""
        from napari_medclipsam.nnunet.job import cancel

        if self.state.job_dir is None:
            return False
        return bool(cancel(self.state.job_dir))

    @staticmethod
    def checkpoints(folders: NnUNetFolders | None, dataset_id: int, configuration: str
                    ) -> tuple[Path | None, list[Path]]:
        """The trained model's folder and its ensemble checkpoints (none yet: [])."""
        from napari_medclipsam.nnunet.ensemble import list_checkpoints
        from napari_medclipsam.nnunet.job import model_dir_for

        if folders is None:
            return None, []
        try:
            model_dir = model_dir_for(folders, dataset_id, configuration)
        except InputError:
            return None, []
        return model_dir, list_checkpoints(model_dir)

    # -- prediction -----------------------------------------------------------------------
    @staticmethod
    def _key(model_dir: Path, checkpoints: Sequence[Path], device: str) -> tuple:
        return str(model_dir), tuple(Path(p).name for p in checkpoints), device

    def has_predictor(self, model_dir: Path, checkpoints: Sequence[Path], device: str) -> bool:
        """Whether this ensemble is loaded already (a prediction then starts at once)."""
        return self.predictor is not None and \
            self._predictor_key == self._key(model_dir, checkpoints, device)

    def predict(self, image: np.ndarray, spacing: Sequence[float] | None, model_dir: Path,
                checkpoints: Sequence[Path], *, device: str = "auto", rgb: bool = False,
                source: str = "", review_slices: bool = True,
                progress: ProgressFn | None = None,
                should_stop: StopFn | None = None) -> Prediction:
        """Segment ``image`` ((Y, X), (Y, X, 3) with ``rgb``, or (Z, Y, X)) with the
        checkpoint ensemble (loaded once and kept); worker thread. The prediction becomes the
        last one and its review queue the current queue: a stack's slices (``review_slices``,
        for a 2-D model), else one row for the whole image or volume."""
        from napari_medclipsam.nnunet.ensemble import load_ensemble

        key = self._key(model_dir, checkpoints, device)
        predictor = self.predictor if self._predictor_key == key else None
        if predictor is None:
            predictor = load_ensemble(model_dir, list(checkpoints), device=device)
        result = predictor.predict_image(np.asarray(image), spacing, rgb=rgb,
                                         should_stop=should_stop, progress=progress)
        self.predictor, self._predictor_key = predictor, key
        names = tuple(result.class_names) or ("background", "target")
        values = tuple(result.label_values) or tuple(range(len(names)))
        stack = (review_slices and result.mask.ndim == 3 and not rgb
                 and result.mask.shape[0] > 1)
        prediction = Prediction(source, result.foreground.astype(np.float32), result.mask,
                                result.entropy.astype(np.float32), names, values,
                                result.n_checkpoints, stack)
        self.use_prediction(prediction)
        return prediction

    def use_prediction(self, prediction: Prediction) -> list[ReviewItem]:
        """Make ``prediction`` the last one and its rows the review queue."""
        items = self.queue_from_prediction(prediction)
        self.state.last_prediction = prediction
        self._set_queue(items, None, (prediction.class_names, prediction.label_values))
        return items

    # -- review queue ---------------------------------------------------------------------
    @staticmethod
    def queue_from_prediction(prediction: Prediction) -> list[ReviewItem]:
        """Review rows of a prediction, most uncertain first: a stack's slices by mean
        entropy, or one row for a 2-D image."""
        from napari_medclipsam.nnunet.ensemble import rank_slices
        from napari_medclipsam.nnunet.export import safe_case_id

        base = safe_case_id(prediction.source or "image")
        if not prediction.stack:
            return [ReviewItem(base, prediction.source, float(prediction.entropy.mean()),
                               prediction.source)]
        return [ReviewItem(f"{base}_z{z:03d}", f"{prediction.source} z={z}", h,
                           prediction.source, z)
                for z, h in rank_slices(prediction.entropy, axis=0)]

    def load_ranking(self, folder: str | Path, images_dir: str | Path | None = None
                     ) -> list[ReviewItem]:
        """The review queue of a folder prediction (``medclipsam nnunet predict``): the cases
        of its ``uncertainty_ranking.csv`` in its order (most uncertain first).

        Parameters
        ----------
        folder : path
            The prediction folder (``uncertainty_ranking.csv``, ``masks/``, ``probability/``,
            ``uncertainty/``, ``ensemble.json``).
        images_dir : path, optional
            The folder of the predicted images; default the one ``ensemble.json`` names.
        """
        from napari_medclipsam.core.io import SUPPORTED

        folder = Path(folder)
        ranking = folder / RANKING_FILE
        if not ranking.is_file():
            raise InputError(f"No {RANKING_FILE} in {folder}: choose the folder a folder "
                             "prediction wrote (it holds uncertainty_ranking.csv and masks/).")
        info = _ensemble_info(folder)
        images_dir = images_dir or self.recorded_images_dir(folder)
        if not images_dir:
            raise InputError(f"{folder} does not say which images were predicted: choose "
                             "their folder too.")
        images_dir = Path(images_dir)
        if not images_dir.is_dir():
            raise InputError(f"The images folder {images_dir} does not exist.")
        with open(ranking, newline="") as f:
            rows = list(csv.DictReader(f))
        items = []
        for row in rows:
            case = row.get("case", "")
            image = next((p for pattern in (f"{case}_0000.*", f"{case}.*")
                          for p in sorted(images_dir.glob(pattern))
                          if p.name.lower().endswith(SUPPORTED)), None)
            mask = next(iter(sorted((folder / "masks").glob(f"{case}.*"))), None)
            if image is None or mask is None:
                where = images_dir if image is None else folder / "masks"
                raise InputError(f"No {'image' if image is None else 'mask'} for case "
                                 f"{case!r} in {where}: is this the folder that was predicted?")
            prob = folder / "probability" / f"{case}.tif"
            unc = folder / "uncertainty" / f"{case}.tif"
            items.append(ReviewItem(
                case, case, float(row.get("mean_entropy") or "nan"), "",
                files=RankingFiles(image, mask, prob if prob.is_file() else None,
                                   unc if unc.is_file() else None)))
        if not items:
            raise InputError(f"{ranking} lists no cases.")
        names = tuple(info.get("classes") or ("background", "target"))
        labels = info.get("labels") or {}
        values = (0, *(int(labels.get(n, i)) for i, n in enumerate(names[1:], 1)))
        self._set_queue(items, folder, (names, values))
        return items

    @staticmethod
    def recorded_images_dir(folder: str | Path) -> Path | None:
        """The images folder a folder prediction names in its ``ensemble.json`` (if any)."""
        info = _ensemble_info(Path(folder))
        value = info.get("input") or info.get("input_dir")
        return Path(value) if value else None

    def _set_queue(self, items: list[ReviewItem], folder: Path | None,
                   classes: tuple[tuple[str, ...], tuple[int, ...]]) -> None:
        self.state.review = items
        self.state.review_folder = folder
        self.state.review_classes = classes
        self.state.current = None

    def read_folder_maps(self, index: int) -> FolderMaps:
        """The mask, probability and uncertainty maps of a folder row (the mask in the
        label values: a binary PNG's 0/255 reads as 0/1). Keeps the mask as the row's
        automatic mask."""
        from napari_medclipsam.core.io import read_image

        item = self._item(index)
        if item.files is None:
            raise InputError(f"Row {item.title!r} is not from a folder prediction.")
        names, values = self.state.review_classes
        mask = np.asarray(read_image(item.files.mask).data)
        if mask.ndim == 3 and item.files.mask.suffix.lower() == ".png":
            mask = mask[..., 0]
        if len(names) <= 2:
            mask = (mask > 0).astype(np.uint8)
        maps = FolderMaps(
            mask,
            _read_tiff(item.files.probability) if item.files.probability else None,
            _read_tiff(item.files.uncertainty) if item.files.uncertainty else None,
            names, values)
        item.auto_mask = mask
        return maps

    def _item(self, index: int) -> ReviewItem:
        if not 0 <= index < len(self.state.review):
            raise InputError("Choose a row of the review queue first (Predict, or Load "
                             "ranking...).")
        return self.state.review[index]

    def open_review(self, index: int, source: str | None = None) -> ReviewItem:
        """Open a row: its clock starts and its edit count restarts."""
        item = self._item(index)
        if source is not None:
            item.source = source
        item.opened_at = self.clock()
        item.edits = 0
        self.state.current = index
        return item

    def note_edit(self, count: int = 1) -> None:
        """The view counted ``count`` edits of the mask while the current row is open."""
        if self.state.current is not None and 0 <= self.state.current < len(self.state.review):
            self.state.review[self.state.current].edits += int(count)

    def automatic_mask(self, index: int) -> np.ndarray:
        """The row's mask as predicted (a slice of the last prediction, or the folder's
        mask file)."""
        item = self._item(index)
        if item.auto_mask is not None:
            return item.auto_mask
        prediction = self.state.last_prediction
        if item.files is not None:
            return self.read_folder_maps(index).mask
        if prediction is None or prediction.source != item.source:
            raise InputError("The prediction of this row is gone: predict again.")
        return prediction.mask[item.slice_index] if item.slice_index is not None \
            else prediction.mask

    def prepare_review(self, index: int, status: str, image: np.ndarray,
                       final_mask: np.ndarray | None = None, *, folders: NnUNetFolders,
                       dataset_id: int, name: str, label_name: str = "target",
                       spacing: Sequence[float] | None = None,
                       origin: Sequence[float] | None = None, rgb: bool = False) -> ReviewJob:
        """Mark row ``index`` as ``"accepted"`` (the automatic mask as it is) or
        ``"corrected"`` (``final_mask``, the edited one): the time spent stops now.

        ``image`` is the row's image (a stack's slice: that slice). The case goes into the
        dataset with this ID (its existing name is used; ``name`` names a new one) by
        :meth:`submit_review`.
        """
        if status not in ("accepted", "corrected"):
            raise InputError(f"A row is 'accepted' or 'corrected'; got {status!r}.")
        item = self._item(index)
        if item.opened_at is None or self.state.current != index:
            raise InputError(f"Open row {item.title!r} first (click it), then mark it.")
        auto = np.asarray(self.automatic_mask(index))
        final = auto if status == "accepted" else np.asarray(final_mask)
        if final.shape != auto.shape:
            raise InputError(f"The mask {final.shape} does not match the prediction "
                             f"{auto.shape} of {item.title!r}.")
        seconds = max(0.0, float(self.clock() - item.opened_at))
        names, values = self.state.review_classes
        table = dict(zip(names[1:], values[1:], strict=True)) if len(names) > 2 else None
        existing = find_dataset(folders.raw, dataset_id)
        if existing is not None:
            name = existing.name.split("_", 1)[1]
        cases = cases_from_arrays(np.asarray(image), np.array(final, copy=True), item.case,
                                  spacing=spacing, origin=origin, corrected=True, rgb=rgb,
                                  label_table=table)
        return ReviewJob(index, cases[0], np.array(auto, copy=True), status, seconds,
                         item.edits, folders.raw, dataset_id, name, table, label_name)

    def submit_review(self, job: ReviewJob, *, verify: bool = True) -> ReviewRecord:
        """Add the reviewed case to the dataset (appended, or its label replaced if the case
        is there already) with its review record; worker thread. The row is marked and its
        clock restarts (a second review measures new effort)."""
        from napari_medclipsam.nnunet.review import review_case, review_summary

        record = review_case(job.case, job.auto_mask, job.raw, job.dataset_id, job.name,
                             seconds=job.seconds, edits=job.edits, status=job.status,
                             label_table=job.label_table, verify=verify,
                             label_name=job.label_name)
        folder = find_dataset(job.raw, job.dataset_id)
        summary = review_summary(folder) if folder is not None else None
        item = self.state.review[job.index] if job.index < len(self.state.review) else None
        if item is not None and item.case == job.case.case_id:
            item.record = record
            item.opened_at = self.clock()
            item.edits = 0
        self.state.summary = summary
        return record

    def summary(self, folders: NnUNetFolders | None, dataset_id: int) -> ReviewSummary | None:
        """The review summary of the dataset with this ID (None when there is none)."""
        from napari_medclipsam.nnunet.review import review_summary

        folder = find_dataset(folders.raw, dataset_id) if folders is not None else None
        self.state.summary = review_summary(folder) if folder is not None else None
        return self.state.summary


def _read_json_file(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _ensemble_info(folder: Path) -> dict:
    return _read_json_file(folder / "ensemble.json")


def _read_tiff(path: Path) -> np.ndarray:
    import tifffile

    return np.asarray(tifffile.imread(str(path)), dtype=np.float32)
