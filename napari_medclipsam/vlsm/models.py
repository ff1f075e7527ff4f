"""CLIPSeg and BiomedCLIPSeg: a frozen CLIP image and text encoder feeding a light decoder that
outputs a mask for the text (Lüddecke and Ecker's CLIPSeg; medvlsm's BiomedCLIPSeg).

Both use the released ``transformers`` decoder class (``CLIPSegDecoder``): activations of
chosen ViT blocks, reduced to ``reduce_dim`` channels, conditioned by the text embedding
through FiLM, passed through small transformer layers and upsampled by transposed
convolutions to a logit map.

* **CLIPSeg** (``arch="clipseg"``): ``CLIPSegForImageSegmentation`` and its processor,
  ``CIDAS/clipseg-rd64-refined`` by default (352x352 inputs, ImageNet normalisation, CLIP's
  BPE tokenizer, context 77). Its activations are its own CLIP's hidden states of blocks
  ``extract_layers`` (3, 6, 9), exactly as its ``forward`` takes them.
* **BiomedCLIPSeg** (``arch="biomedclipseg"``): a BiomedCLIP (any open_clip model with a
  timm ViT trunk, loaded by :func:`napari_medclipsam.core.models.load_clip`, so DHN-NCE
  fine-tuned ones plug in) gives the activations of ViT blocks 3, 6, 9 (0-based, after the
  block, before the final norm; transformers' convention ``hidden_states[i + 1]``; medvlsm's
  code takes one block later through an off-by-one) and the text embedding (the projected
  PubMedBERT CLS token, not normalised, context 256). 224x224 inputs with CLIP's
  normalisation. The decoder is randomly initialised or copied from CLIPSeg's where the
  shapes allow (medvlsm's ``_d`` variant; for BiomedCLIP ViT-B/16 with 512-d embeddings
  every shape matches).

The encoders are frozen (CLIPSeg's own ``forward`` runs them without gradients too); only the
decoder is trained, and only the decoder is saved. A trained model is a folder::

    MODEL_DIR/vlsm.json            arch, input size, threshold, decoder config, extract
                                   layers, the base model(s) by source and SHA-256, classes,
                                   prompt set, training record
    MODEL_DIR/decoder.safetensors  the decoder's weights

read by :func:`load_vlsm`, which rebuilds the base from its recorded source (a hub id is
downloaded into ``$MEDCLIPSAM_HOME``; a ``local-dir:`` must exist on this machine) and refuses,
in one line, a base whose weights differ from those the decoder was trained on.
"""

from __future__ import annotations

import copy
import json
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.errors import InputError
from ..core.models import (
    CACHE_ENV,
    ModelUnavailableError,
    file_sha256,
    hub_snapshot,
    load_clip,
    resolve_device,
)
from .config import (
    ARCHS,
    DECODER_FILE,
    DECODER_INITS,
    DEFAULT_CLIPSEG_MODEL,
    DEFAULT_EXTRACT_LAYERS,
    FORMAT_VERSION,
    MODEL_FILE,
    RD64_REFINED,
    absolute_source,
    is_vlsm_folder,
    local_source_path,
    read_vlsm_record,
)

logger = logging.getLogger(__name__)

_CLIPSEG_FILES = ["*.json", "*.txt", "*.safetensors"]

_CACHE: dict[tuple[str, str], Any] = {}
_CACHE_LOCK = threading.Lock()


# --------------------------------------------------------------------------- the models


