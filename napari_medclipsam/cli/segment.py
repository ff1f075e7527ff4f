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

Stopping and continuing: Ctrl-C or SIGTERM keeps every finished image, and a volume's
finished slices, and writes ``manifest.json`` with status ``interrupted`` (exit 130; 143
for SIGTERM). ``--resume`` continues: images whose outputs are complete and were made
with the same parameters, prompt, input file and model weights are kept, the rest are
redone, and a volume continues from its finished slices. A resume with other parameters
is refused (``--overwrite`` redoes everything instead).

Validation comes before work: flags, ``--config``, ``--prompt-file``, ``--device``, the
inputs (explicit files must be images; headers are read) and the output folder are
checked before any model loads, then every model source is checked at once
(:meth:`ZeroShotPipeline.prepare`). One image that fails (unreadable, degenerate, any
error) is reported in one line and recorded in the manifest; the others go on (exit 1).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import platform
import re
import sys
import time
import traceback
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import __version__
from ..core.config import PipelineConfig
from ..core.errors import InputError
from .common import (
    CLIError,
    Terminated,
    add_chain_flags,
    add_model_flags,
    check_device,
    check_writable_folder,
    logger,
    oserror_line,
    read_json_file,
    sigterm_as_interrupt,
)

__all__ = ["BODY_FRACTION", "CHECKPOINT_SECONDS", "MANIFEST_SECONDS", "add_parser",
           "collect_images", "config_from_args", "format_presets", "parse_slices",
           "resolve_prompts", "run_segment"]

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
#: Subfolders of OUT this command writes.
OUTPUT_FOLDERS = ("saliency", "coarse", "prompts", "masks", "partial")
#: Settings that do not change the results (model identity is checked by weight hashes).
_NOT_PARAMETERS = ("device", "clip_model", "sam_checkpoint")


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
                          "(OUT/partial).")
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
    add_model_flags(seg)
    add_chain_flags(seg)
    seg.set_defaults(func=run_segment)


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
                        readout=getattr(a, "readout", None))
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


# --------------------------------------------------------------------------- bookkeeping


