"""Tiny SAM 2.1 models built through the `sam2` package's own Hydra configs and builders.

``TINY_SAM2_OVERRIDES`` shrink ``configs/sam2.1/sam2.1_hiera_t.yaml`` (hiera tiny) to a model
of about 0.3 M parameters taking 256x256 inputs: the same classes (Hiera trunk, FPN neck,
memory attention and encoder, SAM heads), random weights, nothing downloaded. Pass them as
``overrides`` to :func:`napari_medclipsam.core.models.build_sam2_model`.
"""

from __future__ import annotations

TINY_SAM2_OVERRIDES = (
    "++model.image_size=256",
    "++model.image_encoder.trunk.embed_dim=8",
    "++model.image_encoder.trunk.num_heads=1",
    "++model.image_encoder.trunk.stages=[1,1,2,1]",
    "++model.image_encoder.trunk.global_att_blocks=[3]",
    "++model.image_encoder.trunk.window_pos_embed_bkg_spatial_size=[4,4]",
    "++model.image_encoder.neck.d_model=32",
    "++model.image_encoder.neck.position_encoding.num_pos_feats=32",
    "++model.image_encoder.neck.backbone_channel_list=[64,32,16,8]",
    "++model.memory_attention.d_model=32",
    "++model.memory_attention.num_layers=1",
    "++model.memory_attention.layer.d_model=32",
    "++model.memory_attention.layer.dim_feedforward=64",
    "++model.memory_attention.layer.self_attention.embedding_dim=32",
    "++model.memory_attention.layer.self_attention.feat_sizes=[16,16]",
    "++model.memory_attention.layer.cross_attention.embedding_dim=32",
    "++model.memory_attention.layer.cross_attention.feat_sizes=[16,16]",
    "++model.memory_attention.layer.cross_attention.kv_in_dim=16",
    "++model.memory_encoder.out_dim=16",
    "++model.memory_encoder.in_dim=32",
    "++model.memory_encoder.position_encoding.num_pos_feats=16",
    "++model.memory_encoder.mask_downsampler.embed_dim=32",
    "++model.memory_encoder.fuser.layer.dim=32",
)


def build_tiny_sam2(seed: int = 0):
    """A tiny SAM 2.1 (:class:`~napari_medclipsam.core.propagate.VolumePredictor`) with
    random weights from ``seed``, eval mode, on the CPU."""
    import torch

    from napari_medclipsam.core.models import build_sam2_model

    torch.manual_seed(seed)
    return build_sam2_model("sam2_t", TINY_SAM2_OVERRIDES).eval().requires_grad_(False)


def save_tiny_sam2_checkpoint(path, seed: int = 0):
    """Write the tiny SAM 2.1's weights as the official files hold them (``{"model": state
    dict}``, tensors only); returns the path."""
    from pathlib import Path

    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": build_tiny_sam2(seed).state_dict()}, path)
    return path


def tiny_builder(name: str):
    """Stands in for ``core.models.build_sam`` in tests: the tiny SAM 2.1 for ``sam2_*``
    names, the tiny SAM for the others."""
    if name.startswith("sam2"):
        return build_tiny_sam2()
    from tiny_sam import build_tiny_sam

    return build_tiny_sam()
