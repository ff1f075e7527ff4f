"""``medclipsam segment --volume``: a volume segmented slice by slice, saved as it goes.

:func:`segment_volume` picks the slices to run (``--slices``, then the body test of
:func:`napari_medclipsam.core.postprocess.body_slices` with ``--skip-empty-slices``), runs
them with a bar per slice (or one line per slice with its ETA when stderr is no terminal) and
writes the volume's outputs. :class:`VolumeState` holds the finished slices and saves them in
``OUT/partial`` (throttled; always on an interrupt or error), so ``--resume`` continues from
them; the partial files are removed once the outputs are written.
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

from ..core.errors import InputError
from .run_record import Plan, Run, output_paths, partial_paths, read_json_or_none

__all__ = ["VolumeState", "segment_volume"]


class VolumeState:
    """A volume's results so far (finished slices), saved as partial files and reloaded.

    The files are rewritten at most every ``every`` seconds, and writing them takes at most
    ``share`` of the run (``segment.CHECKPOINT_SECONDS`` and ``CHECKPOINT_SHARE``)."""

    def __init__(self, plan: Plan, name: str, image, record: dict[str, Any], every: float,
                 share: float):
        import numpy as np

        shape = image.data.shape
        self.plan, self.name, self.image = plan, name, image
        self.paths = partial_paths(plan.out, name)
        self.record = record
        self.saliency = np.zeros(shape, dtype=np.float32)
        self.coarse = np.zeros(shape, dtype=bool)
        self.mask = np.zeros(shape, dtype=bool)
        self.done: list[int] = []
        self.prompts: dict[int, dict] = {}
        self.found: list[int] = []
        self.saved_done = 0
        self.last_write = 0.0
        self.write_seconds = 0.0
        self.every, self.share = every, share

    def load(self, record: dict[str, Any]) -> bool:
        """Take the finished slices of an earlier run's partial files; False when they are
        missing or do not fit (then the volume starts over)."""
        import numpy as np
        import tifffile

        from ..core.io import read_image

        try:
            mask = read_image(self.paths["mask"]).data
            coarse = read_image(self.paths["coarse"]).data
            saliency = tifffile.imread(str(self.paths["saliency"]))
        except Exception:  # noqa: BLE001 - unusable partial files: start over
            return False
        if not (mask.shape == coarse.shape == saliency.shape == self.mask.shape):
            return False
        self.mask, self.coarse = mask.astype(bool), coarse.astype(bool)
        self.saliency = np.asarray(saliency, dtype=np.float32)
        self.done = [int(z) for z in record.get("done", [])]
        self.prompts = {int(z): p for z, p in record.get("prompts", {}).items()}
        self.found = [int(z) for z in record.get("found_slices", [])]
        self.saved_done = len(self.done)
        return True

    def add(self, z: int, one) -> None:
        self.saliency[z], self.coarse[z], self.mask[z] = one.saliency, one.coarse.mask, one.mask
        self.done.append(int(z))
        if one.found:
            self.prompts[int(z)] = one.prompts.to_dict()
            self.found.append(int(z))

    def due(self) -> bool:
        wait = max(self.every, self.write_seconds / self.share)
        return time.monotonic() - self.last_write >= wait

    def save(self) -> None:
        """Write the arrays, then the record naming their finished slices (so the record
        never claims a slice the arrays lack), each file atomically."""
        from ..core.io import write_float_tiff, write_nifti_like, write_text

        if len(self.done) == self.saved_done and self.paths["record"].exists():
            return
        t0 = time.monotonic()
        write_nifti_like(self.paths["mask"], self.mask, self.image)
        write_nifti_like(self.paths["coarse"], self.coarse, self.image)
        write_float_tiff(self.paths["saliency"], self.saliency)
        record = {**self.record, "done": sorted(self.done),
                  "found_slices": sorted(self.found),
                  "prompts": {str(z): p for z, p in sorted(self.prompts.items())},
                  "updated": time.strftime("%Y-%m-%dT%H:%M:%S")}
        write_text(self.paths["record"], json.dumps(record, indent=1))
        self.saved_done = len(self.done)
        self.last_write = time.monotonic()
        self.write_seconds = self.last_write - t0

    def remove(self) -> None:
        for path in self.paths.values():
            path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # other volumes' partial files are there
            self.paths["record"].parent.rmdir()


def segment_volume(plan: Plan, pipeline, run: Run, f: Path, image, common: dict, *,
                   checkpoint_seconds: float, checkpoint_share: float) -> dict[str, Any]:
    """Segment the volume ``image`` (read from ``f``) slice by slice and write its outputs;
    the manifest entry's volume fields (``common`` holds the rest). Partial files are saved
    as :class:`VolumeState` says (``checkpoint_seconds``, ``checkpoint_share``)."""
    from tqdm import tqdm

    from ..core.io import auto_window, write_float_tiff, write_nifti_like, write_text
    from ..core.postprocess import body_slices

    name = common["name"]
    n_slices = image.data.shape[0]
    planned = list(range(n_slices))
    if plan.slices is not None:
        planned = list(range(*plan.slices.indices(n_slices)))
        if not planned:
            raise InputError(f"--slices {plan.slices_text} selects no slice of {f.name} "
                             f"({n_slices} slices, 0..{n_slices - 1}).")
    skipped: list[int] = []
    body_info = None
    if plan.body is not None:
        kept, threshold, how = body_slices(image.data, plan.body["threshold"],
                                           plan.body["fraction"])
        skipped = [z for z in planned if z not in set(kept)]
        body_info = {"threshold": threshold, "threshold_from": how,
                     "fraction": plan.body["fraction"]}
    to_run = [z for z in planned if z not in set(skipped)]
    window = plan.window or image.meta.get("window") or auto_window(image.data)
    record = {"image": str(f), "name": name, "shape": list(image.data.shape),
              "parameters_sha256": common["parameters_sha256"],
              "parameters": {"run": plan.run_parameters, "image": common["parameters"]["image"]},
              "models_sha256": run.models_sha256, "models": {
                  "clip": run.models["clip"]["id"], "sam": run.models["sam"]["id"]},
              "slices_planned": planned, "skipped_slices": skipped, "body": body_info}
    state = VolumeState(plan, name, image, record, checkpoint_seconds, checkpoint_share)
    previous = read_json_or_none(state.paths["record"])
    resumed = False
    if plan.resume and isinstance(previous, dict) \
            and previous.get("parameters_sha256") == common["parameters_sha256"] \
            and previous.get("models_sha256") == run.models_sha256 \
            and previous.get("shape") == list(image.data.shape):
        resumed = state.load(previous)
    if not resumed:
        state.remove()
    done_before = set(state.done) & set(to_run)
    remaining = [z for z in to_run if z not in done_before]

    # a slice takes seconds to minutes: draw every update (tqdm's default 0.1 s throttle
    # would skip the fast ones and, with leave=False, never show the last count)
    slice_bar = tqdm(total=len(to_run), initial=len(done_before), desc=f"{name} slices",
                     unit="slice", file=sys.stderr, disable=None, leave=False, position=1,
                     mininterval=0)
    quiet = slice_bar.disable
    t_start = time.monotonic()
    stage_re = re.compile(r"^slice \d+/\d+ \(z=(\d+)\): (.*)$")

    def progress(stage: str, fraction: float) -> None:
        match = stage_re.match(stage)
        slice_bar.set_postfix_str(f"z={match[1]}: {match[2]}" if match else stage,
                                  refresh=True)

    n_start = len(state.done)

    def on_slice(z: int, one) -> None:
        state.add(z, one)
        slice_bar.update(1)
        if quiet:  # no bar (not a terminal): one line per slice, with the ETA
            n_new = len(state.done) - n_start
            left = len(to_run) - len(set(state.done) & set(to_run))
            eta = (time.monotonic() - t_start) / max(n_new, 1) * left
            print(f"{f.name}: slice {len(to_run) - left}/{len(to_run)} done (z={z}), ETA "
                  f"{_clock(eta)}", file=sys.stderr)
        if state.due():
            state.save()

    if resumed and done_before:
        print(f"{f.name}: resuming, {len(done_before)} of {len(to_run)} slice(s) already done.",
              file=sys.stderr)
    try:
        if remaining:
            state.last_write = time.monotonic()
            pipeline.segment_volume(image.data, plan.prompts[f], window=window,
                                    slices=remaining, progress=progress, on_slice=on_slice)
    except BaseException:
        if state.done:
            state.save()  # keep every finished slice, whatever stopped the run
        raise
    finally:
        slice_bar.close()
    paths = output_paths(plan.out, name, True)
    write_float_tiff(paths["saliency"], state.saliency)
    write_nifti_like(paths["coarse"], state.coarse, image)
    write_nifti_like(paths["mask"], state.mask, image)
    found = sorted(set(state.found) & set(planned))
    write_text(paths["prompts"], json.dumps(
        {"slices": {str(z): state.prompts[z] for z in found}, "found_slices": found,
         "slices_run": to_run, "skipped_slices": skipped, "body": body_info}, indent=2))
    state.remove()
    message = f"found on {len(found)} of {n_slices} slices"
    if skipped:
        message += f" ({len(skipped)} skipped outside the body)"
    if not to_run:
        message = (f"nothing segmented: all {len(planned)} selected slice(s) are outside the "
                   f"body (threshold {body_info['threshold']:g}); lower --body-threshold or "
                   "--body-fraction")
    return {"found": bool(found), "message": message,
            "outputs": {k: str(v.relative_to(plan.out)) for k, v in paths.items()},
            "volume": {"slices_total": n_slices, "slices_selected": plan.slices_text or "all",
                       "slices_run": to_run, "skipped_slices": skipped, "body": body_info,
                       "found_slices": found, "slices_resumed": len(done_before)}}


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else \
        f"{rest // 60:02d}:{rest % 60:02d}"