class VlsmModel(torch.nn.Module):
    """A vision-language segmentation model: frozen encoders + a trainable ``decoder``.

    Subclasses set ``arch``, ``image_size`` and implement :meth:`image_inputs`,
    :meth:`text_embeddings` and :meth:`activations`. The encoders are held outside the
    module's parameters (they are shared with other users of the same base and never
    trained); ``state_dict()`` is the decoder's.

    Attributes
    ----------
    decoder : transformers.models.clipseg.modeling_clipseg.CLIPSegDecoder
    extract_layers : tuple of int
        ViT blocks (0-based) whose outputs feed the decoder.
    image_size : int
        Side of the square input.
    device : str
    base : dict
        The base model(s) by source and SHA-256 (written into ``vlsm.json``).
    threshold : float
        Probability above which a pixel is foreground (0.5, medvlsm's).
    info : dict
        What ``vlsm.json`` recorded besides the model (classes, prompt set, training).
    """

    arch = ""

    def __init__(self, decoder, extract_layers: Sequence[int], image_size: int, device: str,
                 base: dict[str, Any]):
        super().__init__()
        self.decoder = decoder.requires_grad_(True)  # the one trainable part
        self.extract_layers = tuple(int(i) for i in extract_layers)
        self.image_size = int(image_size)
        self.device = device
        self.base = dict(base)
        self.threshold = 0.5
        self.info: dict[str, Any] = {}

    # -- subclasses
    def image_inputs(self, images: Sequence[np.ndarray]):
        """HxWx3 uint8 RGB images -> [B, 3, S, S] float tensor on the model's device."""
        raise NotImplementedError

    def text_embeddings(self, prompts: Sequence[str]):
        """Prompts -> [N, D] conditional embeddings (no gradient: the text tower is frozen).
        An empty string is the empty prompt (medvlsm's p0)."""
        raise NotImplementedError

    def activations(self, pixel_values) -> list:
        """[B, 3, S, S] -> the frozen vision tower's tokens after each of ``extract_layers``:
        a list of [B, 1 + h*w, C] float32 tensors (class token first), without gradient."""
        raise NotImplementedError

    # -- shared
    def decode(self, activations: Sequence, text_embeddings):
        """Decoder logits [B, h', w'] (h' = w' = S for CLIPSeg's shapes) for activations and
        one text embedding per image ([B, D]). (transformers 4.x squeezes a batch of one to
        [h', w']: reshaped back.)"""
        logits = self.decoder(list(activations), text_embeddings).logits
        return logits.reshape(text_embeddings.shape[0], *logits.shape[-2:])

    def probabilities(self, image_rgb: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        """(N, H, W) float32 foreground probabilities of ``prompts`` on an HxWx3 uint8 image
        (:func:`predict_probabilities`; what ``ZeroShotPipeline``'s ``vlsm`` chain calls)."""
        return predict_probabilities(self, image_rgb, [str(p) for p in prompts])

    def forward(self, pixel_values, text_embeddings):
        """Logits [B, h', w'] of the masks for ``pixel_values`` [B, 3, S, S] and
        ``text_embeddings`` [B, D]."""
        return self.decode(self.activations(pixel_values), text_embeddings)

    def train(self, mode: bool = True):
        super().train(mode)
        self.decoder.train(mode)  # the encoders stay in eval mode (frozen)
        return self

    def decoder_config(self) -> dict[str, Any]:
        return self.decoder.config.to_dict()

    def describe(self) -> dict[str, Any]:
        """What :func:`save_vlsm` writes into ``vlsm.json`` about the model."""
        return {"format": FORMAT_VERSION, "arch": self.arch, "image_size": self.image_size,
                "extract_layers": list(self.extract_layers), "threshold": self.threshold,
                "base": self.base, "decoder_config": self.decoder_config()}

    @property
    def model_id(self) -> str:
        """``arch@...`` for manifests: the bases' hashes and the decoder's origin."""
        hashes = "+".join(str(v)[:12] for k, v in sorted(self.base.items())
                          if k.endswith("sha256") and v)
        trained = self.info.get("decoder_sha256", "")
        return f"{self.arch}@{hashes or 'random'}" + (f"/{trained[:12]}" if trained else "")


class ClipSegVlsm(VlsmModel):
    """CLIPSeg through ``CLIPSegForImageSegmentation``: its CLIP (frozen, shared with the
    loaded network) and a decoder of its own (a copy, so training never changes the
    pretrained network others hold).

    Parameters
    ----------
    net : transformers.CLIPSegForImageSegmentation
    processor : transformers.CLIPSegProcessor
        Its image processor (resize to S x S, ImageNet normalisation) and CLIP tokenizer.
    """

    arch = "clipseg"

    def __init__(self, net, processor, device: str, base: dict[str, Any]):
        size = processor.image_processor.size
        side = int(size.get("height") or size.get("shortest_edge") or 352)
        super().__init__(copy.deepcopy(net.decoder), net.config.extract_layers, side, device,
                         base)
        self.__dict__["towers"] = net.clip  # not a submodule: frozen, shared, never saved
        self.__dict__["processor"] = processor
        self.context_length = int(getattr(processor.tokenizer, "model_max_length", 77) or 77)
        self.context_length = min(self.context_length, int(
            net.config.text_config.max_position_embeddings))

    def image_inputs(self, images: Sequence[np.ndarray]):
        pixel = self.processor.image_processor(images=list(images), return_tensors="pt")
        return pixel["pixel_values"].to(self.device)

    def text_embeddings(self, prompts: Sequence[str]):
        tokens = self.processor.tokenizer(list(prompts), padding=True, truncation=True,
                                          max_length=self.context_length, return_tensors="pt")
        with torch.no_grad():
            out = self.towers.get_text_features(
                input_ids=tokens["input_ids"].to(self.device),
                attention_mask=tokens["attention_mask"].to(self.device))
        out = getattr(out, "pooler_output", out)
        return out.float()

    def activations(self, pixel_values) -> list:
        with torch.no_grad():
            out = self.towers.vision_model(pixel_values=pixel_values, output_hidden_states=True,
                                           interpolate_pos_encoding=True)
        return [out.hidden_states[i + 1].float() for i in self.extract_layers]


class BiomedClipSegVlsm(VlsmModel):
    """BiomedCLIP's towers (frozen) + a CLIPSeg decoder (medvlsm's BiomedCLIPSeg).

    Parameters
    ----------
    clip : napari_medclipsam.core.models.ClipBundle
        A CLIP with a timm ViT trunk holding one class token (BiomedCLIP's layout).
    decoder : CLIPSegDecoder
        Built by :func:`biomedclipseg_decoder`.
    """

    arch = "biomedclipseg"

    def __init__(self, clip, decoder, extract_layers: Sequence[int], base: dict[str, Any]):
        super().__init__(decoder, extract_layers, clip.image_size, clip.device, base)
        self.__dict__["clip"] = clip
        trunk = _trunk(clip)
        depth = len(trunk.blocks)
        if max(self.extract_layers) >= depth or min(self.extract_layers) < 0:
            raise InputError(f"extract layers {list(self.extract_layers)} are outside the "
                             f"CLIP's {depth} ViT blocks (0 to {depth - 1}).")

    def image_inputs(self, images: Sequence[np.ndarray]):
        from ..core.saliency import image_tensor

        clip = self.clip
        batch = [image_tensor(np.asarray(im), clip.image_size, clip.mean, clip.std)
                 for im in images]
        return torch.stack(batch).to(self.device)

    def text_embeddings(self, prompts: Sequence[str]):
        with torch.no_grad():
            tokens = self.clip.tokenizer(list(prompts)).to(self.device)
            return self.clip.model.encode_text(tokens).float()

    def activations(self, pixel_values) -> list:
        trunk = _trunk(self.clip)
        wanted = set(self.extract_layers)
        out: dict[int, Any] = {}
        with torch.no_grad():
            x = trunk.patch_embed(pixel_values)
            x = trunk._pos_embed(x)
            x = trunk.patch_drop(x)
            x = trunk.norm_pre(x)
            for i, block in enumerate(trunk.blocks[: max(wanted) + 1]):
                x = block(x)
                if i in wanted:
                    out[i] = x.float()
        return [out[i] for i in self.extract_layers]


def _trunk(clip):
    trunk = getattr(getattr(clip.model, "visual", None), "trunk", None)
    if trunk is None or not hasattr(trunk, "blocks") or not hasattr(trunk, "patch_embed"):
        raise InputError("BiomedCLIPSeg needs a CLIP whose vision tower is a timm ViT "
                         "(model.visual.trunk.blocks), as BiomedCLIP's is.")
    if int(getattr(trunk, "num_prefix_tokens", 1)) != 1:
        raise InputError("BiomedCLIPSeg needs a ViT with exactly one class token (CLIPSeg's "
                         f"decoder drops the first token); this one has "
                         f"{trunk.num_prefix_tokens} prefix tokens.")
    return trunk


# --------------------------------------------------------------------------- building


def biomedclipseg_decoder(clip, extract_layers: Sequence[int] = DEFAULT_EXTRACT_LAYERS,
                          clipseg_config=None, seed: int = 0):
    """A randomly initialised CLIPSeg decoder shaped for ``clip``'s ViT and text embedding.

    The decoder settings (reduce_dim, heads, transposed convolution) are ``clipseg_config``'s
    when given (so its weights can be copied), else rd64-refined's (:data:`RD64_REFINED`).
    """
    from transformers import CLIPSegConfig
    from transformers.models.clipseg.modeling_clipseg import CLIPSegDecoder

    trunk = _trunk(clip)
    patch = trunk.patch_embed.patch_size
    patch = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
    embed = int(clip.model.text_projection.shape[-1]) if hasattr(
        clip.model, "text_projection") and clip.model.text_projection is not None else None
    if embed is None:
        with torch.no_grad():
            embed = int(clip.model.encode_text(clip.tokenizer([""]).to(clip.device)).shape[-1])
    settings = dict(RD64_REFINED)
    if clipseg_config is not None:
        settings = {k: getattr(clipseg_config, k) for k in RD64_REFINED}
    config = CLIPSegConfig(
        vision_config={"hidden_size": int(trunk.embed_dim), "patch_size": patch,
                       "image_size": int(clip.image_size),
                       "num_attention_heads": int(trunk.blocks[0].attn.num_heads)},
        projection_dim=embed, extract_layers=[int(i) for i in extract_layers], **settings)
    config._attn_implementation = "sdpa"  # as from_pretrained sets it for CLIPSeg's own
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        decoder = CLIPSegDecoder(config)
    return decoder.to(clip.device).float()


def copy_decoder_weights(target, source) -> tuple[list[str], list[str]]:
    """Copy every parameter of ``source`` (a CLIPSeg decoder) into ``target`` where the name
    and shape agree (medvlsm's ``_d``: a decoder pretrained by CLIPSeg).

    Returns
    -------
    (copied, skipped) : lists of parameter names of ``target``
    """
    theirs = source.state_dict()
    ours = target.state_dict()
    copied, skipped = [], []
    for name, value in ours.items():
        other = theirs.get(name)
        if other is not None and tuple(other.shape) == tuple(value.shape):
            ours[name] = other.detach().to(value.dtype).clone()
            copied.append(name)
        else:
            skipped.append(name)
    with torch.no_grad():
        target.load_state_dict(ours)
    return copied, skipped


def _is_local(source: str) -> bool:
    return local_source_path(source) is not None


def _clipseg_folder(source: str) -> Path:
    """A local folder holding a CLIPSeg model and processor (a hub id is downloaded)."""
    if _is_local(source):
        folder = Path(source.removeprefix("local-dir:")).expanduser()
        if not folder.is_dir():
            raise ModelUnavailableError(f"CLIPSeg folder not found: {folder}.")
        return folder
    repo = source.removeprefix("hf-hub:")
    if repo.count("/") != 1:
        raise ModelUnavailableError(
            f"Unknown CLIPSeg model {source!r}: give a Hugging Face id such as "
            f"{DEFAULT_CLIPSEG_MODEL!r} or a local folder as 'local-dir:PATH'.")
    try:
        folder = hub_snapshot(repo, _CLIPSEG_FILES)
        if _clipseg_weights(folder) is None:  # an older repo with only the pickle file
            folder = hub_snapshot(repo, [*_CLIPSEG_FILES, "pytorch_model.bin"])
    except Exception as exc:  # network, auth, missing repo: all say the same to a user
        raise ModelUnavailableError(_offline_clipseg_message(source, exc)) from exc
    return folder


def _offline_clipseg_message(source: str, error: BaseException) -> str:
    repo = source.removeprefix("hf-hub:")
    return (f"Could not download the CLIPSeg model {source!r} ({type(error).__name__}: "
            f"{error}). Offline: on a connected machine run  hf download {repo} --local-dir "
            "clipseg  then copy the folder here and give it as the model: local-dir:PATH (or "
            f"copy a filled cache folder and point ${CACHE_ENV} at it).")


def _clipseg_weights(folder: Path) -> Path | None:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    return None


def check_clipseg_source(source: str) -> list[str]:
    """Problems that would stop :func:`load_clipseg` (empty when none); downloads hub files."""
    try:
        folder = _clipseg_folder(source)
    except ModelUnavailableError as exc:
        return [str(exc)]
    problems = []
    if not (folder / "config.json").is_file():
        problems.append(f"{folder} has no config.json (a CLIPSeg folder made by "
                        "save_pretrained or hf download has one).")
    elif json.loads((folder / "config.json").read_text()).get("model_type") != "clipseg":
        problems.append(f"{folder}/config.json is not a CLIPSeg model's config.")
    if _clipseg_weights(folder) is None:
        problems.append(f"No CLIPSeg weights in {folder} (model.safetensors).")
    if not (folder / "preprocessor_config.json").is_file() and not (
            folder / "processor_config.json").is_file():
        problems.append(f"{folder} has no preprocessor_config.json (CLIPSeg's processor).")
    return problems


def _pretrained_clipseg(source: str, device: str):
    """(net, processor, base) of a CLIPSeg source, cached by (source, device)."""
    key = (f"clipseg:{source}", device)
    with _CACHE_LOCK:
        if key in _CACHE:
            return _CACHE[key]
    from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

    folder = _clipseg_folder(source)
    problems = check_clipseg_source(str(folder)) if folder.is_dir() else []
    if problems:
        raise ModelUnavailableError(problems[0])
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # its per-tensor "Loading weights" bar says nothing
    try:
        processor = CLIPSegProcessor.from_pretrained(folder, local_files_only=True)
        net = CLIPSegForImageSegmentation.from_pretrained(folder, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - a broken folder, in one line
        raise ModelUnavailableError(f"Cannot load the CLIPSeg model from {folder} "
                                    f"({type(exc).__name__}: {exc}).") from exc
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    net.eval().requires_grad_(False).to(device)
    weights = _clipseg_weights(folder)
    base = {"clipseg_model": source,
            "clipseg_sha256": file_sha256(weights) if weights is not None else None}
    with _CACHE_LOCK:
        _CACHE[key] = (net, processor, base)
    return net, processor, base


def load_clipseg(source: str = DEFAULT_CLIPSEG_MODEL, device: str | None = None) -> ClipSegVlsm:
    """Released CLIPSeg weights as a :class:`ClipSegVlsm` (zero-shot, or to fine-tune).

    Parameters
    ----------
    source : str
        A Hugging Face id (``CIDAS/clipseg-rd64-refined``), ``local-dir:PATH`` or a folder
        written by ``save_pretrained`` / ``hf download`` (config, weights, processor files).
    """
    device = resolve_device(device)
    net, processor, base = _pretrained_clipseg(absolute_source(source), device)
    return ClipSegVlsm(net, processor, device, base).to(device)


def default_extract_layers(depth: int) -> tuple[int, ...]:
    """Blocks 3, 6, 9 of a 12-block ViT; for another depth the same relative depths
    (e.g. 1, 2, 3 of 4 blocks), never the same block twice."""
    layers = [min(depth - 1, max(0, round(i * depth / 12))) for i in DEFAULT_EXTRACT_LAYERS]
    return tuple(dict.fromkeys(layers))


def build_biomedclipseg(clip_source: str, device: str | None = None, *,
                        extract_layers: Sequence[int] | None = None,
                        decoder_init: str = "random",
                        clipseg_source: str = DEFAULT_CLIPSEG_MODEL,
                        seed: int = 0) -> BiomedClipSegVlsm:
    """A BiomedCLIPSeg on the CLIP ``clip_source`` (anything :func:`load_clip` takes).

    Parameters
    ----------
    extract_layers : sequence of int, optional
        ViT blocks (0-based) feeding the decoder; default :func:`default_extract_layers`.
    decoder_init : {"random", "clipseg"}
        Random weights (medvlsm's BiomedCLIPSeg) or CLIPSeg's decoder copied where shapes
        agree (``_d``; needs ``clipseg_source``).
    """
    if decoder_init not in DECODER_INITS:
        raise InputError(f"decoder_init must be one of {', '.join(DECODER_INITS)}; got "
                         f"{decoder_init!r}.")
    device = resolve_device(device)
    clip_source = absolute_source(clip_source)
    clip = load_clip(clip_source, device)
    if extract_layers is None:
        extract_layers = default_extract_layers(len(_trunk(clip).blocks))
    base: dict[str, Any] = {"clip_model": clip_source, "clip_sha256": clip.weights_sha256}
    if decoder_init == "clipseg":
        net, _, clipseg_base = _pretrained_clipseg(absolute_source(clipseg_source), device)
        decoder = biomedclipseg_decoder(clip, extract_layers, net.config, seed)
        copied, skipped = copy_decoder_weights(decoder, net.decoder)
        logger.info("BiomedCLIPSeg decoder: %d tensors copied from CLIPSeg, %d random (%s)",
                    len(copied), len(skipped), ", ".join(skipped[:6]))
        base.update({"decoder_init": "clipseg", **clipseg_base,
                     "decoder_tensors_copied": len(copied),
                     "decoder_tensors_random": len(skipped)})
    else:
        decoder = biomedclipseg_decoder(clip, extract_layers, None, seed)
        base["decoder_init"] = "random"
    return BiomedClipSegVlsm(clip, decoder, extract_layers, base)


def build_vlsm(arch: str, *, clipseg_model: str = DEFAULT_CLIPSEG_MODEL,
               clip_model: str | None = None, device: str | None = None,
               decoder_init: str = "random",
               extract_layers: Sequence[int] | None = None,
               seed: int = 0) -> VlsmModel:
    """The untrained model to fine-tune: ``arch`` is ``"clipseg"`` (pretrained CLIPSeg) or
    ``"biomedclipseg"`` (the CLIP ``clip_model``, default BiomedCLIP, + a new decoder)."""
    if arch == "clipseg":
        return load_clipseg(clipseg_model, device)
    if arch == "biomedclipseg":
        from ..core.config import DEFAULT_CLIP_MODEL

        return build_biomedclipseg(clip_model or DEFAULT_CLIP_MODEL, device,
                                   extract_layers=extract_layers, decoder_init=decoder_init,
                                   clipseg_source=clipseg_model, seed=seed)
    raise InputError(f"Unknown VLSM architecture {arch!r}; choose one of {', '.join(ARCHS)}.")


def clear_vlsm_cache() -> None:
    """Forget the loaded CLIPSeg networks (the CLIPs are core.models' cache)."""
    with _CACHE_LOCK:
        _CACHE.clear()


# --------------------------------------------------------------------------- saving, loading


def save_vlsm(model: VlsmModel, folder: str | Path, info: dict[str, Any] | None = None) -> Path:
    """Write ``model``'s decoder and description into ``folder`` (each file atomically).

    Returns
    -------
    Path
        ``folder/vlsm.json``.
    """
    from safetensors.torch import save_file

    from ..core.io import atomic_path, write_text

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.decoder.state_dict().items()}
    with atomic_path(folder / DECODER_FILE) as tmp:
        save_file(state, str(tmp))
    record = {**model.describe(), **(info or {}),
              "decoder_sha256": file_sha256(folder / DECODER_FILE)}
    write_text(folder / MODEL_FILE, json.dumps(record, indent=2, default=str) + "\n")
    return folder / MODEL_FILE


def load_vlsm(source: str, device: str | None = None) -> VlsmModel:
    """A trained model folder (``vlsm.json`` + decoder) or released CLIPSeg weights
    (zero-shot) as a ready model.

    Raises
    ------
    InputError
        A damaged model folder.
    ModelUnavailableError
        The base model cannot be found, or its weights differ from the recorded ones.
    """
    from safetensors.torch import load_file
    from transformers.models.clipseg.modeling_clipseg import CLIPSegDecoder

    device = resolve_device(device)
    path = Path(source.removeprefix("local-dir:")).expanduser()
    if _is_local(source) and not path.exists():
        raise ModelUnavailableError(f"VLSM model folder not found: {path} (a folder written "
                                    "by 'medclipsam vlsm train', or CLIPSeg weights).")
    if not is_vlsm_folder(path):
        return load_clipseg(source, device)
    record = read_vlsm_record(path)
    base = record.get("base") or {}
    if record["arch"] == "clipseg":
        model: VlsmModel = load_clipseg(str(base.get("clipseg_model", DEFAULT_CLIPSEG_MODEL)),
                                        device)
        _check_base(path, "CLIPSeg", base.get("clipseg_sha256"), model.base["clipseg_sha256"])
        decoder = CLIPSegDecoder(_decoder_config(record))
    else:
        clip_source = str(base.get("clip_model", ""))
        clip = load_clip(clip_source, device)
        _check_base(path, "CLIP", base.get("clip_sha256"), clip.weights_sha256)
        decoder = CLIPSegDecoder(_decoder_config(record))
        model = BiomedClipSegVlsm(clip, decoder.to(device), record["extract_layers"], base)
    try:
        state = load_file(str(path / DECODER_FILE), device="cpu")
        missing, unexpected = decoder.load_state_dict(state, strict=False)
    except Exception as exc:  # noqa: BLE001 - a damaged weights file, in one line
        raise InputError(f"{path / DECODER_FILE}: cannot be read ({exc}); the model folder "
                         "is damaged.") from exc
    if missing or unexpected:
        raise InputError(f"{path / DECODER_FILE} does not fit the recorded decoder "
                         f"(missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]}).")
    model.decoder = decoder.to(device).float().eval()
    model.base = dict(base)
    model.image_size = int(record.get("image_size", model.image_size))
    model.threshold = float(record.get("threshold", 0.5))
    model.info = {k: v for k, v in record.items() if k not in (
        "format", "arch", "image_size", "extract_layers", "threshold", "base",
        "decoder_config")}
    return model.eval()


def _decoder_config(record: dict[str, Any]):
    from transformers import CLIPSegConfig

    config = CLIPSegConfig.from_dict(record["decoder_config"])
    config._attn_implementation = "sdpa"
    return config


def _check_base(folder: Path, what: str, recorded: str | None, found: str | None) -> None:
    if recorded and found and recorded != found:
        raise ModelUnavailableError(
            f"{folder} was trained on another {what} (SHA-256 {recorded[:12]}...) than the "
            f"one found now ({found[:12]}...); its decoder only fits the encoder it was "
            "trained with. Point the model at that encoder or retrain.")


def check_vlsm_source(source: str) -> list[str]:
    """Problems that would stop :func:`load_vlsm` (empty when none), without building it."""
    path = Path(source.removeprefix("local-dir:")).expanduser()
    if not is_vlsm_folder(path):
        if path.is_dir() and not (path / "config.json").is_file():
            return [f"{path} is neither a trained VLSM folder (no {MODEL_FILE}) nor a "
                    "CLIPSeg model folder (no config.json)."]
        return check_clipseg_source(source)
    try:
        record = read_vlsm_record(path)
    except InputError as exc:
        return [str(exc)]
    base = record.get("base") or {}
    if record["arch"] == "clipseg":
        return check_clipseg_source(str(base.get("clipseg_model", DEFAULT_CLIPSEG_MODEL)))
    from ..core.models import check_clip_source

    return check_clip_source(str(base.get("clip_model", "")))


# --------------------------------------------------------------------------- prediction


def predict_probabilities(model: VlsmModel, image: np.ndarray, prompts: str | Sequence[str],
                          ) -> np.ndarray:
    """The model's foreground probability for each prompt, at the image's size.

    Parameters
    ----------
    image : ndarray
        HxWx3 uint8 RGB (see :func:`napari_medclipsam.core.io.to_rgb_uint8`).
    prompts : str or sequence of str
        One prompt or several (one map each); ``""`` is the empty prompt.

    Returns
    -------
    ndarray
        (N, H, W) float32 in [0, 1] for N prompts ((H, W) for one str prompt).
    """
    import torch.nn.functional as F

    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise InputError(f"Expected an HxWx3 uint8 RGB image; got shape {image.shape}, dtype "
                         f"{image.dtype}. Use napari_medclipsam.core.io.to_rgb_uint8.")
    single = isinstance(prompts, str)
    texts = [prompts] if single else [str(p) for p in prompts]
    if not texts:
        raise InputError("No prompt given: type what to find, e.g. 'breast tumor'.")
    model.eval()
    with torch.no_grad():
        pixel = model.image_inputs([image])
        acts = model.activations(pixel)
        emb = model.text_embeddings(texts)
        n = len(texts)
        logits = model.decode([a.expand(n, -1, -1) for a in acts], emb)
        probs = torch.sigmoid(F.interpolate(logits[:, None].float(), size=image.shape[:2],
                                            mode="bilinear", align_corners=False))[:, 0]
    out = probs.cpu().numpy().astype(np.float32)
    return out[0] if single else out
