"""The "Text-prompt segmentation" dock widget driven in a real napari viewer on tiny models.

Needs a display with OpenGL: pytest-xvfb starts Xvfb (apt: xvfb, libgl1-mesa-dri, ...).
"""

import json
import re

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
    assert widget.last_status == "Cancelled; nothing changed."
    assert "SAM mask [a disk]" not in widget.viewer.layers
    assert widget.run_button.isEnabled()
    assert widget.progress_bar.value() == 0 and widget.progress_bar.format() == "cancelled"


def test_user_mistakes_are_reported_not_raised(widget, qtbot):
    widget.prompt_edit.setPlainText("")
    widget.run_button.click()
    assert not widget.running and "prompt" in widget.last_status.lower()
    widget.layer_spin.setValue(40)  # the tiny ViT has 4 blocks
    _run(widget, qtbot)
    assert "layer must be between" in widget.last_status
    assert "Advanced > Saliency layer" in widget.last_status  # where to change it
    assert widget.progress_bar.value() == 0  # reset, not left at the failed stage


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
    assert widget.topk_spin.value() == 2
    assert widget.box_mode_combo.currentText() == "one box per region"
    assert widget.run_state()["config"]["prompts"]["box_mode"] == "per_component"
    assert "preset: both lungs (chest X-ray)" in widget.settings_label.text()
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
    widget.box_mode_combo.setCurrentText("one box per region")
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


def test_missing_models_reported_together_before_any_work(make_napari_viewer, qtbot,
                                                         tmp_path):
    """Both models missing: one message names both, in the widget's words (the field to
    fill, not a command-line flag), before anything is computed; the bar says it stopped."""
    viewer = make_napari_viewer()
    viewer.add_image(_image(), name="scan")
    w = _dock(viewer)  # no injected pipeline: models come from the fields
    w.clip_edit.setText(f"local-dir:{tmp_path / 'no_such_model'}")
    w.checkpoint_edit.setText(str(tmp_path / "no_such_sam.pth"))
    w.device_combo.setCurrentText("cpu")
    _run(w, qtbot)
    assert "CLIP folder not found" in w.last_status
    assert "SAM checkpoint not found" in w.last_status
    assert "Models > CLIP model" in w.last_status and "--" not in w.last_status
    assert [u.stage for u in w.progress_log] == ["checking models"]
    assert w.progress_bar.value() == 0 and "error" in w.progress_bar.format()
    assert w.run_button.isEnabled() and not w.running
    assert not any(layer.name.startswith("SAM mask") for layer in viewer.layers)


def test_browse_buttons_fill_the_model_fields(make_napari_viewer, monkeypatch, tmp_path):
    from qtpy.QtWidgets import QFileDialog

    w = _dock(make_napari_viewer())
    monkeypatch.setattr(QFileDialog, "getExistingDirectory",
                        staticmethod(lambda *a, **k: str(tmp_path)))
    monkeypatch.setattr(QFileDialog, "getOpenFileName",
                        staticmethod(lambda *a, **k: (str(tmp_path / "sam.pth"), "")))
    w.clip_browse_button.click()
    w.checkpoint_browse_button.click()
    assert w.clip_edit.text() == f"local-dir:{tmp_path}"
    assert w.checkpoint_edit.text() == str(tmp_path / "sam.pth")


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


# --------------------------------------------------------------------------- issue 10
def test_progress_names_each_stage_and_counts_the_updates(make_napari_viewer, pipeline,
                                                          qtbot):
    """A pipeline whose CLIP is not loaded yet: the bar names every stage the pipeline
    reports, from checking the models to SAM's mask, one update each."""
    from napari_medclipsam.core.pipeline import ZeroShotPipeline

    viewer = make_napari_viewer()
    viewer.add_image(_image(), name="scan")
    w = _dock(viewer, ZeroShotPipeline(pipeline.config, sam=pipeline.sam))
    formats = []
    w._progress_signal.connect(lambda stage, f: formats.append(w.progress_bar.format()))
    _run(w, qtbot)
    assert [u.stage for u in w.progress_log] == [
        "checking models", "loading CLIP", "saliency step 0/2", "saliency step 1/2",
        "saliency step 2/2", "faithfulness check step 1/2", "faithfulness check step 2/2",
        "coarse mask", "encoding image (SAM)", "SAM mask", "done"]
    assert formats[0] == "checking models %p%" and formats[4] == "saliency step 2/2 %p%"
    assert w.progress_bar.value() == 100 and w.last_status.startswith("Done in ")


