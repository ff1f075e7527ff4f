"""The "Pseudo-labels & training" dock widget (MedCLIP-SAMv2's weak-supervision stage): a thin
Qt view over :class:`~napari_medclipsam._widgets.training_controller.TrainingController`.

Four numbered sections that fold (:class:`Section`) in a scroll area, so the dock fits a
1366x768 laptop screen; the status line stays in view below them.

1. **Export pseudo-labels**: an image layer and its (hand-corrected) Labels layer become cases
   of a raw nnU-Net v2 dataset (in a worker thread). A 3-D stack can go in as 2-D slices (only
   the labelled ones), as the paper trains a 2-D nnU-Net. A ``label map`` whose ``name``
   feature names several targets (the text-prompt widget's) is exported with one class per
   target. nnU-Net's folders have Browse buttons.
2. **Train**: a length preset (Quick try, Short, As the paper) and the estimated time on this
   device before Start ("about 15 days on this computer's CPU" says so, in colour); planning,
   preprocessing and checkpoint-ensembling training run in a background process that
   outlives napari. A 1 s ``QTimer`` reads its ``status.json`` and log tail and shows phase,
   epoch, cycle, loss, pseudo-Dice and ETA, and the log's last lines without nnU-Net's plans
   and network dumps (Show full log has everything). A widget opened later on the same
   folders and dataset picks the job up again.
3. **Predict**: the ensemble of saved checkpoints segments the chosen image (in a worker) and
   three layers overlay it with the image's scale and translate: ``nnU-Net probability``
   (``1 - p(background)``), ``nnU-Net mask`` (a label map in the exported values, named by its
   ``name`` feature) and ``nnU-Net uncertainty`` (entropy over the C classes in nats, 0 to ln
   C, explained in words: 0 = all checkpoints agree, 0.69 = a coin flip between two labels).
4. **Review**: the prediction's slices (or a folder prediction's cases) listed by mean
   uncertainty, worst first; a row opens the slice (or image), Accept or Corrected adds it to
   the dataset with the time, edits and Dice of the review.

Errors are said as what to click ("click Export first"), not as command lines.

napari opens this class from the Plugins menu and passes the viewer as ``napari_viewer``.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import Qt, QTimer, Signal
from qtpy.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QFrame,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSizePolicy,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from napari_medclipsam._widgets.common import (
    Outcome,
    SettingsStore,
    find_layer,
    geometry_of,
    is_map_layer,
    is_stack,
    layer_names,
    put_layer,
    report,
    set_combo_items,
    start_worker,
)
from napari_medclipsam._widgets.training_controller import (
    CONFIGURATIONS,
    DEVICE_WORDS,
    DEVICES,
    FOLDER_KEYS,
    SCHEDULE_PRESETS,
    JobStatus,
    Prediction,
    ReviewItem,
    TrainingController,
    TrainingEstimate,
    export_label_table,
    folders_from_values,
    guess_device,
    in_gui_words,
    label_name_from_layer,
    label_table_from_features,
    preset_named,
    preset_of,
    schedule_from_values,
    status_line,
    uncertainty_words,
)
from napari_medclipsam.core.errors import InputError
from napari_medclipsam.nnunet.export import format_label_table
from napari_medclipsam.nnunet.job import ENV_NAMES

if TYPE_CHECKING:
    import napari

__all__ = ["MASK", "PROBABILITY", "UNCERTAINTY", "TrainingWidget", "status_line"]

PROBABILITY, MASK, UNCERTAINTY = "nnU-Net probability", "nnU-Net mask", "nnU-Net uncertainty"
OUTPUT_LAYERS = (PROBABILITY, MASK, UNCERTAINTY)
LABEL_MAP = "label map"
SETTINGS = SettingsStore("training_widget.json")
REVIEW_COLUMNS = ("Case / slice", "Uncertainty", "Review")
CUSTOM = "Custom (Schedule details)"
FOLDER_TIPS = {
    "raw": "Where the exported datasets go (nnU-Net's nnUNet_raw)",
    "preprocessed": "Where nnU-Net writes its preprocessed data (nnUNet_preprocessed)",
    "results": "Where the trained models and the training's log go (nnUNet_results)",
}
#: the estimate's colour when a run takes days
LONG_RUN_STYLE = "color: #e8a33c;"


class WrappedLabel(QLabel):
    """A word-wrapped label that never asks for more than ``WIDTH`` pixels: Qt sizes a long
    wrapped text wide, which made the dock take half a laptop screen."""

    WIDTH = 280

    def __init__(self, text: str = "", parent: QWidget | None = None):
        super().__init__(text, parent)
        self.setWordWrap(True)

    def sizeHint(self):  # noqa: N802 (Qt's name)
        hint = super().sizeHint()
        if hint.width() > self.WIDTH:
            hint.setWidth(self.WIDTH)
            hint.setHeight(self.heightForWidth(self.WIDTH))
        return hint


class Section(QWidget):
    """A titled part of the dock that folds: a header (arrow and title) over its content,
    which is shown or hidden. No height animation, so content that grows (a label that
    wraps, a nested section) always fits.

    Parameters
    ----------
    title : str
    expanded : bool
    level : int
        0 for the dock's numbered steps (bold), 1 for a part inside one.
    """

    toggled = Signal(bool)

    def __init__(self, title: str, expanded: bool = True, level: int = 0,
                 parent: QWidget | None = None):
        super().__init__(parent)
        self.header = QToolButton()
        self.header.setText(title)
        self.header.setCheckable(True)
        self.header.setChecked(expanded)
        self.header.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
        self.header.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.header.setStyleSheet("QToolButton { border: none; text-align: left; "
                                  f"font-weight: {'bold' if level == 0 else 'normal'}; }}")
        self.header.toggled.connect(self._on_toggled)
        self.content = QFrame()
        if level == 0:
            self.content.setFrameShape(QFrame.Shape.StyledPanel)
        self.body = QVBoxLayout(self.content)
        self.body.setContentsMargins(6, 2, 4, 4)
        self.body.setSpacing(4)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(1)
        layout.addWidget(self.header)
        layout.addWidget(self.content)
        self._on_toggled(expanded, emit=False)

    @property
    def title(self) -> str:
        return self.header.text()

    def addWidget(self, widget: QWidget) -> None:  # noqa: N802 (Qt's naming)
        self.body.addWidget(widget)

    def isExpanded(self) -> bool:  # noqa: N802 (Qt's naming)
        return self.header.isChecked()

    def expand(self, animate: bool = False) -> None:
        self.header.setChecked(True)

    def collapse(self, animate: bool = False) -> None:
        self.header.setChecked(False)

    def _on_toggled(self, expanded: bool, emit: bool = True) -> None:
        self.header.setArrowType(Qt.ArrowType.DownArrow if expanded
                                 else Qt.ArrowType.RightArrow)
        self.content.setVisible(expanded)
        if emit:
            self.toggled.emit(expanded)


class TrainingWidget(QWidget):
    """Dock widget: export pseudo-labels, train the checkpoint ensemble, predict, review.

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer
        Passed by napari when the widget is opened from the Plugins menu.

    Attributes
    ----------
    controller : TrainingController
        The Qt-free state (job, status, last export and prediction, review queue) and actions.
    last_status : str
        The last message shown in the status label (tests read it).
    """

    _message = Signal(str)

    def __init__(self, napari_viewer: napari.viewer.Viewer):
        super().__init__()
        self.viewer = viewer = napari_viewer
        self.controller = TrainingController()
        self.last_status = ""
        self._worker = None
        self._label_name_edited = False
        self._updating_layers = False
        self._mask_hooked = None   # the mask layer whose paint events count review edits
        self._estimate_key: tuple | None = None
        self.estimate: TrainingEstimate | None = None  # of the fields, before Start
        self.log_dialog: QDialog | None = None

        self._build_ui()
        self._message.connect(self._report)
        self._timer = QTimer(self)
        self._timer.setInterval(1000)
        self._timer.timeout.connect(self.refresh_status)

        for event in (viewer.layers.events.inserted, viewer.layers.events.removed):
            event.connect(self._refresh_layers)
        self._refresh_layers()
        if guess_device("auto")[0] == "cpu":  # the paper's 600 epochs are days on a CPU
            self.apply_preset("quick")
        self.load_settings()
        if not all(edit.text().strip() for edit in self.folder_edits.values()):
            self.folders_box.expand(animate=False)  # still to be set
        self.locate_job()

    # ----------------------------------------------------------------------- state
    @property
    def job_dir(self) -> Path | None:
        """The training job shown (``$nnUNet_results/Dataset.../medclipsam_job``)."""
        return self.controller.state.job_dir

    @property
    def status(self) -> JobStatus:
        """The job's last status (read every second while a job exists)."""
        return self.controller.state.status

    @property
    def last_export(self):
        return self.controller.state.last_export

    @property
    def busy(self) -> bool:
        """True while an export, cancel, prediction or review runs in a worker thread."""
        return self._worker is not None

    @property
    def data_workers(self) -> int | None:
        """nnU-Net's augmentation processes for the next start (None: nnU-Net's choice)."""
        value = self.workers_spin.value()
        return None if value < 0 else value

    @data_workers.setter
    def data_workers(self, value: int | None) -> None:
        self.workers_spin.setValue(-1 if value is None else int(value))

    # ----------------------------------------------------------------------- UI
    def _build_ui(self) -> None:
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.setSpacing(2)
        scroll = QScrollArea()   # the sections together are taller than a laptop screen
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QFrame.NoFrame)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        content = QWidget()
        scroll.setWidget(content)
        outer.addWidget(scroll, 1)
        self.scroll_area = scroll
        layout = QVBoxLayout(content)
        layout.setContentsMargins(4, 4, 4, 4)

        # -- 1. export ------------------------------------------------------------------
        self.export_section = Section("1. Export pseudo-labels")
        form = QFormLayout()
        self.export_section.body.addLayout(form)
        self.image_combo = QComboBox()
        self.image_combo.setToolTip("The image to train on (and to predict with Predict)")
        self.image_combo.currentTextChanged.connect(self._on_image_changed)
        form.addRow("Image", self.image_combo)
        self.labels_combo = QComboBox()
        self.labels_combo.setToolTip(
            "The mask to train on (e.g. the corrected SAM mask, or the 'label map'): every "
            "label value > 0 is the target, unless the layer names several targets (one "
            "class each).")
        self.labels_combo.currentTextChanged.connect(self._on_labels_changed)
        form.addRow("Labels", self.labels_combo)
        self.classes_label = WrappedLabel("")
        self.classes_label.setVisible(False)
        form.addRow(self.classes_label)
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

        self.folders_box = Section("nnU-Net folders", expanded=False, level=1)
        fform = QFormLayout()
        self.folders_box.body.addLayout(fform)
        self.folder_edits: dict[str, QLineEdit] = {}
        self.browse_buttons: dict[str, QPushButton] = {}
        for key in FOLDER_KEYS:
            edit = QLineEdit(os.environ.get(ENV_NAMES[key], ""))
            edit.setPlaceholderText("choose a folder")
            edit.setToolTip(f"{FOLDER_TIPS[key]}; empty: the {ENV_NAMES[key]} environment "
                            "variable")
            edit.editingFinished.connect(self.locate_job)
            browse = QPushButton("Browse...")
            browse.setToolTip(f"Choose the {key} folder")
            browse.clicked.connect(lambda _=False, k=key: self._browse(k))
            row = QHBoxLayout()
            row.addWidget(edit, 1)
            row.addWidget(browse)
            fform.addRow(key.capitalize(), row)
            self.folder_edits[key] = edit
            self.browse_buttons[key] = browse
        self.export_section.addWidget(self.folders_box)

        dform = QFormLayout()
        self.export_section.body.addLayout(dform)
        self.dataset_spin = QSpinBox()
        self.dataset_spin.setRange(1, 999)
        self.dataset_spin.setValue(1)
        self.dataset_spin.setToolTip("nnU-Net's dataset number: one training per dataset")
        self.dataset_spin.valueChanged.connect(self.locate_job)
        dform.addRow("Dataset ID", self.dataset_spin)
        self.name_edit = QLineEdit("MedClipSam")
        self.name_edit.setToolTip("Letters, digits, '_' and '-': Dataset{ID:03d}_{name}")
        dform.addRow("Name", self.name_edit)
        self.label_edit = QLineEdit("target")
        self.label_edit.setToolTip("Name of label 1 in dataset.json (a binary export)")
        self.label_edit.textEdited.connect(self._on_label_edited)
        dform.addRow("Label name", self.label_edit)
        self.append_check = QCheckBox("append to existing dataset")
        self.append_check.setToolTip("Add this image as new case(s) to the dataset with this "
                                     "ID; existing cases are never overwritten.")
        dform.addRow(self.append_check)
        self.export_button = QPushButton("Export")
        self.export_button.setToolTip("Write the image and its labels as nnU-Net training "
                                      "case(s) of this dataset")
        self.export_button.clicked.connect(self.export)
        self.export_section.addWidget(self.export_button)
        layout.addWidget(self.export_section)

        # -- 2. train -------------------------------------------------------------------
        self.train_section = Section("2. Train (background process)")
        tform = QFormLayout()
        self.train_section.body.addLayout(tform)
        self.preset_combo = QComboBox()
        self.preset_combo.setSizeAdjustPolicy(
            QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.preset_combo.setMinimumContentsLength(16)
        for preset in SCHEDULE_PRESETS:
            self.preset_combo.addItem(preset.title, preset.key)
        self.preset_combo.addItem(CUSTOM, "custom")
        self.preset_combo.activated.connect(self._on_preset_chosen)
        tform.addRow("Length", self.preset_combo)
        self.device_combo = QComboBox()
        self.device_combo.addItems(DEVICES)
        self.device_combo.setToolTip("auto: an NVIDIA GPU (CUDA) or Apple GPU (MPS) if torch "
                                     "can use one, else the CPU")
        self.device_combo.currentTextChanged.connect(self._update_estimate)
        tform.addRow("Device", self.device_combo)
        self.estimate_label = WrappedLabel("")
        self.train_section.addWidget(self.estimate_label)

        self.schedule_box = Section("Schedule details", expanded=False, level=1)
        sform = QFormLayout()
        self.schedule_box.body.addLayout(sform)
        self.epochs_spin = self._int_spin(1, 100_000, 600)
        self.epochs_spin.setToolTip("Passes of 'iterations per epoch' batches; a multiple of "
                                    "the cycles")
        sform.addRow("Epochs", self.epochs_spin)
        self.cycles_spin = self._int_spin(1, 1000, 3)
        self.cycles_spin.setToolTip("Learning-rate restarts: each cycle ends in a low learning "
                                    "rate where checkpoints are kept")
        sform.addRow("Cycles", self.cycles_spin)
        self.checkpoints_spin = self._int_spin(1, 100_000, 10)
        self.checkpoints_spin.setToolTip("Checkpoints kept from the last epochs of each cycle: "
                                         "the ensemble that predicts and measures uncertainty")
        sform.addRow("Checkpoints per cycle", self.checkpoints_spin)
        self.iterations_spin = self._int_spin(1, 1_000_000, 250)
        self.iterations_spin.setToolTip("Training batches per epoch (nnU-Net's default: 250)")
        sform.addRow("Iterations per epoch", self.iterations_spin)
        self.val_iterations_spin = self._int_spin(0, 1_000_000, 50)
        self.val_iterations_spin.setToolTip("Validation batches per epoch (pseudo-Dice)")
        sform.addRow("Validation iterations", self.val_iterations_spin)
        self.lr_spin = QDoubleSpinBox()
        self.lr_spin.setDecimals(5)
        self.lr_spin.setRange(1e-5, 10.0)
        self.lr_spin.setSingleStep(0.001)
        self.lr_spin.setValue(0.01)
        self.lr_spin.setToolTip("Learning rate at the start of each cycle (cosine down to "
                                "1e-4 at its end)")
        sform.addRow("Learning rate", self.lr_spin)
        self.configuration_combo = QComboBox()
        self.configuration_combo.addItems(CONFIGURATIONS)
        self.configuration_combo.setToolTip("2d: the paper's (and the one for exported slices)")
        self.configuration_combo.currentTextChanged.connect(self._update_estimate)
        sform.addRow("Configuration", self.configuration_combo)
        self.workers_spin = self._int_spin(-1, 64, -1)
        self.workers_spin.setSpecialValueText("auto")
        self.workers_spin.setToolTip("nnU-Net's data-augmentation processes; 0 augments in the "
                                     "training process, auto is nnU-Net's choice")
        sform.addRow("Data workers", self.workers_spin)
        for spin in (self.epochs_spin, self.cycles_spin, self.checkpoints_spin,
                     self.iterations_spin, self.val_iterations_spin):
            spin.valueChanged.connect(self._on_schedule_edited)
        self.train_section.addWidget(self.schedule_box)

        self.restart_check = QCheckBox("start over (deletes previous training)")
        self.train_section.addWidget(self.restart_check)
        buttons = QHBoxLayout()
        self.start_button = QPushButton("Start")
        self.start_button.setToolTip("Plan, preprocess and train in a background process (it "
                                     "goes on if napari is closed)")
        self.start_button.clicked.connect(self.start)
        self.resume_button = QPushButton("Resume")
        self.resume_button.setToolTip("Continue a cancelled or crashed training from its last "
                                      "finished epoch")
        self.resume_button.clicked.connect(self.resume)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setToolTip("Stop the training; Resume continues it later")
        self.cancel_button.clicked.connect(self.cancel)
        for button in (self.start_button, self.resume_button, self.cancel_button):
            buttons.addWidget(button)
        self.train_section.body.addLayout(buttons)
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(0)
        self.progress_bar.setFormat("%v/%m epochs")
        self.train_section.addWidget(self.progress_bar)
        self.job_label = WrappedLabel("")
        self.train_section.addWidget(self.job_label)
        self.log_view = QPlainTextEdit()
        self.log_view.setReadOnly(True)
        self.log_view.setMaximumBlockCount(500)
        self.log_view.setFixedHeight(96)
        self.log_view.setPlaceholderText("training log (epochs, losses, pseudo-Dice)")
        self.log_view.setToolTip("The last lines of the training log, without nnU-Net's plans "
                                 "and network printouts: Show full log has everything")
        self.train_section.addWidget(self.log_view)
        self.log_button = QPushButton("Show full log")
        self.log_button.setToolTip("The whole log of the training process (nnU-Net's plans, "
                                   "network and warnings included) and where it is")
        self.log_button.clicked.connect(self.show_log)
        self.train_section.addWidget(self.log_button)
        layout.addWidget(self.train_section)

        # -- 3. predict -----------------------------------------------------------------
        self.predict_section = Section("3. Predict")
        self.uncertainty_label = WrappedLabel("")
        self.predict_section.addWidget(self.uncertainty_label)
        self.predict_button = QPushButton("Predict on current image")
        self.predict_button.setToolTip("Ensemble of the saved checkpoints: probability, mask "
                                       "and uncertainty (entropy) layers")
        self.predict_button.clicked.connect(self.predict)
        self.predict_section.addWidget(self.predict_button)
        layout.addWidget(self.predict_section)

        # -- 4. review ------------------------------------------------------------------
        self.review_box = Section("4. Review (most uncertain first)", expanded=False)
        hint = WrappedLabel("Click a row to open it; Accept keeps the prediction, Corrected "
                            f"takes the edited '{MASK}' layer. Either adds it to the dataset "
                            "with the time, edits and Dice of the review.")
        self.review_box.addWidget(hint)
        self.review_table = QTableWidget(0, len(REVIEW_COLUMNS))
        self.review_table.setHorizontalHeaderLabels(REVIEW_COLUMNS)
        self.review_table.horizontalHeaderItem(1).setToolTip(
            f"Mean uncertainty in nats: {uncertainty_words(2)}")
        self.review_table.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.review_table.setSelectionMode(QAbstractItemView.SingleSelection)
        self.review_table.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.review_table.verticalHeader().setVisible(False)
        header = self.review_table.horizontalHeader()
        header.setSectionResizeMode(0, QHeaderView.Stretch)
        for column in (1, 2):
            header.setSectionResizeMode(column, QHeaderView.ResizeToContents)
        self.review_table.setFixedHeight(150)
        self.review_table.currentCellChanged.connect(self._on_review_row_changed)
        self.review_table.cellClicked.connect(self._on_review_row_clicked)
        self.review_box.addWidget(self.review_table)
        rbuttons = QHBoxLayout()
        self.load_ranking_button = QPushButton("Load ranking...")
        self.load_ranking_button.setToolTip("Choose the folder of a folder prediction (it holds "
                                            "uncertainty_ranking.csv) to review its cases")
        self.load_ranking_button.clicked.connect(self._load_ranking_dialog)
        self.accept_button = QPushButton("Accept")
        self.accept_button.setToolTip("The prediction is right: add it unmodified")
        self.accept_button.clicked.connect(lambda: self.mark_review("accepted"))
        self.corrected_button = QPushButton("Corrected")
        self.corrected_button.setToolTip(f"Add the '{MASK}' layer as you corrected it")
        self.corrected_button.clicked.connect(lambda: self.mark_review("corrected"))
        for button in (self.load_ranking_button, self.accept_button, self.corrected_button):
            rbuttons.addWidget(button)
        self.review_box.body.addLayout(rbuttons)
        self.review_summary_label = WrappedLabel("")
        self.review_box.addWidget(self.review_summary_label)
        layout.addWidget(self.review_box)
        layout.addStretch()

        # the status stays in view below the scroll area, whatever is scrolled or folded
        self.status_label = WrappedLabel("")
        self.status_label.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.status_label.setContentsMargins(6, 2, 6, 4)
        self.status_label.setToolTip("What the widget did last (errors also as a "
                                     "notification)")
        outer.addWidget(self.status_label)
        self._set_uncertainty_help(2)
        self._sync_preset()
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

    # ----------------------------------------------------------------------- schedule length
    def _schedule_spins(self) -> dict[str, QSpinBox]:
        return {"epochs": self.epochs_spin, "cycles": self.cycles_spin,
                "checkpoints_per_cycle": self.checkpoints_spin,
                "iterations_per_epoch": self.iterations_spin,
                "val_iterations_per_epoch": self.val_iterations_spin}

    def apply_preset(self, key: str) -> None:
        """Set epochs, cycles, checkpoints and iterations as the preset ``key`` ("quick",
        "short", "paper") has them; learning rate, device and the rest stay."""
        preset = preset_named(key)
        spins = self._schedule_spins()
        for spin in spins.values():
            spin.blockSignals(True)
        try:
            for name, value in preset.values().items():
                spins[name].setValue(value)
        finally:
            for spin in spins.values():
                spin.blockSignals(False)
        self._sync_preset()

    def _on_preset_chosen(self, index: int) -> None:
        key = self.preset_combo.itemData(index)
        if key == "custom":
            self.schedule_box.expand()
            self._sync_preset()
        else:
            self.apply_preset(key)

    def _on_schedule_edited(self, *_) -> None:
        self._sync_preset()

    def _sync_preset(self) -> None:
        """Show the preset the fields match (else Custom) and the estimate."""
        preset = preset_of({k: s.value() for k, s in self._schedule_spins().items()})
        self.preset_combo.setCurrentIndex(
            self.preset_combo.findData(preset.key if preset else "custom"))
        self._update_estimate()

    def _update_estimate(self, *_) -> None:
        """The estimated time of the fields' schedule on the chosen device, before Start
        (and the presets' times in their menu)."""
        configuration = self.configuration_combo.currentText()
        device, measured, _why = self.controller.iteration_cost(
            self.device_combo.currentText(), configuration)
        cost = {} if measured is None else {"seconds_per_iteration": measured}
        for index, preset in enumerate(SCHEDULE_PRESETS):
            self.preset_combo.setItemText(index, preset.label(device, configuration, **cost))
            self.preset_combo.setItemData(index, preset.details, Qt.ItemDataRole.ToolTipRole)
        status = self.status
        self._estimate_key = _estimate_key(status)
        self.estimate = None
        if status.running:
            self.estimate_label.setText("Training now: the ETA below is measured from its "
                                        "epochs.")
            self.estimate_label.setStyleSheet("")
            return
        try:
            self.estimate = self.controller.estimate(
                self.schedule(), self.device_combo.currentText(), configuration,
                epochs_done=status.epoch if status.resumable else 0)
        except InputError as exc:
            self.estimate_label.setText(str(exc))
            self.estimate_label.setStyleSheet(LONG_RUN_STYLE)
            return
        text = self.estimate.words()
        if status.resumable and status.epoch:
            text = f"Resume ({status.epoch} epochs done): " + text[0].lower() + text[1:]
        elif status.exists:
            text = "Start over: " + text[0].lower() + text[1:]
        self.estimate_label.setText(text)
        self.estimate_label.setStyleSheet(LONG_RUN_STYLE if self.estimate.too_long else "")

    # ----------------------------------------------------------------------- log
    def show_log(self) -> QDialog | None:
        """Open (or refresh) a window with the training's whole log and its path."""
        path, text = self.controller.full_log()
        if path is None:
            self._report("No training yet: its log appears here once Start is pressed.")
            return None
        if self.log_dialog is None:
            from qtpy.QtGui import QFontDatabase

            dialog = QDialog(self)
            dialog.setWindowTitle("Training log")
            dialog.resize(900, 560)
            layout = QVBoxLayout(dialog)
            dialog.path_label = QLabel("")
            dialog.path_label.setWordWrap(True)
            dialog.path_label.setTextInteractionFlags(Qt.TextSelectableByMouse)
            layout.addWidget(dialog.path_label)
            dialog.text = QPlainTextEdit()
            dialog.text.setReadOnly(True)
            dialog.text.setLineWrapMode(QPlainTextEdit.LineWrapMode.NoWrap)
            dialog.text.setFont(QFontDatabase.systemFont(QFontDatabase.SystemFont.FixedFont))
            layout.addWidget(dialog.text)
            box = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
            reload_button = box.addButton("Reload", QDialogButtonBox.ButtonRole.ActionRole)
            reload_button.clicked.connect(self.show_log)
            box.rejected.connect(dialog.close)
            layout.addWidget(box)
            self.log_dialog = dialog
        dialog = self.log_dialog
        dialog.path_label.setText(f"{path} (everything the training process printed; "
                                  "nnU-Net's own log is in the model's fold_all folder)")
        dialog.text.setPlainText(text or "(empty so far)")
        bar = dialog.text.verticalScrollBar()
        bar.setValue(bar.maximum())
        dialog.show()
        dialog.raise_()
        return dialog

    def _set_uncertainty_help(self, n_classes: int) -> None:
        self.uncertainty_label.setText(
            f"Adds '{PROBABILITY}' (0 to 1), '{MASK}' and '{UNCERTAINTY}' over the image. "
            f"Uncertainty in nats: {uncertainty_words(n_classes)}.")

    def _browse(self, key: str) -> None:
        path = QFileDialog.getExistingDirectory(self, f"nnU-Net {key} folder",
                                                self.folder_edits[key].text())
        if path:
            self.folder_edits[key].setText(path)
            self.locate_job()

    def _refresh_layers(self, event=None) -> None:
        set_combo_items(self.image_combo, layer_names(
            self.viewer, "image",
            skip=lambda n: n in OUTPUT_LAYERS or is_map_layer(n)))
        labels = layer_names(self.viewer, "labels", skip=lambda n: n == MASK)
        # the label map (several targets) and the SAM masks are what one trains on
        labels.sort(key=lambda n: (n != LABEL_MAP, not n.startswith("SAM mask [")))
        set_combo_items(self.labels_combo, labels)
        self._on_image_changed()
        self._on_labels_changed()

    def _on_image_changed(self, *_) -> None:
        layer = find_layer(self.viewer, self.image_combo.currentText())
        self.slices_check.setEnabled(layer is not None and is_stack(layer))

    def _on_label_edited(self, text: str) -> None:
        self._label_name_edited = bool(text.strip())

    def _on_labels_changed(self, *_) -> None:
        layer = find_layer(self.viewer, self.labels_combo.currentText())
        named = label_table_from_features(getattr(layer, "features", None)) or {}
        multi = len(named) > 1
        self.classes_label.setVisible(multi)
        self.label_edit.setEnabled(not multi)
        if multi:
            self.classes_label.setText(f"{len(named)} classes from the layer's names: "
                                       f"{format_label_table(named)}")
        if self._label_name_edited:
            return
        suggested = (next(iter(named)) if len(named) == 1
                     else label_name_from_layer(self.labels_combo.currentText()))
        if suggested:
            self.label_edit.setText(suggested)

    def _report(self, message: str, error: bool = False) -> None:
        if error:  # messages of the shared nnU-Net code may speak the command line
            message = in_gui_words(message)
        self.last_status = message
        report(self.status_label, message, error)

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

    def _launch(self, func, *args, on_done, **kwargs) -> None:
        """Run ``func`` in a worker thread; ``on_done(Outcome)`` in the GUI thread."""
        self._worker = start_worker(func, *args, on_done=on_done,
                                    on_finished=self._on_finished, **kwargs)
        self._update_buttons()

    def _on_finished(self) -> None:
        self._worker = None
        self._update_buttons()

    def _progress(self, what: str):
        def emit(done, total):
            self._message.emit(f"{what} {done}/{total or '?'}...")

        return emit

    def folders(self):
        """:class:`~napari_medclipsam.nnunet.job.NnUNetFolders` of the fields (empty fields
        fall back to the ``nnUNet_*`` environment variables); InputError if one is unset."""
        return folders_from_values({k: self.folder_edits[k].text() for k in FOLDER_KEYS})

    def _folders_or_none(self):
        try:
            return self.folders()
        except InputError:
            return None

    def schedule(self):
        """The :class:`~napari_medclipsam.nnunet.schedule.EnsembleSchedule` of the fields."""
        return schedule_from_values(
            epochs=self.epochs_spin.value(), cycles=self.cycles_spin.value(),
            checkpoints_per_cycle=self.checkpoints_spin.value(),
            iterations_per_epoch=self.iterations_spin.value(),
            val_iterations_per_epoch=self.val_iterations_spin.value(),
            lr_max=self.lr_spin.value(), lr_min=self.controller.state.lr_min)

    # ----------------------------------------------------------------------- export
    def export(self) -> None:
        """Export the chosen image and labels as case(s) of the dataset (in a worker)."""
        if self.busy:
            return
        try:
            image_layer = find_layer(self.viewer, self.image_combo.currentText())
            labels_layer = find_layer(self.viewer, self.labels_combo.currentText())
            if image_layer is None:
                raise InputError("Choose an image layer first.")
            if labels_layer is None:
                raise InputError("Choose the Labels layer with the (corrected) mask: run the "
                                 "text-prompt segmentation, or paint one.")
            if image_layer.multiscale:
                raise InputError("Multiscale images cannot be exported; open a single-scale "
                                 "image.")
            folders = self.folders()
            table = export_label_table(labels_layer.features)
            ndim = image_layer.ndim  # spatial axes (RGB's channel axis excluded)
            cases = self.controller.export_cases(
                np.asarray(image_layer.data), labels_layer.data, image_layer.name,
                spacing=tuple(float(s) for s in image_layer.scale[-ndim:]),
                origin=tuple(float(t) for t in image_layer.translate[-ndim:]),
                rgb=bool(image_layer.rgb), corrected=self.corrected_check.isChecked(),
                as_slices=self.slices_check.isEnabled() and self.slices_check.isChecked(),
                label_table=table)
        except InputError as exc:
            self._report(str(exc), error=True)
            return
        self.save_settings()
        self._report(f"Exporting {len(cases)} case(s) (nnU-Net checks the dataset)...")
        self._launch(self.controller.export, cases, folders, self.dataset_spin.value(),
                     self.name_edit.text().strip(),
                     label_name=self.label_edit.text().strip() or "target", label_table=table,
                     append=self.append_check.isChecked(),
                     progress=self._progress("Exporting case"), on_done=self._on_exported)

    def _on_exported(self, outcome: Outcome) -> None:
        if not outcome.ok:
            self._report(outcome.error or "Cancelled.", error=True)
            return
        self._report(self.controller.export_message(outcome.value))
        self.locate_job()

    # ----------------------------------------------------------------------- training
    def locate_job(self, *_) -> Path | None:
        """Find this dataset's training job (if any) and show its status."""
        folders = self._folders_or_none()
        job = self.controller.locate_job(folders, self.dataset_spin.value())
        if job is not None:
            self._apply_run_fields(job)   # so Resume matches the job
        self._show_summary(self.controller.summary(folders, self.dataset_spin.value()))
        self.refresh_status()
        return self.job_dir

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
        try:
            job_dir = self.controller.start(
                self.folders(), self.dataset_spin.value(), self.schedule(),
                configuration=self.configuration_combo.currentText(),
                device=self.device_combo.currentText(), resume=resume,
                restart=not resume and self.restart_check.isChecked(),
                data_workers=self.data_workers)
        except (InputError, OSError) as exc:
            self._report(str(exc), error=True)
            return
        self.restart_check.setChecked(False)  # never delete a training twice by accident
        self.save_settings()
        estimate = self.estimate
        message = (f"Training {'resumed' if resume else 'started'} in the background (it goes "
                   "on if napari is closed)")
        if estimate is not None:
            message += f": about {estimate.duration} on this {DEVICE_WORDS[estimate.device]}"
            if estimate.too_long and estimate.device == "cpu":
                message += (", that is days: Cancel and choose 'Quick try' for a first "
                            "model today")
        self._report(f"{message}. Show full log has everything nnU-Net prints; job folder "
                     f"{job_dir}.")
        self.refresh_status()

    def cancel(self) -> None:
        """Stop the running training (its process tree; in a worker, as it waits for it)."""
        if self.job_dir is None or self.busy or not self.refresh_status().running:
            return
        self._report("Cancelling the training...")
        self._launch(self.controller.cancel, on_done=self._on_cancelled)

    def _on_cancelled(self, outcome: Outcome) -> None:
        if not outcome.ok:
            self._report(outcome.error or "Cancelled.", error=True)
        else:
            self._report("Training cancelled; Resume continues from the last finished epoch."
                         if outcome.value else "The training was not running.")
        self.refresh_status()

    def refresh_status(self) -> JobStatus:
        """Read the job's status (cheap: status.json and the log's tail) and show it."""
        status = self.controller.refresh()
        self.progress_bar.setRange(0, max(status.epochs, 1))
        self.progress_bar.setValue(min(status.epoch, max(status.epochs, 1)))
        self.job_label.setText(status.line)
        if _estimate_key(status) != self._estimate_key:
            self._update_estimate()   # a job started, moved on, ended or was found
        if status.log_tail != self.log_view.toPlainText():
            self.log_view.setPlainText(status.log_tail)
            bar = self.log_view.verticalScrollBar()
            bar.setValue(bar.maximum())
        # poll while a job exists; the checks are a JSON read, a pid lookup and a file tail
        if status.exists and not self._timer.isActive():
            self._timer.start()
        elif not status.exists and self._timer.isActive():
            self._timer.stop()
        self._update_buttons()
        return status

    def _checkpoints(self) -> tuple[Path | None, list[Path]]:
        return self.controller.checkpoints(self._folders_or_none(), self.dataset_spin.value(),
                                           self.configuration_combo.currentText())

    def _update_buttons(self) -> None:
        status, busy = self.status, self.busy
        self.export_button.setEnabled(not busy)
        self.start_button.setEnabled(not status.running and not busy)
        self.resume_button.setEnabled(status.resumable and not busy)
        self.cancel_button.setEnabled(status.running and not busy)
        has_checkpoints = bool(status.checkpoints) or (
            status.exists and bool(self._checkpoints()[1]))
        self.predict_button.setEnabled(has_checkpoints and not busy)
        row_open = self.controller.state.current is not None
        self.accept_button.setEnabled(row_open and not busy)
        self.corrected_button.setEnabled(row_open and not busy)
        self.load_ranking_button.setEnabled(not busy)
        self.log_button.setEnabled(self.job_dir is not None)

    # ----------------------------------------------------------------------- prediction
    def predict(self) -> None:
        """Segment the chosen image with the checkpoint ensemble (in a worker)."""
        if self.busy:
            return
        layer = find_layer(self.viewer, self.image_combo.currentText())
        try:
            if layer is None:
                raise InputError("Choose an image layer first.")
            if layer.multiscale:
                raise InputError("Multiscale images are not supported; open a single-scale "
                                 "image.")
            model_dir, checkpoints = self._checkpoints()
            if not checkpoints:
                raise InputError("No ensemble checkpoints yet: press Start first; they are "
                                 "saved over the last epochs of each cycle.")
        except InputError as exc:
            self._report(str(exc), error=True)
            return
        device = self.device_combo.currentText()
        cached = self.controller.has_predictor(model_dir, checkpoints, device)
        self._report(f"Predicting with {len(checkpoints)} checkpoint(s)"
                     f"{'' if cached else ' (loading them first)'}...")
        # (the spacing is ignored for models trained on PNG images, which have none)
        self._launch(self.controller.predict, np.asarray(layer.data),
                     tuple(float(s) for s in layer.scale[-layer.ndim:]), model_dir, checkpoints,
                     device=device, rgb=bool(layer.rgb), source=layer.name,
                     review_slices=self.configuration_combo.currentText() == "2d",
                     progress=self._progress("Predicting: checkpoint"),
                     on_done=self._on_predicted)

    def _on_predicted(self, outcome: Outcome) -> None:
        if not outcome.ok:
            self._report(outcome.error or "Cancelled.", error=True)
            return
        prediction: Prediction = outcome.value
        source = find_layer(self.viewer, prediction.source)
        if source is None:
            self._report(f"The image layer {prediction.source!r} was removed during the "
                         "prediction.", error=True)
            return
        self.show_prediction(prediction, source)
        self._set_uncertainty_help(prediction.n_classes)
        self._fill_review_table()
        self._report(prediction.summary() + self._worst_slices())

    def _worst_slices(self) -> str:
        """For a (Z, Y, X) prediction: the slices to correct first (highest mean entropy)."""
        prediction = self.controller.state.last_prediction
        if prediction is None or not prediction.stack:
            return ""
        worst = self.controller.state.review[:3]
        return " Most uncertain slices: " + ", ".join(
            f"z={item.slice_index} ({item.mean_entropy:.3f})" for item in worst)

    def show_prediction(self, prediction: Prediction, source) -> None:
        """Add (or update) the probability, mask and uncertainty layers over ``source``."""
        self._show_maps(source, prediction.probability, prediction.mask, prediction.entropy,
                        prediction.max_entropy, prediction.features())

    def _show_maps(self, source, probability, mask, entropy, h_max: float,
                   features: dict[str, list]) -> None:
        import pandas as pd

        geometry = geometry_of(source, source.ndim)  # an RGB layer's scale has no channel
        self._updating_layers = True
        try:
            if probability is not None:
                prob = put_layer(self.viewer, PROBABILITY, "image",
                                 np.asarray(probability, np.float32), geometry,
                                 colormap="magma", contrast_limits=(0.0, 1.0),
                                 blending="additive", opacity=0.6)
                _set_limits(prob, (0.0, 1.0))
            if entropy is not None:
                unc = put_layer(self.viewer, UNCERTAINTY, "image",
                                np.asarray(entropy, np.float32), geometry, colormap="viridis",
                                contrast_limits=(0.0, h_max), blending="additive",
                                opacity=0.6)
                _set_limits(unc, (0.0, h_max))
                n_classes = max(int(round(np.exp(h_max))), 2)
                unc.metadata["description"] = (
                    f"Uncertainty in nats: {uncertainty_words(n_classes)}.")
            # a copy: the user's corrections must not change the automatic mask
            labels = put_layer(self.viewer, MASK, "labels", np.array(mask, copy=True),
                               geometry, opacity=0.5)
            labels.features = pd.DataFrame(features)
        finally:
            self._updating_layers = False
        self._hook_mask_edits()

    # ----------------------------------------------------------------------- review
    def _fill_review_table(self) -> None:
        items = self.controller.state.review
        table = self.review_table
        table.blockSignals(True)
        try:
            table.clearContents()
            table.setRowCount(len(items))
            for row, item in enumerate(items):
                self._set_review_row(row, item)
            table.clearSelection()
            table.setCurrentCell(-1, -1)
        finally:
            table.blockSignals(False)
        if items:
            self.review_box.expand(animate=False)
        self._update_buttons()

    def _set_review_row(self, row: int, item: ReviewItem) -> None:
        record = item.record
        review = "" if record is None else (
            f"{record.status}, {record.seconds:.0f} s, {record.edits} edit(s)"
            + ("" if record.dice_auto_final is None else f", Dice {record.dice_auto_final:.3f}"))
        for column, text in enumerate((item.title, f"{item.mean_entropy:.4f}", review)):
            cell = QTableWidgetItem(text)
            cell.setFlags(cell.flags() & ~Qt.ItemIsEditable)
            self.review_table.setItem(row, column, cell)

    def _on_review_row_changed(self, row: int, _column: int, previous: int, _pc: int) -> None:
        if row >= 0 and row != previous:
            self.open_review_row(row)

    def _on_review_row_clicked(self, row: int, _column: int) -> None:
        if row != self.controller.state.current:
            self.open_review_row(row)

    def open_review_row(self, row: int) -> None:
        """Open a row of the queue: jump to its slice (or open its image and maps); the
        review clock starts and the edit count restarts."""
        try:
            item = self.controller.state.review[row]
            if item.files is not None:
                source = self._open_folder_row(row, item)
            else:
                layer = find_layer(self.viewer, item.source)
                if layer is None:
                    raise InputError(f"The image layer {item.source!r} is gone: predict "
                                     "again.")
                if item.slice_index is not None:
                    self.go_to_slice(layer, item.slice_index)
                source = layer.name
            self.controller.open_review(row, source)
        except (InputError, OSError, ValueError, IndexError) as exc:
            self._report(str(exc), error=True)
            return
        self._hook_mask_edits()
        self._update_buttons()
        self._report(f"Reviewing {item.title} (mean uncertainty {item.mean_entropy:.3f}): "
                     f"Accept keeps the prediction; or correct '{MASK}' and press Corrected.")

    def go_to_slice(self, layer, index: int) -> None:
        """Show slice ``index`` (axis 0) of ``layer``, through its data-to-world mapping."""
        dims = self.viewer.dims
        point = np.zeros(layer.ndim)
        point[0] = index
        world = float(layer.data_to_world(point)[0])
        axis = dims.ndim - layer.ndim   # the world axis of the layer's axis 0
        start, _stop, step = dims.range[axis]
        dims.set_current_step(axis, int(round((world - start) / step)) if step else 0)

    def _open_folder_row(self, row: int, item: ReviewItem) -> str:
        """Open a folder row's image (``viewer.open``) and its maps as the three layers."""
        from napari.layers import Image

        layer = find_layer(self.viewer, item.source)
        if layer is None:
            opened = self.viewer.open(str(item.files.image))
            layer = next((x for x in opened if isinstance(x, Image)), None)
            if layer is None:
                raise InputError(f"napari opened no image from {item.files.image}.")
        maps = self.controller.read_folder_maps(row)
        self._show_maps(layer, maps.probability, maps.mask, maps.uncertainty,
                        maps.max_entropy, maps.features())
        return layer.name

    def _hook_mask_edits(self) -> None:
        """Count the mask layer's edits: napari emits ``paint`` once per undoable edit (a
        brush stroke, a fill, an erasure, a polygon, ``data_setitem``); undo is not one."""
        layer = find_layer(self.viewer, MASK)
        if layer is None or layer is self._mask_hooked:
            return
        layer.events.paint.connect(self._on_mask_painted)
        self._mask_hooked = layer

    def _on_mask_painted(self, event=None) -> None:
        if not self._updating_layers:
            self.controller.note_edit()

    def mark_review(self, status: str) -> None:
        """Accept (the prediction unmodified) or Corrected (the edited mask) for the open row:
        the case goes into the dataset (appended, corrected) with its review record."""
        if self.busy:
            return
        state = self.controller.state
        try:
            index = state.current
            if index is None:
                raise InputError("Click a row of the review queue first.")
            item = state.review[index]
            layer = find_layer(self.viewer, item.source)
            if layer is None:
                raise InputError(f"The image layer {item.source!r} is gone.")
            z = item.slice_index
            final = None
            if status == "corrected":
                mask_layer = find_layer(self.viewer, MASK)
                if mask_layer is None:
                    raise InputError(f"The '{MASK}' layer is gone: open the row again.")
                final = np.asarray(mask_layer.data if z is None else mask_layer.data[z])
            ndim = layer.ndim
            spacing = tuple(float(s) for s in layer.scale[-ndim:])
            origin = tuple(float(t) for t in layer.translate[-ndim:])
            job = self.controller.prepare_review(
                index, status, np.asarray(layer.data if z is None else layer.data[z]), final,
                folders=self.folders(), dataset_id=self.dataset_spin.value(),
                name=self.name_edit.text().strip(),
                label_name=self.label_edit.text().strip() or "target",
                spacing=spacing[1:] if z is not None else spacing,
                origin=None if z is not None or ndim == 2 else origin, rgb=bool(layer.rgb))
        except InputError as exc:
            self._report(str(exc), error=True)
            return
        self._report(f"Adding {item.title} to the dataset as {status}...")
        self._launch(self.controller.submit_review, job,
                     on_done=lambda outcome: self._on_reviewed(outcome, index))

    def _on_reviewed(self, outcome: Outcome, index: int) -> None:
        if not outcome.ok:
            self._report(outcome.error or "Cancelled.", error=True)
            return
        record = outcome.value
        items = self.controller.state.review
        if index < len(items):
            self._set_review_row(index, items[index])
            title = items[index].title
        else:
            title = "the case"
        self._show_summary(self.controller.state.summary)
        dice = ("" if record.dice_auto_final is None
                else f", Dice automatic vs final {record.dice_auto_final:.3f}")
        self._report(f"Added {title} as {record.status} ({record.seconds:.1f} s, "
                     f"{record.edits} edit(s){dice}).")

    def _show_summary(self, summary) -> None:
        self.review_summary_label.setText(summary.format() if summary is not None else "")

    def load_ranking(self, folder: str | Path, images_dir: str | Path | None = None) -> None:
        """Fill the queue from a folder prediction's ``uncertainty_ranking.csv``."""
        try:
            items = self.controller.load_ranking(folder, images_dir)
        except InputError as exc:
            self._report(str(exc), error=True)
            return
        self._fill_review_table()
        self._report(f"{len(items)} case(s) from {folder}, most uncertain first: click one "
                     "to open it.")

    def _load_ranking_dialog(self) -> None:
        folder = QFileDialog.getExistingDirectory(
            self, "Folder prediction (with uncertainty_ranking.csv)")
        if not folder:
            return
        images = None
        if self.controller.recorded_images_dir(folder) is None:
            images = QFileDialog.getExistingDirectory(self, "Folder of the predicted images")
            if not images:
                return
        self.load_ranking(folder, images)

    # ----------------------------------------------------------------------- settings
    @staticmethod
    def settings_path() -> Path:
        """``$MEDCLIPSAM_CONFIG_DIR`` or the user's config folder, ``training_widget.json``."""
        return SETTINGS.path

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
        with contextlib.suppress(OSError):  # a read-only home must not stop a training
            SETTINGS.save(self.settings())

    def load_settings(self) -> None:
        try:
            state = SETTINGS.load()
            if state is not None:
                self.apply_settings(state)
        except (ValueError, TypeError, KeyError) as exc:
            self._report(str(exc) if isinstance(exc, ValueError)
                         else f"Ignored unreadable settings in {SETTINGS.path}.")


def _estimate_key(status: JobStatus) -> tuple:
    """What the estimate depends on in a job's status (not the epochs of a running job)."""
    return status.phase, status.running, None if status.running else status.epoch


def _set_limits(layer, limits: tuple[float, float]) -> None:
    """Contrast limits of an updated image layer (its range first, so they fit)."""
    layer.contrast_limits_range = limits
    layer.contrast_limits = limits

