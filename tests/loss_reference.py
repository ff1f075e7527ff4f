"""Brute-force reference for the contrastive losses: the paper's sums as Python loops.

Written straight from the equations (MedCLIP-SAMv2 eqs. 7-13; HN-NCE of Radenovic et al.
2023 with alpha = 1), one scalar at a time with plain ``exp``/``log`` (no log-sum-exp), so
it shares nothing with the vectorised code in :mod:`napari_medclipsam.finetune.losses`
except the conventions: each direction is the paper's sum over ``i`` divided by ``B``, and
the loss is image-to-text plus text-to-image. Autograd runs through it, so gradients can be
compared too. Slow (O(B^2) Python operations): for tests and the benchmark only.
"""

from __future__ import annotations

import torch

KINDS = ("infonce", "dcl", "hn-nce", "dhn-nce")


def _direction(sim, tau: float, beta: float, kind: str):
    """``1/B sum_i [-s_ii/tau + log(denominator_i)]`` over the rows of ``sim`` (nested lists)."""
    n = len(sim)
    with_positive = kind in ("infonce", "hn-nce")
    weighted = kind in ("hn-nce", "dhn-nce")
    total = 0.0
    for i in range(n):
        row = sim[i]
        positive = row[i] / tau
        if weighted:
            # sum_{k != i} exp(beta s_ik / tau): the normaliser of row i's hardness weights.
            norm = 0.0
            for k in range(n):
                if k != i:
                    norm = norm + torch.exp(beta * row[k] / tau)
        denominator = torch.exp(positive) if with_positive else 0.0
        for j in range(n):
            if j == i:
                continue
            term = torch.exp(row[j] / tau)
            if weighted:
                weight = (n - 1) * torch.exp(beta * row[j] / tau) / norm
                term = term * weight
            denominator = denominator + term
        total = total + (-positive + torch.log(denominator))
    return total / n


def reference_from_similarity(
    kind: str, s: torch.Tensor, temperature: float = 0.6, beta1: float = 0.15,
    beta2: float = 0.15,
) -> torch.Tensor:
    """Loss ``kind`` (a key of ``LOSSES``) from the ``[B, B]`` similarity matrix, by loops."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}; got {kind!r}")
    rows = [list(r.unbind(0)) for r in s.unbind(0)]  # rows[i][j] = s_ij (image i, text j)
    cols = [list(c.unbind(0)) for c in s.T.unbind(0)]  # cols[i][j] = s_ji (text i, image j)
    b1 = beta1 if kind in ("hn-nce", "dhn-nce") else 0.0
    b2 = beta2 if kind in ("hn-nce", "dhn-nce") else 0.0
    return _direction(rows, temperature, b1, kind) + _direction(cols, temperature, b2, kind)


def reference_similarity(image_features, text_features, normalize: bool = True):
    """``s_ij = I_i . T_j`` by a double loop (features L2-normalised first if asked)."""
    images = list(image_features.unbind(0))
    texts = list(text_features.unbind(0))
    if normalize:
        images = [x / torch.sqrt((x * x).sum()) for x in images]
        texts = [t / torch.sqrt((t * t).sum()) for t in texts]
    rows = [torch.stack([(x * t).sum() for t in texts]) for x in images]
    return torch.stack(rows)


def reference_loss(
    kind: str, image_features, text_features, temperature: float = 0.6, beta1: float = 0.15,
    beta2: float = 0.15, normalize: bool = True,
) -> torch.Tensor:
    """Brute-force counterpart of ``get_loss(kind)(image_features, text_features, ...)``."""
    s = reference_similarity(image_features, text_features, normalize)
    return reference_from_similarity(kind, s, temperature, beta1, beta2)


__all__ = [
    "KINDS",
    "reference_from_similarity",
    "reference_loss",
    "reference_similarity",
]

