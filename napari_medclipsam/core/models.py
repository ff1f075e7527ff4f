"""Model registries: BiomedCLIP (open_clip) and SAM (segment-anything), with device choice.

Heavy libraries are imported inside the loaders so importing this module is cheap.

Weights are downloaded on demand into one cache folder, chosen by the environment
variable ``MEDCLIPSAM_HOME`` (default: the platform's user cache folder,
e.g. ``~/.cache/napari-medclipsam``). Offline, point the loaders at local files:

* CLIP: ``local-dir:PATH`` where ``PATH`` holds ``open_clip_config.json``, the
  weights (``open_clip_pytorch_model.bin`` or ``.safetensors``) and the text
  tower's Hugging Face files (``config.json``, ``vocab.txt``,
  ``tokenizer_config.json``) either in ``PATH`` itself or in ``PATH/text``.
  A plain checkpoint file (``.pt``/``.pth``/``.bin``/``.safetensors``) is loaded
  into the architecture of the ``open_clip_config.json`` beside it, or else of
  the default BiomedCLIP.
* SAM: ``sam_checkpoint=PATH`` to an official SAM or MedSAM ``.pth`` file.
* SAM 2.1 (``sam2_t``, ``sam2_s``, ``sam2_b+``, ``sam2_l``): ``sam_checkpoint=PATH`` to the
  official ``sam2.1_hiera_*.pt`` file; the architecture comes from the ``sam2`` package's own
  Hydra configs (``configs/sam2.1/sam2.1_hiera_*.yaml``). ``medsam2``: MedSAM2's
  ``MedSAM2_latest.pt``, SAM 2.1 hiera tiny at 512x512 inputs.

``sam_model="auto"`` chooses by device (:func:`default_sam_model`): SAM 2.1 hiera tiny on a
CPU or MPS (a first mask in seconds), SAM ViT-H on a CUDA GPU (the paper's model).

Loaded models are cached by (source, device).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import DEFAULT_CLIP_MODEL
from .runtime import avoid_triton_llvm_clash

logger = logging.getLogger(__name__)

CACHE_ENV = "MEDCLIPSAM_HOME"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
TEXT_FILES = ("config.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json",
              "tokenizer.json")

#: Official SAM checkpoints and MedSAM (a ViT-B in SAM's format).
SAM_CHECKPOINTS: dict[str, dict[str, str]] = {
    "vit_h": {
        "arch": "vit_h",
        "url": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
        "hash": "sha256:a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
        "fname": "sam_vit_h_4b8939.pth",
    },
    "vit_l": {
        "arch": "vit_l",
        "url": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
        "hash": "sha256:3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
        "fname": "sam_vit_l_0b3195.pth",
    },
    "vit_b": {
        "arch": "vit_b",
        "url": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
        "hash": "sha256:ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
        "fname": "sam_vit_b_01ec64.pth",
    },
    "medsam": {
        "arch": "vit_b",
        "url": "https://zenodo.org/records/10689643/files/medsam_vit_b.pth?download=1",
        "hash": "md5:3bb6db55bd0c9ca30b61248bca72f8d6",
        "fname": "medsam_vit_b.pth",
    },
}

_SAM2_URL = "https://dl.fbaipublicfiles.com/segment_anything_2/092824/"
#: Official SAM 2.1 checkpoints (hiera tiny/small/base-plus/large) and the ``sam2`` package's
#: config of each. SHA-256 of tiny and small as published by other projects that pin them;
#: base-plus and large have none recorded here (the first download's SHA-256 is written
#: beside it and checked on every later use; see :func:`download_sam_checkpoint`).
SAM2_CHECKPOINTS: dict[str, dict[str, Any]] = {
    "sam2_t": {
        "config": "configs/sam2.1/sam2.1_hiera_t.yaml",
        "url": _SAM2_URL + "sam2.1_hiera_tiny.pt",
        "hash": "sha256:7402e0d864fa82708a20fbd15bc84245c2f26dff0eb43a4b5b93452deb34be69",
        "fname": "sam2.1_hiera_tiny.pt",
    },
    "sam2_s": {
        "config": "configs/sam2.1/sam2.1_hiera_s.yaml",
        "url": _SAM2_URL + "sam2.1_hiera_small.pt",
        "hash": "sha256:6d1aa6f30de5c92224f8172114de081d104bbd23dd9dc5c58996f0cad5dc4d38",
        "fname": "sam2.1_hiera_small.pt",
    },
    "sam2_b+": {
        "config": "configs/sam2.1/sam2.1_hiera_b+.yaml",
        "url": _SAM2_URL + "sam2.1_hiera_base_plus.pt",
        "hash": None,
        "fname": "sam2.1_hiera_base_plus.pt",
    },
    "sam2_l": {
        "config": "configs/sam2.1/sam2.1_hiera_l.yaml",
        "url": _SAM2_URL + "sam2.1_hiera_large.pt",
        "hash": None,
        "fname": "sam2.1_hiera_large.pt",
    },
    # MedSAM2 (Ma et al. 2025, bowang-lab): SAM 2.1 hiera tiny fine-tuned on 3-D medical
    # images and videos at 512x512 inputs (their config sam2.1_hiera_t512.yaml is the tiny
    # config at image_size 512). Its weights load strictly into the same builder, or the load
    # says which keys differ; no published hash: trust on first use, as above.
    "medsam2": {
        "config": "configs/sam2.1/sam2.1_hiera_t.yaml",
        "overrides": ("++model.image_size=512",),
        "url": "https://huggingface.co/wanglab/MedSAM2/resolve/main/MedSAM2_latest.pt",
        "hash": None,
        "fname": "MedSAM2_latest.pt",
    },
}
SAM1_MODELS = tuple(SAM_CHECKPOINTS)
SAM2_MODELS = tuple(SAM2_CHECKPOINTS)
#: Every name ``--sam-model`` accepts ("auto" chooses by device).
SAM_MODELS = ("auto", *SAM1_MODELS, *SAM2_MODELS)


class ModelUnavailableError(RuntimeError):
    """A model's weights could not be found or downloaded; the message says what to do."""


