"""SaLIP in the "Text-prompt segmentation" dock: the Method field, SaLIP's Advanced fields,
and its layers (retrieval map, proposals, retrieved boxes editable live), on the tiny
random-weight models, with the dock opened from the Plugins menu.

Needs a display with OpenGL (pytest-xvfb, or ``xvfb-run -a``).
"""

import dataclasses
import json

import numpy as np
import pytest

from napari_medclipsam._widgets.segment_controller import describe_settings
from napari_medclipsam.core.config import PipelineConfig, SalipConfig

PROMPT = "a disk"


@pytest.fixture(autouse=True)
def settings_dir(tmp_path, monkeypatch):
    """Widget settings go to a temporary folder, never to the user's config folder."""
    folder = tmp_path / "settings"
    monkeypatch.setenv("MEDCLIPSAM_CONFIG_DIR", str(folder))
    return folder


def _image(h=64, w=64, seed=0):
    rng = np.random.default_rng(seed)
    img = (40 + 10 * rng.standard_normal((h, w))).clip(0, 255).astype(np.uint8)
    img[12:30, 18:42] = 220
    return img


def _dock(viewer, pipeline=None):
    """Plugins > Text-prompt segmentation, then (tests only) the tiny models."""
    pytest.importorskip("qtpy.QtWidgets", exc_type=ImportError)
    from napari_helpers import SEGMENT, dock

    w = dock(viewer, SEGMENT)
    if pipeline is not None:
        w.set_pipeline(pipeline)
    return w


def _choose(combo, value):
    index = combo.findData(value)
    assert index >= 0, value
    combo.setCurrentIndex(index)


def _salip(w, area_cap_percent=100.0):
    """Method: SaLIP, with a generator the tiny random SAM proposes something with: a 4x4
    grid on the image alone, every proposal kept (thresholds 0, no box NMS)."""
    _choose(w.chain_combo, "salip")
    w.salip_points_spin.setValue(4)
    w.salip_layers_spin.setValue(0)
    w.salip_iou_spin.setValue(0.0)
    w.salip_stability_spin.setValue(0.0)
    w.salip_box_nms_spin.setValue(1.0)
    w.salip_area_spin.setValue(area_cap_percent)


def _run(w, qtbot, prompt=PROMPT):
    w.prompt_edit.setPlainText(prompt)
    w.run_button.click()
    qtbot.waitUntil(lambda: not w.running, timeout=120_000)


def _name(kind):
    return f"{kind} [{PROMPT}]"


@pytest.fixture
def widget(make_napari_viewer, tiny_pipeline, qtbot):
    viewer = make_napari_viewer()
    viewer.add_image(_image(), name="scan")
    return _dock(viewer, tiny_pipeline)


