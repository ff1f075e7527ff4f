"""gScoreCAM and GradCAM (MedCLIP-SAM's saliency and its baseline), and the DenseCRF
threshold method: correctness on the toy shapes CLIP, the method's mechanics, and the CLI."""

from __future__ import annotations

import dataclasses
import importlib.util
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from napari_medclipsam.core.config import CoarseMaskConfig, SaliencyConfig  # noqa: E402
from napari_medclipsam.core.errors import CancelledError, InputError  # noqa: E402


@pytest.fixture(scope="module")
def toy_clip(toy_clip_dir):
    from napari_medclipsam.core.models import load_clip

    return load_clip(f"local-dir:{toy_clip_dir}", "cpu")


def _toy_cases(n=6, seed=11):
    from toy_clip import random_image, shape_mask

    rng = np.random.default_rng(seed)
    cases = []
    for _ in range(n):
        image, placed = random_image(rng, ("disk", "square"))
        cases.append((image, {k: shape_mask(k, cy, cx, r) for k, cy, cx, r in placed}))
    return cases


@pytest.mark.parametrize("method", ["gscorecam", "gradcam"])
def test_cam_follows_the_text(toy_clip, method):
    """On images holding both shapes the map puts more mass on the shape the text names,
    for both prompts (a text-blind map cannot win both ways). Measured while writing: 6/6
    both ways for both methods, smallest margins 0.03 (gScoreCAM) and 0.09 (GradCAM)."""
    from napari_medclipsam.core.cam import cam_saliency

    cfg = SaliencyConfig(method=method)
    wins = 0
    for image, masks in _toy_cases():
        on_disk = cam_saliency(toy_clip, image, "a disk", cfg)
        on_square = cam_saliency(toy_clip, image, "a square", cfg)
        assert on_disk.shape == image.shape[:2] and on_disk.dtype == np.float32
        assert on_disk.min() >= 0 and np.isclose(on_disk.max(), 1.0)
        d = on_disk[masks["disk"]].mean() - on_disk[masks["square"]].mean()
        s = on_square[masks["square"]].mean() - on_square[masks["disk"]].mean()
        wins += int(d > 0) + int(s > 0)
        assert d + s > 0.05  # swapping the prompt moves the mass toward the named shape
    assert wins >= 11


def test_gradcam_on_norm2_of_the_last_block_is_empty(toy_clip):
    """Why norm1 is the default: in the last block of a class-token ViT the patch tokens'
    norm2 output never reaches the embedding, so its gradient (and GradCAM) is zero."""
    from napari_medclipsam.core.cam import cam_saliency

    image, _ = _toy_cases(1)[0]
    old = cam_saliency(toy_clip, image, "a disk",
                       SaliencyConfig(method="gradcam", cam_module="norm2"))
    assert not old.any()
    assert cam_saliency(toy_clip, image, "a disk", SaliencyConfig(method="gradcam")).any()


def test_gscorecam_weights_are_the_softmax_of_masked_scores(toy_clip, monkeypatch):
    """The mechanics on a case small enough to recompute: with 3 kept channels and a batch of
    2, CLIP scores the image masked by each normalised map in 2 batches, and the map is
    ReLU(sum softmax(scores) * A) of exactly those channels."""
    from napari_medclipsam.core import cam
    from napari_medclipsam.core.saliency import encode_text, grid_to_map, prepare_image

    image, _ = _toy_cases(1, seed=3)[0]
    cfg = SaliencyConfig(method="gscorecam", cam_channels=3, cam_batch=2)
    batches = []
    original = toy_clip.model.encode_image

    def counting(x, *args, **kwargs):
        batches.append(x.shape[0])
        return original(x, *args, **kwargs)

    monkeypatch.setattr(toy_clip.model, "encode_image", counting)
    seen = []
    got = cam.cam_saliency(toy_clip, image, "a square", cfg,
                           progress=lambda i, n: seen.append((i, n)))
    assert batches == [1, 2, 1]  # the gradient pass, then 3 masked images in batches of 2
    assert seen == [(1, 3), (2, 3), (3, 3)]

    x = prepare_image(toy_clip, image)
    t = encode_text(toy_clip, "a square")
    target = toy_clip.model.visual.trunk.blocks[-1].norm1
    a, g = cam._activations_and_gradients(toy_clip, x, t, target)
    kept = torch.topk(g.mean(dim=(1, 2)), 3).indices
    scores = []
    for c in kept:
        m = torch.nn.functional.interpolate(a[c][None, None], size=x.shape[-2:],
                                            mode="bilinear", align_corners=False)[0, 0]
        m = (m - m.min()) / (m.max() - m.min())
        with torch.no_grad():
            scores.append(cam._logit(toy_clip, original(x * m), t)[0])
    w = torch.softmax(torch.stack(scores), 0)
    expected = grid_to_map(toy_clip, torch.relu((w[:, None, None] * a[kept]).sum(0)),
                           image.shape[:2])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert got.std() > 0.01