# --------------------------------------------------------------------------- device


def resolve_device(device: str | None = None) -> str:
    """Return the torch device to use: ``device`` if given, else CUDA, then MPS, then CPU.

    Raises
    ------
    ValueError
        If the requested device is not available on this machine.
    """
    import torch

    if device in (None, "", "auto"):
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    kind = str(device).split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"Device {device!r} was requested but CUDA is not available here; "
                         "use --device cpu (or leave it out to choose automatically).")
    if kind == "mps" and not (getattr(torch.backends, "mps", None) is not None
                              and torch.backends.mps.is_available()):
        raise ValueError(f"Device {device!r} was requested but MPS is not available here; "
                         "use --device cpu.")
    if kind not in ("cpu", "cuda", "mps"):
        raise ValueError(f"Unknown device {device!r}: use cpu, cuda, cuda:N or mps.")
    return str(device)


def cache_dir() -> Path:
    """The folder model downloads go to (``$MEDCLIPSAM_HOME`` or the user cache folder)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    import pooch

    return Path(pooch.os_cache("napari-medclipsam"))


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    """SHA-256 hex digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


_CACHE: dict[tuple[str, str, str], Any] = {}
_CACHE_LOCK = threading.Lock()


def clear_model_cache() -> None:
    """Forget every loaded model (frees memory; the next load reads the files again)."""
    with _CACHE_LOCK:
        _CACHE.clear()


# --------------------------------------------------------------------------- CLIP


@dataclass
class ClipBundle:
    """A loaded CLIP model and what is needed to feed it.

    Attributes
    ----------
    model : open_clip.CustomTextCLIP or open_clip.CLIP
        In eval mode, on ``device``, parameters frozen (``requires_grad=False``).
    tokenizer : callable
        ``tokenizer(list_of_str) -> LongTensor (N, context_length)``.
    image_size : int
        Side of the square input the vision tower expects (224 for BiomedCLIP).
    mean, std : tuple of float
        Per-channel normalisation of RGB values scaled to [0, 1].
    source : str
        What the user asked for (hub id, ``local-dir:PATH`` or a file).
    weights_sha256 : str or None
        SHA-256 of the weights file, for the run manifest.
    """

    model: Any
    tokenizer: Any
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str
    device: str
    weights_sha256: str | None = None
    weights_path: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def model_id(self) -> str:
        digest = (self.weights_sha256 or "random")[:16]
        return f"{self.source}@{digest}"


def _offline_clip_message(source: str, error: BaseException) -> str:
    hub_id = source.removeprefix("hf-hub:")
    return (
        f"Could not download the CLIP model {source!r} ({type(error).__name__}: {error}).\n"
        "This machine seems to be offline (or the Hugging Face Hub is unreachable). To use the "
        "model without a network:\n"
        f"  1. on a connected machine run:  hf download {hub_id} --local-dir "
        "BiomedCLIP\n"
        "     and  hf download "
        "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract config.json vocab.txt "
        "tokenizer_config.json --local-dir BiomedCLIP/text\n"
        "  2. copy the BiomedCLIP folder here and pass  --clip-model local-dir:/path/to/BiomedCLIP"
        ".\n"
        f"Or copy a filled cache folder and point ${CACHE_ENV} at it."
    )


