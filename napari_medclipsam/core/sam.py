"""SAM refinement: compute an image's embedding once, answer any number of prompts from it.

>>> session = SamSession(sam, "vit_b@ec2df627")                     # doctest: +SKIP
>>> key = session.set_image(rgb)            # runs the image encoder (or restores the cache)
>>> mask = session.predict(boxes=[[10, 20, 120, 90]])    # prompt encoder + mask decoder only

Conventions (as segment-anything's): images are HxWx3 uint8 RGB; boxes are XYXY in image
pixels; points are XY, i.e. (column, row), in image pixels; masks come back HxW bool at the
input image's size. torch and segment-anything are imported inside the methods, so importing
this module stays cheap.

Speed (2 CPU threads, 512x512 image; ``benchmarks/bench_sam.py``, ``bench_fast_path.py``):
the encoder runs once per image (ViT-B about 9 s in fp32, SAM 2.1 tiny about 1 s in bf16); a
re-prompt from the cache takes about 23 ms (ViT-B) and 17 ms (SAM 2.1 tiny) with the
rearranged decoder (:class:`_FastMaskDecoder`, the default on the CPU) against about 60 and
35 ms through the packages' own decoders. Both give the same masks up to float rounding
(logits agree to about 1e-6 relative); ``fast=False`` reproduces ``SamPredictor.predict`` (and
``SAM2ImagePredictor.predict``) exactly.
"""

from __future__ import annotations

import functools
import hashlib
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import InputError
from .postprocess import float_array
from .precision import autocast

__all__ = ["Sam2Session", "SamSession", "image_digest", "make_session", "sam2_image_predictor",
           "sam2_predictor_class"]


@dataclass
class _Embedding:
    """One cached image: SAM's embedding and the sizes needed to map prompts and masks."""

    features: Any  # torch.Tensor (1, C, h, w) on the model's device (C=256, h=w=64 for SAM)
    original_size: tuple[int, int]  # (H, W) of the image given to set_image
    input_size: tuple[int, int]  # (h, w) after ResizeLongestSide, before padding


def image_digest(image: np.ndarray) -> str:
    """BLAKE2b hex digest (32 hex digits) of an array's bytes, shape and dtype."""
    data = np.ascontiguousarray(image)
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr((data.shape, data.dtype.str)).encode())
    digest.update(memoryview(data).cast("B"))
    return digest.hexdigest()


def _check_image(image: Any) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise InputError(
            f"SAM needs an HxWx3 RGB image; got an array of shape {image.shape}. Convert "
            "grey-scale or RGBA data first (napari_medclipsam.core.io.to_rgb_uint8).")
    if image.dtype != np.uint8:
        raise InputError(
            f"SAM needs a uint8 image (values 0-255); got dtype {image.dtype}. Rescale it first "
            "(napari_medclipsam.core.io.to_rgb_uint8 applies an intensity window).")
    if min(image.shape[:2]) < 1:
        raise InputError(f"The image is empty (shape {image.shape}).")
    return image


