"""Saliency map -> coarse mask -> connected components -> SAM prompts (boxes, points).

The paper's coarse mask (MedCLIP-SAMv2, section 3.3): threshold the saliency map (Otsu),
split it into connected components, score each component by its mean saliency (eq. 18),
keep those scoring above ``eta_c`` (eq. 19) and then the best ``top_k``. The authors'
scripts threshold with KMeans (k=2) instead and keep the largest components; both are here
(:class:`~napari_medclipsam.core.config.CoarseMaskConfig`).

Conventions used throughout:

- images and masks are HxW (row, column); saliency maps are HxW float in saliency units
  (the pipeline's maps are float32 in [0, 1]);
- boxes are XYXY ``(x0, y0, x1, y1)`` in image pixels with *inclusive* integer-valued corners:
  ``x0``/``y0`` the smallest column/row index of the object and ``x1``/``y1`` the largest,
  exactly what segment-anything's ``amg.batched_mask_to_box`` returns. A one-pixel object at
  (row 5, column 7) has the box ``(7, 5, 7, 5)``;
- points are XY ``(column, row)`` pixel indices, so a point ``(x, y)`` lies on pixel
  ``mask[int(y), int(x)]``; point labels are 1 (positive) or 0 (negative).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .config import BOX_MODES, CoarseMaskConfig, PromptConfig
from .errors import InputError

__all__ = [
    "CoarseResult",
    "Component",
    "Prompts",
    "body_slices",
    "boxes_from_labels",
    "coarse_mask",
    "keep_largest_components",
    "make_prompts",
    "sample_points",
    "threshold_saliency",
]


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Component:
    """One kept connected component of the thresholded saliency map.

    Attributes
    ----------
    label : int
        Its value in :attr:`CoarseResult.labels` (1..n, 1 is the best ranked).
    area : int
        Number of pixels.
    confidence : float
        Mean saliency inside the component (paper eq. 18), in saliency units. In SaLIP mode
        (:mod:`napari_medclipsam.core.salip`), the proposal's CLIP score (100 x cosine).
    box : tuple of float
        XYXY ``(x0, y0, x1, y1)`` with inclusive pixel coordinates (``x1`` is the largest
        column index of the component, ``y1`` its largest row index).
    """

    label: int
    area: int
    confidence: float
    box: tuple[float, float, float, float]


@dataclass(frozen=True, eq=False)
class CoarseResult:
    """The coarse mask and the components it is made of.

    Attributes
    ----------
    mask : np.ndarray
        HxW bool, the union of the kept components.
    labels : np.ndarray
        HxW int32: kept components relabelled 1..n in ranking order (1 = best), 0 elsewhere.
    components : tuple of Component
        The kept components, best first (``components[i].label == i + 1``).
    threshold : float
        The threshold applied to the saliency map (foreground is ``saliency > threshold``).
    n_candidates : int
        Connected components found after thresholding, before the ``min_area``,
        ``eta_c`` and ``top_k`` filters.
    """

    mask: np.ndarray
    labels: np.ndarray
    components: tuple[Component, ...]
    threshold: float
    n_candidates: int

    @property
    def empty(self) -> bool:
        """True when no component was kept (the mask is all False)."""
        return len(self.components) == 0


def _empty_array(shape: tuple[int, ...], dtype: Any) -> Any:
    return field(default_factory=lambda: np.zeros(shape, dtype=dtype))


@dataclass(frozen=True, eq=False)
class Prompts:
    """SAM prompts in image pixels.

    Every argument may be any array-like (lists from JSON included); they are converted to
    the dtypes below and checked on construction.

    Attributes
    ----------
    boxes : np.ndarray
        (N, 4) float32 XYXY ``(x0, y0, x1, y1)``, inclusive pixel coordinates; may be (0, 4).
    points : np.ndarray
        (M, 2) float32 XY ``(column, row)``; may be (0, 2).
    point_labels : np.ndarray
        (M,) int32, 1 for a positive point (inside the object), 0 for a negative one.
    point_box : np.ndarray
        (M,) int32, the index of the box each point belongs to, or -1 when the point belongs
        to every box (or there are no boxes). Left empty while points are given, every point
        gets -1.
    """

    boxes: np.ndarray = _empty_array((0, 4), np.float32)
    points: np.ndarray = _empty_array((0, 2), np.float32)
    point_labels: np.ndarray = _empty_array((0,), np.int32)
    point_box: np.ndarray = _empty_array((0,), np.int32)

    def __post_init__(self) -> None:
        boxes = float_array(self.boxes, "boxes")
        if boxes.size == 0:
            boxes = boxes.reshape(0, 4)
        elif boxes.shape == (4,):
            boxes = boxes[None]
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise InputError(
                f"boxes must have shape (N, 4) as XYXY (x0, y0, x1, y1); got shape {boxes.shape}."
            )
        if ((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])).any():
            raise InputError("boxes must be XYXY with x0 <= x1 and y0 <= y1.")
        points = float_array(self.points, "points")
        if points.size == 0:
            points = points.reshape(0, 2)
        if points.ndim != 2 or points.shape[1] != 2:
            raise InputError(
                f"points must have shape (M, 2) as XY (column, row); got shape {points.shape}."
            )
        m = len(points)
        labels = _integer_array(self.point_labels, "point_labels").reshape(-1)
        if labels.shape != (m,):
            raise InputError(
                f"point_labels must have shape ({m},), one per point (1 positive, "
                f"0 negative); got shape {np.shape(self.point_labels)}."
            )
        if not np.isin(labels, (0, 1)).all():
            raise InputError(
                f"point_labels must be 1 (positive) or 0 (negative); got "
                f"{sorted(set(labels.tolist()))}."
            )
        owner = _integer_array(self.point_box, "point_box").reshape(-1)
        if owner.size == 0:
            owner = np.full(m, -1)
        if owner.shape != (m,):
            raise InputError(
                f"point_box must have shape ({m},), one box index (or -1) per "
                f"point; got shape {np.shape(self.point_box)}."
            )
        if ((owner < -1) | (owner >= len(boxes))).any():
            raise InputError(
                f"point_box values must be -1 or a box index in "
                f"[0, {len(boxes) - 1}]; got {sorted(set(owner.tolist()))}."
            )
        object.__setattr__(self, "boxes", boxes.astype(np.float32))
        object.__setattr__(self, "points", points.astype(np.float32))
        object.__setattr__(self, "point_labels", labels.astype(np.int32))
        object.__setattr__(self, "point_box", owner.astype(np.int32))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Prompts):
            return NotImplemented
        return all(
            np.array_equal(getattr(self, k), getattr(other, k))
            for k in ("boxes", "points", "point_labels", "point_box")
        )

    @property
    def empty(self) -> bool:
        """True when there are neither boxes nor points."""
        return len(self.boxes) == 0 and len(self.points) == 0

    def to_dict(self) -> dict[str, list]:
        """JSON-ready lists: ``boxes``, ``points``, ``point_labels``, ``point_box``."""
        return {
            "boxes": self.boxes.tolist(),
            "points": self.points.tolist(),
            "point_labels": self.point_labels.tolist(),
            "point_box": self.point_box.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Prompts:
        """Inverse of :meth:`to_dict`; missing keys mean "none" (``point_box``: all -1)."""
        known = {"boxes", "points", "point_labels", "point_box"}
        unknown = set(d) - known
        if unknown:
            raise InputError(
                f"Unknown prompt keys: {', '.join(sorted(unknown))}; expected "
                f"{', '.join(sorted(known))}."
            )
        return cls(**{k: np.asarray(v) for k, v in d.items() if v is not None})

    def groups(self) -> list[tuple[np.ndarray | None, np.ndarray, np.ndarray]]:
        """The SAM calls these prompts stand for, one ``(box, points, labels)`` per call.

        With N > 0 boxes, group ``i`` is box ``i`` ((4,) float32) with the points whose
        ``point_box`` is ``i`` or -1 ((k, 2) float32) and their labels ((k,) int32). With no
        boxes, a single group ``(None, all points, all labels)``. With nothing, ``[]``.
        """
        if self.empty:
            return []
        if len(self.boxes) == 0:
            return [(None, self.points, self.point_labels)]
        out = []
        for i, box in enumerate(self.boxes):
            sel = (self.point_box == i) | (self.point_box == -1)
            out.append((box, self.points[sel], self.point_labels[sel]))
        return out


def float_array(value: Any, name: str) -> np.ndarray:
    """``value`` as a float64 array; an :class:`InputError` naming ``name`` if it is not
    numeric or holds NaN or infinite values (boxes, points and the like from a user)."""
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name} must be numeric; got {value!r}.") from exc
    if not np.isfinite(array).all():
        raise InputError(f"{name} contains NaN or infinite values.")
    return array


def _integer_array(value: Any, name: str) -> np.ndarray:
    """Integer array from integers, bools or integral floats (JSON may give 1.0)."""
    array = np.asarray(value)
    if array.dtype == bool or np.issubdtype(array.dtype, np.integer):
        return array.astype(np.int64)
    if array.size == 0:
        return array.astype(np.int64)
    floats = float_array(array, name)
    if not np.array_equal(floats, np.round(floats)):
        raise InputError(f"{name} must hold integers; got {sorted(set(floats.tolist()))}.")
    return floats.astype(np.int64)


# --------------------------------------------------------------------------- thresholding


def _check_saliency(saliency: Any) -> np.ndarray:
    array = np.asarray(saliency)
    if array.ndim != 2:
        raise InputError(
            f"The saliency map must be 2-D (H, W); got shape {array.shape}. "
            "Run volumes slice by slice."
        )
    if array.size == 0:
        raise InputError(f"The saliency map is empty (shape {array.shape}).")
    if not (
        np.issubdtype(array.dtype, np.floating)
        or np.issubdtype(array.dtype, np.integer)
        or array.dtype == bool
    ):
        raise InputError(f"The saliency map must be numeric; got dtype {array.dtype}.")
    if not np.isfinite(array).all():
        n = int((~np.isfinite(array)).sum())
        raise InputError(
            f"The saliency map contains {n} NaN or infinite value(s); replace "
            "them (e.g. np.nan_to_num) before thresholding."
        )
    return array


def threshold_saliency(saliency: np.ndarray, config: CoarseMaskConfig,
                       image: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """Binarise a saliency map.

    Parameters
    ----------
    saliency : np.ndarray
        HxW float saliency map (the pipeline's are float32 in [0, 1]); must be finite.
    config : CoarseMaskConfig
        ``method`` picks the threshold:

        - ``"otsu"`` (the paper): :func:`skimage.filters.threshold_otsu` of the map;
        - ``"kmeans"`` (the authors' scripts): the map is resized bilinearly to
          ``kmeans_size`` x ``kmeans_size`` (no anti-aliasing, as ``cv2.resize``),
          :class:`sklearn.cluster.KMeans` (k=2, ``n_init=10``, ``random_state=0``) clusters
          its values, and the threshold is the midpoint of the two centres, which is the
          boundary between the clusters, applied at full resolution;
        - ``"fixed"``: ``config.threshold``;
        - ``"crf"`` (MedCLIP-SAM): a fully connected CRF on the map with the image
          (:func:`crf_foreground`); the threshold returned is 0.5 on the CRF's foreground
          probability.
    image : np.ndarray, optional
        HxWx3 uint8 RGB at the map's size; needed by ``"crf"`` only.

    Returns
    -------
    foreground : np.ndarray
        HxW bool, ``saliency > threshold``.
    threshold : float
        The threshold, in saliency units.

    Notes
    -----
    A constant map (max == min, e.g. all zeros) carries no location, so its foreground is all
    False whatever the method; the threshold returned is then the map's value (``otsu``,
    ``kmeans``) or ``config.threshold`` (``fixed``).

    Raises
    ------
    InputError
        (a ``ValueError``) if the map is not 2-D, is empty or holds NaN/inf.
    """
    return _threshold(_check_saliency(saliency), config, image)


def _threshold(sal: np.ndarray, config: CoarseMaskConfig,
               image: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    lo, hi = float(sal.min()), float(sal.max())
    if config.method == "crf":
        if hi == lo:
            return np.zeros(sal.shape, dtype=bool), 0.5
        return crf_foreground(sal, image) > 0.5, 0.5
    if config.method == "fixed":
        t = float(config.threshold)
    elif hi == lo:
        t = hi
    elif config.method == "otsu":
        from skimage.filters import threshold_otsu

        t = float(threshold_otsu(sal.astype(np.float64)))
    else:  # kmeans
        t = _kmeans_threshold(sal, config.kmeans_size)
    if hi == lo:
        return np.zeros(sal.shape, dtype=bool), t
    return sal > t, t


def _kmeans_threshold(sal: np.ndarray, size: int) -> float:
    from skimage.transform import resize
    from sklearn.cluster import KMeans

    small = resize(
        sal.astype(np.float64), (size, size), order=1, preserve_range=True, anti_aliasing=False
    )
    values = small.reshape(-1, 1)
    if np.unique(values).size < 2:  # resizing hid the variation: cluster the full map
        values = sal.astype(np.float64).reshape(-1, 1)
    km = KMeans(n_clusters=2, n_init=10, random_state=0).fit(values)
    low, high = sorted(float(c) for c in km.cluster_centers_.ravel())
    return (low + high) / 2.0


#: MedCLIP-SAM's DenseCRF settings (its code): unary temperature tau, smoothness kernel
#: (sxy 3, compat 3), appearance kernel (sxy 60, srgb 5, compat 5), one mean-field iteration.
CRF_SETTINGS = {"tau": 1.05, "gaussian_sxy": 3, "gaussian_compat": 3, "bilateral_sxy": 60,
                "bilateral_srgb": 5, "bilateral_compat": 5, "iterations": 1}
CRF_MISSING = ("The 'crf' threshold method needs the pydensecrf2 package: "
               "pip install 'napari-medclipsam[crf]' (it compiles a small C++ extension), "
               "or choose otsu, kmeans or fixed.")


def crf_foreground(saliency: np.ndarray, image: np.ndarray | None) -> np.ndarray:
    """Foreground probability (HxW float32) of a fully connected CRF (Kraehenbuehl and
    Koltun 2011, ``pydensecrf2``) on a saliency map in [0, 1] with the image, as MedCLIP-SAM.

    Unaries as MedCLIP-SAM's code: ``-log(p + 1e-8) / (tau * sigmoid(p))`` for the
    foreground and the same of ``1 - p`` for the background; pairwise potentials and one
    iteration per :data:`CRF_SETTINGS`. Their code reads the map from an 8-bit PNG; here the
    float map is used as it is.

    Raises
    ------
    InputError
        No image, or an image that is not HxWx3 uint8 at the map's size; pydensecrf2 missing.
    """
    try:
        import pydensecrf.densecrf as dcrf
    except ImportError:
        raise InputError(CRF_MISSING) from None
    sal = np.clip(_check_saliency(saliency).astype(np.float64), 0.0, 1.0)
    if image is None:
        raise InputError("The 'crf' threshold method needs the image beside the saliency map.")
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.shape != (*sal.shape, 3):
        raise InputError(f"The CRF needs the {sal.shape[0]}x{sal.shape[1]}x3 uint8 image of "
                         f"the map; got {image.dtype} {image.shape}.")
    c = CRF_SETTINGS
    h, w = sal.shape

    def energy(p):
        return -np.log(p + 1e-8) / (c["tau"] / (1.0 + np.exp(-p)))

    crf = dcrf.DenseCRF2D(w, h, 2)
    crf.setUnaryEnergy(np.ascontiguousarray(
        np.stack([energy(1.0 - sal), energy(sal)]).reshape(2, -1).astype(np.float32)))
    crf.addPairwiseGaussian(sxy=c["gaussian_sxy"], compat=c["gaussian_compat"])
    crf.addPairwiseBilateral(sxy=c["bilateral_sxy"], srgb=c["bilateral_srgb"],
                             rgbim=np.ascontiguousarray(image), compat=c["bilateral_compat"])
    q = np.asarray(crf.inference(c["iterations"]), dtype=np.float32)
    return q[1].reshape(h, w)


# --------------------------------------------------------------------------- components


def coarse_mask(saliency: np.ndarray, config: CoarseMaskConfig,
                image: np.ndarray | None = None) -> CoarseResult:
    """Saliency map -> coarse mask of the best connected components (paper eqs. 18-19).

    Steps: :func:`threshold_saliency`; connected components with 8-connectivity
    (:func:`skimage.measure.label`, ``connectivity=2``); drop components with fewer than
    ``min_area`` pixels; confidence = mean saliency inside each component (eq. 18); keep
    those with confidence strictly above ``eta_c`` (eq. 19); rank by ``rank_by``
    (descending; ties broken by the other key, then by scan order); keep the first ``top_k``
    (all when ``None``).

    Parameters
    ----------
    saliency : np.ndarray
        HxW float saliency map, finite (float32 in [0, 1] from the pipeline).
    config : CoarseMaskConfig
    image : np.ndarray, optional
        HxWx3 uint8 RGB at the map's size; needed by ``method="crf"`` only.

    Returns
    -------
    CoarseResult
        Never raises for "nothing found": an empty result has ``empty == True``, an all-False
        mask and all-zero labels.
    """
    from skimage.measure import label as label_components

    sal = _check_saliency(saliency)
    foreground, t = _threshold(sal, config, image)
    cc = label_components(foreground, connectivity=2)
    n = int(cc.max())
    flat = cc.ravel()
    area = np.bincount(flat, minlength=n + 1)[1:]
    total = np.bincount(flat, weights=sal.astype(np.float64).ravel(), minlength=n + 1)[1:]
    ids = np.arange(1, n + 1)
    conf = total / np.maximum(area, 1)  # every label 1..n has area >= 1
    keep = (area >= config.min_area) & (conf > config.eta_c)
    ids, area, conf = ids[keep], area[keep], conf[keep]
    if config.rank_by == "confidence":
        order = np.lexsort((ids, -area, -conf))
    else:
        order = np.lexsort((ids, -conf, -area))
    if config.top_k is not None:
        order = order[: config.top_k]
    lut = np.zeros(n + 1, dtype=np.int32)
    lut[ids[order]] = np.arange(1, len(order) + 1, dtype=np.int32)
    labels = lut[cc]
    slices = _find_objects(labels)
    components = tuple(
        Component(
            label=rank,
            area=int(area[i]),
            confidence=float(conf[i]),
            box=_slice_box(slices[rank - 1]),
        )
        for rank, i in enumerate(order, start=1)
    )
    return CoarseResult(
        mask=labels > 0, labels=labels, components=components, threshold=t, n_candidates=n
    )


def _find_objects(labels: np.ndarray) -> list:
    from scipy.ndimage import find_objects

    return find_objects(labels)


def _slice_box(slc: tuple[slice, slice]) -> tuple[float, float, float, float]:
    rows, cols = slc
    return (float(cols.start), float(rows.start), float(cols.stop - 1), float(rows.stop - 1))


def _check_labels(labels: Any) -> np.ndarray:
    array = np.asarray(labels)
    if array.ndim != 2:
        raise InputError(f"Labels must be a 2-D (H, W) array; got shape {array.shape}.")
    if array.dtype == bool:
        return array.astype(np.int32)
    if not np.issubdtype(array.dtype, np.integer):
        raise InputError(
            f"Labels must be integers (0 background, 1..n components) or bool; "
            f"got dtype {array.dtype}."
        )
    if array.size and array.min() < 0:
        raise InputError("Labels must be non-negative (0 background, 1..n components).")
    return array


def _component_values(labels: np.ndarray) -> np.ndarray:
    """The distinct nonzero label values, increasing (component ``i`` is ``values[i]``)."""
    values = np.unique(labels)
    return values[values != 0]


def boxes_from_labels(labels: np.ndarray, box_mode: str = "single", margin: int = 0) -> np.ndarray:
    """Box prompts around labelled components.

    Parameters
    ----------
    labels : np.ndarray
        HxW integer labels (0 background) or a bool mask.
    box_mode : {"single", "per_component"}
        ``"single"``: one box enclosing every nonzero pixel. ``"per_component"``: one box per
        distinct nonzero value, in increasing value order (with labels 1..n, as
        :func:`coarse_mask` produces, box ``i`` belongs to label ``i + 1``).
    margin : int
        Pixels added on every side, then clipped to ``[0, W-1]`` and ``[0, H-1]``.

    Returns
    -------
    np.ndarray
        (N, 4) float32 XYXY ``(x0, y0, x1, y1)`` with inclusive pixel coordinates (``x1`` is
        the largest column index, as segment-anything's ``batched_mask_to_box``); (0, 4)
        when the labels are all zero.
    """
    if box_mode not in BOX_MODES:
        raise ValueError(f"box_mode must be one of {', '.join(BOX_MODES)}; got {box_mode!r}.")
    if margin < 0:
        raise ValueError(f"margin must be non-negative; got {margin}.")
    lab = _check_labels(labels)
    h, w = lab.shape
    if box_mode == "single":
        fg = lab != 0
        rows, cols = np.flatnonzero(fg.any(axis=1)), np.flatnonzero(fg.any(axis=0))
        boxes = [[cols[0], rows[0], cols[-1], rows[-1]]] if rows.size else []
    else:
        slices = _find_objects(lab)
        boxes = [_slice_box(slices[v - 1]) for v in _component_values(lab)]
    out = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if margin:
        out += np.array([-margin, -margin, margin, margin])
        out[:, 0::2] = out[:, 0::2].clip(0, w - 1)
        out[:, 1::2] = out[:, 1::2].clip(0, h - 1)
    return out.astype(np.float32)


def sample_points(
    labels: np.ndarray,
    n_positive: int,
    n_negative: int = 0,
    seed: int = 0,
    per_component: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random point prompts: positives inside the components, negatives outside.

    Pixels are drawn uniformly without replacement with ``numpy.random.default_rng(seed)``;
    when fewer pixels exist than requested, all of them are used.

    Parameters
    ----------
    labels : np.ndarray
        HxW integer labels (0 background) or a bool mask.
    n_positive : int
        Positive points: in total over the union of the components, or per component when
        ``per_component``.
    n_negative : int
        Negative points drawn from the background (label 0).
    seed : int
        The same seed gives the same points.
    per_component : bool
        Sample ``n_positive`` points in each component (distinct nonzero value, increasing)
        and mark each with its component's index (``point_box``), which is the index of its
        box in :func:`boxes_from_labels` with ``box_mode="per_component"``.

    Returns
    -------
    points : np.ndarray
        (M, 2) float32 XY ``(column, row)`` pixel indices; positives first, then negatives.
    point_labels : np.ndarray
        (M,) int32, 1 positive, 0 negative.
    point_box : np.ndarray
        (M,) int32, the component index of each positive point when ``per_component``,
        otherwise -1; always -1 for negatives.
    """
    if n_positive < 0 or n_negative < 0:
        raise ValueError("n_positive and n_negative must be non-negative.")
    lab = _check_labels(labels)
    rng = np.random.default_rng(seed)
    flat = lab.ravel()
    chosen: list[np.ndarray] = []
    owners: list[np.ndarray] = []

    def draw(pixels: np.ndarray, n: int) -> np.ndarray:
        if n >= pixels.size:
            return pixels
        return pixels[rng.choice(pixels.size, size=n, replace=False)]

    if per_component:
        for i, v in enumerate(_component_values(lab)):
            picked = draw(np.flatnonzero(flat == v), n_positive)
            chosen.append(picked)
            owners.append(np.full(picked.size, i))
    else:
        picked = draw(np.flatnonzero(flat != 0), n_positive)
        chosen.append(picked)
        owners.append(np.full(picked.size, -1))
    n_pos = sum(c.size for c in chosen)
    negatives = draw(np.flatnonzero(flat == 0), n_negative) if n_negative else np.zeros(0, int)
    chosen.append(negatives)
    owners.append(np.full(negatives.size, -1))
    index = np.concatenate(chosen).astype(np.int64)
    rows, cols = np.unravel_index(index, lab.shape)
    points = np.stack([cols, rows], axis=1).astype(np.float32).reshape(-1, 2)
    point_labels = np.zeros(index.size, dtype=np.int32)
    point_labels[:n_pos] = 1
    return points, point_labels, np.concatenate(owners).astype(np.int32)


def make_prompts(labels: np.ndarray, config: PromptConfig) -> Prompts:
    """SAM prompts from component labels (e.g. :attr:`CoarseResult.labels`).

    ``config.mode``:

    - ``"boxes"``: boxes only (:func:`boxes_from_labels` with ``box_mode`` and
      ``box_margin``);
    - ``"points"``: points only, ``n_positive`` over the union of the components plus
      ``n_negative`` in the background, all with ``point_box == -1``;
    - ``"both"``: boxes and points; with ``box_mode == "per_component"`` the positives are
      sampled per component and tied to their component's box, otherwise they are shared.

    All-zero labels give empty :class:`Prompts` (``empty == True``).
    """
    lab = _check_labels(labels)
    if not lab.any():
        return Prompts()
    boxes = None
    if config.mode in ("boxes", "both"):
        boxes = boxes_from_labels(lab, config.box_mode, config.box_margin)
    if config.mode == "boxes":
        return Prompts(boxes=boxes)
    per_component = config.mode == "both" and config.box_mode == "per_component"
    points, point_labels, point_box = sample_points(
        lab, config.n_positive, config.n_negative, config.seed, per_component=per_component
    )
    return Prompts(
        boxes=np.zeros((0, 4), np.float32) if boxes is None else boxes,
        points=points,
        point_labels=point_labels,
        point_box=point_box,
    )


def prompts_from_mask(mask: np.ndarray, config: PromptConfig) -> Prompts:
    """SAM prompts from a hand-painted or edited mask (e.g. a corrected coarse mask).

    Every 8-connected region of ``mask > 0`` counts as one component, whatever its label
    value; ``config`` applies as in :func:`make_prompts`. An empty mask gives empty
    :class:`Prompts`.

    Parameters
    ----------
    mask : np.ndarray
        HxW, nonzero is foreground.
    config : PromptConfig
    """
    from skimage.measure import label as label_components

    m = np.asarray(mask)
    if m.ndim != 2:
        raise InputError(f"Expected a 2-D mask (H, W); got shape {m.shape}.")
    return make_prompts(label_components(m > 0, connectivity=2).astype(np.int32), config)


# --------------------------------------------------------------------------- SAM mask


def keep_largest_components(mask: np.ndarray, n: int | None) -> np.ndarray:
    """Keep the ``n`` largest connected components of a mask.

    Parameters
    ----------
    mask : np.ndarray
        HxW or (Z, Y, X) mask (nonzero is foreground). Components use full connectivity
        (8 in 2-D, 26 in 3-D).
    n : int or None
        How many to keep; ``None`` or 0 returns an unchanged bool copy. Equal areas keep the
        component met first in scan order.

    Returns
    -------
    np.ndarray
        Bool array of the mask's shape.
    """
    from skimage.measure import label as label_components

    m = np.asarray(mask).astype(bool)
    if n is not None and n < 0:
        raise ValueError(f"n must be None or non-negative; got {n}.")
    if not n or not m.any():
        return m.copy()
    cc = label_components(m, connectivity=m.ndim)
    area = np.bincount(cc.ravel())[1:]
    if area.size <= n:
        return m.copy()
    ids = np.lexsort((np.arange(area.size), -area))[:n] + 1
    return np.isin(cc, ids)


# --------------------------------------------------------------------------- volumes


def body_slices(volume: np.ndarray, threshold: float | None = None,
                fraction: float = 0.01) -> tuple[list[int], float, str]:
    """Slices of a volume that hold the body: those with at least ``fraction`` of their
    voxels above ``threshold``.

    Slices outside the body (air, the table, padding) hold nothing to find; a volume run can
    skip them (``medclipsam segment --skip-empty-slices``).

    Parameters
    ----------
    volume : np.ndarray
        (Z, Y, X) volume in its own intensity units (e.g. HU for CT); slices are along
        axis 0. Any array of two or more dimensions works (each index of axis 0 is a slice).
    threshold : float or None
        Intensity above which a voxel counts as body. ``None``: Otsu's threshold of the
        volume's finite voxels (air/background against tissue), computed on at most two
        million evenly strided voxels; a constant volume gives its value (so no slice is
        body unless ``fraction`` is 0), a volume without finite voxels gives 0.
    fraction : float
        Share of a slice's voxels, in [0, 1], that must be above the threshold for the slice
        to count as body (0 keeps every slice).

    Returns
    -------
    indices : list of int
        Indices along axis 0 of the body slices, ascending.
    threshold : float
        The threshold used.
    how : str
        ``"given"`` (the ``threshold`` argument) or ``"otsu"``.

    Raises
    ------
    InputError
        For a volume of fewer than two dimensions or a ``fraction`` outside [0, 1].
    """
    vol = np.asarray(volume)
    if vol.ndim < 2:
        raise InputError(f"body_slices needs a volume of 2 or more dimensions (Z, Y, X); got "
                         f"shape {vol.shape}.")
    if not 0.0 <= fraction <= 1.0:
        raise InputError(f"fraction {fraction!r}: give a share between 0 and 1.")
    how = "given"
    if threshold is None:
        from skimage.filters import threshold_otsu

        sample = vol.reshape(-1)
        if sample.size > 2_000_000:
            sample = sample[:: int(np.ceil(sample.size / 2_000_000))]
        sample = sample[np.isfinite(sample)].astype(np.float64)
        if sample.size == 0 or sample.min() == sample.max():
            threshold = float(sample.min()) if sample.size else 0.0
        else:
            threshold = float(threshold_otsu(sample))
        how = "otsu"
    share = (vol > threshold).reshape(vol.shape[0], -1).mean(axis=1)
    empty = share < fraction
    return [int(z) for z in np.flatnonzero(~empty)], float(threshold), how
