"""The "Text-prompt segmentation" dock widget: a thin Qt view over
:class:`~napari_medclipsam._widgets.segment_controller.SegmentController`.

Image layer + text prompt -> BiomedCLIP M2IB saliency -> coarse mask -> boxes/points -> SAM
mask, computed by the controller in a napari worker thread. Five layers per target show every
stage (``saliency [prompt]``, ``coarse mask [prompt]``, ``boxes [prompt]``, ``points
[prompt]``, ``SAM mask [prompt]``), aligned with the source image (its scale and translate);
a rerun of a target updates its layers in place. Editing the ``boxes`` or ``points`` layer
re-runs only SAM's decoder from the cached image embedding. **Accept into label map** writes
the SAM mask into one ``label map`` Labels layer where each target has its own value and
name (shown by napari as the label's ``name`` feature), undoably.

napari opens this class from the Plugins menu and passes the viewer as ``napari_viewer``.
"""

from __future__ import annotations

import dataclasses
import json
import threading
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

from napari_medclipsam._widgets.common import (
    Outcome,
    SettingsStore,
    find_layer,
    geometry_of,
    is_stack,
    layer_names,
    put_layer,
    report,
    set_combo_items,
    slice_index,
    start_worker,
)
from napari_medclipsam._widgets.layer_prompts import (
    boxes_to_rectangles,
    point_colors,
    points_to_layer,
    prompts_from_layer_data,
    volume_prompts_to_layers,
)
from napari_medclipsam._widgets.segment_controller import Run, SegmentController, Target
from napari_medclipsam.core.config import (
    BOX_MODES,
    DEFAULT_CLIP_MODEL,
    PROMPT_MODES,
    THRESHOLD_METHODS,
    CoarseMaskConfig,
    PipelineConfig,
    PromptConfig,
    SaliencyConfig,
)
from napari_medclipsam.core.errors import InputError
from napari_medclipsam.core.postprocess import Prompts
from napari_medclipsam.core.presets import list_presets

if TYPE_CHECKING:
    import napari

SAM_BACKBONES = ("vit_b", "vit_l", "vit_h", "medsam")
CUSTOM = "(custom)"
LABEL_MAP = "label map"
SETTINGS = SettingsStore("segment_widget.json")

KINDS = ("saliency", "coarse mask", "boxes", "points", "SAM mask")


def output_name(kind: str, target: str) -> str:
    """``'<kind> [<target>]'``, e.g. ``'SAM mask [breast tumor]'``."""
    return f"{kind} [{target}]"


