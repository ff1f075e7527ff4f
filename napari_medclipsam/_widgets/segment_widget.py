"""The "Text-prompt segmentation" dock widget.

Image layer + text prompt -> BiomedCLIP M2IB saliency -> coarse mask -> boxes/points -> SAM
mask, run by :class:`~napari_medclipsam.core.pipeline.ZeroShotPipeline` in a napari
``thread_worker``. Five layers show every stage (``saliency [prompt]``, ``coarse mask
[prompt]``, ``boxes [prompt]``, ``points [prompt]``, ``SAM mask [prompt]``); editing the
``boxes`` or ``points`` layer re-runs only SAM's decoder from the cached image embedding.

Coordinates: napari layers hold (row, col); the core's boxes are XYXY ``(x0, y0, x1, y1)``
and its points XY ``(column, row)``, both in image pixels. Output layers copy the source
layer's 2-D ``scale`` and ``translate`` so they overlay it exactly.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
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
from napari_medclipsam.core.errors import CancelledError, InputError
from napari_medclipsam.core.postprocess import Prompts

if TYPE_CHECKING:
    import napari

SAM_BACKBONES = ("vit_b", "vit_l", "vit_h", "medsam")
CUSTOM = "(custom)"

# Preset -> prompt ensemble and stage parameters (MedCLIP-SAMv2 scripts' values).
PRESETS: dict[str, dict[str, Any]] = {
    "breast tumor (ultrasound)": {
        "prompt": "breast tumor\na hypoechoic breast tumor in an ultrasound image",
        "layer": 9, "beta": 1.0, "top_k": 1, "box_mode": "single",
    },
    "both lungs (chest X-ray)": {
        "prompt": "both lungs\nleft and right lungs in a chest x-ray",
        "layer": 7, "beta": 0.1, "top_k": 2, "box_mode": "per_component",
    },
    "brain tumor (MRI)": {
        "prompt": "brain tumor\na bright brain tumor in an MRI scan",
        "layer": 9, "beta": 2.0, "top_k": 1, "box_mode": "single",
    },
}


def boxes_to_rectangles(boxes: np.ndarray) -> list[np.ndarray]:
    """XYXY pixel boxes (N, 4) -> napari rectangles, each (4, 2) in (row, col) order."""
    out = []
    for x0, y0, x1, y1 in np.asarray(boxes, dtype=float).reshape(-1, 4):
        out.append(np.array([[y0, x0], [y0, x1], [y1, x1], [y1, x0]], dtype=float))
    return out


def rectangles_to_boxes(shapes: list[np.ndarray], shape_hw: tuple[int, int]) -> np.ndarray:
    """napari shapes (each (k, 2) (row, col) vertices) -> (N, 4) XYXY boxes clipped to the image.

    Each box is the min/max of its shape's vertices; empty input gives a (0, 4) array.
    """
    h, w = shape_hw
    boxes = []
    for verts in shapes:
        verts = np.asarray(verts, dtype=float)[:, -2:]
        y0, x0 = verts.min(axis=0)
        y1, x1 = verts.max(axis=0)
        boxes.append([np.clip(x0, 0, w - 1), np.clip(y0, 0, h - 1),
                      np.clip(x1, 0, w - 1), np.clip(y1, 0, h - 1)])
    return np.asarray(boxes, dtype=np.float32).reshape(-1, 4)


def _prompt_label(lines: list[str]) -> str:
    return lines[0] if len(lines) == 1 else f"{lines[0]} +{len(lines) - 1}"


class SegmentWidget(QWidget):
    """Dock widget: text prompt -> saliency -> coarse mask -> prompts -> SAM mask.

    Parameters
    ----------
    viewer : napari.Viewer
    pipeline : ZeroShotPipeline, optional
        A ready pipeline (tests pass one built on tiny models). Without it, a pipeline is
        built lazily from the model fields when "Run all" is pressed (models are cached by
        :mod:`napari_medclipsam.core.models`).
    """

    _progress_signal = Signal(str, float)

    def __init__(self, viewer: napari.Viewer, pipeline=None):
        super().__init__()
        self.viewer = viewer
        self._pipeline = None
        self._injected = False
        self._worker = None
        self._stop = threading.Event()
        self._updating_layers = False
        self._last: dict[str, Any] | None = None  # rgb, label, names of the last run
        self.running = False
        self.last_status = ""
        self.refine_count = 0

        self._build_ui()
        self._progress_signal.connect(self._on_progress)
        self._refine_timer = QTimer(self)
        self._refine_timer.setSingleShot(True)
        self._refine_timer.setInterval(150)
        self._refine_timer.timeout.connect(self.refine_from_layers)

        for event in (viewer.layers.events.inserted, viewer.layers.events.removed):
            event.connect(self._refresh_layers)
        self._refresh_layers()
        self.load_settings()
        if pipeline is not None:
            self.set_pipeline(pipeline)

    # ----------------------------------------------------------------------- UI
    def _build_ui(self) -> None:
        layout = QVBoxLayout(self)
        form = QFormLayout()
        self.image_combo = QComboBox()
        form.addRow("Image", self.image_combo)
        self.preset_combo = QComboBox()
        self.preset_combo.addItems([CUSTOM, *PRESETS])
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
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 100)
        layout.addWidget(self.progress_bar)
        self.status_label = QLabel("")
        self.status_label.setWordWrap(True)
        layout.addWidget(self.status_label)
        layout.addStretch()
        self.set_fields_from_config(PipelineConfig())

    def _refresh_layers(self, event=None) -> None:
        from napari.layers import Image

        current = self.image_combo.currentText()
        names = [layer.name for layer in self.viewer.layers
                 if isinstance(layer, Image) and not layer.name.startswith("saliency [")]
        self.image_combo.blockSignals(True)
        self.image_combo.clear()
        self.image_combo.addItems(names)
        if current in names:
            self.image_combo.setCurrentText(current)
        self.image_combo.blockSignals(False)

    def apply_preset(self, name: str) -> None:
        """Fill the prompt and parameters of a preset (``(custom)`` changes nothing)."""
        preset = PRESETS.get(name)
        if preset is None:
            return
        self.prompt_edit.setPlainText(preset["prompt"])
        self.layer_spin.setValue(preset["layer"])
        self.beta_spin.setValue(preset["beta"])
        self.topk_spin.setValue(preset["top_k"])
        self.box_mode_combo.setCurrentText(preset["box_mode"])

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

    # ----------------------------------------------------------------------- pipeline
    def set_pipeline(self, pipeline) -> None:
        """Use this pipeline (its models) instead of building one from the model fields."""
        self._pipeline = pipeline
        self._injected = True
        self.set_fields_from_config(pipeline.config)
        for field in (self.clip_edit, self.sam_combo, self.checkpoint_edit, self.device_combo):
            field.setEnabled(False)
            field.setToolTip("Set by the pipeline given to the widget (set_pipeline).")

    def _model_config(self) -> dict[str, Any]:
        device = self.device_combo.currentText().strip()
        return {
            "clip_model": self.clip_edit.text().strip() or DEFAULT_CLIP_MODEL,
            "sam_model": self.sam_combo.currentText(),
            "sam_checkpoint": self.checkpoint_edit.text().strip() or None,
            "device": None if device in ("", "auto") else device,
        }

    def build_config(self, base: PipelineConfig | None = None) -> PipelineConfig:
        """A PipelineConfig from the fields (model fields ignored for an injected pipeline)."""
        base = base or PipelineConfig()
        models = {} if self._injected else self._model_config()
        top_k = self.topk_spin.value() or None
        return dataclasses.replace(
            base, **models,
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

    def pipeline(self):
        """The pipeline for the next run, configured from the fields (built lazily)."""
        from napari_medclipsam.core.pipeline import ZeroShotPipeline

        if self._injected:
            self._pipeline.config = self.build_config(self._pipeline.config)
            return self._pipeline
        config = self.build_config()
        old = self._pipeline
        same_models = old is not None and all(
            getattr(old.config, k) == v for k, v in self._model_config().items())
        if same_models:
            old.config = config
            return old
        self._pipeline = ZeroShotPipeline(config)
        return self._pipeline

    # ----------------------------------------------------------------------- run
    def _source(self):
        name = self.image_combo.currentText()
        if not name or name not in self.viewer.layers:
            raise InputError("Choose an image layer first (open one, or File > Open Sample).")
        layer = self.viewer.layers[name]
        data = np.asarray(layer.data)
        if layer.rgb:
            if data.ndim == 4:
                data = data[self.viewer.dims.current_step[0]]
        elif data.ndim == 3:
            data = data[self.viewer.dims.current_step[0]]
        elif data.ndim != 2:
            raise InputError(f"Layer {name!r} has shape {data.shape}; expected a 2-D image or "
                             "a (Z, Y, X) volume (the current slice is processed).")
        return layer, np.asarray(data)

    def _report(self, message: str, error: bool = False) -> None:
        self.last_status = message
        self.status_label.setText(message)
        if error:
            from napari.utils.notifications import show_error

            show_error(message)

    def _prompt_lines(self) -> list[str]:
        return [line.strip() for line in self.prompt_edit.toPlainText().splitlines()
                if line.strip()]

    def _volume_mode(self, layer) -> bool:
        return (self.all_slices_check.isChecked() and not layer.rgb
                and np.asarray(layer.data).ndim == 3)

    def run_all(self) -> None:
        """Start the whole chain on the chosen layer's image: the slice on screen, or every
        slice of a 3-D stack when "All slices" is checked."""
        if self.running:
            return
        from napari.qt.threading import create_worker

        lines = self._prompt_lines()
        try:
            if not lines:
                raise InputError("Type a prompt first (e.g. 'breast tumor'), or pick a preset.")
            layer, image = self._source()
            volume = self._volume_mode(layer)
            if volume:
                image = np.asarray(layer.data)
            pipe = self.pipeline()
        except (InputError, ValueError) as exc:
            self._report(str(exc), error=True)
            return
        self._stop.clear()
        self.running = True
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.progress_bar.setValue(0)
        self._report("Running (the first run loads the models)...")
        text = lines[0] if len(lines) == 1 else lines
        self._worker = create_worker(self._compute, pipe, image, text, volume,
                                     _start_thread=False)
        self._worker.returned.connect(
            lambda out: self._on_returned(out, layer, _prompt_label(lines), pipe))
        self._worker.errored.connect(self._on_errored)
        self._worker.finished.connect(self._on_finished)
        self._worker.start()

    def _compute(self, pipe, image: np.ndarray, text, volume: bool = False) -> tuple[str, Any]:
        """Runs in the worker thread; returns ``(kind, payload)``, never raises."""
        from napari_medclipsam.core.io import to_rgb_uint8
        from napari_medclipsam.core.models import ModelUnavailableError

        try:
            if volume:
                result = pipe.segment_volume(image, text, progress=self._progress_signal.emit,
                                             should_stop=self._stop.is_set)
                return "volume", (None, result)
            rgb = to_rgb_uint8(image)
            result = pipe.segment(image, text, progress=self._progress_signal.emit,
                                  should_stop=self._stop.is_set)
            return "ok", (rgb, result)
        except CancelledError:
            return "cancelled", "Cancelled."
        except (ModelUnavailableError, InputError, ValueError) as exc:
            return "error", str(exc)
        except Exception as exc:  # a bug: report it, never crash napari
            traceback.print_exc()
            return "error", f"Unexpected error: {type(exc).__name__}: {exc}"

    def cancel(self) -> None:
        """Ask the running computation to stop at its next check."""
        self._stop.set()
        self._refine_timer.stop()
        if self.running:
            self._report("Cancelling...")

    def _on_progress(self, stage: str, fraction: float) -> None:
        self.progress_bar.setValue(int(round(100 * fraction)))
        self.progress_bar.setFormat(f"{stage} %p%")

    def _on_errored(self, exc: Exception) -> None:
        self._report(f"Unexpected error: {type(exc).__name__}: {exc}", error=True)

    def _on_finished(self) -> None:
        self.running = False
        self._worker = None
        self.run_button.setEnabled(True)
        self.cancel_button.setEnabled(False)

    def _on_returned(self, out: tuple[str, Any], layer, label: str, pipe) -> None:
        kind, payload = out
        if kind == "cancelled":
            self.progress_bar.setValue(0)
            self._report("cancelled")
            return
        if kind == "error":
            self._report(payload, error=True)
            return
        rgb, result = payload
        if kind == "volume":
            self._last = None  # live editing works on single slices
            self._show_volume(result, layer, label)
            self._report(f"Something found on {len(result.found_slices)} of "
                         f"{result.mask.shape[0]} slices; mask of {int(result.mask.sum())} "
                         "voxels. Edit a slice by running it alone (All slices unchecked).")
        else:
            self._last = {"rgb": rgb, "label": label, "pipe": pipe}
            self._show_result(result, layer, label)
            self._report(result.message)
        self.save_settings()

    # ----------------------------------------------------------------------- layers
    def layer_name(self, kind: str, label: str | None = None) -> str:
        """``'<kind> [<prompt>]'``, e.g. ``'SAM mask [breast tumor]'``."""
        label = label if label is not None else (self._last or {}).get("label", "")
        return f"{kind} [{label}]"

    def _put(self, kind: str, cls, data, geometry: dict, **kwargs):
        name = self.layer_name(kind)
        layers = self.viewer.layers
        ndim = len(geometry["scale"])
        if name in layers and (not isinstance(layers[name], cls) or layers[name].ndim != ndim):
            layers.remove(name)  # another kind, or 2-D vs 3-D output of an earlier run
        if name in layers:
            layer = layers[name]
            if kind == "boxes":  # keep every shape a rectangle
                layer.selected_data = set()
                layer.data = []
                if len(data):
                    layer.add_rectangles(data)
            else:
                layer.data = data
        else:
            if name in layers:
                layers.remove(name)
            layer = cls(data, name=name, **geometry, **kwargs)
            layers.append(layer)
        layer.scale = geometry["scale"]
        layer.translate = geometry["translate"]
        return layer

    def _show_result(self, result, source, label: str) -> None:
        from napari.layers import Image, Labels, Points, Shapes

        geometry = {"scale": tuple(source.scale[-2:]),
                    "translate": tuple(source.translate[-2:])}
        self._updating_layers = True
        try:
            self._put("saliency", Image, result.saliency, geometry, colormap="inferno",
                      opacity=0.5, blending="additive")
            self._put("coarse mask", Labels, result.coarse.labels.astype(np.int32), geometry,
                      opacity=0.4)
            boxes = self._put("boxes", Shapes, boxes_to_rectangles(result.prompts.boxes),
                              geometry, shape_type="rectangle", edge_color="yellow",
                              face_color="transparent", edge_width=2)
            pts = result.prompts.points[:, ::-1]
            labels = result.prompts.point_labels
            points = self._put("points", Points, pts, geometry,
                               features={"label": labels}, size=6,
                               face_color=self._point_colors(labels) if len(labels) else "lime")
            if len(labels):
                points.features = {"label": labels}
                points.face_color = self._point_colors(labels)
            self._put("SAM mask", Labels, result.mask.astype(np.int32), geometry, opacity=0.6)
        finally:
            self._updating_layers = False
        for layer in (boxes, points):
            if not getattr(layer, "_medclipsam_connected", False):
                layer.events.data.connect(self._on_prompt_edit)
                layer._medclipsam_connected = True

    @staticmethod
    def _point_colors(labels: np.ndarray) -> np.ndarray:
        pos, neg = np.array([0.0, 1.0, 0.0, 1.0]), np.array([1.0, 0.0, 0.0, 1.0])
        return np.array([pos if v == 1 else neg for v in labels]).reshape(-1, 4)

    # ----------------------------------------------------------------------- live refine
    def _on_prompt_edit(self, event=None) -> None:
        if self._updating_layers or self._last is None:
            return
        if getattr(event, "action", None) == "changing":
            return
        self._refine_timer.start()  # restarts: edits within 150 ms coalesce

    def prompts_from_layers(self) -> Prompts:
        """Boxes and points as they are now in the ``boxes`` / ``points`` layers."""
        rgb = self._last["rgb"]
        layers = self.viewer.layers
        boxes = np.zeros((0, 4), np.float32)
        name = self.layer_name("boxes")
        if name in layers:
            boxes = rectangles_to_boxes(layers[name].data, rgb.shape[:2])
        points = np.zeros((0, 2), np.float32)
        labels = np.zeros((0,), np.int32)
        name = self.layer_name("points")
        if name in layers and len(layers[name].data):
            layer = layers[name]
            points = np.asarray(layer.data, dtype=np.float32)[:, -2:][:, ::-1]
            feats = layer.features
            if "label" in feats and len(feats) == len(points):
                labels = np.asarray(feats["label"], dtype=np.int32)
            else:
                labels = np.ones(len(points), np.int32)
        return Prompts(boxes=boxes, points=points, point_labels=labels)

    def refine_from_layers(self) -> None:
        """Re-run only SAM (cached embedding) from the edited prompt layers."""
        if self._last is None or self.running:
            return
        try:
            prompts = self.prompts_from_layers()
            mask = self._last["pipe"].refine(self._last["rgb"], prompts)
        except (InputError, ValueError) as exc:
            self._report(str(exc), error=True)
            return
        name = self.layer_name("SAM mask")
        if name in self.viewer.layers:
            self.viewer.layers[name].data = mask.astype(np.int32)
        self.refine_count += 1
        self._report(f"SAM re-run from {len(prompts.boxes)} box(es) and "
                     f"{len(prompts.points)} point(s): mask of {int(mask.sum())} pixels.")

    # ----------------------------------------------------------------------- 3-D output
    def _show_volume(self, result, source, label: str) -> None:
        from napari.layers import Image, Labels, Points, Shapes

        geometry = {"scale": tuple(source.scale[-3:]), "translate": tuple(source.translate[-3:])}
        rects, points, point_labels = [], [], []
        for z, prompts in sorted(result.prompts.items()):
            for rect in boxes_to_rectangles(prompts.boxes):
                rects.append(np.column_stack([np.full(4, z, np.float32), rect]))
            for (x, y), value in zip(prompts.points, prompts.point_labels, strict=True):
                points.append([z, y, x])
                point_labels.append(value)
        point_labels = np.asarray(point_labels, np.int32)
        self._updating_layers = True
        try:
            self._last = {"label": label}
            self._put("saliency", Image, result.saliency, geometry, colormap="inferno",
                      opacity=0.5, blending="additive")
            self._put("coarse mask", Labels, result.coarse.astype(np.int32), geometry,
                      opacity=0.4)
            self._put("boxes", Shapes, rects, geometry, shape_type="rectangle", ndim=3,
                      edge_color="yellow", face_color="transparent", edge_width=2)
            self._put("points", Points, np.asarray(points, np.float32).reshape(-1, 3),
                      geometry, ndim=3, features={"label": point_labels}, size=6,
                      face_color=self._point_colors(point_labels) if len(points) else "lime")
            self._put("SAM mask", Labels, result.mask.astype(np.int32), geometry, opacity=0.6)
        finally:
            self._updating_layers = False
            self._last = None

    # ----------------------------------------------------------------------- mask -> prompts
    def prompts_from_mask(self) -> None:
        """Regenerate boxes and points from the (edited) ``coarse mask`` layer, then run SAM.

        Every connected region painted in the coarse mask counts as a component, whatever
        its label value; the prompt settings (mode, box mode, points) apply as in a run.
        """
        from skimage.measure import label as label_components

        from napari_medclipsam.core.postprocess import make_prompts

        if self._last is None or "rgb" not in self._last:
            self._report("Run a single slice first; then paint the coarse mask and press "
                         "Boxes from mask.", error=True)
            return
        name = self.layer_name("coarse mask")
        if name not in self.viewer.layers:
            self._report(f"No layer {name!r} to read the mask from.", error=True)
            return
        mask = np.asarray(self.viewer.layers[name].data) > 0
        if not mask.any():
            self._report("The coarse mask is empty: paint the target first.", error=True)
            return
        labels = label_components(mask, connectivity=2).astype(np.int32)
        config = self._last["pipe"].config
        prompts = make_prompts(labels, config.prompts)
        self._updating_layers = True
        try:
            boxes = self.viewer.layers[self.layer_name("boxes")]
            boxes.selected_data = set()
            boxes.data = []
            if len(prompts.boxes):
                boxes.add_rectangles(boxes_to_rectangles(prompts.boxes))
            points = self.viewer.layers[self.layer_name("points")]
            points.data = prompts.points[:, ::-1]
            points.features = {"label": prompts.point_labels}
            if len(prompts.point_labels):
                points.face_color = self._point_colors(prompts.point_labels)
        finally:
            self._updating_layers = False
        self.refine_from_layers()

    # ----------------------------------------------------------------------- runs and settings
    def run_state(self) -> dict[str, Any]:
        """What reproduces a run: prompt lines, every parameter and the models."""
        from napari_medclipsam import __version__

        base = self._pipeline.config if self._pipeline is not None else None
        return {"prompt": self._prompt_lines(), "config": self.build_config(base).to_dict(),
                "all_slices": self.all_slices_check.isChecked(),
                "napari_medclipsam": __version__}

    def apply_state(self, state: dict[str, Any]) -> None:
        """Fill the widget from :meth:`run_state`'s dictionary (e.g. a saved run)."""
        config = PipelineConfig.from_dict(state.get("config", {}))
        self.prompt_edit.setPlainText("\n".join(state.get("prompt", [])))
        self.set_fields_from_config(config)
        self.all_slices_check.setChecked(bool(state.get("all_slices", False)))
        if not self._injected:
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
        folder = os.environ.get("MEDCLIPSAM_CONFIG_DIR")
        if not folder:
            import platformdirs

            folder = platformdirs.user_config_dir("napari-medclipsam")
        return Path(folder) / "segment_widget.json"

    def save_settings(self) -> None:
        """Remember the prompt, models and parameters for the next session."""
        try:
            self.save_run(self.settings_path())
        except OSError as exc:  # a read-only home must not break a run
            self._report(f"{self.last_status} (settings not saved: {exc})")

    def load_settings(self) -> None:
        path = self.settings_path()
        if not path.is_file():
            return
        try:
            self.apply_state(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError, KeyError):
            self._report(f"Ignored unreadable settings in {path}.")
