"""What several ``medclipsam`` subcommands share: the user-error type, model and chain
flags, and a tqdm progress callback."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable

from ..core.config import (
    BOX_MODES,
    DEFAULT_CLIP_MODEL,
    DEFAULT_SAM_MODEL,
    PROMPT_MODES,
    RANK_BY,
    READOUTS,
    THRESHOLD_METHODS,
    CoarseMaskConfig,
    PromptConfig,
    SaliencyConfig,
    SamConfig,
)

__all__ = ["CLIError", "add_chain_flags", "add_model_flags", "logger", "tqdm_progress"]

logger = logging.getLogger("medclipsam")


class CLIError(Exception):
    """A user mistake: printed as one clear line, exit status 2."""


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """CLIP and SAM model choice and the device (defaults come from the pipeline config)."""
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


def add_chain_flags(p: argparse.ArgumentParser) -> None:
    """Saliency, coarse-mask, prompt and SAM parameters; every default is None (not given)."""
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
    g.add_argument("--readout", choices=READOUTS,
                   help=f"which capacity becomes the map: last_forward = the last forward "
                        f"pass's, before the final update, as the authors' code reads it; "
                        f"final = after all updates, as earlier versions of this tool did "
                        f"(default {s.readout}).")
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
