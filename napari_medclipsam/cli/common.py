"""What several ``medclipsam`` subcommands share: the user-error type, model and chain
flags, a tqdm progress callback, and the CLI-wide handling of warnings, OS errors, SIGTERM
and stop requests (:func:`stop_requests`)."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import re
import signal
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..core.config import (
    BOX_MODES,
    CAM_MODULES,
    DEFAULT_CLIP_MODEL,
    DEFAULT_VLSM_MODEL,
    METHODS,
    PRECISIONS,
    PROMPT_MODES,
    RANK_BY,
    READOUTS,
    SALIENCY_METHODS,
    SALIP_CROPS,
    THRESHOLD_METHODS,
    CoarseMaskConfig,
    FaithfulnessConfig,
    PromptConfig,
    SaliencyConfig,
    SalipConfig,
    SamConfig,
    VlsmConfig,
)
from ..core.errors import InputError
from ..core.models import SAM_MODELS

__all__ = ["CLIError", "StopRequest", "Terminated", "add_chain_flags",
           "add_faithfulness_flags", "add_model_flags", "add_salip_flags", "add_vlsm_flags",
           "salip_config_from_args",
           "check_device", "check_writable_folder", "logger", "oserror_line", "quiet_warnings",
           "read_json_file", "sigterm_as_interrupt", "stop_requests", "tqdm_progress"]

logger = logging.getLogger("medclipsam")


class CLIError(Exception):
    """A user mistake: printed as one clear line, exit status 2."""


class Terminated(KeyboardInterrupt):
    """SIGTERM received (see :func:`sigterm_as_interrupt`): stops the work like Ctrl-C."""


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """CLIP and SAM model choice and the device (defaults come from the pipeline config)."""
    g = p.add_argument_group("models")
    g.add_argument("--clip-model", default=None,
                   help=f"CLIP: 'hf-hub:ORG/NAME', 'local-dir:PATH' or a checkpoint file "
                        f"(default {DEFAULT_CLIP_MODEL}).")
    g.add_argument("--sam-model", default=None, choices=SAM_MODELS,
                   help="SAM backend (default auto: auto = vit_h on a CUDA GPU, sam2_t (SAM "
                        "2.1 tiny) on a CPU; the choice is printed at the start). vit_b, "
                        "vit_l, vit_h: SAM; medsam: MedSAM (ViT-B); sam2_t, sam2_s, sam2_b+, "
                        "sam2_l: SAM 2.1 hiera tiny, small, base-plus, large; medsam2: "
                        "MedSAM2 (SAM 2.1 tiny fine-tuned on medical images, 512x512).")
    g.add_argument("--sam-checkpoint", default=None, metavar="PATH",
                   help="local weights of the --sam-model backend: a SAM/MedSAM .pth or a SAM "
                        "2.1 .pt (e.g. sam2.1_hiera_tiny.pt for sam2_t); default: download the "
                        "official one, hash-checked, into $MEDCLIPSAM_HOME.")
    g.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:N or mps (default: CUDA, then MPS, then CPU).")
    g.add_argument("--precision", default=None, choices=PRECISIONS,
                   help="numeric precision of M2IB and the image encoders (default auto: auto "
                        "= bf16 where the CPU/GPU has it natively, else fp32). The precision "
                        "used is recorded in the manifest.")


def add_chain_flags(p: argparse.ArgumentParser) -> None:
    """Saliency, coarse-mask, prompt and SAM parameters; every default is None (not given)."""
    s, c, q, m = SaliencyConfig(), CoarseMaskConfig(), PromptConfig(), SamConfig()
    g = p.add_argument_group("method")
    g.add_argument("--method", choices=METHODS,
                   help="medclipsamv2: saliency -> coarse mask -> SAM (MedCLIP-SAMv2, the "
                        "default; --saliency gscorecam --threshold-method crf gives "
                        "MedCLIP-SAM); salip: SAM's automatic masks, the best crop for the "
                        "text chosen by CLIP, its box -> SAM (SaLIP, the --salip-* flags); "
                        "vlsm: a vision-language segmentation model's (CLIPSeg, "
                        "BiomedCLIPSeg) probability for the text, thresholded into the mask, "
                        "optionally refined by SAM (segment's --vlsm-* flags; no CLIP is "
                        "loaded).")
    add_salip_flags(p)
    add_faithfulness_flags(p)
    g = p.add_argument_group("saliency")
    g.add_argument("--saliency", choices=SALIENCY_METHODS,
                   help=f"m2ib: M2IB (MedCLIP-SAMv2, default {s.method}); gscorecam: "
                        "gScoreCAM (MedCLIP-SAM); gradcam: GradCAM (the baseline). The CAMs "
                        "read the last ViT block (--cam-layer).")
    g.add_argument("--cam-layer", type=int,
                   help=f"gScoreCAM/GradCAM: ViT block whose norm2 output is read (default "
                        f"{s.cam_layer}: the last).")
    g.add_argument("--cam-module", choices=CAM_MODULES,
                   help=f"gScoreCAM/GradCAM: the block's LayerNorm read (default "
                        f"{s.cam_module}; norm2 as MedCLIP-SAM's code, where the last block's "
                        "gradient is zero).")
    g.add_argument("--cam-channels", type=int,
                   help=f"gScoreCAM: channels kept by mean gradient (default {s.cam_channels}).")
    g.add_argument("--cam-batch", type=int,
                   help=f"gScoreCAM: masked images per CLIP batch (default {s.cam_batch}).")
    g.add_argument("--layer", type=int, help=f"ViT block of the bottleneck (default {s.layer}; "
                                             "9 for breast/brain in the paper's scripts).")
    g.add_argument("--beta", type=float, help=f"compression weight (default {s.beta}).")
    g.add_argument("--steps", type=int, help=f"optimisation steps (default {s.steps}).")
    g.add_argument("--lr", type=float, help=f"learning rate (default {s.lr}).")
    g.add_argument("--batch-size", type=int, help=f"noise samples per step (default "
                                                  f"{s.batch_size}).")
    g.add_argument("--seed", type=int, help=f"seed of the noise and point sampling "
                                            f"(default {s.seed}).")
    g.add_argument("--readout", choices=READOUTS,
                   help=f"which capacity becomes the map: last_forward = the last forward "
                        f"pass's, before the final update, as the authors' code reads it; "
                        f"final = after all updates, as earlier versions of this tool did "
                        f"(default {s.readout}).")
    g = p.add_argument_group("coarse mask")
    g.add_argument("--threshold-method", choices=THRESHOLD_METHODS,
                   help=f"default {c.method} (the paper); kmeans as the authors' scripts; crf: "
                        "MedCLIP-SAM's DenseCRF of the map with the image (needs "
                        "pydensecrf2: pip install 'napari-medclipsam[crf]').")
    g.add_argument("--threshold", type=float, help=f"for --threshold-method fixed "
                                                   f"(default {c.threshold}).")
    g.add_argument("--eta-c", type=float, help=f"keep components with confidence > eta_c "
                                               f"(default {c.eta_c}).")
    g.add_argument("--top-k", type=int,
                   help=f"keep the K best components; 0 keeps all (default {c.top_k}; 2 for "
                        f"lungs). With --method salip: the K best crops are retrieved (1; 2 "
                        f"for paired organs).")
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


def add_faithfulness_flags(p: argparse.ArgumentParser) -> None:
    """The prompt-faithfulness check's flags (every default None or off: not given)."""
    f = FaithfulnessConfig()
    g = p.add_argument_group(
        "prompt faithfulness",
        "Every run also maps a neutral prompt (and any contrast prompts) on the same image and "
        "reports how alike the maps are, with a warning when the text does not steer the "
        "result (in the manifest, prompts/NAME.json and on the console).")
    g.add_argument("--neutral-prompt", metavar="TEXT",
                   help=f"the prompt that names nothing (default {f.neutral_prompt!r}; '' is "
                        f"the empty prompt).")
    g.add_argument("--contrast-prompt", action="append", metavar="TEXT",
                   help="a prompt the result must differ from, e.g. 'normal breast tissue' "
                        "(repeatable).")
    g.add_argument("--faithfulness-threshold", type=float, metavar="R",
                   help=f"warn when a map is at least this correlated with the neutral or a "
                        f"contrast prompt's (default {f.max_correlation}).")
    g.add_argument("--no-faithfulness", action="store_true",
                   help="skip the check (saves one more saliency optimisation per image).")


