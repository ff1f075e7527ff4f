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
