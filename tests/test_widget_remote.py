"""The dock computing on another machine (issue 16): Models > Compute on set to a Dask
scheduler's address.

The "GPU box" is an in-process :class:`distributed.LocalCluster` (one worker thread of this
process, reached over TCP, so every task, result and embedding is pickled as on a real
cluster); its worker loads the tiny CLIP and SAM the dock's fields name. Opened as a person
does: the dock from the Plugins menu, the model fields and the address typed in. Each result
is compared with the chain run here on the same image and settings.

Needs a display with OpenGL (pytest-xvfb, or ``xvfb-run -a``).
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

pytest.importorskip("qtpy.QtWidgets", exc_type=ImportError)
pytest.importorskip("distributed")

from napari_helpers import SEGMENT, dock  # noqa: E402

PROMPT = "a disk"


@pytest.fixture(autouse=True)
def settings_dir(tmp_path, monkeypatch):
    """Widget settings go to a temporary folder, never to the user's config folder."""
    folder = tmp_path / "settings"
    monkeypatch.setenv("MEDCLIPSAM_CONFIG_DIR", str(folder))
    return folder


@pytest.fixture(scope="module")
def cluster():
    """A scheduler and one worker in this process, over TCP."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, protocol="tcp",
                      dashboard_address=":0", silence_logs=40) as local:
        yield local


@pytest.fixture
def tiny_models(monkeypatch, tiny_clip_dir):
    """segment-anything's builder swapped for the tiny one, here and on the worker (the
    same process); the tiny ViT registered with timm."""
    from tiny_clip import register_tiny_vit
    from tiny_sam2 import tiny_builder

    from napari_medclipsam.core import models

    register_tiny_vit()
    monkeypatch.setattr(models, "build_sam", tiny_builder)
    models.clear_model_cache()
    yield
    models.clear_model_cache()


def _image(h=48, w=64, seed=0):
    rng = np.random.default_rng(seed)
    img = (40 + 10 * rng.standard_normal((h, w))).clip(0, 255).astype(np.uint8)
    img[10:25, 20:40] = 220
    return img


def _name(kind, target=PROMPT):
    return f"{kind} [{target}]"


@pytest.fixture
def open_dock(make_napari_viewer, tiny_models, tiny_clip_dir, tiny_sam_checkpoint):
    """A viewer with an image and the dock from the Plugins menu, its model fields on the
    tiny models (2 saliency steps at block 2); closes the dock's connection at the end."""
    docks = []

    def make(data=None, address=""):
        viewer = make_napari_viewer()
        viewer.add_image(_image() if data is None else data, name="scan")
        w = dock(viewer, SEGMENT)
        w.clip_edit.setText(f"local-dir:{tiny_clip_dir}")
        w.sam_combo.setCurrentIndex(w.sam_combo.findData("vit_b"))
        w.checkpoint_edit.setText(str(tiny_sam_checkpoint))
        w.device_combo.setCurrentText("cpu")
        w.layer_spin.setValue(2)
        w.steps_spin.setValue(2)
        w.compute_edit.setText(address)
        docks.append(w)
        return w

    yield make
    for w in docks:
        if w.controller.remote is not None:
            w.controller.remote.close()


def _run(w, qtbot, prompt=PROMPT, timeout=60_000):
    w.prompt_edit.setPlainText(prompt)
    w.run_button.click()
    qtbot.waitUntil(lambda: not w.running, timeout=timeout)


