"""Named presets (the paper's tasks, after the authors' scripts and after the paper) and
their use from the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_medclipsam.cli import build_parser, main
from napari_medclipsam.cli.segment import config_from_args
from napari_medclipsam.core.config import PipelineConfig, SaliencyConfig
from napari_medclipsam.core.errors import InputError
from napari_medclipsam.core.presets import (
    PRESETS,
    TABLE1_DSC,
    apply_preset,
    get_preset,
    list_presets,
)

TASKS = ("breast-us", "brain-mri", "lung-xray", "lung-ct")
# What the authors' scripts pass (zeroshot_scripts/*.sh, zeroshot.sh defaults for lungs).
SCRIPTS = {"breast-us": (9, 1.0, 12), "brain-mri": (9, 2.0, 12),
           "lung-xray": (7, 0.1, 42), "lung-ct": (7, 0.1, 42)}


def test_one_code_and_one_paper_preset_per_table1_task():
    names = [p.name for p in list_presets()]
    assert names == [n for t in TASKS for n in (t, f"{t}-paper")]
    assert set(TABLE1_DSC) == set(TASKS)
    for name in names:
        assert name == name.lower() and " " not in name and "_" not in name


@pytest.mark.parametrize("name", list(PRESETS))
def test_each_preset_resolves_to_the_scripts_settings(name):
    preset = get_preset(name)
    task = name.removesuffix("-paper")
    cfg = apply_preset(name)
    assert isinstance(cfg, PipelineConfig)
    layer, beta, seed = SCRIPTS[task]
    assert (cfg.saliency.layer, cfg.saliency.beta, cfg.saliency.seed) == (layer, beta, seed)
    assert cfg.saliency.readout == "last_forward"
    assert cfg.prompts.seed == seed
    assert cfg.sam_model == "auto" and cfg.prompts.mode == "boxes"  # ViT-H on a GPU
    assert cfg.sam.keep_largest == 0 and cfg.sam.multimask_output is False
    lungs = task.startswith("lung")
    assert cfg.coarse.top_k == (2 if lungs else 1)
    assert cfg.prompts.box_mode == ("per_component" if lungs else "single")
    if preset.source == "code":
        assert (cfg.coarse.method, cfg.coarse.kmeans_size, cfg.coarse.rank_by) == (
            "kmeans", 256, "area")
    else:
        assert (cfg.coarse.method, cfg.coarse.rank_by) == ("otsu", "confidence")
    assert cfg.coarse.eta_c == 0.0 and cfg.coarse.min_area == 0
    # What it reproduces, in words, with the Table 1 number.
    assert f"{TABLE1_DSC[task][0]:.2f}%" in preset.description
    assert preset.table1_dsc == TABLE1_DSC[task]
    # A prompt suggestion for the widget's text box (one prompt per line).
    assert preset.prompts and preset.prompt_text.splitlines() == list(preset.prompts)
    # The settings it lists are the ones it applies.
    s = preset.settings()
    assert all(getattr(cfg.saliency, k) == v for k, v in s["saliency"].items())
    assert all(getattr(cfg.coarse, k) == v for k, v in s["coarse"].items())
    assert f"layer {layer}" in preset.summary()


def test_a_preset_keeps_what_it_does_not_set():
    base = PipelineConfig(clip_model="local-dir:/models/tuned", device="cpu",
                          sam_checkpoint="/models/sam.pth",
                          saliency=SaliencyConfig(steps=3, batch_size=2))
    cfg = apply_preset("brain-mri", base)
    assert (cfg.clip_model, cfg.device, cfg.sam_checkpoint) == (
        "local-dir:/models/tuned", "cpu", "/models/sam.pth")
    assert (cfg.saliency.steps, cfg.saliency.batch_size) == (3, 2)
    assert (cfg.saliency.layer, cfg.saliency.beta) == (9, 2.0)


def test_unknown_preset_names_the_valid_ones():
    with pytest.raises(InputError, match="Unknown preset 'breast'.*breast-us, breast-us-paper"):
        apply_preset("breast")


# --------------------------------------------------------------------------- CLI


def _args(*flags):
    return build_parser().parse_args(["segment", "x.png", "-o", "out", *flags])


def test_cli_list_presets_needs_no_inputs(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["segment", "--list-presets"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    for preset in list_presets():
        assert preset.name in lines  # each name on a line of its own
        assert preset.description in out and preset.summary() in out
    assert "77.76%" in out and "80.38%" in out


def test_cli_flags_given_override_the_preset_and_defaults_do_not():
    cfg = config_from_args(_args("--preset", "breast-us", "--beta", "0.5"))
    assert (cfg.saliency.layer, cfg.saliency.beta, cfg.saliency.seed) == (9, 0.5, 12)
    assert cfg.coarse.method == "kmeans" and cfg.sam_model == "auto"
    # No flags: every preset value survives the parser's defaults.
    assert config_from_args(_args("--preset", "lung-ct")) == apply_preset("lung-ct")
    cfg = config_from_args(_args("--preset", "lung-xray", "--top-k", "1", "--box-mode",
                                 "single", "--readout", "final", "--sam-model", "vit_b"))
    assert (cfg.coarse.top_k, cfg.prompts.box_mode, cfg.saliency.readout, cfg.sam_model) == (
        1, "single", "final", "vit_b")
    assert cfg.saliency.layer == 7 and cfg.coarse.method == "kmeans"
    # Without a preset the defaults hold, and --readout alone works.
    assert config_from_args(_args()) == PipelineConfig()
    assert config_from_args(_args("--readout", "final")).saliency.readout == "final"


def test_cli_preset_applies_over_a_saved_config(tmp_path):
    saved = PipelineConfig(clip_model="local-dir:/m", saliency=SaliencyConfig(steps=4))
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"config": saved.to_dict()}))
    cfg = config_from_args(_args("--config", str(path), "--preset", "brain-mri-paper"))
    assert cfg.clip_model == "local-dir:/m" and cfg.saliency.steps == 4
    assert (cfg.saliency.layer, cfg.coarse.method) == (9, "otsu")


def test_cli_unknown_preset_is_one_line(capsys):
    assert main(["segment", "x.png", "-o", "out", "--prompt", "x", "--preset", "lungs"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "Unknown preset 'lungs'" in err and "lung-xray" in err


def test_cli_run_with_a_preset_records_it(tiny_clip_dir, tiny_sam_checkpoint, monkeypatch,
                                          tmp_path):
    """A real (tiny-model) run: the preset's KMeans coarse mask and per-component boxes run,
    the flags given win, and the manifest names the preset and holds the resolved config."""
    import imageio.v3 as iio
    from tiny_sam import build_tiny_sam

    from napari_medclipsam.core import models

    monkeypatch.setattr(models, "build_sam", lambda name: build_tiny_sam())
    monkeypatch.setenv("MEDCLIPSAM_HOME", str(tmp_path / "cache"))
    models.clear_model_cache()
    yy, xx = np.mgrid[:40, :48]
    image = np.where(((yy - 20) ** 2 + (xx - 12) ** 2 < 36) | ((yy - 20) ** 2 + (xx - 36) ** 2
                                                                < 36), 200, 40).astype(np.uint8)
    iio.imwrite(tmp_path / "case.png", image)
    out = tmp_path / "out"
    try:
        rc = main(["segment", str(tmp_path / "case.png"), "--prompt", "both lungs", "-o",
                   str(out), "--preset", "lung-xray", "--clip-model",
                   f"local-dir:{tiny_clip_dir}", "--sam-model", "vit_b", "--sam-checkpoint",
                   str(tiny_sam_checkpoint), "--device", "cpu", "--steps", "2",
                   "--batch-size", "2", "--layer", "2"])
    finally:
        models.clear_model_cache()
    assert rc == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["preset"] == "lung-xray"
    cfg = PipelineConfig.from_dict(manifest["config"])
    assert (cfg.saliency.layer, cfg.saliency.steps, cfg.saliency.seed) == (2, 2, 42)
    assert (cfg.coarse.method, cfg.coarse.top_k, cfg.prompts.box_mode) == (
        "kmeans", 2, "per_component")
    prompts = json.loads((out / "prompts" / "case.json").read_text())
    assert len(prompts["boxes"]) == len(prompts["components"]) <= 2
