"""Tiny BiomedCLIP-shaped models for tests, built through open_clip and timm's real classes.

The folder written by :func:`write_tiny_clip_dir` has the layout users give to
``--clip-model local-dir:PATH``: ``open_clip_config.json`` (the BiomedCLIP config's
shape: timm ViT trunk, ``timm_pool ""``, linear projection, Hugging Face BERT text
tower with an MLP projection and CLS pooling), the weights, and the text tower's
``config.json``/``vocab.txt`` in ``text/``. Nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

TINY_VIT = "medclipsam_test_vit"
TINY_IMAGE_SIZE = 64
TINY_PATCH = 8
WORDS = (
    "a photo of an image with the disk square circle box round shape object "
    "breast tumor lung lungs brain edema ultrasound xray ct mri left right both"
).split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def register_tiny_vit() -> None:
    """Register a small ViT in timm's registry (idempotent)."""
    import timm
    from timm.models import register_model
    from timm.models.vision_transformer import VisionTransformer

    if timm.is_model(TINY_VIT):
        return

    @register_model
    def medclipsam_test_vit(pretrained: bool = False, **kwargs):
        for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
            kwargs.pop(key, None)
        kwargs = {"img_size": TINY_IMAGE_SIZE, "patch_size": TINY_PATCH, "embed_dim": 48,
                  "depth": 4, "num_heads": 3, "mlp_ratio": 2.0, **kwargs}
        model = VisionTransformer(**kwargs)
        model.pretrained_cfg = model.default_cfg = {"num_classes": 0}  # as timm's builder sets
        return model


def tiny_clip_config(embed_dim: int = 32, context_length: int = 16) -> dict:
    return {
        "model_cfg": {
            "embed_dim": embed_dim,
            "vision_cfg": {
                "timm_model_name": TINY_VIT,
                "timm_model_pretrained": False,
                "timm_pool": "",
                "timm_proj": "linear",
                "image_size": TINY_IMAGE_SIZE,
            },
            "text_cfg": {
                "hf_model_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
                "hf_tokenizer_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
                "hf_proj_type": "mlp",
                "hf_pooler_type": "cls_last_hidden_state_pooler",
                "context_length": context_length,
            },
        },
        "preprocess_cfg": {
            "mean": [0.48145466, 0.4578275, 0.40821073],
            "std": [0.26862954, 0.26130258, 0.27577711],
        },
    }


def write_text_files(folder: Path, hidden: int = 32, layers: int = 2) -> Path:
    """Write a tiny BERT config and vocabulary (what BiomedBERT's repo holds, but small)."""
    from transformers import BertConfig

    folder.mkdir(parents=True, exist_ok=True)
    vocab = SPECIAL + list(dict.fromkeys(WORDS))
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"do_lower_case": True, "tokenizer_class": "BertTokenizer", "model_max_length": 64}))
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=2 * hidden,
                        max_position_embeddings=64)
    config.save_pretrained(str(folder))
    return folder


def build_tiny_clip_model(folder: Path, seed: int = 0):
    """Construct the tiny model with open_clip's CustomTextCLIP from the folder's config."""
    import open_clip
    import torch

    register_tiny_vit()
    cfg = json.loads((folder / "open_clip_config.json").read_text())["model_cfg"]
    text_cfg = {**cfg["text_cfg"], "hf_model_name": str(folder / "text"),
                "hf_tokenizer_name": str(folder / "text"), "hf_model_pretrained": False}
    torch.manual_seed(seed)
    return open_clip.CustomTextCLIP(**{**cfg, "text_cfg": text_cfg})


def write_tiny_clip_dir(folder: str | Path, seed: int = 0, model=None) -> Path:
    """Write a complete ``local-dir:`` CLIP folder; returns it.

    ``model``: save these weights instead of a fresh random model (e.g. a toy-trained one).
    """
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    register_tiny_vit()
    (folder / "open_clip_config.json").write_text(json.dumps(tiny_clip_config(), indent=2))
    write_text_files(folder / "text")
    if model is None:
        model = build_tiny_clip_model(folder, seed=seed)
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    return folder