def hub_snapshot(repo_id: str, patterns: list[str] | None) -> Path:
    """Download (or reuse from the cache) some files of a Hugging Face repo; return its folder."""
    from huggingface_hub import snapshot_download

    path = snapshot_download(
        repo_id=repo_id,
        cache_dir=str(cache_dir() / "huggingface"),
        allow_patterns=patterns,
        local_files_only=os.environ.get("HF_HUB_OFFLINE", "0") in ("1", "true", "TRUE"),
        etag_timeout=5,
    )
    return Path(path)


def _local_text_dir(model_dir: Path, text_cfg: dict[str, Any]) -> Path | None:
    """The local folder of the text tower's config/tokenizer files: ``model_dir``,
    ``model_dir/text`` or the folder the config names; None when there is none."""
    for candidate in (model_dir, model_dir / "text"):
        if (candidate / "config.json").is_file():
            return candidate
    name = str(text_cfg.get("hf_model_name", ""))
    return Path(name) if name and Path(name).is_dir() else None


def _text_dir(model_dir: Path, text_cfg: dict[str, Any], allow_download: bool) -> str:
    """Where the Hugging Face text tower's config/tokenizer files are, as a local path."""
    local = _local_text_dir(model_dir, text_cfg)
    if local is not None:
        return str(local)
    name = text_cfg.get("hf_model_name", "")
    if name and not allow_download:
        raise ModelUnavailableError(
            f"The CLIP folder {model_dir} has no text-tower config (config.json) and the "
            f"config names the hub model {name!r}. Put that model's config.json, vocab.txt and "
            f"tokenizer_config.json in {model_dir / 'text'}."
        )
    if not name:
        raise ModelUnavailableError(f"{model_dir}: open_clip_config.json names no text tower.")
    return str(hub_snapshot(name, list(TEXT_FILES)))


def _find_weights(folder: Path) -> Path | None:
    preferred = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                 "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth")
    for name in preferred:
        if (folder / name).is_file():
            return folder / name
    found = sorted(p for p in folder.iterdir() if p.suffix in CHECKPOINT_SUFFIXES)
    return found[0] if found else None


def _read_state_dict(path: Path, device: str = "cpu") -> dict[str, Any]:
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if key in state and isinstance(state[key], dict):
                state = state[key]
    if not isinstance(state, dict):
        raise ModelUnavailableError(f"{path} does not hold a state dict.")
    # checkpoints saved from DataParallel/DDP
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def is_unsafe_pickle(exc: BaseException) -> bool:
    """Whether ``torch.load(..., weights_only=True)`` refused ``exc``'s file because it holds
    Python objects (a pickle that could run code), not only tensors."""
    import pickle

    return isinstance(exc, pickle.UnpicklingError) and "weights only" in str(exc).lower()


def load_resume_checkpoint(path: str | Path, writer: str) -> Any:
    """A training's own resumable checkpoint, read with ``weights_only=True`` on the CPU.

    Raises
    ------
    InputError
        One line naming ``writer`` (e.g. ``"fine-tuning"``) when the file holds Python objects
        (refused, never unpickled), or cannot be read (damaged, truncated); both say to start
        again with --overwrite. What the checkpoint must hold is the caller's to check.
    """
    import torch

    from .errors import InputError

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        if is_unsafe_pickle(exc):
            raise InputError(f"{path} was not loaded: it holds Python objects, not only "
                             f"tensors and plain values, so it was not written by {writer} "
                             "(or was changed) and could run code. Start again with "
                             "--overwrite.") from None
        raise InputError(f"{path} cannot be read: it is damaged or truncated "
                         f"({type(exc).__name__}). Start again with --overwrite.") from None


def weights_error(what: str, exc: BaseException, kind: str = "") -> ModelUnavailableError:
    """One line for a weights file that cannot be used: refused as unsafe (never quoting
    torch's advice to load it unsafely), or damaged / of another format."""
    if is_unsafe_pickle(exc):
        return ModelUnavailableError(
            f"{what} was not loaded: its weights file holds Python objects, not only tensors, "
            "and such a file can run code when it is opened. Use the model's original weights.")
    return ModelUnavailableError(
        f"{what} could not be loaded: its weights file is damaged, truncated or not a "
        f"PyTorch/safetensors state dict{kind} ({type(exc).__name__}). Copy or download the "
        "weights again.")


