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
    OUT/finetune.json               parameters, data split, per-epoch losses, best epoch,
                                    epochs done and whether the run is complete

OUT is never the source model's folder or the data's (nor inside or around them); a
non-empty OUT is written only with ``resume`` or ``overwrite``; a new OUT appears complete
after the first epoch, an overwritten one is swapped in when the run ends, so a killed run
leaves no half-written folder and never loses the old model (see
:mod:`napari_medclipsam.finetune.output`).

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
from .output import (
    CONFIG_NAME,
    INFO_NAME,
    LAST_CHECKPOINT,
    TEXT_FILES,
    WEIGHTS_NAME,
    OutputFolder,
    check_separate,
)

__all__ = ["LAST_CHECKPOINT", "LOSS_NAMES", "WEIGHTS_NAME", "FinetuneConfig", "FinetuneResult",
           "clip_inputs", "data_inputs", "finetune_clip", "load_checkpoint"]

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
    if not config_dir or not (Path(config_dir) / CONFIG_NAME).is_file():
        raise InputError(f"{clip.source}: cannot find its {CONFIG_NAME} to save the "
                         "fine-tuned model beside it.")
    shutil.copyfile(Path(config_dir) / CONFIG_NAME, out_dir / CONFIG_NAME)
    text_dir = clip.extra.get("text_dir")
    if text_dir:
        (out_dir / "text").mkdir(exist_ok=True)
        for name in TEXT_FILES:
            if (Path(text_dir) / name).is_file():
                shutil.copyfile(Path(text_dir) / name, out_dir / "text" / name)


def _write_failure(path: Path, exc: BaseException) -> str:
    reason = getattr(exc, "strerror", None)
    if not reason:
        try:
            free = shutil.disk_usage(path.parent).free
        except OSError:
            free = None
        reason = ("the disk is full" if free is not None and free < (64 << 20)
                  else f"{type(exc).__name__}")
    return f"Could not write {path}: {reason}. Free some space or choose another folder (-o)."


def _save(obj: Any, path: Path) -> None:
    import torch

    try:
        with atomic_path(path) as tmp:
            torch.save(obj, tmp)
    except (OSError, RuntimeError) as exc:  # torch's writer reports a full disk as RuntimeError
        raise InputError(_write_failure(path, exc)) from exc


def _write_info(path: Path, info: dict[str, Any]) -> None:
    try:
        write_text(path, json.dumps(info, indent=2) + "\n")
    except OSError as exc:
        raise InputError(_write_failure(path, exc)) from exc


def _collate(items):
    import torch

    bad = [it[2] for it in items if it[2] is not None]
    if bad:
        return None, bad
    return torch.stack([it[0] for it in items]), [it[1] for it in items]


