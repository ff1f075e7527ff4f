"""Parameters of every stage of the zero-shot chain, as frozen dataclasses.

Defaults follow the MedCLIP-SAMv2 paper and, where the paper is silent, the
authors' released scripts (see ``REFERENCE.md`` in the project docs). Every
config converts to and from plain dictionaries so a run can be saved as a JSON
manifest and reproduced exactly.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_CLIP_MODEL = "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
#: "auto": SAM ViT-H (the paper's) on a CUDA GPU, SAM 2.1 hiera tiny on a CPU or MPS
#: (see :func:`napari_medclipsam.core.models.default_sam_model`).
DEFAULT_SAM_MODEL = "auto"
PRECISIONS = ("auto", "bf16", "fp32")

THRESHOLD_METHODS = ("otsu", "kmeans", "fixed", "crf")
RANK_BY = ("confidence", "area")
PROMPT_MODES = ("boxes", "points", "both")
BOX_MODES = ("single", "per_component")
READOUTS = ("last_forward", "final")
SALIENCY_METHODS = ("m2ib", "gscorecam", "gradcam")
CAM_MODULES = ("norm1", "norm2")
#: The chain: MedCLIP-SAMv2's (saliency -> coarse mask -> SAM), SaLIP's (SAM's automatic
#: masks -> CLIP retrieval of the crops -> SAM) or a VLSM's (CLIPSeg / BiomedCLIPSeg
#: probability -> mask, optionally its boxes -> SAM).
METHODS = ("medclipsamv2", "salip", "vlsm")
#: CLIPSeg's released weights (Lüddecke and Ecker), the VLSM used when none is named.
DEFAULT_VLSM_MODEL = "CIDAS/clipseg-rd64-refined"
SALIP_CROPS = ("mask", "box")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}.")


@dataclass(frozen=True)
class SaliencyConfig:
    """Saliency parameters: M2IB (Wang et al. 2024, as used by MedCLIP-SAMv2), or the
    class-activation maps of MedCLIP-SAM (gScoreCAM) and its baseline (GradCAM).

    Attributes
    ----------
    method : {"m2ib", "gscorecam", "gradcam"}
        ``m2ib`` (MedCLIP-SAMv2, the default) uses ``layer`` to ``readout``;
        ``gscorecam`` and ``gradcam`` (:mod:`napari_medclipsam.core.cam`) use the
        ``cam_*`` fields.
    layer : int
        0-based index of the ViT block after which the bottleneck is inserted
        (``model.visual.trunk.blocks[layer]``). The authors' scripts use 7 by
        default and 9 for breast ultrasound and brain MRI.
    beta : float
        Weight of the compression (capacity) term. 0.1 by default; the
        scripts use 1.0 for breast and 2.0 for brain.
    steps : int
        Adam steps on the bottleneck's mask logits.
    lr : float
        Adam learning rate.
    batch_size : int
        Noise samples per step (the image is repeated as a batch).
    seed : int
        Seed of the bottleneck noise; the same seed gives the same map.
    init_alpha : float
        Initial mask logit (``sigmoid(5) ~ 0.993``: almost everything passes).
    readout : {"last_forward", "final"}
        Which capacity becomes the map. ``"last_forward"`` (default): the capacity of
        the last forward pass, before the final Adam update, as the authors' code (and
        IBA, which it builds on) reads it; this reproduces their numbers.
        ``"final"``: the capacity of ``alpha`` after all ``steps`` updates (the
        readout of earlier versions of this tool, whose saved runs lack this field; the
        paper does not say which). With the same seed, ``"last_forward"`` after ``k``
        steps equals ``"final"`` after ``k - 1``.
    cam_layer : int
        gScoreCAM/GradCAM: the block whose output of ``cam_module`` is read (negative counts
        from the end; -1: the last block, as MedCLIP-SAM's ``blocks[11]`` on BiomedCLIP).
    cam_module : {"norm1", "norm2"}
        Which LayerNorm of that block: ``norm1`` (default; the last point where the patch
        tokens reach the class token) or ``norm2`` (MedCLIP-SAM's code, where the gradient is
        zero in the last block of a class-token ViT; see :mod:`napari_medclipsam.core.cam`).
    cam_channels : int
        gScoreCAM: channels kept by mean gradient (MedCLIP-SAM: 300).
    cam_batch : int
        gScoreCAM: masked images scored by CLIP per batch (MedCLIP-SAM: 128).
    """

    layer: int = 7
    beta: float = 0.1
    steps: int = 10
    lr: float = 1.0
    batch_size: int = 10
    seed: int = 0
    init_alpha: float = 5.0
    readout: str = "last_forward"
    method: str = "m2ib"
    cam_layer: int = -1
    cam_module: str = "norm1"
    cam_channels: int = 300
    cam_batch: int = 128

    def __post_init__(self) -> None:
        _check_choice("readout", self.readout, READOUTS)
        _check_choice("saliency method", self.method, SALIENCY_METHODS)
        _check_choice("cam_module", self.cam_module, CAM_MODULES)
        if self.cam_channels < 1:
            raise ValueError(f"cam_channels must be at least 1; got {self.cam_channels}.")
        if self.cam_batch < 1:
            raise ValueError(f"cam_batch must be at least 1; got {self.cam_batch}.")
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1; got {self.steps}.")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1; got {self.batch_size}.")
        if self.beta < 0:
            raise ValueError(f"beta must be non-negative; got {self.beta}.")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive; got {self.lr}.")


@dataclass(frozen=True)
class CoarseMaskConfig:
    """Saliency map -> coarse mask (paper section 3.3, eqs. 18-19).

    Attributes
    ----------
    method : {"otsu", "kmeans", "fixed", "crf"}
        ``otsu`` (the paper), ``kmeans`` with k=2 on the map resized to
        ``kmeans_size`` (the authors' scripts), a ``fixed`` threshold, or ``crf``:
        MedCLIP-SAM's DenseCRF of the map with the image (needs ``pydensecrf2``).
    threshold : float
        The threshold used by ``fixed`` (the scripts' alternative is 0.3).
    eta_c : float
        Keep components whose confidence (mean saliency inside, eq. 18) is
        strictly above ``eta_c`` (eq. 19). The paper gives no value; 0 keeps
        every component the threshold produced.
    top_k : int or None
        Then keep at most the ``top_k`` best components (1 by default, 2 for
        paired organs such as lungs); ``None`` keeps all that pass ``eta_c``.
    rank_by : {"confidence", "area"}
        How ``top_k`` ranks components: by confidence (the paper's score) or
        by area (the scripts keep the largest).
    min_area : int
        Components smaller than this many pixels are discarded first.
    kmeans_size : int
        Side of the square the map is resized to before KMeans (scripts: 256).
    """

    method: str = "otsu"
    threshold: float = 0.3
    eta_c: float = 0.0
    top_k: int | None = 1
    rank_by: str = "confidence"
    min_area: int = 0
    kmeans_size: int = 256

    def __post_init__(self) -> None:
        _check_choice("method", self.method, THRESHOLD_METHODS)
        _check_choice("rank_by", self.rank_by, RANK_BY)
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be at least 1 or None; got {self.top_k}.")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1]; got {self.threshold}.")
        if self.min_area < 0:
            raise ValueError(f"min_area must be non-negative; got {self.min_area}.")
        if self.kmeans_size < 2:
            raise ValueError(f"kmeans_size must be at least 2; got {self.kmeans_size}.")


@dataclass(frozen=True)
class PromptConfig:
    """Coarse mask -> SAM prompts.

    Attributes
    ----------
    mode : {"boxes", "points", "both"}
        Which prompts SAM receives. Boxes are the paper's best in 3 of 4 tasks.
    box_mode : {"single", "per_component"}
        One box around all kept components, or one box per component (lungs).
    n_positive : int
        Positive points sampled inside the components (paper: 10).
    n_negative : int
        Negative points sampled outside the components (0 by default).
    box_margin : int
        Pixels added on every side of each box (clipped to the image).
    seed : int
        Seed of the point sampling.
    """

    mode: str = "boxes"
    box_mode: str = "single"
    n_positive: int = 10
    n_negative: int = 0
    box_margin: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        _check_choice("mode", self.mode, PROMPT_MODES)
        _check_choice("box_mode", self.box_mode, BOX_MODES)
        if self.n_positive < 0 or self.n_negative < 0:
            raise ValueError("n_positive and n_negative must be non-negative.")
        if self.mode in ("points", "both") and self.n_positive < 1:
            raise ValueError("Point prompts need n_positive >= 1.")
        if self.box_margin < 0:
            raise ValueError(f"box_margin must be non-negative; got {self.box_margin}.")


@dataclass(frozen=True)
class SamConfig:
    """SAM refinement.

    Attributes
    ----------
    keep_largest : int or None
        Keep only the largest N connected components of SAM's mask (the
        paper's post-processing); ``None`` keeps SAM's mask as it is. The
        pipeline sets it to the coarse mask's ``top_k`` when left at 0.
    multimask_output : bool
        Passed to SAM; the paper uses False.
    propagate_size : int
        Input size of SAM 2's video predictor when propagating through a volume. 0 (auto):
        the model's own (1024) on a GPU; on a CPU 512 when the slices are at most 512 pixels
        on their longer side (still at least twice the scan's resolution for them; 8x less
        compute per slice in the memory attention), else 1024.
    stop_after_empty : int
        Propagation stops in a direction after this many consecutive empty slices (the
        object has ended); 0 runs every slice.
    """

    keep_largest: int | None = 0
    multimask_output: bool = False
    propagate_size: int = 0
    stop_after_empty: int = 3

    def __post_init__(self) -> None:
        if self.propagate_size not in (0, 256, 512, 768, 1024):
            raise ValueError(f"propagate_size must be 0 (auto), 256, 512, 768 or 1024; got "
                             f"{self.propagate_size}.")
        if self.stop_after_empty < 0:
            raise ValueError(f"stop_after_empty must be non-negative; got "
                             f"{self.stop_after_empty}.")


@dataclass(frozen=True)
class SalipConfig:
    """SaLIP (Aleem et al., CVPRW 2024): SAM's automatic masks, retrieved by CLIP.

    SaLIP's code tunes the generator per dataset by a random search over points per side
    {4, 8, 16}, pred-IoU and stability thresholds {0.2, 0.5, 0.8}, NMS {0.7, 0.8, 0.9} and an
    area cap {20000, 40000, 50000} pixels, scored by Dice against ground-truth masks of five
    test images. A user has no such masks, so the defaults here are fixed: the middle of each
    grid, except points per side (16, the densest: an 8x8 grid misses small lesions such as
    breast tumours). Its images are resized to 256x256, so its pixel areas are given here as
    fractions of the image (40000 px of 65536 = 0.6; its final ``min_mask_region_area`` of
    200 px = 0.003), which keeps them meaningful at any image size.

    Attributes
    ----------
    points_per_side : int
        Grid of point prompts of the automatic mask generator (per side, first crop layer).
    pred_iou_thresh : float
        Drop proposals whose predicted IoU is at or below this.
    stability_thresh : float
        Drop proposals whose stability score is at or below this.
    box_nms_thresh : float
        IoU of the boxes above which the weaker of two proposals is dropped (within a crop).
    crop_nms_thresh : float
        The same across crop layers.
    crop_n_layers : int
        Extra layers of image crops (SaLIP: 1, i.e. the image and its 4 quarter crops).
    crop_downscale : int
        Points per side are divided by this on each crop layer (SaLIP: 2).
    min_region_area : float
        Holes and islands of a proposal smaller than this fraction of the image are removed
        (segment-anything's ``min_mask_region_area``); 0 keeps them.
    area_cap : float
        Proposals covering more than this fraction of the image are dropped (SaLIP drops
        background and whole-body masks this way).
    crop : {"mask", "box"}
        What CLIP sees of a proposal: ``mask`` (SaLIP's default "crops": the image times the
        mask, inside the mask's box) or ``box`` (the image inside the box). Both are padded
        to a square with black before CLIP's resize, so a shape is never stretched or cut
        (SaLIP's CLIP preprocessing centre-crops instead).
    top_k : int
        Proposals retrieved, best CLIP score first: 1, or 2 for paired organs (SaLIP's lungs).
    points_per_batch : int
        Point prompts decoded together (memory, not results).
    """

    points_per_side: int = 16
    pred_iou_thresh: float = 0.5
    stability_thresh: float = 0.5
    box_nms_thresh: float = 0.8
    crop_nms_thresh: float = 0.8
    crop_n_layers: int = 1
    crop_downscale: int = 2
    min_region_area: float = 0.003
    area_cap: float = 0.6
    crop: str = "mask"
    top_k: int = 1
    points_per_batch: int = 64

    def __post_init__(self) -> None:
        _check_choice("SaLIP crop", self.crop, SALIP_CROPS)
        for name in ("points_per_side", "crop_downscale", "top_k", "points_per_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"SaLIP {name} must be at least 1; got {getattr(self, name)}.")
        if self.crop_n_layers < 0:
            raise ValueError(f"SaLIP crop_n_layers must be non-negative; got "
                             f"{self.crop_n_layers}.")
        for name in ("pred_iou_thresh", "stability_thresh", "box_nms_thresh",
                     "crop_nms_thresh", "min_region_area"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"SaLIP {name} must be in [0, 1]; got {getattr(self, name)}.")
        if not 0.0 < self.area_cap <= 1.0:
            raise ValueError(f"SaLIP area_cap must be in (0, 1] (a fraction of the image); "
                             f"got {self.area_cap}.")


@dataclass(frozen=True)
class VlsmConfig:
    """The VLSM chain (``PipelineConfig.method == "vlsm"``): a vision-language segmentation
    model (CLIPSeg, BiomedCLIPSeg; :mod:`napari_medclipsam.vlsm`) gives the foreground
    probability of the text; its pixels above ``threshold`` are the coarse mask (components,
    top-K and prompts as in the MedCLIP-SAMv2 chain, confidence = mean probability).

    Attributes
    ----------
    model : str
        A trained model folder (``medclipsam vlsm train``'s output, with ``vlsm.json``) or
        released CLIPSeg weights (a Hugging Face id or ``local-dir:PATH``) for zero-shot use.
    threshold : float
        Probability above which a pixel is foreground (0.5, medvlsm's).
    refine : bool
        Give the mask's boxes (and/or points, per ``prompts``) to SAM and keep SAM's mask
        (VLSM mask -> SAM refinement); False keeps the VLSM's own mask and needs no SAM.
    """

    model: str = DEFAULT_VLSM_MODEL
    threshold: float = 0.5
    refine: bool = False

    def __post_init__(self) -> None:
        if not str(self.model).strip():
            raise ValueError("VLSM model must name a model folder or CLIPSeg weights.")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"VLSM threshold must be in (0, 1); got {self.threshold}.")


@dataclass(frozen=True)
class FaithfulnessConfig:
    """The prompt-faithfulness check: does the text steer the map?

    Beside the prompt's map, the chain computes the map of a neutral prompt (and of any
    contrast prompts) on the same image with the same settings and noise, and reports how
    alike they are (:mod:`napari_medclipsam.core.faithfulness`). With M2IB this costs one
    more optimisation of the blocks after the bottleneck per extra prompt (the blocks before
    it run once); with SaLIP, one matrix product over the crops' cached embeddings.

    Attributes
    ----------
    enabled : bool
        Compute it on every run (default) or not.
    neutral_prompt : str
        The prompt that says nothing about the target ("an image"); "" is the empty prompt.
    contrast_prompts : tuple of str
        Prompts the user's should be told apart from (e.g. "normal breast tissue").
    max_correlation : float
        A map at least this correlated with the neutral (or a contrast) prompt's is reported
        as not steered by the text.
    """

    enabled: bool = True
    neutral_prompt: str = "an image"
    contrast_prompts: tuple[str, ...] = ()
    max_correlation: float = 0.9

    def __post_init__(self) -> None:
        if isinstance(self.contrast_prompts, str):
            object.__setattr__(self, "contrast_prompts", (self.contrast_prompts,))
        object.__setattr__(self, "contrast_prompts",
                           tuple(str(c) for c in self.contrast_prompts if str(c).strip()))
        if not -1.0 <= self.max_correlation <= 1.0:
            raise ValueError(f"max_correlation must be in [-1, 1]; got "
                             f"{self.max_correlation}.")


@dataclass(frozen=True)
class PipelineConfig:
    """Everything a zero-shot run depends on (models, stages, seed).

    ``method`` chooses the chain: ``medclipsamv2`` (saliency, coarse mask, SAM: the
    ``saliency``/``coarse``/``prompts`` stages), ``salip`` (SAM's automatic masks retrieved
    by CLIP: the ``salip`` stage; see :mod:`napari_medclipsam.core.salip`) or ``vlsm`` (a
    CLIPSeg / BiomedCLIPSeg probability in place of the saliency, thresholded at
    ``vlsm.threshold``; ``prompts`` and, with ``vlsm.refine``, ``sam`` follow). ``sam``
    serves all three.

    ``sam_model`` "auto" picks by device (ViT-H on a GPU, SAM 2.1 tiny on a CPU);
    ``precision`` "auto" runs M2IB and the image encoders in bf16 where the hardware has it
    natively (see :mod:`napari_medclipsam.core.precision`), else fp32.
    """

    def __post_init__(self) -> None:
        _check_choice("precision", self.precision, PRECISIONS)
        _check_choice("method", self.method, METHODS)

    clip_model: str = DEFAULT_CLIP_MODEL
    sam_model: str = DEFAULT_SAM_MODEL
    sam_checkpoint: str | None = None
    device: str | None = None
    precision: str = "auto"
    saliency: SaliencyConfig = field(default_factory=SaliencyConfig)
    coarse: CoarseMaskConfig = field(default_factory=CoarseMaskConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    sam: SamConfig = field(default_factory=SamConfig)
    method: str = "medclipsamv2"
    salip: SalipConfig = field(default_factory=SalipConfig)
    faithfulness: FaithfulnessConfig = field(default_factory=FaithfulnessConfig)
    vlsm: VlsmConfig = field(default_factory=VlsmConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PipelineConfig:
        data = dict(data)
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"Unknown pipeline settings: {', '.join(sorted(unknown))}.")
        nested = {
            "saliency": SaliencyConfig,
            "coarse": CoarseMaskConfig,
            "prompts": PromptConfig,
            "sam": SamConfig,
            "salip": SalipConfig,
            "faithfulness": FaithfulnessConfig,
            "vlsm": VlsmConfig,
        }
        for key, kind in nested.items():
            if key in data and isinstance(data[key], dict):
                data[key] = kind(**data[key])
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> PipelineConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))
