"""``medclipsam segment``: zero-shot segmentation of images or volumes, file by file.

Outputs (per image ``NAME``, paired with prompts by file name, never by listing order)::

    OUT/saliency/NAME.tif      float32 saliency in [0, 1] (Z, Y, X for volumes)
    OUT/coarse/NAME.png        coarse mask, 0/255 (NIfTI for volumes)
    OUT/prompts/NAME.json      boxes (XYXY pixels), points (XY), labels, components
    OUT/masks/NAME.png         final SAM mask, 0/255 (NAME.nii.gz for volumes)
    OUT/manifest.json          status, prompts, models and their hashes, all parameters,
                               versions, and per image: status (done/failed/interrupted),
                               parameters hash, input hash, error
    OUT/partial/NAME.json      while a volume runs: its finished (and skipped) slices, the
    OUT/partial/NAME.mask.nii.gz, NAME.coarse.nii.gz, NAME.saliency.tif
                               parameters hash and model hashes, and the volume so far;
                               removed once the volume's outputs are written

With ``--method vlsm`` a vision-language segmentation model (CLIPSeg, BiomedCLIPSeg:
``--vlsm-model``, a folder trained by ``medclipsam vlsm train`` or released CLIPSeg weights)
replaces the saliency: ``OUT/saliency/NAME.tif`` holds its foreground probability, the coarse
mask is that probability above ``--vlsm-threshold``, and the mask is the coarse mask (or, with
``--vlsm-refine``, SAM's from its boxes). No CLIP is loaded or checked; SAM only to refine. The
manifest's ``models`` names the VLSM (source, id, architecture, base models and hashes) and
``--resume`` refuses another VLSM (by its id), as it refuses other CLIP weights.
``medclipsam vlsm predict`` runs this same machinery.

With ``--volume --propagate`` the text chain runs on a few seed slices (chosen by CLIP's
image-text similarity, or ``--seed-slices``) and their masks propagate through the selected
slices (SAM 2's video predictor; box to box for SAM 1 backends); the outputs are those of a
volume (saliency and coarse mask only on the slices where the chain ran), and the prompts
JSON and the manifest entry record the seeds with their similarity, the propagated slices,
early stops, the SAM backend and the precision.

Stopping and continuing: Ctrl-C or SIGTERM keeps every finished image, and a volume's
finished slices, and writes ``manifest.json`` with status ``interrupted`` (exit 130; 143
for SIGTERM). ``--resume`` continues: images whose outputs are complete and were made
with the same parameters, prompt, input file and model weights are kept, the rest are
redone, and a volume continues from its finished slices. A propagated volume stopped midway
keeps its partial mask in ``OUT/partial`` but is redone from the start (SAM 2's memory of
the slices is not saved); a finished one is kept. A resume with other parameters (the
resolved SAM backend and precision among them: "auto" may resolve otherwise on another
machine) is refused with the difference named (``--overwrite`` redoes everything instead).

Validation comes before work: flags, ``--config``, ``--prompt-file``, ``--device``, the
inputs (explicit files must be images; headers are read) and the output folder are
checked before any model loads, then every model source is checked at once
(:meth:`ZeroShotPipeline.prepare`). One image that fails (unreadable, degenerate, any
error) is reported in one line and recorded in the manifest; the others go on (exit 1).

This module holds the parser, the parameters (``--config``, ``--preset``, flags), the inputs
and prompts, the plan and the loop over images. The run's record (parameters and their
hashes, output paths, resume checks, the manifest, the folder lock) is in
:mod:`~napari_medclipsam.cli.run_record`; volumes, slice by slice with partial saves, in
:mod:`~napari_medclipsam.cli.segment_volume`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import re
import sys
import time
import traceback
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..core.config import DEFAULT_VLSM_MODEL, PipelineConfig, SamConfig
from ..core.errors import InputError
from .common import (
    CLIError,
    Terminated,
    add_chain_flags,
    add_model_flags,
    add_scheduler_flags,
    add_vlsm_flags,
    check_device,
    check_scheduler_flags,
    check_writable_folder,
    is_fatal_oserror,
    logger,
    oserror_line,
    read_json_file,
    salip_config_from_args,
    sigterm_as_interrupt,
)
from .run_record import (
    OUTPUT_FOLDERS,
    FolderLock,
    Plan,
    Run,
    can_keep,
    check_existing,
    output_paths,
    partial_paths,
    read_json_or_none,
)
from .segment_volume import propagate_volume, segment_volume

__all__ = ["BODY_FRACTION", "CHECKPOINT_SECONDS", "MANIFEST_SECONDS", "add_parser",
           "collect_images", "config_from_args", "format_presets", "parse_slices",
           "resolve_prompts", "run_segment", "segment_args"]

#: Default share of a slice's voxels that must be above the body threshold for the slice
#: to be segmented (with --skip-empty-slices).
BODY_FRACTION = 0.01
#: The manifest is rewritten at most this often while a batch runs (and always at the end,
#: on an interrupt and on a fatal error), so a killed run loses at most this much record.
MANIFEST_SECONDS = 5.0
#: A volume's partial files are rewritten at most this often, and writing them takes at
#: most :data:`CHECKPOINT_SHARE` of the run (for a big volume on a fast GPU); after every
#: slice when slices are slow. Ctrl-C, SIGTERM and errors always write the last state.
CHECKPOINT_SECONDS = 10.0
CHECKPOINT_SHARE = 0.1


def add_parser(sub) -> None:
    """Register ``segment`` on the top-level subparsers."""
    seg = sub.add_parser("segment", help="zero-shot segmentation of images or volumes.",
                         description="Segment what a text prompt describes, image by image. "
                                     "Inputs, flags and models are checked before any work; "
                                     "Ctrl-C keeps finished work (continue with --resume).")
    seg.add_argument("images", nargs="+", metavar="IMAGES",
                     help="image files (PNG/JPEG/TIFF/BMP, NIfTI, DICOM) or folders of them "
                          "(a folder's files with other suffixes are ignored).")
    seg.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                     help="what to find; repeat for a prompt ensemble (embeddings averaged).")
    seg.add_argument("--prompt-file", metavar="JSON",
                     help="JSON mapping file name (or name without suffix) -> prompt or list "
                          "of prompts; key 'default' for the rest.")
    seg.add_argument("-o", "--out", required=True, metavar="OUT", help="output folder.")
    seg.add_argument("--overwrite", action="store_true",
                     help="replace existing outputs in OUT (default: refuse).")
    seg.add_argument("--resume", action="store_true",
                     help="continue a stopped run in OUT: keep the images whose outputs are "
                          "complete and were made with the same parameters, prompt, input "
                          "file and model weights, redo the others, and continue a volume "
                          "from its finished slices. Refused when the parameters differ "
                          "(with --overwrite, everything is redone).")
    seg.add_argument("--volume", action="store_true",
                     help="process 3-D volumes slice by slice (axis 0 = Z, axial for NIfTI), "
                          "with a bar per slice (ETA) and finished slices saved as they go "
                          "(OUT/partial); or by propagation from a few slices (--propagate).")
    seg.add_argument("--window", metavar="C,W",
                     help="intensity window centre,width for non-8-bit data (e.g. -600,1500 "
                          "for CT lungs); default: 0.5-99.5 percentiles.")
    seg.add_argument("--config", metavar="JSON",
                     help="start from the parameters of a saved run manifest or config; "
                          "flags override it.")
    seg.add_argument("--preset", metavar="NAME",
                     help="named settings of a task of the paper (e.g. breast-us: the "
                          "authors' code; breast-us-paper: the paper's coarse mask); applied "
                          "over --config, and flags given override it. See --list-presets.")
    seg.add_argument("--list-presets", action=_ListPresets,
                     help="print the presets (name, what each reproduces, settings) and exit.")
    g = seg.add_argument_group("volumes (with --volume)")
    g.add_argument("--slices", metavar="A:B",
                   help="segment only these slices of axis 0, Python-style: 10:50, 10:-10, "
                        "-20:, ::2, or one index; the others stay 0 in the outputs.")
    g.add_argument("--skip-empty-slices", action="store_true",
                   help="skip slices outside the body: a slice is skipped when fewer than "
                        "--body-fraction of its voxels are above --body-threshold. Skipped "
                        "slices stay 0 and are listed in the manifest and the prompts JSON.")
    g.add_argument("--body-threshold", type=float, metavar="VALUE",
                   help="intensity, in the volume's own units (e.g. -500 for CT in HU), above "
                        "which a voxel counts as body; default: Otsu's threshold of the "
                        "volume (air/background against tissue). Implies --skip-empty-slices.")
    g.add_argument("--body-fraction", type=float, metavar="F",
                   help=f"share of a slice's voxels that must be body for the slice to be "
                        f"segmented (default {BODY_FRACTION}). Implies --skip-empty-slices.")
    g = seg.add_argument_group(
        "propagation through a volume (with --volume --propagate)",
        "The text chain runs on a few seed slices only and their masks propagate through the "
        "volume. Seeds: the slices are ranked by CLIP's image-text similarity (one vision "
        "pass per slice) and the chain runs on the best-ranked until --seeds of them found "
        "something. The slices propagated through are those selected (--slices, minus the "
        "slices outside the body with --skip-empty-slices); the others stay 0. A stopped "
        "propagation keeps its partial mask in OUT/partial but is redone from the start by "
        "--resume (a finished one is kept).")
    g.add_argument("--propagate", action="store_true",
                   help="segment each volume by propagation instead of slice by slice: SAM "
                        "2's video predictor over the slices with a SAM 2.1 backend (sam2_*); "
                        "with a SAM 1 backend (vit_b, vit_l, vit_h, medsam) the cheap path, "
                        "each slice prompted with the box of the previous slice's mask. The "
                        "saliency and coarse mask are non-zero only on the slices where the "
                        "text chain ran.")
    g.add_argument("--seeds", type=int, metavar="N",
                   help="number of seed slices: the best-ranked slices are tried in order "
                        "until N of them found something (default 1).")
    g.add_argument("--seed-slices", metavar="Z1,Z2",
                   help="run the text chain on these slices (indices of axis 0; negative "
                        "count from the end) instead of ranking; those where it found "
                        "something are the seeds.")
    g.add_argument("--propagate-size", type=int, choices=(0, 512, 1024), metavar="0|512|1024",
                   help="SAM 2 only: input size of the video predictor (default 0 = auto: "
                        "the model's own 1024 on a GPU; on a CPU 512 for slices of at most "
                        "512 pixels, else 1024).")
    g.add_argument("--stop-after-empty", type=int, metavar="K",
                   help="stop propagating in a direction after K consecutive empty slices "
                        "(the object has ended); 0 runs every slice (default "
                        f"{SamConfig().stop_after_empty}).")
    add_scheduler_flags(seg, (
        "Each worker loads the models once; each image (a volume with all its slices) is one "
        "task that writes its outputs into OUT, which every worker must see (a shared file "
        "system; checked first). The outputs and the manifest are those of a run without "
        "--scheduler; --resume works alike."))
    add_model_flags(seg)
    add_chain_flags(seg)
    add_vlsm_flags(seg)
    seg.set_defaults(func=run_segment)


def segment_args(**values: Any) -> argparse.Namespace:
    """The arguments ``medclipsam segment`` parses with every flag left out, with ``values``
    set: for commands that run segment's machinery with settings of their own (``vlsm
    predict``). ``values`` must name segment's own arguments (``images``, ``out``,
    ``method``, ``vlsm_model``...), or ``debug`` (which ``main`` sets on every command)."""
    parser = argparse.ArgumentParser(add_help=False)
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["segment", "IMAGES", "-o", "OUT"])
    args.debug = False
    unknown = sorted(set(values) - set(vars(args)))
    if unknown:
        raise TypeError(f"segment has no argument(s) {', '.join(unknown)}")
    for key, value in values.items():
        setattr(args, key, value)
    return args


class _ListPresets(argparse.Action):
    """``--list-presets``: print every preset and exit 0, like ``--help`` (no inputs needed)."""

    def __init__(self, option_strings, dest, **kwargs):
        kwargs.update(nargs=0, default=argparse.SUPPRESS)
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(format_presets())
        parser.exit(0)


def format_presets() -> str:
    """The ``--list-presets`` text: per preset, its name, what it reproduces, its
    settings and its suggested prompts."""
    from ..core.presets import list_presets

    lines = []
    for p in list_presets():
        lines += [p.name, f"    {p.description}", f"    settings: {p.summary()}",
                  f"    prompts:  {' | '.join(p.prompts)}"]
    lines.append("Use: medclipsam segment IMAGES --preset NAME -o OUT (flags given override "
                 "the preset).")
    return "\n".join(lines)


# --------------------------------------------------------------------------- parameters


def _kind_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({json.dumps(value)})"
    if isinstance(value, int | float):
        return f"a number ({value!r})"
    if isinstance(value, str):
        return f"a text ({value!r})"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _check_config_types(cls, data: dict[str, Any], where: str = "") -> None:
    """Refuse keys a config class does not have and values of the wrong JSON type, with the
    setting's dotted name (``saliency.steps must be a whole number; got a text ('ten')``)."""
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(hints))
    if unknown:
        raise ValueError(f"unknown setting(s) {', '.join(where + k for k in unknown)}")
    for key, value in data.items():
        hint, name = hints[key], where + key
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ValueError(f"{name} must be an object of settings; got "
                                 f"{_kind_name(value)}")
            _check_config_types(hint, value, name + ".")
            continue
        if typing.get_origin(hint) is tuple:  # e.g. faithfulness.contrast_prompts
            if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                raise ValueError(f"{name} must be a list of texts; got {_kind_name(value)}")
            continue
        allowed = set(typing.get_args(hint)) or {hint}
        if value is None:
            if type(None) not in allowed:
                raise ValueError(f"{name} must not be null")
            continue
        if bool in allowed:
            ok, want = isinstance(value, bool), "true or false"
        elif int in allowed:
            ok, want = isinstance(value, int) and not isinstance(value, bool), "a whole number"
        elif float in allowed:
            ok = isinstance(value, int | float) and not isinstance(value, bool) \
                and value == value and abs(value) != float("inf")
            want = "a number"
        elif str in allowed:
            ok, want = isinstance(value, str), "a text"
        else:  # pragma: no cover - a new kind of field
            continue
        if not ok:
            raise ValueError(f"{name} must be {want}; got {_kind_name(value)}")


