"""3-D by propagation: masks on a few slices -> a mask through the whole (Z, Y, X) volume.

SAM 2.1 backends use ``sam2``'s video predictor over the slices as frames
(:class:`VolumePredictor`, a subclass of ``SAM2VideoPredictor`` that takes the slices as an
array instead of a folder of JPEG files). Every seed slice (a mask the user drew, corrected,
or the text chain produced) is a conditioning frame; propagation runs forward from the lowest
seed to the last slice and backward from the lowest seed to the first, so slices between
seeds see every seed in memory. A correction is one more seed: propagating again from there
is what "a correction re-propagates" means.

SAM (segment-anything) backends use the cheap path (:func:`propagate_by_boxes`): the box of
the previous slice's mask prompts SAM on the next slice, outward from each seed.

Both stop in a direction once ``stop_after_empty`` consecutive slices came out empty (the
object has ended; the remaining slices that way stay empty and are reported as not run), and
never write into ``locked`` slices (slices the user corrected by hand keep their masks).

Conventions: volumes are (Z, Y, X, 3) uint8 RGB slices (one window for the whole volume, as
:func:`~napari_medclipsam.core.io.to_rgb_uint8` gives); masks (Z, Y, X) bool.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import CancelledError, InputError
from .postprocess import boxes_from_labels
from .precision import autocast

ProgressFn = Callable[[str, float], None]
StopFn = Callable[[], bool]

#: SAM 2's own frame normalisation (``sam2.utils.misc.load_video_frames``: ImageNet mean/std).
_SAM2_MEAN = (0.485, 0.456, 0.406)
_SAM2_STD = (0.229, 0.224, 0.225)


@dataclass
class PropagationResult:
    """What a propagation produced.

    Attributes
    ----------
    mask : np.ndarray
        (Z, Y, X) bool: seeds and locked slices as given, propagated slices as predicted,
        slices not reached empty.
    seeds : list of int
        Slices used as conditioning frames (seeds and locked slices), ascending.
    propagated : list of int
        Slices whose mask propagation wrote, ascending.
    stopped : dict
        ``{"forward": z, "backward": z}``: where a direction stopped early because the mask
        had vanished (slices beyond were not run); absent when it ran to the end.
    completed : bool
        False when cancelled (then the mask holds the slices done so far).
    """

    mask: np.ndarray
    seeds: list[int]
    propagated: list[int] = field(default_factory=list)
    stopped: dict[str, int] = field(default_factory=dict)
    completed: bool = True


class _Frames:
    """Lazy (3, S, S) float32 frames of a (Z, Y, X, 3) uint8 volume, normalised as SAM 2's
    frame loader does, so the whole resized volume is never held in memory."""

    def __init__(self, volume_rgb: np.ndarray, size: int):
        self.volume = volume_rgb
        self.size = int(size)

    def __len__(self) -> int:
        return len(self.volume)

    def __getitem__(self, index: int):
        import torch
        import torch.nn.functional as F

        frame = torch.from_numpy(np.ascontiguousarray(self.volume[index])).permute(2, 0, 1)
        frame = frame[None].float().div_(255.0)
        frame = F.interpolate(frame, size=(self.size, self.size), mode="bilinear",
                              align_corners=False, antialias=True)[0]
        mean = torch.tensor(_SAM2_MEAN).view(3, 1, 1)
        std = torch.tensor(_SAM2_STD).view(3, 1, 1)
        return (frame - mean) / std


def _video_predictor_base():
    from sam2.sam2_video_predictor import SAM2VideoPredictor

    return SAM2VideoPredictor


class VolumePredictor(_video_predictor_base()):  # type: ignore[misc]
    """``sam2``'s ``SAM2VideoPredictor`` over the slices of a volume held in memory.

    Only :meth:`init_state` differs: the released one reads a folder of JPEG files (lossy,
    and a disk round trip for every volume); this one takes a (Z, Y, X, 3) uint8 array and
    resizes each slice when the model first needs it. The state it builds has the fields
    the released predictor's methods use (``add_new_mask``, ``propagate_in_video``, ...).

    Without ``sam2``'s compiled extension (a CPU install) the package skips its hole filling
    of the propagated masks with a warning on every slice; there ``fill_hole_area`` is set
    to 0, which gives the same masks without the warnings.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        from importlib.util import find_spec

        super().__init__(*args, **kwargs)
        if find_spec("sam2._C") is None:
            self.fill_hole_area = 0

    def init_state(self, volume_rgb: np.ndarray, offload_video_to_cpu: bool = True,
                   offload_state_to_cpu: bool = False, **_: Any) -> dict[str, Any]:
        """Inference state for a (Z, Y, X, 3) uint8 volume (slices are the frames)."""
        from collections import OrderedDict

        import torch

        volume_rgb = np.asarray(volume_rgb)
        if volume_rgb.ndim != 4 or volume_rgb.shape[-1] != 3 or volume_rgb.dtype != np.uint8:
            raise InputError(f"Propagation needs (Z, Y, X, 3) uint8 slices; got "
                             f"{volume_rgb.shape} {volume_rgb.dtype}.")
        device = self.device
        state: dict[str, Any] = {
            "images": _Frames(volume_rgb, self.image_size),
            "num_frames": len(volume_rgb),
            "offload_video_to_cpu": offload_video_to_cpu,
            "offload_state_to_cpu": offload_state_to_cpu,
            "video_height": int(volume_rgb.shape[1]),
            "video_width": int(volume_rgb.shape[2]),
            "device": device,
            "storage_device": torch.device("cpu") if offload_state_to_cpu else device,
            "point_inputs_per_obj": {},
            "mask_inputs_per_obj": {},
            "cached_features": {},
            "constants": {},
            "obj_id_to_idx": OrderedDict(),
            "obj_idx_to_id": OrderedDict(),
            "obj_ids": [],
            "output_dict_per_obj": {},
            "temp_output_dict_per_obj": {},
            "frames_tracked_per_obj": {},
        }
        return state


