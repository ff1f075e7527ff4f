"""``medclipsam calibrate``: tune the chain's parameters on cases a person has corrected.

    medclipsam calibrate --images DIR --masks CORRECTED_DIR --prompt TEXT -o PRESET.json
    medclipsam calibrate --dataset RAW/Dataset001_Breast --prompt TEXT -o PRESET.json

The search, its cost and the cross-validation are :mod:`napari_medclipsam.core.calibrate`'s;
this module finds the cases, checks everything that needs no model (flags, cases, prompts,
output files, the number of cases against ``--folds``), loads the models and writes::

    PRESET.json            {"config": ..., "prompt": [...], "calibration": ...}: a
                           ``medclipsam segment --config PRESET.json`` file (the widget's
                           Load settings reads it too); ``prompt`` only when one prompt applies
    PRESET.folds.csv       per fold: held-out cases, defaults' and tuned Dice, chosen settings
    PRESET.table.csv       Dice of every combination on every case
    PRESET.report.json     all of it, with the costs
    PRESET.folds.png       defaults vs tuned per fold (held-out Dice)

Cases: ``--images``/``--masks`` pairs images with masks by file name without suffix (as
``evaluate`` does); ``--dataset`` reads an nnU-Net raw dataset written by ``medclipsam nnunet
export`` and uses only the cases its ``medclipsam_cases.json`` marks ``"corrected": true``. A
missing mask or an unreadable image is reported and skipped. Nothing is overwritten without
``--overwrite``, and nothing is written but the files above.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from ..core.calibrate import CaseFile, read_cases
from .common import (
    CLIError,
    Terminated,
    add_chain_flags,
    add_model_flags,
    check_device,
    check_writable_folder,
    stop_requests,
)

__all__ = ["CaseFile", "add_parser", "dataset_case_files", "folder_case_files", "read_cases",
           "run_calibrate"]


def add_parser(sub) -> None:
    """Register ``calibrate`` on the top-level subparsers."""
    from ..core.calibrate import GRIDS, SearchSpace

    d = SearchSpace()
    cal = sub.add_parser(
        "calibrate", help="tune the chain's parameters on corrected cases (k-fold "
                          "cross-validated Dice against the corrections).",
        description="Search the parameters that differ between datasets (M2IB layer and beta, "
                    "threshold method, eta_c, top-K, box mode and margin, boxes or points, "
                    "SAM backends, optionally the prompt) on cases a person corrected, and "
                    "write the best as a preset for 'medclipsam segment --config'. Its "
                    "expected Dice is k-fold cross-validated: each fold's choice is scored "
                    "only on cases it was not tuned on, next to the defaults' on the same "
                    "cases.")
    g = cal.add_argument_group("corrected cases (--images and --masks, or --dataset)")
    g.add_argument("--images", metavar="DIR", help="folder of images.")
    g.add_argument("--masks", metavar="DIR",
                   help="folder of corrected masks, paired with the images by file name "
                        "without suffix (case_01.png <-> case_01.png or case_01.nii.gz).")
    g.add_argument("--dataset", metavar="DIR",
                   help="an nnU-Net raw dataset folder written by 'medclipsam nnunet export' "
                        "(RAW/Dataset001_NAME): only its cases marked corrected in "
                        "medclipsam_cases.json are used.")
    g.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                   help="what to find; repeat for a prompt ensemble.")
    g.add_argument("--prompt-file", metavar="JSON",
                   help="JSON mapping file name (or case name) -> prompt or list of prompts; "
                        "key 'default' for the rest.")
    g.add_argument("--candidate-prompt", action="append", default=None, metavar="TEXT",
                   help="also try this prompt for every case (repeat for several): the "
                        "calibration then chooses the prompt too.")
    g.add_argument("--window", metavar="C,W",
                   help="intensity window centre,width for non-8-bit data, as for segment.")
    o = cal.add_argument_group("output and cross-validation")
    o.add_argument("-o", "--out", required=True, metavar="PRESET.json",
                   help="the preset to write; its report files go beside it "
                        "(PRESET.folds.csv, .table.csv, .report.json, .folds.png).")
    o.add_argument("--overwrite", action="store_true",
                   help="replace an existing preset and its report files.")
    o.add_argument("--folds", type=int, default=5,
                   help="k of the k-fold cross-validation (default 5; needs at least k cases).")
    o.add_argument("--cv-seed", type=int, default=0, metavar="N",
                   help="seed of the folds' shuffle (default 0; cases are sorted by name "
                        "first, so the same cases and seed give the same folds).")
    o.add_argument("--config", metavar="JSON",
                   help="start from the parameters of a saved config, run manifest or preset: "
                        "they are the defaults the tuned settings are compared with; the "
                        "chain flags below override them.")
    o.add_argument("--preset", metavar="NAME",
                   help="start from a named preset of segment (see 'medclipsam segment "
                        "--list-presets').")
    s = cal.add_argument_group(
        "search grid", "Lists of values separated by commas. The defaults' value of each "
                       "parameter (the chain flags, --config) is always tried too.")
    s.add_argument("--grid", choices=GRIDS, default="default",
                   help=f"default: M2IB layers {_show(d.layers)} x betas {_show(d.betas)}, "
                        f"{_show(d.threshold_methods)}, eta_c {_show(d.eta_cs)}, top-K "
                        f"{_show(d.top_ks)}, {_show(d.box_modes)} boxes, margin "
                        f"{_show(d.box_margins)} of the image side, {_show(d.prompt_modes)}; "
                        "small: layers 7,9 x betas 0.1,1, otsu,kmeans, top-K 1,2, both box "
                        "modes, boxes only (a quick run).")
    s.add_argument("--sam-models", metavar="NAME[=PATH],...",
                   help="SAM backends to compare (e.g. sam2_t,vit_b=/models/sam_vit_b.pth); "
                        "default: the --sam-model one. Without --sam-model, the first is the "
                        "defaults'.")
    s.add_argument("--saliency-methods", metavar="M,...",
                   help="saliency methods to try (default m2ib; gscorecam and gradcam are "
                        "slow and have no layer or beta).")
    s.add_argument("--layers", metavar="L,...", help="M2IB layers to try.")
    s.add_argument("--betas", metavar="B,...", help="M2IB betas to try.")
    s.add_argument("--threshold-methods", metavar="M,...", help="threshold methods to try.")
    s.add_argument("--eta-cs", metavar="E,...", help="component confidence thresholds to try.")
    s.add_argument("--top-ks", metavar="K,...", help="components kept to try (0: all).")
    s.add_argument("--box-modes", metavar="M,...", help="box modes to try.")
    s.add_argument("--box-margins", metavar="F,...",
                   help="box margins to try, as fractions of the image's longer side "
                        "(0.02 = 2%%).")
    s.add_argument("--prompt-modes", metavar="M,...", help="prompt modes to try.")
    add_model_flags(cal)
    add_chain_flags(cal)
    cal.set_defaults(func=run_calibrate)


def _show(values) -> str:
    return ",".join("all" if v is None else f"{v:g}" if isinstance(v, float) else str(v)
                    for v in values)


def _split(text: str, flag: str, kind=str) -> tuple:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise CLIError(f"{flag} {text!r}: give values separated by commas.")
    try:
        return tuple(kind(t) for t in items)
    except ValueError:
        raise CLIError(f"{flag} {text!r}: every value must be a "
                       f"{'whole number' if kind is int else 'number'}.") from None


def _top_k(text: str) -> int | None:
    value = int(text)
    return None if value == 0 else value


def search_space(args: argparse.Namespace):
    """The :class:`~napari_medclipsam.core.calibrate.SearchSpace` of the flags."""
    from ..core.calibrate import SearchSpace
    from ..core.errors import InputError

    flags = {"saliency_methods": ("--saliency-methods", str),
             "layers": ("--layers", int), "betas": ("--betas", float),
             "threshold_methods": ("--threshold-methods", str),
             "eta_cs": ("--eta-cs", float), "top_ks": ("--top-ks", _top_k),
             "box_modes": ("--box-modes", str), "box_margins": ("--box-margins", float),
             "prompt_modes": ("--prompt-modes", str)}
    changes = {}
    for name, (flag, kind) in flags.items():
        text = getattr(args, name)
        if text is not None:
            changes[name] = _split(text, flag, kind)
    candidates = [t.strip() for t in args.candidate_prompt or []]
    if args.candidate_prompt and not all(candidates):
        raise CLIError("--candidate-prompt is empty; write a prompt to try.")
    if candidates:
        changes["prompts"] = tuple(candidates)
    try:
        return SearchSpace.named(args.grid, **changes)
    except InputError as exc:
        text = str(exc).replace("calibration grid: ", "")
        for name, (flag, _) in flags.items():
            text = text.replace(f"{name} ", f"{flag} ")
        raise CLIError(text.replace("candidate prompts", "--candidate-prompt")) from exc


def _sam_models(text: str | None) -> list[tuple[str, str | None]]:
    """``--sam-models`` -> [(name, checkpoint or None), ...]."""
    from ..core.models import SAM_MODELS

    if text is None:
        return []
    out = []
    for item in _split(text, "--sam-models"):
        name, _, path = item.partition("=")
        name = name.strip()
        if name not in SAM_MODELS or name == "auto":
            raise CLIError(f"--sam-models: unknown SAM backend {name!r}; choose among "
                           f"{', '.join(m for m in SAM_MODELS if m != 'auto')}.")
        out.append((name, path.strip() or None))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise CLIError("--sam-models: each backend once.")
    return out


# --------------------------------------------------------------------------- cases


def folder_case_files(images: str | Path, masks: str | Path
                      ) -> tuple[list[CaseFile], list[str]]:
    """Images paired with same-name masks; and one line per image without a mask."""
    from ..core.evaluate import list_masks
    from ..core.io import file_stem
    from .segment import collect_images

    images, masks = Path(images), Path(masks)
    for folder, flag in ((images, "--images"), (masks, "--masks")):
        if not folder.is_dir():
            raise CLIError(f"{flag} {folder}: not a folder.")
    files = collect_images([str(images)])
    by_name = list_masks(masks)
    pairs, skipped = [], []
    for f in files:
        name = file_stem(f)
        if name in by_name:
            pairs.append(CaseFile(name, f, by_name[name]))
        else:
            skipped.append(f"{f.name}: no mask named {name}.* in {masks}; skipped.")
    return pairs, skipped


def dataset_case_files(dataset: str | Path) -> tuple[list[CaseFile], list[str], int]:
    """The corrected cases of an nnU-Net raw dataset exported by medclipsam; one line per
    corrected case whose files are missing; and how many uncorrected cases were left out
    (:func:`napari_medclipsam.core.calibrate.dataset_case_files`, its problems as
    ``--dataset`` errors)."""
    from ..core.calibrate import dataset_case_files as read_dataset
    from ..core.errors import InputError
    from ..nnunet.export import CASES_FILE

    try:
        found = read_dataset(dataset, CASES_FILE, instead="use --images and --masks instead")
    except InputError as exc:
        raise CLIError(f"--dataset {exc}") from exc
    return found.files, found.missing, found.uncorrected


def _case_prompts(args: argparse.Namespace, files: list[CaseFile], by_mask: bool = False
                  ) -> dict[str, list[str]]:
    """Each case's own prompt (empty when only candidate prompts are given), matched by the
    image's file name (or the mask's, named by case, for a dataset) as segment matches it."""
    from .segment import resolve_prompts

    if not args.prompt and not args.prompt_file:
        if args.candidate_prompt:
            return {}
        raise CLIError("Give the prompt: --prompt TEXT (what the masks show), --prompt-file "
                       "JSON, or --candidate-prompt TEXT to choose among several.")
    keys = {(f.mask if by_mask else f.image): f.name for f in files}
    resolved = resolve_prompts(list(keys), args.prompt, args.prompt_file)
    return {keys[k]: v for k, v in resolved.items()}


# --------------------------------------------------------------------------- the run


def _base_config(args: argparse.Namespace, sams: list[tuple[str, str | None]]):
    from .segment import config_from_args

    config = config_from_args(args)
    if config.method != "medclipsamv2":
        raise CLIError("calibrate tunes the MedCLIP-SAMv2 chain (saliency, coarse mask, SAM); "
                       f"leave out --method {config.method}.")
    if sams and args.sam_model is None:
        name, path = sams[0]
        config = dataclasses.replace(config, sam_model=name,
                                     sam_checkpoint=args.sam_checkpoint or path)
    return config


def _extra_sams(config, sams: list[tuple[str, str | None]]) -> list:
    """Load the --sam-models backends other than the pipeline's (sources checked first)."""
    from ..core.models import (
        ModelUnavailableError,
        check_sam_source,
        load_sam,
        resolve_sam_model,
    )

    own = resolve_sam_model(config.sam_model, config.device)
    extra = [(name, path) for name, path in sams if name != own]
    problems = [f"SAM {name}: {p}" for name, path in extra
                for p in check_sam_source(name, path, config.device)]
    if problems:
        raise ModelUnavailableError("\n".join(problems))
    return [load_sam(name, path, config.device) for name, path in extra]