def _config_from_file(path: str) -> PipelineConfig:
    data = read_json_file(path, "--config")
    if not isinstance(data, dict):
        raise CLIError(f"--config {path}: expected a JSON object (a saved manifest.json or "
                       f"config); got {_kind_name(data)}.")
    data = data.get("config", data)  # a run manifest holds it under "config"
    if not isinstance(data, dict):
        raise CLIError(f"--config {path}: 'config' must be an object of settings; got "
                       f"{_kind_name(data)}.")
    try:
        _check_config_types(PipelineConfig, data)
        return PipelineConfig.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise CLIError(f"--config {path}: {str(exc).rstrip('.')}.") from exc


def config_from_args(args: argparse.Namespace) -> PipelineConfig:
    """PipelineConfig from defaults, an optional --config file, an optional --preset,
    then the flags given (every chain flag defaults to None, "not given")."""
    base = PipelineConfig()
    if getattr(args, "config", None):
        base = _config_from_file(args.config)
    if getattr(args, "preset", None):
        from ..core.presets import apply_preset

        try:
            base = apply_preset(args.preset, base)
        except InputError as exc:
            raise CLIError(f"--preset: {exc}") from exc

    def pick(obj, **mapping):
        changes = {k: v for k, v in mapping.items() if v is not None}
        return dataclasses.replace(obj, **changes) if changes else obj

    a = args
    try:
        saliency = pick(base.saliency, layer=a.layer, beta=a.beta, steps=a.steps, lr=a.lr,
                        batch_size=a.batch_size, seed=a.seed,
                        readout=getattr(a, "readout", None),
                        method=getattr(a, "saliency", None),
                        cam_layer=getattr(a, "cam_layer", None),
                        cam_module=getattr(a, "cam_module", None),
                        cam_channels=getattr(a, "cam_channels", None),
                        cam_batch=getattr(a, "cam_batch", None))
        method = getattr(a, "method", None) or base.method
        vlsm = _vlsm_config(base, a, method)
        top_k = None if a.top_k == 0 else a.top_k
        if method == "salip" and a.top_k == 0:
            raise CLIError("--top-k 0 (keep all) does not apply to --method salip: give how "
                           "many crops to retrieve (1; 2 for paired organs).")
        salip = salip_config_from_args(base.salip, a, a.top_k if method == "salip" else None)
        if method == "salip":  # --top-k counts SaLIP's crops; the coarse mask is unused
            top_k = base.coarse.top_k
        coarse = pick(base.coarse, method=a.threshold_method, threshold=a.threshold,
                      eta_c=a.eta_c, rank_by=a.rank_by, min_area=a.min_area,
                      kmeans_size=a.kmeans_size)
        if a.top_k is not None and method != "salip":
            coarse = dataclasses.replace(coarse, top_k=top_k)
        prompts = pick(base.prompts, mode=a.prompt_mode, box_mode=a.box_mode,
                       n_positive=a.n_positive, n_negative=a.n_negative,
                       box_margin=a.box_margin, seed=a.seed)
        keep = None if a.keep_largest == -1 else a.keep_largest
        sam = base.sam
        if a.keep_largest is not None:
            sam = dataclasses.replace(sam, keep_largest=keep)
        sam = pick(sam, multimask_output=a.multimask,
                   propagate_size=getattr(a, "propagate_size", None),
                   stop_after_empty=getattr(a, "stop_after_empty", None))
        faithfulness = pick(base.faithfulness, neutral_prompt=getattr(a, "neutral_prompt", None),
                            contrast_prompts=getattr(a, "contrast_prompt", None),
                            max_correlation=getattr(a, "faithfulness_threshold", None))
        if getattr(a, "no_faithfulness", False):
            faithfulness = dataclasses.replace(faithfulness, enabled=False)
        return dataclasses.replace(
            base, clip_model=a.clip_model or base.clip_model,
            sam_model=a.sam_model or base.sam_model,
            sam_checkpoint=a.sam_checkpoint or base.sam_checkpoint,
            device=a.device or base.device,
            precision=getattr(a, "precision", None) or base.precision, saliency=saliency,
            coarse=coarse, prompts=prompts, sam=sam, method=method, salip=salip,
            faithfulness=faithfulness, vlsm=vlsm)
    except ValueError as exc:
        raise CLIError(str(exc)) from exc


