"""The "Text-prompt segmentation" dock widget: a thin Qt view over
:class:`~napari_medclipsam._widgets.segment_controller.SegmentController`.

Image layer + text prompt -> BiomedCLIP M2IB saliency -> coarse mask -> boxes/points -> SAM
mask, computed by the controller in a napari worker thread, with the stage it is in (loading a
model, saliency step k/N, encoding, slice n/N and the time left) on the progress bar. Five
layers per target show every stage (``saliency [prompt]``, ``coarse mask [prompt]``, ``boxes
[prompt]``, ``points [prompt]``, ``SAM mask [prompt]``), aligned with the source image (its
scale and translate); a rerun of a target updates its layers in place, and once SAM has run
the saliency and coarse mask are hidden (the "Show saliency and coarse mask" box shows them).
Editing the ``boxes`` or ``points`` layer re-runs only SAM's decoder from the cached image
embedding. All slices writes each slice into the layers as it finishes, so Cancel keeps the
finished ones. **Accept into label map** writes the SAM mask into one ``label map`` Labels
layer where each target has its own value and name, undoably; **Save mask...** writes the
mask (and the label map) as NIfTI in the scan's geometry, or PNG. **Propagate through
volume** (3-D images) carries the target's masks (the slice run, slices accepted or painted
in the label map) through the volume with SAM 2's video predictor and writes the result into
the label map, undoably; slices corrected by hand there are kept as they are.

The Method field chooses the chain: MedCLIP-SAMv2 (above) or SaLIP (SAM's automatic masks,
the one CLIP scores best against the text -> its box -> SAM). A SaLIP run shows the retrieval
map (``retrieval map [prompt]``, in the saliency's place), every proposal under the area cap
as a ``proposals [prompt]`` Labels layer (its features: CLIP score, area, retrieved rank) and
the retrieved boxes, editable as above. VLSM (CLIPSeg / BiomedCLIPSeg: a released CLIPSeg, or
a model trained with ``medclipsam vlsm train``, chosen in the VLSM box under the Method) gives
the text's foreground probability (``VLSM probability [prompt]``, in the saliency's place),
its pixels above the threshold are the mask (largest regions, as top-k says) and, with
"Refine with SAM", SAM segments the mask's boxes; without it SAM is not loaded, until a box
is edited (then SAM loads once, in a worker, and re-runs from the edited box).

Every run also checks whether the text steered the result (the prompt's map against a
neutral prompt's, :mod:`napari_medclipsam.core.faithfulness`): its score shows under the
status line, and when the text does not steer, an orange warning there and a napari
notification. Advanced holds its settings (on/off, neutral and contrast prompts, the
correlation to warn at).

**Tune on my corrections...** searches the chain's settings on the cases a person
corrected: it asks for the nnU-Net dataset the "Pseudo-labels & training" dock exported (that
dock's dataset when it is open), uses only its cases marked corrected, and runs the
calibration (k-fold cross-validated Dice against the corrections, the current settings as the
defaults) in a worker, with progress on the bar and Cancel. The tuned settings are applied to
the fields when they beat the current ones on held-out cases (**Undo tuning** puts the
previous ones back; otherwise the current ones are kept), the preset and its report (CSV,
PNG) go to ``DATASET/medclipsam_tuned/`` (numbered, never over an earlier one), and a line
under the button gives the cross-validated Dice, defaults -> tuned, with the calibration's
warning in orange when the gain is within the folds' noise.

**Models > Compute on** sends Run all, All slices and Propagate through volume to a GPU
machine: a Dask scheduler's address (``tcp://gpu-box:8786``; the field's tooltip gives the
commands that start one there) instead of this machine. The line under it says what is
there once connected (Enter in the field, or the first run): its workers and their GPUs. The
progress says ``sent to``, ``running on <host> (<device>)`` and the worker's stages; the
layers are the same; a single image's SAM embedding comes back with it, so box and point
edits run SAM's decoder here (SAM loads here once, on the first edit). Errors there (a model
missing on that machine, no scheduler at the address) are the usual one-line error; Cancel
stops the worker's run. The address is saved with the settings.

napari opens this class from the Plugins menu and passes the viewer as ``napari_viewer``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import html
import json
import re
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import Qt, QTimer, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QFrame,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSizePolicy,
    QSpinBox,
    QStyle,
    QVBoxLayout,
    QWidget,
)
from superqt import QCollapsible

from napari_medclipsam._widgets.common import (
    MAP_KINDS,
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
from napari_medclipsam._widgets.segment_controller import (
    CONTRAST_SEPARATOR,
    FIELD_LABELS,
    TUNED_FOLDER,
    AutoChoice,
    FaithfulnessView,
    ProgressTracker,
    ProgressUpdate,
    Propagation,
    Run,
    SegmentController,
    Target,
    Tuning,
    VlsmSource,
    auto_choice,
    cancel_message,
    describe_settings,
    faithfulness_view,
    format_duration,
    gui_message,
    join_contrast_prompts,
    matching_presets,
    proposal_labels,
    save_mask,
    slice_list,
    split_contrast_prompts,
    target_name,
    trained_vlsm_folder,
    vlsm_source_info,
)
from napari_medclipsam.core.config import (
    DEFAULT_CLIP_MODEL,
    DEFAULT_VLSM_MODEL,
    PRECISIONS,
    CoarseMaskConfig,
    FaithfulnessConfig,
    PipelineConfig,
    PromptConfig,
    SaliencyConfig,
    SalipConfig,
    VlsmConfig,
)
from napari_medclipsam.core.errors import InputError
from napari_medclipsam.core.models import SAM_MODELS
from napari_medclipsam.core.postprocess import Prompts
from napari_medclipsam.core.presets import Preset, list_presets
from napari_medclipsam.remote import (
    EXAMPLE_ADDRESS,
    SCHEDULER_COMMAND,
    THIS_MACHINE,
    WORKER_COMMAND,
    RemoteStatus,
    compute_address,
)

if TYPE_CHECKING:
    import napari

CUSTOM = "(custom)"
LABEL_MAP = "label map"
SETTINGS = SettingsStore("segment_widget.json")
#: the last dataset tuned on, the grid and the folds
TUNING_SETTINGS = SettingsStore("segment_tuning.json")

KINDS = ("saliency", "coarse mask", "boxes", "points", "SAM mask")
#: the layers of the steps before SAM, hidden once SAM has run
STEP_KINDS = ("saliency", "coarse mask")
#: SaLIP's layers: its retrieval map (in the saliency's place) and every proposal
RETRIEVAL = MAP_KINDS["salip"]
PROPOSALS = "proposals"
SALIP = "salip"
#: the VLSM chain and its probability layer (in the saliency's place)
VLSM = "vlsm"
VLSM_PROBABILITY = MAP_KINDS[VLSM]

# (value, what the menu shows) of the choice fields
THRESHOLD_CHOICES = (("otsu", "Otsu (paper)"), ("kmeans", "KMeans (authors' code)"),
                     ("fixed", "fixed 0.3"), ("crf", "DenseCRF"))
# Short names: the field is narrow; the tooltip says which paper each comes from.
SALIENCY_CHOICES = (("m2ib", "M2IB"), ("gscorecam", "gScoreCAM"), ("gradcam", "GradCAM"))
PROMPT_CHOICES = (("boxes", "boxes"), ("points", "points"), ("both", "boxes + points"))
BOX_CHOICES = (("single", "one box for all"), ("per_component", "one box per region"))
# The chain (PipelineConfig.method); short names, the tooltip names the papers.
METHOD_CHOICES = (("medclipsamv2", "MedCLIP-SAMv2"), (SALIP, "SaLIP"),
                  (VLSM, "VLSM (CLIPSeg/BiomedCLIPSeg)"))  # fits a 1366x768 dock
#: how the tooltips name each method
METHOD_NAMES = {"medclipsamv2": "MedCLIP-SAMv2", SALIP: "SaLIP", VLSM: "VLSM"}
CROP_CHOICES = (("mask", "mask (SaLIP)"), ("box", "box"))
# Tune on my corrections: the calibration grids (core.calibrate.SearchSpace.named)
GRID_CHOICES = (("small", "quick"), ("default", "full"))
#: the faithfulness line: plain, and when the text does not steer (orange reads on napari's
#: dark and light themes)
FAITH_STYLE = "font-size: 11px;"
FAITH_WARNING_STYLE = "color: #f08c00;"
#: what the progress line says while SAM loads for a box edit (after a VLSM run without it)
BOX_EDIT = "Box edit"
#: the line under the VLSM Model field, and when it names no usable model
VLSM_INFO_STYLE = "color: gray; font-size: 11px;"
VLSM_ERROR_STYLE = "color: #e5534b; font-size: 11px;"

#: Advanced fields of some chains only (greyed out while another is chosen); top-k serves all
MEDCLIP_KEYS = ("saliency_method", "layer", "beta", "steps", "method")
SALIP_KEYS = ("salip_points_per_side", "salip_pred_iou_thresh", "salip_stability_thresh",
              "salip_area_cap", "salip_crop", "salip_box_nms_thresh", "salip_crop_n_layers",
              "salip_crop_nms_thresh", "salip_min_region_area")
#: the VLSM's mask goes through the coarse mask's confidence filter and prompts as M2IB's does
SHARED_KEYS = ("eta_c", "mode", "box_mode")
FIELD_METHODS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(MEDCLIP_KEYS, ("medclipsamv2",)),
    **dict.fromkeys(SALIP_KEYS, (SALIP,)),
    **dict.fromkeys(SHARED_KEYS, ("medclipsamv2", VLSM)),
}


def not_used_tip(methods: tuple[str, ...], method: str) -> str:
    """``"SaLIP only: not used while Method is VLSM."``: the tooltip of a greyed field."""
    owners = " and ".join(METHOD_NAMES[m] for m in methods)
    return f"{owners} only: not used while Method is {METHOD_NAMES[method]}."


def topk_key(method: str) -> str:
    """Whose top-k the Regions kept field holds: SaLIP's own, else the coarse mask's (the
    VLSM chain keeps its mask's regions by it too)."""
    return SALIP if method == SALIP else "medclipsamv2"

TIPS = {
    "image": "The image to segment. On a 3-D stack: this layer's slice on screen, or every "
             "slice with 'All slices'.",
    "prompt": "What to find, in plain words (e.g. 'breast tumor'). Several lines are "
              "averaged into one prompt (an ensemble).",
    "saliency_method": "How the text's saliency map is computed: M2IB (MedCLIP-SAMv2, the "
                       "default), gScoreCAM (its predecessor MedCLIP-SAM; slower: it scores "
                       "300 masked copies of the image) or GradCAM (fastest, coarsest). "
                       "Layer, focus and steps apply to M2IB only.",
    "layer": "Which block of CLIP's image encoder (0 = first) the text is compared at. Earlier "
             "blocks see finer detail, later ones more meaning. Presets: 9 for breast and "
             "brain, 7 for lungs.",
    "beta": "How hard the saliency map is squeezed to what the text explains: higher gives "
            "a smaller, tighter map, lower a broader one. Presets: 1 breast, 2 brain, 0.1 "
            "lungs.",
    "steps": "Optimisation steps of the saliency map (the paper uses 10): more is slower and "
             "steadier.",
    "method": "How the saliency map becomes a rough mask: Otsu's automatic threshold (the "
              "paper), two KMeans clusters (the authors' code), a fixed threshold of 0.3, "
              "or DenseCRF (MedCLIP-SAM: the map refined along the image's edges).",
    "eta_c": "Minimum confidence (the paper's eta_c): a region of the rough mask whose average "
             "saliency is not above this (0 to 1) is dropped. 0 keeps every region.",
    "top_k": "How many regions of the rough mask go to SAM: 1 for one structure, 2 for paired "
             "organs such as the lungs; 'all' keeps every region.",
    "mode": "What SAM is given: boxes around the regions (best in the paper for 3 of 4 "
            "tasks), points sampled inside them, or both.",
    "box_mode": "One box around all kept regions, or one box per region (lungs: one per "
                "lung).",
    "clip": "The CLIP model: a Hugging Face id (hf-hub:..., downloaded once) or a folder on "
            "this computer (Browse...: the folder with open_clip_config.json and the weights).",
    "sam": "The SAM model. auto chooses by device: vit_h (the paper's) on a GPU, sam2_t "
           "(SAM 2.1 tiny, a first mask in seconds) on a CPU. SAM: vit_b (fast), vit_l, "
           "vit_h, medsam (MedSAM). SAM 2.1: sam2_t, sam2_s, sam2_b+, sam2_l (tiny to large), "
           "medsam2 (MedSAM2, a medical SAM 2.1 tiny); "
           "Propagate through volume uses their video predictor (SAM models pass each "
           "slice's box to the next).",
    "precision": "Numeric precision of CLIP's saliency and SAM's image encoder. auto: bf16 "
                 "where the device runs it natively (recent CPUs and GPUs; about 2x faster, "
                 "masks agree with fp32), else fp32. fp32 is the exact path.",
    "propagate": "Carry the target's mask through the whole volume (SAM 2: its video "
                 "predictor; SAM: each slice's box prompts the next). Seeds: the slice run "
                 "(its SAM mask as you left it) and the slices of this target in the label "
                 "map; with none, the prompt finds the best slice. Slices you painted or "
                 "erased in the label map after the tool wrote them are kept as they are. "
                 "Writes into the label map (Ctrl+Z there undoes it); Cancel keeps the "
                 "slices done.",
    "checkpoint": "A SAM checkpoint file (.pth) on this computer; empty: the official one is "
                  "downloaded once.",
    "device": "auto picks a GPU when there is one, else the CPU (with Compute on: there).",
    "compute_on": (f"Where Run all, All slices and Propagate through volume compute:\n"
                   f"{THIS_MACHINE} (empty), or the Dask scheduler of a GPU machine, e.g. "
                   f"{EXAMPLE_ADDRESS}.\n\nOn that machine, in this package's environment:\n"
                   f"    {SCHEDULER_COMMAND}\n"
                   f"    {WORKER_COMMAND.format(address=EXAMPLE_ADDRESS)}\n"
                   "(one worker per GPU; MEDCLIPSAM_HOME there names the folder its models\n"
                   "are read from or downloaded to). The model and Device fields then name\n"
                   "the models there.\n\nThe image goes there and the layers come back as "
                   "usual, with SAM's\nimage embedding: box and point edits run SAM's decoder "
                   "here\n(SAM loads here once, on the first edit)."),
    "all_slices": "Unchecked: only the slice on screen (its boxes can be edited). Checked: "
                  "every slice, written into the layers as each one finishes; Cancel keeps "
                  "the finished slices.",
    "pipeline_method": "The chain.\nMedCLIP-SAMv2 (Koleilat et al., 2024): the text's "
                       "saliency map in BiomedCLIP -> a rough mask -> its boxes -> SAM.\n"
                       "SaLIP (Aleem et al., CVPRW 2024): SAM proposes the image's parts, "
                       "CLIP picks the part the text names -> its box -> SAM.\nVLSM "
                       "(CLIPSeg, Lüddecke and Ecker 2022; BiomedCLIPSeg, Poudel et al. "
                       "2023): a vision-language segmentation model gives the text's "
                       "probability per pixel -> the mask above its threshold (-> its boxes "
                       "-> SAM with Refine with SAM). Released CLIPSeg works zero-shot; a "
                       "model trained on your corrected labels (medclipsam vlsm train) knows "
                       "your data.\nEach has its own settings (VLSM: under the Method; the "
                       "others in Advanced); the others' are greyed out.",
    "vlsm_model": "The VLSM: a folder 'medclipsam vlsm train' wrote (vlsm.json and the "
                  "decoder; Browse...), released CLIPSeg weights by their Hugging Face id "
                  f"({DEFAULT_VLSM_MODEL}, downloaded once) or a CLIPSeg folder as "
                  "local-dir:PATH. The line below says what it is; a trained model names "
                  "the classes it learnt: type one of them as the prompt.",
    "vlsm_threshold": "Probability (0 to 1) above which a pixel belongs to the mask (0.5, "
                      "medvlsm's). Lower finds more, higher less.",
    "vlsm_refine": "Give the VLSM mask's boxes (or points: Advanced > SAM prompt) to SAM and "
                   "keep SAM's mask, usually sharper at the edges. Off: the VLSM's own mask, "
                   "and SAM is not loaded (until you edit a box).",
    "vlsm_clip": "Not used while Method is VLSM: CLIPSeg has its own CLIP, and a "
                 "BiomedCLIPSeg folder names the CLIP it was trained on.",
    "salip_points_per_side": "SaLIP: the grid of points SAM proposes masks from, per side. "
                             "More finds smaller structures and takes longer (16: 256 "
                             "points).",
    "salip_pred_iou_thresh": "SaLIP: proposals whose quality (the IoU SAM predicts for "
                             "them, 0 to 1) is not above this are dropped. Lower keeps more.",
    "salip_stability_thresh": "SaLIP: proposals whose stability (how little the mask "
                              "changes with SAM's threshold, 0 to 1) is not above this are "
                              "dropped. Lower keeps more.",
    "salip_area_cap": "SaLIP: proposals covering more of the image than this are dropped "
                      "(the background, the whole body). Raise it for large structures.",
    "salip_crop": "What CLIP scores of each proposal: the image inside its mask, the rest "
                  "black (SaLIP's crops), or the whole box around it.",
    "salip_box_nms_thresh": "SaLIP: of two proposals whose boxes overlap more than this "
                            "(IoU), the weaker is dropped. 1 keeps both.",
    "salip_crop_n_layers": "SaLIP: SAM also proposes on crops of the image: 1 adds the four "
                           "quarters (SaLIP), 2 sixteen more. Each crop is one more pass "
                           "of SAM's image encoder.",
    "salip_crop_nms_thresh": "SaLIP: as Box NMS, between proposals of different crop "
                             "layers.",
    "salip_min_region_area": "SaLIP: holes and islands of a proposal smaller than this are "
                             "removed. 0 keeps them.",
    "salip_top_k": "SaLIP: how many proposals CLIP retrieves (best score first) and SAM "
                   "segments: 1 for one structure, 2 for paired organs such as the lungs.",
    "show_proposals": "SaLIP: show every proposal under the area cap as the 'proposals "
                      "[prompt]' layer, smaller ones on top; the cursor over one shows its "
                      "CLIP score, area and retrieved rank (1 = sent to SAM).",
    "faithfulness": "Does the text steer the result? Each run also maps a neutral prompt "
                    "(and any contrast prompts) on the same image with the same settings, "
                    "and shows the score 1 - r (r: the maps' correlation; higher is better) "
                    "under the status line, with a warning when the text is not guiding the "
                    "result. Costs one more saliency optimisation per extra prompt (SaLIP: "
                    "next to nothing; VLSM: one more prompt in the same pass). Every "
                    "method.",
    "neutral_prompt": "A prompt that names nothing (default 'an image'); empty: the empty "
                      "prompt. A map much like its map was not steered by your text.",
    "contrast_prompts": "Prompts your result must differ from, e.g. 'normal breast "
                        "tissue'; separate several with semicolons (;). Each costs one more "
                        "saliency optimisation.",
    "max_correlation": "Warn when the prompt's map is at least this correlated (Pearson's "
                       "r, 0 to 1) with the neutral or a contrast prompt's map.",
    "tune": "Find the settings that fit your data from the cases you corrected. Choose the "
            "nnU-Net dataset the 'Pseudo-labels & training' dock exported: only its cases "
            "marked 'corrected by hand' are used, each with the prompt above. The saliency "
            "layer and focus, coarse mask, regions kept and boxes are searched; each fold's "
            "choice is scored on cases it was not tuned on (k-fold cross-validated Dice), "
            "next to the current settings. The best are applied here when they beat the "
            "current ones on held-out cases (Undo tuning puts these back); the preset and "
            "its report (CSV, PNG) go to "
            f"DATASET/{TUNED_FOLDER}/ (Load settings... reads the preset).",
    "tune_grid": "quick: saliency layers 7 and 9 x focus 0.1 and 1, Otsu or KMeans, 1 or 2 "
                 "regions, one box or one per region (32 combinations, 4 saliency maps per "
                 "case: minutes on a CPU for 10 cases). full: also layer 8, focus 2, min. "
                 "confidence 0.5, a 2% box margin and points (360 combinations, 9 maps per "
                 "case). Layers are BiomedCLIP's (12 blocks); for a CLIP of another depth they "
                 "move to the same relative depth.",
    "tune_folds": "k of the k-fold cross-validation: the corrected cases are split in k "
                  "groups, each scored with settings tuned on the others. Needs at least k "
                  "corrected cases.",
}


#: what Run all does, per method (its tooltip)
RUN_TIPS = {
    "medclipsamv2": "Saliency, coarse mask, boxes and SAM on the chosen image.",
    SALIP: "SAM's proposals, CLIP's pick among them, its box and SAM on the chosen image.",
    VLSM: "The VLSM's probability for the prompt, its mask above the threshold (and SAM on "
          "its boxes with Refine with SAM) on the chosen image.",
}


def map_kind(method: str) -> str:
    """The kind of a run's first layer: ``saliency``, ``retrieval map`` for SaLIP, ``VLSM
    probability`` for a VLSM."""
    return MAP_KINDS.get(method, MAP_KINDS["medclipsamv2"])


def output_name(kind: str, target: str) -> str:
    """``'<kind> [<target>]'``, e.g. ``'SAM mask [breast tumor]'``."""
    return f"{kind} [{target}]"


def combo_value(combo: QComboBox) -> str:
    """The value behind a choice field's current item (its text when it has none)."""
    data = combo.currentData()
    return str(data) if data is not None else combo.currentText()


def set_combo_value(combo: QComboBox, value: str) -> None:
    """Select the item of ``value`` (item data, else text)."""
    index = combo.findData(value)
    if index < 0:
        index = combo.findText(value)
    if index >= 0:
        combo.setCurrentIndex(index)


def _with_button(edit: QWidget, button: QPushButton) -> QWidget:
    """A field with a button on its right (e.g. Browse...)."""
    box = QWidget()
    row = QHBoxLayout(box)
    row.setContentsMargins(0, 0, 0, 0)
    row.addWidget(edit, 1)
    row.addWidget(button)
    return box


def _fraction_spin() -> QDoubleSpinBox:
    """A field for a value in [0, 1] (thresholds, IoUs)."""
    spin = QDoubleSpinBox()
    spin.setRange(0.0, 1.0)
    spin.setDecimals(2)
    spin.setSingleStep(0.05)
    return spin


def _choice_combo(choices: tuple[tuple[str, str], ...]) -> QComboBox:
    """A combo box showing plain words, each item holding its config value as data."""
    combo = QComboBox()
    for value, text in choices:
        combo.addItem(text, value)
    return combo


@dataclasses.dataclass
class LiveVolume:
    """Where an All slices run writes each slice as it finishes."""

    target: str
    source: str
    shape: tuple[int, ...]
    started: bool = False
    method: str = "medclipsamv2"


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
    last_faithfulness : FaithfulnessView or None
        The last run's prompt-faithfulness check as shown under the status line (None:
        none shown).
    progress_log : list of ProgressUpdate
        Every progress report of the last run, in order (stage name, fraction, ETA).
    last_tuning : Tuning or None
        The last finished Tune on my corrections (its result, the files written).
    """

    _progress_signal = Signal(str, float)
    _slice_signal = Signal(int, object)

    def __init__(self, napari_viewer: napari.viewer.Viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.controller = SegmentController()
        self._preset_config: PipelineConfig | None = None
        self._preset_title: str | None = None
        self._worker = None
        self._stop = threading.Event()
        self._updating_layers = False
        self._connected: set[str] = set()  # prompt layers whose edits re-run SAM
        self._tracker = ProgressTracker()
        self._live: LiveVolume | None = None
        self.progress_log: list[ProgressUpdate] = self._tracker.updates
        self.running = False
        self.last_status = ""
        self.last_faithfulness: FaithfulnessView | None = None
        self.auto: AutoChoice | None = None  # what "auto" means on the chosen device
        self._auto_worker = None
        self._compute_worker = None  # the connection check of the Compute on field
        #: the last Compute on check: the scheduler's workers, or None
        self.compute_status: RemoteStatus | None = None
        #: what the VLSM Model field names (the line under it) and for which text
        self.vlsm_info: VlsmSource | None = None
        self._vlsm_info_source: str | None = None
        self._edited_while_loading = False  # a box edit while SAM loaded for an earlier one
        self._activity = "Running"  # what the progress line says: Running, Tuning
        self.last_tuning: Tuning | None = None
        #: the settings before the last applied tuning (Undo tuning), and its preset title
        self._before_tuning: tuple[dict[str, Any], str | None] | None = None

        self._build_ui()
        self._progress_signal.connect(self._on_progress)
        self._slice_signal.connect(self._on_slice)
        self._refine_timer = QTimer(self)
        self._refine_timer.setSingleShot(True)
        self._refine_timer.setInterval(150)
        self._refine_timer.timeout.connect(self.refine_from_layers)

        for event in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            event.connect(self._refresh_layers)
        self.viewer.dims.events.current_step.connect(self._update_settings_line)
        self._refresh_layers()
        self.load_settings()
        self._resolve_auto()
        self._update_settings_line()
        self._update_suggestion()

    # ----------------------------------------------------------------------- UI
    def _build_ui(self) -> None:
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        scroll = QScrollArea()  # fits a 1366x768 laptop screen whatever is expanded
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QFrame.NoFrame)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        content = QWidget()
        scroll.setWidget(content)
        outer.addWidget(scroll)
        self.scroll_area = scroll
        layout = QVBoxLayout(content)

        form = QFormLayout()
        self.image_combo = QComboBox()
        self.image_combo.setToolTip(TIPS["image"])
        self.image_combo.currentTextChanged.connect(self._update_settings_line)
        self.image_combo.currentTextChanged.connect(self._update_propagate_button)
        form.addRow("Image layer", self.image_combo)
        self.chain_combo = _choice_combo(METHOD_CHOICES)  # the Method field
        self.chain_combo.setToolTip(TIPS["pipeline_method"])
        method_label = QLabel("Method")
        method_label.setToolTip(TIPS["pipeline_method"])
        form.addRow(method_label, self.chain_combo)
        form.addRow(self._build_vlsm_box())
        self.preset_combo = QComboBox()
        self.preset_combo.addItems([CUSTOM, *(p.title for p in list_presets())])
        self.preset_combo.setToolTip(
            "The authors' settings per task of the paper's Table 1 (and the paper's own coarse "
            "mask): prompt, saliency layer/beta/seed, coarse mask, prompts and SAM model.")
        self.preset_combo.currentTextChanged.connect(self.apply_preset)
        form.addRow("Preset", self.preset_combo)
        self.prompt_edit = QPlainTextEdit()
        self.prompt_edit.setPlaceholderText("e.g. breast tumor (one prompt per line; several "
                                            "lines are averaged)")
        self.prompt_edit.setToolTip(TIPS["prompt"])
        self.prompt_edit.setFixedHeight(54)
        self.prompt_edit.textChanged.connect(self._update_suggestion)
        form.addRow("Prompt", self.prompt_edit)
        layout.addLayout(form)

        self.suggestion_row = QWidget()
        row = QHBoxLayout(self.suggestion_row)
        row.setContentsMargins(0, 0, 0, 0)
        self.suggestion_label = QLabel("")
        self.suggestion_label.setWordWrap(True)
        self.suggest_button = QPushButton("Apply")
        self.suggest_button.setToolTip("Use this preset's settings (your prompt is kept).")
        self.suggest_button.clicked.connect(self.apply_suggested_preset)
        row.addWidget(self.suggestion_label, 1)
        row.addWidget(self.suggest_button)
        self.suggestion_row.setVisible(False)
        layout.addWidget(self.suggestion_row)
        self.settings_label = QLabel("")
        self.settings_label.setWordWrap(True)
        self.settings_label.setStyleSheet("color: gray; font-size: 11px;")
        self.settings_label.setToolTip("The settings the next Run all uses.")
        layout.addWidget(self.settings_label)

        buttons = QHBoxLayout()
        self.run_button = QPushButton("Run all")
        self.run_button.setToolTip("Saliency, coarse mask, boxes and SAM on the chosen image.")
        self.run_button.clicked.connect(self.run_all)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        layout.addLayout(buttons)
        self.all_slices_check = QCheckBox("All slices (3-D stacks)")
        self.all_slices_check.setToolTip(TIPS["all_slices"])
        self.all_slices_check.toggled.connect(self._update_settings_line)
        layout.addWidget(self.all_slices_check)
        self.propagate_button = QPushButton("Propagate through volume")
        self.propagate_button.setToolTip(TIPS["propagate"])
        self.propagate_button.clicked.connect(self.propagate)
        layout.addWidget(self.propagate_button)
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 100)
        self.progress_bar.setFormat("ready")
        self.progress_bar.setValue(0)
        layout.addWidget(self.progress_bar)
        self.status_label = QLabel("")
        self.status_label.setWordWrap(True)
        self.status_label.setSizePolicy(QSizePolicy.Preferred, QSizePolicy.Minimum)
        layout.addWidget(self.status_label)
        self.faithfulness_row = QWidget()  # the run's faithfulness check, under the status
        row = QHBoxLayout(self.faithfulness_row)
        row.setContentsMargins(0, 0, 0, 0)
        self.faithfulness_icon = QLabel()
        size = self.style().pixelMetric(QStyle.PM_SmallIconSize)
        self.faithfulness_icon.setPixmap(
            self.style().standardIcon(QStyle.SP_MessageBoxWarning).pixmap(size, size))
        self.faithfulness_icon.setAlignment(Qt.AlignTop)
        self.faithfulness_label = QLabel("")
        self.faithfulness_label.setWordWrap(True)
        self.faithfulness_label.setSizePolicy(QSizePolicy.Preferred, QSizePolicy.Minimum)
        self.faithfulness_label.setToolTip(TIPS["faithfulness"])
        row.addWidget(self.faithfulness_icon, 0, Qt.AlignTop)
        row.addWidget(self.faithfulness_label, 1)
        self.faithfulness_row.setVisible(False)
        layout.addWidget(self.faithfulness_row)

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
        more = QHBoxLayout()
        self.save_mask_button = QPushButton("Save mask...")
        self.save_mask_button.setToolTip(
            "Write the SAM mask (and the label map, when there is one) as NIfTI in the "
            "scan's geometry (.nii.gz), or PNG for a 2-D image.")
        self.save_mask_button.clicked.connect(self._save_mask_dialog)
        self.mask_button = QPushButton("Boxes from mask")
        self.mask_button.setToolTip("New boxes/points from the (painted) coarse mask, then SAM.")
        self.mask_button.clicked.connect(self.prompts_from_mask)
        more.addWidget(self.save_mask_button)
        more.addWidget(self.mask_button)
        layout.addLayout(more)
        self.steps_check = QCheckBox("Show saliency and coarse mask")
        self.steps_check.setToolTip(
            "The steps before SAM, hidden once SAM has run so its mask stays readable (they "
            "stay in the layer list).")
        self.steps_check.toggled.connect(self._on_steps_toggled)
        layout.addWidget(self.steps_check)
        self.proposals_check = QCheckBox("Show proposals")
        self.proposals_check.setChecked(True)
        self.proposals_check.setToolTip(TIPS["show_proposals"])
        self.proposals_check.toggled.connect(self._on_proposals_toggled)
        layout.addWidget(self.proposals_check)

        models = QCollapsible("Models")
        mform_widget = QWidget()
        mform = QFormLayout(mform_widget)
        self.clip_edit = QLineEdit(DEFAULT_CLIP_MODEL)
        self.clip_edit.setToolTip(TIPS["clip"])
        self.clip_browse_button = QPushButton("Browse...")
        self.clip_browse_button.setToolTip("Choose a CLIP model folder on this computer.")
        self.clip_browse_button.clicked.connect(self._browse_clip)
        self.clip_label = QLabel("CLIP model")
        mform.addRow(self.clip_label, _with_button(self.clip_edit, self.clip_browse_button))
        self.sam_combo = QComboBox()
        for name in SAM_MODELS:  # "auto" first; its text says what it resolves to
            self.sam_combo.addItem("auto (by device)" if name == "auto" else name, name)
        self.sam_combo.setToolTip(TIPS["sam"])
        self.sam_combo.currentIndexChanged.connect(self._update_settings_line)
        mform.addRow("SAM model", self.sam_combo)
        self.precision_combo = QComboBox()
        for name in PRECISIONS:
            self.precision_combo.addItem("auto (by device)" if name == "auto" else name, name)
        self.precision_combo.setToolTip(TIPS["precision"])
        mform.addRow("Precision", self.precision_combo)
        self.checkpoint_edit = QLineEdit()
        self.checkpoint_edit.setPlaceholderText("empty: download the official file once")
        self.checkpoint_edit.setToolTip(TIPS["checkpoint"])
        self.checkpoint_browse_button = QPushButton("Browse...")
        self.checkpoint_browse_button.setToolTip("Choose a SAM checkpoint file (.pth).")
        self.checkpoint_browse_button.clicked.connect(self._browse_checkpoint)
        mform.addRow("SAM checkpoint", _with_button(self.checkpoint_edit,
                                                    self.checkpoint_browse_button))
        self.device_combo = QComboBox()
        self.device_combo.setEditable(True)
        self.device_combo.addItems(["auto", "cpu", "cuda", "mps"])
        self.device_combo.setToolTip(TIPS["device"])
        self.device_combo.currentTextChanged.connect(self._resolve_auto)
        mform.addRow("Device", self.device_combo)
        self.auto_label = QLabel("auto: chosen by device (vit_h on a GPU, sam2_t on a CPU)")
        self.auto_label.setWordWrap(True)
        self.auto_label.setStyleSheet("color: gray; font-size: 11px;")
        self.auto_label.setToolTip("What 'auto' means on the device chosen above.")
        mform.addRow(self.auto_label)
        self.compute_edit = QLineEdit()
        self.compute_edit.setPlaceholderText(f"{THIS_MACHINE} (or {EXAMPLE_ADDRESS})")
        self.compute_edit.setToolTip(TIPS["compute_on"])
        self.compute_edit.setClearButtonEnabled(True)
        self.compute_edit.editingFinished.connect(self.check_compute_on)
        self.compute_edit.textChanged.connect(self._update_settings_line)
        self.compute_edit.textChanged.connect(lambda *args: self._describe_compute_on(True))
        compute_label = QLabel("Compute on")
        compute_label.setToolTip("This machine, or a GPU machine's Dask scheduler "
                                 "(the field's tooltip says how to start one).")
        mform.addRow(compute_label, self.compute_edit)
        self.compute_label = QLabel(f"Runs on {THIS_MACHINE}.")
        self.compute_label.setWordWrap(True)
        self.compute_label.setStyleSheet(VLSM_INFO_STYLE)
        self.compute_label.setToolTip("Where the next run computes: the scheduler's workers "
                                      "and their GPUs.")
        mform.addRow(self.compute_label)
        models.addWidget(mform_widget)
        layout.addWidget(models)

        advanced = QCollapsible("Advanced")
        aform_widget = QWidget()
        aform = QFormLayout(aform_widget)
        label = {key: text.split(" > ", 1)[-1] for key, text in FIELD_LABELS.items()}
        self.saliency_combo = _choice_combo(SALIENCY_CHOICES)
        self.layer_spin = QSpinBox()
        self.layer_spin.setRange(0, 47)
        self.beta_spin = QDoubleSpinBox()
        self.beta_spin.setRange(0.0, 100.0)
        self.beta_spin.setDecimals(3)
        self.beta_spin.setSingleStep(0.1)
        self.steps_spin = QSpinBox()
        self.steps_spin.setRange(1, 1000)
        self.method_combo = _choice_combo(THRESHOLD_CHOICES)
        self.eta_spin = QDoubleSpinBox()
        self.eta_spin.setRange(0.0, 1.0)
        self.eta_spin.setDecimals(3)
        self.eta_spin.setSingleStep(0.05)
        self.topk_spin = QSpinBox()
        self.topk_spin.setRange(0, 100)
        self.topk_spin.setSpecialValueText("all")
        # one field, two settings: the coarse mask's top-k, or SaLIP's (0 "all" is not one)
        self._top_k = {"medclipsamv2": 1, SALIP: 1}
        self._top_k_method = "medclipsamv2"  # whose top-k the field shows
        self.topk_spin.valueChanged.connect(self._on_topk_changed)
        self.mode_combo = _choice_combo(PROMPT_CHOICES)
        self.box_mode_combo = _choice_combo(BOX_CHOICES)
        self.salip_points_spin = QSpinBox()
        self.salip_points_spin.setRange(1, 64)
        self.salip_iou_spin = _fraction_spin()
        self.salip_stability_spin = _fraction_spin()
        self.salip_area_spin = QDoubleSpinBox()  # percent of the image
        self.salip_area_spin.setRange(0.01, 100.0)
        self.salip_area_spin.setDecimals(2)
        self.salip_area_spin.setSingleStep(5.0)
        self.salip_area_spin.setSuffix("%")
        self.salip_crop_combo = _choice_combo(CROP_CHOICES)
        self.salip_box_nms_spin = _fraction_spin()
        self.salip_layers_spin = QSpinBox()
        self.salip_layers_spin.setRange(0, 3)
        self.salip_crop_nms_spin = _fraction_spin()
        self.salip_min_region_spin = QDoubleSpinBox()  # percent of the image
        self.salip_min_region_spin.setRange(0.0, 100.0)
        self.salip_min_region_spin.setDecimals(2)
        self.salip_min_region_spin.setSingleStep(0.1)
        self.salip_min_region_spin.setSuffix("%")
        salip_header = QLabel("SaLIP")
        salip_header.setStyleSheet("font-weight: bold;")
        salip_header.setToolTip("The settings of Method: SaLIP (SAM's automatic mask "
                                "generator and the CLIP retrieval of its proposals).")
        #: key -> (field, its label): greyed out together while the other method is chosen
        self._fields: dict[str, tuple[QWidget, QLabel]] = {}

        def add_row(key: str, widget: QWidget) -> None:
            widget.setToolTip(TIPS[key])
            field_label = QLabel(label[key])
            field_label.setToolTip(TIPS[key])
            aform.addRow(field_label, widget)
            self._fields[key] = (widget, field_label)
            signal = (widget.currentIndexChanged if isinstance(widget, QComboBox)
                      else widget.valueChanged)
            signal.connect(self._update_settings_line)

        for key, widget in (("saliency_method", self.saliency_combo),
                            ("layer", self.layer_spin), ("beta", self.beta_spin),
                            ("steps", self.steps_spin), ("method", self.method_combo),
                            ("eta_c", self.eta_spin), ("top_k", self.topk_spin),
                            ("mode", self.mode_combo), ("box_mode", self.box_mode_combo)):
            add_row(key, widget)
        aform.addRow(salip_header)
        self.salip_header = salip_header
        for key, widget in (("salip_points_per_side", self.salip_points_spin),
                            ("salip_pred_iou_thresh", self.salip_iou_spin),
                            ("salip_stability_thresh", self.salip_stability_spin),
                            ("salip_area_cap", self.salip_area_spin),
                            ("salip_crop", self.salip_crop_combo),
                            ("salip_box_nms_thresh", self.salip_box_nms_spin),
                            ("salip_crop_n_layers", self.salip_layers_spin),
                            ("salip_crop_nms_thresh", self.salip_crop_nms_spin),
                            ("salip_min_region_area", self.salip_min_region_spin)):
            add_row(key, widget)
        self._build_faithfulness_fields(aform, label)
        self.chain_combo.currentIndexChanged.connect(self._on_method_changed)
        advanced.addWidget(aform_widget)
        layout.addWidget(advanced)

        files = QHBoxLayout()
        self.save_button = QPushButton("Save settings...")
        self.save_button.setToolTip("The prompt, models and every parameter, as JSON.")
        self.save_button.clicked.connect(self._save_dialog)
        self.load_button = QPushButton("Load settings...")
        self.load_button.setToolTip("Fill the fields from saved settings, or from the "
                                    "manifest.json of a batch run.")
        self.load_button.clicked.connect(self._load_dialog)
        files.addWidget(self.save_button)
        files.addWidget(self.load_button)
        layout.addLayout(files)
        self._build_tuning(layout)
        layout.addStretch()
        for section in (models, advanced):  # in the scroll area: grow, never squeeze
            section.setSizePolicy(QSizePolicy.Preferred, QSizePolicy.Minimum)
        for combo in content.findChildren(QComboBox):  # long layer or preset names elide
            combo.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
            combo.setMinimumContentsLength(8)
        self.set_fields_from_config(PipelineConfig())

    def _build_vlsm_box(self) -> QGroupBox:
        """The VLSM's fields, under the Method (shown while VLSM is chosen): the Model (a
        trained folder, a hub id or local-dir:, with Browse...) and the line saying what it
        is, the Threshold and Refine with SAM."""
        box = QGroupBox("VLSM")
        box.setToolTip(TIPS["vlsm_model"])
        vform = QFormLayout(box)
        self.vlsm_model_edit = QLineEdit(DEFAULT_VLSM_MODEL)
        self.vlsm_model_edit.setPlaceholderText(f"{DEFAULT_VLSM_MODEL} or a trained folder")
        self.vlsm_browse_button = QPushButton("Browse...")
        self.vlsm_browse_button.setToolTip("Choose a model folder 'medclipsam vlsm train' "
                                           "wrote (or a CLIPSeg folder).")
        self.vlsm_browse_button.clicked.connect(self._browse_vlsm)
        model_label = QLabel("Model")
        for widget in (model_label, self.vlsm_model_edit):
            widget.setToolTip(TIPS["vlsm_model"])
        vform.addRow(model_label, _with_button(self.vlsm_model_edit, self.vlsm_browse_button))
        self.vlsm_info_label = QLabel("")  # what the Model names: arch, classes, Dice
        self.vlsm_info_label.setWordWrap(True)
        self.vlsm_info_label.setTextFormat(Qt.PlainText)
        self.vlsm_info_label.setSizePolicy(QSizePolicy.Preferred, QSizePolicy.Minimum)
        self.vlsm_info_label.setStyleSheet(VLSM_INFO_STYLE)
        vform.addRow(self.vlsm_info_label)
        row = QHBoxLayout()
        self.vlsm_threshold_spin = QDoubleSpinBox()
        self.vlsm_threshold_spin.setRange(0.01, 0.99)
        self.vlsm_threshold_spin.setDecimals(2)
        self.vlsm_threshold_spin.setSingleStep(0.05)
        self.vlsm_threshold_spin.setToolTip(TIPS["vlsm_threshold"])
        self.vlsm_refine_check = QCheckBox("Refine with SAM")
        self.vlsm_refine_check.setToolTip(TIPS["vlsm_refine"])
        row.addWidget(self.vlsm_threshold_spin)
        row.addWidget(self.vlsm_refine_check)
        row.addStretch()
        threshold_label = QLabel("Threshold")
        threshold_label.setToolTip(TIPS["vlsm_threshold"])
        vform.addRow(threshold_label, row)
        self.vlsm_model_edit.textChanged.connect(self._update_vlsm_info)
        self.vlsm_threshold_spin.valueChanged.connect(self._update_settings_line)
        self.vlsm_refine_check.toggled.connect(self._update_settings_line)
        self.vlsm_box = box
        box.setVisible(False)
        return box

    def _build_tuning(self, layout: QVBoxLayout) -> None:
        """Tune on my corrections: the button, its grid and folds, and under them the last
        tuning's result line, its warning (orange) and Undo tuning."""
        self.tune_button = QPushButton("Tune on my corrections...")
        self.tune_button.setToolTip(TIPS["tune"])
        self.tune_button.clicked.connect(self._tune_dialog)
        layout.addWidget(self.tune_button)
        row = QHBoxLayout()  # under the button: the dock stays narrow (1366x768)
        self.tune_grid_combo = _choice_combo(GRID_CHOICES)
        self.tune_folds_spin = QSpinBox()
        self.tune_folds_spin.setRange(2, 20)
        self.tune_folds_spin.setValue(5)
        for text, widget, tip in (("Grid", self.tune_grid_combo, TIPS["tune_grid"]),
                                  ("Folds", self.tune_folds_spin, TIPS["tune_folds"])):
            label = QLabel(text)
            for item in (label, widget):
                item.setToolTip(tip)
            row.addWidget(label)
            row.addWidget(widget)
        row.addStretch()
        layout.addLayout(row)
        self.tune_label = QLabel("")  # the last tuning: result line, choice, files
        self.tune_label.setTextFormat(Qt.PlainText)
        self.tune_label.setWordWrap(True)
        self.tune_label.setStyleSheet(FAITH_STYLE)
        self.tune_label.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.tune_label.setSizePolicy(QSizePolicy.Preferred, QSizePolicy.Minimum)
        self.tune_warning_label = QLabel("")
        self.tune_warning_label.setTextFormat(Qt.PlainText)
        self.tune_warning_label.setWordWrap(True)
        self.tune_warning_label.setStyleSheet(FAITH_WARNING_STYLE)
        self.tune_warning_label.setSizePolicy(QSizePolicy.Preferred, QSizePolicy.Minimum)
        self.undo_tune_button = QPushButton("Undo tuning")
        self.undo_tune_button.setToolTip("Put back the settings in force before the tuning "
                                         "(the tuned preset stays on disk).")
        self.undo_tune_button.clicked.connect(self.undo_tuning)
        for widget in (self.tune_label, self.tune_warning_label, self.undo_tune_button):
            widget.setVisible(False)
            layout.addWidget(widget)
        try:
            saved = TUNING_SETTINGS.load() or {}
        except ValueError:
            saved = {}
        set_combo_value(self.tune_grid_combo, str(saved.get("grid", "small")))
        if isinstance(saved.get("folds"), int):
            self.tune_folds_spin.setValue(saved["folds"])

    def _build_faithfulness_fields(self, aform: QFormLayout, label: dict[str, str]) -> None:
        """The faithfulness check's rows of Advanced (both methods): on/off, the neutral
        prompt, the contrast prompts and the correlation to warn at."""
        self.faithfulness_check = QCheckBox(label["faithfulness"])
        self.faithfulness_check.setStyleSheet("font-weight: bold;")
        self.faithfulness_check.setToolTip(TIPS["faithfulness"])
        self.faithfulness_check.toggled.connect(self._on_faithfulness_toggled)
        aform.addRow(self.faithfulness_check)
        self.neutral_edit = QLineEdit()
        self.neutral_edit.setPlaceholderText("empty: the empty prompt")
        self.contrast_edit = QLineEdit()
        self.contrast_edit.setPlaceholderText(f"none; separate with {CONTRAST_SEPARATOR}")
        self.max_correlation_spin = _fraction_spin()
        #: key -> (field, its label): off while the check is off
        self._faithfulness_fields: dict[str, tuple[QWidget, QLabel]] = {}
        for key, widget in (("neutral_prompt", self.neutral_edit),
                            ("contrast_prompts", self.contrast_edit),
                            ("max_correlation", self.max_correlation_spin)):
            widget.setToolTip(TIPS[key])
            field_label = QLabel(label[key])
            field_label.setToolTip(TIPS[key])
            aform.addRow(field_label, widget)
            self._faithfulness_fields[key] = (widget, field_label)
            signal = widget.textChanged if isinstance(widget, QLineEdit) else widget.valueChanged
            signal.connect(self._update_settings_line)

    def _on_faithfulness_toggled(self, checked: bool) -> None:
        for widget, field_label in self._faithfulness_fields.values():
            widget.setEnabled(checked)
            field_label.setEnabled(checked)
        self._update_settings_line()

    def _faithfulness_from_fields(self, base: FaithfulnessConfig) -> FaithfulnessConfig:
        """``base`` with the faithfulness fields' values."""
        return dataclasses.replace(
            base, enabled=self.faithfulness_check.isChecked(),
            neutral_prompt=self.neutral_edit.text().strip(),
            contrast_prompts=split_contrast_prompts(self.contrast_edit.text()),
            max_correlation=self.max_correlation_spin.value())

    def _refresh_layers(self, event=None) -> None:
        set_combo_items(self.image_combo, layer_names(self.viewer, "image", skip=is_map_layer))
        self._update_settings_line()
        self._update_propagate_button()

    def _update_propagate_button(self, *args) -> None:
        """Propagate through volume is for (Z, Y, X) images, while nothing runs."""
        layer = find_layer(self.viewer, self.image_combo.currentText())
        volume = layer is not None and is_stack(layer)
        self.propagate_button.setEnabled(volume and not self.running)
        self.propagate_button.setToolTip(TIPS["propagate"] if volume or layer is None else
                                         "For 3-D images (Z, Y, X): this image is 2-D.\n\n"
                                         + TIPS["propagate"])

    @property
    def refine_count(self) -> int:
        """How many times SAM re-ran from edited prompts (tests and benchmarks read it)."""
        return self.controller.state.refine_count

    # ----------------------------------------------------------------------- presets
    def apply_preset(self, title: str, keep_prompt: bool = False) -> None:
        """Apply the preset with this title (see :mod:`napari_medclipsam.core.presets`): its
        prompts (unless ``keep_prompt``), and every setting it fixes, shown ones and hidden
        ones (seed, readout, KMeans size, ranking) alike. ``(custom)`` keeps the fields and
        drops the hidden settings. The presets are MedCLIP-SAMv2's: the Method, the SaLIP and
        VLSM fields and the faithfulness check stay as they are (in SaLIP mode a preset gives
        its prompts and SAM model; in VLSM mode also its regions kept and boxes)."""
        preset = next((p for p in list_presets() if p.title == title), None)
        if preset is None:
            self._preset_config = None
            self._preset_title = None
            self._update_settings_line()
            self._update_suggestion()
            return
        self._preset_config = preset.apply(dataclasses.replace(
            PipelineConfig(), method=self.chosen_method(),
            salip=self._salip_from_fields(SalipConfig()),
            vlsm=self._vlsm_from_fields(VlsmConfig()),
            faithfulness=self._faithfulness_from_fields(FaithfulnessConfig())))
        self._preset_title = preset.title
        if not keep_prompt:
            self.prompt_edit.setPlainText(preset.prompt_text)
        self.set_fields_from_config(self._preset_config)
        if not self.controller.injected:
            set_combo_value(self.sam_combo, self._preset_config.sam_model)
            set_combo_value(self.precision_combo, self._preset_config.precision)
        self.preset_combo.setToolTip(f"{preset.name}: {preset.description}\n{preset.summary()}")
        self._update_settings_line()
        self._update_suggestion()

    def suggested_presets(self) -> list[Preset]:
        """The presets the prompt's words match, minus the one in force."""
        in_force = self._preset_in_force()
        return [p for p in matching_presets(self._prompt_lines()) if p.title != in_force]

    def apply_suggested_preset(self) -> None:
        """The "Apply" of the suggestion line: the first matching preset's settings, with
        the prompt as typed; the Preset menu shows it."""
        suggested = self.suggested_presets()
        if not suggested:
            return
        title = suggested[0].title
        self.preset_combo.blockSignals(True)
        self.preset_combo.setCurrentText(title)
        self.preset_combo.blockSignals(False)
        self.apply_preset(title, keep_prompt=True)

    def _update_suggestion(self) -> None:
        suggested = self.suggested_presets()
        self.suggestion_row.setVisible(bool(suggested))
        if not suggested:
            self.suggestion_label.setText("")
            return
        text = f"Matches preset '{suggested[0].title}'"
        if len(suggested) > 1:
            others = ", ".join(f"'{p.title}'" for p in suggested[1:])
            text += f" (or {others} in the Preset menu)"
        self.suggestion_label.setText(text)
        self.suggestion_label.setToolTip(f"{suggested[0].description}\n{suggested[0].summary()}")

    def _preset_in_force(self) -> str | None:
        """The chosen preset's title while the fields still hold its settings."""
        if self._preset_config is None or self._preset_title is None:
            return None
        try:
            config = self.build_config(self._preset_config)
        except ValueError:
            return None
        stages = ("saliency", "coarse", "prompts", "sam")
        if all(getattr(config, s) == getattr(self._preset_config, s) for s in stages):
            return self._preset_title
        return None

    def settings_line(self) -> str:
        """The settings in force, as the line under the prompt shows them."""
        try:
            config = self.build_config(self._base_config())
        except ValueError as exc:
            return gui_message(str(exc))
        if self.controller.injected and self.controller.pipeline is not None:
            config = dataclasses.replace(config, sam_model=self.controller.pipeline.config
                                         .sam_model)
        preset = self._preset_in_force()
        if preset is None and self._preset_title is not None:
            preset = f"{self._preset_title}, edited"
        info = self.vlsm_info
        arch = (info.arch if info is not None and self._vlsm_info_source
                == config.vlsm.model else None)
        try:
            remote = self.compute_on()
        except InputError:
            remote = None
        auto_sam = self.auto.sam_model if self.auto and remote is None else ""
        line = describe_settings(config, preset=preset, where=self._where(),
                                 auto_sam=auto_sam, vlsm_arch=arch)
        return line + (f" · computed on {remote}" if remote else "")

    def _where(self) -> str:
        layer = find_layer(self.viewer, self.image_combo.currentText())
        if layer is None:
            return "no image chosen"
        if is_stack(layer):
            depth = layer.data.shape[0]
            if self.all_slices_check.isChecked():
                return f"'{layer.name}', all {depth} slices"
            return f"'{layer.name}', slice z={slice_index(self.viewer, layer)} of {depth}"
        return f"'{layer.name}'"

    def _update_settings_line(self, *args) -> None:
        if hasattr(self, "settings_label"):
            self.settings_label.setText(self.settings_line())

    def set_fields_from_config(self, config: PipelineConfig) -> None:
        """Show a config's method and stage parameters in the fields."""
        set_combo_value(self.saliency_combo, config.saliency.method)
        self.layer_spin.setValue(config.saliency.layer)
        self.beta_spin.setValue(config.saliency.beta)
        self.steps_spin.setValue(config.saliency.steps)
        set_combo_value(self.method_combo, config.coarse.method)
        self.eta_spin.setValue(config.coarse.eta_c)
        set_combo_value(self.mode_combo, config.prompts.mode)
        set_combo_value(self.box_mode_combo, config.prompts.box_mode)
        salip = config.salip
        self.salip_points_spin.setValue(salip.points_per_side)
        self.salip_iou_spin.setValue(salip.pred_iou_thresh)
        self.salip_stability_spin.setValue(salip.stability_thresh)
        self.salip_area_spin.setValue(100.0 * salip.area_cap)
        set_combo_value(self.salip_crop_combo, salip.crop)
        self.salip_box_nms_spin.setValue(salip.box_nms_thresh)
        self.salip_layers_spin.setValue(salip.crop_n_layers)
        self.salip_crop_nms_spin.setValue(salip.crop_nms_thresh)
        self.salip_min_region_spin.setValue(100.0 * salip.min_region_area)
        self._top_k = {"medclipsamv2": config.coarse.top_k or 0, SALIP: salip.top_k}
        if self.vlsm_model_edit.isEnabled():  # not a VLSM the injected pipeline holds
            self.vlsm_model_edit.setText(config.vlsm.model)
        self.vlsm_threshold_spin.setValue(config.vlsm.threshold)
        self.vlsm_refine_check.setChecked(config.vlsm.refine)
        faith = config.faithfulness
        self.faithfulness_check.setChecked(faith.enabled)
        self._on_faithfulness_toggled(faith.enabled)
        self.neutral_edit.setText(faith.neutral_prompt)
        self.contrast_edit.setText(join_contrast_prompts(faith.contrast_prompts))
        self.max_correlation_spin.setValue(faith.max_correlation)
        self.chain_combo.blockSignals(True)
        set_combo_value(self.chain_combo, config.method)
        self.chain_combo.blockSignals(False)
        self._on_method_changed()

    # ----------------------------------------------------------------------- method
    def chosen_method(self) -> str:
        """The Method field's value: ``"medclipsamv2"``, ``"salip"`` or ``"vlsm"``."""
        return combo_value(self.chain_combo)

    def _on_topk_changed(self, value: int) -> None:
        self._top_k[self._top_k_method] = value

    def _on_method_changed(self, *args) -> None:
        """Show the chosen method's top-k and fields (VLSM: its box under the Method) and
        grey out the other methods' fields (each field's tooltip says why)."""
        method = self.chosen_method()
        salip, vlsm = method == SALIP, method == VLSM
        key = topk_key(method)
        spin = self.topk_spin
        spin.blockSignals(True)  # a clamp on the new range must not store into either
        spin.setSpecialValueText("" if salip else "all")
        spin.setMinimum(1 if salip else 0)
        spin.setValue(max(self._top_k[key], spin.minimum()))
        spin.blockSignals(False)
        self._top_k_method = key
        self._top_k[key] = spin.value()
        for key, (widget, field_label) in self._fields.items():
            methods = FIELD_METHODS.get(key)
            enabled = methods is None or method in methods
            tip = TIPS["salip_top_k" if key == "top_k" and salip else key]
            tip = tip if enabled else f"{not_used_tip(methods, method)}\n\n{tip}"
            for item in (widget, field_label):
                item.setEnabled(enabled)
                item.setToolTip(tip)
        self.salip_header.setEnabled(salip)
        self.vlsm_box.setVisible(vlsm)
        if not self.controller.injected:  # an injected pipeline's fields stay as set
            for widget in (self.clip_edit, self.clip_browse_button, self.clip_label):
                widget.setEnabled(not vlsm)
            self.clip_edit.setToolTip(TIPS["vlsm_clip"] if vlsm else TIPS["clip"])
        self._update_proposals_check()
        self.steps_check.setText(f"Show {map_kind(method)} and coarse mask")
        self.run_button.setToolTip(RUN_TIPS[method])
        if vlsm:
            self._update_vlsm_info()
        self._update_settings_line()

    # ----------------------------------------------------------------------- models
    def set_pipeline(self, pipeline) -> None:
        """Use this pipeline's models (e.g. tiny test models, or models already loaded)
        instead of loading them from the model fields."""
        remote = self.controller.remote
        self.controller = SegmentController(pipeline)
        self.controller.remote = remote  # Compute on stays as it is
        own_vlsm = pipeline.vlsm_loaded
        for widget in (self.vlsm_model_edit, self.vlsm_browse_button):
            widget.setEnabled(True)
        if own_vlsm:
            self.vlsm_model_edit.setText(pipeline.config.vlsm.model)
        self.set_fields_from_config(pipeline.config)
        set_combo_value(self.sam_combo, pipeline.config.sam_model)
        set_combo_value(self.precision_combo, pipeline.config.precision)
        for widget in (self.clip_edit, self.sam_combo, self.precision_combo,
                       self.checkpoint_edit, self.device_combo, self.clip_browse_button,
                       self.checkpoint_browse_button):
            widget.setEnabled(False)
            widget.setToolTip("Set by the pipeline given to the widget (set_pipeline).")
        if own_vlsm:
            for widget in (self.vlsm_model_edit, self.vlsm_browse_button):
                widget.setEnabled(False)
                widget.setToolTip("Set by the pipeline given to the widget (set_pipeline).")
        self._update_settings_line()

    def _resolve_auto(self, *args) -> None:
        """Say what "auto" means on the chosen device ("auto: sam2_t on this CPU"). That
        needs torch; its first import (seconds) runs in a worker, not in the GUI thread."""
        device = self.device_combo.currentText().strip() or "auto"
        if "torch" in sys.modules:
            self._show_auto(auto_choice(device))
            return
        if self._auto_worker is not None:
            return  # the running one re-checks the device when it ends
        self._auto_worker = start_worker(auto_choice, device, on_done=self._on_auto_resolved)

    def _on_auto_resolved(self, outcome: Outcome) -> None:
        self._auto_worker = None
        try:
            if outcome.ok:
                self._resolve_auto()  # torch is loaded now: for the device chosen now
        except RuntimeError:  # the dock was closed meanwhile
            pass

    def _show_auto(self, choice: AutoChoice) -> None:
        self.auto = choice
        other = "sam2_t on a CPU" if choice.device.startswith("cuda") else "vit_h on a GPU"
        self.sam_combo.setItemText(self.sam_combo.findData("auto"),
                                   f"auto ({choice.sam_model})")
        self.precision_combo.setItemText(self.precision_combo.findData("auto"),
                                         f"auto ({choice.precision})")
        self.auto_label.setText(f"{choice.sam_label}{f' ({other})' * choice.available}, "
                                f"{choice.precision}")
        if self.sam_combo.isEnabled():
            self.sam_combo.setToolTip(f"{TIPS['sam']}\n\nHere: {choice.sam_label}.")
            self.precision_combo.setToolTip(f"{TIPS['precision']}\n\nHere: "
                                            f"{choice.precision_label}.")
        self._update_settings_line()

    # ----------------------------------------------------------------------- compute on
    def compute_on(self) -> str | None:
        """The Compute on field: None for this machine, else a scheduler address.

        Raises
        ------
        InputError
            Neither, in one line.
        """
        return compute_address(self.compute_edit.text())

    def _use_compute_on(self) -> str | None:
        """Point the controller at the Compute on field's machine; its address or None."""
        return getattr(self.controller.set_remote(self.compute_on()), "address", None)

    def _describe_compute_on(self, typing: bool = False) -> None:
        """The line under Compute on, without connecting (connections wait for a run or
        for the field's Enter); while ``typing``, an address not finished yet is no error."""
        try:
            address = self.compute_on()
        except InputError as exc:
            if typing:
                self._show_compute(f"Not an address yet: a Dask scheduler such as "
                                   f"{EXAMPLE_ADDRESS}, or empty for {THIS_MACHINE}.")
            else:
                self._show_compute(str(exc), error=True)
            return
        remote = self.controller.remote
        if address is None:
            self._show_compute(f"Runs on {THIS_MACHINE}.")
        elif remote is None or remote.address != address or not remote.connected:
            self._show_compute(f"Runs on {address} (connects at the next run; Enter in the "
                               "field checks it now).")

    def check_compute_on(self) -> None:
        """Say under the field where runs compute: connect to the scheduler (in a worker)
        and name its workers and their GPUs, or say why it cannot be reached."""
        try:
            address = self._use_compute_on()
        except InputError as exc:
            self._show_compute(str(exc), error=True)
            return
        self._update_settings_line()
        if address is None:
            self.compute_status = None
            self._show_compute(f"Runs on {THIS_MACHINE}.")
            return
        if self._compute_worker is not None:
            return  # the check running says it
        self._show_compute(f"Connecting to {address}...")
        self._compute_worker = start_worker(self.controller.remote_status,
                                            on_done=self._on_compute_checked)

    def _on_compute_checked(self, outcome: Outcome) -> None:
        self._compute_worker = None
        try:
            if outcome.ok:
                status: RemoteStatus = outcome.value
                self.compute_status = status
                self._show_compute(status.line)
            elif outcome.error:
                self.compute_status = None
                self._show_compute(outcome.error, error=True)
        except RuntimeError:  # the dock was closed meanwhile
            pass

    def _show_compute(self, text: str, error: bool = False) -> None:
        self.compute_label.setText(text)
        self.compute_label.setStyleSheet(VLSM_ERROR_STYLE if error else VLSM_INFO_STYLE)

    def _browse_clip(self) -> None:
        current = self.clip_edit.text().strip().removeprefix("local-dir:")
        folder = QFileDialog.getExistingDirectory(
            self, "CLIP model folder (with open_clip_config.json and the weights)",
            current if Path(current).is_dir() else "")
        if folder:
            self.clip_edit.setText(f"local-dir:{folder}")

    def _browse_vlsm(self) -> None:
        current = self.vlsm_model_edit.text().strip().removeprefix("local-dir:")
        folder = QFileDialog.getExistingDirectory(
            self, "VLSM model folder ('medclipsam vlsm train' output, or CLIPSeg weights)",
            current if Path(current).is_dir() else "")
        if folder:  # a trained folder as it is; a CLIPSeg folder as local-dir:, like CLIP's
            self.vlsm_model_edit.setText(
                folder if trained_vlsm_folder(folder) is not None else f"local-dir:{folder}")

    def _update_vlsm_info(self, *args) -> None:
        """The line under the VLSM Model field: what it names (a trained folder's
        architecture, classes and validation Dice; released CLIPSeg) or, in red, what is
        wrong with it (reading ``vlsm.json`` needs no torch)."""
        source = self.vlsm_model_edit.text().strip() or DEFAULT_VLSM_MODEL
        self._show_vlsm_info(source, vlsm_source_info(source))

    def _show_vlsm_info(self, source: str, info: VlsmSource) -> None:
        self.vlsm_info, self._vlsm_info_source = info, source
        self.vlsm_info_label.setText(info.text)
        self.vlsm_info_label.setStyleSheet(VLSM_ERROR_STYLE if info.error else VLSM_INFO_STYLE)
        self.vlsm_info_label.setToolTip(info.text)
        self._update_settings_line()

    def _browse_checkpoint(self) -> None:
        current = self.checkpoint_edit.text().strip()
        path, _ = QFileDialog.getOpenFileName(
            self, "SAM checkpoint", current,
            "SAM checkpoints (*.pth *.pt *.bin *.safetensors);;All files (*)")
        if path:
            self.checkpoint_edit.setText(path)

    def _model_config(self) -> dict[str, Any]:
        device = self.device_combo.currentText().strip()
        return {
            "clip_model": self.clip_edit.text().strip() or DEFAULT_CLIP_MODEL,
            "sam_model": combo_value(self.sam_combo),
            "sam_checkpoint": self.checkpoint_edit.text().strip() or None,
            "device": None if device in ("", "auto") else device,
            "precision": combo_value(self.precision_combo),
        }

    def _salip_from_fields(self, base: SalipConfig) -> SalipConfig:
        """``base`` with the SaLIP fields' values (the area cap and minimum region are shown
        in percent of the image, kept as fractions)."""
        return dataclasses.replace(
            base, points_per_side=self.salip_points_spin.value(),
            pred_iou_thresh=self.salip_iou_spin.value(),
            stability_thresh=self.salip_stability_spin.value(),
            area_cap=round(self.salip_area_spin.value() / 100.0, 6),
            crop=combo_value(self.salip_crop_combo),
            box_nms_thresh=self.salip_box_nms_spin.value(),
            crop_n_layers=self.salip_layers_spin.value(),
            crop_nms_thresh=self.salip_crop_nms_spin.value(),
            min_region_area=round(self.salip_min_region_spin.value() / 100.0, 6),
            top_k=max(self._top_k[SALIP], 1))

    def _vlsm_from_fields(self, base: VlsmConfig) -> VlsmConfig:
        """``base`` with the VLSM fields' values (an empty Model: released CLIPSeg)."""
        return dataclasses.replace(
            base, model=self.vlsm_model_edit.text().strip() or DEFAULT_VLSM_MODEL,
            threshold=round(self.vlsm_threshold_spin.value(), 6),
            refine=self.vlsm_refine_check.isChecked())

    def build_config(self, base: PipelineConfig | None = None) -> PipelineConfig:
        """A PipelineConfig from the fields: the Method, and the Top-K field into the chosen
        method's setting (the other method's top-k as it was last shown; the VLSM's is the
        coarse mask's)."""
        base = base or PipelineConfig()
        top_k = self._top_k["medclipsamv2"] or None
        return dataclasses.replace(
            base, **self._model_config(), method=self.chosen_method(),
            salip=self._salip_from_fields(base.salip or SalipConfig()),
            vlsm=self._vlsm_from_fields(base.vlsm or VlsmConfig()),
            faithfulness=self._faithfulness_from_fields(
                base.faithfulness or FaithfulnessConfig()),
            saliency=dataclasses.replace(base.saliency or SaliencyConfig(),
                                         method=combo_value(self.saliency_combo),
                                         layer=self.layer_spin.value(),
                                         beta=self.beta_spin.value(),
                                         steps=self.steps_spin.value()),
            coarse=dataclasses.replace(base.coarse or CoarseMaskConfig(),
                                       method=combo_value(self.method_combo),
                                       eta_c=self.eta_spin.value(), top_k=top_k),
            prompts=dataclasses.replace(base.prompts or PromptConfig(),
                                        mode=combo_value(self.mode_combo),
                                        box_mode=combo_value(self.box_mode_combo)),
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
        """The chosen layer, the array to process, its slice index and volume mode.

        A stack's slice comes from the layer's own world-to-data mapping of the viewer's
        position (:func:`~napari_medclipsam._widgets.common.slice_index`), never the
        viewer's raw step, which belongs to the tallest layer."""
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

    def _stop_bar(self, text: str) -> None:
        """Reset the progress bar after a run that did not finish, saying why."""
        self.progress_bar.setValue(0)
        self.progress_bar.setFormat(text)

    def _report_failure(self, error: BaseException) -> None:
        """A run stopped by an error: the bar says so, the message (in the dock's words)
        goes below."""
        self._stop_bar("stopped by an error (see below)")
        self._report(gui_message(error), error=True)

    def run_all(self) -> None:
        """Start the whole chain on the chosen layer: the slice on screen, or every slice of
        a 3-D stack when "All slices" is checked."""
        if self.running:
            return
        lines = self._prompt_lines()
        try:
            layer, image, z, volume = self._source()
            name = target_name(lines)
            remote = self._use_compute_on()
            self.controller.configure(self.build_config(self._base_config()))
        except (InputError, ValueError) as exc:
            self._report(gui_message(str(exc)), error=True)
            return
        method = self.controller.pipeline.config.method
        self._begin_run(LiveVolume(name, layer.name, tuple(image.shape), method=method)
                        if volume else None, activity=self._running(remote))
        what = f"all {image.shape[0]} slices of " if volume else (
            f"slice z={z} of " if z is not None else "")
        self._report(f"Running '{name}' on {what}'{layer.name}'"
                     + (f" on {remote}..." if remote else "..."))
        self._worker = start_worker(
            self.controller.run_all, image, lines, source=layer.name, slice_index=z,
            volume=volume, progress=self._progress_signal.emit, should_stop=self._stop.is_set,
            on_slice=self._slice_signal.emit if volume else None,
            on_done=self._on_done, on_finished=lambda: self._set_running(False))

    @staticmethod
    def _running(remote: str | None) -> str:
        """What the progress line says while a run computes: ``Running`` here, ``Running on
        tcp://gpu-box:8786`` there."""
        return f"Running on {remote}" if remote else "Running"

    def _begin_run(self, live: LiveVolume | None, activity: str = "Running") -> None:
        """Reset the stop flag, progress tracker and bar, and show the run as started."""
        self._activity = activity
        self._stop.clear()
        self._tracker = ProgressTracker()
        self.progress_log = self._tracker.updates
        self._live = live
        self._show_faithfulness(None)
        self._set_running(True)
        self.progress_bar.setValue(0)
        self.progress_bar.setFormat("starting %p%")

    def _set_running(self, running: bool) -> None:
        self.running = running
        if not running:
            self._worker = None
        self.run_button.setEnabled(not running)
        self.tune_button.setEnabled(not running)
        self.cancel_button.setEnabled(running)
        self._update_propagate_button()

    def cancel(self) -> None:
        """Ask the running computation to stop at its next check."""
        self._stop.set()
        self._refine_timer.stop()
        if self.running and self._activity == "Tuning":
            self._report("Cancelling the tuning (at the next step; nothing will change)...")
        elif self.running and self._activity == BOX_EDIT:
            self._report("Cancelling (once SAM has loaded; the mask stays as it is)...")
        elif self.running and self._activity.startswith("Running on "):
            self._report(f"Cancelling on {self._activity.removeprefix('Running on ')} (at its "
                         "next step; finished slices are kept)...")
        elif self.running:
            self._report("Cancelling (at the next step; finished slices are kept)...")

    def _on_progress(self, stage: str, fraction: float) -> None:
        update = self._tracker.update(stage, fraction)
        self.progress_bar.setValue(int(round(100 * update.fraction)))
        self.progress_bar.setFormat(f"{stage} %p%")
        if self.running and not self._stop.is_set() and stage != "done" \
                and self._activity != BOX_EDIT:  # its status line says it all; the bar moves
            self._report(f"{self._activity}: {update.text}")

    def _on_done(self, outcome: Outcome) -> None:
        live, self._live = self._live, None
        if outcome.cancelled:
            run: Run | None = outcome.partial
            source = find_layer(self.viewer, run.source) if run is not None else None
            if run is not None and source is not None:
                self._show_volume(run, source)
            self._stop_bar("cancelled")
            self._report(cancel_message(run, live.shape[0] if live is not None else None))
            self._show_faithfulness(run)  # the finished slices'
            return
        if not outcome.ok:
            self._report_failure(outcome.error)
            return
        run = outcome.value
        source = find_layer(self.viewer, run.source)
        if source is None:
            self._report(f"The image layer {run.source!r} was removed during the run.",
                         error=True)
            return
        self.progress_bar.setValue(100)
        self.progress_bar.setFormat("done %p%")
        took = (f"Done in {format_duration(run.seconds)}" if run.seconds >= 10
                else f"Done in {max(run.seconds, 0.1):.1f} s")
        took += f" on {run.where}: " if run.where else ": "
        if run.volume is not None:
            self._show_volume(run, source)
            self._report(f"{took}something found on {len(run.volume.found_slices)} of "
                         f"{run.mask.shape[0]} slices; mask of {int(run.mask.sum())} voxels. "
                         "Edit a slice by running it alone (All slices unchecked).")
        else:
            self._show_result(run, source)
            self._report(took + run.result.message)
        if run.where and self.controller.remote is not None:
            status = self.compute_status
            known = (status.line if status is not None
                     and status.address == self.controller.remote.address
                     else f"Connected to {self.controller.remote.address}")
            self._show_compute(f"{known}; the last run ran on {run.where}.")
        self._show_faithfulness(run)
        self.save_settings()

    def _show_faithfulness(self, run: Run | None) -> None:
        """The run's faithfulness check under the status line (hidden when there is none):
        the score, and when the text does not steer, the warning in orange beside a warning
        icon and as a napari notification."""
        view: FaithfulnessView | None = faithfulness_view(run)
        self.last_faithfulness = view
        self.faithfulness_row.setVisible(view is not None)
        if view is None:
            self.faithfulness_label.setText("")
            return
        warned = not view.steers
        label = self.faithfulness_label
        if warned:  # the score line in bold, the warning below it
            label.setTextFormat(Qt.RichText)
            label.setText(f"<b>{html.escape(view.text)}</b><br>{html.escape(view.warning)}")
        else:
            label.setTextFormat(Qt.PlainText)
            label.setText(view.text)
        label.setStyleSheet(FAITH_WARNING_STYLE if warned else FAITH_STYLE)
        self.faithfulness_icon.setVisible(warned)
        if warned:
            from napari.utils.notifications import show_warning

            show_warning(view.warning)

    # ----------------------------------------------------------------------- layers
    def _show_result(self, run: Run, source) -> None:
        result, name = run.result, run.target.name
        geometry = geometry_of(source, 2)
        prompts = result.prompts
        self._updating_layers = True
        try:
            self._drop_other_method_layers(name, run.method, volume=False)
            put_layer(self.viewer, output_name(map_kind(run.method), name), "image",
                      result.saliency, geometry, colormap="inferno", opacity=0.5,
                      blending="additive", contrast_limits=(0.0, 1.0))
            put_layer(self.viewer, output_name("coarse mask", name), "labels",
                      result.coarse.labels.astype(np.int32), geometry, opacity=0.4)
            if run.method == SALIP:
                self._show_proposals(result, name, geometry)
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
        self._show_steps(name, sam_ran=result.found, editable=True, method=run.method)
        self._update_proposals_check()

    def _show_proposals(self, result, target: str, geometry: dict) -> None:
        """SaLIP's ``proposals [target]`` Labels layer: every proposal under the area cap
        (smaller ones on top), with its CLIP score, area and retrieved rank as features;
        shown while "Show proposals" is checked."""
        labels, features = proposal_labels(result)
        layer = put_layer(self.viewer, output_name(PROPOSALS, target), "labels", labels,
                          geometry, opacity=0.35)
        layer.features = features
        layer.visible = self.proposals_check.isChecked()

    def _drop_other_method_layers(self, target: str, method: str, volume: bool) -> None:
        """Remove the target's layers a run of this method does not rewrite: the other
        methods' first layers (``saliency`` / ``retrieval map`` / ``VLSM probability``) and,
        unless this is a single-image SaLIP run, its ``proposals`` (they would show an older
        run)."""
        stale = [output_name(kind, target) for kind in MAP_KINDS.values()
                 if kind != map_kind(method)]
        if volume or method != SALIP:
            stale.append(output_name(PROPOSALS, target))
        for name in stale:
            if name in self.viewer.layers:
                self.viewer.layers.remove(name)

    def _show_volume(self, run: Run, source) -> None:
        vol, name = run.volume, run.target.name
        geometry = geometry_of(source, 3)
        rects, points, labels = volume_prompts_to_layers(vol.prompts)
        self._updating_layers = True
        try:
            self._drop_other_method_layers(name, run.method, volume=True)
            put_layer(self.viewer, output_name(map_kind(run.method), name), "image",
                      vol.saliency, geometry, colormap="inferno", opacity=0.5,
                      blending="additive", contrast_limits=(0.0, 1.0))
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
        self._show_steps(name, sam_ran=bool(vol.found_slices), editable=False,
                         method=run.method)
        self._update_proposals_check()

    def _on_slice(self, z: int, result) -> None:
        """An All slices run finished slice ``z``: write it into the target's 3-D layers at
        once (the first slice of a run empties them), so a cancelled run keeps it."""
        live = self._live
        source = find_layer(self.viewer, live.source) if live is not None else None
        if source is None:
            return
        first = output_name(map_kind(live.method), live.target)
        if not live.started:
            geometry = geometry_of(source, 3)
            self._updating_layers = True
            try:
                self._drop_other_method_layers(live.target, live.method, volume=True)
                put_layer(self.viewer, first, "image",
                          np.zeros(live.shape, np.float32), geometry, colormap="inferno",
                          opacity=0.5, blending="additive", contrast_limits=(0.0, 1.0))
                put_layer(self.viewer, output_name("coarse mask", live.target), "labels",
                          np.zeros(live.shape, np.int32), geometry, opacity=0.4)
                put_layer(self.viewer, output_name("SAM mask", live.target), "labels",
                          np.zeros(live.shape, np.int32), geometry, opacity=0.6)
            finally:
                self._updating_layers = False
            self._show_steps(live.target, sam_ran=True, editable=False, method=live.method)
            live.started = True
        for name, data in ((first, result.saliency),
                           (output_name("coarse mask", live.target), result.coarse.mask),
                           (output_name("SAM mask", live.target), result.mask)):
            layer = find_layer(self.viewer, name)
            if layer is None or tuple(layer.data.shape) != live.shape:
                continue
            layer.data[z] = data.astype(layer.data.dtype)
            layer.refresh()

    def _show_steps(self, target: str, *, sam_ran: bool, editable: bool,
                    method: str = "medclipsamv2") -> None:
        """Once SAM has run, hide the saliency (SaLIP: the retrieval map) and coarse mask
        (unless "Show ... and coarse mask" is checked) so the SAM mask stays readable; keep
        them when nothing was found (they show why). Boxes and points stay visible where
        they can be edited; SaLIP's proposals follow "Show proposals"."""
        show = self.steps_check.isChecked() or not sam_ran
        for kind in KINDS[:-1]:
            layer = find_layer(self.viewer, output_name(
                map_kind(method) if kind == "saliency" else kind, target))
            if layer is not None:
                layer.visible = show or (editable and kind in ("boxes", "points"))

    def _on_steps_toggled(self, checked: bool) -> None:
        run = self.controller.state.run
        if run is None:
            return
        for kind in (*STEP_KINDS, RETRIEVAL, VLSM_PROBABILITY):
            layer = find_layer(self.viewer, output_name(kind, run.target.name))
            if layer is not None:
                layer.visible = checked

    def _update_proposals_check(self) -> None:
        """"Show proposals" is for SaLIP: chosen, or the run on screen is SaLIP's."""
        run = self.controller.state.run
        method = self.chosen_method()
        salip = method == SALIP or (run is not None and run.method == SALIP)
        self.proposals_check.setEnabled(salip)
        self.proposals_check.setToolTip(
            TIPS["show_proposals"] if salip else
            f"{not_used_tip((SALIP,), method)}\n\n{TIPS['show_proposals']}")

    def _on_proposals_toggled(self, checked: bool) -> None:
        run = self.controller.state.run
        if run is None:
            return
        layer = find_layer(self.viewer, output_name(PROPOSALS, run.target.name))
        if layer is not None:
            layer.visible = checked

    # ----------------------------------------------------------------------- save mask
    def save_mask(self, path: str | Path) -> list[Path] | None:
        """Write the current target's SAM mask as the user left it (painted corrections
        included), and the label map when there is one, to ``path``: NIfTI (``.nii.gz``,
        ``.nii``) with the source scan's affine, or PNG for a 2-D image. Refuses to replace
        the source image. Returns the files written (None after an error, reported)."""
        from napari_medclipsam._io.writers import labels_affine

        try:
            run = self.controller.state.run
            if run is None:
                raise InputError("Nothing to save yet: press Run all first.")
            source = find_layer(self.viewer, run.source)
            if source is None:
                raise InputError(f"The image layer {run.source!r} is gone.")
            spatial = tuple(source.data.shape[:-1] if source.rgb else source.data.shape)
            sam = find_layer(self.viewer, output_name("SAM mask", run.target.name))
            mask = np.asarray(sam.data) if sam is not None else run.mask
            label_layer = self.label_map_layer(create=False)
            label_map = np.asarray(label_layer.data) if label_layer is not None else None
            names = None
            if label_layer is not None and "name" in label_layer.features:
                names = dict(zip(label_layer.features["index"], label_layer.features["name"],
                                 strict=True))
            metadata = dict(source.metadata or {})
            affine, meta, _ = labels_affine(spatial, {"scale": tuple(source.scale),
                                                      "translate": tuple(source.translate),
                                                      "metadata": metadata})
            source_path = metadata.get("source_path") or getattr(source.source, "path", None)
            written = save_mask(
                path, mask, affine=affine, label_map=label_map, label_names=names,
                source_path=source_path, slice_index=run.slice_index, spatial_shape=spatial,
                qform_code=int(meta.get("qform_code", 1) or 1),
                sform_code=int(meta.get("sform_code", 1) or 1))
        except (InputError, OSError, ValueError) as exc:
            self._report(f"Not saved: {exc}", error=True)
            return None
        folder = written[0].parent
        self._report(f"Saved {', '.join(p.name for p in written)} in {folder}.")
        return written

    def _save_mask_dialog(self) -> None:
        run = self.controller.state.run
        if run is None:
            self._report("Nothing to save yet: press Run all first.", error=True)
            return
        source = find_layer(self.viewer, run.source)
        folder = ""
        source_path = (source.metadata or {}).get("source_path") if source is not None else None
        if source_path:
            folder = str(Path(source_path).parent)
        stem = re.sub(r"[^\w.-]+", "_", run.target.name).strip("_") or "mask"
        nifti, png = "NIfTI (*.nii.gz *.nii)", "PNG, 2-D images (*.png)"
        path, chosen = QFileDialog.getSaveFileName(
            self, "Save mask", str(Path(folder) / f"{stem}_mask.nii.gz"), f"{nifti};;{png}")
        if not path:
            return
        if not path.lower().endswith((".nii.gz", ".nii", ".png")):
            path += ".png" if chosen == png else ".nii.gz"
        self.save_mask(path)

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
        """Re-run only SAM (cached embedding) from the edited prompt layers. After a VLSM
        run without SAM refinement SAM is not loaded yet: it loads first, in a worker (the
        bar and the status line say so; Cancel keeps the mask as it is)."""
        run = self._current_run()
        if run is None:
            return
        if self.running:
            if self._activity == BOX_EDIT:  # SAM is loading: re-run with this edit after
                self._edited_while_loading = True
            return
        try:
            prompts = self.prompts_from_layers()
            if not self.controller.sam_ready and not prompts.empty:
                self._load_sam_and_refine(run, prompts)
                return
            mask = self.controller.refine(prompts)
        except (InputError, ValueError) as exc:
            self._report(str(exc), error=True)
            return
        self._show_refined(run, prompts, mask)

    def _show_refined(self, run: Run, prompts: Prompts, mask: np.ndarray,
                      loaded: bool = False) -> None:
        name = output_name("SAM mask", run.target.name)
        if name in self.viewer.layers:
            self.viewer.layers[name].data = mask.astype(np.int32)
        problem = self.controller.embedding_problem
        self._report(f"{'SAM loaded; ' if loaded else ''}SAM re-run from "
                     f"{len(prompts.boxes)} box(es) and {len(prompts.points)} point(s): mask "
                     f"of {int(mask.sum())} pixels" + (f" ({problem})." if problem else "."))

    def _load_sam_and_refine(self, run: Run, prompts: Prompts) -> None:
        """The first box edit after a run that did not load SAM: load it in a worker, then
        re-run it from the edited prompts."""
        self._activity = BOX_EDIT
        self._stop.clear()
        self._tracker = ProgressTracker()
        self.progress_log = self._tracker.updates
        self._edited_while_loading = False
        self._set_running(True)
        self.progress_bar.setValue(0)
        self.progress_bar.setFormat("loading SAM %p%")
        why = (f"the run was on {run.where}" if run.where
               else "the VLSM run did not need it")
        self._report(f"Loading SAM for the edited box ({why}; once), then SAM re-runs from "
                     "it...")
        self._worker = start_worker(
            self.controller.refine, prompts, progress=self._progress_signal.emit,
            should_stop=self._stop.is_set,
            on_done=lambda outcome: self._on_sam_refined(run, prompts, outcome),
            on_finished=self._on_sam_edit_finished)

    def _on_sam_refined(self, run: Run, prompts: Prompts, outcome: Outcome) -> None:
        if outcome.cancelled:
            self._stop_bar("cancelled")
            self._report("Cancelled; the mask is unchanged (SAM is loaded now: edit a box "
                         "again to re-run it).")
            self._edited_while_loading = False
            return
        if not outcome.ok:
            self._report_failure(outcome.error)
            self._edited_while_loading = False
            return
        self.progress_bar.setValue(100)
        self.progress_bar.setFormat("done %p%")
        if self.controller.state.run is run:
            self._show_refined(run, prompts, outcome.value, loaded=True)

    def _on_sam_edit_finished(self) -> None:
        self._set_running(False)
        if self._edited_while_loading:  # edits made while SAM loaded: re-run with them
            self._edited_while_loading = False
            self._refine_timer.start()

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
    def label_map_layer(self, create: bool = True, source=None):
        """The ``label map`` Labels layer of ``source`` (default: the current run's image),
        created on demand, aligned with it, with a ``name`` feature per label value."""
        if source is None:
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

    # ----------------------------------------------------------------------- propagate
    def propagate(self) -> None:
        """Propagate through volume: the current target's masks through the chosen 3-D
        image, in a worker thread (progress on the bar, Cancel keeps the slices done).

        The target is the prompt's; its seeds are the slice run (the ``SAM mask`` layer as
        the user left it) and its slices in the label map; slices corrected there by hand
        are locked. With no mask anywhere, the prompt finds the seed slice. The result goes
        into the label map in one undoable write."""
        if self.running:
            return
        try:
            name = self.image_combo.currentText()
            layer = find_layer(self.viewer, name)
            if layer is None:
                raise InputError("Choose an image layer first (open one, or File > Open "
                                 "Sample).")
            if not is_stack(layer):
                raise InputError(f"Propagate through volume needs a 3-D image (Z, Y, X); "
                                 f"{name!r} has shape {tuple(np.shape(layer.data))}.")
            spatial = tuple(layer.data.shape)
            existing = self.label_map_layer(create=False, source=layer)
            label_map = (np.asarray(existing.data) if existing is not None
                         else np.zeros(spatial, np.int32))
            plan = self.controller.plan_propagation(
                label_map, self._prompt_lines(), source=layer.name,
                run_mask=self._run_mask_as_left())
            remote = self._use_compute_on()
            self.controller.configure(self.build_config(self._base_config()))
            volume = np.asarray(layer.data)
        except (InputError, ValueError) as exc:
            self._report(gui_message(str(exc)), error=True)
            return
        self._begin_run(None, activity=self._running(remote))
        if plan.by_text:
            start = "no mask yet: the prompt chooses the seed slice"
        else:
            start = (f"seeds {slice_list(list(plan.seeds)) if plan.seeds else 'none'}, "
                     f"locked {slice_list(list(plan.locked)) if plan.locked else 'none'}")
        self._report(f"Propagating '{plan.target.name}' through '{layer.name}' ({start})"
                     + (f" on {remote}..." if remote else "..."))
        self._worker = start_worker(
            self.controller.propagate, volume, plan, progress=self._progress_signal.emit,
            should_stop=self._stop.is_set, on_done=self._on_propagated,
            on_finished=lambda: self._set_running(False))

    def _run_mask_as_left(self) -> np.ndarray | None:
        """The current single-slice run's ``SAM mask`` layer, painted corrections included."""
        run = self._current_run()
        if run is None:
            return None
        sam = find_layer(self.viewer, output_name("SAM mask", run.target.name))
        if sam is None or np.ndim(sam.data) != 2:
            return None
        return np.asarray(sam.data) > 0

    def _on_propagated(self, outcome: Outcome) -> None:
        if outcome.cancelled:
            done: Propagation | None = outcome.partial
            self._stop_bar("cancelled")
            if done is None:
                self._report("Cancelled; nothing changed.")
            else:
                self._write_propagation(done)
            return
        if not outcome.ok:
            self._report_failure(outcome.error)
            return
        if self._write_propagation(outcome.value):
            self.progress_bar.setValue(100)
            self.progress_bar.setFormat("done %p%")
            self.save_settings()

    def _write_propagation(self, done: Propagation) -> bool:
        """Write a propagation into the label map (one undoable step) and say what it did."""
        try:
            source = find_layer(self.viewer, done.plan.source)
            if source is None:
                raise InputError(f"The image layer {done.plan.source!r} was removed while "
                                 "propagating; nothing written.")
            layer = self.label_map_layer(source=source)
            index, values, skipped = self.controller.write_propagation(
                layer.data, done, overwrite=self.overwrite_check.isChecked())
        except InputError as exc:
            self._report(str(exc), error=True)
            return False
        self._name_labels(layer)
        if len(values):
            layer.data_setitem(index, values)
        self._report(done.summary(len(values), skipped, LABEL_MAP))
        return True

    # ----------------------------------------------------------------------- tuning
    def training_dataset_folder(self) -> Path | None:
        """The dataset of the "Pseudo-labels & training" dock when it is open: the folder it
        last exported to, else ``Dataset{ID}_*`` of its Dataset ID in its raw folder (None
        when the dock is closed or that dataset does not exist yet)."""
        from napari_medclipsam._widgets.training_widget import TrainingWidget
        from napari_medclipsam.nnunet.export import find_dataset

        docks = getattr(self.viewer.window, "dock_widgets", None)  # napari >= 0.6.2
        for widget in list(docks.values()) if docks is not None else []:
            if not isinstance(widget, TrainingWidget):
                continue
            export = widget.last_export
            if export is not None and Path(export.folder).is_dir():
                return Path(export.folder)
            try:
                raw = widget.folders().raw
            except (InputError, OSError):
                return None
            return find_dataset(raw, widget.dataset_spin.value())
        return None

    def default_tuning_folder(self) -> Path | None:
        """Where the folder dialog of Tune on my corrections opens: the training dock's
        dataset, else the last dataset tuned on."""
        folder = self.training_dataset_folder()
        if folder is not None:
            return folder
        try:
            last = (TUNING_SETTINGS.load() or {}).get("dataset")
        except ValueError:
            return None
        return Path(last) if isinstance(last, str) and last else None

    def _tune_dialog(self) -> None:
        if self.running:
            return
        start = self.default_tuning_folder()
        folder = QFileDialog.getExistingDirectory(
            self, "Exported dataset with your corrected cases (RAW/Dataset001_NAME)",
            str(start) if start is not None else "")
        if folder:
            self.tune(folder)

    def tune(self, dataset: str | Path) -> None:
        """Tune on my corrections with the exported dataset ``dataset``: its corrected cases
        checked here (a problem, too few cases included, is one line in the status and no
        worker starts), then the calibration in a worker; :meth:`_on_tuned` applies it."""
        if self.running:
            return
        with contextlib.suppress(OSError):  # the last folder used; a read-only home is fine
            TUNING_SETTINGS.save({"dataset": str(dataset),
                                  "grid": combo_value(self.tune_grid_combo),
                                  "folds": self.tune_folds_spin.value()})
        try:
            self.controller.configure(self.build_config(self._base_config()))
            plan = self.controller.plan_tuning(
                dataset, self._prompt_lines(), grid=combo_value(self.tune_grid_combo),
                folds=self.tune_folds_spin.value())
        except (InputError, ValueError, OSError) as exc:
            self._report(gui_message(str(exc)), error=True)
            return
        self._begin_run(None, activity="Tuning")
        self._report(plan.describe())
        self._worker = start_worker(
            self.controller.tune, plan, progress=self._progress_signal.emit,
            should_stop=self._stop.is_set, on_done=self._on_tuned,
            on_finished=lambda: self._set_running(False))

    def _on_tuned(self, outcome: Outcome) -> None:
        if outcome.cancelled:
            self._stop_bar("cancelled")
            self._report("Tuning cancelled; nothing changed.")
            return
        if not outcome.ok:
            self._report_failure(outcome.error)
            return
        tuning: Tuning = outcome.value
        self.last_tuning = tuning
        if tuning.beats_defaults:
            self._before_tuning = (self.run_state(), self._preset_in_force())
            self.apply_state(tuning.state(self.all_slices_check.isChecked()))
            # the settings line names them while the fields hold them ("preset: tuned on")
            self._preset_title = (f"tuned on {len(tuning.cases)} corrected cases "
                                  f"({tuning.paths['preset'].name})")
            self._update_settings_line()
            self.undo_tune_button.setVisible(True)
            self.save_settings()
            done = ("the tuned settings are applied (Undo tuning below puts the previous "
                    "ones back).")
        else:  # the cross-validation says keep them: the preset is on disk if wanted
            done = ("the current settings are kept: the tuned ones did not beat them on "
                    "held-out cases (Load settings... reads the tuned preset anyway).")
        self.progress_bar.setValue(100)
        self.progress_bar.setFormat("done %p%")
        self.tune_label.setText(f"{tuning.line}.\n{tuning.details()}")
        self.tune_warning_label.setText(tuning.warning)
        self.tune_label.setVisible(True)
        self.tune_warning_label.setVisible(bool(tuning.warning))
        self._report(f"{tuning.line}; {done}")
        if tuning.warning:
            from napari.utils.notifications import show_warning

            show_warning(tuning.warning)

    def undo_tuning(self) -> None:
        """Put back the settings in force before the last tuning was applied (the preset
        chosen then included); the tuned preset stays on disk."""
        if self._before_tuning is None or self.running:
            return
        state, title = self._before_tuning
        self._before_tuning = None
        self.apply_state(state)
        if title is not None:
            if self.preset_combo.findText(title) >= 0:  # one of the menu's presets
                self.preset_combo.blockSignals(True)
                self.preset_combo.setCurrentText(title)
                self.preset_combo.blockSignals(False)
            self._preset_title = title
            self._update_settings_line()
            self._update_suggestion()
        self.undo_tune_button.setVisible(False)
        self.save_settings()
        where = self.last_tuning.paths["preset"] if self.last_tuning is not None else None
        self._report("Settings before the tuning put back" + (
            f"; the tuned preset stays in {where} (Load settings... reads it)." if where
            else "."))

    # ----------------------------------------------------------------------- runs and settings
    def run_state(self) -> dict[str, Any]:
        """What reproduces a run: prompt lines, every parameter and the models."""
        from napari_medclipsam import __version__

        return {"prompt": self._prompt_lines(),
                "config": self.build_config(self._base_config()).to_dict(),
                "all_slices": self.all_slices_check.isChecked(),
                "compute_on": self.compute_edit.text().strip(),
                "napari_medclipsam": __version__}

    def apply_state(self, state: dict[str, Any]) -> None:
        """Fill the widget from :meth:`run_state`'s dictionary (e.g. a saved run)."""
        config = PipelineConfig.from_dict(state.get("config", {}))
        self._preset_config = config  # its settings the fields do not show are kept too
        self._preset_title = None
        self.preset_combo.blockSignals(True)
        self.preset_combo.setCurrentText(CUSTOM)
        self.preset_combo.blockSignals(False)
        self.prompt_edit.setPlainText("\n".join(state.get("prompt", [])))
        self.set_fields_from_config(config)
        self.all_slices_check.setChecked(bool(state.get("all_slices", False)))
        self.compute_edit.setText(str(state.get("compute_on") or ""))
        self._describe_compute_on()
        if not self.controller.injected:
            self.clip_edit.setText(config.clip_model)
            set_combo_value(self.sam_combo, config.sam_model)
            set_combo_value(self.precision_combo, config.precision)
            self.checkpoint_edit.setText(config.sam_checkpoint or "")
            self.device_combo.setCurrentText(config.device or "auto")
        self._update_settings_line()
        self._update_suggestion()

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
        path, _ = QFileDialog.getSaveFileName(self, "Save settings", "medclipsam_run.json",
                                              "JSON (*.json)")
        if not path:
            return
        try:
            self.save_run(path)
        except OSError as exc:
            self._report(f"Settings not saved: {exc}", error=True)
            return
        self._report(f"Saved {path}.")

    def _load_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Load settings", "", "JSON (*.json)")
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