def test_run_all_on_the_gpu_box_then_box_edits_decode_here(open_dock, qtbot, cluster,
                                                            settings_dir):
    """The layers equal a run here; the image is never encoded here: the first box edit
    loads SAM here (once) and decodes the embedding the worker sent back."""
    from napari_medclipsam.core.pipeline import ZeroShotPipeline
    from napari_medclipsam.core.postprocess import Prompts

    address = cluster.scheduler_address
    w = open_dock(address=address)
    viewer = w.viewer
    assert "Runs on tcp://" in w.compute_label.text()
    assert w.settings_label.text().endswith(f" · computed on {address}")
    assert "dask worker tcp://gpu-box:8786" in w.compute_edit.toolTip()
    assert "MEDCLIPSAM_HOME" in w.compute_edit.toolTip()
    w.compute_edit.editingFinished.emit()  # Enter: connect now and say what is there
    qtbot.waitUntil(lambda: w.compute_status is not None, timeout=20_000)
    assert w.compute_label.text().startswith(f"Connected to {address}: 1 worker (")

    _run(w, qtbot)
    run = w.controller.state.run
    assert run is not None, w.last_status
    assert w.last_status.startswith("Done in") and " on " in w.last_status
    stages = [u.stage for u in w.progress_log]
    assert stages[0] == f"sent to {address}"
    assert stages[1].startswith("running on ") and stages[1].endswith("(cpu)")
    assert "saliency step 2/2" in stages and stages[-1] == "done"
    assert run.where and "last run ran on" in w.compute_label.text()

    pipe = w.controller.pipeline
    ref_pipe = ZeroShotPipeline(pipe.config)
    ref = ref_pipe.segment(_image(), PROMPT)
    assert ref.found
    np.testing.assert_array_equal(viewer.layers[_name("saliency")].data, ref.saliency)
    np.testing.assert_array_equal(viewer.layers[_name("coarse mask")].data, ref.coarse.labels)
    np.testing.assert_array_equal(np.asarray(viewer.layers[_name("SAM mask")].data) > 0,
                                  ref.mask)
    rect = np.asarray(viewer.layers[_name("boxes")].data[0])
    x0, y0, x1, y1 = ref.prompts.boxes[0]
    np.testing.assert_allclose(rect.min(axis=0), [y0, x0])
    np.testing.assert_allclose(rect.max(axis=0), [y1, x1])
    assert not w.controller.sam_ready  # no SAM here yet: nothing was computed here

    boxes = viewer.layers[_name("boxes")]
    moved = np.asarray(boxes.data[0]) + np.array([3.0, -4.0])
    boxes.data = [moved]
    qtbot.waitUntil(lambda: w.refine_count == 1 and not w.running, timeout=30_000)
    assert "SAM loaded; SAM re-run from 1 box(es)" in w.last_status, w.last_status
    session = w.controller.pipeline.session
    assert session.encoder_calls == 0  # decoded from the worker's embedding
    (by0, bx0), (by1, bx1) = moved.min(axis=0), moved.max(axis=0)
    expected = ref_pipe.refine(ref.rgb, Prompts(boxes=np.array([[bx0, by0, bx1, by1]])))
    np.testing.assert_array_equal(np.asarray(viewer.layers[_name("SAM mask")].data) > 0,
                                  expected)
    assert ref_pipe.session.encoder_calls == 1

    boxes.data = [moved + 2.0]  # later edits: the decoder only, in the GUI thread
    qtbot.waitUntil(lambda: w.refine_count == 2, timeout=10_000)
    assert session.encoder_calls == 0 and w.last_status.startswith("SAM re-run")
    saved = json.loads((settings_dir / "segment_widget.json").read_text())
    assert saved["compute_on"] == address


def test_all_slices_and_cancel_on_the_gpu_box(open_dock, qtbot, cluster):
    """All slices there equals All slices here; Cancel stops the worker's run."""
    from napari_medclipsam.core.pipeline import ZeroShotPipeline

    volume = np.stack([_image(32, 32, seed) for seed in range(3)])
    address = cluster.scheduler_address
    w = open_dock(volume, address)
    w.all_slices_check.setChecked(True)
    _run(w, qtbot)
    run = w.controller.state.run
    assert run is not None and run.volume is not None, w.last_status
    assert "slices; mask of" in w.last_status and run.where
    ref = ZeroShotPipeline(w.controller.pipeline.config).segment_volume(volume, PROMPT)
    np.testing.assert_array_equal(w.viewer.layers[_name("saliency")].data, ref.saliency)
    np.testing.assert_array_equal(np.asarray(w.viewer.layers[_name("SAM mask")].data) > 0,
                                  ref.mask)
    assert any(u.stage.startswith("slice 3/3") for u in w.progress_log)

    w.all_slices_check.setChecked(False)
    w.steps_spin.setValue(2000)
    w.prompt_edit.setPlainText(PROMPT)
    start = time.monotonic()
    w.run_button.click()
    qtbot.waitUntil(lambda: any(u.stage.startswith("saliency step") for u in w.progress_log),
                    timeout=20_000)
    w.cancel_button.click()
    qtbot.waitUntil(lambda: not w.running, timeout=20_000)
    assert w.last_status == "Cancelled; nothing changed."
    assert time.monotonic() - start < 15
    assert w.progress_bar.format() == "cancelled"


def test_unreachable_machine_bad_address_and_a_worker_error_are_one_line(
        open_dock, qtbot, cluster, monkeypatch, tmp_path):
    from napari_medclipsam import remote

    monkeypatch.setattr(remote, "CONNECT_SECONDS", 2.0)
    w = open_dock(address="tcp://127.0.0.1:1")
    start = time.monotonic()
    _run(w, qtbot)
    assert time.monotonic() - start < 10
    assert w.last_status.startswith("Cannot reach the Dask scheduler at tcp://127.0.0.1:1")
    assert "\n" not in w.last_status and "dask worker tcp://127.0.0.1:1" in w.last_status
    assert w.run_button.isEnabled() and w.controller.state.run is None
    assert not any(layer.name.startswith("SAM mask") for layer in w.viewer.layers)

    w.compute_edit.setText("gpu box")
    w.compute_edit.editingFinished.emit()
    assert w.compute_label.text().startswith("Compute on 'gpu box': leave it empty")
    _run(w, qtbot)
    assert w.last_status.startswith("Compute on 'gpu box'")

    # the worker cannot find the SAM checkpoint the fields name: said in one line
    w.compute_edit.setText(cluster.scheduler_address)
    w.checkpoint_edit.setText(str(tmp_path / "no_such_sam.pth"))
    _run(w, qtbot)
    assert w.last_status.startswith(f"On {cluster.scheduler_address}: ")
    assert "SAM checkpoint not found" in w.last_status and "\n" not in w.last_status
    assert w.controller.state.run is None and w.run_button.isEnabled()

    w.compute_edit.setText("")  # back to this machine
    w.compute_edit.editingFinished.emit()
    assert w.compute_label.text() == "Runs on this machine."
    assert w.controller.remote is None
