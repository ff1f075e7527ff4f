"""Convert BiomedCLIP state dicts between the Hugging Face layout and open_clip's keys.

The MedCLIP-SAMv2 authors release their DHN-NCE fine-tuned BiomedCLIP as a
``pytorch_model.bin`` written by their ``saliency_maps/model/convert.py``: it takes the
state dict of open_clip's BiomedCLIP (``CustomTextCLIP``: a timm ViT trunk and a
Hugging Face BERT text tower) and renames it for chuhac's timm-free
``BiomedCLIPModel`` (``modeling_biomed_clip.py``, a Hugging Face ``CLIPModel``
variant: CLIP vision naming without ``pre_layrnorm`` and with a patch-embedding
bias; CLIP-style names for the BERT text layers; a two-layer MLP text projection).
Keys that script does not rename (``logit_scale``, leftover BERT buffers or pooler)
stay in open_clip's naming. This module inverts that renaming so such a file loads
into open_clip.

Layout (``N``: layer index; ``W``: ``weight`` or ``bias``; ``V.`` = ``vision_model.``,
``T.`` = ``text_model.``, ``B.`` = ``text.transformer.``; HF key -> open_clip key)::

    V.embeddings.class_embedding [C]            -> visual.trunk.cls_token [1, 1, C]
    V.embeddings.position_embedding.weight [L, C] -> visual.trunk.pos_embed [1, L, C]
    V.embeddings.patch_embedding.W              -> visual.trunk.patch_embed.proj.W
    V.encoder.layers.N.self_attn.{q,k,v}_proj.W -> visual.trunk.blocks.N.attn.qkv.W
                                                   (q, k, v concatenated along dim 0)
    V.encoder.layers.N.self_attn.out_proj.W     -> visual.trunk.blocks.N.attn.proj.W
    V.encoder.layers.N.layer_norm1.W            -> visual.trunk.blocks.N.norm1.W
    V.encoder.layers.N.layer_norm2.W            -> visual.trunk.blocks.N.norm2.W
    V.encoder.layers.N.mlp.fc{1,2}.W            -> visual.trunk.blocks.N.mlp.fc{1,2}.W
    V.post_layernorm.W                          -> visual.trunk.norm.W
    visual_projection.W                         -> visual.head.proj.W
    T.embeddings.token_embedding.weight         -> B.embeddings.word_embeddings.weight
    T.embeddings.position_embedding.weight      -> B.embeddings.position_embeddings.weight
    T.embeddings.token_type_embedding.weight    -> B.embeddings.token_type_embeddings.weight
    T.embeddings.layer_norm.W                   -> B.embeddings.LayerNorm.W
    T.encoder.layers.N.self_attn.{q,k,v}_proj.W -> B.encoder.layer.N.attention.self.{query,
                                                   key,value}.W
    T.encoder.layers.N.self_attn.out_proj.W     -> B.encoder.layer.N.attention.output.dense.W
    T.encoder.layers.N.layer_norm1.W            -> B.encoder.layer.N.attention.output.LayerNorm.W
    T.encoder.layers.N.mlp.fc1.W                -> B.encoder.layer.N.intermediate.dense.W
    T.encoder.layers.N.mlp.fc2.W                -> B.encoder.layer.N.output.dense.W
    T.encoder.layers.N.layer_norm2.W            -> B.encoder.layer.N.output.LayerNorm.W
    text_projection.fc1.W / fc2.W               -> text.proj.0.W / text.proj.2.W (MLP)
    text_projection.W                           -> text.proj.W (linear projection)
    logit_scale, logit_bias, keys already named visual.* / text.*: unchanged

Also accepted on the text side: plain ``BertModel`` names under ``text_model.``
(``text_model.embeddings.word_embeddings.weight``, ``text_model.encoder.layer.N...``),
which map to ``text.transformer.<same>``. The standard Hugging Face ``CLIPVisionModel``
naming is the vision layout above, except that ``CLIPVisionModel`` has a
``pre_layrnorm`` that BiomedCLIP's timm ViT lacks (its ``norm_pre`` is an identity and
the authors' port removes it). A LayerNorm with weight 1 and bias 0 still normalises,
so it is not an identity: such a ``pre_layrnorm`` is taken for an untrained placeholder
left by a conversion into a stock ``CLIPVisionModel`` and dropped with a warning; a
trained one is refused (the checkpoint is another architecture). A missing
patch-embedding bias (Hugging Face's CLIP convolution has none) becomes zeros, which
computes the same. Index buffers
(``position_ids``, ``token_type_ids``) under the Hugging Face names are dropped.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from .models import ModelUnavailableError

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["hf_to_open_clip", "looks_like_hf_layout", "open_clip_to_hf"]

logger = logging.getLogger(__name__)

#: Prefixes that wrappers (DataParallel/DDP, Lightning, the authors' own scripts) add.
WRAPPER_PREFIXES = ("module.", "model.")
HF_ROOTS = ("vision_model.", "text_model.", "visual_projection.", "text_projection.")
OPEN_CLIP_ROOTS = ("visual.", "text.")
SCALARS = ("logit_scale", "logit_bias")

_W = r"(weight|bias)"

# HF vision layer suffix -> timm block suffix (q/k/v are fused separately)
_VISION_LAYER = {
    "self_attn.out_proj": "attn.proj",
    "layer_norm1": "norm1",
    "layer_norm2": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
# HF (chuhac BiomedCLIP) text layer suffix -> BertModel layer suffix
_TEXT_LAYER = {
    "self_attn.q_proj": "attention.self.query",
    "self_attn.k_proj": "attention.self.key",
    "self_attn.v_proj": "attention.self.value",
    "self_attn.out_proj": "attention.output.dense",
    "layer_norm1": "attention.output.LayerNorm",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
    "layer_norm2": "output.LayerNorm",
}
_TEXT_EMBED = {
    "token_embedding": "word_embeddings",
    "position_embedding": "position_embeddings",
    "token_type_embedding": "token_type_embeddings",
    "layer_norm": "LayerNorm",
}
_BERT_ROOTS = ("embeddings.", "encoder.layer.", "pooler.")

_HF_VISION_LAYER_RE = re.compile(
    r"vision_model\.encoder\.layers\.(\d+)\.(" + "|".join(map(re.escape, _VISION_LAYER))
    + r")\." + _W + r"$")
_HF_QKV_RE = re.compile(r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\."
                        + _W + r"$")
_HF_TEXT_LAYER_RE = re.compile(
    r"text_model\.encoder\.layers\.(\d+)\.(" + "|".join(map(re.escape, _TEXT_LAYER))
    + r")\." + _W + r"$")
_HF_TEXT_EMBED_RE = re.compile(
    r"text_model\.embeddings\.(" + "|".join(_TEXT_EMBED) + r")\." + _W + r"$")

_OC_BLOCK_RE = re.compile(
    r"visual\.trunk\.blocks\.(\d+)\.(" + "|".join(map(re.escape, _VISION_LAYER.values()))
    + r")\." + _W + r"$")
_OC_QKV_RE = re.compile(r"visual\.trunk\.blocks\.(\d+)\.attn\.qkv\." + _W + r"$")
_OC_TEXT_LAYER_RE = re.compile(
    r"text\.transformer\.encoder\.layer\.(\d+)\.("
    + "|".join(map(re.escape, _TEXT_LAYER.values())) + r")\." + _W + r"$")
_OC_TEXT_EMBED_RE = re.compile(
    r"text\.transformer\.embeddings\.(" + "|".join(_TEXT_EMBED.values()) + r")\." + _W + r"$")


def _strip_wrappers(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Drop ``module.``/``model.`` prefixes that every key shares (repeatedly)."""
    state = dict(state)
    while state:
        prefix = next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in state)),
                      None)
        if prefix is None:
            break
        state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def looks_like_hf_layout(state: Mapping[str, object]) -> bool:
    """True if the state dict names CLIP towers the Hugging Face way (``vision_model.``...).

    Wrapper prefixes (``module.``, ``model.``) shared by all keys are ignored. An
    open_clip state dict (``visual.*``, ``text.*``, ``logit_scale``) gives False.
    """
    keys = list(_strip_wrappers(dict.fromkeys(state)).keys())
    return any(k.startswith(HF_ROOTS) for k in keys)


