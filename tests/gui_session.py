"""A whole napari session walked the way a person does it, step by step.

Used by ``tests/test_gui_session.py`` (asserting after every step) and by
``docs/make_screenshots.py`` (the README's pictures come from this same path). Every widget
is opened from the Plugins menu (npe2 manifest, napari's viewer injection), the image from
File > Open Sample; only the models are tiny test models (``set_pipeline``), since real
weights cannot be downloaded where the tests run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from napari_helpers import PLUGIN, SEGMENT


def wait_until(predicate: Callable[[], bool], timeout: float = 300.0) -> None:
    """Turn the Qt event loop until ``predicate()`` holds; TimeoutError after ``timeout``."""
    from qtpy.QtWidgets import QApplication

    app = QApplication.instance()
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise TimeoutError(f"still waiting after {timeout:.0f} s")
        app.processEvents()
        time.sleep(0.01)
    app.processEvents()


def tiny_pipeline(clip_dir: str | Path, sam_checkpoint: str | Path, steps: int = 3):
    """The chain on the tiny random-weight CLIP and SAM of the tests."""
    from tiny_pipeline import build_tiny_pipeline

    return build_tiny_pipeline(clip_dir, sam_checkpoint, steps=steps)


class GuiSession:
    """One user's session in ``viewer``; ``shot(name)`` (optional) is called after each
    visible step, e.g. to save a screenshot."""

    def __init__(self, viewer, pipeline, shot: Callable[[str], None] | None = None):
        self.viewer = viewer
        self.pipeline = pipeline
        self.shot = shot or (lambda name: None)
        self.segment = None
        self.training = None
        self.image = None

    # -- text-prompt segmentation ----------------------------------------------------
    def open_sample(self, key: str = "head_phantom"):
        """File > Open Sample > MedCLIP-SAM > ``key``."""
        [self.image] = self.viewer.open_sample(PLUGIN, key)
        return self.image

    def dock_segment(self):
        """Plugins > MedCLIP-SAM > Text-prompt segmentation (with the tiny models)."""
        _, self.segment = self.viewer.window.add_plugin_dock_widget(PLUGIN, SEGMENT)
        self.segment.set_pipeline(self.pipeline)
        return self.segment

    def run_all(self, prompt: str) -> None:
        """Type the prompt, press Run all, wait for the result."""
        w = self.segment
        w.prompt_edit.setPlainText(prompt)
        w.run_button.click()
        wait_until(lambda: not w.running)
        self.shot(f"run_{prompt}")

    def layer(self, kind: str, target: str):
        return self.viewer.layers[f"{kind} [{target}]"]

    def drag_box(self, target: str, box_rc: tuple[float, float, float, float]) -> None:
        """Replace the target's box by the rectangle (row0, col0, row1, col1), as a drag does;
        waits for SAM to re-run."""
        w = self.segment
        before = w.refine_count
        r0, c0, r1, c1 = box_rc
        self.layer("boxes", target).data = [np.array([[r0, c0], [r0, c1], [r1, c1], [r1, c0]],
                                                     float)]
        wait_until(lambda: w.refine_count > before, timeout=30)

    def paint(self, layer, region: tuple[slice, ...], value: int = 1) -> None:
        """Paint ``value`` into ``region`` of a Labels layer through napari's undoable path."""
        mask = np.zeros(layer.data.shape, bool)
        mask[region] = True
        layer.data_setitem(np.nonzero(mask), value)

    def boxes_from_mask(self) -> None:
        w = self.segment
        before = w.refine_count
        w.mask_button.click()
        wait_until(lambda: w.refine_count > before, timeout=30)

    def accept(self) -> None:
        self.segment.accept_button.click()
        self.shot("accepted")

    def save_mask(self, path: str | Path) -> list[Path]:
        """Save mask... with ``path`` typed in the file dialog; returns the files written."""
        written = self.segment.save_mask(path)
        assert written, self.segment.last_status
        return written

    # -- pseudo-labels & training ------------------------------------------------------
    def dock_training(self, folders: dict[str, Path], dataset_id: int = 1):
        """Plugins > MedCLIP-SAM > Pseudo-labels & training; the nnU-Net folders typed in."""
        from napari_helpers import TRAINING

        _, self.training = self.viewer.window.add_plugin_dock_widget(PLUGIN, TRAINING)
        for key, path in folders.items():
            self.training.folder_edits[key].setText(str(path))
        self.training.dataset_spin.setValue(dataset_id)
        return self.training

    def export(self, labels: str = "label map") -> None:
        t = self.training
        t.image_combo.setCurrentText(self.image.name)
        t.labels_combo.setCurrentText(labels)
        t.corrected_check.setChecked(True)
        t.export_button.click()
        assert t.wait(300), "export timed out"
        self.shot("exported")

    def train_tiny(self, timeout: float = 600) -> None:
        """A tiny schedule (2 epochs, 2 checkpoints, 2 iterations each) on the CPU; waits
        until the background job is done, failed or cancelled."""
        t = self.training
        t.epochs_spin.setValue(2)
        t.cycles_spin.setValue(1)
        t.checkpoints_spin.setValue(2)
        t.iterations_spin.setValue(2)
        t.val_iterations_spin.setValue(1)
        t.device_combo.setCurrentText("cpu")
        t.data_workers = 0
        t.start_button.click()
        wait_until(lambda: t.refresh_status().phase in ("done", "failed", "cancelled",
                                                        "crashed"), timeout=timeout)
        self.shot("trained")

    def predict(self) -> None:
        t = self.training
        t.image_combo.setCurrentText(self.image.name)
        t.predict_button.click()
        assert t.wait(300), "prediction timed out"
        self.shot("predicted")