def test_all_slices_progress_counts_slices_with_an_eta(make_napari_viewer, pipeline, qtbot):
    viewer = make_napari_viewer()
    viewer.add_image(np.stack([_image(seed=s) for s in range(3)]), name="vol")
    w = _dock(viewer, pipeline)
    w.all_slices_check.setChecked(True)
    statuses = []
    w._progress_signal.connect(lambda stage, f: statuses.append(w.last_status))
    _run(w, qtbot)
    log = w.progress_log
    assert {u.slice_count for u in log} == {3}
    assert [u.stage.split(":")[0] for u in log if u.stage.endswith("saliency step 0/2")] == [
        "slice 1/3 (z=0)", "slice 2/3 (z=1)", "slice 3/3 (z=2)"]
    per_slice = [sum(u.slice_number == n for u in log) for n in (1, 2, 3)]
    assert all(n >= 5 for n in per_slice) and sum(per_slice) == len(log)
    assert all(u.eta_s is None for u in log if u.slice_number == 1 and u.slices_done == 0)
    assert all(u.eta_s is not None for u in log if u.slice_number == 3)
    assert any("1 of 3 slices done · about" in s and s.endswith("left") for s in statuses)
    assert [u.fraction for u in log] == sorted(u.fraction for u in log)


def test_cancel_all_slices_keeps_the_finished_slices(make_napari_viewer, pipeline, qtbot):
    """Each finished slice is in the layers at once; Cancel keeps those slices (equal to an
    uncancelled run's), says how many, and the rerun added no layers."""
    viewer = make_napari_viewer()
    volume = np.stack([_image(seed=s) for s in range(6)])
    viewer.add_image(volume, name="vol")
    w = _dock(viewer, pipeline)
    w.all_slices_check.setChecked(True)
    w.steps_spin.setValue(12)  # slow enough for Cancel to land mid-run
    _run(w, qtbot)
    reference = np.asarray(viewer.layers["SAM mask [a disk]"].data).copy()
    reference_saliency = np.asarray(viewer.layers["saliency [a disk]"].data).copy()
    n_layers = len(viewer.layers)
    seen = {}

    def on_slice(z, result):  # runs after the widget wrote the slice
        seen[z] = np.asarray(viewer.layers["SAM mask [a disk]"].data[z]).copy()
        if len(seen) == 2:
            w.cancel_button.click()

    w._slice_signal.connect(on_slice)
    _run(w, qtbot)
    match = re.fullmatch(r"Cancelled after (\d) of 6 slices; finished slices kept\.",
                         w.last_status)
    assert match, w.last_status
    kept = int(match.group(1))
    assert 2 <= kept < 6 and len(viewer.layers) == n_layers
    run = w.controller.state.run
    assert run.cancelled and run.volume.completed == list(range(kept))
    sam = np.asarray(viewer.layers["SAM mask [a disk]"].data)
    saliency = np.asarray(viewer.layers["saliency [a disk]"].data)
    assert set(seen) >= set(range(2))
    for z, written in seen.items():  # already in the layer while the run went on
        assert (written == sam[z]).all() and (written == reference[z]).all()
    assert (sam[:kept] == reference[:kept]).all() and not sam[kept:].any()
    np.testing.assert_allclose(saliency[:kept], reference_saliency[:kept], atol=1e-6)
    assert w.progress_bar.format() == "cancelled"
    w.accept_button.click()  # the finished slices can be accepted as they are
    assert (np.asarray(viewer.layers["label map"].data)[:kept] == (sam[:kept] > 0)).all()


