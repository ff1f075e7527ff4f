"""CLIPSeg and BiomedCLIPSeg (napari_medclipsam.vlsm.models) on tiny models built through the
real constructors, and the pipeline's ``vlsm`` chain: the decomposition equals the released
forward, saving and loading round-trips, a decoder refuses a base it was not trained on."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from tiny_clip import write_tiny_clip_dir
from toy_vlsm import two_shape_image

from napari_medclipsam.core.config import PipelineConfig, VlsmConfig
from napari_medclipsam.core.errors import InputError
from napari_medclipsam.core.models import ModelUnavailableError
from napari_medclipsam.core.pipeline import ZeroShotPipeline
from napari_medclipsam.vlsm import models as vm


@pytest.fixture
def image():
    return two_shape_image(7)[0]


@pytest.fixture
def clipseg(tiny_clipseg_dir):
    return vm.load_clipseg(f"local-dir:{tiny_clipseg_dir}", "cpu")


def test_clipseg_parts_equal_the_released_forward(clipseg, tiny_clipseg_dir, image):
    from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

    net = CLIPSegForImageSegmentation.from_pretrained(tiny_clipseg_dir).eval()
    processor = CLIPSegProcessor.from_pretrained(tiny_clipseg_dir)
    texts = ["disk", "a square"]
    inputs = processor(text=texts, images=[image, image], padding=True, return_tensors="pt")
    with torch.no_grad():
        theirs = net(**inputs).logits
        ours = clipseg(clipseg.image_inputs([image, image]), clipseg.text_embeddings(texts))
    assert ours.shape == theirs.shape
    assert torch.allclose(ours, theirs, atol=1e-4)
    assert clipseg.image_size == 64 and clipseg.extract_layers == (1, 2, 3)


def test_probabilities_are_at_the_image_size(clipseg, image):
    big = np.repeat(np.repeat(image, 2, axis=0), 3, axis=1)  # 128 x 192
    maps = vm.predict_probabilities(clipseg, big, ["disk", "square", ""])
    assert maps.shape == (3, 128, 192) and maps.dtype == np.float32
    assert maps.min() >= 0.0 and maps.max() <= 1.0
    one = vm.predict_probabilities(clipseg, big, "disk")
    assert one.shape == (128, 192)
    np.testing.assert_allclose(one, maps[0], atol=1e-4)
    with pytest.raises(InputError, match="HxWx3 uint8"):
        vm.predict_probabilities(clipseg, big[..., 0], "disk")


def test_biomedclipseg_reads_the_vit_blocks_and_the_projected_text(tiny_clip_dir, image):
    from napari_medclipsam.core.models import load_clip
    from napari_medclipsam.core.saliency import vit_prefix

    model = vm.build_biomedclipseg(f"local-dir:{tiny_clip_dir}", "cpu")
    clip = load_clip(f"local-dir:{tiny_clip_dir}", "cpu")
    assert model.extract_layers == vm.default_extract_layers(4) == (1, 2, 3)
    assert vm.default_extract_layers(12) == (3, 6, 9)
    x = model.image_inputs([image])
    with torch.no_grad():
        acts = model.activations(x)
        for layer, act in zip(model.extract_layers, acts, strict=True):
            assert torch.allclose(act, vit_prefix(clip, x, layer), atol=1e-6)
        emb = model.text_embeddings(["disk", ""])
        expected = clip.model.encode_text(clip.tokenizer(["disk", ""])).float()
    assert torch.allclose(emb, expected)
    assert emb.shape[-1] == model.decoder.film_mul.in_features  # FiLM by the embedding
    logits = model(x, emb[:1])
    # rd64-refined's two transposed convolutions upsample by (patch / 4) ** 2: 8x8 tokens of
    # 8-pixel patches -> 32x32 here (BiomedCLIP's 16-pixel patches: 14x14 -> 224x224)
    assert logits.shape[-2:] == (32, 32)


def test_decoder_copied_from_clipseg_where_shapes_agree(tiny_clip_dir, tiny_clipseg_dir,
                                                        clipseg):
    model = vm.build_biomedclipseg(f"local-dir:{tiny_clip_dir}", "cpu", decoder_init="clipseg",
                                   clipseg_source=f"local-dir:{tiny_clipseg_dir}")
    ours, theirs = model.decoder.state_dict(), clipseg.decoder.state_dict()
    assert model.base["decoder_tensors_random"] == 0
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    random = vm.build_biomedclipseg(f"local-dir:{tiny_clip_dir}", "cpu")
    copied, skipped = vm.copy_decoder_weights(random.decoder, clipseg.decoder)
    # rd64's reduce_dim 64 vs the tiny CLIPSeg's 16: nothing of that width fits
    assert skipped and "film_mul.weight" in skipped
    assert set(copied) | set(skipped) == set(random.decoder.state_dict())


def test_save_and_load_round_trip(tmp_path, tiny_clip_dir, clipseg, image):
    vm.save_vlsm(clipseg, tmp_path / "cs", {"classes": ["disk"]})
    loaded = vm.load_vlsm(str(tmp_path / "cs"), "cpu")
    assert loaded.arch == "clipseg" and loaded.info["classes"] == ["disk"]
    np.testing.assert_allclose(loaded.probabilities(image, ["disk"]),
                               clipseg.probabilities(image, ["disk"]), atol=1e-4)
    clip_dir = write_tiny_clip_dir(tmp_path / "clip", seed=3)
    bio = vm.build_biomedclipseg(f"local-dir:{clip_dir}", "cpu", seed=1)
    vm.save_vlsm(bio, tmp_path / "bio")
    record = json.loads((tmp_path / "bio" / vm.MODEL_FILE).read_text())
    assert record["arch"] == "biomedclipseg" and record["base"]["clip_sha256"]
    again = vm.load_vlsm(f"local-dir:{tmp_path / 'bio'}", "cpu")
    assert again.model_id == vm.load_vlsm(str(tmp_path / "bio"), "cpu").model_id
    np.testing.assert_allclose(again.probabilities(image, ["square"]),
                               bio.probabilities(image, ["square"]), atol=1e-4)
    assert vm.check_vlsm_source(str(tmp_path / "bio")) == []

    # other CLIP weights at the same place: the decoder no longer fits, said in one line
    from napari_medclipsam.core.models import clear_model_cache

    shutil.rmtree(clip_dir)
    write_tiny_clip_dir(clip_dir, seed=4)
    clear_model_cache()
    with pytest.raises(ModelUnavailableError, match="trained on another CLIP") as info:
        vm.load_vlsm(str(tmp_path / "bio"), "cpu")
    assert "\n" not in str(info.value)


def test_damaged_model_folders_say_so(tmp_path, clipseg):
    folder = tmp_path / "m"
    vm.save_vlsm(clipseg, folder)
    (folder / vm.DECODER_FILE).write_bytes(b"not safetensors")
    with pytest.raises(InputError, match="damaged"):
        vm.load_vlsm(str(folder), "cpu")
    (folder / vm.DECODER_FILE).unlink()
    with pytest.raises(InputError, match="incomplete"):
        vm.load_vlsm(str(folder), "cpu")
    (folder / vm.MODEL_FILE).write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        vm.read_vlsm_record(folder)
    (folder / vm.MODEL_FILE).write_text(json.dumps({"arch": "clipseg", "format": 99}))
    with pytest.raises(InputError, match="newer"):
        vm.read_vlsm_record(folder)
    (tmp_path / "empty").mkdir()
    assert "neither" in vm.check_vlsm_source(str(tmp_path / "empty"))[0]
    assert "not found" in vm.check_vlsm_source(f"local-dir:{tmp_path / 'nope'}")[0]


def test_offline_hub_id_explains_what_to_do(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(vm, "hub_snapshot", offline)
    (problem,) = vm.check_clipseg_source("CIDAS/clipseg-rd64-refined")
    assert "hf download CIDAS/clipseg-rd64-refined" in problem and "local-dir:" in problem


# --------------------------------------------------------------------------- the vlsm chain


def _no_clip(*args, **kwargs):
    raise AssertionError("the VLSM chain must not load CLIP")


def test_vlsm_chain_thresholds_the_probability_without_clip_or_sam(
        monkeypatch, tiny_clipseg_dir, clipseg, image):
    from napari_medclipsam.core import models as core_models
    from napari_medclipsam.core.postprocess import coarse_mask

    monkeypatch.setattr(core_models, "load_clip", _no_clip)
    monkeypatch.setattr(core_models, "load_sam", _no_clip)
    config = PipelineConfig(method="vlsm", device="cpu", precision="fp32",
                            vlsm=VlsmConfig(model=f"local-dir:{tiny_clipseg_dir}",
                                            threshold=0.4))
    pipe = ZeroShotPipeline(config, vlsm=vm.load_vlsm)
    stages = []
    pipe.prepare(lambda stage, fraction: stages.append(stage))
    assert stages == ["loading VLSM"]
    result = pipe.segment(image, "disk")
    expected = clipseg.probabilities(image, ["disk"])[0]
    np.testing.assert_allclose(result.saliency, expected, atol=1e-4)
    coarse = coarse_mask(expected, pipe.coarse_config(), image=image)
    assert pipe.coarse_config().method == "fixed" and pipe.coarse_config().threshold == 0.4
    assert result.found == (not coarse.empty)
    np.testing.assert_array_equal(result.mask, coarse.mask)
    assert result.faithfulness is not None  # the neutral prompt's VLSM map, compared
    ensemble = pipe.saliency_maps(image, [["disk", "square"]])[0]
    both = clipseg.probabilities(image, ["disk", "square"]).mean(axis=0)
    np.testing.assert_allclose(ensemble, both, atol=1e-4)


def test_vlsm_chain_refines_with_sam(tiny_clipseg_dir, tiny_sam_checkpoint, image):
    from tiny_sam2 import tiny_builder

    from napari_medclipsam.core.models import load_sam

    config = PipelineConfig(method="vlsm", device="cpu", precision="fp32",
                            vlsm=VlsmConfig(model=f"local-dir:{tiny_clipseg_dir}",
                                            threshold=0.3, refine=True))
    sam = load_sam("vit_b", tiny_sam_checkpoint, "cpu", builder=lambda: tiny_builder("vit_b"))
    pipe = ZeroShotPipeline(config, sam=sam, vlsm=vm.load_vlsm)
    result = pipe.segment(image, "disk")
    assert result.found, result.message
    assert pipe.session.is_cached(pipe.session.key_for(result.rgb))  # SAM encoded it
    np.testing.assert_array_equal(result.mask, pipe.refine(result.rgb, result.prompts))


def test_pipeline_without_a_vlsm_loader_says_how_to_build_one(image):
    pipe = ZeroShotPipeline(PipelineConfig(method="vlsm", device="cpu"))
    with pytest.raises(InputError, match="load_vlsm"):
        pipe.segment(image, "disk")
    with pytest.raises(ValueError, match="threshold"):
        VlsmConfig(threshold=1.0)
