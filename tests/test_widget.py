"""The "Text-prompt segmentation" dock widget driven in a real napari viewer on tiny models.

Needs a display with OpenGL: pytest-xvfb starts Xvfb (apt: xvfb, libgl1-mesa-dri, ...).
"""

import json

import numpy as np
import pytest

pytest.importorskip("qtpy.QtWidgets", exc_type=ImportError)

from napari_helpers import SEGMENT, dock  # noqa: E402

SCALE, TRANSLATE = (2.0, 3.0), (5.0, 7.0)


@pytest.fixture(autouse=True)
def settings_dir(tmp_path, monkeypatch):
    """Widget settings go to a temporary folder, never to the user's config folder."""
    folder = tmp_path / "settings"
    monkeypatch.setenv("MEDCLIPSAM_CONFIG_DIR", str(folder))
    return folder


@pytest.fixture
def pipeline(tiny_pipeline):
    return tiny_pipeline


def _image(h=48, w=64, seed=0):
    rng = np.random.default_rng(seed)
    img = (40 + 10 * rng.standard_normal((h, w))).clip(0, 255).astype(np.uint8)
    img[10:25, 20:40] = 220
    return img


def _dock(viewer, pipeline=None):
    """Plugins > Text-prompt segmentation, then (tests only) the tiny models."""
    w = dock(viewer, SEGMENT)
    if pipeline is not None:
        w.set_pipeline(pipeline)
    return w


@pytest.fixture
def widget(make_napari_viewer, pipeline, qtbot):
    viewer = make_napari_viewer()
    viewer.add_image(_image(), name="scan", scale=SCALE, translate=TRANSLATE)
    return _dock(viewer, pipeline)


def _run(widget, qtbot, prompt="a disk"):
    widget.prompt_edit.setPlainText(prompt)
    widget.run_button.click()
    qtbot.waitUntil(lambda: not widget.running, timeout=120_000)


KINDS = ("saliency", "coarse mask", "boxes", "points", "SAM mask")


def test_run_all_adds_every_stage_aligned_with_the_image(widget, qtbot):
    viewer = widget.viewer
    assert widget.image_combo.currentText() == "scan"
    assert widget.layer_spin.value() == 2  # the injected pipeline's config is shown
    _run(widget, qtbot)
    assert widget.last_status and "error" not in widget.last_status.lower()
    for kind in KINDS:
        name = f"{kind} [a disk]"
        assert name in viewer.layers, name
        layer = viewer.layers[name]
        np.testing.assert_allclose(layer.scale, SCALE)
        np.testing.assert_allclose(layer.translate, TRANSLATE)
    assert viewer.layers["SAM mask [a disk]"].data.shape == (48, 64)
    assert viewer.layers["saliency [a disk]"].colormap.name == "inferno"
    boxes = viewer.layers["boxes [a disk]"]
    assert len(boxes.data) == 1 and boxes.shape_type == ["rectangle"]
    assert widget.progress_bar.value() == 100

    # a second run updates the layers in place
    n_layers = len(viewer.layers)
    _run(widget, qtbot)
    assert len(viewer.layers) == n_layers


def test_moving_the_box_reruns_only_sam(widget, qtbot):
    _run(widget, qtbot)
    pipe = widget.controller.pipeline
    calls = pipe.session.encoder_calls
    assert calls == 1
    boxes = widget.viewer.layers["boxes [a disk]"]
    moved = [np.asarray(boxes.data[0]) + np.array([5.0, -8.0])]
    boxes.data = moved
    qtbot.waitUntil(lambda: widget.refine_count == 1, timeout=10_000)
    assert pipe.session.encoder_calls == calls
    prompts = widget.prompts_from_layers()
    (y0, x0), (y1, x1) = moved[0].min(axis=0), moved[0].max(axis=0)
    np.testing.assert_allclose(prompts.boxes[0], np.clip([x0, y0, x1, y1], 0, [63, 47, 63, 47]))
    assert widget.viewer.layers["SAM mask [a disk]"].data.shape == (48, 64)
    assert "SAM re-run" in widget.last_status


def test_cancel_reports_cancelled(widget, qtbot):
    widget.steps_spin.setValue(500)
    widget.prompt_edit.setPlainText("a disk")
    widget.run_button.click()
    widget.cancel_button.click()
    qtbot.waitUntil(lambda: not widget.running, timeout=120_000)
    assert widget.last_status == "Cancelled."
    assert "SAM mask [a disk]" not in widget.viewer.layers
    assert widget.run_button.isEnabled()


def test_user_mistakes_are_reported_not_raised(widget, qtbot):
    widget.prompt_edit.setPlainText("")
    widget.run_button.click()
    assert not widget.running and "prompt" in widget.last_status.lower()
    widget.layer_spin.setValue(40)  # the tiny ViT has 4 blocks
    _run(widget, qtbot)
    assert "layer must be between" in widget.last_status


