"""The text-prompt widget's Qt-free controller: Run all, a box edit, boxes from a painted
mask and the multi-target label map, on tiny models and plain arrays (no Qt, no napari);
progress and ETA, a cancelled volume's finished slices, the GUI's wording of the core's
messages, preset suggestions, the settings line and saving the mask."""

import json

import numpy as np
import pytest

from napari_medclipsam._widgets.segment_controller import (
    ProgressTracker,
    SegmentController,
    Target,
    cancel_message,
    describe_settings,
    format_duration,
    gui_message,
    label_map_path,
    matching_presets,
    save_mask,
    target_name,
)
from napari_medclipsam.core.config import PipelineConfig, PromptConfig
from napari_medclipsam.core.errors import CancelledError, InputError
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


# --------------------------------------------------------------------------- run, progress
def test_run_checks_the_models_first_and_names_every_stage(tiny_pipeline):
    """A pipeline whose CLIP is not loaded yet: prepare() checks the sources, then loads it,
    before any image is computed; every stage is reported by its name, in order."""
    from napari_medclipsam.core.pipeline import ZeroShotPipeline

    pipe = ZeroShotPipeline(tiny_pipeline.config, sam=tiny_pipeline.sam)  # CLIP not loaded
    ctl = SegmentController(pipe)
    stages = []
    run = ctl.run_all(_image(), ["a disk"], progress=lambda s, f: stages.append((s, f)))
    assert run.result.found and run.seconds > 0
    assert [s for s, _ in stages] == [
        "checking models", "loading CLIP", "saliency step 0/2", "saliency step 1/2",
        "saliency step 2/2", "faithfulness check step 1/2", "faithfulness check step 2/2",
        "coarse mask", "encoding image (SAM)", "SAM mask", "done"]
    fractions = [f for _, f in stages]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


def test_missing_models_are_reported_together_before_any_compute(tmp_path):
    from napari_medclipsam.core.models import ModelUnavailableError
    from napari_medclipsam.core.pipeline import ZeroShotPipeline

    config = PipelineConfig(clip_model=f"local-dir:{tmp_path / 'no_clip'}", sam_model="vit_b",
                            sam_checkpoint=str(tmp_path / "no_sam.pth"), device="cpu")
    ctl = SegmentController(ZeroShotPipeline(config))
    stages = []
    with pytest.raises(ModelUnavailableError) as info:
        ctl.run_all(_image(), ["a disk"], progress=lambda s, f: stages.append(s))
    assert stages == ["checking models"]  # nothing loaded, nothing computed
    message = gui_message(str(info.value))
    assert "CLIP folder not found" in message and "SAM checkpoint not found" in message
    assert message.splitlines()[-1] == (f"SAM: SAM checkpoint not found: {tmp_path}/"
                                        "no_sam.pth. (field: Models > SAM checkpoint)")
    assert "Models > CLIP model" in message and "--" not in message
    assert ctl.state.targets == []  # a failed run does not use up a label value


def test_cancelled_volume_keeps_the_finished_slices(tiny_pipeline):
    ctl = SegmentController(tiny_pipeline)
    vol = np.stack([_image(), _image(), _image(), _image()])
    reference = ctl.run_all(vol, ["a disk"], volume=True)
    stop = []
    seen = []

    def on_slice(z, result):
        seen.append(z)
        if len(seen) == 2:
            stop.append(True)

    with pytest.raises(CancelledError) as info:
        ctl.run_all(vol, ["a disk"], volume=True, should_stop=lambda: bool(stop),
                    on_slice=on_slice)
    run = info.value.partial
    assert str(info.value) == "Cancelled after 2 of 4 slices; finished slices kept."
    assert ctl.state.run is run and run.cancelled and run.volume.completed == [0, 1]
    assert (run.slices_done, run.slices_total) == (2, 4)
    np.testing.assert_array_equal(run.mask[:2], reference.mask[:2])
    assert not run.mask[2:].any() and not run.volume.saliency[2:].any()
    assert cancel_message(None) == "Cancelled; nothing changed."


