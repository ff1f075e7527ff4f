"""SaLIP (Aleem et al., CVPRW 2024): SAM proposes parts, CLIP picks the one the text names.

Training-free, and a peer of MedCLIP-SAMv2 that users compare on their own data:

1. SAM's automatic mask generator (segment-anything's ``SamAutomaticMaskGenerator``, or
   ``sam2``'s ``SAM2AutomaticMaskGenerator`` for the SAM 2.1 backends) proposes masks over a
   grid of point prompts, on the image and on a layer of crops (:func:`generate_proposals`);
2. proposals covering more than ``area_cap`` of the image are dropped (:func:`cap_proposals`);
3. each remaining proposal is cropped from the image (the image times the mask inside the
   mask's box, or the box) (:func:`crop_image`);
4. CLIP scores every crop against the text: 100 x the cosine with the mean of the
   L2-normalised embeddings of the prompt ensemble (:func:`crop_scores`);
5. the ``top_k`` best crops' boxes prompt SAM (multimask off), and the masks are OR-ed
   (:meth:`~napari_medclipsam.core.pipeline.ZeroShotPipeline.segment` does this step with the
   pipeline's cached SAM session, so box edits re-run only SAM's decoder).

Where this differs from SaLIP's code, and why: crops are padded to a square with black
before CLIP's resize (SaLIP's CLIP preprocessing centre-crops, which cuts elongated organs
such as lungs); its generator parameters are tuned per dataset against ground-truth masks,
ours are fixed defaults (:class:`~napari_medclipsam.core.config.SalipConfig`); the pipeline
does not keep only the largest components of SAM's mask unless asked (SaLIP does not).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .config import SalipConfig
from .errors import CancelledError, InputError
from .precision import autocast

if TYPE_CHECKING:
    from .models import ClipBundle, SamBundle

__all__ = ["NOTHING_PROPOSED", "NOTHING_UNDER_CAP", "Proposal", "cap_proposals", "crop_image",
           "crop_embeddings", "crop_scores", "embedding_scores",
           "generate_proposals", "retrieval_map", "retrieve", "text_direction"]

NOTHING_PROPOSED = ("Nothing found: SAM's automatic mask generator proposed no mask. Try lower "
                    "pred-IoU or stability thresholds, or more points per side.")
NOTHING_UNDER_CAP = ("Nothing found: all {n} of SAM's proposals cover more than the area cap "
                     "({cap:.3g}% of the image). Try a larger area cap.")


@dataclass(frozen=True, eq=False)
class Proposal:
    """One mask of SAM's automatic mask generator.

    Attributes
    ----------
    mask : np.ndarray
        HxW bool at the image's size.
    box : tuple of float
        XYXY ``(x0, y0, x1, y1)`` with inclusive pixel coordinates, as
        :class:`~napari_medclipsam.core.postprocess.Component` boxes.
    area : int
        Pixels in the mask.
    predicted_iou : float
        SAM's predicted IoU of the mask.
    stability : float
        SAM's stability score (IoU of the mask thresholded at +-1 around SAM's threshold).
    """

    mask: np.ndarray
    box: tuple[float, float, float, float]
    area: int
    predicted_iou: float
    stability: float

    def to_dict(self) -> dict[str, Any]:
        """The proposal without its mask (JSON-ready)."""
        return {"box": [float(v) for v in self.box], "area": int(self.area),
                "predicted_iou": float(self.predicted_iou),
                "stability": float(self.stability)}


# --------------------------------------------------------------------------- proposals


def _crop_count(crop_n_layers: int) -> int:
    """Crops the generator runs SAM's encoder on: the image, then 4, 16, ... per layer."""
    return sum(4 ** i for i in range(crop_n_layers + 1))


def _generator_class(family: str) -> type:
    """The package's automatic mask generator, checking cancellation and reporting progress
    between its crops (one image-encoder pass each)."""
    if family == "sam2":
        from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator as base
    else:
        from segment_anything import SamAutomaticMaskGenerator as base

    class _Reporting(base):
        progress: Callable[[int, int], None] | None = None
        should_stop: Callable[[], bool] | None = None
        n_crops = 1
        done = 0
        masks = 0

        def _process_crop(self, *args, **kwargs):
            if self.should_stop is not None and self.should_stop():
                raise CancelledError("Cancelled.")
            data = super()._process_crop(*args, **kwargs)
            self.done += 1
            self.masks += len(data["rles"])
            if self.progress is not None:
                self.progress(self.done, self.n_crops)
            return data

        def generate(self, image):
            try:
                return super().generate(image)
            except IndexError:
                # With crop layers and no mask from any crop, the released generators fail
                # in their cross-crop NMS (``box_area`` of an empty tensor): no proposal.
                if self.masks == 0 and self.done == self.n_crops:
                    return []
                raise

    return _Reporting


