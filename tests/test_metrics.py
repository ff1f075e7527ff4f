"""DSC and NSD on masks whose scores are worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from napari_medclipsam.core.metrics import dice, nsd, resize_nearest


def square(shape, rows, cols) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[rows[0] : rows[1], cols[0] : cols[1]] = True
    return mask


# --------------------------------------------------------------------------- dice


def test_dice_of_two_overlapping_squares():
    a = square((10, 10), (2, 6), (2, 6))  # 16 pixels
    b = square((10, 10), (3, 7), (3, 7))  # 16 pixels, 9 shared
    assert dice(a, b) == pytest.approx(2 * 9 / 32)
    assert dice(a, a) == 1.0


def test_dice_of_empty_masks():
    empty = np.zeros((5, 5), dtype=bool)
    assert dice(empty, empty) == 1.0
    assert dice(empty, square((5, 5), (0, 2), (0, 2))) == 0.0
    assert dice(square((5, 5), (0, 2), (0, 2)), empty) == 0.0


def test_dice_treats_positive_values_as_foreground():
    a = np.array([[0, 255], [3, 0]], dtype=np.uint8)
    b = np.array([[0.0, 0.2], [0.0, 0.0]])
    assert dice(a, b) == pytest.approx(2 * 1 / 3)


def test_dice_needs_equal_shapes():
    with pytest.raises(ValueError, match="same shape"):
        dice(np.zeros((4, 4)), np.zeros((4, 5)))


# --------------------------------------------------------------------------- nsd


def test_nsd_of_identical_masks():
    a = square((20, 20), (4, 12), (5, 15))
    assert nsd(a, a) == 1.0
    assert nsd(a, a, tolerance=0) == 1.0


def test_nsd_of_empty_masks():
    empty = np.zeros((8, 8), dtype=bool)
    assert nsd(empty, empty) == 1.0
    assert nsd(empty, square((8, 8), (1, 3), (1, 3))) == 0.0
    assert nsd(square((8, 8), (1, 3), (1, 3)), empty) == 0.0


def test_nsd_square_shifted_by_one_pixel():
    a = square((30, 30), (10, 20), (10, 20))
    b = square((30, 30), (11, 21), (10, 20))
    assert nsd(a, b, tolerance=2) == 1.0
    assert nsd(a, b, tolerance=1) == 1.0
    assert dice(a, b) == pytest.approx(2 * 90 / 200)


def test_nsd_far_apart_is_zero():
    a = square((40, 40), (5, 10), (5, 10))
    b = square((40, 40), (30, 35), (30, 35))
    assert nsd(a, b, tolerance=2) == 0.0


def test_nsd_concentric_squares():
    """Borders 3 px apart; the outer corners are further (up to sqrt(18))."""
    outer = square((20, 20), (2, 18), (2, 18))  # 16x16: 60 border pixels
    inner = square((20, 20), (5, 15), (5, 15))  # 10x10: 36 border pixels
    assert nsd(outer, inner, tolerance=2) == 0.0
    # tolerance 3: every inner border pixel (3 px from the outer side facing it) and, on each
    # outer side, the 10 pixels facing the inner side (columns 5..14); the 6 pixels nearer the
    # corners are sqrt(10), sqrt(13) or sqrt(18) away.
    assert nsd(outer, inner, tolerance=3) == pytest.approx((4 * 10 + 36) / (60 + 36))
    assert nsd(inner, outer, tolerance=3) == pytest.approx(76 / 96)
    assert nsd(outer, inner, tolerance=np.sqrt(18) + 1e-9) == 1.0


def test_nsd_partial_match_counted_by_hand():
    """10x10 squares, one shifted 3 columns right; tolerance 2.

    The shifted square's border is the mirror image of the other's, so each side matches the
    same count. The unshifted square's border (36 pixels): top and bottom rows match at
    columns 11..19 (9 + 9; column 10 is 3 away), the left column (8 pixels between the
    corners) is 3 from everything, the right column matches the 2 pixels nearest each corner
    (1 or 2 below/above the other's top/bottom row) -> 4. 22 of 36 on each side.
    """
    a = square((32, 32), (10, 20), (10, 20))
    b = square((32, 32), (10, 20), (13, 23))
    assert nsd(a, b, tolerance=2) == pytest.approx(44 / 72)
    assert nsd(b, a, tolerance=2) == pytest.approx(44 / 72)
    assert nsd(a, b, tolerance=3) == 1.0


def test_nsd_spacing_anisotropy():
    a = square((32, 32), (10, 20), (10, 20))
    b = square((32, 32), (10, 20), (13, 23))  # shifted 3 columns
    # Columns 0.5 wide: the shift is 1.5, within 2 everywhere.
    assert nsd(a, b, tolerance=2, spacing=(1.0, 0.5)) == 1.0
    assert nsd(a, b, tolerance=2, spacing=0.5) == 1.0
    # Rows 0.5 high: the column shift stays 3, but now all 8 right-column pixels are within
    # 2 of the other's top or bottom row: 9 + 9 + 0 + 8 = 26 of 36 on each side.
    assert nsd(a, b, tolerance=2, spacing=(0.5, 1.0)) == pytest.approx(52 / 72)
    # Pixels twice as large: tolerance 2 is one pixel. Top/bottom rows match at columns
    # 12..19 (8 + 8), the right column only next to the corners (2): 18 of 36 on each side.
    assert nsd(a, b, tolerance=2, spacing=2.0) == pytest.approx(36 / 72)
    assert nsd(a, b, tolerance=1) == pytest.approx(36 / 72)


def test_nsd_counts_the_image_edge_as_background():
    """A mask filling the image has its outer ring as border."""
    full = np.ones((10, 10), dtype=bool)  # border: 36 pixels
    cut = full.copy()
    cut[:, 9] = False  # 10x9 rectangle, border 34 pixels
    # Tolerance 0: 26 pixels lie on both borders (top, bottom rows at columns 0..8, left
    # column between the corners).
    assert nsd(full, cut, tolerance=0) == pytest.approx(52 / 70)
    assert nsd(full, cut, tolerance=1) == 1.0


def test_nsd_3d_concentric_cubes():
    outer = np.zeros((20, 20, 20), dtype=bool)
    outer[2:18, 2:18, 2:18] = True  # 16^3 - 14^3 = 1352 border voxels
    inner = np.zeros_like(outer)
    inner[5:15, 5:15, 5:15] = True  # 10^3 - 8^3 = 488 border voxels
    assert nsd(outer, inner, tolerance=2) == 0.0
    # Tolerance 3: all inner border voxels, and on each outer face the 10x10 voxels facing
    # the inner cube's face.
    assert nsd(outer, inner, tolerance=3) == pytest.approx((6 * 100 + 488) / (1352 + 488))
    assert nsd(outer, inner, tolerance=np.sqrt(27) + 1e-9) == 1.0
    # Voxels 0.5 deep along z: the z faces are 1.5 apart, and more outer voxels come near.
    assert nsd(outer, inner, tolerance=3, spacing=(0.5, 1, 1)) > nsd(outer, inner, tolerance=3)


def test_nsd_refuses_bad_arguments():
    a = square((8, 8), (1, 3), (1, 3))
    with pytest.raises(ValueError, match="same shape"):
        nsd(a, a[:, :7])
    with pytest.raises(ValueError, match="spacing"):
        nsd(a, a, spacing=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        nsd(a, a, spacing=0)
    with pytest.raises(ValueError, match="tolerance"):
        nsd(a, a, tolerance=-1)


# --------------------------------------------------------------------------- resize


def test_resize_nearest_keeps_labels_and_dtype():
    labels = np.array([[0, 1], [2, 3]], dtype=np.uint16)
    up = resize_nearest(labels, (4, 4))
    assert up.dtype == np.uint16
    assert up.tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    down = resize_nearest(up, (2, 2))
    assert (down == labels).all()
    big = np.zeros((6, 9), dtype=np.int32)
    big[:, 3:] = 7
    out = resize_nearest(big, (13, 5))
    assert out.shape == (13, 5) and set(np.unique(out).tolist()) <= {0, 7}


def test_resize_nearest_bool():
    mask = square((4, 4), (1, 3), (1, 3))
    out = resize_nearest(mask, (8, 8))
    assert out.dtype == bool and (out == square((8, 8), (2, 6), (2, 6))).all()
    with pytest.raises(ValueError, match="one entry per dimension"):
        resize_nearest(mask, (8, 8, 8))
