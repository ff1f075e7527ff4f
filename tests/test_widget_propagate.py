"""Propagate through volume (issue 12): the dock opened from napari's Plugins menu on the tiny
SAM 2.1 (random weights, built by the ``sam2`` package's own builders), and its Qt-free
bookkeeping (which slices are seeds, which were corrected by hand and stay locked).

The GUI tests need a display with OpenGL (``xvfb-run -a``); the controller tests do not.
"""

from __future__ import annotations

import importlib.util
import json
import re
import time

import numpy as np
import pytest

from napari_medclipsam._widgets.segment_controller import (
    FREE,
    LOCKED,
    SEED,
    ProgressTracker,
    SegmentController,
    SliceBook,
    auto_choice,
    describe_settings,
    slice_list,
)
from napari_medclipsam.core.config import PipelineConfig
from napari_medclipsam.core.errors import CancelledError, InputError

needs_qt = pytest.mark.skipif(importlib.util.find_spec("qtpy") is None,
                              reason="needs Qt (qtpy)")


@pytest.fixture(autouse=True)
def settings_dir(tmp_path, monkeypatch):
    """Widget settings go to a temporary folder, never to the user's config folder."""
    folder = tmp_path / "settings"
    monkeypatch.setenv("MEDCLIPSAM_CONFIG_DIR", str(folder))
    return folder


def _volume(depth=8, h=48, w=64, seed=0):
    """A noisy (Z, Y, X) uint8 stack with a bright block through every slice."""
    rng = np.random.default_rng(seed)
    vol = (40 + 10 * rng.standard_normal((depth, h, w))).clip(0, 255).astype(np.uint8)
    vol[:, 10:25, 20:40] = 220
    return vol


def _holding(label_map, value=1):
    data = np.asarray(label_map)
    return [z for z in range(data.shape[0]) if (data[z] == value).any()]


# --------------------------------------------------------------------------- controller
def test_book_tells_seeds_hand_corrections_and_the_tools_own_output():
    book = SliceBook()
    label_map = np.zeros((6, 8, 8), np.int32)
    label_map[0, 1:3, 1:3] = 1  # painted by hand, never written by the tool: a seed
    label_map[5, 6:8, 6:8] = 2  # another target's
    empty = np.zeros((8, 8), bool)
    written = np.zeros((8, 8), bool)
    written[2:6, 2:6] = True
    propagation = book.new_write()
    for z in (1, 2, 3, 4):  # one propagation wrote these
        book.note(1, z, "propagated", empty, written, propagation)
        label_map[z][written] = 1
    book.note(1, 1, SEED, written, written)  # ... then z=1 was accepted as it was
    assert book.classify(1, label_map) == {0: SEED, 1: SEED, 2: FREE, 3: FREE, 4: FREE}

    label_map[2, 6, 6] = 1  # painted one voxel more
    label_map[3][written] = 0  # erased: back to what was there before, still by hand
    assert book.classify(1, label_map) == {0: SEED, 1: SEED, 2: LOCKED, 3: LOCKED, 4: FREE}
    assert book.classify(2, label_map) == {5: SEED}

    later = book.new_write()  # a second propagation changes z=4 and z=5 ...
    more = written.copy()
    more[0, 0] = True
    book.note(1, 4, "propagated", written, more, later)
    book.note(1, 5, "propagated", empty, written, later)
    label_map[4][more] = 1
    label_map[5][written & (label_map[5] == 0)] = 1
    assert book.classify(1, label_map)[5] == FREE
    label_map[4][~written] = 0  # ... and napari's undo takes all of it back
    label_map[5][label_map[5] == 1] = 0
    kinds = book.classify(1, label_map)
    assert kinds == {0: SEED, 1: SEED, 2: LOCKED, 3: LOCKED, 4: FREE}
    assert book.last(1, 5) is None and book.last(1, 4).write == propagation
    with pytest.raises(ValueError, match="origin"):
        book.note(1, 0, "guessed", written, written)


