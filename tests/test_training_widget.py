"""The "Pseudo-labels & training" dock widget driven in a real napari viewer: export from
layers, a real (tiny, CPU) nnU-Net checkpoint-ensemble training in the background, ensemble
prediction layers, and cancelling a running training.

Needs a display with OpenGL: pytest-xvfb starts Xvfb (apt: xvfb, libgl1-mesa-dri, ...).
"""

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("qtpy.QtWidgets", exc_type=ImportError)
pytest.importorskip("nnunetv2")
psutil = pytest.importorskip("psutil")

from napari_medclipsam._widgets.training_widget import (  # noqa: E402
    MASK,
    PROBABILITY,
    UNCERTAINTY,
    TrainingWidget,
    label_name_from_layer,
    status_line,
)
from napari_medclipsam.nnunet.job import format_eta  # noqa: E402

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


def _widget(viewer, folders, dataset_id=1) -> TrainingWidget:
    w = TrainingWidget(viewer)
    viewer.window.add_dock_widget(w, name="Pseudo-labels & training")
    for key, path in folders.items():
        w.folder_edits[key].setText(str(path))
    w.dataset_spin.setValue(dataset_id)
    return w


def _tiny_schedule(w: TrainingWidget, epochs=2, cycles=1, checkpoints=2) -> None:
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


def test_status_line_and_helpers():
    assert format_eta(None) == "" and format_eta(9.4) == "9 s"
    assert format_eta(760) == "12 min 40 s" and format_eta(3 * 3600 + 300) == "3 h 05 min"
    line = status_line({"phase": "training", "running": True, "epoch": 3, "epochs": 600,
                        "cycle": 1, "cycles": 3, "train_loss": 0.51234, "pseudo_dice": 0.7,
                        "eta_s": 125})
    assert line == ("training · epoch 3/600 · cycle 1/3 · loss 0.5123 · pseudo-Dice 0.700 · "
                    "ETA 2 min 05 s")
    assert "Boom" in status_line({"phase": "failed", "error": "Boom", "running": False})
    assert "Resume" in status_line({"phase": "crashed", "running": False})
    assert label_name_from_layer("SAM mask [breast tumor +1]") == "breast tumor"
    assert label_name_from_layer("mask") is None


def test_export_from_layers(make_napari_viewer, folders):
    viewer = make_napari_viewer()
    img, mask = _disk_image(0)
    viewer.add_image(img, name="scan", scale=(0.5, 0.5))
    viewer.add_labels(mask.astype(np.int32) * 3, name="SAM mask [a disk]")
    w = TrainingWidget(viewer)
    viewer.window.add_dock_widget(w, name="Pseudo-labels & training")
    assert w.image_combo.currentText() == "scan"
    assert w.labels_combo.currentText() == "SAM mask [a disk]"
    assert w.label_edit.text() == "a disk"          # suggested from the prompt
    assert w.corrected_check.isChecked()
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
    saved = json.loads(TrainingWidget.settings_path().read_text())
    assert saved["folders"]["raw"] == str(folders["raw"]) and saved["dataset_id"] == 3


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
    assert w.job_dir is not None and w.status["running"]
    assert w._timer.isActive() and not w.start_button.isEnabled()
    assert w.cancel_button.isEnabled()

    durations, seen = [], set()
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        qtbot.wait(300)
        t0 = time.perf_counter()
        status = w.refresh_status()
        durations.append(time.perf_counter() - t0)
        seen.add(status["phase"])
        if status["phase"] in FINAL:
            break
    assert status["phase"] == "done", (status, w.log_view.toPlainText())
    assert "training" in seen
    # the GUI thread only reads small files (JSON, a log tail): milliseconds
    assert np.median(durations) < 0.05 and max(durations) < 0.5, durations
    assert w.progress_bar.maximum() == 2 and w.progress_bar.value() == 2
    assert w.job_label.text().startswith("done · epoch 2/2 · cycle 1/1")
    assert "Epoch 1" in w.log_view.toPlainText()
    assert w.predict_button.isEnabled() and w.start_button.isEnabled()
    assert not w.resume_button.isEnabled() and not w.cancel_button.isEnabled()

    w.predict()
    assert w.wait(180)
    assert "Ensemble of 2 checkpoint(s)" in w.last_status, w.last_status
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
    assert tuple(prob.contrast_limits) == (0.0, 1.0)
    assert unc.contrast_limits[1] == pytest.approx(math.log(2))
    assert prob.colormap.name == "magma" and unc.colormap.name == "viridis"

    # an RGB image (grey in colour): 2-D outputs with the spatial scale; the loaded ensemble
    # is reused, and the layers are replaced, not duplicated
    predictor = w._predictor
    n_layers = len(viewer.layers)
    rgb = np.repeat(stack[2][..., None], 3, axis=-1)
    viewer.add_image(rgb, name="photo", rgb=True, scale=(0.5, 0.75), translate=(1.0, 2.0))
    w.image_combo.setCurrentText("photo")
    w.predict()
    assert w.wait(120)
    assert w._predictor is predictor, w.last_status
    assert len(viewer.layers) == n_layers + 1
    for name in (PROBABILITY, MASK, UNCERTAINTY):
        layer = viewer.layers[name]
        assert layer.data.shape == (64, 64)
        np.testing.assert_allclose(layer.scale, (0.5, 0.75))
        np.testing.assert_allclose(layer.translate, (1.0, 2.0))
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
    w2 = _widget(viewer, {}, dataset_id=7)
    assert w2.folder_edits["raw"].text() == str(folders["raw"])     # remembered
    assert w2.status["phase"] == "done" and w2.epochs_spin.value() == 2
    assert w2.progress_bar.value() == w2.progress_bar.maximum() == 2
    assert w2.predict_button.isEnabled()


def test_cancel_a_running_training(make_napari_viewer, folders, qtbot):
    from napari_medclipsam.nnunet.export import cases_from_arrays, export_dataset

    cases = [c for seed in range(4) for c in cases_from_arrays(*_disk_image(seed), f"c{seed}")]
    export_dataset(cases, folders["raw"], 9, "Cancel", verify=False)
    viewer = make_napari_viewer()
    w = _widget(viewer, folders, dataset_id=9)
    _tiny_schedule(w, epochs=1000, cycles=1, checkpoints=1)
    w.start()
    assert w.status["running"], w.last_status
    qtbot.waitUntil(lambda: w.status["phase"] in ("training", *FINAL), timeout=180_000)
    assert w.status["phase"] == "training", w.status

    # reopened while it runs: the new widget shows the running job and can cancel it
    w2 = _widget(viewer, folders, dataset_id=9)
    assert w2.status["running"] and w2.status["phase"] == "training"
    assert w2.epochs_spin.value() == 1000 and w2.cancel_button.isEnabled()
    pid = w2.status["pid"]
    assert psutil.pid_exists(pid)
    w2.cancel()
    assert w2.wait(60)
    assert w2.status["phase"] == "cancelled" and not w2.status["running"]
    assert "cancelled" in w2.last_status
    assert not psutil.pid_exists(pid)
    assert w2.resume_button.isEnabled() and not w2.cancel_button.isEnabled()
    assert w.refresh_status()["phase"] == "cancelled"
