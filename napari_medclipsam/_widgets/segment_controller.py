"""The Qt-free controller of the "Text-prompt segmentation" widget.

It holds the typed state of the session (:class:`SegmentState`: the targets of the label map
and the current :class:`Run`) and does the work; the widget (:mod:`.segment_widget`) only
reads fields, moves layers and wires signals. Nothing here imports Qt or napari, so every
method is testable with plain arrays:

>>> ctl = SegmentController(pipeline)                                    # doctest: +SKIP
>>> run = ctl.run_all(image, ["breast tumor"])                           # worker thread
>>> mask = ctl.refine(Prompts(boxes=np.array([[10, 10, 40, 40]])))      # a box edit
>>> index, values = ctl.accept(label_map, mask)                          # into the label map
>>> plan = ctl.plan_propagation(label_map, ["breast tumor"], source="scan")  # GUI thread
>>> done = ctl.propagate(volume, plan)                                   # worker thread
>>> index, values = ctl.write_propagation(label_map, done)               # into the label map

Label map: every target (a prompt or preset) owns one label value (1, 2, ... in the order
they were first run) and its name; :meth:`SegmentController.accept` writes a target's mask
into the map without touching other targets' voxels unless asked to.

Propagation through a (Z, Y, X) volume: :class:`SliceBook` remembers, per target and slice,
what the tool last wrote into the label map (accepted masks, propagated masks), so a slice
that differs from it now was corrected by hand. :meth:`SegmentController.plan_propagation`
sorts the label map's slices into seeds (masks the user prompted, accepted or painted),
locked slices (corrected by hand: used as seeds and never overwritten) and the tool's own
earlier output (propagated again); :meth:`~SegmentController.propagate` runs
:meth:`~napari_medclipsam.core.pipeline.ZeroShotPipeline.propagate_volume`;
:meth:`~SegmentController.write_propagation` says what to write and notes it in the book.

Tuning on corrected cases ("Tune on my corrections"): :meth:`SegmentController.plan_tuning`
reads an exported nnU-Net dataset's records in the GUI thread (only the cases marked corrected;
too few for the folds is one message, before any work); :meth:`~SegmentController.tune`
calibrates the pipeline's settings on them by k-fold cross-validated Dice
(:mod:`napari_medclipsam.core.calibrate`) in a worker and writes the preset and its report to
``DATASET/medclipsam_tuned/`` (:func:`next_preset_path`: never over an earlier one); the
:class:`Tuning` it returns gives the result line, the warning and the settings to apply.

The VLSM chain (``PipelineConfig.method == "vlsm"``: a CLIPSeg / BiomedCLIPSeg probability,
thresholded, optionally refined by SAM) loads its model through :func:`load_vlsm_model` (the
VLSM package, torch and transformers are imported only then); :func:`vlsm_source_info` says in
one line what the Model field names (a trained folder's architecture, classes and validation
Dice, from its ``vlsm.json``) and :func:`vlsm_source_problem` catches a folder that is not
there before any work. SAM is loaded only to refine: a box edit after a run without it loads
SAM first (:attr:`SegmentController.sam_ready`, :meth:`SegmentController.load_sam`).

Another machine (Models > Compute on, issue 16): :meth:`SegmentController.set_remote` points
the controller at a Dask scheduler (:class:`~napari_medclipsam.remote.RemoteCompute`); Run
all, All slices and propagation then run on its worker and come back as the same results. A
single image's SAM embedding comes back too: the first box edit loads SAM here (the one the
worker ran) and imports it, so box and point edits run only SAM's decoder here.

Also here, for the view to show: :class:`ProgressTracker` (the pipeline's stage names with
the slice count and an ETA), :func:`gui_message` (the core's command-line wording turned
into the widget's field names), :func:`matching_presets` and :func:`describe_settings` (the
preset a prompt matches, the settings in force in one line), :func:`faithfulness_view` (the
prompt-faithfulness check of a run, or its slices, as a score line and a warning),
:func:`proposal_labels` (SaLIP's proposals as one label image with a features table) and
:func:`save_mask` (the SAM mask and the label map to NIfTI or PNG).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_medclipsam.core.config import (
    DEFAULT_VLSM_MODEL,
    FaithfulnessConfig,
    PipelineConfig,
    PromptConfig,
)
from napari_medclipsam.core.errors import CancelledError, InputError
from napari_medclipsam.core.faithfulness import Faithfulness, mean_faithfulness
from napari_medclipsam.core.io import file_stem
from napari_medclipsam.core.pipeline import SegmentationResult, VolumeResult, ZeroShotPipeline
from napari_medclipsam.core.postprocess import Prompts, prompts_from_mask
from napari_medclipsam.core.presets import Preset, list_presets
from napari_medclipsam.nnunet.job import format_eta
from napari_medclipsam.remote import (
    RemoteCompute,
    RemoteReply,
    RemoteStatus,
    compute_address,
    load_vlsm_model,
)
from napari_medclipsam.vlsm.config import MODEL_FILE, local_source_path, read_vlsm_record

ProgressFn = Callable[[str, float], None]
StopFn = Callable[[], bool]
SliceFn = Callable[[int, SegmentationResult], None]

#: the model fields of a PipelineConfig: a change in one of them needs new models (the
#: precision too: the SAM session is built for one)
MODEL_FIELDS = ("clip_model", "sam_model", "sam_checkpoint", "device", "precision")


def target_name(prompt_lines: Sequence[str]) -> str:
    """The name of a target: its prompt, or ``"first line +N"`` for an ensemble."""
    lines = [line for line in prompt_lines if line.strip()]
    if not lines:
        raise InputError("Type a prompt first (e.g. 'breast tumor'), or pick a preset.")
    return lines[0] if len(lines) == 1 else f"{lines[0]} +{len(lines) - 1}"


# --------------------------------------------------------------------------- VLSM
VLSM_RECORD = MODEL_FILE  #: a trained VLSM folder's record
#: how the dock names each VLSM architecture
VLSM_ARCH_NAMES: Mapping[str, str] = {"clipseg": "CLIPSeg", "biomedclipseg": "BiomedCLIPSeg"}


def _vlsm_changed(pipeline: ZeroShotPipeline, config: PipelineConfig) -> bool:
    """A VLSM is loaded in ``pipeline`` and ``config`` names another."""
    return pipeline.vlsm_loaded and pipeline.config.vlsm.model != config.vlsm.model


def _local_device(device: str | None) -> str | None:
    """``device`` when this machine has it, else None (auto): the device a remote run's SAM
    decodes on here (the run may have asked for the GPU box's ``cuda``)."""
    from napari_medclipsam.core.models import resolve_device

    try:
        resolve_device(device)
    except (ValueError, RuntimeError):
        return None
    return device


def vlsm_local_path(source: str) -> Path | None:
    """:func:`napari_medclipsam.vlsm.config.local_source_path`: the folder a Model value
    names, or None for a Hugging Face id."""
    return local_source_path(source)


def trained_vlsm_folder(source: str) -> Path | None:
    """The folder when the Model value names a trained VLSM (it holds ``vlsm.json``)."""
    path = vlsm_local_path(source)
    return path if path is not None and (path / VLSM_RECORD).is_file() else None


def vlsm_source_problem(source: str) -> str:
    """``""``, or why the VLSM Model value cannot name a model (a folder that is not there),
    in one line with what to choose instead. Reads no model file and downloads nothing."""
    source = source.strip()
    if not source:
        return (f"Choose the VLSM model: a folder 'medclipsam vlsm train' wrote (Browse...), "
                f"or released CLIPSeg weights ({DEFAULT_VLSM_MODEL}).")
    path = vlsm_local_path(source)
    if path is not None and not path.is_dir():
        return (f"VLSM model folder not found: {path}. Choose the folder 'medclipsam vlsm "
                f"train' wrote (Browse...), or released CLIPSeg weights "
                f"({DEFAULT_VLSM_MODEL}).")
    if path is not None and not (path / VLSM_RECORD).is_file() \
            and not (path / "config.json").is_file():
        return (f"{path} is neither a trained VLSM folder (no {VLSM_RECORD}) nor a CLIPSeg "
                "model folder (no config.json): choose the folder 'medclipsam vlsm train' "
                "wrote.")
    return ""


def vlsm_model_label(source: str) -> str:
    """A VLSM Model value, short: a hub id as it is, a folder by its name."""
    path = vlsm_local_path(source)
    return source.strip() if path is None else (path.name or str(path))


@dataclass(frozen=True)
class VlsmSource:
    """What the VLSM Model field names, as the dock shows it under the field.

    Attributes
    ----------
    text : str
        One line: a trained folder's architecture, classes and best validation Dice; released
        CLIPSeg weights; or what is wrong.
    error : bool
        ``text`` is a problem (the run would fail).
    arch : str or None
        ``"clipseg"`` or ``"biomedclipseg"``; None when unknown.
    classes : tuple of str
        The classes a trained model learnt (what to type as the prompt).
    """

    text: str
    error: bool = False
    arch: str | None = None
    classes: tuple[str, ...] = ()


def describe_vlsm_record(record: Mapping[str, Any]) -> str:
    """A trained VLSM's ``vlsm.json`` in one line: ``"CLIPSeg trained on 'disk', 'square'
    (type one as the prompt) · best validation Dice 0.87 (epoch 12 of 40)"``."""
    arch = VLSM_ARCH_NAMES.get(str(record.get("arch")), str(record.get("arch")))
    classes = [str(c) for c in record.get("classes") or ()]
    if len(classes) == 1:
        head = f"{arch} trained on {classes[0]!r} (type it as the prompt)"
    elif classes:
        head = (f"{arch} trained on {', '.join(repr(c) for c in classes)} (type one as the "
                "prompt)")
    else:
        head = f"{arch} (no classes recorded)"
    parts = [head]
    training = record.get("training") or {}
    dice = training.get("best_val_dice")
    if isinstance(dice, (int, float)):
        line = f"best validation Dice {dice:.2f}"
        epoch, run = training.get("best_epoch"), training.get("epochs_run")
        if epoch:
            line += f" (epoch {epoch}" + (f" of {run}" if run else "") + ")"
        parts.append(line)
    return " · ".join(parts)


def vlsm_source_info(source: str) -> VlsmSource:
    """The line under the VLSM Model field for ``source``.

    A trained folder's ``vlsm.json`` is read
    (:func:`napari_medclipsam.vlsm.config.read_vlsm_record`, no torch). Never raises.
    """
    source = source.strip() or DEFAULT_VLSM_MODEL
    problem = vlsm_source_problem(source)
    if problem:
        return VlsmSource(problem, error=True)
    folder = trained_vlsm_folder(source)
    if folder is not None:
        try:
            record = read_vlsm_record(folder)
        except InputError as exc:
            return VlsmSource(str(exc), error=True)
        return VlsmSource(describe_vlsm_record(record), arch=str(record["arch"]),
                          classes=tuple(str(c) for c in record.get("classes") or ()))
    if vlsm_local_path(source) is not None:
        return VlsmSource(f"CLIPSeg weights from {vlsm_model_label(source)}, zero-shot (not "
                          "trained here: any prompt)", arch="clipseg")
    return VlsmSource(f"Released CLIPSeg weights ({source}), zero-shot: downloaded once, then "
                      "offline. Or choose a model trained with 'medclipsam vlsm train'.",
                      arch="clipseg")


@dataclass(frozen=True)
class Target:
    """One structure to label: its name (shown in napari), value in the label map, prompts."""

    name: str
    value: int
    prompts: tuple[str, ...]


@dataclass
class Run:
    """The last finished Run all.

    Attributes
    ----------
    target : Target
    source : str
        Name of the image layer it ran on.
    slice_index : int or None
        Axis-0 index of the slice processed on a (Z, Y, X) stack; None for a 2-D image or a
        volume run.
    result : SegmentationResult or None
        A single-image run (editable: boxes and points re-run SAM from the cached
        embedding of ``result.rgb``); None for a volume run.
    volume : VolumeResult or None
        An all-slices run.
    mask : np.ndarray
        SAM's current mask: HxW for a single image (updated by every refine), (Z, Y, X) for
        a volume run.
    cancelled : bool
        A volume run stopped by Cancel: ``volume`` holds the slices finished before it
        (``volume.completed``), the others are empty.
    seconds : float
        How long the run took (models' loading included).
    method : {"medclipsamv2", "salip", "vlsm"}
        The chain it ran (``PipelineConfig.method``): a SaLIP run's ``result.saliency`` is
        the retrieval map and ``result.extra["salip"]`` holds every proposal and its score; a
        VLSM run's is the VLSM's probability, and its ``mask`` the VLSM's (SAM's with
        ``vlsm.refine``).
    slice_faithfulness : dict of int to Faithfulness
        A volume run's prompt-faithfulness check per finished slice (a single image's is
        ``result.faithfulness``); empty when the check is off.
    where : str
        The machine it ran on when not this one: its host and device (``"gpu-box (cuda:0,
        NVIDIA H100 80GB HBM3)"``); ``""`` here.
    """

    target: Target
    source: str
    slice_index: int | None
    result: SegmentationResult | None = None
    volume: VolumeResult | None = None
    mask: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), bool))
    cancelled: bool = False
    seconds: float = 0.0
    method: str = "medclipsamv2"
    slice_faithfulness: dict[int, Faithfulness] = field(default_factory=dict)
    where: str = ""

    @property
    def editable(self) -> bool:
        return self.result is not None

    @property
    def slices_done(self) -> int:
        """Slices finished by a volume run (all of them unless it was cancelled)."""
        return len(self.volume.completed) if self.volume is not None else 0

    @property
    def slices_total(self) -> int:
        return int(self.mask.shape[0]) if self.volume is not None else 0


