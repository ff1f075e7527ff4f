"""The zero-shot chain as one call, on tiny models (no network, no real weights)."""

import dataclasses

import numpy as np
import pytest

from napari_medclipsam.core.config import CoarseMaskConfig
from napari_medclipsam.core.errors import CancelledError
from napari_medclipsam.core.models import clear_model_cache
from napari_medclipsam.core.postprocess import keep_largest_components


@pytest.fixture
def pipeline(tiny_clip_dir, tiny_sam_checkpoint):
    from tiny_pipeline import build_tiny_pipeline

    clear_model_cache()
    yield build_tiny_pipeline(tiny_clip_dir, tiny_sam_checkpoint, steps=3)
    clear_model_cache()


def _image(h=48, w=64, seed=0):
    rng = np.random.default_rng(seed)
    img = (40 + 10 * rng.standard_normal((h, w))).clip(0, 255).astype(np.uint8)
    img[10:25, 20:40] = 220
    return img


def test_segment_returns_every_stage_at_input_size(pipeline):
    stages = []
    result = pipeline.segment(_image(), "a disk", progress=lambda s, f: stages.append((s, f)))
    assert result.saliency.shape == (48, 64) and result.saliency.dtype == np.float32
    assert result.coarse.mask.shape == (48, 64) and result.mask.shape == (48, 64)
    assert result.mask.dtype == bool
    assert result.found and len(result.coarse.components) == 1  # top_k=1 by default
    assert len(result.prompts.boxes) == 1
    fractions = [f for _, f in stages]
    assert fractions == sorted(fractions) and stages[-1] == ("done", 1.0)


def test_sam_receives_the_coarse_box(pipeline):
    """The chain's mask is exactly SAM's answer to the coarse component's box."""
    from napari_medclipsam.core.io import to_rgb_uint8

    image = _image()
    result = pipeline.segment(image, "a disk")
    x0, y0, x1, y1 = result.prompts.boxes[0]
    ys, xs = np.nonzero(result.coarse.labels == 1)
    assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max(), ys.max())
    session = pipeline.session
    session.set_image(to_rgb_uint8(image))
    direct = session.predict(boxes=result.prompts.boxes)
    assert (keep_largest_components(direct, 1) == result.mask).all()


def test_encoder_runs_once_per_image(pipeline):
    image = _image()
    pipeline.segment(image, "a disk")
    pipeline.segment(image, "a square")
    pipeline.segment(image, ["a disk", "a round shape"])
    assert pipeline.session.encoder_calls == 1
    pipeline.segment(_image(seed=1), "a disk")
    assert pipeline.session.encoder_calls == 2


def test_nothing_found_skips_sam(pipeline):
    pipeline.config = dataclasses.replace(pipeline.config,
                                          coarse=CoarseMaskConfig(eta_c=1.0))
    result = pipeline.segment(_image(), "a disk")
    assert not result.found and "Nothing found" in result.message
    assert not result.mask.any() and result.prompts.empty
    assert pipeline._session is None or pipeline.session.encoder_calls == 0


def test_cancel_stops_during_saliency(pipeline):
    calls = []

    def should_stop():
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(CancelledError):
        pipeline.segment(_image(), "a disk", should_stop=should_stop)
    assert len(calls) == 3


def test_grayscale_16bit_and_rgb_inputs(pipeline):
    gray16 = _image().astype(np.uint16) * 250
    rgb = np.dstack([_image()] * 3)
    a = pipeline.segment(gray16, "a disk")
    b = pipeline.segment(rgb, "a disk")
    assert a.mask.shape == b.mask.shape == (48, 64)


def test_volume_slice_by_slice(pipeline):
    vol = np.stack([_image(seed=z) for z in range(3)]).astype(np.int16) * 10
    seen, finished = [], []
    result = pipeline.segment_volume(vol, "a disk", slices=[0, 2],
                                     progress=lambda s, f: seen.append((s, f)),
                                     on_slice=lambda z, r: finished.append((z, r.mask.copy())))
    assert result.mask.shape == vol.shape and result.saliency.shape == vol.shape
    stages = [s for s, _ in seen]
    assert stages[0] == "slice 1/2 (z=0): saliency step 0/3"
    assert "slice 2/2 (z=2): saliency step 3/3" in stages
    assert stages[-1] == "slice 2/2 (z=2): done"
    fractions = [f for _, f in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert [z for z, _ in finished] == [0, 2] == result.completed
    assert all((m == result.mask[z]).all() for z, m in finished)
    assert not result.saliency[1].any()  # slice 1 was not requested
    assert set(result.found_slices) <= {0, 2}
    with pytest.raises(ValueError, match="out of range"):
        pipeline.segment_volume(vol, "a disk", slices=[5])


def test_volume_cancel_keeps_finished_slices(pipeline):
    from napari_medclipsam.core.errors import CancelledError

    vol = np.stack([_image(seed=z) for z in range(3)]).astype(np.int16) * 10
    done = []
    with pytest.raises(CancelledError) as info:
        pipeline.segment_volume(vol, "a disk", on_slice=lambda z, r: done.append(z),
                                should_stop=lambda: len(done) >= 2)
    assert done == [0, 1] == info.value.partial.completed
    partial = info.value.partial
    assert partial.saliency[:2].any() and not partial.saliency[2].any()


def test_stage_names_of_one_image(pipeline):
    seen = []
    pipeline.session.clear_cache()
    pipeline.segment(_image(), "a disk", progress=lambda s, f: seen.append(s))
    assert seen[0] == "saliency step 0/3" and "saliency step 3/3" in seen
    assert "coarse mask" in seen and seen[-1] == "done"
    if "SAM mask" in seen:  # something was found: SAM encoded the new image once
        assert seen.count("encoding image (SAM)") == 1


@pytest.mark.parametrize("value", [0, 255])
def test_constant_image_is_nothing_found_without_running_models(pipeline, value):
    calls = []
    pipeline.saliency = lambda *a, **k: calls.append(a)
    result = pipeline.segment(np.full((40, 40), value, np.uint8), "a disk")
    assert not result.found and not result.mask.any() and not calls
    assert "one intensity everywhere" in result.message
