"""Fine-tuning a VLSM's decoder on the user's (corrected) labels, after medvlsm's recipe.

* Loss: Dice + 0.2 x binary cross-entropy (medvlsm's ``DiceCELoss(lambda_dice=1,
  lambda_ce=0.2)``), the soft Dice per sample with MONAI's 1e-5 smoothing, both on the
  decoder's logits at its output size (the mask resized there, nearest).
* AdamW (lr 2e-4, weight decay 1e-3), gradient norm clipped at 0.5, the learning rate cut
  tenfold after 5 epochs without a better validation loss (``ReduceLROnPlateau``), early stop
  after ``patience`` (20) epochs without a better validation Dice (by 1e-4), not before
  ``min_epochs`` (10): medvlsm's settings. Batch 16.
* Validation: the cases whose name falls in the 15 % chosen by :func:`~.data.split_by_name`;
  Dice of the mask at the threshold (0.5), an empty prediction of an empty target counting 1,
  each sample captioned with the first caption of the first prompt level listed (for the
  default ``p1,p6`` the class name: what a user types).
* Captions: each epoch draws one caption per sample among those of the prompt levels listed
  (:mod:`~.prompts`); the same seed draws the same captions.
* Frozen encoders: their activations for every training image and the embedding of every
  caption are computed once and kept (in half precision, up to ``cache_gb``), so an epoch
  costs only the decoder; past the budget they are recomputed per batch.
* Output folder ``out``: ``vlsm.json`` + ``decoder.safetensors`` (the best epoch, replaced
  atomically as it improves) and ``checkpoint.pt`` (the last finished epoch: decoder,
  optimiser, scheduler, early-stop state and history, read back with
  ``weights_only=True``). ``resume`` continues from it with the same data and settings
  (``epochs`` may be raised). A new or empty folder is written; an earlier VLSM training
  output only with ``overwrite``; anything else is refused, and so is a folder that is or
  holds the images or masks.
* On a CUDA GPU the decoder trains under fp16 autocast with a gradient scaler (``amp``).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import CancelledError, InputError
from .config import MODEL_FILE, VlsmTrainConfig
from .data import Sample, TrainingCase, load_samples, split_by_name
from .models import VlsmModel, save_vlsm
from .prompts import build_prompts, definitions_for, mask_attributes

__all__ = ["CHECKPOINT", "VlsmTrainConfig", "VlsmTrainResult", "caption_maker",
           "check_output", "dice_bce_loss", "hard_dice", "load_checkpoint", "train_vlsm"]

CHECKPOINT = "checkpoint.pt"
OWNED = (MODEL_FILE, "decoder.safetensors", CHECKPOINT)
Log = Callable[[str], None]
ProgressFn = Callable[[int, int], None]
StopFn = Callable[[], bool]


@dataclass
class VlsmTrainResult:
    """What a training run did.

    Attributes
    ----------
    out_dir : Path
    best_epoch : int
        1-based epoch of the saved decoder.
    best_dice : float
        Its validation Dice.
    epochs_run : int
        Epochs finished (over all resumed runs).
    stopped_early : bool
    n_train, n_val : int
        Samples (image or slice x class) on each side of the split.
    history : list of dict
        Per epoch: ``epoch``, ``loss``, ``val_loss``, ``val_dice``, ``lr``, ``seconds``.
    """

    out_dir: Path
    best_epoch: int
    best_dice: float
    epochs_run: int
    stopped_early: bool
    n_train: int
    n_val: int
    history: list[dict[str, float]] = field(default_factory=list)


# --------------------------------------------------------------------------- loss


def dice_bce_loss(logits, target, dice_weight: float = 1.0, bce_weight: float = 0.2):
    """Dice + ``bce_weight`` x BCE of [B, H, W] logits against a [B, H, W] {0, 1} target
    (soft Dice per sample, MONAI's smoothing 1e-5 in numerator and denominator)."""
    import torch
    import torch.nn.functional as F

    logits = logits.float()
    target = target.float()
    prob = torch.sigmoid(logits)
    dims = tuple(range(1, logits.ndim))
    inter = (prob * target).sum(dims)
    dice = 1.0 - (2.0 * inter + 1e-5) / (prob.sum(dims) + target.sum(dims) + 1e-5)
    bce = F.binary_cross_entropy_with_logits(logits, target)
    return dice_weight * dice.mean() + bce_weight * bce


def hard_dice(pred: np.ndarray, target: np.ndarray) -> float:
    """Dice of two bool masks; 1 when both are empty."""
    total = int(pred.sum()) + int(target.sum())
    return 1.0 if total == 0 else 2.0 * int((pred & target).sum()) / total


# --------------------------------------------------------------------------- output folder


def check_output(out: str | Path, *, resume: bool = False, overwrite: bool = False,
                 inputs: Sequence[str | Path] = ()) -> str:
    """The mode a run on ``out`` uses (``new``, ``overwrite``, ``resume``); nothing written.

    Raises
    ------
    InputError
        ``out`` is a file, is or holds or lies in an input folder, is not empty (without
        the flag that allows it), or has nothing to resume.
    """
    out = Path(out).expanduser().resolve()
    if resume and overwrite:
        raise InputError("--resume and --overwrite exclude each other.")
    if out.exists() and not out.is_dir():
        raise InputError(f"-o {out} is a file; give a folder for the model.")
    for given in inputs:
        folder = Path(given).expanduser().resolve()
        if folder.is_file():
            folder = folder.parent
        if out == folder or folder in out.parents or out in folder.parents:
            raise InputError(f"-o {out} is, holds or lies inside the input folder {folder}; "
                             "write the model somewhere else (your data is never written).")
    if resume:
        if not (out / CHECKPOINT).is_file():
            raise InputError(f"Nothing to resume: {out / CHECKPOINT} does not exist.")
        return "resume"
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not entries:
        return "new"
    ours = any((out / name).is_file() for name in (MODEL_FILE, CHECKPOINT))
    if ours and overwrite:
        return "overwrite"
    if ours:
        raise InputError(f"{out} already holds a VLSM model. Pass --resume to continue its "
                         "training, --overwrite to start again, or choose another folder.")
    shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
    raise InputError(f"{out} is not empty (it holds {shown}); training writes only into a new "
                     "or empty folder (or --overwrite an earlier VLSM model).")


def load_checkpoint(path: Path) -> dict[str, Any]:
    """``checkpoint.pt`` read with ``weights_only=True`` on the CPU; one-line InputError for
    a damaged, foreign or pickled-object file."""
    from ..core.models import load_resume_checkpoint

    state = load_resume_checkpoint(path, "VLSM training")
    keys = ("decoder", "optimizer", "scheduler", "epoch", "config", "data", "history")
    if not isinstance(state, dict) or any(k not in state for k in keys):
        raise InputError(f"{path} is not a VLSM training checkpoint. Start again with "
                         "--overwrite.")
    return state


# --------------------------------------------------------------------------- training


def caption_maker(prompt_sets: Sequence[str], definitions: dict[str, Sequence[str]] | None
                  = None) -> Callable[[str, np.ndarray, np.ndarray], list[str]]:
    """``captions(class_name, target, rgb)``: every caption of ``prompt_sets`` for a sample,
    with attributes from its mask (and image) and definitions from ``definitions`` or the
    built-in list."""
    def captions(name: str, target: np.ndarray, rgb: np.ndarray) -> list[str]:
        attributes = mask_attributes(target, rgb)
        defs = definitions_for(name, definitions)
        out: list[str] = []
        for level in prompt_sets:
            out += [c for c in build_prompts(level, name, attributes, defs) if c not in out]
        return out

    return captions


def train_vlsm(model: VlsmModel, cases: Sequence[TrainingCase], out_dir: str | Path,
               config: VlsmTrainConfig | None = None, *,
               definitions: dict[str, Sequence[str]] | None = None,
               resume: bool = False, overwrite: bool = False,
               info: dict[str, Any] | None = None,
               progress: ProgressFn | None = None, should_stop: StopFn | None = None,
               log: Log | None = None) -> VlsmTrainResult:
    """Train ``model``'s decoder on ``cases``; write the model folder ``out_dir``.

    Parameters
    ----------
    model : VlsmModel
        From :func:`~.models.build_vlsm` (its decoder is trained in place).
    cases : sequence of TrainingCase
        From :func:`~.data.folder_cases` or :func:`~.data.dataset_cases`.
    definitions : dict, optional
        Class name -> definitions for p7-p9 (default: the built-in ones).
    info : dict, optional
        Recorded in ``vlsm.json`` (e.g. where the data came from).
    progress : callable, optional
        ``progress(step, total_steps)`` after every batch.
    should_stop : callable, optional
        Checked before every batch; raises :class:`CancelledError` (the last finished epoch
        stays in ``checkpoint.pt``, resumable).
    log : callable, optional
        One line per epoch, and notes (cases left out, cache).

    Raises
    ------
    InputError
        Bad settings, data (fewer than 2 usable cases, a class never present) or output
        folder; a checkpoint that does not match this run.
    """
    import torch

    config = config or VlsmTrainConfig()
    say = log or (lambda line: None)
    out = Path(out_dir).expanduser()
    mode = check_output(out, resume=resume, overwrite=overwrite,
                        inputs=sorted({p.parent for c in cases for p in (c.image, c.labels)}))
    state = load_checkpoint(out / CHECKPOINT) if mode == "resume" else None
    names = sorted({c.name for c in cases})
    train_names, val_names = split_by_name(names, config.val_fraction)
    fingerprint = {"cases": names, "classes": sorted({n for c in cases for n, _ in c.classes}),
                   "arch": model.arch, "base": model.base}
    if any(level in ("p7", "p8", "p9") for level in config.prompt_sets):
        lacking = [n for n in fingerprint["classes"] if not definitions_for(n, definitions)]
        if lacking:
            raise InputError(f"prompt sets p7-p9 need a definition of {lacking[0]!r}: give a "
                             "definitions file (JSON: class name -> list of sentences).")
    if state is not None:
        _check_resume(state, config, fingerprint, out)

    captions = caption_maker(config.prompt_sets, definitions)
    samples = load_samples(cases, captions, say, should_stop)
    val_set = set(val_names)
    train = [s for s in samples if s.case not in val_set]
    val = [s for s in samples if s.case in val_set]
    if not train or not val:
        raise InputError(f"After reading the cases, {len(train)} training and {len(val)} "
                         "validation sample(s) are left; training needs both.")
    for name in fingerprint["classes"]:
        if not any(s.target.any() for s in train if s.class_name == name):
            say(f"'{name}' is never present in the training cases: the model can only learn "
                "that it is absent.")

    device = torch.device(model.device)
    cuda = device.type == "cuda"
    amp = bool(config.amp and cuda)
    torch.manual_seed(config.seed)
    features = _Features(model, samples, config.cache_gb, say)
    logit_shape = features.logit_shape()
    targets = {id(s): _target(s.target, logit_shape) for s in samples}

    decoder = model.decoder
    decoder.train()
    params = [p for p in decoder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=config.lr_factor, patience=config.lr_patience)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    history: list[dict[str, float]] = []
    start, best_dice, best_epoch, bad_epochs = 0, -1.0, 0, 0
    if state is not None:
        decoder.load_state_dict(state["decoder"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history = list(state["history"])
        start = int(state["epoch"])
        best_dice, best_epoch = float(state["best_dice"]), int(state["best_epoch"])
        bad_epochs = int(state["bad_epochs"])
        say(f"Resuming after epoch {start} (best validation Dice {best_dice:.3f} at epoch "
            f"{best_epoch}).")
    if mode != "resume":
        out.mkdir(parents=True, exist_ok=True)

    batches = math.ceil(len(train) / config.batch_size)
    total = config.epochs * batches
    stopped_early = bool(state and state.get("stopped_early"))
    record = {**(info or {}), "classes": fingerprint["classes"],
              "prompt_sets": list(config.prompt_sets), "train_config": config.to_dict(),
              "n_train": len(train), "n_val": len(val), "val_cases": val_names}
    epoch = start
    for epoch in range(start + 1, config.epochs + 1):
        if stopped_early:
            break
        t0 = time.perf_counter()
        decoder.train()
        rng = np.random.default_rng([config.seed, epoch])
        order = rng.permutation(len(train))
        losses = []
        for b in range(batches):
            if should_stop is not None and should_stop():
                raise CancelledError("Cancelled.")
            batch = [train[i] for i in order[b * config.batch_size:(b + 1) * config.batch_size]]
            texts = [s.captions[int(rng.integers(len(s.captions)))] for s in batch]
            acts = features.activations(batch)
            emb = features.text(texts)
            target = torch.stack([targets[id(s)] for s in batch]).to(device)
            with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
                logits = model.decode(acts, emb)
            loss = dice_bce_loss(logits, target, config.dice_weight, config.bce_weight)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            losses.append(float(loss.detach()))
            if progress is not None:
                progress((epoch - 1) * batches + b + 1, total)
        val_loss, val_dice = _validate(model, features, val, targets, config, amp)
        scheduler.step(val_loss)
        row = {"epoch": epoch, "loss": float(np.mean(losses)), "val_loss": val_loss,
               "val_dice": val_dice, "lr": float(optimizer.param_groups[0]["lr"]),
               "seconds": round(time.perf_counter() - t0, 3)}
        history.append(row)
        improved = val_dice > best_dice + 1e-4
        if improved:
            best_dice, best_epoch, bad_epochs = val_dice, epoch, 0
            model.threshold = config.threshold
            save_vlsm(model, out, {**record, "training": {
                "best_epoch": best_epoch, "best_val_dice": best_dice, "history": history}})
        else:
            bad_epochs += 1
        stopped_early = epoch >= config.min_epochs and bad_epochs >= config.patience
        _save_checkpoint(out / CHECKPOINT, {
            "decoder": decoder.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "epoch": epoch, "best_dice": best_dice,
            "best_epoch": best_epoch, "bad_epochs": bad_epochs, "history": history,
            "stopped_early": stopped_early, "config": _comparable(config),
            "data": json.loads(json.dumps(fingerprint, default=str))})
        say(f"epoch {epoch}/{config.epochs}: loss {row['loss']:.4f}, validation loss "
            f"{val_loss:.4f}, Dice {val_dice:.3f} (best {best_dice:.3f} at epoch "
            f"{best_epoch}), lr {row['lr']:.2g}, {row['seconds']:.1f} s")
        if stopped_early:
            say(f"Stopped early: no better validation Dice for {config.patience} epochs.")
            break
    _finish_record(out, history, best_epoch, best_dice, stopped_early)
    decoder.eval()
    return VlsmTrainResult(out, best_epoch, best_dice, len(history), stopped_early,
                           len(train), len(val), history)


def _comparable(config: VlsmTrainConfig) -> dict[str, Any]:
    data = config.to_dict()
    data.pop("epochs")  # may be raised on resume
    data.pop("cache_gb")
    data["prompt_sets"] = list(data["prompt_sets"])
    return data


def _check_resume(state: dict[str, Any], config: VlsmTrainConfig, fingerprint: dict,
                  out: Path) -> None:
    now = _comparable(config)
    then = dict(state["config"])
    changed = sorted(k for k in set(now) | set(then) if now.get(k) != then.get(k))
    if changed:
        raise InputError(f"{out} was trained with other settings ({', '.join(changed)}); "
                         "resume with the same ones (only --epochs may change) or "
                         "--overwrite.")
    data = json.loads(json.dumps(fingerprint, default=str))

    def weights(base) -> dict:  # a base model moved elsewhere is the same model
        return {k: v for k, v in (base or {}).items() if k.endswith("sha256")}

    data["base"], then_data = weights(data["base"]), {**state["data"]}
    then_data["base"] = weights(then_data.get("base"))
    for key, what in (("arch", "architecture"), ("base", "base model"),
                      ("classes", "classes"), ("cases", "cases")):
        if then_data.get(key) != data.get(key):
            raise InputError(f"{out} was trained with other {what}; resume with the same "
                             "data and model, or --overwrite.")


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    import torch

    from ..core.io import atomic_path

    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _finish_record(out: Path, history, best_epoch: int, best_dice: float,
                   stopped_early: bool) -> None:
    """Write the whole history into ``vlsm.json`` (the best epoch's record kept)."""
    from ..core.io import write_text

    path = out / MODEL_FILE
    if not path.is_file():
        return
    record = json.loads(path.read_text(encoding="utf-8"))
    record["training"] = {"best_epoch": best_epoch, "best_val_dice": best_dice,
                          "epochs_run": len(history), "stopped_early": stopped_early,
                          "history": history}
    write_text(path, json.dumps(record, indent=2, default=str) + "\n")


def _target(mask: np.ndarray, shape: tuple[int, int]):
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
    if tuple(t.shape[-2:]) != tuple(shape):
        t = F.interpolate(t, size=shape, mode="nearest-exact")
    return t[0, 0]


def _validate(model: VlsmModel, features: _Features, val: list[Sample], targets, config,
              amp: bool) -> tuple[float, float]:
    import torch

    model.decoder.eval()
    losses, dices = [], []
    with torch.no_grad():
        for start in range(0, len(val), config.batch_size):
            batch = val[start:start + config.batch_size]
            texts = [s.captions[0] for s in batch]  # the first level's first caption
            acts = features.activations(batch)
            emb = features.text(texts)
            target = torch.stack([targets[id(s)] for s in batch]).to(model.device)
            with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
                logits = model.decode(acts, emb)
            losses.append(float(dice_bce_loss(logits, target, config.dice_weight,
                                              config.bce_weight)) * len(batch))
            pred = (torch.sigmoid(logits.float()) > config.threshold).cpu().numpy()
            truth = target.cpu().numpy() > 0.5
            dices += [hard_dice(p, t) for p, t in zip(pred, truth, strict=True)]
    model.decoder.train()
    return float(np.sum(losses) / len(val)), float(np.mean(dices))


class _Features:
    """The frozen encoders' outputs: activations per image (cached in fp16 while they fit
    in ``cache_gb``) and text embeddings per caption (always cached)."""

    def __init__(self, model: VlsmModel, samples: list[Sample], cache_gb: float, log: Log):
        self.model = model
        self._images: dict[int, np.ndarray] = {}
        for s in samples:
            self._images.setdefault(s.image_key, s.rgb)
        self._acts: dict[int, list] = {}
        self._text: dict[str, Any] = {}
        self._budget = int(cache_gb * 1e9)
        self._used = 0
        self._full = False
        self._log = log

    def logit_shape(self) -> tuple[int, int]:
        import torch

        key, rgb = next(iter(self._images.items()))
        acts = self._compute([key])[0]
        with torch.no_grad():
            emb = self.text([""])
            logits = self.model.decode([a[None].float().to(self.model.device) for a in acts],
                                       emb)
        return tuple(int(v) for v in logits.shape[-2:])

    def _compute(self, keys: list[int]) -> list[list]:
        model = self.model
        pixel = model.image_inputs([self._images[k] for k in keys])
        acts = model.activations(pixel)
        per_image = [[a[i] for a in acts] for i in range(len(keys))]
        for k, layers in zip(keys, per_image, strict=True):
            if k in self._acts or self._full:
                continue
            size = sum(a.numel() * 2 for a in layers)
            if self._used + size > self._budget:
                self._full = True
                self._log(f"The encoders' outputs exceed the {self._budget / 1e9:g} GB cache; "
                          "the rest are recomputed every batch (slower).")
                continue
            self._acts[k] = [a.detach().to("cpu", dtype=_half()) for a in layers]
            self._used += size
        return per_image

    def activations(self, batch: Sequence[Sample]) -> list:
        import torch

        keys = [s.image_key for s in batch]
        missing = list(dict.fromkeys(k for k in keys if k not in self._acts))
        fresh = dict(zip(missing, self._compute(missing), strict=True)) if missing else {}
        device = self.model.device
        layers = []
        for j in range(len(self.model.extract_layers)):
            layers.append(torch.stack([
                (self._acts[k][j] if k in self._acts else fresh[k][j]).to(
                    device, dtype=torch.float32) for k in keys]))
        return layers

    def text(self, texts: Sequence[str]):
        import torch

        new = [t for t in dict.fromkeys(texts) if t not in self._text]
        for start in range(0, len(new), 64):
            chunk = new[start:start + 64]
            emb = self.model.text_embeddings(chunk).detach().float()
            for t, e in zip(chunk, emb, strict=True):
                self._text[t] = e
        return torch.stack([self._text[t] for t in texts]).to(self.model.device)


def _half():
    import torch

    return torch.float16