def _open_clip_keys(state: dict[str, Any]) -> dict[str, Any]:
    """Rename a Hugging Face-layout CLIP state dict (MedCLIP-SAMv2's release) to open_clip's.

    open_clip state dicts come back unchanged, less ``module.``/``model.`` prefixes.
    """
    from .convert import hf_to_open_clip

    return hf_to_open_clip(state)


def _build_clip(config_dir: Path, weights: Path | None, source: str, device: str,
                allow_download: bool) -> ClipBundle:
    import open_clip
    from open_clip.tokenizer import HFTokenizer

    config_path = config_dir / "open_clip_config.json"
    if not config_path.is_file():
        raise ModelUnavailableError(
            f"{config_dir} has no open_clip_config.json; a CLIP folder needs it beside the "
            "weights (as the Hugging Face BiomedCLIP repository has).")
    cfg = json.loads(config_path.read_text())
    model_cfg = cfg.get("model_cfg")
    if not isinstance(model_cfg, dict):
        raise ModelUnavailableError(f"{config_path} has no 'model_cfg'.")
    preprocess = cfg.get("preprocess_cfg", {})
    text_cfg = dict(model_cfg.get("text_cfg", {}))
    text_path = None
    if "hf_model_name" in text_cfg:
        text_path = _text_dir(config_dir, text_cfg, allow_download)
        if (problem := _check_text_files(Path(text_path))) is not None:
            raise ModelUnavailableError(problem)
        text_cfg["hf_model_name"] = text_path
        text_cfg["hf_tokenizer_name"] = text_path
        text_cfg["hf_model_pretrained"] = False
    vision_cfg = dict(model_cfg.get("vision_cfg", {}))
    if "timm_model_name" in vision_cfg:
        vision_cfg["timm_model_pretrained"] = False
    model_cfg = {**model_cfg, "text_cfg": text_cfg, "vision_cfg": vision_cfg}
    model_cls = open_clip.CustomTextCLIP if (text_path or model_cfg.get("custom_text")) \
        else open_clip.CLIP
    model_cfg.pop("custom_text", None)
    model = model_cls(**model_cfg)
    sha = None
    if weights is not None:
        try:
            state = _open_clip_keys(_read_state_dict(weights))
        except ModelUnavailableError:
            raise
        except Exception as exc:  # unpickling, zip, safetensors errors: all say the same
            raise weights_error(f"The CLIP model {source}", exc,
                                " for its open_clip_config.json") from None
        missing, unexpected = model.load_state_dict(state, strict=False)
        # position_ids buffers differ between transformers versions; anything else is an error
        missing = [k for k in missing if not k.endswith("position_ids")]
        unexpected = [k for k in unexpected if not k.endswith("position_ids")]
        if missing or unexpected:
            raise ModelUnavailableError(
                f"The weights in {weights} do not fit the architecture in {config_path}: "
                f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected "
                f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}.")
        sha = file_sha256(weights)
    else:
        raise ModelUnavailableError(
            f"No CLIP weights found in {config_dir} (expected open_clip_pytorch_model.bin or "
            ".safetensors).")
    model.eval().requires_grad_(False).to(device)
    context_length = int(text_cfg.get("context_length", 77))
    if text_path:
        tokenizer = HFTokenizer(text_path, context_length=context_length)
    else:
        tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=context_length)
    image_size = vision_cfg.get("image_size", 224)
    if isinstance(image_size, (list, tuple)):
        image_size = image_size[0]
    mean = tuple(preprocess.get("mean", open_clip.OPENAI_DATASET_MEAN))
    std = tuple(preprocess.get("std", open_clip.OPENAI_DATASET_STD))
    return ClipBundle(model=model, tokenizer=tokenizer, image_size=int(image_size),
                      mean=mean, std=std, source=source, device=device,
                      weights_sha256=sha, weights_path=str(weights),
                      extra={"config_dir": str(config_dir), "text_dir": text_path})


