"""SamSession: embedding cache, prompt grouping, agreement with segment-anything's predictor."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("segment_anything")

from segment_anything import SamPredictor  # noqa: E402
from tiny_sam import build_tiny_sam, save_tiny_sam_checkpoint  # noqa: E402

from napari_medclipsam.core.sam import SamSession  # noqa: E402

BOX_A = [5.0, 5.0, 30.0, 30.0]
BOX_B = [40.0, 10.0, 75.0, 45.0]


@pytest.fixture(scope="module")
def sam():
    return build_tiny_sam()


@pytest.fixture
def encoder_counter(sam):
    """Counts the image encoder's forward passes independently of SamSession's counter."""
    calls = []
    handle = sam.image_encoder.register_forward_hook(lambda module, args, out: calls.append(1))
    yield calls
    handle.remove()


def random_image(seed: int, shape=(50, 80, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_import_is_light():
    code = ("import sys, napari_medclipsam.core.sam; "
            "heavy = {'torch', 'segment_anything'} & set(sys.modules); "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_encoder_runs_once_per_image(sam, encoder_counter):
    session = SamSession(sam, "tiny")
    image = random_image(0)
    key = session.set_image(image)
    assert session.set_image(image.copy()) == key
    assert len(encoder_counter) == 1 and session.encoder_calls == 1
    key2 = session.set_image(random_image(1))
    assert key2 != key
    assert len(encoder_counter) == 2 and session.encoder_calls == 2
    for i in range(5):
        session.predict(boxes=[[i, i, 40 + i, 30 + i]])
        session.predict(points=[[10 + i, 10]], point_labels=[1], multimask_output=True)
        session.predict(boxes=[BOX_A], image_key=key)
    assert len(encoder_counter) == 2 and session.encoder_calls == 2
    # Going back to the first image restores it from the cache.
    assert session.set_image(image) == key
    assert len(encoder_counter) == 2


def test_key_names_model_and_image(sam):
    image = random_image(0)
    key_a = SamSession(sam, "model-a").set_image(image)
    assert key_a.startswith("model-a:")
    assert SamSession(sam, "model-b").key_for(image) != key_a
    # Same bytes, other shape: another key.
    flat = np.ascontiguousarray(image).reshape(80, 50, 3)
    assert SamSession(sam, "model-a").key_for(flat) != key_a


@pytest.mark.parametrize("shape", [(50, 80, 3), (80, 50, 3), (33, 33, 3), (64, 64, 3)])
def test_mask_has_the_input_size(sam, shape):
    session = SamSession(sam, "tiny")
    session.set_image(random_image(2, shape))
    h, w = shape[:2]
    for mask in (session.predict(boxes=[[2, 3, w - 5, h - 4]]),
                 session.predict(points=[[w / 2, h / 2]], point_labels=[1],
                                 multimask_output=True)):
        assert mask.shape == (h, w)
        assert mask.dtype == bool


PREDICTOR_CASES = [
    {"box": np.array(BOX_A)},
    {"box": np.array(BOX_B)},
    {"box": np.array([0.0, 0.0, 79.0, 49.0])},
    {"box": np.array(BOX_B), "point_coords": np.array([[12.0, 20.0], [60.0, 30.0]]),
     "point_labels": np.array([1, 0])},
    {"point_coords": np.array([[12.0, 20.0], [60.0, 30.0]]), "point_labels": np.array([1, 0])},
    {"point_coords": np.array([[12.0, 20.0]]), "point_labels": np.array([1])},
]


def _session_kwargs(case: dict) -> dict:
    return {"boxes": case.get("box"), "points": case.get("point_coords"),
            "point_labels": case.get("point_labels")}


@pytest.mark.parametrize("multimask", [False, True])
def test_stock_decoder_matches_segment_anything_predictor(sam, multimask):
    """The boxes and points reach the decoder as SamPredictor sends them: identical masks."""
    image = random_image(3)
    session = SamSession(sam, "tiny", fast=False)
    session.set_image(image)
    predictor = SamPredictor(sam)
    predictor.set_image(image)
    for case in PREDICTOR_CASES:
        masks, iou, _ = predictor.predict(**case, multimask_output=multimask)
        got = session.predict(**_session_kwargs(case), multimask_output=multimask)
        np.testing.assert_array_equal(got, masks[int(np.argmax(iou))])
        logits, iou, _ = predictor.predict(**case, multimask_output=multimask,
                                           return_logits=True)
        got = session.predict(**_session_kwargs(case), multimask_output=multimask,
                              return_logits=True)
        np.testing.assert_array_equal(got, logits[int(np.argmax(iou))])
    # The prompts matter: moving the box changes the mask.
    assert not np.array_equal(session.predict(boxes=[BOX_A]), session.predict(boxes=[BOX_B]))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("multimask", [False, True])
def test_fast_decoder_matches_segment_anything_predictor(seed, multimask):
    """The rearranged decoder computes SAM's logits up to float rounding.

    Tolerance: logits within 1e-5 of SamPredictor's (they are O(0.1) here); the masks may
    differ only at pixels whose reference logit is within that tolerance of the threshold.
    """
    sam = build_tiny_sam(seed=seed)
    image = random_image(3 + seed)
    session = SamSession(sam, "tiny")
    assert session.fast  # on by default on the CPU for segment-anything's decoder
    session.set_image(image)
    predictor = SamPredictor(sam)
    predictor.set_image(image)
    for case in PREDICTOR_CASES:
        logits, iou, _ = predictor.predict(**case, multimask_output=multimask,
                                           return_logits=True)
        expected = logits[int(np.argmax(iou))]
        got = session.predict(**_session_kwargs(case), multimask_output=multimask,
                              return_logits=True)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
        mask = session.predict(**_session_kwargs(case), multimask_output=multimask)
        differ = mask != (expected > 0)
        assert np.all(np.abs(expected[differ]) < 1e-5)
        assert 0.02 < mask.mean() < 0.98  # a real test: neither empty nor full


def test_union_of_boxes(sam):
    session = SamSession(sam, "tiny")
    session.set_image(random_image(4))
    mask_a = session.predict(boxes=[BOX_A])
    mask_b = session.predict(boxes=[BOX_B])
    both = session.predict(boxes=[BOX_A, BOX_B])
    np.testing.assert_array_equal(both, mask_a | mask_b)
    assert both.sum() > max(mask_a.sum(), mask_b.sum())  # not trivially one of them
    logits = session.predict(boxes=[BOX_A, BOX_B], return_logits=True)
    assert logits.dtype == np.float32
    np.testing.assert_array_equal(logits > 0, both)


@pytest.mark.parametrize("fast", [True, False])
def test_batched_path_equals_loop(sam, fast):
    """Boxes go through the decoder in one call; the per-group loop gives the same mask."""
    session = SamSession(sam, "tiny", fast=fast)
    session.set_image(random_image(5))
    boxes = np.array([BOX_A, BOX_B, [20.0, 15.0, 60.0, 40.0], [0.0, 0.0, 10.0, 49.0]])
    shared = {"points": [[25.0, 25.0], [70.0, 5.0]], "point_labels": [1, 0]}
    calls = []  # batch size of each decoder call, seen by the prompt encoder
    handle = sam.prompt_encoder.register_forward_hook(
        lambda module, args, out: calls.append(out[0].shape[0]))
    try:
        for extra in ({}, shared):
            for multimask in (False, True):
                calls.clear()
                batched = session.predict(boxes=boxes, multimask_output=multimask, **extra)
                assert calls == [4]  # one decoder call for the 4 groups
                loop = np.zeros_like(batched)
                for box in boxes:
                    loop |= session.predict(boxes=box[None], multimask_output=multimask,
                                            **extra)
                np.testing.assert_array_equal(batched, loop)

        # Groups of equal point counts (2 and 2 here) are batched, each with its own points.
        points, point_labels = [[10, 10], [50, 20], [60, 30]], [1, 1, 0]
        calls.clear()
        own = session.predict(boxes=boxes[:2], points=points, point_labels=point_labels,
                              point_box=[0, 1, -1])
        assert calls == [2]
        expected = (session.predict(boxes=boxes[0], points=[[10, 10], [60, 30]],
                                    point_labels=[1, 0])
                    | session.predict(boxes=boxes[1], points=[[50, 20], [60, 30]],
                                      point_labels=[1, 0]))
        np.testing.assert_array_equal(own, expected)
        # Groups with different numbers of points are decoded one by one.
        calls.clear()
        mixed = session.predict(boxes=boxes[:2], points=points, point_labels=point_labels,
                                point_box=[0, 0, 1])
        assert calls == [1, 1]
        expected = (session.predict(boxes=boxes[0], points=[[10, 10], [50, 20]],
                                    point_labels=[1, 1])
                    | session.predict(boxes=boxes[1], points=[[60, 30]], point_labels=[0]))
        np.testing.assert_array_equal(mixed, expected)
    finally:
        handle.remove()


def test_image_key_and_lru_eviction(sam, encoder_counter):
    session = SamSession(sam, "tiny", cache_size=2)
    images = [random_image(10 + i) for i in range(3)]
    key0 = session.set_image(images[0])
    mask0 = session.predict(boxes=[BOX_A])
    key1 = session.set_image(images[1])
    assert session.current_key == key1
    # A cached key from another image answers for that image, and leaves the current one.
    np.testing.assert_array_equal(session.predict(boxes=[BOX_A], image_key=key0), mask0)
    assert session.current_key == key1
    assert not np.array_equal(session.predict(boxes=[BOX_A]), mask0)
    assert len(encoder_counter) == 2
    session.set_image(images[2])  # evicts key0, the least recently used
    assert session.cached_keys() == [key1, session.current_key]
    with pytest.raises(KeyError, match="not in the embedding cache"):
        session.predict(boxes=[BOX_A], image_key=key0)
    session.set_image(images[1])  # cached: no encoder run, becomes most recent
    assert len(encoder_counter) == 3
    session.set_image(images[0])  # was evicted: the encoder runs again
    assert len(encoder_counter) == 4 and session.encoder_calls == 4
    np.testing.assert_array_equal(session.predict(boxes=[BOX_A]), mask0)
    session.clear_cache()
    assert session.cached_keys() == [] and session.current_key is None
    session.set_image(images[0])
    assert len(encoder_counter) == 5


#: Images a session refuses, with the words of its error (shared with test_sam2).
BAD_IMAGES = [
    (np.zeros((20, 30, 3), np.float32), "uint8"),
    (np.zeros((20, 30, 2), np.uint8), r"HxWx3"),
    (np.zeros((20, 30), np.uint8), r"HxWx3"),
    (np.zeros((4, 20, 30, 3), np.uint8), r"HxWx3"),
]


@pytest.mark.parametrize(("image", "match"), BAD_IMAGES)
def test_bad_images(sam, image, match):
    with pytest.raises(ValueError, match=match):
        SamSession(sam, "tiny").set_image(image)


#: Prompts a session refuses, with the words of its error (shared with test_sam2).
BAD_PROMPTS = [
    ({}, "No prompts"),
    ({"boxes": np.zeros((0, 4))}, "No prompts"),
    ({"boxes": [[1, 2, 3]]}, r"boxes must have shape \(N, 4\)"),
    ({"boxes": np.zeros((2, 2, 4))}, r"boxes must have shape \(N, 4\)"),
    ({"boxes": [[30, 5, 10, 20]]}, "x0 <= x1"),
    ({"boxes": [[0, 0, np.nan, 10]]}, "NaN"),
    ({"points": [[1, 2, 3]], "point_labels": [1]}, r"points must have shape \(M, 2\)"),
    ({"points": [[1, 2]]}, "point_labels are required"),
    ({"points": [[1, 2]], "point_labels": [1, 0]}, r"point_labels must have shape \(1,\)"),
    ({"points": [[1, 2]], "point_labels": [2]}, "1 .positive. or 0"),
    ({"boxes": [BOX_A], "points": [[1, 2]], "point_labels": [1], "point_box": [1]},
     "box index"),
    ({"boxes": [BOX_A], "points": [[1, 2]], "point_labels": [1], "point_box": [0.5]},
     "integers"),
]


@pytest.mark.parametrize(("kwargs", "match"), BAD_PROMPTS)
def test_bad_prompts(sam, kwargs, match):
    session = SamSession(sam, "tiny")
    session.set_image(random_image(6))
    with pytest.raises(ValueError, match=match):
        session.predict(**kwargs)


def test_predict_before_set_image(sam):
    with pytest.raises(RuntimeError, match="set_image"):
        SamSession(sam, "tiny").predict(boxes=[BOX_A])


def test_tiny_checkpoint_round_trip(tmp_path):
    path = save_tiny_sam_checkpoint(tmp_path / "tiny.pth", seed=3)
    state = torch.load(path, map_location="cpu", weights_only=True)
    fresh = build_tiny_sam(seed=99)
    fresh.load_state_dict(state, strict=True)
    reference = build_tiny_sam(seed=3)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], tensor), name


def test_fast_decoder_only_for_segment_anything_decoders():
    from segment_anything.modeling import MaskDecoder

    class CustomDecoder(MaskDecoder):  # e.g. a fork that changes predict_masks
        pass

    sam = build_tiny_sam()
    sam.mask_decoder.__class__ = CustomDecoder
    session = SamSession(sam, "tiny")
    assert not session.fast  # falls back to calling the decoder itself
    session.set_image(random_image(7))
    assert session.predict(boxes=[BOX_A]).shape == (50, 80)
    with pytest.raises(ValueError, match="fast=False"):
        SamSession(sam, "tiny", fast=True)


def test_fast_toggle_keeps_the_cache(sam, encoder_counter):
    session = SamSession(sam, "tiny")
    session.set_image(random_image(8))
    fast = session.predict(boxes=[BOX_A, BOX_B], return_logits=True)
    session.fast = False
    stock = session.predict(boxes=[BOX_A, BOX_B], return_logits=True)
    assert len(encoder_counter) == 1
    np.testing.assert_allclose(fast, stock, rtol=0, atol=1e-5)


def test_tiny_checkpoint_loads_through_load_sam(tmp_path):
    from napari_medclipsam.core.models import clear_model_cache, load_sam

    path = save_tiny_sam_checkpoint(tmp_path / "tiny_sam.pth", seed=5)
    bundle = load_sam("vit_b", str(path), "cpu", builder=build_tiny_sam)
    try:
        session = SamSession(bundle.model, bundle.model_id)
        session.set_image(random_image(9))
        expected = SamSession(build_tiny_sam(seed=5), "reference")
        expected.set_image(random_image(9))
        np.testing.assert_array_equal(session.predict(boxes=[BOX_A]),
                                      expected.predict(boxes=[BOX_A]))
    finally:
        clear_model_cache()
