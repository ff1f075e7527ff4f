"""A toy CLIP that really knows two words, trained in seconds on synthetic images.

The tiny BiomedCLIP-shaped model of :mod:`tiny_clip` (timm ViT trunk + BERT text tower,
built by open_clip's own ``CustomTextCLIP``) is trained on 64x64 images that hold a
filled bright disk, a bright square outline, both or neither, at random places and sizes
on a noisy background, against the captions ``"a disk"`` and ``"a square"``. Afterwards, on an
image holding both shapes, a text-conditioned saliency method that works must put its
mass on the named shape: that is what the saliency tests check.

Why not single-shape images with a softmax over the two captions (the plainest CLIP
recipe)? Then "a square" is learnt as "not a disk": measured on 20 two-shape images, M2IB
for "a square" then favoured the square on only 3. Training on none/one/both shapes with a
per-caption presence loss makes each caption mean its own shape.

Everything is seeded; training takes well under a minute on two CPU cores.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tiny_clip import TINY_IMAGE_SIZE, build_tiny_clip_model, write_tiny_clip_dir

CAPTIONS = ("a disk", "a square")


def draw_shape(canvas: np.ndarray, kind: str, cy: int, cx: int, r: int, value: float) -> None:
    """Draw a filled disk (radius ``r``) or axis-aligned square (half-side ``r``) in place."""
    yy, xx = np.mgrid[: canvas.shape[0], : canvas.shape[1]]
    if kind == "disk":
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        canvas[inside] = value
    elif kind == "square":
        inside = (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r)
        hole = (np.abs(yy - cy) <= r - 3) & (np.abs(xx - cx) <= r - 3)
        canvas[inside & ~hole] = value
    else:
        raise ValueError(kind)


def shape_mask(kind: str, cy: int, cx: int, r: int, size: int = TINY_IMAGE_SIZE) -> np.ndarray:
    canvas = np.zeros((size, size), np.float32)
    draw_shape(canvas, kind, cy, cx, r, 1.0)
    return canvas > 0


def random_image(rng: np.random.Generator, kinds: tuple[str, ...], size: int = TINY_IMAGE_SIZE
                 ) -> tuple[np.ndarray, list[tuple[str, int, int, int]]]:
    """HxWx3 uint8 image with the given shapes at random, non-overlapping places."""
    canvas = rng.normal(0.2, 0.05, (size, size)).astype(np.float32)
    placed: list[tuple[str, int, int, int]] = []
    for kind in kinds:
        for _ in range(100):
            r = int(rng.integers(7, 12))
            cy, cx = (int(v) for v in rng.integers(r + 2, size - r - 2, 2))
            if all(abs(cy - py) > r + pr + 3 or abs(cx - px) > r + pr + 3
                   for _, py, px, pr in placed):
                break
        draw_shape(canvas, kind, cy, cx, r, float(rng.uniform(0.75, 0.95)))
        placed.append((kind, cy, cx, r))
    image = (np.clip(canvas, 0, 1) * 255).astype(np.uint8)
    return np.repeat(image[..., None], 3, axis=2), placed


def train_toy_clip(folder: Path, steps: int = 300, batch: int = 32, seed: int = 0,
                   lr: float = 1e-3):
    """Train the tiny model (built from ``folder``'s config) on synthetic shape images.

    Two stages, both through the model's own ``encode_text``/``encode_image``:

    1. the text tower learns to map ``"a disk"`` and ``"a square"`` to two orthogonal
       unit vectors (a few dozen steps);
    2. with the text tower frozen, the image tower learns, for each caption, whether its
       shape is in the image: a sigmoid (SigLIP-style) loss on ``10 * cos + bias``, so an
       image's embedding says which shapes it holds, independently.

    (Training both towers jointly from scratch stalls at chance for hundreds of steps: at
    a fresh ViT's init every image embeds in almost the same direction.)
    """
    import torch
    from open_clip.tokenizer import HFTokenizer

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = build_tiny_clip_model(Path(folder), seed=seed)
    model.train()
    # The tokenizer load_clip gives local-dir models (open_clip's HFTokenizer).
    tokens = HFTokenizer(str(Path(folder) / "text"), context_length=16)(list(CAPTIONS))

    dim = int(model.visual.head.proj.out_features)
    targets = torch.linalg.qr(torch.randn(dim, 2))[0].T  # two orthonormal rows
    text_opt = torch.optim.Adam(model.text.parameters(), lr=lr)
    for _ in range(60):
        txt = model.encode_text(tokens, normalize=True)
        loss = (1.0 - (txt * targets).sum(-1)).mean()
        text_opt.zero_grad()
        loss.backward()
        text_opt.step()
    model.eval()  # no dropout from here on; the text tower is done
    with torch.no_grad():
        txt = model.encode_text(tokens, normalize=True)

    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    bias = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.AdamW([*model.visual.parameters(), bias], lr=lr, weight_decay=0.0)
    for _ in range(steps):
        present = rng.random((batch, 2)) < 0.5  # each shape independently, none or both too
        kinds = [tuple(k for k, p in zip(("disk", "square"), row, strict=True) if p)
                 for row in present]
        images = np.stack([random_image(rng, k)[0] for k in kinds])
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
        img = model.encode_image((x - mean) / std, normalize=True)
        logits = 10.0 * img @ txt.T + bias
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            logits, torch.from_numpy(present).float())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        model.logit_scale.fill_(float(np.log(100.0)))
    return model.eval()


def make_toy_clip_dir(folder: str | Path, seed: int = 0) -> Path:
    """Write the toy model as a ``local-dir:`` folder (same layout as the tiny one)."""
    folder = Path(folder)
    write_tiny_clip_dir(folder, seed=seed)  # config, text files, placeholder weights
    model = train_toy_clip(folder, seed=seed)
    return write_tiny_clip_dir(folder, model=model)