def _load_clip_uncached(source: str, device: str) -> ClipBundle:
    if source.startswith("hf-hub:"):
        repo = source.removeprefix("hf-hub:")
        try:
            folder = hub_snapshot(repo, ["open_clip_config.json", "*.bin", "*.safetensors",
                                          *TEXT_FILES[1:]])
            return _build_clip(folder, _find_weights(folder), source, device,
                               allow_download=True)
        except ModelUnavailableError:
            raise
        except Exception as exc:  # network, auth, missing repo: all say the same to a user
            raise ModelUnavailableError(_offline_clip_message(source, exc)) from exc
    if source.startswith("local-dir:"):
        folder = Path(source.removeprefix("local-dir:")).expanduser()
        if not folder.is_dir():
            raise ModelUnavailableError(f"CLIP folder not found: {folder}.")
        return _build_clip(folder, _find_weights(folder), source, device, allow_download=False)
    path = Path(source).expanduser()
    if path.is_dir():
        return _build_clip(path, _find_weights(path), source, device, allow_download=False)
    if path.suffix in CHECKPOINT_SUFFIXES:
        if not path.is_file():
            raise ModelUnavailableError(f"CLIP checkpoint not found: {path}.")
        if (path.parent / "open_clip_config.json").is_file():
            return _build_clip(path.parent, path, source, device, allow_download=False)
        base = _load_clip_uncached(DEFAULT_CLIP_MODEL, "cpu")
        config_dir = Path(base.weights_path).parent
        return _build_clip(config_dir, path, source, device, allow_download=True)
    raise ModelUnavailableError(
        f"Unknown CLIP model {source!r}: give a Hugging Face id as 'hf-hub:ORG/NAME', a local "
        "folder as 'local-dir:PATH', or a checkpoint file (.pt/.pth/.bin/.safetensors).")


def load_clip(source: str = DEFAULT_CLIP_MODEL, device: str | None = None) -> ClipBundle:
    """Load a BiomedCLIP-style open_clip model, cached by (source, device).

    Parameters
    ----------
    source : str
        ``hf-hub:ORG/NAME`` (downloaded into the cache folder), ``local-dir:PATH``
        or a checkpoint file (see the module docstring).
    device : str, optional
        ``cpu``, ``cuda``, ``mps``; ``None`` chooses automatically.

    Raises
    ------
    ModelUnavailableError
        With instructions, when the weights cannot be found or downloaded.
    """
    avoid_triton_llvm_clash()  # a napari viewer may exist (Mesa LLVM): see core.runtime
    device = resolve_device(device)
    key = ("clip", source, device)
    with _CACHE_LOCK:
        if key in _CACHE:
            return _CACHE[key]
    bundle = _load_clip_uncached(source, device)
    with _CACHE_LOCK:
        _CACHE[key] = bundle
    return bundle


def _check_text_files(text_dir: Path) -> str | None:
    """A problem with a Hugging Face text tower's tokenizer files, or None."""
    if not ((text_dir / "vocab.txt").is_file() or (text_dir / "tokenizer.json").is_file()):
        return (f"{text_dir} has no tokenizer vocabulary (vocab.txt or tokenizer.json): every "
                "word of the prompt would become [UNK] and the text would be ignored. Copy the "
                "text model's vocab.txt there.")
    return None


def check_clip_source(source: str) -> list[str]:
    """Problems that would stop :func:`load_clip` from loading ``source``, found without
    building the model (hub files are downloaded into the cache, or found there).

    Returns
    -------
    list of str
        One message per problem (empty when the source looks complete).
    """
    if source.startswith("hf-hub:"):
        repo = source.removeprefix("hf-hub:")
        try:
            folder = hub_snapshot(repo, ["open_clip_config.json", "*.bin", "*.safetensors",
                                          *TEXT_FILES[1:]])
        except Exception as exc:  # network, auth, missing repo
            return [_offline_clip_message(source, exc)]
        return [] if _find_weights(folder) is not None else [
            f"The hub model {repo} has no CLIP weights (open_clip_pytorch_model.bin)."]
    if source.startswith("local-dir:") or Path(source).expanduser().is_dir():
        folder = Path(source.removeprefix("local-dir:")).expanduser()
        if not folder.is_dir():
            return [f"CLIP folder not found: {folder} (--clip-model {source})."]
        problems = []
        config_path = folder / "open_clip_config.json"
        if not config_path.is_file():
            problems.append(f"{folder} has no open_clip_config.json; a CLIP folder needs it "
                            "beside the weights (as the Hugging Face BiomedCLIP repository has).")
        if _find_weights(folder) is None:
            problems.append(f"No CLIP weights found in {folder} (expected "
                            "open_clip_pytorch_model.bin or .safetensors).")
        if config_path.is_file():
            try:
                text_cfg = json.loads(config_path.read_text()).get("model_cfg", {}).get(
                    "text_cfg", {})
            except (json.JSONDecodeError, AttributeError, UnicodeDecodeError) as exc:
                return [*problems, f"{config_path} is not a valid open_clip config ({exc})."]
            if isinstance(text_cfg, dict) and "hf_model_name" in text_cfg:
                text_dir = _local_text_dir(folder, text_cfg)
                if text_dir is None:
                    problems.append(
                        f"The CLIP folder {folder} has no text-tower config (config.json); put "
                        f"the text model's config.json, vocab.txt and tokenizer_config.json in "
                        f"{folder / 'text'}.")
                elif (problem := _check_text_files(text_dir)) is not None:
                    problems.append(problem)
        return problems
    path = Path(source).expanduser()
    if path.suffix in CHECKPOINT_SUFFIXES:
        if not path.is_file():
            return [f"CLIP checkpoint not found: {path}."]
        if (path.parent / "open_clip_config.json").is_file():
            return [p for p in check_clip_source(f"local-dir:{path.parent}")
                    if not p.startswith("No CLIP weights")]
        return check_clip_source(DEFAULT_CLIP_MODEL)
    return [f"Unknown CLIP model {source!r}: give a Hugging Face id as 'hf-hub:ORG/NAME', a "
            "local folder as 'local-dir:PATH', or a checkpoint file (.pt/.pth/.bin/.safetensors)."]


