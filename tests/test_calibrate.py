"""Calibration from corrected cases (issue 13): known-by-construction settings are found and
beat the defaults under cross-validation, every saliency map and SAM embedding is computed once,
each table entry is the Dice segment gives, too few cases say what they need, and the CLI
writes a preset that ``segment --config`` reproduces (also from an nnU-Net dataset's corrected
cases), never overwriting without --overwrite.

The "corrections" are made by the chain itself with non-default settings P* (layer 1 of the
tiny ViT, beta 1, top-2 components, one box per component) on small synthetic images, so the
best settings are known: P*'s Dice is 1.0 on every case by construction.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

pytest.importorskip("torch")

from napari_medclipsam.cli import main  # noqa: E402
from napari_medclipsam.core.calibrate import (  # noqa: E402
    CalibrationCase,
    Combination,
    CrossValidation,
    DiceTable,
    Fold,
    SearchSpace,
    calibrate,
    cross_validate,
    dice_table,
)
from napari_medclipsam.core.config import PipelineConfig  # noqa: E402
from napari_medclipsam.core.errors import InputError  # noqa: E402

MODEL_STEPS = 2  # the CLI's M2IB steps (model_flags), as the tiny_pipeline fixture's
PROMPT = "a disk"
#: The grid of the tests: the tiny ViT has 4 blocks; the defaults are layer 2, beta 0.1,
#: otsu, eta_c 0, top-1, one box (tiny_pipeline and model_flags).
SPACE = SearchSpace(layers=(1, 2), betas=(0.1, 1.0), threshold_methods=("otsu",),
                    eta_cs=(0.0,), top_ks=(1, 2), box_modes=("single", "per_component"),
                    box_margins=(0.0,), prompt_modes=("boxes",))
GRID_FLAGS = ["--layers", "1,2", "--betas", "0.1,1", "--threshold-methods", "otsu",
              "--eta-cs", "0", "--top-ks", "1,2", "--box-modes", "single,per_component",
              "--box-margins", "0", "--prompt-modes", "boxes"]


def _star(config: PipelineConfig) -> PipelineConfig:
    """P*: the settings the corrections are made with."""
    r = dataclasses.replace
    return r(config, saliency=r(config.saliency, layer=1, beta=1.0),
             coarse=r(config.coarse, top_k=2), prompts=r(config.prompts, box_mode="per_component"),
             faithfulness=r(config.faithfulness, enabled=False))


def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    from tiny_pipeline import disk_images

    return disk_images(n, seed)


def _corrected(pipeline, images, prefix="case") -> list[CalibrationCase]:
    from napari_medclipsam.core.pipeline import ZeroShotPipeline

    star = ZeroShotPipeline(_star(pipeline.config), clip=pipeline.clip, sam=pipeline.sam)
    return [CalibrationCase(f"{prefix}{i}", im, star.segment(im, PROMPT).mask, (PROMPT,))
            for i, im in enumerate(images)]


def _column(table: DiceTable, **settings) -> int:
    hits = [j for j, c in enumerate(table.combinations)
            if all(getattr(c, k) == v for k, v in settings.items())]
    assert len(hits) == 1, hits
    return hits[0]


# --------------------------------------------------------------------------- core


def test_finds_the_settings_the_corrections_were_made_with(tiny_pipeline):
    """P* is layer 1, beta 1, top-2, per-component boxes. On these random-weight models beta
    does not change the masks (measured: beta 0.1 and 1 give the same Dice everywhere), so
    the tie goes to the defaults' beta; layer, top-K and box mode are found. The defaults
    score below 1 on 3 of the 6 cases (measured 0.98-0.997)."""
    cases = _corrected(tiny_pipeline, _images(6))
    result = calibrate(tiny_pipeline, cases, SPACE, folds=3, seed=0)
    table = result.table
    star = _column(table, layer=1, beta=1.0, top_k=2, box_mode="per_component")
    assert (table.values[:, star] == 1.0).all()
    chosen = result.combination
    assert (chosen.layer, chosen.top_k, chosen.box_mode) == (1, 2, "per_component")
    assert (table.values[:, result.chosen] == 1.0).all()
    assert result.in_sample[0] == 1.0 and result.in_sample[1] < 1.0
    assert table.default_index == 0 and table.combinations[0].layer == 2
    assert (table.values[:, 0] < 1.0).sum() >= 2
    assert result.cv.tuned_dice > result.cv.default_dice
    assert len(result.cv.folds) == 3 and sum(len(f.test) for f in result.cv.folds) == 6
    # the preset: P*'s settings that matter, everything else the pipeline's
    cfg = result.config
    assert (cfg.saliency.layer, cfg.coarse.top_k, cfg.prompts.box_mode) == (1, 2,
                                                                            "per_component")
    assert cfg.saliency.steps == 2 and cfg.clip_model == tiny_pipeline.config.clip_model
    preset = result.preset()
    record = preset["calibration"]
    assert preset["prompt"] == [PROMPT] and record["tuned_on"] == 6
    assert record["cross_validated"]["tuned_dice"] == pytest.approx(result.cv.tuned_dice)
    assert PipelineConfig.from_dict(preset["config"]) == cfg


def test_each_table_entry_is_the_dice_segment_gives(tiny_pipeline):
    """Thresholds computed once per map and applied as fixed ones, masks cached by prompt
    bytes, points, margins, eta_c: the table holds what ZeroShotPipeline.segment returns
    with each column's config (KMeans, points and a 10% margin included)."""
    from napari_medclipsam.core.metrics import dice
    from napari_medclipsam.core.pipeline import ZeroShotPipeline

    images = _images(2, seed=3)
    yy, xx = np.mgrid[:64, :64]
    truth = (yy - 30) ** 2 + (xx - 34) ** 2 <= 15 ** 2
    cases = [CalibrationCase(f"c{i}", im, truth, (PROMPT,)) for i, im in enumerate(images)]
    space = SearchSpace(layers=(2,), betas=(0.1,), threshold_methods=("otsu", "kmeans"),
                        eta_cs=(0.0, 0.5), top_ks=(1, 2), box_margins=(0.0, 0.1))
    table = dice_table(tiny_pipeline, cases, space)
    assert len(table.combinations) == 2 * 2 * 2 * 5  # points: one box setting, not four
    assert table.box_margins == {0.0: 0, 0.1: 6}
    assert table.values.std() > 0.05  # the columns do differ
    for j in range(0, len(table.combinations), 5):
        config = dataclasses.replace(table.config_of(j), faithfulness=dataclasses.replace(
            tiny_pipeline.config.faithfulness, enabled=False))
        pipe = ZeroShotPipeline(config, clip=tiny_pipeline.clip, sam=tiny_pipeline.sam)
        for i, case in enumerate(cases):
            assert dice(pipe.segment(case.image, PROMPT).mask, truth) == table.values[i, j], \
                table.combinations[j]