def test_volume_uses_current_slice(make_napari_viewer, pipeline, qtbot):
    viewer = make_napari_viewer()
    vol = np.stack([_image(seed=s) for s in range(3)])
    viewer.add_image(vol, name="vol")
    viewer.dims.set_current_step(0, 2)
    w = _dock(viewer, pipeline)
    _run(w, qtbot)
    run = w.controller.state.run
    assert run.slice_index == 2
    np.testing.assert_array_equal(run.result.rgb[..., 0], vol[2])
    assert w.viewer.layers["SAM mask [a disk]"].data.shape == (48, 64)


def test_slice_of_the_chosen_layer_not_the_tallest(make_napari_viewer, pipeline, qtbot):
    """An 8-slice stack beside a 40-slice one, the viewer on slice 30: the chosen layer's
    own world-to-data mapping picks its last slice (no IndexError)."""
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((40, 48, 64), np.uint8), name="tall")
    short = np.stack([_image(seed=s) for s in range(8)])
    viewer.add_image(short, name="short")
    viewer.dims.set_current_step(0, 30)
    w = _dock(viewer, pipeline)
    w.image_combo.setCurrentText("short")
    _run(w, qtbot)
    assert w.controller.state.run.slice_index == 7, w.last_status
    np.testing.assert_array_equal(w.controller.state.run.result.rgb[..., 0], short[7])


def test_presets_fill_prompt_and_parameters(widget):
    widget.preset_combo.setCurrentText("both lungs (chest X-ray)")
    assert widget.prompt_edit.toPlainText().startswith("both lungs")
    assert widget.topk_spin.value() == 2 and widget.box_mode_combo.currentText() == "per_component"
    widget.preset_combo.setCurrentText("breast tumor (ultrasound)")
    assert widget.layer_spin.value() == 9 and widget.beta_spin.value() == 1.0
    # the settings the fields do not show come with the preset too (the authors' script)
    config = widget.run_state()["config"]
    assert config["saliency"]["seed"] == 12 and config["saliency"]["readout"] == "last_forward"
    assert config["coarse"]["method"] == "kmeans" and config["coarse"]["kmeans_size"] == 256


def test_box_conversions_round_trip():
    from napari_medclipsam._widgets.layer_prompts import boxes_to_rectangles, rectangles_to_boxes

    boxes = np.array([[3, 4, 10, 20], [0, 0, 5, 5]], dtype=np.float32)
    rects = boxes_to_rectangles(boxes)
    assert rects[0].tolist() == [[4, 3], [4, 10], [20, 10], [20, 3]]
    np.testing.assert_array_equal(rectangles_to_boxes(rects, (48, 64)), boxes)


def test_sample_opens_from_the_menu_as_a_2d_image(make_napari_viewer):
    from napari_helpers import open_sample

    viewer = make_napari_viewer()
    [layer] = open_sample(viewer, "head_phantom")
    assert layer.data.ndim == 2 and min(layer.data.shape) >= 64 and "phantom" in layer.name


def test_boxes_from_a_painted_mask(widget, qtbot):
    _run(widget, qtbot)
    calls = widget.controller.pipeline.session.encoder_calls
    coarse = widget.viewer.layers["coarse mask [a disk]"]
    painted = np.zeros((48, 64), np.int32)
    painted[5:15, 10:30] = 1  # the user paints a new region (label value irrelevant)
    painted[30:40, 40:60] = 3
    coarse.data = painted
    widget.box_mode_combo.setCurrentText("per_component")
    widget.mask_button.click()
    prompts = widget.prompts_from_layers()
    assert sorted(map(tuple, prompts.boxes.tolist())) == [(10, 5, 29, 14), (40, 30, 59, 39)]
    assert widget.refine_count == 1
    assert widget.controller.pipeline.session.encoder_calls == calls
    coarse.data = np.zeros((48, 64), np.int32)
    widget.mask_button.click()
    assert "empty" in widget.last_status


def test_gui_stays_responsive_while_running(widget, qtbot):
    """The event loop keeps turning while the chain runs in the worker (adding the result
    layers afterwards is GUI work and is not counted)."""
    import time

    from qtpy.QtCore import QTimer

    widget.steps_spin.setValue(250)
    ticks, done = [], []
    timer = QTimer()
    timer.setInterval(20)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    widget._progress_signal.connect(
        lambda stage, f: done.append(time.perf_counter()) if stage == "done" else None)
    timer.start()
    start = time.perf_counter()
    _run(widget, qtbot)
    timer.stop()
    assert done, "the worker never reported 'done'"
    computing = done[0] - start
    during = [t for t in ticks if t <= done[0]]
    gaps = np.diff([start, *during, done[0]])
    assert computing > 0.3 and len(during) >= 5, (computing, len(during))
    assert gaps.max() < 0.5, f"the GUI froze for {gaps.max():.2f} s while computing"
    assert "SAM mask [a disk]" in widget.viewer.layers