# --------------------------------------------------------------------------- propagation
def mask_digest(mask: np.ndarray) -> bytes:
    """A short fingerprint of a bool mask (its shape and bits): two masks with the same
    digest are equal. The book keeps these, not the masks."""
    mask = np.asarray(mask, dtype=bool)
    head = np.asarray(mask.shape, dtype=np.int64).tobytes()
    return hashlib.blake2b(head + np.packbits(mask).tobytes(), digest_size=16).digest()


@dataclass(frozen=True)
class SliceWrite:
    """One write of the tool into a slice of the label map, for one target.

    Attributes
    ----------
    origin : {"seed", "propagated", "locked"}
        ``seed``: an accepted mask or a seed of a propagation (a prompt's result, or the
        slice the text chose); ``propagated``: propagation's output; ``locked``: a slice
        corrected by hand that a propagation kept.
    before, after : bytes
        :func:`mask_digest` of the target's mask in that slice before and after the write.
    write : int
        Which write it was part of (one accept, one propagation: one napari undo step).
    """

    origin: str
    before: bytes
    after: bytes
    write: int = 0


#: what :meth:`SliceBook.classify` says of a slice
SEED, LOCKED, FREE = "seed", "locked", "free"


class SliceBook:
    """What the tool last wrote into each slice of a (Z, Y, X) label map, per target value.

    A slice whose mask differs from the tool's last write was painted or erased by hand.
    Each slice keeps the stack of the tool's writes, so napari's undo of a whole write
    (every slice it changed back as it was) is recognised as such, not as corrections.
    """

    def __init__(self) -> None:
        self._writes: dict[int, dict[int, list[SliceWrite]]] = {}
        self._count = 0

    def new_write(self) -> int:
        """An id for the slices of one write (one ``data_setitem``)."""
        self._count += 1
        return self._count

    def note(self, value: int, z: int, origin: str, before: np.ndarray | bytes,
             after: np.ndarray | bytes, write: int | None = None) -> None:
        """Record that the tool changed target ``value``'s mask in slice ``z`` from
        ``before`` to ``after`` (masks or their digests), as part of ``write`` (default: a
        write of its own)."""
        if origin not in (SEED, "propagated", LOCKED):
            raise ValueError(f"Unknown origin {origin!r}.")
        before = before if isinstance(before, bytes) else mask_digest(before)
        after = after if isinstance(after, bytes) else mask_digest(after)
        self._writes.setdefault(int(value), {}).setdefault(int(z), []).append(
            SliceWrite(origin, before, after, self.new_write() if write is None else write))

    def last(self, value: int, z: int) -> SliceWrite | None:
        """The tool's last write into slice ``z`` for ``value`` (None: never written)."""
        stack = self._writes.get(int(value), {}).get(int(z))
        return stack[-1] if stack else None

    def _drop_undone(self, stacks: dict[int, list[SliceWrite]],
                     digests: dict[int, bytes]) -> None:
        """Drop the writes napari undid: every slice a write changed is back at its state
        before it (and that write is the last on each of them)."""
        while True:
            tops: dict[int, list[tuple[int, SliceWrite]]] = {}
            for z, stack in stacks.items():
                if stack:
                    tops.setdefault(stack[-1].write, []).append((z, stack[-1]))
            undone = set()
            for write, entries in tops.items():
                changed = [(z, w) for z, w in entries if w.before != w.after]
                total = sum(1 for stack in stacks.values() for w in stack
                            if w.write == write and w.before != w.after)
                if changed and len(changed) == total and all(
                        digests[z] == w.before for z, w in changed):
                    undone.add(write)
            if not undone:
                return
            for stack in stacks.values():
                while stack and stack[-1].write in undone:
                    stack.pop()

    def classify(self, value: int, label_map: np.ndarray) -> dict[int, str]:
        """Each slice of ``label_map`` (Z, Y, X) that matters for target ``value``:

        - :data:`SEED`: holds the target and was never written by the tool (the user painted
          it), or holds the tool's seed as written (a prompt's or an accepted mask);
        - :data:`LOCKED`: differs from the tool's last write (painted or erased by hand; an
          erased slice is locked empty), or was locked by an earlier propagation;
        - :data:`FREE`: the tool's propagated output, unchanged: propagation may replace it.

        Slices that hold nothing and were never written are left out. Writes undone in
        napari (:meth:`_drop_undone`) are forgotten first.
        """
        label_map = np.asarray(label_map)
        stacks = self._writes.get(int(value), {})
        digests = {z: mask_digest(label_map[z] == value) for z in stacks
                   if z < label_map.shape[0]}
        self._drop_undone(stacks, digests)
        kinds: dict[int, str] = {}
        for z in range(label_map.shape[0]):
            current = label_map[z] == value
            stack = stacks.get(z, [])
            if not stack:
                if current.any():
                    kinds[z] = SEED
                continue
            last = stack[-1]
            if digests[z] != last.after or last.origin == LOCKED:
                kinds[z] = LOCKED
            elif last.origin == SEED:
                if current.any():
                    kinds[z] = SEED
            else:
                kinds[z] = FREE
        return kinds


@dataclass
class PropagationPlan:
    """What a Propagate through volume starts from (made in the GUI thread, from the label
    map as it is when the button is pressed).

    Attributes
    ----------
    target : Target
    source : str
        The image layer's name.
    seeds : dict of int to np.ndarray
        Slice -> (Y, X) bool: the user's masks (the current single-slice run's SAM mask,
        slices accepted or painted in the label map).
    locked : dict of int to np.ndarray
        Slices corrected by hand: seeds that are never overwritten.
    free : list of int
        Slices holding the tool's earlier propagated output (replaced by this run).
    snapshot : dict of int to bytes
        :func:`mask_digest` of the target's mask in every slice of the label map: a slice
        changed while propagation ran is not overwritten.
    shape : tuple of int
        The label map's (Z, Y, X).
    """

    target: Target
    source: str
    seeds: dict[int, np.ndarray]
    locked: dict[int, np.ndarray]
    free: list[int]
    snapshot: dict[int, bytes]
    shape: tuple[int, ...]

    @property
    def by_text(self) -> bool:
        """True when no slice holds a mask: the text chooses the seed slices."""
        return not any(m.any() for m in (*self.seeds.values(), *self.locked.values()))


@dataclass
class Propagation:
    """A finished or cancelled propagation, ready to be written into the label map.

    Attributes
    ----------
    plan : PropagationPlan
    mask : np.ndarray
        (Z, Y, X) bool: the seeds, locked slices and propagated slices (so far).
    text_seeds : list of int
        Seed slices the text found (``plan.by_text``), with their masks in ``mask``.
    ranked : int
        How many slices CLIP ranked to find them.
    propagated : list of int
        Slices propagation produced (so far), ascending.
    stopped : dict
        ``{"forward": z, "backward": z}`` where a direction stopped early (mask vanished).
    completed : bool
        False when cancelled.
    seconds : float
    """

    plan: PropagationPlan
    mask: np.ndarray
    text_seeds: list[int] = field(default_factory=list)
    ranked: int = 0
    propagated: list[int] = field(default_factory=list)
    stopped: dict[str, int] = field(default_factory=dict)
    completed: bool = True
    seconds: float = 0.0

    @property
    def seed_slices(self) -> list[int]:
        """Every non-locked seed: the user's and the text's."""
        return sorted({*self.plan.seeds, *self.text_seeds} - set(self.plan.locked))

    @property
    def total(self) -> int:
        """Slices propagation had to run (all but the conditioning slices)."""
        conditioning = {*self.seed_slices, *self.plan.locked}
        return max(self.plan.shape[0] - len(conditioning), 0)

    def summary(self, written: int | None = None, skipped: Sequence[int] = (),
                layer: str = "label map") -> str:
        """The status line: seeds, locked, propagated, where it stopped early, and (with
        ``written``) the voxels changed in ``layer``."""
        target = self.plan.target.name
        if not self.completed:
            head = (f"Cancelled after {len(self.propagated)} of {self.total} slices; the "
                    f"slices propagated so far are kept")
        else:
            head = f"Propagated '{target}' in {_seconds(self.seconds)}"
        seeds = self.seed_slices
        how = (f", found by the text: CLIP ranked {self.ranked} slices by image-text "
               "similarity, the chain ran on the best-ranked until one gave a mask"
               if self.text_seeds else "")
        parts = [f"{len(seeds)} seed slice{'s' * (len(seeds) != 1)} ({slice_list(seeds)}{how})"]
        locked = sorted(self.plan.locked)
        parts.append(f"{len(locked)} locked" + (f" ({slice_list(locked)}, corrected by "
                                                "hand, kept)" if locked else ""))
        parts.append(f"{len(self.propagated)} propagated")
        line = f"{head}: " + ", ".join(parts) + "."
        stops = [f"going {d} at z={z}" for d, z in sorted(self.stopped.items())]
        if stops:
            line += (" Stopped early " + " and ".join(stops) + " (the mask had vanished; the "
                     "slices beyond stay empty).")
        if skipped:
            line += (f" Not overwritten: {slice_list(skipped)} (edited while it ran).")
        if written is not None:
            line += f" {written} voxel(s) changed in '{layer}'; Ctrl+Z there undoes it."
        return line