def test_every_map_and_embedding_is_computed_once(tiny_pipeline, monkeypatch):
    """4 cases x 2 prompts (own + a candidate) x 2 layers x 2 betas = 32 maps, from one
    m2ib_saliencies call per image, the ViT prefix once per (image, layer), SAM's image
    encoder once per image, for all 32 combinations."""
    from napari_medclipsam.core import saliency

    calls, prefixes = [], []
    real_maps, real_prefix = saliency.m2ib_saliencies, saliency.vit_prefix

    def counting_maps(clip, image, requests, *args, **kwargs):
        calls.append([(id(t), cfg.layer, cfg.beta) for t, cfg in requests])
        return real_maps(clip, image, requests, *args, **kwargs)

    def counting_prefix(clip, x, layer):
        prefixes.append(layer)
        return real_prefix(clip, x, layer)

    monkeypatch.setattr(saliency, "m2ib_saliencies", counting_maps)
    monkeypatch.setattr(saliency, "vit_prefix", counting_prefix)
    encoder_runs = []
    hook = tiny_pipeline.sam.model.image_encoder.register_forward_hook(
        lambda *a: encoder_runs.append(1))
    try:
        cases = [CalibrationCase(f"c{i}", im, np.zeros((64, 64), bool), (PROMPT,))
                 for i, im in enumerate(_images(4, seed=5))]
        space = dataclasses.replace(SPACE, prompts=("a square",))
        table = dice_table(tiny_pipeline, cases, space)
    finally:
        hook.remove()
    assert len(table.combinations) == 2 * 2 * 2 * 2 * 2
    assert table.prompt_options == (None, ("a square",))
    assert len(calls) == 4
    assert all(len(c) == 8 and len(set(c)) == 8 for c in calls)
    assert sorted(prefixes) == [1] * 4 + [2] * 4
    assert len(encoder_runs) == 4 and table.stats["sam_encoder_runs"] == 4
    assert table.stats["saliency_maps"] == 32 and table.stats["m2ib_calls"] == 4
    # far fewer decoder calls than combinations x cases: the prompts' cache
    assert table.stats["sam_decoder_calls"] < len(table.combinations) * 4 / 4
    assert table.stats["coarse_masks"] == 4 * 32 / 2  # the box mode shares the components


