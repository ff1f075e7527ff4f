"""Image-caption pairs for CLIP fine-tuning and retrieval evaluation.

Two layouts are read:

* a CSV file with a header holding an image column (``path``, ``image``, ``filename`` or
  ``file``) and a caption column (``caption`` or ``text``); relative paths are taken from the
  CSV's folder;
* a folder of images, each with a sidecar text file of the same name (``case1.png`` +
  ``case1.txt``).

Captions are cleaned as in the MedCLIP-SAMv2 paper: special characters removed, whitespace
trimmed, and captions shorter than 20 characters (after cleaning) dropped.
"""

from __future__ import annotations

import csv
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..core.errors import InputError
from ..core.io import SUPPORTED, read_image, to_rgb_uint8

if TYPE_CHECKING:  # pragma: no cover
    import torch

IMAGE_COLUMNS = ("path", "image", "filename", "file", "image_path")
CAPTION_COLUMNS = ("caption", "text", "report")
MIN_CAPTION_CHARS = 20
# Kept: letters and digits of any script, whitespace, and the punctuation that carries
# meaning in radiology captions (decimal points, ranges, sizes, percentages, lists).
_SPECIAL = re.compile(r"[^\w\s.,;:()%/'+-]|_", flags=re.UNICODE)
_SPACES = re.compile(r"\s+")


@dataclass(frozen=True)
class Pair:
    """One image file and its caption."""

    image: Path
    caption: str


def clean_caption(text: str) -> str:
    """Remove special characters (anything but letters, digits, whitespace and
    ``. , ; : ( ) % / ' + -``), collapse runs of whitespace and trim."""
    return _SPACES.sub(" ", _SPECIAL.sub(" ", str(text))).strip()


def _pick(columns: list[str], choices: tuple[str, ...], what: str, path: Path) -> str:
    lower = {c.strip().lower(): c for c in columns}
    for name in choices:
        if name in lower:
            return lower[name]
    raise InputError(f"{path}: no {what} column; the header must name one of "
                     f"{', '.join(choices)} (found: {', '.join(columns) or 'nothing'}).")


def _read_csv(path: Path) -> list[Pair]:
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = list(reader.fieldnames or [])
        image_col = _pick(columns, IMAGE_COLUMNS, "image", path)
        caption_col = _pick(columns, CAPTION_COLUMNS, "caption", path)
        pairs = []
        for row in reader:
            name = (row.get(image_col) or "").strip()
            if not name:
                continue
            image = Path(name).expanduser()
            if not image.is_absolute():
                image = path.parent / image
            pairs.append(Pair(image, row.get(caption_col) or ""))
    return pairs


def _read_folder(folder: Path) -> list[Pair]:
    pairs = []
    for image in sorted(folder.iterdir()):
        name = image.name.lower()
        if not image.is_file() or not any(name.endswith(s) for s in SUPPORTED):
            continue
        sidecar = image.with_name(image.name[: -len(image.suffix)] + ".txt")
        if name.endswith(".nii.gz"):
            sidecar = image.with_name(image.name[: -len(".nii.gz")] + ".txt")
        if sidecar.is_file():
            pairs.append(Pair(image, sidecar.read_text(encoding="utf-8", errors="replace")))
    return pairs


def read_pairs(source: str | Path) -> list[Pair]:
    """Read (image, raw caption) pairs from a CSV file or a folder with sidecar ``.txt`` files.

    Raises
    ------
    InputError
        When the source does not exist, has no pairs, or names images that are missing
        (the first few are listed).
    """
    source = Path(source).expanduser()
    if source.is_file() and source.suffix.lower() in (".csv", ".tsv"):
        pairs = _read_csv(source)
    elif source.is_dir():
        pairs = _read_folder(source)
    elif source.exists():
        raise InputError(f"{source}: give a CSV file (path,caption) or a folder of images "
                         "with same-name .txt captions.")
    else:
        raise InputError(f"Caption data not found: {source}.")
    if not pairs:
        raise InputError(f"{source}: no image-caption pairs found (a CSV needs rows; a folder "
                         "needs images with same-name .txt files beside them).")
    missing = [str(p.image) for p in pairs if not p.image.is_file()]
    if missing:
        raise InputError(f"{len(missing)} image(s) listed in {source} do not exist, e.g. "
                         f"{', '.join(missing[:3])}.")
    return pairs


def clean_pairs(pairs: list[Pair], min_chars: int = MIN_CAPTION_CHARS
                ) -> tuple[list[Pair], int]:
    """Clean every caption; drop pairs whose cleaned caption is shorter than ``min_chars``.

    Returns the kept pairs and how many were dropped.
    """
    kept = []
    for pair in pairs:
        caption = clean_caption(pair.caption)
        if len(caption) >= min_chars:
            kept.append(Pair(pair.image, caption))
    return kept, len(pairs) - len(kept)


def split_pairs(pairs: list[Pair], val_fraction: float = 0.15, seed: int = 0
                ) -> tuple[list[Pair], list[Pair]]:
    """Deterministic train/validation split (85/15 by default).

    Each pair goes to validation by a hash of its image path and the seed, so the split of
    a pair does not change when other pairs are added or the list is reordered, and the
    validation set holds ``round(val_fraction * n)`` pairs (at least one when
    ``val_fraction > 0`` and there are two or more pairs).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise InputError(f"val_fraction must be in [0, 1); got {val_fraction}.")
    n_val = int(round(val_fraction * len(pairs)))
    if val_fraction > 0 and len(pairs) >= 2:
        n_val = max(1, n_val)
    n_val = min(n_val, len(pairs) - 1)

    def key(pair: Pair) -> bytes:
        return hashlib.blake2b(f"{seed}:{pair.image}".encode(), digest_size=8).digest()

    order = sorted(range(len(pairs)), key=lambda i: key(pairs[i]))
    val_idx = set(order[:n_val])
    train = [p for i, p in enumerate(pairs) if i not in val_idx]
    val = [p for i, p in enumerate(pairs) if i in val_idx]
    return train, val


def load_rgb(path: Path) -> np.ndarray:
    """Image file -> HxWx3 uint8 (volumes are refused: captions describe 2-D figures)."""
    image = read_image(path)
    if image.is_volume:
        raise InputError(f"{path} is a volume; caption pairs must be 2-D images.")
    return to_rgb_uint8(image.data)


def image_tensor(image: np.ndarray, size: int, mean, std) -> torch.Tensor:
    """HxWx3 uint8 -> [3, size, size] float, resized without cropping and normalised
    (the same preprocessing as the saliency's)."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255.0
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                          antialias=True)
    mean_t = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return ((x - mean_t) / std_t)[0]


class PairDataset:
    """A map-style dataset of (image tensor [3, S, S], caption) for torch's DataLoader."""

    def __init__(self, pairs: list[Pair], size: int, mean, std):
        self.pairs = list(pairs)
        self.size, self.mean, self.std = size, tuple(mean), tuple(std)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int):
        pair = self.pairs[index]
        return image_tensor(load_rgb(pair.image), self.size, self.mean, self.std), pair.caption
