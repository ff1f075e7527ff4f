"""Synthetic data a VLSM can learn in seconds: 64x64 images holding a filled disk and a square
outline (:func:`toy_clip.random_image`), labelled 1 (disk) and 2 (the square's whole region),
written as PNG image/label folders the way a user's corrected masks are."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from toy_clip import random_image

CLASSES = ("disk", "square")


def shape_region(kind: str, cy: int, cx: int, r: int, size: int = 64) -> np.ndarray:
    """HxW bool: the disk, or the square's whole region (outline and inside)."""
    yy, xx = np.mgrid[:size, :size]
    if kind == "disk":
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    return (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r)


def two_shape_image(seed: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(HxWx3 uint8 image, {"disk": mask, "square": mask}) of one seeded random image."""
    image, placed = random_image(np.random.default_rng(seed), CLASSES)
    return image, {kind: shape_region(kind, cy, cx, r) for kind, cy, cx, r in placed}


def write_shape_dataset(folder: str | Path, n: int = 40, seed: int = 0) -> tuple[Path, Path]:
    """``folder/images/case_NNN.png`` and ``folder/masks/case_NNN.png`` (labels 1 disk,
    2 square); returns (images, masks)."""
    from PIL import Image

    folder = Path(folder)
    images, masks = folder / "images", folder / "masks"
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image, regions = two_shape_image(seed * 100_000 + i)
        labels = np.zeros(image.shape[:2], np.uint8)
        for value, kind in enumerate(CLASSES, start=1):
            labels[regions[kind]] = value
        Image.fromarray(image).save(images / f"case_{i:03d}.png")
        Image.fromarray(labels).save(masks / f"case_{i:03d}.png")
    return images, masks


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total
