"""The ``medclipsam`` command: zero-shot segmentation and evaluation over folders.

    medclipsam segment IMAGES... --prompt TEXT [--prompt-file JSON] -o OUT
    medclipsam evaluate --pred DIR --gt DIR
    medclipsam finetune-clip DATA -o OUT [--loss dhn-nce] [--resume]
    medclipsam eval-retrieval DATA [--clip-model MODEL]
    medclipsam nnunet export --images DIR --masks DIR --dataset-id N --name NAME --out RAW
    medclipsam nnunet train --dataset-id N [--epochs E --cycles D --checkpoints-per-cycle G]
    medclipsam nnunet predict --dataset-id N --input DIR -o OUT
    medclipsam nnunet status|cancel --dataset-id N

Run ``medclipsam COMMAND --help`` for every flag. One module per command (``segment``,
``evaluate``, ``finetune`` for finetune-clip and eval-retrieval, ``nnunet``); each has
``add_parser(subparsers)``, which registers its subcommand(s) with ``set_defaults(func=...)``.
What they share lives in ``common``. The outputs of ``segment`` are listed in
:mod:`napari_medclipsam.cli.segment`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from .. import __version__
from ..core.errors import InputError
from . import evaluate, finetune, nnunet, segment
from .common import CLIError

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The ``medclipsam`` parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="medclipsam",
        description="Text-driven medical image segmentation (MedCLIP-SAMv2): BiomedCLIP M2IB "
                    "saliency -> coarse mask -> SAM.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug logs.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in (segment, evaluate, finetune, nnunet):
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``medclipsam`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status:
    0 success, 1 some work failed, 2 a user mistake (one line on stderr), 130 interrupted."""
    from ..core.models import ModelUnavailableError

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s: %(message)s")
    if args.command is None:
        parser.print_help()
        return 2
    func = getattr(args, "func", None)
    if func is None:
        parser.error(f"unknown command {args.command}")
        return 2
    try:
        return func(args)
    except (CLIError, InputError, ModelUnavailableError) as exc:
        print(f"medclipsam {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return 130