def test_salip_run_shows_retrieval_map_proposals_and_editable_boxes(widget, qtbot,
                                                                    settings_dir, monkeypatch):
    from napari.layers import Image, Labels

    w, viewer = widget, widget.viewer
    _salip(w)
    line = w.settings_label.text()
    assert "'scan' · SaLIP · 4 points/side · IoU > 0, stability > 0 · area cap 100%" in line
    _run(w, qtbot)
    run = w.controller.state.run
    assert run.method == "salip"
    config = w.controller.pipeline.config
    assert config.method == "salip"
    assert (config.salip.points_per_side, config.salip.crop_n_layers) == (4, 0)
    assert (config.salip.area_cap, config.salip.top_k) == (1.0, 1)
    result = run.result
    salip = result.extra["salip"]
    proposals, scores, retrieved = salip["proposals"], salip["scores"], salip["retrieved"]
    assert result.found and len(proposals) > 1 and len(retrieved) == 1, w.last_status
    assert "retrieved by CLIP (score" in w.last_status and "Done in" in w.last_status
    assert f"{scores[retrieved[0]]:.1f}" in w.last_status

    # the retrieval map in the saliency's place
    assert _name("saliency") not in viewer.layers
    retrieval = viewer.layers[_name("retrieval map")]
    assert isinstance(retrieval, Image) and retrieval.colormap.name == "inferno"
    np.testing.assert_array_equal(retrieval.data, result.saliency)
    assert retrieval.data.max() == pytest.approx(1.0)
    assert "retrieval map [" not in " ".join(
        w.image_combo.itemText(i) for i in range(w.image_combo.count()))

    # every proposal one label, smaller ones on top, CLIP's scores as features
    layer = viewer.layers[_name("proposals")]
    assert isinstance(layer, Labels) and layer.visible
    data = np.asarray(layer.data)
    features = layer.features
    assert len(features) == len(proposals)
    np.testing.assert_array_equal(features["index"], np.arange(1, len(proposals) + 1))
    np.testing.assert_allclose(features["score"], scores)
    np.testing.assert_array_equal(features["area"], [p.area for p in proposals])
    ranks = np.asarray(features["retrieved_rank"])
    assert ranks[retrieved[0]] == 1 and (ranks > 0).sum() == 1
    assert set(np.unique(data)) - {0} <= set(range(1, len(proposals) + 1))
    covered = np.any([p.mask for p in proposals], axis=0)
    np.testing.assert_array_equal(data > 0, covered)
    areas = np.array([p.area for p in proposals])
    for value in np.unique(data[data > 0]):
        where = data == value
        assert proposals[value - 1].mask[where].all()
        for p in proposals:  # no smaller proposal lies under a shown one
            assert not (p.area < areas[value - 1] and (p.mask & where).any())
    w.proposals_check.setChecked(False)
    assert not layer.visible
    w.proposals_check.setChecked(True)
    assert layer.visible

    # the retrieved box, SAM's mask and the coarse mask (the retrieved proposal)
    best = proposals[retrieved[0]]
    boxes = viewer.layers[_name("boxes")]
    assert len(boxes.data) == 1 and boxes.visible
    rect = np.asarray(boxes.data[0])
    x0, y0, x1, y1 = best.box
    np.testing.assert_allclose(rect.min(axis=0), [y0, x0])
    np.testing.assert_allclose(rect.max(axis=0), [y1, x1])
    sam = viewer.layers[_name("SAM mask")]
    np.testing.assert_array_equal(sam.data > 0, result.mask)
    np.testing.assert_array_equal(viewer.layers[_name("coarse mask")].data > 0, best.mask)

    # the settings saved after the run record the method and SaLIP's parameters
    saved = json.loads((settings_dir / "segment_widget.json").read_text())
    assert saved["config"]["method"] == "salip"
    assert saved["config"]["salip"]["points_per_side"] == 4
    assert saved["config"]["salip"]["area_cap"] == 1.0

    # moving the box re-runs SAM's decoder alone, with the new box
    pipe = w.controller.pipeline
    encodes = pipe.session.encoder_calls
    calls = []
    original = pipe.refine

    def spy(rgb, prompts):
        mask = original(rgb, prompts)
        calls.append((prompts, mask))
        return mask

    monkeypatch.setattr(pipe, "refine", spy)
    boxes.data = [np.array([[8.0, 14.0], [8.0, 46.0], [34.0, 46.0], [34.0, 14.0]])]
    qtbot.waitUntil(lambda: w.refine_count == 1, timeout=10_000)
    assert len(calls) == 1
    prompts, mask = calls[0]
    np.testing.assert_allclose(prompts.boxes, [[14, 8, 46, 34]])
    assert pipe.session.encoder_calls == encodes
    np.testing.assert_array_equal(sam.data > 0, mask)
    assert "SAM re-run from 1 box(es)" in w.last_status

    # back to MedCLIP-SAMv2: its run replaces SaLIP's layers of the target
    _choose(w.chain_combo, "medclipsamv2")
    assert w.proposals_check.isEnabled()  # the run on screen is still SaLIP's
    _run(w, qtbot)
    assert w.controller.state.run.method == "medclipsamv2", w.last_status
    assert _name("saliency") in viewer.layers
    assert _name("retrieval map") not in viewer.layers
    assert _name("proposals") not in viewer.layers
    assert not w.proposals_check.isEnabled()


