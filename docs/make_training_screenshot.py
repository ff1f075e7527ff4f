"""Regenerate docs/training_widget.png: the Pseudo-labels & training widget after a tiny CPU run.

    xvfb-run -a -s "-screen 0 1600x1000x24" python docs/make_training_screenshot.py

Head phantom with a hand-made label (the bright skull ring's inner ellipse), exported, trained
4 epochs in 2 cycles (G_d = 2 -> 4 checkpoints, a few iterations each), then predicted.
"""
import sys
import tempfile
import time
from pathlib import Path

import napari
import numpy as np
from qtpy.QtWidgets import QApplication
from superqt import QCollapsible

from napari_medclipsam._io.sample_data import head_phantom
from napari_medclipsam._widgets.training_widget import TrainingWidget

ROOT = Path(__file__).resolve().parents[1]
tmp = Path(tempfile.mkdtemp())
viewer = napari.Viewer(show=True)
viewer.window._qt_window.resize(1400, 950)
[(data, meta)] = head_phantom()
img = (data * 255).astype(np.uint8)
viewer.add_image(img, name="head phantom")
yy, xx = np.mgrid[:400, :400]
label = (((yy - 200) / 150.0) ** 2 + ((xx - 200) / 110.0) ** 2 < 1).astype(np.int32)
viewer.add_labels(label, name="SAM mask [brain]", opacity=0.4)
w = TrainingWidget(viewer)
viewer.window.add_dock_widget(w, name="Pseudo-labels & training", area="right")
for key, edit in w.folder_edits.items():
    edit.setText(str(tmp / key))
w.dataset_spin.setValue(501)
w.name_edit.setText("Phantom")
for c in w.findChildren(QCollapsible):
    c.expand(animate=False)
app = QApplication.instance()
w.export()
w.wait(300)
print(w.last_status)
w.epochs_spin.setValue(4)
w.cycles_spin.setValue(2)
w.checkpoints_spin.setValue(2)
w.iterations_spin.setValue(3)
w.val_iterations_spin.setValue(1)
w.device_combo.setCurrentText("cpu")
w.data_workers = 0
w.start()
t = time.time()
while time.time() - t < 600:
    app.processEvents()
    time.sleep(0.2)
    if w.refresh_status().get("phase") in ("done", "failed", "cancelled", "crashed"):
        break
print(w.last_status, w.status.get("phase"))
w.predict()
w.wait(300)
for _ in range(20):
    app.processEvents()
    time.sleep(0.05)
print(w.last_status, [layer.name for layer in viewer.layers])
viewer.layers["SAM mask [brain]"].visible = False
viewer.layers["nnU-Net probability"].visible = False
viewer.layers["nnU-Net mask"].contour = 2
viewer.reset_view()
for _ in range(20):
    app.processEvents()
    time.sleep(0.05)
viewer.screenshot(str(ROOT / "docs" / "training_widget.png"), canvas_only=False)
sys.exit(0)
