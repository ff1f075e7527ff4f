"""Image-caption pairs for CLIP fine-tuning and retrieval evaluation.

Three layouts are read (text files in UTF-8):

* a CSV file with a header holding an image column (``path``, ``image``, ``filename``,
  ``file``, ``image_path`` or ``filepath``) and a caption column (``caption``, ``text``,
  ``report`` or ``title``); relative paths are taken from the CSV's folder. A ``.tsv``, or a
  CSV whose header has tabs and no commas (open_clip's ``filepath<TAB>title`` files), is read
  with tabs;
* a JSON file: a list of objects with the same keys, or one object mapping image paths to
  captions; or JSON Lines (``.jsonl``), one object per line (PMC-OA's layout);
* a folder of images, each with a sidecar text file of the same name (``case1.png`` +
  ``case1.txt``).

Captions are cleaned as in the MedCLIP-SAMv2 paper: special characters removed, whitespace
trimmed, and captions shorter than 20 characters (after cleaning) dropped.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.errors import InputError
from ..core.io import SUPPORTED, read_image, to_rgb_uint8
from ..core.saliency import image_tensor

IMAGE_COLUMNS = ("path", "image", "filename", "file", "image_path", "filepath")
CAPTION_COLUMNS = ("caption", "text", "report", "title")  # filepath/title: open_clip's CSVs
TABLE_SUFFIXES = (".csv", ".tsv")
JSON_SUFFIXES = (".json", ".jsonl")
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


def _read_utf8(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path} is not UTF-8 text (byte {exc.start}); save the {what} as "
                         "UTF-8.") from exc


def _image_path(name: str, base: Path) -> Path:
    image = Path(name).expanduser()
    return image if image.is_absolute() else base / image


def _read_csv(path: Path) -> list[Pair]:
    """A CSV (comma) or TSV/open_clip-style CSV (tab, when the header has tabs and no
    commas) with a header naming an image and a caption column."""
    text = _read_utf8(path, "table")
    if "\0" in text:
        raise InputError(f"{path} is not a text table (it holds NUL bytes); give a CSV with "
                         "a header row, e.g. path,caption.")
    header = text.split("\n", 1)[0]
    tabs = path.suffix.lower() == ".tsv" or ("\t" in header and "," not in header)
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if tabs else ",",
                            strict=True)
    start = 1  # the line where the record being read starts
    try:
        columns = list(reader.fieldnames or [])
        image_col = _pick(columns, IMAGE_COLUMNS, "image", path)
        caption_col = _pick(columns, CAPTION_COLUMNS, "caption", path)
        pairs = []
        while True:
            start = reader.line_num + 1
            row = next(reader, None)
            if row is None:
                break
            name = row.get(image_col)
            name = name.strip() if isinstance(name, str) else ""
            if name:
                caption = row.get(caption_col)
                pairs.append(Pair(_image_path(name, path.parent),
                                  caption if isinstance(caption, str) else ""))
    except csv.Error as exc:
        raise InputError(f"{path}, line {start}: not a valid CSV ({exc}).") from exc
    return pairs


def _read_json(path: Path) -> list[Pair]:
    """A JSON list of objects (image and caption keys as the CSV's columns), a JSON object
    mapping image paths to captions, or JSON Lines (one such object per line)."""
    text = _read_utf8(path, "captions")
    try:
        if path.suffix.lower() == ".jsonl":
            lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
            records, where = [], []
            for n, line in lines:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise InputError(f"{path}, line {n}: not valid JSON ({exc.msg}, column "
                                     f"{exc.colno}).") from exc
                where.append(f"line {n}")
        else:
            data = json.loads(text)
            if isinstance(data, dict):
                data = [{"path": k, "caption": v} for k, v in data.items()]
            if not isinstance(data, list):
                raise InputError(f"{path}: expected a list of {{\"path\": ..., \"caption\": ...}} "
                                 "objects or an object mapping image paths to captions; got "
                                 f"{type(data).__name__}.")
            records, where = data, [f"entry {i + 1}" for i in range(len(data))]
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column "
                         f"{exc.colno}).") from exc
    pairs = []
    for record, at in zip(records, where, strict=True):
        if not isinstance(record, dict):
            raise InputError(f"{path}, {at}: expected an object with image and caption keys; "
                             f"got {type(record).__name__}.")
        keys = list(record)
        image_key = _pick(keys, IMAGE_COLUMNS, "image", path)
        caption_key = _pick(keys, CAPTION_COLUMNS, "caption", path)
        name, caption = record[image_key], record[caption_key]
        if not isinstance(name, str) or not name.strip():
            raise InputError(f"{path}, {at}: the image path must be text; got {name!r:.60}.")
        if not isinstance(caption, str):
            raise InputError(f"{path}, {at}: the caption must be text; got "
                             f"{type(caption).__name__} {caption!r:.60}.")
        pairs.append(Pair(_image_path(name.strip(), path.parent), caption))
    return pairs


def _caption_file(image: Path) -> Path:
    stem = image.name[: -len(".nii.gz")] if image.name.lower().endswith(".nii.gz") \
        else image.name[: -len(image.suffix)]
    return image.with_name(stem + ".txt")


def _read_folder(folder: Path, log: Callable[[str], None] | None) -> list[Pair]:
    pairs, uncaptioned = [], []
    for image in sorted(folder.iterdir()):
        name = image.name.lower()
        if not image.is_file() or not any(name.endswith(s) for s in SUPPORTED):
            continue
        sidecar = _caption_file(image)
        if sidecar.is_file():
            pairs.append(Pair(image, _read_utf8(sidecar, "caption")))
        else:
            uncaptioned.append(image.name)
    if uncaptioned and not pairs:
        raise InputError(f"{folder}: {len(uncaptioned)} image(s) but no caption files; put "
                         f"each caption in a .txt of the image's name beside it (e.g. "
                         f"{_caption_file(folder / uncaptioned[0]).name}).")
    if uncaptioned and log is not None:
        log(f"{len(uncaptioned)} image(s) in {folder} have no caption file and are left out "
            f"(e.g. {', '.join(uncaptioned[:3])}).")
    return pairs


def read_pairs(source: str | Path, log: Callable[[str], None] | None = None) -> list[Pair]:
    """Read (image, raw caption) pairs from a CSV/TSV, a JSON/JSON Lines file or a folder
    with sidecar ``.txt`` files (see the module docstring).

    ``log`` receives a line when some images of a folder have no caption file.

    Raises
    ------
    InputError
        When the source does not exist, is not UTF-8, is not valid CSV/JSON, has no pairs,
        or names images that are missing (the first few are listed).
    """
    source = Path(source).expanduser()
    suffix = source.suffix.lower()
    if source.is_file() and suffix in TABLE_SUFFIXES:
        pairs = _read_csv(source)
    elif source.is_file() and suffix in JSON_SUFFIXES:
        pairs = _read_json(source)
    elif source.is_dir():
        pairs = _read_folder(source, log)
    elif source.exists():
        raise InputError(f"{source}: give a CSV file (path,caption), a JSON file or a folder "
                         "of images with same-name .txt captions.")
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