class _CheckedPairs:
    """A PairDataset whose unreadable images come back as a message (from a DataLoader
    worker too) instead of an exception with a worker's traceback in its text."""

    def __init__(self, dataset: PairDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        try:
            image, caption = self.dataset[index]
        except InputError as exc:
            return None, None, str(exc)
        return image, caption, None


# --------------------------------------------------------------------------- inputs


def clip_inputs(clip_source: str, clip=None) -> tuple[list[tuple[Path, str]],
                                                      list[tuple[Path, str]]]:
    """The folders and files of the source CLIP (``([(folder, what)], [(file, what)])``)
    that fine-tuning must never write: the ``local-dir:`` folder, a checkpoint file and the
    folder holding its config; with a loaded ``clip``, also where it was loaded from (the
    hub cache's snapshot, the text tower's folder, the weights)."""
    from ..core.models import CHECKPOINT_SUFFIXES

    folders: list[tuple[Path, str]] = []
    files: list[tuple[Path, str]] = []
    if not clip_source.startswith("hf-hub:"):
        path = Path(clip_source.removeprefix("local-dir:")).expanduser()
        if clip_source.startswith("local-dir:") or path.is_dir():
            folders.append((path, "source model folder"))
        elif path.suffix in CHECKPOINT_SUFFIXES:
            files.append((path, "source model's weights"))
            if (path.parent / CONFIG_NAME).is_file():
                folders.append((path.parent, "source model folder"))
    if clip is not None:
        for key in ("config_dir", "text_dir"):
            if clip.extra.get(key):
                folders.append((Path(clip.extra[key]), "source model folder"))
        if clip.weights_path:
            files.append((Path(clip.weights_path), "source model's weights"))
    return folders, files


def data_inputs(data: str | Path, pairs) -> tuple[list[tuple[Path, str]],
                                                  list[tuple[Path, str]]]:
    """The caption data's folder (a sidecar folder) or file (CSV/JSON) and every image."""
    data = Path(data).expanduser()
    if data.is_dir():
        folders = [(data, "caption data folder")]
        files = []
    else:
        folders, files = [], [(data, "caption file")]
    files += [(p.image, "training image") for p in pairs]
    return folders, files


_CHECKPOINT_KEYS = ("model", "optimizer", "epoch", "history", "best_val", "config")


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a fine-tuning ``last.pt`` (``weights_only=True``, on the CPU).

    Raises
    ------
    InputError
        One line when it holds Python objects (refused, not loaded), is damaged, or is not
        a fine-tuning checkpoint.
    """
    from ..core.models import load_resume_checkpoint

    state = load_resume_checkpoint(path, "fine-tuning")
    if not isinstance(state, dict) or any(k not in state for k in _CHECKPOINT_KEYS) \
            or not isinstance(state["config"], dict) or not isinstance(state["model"], dict):
        raise InputError(f"{path} is not a fine-tuning checkpoint (no model, optimiser and "
                         "epoch in it). Start again with --overwrite.")
    return state


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
        A CSV (path,caption), a JSON file or a folder of images with same-name ``.txt``
        captions (see :mod:`napari_medclipsam.finetune.data`).
    out_dir : path
        The folder to write (see the module docstring). It may not be, hold or lie inside
        the source model's folder or the data folder, nor hold a data file. A new or empty
        folder is written; a non-empty one only with ``overwrite`` (an earlier fine-tuning
        output, replaced when the new run is complete; its other files are kept) or
        ``resume`` (training continues from its ``checkpoints/last.pt``; same parameters
        required, ``epochs`` may be raised). See :mod:`napari_medclipsam.finetune.output`.
    progress : callable, optional
        ``progress(step, total_steps)`` after every optimisation step.
    should_stop : callable, optional
        Checked before every step; on True :class:`CancelledError` is raised: a new output
        keeps its last finished epoch (resumable), an overwritten one keeps the old model.
    log : callable, optional
        Receives one line per epoch and notes (leftovers cleaned, batch size reduced).

    Raises
    ------
    InputError
        For anything wrong with the data, the output folder, the model's files or a
        checkpoint, in one line (nothing of the user's is changed).
    ModelUnavailableError
        When the model's files are missing (as :func:`check_model_sources` says).
    """
    from ..core.models import check_model_sources, load_clip, resolve_device

    config = config or FinetuneConfig()
    say = log or (lambda line: None)
    out_dir = Path(out_dir).expanduser()
    try:
        device = resolve_device(device)
    except ValueError as exc:
        raise InputError(str(exc)) from None

    raw_pairs = read_pairs(data, log=say)
    pairs, n_dropped = clean_pairs(raw_pairs, config.min_caption_chars)
    if len(pairs) < 3:
        raise InputError(f"{data}: only {len(pairs)} pair(s) left after dropping captions "
                         f"shorter than {config.min_caption_chars} characters; fine-tuning "
                         "needs more.")
    train_pairs, val_pairs = split_pairs(pairs, config.val_fraction, config.seed)
    if len(train_pairs) < 2:
        raise InputError("Fewer than 2 training pairs after the split.")
    model_folders, model_files = clip_inputs(clip_source)
    data_folders, data_files = data_inputs(data, raw_pairs)
    check_separate(out_dir, model_folders + data_folders, model_files + data_files)
    OutputFolder.check(out_dir, resume=resume, overwrite=overwrite)  # before the slow load

    check_model_sources(clip_model=clip_source, device=device)
    clip = load_clip(clip_source, device)
    check_separate(out_dir, *clip_inputs(clip_source, clip))

    output = OutputFolder.open(out_dir, resume=resume, overwrite=overwrite, log=say)
    try:
        result = _train(clip, clip_source, data, output, config, device, train_pairs,
                        val_pairs, n_dropped, progress, should_stop, say)
        output.finish()
    except BaseException:
        output.abort()
        raise
    return result


def _train(clip, clip_source, data, output: OutputFolder, config: FinetuneConfig, device,
           train_pairs, val_pairs, n_dropped, progress, should_stop, say) -> FinetuneResult:
    import torch

    out_dir = output.out
    state = load_checkpoint(out_dir / LAST_CHECKPOINT) if output.mode == "resume" else None
    model = copy.deepcopy(clip.model).to(device)
    _freeze(model, config)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    use_amp = bool(config.amp and str(device).startswith("cuda"))
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    loss_fn = _loss_fn(config)

    history: list[dict[str, float]] = []
    start_epoch, best_val, best_epoch = 0, float("inf"), None
    if state is not None:
        saved = dict(state["config"])
        mismatch = {k for k, v in config.to_dict().items() if k != "epochs" and saved.get(k) != v}
        if mismatch or state.get("source") != clip_source:
            raise InputError(f"Cannot resume {out_dir}: it was trained with other parameters "
                             f"({', '.join(sorted(mismatch)) or 'clip model'}). Use the same "
                             "ones, or overwrite.")
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            if use_amp and state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            start_epoch = int(state["epoch"])
            history = [dict(h) for h in state["history"]]
            best_val = float(state["best_val"])
        except (RuntimeError, ValueError, TypeError, KeyError) as exc:
            raise InputError(f"{out_dir / LAST_CHECKPOINT} does not fit the model "
                             f"{clip_source} ({type(exc).__name__}); resume with the model it "
                             "was trained from, or start again with --overwrite.") from None
        best_epoch = state.get("best_epoch")
        say(f"resuming after epoch {start_epoch}")
    else:
        (output.work / LAST_CHECKPOINT.parent).mkdir(exist_ok=True)
        _copy_model_files(clip, output.work)

    size, mean, std = clip.image_size, clip.mean, clip.std
    train_set = _CheckedPairs(PairDataset(train_pairs, size, mean, std))
    val_set = _CheckedPairs(PairDataset(val_pairs, size, mean, std))
    batch = min(config.batch_size, len(train_set))
    if batch < config.batch_size:
        say(f"batch size {config.batch_size} is more than the {len(train_set)} training "
            f"pairs: each step uses all {batch}.")
    steps_per_epoch = len(train_set) // batch
    total = steps_per_epoch * config.epochs
    step = steps_per_epoch * start_epoch
    tokenizer = clip.tokenizer

    def checked(images, captions):
        if images is None:
            raise InputError(f"{captions[0].rstrip('.')} (a training image of {data}: fix or "
                             "remove it"
                             + (", then --resume)." if output.published else ")."))
        return images, captions

    def batch_loss(images, captions):
        with torch.autocast("cuda", dtype=torch.float16, enabled=use_amp):
            img = model.encode_image(images.to(device))
            txt = model.encode_text(tokenizer(list(captions)).to(device))
        return loss_fn(img.float(), txt.float())

    def info(epochs_done: int) -> dict[str, Any]:
        return {"source": clip_source, "data": str(data), "config": config.to_dict(),
                "batch_size_used": batch, "n_train": len(train_pairs), "n_val": len(val_pairs),
                "n_dropped": n_dropped, "history": history, "best_epoch": best_epoch,
                "epochs_done": epochs_done, "complete": epochs_done >= config.epochs,
                "weights": WEIGHTS_NAME, "versions": {"torch": torch.__version__}}

    def cancelled(epoch: int) -> CancelledError:
        if output.mode == "overwrite":
            kept = f"{out_dir} keeps the earlier model; nothing of this run was saved."
        elif output.published:
            kept = (f"the model after epoch {epoch} is saved in {out_dir} (resume to "
                    "continue).")
        else:
            kept = "nothing was saved (no epoch had finished)."
        return CancelledError(f"Fine-tuning cancelled in epoch {epoch + 1}; {kept}")

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
                raise cancelled(epoch)
            loss = batch_loss(*checked(images, captions))
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
                images, captions = checked(images, captions)
                if len(captions) >= 2:
                    val_losses.append(float(batch_loss(images, captions)))
        train_loss = float(sum(losses) / max(len(losses), 1))
        val_loss = float(sum(val_losses) / len(val_losses)) if val_losses else float("nan")
        history.append({"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss})
        # The best epoch by validation loss (by training loss when there is no validation).
        score = val_loss if val_losses else train_loss
        work = output.work
        # Written in this order so that a run killed between two files resumes correctly:
        # the weights of a new best first, then the state naming it, then the summary.
        if score < best_val:
            best_val, best_epoch = score, epoch + 1
            _save(model.state_dict(), work / WEIGHTS_NAME)
        _save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
               "scaler": scaler.state_dict() if use_amp else {}, "epoch": epoch + 1,
               "history": history, "best_val": best_val, "best_epoch": best_epoch,
               "config": config.to_dict(), "source": clip_source}, work / LAST_CHECKPOINT)
        _write_info(work / INFO_NAME, info(epoch + 1))
        output.epoch_saved()
        say(f"epoch {epoch + 1}/{config.epochs}: train loss {train_loss:.4f}, "
            f"val loss {val_loss:.4f}" + (" (best)" if best_epoch == epoch + 1 else ""))

    if output.mode == "resume" and start_epoch >= config.epochs:
        say(f"{out_dir} has already trained {start_epoch} epoch(s); raise the number of "
            "epochs to train more.")
    result.history, result.best_epoch = history, best_epoch
    return result