def test_plan_takes_the_run_slice_and_the_label_map(tiny_sam2_pipeline):
    ctl = SegmentController(tiny_sam2_pipeline)
    vol = _volume()
    label_map = np.zeros(vol.shape, np.int32)
    with pytest.raises(InputError, match="Type a prompt"):
        ctl.plan_propagation(label_map)
    with pytest.raises(InputError, match="3-D"):
        ctl.plan_propagation(label_map[0], ["a disk"])
    plan = ctl.plan_propagation(label_map, ["a disk"], source="vol")
    assert plan.by_text and not plan.seeds and not plan.locked
    assert ctl.state.targets == []  # a plan does not use up a label value

    run = ctl.run_all(vol[3], ["a disk"], source="vol", slice_index=3)
    painted = np.zeros(vol.shape[1:], bool)
    painted[12:20, 22:30] = True
    plan = ctl.plan_propagation(label_map, ["a disk"], source="vol", run_mask=painted)
    assert list(plan.seeds) == [3] and (plan.seeds[3] == painted).all()  # as the user left it
    plan = ctl.plan_propagation(label_map, [], source="vol")  # no prompt: the run's target
    assert plan.target == run.target and list(plan.seeds) == ([3] if run.mask.any() else [])
    other = ctl.plan_propagation(label_map, ["a disk"], source="another image",
                                 run_mask=painted)
    assert other.by_text  # the run belongs to another image


def test_propagate_then_a_correction_is_locked_and_kept(tiny_sam2_pipeline):
    ctl = SegmentController(tiny_sam2_pipeline)
    vol = _volume()
    label_map = np.zeros(vol.shape, np.int32)
    seed = np.zeros(vol.shape[1:], bool)
    seed[10:25, 20:40] = True
    ctl.run_all(vol[3], ["a disk"], source="vol", slice_index=3)
    plan = ctl.plan_propagation(label_map, ["a disk"], source="vol", run_mask=seed)
    tracker = ProgressTracker()
    stages = []
    done = ctl.propagate(vol, plan, progress=lambda s, f: stages.append(tracker.update(s, f)))
    assert done.completed and done.seed_slices == [3] and done.total == 7
    assert 3 not in done.propagated and done.propagated
    propagated = [u for u in stages if u.stage.startswith("propagating")]
    assert [u.slice_number for u in propagated] == list(range(1, len(done.propagated) + 1))
    assert {u.slice_count for u in propagated} == {7}
    index, values, skipped = ctl.write_propagation(label_map, done)
    label_map[index] = values
    assert skipped == [] and (label_map[3] == 1).sum() == seed.sum()
    assert (label_map[3] == 1)[seed].all()
    assert _holding(label_map) == sorted({3, *(z for z in done.propagated
                                               if done.mask[z].any())})
    assert len(_holding(label_map)) > 1
    assert ctl.state.targets[0].name == "a disk"  # registered once written
    first = label_map.copy()

    label_map[6] = 0  # the user corrects slice 6 by hand
    label_map[6, 30:40, 5:15] = 1
    corrected = label_map[6].copy()
    plan = ctl.plan_propagation(label_map, ["a disk"], source="vol", run_mask=seed)
    assert list(plan.seeds) == [3] and list(plan.locked) == [6]
    assert sorted(plan.free) == [z for z in _holding(first) if z not in (3, 6)]
    done = ctl.propagate(vol, plan)
    assert 6 not in done.propagated and (done.mask[6] == (corrected == 1)).all()
    index, values, _ = ctl.write_propagation(label_map, done)
    label_map[index] = values
    assert (label_map[6] == corrected).all() and (label_map[3] == first[3]).all()
    assert any((label_map[z] != first[z]).any() for z in done.propagated)  # re-propagated
    assert "1 locked (z=6, corrected by hand, kept)" in done.summary()
    assert ctl.state.book.classify(1, label_map)[6] == LOCKED  # stays locked

    # a slice painted while propagation ran is not overwritten
    plan = ctl.plan_propagation(label_map, ["a disk"], source="vol", run_mask=seed)
    done = ctl.propagate(vol, plan)
    label_map[1, 0:3, 0:3] = 1
    during = label_map[1].copy()
    index, values, skipped = ctl.write_propagation(label_map, done)
    label_map[index] = values
    assert skipped == [1] and (label_map[1] == during).all()
    assert "Not overwritten: z=1 (edited while it ran)" in done.summary(len(values), skipped)