def test_cam_cancel_and_bad_settings(toy_clip):
    from napari_medclipsam.core.cam import cam_saliency

    image, _ = _toy_cases(1)[0]
    calls = []
    with pytest.raises(CancelledError):
        cam_saliency(toy_clip, image, "a disk",
                     SaliencyConfig(method="gscorecam", cam_batch=8),
                     should_stop=lambda: len(calls) > 1 or calls.append(1) is not None)
    with pytest.raises(InputError, match="cam_layer must be between -4 and 3"):
        cam_saliency(toy_clip, image, "a disk", SaliencyConfig(method="gradcam", cam_layer=4))
    with pytest.raises(ValueError, match="saliency method must be one of m2ib, gscorecam"):
        SaliencyConfig(method="scorecam")
    with pytest.raises(ValueError, match="cam_channels"):
        SaliencyConfig(cam_channels=0)


# --------------------------------------------------------------------------- DenseCRF


def _edge_case():
    """A bright disk on a dark textured background, and a saliency map that is a blurred,
    shifted blob over it (as CAM maps are): the CRF should snap the mask to the disk."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:96, :96]
    disk = (yy - 48) ** 2 + (xx - 44) ** 2 < 18 ** 2
    gray = np.where(disk, 200, 40) + rng.integers(0, 20, disk.shape)
    image = np.repeat(gray[..., None], 3, axis=2).astype(np.uint8)
    blob = np.exp(-(((yy - 52) ** 2 + (xx - 50) ** 2) / (2 * 16.0 ** 2)))
    return image, (blob / blob.max()).astype(np.float32), disk


def test_crf_snaps_the_coarse_mask_to_the_image():
    pytest.importorskip("pydensecrf")
    from napari_medclipsam.core.metrics import dice
    from napari_medclipsam.core.postprocess import coarse_mask, crf_foreground

    image, saliency, disk = _edge_case()
    q = crf_foreground(saliency, image)
    assert q.shape == saliency.shape and q.dtype == np.float32
    assert q.min() >= 0 and q.max() <= 1
    crf = coarse_mask(saliency, CoarseMaskConfig(method="crf"), image=image)
    otsu = coarse_mask(saliency, CoarseMaskConfig(method="otsu"), image=image)
    assert crf.threshold == 0.5 and not crf.empty
    d_crf, d_otsu = dice(crf.mask, disk), dice(otsu.mask, disk)
    assert d_crf > d_otsu + 0.05, (d_crf, d_otsu)
    # The image matters: the same map on a flat image gives another mask.
    flat = coarse_mask(saliency, CoarseMaskConfig(method="crf"),
                       image=np.full_like(image, 100))
    assert not np.array_equal(flat.mask, crf.mask)


def test_crf_needs_the_image_and_says_when_the_package_is_missing(monkeypatch):
    import builtins

    from napari_medclipsam.core.postprocess import coarse_mask

    image, saliency, _ = _edge_case()
    pytest.importorskip("pydensecrf")
    with pytest.raises(InputError, match="needs the image"):
        coarse_mask(saliency, CoarseMaskConfig(method="crf"))
    with pytest.raises(InputError, match="96x96x3 uint8 image"):
        coarse_mask(saliency, CoarseMaskConfig(method="crf"), image=image[:50])
    real_import = builtins.__import__

    def no_crf(name, *args, **kwargs):
        if name.startswith("pydensecrf"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_crf)
    with pytest.raises(InputError, match=r"pip install 'napari-medclipsam\[crf\]'") as err:
        coarse_mask(saliency, CoarseMaskConfig(method="crf"), image=image)
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------- through the CLI


@pytest.mark.parametrize("flags", [["--saliency", "gscorecam", "--cam-channels", "20"],
                                   ["--saliency", "gradcam", "--threshold-method", "crf"]])
def test_cli_runs_the_relatives_and_records_them(model_flags, tmp_path, flags):
    """`medclipsam segment` with the relatives' flags on real files: the usual outputs,
    and the manifest records the method and its parameters."""
    if "crf" in flags:
        pytest.importorskip("pydensecrf")
    from PIL import Image
    from toy_clip import random_image

    from napari_medclipsam.cli import main

    image, _ = random_image(np.random.default_rng(2), ("disk", "square"))
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(image).save(src / "case.png")
    out = tmp_path / "out"
    rc = main(["segment", str(src), "--prompt", "a disk", "-o", str(out), *model_flags, *flags])
    assert rc == 0
    assert (out / "masks" / "case.png").is_file() and (out / "coarse" / "case.png").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    config = manifest["config"]
    assert config["saliency"]["method"] == flags[1]
    if "--cam-channels" in flags:
        assert config["saliency"]["cam_channels"] == 20
    if "crf" in flags:
        assert config["coarse"]["method"] == "crf"
    import tifffile

    saliency = tifffile.imread(out / "saliency" / "case.tif")
    assert saliency.shape == image.shape[:2] and saliency.max() == pytest.approx(1.0)


def test_help_lists_the_relatives(capsys):
    from napari_medclipsam.cli import main

    with pytest.raises(SystemExit):
        main(["segment", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "{m2ib,gscorecam,gradcam}" in text
    assert "{otsu,kmeans,fixed,crf}" in text


def test_old_records_load_with_m2ib():
    from napari_medclipsam.core.config import PipelineConfig

    old = PipelineConfig().to_dict()
    for key in ("method", "cam_layer", "cam_module", "cam_channels", "cam_batch"):
        del old["saliency"][key]
    assert PipelineConfig.from_dict(old).saliency.method == "m2ib"
    cfg = PipelineConfig(saliency=dataclasses.replace(SaliencyConfig(), method="gradcam"))
    assert PipelineConfig.from_dict(cfg.to_dict()) == cfg


# --------------------------------------------------------------------------- the dock


@pytest.mark.skipif(importlib.util.find_spec("qtpy") is None, reason="needs Qt (qtpy)")
def test_dock_runs_gscorecam_with_densecrf(make_napari_viewer, tiny_pipeline, qtbot,
                                           monkeypatch, tmp_path):
    """Plugins > Text-prompt segmentation: choose gScoreCAM and DenseCRF in Advanced, Run
    all: the run uses them (progress counts gScoreCAM's batches) and the layers appear."""
    pytest.importorskip("pydensecrf")
    from napari_helpers import SEGMENT, dock
    from toy_clip import random_image

    monkeypatch.setenv("MEDCLIPSAM_HOME", str(tmp_path / "home"))
    viewer = make_napari_viewer()
    image, _ = random_image(np.random.default_rng(4), ("disk", "square"))
    viewer.add_image(image, name="shapes", rgb=True)
    w = dock(viewer, SEGMENT)
    w.set_pipeline(tiny_pipeline)
    w.saliency_combo.setCurrentIndex(w.saliency_combo.findData("gscorecam"))
    w.method_combo.setCurrentIndex(w.method_combo.findData("crf"))
    assert "gScoreCAM saliency · DenseCRF mask" in w.settings_label.text()
    w.prompt_edit.setPlainText("a disk")
    w.run_button.click()
    qtbot.waitUntil(lambda: not w.running, timeout=120_000)
    config = w.controller.pipeline.config
    assert config.saliency.method == "gscorecam" and config.coarse.method == "crf"
    stages = [u.stage for u in w.progress_log if u.stage.startswith("saliency step")]
    n = tiny_pipeline.saliency_steps()
    assert n == 1 + -(-min(300, tiny_pipeline.clip.model.visual.trunk.embed_dim) // 128)
    assert stages == [f"saliency step {i}/{n}" for i in range(n + 1)], stages
    assert "saliency [a disk]" in viewer.layers, w.last_status
    assert "coarse mask [a disk]" in viewer.layers and "SAM mask [a disk]" in viewer.layers
