"""M2IB saliency: equal to the straightforward implementation, and right on a toy CLIP."""

from __future__ import annotations

import numpy as np
import pytest

from napari_medclipsam.core.config import CoarseMaskConfig, SaliencyConfig
from napari_medclipsam.core.errors import CancelledError, InputError

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def tiny_clip(tiny_clip_dir):
    from napari_medclipsam.core.models import load_clip

    return load_clip(f"local-dir:{tiny_clip_dir}", "cpu")


@pytest.fixture(scope="module")
def toy_clip(toy_clip_dir):
    from napari_medclipsam.core.models import load_clip

    return load_clip(f"local-dir:{toy_clip_dir}", "cpu")


def _image(seed=0, shape=(50, 70)):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (*shape, 3), dtype=np.uint8)


# --------------------------------------------------------------------------- the algorithm


@pytest.mark.parametrize("layer", [0, 2, 3])
def test_fast_path_equals_reference_implementation(tiny_clip, layer):
    from napari_medclipsam.core.saliency import m2ib_saliency, m2ib_saliency_reference

    cfg = SaliencyConfig(layer=layer, steps=4, batch_size=3, beta=0.5, seed=3)
    image = _image(1)
    fast = m2ib_saliency(tiny_clip, image, "breast tumor", cfg)
    ref = m2ib_saliency_reference(tiny_clip, image, "breast tumor", cfg)
    assert fast.shape == ref.shape == image.shape[:2]
    assert fast.dtype == np.float32
    assert np.abs(fast - ref).max() < 1e-5
    # Min-max normalised at the model's input size, then resized to the image's.
    assert fast.min() >= 0.0 and fast.max() <= 1.0
    assert fast.min() < 0.1 and fast.max() > 0.9
    # The map is not flat: the optimisation did something.
    assert fast.std() > 0.01


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("readout", ["last_forward", "final"])
def test_fast_path_equals_reference_for_both_readouts(tiny_clip, readout, steps):
    """The fast path skips the last step's suffix pass under ``last_forward`` (its update
    is never read): still the reference's map, one step included."""
    from napari_medclipsam.core.saliency import m2ib_saliency, m2ib_saliency_reference

    cfg = SaliencyConfig(layer=1, steps=steps, batch_size=2, beta=1.0, seed=4, readout=readout)
    image = _image(7)
    fast = m2ib_saliency(tiny_clip, image, ["breast tumor", "a mass"], cfg)
    ref = m2ib_saliency_reference(tiny_clip, image, ["breast tumor", "a mass"], cfg)
    assert np.abs(fast - ref).max() < 1e-5
    assert fast.std() > 0.01


def test_readout_pins_the_authors_one_update_earlier(tiny_clip):
    """The default readout (the authors' code, IBA) is the capacity of the last forward
    pass, before the final update: the default map of k steps is the ``final`` map of
    k - 1 steps (same seed, same noise draws), and not the ``final`` map of k steps."""
    import dataclasses

    from napari_medclipsam.core.saliency import m2ib_saliency, m2ib_saliency_reference

    assert SaliencyConfig().readout == "last_forward"
    image = _image(8)
    k = 4
    base = SaliencyConfig(layer=2, steps=k, batch_size=3, beta=1.0, seed=9)
    default_k = m2ib_saliency(tiny_clip, image, "tumor", base)
    final_k_minus_1 = m2ib_saliency(tiny_clip, image, "tumor",
                                    dataclasses.replace(base, steps=k - 1, readout="final"))
    final_k = m2ib_saliency(tiny_clip, image, "tumor", dataclasses.replace(base, readout="final"))
    np.testing.assert_allclose(default_k, final_k_minus_1, rtol=0, atol=1e-6)
    assert np.abs(default_k - final_k).max() > 1e-3
    # The straightforward implementation reads the same way.
    ref_k = m2ib_saliency_reference(tiny_clip, image, "tumor", base)
    np.testing.assert_allclose(ref_k, final_k_minus_1, rtol=0, atol=1e-5)