def sam2_at_size(bundle: SamBundle, image_size: int) -> SamBundle:
    """The same SAM 2.1 weights as ``bundle`` in a model taking ``image_size`` inputs.

    The input size changes no parameter's shape (Hiera interpolates its position embedding,
    the memory attention recomputes its rotary encoding), so the new model shares
    ``bundle``'s parameter tensors (``load_state_dict(assign=True)``): no file is read and
    no memory is copied.
    """
    if bundle.family != "sam2":
        raise ValueError(f"{bundle.name} is not a SAM 2.1 model.")
    model = build_sam2_model(bundle.name, (f"++model.image_size={int(image_size)}",))
    model.load_state_dict(bundle.model.state_dict(), strict=True, assign=True)
    model.eval().requires_grad_(False).to(bundle.device)
    return SamBundle(model=model, name=bundle.name, device=bundle.device,
                     checkpoint=bundle.checkpoint, checkpoint_sha256=bundle.checkpoint_sha256)


def check_sam_source(name: str, checkpoint: str | None = None,
                     device: str | None = None) -> list[str]:
    """Problems that would stop :func:`load_sam`; downloads the official checkpoint when
    none is given (hash-checked), so a later load finds it in the cache. ``auto`` is
    resolved for ``device``."""
    try:
        name = resolve_sam_model(name, device)
    except ValueError as exc:
        return [str(exc)]
    if name in SAM2_CHECKPOINTS:
        from importlib.util import find_spec

        if find_spec("sam2") is None:
            return [f"{name} needs the 'sam2' package: pip install sam2 (or choose a SAM "
                    "backend: --sam-model vit_b)."]
    if checkpoint:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            return [f"SAM checkpoint not found: {path}."]
        return []
    try:
        download_sam_checkpoint(name)
    except ModelUnavailableError as exc:
        return [str(exc)]
    return []


def check_model_sources(clip_model: str | None = None, sam_model: str | None = None,
                        sam_checkpoint: str | None = None, device: str | None = None) -> None:
    """Check every model file and download before any work, and report all problems at once.

    ``None`` skips a model (one already loaded). Missing hub files and official SAM
    checkpoints are downloaded now (with progress), so the loads that follow are local.

    Raises
    ------
    ModelUnavailableError
        Naming every problem found (device, CLIP, SAM), each with what to do.
    """
    problems: list[str] = []
    try:
        resolve_device(device)
    except ValueError as exc:
        problems.append(str(exc))
    if clip_model is not None:
        problems += [f"CLIP: {p}" for p in check_clip_source(clip_model)]
    if sam_model is not None:
        problems += [f"SAM: {p}" for p in check_sam_source(sam_model, sam_checkpoint,
                                                           device=device)]
    if problems:
        head = (f"{len(problems)} problem(s) with the models; nothing was computed:"
                if len(problems) > 1 else "")
        raise ModelUnavailableError("\n".join([head, *problems]) if head else problems[0])


# --------------------------------------------------------------------------- SAM


def default_sam_model(device: str | None = None) -> str:
    """The SAM backend ``sam_model="auto"`` picks: ``vit_h`` (the paper's) on a CUDA GPU,
    ``sam2_t`` (SAM 2.1 hiera tiny: about 1 s per image on two CPU cores in bf16, against
    about 20 s for ViT-B and a minute for ViT-H) on a CPU or MPS."""
    return "vit_h" if str(resolve_device(device)).startswith("cuda") else "sam2_t"


