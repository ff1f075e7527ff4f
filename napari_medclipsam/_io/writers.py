"""napari writer: a Labels layer -> NIfTI (``.nii.gz`` or ``.nii``) in the scan's geometry.

The affine written is, in this order:

1. ``metadata["affine"]`` of the Labels layer (set by this plugin's reader; a layer made
   from such an image with its metadata keeps it), when it agrees with the layer's
   ``scale`` and ``translate``;
2. else the ``metadata["affine"]`` of an image layer in the current viewer that the labels
   overlay exactly (same shape, ``scale`` and ``translate``): napari's *New labels* button
   copies an image's scale and translate but not its metadata, so a mask painted on a scan
   opened with this plugin is saved in that scan's exact geometry, flipped or oblique axes
   included;
3. else an axis-aligned affine built from the layer's ``scale`` and ``translate``
   (:func:`~napari_medclipsam.core.io.affine_from_scale_translate`): right for scans stored
   without rotation or flips, and a notification says this fallback was used.

napari's own ``rotate``/``shear``/``affine`` layer transforms are not written.
Data (Z, Y, X) is stored as NIfTI's (X, Y, Z) (2-D labels as a 2-D NIfTI), with the smallest
integer type holding the labels (uint8, int16 or int32), written atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import InputError
from ..core.io import (
    affine_from_scale_translate,
    label_dtype,
    scale_translate_from_affine,
    write_nifti,
)


def write_labels_nifti(path: str, data: Any, attributes: dict[str, Any]) -> list[str]:
    """npe2 single-layer writer: Labels -> NIfTI; returns ``[path]``."""
    if attributes.get("multiscale") and isinstance(data, list | tuple):
        data = data[0]
    labels = np.asarray(data)
    if labels.ndim not in (2, 3):
        raise InputError(f"Can save 2-D or 3-D labels as NIfTI; this layer is "
                         f"{labels.ndim}-D {labels.shape}. Slice it first.")
    target = Path(path)
    if not target.name.lower().endswith((".nii", ".nii.gz")):
        target = target.with_name(target.name + ".nii.gz")
    affine, metadata, source = labels_affine(labels.shape, attributes)
    if source == "scale/translate":
        _notify(f"{target.name}: no source scan affine found; wrote an axis-aligned affine "
                "from the layer's scale and translate.")
    write_nifti(target, labels, affine, dtype=label_dtype(labels),
                qform_code=int(metadata.get("qform_code", 1) or 1),
                sform_code=int(metadata.get("sform_code", 1) or 1))
    return [str(target)]


def labels_affine(shape: tuple[int, ...], attributes: dict[str, Any]
                  ) -> tuple[np.ndarray, dict[str, Any], str]:
    """The 4x4 affine to write a layer of this ``shape`` with (see the module docstring).

    Returns
    -------
    affine : (4, 4) float array
    metadata : dict
        The metadata the affine came from (for the qform/sform codes).
    source : str
        ``"layer metadata"``, ``"image layer <name>"`` or ``"scale/translate"``.
    """
    ndim = len(shape)
    scale = tuple(float(s) for s in attributes.get("scale", (1.0,) * ndim))[-ndim:]
    translate = tuple(float(t) for t in attributes.get("translate", (0.0,) * ndim))[-ndim:]
    metadata = attributes.get("metadata") or {}
    if _fits(metadata.get("affine"), ndim, scale, translate):
        return np.asarray(metadata["affine"], dtype=np.float64), metadata, "layer metadata"
    for layer in _viewer_image_layers():
        layer_meta = getattr(layer, "metadata", None) or {}
        rgb = bool(getattr(layer, "rgb", False))
        layer_shape = tuple(np.shape(layer.data)[:-1] if rgb else np.shape(layer.data))
        if (layer_shape[-ndim:] == tuple(shape) and len(layer_shape) == ndim
                and np.allclose(layer.scale, scale, rtol=1e-5, atol=1e-6)
                and np.allclose(layer.translate, translate, rtol=1e-5, atol=1e-4)
                and _fits(layer_meta.get("affine"), ndim, scale, translate)):
            return (np.asarray(layer_meta["affine"], dtype=np.float64), layer_meta,
                    f"image layer {layer.name}")
    return affine_from_scale_translate(scale, translate), {}, "scale/translate"


def _fits(affine, ndim: int, scale, translate) -> bool:
    """Does the affine describe a layer shown with this scale and translate?"""
    if affine is None:
        return False
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        return False
    spacing, origin = scale_translate_from_affine(affine, ndim)
    return bool(np.allclose(spacing, scale, rtol=1e-4, atol=1e-6)
                and np.allclose(origin, translate, rtol=1e-5, atol=1e-3))


def _viewer_image_layers() -> list:
    try:
        import napari
        from napari.layers import Image
    except ImportError:  # pragma: no cover - the writer always runs inside napari
        return []
    viewer = napari.current_viewer()
    if viewer is None:
        return []
    return [layer for layer in viewer.layers if isinstance(layer, Image)]


def _notify(message: str) -> None:
    try:
        from napari.utils.notifications import show_info
    except ImportError:  # pragma: no cover
        return
    show_info(message)
