"""The ``medclipsam`` command: zero-shot segmentation and evaluation over folders.

    medclipsam segment IMAGES... --prompt TEXT [--prompt-file JSON] -o OUT
    medclipsam evaluate --pred DIR --gt DIR
    medclipsam finetune-clip DATA -o OUT [--loss dhn-nce] [--resume]
    medclipsam eval-retrieval DATA [--clip-model MODEL]
    medclipsam nnunet export --images DIR --masks DIR --dataset-id N --name NAME --out RAW
    medclipsam nnunet train --dataset-id N [--epochs E --cycles D --checkpoints-per-cycle G]
    medclipsam nnunet predict --dataset-id N --input DIR -o OUT
    medclipsam nnunet status|cancel --dataset-id N

Run ``medclipsam COMMAND --help`` for every flag. Outputs of ``segment`` (per image
``NAME``, paired with prompts and ground truth by file name, never by listing order)::

    OUT/saliency/NAME.tif      float32 saliency in [0, 1] (Z, Y, X for volumes)
    OUT/coarse/NAME.png        coarse mask, 0/255 (NIfTI for volumes)
    OUT/prompts/NAME.json      boxes (XYXY pixels), points (XY), labels, components
    OUT/masks/NAME.png         final SAM mask, 0/255 (NAME.nii.gz for volumes)
    OUT/manifest.json          prompts, models and their hashes, all parameters, versions
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .core.config import (
    BOX_MODES,
    DEFAULT_CLIP_MODEL,
    DEFAULT_SAM_MODEL,
    PROMPT_MODES,
    RANK_BY,
    THRESHOLD_METHODS,
    CoarseMaskConfig,
    PipelineConfig,
    PromptConfig,
    SaliencyConfig,
    SamConfig,
)
from .core.errors import InputError
from .nnunet.schedule import EnsembleSchedule

logger = logging.getLogger("medclipsam")


class CLIError(Exception):
    """A user mistake: printed as one clear line, exit status 2."""


# --------------------------------------------------------------------------- arguments


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("models")
    g.add_argument("--clip-model", default=None,
                   help=f"CLIP: 'hf-hub:ORG/NAME', 'local-dir:PATH' or a checkpoint file "
                        f"(default {DEFAULT_CLIP_MODEL}).")
    g.add_argument("--sam-model", default=None, choices=("vit_b", "vit_l", "vit_h", "medsam"),
                   help=f"SAM backbone (default {DEFAULT_SAM_MODEL}; medsam is MedSAM ViT-B).")
    g.add_argument("--sam-checkpoint", default=None, metavar="PATH",
                   help="Local SAM/MedSAM .pth (default: download the official one, "
                        "hash-checked, into $MEDCLIPSAM_HOME).")
    g.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:N or mps (default: CUDA, then MPS, then CPU).")


def _add_chain_flags(p: argparse.ArgumentParser) -> None:
    s, c, q, m = SaliencyConfig(), CoarseMaskConfig(), PromptConfig(), SamConfig()
    g = p.add_argument_group("saliency (M2IB)")
    g.add_argument("--layer", type=int, help=f"ViT block of the bottleneck (default {s.layer}; "
                                             "9 for breast/brain in the paper's scripts).")
    g.add_argument("--beta", type=float, help=f"compression weight (default {s.beta}).")
    g.add_argument("--steps", type=int, help=f"optimisation steps (default {s.steps}).")
    g.add_argument("--lr", type=float, help=f"learning rate (default {s.lr}).")
    g.add_argument("--batch-size", type=int, help=f"noise samples per step (default "
                                                  f"{s.batch_size}).")
    g.add_argument("--seed", type=int, help=f"seed of the noise and point sampling "
                                            f"(default {s.seed}).")
    g = p.add_argument_group("coarse mask")
    g.add_argument("--threshold-method", choices=THRESHOLD_METHODS,
                   help=f"default {c.method} (the paper); kmeans as the authors' scripts.")
    g.add_argument("--threshold", type=float, help=f"for --threshold-method fixed "
                                                   f"(default {c.threshold}).")
    g.add_argument("--eta-c", type=float, help=f"keep components with confidence > eta_c "
                                               f"(default {c.eta_c}).")
    g.add_argument("--top-k", type=int, help=f"keep the K best components; 0 keeps all "
                                             f"(default {c.top_k}; 2 for lungs).")
    g.add_argument("--rank-by", choices=RANK_BY, help=f"default {c.rank_by}.")
    g.add_argument("--min-area", type=int, help=f"drop smaller components (default "
                                                f"{c.min_area}).")
    g.add_argument("--kmeans-size", type=int, help=f"default {c.kmeans_size}.")
    g = p.add_argument_group("prompts")
    g.add_argument("--prompt-mode", choices=PROMPT_MODES, help=f"default {q.mode}.")
    g.add_argument("--box-mode", choices=BOX_MODES, help=f"default {q.box_mode}.")
    g.add_argument("--n-positive", type=int, help=f"default {q.n_positive}.")
    g.add_argument("--n-negative", type=int, help=f"default {q.n_negative}.")
    g.add_argument("--box-margin", type=int, help=f"default {q.box_margin}.")
    g = p.add_argument_group("SAM")
    g.add_argument("--keep-largest", type=int,
                   help="keep the N largest components of SAM's mask; -1 keeps all; default: "
                        "the coarse mask's --top-k.")
    g.add_argument("--multimask", action="store_true", default=None,
                   help=f"ask SAM for 3 masks and keep the best (default "
                        f"{m.multimask_output}).")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medclipsam",
        description="Text-driven medical image segmentation (MedCLIP-SAMv2): BiomedCLIP M2IB "
                    "saliency -> coarse mask -> SAM.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug logs.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    seg = sub.add_parser("segment", help="zero-shot segmentation of images or volumes.",
                         description="Segment what a text prompt describes, image by image.")
    seg.add_argument("images", nargs="+", metavar="IMAGES",
                     help="image files (PNG/JPEG/TIFF, NIfTI, DICOM) or folders of them.")
    seg.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                     help="what to find; repeat for a prompt ensemble (embeddings averaged).")
    seg.add_argument("--prompt-file", metavar="JSON",
                     help="JSON mapping file name (or name without suffix) -> prompt or list "
                          "of prompts; key 'default' for the rest.")
    seg.add_argument("-o", "--out", required=True, metavar="OUT", help="output folder.")
    seg.add_argument("--overwrite", action="store_true",
                     help="replace existing outputs in OUT (default: refuse).")
    seg.add_argument("--volume", action="store_true",
                     help="process 3-D volumes slice by slice (axis 0 = Z, axial for NIfTI).")
    seg.add_argument("--window", metavar="C,W",
                     help="intensity window centre,width for non-8-bit data (e.g. -600,1500 "
                          "for CT lungs); default: 0.5-99.5 percentiles.")
    seg.add_argument("--config", metavar="JSON",
                     help="start from the parameters of a saved run manifest or config; "
                          "flags override it.")
    _add_model_flags(seg)
    _add_chain_flags(seg)

    ev = sub.add_parser("evaluate", help="DSC and NSD of predicted masks against ground truth.")
    ev.add_argument("--pred", required=True, metavar="DIR", help="predicted masks.")
    ev.add_argument("--gt", required=True, metavar="DIR", help="ground-truth masks.")
    ev.add_argument("-o", "--out", metavar="CSV",
                    help="where to save per-image scores (default PRED/evaluation.csv).")
    ev.add_argument("--tolerance", type=float, default=2.0,
                    help="NSD tolerance in pixels (default 2).")
    ev.add_argument("--spacing", type=float, default=1.0, help="pixel spacing (default 1).")
    _add_finetune_parsers(sub)
    _add_nnunet_parsers(sub)
    return parser


def _add_clip_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--clip-model", default=DEFAULT_CLIP_MODEL,
                   help=f"CLIP: 'hf-hub:ORG/NAME', 'local-dir:PATH' or a checkpoint file "
                        f"(default {DEFAULT_CLIP_MODEL}).")
    g.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:N or mps (default: CUDA, then MPS, then CPU).")


def _add_finetune_parsers(sub) -> None:
    from .finetune.data import MIN_CAPTION_CHARS
    from .finetune.train import LOSS_NAMES

    ft = sub.add_parser(
        "finetune-clip", help="fine-tune BiomedCLIP on image-caption pairs (DHN-NCE).",
        description="Fine-tune a CLIP on image-caption pairs. DATA is a CSV with a header "
                    "(path,caption) or a folder of images with same-name .txt captions. OUT "
                    "becomes a folder that --clip-model local-dir:OUT loads.")
    ft.add_argument("data", metavar="DATA", help="CSV file or folder of image-caption pairs.")
    ft.add_argument("-o", "--out", required=True, metavar="OUT", help="output folder.")
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
    ft.add_argument("--overwrite", action="store_true", help="start OUT again from scratch.")
    _add_clip_flags(ft)

    rt = sub.add_parser(
        "eval-retrieval", help="top-1/top-2 image<->text retrieval accuracy.",
        description="Retrieval accuracy in shuffled batches of 50, repeated 5 times (the "
                    "paper's ROCO protocol): mean and std of top-1/top-2 image->text and "
                    "text->image accuracy.")
    rt.add_argument("data", metavar="DATA", help="CSV file or folder of image-caption pairs.")
    rt.add_argument("--batch-size", type=int, default=50, help="default 50.")
    rt.add_argument("--repeats", type=int, default=5, help="default 5.")
    rt.add_argument("--seed", type=int, default=0, help="shuffling seed.")
    rt.add_argument("--min-caption-chars", type=int, default=0,
                    help="drop captions shorter than this after cleaning (default 0: keep all).")
    rt.add_argument("-o", "--out", metavar="JSON", help="also save the result as JSON.")
    _add_clip_flags(rt)


def _add_nnunet_parsers(sub) -> None:
    nn = sub.add_parser(
        "nnunet", help="weak supervision: export pseudo-labels, train nnU-Net with checkpoint "
                       "ensembling, predict with an uncertainty map.",
        description="nnU-Net v2 weak supervision (MedCLIP-SAMv2). nnU-Net's folders come from "
                    "--raw/--preprocessed/--results or $nnUNet_raw, $nnUNet_preprocessed, "
                    "$nnUNet_results.")
    nsub = nn.add_subparsers(dest="nnunet_command", metavar="ACTION")

    def folders(p, raw=True):
        g = p.add_argument_group("nnU-Net folders (default: the nnUNet_* environment variables)")
        if raw:
            g.add_argument("--raw", metavar="DIR", help="nnUNet_raw.")
        g.add_argument("--preprocessed", metavar="DIR", help="nnUNet_preprocessed.")
        g.add_argument("--results", metavar="DIR", help="nnUNet_results.")

    def dataset(p):
        p.add_argument("--dataset-id", type=int, required=True, metavar="N",
                       help="the dataset's number (Dataset{N:03d}_NAME).")

    ex = nsub.add_parser("export", help="images + masks -> a raw nnU-Net v2 dataset.",
                         description="Pair images with masks by file name (case.png <-> "
                                     "case.png or case_mask.png) and write "
                                     "OUT/Dataset{ID:03d}_{NAME}; nnU-Net's integrity check "
                                     "runs on it. Nothing is overwritten.")
    ex.add_argument("--images", required=True, metavar="DIR", help="folder of images.")
    ex.add_argument("--masks", required=True, metavar="DIR",
                    help="folder of masks (e.g. medclipsam segment's OUT/masks).")
    dataset(ex)
    ex.add_argument("--name", required=True, help="dataset name (letters, digits, _ and -).")
    ex.add_argument("--out", metavar="RAW_DIR", help="nnU-Net raw folder (default $nnUNet_raw).")
    ex.add_argument("--label-name", default="target", help="name of label 1 (e.g. tumor).")
    ex.add_argument("--channel-name", default=None,
                    help="input channel name; 'CT' makes nnU-Net use CT normalisation (HU "
                         "data), anything else z-score (default 'image').")
    ex.add_argument("--corrected", action="store_true",
                    help="record these masks as corrected by hand (default: raw zero-shot).")
    ex.add_argument("--append", action="store_true",
                    help="add the cases to an existing dataset with this ID.")
    ex.add_argument("--no-verify", action="store_true",
                    help="skip nnU-Net's verify_dataset_integrity.")

    d = EnsembleSchedule()
    tr = nsub.add_parser("train", help="plan, preprocess and train in the background.",
                         description="Start nnU-Net planning, preprocessing and training with "
                                     "checkpoint ensembling as a background process (it goes "
                                     "on after this command returns; watch it with 'status', "
                                     "stop it with 'cancel', continue with --resume).")
    dataset(tr)
    g = tr.add_argument_group("checkpoint ensembling")
    g.add_argument("--epochs", type=int, help=f"E, total epochs (default {d.epochs}).")
    g.add_argument("--cycles", type=int, help=f"D, learning-rate cycles (default {d.cycles}).")
    g.add_argument("--checkpoints-per-cycle", type=int,
                   help=f"G_d, last checkpoints kept per cycle (default "
                        f"{d.checkpoints_per_cycle}).")
    g.add_argument("--iterations-per-epoch", type=int,
                   help=f"default {d.iterations_per_epoch} (nnU-Net's).")
    g.add_argument("--val-iterations-per-epoch", type=int,
                   help=f"default {d.val_iterations_per_epoch}.")
    g.add_argument("--lr", type=float, help=f"maximum learning rate (default {d.lr_max}).")
    g.add_argument("--lr-min", type=float,
                   help=f"learning rate at the end of each cycle (default {d.lr_min}).")
    tr.add_argument("--configuration", default="2d", choices=("2d", "3d_fullres"),
                    help="nnU-Net configuration (default 2d, the paper's).")
    tr.add_argument("--device", default="auto", choices=("auto", "cuda", "mps", "cpu"),
                    help="default auto: CUDA, then MPS, then CPU.")
    tr.add_argument("--data-workers", type=int, default=None,
                    help="nnU-Net's augmentation processes (nnUNet_n_proc_DA; default: "
                         "nnU-Net's choice).")
    tr.add_argument("--resume", action="store_true",
                    help="continue a cancelled or crashed run from its last epoch.")
    tr.add_argument("--restart", action="store_true",
                    help="delete this dataset's previous training and start over.")
    tr.add_argument("--wait", action="store_true",
                    help="follow the progress here until the run ends (Ctrl-C stops "
                         "following, not the training).")
    folders(tr)

    pr = nsub.add_parser("predict", help="ensemble prediction + uncertainty of a folder.",
                         description="Predict every image in INPUT with all ensemble "
                                     "checkpoints: OUT/masks, OUT/probability (mean softmax), "
                                     "OUT/uncertainty (entropy in nats, 0..ln C) and "
                                     "OUT/uncertainty_ranking.csv (most uncertain first).")
    dataset(pr)
    pr.add_argument("--input", required=True, metavar="DIR",
                    help="images of the dataset's file type (case.png or case_0000.png).")
    pr.add_argument("-o", "--out", required=True, metavar="OUT", help="output folder.")
    pr.add_argument("--threshold", type=float, default=0.5,
                    help="foreground probability threshold (default 0.5).")
    pr.add_argument("--checkpoints", nargs="+", metavar="PTH",
                    help="use these checkpoints (default: all of fold_all/ensemble).")
    pr.add_argument("--configuration", default="2d", choices=("2d", "3d_fullres"))
    pr.add_argument("--device", default="auto", choices=("auto", "cuda", "mps", "cpu"))
    pr.add_argument("--no-mirroring", action="store_true",
                    help="no mirroring test-time augmentation (4x faster in 2-D).")
    pr.add_argument("--overwrite", action="store_true", help="write into a non-empty OUT.")
    folders(pr)

    st = nsub.add_parser("status", help="phase, epoch, cycle, loss, ETA and log tail.")
    dataset(st)
    st.add_argument("--json", action="store_true", help="print the status as JSON.")
    st.add_argument("--lines", type=int, default=10, help="log lines to show (default 10).")
    folders(st)

    ca = nsub.add_parser("cancel", help="stop a running training (its whole process tree).")
    dataset(ca)
    folders(ca)


def config_from_args(args: argparse.Namespace) -> PipelineConfig:
    """PipelineConfig from defaults, an optional --config file, then explicit flags."""
    base = PipelineConfig()
    if getattr(args, "config", None):
        path = Path(args.config)
        if not path.is_file():
            raise CLIError(f"--config {path}: file not found.")
        data = json.loads(path.read_text())
        data = data.get("config", data)  # a run manifest holds it under "config"
        try:
            base = PipelineConfig.from_dict(data)
        except (TypeError, ValueError) as exc:
            raise CLIError(f"--config {path}: {exc}") from exc

    def pick(obj, **mapping):
        changes = {k: v for k, v in mapping.items() if v is not None}
        return dataclasses.replace(obj, **changes) if changes else obj

    a = args
    try:
        saliency = pick(base.saliency, layer=a.layer, beta=a.beta, steps=a.steps, lr=a.lr,
                        batch_size=a.batch_size, seed=a.seed)
        top_k = None if a.top_k == 0 else a.top_k
        coarse = pick(base.coarse, method=a.threshold_method, threshold=a.threshold,
                      eta_c=a.eta_c, rank_by=a.rank_by, min_area=a.min_area,
                      kmeans_size=a.kmeans_size)
        if a.top_k is not None:
            coarse = dataclasses.replace(coarse, top_k=top_k)
        prompts = pick(base.prompts, mode=a.prompt_mode, box_mode=a.box_mode,
                       n_positive=a.n_positive, n_negative=a.n_negative,
                       box_margin=a.box_margin, seed=a.seed)
        keep = None if a.keep_largest == -1 else a.keep_largest
        sam = base.sam
        if a.keep_largest is not None:
            sam = dataclasses.replace(sam, keep_largest=keep)
        sam = pick(sam, multimask_output=a.multimask)
        return dataclasses.replace(
            base, clip_model=a.clip_model or base.clip_model,
            sam_model=a.sam_model or base.sam_model,
            sam_checkpoint=a.sam_checkpoint or base.sam_checkpoint,
            device=a.device or base.device, saliency=saliency, coarse=coarse,
            prompts=prompts, sam=sam)
    except ValueError as exc:
        raise CLIError(str(exc)) from exc


# --------------------------------------------------------------------------- segment


def collect_images(items: Sequence[str]) -> list[Path]:
    """Files given, and supported files inside given folders (sorted by name)."""
    from .core.io import SUPPORTED

    files: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir()
                           if p.is_file() and p.name.lower().endswith(SUPPORTED)
                           and not p.name.startswith("."))
            if not found:
                raise CLIError(f"{path}: no images found (supported: {', '.join(SUPPORTED)}).")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise CLIError(f"{path}: no such file or folder.")
    return files


def resolve_prompts(files: Sequence[Path], prompt: list[str] | None,
                    prompt_file: str | None) -> dict[Path, list[str]]:
    """Each image's prompt(s), paired by file name (then by name without suffix)."""
    from .core.io import file_stem

    mapping: dict[str, Any] = {}
    if prompt_file:
        path = Path(prompt_file)
        if not path.is_file():
            raise CLIError(f"--prompt-file {path}: file not found.")
        try:
            mapping = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise CLIError(f"--prompt-file {path}: not valid JSON ({exc}).") from exc
        if not isinstance(mapping, dict):
            raise CLIError(f"--prompt-file {path}: expected an object mapping file names to "
                           "prompts.")
    default = prompt or mapping.get("default")
    result: dict[Path, list[str]] = {}
    missing = []
    used = set()
    for f in files:
        for key in (f.name, file_stem(f)):
            if key in mapping:
                value, _ = mapping[key], used.add(key)
                break
        else:
            value = default
        texts = [value] if isinstance(value, str) else list(value or [])
        texts = [t.strip() for t in texts if isinstance(t, str) and t.strip()]
        if not texts:
            missing.append(f.name)
        result[f] = texts
    if missing:
        raise CLIError(f"No prompt for {len(missing)} image(s): {', '.join(missing[:10])}"
                       f"{' ...' if len(missing) > 10 else ''}. Give --prompt TEXT or add them "
                       "to --prompt-file.")
    unused = sorted(set(mapping) - used - {"default"})
    if unused:
        logger.warning("--prompt-file entries that match no image: %s", ", ".join(unused[:10]))
    return result


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "napari-medclipsam": __version__}
    for pkg in ("torch", "open_clip_torch", "segment-anything", "timm", "transformers", "numpy",
                "scikit-image"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _outputs(out: Path, stem: str, volume: bool) -> dict[str, Path]:
    ext = ".nii.gz" if volume else ".png"
    return {"saliency": out / "saliency" / f"{stem}.tif",
            "coarse": out / "coarse" / f"{stem}{ext}",
            "prompts": out / "prompts" / f"{stem}.json",
            "mask": out / "masks" / f"{stem}{ext}"}


def _prompts_json(result) -> dict[str, Any]:
    return {**result.prompts.to_dict(),
            "components": [dataclasses.asdict(c) for c in result.coarse.components],
            "threshold": result.coarse.threshold,
            "n_candidates": result.coarse.n_candidates,
            "found": result.found, "message": result.message}


def run_segment(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .core.io import Window, file_stem, write_text
    from .core.pipeline import ZeroShotPipeline

    config = config_from_args(args)
    files = collect_images(args.images)
    stems: dict[str, Path] = {}
    for f in files:
        stem = file_stem(f)
        if stem in stems:
            raise CLIError(f"Two inputs share the name {stem!r} ({stems[stem]} and {f}); outputs "
                           "are named after inputs, so rename one.")
        stems[stem] = f
    prompts = resolve_prompts(files, args.prompt, args.prompt_file)
    window = Window.parse(args.window) if args.window else None
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"-o {out} exists and is not a folder.")
    manifest_path = out / "manifest.json"
    if not args.overwrite:
        clash = [p for f in files for p in _outputs(out, file_stem(f), True).values()
                 if p.exists()]
        clash += [p for f in files for p in _outputs(out, file_stem(f), False).values()
                  if p.exists()]
        if manifest_path.exists():
            clash.append(manifest_path)
        if clash:
            raise CLIError(f"{len(clash)} output file(s) already exist in {out} (e.g. "
                           f"{clash[0]}); choose another -o folder or pass --overwrite.")

    pipeline = ZeroShotPipeline(config)
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    entries = []
    n_found = 0
    bar = tqdm(files, desc="segment", unit="image", file=sys.stderr, disable=None)
    failed: list[str] = []
    for f in bar:
        bar.set_postfix_str(f.name)
        t0 = time.perf_counter()
        try:
            entry = _segment_one(pipeline, f, prompts[f], out, window, args.volume)
        except InputError as exc:  # one bad file must not lose the others' results
            print(f"{f.name}: error: {exc}", file=sys.stderr)
            failed.append(f.name)
            entries.append({"image": str(f), "name": file_stem(f), "prompt": prompts[f],
                            "error": str(exc)})
            continue
        n_found += entry["found"]
        if not entry["found"]:
            print(f"{f.name}: {entry['message']}", file=sys.stderr)
        entry["seconds"] = round(time.perf_counter() - t0, 3)
        entries.append(entry)

    manifest = {
        "tool": "napari-medclipsam", "command": "segment", "started": started,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "config": config.to_dict(),
        "window": dataclasses.asdict(window) if window else "auto (0.5-99.5 percentiles)",
        "models": {"clip": {"source": config.clip_model, "id": pipeline.clip.model_id,
                            "sha256": pipeline.clip.weights_sha256},
                   "sam": {"name": config.sam_model, "id": pipeline.sam.model_id,
                           "checkpoint": pipeline.sam.checkpoint,
                           "sha256": pipeline.sam.checkpoint_sha256},
                   "device": pipeline.clip.device},
        "versions": _versions(), "images": entries,
    }
    write_text(manifest_path, json.dumps(manifest, indent=2, default=str))
    done = len(files) - len(failed)
    print(f"Segmented {done} image(s), something found in {n_found}; results in {out}")
    if failed:
        print(f"{len(failed)} image(s) failed (see the errors above and manifest.json): "
              f"{', '.join(failed[:10])}", file=sys.stderr)
        return 1
    return 0


def _segment_one(pipeline, f: Path, texts: list[str], out: Path, window, volume: bool
                 ) -> dict[str, Any]:
    from .core.io import (
        file_stem,
        read_image,
        write_float_tiff,
        write_mask_png,
        write_nifti_like,
        write_text,
    )

    image = read_image(f)
    stem = file_stem(f)
    if image.is_volume and not volume:
        raise InputError(f"{f.name} is a 3-D volume {image.data.shape}; pass --volume to "
                         "process it slice by slice.")
    paths = _outputs(out, stem, image.is_volume)
    win = window or image.meta.get("window")
    if image.is_volume:
        res = pipeline.segment_volume(image.data, texts, window=win)
        write_float_tiff(paths["saliency"], res.saliency)
        write_nifti_like(paths["coarse"], res.coarse, image)
        write_nifti_like(paths["mask"], res.mask, image)
        write_text(paths["prompts"], json.dumps(
            {"slices": {str(z): p.to_dict() for z, p in res.prompts.items()},
             "found_slices": res.found_slices}, indent=2))
        found = bool(res.found_slices)
        message = f"found on {len(res.found_slices)} of {image.data.shape[0]} slices"
    else:
        res = pipeline.segment(image.data, texts, window=win)
        write_float_tiff(paths["saliency"], res.saliency)
        write_mask_png(paths["coarse"], res.coarse.mask)
        write_text(paths["prompts"], json.dumps(_prompts_json(res), indent=2))
        write_mask_png(paths["mask"], res.mask)
        found, message = res.found, res.message
    return {"image": str(f), "name": stem, "prompt": texts, "found": found,
            "message": message,
            "outputs": {k: str(v.relative_to(out)) for k, v in paths.items()}}


# --------------------------------------------------------------------------- evaluate


def _read_mask(path: Path) -> np.ndarray:
    from .core.io import read_image

    return np.asarray(read_image(path).data) > 0


def run_evaluate(args: argparse.Namespace) -> int:
    from .core.io import SUPPORTED, file_stem, write_text
    from .core.metrics import dice, nsd, resize_nearest

    pred_dir, gt_dir = Path(args.pred), Path(args.gt)
    for d, flag in ((pred_dir, "--pred"), (gt_dir, "--gt")):
        if not d.is_dir():
            raise CLIError(f"{flag} {d}: not a folder.")

    def index(d: Path) -> dict[str, Path]:
        return {file_stem(p): p for p in sorted(d.iterdir())
                if p.is_file() and p.name.lower().endswith(SUPPORTED)
                and not p.name.startswith(".")}

    preds, gts = index(pred_dir), index(gt_dir)
    if not gts:
        raise CLIError(f"--gt {gt_dir}: no mask files found.")
    common = sorted(set(preds) & set(gts))
    if not common:
        raise CLIError(f"No file names in common between {pred_dir} and {gt_dir}; predictions "
                       "are paired with ground truth by name.")
    missing = sorted(set(gts) - set(preds))
    extra = sorted(set(preds) - set(gts))
    rows = []
    for name in sorted(gts):
        gt = _read_mask(gts[name])
        if name in preds:
            pred = _read_mask(preds[name])
            if pred.ndim == 3 and gt.ndim == 2 and pred.shape[-1] in (3, 4):
                pred = pred.any(axis=-1)
            if pred.shape != gt.shape:
                pred = resize_nearest(pred, gt.shape)
            status = "ok"
        else:
            pred = np.zeros_like(gt)
            status = "missing prediction (scored as empty)"
        rows.append({"name": name, "dsc": dice(pred, gt),
                     "nsd": nsd(pred, gt, tolerance=args.tolerance, spacing=args.spacing),
                     "status": status})
    mean_dsc = float(np.mean([r["dsc"] for r in rows]))
    mean_nsd = float(np.mean([r["nsd"] for r in rows]))
    width = max(len(r["name"]) for r in rows)
    print(f"{'image':<{width}}  {'DSC':>7}  {'NSD':>7}")
    for r in rows:
        note = "" if r["status"] == "ok" else f"  {r['status']}"
        print(f"{r['name']:<{width}}  {r['dsc']:7.4f}  {r['nsd']:7.4f}{note}")
    print(f"{'mean':<{width}}  {mean_dsc:7.4f}  {mean_nsd:7.4f}   ({len(rows)} images, NSD "
          f"tolerance {args.tolerance:g} px, spacing {args.spacing:g})")
    if missing:
        print(f"warning: {len(missing)} ground-truth mask(s) have no prediction: "
              f"{', '.join(missing[:10])}", file=sys.stderr)
    if extra:
        print(f"warning: {len(extra)} prediction(s) have no ground truth and were ignored: "
              f"{', '.join(extra[:10])}", file=sys.stderr)
    out = Path(args.out) if args.out else pred_dir / "evaluation.csv"
    lines = ["name,dsc,nsd,status"] + [f"{r['name']},{r['dsc']:.6f},{r['nsd']:.6f},{r['status']}"
                                       for r in rows]
    lines.append(f"mean,{mean_dsc:.6f},{mean_nsd:.6f},{len(rows)} images")
    write_text(out, "\n".join(lines) + "\n")
    write_text(out.with_suffix(".json"), json.dumps(
        {"mean_dsc": mean_dsc, "mean_nsd": mean_nsd, "tolerance": args.tolerance,
         "spacing": args.spacing, "images": rows, "missing": missing, "ignored": extra},
        indent=2))
    print(f"Saved {out} and {out.with_suffix('.json')}")
    return 0


# --------------------------------------------------------------------------- fine-tuning


def _tqdm_progress(desc: str):
    from tqdm.auto import tqdm

    bar = {"bar": None}

    def update(step: int, total: int) -> None:
        if bar["bar"] is None:
            bar["bar"] = tqdm(total=total, initial=step - 1, desc=desc, unit="step",
                              disable=None)
        bar["bar"].update(step - bar["bar"].n)
        if step >= total:
            bar["bar"].close()

    return update


def run_finetune(args: argparse.Namespace) -> int:
    from .finetune.train import FinetuneConfig, finetune_clip

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
    if args.resume and args.overwrite:
        raise CLIError("--resume and --overwrite exclude each other.")
    result = finetune_clip(args.clip_model, args.data, args.out, config, device=args.device,
                           resume=args.resume, overwrite=args.overwrite,
                           progress=_tqdm_progress("fine-tuning"),
                           log=lambda line: print(line, file=sys.stderr))
    print(f"{result.n_train} training and {result.n_val} validation pairs "
          f"({result.n_dropped} dropped: caption too short). Best epoch: {result.best_epoch}.")
    print(f"Saved the fine-tuned model in {result.out_dir}; use it with "
          f"--clip-model local-dir:{result.out_dir}")
    return 0


def run_eval_retrieval(args: argparse.Namespace) -> int:
    from .core.io import write_text
    from .core.models import load_clip
    from .finetune.data import clean_pairs, read_pairs
    from .finetune.retrieval import evaluate_retrieval

    pairs, dropped = clean_pairs(read_pairs(args.data), args.min_caption_chars)
    if len(pairs) < 2:
        raise CLIError(f"{args.data}: fewer than 2 pairs to evaluate.")
    clip = load_clip(args.clip_model, args.device)
    result = evaluate_retrieval(clip, pairs, batch_size=args.batch_size, repeats=args.repeats,
                                seed=args.seed, progress=_tqdm_progress("embedding"))
    print(f"{clip.source}: {len(pairs)} pairs ({dropped} dropped), batches of "
          f"{result.batch_size}, {result.repeats} repeats")
    for name in ("i2t@1", "i2t@2", "t2i@1", "t2i@2"):
        direction = "image->text" if name.startswith("i2t") else "text->image"
        print(f"  {direction} top-{name[-1]}: {100 * result.mean[name]:6.2f} % "
              f"+- {100 * result.std[name]:.2f}")
    if args.out:
        write_text(Path(args.out), json.dumps(
            {"model": clip.source, "data": str(args.data), **result.to_dict()}, indent=2) + "\n")
        print(f"Saved {args.out}")
    return 0


# --------------------------------------------------------------------------- nnunet


def _folders(args: argparse.Namespace, raw: str | None = None):
    from .nnunet.job import NnUNetFolders

    return NnUNetFolders.resolve(raw or getattr(args, "raw", None), args.preprocessed,
                                 args.results)


def run_nnunet(args: argparse.Namespace) -> int:
    import os

    from .nnunet import job

    cmd = args.nnunet_command
    if cmd is None:
        raise CLIError("choose an action: export, train, predict, status or cancel "
                       "(medclipsam nnunet --help).")
    if cmd == "export":
        from .nnunet.export import cases_from_folders, export_dataset, pair_images_and_masks

        raw = args.out or os.environ.get("nnUNet_raw")
        if not raw:
            raise CLIError("where to write the dataset: pass --out RAW_DIR or set nnUNet_raw.")
        n = len(pair_images_and_masks(args.images, args.masks))
        print(f"Exporting {n} image/mask pairs ...", file=sys.stderr)
        res = export_dataset(cases_from_folders(args.images, args.masks,
                                                corrected=args.corrected),
                             raw, args.dataset_id, args.name, label_name=args.label_name,
                             channel_name=args.channel_name, append=args.append,
                             verify=not args.no_verify)
        print(f"{'Added' if res.appended else 'Wrote'} {len(res.cases)} cases "
              f"({res.n_corrected} corrected, {res.n_zero_shot} zero-shot, "
              f"{res.file_ending}) to {res.folder}"
              + ("" if args.no_verify else "; nnU-Net's integrity check passed") + ".")
        if res.converted:
            shown = ", ".join(res.converted[:5]) + (" ..." if len(res.converted) > 5 else "")
            print(f"Note: {len(res.converted)} image(s) had other channels than the dataset "
                  f"(set by the first image) and were converted (colour -> gray by luminance, "
                  f"or gray -> RGB): {shown}. See medclipsam_cases.json.")
        print(f"Next: medclipsam nnunet train --dataset-id {args.dataset_id}")
        return 0
    folders = _folders(args)
    if cmd == "train":
        values = {"epochs": args.epochs, "cycles": args.cycles,
                  "checkpoints_per_cycle": args.checkpoints_per_cycle,
                  "iterations_per_epoch": args.iterations_per_epoch,
                  "val_iterations_per_epoch": args.val_iterations_per_epoch,
                  "lr_max": args.lr, "lr_min": args.lr_min}
        given = {k: v for k, v in values.items() if v is not None}
        saved = job.saved_schedule(job.job_dir_for(folders, args.dataset_id)) \
            if args.resume else None
        schedule = EnsembleSchedule(**{**(dataclasses.asdict(saved) if saved else {}),
                                       **given})
        job_dir = job.start_training(args.dataset_id, schedule, folders=folders,
                                     configuration=args.configuration, device=args.device,
                                     resume=args.resume, restart=args.restart,
                                     data_workers=args.data_workers)
        print(f"{'Resumed' if args.resume else 'Started'} training in the background: "
              f"{schedule.epochs} epochs in {schedule.cycles} cycles, "
              f"{schedule.n_checkpoints} ensemble checkpoints. Job folder: {job_dir}")
        print(f"Watch: medclipsam nnunet status --dataset-id {args.dataset_id}   "
              f"Stop: medclipsam nnunet cancel --dataset-id {args.dataset_id}")
        if args.wait:
            return _follow(job_dir)
        return 0
    if cmd == "predict":
        from .nnunet.ensemble import load_ensemble, predict_folder

        model_dir = job.model_dir_for(folders, args.dataset_id, args.configuration)
        predictor = load_ensemble(model_dir, args.checkpoints, device=args.device,
                                  threshold=args.threshold,
                                  use_mirroring=not args.no_mirroring)
        rows = predict_folder(predictor, args.input, args.out, overwrite=args.overwrite,
                              progress=_tqdm_progress("predicting"))
        print(f"Predicted {len(rows)} images with {len(predictor.checkpoint_paths)} "
              f"checkpoints into {args.out}. Most uncertain first (mean entropy, nats):")
        for r in rows[:5]:
            print(f"  {r['case']}: {r['mean_entropy']:.4f}")
        return 0
    job_dir = job.job_dir_for(folders, args.dataset_id)
    if cmd == "status":
        status = job.read_status(job_dir, log_lines=args.lines)
        if args.json:
            print(json.dumps(status, indent=2, default=str))
            return 0
        print(job.format_status(status, details=True))
        if status.get("log_tail"):
            print(status["log_tail"])
        return 0 if status.get("phase") != "failed" else 1
    if cmd == "cancel":
        if job.cancel(job_dir):
            print(f"Cancelled. Continue later with: medclipsam nnunet train --dataset-id "
                  f"{args.dataset_id} --resume")
        else:
            print("No training of this dataset is running.")
        return 0
    raise CLIError(f"unknown action {cmd}")


def _follow(job_dir) -> int:
    from .nnunet import job

    last = None
    try:
        while True:
            status = job.read_status(job_dir, log_lines=0)
            line = job.format_status(status, details=True)
            if line != last:
                print(line, file=sys.stderr)
                last = line
            if not status["running"]:
                return 0 if status.get("phase") == "done" else 1
            time.sleep(2.0)
    except KeyboardInterrupt:
        print("Stopped following; the training goes on.", file=sys.stderr)
        return 0


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    from .core.models import ModelUnavailableError

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s: %(message)s")
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "segment":
            return run_segment(args)
        if args.command == "evaluate":
            return run_evaluate(args)
        if args.command == "finetune-clip":
            return run_finetune(args)
        if args.command == "eval-retrieval":
            return run_eval_retrieval(args)
        if args.command == "nnunet":
            return run_nnunet(args)
    except (CLIError, InputError, ModelUnavailableError) as exc:
        print(f"medclipsam {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return 130
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