def _check_prompts(boxes: Any, points: Any, point_labels: Any, point_box: Any
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Validate prompts; return boxes (N, 4), points (M, 2), labels (M,), point_box (M,)."""
    if boxes is None:
        boxes = np.zeros((0, 4))
    else:
        boxes = float_array(boxes, "boxes")
        if boxes.shape == (4,):
            boxes = boxes[None]
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise InputError(f"boxes must have shape (N, 4) as XYXY (x0, y0, x1, y1) in image "
                             f"pixels; got shape {boxes.shape}.")
        bad = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
        if bad.any():
            raise InputError(f"boxes must be XYXY with x0 <= x1 and y0 <= y1; box "
                             f"{int(np.flatnonzero(bad)[0])} is {boxes[bad][0].tolist()}.")
    if points is None:
        if point_labels is not None and np.size(point_labels):
            raise InputError("point_labels were given without points.")
        points = np.zeros((0, 2))
    else:
        points = float_array(points, "points")
        if points.size == 0:
            points = points.reshape(0, 2)
        if points.ndim != 2 or points.shape[1] != 2:
            raise InputError(f"points must have shape (M, 2) as XY (column, row) in image "
                             f"pixels; got shape {points.shape}.")
    n_points = len(points)
    if n_points:
        if point_labels is None:
            raise InputError("point_labels are required with points: 1 for a positive point "
                             "(inside the object), 0 for a negative one.")
        labels = np.asarray(point_labels).reshape(-1) if np.ndim(point_labels) else None
        if labels is None or labels.shape != (n_points,):
            raise InputError(f"point_labels must have shape ({n_points},), one per point; got "
                             f"shape {np.shape(point_labels)}.")
        if not np.isin(labels, (0, 1)).all():
            raise InputError(f"point_labels must be 1 (positive) or 0 (negative); got "
                             f"{sorted(set(labels.tolist()))}.")
        labels = labels.astype(np.int64)
    else:
        labels = np.zeros(0, dtype=np.int64)
    if point_box is None or n_points == 0:
        owner = np.full(n_points, -1, dtype=np.int64)
    else:
        owner = np.asarray(point_box)
        if owner.shape != (n_points,) or not np.issubdtype(owner.dtype, np.integer):
            raise InputError(f"point_box must be ({n_points},) integers, the index of each "
                             f"point's box or -1 for every box; got shape {owner.shape}, "
                             f"dtype {owner.dtype}.")
        n_boxes = len(boxes)
        if ((owner < -1) | (owner >= n_boxes)).any():
            raise InputError(f"point_box values must be -1 or a box index in [0, {n_boxes - 1}]"
                             f" ({n_boxes} boxes); got {sorted(set(owner.tolist()))}.")
        owner = owner.astype(np.int64)
    return boxes, points, labels, owner


def _prompt_batches(boxes: np.ndarray, points: np.ndarray, owner: np.ndarray
                    ) -> list[list[tuple[np.ndarray | None, np.ndarray]]]:
    """Prompt groups (box or None, indices of its points), batched by equal point counts.

    With N > 0 boxes, one group per box holding that box and its points (``owner == i`` or
    -1); with no boxes, one group of all points. Groups of equal point counts form one batch.
    """
    if len(boxes) == 0:
        groups = [(None, np.arange(len(points)))]
    else:
        groups = [(boxes[i], np.flatnonzero((owner == i) | (owner == -1)))
                  for i in range(len(boxes))]
    if len({len(members) for _, members in groups}) == 1:
        return [groups]
    return [[group] for group in groups]


NO_PROMPTS = ("No prompts: give at least one box or one point (the coarse mask was probably "
              "empty, i.e. nothing was found).")


# --------------------------------------------------------------------------- fast decoder


def _heads(x, n: int):
    """(B, N, n*d) -> (B, n, N, d), as segment-anything's ``Attention._separate_heads``."""
    b, t, c = x.shape
    return x.reshape(b, t, n, c // n).transpose(1, 2)


def _recombine(x):
    """(B, n, N, d) -> (B, N, n*d), as segment-anything's ``Attention._recombine_heads``."""
    b, n, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, n * d)


class _FastMaskDecoder:
    """SAM's (or SAM 2's) mask decoder rearranged for prompting a cached embedding on a CPU.

    Computes what segment-anything's ``MaskDecoder.predict_masks`` (with
    ``TwoWayTransformer``) or sam2's computes, with the same weights, up to float rounding
    (about 1e-6 relative):

    * what does not depend on the prompt is computed once per image (the image tokens plus
      ``no_mask_embed``, the first block's projections of them, SAM 2's high-resolution
      features in the order the upscaling needs them, see :meth:`prepare`);
    * attention between the few prompt tokens (T, about 7) and the image tokens (N = 4096) is
      reassociated so no (N, C) projection of the image tokens is formed:
      ``softmax(q (W_k x + b_k)) (W_v x + b_v) = (softmax((q W_k) x) x) W_v^T + b_v`` and
      ``((W_q x + b_q) . k) = x . (W_q^T k) + b_q . k`` (and likewise for the output
      projection), about 2.3x fewer multiply-adds there;
    * the transposed convolutions of ``output_upscaling`` (kernel 2, stride 2) run as matrix
      products over chunks of image tokens, so the large intermediate tensors stay in cache,
      and only each group's selected mask is formed from them.

    SAM 2's differences are followed: the object-score token before the IoU token, the
    high-resolution features added inside the upscaling, and, for a single mask, the
    fallback to the best of the three multimask outputs when the single mask's stability
    score is low (``dynamic_multimask_via_stability``).

    Only used for decoders built exactly from the packages' own classes (:meth:`of`); others
    go through the model's decoder unchanged.
    """

    chunk = 512  # image tokens per upscaling step

    def __init__(self, decoder: Any, prompt_encoder: Any):
        self.decoder = decoder
        self.prompt_encoder = prompt_encoder
        self.transformer = decoder.transformer
        self._key_pe = None

    @classmethod
    def of(cls, model: Any) -> _FastMaskDecoder | None:
        """The fast decoder for a segment-anything ``Sam`` or a sam2 ``SAM2Base``, or None
        when the decoder is not the packages' own, unmodified in structure."""
        if hasattr(model, "sam_mask_decoder"):
            decoder, prompt_encoder = model.sam_mask_decoder, model.sam_prompt_encoder
            supported = cls._sam2_classes(decoder, prompt_encoder)
        else:
            decoder = getattr(model, "mask_decoder", None)
            prompt_encoder = getattr(model, "prompt_encoder", None)
            supported = cls._sam1_classes(decoder, prompt_encoder)
        if supported and cls._same_structure(decoder, *supported):
            return cls(decoder, prompt_encoder)
        return None

    @staticmethod
    def supports(model: Any) -> bool:
        """Whether ``model``'s decoder is segment-anything's or sam2's, unmodified."""
        return _FastMaskDecoder.of(model) is not None

    @staticmethod
    def _sam1_classes(decoder, prompt_encoder):
        from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer
        from segment_anything.modeling.common import LayerNorm2d
        from segment_anything.modeling.transformer import Attention, TwoWayAttentionBlock

        if type(decoder) is not MaskDecoder or type(prompt_encoder) is not PromptEncoder:
            return None
        return TwoWayTransformer, TwoWayAttentionBlock, Attention, LayerNorm2d

    @staticmethod
    def _sam2_classes(decoder, prompt_encoder):
        from sam2.modeling.sam.mask_decoder import MaskDecoder
        from sam2.modeling.sam.prompt_encoder import PromptEncoder
        from sam2.modeling.sam.transformer import (
            Attention,
            TwoWayAttentionBlock,
            TwoWayTransformer,
        )
        from sam2.modeling.sam2_utils import LayerNorm2d

        if type(decoder) is not MaskDecoder or type(prompt_encoder) is not PromptEncoder:
            return None
        return TwoWayTransformer, TwoWayAttentionBlock, Attention, LayerNorm2d

    @staticmethod
    def _same_structure(decoder, transformer_cls, block_cls, attention_cls, norm_cls) -> bool:
        from torch import nn

        transformer = decoder.transformer
        if type(transformer) is not transformer_cls or len(transformer.layers) == 0:
            return False
        if not all(type(layer) is block_cls for layer in transformer.layers):
            return False
        attentions = [transformer.final_attn_token_to_image]
        for layer in transformer.layers:
            attentions += [layer.self_attn, layer.cross_attn_token_to_image,
                           layer.cross_attn_image_to_token]
        if not all(type(attn) is attention_cls for attn in attentions):
            return False
        if any(getattr(attn, "kv_in_dim", attn.embedding_dim) != attn.embedding_dim
               for attn in attentions):
            return False
        upscaling = decoder.output_upscaling
        if not (isinstance(upscaling, nn.Sequential) and len(upscaling) == 5
                and type(upscaling[1]) is norm_cls):
            return False
        for conv in (upscaling[0], upscaling[3]):
            if not (type(conv) is nn.ConvTranspose2d and conv.kernel_size == (2, 2)
                    and conv.stride == (2, 2) and conv.padding == (0, 0)
                    and conv.output_padding == (0, 0) and conv.dilation == (1, 1)
                    and conv.groups == 1 and conv.bias is not None):
                return False
        return upscaling[0].out_channels == upscaling[1].weight.shape[0]

    def key_pe(self):
        """(1, N, C) positional encoding of the image tokens (the same for every image)."""
        if self._key_pe is None:
            pe = self.prompt_encoder.get_dense_pe()
            self._key_pe = pe.flatten(2).transpose(1, 2).contiguous()
        return self._key_pe

    def prepare(self, features, high_res=None) -> dict[str, Any]:
        """Per-image tensors: (1, C, h, w) embedding -> image tokens and first-block projections.

        ``high_res``: SAM 2's two high-resolution feature maps, (1, C/8, 4h, 4w) and
        (1, C/4, 2h, 2w) (after the decoder's ``conv_s0``/``conv_s1``, as
        ``SAM2ImagePredictor`` caches them); used when the decoder has
        ``use_high_res_features``. About 14 MiB for a 64x64x256 embedding.
        """
        _, c, h, w = features.shape
        dense = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)  # no mask prompt
        keys = (features + dense).flatten(2).transpose(1, 2).contiguous()  # (1, N, C)
        keys_pe = keys + self.key_pe()
        first = self.transformer.layers[0]
        t2i, i2t = first.cross_attn_token_to_image, first.cross_attn_image_to_token
        prepared = {
            "size": (h, w),
            "keys": keys,
            "t2i_k": _heads(t2i.k_proj(keys_pe), t2i.num_heads).contiguous(),  # (1, nh, N, d)
            "t2i_v": _heads(t2i.v_proj(keys), t2i.num_heads).contiguous(),
            "i2t_q": _heads(i2t.q_proj(keys_pe), i2t.num_heads).contiguous(),
        }
        if getattr(self.decoder, "use_high_res_features", False):
            s0, s1 = high_res
            c1, c2 = s1.shape[1], s0.shape[1]
            # In the row order of the upscaling below: (i, j, a, c) for the first map,
            # (i, j, a, c, a2, c2) for the second (pixel (2i + a, 2j + c), and
            # (4i + 2a + a2, 4j + 2c + c2)).
            prepared["high_res_1"] = (s1[0].reshape(c1, h, 2, w, 2).permute(1, 3, 2, 4, 0)
                                      .reshape(4 * h * w, c1).contiguous())
            prepared["high_res_0"] = (s0[0].reshape(c2, h, 2, 2, w, 2, 2)
                                      .permute(1, 4, 2, 5, 3, 6, 0)
                                      .reshape(16 * h * w, c2).contiguous())
        return prepared

    # -- attention between prompt tokens (queries) and image tokens (keys) ----------------
    @staticmethod
    def _token_to_image(attn, q, keys_pe, keys, k_heads=None, v_heads=None):
        """``attn(q=q, k=keys_pe, v=keys)`` for T tokens q (B, T, C) and N image tokens."""
        import torch

        nh = attn.num_heads
        d = attn.internal_dim // nh
        b, t, c = q.shape
        q_heads = _heads(attn.q_proj(q), nh)  # (B, nh, T, d)
        if k_heads is not None:  # projections of the image tokens given (first block)
            weights = torch.softmax((q_heads @ k_heads.transpose(-1, -2)) / math.sqrt(d), -1)
            return attn.out_proj(_recombine(weights @ v_heads))
        # softmax_n(q . (W_k x_n + b_k)): q . b_k is the same for every n, so it drops out.
        q_k = torch.einsum("bhtd,hdc->bhtc", q_heads, attn.k_proj.weight.view(nh, d, c))
        scores = q_k.reshape(b, nh * t, c) @ keys_pe.transpose(1, 2)  # (B, nh*T, N)
        weights = torch.softmax(scores.mul_(1.0 / math.sqrt(d)), dim=-1)
        pooled = (weights @ keys).view(b, nh, t, c)  # weights sum to 1: b_v passes through
        values = torch.einsum("bhtc,hdc->bhtd", pooled, attn.v_proj.weight.view(nh, d, c))
        values = values + attn.v_proj.bias.view(nh, 1, d)
        return attn.out_proj(_recombine(values))

    @staticmethod
    def _image_to_token(attn, keys_pe, k, v, q_heads=None):
        """``attn(q=keys_pe, k=k, v=v)`` for N image tokens (B, N, C) and T tokens (B, T, C)."""
        import torch

        nh = attn.num_heads
        d = attn.internal_dim // nh
        b, t, c = k.shape
        k_heads = _heads(attn.k_proj(k), nh)  # (B, nh, T, d)
        v_heads = _heads(attn.v_proj(v), nh)
        scale = 1.0 / math.sqrt(d)
        if q_heads is not None:  # (1, nh, N, d) given (first block)
            scores = k_heads @ q_heads.transpose(-1, -2)  # (B, nh, T, N)
        else:  # (W_q x + b_q) . k = x . (W_q^T k) + b_q . k
            k_q = torch.einsum("bhtd,hdc->bhtc", k_heads, attn.q_proj.weight.view(nh, d, c))
            scores = (k_q.reshape(b, nh * t, c) @ keys_pe.transpose(1, 2)).view(b, nh, t, -1)
            scores += torch.einsum("bhtd,hd->bht", k_heads, attn.q_proj.bias.view(nh, d))[
                ..., None]
        # Softmax over the T tokens; the (.., T, N) layout keeps it fast.
        weights = torch.softmax(scores.mul_(scale), dim=2)
        # out_proj(recombine(weights^T v)) = sum_h weights_h^T (v_h W_o,h^T) + b_o
        v_out = torch.einsum("bhtd,chd->bhtc", v_heads, attn.out_proj.weight.view(c, nh, d))
        n = weights.shape[-1]
        out = weights.reshape(-1, nh * t, n).transpose(1, 2) @ v_out.reshape(b, nh * t, c)
        return out.add_(attn.out_proj.bias)  # (B, N, C)

    def _block(self, layer, queries, keys, query_pe, cached=None):
        if layer.skip_first_layer_pe:
            queries = layer.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + query_pe
            queries = queries + layer.self_attn(q=q, k=q, v=queries)
        queries = layer.norm1(queries)
        keys_pe = None if cached is not None else keys + self.key_pe()
        attn_out = self._token_to_image(
            layer.cross_attn_token_to_image, queries + query_pe, keys_pe, keys,
            *((cached["t2i_k"], cached["t2i_v"]) if cached is not None else ()))
        queries = layer.norm2(queries + attn_out)
        queries = layer.norm3(queries + layer.mlp(queries))
        attn_out = self._image_to_token(
            layer.cross_attn_image_to_token, keys_pe, queries + query_pe, queries,
            None if cached is None else cached["i2t_q"])
        keys = layer.norm4(attn_out.add_(keys))
        return queries, keys

    def __call__(self, prepared: dict[str, Any], sparse, multimask_output: bool):
        """Low-resolution logits of each group's mask and the predicted IoUs.

        Parameters
        ----------
        prepared : dict
            From :meth:`prepare`.
        sparse : torch.Tensor
            (B, P, C) sparse prompt embeddings (``PromptEncoder`` output, no mask prompt).
        multimask_output : bool
            Choose, per group, the best of the three multimask outputs by predicted IoU
            (as when picking from the decoder's ``multimask_output=True``); else the single
            one (for SAM 2 with the stability fallback its decoder applies).

        Returns
        -------
        low_res : torch.Tensor
            (B, 1, 4h, 4w) logits (256x256 for SAM).
        iou : torch.Tensor
            (B,) predicted IoU of the chosen masks.
        """
        import torch

        decoder, transformer = self.decoder, self.transformer
        b = sparse.shape[0]
        s = 1 if getattr(decoder, "pred_obj_scores", False) else 0  # SAM 2's object token
        output_tokens = torch.cat(
            ([decoder.obj_score_token.weight] if s else [])
            + [decoder.iou_token.weight, decoder.mask_tokens.weight], 0)
        tokens = torch.cat((output_tokens.unsqueeze(0).expand(b, -1, -1), sparse), dim=1)
        queries, keys = tokens, prepared["keys"]
        for i, layer in enumerate(transformer.layers):
            queries, keys = self._block(layer, queries, keys, tokens,
                                        cached=prepared if i == 0 else None)
        n_out = s + 1 + decoder.num_mask_tokens  # the other tokens' outputs are not used
        attn_out = self._token_to_image(transformer.final_attn_token_to_image,
                                        queries[:, :n_out] + tokens[:, :n_out],
                                        keys + self.key_pe(), keys)
        hs = transformer.norm_final_attn(queries[:, :n_out] + attn_out)

        iou = decoder.iou_prediction_head(hs[:, s])  # (B, num_mask_tokens)
        rows = torch.arange(b, device=iou.device)
        best_multi = iou[:, 1:].argmax(dim=1) + 1
        if multimask_output:
            candidates = best_multi[:, None]
        elif getattr(decoder, "dynamic_multimask_via_stability", False) and not decoder.training:
            candidates = torch.stack([torch.zeros_like(best_multi), best_multi], 1)
        else:
            candidates = torch.zeros(b, 1, dtype=torch.long, device=iou.device)
        hyper = torch.stack([mlp(hs[:, s + 1 + i])
                             for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], 1)
        hyper = hyper[rows[:, None], candidates].transpose(1, 2)  # (B, C2, K)
        logits = self._upscaled_logits(prepared, keys, hyper)  # (B, K, 4h, 4w)
        chosen = candidates[:, 0]
        if candidates.shape[1] == 2:  # sam2's _dynamic_multimask_via_stability
            single = logits[:, 0].flatten(1)
            delta = decoder.dynamic_multimask_stability_delta
            area_i = (single > delta).sum(-1).float()
            area_u = (single > -delta).sum(-1).float()
            stability = torch.where(area_u > 0, area_i / area_u, 1.0)
            unstable = stability < decoder.dynamic_multimask_stability_thresh
            chosen = torch.where(unstable, best_multi, chosen)
            logits = logits[rows, unstable.long()][:, None]
        return logits, iou[rows, chosen]

    def _upscaled_logits(self, prepared, keys, hyper):
        """(B, K, 4h, 4w) logits: ``output_upscaling`` of the image tokens (with SAM 2's
        high-resolution features added) times each group's K hypernetwork outputs."""
        import torch
        import torch.nn.functional as F

        # output_upscaling = ConvT(2, 2) -> LayerNorm2d -> act -> ConvT(2, 2) -> act, as
        # matrix products on token rows: row (n, a, c) is pixel (2i + a, 2j + c) of token
        # n = i*w + j; weight (Cin, Cout, 2, 2) -> (Cin, [a, c, Cout]).
        conv1, norm, act1, conv2, act2 = self.decoder.output_upscaling
        c, c1, c2 = conv1.in_channels, conv1.out_channels, conv2.out_channels
        w1 = conv1.weight.permute(0, 2, 3, 1).reshape(c, 4 * c1)
        w2 = conv2.weight.permute(0, 2, 3, 1).reshape(c1, 4 * c2)
        b1, b2 = conv1.bias.repeat(4), conv2.bias.repeat(4)
        high_1, high_0 = prepared.get("high_res_1"), prepared.get("high_res_0")
        h, w = prepared["size"]
        n = h * w
        b, _, k = hyper.shape
        logits = torch.empty(b, 16 * n, k, dtype=keys.dtype, device=keys.device)
        for g in range(b):
            for start in range(0, n, self.chunk):
                stop = min(start + self.chunk, n)
                x = torch.addmm(b1, keys[g, start:stop], w1).view(-1, c1)
                if high_1 is not None:
                    x = x + high_1[4 * start:4 * stop]
                x = act1(F.layer_norm(x, (c1,), norm.weight, norm.bias, norm.eps))
                x = torch.addmm(b2, x, w2).view(-1, c2)
                if high_0 is not None:
                    x = x + high_0[16 * start:16 * stop]
                torch.mm(act2(x), hyper[g], out=logits[g, 16 * start:16 * stop])
        # rows (i, j, a, c, a2, c2) -> pixel (4i + 2a + a2, 4j + 2c + c2)
        return (logits.view(b, h, w, 2, 2, 2, 2, k).permute(0, 7, 1, 3, 5, 2, 4, 6)
                .reshape(b, k, 4 * h, 4 * w))


