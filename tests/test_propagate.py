"""3-D by propagation: SAM 2's video predictor over slices (tiny SAM 2.1), SAM's box-to-box
path (a deterministic segmenter stand-in, then the tiny SAM), and the pipeline's
text -> seed slices -> propagation."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sam2")

from tiny_sam2 import build_tiny_sam2  # noqa: E402

from napari_medclipsam.core.errors import CancelledError, InputError  # noqa: E402
from napari_medclipsam.core.models import SamBundle  # noqa: E402
from napari_medclipsam.core.propagate import (  # noqa: E402
    PropagationResult,
    propagate_by_boxes,
    propagate_volume,
)

SHAPE = (40, 48)


@pytest.fixture(scope="module")
def sam2_bundle():
    return SamBundle(build_tiny_sam2(), "sam2_t", "cpu", None, None)


def noise_volume(z: int, shape=SHAPE, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (z, *shape, 3), dtype=np.uint8)


def square(y0, y1, x0, x1, shape=SHAPE) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def dice(a, b) -> float:
    return 2 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


# --------------------------------------------------------------------------- SAM 2


def test_sam2_seeds_kept_locked_untouched_every_other_slice_written(sam2_bundle):
    volume = noise_volume(9)
    seed, locked = square(10, 25, 12, 30), square(0, 5, 0, 5)
    seen = []
    result = propagate_volume(sam2_bundle, volume, {4: seed}, locked={6: locked},
                              stop_after_empty=0, progress=lambda s, f: seen.append((s, f)))
    assert isinstance(result, PropagationResult) and result.completed
    assert result.seeds == [4, 6]
    np.testing.assert_array_equal(result.mask[4], seed)
    np.testing.assert_array_equal(result.mask[6], locked)
    # Both directions from seeds in the middle: every other slice written, none skipped.
    assert result.propagated == [0, 1, 2, 3, 5, 7, 8] and result.stopped == {}
    assert all(result.mask[z].any() for z in result.propagated)
    assert result.mask.shape == volume.shape[:3] and result.mask.dtype == bool
    # One report per propagated slice, the forward pass first, ending at 1.
    assert [s for s, _ in seen] == [f"propagating: slice {i}/7 (z={z})"
                                    for i, z in enumerate([5, 7, 8, 3, 2, 1, 0], 1)]
    fractions = [f for _, f in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


def test_sam2_a_locked_slice_is_never_overwritten(sam2_bundle):
    """Even a locked slice that is empty (the user erased the object there) stays empty."""
    volume = noise_volume(6, seed=1)
    empty = np.zeros(SHAPE, dtype=bool)
    result = propagate_volume(sam2_bundle, volume, {1: square(8, 30, 10, 40)},
                              locked={3: empty}, stop_after_empty=0)
    assert not result.mask[3].any() and 3 not in result.propagated
    assert result.seeds == [1, 3] and result.propagated == [0, 2, 4, 5]
    # A seed given for a locked slice too: the locked mask wins.
    drawn = square(0, 10, 0, 10)
    result = propagate_volume(sam2_bundle, volume, {1: square(8, 30, 10, 40), 3: drawn},
                              locked={3: empty}, stop_after_empty=0)
    assert not result.mask[3].any()


def test_sam2_cancel_keeps_the_slices_done(sam2_bundle):
    volume = noise_volume(8, seed=2)
    seeds = {3: square(5, 30, 5, 35)}
    full = propagate_volume(sam2_bundle, volume, seeds, stop_after_empty=0)
    calls = []

    def should_stop():
        calls.append(1)
        return len(calls) > 5  # forward 4, 5, 6, 7 and backward 2 are done

    with pytest.raises(CancelledError) as info:
        propagate_volume(sam2_bundle, volume, seeds, should_stop=should_stop,
                         stop_after_empty=0)
    partial = info.value.partial
    assert isinstance(partial, PropagationResult) and not partial.completed
    assert partial.propagated == [2, 4, 5, 6, 7]
    for z in (2, 3, 4, 5, 6, 7):  # the same masks as the full run
        np.testing.assert_array_equal(partial.mask[z], full.mask[z])
    assert full.mask[1].any() and not partial.mask[:2].any()  # not reached


def test_sam2_bf16_agrees_with_fp32(sam2_bundle):
    volume = noise_volume(7, seed=6)
    seeds = {3: square(5, 30, 5, 35)}
    fp32 = propagate_volume(sam2_bundle, volume, seeds, stop_after_empty=0)
    bf16 = propagate_volume(sam2_bundle, volume, seeds, stop_after_empty=0, precision="bf16")
    assert bf16.propagated == fp32.propagated == [0, 1, 2, 4, 5, 6]
    assert not np.array_equal(bf16.mask, fp32.mask)  # bf16 did run: not bit-identical
    for z in fp32.propagated:
        assert fp32.mask[z].any() and dice(bf16.mask[z], fp32.mask[z]) > 0.9, z


def _vanishing(model, absent, ran):
    """Wrap ``model.propagate_in_video`` so the object is absent (logits -10) on ``absent``
    slices, recording every slice the model yields."""
    original = model.propagate_in_video

    def frames(state, **kwargs):
        for z, ids, logits in original(state, **kwargs):
            ran.append(z)
            yield z, ids, (torch.full_like(logits, -10.0) if z in absent else logits)

    model.propagate_in_video = frames


def test_sam2_stops_after_empty_slices_beyond_the_seeds():
    bundle = SamBundle(build_tiny_sam2(), "sam2_t", "cpu", None, None)
    volume = noise_volume(10, seed=3)
    seeds = {4: square(5, 30, 5, 35)}
    ran: list[int] = []
    _vanishing(bundle.model, {1, 2, 6, 7}, ran)
    result = propagate_volume(bundle, volume, seeds, stop_after_empty=2)
    assert result.stopped == {"forward": 7, "backward": 1}
    assert result.propagated == [1, 2, 3, 5, 6, 7] and result.completed
    assert 0 not in ran and 8 not in ran and 9 not in ran  # never computed
    assert not result.mask[[0, 1, 2, 6, 7, 8, 9]].any()
    assert result.mask[3].any() and result.mask[5].any()
    # A shorter empty run does not stop a direction.
    ran.clear()
    result = propagate_volume(bundle, volume, seeds, stop_after_empty=3)
    assert result.stopped == {} and result.propagated == [0, 1, 2, 3, 5, 6, 7, 8, 9]
    assert result.mask[8].any() and result.mask[0].any()
    # Between two seeds an empty run never stops propagation.
    ran.clear()
    result = propagate_volume(bundle, volume, {3: seeds[4], 8: seeds[4]}, stop_after_empty=1)
    assert {5, 6, 7} <= set(result.propagated)
    assert result.stopped == {"backward": 2}  # slice 2 is the first empty one below


@pytest.mark.parametrize("family", ["sam2", "sam"])
def test_bad_inputs(sam2_bundle, family):
    bundle = sam2_bundle if family == "sam2" else SamBundle(None, "vit_b", "cpu", None, None)
    volume = noise_volume(5)
    good = square(5, 20, 5, 20)
    cases = [
        ((volume, {5: good}), "outside the volume"),
        ((volume, {-1: good}), "outside the volume"),
        ((volume, {1: good}, {9: good}), "outside the volume"),
        ((volume, {1: np.ones((10, 10), bool)}), r"has shape \(10, 10\)"),
        ((volume, {1: np.zeros(SHAPE, bool), 2: np.zeros(SHAPE, bool)}), "every seed mask is "
                                                                          "empty"),
        ((volume, {}), "every seed mask is empty"),
        ((volume[..., 0], {1: good}), r"\(Z, Y, X, 3\)"),
        ((volume[..., :2], {1: good}), r"\(Z, Y, X, 3\)"),
    ]
    for args, match in cases:
        with pytest.raises(InputError, match=match):
            propagate_volume(bundle, *args)
    if family == "sam2":
        with pytest.raises(InputError, match="uint8"):
            propagate_volume(bundle, volume.astype(np.float32), {1: good})


# --------------------------------------------------------------------------- SAM: boxes


def moving_disk(n=20, shape=(64, 64)):
    """(Z, Y, X) bool: a disk present on slices 3..16, moving 2 px right and 1 px down and
    shrinking by half a pixel per slice; absent at both ends."""
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    truth = np.zeros((n, *shape), dtype=bool)
    for z in range(3, n - 3):
        cy, cx, r = 20 + (z - 3), 18 + 2 * (z - 3), 12 - 0.5 * (z - 3)
        truth[z] = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    return truth


class TruthInBox:
    """A deterministic segmenter with SamSession's interface: ``predict(boxes=box)`` returns
    the true object of the current slice inside the box grown by ``grow`` pixels."""

    def __init__(self, volume_rgb, truth, grow=3):
        self.slices = {volume_rgb[z].tobytes(): z for z in range(len(volume_rgb))}
        self.truth, self.grow = truth, grow
        self.z = None
        self.encoded: list[int] = []

    def set_image(self, image):
        self.z = self.slices[np.ascontiguousarray(image).tobytes()]
        self.encoded.append(self.z)
        return str(self.z)

    def predict(self, boxes=None, **_):
        x0, y0, x1, y1 = np.asarray(boxes, dtype=float).reshape(4)
        g = self.grow
        region = np.zeros(self.truth.shape[1:], dtype=bool)
        region[max(0, int(y0) - g):int(y1) + g + 1, max(0, int(x0) - g):int(x1) + g + 1] = True
        return self.truth[self.z] & region


@pytest.fixture
def disk_case():
    truth = moving_disk()
    volume = noise_volume(len(truth), truth.shape[1:], seed=4)
    return volume, truth, TruthInBox(volume, truth)


SAM_BUNDLE = SamBundle(None, "vit_b", "cpu", None, None)  # family "sam": the box path


def test_boxes_follow_a_moving_shrinking_disk_and_stop_where_it_ends(disk_case):
    volume, truth, segmenter = disk_case
    result = propagate_volume(SAM_BUNDLE, volume, {9: truth[9]}, stop_after_empty=2,
                              session=segmenter)
    for z in range(3, 17):
        assert dice(result.mask[z], truth[z]) > 0.95, z
    assert not result.mask[:3].any() and not result.mask[17:].any()
    # Two empty slices each way, then stop: 17, 18 and 2, 1 were run; 19 and 0 were not.
    assert result.stopped == {"forward": 18, "backward": 1}
    assert result.propagated == [*range(1, 9), *range(10, 19)]
    # Each slice is encoded only when there is a box to prompt it with.
    assert sorted(segmenter.encoded) == [*range(2, 9), *range(10, 18)]


def test_boxes_stand_in_is_not_trivially_right(disk_case):
    """The stand-in only finds the disk near the box it is given: the seed's box alone
    (not following the previous slice) loses it, so the test above can fail."""
    volume, truth, segmenter = disk_case
    box = np.array([np.nonzero(truth[9])[1].min(), np.nonzero(truth[9])[0].min(),
                    np.nonzero(truth[9])[1].max(), np.nonzero(truth[9])[0].max()])
    segmenter.set_image(volume[16])
    assert dice(segmenter.predict(boxes=box), truth[16]) < 0.9


def test_boxes_without_early_stop_run_every_slice(disk_case):
    volume, truth, segmenter = disk_case
    result = propagate_volume(SAM_BUNDLE, volume, {9: truth[9]}, stop_after_empty=0,
                              session=segmenter)
    assert result.stopped == {} and result.propagated == [z for z in range(20) if z != 9]
    assert not result.mask[:3].any() and not result.mask[17:].any()


def test_boxes_never_cross_a_locked_slice(disk_case):
    volume, truth, segmenter = disk_case
    erased = np.zeros(truth.shape[1:], dtype=bool)
    result = propagate_volume(SAM_BUNDLE, volume, {9: truth[9]}, locked={12: erased},
                              stop_after_empty=0, session=segmenter)
    assert dice(result.mask[10], truth[10]) > 0.95 and dice(result.mask[11], truth[11]) > 0.95
    assert 12 not in result.propagated and not result.mask[12:].any()  # nothing past it
    # A locked slice's own mask is kept exactly and propagates onwards.
    drawn = truth[12] & (np.arange(64) < 30)[None, :]  # a corrected, smaller outline
    result = propagate_volume(SAM_BUNDLE, volume, {9: truth[9]}, locked={12: drawn},
                              stop_after_empty=0, session=segmenter)
    np.testing.assert_array_equal(result.mask[12], drawn)
    assert result.mask[13].any()


def test_boxes_fill_the_gap_between_two_seeds(disk_case):
    volume, truth, segmenter = disk_case
    result = propagate_by_boxes(segmenter, volume, {4: truth[4], 15: truth[15]},
                                stop_after_empty=2)
    assert result.seeds == [4, 15]
    for z in range(5, 15):
        assert z in result.propagated and dice(result.mask[z], truth[z]) > 0.95, z
    np.testing.assert_array_equal(result.mask[[4, 15]], truth[[4, 15]])
    assert dice(result.mask[3], truth[3]) > 0.95 and dice(result.mask[16], truth[16]) > 0.95


def test_boxes_cancel_keeps_the_slices_done(disk_case):
    volume, truth, segmenter = disk_case
    calls = []
    with pytest.raises(CancelledError) as info:
        propagate_volume(SAM_BUNDLE, volume, {9: truth[9]}, session=segmenter,
                         should_stop=lambda: calls.append(1) or len(calls) > 3)
    partial = info.value.partial
    assert not partial.completed and partial.propagated == [6, 7, 8]  # backward first
    for z in (6, 7, 8):
        assert dice(partial.mask[z], truth[z]) > 0.95
    assert not partial.mask[10:].any()


def test_tiny_sam_runs_the_box_path():
    """With a real (tiny) SAM: each propagated slice is SAM's answer to the box of the
    neighbouring slice's mask (toward the seed), and the encoder runs once per slice
    prompted."""
    from tiny_sam import build_tiny_sam

    from napari_medclipsam.core.postprocess import boxes_from_labels
    from napari_medclipsam.core.sam import SamSession

    sam = build_tiny_sam()
    calls = []
    handle = sam.image_encoder.register_forward_hook(lambda *args: calls.append(1))
    volume = noise_volume(7, (50, 80), seed=5)
    seed = square(10, 40, 15, 60, shape=(50, 80))
    try:
        result = propagate_volume(SamBundle(sam, "vit_b", "cpu", None, None), volume,
                                  {3: seed}, stop_after_empty=0)
    finally:
        handle.remove()
    assert result.propagated == [0, 1, 2, 4, 5, 6]
    np.testing.assert_array_equal(result.mask[3], seed)
    reference = SamSession(sam, "reference")
    prompted = 0
    for z in result.propagated:
        box = boxes_from_labels(result.mask[z + 1 if z < 3 else z - 1])
        if len(box) == 0:
            assert not result.mask[z].any()
            continue
        prompted += 1
        reference.set_image(volume[z])
        np.testing.assert_array_equal(result.mask[z], reference.predict(boxes=box))
    assert prompted >= 2 and len(calls) == prompted


# --------------------------------------------------------------------------- pipeline


def volume_with_objects(content=(1, 4), n=6):
    """(Z, Y, X) int16: slices in ``content`` hold a bright rectangle on noise; the others
    are blank (nothing to find on them)."""
    rng = np.random.default_rng(0)
    volume = np.zeros((n, 48, 64), np.int16)
    for z in content:
        volume[z] = (40 + 10 * rng.standard_normal((48, 64))).clip(0, 255)
        volume[z, 10:25, 20:40] = 220
    return volume


def spy_segment(pipeline, nothing_on=()):
    """Record every slice the chain runs on (``volume[z]`` matched by content); on
    ``nothing_on`` slices the chain is run with eta_c=1, so it finds nothing there."""
    from napari_medclipsam.core.config import CoarseMaskConfig

    original = pipeline.segment
    runs = []

    def segment(image, text, **kwargs):
        runs.append(image)
        if any(np.array_equal(image, other) for other in nothing_on):
            saved = pipeline.config
            pipeline.config = dataclasses.replace(saved, coarse=CoarseMaskConfig(eta_c=1.0))
            try:
                return original(image, text, **kwargs)
            finally:
                pipeline.config = saved
        return original(image, text, **kwargs)

    pipeline.segment = segment
    return runs


def test_text_chooses_the_best_ranked_slice_that_found_something(tiny_sam2_pipeline):
    pipeline = tiny_sam2_pipeline
    volume = volume_with_objects()
    stages = []
    result = pipeline.propagate_volume(volume, "a disk",
                                       progress=lambda s, f: stages.append((s, f)))
    ranked = [z for z, _ in result.ranking]
    assert sorted(ranked) == list(range(6))
    sims = [s for _, s in result.ranking]
    assert sims == sorted(sims, reverse=True)
    # The chain ran on the best-ranked slices in order until one found something.
    assert result.completed == ranked[:len(result.completed)]
    assert result.found_slices == [result.completed[-1]] and result.found_slices[0] in (1, 4)
    seed = result.found_slices[0]
    assert result.mask[seed].any() and result.propagation.seeds == [seed]
    np.testing.assert_array_equal(result.mask[seed], result.propagation.mask[seed])
    assert result.propagation.propagated == [z for z in range(6) if z != seed]
    assert result.saliency[seed].any() and set(result.prompts) == {seed}
    names = [s for s, _ in stages]
    assert names[0] == "ranking slices" and names[-1] == "done"
    assert f"seed slice z={seed}: done" in names
    assert any(s.startswith("propagating: slice") for s in names)
    fractions = [f for _, f in stages]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


def test_a_best_ranked_slice_with_nothing_found_is_skipped(tiny_sam2_pipeline):
    from napari_medclipsam.core.io import auto_window, to_rgb_uint8

    pipeline = tiny_sam2_pipeline
    volume = volume_with_objects()
    window = auto_window(volume)  # as propagate_volume windows the slices
    ranked = [z for z, _ in pipeline.rank_slices(
        np.stack([to_rgb_uint8(v, window) for v in volume]), "a disk")]
    best = ranked[0]
    assert best in (1, 4)  # the slices with something in them rank first
    spy_segment(pipeline, nothing_on=[volume[best]])
    result = pipeline.propagate_volume(volume, "a disk")
    assert result.completed[0] == best and best not in result.found_slices
    assert result.found_slices == [result.completed[-1]] != [best]


def test_two_seeds_and_candidates(tiny_sam2_pipeline):
    pipeline = tiny_sam2_pipeline
    volume = volume_with_objects()
    result = pipeline.propagate_volume(volume, "a disk", n_seeds=2)
    assert sorted(result.found_slices) == [1, 4] == result.propagation.seeds
    assert all(result.mask[z].any() for z in (1, 4))
    # Candidates restrict the ranking (e.g. to the body slices).
    result = pipeline.propagate_volume(volume, "a disk", candidates=[3, 4, 5])
    assert sorted(z for z, _ in result.ranking) == [3, 4, 5]
    assert result.found_slices == [4]


def test_given_seeds_need_no_text_and_no_ranking(tiny_sam2_pipeline, monkeypatch):
    pipeline = tiny_sam2_pipeline

    def forbidden(*args, **kwargs):
        raise AssertionError("CLIP ran although seeds were given")

    monkeypatch.setattr(pipeline, "rank_slices", forbidden)
    monkeypatch.setattr(pipeline, "saliency", forbidden)
    volume = volume_with_objects()
    seed = np.zeros((48, 64), bool)
    seed[10:25, 20:40] = True
    result = pipeline.propagate_volume(volume, "a disk", seeds={4: seed})
    assert result.ranking == [] and result.found_slices == [] and result.completed == []
    np.testing.assert_array_equal(result.mask[4], seed)
    assert result.propagation.seeds == [4]
    # Locked slices alone are seeds too.
    result = pipeline.propagate_volume(volume, locked={1: seed})
    np.testing.assert_array_equal(result.mask[1], seed)
    assert 1 not in result.propagation.propagated


def test_nothing_found_anywhere_or_no_text(tiny_sam2_pipeline):
    from napari_medclipsam.core.config import CoarseMaskConfig

    pipeline = tiny_sam2_pipeline
    volume = volume_with_objects()
    with pytest.raises(InputError, match="a mask on at least one slice, or a text"):
        pipeline.propagate_volume(volume)
    with pytest.raises(InputError, match="a mask on at least one slice, or a text"):
        pipeline.propagate_volume(volume, ["  ", ""])
    with pytest.raises(InputError, match=r"\(Z, Y, X\)"):
        pipeline.propagate_volume(volume[0], "a disk")
    with pytest.raises(InputError, match=r"Candidate slice indices out of range 0..5: \[6, -1\]"):
        pipeline.propagate_volume(volume, "a disk", candidates=[2, 6, -1])
    pipeline.config = dataclasses.replace(pipeline.config, coarse=CoarseMaskConfig(eta_c=1.0))
    with pytest.raises(InputError, match=r"Nothing found on the 6 best-ranked slice") as info:
        pipeline.propagate_volume(volume, "a disk")
    assert "\n" not in str(info.value)


def test_text_seed_search_tries_at_most_max_seed_tries_slices(tiny_sam2_pipeline, monkeypatch):
    """Nothing found anywhere costs a few chain runs, not one per slice."""
    from napari_medclipsam.core import pipeline as pipeline_module
    from napari_medclipsam.core.config import CoarseMaskConfig

    pipeline = tiny_sam2_pipeline
    pipeline.config = dataclasses.replace(pipeline.config, coarse=CoarseMaskConfig(eta_c=1.0))
    monkeypatch.setattr(pipeline_module, "MAX_SEED_TRIES", 2)
    tried = []
    original = type(pipeline).segment
    monkeypatch.setattr(type(pipeline), "segment",
                        lambda self, image, *a, **k: tried.append(1) or original(
                            self, image, *a, **k))
    with pytest.raises(InputError, match=r"Nothing found on the 2 best-ranked slice"):
        pipeline.propagate_volume(volume_with_objects(), "a disk")
    assert len(tried) == 2


def test_cancel_during_propagation_returns_a_partial_volume(tiny_sam2_pipeline):
    pipeline = tiny_sam2_pipeline
    volume = volume_with_objects()
    seed = np.zeros((48, 64), bool)
    seed[10:25, 20:40] = True
    calls = []
    with pytest.raises(CancelledError) as info:
        pipeline.propagate_volume(volume, seeds={2: seed},
                                  should_stop=lambda: calls.append(1) or len(calls) > 2)
    partial = info.value.partial
    assert partial.mask.shape == volume.shape
    assert not partial.propagation.completed and partial.propagation.propagated == [3, 4]
    np.testing.assert_array_equal(partial.mask[2], seed)
    assert not partial.mask[[0, 1, 5]].any()


def test_cancel_while_finding_seeds_returns_a_partial_volume(tiny_sam2_pipeline):
    pipeline = tiny_sam2_pipeline
    volume = volume_with_objects(content=(1,))
    stop = []
    with pytest.raises(CancelledError) as info:
        pipeline.propagate_volume(
            volume, "a disk", progress=lambda s, f: stop.append(s.startswith("seed slice")),
            should_stop=lambda: any(stop))
    partial = info.value.partial
    assert partial.propagation is None and len(partial.ranking) == 6
    assert partial.found_slices == [] and not partial.mask.any()
    # Cancelled once the best-ranked slice is done: its mask is kept, nothing propagated.
    volume = volume_with_objects()
    done = []
    with pytest.raises(CancelledError) as info:
        pipeline.propagate_volume(
            volume, "a disk", n_seeds=2,
            progress=lambda s, f: done.append(s.startswith("seed slice") and s.endswith("done")),
            should_stop=lambda: any(done))
    partial = info.value.partial
    assert partial.propagation is None and len(partial.completed) == 1
    best = partial.ranking[0][0]
    assert partial.completed == partial.found_slices == [best] and best in (1, 4)
    assert partial.mask[best].any() and partial.mask.sum() == partial.mask[best].sum()


def test_propagation_reuses_the_tiny_model_on_cpu(tiny_sam2_pipeline, monkeypatch):
    from napari_medclipsam.core import models

    pipeline = tiny_sam2_pipeline
    assert int(pipeline.sam.model.image_size) == 256 and pipeline.device == "cpu"

    def no_second_load(*args, **kwargs):
        raise AssertionError("a second SAM model was loaded")

    for name in ("load_sam", "build_sam2_model", "sam2_at_size"):
        monkeypatch.setattr(models, name, no_second_load, raising=False)
    assert pipeline.propagation_model((48, 64)) is pipeline.sam
    assert pipeline.propagation_model((600, 700)) is pipeline.sam  # large slices: own size
    seed = np.zeros((48, 64), bool)
    seed[10:25, 20:40] = True
    result = pipeline.propagate_volume(volume_with_objects(), seeds={1: seed})
    assert result.propagation.completed


def test_propagate_size_loads_the_same_weights_at_another_size(tiny_sam2_pipeline,
                                                               monkeypatch):
    """propagate_size 512: the same checkpoint at 512x512 input, loaded once."""
    from tiny_sam2 import TINY_SAM2_OVERRIDES

    from napari_medclipsam.core import models
    from napari_medclipsam.core.config import SamConfig

    real = models.build_sam2_model
    monkeypatch.setattr(models, "build_sam2_model", lambda name, overrides=(): real(
        name, (*TINY_SAM2_OVERRIDES, *overrides)))  # the tiny architecture, any size
    pipeline = tiny_sam2_pipeline
    pipeline.config = dataclasses.replace(pipeline.config, sam=SamConfig(propagate_size=512))
    bundle = pipeline.propagation_model((48, 64))
    assert bundle is not pipeline.sam and int(bundle.model.image_size) == 512
    assert pipeline.propagation_model((48, 64)) is bundle
    own = pipeline.sam.model.state_dict()
    for key, value in bundle.model.state_dict().items():
        assert torch.equal(value, own[key]), key


def test_seed_slices_run_the_chain_there_only(tiny_sam2_pipeline, monkeypatch):
    """``seed_slices``: the chain runs on exactly those slices, in order, with no ranking;
    each whose SAM mask is not empty is a seed; none found is one clear error."""
    from napari_medclipsam.core.config import CoarseMaskConfig

    pipeline = tiny_sam2_pipeline

    def forbidden(*args, **kwargs):
        raise AssertionError("slices were ranked although seed slices were given")

    monkeypatch.setattr(pipeline, "rank_slices", forbidden)
    volume = volume_with_objects()
    result = pipeline.propagate_volume(volume, "a disk", seed_slices=[4, 1],
                                       n_seeds=1)
    assert result.ranking == [] and result.completed == [4, 1]
    found = [z for z in (4, 1) if result.mask[z].any()]
    assert result.found_slices == found and result.propagation.seeds == sorted(found)
    assert found  # the bright rectangle is found on at least one of them
    with pytest.raises(InputError, match=r"Seed slice indices out of range 0..5: \[6\]"):
        pipeline.propagate_volume(volume, "a disk", seed_slices=[6])
    pipeline.config = dataclasses.replace(pipeline.config, coarse=CoarseMaskConfig(eta_c=1.0))
    with pytest.raises(InputError, match=r"Nothing found on the 2 given seed slice\(s\)"):
        pipeline.propagate_volume(volume, "a disk", seed_slices=[4, 1])