@functools.cache
def _predictor_class(family: str, precision: str, device: str) -> type:
    """The family's image predictor (segment-anything's ``SamPredictor``; sam2's
    ``SAM2ImagePredictor`` at the model's input size) with its image encoder under
    ``precision``'s autocast and the features it keeps cast back to float32, so the decoder
    and the generator's post-processing (NumPy) run in float32, as in the SAM sessions."""
    if family == "sam2":
        from .sam import sam2_predictor_class

        base = sam2_predictor_class()
    else:
        from segment_anything import SamPredictor as base

    class _EncoderPrecision(base):
        def set_image(self, image, *args, **kwargs):
            with autocast(precision, device):
                super().set_image(image, *args, **kwargs)
            if family == "sam2":
                f = self._features
                self._features = {"image_embed": f["image_embed"].float(),
                                  "high_res_feats": [h.float() for h in f["high_res_feats"]]}
            else:
                self.features = self.features.float()

    return _EncoderPrecision


def mask_generator(bundle: SamBundle, config: SalipConfig, image_shape: tuple[int, int],
                   precision: str = "fp32"):
    """The automatic mask generator of ``bundle``'s family with ``config``'s parameters.

    ``min_region_area`` (a fraction) becomes pixels of an image of ``image_shape``; removing
    small regions uses OpenCV, as segment-anything's and sam2's generators do. The image
    encoder runs in ``precision`` (``"bf16"`` or ``"fp32"``), everything after it in fp32.
    """
    min_area = int(round(config.min_region_area * image_shape[0] * image_shape[1]))
    kwargs = dict(points_per_side=config.points_per_side,
                  points_per_batch=config.points_per_batch,
                  pred_iou_thresh=config.pred_iou_thresh,
                  stability_score_thresh=config.stability_thresh,
                  box_nms_thresh=config.box_nms_thresh, crop_n_layers=config.crop_n_layers,
                  crop_nms_thresh=config.crop_nms_thresh,
                  crop_n_points_downscale_factor=config.crop_downscale,
                  min_mask_region_area=min_area, output_mode="binary_mask")
    generator = _generator_class(bundle.family)(bundle.model, **kwargs)
    generator.predictor = _predictor_class(bundle.family, precision,
                                           str(bundle.device))(bundle.model)
    generator.n_crops = _crop_count(config.crop_n_layers)
    return generator


def generate_proposals(bundle: SamBundle, image_rgb: np.ndarray, config: SalipConfig,
                       precision: str = "fp32",
                       progress: Callable[[int, int], None] | None = None,
                       should_stop: Callable[[], bool] | None = None) -> list[Proposal]:
    """SAM's automatic masks of an HxWx3 uint8 image, largest first.

    ``progress(done, total)`` counts the generator's crops (each one image-encoder pass:
    5 with SaLIP's one crop layer); ``should_stop`` is checked before each crop.
    """
    import torch

    if image_rgb.ndim != 3 or image_rgb.shape[2] != 3 or image_rgb.dtype != np.uint8:
        raise InputError(f"Expected an HxWx3 uint8 RGB image; got shape {image_rgb.shape}, "
                         f"dtype {image_rgb.dtype}.")
    generator = mask_generator(bundle, config, image_rgb.shape[:2], precision)
    generator.progress, generator.should_stop = progress, should_stop
    with torch.inference_mode():
        records = generator.generate(np.ascontiguousarray(image_rgb))
    proposals = []
    for r in records:
        x, y, w, h = (float(v) for v in r["bbox"])
        mask = np.asarray(r["segmentation"], dtype=bool)
        if not mask.any():
            continue
        proposals.append(Proposal(mask, (x, y, x + w, y + h), int(mask.sum()),
                                  float(r["predicted_iou"]), float(r["stability_score"])))
    proposals.sort(key=lambda p: -p.area)
    return proposals


def cap_proposals(proposals: Sequence[Proposal], config: SalipConfig,
                  image_shape: tuple[int, int]) -> list[Proposal]:
    """The proposals whose area is at most ``config.area_cap`` of the image."""
    limit = config.area_cap * image_shape[0] * image_shape[1]
    return [p for p in proposals if p.area <= limit]


# --------------------------------------------------------------------------- retrieval