def _sha256_text(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def _jsonable(data: Any) -> Any:
    return json.loads(json.dumps(data, default=str))


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, dict):
        return {prefix.rstrip("."): data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _differences(old: Any, new: Any, limit: int = 4) -> list[str]:
    """Readable differences between two parameter records (``saliency.steps 3 -> 5``)."""
    a, b = _flatten(_jsonable(old)), _flatten(_jsonable(new))
    diffs = []
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            if key.endswith("sha256"):
                diffs.append(f"{key.removesuffix('_sha256').removesuffix('sha256')} "
                             "content changed")
            else:
                diffs.append(f"{key} {json.dumps(a.get(key))} -> {json.dumps(b.get(key))}")
    return diffs[:limit] + ([f"... {len(diffs) - limit} more"] if len(diffs) > limit else [])


@dataclasses.dataclass
class _Plan:
    """A validated ``segment`` run (nothing loaded, nothing written yet)."""

    config: PipelineConfig
    files: list[Path]
    prompts: dict[Path, list[str]]
    window: Any  # Window or None
    out: Path
    volume: bool
    slices: slice | None
    slices_text: str | None
    body: dict[str, Any] | None  # {"threshold": float or None (Otsu), "fraction": float}
    resume: bool
    overwrite: bool
    debug: bool
    preset: str | None
    window_text: str | None
    previous: dict[str, Any] | None = None  # the manifest being resumed
    probe_errors: dict[Path, str] = dataclasses.field(default_factory=dict)

    @property
    def run_parameters(self) -> dict[str, Any]:
        """What every result depends on, models aside (they are compared by hash)."""
        config = {k: v for k, v in self.config.to_dict().items() if k not in _NOT_PARAMETERS}
        return {"config": config, "window": self.window_text or "auto"}

    def image_parameters(self, f: Path, input_sha256: str) -> dict[str, Any]:
        volume = ({"slices": self.slices_text or "all", "body": self.body}
                  if self.volume else None)
        return {"prompt": self.prompts[f], "input_sha256": input_sha256, "volume": volume}

    def parameters_sha256(self, f: Path, input_sha256: str) -> str:
        return _sha256_text({"run": self.run_parameters,
                             "image": self.image_parameters(f, input_sha256)})


def _outputs(out: Path, stem: str, volume: bool) -> dict[str, Path]:
    ext = ".nii.gz" if volume else ".png"
    return {"saliency": out / "saliency" / f"{stem}.tif",
            "coarse": out / "coarse" / f"{stem}{ext}",
            "prompts": out / "prompts" / f"{stem}.json",
            "mask": out / "masks" / f"{stem}{ext}"}


def _partial_paths(out: Path, stem: str) -> dict[str, Path]:
    folder = out / "partial"
    return {"record": folder / f"{stem}.json", "mask": folder / f"{stem}.mask.nii.gz",
            "coarse": folder / f"{stem}.coarse.nii.gz",
            "saliency": folder / f"{stem}.saliency.tif"}


def _existing_outputs(out: Path, stem: str) -> list[Path]:
    paths = {*_outputs(out, stem, True).values(), *_outputs(out, stem, False).values(),
             *_partial_paths(out, stem).values()}
    return sorted(p for p in paths if p.exists())


def _read_json_or_none(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _plan(args: argparse.Namespace) -> _Plan:
    """Every check that needs no model: flags, files, prompts, output folder, resume."""
    from ..core.io import Window, file_stem

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
    plan = _Plan(config=config, files=files, prompts=prompts, window=window, out=out,
                 volume=args.volume, slices=slices,
                 slices_text=args.slices.strip() if args.slices else None, body=body,
                 resume=args.resume, overwrite=args.overwrite,
                 debug=getattr(args, "debug", False),
                 preset=getattr(args, "preset", None), window_text=args.window)
    _check_existing(plan)
    check_device(config.device)
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
    return plan


def _check_existing(plan: _Plan) -> None:
    """Refuse to write over existing outputs, or check what ``--resume`` would keep."""
    from ..core.io import file_stem
    from ..core.models import file_sha256

    out = plan.out
    manifest_path = out / "manifest.json"
    existing = sorted({p for f in plan.files for p in _existing_outputs(out, file_stem(f))})
    if not plan.resume:
        if plan.overwrite:
            return
        clash = existing + ([manifest_path] if manifest_path.exists() else [])
        if clash:
            raise CLIError(f"{len(clash)} output file(s) already exist in {out} (e.g. "
                           f"{clash[0]}); continue that run with --resume, choose another -o "
                           "folder, or pass --overwrite.")
        return
    if not manifest_path.exists():
        if existing and not plan.overwrite:
            raise CLIError(f"--resume: {out} has outputs but no manifest.json, so they cannot "
                           "be checked; pass --overwrite to redo them, or choose another -o.")
        return
    previous = _read_json_or_none(manifest_path)
    if not isinstance(previous, dict) or previous.get("command") != "segment":
        if plan.overwrite:
            return
        raise CLIError(f"--resume: {manifest_path} is not a readable segment manifest; pass "
                       "--overwrite to redo the run, or choose another -o.")
    old = previous.get("parameters")
    if not isinstance(old, dict):  # a manifest written before parameters were recorded
        old_config = previous.get("config") if isinstance(previous.get("config"), dict) else {}
        old = {"config": {k: v for k, v in old_config.items() if k not in _NOT_PARAMETERS},
               "window": plan.run_parameters["window"]}
    diffs = _differences(old, plan.run_parameters)
    if diffs:
        if plan.overwrite:
            return  # redo everything
        raise CLIError(f"--resume: {out} was made with other parameters ({'; '.join(diffs)}); "
                       "rerun with the same ones to continue it, or add --overwrite to redo "
                       "it.")
    entries = {e.get("name"): e for e in previous.get("images", []) if isinstance(e, dict)}
    changed = []
    for f in plan.files:
        stem = file_stem(f)
        record = _read_json_or_none(_partial_paths(out, stem)["record"])
        olds = [e.get("parameters") for e in (entries.get(stem), record)
                if isinstance(e, dict) and e.get("status", "done") in ("done", "interrupted",
                                                                        "running")
                and isinstance(e.get("parameters"), dict)]
        if not olds:
            continue
        now = plan.image_parameters(f, file_sha256(f))
        for old_image in olds:
            diff = _differences(old_image.get("image", old_image), now, limit=2)
            if diff:
                changed.append(f"{f.name}: {'; '.join(diff)}")
                break
    if changed and not plan.overwrite:
        raise CLIError(f"--resume: {len(changed)} image(s) were made with another prompt, "
                       f"input file or slice selection ({' | '.join(changed[:3])}); rerun with "
                       "the same ones, or add --overwrite to redo them.")
    plan.previous = previous


# --------------------------------------------------------------------------- the run


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


def _prompts_json(result) -> dict[str, Any]:
    return {**result.prompts.to_dict(),
            "components": [dataclasses.asdict(c) for c in result.coarse.components],
            "threshold": result.coarse.threshold,
            "n_candidates": result.coarse.n_candidates,
            "found": result.found, "message": result.message}


_FATAL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EROFS}


class _Run:
    """The manifest of one run: entries per image, written atomically (throttled)."""

    def __init__(self, plan: _Plan, pipeline, started: str):
        self.plan = plan
        self.pipeline = pipeline
        self.started = started
        self.entries: dict[str, dict[str, Any]] = {}
        self.kept: dict[str, dict[str, Any]] = {}  # entries of the resumed manifest
        if plan.previous is not None:
            self.kept = {e["name"]: e for e in plan.previous.get("images", [])
                         if isinstance(e, dict) and isinstance(e.get("name"), str)}
        self.last_save = 0.0
        self.versions = _versions()
        clip, sam = pipeline.clip, pipeline.sam
        self.models_sha256 = {"clip": clip.weights_sha256, "sam": sam.checkpoint_sha256}
        self.models = {"clip": {"source": plan.config.clip_model, "id": clip.model_id,
                                "sha256": clip.weights_sha256},
                       "sam": {"name": plan.config.sam_model, "id": sam.model_id,
                               "checkpoint": sam.checkpoint,
                               "sha256": sam.checkpoint_sha256},
                       "device": clip.device}

    def check_models(self) -> None:
        """On --resume, refuse other model weights than the resumed run's (unless
        --overwrite, which redoes everything)."""
        previous = self.plan.previous
        if previous is None:
            return
        old = previous.get("models", {})
        diffs = []
        for key in ("clip", "sam"):
            before = old.get(key, {}).get("sha256") if isinstance(old.get(key), dict) else None
            if before and before != self.models_sha256[key]:
                diffs.append(f"{key.upper()} weights {before[:12]}... -> "
                             f"{(self.models_sha256[key] or 'none')[:12]}...")
        if diffs and not self.plan.overwrite:
            raise CLIError(f"--resume: {self.plan.out} was made with other model weights "
                           f"({'; '.join(diffs)}); use the same models to continue it, or "
                           "add --overwrite to redo it.")
        if diffs:
            self.plan.previous, self.kept = None, {}

    def previous_entry(self, name: str) -> dict[str, Any] | None:
        return self.kept.get(name)

    def record(self, name: str, entry: dict[str, Any]) -> None:
        self.entries[name] = entry
        self.kept.pop(name, None)
        self.save()

    def manifest(self, status: str) -> dict[str, Any]:
        from ..core.io import file_stem

        plan = self.plan
        names = [file_stem(f) for f in plan.files]
        images = [self.entries[n] for n in names if n in self.entries]
        images += [self.kept[n] for n in names if n in self.kept and n not in self.entries]
        images += [e for n, e in self.kept.items() if n not in names]
        by_status: dict[str, list[str]] = {"done": [], "failed": [], "interrupted": []}
        for e in images:
            by_status.setdefault(e.get("status", "done"), []).append(e["name"])
        finished = set(by_status["done"]) | set(by_status["failed"])
        return {
            "tool": "napari-medclipsam", "command": "segment", "status": status,
            "started": self.started,
            "finished": None if status == "running" else time.strftime("%Y-%m-%dT%H:%M:%S"),
            "preset": plan.preset,
            "config": plan.config.to_dict(),
            "parameters": plan.run_parameters,
            "parameters_sha256": _sha256_text(plan.run_parameters),
            "window": dataclasses.asdict(plan.window) if plan.window
            else "auto (0.5-99.5 percentiles)",
            "models": self.models,
            "versions": self.versions,
            "done": by_status["done"], "failed": by_status["failed"],
            "pending": [n for n in names if n not in finished],
            "images": images,
        }

    def save(self, status: str = "running", force: bool = False) -> None:
        from ..core.io import write_text

        now = time.monotonic()
        if not force and now - self.last_save < MANIFEST_SECONDS:
            return
        write_text(self.plan.out / "manifest.json",
                   json.dumps(self.manifest(status), indent=2, default=str))
        self.last_save = time.monotonic()


def _complete(entry: dict[str, Any] | None, parameters_sha256: str, models: dict,
              out: Path) -> bool:
    """True when a resumed entry's outputs can be kept as they are."""
    if not entry or entry.get("status", "done") != "done":
        return False
    if entry.get("parameters_sha256") != parameters_sha256:
        return False
    if entry.get("models_sha256") not in (None, models):
        return False
    outputs = entry.get("outputs") or {}
    return bool(outputs) and all((out / rel).is_file() for rel in outputs.values())


def _is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def run_segment(args: argparse.Namespace) -> int:
    """``medclipsam segment``: see the module docstring."""
    from ..core.pipeline import ZeroShotPipeline

    plan = _plan(args)
    for f, problem in plan.probe_errors.items():
        print(f"{f.name}: error: {problem.removeprefix(f.name + ': ')}", file=sys.stderr)
    pipeline = ZeroShotPipeline(plan.config)

    def stage(name: str, fraction: float) -> None:
        if _is_tty():
            print(f"{name}...", file=sys.stderr)
        else:
            logger.info("%s...", name)

    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    with sigterm_as_interrupt():
        try:
            pipeline.prepare(stage)
        except KeyboardInterrupt as exc:
            print(f"{'Terminated' if isinstance(exc, Terminated) else 'Interrupted'} while "
                  "loading the models; nothing was written.", file=sys.stderr)
            return 143 if isinstance(exc, Terminated) else 130
        run = _Run(plan, pipeline, started)
        run.check_models()
        return _run_all(plan, pipeline, run)


def _run_all(plan: _Plan, pipeline, run: _Run) -> int:
    from tqdm import tqdm

    from ..core.io import file_stem, remove_stale_temporaries

    out = plan.out
    out.mkdir(parents=True, exist_ok=True)
    with _locked(out):
        removed = [p for sub in ("", *OUTPUT_FOLDERS)
                   for p in remove_stale_temporaries(out / sub if sub else out)]
        if removed:
            print(f"Removed {len(removed)} temporary file(s) a stopped run left in {out}.",
                  file=sys.stderr)
        run.save("running", force=True)  # a killed run leaves a manifest to resume from
        failed: list[str] = []
        n_found = n_done = n_kept = 0
        for f, problem in plan.probe_errors.items():
            failed.append(f.name)
            run.record(file_stem(f), {"image": str(f), "name": file_stem(f),
                                      "prompt": plan.prompts[f], "status": "failed",
                                      "error": problem, "error_type": "InputError"})
        todo = [f for f in plan.files if f not in plan.probe_errors]
        bar = tqdm(total=len(todo), desc="segment", unit="image", file=sys.stderr,
                   disable=None)
        current = None
        try:
            for f in todo:
                current = f
                name = file_stem(f)
                bar.set_postfix_str(f.name)
                t0 = time.perf_counter()
                try:
                    entry = _segment_one(plan, pipeline, run, f, bar)
                except KeyboardInterrupt:
                    raise
                except Exception as exc:  # one input must not stop the batch
                    message, fatal = _failure(exc, f, plan.debug)
                    failed.append(f.name)
                    entry = {"image": str(f), "name": name, "prompt": plan.prompts[f],
                             "status": "failed", "error": message,
                             "error_type": type(exc).__name__, **_partial_note(plan, name)}
                    if fatal:  # the next images would fail alike: stop, say it once
                        run.entries[name] = entry
                        with contextlib.suppress(OSError):
                            run.save("failed", force=True)
                        raise
                    print(f"{f.name}: error: {message}", file=sys.stderr)
                    run.record(name, entry)
                    bar.update(1)
                    continue
                if entry.pop("kept", False):
                    n_kept += 1
                else:
                    entry["seconds"] = round(time.perf_counter() - t0, 3)
                n_done += 1
                n_found += bool(entry["found"])
                if not entry["found"]:
                    print(f"{f.name}: {entry['message']}", file=sys.stderr)
                run.record(name, entry)
                bar.update(1)
            current = None
        except KeyboardInterrupt as exc:
            bar.close()
            if current is not None:
                name = file_stem(current)
                run.record(name, {"image": str(current), "name": name,
                                  "prompt": plan.prompts[current], "status": "interrupted",
                                  **_partial_note(plan, name)})
            run.save("interrupted", force=True)
            kind = "Terminated" if isinstance(exc, Terminated) else "Interrupted"
            note = ""
            if current is not None and _partial_paths(out, file_stem(current))["record"].exists():
                note = f"; the finished slices of {current.name} are kept in {out / 'partial'}"
            print(f"{kind}: {n_done} of {len(plan.files)} image(s) done{note}; manifest.json "
                  "written. Continue with the same command and --resume.", file=sys.stderr)
            return 143 if isinstance(exc, Terminated) else 130
        finally:
            bar.close()
        run.save("finished", force=True)
    kept = f" ({n_kept} kept from the run resumed)" if n_kept else ""
    print(f"Segmented {n_done} image(s){kept}, something found in {n_found}; results in {out}")
    if failed:
        print(f"{len(failed)} image(s) failed (see the errors above and manifest.json): "
              f"{', '.join(failed[:10])}", file=sys.stderr)
        return 1
    return 0


class _locked:
    """Exclusive lock on the output folder while a run writes into it (two runs into one
    folder would mix their manifests); released when the process ends, however it ends."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.fd: int | None = None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not on POSIX
            return self
        self.fd = os.open(self.folder, os.O_RDONLY)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self.fd)
            self.fd = None
            raise CLIError(f"Another medclipsam segment is writing to {self.folder}; wait for "
                           "it to finish, or choose another -o folder.") from exc
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        return False


def _partial_note(plan: _Plan, name: str) -> dict[str, Any]:
    record = _read_json_or_none(_partial_paths(plan.out, name)["record"])
    if not isinstance(record, dict):
        return {}
    return {"partial": str(_partial_paths(plan.out, name)["record"].relative_to(plan.out)),
            "slices_done": len(record.get("done", []))}


def _failure(exc: BaseException, f: Path, debug: bool) -> tuple[str, bool]:
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
        return oserror_line(exc), exc.errno in _FATAL_ERRNOS
    text = " ".join(str(exc).split())[:300]
    return (f"internal error ({type(exc).__name__}: {text}); rerun with --debug for the "
            "traceback and please report it."), False


def _segment_one(plan: _Plan, pipeline, run: _Run, f: Path, bar) -> dict[str, Any]:
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
    if plan.resume and _complete(previous, params_sha, run.models_sha256, plan.out):
        return {**previous, "kept": True}
    image = read_image(f)
    if image.is_volume and not plan.volume:
        raise InputError(f"{f.name} is a 3-D volume {image.data.shape}; pass --volume to "
                         "process it slice by slice.")
    common = {"image": str(f), "name": name, "prompt": texts, "status": "done",
              "parameters_sha256": params_sha, "input_sha256": input_sha,
              "models_sha256": run.models_sha256,
              "parameters": {"image": plan.image_parameters(f, input_sha)}}
    if image.is_volume:
        return {**common, **_segment_volume(plan, pipeline, run, f, image, common, bar)}
    paths = _outputs(plan.out, name, False)
    win = plan.window or image.meta.get("window")

    def progress(stage: str, fraction: float) -> None:
        bar.set_postfix_str(f"{f.name}: {stage}", refresh=True)

    res = pipeline.segment(image.data, texts, window=win, progress=progress)
    write_float_tiff(paths["saliency"], res.saliency)
    write_mask_png(paths["coarse"], res.coarse.mask)
    write_text(paths["prompts"], json.dumps(_prompts_json(res), indent=2))
    write_mask_png(paths["mask"], res.mask)
    return {**common, "found": res.found, "message": res.message,
            "outputs": {k: str(v.relative_to(plan.out)) for k, v in paths.items()}}


# --------------------------------------------------------------------------- volumes


def _body_slices(volume, body: dict[str, Any]) -> tuple[list[int], float, str]:
    """Slices whose share of voxels above the body threshold is below the fraction; the
    threshold used and how it was chosen (given, or Otsu's of the volume)."""
    import numpy as np

    threshold, how = body.get("threshold"), "given"
    if threshold is None:
        from skimage.filters import threshold_otsu

        sample = np.asarray(volume).reshape(-1)
        if sample.size > 2_000_000:
            sample = sample[:: int(np.ceil(sample.size / 2_000_000))]
        sample = sample[np.isfinite(sample)].astype(np.float64)
        if sample.size == 0 or sample.min() == sample.max():
            threshold = float(sample.min()) if sample.size else 0.0
        else:
            threshold = float(threshold_otsu(sample))
        how = "otsu"
    share = (np.asarray(volume) > threshold).reshape(volume.shape[0], -1).mean(axis=1)
    skipped = [int(z) for z in np.flatnonzero(share < body["fraction"])]
    return skipped, float(threshold), how


class _VolumeState:
    """A volume's results so far (finished slices), saved as partial files and reloaded."""

    def __init__(self, plan: _Plan, name: str, image, record: dict[str, Any]):
        import numpy as np

        shape = image.data.shape
        self.plan, self.name, self.image = plan, name, image
        self.paths = _partial_paths(plan.out, name)
        self.record = record
        self.saliency = np.zeros(shape, dtype=np.float32)
        self.coarse = np.zeros(shape, dtype=bool)
        self.mask = np.zeros(shape, dtype=bool)
        self.done: list[int] = []
        self.prompts: dict[int, dict] = {}
        self.found: list[int] = []
        self.saved_done = 0
        self.last_write = 0.0
        self.write_seconds = 0.0

    def load(self, record: dict[str, Any]) -> bool:
        """Take the finished slices of an earlier run's partial files; False when they are
        missing or do not fit (then the volume starts over)."""
        import numpy as np
        import tifffile

        from ..core.io import read_image

        try:
            mask = read_image(self.paths["mask"]).data
            coarse = read_image(self.paths["coarse"]).data
            saliency = tifffile.imread(str(self.paths["saliency"]))
        except Exception:  # noqa: BLE001 - unusable partial files: start over
            return False
        if not (mask.shape == coarse.shape == saliency.shape == self.mask.shape):
            return False
        self.mask, self.coarse = mask.astype(bool), coarse.astype(bool)
        self.saliency = np.asarray(saliency, dtype=np.float32)
        self.done = [int(z) for z in record.get("done", [])]
        self.prompts = {int(z): p for z, p in record.get("prompts", {}).items()}
        self.found = [int(z) for z in record.get("found_slices", [])]
        self.saved_done = len(self.done)
        return True

    def add(self, z: int, one) -> None:
        self.saliency[z], self.coarse[z], self.mask[z] = one.saliency, one.coarse.mask, one.mask
        self.done.append(int(z))
        if one.found:
            self.prompts[int(z)] = one.prompts.to_dict()
            self.found.append(int(z))

    def due(self) -> bool:
        wait = max(CHECKPOINT_SECONDS, self.write_seconds / CHECKPOINT_SHARE)
        return time.monotonic() - self.last_write >= wait

    def save(self) -> None:
        """Write the arrays, then the record naming their finished slices (so the record
        never claims a slice the arrays lack), each file atomically."""
        from ..core.io import write_float_tiff, write_nifti_like, write_text

        if len(self.done) == self.saved_done and self.paths["record"].exists():
            return
        t0 = time.monotonic()
        write_nifti_like(self.paths["mask"], self.mask, self.image)
        write_nifti_like(self.paths["coarse"], self.coarse, self.image)
        write_float_tiff(self.paths["saliency"], self.saliency)
        record = {**self.record, "done": sorted(self.done),
                  "found_slices": sorted(self.found),
                  "prompts": {str(z): p for z, p in sorted(self.prompts.items())},
                  "updated": time.strftime("%Y-%m-%dT%H:%M:%S")}
        write_text(self.paths["record"], json.dumps(record, indent=1))
        self.saved_done = len(self.done)
        self.last_write = time.monotonic()
        self.write_seconds = self.last_write - t0

    def remove(self) -> None:
        for path in self.paths.values():
            path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # other volumes' partial files are there
            self.paths["record"].parent.rmdir()


def _segment_volume(plan: _Plan, pipeline, run: _Run, f: Path, image, common: dict,
                    bar) -> dict[str, Any]:
    from tqdm import tqdm

    from ..core.io import auto_window, write_float_tiff, write_nifti_like, write_text

    name = common["name"]
    n_slices = image.data.shape[0]
    planned = list(range(n_slices))
    if plan.slices is not None:
        planned = list(range(*plan.slices.indices(n_slices)))
        if not planned:
            raise InputError(f"--slices {plan.slices_text} selects no slice of {f.name} "
                             f"({n_slices} slices, 0..{n_slices - 1}).")
    skipped: list[int] = []
    body_info = None
    if plan.body is not None:
        empty, threshold, how = _body_slices(image.data, plan.body)
        skipped = [z for z in planned if z in set(empty)]
        body_info = {"threshold": threshold, "threshold_from": how,
                     "fraction": plan.body["fraction"]}
    to_run = [z for z in planned if z not in set(skipped)]
    window = plan.window or image.meta.get("window") or auto_window(image.data)
    record = {"image": str(f), "name": name, "shape": list(image.data.shape),
              "parameters_sha256": common["parameters_sha256"],
              "parameters": {"run": plan.run_parameters, "image": common["parameters"]["image"]},
              "models_sha256": run.models_sha256, "models": {
                  "clip": run.models["clip"]["id"], "sam": run.models["sam"]["id"]},
              "slices_planned": planned, "skipped_slices": skipped, "body": body_info}
    state = _VolumeState(plan, name, image, record)
    previous = _read_json_or_none(state.paths["record"])
    resumed = False
    if plan.resume and isinstance(previous, dict) \
            and previous.get("parameters_sha256") == common["parameters_sha256"] \
            and previous.get("models_sha256") == run.models_sha256 \
            and previous.get("shape") == list(image.data.shape):
        resumed = state.load(previous)
    if not resumed:
        state.remove()
    done_before = set(state.done) & set(to_run)
    remaining = [z for z in to_run if z not in done_before]

    slice_bar = tqdm(total=len(to_run), initial=len(done_before), desc=f"{name} slices",
                     unit="slice", file=sys.stderr, disable=None, leave=False, position=1)
    quiet = slice_bar.disable
    t_start = time.monotonic()
    stage_re = re.compile(r"^slice \d+/\d+ \(z=(\d+)\): (.*)$")

    def progress(stage: str, fraction: float) -> None:
        match = stage_re.match(stage)
        slice_bar.set_postfix_str(f"z={match[1]}: {match[2]}" if match else stage,
                                  refresh=True)

    n_start = len(state.done)

    def on_slice(z: int, one) -> None:
        state.add(z, one)
        slice_bar.update(1)
        if quiet:  # no bar (not a terminal): one line per slice, with the ETA
            n_new = len(state.done) - n_start
            left = len(to_run) - len(set(state.done) & set(to_run))
            eta = (time.monotonic() - t_start) / max(n_new, 1) * left
            print(f"{f.name}: slice {len(to_run) - left}/{len(to_run)} done (z={z}), ETA "
                  f"{_clock(eta)}", file=sys.stderr)
        if state.due():
            state.save()

    if resumed and done_before:
        print(f"{f.name}: resuming, {len(done_before)} of {len(to_run)} slice(s) already done.",
              file=sys.stderr)
    try:
        if remaining:
            state.last_write = time.monotonic()
            pipeline.segment_volume(image.data, plan.prompts[f], window=window,
                                    slices=remaining, progress=progress, on_slice=on_slice)
    except BaseException:
        if state.done:
            state.save()  # keep every finished slice, whatever stopped the run
        raise
    finally:
        slice_bar.close()
    paths = _outputs(plan.out, name, True)
    write_float_tiff(paths["saliency"], state.saliency)
    write_nifti_like(paths["coarse"], state.coarse, image)
    write_nifti_like(paths["mask"], state.mask, image)
    found = sorted(set(state.found) & set(planned))
    write_text(paths["prompts"], json.dumps(
        {"slices": {str(z): state.prompts[z] for z in found}, "found_slices": found,
         "slices_run": to_run, "skipped_slices": skipped, "body": body_info}, indent=2))
    state.remove()
    message = f"found on {len(found)} of {n_slices} slices"
    if skipped:
        message += f" ({len(skipped)} skipped outside the body)"
    if not to_run:
        message = (f"nothing segmented: all {len(planned)} selected slice(s) are outside the "
                   f"body (threshold {body_info['threshold']:g}); lower --body-threshold or "
                   "--body-fraction")
    return {"found": bool(found), "message": message,
            "outputs": {k: str(v.relative_to(plan.out)) for k, v in paths.items()},
            "volume": {"slices_total": n_slices, "slices_selected": plan.slices_text or "all",
                       "slices_run": to_run, "skipped_slices": skipped, "body": body_info,
                       "found_slices": found, "slices_resumed": len(done_before)}}


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else \
        f"{rest // 60:02d}:{rest % 60:02d}"