def _vlsm_config(base: PipelineConfig, a: argparse.Namespace, method: str):
    """``base.vlsm`` with the ``--vlsm-*`` flags given; they, and the saliency's threshold
    flags in the VLSM chain, are refused where they would do nothing."""
    given = {flag: value for flag, value in (
        ("--vlsm-model", getattr(a, "vlsm_model", None)),
        ("--vlsm-threshold", getattr(a, "vlsm_threshold", None)),
        ("--vlsm-refine", getattr(a, "vlsm_refine", None))) if value is not None}
    if given and method != "vlsm":
        raise CLIError(f"{next(iter(given))} applies to --method vlsm; add --method vlsm.")
    if method == "vlsm":
        for flag, value in (("--threshold-method", getattr(a, "threshold_method", None)),
                            ("--threshold", getattr(a, "threshold", None))):
            if value is not None:
                raise CLIError(f"{flag} applies to the saliency's coarse mask; with --method "
                               "vlsm the probability is cut at --vlsm-threshold.")
    changes = {field: given[flag] for field, flag in (
        ("model", "--vlsm-model"), ("threshold", "--vlsm-threshold"),
        ("refine", "--vlsm-refine")) if flag in given}
    if "model" in changes and not str(changes["model"]).strip():
        raise CLIError("--vlsm-model is empty; name a model folder or CLIPSeg weights.")
    return dataclasses.replace(base.vlsm, **changes) if changes else base.vlsm


