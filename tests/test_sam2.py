"""Sam2Session: SamSession's interface over a tiny SAM 2.1 built by sam2's own builders.

Agreement with the ``sam2`` package's ``SAM2ImagePredictor`` called directly, the embedding
cache (encoder runs, eviction, image keys), errors, and bf16 encoding.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sam2")

from sam2.sam2_image_predictor import SAM2ImagePredictor  # noqa: E402
from test_sam import BAD_IMAGES, BAD_PROMPTS, BOX_A, BOX_B, random_image  # noqa: E402
from tiny_sam2 import build_tiny_sam2  # noqa: E402

from napari_medclipsam.core.errors import InputError  # noqa: E402
from napari_medclipsam.core.sam import Sam2Session  # noqa: E402

POINTS = [[12.0, 20.0], [60.0, 30.0]]


@pytest.fixture(scope="module")
def model():
    return build_tiny_sam2()


@pytest.fixture
def encoder_counter(model):
    """Counts the image encoder's forward passes independently of the session's counter."""
    calls = []
    handle = model.image_encoder.register_forward_hook(lambda module, args, out: calls.append(1))
    yield calls
    handle.remove()


def reference(model, image):
    """sam2's own predictor on ``image``. The released one assumes 1024x1024 inputs for its
    backbone feature sizes; they are set here for the tiny model's 256."""
    predictor = SAM2ImagePredictor(model)
    size = int(model.image_size)
    predictor._bb_feat_sizes = [(size // 4, size // 4), (size // 8, size // 8),
                                (size // 16, size // 16)]
    predictor.set_image(image)
    return predictor


def best_logits(predictor, **kwargs):
    logits, scores, _ = predictor.predict(return_logits=True, **kwargs)
    return logits[int(np.argmax(scores))]


def dice(a, b):
    return 2 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


CASES = [
    ({"box": np.array(BOX_A)}, {"boxes": BOX_A}),
    ({"box": np.array(BOX_B)}, {"boxes": [BOX_B]}),
    ({"point_coords": np.array(POINTS), "point_labels": np.array([1, 0])},
     {"points": POINTS, "point_labels": [1, 0]}),
    ({"point_coords": np.array(POINTS[:1]), "point_labels": np.array([1])},
     {"points": POINTS[:1], "point_labels": [1]}),
    ({"box": np.array(BOX_B), "point_coords": np.array(POINTS),
      "point_labels": np.array([1, 0])},
     {"boxes": [BOX_B], "points": POINTS, "point_labels": [1, 0]}),
]


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("multimask", [False, True])
def test_logits_match_sam2_image_predictor(model, multimask, fast):
    """Both decoders (our rearranged one, the default on a CPU, and sam2's own) give
    ``SAM2ImagePredictor.predict``'s logits to 1e-5."""
    image = random_image(0)
    session = Sam2Session(model, "tiny", fast=fast)
    assert session.fast is fast
    assert Sam2Session(model, "tiny").fast  # the default on the CPU
    session.set_image(image)
    predictor = reference(model, image)
    masks = []
    for theirs, ours in CASES:
        expected = best_logits(predictor, multimask_output=multimask, **theirs)
        got = session.predict(multimask_output=multimask, return_logits=True, **ours)
        assert got.shape == (50, 80) and got.dtype == np.float32
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
        mask = session.predict(multimask_output=multimask, **ours)
        assert mask.dtype == bool
        np.testing.assert_array_equal(mask, got > 0)
        assert 0.005 < mask.mean() < 0.995  # neither empty nor full: a real comparison
        masks.append(mask)
    # The prompts reach the decoder: different prompts, different masks.
    assert not np.array_equal(masks[0], masks[1])
    assert not np.array_equal(masks[1], masks[4])


@pytest.mark.parametrize("threshold", [0.0, 1.01])
def test_fast_decoder_follows_the_stability_fallback(model, monkeypatch, threshold):
    """For a single mask sam2 falls back to the best multimask output when the single mask's
    stability score is below the threshold: always (1.01), never (0.0). The fast decoder
    follows both branches, batched groups included, and they give different masks."""
    image = random_image(10)
    predictor = reference(model, image)
    results = {}
    for thresh in (0.0, 1.01):
        monkeypatch.setattr(model.sam_mask_decoder, "dynamic_multimask_stability_thresh", thresh)
        session = Sam2Session(model, "tiny")
        session.set_image(image)
        for theirs, ours in CASES:
            expected = best_logits(predictor, multimask_output=False, **theirs)
            got = session.predict(return_logits=True, **ours)
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
            results.setdefault(thresh, []).append(got)
        both = session.predict(boxes=[BOX_A, BOX_B], return_logits=True)
        expected = np.maximum(best_logits(predictor, multimask_output=False, box=np.array(BOX_A)),
                              best_logits(predictor, multimask_output=False, box=np.array(BOX_B)))
        np.testing.assert_allclose(both, expected, rtol=0, atol=1e-5)
    pairs = zip(results[0.0], results[1.01], strict=True)
    assert any(np.abs(a - b).max() > 1e-3 for a, b in pairs)


def test_fast_decoder_only_for_sam2_own_decoder(model, monkeypatch):
    from sam2.modeling.sam.mask_decoder import MaskDecoder

    class CustomDecoder(MaskDecoder):  # e.g. a fork that changes predict_masks
        pass

    monkeypatch.setattr(model.sam_mask_decoder, "__class__", CustomDecoder)
    session = Sam2Session(model, "tiny")
    assert not session.fast  # falls back to sam2's predictor
    session.set_image(random_image(11))
    assert session.predict(boxes=[BOX_A]).shape == (50, 80)
    with pytest.raises(ValueError, match="fast=False"):
        Sam2Session(model, "tiny", fast=True)


def test_union_of_boxes_is_the_max_of_single_box_logits(model):
    session = Sam2Session(model, "tiny")
    session.set_image(random_image(1))
    a = session.predict(boxes=[BOX_A], return_logits=True)
    b = session.predict(boxes=[BOX_B], return_logits=True)
    both = session.predict(boxes=[BOX_A, BOX_B], return_logits=True)
    np.testing.assert_allclose(both, np.maximum(a, b), rtol=0, atol=1e-6)
    union = session.predict(boxes=[BOX_A, BOX_B])
    np.testing.assert_array_equal(union, (a > 0) | (b > 0))
    assert union.sum() > max((a > 0).sum(), (b > 0).sum())  # not one of them alone


def test_points_owned_by_boxes(model):
    """point_box assigns each point to its box; -1 shares a point with every box."""
    session = Sam2Session(model, "tiny")
    session.set_image(random_image(2))
    points, labels = [[10, 10], [50, 20], [60, 30]], [1, 1, 0]
    own = session.predict(boxes=[BOX_A, BOX_B], points=points, point_labels=labels,
                          point_box=[0, 1, -1], return_logits=True)
    expected = np.maximum(
        session.predict(boxes=BOX_A, points=[[10, 10], [60, 30]], point_labels=[1, 0],
                        return_logits=True),
        session.predict(boxes=BOX_B, points=[[50, 20], [60, 30]], point_labels=[1, 0],
                        return_logits=True))
    np.testing.assert_allclose(own, expected, rtol=0, atol=1e-5)
    mixed = session.predict(boxes=[BOX_A, BOX_B], points=points, point_labels=labels,
                            point_box=[0, 0, 1], return_logits=True)  # 2 and 1 points
    expected = np.maximum(
        session.predict(boxes=BOX_A, points=[[10, 10], [50, 20]], point_labels=[1, 1],
                        return_logits=True),
        session.predict(boxes=BOX_B, points=[[60, 30]], point_labels=[0], return_logits=True))
    np.testing.assert_allclose(mixed, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("shape", [(50, 80, 3), (80, 50, 3), (33, 33, 3), (300, 260, 3)])
def test_mask_has_the_input_size(model, shape):
    session = Sam2Session(model, "tiny")
    session.set_image(random_image(3, shape))
    h, w = shape[:2]
    for mask in (session.predict(boxes=[[2, 3, w - 5, h - 4]]),
                 session.predict(points=[[w / 2, h / 2]], point_labels=[1],
                                 multimask_output=True)):
        assert mask.shape == (h, w) and mask.dtype == bool


def test_encoder_runs_once_per_image(model, encoder_counter):
    session = Sam2Session(model, "tiny")
    image = random_image(4)
    key = session.set_image(image)
    assert session.set_image(image.copy()) == key
    assert len(encoder_counter) == 1 and session.encoder_calls == 1
    key2 = session.set_image(random_image(5))
    assert key2 != key and len(encoder_counter) == 2 and session.encoder_calls == 2
    for i in range(3):
        session.predict(boxes=[[i, i, 40 + i, 30 + i]])
        session.predict(points=[[10 + i, 10]], point_labels=[1], multimask_output=True)
        session.predict(boxes=[BOX_A], image_key=key)
    assert len(encoder_counter) == 2 and session.encoder_calls == 2
    assert session.set_image(image) == key  # back to the first image: from the cache
    assert len(encoder_counter) == 2


def test_key_names_model_and_image(model):
    image = random_image(6)
    key = Sam2Session(model, "model-a").set_image(image)
    assert key.startswith("model-a:")
    assert Sam2Session(model, "model-b").key_for(image) != key
    flat = np.ascontiguousarray(image).reshape(80, 50, 3)  # same bytes, other shape
    assert Sam2Session(model, "model-a").key_for(flat) != key


def test_image_key_and_lru_eviction(model, encoder_counter):
    session = Sam2Session(model, "tiny", cache_size=2)
    images = [random_image(10 + i) for i in range(3)]
    key0 = session.set_image(images[0])
    logits0 = session.predict(boxes=[BOX_A], return_logits=True)
    key1 = session.set_image(images[1])
    assert session.current_key == key1
    # Another cached image's key answers for that image and leaves the current one.
    np.testing.assert_array_equal(
        session.predict(boxes=[BOX_A], image_key=key0, return_logits=True), logits0)
    assert session.current_key == key1
    assert not np.array_equal(session.predict(boxes=[BOX_A], return_logits=True), logits0)
    assert len(encoder_counter) == 2
    session.set_image(images[2])  # evicts key0, the least recently used
    assert session.cached_keys() == [key1, session.current_key]
    assert not session.is_cached(key0) and session.is_cached(key1)
    with pytest.raises(KeyError, match="not in the embedding cache"):
        session.predict(boxes=[BOX_A], image_key=key0)
    session.set_image(images[1])  # cached: no encoder run, becomes the most recent
    assert len(encoder_counter) == 3
    session.set_image(images[0])  # evicted: the encoder runs again, evicting images[2]
    assert len(encoder_counter) == 4 and session.encoder_calls == 4
    assert session.cached_keys() == [key1, key0]
    np.testing.assert_array_equal(session.predict(boxes=[BOX_A], return_logits=True), logits0)
    session.clear_cache()
    assert session.cached_keys() == [] and session.current_key is None
    assert session.predictor is None
    session.set_image(images[0])
    assert len(encoder_counter) == 5


@pytest.mark.parametrize(("image", "match"), BAD_IMAGES)
def test_bad_images(model, image, match):
    with pytest.raises(InputError, match=match):
        Sam2Session(model, "tiny").set_image(image)


@pytest.mark.parametrize(("kwargs", "match"), BAD_PROMPTS)
def test_bad_prompts(model, kwargs, match):
    session = Sam2Session(model, "tiny")
    session.set_image(random_image(7))
    with pytest.raises(InputError, match=match):
        session.predict(**kwargs)


def test_predict_before_set_image_and_bad_cache_size(model):
    with pytest.raises(RuntimeError, match="set_image"):
        Sam2Session(model, "tiny").predict(boxes=[BOX_A])
    with pytest.raises(ValueError, match="cache_size"):
        Sam2Session(model, "tiny", cache_size=0)


def test_bf16_session_caches_float32_and_agrees_with_fp32(model):
    image = random_image(8)
    fp32 = Sam2Session(model, "tiny")
    fp32.set_image(image)
    bf16 = Sam2Session(model, "tiny", precision="bf16")
    bf16.set_image(image)
    features = bf16.predictor._features
    assert features["image_embed"].dtype == torch.float32
    assert [f.dtype for f in features["high_res_feats"]] == [torch.float32] * 2
    # The encoder did run in bf16: the cached embedding differs from fp32's, a little.
    difference = (features["image_embed"] - fp32.predictor._features["image_embed"]).abs()
    assert 0 < difference.max() < 0.1
    for prompts in ({"boxes": [BOX_A]}, {"boxes": [BOX_A, BOX_B]},
                    {"points": POINTS, "point_labels": [1, 0]}):
        a, b = fp32.predict(**prompts), bf16.predict(**prompts)
        assert a.any() and dice(a, b) > 0.95


def test_any_input_size_with_the_same_weights(model):
    """The 256 model's weights load into the same architecture built for 128 inputs, and a
    session on it answers at the image's size (feature sizes follow image_size)."""
    from tiny_sam2 import TINY_SAM2_OVERRIDES

    from napari_medclipsam.core.models import build_sam2_model

    small = build_sam2_model("sam2_t", (*TINY_SAM2_OVERRIDES, "++model.image_size=128"))
    small.load_state_dict(model.state_dict(), strict=True)
    small.eval()
    assert small.image_size == 128
    session = Sam2Session(small, "tiny@128")
    session.set_image(random_image(9))
    mask = session.predict(boxes=[BOX_A, BOX_B])
    assert mask.shape == (50, 80) and mask.any() and not mask.all()