def run_calibrate(args: argparse.Namespace) -> int:
    """``medclipsam calibrate``: see the module docstring."""
    from ..core.calibrate import (
        SearchSpace,
        calibrate,
        check_calibration_paths,
        check_case_count,
        write_calibration,
    )
    from ..core.errors import CancelledError
    from ..core.io import Window
    from ..core.pipeline import ZeroShotPipeline

    if args.dataset and (args.images or args.masks):
        raise CLIError("Give --dataset, or --images and --masks, not both.")
    if not args.dataset and not (args.images and args.masks):
        raise CLIError("Give the corrected cases: --images DIR --masks DIR, or --dataset "
                       "NNUNET_RAW_DATASET_DIR.")
    sams = _sam_models(args.sam_models)
    space: SearchSpace = search_space(args)
    config = _base_config(args, sams)
    window = Window.parse(args.window) if args.window else None
    out = Path(args.out)
    check_calibration_paths(out, args.overwrite)
    check_writable_folder(out.parent if str(out.parent) else Path("."))
    check_device(config.device)
    if args.dataset:
        files, skipped, uncorrected = dataset_case_files(args.dataset)
    else:
        files, skipped = folder_case_files(args.images, args.masks)
    prompts = _case_prompts(args, files, by_mask=bool(args.dataset))
    cases, unreadable = read_cases(files, prompts, window)
    for line in skipped + unreadable:
        print(f"warning: {line}", file=sys.stderr)
    if args.dataset:
        bad = len(skipped) + len(unreadable)
        print(f"{args.dataset}: {len(cases)} corrected case(s) used"
              f"{f' ({bad} unusable, see above)' if bad else ''}; {uncorrected} uncorrected "
              "(zero-shot) case(s) skipped.", file=sys.stderr)
    check_case_count(len(cases), args.folds)
    print(f"Calibrating on {len(cases)} corrected case(s) ({args.folds}-fold "
          f"cross-validation, {args.grid} grid).", file=sys.stderr)
    pipeline = ZeroShotPipeline(config)
    pipeline.prepare(lambda stage, fraction: print(f"{stage}...", file=sys.stderr))
    extra = _extra_sams(config, sams)
    with stop_requests("Stopping at the next step; nothing will be written (press Ctrl-C "
                       "again to stop at once).") as request, _Bar() as bar:
        try:
            result = calibrate(pipeline, cases, space, folds=args.folds, seed=args.cv_seed,
                               sams=extra, progress=bar.update, should_stop=request)
        except CancelledError:
            bar.close()
            interrupt = request.interrupt()
            print(f"{'Terminated' if isinstance(interrupt, Terminated) else 'Interrupted'}: "
                  "calibration stopped; nothing was written.", file=sys.stderr)
            return 143 if isinstance(interrupt, Terminated) else 130
    paths = write_calibration(result, out, overwrite=args.overwrite)
    print(result.summary())
    prompt = result.preset().get("prompt")
    use = f" --prompt {_quote(prompt[0])}" if prompt and len(prompt) == 1 else " --prompt ..."
    print(f"Saved {paths['preset']} (tuned on {len(cases)} corrected cases) and its report: "
          f"{paths['folds'].name}, {paths['table'].name}, {paths['report'].name}, "
          f"{paths['plot'].name}.")
    print(f"Use it: medclipsam segment IMAGES --config {_quote(str(paths['preset']))}{use} "
          "-o OUT")
    if result.warning:
        print(f"warning: {result.warning}", file=sys.stderr)
    return 0


def _quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


class _Bar:
    """A tqdm bar over the calibration's fraction, the stage as its postfix (hidden when not
    a terminal)."""

    def __enter__(self) -> _Bar:
        from tqdm import tqdm

        self.bar = tqdm(total=1000, desc="calibrate", file=sys.stderr, disable=None,
                        bar_format="{l_bar}{bar}| {elapsed}<{remaining} {postfix}")
        return self

    def update(self, stage: str, fraction: float) -> None:
        self.bar.update(max(0, int(1000 * fraction) - self.bar.n))
        self.bar.set_postfix_str(stage, refresh=False)

    def close(self) -> None:
        self.bar.close()

    def __exit__(self, *exc) -> None:
        self.bar.close()
