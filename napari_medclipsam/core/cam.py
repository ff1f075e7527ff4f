"""Class-activation saliency on a CLIP vision tower: gScoreCAM (MedCLIP-SAM) and GradCAM.

Both read the activations ``A`` of one module of a ViT block (``SaliencyConfig.cam_layer``,
default the last block, and ``cam_module``), the tokens without the class token reshaped to
the patch grid: C channel maps of 14x14. The score is CLIP's image-text logit,
``logit_scale * cos(image embedding, text embedding)``.

Which module, decided: ``norm1`` of the last block by default, where MedCLIP-SAM's code reads
``blocks[11].norm2``. BiomedCLIP's embedding is its class token alone, and in the last block
the patch tokens' ``norm2`` output feeds only their own MLP, never the class token: the
score's gradient there is exactly zero. Their channel ranking is then arbitrary (ties) and
GradCAM's map is empty (measured on the tests' toy CLIP: GradCAM all zeros at ``norm2``; at
``norm1`` both methods put the mass on the named shape on every test image, both prompts).
``norm1`` is the last point where the patch tokens reach the class token (through
attention). ``cam_module="norm2"`` reproduces their code.

* **GradCAM**: channel weights = the mean over the grid of the score's gradient with respect
  to ``A``; saliency = ReLU(sum_c w_c A_c).
* **gScoreCAM** (Chen et al. 2022, used by MedCLIP-SAM): the same gradients rank the
  channels by their mean; only the top ``cam_channels`` (300) are kept. Each kept map is
  upsampled to the model's input size (bilinear) and min-max normalised to [0, 1]; the
  (normalised) input image multiplied by each map is scored by CLIP against the text, in
  batches of ``cam_batch`` (128); the softmax of those scores over the kept channels gives
  their weights (the others weigh 0); saliency = ReLU(sum_c w_c A_c).

Either map is then upsampled to the model's input size, min-max normalised to [0, 1] and
resized to the image, as M2IB's is (:mod:`napari_medclipsam.core.saliency`).

The text embedding and the input preparation are M2IB's (``encode_text``,
``prepare_image``); the functions run on any device and under the caller's autocast.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from .config import SaliencyConfig
from .errors import CancelledError, InputError
from .saliency import (
    ProgressFn,
    StopFn,
    encode_text,
    grid_to_map,
    patch_grid,
    prepare_image,
    vit_parts,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .models import ClipBundle

__all__ = ["CAM_METHODS", "cam_saliency"]

CAM_METHODS = ("gscorecam", "gradcam")


def _target_module(clip: ClipBundle, layer: int, module: str):
    _, _, blocks = vit_parts(clip)
    depth = len(blocks)
    index = layer if layer >= 0 else depth + layer
    if not 0 <= index < depth:
        raise InputError(f"cam_layer must be between {-depth} and {depth - 1} for this model "
                         f"({depth} ViT blocks); got {layer}.")
    block = blocks[index]
    if not hasattr(block, module):
        raise InputError(f"gScoreCAM/GradCAM read a ViT block's {module} output (timm blocks, "
                         "as BiomedCLIP's); this model's blocks have none.")
    return getattr(block, module)


def _logit(clip: ClipBundle, image_features, text) -> torch.Tensor:
    """CLIP's image-text logit per image: logit_scale * cosine."""
    import torch.nn.functional as F

    scale = getattr(clip.model, "logit_scale", None)
    scale = scale.exp().float() if scale is not None else 100.0
    image = F.normalize(image_features.float(), dim=-1)
    return scale * (image @ F.normalize(text.float(), dim=-1).T)[:, 0]


def _activations_and_gradients(clip: ClipBundle, x, text, target):
    """(C, h, w) activations of the ``target`` module (class token dropped) and the score's
    gradient with respect to them."""
    import torch

    _, trunk, _ = vit_parts(clip)
    prefix = int(getattr(trunk, "num_prefix_tokens", 1))
    gh, gw = patch_grid(trunk)
    captured = {}

    def hook(_module, _inputs, output):
        leaf = output.detach().requires_grad_(True)  # the graph starts here
        captured["a"] = leaf
        return leaf

    handle = target.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            score = _logit(clip, clip.model.encode_image(x), text).sum()
            (grad,) = torch.autograd.grad(score, captured["a"])
    finally:
        handle.remove()
    a = captured["a"].detach()[0, prefix:].float()  # (N, C)
    g = grad[0, prefix:].float()
    return a.T.reshape(-1, gh, gw), g.T.reshape(-1, gh, gw)


