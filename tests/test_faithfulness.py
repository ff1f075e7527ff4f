"""The prompt-faithfulness check: does the text steer the map? On the toy shapes CLIP, the
maths of the score, its cost (one more optimisation, not a second run), and where it is
reported (result, prompts JSON, manifest, console)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from napari_medclipsam.core.config import (  # noqa: E402
    FaithfulnessConfig,
    PipelineConfig,
    SaliencyConfig,
)
from napari_medclipsam.core.faithfulness import Faithfulness, assess, map_correlation  # noqa: E402

#: M2IB settings under which the toy CLIP's maps follow its two words (as test_saliency's).
TOY_CFG = SaliencyConfig(layer=1, beta=1.0, steps=20)
UNSEEN = "zebra quantum"  # words the toy CLIP never saw: its tokenizer reads them as [UNK]


@pytest.fixture(scope="module")
def toy_pipeline(toy_clip_dir):
    from napari_medclipsam.core.models import load_clip
    from napari_medclipsam.core.pipeline import ZeroShotPipeline

    clip = load_clip(f"local-dir:{toy_clip_dir}", "cpu")
    return ZeroShotPipeline(PipelineConfig(device="cpu", precision="fp32", saliency=TOY_CFG),
                            clip=clip, sam=object())  # SAM is never reached here


def _images(n=8, seed=11):
    from toy_clip import random_image

    rng = np.random.default_rng(seed)
    return [random_image(rng, ("disk", "square"))[0] for _ in range(n)]


def test_named_shapes_steer_and_unseen_words_are_flagged(toy_pipeline):
    """Against the neutral prompt "an image" on 8 two-shape images. Measured while writing
    (r = correlation with the neutral map): "a square" 0.53 at most, never flagged; the
    unseen words 0.88-1.00, flagged on 7/8 (mean 0.97); "a disk" 0.77-0.94 against the
    neutral (the disk is what the toy CLIP finds salient whatever the text: the check says
    so) but at most 0.65 against the contrast prompt "a square", which tells them apart."""
    cfg = FaithfulnessConfig(contrast_prompts=("a square",))
    square_r, unseen_r, disk_contrast = [], [], []
    for image in _images():
        disk, square, neutral, unseen = toy_pipeline.saliency_maps(
            image, ["a disk", "a square", cfg.neutral_prompt, UNSEEN])
        square_r.append(map_correlation(square, neutral))
        unseen_r.append(map_correlation(unseen, neutral))
        f = assess(disk, neutral, disk > 0.5, neutral > 0.5, cfg, {"a square": square})
        disk_contrast.append(dict(f.contrasts)["a square"])
    flagged = [r >= cfg.max_correlation for r in unseen_r]
    assert max(square_r) < 0.8 and max(disk_contrast) < 0.8
    assert sum(flagged) >= 6 and np.mean(unseen_r) > 0.93
    assert np.mean(unseen_r) - np.mean(square_r) > 0.5


def test_the_result_carries_the_check_and_its_warning(toy_pipeline, monkeypatch):
    """Through ``segment``: the prompt's own map is unchanged by the check; the neutral map
    costs one more optimisation after the shared prefix (the ViT's first blocks run once);
    the progress names the check's steps; switching it off removes it."""
    from napari_medclipsam.core import saliency as saliency_module
    from napari_medclipsam.core.saliency import m2ib_saliency

    image = _images(1, seed=3)[0]
    prefix_calls = []
    original = saliency_module.vit_prefix

    def counting(*args, **kwargs):
        prefix_calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(saliency_module, "vit_prefix", counting)
    stages = []
    pipe = toy_pipeline
    pipe.config = dataclasses.replace(pipe.config, coarse=dataclasses.replace(
        pipe.config.coarse, eta_c=2.0))  # nothing passes: SAM is not needed
    result = pipe.segment(image, UNSEEN, progress=lambda s, f: stages.append(s))
    assert len(prefix_calls) == 1
    assert stages[:2] == ["saliency step 0/20", "saliency step 1/20"]
    assert "saliency step 20/20" in stages and "faithfulness check step 20/20" in stages
    f = result.faithfulness
    assert isinstance(f, Faithfulness) and f.neutral_prompt == "an image"
    alone = m2ib_saliency(pipe.clip, result.rgb, UNSEEN, TOY_CFG)
    np.testing.assert_allclose(result.saliency, alone, atol=1e-6)
    neutral = m2ib_saliency(pipe.clip, result.rgb, "an image", TOY_CFG)
    assert f.correlation == pytest.approx(map_correlation(alone, neutral), abs=1e-6)
    assert f.neutral_overlap is None  # nothing selected
    pipe.config = dataclasses.replace(pipe.config, faithfulness=FaithfulnessConfig(
        enabled=False))
    prefix_calls.clear()
    off = pipe.segment(image, UNSEEN)
    assert off.faithfulness is None and len(prefix_calls) == 1
    pipe.config = dataclasses.replace(pipe.config, faithfulness=FaithfulnessConfig())


def test_score_overlap_and_message():
    rng = np.random.default_rng(0)
    a = rng.random((20, 20))
    assert map_correlation(a, a) == pytest.approx(1.0)
    assert map_correlation(a, -a) == pytest.approx(-1.0)
    assert map_correlation(np.zeros((4, 4)), np.zeros((4, 4))) == 1.0
    assert map_correlation(np.zeros((4, 4)), a[:4, :4]) == 0.0
    coarse = np.zeros((20, 20), bool)
    coarse[:10, :10] = True
    neutral_sel = np.zeros((20, 20), bool)
    neutral_sel[:5, :10] = True
    cfg = FaithfulnessConfig(neutral_prompt="", contrast_prompts=("normal tissue",))
    f = assess(a, a + 0.01 * rng.random((20, 20)), coarse, neutral_sel, cfg,
               {"normal tissue": rng.random((20, 20))})
    assert f.neutral_overlap == pytest.approx(0.5)
    assert not f.steers and f.score < 0.01
    assert "the empty prompt" in f.message and "not guiding" in f.message
    assert "\n" not in f.message and "faithfulness" in f.summary()
    g = assess(a, rng.random((20, 20)), coarse, neutral_sel, cfg, {"normal tissue": a})
    assert not g.steers and "'normal tissue'" in g.message
    h = assess(a, rng.random((20, 20)), coarse, neutral_sel, cfg,
               {"normal tissue": rng.random((20, 20))})
    assert h.steers and h.message == "" and h.to_dict()["steers"] is True
    assert json.loads(json.dumps(h.to_dict()))["contrasts"] == {
        "normal tissue": h.contrasts[0][1]}


def test_config_and_old_records():
    cfg = PipelineConfig(faithfulness=FaithfulnessConfig(contrast_prompts=["normal", " "]))
    assert cfg.faithfulness.contrast_prompts == ("normal",)
    assert PipelineConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    old = PipelineConfig().to_dict()
    del old["faithfulness"]
    assert PipelineConfig.from_dict(old).faithfulness.enabled
    with pytest.raises(ValueError):
        FaithfulnessConfig(max_correlation=1.5)


def test_salip_check_reuses_the_crop_embeddings(tiny_pipeline, monkeypatch):
    """SaLIP's check scores the same crops against the neutral prompt: no second CLIP pass
    over the crops, and the neutral selection is the neutral prompt's own top-k."""
    from napari_medclipsam.core import salip as salip_module
    from napari_medclipsam.core.config import SalipConfig

    calls = []
    original = salip_module.crop_embeddings

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(salip_module, "crop_embeddings", counting)
    image = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    pipe = tiny_pipeline
    pipe.config = dataclasses.replace(pipe.config, method="salip", salip=SalipConfig(
        points_per_side=4, pred_iou_thresh=0.0, stability_thresh=0.0, box_nms_thresh=1.0,
        crop_nms_thresh=1.0, area_cap=1.0))
    result = pipe.segment(image, "lungs")
    assert len(calls) == 1
    f = result.faithfulness
    assert f is not None and -1.0 <= f.correlation <= 1.0 and f.neutral_overlap is not None


# --------------------------------------------------------------------------- the CLI


def test_cli_records_the_check_and_warns(model_flags, tmp_path, capsys):
    from PIL import Image

    from napari_medclipsam.cli import main

    src = tmp_path / "in"
    src.mkdir()
    image = (np.random.default_rng(3).random((64, 64)) * 255).astype(np.uint8)
    Image.fromarray(image).save(src / "case.png")
    out = tmp_path / "out"
    # the neutral prompt as the prompt: the same map, so it must be flagged
    rc = main(["segment", str(src), "--prompt", "lungs", "-o", str(out), *model_flags,
               "--neutral-prompt", "lungs", "--contrast-prompt", "normal lungs"])
    assert rc == 0
    err = capsys.readouterr().err
    assert ("case.png: warning: This prompt's map is 1.00 correlated with the map of the "
            "neutral prompt 'lungs'") in err
    prompts = json.loads((out / "prompts" / "case.json").read_text())
    assert prompts["faithfulness"]["correlation"] == pytest.approx(1.0)
    assert prompts["faithfulness"]["steers"] is False
    assert set(prompts["faithfulness"]["contrasts"]) == {"normal lungs"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["images"][0]["faithfulness"]["neutral_prompt"] == "lungs"
    assert manifest["config"]["faithfulness"]["contrast_prompts"] == ["normal lungs"]
    off = tmp_path / "off"
    assert main(["segment", str(src), "--prompt", "lungs", "-o", str(off), *model_flags,
                 "--no-faithfulness"]) == 0
    assert "faithfulness" not in json.loads((off / "prompts" / "case.json").read_text())
    assert json.loads((off / "manifest.json").read_text())["config"]["faithfulness"][
        "enabled"] is False


def test_cli_volume_reports_the_mean_and_the_flagged_slices(model_flags, tmp_path, capsys):
    import nibabel as nib

    from napari_medclipsam.cli import main

    src = tmp_path / "in"
    src.mkdir()
    volume = (np.random.default_rng(4).random((48, 48, 3)) * 1000).astype(np.int16)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), src / "vol.nii.gz")
    out = tmp_path / "out"
    rc = main(["segment", str(src), "--volume", "--prompt", "lungs", "-o", str(out),
               *model_flags, "--neutral-prompt", "lungs"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "vol.nii.gz: warning: This prompt's map is 1.00 correlated with the map" in err
    prompts = json.loads((out / "prompts" / "vol.json").read_text())
    faith = prompts["faithfulness"]
    assert faith["slices_checked"] == 3 and faith["flagged_slices"] == [0, 1, 2]
    assert set(faith["slices"]) == {"0", "1", "2"}
    assert faith["correlation"] == pytest.approx(1.0)
    entry = json.loads((out / "manifest.json").read_text())["images"][0]
    assert entry["faithfulness"]["flagged_slices"] == [0, 1, 2]
