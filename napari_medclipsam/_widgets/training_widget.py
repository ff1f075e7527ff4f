"""The "Pseudo-labels & training" dock widget (MedCLIP-SAMv2's weak-supervision stage).

Three steps, each a call into :mod:`napari_medclipsam.nnunet` (this module is GUI only):

1. **Export**: an image layer and its (hand-corrected) Labels layer become cases of a raw
   nnU-Net v2 dataset (:func:`~napari_medclipsam.nnunet.export.export_dataset`, in a worker
   thread). A 3-D stack can go in as 2-D slices (only the labelled ones), as the paper trains a
   2-D nnU-Net.
2. **Train**: :func:`~napari_medclipsam.nnunet.job.start_training` starts planning,
   preprocessing and checkpoint-ensembling training in a background process that outlives
   napari. A 1 s ``QTimer`` reads its ``status.json`` and log tail (cheap: a JSON file and the
   end of a text file) and shows phase, epoch, cycle, loss, pseudo-Dice and ETA. A widget
   opened later on the same folders and dataset picks the job up again.
3. **Predict**: the ensemble of saved checkpoints segments the chosen image (in a worker) and
   three layers overlay it with the image's scale and translate: ``nnU-Net probability``,
   ``nnU-Net mask`` and ``nnU-Net uncertainty`` (entropy in nats, 0 to ln C).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import QTimer, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)
from superqt import QCollapsible

from napari_medclipsam._widgets.common import avoid_triton_llvm_clash  # noqa: F401
from napari_medclipsam.core.errors import InputError
from napari_medclipsam.nnunet.job import ENV_NAMES, format_status

if TYPE_CHECKING:
    import napari

DEVICES = ("auto", "cpu", "cuda", "mps")
CONFIGURATIONS = ("2d", "3d_fullres")
FOLDER_KEYS = ("raw", "preprocessed", "results")
PROBABILITY, MASK, UNCERTAINTY = "nnU-Net probability", "nnU-Net mask", "nnU-Net uncertainty"
OUTPUT_LAYERS = (PROBABILITY, MASK, UNCERTAINTY)
FINAL_PHASES = ("done", "failed", "cancelled", "crashed")
RESUMABLE_PHASES = ("cancelled", "crashed", "failed")
SETTINGS_FILE = "training_widget.json"


def status_line(status: dict) -> str:
    """``phase · epoch e/E · cycle c/D · loss · pseudo-Dice · ETA`` (known parts only)."""
    phase = status.get("phase", "none")
    if phase == "none":
        return "No training for this dataset yet."
    line = format_status(status, sep=" · ")
    if phase == "failed" and status.get("error"):
        line += f"\n{status['error']}"
    elif phase == "crashed":
        line += "\nThe training process is gone (crash, reboot, killed): press Resume."
    return line


def label_name_from_layer(name: str) -> str | None:
    """``'SAM mask [breast tumor +1]'`` -> ``'breast tumor'`` (the prompt), else None."""
    m = re.search(r"\[(.+?)(?: \+\d+)?\]$", name)
    return m.group(1).strip() or None if m else None


class TrainingWidget(QWidget):
    """Dock widget: export pseudo-labels, train the checkpoint ensemble, predict with it.

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer
        Passed by napari when the widget is opened from the Plugins menu.

    Attributes
    ----------
    job_dir : Path or None
        The training job shown (``$nnUNet_results/Dataset.../medclipsam_job``).
    last_status : str
        The last message shown in the status label (tests read it).
    status : dict
        The last :func:`~napari_medclipsam.nnunet.job.read_status` result.
    data_workers : int or None
        nnU-Net's augmentation processes for the next start (None: nnU-Net's choice); the
        "Data workers" field sets it.
    """

    _message = Signal(str)

    def __init__(self, napari_viewer: napari.viewer.Viewer):
        super().__init__()
        self.viewer = viewer = napari_viewer
        self.job_dir: Path | None = None
        self.status: dict[str, Any] = {"phase": "none", "running": False}
        self.last_status = ""
        self.lr_min = 1e-4
        self._worker = None
        self._predictor = None
        self._predictor_key: tuple | None = None
        self._label_name_edited = False
        self.last_export = None

        self._build_ui()
        self._message.connect(self._report)
        self._timer = QTimer(self)
        self._timer.setInterval(1000)
        self._timer.timeout.connect(self.refresh_status)

        for event in (viewer.layers.events.inserted, viewer.layers.events.removed):
            event.connect(self._refresh_layers)
        self._refresh_layers()
        self.load_settings()
        if not all(edit.text().strip() for edit in self.folder_edits.values()):
            self.folders_box.expand(animate=False)  # still to be set
        self.locate_job()

    # ----------------------------------------------------------------------- UI
    def _build_ui(self) -> None:
        layout = QVBoxLayout(self)

        data = QGroupBox("Pseudo-labels")
        form = QFormLayout(data)
        self.image_combo = QComboBox()
        self.image_combo.currentTextChanged.connect(self._on_image_changed)
        form.addRow("Image", self.image_combo)
        self.labels_combo = QComboBox()
        self.labels_combo.setToolTip("The mask to train on (e.g. the corrected SAM mask); "
                                     "every label value > 0 is the target.")
        self.labels_combo.currentTextChanged.connect(self._on_labels_changed)
        form.addRow("Labels", self.labels_combo)
        self.corrected_check = QCheckBox("corrected by hand")
        self.corrected_check.setChecked(True)
        self.corrected_check.setToolTip("Recorded per case in medclipsam_cases.json (corrected "
                                        "masks vs raw zero-shot ones).")
        form.addRow(self.corrected_check)
        self.slices_check = QCheckBox("export as 2D slices (labelled slices only)")
        self.slices_check.setChecked(True)
        self.slices_check.setToolTip("For a 3-D stack: one 2-D case per slice that has a label "
                                     "(the paper trains a 2-D nnU-Net). Unchecked: one volume.")
        form.addRow(self.slices_check)
        layout.addWidget(data)

        self.folders_box = QCollapsible("nnU-Net folders")
        folders = QWidget()
        fform = QFormLayout(folders)
        self.folder_edits: dict[str, QLineEdit] = {}
        for key in FOLDER_KEYS:
            edit = QLineEdit(os.environ.get(ENV_NAMES[key], ""))
            edit.setPlaceholderText(f"${ENV_NAMES[key]}")
            edit.editingFinished.connect(self.locate_job)
            browse = QPushButton("...")
            browse.setFixedWidth(30)
            browse.clicked.connect(lambda _=False, k=key: self._browse(k))
            row = QHBoxLayout()
            row.addWidget(edit)
            row.addWidget(browse)
            fform.addRow(key.capitalize(), row)
            self.folder_edits[key] = edit
        self.folders_box.addWidget(folders)
        layout.addWidget(self.folders_box)

        dataset = QGroupBox("Dataset")
        dform = QFormLayout(dataset)
        self.dataset_spin = QSpinBox()
        self.dataset_spin.setRange(1, 999)
        self.dataset_spin.setValue(1)
        self.dataset_spin.valueChanged.connect(self.locate_job)
        dform.addRow("Dataset ID", self.dataset_spin)
        self.name_edit = QLineEdit("MedClipSam")
        self.name_edit.setToolTip("Letters, digits, '_' and '-': Dataset{ID:03d}_{name}")
        dform.addRow("Name", self.name_edit)
        self.label_edit = QLineEdit("target")
        self.label_edit.setToolTip("Name of label 1 in dataset.json")
        self.label_edit.textEdited.connect(self._on_label_edited)
        dform.addRow("Label name", self.label_edit)
        self.append_check = QCheckBox("append to existing dataset")
        self.append_check.setToolTip("Add this image as new case(s) to the dataset with this "
                                     "ID; existing cases are never overwritten.")
        dform.addRow(self.append_check)
        self.export_button = QPushButton("Export")
        self.export_button.clicked.connect(self.export)
        dform.addRow(self.export_button)
        layout.addWidget(dataset)

        schedule = QGroupBox("Schedule")
        sform = QFormLayout(schedule)
        self.epochs_spin = self._int_spin(1, 100_000, 600)
        sform.addRow("Epochs", self.epochs_spin)
        self.cycles_spin = self._int_spin(1, 1000, 3)
        sform.addRow("Cycles", self.cycles_spin)
        self.checkpoints_spin = self._int_spin(1, 100_000, 10)
        sform.addRow("Checkpoints per cycle", self.checkpoints_spin)
        self.iterations_spin = self._int_spin(1, 1_000_000, 250)
        sform.addRow("Iterations per epoch", self.iterations_spin)
        self.val_iterations_spin = self._int_spin(0, 1_000_000, 50)
        sform.addRow("Validation iterations", self.val_iterations_spin)
        self.lr_spin = QDoubleSpinBox()
        self.lr_spin.setDecimals(5)
        self.lr_spin.setRange(1e-5, 10.0)
        self.lr_spin.setSingleStep(0.001)
        self.lr_spin.setValue(0.01)
        self.lr_spin.setToolTip("Learning rate at the start of each cycle (cosine down to "
                                "1e-4 at its end)")
        sform.addRow("Learning rate", self.lr_spin)
        self.device_combo = QComboBox()
        self.device_combo.addItems(DEVICES)
        sform.addRow("Device", self.device_combo)
        self.configuration_combo = QComboBox()
        self.configuration_combo.addItems(CONFIGURATIONS)
        self.configuration_combo.setToolTip("2d: the paper's (and the one for exported slices)")
        sform.addRow("Configuration", self.configuration_combo)
        self.workers_spin = self._int_spin(-1, 64, -1)
        self.workers_spin.setSpecialValueText("auto")
        self.workers_spin.setToolTip("nnU-Net's data-augmentation processes; 0 augments in the "
                                     "training process, auto is nnU-Net's choice")
        sform.addRow("Data workers", self.workers_spin)
        layout.addWidget(schedule)

        train = QGroupBox("Training")
        tlayout = QVBoxLayout(train)
        self.restart_check = QCheckBox("start over (deletes previous training)")
        tlayout.addWidget(self.restart_check)
        buttons = QHBoxLayout()
        self.start_button = QPushButton("Start")
        self.start_button.clicked.connect(self.start)
        self.resume_button = QPushButton("Resume")
        self.resume_button.clicked.connect(self.resume)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.clicked.connect(self.cancel)
        for button in (self.start_button, self.resume_button, self.cancel_button):
            buttons.addWidget(button)
        tlayout.addLayout(buttons)
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(0)
        self.progress_bar.setFormat("%v/%m epochs")
        tlayout.addWidget(self.progress_bar)
        self.job_label = QLabel("")
        self.job_label.setWordWrap(True)
        tlayout.addWidget(self.job_label)
        self.log_view = QPlainTextEdit()
        self.log_view.setReadOnly(True)
        self.log_view.setMaximumBlockCount(500)
        self.log_view.setFixedHeight(110)
        self.log_view.setPlaceholderText("training log")
        tlayout.addWidget(self.log_view)
        layout.addWidget(train)

        self.predict_button = QPushButton("Predict on current image")
        self.predict_button.setToolTip("Ensemble of the saved checkpoints: probability, mask "
                                       "and uncertainty (entropy) layers")
        self.predict_button.clicked.connect(self.predict)
        layout.addWidget(self.predict_button)

        self.status_label = QLabel("")
        self.status_label.setWordWrap(True)
        layout.addWidget(self.status_label)
        layout.addStretch()
        self._update_buttons()

    def showEvent(self, event) -> None:  # noqa: N802 (Qt's name)
        super().showEvent(event)
        self.refresh_status()  # restarts the polling if a job exists

    def hideEvent(self, event) -> None:  # noqa: N802 (Qt's name)
        super().hideEvent(event)
        self._timer.stop()  # a closed dock widget does not poll

    @staticmethod
    def _int_spin(low: int, high: int, value: int) -> QSpinBox:
        spin = QSpinBox()
        spin.setRange(low, high)
        spin.setValue(value)
        return spin

    def _browse(self, key: str) -> None:
        path = QFileDialog.getExistingDirectory(self, f"nnU-Net {key} folder",
                                                self.folder_edits[key].text())
        if path:
            self.folder_edits[key].setText(path)
            self.locate_job()

    def _refresh_layers(self, event=None) -> None:
        from napari.layers import Image, Labels

        images = [layer.name for layer in self.viewer.layers
                  if isinstance(layer, Image) and layer.name not in OUTPUT_LAYERS
                  and not layer.name.startswith("saliency [")]
        labels = [layer.name for layer in self.viewer.layers
                  if isinstance(layer, Labels) and layer.name != MASK]
        # the SAM mask is the usual thing to correct and train on: offer it first
        labels.sort(key=lambda n: not n.startswith("SAM mask ["))
        for combo, names in ((self.image_combo, images), (self.labels_combo, labels)):
            current = combo.currentText()
            combo.blockSignals(True)
            combo.clear()
            combo.addItems(names)
            if current in names:
                combo.setCurrentText(current)
            combo.blockSignals(False)
        self._on_image_changed()
        self._on_labels_changed()

    def _on_image_changed(self, *_) -> None:
        layer = self._layer(self.image_combo.currentText())
        stack = (layer is not None and not layer.rgb and not layer.multiscale
                 and layer.ndim == 3)
        self.slices_check.setEnabled(stack)

    def _on_label_edited(self, text: str) -> None:
        self._label_name_edited = bool(text.strip())

    def _on_labels_changed(self, *_) -> None:
        if self._label_name_edited:
            return
        suggested = label_name_from_layer(self.labels_combo.currentText())
        if suggested:
            self.label_edit.setText(suggested)

    def _layer(self, name: str):
        return self.viewer.layers[name] if name and name in self.viewer.layers else None

    # ----------------------------------------------------------------------- helpers
    def _report(self, message: str, error: bool = False) -> None:
        self.last_status = message
        self.status_label.setText(message)
        if error:
            from napari.utils.notifications import show_error

            show_error(message)

    @property
    def busy(self) -> bool:
        """True while an export, cancel or prediction runs in a worker thread."""
        return self._worker is not None

    def wait(self, timeout: float = 120.0) -> bool:
        """Process Qt events until the worker is done (tests and scripts); False on timeout."""
        from qtpy.QtWidgets import QApplication

        end = time.monotonic() + timeout
        while self.busy:
            if time.monotonic() > end:
                return False
            QApplication.processEvents()
            time.sleep(0.01)
        QApplication.processEvents()
        return True

    def _launch(self, func, *args, on_done) -> None:
        """Run ``func(*args)`` (returns ``(kind, payload)``, never raises) in a worker."""
        from napari.qt.threading import create_worker

        self._worker = create_worker(self._guarded, func, *args, _start_thread=False)
        self._worker.returned.connect(on_done)
        self._worker.errored.connect(
            lambda exc: self._report(f"Unexpected error: {type(exc).__name__}: {exc}",
                                     error=True))
        self._worker.finished.connect(self._on_finished)
        self._update_buttons()
        self._worker.start()

    @staticmethod
    def _guarded(func, *args) -> tuple[str, Any]:
        try:
            return "ok", func(*args)
        except (InputError, ValueError, OSError, RuntimeError) as exc:
            return "error", str(exc)
        except Exception as exc:  # a bug: report it, never crash napari
            traceback.print_exc()
            return "error", f"Unexpected error: {type(exc).__name__}: {exc}"

    def _on_finished(self) -> None:
        self._worker = None
        self._update_buttons()

    def folders(self):
        """:class:`~napari_medclipsam.nnunet.job.NnUNetFolders` from the fields (empty fields
        fall back to the ``nnUNet_*`` environment variables)."""
        from napari_medclipsam.nnunet.job import NnUNetFolders

        given = {k: self.folder_edits[k].text().strip() or None for k in FOLDER_KEYS}
        missing = [k for k in FOLDER_KEYS if not (given[k] or os.environ.get(ENV_NAMES[k]))]
        if missing:
            names = (missing[0] if len(missing) == 1
                     else f"{', '.join(missing[:-1])} and {missing[-1]}")
            raise InputError(f"Set nnU-Net's {names} folder(s) under "
                             "'nnU-Net folders' (or the nnUNet_raw/_preprocessed/_results "
                             "environment variables).")
        return NnUNetFolders.resolve(**given)

    def schedule(self):
        """The :class:`~napari_medclipsam.nnunet.schedule.EnsembleSchedule` of the fields."""
        from napari_medclipsam.nnunet.schedule import EnsembleSchedule

        lr = self.lr_spin.value()
        return EnsembleSchedule(
            epochs=self.epochs_spin.value(), cycles=self.cycles_spin.value(),
            checkpoints_per_cycle=self.checkpoints_spin.value(), lr_max=lr,
            lr_min=min(self.lr_min, lr), iterations_per_epoch=self.iterations_spin.value(),
            val_iterations_per_epoch=self.val_iterations_spin.value())

    @property
    def data_workers(self) -> int | None:
        value = self.workers_spin.value()
        return None if value < 0 else value

    @data_workers.setter
    def data_workers(self, value: int | None) -> None:
        self.workers_spin.setValue(-1 if value is None else int(value))

    # ----------------------------------------------------------------------- export
    def export(self) -> None:
        """Export the chosen image and labels as case(s) of the dataset (in a worker)."""
        if self.busy:
            return
        from napari_medclipsam.nnunet.export import cases_from_arrays, export_dataset

        try:
            image_layer = self._layer(self.image_combo.currentText())
            labels_layer = self._layer(self.labels_combo.currentText())
            if image_layer is None:
                raise InputError("Choose an image layer first.")
            if labels_layer is None:
                raise InputError("Choose the Labels layer with the (corrected) mask: run the "
                                 "text-prompt segmentation, or paint one.")
            if image_layer.multiscale:
                raise InputError("Multiscale images cannot be exported; open a single-scale "
                                 "image.")
            folders = self.folders()
            dataset_id = self.dataset_spin.value()
            name = self.name_edit.text().strip()
            label_name = self.label_edit.text().strip() or "target"
            ndim = image_layer.ndim  # spatial axes (RGB's channel axis excluded)
            spacing = tuple(float(s) for s in image_layer.scale[-ndim:])
            origin = tuple(float(t) for t in image_layer.translate[-ndim:])
            # copy the labels: painting during the export must not change what is written
            labels = np.array(labels_layer.data, copy=True)
            cases = cases_from_arrays(
                np.asarray(image_layer.data), labels, image_layer.name, spacing=spacing,
                origin=origin, corrected=self.corrected_check.isChecked(),
                as_slices=self.slices_check.isEnabled() and self.slices_check.isChecked(),
                rgb=bool(image_layer.rgb))
        except InputError as exc:
            self._report(str(exc), error=True)
            return
        append = self.append_check.isChecked()
        self.save_settings()
        self._report(f"Exporting {len(cases)} case(s) (nnU-Net checks the dataset)...")

        def run():
            def progress(done, total):
                self._message.emit(f"Exporting case {done}/{total or '?'}...")

            return export_dataset(cases, folders.raw, dataset_id, name, label_name=label_name,
                                  append=append, progress=progress)

        self._launch(run, on_done=self._on_exported)

    def _on_exported(self, out: tuple[str, Any]) -> None:
        kind, payload = out
        if kind == "error":
            self._report(payload, error=True)
            return
        self.last_export = payload
        verb = "Added" if payload.appended else "Exported"
        self._report(f"{verb} {len(payload.cases)} case(s) ({payload.n_corrected} corrected, "
                     f"{payload.n_zero_shot} zero-shot) to {payload.folder}."
                     + (" Converted to the dataset's channels: " + ", ".join(payload.converted)
                        if payload.converted else ""))
        self.locate_job()

    # ----------------------------------------------------------------------- training
    def locate_job(self, *_) -> Path | None:
        """Find this dataset's training job (if any) and show its status."""
        from napari_medclipsam.nnunet.job import job_dir_for

        try:
            job_dir = job_dir_for(self.folders(), self.dataset_spin.value())
        except InputError:
            job_dir = None
        if job_dir != self.job_dir:
            self.job_dir = job_dir
            if job_dir is not None and (job_dir / "job.json").is_file():
                self._fields_from_job(job_dir)
        self.refresh_status()
        return self.job_dir

    def _fields_from_job(self, job_dir: Path) -> None:
        """Show the schedule and device a job was started with (so Resume matches it)."""
        try:
            job = json.loads((job_dir / "job.json").read_text())
        except (OSError, ValueError):
            return
        self._apply_run_fields(job)

    def _apply_run_fields(self, run: dict[str, Any]) -> None:
        """Schedule, device, configuration and data workers from a job.json or settings."""
        sched = run.get("schedule") or {}
        for key, spin in (("epochs", self.epochs_spin), ("cycles", self.cycles_spin),
                          ("checkpoints_per_cycle", self.checkpoints_spin),
                          ("iterations_per_epoch", self.iterations_spin),
                          ("val_iterations_per_epoch", self.val_iterations_spin)):
            if key in sched:
                spin.setValue(int(sched[key]))
        if "lr_max" in sched:
            self.lr_spin.setValue(float(sched["lr_max"]))
        if "lr_min" in sched:   # job.json only: the settings do not keep it
            self.lr_min = float(sched["lr_min"])
        if run.get("device") in DEVICES:
            self.device_combo.setCurrentText(run["device"])
        if run.get("configuration") in CONFIGURATIONS:
            self.configuration_combo.setCurrentText(run["configuration"])
        if "data_workers" in run:
            self.data_workers = run["data_workers"]

    def start(self) -> None:
        """Start a training (deleting the previous one only if "start over" is ticked)."""
        self._start(resume=False)

    def resume(self) -> None:
        """Continue a cancelled, crashed or failed training from its last finished epoch."""
        self._start(resume=True)

    def _start(self, resume: bool) -> None:
        from napari_medclipsam.nnunet.job import start_training

        restart = not resume and self.restart_check.isChecked()
        try:
            job_dir = start_training(
                self.dataset_spin.value(), self.schedule(), folders=self.folders(),
                configuration=self.configuration_combo.currentText(),
                device=self.device_combo.currentText(), resume=resume, restart=restart,
                data_workers=self.data_workers)
        except (InputError, OSError) as exc:
            self._report(str(exc), error=True)
            return
        self.restart_check.setChecked(False)  # never delete a training twice by accident
        self.job_dir = job_dir
        self.save_settings()
        self._report(f"Training {'resumed' if resume else 'started'} in the background "
                     f"(it goes on if napari is closed); job folder {job_dir}.")
        self.refresh_status()

    def cancel(self) -> None:
        """Stop the running training (its process tree; in a worker, as it waits for it)."""
        from napari_medclipsam.nnunet.job import cancel

        if self.job_dir is None or self.busy or not self.refresh_status().get("running"):
            return
        self._report("Cancelling the training...")
        self._launch(cancel, self.job_dir, on_done=self._on_cancelled)

    def _on_cancelled(self, out: tuple[str, Any]) -> None:
        kind, payload = out
        if kind == "error":
            self._report(payload, error=True)
        else:
            self._report("Training cancelled; Resume continues from the last finished epoch."
                         if payload else "The training was not running.")
        self.refresh_status()

    def refresh_status(self) -> dict[str, Any]:
        """Read the job's status (cheap: status.json and the log's tail) and show it."""
        from napari_medclipsam.nnunet.job import read_status

        status = read_status(self.job_dir) if self.job_dir is not None else {
            "phase": "none", "running": False, "log_tail": ""}
        self.status = status
        epochs = int(status.get("epochs") or 0)
        epoch = int(status.get("epoch") or 0)
        if status.get("phase") == "done" and epochs:
            epoch = epochs
        self.progress_bar.setRange(0, max(epochs, 1))
        self.progress_bar.setValue(min(epoch, max(epochs, 1)))
        self.job_label.setText(status_line(status))
        log = status.get("log_tail", "")
        if log != self.log_view.toPlainText():
            self.log_view.setPlainText(log)
            bar = self.log_view.verticalScrollBar()
            bar.setValue(bar.maximum())
        # poll while a job exists; the checks are a JSON read, a pid lookup and a file tail
        if status.get("phase") != "none" and not self._timer.isActive():
            self._timer.start()
        elif status.get("phase") == "none" and self._timer.isActive():
            self._timer.stop()
        self._update_buttons()
        return status

    def _checkpoints(self) -> tuple[Path | None, list[Path]]:
        from napari_medclipsam.nnunet.ensemble import list_checkpoints
        from napari_medclipsam.nnunet.job import model_dir_for

        try:
            model_dir = model_dir_for(self.folders(), self.dataset_spin.value(),
                                      self.configuration_combo.currentText())
        except InputError:
            return None, []
        return model_dir, list_checkpoints(model_dir)

    def _update_buttons(self) -> None:
        running = bool(self.status.get("running"))
        phase = self.status.get("phase", "none")
        self.export_button.setEnabled(not self.busy)
        self.start_button.setEnabled(not running and not self.busy)
        self.resume_button.setEnabled(not running and not self.busy
                                      and phase in RESUMABLE_PHASES)
        self.cancel_button.setEnabled(running and not self.busy)
        has_checkpoints = bool(self.status.get("checkpoints")) or (
            phase != "none" and bool(self._checkpoints()[1]))
        self.predict_button.setEnabled(has_checkpoints and not self.busy)

    # ----------------------------------------------------------------------- prediction
    def predict(self) -> None:
        """Segment the chosen image with the checkpoint ensemble (in a worker)."""
        if self.busy:
            return
        from napari_medclipsam.nnunet.ensemble import load_ensemble

        layer = self._layer(self.image_combo.currentText())
        try:
            if layer is None:
                raise InputError("Choose an image layer first.")
            if layer.multiscale:
                raise InputError("Multiscale images are not supported; open a single-scale "
                                 "image.")
            model_dir, checkpoints = self._checkpoints()
            if not checkpoints:
                raise InputError("No ensemble checkpoints yet: they are saved over the last "
                                 "epochs of each cycle.")
        except InputError as exc:
            self._report(str(exc), error=True)
            return
        device = self.device_combo.currentText()
        key = (str(model_dir), tuple(p.name for p in checkpoints), device)
        cached = self._predictor if key == self._predictor_key else None
        image = np.asarray(layer.data)
        rgb = bool(layer.rgb)
        spacing = tuple(float(s) for s in layer.scale[-layer.ndim:])
        self._report(f"Predicting with {len(checkpoints)} checkpoint(s)"
                     f"{'' if cached else ' (loading them first)'}...")

        def run():
            predictor = cached or load_ensemble(model_dir, checkpoints, device=device)
            # (the spacing is ignored for models trained on PNG images, which have none)

            def progress(done, total):
                self._message.emit(f"Predicting: checkpoint {done}/{total}...")

            result = predictor.predict_image(image, spacing, rgb=rgb,
                                             progress=progress)
            return predictor, result

        self._launch(run, on_done=lambda out: self._on_predicted(out, layer, key))

    def _on_predicted(self, out: tuple[str, Any], source, key: tuple) -> None:
        kind, payload = out
        if kind == "error":
            self._report(payload, error=True)
            return
        predictor, result = payload
        self._predictor, self._predictor_key = predictor, key
        self.show_prediction(result, source, predictor.n_classes)
        fg = float((result.mask > 0).mean())
        self._report(f"Ensemble of {result.n_checkpoints} checkpoint(s): {100 * fg:.1f}% "
                     f"foreground, mean uncertainty {float(result.entropy.mean()):.3f} nats "
                     f"(max ln {predictor.n_classes} = {math.log(predictor.n_classes):.3f})."
                     + self._worst_slices(result.entropy, source))

    @staticmethod
    def _worst_slices(entropy, source) -> str:
        """For a (Z, Y, X) prediction: the slices to correct first (highest mean entropy)."""
        from napari_medclipsam.nnunet.ensemble import rank_slices

        if entropy.ndim != 3 or getattr(source, "rgb", False) or entropy.shape[0] < 2:
            return ""
        worst = rank_slices(entropy)[:3]
        return " Most uncertain slices: " + ", ".join(f"z={z} ({h:.3f})" for z, h in worst)

    def show_prediction(self, result, source, n_classes: int) -> None:
        """Add (or update) the probability, mask and uncertainty layers over ``source``."""
        from napari.layers import Image, Labels

        ndim = source.ndim  # spatial: an RGB layer's scale has no channel entry
        geometry = {"scale": tuple(source.scale[-ndim:]),
                    "translate": tuple(source.translate[-ndim:])}
        h_max = math.log(max(int(n_classes), 2))
        self._put(PROBABILITY, Image, result.foreground.astype(np.float32), geometry,
                  colormap="magma", contrast_limits=(0.0, 1.0), blending="additive",
                  opacity=0.6)
        self._put(UNCERTAINTY, Image, result.entropy.astype(np.float32), geometry,
                  colormap="viridis", contrast_limits=(0.0, h_max), blending="additive",
                  opacity=0.6)
        self._put(MASK, Labels, result.mask.astype(np.uint8), geometry, opacity=0.5)

    def _put(self, name: str, cls, data, geometry: dict, **kwargs):
        layers = self.viewer.layers
        if name in layers and (not isinstance(layers[name], cls)
                               or layers[name].ndim != data.ndim):
            layers.remove(name)  # another kind, or 2-D vs 3-D output of an earlier run
        if name in layers:
            layer = layers[name]
            layer.data = data
            layer.scale = geometry["scale"]
            layer.translate = geometry["translate"]
            if "contrast_limits" in kwargs:
                layer.contrast_limits_range = kwargs["contrast_limits"]
                layer.contrast_limits = kwargs["contrast_limits"]
            return layer
        return self.viewer.add_layer(cls(data, name=name, **geometry, **kwargs))

    # ----------------------------------------------------------------------- settings
    @staticmethod
    def settings_path() -> Path:
        """Beside the segmentation widget's settings: ``training_widget.json``."""
        from napari_medclipsam._widgets.segment_widget import SegmentWidget

        return SegmentWidget.settings_path().with_name(SETTINGS_FILE)

    def settings(self) -> dict[str, Any]:
        return {
            "folders": {k: self.folder_edits[k].text().strip() for k in FOLDER_KEYS},
            "dataset_id": self.dataset_spin.value(), "name": self.name_edit.text().strip(),
            "label_name": self.label_edit.text().strip(),
            "corrected": self.corrected_check.isChecked(),
            "as_slices": self.slices_check.isChecked(),
            "schedule": {"epochs": self.epochs_spin.value(), "cycles": self.cycles_spin.value(),
                         "checkpoints_per_cycle": self.checkpoints_spin.value(),
                         "iterations_per_epoch": self.iterations_spin.value(),
                         "val_iterations_per_epoch": self.val_iterations_spin.value(),
                         "lr_max": self.lr_spin.value()},
            "device": self.device_combo.currentText(),
            "configuration": self.configuration_combo.currentText(),
            "data_workers": self.data_workers,
        }

    def apply_settings(self, state: dict[str, Any]) -> None:
        for key, value in (state.get("folders") or {}).items():
            if key in self.folder_edits and value:
                self.folder_edits[key].setText(str(value))
        self.dataset_spin.blockSignals(True)
        self.dataset_spin.setValue(int(state.get("dataset_id", self.dataset_spin.value())))
        self.dataset_spin.blockSignals(False)
        if state.get("name"):
            self.name_edit.setText(state["name"])
        suggested = label_name_from_layer(self.labels_combo.currentText())
        if state.get("label_name") and not suggested:  # the layer's prompt comes first
            self.label_edit.setText(state["label_name"])
            self._label_name_edited = state["label_name"] != "target"
        self.corrected_check.setChecked(bool(state.get("corrected", True)))
        self.slices_check.setChecked(bool(state.get("as_slices", True)))
        self._apply_run_fields(state)

    def save_settings(self) -> None:
        """Remember folders, dataset and schedule for the next session."""
        from napari_medclipsam.core.io import write_text

        # a read-only home must not stop an export or a training
        with contextlib.suppress(OSError):
            write_text(self.settings_path(), json.dumps(self.settings(), indent=2) + "\n")

    def load_settings(self) -> None:
        path = self.settings_path()
        if not path.is_file():
            return
        try:
            self.apply_settings(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError, KeyError):
            self._report(f"Ignored unreadable settings in {path}.")