def test_readout_is_validated_and_old_configs_load():
    from napari_medclipsam.core.config import PipelineConfig

    with pytest.raises(ValueError, match="readout"):
        SaliencyConfig(readout="last")
    old = PipelineConfig().to_dict()
    del old["saliency"]["readout"]  # a run saved before the field existed
    assert PipelineConfig.from_dict(old).saliency.readout == "last_forward"
    cfg = PipelineConfig(saliency=SaliencyConfig(readout="final"))
    assert PipelineConfig.from_dict(cfg.to_dict()) == cfg


def test_ensemble_prompt_equals_reference_and_differs_from_single(tiny_clip):
    from napari_medclipsam.core.saliency import m2ib_saliency, m2ib_saliency_reference

    cfg = SaliencyConfig(layer=1, steps=3, batch_size=2)
    image = _image(2)
    prompts = ["breast tumor", "a round lesion", "ultrasound"]
    fast = m2ib_saliency(tiny_clip, image, prompts, cfg)
    assert np.abs(fast - m2ib_saliency_reference(tiny_clip, image, prompts, cfg)).max() < 1e-5
    single = m2ib_saliency(tiny_clip, image, prompts[0], cfg)
    assert np.abs(fast - single).max() > 1e-3


def test_seed_determines_the_map(tiny_clip):
    from napari_medclipsam.core.saliency import m2ib_saliency

    image = _image(3)
    a = m2ib_saliency(tiny_clip, image, "lungs", SaliencyConfig(layer=1, steps=3, seed=5))
    b = m2ib_saliency(tiny_clip, image, "lungs", SaliencyConfig(layer=1, steps=3, seed=5))
    c = m2ib_saliency(tiny_clip, image, "lungs", SaliencyConfig(layer=1, steps=3, seed=6))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-4


def test_precomputed_text_embedding_gives_the_same_map(tiny_clip):
    from napari_medclipsam.core.saliency import encode_text, m2ib_saliency

    cfg = SaliencyConfig(layer=2, steps=2)
    image = _image(4)
    t = encode_text(tiny_clip, "brain edema")
    np.testing.assert_array_equal(
        m2ib_saliency(tiny_clip, image, "brain edema", cfg),
        m2ib_saliency(tiny_clip, image, "ignored when an embedding is given", cfg,
                      text_embedding=t))