def slice_list(slices: Sequence[int]) -> str:
    """``"z=3"``, ``"z=1, 4"``, ``"z=2-7, 9"``; empty: ``"none"``."""
    zs = sorted({int(z) for z in slices})
    if not zs:
        return "none"
    runs: list[list[int]] = [[zs[0], zs[0]]]
    for z in zs[1:]:
        if z == runs[-1][1] + 1:
            runs[-1][1] = z
        else:
            runs.append([z, z])
    return "z=" + ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)


def _seconds(seconds: float) -> str:
    return format_duration(seconds) if seconds >= 10 else f"{max(seconds, 0.1):.1f} s"


@dataclass(frozen=True)
class AutoChoice:
    """What "auto" means on the device the widget will use.

    Attributes
    ----------
    device : str
        The device asked for (``"auto"``, ``"cpu"``, ``"cuda"``, ...) resolved when it
        exists here.
    sam_model : str
        :func:`~napari_medclipsam.core.models.default_sam_model` of that device.
    precision : str
        ``"bf16"`` or ``"fp32"``: the precision ``auto`` runs at there.
    available : bool
        False when the device asked for is not on this machine (then the choices are
        what it would get).
    """

    device: str
    sam_model: str
    precision: str
    available: bool = True

    @property
    def where(self) -> str:
        kind = self.device.split(":")[0]
        name = {"cuda": "GPU", "mps": "Mac GPU (MPS)"}.get(kind, "CPU")
        return f"this {name}" if self.available else f"a {name} (not found here)"

    @property
    def sam_label(self) -> str:
        """``"auto: sam2_t on this CPU"``."""
        return f"auto: {self.sam_model} on {self.where}"

    @property
    def precision_label(self) -> str:
        """``"auto: bf16 on this CPU"``."""
        return f"auto: {self.precision} on {self.where}"


def auto_choice(device: str | None) -> AutoChoice:
    """Resolve "auto" (SAM model and precision) for ``device`` (None or "auto": CUDA, then
    MPS, then the CPU). Imports torch: call it off the GUI thread the first time."""
    from napari_medclipsam.core.models import default_sam_model, resolve_device
    from napari_medclipsam.core.precision import resolve_precision

    asked = (device or "auto").strip() or "auto"
    try:
        resolved = resolve_device(None if asked == "auto" else asked)
    except (ValueError, RuntimeError):
        gpu = asked.startswith("cuda")
        return AutoChoice(asked, "vit_h" if gpu else "sam2_t", "bf16" if gpu else "fp32",
                          available=False)
    return AutoChoice(str(resolved), default_sam_model(str(resolved)),
                      resolve_precision("auto", str(resolved)))


@dataclass
class SegmentState:
    """Everything the widget shows, in one place."""

    targets: list[Target] = field(default_factory=list)
    run: Run | None = None
    refine_count: int = 0
    book: SliceBook = field(default_factory=SliceBook)
    propagation: Propagation | None = None


