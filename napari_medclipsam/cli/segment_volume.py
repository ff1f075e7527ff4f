"""``medclipsam segment --volume``: a volume segmented slice by slice, saved as it goes, or
by propagation (``--propagate``).

:func:`select_slices` picks the slices to run (``--slices``, then the body test of
:func:`napari_medclipsam.core.postprocess.body_slices` with ``--skip-empty-slices``).

:func:`segment_volume` runs them with a bar per slice (or one line per slice with its ETA when
stderr is no terminal) and writes the volume's outputs. :class:`VolumeState` holds the
finished slices and saves them in ``OUT/partial`` (throttled; always on an interrupt or
error), so ``--resume`` continues from them; the partial files are removed once the outputs
are written.

:func:`propagate_volume` runs the text chain on a few seed slices and propagates their masks
through the selected slices (:meth:`ZeroShotPipeline.propagate_volume
<napari_medclipsam.core.pipeline.ZeroShotPipeline.propagate_volume>`). Ctrl-C or SIGTERM stops
it at the next slice and keeps the partial mask in ``OUT/partial`` (record ``mode``
``propagate``); ``--resume`` redoes a stopped propagation from the start (SAM 2's memory of
the slices seen is not saved, and a continued propagation would differ from an uninterrupted
one) and keeps a finished one, as for any image.
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
from .common import stop_requests
from .run_record import Plan, Run, output_paths, partial_paths, read_json_or_none

__all__ = ["VolumeState", "propagate_volume", "remove_partial", "segment_volume",
           "select_slices"]

_SEED_STAGE = re.compile(r"^seed slice z=(\d+): (.*)$")
_PROPAGATING_STAGE = re.compile(r"^propagating: slice (\d+)/(\d+) \(z=(\d+)\)$")
#: What ``--resume`` does with a propagated volume (said in the manifest and prompts JSON).
PROPAGATION_RESUME = ("a stopped propagation is redone from the start by --resume; a "
                      "finished one is kept")


def remove_partial(out: Path, name: str) -> None:
    """Remove a volume's partial files (and OUT/partial when it is left empty)."""
    paths = partial_paths(out, name)
    for path in paths.values():
        path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # other volumes' partial files are there
        paths["record"].parent.rmdir()


def select_slices(plan: Plan, f: Path, image) -> tuple[list[int], list[int], list[int],
                                                       dict[str, Any] | None]:
    """``(planned, skipped, to_run, body)``: the slices ``--slices`` selects, those of them
    outside the body (``--skip-empty-slices``), the rest (the slices to run), and the body
    test's threshold and fraction (None without it)."""
    from ..core.postprocess import body_slices

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
    return planned, skipped, to_run, body_info


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
        self.faithfulness: dict[int, dict[str, Any]] = {}  # per slice run, when checked
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
        self.faithfulness = {int(z): v for z, v in record.get("faithfulness", {}).items()}
        self.saved_done = len(self.done)
        return True

    def add(self, z: int, one) -> None:
        self.saliency[z], self.coarse[z], self.mask[z] = one.saliency, one.coarse.mask, one.mask
        self.done.append(int(z))
        if one.found:
            self.prompts[int(z)] = one.prompts.to_dict()
            self.found.append(int(z))
        if getattr(one, "faithfulness", None) is not None:
            self.faithfulness[int(z)] = one.faithfulness.to_dict()

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
                  "faithfulness": {str(z): v for z, v in sorted(self.faithfulness.items())},
                  "updated": time.strftime("%Y-%m-%dT%H:%M:%S")}
        write_text(self.paths["record"], json.dumps(record, indent=1))
        self.saved_done = len(self.done)
        self.last_write = time.monotonic()
        self.write_seconds = self.last_write - t0

    def remove(self) -> None:
        remove_partial(self.plan.out, self.name)


def volume_faithfulness(per_slice: dict[int, dict[str, Any]], slices: list[int]
                        ) -> dict[str, Any] | None:
    """The faithfulness check over a volume's slices: the mean (its ``message`` speaks of the
    average map) and the slices flagged one by one; None when no slice was checked."""
    from ..core.faithfulness import Faithfulness, mean_faithfulness

    items = {z: Faithfulness.from_dict(per_slice[z]) for z in slices if z in per_slice}
    mean = mean_faithfulness(list(items.values()))
    if mean is None:
        return None
    return {**mean.to_dict(), "slices_checked": len(items),
            "flagged_slices": sorted(z for z, f in items.items() if not f.steers)}