def add_vlsm_flags(p: argparse.ArgumentParser) -> None:
    """The VLSM chain's flags (with ``--method vlsm``); every default is None (not given)."""
    d = VlsmConfig()
    g = p.add_argument_group(
        "VLSM (with --method vlsm)",
        "A vision-language segmentation model gives the foreground probability of the text "
        "(written to OUT/saliency); its pixels above --vlsm-threshold are the coarse mask "
        "(components, --top-k, prompts as for the saliency). No CLIP is loaded, and SAM only "
        "with --vlsm-refine.")
    g.add_argument("--vlsm-model", metavar="MODEL",
                   help=f"a model folder trained by 'medclipsam vlsm train' (with vlsm.json), "
                        f"or released CLIPSeg weights: a Hugging Face id or 'local-dir:PATH' "
                        f"(default {DEFAULT_VLSM_MODEL}).")
    g.add_argument("--vlsm-threshold", type=float, metavar="T",
                   help=f"probability above which a pixel is foreground, in (0, 1) (default "
                        f"{d.threshold}).")
    g.add_argument("--vlsm-refine", action="store_true", default=None,
                   help="give the VLSM mask's boxes (--prompt-mode) to SAM and keep SAM's mask "
                        "(--sam-model, --sam-checkpoint); default: keep the VLSM's own mask, "
                        "no SAM loaded.")