def _check_inputs(volume_rgb: np.ndarray, seeds: Mapping[int, np.ndarray],
                  locked: Mapping[int, np.ndarray] | None) -> dict[int, np.ndarray]:
    volume_rgb = np.asarray(volume_rgb)
    if volume_rgb.ndim != 4 or volume_rgb.shape[-1] != 3:
        raise InputError(f"Expected (Z, Y, X, 3) slices; got shape {volume_rgb.shape}.")
    shape = volume_rgb.shape[1:3]
    conditioning: dict[int, np.ndarray] = {}
    for source in (seeds, locked or {}):
        for z, mask in source.items():
            z = int(z)
            if not 0 <= z < len(volume_rgb):
                raise InputError(f"Seed slice {z} is outside the volume "
                                 f"(0..{len(volume_rgb) - 1}).")
            mask = np.asarray(mask, dtype=bool)
            if mask.shape != shape:
                raise InputError(f"The mask of slice {z} has shape {mask.shape}; the slices "
                                 f"are {shape}.")
            conditioning[z] = mask
    if not any(m.any() for m in conditioning.values()):
        raise InputError("Nothing to propagate: every seed mask is empty. Draw or accept a "
                         "mask on at least one slice first.")
    return conditioning


def propagate_volume(bundle: Any, volume_rgb: np.ndarray, seeds: Mapping[int, np.ndarray],
                     locked: Mapping[int, np.ndarray] | None = None,
                     progress: ProgressFn | None = None, should_stop: StopFn | None = None,
                     stop_after_empty: int = 3, precision: str = "fp32",
                     session: Any = None) -> PropagationResult:
    """Propagate seed masks through a volume with a loaded SAM bundle.

    Parameters
    ----------
    bundle : SamBundle
        A ``sam2_*`` bundle (video predictor) or a SAM one (box-to-box cheap path).
    volume_rgb : np.ndarray
        (Z, Y, X, 3) uint8.
    seeds : mapping of int to np.ndarray
        Slice index -> (Y, X) bool mask to start from (empty masks are allowed as long as one
        is not).
    locked : mapping of int to np.ndarray, optional
        Slices corrected by hand: used as seeds too, and never overwritten.
    progress : callable, optional
        ``progress(stage, fraction)``, stage ``"propagating: slice n/N (z=Z)"``.
    should_stop : callable, optional
        Checked before each slice; a stop raises :class:`CancelledError` whose ``partial``
        is the :class:`PropagationResult` so far (``completed=False``).
    stop_after_empty : int
        Stop a direction after this many consecutive empty slices (0: never stop early).
    precision : {"fp32", "bf16"}
        Resolved precision of the SAM 2 forward passes.
    session : SamSession, optional
        For the SAM cheap path: a session over ``bundle`` to reuse its embedding cache.
    """
    conditioning = _check_inputs(volume_rgb, seeds, locked)
    if getattr(bundle, "family", "sam") == "sam2":
        return _propagate_sam2(bundle.model, np.asarray(volume_rgb), conditioning,
                               set(locked or {}), progress, should_stop, stop_after_empty,
                               precision)
    if session is None:
        from .sam import make_session

        session = make_session(bundle, precision=precision)
    return propagate_by_boxes(session, np.asarray(volume_rgb), conditioning, set(locked or {}),
                              progress, should_stop, stop_after_empty)


def _seeded_result(volume_rgb: np.ndarray, conditioning: Mapping[int, np.ndarray]
                   ) -> PropagationResult:
    """The result before any slice is propagated: the seed and locked masks in place."""
    mask = np.zeros(volume_rgb.shape[:3], dtype=bool)
    for z, m in conditioning.items():
        mask[z] = m
    return PropagationResult(mask, sorted(conditioning))