def test_progress_tracker_counts_slices_and_gives_an_eta():
    now = [0.0]
    tracker = ProgressTracker(clock=lambda: now[0])
    assert tracker.update("loading CLIP", 0.0).eta_s is None
    now[0] = 100.0  # loading took long: it must not count in the ETA
    first = tracker.update("slice 1/4 (z=0): saliency step 0/10", 0.0)
    assert (first.slice_number, first.slice_count, first.slices_done) == (1, 4, 0)
    assert first.eta_s is None and "0 of 4 slices done" in first.text
    now[0] = 110.0
    second = tracker.update("slice 2/4 (z=1): saliency step 0/10", 0.25)
    assert second.slices_done == 1 and second.eta_s == pytest.approx(30.0)
    assert second.text == ("slice 2/4 (z=1): saliency step 0/10 · 1 of 4 slices done · "
                           "about 30 s left")
    last = tracker.update("slice 4/4 (z=3): done", 1.0)
    assert last.slices_done == 4 and "left" not in last.text
    assert len(tracker.updates) == 4 and tracker.stages[0] == "loading CLIP"
    assert format_duration(200) == "3 min 20 s" and format_duration(7500) == "2 h 05 min"


# --------------------------------------------------------------------------- wording
def test_gui_message_says_which_field_to_fill(tmp_path, monkeypatch):
    """The core's own messages (offline CLIP, SAM download, device, a wrong folder), as the
    widget shows them: no command-line flag left, the field to use named instead."""
    import napari_medclipsam.core.models as models

    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(models, "hub_snapshot", offline)
    monkeypatch.setattr("pooch.retrieve", offline)
    problems = [*models.check_clip_source("hf-hub:microsoft/BiomedCLIP"),
                *models.check_clip_source(f"local-dir:{tmp_path / 'missing'}"),
                *models.check_sam_source("vit_b")]
    assert len(problems) == 3 and all("--clip-model" in p or "--sam-checkpoint" in p
                                      for p in problems)
    messages = [gui_message(p) for p in problems]
    assert "choose that folder in Models > CLIP model (Browse...)." in messages[0]
    assert "hf download microsoft/BiomedCLIP --local-dir BiomedCLIP" in messages[0]  # kept
    assert f"(Models > CLIP model: local-dir:{tmp_path / 'missing'})" in messages[1]
    assert "choose it in Models > SAM checkpoint (Browse...)" in messages[2]
    for message in messages:
        assert "--clip-model" not in message and "--sam-checkpoint" not in message
    assert gui_message("CLIP: Could not download it.\n  copy it and choose that folder in "
                       "Models > CLIP model.") == ("CLIP: Could not download it.\n  copy it "
                                                   "and choose that folder in Models > CLIP "
                                                   "model.")  # named once is enough
    with pytest.raises(ValueError) as info:
        models.resolve_device("cuda:7" if not _has_cuda() else "tpu")
    assert "--device" not in gui_message(str(info.value))
    assert gui_message("layer must be between 0 and 3 for this model (4 ViT blocks); got 9."
                       ).endswith("(field: Advanced > Saliency layer)")


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# --------------------------------------------------------------------------- presets, settings
@pytest.mark.parametrize(("prompt", "expected"), [
    (["breast tumor"], ["breast-us"]),
    (["a breast tumour"], ["breast-us"]),
    (["Brain tumors in FLAIR"], ["brain-mri"]),
    (["lungs"], ["lung-xray", "lung-ct"]),
    (["both lungs in a CT slice"], ["lung-ct"]),
    (["lung fields", "chest x-ray"], ["lung-xray"]),
    (["a hypoechoic mass in a breast ultrasound image"], ["breast-us"]),
    (["right lung"], []),  # one side: not the presets for both lungs
    (["liver"], []),
    ([""], []),
])
def test_matching_presets(prompt, expected):
    assert [p.name for p in matching_presets(prompt)] == expected