def test_picking_salip_greys_out_medclipsamv2_fields_and_back(widget):
    w = widget
    assert w.chain_combo.currentText() == "MedCLIP-SAMv2"
    assert w.layer_spin.isEnabled() and not w.salip_points_spin.isEnabled()
    assert "SaLIP only" in w.salip_points_spin.toolTip()
    assert not w.proposals_check.isEnabled()
    w.topk_spin.setValue(0)  # MedCLIP-SAMv2: "all" regions
    assert w.topk_spin.text() == "all"

    _choose(w.chain_combo, "salip")
    assert w.chain_combo.currentText() == "SaLIP"
    for field in (w.layer_spin, w.beta_spin, w.steps_spin, w.saliency_combo,
                  w.method_combo):
        assert not field.isEnabled()
        assert field.toolTip().startswith("MedCLIP-SAMv2 only: not used while Method is SaLIP")
    for field in (w.eta_spin, w.mode_combo, w.box_mode_combo):  # the VLSM's mask uses them
        assert not field.isEnabled()
        assert field.toolTip().startswith(
            "MedCLIP-SAMv2 and VLSM only: not used while Method is SaLIP")
    for field in (w.salip_points_spin, w.salip_iou_spin, w.salip_stability_spin,
                  w.salip_area_spin, w.salip_crop_combo, w.topk_spin, w.proposals_check):
        assert field.isEnabled()
    assert "Koleilat" in w.chain_combo.toolTip() and "Aleem" in w.chain_combo.toolTip()
    assert w.topk_spin.value() == 1 and w.topk_spin.text() == "1"  # SaLIP's own top-k
    w.topk_spin.setValue(2)
    assert w.steps_check.text() == "Show retrieval map and coarse mask"
    config = w.build_config()
    assert config.method == "salip" and config.salip.top_k == 2
    assert config.coarse.top_k is None  # the other method's top-k is kept
    assert w.settings_label.text().endswith("mask crops, best 2 · SAM vit_b · custom settings")

    _choose(w.chain_combo, "medclipsamv2")
    assert w.layer_spin.isEnabled() and w.layer_spin.toolTip().startswith("Which block")
    assert not w.salip_area_spin.isEnabled() and not w.proposals_check.isEnabled()
    assert w.topk_spin.text() == "all"
    config = w.build_config()
    assert config.method == "medclipsamv2" and config.coarse.top_k is None
    assert config.salip.top_k == 2
    assert "SaLIP" not in w.settings_label.text()


def test_method_and_salip_settings_round_trip(make_napari_viewer, qtbot, tmp_path):
    """Save settings... records the method and SaLIP's parameters; Load settings... (a new
    dock) shows them again; a preset keeps the method."""
    viewer = make_napari_viewer()
    viewer.add_image(_image(), name="scan")
    w = _dock(viewer)
    _choose(w.chain_combo, "salip")
    w.salip_area_spin.setValue(35.0)
    _choose(w.salip_crop_combo, "box")
    w.salip_points_spin.setValue(8)
    path = tmp_path / "run.json"
    w.save_run(path)
    config = json.loads(path.read_text())["config"]
    assert config["method"] == "salip"
    assert config["salip"]["area_cap"] == 0.35 and config["salip"]["crop"] == "box"
    assert config["salip"]["points_per_side"] == 8

    w.preset_combo.setCurrentText("breast tumor (ultrasound)")  # MedCLIP-SAMv2's settings
    assert w.chosen_method() == "salip" and w.salip_area_spin.value() == 35.0
    assert w.layer_spin.value() == 9 and not w.layer_spin.isEnabled()
    assert "SaLIP · 8 points/side" in w.settings_label.text()

    _choose(w.chain_combo, "medclipsamv2")
    w.load_run(path)
    assert w.chosen_method() == "salip" and w.salip_area_spin.value() == 35.0
    assert w.build_config().salip == SalipConfig(points_per_side=8, area_cap=0.35,
                                                 crop="box")