class SegmentController:
    """Runs the zero-shot chain and keeps the session's state.

    Parameters
    ----------
    pipeline : ZeroShotPipeline, optional
        A ready pipeline whose models are used for every run (tests pass one built on tiny
        models; a GPU server could pass its own). Without it, :meth:`configure` builds one
        from a config's model fields and keeps it while they do not change.
    """

    def __init__(self, pipeline: ZeroShotPipeline | None = None):
        self.state = SegmentState()
        self.pipeline: ZeroShotPipeline | None = pipeline
        self.injected = pipeline is not None
        self._given = pipeline  # the injected pipeline (its models are used for every run)
        #: whether SAM is loaded: a VLSM run without SAM refinement does not load it, so a
        #: box edit after one loads it first (:meth:`load_sam`, in a worker)
        self.sam_ready = self.injected
        #: where runs compute: None here, else the Dask scheduler of another machine
        self.remote: RemoteCompute | None = None
        #: SAM's embedding of the current run's image as the remote machine sent it, until
        #: it is imported into the local SAM session (once SAM is loaded here)
        self._embedding: dict[str, Any] | None = None
        #: why the last remote embedding could not be used here (``""``: it was)
        self.embedding_problem = ""

    # -- models -----------------------------------------------------------------------
    def configure(self, config: PipelineConfig) -> ZeroShotPipeline:
        """The pipeline for the next run, with ``config``'s parameters; models are kept when
        the model fields (and, once a VLSM is loaded, the VLSM model) are unchanged.

        Every pipeline built here takes its VLSM from :func:`load_vlsm_model` (loaded on first
        use). An injected pipeline always keeps its models; in VLSM mode, unless it holds a
        VLSM of its own, a pipeline on its SAM and the Model field's VLSM runs instead (and
        is kept while that model is unchanged)."""
        old = self.pipeline
        if self.injected:
            given = self._given
            models = {k: getattr(given.config, k) for k in MODEL_FIELDS}
            config = dataclasses.replace(config, **models)
            if config.method != "vlsm" or given.vlsm_loaded:
                if given.vlsm_loaded:
                    config = dataclasses.replace(config, vlsm=dataclasses.replace(
                        config.vlsm, model=given.config.vlsm.model))
                given.config = config
                self.pipeline = given
                return given
            if old is not given and not _vlsm_changed(old, config):
                old.config = config
                return old
            self.pipeline = ZeroShotPipeline(config, sam=given.sam, vlsm=load_vlsm_model)
            return self.pipeline
        if old is not None and all(getattr(old.config, k) == getattr(config, k)
                                   for k in MODEL_FIELDS) and not _vlsm_changed(old, config):
            old.config = config
            return old
        self.pipeline = ZeroShotPipeline(config, vlsm=load_vlsm_model)
        self.sam_ready = False
        return self.pipeline

    # -- another machine ----------------------------------------------------------------
    def set_remote(self, address: str | None) -> RemoteCompute | None:
        """Where the next runs compute: None (or ``""``, ``"this machine"``) here, else the
        Dask scheduler at ``address`` (``tcp://gpu-box:8786``). The connection is kept while
        the address does not change; another address closes it (in the background).

        Raises
        ------
        InputError
            ``address`` is neither (:func:`~napari_medclipsam.remote.compute_address`).
        """
        address = compute_address(address)
        if self.remote is not None and self.remote.address == address:
            return self.remote
        old, self.remote = self.remote, RemoteCompute(address) if address else None
        if old is not None:
            import threading

            threading.Thread(target=old.close, name="medclipsam-remote-close",
                             daemon=True).start()
        return self.remote

    def remote_status(self) -> RemoteStatus:
        """Connect to the remote machine and say what it has (call it in a worker)."""
        if self.remote is None:
            raise InputError("Compute on is this machine: there is nothing to connect to.")
        return self.remote.status()

    def _adopt_embedding(self, reply: RemoteReply) -> None:
        """After a remote single-image run: keep the image's SAM embedding for box edits.

        The SAM for box edits here is the one the worker ran (``auto`` resolved there), on
        this machine's device when the one asked for is not here (the GPU box's ``cuda``);
        it loads on the first box edit (:meth:`load_sam`), which then imports the embedding
        instead of encoding the image. Without an embedding (SAM did not run there) the
        box edit's SAM is chosen here, as after a VLSM run here.
        """
        self._embedding = None
        if not self.injected:
            config = self.pipeline.config
            name = reply.sam_name if reply.embedding is not None and reply.sam_name \
                else config.sam_model
            local = dataclasses.replace(config, sam_model=name,
                                        device=_local_device(config.device))
            if (local.sam_model, local.device) != (config.sam_model, config.device):
                self.pipeline = ZeroShotPipeline(local, vlsm=load_vlsm_model)
                self.sam_ready = False
        if reply.embedding is None:
            return
        self._embedding = reply.embedding
        if self.sam_ready:
            self._import_embedding()

    def _import_embedding(self) -> None:
        """Put the remote run's SAM embedding into the local session (SAM loaded). One of
        other weights than the local SAM's is dropped: the first box edit encodes here."""
        payload, self._embedding = self._embedding, None
        if payload is None:
            return
        try:
            self.pipeline.session.import_embedding(payload["key"], payload)
        except InputError as exc:  # the box edit still works: SAM encodes the image here
            self.embedding_problem = (f"the remote machine's SAM embedding was not used "
                                      f"({exc}); this machine encoded the image once")
        else:
            self.embedding_problem = ""

    def load_sam(self, progress: ProgressFn | None = None) -> None:
        """Check and load the pipeline's SAM if it is not loaded yet (a box edit after a VLSM
        run without SAM refinement needs it); ``progress`` reports ``checking models`` and
        ``loading SAM``. Call it in a worker: loading takes seconds."""
        if self.pipeline is None:
            raise InputError("No models configured: choose the SAM model first.")
        if self.sam_ready:
            return
        from napari_medclipsam.core.models import check_model_sources

        report = progress or (lambda stage, fraction: None)
        config = self.pipeline.config
        report("checking models", 0.0)
        check_model_sources(sam_model=config.sam_model, sam_checkpoint=config.sam_checkpoint,
                            device=config.device)
        report("loading SAM", 0.5)
        _ = self.pipeline.sam
        self.sam_ready = True

    def _check_vlsm_source(self) -> None:
        """In VLSM mode, a Model field naming a folder that is not there: one line, before
        any model loads."""
        config = self.pipeline.config
        if config.method == "vlsm" and not self.pipeline.vlsm_loaded:
            problem = vlsm_source_problem(config.vlsm.model)
            if problem:
                raise InputError(problem)

    def _note_sam_loaded(self) -> None:
        """After ``prepare``: SAM is loaded unless this is a VLSM run without refinement."""
        config = self.pipeline.config
        if config.method != "vlsm" or config.vlsm.refine:
            self.sam_ready = True

    # -- targets ----------------------------------------------------------------------
    def target_for(self, prompt_lines: Sequence[str], register: bool = True) -> Target:
        """The target of these prompt lines: an existing one of that name, or a new one with
        the next free label value (kept in the state unless ``register`` is False)."""
        name = target_name(prompt_lines)
        for target in self.state.targets:
            if target.name == name:
                return target
        value = max((t.value for t in self.state.targets), default=0) + 1
        target = Target(name, value, tuple(line for line in prompt_lines if line.strip()))
        if register:
            self.state.targets.append(target)
        return target

    def label_table(self) -> dict[str, int]:
        """``{name: value}`` of every target (background 0 is implicit)."""
        return {t.name: t.value for t in self.state.targets}

    # -- the two actions ----------------------------------------------------------------
    def run_all(self, image: np.ndarray, prompt_lines: Sequence[str], *, source: str = "",
                slice_index: int | None = None, volume: bool = False,
                progress: ProgressFn | None = None, should_stop: StopFn | None = None,
                on_slice: SliceFn | None = None) -> Run:
        """Run the whole chain on ``image`` (HxW[xC], or (Z, Y, X) with ``volume``) and make it
        the current run. Safe to call from a worker thread: the state changes once, at the
        end.

        Every model source is checked first (``pipeline.prepare``: all missing models in one
        message, before any compute), then the models load, each step reported through
        ``progress(stage, fraction)`` with the pipeline's stage names. A volume run calls
        ``on_slice(z, result)`` as each slice finishes; when ``should_stop`` cancels it, the
        finished slices become the current run (``cancelled=True``) and the
        :class:`CancelledError` raised carries that :class:`Run` as ``partial`` (None when
        no slice had finished).
        """
        if self.pipeline is None:
            raise InputError("No models configured: choose the CLIP and SAM models first.")
        start = time.monotonic()
        target_name(prompt_lines)  # a missing prompt is reported before the models
        remote = self.remote
        if remote is None:  # on another machine, its worker checks and loads the models
            self._check_vlsm_source()
            self.pipeline.prepare(progress)
            self._note_sam_loaded()
        config = self.pipeline.config
        target = self.target_for(prompt_lines)
        text: str | list[str] = list(target.prompts)
        if len(text) == 1:
            text = text[0]
        method = self.pipeline.config.method
        if volume:
            checks: dict[int, Faithfulness] = {}

            def each_slice(z: int, one: SegmentationResult) -> None:
                if one.faithfulness is not None:
                    checks[z] = one.faithfulness
                if on_slice is not None:
                    on_slice(z, one)

            where = ""
            try:
                if remote is not None:
                    reply = remote.segment_volume(config, image, text, progress=progress,
                                                  should_stop=should_stop)
                    vol, where = reply.volume, reply.device
                    checks.update(reply.slice_faithfulness)
                else:
                    vol = self.pipeline.segment_volume(image, text, progress=progress,
                                                       should_stop=should_stop,
                                                       on_slice=each_slice)
            except CancelledError as exc:
                partial: VolumeResult | None = getattr(exc, "partial", None)
                if isinstance(partial, tuple):  # from another machine: with its checks
                    partial, done_checks = partial
                    checks.update(done_checks)
                run = None
                if partial is not None and partial.completed:
                    run = Run(target, source, None, volume=partial, mask=partial.mask,
                              cancelled=True, seconds=time.monotonic() - start,
                              method=method, slice_faithfulness=checks)
                    self.state.run = run
                stopped = CancelledError(cancel_message(run, int(np.shape(image)[0])))
                stopped.partial = run
                raise stopped from exc
            run = Run(target, source, None, volume=vol, mask=vol.mask, method=method,
                      slice_faithfulness=checks, where=where)
            self._embedding = None
        elif remote is not None:
            reply = remote.segment(config, image, text, progress=progress,
                                   should_stop=should_stop)
            result = reply.result
            run = Run(target, source, slice_index, result=result, mask=result.mask,
                      method=method, where=reply.device)
            self._adopt_embedding(reply)
        else:
            result = self.pipeline.segment(image, text, progress=progress,
                                           should_stop=should_stop)
            run = Run(target, source, slice_index, result=result, mask=result.mask,
                      method=method)
            self._embedding = None
        run.seconds = time.monotonic() - start
        self.state.run = run
        return run

    def refine(self, prompts: Prompts, *, progress: ProgressFn | None = None,
               should_stop: StopFn | None = None) -> np.ndarray:
        """Re-run only SAM's decoder from the cached embedding with edited prompts; the new
        HxW bool mask becomes the run's mask.

        When SAM is not loaded yet (:attr:`sam_ready` False: after a VLSM run without SAM
        refinement) it is loaded first (:meth:`load_sam`, reported through ``progress``;
        call it in a worker then); ``should_stop`` after loading raises
        :class:`CancelledError` and leaves the mask as it was."""
        run = self._editable_run()
        if not self.sam_ready and not prompts.empty:
            self.load_sam(progress)
            if should_stop is not None and should_stop():
                raise CancelledError("Cancelled; the mask is unchanged (SAM is loaded now: "
                                     "edit a box again to re-run it).")
        if self.sam_ready:  # a remote run's embedding: SAM's decoder only, here
            self._import_embedding()
        mask = self.pipeline.refine(run.result.rgb, prompts)
        run.mask = mask
        self.state.refine_count += 1
        return mask

    def prompts_from_mask(self, mask: np.ndarray, config: PromptConfig | None = None) -> Prompts:
        """Boxes/points from a painted mask (each connected region one component), with
        ``config`` (default: the pipeline's prompt settings)."""
        self._editable_run()
        mask = np.asarray(mask)
        if not (mask > 0).any():
            raise InputError("The coarse mask is empty: paint the target first.")
        return prompts_from_mask(mask, config or self.pipeline.config.prompts)

    def _editable_run(self) -> Run:
        run = self.state.run
        if run is None or not run.editable:
            raise InputError("Run a single slice first (All slices unchecked); then edit its "
                             "boxes, points or coarse mask.")
        return run

    # -- the label map ------------------------------------------------------------------
    def accept(self, label_map: np.ndarray, mask: np.ndarray | None = None,
               target: Target | None = None, *, slice_index: int | None = None,
               overwrite: bool = False) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
        """Where and what to write so ``label_map`` holds ``mask`` as ``target``.

        The target's earlier voxels in that slice (or volume) that are not in the mask are
        cleared; mask voxels become the target's value, except voxels of another target,
        which are kept unless ``overwrite``. Nothing is written here: the return value is
        ``(index, values)`` for napari's undoable ``Labels.data_setitem``.

        Parameters
        ----------
        label_map : np.ndarray
            The label map: the image's spatial shape, (H, W) or (Z, Y, X).
        mask : np.ndarray, optional
            HxW for one slice or (Z, Y, X); default the current run's mask.
        target : Target, optional
            Default the current run's target.
        slice_index : int, optional
            Where an HxW mask goes in a (Z, Y, X) map; default the current run's slice.
        """
        run = self.state.run
        if mask is None or target is None:
            if run is None:
                raise InputError("Nothing to accept yet: press Run all first.")
            mask = run.mask if mask is None else mask
            target = run.target if target is None else target
            if slice_index is None:
                slice_index = run.slice_index
        label_map = np.asarray(label_map)
        mask = np.asarray(mask).astype(bool)
        offset: tuple[int, ...] = ()
        region = label_map
        if mask.ndim == 2 and label_map.ndim == 3:
            if slice_index is None:
                raise InputError("A 2-D mask needs the slice it belongs to in a 3-D label map.")
            offset = (int(slice_index),)
            region = label_map[slice_index]
        if region.shape != mask.shape:
            raise InputError(f"The mask ({mask.shape}) does not fit the label map "
                             f"({label_map.shape}): pick the label map of this image.")
        new = _write_target(region, mask, target.value, overwrite)
        if label_map.ndim == 3:  # the book: accepted slices are the user's (seeds)
            write = self.state.book.new_write()
            pairs = ([(offset[0], region, new)] if offset
                     else [(z, region[z], new[z]) for z in range(len(new))])
            for z, before, after in pairs:
                was, now = before == target.value, after == target.value
                if now.any() or (was != now).any():
                    self.state.book.note(target.value, int(z), SEED, was, now, write)
        changed = np.nonzero(new != region)
        index = tuple(np.full(len(changed[0]), o, dtype=np.intp) for o in offset) + changed
        return index, new[changed]

    # -- propagation through a volume --------------------------------------------------
    def plan_propagation(self, label_map: np.ndarray, prompt_lines: Sequence[str] = (), *,
                         source: str = "", run_mask: np.ndarray | None = None
                         ) -> PropagationPlan:
        """Sort the slices of a (Z, Y, X) ``label_map`` for a propagation of a target.

        Call it in the GUI thread, with the label map as it is now. The target is the one of
        ``prompt_lines`` (else the current run's). Its seeds are the slices of the label
        map that hold its label and are the user's (painted, accepted, or a seed of an
        earlier propagation), plus the current single-slice run of this target on
        ``source``: its mask as the user left it (``run_mask``, default the run's mask).
        Slices that differ from what the tool last wrote there (:class:`SliceBook`) are
        locked. With no mask anywhere, :meth:`propagate` lets the text choose the seeds.

        Raises
        ------
        InputError
            For a 2-D label map, or no prompt and no run.
        """
        label_map = np.asarray(label_map)
        if label_map.ndim != 3:
            raise InputError("Propagate through volume needs a 3-D image (Z, Y, X); this "
                             "image is 2-D.")
        run = self.state.run
        if any(line.strip() for line in prompt_lines):
            target = self.target_for(prompt_lines, register=False)
        elif run is not None:
            target = run.target
        else:
            raise InputError("Type a prompt first (e.g. 'breast tumor'): it names the target "
                             "and, with no mask drawn yet, finds the seed slice.")
        seeds: dict[int, np.ndarray] = {}
        locked: dict[int, np.ndarray] = {}
        free: list[int] = []
        for z, kind in self.state.book.classify(target.value, label_map).items():
            mask = label_map[z] == target.value
            if kind == SEED:
                seeds[z] = mask
            elif kind == LOCKED:
                locked[z] = mask
            else:
                free.append(z)
        if (run is not None and run.editable and run.target == target and run.source == source
                and run.slice_index is not None and run.slice_index not in locked):
            z = int(run.slice_index)
            mask = np.asarray(run.mask if run_mask is None else run_mask) > 0
            if mask.shape == label_map.shape[1:] and mask.any():
                seeds[z] = mask
                free = [f for f in free if f != z]
        snapshot = {z: mask_digest(label_map[z] == target.value)
                    for z in range(label_map.shape[0])}
        return PropagationPlan(target, source, dict(sorted(seeds.items())),
                               dict(sorted(locked.items())), free, snapshot,
                               tuple(label_map.shape))

    def propagate(self, volume: np.ndarray, plan: PropagationPlan, *,
                  progress: ProgressFn | None = None,
                  should_stop: StopFn | None = None) -> Propagation:
        """Propagate the plan's seeds through ``volume`` (Z, Y, X) with the pipeline's SAM
        (:meth:`~napari_medclipsam.core.pipeline.ZeroShotPipeline.propagate_volume`: SAM 2's
        video predictor, or box to box for SAM). Safe in a worker thread: the state is not
        touched. Without a mask in the plan, the target's prompt chooses the seed slices.

        Models are checked and loaded first (``progress`` reports ``checking models``,
        ``loading ...``), then ``ranking slices`` and ``seed slice z=Z: ...`` (text seeds
        only), then ``propagating: slice n/N (z=Z)``. When ``should_stop`` stops it, the
        :class:`CancelledError` raised carries the :class:`Propagation` so far as
        ``partial`` (None when no slice was propagated yet).
        """
        if self.pipeline is None:
            raise InputError("No models configured: choose the CLIP and SAM models first.")
        volume = np.asarray(volume)
        if volume.shape != plan.shape:
            raise InputError(f"The image {volume.shape} does not fit the label map "
                             f"{plan.shape}: pick the label map of this image.")
        start = time.monotonic()
        remote = self.remote
        if remote is None:
            self._check_vlsm_source()
            self.pipeline.prepare(progress)
            self._note_sam_loaded()
        by_text = plan.by_text
        text: str | list[str] = list(plan.target.prompts)
        if len(text) == 1:
            text = text[0]
        try:
            if remote is not None:
                vol = remote.propagate(
                    self.pipeline.config, volume, text=text if by_text else None,
                    seeds=None if by_text else plan.seeds,
                    locked=None if by_text else plan.locked,
                    progress=progress, should_stop=should_stop).volume
            else:
                vol = self.pipeline.propagate_volume(
                    volume, text=text if by_text else None,
                    seeds=None if by_text else plan.seeds,
                    locked=None if by_text else plan.locked,
                    progress=progress, should_stop=should_stop)
        except CancelledError as exc:
            partial: VolumeResult | None = getattr(exc, "partial", None)
            done = None
            if partial is not None and partial.propagation is not None:
                done = self._propagation(plan, partial, start, by_text)
            stopped = CancelledError(done.summary() if done is not None
                                     else "Cancelled; nothing changed.")
            stopped.partial = done
            raise stopped from exc
        if remote is None:
            self.sam_ready = True  # propagation always runs SAM
        return self._propagation(plan, vol, start, by_text)

    @staticmethod
    def _propagation(plan: PropagationPlan, vol: VolumeResult, start: float,
                     by_text: bool) -> Propagation:
        prop = vol.propagation
        mask = np.array(vol.mask, dtype=bool)
        for z, locked in plan.locked.items():
            mask[z] = locked
        return Propagation(
            plan, mask, text_seeds=list(vol.found_slices) if by_text else [],
            ranked=len(vol.ranking),
            propagated=[z for z in prop.propagated if z not in plan.locked],
            stopped=dict(prop.stopped), completed=bool(prop.completed),
            seconds=time.monotonic() - start)

    def write_propagation(self, label_map: np.ndarray, prop: Propagation, *,
                          overwrite: bool = False
                          ) -> tuple[tuple[np.ndarray, ...], np.ndarray, list[int]]:
        """What to write so ``label_map`` holds a propagation: ``(index, values, skipped)``
        for napari's undoable ``Labels.data_setitem`` (call it in the GUI thread, then
        write). Notes every slice written in the book.

        A finished propagation writes every slice but the locked ones (slices it did not
        reach lose the tool's earlier output there); a cancelled one only its seeds and
        the slices done. Other targets' voxels are kept unless ``overwrite``. A slice whose
        target mask changed since the plan (painted while it ran) is not written: it is
        listed in ``skipped``.
        """
        plan = prop.plan
        label_map = np.asarray(label_map)
        if tuple(label_map.shape) != plan.shape:
            raise InputError(f"The label map changed shape ({plan.shape} -> "
                             f"{label_map.shape}) while propagating; nothing written.")
        target, value = plan.target, plan.target.value
        if all(t.name != target.name for t in self.state.targets):
            self.state.targets.append(target)
        seeds = set(prop.seed_slices)
        if prop.completed:
            todo = [z for z in range(plan.shape[0]) if z not in plan.locked]
        else:
            todo = sorted((seeds | set(prop.propagated)) - set(plan.locked))
        book = self.state.book
        write = book.new_write()
        skipped: list[int] = []
        index: list[tuple[np.ndarray, ...]] = []
        values: list[np.ndarray] = []
        for z in todo:
            region = label_map[z]
            current = region == value
            before = mask_digest(current)
            if before != plan.snapshot.get(z):
                skipped.append(z)
                continue
            new = _write_target(region, prop.mask[z], value, overwrite)
            now = new == value
            after = mask_digest(now)
            origin = SEED if z in seeds else "propagated"
            last = book.last(value, z)
            if before != after or (now.any() and (last is None or last.origin != origin
                                                   or last.after != after)):
                book.note(value, z, origin, before, after, write)
            changed = np.nonzero(new != region)
            if len(changed[0]):
                index.append((np.full(len(changed[0]), z, dtype=np.intp), *changed))
                values.append(new[changed])
        for z in plan.locked:
            digest = mask_digest(label_map[z] == value)
            last = book.last(value, z)
            if last is None or last.origin != LOCKED or last.after != digest:
                book.note(value, z, LOCKED, digest, digest, write)
        self.state.propagation = prop
        if not index:
            empty = np.zeros(0, dtype=np.intp)
            return (empty, empty, empty), np.zeros(0, label_map.dtype), skipped
        merged = tuple(np.concatenate(axis) for axis in zip(*index, strict=True))
        return merged, np.concatenate(values), skipped

    # -- tuning on corrected cases ----------------------------------------------------
    def plan_tuning(self, dataset: str | Path, prompt_lines: Sequence[str], *,
                    grid: str = "small", folds: int = 5) -> TuningPlan:
        """What "Tune on my corrections" will read from an exported dataset, checked before
        any image is read or model loaded: the prompt, the chain (MedCLIP-SAMv2), the
        dataset's records, the label to tune on, and enough corrected cases for ``folds``.
        Cheap: call it in the GUI thread.

        Raises
        ------
        InputError
            One line saying what is wrong and what to do.
        """
        from napari_medclipsam.core.calibrate import dataset_case_files
        from napari_medclipsam.nnunet.export import CASES_FILE

        name = target_name(prompt_lines)
        if grid not in TUNING_GRIDS:
            raise InputError(f"Unknown grid {grid!r}; choose {' or '.join(TUNING_GRIDS)}.")
        if self.pipeline is None:
            raise InputError("No models configured: choose the CLIP and SAM models first.")
        if self.pipeline.config.method != "medclipsamv2":
            raise InputError("Tuning tunes the MedCLIP-SAMv2 chain (saliency, coarse mask, "
                             "SAM): choose Method: MedCLIP-SAMv2 first.")
        if not str(dataset).strip():
            raise InputError("Choose the exported dataset folder (RAW/Dataset001_NAME).")
        found = dataset_case_files(
            dataset, CASES_FILE,
            instead="export the corrected cases from the Pseudo-labels & training dock")
        label = label_name = None
        if len(found.labels) > 1:
            wanted = {t.strip().lower() for t in (name, *prompt_lines) if t.strip()}
            hits = [n for n in found.labels if n.strip().lower() in wanted]
            if not hits:
                names = ", ".join(f"'{n}'" for n in found.labels)
                raise InputError(
                    f"{found.folder.name} holds {len(found.labels)} labels ({names}) and none "
                    f"is named like the prompt '{name}': type the prompt of the target to "
                    f"tune (its label's name, e.g. '{next(iter(found.labels))}').")
            label_name = hits[0]
            label = found.labels[label_name]
        if len(found.files) < folds:
            raise InputError(tuning_count_message(
                len(found.files), folds, found.folder.name, uncorrected=found.uncorrected,
                unusable=len(found.missing)))
        return TuningPlan(found.folder, list(found.files), list(found.missing),
                          found.uncorrected, tuple(t for t in prompt_lines if t.strip()),
                          grid, int(folds), label, label_name)

    def tune(self, plan: TuningPlan, *, progress: ProgressFn | None = None,
             should_stop: StopFn | None = None) -> Tuning:
        """Calibrate the pipeline's settings on the plan's corrected cases (worker thread):
        the models load, the cases are read, :func:`~napari_medclipsam.core.calibrate
        .calibrate` searches the grid (the pipeline's config is the defaults it is compared
        with) and the preset with its report is written to :func:`next_preset_path`. Nothing
        is written, and the state is not changed, when ``should_stop`` cancels it
        (:class:`CancelledError`) or it fails.

        The pipeline's config is not changed either: the view applies
        :meth:`Tuning.state` to its fields when :attr:`Tuning.beats_defaults`.
        """
        from napari_medclipsam.core.calibrate import calibrate, read_cases, write_calibration
        from napari_medclipsam.core.saliency import vit_parts

        if self.pipeline is None:
            raise InputError("No models configured: choose the CLIP and SAM models first.")
        self.pipeline.prepare(progress)
        self._note_sam_loaded()
        if should_stop is not None and should_stop():
            raise CancelledError("Tuning cancelled; nothing changed.")
        prompts = {f.name: plan.prompt for f in plan.files}
        cases, unusable = read_cases(plan.files, prompts, label=plan.label)
        if len(cases) < plan.folds:
            raise InputError(tuning_count_message(
                len(cases), plan.folds, plan.dataset.name, uncorrected=plan.uncorrected,
                unusable=len(plan.missing) + len(unusable)))
        blocks = len(vit_parts(self.pipeline.clip)[2])
        result = calibrate(self.pipeline, cases, tuning_space(plan.grid, blocks),
                           folds=plan.folds, seed=0, progress=progress,
                           should_stop=should_stop)
        if should_stop is not None and should_stop():
            raise CancelledError("Tuning cancelled; nothing changed.")
        paths = write_calibration(result, next_preset_path(plan.dataset))
        return Tuning(plan, result, paths, unusable)


