"""Segmentation metrics of the paper: Dice (DSC) and normalised surface Dice (NSD).

Masks are boolean arrays of equal shape, 2-D (H, W) or 3-D (Z, Y, X); anything > 0 counts as
foreground. The paper reports NSD at a 2-pixel tolerance with spacing 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["dice", "nsd", "resize_nearest"]


def _pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p, g = np.asarray(pred), np.asarray(gt)
    if p.shape != g.shape:
        raise ValueError(
            f"Prediction and ground truth must have the same shape; got "
            f"{p.shape} and {g.shape}. Resize the prediction first "
            f"(resize_nearest(pred, gt.shape))."
        )
    return p > 0, g > 0


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice similarity coefficient ``2 |P & G| / (|P| + |G|)``.

    Parameters
    ----------
    pred, gt : np.ndarray
        Masks of the same shape (any number of dimensions); values > 0 are foreground.

    Returns
    -------
    float
        In [0, 1]; 1.0 when both masks are empty.
    """
    p, g = _pair(pred, gt)
    total = int(p.sum()) + int(g.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(p, g).sum()) / total


def _border(mask: np.ndarray) -> np.ndarray:
    """Foreground pixels with at least one background face neighbour (outside = background)."""
    from scipy.ndimage import binary_erosion, generate_binary_structure

    structure = generate_binary_structure(mask.ndim, 1)
    # border_value=0 treats everything outside the array as background, the same as padding
    # the mask with one background pixel before eroding.
    return mask & ~binary_erosion(mask, structure=structure, border_value=0)


def nsd(
    pred: np.ndarray,
    gt: np.ndarray,
    tolerance: float = 2.0,
    spacing: float | Sequence[float] = 1.0,
) -> float:
    """Normalised surface Dice at a tolerance (the paper: 2 pixels, spacing 1).

    The border of a mask is its foreground pixels that have at least one background
    neighbour along an axis (face connectivity: 4 in 2-D, 6 in 3-D), with the outside of the
    image counting as background. With ``B_P`` and ``B_G`` the borders of the prediction and
    the ground truth and ``d(x, B)`` the Euclidean distance (in ``spacing`` units) from pixel
    ``x`` to the nearest pixel of ``B``::

        NSD = (#{x in B_P : d(x, B_G) <= tol} + #{y in B_G : d(y, B_P) <= tol})
              / (#B_P + #B_G)

    This is the border-pixel formulation, as MONAI's ``compute_surface_dice``, rather than
    DeepMind's ``surface-distance`` package, which weights each border element by its surfel
    area; the two agree closely but not exactly.

    Parameters
    ----------
    pred, gt : np.ndarray
        2-D (H, W) or 3-D (Z, Y, X) masks of the same shape; values > 0 are foreground.
    tolerance : float
        Largest distance (in ``spacing`` units) at which a border pixel counts as matched.
    spacing : float or sequence of float
        Pixel size along each axis (one value for all, or one per axis in array order).

    Returns
    -------
    float
        In [0, 1]; 1.0 when both masks are empty, 0.0 when exactly one is.
    """
    from scipy.ndimage import distance_transform_edt

    p, g = _pair(pred, gt)
    if p.ndim not in (2, 3):
        raise ValueError(f"nsd expects 2-D or 3-D masks; got {p.ndim}-D.")
    if tolerance < 0:
        raise ValueError(f"tolerance must be non-negative; got {tolerance}.")
    sampling = np.asarray(spacing, dtype=np.float64)
    if sampling.ndim == 0:
        sampling = np.full(p.ndim, float(sampling))
    if sampling.shape != (p.ndim,) or not (sampling > 0).all():
        raise ValueError(
            f"spacing must be one positive number or {p.ndim} of them (one per "
            f"axis); got {spacing!r}."
        )
    p_any, g_any = bool(p.any()), bool(g.any())
    if not p_any and not g_any:
        return 1.0
    if not p_any or not g_any:
        return 0.0
    bp, bg = _border(p), _border(g)
    dist_to_g = distance_transform_edt(~bg, sampling=sampling)
    dist_to_p = distance_transform_edt(~bp, sampling=sampling)
    matched = int((dist_to_g[bp] <= tolerance).sum()) + int((dist_to_p[bg] <= tolerance).sum())
    return matched / (int(bp.sum()) + int(bg.sum()))


def resize_nearest(mask: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Nearest-neighbour resize of a label or bool mask, keeping its dtype and values.

    Used to bring a prediction to its ground truth's size before scoring.

    Parameters
    ----------
    mask : np.ndarray
        Array of any number of dimensions (bool or integer labels).
    shape : sequence of int
        Output shape, one entry per dimension of ``mask``.

    Returns
    -------
    np.ndarray
        ``mask`` resampled to ``shape`` with :func:`skimage.transform.resize` (``order=0``,
        ``preserve_range=True``, ``anti_aliasing=False``); no new values appear.
    """
    from skimage.transform import resize

    m = np.asarray(mask)
    shape = tuple(int(s) for s in shape)
    if len(shape) != m.ndim:
        raise ValueError(
            f"shape {shape} must have one entry per dimension of the mask (shape {m.shape})."
        )
    if any(s < 1 for s in shape):
        raise ValueError(f"shape must be positive; got {shape}.")
    if shape == m.shape:
        return m.copy()
    out = resize(m, shape, order=0, preserve_range=True, anti_aliasing=False)
    if m.dtype == bool:
        return out > 0.5
    if np.issubdtype(m.dtype, np.integer):
        return np.rint(out).astype(m.dtype)
    return out.astype(m.dtype)