def test_no_parameter_gradients_and_model_untouched(tiny_clip):
    from napari_medclipsam.core.saliency import m2ib_saliency, m2ib_saliency_reference

    before = {k: v.clone() for k, v in tiny_clip.model.state_dict().items()}
    cfg = SaliencyConfig(layer=1, steps=2, batch_size=2)
    m2ib_saliency(tiny_clip, _image(5), "tumor", cfg)
    m2ib_saliency_reference(tiny_clip, _image(5), "tumor", cfg)
    for name, p in tiny_clip.model.named_parameters():
        assert p.grad is None, name
        assert not p.requires_grad, name
    for k, v in tiny_clip.model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_progress_and_cancel(tiny_clip):
    from napari_medclipsam.core.saliency import m2ib_saliency

    seen = []
    m2ib_saliency(tiny_clip, _image(6), "tumor", SaliencyConfig(layer=0, steps=4),
                  progress=lambda i, n: seen.append((i, n)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]

    calls = []

    def stop():
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(CancelledError):
        m2ib_saliency(tiny_clip, _image(6), "tumor", SaliencyConfig(layer=0, steps=10),
                      should_stop=stop)
    assert len(calls) == 3


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_vit_split_gives_the_image_embedding(tiny_clip, monkeypatch, pool):
    """prefix + suffix at every split point = the model's own encode_image, with the last
    block computed for the class token alone (pool "token", BiomedCLIP's) and in full
    otherwise (mean pooling reads every token)."""
    from napari_medclipsam.core.saliency import (
        _reads_class_token,
        prepare_image,
        vit_prefix,
        vit_suffix,
    )

    trunk = tiny_clip.model.visual.trunk
    monkeypatch.setattr(trunk, "global_pool", pool)
    assert _reads_class_token(trunk, trunk.blocks[-1]) is (pool == "token")
    x = prepare_image(tiny_clip, _image(12)).expand(3, -1, -1, -1)
    with torch.no_grad():
        expected = tiny_clip.model.encode_image(x)
        for layer in range(len(trunk.blocks)):
            got = vit_suffix(tiny_clip, vit_prefix(tiny_clip, x, layer), layer)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert expected.abs().max() > 1e-3  # not a trivially zero embedding


def test_explicit_attention_only_during_the_optimisation_and_restored(tiny_clip):
    """On a CPU the blocks after the bottleneck use timm's explicit attention while M2IB
    optimises (same maths: the map equals the reference's, which keeps the fused kernel,
    see above); every flag is as before afterwards, also after a cancel."""
    from napari_medclipsam.core.saliency import m2ib_saliency

    blocks = tiny_clip.model.visual.trunk.blocks
    before = [block.attn.fused_attn for block in blocks]
    assert all(before)  # timm's default where SDPA exists: a real switch to observe
    during = []
    m2ib_saliency(tiny_clip, _image(6), "tumor", SaliencyConfig(layer=1, steps=3),
                  progress=lambda i, n: during.append([b.attn.fused_attn for b in blocks]))
    assert during[0] == [True, True, False, False]
    assert [block.attn.fused_attn for block in blocks] == before
    with pytest.raises(CancelledError):
        m2ib_saliency(tiny_clip, _image(6), "tumor", SaliencyConfig(layer=1, steps=5),
                      progress=lambda i, n: None, should_stop=lambda: bool(during.pop()))
    assert [block.attn.fused_attn for block in blocks] == before


def test_bad_inputs_are_named(tiny_clip):
    from napari_medclipsam.core.saliency import m2ib_saliency

    with pytest.raises(InputError, match="layer must be between 0 and 3"):
        m2ib_saliency(tiny_clip, _image(), "tumor", SaliencyConfig(layer=4))
    with pytest.raises(InputError, match="prompt is empty"):
        m2ib_saliency(tiny_clip, _image(), "   ", SaliencyConfig(layer=1))
    with pytest.raises(InputError, match="prompt is empty"):
        m2ib_saliency(tiny_clip, _image(), ["", " "], SaliencyConfig(layer=1))
    with pytest.raises(InputError, match="uint8 RGB"):
        m2ib_saliency(tiny_clip, _image().astype(np.float32), "tumor", SaliencyConfig(layer=1))
    with pytest.raises(InputError, match="uint8 RGB"):
        m2ib_saliency(tiny_clip, _image()[..., 0], "tumor", SaliencyConfig(layer=1))
    with pytest.raises(ValueError, match="steps"):
        SaliencyConfig(steps=0)


# --------------------------------------------------------------------------- on a toy CLIP

# The toy CLIP (tests/toy_clip.py) was trained to tell a filled disk from a square outline.
# Settings: bottleneck after block 1 of 4; beta 1.0 (the authors' breast setting) and 20 steps.
TOY_CFG = SaliencyConfig(layer=1, beta=1.0, steps=20)


def _toy_cases(n=6, seed=11):
    from toy_clip import random_image, shape_mask

    rng = np.random.default_rng(seed)
    cases = []
    for _ in range(n):
        image, placed = random_image(rng, ("disk", "square"))
        masks = {kind: shape_mask(kind, cy, cx, r) for kind, cy, cx, r in placed}
        cases.append((image, masks))
    return cases


def test_toy_clip_really_knows_its_two_words(toy_clip):
    """Precondition of the tests below: the toy model classifies single shapes."""
    from toy_clip import random_image

    from napari_medclipsam.core.saliency import encode_text, prepare_image

    rng = np.random.default_rng(5)
    texts = torch.cat([encode_text(toy_clip, "a disk"), encode_text(toy_clip, "a square")])
    correct = 0
    for i in range(20):
        kind = ("disk", "square")[i % 2]
        image, _ = random_image(rng, (kind,))
        with torch.no_grad():
            f = toy_clip.model.encode_image(prepare_image(toy_clip, image), normalize=True)
        correct += int((f @ texts.T).argmax()) == i % 2
    assert correct >= 19


def test_saliency_follows_the_text(toy_clip):
    """On images holding both shapes, the map puts its mass on the shape the text names.

    Measured over 20 images while writing this test: the disk prompt wins on 20/20, the
    square prompt on 17/20, and swapping the prompt moves mass toward the named shape on
    20/20 (smallest shift 0.10 in mean saliency). The thresholds below leave room for
    platform noise while still failing for a text-blind map (which cannot win both ways)."""
    from napari_medclipsam.core.saliency import m2ib_saliency

    disk_wins = square_wins = 0
    for image, masks in _toy_cases():
        on_disk = m2ib_saliency(toy_clip, image, "a disk", TOY_CFG)
        on_square = m2ib_saliency(toy_clip, image, "a square", TOY_CFG)
        d = on_disk[masks["disk"]].mean() - on_disk[masks["square"]].mean()
        s = on_square[masks["square"]].mean() - on_square[masks["disk"]].mean()
        disk_wins += d > 0
        square_wins += s > 0
        # Swapping the prompt moves saliency toward the newly named shape.
        assert d + s > 0.05
    assert disk_wins == 6
    assert square_wins >= 4


def test_coarse_mask_from_toy_saliency_finds_the_named_shape(toy_clip):
    """Saliency -> Otsu -> best component lands on the disk, not the square."""
    from napari_medclipsam.core.metrics import dice
    from napari_medclipsam.core.postprocess import coarse_mask
    from napari_medclipsam.core.saliency import m2ib_saliency

    scores = []
    for image, masks in _toy_cases(n=4, seed=21):
        sal = m2ib_saliency(toy_clip, image, "a disk", TOY_CFG)
        coarse = coarse_mask(sal, CoarseMaskConfig())
        assert not coarse.empty
        scores.append(dice(coarse.mask, masks["disk"]))
        assert dice(coarse.mask, masks["disk"]) > dice(coarse.mask, masks["square"])
    # Patch-level maps (8-pixel tokens) upsampled: coarse, but on target.
    assert np.mean(scores) > 0.5


def test_whole_chain_from_toy_saliency_to_a_sam_mask(toy_clip, tiny_sam_checkpoint):
    """Text -> toy saliency -> coarse mask -> box on the named shape -> (tiny) SAM -> mask.

    The tiny SAM has random weights, so its mask is not judged; the box SAM is given is."""
    from tiny_sam import build_tiny_sam

    from napari_medclipsam.core.config import PipelineConfig
    from napari_medclipsam.core.models import load_sam
    from napari_medclipsam.core.pipeline import ZeroShotPipeline

    sam = load_sam("vit_b", tiny_sam_checkpoint, "cpu", builder=build_tiny_sam)
    pipeline = ZeroShotPipeline(PipelineConfig(device="cpu", saliency=TOY_CFG),
                                clip=toy_clip, sam=sam)
    for image, masks in _toy_cases(n=3, seed=31):
        for prompt, kind, other in (("a disk", "disk", "square"), ("a square", "square", "disk")):
            result = pipeline.segment(image[..., 0], prompt)  # grayscale in, as users give
            assert result.found and result.mask.shape == image.shape[:2]
            (x0, y0, x1, y1), = result.prompts.boxes
            box = np.zeros(image.shape[:2], bool)
            box[int(y0):int(y1) + 1, int(x0):int(x1) + 1] = True
            # The box lies on the named shape, not on the other one. Measured on these 3
            # images: disk boxes cover 72-86% of the disk, square boxes 19-29% of the square
            # (the saliency peaks on parts of the outline and Otsu keeps those), and no box
            # touches the other shape.
            covered = (box & masks[kind]).sum() / masks[kind].sum()
            assert covered > (0.5 if kind == "disk" else 0.1), (prompt, covered)
            assert (box & masks[other]).sum() / masks[other].sum() < 0.05, prompt