# --------------------------------------------------------------------------- inputs


def collect_images(items: Sequence[str]) -> list[Path]:
    """Files given, and supported files inside given folders (sorted by name).

    A file given by name must be an image (a supported suffix, or DICOM by its marker);
    anything else is refused at once. The same file given twice is taken once."""
    from ..core.io import SUPPORTED, is_dicom_file

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
            if not path.name.lower().endswith(SUPPORTED) and not is_dicom_file(path):
                raise CLIError(f"{path}: not an image file (supported: "
                               f"{', '.join(SUPPORTED)}, or DICOM); give image files or "
                               "folders of them.")
            files.append(path)
        elif path.exists():
            raise CLIError(f"{path}: not a regular file; give image files or folders of them.")
        else:
            raise CLIError(f"{path}: no such file or folder.")
    unique: dict[Path, Path] = {}
    for f in files:
        unique.setdefault(f.resolve(), f)
    return list(unique.values())


def _check_prompt_value(value: Any, key: str, path: Path) -> list[str]:
    where = f"--prompt-file {path}: the prompt for {key!r}"
    if isinstance(value, str):
        texts = [value]
    elif isinstance(value, list) and value:
        bad = next((v for v in value if not isinstance(v, str)), None)
        if bad is not None or any(not isinstance(v, str) for v in value):
            raise CLIError(f"{where} must be a text or a list of texts; got a list holding "
                           f"{_kind_name(bad)}.")
        texts = list(value)
    else:
        raise CLIError(f"{where} must be a text or a list of texts; got {_kind_name(value)}.")
    texts = [t.strip() for t in texts]
    if not all(texts):
        raise CLIError(f"{where} is empty; write what to find (e.g. \"breast tumor\").")
    return texts


def resolve_prompts(files: Sequence[Path], prompt: list[str] | None,
                    prompt_file: str | None) -> dict[Path, list[str]]:
    """Each image's prompt(s), paired by file name (then by name without suffix).

    Every value of the prompt file must be a text or a list of texts (a number or an object
    is refused, never used)."""
    from ..core.io import file_stem

    mapping: dict[str, list[str]] = {}
    if prompt_file:
        path = Path(prompt_file)
        raw = read_json_file(path, "--prompt-file")
        if not isinstance(raw, dict):
            raise CLIError(f"--prompt-file {path}: expected an object mapping file names to "
                           f"prompts; got {_kind_name(raw)}.")
        mapping = {key: _check_prompt_value(value, key, path) for key, value in raw.items()}
    given = [t.strip() for t in prompt or [] if t.strip()]
    if prompt and not given:
        raise CLIError("--prompt is empty; write what to find (e.g. --prompt \"breast tumor\").")
    default = given or mapping.get("default")
    result: dict[Path, list[str]] = {}
    missing = []
    used = set()
    for f in files:
        for key in (f.name, file_stem(f)):
            if key in mapping:
                texts = mapping[key]
                used.add(key)
                break
        else:
            texts = list(default or [])
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


_SLICES_RE = re.compile(r"^\s*(-?\d+)?\s*:\s*(-?\d+)?\s*(?::\s*(-?\d+)?\s*)?$")


def parse_slices(text: str) -> slice:
    """``--slices`` text -> a Python slice of axis 0: ``A:B``, ``A:B:S``, ``A:``, ``:B`` or
    one index ``A`` (negative values count from the end)."""
    text = text.strip()
    if re.fullmatch(r"-?\d+", text):
        index = int(text)
        return slice(index, index + 1 if index != -1 else None)
    match = _SLICES_RE.match(text)
    if match is None:
        raise CLIError(f"--slices {text!r}: write a range of axis 0 as A:B (Python-style, "
                       "e.g. 10:50, 10:-10, -20:, ::2) or one index.")
    start, stop, step = (int(v) if v is not None else None for v in match.groups())
    if step is not None and step <= 0:
        raise CLIError(f"--slices {text!r}: the step must be positive.")
    return slice(start, stop, step)