def _fail(message: str, keys: list[str]) -> ModelUnavailableError:
    shown = ", ".join(keys[:5]) + (f" (and {len(keys) - 5} more)" if len(keys) > 5 else "")
    return ModelUnavailableError(f"{message}: {shown}.")


def _is_default_init_norm(state: dict[str, Tensor], prefix: str) -> bool:
    """True if the LayerNorm's parameters are absent or still at their initial 1 and 0."""
    import torch

    weight, bias = state.get(prefix + "weight"), state.get(prefix + "bias")
    ok = weight is None or torch.allclose(weight.float(), torch.ones_like(weight.float()),
                                          rtol=0, atol=1e-6)
    return ok and (bias is None or torch.count_nonzero(bias).item() == 0)


def _put(out: dict[str, Tensor], key: str, value: Tensor, source: str) -> None:
    if key in out:
        raise ModelUnavailableError(
            f"Two keys of the checkpoint map to the same open_clip key {key!r} (one is "
            f"{source!r}); the file mixes layouts and cannot be converted unambiguously.")
    out[key] = value


def hf_to_open_clip(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a Hugging Face-layout BiomedCLIP state dict to open_clip ``CustomTextCLIP`` keys.

    See the module docstring for the mapping. A state dict already in open_clip's
    layout comes back with its keys unchanged (only shared ``module.``/``model.``
    prefixes are removed).

    Raises
    ------
    ModelUnavailableError
        When a key has no open_clip counterpart (the message lists some), when the
        vision tower has a trained ``pre_layrnorm`` (not BiomedCLIP's architecture),
        or when a layer lacks one of its q/k/v projections.
    """
    import torch

    state = _strip_wrappers(state)
    if not looks_like_hf_layout(state):
        return state
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, Tensor]] = {}
    unexpected: list[str] = []
    if not _is_default_init_norm(state, "vision_model.pre_layrnorm."):
        raise ModelUnavailableError(
            "This checkpoint's vision tower has a trained pre-layernorm "
            "(vision_model.pre_layrnorm), which BiomedCLIP's ViT does not have (its timm trunk "
            "applies no norm before the blocks). It is another architecture (e.g. an OpenAI "
            "CLIP ViT) and cannot be loaded as BiomedCLIP.")
    if "vision_model.pre_layrnorm.weight" in state:
        logger.warning(
            "Dropping vision_model.pre_layrnorm (weight 1, bias 0: an untrained placeholder, "
            "assumed left by a conversion into a stock CLIPVisionModel); BiomedCLIP's ViT has "
            "no pre-norm.")
    simple: dict[str, str] = {
        "vision_model.embeddings.patch_embedding.weight": "visual.trunk.patch_embed.proj.weight",
        "vision_model.embeddings.patch_embedding.bias": "visual.trunk.patch_embed.proj.bias",
        "vision_model.post_layernorm.weight": "visual.trunk.norm.weight",
        "vision_model.post_layernorm.bias": "visual.trunk.norm.bias",
        "visual_projection.weight": "visual.head.proj.weight",
        "visual_projection.bias": "visual.head.proj.bias",
        "text_projection.fc1.weight": "text.proj.0.weight",
        "text_projection.fc1.bias": "text.proj.0.bias",
        "text_projection.fc2.weight": "text.proj.2.weight",
        "text_projection.fc2.bias": "text.proj.2.bias",
        "text_projection.weight": "text.proj.weight",
        "text_projection.bias": "text.proj.bias",
    }
    # placeholder pre-norm (checked above) and derived index buffers (arange/zeros)
    dropped = ("vision_model.pre_layrnorm.weight", "vision_model.pre_layrnorm.bias",
               "vision_model.embeddings.position_ids", "text_model.embeddings.position_ids",
               "text_model.embeddings.token_type_ids")
    for key, value in state.items():
        if key in dropped:
            continue
        if key in simple:
            _put(out, simple[key], value, key)
        elif key == "vision_model.embeddings.class_embedding":
            _put(out, "visual.trunk.cls_token", value.reshape(1, 1, -1), key)
        elif key == "vision_model.embeddings.position_embedding.weight":
            _put(out, "visual.trunk.pos_embed", value.unsqueeze(0), key)
        elif m := _HF_QKV_RE.match(key):
            qkv.setdefault((int(m.group(1)), m.group(3)), {})[m.group(2)] = value
        elif m := _HF_VISION_LAYER_RE.match(key):
            _put(out, f"visual.trunk.blocks.{m.group(1)}.{_VISION_LAYER[m.group(2)]}."
                 f"{m.group(3)}", value, key)
        elif m := _HF_TEXT_EMBED_RE.match(key):
            _put(out, f"text.transformer.embeddings.{_TEXT_EMBED[m.group(1)]}.{m.group(2)}",
                 value, key)
        elif m := _HF_TEXT_LAYER_RE.match(key):
            _put(out, f"text.transformer.encoder.layer.{m.group(1)}."
                 f"{_TEXT_LAYER[m.group(2)]}.{m.group(3)}", value, key)
        elif key.startswith("text_model.") and key[len("text_model."):].startswith(_BERT_ROOTS):
            _put(out, "text.transformer." + key[len("text_model."):], value, key)
        elif key.startswith(OPEN_CLIP_ROOTS) or key in SCALARS:
            # left in open_clip naming by the authors' converter (logit_scale, BERT pooler...)
            _put(out, key, value, key)
        else:
            unexpected.append(key)
    if unexpected:
        raise _fail("These keys of the Hugging Face-layout CLIP checkpoint have no counterpart "
                    "in open_clip's BiomedCLIP (is it a BiomedCLIP model? a vision tower must "
                    "be a ViT with q/k/v projections, the text tower a BERT)", unexpected)
    for (layer, kind), parts in sorted(qkv.items()):
        missing = [p for p in "qkv" if p not in parts]
        if missing:
            raise _fail(f"Vision layer {layer} lacks its {'/'.join(missing)} projection {kind}",
                        [f"vision_model.encoder.layers.{layer}.self_attn.{p}_proj.{kind}"
                         for p in missing])
        _put(out, f"visual.trunk.blocks.{layer}.attn.qkv.{kind}",
             torch.cat([parts["q"], parts["k"], parts["v"]], dim=0), "q/k/v")
    weight = out.get("visual.trunk.patch_embed.proj.weight")
    if weight is not None and "visual.trunk.patch_embed.proj.bias" not in out:
        out["visual.trunk.patch_embed.proj.bias"] = weight.new_zeros(weight.shape[0])
    return out


def open_clip_to_hf(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename an open_clip BiomedCLIP state dict to the Hugging Face layout (the inverse).

    Writes the layout of the MedCLIP-SAMv2 authors' converter: ``qkv`` split into
    ``q_proj``/``k_proj``/``v_proj``, CLIP-style names for the BERT layers, and keys
    without a counterpart (``logit_scale``, BERT buffers/pooler) left as they are.

    Raises
    ------
    ModelUnavailableError
        For keys outside ``visual.*``/``text.*``/``logit_*`` (not a ``CustomTextCLIP``).
    """
    state = _strip_wrappers(state)
    simple = {
        "visual.trunk.patch_embed.proj.weight": "vision_model.embeddings.patch_embedding.weight",
        "visual.trunk.patch_embed.proj.bias": "vision_model.embeddings.patch_embedding.bias",
        "visual.trunk.norm.weight": "vision_model.post_layernorm.weight",
        "visual.trunk.norm.bias": "vision_model.post_layernorm.bias",
        "visual.head.proj.weight": "visual_projection.weight",
        "visual.head.proj.bias": "visual_projection.bias",
        "text.proj.0.weight": "text_projection.fc1.weight",
        "text.proj.0.bias": "text_projection.fc1.bias",
        "text.proj.2.weight": "text_projection.fc2.weight",
        "text.proj.2.bias": "text_projection.fc2.bias",
        "text.proj.weight": "text_projection.weight",
        "text.proj.bias": "text_projection.bias",
    }
    inverse_vision = {v: k for k, v in _VISION_LAYER.items()}
    inverse_text = {v: k for k, v in _TEXT_LAYER.items()}
    inverse_embed = {v: k for k, v in _TEXT_EMBED.items()}
    rules: list[tuple[re.Pattern[str], Callable[[re.Match[str], Tensor], dict[str, Tensor]]]] = [
        (_OC_QKV_RE, lambda m, v: {
            f"vision_model.encoder.layers.{m.group(1)}.self_attn.{p}_proj.{m.group(2)}": c.clone()
            for p, c in zip("qkv", v.chunk(3, dim=0), strict=True)}),
        (_OC_BLOCK_RE, lambda m, v: {
            f"vision_model.encoder.layers.{m.group(1)}.{inverse_vision[m.group(2)]}."
            f"{m.group(3)}": v}),
        (_OC_TEXT_EMBED_RE, lambda m, v: {
            f"text_model.embeddings.{inverse_embed[m.group(1)]}.{m.group(2)}": v}),
        (_OC_TEXT_LAYER_RE, lambda m, v: {
            f"text_model.encoder.layers.{m.group(1)}.{inverse_text[m.group(2)]}."
            f"{m.group(3)}": v}),
    ]
    out: dict[str, Tensor] = {}
    unexpected: list[str] = []
    for key, value in state.items():
        if key in simple:
            out[simple[key]] = value
        elif key == "visual.trunk.cls_token":
            out["vision_model.embeddings.class_embedding"] = value.reshape(-1)
        elif key == "visual.trunk.pos_embed":
            out["vision_model.embeddings.position_embedding.weight"] = value.squeeze(0)
        else:
            for pattern, rename in rules:
                if m := pattern.match(key):
                    out.update(rename(m, value))
                    break
            else:
                if key.startswith(OPEN_CLIP_ROOTS) or key in SCALARS:
                    out[key] = value  # no counterpart: kept, as the authors' converter does
                else:
                    unexpected.append(key)
    if unexpected:
        raise _fail("These keys are not those of an open_clip CustomTextCLIP (timm ViT + "
                    "Hugging Face text tower) and cannot be renamed", unexpected)
    return out
