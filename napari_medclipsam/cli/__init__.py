"""The ``medclipsam`` command: zero-shot segmentation and evaluation over folders.

    medclipsam segment IMAGES... --prompt TEXT [--prompt-file JSON] -o OUT
    medclipsam evaluate --pred DIR --gt DIR
    medclipsam calibrate --images DIR --masks CORRECTED_DIR --prompt TEXT -o PRESET.json
    medclipsam finetune-clip DATA -o OUT [--loss dhn-nce] [--resume]
    medclipsam eval-retrieval DATA [--clip-model MODEL]
    medclipsam nnunet export --images DIR --masks DIR --dataset-id N --name NAME --out RAW
    medclipsam nnunet train --dataset-id N [--epochs E --cycles D --checkpoints-per-cycle G]
    medclipsam nnunet predict --dataset-id N --input DIR -o OUT
    medclipsam nnunet status|cancel --dataset-id N
    medclipsam vlsm train --arch clipseg|biomedclipseg --images DIR --masks DIR
                          --class-name NAME --prompt-set p1,p6 -o MODEL_DIR
    medclipsam vlsm predict --model MODEL_DIR --images DIR --prompt TEXT -o OUT
    medclipsam vlsm evaluate --model MODEL_DIR --images DIR --masks DIR --prompt TEXT -o OUT

Run ``medclipsam COMMAND --help`` for every flag. One module per command (``segment``,
``evaluate``, ``finetune`` for finetune-clip and eval-retrieval, ``nnunet``, ``vlsm``); each has
``add_parser(subparsers)``, which registers its subcommand(s) with ``set_defaults(func=...)``.
What they share lives in ``common``. The outputs of ``segment`` are listed in
:mod:`napari_medclipsam.cli.segment`.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
import warnings
from collections.abc import Sequence

from .. import __version__
from ..core.errors import InputError
from . import calibrate, evaluate, finetune, nnunet, segment, vlsm
from .common import CLIError, Terminated, oserror_line, quiet_warnings

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The ``medclipsam`` parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="medclipsam",
        description="Text-driven medical image segmentation (MedCLIP-SAMv2): BiomedCLIP M2IB "
                    "saliency -> coarse mask -> SAM.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug logs.")
    parser.add_argument("--debug", action="store_true",
                        help="show tracebacks and every warning, ours and other libraries' "
                             "(hidden otherwise); may be given anywhere on the line.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in (segment, evaluate, calibrate, finetune, nnunet, vlsm):
        module.add_parser(sub)
    return parser


def _split_debug(argv: list[str]) -> tuple[list[str], bool]:
    """``--debug`` taken out wherever it stands (before a ``--``)."""
    end = argv.index("--") if "--" in argv else len(argv)
    head = [a for a in argv[:end] if a != "--debug"]
    return head + argv[end:], len(head) < end


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``medclipsam`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status:
    0 success, 1 some work failed (each failure named; an internal error in one line),
    2 a user mistake or an unusable environment (one line on stderr saying what to do:
    bad input or flag, missing model, unwritable folder, full disk), 130 interrupted
    (Ctrl-C), 143 terminated (SIGTERM, where a command handles it).

    Warnings of other libraries (torch, timm, transformers deprecations) are hidden and
    tracebacks are not shown, unless ``--debug`` is given (anywhere on the line)."""
    argv, debug = _split_debug(list(sys.argv[1:] if argv is None else argv))
    with warnings.catch_warnings():
        quiet_warnings(debug)  # before torch/timm/open_clip are imported by any command
        return _run(argv, debug)


def _run(argv: list[str], debug: bool) -> int:
    from ..core.models import ModelUnavailableError

    parser = build_parser()
    args = parser.parse_args(argv)
    args.debug = debug
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s: %(message)s")
    if args.command is None:
        parser.print_help()
        return 2
    func = getattr(args, "func", None)
    if func is None:
        parser.error(f"unknown command {args.command}")
        return 2
    prefix = f"medclipsam {args.command}: error:"
    try:
        return func(args)
    except (CLIError, InputError, ModelUnavailableError) as exc:
        if debug:
            traceback.print_exc()
        print(f"{prefix} {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if debug:
            traceback.print_exc()
        print(f"{prefix} {oserror_line(exc)}", file=sys.stderr)
        return 2
    except MemoryError:
        if debug:
            traceback.print_exc()
        print(f"{prefix} out of memory; use smaller inputs (or a machine with more memory).",
              file=sys.stderr)
        return 1
    except Terminated:
        print("Terminated.", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return 130
    except Exception as exc:  # an internal error: one line, the traceback under --debug
        if debug:
            traceback.print_exc()
        text = " ".join(str(exc).split())[:300]
        print(f"{prefix} internal error ({type(exc).__name__}: {text}); rerun with --debug "
              "for the traceback and please report it.", file=sys.stderr)
        return 1