def cam_saliency(
    clip: ClipBundle,
    image: np.ndarray,
    text: str | Sequence[str],
    config: SaliencyConfig | None = None,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    text_embedding: torch.Tensor | None = None,
) -> np.ndarray:
    """gScoreCAM or GradCAM saliency (``config.method``) of ``text`` on ``image``.

    Parameters
    ----------
    clip : ClipBundle
        From :func:`napari_medclipsam.core.models.load_clip`.
    image : np.ndarray
        HxWx3 uint8 RGB.
    text : str or sequence of str
        One prompt or an ensemble (normalised embeddings averaged).
    config : SaliencyConfig
        ``method`` ("gscorecam" or "gradcam"), ``cam_layer``, ``cam_module``,
        ``cam_channels``, ``cam_batch``.
    progress : callable, optional
        ``progress(done, total)`` after the gradient pass and after each scoring batch.
    should_stop : callable, optional
        Checked before every batch; True raises :class:`CancelledError`.
    text_embedding : torch.Tensor, optional
        A precomputed [1, D] embedding (:func:`~napari_medclipsam.core.saliency.encode_text`).

    Returns
    -------
    np.ndarray
        HxW float32 in [0, 1] at the image's size (all zeros when no channel has a
        positive weighted sum).
    """
    import torch
    import torch.nn.functional as F

    cfg = config or SaliencyConfig(method="gscorecam")
    if cfg.method not in CAM_METHODS:
        raise ValueError(f"cam_saliency computes {' or '.join(CAM_METHODS)}; got {cfg.method!r}.")
    target = _target_module(clip, cfg.cam_layer, cfg.cam_module)
    x = prepare_image(clip, image)
    with torch.no_grad():
        t = text_embedding if text_embedding is not None else encode_text(clip, text)
        t = t.to(x.device).float()
    if should_stop is not None and should_stop():
        raise CancelledError("Saliency cancelled.")
    a, g = _activations_and_gradients(clip, x, t, target)
    mean_grad = g.mean(dim=(1, 2))  # (C,)
    if cfg.method == "gradcam":
        if progress is not None:
            progress(1, 1)
        cam = torch.relu((mean_grad[:, None, None] * a).sum(0))
        return grid_to_map(clip, cam, image.shape[:2])

    k = min(int(cfg.cam_channels), a.shape[0])
    kept = torch.topk(mean_grad, k).indices
    size = clip.image_size
    maps = F.interpolate(a[kept][None], size=(size, size), mode="bilinear",
                         align_corners=False)[0]  # (k, S, S)
    low = maps.flatten(1).min(1).values[:, None, None]
    high = maps.flatten(1).max(1).values[:, None, None]
    span = high - low
    maps = torch.where(span > 0, (maps - low) / torch.where(span > 0, span, 1), 0.0)
    batches = range(0, k, int(cfg.cam_batch))
    total = 1 + len(batches)
    if progress is not None:
        progress(1, total)
    scores = torch.empty(k, device=x.device)
    with torch.no_grad():
        for i, start in enumerate(batches):
            if should_stop is not None and should_stop():
                raise CancelledError("Saliency cancelled.")
            stop = min(start + int(cfg.cam_batch), k)
            masked = x * maps[start:stop, None].to(x.dtype)  # (b, 3, S, S)
            scores[start:stop] = _logit(clip, clip.model.encode_image(masked), t)
            if progress is not None:
                progress(2 + i, total)
    weights = torch.softmax(scores.float(), dim=0)
    cam = torch.relu((weights[:, None, None] * a[kept]).sum(0))
    return grid_to_map(clip, cam, image.shape[:2])