class SegmentWidget(QWidget):
    """Dock widget: text prompt -> saliency -> coarse mask -> prompts -> SAM mask.

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer
        Passed by napari when the widget is opened from the Plugins menu.

    Attributes
    ----------
    controller : SegmentController
        The Qt-free state and actions; :meth:`set_pipeline` gives it ready models.
    running : bool
        True while a Run all computes.
    last_status : str
        The last message shown.
    """

    _progress_signal = Signal(str, float)

    def __init__(self, napari_viewer: napari.viewer.Viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.controller = SegmentController()
        self._preset_config: PipelineConfig | None = None
        self._worker = None
        self._stop = threading.Event()
        self._updating_layers = False
        self._connected: set[str] = set()  # prompt layers whose edits re-run SAM
        self.running = False
        self.last_status = ""

        self._build_ui()
        self._progress_signal.connect(self._on_progress)
        self._refine_timer = QTimer(self)
        self._refine_timer.setSingleShot(True)
        self._refine_timer.setInterval(150)
        self._refine_timer.timeout.connect(self.refine_from_layers)

        for event in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            event.connect(self._refresh_layers)
        self._refresh_layers()
        self.load_settings()

    # ----------------------------------------------------------------------- UI
    def _build_ui(self) -> None:
        layout = QVBoxLayout(self)
        form = QFormLayout()
        self.image_combo = QComboBox()
        form.addRow("Image", self.image_combo)
        self.preset_combo = QComboBox()
        self.preset_combo.addItems([CUSTOM, *(p.title for p in list_presets())])
        self.preset_combo.setToolTip(
            "The authors' settings per task of the paper's Table 1 (and the paper's own coarse "
            "mask): prompt, saliency layer/beta/seed, coarse mask, prompts and SAM model.")
        self.preset_combo.currentTextChanged.connect(self.apply_preset)
        form.addRow("Preset", self.preset_combo)
        self.prompt_edit = QPlainTextEdit()
        self.prompt_edit.setPlaceholderText("one prompt per line (several lines = ensemble)")
        self.prompt_edit.setFixedHeight(60)
        form.addRow("Prompt", self.prompt_edit)
        layout.addLayout(form)

        models = QCollapsible("Models")
        mform_widget = QWidget()
        mform = QFormLayout(mform_widget)
        self.clip_edit = QLineEdit(DEFAULT_CLIP_MODEL)
        self.clip_edit.setToolTip("hf-hub:ID, local-dir:PATH or a folder")
        mform.addRow("CLIP", self.clip_edit)
        self.sam_combo = QComboBox()
        self.sam_combo.addItems(SAM_BACKBONES)
        self.sam_combo.setCurrentText("vit_h")
        mform.addRow("SAM", self.sam_combo)
        self.checkpoint_edit = QLineEdit()
        self.checkpoint_edit.setPlaceholderText("optional local .pth (else downloaded)")
        mform.addRow("SAM checkpoint", self.checkpoint_edit)
        self.device_combo = QComboBox()
        self.device_combo.setEditable(True)
        self.device_combo.addItems(["auto", "cpu", "cuda", "mps"])
        mform.addRow("Device", self.device_combo)
        models.addWidget(mform_widget)
        layout.addWidget(models)

        advanced = QCollapsible("Advanced parameters")
        aform_widget = QWidget()
        aform = QFormLayout(aform_widget)
        self.layer_spin = QSpinBox()
        self.layer_spin.setRange(0, 47)
        self.layer_spin.setToolTip("ViT block after which the M2IB bottleneck is inserted")
        aform.addRow("Layer", self.layer_spin)
        self.beta_spin = QDoubleSpinBox()
        self.beta_spin.setRange(0.0, 100.0)
        self.beta_spin.setDecimals(3)
        self.beta_spin.setSingleStep(0.1)
        aform.addRow("Beta", self.beta_spin)
        self.steps_spin = QSpinBox()
        self.steps_spin.setRange(1, 1000)
        aform.addRow("Steps", self.steps_spin)
        self.method_combo = QComboBox()
        self.method_combo.addItems(THRESHOLD_METHODS)
        aform.addRow("Threshold", self.method_combo)
        self.eta_spin = QDoubleSpinBox()
        self.eta_spin.setRange(0.0, 1.0)
        self.eta_spin.setDecimals(3)
        self.eta_spin.setSingleStep(0.05)
        aform.addRow("eta_c", self.eta_spin)
        self.topk_spin = QSpinBox()
        self.topk_spin.setRange(0, 100)
        self.topk_spin.setSpecialValueText("all")
        aform.addRow("Top-k", self.topk_spin)
        self.mode_combo = QComboBox()
        self.mode_combo.addItems(PROMPT_MODES)
        aform.addRow("Prompt mode", self.mode_combo)
        self.box_mode_combo = QComboBox()
        self.box_mode_combo.addItems(BOX_MODES)
        aform.addRow("Box mode", self.box_mode_combo)
        advanced.addWidget(aform_widget)
        layout.addWidget(advanced)

        buttons = QHBoxLayout()
        self.run_button = QPushButton("Run all")
        self.run_button.clicked.connect(self.run_all)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        layout.addLayout(buttons)
        self.all_slices_check = QCheckBox("All slices (3D stacks)")
        self.all_slices_check.setToolTip(
            "Unchecked: only the slice on screen. Checked: every slice, with 3-D output layers "
            "(SAM's image embedding is computed once per slice).")
        layout.addWidget(self.all_slices_check)
        more = QHBoxLayout()
        self.mask_button = QPushButton("Boxes from mask")
        self.mask_button.setToolTip("New boxes/points from the (painted) coarse mask, then SAM.")
        self.mask_button.clicked.connect(self.prompts_from_mask)
        self.save_button = QPushButton("Save run...")
        self.save_button.clicked.connect(self._save_dialog)
        self.load_button = QPushButton("Load run...")
        self.load_button.clicked.connect(self._load_dialog)
        for button in (self.mask_button, self.save_button, self.load_button):
            more.addWidget(button)
        layout.addLayout(more)
        accept = QHBoxLayout()
        self.accept_button = QPushButton("Accept into label map")
        self.accept_button.setToolTip(
            f"Write the SAM mask into the '{LABEL_MAP}' layer as this target's label "
            "(Ctrl+Z in that layer undoes it).")
        self.accept_button.clicked.connect(self.accept_mask)
        self.overwrite_check = QCheckBox("Overwrite other targets")
        self.overwrite_check.setToolTip(
            "Unchecked: voxels already labelled as another target are kept.")
        accept.addWidget(self.accept_button)
        accept.addWidget(self.overwrite_check)
        layout.addLayout(accept)
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 100)
        layout.addWidget(self.progress_bar)
        self.status_label = QLabel("")
        self.status_label.setWordWrap(True)
        layout.addWidget(self.status_label)
        layout.addStretch()
        self.set_fields_from_config(PipelineConfig())

    def _refresh_layers(self, event=None) -> None:
        set_combo_items(self.image_combo, layer_names(
            self.viewer, "image", skip=lambda name: name.startswith("saliency [")))

    @property
    def refine_count(self) -> int:
        """How many times SAM re-ran from edited prompts (tests and benchmarks read it)."""
        return self.controller.state.refine_count

    def apply_preset(self, title: str) -> None:
        """Apply the preset with this title (see :mod:`napari_medclipsam.core.presets`): its
        prompts, and every setting it fixes, shown ones and hidden ones (seed, readout, KMeans
        size, ranking) alike. ``(custom)`` keeps the fields and drops the hidden settings."""
        preset = next((p for p in list_presets() if p.title == title), None)
        if preset is None:
            self._preset_config = None
            return
        self._preset_config = preset.apply(PipelineConfig())
        self.prompt_edit.setPlainText(preset.prompt_text)
        self.set_fields_from_config(self._preset_config)
        if not self.controller.injected:
            self.sam_combo.setCurrentText(self._preset_config.sam_model)
        self.preset_combo.setToolTip(f"{preset.name}: {preset.description}\n{preset.summary()}")

    def set_fields_from_config(self, config: PipelineConfig) -> None:
        """Show a config's stage parameters in the advanced fields."""
        self.layer_spin.setValue(config.saliency.layer)
        self.beta_spin.setValue(config.saliency.beta)
        self.steps_spin.setValue(config.saliency.steps)
        self.method_combo.setCurrentText(config.coarse.method)
        self.eta_spin.setValue(config.coarse.eta_c)
        self.topk_spin.setValue(config.coarse.top_k or 0)
        self.mode_combo.setCurrentText(config.prompts.mode)
        self.box_mode_combo.setCurrentText(config.prompts.box_mode)

    # ----------------------------------------------------------------------- models
    def set_pipeline(self, pipeline) -> None:
        """Use this pipeline's models (e.g. tiny test models, or models already loaded)
        instead of loading them from the model fields."""
        self.controller = SegmentController(pipeline)
        self.set_fields_from_config(pipeline.config)
        for widget in (self.clip_edit, self.sam_combo, self.checkpoint_edit,
                       self.device_combo):
            widget.setEnabled(False)
            widget.setToolTip("Set by the pipeline given to the widget (set_pipeline).")

    def _model_config(self) -> dict[str, Any]:
        device = self.device_combo.currentText().strip()
        return {
            "clip_model": self.clip_edit.text().strip() or DEFAULT_CLIP_MODEL,
            "sam_model": self.sam_combo.currentText(),
            "sam_checkpoint": self.checkpoint_edit.text().strip() or None,
            "device": None if device in ("", "auto") else device,
        }

    def build_config(self, base: PipelineConfig | None = None) -> PipelineConfig:
        """A PipelineConfig from the fields."""
        base = base or PipelineConfig()
        top_k = self.topk_spin.value() or None
        return dataclasses.replace(
            base, **self._model_config(),
            saliency=dataclasses.replace(base.saliency or SaliencyConfig(),
                                         layer=self.layer_spin.value(),
                                         beta=self.beta_spin.value(),
                                         steps=self.steps_spin.value()),
            coarse=dataclasses.replace(base.coarse or CoarseMaskConfig(),
                                       method=self.method_combo.currentText(),
                                       eta_c=self.eta_spin.value(), top_k=top_k),
            prompts=dataclasses.replace(base.prompts or PromptConfig(),
                                        mode=self.mode_combo.currentText(),
                                        box_mode=self.box_mode_combo.currentText()),
        )

    def _base_config(self) -> PipelineConfig | None:
        """The settings the fields do not show: a chosen preset's, else the pipeline's."""
        if self._preset_config is not None:
            return self._preset_config
        pipeline = self.controller.pipeline
        return pipeline.config if pipeline is not None else None

    # ----------------------------------------------------------------------- run all
    def _prompt_lines(self) -> list[str]:
        return [line.strip() for line in self.prompt_edit.toPlainText().splitlines()
                if line.strip()]

    def _source(self) -> tuple[Any, np.ndarray, int | None, bool]:
        """The chosen layer, the array to process, its slice index and volume mode."""
        name = self.image_combo.currentText()
        if not name or name not in self.viewer.layers:
            raise InputError("Choose an image layer first (open one, or File > Open Sample).")
        layer = self.viewer.layers[name]
        data = layer.data
        if getattr(layer, "multiscale", False):
            raise InputError(f"Layer {name!r} is multiscale; open it at one resolution.")
        spatial = layer.ndim
        if spatial == 2:
            return layer, np.asarray(data), None, False
        if spatial == 3 and is_stack(layer):
            if self.all_slices_check.isChecked():
                return layer, np.asarray(data), None, True
            z = slice_index(self.viewer, layer)
            return layer, np.asarray(data[z]), z, False
        raise InputError(f"Layer {name!r} has shape {np.shape(data)}; expected a 2-D image, "
                         "an RGB image or a (Z, Y, X) volume.")

    def _report(self, message: str, error: bool = False) -> None:
        self.last_status = message
        report(self.status_label, message, error)

    def run_all(self) -> None:
        """Start the whole chain on the chosen layer: the slice on screen, or every slice of
        a 3-D stack when "All slices" is checked."""
        if self.running:
            return
        lines = self._prompt_lines()
        try:
            layer, image, z, volume = self._source()
            if not lines:
                raise InputError("Type a prompt first (e.g. 'breast tumor'), or pick a preset.")
            self.controller.configure(self.build_config(self._base_config()))
        except (InputError, ValueError) as exc:
            self._report(str(exc), error=True)
            return
        self._stop.clear()
        self._set_running(True)
        self.progress_bar.setValue(0)
        self._report("Running (the first run loads the models)...")
        self._worker = start_worker(
            self.controller.run_all, image, lines, source=layer.name, slice_index=z,
            volume=volume, progress=self._progress_signal.emit, should_stop=self._stop.is_set,
            on_done=self._on_done, on_finished=lambda: self._set_running(False))

    def _set_running(self, running: bool) -> None:
        self.running = running
        if not running:
            self._worker = None
        self.run_button.setEnabled(not running)
        self.cancel_button.setEnabled(running)

    def cancel(self) -> None:
        """Ask the running computation to stop at its next check."""
        self._stop.set()
        self._refine_timer.stop()
        if self.running:
            self._report("Cancelling...")

    def _on_progress(self, stage: str, fraction: float) -> None:
        self.progress_bar.setValue(int(round(100 * fraction)))
        self.progress_bar.setFormat(f"{stage} %p%")

    def _on_done(self, outcome: Outcome) -> None:
        if outcome.cancelled:
            self.progress_bar.setValue(0)
            self._report("Cancelled.")
            return
        if not outcome.ok:
            self._report(outcome.error, error=True)
            return
        run: Run = outcome.value
        source = find_layer(self.viewer, run.source)
        if source is None:
            self._report(f"The image layer {run.source!r} was removed during the run.",
                         error=True)
            return
        if run.volume is not None:
            self._show_volume(run, source)
            self._report(f"Something found on {len(run.volume.found_slices)} of "
                         f"{run.mask.shape[0]} slices; mask of {int(run.mask.sum())} voxels. "
                         "Edit a slice by running it alone (All slices unchecked).")
        else:
            self._show_result(run, source)
            self._report(run.result.message)
        self.save_settings()

    # ----------------------------------------------------------------------- layers
    def _show_result(self, run: Run, source) -> None:
        result, name = run.result, run.target.name
        geometry = geometry_of(source, 2)
        prompts = result.prompts
        self._updating_layers = True
        try:
            put_layer(self.viewer, output_name("saliency", name), "image", result.saliency,
                      geometry, colormap="inferno", opacity=0.5, blending="additive")
            put_layer(self.viewer, output_name("coarse mask", name), "labels",
                      result.coarse.labels.astype(np.int32), geometry, opacity=0.4)
            boxes = put_layer(self.viewer, output_name("boxes", name), "shapes",
                              boxes_to_rectangles(prompts.boxes), geometry,
                              shape_type="rectangle", edge_color="yellow",
                              face_color="transparent", edge_width=2)
            labels = prompts.point_labels
            points = put_layer(self.viewer, output_name("points", name), "points",
                               points_to_layer(prompts.points), geometry,
                               features={"label": labels}, size=6,
                               face_color=point_colors(labels) if len(labels) else "lime")
            put_layer(self.viewer, output_name("SAM mask", name), "labels",
                      result.mask.astype(np.int32), geometry, opacity=0.6)
        finally:
            self._updating_layers = False
        for layer in (boxes, points):
            if layer.name not in self._connected:
                layer.events.data.connect(self._on_prompt_edit)
                self._connected.add(layer.name)

    def _show_volume(self, run: Run, source) -> None:
        vol, name = run.volume, run.target.name
        geometry = geometry_of(source, 3)
        rects, points, labels = volume_prompts_to_layers(vol.prompts)
        self._updating_layers = True
        try:
            put_layer(self.viewer, output_name("saliency", name), "image", vol.saliency,
                      geometry, colormap="inferno", opacity=0.5, blending="additive")
            put_layer(self.viewer, output_name("coarse mask", name), "labels",
                      vol.coarse.astype(np.int32), geometry, opacity=0.4)
            put_layer(self.viewer, output_name("boxes", name), "shapes", rects, geometry,
                      shape_type="rectangle", ndim=3, edge_color="yellow",
                      face_color="transparent", edge_width=2)
            put_layer(self.viewer, output_name("points", name), "points", points, geometry,
                      ndim=3, features={"label": labels}, size=6,
                      face_color=point_colors(labels) if len(labels) else "lime")
            put_layer(self.viewer, output_name("SAM mask", name), "labels",
                      vol.mask.astype(np.int32), geometry, opacity=0.6)
        finally:
            self._updating_layers = False

    # ----------------------------------------------------------------------- live refine
    def _current_run(self) -> Run | None:
        run = self.controller.state.run
        return run if run is not None and run.editable else None

    def _on_prompt_edit(self, event=None) -> None:
        if self._updating_layers or getattr(event, "action", None) == "changing":
            return
        run = self._current_run()
        source = getattr(event, "source", None)
        if run is None or (source is not None and not source.name.endswith(
                f"[{run.target.name}]")):
            return  # an older target's prompt layer: not the run that is cached
        self._refine_timer.start()  # restarts: edits within 150 ms coalesce

    def prompts_from_layers(self) -> Prompts:
        """Boxes and points of the current target as they are now in its layers."""
        run = self._current_run()
        if run is None:
            raise InputError("Run a single slice first (All slices unchecked).")
        boxes = find_layer(self.viewer, output_name("boxes", run.target.name))
        points = find_layer(self.viewer, output_name("points", run.target.name))
        return prompts_from_layer_data(
            boxes.data if boxes is not None else None,
            np.asarray(points.data) if points is not None else None,
            points.features if points is not None else None, run.result.rgb.shape[:2])

    def refine_from_layers(self) -> None:
        """Re-run only SAM (cached embedding) from the edited prompt layers."""
        run = self._current_run()
        if run is None or self.running:
            return
        try:
            prompts = self.prompts_from_layers()
            mask = self.controller.refine(prompts)
        except (InputError, ValueError) as exc:
            self._report(str(exc), error=True)
            return
        name = output_name("SAM mask", run.target.name)
        if name in self.viewer.layers:
            self.viewer.layers[name].data = mask.astype(np.int32)
        self._report(f"SAM re-run from {len(prompts.boxes)} box(es) and "
                     f"{len(prompts.points)} point(s): mask of {int(mask.sum())} pixels.")

    def prompts_from_mask(self) -> None:
        """Regenerate boxes and points from the (edited) ``coarse mask`` layer, then run SAM.

        Every connected region painted in the coarse mask counts as a component, whatever
        its label value; the prompt settings (mode, box mode, points) apply as in a run.
        """
        run = self._current_run()
        try:
            if run is None:
                raise InputError("Run a single slice first; then paint the coarse mask and "
                                 "press Boxes from mask.")
            name = output_name("coarse mask", run.target.name)
            if name not in self.viewer.layers:
                raise InputError(f"No layer {name!r} to read the mask from.")
            prompts = self.controller.prompts_from_mask(
                np.asarray(self.viewer.layers[name].data), self.build_config().prompts)
        except InputError as exc:
            self._report(str(exc), error=True)
            return
        target = run.target.name
        self._updating_layers = True
        try:
            geometry = geometry_of(self.viewer.layers[name], 2)
            put_layer(self.viewer, output_name("boxes", target), "shapes",
                      boxes_to_rectangles(prompts.boxes), geometry, shape_type="rectangle",
                      edge_color="yellow", face_color="transparent", edge_width=2)
            put_layer(self.viewer, output_name("points", target), "points",
                      points_to_layer(prompts.points), geometry,
                      features={"label": prompts.point_labels}, size=6,
                      face_color=point_colors(prompts.point_labels))
        finally:
            self._updating_layers = False
        self.refine_from_layers()

    # ----------------------------------------------------------------------- label map
    def label_map_layer(self, create: bool = True):
        """The ``label map`` Labels layer of the current run's image (created on demand,
        aligned with it, with a ``name`` feature per label value)."""
        run = self.controller.state.run
        if run is None:
            raise InputError("Nothing to accept yet: press Run all first.")
        if run.source not in self.viewer.layers:
            raise InputError(f"The image layer {run.source!r} is gone.")
        source = self.viewer.layers[run.source]
        spatial = source.data.shape[:-1] if source.rgb else source.data.shape
        if LABEL_MAP in self.viewer.layers:
            layer = self.viewer.layers[LABEL_MAP]
            if tuple(layer.data.shape) != tuple(spatial):
                raise InputError(f"The '{LABEL_MAP}' layer {tuple(layer.data.shape)} belongs "
                                 f"to another image ({tuple(spatial)}): rename or remove it.")
            return layer
        if not create:
            return None
        return put_layer(self.viewer, LABEL_MAP, "labels", np.zeros(spatial, np.int32),
                         geometry_of(source, len(spatial)), opacity=0.5)

    def _name_labels(self, layer) -> None:
        """Give the label map a ``name`` feature: napari shows it for the label under the
        cursor, and the training widget exports it as the class names."""
        import pandas as pd

        targets: list[Target] = self.controller.state.targets
        known = {t.value: t.name for t in targets}
        existing = layer.features
        if "index" in existing and "name" in existing:
            for value, name in zip(existing["index"], existing["name"], strict=True):
                known.setdefault(int(value), str(name))
        values = sorted(known)
        layer.features = pd.DataFrame({"index": [0, *values],
                                       "name": ["background", *(known[v] for v in values)]})

    def accept_mask(self) -> None:
        """Write the current target's ``SAM mask`` layer, as the user left it (painted
        corrections included), into the label map as its label (undoable)."""
        try:
            layer = self.label_map_layer()
            run = self.controller.state.run
            sam = find_layer(self.viewer, output_name("SAM mask", run.target.name))
            mask = np.asarray(sam.data) > 0 if sam is not None else run.mask
            index, values = self.controller.accept(
                layer.data, mask, run.target, slice_index=run.slice_index,
                overwrite=self.overwrite_check.isChecked())
        except InputError as exc:
            self._report(str(exc), error=True)
            return
        self._name_labels(layer)
        layer.data_setitem(index, values)
        target = run.target
        self._report(f"Accepted '{target.name}' as label {target.value} of '{LABEL_MAP}' "
                     f"({len(values)} voxel(s) changed; Ctrl+Z in that layer undoes it).")

    # ----------------------------------------------------------------------- runs and settings
    def run_state(self) -> dict[str, Any]:
        """What reproduces a run: prompt lines, every parameter and the models."""
        from napari_medclipsam import __version__

        return {"prompt": self._prompt_lines(),
                "config": self.build_config(self._base_config()).to_dict(),
                "all_slices": self.all_slices_check.isChecked(),
                "napari_medclipsam": __version__}

    def apply_state(self, state: dict[str, Any]) -> None:
        """Fill the widget from :meth:`run_state`'s dictionary (e.g. a saved run)."""
        config = PipelineConfig.from_dict(state.get("config", {}))
        self._preset_config = config  # its settings the fields do not show are kept too
        self.preset_combo.blockSignals(True)
        self.preset_combo.setCurrentText(CUSTOM)
        self.preset_combo.blockSignals(False)
        self.prompt_edit.setPlainText("\n".join(state.get("prompt", [])))
        self.set_fields_from_config(config)
        self.all_slices_check.setChecked(bool(state.get("all_slices", False)))
        if not self.controller.injected:
            self.clip_edit.setText(config.clip_model)
            self.sam_combo.setCurrentText(config.sam_model)
            self.checkpoint_edit.setText(config.sam_checkpoint or "")
            self.device_combo.setCurrentText(config.device or "auto")

    def save_run(self, path: str | Path) -> None:
        """Write the run's prompt, models and parameters as JSON (atomically)."""
        from napari_medclipsam.core.io import write_text

        write_text(path, json.dumps(self.run_state(), indent=2) + "\n")

    def load_run(self, path: str | Path) -> None:
        """Fill the widget from a saved run (or a ``medclipsam segment`` manifest's config)."""
        try:
            data = json.loads(Path(path).read_text())
            if "config" not in data and "saliency" in data:  # a bare PipelineConfig
                data = {"config": data}
            self.apply_state(data)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            self._report(f"Could not load {path}: {exc}", error=True)
            return
        self._report(f"Loaded {path}.")

    def _save_dialog(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Save run", "medclipsam_run.json",
                                              "JSON (*.json)")
        if path:
            self.save_run(path)
            self._report(f"Saved {path}.")

    def _load_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Load run", "", "JSON (*.json)")
        if path:
            self.load_run(path)

    @staticmethod
    def settings_path() -> Path:
        """``$MEDCLIPSAM_CONFIG_DIR`` or the user's config folder, ``segment_widget.json``."""
        return SETTINGS.path

    def save_settings(self) -> None:
        """Remember the prompt, models and parameters for the next session."""
        try:
            SETTINGS.save(self.run_state())
        except OSError as exc:  # a read-only home must not break a run
            self._report(f"{self.last_status} (settings not saved: {exc})")

    def load_settings(self) -> None:
        try:
            state = SETTINGS.load()
            if state is not None:
                self.apply_state(state)
        except (ValueError, TypeError, KeyError) as exc:
            self._report(str(exc) if isinstance(exc, ValueError)
                         else f"Ignored unreadable settings in {SETTINGS.path}.")
