"""``medclipsam vlsm train|predict|evaluate``: vision-language segmentation models (CLIPSeg,
BiomedCLIPSeg; after Poudel et al.'s medvlsm) fine-tuned on your labels, then used to segment.

    medclipsam vlsm train --arch clipseg --images DIR --masks DIR --class-name NAME
                          [--class-name NAME2 ...] --prompt-set p1,p6 -o MODEL_DIR
    medclipsam vlsm train --arch biomedclipseg --dataset RAW/Dataset001_X [--corrected-only]
                          --prompt-set p1 -o MODEL_DIR
    medclipsam vlsm predict --model MODEL_DIR --images DIR --prompt TEXT -o OUT
    medclipsam vlsm evaluate --model MODEL_DIR --images DIR --masks DIR --prompt TEXT -o OUT

**train** fine-tunes the decoder of a CLIPSeg (``--clipseg-model``) or of a BiomedCLIPSeg (the
``--clip-model`` CLIP's towers, the decoder random or copied from CLIPSeg's) on image/mask
folders (``--class-name`` per label value) or an nnU-Net raw dataset (a class per label), with
captions from the prompt levels ``--prompt-set`` (:mod:`napari_medclipsam.vlsm.prompts`) and
medvlsm's recipe (:mod:`napari_medclipsam.vlsm.train`). Flags, data, definitions and the
output folder are checked before any model loads, then the model sources. One line per epoch
on stderr; Ctrl-C or SIGTERM stops after the current batch and keeps the last finished epoch
in ``MODEL_DIR/checkpoint.pt`` (``--resume`` continues; flags left out then take the
checkpoint's values, flags given must match them). ``MODEL_DIR`` holds ``vlsm.json`` (the
model, where the data came from, the class names, the flags, the training history) and
``decoder.safetensors`` (the best epoch).

**predict** is ``medclipsam segment --method vlsm`` (:mod:`~napari_medclipsam.cli.segment`),
so it validates everything before work, keeps going past an image that fails (exit 1),
writes atomically, records every image in the manifest, resumes (``--resume``) and takes
volumes (``--volume``). ``--model`` is a trained folder or released CLIPSeg weights (a
Hugging Face id or ``local-dir:PATH``); no CLIP is loaded, SAM only with ``--refine-sam``.
The threshold defaults to the one recorded in the model folder (0.5 otherwise). Outputs::

    OUT/masks/NAME.png       the mask, 0/255 (NAME.nii.gz for volumes)
    OUT/saliency/NAME.tif    the VLSM's foreground probability, float32 in [0, 1]
    OUT/coarse/NAME.png      the probability above the threshold (the --top-k components)
    OUT/prompts/NAME.json    components, boxes, the prompt-faithfulness check
    OUT/manifest.json        the run: the VLSM (source, id, architecture, base models and
                             their hashes), parameters, an entry per image

The prompt-faithfulness check (on by default, ``--no-faithfulness``) compares the VLSM's map
of the prompt with its map of a neutral prompt.

**evaluate** predicts into ``OUT`` exactly as predict does, then scores ``OUT/masks`` against
``--masks`` (DSC, NSD: :func:`napari_medclipsam.core.evaluate.evaluate_folders`) into
``OUT/evaluation.csv`` and ``.json``, and prints the means in one line. ``-o`` must lie apart
from the images and masks folders.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from ..core.config import DEFAULT_VLSM_MODEL, PRECISIONS
from ..core.models import SAM_MODELS
from ..vlsm.config import ARCHS, DECODER_INITS, MODEL_FILE, VlsmTrainConfig, absolute_source
from ..vlsm.prompts import PROMPT_SETS
from .common import (
    CLIError,
    Terminated,
    add_faithfulness_flags,
    check_device,
    check_writable_folder,
    sigterm_as_interrupt,
    stop_requests,
    tqdm_progress,
)

__all__ = ["ARCH_CHOICES", "DECODER_INIT_CHOICES", "MODEL_RECORD", "TRAIN_DEFAULTS",
           "add_parser", "run_evaluate", "run_predict", "run_train", "run_vlsm"]

# vlsm.config is torch-free: the parser is built on every ``medclipsam`` call.
ARCH_CHOICES = ARCHS
DECODER_INIT_CHOICES = DECODER_INITS
MODEL_RECORD = MODEL_FILE
#: :class:`~napari_medclipsam.vlsm.config.VlsmTrainConfig`'s defaults (medvlsm's settings)
TRAIN_DEFAULTS: dict[str, Any] = {
    k: v for k, v in VlsmTrainConfig().to_dict().items()
    if k in ("prompt_sets", "epochs", "min_epochs", "patience", "batch_size", "lr",
             "weight_decay", "val_fraction", "threshold", "amp", "cache_gb", "seed")}
#: The flag of each training setting, for messages.
_FLAGS = {"prompt_sets": "--prompt-set", "epochs": "--epochs", "min_epochs": "--min-epochs",
          "patience": "--patience", "batch_size": "--batch-size", "lr": "--lr",
          "weight_decay": "--weight-decay", "val_fraction": "--val-fraction",
          "threshold": "--threshold", "amp": "--no-amp", "cache_gb": "--cache-gb",
          "seed": "--seed"}


def add_parser(sub) -> None:
    """Register ``vlsm`` and its actions (train, predict, evaluate) on the top-level
    subparsers."""
    vl = sub.add_parser(
        "vlsm", help="vision-language segmentation models (CLIPSeg, BiomedCLIPSeg): train on "
                     "your labels, predict, evaluate.",
        description="Vision-language segmentation models (after medvlsm): a frozen CLIP image "
                    "and text encoder and a light decoder that outputs the mask of the text. "
                    "train fine-tunes the decoder on image/mask folders or an nnU-Net dataset; "
                    "predict and evaluate segment with it (or with released CLIPSeg weights).")
    vl.set_defaults(func=run_vlsm)
    vsub = vl.add_subparsers(dest="vlsm_command", metavar="ACTION")
    _add_train_parser(vsub)
    pr = vsub.add_parser(
        "predict", help="segment images with a VLSM (segment --method vlsm).",
        description="Segment what the prompt names with a VLSM, image by image, with medclipsam "
                    "segment's machinery: everything is checked before work, an image that "
                    "fails is reported and the others go on, --resume continues a stopped run. "
                    "Outputs: OUT/masks (the masks), OUT/saliency (the VLSM's foreground "
                    "probability, float32 TIFF), OUT/coarse, OUT/prompts, OUT/manifest.json.")
    _add_predict_flags(pr)
    pr.set_defaults(vlsm_func=run_predict)
    ev = vsub.add_parser(
        "evaluate", help="predict, then DSC and NSD against ground-truth masks.",
        description="Predict into OUT exactly as 'vlsm predict' does (OUT/saliency holds the "
                    "VLSM's probability), then score OUT/masks against --masks (paired by "
                    "file name) into OUT/evaluation.csv and OUT/evaluation.json. OUT must lie "
                    "apart from the images and masks folders.")
    _add_predict_flags(ev, masks=True)
    ev.set_defaults(vlsm_func=run_evaluate)


def _add_train_parser(vsub) -> None:
    d = TRAIN_DEFAULTS
    tr = vsub.add_parser(
        "train", help="fine-tune a CLIPSeg or BiomedCLIPSeg decoder on labelled images.",
        description="Fine-tune a VLSM's decoder (the encoders stay frozen) on your labels, with "
                    "medvlsm's recipe (Dice + 0.2 BCE, AdamW, early stopping on validation "
                    "Dice; 15% of the cases, chosen by name, validate). MODEL_DIR must be new "
                    "or empty (or an earlier VLSM model with --resume/--overwrite) and apart "
                    "from the data. Ctrl-C stops after the current batch and keeps the last "
                    "finished epoch (--resume continues).")
    tr.add_argument("-o", "--out", required=True, metavar="MODEL_DIR",
                    help="the model folder to write (vlsm.json, decoder.safetensors, "
                         "checkpoint.pt).")
    tr.add_argument("--arch", choices=ARCH_CHOICES, default=None,
                    help="clipseg: CLIPSeg's CLIP and decoder (--clipseg-model); "
                         "biomedclipseg: the --clip-model CLIP's towers (BiomedCLIP by "
                         "default) and a new decoder (default clipseg; with --resume, the "
                         "checkpoint's).")
    g = tr.add_argument_group(
        "training data", "Either --images, --masks and --class-name, or --dataset.")
    g.add_argument("--images", metavar="DIR", help="folder of images (2-D, or volumes: their "
                                                   "labelled slices and as many empty ones).")
    g.add_argument("--masks", metavar="DIR",
                   help="folder of label files paired with the images by file name.")
    g.add_argument("--class-name", action="append", metavar="NAME",
                   help="what the masks show, as you would type it as a prompt: one name for "
                        "binary masks (every value > 0), or one per label value in order "
                        "(value 1 = the first name...); repeat the flag.")
    g.add_argument("--dataset", metavar="DIR",
                   help="an nnU-Net raw dataset (RAW/Dataset001_NAME, e.g. the training "
                        "dock's export): its labels name the classes.")
    g.add_argument("--corrected-only", action="store_true",
                   help="with --dataset: only the cases marked corrected in "
                        "medclipsam_cases.json.")
    g = tr.add_argument_group("captions")
    g.add_argument("--prompt-set", action="append", metavar="P1[,P6...]",
                   help=f"prompt levels the training captions are drawn from, among "
                        f"{', '.join(PROMPT_SETS)} (comma-separated or repeated; default "
                        f"{','.join(d['prompt_sets'])}): p1 the class name, p2-p6 add shape, "
                        "colour, size, count, location read from the mask, p7-p9 a "
                        "definition.")
    g.add_argument("--definitions", metavar="JSON",
                   help="class name -> definition or list of definitions, for p7-p9 (default: "
                        "the built-in ones, where the class has any).")
    g = tr.add_argument_group("models")
    g.add_argument("--clipseg-model", metavar="MODEL",
                   help=f"CLIPSeg weights: a Hugging Face id or 'local-dir:PATH' (default "
                        f"{DEFAULT_VLSM_MODEL}); with --arch biomedclipseg the decoder copied "
                        f"by --decoder-init clipseg.")
    g.add_argument("--clip-model", metavar="MODEL",
                   help="--arch biomedclipseg: the CLIP whose towers feed the decoder, "
                        "'hf-hub:ORG/NAME', 'local-dir:PATH' (e.g. a finetune-clip output) or "
                        "a checkpoint file (default BiomedCLIP).")
    g.add_argument("--decoder-init", choices=DECODER_INIT_CHOICES, default=None,
                   help="--arch biomedclipseg: a random decoder (medvlsm's BiomedCLIPSeg, the "
                        "default) or CLIPSeg's copied where the shapes agree.")
    g.add_argument("--extract-layers", metavar="3,6,9",
                   help="--arch biomedclipseg: the ViT blocks (0-based) feeding the decoder "
                        "(default 3,6,9 of 12, the same relative depths otherwise).")
    g.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:N or mps (default: CUDA, then MPS, then CPU).")
    g = tr.add_argument_group("training (defaults: medvlsm's)")
    g.add_argument("--epochs", type=int, help=f"at most this many epochs (default "
                                              f"{d['epochs']}; may be raised on --resume).")
    g.add_argument("--min-epochs", type=int,
                   help=f"never stop early before this epoch (default {d['min_epochs']}).")
    g.add_argument("--patience", type=int,
                   help=f"stop after this many epochs without a better validation Dice "
                        f"(default {d['patience']}).")
    g.add_argument("--batch-size", type=int, help=f"default {d['batch_size']}.")
    g.add_argument("--lr", type=float, help=f"AdamW learning rate (default {d['lr']}).")
    g.add_argument("--weight-decay", type=float, help=f"default {d['weight_decay']}.")
    g.add_argument("--val-fraction", type=float,
                   help=f"share of the cases that validate, chosen by name (default "
                        f"{d['val_fraction']}).")
    g.add_argument("--threshold", type=float,
                   help=f"probability above which a pixel is foreground, for the validation "
                        f"Dice and recorded as the model's (default {d['threshold']}).")
    g.add_argument("--cache-gb", type=float,
                   help=f"memory for the frozen encoders' outputs, computed once (default "
                        f"{d['cache_gb']}; 0: recompute every batch).")
    g.add_argument("--no-amp", action="store_true", default=None,
                   help="no fp16 mixed precision on a CUDA GPU.")
    g.add_argument("--seed", type=int, help=f"seed of the decoder's initialisation, the "
                                            f"shuffling and the captions (default {d['seed']}).")
    tr.add_argument("--resume", action="store_true",
                    help="continue MODEL_DIR's training after its last finished epoch (give "
                         "the same data; flags left out take the checkpoint's values).")
    tr.add_argument("--overwrite", action="store_true",
                    help="start again in MODEL_DIR, an earlier VLSM model (anything else in a "
                         "non-empty folder is refused).")
    tr.set_defaults(vlsm_func=run_train)


def _add_predict_flags(p: argparse.ArgumentParser, masks: bool = False) -> None:
    p.add_argument("--model", required=True, metavar="MODEL",
                   help=f"a folder written by 'medclipsam vlsm train', or released CLIPSeg "
                        f"weights: a Hugging Face id (e.g. {DEFAULT_VLSM_MODEL}) or "
                        "'local-dir:PATH'.")
    p.add_argument("--images", required=True, nargs="+", metavar="IMAGES",
                   help="image files (PNG/JPEG/TIFF/BMP, NIfTI, DICOM) or folders of them.")
    if masks:
        p.add_argument("--masks", required=True, metavar="DIR",
                       help="ground-truth masks, paired with the images by file name.")
    p.add_argument("--prompt", action="append", metavar="TEXT",
                   help="what to find (e.g. the class name the model was trained on); repeat "
                        "for a prompt ensemble (the probabilities averaged).")
    p.add_argument("--prompt-file", metavar="JSON",
                   help="JSON mapping file name (or name without suffix) -> prompt or list of "
                        "prompts; key 'default' for the rest.")
    p.add_argument("-o", "--out", required=True, metavar="OUT",
                   help="output folder (masks/, saliency/ = the probability, coarse/, "
                        "prompts/, manifest.json" + (", evaluation.csv)." if masks else ")."))
    p.add_argument("--threshold", type=float, metavar="T",
                   help="probability above which a pixel is foreground, in (0, 1) (default: "
                        "the one recorded in the model folder, else 0.5).")
    p.add_argument("--top-k", type=int, metavar="K",
                   help="keep the K most confident components of the mask; 0 keeps all "
                        "(default 0: the whole thresholded mask, as medvlsm scores it).")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing outputs in OUT (default: refuse).")
    p.add_argument("--resume", action="store_true",
                   help="continue a stopped run in OUT: keep the images whose outputs are "
                        "complete and were made with the same model, settings, prompt and "
                        "input file; redo the others.")
    if masks:
        p.add_argument("--tolerance", type=float, default=2.0,
                       help="NSD tolerance (default 2): in mm for masks with a spacing in "
                            "their header (NIfTI, DICOM), in pixels otherwise.")
    g = p.add_argument_group("volumes")
    g.add_argument("--volume", action="store_true",
                   help="process 3-D volumes slice by slice (axis 0), finished slices saved "
                        "as they go.")
    g.add_argument("--slices", metavar="A:B",
                   help="with --volume: only these slices of axis 0, Python-style (10:50, "
                        "-20:, ::2); the others stay 0.")
    g.add_argument("--window", metavar="C,W",
                   help="intensity window centre,width for non-8-bit data (default: 0.5-99.5 "
                        "percentiles).")
    g = p.add_argument_group("SAM refinement")
    g.add_argument("--refine-sam", action="store_true",
                   help="give the VLSM mask's boxes to SAM and keep SAM's mask (default: the "
                        "VLSM's own mask; no SAM loaded).")
    g.add_argument("--sam-model", choices=SAM_MODELS, default=None,
                   help="with --refine-sam: the SAM backend (default auto: vit_h on a CUDA GPU, "
                        "sam2_t on a CPU; see medclipsam segment --help).")
    g.add_argument("--sam-checkpoint", metavar="PATH",
                   help="with --refine-sam: local weights of the --sam-model backend (default: "
                        "the official ones, downloaded and hash-checked).")
    g = p.add_argument_group("device")
    g.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:N or mps (default: CUDA, then MPS, then CPU).")
    g.add_argument("--precision", default=None, choices=PRECISIONS,
                   help="auto (default): bf16 where the CPU/GPU has it natively, else fp32.")
    add_faithfulness_flags(p)


def run_vlsm(args: argparse.Namespace) -> int:
    """``medclipsam vlsm ACTION``: dispatch to the action's function."""
    func = getattr(args, "vlsm_func", None)
    if func is None:
        raise CLIError("choose an action: train, predict or evaluate (medclipsam vlsm --help).")
    return func(args)


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- train


