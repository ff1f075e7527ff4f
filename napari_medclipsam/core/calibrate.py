"""Calibration from corrected cases: the chain's parameters chosen by cross-validated Dice.

A person who corrected a handful of masks holds what both seed codebases tune against (ground
truth) without having it for their test images. :func:`calibrate` searches the parameters that
differ between datasets (the authors' scripts: layer 9 / beta 1.0 for breast, 9 / 2.0 for
brain, 7 / 0.1 elsewhere, KMeans or Otsu, top-1 or top-2) on those cases, and says by k-fold
cross-validation whether the tuned settings beat the pipeline's own on cases they were not
tuned on.

>>> result = calibrate(pipeline, cases, SearchSpace.named("small"), folds=5)  # doctest: +SKIP
>>> result.config            # the tuned PipelineConfig (best on all N cases)  # doctest: +SKIP
>>> result.cv.tuned_dice, result.cv.default_dice, result.warning               # doctest: +SKIP
>>> write_calibration(result, "preset.json")                                   # doctest: +SKIP

The search (:class:`SearchSpace`)
---------------------------------
A plain grid: M2IB layer x beta (the saliency), threshold method, ``eta_c`` and top-K (the
coarse mask), prompt mode, box mode and box margin (SAM's prompts), the SAM backends given,
and optionally the text among candidate prompts. The pipeline's own value of every parameter
is always part of the grid, so "defaults" (the pipeline's config) is one column of the same
table. Box margins are given as fractions of the image's longer side and turned into one
number of pixels (the median image of the cases), the unit the preset stores. Settings that
cannot change the result are not tried twice: with point prompts, the box mode and margin are
the defaults'; with a CAM saliency, the M2IB layer and beta are.

Cost: a Dice table, computed once
---------------------------------
For each case (:func:`dice_table`):

1. every saliency map the grid needs, in one :func:`~.saliency.m2ib_saliencies` call per
   image (the ViT prefix once per layer, one M2IB optimisation per (prompt, layer, beta));
2. each SAM backend's image encoder once per image (the session's embedding cache);
3. for every post-processing combination: the threshold once per (map, method), the
   connected components once per (map, method, eta_c, top-K), the prompts, SAM's mask
   decoder once per distinct set of prompts (cached by the prompts' bytes: different
   combinations often give the same boxes), the largest components kept as the pipeline
   does, and the Dice against the correction.

Each table entry is the Dice of the mask :meth:`~.pipeline.ZeroShotPipeline.segment` gives
with that combination's config (the same maps, thresholds, prompts and SAM calls).
Cross-validation reads only the table.

Corrected cases on disk
-----------------------
:func:`dataset_case_files` lists the cases of an nnU-Net raw dataset exported by medclipsam
that its per-case record marks ``"corrected": true`` (the command line's ``--dataset`` and the
dock's "Tune on my corrections" read it alike); :func:`read_cases` reads :class:`CaseFile` s
into :class:`CalibrationCase` s, one line per case it cannot use.

Cross-validation (:func:`cross_validate`)
-----------------------------------------
Cases are sorted by name and split by scikit-learn's ``KFold(shuffle=True,
random_state=seed)``: reproducible for the same case names and seed. In each fold the
combination with the best mean Dice on the training cases is chosen (ties: the one differing
from the defaults in fewest settings, then the grid's order) and its mean Dice on the held-out
cases is reported next to the defaults' on the same cases. The final preset is the best
combination on all N cases; the numbers it records as its expected quality are the
cross-validated ones, measured only on cases each fold's choice was not tuned on. A warning
says so when the gain is not above two standard errors of the per-fold gains (or not
positive): the tuned settings may then be no better than the defaults on new images.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import (
    BOX_MODES,
    PROMPT_MODES,
    SALIENCY_METHODS,
    THRESHOLD_METHODS,
    PipelineConfig,
)
from .errors import CancelledError, InputError

__all__ = ["GRIDS", "CalibrationCase", "CalibrationResult", "CaseFile", "Combination",
           "CrossValidation", "DatasetCases", "DiceTable", "Fold", "SearchSpace", "calibrate",
           "calibration_paths", "check_calibration_paths", "check_case_count",
           "cross_validate", "dataset_case_files", "dice_table", "plot_folds", "read_cases",
           "write_calibration"]

ProgressFn = Callable[[str, float], None]
StopFn = Callable[[], bool]

#: Named grids (:meth:`SearchSpace.named`).
GRIDS = ("default", "small")
#: Means are compared after rounding to this many decimals, so float summation order never
#: decides between two combinations with the same Dice on every case.
_DECIMALS = 12
#: Share of the progress bar the Dice table takes (cross-validation is the rest).
_TABLE_SHARE = 0.98


def _check_stop(should_stop: StopFn | None) -> None:
    if should_stop is not None and should_stop():
        raise CancelledError("Calibration cancelled.")


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True, eq=False)
class CalibrationCase:
    """One corrected case.

    Attributes
    ----------
    name : str
        Unique name (file name without suffix, or the nnU-Net case id).
    image : np.ndarray
        HxWx3 uint8 RGB, exactly as CLIP and SAM see it (after windowing,
        :func:`~napari_medclipsam.core.io.to_rgb_uint8`).
    mask : np.ndarray
        HxW, the corrected mask; nonzero is foreground.
    prompt : tuple of str
        The case's own prompt (an ensemble when several); may be empty when candidate prompts
        (:attr:`SearchSpace.prompts`) are given.
    """

    name: str
    image: np.ndarray
    mask: np.ndarray
    prompt: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        image = np.asarray(self.image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise InputError(f"{self.name}: expected an HxWx3 uint8 RGB image; got shape "
                             f"{image.shape}, dtype {image.dtype} (convert it with "
                             "napari_medclipsam.core.io.to_rgb_uint8).")
        mask = np.asarray(self.mask)
        if mask.shape != image.shape[:2]:
            raise InputError(f"{self.name}: the corrected mask is {mask.shape} but the image "
                             f"is {image.shape[:2]}; they must have the same size.")
        texts = (self.prompt,) if isinstance(self.prompt, str) else tuple(self.prompt)
        object.__setattr__(self, "prompt", tuple(t.strip() for t in texts if t.strip()))
        object.__setattr__(self, "mask", mask > 0)


def check_case_count(n_cases: int, folds: int) -> None:
    """Refuse too few cases for ``folds``-fold cross-validation, in one line saying how many
    are needed and found.

    Raises
    ------
    InputError
    """
    if folds < 2:
        raise InputError(f"cross-validation needs at least 2 folds; got {folds}.")
    if n_cases < folds:
        hint = (f"Correct more cases or pass --folds {n_cases}." if n_cases >= 2
                else "Correct more cases.")
        raise InputError(f"calibrate needs at least {folds} corrected cases for {folds}-fold "
                         f"cross-validation; found {n_cases}. {hint}")


# --------------------------------------------------------------------------- cases on disk


@dataclass(frozen=True)
class CaseFile:
    """A corrected case on disk: its name, image file and mask file."""

    name: str
    image: Path
    mask: Path


@dataclass
class DatasetCases:
    """The corrected cases of an exported nnU-Net raw dataset (:func:`dataset_case_files`).

    Attributes
    ----------
    folder : Path
        The dataset folder (``RAW/Dataset001_NAME``).
    files : list of CaseFile
        Corrected cases whose image and mask are both there, sorted by case name.
    missing : list of str
        One line per corrected case whose image or mask file is missing (skipped).
    uncorrected : int
        Cases not marked corrected (raw zero-shot pseudo-labels): left out.
    labels : dict of str to int
        dataset.json's labels without the background: name -> value in ``labelsTr``.
    """

    folder: Path
    files: list[CaseFile]
    missing: list[str]
    uncorrected: int
    labels: dict[str, int] = field(default_factory=dict)


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except OSError as exc:
        raise InputError(f"{path}: cannot read {what} ({exc.strerror or exc}).") from exc
    except (UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"{path}: {what} is not valid JSON ({exc}).") from exc


def dataset_case_files(dataset: str | Path, cases_file: str, *, instead: str = ""
                       ) -> DatasetCases:
    """The corrected cases of an nnU-Net raw dataset exported by medclipsam.

    Parameters
    ----------
    dataset : str or Path
        ``RAW/Dataset001_NAME``: dataset.json, ``imagesTr/CASE_0000.EXT``,
        ``labelsTr/CASE.EXT`` and the per-case record ``cases_file``.
    cases_file : str
        The record's file name (:data:`napari_medclipsam.nnunet.export.CASES_FILE`): case
        name -> ``{"corrected": bool, ...}``.
    instead : str
        What to do instead when the dataset has no record (appended to that message).

    Raises
    ------
    InputError
        Not a folder, no dataset.json (or no ``file_ending`` in it), no record or an
        unreadable one; each message starts with the folder.
    """
    folder = Path(dataset)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder.")
    if not (folder / "dataset.json").is_file():
        raise InputError(f"{folder}: no dataset.json; give an nnU-Net raw dataset folder "
                         "(RAW/Dataset001_NAME).")
    if not (folder / cases_file).is_file():
        tail = f"; {instead}" if instead else ""
        raise InputError(f"{folder}: no {cases_file}, so which cases were corrected is "
                         f"unknown (the dataset was not exported by medclipsam){tail}.")
    info = _read_json(folder / "dataset.json", "dataset.json")
    ending = info.get("file_ending") if isinstance(info, dict) else None
    if not isinstance(ending, str):
        raise InputError(f"{folder}: dataset.json has no file_ending.")
    labels = info.get("labels") if isinstance(info.get("labels"), dict) else {}
    labels = {str(k): int(v) for k, v in labels.items()
              if k != "background" and isinstance(v, int) and not isinstance(v, bool)}
    cases = _read_json(folder / cases_file, cases_file)
    if not isinstance(cases, dict):
        raise InputError(f"{folder}: {cases_file} must map case names to records.")
    files, missing, uncorrected = [], [], 0
    for case in sorted(cases):
        entry = cases[case]
        if not (isinstance(entry, dict) and entry.get("corrected") is True):
            uncorrected += 1
            continue
        image = folder / "imagesTr" / f"{case}_0000{ending}"
        mask = folder / "labelsTr" / f"{case}{ending}"
        absent = [p for p in (image, mask) if not p.is_file()]
        if absent:
            missing.append(f"{case}: {absent[0]} is missing; skipped.")
            continue
        files.append(CaseFile(case, image, mask))
    return DatasetCases(folder, files, missing, uncorrected, labels)


def read_cases(files: Sequence[CaseFile], prompts: dict[str, Sequence[str]], window=None,
               *, label: int | None = None) -> tuple[list[CalibrationCase], list[str]]:
    """:class:`CalibrationCase` of each file pair, and one line per case that could not be
    used (unreadable, a volume, a mask of another size).

    Parameters
    ----------
    files : sequence of CaseFile
    prompts : dict
        Case name -> its prompt (texts); a case missing here gets none.
    window : Window, optional
        Intensity window for non-8-bit images (default: the file's own, as segment does).
    label : int, optional
        The mask value that is the target (a dataset of several labels); None: every value
        above 0.
    """
    from .evaluate import read_mask
    from .io import read_image, to_rgb_uint8

    cases, skipped = [], []
    for f in files:
        try:
            image = read_image(f.image)
            if image.is_volume:
                raise InputError(f"a 3-D volume {image.data.shape}; calibration uses 2-D "
                                 "images (export its slices as 2-D cases)")
            rgb = to_rgb_uint8(image.data, window or image.meta.get("window"))
            try:
                if label is None:
                    mask = read_mask(f.mask)
                else:
                    mask = np.asarray(read_image(f.mask).data) == label
            except Exception as exc:  # noqa: BLE001 - any failure is the mask file's problem
                raise InputError(f"its mask {f.mask.name} cannot be read ({exc})") from exc
            if mask.shape != rgb.shape[:2]:
                raise InputError(f"its mask {f.mask.name} is {mask.shape[0]}x{mask.shape[1]} "
                                 f"but the image is {rgb.shape[0]}x{rgb.shape[1]}")
            cases.append(CalibrationCase(f.name, rgb, mask, tuple(prompts.get(f.name, ()))))
        except Exception as exc:  # noqa: BLE001 - one bad case must not stop the others
            text = " ".join(str(exc).split())[:300].rstrip(".")
            skipped.append(f"{f.image.name}: {text}; skipped.")
    return cases, skipped


# --------------------------------------------------------------------------- the grid


def _unique(values: Sequence[Any]) -> tuple[Any, ...]:
    return tuple(dict.fromkeys(values))


@dataclass(frozen=True)
class SearchSpace:
    """The values tried for each parameter (a plain grid over all of them).

    The pipeline's own value of each parameter is added to its list when missing (the
    defaults are a column of the table). Defaults: the parameters the authors' scripts and
    the paper vary between datasets.

    Attributes
    ----------
    saliency_methods : tuple of str
        ``m2ib`` (default); ``gscorecam``/``gradcam`` only if asked (slow: a map costs as much
        as several M2IB maps, and they have no layer or beta to tune).
    layers : tuple of int
        M2IB bottleneck layers (0-based ViT blocks): 7, 8, 9 (the scripts' 7 and 9).
    betas : tuple of float
        M2IB compression weights: 0.1, 1.0, 2.0 (the scripts' three).
    threshold_methods : tuple of str
        ``otsu`` (the paper) and ``kmeans`` (the scripts).
    eta_cs : tuple of float
        Component confidence thresholds (eq. 19), in saliency units (the maps are in [0, 1];
        a component's confidence is its mean saliency, above the threshold by construction):
        0 keeps every component, 0.5 drops the faint ones.
    top_ks : tuple of int or None
        Components kept: 1 and 2 (paired organs); None keeps all.
    box_modes : tuple of str
        ``single`` box around all components, or one box ``per_component``.
    box_margins : tuple of float
        Box margins as fractions of the image's longer side: 0 and 0.02 (turned into pixels
        with the cases' median image; the preset stores pixels).
    prompt_modes : tuple of str
        ``boxes`` (the paper's best in 3 of 4 tasks) and ``points``.
    prompts : tuple of str
        Candidate prompts tried besides each case's own (none by default).
    """

    saliency_methods: tuple[str, ...] = ("m2ib",)
    layers: tuple[int, ...] = (7, 8, 9)
    betas: tuple[float, ...] = (0.1, 1.0, 2.0)
    threshold_methods: tuple[str, ...] = ("otsu", "kmeans")
    eta_cs: tuple[float, ...] = (0.0, 0.5)
    top_ks: tuple[int | None, ...] = (1, 2)
    box_modes: tuple[str, ...] = ("single", "per_component")
    box_margins: tuple[float, ...] = (0.0, 0.02)
    prompt_modes: tuple[str, ...] = ("boxes", "points")
    prompts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("saliency_methods", "layers", "betas", "threshold_methods", "eta_cs",
                     "top_ks", "box_modes", "box_margins", "prompt_modes", "prompts"):
            value = getattr(self, name)
            value = (value,) if isinstance(value, str | int | float) or value is None \
                else tuple(value)
            object.__setattr__(self, name, _unique(value))
        for name, choices in (("saliency_methods", SALIENCY_METHODS),
                              ("threshold_methods", THRESHOLD_METHODS),
                              ("box_modes", BOX_MODES), ("prompt_modes", PROMPT_MODES)):
            bad = [v for v in getattr(self, name) if v not in choices]
            if bad:
                raise InputError(f"calibration grid: {name} must be among "
                                 f"{', '.join(choices)}; got {', '.join(map(str, bad))}.")
        if any(int(v) != v or v < 0 for v in self.layers):
            raise InputError(f"calibration grid: layers must be block indices (0, 1, ...); "
                             f"got {list(self.layers)}.")
        if any(not 0 <= float(v) < math.inf for v in self.betas):
            raise InputError(f"calibration grid: betas must be >= 0; got {list(self.betas)}.")
        if any(not 0 <= float(v) <= 1 for v in self.eta_cs):
            raise InputError(f"calibration grid: eta_cs are in saliency units, within [0, 1]; "
                             f"got {list(self.eta_cs)}.")
        if any(v is not None and (int(v) != v or v < 1) for v in self.top_ks):
            raise InputError(f"calibration grid: top_ks must be 1 or more (or None: all); got "
                             f"{list(self.top_ks)}.")
        if any(not 0 <= float(v) < 0.5 for v in self.box_margins):
            raise InputError(f"calibration grid: box_margins are fractions of the image side "
                             f"in [0, 0.5); got {list(self.box_margins)}.")
        if any(not isinstance(p, str) or not p.strip() for p in self.prompts):
            raise InputError("calibration grid: candidate prompts must be non-empty texts.")
        object.__setattr__(self, "prompts", _unique(p.strip() for p in self.prompts))

    @classmethod
    def named(cls, name: str, **changes: Any) -> SearchSpace:
        """``"default"`` (above) or ``"small"`` (quick runs: layers 7 and 9, betas 0.1 and
        1.0, otsu and kmeans, top-1 and top-2, both box modes; eta_c 0, no margin, boxes), with
        ``changes`` applied (e.g. ``prompts=("benign tumor",)``)."""
        if name == "default":
            space = cls()
        elif name == "small":
            space = cls(layers=(7, 9), betas=(0.1, 1.0), eta_cs=(0.0,), box_margins=(0.0,),
                        prompt_modes=("boxes",))
        else:
            raise InputError(f"unknown calibration grid {name!r}; choose one of "
                             f"{', '.join(GRIDS)}.")
        return dataclasses.replace(space, **changes) if changes else space

    def to_dict(self) -> dict[str, list]:
        return {f.name: list(getattr(self, f.name)) for f in dataclasses.fields(self)}


@dataclass(frozen=True)
class Combination:
    """One point of the grid: everything the calibration varies.

    ``prompt`` indexes :attr:`DiceTable.prompt_options`; ``box_margin`` is in pixels.
    """

    prompt: int
    saliency: str
    layer: int
    beta: float
    threshold: str
    eta_c: float
    top_k: int | None
    box_mode: str
    box_margin: int
    prompt_mode: str
    sam_model: str

    @property
    def map_key(self) -> tuple[int, str, int, float]:
        """What the saliency map depends on."""
        return self.prompt, self.saliency, self.layer, self.beta

    def differences(self, other: Combination) -> int:
        """How many settings differ from ``other``'s."""
        return sum(getattr(self, f.name) != getattr(other, f.name)
                   for f in dataclasses.fields(self))

    def apply(self, base: PipelineConfig, sam_checkpoint: str | None = None) -> PipelineConfig:
        """``base`` with this combination's settings (the MedCLIP-SAMv2 chain)."""
        replace = dataclasses.replace
        return replace(
            base, method="medclipsamv2",
            sam_model=self.sam_model, sam_checkpoint=sam_checkpoint,
            saliency=replace(base.saliency, method=self.saliency, layer=self.layer,
                             beta=self.beta),
            coarse=replace(base.coarse, method=self.threshold, eta_c=self.eta_c,
                           top_k=self.top_k),
            prompts=replace(base.prompts, mode=self.prompt_mode, box_mode=self.box_mode,
                            box_margin=self.box_margin))

    def settings(self, prompt_options: Sequence[tuple[str, ...] | None] = ()) -> dict[str, Any]:
        """JSON-ready settings; the prompt as its texts (None: each case's own)."""
        out = dataclasses.asdict(self)
        if prompt_options:
            texts = prompt_options[self.prompt]
            out["prompt"] = None if texts is None else list(texts)
        return out

    def describe(self, prompt_options: Sequence[tuple[str, ...] | None] = ()) -> str:
        """One line, e.g. ``m2ib layer 9 beta 1, kmeans, eta_c 0, top-2, per_component boxes
        +10 px, sam2_t``."""
        saliency = (f"m2ib layer {self.layer} beta {self.beta:g}" if self.saliency == "m2ib"
                    else self.saliency)
        top = "all" if self.top_k is None else f"top-{self.top_k}"
        if self.prompt_mode == "points":
            prompts = "points"
        else:
            margin = f" +{self.box_margin} px" if self.box_margin else ""
            prompts = f"{self.box_mode} {self.prompt_mode}{margin}"
        parts = [saliency, self.threshold, f"eta_c {self.eta_c:g}", top, prompts,
                 self.sam_model]
        if len(prompt_options) > 1:
            texts = prompt_options[self.prompt]
            parts.insert(0, "own prompt" if texts is None else f"prompt {' | '.join(texts)!r}")
        return ", ".join(parts)


def _canonical(c: Combination, base: PipelineConfig) -> Combination:
    """The combination with settings that cannot change its result set to the base's."""
    if c.saliency != "m2ib":
        c = dataclasses.replace(c, layer=base.saliency.layer, beta=float(base.saliency.beta))
    if c.prompt_mode == "points":
        c = dataclasses.replace(c, box_mode=base.prompts.box_mode,
                                box_margin=int(base.prompts.box_margin))
    return c


def _with_default(default: Any, values: Sequence[Any]) -> tuple[Any, ...]:
    """The default first, then the grid's values (each once)."""
    return _unique((default, *values))


def _margin_pixels(fractions: Sequence[float], cases: Sequence[CalibrationCase]) -> list[int]:
    side = float(np.median([max(c.image.shape[:2]) for c in cases]))
    return [0 if f == 0 else max(1, round(float(f) * side)) for f in fractions]


def _combinations(space: SearchSpace, base: PipelineConfig, n_prompts: int,
                  margins: Sequence[int], sam_models: Sequence[str]) -> list[Combination]:
    """Every distinct combination; the first is the defaults'."""
    s, c, p = base.saliency, base.coarse, base.prompts
    default = _canonical(Combination(0, s.method, s.layer, float(s.beta), c.method,
                                     float(c.eta_c), c.top_k, p.box_mode, int(p.box_margin),
                                     p.mode, sam_models[0]), base)
    dims = (range(n_prompts),
            _with_default(s.method, space.saliency_methods),
            _with_default(s.layer, [int(v) for v in space.layers]),
            _with_default(float(s.beta), [float(v) for v in space.betas]),
            _with_default(c.method, space.threshold_methods),
            _with_default(float(c.eta_c), [float(v) for v in space.eta_cs]),
            _with_default(c.top_k, [None if v is None else int(v) for v in space.top_ks]),
            _with_default(p.box_mode, space.box_modes),
            _with_default(int(p.box_margin), margins),
            _with_default(p.mode, space.prompt_modes),
            sam_models)
    combos = _unique(_canonical(Combination(*values), base)
                     for values in itertools.product(*dims))
    assert combos[0] == default
    return list(combos)


# --------------------------------------------------------------------------- the Dice table


@dataclass
class DiceTable:
    """Dice of every combination on every case.

    Attributes
    ----------
    names : tuple of str
        Case names, in the order of the cases given (rows).
    combinations : list of Combination
        Columns; ``combinations[0]`` is the defaults' (the pipeline's config).
    values : np.ndarray
        (n_cases, n_combinations) float64 Dice in [0, 1].
    prompt_options : tuple
        What :attr:`Combination.prompt` indexes: None (each case's own prompt) or a candidate
        prompt's texts.
    case_prompts : tuple
        Each case's own prompt (rows' order).
    base : PipelineConfig
        The pipeline's config (the defaults).
    sam_checkpoints : dict
        SAM backend name -> the checkpoint a preset should name (None: the official file).
    box_margins : dict
        Grid margin fraction -> pixels.
    stats : dict
        Seconds (``saliency_s``, ``sam_encoder_s``, ``postprocess_s``, of which
        ``threshold_s`` (Otsu's and KMeans' thresholds, once per map) and ``sam_decoder_s``)
        and counts (``saliency_maps``, ``m2ib_calls``, ``sam_encoder_runs``,
        ``sam_decoder_calls``, ``coarse_masks``).
    """

    names: tuple[str, ...]
    combinations: list[Combination]
    values: np.ndarray
    prompt_options: tuple[tuple[str, ...] | None, ...]
    base: PipelineConfig
    case_prompts: tuple[tuple[str, ...], ...] = ()
    sam_checkpoints: dict[str, str | None] = field(default_factory=dict)
    box_margins: dict[float, int] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)

    default_index: int = 0

    def config_of(self, index: int) -> PipelineConfig:
        """The PipelineConfig of column ``index``."""
        combo = self.combinations[index]
        return combo.apply(self.base, self.sam_checkpoints.get(combo.sam_model))

    def best(self, rows: Sequence[int] | np.ndarray | None = None) -> int:
        """Column with the best mean Dice over ``rows`` (all by default); ties: fewest
        settings differing from the defaults, then the grid's order."""
        values = self.values if rows is None else self.values[np.asarray(rows)]
        means = np.round(values.mean(axis=0), _DECIMALS)
        default = self.combinations[self.default_index]
        distance = np.array([c.differences(default) for c in self.combinations])
        order = np.lexsort((np.arange(len(means)), distance, -means))
        return int(order[0])


def _prompt_options(cases: Sequence[CalibrationCase], candidates: Sequence[str]
                    ) -> tuple[tuple[str, ...] | None, ...]:
    missing = [c.name for c in cases if not c.prompt]
    options: list[tuple[str, ...] | None] = [] if missing else [None]
    options += [(p,) for p in candidates]
    if not options:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise InputError(f"No prompt for {len(missing)} case(s) ({shown}): give each case its "
                         "prompt, or candidate prompts to choose from.")
    return tuple(options)


def _check_layers(clip, space: SearchSpace, base: PipelineConfig) -> None:
    if "m2ib" not in (*space.saliency_methods, base.saliency.method):
        return
    from .saliency import vit_parts

    _, _, blocks = vit_parts(clip)
    bad = sorted({int(v) for v in (*space.layers, base.saliency.layer)
                  if not 0 <= int(v) < len(blocks)})
    if bad:
        raise InputError(f"calibration grid: layer(s) {', '.join(map(str, bad))} are not "
                         f"blocks of this CLIP's vision tower (0 to {len(blocks) - 1}); "
                         "choose layers within it.")


def _preset_checkpoint(bundle) -> str | None:
    """The checkpoint a preset names for an extra backend: None for the official file in the
    model cache (found again by name anywhere), else the file given."""
    from .models import cache_dir

    if not bundle.checkpoint:
        return None
    path = Path(bundle.checkpoint).resolve()
    return None if cache_dir().resolve() in path.parents else str(bundle.checkpoint)


def dice_table(pipeline, cases: Sequence[CalibrationCase], space: SearchSpace | None = None,
               *, sams: Sequence[Any] = (), progress: ProgressFn | None = None,
               should_stop: StopFn | None = None) -> DiceTable:
    """Dice of every combination of ``space`` on every case (see the module docstring).

    Parameters
    ----------
    pipeline : ZeroShotPipeline
        Its CLIP makes the saliency maps, its SAM is the default backend, its config gives
        the defaults and every setting the grid does not vary (M2IB steps, seed, ...).
    cases : sequence of CalibrationCase
        Names must be unique.
    space : SearchSpace, optional
        Default :meth:`SearchSpace.named` ``("default")``.
    sams : sequence of SamBundle
        Other SAM backends to try besides the pipeline's (loaded by the caller).
    progress : callable, optional
        ``progress(stage, fraction)``; stages name the case and the step
        (``"case 3/20 (name): saliency 14/90"``, ``"... SAM encoder"``,
        ``"... post-processing"``).
    should_stop : callable, optional
        Checked between steps; raises :class:`CancelledError`.

    Returns
    -------
    DiceTable
    """
    from .metrics import dice
    from .postprocess import keep_largest_components, make_prompts
    from .sam import make_session

    space = space or SearchSpace()
    base = pipeline.config
    if base.method != "medclipsamv2":
        raise InputError(f"calibration tunes the MedCLIP-SAMv2 chain (saliency, coarse mask, "
                         f"SAM); the pipeline's method is {base.method!r}.")
    if not cases:
        raise InputError("No corrected cases to calibrate on.")
    names = [c.name for c in cases]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InputError(f"Two cases share the name {dupes[0]!r}; case names must be unique.")
    report = progress or (lambda stage, fraction: None)
    options = _prompt_options(cases, space.prompts)
    _check_stop(should_stop)
    report("loading models", 0.0)
    clip = pipeline.clip
    _check_layers(clip, space, base)
    own = pipeline.sam
    backends: dict[str, Any] = {own.name: own}
    for bundle in sams:
        backends.setdefault(bundle.name, bundle)
    sessions = {name: pipeline.session if bundle is own
                else make_session(bundle, precision=pipeline.precision)
                for name, bundle in backends.items()}
    checkpoints = {name: (base.sam_checkpoint if bundle is own else _preset_checkpoint(bundle))
                   for name, bundle in backends.items()}
    margins = _margin_pixels(space.box_margins, cases)
    combos = _combinations(space, base, len(options), margins, list(backends))
    keep = base.sam.keep_largest
    stats: dict[str, float] = {
        **dict.fromkeys(("saliency_s", "sam_encoder_s", "postprocess_s", "threshold_s",
                         "sam_decoder_s"), 0.0),
        **dict.fromkeys(("saliency_maps", "m2ib_calls", "sam_encoder_runs",
                         "sam_decoder_calls", "coarse_masks"), 0)}
    encoder_before = {name: s.encoder_calls for name, s in sessions.items()}
    values = np.zeros((len(cases), len(combos)), dtype=np.float64)
    n = len(cases)
    for i, case in enumerate(cases):
        def at(stage: str, within: float, i: int = i, case: CalibrationCase = case) -> None:
            report(f"case {i + 1}/{n} ({case.name}): {stage}", _TABLE_SHARE * (i + within) / n)

        _check_stop(should_stop)
        rgb = np.ascontiguousarray(case.image)
        gt = case.mask
        if rgb.min() == rgb.max():  # the pipeline finds nothing in a constant image
            values[i] = dice(np.zeros_like(gt), gt)
            continue
        t0 = time.perf_counter()
        maps = _saliency_maps(pipeline, rgb, case, options, combos, stats, at, should_stop)
        stats["saliency_s"] += time.perf_counter() - t0
        for name, session in sessions.items():
            _check_stop(should_stop)
            at(f"SAM encoder ({name})", 0.8)
            t0 = time.perf_counter()
            session.set_image(rgb)
            stats["sam_encoder_s"] += time.perf_counter() - t0
        at("post-processing", 0.85)
        t0 = time.perf_counter()
        thresholds: dict[tuple, float] = {}
        coarse: dict[tuple, np.ndarray] = {}
        prompts: dict[tuple, Any] = {}
        sam_masks: dict[tuple, np.ndarray] = {}
        scores: dict[tuple, float] = {}
        for j, combo in enumerate(combos):
            if j % 64 == 0:
                _check_stop(should_stop)
            key_c = (combo.map_key, combo.threshold, combo.eta_c, combo.top_k)
            if key_c not in coarse:
                coarse[key_c] = _coarse_labels(maps[combo.map_key], rgb, base, combo,
                                               thresholds, stats)
                stats["coarse_masks"] += 1
            key_p = (key_c, combo.prompt_mode, combo.box_mode, combo.box_margin)
            if key_p not in prompts:
                config = dataclasses.replace(base.prompts, mode=combo.prompt_mode,
                                             box_mode=combo.box_mode,
                                             box_margin=combo.box_margin)
                prompts[key_p] = make_prompts(coarse[key_c], config)
            prompt = prompts[key_p]
            n_keep = combo.top_k if keep == 0 else keep
            key_s = (combo.sam_model, _prompt_bytes(prompt))
            key_d = (key_s, n_keep)
            if key_d not in scores:
                if key_s not in sam_masks:
                    t1 = time.perf_counter()
                    sam_masks[key_s] = _sam_mask(sessions[combo.sam_model], prompt, base,
                                                 gt.shape)
                    stats["sam_decoder_s"] += time.perf_counter() - t1
                    stats["sam_decoder_calls"] += int(not prompt.empty)
                mask = keep_largest_components(sam_masks[key_s], n_keep)
                scores[key_d] = dice(mask, gt)
            values[i, j] = scores[key_d]
        stats["postprocess_s"] += time.perf_counter() - t0
    stats["sam_encoder_runs"] = sum(s.encoder_calls - encoder_before[name]
                                    for name, s in sessions.items())
    report("Dice table done", _TABLE_SHARE)
    return DiceTable(tuple(names), combos, values, options, base,
                     tuple(c.prompt for c in cases), checkpoints,
                     dict(zip(space.box_margins, margins, strict=True)), stats)


def _saliency_maps(pipeline, rgb: np.ndarray, case: CalibrationCase,
                   options: Sequence[tuple[str, ...] | None], combos: Sequence[Combination],
                   stats: dict[str, float], at: Callable[[str, float], None],
                   should_stop: StopFn | None) -> dict[tuple, np.ndarray]:
    """Every map the combinations need, one :func:`m2ib_saliencies` call for all M2IB ones."""
    from . import saliency as saliency_module
    from .precision import autocast

    base = pipeline.config.saliency
    keys = list(dict.fromkeys(c.map_key for c in combos))
    clip = pipeline.clip
    maps: dict[tuple, np.ndarray] = {}

    def embedding(prompt: int):
        texts = options[prompt]
        return pipeline.text_embedding(case.prompt if texts is None else texts)

    m2ib = [k for k in keys if k[1] == "m2ib"]
    total_steps = max(1, len(m2ib) * base.steps)
    with autocast(pipeline.precision, str(clip.device)):
        if m2ib:
            requests = [(embedding(p), dataclasses.replace(base, method="m2ib", layer=layer,
                                                           beta=beta))
                        for p, _, layer, beta in m2ib]
            at(f"saliency 0/{total_steps}", 0.0)
            computed = saliency_module.m2ib_saliencies(
                clip, rgb, requests, should_stop=should_stop,
                progress=lambda step, total: at(f"saliency {step}/{total}",
                                                0.8 * step / total))
            maps.update(zip(m2ib, computed, strict=True))
            stats["m2ib_calls"] += 1
        for key in keys:
            if key in maps:
                continue
            from .cam import cam_saliency

            _check_stop(should_stop)
            at(f"saliency ({key[1]})", 0.8)
            texts = options[key[0]]
            maps[key] = cam_saliency(clip, rgb, case.prompt if texts is None else texts,
                                     dataclasses.replace(base, method=key[1]),
                                     should_stop=should_stop, text_embedding=embedding(key[0]))
    stats["saliency_maps"] += len(maps)
    return maps


def _coarse_labels(saliency: np.ndarray, rgb: np.ndarray, base: PipelineConfig,
                   combo: Combination, thresholds: dict[tuple, float],
                   stats: dict[str, float]) -> np.ndarray:
    """The coarse mask's component labels. Otsu's and KMeans' threshold is computed once per
    map and method, then applied as a fixed threshold: the same foreground ``saliency > t``
    :func:`coarse_mask` computes, without running KMeans again for every eta_c and top-K."""
    from .postprocess import coarse_mask, threshold_saliency

    config = dataclasses.replace(base.coarse, method=combo.threshold, eta_c=combo.eta_c,
                                 top_k=combo.top_k)
    if combo.threshold in ("otsu", "kmeans"):
        key = (combo.map_key, combo.threshold)
        if key not in thresholds:
            t0 = time.perf_counter()
            thresholds[key] = threshold_saliency(saliency, config)[1]
            stats["threshold_s"] += time.perf_counter() - t0
        t = thresholds[key]
        if 0.0 <= t <= 1.0:
            config = dataclasses.replace(config, method="fixed", threshold=t)
    return coarse_mask(saliency, config, image=rgb).labels


def _prompt_bytes(prompts) -> tuple[bytes, ...]:
    """The prompts as a cache key: their arrays' bytes (same dtypes always, by Prompts)."""
    return tuple(np.ascontiguousarray(a).tobytes() for a in (
        prompts.boxes, prompts.points, prompts.point_labels, prompts.point_box))


def _sam_mask(session, prompts, base: PipelineConfig, shape: tuple[int, int]) -> np.ndarray:
    """SAM's mask for ``prompts`` on the session's current image, as
    :meth:`~.pipeline.ZeroShotPipeline.refine` asks for it (before keeping components); all
    False without prompts (the pipeline then finds nothing)."""
    if prompts.empty:
        return np.zeros(shape, dtype=bool)
    has_points = len(prompts.points) > 0
    return session.predict(boxes=prompts.boxes if len(prompts.boxes) else None,
                           points=prompts.points if has_points else None,
                           point_labels=prompts.point_labels if has_points else None,
                           point_box=prompts.point_box if has_points else None,
                           multimask_output=base.sam.multimask_output)


# --------------------------------------------------------------------------- cross-validation


@dataclass(frozen=True)
class Fold:
    """One fold: the combination chosen on its training cases, scored on its held-out ones.

    ``train`` and ``test`` are case names (sorted); ``chosen`` a column of the table;
    ``tuned_dice`` and ``default_dice`` are mean Dice over the held-out cases ``test``.
    """

    index: int
    train: tuple[str, ...]
    test: tuple[str, ...]
    chosen: int
    train_dice: float
    tuned_dice: float
    default_dice: float

    @property
    def gain(self) -> float:
        return self.tuned_dice - self.default_dice


@dataclass(frozen=True)
class CrossValidation:
    """k-fold cross-validation of "choose the best combination" against the defaults.

    Attributes
    ----------
    folds : tuple of Fold
    seed : int
        ``KFold``'s ``random_state``.
    held_out_tuned, held_out_default : np.ndarray
        Per case (the table's row order), the Dice of its fold's chosen combination and of
        the defaults, each case scored once, by the fold that held it out.
    """

    folds: tuple[Fold, ...]
    seed: int
    held_out_tuned: np.ndarray
    held_out_default: np.ndarray

    @property
    def tuned_dice(self) -> float:
        """Cross-validated Dice of the tuning: mean over all cases, each held out once."""
        return float(self.held_out_tuned.mean())

    @property
    def default_dice(self) -> float:
        """The defaults' Dice over the same cases."""
        return float(self.held_out_default.mean())

    @property
    def gains(self) -> np.ndarray:
        return np.array([f.gain for f in self.folds])

    @property
    def mean_gain(self) -> float:
        """Mean over folds of (tuned - defaults) held-out Dice."""
        return float(self.gains.mean())

    @property
    def gain_se(self) -> float:
        """Standard error of the mean per-fold gain (sample standard deviation / sqrt(k))."""
        gains = self.gains
        return float(gains.std(ddof=1) / math.sqrt(len(gains))) if len(gains) > 1 else 0.0

    @property
    def warning(self) -> str | None:
        """Plain words when the gain may be noise: not positive, or not above two standard
        errors of the per-fold gains; None otherwise."""
        gain, se, k = self.mean_gain, self.gain_se, len(self.folds)
        if gain <= 0:
            return (f"The tuned settings did not beat the defaults on held-out cases (mean "
                    f"gain {gain:+.3f} Dice over {k} folds): keep the defaults, or correct "
                    "more cases and calibrate again.")
        if gain <= 2 * se:
            return (f"The gain ({gain:+.3f} Dice) is within the folds' noise (two standard "
                    f"errors = {2 * se:.3f} over {k} folds): the tuned settings may be no "
                    "better than the defaults on new images. Correct more cases before "
                    "trusting it.")
        return None


def cross_validate(table: DiceTable, folds: int = 5, seed: int = 0) -> CrossValidation:
    """k-fold cross-validation over the rows of ``table`` (see the module docstring).

    Raises
    ------
    InputError
        Fewer cases than folds (:func:`check_case_count`).
    """
    from sklearn.model_selection import KFold

    n = len(table.names)
    check_case_count(n, folds)
    order = sorted(range(n), key=lambda i: table.names[i])  # by name, not by input order
    split = KFold(n_splits=folds, shuffle=True, random_state=seed).split(order)
    tuned = np.zeros(n)
    default = table.values[:, table.default_index].copy()
    out = []
    for k, (train_pos, test_pos) in enumerate(split):
        train = sorted(order[p] for p in train_pos)
        test = sorted(order[p] for p in test_pos)
        chosen = table.best(train)
        tuned[test] = table.values[test, chosen]
        out.append(Fold(k, tuple(sorted(table.names[i] for i in train)),
                        tuple(sorted(table.names[i] for i in test)), chosen,
                        float(table.values[train, chosen].mean()),
                        float(table.values[test, chosen].mean()),
                        float(table.values[test, table.default_index].mean())))
    return CrossValidation(tuple(out), seed, tuned, default)


# --------------------------------------------------------------------------- the whole run


@dataclass
class CalibrationResult:
    """What :func:`calibrate` found.

    Attributes
    ----------
    table : DiceTable
    cv : CrossValidation
    chosen : int
        Column of the final choice: the best combination on all N cases.
    config : PipelineConfig
        The tuned preset's settings.
    space : SearchSpace
    seconds : float
        Wall time of the whole calibration.
    """

    table: DiceTable
    cv: CrossValidation
    chosen: int
    config: PipelineConfig
    space: SearchSpace
    seconds: float = 0.0

    @property
    def combination(self) -> Combination:
        return self.table.combinations[self.chosen]

    @property
    def default(self) -> Combination:
        return self.table.combinations[self.table.default_index]

    @property
    def warning(self) -> str | None:
        return self.cv.warning

    @property
    def prompt(self) -> list[str] | None:
        """The prompt the preset goes with: the chosen candidate, or the cases' own prompt
        when they all share one; None when each case keeps its own."""
        texts = self.table.prompt_options[self.combination.prompt]
        return None if texts is None else list(texts)

    @property
    def in_sample(self) -> tuple[float, float]:
        """(tuned, defaults) mean Dice on all N cases: the tuned value is optimistic (it was
        chosen on these cases); the cross-validated ones are the estimate."""
        values = self.table.values
        return (float(values[:, self.chosen].mean()),
                float(values[:, self.table.default_index].mean()))

    def calibration_record(self) -> dict[str, Any]:
        """The preset's ``"calibration"`` entry."""
        from .. import __version__

        options = self.table.prompt_options
        cv = self.cv
        tuned_in, default_in = self.in_sample
        return {
            "tuned_on": len(self.table.names),
            "cases": list(self.table.names),
            "note": (f"Tuned on {len(self.table.names)} corrected cases. The Dice expected on "
                     f"new images is the cross-validated one ({cv.tuned_dice:.4f}, defaults "
                     f"{cv.default_dice:.4f}): each fold's choice scored only on cases it "
                     "was not tuned on."),
            "folds": len(cv.folds),
            "cv_seed": cv.seed,
            "cross_validated": {
                "tuned_dice": cv.tuned_dice, "default_dice": cv.default_dice,
                "mean_gain": cv.mean_gain, "gain_se": cv.gain_se,
                "per_fold": [{"fold": f.index, "held_out": list(f.test),
                              "tuned_dice": f.tuned_dice, "default_dice": f.default_dice,
                              "chosen": self.table.combinations[f.chosen].settings(options)}
                             for f in cv.folds]},
            "in_sample_dice": {"tuned": tuned_in, "default": default_in,
                               "note": "on the cases it was tuned on: optimistic"},
            "warning": self.warning,
            "chosen": self.combination.settings(options),
            "default": self.default.settings(options),
            "prompt": self.prompt,
            "grid": {**self.space.to_dict(),
                     "box_margins_px": [self.table.box_margins[f]
                                        for f in self.space.box_margins],
                     "sam_models": sorted({c.sam_model for c in self.table.combinations}),
                     "combinations": len(self.table.combinations)},
            "seconds": round(self.seconds, 1),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "napari_medclipsam": __version__,
        }

    def preset(self) -> dict[str, Any]:
        """The preset file's content: ``{"config": ..., "prompt": [...], "calibration":
        ...}`` (a ``medclipsam segment --config`` file and a run the widget loads; ``prompt``
        only when one prompt applies to every case)."""
        out: dict[str, Any] = {"config": self.config.to_dict()}
        prompt = self.prompt
        if prompt is None:
            own = set(self.table.case_prompts)
            if len(own) == 1:
                prompt = list(next(iter(own)))
        if prompt is not None:
            out["prompt"] = prompt
        out["calibration"] = self.calibration_record()
        return out

    def folds_csv(self) -> str:
        """Per fold: held-out cases, defaults' and tuned Dice, gain, chosen settings; then the
        cross-validated (pooled) row and the final choice's in-sample row."""
        options = self.table.prompt_options
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["fold", "n_train", "n_held_out", "held_out", "default_dice",
                         "tuned_dice", "gain", "chosen"])
        for f in self.cv.folds:
            writer.writerow([f.index + 1, len(f.train), len(f.test), " ".join(f.test),
                             f"{f.default_dice:.6f}", f"{f.tuned_dice:.6f}", f"{f.gain:+.6f}",
                             self.table.combinations[f.chosen].describe(options)])
        cv = self.cv
        writer.writerow(["cross-validated", "", len(self.table.names), "all (each once)",
                         f"{cv.default_dice:.6f}", f"{cv.tuned_dice:.6f}",
                         f"{cv.tuned_dice - cv.default_dice:+.6f}", ""])
        tuned_in, default_in = self.in_sample
        writer.writerow(["final (in-sample)", len(self.table.names), 0, "",
                         f"{default_in:.6f}", f"{tuned_in:.6f}",
                         f"{tuned_in - default_in:+.6f}", self.combination.describe(options)])
        return out.getvalue()

    def table_csv(self) -> str:
        """One row per combination: its settings, mean Dice, Dice per case (columns named
        after the cases)."""
        options = self.table.prompt_options
        fields = [f.name for f in dataclasses.fields(Combination)]
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["column", *fields, "mean_dice", *self.table.names])
        means = self.table.values.mean(axis=0)
        for j, combo in enumerate(self.table.combinations):
            s = combo.settings(options)
            prompt = "own" if s["prompt"] is None else " | ".join(s["prompt"])
            row = [prompt if name == "prompt" else s[name] for name in fields]
            writer.writerow([j, *row, f"{means[j]:.6f}",
                             *(f"{v:.6f}" for v in self.table.values[:, j])])
        return out.getvalue()

    def report(self) -> dict[str, Any]:
        """Everything, JSON-ready: the calibration record, the costs, every combination's
        settings and mean Dice."""
        options = self.table.prompt_options
        means = self.table.values.mean(axis=0)
        return {**self.calibration_record(),
                "stats": {k: (round(v, 3) if isinstance(v, float) else v)
                          for k, v in self.table.stats.items()},
                "combinations": [{"column": j, **c.settings(options),
                                  "mean_dice": float(means[j])}
                                 for j, c in enumerate(self.table.combinations)]}

    def summary(self) -> str:
        """A few lines for a person: what was searched, the choice, the cross-validated Dice
        against the defaults."""
        options = self.table.prompt_options
        cv = self.cv
        n, k = len(self.table.names), len(cv.folds)
        lines = [f"Searched {len(self.table.combinations)} combinations on {n} corrected "
                 f"cases ({self.seconds:.0f} s).",
                 f"Chosen: {self.combination.describe(options)}",
                 f"Defaults: {self.default.describe(options)}",
                 f"Cross-validated Dice ({k} folds, held-out cases only): tuned "
                 f"{cv.tuned_dice:.3f} vs defaults {cv.default_dice:.3f} (gain per fold "
                 f"{cv.mean_gain:+.3f} +/- {cv.gain_se:.3f})."]
        for f in cv.folds:
            lines.append(f"  fold {f.index + 1}: defaults {f.default_dice:.3f}, tuned "
                         f"{f.tuned_dice:.3f} on {len(f.test)} held-out case(s)")
        return "\n".join(lines)


def calibrate(pipeline, cases: Sequence[CalibrationCase], space: SearchSpace | None = None,
              *, folds: int = 5, seed: int = 0, sams: Sequence[Any] = (),
              progress: ProgressFn | None = None,
              should_stop: StopFn | None = None) -> CalibrationResult:
    """Tune the chain's parameters on corrected cases by k-fold cross-validated Dice.

    Parameters
    ----------
    pipeline : ZeroShotPipeline
        Models and the defaults (its config); see :func:`dice_table`.
    cases : sequence of CalibrationCase
        At least ``folds`` of them.
    space : SearchSpace, optional
        The grid (default :class:`SearchSpace` ``()``, the "default" grid).
    folds : int
        k of the k-fold cross-validation (default 5).
    seed : int
        Seed of the fold shuffle (cases are sorted by name first).
    sams : sequence of SamBundle
        Other SAM backends to try besides the pipeline's.
    progress : callable, optional
        ``progress(stage, fraction)`` (fraction of the whole run in [0, 1]).
    should_stop : callable, optional
        Checked between steps; raises :class:`CancelledError` (nothing is kept).

    Returns
    -------
    CalibrationResult
        ``config`` (the best combination on all cases), ``cv`` (per fold: defaults vs tuned
        on held-out cases), ``warning`` (None, or why the gain may be noise). Write it with
        :func:`write_calibration`.

    Raises
    ------
    InputError
        Too few cases for the folds (checked before any work), no prompt, a grid layer the
        CLIP does not have, a pipeline in SaLIP mode.
    CancelledError
        ``should_stop`` returned True.
    """
    start = time.perf_counter()
    check_case_count(len(cases), folds)
    space = space or SearchSpace()
    table = dice_table(pipeline, cases, space, sams=sams, progress=progress,
                       should_stop=should_stop)
    _check_stop(should_stop)
    if progress is not None:
        progress("cross-validation", _TABLE_SHARE)
    cv = cross_validate(table, folds, seed)
    chosen = table.best()
    if progress is not None:
        progress("done", 1.0)
    return CalibrationResult(table, cv, chosen, table.config_of(chosen), space,
                             time.perf_counter() - start)


# --------------------------------------------------------------------------- writing


def calibration_paths(preset: str | Path) -> dict[str, Path]:
    """The files :func:`write_calibration` writes for ``preset`` (``NAME.json``): the preset,
    and beside it ``NAME.folds.csv``, ``NAME.table.csv``, ``NAME.report.json`` and
    ``NAME.folds.png``."""
    preset = Path(preset)
    stem = preset.name[:-len(".json")] if preset.name.lower().endswith(".json") \
        else preset.name
    return {"preset": preset,
            "folds": preset.with_name(f"{stem}.folds.csv"),
            "table": preset.with_name(f"{stem}.table.csv"),
            "report": preset.with_name(f"{stem}.report.json"),
            "plot": preset.with_name(f"{stem}.folds.png")}


def check_calibration_paths(preset: str | Path, overwrite: bool = False) -> dict[str, Path]:
    """:func:`calibration_paths`, refused before any work when ``preset`` does not end in
    ``.json``, one of them is a folder, or one exists and ``overwrite`` is False.

    Raises
    ------
    InputError
    """
    import os

    preset = Path(preset)
    if not preset.name.lower().endswith(".json") or preset.name.lower() == ".json":
        raise InputError(f"{preset}: the preset is a JSON file; give a name ending in .json "
                         "(e.g. preset.json).")
    paths = calibration_paths(preset)
    for path in paths.values():
        if path.is_dir():
            raise InputError(f"{path} is a folder; choose another preset name.")
    if not overwrite:
        existing = [p for p in paths.values() if os.path.lexists(p)]
        if existing:
            raise InputError(f"{existing[0]} already exists; pass --overwrite to replace it, "
                             "or choose another preset name.")
    return paths


def plot_folds(result: CalibrationResult, path: str | Path, *, overwrite: bool = True) -> None:
    """Bar chart PNG: per fold, the held-out Dice of the defaults and of the tuned choice,
    then the cross-validated means; the warning, if any, under the title. Matplotlib's Agg
    canvas is used directly (no pyplot, so a GUI's backend is never touched)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .io import atomic_path

    cv = result.cv
    labels = [f"fold {f.index + 1}\n(n={len(f.test)})" for f in cv.folds] + ["all\n(CV)"]
    defaults = [f.default_dice for f in cv.folds] + [cv.default_dice]
    tuned = [f.tuned_dice for f in cv.folds] + [cv.tuned_dice]
    fig = Figure(figsize=(max(5.0, 1.1 * len(labels) + 2), 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(labels))
    for offset, values, label, colour in ((-0.2, defaults, "defaults", "#9e9e9e"),
                                          (0.2, tuned, "tuned", "#1f77b4")):
        bars = ax.bar(x + offset, values, 0.4, label=label, color=colour)
        ax.bar_label(bars, fmt="%.3f", fontsize=7, padding=1)
    ax.set_xticks(x, labels)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("held-out Dice")
    ax.legend(loc="lower right")
    title = (f"Calibration on {len(result.table.names)} corrected cases: cross-validated "
             f"Dice {cv.default_dice:.3f} -> {cv.tuned_dice:.3f}")
    ax.set_title(title, fontsize=10)
    if result.warning:
        fig.text(0.5, 0.005, "Warning: the gain is within the folds' noise"
                 if cv.mean_gain > 0 else "Warning: no gain over the defaults",
                 ha="center", va="bottom", color="#b00020", fontsize=9)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    with atomic_path(path, overwrite=overwrite) as tmp:
        fig.savefig(str(tmp), format="png")


def write_calibration(result: CalibrationResult, preset: str | Path, *,
                      overwrite: bool = False) -> dict[str, Path]:
    """Write the preset and its report (:func:`calibration_paths`), each file atomically.
    The report files are written first and the preset last, so a preset on disk always has
    its report beside it. An existing file is replaced only with ``overwrite``.

    Returns
    -------
    dict
        ``preset``, ``folds``, ``table``, ``report``, ``plot`` -> the paths written.
    """
    from .io import write_text

    paths = check_calibration_paths(preset, overwrite)
    write_text(paths["folds"], result.folds_csv(), overwrite=overwrite)
    write_text(paths["table"], result.table_csv(), overwrite=overwrite)
    write_text(paths["report"], json.dumps(result.report(), indent=2) + "\n",
               overwrite=overwrite)
    plot_folds(result, paths["plot"], overwrite=overwrite)
    write_text(paths["preset"], json.dumps(result.preset(), indent=2) + "\n",
               overwrite=overwrite)
    return paths
