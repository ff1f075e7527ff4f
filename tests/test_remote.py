"""Computing on another machine: SAM's image embedding moved between sessions
(``export_embedding`` / ``import_embedding``), and :mod:`napari_medclipsam.remote` on an
in-process Dask cluster (its workers are threads of this process, their tasks go through
TCP and pickling as on a real cluster).

Qt-free; the dock's side is tests/test_widget_remote.py.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from test_sam import random_image  # noqa: E402

from napari_medclipsam.core.errors import InputError  # noqa: E402
from napari_medclipsam.core.sam import Sam2Session, SamSession  # noqa: E402

BOX = [10.0, 8.0, 60.0, 40.0]


def _encoder_counter(model):
    """Forward passes of ``model``'s image encoder, counted by a hook."""
    calls = []
    model.image_encoder.register_forward_hook(lambda module, args, out: calls.append(1))
    return calls


def _sam1():
    from tiny_sam import build_tiny_sam

    return build_tiny_sam()


def _sam2():
    from tiny_sam2 import build_tiny_sam2

    return build_tiny_sam2()


@pytest.mark.parametrize(("build", "session_class", "family"),
                         [(_sam1, SamSession, "sam"), (_sam2, Sam2Session, "sam2")])
@pytest.mark.parametrize("fast", [True, False])
def test_an_exported_embedding_answers_prompts_in_another_session(build, session_class, family,
                                                                   fast):
    """Exported by one session, pickled, imported into a session on another copy of the same
    weights: the same masks and logits, and that session's image encoder never runs."""
    image = random_image(3, (50, 80, 3))
    there = session_class(build(), "tiny@abc", fast=fast)
    key = there.set_image(image)
    expected = there.predict(boxes=[BOX])
    expected_logits = there.predict(boxes=[BOX], points=[[30.0, 20.0]], point_labels=[0],
                                    return_logits=True)
    payload = pickle.loads(pickle.dumps(there.export_embedding(key)))
    assert payload["key"] == key and payload["family"] == family
    assert all(isinstance(v, np.ndarray) for k, v in payload.items()
               if k in ("features", "image_embed"))

    model = build()  # another copy: as a second machine would load it
    calls = _encoder_counter(model)
    here = session_class(model, "tiny@abc", fast=fast)
    assert here.import_embedding(key, payload) == key
    assert here.current_key == key and here.is_cached(key)
    np.testing.assert_array_equal(here.predict(boxes=[BOX]), expected)
    np.testing.assert_allclose(
        here.predict(boxes=[BOX], points=[[30.0, 20.0]], point_labels=[0],
                     return_logits=True), expected_logits, rtol=1e-5, atol=1e-5)
    assert here.set_image(image) == key  # the pixels find the imported embedding
    np.testing.assert_array_equal(here.predict(boxes=[BOX]), expected)
    assert calls == [] and here.encoder_calls == 0
    # and it goes back out unchanged
    again = here.export_embedding()
    for name in ("features", "image_embed"):
        if name in payload:
            np.testing.assert_array_equal(again[name], payload[name])


def test_an_embedding_of_other_weights_or_sizes_is_refused():
    image = random_image(4, (40, 40, 3))
    there = SamSession(_sam1(), "tiny@abc")
    key = there.set_image(image)
    payload = there.export_embedding()
    other = SamSession(_sam1(), "tiny@def")
    with pytest.raises(InputError, match="other weights"):
        other.import_embedding(key, payload)
    with pytest.raises(InputError, match="other weights"):  # a SAM 2 session
        Sam2Session(_sam2(), "tiny@abc").import_embedding(key, payload)
    here = SamSession(_sam1(), "tiny@abc")
    bad = dict(payload, features=payload["features"][:, :, :2])
    with pytest.raises(InputError, match="features has shape"):
        here.import_embedding(key, bad)
    with pytest.raises(InputError, match="input_size"):
        here.import_embedding(key, dict(payload, input_size=(10, 10)))
    assert here.cached_keys() == []
    with pytest.raises(KeyError):
        here.export_embedding("tiny@abc:nothing")