# --------------------------------------------------------------------------- session


class _EmbeddingCache:
    """What both sessions share: an LRU cache of image embeddings keyed by model and image
    bytes, the current image, a lock, and the encoder call count."""

    def __init__(self, sam: Any, model_id: str, cache_size: int, precision: str,
                 fast: bool | None = None):
        if int(cache_size) < 1:
            raise ValueError(f"cache_size must be at least 1; got {cache_size}.")
        self.sam = sam
        self.model_id = str(model_id)
        self.cache_size = int(cache_size)
        self.precision = precision  # "bf16" or "fp32", resolved
        self.encoder_calls = 0
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._current: str | None = None
        self._lock = threading.RLock()
        self._fast: _FastMaskDecoder | None = None
        self._prepared: tuple[str, dict[str, Any]] | None = None  # one image's decoder cache
        if fast is None:
            fast = sam.device.type == "cpu" and _FastMaskDecoder.supports(sam)
        self.fast = fast

    @property
    def fast(self) -> bool:
        """Whether prompts are decoded by :class:`_FastMaskDecoder` (settable)."""
        return self._fast is not None

    @fast.setter
    def fast(self, value: bool) -> None:
        with self._lock:
            decoder = _FastMaskDecoder.of(self.sam) if value else None
            if value and decoder is None:
                raise ValueError("fast=True needs segment-anything's or sam2's own mask decoder "
                                 "and two-way transformer; use fast=False for this model.")
            self._fast = decoder
            self._prepared = None

    def _prepared_for(self, key: str, features, high_res=None) -> dict[str, Any]:
        """The fast decoder's per-image tensors for ``key`` (kept for the last image)."""
        if self._prepared is None or self._prepared[0] != key:
            self._prepared = (key, self._fast.prepare(features, high_res))
        return self._prepared[1]

    def key_for(self, image: np.ndarray) -> str:
        """Cache key of an HxWx3 uint8 image: ``f"{model_id}:{blake2b(bytes, shape)}"``."""
        return f"{self.model_id}:{image_digest(_check_image(image))}"

    @property
    def current_key(self) -> str | None:
        """Key of the image set last (``None`` before any)."""
        return self._current

    def cached_keys(self) -> list[str]:
        """Keys held, least recently used first."""
        with self._lock:
            return list(self._cache)

    def is_cached(self, key: str) -> bool:
        with self._lock:
            return key in self._cache

    # -- moving an embedding between sessions (another machine computed it) -------------
    def export_embedding(self, key: str | None = None) -> dict[str, Any]:
        """The cached embedding of ``key`` (default: the current image) as plain CPU data.

        What :meth:`import_embedding` of a session on the same weights (another process or
        machine) needs to answer prompts on that image without running the image encoder:
        ``{"family": "sam" | "sam2", "model_id", "key", "original_size": (H, W), ...}``
        plus, for SAM, ``"input_size"`` (h, w after ``ResizeLongestSide``) and
        ``"features"`` (1, C, h', w') float32; for SAM 2, ``"image_embed"`` (1, C, h', w')
        and ``"high_res_feats"``, its two (1, C/8, 4h', 4w') and (1, C/4, 2h', 2w')
        float32 maps. Arrays are ``np.ndarray`` (picklable, no torch needed to read them):
        about 4 MiB for SAM ViT-B/L/H, 16 MiB for SAM 2.1 at 1024x1024 input.

        Raises
        ------
        KeyError, RuntimeError
            As :meth:`SamSession.predict` for a key not cached, or no image set.
        """
        with self._lock:
            key = self._current if key is None else key
            payload = self._export(self._entry(key))
        return {"family": self._family, "model_id": self.model_id, "key": key, **payload}

    def import_embedding(self, key: str, payload: dict[str, Any]) -> str:
        """Cache an embedding :meth:`export_embedding` gave (here or on another machine)
        under ``key`` and make it the current image; later prompts on that image (and
        :meth:`set_image` of its pixels) use it without running the image encoder.

        Raises
        ------
        InputError
            The payload belongs to another model (family, ``model_id`` or key prefix), or its
            arrays do not have the sizes this model's decoder takes.
        """
        key = str(key)
        family, model_id = payload.get("family"), payload.get("model_id")
        if family != self._family or model_id != self.model_id \
                or not key.startswith(f"{self.model_id}:"):
            raise InputError(f"This image embedding was computed by {family} {model_id!r}; "
                             f"it cannot be used with {self._family} {self.model_id!r} "
                             "(other weights). Encode the image here instead (set_image).")
        with self._lock:
            entry = self._import(payload)
            self._cache[key] = entry
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            self._current = key
            self._made_current(entry)
        return key

    def _embedding_size(self) -> tuple[int, tuple[int, int]]:
        """(channels, (h, w)) of this model's image embedding."""
        encoder = getattr(self.sam, "sam_prompt_encoder", None) or self.sam.prompt_encoder
        return int(encoder.embed_dim), tuple(int(s) for s in encoder.image_embedding_size)

    def _tensor(self, array: Any, shape: tuple[int | None, ...], what: str):
        """``array`` as a float32 tensor on the model's device, checked against ``shape``
        (None: any size on that axis)."""
        import torch

        if array is None:
            raise InputError(f"The image embedding has no {what}.")
        array = np.asarray(array)
        if array.ndim != len(shape) or any(want is not None and got != want for got, want
                                           in zip(array.shape, shape, strict=True)):
            raise InputError(f"The image embedding's {what} has shape {array.shape}; this "
                             f"model's decoder takes {shape} (other weights or input size).")
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(
            self.sam.device)

    @staticmethod
    def _size(value: Any, what: str) -> tuple[int, int]:
        size = tuple(int(v) for v in np.asarray(value).reshape(-1))
        if len(size) != 2 or min(size) < 1:
            raise InputError(f"The image embedding's {what} must be (H, W); got {value!r}.")
        return size

    def _made_current(self, entry: Any) -> None:
        """Hook: an imported entry became the current image."""

    def _entry(self, image_key: str | None) -> Any:
        """What the cache holds for ``image_key`` (the current image's key when predict got
        none); the errors :meth:`SamSession.predict` documents otherwise."""
        if image_key is None:
            raise RuntimeError("No image set: call set_image(image) before predict().")
        entry = self._cache.get(image_key)
        if entry is None:
            raise KeyError(f"Image key {image_key!r} is not in the embedding cache (never set, "
                           f"or dropped after {self.cache_size} newer images); call "
                           "set_image(image) again.")
        return entry