def test_text_chooses_the_seed_and_cancel_keeps_the_slices_done(tiny_sam2_pipeline):
    ctl = SegmentController(tiny_sam2_pipeline)
    vol = _volume(depth=10)
    label_map = np.zeros(vol.shape, np.int32)
    plan = ctl.plan_propagation(label_map, ["a disk"], source="vol")
    reference = ctl.propagate(vol, plan)
    assert len(reference.text_seeds) == 1 and reference.ranked == 10
    assert f"seed slice (z={reference.text_seeds[0]}, found by the text: CLIP ranked 10 " \
        "slices" in reference.summary()

    stop = []

    def progress(stage, fraction):  # Cancel pressed once the third slice is done
        if stage.startswith("propagating: slice 3/"):
            stop.append(True)

    with pytest.raises(CancelledError) as info:
        ctl.propagate(vol, plan, progress=progress, should_stop=lambda: bool(stop))
    partial = info.value.partial
    assert partial is not None and not partial.completed
    assert len(partial.propagated) == 3 and partial.text_seeds == reference.text_seeds
    assert str(info.value).startswith("Cancelled after 3 of 9 slices; the slices propagated "
                                      "so far are kept")
    index, values, _ = ctl.write_propagation(label_map, partial)
    label_map[index] = values
    kept = set(partial.propagated) | set(partial.text_seeds)
    for z in range(len(vol)):
        expected = partial.mask[z] if z in kept else np.zeros(vol.shape[1:], bool)
        assert ((label_map[z] == 1) == expected).all(), z


def test_propagation_progress_counts_slices_with_an_eta():
    now = [0.0]
    tracker = ProgressTracker(clock=lambda: now[0])
    tracker.update("ranking slices", 0.0)
    now[0] = 50.0
    first = tracker.update("propagating: slice 1/5 (z=4)", 0.2)
    assert (first.slice_number, first.slice_count, first.slices_done) == (1, 5, 1)
    assert first.eta_s is None
    now[0] = 52.0
    second = tracker.update("propagating: slice 2/5 (z=5)", 0.4)
    assert second.eta_s == pytest.approx(6.0)  # 2 s per slice, 3 left
    assert second.text == "propagating: slice 2/5 (z=5) · 2 of 5 slices done · about 6 s left"


def test_summary_says_where_propagation_stopped_early():
    from napari_medclipsam._widgets.segment_controller import (
        Propagation,
        PropagationPlan,
        Target,
    )

    seed = np.ones((4, 4), bool)
    plan = PropagationPlan(Target("liver", 2, ("liver",)), "ct", {5: seed, 6: seed},
                           {8: seed}, [], {}, (12, 4, 4))
    done = Propagation(plan, np.zeros((12, 4, 4), bool), propagated=[2, 3, 4, 7, 9, 10],
                       stopped={"backward": 2, "forward": 10}, seconds=3.0)
    assert done.total == 9
    assert done.summary(40) == (
        "Propagated 'liver' in 3.0 s: 2 seed slices (z=5-6), 1 locked (z=8, corrected by "
        "hand, kept), 6 propagated. Stopped early going backward at z=2 and going forward at "
        "z=10 (the mask had vanished; the slices beyond stay empty). 40 voxel(s) changed in "
        "'label map'; Ctrl+Z there undoes it.")


def test_settings_line_shows_what_auto_resolves_to():
    from napari_medclipsam.core.models import default_sam_model

    config = PipelineConfig(device="cpu")
    assert " · SAM sam2_t (auto) · " in describe_settings(config, auto_sam="sam2_t")
    assert f" · SAM {default_sam_model('cpu')} (auto) · " in describe_settings(config)
    assert " · SAM auto · " in describe_settings(config, auto_sam="")  # not known yet
    assert " · SAM sam2_b+ · " in describe_settings(PipelineConfig(sam_model="sam2_b+"))
    choice = auto_choice("cpu")
    assert choice.sam_label == "auto: sam2_t on this CPU" and choice.available
    assert choice.precision in ("bf16", "fp32")
    assert slice_list([7, 2, 3, 4, 9]) == "z=2-4, 7, 9" and slice_list([]) == "none"


def test_auto_on_a_gpu_that_is_not_here():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    choice = auto_choice("cuda")
    assert not choice.available and choice.sam_model == "vit_h"
    assert choice.sam_label == "auto: vit_h on a GPU (not found here)"


# --------------------------------------------------------------------------- the dock
def _dock(viewer, pipeline=None):
    """Plugins > Text-prompt segmentation, then (tests only) the tiny models."""
    from napari_helpers import SEGMENT, dock

    w = dock(viewer, SEGMENT)
    if pipeline is not None:
        w.set_pipeline(pipeline)
    return w


