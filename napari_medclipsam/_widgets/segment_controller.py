"""The Qt-free controller of the "Text-prompt segmentation" widget.

It holds the typed state of the session (:class:`SegmentState`: the targets of the label map
and the current :class:`Run`) and does the work; the widget (:mod:`.segment_widget`) only
reads fields, moves layers and wires signals. Nothing here imports Qt or napari, so every
method is testable with plain arrays:

>>> ctl = SegmentController(pipeline)                                    # doctest: +SKIP
>>> run = ctl.run_all(image, ["breast tumor"])                           # worker thread
>>> mask = ctl.refine(Prompts(boxes=np.array([[10, 10, 40, 40]])))      # a box edit
>>> index, values = ctl.accept(label_map, mask)                          # into the label map

Label map: every target (a prompt or preset) owns one label value (1, 2, ... in the order
they were first run) and its name; :meth:`SegmentController.accept` writes a target's mask
into the map without touching other targets' voxels unless asked to.

Also here, for the view to show: :class:`ProgressTracker` (the pipeline's stage names with
the slice count and an ETA), :func:`gui_message` (the core's command-line wording turned
into the widget's field names), :func:`matching_presets` and :func:`describe_settings` (the
preset a prompt matches, the settings in force in one line) and :func:`save_mask` (the SAM
mask and the label map to NIfTI or PNG).
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from napari_medclipsam.core.config import PipelineConfig, PromptConfig
from napari_medclipsam.core.errors import CancelledError, InputError
from napari_medclipsam.core.io import file_stem
from napari_medclipsam.core.pipeline import SegmentationResult, VolumeResult, ZeroShotPipeline
from napari_medclipsam.core.postprocess import Prompts, prompts_from_mask
from napari_medclipsam.core.presets import Preset, list_presets
from napari_medclipsam.nnunet.job import format_eta

ProgressFn = Callable[[str, float], None]
StopFn = Callable[[], bool]
SliceFn = Callable[[int, SegmentationResult], None]

#: the model fields of a PipelineConfig: a change in one of them needs new models
MODEL_FIELDS = ("clip_model", "sam_model", "sam_checkpoint", "device")


def target_name(prompt_lines: Sequence[str]) -> str:
    """The name of a target: its prompt, or ``"first line +N"`` for an ensemble."""
    lines = [line for line in prompt_lines if line.strip()]
    if not lines:
        raise InputError("Type a prompt first (e.g. 'breast tumor'), or pick a preset.")
    return lines[0] if len(lines) == 1 else f"{lines[0]} +{len(lines) - 1}"


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
    """

    target: Target
    source: str
    slice_index: int | None
    result: SegmentationResult | None = None
    volume: VolumeResult | None = None
    mask: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), bool))
    cancelled: bool = False
    seconds: float = 0.0

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


@dataclass
class SegmentState:
    """Everything the widget shows, in one place."""

    targets: list[Target] = field(default_factory=list)
    run: Run | None = None
    refine_count: int = 0


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

    # -- models -----------------------------------------------------------------------
    def configure(self, config: PipelineConfig) -> ZeroShotPipeline:
        """The pipeline for the next run, with ``config``'s parameters; models are kept when
        the model fields are unchanged (an injected pipeline always keeps its models)."""
        old = self.pipeline
        if self.injected:
            models = {k: getattr(old.config, k) for k in MODEL_FIELDS}
            old.config = dataclasses.replace(config, **models)
            return old
        if old is not None and all(getattr(old.config, k) == getattr(config, k)
                                   for k in MODEL_FIELDS):
            old.config = config
            return old
        self.pipeline = ZeroShotPipeline(config)
        return self.pipeline

    # -- targets ----------------------------------------------------------------------
    def target_for(self, prompt_lines: Sequence[str]) -> Target:
        """The target of these prompt lines: an existing one of that name, or a new one with
        the next free label value."""
        name = target_name(prompt_lines)
        for target in self.state.targets:
            if target.name == name:
                return target
        value = max((t.value for t in self.state.targets), default=0) + 1
        target = Target(name, value, tuple(line for line in prompt_lines if line.strip()))
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
        self.pipeline.prepare(progress)
        target = self.target_for(prompt_lines)
        text: str | list[str] = list(target.prompts)
        if len(text) == 1:
            text = text[0]
        if volume:
            try:
                vol = self.pipeline.segment_volume(image, text, progress=progress,
                                                   should_stop=should_stop, on_slice=on_slice)
            except CancelledError as exc:
                partial: VolumeResult | None = getattr(exc, "partial", None)
                run = None
                if partial is not None and partial.completed:
                    run = Run(target, source, None, volume=partial, mask=partial.mask,
                              cancelled=True, seconds=time.monotonic() - start)
                    self.state.run = run
                stopped = CancelledError(cancel_message(run, int(np.shape(image)[0])))
                stopped.partial = run
                raise stopped from exc
            run = Run(target, source, None, volume=vol, mask=vol.mask)
        else:
            result = self.pipeline.segment(image, text, progress=progress,
                                           should_stop=should_stop)
            run = Run(target, source, slice_index, result=result, mask=result.mask)
        run.seconds = time.monotonic() - start
        self.state.run = run
        return run

    def refine(self, prompts: Prompts) -> np.ndarray:
        """Re-run only SAM's decoder from the cached embedding with edited prompts; the new
        HxW bool mask becomes the run's mask."""
        run = self._editable_run()
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
        new = region.copy()
        new[(region == target.value) & ~mask] = 0
        writable = mask if overwrite else mask & ((region == 0) | (region == target.value))
        new[writable] = target.value
        changed = np.nonzero(new != region)
        index = tuple(np.full(len(changed[0]), o, dtype=np.intp) for o in offset) + changed
        return index, new[changed]


