"""Contrastive image-text losses for CLIP fine-tuning: InfoNCE, DCL, HN-NCE and DHN-NCE.

Notation (MedCLIP-SAMv2, eqs. 7-13): a batch of ``B`` matching image/text pairs with features
``I_i`` and ``T_i``; ``s_ij = I_i . T_j`` is the similarity of image ``i`` and text ``j`` (the
positives are on the diagonal); ``tau`` is the temperature. Every loss is the sum of an
image-to-text term (rows of ``s``) and a text-to-image term (columns of ``s``, i.e. rows of
``s.T``), each built per sample ``i`` from its row ``a_i. = s_i. / tau``:

InfoNCE (CLIP)
    ``-a_ii + log sum_j exp(a_ij)``
DCL (decoupled contrastive learning)
    ``-a_ii + log sum_{j!=i} exp(a_ij)`` -- the positive is not in the denominator.
DHN-NCE (decoupled hard-negative NCE, the MedCLIP-SAMv2 loss)
    ``-a_ii + log sum_{j!=i} exp(a_ij) W_ij`` with the hardness weights
    ``W_ij = (B-1) exp(beta a_ij) / sum_{k!=i} exp(beta a_ik)`` (``beta1`` for image-to-text,
    ``beta2`` for text-to-image); the weights average to 1 over the negatives of a row and
    favour the hardest (most similar) ones. ``beta = 0`` gives DCL.
HN-NCE (Radenovic et al. 2023, alpha = 1)
    ``-a_ii + log(exp(a_ii) + sum_{j!=i} exp(a_ij) W_ij)`` -- DHN-NCE with the positive kept
    in the denominator. ``beta = 0`` gives InfoNCE.

Conventions, the same for all four losses:

* **Reduction**: each direction is the *mean* over the batch of its per-sample terms, and the
  loss is ``L_v2t + L_t2v`` (not their average). The paper writes sums over ``i``; the mean
  keeps values and gradient sizes comparable across batch sizes (the sum is ``B`` times it).
* **Hardness weights are differentiated through**: ``W`` is a function of ``s`` in the
  paper's equations and autograd follows it, so the loss is exactly the written equation
  (not a variant with ``W`` detached as constants).
* **Normalisation**: with ``normalize=True`` (default) both feature sets are L2-normalised
  along the feature axis first, so ``s_ij`` is a cosine similarity. With ``normalize=False``
  the caller's features are used as given (e.g. already normalised, or deliberately not).
* Everything is vectorised with log-sum-exp (the diagonal masked with ``-inf`` where the
  positive is excluded; ``log(exp(a) W) = a + log W``), so it is stable for temperatures
  down to 0.01 and features of any norm. Features must be ``[B, D]`` with the same shape,
  ``B >= 2`` (a batch of one has no negatives).

This module imports torch; :mod:`napari_medclipsam.finetune` itself does not.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = [
    "LOSSES",
    "dcl",
    "dcl_from_similarity",
    "dhn_nce",
    "dhn_nce_from_similarity",
    "get_loss",
    "hn_nce",
    "hn_nce_from_similarity",
    "info_nce",
    "info_nce_from_similarity",
]


# --------------------------------------------------------------------------- checks


def _check_features(image_features: torch.Tensor, text_features: torch.Tensor) -> None:
    for name, x in (("image_features", image_features), ("text_features", text_features)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}.")
        if x.ndim != 2:
            raise ValueError(f"{name} must have shape [B, D]; got {tuple(x.shape)}.")
    if image_features.shape != text_features.shape:
        raise ValueError(
            "image_features and text_features must have the same shape [B, D] (one text per "
            f"image); got {tuple(image_features.shape)} and {tuple(text_features.shape)}."
        )
    if image_features.shape[0] < 2:
        raise ValueError(
            f"contrastive losses need a batch of at least 2 pairs (B >= 2); got "
            f"B={image_features.shape[0]}: a single pair has no negatives."
        )


def _check_similarity(s: torch.Tensor, temperature: float) -> None:
    if not isinstance(s, torch.Tensor):
        raise TypeError(f"the similarity matrix must be a torch.Tensor; got {type(s).__name__}.")
    if s.ndim != 2 or s.shape[0] != s.shape[1]:
        raise ValueError(f"the similarity matrix must be square [B, B]; got {tuple(s.shape)}.")
    if s.shape[0] < 2:
        raise ValueError(
            f"contrastive losses need a batch of at least 2 pairs (B >= 2); got B={s.shape[0]}: "
            "a single pair has no negatives."
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature!r}.")


def _similarity(image_features, text_features, normalize: bool) -> torch.Tensor:
    _check_features(image_features, text_features)
    if normalize:
        image_features = F.normalize(image_features, dim=-1)
        text_features = F.normalize(text_features, dim=-1)
    return image_features @ text_features.T


# --------------------------------------------------------------------------- per-direction terms


def _eye(n: int, device) -> torch.Tensor:
    return torch.eye(n, dtype=torch.bool, device=device)


def _log_weights(a: torch.Tensor, beta: float, eye: torch.Tensor) -> torch.Tensor:
    """``log W_ij = log(B-1) + beta a_ij - logsumexp_{k!=i}(beta a_ik)`` (diagonal: unused)."""
    n = a.shape[0]
    scaled = beta * a
    norm = torch.logsumexp(scaled.masked_fill(eye, float("-inf")), dim=1, keepdim=True)
    return math.log(n - 1) + scaled - norm


def _row_terms(a: torch.Tensor, beta: float, *, decoupled: bool, weighted: bool):
    """Per-sample terms ``-a_ii + log(denominator_i)`` for the rows of ``a = s / tau``."""
    eye = _eye(a.shape[0], a.device)
    logits = a + _log_weights(a, beta, eye) if weighted else a
    if decoupled:
        logits = logits.masked_fill(eye, float("-inf"))
    elif weighted:
        logits = torch.where(eye, a, logits)  # the positive enters unweighted
    return torch.logsumexp(logits, dim=1) - torch.diagonal(a)


def _loss(s, temperature, beta1, beta2, *, decoupled: bool, weighted: bool) -> torch.Tensor:
    _check_similarity(s, temperature)
    a = s / temperature
    v2t = _row_terms(a, beta1, decoupled=decoupled, weighted=weighted).mean()
    t2v = _row_terms(a.T, beta2, decoupled=decoupled, weighted=weighted).mean()
    return v2t + t2v


# --------------------------------------------------------------------------- from similarity


def info_nce_from_similarity(s: torch.Tensor, temperature: float = 0.6) -> torch.Tensor:
    """InfoNCE (CLIP) loss from the ``[B, B]`` similarity matrix ``s_ij = I_i . T_j``."""
    return _loss(s, temperature, 0.0, 0.0, decoupled=False, weighted=False)


def dcl_from_similarity(s: torch.Tensor, temperature: float = 0.6) -> torch.Tensor:
    """Decoupled contrastive loss from the ``[B, B]`` similarity matrix."""
    return _loss(s, temperature, 0.0, 0.0, decoupled=True, weighted=False)


def hn_nce_from_similarity(
    s: torch.Tensor, temperature: float = 0.6, beta1: float = 0.15, beta2: float = 0.15
) -> torch.Tensor:
    """HN-NCE (alpha = 1) from the ``[B, B]`` similarity matrix."""
    return _loss(s, temperature, beta1, beta2, decoupled=False, weighted=True)


def dhn_nce_from_similarity(
    s: torch.Tensor, temperature: float = 0.6, beta1: float = 0.15, beta2: float = 0.15
) -> torch.Tensor:
    """DHN-NCE from the ``[B, B]`` similarity matrix ``s_ij = I_i . T_j`` (see the module)."""
    return _loss(s, temperature, beta1, beta2, decoupled=True, weighted=True)


# --------------------------------------------------------------------------- public losses


def info_nce(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    temperature: float = 0.6,
    normalize: bool = True,
) -> torch.Tensor:
    """Symmetric InfoNCE (the CLIP loss).

    ``mean_i[-s_ii/tau + log sum_j exp(s_ij/tau)]`` plus the same over the columns of ``s``.

    Parameters
    ----------
    image_features, text_features : Tensor
        ``[B, D]`` features of ``B >= 2`` matching pairs (row ``i`` of each is a pair).
    temperature : float
        ``tau > 0``.
    normalize : bool
        L2-normalise both feature sets first; with ``False`` they are used as given.

    Returns
    -------
    Tensor
        Scalar: image-to-text mean plus text-to-image mean.
    """
    s = _similarity(image_features, text_features, normalize)
    return info_nce_from_similarity(s, temperature)


def dcl(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    temperature: float = 0.6,
    normalize: bool = True,
) -> torch.Tensor:
    """Symmetric decoupled contrastive loss (DCL): InfoNCE without the positive below.

    ``mean_i[-s_ii/tau + log sum_{j!=i} exp(s_ij/tau)]`` plus the same over the columns;
    equal to :func:`dhn_nce` with ``beta1 = beta2 = 0``. Parameters and return value as in
    :func:`info_nce`.
    """
    s = _similarity(image_features, text_features, normalize)
    return dcl_from_similarity(s, temperature)


def hn_nce(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    temperature: float = 0.6,
    beta1: float = 0.15,
    beta2: float = 0.15,
    normalize: bool = True,
) -> torch.Tensor:
    """Symmetric hard-negative NCE (Radenovic et al. 2023, alpha = 1).

    ``mean_i[-s_ii/tau + log(exp(s_ii/tau) + sum_{j!=i} exp(s_ij/tau) W_ij)]`` plus the same
    over the columns with ``beta2``; ``W`` as in :func:`dhn_nce` (differentiated through).
    ``beta1 = beta2 = 0`` gives :func:`info_nce`. Other parameters as in :func:`dhn_nce`.
    """
    s = _similarity(image_features, text_features, normalize)
    return hn_nce_from_similarity(s, temperature, beta1, beta2)


def dhn_nce(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    temperature: float = 0.6,
    beta1: float = 0.15,
    beta2: float = 0.15,
    normalize: bool = True,
) -> torch.Tensor:
    """Symmetric decoupled hard-negative NCE, the MedCLIP-SAMv2 fine-tuning loss.

    Image to text::

        L_v2t = mean_i[ -s_ii/tau + log sum_{j!=i} exp(s_ij/tau) W_ij ]
        W_ij  = (B-1) exp(beta1 s_ij/tau) / sum_{k!=i} exp(beta1 s_ik/tau)

    and ``L_t2v`` the same over the columns of ``s`` (text ``i`` against images ``j``) with
    ``beta2``; the loss is ``L_v2t + L_t2v``. The positive is not in the denominator. The
    hardness weights ``W`` are part of the differentiated expression (autograd follows them,
    as in the written equation; they are not detached).

    Parameters
    ----------
    image_features, text_features : Tensor
        ``[B, D]`` features of ``B >= 2`` matching pairs (row ``i`` of each is a pair).
    temperature : float
        ``tau > 0`` (stable down to 0.01).
    beta1, beta2 : float
        Hardness of the image-to-text and text-to-image weights (0: DCL).
    normalize : bool
        L2-normalise both feature sets first (cosine similarities); with ``False`` the
        caller's features are used as given.

    Returns
    -------
    Tensor
        Scalar, in the features' dtype.

    Raises
    ------
    ValueError
        Features not both ``[B, D]`` of the same shape, ``B < 2``, or ``temperature <= 0``.
    """
    s = _similarity(image_features, text_features, normalize)
    return dhn_nce_from_similarity(s, temperature, beta1, beta2)


LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "infonce": info_nce,
    "dcl": dcl,
    "hn-nce": hn_nce,
    "dhn-nce": dhn_nce,
}


def get_loss(name: str) -> Callable[..., torch.Tensor]:
    """The loss function called ``name`` (a key of :data:`LOSSES`)."""
    try:
        return LOSSES[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown loss {name!r}; choose one of: {', '.join(LOSSES)}."
        ) from None
