"""VLSM mode in the "Text-prompt segmentation" dock: the Method entry, the VLSM box (Model,
the line saying what it names, Threshold, Refine with SAM), the probability and mask layers,
SAM loaded only to refine (or on the first box edit), the settings line and saved settings.

Everything is opened as a person does: a PNG through ``viewer.open``, the dock from the
Plugins menu (no injected pipeline: the models come from the fields), and a tiny random
CLIPSeg (tests/tiny_clipseg.py) as ``local-dir:``. SAM, where a test needs it, is the tiny
SAM checkpoint in the SAM fields with segment-anything's builder swapped for the tiny one.
Every layer is compared with what ``ZeroShotPipeline(config, vlsm=load_vlsm)`` computes for
the same image, prompt and settings.

Needs a display with OpenGL (pytest-xvfb, or ``xvfb-run -a``).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from napari_medclipsam._widgets.segment_controller import describe_settings, gui_message
from napari_medclipsam.core.config import PipelineConfig, VlsmConfig

PROMPT = "a square"


@pytest.fixture(autouse=True)
def settings_dir(tmp_path, monkeypatch):
    """Widget settings go to a temporary folder, never to the user's config folder."""
    folder = tmp_path / "settings"
    monkeypatch.setenv("MEDCLIPSAM_CONFIG_DIR", str(folder))
    return folder


def _image(seed=0, h=64, w=64):
    rng = np.random.default_rng(seed)
    img = (40 + 10 * rng.standard_normal((h, w))).clip(0, 255).astype(np.uint8)
    img[12:30, 18:42] = 220
    return img


def _name(kind, target=PROMPT):
    return f"{kind} [{target}]"


def _choose(combo, value):
    index = combo.findData(value)
    assert index >= 0, value
    combo.setCurrentIndex(index)


@pytest.fixture
def sam_loads(monkeypatch):
    """Count SAM loads (``core.models.load_sam``); the real loader builds the tiny SAM."""
    from tiny_sam2 import tiny_builder

    from napari_medclipsam.core import models

    calls = []
    real = models.load_sam

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(models, "build_sam", tiny_builder)
    monkeypatch.setattr(models, "load_sam", counting)
    models.clear_model_cache()
    yield calls
    models.clear_model_cache()


@pytest.fixture
def open_scan(make_napari_viewer, tmp_path):
    """A viewer with a real PNG opened as File > Open does, and the dock from the Plugins
    menu; returns the dock."""
    pytest.importorskip("qtpy.QtWidgets", exc_type=ImportError)
    import imageio.v3 as iio
    from napari_helpers import SEGMENT, dock

    path = tmp_path / "scan.png"
    iio.imwrite(path, _image())
    viewer = make_napari_viewer()
    viewer.open(str(path))
    w = dock(viewer, SEGMENT)
    w.device_combo.setCurrentText("cpu")
    return w


def _vlsm(w, model, threshold=0.5, refine=False, sam_checkpoint=None):
    """Method: VLSM with this Model; the tiny SAM in the SAM fields when given."""
    _choose(w.chain_combo, "vlsm")
    w.vlsm_model_edit.setText(model)
    w.vlsm_threshold_spin.setValue(threshold)
    w.vlsm_refine_check.setChecked(refine)
    if sam_checkpoint is not None:
        _choose(w.sam_combo, "vit_b")
        w.checkpoint_edit.setText(str(sam_checkpoint))


def _run(w, qtbot, prompt=PROMPT):
    w.prompt_edit.setPlainText(prompt)
    w.run_button.click()
    qtbot.waitUntil(lambda: not w.running, timeout=120_000)


def _reference(w, prompt=PROMPT):
    """What the chain computes, outside the dock, for the dock's image and settings."""
    from napari_medclipsam.core.pipeline import ZeroShotPipeline
    from napari_medclipsam.vlsm.models import load_vlsm

    config = w.controller.pipeline.config
    pipe = ZeroShotPipeline(config, vlsm=load_vlsm)
    return pipe, pipe.segment(np.asarray(w.viewer.layers["scan"].data), prompt)