def resolve_sam_model(name: str | None, device: str | None = None) -> str:
    """``name``, or the device's default (:func:`default_sam_model`) for ``auto``/None.

    Raises
    ------
    ValueError
        For a name no registry knows.
    """
    if name in (None, "", "auto"):
        return default_sam_model(device)
    if name not in SAM_CHECKPOINTS and name not in SAM2_CHECKPOINTS:
        raise ValueError(f"Unknown SAM model {name!r}; choose one of {', '.join(SAM_MODELS)}.")
    return name


def sam_family(name: str) -> str:
    """``"sam2"`` for the SAM 2.1 backends, ``"sam"`` for segment-anything's."""
    return "sam2" if name in SAM2_CHECKPOINTS else "sam"


@dataclass
class SamBundle:
    """A loaded SAM model (segment-anything ``Sam``, or a ``sam2`` ``SAM2Base`` built as our
    :class:`~napari_medclipsam.core.propagate.VolumePredictor`; eval mode, frozen) and its
    identity."""

    model: Any
    name: str
    device: str
    checkpoint: str | None
    checkpoint_sha256: str | None

    @property
    def model_id(self) -> str:
        return f"{self.name}@{(self.checkpoint_sha256 or 'random')[:16]}"

    @property
    def family(self) -> str:
        """``"sam2"`` or ``"sam"`` (:func:`sam_family`)."""
        return sam_family(self.name)


def download_sam_checkpoint(name: str) -> Path:
    """Download an official SAM/MedSAM checkpoint into the cache (hash-checked, with progress).

    Raises
    ------
    ModelUnavailableError
        When offline or when the download fails its hash check.
    """
    import pooch

    spec = SAM_CHECKPOINTS.get(name) or SAM2_CHECKPOINTS.get(name)
    if spec is None:
        raise ValueError(f"Unknown SAM model {name!r}; choose one of {', '.join(SAM_MODELS)}.")
    folder = cache_dir() / ("sam2" if name in SAM2_CHECKPOINTS else "sam")
    target = folder / str(spec["fname"])
    known = spec["hash"]
    pinned = folder / f"{spec['fname']}.sha256"  # first download's hash, for unpinned files
    if target.is_file():
        if (known is None and pinned.is_file()
                and file_sha256(target) != pinned.read_text().strip()):
            raise ModelUnavailableError(
                f"{target} changed since it was downloaded (its SHA-256 no longer matches "
                f"{pinned}); delete both files to download it again.")
        return target
    try:
        path = pooch.retrieve(url=str(spec["url"]), known_hash=known, fname=str(spec["fname"]),
                              path=folder, progressbar=True)
    except Exception as exc:
        expected = f" (expected {known})" if known else ""
        raise ModelUnavailableError(
            f"Could not download the {name} checkpoint from {spec['url']} "
            f"({type(exc).__name__}: {exc}).\nDownload it on a connected machine{expected}, "
            "copy it here and pass --sam-checkpoint PATH (in napari: the SAM checkpoint "
            f"field), or put it at {target}."
        ) from exc
    if known is None:
        pinned.write_text(file_sha256(path) + "\n")
    return Path(path)


def build_sam(name: str):
    """An untrained SAM of the named architecture built without loading any file:
    ``vit_b``, ``vit_l``, ``vit_h`` or ``medsam`` by segment-anything's registry, the SAM 2.1
    names by :func:`build_sam2_model`."""
    if name in SAM2_CHECKPOINTS:
        return build_sam2_model(name)
    from segment_anything import sam_model_registry

    if name not in SAM_CHECKPOINTS:
        raise ValueError(f"Unknown SAM model {name!r}; choose one of {', '.join(SAM_MODELS)}.")
    return sam_model_registry[SAM_CHECKPOINTS[name]["arch"]](checkpoint=None)


