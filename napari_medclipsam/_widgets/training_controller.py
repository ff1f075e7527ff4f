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
                f"(max ln {self.n_classes} = {self.max_entropy:.3f}).")
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
        status = JobStatus.from_dict(read_status(job_dir)) if job_dir is not None \
            else JobStatus()
        self.state.status = status
        return status

    def start(self, folders: NnUNetFolders, dataset_id: int, schedule: EnsembleSchedule, *,
              configuration: str = "2d", device: str = "auto", resume: bool = False,
              restart: bool = False, data_workers: int | None = None) -> Path:
        """Start (or resume) the training in a background process; returns its job folder."""
        from napari_medclipsam.nnunet.job import start_training

        job_dir = start_training(dataset_id, schedule, folders=folders,
                                 configuration=configuration, device=device, resume=resume,
                                 restart=restart, data_workers=data_workers)
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
            raise InputError(f"No {RANKING_FILE} in {folder}: choose the output folder of a "
                             "folder prediction (medclipsam nnunet predict).")
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


def _ensemble_info(folder: Path) -> dict:
    try:
        return json.loads((folder / "ensemble.json").read_text())
    except (OSError, ValueError):
        return {}


def _read_tiff(path: Path) -> np.ndarray:
    import tifffile

    return np.asarray(tifffile.imread(str(path)), dtype=np.float32)