def add_salip_flags(p: argparse.ArgumentParser) -> None:
    """SaLIP's automatic-mask-generator and retrieval parameters (with ``--method salip``)."""
    d = SalipConfig()
    g = p.add_argument_group(
        "SaLIP (with --method salip)",
        "SAM's automatic mask generator, then CLIP retrieval. SaLIP tunes these per dataset "
        "against ground-truth masks; the defaults are the middle of its search grid (points "
        "per side: the densest). Areas are fractions of the image.")
    g.add_argument("--salip-points-per-side", type=int, metavar="N",
                   help=f"grid of point prompts per side (default {d.points_per_side}).")
    g.add_argument("--salip-pred-iou", type=float, metavar="T",
                   help=f"drop proposals with predicted IoU <= T (default {d.pred_iou_thresh}).")
    g.add_argument("--salip-stability", type=float, metavar="T",
                   help=f"drop proposals with stability score <= T (default "
                        f"{d.stability_thresh}).")
    g.add_argument("--salip-box-nms", type=float, metavar="T",
                   help=f"box NMS IoU within a crop (default {d.box_nms_thresh}).")
    g.add_argument("--salip-crop-nms", type=float, metavar="T",
                   help=f"box NMS IoU across crops (default {d.crop_nms_thresh}).")
    g.add_argument("--salip-crop-layers", type=int, metavar="N",
                   help=f"layers of image crops (default {d.crop_n_layers}: the image and its "
                        f"4 quarters).")
    g.add_argument("--salip-crop-downscale", type=int, metavar="F",
                   help=f"points per side divided by F per crop layer (default "
                        f"{d.crop_downscale}).")
    g.add_argument("--salip-min-region", type=float, metavar="FRACTION",
                   help=f"remove holes and islands smaller than this fraction of the image "
                        f"from each proposal (default {d.min_region_area}; 0: keep).")
    g.add_argument("--salip-area-cap", type=float, metavar="FRACTION",
                   help=f"drop proposals larger than this fraction of the image (default "
                        f"{d.area_cap}).")
    g.add_argument("--salip-crop", choices=SALIP_CROPS,
                   help=f"what CLIP scores: mask = the image times the proposal inside its "
                        f"box (SaLIP's), box = the image inside the box (default {d.crop}).")


def salip_config_from_args(base: SalipConfig, args: argparse.Namespace,
                           top_k: int | None = None) -> SalipConfig:
    """``base`` with the ``--salip-*`` flags given (and ``top_k``) applied."""
    import dataclasses

    mapping = {"points_per_side": "salip_points_per_side", "pred_iou_thresh": "salip_pred_iou",
               "stability_thresh": "salip_stability", "box_nms_thresh": "salip_box_nms",
               "crop_nms_thresh": "salip_crop_nms", "crop_n_layers": "salip_crop_layers",
               "crop_downscale": "salip_crop_downscale", "min_region_area": "salip_min_region",
               "area_cap": "salip_area_cap", "crop": "salip_crop"}
    changes = {field: getattr(args, flag) for field, flag in mapping.items()
               if getattr(args, flag, None) is not None}
    if top_k is not None:
        changes["top_k"] = top_k
    return dataclasses.replace(base, **changes) if changes else base