def _prompt_sets(values: list[str] | None) -> tuple[str, ...] | None:
    """``--prompt-set`` values (comma-separated, repeatable) -> the levels, checked."""
    if values is None:
        return None
    sets = tuple(dict.fromkeys(s.strip().lower() for v in values for s in v.split(",")
                               if s.strip()))
    bad = [s for s in sets if s not in PROMPT_SETS]
    if not sets or bad:
        raise CLIError(f"--prompt-set {bad[0] if bad else ','.join(values)!r}: choose among "
                       f"{', '.join(PROMPT_SETS)} (several comma-separated, e.g. p1,p6).")
    return sets


def _check_numbers(args: argparse.Namespace) -> None:
    """The training numbers given, checked with their flags before anything is read."""
    for flag, value, least in (("--epochs", args.epochs, 1), ("--batch-size", args.batch_size, 1),
                               ("--min-epochs", args.min_epochs, 0),
                               ("--patience", args.patience, 1)):
        if value is not None and value < least:
            raise CLIError(f"{flag} must be at least {least}; got {value}.")
    for flag, value, low, high, closed in (
            ("--lr", args.lr, 0.0, math.inf, False),
            ("--weight-decay", args.weight_decay, 0.0, math.inf, True),
            ("--cache-gb", args.cache_gb, 0.0, math.inf, True),
            ("--val-fraction", args.val_fraction, 0.0, 1.0, False),
            ("--threshold", args.threshold, 0.0, 1.0, False)):
        if value is None:
            continue
        ok = math.isfinite(value) and (low <= value if closed else low < value) and \
            (value < high or high == math.inf)
        if not ok:
            where = ("in (0, 1)" if high == 1.0 else
                     ("at least 0" if closed else "positive"))
            raise CLIError(f"{flag} must be {where}; got {value}.")