def _write_target(region: np.ndarray, mask: np.ndarray, value: int,
                  overwrite: bool) -> np.ndarray:
    """``region`` (a label map or one slice) with target ``value`` set to ``mask``: its
    voxels outside the mask cleared, the mask's voxels set, except another target's unless
    ``overwrite``."""
    mask = np.asarray(mask, dtype=bool)
    new = region.copy()
    new[(region == value) & ~mask] = 0
    writable = mask if overwrite else mask & ((region == 0) | (region == value))
    new[writable] = value
    return new


def cancel_message(run: Run | None, total: int | None = None) -> str:
    """What a cancelled run kept, in words: ``"Cancelled after 3 of 8 slices; finished
    slices kept."`` for a volume with finished slices, else ``"Cancelled; nothing
    changed."``."""
    if run is None or run.volume is None or not run.slices_done:
        return "Cancelled; nothing changed."
    return (f"Cancelled after {run.slices_done} of {total or run.slices_total} slices; "
            "finished slices kept.")


# --------------------------------------------------------------------------- tuning
#: where "Tune on my corrections" writes its presets, inside the dataset folder
TUNED_FOLDER = "medclipsam_tuned"
#: the calibration grids the dock offers (:meth:`~napari_medclipsam.core.calibrate.SearchSpace
#: .named`), quick first
TUNING_GRIDS = ("small", "default")
#: the CLIP depth the grids' M2IB layers are written for (BiomedCLIP's ViT-B/16: 12 blocks)
GRID_BLOCKS = 12


def tuning_space(grid: str, blocks: int = GRID_BLOCKS):
    """The :class:`~napari_medclipsam.core.calibrate.SearchSpace` ``grid`` for a CLIP whose
    vision tower has ``blocks`` blocks: the grid's M2IB layers are BiomedCLIP's (12 blocks),
    so for another depth they move to the same relative depth (layers 7 and 9 of 12 are 2
    and 3 of 4), within the tower."""
    from napari_medclipsam.core.calibrate import SearchSpace

    space = SearchSpace.named(grid)
    if blocks == GRID_BLOCKS or blocks < 1:
        return space
    layers = tuple(min(blocks - 1, max(0, round(layer * blocks / GRID_BLOCKS)))
                   for layer in space.layers)
    return dataclasses.replace(space, layers=layers)


def next_preset_path(dataset: str | Path) -> Path:
    """``DATASET/medclipsam_tuned/preset.json``, or ``preset_2.json``, ``preset_3.json``, ...:
    the first name none of whose files (the preset and its report,
    :func:`~napari_medclipsam.core.calibrate.calibration_paths`) exists, so an earlier
    tuning is never overwritten."""
    import os

    from napari_medclipsam.core.calibrate import calibration_paths

    folder = Path(dataset) / TUNED_FOLDER
    n = 1
    while True:
        path = folder / ("preset.json" if n == 1 else f"preset_{n}.json")
        if not any(os.path.lexists(p) for p in calibration_paths(path).values()):
            return path
        n += 1


def dice_change(before: float, after: float) -> str:
    """``"0.71 -> 0.78"``; three decimals when two would show no change."""
    digits = 2 if round(before, 2) != round(after, 2) or before == after else 3
    return f"{before:.{digits}f} -> {after:.{digits}f}"


def tuning_count_message(found: int, folds: int, dataset: str, *, uncorrected: int = 0,
                         unusable: int = 0) -> str:
    """Too few corrected cases for the folds, in one line: how many are needed and found,
    what was left out and what to do."""
    left = []
    if uncorrected:
        left.append(f"{uncorrected} uncorrected")
    if unusable:
        left.append(f"{unusable} unusable")
    left_out = f" ({' and '.join(left)} not used)" if left else ""
    hint = ("Export more cases with 'corrected by hand' checked (Pseudo-labels & training "
            "dock)")
    hint += f", or set Folds to {found}." if found >= 2 else "."
    return (f"Tuning needs at least {folds} corrected cases for {folds}-fold "
            f"cross-validation; found {found} in {dataset}{left_out}. {hint}")