def test_several_sam_backends_progress_and_cancel(tiny_pipeline):
    """A second backend doubles the columns and runs its own encoder once per image; the
    progress fraction only grows and ends at 1; a stop request raises CancelledError."""
    from tiny_sam import build_tiny_sam

    from napari_medclipsam.core.errors import CancelledError
    from napari_medclipsam.core.models import SamBundle

    other = SamBundle(build_tiny_sam(seed=1), "medsam", "cpu", None, None)
    cases = _corrected(tiny_pipeline, _images(4, seed=6))
    seen = []
    result = calibrate(tiny_pipeline, cases, SPACE, folds=2, sams=[other],
                       progress=lambda stage, fraction: seen.append((stage, fraction)))
    table = result.table
    assert {c.sam_model for c in table.combinations} == {"vit_b", "medsam"}
    assert len(table.combinations) == 2 * 16 and table.stats["sam_encoder_runs"] == 8
    assert table.combinations[0].sam_model == "vit_b"  # the pipeline's is the defaults'
    assert table.sam_checkpoints == {"vit_b": tiny_pipeline.config.sam_checkpoint,
                                     "medsam": None}
    # P* was made with vit_b: only vit_b columns reach 1 on every case
    perfect = {table.combinations[j].sam_model for j in np.flatnonzero(
        (table.values == 1.0).all(axis=0))}
    assert perfect == {"vit_b"} and result.config.sam_model == "vit_b"
    fractions = [f for _, f in seen]
    assert fractions == sorted(fractions) and seen[-1] == ("done", 1.0)
    assert any("SAM encoder (medsam)" in stage for stage, _ in seen)
    def stop_at_case_2() -> bool:
        return any(stage.startswith("case 2/") for stage, _ in progress_seen)

    progress_seen: list = []
    with pytest.raises(CancelledError):
        calibrate(tiny_pipeline, cases, SPACE, folds=2, should_stop=stop_at_case_2,
                  progress=lambda stage, fraction: progress_seen.append((stage, fraction)))
    assert not any(stage.startswith("case 3/") for stage, _ in progress_seen)


def test_too_few_cases_say_what_they_need_before_any_work():
    from napari_medclipsam.core.pipeline import ZeroShotPipeline

    pipe = ZeroShotPipeline(PipelineConfig(clip_model="local-dir:/nonexistent"))
    cases = [CalibrationCase(f"c{i}", im, np.zeros((64, 64), bool), (PROMPT,))
             for i, im in enumerate(_images(3))]
    with pytest.raises(InputError) as err:
        calibrate(pipe, cases)
    assert str(err.value) == ("calibrate needs at least 5 corrected cases for 5-fold "
                              "cross-validation; found 3. Correct more cases or pass "
                              "--folds 3.")
    with pytest.raises(InputError, match="found 1. Correct more cases.$"):
        calibrate(pipe, cases[:1], folds=2)


def _synthetic_table(values, names=None) -> DiceTable:
    """A DiceTable of given values; column j differs from the defaults in j settings
    (top_k = j + 1 for j >= 1, plus the layer for j >= 2)."""
    combos = [Combination(0, "m2ib", 7 if j < 2 else 9, 0.1, "otsu", 0.0, j + 1, "single", 0,
                          "boxes", "vit_b") for j in range(values.shape[1])]
    names = names or tuple(f"case{i:02d}" for i in range(values.shape[0]))
    return DiceTable(tuple(names), combos, np.asarray(values, float), (None,), PipelineConfig())


