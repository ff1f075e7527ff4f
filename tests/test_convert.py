"""Hugging Face-layout BiomedCLIP state dicts (MedCLIP-SAMv2's release) <-> open_clip keys.

Everything is built through the real constructors (open_clip, timm, transformers) at a
tiny size; nothing is downloaded.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from napari_medclipsam.core.convert import (
    hf_to_open_clip,
    looks_like_hf_layout,
    open_clip_to_hf,
)
from napari_medclipsam.core.models import ModelUnavailableError, clear_model_cache, load_clip

VISION_LAYERS, TEXT_LAYERS = 4, 2


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDCLIPSAM_HOME", str(tmp_path / "cache"))
    clear_model_cache()
    yield
    clear_model_cache()


@pytest.fixture(scope="module")
def tiny_model(tiny_clip_dir):
    from tiny_clip import build_tiny_clip_model

    model = build_tiny_clip_model(tiny_clip_dir)
    state = torch.load(tiny_clip_dir / "open_clip_pytorch_model.bin", weights_only=True)
    model.load_state_dict(state)
    return model.eval()


@pytest.fixture(scope="module")
def oc_state(tiny_model):
    return {k: v.clone() for k, v in tiny_model.state_dict().items()}


def assert_same_state(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert torch.equal(a[key], b[key]), key


def test_round_trip_is_exact(oc_state):
    hf = open_clip_to_hf(oc_state)
    assert looks_like_hf_layout(hf) and not looks_like_hf_layout(oc_state)
    assert_same_state(hf_to_open_clip(hf), oc_state)
    # wrapper prefixes (DataParallel, Lightning, the authors' own .pt) are removed
    assert_same_state(hf_to_open_clip({f"module.{k}": v for k, v in hf.items()}), oc_state)
    assert looks_like_hf_layout({f"model.{k}": v for k, v in hf.items()})
    # an open_clip state dict passes through with its keys unchanged
    assert_same_state(hf_to_open_clip(oc_state), oc_state)


def test_hf_keys_are_those_of_the_authors_converter(oc_state):
    """The layout written by MedCLIP-SAMv2's saliency_maps/model/convert.py."""
    hf = open_clip_to_hf(oc_state)
    expected = {
        "logit_scale",
        "vision_model.embeddings.class_embedding",
        "vision_model.embeddings.position_embedding.weight",
        "vision_model.embeddings.patch_embedding.weight",
        "vision_model.embeddings.patch_embedding.bias",
        "vision_model.post_layernorm.weight", "vision_model.post_layernorm.bias",
        "visual_projection.weight",
        "text_model.embeddings.token_embedding.weight",
        "text_model.embeddings.position_embedding.weight",
        "text_model.embeddings.token_type_embedding.weight",
        "text_model.embeddings.layer_norm.weight", "text_model.embeddings.layer_norm.bias",
        "text_projection.fc1.weight", "text_projection.fc2.weight",
    }
    parts = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
             "layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2")
    for tower, n in (("vision_model", VISION_LAYERS), ("text_model", TEXT_LAYERS)):
        expected |= {f"{tower}.encoder.layers.{i}.{p}.{w}"
                     for i in range(n) for p in parts for w in ("weight", "bias")}
    assert set(hf) == expected
    assert hf["vision_model.embeddings.class_embedding"].shape == (48,)
    assert hf["vision_model.embeddings.position_embedding.weight"].shape == (65, 48)
    assert hf["vision_model.encoder.layers.0.self_attn.k_proj.weight"].shape == (48, 48)
    qkv = oc_state["visual.trunk.blocks.2.attn.qkv.bias"]
    assert torch.equal(hf["vision_model.encoder.layers.2.self_attn.v_proj.bias"], qkv[96:])
    assert torch.equal(hf["text_model.encoder.layers.1.mlp.fc1.weight"],
                       oc_state["text.transformer.encoder.layer.1.intermediate.dense.weight"])
    assert torch.equal(hf["text_model.encoder.layers.1.layer_norm1.bias"],
                       oc_state["text.transformer.encoder.layer.1.attention.output.LayerNorm.bias"])