def crop_image(image_rgb: np.ndarray, proposal: Proposal, mode: str = "mask") -> np.ndarray:
    """What CLIP sees of a proposal: a square HxWx3 uint8 crop.

    ``mode="mask"``: the image times the mask, inside the mask's box (SaLIP's "crops");
    ``"box"``: the image inside the box. The crop is padded to a square with black, centred,
    so CLIP's square resize neither stretches nor cuts the shape.
    """
    x0, y0, x1, y1 = (int(round(v)) for v in proposal.box)
    part = image_rgb[y0:y1 + 1, x0:x1 + 1]
    if mode == "mask":
        part = part * proposal.mask[y0:y1 + 1, x0:x1 + 1, None]
    elif mode != "box":
        raise ValueError(f"crop mode must be 'mask' or 'box'; got {mode!r}.")
    h, w = part.shape[:2]
    side = max(h, w, 1)
    square = np.zeros((side, side, 3), dtype=np.uint8)
    top, left = (side - h) // 2, (side - w) // 2
    square[top:top + h, left:left + w] = part
    return square


def text_direction(text_embedding) -> Any:
    """The unit vector CLIP scores crops against: the mean of the prompts' L2-normalised
    embeddings (``[1, D]``, as :func:`~napari_medclipsam.core.saliency.encode_text` returns
    it), normalised again (SaLIP's ``mean_text_feature /= norm``)."""
    t = text_embedding.float()
    return t / t.norm(dim=-1, keepdim=True)


def crop_embeddings(clip: ClipBundle, crops: Sequence[np.ndarray], precision: str = "fp32",
                    batch: int = 32, should_stop: Callable[[], bool] | None = None):
    """(N, D) float32 tensor: the crops' L2-normalised CLIP image embeddings (HxWx3 uint8
    crops, :func:`crop_image`, each resized whole to CLIP's input)."""
    import torch

    from .saliency import image_tensor

    out = []
    for start in range(0, len(crops), batch):
        if should_stop is not None and should_stop():
            raise CancelledError("Cancelled.")
        x = torch.stack([image_tensor(c, clip.image_size, clip.mean, clip.std)
                         for c in crops[start:start + batch]]).to(clip.device)
        with torch.no_grad(), autocast(precision, str(clip.device)):
            emb = clip.model.encode_image(x).float()
        out.append((emb / emb.norm(dim=-1, keepdim=True)).cpu())
    return torch.cat(out) if out else torch.zeros(0, 0)


def embedding_scores(embeddings, text_embedding) -> np.ndarray:
    """(N,) float32: 100 x the cosine of each crop embedding (:func:`crop_embeddings`) with
    the text (``[1, D]``, :func:`~napari_medclipsam.core.saliency.encode_text`)."""
    if not len(embeddings):
        return np.zeros(0, dtype=np.float32)
    text = text_direction(text_embedding).cpu()
    return (100.0 * embeddings @ text.T)[:, 0].numpy().astype(np.float32)


def crop_scores(clip: ClipBundle, crops: Sequence[np.ndarray], text_embedding,
                precision: str = "fp32", batch: int = 32,
                should_stop: Callable[[], bool] | None = None) -> np.ndarray:
    """(N,) float32: 100 x the cosine between each crop's CLIP embedding and the text's.

    ``text_embedding`` is ``[1, D]`` (:func:`~napari_medclipsam.core.saliency.encode_text`);
    the crops are HxWx3 uint8 (:func:`crop_image`), resized whole to CLIP's input.
    """
    return embedding_scores(crop_embeddings(clip, crops, precision, batch, should_stop),
                            text_embedding)


def retrieve(scores: np.ndarray, top_k: int) -> list[int]:
    """Indices of the ``top_k`` best scores, best first (ties: the earlier, larger proposal)."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return order[:top_k]


def retrieval_map(shape: tuple[int, int], proposals: Sequence[Proposal],
                  scores: np.ndarray) -> np.ndarray:
    """HxW float32 in [0, 1]: at each pixel, the best score of the proposals covering it,
    rescaled so the worst proposal is 0 and the best 1 (0 where no proposal lies). SaLIP's
    counterpart of a saliency map: where CLIP found the text among SAM's parts."""
    out = np.zeros(shape, dtype=np.float32)
    if not len(proposals):
        return out
    s = np.asarray(scores, dtype=np.float64)
    span = s.max() - s.min()
    norm = (s - s.min()) / span if span > 0 else np.ones_like(s)
    for p, value in sorted(zip(proposals, norm, strict=True), key=lambda pv: pv[1]):
        out[p.mask] = value  # ascending, so the best covering proposal is written last
    return out