class SamSession(_EmbeddingCache):
    """Computes an image's SAM embedding once, caches it, answers any number of prompts.

    The image encoder (the slow part: about 20 s for ViT-B on two CPU cores) runs once per
    distinct image; prompting afterwards only runs the prompt encoder and the mask decoder
    (about 25 ms on the same CPU).

    Parameters
    ----------
    sam : segment_anything.modeling.Sam
        Already on its device and in eval mode.
    model_id : str
        Names the model and its weights (e.g. ``"vit_b:sha256:abcd..."``); part of each cache
        key, so two models never share an embedding.
    cache_size : int
        How many image embeddings to keep (least recently used are dropped). ViT-B/L/H
        embeddings are 1x256x64x64 float32, 4 MiB each.
    fast : bool, optional
        Decode with :class:`_FastMaskDecoder` (the same model rearranged: same masks up to
        float rounding, 2-3x faster on a CPU). Default: on when the model is on the CPU and
        its decoder is segment-anything's; ``False`` calls ``Sam.mask_decoder`` itself,
        giving exactly ``SamPredictor.predict``'s masks.
    precision : {"fp32", "bf16"}
        Of the image encoder; the embedding is cached and decoded in float32.

    Attributes
    ----------
    encoder_calls : int
        How many times the image encoder actually ran.
    predictor : segment_anything.SamPredictor
        Holds the current image's embedding (``features``, ``original_size``, ``input_size``),
        so code written for segment-anything's predictor can use it directly.

    Notes
    -----
    Methods hold a lock, so one session can be shared by a GUI thread and a worker.
    """

    def __init__(self, sam: Any, model_id: str, cache_size: int = 16,
                 fast: bool | None = None, precision: str = "fp32"):
        from segment_anything import SamPredictor

        self.predictor = SamPredictor(sam)
        super().__init__(sam, model_id, cache_size, precision, fast)

    # -- embeddings -----------------------------------------------------------------------
    def set_image(self, image: np.ndarray) -> str:
        """Make ``image`` the current image, running the encoder only if it is not cached.

        Parameters
        ----------
        image : np.ndarray
            HxWx3 uint8 RGB.

        Returns
        -------
        str
            The cache key (pass it to :meth:`predict` as ``image_key`` later).

        Raises
        ------
        InputError
            (a ``ValueError``) if the image is not HxWx3 uint8.
        """
        import torch

        image = _check_image(image)
        key = f"{self.model_id}:{image_digest(image)}"
        with self._lock:
            entry = self._cache.get(key)
            if entry is None:
                with torch.inference_mode(), autocast(self.precision, str(self.sam.device)):
                    self.predictor.set_image(np.ascontiguousarray(image), image_format="RGB")
                self.encoder_calls += 1
                self.predictor.features = self.predictor.features.float()  # decode in fp32
                entry = _Embedding(self.predictor.features,
                                   tuple(int(s) for s in self.predictor.original_size),
                                   tuple(int(s) for s in self.predictor.input_size))
                self._cache[key] = entry
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(key)
                self._restore(entry)
            self._current = key
        return key

    _family = "sam"

    def _export(self, entry: _Embedding) -> dict[str, Any]:
        return {"original_size": tuple(entry.original_size),
                "input_size": tuple(entry.input_size),
                "features": entry.features.detach().float().cpu().numpy()}

    def _import(self, payload: dict[str, Any]) -> _Embedding:
        channels, (h, w) = self._embedding_size()
        original = self._size(payload.get("original_size"), "original_size")
        input_size = self._size(payload.get("input_size"), "input_size")
        expected = self.predictor.transform.get_preprocess_shape(
            original[0], original[1], self.predictor.transform.target_length)
        if tuple(input_size) != tuple(expected):
            raise InputError(f"The image embedding's input_size {input_size} is not what this "
                             f"model makes of a {original} image ({tuple(expected)}).")
        features = self._tensor(payload.get("features"), (1, channels, h, w), "features")
        return _Embedding(features, original, input_size)

    def _made_current(self, entry: _Embedding) -> None:
        self._restore(entry)

    def _restore(self, entry: _Embedding) -> None:
        """Put a cached embedding into the predictor, as ``SamPredictor.set_image`` would."""
        predictor = self.predictor
        predictor.reset_image()
        predictor.features = entry.features
        predictor.original_size = entry.original_size
        predictor.input_size = entry.input_size
        predictor.is_image_set = True

    def clear_cache(self) -> None:
        """Forget every embedding (the next :meth:`set_image` runs the encoder)."""
        with self._lock:
            self._cache.clear()
            self._current = None
            self._prepared = None
            self.predictor.reset_image()

    # -- prompts --------------------------------------------------------------------------
    def predict(self, boxes: np.ndarray | None = None, points: np.ndarray | None = None,
                point_labels: np.ndarray | None = None, point_box: np.ndarray | None = None,
                multimask_output: bool = False, image_key: str | None = None,
                return_logits: bool = False) -> np.ndarray:
        """SAM mask for box and/or point prompts, from the cached embedding only.

        Parameters
        ----------
        boxes : array_like, optional
            (N, 4) XYXY in image pixels (float). A single (4,) box is accepted.
        points : array_like, optional
            (M, 2) XY, i.e. (column, row), in image pixels.
        point_labels : array_like, optional
            (M,) 1 for a positive point, 0 for a negative one. Required with ``points``.
        point_box : array_like of int, optional
            (M,) index of the box each point belongs to; -1 (the default) = every box.
        multimask_output : bool
            Ask SAM for three masks per prompt group and keep the one with the highest
            predicted IoU (helps single ambiguous points; boxes do better with False).
        image_key : str, optional
            A key returned by :meth:`set_image`; default the current image. Using it does not
            change the current image.
        return_logits : bool
            Return the HxW float32 logits (the maximum over groups) instead of the mask;
            the mask is ``logits > sam.mask_threshold`` (0).

        Returns
        -------
        np.ndarray
            HxW bool at the image's original size: the union of the groups' masks.

        Notes
        -----
        Prompts form groups: with N > 0 boxes, one group per box holding that box and its
        points (``point_box == i`` or -1); with no boxes, one group of all points. Groups of
        equal point counts (e.g. boxes alone, or boxes sharing the same points) go through the
        decoder as one batch; otherwise one decoder call per group. Thresholding is done on
        the logits upsampled to the original size, as ``SamPredictor.predict`` does.

        Raises
        ------
        ValueError
            No prompts, or prompts of the wrong shape (:class:`InputError`).
        KeyError
            ``image_key`` is not (or no longer) cached.
        RuntimeError
            No image was set.
        """
        import torch

        boxes, points, labels, owner = _check_prompts(boxes, points, point_labels, point_box)
        if len(boxes) == 0 and len(points) == 0:
            raise InputError(NO_PROMPTS)
        batches = _prompt_batches(boxes, points, owner)

        with self._lock:
            key = self._current if image_key is None else image_key
            entry = self._entry(key)
            transform = self.predictor.transform
            size = entry.original_size
            device = self.sam.device

            def as_tensors(batch):
                """Prompts of groups with equal point counts in the encoder's input frame."""
                box_t = coords_t = labels_t = None
                if batch[0][0] is not None:
                    box_t = torch.as_tensor(
                        transform.apply_boxes(np.stack([box for box, _ in batch]), size),
                        dtype=torch.float, device=device)  # (B, 4)
                if len(batch[0][1]):
                    idx = np.stack([members for _, members in batch])  # (B, M)
                    coords_t = torch.as_tensor(transform.apply_coords(points[idx], size),
                                               dtype=torch.float, device=device)
                    labels_t = torch.as_tensor(labels[idx], dtype=torch.int, device=device)
                return coords_t, labels_t, box_t

            with torch.inference_mode():
                logits = None
                for batch in batches:
                    group_logits = self._decode(key, entry, *as_tensors(batch),
                                                multimask_output=multimask_output)
                    logits = (group_logits if logits is None
                              else torch.maximum(logits, group_logits))
                result = logits if return_logits else logits > self.sam.mask_threshold
                return result.cpu().numpy()

    def _decode(self, key: str, entry: _Embedding, coords, labels, boxes,
                multimask_output: bool):
        """HxW logits (maximum over the batch) of a batch of B prompt groups.

        ``coords`` (B, M, 2) and ``labels`` (B, M) or None; ``boxes`` (B, 4) or None; all
        already in the encoder's input frame (ResizeLongestSide).
        """
        import torch

        sam = self.sam
        sparse, dense = sam.prompt_encoder(
            points=None if coords is None else (coords, labels), boxes=boxes, masks=None)
        if self._fast is not None:
            low_res, _ = self._fast(self._prepared_for(key, entry.features), sparse,
                                    multimask_output)
        else:
            low_res, iou = sam.mask_decoder(
                image_embeddings=entry.features,
                image_pe=sam.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask_output,
            )  # low_res (B, C, 256, 256) logits, iou (B, C); C = 3 or 1
            if low_res.shape[1] > 1:  # keep each group's best mask before upsampling
                best = iou.argmax(dim=1)
                low_res = low_res[torch.arange(len(best), device=best.device), best][:, None]
        logits = sam.postprocess_masks(low_res, entry.input_size, entry.original_size)
        return logits.amax(dim=0)[0] if len(logits) > 1 else logits[0, 0]