def test_cross_validation_is_reproducible_prefers_defaults_on_ties_and_warns_on_noise():
    rng = np.random.default_rng(0)
    values = rng.uniform(0.5, 0.9, (10, 3))
    values[:, 1] = values[:, 0] + 0.05  # better than the defaults by 0.05 on every case
    values[:, 2] = values[:, 1]  # ties column 1 everywhere: 1 is nearer the defaults
    table = _synthetic_table(values)
    a, b = cross_validate(table, 5, seed=3), cross_validate(table, 5, seed=3)
    assert [f.test for f in a.folds] == [f.test for f in b.folds]
    assert all(f.chosen == 1 for f in a.folds) and table.best() == 1
    # the same cases given in another order: the same folds (split by name)
    order = rng.permutation(10)
    shuffled = _synthetic_table(values[order], [table.names[i] for i in order])
    c = cross_validate(shuffled, 5, seed=3)
    assert [f.test for f in c.folds] == [f.test for f in a.folds]
    assert c.tuned_dice == pytest.approx(a.tuned_dice)
    assert a.mean_gain == pytest.approx(0.05) and a.warning is None
    # the warning reads the per-fold gains: noise when the mean is not above 2 standard errors
    def cv_of(gains):
        folds = tuple(Fold(k, (), (), 0, 0.0, 0.7 + g, 0.7) for k, g in enumerate(gains))
        return CrossValidation(folds, 0, np.zeros(1), np.zeros(1))

    steady = cv_of([0.04, 0.05, 0.06, 0.05, 0.05])
    assert steady.gain_se == pytest.approx(0.01 / np.sqrt(10)) and steady.warning is None
    lucky = cv_of([0.2, 0.0, -0.01, 0.0, 0.01])  # one fold carries the gain
    assert lucky.mean_gain == pytest.approx(0.04) and lucky.mean_gain < 2 * lucky.gain_se
    assert "within the folds' noise" in lucky.warning and "+0.040 Dice" in lucky.warning
    worse = cv_of([-0.02, 0.01, -0.03, 0.0, -0.01])
    assert "did not beat the defaults" in worse.warning and "-0.010" in worse.warning


# --------------------------------------------------------------------------- CLI


def _write_cases(folder, images, masks=None, names=None):
    from napari_medclipsam.core.io import write_mask_png

    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    import imageio.v3 as iio

    names = names or [f"case{i}" for i in range(len(images))]
    for i, (name, im) in enumerate(zip(names, images, strict=True)):
        iio.imwrite(folder / "images" / f"{name}.png", im)
        if masks is not None:
            write_mask_png(folder / "masks" / f"{name}.png", masks[i])
    return folder / "images", folder / "masks"


def test_cli_preset_reproduces_the_chosen_settings_in_segment(model_flags, tiny_pipeline,
                                                              tmp_path, capsys):
    from napari_medclipsam.core.evaluate import read_mask

    images = _images(5, seed=1)
    cases = _corrected(tiny_pipeline, images)
    img_dir, mask_dir = _write_cases(tmp_path, images, [c.mask for c in cases])
    (img_dir / "extra.png").write_bytes((img_dir / "case0.png").read_bytes())  # no mask
    (img_dir / "broken.png").write_bytes(b"not a png")
    (mask_dir / "broken.png").write_bytes((mask_dir / "case0.png").read_bytes())
    preset = tmp_path / "out" / "preset.json"
    args = ["calibrate", "--images", str(img_dir), "--masks", str(mask_dir), "--prompt",
            PROMPT, "-o", str(preset), "--folds", "3", *GRID_FLAGS, *model_flags]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert "extra.png: no mask named extra" in err and "broken.png:" in err
    assert "Calibrating on 5 corrected case(s)" in err
    assert "Chosen: m2ib layer 1" in out and "top-2, per_component boxes" in out
    data = json.loads(preset.read_text())
    assert data["prompt"] == [PROMPT] and data["calibration"]["tuned_on"] == 5
    assert sorted(data["calibration"]["cases"]) == [f"case{i}" for i in range(5)]
    cv = data["calibration"]["cross_validated"]
    assert cv["tuned_dice"] > cv["default_dice"]
    for suffix in ("folds.csv", "table.csv", "report.json"):
        assert (tmp_path / "out" / f"preset.{suffix}").stat().st_size > 0
    assert (tmp_path / "out" / "preset.folds.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    folds = (tmp_path / "out" / "preset.folds.csv").read_text().splitlines()
    assert folds[0].startswith("fold,") and len(folds) == 1 + 3 + 2
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "preset.folds.csv", "preset.folds.png", "preset.json", "preset.report.json",
        "preset.table.csv"]
    # segment --config PRESET.json reproduces the corrections (P*'s masks)
    seg = tmp_path / "seg"
    assert main(["segment", str(img_dir / "case0.png"), str(img_dir / "case3.png"),
                 "--config", str(preset), "--prompt", PROMPT, "-o", str(seg)]) == 0
    for i in (0, 3):
        assert (read_mask(seg / "masks" / f"case{i}.png") == cases[i].mask).all()
    manifest = json.loads((seg / "manifest.json").read_text())
    assert manifest["config"]["saliency"]["layer"] == 1
    assert manifest["config"]["coarse"]["top_k"] == 2
    # never overwritten without --overwrite
    before = preset.read_bytes()
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "already exists; pass --overwrite" in err and len(err.strip().splitlines()) == 1
    assert preset.read_bytes() == before