def _shape_probe(path: Path) -> str | None:
    """Read only the header of an input; a one-line problem, or None when it looks usable.
    Cheap (no pixel is decoded), so every input is checked before any model loads."""
    from ..core.io import DICOM_SUFFIXES, NIFTI_SUFFIXES, is_dicom_file

    name = path.name.lower()
    try:
        if path.stat().st_size == 0:
            return f"{path.name}: the file is empty (0 bytes)."
        if name.endswith(NIFTI_SUFFIXES):
            import nibabel as nib

            nib.load(str(path)).header.get_data_shape()
        elif name.endswith(DICOM_SUFFIXES) or is_dicom_file(path):
            import pydicom

            pydicom.dcmread(str(path), stop_before_pixels=True)
        elif name.endswith((".tif", ".tiff")):
            import tifffile

            with tifffile.TiffFile(str(path)) as tif:
                if not tif.pages:
                    return f"{path.name}: the TIFF file holds no image."
        else:
            from PIL import Image

            with Image.open(path) as im:
                im.size  # noqa: B018 - the header is parsed on open
    except Exception as exc:  # noqa: BLE001 - any failure is the file's problem
        text = " ".join(str(exc).split())[:200]
        return f"{path.name}: cannot be read as an image ({type(exc).__name__}: {text})."
    return None


# --------------------------------------------------------------------------- the plan


def _plan(args: argparse.Namespace, resolve: bool = True) -> Plan:
    """Every check that needs no model: flags, files, prompts, output folder, resume.
    ``resolve=False`` (a remote Dask cluster): the device, the "auto" SAM backend and the
    precision are resolved on a worker, and the output folder checked then
    (:func:`resolve_plan`)."""
    from ..core.io import Window, file_stem

    propagate = _propagate_options(args)
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
    volume_flags = [flag for flag, given in (
        ("--slices", args.slices is not None), ("--skip-empty-slices", args.skip_empty_slices),
        ("--body-threshold", args.body_threshold is not None),
        ("--body-fraction", args.body_fraction is not None)) if given]
    if volume_flags and not args.volume:
        raise CLIError(f"{volume_flags[0]} applies to volumes; add --volume.")
    slices = parse_slices(args.slices) if args.slices is not None else None
    body = None
    if args.skip_empty_slices or args.body_threshold is not None or \
            args.body_fraction is not None:
        fraction = BODY_FRACTION if args.body_fraction is None else args.body_fraction
        if not 0.0 <= fraction <= 1.0:
            raise CLIError(f"--body-fraction {fraction:g}: give a share between 0 and 1 "
                           f"(default {BODY_FRACTION}).")
        threshold = args.body_threshold
        if threshold is not None and threshold != threshold:
            raise CLIError("--body-threshold nan: give a number.")
        body = {"threshold": threshold, "fraction": fraction}
    out = Path(args.out)
    check_writable_folder(out)
    for sub in OUTPUT_FOLDERS:
        if (out / sub).exists():
            check_writable_folder(out / sub)
    plan = Plan(config=config, files=files, prompts=prompts, window=window, out=out,
                 volume=args.volume, slices=slices,
                 slices_text=args.slices.strip() if args.slices else None, body=body,
                 resume=args.resume, overwrite=args.overwrite,
                 debug=getattr(args, "debug", False),
                 preset=getattr(args, "preset", None), window_text=args.window,
                 propagate=propagate)
    if resolve:
        check_device(config.device)
        resolve_plan(plan, resolved_models(config))
    elif propagate is not None and config.method == "vlsm" and not config.vlsm.refine:
        resolve_plan(plan, ("none", ""))  # its error, before any cluster starts
    for f in files:
        problem = _shape_probe(f)
        if problem is not None:
            plan.probe_errors[f] = problem
    if plan.probe_errors and len(plan.probe_errors) == len(files):
        first = next(iter(plan.probe_errors.values()))
        if len(files) == 1:
            raise CLIError(first)
        raise CLIError(f"None of the {len(files)} inputs can be read as an image; nothing was "
                       f"computed (first: {first})")
    if propagate is not None:
        flat = [f for f in files if f not in plan.probe_errors and _known_2d(f)]
        if flat and len(flat) == len(files) - len(plan.probe_errors):
            what = (f"{flat[0].name} is a 2-D image" if len(flat) == 1 else
                    f"none of the {len(flat)} inputs is a volume (e.g. {flat[0].name})")
            raise CLIError(f"--propagate applies to 3-D volumes; {what}. Leave --propagate "
                           "out for 2-D images.")
    return plan


def resolve_plan(plan: Plan, resolved: tuple[str, str]) -> None:
    """Set the SAM backend and precision the run uses (``resolved``: from
    :func:`resolved_models` here or on a Dask worker), then check the output folder against
    them (``--resume``, ``--overwrite``)."""
    plan.sam_model, plan.precision = resolved
    if plan.config.method == "vlsm" and not plan.config.vlsm.refine:
        plan.sam_model = "none"  # the VLSM's own mask: no SAM in this chain
    if plan.propagate is not None and plan.sam_model == "none":
        raise CLIError("--propagate needs SAM: with --method vlsm add --vlsm-refine (the VLSM "
                       "finds the seed slices, SAM propagates their masks).")
    check_existing(plan)


def resolved_models(config: PipelineConfig) -> tuple[str, str]:
    """The SAM backend and precision ``config`` gives on this machine ("auto" resolved)."""
    from ..core.models import resolve_device, resolve_sam_model
    from ..core.precision import resolve_precision

    try:
        device = resolve_device(config.device)
    except ValueError as exc:
        raise CLIError(str(exc)) from exc
    try:
        sam = resolve_sam_model(config.sam_model, device)
    except ValueError as exc:
        raise CLIError(str(exc)) from exc
    try:
        precision = resolve_precision(config.precision, device)
    except ValueError as exc:
        raise CLIError(f"--precision {config.precision}: {exc}") from exc
    return sam, precision


