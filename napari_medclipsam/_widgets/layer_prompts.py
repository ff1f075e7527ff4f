"""Conversions between SAM prompts and napari Shapes/Points layer data (pure numpy).

Coordinates: napari layers hold (row, col), or (z, row, col) for 3-D layers; the core's
boxes are XYXY ``(x0, y0, x1, y1)`` and its points XY ``(column, row)``, both in image
pixels. Point labels: 1 positive, 0 negative, kept in the Points layer's ``label`` feature.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from napari_medclipsam.core.postprocess import Prompts

POSITIVE_COLOR = np.array([0.0, 1.0, 0.0, 1.0])
NEGATIVE_COLOR = np.array([1.0, 0.0, 0.0, 1.0])


def boxes_to_rectangles(boxes: np.ndarray, z: float | None = None) -> list[np.ndarray]:
    """XYXY pixel boxes (N, 4) -> napari rectangles, each (4, 2) (row, col), or (4, 3)
    (z, row, col) when ``z`` is given."""
    out = []
    for x0, y0, x1, y1 in np.asarray(boxes, dtype=float).reshape(-1, 4):
        rect = np.array([[y0, x0], [y0, x1], [y1, x1], [y1, x0]], dtype=float)
        if z is not None:
            rect = np.column_stack([np.full(4, float(z)), rect])
        out.append(rect)
    return out


def rectangles_to_boxes(shapes: Sequence[np.ndarray], shape_hw: tuple[int, int]) -> np.ndarray:
    """napari shapes (each (k, 2+) vertices, last two axes (row, col)) -> (N, 4) XYXY boxes
    clipped to the image; each box is the min/max of its shape's vertices. Empty input gives
    a (0, 4) array."""
    h, w = shape_hw
    boxes = []
    for verts in shapes:
        verts = np.asarray(verts, dtype=float)[:, -2:]
        y0, x0 = verts.min(axis=0)
        y1, x1 = verts.max(axis=0)
        boxes.append([np.clip(x0, 0, w - 1), np.clip(y0, 0, h - 1),
                      np.clip(x1, 0, w - 1), np.clip(y1, 0, h - 1)])
    return np.asarray(boxes, dtype=np.float32).reshape(-1, 4)


def point_colors(labels: np.ndarray) -> np.ndarray:
    """(N, 4) RGBA face colours: green for positive (1), red for negative points."""
    labels = np.asarray(labels).reshape(-1)
    return np.where((labels == 1)[:, None], POSITIVE_COLOR, NEGATIVE_COLOR).reshape(-1, 4)


def points_to_layer(points: np.ndarray, z: float | None = None) -> np.ndarray:
    """XY points (N, 2) -> napari (N, 2) (row, col), or (N, 3) (z, row, col)."""
    rc = np.asarray(points, dtype=np.float32).reshape(-1, 2)[:, ::-1]
    if z is None:
        return rc
    return np.column_stack([np.full(len(rc), float(z), np.float32), rc])


def points_from_layer(data: np.ndarray, features: Mapping | None) -> tuple[np.ndarray,
                                                                          np.ndarray]:
    """Points layer data (N, 2+) and its features -> XY points (N, 2) and labels (N,).

    Points without a ``label`` feature (drawn by hand) are positive.
    """
    data = np.asarray(data, dtype=np.float32)
    if data.size == 0:
        data = data.reshape(0, 2)
    points = data[:, -2:][:, ::-1].copy()
    labels = None
    if features is not None and "label" in features and len(features["label"]) == len(points):
        labels = np.asarray(features["label"], dtype=np.int32)
    if labels is None:
        labels = np.ones(len(points), np.int32)
    return points, labels


def prompts_from_layer_data(shapes: Sequence[np.ndarray] | None, points_data: np.ndarray | None,
                            points_features: Mapping | None,
                            shape_hw: tuple[int, int]) -> Prompts:
    """Boxes and points as the user left them in the Shapes and Points layers."""
    boxes = (rectangles_to_boxes(shapes, shape_hw) if shapes is not None
             else np.zeros((0, 4), np.float32))
    if points_data is None or not len(points_data):
        return Prompts(boxes=boxes)
    points, labels = points_from_layer(points_data, points_features)
    return Prompts(boxes=boxes, points=points, point_labels=labels)


def volume_prompts_to_layers(prompts_by_slice: Mapping[int, Prompts]) -> tuple[
        list[np.ndarray], np.ndarray, np.ndarray]:
    """Per-slice prompts of a volume run -> 3-D rectangles, (N, 3) points and their labels."""
    rects: list[np.ndarray] = []
    points, labels = [], []
    for z, prompts in sorted(prompts_by_slice.items()):
        rects.extend(boxes_to_rectangles(prompts.boxes, z=z))
        points.append(points_to_layer(prompts.points, z=z))
        labels.append(np.asarray(prompts.point_labels, np.int32))
    pts = np.concatenate(points) if points else np.zeros((0, 3), np.float32)
    lab = np.concatenate(labels) if labels else np.zeros((0,), np.int32)
    return rects, pts.reshape(-1, 3), lab
