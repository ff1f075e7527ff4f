"""Names and settings of the VLSM package that cost nothing to import (no torch): the
``medclipsam`` parser and the dock read them on every start; :mod:`.models` and :mod:`.train`
use the same ones."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.config import DEFAULT_VLSM_MODEL
from ..core.errors import InputError
from .prompts import PROMPT_SETS

ARCHS = ("clipseg", "biomedclipseg")
DEFAULT_CLIPSEG_MODEL = DEFAULT_VLSM_MODEL  # CIDAS/clipseg-rd64-refined
DEFAULT_EXTRACT_LAYERS = (3, 6, 9)
MODEL_FILE = "vlsm.json"
DECODER_FILE = "decoder.safetensors"
FORMAT_VERSION = 1
DECODER_INITS = ("random", "clipseg")
#: CLIPSeg rd64-refined's decoder settings, used for a BiomedCLIPSeg decoder built without a
#: CLIPSeg config at hand (``decoder_init="random"`` offline).
RD64_REFINED = {"reduce_dim": 64, "decoder_num_attention_heads": 4,
                "decoder_intermediate_size": 2048, "conditional_layer": 0,
                "use_complex_transposed_convolution": True}

@dataclass(frozen=True)
class VlsmTrainConfig:
    """Settings of :func:`train_vlsm` (defaults: medvlsm's; see the module docstring).

    Attributes
    ----------
    prompt_sets : tuple of str
        Prompt levels whose captions are drawn from (``("p1", "p6")``: the class name, and
        the class with count, size, colour, shape and location words from the mask).
    epochs : int
        At most this many epochs.
    min_epochs, patience : int
        Early stopping: never before ``min_epochs``; after ``patience`` epochs without a
        better validation Dice.
    cache_gb : float
        Memory for the frozen encoders' outputs (0: recompute every batch).
    """

    prompt_sets: tuple[str, ...] = ("p1", "p6")
    epochs: int = 100
    min_epochs: int = 10
    patience: int = 20
    batch_size: int = 16
    lr: float = 2e-4
    weight_decay: float = 1e-3
    dice_weight: float = 1.0
    bce_weight: float = 0.2
    grad_clip: float = 0.5
    lr_factor: float = 0.1
    lr_patience: int = 5
    val_fraction: float = 0.15
    threshold: float = 0.5
    amp: bool = True
    cache_gb: float = 2.0
    seed: int = 0

    def __post_init__(self) -> None:
        sets = (self.prompt_sets,) if isinstance(self.prompt_sets, str) else self.prompt_sets
        sets = tuple(s.strip().lower() for p in sets for s in str(p).split(",") if s.strip())
        object.__setattr__(self, "prompt_sets", sets)
        bad = [s for s in sets if s not in PROMPT_SETS]
        if not sets or bad:
            raise ValueError(f"prompt set must be among {', '.join(PROMPT_SETS)} (several "
                             f"comma-separated); got {', '.join(bad) or 'nothing'}.")
        for name in ("epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1; got {getattr(self, name)}.")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ValueError("lr must be positive and weight_decay non-negative.")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1); got {self.val_fraction}.")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1); got {self.threshold}.")
        if self.min_epochs < 0 or self.patience < 1 or self.cache_gb < 0:
            raise ValueError("min_epochs and cache_gb must be >= 0, patience >= 1.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def local_source_path(source: str) -> Path | None:
    """The folder a model source names (``local-dir:PATH``, an existing folder, or anything
    written as a path: absolute, ``~``, ``./``, not ``ORG/NAME``), or None for a Hugging Face
    id (``CIDAS/clipseg-rd64-refined``)."""
    source = source.strip()
    if source.startswith("local-dir:"):
        return Path(source.removeprefix("local-dir:")).expanduser()
    path = Path(source).expanduser()
    if path.is_dir() or path.is_absolute() or source.startswith(("~", ".")) \
            or source.count("/") != 1 or "\\" in source:
        return path
    return None


def absolute_source(source: str) -> str:
    """A local model source made absolute, so a model folder that records it loads from any
    working folder: ``local-dir:ABSOLUTE`` for ``local-dir:`` or a folder, the absolute path
    for a checkpoint file; a Hugging Face id unchanged."""
    path = local_source_path(source)
    if path is None:
        return source
    resolved = path.resolve()
    if source.strip().startswith("local-dir:") or resolved.is_dir():
        return f"local-dir:{resolved}"
    return str(resolved)


def is_vlsm_folder(path: str | Path) -> bool:
    """Whether ``path`` is a trained model folder (it holds ``vlsm.json``)."""
    return (Path(path).expanduser() / MODEL_FILE).is_file()


def read_vlsm_record(folder: str | Path) -> dict[str, Any]:
    """``vlsm.json`` of a model folder, checked (one-line :class:`InputError` otherwise)."""
    path = Path(folder).expanduser() / MODEL_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(f"{path}: cannot read the model record ({exc.strerror or exc}).") \
            from exc
    except (UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc}); the model folder is damaged.") \
            from exc
    if not isinstance(record, dict) or record.get("arch") not in ARCHS:
        raise InputError(f"{path}: not a VLSM model record (no arch among "
                         f"{', '.join(ARCHS)}).")
    if int(record.get("format", 0)) > FORMAT_VERSION:
        raise InputError(f"{path}: written by a newer napari-medclipsam (format "
                         f"{record.get('format')}); update the package to read it.")
    if not (path.parent / DECODER_FILE).is_file():
        raise InputError(f"{path.parent}: no {DECODER_FILE}; the model folder is incomplete "
                         "(was training stopped before the first epoch ended?).")
    return record
