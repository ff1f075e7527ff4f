"""Regenerate docs/widget.png: the widget docked in napari on the sample image, tiny models.

    xvfb-run -a -s "-screen 0 1600x1000x24" python docs/make_screenshot.py
"""
import sys, tempfile
from pathlib import Path
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import napari
from qtpy.QtWidgets import QApplication
from tiny_clip import write_tiny_clip_dir
from tiny_sam import save_tiny_sam_checkpoint, build_tiny_sam
from napari_medclipsam.core.config import PipelineConfig, SaliencyConfig
from napari_medclipsam.core.models import load_clip, load_sam
from napari_medclipsam.core.pipeline import ZeroShotPipeline
from napari_medclipsam._widgets.segment_widget import SegmentWidget
from napari_medclipsam._io.sample_data import head_phantom

tmp = Path(tempfile.mkdtemp())
clip_dir = write_tiny_clip_dir(tmp / "clip"); ckpt = save_tiny_sam_checkpoint(tmp / "sam.pth")
cfg = PipelineConfig(clip_model=f"local-dir:{clip_dir}", device="cpu",
                     saliency=SaliencyConfig(layer=2, steps=3, batch_size=2))
pipe = ZeroShotPipeline(cfg, clip=load_clip(cfg.clip_model, "cpu"),
                        sam=load_sam("vit_b", ckpt, "cpu", builder=build_tiny_sam))
viewer = napari.Viewer(show=True)
viewer.window._qt_window.resize(1400, 900)
[(data, meta)] = head_phantom()
viewer.add_image(data, **meta)
w = SegmentWidget(viewer, pipeline=pipe)
viewer.window.add_dock_widget(w, name="Text-prompt segmentation", area="right")
w.preset_combo.setCurrentText("brain tumor (MRI)")
w.layer_spin.setValue(2)
w.steps_spin.setValue(3)
from superqt import QCollapsible
for c in w.findChildren(QCollapsible):
    c.expand(animate=False)
w.run_all()
app = QApplication.instance()
import time
t = time.time()
while w.running and time.time() - t < 120:
    app.processEvents(); time.sleep(0.05)
for _ in range(20):
    app.processEvents(); time.sleep(0.05)
print(w.last_status, [l.name for l in viewer.layers])
viewer.screenshot(str(ROOT / "docs" / "widget.png"), canvas_only=False)