def test_vision_tower_computes_what_hf_clip_vision_model_computes(tiny_model, oc_state):
    """Converted weights in transformers' own CLIPVisionModel give the timm trunk's outputs.

    BiomedCLIP's HF port (chuhac's modeling_biomed_clip.py, which the authors use) differs
    from CLIPVisionModel in two places, mirrored here: the patch convolution has a bias,
    and there is no pre-layernorm. (A LayerNorm with weight 1 and bias 0 would still
    normalise, so the pre-layernorm is replaced by ``nn.Identity``, not reset.)
    """
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(hidden_size=48, num_hidden_layers=VISION_LAYERS,
                           num_attention_heads=3, intermediate_size=96, image_size=64,
                           patch_size=8, layer_norm_eps=1e-6, hidden_act="gelu")
    hf_model = CLIPVisionModel(cfg).eval()
    # transformers 5 puts the vision transformer's parts at the top; 4.x under .vision_model
    vision = getattr(hf_model, "vision_model", hf_model)
    vision.embeddings.patch_embedding = torch.nn.Conv2d(3, 48, kernel_size=8, stride=8,
                                                        bias=True)
    vision.pre_layrnorm = torch.nn.Identity()
    hf = open_clip_to_hf(oc_state)
    vision_state = {k.removeprefix("vision_model."): v for k, v in hf.items()
                    if k.startswith("vision_model.")}
    missing, unexpected = vision.load_state_dict(vision_state, strict=False)
    assert not missing and not unexpected
    # and the HF -> open_clip direction from this real model's own state dict
    from_hf = hf_to_open_clip({f"vision_model.{k}": v for k, v in vision.state_dict().items()})
    assert len(from_hf) == sum(k.startswith("visual.trunk.") for k in oc_state)
    for key, value in from_hf.items():
        assert torch.equal(value, oc_state[key]), key

    image = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    trunk = tiny_model.visual.trunk
    with torch.no_grad():
        out = hf_model(pixel_values=image)
        tokens = trunk.blocks(trunk.norm_pre(trunk._pos_embed(trunk.patch_embed(image))))
        features = trunk.forward_features(image)
        projection = torch.nn.functional.linear(out.pooler_output, hf["visual_projection.weight"])
        embedding = tiny_model.encode_image(image)
    assert out.last_hidden_state.shape == tokens.shape == (2, 65, 48)
    torch.testing.assert_close(out.last_hidden_state, tokens, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.pooler_output, features[:, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(projection, embedding, atol=1e-5, rtol=0)


def test_bert_named_text_tower_and_missing_patch_bias(oc_state):
    """``text_model.<BertModel keys>`` is accepted; a bias-free patch conv gets zero bias."""
    hf = {k: v for k, v in open_clip_to_hf(oc_state).items() if not k.startswith("text_model.")}
    hf |= {"text_model." + k.removeprefix("text.transformer."): v for k, v in oc_state.items()
           if k.startswith("text.transformer.")}
    bias = hf.pop("vision_model.embeddings.patch_embedding.bias")
    out = hf_to_open_clip(hf)
    assert torch.count_nonzero(out["visual.trunk.patch_embed.proj.bias"]) == 0
    out["visual.trunk.patch_embed.proj.bias"] = bias
    assert_same_state(out, oc_state)


def test_placeholder_pre_layrnorm_is_dropped_trained_one_refused(oc_state, caplog):
    hf = open_clip_to_hf(oc_state)
    hf["vision_model.pre_layrnorm.weight"] = torch.ones(48)
    hf["vision_model.pre_layrnorm.bias"] = torch.zeros(48)
    hf["vision_model.embeddings.position_ids"] = torch.arange(65)[None]
    assert_same_state(hf_to_open_clip(hf), oc_state)
    assert "pre_layrnorm" in caplog.text
    hf["vision_model.pre_layrnorm.weight"] = torch.full((48,), 1.5)
    with pytest.raises(ModelUnavailableError, match="pre_layrnorm"):
        hf_to_open_clip(hf)


def test_unmappable_keys_are_named(oc_state):
    hf = open_clip_to_hf(oc_state)
    with pytest.raises(ModelUnavailableError, match=r"vision_model\.encoder\.extra\.weight"):
        hf_to_open_clip({**hf, "vision_model.encoder.extra.weight": torch.zeros(1)})
    partial = dict(hf)
    del partial["vision_model.encoder.layers.3.self_attn.k_proj.weight"]
    with pytest.raises(ModelUnavailableError, match=r"layers\.3\.self_attn\.k_proj\.weight"):
        hf_to_open_clip(partial)
    with pytest.raises(ModelUnavailableError, match="same open_clip key"):
        hf_to_open_clip({**hf, "visual.head.proj.weight": oc_state["visual.head.proj.weight"]})
    with pytest.raises(ModelUnavailableError, match="transformer.resblocks"):
        open_clip_to_hf({"transformer.resblocks.0.ln_1.weight": torch.ones(4)})


def test_openai_clip_model_is_refused_with_its_keys():
    """A stock transformers CLIPModel (a CLIP text transformer, not BERT) is refused."""
    from transformers import CLIPConfig, CLIPModel

    cfg = CLIPConfig(
        vision_config={"hidden_size": 48, "num_hidden_layers": 1, "num_attention_heads": 3,
                       "intermediate_size": 96, "image_size": 64, "patch_size": 8},
        text_config={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "intermediate_size": 64},
        projection_dim=16)
    state = CLIPModel(cfg).state_dict()
    assert looks_like_hf_layout(state)
    with pytest.raises(ModelUnavailableError, match="final_layer_norm"):
        hf_to_open_clip(state)


def test_load_clip_reads_an_hf_layout_checkpoint(tiny_clip_dir, oc_state, tmp_path):
    folder = tmp_path / "medclipsamv2"
    shutil.copytree(tiny_clip_dir, folder)
    (folder / "open_clip_pytorch_model.bin").unlink()
    checkpoint = folder / "pytorch_model.bin"  # the authors' file name
    torch.save(open_clip_to_hf(oc_state), checkpoint)
    for source in (str(checkpoint), f"local-dir:{folder}"):
        bundle = load_clip(source, "cpu")
        assert bundle.weights_path == str(checkpoint)
        assert_same_state(bundle.model.state_dict(), oc_state)
    # an open_clip state dict under a "model." prefix (as the authors' .pt files may have)
    torch.save({f"model.{k}": v for k, v in oc_state.items()}, checkpoint)
    clear_model_cache()
    assert_same_state(load_clip(str(checkpoint), "cpu").model.state_dict(), oc_state)