def _propagate_options(args: argparse.Namespace) -> dict[str, Any] | None:
    """``--propagate`` and its flags checked: {"seeds": N or None, "seed_slices": [...] or
    None}, or None without ``--propagate``."""
    given = [flag for flag, value in (
        ("--seeds", args.seeds), ("--seed-slices", args.seed_slices),
        ("--propagate-size", args.propagate_size),
        ("--stop-after-empty", args.stop_after_empty)) if value is not None]
    if not args.propagate:
        if given:
            raise CLIError(f"{given[0]} applies to propagation; add --volume --propagate.")
        return None
    if not args.volume:
        raise CLIError("--propagate applies to volumes; add --volume.")
    if args.seeds is not None and args.seed_slices is not None:
        raise CLIError("--seeds and --seed-slices: give one of them (--seed-slices names the "
                       "seed slices itself).")
    if args.seeds is not None and args.seeds < 1:
        raise CLIError(f"--seeds {args.seeds}: give 1 or more seed slices.")
    if args.stop_after_empty is not None and args.stop_after_empty < 0:
        raise CLIError(f"--stop-after-empty {args.stop_after_empty}: give 0 (never stop "
                       "early) or a number of slices.")
    if args.seed_slices is not None:
        return {"seeds": None, "seed_slices": parse_seed_slices(args.seed_slices)}
    return {"seeds": args.seeds or 1, "seed_slices": None}


def parse_seed_slices(text: str) -> list[int]:
    """``--seed-slices`` text -> slice indices of axis 0 (``40,80``; negative values count
    from the end), in the order given, each once."""
    items = [t.strip() for t in text.split(",")]
    if not items or not all(re.fullmatch(r"-?\d+", t) for t in items):
        raise CLIError(f"--seed-slices {text!r}: write slice indices of axis 0 separated by "
                       "commas (e.g. 40,80).")
    return list(dict.fromkeys(int(t) for t in items))


def _known_2d(path: Path) -> bool:
    """True when the header alone says ``path`` is a 2-D image (PNG/JPEG/BMP, a flat
    NIfTI); TIFF and DICOM are known only once read."""
    from ..core.io import NIFTI_SUFFIXES

    name = path.name.lower()
    if name.endswith((".png", ".jpg", ".jpeg", ".bmp")):
        return True
    if name.endswith(NIFTI_SUFFIXES):
        import nibabel as nib

        try:
            shape = tuple(nib.load(str(path)).header.get_data_shape())
        except Exception:  # noqa: BLE001 - unreadable: the probe or the reader says why
            return False
        return len(shape) == 2 or (len(shape) >= 3 and all(n == 1 for n in shape[2:]))
    return False


# --------------------------------------------------------------------------- the run


def _prompts_json(result, plan: Plan) -> dict[str, Any]:
    threshold = result.coarse.threshold
    out = {**({"method": "vlsm"} if plan.config.method == "vlsm" else {}),
           **result.prompts.to_dict(),
           "components": [dataclasses.asdict(c) for c in result.coarse.components],
           "threshold": None if threshold != threshold else threshold,  # NaN: SaLIP has none
           "n_candidates": result.coarse.n_candidates,
           "found": result.found, "message": result.message,
           "sam_model": plan.sam_model, "precision": plan.precision}
    if result.faithfulness is not None:
        out["faithfulness"] = result.faithfulness.to_dict()
    salip = result.extra.get("salip")
    if salip is not None:  # every crop CLIP scored, retrieved ones marked with their rank
        rank = {i: r for r, i in enumerate(salip["retrieved"], start=1)}
        out["method"] = "salip"
        out["n_generated"] = salip["n_generated"]
        out["crops"] = [{**p.to_dict(), "score": float(score), "retrieved": rank.get(i)}
                        for i, (p, score) in enumerate(zip(salip["proposals"], salip["scores"],
                                                           strict=True))]
    return out


def _is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def run_segment(args: argparse.Namespace) -> int:
    """``medclipsam segment``: see the module docstring."""
    from ..cluster import LOCAL
    from ..core.pipeline import ZeroShotPipeline
    from .segment_dask import run_distributed

    check_scheduler_flags(args)
    plan = _plan(args, resolve=args.scheduler in (None, LOCAL))
    vlsm = plan.config.method == "vlsm"
    for f, problem in plan.probe_errors.items():
        print(f"{f.name}: error: {problem.removeprefix(f.name + ': ')}", file=sys.stderr)
    if args.scheduler is not None:  # the models are checked and loaded on the workers
        return run_distributed(plan, args)
    if plan.config.sam_model in (None, "", "auto") and plan.sam_model != "none":
        from ..core.models import resolve_device

        device = str(resolve_device(plan.config.device)).split(":")[0]
        print(f"SAM: {plan.sam_model} (auto on {device})", file=sys.stderr)
    if vlsm:  # the VLSM package is loaded only here: core never imports it
        from ..vlsm.models import load_vlsm

        pipeline = ZeroShotPipeline(plan.config, vlsm=load_vlsm)
    else:
        pipeline = ZeroShotPipeline(plan.config)

    def stage(name: str, fraction: float) -> None:
        if _is_tty():
            print(f"{name}...", file=sys.stderr)
        else:
            logger.info("%s...", name)

    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    with sigterm_as_interrupt():
        try:
            if vlsm:
                stage("checking models", 0.0)
                _check_vlsm_sources(plan.config)
            pipeline.prepare(stage)
        except KeyboardInterrupt as exc:
            print(f"{'Terminated' if isinstance(exc, Terminated) else 'Interrupted'} while "
                  "loading the models; nothing was written.", file=sys.stderr)
            return 143 if isinstance(exc, Terminated) else 130
        run = Run(plan, pipeline, started, every=MANIFEST_SECONDS)
        run.check_models()
        return _run_all(plan, pipeline, run)


