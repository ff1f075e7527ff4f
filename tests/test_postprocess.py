"""Saliency -> coarse mask -> prompts, checked against values worked out by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest
from skimage.filters import threshold_otsu

from napari_medclipsam.core.config import CoarseMaskConfig, PromptConfig
from napari_medclipsam.core.errors import InputError
from napari_medclipsam.core.postprocess import (
    Component,
    Prompts,
    body_slices,
    boxes_from_labels,
    coarse_mask,
    keep_largest_components,
    make_prompts,
    sample_points,
    threshold_saliency,
)

FIXED = CoarseMaskConfig(method="fixed", threshold=0.3, top_k=None)


def two_blobs() -> np.ndarray:
    """40x40 map: blob A small and bright (5x5, 0.75), blob B big and dim (15x15, 0.5)."""
    sal = np.zeros((40, 40), dtype=np.float32)
    sal[5:10, 5:10] = 0.75  # A: area 25, rows 5..9, cols 5..9
    sal[20:35, 22:37] = 0.5  # B: area 225, rows 20..34, cols 22..36
    return sal


# --------------------------------------------------------------------------- thresholds


def test_otsu_matches_skimage_on_a_bimodal_map():
    rng = np.random.default_rng(0)
    sal = rng.normal(0.2, 0.03, (60, 80))
    sal[10:30, 20:50] = rng.normal(0.8, 0.03, (20, 30))
    sal = sal.astype(np.float32)
    mask, t = threshold_saliency(sal, CoarseMaskConfig())
    assert t == pytest.approx(float(threshold_otsu(sal.astype(np.float64))))
    expected = np.zeros((60, 80), dtype=bool)
    expected[10:30, 20:50] = True
    assert sal[~expected].max() < t < sal[expected].min()  # in the gap between the modes
    assert mask.dtype == bool and (mask == expected).all()
    assert (mask == (sal > t)).all()


def test_kmeans_threshold_is_the_midpoint_of_the_two_levels():
    sal = np.full((64, 64), 0.1, dtype=np.float32)
    sal[20:40, 8:30] = 0.7
    # kmeans_size equal to the map's side: resizing changes nothing, the centres are the levels.
    mask, t = threshold_saliency(sal, CoarseMaskConfig(method="kmeans", kmeans_size=64))
    assert t == pytest.approx(0.4, abs=1e-6)
    assert (mask == (sal > 0.5)).all() and mask.sum() == 20 * 22


def test_kmeans_mask_is_at_the_input_size():
    sal = np.full((50, 90), 0.1, dtype=np.float32)
    sal[10:25, 40:70] = 0.9
    mask, t = threshold_saliency(sal, CoarseMaskConfig(method="kmeans", kmeans_size=32))
    assert mask.shape == (50, 90)
    assert 0.1 < t < 0.9
    assert (mask == (sal > 0.5)).all()


def test_fixed_threshold_is_strict():
    sal = np.zeros((4, 6), dtype=np.float32)
    sal[0, :] = 0.3  # exactly at the threshold: background
    sal[1, :2] = 0.5
    mask, t = threshold_saliency(sal, CoarseMaskConfig(method="fixed", threshold=0.3))
    assert t == pytest.approx(0.3)
    assert mask.sum() == 2 and mask[1, :2].all()


@pytest.mark.parametrize("method", ["otsu", "kmeans", "fixed"])
@pytest.mark.parametrize("value", [0.0, 0.5])
def test_constant_map_gives_an_empty_result(method, value):
    sal = np.full((16, 16), value, dtype=np.float32)
    config = CoarseMaskConfig(method=method, kmeans_size=16)
    mask, _ = threshold_saliency(sal, config)
    assert not mask.any()
    result = coarse_mask(sal, config)
    assert result.empty and result.components == () and result.n_candidates == 0
    assert not result.mask.any() and not result.labels.any()
    assert result.labels.dtype == np.int32 and result.labels.shape == (16, 16)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_saliency_raises(bad):
    sal = np.zeros((8, 8), dtype=np.float32)
    sal[3, 3] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        threshold_saliency(sal, CoarseMaskConfig())
    with pytest.raises(ValueError, match="NaN or infinite"):
        coarse_mask(sal, CoarseMaskConfig())


def test_saliency_must_be_2d():
    with pytest.raises(ValueError, match="2-D"):
        coarse_mask(np.zeros((2, 8, 8)), CoarseMaskConfig())


# --------------------------------------------------------------------------- components


def test_top1_by_confidence_keeps_the_brighter_blob():
    result = coarse_mask(two_blobs(), CoarseMaskConfig(method="fixed", threshold=0.3, top_k=1))
    assert result.n_candidates == 2
    assert result.components == (
        Component(label=1, area=25, confidence=0.75, box=(5.0, 5.0, 9.0, 9.0)),
    )
    expected = np.zeros((40, 40), dtype=bool)
    expected[5:10, 5:10] = True
    assert (result.mask == expected).all() and (result.labels == expected.astype(int)).all()


def test_top1_by_area_keeps_the_bigger_blob():
    config = CoarseMaskConfig(method="fixed", threshold=0.3, top_k=1, rank_by="area")
    result = coarse_mask(two_blobs(), config)
    (c,) = result.components
    assert (c.label, c.area, c.confidence, c.box) == (1, 225, 0.5, (22.0, 20.0, 36.0, 34.0))
    assert result.mask.sum() == 225 and result.mask[20:35, 22:37].all()


def test_all_components_are_relabelled_in_rank_order():
    result = coarse_mask(two_blobs(), FIXED)
    assert [c.label for c in result.components] == [1, 2]
    assert [c.area for c in result.components] == [25, 225]
    assert (result.labels[5:10, 5:10] == 1).all() and (result.labels[20:35, 22:37] == 2).all()
    assert result.labels.sum() == 25 * 1 + 225 * 2
    by_area = coarse_mask(
        two_blobs(), CoarseMaskConfig(method="fixed", top_k=None, rank_by="area")
    )
    assert (by_area.labels[20:35, 22:37] == 1).all() and (by_area.labels[5:10, 5:10] == 2).all()


def test_eta_c_is_a_strict_lower_bound_on_confidence():
    sal = two_blobs()  # confidences 0.75 and 0.5, both exact in float32
    kept = coarse_mask(sal, CoarseMaskConfig(method="fixed", top_k=None, eta_c=0.5))
    assert [c.confidence for c in kept.components] == [0.75]  # 0.5 > 0.5 is false
    assert kept.n_candidates == 2
    both = coarse_mask(sal, CoarseMaskConfig(method="fixed", top_k=None, eta_c=0.4999))
    assert len(both.components) == 2
    none = coarse_mask(sal, CoarseMaskConfig(method="fixed", top_k=None, eta_c=0.75))
    assert none.empty and not none.mask.any() and none.n_candidates == 2


def test_confidence_is_the_mean_saliency_inside():
    sal = np.zeros((10, 10), dtype=np.float32)
    sal[2:4, 2:5] = [[0.5, 0.6, 0.7], [0.8, 0.9, 1.0]]  # mean 4.5 / 6 = 0.75
    sal[7, 7] = 0.4  # a single pixel, mean 0.4
    result = coarse_mask(sal, FIXED)
    assert [c.area for c in result.components] == [6, 1]
    assert result.components[0].confidence == pytest.approx(0.75, abs=1e-6)
    assert result.components[1].confidence == pytest.approx(0.4, abs=1e-6)
    assert result.components[0].box == (2.0, 2.0, 4.0, 3.0)
    assert result.components[1].box == (7.0, 7.0, 7.0, 7.0)


def test_min_area_drops_small_components_first():
    sal = two_blobs()
    result = coarse_mask(sal, CoarseMaskConfig(method="fixed", top_k=1, min_area=26))
    assert result.n_candidates == 2
    assert [c.area for c in result.components] == [225]
    result = coarse_mask(sal, CoarseMaskConfig(method="fixed", top_k=1, min_area=25))
    assert [c.area for c in result.components] == [25]


def test_components_use_8_connectivity():
    sal = np.zeros((6, 6), dtype=np.float32)
    sal[1, 1] = sal[2, 2] = sal[3, 3] = 0.9  # a diagonal line: one component
    result = coarse_mask(sal, FIXED)
    assert result.n_candidates == 1
    assert result.components[0].area == 3 and result.components[0].box == (1.0, 1.0, 3.0, 3.0)


def test_ties_in_confidence_go_to_the_larger_component():
    sal = np.zeros((20, 20), dtype=np.float32)
    sal[1:3, 1:3] = 0.6  # area 4, met first in scan order
    sal[10:15, 10:15] = 0.6  # area 25
    (c,) = coarse_mask(sal, CoarseMaskConfig(method="fixed", top_k=1)).components
    assert c.area == 25


def test_otsu_coarse_mask_on_two_blobs():
    """Otsu on the two-blob map separates 0 from both blobs, then top-1 keeps A."""
    result = coarse_mask(two_blobs(), CoarseMaskConfig())
    assert 0.0 < result.threshold < 0.5 and result.n_candidates == 2
    assert result.components[0].area == 25 and result.components[0].box == (5, 5, 9, 9)


# --------------------------------------------------------------------------- boxes


def two_labels() -> np.ndarray:
    """10x12 labels: 1 at rows 2..4 / cols 3..5, 2 at rows 6..8 / cols 8..10."""
    labels = np.zeros((10, 12), dtype=np.int32)
    labels[2:5, 3:6] = 1
    labels[6:9, 8:11] = 2
    return labels


def test_single_box_encloses_everything():
    boxes = boxes_from_labels(two_labels(), "single")
    assert boxes.dtype == np.float32
    assert boxes.tolist() == [[3, 2, 10, 8]]


def test_per_component_boxes_in_label_order():
    assert boxes_from_labels(two_labels(), "per_component").tolist() == [
        [3, 2, 5, 4],
        [8, 6, 10, 8],
    ]


def test_box_of_one_pixel_uses_inclusive_coordinates():
    labels = np.zeros((8, 9), dtype=np.uint8)
    labels[5, 7] = 1
    assert boxes_from_labels(labels).tolist() == [[7, 5, 7, 5]]
    assert boxes_from_labels(labels.astype(bool)).tolist() == [[7, 5, 7, 5]]


def test_box_margin_is_clipped_to_the_image():
    # W = 12, H = 10: x in [0, 11], y in [0, 9].
    assert boxes_from_labels(two_labels(), "single", margin=2).tolist() == [[1, 0, 11, 9]]
    assert boxes_from_labels(two_labels(), "per_component", margin=2).tolist() == [
        [1, 0, 7, 6],
        [6, 4, 11, 9],
    ]
    assert boxes_from_labels(two_labels(), "single", margin=100).tolist() == [[0, 0, 11, 9]]


def test_boxes_of_empty_labels():
    for mode in ("single", "per_component"):
        boxes = boxes_from_labels(np.zeros((5, 5), dtype=int), mode)
        assert boxes.shape == (0, 4) and boxes.dtype == np.float32


def test_per_component_boxes_with_gaps_in_label_values():
    labels = two_labels() * 3  # values 3 and 6
    assert boxes_from_labels(labels, "per_component").tolist() == [[3, 2, 5, 4], [8, 6, 10, 8]]


# --------------------------------------------------------------------------- points


def _on(labels: np.ndarray, points: np.ndarray) -> np.ndarray:
    return labels[points[:, 1].astype(int), points[:, 0].astype(int)]


def test_points_inside_and_outside():
    labels = two_labels()
    points, point_labels, point_box = sample_points(labels, 5, 4, seed=1)
    assert points.shape == (9, 2) and points.dtype == np.float32
    assert point_labels.dtype == np.int32 and point_box.dtype == np.int32
    assert point_labels.tolist() == [1] * 5 + [0] * 4
    assert (_on(labels, points[:5]) > 0).all()
    assert (_on(labels, points[5:]) == 0).all()
    assert (point_box == -1).all()
    assert len({tuple(p) for p in points.tolist()}) == 9  # without replacement
    assert (points == points.astype(int)).all()  # pixel indices


def test_points_are_deterministic_for_a_seed():
    labels = two_labels()
    a = sample_points(labels, 5, 3, seed=7)
    b = sample_points(labels, 5, 3, seed=7)
    c = sample_points(labels, 5, 3, seed=8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[0], c[0])


def test_per_component_points_know_their_component():
    labels = two_labels()
    points, point_labels, point_box = sample_points(labels, 3, 2, seed=0, per_component=True)
    assert point_box.tolist() == [0, 0, 0, 1, 1, 1, -1, -1]
    assert point_labels.tolist() == [1] * 6 + [0] * 2
    assert (_on(labels, points[:6]) == point_box[:6] + 1).all()
    assert (_on(labels, points[6:]) == 0).all()


def test_fewer_pixels_than_requested_gives_all_pixels():
    labels = np.zeros((6, 6), dtype=int)
    labels[1, 1:3] = 1  # two pixels: (x=1, y=1) and (x=2, y=1)
    points, point_labels, _ = sample_points(labels, 10)
    assert sorted(points.tolist()) == [[1.0, 1.0], [2.0, 1.0]]
    assert point_labels.tolist() == [1, 1]
    points, _, _ = sample_points(labels, 1, n_negative=100)
    assert len(points) == 1 + 34


# --------------------------------------------------------------------------- prompts


def test_make_prompts_boxes():
    prompts = make_prompts(two_labels(), PromptConfig(mode="boxes"))
    assert prompts.boxes.tolist() == [[3, 2, 10, 8]] and prompts.points.shape == (0, 2)
    assert not prompts.empty
    prompts = make_prompts(
        two_labels(), PromptConfig(mode="boxes", box_mode="per_component", box_margin=1)
    )
    assert prompts.boxes.tolist() == [[2, 1, 6, 5], [7, 5, 11, 9]]


def test_make_prompts_points():
    labels = two_labels()
    prompts = make_prompts(
        labels, PromptConfig(mode="points", n_positive=10, n_negative=2, box_mode="per_component")
    )
    assert prompts.boxes.shape == (0, 4)
    assert prompts.point_labels.tolist() == [1] * 10 + [0] * 2
    assert (prompts.point_box == -1).all()
    assert (_on(labels, prompts.points[:10]) > 0).all()


def test_make_prompts_both():
    labels = two_labels()
    per = make_prompts(labels, PromptConfig(mode="both", box_mode="per_component", n_positive=2))
    assert len(per.boxes) == 2 and per.point_box.tolist() == [0, 0, 1, 1]
    single = make_prompts(labels, PromptConfig(mode="both", n_positive=4, n_negative=1))
    assert len(single.boxes) == 1 and single.point_box.tolist() == [-1] * 5
    assert single.point_labels.tolist() == [1, 1, 1, 1, 0]


@pytest.mark.parametrize("mode", ["boxes", "points", "both"])
def test_make_prompts_of_nothing_is_empty(mode):
    prompts = make_prompts(np.zeros((8, 8), dtype=np.int32), PromptConfig(mode=mode))
    assert prompts.empty and prompts.groups() == []
    assert prompts.boxes.shape == (0, 4) and prompts.points.shape == (0, 2)


def test_prompt_groups():
    prompts = Prompts(
        boxes=[[0, 0, 4, 4], [5, 5, 9, 9]],
        points=[[1, 1], [7, 7], [3, 8]],
        point_labels=[1, 1, 0],
        point_box=[0, 1, -1],
    )
    groups = prompts.groups()
    assert len(groups) == 2
    (b0, p0, l0), (b1, p1, l1) = groups
    assert (
        b0.tolist() == [0, 0, 4, 4] and p0.tolist() == [[1, 1], [3, 8]] and l0.tolist() == [1, 0]
    )
    assert (
        b1.tolist() == [5, 5, 9, 9] and p1.tolist() == [[7, 7], [3, 8]] and l1.tolist() == [1, 0]
    )
    only_points = Prompts(points=[[1, 2], [3, 4]], point_labels=[1, 0])
    ((box, pts, lab),) = only_points.groups()
    assert box is None and pts.tolist() == [[1, 2], [3, 4]] and lab.tolist() == [1, 0]
    assert only_points.point_box.tolist() == [-1, -1]


def test_prompts_round_trip_through_json():
    prompts = make_prompts(
        two_labels(),
        PromptConfig(mode="both", box_mode="per_component", n_positive=3, n_negative=2),
    )
    data = json.loads(json.dumps(prompts.to_dict()))
    assert set(data) == {"boxes", "points", "point_labels", "point_box"}
    back = Prompts.from_dict(data)
    assert back == prompts
    assert back.boxes.dtype == np.float32 and back.point_box.dtype == np.int32
    empty = Prompts.from_dict(json.loads(json.dumps(Prompts().to_dict())))
    assert empty.empty and empty == Prompts()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"boxes": [[0, 0, 1]]},
        {"boxes": [[5, 0, 1, 1]]},
        {"points": [[1, 1]]},
        {"points": [[1, 1]], "point_labels": [2]},
        {"points": [[1, 1]], "point_labels": [1], "point_box": [0]},
        {"boxes": [[0, 0, 1, 1]], "points": [[1, 1]], "point_labels": [1], "point_box": [0.5]},
        {"points": [[np.nan, 1]], "point_labels": [1]},
    ],
)
def test_bad_prompts_are_refused(kwargs):
    with pytest.raises(ValueError):
        Prompts(**kwargs)


def test_from_dict_refuses_unknown_keys():
    with pytest.raises(ValueError, match="Unknown prompt keys: box"):
        Prompts.from_dict({"box": [[0, 0, 1, 1]]})


# --------------------------------------------------------------------------- largest


def test_keep_largest_components():
    mask = np.zeros((10, 10), dtype=bool)
    mask[0:2, 0:3] = True  # area 6
    mask[5:7, 5:7] = True  # area 4
    mask[9, 0:2] = True  # area 2
    mask[3, 8] = mask[4, 9] = True  # area 2, diagonal: one component with 8-connectivity
    one = keep_largest_components(mask, 1)
    assert one.sum() == 6 and one[0:2, 0:3].all()
    two = keep_largest_components(mask, 2)
    assert two.sum() == 10 and two[0:2, 0:3].all() and two[5:7, 5:7].all()
    for n in (None, 0):
        same = keep_largest_components(mask, n)
        assert (same == mask).all() and same is not mask
    assert (keep_largest_components(mask, 4) == mask).all()
    assert (keep_largest_components(mask, 10) == mask).all()
    assert (keep_largest_components(mask.astype(np.uint8) * 255, 1) == one).all()


def test_keep_largest_components_in_3d_uses_26_connectivity():
    vol = np.zeros((5, 5, 5), dtype=bool)
    vol[0, 0, 0] = vol[1, 1, 1] = True  # touch at a corner only: one component of 2
    vol[3:5, 3:5, 4] = True  # area 4
    vol[4, 0, 4] = True  # area 1
    kept = keep_largest_components(vol, 2)
    assert kept.sum() == 6 and kept[0, 0, 0] and kept[1, 1, 1] and not kept[4, 0, 4]


# --------------------------------------------------------------------------- body slices


def ct_like_volume() -> np.ndarray:
    """(8, 20, 20) int16 "CT": air at -1000 HU; slices 0, 1 and 7 hold only air, slice 6 a
    single 60 HU voxel (1 of 400, 0.25 %), slices 2-5 a 10x10 body at 40 HU (25 %)."""
    vol = np.full((8, 20, 20), -1000, dtype=np.int16)
    vol[2:6, 5:15, 5:15] = 40
    vol[6, 10, 10] = 60
    return vol


def test_body_slices_otsu_keeps_the_body_and_skips_air():
    vol = ct_like_volume()
    kept, threshold, how = body_slices(vol)
    assert how == "otsu"
    assert threshold == pytest.approx(threshold_otsu(vol.astype(np.float64).ravel()))
    assert -1000 < threshold < 40  # between air and tissue
    assert kept == [2, 3, 4, 5]  # slice 6: one body voxel, 0.25 % < the default 1 %
    assert body_slices(vol, fraction=0.002)[0] == [2, 3, 4, 5, 6]
    assert body_slices(vol, fraction=0.0)[0] == list(range(8))  # every share is >= 0


def test_body_slices_with_a_given_threshold():
    vol = ct_like_volume()
    assert body_slices(vol, threshold=50.0, fraction=0.002) == ([6], 50.0, "given")
    assert body_slices(vol, threshold=-2000, fraction=1.0) == (list(range(8)), -2000.0,
                                                               "given")
    assert body_slices(vol, threshold=40, fraction=0.25) == ([], 40.0, "given")  # ">" not ">="
    # a share exactly at the fraction is kept: 100 of 400 voxels above 0 on slices 2-5
    assert body_slices(vol, threshold=0, fraction=0.25)[0] == [2, 3, 4, 5]


def test_body_slices_of_a_constant_or_non_finite_volume():
    flat = np.full((3, 4, 4), 7.0, dtype=np.float32)
    assert body_slices(flat) == ([], 7.0, "otsu")  # nothing stands out: no body
    nan = np.full((2, 3, 3), np.nan, dtype=np.float32)
    assert body_slices(nan) == ([], 0.0, "otsu")
    mixed = np.zeros((3, 10, 10), dtype=np.float32)
    mixed[1, :5] = 100.0
    mixed[2] = np.nan  # NaN voxels are ignored by Otsu and never count as body
    assert body_slices(mixed) == ([1], pytest.approx(threshold_otsu(np.array(
        [0.0] * 150 + [100.0] * 50))), "otsu")


@pytest.mark.parametrize(("volume", "kwargs", "match"), [
    (np.zeros(5), {}, r"2 or more dimensions .*shape \(5,\)"),
    (np.zeros((2, 3, 3)), {"fraction": 1.5}, "fraction 1.5: give a share between 0 and 1"),
])
def test_body_slices_refuses_bad_input(volume, kwargs, match):
    with pytest.raises(InputError, match=match):
        body_slices(volume, **kwargs)
