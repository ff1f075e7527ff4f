"""Training data of a VLSM: image + label files, the classes they hold, captions from masks.

Two sources:

* **folders** (:func:`folder_cases`): ``--images DIR --masks DIR`` paired by file name
  (``case_01.png`` with ``case_01.png`` or ``case_01.nii.gz``...). One class name: every
  value above 0 is that class (binary masks, 0/255 or 0/1). Several names: label value
  ``k`` is the ``k``-th name.
* **an nnU-Net raw dataset** (:func:`dataset_cases`), e.g. the one the training dock
  exported: ``dataset.json``'s labels name the classes (one prompt per class), its
  ``imagesTr/CASE_0000.EXT`` (channel 0) and ``labelsTr/CASE.EXT`` are the pairs;
  ``corrected_only`` keeps the cases marked corrected in ``medclipsam_cases.json``.

Every (image, class) pair is one sample, also where the class is absent (an empty target
teaches the model that the named thing is not there). A 3-D volume gives its axial slices
(axis 0) holding a label, and as many slices without one (evenly spaced), since VLSMs are
2-D. Cases are split into training and validation by name (:func:`split_by_name`), so the
slices of one volume stay together.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.errors import InputError
from ..nnunet.export import CASES_FILE

Log = Callable[[str], None]


@dataclass(frozen=True)
class TrainingCase:
    """One image file, its label file and the classes to learn from it.

    Attributes
    ----------
    name : str
        The case name (the split key).
    image, labels : Path
    classes : tuple of (str, int or None)
        (class name, label value); value None: every value above 0.
    """

    name: str
    image: Path
    labels: Path
    classes: tuple[tuple[str, int | None], ...]


@dataclass
class Sample:
    """An image (or slice) in memory with one class: what the model trains on.

    Attributes
    ----------
    case : str
    index : int or None
        The slice (axis 0) of a volume; None for a 2-D image.
    rgb : ndarray
        HxWx3 uint8, as the model sees it.
    target : ndarray
        HxW bool, the class's mask.
    class_name : str
    captions : list of str
        Every caption the prompt set gives this sample (one is drawn per epoch).
    """

    case: str
    index: int | None
    rgb: np.ndarray
    target: np.ndarray
    class_name: str
    captions: list[str]
    image_key: int = 0  # samples of the same image (several classes) share it


def folder_cases(images: str | Path, masks: str | Path, class_names: Sequence[str],
                 log: Log | None = None) -> list[TrainingCase]:
    """Image/mask pairs of two folders, by file name.

    Raises
    ------
    InputError
        A folder missing, no class name, or no image with a mask.
    """
    from ..core.evaluate import list_masks

    say = log or (lambda line: None)
    names = [str(n).strip() for n in class_names if str(n).strip()]
    if not names:
        raise InputError("Name what the masks show: --class-name 'breast tumor' (one per "
                         "label value for masks of several labels).")
    image_files = list_masks(images)
    mask_files = list_masks(masks)
    classes = ((names[0], None),) if len(names) == 1 else tuple(
        (n, i + 1) for i, n in enumerate(names))
    cases, unpaired = [], []
    for stem, path in image_files.items():
        if stem in mask_files:
            cases.append(TrainingCase(stem, path, mask_files[stem], classes))
        else:
            unpaired.append(stem)
    if unpaired:
        shown = ", ".join(unpaired[:5]) + (", ..." if len(unpaired) > 5 else "")
        say(f"{len(unpaired)} image(s) without a mask of the same name in {masks}, left out: "
            f"{shown}")
    if not cases:
        raise InputError(f"No image in {images} has a mask of the same name in {masks}.")
    return cases


def dataset_cases(dataset: str | Path, corrected_only: bool = False,
                  log: Log | None = None) -> list[TrainingCase]:
    """The cases of an nnU-Net raw dataset (``RAW/Dataset001_NAME``), one class per label.

    Raises
    ------
    InputError
        Not a dataset folder, no labels besides the background, nothing to train on.
    """
    say = log or (lambda line: None)
    folder = Path(dataset).expanduser()
    if not (folder / "dataset.json").is_file():
        raise InputError(f"{folder}: no dataset.json; give an nnU-Net raw dataset folder "
                         "(RAW/Dataset001_NAME).")
    try:
        info = json.loads((folder / "dataset.json").read_text(encoding="utf-8-sig"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{folder}/dataset.json cannot be read ({exc}).") from exc
    ending = info.get("file_ending") if isinstance(info, dict) else None
    labels = info.get("labels") if isinstance(info, dict) else None
    if not isinstance(ending, str) or not isinstance(labels, dict):
        raise InputError(f"{folder}/dataset.json has no file_ending or labels.")
    classes = tuple(sorted(((str(k).replace("_", " "), int(v)) for k, v in labels.items()
                            if k != "background" and isinstance(v, int)
                            and not isinstance(v, bool) and v > 0), key=lambda c: c[1]))
    if not classes:
        raise InputError(f"{folder}/dataset.json names no label besides the background.")
    if len(info.get("channel_names", {}) or {}) > 1:
        say("The dataset has several channels; the VLSM sees channel 0 only.")
    corrected: set[str] | None = None
    if corrected_only:
        record = folder / CASES_FILE
        if not record.is_file():
            raise InputError(f"{folder}: no {CASES_FILE}, so which cases were corrected is "
                             "unknown; leave out --corrected-only to train on every case.")
        try:
            entries = json.loads(record.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InputError(f"{record} cannot be read ({exc}).") from exc
        corrected = {k for k, v in entries.items()
                     if isinstance(v, dict) and v.get("corrected") is True}
    cases, missing = [], []
    for label_file in sorted((folder / "labelsTr").glob(f"*{ending}")):
        case = label_file.name[: -len(ending)]
        if corrected is not None and case not in corrected:
            continue
        image = folder / "imagesTr" / f"{case}_0000{ending}"
        if not image.is_file():
            missing.append(case)
            continue
        cases.append(TrainingCase(case, image, label_file, classes))
    if missing:
        say(f"{len(missing)} case(s) have labels but no image (imagesTr/CASE_0000{ending}): "
            + ", ".join(missing[:5]))
    if not cases:
        which = "corrected " if corrected_only else ""
        raise InputError(f"{folder}: no {which}case with both an image and labels.")
    return cases


def split_by_name(names: Sequence[str], val_fraction: float = 0.15
                  ) -> tuple[list[str], list[str]]:
    """(training, validation) case names: names ordered by their SHA-1 (so the split does not
    depend on listing order or on which other cases exist), the first
    ``round(val_fraction * n)`` (at least one, when there are two or more) validate.

    Raises
    ------
    InputError
        Fewer than two cases.
    """
    unique = sorted(set(names))
    if len(unique) < 2:
        raise InputError(f"{len(unique)} case(s): training needs at least 2 (one to learn "
                         "from, one to validate on).")
    ordered = sorted(unique, key=lambda n: hashlib.sha1(n.encode()).hexdigest())
    n_val = min(len(unique) - 1, max(1, round(val_fraction * len(unique))))
    val = set(ordered[:n_val])
    return [n for n in unique if n not in val], [n for n in unique if n in val]


def _slices(labels: np.ndarray) -> list[int]:
    """Axial slices of a label volume to train on: those holding a label, and as many
    without (evenly spaced)."""
    has = labels.reshape(len(labels), -1).any(axis=1)
    full = [int(z) for z in np.flatnonzero(has)]
    empty = np.flatnonzero(~has)
    if len(empty) and full:
        take = np.linspace(0, len(empty) - 1, num=min(len(empty), len(full))).round()
        full += [int(empty[int(i)]) for i in np.unique(take)]
    return sorted(full)


def load_samples(cases: Sequence[TrainingCase], captions: Callable[[str, np.ndarray, np.ndarray],
                 list[str]], log: Log | None = None,
                 should_stop: Callable[[], bool] | None = None) -> list[Sample]:
    """Read every case (one bad case is reported and left out, the others go on).

    Parameters
    ----------
    captions : callable
        ``captions(class_name, target HxW bool, rgb HxWx3 uint8) -> list of str``.
    """
    from ..core.errors import CancelledError
    from ..core.io import auto_window, read_image, to_rgb_uint8

    say = log or (lambda line: None)
    samples: list[Sample] = []
    key = 0
    for case in cases:
        if should_stop is not None and should_stop():
            raise CancelledError("Cancelled.")
        try:
            image = read_image(case.image)
            labels = np.asarray(read_image(case.labels).data)
            data = np.asarray(image.data)
            if labels.ndim == 3 and labels.shape[-1] in (3, 4) and not image.is_volume:
                labels = labels[..., :3].max(axis=-1)  # a colour mask of a 2-D image
            if data.shape[: labels.ndim] != labels.shape:
                raise InputError(f"labels {labels.shape} do not match the image "
                                 f"{data.shape}")
            if image.is_volume:
                window = image.meta.get("window") or auto_window(data)
                planes = [(z, to_rgb_uint8(data[z], window), labels[z])
                          for z in _slices(labels)]
            else:
                planes = [(None, to_rgb_uint8(data, image.meta.get("window")), labels)]
            for index, rgb, plane in planes:
                for name, value in case.classes:
                    target = plane > 0 if value is None else plane == value
                    samples.append(Sample(case.name, index, rgb, target, name,
                                          captions(name, target, rgb), key))
                key += 1
        except CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - one bad case must not stop the others
            text = " ".join(str(exc).split())[:200]
            say(f"{case.name}: cannot be used ({text}); left out.")
    return samples
