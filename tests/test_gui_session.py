"""End to end, the way a person works: File > Open Sample, Plugins > Text-prompt
segmentation, a prompt, Run all, a dragged box (SAM re-runs from the cache), a painted
coarse mask and Boxes from mask, two targets accepted into one label map, then Plugins >
Pseudo-labels & training: export, a tiny training, predict, and the three nnU-Net layers.

Tiny random-weight models (``set_pipeline``): the flow is under test, not the maps.
"""

import json
import math

import imageio.v3 as iio
import numpy as np
import pytest

pytest.importorskip("qtpy.QtWidgets", exc_type=ImportError)

from gui_session import GuiSession, tiny_pipeline  # noqa: E402


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDCLIPSAM_CONFIG_DIR", str(tmp_path / "settings"))
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.delenv(name, raising=False)


def test_a_whole_session_from_the_menus(make_napari_viewer, tiny_clip_dir,
                                        tiny_sam_checkpoint, tmp_path):
    pytest.importorskip("nnunetv2")
    viewer = make_napari_viewer()
    s = GuiSession(viewer, tiny_pipeline(tiny_clip_dir, tiny_sam_checkpoint))
    image = s.open_sample()
    assert image.data.shape == (400, 400)
    w = s.dock_segment()
    assert w.image_combo.currentText() == image.name

    # 1. a prompt and Run all: five aligned layers, the steps before SAM out of the way
    s.run_all("left lung")
    assert "error" not in w.last_status.lower(), w.last_status
    for kind in ("saliency", "coarse mask", "boxes", "points", "SAM mask"):
        assert s.layer(kind, "left lung").data is not None
    assert w.controller.state.run.result.rgb.shape == (400, 400, 3)
    assert [u.stage for u in w.progress_log][-3:] == ["encoding image (SAM)", "SAM mask",
                                                      "done"]
    assert not s.layer("saliency", "left lung").visible
    assert s.layer("SAM mask", "left lung").visible and s.layer("boxes", "left lung").visible

    # 2. drag the box: only SAM's decoder re-runs, from the cached embedding
    encodes = w.controller.pipeline.session.encoder_calls
    s.drag_box("left lung", (100, 60, 300, 190))
    assert w.controller.pipeline.session.encoder_calls == encodes
    assert w.prompts_from_layers().boxes.tolist() == [[60, 100, 190, 300]]

    # 3. paint the coarse mask, press Boxes from mask: one box around the painted region
    coarse = s.layer("coarse mask", "left lung")
    coarse.data = np.zeros_like(coarse.data)
    s.paint(coarse, (slice(120, 280), slice(70, 180)))
    s.boxes_from_mask()
    assert w.prompts_from_layers().boxes.tolist() == [[70, 120, 179, 279]]

    # 4. correct the SAM mask by hand and accept it as target 1
    sam = s.layer("SAM mask", "left lung")
    sam.data = np.zeros_like(sam.data)
    s.paint(sam, (slice(120, 280), slice(70, 180)))
    s.accept()
    label_map = viewer.layers["label map"]
    assert (np.asarray(label_map.data) == 1).sum() == 160 * 110

    # 5. a second target, accepted as label 2 without touching label 1
    s.run_all("right lung")
    sam = s.layer("SAM mask", "right lung")
    sam.data = np.zeros_like(sam.data)
    s.paint(sam, (slice(120, 280), slice(150, 330)))  # overlaps the left lung
    s.accept()
    data = np.asarray(label_map.data)
    assert (data == 1).sum() == 160 * 110
    assert (data == 2).sum() == 160 * (330 - 180)
    names = dict(zip(label_map.features["index"], label_map.features["name"], strict=True))
    assert names == {0: "background", 1: "left lung", 2: "right lung"}

    # Save mask...: the 2-D sample as PNG, its label map and names beside it
    mask_png, map_png, names_json = s.save_mask(tmp_path / "saved" / "right_lung.png")
    assert set(np.unique(iio.imread(mask_png))) == {0, 255}
    np.testing.assert_array_equal(iio.imread(map_png), data)
    assert json.loads(names_json.read_text())["labels"] == {"background": 0, "left lung": 1,
                                                            "right lung": 2}

    # 6. Plugins > Pseudo-labels & training: export the label map as two named classes
    folders = {k: tmp_path / "nnunet" / k for k in ("raw", "preprocessed", "results")}
    t = s.dock_training(folders, dataset_id=5)
    try:
        s.export()
        assert "Exported 1 case(s)" in t.last_status, t.last_status
        [dataset] = (tmp_path / "nnunet" / "raw").glob("Dataset005_*")
        labels = json.loads((dataset / "dataset.json").read_text())["labels"]
        assert labels == {"background": 0, "left lung": 1, "right lung": 2}

        # 7. a tiny background training, then the ensemble's three layers over the image
        s.train_tiny()
        assert t.status.phase == "done", (t.status, t.log_view.toPlainText()[-2000:])
        s.predict()
        prob, mask, unc = (viewer.layers[f"nnU-Net {k}"]
                           for k in ("probability", "mask", "uncertainty"))
        for layer in (prob, mask, unc):
            assert layer.data.shape == (400, 400)
        assert set(np.unique(mask.data)) <= {0, 1, 2}
        assert list(mask.features["name"]) == ["background", "left lung", "right lung"]
        assert unc.data.min() >= 0 and unc.data.max() <= math.log(3) + 1e-6
        assert prob.data.min() >= 0 and prob.data.max() <= 1 + 1e-6
    finally:
        from napari_medclipsam.nnunet.job import cancel

        for job_dir in folders["results"].glob("*/medclipsam_job"):
            cancel(job_dir)