def build_sam2_model(name: str = "sam2_t", overrides: tuple[str, ...] | list[str] = ()):
    """An untrained SAM 2.1 model from the ``sam2`` package's own config and builder.

    ``sam2.build_sam.build_sam2_video_predictor`` builds it (with the package's
    post-processing settings for video), as our
    :class:`~napari_medclipsam.core.propagate.VolumePredictor`, a subclass of
    ``SAM2VideoPredictor`` that takes the slices of a volume as an array. The same object
    serves single images (:class:`~napari_medclipsam.core.sam.Sam2Session`) and propagation
    through a volume. ``overrides`` are extra Hydra overrides (tests shrink the model with
    them; ``"++model.image_size=512"`` changes the input size). No file is loaded.
    """
    if name not in SAM2_CHECKPOINTS:
        raise ValueError(f"Unknown SAM 2 model {name!r}; choose one of "
                         f"{', '.join(SAM2_MODELS)}.")
    from sam2.build_sam import build_sam2_video_predictor

    spec = SAM2_CHECKPOINTS[name]
    extra = ["++model._target_=napari_medclipsam.core.propagate.VolumePredictor",
             *spec.get("overrides", ()), *overrides]
    return build_sam2_video_predictor(str(spec["config"]), ckpt_path=None,
                                      device="cpu", hydra_overrides_extra=extra)


def _state_family(state: dict[str, Any]) -> str | None:
    """"SAM 2.1" or "SAM" by the image encoder's keys of a state dict (None: neither)."""
    if any(k.startswith("image_encoder.trunk.") for k in state):
        return "SAM 2.1"
    if any(k.startswith("image_encoder.blocks.") for k in state):
        return "SAM"
    return None


def load_sam(name: str = "auto", checkpoint: str | None = None, device: str | None = None,
             builder=None, image_size: int | None = None) -> SamBundle:
    """Load SAM weights into segment-anything's architecture, cached by (name, file, device).

    Parameters
    ----------
    name : str
        ``vit_b``, ``vit_l``, ``vit_h``, ``medsam``, a SAM 2.1 name (``sam2_t``, ``sam2_s``,
        ``sam2_b+``, ``sam2_l``) or ``auto`` (:func:`default_sam_model` of the device).
    checkpoint : str, optional
        A local ``.pth``/``.pt``; without it the official file is downloaded (hash-checked).
    device : str, optional
        As :func:`resolve_device`.
    builder : callable, optional
        Returns the (untrained) ``Sam`` to load the weights into; defaults to
        :func:`build_sam` of ``name``. Tests pass a tiny architecture here.
    image_size : int, optional
        SAM 2 only: the model's input size (default its config's, 1024); the same weights
        load at 512 for faster propagation on a CPU.

    Notes
    -----
    Always ``torch.load(..., map_location="cpu", weights_only=True)``: segment-anything's own
    loader calls a bare ``torch.load``, which trusts pickles and fails on CPU-only machines for
    checkpoints saved on a GPU.
    """
    avoid_triton_llvm_clash()
    device = resolve_device(device)
    name = resolve_sam_model(name, device)
    path = Path(checkpoint).expanduser() if checkpoint else None
    key = ("sam", f"{name}:{path}:{image_size or ''}", device)
    with _CACHE_LOCK:
        if key in _CACHE:
            return _CACHE[key]
    if path is None:
        path = download_sam_checkpoint(name)
    elif not path.is_file():
        raise ModelUnavailableError(f"SAM checkpoint not found: {path}.")
    try:  # read (and refuse) the file before building a large model
        state = _read_state_dict(path)
    except ModelUnavailableError:
        raise
    except Exception as exc:
        raise weights_error(f"The SAM checkpoint {path}", exc) from None
    if builder is None and image_size and sam_family(name) == "sam2":
        sam = build_sam2_model(name, (f"++model.image_size={int(image_size)}",))
    else:
        sam = builder() if builder is not None else build_sam(name)
    family_name = "SAM 2.1" if sam_family(name) == "sam2" else "SAM"
    try:
        sam.load_state_dict(state, strict=True)
    except ModelUnavailableError:
        raise
    except Exception as exc:
        detail = " ".join(str(exc).split())  # torch lists the keys over several lines
        detail = detail if len(detail) <= 200 else detail[:200] + "..."
        holds = _state_family(state)
        holds = (f"the file holds a {holds} model; " if holds and holds != family_name
                 else "")
        raise ModelUnavailableError(
            f"{path} is not a {name} checkpoint in {family_name}'s format ({holds}"
            f"{type(exc).__name__}: {detail}). Check --sam-model matches the file "
            "(MedSAM is 'medsam'; sam2.1_hiera_tiny.pt is 'sam2_t')."
        ) from exc
    sam.eval().requires_grad_(False).to(device)
    bundle = SamBundle(model=sam, name=name, device=device, checkpoint=str(path),
                       checkpoint_sha256=file_sha256(path))
    with _CACHE_LOCK:
        _CACHE[key] = bundle
    return bundle
