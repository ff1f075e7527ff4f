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