def segment_volume(plan: Plan, pipeline, run: Run, f: Path, image, common: dict, *,
                   checkpoint_seconds: float, checkpoint_share: float) -> dict[str, Any]:
    """Segment the volume ``image`` (read from ``f``) slice by slice and write its outputs;
    the manifest entry's volume fields (``common`` holds the rest). Partial files are saved
    as :class:`VolumeState` says (``checkpoint_seconds``, ``checkpoint_share``)."""
    from tqdm import tqdm

    from ..core.io import auto_window, write_float_tiff, write_nifti_like, write_text

    name = common["name"]
    n_slices = image.data.shape[0]
    planned, skipped, to_run, body_info = select_slices(plan, f, image)
    window = plan.window or image.meta.get("window") or auto_window(image.data)
    record = {"image": str(f), "name": name, "shape": list(image.data.shape),
              "parameters_sha256": common["parameters_sha256"],
              "parameters": {"run": plan.run_parameters, "image": common["parameters"]["image"]},
              "models_sha256": run.models_sha256, "models": run.model_ids(),
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
    faith = volume_faithfulness(state.faithfulness, to_run)
    write_text(paths["prompts"], json.dumps(
        {"slices": {str(z): state.prompts[z] for z in found}, "found_slices": found,
         "slices_run": to_run, "skipped_slices": skipped, "body": body_info,
         "sam_model": plan.sam_model, "precision": plan.precision,
         **({"faithfulness": {**faith, "slices": {
             str(z): state.faithfulness[z] for z in sorted(state.faithfulness)
             if z in to_run}}} if faith else {})}, indent=2))
    state.remove()
    message = f"found on {len(found)} of {n_slices} slices"
    if skipped:
        message += f" ({len(skipped)} skipped outside the body)"
    if not to_run:
        message = (f"nothing segmented: all {len(planned)} selected slice(s) are outside the "
                   f"body (threshold {body_info['threshold']:g}); lower --body-threshold or "
                   "--body-fraction")
    return {"found": bool(found), "message": message,
            **({"faithfulness": faith} if faith else {}),
            "outputs": {k: str(v.relative_to(plan.out)) for k, v in paths.items()},
            "volume": {"slices_total": n_slices, "slices_selected": plan.slices_text or "all",
                       "slices_run": to_run, "skipped_slices": skipped, "body": body_info,
                       "found_slices": found, "slices_resumed": len(done_before)}}


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else \
        f"{rest // 60:02d}:{rest % 60:02d}"


# --------------------------------------------------------------------------- propagation


def _seed_slices(plan: Plan, f: Path, n_slices: int, to_run: list[int],
                 skipped: list[int]) -> list[int] | None:
    """``--seed-slices`` resolved for this volume (negative indices from the end), or None
    when the seeds are chosen by ranking."""
    given = (plan.propagate or {}).get("seed_slices")
    if given is None:
        return None
    chosen: list[int] = []
    for z in given:
        index = z + n_slices if z < 0 else z
        if not 0 <= index < n_slices:
            raise InputError(f"--seed-slices {z} is outside {f.name} ({n_slices} slices, "
                             f"0..{n_slices - 1}).")
        if index not in to_run:
            why = ("outside the body (--skip-empty-slices)" if index in skipped else
                   f"not selected by --slices {plan.slices_text}")
            raise InputError(f"--seed-slices {z}: slice {index} of {f.name} is {why}, so it "
                             "is not propagated through; choose a slice among those selected.")
        chosen.append(index)
    return list(dict.fromkeys(chosen))


def _ranking(plan: Plan) -> str:
    """What the seed slices are ranked by, in words."""
    if plan.config.method == "vlsm":
        return "the VLSM's probability (its 99th percentile)"
    return "CLIP image-text similarity"


class _Propagation:
    """What a propagation produced, in the volume's own slice indices: the sub-volume of the
    selected slices (``to_run``) is what the pipeline sees, so its indices are mapped back."""

    def __init__(self, shape: tuple[int, ...], to_run: list[int]):
        import numpy as np

        self.to_run = to_run
        self.saliency = np.zeros(shape, dtype=np.float32)
        self.coarse = np.zeros(shape, dtype=bool)
        self.mask = np.zeros(shape, dtype=bool)
        self.chain: list[int] = []  # slices the text chain ran on, in order
        self.found: list[int] = []  # of them, those where it found something
        self.prompts: dict[int, dict] = {}
        self.ranking: list[tuple[int, float]] = []
        self.seeds: list[int] = []
        self.propagated: list[int] = []
        self.stopped: dict[str, int] = {}
        self.completed = False

    def add_result(self, result) -> None:
        """The pipeline's :class:`~napari_medclipsam.core.pipeline.VolumeResult` (finished,
        or the partial one of a stop) over the sub-volume."""
        back = self.to_run
        self.saliency[back] = result.saliency
        self.coarse[back] = result.coarse
        self.chain = [back[i] for i in result.completed]
        self.found = [back[i] for i in result.found_slices]
        self.prompts = {back[i]: p.to_dict() for i, p in result.prompts.items()}
        self.ranking = [(back[i], float(s)) for i, s in result.ranking]
        # the seeds' masks (a stop before propagating), or the propagated mask (seeds in it)
        self.mask[back] = result.mask
        prop = result.propagation
        if prop is not None:
            self.seeds = [back[i] for i in prop.seeds]
            self.propagated = [back[i] for i in prop.propagated]
            self.stopped = {d: back[i] for d, i in prop.stopped.items()}
            self.completed = bool(prop.completed)

    @property
    def done(self) -> list[int]:
        """Slices whose mask is final: the seeds (or found chain slices) and the slices
        propagation wrote."""
        return sorted(set(self.seeds or self.found) | set(self.propagated))

    def summary(self, plan: Plan, family: str, size: int | None) -> dict[str, Any]:
        similarity = dict(self.ranking)
        seeds = self.seeds or self.found
        return {
            "method": ("SAM 2 video predictor" if family == "sam2" else
                       "box to box (SAM 1: the previous slice's mask box prompts the next)"),
            "sam_model": plan.sam_model, "precision": plan.precision,
            "propagate_size": size,
            "stop_after_empty": plan.config.sam.stop_after_empty,
            "seeds_from": ("--seed-slices" if (plan.propagate or {}).get("seed_slices")
                           is not None else f"ranking by {_ranking(plan)}"),
            "seeds_wanted": (plan.propagate or {}).get("seeds"),
            "seed_slices": [{"z": z, "similarity": similarity.get(z)} for z in seeds],
            "chain_slices": list(self.chain),
            "propagated_slices": list(self.propagated),
            "stopped_early": dict(self.stopped),
            "completed": self.completed,
            "resume": PROPAGATION_RESUME,
        }

    def save_partial(self, plan: Plan, name: str, image, record: dict[str, Any],
                     family: str) -> None:
        """The stopped propagation's arrays, then its record, in OUT/partial."""
        from ..core.io import write_float_tiff, write_nifti_like, write_text

        paths = partial_paths(plan.out, name)
        write_nifti_like(paths["mask"], self.mask, image)
        write_nifti_like(paths["coarse"], self.coarse, image)
        write_float_tiff(paths["saliency"], self.saliency)
        write_text(paths["record"], json.dumps(
            {**record, "done": self.done, "found_slices": sorted(self.found),
             "prompts": {str(z): p for z, p in sorted(self.prompts.items())},
             "propagation": self.summary(plan, family, None),
             "updated": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1))


def propagate_volume(plan: Plan, pipeline, run: Run, f: Path, image,
                     common: dict) -> dict[str, Any]:
    """Segment the volume ``image`` (read from ``f``) by propagation (``--propagate``) and
    write its outputs; the manifest entry's volume fields (``common`` holds the rest).

    The selected slices (:func:`select_slices`) form the volume propagated through; the
    others stay 0. Seeds: ``--seed-slices`` (the text chain runs on each, those that found
    something are the seeds), else the pipeline ranks the selected slices by CLIP's
    image-text similarity and runs the chain on the best-ranked until ``--seeds`` found
    something. A Ctrl-C or SIGTERM stops at the next slice (a second one at once), saves the
    partial mask in ``OUT/partial`` and ends the run as interrupted.
    """
    from tqdm import tqdm

    from ..core.errors import CancelledError
    from ..core.io import auto_window, write_float_tiff, write_nifti_like, write_text

    name = common["name"]
    data = image.data
    n_slices = data.shape[0]
    planned, skipped, to_run, body_info = select_slices(plan, f, image)
    seed_slices = _seed_slices(plan, f, n_slices, to_run, skipped)
    window = plan.window or image.meta.get("window") or auto_window(data)
    family = pipeline.sam.family
    redone = plan.resume and partial_paths(plan.out, name)["record"].exists()
    remove_partial(plan.out, name)  # never continued: see PROPAGATION_RESUME
    if redone:
        print(f"{f.name}: the stopped propagation is redone from the start.", file=sys.stderr)
    record = {"image": str(f), "name": name, "shape": list(data.shape), "mode": "propagate",
              "parameters_sha256": common["parameters_sha256"],
              "parameters": {"run": plan.run_parameters, "image": common["parameters"]["image"]},
              "models_sha256": run.models_sha256, "models": run.model_ids(),
              "slices_planned": planned, "skipped_slices": skipped, "body": body_info}
    state = _Propagation(data.shape, to_run)
    texts = plan.prompts[f]

    bar = tqdm(total=None, desc=f"{name} propagate", unit="slice", file=sys.stderr,
               disable=None, leave=False, position=1, mininterval=0)
    quiet = bar.disable
    clock = {"start": time.monotonic(), "propagating": False}
    seen: set[int] = set()

    def progress(stage: str, fraction: float) -> None:
        match = _PROPAGATING_STAGE.match(stage)
        if match:
            n, total, z = int(match[1]), int(match[2]), to_run[int(match[3])]
            if not clock["propagating"]:
                clock["propagating"] = True
                bar.reset(total=total)
                if not quiet:  # the bar's clock counts the first slice's time too
                    elapsed = time.monotonic() - clock["start"]
                    bar.start_t -= elapsed
                    bar.last_print_t -= elapsed
            bar.set_postfix_str(f"propagating z={z}", refresh=False)
            bar.update(n - bar.n)
            if quiet:
                eta = (time.monotonic() - clock["start"]) / max(n, 1) * (total - n)
                print(f"{f.name}: propagating: slice {n}/{total} (z={z}), ETA {_clock(eta)}",
                      file=sys.stderr)
            return
        clock["start"] = time.monotonic()  # propagation's clock starts after the last seed
        match = _SEED_STAGE.match(stage)
        if match:
            z = to_run[int(match[1])]
            bar.set_postfix_str(f"seed z={z}: {match[2]}", refresh=True)
            if quiet and z not in seen:
                seen.add(z)
                print(f"{f.name}: text chain on seed slice z={z}", file=sys.stderr)
            return
        bar.set_postfix_str(stage, refresh=True)
        if quiet and stage == "ranking slices":
            print(f"{f.name}: ranking {len(to_run)} slice(s) by {_ranking(plan)}",
                  file=sys.stderr)

    result = None
    stop = None
    try:
        with stop_requests(f"{f.name}: stopping at the end of this step, keeping what is done "
                           "(press Ctrl-C again to stop at once)...") as stop:
            if to_run:
                index = {z: i for i, z in enumerate(to_run)}
                result = pipeline.propagate_volume(
                    data[to_run], texts, window=window, n_seeds=plan.propagate["seeds"],
                    seed_slices=(None if seed_slices is None
                                 else [index[z] for z in seed_slices]),
                    progress=progress, should_stop=stop)
    except CancelledError as exc:
        partial = getattr(exc, "partial", None)
        if partial is not None:
            state.add_result(partial)
        if state.done or state.chain:
            state.save_partial(plan, name, image, record, family)
        raise (stop.interrupt() if stop is not None else KeyboardInterrupt()) from None
    except InputError:  # nothing to propagate: a result to report, not work to keep
        raise
    except BaseException:
        if state.done or state.chain:  # keep what was done, whatever stopped the run
            state.save_partial(plan, name, image, record, family)
        raise
    finally:
        bar.close()
    size = None
    if result is not None:
        state.add_result(result)
        if family == "sam2":
            size = int(pipeline.propagation_model(data.shape[1:]).model.image_size)
    info = state.summary(plan, family, size)
    paths = output_paths(plan.out, name, True)
    write_float_tiff(paths["saliency"], state.saliency)
    write_nifti_like(paths["coarse"], state.coarse, image)
    write_nifti_like(paths["mask"], state.mask, image)
    write_text(paths["prompts"], json.dumps(
        {"mode": "propagate", "slices": {str(z): state.prompts[z] for z in sorted(state.found)},
         "found_slices": sorted(state.found),
         "ranking": [{"z": z, "similarity": s} for z, s in state.ranking],
         **info, "slices_run": to_run, "skipped_slices": skipped, "body": body_info},
        indent=2))
    with_mask = int(state.mask.any(axis=(1, 2)).sum())
    if not to_run:
        message = (f"nothing segmented: all {len(planned)} selected slice(s) are outside the "
                   f"body (threshold {body_info['threshold']:g}); lower --body-threshold or "
                   "--body-fraction")
    else:
        seed_text = ", ".join(f"z={s['z']}" + (f" (similarity {s['similarity']:.3f})"
                                               if s["similarity"] is not None else "")
                              for s in info["seed_slices"])
        message = (f"propagated from seed slice(s) {seed_text} through {len(to_run)} slice(s); "
                   f"mask on {with_mask} of {n_slices} slices")
        if state.stopped:
            message += "; stopped early " + ", ".join(
                f"{d} after z={z}" for d, z in sorted(state.stopped.items()))
        if skipped:
            message += f" ({len(skipped)} skipped outside the body)"
    found = bool(state.found) and with_mask > 0
    if found:  # which seeds were chosen, and how far propagation went
        print(f"{f.name}: {message}", file=sys.stderr)
    entry = {"found": found, "message": message,
             "outputs": {k: str(v.relative_to(plan.out)) for k, v in paths.items()},
             "volume": {"slices_total": n_slices, "slices_selected": plan.slices_text or "all",
                        "slices_run": to_run, "skipped_slices": skipped, "body": body_info,
                        "found_slices": sorted(state.found), "propagation": info,
                        "redone_from_start": redone}}
    if stop is not None and stop():  # asked to stop as the last slice finished: kept, then stop
        entry["stop"] = stop.interrupt()
    return entry