# --------------------------------------------------------------------------- SAM 2


def sam2_image_predictor(model: Any):
    """A ``sam2`` ``SAM2ImagePredictor`` for ``model`` at any input size.

    The released predictor assumes 1024x1024 inputs for its backbone feature sizes; they
    follow the model's ``image_size`` here (512 for propagation on a CPU, 256 for the tests'
    tiny models).
    """
    return sam2_predictor_class()(model)


@functools.cache
def sam2_predictor_class() -> type:
    """``SAM2ImagePredictor`` with backbone feature sizes from the model's input size
    (defined once, on first use, so importing this module does not import sam2)."""
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    class _AnySizePredictor(SAM2ImagePredictor):
        def __init__(self, sam_model: Any, **kwargs: Any) -> None:
            super().__init__(sam_model, **kwargs)
            size = int(sam_model.image_size)
            self._bb_feat_sizes = [(size // 4, size // 4), (size // 8, size // 8),
                                   (size // 16, size // 16)]

    return _AnySizePredictor


class Sam2Session(_EmbeddingCache):
    """:class:`SamSession`'s interface for SAM 2.1 models (``sam2`` package).

    One ``SAM2ImagePredictor`` per cached image holds that image's embedding (the image
    embedding and the two high-resolution feature maps SAM 2's decoder uses, float32);
    prompting runs only the prompt encoder and mask decoder. Prompts, groups, union and
    thresholding are as :meth:`SamSession.predict` documents.

    Parameters
    ----------
    sam : sam2.modeling.sam2_base.SAM2Base
        Eval mode, on its device (:func:`~napari_medclipsam.core.models.load_sam` of a
        ``sam2_*`` name builds it).
    model_id : str
        Names the model and its weights; part of each cache key.
    cache_size : int
        How many images' embeddings to keep (hiera: about 6 MiB each at 1024x1024).
    precision : {"fp32", "bf16"}
        Of the image encoder (resolved,
        :func:`~napari_medclipsam.core.precision.resolve_precision`), and of sam2's own
        decoder when ``fast=False``. The cached features are float32 either way.
    fast : bool, optional
        Decode with :class:`_FastMaskDecoder` in float32 (sam2's decoder rearranged: the same
        logits up to float rounding; a re-prompt of one box in about 17 ms on two CPU cores
        against 35 ms in fp32 and 26 ms in bf16 through ``SAM2ImagePredictor.predict``,
        ``benchmarks/RESULTS.md``). Default: on when the model is on the CPU and its decoder
        is sam2's own; ``False`` calls ``SAM2ImagePredictor.predict``.
    """

    def __init__(self, sam: Any, model_id: str, cache_size: int = 16,
                 precision: str = "fp32", fast: bool | None = None):
        super().__init__(sam, model_id, cache_size, precision, fast)

    @property
    def predictor(self):
        """The current image's ``SAM2ImagePredictor`` (``None`` before any image)."""
        with self._lock:
            return None if self._current is None else self._cache.get(self._current)

    def set_image(self, image: np.ndarray) -> str:
        """Make ``image`` (HxWx3 uint8) current, encoding it only if not cached; its key."""
        import torch

        image = _check_image(image)
        key = f"{self.model_id}:{image_digest(image)}"
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
            else:
                predictor = sam2_image_predictor(self.sam)
                with torch.inference_mode(), autocast(self.precision, str(self.sam.device)):
                    predictor.set_image(np.ascontiguousarray(image))
                self.encoder_calls += 1
                features = predictor._features  # cast once, so decoding runs in fp32
                features["image_embed"] = features["image_embed"].float()
                features["high_res_feats"] = [f.float() for f in features["high_res_feats"]]
                self._cache[key] = predictor
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
            self._current = key
        return key

    _family = "sam2"

    def _export(self, predictor: Any) -> dict[str, Any]:
        features = predictor._features
        return {"original_size": tuple(int(s) for s in predictor._orig_hw[-1]),
                "image_embed": features["image_embed"].detach().float().cpu().numpy(),
                "high_res_feats": [f.detach().float().cpu().numpy()
                                   for f in features["high_res_feats"]]}

    def _import(self, payload: dict[str, Any]) -> Any:
        channels, (h, w) = self._embedding_size()
        original = self._size(payload.get("original_size"), "original_size")
        embed = self._tensor(payload.get("image_embed"), (1, channels, h, w), "image_embed")
        high = list(payload.get("high_res_feats") or ())
        if len(high) != 2:
            raise InputError(f"The image embedding needs SAM 2's two high-resolution feature "
                             f"maps; got {len(high)}.")
        feats = [self._tensor(high[0], (1, None, 4 * h, 4 * w), "high_res_feats[0]"),
                 self._tensor(high[1], (1, None, 2 * h, 2 * w), "high_res_feats[1]")]
        predictor = sam2_image_predictor(self.sam)
        predictor._features = {"image_embed": embed, "high_res_feats": feats}
        predictor._orig_hw = [original]
        predictor._is_image_set = True
        return predictor

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()
            self._current = None
            self._prepared = None

    def predict(self, boxes: np.ndarray | None = None, points: np.ndarray | None = None,
                point_labels: np.ndarray | None = None, point_box: np.ndarray | None = None,
                multimask_output: bool = False, image_key: str | None = None,
                return_logits: bool = False) -> np.ndarray:
        """HxW bool mask (or float32 logits) at the image's size; see
        :meth:`SamSession.predict` for the parameters, groups and errors."""
        import torch

        boxes, points, labels, owner = _check_prompts(boxes, points, point_labels, point_box)
        if len(boxes) == 0 and len(points) == 0:
            raise InputError(NO_PROMPTS)
        with self._lock:
            key = self._current if image_key is None else image_key
            predictor = self._entry(key)
            if self._fast is not None:
                with torch.inference_mode():
                    logits = self._predict_fast(key, predictor, boxes, points, labels, owner,
                                                multimask_output)
                return logits if return_logits else logits > predictor.mask_threshold
            logits = None
            with torch.inference_mode(), autocast(self.precision, str(self.sam.device)):
                for batch in _prompt_batches(boxes, points, owner):
                    box = (np.stack([b for b, _ in batch]) if batch[0][0] is not None
                           else None)
                    coords = labs = None
                    if len(batch[0][1]):
                        idx = np.stack([members for _, members in batch])  # (B, M)
                        coords, labs = points[idx], labels[idx]
                        if box is None:
                            coords, labs = coords[0], labs[0]
                    out, scores, _ = predictor.predict(
                        point_coords=coords, point_labels=labs, box=box,
                        multimask_output=multimask_output, return_logits=True)
                    out = out.reshape(-1, *out.shape[-3:])  # (B, C, H, W)
                    scores = scores.reshape(len(out), -1)
                    best = out[np.arange(len(out)), scores.argmax(axis=1)]  # (B, H, W)
                    group = best.max(axis=0)
                    logits = group if logits is None else np.maximum(logits, group)
        logits = logits.astype(np.float32, copy=False)
        return logits if return_logits else logits > predictor.mask_threshold

    def _predict_fast(self, key, predictor, boxes, points, labels, owner,
                      multimask_output: bool) -> np.ndarray:
        """HxW float32 logits (maximum over groups) through :class:`_FastMaskDecoder`: the
        prompts are mapped and embedded as ``SAM2ImagePredictor.predict`` does (box corners
        as points labelled 2 and 3 before the points, coordinates scaled by the original
        size then the model's input size), then decoded in float32."""
        import torch
        import torch.nn.functional as F

        model = self.sam
        device = model.device
        h, w = predictor._orig_hw[-1]
        features = predictor._features
        prepared = self._prepared_for(key, features["image_embed"],
                                      features["high_res_feats"])

        def model_frame(xy: np.ndarray):
            xy = torch.as_tensor(xy, dtype=torch.float, device=device).clone()
            xy[..., 0] = xy[..., 0] / w
            xy[..., 1] = xy[..., 1] / h
            return xy * model.image_size

        logits = None
        for batch in _prompt_batches(boxes, points, owner):
            coords, labs = [], []
            if batch[0][0] is not None:
                box = np.stack([b for b, _ in batch]).reshape(-1, 2, 2)
                coords.append(model_frame(box))
                labs.append(torch.tensor([[2, 3]], dtype=torch.int,
                                         device=device).repeat(len(batch), 1))
            if len(batch[0][1]):
                idx = np.stack([members for _, members in batch])  # (B, M)
                coords.append(model_frame(points[idx]))
                labs.append(torch.as_tensor(labels[idx], dtype=torch.int, device=device))
            sparse, _ = model.sam_prompt_encoder(
                points=(torch.cat(coords, 1), torch.cat(labs, 1)), boxes=None, masks=None)
            low_res, _ = self._fast(prepared, sparse, multimask_output)
            group = F.interpolate(low_res, (h, w), mode="bilinear", align_corners=False)
            group = group.amax(dim=0)[0] if len(group) > 1 else group[0, 0]
            logits = group if logits is None else torch.maximum(logits, group)
        return logits.cpu().numpy().astype(np.float32, copy=False)


def make_session(bundle: Any, precision: str = "fp32", cache_size: int = 16):
    """The session for a loaded :class:`~napari_medclipsam.core.models.SamBundle`:
    :class:`Sam2Session` for SAM 2.1 backends, :class:`SamSession` for SAM's."""
    if bundle.family == "sam2":
        return Sam2Session(bundle.model, bundle.model_id, cache_size=cache_size,
                           precision=precision)
    return SamSession(bundle.model, bundle.model_id, cache_size=cache_size,
                      precision=precision)
