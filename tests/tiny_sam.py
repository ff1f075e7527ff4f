"""A tiny SAM for tests, built from segment-anything's real classes with random weights.

Every size lives in :data:`TINY_SAM_ARGS`, so a checkpoint written by
:func:`save_tiny_sam_checkpoint` always loads (``strict=True``, ``weights_only=True``) into
:func:`build_tiny_sam` called with the same keyword arguments. Nothing is downloaded.

>>> from napari_medclipsam.core.models import load_sam                 # doctest: +SKIP
>>> path = save_tiny_sam_checkpoint(tmp_path / "tiny_sam.pth")           # doctest: +SKIP
>>> bundle = load_sam("vit_b", str(path), "cpu", builder=build_tiny_sam)  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: Sizes of the tiny SAM (segment-anything's ViT-B uses img_size 1024, embed_dim 768, depth 12,
#: 12 heads, window 14, prompt_dim 256, decoder mlp_dim 2048, 8 heads, iou head 3 x 256).
TINY_SAM_ARGS: dict[str, Any] = {
    "img_size": 64,
    "patch_size": 16,
    "embed_dim": 32,
    "depth": 2,
    "num_heads": 2,
    "window_size": 2,
    "global_attn_indexes": (1,),
    "prompt_dim": 32,
    "mask_in_chans": 4,
    "decoder_depth": 2,
    "decoder_mlp_dim": 64,
    "decoder_heads": 2,
    "iou_head_depth": 2,
    "iou_head_hidden_dim": 32,
}


def build_tiny_sam(img_size: int = 64, seed: int = 0, **overrides: Any):
    """A small ``segment_anything.modeling.Sam`` (random weights, eval mode, CPU).

    Parameters
    ----------
    img_size : int
        Side of the square encoder input (a multiple of ``patch_size``, 16); the image
        embedding is ``img_size // 16`` on a side and the low-resolution masks 4x that.
    seed : int
        ``torch.manual_seed`` before construction: the same seed gives the same weights.
    **overrides
        Any other key of :data:`TINY_SAM_ARGS`.
    """
    from functools import partial

    import torch
    from segment_anything.modeling import (
        ImageEncoderViT,
        MaskDecoder,
        PromptEncoder,
        Sam,
        TwoWayTransformer,
    )

    unknown = set(overrides) - set(TINY_SAM_ARGS)
    if unknown:
        raise TypeError(f"Unknown tiny SAM arguments: {sorted(unknown)}.")
    args = {**TINY_SAM_ARGS, **overrides, "img_size": img_size}
    grid = args["img_size"] // args["patch_size"]
    torch.manual_seed(seed)
    sam = Sam(
        image_encoder=ImageEncoderViT(
            img_size=args["img_size"],
            patch_size=args["patch_size"],
            embed_dim=args["embed_dim"],
            depth=args["depth"],
            num_heads=args["num_heads"],
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            qkv_bias=True,
            use_rel_pos=True,
            window_size=args["window_size"],
            global_attn_indexes=tuple(args["global_attn_indexes"]),
            out_chans=args["prompt_dim"],
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=args["prompt_dim"],
            image_embedding_size=(grid, grid),
            input_image_size=(args["img_size"], args["img_size"]),
            mask_in_chans=args["mask_in_chans"],
        ),
        mask_decoder=MaskDecoder(
            transformer_dim=args["prompt_dim"],
            transformer=TwoWayTransformer(
                depth=args["decoder_depth"],
                embedding_dim=args["prompt_dim"],
                mlp_dim=args["decoder_mlp_dim"],
                num_heads=args["decoder_heads"],
            ),
            num_multimask_outputs=3,
            iou_head_depth=args["iou_head_depth"],
            iou_head_hidden_dim=args["iou_head_hidden_dim"],
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return sam.eval().requires_grad_(False).to("cpu")


def save_tiny_sam_checkpoint(path: str | Path, **kw: Any) -> Path:
    """Write :func:`build_tiny_sam(**kw) <build_tiny_sam>`'s state dict with ``torch.save``.

    The file holds tensors only, so ``torch.load(path, weights_only=True)`` reads it.
    Returns the path.
    """
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(build_tiny_sam(**kw).state_dict(), path)
    return path