def _check_vlsm_sources(config: PipelineConfig) -> None:
    """The VLSM's files (and, to name every problem at once, SAM's when it refines) checked
    before anything loads; CLIP is neither checked nor loaded in the VLSM chain."""
    from ..core.models import ModelUnavailableError, check_sam_source
    from ..vlsm.models import check_vlsm_source

    source = str(config.vlsm.model)
    if _missing_path(source):  # not a hub id either: say so, not "cannot download"
        problems = [f"VLSM: no such folder: {source}; give a folder written by 'medclipsam vlsm "
                    f"train', or CLIPSeg weights (a Hugging Face id such as "
                    f"{DEFAULT_VLSM_MODEL}, or local-dir:PATH)."]
    else:
        problems = [f"VLSM: {p}" for p in check_vlsm_source(source)]
    if not problems:
        return  # SAM is checked by the pipeline's prepare
    if config.vlsm.refine:
        problems += [f"SAM: {p}" for p in check_sam_source(
            config.sam_model, config.sam_checkpoint, device=config.device)]
    if len(problems) == 1:
        raise ModelUnavailableError(problems[0])
    raise ModelUnavailableError("\n".join([f"{len(problems)} problem(s) with the models; "
                                           "nothing was computed:", *problems]))


def _missing_path(source: str) -> bool:
    """True for a model source written as a local path
    (:func:`~napari_medclipsam.vlsm.config.local_source_path`) that does not exist; a Hugging
    Face id (``ORG/NAME``) is not a path."""
    from ..vlsm.config import local_source_path

    path = local_source_path(source)
    return path is not None and not path.exists()


@dataclasses.dataclass
class Tally:
    """What a batch did so far (for its last lines)."""

    failed: list[str] = dataclasses.field(default_factory=list)
    n_found: int = 0
    n_done: int = 0
    n_kept: int = 0


def record_probe_errors(plan: Plan, run: Run, tally: Tally) -> list[Path]:
    """Record the inputs that failed the header probe; return the files to segment."""
    from ..core.io import file_stem

    for f, problem in plan.probe_errors.items():
        tally.failed.append(f.name)
        run.record(file_stem(f), {"image": str(f), "name": file_stem(f),
                                  "prompt": plan.prompts[f], "status": "failed",
                                  "error": problem, "error_type": "InputError"})
    return [f for f in plan.files if f not in plan.probe_errors]


def failed_entry(plan: Plan, f: Path, exc: BaseException) -> tuple[dict[str, Any], bool]:
    """The manifest entry of an image that failed, and whether the batch must stop."""
    from ..core.io import file_stem

    message, fatal = failure_line(exc, f, plan.debug)
    name = file_stem(f)
    return ({"image": str(f), "name": name, "prompt": plan.prompts[f], "status": "failed",
             "error": message, "error_type": type(exc).__name__, **partial_note(plan, name)},
            fatal)


def record_entry(plan: Plan, run: Run, f: Path, entry: dict[str, Any], tally: Tally,
                 seconds: float | None = None) -> None:
    """Record one image's entry (done or failed) and say what a user must know about it."""
    from ..core.io import file_stem

    name = file_stem(f)
    if entry.get("status") == "failed":
        tally.failed.append(f.name)
        print(f"{f.name}: error: {entry['error']}", file=sys.stderr)
        run.record(name, entry)
        return
    if entry.pop("kept", False):
        tally.n_kept += 1
    elif seconds is not None:
        entry["seconds"] = round(seconds, 3)
    tally.n_done += 1
    tally.n_found += bool(entry["found"])
    if not entry["found"]:
        print(f"{f.name}: {entry['message']}", file=sys.stderr)
    faith = entry.get("faithfulness") or {}
    if faith.get("message"):
        print(f"{f.name}: warning: {faith['message']}", file=sys.stderr)
    run.record(name, entry)


def stop_on_fatal(run: Run, f: Path, entry: dict[str, Any], exc: BaseException) -> None:
    """A failure the next images would share (full disk, models gone): record it, write the
    manifest, and re-raise ``exc``."""
    from ..core.io import file_stem

    run.entries[file_stem(f)] = entry
    with contextlib.suppress(OSError):
        run.save("failed", force=True)
    raise exc


def interrupted(plan: Plan, run: Run, tally: Tally, exc: KeyboardInterrupt,
                current: Path | None) -> int:
    """Record an interrupted run (``current``: the image being segmented, if known) and say
    how to continue; the exit status."""
    from ..core.io import file_stem

    out = plan.out
    if current is not None:
        name = file_stem(current)
        run.record(name, {"image": str(current), "name": name,
                          "prompt": plan.prompts[current], "status": "interrupted",
                          **partial_note(plan, name)})
    run.save("interrupted", force=True)
    kind = "Terminated" if isinstance(exc, Terminated) else "Interrupted"
    note = ""
    record = None if current is None else read_json_or_none(
        partial_paths(out, file_stem(current))["record"])
    if isinstance(record, dict) and record.get("mode") == "propagate":
        note = (f"; the partial mask of {current.name} is kept in {out / 'partial'} "
                "(a stopped propagation is redone from the start by --resume)")
    elif isinstance(record, dict):
        note = f"; the finished slices of {current.name} are kept in {out / 'partial'}"
    print(f"{kind}: {tally.n_done} of {len(plan.files)} image(s) done{note}; manifest.json "
          "written. Continue with the same command and --resume.", file=sys.stderr)
    return 143 if isinstance(exc, Terminated) else 130


def summary(plan: Plan, run: Run, tally: Tally) -> int:
    """The run's last lines; the exit status (1 when an image failed)."""
    kept = f" ({tally.n_kept} kept from the run resumed)" if tally.n_kept else ""
    print(f"Segmented {tally.n_done} image(s){kept}, something found in {tally.n_found}; "
          f"results in {plan.out}")
    checks = [e["faithfulness"] for e in run.entries.values() if e.get("faithfulness")]
    if checks:  # one image's correlation is noisy; the run's mean is the steadier figure
        flagged = sum(not c["steers"] for c in checks)
        mean_r = sum(c["correlation"] for c in checks) / len(checks)
        print(f"Prompt faithfulness: maps {mean_r:.2f} correlated with the neutral prompt's on "
              f"average over {len(checks)} image(s); {flagged} flagged as not steered by the "
              "text.")
    if tally.failed:
        print(f"{len(tally.failed)} image(s) failed (see the errors above and manifest.json): "
              f"{', '.join(tally.failed[:10])}", file=sys.stderr)
        return 1
    return 0


