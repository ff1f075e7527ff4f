"""The "Pseudo-labels & training" dock widget driven in a real napari viewer, opened as the
Plugins menu opens it: export from layers (a two-target label map as two classes), a real
(tiny, CPU) nnU-Net checkpoint-ensemble training in the background, ensemble prediction layers
(binary and two targets), the review queue, and cancelling a running training.

Needs a display with OpenGL: pytest-xvfb starts Xvfb (apt: xvfb, libgl1-mesa-dri, ...).
"""

import json
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("qtpy.QtWidgets", exc_type=ImportError)
pytest.importorskip("nnunetv2")
psutil = pytest.importorskip("psutil")

from napari_helpers import TRAINING, dock  # noqa: E402

from napari_medclipsam._widgets.common import slice_index  # noqa: E402
from napari_medclipsam._widgets.training_widget import (  # noqa: E402
    MASK,
    PROBABILITY,
    UNCERTAINTY,
)

SCALE3, TRANSLATE3 = (2.0, 0.5, 0.75), (10.0, 5.0, -3.0)
FINAL = ("done", "failed", "cancelled", "crashed")


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Settings in a temporary folder; no nnU-Net folders from the user's environment."""
    monkeypatch.setenv("MEDCLIPSAM_CONFIG_DIR", str(tmp_path / "settings"))
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def folders(tmp_path):
    """nnU-Net's three folders; any training still running at the end is cancelled."""
    from napari_medclipsam.nnunet.job import cancel

    out = {k: tmp_path / "nnunet" / k for k in ("raw", "preprocessed", "results")}
    yield out
    for job_dir in out["results"].glob("*/medclipsam_job"):
        cancel(job_dir)


