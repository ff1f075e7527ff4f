"""The review record: per case, how much work the automatic mask still needed (no Qt).

A review queue shows the ensemble's most uncertain cases (``uncertainty_ranking.csv``); a person
accepts the predicted ("automatic") mask as it is or corrects it. :func:`review_case` adds the
final mask to the nnU-Net dataset and records the effort beside the case's entry in
``medclipsam_cases.json``::

    "case_07": {"corrected": true, "source": ..., "exported": ...,
                "review": {"status": "corrected", "seconds": 41.5, "edits": 6,
                           "dice_auto_final": 0.912, "reviewed_at": "2025-...", "count": 1}}

Conventions
-----------
* ``status`` is ``"accepted"`` when the final mask equals the automatic one (accepted
  unmodified) and ``"corrected"`` otherwise; it is derived from the two masks when not given,
  and a given status that contradicts them is an InputError.
* Both are human-verified, so the case goes into the dataset as ``corrected: true`` (the
  ``--append --corrected`` export) with ``review.status`` telling them apart. A case not yet in
  the dataset is appended (a new dataset is created if there is none); a case already there (a
  raw zero-shot pseudo-label, or a case reviewed before) has its label replaced
  (:func:`~napari_medclipsam.nnunet.export.replace_label`), never duplicated.
* ``dice_auto_final`` is :func:`napari_medclipsam.core.metrics.dice` between the automatic and
  the final mask; for a dataset with several labels it is the mean over the labels present in
  either mask of the Dice of that label (1.0 when both masks are empty).
* Reviewing a case again updates its one record: ``seconds`` and ``edits`` add up (the effort
  spent on the case in all), ``status``, ``dice_auto_final`` and ``reviewed_at`` are the latest
  review's, ``count`` says how many reviews there were.
* Every write of ``medclipsam_cases.json`` is atomic (a temporary file renamed into place).
  Two programs reviewing the same dataset at the same time are not coordinated.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from ..core.errors import InputError
from ..core.metrics import dice
from .export import (
    CASES_FILE,
    LABEL_VALUES_KEY,
    ExportCase,
    case_exists,
    check_label_table,
    dataset_folder_name,
    export_dataset,
    find_dataset,
    label_table_of,
    read_case_list,
    replace_label,
    write_json,
)

STATUSES = ("accepted", "corrected")


@dataclass(frozen=True)
class ReviewRecord:
    """One case's review, as stored under ``"review"`` in ``medclipsam_cases.json``.

    Attributes
    ----------
    status : {"accepted", "corrected"}
        Accepted unmodified, or corrected.
    seconds : float
        Time spent reviewing the case (summed over its reviews).
    edits : int
        Number of edits (brush strokes, fills, erasures; summed over its reviews).
    dice_auto_final : float or None
        Dice between the automatic and the final mask (latest review); None if not measured.
    reviewed_at : str
        ISO time of the latest review (local time, seconds).
    count : int
        How many times the case was reviewed.
    """

    status: str
    seconds: float
    edits: int
    dice_auto_final: float | None
    reviewed_at: str
    count: int = 1

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping) -> ReviewRecord:
        return cls(str(data["status"]), float(data["seconds"]), int(data["edits"]),
                   None if data.get("dice_auto_final") is None
                   else float(data["dice_auto_final"]),
                   str(data.get("reviewed_at", "")), int(data.get("count", 1)))


def dice_auto_final(auto: np.ndarray, final: np.ndarray,
                    label_values: Sequence[int] | None = None) -> float:
    """Dice between the automatic and the final mask.

    Parameters
    ----------
    auto, final : np.ndarray
        Label maps of one shape.
    label_values : sequence of int, optional
        Several labels: the mean over those of these values present in either mask of the
        per-label Dice (1.0 when none is present). None: binary, values > 0 are the target.
    """
    auto, final = np.asarray(auto), np.asarray(final)
    if auto.shape != final.shape:
        raise InputError(f"The automatic mask {auto.shape} and the final mask {final.shape} "
                         "differ in shape.")
    if label_values is None:
        return float(dice(auto > 0, final > 0))
    present = [v for v in label_values if (auto == v).any() or (final == v).any()]
    if not present:
        return 1.0
    return float(np.mean([dice(auto == v, final == v) for v in present]))


def _check(status: str, seconds: float, edits: int) -> None:
    if status not in STATUSES:
        raise InputError(f"The review status must be 'accepted' or 'corrected'; got "
                         f"{status!r}.")
    if not np.isfinite(seconds) or seconds < 0:
        raise InputError(f"The review time must be a number of seconds >= 0; got {seconds!r}.")
    if isinstance(edits, bool) or int(edits) != edits or edits < 0:
        raise InputError(f"The number of edits must be an integer >= 0; got {edits!r}.")


def _merge(previous: Mapping | None, status: str, seconds: float, edits: int,
           dice_value: float | None, reviewed_at: str | None) -> ReviewRecord:
    """The new record: effort summed with ``previous``, the outcome replaced."""
    _check(status, seconds, edits)
    old = ReviewRecord.from_json(previous) if previous else None
    return ReviewRecord(
        status, round(float(seconds) + (old.seconds if old else 0.0), 3),
        int(edits) + (old.edits if old else 0),
        None if dice_value is None else round(float(dice_value), 6),
        reviewed_at or time.strftime("%Y-%m-%dT%H:%M:%S"), (old.count if old else 0) + 1)


def record_review(folder: str | Path, case_id: str, *, status: str, seconds: float,
                  edits: int, dice_auto_final: float | None = None,
                  reviewed_at: str | None = None) -> ReviewRecord:
    """Record (or update) the review of a case already in the dataset; masks untouched.

    For a caller that wrote the label itself; :func:`review_case` does both. Re-reviewing
    adds ``seconds`` and ``edits`` to the case's record and replaces the rest.
    """
    folder = Path(folder)
    cases = read_case_list(folder)
    if case_id not in cases:
        raise InputError(f"{folder.name} has no case {case_id!r} in {CASES_FILE}: export it "
                         "first (or use review_case, which does).")
    record = _merge(cases[case_id].get("review"), status, seconds, edits, dice_auto_final,
                    reviewed_at)
    cases[case_id] = {**cases[case_id], "review": record.to_json()}
    write_json(folder / CASES_FILE, cases)
    return record


def review_case(case: ExportCase, auto_mask: np.ndarray, raw_dir: str | Path,
                dataset_id: int, name: str, *, seconds: float, edits: int,
                status: str | None = None, label_table: Mapping[str, int] | None = None,
                verify: bool = True, channel_name: str | None = None,
                label_name: str = "target") -> ReviewRecord:
    """Put a reviewed case into the dataset and record the effort it took.

    Parameters
    ----------
    case : ExportCase
        The image and its final (accepted or corrected) mask, e.g. from
        :func:`~napari_medclipsam.nnunet.export.cases_from_arrays` (one 2-D slice or volume).
    auto_mask : np.ndarray
        The automatic (predicted) mask the review started from, in the values of the final
        mask (``EnsemblePrediction.mask``); same shape as ``case.mask``.
    raw_dir, dataset_id, name :
        The dataset, as for :func:`~napari_medclipsam.nnunet.export.export_dataset`.
    seconds, edits :
        The effort of this review.
    status : {"accepted", "corrected"}, optional
        Default: derived from the masks (equal -> accepted).
    label_table : dict of str to int, optional
        Default: ``case.label_table``, else the dataset's table when it has several labels,
        else binary.
    verify : bool
        Run nnU-Net's dataset check after the change (a few seconds; a queue may prefer to check
        once before training).
    channel_name, label_name :
        Only used when the review creates the dataset.

    Returns
    -------
    ReviewRecord
        The case's record after this review.
    """
    final = np.asarray(case.mask)
    auto = np.asarray(auto_mask)
    if auto.shape != final.shape:
        raise InputError(f"The automatic mask {auto.shape} and the final mask {final.shape} "
                         f"of {case.case_id} differ in shape.")
    folder = find_dataset(raw_dir, dataset_id)
    if folder is not None and folder.name != dataset_folder_name(dataset_id, name):
        raise InputError(f"Dataset ID {dataset_id} is {folder.name}, not "
                         f"{dataset_folder_name(dataset_id, name)}.")
    table = label_table if label_table is not None else case.label_table
    ds_json = json.loads((folder / "dataset.json").read_text()) if folder else None
    if table is None and ds_json is not None and (
            LABEL_VALUES_KEY in ds_json or len(label_table_of(ds_json)) > 1):
        table = label_table_of(ds_json)
    table = check_label_table(table) if table is not None else None
    multi = table is not None and len(table) > 1
    same = (np.array_equal(auto, final) if multi
            else np.array_equal(auto > 0, final > 0))
    derived = "accepted" if same else "corrected"
    if status is None:
        status = derived
    elif status != derived and status in STATUSES:
        raise InputError(f"{case.case_id} is recorded as {status!r} but the final mask "
                         + ("equals" if same else "differs from")
                         + f" the automatic one: record it as {derived!r}.")
    value = dice_auto_final(auto, final, list(table.values()) if multi else None)
    exists = folder is not None and (case.case_id in read_case_list(folder)
                                     or case_exists(folder, case.case_id))
    previous = read_case_list(folder).get(case.case_id, {}).get("review") if exists else None
    record = _merge(previous, status, seconds, edits, value, None)
    if exists:
        replace_label(folder, case.case_id, final, label_table=table, corrected=True,
                      record={"review": record.to_json()}, verify=verify)
    else:
        new = replace(case, corrected=True, label_table=table,
                      record={**case.record, "review": record.to_json()})
        export_dataset([new], raw_dir, dataset_id, name, label_table=table, append=True,
                       verify=verify, channel_name=channel_name, label_name=label_name)
    return record


def read_reviews(folder: str | Path) -> dict[str, ReviewRecord]:
    """case -> its review record, for the reviewed cases of a dataset."""
    return {c: ReviewRecord.from_json(e["review"]) for c, e in read_case_list(folder).items()
            if isinstance(e, Mapping) and e.get("review")}


@dataclass(frozen=True)
class ReviewSummary:
    """The review workload of a dataset (the figure users report).

    ``share_accepted``, ``mean_seconds``, ``mean_edits`` and ``mean_dice_auto_final`` are None
    when nothing was reviewed (the Dice also when no review measured one). Means are per
    reviewed case (a case's seconds and edits summed over its reviews).
    """

    n_cases: int
    n_reviewed: int
    n_accepted: int
    n_corrected: int
    share_accepted: float | None
    total_seconds: float
    mean_seconds: float | None
    mean_edits: float | None
    mean_dice_auto_final: float | None

    def format(self) -> str:
        """One line, e.g. ``12 of 40 cases reviewed: 58% accepted unmodified, ...``."""
        if not self.n_reviewed:
            return f"0 of {self.n_cases} cases reviewed."
        text = (f"{self.n_reviewed} of {self.n_cases} cases reviewed: "
                f"{100 * self.share_accepted:.0f}% accepted unmodified, "
                f"{self.mean_seconds:.1f} s and {self.mean_edits:.1f} edits per case "
                f"({self.total_seconds / 60:.1f} min in all)")
        if self.mean_dice_auto_final is not None:
            text += f", Dice automatic vs final {self.mean_dice_auto_final:.3f}"
        return text + "."


def review_summary(folder: str | Path) -> ReviewSummary:
    """Summarise the review records of a dataset folder (``RAW/Dataset{ID:03d}_{Name}``)."""
    cases = read_case_list(folder)
    reviews = list(read_reviews(folder).values())
    n = len(reviews)
    accepted = sum(r.status == "accepted" for r in reviews)
    total = float(sum(r.seconds for r in reviews))
    dices = [r.dice_auto_final for r in reviews if r.dice_auto_final is not None]
    return ReviewSummary(
        n_cases=len(cases), n_reviewed=n, n_accepted=accepted, n_corrected=n - accepted,
        share_accepted=accepted / n if n else None, total_seconds=total,
        mean_seconds=total / n if n else None,
        mean_edits=float(np.mean([r.edits for r in reviews])) if n else None,
        mean_dice_auto_final=float(np.mean(dices)) if dices else None)