def _report(progress: ProgressFn | None, done: int, total: int, z: int) -> None:
    if progress is not None:
        progress(f"propagating: slice {done}/{total} (z={z})", done / max(total, 1))


def _cancelled(result: PropagationResult) -> CancelledError:
    """The error a stop raises: ``partial`` is ``result`` so far (``completed`` False,
    ``propagated`` ascending as documented)."""
    result.completed = False
    result.propagated.sort()
    exc = CancelledError("Propagation cancelled.")
    exc.partial = result
    return exc


def _propagate_sam2(model: Any, volume_rgb: np.ndarray, conditioning: dict[int, np.ndarray],
                    locked: set[int], progress: ProgressFn | None,
                    should_stop: StopFn | None, stop_after_empty: int,
                    precision: str) -> PropagationResult:
    import torch

    n = len(volume_rgb)
    result = _seeded_result(volume_rgb, conditioning)
    mask = result.mask
    first = min(conditioning)
    total = n - len(conditioning)
    done = 0
    device = str(model.device)
    with torch.inference_mode(), autocast(precision, device):
        state = model.init_state(volume_rgb)
        for z in sorted(conditioning):
            model.add_new_mask(state, frame_idx=z, obj_id=1, mask=conditioning[z])
        for direction, reverse in (("forward", False), ("backward", True)):
            empty_run = 0
            beyond = (lambda z: z > max(conditioning)) if not reverse else (
                lambda z: z < first)
            for z, _, logits in _quiet(model.propagate_in_video(
                    state, start_frame_idx=first, reverse=reverse)):
                if z in conditioning:
                    continue
                if should_stop is not None and should_stop():
                    raise _cancelled(result)
                slice_mask = (logits[0, 0] > 0.0).cpu().numpy()
                if z not in locked:
                    mask[z] = slice_mask
                    result.propagated.append(int(z))
                done += 1
                _report(progress, done, total, int(z))
                empty_run = 0 if slice_mask.any() else empty_run + 1
                if stop_after_empty and empty_run >= stop_after_empty and beyond(z):
                    last = n - 1 if not reverse else 0
                    if z != last:
                        result.stopped[direction] = int(z)
                    break
    result.propagated.sort()
    return result


def _quiet(frames):
    """``propagate_in_video``'s frames without the tqdm bar it prints to stderr (we report
    progress ourselves): the bar takes ``sys.stderr`` when it is created, during the first
    frame, so only that frame runs with stderr captured."""
    import contextlib
    import io

    with contextlib.redirect_stderr(io.StringIO()):
        first = next(frames, None)
    if first is None:
        return
    yield first
    yield from frames


def propagate_by_boxes(session: Any, volume_rgb: np.ndarray,
                       conditioning: Mapping[int, np.ndarray], locked: Iterable[int] = (),
                       progress: ProgressFn | None = None, should_stop: StopFn | None = None,
                       stop_after_empty: int = 3) -> PropagationResult:
    """The cheap path for SAM backends: each slice is prompted with the box of the previous
    slice's mask, outward from every seed, up to the next seed (or the volume's end).

    Each slice costs one SAM image encoding (cached by the session) and one decoding.
    """
    locked = set(locked)
    n = len(volume_rgb)
    result = _seeded_result(volume_rgb, conditioning)
    mask = result.mask
    order = result.seeds
    # (start seed, step, stop before) runs covering every non-seed slice once
    runs: list[tuple[int, int, int, str]] = []
    runs.append((order[0], -1, -1, "backward"))
    for a, b in zip(order, order[1:], strict=False):
        runs.append((a, 1, b, "between"))
    runs.append((order[-1], 1, n, "forward"))
    total = n - len(order)
    done = 0
    for start, step, stop, direction in runs:
        previous = mask[start]
        empty_run = 0
        for z in range(start + step, stop, step):
            if should_stop is not None and should_stop():
                raise _cancelled(result)
            box = boxes_from_labels(previous)  # (1, 4), or (0, 4) when the mask is empty
            if len(box) == 0:
                slice_mask = np.zeros(mask.shape[1:], dtype=bool)
            else:
                session.set_image(volume_rgb[z])
                slice_mask = session.predict(boxes=box)
            if z not in locked:
                mask[z] = slice_mask
                result.propagated.append(z)
            done += 1
            _report(progress, done, total, z)
            previous = mask[z]
            empty_run = 0 if slice_mask.any() else empty_run + 1
            if (stop_after_empty and empty_run >= stop_after_empty and direction != "between"
                    and z != stop - step):
                result.stopped[direction] = z
                break
    result.propagated.sort()
    return result