def _disk_image(seed: int, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.integers(20, size - 20, 2)
    mask = ((yy - cy) ** 2 + (xx - cx) ** 2 < 100).astype(np.uint8)
    img = (40 + 10 * rng.standard_normal((size, size)) + 150 * mask).clip(0, 255)
    return img.astype(np.uint8), mask


def _two_disks(seed: int, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """An image with two disks of different brightness: label 1 the dim one, 2 the bright."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    cy = rng.integers(18, size - 18)
    dim = (yy - cy) ** 2 + (xx - 16) ** 2 < 64
    bright = (yy - (size - cy)) ** 2 + (xx - 46) ** 2 < 64
    img = 40 + 10 * rng.standard_normal((size, size)) + 90 * dim + 190 * bright
    return img.clip(0, 255).astype(np.uint8), (dim + 2 * bright).astype(np.int32)


TWO = {"dim disk": 1, "bright disk": 2}


def _label_map_features(table):
    return pd.DataFrame({"index": [0, *table.values()], "name": ["background", *table]})


def _widget(viewer, folders, dataset_id=1):
    """Plugins > MedCLIP-SAM > Pseudo-labels & training, then the folders and dataset."""
    w = dock(viewer, TRAINING)
    for key, path in folders.items():
        w.folder_edits[key].setText(str(path))
    w.dataset_spin.setValue(dataset_id)
    return w


def _reopen(viewer, w, folders, dataset_id):
    """Close the dock widget and open it again from the Plugins menu: a new widget."""
    viewer.window.remove_dock_widget(w)
    w2 = _widget(viewer, folders, dataset_id)
    assert w2 is not w
    return w2


def _tiny_schedule(w, epochs=2, cycles=1, checkpoints=2) -> None:
    w.epochs_spin.setValue(epochs)
    w.cycles_spin.setValue(cycles)
    w.checkpoints_spin.setValue(checkpoints)
    w.iterations_spin.setValue(2)
    w.val_iterations_spin.setValue(1)
    w.device_combo.setCurrentText("cpu")
    w.data_workers = 0


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


LAPTOP = (1366, 768)
SECTIONS = ("1. Export pseudo-labels", "2. Train (background process)", "3. Predict",
            "4. Review (most uncertain first)")


def _in_view(w, widget) -> bool:
    """Scrolled to, ``widget`` lies inside the scroll area's viewport and the window."""
    from qtpy.QtCore import QPoint, QRect
    from qtpy.QtWidgets import QApplication

    QApplication.processEvents()   # the layout after a section was unfolded
    w.scroll_area.ensureWidgetVisible(widget)
    QApplication.processEvents()
    viewport = w.scroll_area.viewport()
    in_viewport = QRect(widget.mapTo(viewport, QPoint(0, 0)), widget.size())
    in_window = QRect(widget.mapTo(w.window(), QPoint(0, 0)), widget.size())
    return (viewport.rect().contains(in_viewport) and w.window().rect().contains(in_window)
            and not widget.visibleRegion().isEmpty())


def test_every_part_fits_a_laptop_screen(make_napari_viewer, qtbot):
    """At 1366x768 the dock leaves napari its canvas, asks for no more height than the
    screen has, and every control can be scrolled to (Predict, Review's buttons)."""
    from qtpy.QtWidgets import QDockWidget, QScrollArea

    viewer = make_napari_viewer(show=True)
    viewer.window.resize(*LAPTOP)
    w = dock(viewer, TRAINING)
    qtbot.waitUntil(w.isVisible)
    window = w.window()
    assert (window.width(), window.height()) == LAPTOP
    dock_widget = w.parentWidget()
    while not isinstance(dock_widget, QDockWidget):
        dock_widget = dock_widget.parentWidget()
    # napari's menu, title bars and status bar take about 100 px of the 768
    hint = dock_widget.minimumSizeHint()
    assert hint.width() <= 400 and hint.height() <= LAPTOP[1] - 200, hint
    assert dock_widget.width() <= 400, dock_widget.width()   # the canvas keeps the rest
    assert w.height() <= LAPTOP[1] - 50

    # four numbered sections in a scroll area; the status line stays in view below it
    assert isinstance(w.scroll_area, QScrollArea) and w.scroll_area.widgetResizable()
    sections = (w.export_section, w.train_section, w.predict_section, w.review_box)
    assert tuple(s.title for s in sections) == SECTIONS
    assert [s.isExpanded() for s in sections] == [True, True, True, False]
    content = w.scroll_area.widget()
    assert all(content.isAncestorOf(s) for s in sections)
    assert not content.isAncestorOf(w.status_label) and w.status_label.isVisible()
    # a section folds and unfolds with a click on its title
    w.export_section.header.click()
    assert not w.export_section.isExpanded() and not w.export_button.isVisible()
    w.export_section.header.click()
    assert w.export_section.isExpanded() and w.export_button.isVisible()

    # every button can be reached
    for widget in (w.export_button, w.start_button, w.log_button, w.predict_button):
        assert _in_view(w, widget), widget.text()
    w.review_box.expand()
    assert w.review_table.isVisible()
    assert _in_view(w, w.corrected_button) and _in_view(w, w.load_ranking_button)
    # the folder fields have Browse buttons (a folder dialog)
    assert [b.text() for b in w.browse_buttons.values()] == ["Browse..."] * 3
    assert not w.accept_button.isEnabled() and not w.corrected_button.isEnabled()


def test_estimate_and_length_presets_before_start(make_napari_viewer):
    from napari_medclipsam._widgets.training_controller import preset_named

    viewer = make_napari_viewer()
    w = dock(viewer, TRAINING)
    w.device_combo.setCurrentText("cpu")
    # on a machine without a GPU (this one) the dock opens on Quick try, not on days
    from napari_medclipsam._widgets.training_controller import guess_device

    if guess_device("auto")[0] == "cpu":
        assert w.preset_combo.currentData() == "quick"
    # the paper's schedule: days on a CPU, said in colour
    paper = w.preset_combo.findData("paper")
    w.preset_combo.setCurrentIndex(paper)
    w.preset_combo.activated.emit(paper)
    assert w.estimate.device == "cpu" and w.estimate.too_long
    text = w.estimate_label.text()
    assert text.startswith(f"About {w.estimate.duration} on this computer's CPU")
    assert "days" in text and "choose 'Quick try'" in text, text
    assert "color" in w.estimate_label.styleSheet()

    # Quick try, chosen from the menu
    quick = w.preset_combo.findData("quick")
    assert w.preset_combo.itemText(quick) == preset_named("quick").label("cpu")
    w.preset_combo.setCurrentIndex(quick)
    w.preset_combo.activated.emit(quick)
    assert (w.epochs_spin.value(), w.cycles_spin.value(), w.checkpoints_spin.value(),
            w.iterations_spin.value(), w.val_iterations_spin.value()) == (10, 2, 2, 20, 2)
    assert w.schedule().n_checkpoints == 4
    assert w.estimate.seconds < 3600 and w.estimate_label.text().startswith("About ")
    assert " min on this computer's CPU" in w.estimate_label.text()
    assert w.estimate_label.styleSheet() == ""

    # on a GPU the paper's schedule takes hours
    w.device_combo.setCurrentText("cuda")
    paper = w.preset_combo.findData("paper")
    w.preset_combo.setCurrentIndex(paper)
    w.preset_combo.activated.emit(paper)
    assert w.epochs_spin.value() == 600 and w.iterations_spin.value() == 250
    assert w.estimate.device == "cuda" and not w.estimate.too_long
    assert " h on this computer's GPU" in w.estimate_label.text()
    assert w.preset_combo.itemText(paper).endswith(" h")

    # a field changed by hand: Custom; an impossible schedule says why
    w.epochs_spin.setValue(300)
    assert w.preset_combo.currentData() == "custom"
    assert w.estimate.iterations == 300 * 250
    w.epochs_spin.setValue(301)
    assert w.estimate is None and "multiple of cycles" in w.estimate_label.text()
    custom = w.preset_combo.findData("custom")
    w.preset_combo.activated.emit(custom)
    assert w.schedule_box.isExpanded() and w.epochs_spin.isVisibleTo(w)


LOG_DUMP = """2D U-Net configuration:
{'data_identifier': 'nnUNetPlans_2d', 'preprocessor_name': 'DefaultPreprocessor', 'batch_size': 10}
#######################################################################
Please cite the following paper when using nnU-Net:
#######################################################################
PlainConvUNet(
  (encoder): PlainConvEncoder(
    (conv): Conv2d(1, 32, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))
  )
)
2026-11-24 09:28:46.310723: Epoch 0
2026-11-24 09:29:17.880200: Pseudo dice [np.float32(0.9597)]
2026-11-24 09:29:17.880476: Epoch time: 31.57 s
2026-11-24 09:29:19.273583: Epoch 1
2026-11-24 09:30:21.446206: Epoch time: 62.17 s
"""


def test_messages_say_what_to_click_and_the_log_leaves_out_nnunets_dumps(
        make_napari_viewer, folders):
    """No command lines in the messages; a stopped training's status, its estimate to
    finish (timed from its epochs), its log without nnU-Net's dumps, and the full log."""
    from napari_medclipsam.nnunet.export import cases_from_arrays, export_dataset
    from napari_medclipsam.nnunet.job import NnUNetFolders, model_dir_for

    viewer = make_napari_viewer()
    img, mask = _disk_image(0)
    viewer.add_image(img, name="scan")
    viewer.add_labels(mask.astype(np.int32), name="mask")
    w = _widget(viewer, folders, dataset_id=4)
    messages = []
    w.start()
    messages.append(w.last_status)
    assert "click Export first" in w.last_status, w.last_status
    assert w.show_log() is None and "Start" in w.last_status
    assert not w.log_button.isEnabled()
    w.predict()
    assert "No ensemble checkpoints yet: press Start first" in w.last_status

    # an exported dataset and a training that was cancelled after 2 of 10 epochs
    export_dataset(cases_from_arrays(img, mask, "scan"), folders["raw"], 4, "Toy",
                   verify=False)
    job_dir = folders["results"] / "Dataset004_Toy" / "medclipsam_job"
    job_dir.mkdir(parents=True)
    quick = {"epochs": 10, "cycles": 2, "checkpoints_per_cycle": 2,
             "iterations_per_epoch": 20, "val_iterations_per_epoch": 2, "lr_max": 0.01,
             "lr_min": 1e-4}
    (job_dir / "job.json").write_text(json.dumps(
        {"schedule": quick, "device": "cpu", "configuration": "2d", "data_workers": 0}))
    (job_dir / "status.json").write_text(json.dumps(
        {"phase": "cancelled", "epoch": 2, "epochs": 10, "cycle": 1, "cycles": 2,
         "train_loss": -0.41, "pseudo_dice": 0.96, "epoch_time_s": 62.17, "device": "cpu",
         "iterations_per_epoch": 20}))
    (job_dir / "log.txt").write_text(LOG_DUMP)
    nn_folders = NnUNetFolders.resolve(**folders)
    (model_dir_for(nn_folders, 4, "2d") / "fold_all").mkdir(parents=True)
    w.device_combo.setCurrentText("cpu")
    w.locate_job()
    assert w.status.phase == "cancelled" and w.resume_button.isEnabled()
    assert w.preset_combo.currentData() == "quick"                 # the job's schedule
    assert w.job_label.text().startswith("cancelled · epoch 2/10 · cycle 1/2 · loss -0.4100")
    assert w.estimate.measured and w.estimate.iterations == 8 * 20
    assert w.estimate_label.text().startswith("Resume (2 epochs done): about ")
    assert "timed in this dataset's last run" in w.estimate_label.text()
    log = w.log_view.toPlainText()
    assert "09:30:21 Epoch time: 62.17 s" in log and "09:29:17 Pseudo dice [0.9597]" in log
    for dump in ("data_identifier", "PlainConvUNet", "Conv2d", "####", "Please cite"):
        assert dump not in log, dump
    assert w.log_button.isEnabled()
    dialog = w.show_log()
    assert dialog.isVisible() and dialog.text.toPlainText() == LOG_DUMP
    assert str(job_dir / "log.txt") in dialog.path_label.text()
    (job_dir / "log.txt").write_text(LOG_DUMP + "2026-11-24 09:31:00.000000: more\n")
    assert w.show_log() is dialog and dialog.text.toPlainText().endswith("more\n")
    dialog.close()

    # a training exists: Start says what to press; exporting again says what to tick
    w.start()
    messages.append(w.last_status)
    assert "press Resume, or tick 'start over' and press Start" in w.last_status
    w.name_edit.setText("Toy")
    w.export()
    assert w.wait(60)
    messages.append(w.last_status)
    assert "tick 'append to existing dataset'" in w.last_status, w.last_status
    for message in messages:
        assert "--" not in message and "medclipsam " not in message, message


def test_export_from_layers(make_napari_viewer, folders):
    viewer = make_napari_viewer()
    img, mask = _disk_image(0)
    viewer.add_image(img, name="scan", scale=(0.5, 0.5))
    viewer.add_labels(mask.astype(np.int32) * 3, name="SAM mask [a disk]")
    w = dock(viewer, TRAINING)
    assert w.image_combo.currentText() == "scan"
    assert w.labels_combo.currentText() == "SAM mask [a disk]"
    assert w.label_edit.text() == "a disk"          # suggested from the prompt
    assert w.corrected_check.isChecked() and w.label_edit.isEnabled()
    assert not w.classes_label.isVisible()
    assert not w.slices_check.isEnabled()           # a 2-D image has no slices

    w.export()                                      # no folders yet: told, not raised
    assert not w.busy and "raw" in w.last_status
    for key, path in folders.items():
        w.folder_edits[key].setText(str(path))
    w.dataset_spin.setValue(3)
    w.name_edit.setText("Disks")
    w.export()
    assert w.wait(120)
    folder = folders["raw"] / "Dataset003_Disks"
    assert "Exported 1 case(s) (1 corrected" in w.last_status, w.last_status
    assert w.last_export.folder == folder
    assert (folder / "imagesTr" / "scan_0000.png").is_file()
    assert (folder / "labelsTr" / "scan.png").is_file()
    ds = json.loads((folder / "dataset.json").read_text())
    assert ds["labels"] == {"background": 0, "a disk": 1} and ds["numTraining"] == 1
    cases = json.loads((folder / "medclipsam_cases.json").read_text())
    assert list(cases) == ["scan"] and cases["scan"]["corrected"] is True
    assert cases["scan"]["source"] == "scan"

    before = _snapshot(folders["raw"])
    w.export()                                      # exists, append not ticked
    assert w.wait(60)
    assert "exists already" in w.last_status, w.last_status
    w.append_check.setChecked(True)                 # append: the case itself exists
    w.export()
    assert w.wait(60)
    assert "exists already" in w.last_status and "scan" in w.last_status, w.last_status
    assert _snapshot(folders["raw"]) == before
    assert w.export_button.isEnabled()
    saved = json.loads(w.settings_path().read_text())
    assert saved["folders"]["raw"] == str(folders["raw"]) and saved["dataset_id"] == 3


def test_a_two_target_label_map_exports_as_two_classes(make_napari_viewer, folders):
    viewer = make_napari_viewer()
    pairs = [_two_disks(seed) for seed in range(3)]
    viewer.add_image(np.stack([p[0] for p in pairs]), name="stack", scale=SCALE3)
    viewer.add_labels(np.stack([p[1] > 0 for p in pairs]).astype(np.int32), name="SAM mask [x]")
    label_map = viewer.add_labels(np.stack([p[1] for p in pairs]), name="label map",
                                  scale=SCALE3, features=_label_map_features(TWO))
    w = _widget(viewer, folders, dataset_id=5)
    assert w.labels_combo.currentText() == "label map"      # offered first
    assert w.classes_label.isVisibleTo(w) and not w.label_edit.isEnabled()
    assert "1=dim disk, 2=bright disk" in w.classes_label.text()
    w.name_edit.setText("TwoDisks")
    w.export()
    assert w.wait(120)
    assert "Exported 3 case(s)" in w.last_status, w.last_status
    assert "Classes: 1=dim disk, 2=bright disk" in w.last_status
    folder = folders["raw"] / "Dataset005_TwoDisks"
    ds = json.loads((folder / "dataset.json").read_text())
    assert ds["labels"] == {"background": 0, "dim disk": 1, "bright disk": 2}
    assert ds["numTraining"] == 3
    cases = json.loads((folder / "medclipsam_cases.json").read_text())
    assert set(cases["stack_z000"]["label_fractions"]) == set(TWO)
    # the SAM mask (no names) still exports as one binary class
    w.labels_combo.setCurrentText("SAM mask [x]")
    assert w.label_edit.isEnabled() and not w.classes_label.isVisibleTo(w)
    # a value the names do not cover is refused before anything is written
    w.labels_combo.setCurrentText("label map")
    label_map.data[0, 0, 0] = 7
    w.export()
    assert not w.busy and "7" in w.last_status and "label table" in w.last_status


def test_export_train_and_predict(make_napari_viewer, folders, qtbot):
    """Export a 3-D stack as 2-D slices, train 2 epochs on CPU, predict: three aligned layers."""
    viewer = make_napari_viewer()
    pairs = [_disk_image(seed) for seed in range(6)]
    stack = np.stack([p[0] for p in pairs])
    masks = np.stack([p[1] for p in pairs]).astype(np.int32)
    image = viewer.add_image(stack, name="stack", scale=SCALE3, translate=TRANSLATE3)
    viewer.add_labels(masks, name="mask", scale=SCALE3, translate=TRANSLATE3)
    w = _widget(viewer, folders, dataset_id=7)
    assert w.slices_check.isEnabled() and w.slices_check.isChecked()
    assert not w.predict_button.isEnabled() and not w.cancel_button.isEnabled()
    w.export()
    assert w.wait(120)
    assert "Exported 6 case(s)" in w.last_status, w.last_status
    assert len(list((folders["raw"] / "Dataset007_MedClipSam" / "labelsTr").iterdir())) == 6

    _tiny_schedule(w)
    w.start()
    assert "started" in w.last_status, w.last_status
    assert w.job_dir is not None and w.status.running
    assert w._timer.isActive() and w._timer.interval() == 1000
    assert not w.start_button.isEnabled() and w.cancel_button.isEnabled()

    durations, seen = [], set()
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        qtbot.wait(300)
        t0 = time.perf_counter()
        status = w.refresh_status()
        durations.append(time.perf_counter() - t0)
        seen.add(status.phase)
        if status.phase in FINAL:
            break
    assert status.phase == "done", (status, w.log_view.toPlainText())
    assert "training" in seen
    # the GUI thread only reads small files (JSON, a log tail): milliseconds
    assert np.median(durations) < 0.05 and max(durations) < 0.5, durations
    assert w.progress_bar.maximum() == 2 and w.progress_bar.value() == 2
    assert w.job_label.text().startswith("done · epoch 2/2 · cycle 1/1")
    assert "Epoch 1" in w.log_view.toPlainText()
    # the log box shows progress, not nnU-Net's plans; the full log has them
    assert "data_identifier" not in w.log_view.toPlainText()
    assert "data_identifier" in w.show_log().text.toPlainText()
    w.log_dialog.close()
    assert w.predict_button.isEnabled() and w.start_button.isEnabled()
    assert not w.resume_button.isEnabled() and not w.cancel_button.isEnabled()

    w.predict()
    assert w.wait(180)
    assert "Ensemble of 2 checkpoint(s)" in w.last_status, w.last_status
    assert "nats (0 = all checkpoints agree; 0.69 (ln 2) = a coin flip" \
        in w.last_status, w.last_status
    assert "0.69 (ln 2) = a coin flip between two labels" in w.uncertainty_label.text()
    worst = int(np.argmax(viewer.layers[UNCERTAINTY].data.mean(axis=(1, 2))))
    assert f"Most uncertain slices: z={worst} " in w.last_status, w.last_status
    prob, mask, unc = (viewer.layers[n] for n in (PROBABILITY, MASK, UNCERTAINTY))
    for layer in (prob, mask, unc):
        assert layer.data.shape == stack.shape
        np.testing.assert_allclose(layer.scale, image.scale)
        np.testing.assert_allclose(layer.translate, image.translate)
    assert prob.data.min() >= 0 and prob.data.max() <= 1
    assert unc.data.min() >= 0 and unc.data.max() <= math.log(2) + 1e-6
    assert set(np.unique(mask.data)) <= {0, 1}
    np.testing.assert_array_equal(mask.data > 0, prob.data > 0.5)
    assert list(mask.features["name"]) == ["background", "target"]
    assert tuple(prob.contrast_limits) == (0.0, 1.0)
    assert unc.contrast_limits[1] == pytest.approx(math.log(2))
    assert prob.colormap.name == "magma" and unc.colormap.name == "viridis"
    assert w.review_table.rowCount() == 6                     # the stack's slices

    # an RGB image (grey in colour): 2-D outputs with the spatial scale; the loaded ensemble
    # is reused, and the layers are replaced, not duplicated
    predictor = w.controller.predictor
    n_layers = len(viewer.layers)
    rgb = np.repeat(stack[2][..., None], 3, axis=-1)
    viewer.add_image(rgb, name="photo", rgb=True, scale=(0.5, 0.75), translate=(1.0, 2.0))
    w.image_combo.setCurrentText("photo")
    w.predict()
    assert w.wait(120)
    assert w.controller.predictor is predictor, w.last_status
    assert len(viewer.layers) == n_layers + 1
    for name in (PROBABILITY, MASK, UNCERTAINTY):
        layer = viewer.layers[name]
        assert layer.data.shape == (64, 64)
        np.testing.assert_allclose(layer.scale, (0.5, 0.75))
        np.testing.assert_allclose(layer.translate, (1.0, 2.0))
    assert w.review_table.rowCount() == 1                     # one 2-D image
    # re-running updates the same layers' data
    before = [viewer.layers[n] for n in (PROBABILITY, MASK, UNCERTAINTY)]
    viewer.layers["photo"].data = 255 - rgb
    w.predict()
    assert w.wait(120)
    after = [viewer.layers[n] for n in (PROBABILITY, MASK, UNCERTAINTY)]
    assert all(x is y for x, y in zip(before, after, strict=True))
    assert len(viewer.layers) == n_layers + 1
    assert after[2].contrast_limits[1] == pytest.approx(math.log(2))
    assert after[0].data.min() >= 0 and after[0].data.max() <= 1

    # a widget opened later finds the finished job and its schedule
    w2 = _reopen(viewer, w, {}, dataset_id=7)
    assert w2.folder_edits["raw"].text() == str(folders["raw"])     # remembered
    assert w2.status.phase == "done" and w2.epochs_spin.value() == 2
    assert w2.progress_bar.value() == w2.progress_bar.maximum() == 2
    assert w2.predict_button.isEnabled()


@pytest.fixture(scope="module")
def two_target_model(tmp_path_factory):
    """A tiny (2 epochs, CPU) nnU-Net trained on two-target label maps: dataset 11."""
    from napari_medclipsam.nnunet import job
    from napari_medclipsam.nnunet.export import cases_from_arrays, export_dataset
    from napari_medclipsam.nnunet.schedule import EnsembleSchedule

    root = tmp_path_factory.mktemp("two_targets")
    folders = {k: root / k for k in ("raw", "preprocessed", "results")}
    cases = [c for seed in range(6)
             for c in cases_from_arrays(*_two_disks(seed), f"c{seed}", label_table=TWO)]
    export_dataset(cases, folders["raw"], 11, "TwoDisks", label_table=TWO, verify=False)
    job_dir = job.start_training(
        11, EnsembleSchedule(epochs=2, cycles=1, checkpoints_per_cycle=2,
                             iterations_per_epoch=2, val_iterations_per_epoch=1),
        folders=job.NnUNetFolders.resolve(**folders), device="cpu", data_workers=0)
    status = {}
    try:
        status = job.wait(job_dir, timeout=400)
    finally:
        if status.get("phase") != "done":   # timed out or interrupted: stop it
            job.cancel(job_dir)
    assert status["phase"] == "done", (status, job.tail(job_dir / "log.txt"))
    return folders


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, t=0.0):
        self.t = t

    def __call__(self):
        return self.t


def _click_row(qtbot, table, row):
    from qtpy.QtCore import Qt

    table.scrollToItem(table.item(row, 0))
    rect = table.visualItemRect(table.item(row, 0))
    qtbot.mouseClick(table.viewport(), Qt.LeftButton, pos=rect.center())


def _rows(table):
    return [table.item(r, 0).text() for r in range(table.rowCount())]


def test_two_targets_predict_and_review(make_napari_viewer, two_target_model, qtbot,
                                        tmp_path):
    """A two-target model predicts a named label map; the review queue ranks the slices of
    a 3-slice stack, jumps to them, and Accept/Corrected append cases with their record."""
    folders = two_target_model
    viewer = make_napari_viewer()
    stack = np.stack([_two_disks(seed)[0] for seed in (20, 21, 22)])
    image = viewer.add_image(stack, name="new", scale=SCALE3, translate=TRANSLATE3)
    w = _widget(viewer, folders, dataset_id=11)
    assert w.status.phase == "done" and w.predict_button.isEnabled()
    w.predict()
    assert w.wait(180)
    assert "Classes: 1=dim disk, 2=bright disk" in w.last_status, w.last_status
    assert "1.10 (ln 3, the most) = all 3 labels equally likely" in w.last_status
    assert "ln 3" in w.uncertainty_label.text()
    mask, unc = viewer.layers[MASK], viewer.layers[UNCERTAINTY]
    assert "ln 3" in unc.metadata["description"]
    assert mask.data.shape == stack.shape and set(np.unique(mask.data)) <= {0, 1, 2}
    assert list(mask.features["name"]) == ["background", "dim disk", "bright disk"]
    assert list(mask.features["index"]) == [0, 1, 2]
    assert unc.data.min() >= 0 and unc.data.max() <= math.log(3) + 1e-6
    assert unc.contrast_limits[1] == pytest.approx(math.log(3))
    prob = viewer.layers[PROBABILITY].data
    assert prob.min() >= 0 and prob.max() <= 1 + 1e-6
    np.testing.assert_allclose(prob, w.controller.state.last_prediction.probability)

    # rows: the slices, most uncertain first
    table = w.review_table
    per_slice = unc.data.mean(axis=(1, 2))
    order = [int(z) for z in np.argsort(-per_slice, kind="stable")]
    assert _rows(table) == [f"new z={z}" for z in order]
    assert w.review_box.isExpanded()

    # click the most uncertain row: the viewer jumps to that slice
    clock = Clock(1000.0)
    w.controller.clock = clock
    first = order[0]
    viewer.dims.set_current_step(0, 0 if first else 2)
    step_before = viewer.dims.current_step[0]
    _click_row(qtbot, table, 0)
    assert w.controller.state.current == 0, w.last_status
    assert viewer.dims.current_step[0] != step_before
    assert slice_index(viewer, image) == first
    assert w.accept_button.isEnabled() and w.corrected_button.isEnabled()

    # correct it: two undoable edits of the mask layer (each a napari paint event)
    n_before = json.loads((folders["raw"] / "Dataset011_TwoDisks" / "dataset.json")
                          .read_text())["numTraining"]
    auto = np.array(mask.data[first], copy=True)

    def new_value(rows, cols):  # napari emits no paint event for an edit that changes nothing
        return ((auto[rows, cols].astype(np.int64) + 1) % 3).tolist()  # every pixel changes

    ys, xs = np.mgrid[2:8, 2:8]
    mask.data_setitem((np.full(ys.size, first), ys.ravel(), xs.ravel()),
                      new_value(ys.ravel(), xs.ravel()))
    rows, cols = np.array([60, 60, 61, 61]), np.array([60, 61, 60, 61])
    mask.data_setitem((np.full(4, first), rows, cols), new_value(rows, cols))
    clock.t = 1012.5
    w.corrected_button.click()
    clock.t = 5000.0                                          # the writing is not counted
    assert w.wait(120)
    assert "as corrected" in w.last_status, w.last_status
    folder = folders["raw"] / "Dataset011_TwoDisks"
    ds = json.loads((folder / "dataset.json").read_text())
    assert ds["numTraining"] == n_before + 1
    record = json.loads((folder / "medclipsam_cases.json").read_text())[f"new_z{first:03d}"]
    review = record["review"]
    assert record["corrected"] is True and review["status"] == "corrected"
    assert review["seconds"] == 12.5 and review["edits"] == 2
    final = np.array(mask.data[first])
    values = [v for v in (1, 2) if (auto == v).any() or (final == v).any()]
    dice = np.mean([2 * ((auto == v) & (final == v)).sum()
                    / ((auto == v).sum() + (final == v).sum()) for v in values])
    assert review["dice_auto_final"] == pytest.approx(dice, abs=1e-5) and dice < 1
    assert "corrected" in table.item(0, 2).text()

    # accept the next one as predicted (whatever the layer shows), 3 s after opening it
    clock.t = 2000.0
    _click_row(qtbot, table, 1)
    assert slice_index(viewer, image) == order[1]
    clock.t = 2003.0
    w.accept_button.click()
    assert w.wait(120)
    assert json.loads((folder / "dataset.json").read_text())["numTraining"] == n_before + 2
    review = json.loads((folder / "medclipsam_cases.json").read_text())[
        f"new_z{order[1]:03d}"]["review"]
    assert (review["status"], review["seconds"], review["edits"]) == ("accepted", 3.0, 0)
    assert review["dice_auto_final"] == 1.0
    summary = w.review_summary_label.text()
    assert "2 of" in summary and "50% accepted unmodified" in summary, summary
    assert f"{(12.5 + 3.0) / 2:.1f} s" in summary

    # a folder prediction's ranking: a row opens its image and maps as the three layers
    import imageio.v3 as iio

    from napari_medclipsam.nnunet.ensemble import predict_folder

    images = tmp_path / "images"
    images.mkdir()
    for seed in (30, 31):
        iio.imwrite(images / f"case{seed}_0000.png", _two_disks(seed)[0])
    rows = predict_folder(w.controller.predictor, images, tmp_path / "pred")
    w.load_ranking(tmp_path / "pred", images)
    assert _rows(table) == [r["case"] for r in rows]
    _click_row(qtbot, table, 1)
    assert w.controller.state.current == 1, w.last_status
    source = w.controller.state.review[1].source
    assert source in viewer.layers and viewer.layers[source].data.shape == (64, 64)
    assert viewer.layers[MASK].data.shape == (64, 64)
    assert set(np.unique(viewer.layers[MASK].data)) <= {0, 1, 2}
    assert viewer.layers[UNCERTAINTY].data.mean() == pytest.approx(
        rows[1]["mean_entropy"], rel=1e-4)


def test_cancel_a_running_training(make_napari_viewer, folders, qtbot):
    from napari_medclipsam.nnunet.export import cases_from_arrays, export_dataset

    cases = [c for seed in range(4) for c in cases_from_arrays(*_disk_image(seed), f"c{seed}")]
    export_dataset(cases, folders["raw"], 9, "Cancel", verify=False)
    viewer = make_napari_viewer()
    w = _widget(viewer, folders, dataset_id=9)
    _tiny_schedule(w, epochs=1000, cycles=1, checkpoints=1)
    w.start()
    assert w.status.running, w.last_status
    qtbot.waitUntil(lambda: w.status.phase in ("training", *FINAL), timeout=180_000)
    assert w.status.phase == "training", w.status

    # reopened while it runs: the new widget shows the running job and can cancel it
    w2 = _reopen(viewer, w, folders, dataset_id=9)
    assert w2.status.running and w2.status.phase == "training"
    assert w2.epochs_spin.value() == 1000 and w2.cancel_button.isEnabled()
    pid = w2.status.pid
    assert psutil.pid_exists(pid)
    w2.cancel()
    assert w2.wait(60)
    assert w2.status.phase == "cancelled" and not w2.status.running
    assert "cancelled" in w2.last_status
    assert not psutil.pid_exists(pid)
    assert w2.resume_button.isEnabled() and not w2.cancel_button.isEnabled()
    assert w.refresh_status().phase == "cancelled"
