"""Fine-tune a BiomedCLIP-style open_clip model on image-caption pairs.

The output folder is a complete ``local-dir:`` CLIP folder, loadable by
:func:`napari_medclipsam.core.models.load_clip` (``--clip-model local-dir:OUT`` in the CLI,
the same folder in the napari widget)::

    OUT/open_clip_config.json       copied from the source model
    OUT/text/                       the text tower's config and vocabulary, copied
    OUT/open_clip_pytorch_model.bin the weights of the epoch with the lowest validation loss
    OUT/checkpoints/last.pt         model, optimiser and history after the last finished
                                    epoch (tensors and plain values only: it loads with
                                    ``weights_only=True``), for ``resume``
    OUT/finetune.json               parameters, data split, per-epoch losses, best epoch

Defaults are the paper's (DHN-NCE, tau 0.6, beta1 = beta2 = 0.15, lr 1e-6, batch 64, 224x224
with CLIP normalisation, 85/15 split). The model's own ``logit_scale`` is not trained: the
losses use the fixed temperature.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import CancelledError, InputError
from ..core.io import atomic_path, write_text
from .data import MIN_CAPTION_CHARS, PairDataset, clean_pairs, read_pairs, split_pairs

WEIGHTS_NAME = "open_clip_pytorch_model.bin"
LAST_CHECKPOINT = Path("checkpoints") / "last.pt"
TEXT_FILES = ("config.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json",
              "tokenizer.json")
LOSS_NAMES = ("dhn-nce", "hn-nce", "dcl", "infonce")  # keys of losses.LOSSES (no torch here)
ProgressFn = Callable[[int, int], None]
StopFn = Callable[[], bool]


@dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning parameters (paper defaults where the paper gives them).

    Attributes
    ----------
    loss : str
        ``dhn-nce`` (paper), ``hn-nce``, ``dcl`` or ``infonce``.
    temperature, beta1, beta2 : float
        tau and the hardness exponents (DHN-NCE/HN-NCE) of the loss.
    lr : float
        AdamW learning rate (1e-6 in the paper).
    weight_decay : float
        AdamW weight decay (the paper gives none; torch's default 0.01).
    batch_size : int
        Pairs per step (64 in the paper); the last incomplete batch of an epoch is dropped.
    epochs : int
        Passes over the training split (the paper does not state it).
    val_fraction : float
        Held-out share of the pairs (0.15: the paper's 85/15 split).
    min_caption_chars : int
        Captions shorter than this after cleaning are dropped (20 in the paper).
    freeze_vision_layers, freeze_text_layers : int
        Freeze the embeddings and the first N transformer blocks of each tower.
    amp : bool
        Mixed precision (float16 autocast with gradient scaling) on CUDA; ignored elsewhere.
    num_workers : int
        DataLoader worker processes for image loading.
    seed : int
        Split, shuffling and initial state.
    """

    loss: str = "dhn-nce"
    temperature: float = 0.6
    beta1: float = 0.15
    beta2: float = 0.15
    lr: float = 1e-6
    weight_decay: float = 0.01
    batch_size: int = 64
    epochs: int = 10
    val_fraction: float = 0.15
    min_caption_chars: int = MIN_CAPTION_CHARS
    freeze_vision_layers: int = 0
    freeze_text_layers: int = 0
    amp: bool = True
    num_workers: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.loss not in LOSS_NAMES:
            raise ValueError(f"loss must be one of {', '.join(LOSS_NAMES)}; got {self.loss!r}.")
        if self.temperature <= 0 or self.lr <= 0:
            raise ValueError("temperature and lr must be positive.")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be at least 2 (contrastive); got "
                             f"{self.batch_size}.")
        if self.epochs < 1:
            raise ValueError(f"epochs must be at least 1; got {self.epochs}.")
        if min(self.freeze_vision_layers, self.freeze_text_layers, self.num_workers) < 0:
            raise ValueError("freeze_*_layers and num_workers must be non-negative.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class FinetuneResult:
    """Where the model went and how training went."""

    out_dir: Path
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int | None = None
    n_train: int = 0
    n_val: int = 0
    n_dropped: int = 0


# --------------------------------------------------------------------------- helpers


def _loss_fn(config: FinetuneConfig):
    from .losses import get_loss

    fn = get_loss(config.loss)
    params = inspect.signature(fn).parameters
    kwargs = {k: getattr(config, k) for k in ("temperature", "beta1", "beta2") if k in params}
    return lambda img, txt: fn(img, txt, **kwargs)


def _freeze(model, config: FinetuneConfig) -> None:
    model.requires_grad_(True)
    if hasattr(model, "logit_scale"):
        model.logit_scale.requires_grad_(False)
    if getattr(model, "logit_bias", None) is not None:
        model.logit_bias.requires_grad_(False)
    n_vis = config.freeze_vision_layers
    if n_vis:
        trunk = getattr(model.visual, "trunk", None)
        if trunk is None or not hasattr(trunk, "blocks"):
            raise InputError("freeze_vision_layers needs a timm ViT vision tower.")
        if n_vis > len(trunk.blocks):
            raise InputError(f"freeze_vision_layers is {n_vis} but the ViT has "
                             f"{len(trunk.blocks)} blocks.")
        for name in ("patch_embed", "cls_token", "pos_embed", "reg_token", "norm_pre"):
            part = getattr(trunk, name, None)
            if part is not None:
                part.requires_grad_(False)
        for block in trunk.blocks[:n_vis]:
            block.requires_grad_(False)
    n_txt = config.freeze_text_layers
    if n_txt:
        bert = getattr(getattr(model, "text", None), "transformer", None)
        layers = getattr(getattr(bert, "encoder", None), "layer", None)
        if layers is None:
            raise InputError("freeze_text_layers needs a Hugging Face BERT text tower.")
        if n_txt > len(layers):
            raise InputError(f"freeze_text_layers is {n_txt} but the text tower has "
                             f"{len(layers)} layers.")
        bert.embeddings.requires_grad_(False)
        for layer in layers[:n_txt]:
            layer.requires_grad_(False)


def _copy_model_files(clip, out_dir: Path) -> None:
    config_dir = clip.extra.get("config_dir")
    if not config_dir or not (Path(config_dir) / "open_clip_config.json").is_file():
        raise InputError(f"{clip.source}: cannot find its open_clip_config.json to save the "
                         "fine-tuned model beside it.")
    shutil.copyfile(Path(config_dir) / "open_clip_config.json",
                    out_dir / "open_clip_config.json")
    text_dir = clip.extra.get("text_dir")
    if text_dir:
        (out_dir / "text").mkdir(exist_ok=True)
        for name in TEXT_FILES:
            if (Path(text_dir) / name).is_file():
                shutil.copyfile(Path(text_dir) / name, out_dir / "text" / name)


def _save(obj: Any, path: Path) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _collate(items):
    import torch

    return torch.stack([it[0] for it in items]), [it[1] for it in items]


# --------------------------------------------------------------------------- the loop


def finetune_clip(
    clip_source: str,
    data: str | Path,
    out_dir: str | Path,
    config: FinetuneConfig | None = None,
    device: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    log: Callable[[str], None] | None = None,
) -> FinetuneResult:
    """Fine-tune the CLIP at ``clip_source`` on the pairs in ``data``; write ``out_dir``.

    Parameters
    ----------
    clip_source : str
        Anything :func:`~napari_medclipsam.core.models.load_clip` accepts.
    data : path
        A CSV (path,caption) or a folder of images with same-name ``.txt`` captions.
    out_dir : path
        The folder to write (see the module docstring). An existing fine-tuning folder is
        never overwritten unless ``overwrite``; with ``resume`` training continues from its
        ``checkpoints/last.pt`` (same parameters required; ``epochs`` may be raised).
    progress : callable, optional
        ``progress(step, total_steps)`` after every optimisation step.
    should_stop : callable, optional
        Checked before every step; on True the last finished epoch stays saved (resumable)
        and :class:`CancelledError` is raised.
    log : callable, optional
        Receives one line per epoch.
    """
    import torch

    from ..core.models import load_clip, resolve_device

    config = config or FinetuneConfig()
    say = log or (lambda line: None)
    out_dir = Path(out_dir).expanduser()
    last_path = out_dir / LAST_CHECKPOINT
    existing = out_dir.is_dir() and ((out_dir / WEIGHTS_NAME).exists() or last_path.exists())
    if existing and not (resume or overwrite):
        raise InputError(f"{out_dir} already holds a fine-tuned model. Pass resume to continue "
                         "its training, overwrite to start again, or choose another folder.")
    if resume and not last_path.is_file():
        raise InputError(f"Nothing to resume: {last_path} does not exist.")

    pairs, n_dropped = clean_pairs(read_pairs(data), config.min_caption_chars)
    if len(pairs) < 3:
        raise InputError(f"{data}: only {len(pairs)} pair(s) left after dropping captions "
                         f"shorter than {config.min_caption_chars} characters; fine-tuning "
                         "needs more.")
    train_pairs, val_pairs = split_pairs(pairs, config.val_fraction, config.seed)
    if len(train_pairs) < 2:
        raise InputError("Fewer than 2 training pairs after the split.")

    device = resolve_device(device)
    clip = load_clip(clip_source, device)
    model = copy.deepcopy(clip.model).to(device)
    _freeze(model, config)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    use_amp = bool(config.amp and str(device).startswith("cuda"))
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    loss_fn = _loss_fn(config)

    history: list[dict[str, float]] = []
    start_epoch, best_val, best_epoch = 0, float("inf"), None
    if resume:
        state = torch.load(last_path, map_location="cpu", weights_only=True)
        saved = dict(state["config"])
        mismatch = {k for k, v in config.to_dict().items() if k != "epochs" and saved.get(k) != v}
        if mismatch or state.get("source") != clip_source:
            raise InputError(f"Cannot resume {out_dir}: it was trained with other parameters "
                             f"({', '.join(sorted(mismatch)) or 'clip model'}). Use the same "
                             "ones, or overwrite.")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if use_amp and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch = int(state["epoch"])
        history = [dict(h) for h in state["history"]]
        best_val = float(state["best_val"])
        best_epoch = state.get("best_epoch")
        say(f"resuming after epoch {start_epoch}")
    else:
        if out_dir.exists() and overwrite:
            for name in (WEIGHTS_NAME, "finetune.json"):
                (out_dir / name).unlink(missing_ok=True)
            shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
        (out_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        _copy_model_files(clip, out_dir)

    size, mean, std = clip.image_size, clip.mean, clip.std
    train_set = PairDataset(train_pairs, size, mean, std)
    val_set = PairDataset(val_pairs, size, mean, std)
    batch = min(config.batch_size, len(train_set))
    steps_per_epoch = len(train_set) // batch
    total = steps_per_epoch * config.epochs
    step = steps_per_epoch * start_epoch
    tokenizer = clip.tokenizer

    def batch_loss(images, captions):
        with torch.autocast("cuda", dtype=torch.float16, enabled=use_amp):
            img = model.encode_image(images.to(device))
            txt = model.encode_text(tokenizer(list(captions)).to(device))
        return loss_fn(img.float(), txt.float())

    def save_state(epoch: int) -> None:
        _save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
               "scaler": scaler.state_dict() if use_amp else {}, "epoch": epoch,
               "history": history, "best_val": best_val, "best_epoch": best_epoch,
               "config": config.to_dict(), "source": clip_source}, last_path)

    result = FinetuneResult(out_dir, history, best_epoch, len(train_pairs), len(val_pairs),
                            n_dropped)
    for epoch in range(start_epoch, config.epochs):
        generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
        loader = torch.utils.data.DataLoader(
            train_set, batch_size=batch, shuffle=True, drop_last=True, generator=generator,
            num_workers=config.num_workers, collate_fn=_collate)
        model.train()
        losses = []
        for images, captions in loader:
            if should_stop is not None and should_stop():
                raise CancelledError(f"Fine-tuning cancelled in epoch {epoch + 1}; the model "
                                     f"after epoch {epoch} is saved in {last_path} (resume).")
            loss = batch_loss(images, captions)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            losses.append(float(loss.detach()))
            step += 1
            if progress is not None:
                progress(step, total)
        model.eval()
        val_losses = []
        with torch.no_grad():
            vloader = torch.utils.data.DataLoader(val_set, batch_size=batch, shuffle=False,
                                                  num_workers=config.num_workers,
                                                  collate_fn=_collate)
            for images, captions in vloader:
                if len(captions) >= 2:
                    val_losses.append(float(batch_loss(images, captions)))
        train_loss = float(sum(losses) / max(len(losses), 1))
        val_loss = float(sum(val_losses) / len(val_losses)) if val_losses else float("nan")
        history.append({"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss})
        # The best epoch by validation loss (by training loss when there is no validation).
        score = val_loss if val_losses else train_loss
        if score < best_val:
            best_val, best_epoch = score, epoch + 1
            _save(model.state_dict(), out_dir / WEIGHTS_NAME)
        save_state(epoch + 1)
        say(f"epoch {epoch + 1}/{config.epochs}: train loss {train_loss:.4f}, "
            f"val loss {val_loss:.4f}" + (" (best)" if best_epoch == epoch + 1 else ""))

    result.history, result.best_epoch = history, best_epoch
    info = {"source": clip_source, "data": str(data), "config": config.to_dict(),
            "n_train": len(train_pairs), "n_val": len(val_pairs), "n_dropped": n_dropped,
            "history": history, "best_epoch": best_epoch, "weights": WEIGHTS_NAME,
            "versions": {"torch": torch.__version__}}
    write_text(out_dir / "finetune.json", json.dumps(info, indent=2) + "\n")
    return result
