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
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from napari_medclipsam.core.config import PipelineConfig, PromptConfig
from napari_medclipsam.core.errors import InputError
from napari_medclipsam.core.pipeline import SegmentationResult, VolumeResult, ZeroShotPipeline
from napari_medclipsam.core.postprocess import Prompts, prompts_from_mask

ProgressFn = Callable[[str, float], None]
StopFn = Callable[[], bool]

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
    """

    target: Target
    source: str
    slice_index: int | None
    result: SegmentationResult | None = None
    volume: VolumeResult | None = None
    mask: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), bool))

    @property
    def editable(self) -> bool:
        return self.result is not None


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
                progress: ProgressFn | None = None, should_stop: StopFn | None = None) -> Run:
        """Run the whole chain on ``image`` (HxW[xC], or (Z, Y, X) with ``volume``) and make it
        the current run. Safe to call from a worker thread: the state changes once, at the
        end."""
        if self.pipeline is None:
            raise InputError("No models configured: choose the CLIP and SAM models first.")
        target = self.target_for(prompt_lines)
        text: str | list[str] = list(target.prompts)
        if len(text) == 1:
            text = text[0]
        if volume:
            vol = self.pipeline.segment_volume(image, text, progress=progress,
                                               should_stop=should_stop)
            run = Run(target, source, None, volume=vol, mask=vol.mask)
        else:
            result = self.pipeline.segment(image, text, progress=progress,
                                           should_stop=should_stop)
            run = Run(target, source, slice_index, result=result, mask=result.mask)
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