def test_two_layers_with_different_slice_counts(make_napari_viewer, pipeline, qtbot):
    """A 3-slice layer (z spacing 3) beside a 9-slice one: the viewer at world z = 6 is
    slice 2 of the short layer and slice 6 of the tall one; each run takes its own."""
    viewer = make_napari_viewer()
    short = np.stack([_image(32, 32, seed=s) for s in range(3)])
    tall = np.stack([_image(32, 32, seed=10 + s) for s in range(9)])
    viewer.add_image(short, name="short", scale=(3.0, 1.0, 1.0))
    viewer.add_image(tall, name="tall")
    viewer.dims.set_point(0, 6.0)
    w = _dock(viewer, pipeline)
    for name, layer_data, z in (("short", short, 2), ("tall", tall, 6)):
        w.image_combo.setCurrentText(name)
        assert f"'{name}', slice z={z} of {len(layer_data)}" in w.settings_label.text()
        _run(w, qtbot, prompt=f"a disk in {name}")
        run = w.controller.state.run
        assert run.slice_index == z, w.last_status
        np.testing.assert_array_equal(run.result.rgb[..., 0], layer_data[z])
    viewer.dims.set_point(0, 24.0)  # past the short layer's end: its last slice
    w.image_combo.setCurrentText("short")
    _run(w, qtbot, prompt="a disk in short")
    assert w.controller.state.run.slice_index == 2
    w.all_slices_check.setChecked(True)
    for name, layer_data in (("short", short), ("tall", tall)):
        w.image_combo.setCurrentText(name)
        _run(w, qtbot, prompt=f"a disk in {name}")
        assert viewer.layers[f"SAM mask [a disk in {name}]"].data.shape == layer_data.shape
        assert f"of {len(layer_data)} slices" in w.last_status


def test_rerun_reuses_layers_and_hides_the_steps(widget, qtbot):
    viewer = widget.viewer
    _run(widget, qtbot)
    run = widget.controller.state.run
    names = [layer.name for layer in viewer.layers]
    visible = {kind: viewer.layers[f"{kind} [a disk]"].visible for kind in KINDS}
    if run.result.found:  # SAM ran: the steps before it step aside, the edit handles stay
        assert visible == {"saliency": False, "coarse mask": False, "boxes": True,
                           "points": True, "SAM mask": True}
    sam = viewer.layers["SAM mask [a disk]"]
    assert 0.3 <= sam.opacity <= 0.7 and sam.blending == "translucent"
    widget.steps_check.setChecked(True)
    assert viewer.layers["saliency [a disk]"].visible
    assert viewer.layers["coarse mask [a disk]"].visible
    widget.steps_check.setChecked(False)
    assert not viewer.layers["saliency [a disk]"].visible
    for _ in range(2):
        _run(widget, qtbot)
        assert [layer.name for layer in viewer.layers] == names  # no new layers
    assert viewer.layers["saliency [a disk]"].data is not None


def test_typing_a_preset_task_suggests_it(widget, qtbot):
    widget.prompt_edit.setPlainText("breast tumor")
    assert widget.suggestion_row.isVisibleTo(widget)
    assert "Matches preset 'breast tumor (ultrasound)'" in widget.suggestion_label.text()
    assert "custom settings" in widget.settings_label.text()
    widget.suggest_button.click()
    assert widget.prompt_edit.toPlainText() == "breast tumor"  # the prompt as typed
    assert widget.layer_spin.value() == 9 and widget.beta_spin.value() == 1.0
    assert widget.preset_combo.currentText() == "breast tumor (ultrasound)"
    assert widget.run_state()["config"]["saliency"]["seed"] == 12  # hidden settings too
    assert not widget.suggestion_row.isVisibleTo(widget)
    line = widget.settings_label.text()
    assert line.startswith("'scan' · saliency layer 9, beta 1, ")
    assert line.endswith("preset: breast tumor (ultrasound)")
    widget.beta_spin.setValue(0.5)  # edited: the line says so
    assert widget.settings_label.text().endswith("preset: breast tumor (ultrasound), edited")
    widget.prompt_edit.setPlainText("lungs in a CT slice")
    assert "'both lungs (CT)'" in widget.suggestion_label.text()
    widget.prompt_edit.setPlainText("a disk")
    assert not widget.suggestion_row.isVisibleTo(widget)