@dataclass(frozen=True)
class TuningPlan:
    """What a "Tune on my corrections" run reads (made in the GUI thread, from the dataset's
    records only: no image is read yet).

    Attributes
    ----------
    dataset : Path
        The exported nnU-Net raw dataset (``RAW/Dataset001_NAME``).
    files : list of CaseFile
        Its corrected cases with both files present.
    missing : list of str
        One line per corrected case whose files are missing (skipped).
    uncorrected : int
        Cases not marked corrected: left out.
    prompt : tuple of str
        The dock's prompt lines (every case's prompt).
    grid : str
        ``"small"`` or ``"default"`` (:data:`TUNING_GRIDS`).
    folds : int
        k of the k-fold cross-validation.
    label, label_name : int or None, str or None
        The label tuned on in a dataset of several labels (its value in ``labelsTr`` and
        name); None: every labelled pixel.
    """

    dataset: Path
    files: list
    missing: list[str]
    uncorrected: int
    prompt: tuple[str, ...]
    grid: str = "small"
    folds: int = 5
    label: int | None = None
    label_name: str | None = None

    def describe(self) -> str:
        """``"Tuning 'breast tumor' on 6 corrected cases of Dataset001_Breast (small grid,
        5-fold cross-validation; 2 uncorrected cases not used)..."``."""
        name = target_name(self.prompt)
        on = f" (label '{self.label_name}')" if self.label_name else ""
        notes = [f"{self.grid} grid", f"{self.folds}-fold cross-validation"]
        if self.uncorrected:
            notes.append(f"{self.uncorrected} uncorrected case{'s' * (self.uncorrected != 1)} "
                         "not used")
        if self.missing:
            notes.append(f"{len(self.missing)} with missing files skipped")
        return (f"Tuning '{name}' on {len(self.files)} corrected cases of "
                f"{self.dataset.name}{on} ({'; '.join(notes)})...")


@dataclass
class Tuning:
    """A finished "Tune on my corrections" run.

    Attributes
    ----------
    plan : TuningPlan
    result : CalibrationResult
        The calibration (:func:`~napari_medclipsam.core.calibrate.calibrate`).
    paths : dict of str to Path
        The files written (``preset``, ``folds``, ``table``, ``report``, ``plot``).
    unusable : list of str
        One line per corrected case that could not be read (skipped).
    """

    plan: TuningPlan
    result: Any
    paths: dict[str, Path]
    unusable: list[str] = field(default_factory=list)

    @property
    def cases(self) -> list[str]:
        """The corrected cases it was tuned on."""
        return list(self.result.table.names)

    @property
    def line(self) -> str:
        """``"Tuned on 12 corrected cases: cross-validated Dice 0.71 -> 0.78 (defaults ->
        tuned, 5 folds)"``."""
        cv = self.result.cv
        return (f"Tuned on {len(self.cases)} corrected cases: cross-validated Dice "
                f"{dice_change(cv.default_dice, cv.tuned_dice)} (defaults -> tuned, "
                f"{len(cv.folds)} folds)")

    @property
    def beats_defaults(self) -> bool:
        """True when the tuning beat the defaults on held-out cases (a positive mean gain
        over the folds, even if within their noise): worth applying."""
        return self.result.cv.mean_gain > 0

    @property
    def warning(self) -> str:
        """``""``, or why the gain may be noise (the calibration's warning)."""
        return self.result.warning or ""

    @property
    def folder(self) -> Path:
        """Where the preset and its report are."""
        return self.paths["preset"].parent

    def details(self) -> str:
        """What was chosen, what was skipped and where the files are, in a few lines."""
        from napari_medclipsam.core.calibrate import calibration_paths

        result = self.result
        options = result.table.prompt_options
        lines = [f"Chosen: {result.combination.describe(options)}."]
        if result.combination == result.default:
            lines[0] = "Chosen: the current settings (no combination did better)."
        skipped = []
        if self.plan.uncorrected:
            skipped.append(f"{self.plan.uncorrected} uncorrected")
        bad = len(self.plan.missing) + len(self.unusable)
        if bad:
            skipped.append(f"{bad} unusable ({'; '.join((self.plan.missing + self.unusable)[:2])}"
                           f"{' ...' if bad > 2 else ''})")
        if skipped:
            lines.append(f"Not used: {', '.join(skipped)}.")
        paths = calibration_paths(self.paths["preset"])
        lines.append(f"Preset {paths['preset'].name} and its report ({paths['folds'].name}, "
                     f"{paths['table'].name}, {paths['plot'].name}) in {self.folder}.")
        return "\n".join(lines)

    def state(self, all_slices: bool = False) -> dict[str, Any]:
        """The tuned settings in the shape of the dock's saved settings (``apply_state``):
        the preset's config, the prompt tuned with."""
        preset = self.result.preset()
        return {"prompt": list(preset.get("prompt") or self.plan.prompt),
                "config": preset["config"], "all_slices": bool(all_slices)}


# --------------------------------------------------------------------------- progress
SLICE_STAGE = re.compile(r"^slice (\d+)/(\d+) \(z=(\d+)\): (.*)$")
#: core.calibrate's report of each case (same groups: n, N, the case's name, the step)
CASE_STAGE = re.compile(r"^case (\d+)/(\d+) \((.*)\): (.*)$")
#: core.propagate's report after each propagated slice
PROPAGATE_STAGE = re.compile(r"^propagating: slice (\d+)/(\d+) \(z=(\d+)\)$")


def format_duration(seconds: float) -> str:
    """``"8 s"``, ``"3 min 20 s"``, ``"2 h 05 min"``: the training job's ETA format, so both
    docks say times alike."""
    return format_eta(max(0.0, seconds))


@dataclass(frozen=True)
class ProgressUpdate:
    """One progress report of a run, as the view shows it.

    Attributes
    ----------
    stage : str
        The pipeline's stage name, as reported (``"saliency step 3/10"``, ``"slice 2/8
        (z=5): SAM mask"``).
    fraction : float
        Of the whole run, in [0, 1].
    slice_number, slice_count : int or None
        ``n`` and ``N`` of ``"slice n/N"`` for a volume run.
    slices_done : int
        Slices finished so far (``n - 1`` while slice ``n`` runs, ``N`` at the end).
    eta_s : float or None
        Seconds left, once a slice has finished (None before, and for a single image).
    unit : str
        What is counted: ``"slices"``, or ``"cases"`` for a tuning run (``"case n/N
        (name): ..."``).
    """

    stage: str
    fraction: float
    slice_number: int | None = None
    slice_count: int | None = None
    slices_done: int = 0
    eta_s: float | None = None
    unit: str = "slices"

    @property
    def text(self) -> str:
        """``"slice 3/8 (z=2): SAM mask · 2 of 8 slices done · about 1 min 20 s left"``."""
        parts = [self.stage]
        if self.slice_count:
            parts.append(f"{self.slices_done} of {self.slice_count} {self.unit} done")
        if self.eta_s is not None and self.slices_done < (self.slice_count or 0):
            parts.append(f"about {format_duration(self.eta_s)} left")
        return " · ".join(parts)