def test_vlsm_run_shows_probability_and_mask_and_never_loads_sam(
        open_scan, qtbot, tiny_clipseg_dir, monkeypatch, settings_dir):
    from napari.layers import Image, Labels

    from napari_medclipsam.core import models

    def no_sam(*args, **kwargs):
        raise AssertionError("SAM loaded although Refine with SAM is off")

    monkeypatch.setattr(models, "load_sam", no_sam)
    w, viewer = open_scan, open_scan.viewer
    assert w.vlsm_box.isHidden()
    _vlsm(w, f"local-dir:{tiny_clipseg_dir}")
    assert w.chain_combo.currentText() == "VLSM (CLIPSeg/BiomedCLIPSeg)"
    assert not w.vlsm_box.isHidden()
    assert w.vlsm_info_label.text().startswith(
        f"CLIPSeg weights from {tiny_clipseg_dir.name}, zero-shot")
    for field in (w.layer_spin, w.beta_spin, w.steps_spin, w.saliency_combo, w.method_combo):
        assert not field.isEnabled()
        assert field.toolTip().startswith("MedCLIP-SAMv2 only: not used while Method is VLSM")
    assert not w.salip_area_spin.isEnabled()
    assert w.salip_area_spin.toolTip().startswith("SaLIP only: not used while Method is VLSM")
    assert not w.clip_edit.isEnabled() and "Not used while Method is VLSM" in w.clip_edit.toolTip()
    for field in (w.eta_spin, w.topk_spin, w.mode_combo, w.box_mode_combo, w.sam_combo):
        assert field.isEnabled()
    assert w.steps_check.text() == "Show VLSM probability and coarse mask"
    assert w.settings_label.text() == (
        f"'scan' · VLSM clipseg ({tiny_clipseg_dir.name}) · threshold 0.5, best 1 · SAM "
        "refinement off · custom settings")

    _run(w, qtbot)
    run = w.controller.state.run
    assert run is not None and run.method == "vlsm", w.last_status
    assert "loading VLSM" in [u.stage for u in w.progress_log]
    assert "Done in" in w.last_status and "VLSM mask:" in w.last_status
    pipe, ref = _reference(w)
    assert ref.found

    probability = viewer.layers[_name("VLSM probability")]
    assert isinstance(probability, Image) and probability.colormap.name == "inferno"
    assert probability.blending == "additive"
    np.testing.assert_array_equal(probability.data, ref.saliency)
    mask = viewer.layers[_name("SAM mask")]
    assert isinstance(mask, Labels)
    np.testing.assert_array_equal(np.asarray(mask.data) > 0, ref.mask)
    np.testing.assert_array_equal(viewer.layers[_name("coarse mask")].data, ref.coarse.labels)
    rect = np.asarray(viewer.layers[_name("boxes")].data[0])
    x0, y0, x1, y1 = ref.prompts.boxes[0]
    np.testing.assert_allclose(rect.min(axis=0), [y0, x0])
    np.testing.assert_allclose(rect.max(axis=0), [y1, x1])
    assert _name("saliency") not in viewer.layers
    assert not w.controller.sam_ready and pipe.vlsm_loaded
    # the VLSM's own faithfulness check: its map of the neutral prompt
    assert w.last_faithfulness is not None
    assert w.last_faithfulness.correlation == pytest.approx(ref.faithfulness.correlation)

    # neither dock offers the probability as an image to segment or train on
    images = [w.image_combo.itemText(i) for i in range(w.image_combo.count())]
    assert images == ["scan"]
    from napari_helpers import TRAINING, dock

    training = dock(viewer, TRAINING)
    offered = [training.image_combo.itemText(i) for i in range(training.image_combo.count())]
    assert "scan" in offered and _name("VLSM probability") not in offered

    saved = json.loads((settings_dir / "segment_widget.json").read_text())
    assert saved["config"]["method"] == "vlsm"
    assert saved["config"]["vlsm"] == {"model": f"local-dir:{tiny_clipseg_dir}",
                                       "threshold": 0.5, "refine": False}