def test_fields_have_plain_labels_and_tooltips(widget):
    from qtpy.QtWidgets import QFormLayout, QLabel

    labels = {}
    for form in widget.findChildren(QFormLayout):
        for row in range(form.rowCount()):
            item = form.itemAt(row, QFormLayout.LabelRole)
            field = form.itemAt(row, QFormLayout.FieldRole)
            if item is None or field is None:
                continue
            label = item.widget()
            text = label.text() if isinstance(label, QLabel) else ""
            labels[text] = field.widget()
    for text in ("Image layer", "Prompt", "CLIP model", "SAM checkpoint", "Saliency layer",
                 "Focus (beta)", "Min. confidence (eta_c)", "Regions kept (top-k)",
                 "SAM prompt", "Boxes"):
        assert text in labels, sorted(labels)
    for spin in (widget.layer_spin, widget.beta_spin, widget.eta_spin, widget.topk_spin,
                 widget.mode_combo, widget.box_mode_combo, widget.image_combo,
                 widget.method_combo):
        assert len(spin.toolTip()) > 40, spin
    assert "eta_c" in widget.eta_spin.toolTip() and "0 keeps every" in widget.eta_spin.toolTip()
    everything = " ".join(w.toolTip() + " " + getattr(w, "text", lambda: "")()
                          for w in widget.findChildren(QLabel))
    assert "--" not in everything


def test_fits_a_laptop_screen(widget):
    """1366x768: the dock scrolls instead of growing past the screen, whatever is expanded."""
    from superqt import QCollapsible

    for section in widget.findChildren(QCollapsible):
        section.expand(animate=False)
    assert widget.scroll_area.widget().sizeHint().height() > 0
    assert widget.minimumSizeHint().height() < 300
    assert widget.minimumSizeHint().width() < 420


def test_save_mask_writes_nifti_in_the_scan_geometry(make_napari_viewer, pipeline, qtbot,
                                                     tmp_path):
    """A NIfTI scan opened through the plugin's reader: Save mask writes the corrected SAM
    mask of the slice (as a volume aligned with the scan) and the label map, both with the
    scan's affine, and never replaces the scan."""
    import hashlib

    import nibabel as nib

    affine = np.array([[-0.8, 0, 0, 60.0], [0, 0.8, 0, -40.0], [0, 0, 2.5, 12.0],
                       [0, 0, 0, 1]])
    scan = np.stack([_image(seed=s) for s in range(4)]).astype(np.int16)
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(scan.T.copy(), affine), str(path))
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    viewer = make_napari_viewer()
    [layer] = viewer.open(str(path), plugin="napari-medclipsam")
    viewer.dims.set_point(0, float(layer.data_to_world((2, 0, 0))[0]))
    w = _dock(viewer, pipeline)
    _run(w, qtbot)
    assert w.controller.state.run.slice_index == 2
    painted = np.zeros((48, 64), np.int32)
    painted[5:20, 8:30] = 1
    viewer.layers["SAM mask [a disk]"].data = painted  # corrected by hand
    w.accept_button.click()

    written = w.save_mask(tmp_path / "out" / "disk.nii.gz")
    assert [p.name for p in written] == ["disk.nii.gz", "disk_label_map.nii.gz",
                                         "disk_label_map.json"]
    saved = nib.load(written[0])
    np.testing.assert_allclose(saved.affine, affine)
    data = np.asarray(saved.dataobj).T
    assert data.shape == scan.shape and (data[2] == painted).all() and data.sum() == 15 * 22
    label_map = nib.load(written[1])
    np.testing.assert_allclose(label_map.affine, affine)
    expected = np.asarray(viewer.layers["label map"].data)
    np.testing.assert_array_equal(np.asarray(label_map.dataobj).T, expected)
    assert json.loads(written[2].read_text())["labels"] == {"background": 0, "a disk": 1}
    assert "Saved disk.nii.gz, disk_label_map.nii.gz" in w.last_status

    assert w.save_mask(path) is None and "source image" in w.last_status
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    assert w.save_mask(tmp_path / "slice.png") is None  # a volume's label map: not a PNG
    assert not (tmp_path / "slice.png").exists()


def test_save_mask_png_for_a_2d_image(widget, qtbot, tmp_path, monkeypatch):
    import imageio.v3 as iio
    from qtpy.QtWidgets import QFileDialog

    widget.save_mask_button.click()
    assert "press Run all" in widget.last_status
    _run(widget, qtbot)
    monkeypatch.setattr(QFileDialog, "getSaveFileName", staticmethod(
        lambda *a, **k: (str(tmp_path / "mask"), "PNG, 2-D images (*.png)")))
    widget.save_mask_button.click()  # no suffix typed: the chosen type's is added
    saved = iio.imread(tmp_path / "mask.png")
    sam = np.asarray(widget.viewer.layers["SAM mask [a disk]"].data) > 0
    np.testing.assert_array_equal(saved, sam.astype(np.uint8) * 255)
