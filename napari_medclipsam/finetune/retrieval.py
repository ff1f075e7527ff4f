"""Image-text retrieval accuracy, the MedCLIP-SAMv2 paper's protocol on ROCO.

The pairs are shuffled and cut into batches of 50; inside each batch every image ranks the
batch's captions (image->text) and every caption ranks the batch's images (text->image) by
cosine similarity; top-1 and top-2 accuracy are averaged over the batch's queries, then over
the batches. This is repeated 5 times with different shuffles; the result is the mean and
the standard deviation over the repeats.

A retrieved caption counts as correct when it is the query's own caption or an identical
string (two images with the same caption are the same answer); with unique captions, as in
ROCO, this is exactly "the paired item is retrieved".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..core.errors import CancelledError, InputError
from .data import Pair, PairDataset

ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class RetrievalResult:
    """Accuracies in [0, 1]: ``mean[name]`` and ``std[name]`` for names ``i2t@1``, ``i2t@2``,
    ``t2i@1``, ``t2i@2``; ``per_repeat[name]`` the value of each repeat."""

    mean: dict[str, float]
    std: dict[str, float]
    per_repeat: dict[str, list[float]]
    n_pairs: int
    batch_size: int
    repeats: int

    def to_dict(self) -> dict:
        return {"mean": self.mean, "std": self.std, "per_repeat": self.per_repeat,
                "n_pairs": self.n_pairs, "batch_size": self.batch_size,
                "repeats": self.repeats}


def embed_pairs(clip, pairs: Sequence[Pair], batch_size: int = 32,
                progress: ProgressFn | None = None, should_stop: Callable[[], bool] | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised image and text embeddings [N, D] (float32) of the pairs."""
    import torch

    dataset = PairDataset(list(pairs), clip.image_size, clip.mean, clip.std)
    model = clip.model
    was_training = model.training
    model.eval()
    images, texts = [], []
    try:
        with torch.no_grad():
            for start in range(0, len(dataset), batch_size):
                if should_stop is not None and should_stop():
                    raise CancelledError("Retrieval evaluation cancelled.")
                items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
                x = torch.stack([it[0] for it in items]).to(clip.device)
                tokens = clip.tokenizer([it[1] for it in items]).to(clip.device)
                images.append(model.encode_image(x, normalize=True).float().cpu())
                texts.append(model.encode_text(tokens, normalize=True).float().cpu())
                if progress is not None:
                    progress(min(start + batch_size, len(dataset)), len(dataset))
    finally:
        model.train(was_training)
    return torch.cat(images).numpy(), torch.cat(texts).numpy()


def retrieval_from_embeddings(image_emb: np.ndarray, text_emb: np.ndarray,
                              captions: Sequence[str], batch_size: int = 50, repeats: int = 5,
                              seed: int = 0, topk: Sequence[int] = (1, 2)) -> RetrievalResult:
    """Retrieval accuracy from precomputed normalised embeddings (see the module docstring).

    Only full batches are scored (as the paper's protocol does) unless there are fewer pairs
    than ``batch_size``, in which case all pairs form one batch.
    """
    n = len(captions)
    if image_emb.shape[0] != n or text_emb.shape[0] != n:
        raise InputError("image and text embeddings must have one row per caption.")
    if n < 2:
        raise InputError(f"Retrieval needs at least 2 pairs; got {n}.")
    if batch_size < 2 or repeats < 1:
        raise InputError("batch_size must be >= 2 and repeats >= 1.")
    batch = min(batch_size, n)
    codes = np.unique(np.asarray(captions, dtype=object), return_inverse=True)[1]
    rng = np.random.default_rng(seed)
    names = [f"{d}@{k}" for d in ("i2t", "t2i") for k in topk]
    per_repeat: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(repeats):
        order = rng.permutation(n)
        hits = {name: [] for name in names}
        for start in range(0, n - batch + 1, batch):
            idx = order[start:start + batch]
            sim = image_emb[idx] @ text_emb[idx].T  # [images, texts]
            same = codes[idx][:, None] == codes[idx][None, :]  # caption i == caption j
            for direction, s in (("i2t", sim), ("t2i", sim.T)):
                ranked = np.argsort(-s, axis=1, kind="stable")
                for k in topk:
                    top = ranked[:, :k]
                    hit = np.take_along_axis(same, top, axis=1).any(axis=1)
                    hits[f"{direction}@{k}"].append(hit.mean())
        for name in names:
            per_repeat[name].append(float(np.mean(hits[name])))
    mean = {name: float(np.mean(v)) for name, v in per_repeat.items()}
    std = {name: float(np.std(v)) for name, v in per_repeat.items()}
    return RetrievalResult(mean, std, per_repeat, n, batch, repeats)


def evaluate_retrieval(clip, pairs: Sequence[Pair], batch_size: int = 50, repeats: int = 5,
                       seed: int = 0, progress: ProgressFn | None = None,
                       should_stop: Callable[[], bool] | None = None) -> RetrievalResult:
    """Embed the pairs with ``clip`` (a :class:`~napari_medclipsam.core.models.ClipBundle`)
    and score retrieval with the paper's protocol."""
    image_emb, text_emb = embed_pairs(clip, pairs, progress=progress, should_stop=should_stop)
    return retrieval_from_embeddings(image_emb, text_emb, [p.caption for p in pairs],
                                     batch_size=batch_size, repeats=repeats, seed=seed)
