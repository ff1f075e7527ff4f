"""Regenerate the README's screenshots through the same path as the end-to-end GUI test
(tests/gui_session.py): File > Open Sample, the Plugins menu, Run all, edits, accept, and the
training widget. Tiny random-weight models, so the maps themselves mean nothing.

The napari window is sized to a 1366x768 laptop screen (the smallest the docks are made
for), so the pictures show what such a screen shows:

    xvfb-run -a -s "-screen 0 1366x768x24" .venv/bin/python docs/make_screenshots.py [OUT_DIR]
    ... docs/make_screenshots.py [OUT_DIR] --segment-only    # widget.png alone (no training)
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

SCREEN = (1366, 768)


def settle(seconds: float = 0.5) -> None:
    """Turn the event loop a while, so layouts, scroll areas and the canvas catch up."""
    from gui_session import wait_until

    end = time.monotonic() + seconds
    wait_until(lambda: time.monotonic() > end)


def main(out: Path, segment_only: bool = False) -> None:
    import napari
    from gui_session import GuiSession, tiny_pipeline
    from superqt import QCollapsible
    from tiny_clip import write_tiny_clip_dir
    from tiny_sam import save_tiny_sam_checkpoint

    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp())
    clip_dir = write_tiny_clip_dir(tmp / "clip")
    checkpoint = save_tiny_sam_checkpoint(tmp / "sam.pth")
    viewer = napari.Viewer(show=True)
    window = viewer.window._qt_window
    window.move(0, 0)
    window.resize(*SCREEN)  # the whole screen, as a maximised window on that laptop
    shots: dict[str, Path] = {}

    def shot(name: str) -> None:
        settle()
        path = out / f"{name}.png"
        viewer.screenshot(str(path), canvas_only=False)
        shots[name] = path

    s = GuiSession(viewer, tiny_pipeline(clip_dir, checkpoint), shot=lambda name: None)
    s.open_sample()
    w = s.dock_segment()
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
    for section in w.findChildren(QCollapsible):  # the plain-language parameters
        if section.text() == "Advanced":
            section.expand(animate=False)
    settle()
    w.scroll_area.verticalScrollBar().setValue(0)
    shot("widget")
    print(w.last_status)
    if segment_only:
        print({k: str(v) for k, v in shots.items()})
        viewer.close()
        return

    folders = {k: tmp / "nnunet" / k for k in ("raw", "preprocessed", "results")}
    t = s.dock_training(folders, dataset_id=1)
    s.export()
    s.train_tiny()
    s.predict()
    for layer in viewer.layers:
        layer.visible = layer.name in (s.image.name, "nnU-Net uncertainty")
    viewer.window.remove_dock_widget(w)  # the training widget alone on the right
    from qtpy.QtWidgets import QApplication

    viewer.window.resize(1366, 768)  # a laptop screen
    t.export_section.collapse()  # exported: Train, Predict and Review in view
    QApplication.processEvents()
    t.scroll_area.ensureWidgetVisible(t.job_label)
    shot("training_widget")
    print(t.last_status)
    print({k: str(v) for k, v in shots.items()})
    viewer.close()


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    main(Path(args[0]) if args else ROOT / "docs", segment_only="--segment-only" in sys.argv)
