"""SaLIP mode (``--method salip``): CLIP retrieval of SAM's proposals on the toy shapes CLIP,
the generator's parameters, area cap, top-k, "nothing found", cancel, and the CLI."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from napari_medclipsam.core.config import PipelineConfig, SalipConfig  # noqa: E402
from napari_medclipsam.core.errors import CancelledError  # noqa: E402
from napari_medclipsam.core.salip import (  # noqa: E402
    Proposal,
    cap_proposals,
    crop_image,
    crop_scores,
    retrieval_map,
    retrieve,
)

#: Generator settings under which the tiny random SAM proposes dozens of masks (48 for 4
#: points per side, measured): no thresholds, no NMS, no area cap.
PERMISSIVE = SalipConfig(points_per_side=4, pred_iou_thresh=0.0, stability_thresh=0.0,
                         box_nms_thresh=1.0, crop_nms_thresh=1.0, area_cap=1.0)


def _proposal(mask: np.ndarray) -> Proposal:
    ys, xs = np.nonzero(mask)
    return Proposal(mask, (float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())),
                    int(mask.sum()), 0.9, 0.9)


def _region(shape, cy: int, cx: int, half: int) -> Proposal:
    mask = np.zeros(shape, dtype=bool)
    mask[max(cy - half, 0):cy + half + 1, max(cx - half, 0):cx + half + 1] = True
    return _proposal(mask)


def _three_regions(rng: np.random.Generator, side: int = 192):
    """A noisy image with a disk, a square outline and an empty patch at shuffled places,
    and SAM-like proposals: the 65x65 region around each (so a crop holds its shape at the
    scale the toy CLIP was trained on: 14-24 px shapes in 64 px images)."""
    from toy_clip import draw_shape

    canvas = rng.normal(0.2, 0.05, (side, side)).astype(np.float32)
    centres = [(48, 48), (48, 144), (144, 96)]
    proposals = {}
    for kind, i in zip(("disk", "square", "empty"), rng.permutation(3), strict=True):
        cy, cx = (c + int(rng.integers(-8, 9)) for c in centres[i])
        if kind != "empty":
            draw_shape(canvas, kind, cy, cx, int(rng.integers(7, 12)),
                       float(rng.uniform(0.75, 0.95)))
        proposals[kind] = _region(canvas.shape, cy, cx, 32)
    image = (np.clip(canvas, 0, 1) * 255).astype(np.uint8)
    return np.repeat(image[..., None], 3, axis=2), proposals


@pytest.fixture(scope="module")
def toy_clip(toy_clip_dir):
    from napari_medclipsam.core.models import load_clip

    return load_clip(f"local-dir:{toy_clip_dir}", "cpu")


# --------------------------------------------------------------------------- retrieval


@pytest.mark.parametrize("crop", ["mask", "box"])
def test_retrieval_picks_the_crop_that_holds_the_named_shape(toy_clip, crop):
    """CLIP's scores of the crops rank the named shape's proposal first, for both prompts
    (a text-blind score cannot win both ways). Measured while writing: 20/20 both ways for
    both crop modes, the winner ahead by at least 32 score points (100 x cosine)."""
    from napari_medclipsam.core.saliency import encode_text

    rng = np.random.default_rng(5)
    for _ in range(8):
        image, proposals = _three_regions(rng)
        kinds = list(proposals)
        crops = [crop_image(image, proposals[k], crop) for k in kinds]
        for text, wanted in (("a disk", "disk"), ("a square", "square")):
            scores = crop_scores(toy_clip, crops, encode_text(toy_clip, text))
            assert scores.shape == (3,) and np.all(np.abs(scores) <= 100.0 + 1e-3)
            assert kinds[retrieve(scores, 1)[0]] == wanted
            second = np.sort(scores)[-2]
            assert scores[kinds.index(wanted)] - second > 5.0


def test_scores_are_100_cosine_with_the_renormalised_ensemble_mean(toy_clip):
    """The text side is the mean of the prompts' unit embeddings, normalised again; the
    score is 100 x the cosine (SaLIP's ``100. * image_features @ mean_text_feature.T``)."""
    from napari_medclipsam.core.saliency import encode_text, image_tensor

    image, proposals = _three_regions(np.random.default_rng(1))
    crops = [crop_image(image, p) for p in proposals.values()]
    ensemble = encode_text(toy_clip, ["a disk", "a square"])
    scores = crop_scores(toy_clip, crops, ensemble, batch=2)  # two batches
    with torch.no_grad():
        x = torch.stack([image_tensor(c, toy_clip.image_size, toy_clip.mean, toy_clip.std)
                         for c in crops])
        emb = torch.nn.functional.normalize(toy_clip.model.encode_image(x).float(), dim=-1)
        tokens = toy_clip.tokenizer(["a disk", "a square"])
        txt = torch.nn.functional.normalize(toy_clip.model.encode_text(tokens).float(), dim=-1)
        direction = torch.nn.functional.normalize(txt.mean(0), dim=-1)
    np.testing.assert_allclose(scores, (100 * emb @ direction).numpy(), atol=1e-3)


def test_crops_are_square_padded_and_keep_only_the_mask():
    image = np.full((40, 60, 3), 200, dtype=np.uint8)
    mask = np.zeros((40, 60), dtype=bool)
    mask[10:20, 5:45] = True  # 10 x 40: a wide proposal
    mask[12, 10] = False  # a hole: black in the mask crop, kept in the box crop
    p = _proposal(mask)
    crop = crop_image(image, p, "mask")
    assert crop.shape == (40, 40, 3)  # padded to a square, not stretched
    assert (crop[15:25] == 200).sum() == 3 * (10 * 40 - 1)
    assert crop[:15].max() == 0 and crop[25:].max() == 0
    box = crop_image(image, p, "box")
    assert (box == 200).sum() == 3 * 10 * 40


def test_area_cap_top_k_and_the_retrieval_map():
    shape = (50, 50)
    big = _region(shape, 25, 25, 24)  # 49 x 49 = 96% of the image
    small = [_region(shape, 10, 10, 3), _region(shape, 40, 40, 4), _region(shape, 10, 40, 2)]
    kept = cap_proposals([big, *small], SalipConfig(area_cap=0.6), shape)
    assert kept == small
    assert cap_proposals([big], SalipConfig(area_cap=1.0), shape) == [big]
    scores = np.array([3.0, 9.0, 5.0], dtype=np.float32)
    assert retrieve(scores, 1) == [1]
    assert retrieve(scores, 2) == [1, 2]
    assert retrieve(scores, 5) == [1, 2, 0]
    assert retrieve(np.array([4.0, 4.0]), 1) == [0]  # ties: the earlier (larger) one
    rmap = retrieval_map(shape, kept, scores)
    assert rmap[40, 40] == 1.0 and rmap[10, 40] == pytest.approx(1 / 3) and rmap[10, 10] == 0
    assert rmap[30, 20] == 0 and rmap.dtype == np.float32


# --------------------------------------------------------------------------- the generator


@pytest.mark.parametrize("sam", ["vit_b", "sam2_t"])
def test_generator_is_the_package_one_with_salips_parameters(sam, tiny_sam_checkpoint,
                                                             tiny_sam2_checkpoint):
    from tiny_sam2 import tiny_builder

    from napari_medclipsam.core.models import load_sam
    from napari_medclipsam.core.salip import mask_generator

    checkpoint = tiny_sam_checkpoint if sam == "vit_b" else tiny_sam2_checkpoint
    bundle = load_sam(sam, str(checkpoint), "cpu", builder=lambda: tiny_builder(sam))
    cfg = SalipConfig(points_per_side=12, pred_iou_thresh=0.3, stability_thresh=0.4,
                      box_nms_thresh=0.75, crop_nms_thresh=0.85, crop_n_layers=1,
                      crop_downscale=3, min_region_area=0.01)
    gen = mask_generator(bundle, cfg, (100, 200), precision="bf16")
    if sam == "vit_b":
        from segment_anything import SamAutomaticMaskGenerator as released
    else:
        from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator as released
    assert isinstance(gen, released)
    assert [len(g) for g in gen.point_grids] == [144, 16]
    assert (gen.pred_iou_thresh, gen.stability_score_thresh) == (0.3, 0.4)
    assert (gen.box_nms_thresh, gen.crop_nms_thresh, gen.crop_n_layers) == (0.75, 0.85, 1)
    assert gen.min_mask_region_area == 200  # 1% of 100 x 200 pixels
    assert gen.n_crops == 5


@pytest.mark.parametrize("sam", ["vit_b", "sam2_t"])
def test_pipeline_retrieves_top_k_under_the_cap(sam, tiny_pipeline, tiny_sam2_pipeline):
    """Through the real generator (tiny random SAM): the K best-scored proposals under the
    cap become SAM's box prompts, in score order; the JSON-side record holds every crop."""
    pipe = tiny_pipeline if sam == "vit_b" else tiny_sam2_pipeline
    image = (np.random.default_rng(0).random((96, 96, 3)) * 255).astype(np.uint8)
    pipe.config = dataclasses.replace(pipe.config, method="salip",
                                      salip=dataclasses.replace(PERMISSIVE, top_k=2))
    result = pipe.segment(image, "a disk")
    info = result.extra["salip"]
    proposals, scores = info["proposals"], info["scores"]
    assert result.found and len(proposals) >= 10 and len(scores) == len(proposals)
    best_two = list(np.argsort(-scores, kind="stable")[:2])
    assert info["retrieved"] == best_two
    np.testing.assert_allclose(result.prompts.boxes, [proposals[i].box for i in best_two])
    assert [c.confidence for c in result.coarse.components] == pytest.approx(
        [float(scores[i]) for i in best_two])
    assert result.coarse.mask.any() and result.saliency.max() == 1.0
    assert result.mask.shape == image.shape[:2] and result.mask.dtype == bool
    # SAM's mask for the retrieved boxes, OR-ed, not cut to the largest components
    union = pipe.session.predict(boxes=result.prompts.boxes)
    np.testing.assert_array_equal(result.mask, union)

    # the cap: the median area drops the larger half
    areas = sorted(p.area for p in proposals)
    cap = areas[len(areas) // 2] / image.shape[0] / image.shape[1]
    pipe.config = dataclasses.replace(
        pipe.config, salip=dataclasses.replace(pipe.config.salip, area_cap=cap))
    capped = pipe.segment(image, "a disk").extra["salip"]
    assert 0 < len(capped["proposals"]) < capped["n_generated"]
    assert all(p.area <= cap * 96 * 96 for p in capped["proposals"])


@pytest.mark.parametrize("sam", ["vit_b", "sam2_t"])
def test_nothing_proposed_and_nothing_under_the_cap(sam, tiny_pipeline, tiny_sam2_pipeline):
    image = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    pipe = tiny_pipeline if sam == "vit_b" else tiny_sam2_pipeline
    pipe.config = dataclasses.replace(pipe.config, method="salip", salip=dataclasses.replace(
        PERMISSIVE, pred_iou_thresh=1.0))
    none = pipe.segment(image, "a disk")
    assert not none.found and not none.mask.any() and none.message.startswith("Nothing found")
    assert "proposed no mask" in none.message and len(none.prompts.boxes) == 0
    pipe.config = dataclasses.replace(pipe.config, salip=dataclasses.replace(
        PERMISSIVE, area_cap=1e-4))
    capped = pipe.segment(image, "a disk")
    assert not capped.found and "area cap" in capped.message
    assert capped.extra["salip"]["n_generated"] > 0 and not capped.coarse.mask.any()


def test_cancel_stops_between_crops(tiny_pipeline):
    image = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    pipe = tiny_pipeline
    pipe.config = dataclasses.replace(pipe.config, method="salip", salip=PERMISSIVE)
    stages = []

    def progress(stage, fraction):
        stages.append(stage)

    with pytest.raises(CancelledError):
        pipe.segment(image, "a disk", progress=progress,
                     should_stop=lambda: "SAM proposals: crop 2/5" in stages)
    assert "SAM proposals: crop 2/5" in stages and "SAM proposals: crop 3/5" not in stages


def test_config_round_trip_and_old_records_load():
    cfg = PipelineConfig(method="salip", salip=SalipConfig(top_k=2, crop="box"))
    assert PipelineConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    old = PipelineConfig().to_dict()
    del old["method"], old["salip"]
    assert PipelineConfig.from_dict(old).method == "medclipsamv2"
    for bad in (dict(area_cap=0.0), dict(crop="contour"), dict(top_k=0),
                dict(pred_iou_thresh=1.5)):
        with pytest.raises(ValueError):
            SalipConfig(**bad)
    with pytest.raises(ValueError, match="method"):
        PipelineConfig(method="saliency")


# --------------------------------------------------------------------------- the CLI


def _one_image(tmp_path):
    from PIL import Image

    src = tmp_path / "in"
    src.mkdir()
    image = (np.random.default_rng(3).random((80, 96)) * 255).astype(np.uint8)
    Image.fromarray(image).save(src / "case.png")
    return src


SALIP_FLAGS = ["--method", "salip", "--salip-points-per-side", "4", "--salip-pred-iou", "0",
               "--salip-stability", "0", "--salip-box-nms", "1", "--salip-crop-nms", "1",
               "--salip-area-cap", "1", "--salip-crop", "box", "--top-k", "2"]


def test_cli_salip_writes_the_usual_outputs_and_records_the_crops(model_flags, tmp_path):
    import tifffile
    from PIL import Image

    from napari_medclipsam.cli import main

    src, out = _one_image(tmp_path), tmp_path / "out"
    rc = main(["segment", str(src), "--prompt", "a disk", "-o", str(out), *model_flags,
               *SALIP_FLAGS])
    assert rc == 0
    mask = np.asarray(Image.open(out / "masks" / "case.png"))
    assert mask.shape == (80, 96) and mask.any()
    assert tifffile.imread(out / "saliency" / "case.tif").max() == pytest.approx(1.0)
    prompts = json.loads((out / "prompts" / "case.json").read_text())
    assert prompts["method"] == "salip" and prompts["threshold"] is None
    crops = prompts["crops"]
    ranked = sorted((c for c in crops if c["retrieved"]), key=lambda c: c["retrieved"])
    assert [c["retrieved"] for c in ranked] == [1, 2]
    best = sorted((c["score"] for c in crops), reverse=True)[:2]
    assert [c["score"] for c in ranked] == pytest.approx(best)
    assert prompts["boxes"] == [c["box"] for c in ranked]
    config = json.loads((out / "manifest.json").read_text())["config"]
    assert config["method"] == "salip"
    assert config["salip"]["top_k"] == 2 and config["salip"]["points_per_side"] == 4
    assert config["salip"]["crop"] == "box" and config["coarse"]["top_k"] == 1

    # evaluation works unchanged on SaLIP's output folder: against the left half of its
    # own mask, DSC = 2|A∩B| / (|A| + |B|)
    gt = tmp_path / "gt"
    gt.mkdir()
    half = mask > 0
    half[:, 48:] = False
    Image.fromarray(half.astype(np.uint8) * 255).save(gt / "case.png")
    assert main(["evaluate", "--pred", str(out / "masks"), "--gt", str(gt)]) == 0
    evaluation = json.loads((out / "masks" / "evaluation.json").read_text())
    expected = 2 * half.sum() / (half.sum() + (mask > 0).sum())
    assert evaluation["images"][0]["dsc"] == pytest.approx(expected)


def test_cli_salip_rejects_top_k_zero_in_one_line(model_flags, tmp_path, capsys):
    from napari_medclipsam.cli import main

    src = _one_image(tmp_path)
    rc = main(["segment", str(src), "--prompt", "a disk", "-o", str(tmp_path / "o"),
               *model_flags, "--method", "salip", "--top-k", "0"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "--top-k 0" in err and "\n" not in err
    assert not (tmp_path / "o").exists()


def test_help_lists_salip(capsys):
    from napari_medclipsam.cli import main

    with pytest.raises(SystemExit):
        main(["segment", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--method {medclipsamv2,salip,vlsm}" in text
    for flag in ("--salip-points-per-side", "--salip-pred-iou", "--salip-stability",
                 "--salip-box-nms", "--salip-crop-nms", "--salip-crop-layers",
                 "--salip-min-region", "--salip-area-cap", "--salip-crop"):
        assert flag in text