def add_scheduler_flags(p: argparse.ArgumentParser, description: str) -> None:
    """``--scheduler``, ``--workers`` and ``--threads-per-worker`` (a Dask cluster; see
    :mod:`napari_medclipsam.cluster`) in a group described by ``description``."""
    g = p.add_argument_group("many images on a Dask cluster", description)
    g.add_argument("--scheduler", metavar="local|tcp://HOST:8786",
                   help="'local': a cluster of --workers processes on this machine; or the "
                        "address of a running Dask scheduler ('dask scheduler' on one "
                        "machine, 'dask worker tcp://HOST:8786' on each GPU box, or "
                        "dask-jobqueue on SLURM/PBS). Without it, one image after the other "
                        "here.")
    g.add_argument("--workers", type=int, metavar="N",
                   help="with --scheduler local: worker processes (default: one per GPU, "
                        "else 2).")
    g.add_argument("--threads-per-worker", type=int, metavar="T",
                   help="torch threads of each worker (default: the CPU cores shared between "
                        "the workers of a local cluster; a running cluster's own setting).")


def check_scheduler_flags(args: argparse.Namespace) -> None:
    """``--scheduler`` is valid (normalised in ``args``); ``--workers`` and
    ``--threads-per-worker`` are positive and come with ``--scheduler`` (``--workers`` with
    ``local`` only).

    Raises
    ------
    CLIError
        In one line.
    """
    from ..cluster import LOCAL, check_scheduler

    try:
        args.scheduler = check_scheduler(getattr(args, "scheduler", None))
    except InputError as exc:
        raise CLIError(str(exc)) from None
    for flag, value in (("--workers", args.workers),
                        ("--threads-per-worker", args.threads_per_worker)):
        if value is not None and value < 1:
            raise CLIError(f"{flag} {value}: give at least 1.")
        if value is not None and args.scheduler is None:
            raise CLIError(f"{flag} applies with --scheduler.")
    if args.workers is not None and args.scheduler != LOCAL:
        raise CLIError("--workers applies to --scheduler local (a running cluster has the "
                       "workers it has).")


def tqdm_progress(desc: str) -> Callable[[int, int], None]:
    """A ``progress(step, total)`` callback drawing a tqdm bar (hidden when not a TTY)."""
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


# --------------------------------------------------------------------------- CLI-wide

#: Third-party warnings are hidden unless ``--debug``: users cannot act on them (e.g.
#: ``FutureWarning: torch.jit.interface is deprecated``, timm/transformers deprecations).
_OUR_MODULES = r"napari_medclipsam(\.|$)"


def quiet_warnings(debug: bool = False) -> None:
    """Install the warning filters of a CLI run (call inside ``warnings.catch_warnings()``,
    before torch, timm or open_clip are imported, so their import-time warnings are covered).

    Without ``debug`` every warning is hidden except a ``UserWarning`` raised by this
    package itself; with it, every warning is shown (once per place)."""
    if debug:
        warnings.simplefilter("default")
        return
    warnings.simplefilter("ignore")
    warnings.filterwarnings("default", category=UserWarning, module=_OUR_MODULES)


#: OSError numbers that every later file of a batch would meet too: the batch stops on them.
FATAL_ERRNOS = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EROFS})


def is_fatal_oserror(exc: BaseException) -> bool:
    """Whether ``exc`` is an OSError that stops a batch (full disk, quota, read-only)."""
    return isinstance(exc, OSError) and exc.errno in FATAL_ERRNOS


def exception_line(exc: BaseException) -> str:
    """One line for a failed file: :func:`oserror_line` for an OSError, an InputError's own
    text, else the exception's type and text (at most 300 characters)."""
    if isinstance(exc, OSError):
        return oserror_line(exc)
    text = " ".join(str(exc).split())[:300]
    return text if isinstance(exc, InputError) and text else f"{type(exc).__name__}: {text}"


def oserror_line(exc: OSError) -> str:
    """One line for an OSError (no traceback): what failed, on which file, what to do."""
    name = exc.filename if exc.filename is not None else ""
    where = f" ({name})" if name else ""
    code = exc.errno
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        return (f"no space left on the device{where}; free some space or choose another "
                "-o folder, then rerun (with --resume where the command has it).")
    if code == errno.EROFS:
        return f"read-only file system{where}; choose a folder you can write to."
    if isinstance(exc, PermissionError) or code in (errno.EACCES, errno.EPERM):
        return f"permission denied{where}; choose a file or folder you can use."
    if isinstance(exc, FileNotFoundError):
        return f"no such file or folder{where}."
    if isinstance(exc, IsADirectoryError):
        return f"is a folder, not a file{where}."
    if isinstance(exc, NotADirectoryError):
        return f"a file stands where a folder is needed{where}; choose a folder."
    if isinstance(exc, FileExistsError):
        return f"already exists and is in the way{where}; remove it or choose another folder."
    text = exc.strerror or str(exc) or type(exc).__name__
    return f"{text[0].lower()}{text[1:]}{where}."


