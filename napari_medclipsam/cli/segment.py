"""``medclipsam segment``: zero-shot segmentation of images or volumes, file by file.

Outputs (per image ``NAME``, paired with prompts by file name, never by listing order)::

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
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import __version__
from ..core.config import PipelineConfig
from ..core.errors import InputError
from .common import CLIError, add_chain_flags, add_model_flags, logger

__all__ = ["add_parser", "collect_images", "config_from_args", "format_presets",
           "resolve_prompts", "run_segment"]


def add_parser(sub) -> None:
    """Register ``segment`` on the top-level subparsers."""
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
    seg.add_argument("--preset", metavar="NAME",
                     help="named settings of a task of the paper (e.g. breast-us: the "
                          "authors' code; breast-us-paper: the paper's coarse mask); applied "
                          "over --config, and flags given override it. See --list-presets.")
    seg.add_argument("--list-presets", action=_ListPresets,
                     help="print the presets (name, what each reproduces, settings) and exit.")
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


def config_from_args(args: argparse.Namespace) -> PipelineConfig:
    """PipelineConfig from defaults, an optional --config file, an optional --preset,
    then the flags given (every chain flag defaults to None, "not given")."""
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


def collect_images(items: Sequence[str]) -> list[Path]:
    """Files given, and supported files inside given folders (sorted by name)."""
    from ..core.io import SUPPORTED

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
    from ..core.io import file_stem

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

    from ..core.io import Window, file_stem, write_text
    from ..core.pipeline import ZeroShotPipeline

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
        "preset": getattr(args, "preset", None),
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
    from ..core.io import (
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