def test_cli_dataset_uses_only_corrected_cases(model_flags, tiny_pipeline, tmp_path, capsys):
    from napari_medclipsam.nnunet.export import ExportCase, export_dataset

    images = _images(6, seed=2)
    cases = _corrected(tiny_pipeline, images)
    export = [ExportCase(c.name, c.image, c.mask.astype(np.uint8), corrected=i < 4)
              for i, c in enumerate(cases)]
    result = export_dataset(export, tmp_path / "raw", 7, "Disks", verify=False)
    preset = tmp_path / "p.json"
    # no --prompt: the prompt is chosen among candidates (the random tiny CLIP's maps for the
    # two are alike, so this checks the plumbing: both tried, one chosen, written as prompt)
    assert main(["calibrate", "--dataset", str(result.folder), "--candidate-prompt",
                 "a square", "--candidate-prompt", PROMPT, "-o", str(preset), "--folds", "2",
                 *GRID_FLAGS, *model_flags]) == 0
    err = capsys.readouterr().err
    assert "4 corrected case(s) used; 2 uncorrected (zero-shot) case(s) skipped" in err
    data = json.loads(preset.read_text())
    record = data["calibration"]
    assert sorted(record["cases"]) == ["case0", "case1", "case2", "case3"]
    assert record["tuned_on"] == 4 and record["folds"] == 2
    assert record["grid"]["prompts"] == ["a square", PROMPT]
    assert data["prompt"] in (["a square"], [PROMPT]) and record["prompt"] == data["prompt"]
    assert record["in_sample_dice"]["tuned"] == 1.0
    rows = (tmp_path / "p.table.csv").read_text().splitlines()[1:]
    assert {row.split(",")[1] for row in rows} == {"a square", PROMPT} and len(rows) == 32


@pytest.mark.parametrize("extra, message", [
    (["--layers", "7,x"], "--layers '7,x': every value must be a whole number"),
    (["--sam-models", "vit_b,sam9"], "unknown SAM backend 'sam9'"),
    (["--box-modes", "diagonal"], "--box-modes must be among single, per_component"),
    (["--dataset", "somewhere"], "Give --dataset, or --images and --masks, not both"),
    (["--method", "salip"], "leave out --method salip"),
    (["-o", "preset.txt"], "give a name ending in .json"),
])
def test_cli_flag_mistakes_are_one_line(tmp_path, capsys, extra, message):
    images, masks = tmp_path / "i", tmp_path / "m"
    images.mkdir(), masks.mkdir()
    args = ["calibrate", "--images", str(images), "--masks", str(masks), "--prompt", PROMPT,
            "-o", str(tmp_path / "p.json"), *extra]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_cli_too_few_cases_is_one_line_before_models_load(model_flags, tmp_path, capsys):
    images = _images(3)
    img_dir, mask_dir = _write_cases(tmp_path, images, [np.zeros((64, 64), bool)] * 3)
    assert main(["calibrate", "--images", str(img_dir), "--masks", str(mask_dir), "--prompt",
                 PROMPT, "-o", str(tmp_path / "p.json"), *model_flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("medclipsam calibrate: error: calibrate needs at least 5 corrected "
                       "cases for 5-fold cross-validation; found 3. Correct more cases or "
                       "pass --folds 3.")
    assert not any("checking models" in line for line in err)
    assert not (tmp_path / "p.json").exists()