class ProgressTracker:
    """Turns ``progress(stage, fraction)`` calls into :class:`ProgressUpdate` s with a slice
    count and an ETA, and keeps every update of the run (``updates``).

    The ETA is measured from the first slice's start (loading the models does not count)
    and extrapolates the run's fraction: ``elapsed * (1 - f) / f``. Propagation reports
    each slice once it is done (``"propagating: slice n/N (z=Z)"``); its ETA is the time per
    slice since the first report times the slices left. A tuning run's cases (``"case n/N
    (name): ..."``) count as slices do.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.updates: list[ProgressUpdate] = []
        self._slices_start: float | None = None
        self._first_propagated: tuple[float, int] | None = None

    def update(self, stage: str, fraction: float) -> ProgressUpdate:
        fraction = float(min(max(fraction, 0.0), 1.0))
        match = SLICE_STAGE.match(stage)
        unit = "slices"
        if match is None and CASE_STAGE.match(stage):
            match, unit = CASE_STAGE.match(stage), "cases"
        propagated = PROPAGATE_STAGE.match(stage) if match is None else None
        if propagated is not None:
            done, count = int(propagated.group(1)), int(propagated.group(2))
            now = self.clock()
            if self._first_propagated is None:
                self._first_propagated = (now, done)
            since, first = self._first_propagated
            eta = (now - since) / (done - first) * (count - done) if done > first else None
            update = ProgressUpdate(stage, fraction, done, count, done, eta)
        elif match is None:
            update = ProgressUpdate(stage, fraction)
        else:
            number, count = int(match.group(1)), int(match.group(2))
            inner = match.group(4)
            now = self.clock()
            if self._slices_start is None:
                self._slices_start = now
            done = number if inner == "done" else number - 1
            eta = None
            if done >= 1 and fraction > 0:
                elapsed = now - self._slices_start
                eta = elapsed * (1.0 - fraction) / fraction
            update = ProgressUpdate(stage, fraction, number, count, done, eta, unit)
        self.updates.append(update)
        return update

    @property
    def stages(self) -> list[str]:
        return [u.stage for u in self.updates]


# --------------------------------------------------------------------------- wording
#: the widget's field of each setting, as its label reads (messages name these)
FIELD_LABELS: Mapping[str, str] = {
    "clip_model": "Models > CLIP model",
    "sam_model": "Models > SAM model",
    "sam_checkpoint": "Models > SAM checkpoint",
    "device": "Models > Device",
    "precision": "Models > Precision",
    "saliency_method": "Advanced > Saliency method",
    "layer": "Advanced > Saliency layer",
    "beta": "Advanced > Focus (beta)",
    "steps": "Advanced > Saliency steps",
    "method": "Advanced > Coarse mask",
    "threshold": "Advanced > Coarse mask",
    "eta_c": "Advanced > Min. confidence (eta_c)",
    "top_k": "Advanced > Regions kept (top-k)",
    "mode": "Advanced > SAM prompt",
    "box_mode": "Advanced > Boxes",
    "pipeline_method": "Method",
    "salip_points_per_side": "Advanced > Points per side",
    "salip_pred_iou_thresh": "Advanced > Pred. IoU threshold",
    "salip_stability_thresh": "Advanced > Stability threshold",
    "salip_area_cap": "Advanced > Area cap (% image)",
    "salip_crop": "Advanced > CLIP sees",
    "salip_box_nms_thresh": "Advanced > Box NMS (IoU)",
    "salip_crop_n_layers": "Advanced > Crop layers",
    "salip_crop_nms_thresh": "Advanced > Crop NMS (IoU)",
    "salip_min_region_area": "Advanced > Min. region (% image)",
    "salip_top_k": "Advanced > Regions kept (top-k)",
    "faithfulness": "Advanced > Faithfulness check",
    "neutral_prompt": "Advanced > Neutral prompt",
    "contrast_prompts": "Advanced > Contrast prompts",
    "max_correlation": "Advanced > Warn at correlation",
    "vlsm_model": "VLSM > Model",
    "vlsm_threshold": "VLSM > Threshold",
    "vlsm_refine": "VLSM > Refine with SAM",
}

#: the command line's phrases in the core's messages -> what to do in the widget
_GUI_PHRASES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), replacement) for pattern, replacement in (
        (r"pass\s+--clip-model\s+local-dir:\S*?(?=\.?(?:\s|$))",
         f"choose that folder in {FIELD_LABELS['clip_model']} (Browse...)"),
        (r"pass\s+--clipseg-model\s+local-dir:\S*?(?=\.?(?:\s|$))",
         f"choose that folder in {FIELD_LABELS['vlsm_model']} (Browse...)"),
        (r"(?<![\w-])--clipseg-model\b", FIELD_LABELS["vlsm_model"]),
        (r"pass\s+--sam-checkpoint\s+PATH(?:\s+\(in napari: the SAM checkpoint field\))?",
         f"choose it in {FIELD_LABELS['sam_checkpoint']} (Browse...)"),
        (r"use\s+--device\s+cpu\s+\(or leave it out to choose automatically\)",
         f"choose cpu (or auto) in {FIELD_LABELS['device']}"),
        (r"use\s+--device\s+cpu", f"choose cpu in {FIELD_LABELS['device']}"),
        (r"\(--clip-model\s+([^)]*)\)", f"({FIELD_LABELS['clip_model']}: \\1)"),
        (r"(?<![\w-])--clip-model\b", FIELD_LABELS["clip_model"]),
        (r"(?<![\w-])--sam-checkpoint\b", FIELD_LABELS["sam_checkpoint"]),
        (r"(?<![\w-])--sam-model\b", FIELD_LABELS["sam_model"]),
        (r"(?<![\w-])--device\b", FIELD_LABELS["device"]),
        (r"(?<![\w-])--precision\b", FIELD_LABELS["precision"]),
        (r"\buse fp32 \(or auto\)", f"choose fp32 (or auto) in {FIELD_LABELS['precision']}"),
    ))
_SETTING_MESSAGE = re.compile(r"^(layer|beta|steps|top_k|threshold|eta_c|method|mode|box_mode"
                              r"|precision|max_correlation) must\b")
#: SalipConfig's range errors ("SaLIP area_cap must be in ...")
_SALIP_MESSAGE = re.compile(r"^SaLIP (\w+) must\b")
#: VlsmConfig's errors ("VLSM threshold must be in (0, 1)", "VLSM model must name ...")
_VLSM_MESSAGE = re.compile(r"^VLSM (model|threshold) must\b")


def gui_message(message: str) -> str:
    """A core message reworded for the widget: command-line flags (``--clip-model``,
    ``--sam-checkpoint``, ``--sam-model``, ``--device``) become the field to fill, and a
    setting's range error says which field holds it. Shell commands to run elsewhere (``hf
    download ... --local-dir``) are kept as they are."""
    for pattern, replacement in _GUI_PHRASES:
        message = pattern.sub(replacement, message)
    setting = _SETTING_MESSAGE.match(message)
    if setting is not None:
        key = setting.group(1)
        if key == "method" and "medclipsamv2" in message:  # PipelineConfig's, not coarse's
            key = "pipeline_method"
        message = f"{message} (field: {FIELD_LABELS[key]})"
    salip = _SALIP_MESSAGE.match(message)
    if salip is not None and f"salip_{salip.group(1)}" in FIELD_LABELS:
        message = f"{message} (field: {FIELD_LABELS['salip_' + salip.group(1)]})"
    vlsm = _VLSM_MESSAGE.match(message)
    if vlsm is not None:
        message = f"{message} (field: {FIELD_LABELS['vlsm_' + vlsm.group(1)]})"
    return "\n".join(_name_model_field(block) for block in _problem_blocks(message))


def _problem_blocks(message: str) -> list[str]:
    """A model message split into its problems (each starts ``CLIP: `` or ``SAM: ``)."""
    blocks: list[list[str]] = []
    for line in message.split("\n"):
        if not blocks or line.startswith(("CLIP: ", "SAM: ")):
            blocks.append([line])
        else:
            blocks[-1].append(line)
    return ["\n".join(block) for block in blocks]


def _name_model_field(block: str) -> str:
    """A CLIP or SAM problem that names no field gets the field to fix it in."""
    if any(label in block for label in FIELD_LABELS.values()):
        return block
    if block.startswith("CLIP: "):
        key = "clip_model"
    elif block.startswith("SAM: "):
        key = "sam_checkpoint" if "checkpoint" in block.lower() else "sam_model"
    else:
        return block
    first, *rest = block.split("\n")
    return "\n".join([f"{first} (field: {FIELD_LABELS[key]})", *rest])


# --------------------------------------------------------------------------- presets
_STOPWORDS = frozenset({"a", "an", "the", "of", "in", "on", "and", "both", "with", "image",
                        "scan", "slice"})
_MODALITIES: Mapping[str, tuple[str, ...]] = {
    "ultrasound": ("ultrasound", "us", "sonography"),
    "mri": ("mri", "mr", "flair", "t1", "t2"),
    "x-ray": ("x-ray", "xray", "radiograph", "cxr"),
    "ct": ("ct",),
}


def _words(text: str) -> list[str]:
    words = re.findall(r"[a-z0-9]+(?:-[a-z0-9]+)?", text.lower().replace("tumour", "tumor"))
    return [w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w
            for w in words]


def _modality(text: str) -> str | None:
    words = set(_words(text))
    for modality, names in _MODALITIES.items():
        if words & set(names):
            return modality
    return None


def matching_presets(prompt_lines: Sequence[str]) -> list[Preset]:
    """The presets (the authors' settings, one per task) whose task the prompt names.

    A preset matches when a prompt line is one of its prompts, or holds every key word of
    its title ("breast tumor" of "breast tumor (ultrasound)"; plurals and "tumour" allowed).
    When the prompt names a modality ("CT", "ultrasound", ...), presets of another
    modality are dropped; a prompt for one side ("left lung") does not match a preset for
    both ("both lungs").
    """
    lines = [line.strip() for line in prompt_lines if line.strip()]
    if not lines:
        return []
    text = " ".join(lines)
    words = set(_words(text))
    modality = _modality(text)
    one_side = len(words & {"left", "right"}) == 1
    found = []
    for preset in list_presets():
        if preset.source != "code":
            continue
        key, _, kind = preset.title.partition("(")
        if one_side and "both" in _words(key):
            continue
        keywords = {w for w in _words(key) if w not in _STOPWORDS}
        exact = {p.lower() for p in preset.prompts} & {line.lower() for line in lines}
        if not exact and not (keywords and keywords <= words):
            continue
        preset_modality = _modality(kind)
        if modality is not None and preset_modality not in (None, modality):
            continue
        found.append(preset)
    return found


def percent(fraction: float) -> str:
    """A fraction of the image as the widget shows it: ``0.6`` -> ``"60%"``, ``0.003`` ->
    ``"0.3%"``, ``1e-4`` -> ``"0.01%"``."""
    return f"{round(100 * fraction, 4):g}%"


def describe_settings(config: PipelineConfig, *, preset: str | None = None,
                      where: str = "", auto_sam: str | None = None,
                      vlsm_arch: str | None = None) -> str:
    """The settings in force, in one line: where it runs, saliency, coarse mask, prompts,
    SAM and whether they are a preset's, e.g. ``"'scan', slice z=2 of 8 · saliency layer 9,
    beta 1, 10 steps · kmeans mask, best 1 · one box · SAM sam2_t (auto) · preset: breast
    tumor (ultrasound)"``. In SaLIP mode (``config.method == "salip"``) the SaLIP generator's
    settings replace the saliency, coarse mask and prompts: ``"'scan' · SaLIP · 16
    points/side, 1 crop layer · IoU > 0.5, stability > 0.5 · area cap 60% · mask crops, best
    1 · SAM vit_b · custom settings"``. In VLSM mode the model, its threshold (with the
    regions kept) and whether SAM refines its mask: ``"'scan' · VLSM clipseg
    (CIDAS/clipseg-rd64-refined) · threshold 0.5, best 1 · SAM refinement off · custom
    settings"`` (``vlsm_arch``: the architecture when the caller read it from a trained
    folder; released CLIPSeg weights are ``clipseg``; SAM is named only when it refines).
    The prompt-faithfulness check is named only when it is off (``"no faithfulness
    check"``) or not the default (``"faithfulness vs 'a photo', 1 contrast, warn at r
    0.8"``).

    A SAM model ``auto`` shows what it resolves to on ``config.device``: ``auto_sam`` when
    the caller knows it (``""``: not known yet, shown as ``auto``), else resolved here
    (:func:`~napari_medclipsam.core.models.resolve_sam_model`, which imports torch)."""
    sal, coarse, prompts = config.saliency, config.coarse, config.prompts
    method = {"otsu": "Otsu", "kmeans": "KMeans", "fixed": f"threshold {coarse.threshold:g}",
              "crf": "DenseCRF"}
    kept = f", confidence > {coarse.eta_c:g}" if coarse.eta_c > 0 else ""
    kept += ", all regions" if coarse.top_k is None else f", best {coarse.top_k}"
    mask = f"{method.get(coarse.method, coarse.method)} mask{kept}"
    boxes = "one box per region" if prompts.box_mode == "per_component" else "one box"
    sam_prompt = {"boxes": boxes, "points": f"{prompts.n_positive} points",
                  "both": f"{boxes} + points"}.get(prompts.mode, prompts.mode)
    parts = [where] if where else []
    uses_sam = config.method != "vlsm" or config.vlsm.refine
    sam = config.sam_model
    if sam in ("", "auto") and uses_sam:
        if auto_sam is None:
            from napari_medclipsam.core.models import resolve_sam_model

            auto_sam = resolve_sam_model("auto", config.device)
        sam = f"{auto_sam} (auto)" if auto_sam else "auto"
    if config.method == "salip":
        parts += _describe_salip(config)
    elif config.method == "vlsm":
        v = config.vlsm
        if vlsm_arch is None and trained_vlsm_folder(v.model) is None:
            vlsm_arch = "clipseg"  # released CLIPSeg weights
        model = f"VLSM {vlsm_arch}" if vlsm_arch else "VLSM"
        parts += [f"{model} ({vlsm_model_label(v.model)})", f"threshold {v.threshold:g}{kept}",
                  f"SAM refinement from {sam_prompt}" if v.refine else "SAM refinement off"]
    else:
        if sal.method == "m2ib":
            saliency = f"saliency layer {sal.layer}, beta {sal.beta:g}, {sal.steps} steps"
        else:
            name = {"gscorecam": "gScoreCAM", "gradcam": "GradCAM"}[sal.method]
            saliency = f"{name} saliency"
        parts += [saliency, mask, sam_prompt]
    faithfulness = describe_faithfulness_settings(config.faithfulness)
    if faithfulness:
        parts.append(faithfulness)
    if uses_sam:
        parts.append(f"SAM {sam}")
    parts.append(f"preset: {preset}" if preset else "custom settings")
    return " · ".join(parts)


def describe_faithfulness_settings(config: FaithfulnessConfig) -> str:
    """The faithfulness check's part of :func:`describe_settings`: ``""`` for the defaults,
    ``"no faithfulness check"`` when it is off, else what differs (``"faithfulness vs the
    empty prompt, 2 contrasts, warn at r 0.8"``)."""
    if not config.enabled:
        return "no faithfulness check"
    default = FaithfulnessConfig()
    parts = []
    if config.neutral_prompt != default.neutral_prompt:
        parts.append(f"vs {neutral_name(config.neutral_prompt)}")
    n = len(config.contrast_prompts)
    if n:
        parts.append(f"{n} contrast{'s' * (n != 1)}")
    if config.max_correlation != default.max_correlation:
        parts.append(f"warn at r {config.max_correlation:g}")
    return "faithfulness " + ", ".join(parts) if parts else ""


def neutral_name(prompt: str) -> str:
    """A neutral prompt as the dock names it: ``'an image'`` quoted, "" as "the empty
    prompt"."""
    return repr(prompt) if prompt else "the empty prompt"


#: what separates the contrast prompts in their text field (a prompt may hold commas)
CONTRAST_SEPARATOR = ";"


def split_contrast_prompts(text: str) -> tuple[str, ...]:
    """The Contrast prompts field's text as prompts: ``"normal tissue; a cyst"`` ->
    ``("normal tissue", "a cyst")`` (semicolons or line breaks separate; blanks dropped)."""
    return tuple(part.strip() for part in re.split(r"[;\n]", text) if part.strip())


def join_contrast_prompts(prompts: Sequence[str]) -> str:
    """The inverse of :func:`split_contrast_prompts`, for the field."""
    return f"{CONTRAST_SEPARATOR} ".join(prompts)


# --------------------------------------------------------------------------- faithfulness
@dataclass(frozen=True)
class FaithfulnessView:
    """A run's prompt-faithfulness check as the dock shows it.

    Attributes
    ----------
    text : str
        The score line: ``"Faithfulness 0.31 (r = 0.69 vs 'an image'; 40% of the mask also
        neutral)"``; for a volume, the mean over its slices and how many were flagged.
    warning : str
        ``""`` when the text steers the result (every slice, for a volume); else what is
        wrong and what to try.
    score, correlation : float
        ``1 - r`` and Pearson's r with the neutral prompt's map (a volume: the mean r over
        its slices).
    slices, flagged : int
        A volume run's slices checked and those flagged as not steered (0, 0 for an image).
    """

    text: str
    warning: str
    score: float
    correlation: float
    slices: int = 0
    flagged: int = 0

    @property
    def steers(self) -> bool:
        return not self.warning


def faithfulness_view(run: Run | None) -> FaithfulnessView | None:
    """What the dock shows of ``run``'s prompt-faithfulness check: a single image's
    ``result.faithfulness``, or a volume run's checks summarised over its slices (the mean
    correlation with the neutral prompt's map, the slices flagged and the worst one's
    warning). None when there is no check (switched off, or nothing to compare: a SaLIP
    run without proposals)."""
    if run is None:
        return None
    if run.result is not None:
        check = run.result.faithfulness
        return None if check is None else _image_view(check)
    checks = dict(sorted(run.slice_faithfulness.items()))
    if not checks:
        return None
    first = next(iter(checks.values()))
    mean_r = mean_faithfulness(list(checks.values())).correlation
    flagged = [z for z, c in checks.items() if not c.steers]
    n = len(checks)
    text = (f"Faithfulness {1.0 - mean_r:.2f} (mean r = {mean_r:.2f} vs "
            f"{neutral_name(first.neutral_prompt)} over {n} slice{'s' * (n != 1)}); ")
    text += (f"{len(flagged)} of {n} flagged ({slice_list(flagged)})" if flagged
             else "none flagged")
    warning = ""
    if flagged:
        worst = max(flagged, key=lambda z: _worst_correlation(checks[z]))
        warning = (f"The text did not steer the map on {len(flagged)} of {n} slices. "
                   f"z={worst}: {checks[worst].message}")
    return FaithfulnessView(text, warning, 1.0 - mean_r, mean_r, n, len(flagged))


def _worst_correlation(check: Faithfulness) -> float:
    return max([check.correlation, *(r for _, r in check.contrasts)])


def _image_view(check: Faithfulness) -> FaithfulnessView:
    parts = [f"r = {check.correlation:.2f} vs {neutral_name(check.neutral_prompt)}"]
    if check.neutral_overlap is not None:
        parts.append(f"{check.neutral_overlap:.0%} of the mask also neutral")
    parts += [f"r = {r:.2f} vs {c!r}" for c, r in check.contrasts]
    text = f"Faithfulness {check.score:.2f} ({'; '.join(parts)})"
    return FaithfulnessView(text, check.message, check.score, check.correlation)


def _describe_salip(config: PipelineConfig) -> list[str]:
    """SaLIP's part of :func:`describe_settings`."""
    s = config.salip
    grid = f"{s.points_per_side} points/side"
    if s.crop_n_layers:
        grid += f", {s.crop_n_layers} crop layer{'s' * (s.crop_n_layers != 1)}"
    return ["SaLIP", grid,
            f"IoU > {s.pred_iou_thresh:g}, stability > {s.stability_thresh:g}",
            f"area cap {percent(s.area_cap)}", f"{s.crop} crops, best {s.top_k}"]


# --------------------------------------------------------------------------- SaLIP
#: the columns of :func:`proposal_labels`' features table
PROPOSAL_FEATURES = ("index", "score", "area", "retrieved_rank", "predicted_iou",
                     "stability")


def proposal_labels(result: SegmentationResult) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """SaLIP's proposals (``result.extra["salip"]``) as one HxW int32 label image and its
    features table, for a napari Labels layer.

    Proposal ``i`` of ``extra["salip"]["proposals"]`` (every proposal under the area cap)
    is label ``i + 1``. The largest are painted first, so a smaller proposal lying on a
    larger one stays visible (a proposal entirely covered by smaller ones shows nowhere, but
    keeps its row). The features (one row per label; ``index`` is the label value) hold
    CLIP's ``score`` (100 x cosine with the text), the ``area`` in pixels, the
    ``retrieved_rank`` (1 = the best, sent to SAM; 0 = not retrieved), SAM's
    ``predicted_iou`` and ``stability``. A result without SaLIP data (a MedCLIP-SAMv2 run,
    a constant image) gives an empty image and table.
    """
    shape = result.mask.shape
    salip = result.extra.get("salip") or {}
    proposals = list(salip.get("proposals", ()))
    scores = np.asarray(salip.get("scores", np.zeros(0)), dtype=np.float32)
    ranks = np.zeros(len(proposals), dtype=np.int32)
    for rank, i in enumerate(salip.get("retrieved", ()), start=1):
        ranks[i] = rank
    labels = np.zeros(shape, dtype=np.int32)
    for i in sorted(range(len(proposals)), key=lambda i: (-proposals[i].area, i)):
        labels[proposals[i].mask] = i + 1
    features = {
        "index": np.arange(1, len(proposals) + 1, dtype=np.int32),
        "score": scores[:len(proposals)],
        "area": np.array([p.area for p in proposals], dtype=np.int64),
        "retrieved_rank": ranks,
        "predicted_iou": np.array([p.predicted_iou for p in proposals], dtype=np.float32),
        "stability": np.array([p.stability for p in proposals], dtype=np.float32),
    }
    return labels, features


# --------------------------------------------------------------------------- saving
NIFTI_SUFFIXES = (".nii.gz", ".nii")


def _stem_suffix(name: str) -> tuple[str, str]:
    stem = file_stem(name)  # .nii.gz counts as one suffix
    return stem, name[len(stem):]


def label_map_path(path: str | Path) -> Path:
    """Where :func:`save_mask` writes the label map beside ``path``:
    ``mask.nii.gz`` -> ``mask_label_map.nii.gz`` (its names: ``mask_label_map.json``)."""
    path = Path(path)
    stem, suffix = _stem_suffix(path.name)
    return path.with_name(f"{stem}_label_map{suffix}")


def _same_file(a: Path, b: str | Path | None) -> bool:
    if not b:
        return False
    try:
        return a.expanduser().resolve() == Path(b).expanduser().resolve()
    except OSError:
        return False


def save_mask(path: str | Path, mask: np.ndarray, *, affine: np.ndarray | None = None,
              label_map: np.ndarray | None = None, label_names: Mapping[int, str] | None = None,
              source_path: str | Path | None = None, slice_index: int | None = None,
              spatial_shape: tuple[int, ...] | None = None, qform_code: int = 1,
              sform_code: int = 1) -> list[Path]:
    """Write the SAM mask (0/1) and, when given, the label map beside it.

    The suffix of ``path`` chooses the format: ``.nii.gz``/``.nii`` (NIfTI with ``affine``,
    the source scan's voxel -> RAS matrix) or ``.png`` (2-D only; the mask as 0/255, the
    label map with its values). The label map goes to :func:`label_map_path` and its names
    to a JSON file beside it. Every file is written atomically, and nothing is written when
    any output would replace ``source_path`` (the scan).

    Parameters
    ----------
    mask : np.ndarray
        HxW or (Z, Y, X); anything > 0 is the target.
    slice_index, spatial_shape
        A single slice's HxW mask of a (Z, Y, X) scan is written to NIfTI as a volume of
        ``spatial_shape`` holding it at ``slice_index`` (the rest empty), so it opens aligned
        with the scan; as PNG it is the slice alone.

    Returns
    -------
    list of Path
        The files written (mask, then label map and its names).

    Raises
    ------
    InputError
        For another suffix, a volume as PNG, or an output that is the source image.
    """
    from napari_medclipsam.core.io import label_dtype, write_nifti, write_text

    path = Path(path)
    lower = path.name.lower()
    if lower.endswith(NIFTI_SUFFIXES):
        kind = "nifti"
    elif lower.endswith(".png"):
        kind = "png"
    else:
        raise InputError(f"Save the mask as .nii.gz (NIfTI, keeps the scan's geometry) or "
                         f".png (2-D images); got {path.name!r}.")
    mask = (np.asarray(mask) > 0).astype(np.uint8)
    if kind == "nifti" and mask.ndim == 2 and spatial_shape is not None \
            and len(spatial_shape) == 3:
        if slice_index is None:
            raise InputError("A single slice's mask needs its slice index in the volume.")
        full = np.zeros(spatial_shape, np.uint8)
        full[slice_index] = mask
        mask = full
    if kind == "png" and mask.ndim != 2:
        raise InputError("A volume's mask cannot be a PNG: choose a .nii.gz name.")
    outputs = [path]
    if label_map is not None:
        label_map = np.asarray(label_map)
        if kind == "png" and label_map.ndim != 2:
            raise InputError("The label map is a volume: save as .nii.gz, not PNG.")
        map_path = label_map_path(path)
        outputs += [map_path, map_path.with_name(_stem_suffix(map_path.name)[0] + ".json")]
    for out in outputs:
        if _same_file(out, source_path):
            raise InputError(f"{out.name} is the source image: choose another file name "
                             "(the scan is never overwritten).")
    if kind == "nifti":
        if affine is None:
            affine = np.eye(4)
        write_nifti(path, mask, affine, dtype=np.uint8, qform_code=qform_code,
                    sform_code=sform_code)
        if label_map is not None:
            write_nifti(outputs[1], label_map, affine, dtype=label_dtype(label_map),
                        qform_code=qform_code, sform_code=sform_code)
    else:
        from napari_medclipsam.core.io import write_mask_png

        write_mask_png(path, mask)
        if label_map is not None:
            _write_label_png(outputs[1], label_map)
    if label_map is not None:
        names = {"background": 0}
        names.update({str(name): int(value) for value, name in sorted(
            (label_names or {}).items()) if int(value) != 0})
        write_text(outputs[2], json.dumps({"labels": names}, indent=2) + "\n")
    return outputs


def _write_label_png(path: Path, labels: np.ndarray) -> None:
    import imageio.v3 as iio

    from napari_medclipsam.core.io import atomic_path

    labels = np.asarray(labels)
    if labels.min() < 0 or labels.max() > 65535:
        raise InputError("Label values must be 0..65535 for a PNG: save as .nii.gz.")
    data = labels.astype(np.uint8 if labels.max() < 256 else np.uint16)
    with atomic_path(path) as tmp:
        iio.imwrite(str(tmp), data, extension=".png")
