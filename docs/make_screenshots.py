"""Regenerate the README's screenshots through the same path as the end-to-end GUI test
(tests/gui_session.py): File > Open Sample, the Plugins menu, Run all, edits, accept, and the
training widget. Tiny random-weight models, so the maps themselves mean nothing.

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python docs/make_screenshots.py [OUT_DIR]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def main(out: Path) -> None:
    import napari
    from gui_session import GuiSession, tiny_pipeline, wait_until
    from superqt import QCollapsible
    from tiny_clip import write_tiny_clip_dir
    from tiny_sam import save_tiny_sam_checkpoint

    tmp = Path(tempfile.mkdtemp())
    clip_dir = write_tiny_clip_dir(tmp / "clip")
    checkpoint = save_tiny_sam_checkpoint(tmp / "sam.pth")
    viewer = napari.Viewer(show=True)
    viewer.window.resize(1400, 900)
    shots: dict[str, Path] = {}

    def shot(name: str) -> None:
        wait_until(lambda: True)
        path = out / f"{name}.png"
        viewer.screenshot(str(path), canvas_only=False)
        shots[name] = path

    s = GuiSession(viewer, tiny_pipeline(clip_dir, checkpoint), shot=lambda name: None)
    s.open_sample()
    w = s.dock_segment()
    for section in w.findChildren(QCollapsible):
        section.expand(animate=False)
    s.run_all("left lung")
    s.drag_box("left lung", (100, 60, 300, 190))
    sam = s.layer("SAM mask", "left lung")
    sam.data = sam.data * 0
    s.paint(sam, (slice(120, 280), slice(70, 180)))
    s.accept()
    s.run_all("right lung")
    sam = s.layer("SAM mask", "right lung")
    sam.data = sam.data * 0
    s.paint(sam, (slice(120, 280), slice(220, 330)))
    s.accept()
    for layer in viewer.layers:
        layer.visible = layer.name in (s.image.name, "label map", "boxes [right lung]")
    shot("widget")

    folders = {k: tmp / "nnunet" / k for k in ("raw", "preprocessed", "results")}
    t = s.dock_training(folders, dataset_id=1)
    s.export()
    s.train_tiny()
    s.predict()
    for layer in viewer.layers:
        layer.visible = layer.name in (s.image.name, "nnU-Net uncertainty")
    viewer.window.remove_dock_widget(w)  # the training widget alone on the right
    from qtpy.QtWidgets import QScrollArea

    for area in t.findChildren(QScrollArea):  # show the status, Predict and Review
        area.verticalScrollBar().setValue(area.verticalScrollBar().maximum())
    shot("training_widget")
    print(t.last_status)
    print({k: str(v) for k, v in shots.items()})
    viewer.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs")