def test_box_edit_loads_sam_once_then_refine_gives_sams_mask(
        open_scan, qtbot, tiny_clipseg_dir, tiny_sam_checkpoint, sam_loads):
    """Refine off: no SAM for Run all; the first box edit loads it (in a worker, said in the
    status line) and re-runs SAM from the box; with Refine with SAM the run's mask is SAM's
    on the VLSM mask's box."""
    w, viewer = open_scan, open_scan.viewer
    _vlsm(w, f"local-dir:{tiny_clipseg_dir}", sam_checkpoint=tiny_sam_checkpoint)
    assert w.settings_label.text().endswith("SAM refinement off · custom settings")
    _run(w, qtbot)
    assert w.controller.state.run.method == "vlsm", w.last_status
    assert sam_loads == [] and not w.controller.sam_ready

    boxes = viewer.layers[_name("boxes")]
    boxes.data = [np.array([[8.0, 14.0], [8.0, 46.0], [34.0, 46.0], [34.0, 14.0]])]
    qtbot.waitUntil(lambda: w.running, timeout=10_000)
    assert w.last_status.startswith("Loading SAM for the edited box")
    qtbot.waitUntil(lambda: w.refine_count == 1 and not w.running, timeout=60_000)
    assert len(sam_loads) == 1 and w.controller.sam_ready
    assert "loading SAM" in [u.stage for u in w.progress_log]
    assert w.last_status.startswith("SAM loaded; SAM re-run from 1 box(es)"), w.last_status
    run = w.controller.state.run
    from napari_medclipsam.core.postprocess import Prompts

    edited = Prompts(boxes=np.array([[14.0, 8.0, 46.0, 34.0]], np.float32))
    expected = w.controller.pipeline.refine(run.result.rgb, edited)
    np.testing.assert_array_equal(np.asarray(viewer.layers[_name("SAM mask")].data) > 0,
                                  expected)
    boxes.data = [np.array([[10.0, 16.0], [10.0, 44.0], [30.0, 44.0], [30.0, 16.0]])]
    qtbot.waitUntil(lambda: w.refine_count == 2, timeout=10_000)  # at once, no worker
    assert len(sam_loads) == 1

    w.vlsm_refine_check.setChecked(True)
    assert w.settings_label.text().endswith(
        "SAM refinement from one box · SAM vit_b · custom settings")
    _run(w, qtbot)
    pipe, ref = _reference(w)
    assert ref.found and w.controller.state.run.result.found
    sams = pipe.refine(ref.rgb, ref.prompts)  # SAM's mask from the VLSM mask's box
    np.testing.assert_array_equal(np.asarray(viewer.layers[_name("SAM mask")].data) > 0,
                                  sams)
    np.testing.assert_array_equal(ref.mask, sams)
    np.testing.assert_array_equal(viewer.layers[_name("VLSM probability")].data,
                                  ref.saliency)
    assert "mask of" in w.last_status and "VLSM mask" not in w.last_status


def test_a_missing_or_damaged_model_folder_is_one_line(open_scan, qtbot, tmp_path):
    w, viewer = open_scan, open_scan.viewer
    missing = tmp_path / "no_such_model"
    _vlsm(w, str(missing))
    info = w.vlsm_info_label.text()
    assert info.startswith(f"VLSM model folder not found: {missing}.") and "\n" not in info
    assert w.vlsm_info.error and "#e5534b" in w.vlsm_info_label.styleSheet()
    _run(w, qtbot)
    assert w.last_status.startswith(f"VLSM model folder not found: {missing}.")
    assert "\n" not in w.last_status and "Browse..." in w.last_status
    assert w.run_button.isEnabled() and "error" in w.progress_bar.format()
    assert not any(layer.name.endswith(f"[{PROMPT}]") for layer in viewer.layers)

    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "vlsm.json").write_text("{not json")
    w.vlsm_model_edit.setText(str(damaged))
    assert "not valid JSON" in w.vlsm_info_label.text() and w.vlsm_info.error
    _run(w, qtbot)
    assert "not valid JSON" in w.last_status and "\n" not in w.last_status
    assert w.run_button.isEnabled()