def _check_data_flags(args: argparse.Namespace) -> None:
    folders = [f for f, v in (("--images", args.images), ("--masks", args.masks),
                              ("--class-name", args.class_name)) if v]
    if args.dataset and folders:
        raise CLIError(f"--dataset and {folders[0]}: give the training data one way, either "
                       "--images/--masks/--class-name or --dataset.")
    if args.corrected_only and not args.dataset:
        raise CLIError("--corrected-only applies to --dataset (its medclipsam_cases.json "
                       "marks the corrected cases).")
    if args.dataset:
        return
    if not folders:
        raise CLIError("give the training data: --images DIR --masks DIR --class-name NAME, "
                       "or --dataset RAW/Dataset001_NAME.")
    if not args.images or not args.masks:
        missing = "--masks" if args.images else "--images"
        raise CLIError(f"{missing} is missing: give --images DIR and --masks DIR (the label "
                       "files, paired by file name).")
    if not args.class_name or not any(n.strip() for n in args.class_name):
        raise CLIError("--class-name is missing: name what the masks show, as you would type "
                       "it as a prompt, e.g. --class-name 'breast tumor' (one per label value "
                       "for masks of several labels).")
    for flag, folder in (("--images", args.images), ("--masks", args.masks)):
        if not Path(folder).expanduser().is_dir():
            raise CLIError(f"{flag} {folder}: not a folder.")