def _wait(w, qtbot):
    qtbot.waitUntil(lambda: not w.running, timeout=120_000)


def _click(w, qtbot, button):
    button.click()
    _wait(w, qtbot)


@needs_qt
def test_run_one_slice_then_propagate_then_correct(make_napari_viewer, tiny_sam2_pipeline,
                                                   qtbot):
    viewer = make_napari_viewer()
    vol = _volume()
    viewer.add_image(vol, name="vol", scale=(3.0, 1.0, 1.0))
    viewer.dims.set_point(0, 9.0)  # slice 3
    w = _dock(viewer, tiny_sam2_pipeline)
    assert w.propagate_button.isEnabled()
    w.prompt_edit.setPlainText("a disk")
    _click(w, qtbot, w.run_button)
    assert w.controller.state.run.slice_index == 3, w.last_status
    seed = np.asarray(viewer.layers["SAM mask [a disk]"].data) > 0
    assert seed.any(), "the tiny SAM 2.1 found nothing on the slice"

    _click(w, qtbot, w.propagate_button)
    assert "label map" in viewer.layers, w.last_status
    labels = viewer.layers["label map"]
    np.testing.assert_allclose(labels.scale, (3.0, 1.0, 1.0))
    first = np.asarray(labels.data).copy()
    assert ((first[3] == 1) == seed).all()  # the seed slice as the run left it
    assert len(_holding(first)) > 1, w.last_status
    assert w.last_status.startswith("Propagated 'a disk' in "), w.last_status
    assert "1 seed slice (z=3), 0 locked, 7 propagated" in w.last_status
    assert "Ctrl+Z" in w.last_status and w.progress_bar.value() == 100
    propagating = [u for u in w.progress_log if u.stage.startswith("propagating")]
    assert [u.slice_number for u in propagating] == list(range(1, 8))
    assert all(u.slice_count == 7 for u in propagating)
    assert any(u.eta_s is not None for u in propagating)
    names = dict(zip(labels.features["index"], labels.features["name"], strict=True))
    assert names == {0: "background", 1: "a disk"}

    labels.undo()  # one napari undo takes the whole propagation back
    assert not np.asarray(labels.data).any()
    labels.redo()
    assert (np.asarray(labels.data) == first).all()

    # the user corrects slice 6 with napari's brush and eraser, then propagates again
    viewer.dims.set_point(0, 18.0)
    labels.brush_size = 7
    labels.paint((6, 38, 10), 1)
    labels.paint((6, 17, 30), 0)
    corrected = np.asarray(labels.data)[6].copy()
    assert (corrected != first[6]).any()
    _click(w, qtbot, w.propagate_button)
    second = np.asarray(labels.data)
    assert (second[6] == corrected).all(), "a corrected slice was overwritten"
    assert (second[3] == first[3]).all()
    assert any((second[z] != first[z]).any() for z in (0, 1, 2, 4, 5, 7)), "nothing updated"
    assert "1 seed slice (z=3), 1 locked (z=6, corrected by hand, kept), 6 propagated" \
        in w.last_status


@needs_qt
def test_cancel_keeps_the_slices_done(make_napari_viewer, tiny_sam2_pipeline, qtbot):
    """No mask anywhere: the prompt finds the seed slice. A slow model (each slice takes
    0.15 s) and Cancel clicked at the second slice: the slices done are in the label map,
    the rest untouched, and the dock and viewer go on working."""
    from qtpy.QtCore import Qt

    viewer = make_napari_viewer()
    vol = _volume(depth=24)
    viewer.add_image(vol, name="vol")
    w = _dock(viewer, tiny_sam2_pipeline)
    w.prompt_edit.setPlainText("a disk")

    def slow(stage, fraction):  # runs in the worker thread, like a slower model
        if stage.startswith("propagating"):
            time.sleep(0.15)

    def cancel_at_second(stage, fraction):  # the user, in the GUI thread
        if stage.startswith("propagating: slice 2/"):
            w.cancel_button.click()

    w._progress_signal.connect(slow, Qt.DirectConnection)
    w._progress_signal.connect(cancel_at_second)
    _click(w, qtbot, w.propagate_button)
    match = re.match(r"Cancelled after (\d+) of 23 slices; the slices propagated so far are "
                     r"kept: 1 seed slice \(z=(\d+), found by the text", w.last_status)
    assert match, w.last_status
    done, seed = int(match.group(1)), int(match.group(2))
    assert 2 <= done < 23 and w.progress_bar.format() == "cancelled"
    partial = w.controller.state.propagation
    assert not partial.completed and len(partial.propagated) == done
    data = np.asarray(viewer.layers["label map"].data)
    for z in range(len(vol)):
        kept = z == seed or z in partial.propagated
        expected = partial.mask[z] if kept else np.zeros(vol.shape[1:], bool)
        assert ((data[z] == 1) == expected).all(), z
    assert not w.running and w.run_button.isEnabled() and w.propagate_button.isEnabled()

    w._progress_signal.disconnect(cancel_at_second)
    _click(w, qtbot, w.propagate_button)  # still alive: the next propagation finishes
    assert w.last_status.startswith("Propagated 'a disk'"), w.last_status
    assert f"seed slice (z={seed})" in w.last_status