def cancel_message(run: Run | None, total: int | None = None) -> str:
    """What a cancelled run kept, in words: ``"Cancelled after 3 of 8 slices; finished
    slices kept."`` for a volume with finished slices, else ``"Cancelled; nothing
    changed."``."""
    if run is None or run.volume is None or not run.slices_done:
        return "Cancelled; nothing changed."
    return (f"Cancelled after {run.slices_done} of {total or run.slices_total} slices; "
            "finished slices kept.")


# --------------------------------------------------------------------------- progress
SLICE_STAGE = re.compile(r"^slice (\d+)/(\d+) \(z=(\d+)\): (.*)$")


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
    """

    stage: str
    fraction: float
    slice_number: int | None = None
    slice_count: int | None = None
    slices_done: int = 0
    eta_s: float | None = None

    @property
    def text(self) -> str:
        """``"slice 3/8 (z=2): SAM mask · 2 of 8 slices done · about 1 min 20 s left"``."""
        parts = [self.stage]
        if self.slice_count:
            parts.append(f"{self.slices_done} of {self.slice_count} slices done")
        if self.eta_s is not None and self.slices_done < (self.slice_count or 0):
            parts.append(f"about {format_duration(self.eta_s)} left")
        return " · ".join(parts)


class ProgressTracker:
    """Turns ``progress(stage, fraction)`` calls into :class:`ProgressUpdate` s with a slice
    count and an ETA, and keeps every update of the run (``updates``).

    The ETA is measured from the first slice's start (loading the models does not count)
    and extrapolates the run's fraction: ``elapsed * (1 - f) / f``.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.updates: list[ProgressUpdate] = []
        self._slices_start: float | None = None

    def update(self, stage: str, fraction: float) -> ProgressUpdate:
        fraction = float(min(max(fraction, 0.0), 1.0))
        match = SLICE_STAGE.match(stage)
        if match is None:
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
            update = ProgressUpdate(stage, fraction, number, count, done, eta)
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
    "layer": "Advanced > Saliency layer",
    "beta": "Advanced > Focus (beta)",
    "steps": "Advanced > Saliency steps",
    "method": "Advanced > Coarse mask",
    "threshold": "Advanced > Coarse mask",
    "eta_c": "Advanced > Min. confidence (eta_c)",
    "top_k": "Advanced > Regions kept (top-k)",
    "mode": "Advanced > SAM prompt",
    "box_mode": "Advanced > Boxes",
}

#: the command line's phrases in the core's messages -> what to do in the widget
_GUI_PHRASES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), replacement) for pattern, replacement in (
        (r"pass\s+--clip-model\s+local-dir:\S*?(?=\.?(?:\s|$))",
         f"choose that folder in {FIELD_LABELS['clip_model']} (Browse...)"),
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
    ))
_SETTING_MESSAGE = re.compile(r"^(layer|beta|steps|top_k|threshold|eta_c|method|mode|box_mode)"
                              r" must\b")


def gui_message(message: str) -> str:
    """A core message reworded for the widget: command-line flags (``--clip-model``,
    ``--sam-checkpoint``, ``--sam-model``, ``--device``) become the field to fill, and a
    setting's range error says which field holds it. Shell commands to run elsewhere (``hf
    download ... --local-dir``) are kept as they are."""
    for pattern, replacement in _GUI_PHRASES:
        message = pattern.sub(replacement, message)
    setting = _SETTING_MESSAGE.match(message)
    if setting is not None:
        message = f"{message} (field: {FIELD_LABELS[setting.group(1)]})"
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


def describe_settings(config: PipelineConfig, *, preset: str | None = None,
                      where: str = "") -> str:
    """The settings in force, in one line: where it runs, saliency, coarse mask, prompts,
    SAM and whether they are a preset's, e.g. ``"'scan', slice z=2 of 8 · saliency layer 9,
    beta 1, 10 steps · kmeans mask, best 1 · one box · SAM vit_h · preset: breast tumor
    (ultrasound)"``."""
    sal, coarse, prompts = config.saliency, config.coarse, config.prompts
    method = {"otsu": "Otsu", "kmeans": "KMeans", "fixed": f"threshold {coarse.threshold:g}"}
    mask = f"{method.get(coarse.method, coarse.method)} mask"
    if coarse.eta_c > 0:
        mask += f", confidence > {coarse.eta_c:g}"
    mask += ", all regions" if coarse.top_k is None else f", best {coarse.top_k}"
    boxes = "one box per region" if prompts.box_mode == "per_component" else "one box"
    sam_prompt = {"boxes": boxes, "points": f"{prompts.n_positive} points",
                  "both": f"{boxes} + points"}.get(prompts.mode, prompts.mode)
    parts = [where] if where else []
    parts += [f"saliency layer {sal.layer}, beta {sal.beta:g}, {sal.steps} steps", mask,
              sam_prompt, f"SAM {config.sam_model}",
              f"preset: {preset}" if preset else "custom settings"]
    return " · ".join(parts)


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