def start_output(plan: Plan, run: Run) -> None:
    """Remove a stopped run's temporaries and write the first manifest (a killed run leaves
    one to resume from). Call inside the folder lock."""
    from ..core.io import remove_stale_temporaries

    out = plan.out
    removed = [p for sub in ("", *OUTPUT_FOLDERS)
               for p in remove_stale_temporaries(out / sub if sub else out)]
    if removed:
        print(f"Removed {len(removed)} temporary file(s) a stopped run left in {out}.",
              file=sys.stderr)
    run.save("running", force=True)


def _run_all(plan: Plan, pipeline, run: Run) -> int:
    from tqdm import tqdm

    out = plan.out
    out.mkdir(parents=True, exist_ok=True)
    with FolderLock(out):
        start_output(plan, run)
        tally = Tally()
        todo = record_probe_errors(plan, run, tally)
        bar = tqdm(total=len(todo), desc="segment", unit="image", file=sys.stderr,
                   disable=None)
        current = None
        try:
            for f in todo:
                current = f
                bar.set_postfix_str(f.name)
                t0 = time.perf_counter()
                try:
                    entry = segment_one(plan, pipeline, run, f, bar)
                except KeyboardInterrupt:
                    raise
                except Exception as exc:  # one input must not stop the batch
                    entry, fatal = failed_entry(plan, f, exc)
                    if fatal:  # the next images would fail alike: stop, say it once
                        stop_on_fatal(run, f, entry, exc)
                    record_entry(plan, run, f, entry, tally)
                    bar.update(1)
                    continue
                stop = entry.pop("stop", None)  # a stop asked for as the image finished
                record_entry(plan, run, f, entry, tally, time.perf_counter() - t0)
                bar.update(1)
                if stop is not None:
                    current = None
                    raise stop
            current = None
        except KeyboardInterrupt as exc:
            bar.close()
            return interrupted(plan, run, tally, exc, current)
        finally:
            bar.close()
        run.save("finished", force=True)
    return summary(plan, run, tally)


def partial_note(plan: Plan, name: str) -> dict[str, Any]:
    record = read_json_or_none(partial_paths(plan.out, name)["record"])
    if not isinstance(record, dict):
        return {}
    note = {"partial": str(partial_paths(plan.out, name)["record"].relative_to(plan.out)),
            "slices_done": len(record.get("done", []))}
    if record.get("mode") == "propagate":
        note["resume"] = "redone from the start (a stopped propagation is not continued)"
    return note


def failure_line(exc: BaseException, f: Path, debug: bool) -> tuple[str, bool]:
    """One line for a failed image, and whether the batch must stop (full disk, read-only
    file system, models gone)."""
    from ..core.models import ModelUnavailableError

    if debug:
        traceback.print_exception(exc)
    if isinstance(exc, CLIError | InputError):
        return str(exc).removeprefix(f"{f.name}: "), False
    if isinstance(exc, ModelUnavailableError):
        return str(exc), True
    if isinstance(exc, MemoryError):
        return "out of memory while segmenting it (try a smaller image or a volume's " \
               "--slices).", False
    if isinstance(exc, OSError):
        return oserror_line(exc), is_fatal_oserror(exc)
    text = " ".join(str(exc).split())[:300]
    return (f"internal error ({type(exc).__name__}: {text}); rerun with --debug for the "
            "traceback and please report it."), False


def segment_one(plan: Plan, pipeline, run: Run, f: Path, bar) -> dict[str, Any]:
    from ..core.io import (
        file_stem,
        read_image,
        write_float_tiff,
        write_mask_png,
        write_text,
    )
    from ..core.models import file_sha256

    name = file_stem(f)
    texts = plan.prompts[f]
    input_sha = file_sha256(f)
    params_sha = plan.parameters_sha256(f, input_sha)
    previous = run.previous_entry(name)
    if plan.resume and can_keep(previous, params_sha, run.models_sha256, plan.out):
        return {**previous, "kept": True}
    image = read_image(f)
    if image.is_volume and not plan.volume:
        raise InputError(f"{f.name} is a 3-D volume {image.data.shape}; pass --volume to "
                         "process it slice by slice.")
    if plan.propagate is not None and not image.is_volume:
        raise InputError(f"{f.name} is a 2-D image {image.data.shape[:2]}; --propagate "
                         "applies to 3-D volumes.")
    common = {"image": str(f), "name": name, "prompt": texts, "status": "done",
              "parameters_sha256": params_sha, "input_sha256": input_sha,
              "models_sha256": run.models_sha256,
              "parameters": {"image": plan.image_parameters(f, input_sha)}}
    if image.is_volume and plan.propagate is not None:
        return {**common, **propagate_volume(plan, pipeline, run, f, image, common)}
    if image.is_volume:
        return {**common, **segment_volume(plan, pipeline, run, f, image, common,
                                           checkpoint_seconds=CHECKPOINT_SECONDS,
                                           checkpoint_share=CHECKPOINT_SHARE)}
    paths = output_paths(plan.out, name, False)
    win = plan.window or image.meta.get("window")

    def progress(stage: str, fraction: float) -> None:
        bar.set_postfix_str(f"{f.name}: {stage}", refresh=True)

    res = pipeline.segment(image.data, texts, window=win, progress=progress)
    write_float_tiff(paths["saliency"], res.saliency)
    write_mask_png(paths["coarse"], res.coarse.mask)
    write_text(paths["prompts"], json.dumps(_prompts_json(res, plan), indent=2))
    write_mask_png(paths["mask"], res.mask)
    entry = {**common, "found": res.found, "message": res.message,
             "outputs": {k: str(v.relative_to(plan.out)) for k, v in paths.items()}}
    if res.faithfulness is not None:
        entry["faithfulness"] = res.faithfulness.to_dict()
    return entry