def test_nothing_under_the_area_cap_is_reported(widget, qtbot):
    w, viewer = widget, widget.viewer
    _salip(w, area_cap_percent=0.01)  # 0.41 pixels of 64x64: every proposal is larger
    _run(w, qtbot)
    result = w.controller.state.run.result
    assert not result.found
    assert w.last_status.startswith("Done in") and "Nothing found: all " in w.last_status
    assert "Try a larger area cap" in w.last_status
    assert result.extra["salip"]["n_generated"] > 0 and not result.extra["salip"]["proposals"]
    proposals = viewer.layers[_name("proposals")]
    assert not np.asarray(proposals.data).any() and len(proposals.features) == 0
    assert len(viewer.layers[_name("boxes")].data) == 0
    assert not np.asarray(viewer.layers[_name("SAM mask")].data).any()
    assert viewer.layers[_name("retrieval map")].visible  # shown: it says why
    assert w.run_button.isEnabled()


def test_all_slices_in_salip_mode(make_napari_viewer, tiny_pipeline, qtbot):
    """All slices runs SaLIP on every slice: the retrieval map, coarse and SAM masks become
    3-D layers; a single-slice run's proposals and an earlier saliency are removed."""
    viewer = make_napari_viewer()
    vol = np.stack([_image(seed=s) for s in range(3)])
    viewer.add_image(vol, name="vol")
    w = _dock(viewer, tiny_pipeline)
    _run(w, qtbot)  # MedCLIP-SAMv2 on the slice on screen
    assert _name("saliency") in viewer.layers
    _salip(w)
    _run(w, qtbot)  # SaLIP on that slice
    assert _name("proposals") in viewer.layers and _name("saliency") not in viewer.layers
    w.all_slices_check.setChecked(True)
    assert "all 3 slices · SaLIP" in w.settings_label.text()
    _run(w, qtbot)
    run = w.controller.state.run
    assert run.method == "salip" and run.volume is not None, w.last_status
    assert f"something found on {len(run.volume.found_slices)} of 3 slices" in w.last_status
    assert run.volume.found_slices  # the tiny SAM proposes on every slice
    retrieval = viewer.layers[_name("retrieval map")]
    assert retrieval.data.shape == vol.shape
    np.testing.assert_array_equal(retrieval.data, run.volume.saliency)
    np.testing.assert_array_equal(viewer.layers[_name("SAM mask")].data > 0, run.volume.mask)
    assert _name("proposals") not in viewer.layers and _name("saliency") not in viewer.layers


def test_describe_settings_in_salip_mode():
    config = dataclasses.replace(PipelineConfig(sam_model="vit_b"), method="salip")
    assert describe_settings(config, where="'scan'") == (
        "'scan' · SaLIP · 16 points/side, 1 crop layer · IoU > 0.5, stability > 0.5 · "
        "area cap 60% · mask crops, best 1 · SAM vit_b · custom settings")
    small = dataclasses.replace(config, salip=SalipConfig(area_cap=1e-4, crop_n_layers=0,
                                                           crop="box", top_k=2))
    assert " · 16 points/side · " in describe_settings(small)
    assert " · area cap 0.01% · box crops, best 2 · " in describe_settings(small)


def test_salip_setting_errors_name_their_field():
    from napari_medclipsam._widgets.segment_controller import gui_message

    for make, field in ((lambda: PipelineConfig(method="sam"), "(field: Method)"),
                        (lambda: SalipConfig(area_cap=2.0),
                         "(field: Advanced > Area cap (% image))"),
                        (lambda: SalipConfig(points_per_side=0),
                         "(field: Advanced > Points per side)")):
        with pytest.raises(ValueError) as err:
            make()
        assert gui_message(str(err.value)).endswith(field)
