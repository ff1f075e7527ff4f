"""``medclipsam finetune-clip`` and ``eval-retrieval``: CLIP fine-tuning on image-caption
pairs and the retrieval-accuracy protocol."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..core.config import DEFAULT_CLIP_MODEL
from .common import CLIError, tqdm_progress

__all__ = ["add_parser", "run_eval_retrieval", "run_finetune"]


def add_parser(sub) -> None:
    """Register ``finetune-clip`` and ``eval-retrieval`` on the top-level subparsers."""
    from ..finetune.data import MIN_CAPTION_CHARS
    from ..finetune.train import LOSS_NAMES

    ft = sub.add_parser(
        "finetune-clip", help="fine-tune BiomedCLIP on image-caption pairs (DHN-NCE).",
        description="Fine-tune a CLIP on image-caption pairs. DATA is a CSV with a header "
                    "(path,caption), a JSON/JSON Lines file or a folder of images with "
                    "same-name .txt captions. OUT becomes a folder that --clip-model "
                    "local-dir:OUT loads; it must be new or empty (or an earlier output with "
                    "--resume/--overwrite) and apart from the model's and the data's folders.")
    ft.add_argument("data", metavar="DATA",
                    help="CSV/JSON file or folder of image-caption pairs.")
    ft.add_argument("-o", "--out", required=True, metavar="OUT",
                    help="output folder (new or empty).")
    ft.add_argument("--loss", default="dhn-nce", choices=LOSS_NAMES,
                    help="contrastive loss (default dhn-nce, the paper's).")
    ft.add_argument("--temperature", type=float, default=0.6, help="tau (default 0.6).")
    ft.add_argument("--beta1", type=float, default=0.15,
                    help="image->text hardness (default 0.15).")
    ft.add_argument("--beta2", type=float, default=0.15,
                    help="text->image hardness (default 0.15).")
    ft.add_argument("--lr", type=float, default=1e-6, help="AdamW learning rate (default 1e-6).")
    ft.add_argument("--weight-decay", type=float, default=0.01, help="default 0.01.")
    ft.add_argument("--batch-size", type=int, default=64, help="default 64.")
    ft.add_argument("--epochs", type=int, default=10, help="default 10.")
    ft.add_argument("--val-fraction", type=float, default=0.15,
                    help="held-out share for validation (default 0.15).")
    ft.add_argument("--min-caption-chars", type=int, default=MIN_CAPTION_CHARS,
                    help=f"drop shorter captions after cleaning (default {MIN_CAPTION_CHARS}).")
    ft.add_argument("--freeze-vision-layers", type=int, default=0,
                    help="freeze the patch embedding and the first N ViT blocks.")
    ft.add_argument("--freeze-text-layers", type=int, default=0,
                    help="freeze the embeddings and the first N BERT layers.")
    ft.add_argument("--no-amp", action="store_true", help="no mixed precision on CUDA.")
    ft.add_argument("--workers", type=int, default=0, help="image-loading processes.")
    ft.add_argument("--seed", type=int, default=0, help="split and shuffling seed.")
    ft.add_argument("--resume", action="store_true",
                    help="continue OUT's training from its last finished epoch.")
    ft.add_argument("--overwrite", action="store_true",
                    help="replace the fine-tuned model in OUT when the new one is complete "
                         "(files in OUT that fine-tuning did not write are kept).")
    _add_clip_flags(ft)
    ft.set_defaults(func=run_finetune)

    rt = sub.add_parser(
        "eval-retrieval", help="top-1/top-2 image<->text retrieval accuracy.",
        description="Retrieval accuracy in shuffled batches of 50, repeated 5 times (the "
                    "paper's ROCO protocol): mean and std of top-1/top-2 image->text and "
                    "text->image accuracy.")
    rt.add_argument("data", metavar="DATA",
                    help="CSV/JSON file or folder of image-caption pairs.")
    rt.add_argument("--batch-size", type=int, default=50, help="default 50.")
    rt.add_argument("--repeats", type=int, default=5, help="default 5.")
    rt.add_argument("--seed", type=int, default=0, help="shuffling seed.")
    rt.add_argument("--min-caption-chars", type=int, default=0,
                    help="drop captions shorter than this after cleaning (default 0: keep all).")
    rt.add_argument("-o", "--out", metavar="JSON", help="also save the result as JSON.")
    rt.add_argument("--overwrite", action="store_true", help="replace an existing -o file.")
    _add_clip_flags(rt)
    rt.set_defaults(func=run_eval_retrieval)


def _add_clip_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--clip-model", default=DEFAULT_CLIP_MODEL,
                   help=f"CLIP: 'hf-hub:ORG/NAME', 'local-dir:PATH' or a checkpoint file "
                        f"(default {DEFAULT_CLIP_MODEL}).")
    g.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:N or mps (default: CUDA, then MPS, then CPU).")


def _check_flags(args: argparse.Namespace) -> None:
    """Number flags, checked with their flag names before anything is read."""
    for flag, value, least in (("--epochs", args.epochs, 1), ("--batch-size", args.batch_size, 2),
                               ("--workers", args.workers, 0),
                               ("--freeze-vision-layers", args.freeze_vision_layers, 0),
                               ("--freeze-text-layers", args.freeze_text_layers, 0),
                               ("--min-caption-chars", args.min_caption_chars, 0)):
        if value < least:
            why = " (contrastive learning needs pairs to compare)" if flag == "--batch-size" \
                else ""
            raise CLIError(f"{flag} must be at least {least}{why}; got {value}.")
    for flag, value in (("--lr", args.lr), ("--temperature", args.temperature)):
        if not value > 0:
            raise CLIError(f"{flag} must be positive; got {value}.")
    if not 0.0 <= args.val_fraction < 1.0:
        raise CLIError(f"--val-fraction must be in [0, 1); got {args.val_fraction}.")
    if args.resume and args.overwrite:
        raise CLIError("--resume and --overwrite exclude each other.")


def run_finetune(args: argparse.Namespace) -> int:
    from ..finetune.train import FinetuneConfig, finetune_clip

    _check_flags(args)
    try:
        config = FinetuneConfig(
            loss=args.loss, temperature=args.temperature, beta1=args.beta1, beta2=args.beta2,
            lr=args.lr, weight_decay=args.weight_decay, batch_size=args.batch_size,
            epochs=args.epochs, val_fraction=args.val_fraction,
            min_caption_chars=args.min_caption_chars,
            freeze_vision_layers=args.freeze_vision_layers,
            freeze_text_layers=args.freeze_text_layers, amp=not args.no_amp,
            num_workers=args.workers, seed=args.seed)
    except ValueError as exc:
        raise CLIError(str(exc)) from exc
    # an OSError the checks could not foresee (a disk, a permission) is one line in main
    result = finetune_clip(args.clip_model, args.data, args.out, config, device=args.device,
                           resume=args.resume, overwrite=args.overwrite,
                           progress=tqdm_progress("fine-tuning"),
                           log=lambda line: print(line, file=sys.stderr))
    print(f"{result.n_train} training and {result.n_val} validation pairs "
          f"({result.n_dropped} dropped: caption too short). Best epoch: {result.best_epoch}.")
    print(f"Saved the fine-tuned model in {result.out_dir}; use it with "
          f"--clip-model local-dir:{result.out_dir}")
    return 0


def _inputs(*groups):
    folders, files = [], []
    for more_folders, more_files in groups:
        folders += more_folders
        files += more_files
    return folders, files


def _check_json_out(out: Path, folders, files, overwrite: bool) -> None:
    """A result file may be new anywhere (a fine-tuned model's folder included), but never
    one of the input's files, and an existing file only with --overwrite."""
    real = Path(os.path.realpath(out))
    for folder, what in folders:
        inside = Path(os.path.realpath(folder))
        if out.exists() and (real == inside or inside in real.parents):
            raise CLIError(f"-o {out} is a file of the {what} {folder}; evaluation never "
                           "replaces its input. Choose a new file name.")
    for file, what in files:
        if real == Path(os.path.realpath(file)):
            raise CLIError(f"-o {out} is the {what}; evaluation never replaces its input. "
                           "Choose a new file name.")
    if out.exists() and not overwrite:
        raise CLIError(f"{out} exists; pass --overwrite to replace it, or choose another name.")


def run_eval_retrieval(args: argparse.Namespace) -> int:
    from ..core.io import write_text
    from ..core.models import check_model_sources, load_clip
    from ..finetune.data import clean_pairs, read_pairs
    from ..finetune.retrieval import evaluate_retrieval
    from ..finetune.train import clip_inputs, data_inputs

    if args.batch_size < 2 or args.repeats < 1:
        raise CLIError(f"--batch-size must be at least 2 and --repeats at least 1; got "
                       f"{args.batch_size} and {args.repeats}.")
    raw = read_pairs(args.data, log=lambda line: print(line, file=sys.stderr))
    pairs, dropped = clean_pairs(raw, args.min_caption_chars)
    if len(pairs) < 2:
        raise CLIError(f"{args.data}: fewer than 2 pairs to evaluate.")
    out = Path(args.out).expanduser() if args.out else None
    if out is not None:
        if out.is_dir():
            raise CLIError(f"-o {out} is a folder; give a .json file name.")
        _check_json_out(out, *_inputs(clip_inputs(args.clip_model),
                                      data_inputs(args.data, raw)), args.overwrite)
    check_model_sources(clip_model=args.clip_model, device=args.device)
    clip = load_clip(args.clip_model, args.device)
    if out is not None:
        _check_json_out(out, *clip_inputs(args.clip_model, clip), args.overwrite)
    result = evaluate_retrieval(clip, pairs, batch_size=args.batch_size, repeats=args.repeats,
                                seed=args.seed, progress=tqdm_progress("embedding"))
    print(f"{clip.source}: {len(pairs)} pairs ({dropped} dropped), batches of "
          f"{result.batch_size}, {result.repeats} repeats")
    for name in ("i2t@1", "i2t@2", "t2i@1", "t2i@2"):
        direction = "image->text" if name.startswith("i2t") else "text->image"
        print(f"  {direction} top-{name[-1]}: {100 * result.mean[name]:6.2f} % "
              f"+- {100 * result.std[name]:.2f}")
    if out is not None:
        write_text(out, json.dumps({"model": clip.source, "data": str(args.data),
                                    **result.to_dict()}, indent=2) + "\n")
        print(f"Saved {out}")
    return 0
