"""The text-prompt widget's Qt-free controller: Run all, a box edit, boxes from a painted
mask and the multi-target label map, on tiny models and plain arrays (no Qt, no napari)."""

import numpy as np
import pytest

from napari_medclipsam._widgets.segment_controller import SegmentController, Target, target_name
from napari_medclipsam.core.config import PromptConfig
from napari_medclipsam.core.errors import InputError
from napari_medclipsam.core.postprocess import Prompts


def _image(h=48, w=64):
    rng = np.random.default_rng(0)
    img = (40 + 10 * rng.standard_normal((h, w))).clip(0, 255).astype(np.uint8)
    img[10:25, 20:40] = 220
    return img


def test_run_all_then_box_edit_reuses_the_embedding(tiny_pipeline):
    ctl = SegmentController(tiny_pipeline)
    run = ctl.run_all(_image(), ["a disk"], source="scan")
    assert ctl.state.run is run and run.editable and run.target == Target("a disk", 1,
                                                                           ("a disk",))
    assert run.result.rgb.shape == (48, 64, 3) and run.mask.shape == (48, 64)
    encodes = tiny_pipeline.session.encoder_calls
    mask = ctl.refine(Prompts(boxes=np.array([[18, 8, 42, 27]], np.float32)))
    assert tiny_pipeline.session.encoder_calls == encodes  # decoder only
    assert ctl.state.refine_count == 1 and run.mask is mask and mask.shape == (48, 64)
    empty = ctl.refine(Prompts())
    assert not empty.any() and ctl.state.refine_count == 2


def test_volume_run_is_not_editable(tiny_pipeline):
    ctl = SegmentController(tiny_pipeline)
    vol = np.stack([_image(), _image()])
    run = ctl.run_all(vol, ["a disk"], volume=True)
    assert run.volume is not None and run.mask.shape == vol.shape and not run.editable
    with pytest.raises(InputError, match="single slice"):
        ctl.refine(Prompts(boxes=np.array([[1, 1, 5, 5]], np.float32)))


def test_prompts_from_a_painted_mask_one_box_per_region(tiny_pipeline):
    ctl = SegmentController(tiny_pipeline)
    ctl.run_all(_image(), ["a disk"])
    painted = np.zeros((48, 64), np.int32)
    painted[5:15, 10:30] = 1
    painted[30:40, 40:60] = 7  # label value is irrelevant
    prompts = ctl.prompts_from_mask(painted, PromptConfig(box_mode="per_component"))
    assert sorted(map(tuple, prompts.boxes.tolist())) == [(10, 5, 29, 14), (40, 30, 59, 39)]
    single = ctl.prompts_from_mask(painted, PromptConfig(box_mode="single"))
    assert single.boxes.tolist() == [[10, 5, 59, 39]]
    with pytest.raises(InputError, match="empty"):
        ctl.prompts_from_mask(np.zeros((48, 64)))


def test_targets_get_their_own_values_and_names():
    ctl = SegmentController()
    a = ctl.target_for(["left lung"])
    b = ctl.target_for(["right lung", "the right lung in a chest x-ray"])
    assert (a.value, b.value) == (1, 2) and b.name == "right lung +1"
    assert ctl.target_for(["left lung"]) is a  # rerunning a target keeps its value
    assert ctl.label_table() == {"left lung": 1, "right lung +1": 2}
    with pytest.raises(InputError, match="prompt"):
        target_name(["  "])


def test_accept_never_overwrites_another_target_unless_asked():
    ctl = SegmentController()
    left, right = ctl.target_for(["left lung"]), ctl.target_for(["right lung"])
    label_map = np.zeros((3, 8, 8), np.int32)
    mask_left = np.zeros((8, 8), bool)
    mask_left[1:5, 1:5] = True
    index, values = ctl.accept(label_map, mask_left, left, slice_index=1)
    label_map[index] = values
    assert (label_map[1][mask_left] == 1).all() and label_map.sum() == 16
    assert not label_map[0].any() and not label_map[2].any()

    mask_right = np.zeros((8, 8), bool)
    mask_right[3:7, 3:7] = True  # overlaps the left lung on 2x2 voxels
    index, values = ctl.accept(label_map, mask_right, right, slice_index=1)
    label_map[index] = values
    assert (label_map[1][1:5, 1:5] == 1).all()  # kept
    assert (label_map[1] == 2).sum() == 16 - 4

    index, values = ctl.accept(label_map, mask_right, right, slice_index=1, overwrite=True)
    label_map[index] = values
    assert (label_map[1][3:7, 3:7] == 2).all() and (label_map[1] == 1).sum() == 16 - 4

    # re-accepting a smaller mask for the same target clears its old voxels only
    smaller = np.zeros((8, 8), bool)
    smaller[5:7, 5:7] = True
    index, values = ctl.accept(label_map, smaller, right, slice_index=1)
    label_map[index] = values
    assert (label_map[1] == 2).sum() == 4 and (label_map[1] == 1).sum() == 12

    with pytest.raises(InputError, match="slice"):
        ctl.accept(label_map, smaller, right)
    with pytest.raises(InputError, match="does not fit"):
        ctl.accept(np.zeros((5, 5), np.int32), smaller, right)


def test_accept_defaults_to_the_current_run(tiny_pipeline):
    ctl = SegmentController(tiny_pipeline)
    with pytest.raises(InputError, match="Run all"):
        ctl.accept(np.zeros((48, 64), np.int32))
    ctl.run_all(_image(), ["a disk"])
    ctl.refine(Prompts(boxes=np.array([[18, 8, 42, 27]], np.float32)))
    index, values = ctl.accept(np.zeros((48, 64), np.int32))
    assert len(values) == int(ctl.state.run.mask.sum()) and set(values.tolist()) <= {1}