@needs_qt
def test_the_button_is_for_3d_images(make_napari_viewer, tiny_sam2_pipeline, qtbot):
    viewer = make_napari_viewer()
    viewer.add_image(_volume()[0], name="flat")
    w = _dock(viewer, tiny_sam2_pipeline)
    assert w.image_combo.currentText() == "flat"
    assert not w.propagate_button.isEnabled()
    assert "2-D" in w.propagate_button.toolTip()
    viewer.add_image(_volume(depth=4), name="vol")
    w.image_combo.setCurrentText("vol")
    assert w.propagate_button.isEnabled()
    w.image_combo.setCurrentText("flat")
    assert not w.propagate_button.isEnabled()
    w.propagate()  # called anyway: one clear line, nothing else
    assert "needs a 3-D image" in w.last_status and not w.running
    assert "label map" not in viewer.layers


@needs_qt
def test_models_section_offers_every_sam_model_and_precision(make_napari_viewer, qtbot,
                                                            tmp_path):
    from napari_medclipsam.core.models import SAM_MODELS, default_sam_model
    from napari_medclipsam.core.precision import resolve_precision

    viewer = make_napari_viewer()
    viewer.add_image(_volume(depth=4), name="vol")
    w = _dock(viewer)
    w.device_combo.setCurrentText("cpu")
    values = [w.sam_combo.itemData(i) for i in range(w.sam_combo.count())]
    assert values == list(SAM_MODELS) and values[0] == "auto"
    assert w.sam_combo.currentData() == "auto"  # the default
    sam, precision = default_sam_model("cpu"), resolve_precision("auto", "cpu")
    assert w.sam_combo.itemText(0) == f"auto ({sam})"
    assert "auto chooses by device" in w.sam_combo.toolTip()
    assert f"Here: auto: {sam} on this CPU." in w.sam_combo.toolTip()
    precisions = [w.precision_combo.itemData(i) for i in range(w.precision_combo.count())]
    assert precisions == ["auto", "bf16", "fp32"]
    assert w.precision_combo.itemText(0) == f"auto ({precision})"
    assert w.auto_label.text() == f"auto: {sam} on this CPU (vit_h on a GPU), {precision}"
    assert f"SAM {default_sam_model('cpu')} (auto)" in w.settings_label.text()

    w.sam_combo.setCurrentIndex(w.sam_combo.findData("sam2_b+"))
    w.precision_combo.setCurrentIndex(w.precision_combo.findData("fp32"))
    assert "SAM sam2_b+ · " in w.settings_label.text()
    assert w.run_state()["config"]["sam_model"] == "sam2_b+"
    assert w.run_state()["config"]["precision"] == "fp32"
    w.save_settings()  # what a successful run does
    fresh = _dock(make_napari_viewer())
    assert fresh.sam_combo.currentData() == "sam2_b+"
    assert fresh.precision_combo.currentData() == "fp32"

    # a saved run / a `medclipsam segment` manifest's config (what --config reads)
    manifest = tmp_path / "manifest.json"
    config = PipelineConfig(sam_model="sam2_s", precision="bf16").to_dict()
    manifest.write_text(json.dumps({"config": config}))
    fresh.load_run(manifest)
    assert fresh.sam_combo.currentData() == "sam2_s"
    assert fresh.precision_combo.currentData() == "bf16"