def test_a_trained_folder_shows_its_classes_and_runs(open_scan, qtbot, tiny_clipseg_dir,
                                                     tmp_path, monkeypatch):
    """A model trained for one epoch (train_vlsm): Browse... puts its folder in the Model
    field, the line under it names its architecture, class and validation Dice, the settings
    line its architecture, and Run all uses its decoder."""
    import imageio.v3 as iio
    from qtpy.QtWidgets import QFileDialog

    from napari_medclipsam.vlsm.data import folder_cases
    from napari_medclipsam.vlsm.models import build_vlsm
    from napari_medclipsam.vlsm.train import VlsmTrainConfig, train_vlsm

    rng = np.random.default_rng(0)
    for folder in ("images", "masks"):
        (tmp_path / folder).mkdir()
    for i in range(8):
        img = (40 + 10 * rng.standard_normal((64, 64))).clip(0, 255).astype(np.uint8)
        mask = np.zeros((64, 64), np.uint8)
        y, x = rng.integers(8, 40, 2)
        mask[y:y + 16, x:x + 16] = 1
        img[mask > 0] = 200
        iio.imwrite(tmp_path / "images" / f"case{i}.png", img)
        iio.imwrite(tmp_path / "masks" / f"case{i}.png", mask)
    model = build_vlsm("clipseg", clipseg_model=f"local-dir:{tiny_clipseg_dir}", device="cpu")
    cases = folder_cases(tmp_path / "images", tmp_path / "masks", [PROMPT])
    result = train_vlsm(model, cases, tmp_path / "trained", VlsmTrainConfig(
        prompt_sets=("p1",), epochs=1, batch_size=8, min_epochs=0))

    w = open_scan
    _choose(w.chain_combo, "vlsm")
    monkeypatch.setattr(QFileDialog, "getExistingDirectory",
                        staticmethod(lambda *a, **k: str(tmp_path / "trained")))
    w.vlsm_browse_button.click()
    assert w.vlsm_model_edit.text() == str(tmp_path / "trained")
    assert w.vlsm_info_label.text() == (
        f"CLIPSeg trained on '{PROMPT}' (type it as the prompt) · best validation Dice "
        f"{result.best_dice:.2f} (epoch 1 of 1)")
    assert not w.vlsm_info.error and w.vlsm_info.classes == (PROMPT,)
    assert " · VLSM clipseg (trained) · threshold 0.5, best 1 · " in w.settings_label.text()

    _run(w, qtbot)
    assert w.controller.state.run.method == "vlsm", w.last_status
    assert w.controller.pipeline.vlsm.info["classes"] == [PROMPT]
    _, ref = _reference(w)
    np.testing.assert_array_equal(w.viewer.layers[_name("VLSM probability")].data,
                                  ref.saliency)
    np.testing.assert_array_equal(np.asarray(w.viewer.layers[_name("SAM mask")].data) > 0,
                                  ref.mask)


def test_cancel_and_saved_vlsm_settings(open_scan, qtbot, tiny_clipseg_dir,
                                        make_napari_viewer):
    from napari_helpers import SEGMENT, dock

    w = open_scan
    _vlsm(w, f"local-dir:{tiny_clipseg_dir}", threshold=0.35)
    w.prompt_edit.setPlainText(PROMPT)
    w.run_button.click()
    w.cancel_button.click()  # before the VLSM has loaded: it stops at the next check
    qtbot.waitUntil(lambda: not w.running, timeout=60_000)
    assert w.last_status == "Cancelled; nothing changed.", w.last_status
    assert "cancelled" in w.progress_bar.format()
    assert _name("VLSM probability") not in w.viewer.layers

    w.vlsm_refine_check.setChecked(True)
    w.save_settings()
    fresh = dock(make_napari_viewer(), SEGMENT)
    assert fresh.chosen_method() == "vlsm" and not fresh.vlsm_box.isHidden()
    assert fresh.vlsm_model_edit.text() == f"local-dir:{tiny_clipseg_dir}"
    assert fresh.vlsm_threshold_spin.value() == 0.35 and fresh.vlsm_refine_check.isChecked()
    assert fresh.build_config().vlsm == VlsmConfig(f"local-dir:{tiny_clipseg_dir}", 0.35,
                                                   True)
    _choose(fresh.chain_combo, "medclipsamv2")
    assert fresh.vlsm_box.isHidden() and fresh.clip_edit.isEnabled()
    assert fresh.build_config().vlsm.threshold == 0.35  # kept while another method runs