def _parse_layers(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items or not all(t.isdigit() for t in items):
        raise CLIError(f"--extract-layers {text!r}: write ViT block numbers (0-based) "
                       "separated by commas, e.g. 3,6,9.")
    return tuple(int(t) for t in items)


def _check_model_flags(args: argparse.Namespace, arch: str) -> None:
    if arch == "clipseg":
        for flag, value in (("--clip-model", args.clip_model),
                            ("--decoder-init", args.decoder_init),
                            ("--extract-layers", args.extract_layers)):
            if value is not None:
                raise CLIError(f"{flag} applies to --arch biomedclipseg (CLIPSeg brings its own "
                               "CLIP and decoder: choose them with --clipseg-model).")


def _check_definitions(class_names: list[str], sets: tuple[str, ...],
                       definitions: dict | None) -> None:
    """p7-p9 need a definition of every class: refuse, in one line, one that has none."""
    from ..vlsm.prompts import definitions_for

    needing = [s for s in sets if s in ("p7", "p8", "p9")]
    if not needing:
        return
    for name in class_names:
        if not definitions_for(name, definitions):
            raise CLIError(f"--prompt-set {needing[0]} needs a definition of {name!r} and none "
                           "is built in; give --definitions FILE (JSON: class name -> list of "
                           "sentences) or leave out p7-p9.")


def _train_config(args: argparse.Namespace, previous: dict[str, Any] | None, out: Path):
    """The training settings: defaults, then (on --resume) the checkpoint's, then the flags
    given, which must agree with the checkpoint's (only --epochs and --cache-gb may
    change)."""
    from ..vlsm.train import VlsmTrainConfig

    given = {"prompt_sets": _prompt_sets(args.prompt_set), "epochs": args.epochs,
             "min_epochs": args.min_epochs, "patience": args.patience,
             "batch_size": args.batch_size, "lr": args.lr, "weight_decay": args.weight_decay,
             "val_fraction": args.val_fraction, "threshold": args.threshold,
             "amp": False if args.no_amp else None, "cache_gb": args.cache_gb,
             "seed": args.seed}
    given = {k: v for k, v in given.items() if v is not None}
    fields = set(VlsmTrainConfig.__dataclass_fields__)
    then: dict[str, Any] = {}
    if previous is not None:
        then = {k: (tuple(v) if isinstance(v, list) else v)
                for k, v in dict(previous.get("config") or {}).items() if k in fields}
        changed = [k for k, v in given.items() if k in then and then[k] != v]
        if changed:
            shown = "; ".join(f"{_FLAGS.get(k, k)} {_show(then[k])} -> {_show(given[k])}"
                              for k in changed)
            raise CLIError(f"--resume: {out} was trained with other settings ({shown}); "
                           "resume with the same ones (only --epochs and --cache-gb may "
                           "change; flags left out take the checkpoint's), or start again "
                           "with --overwrite.")
        # the checkpoint leaves out what may change on resume: the model folder records it
        recorded = _recorded(out).get("train_config") or {}
        then.update({k: recorded[k] for k in ("epochs", "cache_gb") if k in recorded})
    try:
        return VlsmTrainConfig(**{**then, **given})
    except ValueError as exc:
        raise CLIError(str(exc)) from exc


def _recorded(out: Path) -> dict[str, Any]:
    """``out/vlsm.json`` of an earlier training, or {} (missing or unreadable)."""
    try:
        record = json.loads((out / MODEL_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _show(value: Any) -> str:
    if isinstance(value, tuple | list):
        return ",".join(str(v) for v in value)
    return json.dumps(value)


def _models_to_build(args: argparse.Namespace, previous: dict[str, Any] | None,
                     out: Path) -> dict[str, Any]:
    """Architecture and model sources: the flags given, else (on --resume) the checkpoint's,
    else the defaults; a resumed run's must agree with its checkpoint's."""
    data = (previous or {}).get("data") or {}
    base = data.get("base") or {}
    arch = args.arch or data.get("arch") or "clipseg"
    if previous is not None and data.get("arch") and arch != data.get("arch"):
        raise CLIError(f"--resume: {out} was trained with --arch {data['arch']}, not {arch}; "
                       "resume with the same one, or start again with --overwrite.")
    _check_model_flags(args, arch)
    layers = _parse_layers(args.extract_layers)
    recorded_layers = None
    if previous is not None and arch == "biomedclipseg":
        recorded_layers = _recorded(out).get("extract_layers")
        if recorded_layers and layers is not None and list(layers) != list(recorded_layers):
            raise CLIError(f"--resume: {out} was trained with --extract-layers "
                           f"{','.join(map(str, recorded_layers))}; resume with the same ones, "
                           "or start again with --overwrite.")
    given = {"clipseg_model": args.clipseg_model and absolute_source(args.clipseg_model),
             "clip_model": args.clip_model and absolute_source(args.clip_model),
             "decoder_init": args.decoder_init}
    flags = {"clipseg_model": "--clipseg-model", "clip_model": "--clip-model",
             "decoder_init": "--decoder-init"}
    for key, value in given.items():
        if previous is not None and value and base.get(key) and value != base[key]:
            raise CLIError(f"--resume: {out} was trained with {flags[key]} {base[key]}, not "
                           f"{value}; resume with the same one, or start again with "
                           "--overwrite.")
    decoder_init = args.decoder_init or base.get("decoder_init") or "random"
    clipseg_model = given["clipseg_model"] or base.get("clipseg_model") or DEFAULT_VLSM_MODEL
    if arch == "biomedclipseg" and args.clipseg_model and decoder_init != "clipseg":
        raise CLIError("--clipseg-model applies to --arch clipseg, or to --arch biomedclipseg "
                       "with --decoder-init clipseg (the decoder copied from it).")
    from ..core.config import DEFAULT_CLIP_MODEL

    return {"arch": arch, "clipseg_model": clipseg_model,
            "clip_model": given["clip_model"] or base.get("clip_model") or DEFAULT_CLIP_MODEL,
            "decoder_init": decoder_init,
            "extract_layers": layers if layers is not None else (
                tuple(recorded_layers) if recorded_layers else None)}


def _check_sources(models: dict[str, Any]) -> None:
    """Every model file the build needs, checked (hub files downloaded) before any loads."""
    from ..core.models import ModelUnavailableError, check_clip_source
    from ..vlsm.models import check_clipseg_source

    problems = []
    if models["arch"] == "clipseg" or models["decoder_init"] == "clipseg":
        problems += [f"CLIPSeg: {p}" for p in check_clipseg_source(models["clipseg_model"])]
    if models["arch"] == "biomedclipseg":
        problems += [f"CLIP: {p}" for p in check_clip_source(models["clip_model"])]
    if len(problems) == 1:
        raise ModelUnavailableError(problems[0])
    if problems:
        raise ModelUnavailableError("\n".join([f"{len(problems)} problem(s) with the models; "
                                               "nothing was trained:", *problems]))


def _flags_record(args: argparse.Namespace) -> dict[str, Any]:
    skip = {"func", "vlsm_func", "debug", "verbose", "command", "vlsm_command"}
    return {k: v for k, v in sorted(vars(args).items()) if k not in skip}


def run_train(args: argparse.Namespace) -> int:
    """``medclipsam vlsm train``: see the module docstring."""
    from .. import __version__
    from ..vlsm.data import dataset_cases, folder_cases
    from ..vlsm.prompts import read_definitions

    _check_numbers(args)
    _prompt_sets(args.prompt_set)
    _check_data_flags(args)
    check_device(args.device)
    if args.resume and args.overwrite:
        raise CLIError("--resume and --overwrite exclude each other.")
    out = Path(args.out).expanduser()
    if args.dataset:
        if not Path(args.dataset).expanduser().is_dir():
            raise CLIError(f"--dataset {args.dataset}: not a folder.")
        inputs = [Path(args.dataset).expanduser()]
    else:
        inputs = [Path(args.images).expanduser(), Path(args.masks).expanduser()]
    check_writable_folder(out)
    from ..vlsm.train import CHECKPOINT, check_output, load_checkpoint

    mode = check_output(out, resume=args.resume, overwrite=args.overwrite, inputs=inputs)
    previous = load_checkpoint(out / CHECKPOINT) if mode == "resume" else None
    config = _train_config(args, previous, out)
    if args.dataset:
        cases = dataset_cases(args.dataset, args.corrected_only, log=_say)
        data = {"dataset": str(inputs[0].resolve()), "corrected_only": args.corrected_only}
    else:
        cases = folder_cases(args.images, args.masks, args.class_name, log=_say)
        data = {"images": str(inputs[0].resolve()), "masks": str(inputs[1].resolve())}
    class_names = list(dict.fromkeys(n for c in cases for n, _ in c.classes))
    definitions = read_definitions(args.definitions) if args.definitions else None
    _check_definitions(class_names, config.prompt_sets, definitions)
    models = _models_to_build(args, previous, out)
    info = {"created_by": f"medclipsam vlsm train (napari-medclipsam {__version__})",
            "data": {**data, "cases": len(cases)}, "class_names": class_names,
            "flags": _flags_record(args)}
    if definitions is not None:
        info["definitions"] = {"file": str(Path(args.definitions).resolve()),
                               "classes": {k: list(v) for k, v in definitions.items()}}
    with sigterm_as_interrupt():
        _check_sources(models)
        from ..vlsm.models import build_vlsm

        model = build_vlsm(models["arch"], clipseg_model=models["clipseg_model"],
                           clip_model=models["clip_model"], device=args.device,
                           decoder_init=models["decoder_init"],
                           extract_layers=models["extract_layers"], seed=config.seed)
        _say(f"{models['arch']} on {model.device}: {len(cases)} case(s) of "
             f"{', '.join(repr(n) for n in class_names)}, captions from "
             f"{','.join(config.prompt_sets)}, up to {config.epochs} epochs.")
        return _train(model, cases, out, config, mode, definitions, info, class_names)


def _train(model, cases, out: Path, config, mode: str, definitions, info: dict[str, Any],
           class_names: list[str]) -> int:
    from ..core.errors import CancelledError
    from ..vlsm.train import CHECKPOINT, train_vlsm

    started = time.time()
    stop = None
    try:
        with stop_requests("Stopping after this batch; the last finished epoch is kept (press "
                           "Ctrl-C again to stop at once)...") as stop:
            result = train_vlsm(model, cases, out, config, definitions=definitions,
                                resume=mode == "resume", overwrite=mode == "overwrite",
                                info=info, progress=tqdm_progress("training"),
                                should_stop=stop, log=_say)
    except (CancelledError, KeyboardInterrupt) as exc:
        terminated = isinstance(exc, Terminated) or (
            stop is not None and stop() and isinstance(stop.interrupt(), Terminated))
        kind = "Terminated" if terminated else "Interrupted"
        checkpoint = out / CHECKPOINT
        epoch = _checkpoint_epoch(checkpoint) if checkpoint.is_file() and (
            mode == "resume" or checkpoint.stat().st_mtime >= started - 1) else None
        if epoch is None:
            _say(f"{kind} before the first epoch ended; no checkpoint was written, so there "
                 "is nothing to resume: run the command again.")
        else:
            _say(f"{kind}; the last finished epoch ({epoch}) is in {checkpoint}: --resume "
                 "continues.")
        return 143 if terminated else 130
    early = "; stopped early" if result.stopped_early else ""
    print(f"{result.epochs_run} epoch(s) on {result.n_train} training and {result.n_val} "
          f"validation sample(s){early}; saved in {out}.")
    prompt = shlex.quote(class_names[0]) if class_names else "TEXT"
    print(f"Best epoch {result.best_epoch}: validation Dice {result.best_dice:.3f}; use it "
          f"with: medclipsam vlsm predict --model {shlex.quote(str(out))} --images DIR "
          f"--prompt {prompt} -o OUT")
    return 0


def _checkpoint_epoch(path: Path) -> int | None:
    from ..core.errors import InputError
    from ..vlsm.train import load_checkpoint

    try:
        return int(load_checkpoint(path)["epoch"])
    except (InputError, OSError, KeyError, TypeError, ValueError):
        return None


# --------------------------------------------------------------------------- predict


def _recorded_threshold(model: str) -> float | None:
    """The threshold a trained model folder records (``vlsm.json``), or None."""
    path = Path(str(model).removeprefix("local-dir:")).expanduser() / MODEL_RECORD
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    value = record.get("threshold") if isinstance(record, dict) else None
    if isinstance(value, int | float) and not isinstance(value, bool) and 0.0 < value < 1.0:
        return float(value)
    return None


def _folders_of(items: list[str]) -> list[Path]:
    """The folders among ``--images`` (files given one by one are checked by segment)."""
    return [Path(item).expanduser() for item in items if Path(item).expanduser().is_dir()]


def _check_apart(out: Path, folders: list[tuple[Path, str]]) -> None:
    """Refuse an output folder that is, holds or lies inside an input folder (its files
    could be taken for, or written over, the inputs)."""
    real = Path(os.path.realpath(out))
    for folder, flag in folders:
        inside = Path(os.path.realpath(folder))
        if real == inside or inside in real.parents or real in inside.parents:
            raise CLIError(f"-o {out} is, holds or lies inside the {flag} folder {folder}; "
                           "write the results somewhere else (your data is never written).")


def _segment_args(args: argparse.Namespace) -> argparse.Namespace:
    """``medclipsam segment --method vlsm`` arguments for a predict/evaluate run."""
    from .segment import segment_args

    sam_flags = [f for f, v in (("--sam-model", args.sam_model),
                                ("--sam-checkpoint", args.sam_checkpoint)) if v is not None]
    if sam_flags and not args.refine_sam:
        raise CLIError(f"{sam_flags[0]} applies with --refine-sam (SAM refines the VLSM's "
                       "mask); add --refine-sam.")
    if args.top_k is not None and args.top_k < 0:
        raise CLIError(f"--top-k {args.top_k}: give 0 (keep all) or a number of components.")
    threshold = args.threshold
    if threshold is None:
        threshold = _recorded_threshold(args.model)
    return segment_args(
        images=list(args.images), prompt=args.prompt, prompt_file=args.prompt_file,
        out=args.out, overwrite=args.overwrite, resume=args.resume, volume=args.volume,
        slices=args.slices, window=args.window, method="vlsm", vlsm_model=args.model,
        vlsm_threshold=threshold, vlsm_refine=bool(args.refine_sam),
        sam_model=args.sam_model, sam_checkpoint=args.sam_checkpoint, device=args.device,
        precision=args.precision, top_k=0 if args.top_k is None else args.top_k,
        neutral_prompt=args.neutral_prompt,
        contrast_prompt=args.contrast_prompt,
        faithfulness_threshold=args.faithfulness_threshold,
        no_faithfulness=args.no_faithfulness, debug=getattr(args, "debug", False))


def run_predict(args: argparse.Namespace) -> int:
    """``medclipsam vlsm predict``: ``segment --method vlsm`` (see the module docstring)."""
    from .segment import run_segment

    out = Path(args.out).expanduser()
    _check_apart(out, [(f, "--images") for f in _folders_of(args.images)])
    code = run_segment(_segment_args(args))
    if code in (0, 1):
        print(f"Masks in {out / 'masks'}; the VLSM's probability in {out / 'saliency'}.")
    return code


# --------------------------------------------------------------------------- evaluate


def run_evaluate(args: argparse.Namespace) -> int:
    """``medclipsam vlsm evaluate``: predict, then score OUT/masks against --masks."""
    from ..core.evaluate import (
        OutputExistsError,
        evaluate_folders,
        evaluation_paths,
        list_masks,
        write_evaluation,
    )
    from .evaluate import print_warnings
    from .segment import run_segment

    out = Path(args.out).expanduser()
    gt_dir = Path(args.masks).expanduser()
    if not gt_dir.is_dir():
        raise CLIError(f"--masks {args.masks}: not a folder.")
    _check_apart(out, [(gt_dir, "--masks"),
                       *((f, "--images") for f in _folders_of(args.images))])
    gts = list_masks(gt_dir)
    if not gts:
        raise CLIError(f"--masks {gt_dir}: no mask files found.")
    if not args.tolerance >= 0:
        raise CLIError(f"--tolerance must be at least 0; got {args.tolerance}.")
    csv_path = out / "evaluation.csv"
    replace = bool(args.overwrite or args.resume)
    try:  # before any prediction: fail before the work, not after it
        evaluation_paths(csv_path, overwrite=replace, inputs=list(gts.values()))
    except OutputExistsError as exc:
        raise CLIError(f"{exc.path} already exists; continue that run with --resume, pass "
                       "--overwrite, or choose another -o.") from exc
    code = run_segment(_segment_args(args))
    if code not in (0, 1):
        return code  # interrupted: the predictions so far are kept, nothing scored
    if not (out / "masks").is_dir():
        _say("No mask was written, so nothing was scored.")
        return 1
    result = evaluate_folders(out / "masks", gt_dir, tolerance=args.tolerance)
    print_warnings(result, explain_missing=True)
    try:
        write_evaluation(result, csv_path, overwrite=replace)
    except OutputExistsError as exc:
        raise CLIError(f"{exc.path} appeared while scoring; nothing replaced. Pass --overwrite "
                       "to replace it.") from exc
    print(f"Mean DSC {result.mean_dsc:.4f}, NSD {result.mean_nsd:.4f} over {len(result.rows)} "
          f"image(s) ({result.describe_nsd()}); per image in {csv_path}")
    return code