def test_describe_settings_in_one_line():
    from napari_medclipsam.core.models import default_sam_model
    from napari_medclipsam.core.presets import get_preset

    config = get_preset("lung-xray").apply()
    assert config.sam_model == "auto"  # presets let the device choose
    line = describe_settings(config, preset="both lungs (chest X-ray)",
                             where="'chest', slice z=2 of 8")
    assert line == ("'chest', slice z=2 of 8 · saliency layer 7, beta 0.1, 10 steps · KMeans "
                    f"mask, best 2 · one box per region · SAM {default_sam_model()} (auto) · "
                    "preset: both lungs (chest X-ray)")
    assert " · SAM vit_h (auto) · " in describe_settings(config, auto_sam="vit_h")
    assert " · SAM vit_b · " in describe_settings(PipelineConfig(sam_model="vit_b"))
    assert describe_settings(PipelineConfig()).endswith("custom settings")


# --------------------------------------------------------------------------- saving
def _sha(path):
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_save_mask_nifti_with_the_scan_affine_and_label_map(tmp_path):
    import nibabel as nib

    affine = np.array([[-1.5, 0, 0, 90], [0, 1.5, 0, -120], [0, 0, 3.0, -40], [0, 0, 0, 1]])
    mask = np.zeros((8, 10), bool)
    mask[2:5, 3:7] = True
    label_map = np.zeros((4, 8, 10), np.int32)
    label_map[1, 2:5, 3:7] = 2
    written = save_mask(tmp_path / "out" / "tumor.nii.gz", mask, affine=affine,
                        label_map=label_map, label_names={0: "background", 2: "tumor"},
                        slice_index=1, spatial_shape=(4, 8, 10))
    assert [p.name for p in written] == ["tumor.nii.gz", "tumor_label_map.nii.gz",
                                         "tumor_label_map.json"]
    img = nib.load(written[0])
    np.testing.assert_allclose(img.affine, affine)
    data = np.asarray(img.dataobj).T  # stored (X, Y, Z)
    assert data.shape == (4, 8, 10) and data.dtype == np.uint8
    assert (data[1] == mask).all() and not data[[0, 2, 3]].any()
    labels = nib.load(written[1])
    np.testing.assert_allclose(labels.affine, affine)
    np.testing.assert_array_equal(np.asarray(labels.dataobj).T, label_map)
    assert json.loads(written[2].read_text()) == {"labels": {"background": 0, "tumor": 2}}
    assert not list((tmp_path / "out").glob(".*"))  # no temporary file left


def test_save_mask_png_and_refusals(tmp_path):
    import imageio.v3 as iio

    mask = np.zeros((8, 10), bool)
    mask[1:3, 1:4] = True
    [png] = save_mask(tmp_path / "m.png", mask)
    np.testing.assert_array_equal(iio.imread(png), mask.astype(np.uint8) * 255)
    with pytest.raises(InputError, match="nii.gz"):
        save_mask(tmp_path / "m.tif", mask)
    with pytest.raises(InputError, match="PNG"):
        save_mask(tmp_path / "v.png", np.zeros((3, 8, 10)))
    source = tmp_path / "scan.nii.gz"
    source.write_bytes(b"not really a scan")
    before = _sha(source)
    with pytest.raises(InputError, match="source image"):
        save_mask(tmp_path / "scan.nii.gz", mask, source_path=source)
    with pytest.raises(InputError, match="source image"):  # the label map's name too
        save_mask(tmp_path / "x.nii.gz", mask,
                  label_map=np.zeros((8, 10), int),
                  source_path=tmp_path / "x_label_map.nii.gz")
    assert _sha(source) == before and not (tmp_path / "x.nii.gz").exists()
    assert label_map_path("a.b.nii.gz").name == "a.b_label_map.nii.gz"