def test_all_slices_gives_3d_layers(make_napari_viewer, pipeline, qtbot):
    viewer = make_napari_viewer()
    volume = np.stack([_image(seed=s) for s in range(3)])
    viewer.add_image(volume, name="vol", scale=(4.0, *SCALE), translate=(1.0, *TRANSLATE))
    w = _dock(viewer, pipeline)
    w.all_slices_check.setChecked(True)
    _run(w, qtbot)
    mask = viewer.layers["SAM mask [a disk]"]
    assert mask.data.shape == volume.shape
    np.testing.assert_allclose(mask.scale, (4.0, *SCALE))
    np.testing.assert_allclose(mask.translate, (1.0, *TRANSLATE))
    assert viewer.layers["saliency [a disk]"].data.shape == volume.shape
    boxes = viewer.layers["boxes [a disk]"]
    assert boxes.ndim == 3 and len(boxes.data) == 3  # one box per slice (top-k 1)
    assert sorted({int(r[0, 0]) for r in boxes.data}) == [0, 1, 2]
    assert "of 3 slices" in w.last_status
    # back to one slice: the 3-D layers are replaced by 2-D ones
    w.all_slices_check.setChecked(False)
    _run(w, qtbot)
    assert viewer.layers["SAM mask [a disk]"].data.shape == volume.shape[1:]


def test_save_load_run_and_settings_persist(make_napari_viewer, widget, qtbot, tmp_path,
                                            settings_dir):
    widget.prompt_edit.setPlainText("a disk\na round shape")
    widget.beta_spin.setValue(1.5)
    widget.topk_spin.setValue(2)
    path = tmp_path / "run.json"
    widget.save_run(path)
    saved = json.loads(path.read_text())
    assert saved["prompt"] == ["a disk", "a round shape"]
    assert saved["config"]["saliency"]["beta"] == 1.5 and saved["config"]["coarse"]["top_k"] == 2

    other = _dock(make_napari_viewer())
    other.load_run(path)
    assert other.prompt_edit.toPlainText() == "a disk\na round shape"
    assert other.beta_spin.value() == 1.5 and other.topk_spin.value() == 2
    assert other.clip_edit.text() == saved["config"]["clip_model"]
    path.write_text("{not json")
    other.load_run(path)
    assert "Could not load" in other.last_status

    _run(widget, qtbot, prompt="a square")  # a successful run remembers its settings
    assert (settings_dir / "segment_widget.json").is_file()
    fresh = _dock(make_napari_viewer())
    assert fresh.prompt_edit.toPlainText() == "a square"
    assert fresh.beta_spin.value() == 1.5


def test_missing_model_is_an_actionable_message(make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer()
    viewer.add_image(_image(), name="scan")
    w = _dock(viewer)  # no injected pipeline: models come from the fields
    w.clip_edit.setText(f"local-dir:{tmp_path / 'no_such_model'}")
    w.device_combo.setCurrentText("cpu")
    _run(w, qtbot)
    assert "CLIP folder not found" in w.last_status
    assert w.run_button.isEnabled() and not w.running
    assert not any(layer.name.startswith("SAM mask") for layer in viewer.layers)


def test_two_targets_one_label_map_named_and_undoable(widget, qtbot):
    viewer = widget.viewer
    _run(widget, qtbot, prompt="a disk")
    widget.accept_button.click()
    label_map = viewer.layers["label map"]
    np.testing.assert_allclose(label_map.scale, SCALE)
    np.testing.assert_allclose(label_map.translate, TRANSLATE)
    # whatever the tiny SAM found, give the first target a known region too
    widget.viewer.layers["boxes [a disk]"].data = [np.array([[2, 2], [2, 20], [20, 20],
                                                             [20, 2]], float)]
    qtbot.waitUntil(lambda: widget.refine_count >= 1, timeout=10_000)
    disk = np.asarray(viewer.layers["SAM mask [a disk]"].data) > 0
    widget.accept_button.click()
    assert ((label_map.data == 1) == disk).all()

    _run(widget, qtbot, prompt="a square")
    square = np.zeros((48, 64), bool)
    square[10:40, 10:60] = True  # overlaps the disk target
    viewer.layers["SAM mask [a square]"].data = square.astype(np.int32)  # painted by hand
    widget.accept_button.click()
    data = np.asarray(label_map.data)
    assert (data[disk] == 1).all(), "another target's voxels were overwritten"
    assert (data[square & ~disk] == 2).all()
    names = dict(zip(label_map.features["index"], label_map.features["name"], strict=True))
    assert names == {0: "background", 1: "a disk", 2: "a square"}
    assert "label 2" in widget.last_status

    label_map.undo()  # napari's own undo reverts the accept
    assert not (np.asarray(label_map.data) == 2).any()
    assert ((np.asarray(label_map.data) == 1) == disk).all()

    widget.overwrite_check.setChecked(True)
    widget.accept_button.click()
    assert (np.asarray(label_map.data)[square] == 2).all()