_DEVICE_RE = re.compile(r"^(cpu|mps|auto|cuda(:[0-9]+)?)$")


def check_device(device: str | None) -> None:
    """Refuse an unknown or unavailable ``--device`` before any model loads (imports torch
    only for cuda/mps, whose availability it checks)."""
    if device in (None, ""):
        return
    if not _DEVICE_RE.match(device):
        raise CLIError(f"--device {device}: unknown device; use cpu, cuda, cuda:N or mps "
                       "(or leave it out to choose automatically).")
    if device in ("cpu", "auto"):
        return
    from ..core.models import resolve_device

    try:
        resolve_device(device)
    except ValueError as exc:
        raise CLIError(str(exc)) from exc


def read_json_file(path: str | Path, flag: str) -> Any:
    """A JSON file given on the command line, or a :class:`CLIError` naming ``flag`` and the
    cause (missing, a folder, unreadable, not UTF-8, not valid JSON)."""
    path = Path(path)
    if path.is_dir():
        raise CLIError(f"{flag} {path}: is a folder; give a JSON file.")
    if not path.is_file():
        raise CLIError(f"{flag} {path}: file not found.")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CLIError(f"{flag} {path}: cannot read it ({exc.strerror or exc}).") from exc
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CLIError(f"{flag} {path}: not UTF-8 text (byte {exc.start}); save it as UTF-8 "
                       "JSON.") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CLIError(f"{flag} {path}: not valid JSON ({exc.msg} at line {exc.lineno} "
                       f"column {exc.colno}).") from exc


def check_writable_folder(folder: str | Path, flag: str = "-o") -> None:
    """Refuse an output folder that is a file or cannot be written, before any work:
    the folder (or its nearest existing parent) must take a new entry. Leaves nothing
    behind."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CLIError(f"{flag} {folder}: exists and is not a folder; choose a folder.")
    probe_in = folder
    while not probe_in.exists():
        if probe_in.parent == probe_in:
            break
        probe_in = probe_in.parent
    if not probe_in.is_dir():
        raise CLIError(f"{flag} {folder}: {probe_in} is a file, not a folder; choose another "
                       "place.")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".medclipsam-probe-", dir=probe_in))
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise CLIError(f"{flag} {folder}: cannot write in {probe_in} ({reason}); choose a "
                       "folder you can write to.") from exc


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While inside, SIGTERM raises :class:`Terminated` (a KeyboardInterrupt) in the main
    thread, so a stopped run saves its work as on Ctrl-C. Outside the main thread, or where
    the platform has no SIGTERM, nothing changes."""
    if threading.current_thread() is not threading.main_thread() or \
            not hasattr(signal, "SIGTERM"):
        yield
        return

    def handler(signum, frame):
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except (ValueError, OSError):
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class StopRequest:
    """Whether Ctrl-C or SIGTERM asked the work to stop (see :func:`stop_requests`); call it
    as a ``should_stop`` callable."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self) -> bool:
        return self.signum is not None

    def interrupt(self) -> KeyboardInterrupt:
        """The exception that ends the command as the signal would have: :class:`Terminated`
        for SIGTERM, else KeyboardInterrupt."""
        if self.signum == getattr(signal, "SIGTERM", None):
            return Terminated()
        return KeyboardInterrupt()


@contextmanager
def stop_requests(note: str | None = None) -> Iterator[StopRequest]:
    """While inside, the first Ctrl-C or SIGTERM only sets the :class:`StopRequest` yielded
    (work that checks it stops at its next safe point and keeps what it did); a second one
    stops at once (KeyboardInterrupt, or :class:`Terminated` for SIGTERM). ``note`` is
    printed on stderr at the first one. Outside the main thread nothing changes (the request
    is never set)."""
    import sys

    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    term = getattr(signal, "SIGTERM", None)

    def handler(signum, frame):
        if request.signum is not None:  # asked twice: stop now
            raise Terminated() if signum == term else KeyboardInterrupt()
        request.signum = signum
        if note:
            print(note, file=sys.stderr, flush=True)

    previous: dict[int, Any] = {}
    installed = True
    try:
        for sig in (signal.SIGINT, term):
            if sig is not None:
                previous[sig] = signal.signal(sig, handler)
    except (ValueError, OSError):  # pragma: no cover - signals unavailable here
        installed = False
        for sig, old in previous.items():
            signal.signal(sig, old)
    if not installed:  # pragma: no cover
        yield request
        return
    try:
        yield request
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