def test_describe_settings_in_vlsm_mode(tmp_path):
    config = dataclasses.replace(PipelineConfig(sam_model="vit_b"), method="vlsm")
    assert describe_settings(config, where="'scan'") == (
        "'scan' · VLSM clipseg (CIDAS/clipseg-rd64-refined) · threshold 0.5, best 1 · SAM "
        "refinement off · custom settings")
    folder = tmp_path / "busi_model"
    folder.mkdir()
    (folder / "vlsm.json").write_text("{}")
    refined = dataclasses.replace(config, vlsm=VlsmConfig(str(folder), 0.3, refine=True))
    assert describe_settings(refined, vlsm_arch="biomedclipseg") == (
        "VLSM biomedclipseg (busi_model) · threshold 0.3, best 1 · SAM refinement from one "
        "box · SAM vit_b · custom settings")
    assert describe_settings(refined).startswith("VLSM (busi_model) · ")  # arch not read


def test_vlsm_errors_name_their_field():
    with pytest.raises(ValueError) as err:
        VlsmConfig(threshold=1.0)
    assert gui_message(str(err.value)).endswith("(field: VLSM > Threshold)")
    offline = ("Could not download the CLIPSeg model 'CIDAS/clipseg-rd64-refined' (OSError: "
               "offline). Offline: on a connected machine run  hf download "
               "CIDAS/clipseg-rd64-refined --local-dir clipseg  then copy the folder here and "
               "pass  --clipseg-model local-dir:PATH  (or copy a filled cache folder).")
    message = gui_message(offline)
    assert "choose that folder in VLSM > Model (Browse...)" in message
    assert "--clipseg-model" not in message and "hf download" in message


def test_an_injected_pipeline_lends_its_sam_to_the_vlsm(make_napari_viewer, qtbot,
                                                        tiny_pipeline, tiny_clipseg_dir):
    """set_pipeline (tests, a server's own models): VLSM mode runs the Model field's VLSM
    with the given pipeline's SAM; back on MedCLIP-SAMv2 the given pipeline runs again."""
    from napari_helpers import SEGMENT, dock

    viewer = make_napari_viewer()
    viewer.add_image(_image(), name="scan")
    w = dock(viewer, SEGMENT)
    w.set_pipeline(tiny_pipeline)
    _vlsm(w, f"local-dir:{tiny_clipseg_dir}", refine=True)
    assert w.vlsm_model_edit.isEnabled()
    _run(w, qtbot)
    pipe = w.controller.pipeline
    assert pipe is not tiny_pipeline and pipe.sam is tiny_pipeline.sam, w.last_status
    result = w.controller.state.run.result
    assert result.found
    np.testing.assert_array_equal(result.mask, pipe.refine(result.rgb, result.prompts))
    np.testing.assert_array_equal(np.asarray(viewer.layers[_name("SAM mask")].data) > 0,
                                  result.mask)
    _run(w, qtbot)  # the same VLSM model: the same pipeline, its VLSM kept
    assert w.controller.pipeline is pipe

    _choose(w.chain_combo, "medclipsamv2")
    _run(w, qtbot)
    assert w.controller.pipeline is tiny_pipeline
    assert w.controller.state.run.method == "medclipsamv2"
    assert _name("saliency") in viewer.layers and _name("VLSM probability") not in viewer.layers