# --------------------------------------------------------------------------- remote.py
def test_compute_on_values_and_one_plugin_per_set_of_models():
    from napari_medclipsam.core.config import PipelineConfig
    from napari_medclipsam.remote import compute_address, plugin_name

    assert compute_address("") is None and compute_address(" this machine ") is None
    assert compute_address("tcp://gpu-box:8786") == "tcp://gpu-box:8786"
    assert compute_address("gpu-box:8786") == "tcp://gpu-box:8786"
    for bad in ("gpu box", "local", "http://gpu-box:8786", "gpu-box"):
        with pytest.raises(InputError, match="Dask scheduler address such as"):
            compute_address(bad)
    base = PipelineConfig(sam_model="vit_b")
    other_settings = PipelineConfig(sam_model="vit_b", method="salip")
    assert plugin_name(base) == plugin_name(other_settings)  # the same models
    assert plugin_name(base) != plugin_name(PipelineConfig(sam_model="vit_l"))
    assert plugin_name(base).startswith("medclipsam-models-")


@pytest.fixture(scope="module")
def cluster():
    """A scheduler and one worker in this process, over TCP (tasks and results pickled)."""
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                  protocol="tcp", dashboard_address=":0",
                                  silence_logs=40) as local:
        yield local


@pytest.fixture
def tiny_builders(monkeypatch):
    """The worker (this process) builds the tiny SAMs."""
    from tiny_clip import register_tiny_vit
    from tiny_sam2 import tiny_builder

    from napari_medclipsam.core import models

    register_tiny_vit()
    monkeypatch.setattr(models, "build_sam", tiny_builder)


def test_a_sam2_run_there_is_decoded_here_from_its_embedding(tiny_sam2_pipeline, cluster,
                                                            tiny_builders):
    """The controller on an injected SAM 2.1 pipeline sends Run all there; a box edit
    decodes the embedding that came back (no encoder here) as a run here would."""
    from napari_medclipsam._widgets.segment_controller import SegmentController
    from napari_medclipsam.core.pipeline import ZeroShotPipeline
    from napari_medclipsam.core.postprocess import Prompts

    image = random_image(5, (48, 64, 3))
    ctl = SegmentController(tiny_sam2_pipeline)
    ctl.set_remote(cluster.scheduler_address)
    run = ctl.run_all(image, ["a disk"])
    assert run.where and ctl.sam_ready
    here = ZeroShotPipeline(tiny_sam2_pipeline.config, clip=tiny_sam2_pipeline.clip,
                            sam=tiny_sam2_pipeline.sam)
    ref = here.segment(image, "a disk")
    np.testing.assert_array_equal(run.result.saliency, ref.saliency)
    np.testing.assert_array_equal(run.mask, ref.mask)
    box = Prompts(boxes=np.array([[8.0, 6.0, 40.0, 30.0]]))
    np.testing.assert_array_equal(ctl.refine(box), here.refine(ref.rgb, box))
    assert tiny_sam2_pipeline.session.encoder_calls == 0 and ctl.embedding_problem == ""
    ctl.remote.close()


def test_propagation_there_and_all_slices_cancelled_there(tiny_pipeline, cluster,
                                                         tiny_builders):
    """Propagation there equals propagation here; Cancel during All slices stops the
    worker, which sends back the slices it finished."""
    from napari_medclipsam.core.errors import CancelledError
    from napari_medclipsam.remote import RemoteCompute

    rng = np.random.default_rng(0)
    volume = (40 + 10 * rng.standard_normal((4, 32, 32))).clip(0, 255).astype(np.uint8)
    volume[:, 8:20, 10:24] = 220
    seed = np.zeros((32, 32), bool)
    seed[8:20, 10:24] = True
    remote = RemoteCompute(cluster.scheduler_address)
    config = tiny_pipeline.config
    there = remote.propagate(config, volume, seeds={1: seed}).volume
    here = tiny_pipeline.propagate_volume(volume, seeds={1: seed})
    np.testing.assert_array_equal(there.mask, here.mask)
    assert there.propagation.propagated == here.propagation.propagated

    import dataclasses

    slow = dataclasses.replace(config, saliency=dataclasses.replace(config.saliency,
                                                                    steps=300))
    stages: list[str] = []
    with pytest.raises(CancelledError) as caught:
        remote.segment_volume(slow, volume, "a disk", progress=lambda s, f: stages.append(s),
                              should_stop=lambda: any(s.startswith("slice 2/4") for s in stages))
    partial, checks = caught.value.partial
    assert partial.completed == [0] and 0 in checks
    assert stages[-1] == f"stopping on {remote.address}"
    remote.close()
